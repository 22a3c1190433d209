#!/usr/bin/env python
"""Side-by-side GPU benchmark of every provider on every case (benchmarks/cases.py), in one process.

First the device ceilings (8192^3 bf16 and fp32 matmul TFLOP/s, a 1 GiB device copy in GB/s counting bytes read +
written). Then per case and provider (each family's own: fla only for linear attention): the relative error of the
output and of every gradient against the float64 reference, checked before anything is timed; forward and
forward+backward time (triton.testing.do_bench, median); peak memory; TFLOP/s, GB/s, % of the roofline those
ceilings allow and the time over the byte floor; speedup vs eager, vs torch.compile (and vs flash-linear-attention).
A provider that raises is recorded as an error row, one that cannot run here (fla not installed) as skipped with
the reason, one above the tolerance as "wrong" (timed, but given no speedup). Writes
benchmarks/results/<device>-<date>.json, .md and .svg (the speedups as a chart).
Needs a CUDA GPU (exit status 2 without one).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import cases
import chart
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_OUT = HERE / "results"
TIMED_MODES = {"fwd": "fwd", "fwd_bwd": "fwd+bwd"}  # JSON key suffix -> cases.MODES entry
DO_BENCH = dict(warmup=25, rep=100)  # ms; triton.testing.do_bench flushes L2 between repetitions

Timer = Callable[[Callable[[], None]], float]  # step -> milliseconds


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Run from anywhere; `bash benchmarks/run_gpu.sh` runs this after the build "
                                       "and the GPU tests.")
    p.add_argument("--quick", action="store_true", help="a few cases (one or two per family) instead of all")
    p.add_argument("--ops", default=",".join(cases.OPS), help=f"comma-separated subset of {','.join(cases.OPS)}")
    p.add_argument("--providers", default=",".join(cases.PROVIDERS),
                   help=f"comma-separated subset of {','.join(cases.PROVIDERS)}")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default: benchmarks/results)")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="start no new case after S seconds; the rest are recorded as skipped")
    p.add_argument("--tests-log", type=Path, help="pytest output of the GPU tests, summarised in the results")
    p.add_argument("--tests-rc", type=int, help="exit status of that pytest run")
    p.add_argument("--build-rc", type=int, help="exit status of the CUDA extension build")
    p.add_argument("--copy-to", type=Path, help="also copy the .json and .md written here (e.g. $OUT)")
    p.add_argument("--list", action="store_true", help="print the selected cases and exit (no GPU needed)")
    p.add_argument("--print-stem", action="store_true", help="print the results file stem <device>-<date> and exit")
    args = p.parse_args(argv)
    args.ops = _subset("--ops", args.ops, cases.OPS, p)
    args.providers = _subset("--providers", args.providers, cases.PROVIDERS, p)
    return args


def _subset(flag, value, allowed, parser):
    chosen = [v for v in value.split(",") if v]
    if unknown := [v for v in chosen if v not in allowed]:
        parser.error(f"{flag}: unknown {unknown}; choose from {','.join(allowed)}")
    return chosen


def select_cases(args) -> list[cases.AnyCase]:
    """The cases of the chosen ops that at least one chosen provider applies to."""
    return [c for c in cases.all_cases(quick=args.quick)
            if c.op in args.ops and any(p in c.providers for p in args.providers)]


# ---------------------------------------------------------------- measuring (GPU)
def do_bench_ms(step: Callable[[], None]) -> float:
    import triton.testing

    return triton.testing.do_bench(step, return_mode="median", **DO_BENCH)


def measure_ceilings(timer: Timer) -> dict:
    """Large bf16 / fp32 (TF32 off) matmul TFLOP/s and device-to-device copy GB/s (bytes read + written)."""
    ceilings = dict(matmul_tflops_bf16=_matmul_tflops(timer, torch.bfloat16),
                    matmul_tflops_fp32=_matmul_tflops(timer, torch.float32), copy_gbps=_copy_gbps(timer))
    torch.cuda.empty_cache()
    return ceilings


def _matmul_tflops(timer: Timer, dtype: torch.dtype, n: int = 8192) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
    return 2 * n**3 / timer(lambda: a @ b) / 1e9


def _copy_gbps(timer: Timer, nbytes: int = 2**30) -> float:
    src = torch.empty(nbytes, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    return 2 * nbytes / timer(lambda: dst.copy_(src)) / 1e6


def run_case(case: cases.AnyCase, providers, timer: Timer, memory: Callable[[Callable[[], None]], float],
             device="cuda") -> dict:
    """Rows for every provider on `case`: accuracy first, then the timed modes. Never raises for a provider."""
    rows = []
    for provider in providers:
        row = {"provider": provider}
        try:
            work = cases.make_workload(case, provider, device)
            accuracy = cases.check_accuracy(case, work, device)  # also compiles / autotunes
            row.update(rel_err_fwd=accuracy["rel_err_fwd"], rel_err_bwd=accuracy["rel_err_bwd"],
                       status="ok" if accuracy["accurate"] else "wrong")
            for key, mode in TIMED_MODES.items():
                step = cases.make_step(work, mode)
                step()  # warm-up outside the timer: the first no-grad forward compiles its own graph
                row[f"peak_mib_{key}"] = memory(step)
                row[f"ms_{key}"] = timer(step)
        except cases.ProviderUnavailable as exc:
            row.update(status="skipped", error=str(exc))
        except Exception as exc:  # recorded, so one failing provider does not end the run
            row.update(status="error", error=f"{type(exc).__name__}: {exc}".strip(),
                       traceback=traceback.format_exc(limit=-8))
        finally:
            work = step = None  # free this provider's tensors (and compiled graphs) before the next one
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        print(f"  {case.id:<32} {provider:<9} {_row_line(row)}", flush=True)
    return {"case": case.describe(), "rows": rows}


def _row_line(row) -> str:
    if row["status"] in ("error", "skipped"):
        return f"{row['status']}: " + row["error"].splitlines()[0][:160]
    return (f"{row['status']:<6} err {row['rel_err_fwd']:.1e}/{row['rel_err_bwd']:.1e}  "
            f"fwd {row['ms_fwd']:.3f} ms  fwd+bwd {row['ms_fwd_bwd']:.3f} ms")


# ---------------------------------------------------------------- derived numbers (pure, tested on CPU)
def derive(report: dict) -> dict:
    """Adds to every timed row: tflops_*, gbps_*, roofline_pct_* (time the ceilings allow / measured time),
    byte_floor_x_* (measured time / the time the compulsory bytes take at the copy bandwidth) and
    speedup_vs_<baseline>_* (baseline ms / row ms; only for rows whose result is correct)."""
    ceil = report["ceilings"]
    for entry in report["cases"]:
        case = entry["case"]
        peak_tflops = ceil["matmul_tflops_fp32" if case["dtype"] == "fp32" else "matmul_tflops_bf16"]
        by_provider = {row["provider"]: row for row in entry["rows"]}
        for row in entry["rows"]:
            for key in TIMED_MODES:
                ms = row.get(f"ms_{key}")
                if ms is None:
                    continue
                flops, nbytes = case[f"flops_{key}"], case[f"bytes_{key}"]
                row[f"tflops_{key}"] = flops / ms / 1e9
                row[f"gbps_{key}"] = nbytes / ms / 1e6
                byte_floor_ms = nbytes / ceil["copy_gbps"] / 1e6
                row[f"roofline_pct_{key}"] = 100 * max(flops / peak_tflops / 1e9, byte_floor_ms) / ms
                row[f"byte_floor_x_{key}"] = ms / byte_floor_ms
                for baseline in cases.BASELINES:
                    base_ms = by_provider.get(baseline, {}).get(f"ms_{key}")
                    if base_ms is not None and row["status"] == "ok":
                        row[f"speedup_vs_{baseline}_{key}"] = base_ms / ms
    return report


# ---------------------------------------------------------------- writing (pure, tested on CPU)
def results_stem(device_name: str, date: str) -> str:
    return f"{re.sub(r'[^A-Za-z0-9]+', '-', device_name).strip('-')}-{date}"


def parse_pytest_log(text: str) -> dict:
    """The final summary line of `pytest -q` output ("2 failed, 118 passed in 95.1s") and the FAILED/ERROR
    test ids of its short summary."""
    lines = [line.strip().strip("=").strip() for line in text.splitlines()]
    summary = next((line for line in reversed(lines)
                    if re.search(r"\b(passed|failed|error|errors|skipped|deselected|no tests ran)\b", line)
                    and re.search(r"\bin [\d.]+s\b", line)), None)
    failed = [line.split(" - ")[0] for line in lines if line.startswith(("FAILED ", "ERROR "))]
    return {"summary": summary or "no pytest summary line (interrupted or crashed?)", "failed": failed}


def _fmt(value, spec, missing="—"):
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _times(value, spec=".2f") -> str:
    return _fmt(value, spec) + ("" if value is None else "×")


def _speedups(row, baseline) -> str:
    if row["status"] == "wrong":
        return "wrong result"
    fwd, both = row.get(f"speedup_vs_{baseline}_fwd"), row.get(f"speedup_vs_{baseline}_fwd_bwd")
    if fwd is None and both is None:
        return "—"
    return f"{_fmt(fwd, '.2f')}× / {_fmt(both, '.2f')}×"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(report: dict) -> str:
    meta, ceil = report["meta"], report["ceilings"]
    out = [f"# hadamard_kernels benchmarks: {meta['device']}, {meta['date']}", ""]
    out.append(f"- commit `{meta['commit']}`; torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, "
               f"Python {meta['python']}")
    out.append(f"- timing: {meta['timing']}")
    if "fla" in meta:
        out.append(f"- flash-linear-attention (provider fla): {meta['fla'] or 'not installed (fla rows skipped)'}")
    out.append(f"- ceilings: bf16 matmul {ceil['matmul_tflops_bf16']:.1f} TFLOP/s, fp32 matmul (TF32 off) "
               f"{ceil['matmul_tflops_fp32']:.1f} TFLOP/s, device copy {ceil['copy_gbps']:.0f} GB/s (read + write)")
    if (build_rc := meta.get("build_rc")) is not None:
        out.append(f"- CUDA extension build: {'ok' if build_rc == 0 else f'FAILED (exit status {build_rc})'}")
    if (tests := meta.get("tests")) is not None:
        rc = f" (exit status {tests['rc']})" if tests.get("rc") is not None else ""
        out.append(f"- GPU tests (`pytest -m cuda tests`): {tests['summary']}{rc}")
    if meta.get("note"):
        out.append(f"- {meta['note']}")
    out += ["", "TFLOP/s counts model FLOPs, GB/s compulsory bytes:", ""]
    out += [f"- {counting}" for counting in dict.fromkeys(entry["case"]["counting"] for entry in report["cases"])]
    out += ["", "% roofline = the time the ceilings allow for those FLOPs and bytes / the measured time; × byte "
            "floor = the measured time / the time the bytes take at the copy bandwidth. Speedups are baseline ms / "
            "provider ms, forward / forward+backward; a provider whose error exceeds the tolerance is marked wrong "
            "and gets none.", ""]
    out += _summary_table(report) + [""]
    for entry in report["cases"]:
        out += _case_table(entry) + [""]
    if tests and tests.get("failed"):
        out += ["## GPU test failures", ""] + [f"- `{name}`" for name in tests["failed"][:100]]
        if len(tests["failed"]) > 100:
            out.append(f"- ... and {len(tests['failed']) - 100} more (see the tests log)")
        out.append("")
    return "\n".join(out)


def _baselines(entries) -> list[str]:
    """The baselines that have a row in any of `entries` (eager and compiled always)."""
    present = {row["provider"] for entry in entries for row in entry["rows"]}
    return [b for b in cases.BASELINES if b in ("eager", "compiled") or b in present]


def _summary_table(report) -> list[str]:
    baselines = _baselines(report["cases"])
    columns = ["case", "backend", "ms fwd+bwd", "TFLOP/s", "% roofline", "× byte floor", "peak MiB",
               *(f"vs {b}" for b in baselines)]
    lines = ["## Summary: fastest correct hadamard_kernels backend per case (forward+backward)", "",
             "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for entry in report["cases"]:
        ours = [r for r in entry["rows"] if r["provider"] not in cases.BASELINES and r["status"] == "ok"
                and r.get("ms_fwd_bwd") is not None]
        if not ours:
            statuses = ", ".join(f"{r['provider']} {r['status']}" for r in entry["rows"]
                                 if r["provider"] not in cases.BASELINES)
            lines.append(f"| {entry['case']['id']} | none correct ({_cell(statuses)}) |" + " — |" * (len(columns) - 2))
            continue
        best = min(ours, key=lambda r: r["ms_fwd_bwd"])
        cells = [entry["case"]["id"], best["provider"], f"{best['ms_fwd_bwd']:.3f}",
                 _fmt(best.get("tflops_fwd_bwd"), ".3g"), _fmt(best.get("roofline_pct_fwd_bwd"), ".3g") + "%",
                 _times(best.get("byte_floor_x_fwd_bwd"), ".3g"), _fmt(best.get("peak_mib_fwd_bwd"), ".1f"),
                 *(_times(best.get(f"speedup_vs_{b}_fwd_bwd")) for b in baselines)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _case_table(entry) -> list[str]:
    c = entry["case"]
    baselines = _baselines([entry])
    columns = ["provider", "status", "rel err fwd / bwd", "ms fwd", "ms fwd+bwd", "TFLOP/s fwd+bwd", "GB/s fwd",
               "% roofline fwd+bwd", "× byte floor fwd+bwd", "peak MiB fwd / fwd+bwd", *(f"vs {b}" for b in baselines)]
    lines = [f"## {c['id']}: {c['shape']} ({c['options']})", ""]
    if c.get("eager"):
        lines += [f"eager: {c['eager']}", ""]
    lines += ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for row in entry["rows"]:
        if row["status"] in ("error", "skipped"):
            why = row.get("error", "").splitlines()[0][:200] if row.get("error") else ""
            lines.append(f"| {row['provider']} | {row['status']}{': ' + _cell(why) if why else ''} |"
                         + " — |" * (len(columns) - 2))
            continue
        cells = [row["provider"], row["status"], f"{row['rel_err_fwd']:.1e} / {row['rel_err_bwd']:.1e}",
                 _fmt(row.get("ms_fwd"), ".3f"), _fmt(row.get("ms_fwd_bwd"), ".3f"),
                 _fmt(row.get("tflops_fwd_bwd"), ".3g"), _fmt(row.get("gbps_fwd"), ".3g"),
                 _fmt(row.get("roofline_pct_fwd_bwd"), ".3g") + "%", _times(row.get("byte_floor_x_fwd_bwd"), ".3g"),
                 f"{_fmt(row.get('peak_mib_fwd'), '.1f')} / {_fmt(row.get('peak_mib_fwd_bwd'), '.1f')}",
                 *(_speedups(row, b) for b in baselines)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_report(report: dict, out_dir: Path, copy_to: Path | None = None) -> list[Path]:
    """Writes <stem>.json, <stem>.md and <stem>.svg into out_dir (and copies them into copy_to); returns their
    paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = results_stem(report["meta"]["device"], report["meta"]["date"])
    json_path, md_path, svg_path = (out_dir / f"{stem}.{ext}" for ext in ("json", "md", "svg"))
    json_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    md_path.write_text(render_markdown(report) + f"\n![speedup over eager]({svg_path.name})\n")
    svg_path.write_text(chart.render_svg(report))
    paths = [json_path, md_path, svg_path]
    if copy_to is not None:
        copy_to.mkdir(parents=True, exist_ok=True)
        for path in paths:
            shutil.copy(path, copy_to / path.name)
    return paths


