"""`sdknobs bench outpaint`: seams, duplicated shapes and noise streaks of outpainting, before and after issue 12.

Cases: every prompt of `PROMPTS` x `--seeds` x sides (left+right, top+bottom; 16 px each on the shapes model's
32 px pictures). The source picture is generated from the prompt (which places one shape); the outpaint prompt is
the same without its position words (the shape's place in the wider picture is none of the world's anchors). A
case whose source the analyzers do not read as exactly one shape is left out and counted.

Methods, run on the same sources and seeds:
- `before-edge`, `before-noise`: the outpaint of before issue 12 (one inpainting pass over the new area plus
  `overlap` px of the original at full strength; the canvas filled by repeating the edge pixels, or with uniform
  pixel noise), kept here only to measure it (`_before`);
- `fill`, `edge`, `latent-noise`: `pipelines.outpaint` with that fill (new area first with the original kept
  whole, then the seam band at `--seam-strength`);
- `fill+background-prompt`: `fill` with a prompt of the background alone ('black background'), what the new area
  should show.

Figures per method (mean over cases):
- seam (background colour continuity): mean |colour difference| (0-255, channels averaged) between the 2 px strips
  either side of a join, per row/column where the source is background all through the joined strips (a shape
  crossing the seam is left out: its own edge is not a seam); each extended edge has two joins (the old edge, and
  the line `overlap` px inside it where repainted pixels meet kept ones), and the worse counts. `no seam` is the same
  figure on the source pictures at lines 8 px inside their edges, where nothing was joined;
- duplicated: the share of pictures the analyzers read (padded to a square with the border colour, as they read
  square pictures) with two or more shapes of the source shape's colour, or with one of more than `GROWN` x the
  source shape's area (a copy drawn against it at the seam merges with it; `duplicated`);
- streaks: the share of pictures whose new area, shapes of the source's colour left out, has more than `STREAK_RATIO` times the
  high-frequency energy (mean squared difference from a 1 px Gaussian blur) of the source picture's background, plus
  `STREAK_FLOOR` (`streaky`)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm.auto import tqdm

# Not the prompts the fix was tuned on ("a small red circle on the left, white background",
# "a large green triangle at the top, gray background").
PROMPTS = (
    "a small blue square on the left, black background",
    "a large yellow triangle on the right, white background",
    "a small purple circle at the top, gray background",
    "a large orange square at the bottom, black background",
    "a small green circle in the centre, white background",
)
SIDES = {"left+right": (16, 16, 0, 0), "top+bottom": (0, 0, 16, 16)}
METHODS = ("before-edge", "before-noise", "fill", "edge", "latent-noise", "fill+background-prompt")
STREAK_RATIO = 2.0
STREAK_FLOOR = 1.0  # 0-255 squared units
_POSITION = re.compile(r" (on the left|on the right|at the top|at the bottom|in the centre)")


def without_position(prompt: str) -> str:
    return _POSITION.sub("", prompt)


def background_only(prompt: str) -> str:
    """'a small blue square, black background' -> 'black background': what the new area should show."""
    return prompt.rsplit(", ", 1)[-1]


def _before(model, image, prompt, left, right, top, bottom, fill, seed, **kw):
    """The outpaint of before issue 12, for the before rows: canvas filled by edge pixels or uniform pixel noise
    (numpy's generator on the seed), one inpainting pass over the new area + `overlap` px of the original."""
    from sdknobs import images as im
    from sdknobs.pipelines import inpaint

    W, H = image.size
    ox, oy = im.default_overlap(W, H, model.vae_scale_factor)
    a = np.asarray(image.convert("RGB"))
    if fill == "edge":
        canvas = np.pad(a, ((top, bottom), (left, right), (0, 0)), mode="edge")
    else:
        canvas = np.random.default_rng(seed).integers(0, 256, size=(H + top + bottom, W + left + right, 3), dtype=np.uint8)
        canvas[top : top + H, left : left + W] = a
    keep = (left + (ox if left else 0), top + (oy if top else 0), left + W - (ox if right else 0), top + H - (oy if bottom else 0))
    mask = Image.new("L", (canvas.shape[1], canvas.shape[0]), 255)
    ImageDraw.Draw(mask).rectangle([keep[0], keep[1], keep[2] - 1, keep[3] - 1], fill=0)
    return inpaint(model, Image.fromarray(canvas), mask, prompt, seed=seed, **kw).images[0]


BG_TOLERANCE = 48  # max channel distance (0-255) from the palette background for a source pixel to count as background


def background(source: Image.Image) -> np.ndarray:
    """[H, W] bool: the source's pixels within `BG_TOLERANCE` of the palette background the analyzers read."""
    from sdknobs.shapes.analyze import analyze
    from sdknobs.shapes.world import BACKGROUNDS

    a = np.asarray(source.convert("RGB"), np.float32)
    return np.abs(a - np.array(BACKGROUNDS[analyze(source).background], np.float32)).max(-1) <= BG_TOLERANCE


def _strip_diff(a: np.ndarray, axis: int, at: int, lines: np.ndarray) -> float | None:
    """Mean |difference| of the 2 px strips before and after line `at` (columns if axis 1, rows if axis 0), over the
    rows (columns) `lines`; None if there are none."""
    if not len(lines):
        return None
    if axis == 1:
        x, y = a[lines, at - 2 : at].mean(1), a[lines, at : at + 2].mean(1)
    else:
        x, y = a[at - 2 : at, lines].mean(0), a[at : at + 2, lines].mean(0)
    return float(np.abs(x - y).mean())


def seam(picture: Image.Image, source: Image.Image, sides: tuple[int, int, int, int], overlap: tuple[int, int]) -> float | None:
    """The seam figure of one outpainted picture (module docstring), over the rows (columns) where the source is
    background all through the joined strips: mean over extended edges of the worse join; None if no such line."""
    a = np.asarray(picture.convert("RGB"), np.float32)
    bg = background(source)
    (W, H), (left, right, top, bottom), (ox, oy) = source.size, sides, overlap
    per_edge = []
    for n, axis, edge, inward, src_band in ((left, 1, left, ox, bg[:, : ox + 2]), (right, 1, left + W, -ox, bg[:, W - ox - 2 :]),
                                            (top, 0, top, oy, bg[: oy + 2].T), (bottom, 0, top + H, -oy, bg[H - oy - 2 :].T)):
        if not n:
            continue
        lines = np.nonzero(src_band.all(1))[0] + (top if axis == 1 else left)
        d = [_strip_diff(a, axis, at, lines) for at in (edge, edge + inward)]
        if d[0] is not None:
            per_edge.append(max(d))
    return float(np.mean(per_edge)) if per_edge else None


def no_seam(source: Image.Image) -> float | None:
    """The seam figure where nothing was joined: lines 8 px (1/4) inside each edge of a source picture, over the
    rows (columns) where the source is background through both strips."""
    a = np.asarray(source.convert("RGB"), np.float32)
    bg = background(source)
    H, W = a.shape[:2]
    d = max(2, min(W, H) // 4)
    got = [_strip_diff(a, 1, x, np.nonzero(bg[:, x - 2 : x + 2].all(1))[0]) for x in (d, W - d)]
    got += [_strip_diff(a, 0, y, np.nonzero(bg[y - 2 : y + 2].all(0))[0]) for y in (d, H - d)]
    got = [g for g in got if g is not None]
    return float(np.mean(got)) if got else None


def _hf_map(picture: Image.Image) -> np.ndarray:
    """[H, W] squared difference from a 1 px Gaussian blur, channels averaged (0-255 units)."""
    a = np.asarray(picture.convert("RGB"), np.float32)
    return ((a - np.asarray(picture.convert("RGB").filter(ImageFilter.GaussianBlur(1)), np.float32)) ** 2).mean(-1)


def _erode(m: np.ndarray) -> np.ndarray:
    p = np.pad(m, 1, constant_values=False)
    return np.logical_and.reduce([p[1 + dy : 1 + dy + m.shape[0], 1 + dx : 1 + dx + m.shape[1]]
                                  for dy in (-1, 0, 1) for dx in (-1, 0, 1)])


def background_hf(source: Image.Image) -> float:
    """The texture of a generated background: high-frequency energy over the source's background pixels whose
    3x3 neighbourhood is background too (no shape edge within 1 px)."""
    bg = _erode(background(source))
    return float(_hf_map(source)[bg].mean()) if bg.any() else 0.0


def new_area_hf(picture: Image.Image, size, sides, colour: str | None = None) -> float:
    """High-frequency energy of the new area, leaving out the shapes of `colour` the analyzers read there (box + 2 px):
    the source shape's continuation or copy is no streak (a copy counts as a duplicate instead); blobs of other colours
    that noise leaves stay in."""
    from sdknobs.shapes.analyze import analyze

    e = _hf_map(picture)
    (W, H), (left, right, top, bottom) = size, sides
    use = np.ones(e.shape, bool)
    use[top : top + H, left : left + W] = False
    n = max(picture.size)
    dx, dy = (n - picture.width) // 2, (n - picture.height) // 2
    for sh in analyze(_padded(picture)).shapes:
        if sh.colour != colour:
            continue
        x0, y0, x1, y1 = sh.bbox
        use[max(0, y0 - dy - 2) : max(0, y1 - dy + 3), max(0, x0 - dx - 2) : max(0, x1 - dx + 3)] = False
    return float(e[use].mean()) if use.any() else 0.0


def streaky(picture: Image.Image, source: Image.Image, sides, colour: str) -> bool:
    """Noise streaks: the new area, shapes left out, has more than `STREAK_RATIO` x the background texture of the
    source picture, plus `STREAK_FLOOR` (generated backgrounds are often perfectly flat)."""
    return new_area_hf(picture, source.size, sides, colour) > STREAK_RATIO * background_hf(source) + STREAK_FLOOR


def _padded(picture: Image.Image, n: int | None = None) -> Image.Image:
    """The picture centred on an n x n square (default: its longer side) of its median border colour."""
    a = np.asarray(picture.convert("RGB"))
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    n = n or max(picture.size)
    out = Image.new("RGB", (n, n), tuple(int(v) for v in np.median(border, 0)))
    out.paste(picture, ((n - picture.width) // 2, (n - picture.height) // 2))
    return out


GROWN = 1.5  # a same-colour shape this many times the source shape's area is two copies run together


def duplicated(picture: Image.Image, shape) -> bool:
    """Two copies of the source's `shape` (an analyze.ShapeReport) in an outpainted picture: two or more shapes of its
    colour, or one of more than `GROWN` x its area (a copy drawn against it at the seam, which the analyzers merge
    into one group)."""
    from sdknobs.shapes.analyze import analyze

    same = [s for s in analyze(_padded(picture)).shapes if s.colour == shape.colour]
    return len(same) >= 2 or max((s.area for s in same), default=0) > GROWN * shape.area


@dataclass
class OutpaintReport:
    methods: tuple
    rows: dict = field(default_factory=dict)  # method -> list of (seam, copies >= 2, streak)
    baseline: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    pictures: dict = field(default_factory=dict)  # method -> outpainted pictures, case by case
    sources: list = field(default_factory=list)

    def lines(self) -> list[str]:
        n = len(self.baseline)
        base = [b for b in self.baseline if b is not None]
        out = [f"{n} cases ({len(self.skipped)} left out: source not read as one shape); no-seam baseline "
               f"{np.mean(base):.2f} (0-255, lines 8 px inside the source pictures)",
               "| method | seam: mean colour difference (0-255) | duplicated shape | noise streaks |",
               "| --- | --- | --- | --- |"]
        for m in self.methods:
            r = self.rows[m]
            seams = [x[0] for x in r if x[0] is not None]
            out.append(f"| {m} | {np.mean(seams):.2f} | {sum(x[1] for x in r)}/{n} "
                       f"({100 * np.mean([x[1] for x in r]):.0f}%) | {sum(x[2] for x in r)}/{n} "
                       f"({100 * np.mean([x[2] for x in r]):.0f}%) |")
        return out


def bench(model, *, prompts=PROMPTS, seeds=(0, 1), sides=SIDES, methods=METHODS, steps=30, guidance=3.0,
          seam_strength=None, progress=True) -> OutpaintReport:
    from sdknobs import images as im
    from sdknobs.pipelines import generate, outpaint
    from sdknobs.shapes.analyze import analyze

    seam_strength = im.SEAM_STRENGTH if seam_strength is None else seam_strength
    kw = dict(steps=steps, guidance=guidance, progress=False)
    rep = OutpaintReport(tuple(methods), {m: [] for m in methods}, pictures={m: [] for m in methods})
    cases = [(p, s) for p in prompts for s in seeds]
    for prompt, seed in tqdm(cases, desc="outpaint bench", disable=not progress):
        source = generate(model, prompt, seed=seed, **kw).images[0]
        shapes = analyze(source).shapes
        if len(shapes) != 1:
            rep.skipped.append((prompt, seed))
            continue
        shape, wide = shapes[0], without_position(prompt)
        overlap = im.default_overlap(source.width, source.height, model.vae_scale_factor)
        for ext in sides.values():
            rep.baseline.append(no_seam(source))
            rep.sources.append(source)
            for m in methods:
                if m.startswith("before-"):
                    pic = _before(model, source, wide, *ext, m.split("-", 1)[1], seed, **kw)
                else:
                    fill, text = (m, wide) if m in im.FILLS else ("fill", background_only(wide))
                    pic = outpaint(model, source, text, left=ext[0], right=ext[1], top=ext[2], bottom=ext[3],
                                   fill=fill, seam_strength=seam_strength, seed=seed, **kw).images[0]
                rep.rows[m].append((seam(pic, source, ext, overlap), duplicated(pic, shape),
                                    streaky(pic, source, ext, shape.colour)))
                rep.pictures[m].append(pic)
    return rep


def before_after_grid(rep: OutpaintReport, methods=("before-edge", "before-noise", "fill", "latent-noise"), n=6,
                      scale=3) -> Image.Image:
    """Columns: source, then each method (of those run); rows: the first `n` cases (each cell padded to a square)."""
    from sdknobs.images import grid

    methods = [m for m in methods if m in rep.methods] or list(rep.methods)
    rows = []
    for i in range(min(n, len(rep.sources))):
        side = max(rep.pictures[methods[0]][i].size)
        rows.append([_padded(rep.sources[i], side)] + [_padded(rep.pictures[m][i], side) for m in methods])
    return grid(rows, scale=scale, col_titles=["source"] + list(methods))


def register(bsub) -> None:
    o = bsub.add_parser("outpaint", help="outpainting's seams, duplicated shapes and noise streaks, before vs after "
                                         "issue 12 (20 cases on the shapes model)")
    o.add_argument("--model", default="shapes", help="the model to outpaint with (its pictures must be shapes-world ones)")
    o.add_argument("--steps", type=int, default=30, help="sampler steps of every picture")
    o.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    o.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds per prompt")
    o.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many of the {len(PROMPTS)} prompts to use")
    o.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD",
                   help=f"which to run, of: {', '.join(METHODS)}")
    o.add_argument("--seam-strength", type=float, default=None, help="outpaint's --seam-strength (default: its own)")
    o.add_argument("--grid", default="", help="also write a PNG of the first cases, source and each method, here")
    o.add_argument("--overwrite", action="store_true", help="replace an existing --grid file")
    o.set_defaults(func=_cmd, config=None)


def _cmd(args) -> None:
    from sdknobs.errors import SdknobsError
    from sdknobs.loop import check_seed, check_steps
    from sdknobs.model import load_model

    if not 1 <= args.prompts <= len(PROMPTS):
        raise SdknobsError(f"--prompts must be in 1..{len(PROMPTS)}, got {args.prompts}")
    for s in args.seeds:
        check_seed(s, "--seeds")
    if not (np.isfinite(args.guidance) and args.guidance >= 0):
        raise SdknobsError(f"--guidance must be a finite number >= 0, got {args.guidance}")
    if args.seam_strength is not None and not 0 <= args.seam_strength <= 1:
        raise SdknobsError(f"--seam-strength must be in [0, 1], got {args.seam_strength}")
    if args.grid:
        from sdknobs.atomic import check_out_path

        if not args.grid.lower().endswith(".png"):
            raise SdknobsError(f"--grid {args.grid!r} must end in .png")
        check_out_path(args.grid, "--grid", overwrite=args.overwrite)
    model = load_model(args.model)
    check_steps(args.steps, model.scheduler_config)
    rep = bench(model, prompts=PROMPTS[: args.prompts], seeds=tuple(args.seeds), methods=tuple(args.methods),
                steps=args.steps, guidance=args.guidance, seam_strength=args.seam_strength)
    print(f"model {args.model}, {args.steps} DDIM steps, guidance {args.guidance}, seeds {' '.join(map(str, args.seeds))}")
    print("\n".join(rep.lines()))
    if args.grid:
        from sdknobs.images import save_png

        save_png(before_after_grid(rep), args.grid)
        print(args.grid)
