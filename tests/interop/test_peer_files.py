"""Files other tools write are read, or refused by name (one line, exit 2, naming the file, the key, what was
expected and what was found), in every command that reads them."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdknobs import load_model
from sdknobs.cli import main
from sdknobs.errors import SdknobsError
from sdknobs.lora.files import read_lora, write_lora
from sdknobs.lora.inspect import inspect_lines
from sdknobs.ti import load_embedding, read_embedding

from . import peers

UP = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q"


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def good(tiny_dir, tmp_path_factory):
    """A valid kohya LoRA for the tiny model (32-wide text, 32/64-channel U-Net)."""
    from tests.test_lora import random_lora

    return write_lora(random_lora(load_model(tiny_dir)), tmp_path_factory.mktemp("good") / "good.safetensors")


def kohya_pair(name, down, up, alpha=None):
    sd = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
    return sd | ({f"{name}.alpha": torch.tensor(alpha)} if alpha is not None else {})


BAD_LORAS = {  # file name -> (tensors, metadata, words the message must hold)
    "sdxl.safetensors": (kohya_pair("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q", torch.zeros(4, 640),
                                    torch.zeros(640, 4), 4.0), {"ss_base_model_version": "sdxl_base_v1-0"},
                         ["LoRA for SDXL", "sdxl_base_v1-0"]),
    "sdxl-keys.safetensors": (kohya_pair("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q",
                                         torch.zeros(4, 640), torch.zeros(640, 4)), {},
                              ["LoRA for SDXL", "transformer_blocks_1"]),
    "te-projection.safetensors": (kohya_pair("lora_te_text_projection", torch.zeros(2, 32), torch.zeros(32, 2)), {},
                                  ["'lora_te_text_projection'", "no LoRA-able layer"]),
    "unknown-unet.safetensors": (kohya_pair("lora_unet_foo_bar_to_q", torch.zeros(2, 32), torch.zeros(32, 2)), {},
                                 ["'lora_unet_foo_bar_to_q'", "no LoRA-able layer"]),
    "nan.safetensors": (kohya_pair(UP, torch.full((2, 64), float("nan")), torch.zeros(64, 2)), {},
                        [f"{UP}.lora_down.weight", "NaN/inf", "expected finite"]),
    "int.safetensors": (kohya_pair(UP, torch.zeros(2, 64, dtype=torch.int64), torch.zeros(64, 2)), {},
                        [f"{UP}.lora_down.weight", "torch.int64", "floating point"]),
    "rank0.safetensors": (kohya_pair(UP, torch.zeros(0, 64), torch.zeros(64, 0)), {}, ["rank 0", "rank >= 1"]),
    "mismatch.safetensors": (kohya_pair(UP, torch.zeros(2, 64), torch.zeros(64, 3)), {},
                             ["lora_up has shape (64, 3) but lora_down (2, 64)", "expected lora_up [out, 2]"]),
    "alpha0.safetensors": (kohya_pair(UP, torch.zeros(2, 64), torch.zeros(64, 2), 0.0), {}, ["alpha is 0.0"]),
    "weights.safetensors": ({"method/unet.x.lora_A": torch.zeros(1)}, {}, ["training checkpoint's weights"]),
}


@pytest.fixture(scope="module")
def bad_loras(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    out = {}
    for name, (sd, meta, words) in BAD_LORAS.items():
        save_file(sd, str(d / name), metadata=meta)
        out[d / name] = words
    (d / "truncated.safetensors").write_bytes((d / "nan.safetensors").read_bytes()[:100])
    out[d / "truncated.safetensors"] = ["not a readable safetensors file"]
    ck = d / "checkpoint-10"
    ck.mkdir()
    (ck / "weights.safetensors").write_bytes(b"")
    (ck / "state.pt").write_bytes(b"")
    out[ck] = ["training checkpoint folder"]
    out[ck / "state.pt"] = ["training checkpoint's state"]
    return out


# commands that load a model first get two files of the table (the same reader runs for all: see the
# library-level check below); the others get every file
SAMPLE = ("sdxl", "nan", "inf", "evil")


def cases(table, command, heavy):
    out = [(p, w) for p, w in table.items() if command not in heavy or p.stem in SAMPLE]
    if command == "inspect":  # SDXL files are valid on their own (tests/test_sdxl_lora_ti.py); refused with SD1
        return [(p, w) for p, w in out if not p.stem.startswith("sdxl")]
    if command in ("conflict", "merge"):  # against an SD1 LoRA: the two architectures named
        return [(p, ["SDXL", "SD1.x/SD2.x"] if p.stem.startswith("sdxl") else w) for p, w in out]
    return out


@pytest.mark.parametrize("command", ["inspect", "conflict", "merge", "generate"])
def test_bad_lora_files_refused_by_every_command(capsys, tiny_dir, good, bad_loras, tmp_path, command):
    for path, words in cases(bad_loras, command, ("generate",)):
        argv = {"inspect": ["lora", "inspect", path],
                "conflict": ["lora", "conflict", good, path],
                "merge": ["lora", "merge", good, path, "--out", tmp_path / "m.safetensors"],
                "generate": ["generate", "--model", tiny_dir, "--prompt", "x", "--steps", "1", "--lora", path,
                             "--out", tmp_path / "g.png"]}[command]
        code, _, err = cli(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and str(path) in err, (command, path.name, err)
        for w in words:
            assert w in err, (command, path.name, w, err)
    assert not list(tmp_path.iterdir())  # nothing written


def test_every_bad_file_refused_when_applied(tiny_dir, bad_loras, bad_embeddings):
    """What generate/img2img/... do with --lora and --embedding, on one loaded model, for every file."""
    from sdknobs.lora import apply_loras

    model = load_model(tiny_dir)
    for path, words in bad_loras.items():
        with pytest.raises(SdknobsError) as e:
            apply_loras(model, [str(path)])
        assert str(path) in str(e.value) and all(w in str(e.value) for w in words), (path.name, str(e.value))
    for path, words in bad_embeddings.items():
        with pytest.raises(SdknobsError) as e:
            load_embedding(model, path)
        assert str(path) in str(e.value) and all(w in str(e.value) for w in words), (path.name, str(e.value))
    assert "lora" not in model.extra and not model.extra.get("embeddings")


def test_sdxl_refusal_names_both_architectures(tiny_dir, bad_loras):
    from sdknobs.lora import apply_loras

    sdxl = next(p for p in bad_loras if p.name == "sdxl.safetensors")
    with pytest.raises(SdknobsError, match=r"LoRA for SDXL \(metadata ss_base_model_version = 'sdxl_base_v1-0'\); "
                                           r"the model .* is an SD1.x/SD2.x-architecture model \(family custom\)"):
        apply_loras(load_model(tiny_dir), [str(sdxl)])


def test_peft_text_encoder_adapter_saved_by_transformers_5(tiny_dir, tmp_path):
    """peft's save_pretrained under transformers 5: base_model.model.encoder.layers... (no text_model.)."""
    model = load_model(tiny_dir)
    sd = {f"base_model.model.encoder.layers.{i}.self_attn.{p}.lora_{ab}.weight": torch.randn(*(2, 32) if ab == "A" else (32, 2))
          for i in range(2) for p in ("q_proj", "v_proj") for ab in "AB"}
    save_file(sd, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    w = read_lora(tmp_path / "adapter_model.safetensors")
    assert sorted(w.layers)[0] == "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    assert "text_encoder 4" in "\n".join(inspect_lines(w, model)) and {f.scale for f in w.layers.values()} == {2.0}
    from sdknobs.lora import apply_loras

    apply_loras(model, [str(tmp_path / "adapter_model.safetensors")])  # fits the text encoder


def test_classic_a1111_embeddings(tmp_path):
    """ParameterDict .pt (A1111 before 2023) and both PNG forms read; their vectors are the file's."""
    v = torch.randn(2, 32)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(v)}),
                "name": "oldstar", "step": 9}, tmp_path / "oldstar.pt")
    emb = read_embedding(tmp_path / "oldstar.pt")
    assert (emb.token, emb.format) == ("oldstar", "a1111") and torch.equal(emb.vectors, v)
    picture = Image.fromarray(np.random.default_rng(0).integers(16, 255, (32, 32, 3), dtype=np.uint8))
    for text_chunk in (True, False):
        im, info = peers.a1111_png(picture, {"string_to_param": {"*": v}, "name": "pngstar", "step": 3}, text_chunk)
        path = tmp_path / f"pngstar-{text_chunk}.png"
        im.save(path, pnginfo=info)
        emb = read_embedding(path)
        assert emb.token == "pngstar" and torch.allclose(emb.vectors, v), text_chunk
    picture.save(tmp_path / "preview.png")
    with pytest.raises(SdknobsError, match="holds no embedding"):
        read_embedding(tmp_path / "preview.png")


