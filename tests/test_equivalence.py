"""Our loop against diffusers' pipelines on the same tiny weights, seed and noise.

Tolerance: latents agree to 1e-4 absolute (float32 on CPU; we run the same operations in the same
order, so in practice they agree to ~1e-6)."""
import numpy as np
import pytest
import torch

from sdknobs.loop import make_scheduler
from sdknobs.pipelines import _run, generate, img2img, inpaint

ATOL = 1e-4
PROMPT = "a small red circle on the left, white background"
NEG = "blurry"


def _ref_scheduler(pipe, name, config):
    pipe.scheduler = make_scheduler(name, config)
    return pipe


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_txt2img_matches_diffusers(tiny, pipes, scheduler):
    kw = dict(steps=5, guidance=4.0, scheduler=scheduler, seed=3, width=32, height=32, batch=2)
    ours, _ = _run(tiny, PROMPT, NEG, progress=False, **kw)
    ref = _ref_scheduler(pipes["txt2img"], scheduler, tiny.scheduler_config)(
        PROMPT, negative_prompt=NEG, num_inference_steps=5, guidance_scale=4.0, height=32, width=32,
        num_images_per_prompt=2, generator=[torch.Generator().manual_seed(3 + i) for i in range(2)],  # image i: seed + i
        output_type="latent").images
    assert ours.shape == ref.shape == (2, 4, 8, 8)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
@pytest.mark.parametrize("strength", [0.3, 0.6])
def test_img2img_matches_diffusers(tiny, pipes, photo, scheduler, strength):
    kw = dict(steps=10, guidance=3.0, scheduler=scheduler, seed=5, width=32, height=32, batch=1)
    ours, info = _run(tiny, PROMPT, "", image=photo, strength=strength, progress=False, **kw)
    ref = _ref_scheduler(pipes["img2img"], scheduler, tiny.scheduler_config)(
        PROMPT, image=photo, strength=strength, num_inference_steps=10, guidance_scale=3.0,
        generator=torch.Generator().manual_seed(5), output_type="latent").images
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    assert info.steps_run == int(10 * strength)


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
@pytest.mark.parametrize("strength", [0.7, 1.0])
def test_inpaint_matches_diffusers_before_paste_back(tiny, pipes, photo, half_mask, scheduler, strength):
    kw = dict(steps=6, guidance=3.0, scheduler=scheduler, seed=7, width=32, height=32, batch=1)
    ours, _ = _run(tiny, PROMPT, "", image=photo, mask=half_mask, strength=strength, progress=False, **kw)
    ref = _ref_scheduler(pipes["inpaint"], scheduler, tiny.scheduler_config)(
        PROMPT, image=photo, mask_image=half_mask, strength=strength, num_inference_steps=6, guidance_scale=3.0,
        height=32, width=32, generator=torch.Generator().manual_seed(7), output_type="latent").images
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def test_decoded_images_match_diffusers(tiny, pipes, photo, half_mask):
    """The whole path to pixels, before paste-back: within one 8-bit level."""
    r = inpaint(tiny, photo, half_mask, PROMPT, strength=0.8, steps=5, guidance=3.0, seed=2, progress=False)
    ref = _ref_scheduler(pipes["inpaint"], "ddim", tiny.scheduler_config)(
        PROMPT, image=photo, mask_image=half_mask, strength=0.8, num_inference_steps=5, guidance_scale=3.0,
        height=32, width=32, generator=torch.Generator().manual_seed(2)).images[0]
    diff = np.abs(np.asarray(r.extra["raw"][0], dtype=int) - np.asarray(ref, dtype=int))
    assert diff.max() <= 1
    g = generate(tiny, PROMPT, steps=4, guidance=2.0, seed=1, progress=False).images[0]
    gref = _ref_scheduler(pipes["txt2img"], "ddim", tiny.scheduler_config)(
        PROMPT, num_inference_steps=4, guidance_scale=2.0, height=32, width=32,
        generator=torch.Generator().manual_seed(1)).images[0]
    assert np.abs(np.asarray(g, dtype=int) - np.asarray(gref, dtype=int)).max() <= 1
