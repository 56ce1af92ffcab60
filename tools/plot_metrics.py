#!/usr/bin/env python
"""Plot metrics of a training run as an SVG line chart, with no plotting library (standard library only).

    python tools/plot_metrics.py runs/grpo --keys reward,reward_std --out docs/img/grpo_reward.svg
    python tools/plot_metrics.py runs/ppo/metrics.jsonl --keys objective/scores --title "PPO scores"

Reads WORKDIR/metrics.jsonl (or the JSONL file given), one line per logged step, and draws each key
against `step`: one polyline per key with one point per line that has the key as a finite number
(eval lines without it, and null values, are left out), in the file's order. The SVG is self-contained
(axes, ticks, grid, a legend, the title; each polyline carries `data-key` for tools that read it back)
and stable: the same metrics give the same bytes, so a committed plot diffs cleanly.

What can go wrong: a missing file, or a key no line has, stops with one line naming it (exit 2); a
line that is not JSON (a run killed mid-write leaves a torn last line) is reported as
`FILE:LINE: skipped: why` and the rest is plotted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from html import escape
from pathlib import Path

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
MARGIN = {"left": 64, "right": 16, "top": 40, "bottom": 48}


def read_series(path: Path, keys: list[str]) -> dict[str, list[tuple[float, float]]]:
    """key -> [(step, value)] from a metrics.jsonl. ValueError (one line) when a key has no value."""
    series: dict[str, list[tuple[float, float]]] = {k: [] for k in keys}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = float(record["step"])
        except (ValueError, KeyError, TypeError) as e:
            print(f"{path}:{n}: skipped: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        for k in keys:
            v = record.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                series[k].append((step, float(v)))
    empty = [k for k in keys if not series[k]]
    if empty:
        raise ValueError(f"{path}: no line has a number for {', '.join(empty)}")
    return series


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    return [round(first + i * step, 12) for i in range(int(math.ceil((hi - first) / step - 1e-9)) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.6g}"


def render_svg(series: dict[str, list[tuple[float, float]]], title: str = "", width: int = 640,
               height: int = 360) -> str:
    """The chart as SVG text: x = step, y = value, every key on one shared y axis."""
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    xt, yt = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]
    left, top = MARGIN["left"], MARGIN["top"]
    pw, ph = width - left - MARGIN["right"], height - top - MARGIN["bottom"]

    def px(x: float) -> float:
        return round(left + (x - x0) / (x1 - x0) * pw, 2)

    def py(y: float) -> float:
        return round(top + (y1 - y) / (y1 - y0) * ph, 2)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>']
    if title:
        out.append(f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="14">{escape(title)}</text>')
    for v in yt:
        out.append(f'<line x1="{left}" y1="{py(v)}" x2="{left + pw}" y2="{py(v)}" stroke="#e0e0e0"/>')
        out.append(f'<text x="{left - 6}" y="{py(v) + 4}" text-anchor="end">{_fmt(v)}</text>')
    for v in xt:
        out.append(f'<line x1="{px(v)}" y1="{top + ph}" x2="{px(v)}" y2="{top + ph + 4}" stroke="black"/>')
        out.append(f'<text x="{px(v)}" y="{top + ph + 18}" text-anchor="middle">{_fmt(v)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle">step</text>')
    for i, (key, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        points = " ".join(f"{px(x)},{py(y)}" for x, y in pts)
        out.append(f'<polyline data-key="{escape(key)}" points="{points}" fill="none" stroke="{color}" '
                   f'stroke-width="2"/>')
        ly = top + 14 + 16 * i
        out.append(f'<line x1="{left + 10}" y1="{ly - 4}" x2="{left + 30}" y2="{ly - 4}" stroke="{color}" '
                   f'stroke-width="2"/>')
        out.append(f'<text x="{left + 36}" y="{ly}">{escape(key)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("metrics", help="a workdir (its metrics.jsonl) or a metrics JSONL file")
    ap.add_argument("--keys", default="loss", help="comma-separated metric names (default: loss)")
    ap.add_argument("--out", help="the SVG to write (default: METRICS_DIR/metrics.svg)")
    ap.add_argument("--title", default="")
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=360)
    args = ap.parse_args(argv)
    path = Path(args.metrics)
    path = path / "metrics.jsonl" if path.is_dir() else path
    out = Path(args.out) if args.out else path.with_name("metrics.svg")
    try:
        if not path.is_file():
            raise ValueError(f"{path}: no such file")
        svg = render_svg(read_series(path, [k for k in args.keys.split(",") if k]), args.title, args.width,
                         args.height)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(svg)
    except (ValueError, OSError) as e:
        print(f"plot_metrics: error: {e}", file=sys.stderr)
        return 2
    print(f"plot_metrics: wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
