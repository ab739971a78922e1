"""A minimal line chart as PNG with PIL (no plotting dependency): log-scaled x, linear y."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def line_chart(path: str, series: dict[str, list[tuple[float, float]]], *, title: str, xlabel: str, ylabel: str,
               log_x: bool = True, size: tuple[int, int] = (720, 480), y_max: float | None = None,
               xticks: list[float] | None = None, labels: dict[str, list[str]] | None = None) -> str:
    """Draw ``series`` (name -> [(x, y), ...]) and save to ``path``; values above ``y_max`` are
    drawn at the top edge (open circles). ``xticks`` (default: every x value); ``labels``
    (name -> one text per point, in the order given) are written beside the points."""
    w, h = size
    left, right, top, bottom = 70, 170, 40, 60
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    pts = [p for s in series.values() for p in s if math.isfinite(p[1])]
    fx = (lambda v: math.log10(v)) if log_x else (lambda v: v)  # noqa: E731
    x0, x1 = min(fx(p[0]) for p in pts), max(fx(p[0]) for p in pts)
    y0, y1 = 0.0, max(p[1] for p in pts) * 1.05
    if y_max is not None and y_max < y1:
        y1 = y_max
        series = {k: [(a, min(b, y_max)) for a, b in s] for k, s in series.items()}
    X = lambda v: left + (fx(v) - x0) / max(x1 - x0, 1e-9) * (w - left - right)  # noqa: E731
    Y = lambda v: h - bottom - (v - y0) / max(y1 - y0, 1e-9) * (h - top - bottom)  # noqa: E731
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    xticks = sorted({p[0] for p in pts}) if xticks is None else list(xticks)
    for xv in xticks:
        d.line([X(xv), h - bottom, X(xv), h - bottom + 5], fill="black")
        d.text((X(xv) - 8, h - bottom + 8), f"{xv:g}", fill="black")
    for i in range(6):
        yv = y0 + (y1 - y0) * i / 5
        d.line([left - 5, Y(yv), left, Y(yv)], fill="black")
        d.text((5, Y(yv) - 6), f"{yv:.1f}", fill="black")
    d.text((left, 10), title, fill="black")
    d.text(((w - right + left) // 2 - 40, h - 25), xlabel, fill="black")
    d.text((5, top - 20), ylabel, fill="black")
    for k, (name, s) in enumerate(series.items()):
        c = COLORS[k % len(COLORS)]
        for (a, b), text in zip(s, (labels or {}).get(name, [])):
            if math.isfinite(b):
                d.text((X(a) + 4, Y(b) - 12), text, fill=c)
        s = sorted(p for p in s if math.isfinite(p[1]))
        d.line([(X(a), Y(b)) for a, b in s], fill=c, width=2)
        for a, b in s:
            d.ellipse([X(a) - 3, Y(b) - 3, X(a) + 3, Y(b) + 3], fill=c)
        d.line([w - right + 10, top + 18 * k + 6, w - right + 30, top + 18 * k + 6], fill=c, width=3)
        d.text((w - right + 35, top + 18 * k), name, fill="black")
    img.save(path)
    return path
