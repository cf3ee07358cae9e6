"""LoRA and textual inversion on SDXL (tiny random SDXL weights, sdknobs.tiny.build_sdxl_model): presets on the
SDXL U-Net, both text encoders, training with cached text outputs (both hidden states and the pooled output)
and SDXL's size/crop ids, the LoRA tools, and the compatibility errors between SD1.x and SDXL."""
import re

import numpy as np
import pytest
import torch
from PIL import Image

from sdknobs import SdknobsError, load_model
from sdknobs.lora import layers as L
from sdknobs.lora.files import LoraFactors, LoraWeights, read_lora, write_lora
from sdknobs.lora.targets import resolve_targets


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two captioned pictures: 48x32 (landscape: resized to 48x32 at 32 px, centre crop at left 8) and 32x40."""
    d = tmp_path_factory.mktemp("xl-data")
    rng = np.random.default_rng(0)
    for name, (w, h) in {"wide": (48, 32), "tall": (32, 40)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"{name}.png")
        (d / f"{name}.txt").write_text(f"a {name} red circle, white background")
    return d


def random_lora(model, targets, text_encoder=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = LoraWeights({})
    for t in resolve_targets(model, targets, text_encoder):
        w.layers[L.layer_key(model, t.component, t.name)] = LoraFactors(
            torch.randn(t.down_shape(2), generator=g) * 0.3, torch.randn(t.up_shape(2), generator=g) * 0.3, 2.0)
    return w


# --- presets and targets on the SDXL U-Net and both encoders ------------------------------------------------------

def test_presets_resolve_on_the_sdxl_unet(xl):
    cross = resolve_targets(xl, ["cross-attn"])
    assert cross and all(".attn2." in t.name for t in cross)
    assert not any(t.name.startswith("down_blocks.0.") for t in cross)  # SDXL's first level has no attention
    assert any("transformer_blocks.1." in t.name for t in cross)  # two transformer blocks in the second
    for preset in ("attn", "attn-ff", "conv"):
        assert resolve_targets(xl, [preset])
    te = resolve_targets(xl, ["cross-attn"], text_encoder=True)
    assert {t.component for t in te} == {"unet", "text_encoder", "text_encoder_2"}
    assert {t.component for t in resolve_targets(xl, ["cross-attn"], text_encoder="2")} == {"unet", "text_encoder_2"}
    te2 = resolve_targets(xl, [r"te2:mlp\.fc1$"])
    assert te2 and all(t.component == "text_encoder_2" and t.in_features == 64 for t in te2)


def test_second_encoder_is_an_error_on_one_encoder_models(tiny):
    with pytest.raises(SdknobsError, match="only SDXL has a second"):
        resolve_targets(tiny, ["cross-attn"], text_encoder="2")
    with pytest.raises(SdknobsError, match="no text_encoder_2"):
        resolve_targets(tiny, [r"te2:fc1"])


# --- LoRA tools: inspect, conflict, merge ---------------------------------------------------------------------------

def test_inspect_conflict_and_merge_on_sdxl(xl, xl_dir, tiny, tmp_path):
    from sdknobs.lora.inspect import conflict, inspect_lines
    from sdknobs.lora.merge import combine, merge_into

    a = write_lora(random_lora(xl, ["attn"], text_encoder=True, seed=1), tmp_path / "a.safetensors")
    b = write_lora(random_lora(xl, ["attn"], text_encoder=True, seed=2), tmp_path / "b.safetensors", "diffusers")
    wa, wb = read_lora(a), read_lora(b)
    text = "\n".join(inspect_lines(wa, xl))
    assert "SDXL" in text and "text_encoder_2.layers.0" in text and "unet.down_blocks.1" in text
    c = conflict(wa, wb)
    assert len(c.cosines) == len(wa.layers) and -1 <= c.score <= 1
    # file to file: concat is exact, on every layer of both encoders and the U-Net, in kohya's SDXL layout
    w, err = combine([(wa, 0.5), (wb, -1.0)], "concat")
    out = read_lora(write_lora(w, tmp_path / "ab.safetensors"), model=xl)
    assert out.architecture == "SDXL" and max(err.values()) == 0
    for k in wa.layers:
        torch.testing.assert_close(out.layers[k].delta(), 0.5 * wa.layers[k].delta() - wb.layers[k].delta(),
                                   atol=1e-5, rtol=1e-4)
    # into the model: W' = W + delta W, text_encoder_2 included
    m = load_model(xl_dir, device="cpu", dtype="fp32")
    key = next(k for k in wa.layers if k.startswith("text_encoder_2."))
    root, path = L.resolve_module(m, key)
    before = root.get_submodule(path).weight.detach().clone()
    merge_into(m, wa, 1.0)
    torch.testing.assert_close(root.get_submodule(path).weight, before + wa.layers[key].delta(), atol=1e-6, rtol=0)
    # an SD1.x LoRA cannot be merged into or combined with an SDXL one
    sd1 = write_lora(random_lora(tiny, ["cross-attn"]), tmp_path / "sd1.safetensors")
    with pytest.raises(SdknobsError, match="different architectures"):
        combine([(wa, 1.0), (read_lora(sd1), 1.0)])
    with pytest.raises(SdknobsError, match="different architectures"):
        conflict(wa, read_lora(sd1))


# --- training ----------------------------------------------------------------------------------------------------

def test_train_lora_on_sdxl_two_steps(xl_dir, data, tmp_path):
    from sdknobs.lora.train import ADAPTER, LoraTrainConfig, train_lora

    m = load_model(xl_dir, device="cpu", dtype="fp32")
    seen = []

    def grab(mod, args, kwargs):
        seen.append({k: v.detach().clone() for k, v in (kwargs.get("added_cond_kwargs") or {}).items()})

    hook = m.unet.register_forward_pre_hook(grab, with_kwargs=True)
    encoded = []
    orig = m.text_encoder_2.forward
    m.text_encoder_2.forward = lambda *a, **k: (encoded.append(1), orig(*a, **k))[1]
    cfg = LoraTrainConfig(data_dir=str(data), out=str(tmp_path / "xl.safetensors"), model=str(xl_dir), steps=2,
                          learning_rate=5e-2, batch_size=2, rank=2, targets=["cross-attn"], cache_latents=True,
                          validate_every=0, checkpoint_every=0, progress=False)
    res, method = train_lora(cfg, m, log=lambda s: None)
    hook.remove()
    assert len(encoded) == 2  # frozen encoders: each of the two captions encoded once, then cached
    # the size/crop ids of each picture, as diffusers' train_text_to_image_lora_sdxl.py makes them:
    # (original H, W, crop top, left, target H, W); wide 48x32 -> centre crop left 8; tall 32x40 -> crop top 4
    ids = {tuple(int(x) for x in row) for step in seen for row in step["time_ids"]}
    assert ids == {(32, 48, 0, 8, 32, 32), (40, 32, 4, 0, 32, 32)}, ids
    assert all(s["text_embeds"].shape == (2, 32) for s in seen)  # the pooled output of the second encoder
    w = read_lora(res.out, model=m)
    assert w.architecture == "SDXL" and w.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert set(w.layers) == set(L.extract(m, ADAPTER).layers)
    assert all(float(f.up.abs().max()) > 0 for f in w.layers.values())


def test_train_lora_on_sdxl_with_the_second_text_encoder(xl_dir, data, tmp_path):
    from sdknobs.lora.train import LoraTrainConfig, train_lora

    m = load_model(xl_dir, device="cpu", dtype="fp32")
    cfg = LoraTrainConfig(data_dir=str(data), out=str(tmp_path / "te2.safetensors"), model=str(xl_dir), steps=2,
                          learning_rate=5e-2, batch_size=2, rank=2, text_encoder=True, text_encoders="2",
                          validate_every=0, checkpoint_every=0, progress=False, format="diffusers",
                          gradient_checkpointing=True)
    res, _ = train_lora(cfg, m, log=lambda s: None)
    w = read_lora(res.out, model=m)
    comps = {k.split(".")[0] for k in w.layers}
    assert comps == {"unet", "text_encoder_2"}
    assert all(float(f.up.abs().max()) > 0 for k, f in w.layers.items() if k.startswith("text_encoder_2."))
    with pytest.raises(SdknobsError, match="--text-encoders '3'"):
        LoraTrainConfig(data_dir=str(data), text_encoders="3")


def test_lora_merge_into_an_sdxl_model_folder(xl_dir, tmp_path, capsys):
    from sdknobs.cli import main

    m = load_model(xl_dir, device="cpu", dtype="fp32")
    a = write_lora(random_lora(m, ["attn"], text_encoder=True, seed=3), tmp_path / "a.safetensors")
    assert main(["lora", "merge", str(a), "--model", str(xl_dir), "--out", str(tmp_path / "merged")]) == 0
    report = capsys.readouterr().out
    diff = [float(x) for x in re.findall(r"max \|diff\| ([0-9.e+-]+)", report)]
    assert len(diff) == 2 and max(diff) < 1e-4, report  # merged weights = the bypass, text and U-Net
    merged = load_model(tmp_path / "merged", device="cpu", dtype="fp32")
    assert merged.family == "sdxl"
    key = next(k for k in read_lora(a).layers if k.startswith("text_encoder_2."))
    root, path = L.resolve_module(merged, key)
    root0, _ = L.resolve_module(m, key)
    torch.testing.assert_close(root.get_submodule(path).weight,
                               root0.get_submodule(path).weight + read_lora(a).layers[key].delta(), atol=1e-5, rtol=0)
    assert main(["lora", "conflict", str(a), str(a)]) == 0  # (inspect: test_inspect_conflict_and_merge_on_sdxl)
    assert "+1.000" in capsys.readouterr().out


# --- textual inversion ------------------------------------------------------------------------------------------

def test_train_ti_on_sdxl_two_steps_both_tables(xl_dir, data, tmp_path):
    from sdknobs.ti import read_embedding
    from sdknobs.ti.tokens import embedding_matrix
    from sdknobs.ti.train import TITrainConfig, train_ti

    m = load_model(xl_dir, device="cpu", dtype="fp32")
    base = [embedding_matrix(m, i).detach().clone() for i in range(2)]
    cfg = TITrainConfig(data_dir=str(data), out=str(tmp_path / "xl-tok.safetensors"), model=str(xl_dir), steps=2,
                        token="<xl-tok>", init_word="circle", template="captions", caption_word="circle",
                        learning_rate=5e-2, batch_size=2, validate_every=0, checkpoint_every=0, progress=False,
                        format="kohya")
    res, method = train_ti(cfg, m, log=lambda s: None)
    e = read_embedding(res.out)
    assert e.format == "sdxl" and e.widths == [32, 64] and e.token == "<xl-tok>"
    for i, (v, ids) in enumerate(zip(e.parts, method.ids_by_encoder)):
        E = embedding_matrix(m, i).detach()
        assert torch.equal(E[: base[i].shape[0]], base[i])  # every old row of each table restored bit for bit
        init = base[i][m.tokenizers[i]("circle", add_special_tokens=False).input_ids[0]]
        assert float((v[0] - init).abs().max()) > 1e-4  # both row sets learned
        torch.testing.assert_close(E[ids], v, atol=0, rtol=0)
    with pytest.raises(SdknobsError, match="--format a1111: an SDXL embedding"):
        train_ti(TITrainConfig(data_dir=str(data), out=str(tmp_path / "x.pt"), model=str(xl_dir), token="<a-b>",
                               init_word="circle", format="a1111", steps=1, progress=False), m, log=lambda s: None)


def test_sd1_embedding_on_sdxl_and_the_reverse(xl, tiny, tmp_path):
    from sdknobs.ti import load_embedding, save_embedding

    one = save_embedding(tmp_path / "one.safetensors", "<one>", torch.zeros(1, 32))
    two = save_embedding(tmp_path / "two.safetensors", "<two>", torch.zeros(1, 32), vectors_2=torch.zeros(1, 64))
    with pytest.raises(SdknobsError, match=r"one-encoder embedding 32 wide .*is SDXL, with two text encoders 32 wide "
                                           r"\(clip_l\) and 64 wide \(clip_g\)") as e:
        load_embedding(xl, one)
    assert "\n" not in str(e.value)
    with pytest.raises(SdknobsError, match=r"SDXL embedding \(clip_l 32 wide and clip_g 64 wide.*SD1\.x/SD2\.x-style "
                                           r"model with one text encoder 32 wide"):
        load_embedding(tiny, two)
    wrong = save_embedding(tmp_path / "w.safetensors", "<w>", torch.zeros(1, 32), vectors_2=torch.zeros(1, 1280))
    with pytest.raises(SdknobsError, match=r"clip_g vectors are 1280 wide, SDXL's second encoder.*is 64 wide"):
        load_embedding(xl, wrong)


def test_ti_tools_on_sdxl(xl_dir, tmp_path, capsys):
    from sdknobs.cli import main
    from sdknobs.ti import save_embedding

    g = torch.Generator().manual_seed(1)
    f = save_embedding(tmp_path / "t-xl.safetensors", "<t-xl>", torch.randn(1, 32, generator=g),
                       vectors_2=torch.randn(1, 64, generator=g))
    assert main(["ti", "verify", str(f), "--model", str(xl_dir), "--steps", "2", "--prompts", "a red circle", ""]) == 0
    out = capsys.readouterr().out
    assert "in clip_l's table" in out and "in clip_g's table" in out and "OK" in out
    assert main(["ti", "nearest", str(f), "--model", str(xl_dir), "--k", "2"]) == 0
    out = capsys.readouterr().out
    assert "clip_l (text encoder 1, 32 wide)" in out and "clip_g (text encoder 2, 64 wide)" in out
    assert main(["ti", "nearest", "--word", "circle", "--model", str(xl_dir), "--k", "2"]) == 0
    assert "in clip_g's table (text encoder 2)" in capsys.readouterr().out
    assert main(["ti", "trace-step", "--model", str(xl_dir), "--init-word", "star"]) == 0
    out = capsys.readouterr().out
    assert "of the second text encoder (clip_g)" in out and out.count("(only the new token's)") == 2


def test_bad_sdxl_inputs_exit_2_and_write_nothing(tiny_dir, xl_dir, data, tmp_path, capsys):
    from sdknobs.cli import main
    from sdknobs.ti import save_embedding

    out = tmp_path / "out"
    emb = save_embedding(tmp_path / "one.safetensors", "<one>", torch.zeros(1, 32))
    cases = [
        (["train-lora", str(data), "--model", str(tiny_dir), "--text-encoder", "--text-encoders", "2", "--steps", "1",
          "--out", str(out / "x.safetensors")], "only SDXL has a second"),
        (["train-lora", str(data), "--model", str(xl_dir), "--text-encoders", "3", "--out", str(out / "y.safetensors")],
         "--text-encoders '3'"),
        (["train-ti", str(data), "--model", str(xl_dir), "--token", "<a-b>", "--init-word", "circle", "--format", "a1111",
          "--steps", "1", "--out", str(out / "z.pt")], "an SDXL embedding is a .safetensors"),
        (["generate", "--model", str(xl_dir), "--prompt", "a <one>", "--embedding", str(emb), "--steps", "1",
          "--out", str(out / "e.png")], "is SDXL, with two text encoders"),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, (argv, err)
        assert not out.exists(), argv  # nothing written, not even the run folder


def test_diffusers_sdxl_ti_folder_reads_as_one_embedding(xl_dir, tmp_path):
    """diffusers' textual_inversion_sdxl.py output: learned_embeds.safetensors + learned_embeds_2.safetensors."""
    from safetensors.torch import save_file

    from sdknobs.ti import load_embedding, read_embedding

    v1, v2 = torch.randn(2, 32), torch.randn(2, 64)
    save_file({"<d-xl>": v1}, str(tmp_path / "learned_embeds.safetensors"))
    save_file({"<d-xl>": v2}, str(tmp_path / "learned_embeds_2.safetensors"))
    e = read_embedding(tmp_path)
    assert e.token == "<d-xl>" and e.widths == [32, 64] and torch.equal(e.vectors_2, v2)
    m = load_model(xl_dir, device="cpu", dtype="fp32")
    loaded = load_embedding(m, tmp_path)
    torch.testing.assert_close(m.text_encoder_2.get_input_embeddings().weight[loaded.ids_by_encoder[1]], v2)
    save_file({"<other>": v2}, str(tmp_path / "learned_embeds_2.safetensors"))
    with pytest.raises(SdknobsError, match="for the same token"):
        read_embedding(tmp_path)


def test_renamed_sdxl_embedding_names_its_trained_token(tiny_xl_dir, tmp_path):
    """An SDXL file is read by its name (as A1111 and kohya do); trained as '<o>' but saved as ti.safetensors,
    its name 'ti' is a vocabulary word: the error names the trained token and both ways out."""
    import torch

    from sdknobs import load_model
    from sdknobs.errors import SdknobsError
    from sdknobs.ti import load_embedding
    from sdknobs.ti.files import save_embedding

    model = load_model(tiny_xl_dir)
    w1, w2 = model.text_widths
    path = save_embedding(tmp_path / "ti.safetensors", "<o>", torch.randn(1, w1), vectors_2=torch.randn(1, w2))
    with pytest.raises(SdknobsError, match=r"trained as '<o>'.*rename it to o\.safetensors or give --embedding .*=<o>"):
        load_embedding(model, path)
    assert load_embedding(model, path, token="<o>").token == "<o>"
