"""The report as SVG charts, written with the standard library (no plotting dependency; GitHub and browsers render
them, and they diff as text).

`render_svg(report)`: one row per case (forward+backward), one dot per provider, so the whole suite fits on a
screen. A GPU run has three panels: the speed-up over eager PyTorch on a log axis (eager is the 1× line, never a dot
of its own), the absolute TFLOP/s against the measured matmul ceiling and the GB/s against the measured copy
bandwidth (each axis ends at its ceiling). A CPU run has one panel, CPU milliseconds on a log axis, titled as a
pipeline check. A provider without a number (an error, a wrong result, skipped) is named at the row's end, never
drawn; a value beyond its axis is a hollow dot at the axis' end. `render_sweeps_svg(report, sweeps)`: time against
size per family, log-log, one line per provider.
"""

from __future__ import annotations

import math
from xml.sax.saxutils import escape

COLOURS = {"eager": "#444444", "compiled": "#9467bd", "max-autotune": "#8c564b", "fla": "#2ca02c",
           "triton": "#1f77b4", "cuda": "#d62728", "cuda-wgmma": "#e377c2", "reference": "#ff7f0e"}
LABEL_W, PANEL_W, GAP_W, NOTE_W = 290, 260, 40, 260  # px
ROW_H, TOP, BOTTOM = 18, 90, 34
DOT_R = 4


def log_ticks(lo: float, hi: float) -> list[float]:
    """1, 2, 5 x 10^k between lo and hi."""
    ticks = []
    for exp in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            t = m * 10.0**exp
            if lo <= t <= hi:
                ticks.append(t)
    return ticks


def log_range(values: list[float], at_least: tuple[float, float]) -> tuple[float, float]:
    """An axis range covering `values` and `at_least`, widened to the 1-2-5 grid."""
    finite = [v for v in values if v > 0 and math.isfinite(v)] + list(at_least)
    lo, hi = min(finite), max(finite)
    grid = [m * 10.0**e for e in range(-6, 7) for m in (1, 2, 5)]
    return max([g for g in grid if g <= lo] or [lo]), min([g for g in grid if g >= hi] or [hi])


def _compact(value: float) -> str:
    """1000 -> 1k, 200000 -> 200k, 1e6 -> 1M."""
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


def _fmt_tick(value: float, unit: str) -> str:
    return f"{value:g}{unit}"


class _Svg:
    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
                      f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
                      f'<rect width="{width}" height="{height}" fill="white"/>']

    def text(self, x, y, text, **attrs):
        extra = "".join(f' {k.replace("_", "-")}="{v}"' for k, v in attrs.items())
        self.parts.append(f'<text x="{x:.1f}" y="{y:.1f}"{extra}>{escape(str(text))}</text>')

    def line(self, x1, y1, x2, y2, colour="#bbb", dash=None, width=1):
        d = f' stroke-dasharray="{dash}"' if dash else ""
        self.parts.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{colour}" '
                          f'stroke-width="{width}"{d}/>')

    def dot(self, x, y, colour, title, hollow=False):
        """A filled dot, or a hollow one for a value beyond the axis (drawn at its end)."""
        paint = f'fill="white" stroke="{colour}" stroke-width="2"' if hollow else f'fill="{colour}" fill-opacity="0.85"'
        self.parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{DOT_R}" {paint}><title>{escape(title)}</title>'
                          '</circle>')

    def legend(self, providers, y):
        x = 8
        for provider in providers:
            self.parts.append(f'<circle cx="{x + 5}" cy="{y - 4}" r="{DOT_R}" fill="{COLOURS[provider]}"/>')
            self.text(x + 13, y, provider)
            x += 24 + 7 * len(provider)

    def done(self) -> str:
        return "\n".join(self.parts + ["</svg>"]) + "\n"


