"""The shapes world: seeded procedural scenes, their renders and their captions.

A scene is a background colour plus one or two shapes; every shape has a kind, colour, size,
position and style. The tiny shapes model is pretrained on `make_batch` output, and the split
of the world into seen and unseen parts is what each customization knob is tested on:

* named kinds (circle, square, triangle) are called by name in captions;
* unnamed kinds (star, heart) are drawn during pretraining but captions only ever say "shape",
  so the model never learns a word for them -> textual inversion / subject LoRA teach one
  (``caption(..., words={"star": "sks shape"})``);
* only the solid style is used in pretraining; striped and outline are unseen -> style LoRA.

Geometry (at 32 px; everything scales with the image size): a shape's bounding box is 9.5 px
(small) or 14 px (large) on its longer side, centred on its position anchor (left/right at
x = 8/24, top/bottom at y = 8/24, centre at 16) plus a seeded jitter of up to 1.5 px (stored in
the Shape), kept inside the image. Two-shape scenes use opposite anchors and jitter only outwards,
so even two large shapes keep a gap of 2 px or more (hence 14 px, not 16). Shapes are drawn at 8x and
box-filtered down. Styles: striped = horizontal background-coloured bands, 2 px on whole pixel
rows (period 4 px), the top band coloured; outline = a border of the shape's colour 0.14 x its
extent wide (~1.3 px small, ~2 px large). A star's points are thinner than a stripe, so
sample_scene never draws a striped star (UNSUPPORTED); render still does if asked.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw

KINDS_NAMED = ("circle", "square", "triangle")
KINDS_UNNAMED = ("star", "heart")
KINDS = KINDS_NAMED + KINDS_UNNAMED
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 225),
    "yellow": (245, 225, 30),
    "purple": (150, 40, 190),
    "orange": (250, 130, 0),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
STYLES = ("solid", "striped", "outline")
PRETRAIN_STYLES = ("solid",)
UNSUPPORTED = frozenset({("star", "striped")})

EXTENT = {"small": 9.5 / 32, "large": 14.0 / 32}  # longer bbox side, as a fraction of the image
ANCHORS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "centre": (0.5, 0.5)}
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
JITTER = 1.5 / 32
SUPERSAMPLE = 8


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    position: str
    style: str = "solid"
    jitter: tuple[float, float] = (0.0, 0.0)  # centre offset, as a fraction of the image size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Shape":
        return cls(**{**d, "jitter": tuple(d.get("jitter", (0.0, 0.0)))})


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {"background": self.background, "shapes": [s.to_dict() for s in self.shapes]}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(d["background"], tuple(Shape.from_dict(s) for s in d["shapes"]))


def _normalise(pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Shift/scale a polygon so its bbox is centred on 0 and its longer side is 1."""
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    s = max(max(xs) - min(xs), max(ys) - min(ys))
    return [((x - cx) / s, (y - cy) / s) for x, y in pts]


def _outlines() -> dict[str, list[tuple[float, float]]]:
    circle = [(math.cos(2 * math.pi * i / 64), math.sin(2 * math.pi * i / 64)) for i in range(64)]
    star = []
    for i in range(10):  # deep points: inner radius 0.45 of the outer one, one point straight up
        r, a = (1.0 if i % 2 == 0 else 0.45), -math.pi / 2 + math.pi * i / 5
        star.append((r * math.cos(a), r * math.sin(a)))
    heart = []
    for i in range(72):
        t = 2 * math.pi * i / 72
        heart.append((16 * math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))))
    return {
        "circle": _normalise(circle),
        "square": _normalise([(0, 0), (1, 0), (1, 1), (0, 1)]),
        "triangle": _normalise([(0.5, 0), (1, 1), (0, 1)]),
        "star": _normalise(star),
        "heart": _normalise(heart),
    }


OUTLINES = _outlines()


def _reflex(pts) -> list[int]:
    """Indices of the polygon's reflex (inward) vertices: an outline stroke needs a round joint there."""
    n, area2 = len(pts), sum(pts[i - 1][0] * pts[i][1] - pts[i][0] * pts[i - 1][1] for i in range(len(pts)))
    out = []
    for i in range(n):
        (ax, ay), (bx, by), (cx, cy) = pts[i - 1], pts[i], pts[(i + 1) % n]
        if ((bx - ax) * (cy - by) - (by - ay) * (cx - bx)) * area2 < 0:
            out.append(i)
    return out


