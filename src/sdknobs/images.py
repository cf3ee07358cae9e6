"""Images and masks: loading with clear errors, pixel <-> tensor, masks on the latent grid,
feathered paste-back, outpaint canvases, grids, and PNGs that carry their parameters."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageOps, PngImagePlugin

from sdknobs.atomic import atomic_write
from sdknobs.errors import SdknobsError


MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS  # ~179 MP, PIL's own limit: larger files are refused before decoding


def _flatten(im: Image.Image, background: int) -> Image.Image:
    """Any PIL mode -> RGB with the image's meaning kept: EXIF orientation applied; 16-bit and 32-bit
    integer greyscale scaled to 8 bits (not clipped); float greyscale from [0, 1]; transparency
    (alpha, palette or greyscale with alpha) composited onto `background` (255 white, 0 black)."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            a = a * 255.0 if a.size and a.max() <= 1.0 else a
        elif a.size and (im.mode.startswith("I;16") or a.max() > 255):
            a = a / 257.0  # 65535 -> 255
        im = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("LA", "La", "PA", "RGBa") or (im.mode == "L" and "transparency" in im.info):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        bg = Image.new("RGBA", im.size, (background, background, background, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB")


def load_image(path: str | Path, what: str = "--image", mode: str = "RGB") -> Image.Image:
    """Read a picture for sampling or training, or raise SdknobsError naming `what` and the file.

    Masks (mode "L") put transparent pixels on black (= keep), pictures on white, as A1111 does."""
    p = Path(path)
    if not p.is_file():
        raise SdknobsError(f"{what} {str(path)!r}: no such file" + (" (it is a folder)" if p.is_dir() else ""))
    too_big = f"{what} {str(path)!r}: sdknobs reads pictures up to {MAX_PIXELS // 10**6} megapixels; make it smaller first"
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # our own size check, with the size named
    try:
        with Image.open(p) as im:
            if im.width * im.height > MAX_PIXELS:
                raise SdknobsError(f"{too_big} (it is {im.width}x{im.height})")
            im.load()
            return _flatten(im, 0 if mode == "L" else 255).convert(mode)
    except SdknobsError:
        raise
    except Exception as e:  # PIL raises several types for unreadable files
        raise SdknobsError(f"{what} {str(path)!r}: not a readable image ({e.__class__.__name__}: {e})") from e
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def check_multiple(name: str, v: int, multiple: int) -> None:
    """A pixel size must be a positive multiple of `multiple`; the error names the nearest valid sizes."""
    if v <= 0 or v % multiple:
        lo = v // multiple * multiple
        near = [n for n in (lo, lo + multiple) if n > 0]
        raise SdknobsError(f"{name} {v} is not a multiple of {multiple}; nearest valid: {' or '.join(map(str, near))}")


def check_size(width: int, height: int, multiple: int) -> None:
    check_multiple("--width", width, multiple)
    check_multiple("--height", height, multiple)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> [1, 3, H, W] in [-1, 1] (what the VAE encoder expects)."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1)[None] * 2.0 - 1.0


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL images (rounded as diffusers' image processor does)."""
    a = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    return [Image.fromarray((im * 255).round().astype(np.uint8)) for im in a]


def mask_array(mask: Image.Image) -> np.ndarray:
    """Grayscale mask -> float array in [0, 1]; white (1) = repaint."""
    return np.asarray(mask.convert("L"), dtype=np.float32) / 255.0


def latent_mask(mask: Image.Image, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Pixel mask -> binary [1, 1, h, w] mask on the latent grid (binarize at 0.5, nearest downsample)."""
    m = torch.from_numpy((mask_array(mask) >= 0.5).astype(np.float32))[None, None]
    return torch.nn.functional.interpolate(m, size=latent_hw)


MASK_BLUR_FRACTION = 1 / 128  # of the shorter side: A1111's 4 px at 512 px, 0.25 px (no halo) at 32 px
OVERLAP_FRACTION = 1 / 8  # of the image's size across an extended side


def default_mask_blur(width: int, height: int) -> float:
    """The --mask-blur default: `MASK_BLUR_FRACTION` of the picture's shorter side, in px (4 at 512x512, as
    A1111; 0.25 at the shapes model's 32x32, where a fixed 4 px would blend the old picture back in around a
    small mask)."""
    return min(width, height) * MASK_BLUR_FRACTION


def default_overlap(width: int, height: int, cell: int) -> tuple[int, int]:
    """The --overlap default, (across left/right sides, across top/bottom sides) in px: `OVERLAP_FRACTION` of the
    image's width resp. height, rounded to whole latent cells of `cell` px (the mask reaches the U-Net per
    cell), at least one cell: 4 px on a 32 px shapes picture, 64 px on a 512 px SD one."""
    return tuple(max(cell, round(n * OVERLAP_FRACTION / cell) * cell) for n in (width, height))


def feather(mask: Image.Image, radius: float) -> np.ndarray:
    """The paste-back weight: the mask blurred by a Gaussian of `radius` px (0 = hard edge)."""
    m = mask.convert("L")
    if radius > 0:
        m = m.filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(m, dtype=np.float32)[..., None] / 255.0


def paste_back(original: Image.Image, generated: Image.Image, mask: Image.Image, radius: float) -> Image.Image:
    """out = w * generated + (1 - w) * original, w = feathered mask: outside the mask the original's
    pixels come back exactly (no VAE round trip there)."""
    w = feather(mask, radius)
    a = np.asarray(original.convert("RGB"), dtype=np.float32)
    b = np.asarray(generated.convert("RGB"), dtype=np.float32)
    out = np.where(w > 0, w * b + (1 - w) * a, a)
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def mask_crop_box(mask: Image.Image, padding: int, aspect: float, multiple: int = 1) -> tuple[int, int, int, int] | None:
    """Bounding box of the mask's white area, padded, widened to `aspect` (w/h), inside the image."""
    bbox = mask.convert("L").point(lambda v: 255 if v >= 128 else 0).getbbox()
    if bbox is None:
        return None
    W, H = mask.size
    x0, y0, x1, y1 = bbox[0] - padding, bbox[1] - padding, bbox[2] + padding, bbox[3] + padding
    w, h = x1 - x0, y1 - y0
    if w / h < aspect:
        w2 = h * aspect
        x0, x1 = x0 - (w2 - w) / 2, x1 + (w2 - w) / 2
    else:
        h2 = w / aspect
        y0, y1 = y0 - (h2 - h) / 2, y1 + (h2 - h) / 2
    # Shift into the image, then clip.
    dx = max(0 - x0, 0) - max(x1 - W, 0)
    dy = max(0 - y0, 0) - max(y1 - H, 0)
    x0, x1, y0, y1 = x0 + dx, x1 + dx, y0 + dy, y1 + dy
    return (int(max(0, np.floor(x0))), int(max(0, np.floor(y0))), int(min(W, np.ceil(x1))), int(min(H, np.ceil(y1))))


# Outpaint fills, by A1111's names for its 'masked content' where they are the same thing. At --strength 1 (the
# default) the new area starts from pure latent noise whatever the fill (the sampler's own start, as diffusers'
# inpainting at full strength), so a fill only sets what the VAE encoder sees beside the seam, and it must be
# smooth: pixel noise there turns into streaks. At lower strength the new area starts from the fill.
FILLS = {
    "fill": "the mean colour of the image's outer 1/8 border (A1111's 'fill')",
    "edge": "the edge pixels repeated outwards",
    "latent-noise": "pure latent noise (A1111's 'latent noise'; needs --strength 1), over a 'fill' canvas for the VAE",
}
FILL_ALIASES = {"noise": "latent-noise", "latent noise": "latent-noise"}
SEAM_STRENGTH = 0.3  # outpaint's second pass over the seam band (docs/outpainting.md measures it)


def check_fill(fill: str) -> str:
    """The fill's canonical name (aliases: noise = latent noise = latent-noise), or SdknobsError naming the choices."""
    name = FILL_ALIASES.get(fill, fill)
    if name not in FILLS:
        raise SdknobsError(f"--fill {fill!r} is not known; choose {', '.join(FILLS)} (or noise = latent-noise)")
    return name


def border_colour(a: np.ndarray) -> np.ndarray:
    """Mean colour of an image's outer border (1/8 of the shorter side, at least 1 px), as float RGB."""
    b = max(1, min(a.shape[:2]) // 8)
    ring = np.concatenate([a[:b].reshape(-1, 3), a[-b:].reshape(-1, 3), a[b:-b, :b].reshape(-1, 3),
                           a[b:-b, -b:].reshape(-1, 3)])
    return ring.astype(np.float64).mean(0)


def canvas_size(size: tuple[int, int], left: int, right: int, top: int, bottom: int) -> tuple[int, int]:
    """The outpaint canvas's (width, height), or SdknobsError for a negative, empty or too large extension (checked
    before anything is allocated)."""
    for name, v in (("left", left), ("right", right), ("top", top), ("bottom", bottom)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise SdknobsError(f"outpaint: --{name} must be a whole number of px >= 0, got {v!r}")
    if left + right + top + bottom == 0:
        raise SdknobsError("outpaint: nothing to extend; give --left, --right, --top or --bottom")
    w, h = size[0] + left + right, size[1] + top + bottom
    if w * h > MAX_PIXELS:
        raise SdknobsError(f"outpaint: --left/--right/--top/--bottom make a {w}x{h} px canvas, past the "
                           f"{MAX_PIXELS // 10**6} megapixels sdknobs handles; extend by less")
    return w, h


def extend_canvas(image: Image.Image, left: int, right: int, top: int, bottom: int, overlap,
                  fill: str = "edge", seed: int = 0) -> tuple[Image.Image, Image.Image, Image.Image]:
    """A larger canvas with the image inside and the new border filled (`FILLS`), and two masks (white = repaint):
    the new area alone, and the seam band: `overlap` px either side of each extended edge (into the original and
    into the new area; a pair is (left/right, top/bottom)). `seed` is unused by the smooth fills (kept for callers).
    Outpainting repaints the new area at full strength with the whole original kept, then the band at a lower
    strength, so a shape cut by the old edge is continued, not drawn a second time."""
    fill = check_fill(fill)
    ox, oy = overlap if isinstance(overlap, (tuple, list)) else (overlap, overlap)
    canvas_size(image.size, left, right, top, bottom)
    W, H = image.size
    keep = (left + (ox if left else 0), top + (oy if top else 0),
            left + W - (ox if right else 0), top + H - (oy if bottom else 0))
    if min(ox, oy) < 0 or keep[2] <= keep[0] or keep[3] <= keep[1]:
        raise SdknobsError(f"outpaint: --overlap {overlap if ox != oy else ox} leaves nothing of the {W}x{H} image to keep; it must be "
                           f">= 0 and less than the image's size (half of it where both opposite sides are extended)")
    a = np.asarray(image.convert("RGB"))
    if fill == "edge":
        canvas = np.pad(a, ((top, bottom), (left, right), (0, 0)), mode="edge")
    else:  # fill, and the canvas under latent noise: one smooth colour, nothing for the VAE to turn into streaks
        colour = border_colour(a).round().astype(np.uint8)
        canvas = np.broadcast_to(colour, (H + top + bottom, W + left + right, 3)).copy()
        canvas[top : top + H, left : left + W] = a
    size = (canvas.shape[1], canvas.shape[0])
    new = Image.new("L", size, 255)
    ImageDraw.Draw(new).rectangle([left, top, left + W - 1, top + H - 1], fill=0)
    band = Image.new("L", size, 0)
    d = ImageDraw.Draw(band)
    if left and ox:
        d.rectangle([max(0, left - ox), 0, left + ox - 1, size[1] - 1], fill=255)
    if right and ox:
        d.rectangle([left + W - ox, 0, min(size[0], left + W + ox) - 1, size[1] - 1], fill=255)
    if top and oy:
        d.rectangle([0, max(0, top - oy), size[0] - 1, top + oy - 1], fill=255)
    if bottom and oy:
        d.rectangle([0, top + H - oy, size[0] - 1, min(size[1], top + H + oy) - 1], fill=255)
    return Image.fromarray(canvas), new, band


def a1111_parameters(prompt: str, negative_prompt: str, **fields) -> str:
    """A1111's `parameters` text: prompt, 'Negative prompt: ...', then 'Key: value, ...'."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | Path, parameters: str | None = None) -> Path:
    """Write a PNG atomically (temporary name, then rename), with a `parameters` text chunk."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def grid(cells: list[list[Image.Image]], labels: list[list[str]] | None = None, scale: int = 1,
         col_titles: list[str] | None = None, row_titles: list[str] | None = None) -> Image.Image:
    """Rows x columns of images (upscaled `scale`x with nearest neighbour), optional captions."""
    rows, cols = len(cells), max(len(r) for r in cells)
    w, h = cells[0][0].size
    w, h = w * scale, h * scale
    lab_h = 12 * (max(len(l.split("\n")) for r in labels for l in r) if labels else 0)
    top = 14 if col_titles else 0
    left = 8 * max((len(t) for t in row_titles), default=0) if row_titles else 0
    out = Image.new("RGB", (left + cols * (w + 4) + 4, top + rows * (h + lab_h + 4) + 4), "white")
    d = ImageDraw.Draw(out)
    for c, t in enumerate(col_titles or []):
        d.text((left + 4 + c * (w + 4), 1), t, fill="black")
    for r, row in enumerate(cells):
        y = top + 4 + r * (h + lab_h + 4)
        if row_titles:
            d.text((2, y + h // 2 - 5), row_titles[r], fill="black")
        for c, im in enumerate(row):
            x = left + 4 + c * (w + 4)
            out.paste(im.resize((w, h), Image.NEAREST), (x, y))
            if labels:
                d.multiline_text((x, y + h + 1), labels[r][c], fill="black", spacing=1)
    return out
