"""The benchmark report, built from the suite's record (conftest.py --bench-record: one JSON line per test).

Pure functions (no GPU, tested on the CPU): `from_record` groups the tests into one row per case and provider,
`derive` adds the rates and speedups (GPU runs only), `render_markdown` writes the tables, `readme_block` the
README's summary, `write_report` the files. A CPU run is labelled as such everywhere and gets no rates, ceilings or
speedups: the Triton interpreter's time is not kernel speed.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import cases
import chart

# JSON key suffix of each mode.
KEYS = {"fwd": "fwd", "bwd": "bwd", "fwd+bwd": "fwd_bwd", "fwd+bwd-graph": "graph"}
README_BEGIN = "<!-- benchmark-results:begin (written by benchmarks/run.py) -->"
README_END = "<!-- benchmark-results:end -->"
CPU_BANNER = ("**CPU run: a check that the benchmark pipeline runs.** The reference, the Triton interpreter and eager "
              "PyTorch on a CPU, tiny shapes: these are CPU times, not kernel speed, and nothing here is a "
              "performance result.")
_STATUS_RANK = {"ok": 0, "skipped": 1, "wrong": 2, "error": 3}


# ---------------------------------------------------------------- from the record
def read_record(path: Path) -> list[dict]:
    """The entries of a record file (a line cut short by a kill is dropped)."""
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def from_record(entries: list[dict]) -> dict:
    """{"meta", "cases": [{"case", "rows": [one per provider]}], "pending": [node ids planned, not yet run]}.
    The last test of a node id wins; meta is the last session's (its ceilings); cases keep the order they ran in."""
    tests: dict[str, dict] = {}
    sessions = [e for e in entries if e.get("type") == "session"]
    plans = [e for e in entries if e.get("type") == "plan"]
    for e in entries:
        if e.get("type") == "test":
            tests[e["nodeid"]] = e
    meta = dict(sessions[-1]) if sessions else {"kind": "unknown", "device": "unknown", "commit": "unknown"}
    for stages in (e for e in entries if e.get("type") == "stages"):  # run_gpu.sh's build, tests, memcheck
        meta.update(stages)
    meta.pop("type", None)
    meta["sessions"] = len(sessions)
    meta["tests"] = len(tests)
    by_case: dict[str, dict] = {}
    for t in tests.values():
        entry = by_case.setdefault(t["case"]["id"], {"case": t["case"], "rows": {}})
        row = entry["rows"].setdefault(t["provider"], {"provider": t["provider"], "errors": {}})
        _add_mode(row, t)
    out_cases = []
    for entry in by_case.values():
        rows = sorted(entry["rows"].values(), key=lambda r: _provider_order(r["provider"]))
        for row in rows:
            _finish_row(row)
        out_cases.append({"case": entry["case"], "rows": rows})
    pending = [n for n in (plans[-1]["nodeids"] if plans else []) if n not in tests]
    return {"meta": meta, "ceilings": meta.pop("ceilings", None), "cases": out_cases, "pending": pending}


def _provider_order(provider: str) -> int:
    return cases.PROVIDERS.index(provider) if provider in cases.PROVIDERS else len(cases.PROVIDERS)


def _add_mode(row: dict, t: dict) -> None:
    key = KEYS[t["mode"]]
    status = t.get("status", "error")
    row.setdefault("statuses", {})[key] = status
    if status in ("error", "skipped"):
        row["errors"][key] = t.get("error", "")
        if t.get("error_full"):
            row.setdefault("error_full", {})[key] = t["error_full"]
        return
    for name in ("rel_err_fwd", "rel_err_bwd", "tolerance"):
        if t.get(name) is not None:
            row[name] = t[name]
    timing = t.get("timing") or {}
    row[f"ms_{key}"] = timing.get("p50_ms")
    row[f"p20_{key}"] = timing.get("p20_ms")
    row[f"p80_{key}"] = timing.get("p80_ms")
    row[f"rounds_{key}"] = timing.get("rounds")
    if t.get("peak_mib") is not None:
        row[f"peak_mib_{key}"] = t["peak_mib"]
    for name in ("saved_bytes", "saved_extra_bytes"):
        if t.get(name) is not None:
            row[name] = t[name]


def _finish_row(row: dict) -> None:
    """The row's status: the worst of its modes (error > wrong > skipped > ok), skipped only if every mode was, and
    its first error message."""
    statuses = row.pop("statuses", {})
    values = set(statuses.values())
    if values == {"skipped"}:
        row["status"] = "skipped"
    else:
        row["status"] = max(values - {"skipped"} or {"error"}, key=_STATUS_RANK.get)
    if row["errors"]:
        row["error"] = next(iter(row["errors"].values()))
    else:
        del row["errors"]


