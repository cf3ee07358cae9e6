"""Loss curves as PNGs, drawn with PIL (no matplotlib dependency)."""
from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from sdknobs.atomic import atomic_write

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127)]


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (window 1 = unchanged)."""
    if window <= 1:
        return list(values)
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000 or a < 0.01:
        return f"{v:.1e}"
    return f"{v:.3g}"


def loss_curve_png(
    path: str | Path,
    series: dict[str, list[tuple[float, float]]],
    *,
    title: str = "",
    xlabel: str = "step",
    ylabel: str = "loss",
    log_y: bool = False,
    smooth_window: int = 1,
    size: tuple[int, int] = (800, 480),
) -> Path:
    """Draw one line per series (points are (step, value)) with axes, ticks, labels and a legend.

    `log_y` plots log10(value) (non-positive values are dropped); `smooth_window` applies a trailing
    moving average before drawing."""
    W, H = size
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 70, 20, 30 if title else 15, 45
    x0, x1, y0, y1 = left, W - right, top, H - bottom

    prepared = {}
    for name, pts in series.items():
        pts = [(float(s), float(v)) for s, v in pts if v == v and math.isfinite(v)]
        if log_y:
            pts = [(s, v) for s, v in pts if v > 0]
        if not pts:
            continue
        xs = [s for s, _ in pts]
        ys = smooth([math.log10(v) if log_y else v for _, v in pts], smooth_window)
        prepared[name] = list(zip(xs, ys))

    if title:
        d.text((W // 2 - 3 * len(title), 8), title, fill="black", font=font)
    d.rectangle([x0, y0, x1, y1], outline="black")
    if not prepared:
        d.text((x0 + 10, y0 + 10), "no data", fill="black", font=font)
        return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))

    allx = [x for p in prepared.values() for x, _ in p]
    ally = [y for p in prepared.values() for _, y in p]
    xmin, xmax = min(allx), max(allx)
    ymin, ymax = min(ally), max(ally)
    if xmax == xmin:
        xmax = xmin + 1
    if ymax == ymin:
        ymax, ymin = ymax + 0.5, ymin - 0.5
    pad = 0.05 * (ymax - ymin)
    ymin, ymax = ymin - pad, ymax + pad

    def px(x):
        return x0 + (x - xmin) / (xmax - xmin) * (x1 - x0)

    def py(y):
        return y1 - (y - ymin) / (ymax - ymin) * (y1 - y0)

    # ticks and grid
    for i in range(6):
        yv = ymin + i * (ymax - ymin) / 5
        yy = py(yv)
        d.line([x0, yy, x1, yy], fill=(230, 230, 230))
        d.line([x0 - 4, yy, x0, yy], fill="black")
        d.text((5, yy - 6), _fmt(10 ** yv if log_y else yv), fill="black", font=font)
        xv = xmin + i * (xmax - xmin) / 5
        xx = px(xv)
        d.line([xx, y1, xx, y1 + 4], fill="black")
        d.text((xx - 12, y1 + 8), _fmt(xv) if xv < 1000 else f"{xv:.0f}", fill="black", font=font)
    d.text(((x0 + x1) // 2 - 3 * len(xlabel), H - 18), xlabel, fill="black", font=font)
    d.text((5, y0 - 14 if y0 >= 14 else 0), ylabel + (" (log)" if log_y else ""), fill="black", font=font)

    for k, (name, pts) in enumerate(prepared.items()):
        colour = PALETTE[k % len(PALETTE)]
        xy = [(px(x), py(y)) for x, y in pts]
        if len(xy) == 1:
            d.ellipse([xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2], fill=colour)
        else:
            d.line(xy, fill=colour, width=2)
        ly = y0 + 8 + 14 * k
        d.line([x1 - 150, ly + 6, x1 - 130, ly + 6], fill=colour, width=3)
        d.text((x1 - 125, ly), name, fill="black", font=font)
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
