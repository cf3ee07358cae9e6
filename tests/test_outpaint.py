"""Outpainting (issue 12): fills, the two passes and their masks, the seam/duplication/streak figures of
`sdknobs bench outpaint` against the outpaint of before (on the shipped shapes model), and bad inputs."""
from __future__ import annotations

import shlex

import numpy as np
import pytest
from PIL import Image

from sdknobs import images as im
from sdknobs.cli import main
from sdknobs.errors import SdknobsError
from sdknobs.pipelines import outpaint

P = "a red circle"
KW = dict(steps=2, guidance=3.0, progress=False)


def arr(x):
    return np.asarray(x, dtype=np.int16)


@pytest.mark.parametrize("fill", ["fill", "latent-noise", "noise", "latent noise"])
def test_smooth_fills_are_the_border_mean_colour(photo, fill):
    canvas, new, band = im.extend_canvas(photo, 8, 16, 0, 8, (4, 4), fill)
    c, src = arr(canvas), arr(photo)
    assert canvas.size == (56, 40)
    assert np.array_equal(c[0:32, 8:40], src)  # the original untouched
    a = np.asarray(photo, np.float64)
    ring = np.concatenate([a[:4].reshape(-1, 3), a[-4:].reshape(-1, 3), a[4:-4, :4].reshape(-1, 3), a[4:-4, -4:].reshape(-1, 3)])
    colour = ring.mean(0).round()  # 1/8 of 32 px = 4 px ring, computed independently of images.border_colour
    assert (c[:, :8] == colour).all() and (c[:, 40:] == colour).all() and (c[32:] == colour).all()
    n = np.asarray(new) > 127
    assert n[:, :8].all() and n[:, 40:].all() and n[32:].all() and not n[:32, 8:40].any()
    b = np.asarray(band) > 127  # 4 px either side of each extended edge, nothing at the unextended top
    assert b[:, 4:12].all() and b[:, 36:44].all() and b[28:36].all()
    assert not b[:28, 12:36].any() and not b[:28, :4].any() and not b[:28, 44:].any() and not b[36:, 12:36].any()


def test_edge_fill_repeats_the_edge_and_unknown_fills_name_the_choices(photo):
    canvas, _, _ = im.extend_canvas(photo, 8, 0, 4, 0, 4, "edge")
    c, src = arr(canvas), arr(photo)
    assert np.array_equal(c[4:, :8], np.repeat(src[:, :1], 8, 1)) and np.array_equal(c[:4, 8:], np.repeat(src[:1], 4, 0))
    with pytest.raises(SdknobsError, match="--fill 'mirror' is not known; choose fill, edge, latent-noise"):
        im.extend_canvas(photo, 8, 0, 0, 0, 4, "mirror")
    for bad in ({"left": -8}, {"left": 10**9}, {"left": 0}, {"left": 2.5}):
        with pytest.raises(SdknobsError, match="outpaint: "):
            im.canvas_size(photo.size, bad["left"], 0, 0, 0)


def test_two_passes_keep_the_rest_exactly_and_record_their_settings(tiny, photo):
    r = outpaint(tiny, photo, P, left=8, right=8, overlap=2, mask_blur=0, seed=3, seam_strength=0.5, **KW)  # 1 of 2 steps
    out, src = arr(r.images[0]), arr(photo)
    assert out.shape == (32, 48, 3)
    assert np.array_equal(out[:, 10:38], src[:, 2:30])  # outside new area + band: the original's own pixels
    first = arr(r.extra["first_pass"][0])
    assert np.array_equal(first[:, 8:40], src)  # pass 1 keeps the whole original
    assert not np.array_equal(out[:, 6:10], first[:, 6:10])  # pass 2 repainted the band
    assert np.array_equal(out[:, :6], first[:, :6]) and np.array_equal(out[:, 42:], first[:, 42:])
    assert "Outpaint fill: edge, Overlap: 2 2, Seam strength: 0.5" in r.parameters[0] and "Seed: 3" in r.parameters[0]
    skip = outpaint(tiny, photo, P, left=8, right=8, overlap=2, mask_blur=0, seed=3, seam_strength=0, **KW)
    assert np.array_equal(arr(skip.images[0]), first)  # 0 skips the second pass
    with pytest.raises(SdknobsError, match="latent-noise .* --strength 1"):
        outpaint(tiny, photo, P, left=8, fill="noise", strength=0.5, **KW)
    with pytest.raises(SdknobsError, match="--seam-strength"):
        outpaint(tiny, photo, P, left=8, seam_strength=1.5, **KW)


