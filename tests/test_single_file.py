"""Single-file (original CompVis/LDM layout) checkpoints: round trip, key layout, family detection on
full-size architectures (meta tensors, no memory) and refusals."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdknobs.errors import SdknobsError
from sdknobs.model import load_model
from sdknobs.single_file import (CONFIGS, _assemble, _build, _prediction_type, detect_family,
                                 ldm_state_dict, load_single_file, save_single_file)
from sdknobs.tiny import build_model, write_tiny_model

SEED = 7


class NotATensor:  # a custom class in a pickle: weights-only unpickling must refuse it
    pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model, its diffusers folder (for config=) and its LDM file."""
    d = tmp_path_factory.mktemp("single_file")
    model = build_model(seed=SEED)
    folder = write_tiny_model(d / "folder", seed=SEED)
    path = save_single_file(model, d / "tiny.safetensors")
    return model, folder, path


def _assert_same_weights(a, b):
    for name, module in a.components().items():
        sa, sb = module.state_dict(), b.components()[name].state_dict()
        assert sa.keys() == sb.keys(), name
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k}"


@pytest.mark.parametrize("layout", ["clip", "open_clip"])
def test_round_trip(tiny, tmp_path, layout):
    model, folder, path = tiny
    if layout == "open_clip":  # the SD2.x text layout: packed q/k/v, ln_1/ln_2, c_fc/c_proj
        path = save_single_file(model, tmp_path / "tiny_open_clip.safetensors", text_layout=layout)
    loaded = load_single_file(path, config=folder)
    _assert_same_weights(model, loaded)
    assert loaded.family == "custom" and loaded.source == str(path)
    assert loaded.extra["text_layout"] == layout
    assert loaded.prediction_type == "epsilon" and loaded.scheduler_config["beta_schedule"] == "scaled_linear"
    assert loaded.tokenizer("a cat").input_ids[:2] == [49406, 320]
    assert not list(tmp_path.glob(".*.tmp")), "temporary file left behind"
    # and back again: the re-saved file is the same tensors under the same names
    again = load_file(save_single_file(loaded, tmp_path / "again.safetensors"))
    first = load_file(path)
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


def test_ldm_key_names(tiny):
    model, _, path = tiny
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        q = f.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape()
    for k in ["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
              "model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.time_embed.0.weight",
              "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
              "model.diffusion_model.input_blocks.2.0.op.weight", "model.diffusion_model.middle_block.1.proj_in.weight",
              "model.diffusion_model.middle_block.2.emb_layers.1.weight", "model.diffusion_model.out.2.weight",
              "model.diffusion_model.output_blocks.1.1.conv.weight",  # upsampler of a block without attention
              "model.diffusion_model.output_blocks.3.0.skip_connection.weight",
              "first_stage_model.encoder.down.0.block.0.conv1.weight", "first_stage_model.encoder.down.0.downsample.conv.weight",
              "first_stage_model.decoder.up.2.block.1.conv2.weight", "first_stage_model.decoder.up.2.upsample.conv.weight",
              "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight", "first_stage_model.decoder.mid.block_2.norm1.weight",
              "first_stage_model.quant_conv.weight", "first_stage_model.encoder.norm_out.weight",
              "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
              "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight"]:
        assert k in keys, k
    assert not any(k.startswith(("unet.", "vae.", "text_encoder.", "down_blocks.")) for k in keys)
    assert len(q) == 4  # LDM's VAE attention is 1x1 convs
    assert meta["prediction_type"] == "epsilon"


FULL = {"sd1": ("SD1.x", "clip", "epsilon", 64), "sd2": ("SD2.x", "open_clip", "epsilon", 64),
        "sd2-v": ("SD2.x", "open_clip", "v_prediction", 96)}