REFLEX = {k: _reflex(v) for k, v in OUTLINES.items()}


def polygon(kind: str, centre: tuple[float, float], extent: float) -> list[tuple[float, float]]:
    """The kind's outline, bbox centred on `centre` (pixels), longer side `extent` pixels."""
    return [(centre[0] + x * extent, centre[1] + y * extent) for x, y in OUTLINES[kind]]


def placement(shape: Shape, size: int) -> tuple[tuple[float, float], float]:
    """(bbox centre in pixels, extent in pixels) of a shape in a size x size image."""
    extent = EXTENT[shape.size] * size
    pts = OUTLINES[shape.kind]
    half_w = (max(p[0] for p in pts) - min(p[0] for p in pts)) * extent / 2
    half_h = (max(p[1] for p in pts) - min(p[1] for p in pts)) * extent / 2
    ax, ay = ANCHORS[shape.position]
    cx = min(max((ax + shape.jitter[0]) * size, half_w + 0.5), size - half_w - 0.5)
    cy = min(max((ay + shape.jitter[1]) * size, half_h + 0.5), size - half_h - 0.5)
    return (cx, cy), extent


def sample_scene(rng: random.Random, *, kinds=KINDS, colours=None, backgrounds=None, sizes=SIZES,
                 positions=POSITIONS, styles=PRETRAIN_STYLES, p_two: float = 0.3) -> Scene:
    colours = tuple(colours or COLOURS)
    background = rng.choice(tuple(backgrounds or BACKGROUNDS))
    pairs = [(a, b) for a, b in (("left", "right"), ("top", "bottom")) if a in positions and b in positions]
    j = lambda: rng.uniform(-JITTER, JITTER)  # noqa: E731
    if pairs and len(colours) >= 2 and rng.random() < p_two:
        pair = list(rng.choice(pairs))
        rng.shuffle(pair)
        cols = rng.sample(colours, 2)
        shapes = []
        for pos, col in zip(pair, cols):
            out = abs(j()) * (1 if pos in ("right", "bottom") else -1)  # jitter outwards only
            jit = (out, j()) if pos in ("left", "right") else (j(), out)
            kind = rng.choice(kinds)
            shapes.append(Shape(kind, col, rng.choice(sizes), pos, _style(rng, kind, styles), jit))
        return Scene(background, tuple(shapes))
    kind = rng.choice(kinds)
    shape = Shape(kind, rng.choice(colours), rng.choice(sizes), rng.choice(positions), _style(rng, kind, styles), (j(), j()))
    return Scene(background, (shape,))


def _style(rng: random.Random, kind: str, styles) -> str:
    return rng.choice([s for s in styles if (kind, s) not in UNSUPPORTED] or list(styles))


def shape_mask(kind: str, style: str, centre: tuple[float, float], extent: float, size: int,
               s: int = SUPERSAMPLE) -> Image.Image:
    """L mask (255 = the shape's colour) of one shape, drawn at s x the image size."""
    pts = [(x * s, y * s) for x, y in polygon(kind, centre, extent)]
    mask = Image.new("L", (size * s, size * s), 0)
    d = ImageDraw.Draw(mask)
    d.polygon(pts, fill=255)
    if style == "striped":  # 2 px bands on whole pixel rows, from the shape's top row, coloured first
        band = 2 * size // 32
        top = round(min(p[1] for p in pts) / s)
        for y in range(top + band, size, 2 * band):
            d.rectangle([0, y * s, size * s, (y + band) * s - 1], fill=0)
    elif style == "outline":  # border ~ 0.14 x extent: 1.3 px small, 2 px large at 32 px
        inner = Image.new("L", mask.size, 0)
        di = ImageDraw.Draw(inner)
        di.polygon(pts, fill=255)
        w = round(2 * 0.14 * extent * s)
        di.line(pts + pts[:1], fill=0, width=w)
        for i in REFLEX[kind]:
            di.ellipse([pts[i][0] - w / 2, pts[i][1] - w / 2, pts[i][0] + w / 2, pts[i][1] + w / 2], fill=0)
        mask = ImageChops.subtract(mask, inner)
    elif style != "solid":
        raise ValueError(f"unknown style {style!r}")
    return mask


