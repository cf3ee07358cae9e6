"""Textual inversion on tiny models: new rows only, bit-identical weights, files, diffusers cross-load."""
import logging
import re

import numpy as np
import pytest
import torch

from sdknobs import load_model
from sdknobs.errors import SdknobsError
from sdknobs.text import embed_text, expand_prompt, tokenize
from sdknobs.ti import load_embedding, read_embedding, save_embedding
from sdknobs.ti.nearest import nearest
from sdknobs.ti.tokens import RowGuard, add_pseudo_tokens, init_word_id
from sdknobs.ti.verify import verify, weight_hashes

PROMPT = "a small red <my-shape> on the left, white background"


@pytest.fixture
def model(tiny_dir):
    """A fresh copy for each test: these tests add tokens to the model."""
    return load_model(tiny_dir, dtype="fp32")


@pytest.fixture(scope="module")
def star_data(tmp_path_factory):
    from sdknobs.shapes import world

    return world.write_dataset(tmp_path_factory.mktemp("ti") / "stars", 4, seed=3, kinds=("star",),
                               words={"star": "<my-shape>"})


def _cfg(tmp_path, star_data, tiny_dir, **kw):
    from sdknobs.ti.train import TITrainConfig

    base = dict(data_dir=str(star_data), out=str(tmp_path / "emb" / "learned_embeds.safetensors"), model=str(tiny_dir),
                token="<my-shape>", init_word="shape", template="captions", steps=3, learning_rate=5e-2,
                validate_every=0, checkpoint_every=0, progress=False)
    return TITrainConfig(**{**base, **kw})


def test_add_tokens_appends_rows_and_expands_prompts(model):
    E0 = model.text_encoder.get_input_embeddings().weight.detach().clone()
    rng = torch.get_rng_state()
    v = torch.randn(3, E0.shape[1], generator=torch.Generator().manual_seed(0))
    ids = add_pseudo_tokens(model, "<my-shape>", v)
    E1 = model.text_encoder.get_input_embeddings().weight
    assert ids == list(range(E0.shape[0], E0.shape[0] + 3))
    assert torch.equal(E1[: E0.shape[0]], E0) and torch.equal(E1[ids], v)
    assert torch.equal(torch.get_rng_state(), rng)  # no random init ran
    assert model.text_encoder.config.vocab_size == E0.shape[0] + 3
    # <t> -> <t> <t>_1 <t>_2 in prompts (any case: CLIP lowercases); each vector takes one slot
    assert expand_prompt(model.tokenizer, "a <My-Shape>, x") == "a <my-shape> <my-shape>_1 <my-shape>_2, x"
    row = tokenize(model.tokenizer, [PROMPT])[0][0].tolist()
    assert row[4:7] == ids and row[3] == init_word_id(model.tokenizer, "red")
    # the encoder reads the new rows: one vector changed -> different conditioning
    a = embed_text(model, [PROMPT])[0]
    with torch.no_grad():
        E1[ids[2]] += 1.0
    assert not torch.equal(a, embed_text(model, [PROMPT])[0])


def test_restore_rows_invariant_under_adamw_weight_decay():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 8)
    guard = RowGuard(emb.weight, [48, 49])
    opt = torch.optim.AdamW([emb.weight], lr=0.1, weight_decay=0.5)
    for step in range(5):
        loss = emb(torch.tensor([1, 2, 48, 49, 3])).pow(2).sum()  # rows 1, 2, 3 get gradient too
        opt.zero_grad()
        loss.backward()
        assert set(torch.nonzero(emb.weight.grad.abs().sum(1)).flatten().tolist()) == {1, 2, 3, 48, 49}
        opt.step()
        assert len(guard.changed_rows()) == 50  # weight decay moved every row, Adam the used ones more
        guard.restore()
        assert guard.changed_rows() == [48, 49]
    assert torch.equal(emb.weight[:48], guard.original[:48])
    assert opt.state[emb.weight]["exp_avg"][1].abs().sum() > 0  # the moments moved; the rows did not