@pytest.fixture(scope="module")
def shapes():
    from sdknobs import load_model

    return load_model("shapes")


def test_seam_and_streaks_improve_over_the_old_outpaint(shapes):
    """On the shipped model, two cases (not among the bench's or the tuning prompts): the new default's seam figure
    is no worse than the old edge fill's on each (within 0.5 of 255) and better in sum (measured: 7.3 vs 23.8 and 0.13
    vs 0.12 at 10 steps), and the old pixel-noise fill leaves streaks that latent noise does not
    (black backgrounds: where pixel noise showed most)."""
    from sdknobs.pipelines import generate
    from sdknobs.shapes import outpaint_bench as ob
    from sdknobs.shapes.analyze import analyze

    kw = dict(steps=10, guidance=3.0, progress=False)
    seams = []  # (new, old)
    for prompt, seed, ext in (("a large purple triangle on the right, black background", 0, (16, 16, 0, 0)),
                              ("a small yellow circle at the top, black background", 1, (0, 0, 16, 16))):
        source = generate(shapes, prompt, seed=seed, **kw).images[0]
        colour = analyze(source).shapes[0].colour
        wide, ov = ob.without_position(prompt), im.default_overlap(32, 32, shapes.vae_scale_factor)
        sides = dict(left=ext[0], right=ext[1], top=ext[2], bottom=ext[3])
        old = ob._before(shapes, source, wide, *ext, "edge", seed, **kw)
        new = outpaint(shapes, source, wide, seed=seed, **sides, **kw).images[0]
        seams.append((ob.seam(new, source, ext, ov), ob.seam(old, source, ext, ov)))
        noisy = ob._before(shapes, source, wide, *ext, "noise", seed, **kw)
        latent = outpaint(shapes, source, wide, fill="noise", seed=seed, **sides, **kw).images[0]
        assert ob.streaky(noisy, source, ext, colour), (prompt, ob.new_area_hf(noisy, source.size, ext, colour))
        assert not ob.streaky(latent, source, ext, colour), (prompt, ob.new_area_hf(latent, source.size, ext, colour))
    assert all(n <= o + 0.5 for n, o in seams) and sum(n for n, _ in seams) < sum(o for _, o in seams), seams


@pytest.mark.parametrize("flags, words", [
    ("--left -16", ["--left", ">= 0"]),
    ("--left 1000000000", ["--left", "megapixels"]),
    ("--right 16 --fill mirror", ["--fill", "mirror", "latent-noise"]),
    ("--right 16 --seam-strength 2", ["--seam-strength", "[0, 1]"]),
    ("--right 16 --fill latent-noise --strength 0.5", ["latent-noise", "--strength 1"]),
])
def test_bad_outpaint_inputs_exit_2_with_one_line(tmp_path, tiny_dir, photo, capsys, monkeypatch, flags, words):
    monkeypatch.chdir(tmp_path)
    photo.save("in.png")
    argv = shlex.split(f'outpaint --model {tiny_dir} --image in.png --prompt "{P}" --steps 2 --out o.png {flags}')
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert all(w in err[0] for w in words), err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


def test_duplicate_reading_counts_separate_and_touching_copies():
    """`bench outpaint`'s duplicate figure on rendered pictures: one square widened with background is no duplicate;
    a second copy apart, or drawn against the first (the seam doubling the analyzers merge), is."""
    from sdknobs.shapes import outpaint_bench as ob
    from sdknobs.shapes import world
    from sdknobs.shapes.analyze import analyze

    src = world.render(world.Scene("black", (world.Shape("square", "blue", "small", "centre"),)))
    shape = analyze(src).shapes[0]
    a = np.asarray(src)
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, 16:48] = a
    assert not ob.duplicated(Image.fromarray(wide), shape)
    x0, x1 = shape.bbox[0], shape.bbox[2] + 1
    apart, touching = wide.copy(), wide.copy()
    apart[:, 52 - (x1 - x0) // 2 : 52 - (x1 - x0) // 2 + (x1 - x0)] = a[:, x0:x1]
    touching[:, 16 + x1 : 16 + x1 + (x1 - x0)] = a[:, x0:x1]
    assert ob.duplicated(Image.fromarray(apart), shape) and ob.duplicated(Image.fromarray(touching), shape)