# ---------------------------------------------------------------- derived numbers (GPU runs)
def derive(report: dict) -> dict:
    """For GPU runs, adds to every timed row and mode: tflops_*, gbps_*, tflops_pct_* / gbps_pct_* (of the measured
    ceilings), roofline_pct_* (the time the ceilings allow for the FLOPs and bytes / the measured time),
    byte_floor_x_* (measured time / the time the bytes take at the copy bandwidth), speedup_vs_<baseline>_* (baseline
    ms / row ms, for correct rows other than the baseline itself) and, where a CUDA-graph time exists,
    launch_overhead_ms (fwd+bwd minus its graph replay). A CPU run gets none of these."""
    if report["meta"].get("kind") != "cuda" or not report.get("ceilings"):
        return report
    ceil = report["ceilings"]
    for entry in report["cases"]:
        case = entry["case"]
        peak = ceil["matmul_tflops_fp32" if case["dtype"] == "fp32" else "matmul_tflops_bf16"]
        by_provider = {row["provider"]: row for row in entry["rows"]}
        for row in entry["rows"]:
            for key in KEYS.values():
                ms = row.get(f"ms_{key}")
                if ms is None:
                    continue
                counted = "fwd_bwd" if key == "graph" else key
                flops, nbytes = case[f"flops_{counted}"], case[f"bytes_{counted}"]
                byte_floor_ms = nbytes / ceil["copy_gbps"] / 1e9 * 1e3
                row[f"tflops_{key}"] = flops / ms / 1e9 if flops else None
                row[f"tflops_pct_{key}"] = 100 * flops / ms / 1e9 / peak if flops else None
                row[f"gbps_{key}"] = nbytes / ms / 1e6
                row[f"gbps_pct_{key}"] = 100 * nbytes / ms / 1e6 / ceil["copy_gbps"]
                row[f"roofline_pct_{key}"] = 100 * max(flops / peak / 1e9, byte_floor_ms) / ms
                row[f"byte_floor_x_{key}"] = ms / byte_floor_ms
                for baseline in cases.BASELINES:
                    base_ms = by_provider.get(baseline, {}).get(f"ms_{key}")
                    if base_ms is not None and row["status"] == "ok" and baseline != row["provider"]:
                        row[f"speedup_vs_{baseline}_{key}"] = base_ms / ms
            if row.get("ms_graph") is not None and row.get("ms_fwd_bwd") is not None:
                row["launch_overhead_ms"] = row["ms_fwd_bwd"] - row["ms_graph"]
    return report


# ---------------------------------------------------------------- markdown
def _fmt(value, spec, missing="—") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _ms(row: dict, key: str) -> str:
    """p50 with the p20–p80 range."""
    if row.get(f"ms_{key}") is None:
        return "—"
    return (f"{row[f'ms_{key}']:.3f} ({_fmt(row.get(f'p20_{key}'), '.3f')}–"
            f"{_fmt(row.get(f'p80_{key}'), '.3f')})")


def _mib(nbytes) -> str:
    """MiB, or KiB below one (the CPU's tiny cases)."""
    if nbytes is None:
        return "—"
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"


def _speedup(row: dict, baseline: str, key: str = "fwd_bwd") -> str:
    if row["provider"] == baseline:
        return "baseline"
    if row["status"] == "wrong":
        return "wrong result"
    value = row.get(f"speedup_vs_{baseline}_{key}")
    return "—" if value is None else f"{value:.2f}×"


def _baselines(entries) -> list[str]:
    present = {row["provider"] for entry in entries for row in entry["rows"]}
    return [b for b in cases.BASELINES if b in present]


def _short(text: str, limit: int = 100) -> str:
    """One line of at most `limit` characters for a table cell (the JSON keeps the whole message)."""
    line = (text.strip().splitlines() or [""])[0]
    return _cell(line if len(line) <= limit else line[:limit - 1] + "…")


def _status_cell(row: dict) -> str:
    if row["status"] in ("error", "skipped") and row.get("error"):
        return f"{row['status']}: {_short(row['error'])}"
    extra = [f"{key}: {_short(why, 60)}" for key, why in row.get("errors", {}).items()]
    return row["status"] + (f" ({'; '.join(extra)})" if extra else "")


def _table(columns: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"] + ["| " + " | ".join(r) + " |"
                                                                             for r in rows]


