"""Classical, deterministic analysis of shapes-world images (numpy + PIL, no learned model).

Every generated image in the project is scored by reading its scene back and comparing it with
the prompt's scene (`score`). The pipeline is built to survive diffusion-model output (blur, soft
edges, slightly-off colours, noise):

1. background = palette background nearest to the median border pixel;
2. per pixel, the palette colour c whose background->c line explains it best, and its coverage
   alpha (projection on that line, so a half-covered edge pixel has alpha ~0.5);
3. foreground = alpha >= 0.5, labelled into 8-connected components; components of one colour
   within a few pixels of each other are merged (stripes cut a shape into bands), specks dropped;
4. silhouette = the group's mask with vertical gaps of <= 3 px closed and holes filled;
   coverage = alpha inside it divided by the shape's own typical alpha (its 75th percentile:
   generated shapes are often paler than their palette colour), 1 where the silhouette was filled in;
5. kind: each kind's polygon (the renderer's own) is placed to match the coverage's area and
   centroid, rendered (sharp, or blurred by 0.7 or 1.1 px like a generated picture), and the one with
   the smallest L1 difference wins; its fitted extent gives the size and its bbox centre the position
   (nearest anchor);
6. style: solid when the eroded silhouette is (nearly) fully covered; else striped when the shape
   is cut into several pieces without an enclosed hole (bands run through it), else outline; a
   non-solid reading is then fitted with both styled templates and with the solid one, and stays
   non-solid only if its fit is no worse than 1.5x the solid fit (textured or pale solid shapes
   fail the coverage test, not the fit; blurred small outlines fit within 1.3x of solid).

`sdknobs bench analyzers` measures all this on renders, blurred + noised renders, renders through
the model's VAE, and hand-labelled generated pictures (tests/data/analyzer_labels.json).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from sdknobs.shapes.world import (ANCHORS, BACKGROUNDS, COLOURS, EXTENT, KINDS, OUTLINES, Scene, placement,
                                  shape_mask)

_COL_NAMES = list(COLOURS)
_COL = np.array([COLOURS[c] for c in _COL_NAMES], np.float32)
_BG_NAMES = list(BACKGROUNDS)
_BG = np.array([BACKGROUNDS[b] for b in _BG_NAMES], np.float32)
_SIZE_SPLIT = (EXTENT["small"] + EXTENT["large"]) / 2  # fraction of the image


def _poly_moments(pts):
    """Area and centroid of a polygon (shoelace)."""
    p = np.asarray(pts, np.float64)
    x, y, x1, y1 = p[:, 0], p[:, 1], np.roll(p[:, 0], -1), np.roll(p[:, 1], -1)
    cross = x * y1 - x1 * y
    a = cross.sum() / 2
    return abs(a), ((x + x1) * cross).sum() / (6 * a), ((y + y1) * cross).sum() / (6 * a)


_MOMENTS = {k: _poly_moments(OUTLINES[k]) for k in KINDS}  # for extent 1, bbox centred on 0
_HEIGHT = {k: max(y for _, y in OUTLINES[k]) - min(y for _, y in OUTLINES[k]) for k in KINDS}


@dataclass
class ShapeReport:
    kind: str
    colour: str
    size: str
    position: str
    style: str
    area: int
    bbox: tuple  # (x0, y0, x1, y1) of the foreground pixels, inclusive
    centre: tuple = (0.0, 0.0)  # fitted bbox centre, pixels
    extent: float = 0.0  # fitted longer bbox side, pixels
    fit: float = 0.0  # L1 template error / area (0 = perfect)


@dataclass
class SceneReport:
    background: str
    shapes: list[ShapeReport] = field(default_factory=list)
    size: int = 32


# --- small binary morphology on 2-D bool arrays ---------------------------------------------------
def _shift(m, dy, dx, fill=False):
    """out[y, x] = m[y - dy, x - dx] (outside = fill)."""
    h, w = m.shape
    out = np.full_like(m, fill)
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = m[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


_N8 = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def _dilate(m):
    out = m.copy()
    for dy, dx in _N8:
        out |= _shift(m, dy, dx)
    return out


def _erode(m):
    out = m.copy()
    for dy, dx in _N8:
        out &= _shift(m, dy, dx)
    return out


def label(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Connected components: labels 0..n-1 (-1 = background), by min-propagation + pointer jumping."""
    h, w = mask.shape
    big = h * w
    nbrs = _N8 if connectivity == 8 else [(-1, 0), (1, 0), (0, -1), (0, 1)]
    lab = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        new = lab.copy()
        for dy, dx in nbrs:
            np.minimum(new, _shift(lab, dy, dx, big), out=new)
        new[~mask] = big
        flat = np.append(new.ravel(), big)
        for _ in range(4):  # pointer jumping: follow labels to their roots
            flat = flat[flat]
        new = flat[:-1].reshape(h, w)
        if np.array_equal(new, lab):
            break
        lab = new
    roots, inv = np.unique(lab[mask], return_inverse=True)
    out = np.full((h, w), -1, np.int64)
    out[mask] = inv.ravel()
    return out, len(roots)