@pytest.mark.parametrize("variant", FULL)
def test_full_size_detection_and_conversion_on_meta(variant):
    """The real SD architectures, built on the meta device from the shipped configs: their LDM keys and
    shapes match the published checkpoints, are detected, and diffusers' converters fill every weight."""
    family, layout, pred, sample = FULL[variant]
    _, text, unet, vae, _ = _build(CONFIGS / variant)
    sd = ldm_state_dict(text, unet, vae, layout)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert detect_family(shapes) == family
    with pytest.raises(SdknobsError, match="9 input channels"):  # inpainting: refused by name, not by accident
        detect_family({**shapes, "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)})
    counts = [sum(k.startswith(p) for k in shapes) for p in ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")]
    width = 768 if family == "SD1.x" else 1024
    assert counts == ([686, 248, 196] if family == "SD1.x" else [686, 248, 280])  # v1-5-pruned: 1130 + position_ids
    assert shapes["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, width)
    assert shapes["model.diffusion_model.input_blocks.1.1.proj_in.weight"] == ((320, 320, 1, 1) if width == 768 else (320, 320))
    assert shapes["model.diffusion_model.output_blocks.11.0.skip_connection.weight"] == (320, 640, 1, 1)
    assert shapes["first_stage_model.encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    if layout == "clip":
        assert shapes["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] == (49408, 768)
    else:
        assert shapes["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] == (3072, 1024)
        assert shapes["cond_stage_model.model.positional_embedding"] == (77, 1024)
        sd["cond_stage_model.model.transformer.resblocks.23.mlp.c_fc.weight"] = torch.empty(4096, 1024, device="meta")
        sd["cond_stage_model.model.text_projection"] = torch.empty(1024, 1024, device="meta")
    position_ids = "transformer.text_model.embeddings.position_ids" if layout == "clip" else "model.logit_scale"
    for k in ("alphas_cumprod", "model_ema.decay", "cond_stage_model." + position_ids):
        sd[k] = torch.empty(1, device="meta")
    step = {"sd1": None, "sd2": 875000, "sd2-v": 110000}[variant]  # diffusers' rule for .ckpt global_step
    m = _assemble("meta.ckpt", sd.__getitem__, {k: tuple(v.shape) for k, v in sd.items()}, {}, step, torch.float16, None, None)
    assert (m.family, m.prediction_type, m.unet.config.sample_size) == (family, pred, sample)
    assert m.text_width == width and m.unet.dtype == torch.float16
    assert set(m.extra["ignored_keys"]) >= {"alphas_cumprod", "model_ema.decay"}
    assert len(m.extra["ldm_passthrough"]) == (0 if layout == "clip" else 2)
    assert m.tokenizer.pad_token == ("<|endoftext|>" if family == "SD1.x" else "!")


def test_sd2_prediction_type_rules(monkeypatch):
    from sdknobs import single_file

    assert _prediction_type("SD2.x", None, {}, {}, {}, None) == (None, single_file.TEST_RUN)  # no step, no metadata
    unet = build_model(seed=SEED).unet  # A1111's test run: mean(U-Net(0.5 latent, t=999) - latent) < -1 is v
    with torch.no_grad():
        unet.conv_out.weight.zero_()
        for bias, v in ((-2.0, True), (0.5, False)):  # the U-Net returns `bias` everywhere: the score is bias - 0.5
            unet.conv_out.bias.fill_(bias)
            assert single_file._v_test(unet) == pytest.approx(bias - 0.5) and (single_file._v_test(unet) < -1) == v
    _, text, unet, vae, _ = _build(CONFIGS / "sd2")  # the full SD2 architecture on meta, no step: the run decides
    sd = ldm_state_dict(text, unet, vae, "open_clip")
    shapes = {k: tuple(t.shape) for k, t in sd.items()}
    for score, want in ((-1.5, ("v_prediction", 96, True)), (-0.2, ("epsilon", 64, False))):
        monkeypatch.setattr(single_file, "_v_test", lambda unet, s=score: s)
        m = _assemble("meta.safetensors", sd.__getitem__, shapes, {}, None, torch.float16, None, None)
        assert (m.prediction_type, m.unet.config.sample_size, m.unet.config.upcast_attention) == want
        assert "test run" in m.extra["prediction_type_source"]
        assert m.scheduler_config["_class_name"] == ("DDIMScheduler" if want[0] == "v_prediction" else "PNDMScheduler")
    assert _prediction_type("SD2.x", "epsilon", {}, {}, {}, 0)[0] == "epsilon"
    assert _prediction_type("SD1.x", None, {}, {"v_pred": ()}, {}, None)[0] == "v_prediction"
    assert _prediction_type("SD1.x", None, {}, {}, {"modelspec.prediction_type": "v"}, None)[0] == "v_prediction"
    assert _prediction_type("SD1.x", None, {}, {}, {}, None)[0] is None  # then the config's
    with pytest.raises(SdknobsError, match="prediction_type 'vpred'"):
        _prediction_type("SD1.x", "vpred", {}, {}, {}, None)


def _edited(tiny, tmp_path, edit):
    sd = load_file(tiny[2])
    edit(sd)
    out = tmp_path / "edited.safetensors"
    save_file(sd, str(out))
    return out


def test_missing_key_is_named(tiny, tmp_path):
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    path = _edited(tiny, tmp_path, lambda sd: sd.pop(key))
    with pytest.raises(SdknobsError) as e:
        load_single_file(path, config=tiny[1])
    assert key in str(e.value) and "missing" in str(e.value) and str(path) in str(e.value)


def test_wrong_shape_names_key_and_both_shapes(tiny, tmp_path):
    key = "first_stage_model.encoder.conv_in.weight"
    path = _edited(tiny, tmp_path, lambda sd: sd.__setitem__(key, torch.zeros(16, 3, 5, 5)))
    with pytest.raises(SdknobsError) as e:
        load_single_file(path, config=tiny[1])
    msg = str(e.value)
    assert key in msg and "(16, 3, 5, 5)" in msg and "(16, 3, 3, 3)" in msg and "custom" in msg


def test_unexpected_keys_refused_and_non_weights_reported(tiny, tmp_path):
    path = _edited(tiny, tmp_path, lambda sd: sd.update({"model.diffusion_model.extra.weight": torch.zeros(2)}))
    with pytest.raises(SdknobsError, match=r"unexpected key\(s\): model\.diffusion_model\.extra\.weight"):
        load_single_file(path, config=tiny[1])
    ignorable = {"alphas_cumprod": torch.zeros(1000), "model_ema.num_updates": torch.zeros(1, dtype=torch.int64),
                 "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    path = _edited(tiny, tmp_path, lambda sd: sd.update(ignorable))
    m = load_single_file(path, config=tiny[1], prediction_type="v_prediction")
    assert sorted(m.extra["ignored_keys"]) == sorted(ignorable) and m.prediction_type == "v_prediction"


def test_tiny_without_config_is_not_a_known_family(tiny):
    with pytest.raises(SdknobsError, match="not a standard SD1.x .*config="):
        load_model(tiny[2])


@pytest.mark.parametrize("keys, match", [
    ({"foo.bar": torch.zeros(2), "baz": torch.ones(3)}, "not a Stable Diffusion 1.x/2.x/SDXL checkpoint.*foo.bar"),
    ({"conditioner.embedders.0.transformer.text_model.x": torch.zeros(1), "model.diffusion_model.x": torch.zeros(1)}, "SDXL"),
    ({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}, "diffusers component"),
])
def test_unknown_files_are_refused(tmp_path, keys, match):
    path = tmp_path / "x.safetensors"
    save_file(keys, str(path))
    with pytest.raises(SdknobsError, match=match):
        load_single_file(path)


def test_pickles(tiny, tmp_path):
    sd = load_file(tiny[2])
    good = tmp_path / "good.ckpt"  # Lightning's wrapper with plain values loads weights-only
    torch.save({"state_dict": sd, "global_step": 1, "epoch": 0}, good)
    _assert_same_weights(tiny[0], load_single_file(good, config=tiny[1]))
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": sd, "callbacks": NotATensor()}, evil)
    with pytest.raises(SdknobsError, match="refusing .*NotATensor.*arbitrary unpickling.*safetensors"):
        load_single_file(evil, config=tiny[1])
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(SdknobsError, match="junk.pt"):
        load_single_file(junk)


def test_bad_paths(tmp_path, tiny):
    with pytest.raises(SdknobsError, match="no such checkpoint"):
        load_single_file(tmp_path / "nope.safetensors")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(SdknobsError, match="unknown checkpoint type"):
        load_single_file(tmp_path / "w.bin")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(SdknobsError, match="not a readable .safetensors"):
        load_single_file(tmp_path / "bad.safetensors")
    with pytest.raises(SdknobsError, match="written as .safetensors only"):
        save_single_file(tiny[0], tmp_path / "m.ckpt")
    with pytest.raises(SdknobsError, match="not a diffusers folder"):
        load_single_file(tiny[2], config=tmp_path)