def render_markdown(report: dict) -> str:
    meta = report["meta"]
    gpu = meta.get("kind") == "cuda"
    out = [f"# hadamard_kernels benchmarks: {meta['device']}, {meta.get('time_utc', '?')}", ""]
    if not gpu:
        out += [CPU_BANNER, ""]
    out.append(f"- commit `{meta['commit']}`; torch {meta.get('torch')}, triton {meta.get('triton')}, CUDA "
               f"{meta.get('cuda')}, Python {meta.get('python')}")
    out.append(f"- timer: {meta.get('timing')}; p50 (p20–p80) in ms")
    if gpu:
        ceil = report["ceilings"]
        out.append(f"- measured ceilings: bf16 matmul {ceil['matmul_tflops_bf16']:.1f} TFLOP/s, fp32 matmul (TF32 "
                   f"off) {ceil['matmul_tflops_fp32']:.1f} TFLOP/s, device copy {ceil['copy_gbps']:.0f} GB/s "
                   "(read + write)")
        out.append(f"- flash-linear-attention (provider fla): {meta.get('fla') or 'not installed (fla rows skipped)'}")
        if meta.get("cuda_wgmma"):
            out.append("- cuda rows of poly_chain: the Hopper (wgmma) forward, HADAMARD_KERNELS_CUDA_WGMMA=1")
    for name, label in (("build_rc", "CUDA extension build"), ("memcheck_rc", "compute-sanitizer memcheck")):
        if meta.get(name) is not None:
            value = str(meta[name])
            out.append(f"- {label}: {'ok' if value == '0' else f'exit status {value}' if value.isdigit() else value}")
    if (tests := meta.get("gpu_tests")) is not None:
        rc = f" (exit status {tests['rc']})" if tests.get("rc") is not None else ""
        out.append(f"- GPU tests (`pytest -m cuda tests`): {tests['summary']}{rc}")
    out.append(f"- {meta.get('tests', 0)} benchmark tests recorded over {meta.get('sessions', 0)} session(s)"
               + (f"; **{len(report['pending'])} not run yet** (time budget): run the same command again to continue"
                  if report.get("pending") else "; complete"))
    out.append("")
    if gpu:
        out += ["TFLOP/s counts model FLOPs, GB/s compulsory bytes:", ""]
        out += [f"- {c}" for c in dict.fromkeys(e["case"]["counting"] for e in report["cases"])]
        out += ["", "% of ceiling: TFLOP/s over the matmul ceiling of the case's dtype, GB/s over the copy bandwidth. "
                "Speedups are baseline ms / provider ms (fwd+bwd); a provider whose error exceeds the tolerance is "
                "marked wrong and gets none. Saved: bytes autograd keeps for the backward (in brackets: beyond the "
                "inputs). Error cells are one line; the JSON holds the full messages.", ""]
        out += _summary(report) + [""]
        if goal_rows := goals(report):
            out += _goals_table(goal_rows) + [""]
        if table := auto_table(report):
            out += _auto_table_lines(table) + [""]
    fixed = [e for e in report["cases"] if not e["case"].get("sweep")]
    for entry in fixed:
        out += _case_table(entry, gpu) + [""]
    sweeps = [e for e in report["cases"] if e["case"].get("sweep")]
    if sweeps:
        out += _sweep_tables(sweeps)
    graphs = [(e, r) for e in report["cases"] for r in e["rows"] if r.get("ms_graph") is not None]
    if graphs:
        out += ["## Per-call overhead: fwd+bwd from a CUDA graph", "",
                "The graph replays the same kernels without the host's launch and dispatch work; the difference is "
                "what each call costs beyond its kernels.", ""]
        out += _table(["case", "provider", "ms fwd+bwd", "ms from a CUDA graph", "overhead ms", "overhead %"],
                      [[e["case"]["id"], r["provider"], _fmt(r.get("ms_fwd_bwd"), ".3f"), _fmt(r["ms_graph"], ".3f"),
                        _fmt(r.get("launch_overhead_ms"), ".3f"),
                        _fmt(None if r.get("launch_overhead_ms") is None or not r.get("ms_fwd_bwd")
                             else 100 * r["launch_overhead_ms"] / r["ms_fwd_bwd"], ".0f")] for e, r in graphs])
        out.append("")
    if tests and tests.get("failed"):
        out += ["## GPU test failures", ""] + [f"- `{name}`" for name in tests["failed"][:100]]
        if len(tests["failed"]) > 100:
            out.append(f"- ... and {len(tests['failed']) - 100} more (see the tests log)")
        out.append("")
    return "\n".join(out)


def _best_ours(entry, key: str = "fwd_bwd") -> dict | None:
    ours = [r for r in entry["rows"] if r["provider"] not in cases.BASELINES and r["status"] == "ok"
            and r.get(f"ms_{key}") is not None]
    return min(ours, key=lambda r: r[f"ms_{key}"]) if ours else None


def _rate(row: dict, key: str = "fwd_bwd") -> str:
    """TFLOP/s (% of the matmul ceiling) where the case counts FLOPs, else GB/s (% of the copy bandwidth)."""
    if row.get(f"tflops_{key}") is not None:
        return f"{row[f'tflops_{key}']:.3g} TFLOP/s ({row[f'tflops_pct_{key}']:.0f}%)"
    if row.get(f"gbps_{key}") is not None:
        return f"{row[f'gbps_{key}']:.3g} GB/s ({row[f'gbps_pct_{key}']:.0f}%)"
    return "—"