def _fill_holes(m):
    lab, _ = label(~m, 4)
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    return m | ~np.isin(lab, border[border >= 0])


def _vclose(m, gap):
    """Fill vertical runs of <= gap background pixels with mask pixels above and below."""
    big = gap + 2
    up, down = np.full(m.shape, big), np.full(m.shape, big)
    for k in range(gap, 0, -1):
        up[_shift(m, k, 0)] = k
        down[_shift(m, -k, 0)] = k
    return m | (up + down - 1 <= gap)


# --- analysis --------------------------------------------------------------------------------------
def _template(kind, style, centre, extent, size):
    """The renderer's own coverage of a shape (drawn at 4x: plenty for matching, 4x cheaper)."""
    return np.asarray(shape_mask(kind, style, centre, extent, size, 4).resize((size, size), Image.BOX), np.float32) / 255


def _style(sil, fg, cov):
    inner = _erode(sil)
    if inner.sum() == 0 or (1 - cov[inner]).mean() < 0.15:
        return "solid"
    hole = (_fill_holes(fg) & ~fg).sum() / sil.sum()
    return "striped" if label(fg)[1] >= 2 and hole < 0.05 else "outline"


def analyze(image: Image.Image) -> SceneReport:
    a = np.asarray(image.convert("RGB"), np.float32)
    size = a.shape[0]
    k = size / 32
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    bgi = int(np.argmin(((_BG - np.median(border, 0)) ** 2).sum(1)))
    bg = _BG[bgi]
    d = a - bg
    v = _COL - bg  # (C, 3)
    alpha = np.clip(d @ v.T / (v * v).sum(1), 0, 1)  # (H, W, C)
    resid = np.linalg.norm(d[:, :, None, :] - alpha[..., None] * v, axis=-1)
    best = resid.argmin(-1)
    cover = np.take_along_axis(alpha, best[..., None], -1)[..., 0]
    fg = cover >= 0.5

    comps, n = label(fg)
    groups = []  # [colour index, mask]
    for i in range(n):  # colour: coverage-weighted vote of the pixels' own colours
        m = comps == i
        votes = np.bincount(best[m], weights=cover[m], minlength=len(_COL_NAMES))
        groups.append([int(votes.argmax()), m])
    gap = round(3 * k)
    merged = True
    while merged:  # merge same-colour groups whose bboxes are within `gap` px
        merged = False
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                if groups[i][0] == groups[j][0] and _bbox_gap(groups[i][1], groups[j][1]) <= gap:
                    groups[i][1] = groups[i][1] | groups.pop(j)[1]
                    merged = True
                    break
            if merged:
                break
    groups = [g for g in groups if g[1].sum() >= 6 * k * k]
    taken = np.zeros_like(fg)
    for _, m in groups:
        taken |= m
    shapes = []
    for c, m in groups:
        sil = _erode(_fill_holes(_dilate(_vclose(m, gap)))) | m
        near, others = _dilate(sil), taken & ~m
        ac = np.where(alpha[..., c] >= 0.15, alpha[..., c], 0)  # this colour's coverage, noise floor cut
        shapes.append(_shape(c, m, sil, ac * (near & ~others), ac * (_dilate(_dilate(near)) & ~others), size))
    shapes.sort(key=lambda s: (s.centre[0], s.centre[1]))
    return SceneReport(_BG_NAMES[bgi], shapes, size)


def _bbox_gap(m1, m2):
    y1, x1 = np.nonzero(m1)
    y2, x2 = np.nonzero(m2)
    gx = max(x2.min() - x1.max(), x1.min() - x2.max(), 0)
    gy = max(y2.min() - y1.max(), y1.min() - y2.max(), 0)
    return max(gx, gy) - 1


@lru_cache(maxsize=8)
def _blur_matrix(size, sigma):
    """K with K @ t @ K.T = t blurred by a Gaussian of `sigma` px at 32 px (scaled), zero outside."""
    i = np.arange(size)
    k = np.exp(-((i[:, None] - i[None, :]) / (sigma * size / 32)) ** 2 / 2)
    return (k / k.sum(1, keepdims=True).max()).astype(np.float32)


