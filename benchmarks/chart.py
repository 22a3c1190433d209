"""The benchmark report as a chart: speedup over eager PyTorch per case and provider, forward and forward+backward.

Written as SVG with the standard library only (no plotting dependency; GitHub and browsers render it, and it diffs
as text). Reads the rows that run.derive() filled in; a provider without a speedup (an error, a wrong result, a
skipped provider, a missing timing) is drawn as a labelled gap, never as a bar.
"""

from __future__ import annotations

import math
from xml.sax.saxutils import escape

# Providers drawn, in this order, with their colours; eager is the 1x line every bar is measured against.
BARS = {"compiled": "#8c8c8c", "fla": "#2ca02c", "triton": "#1f77b4", "cuda": "#d62728"}
PANELS = {"fwd": "forward", "fwd_bwd": "forward + backward"}
NO_BAR = {"error": "error", "wrong": "wrong result", "skipped": "skipped"}  # row status -> the label drawn instead

LABEL_W, PANEL_W, GAP_W = 300, 300, 30  # px: case labels, each panel's plot area, space between panels
BAR_H, CASE_GAP, TOP, BOTTOM = 12, 10, 64, 30


def bar_rows(entry: dict) -> list[tuple[str, dict[str, float | str]]]:
    """(provider, {panel: speedup, or why there is none}) for the providers of BARS present in a case entry."""
    out = []
    for row in entry["rows"]:
        if row["provider"] not in BARS:
            continue
        values = {}
        for key in PANELS:
            speedup = row.get(f"speedup_vs_eager_{key}")
            if speedup is not None:
                values[key] = speedup
            else:
                values[key] = NO_BAR.get(row["status"], "not measured")
        out.append((row["provider"], values))
    return out


def axis_max(report: dict) -> float:
    """Right end of both panels' axes: the largest speedup (at least 1x, eager's line), rounded up to a half."""
    largest = max([1.0] + [v for entry in report["cases"] for _, values in bar_rows(entry)
                           for v in values.values() if isinstance(v, float) and math.isfinite(v)])
    return math.ceil(largest * 1.05 * 2) / 2


def render_svg(report: dict) -> str:
    meta = report["meta"]
    x_max = axis_max(report)
    entries = [(entry["case"]["id"], bar_rows(entry)) for entry in report["cases"]]
    height = TOP + sum(max(len(rows), 1) * BAR_H + CASE_GAP for _, rows in entries) + BOTTOM
    width = LABEL_W + len(PANELS) * (PANEL_W + GAP_W)
    panel_x0 = {key: LABEL_W + i * (PANEL_W + GAP_W) for i, key in enumerate(PANELS)}

    def x_of(key, speedup):
        return panel_x0[key] + PANEL_W * min(speedup, x_max) / x_max

    title = f"speedup over eager PyTorch: {meta['device']}, {meta['date']}, commit {meta['commit']}"
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="8" y="18" font-size="13" font-weight="bold">'
           f'{escape(title)}</text>']
    legend_x = 8
    for provider, colour in BARS.items():
        svg.append(f'<rect x="{legend_x}" y="28" width="10" height="10" fill="{colour}"/>')
        svg.append(f'<text x="{legend_x + 14}" y="37">{provider}</text>')
        legend_x += 90
    plot_bottom = height - BOTTOM
    for key, title in PANELS.items():
        x0 = panel_x0[key]
        svg.append(f'<text x="{x0}" y="{TOP - 8}" font-weight="bold">{title}</text>')
        for tick in _ticks(x_max):
            x = x_of(key, tick)
            dash = "" if tick == 1 else ' stroke-dasharray="2,3"'
            svg.append(f'<line x1="{x:.1f}" y1="{TOP - 4}" x2="{x:.1f}" y2="{plot_bottom}" stroke="#bbb"{dash}/>')
            svg.append(f'<text x="{x:.1f}" y="{plot_bottom + 14}" text-anchor="middle">{tick:g}×</text>')

    y = TOP
    for case_id, rows in entries:
        group_h = max(len(rows), 1) * BAR_H
        svg.append(f'<text x="{LABEL_W - 8}" y="{y + group_h / 2 + 4:.1f}" text-anchor="end">'
                   f'{escape(case_id)}</text>')
        for i, (provider, values) in enumerate(rows):
            top = y + i * BAR_H
            for key, value in values.items():
                if isinstance(value, str):
                    svg.append(f'<text x="{panel_x0[key] + 4}" y="{top + BAR_H - 2}" fill="{BARS[provider]}">'
                               f'{provider}: {value}</text>')
                    continue
                w = x_of(key, value) - panel_x0[key]
                svg.append(f'<rect x="{panel_x0[key]}" y="{top + 1}" width="{w:.1f}" height="{BAR_H - 2}" '
                           f'fill="{BARS[provider]}"><title>{provider} {value:.2f}×</title></rect>')
                svg.append(f'<text x="{panel_x0[key] + w + 3:.1f}" y="{top + BAR_H - 2}">{value:.2f}×</text>')
        y += group_h + CASE_GAP
    svg.append("</svg>")
    return "\n".join(svg) + "\n"


def _ticks(x_max: float) -> list[float]:
    step = 0.5 if x_max <= 3 else 1.0 if x_max <= 8 else float(math.ceil(x_max / 8))
    return [i * step for i in range(1, int(x_max / step) + 1)]
