"""`make demo`: the main job on the embedded model, pictures in out/.

  python -m sdknobs.demo [--out out] [--model shapes]

Writes a prompt grid, a strength sweep, an inpainting before/after and an outpainting example."""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from sdknobs import SdknobsError, load_model
from sdknobs.images import default_mask_blur, grid, save_png
from sdknobs.pipelines import generate, inpaint, outpaint, sweep_strength

log = logging.getLogger("sdknobs.demo")

PROMPTS = [
    "a large red circle in the centre, white background",
    "a small blue square on the left, black background",
    "a large yellow triangle at the top, gray background",
    "a green circle on the left and a purple square on the right, white background",
]
SCALE = 4


def _framed(g: Image.Image, n: int, w: int, h: int) -> Image.Image:
    """Grey 1 px frames around the n cells of a one-row `images.grid` (cells w x h after scaling), so a white mask or
    a white background shows where its cell ends."""
    d = ImageDraw.Draw(g)
    for c in range(n):
        x = 4 + c * (w + 4)
        d.rectangle([x - 1, 3, x + w, 4 + h], outline=(160, 160, 160))
    return g


def _label(image: Image.Image, text: str) -> Image.Image:
    out = Image.new("RGB", (image.width, image.height + 14), "white")
    out.paste(image, (0, 14))
    ImageDraw.Draw(out).text((2, 1), text, fill="black")
    return out


FILES = ("prompt_grid.png", "sweep_source.png", "strength_sweep.png", "inpaint_before_after.png", "outpaint.png")


def run(out: Path, model_name: str = "shapes", steps: int = 30, guidance: float = 3.0,
        overwrite: bool = False) -> list[Path]:
    from sdknobs.atomic import check_out_path

    for name in FILES:  # before any work: never replace a file unless asked
        check_out_path(out / name, "--out", overwrite)
    try:
        model = load_model(model_name)
    except SdknobsError as e:
        if model_name != "shapes":
            raise
        from sdknobs.tiny import write_tiny_model

        print(f"note: {e}; the demo runs on a tiny RANDOM model instead, so the pictures are noise")
        model = load_model(write_tiny_model(Path(tempfile.mkdtemp()) / "tiny"))
    kw = dict(steps=steps, guidance=guidance, progress=False)
    bar = tqdm(total=4, desc="demo", unit="picture")
    written = []

    # 1. Prompt grid: prompts down, seeds across.
    rows = [[generate(model, p, seed=s, **kw).images[0] for s in range(4)] for p in PROMPTS]
    g = grid(rows, scale=SCALE, col_titles=[f"seed {s}" for s in range(4)])
    cap = Image.new("RGB", (g.width, g.height + 14 * len(PROMPTS)), "white")
    cap.paste(g, (0, 0))
    d = ImageDraw.Draw(cap)
    for i, p in enumerate(PROMPTS):
        d.text((4, g.height + 14 * i), f"row {i + 1}: {p}", fill="black")
    written.append(save_png(cap, out / "prompt_grid.png", "\n".join(PROMPTS)))
    bar.update()

    # 2. Strength sweep: img2img from a picture of one prompt towards another.
    source = generate(model, PROMPTS[0], seed=0, **kw).images[0]
    save_png(source, out / "sweep_source.png")
    sweep, infos = sweep_strength(model, source, "a large blue square in the centre, white background",
                                  strengths=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0), seeds=(0, 1), scale=SCALE, **kw)
    written.append(save_png(sweep, out / "strength_sweep.png"))
    bar.update()

    # 3. Inpainting: repaint the right half of a two-shape scene.
    scene = generate(model, PROMPTS[3], seed=1, **kw).images[0]
    w, h = scene.size
    mask = Image.new("L", scene.size, 0)
    ImageDraw.Draw(mask).rectangle([w // 2, 0, w - 1, h - 1], fill=255)
    r = inpaint(model, scene, mask, "a green circle on the left and a yellow triangle on the right, white background",
                seed=0, **kw)
    cells = [[scene, mask.convert("RGB"), r.extra["raw"][0], r.images[0]]]
    g = _framed(grid(cells, scale=SCALE), 4, w * SCALE, h * SCALE)
    written.append(save_png(_label(g, f"image | mask (white = repaint) | inpainted (raw) | pasted back "
                                      f"(mask blur {default_mask_blur(w, h):g} px)"),
                            out / "inpaint_before_after.png"))
    bar.update()

    # 4. Outpainting: extend a picture to the right and left (new area first, then the seam band blended).
    small = generate(model, PROMPTS[1], seed=2, **kw).images[0]
    side = model.size_multiple * max(1, small.width // (2 * model.size_multiple))
    o = outpaint(model, small, PROMPTS[1].replace("on the left", "in the centre"), left=side, right=side, seed=0, **kw)
    pad = Image.new("RGB", o.images[0].size, "white")
    pad.paste(small, (side, 0))
    cells = [pad, o.extra["canvas"], o.extra["first_pass"][0], o.images[0]]
    g = _framed(grid([cells], scale=SCALE), 4, pad.width * SCALE, pad.height * SCALE)
    written.append(save_png(_label(g, "original | extended canvas | new area painted | seam blended = outpainted"),
                            out / "outpaint.png"))
    bar.update()
    bar.close()
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="out")
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--overwrite", action="store_true", help="replace the pictures of an earlier demo run")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from sdknobs.cli import _quiet_libraries

    _quiet_libraries()
    try:
        for p in run(Path(a.out), a.model, a.steps, overwrite=a.overwrite):
            print(f"wrote {p}")
    except SdknobsError as e:
        print(f"sdknobs demo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