# ---------------------------------------------------------------- the issues' goals
def _goal_list(case: dict) -> list[tuple[str, str, float]]:
    """(what, measure, threshold) of the goals the issues set for this case (bf16, fwd+bwd unless named): issue 19
    for poly_chain / poly_ncp (the forward at least torch.compile's speed and >= 60% of the bf16 matmul ceiling where
    GEMM-bound, >= 2x torch.compile where memory-bound (k <= 64); fwd+bwd peak memory below eager's and
    torch.compile's), issue 15 for linear attention (>= 2x fla, within 2x of the byte floor; not the decode steps,
    which the issue sets no goal for), issue 16 for poly_sa, issue 18 for poly_gate, issue 17 for lrnn. A measure is
    "<key>" of the best correct row of ours, "peak_ratio_<baseline>" (its fwd+bwd peak over the baseline's, goal
    < 1), "saved_extra_bytes" or "saved_ratio_inputs" (the bytes saved for the backward over the inputs' bytes)."""
    if case["dtype"] != "bf16" or case.get("sweep"):
        return []
    if case["op"] in ("poly_chain", "poly_ncp"):
        out = []
        if case["op"] == "poly_chain":
            if case["k"] <= 64:
                out.append(("fwd ≥ 2× torch.compile (memory-bound)", "speedup_vs_compiled_fwd", 2.0))
            else:
                out += [("fwd ≥ torch.compile", "speedup_vs_compiled_fwd", 1.0),
                        ("fwd ≥ 60% of the bf16 matmul ceiling", "tflops_pct_fwd", 60.0)]
        return out + [("fwd+bwd peak memory < eager's", "peak_ratio_eager", 1.0),
                      ("fwd+bwd peak memory < torch.compile's", "peak_ratio_compiled", 1.0)]
    if case["op"] == "linear_attention" and not case.get("decode"):
        return [("fwd+bwd ≥ 2× fla", "speedup_vs_fla_fwd_bwd", 2.0),
                ("fwd+bwd within 2× of the byte floor", "byte_floor_x_fwd_bwd", 2.0)]
    if case["op"] == "poly_sa":
        return [("fwd+bwd ≥ 2× torch.compile", "speedup_vs_compiled_fwd_bwd", 2.0),
                ("saved for the backward ≤ the inputs", "saved_ratio_inputs", 1.0)]
    if case["op"] == "poly_gate":
        return [("fwd+bwd ≥ 3× eager", "speedup_vs_eager_fwd_bwd", 3.0),
                ("fwd+bwd ≥ 1.5× torch.compile", "speedup_vs_compiled_fwd_bwd", 1.5),
                ("fwd+bwd ≥ 70% of the copy bandwidth", "gbps_pct_fwd_bwd", 70.0),
                ("saves nothing beyond a and b (and the parameters)", "saved_extra_bytes", 0.0)]
    if case["op"] in ("lrnn", "LRNN"):
        # Issue 17 bounds the activation part's memory by 1/dbar of eager's; the whole fwd+bwd peak is measured,
        # which the activations dominate at these shapes (inputs of 2 coordinates, small weights).
        return [("fwd+bwd ≥ 3× eager", "speedup_vs_eager_fwd_bwd", 3.0),
                ("fwd+bwd ≥ 2× torch.compile", "speedup_vs_compiled_fwd_bwd", 2.0),
                (f"fwd+bwd peak memory ≤ 1/dbar = 1/{case['dbar']} of eager's", "peak_ratio_eager",
                 1.0 / case["dbar"])]
    return []


def goals(report: dict) -> list[dict]:
    """Each goal of each GPU case against the fastest correct backend of ours (fwd+bwd): measured value, met or by how
    much it is missed; a goal nothing measured is listed as not measured."""
    out = []
    for entry in report["cases"]:
        best = _best_ours(entry)
        by_provider = {r["provider"]: r for r in entry["rows"]}
        for what, measure, threshold in _goal_list(entry["case"]):
            value = None
            if best is not None and measure.startswith("peak_ratio_"):
                base = by_provider.get(measure.removeprefix("peak_ratio_"), {}).get("peak_mib_fwd_bwd")
                mine = best.get("peak_mib_fwd_bwd")
                value = mine / base if mine is not None and base else None
            elif best is not None and measure == "saved_ratio_inputs":
                saved, inputs = best.get("saved_bytes"), entry["case"].get("input_bytes")
                value = saved / inputs if saved is not None and inputs else None
            elif best is not None:
                value = best.get(measure)
            lower_is_better = measure.startswith(("peak_ratio_", "byte_floor_x_", "saved_"))
            strict = measure.startswith("peak_ratio_") and threshold == 1.0  # "below the baseline's"
            met = None if value is None else (value < threshold if strict else
                                              value <= threshold if lower_is_better else value >= threshold)
            out.append(dict(case=entry["case"]["id"], goal=what, measure=measure, threshold=threshold, value=value,
                            met=met, backend=None if best is None else best["provider"]))
    return out


