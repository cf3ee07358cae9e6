"""Exact boundary cases of the one denoising loop."""
import numpy as np
import pytest
import torch
from PIL import Image

from sdknobs.loop import start_index
from sdknobs.pipelines import _run, generate, img2img, inpaint, outpaint, strength_table

KW = dict(steps=6, guidance=3.0, seed=11, progress=False)
P = "a blue square at the top, black background"


def arr(x):
    return np.asarray(x, dtype=np.int16)


@pytest.mark.parametrize("steps,strength,expected", [(30, 0.5, 15), (30, 1.0, 0), (30, 0.0, 30), (10, 0.75, 3), (4, 0.1, 4)])
def test_start_index_follows_diffusers_rule(steps, strength, expected):
    # init = int(steps * strength); t_start = steps - init
    assert start_index(steps, strength) == expected


def test_strength_table_reports_timestep_and_alpha_bar():
    t = strength_table(30, [0.5, 1.0])
    assert t[0].steps_run == 15 and t[1].index == 0
    assert t[0].alpha_bar > t[1].alpha_bar  # less noise at a later start
    from diffusers import DDIMScheduler
    from sdknobs.tiny import SD_SCHEDULER_CONFIG

    s = DDIMScheduler.from_config(SD_SCHEDULER_CONFIG)
    s.set_timesteps(30)
    assert t[0].timestep == float(s.timesteps[15])
    assert t[0].alpha_bar == pytest.approx(float(s.alphas_cumprod[int(s.timesteps[15])]))


def test_strength_zero_returns_input_unchanged(tiny, photo):
    r = img2img(tiny, photo, P, strength=0.0, **KW)
    assert np.array_equal(arr(r.images[0]), arr(photo))
    assert r.start.steps_run == 0


@pytest.mark.parametrize("scheduler", ["ddim", "euler-a"])
def test_strength_one_equals_txt2img_bit_for_bit(tiny, photo, scheduler):
    a = generate(tiny, P, scheduler=scheduler, **KW)
    b = img2img(tiny, photo, P, strength=1.0, scheduler=scheduler, **KW)
    assert np.array_equal(arr(a.images[0]), arr(b.images[0]))


def test_empty_mask_returns_input_unchanged(tiny, photo):
    r = inpaint(tiny, photo, Image.new("L", (32, 32), 0), P, **KW)
    assert np.array_equal(arr(r.images[0]), arr(photo))


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_full_mask_equals_img2img(tiny, photo, strength):
    full = Image.new("L", (32, 32), 255)
    kw = dict(steps=6, guidance=3.0, scheduler="ddim", seed=4, width=32, height=32, batch=1, progress=False)
    a, _ = _run(tiny, P, "", image=photo, strength=strength, mask=full, **kw)
    b, _ = _run(tiny, P, "", image=photo, strength=strength, **kw)
    assert torch.equal(a, b)
    ra = inpaint(tiny, photo, full, P, strength=strength, mask_blur=0, **KW)
    rb = img2img(tiny, photo, P, strength=strength, **KW)
    assert np.array_equal(arr(ra.images[0]), arr(rb.images[0]))


@pytest.mark.parametrize("blur", [0, 4])
def test_paste_back_keeps_original_outside_the_mask(tiny, photo, half_mask, blur):
    r = inpaint(tiny, photo, half_mask, P, mask_blur=blur, **KW)
    out, src = arr(r.images[0]), arr(photo)
    margin = 0 if blur == 0 else 3 * blur  # Gaussian tail
    assert np.array_equal(out[:, : 16 - margin], src[:, : 16 - margin])
    assert not np.array_equal(out[:, 16 + margin :], src[:, 16 + margin :])
    if blur == 0:
        assert np.array_equal(out[:, 16:], arr(r.extra["raw"][0])[:, 16:])


def test_only_masked_crop_pastes_into_the_box(tiny, photo):
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (2, 2, 10, 10))
    r = inpaint(tiny, photo, mask, P, only_masked=True, padding=2, mask_blur=0, **KW)
    out, src = arr(r.images[0]), arr(photo)
    assert r.extra["box"] == (0, 0, 12, 12)
    assert np.array_equal(out[12:], src[12:]) and np.array_equal(out[:, 12:], src[:, 12:])
    assert not np.array_equal(out[2:10, 2:10], src[2:10, 2:10])


def test_outpaint_extends_canvas_and_keeps_the_middle(tiny, photo):
    r = outpaint(tiny, photo, P, left=8, right=8, overlap=2, mask_blur=0, **KW)
    out = arr(r.images[0])
    assert out.shape == (32, 48, 3)
    assert np.array_equal(out[:, 10:38], arr(photo)[:, 2:30])  # original minus the overlap
    m = np.asarray(r.extra["mask"])
    assert m[:, :10].min() == 255 and m[:, 38:].min() == 255 and m[:, 10:38].max() == 0


def test_seed_reproducible_and_batch_shapes(tiny):
    a = generate(tiny, P, batch=2, **KW)
    b = generate(tiny, P, batch=2, **KW)
    assert len(a.images) == 2 and a.images[0].size == (32, 32)
    assert all(np.array_equal(arr(x), arr(y)) for x, y in zip(a.images, b.images))
    assert "Batch pos: 1" in a.parameters[1] and "Seed: 11" in a.parameters[0]