class _Axis:
    """A panel's horizontal axis: linear from 0 or logarithmic."""

    def __init__(self, x0: float, lo: float, hi: float, log: bool):
        self.x0, self.lo, self.hi, self.log = x0, lo, hi, log

    def x(self, value: float) -> float:
        value = min(max(value, self.lo), self.hi)
        if self.log:
            frac = math.log(value / self.lo) / math.log(self.hi / self.lo)
        else:
            frac = (value - self.lo) / (self.hi - self.lo)
        return self.x0 + PANEL_W * frac

    def clipped(self, value: float) -> bool:
        return not self.lo <= value <= self.hi


def _panel(svg: _Svg, axis: _Axis, title: str, ticks: list[float], unit: str, y_bottom: float,
           ceiling: tuple[float, str] | None = None, unit_line: float | None = None) -> None:
    svg.text(axis.x0, TOP - 22, title, font_weight="bold")
    # On a log axis spanning more than two decades only the powers of ten are labelled (the 2s and 5s crowd).
    sparse = axis.log and axis.hi / axis.lo > 100
    for tick in ticks:
        x = axis.x(tick)
        svg.line(x, TOP - 8, x, y_bottom, dash="2,3")
        if not sparse or math.isclose(math.log10(tick), round(math.log10(tick))):
            svg.text(x, y_bottom + 14, _fmt_tick(tick, unit), text_anchor="middle")
    if unit_line is not None:  # eager's 1x
        svg.line(axis.x(unit_line), TOP - 12, axis.x(unit_line), y_bottom, colour=COLOURS["eager"], width=1.5)
        svg.text(axis.x(unit_line), TOP - 12, "eager", text_anchor="middle", fill=COLOURS["eager"], font_size="9")
    if ceiling is not None:
        value, label = ceiling
        svg.line(axis.x(value), TOP - 12, axis.x(value), y_bottom, colour="#000", width=1.5)
        svg.text(axis.x(value) - 2, TOP - 12, label, text_anchor="end", font_size="9")


def _fixed_cases(report):
    return [e for e in report["cases"] if not e["case"].get("sweep")]


def _notes(entry, drawn: set[str]) -> str:
    """Providers of the row that have no number to draw, and why (one short word each)."""
    return "; ".join(f"{r['provider']}: {r['status']}" for r in entry["rows"]
                     if r["provider"] not in drawn and r["status"] != "ok")


def headline_key(entry) -> str:
    """The mode a case is judged and drawn by: fwd+bwd, or fwd for a case timed forward only (a decoding step)."""
    return "fwd_bwd" if any(r.get("ms_fwd_bwd") is not None for r in entry["rows"]) else "fwd"