def test_training_changes_only_the_new_rows(model, tiny_dir, star_data, tmp_path):
    from sdknobs.ti.train import train_ti

    rows = model.text_encoder.get_input_embeddings().weight.shape[0]
    before = weight_hashes(model)
    rng = torch.get_rng_state()
    res, method = train_ti(_cfg(tmp_path, star_data, tiny_dir, vectors=2, format="kohya",
                                out=str(tmp_path / "my-shape.safetensors")), model, log=lambda s: None)
    after = weight_hashes(model, rows=rows)
    assert before == after  # every weight bit-identical (the embedding matrix on its original rows)
    assert method.guard.changed_rows() == method.ids == [rows, rows + 1]
    assert not torch.equal(method.vectors(), method.init_vectors)
    assert torch.equal(torch.get_rng_state(), rng)
    emb = read_embedding(res.out)
    assert emb.format == "kohya" and emb.token == "<my-shape>" and torch.equal(emb.vectors, method.vectors())
    assert emb.metadata["init_word"] == "shape" and emb.metadata["vectors"] == "2"
    assert (res.run_dir / "loss_curve.png").exists()


def test_resume_equals_uninterrupted(tiny_dir, star_data, tmp_path):
    from sdknobs.ti.train import train_ti

    full, m_full = train_ti(_cfg(tmp_path / "a", star_data, tiny_dir, steps=4), load_model(tiny_dir), log=lambda s: None)
    cfg = _cfg(tmp_path / "b", star_data, tiny_dir, steps=2, checkpoint_every=2)
    train_ti(cfg, load_model(tiny_dir), log=lambda s: None)
    cfg2 = _cfg(tmp_path / "b", star_data, tiny_dir, steps=4, checkpoint_every=2, resume=True)
    res, m_res = train_ti(cfg2, load_model(tiny_dir), log=lambda s: None)
    assert torch.equal(m_full.vectors(), m_res.vectors())


def test_verify_reports_bit_identical(model, tmp_path):
    path = save_embedding(tmp_path / "e", "<my-shape>", torch.randn(2, model.text_width) * 0.5)
    rep = verify(model, path, steps=3)
    assert rep.ok and all(rep.identical) and not rep.weights_changed and rep.weights_checked > 50
    assert rep.token_change > 0  # the token itself does change its prompt's picture
    with pytest.raises(SdknobsError, match="must not contain the token"):
        verify(load_model(model.source), path, prompts=["a <my-shape>"], steps=1)


@pytest.mark.parametrize("fmt,name", [("diffusers", "my-shape.safetensors"), ("kohya", "my-shape.safetensors"),
                                      ("a1111", "my-shape.pt")])
def test_file_round_trips(tmp_path, fmt, name):
    v = torch.randn(3, 32)
    path = save_embedding(tmp_path, "<my-shape>", v, format=fmt, metadata={"steps": 7, "init_word": "shape"})
    assert path.name == name and not list(tmp_path.glob(".*tmp"))
    emb = read_embedding(path)
    assert (emb.format, emb.token, emb.n_vectors) == (fmt, "<my-shape>", 3)
    assert torch.equal(emb.vectors, v) and emb.metadata["init_word"] == "shape"
    renamed = path.rename(tmp_path / f"other{path.suffix}")
    assert read_embedding(renamed).token == ("other" if fmt == "kohya" else "<my-shape>")
    assert read_embedding(renamed, token="<x>").token == "<x>"


def test_reads_other_tools_files(tmp_path):
    v = torch.randn(2, 32)
    torch.save({"<cat-toy>": v}, tmp_path / "learned_embeds.bin")  # diffusers' older .bin
    assert read_embedding(tmp_path).token == "<cat-toy>"  # a folder: learned_embeds.* inside
    torch.save(v, tmp_path / "bare.pt")
    assert read_embedding(tmp_path / "bare.pt").token == "bare"
    # A1111's own .pt: string_to_param holds an nn.Parameter (allowed by weights_only)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(v)}, "name": "CharTurner",
                "step": 100, "sd_checkpoint": "abc", "sd_checkpoint_name": "v1-5"}, tmp_path / "ct.pt")
    emb = read_embedding(tmp_path / "ct.pt")
    assert emb.token == "charturner" and torch.equal(emb.vectors, v)


class Evil:
    def __reduce__(self):
        return (print, ("this would have run",))


def test_refuses_arbitrary_unpickling(tmp_path, capsys):
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}, "name": "x", "payload": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(SdknobsError, match=r"refused, it needs arbitrary unpickling \(it names print.*can run any code"):
        read_embedding(tmp_path / "evil.pt")
    assert "would have run" not in capsys.readouterr().out