class Evil:
    def __reduce__(self):
        return (print, ("ran",))


@pytest.fixture(scope="module")
def bad_embeddings(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad-emb")
    save_file({"emb_params": torch.full((1, 32), float("inf"))}, str(d / "inf.safetensors"))
    save_file({"emb_params": torch.zeros(1, 32, dtype=torch.int32)}, str(d / "int.safetensors"))
    save_file({"emb_params": torch.zeros(1, 768)}, str(d / "wide.safetensors"))
    save_file({"emb_params": torch.zeros(0, 32)}, str(d / "empty.safetensors"))
    save_file({"method/ti": torch.zeros(1)}, str(d / "weights.safetensors"))
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}, "x": Evil()}, d / "evil.pt")
    torch.save({"step": 3, "optimizers": {}, "rng": {}}, d / "state.pt")
    (d / "cut.pt").write_bytes((d / "state.pt").read_bytes()[:60])
    return {d / "inf.safetensors": ["emb_params", "NaN/inf"], d / "int.safetensors": ["torch.int32", "float tensor"],
            d / "wide.safetensors": ["768 wide", "32 wide"], d / "empty.safetensors": ["no vectors"],
            d / "weights.safetensors": ["training checkpoint"], d / "evil.pt": ["refused", "print"],
            d / "state.pt": ["training checkpoint"], d / "cut.pt": ["not a readable torch file"]}