def render_svg(report: dict) -> str:
    meta = report["meta"]
    entries = _fixed_cases(report)
    gpu = meta.get("kind") == "cuda" and report.get("ceilings")
    panels = 3 if gpu else 1
    height = TOP + max(len(entries), 1) * ROW_H + BOTTOM
    width = LABEL_W + panels * (PANEL_W + GAP_W) + NOTE_W
    svg = _Svg(width, height)
    y_bottom = TOP + len(entries) * ROW_H
    where = f"{meta['device']}, {meta.get('time_utc')}, commit {meta['commit']}"
    if gpu:
        title = f"hadamard_kernels, forward+backward (cases marked (fwd): forward only): {where}"
    else:
        title = f"CPU times, forward+backward: {where}"
        svg.text(8, 34, "a pipeline check of the reference, the Triton interpreter and eager on a CPU: not kernel "
                        "speed", fill="#a00")
    providers = [p for p in COLOURS if any(r["provider"] == p for e in entries for r in e["rows"])]
    svg.text(8, 18, title, font_size="13", font_weight="bold")
    svg.legend(providers, 52)
    x0 = [LABEL_W + i * (PANEL_W + GAP_W) for i in range(panels)]
    axes = []
    if gpu:
        ceil = report["ceilings"]
        speedups = [r.get(f"speedup_vs_eager_{headline_key(e)}") for e in entries for r in e["rows"]]
        lo, hi = log_range([v for v in speedups if v], (0.5, 2.0))
        axes.append(("speedup", _Axis(x0[0], lo, hi, log=True)))
        _panel(svg, axes[0][1], "speed-up over eager (log axis)", log_ticks(lo, hi), "×", y_bottom, unit_line=1.0)
        tflops_axis = _Axis(x0[1], 0.0, ceil["matmul_tflops_bf16"], log=False)
        axes.append(("tflops", tflops_axis))
        _panel(svg, tflops_axis, "TFLOP/s (model FLOPs)", _linear_ticks(ceil["matmul_tflops_bf16"]), "", y_bottom,
               ceiling=(ceil["matmul_tflops_bf16"], f"bf16 matmul {ceil['matmul_tflops_bf16']:.0f}"))
        gbps_axis = _Axis(x0[2], 0.0, ceil["copy_gbps"], log=False)
        axes.append(("gbps", gbps_axis))
        _panel(svg, gbps_axis, "GB/s (compulsory bytes)", _linear_ticks(ceil["copy_gbps"]), "", y_bottom,
               ceiling=(ceil["copy_gbps"], f"copy {ceil['copy_gbps']:.0f}"))
    else:
        times = [r.get(f"ms_{headline_key(e)}") for e in entries for r in e["rows"]]
        lo, hi = log_range([v for v in times if v], (0.1, 1.0))
        axes.append(("cpu_ms", _Axis(x0[0], lo, hi, log=True)))
        _panel(svg, axes[0][1], "CPU ms per call (log axis)", log_ticks(lo, hi), "", y_bottom)
    for i, entry in enumerate(entries):
        y = TOP + i * ROW_H + ROW_H / 2
        if i % 2:
            svg.parts.append(f'<rect x="0" y="{y - ROW_H / 2:.1f}" width="{width}" height="{ROW_H}" fill="#f4f4f4" '
                             f'fill-opacity="0.6"/>')
        key = headline_key(entry)
        svg.text(LABEL_W - 8, y + 4, entry["case"]["id"] + (" (fwd)" if key == "fwd" else ""), text_anchor="end")
        drawn: set[str] = set()
        for kind, axis in axes:
            for row in entry["rows"]:
                value = _value(kind, row, key)
                if value is None:
                    continue
                drawn.add(row["provider"])
                label = _label(kind, row["provider"], value) + (" (beyond the axis)" if axis.clipped(value) else "")
                svg.dot(axis.x(value), y, COLOURS.get(row["provider"], "#000"), label, hollow=axis.clipped(value))
            if gpu and kind == "tflops" and entry["case"]["dtype"] == "fp32":
                fp32 = report["ceilings"]["matmul_tflops_fp32"]
                svg.line(axis.x(fp32), y - ROW_H / 2 + 2, axis.x(fp32), y + ROW_H / 2 - 2, colour="#000", width=1.5)
            if gpu and kind == "tflops" and not entry["case"].get(f"flops_{key}"):
                svg.text(axis.x0 + 4, y + 4, "no FLOPs counted (memory-bound)", fill="#777", font_size="9")
        if notes := _notes(entry, drawn):
            svg.text(x0[-1] + PANEL_W + GAP_W / 2, y + 4, notes, fill="#a00", font_size="10")
    return svg.done()


def _value(kind: str, row: dict, key: str = "fwd_bwd") -> float | None:
    if row["status"] != "ok" and kind != "cpu_ms":
        return None
    if kind == "speedup":
        return row.get(f"speedup_vs_eager_{key}")  # eager itself has none: it is the 1x line
    if kind == "tflops":
        return row.get(f"tflops_{key}")
    if kind == "gbps":
        return row.get(f"gbps_{key}")
    return row.get(f"ms_{key}") if row["status"] in ("ok", "wrong") else None