def _fit(kind, style, target, cands):
    """Best (L1 error, centre, extent) over candidate placements of the styled template, sharp or
    blurred like a generated image (a little or more)."""
    best, size = (np.inf, None, None), target.shape[0]
    kbs = [_blur_matrix(size, s) for s in (0.7, 1.1)]
    for c, ext in cands:
        t = _template(kind, style, c, ext, size)
        err = min([float(np.abs(t - target).sum())] + [float(np.abs(kb @ t @ kb.T - target).sum()) for kb in kbs])
        if err < best[0]:
            best = (err, c, ext)
    return best


def _refine(kind, style, target, centre, ext):
    """Stripes and outlines lose part of the silhouette (a triangle's apex, a heart's tip): grow the
    template keeping its top, centre or bottom fixed, then polish scale and vertical position."""
    (cx, cy), h, k = centre, _HEIGHT[kind] * ext / 2, target.shape[0] / 32
    coarse = [((cx, cy + a * (f - 1) * h), ext * f) for f in (0.9, 1.0, 1.15, 1.3) for a in (-1, 0, 1)]
    _, (cx, cy), ext = _fit(kind, style, target, coarse)
    fine = [((cx, cy + dy * k), ext * f) for f in (0.95, 1.0, 1.05) for dy in (-0.5, 0, 0.5)]
    return _fit(kind, style, target, fine)


def _shape(c, m, sil, raw, wide, size):
    cov = np.where(sil & ~m, 1.0, raw)  # silhouette coverage: raw alpha, 1 where filled in
    area = float(cov.sum())
    # generated shapes are often paler than their palette colour: measured with their own typical coverage
    # as full, for the size of a solid shape (not for the kind fit: that would round off blurred star points)
    level = np.percentile(raw[m], 75)
    full = float(np.where(sil & ~m, 1.0, np.minimum(raw / level, 1)).sum())
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    cx, cy = (cov * xs).sum() / area, (cov * ys).sum() / area
    style = _style(sil, m, raw)
    solid = {}
    for kind in KINDS:  # solid template matching the silhouette's area and centroid
        ka, kx, ky = _MOMENTS[kind]
        ext = float(np.sqrt(area / ka))
        solid[kind] = _fit(kind, "solid", cov, [((cx - kx * ext, cy - ky * ext), ext)])
    kind = min(solid, key=lambda k: solid[k][0])
    err, centre, ext = solid[kind]
    ext *= np.sqrt(full / area)
    if style != "solid":  # stripes/outline: refine the styled templates against the (scaled) raw coverage
        wide = np.minimum(wide / level, 1)
        fits = {k: _refine(k, style, wide, solid[k][1], solid[k][2]) for k in KINDS}
        best = min(fits, key=lambda k: fits[k][0])
        other = "outline" if style == "striped" else "striped"  # the heuristic's runner-up style gets a fit too
        alt = _refine(best, other, wide, fits[best][1], fits[best][2])
        if alt[0] < fits[best][0]:
            style, fits[best] = other, alt
        # and so does solid: a pale or textured solid shape lets the heuristic down; it must fit clearly better
        if fits[best][0] < 1.5 * _refine(kind, "solid", wide, centre, ext)[0]:
            kind, (err, centre, ext) = best, fits[best]
        else:
            style = "solid"
    pos = min(ANCHORS, key=lambda p: (ANCHORS[p][0] * size - centre[0]) ** 2 + (ANCHORS[p][1] * size - centre[1]) ** 2)
    yy, xx = np.nonzero(m)
    return ShapeReport(kind=kind, colour=_COL_NAMES[c], size="large" if ext > _SIZE_SPLIT * size else "small",
                       position=pos, style=style, area=int(round(area)), centre=centre, extent=ext,
                       bbox=(int(xx.min()), int(yy.min()), int(xx.max()), int(yy.max())), fit=err / area)


ATTRS = ("colour", "kind", "position", "size", "style")


def score(report: SceneReport, truth: Scene) -> dict[str, bool]:
    """Per-attribute agreement of an analysis with the true scene (each true shape is matched to the
    unused detected shape nearest to where the renderer puts it). A true attribute of None (a hand label
    left open: a blob of no clear kind) is not judged."""
    size = report.size
    free = list(report.shapes)
    ok = {a: True for a in ATTRS}
    for sh in truth.shapes:
        (tx, ty), _ = placement(replace(sh, kind=sh.kind or "square", size=sh.size or "small"), size)
        if not free:
            ok = {a: False for a in ATTRS}
            break
        got = min(free, key=lambda r: (r.centre[0] - tx) ** 2 + (r.centre[1] - ty) ** 2)
        free.remove(got)
        for a in ATTRS:
            ok[a] &= getattr(sh, a) in (None, getattr(got, a))
    out = {"background": report.background == truth.background, **ok,
           "count": len(report.shapes) == len(truth.shapes)}
    out["all"] = all(out.values())
    if len(truth.shapes) == 2:
        out["both"] = all(ok.values()) and out["count"]
    return out