def _goal_value(g: dict) -> str:
    if g["value"] is None:
        return "not measured"
    if g["measure"] == "saved_extra_bytes":
        return _mib(g["value"])
    if g["measure"].startswith("peak_ratio_"):
        return f"{g['value']:.2f}× the baseline's"
    if g["measure"].startswith("byte_floor_x_"):
        return f"{g['value']:.2f}× the byte floor"
    if g["measure"] == "saved_ratio_inputs":
        return f"{g['value']:.2f}× the inputs"
    return f"{g['value']:.2f}" + ("%" if "pct" in g["measure"] else "×")


def _goals_table(rows: list[dict]) -> list[str]:
    cells = []
    for g in rows:
        if g["met"] is None:
            verdict = "—"
        elif g["met"]:
            verdict = "met"
        elif g["measure"] == "saved_extra_bytes":
            verdict = f"missed: {_mib(g['value'])} more"
        elif g["measure"].startswith("peak_ratio_"):
            verdict = f"missed: {100 * (g['value'] / g['threshold'] - 1):.0f}% more memory"
        elif g["measure"].startswith(("byte_floor_x_", "saved_")):
            verdict = f"missed: {100 * (g['value'] / g['threshold'] - 1):.0f}% over"
        else:
            verdict = f"missed: {100 * (1 - g['value'] / g['threshold']):.0f}% short"
        cells.append([g["case"], g["backend"] or "—", g["goal"], _goal_value(g), verdict])
    return (["## Goals of the issues (the fastest correct backend of ours)", ""]
            + _table(["case", "backend", "goal", "measured", "verdict"], cells))


# ---------------------------------------------------------------- auto's table, as measured
# The ops of _backend.AUTO_PREFERENCE whose speed each case measures (the module cases time the op inside them).
AUTO_OPS = {"poly_chain": ("poly_chain",), "CCP": ("poly_chain",), "poly_ncp": ("poly_ncp",), "NCP": ("poly_ncp",),
            "linear_attention": ("causal_linear_attention",), "poly_sa": ("poly_sa_pool", "poly_sa"),
            "poly_gate": ("poly_gate",), "lrnn": ("lrnn_product",), "LRNN": ("lrnn_product",)}
# The name a GPU test's id carries for each op (its file or test name).
_TEST_FAMILY = {"poly_chain": "poly_chain", "poly_ncp": "poly_ncp", "causal_linear_attention": "linear_attention",
                "poly_sa_pool": "poly_sa", "poly_sa": "poly_sa", "poly_gate": "poly_gate", "lrnn_product": "lrnn"}
AUTO_BACKENDS = ("triton", "cuda")  # what auto picks among; cuda-wgmma is the cuda backend with an opt-in
_OPT_IN = {"cuda-wgmma": "cuda"}


def _gpu_test_failures(meta: dict, op: str, backend: str) -> int | None:
    """Failed GPU tests of this op that concern the backend (one that names no backend counts against each), or
    None where the GPU tests gave no verdict (not run, interrupted: pytest's exit status other than 0 or 1)."""
    tests = meta.get("gpu_tests")
    if tests is None or str(tests.get("rc")) not in ("0", "1"):
        return None
    named = re.compile(r"(?<![a-z])(cuda|wgmma|triton)(?![a-z])")
    count = 0
    for test in tests.get("failed", []):
        if _TEST_FAMILY[op] not in test:
            continue
        backends = {"cuda" if m == "wgmma" else m for m in named.findall(test)}
        count += backend in backends or not backends
    return count