@pytest.mark.parametrize("command", ["verify", "nearest", "generate"])
def test_bad_embedding_files_refused_by_every_command(capsys, tiny_dir, bad_embeddings, tmp_path, command):
    for path, words in cases(bad_embeddings, command, ("verify", "nearest", "generate")):
        argv = {"verify": ["ti", "verify", path, "--model", tiny_dir, "--steps", "1", "--prompts", "x"],
                "nearest": ["ti", "nearest", path, "--model", tiny_dir],
                "generate": ["generate", "--model", tiny_dir, "--prompt", "x", "--steps", "1", "--embedding", path,
                             "--out", tmp_path / "g.png"]}[command]
        code, out, err = cli(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and str(path) in err, (command, path.name, err)
        assert "ran" not in out
        for w in words:
            assert w in err, (command, path.name, w, err)
    assert not list(tmp_path.iterdir())


def test_width_checked_when_loading(tiny_dir, bad_embeddings):
    wide = next(p for p in bad_embeddings if p.name == "wide.safetensors")
    with pytest.raises(SdknobsError, match="768 wide, SD1.x"):
        load_embedding(load_model(tiny_dir), wide)


def test_inspect_with_a_model_names_a_layer_it_lacks(capsys, tiny_dir, tmp_path):
    name = "lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn2_to_q"
    save_file(kohya_pair(name, torch.zeros(2, 32), torch.ones(32, 2)), str(tmp_path / "absent.safetensors"))
    code, _, err = cli(capsys, "lora", "inspect", tmp_path / "absent.safetensors", "--model", tiny_dir)
    assert code == 2 and f"key '{name}.lora_down.weight'" in err and "has no such layer" in err, err


def test_older_diffusers_attn_procs_layout(tmp_path):
    """save_attn_procs' keys (...processor.to_q_lora.down.weight), with or without the unet. prefix."""
    k = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora"
    for prefix in ("", "unet."):
        save_file({f"{prefix}{k}.down.weight": torch.randn(2, 32), f"{prefix}{k}.up.weight": torch.randn(32, 2)},
                  str(tmp_path / "procs.safetensors"))
        assert list(read_lora(tmp_path / "procs.safetensors").layers) == [
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
