"""Small, dependency-free SVG charts for the HTML report (inline, no scripts, no fonts)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

import numpy as np

PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#59a14f",
    "#e15759",
    "#76b7b2",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
)
#: Samples drawn as dots per box plot row at most (a random, seeded subset beyond that).
MAX_DOTS = 1500
OTHER = "other"
OTHER_COLOR = "#bab0ac"
_FONT = 'font-family="system-ui, sans-serif" font-size="12"'


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering ``[lo, hi]``."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = [round(start, 10)]
    while ticks[-1] < hi - step * 1e-9:
        ticks.append(round(start + len(ticks) * step, 10))
    return ticks


def log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks for a log axis, the first <= ``lo`` and the last >= ``hi`` (both > 0)."""
    lo, hi = max(lo, 1e-12), max(hi, lo * 1.0001)
    series = [
        m * 10.0**d
        for d in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
        for m in (1, 2, 5)
    ]
    first = max(t for t in series if t <= lo * (1 + 1e-9))
    last = min(t for t in series if t >= hi * (1 - 1e-9))
    return [float(f"{t:.6g}") for t in series if first <= t <= last]


def _fmt(v: float) -> str:
    return f"{v:g}" if abs(v) >= 0.01 or v == 0 else f"{v:.1e}"


def _svg(width: int, height: int, body: list[str], title: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}" {_FONT}>'
        f"<title>{escape(title)}</title>" + "".join(body) + "</svg>"
    )


def _x_axis(ticks: Sequence[float], sx: object, y0: float, y1: float, label: str, x_mid: float) -> list[str]:
    out = []
    for t in ticks:
        x = sx(t)  # type: ignore[operator]
        out.append(f'<line x1="{x:.1f}" y1="{y0:.1f}" x2="{x:.1f}" y2="{y1:.1f}" stroke="#e3e3e3"/>')
        out.append(f'<text x="{x:.1f}" y="{y1 + 15:.1f}" text-anchor="middle" fill="#555">{_fmt(t)}</text>')
    out.append(
        f'<text x="{x_mid:.1f}" y="{y1 + 33:.1f}" text-anchor="middle" fill="#333">{escape(label)}</text>'
    )
    return out


def box_plot(series: Sequence[tuple[str, Sequence[float]]], *, unit: str = "ms", width: int = 920) -> str:
    """Horizontal box plots on a log axis, one row per series, over a strip of every sample.

    Box: 25th-75th percentile; thick line: median; whiskers: 1st and 99th percentiles. When the
    slowest run is over 4x the fastest, the axis is logarithmic: rare slow runs (a busy machine)
    stay on the chart without squashing the boxes, and equal ratios show as equal distances.
    """
    left, right, row_h, top = 170, 120, 46, 10
    height = top + row_h * len(series) + 48
    values_all = [float(x) for _, v in series for x in v if x > 0] or [1.0]
    lo, hi = min(values_all), max(values_all)
    log = hi / lo > 4  # a linear axis reads better when everything is within a small factor
    ticks = log_ticks(lo, hi) if log else nice_ticks(max(0.0, lo - (hi - lo) * 0.05), hi + (hi - lo) * 0.05)
    f = math.log10 if log else float
    a0, a1 = f(ticks[0]), f(ticks[-1])

    def sx(v: float) -> float:
        v = min(max(v, ticks[0]), ticks[-1])
        return left + (f(v) - a0) / ((a1 - a0) or 1.0) * (width - left - right)

    label = f"latency per run ({unit}{', log scale' if log else ''})"
    body = _x_axis(ticks, sx, top, top + row_h * len(series), label, (left + width - right) / 2)
    rng = np.random.default_rng(0)  # fixed jitter: the same data draws the same picture
    for i, (name, values) in enumerate(series):
        v = np.asarray(values, dtype=float)
        cy = top + row_h * i + row_h / 2
        c = color(i)
        body.append(
            f'<text x="{left - 10}" y="{cy + 4:.1f}" text-anchor="end" fill="#222">{escape(name)}</text>'
        )
        shown = v if v.size <= MAX_DOTS else rng.choice(v, MAX_DOTS, replace=False)
        for value, dy in zip(shown, rng.uniform(-row_h * 0.32, row_h * 0.32, shown.size)):
            body.append(
                f'<circle cx="{sx(value):.1f}" cy="{cy + dy:.1f}" r="1.6" fill="{c}" fill-opacity="0.35"/>'
            )
        p1, p25, p50, p75, p99 = np.percentile(v, [1, 25, 50, 75, 99])
        h = row_h * 0.5
        body.append(f'<line x1="{sx(p1):.1f}" y1="{cy:.1f}" x2="{sx(p99):.1f}" y2="{cy:.1f}" stroke="#333"/>')
        for w in (p1, p99):
            body.append(
                f'<line x1="{sx(w):.1f}" y1="{cy - h / 3:.1f}" x2="{sx(w):.1f}" y2="{cy + h / 3:.1f}" stroke="#333"/>'
            )
        body.append(
            f'<rect x="{sx(p25):.1f}" y="{cy - h / 2:.1f}" width="{max(sx(p75) - sx(p25), 1):.1f}" height="{h:.1f}" '
            f'fill="{c}" fill-opacity="0.45" stroke="{c}"/>'
        )
        body.append(
            f'<line x1="{sx(p50):.1f}" y1="{cy - h / 2:.1f}" x2="{sx(p50):.1f}" y2="{cy + h / 2:.1f}" stroke="#111" stroke-width="2.5"/>'
        )
        body.append(
            f'<text x="{width - right + 14}" y="{cy + 4:.1f}" fill="#222">p50 {_fmt(round(float(p50), 4))}</text>'
        )
    return _svg(width, height, body, "latency distribution per model")