def _draw(canvas: Image.Image, shape: Shape, size: int) -> None:
    centre, extent = placement(shape, size)
    if shape.style == "solid":  # fast path
        pts = [(x * SUPERSAMPLE, y * SUPERSAMPLE) for x, y in polygon(shape.kind, centre, extent)]
        ImageDraw.Draw(canvas).polygon(pts, fill=COLOURS[shape.colour])
    else:
        canvas.paste(COLOURS[shape.colour], mask=shape_mask(shape.kind, shape.style, centre, extent, size))


def render(scene: Scene, size: int = 32) -> Image.Image:
    """RGB render of a scene (deterministic): drawn at 8x, box-filtered down."""
    canvas = Image.new("RGB", (size * SUPERSAMPLE, size * SUPERSAMPLE), BACKGROUNDS[scene.background])
    for shape in scene.shapes:
        _draw(canvas, shape, size)
    return canvas.resize((size, size), Image.BOX)


_POS_WORDS = {
    "left": ("on the left", "on the left side", "to the left"),
    "right": ("on the right", "on the right side", "to the right"),
    "top": ("at the top", "at the top", "near the top"),
    "bottom": ("at the bottom", "at the bottom", "near the bottom"),
    "centre": ("in the centre", "in the centre", "at the centre"),
}
_STYLE_WORDS = {"solid": "", "striped": "striped ", "outline": "outlined "}


def noun(kind: str, rng: random.Random, words: dict[str, str] | None = None) -> str:
    if words and kind in words:
        return words[kind]
    if kind in KINDS_UNNAMED or rng.random() < 0.1:
        return "shape"
    return kind


def caption(scene: Scene, rng: random.Random, *, words: dict[str, str] | None = None, name_style: bool = True) -> str:
    """Compositional English stating every attribute; star/heart are only ever "shape"."""
    parts = []
    for sh in scene.shapes:
        style = _STYLE_WORDS[sh.style] if name_style else ""
        parts.append(f"a {sh.size} {sh.colour} {style}{noun(sh.kind, rng, words)} {rng.choice(_POS_WORDS[sh.position])}")
    body = " and ".join(parts)
    bg = scene.background
    form = rng.randrange(4)
    if form == 0:
        return f"{body}, {bg} background"
    if form == 1:
        return f"{body}, on a {bg} background"
    if form == 2:
        return f"{body} against a {bg} background"
    return f"{bg} background, {body}"


def make_batch(n: int, seed: int, size: int = 32, *, words: dict[str, str] | None = None, name_style: bool = True,
               **sample_kwargs) -> tuple["torch.Tensor", list[str], list[Scene]]:  # noqa: F821
    """n images as float32 [n,3,size,size] in [-1,1], their captions and scenes (deterministic per seed)."""
    import torch

    rng = random.Random(seed)
    scenes, caps, arrays = [], [], np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        scene = sample_scene(rng, **sample_kwargs)
        scenes.append(scene)
        caps.append(caption(scene, rng, words=words, name_style=name_style))
        arrays[i] = np.asarray(render(scene, size))
    x = torch.from_numpy(arrays).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return x.contiguous(), caps, scenes


def write_dataset(folder, n: int, seed: int, size: int = 32, *, words: dict[str, str] | None = None,
                  name_style: bool = True, **sample_kwargs) -> Path:
    """kohya-style folder: 00000.png + 00000.txt ... plus truth.jsonl; written to a temp folder, then renamed."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    rng = random.Random(seed)
    with open(tmp / "truth.jsonl", "w") as truth:
        for i in range(n):
            scene = sample_scene(rng, **sample_kwargs)
            cap = caption(scene, rng, words=words, name_style=name_style)
            render(scene, size).save(tmp / f"{i:05d}.png")
            (tmp / f"{i:05d}.txt").write_text(cap + "\n")
            truth.write(json.dumps({"file": f"{i:05d}.png", "caption": cap, "scene": scene.to_dict()}) + "\n")
    if folder.exists():
        old = folder.parent / f".{folder.name}.old{os.getpid()}"
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)
    return folder


def read_truth(folder) -> list[dict]:
    """truth.jsonl of a write_dataset folder, scenes as Scene objects."""
    rows = [json.loads(line) for line in (Path(folder) / "truth.jsonl").read_text().splitlines() if line]
    return [{**r, "scene": Scene.from_dict(r["scene"])} for r in rows]