def test_format_and_width_errors(model, tmp_path):
    from safetensors.torch import save_file

    for width, family in ((768, "SD1.x"), (1024, "SD2.x")):
        p = save_embedding(tmp_path / f"w{width}", "<w>", torch.zeros(1, width))
        with pytest.raises(SdknobsError, match=rf"{width} wide, {re.escape(family)}.*is 32 wide"):
            load_embedding(model, p)
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, tmp_path / "xl.safetensors")
    assert read_embedding(tmp_path / "xl.safetensors").widths == [768, 1280]  # SDXL's: read, refused on SD1
    with pytest.raises(SdknobsError, match="SDXL.*768.*1280.*one text encoder 32 wide"):
        load_embedding(model, tmp_path / "xl.safetensors")
    save_file({"a": torch.zeros(1, 32), "b": torch.zeros(1, 32)}, tmp_path / "two.safetensors")
    with pytest.raises(SdknobsError, match="match no embedding format"):
        read_embedding(tmp_path / "two.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(SdknobsError, match="not a readable safetensors"):
        read_embedding(tmp_path / "junk.safetensors")
    with pytest.raises(SdknobsError, match="no such file"):
        read_embedding(tmp_path / "missing.pt")


def test_token_errors(model, tmp_path):
    with pytest.raises(SdknobsError, match=r"'star' is already in the tokenizer \(id \d+\).*existing word"):
        add_pseudo_tokens(model, "star", torch.zeros(1, 32))
    p = save_embedding(tmp_path, "<my-shape>", torch.zeros(1, 32))
    load_embedding(model, p)
    with pytest.raises(SdknobsError, match="already loaded"):
        load_embedding(model, p)
    with pytest.raises(SdknobsError, match="capital letters"):
        add_pseudo_tokens(model, "<My>", torch.zeros(1, 32))
    with pytest.raises(SdknobsError, match=r"'heartshape' is 2 tokens \(heart \+ shape\).*alternatives: heart, shape"):
        init_word_id(model.tokenizer, "heartshape")
    with pytest.raises(SdknobsError, match="between 1 and 8"):
        add_pseudo_tokens(model, "<nine>", torch.zeros(9, 32))


def test_config_errors(tmp_path):
    from sdknobs.ti.train import TITrainConfig

    for kw, msg in [({"init_word": ""}, "--init-word is required"), ({"vectors": 0}, "--vectors must be"),
                    ({"template": "poem"}, "--template 'poem'"), ({"format": "ckpt"}, "--format 'ckpt'"),
                    ({"format": "a1111", "out": "x.safetensors"}, "written as a .pt")]:
        with pytest.raises(SdknobsError, match=re.escape(msg)):
            TITrainConfig(**{"data_dir": "d", "out": "e.safetensors", "token": "<t>", "init_word": "shape", **kw})
    assert TITrainConfig(data_dir="d", token="<t>", init="random").out.endswith("ti-t/t.safetensors")


def test_multi_vector_prompts_and_pipelines(model, tmp_path, photo, half_mask):
    from sdknobs.pipelines import generate, img2img, inpaint

    base = np.asarray(generate(model, "a small red circle", steps=3, seed=1, progress=False).images[0])
    p = save_embedding(tmp_path, "<my-shape>", torch.randn(4, 32, generator=torch.Generator().manual_seed(1)))
    load_embedding(model, p)
    assert np.array_equal(base, np.asarray(generate(model, "a small red circle", steps=3, seed=1, progress=False).images[0]))
    ids = tokenize(model.tokenizer, ["<my-shape> and <my-shape>"])[0][0].tolist()
    new, and_ = [49408, 49409, 49410, 49411], init_word_id(model.tokenizer, "and")
    assert ids[:11] == [model.tokenizer.bos_token_id, *new, and_, *new, model.tokenizer.eos_token_id]
    r = generate(model, PROMPT, steps=3, seed=1, batch=2, progress=False)
    assert len(r.images) == 2 and "<my-shape>" in r.parameters[0]
    img2img(model, photo, PROMPT, strength=0.5, steps=4, progress=False)
    inpaint(model, photo, half_mask, PROMPT, steps=3, progress=False)


def test_diffusers_load_textual_inversion_gives_our_image(tiny_dir, tmp_path):
    """Our file in diffusers' pipe.load_textual_inversion == our load_embedding, same latents."""
    from diffusers import StableDiffusionPipeline

    from sdknobs.pipelines import _run

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    v = torch.randn(2, 32, generator=torch.Generator().manual_seed(2))
    for fmt, token in (("diffusers", None), ("kohya", "<my-shape>")):
        path = save_embedding(tmp_path / fmt, "<my-shape>", v, format=fmt)
        pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_textual_inversion(str(path), token=token)
        ref = pipe(PROMPT, num_inference_steps=4, guidance_scale=3.0, height=32, width=32,
                   generator=torch.Generator().manual_seed(4), output_type="latent").images
        ours_model = load_model(tiny_dir)
        load_embedding(ours_model, path)
        ours, _ = _run(ours_model, PROMPT, "", steps=4, guidance=3.0, scheduler="ddim", seed=4, width=32, height=32,
                       batch=1, progress=False)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
        assert pipe.tokenizer.convert_tokens_to_ids(["<my-shape>", "<my-shape>_1"]) == [49408, 49409]


def test_nearest_finds_the_word_it_copies(model):
    E = model.text_encoder.get_input_embeddings().weight.detach()
    circle = init_word_id(model.tokenizer, "circle")
    v = torch.stack([E[circle], E[circle] + 0.3 * E[init_word_id(model.tokenizer, "square")]])
    rows = nearest(model, v, ["<t>", "<t>_1"], k=3, init_word="circle")
    assert rows[0].top[0][:2] == ("circle", circle) and rows[0].top[0][2] == pytest.approx(1.0)
    assert rows[0].init_rank == 1 and rows[1].init_cosine < 1.0


def test_trace_step_shows_many_rows_get_gradient(model, star_data):
    from sdknobs.ti.trace import format_trace, trace

    r = trace(model, data_dir=str(star_data), model_name=model.source)
    grad_rows = [row for row, _, _ in r.grad_rows]
    assert r.new_ids[0] in grad_rows and len(grad_rows) > 5  # words, BOS, EOS get gradient too
    assert r.changed_rows == r.new_ids and len(r.moved_rows) > len(grad_rows)
    assert r.shapes["encoder_hidden_states"] == (1, 77, 32)
    assert any("<- new token" in line for line in format_trace(r))


def test_pipelines_embeddings_argument_with_lora(model, tmp_path):
    """`embeddings=` loads once (same file again: no-op); TI and LoRA compose; PNG parameters name both."""
    from sdknobs.lora.files import LoraFactors, LoraWeights, write_lora
    from sdknobs.pipelines import generate

    p = save_embedding(tmp_path / "e", "<my-shape>", torch.randn(2, 32, generator=torch.Generator().manual_seed(3)))
    g = torch.Generator().manual_seed(4)
    layer = next(n for n, m in model.unet.named_modules() if n.endswith("attn2.to_k"))
    fan_in, fan_out = model.unet.get_submodule(layer).in_features, model.unet.get_submodule(layer).out_features
    lora = write_lora(LoraWeights({f"unet.{layer}": LoraFactors(torch.randn(4, fan_in, generator=g),
                                                                torch.randn(fan_out, 4, generator=g), 4.0)}),
                      tmp_path / "l.safetensors")
    kw = dict(steps=3, seed=2, progress=False)
    plain = np.asarray(generate(model, "a red circle", lora=[str(lora)], **kw).images[0])
    a = generate(model, PROMPT, embeddings=[p], lora=[str(lora)], **kw)
    assert "TI hashes" in a.parameters[0] and "Lora hashes" in a.parameters[0]
    b = generate(model, PROMPT, embeddings=[p], **kw)  # the file again: already loaded, no error
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))  # the LoRA acts with the token
    assert np.array_equal(plain, np.asarray(generate(model, "a red circle", lora=[str(lora)], **kw).images[0]))
    other = save_embedding(tmp_path / "o", "<my-shape>", torch.zeros(2, 32))
    with pytest.raises(SdknobsError, match="already loaded with other vectors"):
        generate(model, PROMPT, embeddings=[other], **kw)
    generate(model, "<x2> and <my-shape>", embeddings=[f"{other}=<x2>"], **kw)


def test_caption_templates(tmp_path):
    from sdknobs.ti.train import OBJECT_TEMPLATES, STYLE_TEMPLATES, TIMethod, TITrainConfig

    def method(**kw):
        return TIMethod(TITrainConfig(data_dir="d", out=str(tmp_path / "e.safetensors"), token="<t>", init_word="shape", **kw))

    m = method(template="captions", caption_word="shape")
    assert m.caption("a red shape on the left", None) == "a red <t> on the left"
    assert m.caption("a red <T> x", None) == "a red <T> x"  # already there (any case)
    assert m.caption("a red circle", None) == "<t>, a red circle"
    torch.manual_seed(0)
    obj = {method(template="object").caption("", None) for _ in range(30)}
    assert len(obj) > 5 and obj <= {t.format("<t>") for t in OBJECT_TEMPLATES}
    assert method(template="style").caption("", None) in {t.format("<t>") for t in STYLE_TEMPLATES}
    assert method(template="object").needs_captions is False and m.needs_captions is True