def _label(kind: str, provider: str, value: float) -> str:
    unit = {"speedup": "× over eager", "tflops": " TFLOP/s", "gbps": " GB/s", "cpu_ms": " CPU ms"}[kind]
    return f"{provider} {value:.3g}{unit}" if value < 1000 else f"{provider} {value:.0f}{unit}"


def _linear_ticks(hi: float) -> list[float]:
    step = 10 ** math.floor(math.log10(hi / 2))
    for m in (1, 2, 5, 10):
        if hi / (m * step) <= 5:
            step *= m
            break
    return [i * step for i in range(int(hi / step) + 1)]


# ---------------------------------------------------------------- sweeps
SWEEP_W, SWEEP_H, SWEEP_PAD = 300, 200, 60


def render_sweeps_svg(report: dict, sweeps: dict[str, dict]) -> str:
    """One log-log panel per family: fwd+bwd ms against the swept size, a line per provider."""
    meta = report["meta"]
    cols = min(3, len(sweeps))
    rows = math.ceil(len(sweeps) / cols)
    width = max(cols * (SWEEP_W + SWEEP_PAD) + SWEEP_PAD, 720)
    height = TOP + rows * (SWEEP_H + SWEEP_PAD) + 10
    svg = _Svg(width, height)
    kind = "" if meta.get("kind") == "cuda" else "CPU "
    svg.text(8, 18, f"{kind}time against size, forward+backward (log-log)", font_size="13", font_weight="bold")
    svg.text(8, 34, f"{meta['device']}, {meta.get('time_utc')}, commit {meta['commit']}")
    providers = [p for p in COLOURS if any(p in s["points"] for s in sweeps.values())]
    svg.legend(providers, 52)
    for i, (op, series) in enumerate(sweeps.items()):
        px = SWEEP_PAD + (i % cols) * (SWEEP_W + SWEEP_PAD)
        py = TOP + (i // cols) * (SWEEP_H + SWEEP_PAD)
        xs = [x for pts in series["points"].values() for x, _ in pts]
        ys = [y for pts in series["points"].values() for _, y in pts]
        svg.text(px, py - 6, f"{op} (ms against {series['axis']})", font_weight="bold")
        if not xs:
            svg.text(px + 4, py + 20, "no correct timings", fill="#a00")
            continue
        x_lo, x_hi = log_range(xs, (min(xs), max(xs)))
        y_lo, y_hi = log_range(ys, (min(ys), max(ys)))

        def sx(v, x_lo=x_lo, x_hi=x_hi, px=px):
            return px + SWEEP_W * (math.log(v / x_lo) / math.log(x_hi / x_lo) if x_hi > x_lo else 0.5)

        def sy(v, y_lo=y_lo, y_hi=y_hi, py=py):
            return py + SWEEP_H * (1 - (math.log(v / y_lo) / math.log(y_hi / y_lo) if y_hi > y_lo else 0.5))

        svg.parts.append(f'<rect x="{px}" y="{py}" width="{SWEEP_W}" height="{SWEEP_H}" fill="none" stroke="#999"/>')
        for t in log_ticks(x_lo, x_hi):
            svg.line(sx(t), py, sx(t), py + SWEEP_H, dash="2,3")
            if x_hi / x_lo <= 100 or math.isclose(math.log10(t), round(math.log10(t))):
                svg.text(sx(t), py + SWEEP_H + 13, _compact(t), text_anchor="middle", font_size="9")
        for t in log_ticks(y_lo, y_hi):
            svg.line(px, sy(t), px + SWEEP_W, sy(t), dash="2,3")
            svg.text(px - 4, sy(t) + 3, f"{t:g}", text_anchor="end", font_size="9")
        for provider, pts in series["points"].items():
            colour = COLOURS.get(provider, "#000")
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            svg.parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
            for x, y in pts:
                svg.dot(sx(x), sy(y), colour, f"{provider} {series['axis']}={x}: {y:.3g} ms")
    return svg.done()