# ---------------------------------------------------------------- main
def git_commit() -> str:
    """HEAD of the checkout (marked when tracked files differ), else $HADAMARD_KERNELS_COMMIT (for a copy of the
    tree without .git), else "unknown"."""
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("HADAMARD_KERNELS_COMMIT", "unknown (not a git checkout)")


def collect_meta(args) -> dict:
    import triton

    now = datetime.datetime.now(datetime.timezone.utc)
    props = torch.cuda.get_device_properties(0)
    meta = dict(device=torch.cuda.get_device_name(0), sms=props.multi_processor_count,
                memory_gib=round(props.total_memory / 2**30, 1), date=now.strftime("%Y-%m-%d"),
                time_utc=now.strftime("%H:%M:%S"), commit=git_commit(), torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                quick=args.quick, tf32=torch.backends.cuda.matmul.allow_tf32, fla=cases.fla_version(),
                timing=f"triton.testing.do_bench median (warmup {DO_BENCH['warmup']} ms, rep {DO_BENCH['rep']} ms, "
                       "L2 flushed between repetitions), TF32 off", build_rc=args.build_rc)
    if args.tests_log is not None:
        text = args.tests_log.read_text(errors="replace") if args.tests_log.is_file() else ""
        meta["tests"] = dict(parse_pytest_log(text), rc=args.tests_rc, log=args.tests_log.name)
    return meta