def auto_table(report: dict) -> list[dict]:
    """Per op of _backend.AUTO_PREFERENCE that the run timed: each backend's correct / timed cases, the cases it was
    fastest in, its score (geometric mean over the op's cases of its time over the fastest correct backend's, fwd+bwd
    or the forward for forward-only cases; 1.0 = fastest everywhere) and its GPU test failures; and the order this
    suggests. DESIGN.md's rule: a backend is ranked only once its GPU tests passed and it was correct in every case it
    ran; those are ordered by score, and a backend of today's table that is not ranked stays behind them (auto must
    not fall back to the reference for a CUDA tensor it supports). Without a verdict of the GPU tests, today's order."""
    from hadamard_kernels import _backend

    meta = report["meta"]
    by_op: dict[str, list[dict]] = {}
    for entry in report["cases"]:
        for op in AUTO_OPS.get(entry["case"]["op"], ()):
            by_op.setdefault(op, []).append(entry)
    out = []
    for op, entries in by_op.items():
        stats = {b: dict(backend=b, ok=0, timed=0, fastest=0, ratios=[]) for b in (*AUTO_BACKENDS, *_OPT_IN)}
        for entry in entries:
            key = chart.headline_key(entry)
            rows = {r["provider"]: r for r in entry["rows"] if r["provider"] in stats}
            ok = {p: r[f"ms_{key}"] for p, r in rows.items() if r["status"] == "ok" and r.get(f"ms_{key}")}
            for p, r in rows.items():
                stats[p]["timed"] += r["status"] != "skipped"
                stats[p]["ok"] += p in ok
                if p in ok:
                    stats[p]["ratios"].append(ok[p] / min(ok.values()))
                    stats[p]["fastest"] += ok[p] == min(ok.values())
        current = tuple(_backend.AUTO_PREFERENCE.get(op, _backend.DEFAULT_PREFERENCE))
        rows, ranked = [], []
        for b, st in stats.items():
            if not st["timed"]:
                continue
            ratios = st.pop("ratios")
            st["score"] = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None
            st["gpu_test_failures"] = _gpu_test_failures(meta, op, _OPT_IN.get(b, b))
            st["qualified"] = (st["ok"] == st["timed"] and st["gpu_test_failures"] == 0)
            rows.append(st)
            if st["qualified"] and b in AUTO_BACKENDS:
                ranked.append(st)
        if any(r["gpu_test_failures"] is None for r in rows):
            suggested, reason = current, "the GPU tests gave no verdict: today's order"
        else:
            by_score = tuple(r["backend"] for r in sorted(ranked, key=lambda r: r["score"]))
            unranked = tuple(b for b in current if b not in by_score)
            suggested = by_score + unranked
            reason = "ranked by score" + (f"; not ranked, kept behind: {', '.join(unranked)}" if unranked else "")
        out.append(dict(op=op, cases=len(entries), rows=rows, current=current, suggested=suggested, reason=reason))
    return out


def _auto_table_lines(table: list[dict]) -> list[str]:
    cells = []
    for t in table:
        for r in t["rows"]:
            failures = r["gpu_test_failures"]
            cells.append([t["op"], r["backend"] + (" (opt-in)" if r["backend"] in _OPT_IN else ""),
                          f"{r['ok']} / {r['timed']} of {t['cases']}", str(r["fastest"]), _fmt(r["score"], ".2f"),
                          "no verdict" if failures is None else "passed" if failures == 0 else f"{failures} failed"])
    lines = ["## Auto's table, as measured", "",
             "A backend leads auto's choice for an op only once its GPU tests passed and it measured fastest "
             "(DESIGN.md). Score: the geometric mean over the cases that time the op of the backend's time over the "
             "fastest correct backend's (fwd+bwd; the forward for forward-only cases); 1.00 is fastest in every case. "
             "Ranked: correct in every case it ran and no failed GPU test of the op naming it (or no backend).", ""]
    lines += _table(["op", "backend", "correct / timed", "fastest in", "score", "GPU tests"], cells)
    lines += ["", "Suggested `AUTO_PREFERENCE` (hadamard_kernels/_backend.py):", "", "```python",
              "AUTO_PREFERENCE = {"]
    lines += [f"    {t['op']!r}: {t['suggested']!r},  # {t['reason']}"
              + ("" if t["suggested"] == t["current"] else f"; today {t['current']!r}") for t in table]
    return lines + ["}", "```"]


def _summary(report) -> list[str]:
    fixed = [e for e in report["cases"] if not e["case"].get("sweep")]
    baselines = _baselines(fixed)
    columns = ["case", "best of ours", "ms fwd+bwd", "rate (% of ceiling)", "peak MiB (eager / compiled)",
               "saved (eager)", *(f"vs {b}" for b in baselines)]
    rows = []
    for entry in fixed:
        key = chart.headline_key(entry)
        best = _best_ours(entry, key)
        if best is None:
            statuses = ", ".join(f"{r['provider']} {r['status']}" for r in entry["rows"]
                                 if r["provider"] not in cases.BASELINES)
            rows.append([entry["case"]["id"], f"none correct ({_cell(statuses)})"] + ["—"] * (len(columns) - 2))
            continue
        peak = f"peak_mib_{key}"
        eager, compiled = ({peak: None, **next((r for r in entry["rows"] if r["provider"] == p), {})}
                           for p in ("eager", "compiled"))
        ms = _fmt(best[f"ms_{key}"], ".3f") + (" (fwd)" if key == "fwd" else "")
        rows.append([entry["case"]["id"], best["provider"], ms, _rate(best, key),
                     f"{_fmt(best.get(peak), '.0f')} ({_fmt(eager[peak], '.0f')} / {_fmt(compiled[peak], '.0f')})",
                     f"{_mib(best.get('saved_bytes'))} ({_mib(eager.get('saved_bytes'))})",
                     *(_speedup(best, b, key) for b in baselines)])
    return ["## Summary: the fastest correct hadamard_kernels backend per case (forward+backward; forward alone for "
            "a case timed forward only, marked (fwd))", ""] + _table(columns, rows)


