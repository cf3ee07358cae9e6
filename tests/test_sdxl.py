"""SDXL on tiny random weights: our loop against diffusers' SDXL pipelines (same weights, seed and noise), the
text encoding against diffusers' encode_prompt, the loaders (diffusers folder, SGM single file) both ways, and
bad inputs.

Tolerance: latents agree to 1e-4 absolute (float32 on CPU, as tests/test_equivalence.py for SD1; measured
~1e-5 at most, Euler's latents reach ~17)."""
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdknobs.errors import SdknobsError
from sdknobs.loop import make_scheduler
from sdknobs.model import load_model
from sdknobs.pipelines import _run, generate
from sdknobs.text import encode_prompt

ATOL = 1e-4
PROMPT = "a small red circle on the left, white background"


@pytest.fixture(scope="module")
def xl_file(xl, tmp_path_factory):
    from sdknobs.single_file import save_single_file

    return save_single_file(xl, tmp_path_factory.mktemp("sf") / "tiny-sdxl.safetensors")


@pytest.fixture(scope="module")
def xl_pipes(xl):
    """diffusers' SDXL pipelines on the same modules (the folder itself is read by diffusers in the round-trip test)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    parts = {k: getattr(xl, k) for k in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet")}
    parts["scheduler"] = make_scheduler("ddim", xl.scheduler_config)
    out = {"txt2img": StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True),
           "img2img": StableDiffusionXLImg2ImgPipeline(**parts, requires_aesthetics_score=False),
           "inpaint": StableDiffusionXLInpaintPipeline(**parts, requires_aesthetics_score=False)}
    for p in out.values():
        p.set_progress_bar_config(disable=True)
    return out


def _ref(pipe, name, config):
    pipe.scheduler = make_scheduler(name, config)
    return pipe


@pytest.mark.parametrize("scheduler, negative, sizes", [
    ("ddim", "blurry", {}),
    ("euler", "", {"original_size": (64, 48), "crop_top_left": (4, 2), "target_size": (40, 24)}),
])
def test_txt2img_matches_diffusers(xl, xl_pipes, scheduler, negative, sizes):
    """Both encoders' penultimate states, the second's pooled output, the time ids ((W, H) flags -> diffusers'
    (H, W)), and the zeroed empty negative prompt (force_zeros_for_empty_prompt: diffusers' negative_prompt=None)."""
    from sdknobs.pipelines import _size_conditioning

    size = _size_conditioning(xl, 32, 32, **sizes)
    ours, _ = _run(xl, PROMPT, negative, steps=4, guidance=4.0, scheduler=scheduler, seed=3, width=32, height=32,
                   batch=2, progress=False, size=size)
    flip = {k: tuple(reversed(v)) for k, v in sizes.items()}
    ref = _ref(xl_pipes["txt2img"], scheduler, xl.scheduler_config)(
        PROMPT, negative_prompt=negative or None, num_inference_steps=4, guidance_scale=4.0, height=32, width=32,
        num_images_per_prompt=2, generator=[torch.Generator().manual_seed(3 + i) for i in range(2)],
        output_type="latent", **{"crops_coords_top_left" if k == "crop_top_left" else k: v for k, v in flip.items()}).images
    assert ours.shape == ref.shape == (2, 4, 8, 8)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    if sizes:  # the conditioning is live: the defaults give other latents
        default, _ = _run(xl, PROMPT, negative, steps=4, guidance=4.0, scheduler=scheduler, seed=3, width=32, height=32,
                          batch=2, progress=False)
        assert (default - ours).abs().max() > 1e-3


@pytest.mark.parametrize("scheduler, strength", [("ddim", 0.6), ("euler", 0.4)])
def test_img2img_matches_diffusers(xl, xl_pipes, photo, scheduler, strength):
    ours, info = _run(xl, PROMPT, "", image=photo, strength=strength, steps=6, guidance=3.0, scheduler=scheduler, seed=5,
                      width=32, height=32, batch=1, progress=False)
    ref = _ref(xl_pipes["img2img"], scheduler, xl.scheduler_config)(
        PROMPT, image=photo, strength=strength, num_inference_steps=6, guidance_scale=3.0,
        generator=torch.Generator().manual_seed(5), output_type="latent").images
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    assert info.steps_run == int(6 * strength)


@pytest.mark.parametrize("scheduler, strength", [("ddim", 1.0), ("euler", 0.7)])
def test_inpaint_matches_diffusers(xl, xl_pipes, photo, half_mask, scheduler, strength):
    ours, _ = _run(xl, PROMPT, "blurry", image=photo, mask=half_mask, strength=strength, steps=5, guidance=3.0,
                   scheduler=scheduler, seed=7, width=32, height=32, batch=1, progress=False)
    ref = _ref(xl_pipes["inpaint"], scheduler, xl.scheduler_config)(
        PROMPT, negative_prompt="blurry", image=photo, mask_image=half_mask, strength=strength, num_inference_steps=5,
        guidance_scale=3.0, height=32, width=32, generator=torch.Generator().manual_seed(7), output_type="latent").images
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def test_prompt_weights_and_chunks_per_encoder(xl, xl_pipes):
    """A1111 on SDXL: each encoder's hidden states weighted and its chunk mean restored on its own; pooled output
    unweighted, from the first chunk. Reference: diffusers' encode_prompt of the plain text, weighted by hand."""
    pipe = xl_pipes["txt2img"]
    plain, _, pooled, _ = pipe.encode_prompt("a red circle", do_classifier_free_guidance=False)
    emb = encode_prompt(xl, "a (red:1.5) circle", guidance=1.0)
    want = []
    for part in plain.split(xl.text_widths, dim=-1):  # [1, 77, 32] and [1, 77, 64]
        w = torch.ones(77, dtype=torch.float64)
        w[2] = 1.5  # BOS, a, red
        z = part.double() * w[None, :, None]
        want.append(z * (part.double().mean() / z.mean()))
    torch.testing.assert_close(emb.cond.double(), torch.cat(want, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb.cond_pooled, pooled, atol=1e-6, rtol=0)
    _, neg, _, neg_pooled = pipe.encode_prompt("a red circle", negative_prompt="", do_classifier_free_guidance=True)
    xl.extra["force_zeros_for_empty_prompt"] = False  # a folder that says so: "" is encoded, as diffusers does
    try:
        e0 = encode_prompt(xl, "a red circle", "", guidance=3.0)
    finally:
        xl.extra["force_zeros_for_empty_prompt"] = True
    torch.testing.assert_close(e0.uncond, neg, atol=1e-6, rtol=0)
    torch.testing.assert_close(e0.uncond_pooled, neg_pooled, atol=1e-6, rtol=0)
    assert e0.uncond.abs().max() > 0 and not encode_prompt(xl, "a red circle", "", guidance=3.0).uncond.any()
    long = " ".join(["red circle blue square"] * 25)  # 100 tokens, no commas: two chunks, the first = diffusers' window
    e2 = encode_prompt(xl, long, guidance=1.0)
    ref, _, ref_pooled, _ = pipe.encode_prompt(long, do_classifier_free_guidance=False)
    assert e2.cond.shape == (1, 154, 96)
    torch.testing.assert_close(e2.cond[:, :77], ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(e2.cond_pooled, ref_pooled, atol=1e-6, rtol=0)


def test_loader_round_trip_folder_and_single_file(xl, xl_dir, xl_file):
    """Folder -> SGM single file: diffusers' own from_single_file reads it with the same weights; ours loads it as
    sdxl and samples the same latents as the folder."""
    from diffusers import StableDiffusionXLPipeline

    keys = list(safe_open(str(xl_file), "pt").keys())
    assert any(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in keys)
    assert "conditioner.embedders.1.model.text_projection" in keys and "model.diffusion_model.label_emb.0.0.weight" in keys
    ref = StableDiffusionXLPipeline.from_single_file(str(xl_file), config=str(xl_dir), local_files_only=True)
    folder = StableDiffusionXLPipeline.from_pretrained(xl_dir)  # and diffusers reads our folder
    assert folder.config.force_zeros_for_empty_prompt and folder.tokenizer_2.pad_token == "!"
    again = load_model(xl_file, config=xl_dir)
    assert again.family == "sdxl" and again.text_widths == [32, 64]
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b, c, d = (getattr(m, name).state_dict() for m in (xl, again, ref, folder))
        assert a.keys() == b.keys() == c.keys() == d.keys()
        assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) and torch.equal(a[k], d[k]) for k in a), name
    kw = dict(steps=3, guidance=4.0, scheduler="euler", seed=1, width=32, height=32, batch=1, progress=False)
    assert torch.equal(_run(xl, PROMPT, "", **kw)[0], _run(again, PROMPT, "", **kw)[0])


def test_full_size_sdxl_on_meta():
    """The shipped SDXL base configs give SDXL base's 2,515 single-file keys (with position_ids and logit_scale) and
    shapes, detected as sdxl and filled by diffusers' converters."""
    from sdknobs.single_file import CONFIGS, _assemble, _build, detect_family, ldm_state_dict

    _, (t1, t2), unet, vae, _ = _build(CONFIGS / "sdxl")
    sd = ldm_state_dict(t1, unet, vae, "sdxl", t2)
    for k in ("conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
              "conditioner.embedders.1.model.logit_scale"):
        sd[k] = torch.empty(1, device="meta")
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert len(shapes) == 2515 and detect_family(shapes) == "sdxl"
    assert shapes["model.diffusion_model.label_emb.0.0.weight"] == (1280, 2816)
    assert shapes["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"] == (640, 2048)
    assert shapes["model.diffusion_model.middle_block.1.transformer_blocks.9.attn1.to_q.weight"] == (1280, 1280)
    assert shapes["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert shapes["conditioner.embedders.1.model.text_projection"] == (1280, 1280)
    m = _assemble("meta.safetensors", sd.__getitem__, shapes, {}, None, torch.float16, None, None)
    assert (m.family, m.text_widths, m.context_width, m.default_size) == ("sdxl", [768, 1280], 2048, 1024)
    assert m.prediction_type == "epsilon" and m.tokenizer_2.pad_token == "!"
    with pytest.raises(SdknobsError, match="not a standard SDXL base.*1280"):
        detect_family({**shapes, "conditioner.embedders.1.model.token_embedding.weight": (49408, 1024)})


def test_bad_inputs(xl, xl_dir, xl_file, tmp_path, tiny):
    sd = load_file(xl_file)
    key = "conditioner.embedders.1.model.transformer.resblocks.0.ln_1.weight"
    save_file({k: v for k, v in sd.items() if k != key}, str(tmp_path / "missing.safetensors"))
    with pytest.raises(SdknobsError, match=f"1 missing key.*{key}"):
        load_model(tmp_path / "missing.safetensors", config=xl_dir)
    save_file({k: v for k, v in sd.items() if not k.startswith("conditioner.embedders.1.")}, str(tmp_path / "one.safetensors"))
    with pytest.raises(SdknobsError, match="both text encoders.*conditioner.embedders.1.model."):
        load_model(tmp_path / "one.safetensors", config=xl_dir)
    with pytest.raises(SdknobsError, match="not a standard SDXL base"):  # tiny widths, no config: named, not guessed
        load_model(xl_file)
    with pytest.raises(SdknobsError, match="multiple of 8"):
        generate(xl, PROMPT, width=36, height=32, steps=1, progress=False)
    with pytest.raises(SdknobsError, match="--crop-top-left takes two whole numbers >= 0"):
        generate(xl, PROMPT, crop_top_left=(-1, 0), steps=1, progress=False)
    with pytest.raises(SdknobsError, match="--original-size is SDXL's size conditioning; the custom model"):
        generate(tiny, PROMPT, original_size=(64, 64), steps=1, progress=False)


def test_folder_refusals_and_fp16_vae(xl, xl_dir, tmp_path):
    import copy
    import dataclasses
    import json
    import shutil

    from sdknobs.pipelines import decode, vae_dtype

    bad = shutil.copytree(xl_dir, tmp_path / "no-te2")
    shutil.rmtree(bad / "text_encoder_2")
    with pytest.raises(SdknobsError, match="missing component folder.*text_encoder_2.*SDXL"):
        load_model(bad)
    index = json.loads((bad / "model_index.json").read_text())
    (bad / "model_index.json").write_text(json.dumps({**index, "text_encoder": [None, None]}))
    with pytest.raises(SdknobsError, match="SDXL refiner"):
        load_model(bad)
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    m16 = dataclasses.replace(xl, vae=copy.deepcopy(xl.vae).half())  # SDXL's force_upcast VAE in fp16
    with vae_dtype(m16) as dt:
        assert dt == torch.float32 and m16.vae.dtype == torch.float32
    assert m16.vae.dtype == torch.float16
    got = decode(m16, lat)[0]  # decoded in fp32 for the call, then back to fp16
    assert m16.vae.dtype == torch.float16
    assert got.tobytes() == decode(dataclasses.replace(m16, vae=m16.vae.float()), lat)[0].tobytes()
    assert load_model(xl_dir, prediction_type="v_prediction").prediction_type == "v_prediction"


def test_cli_info_generate_and_png(xl_dir, tmp_path, capsys):
    from sdknobs.cli import main
    from sdknobs.prompt import png_settings

    assert main(["info", "--model", str(xl_dir)]) == 0
    out = capsys.readouterr().out
    assert "family:           sdxl" in out and "text encoder:     width 32" in out
    assert "text encoder 2:   width 64" in out and "pooled projection 32" in out
    assert main(["info", "--model", str(xl_dir), "--prediction-type", "v_prediction"]) == 0
    assert "prediction type:  v_prediction (--prediction-type)" in capsys.readouterr().out
    png = tmp_path / "a.png"
    assert main(["generate", "--model", str(xl_dir), "--prompt", "a red circle", "--steps", "2", "--original-size",
                 "64", "48", "--crop-top-left", "4", "2", "--out", str(png)]) == 0
    s = png_settings(png)
    assert (s["original_size"], s["crop_top_left"], s["target_size"]) == ([64, 48], [4, 2], [32, 32])
    assert "Sampler: Euler, CFG scale: 5.0" in png.read_bytes().decode("latin-1")  # the SDXL family's defaults
    bad = tmp_path / "b.png"
    assert main(["generate", "--model", str(xl_dir), "--prompt", "x", "--target-size", "0", "64", "--out", str(bad)]) == 2
    assert "--target-size takes two whole numbers >= 1" in capsys.readouterr().err and not bad.exists()