def main(argv=None) -> int:
    args = parse_args(argv)
    selected = select_cases(args)
    if args.list:
        for case in selected:
            print(f"{case.id:<46} {case.shape:<34} fwd {case.flops('fwd') / 1e9:8.2f} GFLOP "
                  f"{case.min_bytes('fwd') / 1e6:8.1f} MB  fwd+bwd {case.flops('fwd+bwd') / 1e9:8.2f} GFLOP "
                  f"{case.min_bytes('fwd+bwd') / 1e6:8.1f} MB  providers {','.join(case.providers)}")
        return 0
    if not torch.cuda.is_available():
        print("benchmarks/run.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured. "
              "Use --list to see the cases.", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 stays fp32 in every provider (DESIGN.md accuracy)
    meta = collect_meta(args)
    if args.print_stem:
        print(results_stem(meta["device"], meta["date"]))
        return 0
    print(f"{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  commit {meta['commit']}", flush=True)
    started = time.monotonic()
    ceilings = measure_ceilings(do_bench_ms)
    print("ceilings: " + ", ".join(f"{k} {v:.1f}" for k, v in ceilings.items()), flush=True)
    report = {"meta": meta, "ceilings": ceilings, "cases": []}
    for i, case in enumerate(selected):
        if args.time_budget is not None and time.monotonic() - started > args.time_budget:
            skipped = selected[i:]
            meta["note"] = (f"time budget of {args.time_budget:.0f} s reached: {len(skipped)} case(s) not run "
                            f"({', '.join(c.id for c in skipped)})")
            print(meta["note"], flush=True)
            break
        try:
            providers = [p for p in args.providers if p in case.providers]
            report["cases"].append(run_case(case, providers, do_bench_ms, cases.peak_mib))
        except KeyboardInterrupt:  # e.g. `timeout -s INT`: keep what was measured
            meta["note"] = f"interrupted during {case.id}; {len(selected) - i} case(s) not run"
            print(meta["note"], flush=True)
            break
    paths = write_report(derive(report), args.out, args.copy_to)
    print("\n" + render_markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