def _case_table(entry, gpu: bool) -> list[str]:
    c = entry["case"]
    lines = [f"## {c['id']}: {c['shape']} ({c['options']})", ""]
    if c.get("eager"):
        lines += [f"eager: {c['eager']}", ""]
    baselines = _baselines([entry]) if gpu else []
    unit = "ms" if gpu else "CPU ms"
    keys = [k for k in ("fwd", "bwd", "fwd_bwd") if any(r.get(f"ms_{k}") is not None for r in entry["rows"])]
    columns = ["provider", "status", "rel err fwd / bwd", *(f"{unit} {k.replace('_', '+')}" for k in keys)]
    if gpu:
        columns += ["rate fwd+bwd (% of ceiling)", "peak MiB fwd+bwd"]
    columns += ["saved (beyond inputs)", *(f"vs {b}" for b in baselines)]
    rows = []
    for row in entry["rows"]:
        if row["status"] in ("error", "skipped") and not any(row.get(f"ms_{k}") is not None for k in keys):
            rows.append([row["provider"], _status_cell(row)] + ["—"] * (len(columns) - 2))
            continue
        err = (f"{_fmt(row.get('rel_err_fwd'), '.1e')} / {_fmt(row.get('rel_err_bwd'), '.1e')}")
        cells = [row["provider"], _status_cell(row), err, *(_ms(row, k) for k in keys)]
        if gpu:
            cells += [_rate(row), _fmt(row.get("peak_mib_fwd_bwd"), ".1f")]
        cells += [f"{_mib(row.get('saved_bytes'))} ({_mib(row.get('saved_extra_bytes'))})",
                  *(_speedup(row, b) for b in baselines)]
        rows.append(cells)
    return lines + _table(columns, rows)


def sweep_series(entries) -> dict[str, dict]:
    """{op: {"axis", "dtype", "points": {provider: [(x, ms fwd+bwd)]}}} of the sweep cases (correct rows only)."""
    out: dict[str, dict] = {}
    for entry in entries:
        c = entry["case"]
        series = out.setdefault(c["op"], {"axis": c["sweep"], "label": c["shape"], "points": {}})
        for row in entry["rows"]:
            if row["status"] == "ok" and row.get("ms_fwd_bwd") is not None:
                series["points"].setdefault(row["provider"], []).append((c["sweep_x"], row["ms_fwd_bwd"]))
    for series in out.values():
        for points in series["points"].values():
            points.sort()
    return out


def _sweep_tables(entries) -> list[str]:
    lines = ["## Size sweeps (fwd+bwd, ms p50)", ""]
    by_op: dict[str, list] = {}
    for entry in entries:
        by_op.setdefault(entry["case"]["op"], []).append(entry)
    for op, group in by_op.items():
        providers = [p for p in cases.PROVIDERS if any(r["provider"] == p for e in group for r in e["rows"])]
        lines += [f"### {op}: time against {group[0]['case']['sweep']}", ""]
        rows = []
        for entry in sorted(group, key=lambda e: e["case"]["sweep_x"]):
            by_provider = {r["provider"]: r for r in entry["rows"]}
            rows.append([entry["case"]["shape"], *(_sweep_cell(by_provider.get(p)) for p in providers)])
        lines += _table(["shape", *providers], rows) + [""]
    return lines


def _sweep_cell(row) -> str:
    if row is None:
        return "—"
    if row["status"] in ("error", "skipped", "wrong") and row.get("ms_fwd_bwd") is None:
        return row["status"]
    return _fmt(row.get("ms_fwd_bwd"), ".3f") + (" (wrong)" if row["status"] == "wrong" else "")


# ---------------------------------------------------------------- README and files
def readme_block(report: dict, results_link: str) -> str:
    """The README's results block: device, date, commit, the summary table and links."""
    meta = report["meta"]
    lines = [README_BEGIN, "",
             f"Latest recorded run: **{meta['device']}**, {meta.get('time_utc')}, commit `{meta['commit']}` "
             f"([tables]({results_link}.md), [chart]({results_link}.svg)"
             + (f", [sweeps]({results_link}-sweeps.svg)" if any(e["case"].get("sweep") for e in report["cases"])
                else "") + ")."
             + (f" Partial: {len(report['pending'])} benchmark tests not run yet." if report.get("pending") else ""),
             ""]
    lines += _summary(report)[2:]
    if goal_rows := goals(report):
        met = sum(g["met"] is True for g in goal_rows)
        missed = sum(g["met"] is False for g in goal_rows)
        lines += ["", f"Goals of the issues: {met} met, {missed} missed, {len(goal_rows) - met - missed} not measured "
                      f"([by how much]({results_link}.md#goals-of-the-issues-the-fastest-correct-backend-of-ours))."]
    lines += ["", README_END]
    return "\n".join(lines)