def scatter(
    points: Sequence[tuple[str, float, float]],
    *,
    x_label: str,
    y_label: str,
    y_cap: float | None = None,
    y_min_span: float = 0.0,
    width: int = 620,
    height: int = 380,
) -> str:
    """Labelled points; colours follow the series order of the other charts.

    ``y_cap`` bounds the y axis (100 for percentages) when the data allow it; ``y_min_span``
    keeps a tiny difference (0.1 accuracy points) from filling the whole height.
    """
    left, right, top, bottom = 70, 150, 16, 50
    xs = [p[1] for p in points] or [0.0]
    ys = [p[2] for p in points] or [0.0]
    xpad = (max(xs) - min(xs)) * 0.15 or max(abs(max(xs)), 1e-9) * 0.1
    ypad = (max(ys) - min(ys)) * 0.15 or max(abs(max(ys)), 1e-9) * 0.01 or 1.0
    xt = nice_ticks(max(0.0, min(xs) - xpad), max(xs) + xpad)
    y_lo, y_hi = min(ys) - ypad, max(ys) + ypad
    if y_hi - y_lo < y_min_span:
        mid = (max(ys) + min(ys)) / 2
        y_lo, y_hi = mid - y_min_span / 2, mid + y_min_span / 2
    if y_cap is not None and max(ys) <= y_cap and y_hi > y_cap:
        y_lo, y_hi = y_lo - (y_hi - y_cap), y_cap
    yt = nice_ticks(y_lo, y_hi)

    def sx(v: float) -> float:
        return left + (v - xt[0]) / ((xt[-1] - xt[0]) or 1) * (width - left - right)

    def sy(v: float) -> float:
        return height - bottom - (v - yt[0]) / ((yt[-1] - yt[0]) or 1) * (height - top - bottom)

    body = _x_axis(xt, sx, top, height - bottom, x_label, (left + width - right) / 2)
    for t in yt:
        body.append(
            f'<line x1="{left}" y1="{sy(t):.1f}" x2="{width - right}" y2="{sy(t):.1f}" stroke="#e3e3e3"/>'
        )
        body.append(
            f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" fill="#555">{_fmt(t)}</text>'
        )
    body.append(
        f'<text transform="translate(16 {(top + height - bottom) / 2:.1f}) rotate(-90)" text-anchor="middle" fill="#333">'
        f"{escape(y_label)}</text>"
    )
    for i, (name, x, y) in enumerate(points):
        body.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="6" fill="{color(i)}" stroke="#222"/>')
        body.append(f'<text x="{sx(x) + 10:.1f}" y="{sy(y) + 4:.1f}" fill="#222">{escape(name)}</text>')
    return _svg(width, height, body, f"{y_label} vs {x_label}")


def stacked_bars(
    rows: Sequence[tuple[str, Sequence[tuple[str, float]]]], *, unit: str, width: int = 920
) -> str:
    """One horizontal bar per row, split into named segments; a legend below."""
    left, right, top, bar_h, gap = 170, 90, 10, 24, 12
    keys: list[str] = []
    for _, segments in rows:
        keys += [k for k, _ in segments if k not in keys]
    if OTHER in keys:  # the remainder goes last, in grey
        keys.remove(OTHER)
        keys.append(OTHER)
    fills = {k: (OTHER_COLOR if k == OTHER else color(i)) for i, k in enumerate(keys)}
    # Legend entries flow left to right, wrapping; width from a rough 7 px per character.
    legend: list[tuple[str, float, int]] = []
    lx, line = float(left), 0
    for key in keys:
        w = 36 + 7.6 * len(key)
        if lx + w > width - 10 and lx > left:
            lx, line = float(left), line + 1
        legend.append((key, lx, line))
        lx += w
    total_max = max((sum(v for _, v in s) for _, s in rows), default=1.0) or 1.0
    ticks = nice_ticks(0.0, total_max)
    plot_h = (bar_h + gap) * len(rows)
    height = top + plot_h + 62 + 20 * (line + 1)

    def sx(v: float) -> float:
        return left + v / (ticks[-1] or 1) * (width - left - right)

    body = _x_axis(ticks, sx, top, top + plot_h, unit, (left + width - right) / 2)
    for i, (name, segments) in enumerate(rows):
        y = top + i * (bar_h + gap) + gap / 2
        body.append(
            f'<text x="{left - 10}" y="{y + bar_h / 2 + 4:.1f}" text-anchor="end" fill="#222">{escape(name)}</text>'
        )
        acc = 0.0
        for key, value in segments:
            w = sx(acc + value) - sx(acc)
            body.append(
                f'<rect x="{sx(acc):.1f}" y="{y:.1f}" width="{max(w, 0):.1f}" height="{bar_h}" fill="{fills[key]}">'
                f"<title>{escape(name)}: {escape(key)} {value:.1f} {escape(unit)}</title></rect>"
            )
            acc += value
        body.append(f'<text x="{sx(acc) + 6:.1f}" y="{y + bar_h / 2 + 4:.1f}" fill="#222">{acc:.0f}</text>')
    ly = top + plot_h + 62
    for key, x, row in legend:
        yy = ly + row * 20
        body.append(f'<rect x="{x:.0f}" y="{yy - 10}" width="12" height="12" fill="{fills[key]}"/>')
        body.append(f'<text x="{x + 17:.0f}" y="{yy}" fill="#222">{escape(key)}</text>')
    return _svg(width, height, body, f"time by op type ({unit})")