def update_readme(readme: Path, block: str) -> bool:
    """Replaces the text between the README's markers with `block`; False (README untouched) without the markers."""
    text = readme.read_text()
    pattern = re.compile(re.escape(README_BEGIN) + r".*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        return False
    readme.write_text(pattern.sub(lambda _: block, text, count=1))
    return True


def results_stem(meta: dict) -> str:
    """<device>-<UTC time>-<commit>: unique per run (the time the report is written, else the last session's), so
    runs never overwrite each other."""
    when = re.sub(r"[^0-9TZ]", "", meta.get("written_utc") or meta.get("time_utc", "")) or "unknown-time"
    device = "cpu" if meta.get("kind") == "cpu" else meta["device"]
    return "-".join(re.sub(r"[^A-Za-z0-9+]+", "-", part).strip("-") for part in (device, when, meta["commit"]))


def write_report(report: dict, out_dir: Path, copy_to: Path | None = None) -> list[Path]:
    """Writes <stem>.json, <stem>.md, <stem>.svg and, with sweeps, <stem>-sweeps.svg into out_dir (and copies them into
    copy_to); returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = results_stem(report["meta"])
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md", out_dir / f"{stem}.svg"]
    paths[0].write_text(json.dumps(report, indent=1, default=str) + "\n")
    md = render_markdown(report) + f"\n![{'CPU times' if report['meta'].get('kind') == 'cpu' else 'chart'}]" \
                                   f"({stem}.svg)\n"
    paths[2].write_text(chart.render_svg(report))
    sweeps = sweep_series([e for e in report["cases"] if e["case"].get("sweep")])
    if sweeps:
        paths.append(out_dir / f"{stem}-sweeps.svg")
        paths[3].write_text(chart.render_sweeps_svg(report, sweeps))
        md += f"\n![size sweeps]({stem}-sweeps.svg)\n"
    paths[1].write_text(md)
    if copy_to is not None:
        copy_to.mkdir(parents=True, exist_ok=True)
        for path in paths:
            shutil.copy(path, copy_to / path.name)
    return paths


SHARD_MARK = "=== shard "  # run_gpu.sh starts each parallel test process's part of the log with "=== shard K/M"
_NO_SUMMARY = "no pytest summary line (interrupted or crashed?)"


def _pytest_summary(lines: list[str]) -> str | None:
    return next((line for line in reversed(lines)
                 if re.search(r"\b(passed|failed|error|errors|skipped|deselected|no tests ran)\b", line)
                 and re.search(r"\bin [\d.]+s\b", line)), None)


def parse_pytest_log(text: str) -> dict:
    """The final summary line of `pytest -q` output ("2 failed, 118 passed in 95.1s") and the FAILED/ERROR test ids
    of its short summary. A log of several shards (parts headed by SHARD_MARK lines) gets one summary of them all:
    the counts added up (deselected left out: each shard deselects the others' tests), the longest shard's time, and
    the shards that printed no summary."""
    lines = [line.strip().strip("=").strip() for line in text.splitlines()]
    failed = [line.split(" - ")[0] for line in lines if line.startswith(("FAILED ", "ERROR "))]
    starts = [i for i, line in enumerate(text.splitlines()) if line.startswith(SHARD_MARK)]
    if not starts:
        return {"summary": _pytest_summary(lines) or _NO_SUMMARY, "failed": failed}
    counts: dict[str, int] = {}
    seconds, missing = 0.0, []
    for start, end in zip(starts, [*starts[1:], len(lines)]):
        summary = _pytest_summary(lines[start + 1:end])
        if summary is None:
            missing.append(lines[start].removeprefix("shard "))
            continue
        for number, kind in re.findall(r"(\d+) (failed|passed|skipped|errors?|xfailed|xpassed)\b", summary):
            kind = "error" if kind == "errors" else kind
            counts[kind] = counts.get(kind, 0) + int(number)
        seconds = max(seconds, float(re.search(r"\bin ([\d.]+)s\b", summary).group(1)))
    summary = ", ".join(f"{n} {kind}{'s' if kind == 'error' and n != 1 else ''}" for kind, n in counts.items())
    summary = f"{summary or 'no tests ran'} in {seconds:.2f}s ({len(starts)} shards in parallel; the longest)"
    if missing:
        summary += f"; no summary line from shard {', '.join(missing)} (interrupted or crashed?)"
    return {"summary": summary, "failed": failed}
