#!/usr/bin/env python
"""Runs the benchmark suite (`pytest benchmarks/`) and reports from its measurements.

The suite records every test (one JSON line each) in benchmarks/results/partial/<device>-<commit>[-quick][-wgmma].jsonl
(-wgmma: run with HADAMARD_KERNELS_CUDA_WGMMA=1, the cuda rows of poly_chain then time its Hopper forward);
a run resumes that record (tests already in it are not run again; --fresh starts over), so a suite longer than one
sitting is done in several runs of the same command. Then the report is built from the whole record and written as
benchmarks/results/<device>-<UTC time>-<commit>.json, .md, .svg (and -sweeps.svg): unique names, so runs never
overwrite each other. A GPU run into the default folder also rewrites the README's results block.

On a machine without a GPU it runs the tiny CPU cases through the reference, the Triton interpreter and eager, and
labels every number as CPU time (a check that the pipeline runs, not kernel speed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cases
import report as report_mod

from hadamard_kernels import _backend

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_OUT = HERE / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Arguments after -- go to pytest.")
    p.add_argument("--quick", action="store_true", help="the quick cases (one or two per family; a CPU: fwd+bwd only)")
    p.add_argument("--ops", help=f"comma-separated subset of {','.join(cases.OPS)}")
    p.add_argument("--providers", help=f"comma-separated subset of {','.join(cases.PROVIDERS)}")
    p.add_argument("--part", metavar="K/M", help="run part K of M of the cases (every M-th case from the K-th)")
    p.add_argument("--time-budget", type=float, metavar="S", help="start no test after S seconds")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default: benchmarks/results)")
    p.add_argument("--fresh", action="store_true", help="start a new record instead of resuming this commit's")
    p.add_argument("--report", type=Path, nargs="+", metavar="RECORD",
                   help="measure nothing: write the report of these record files, merged (e.g. fetched from GPU runs)")
    p.add_argument("--readme", type=Path, default=None,
                   help="README whose results block a GPU report rewrites (default: the repository's, when writing "
                        "into benchmarks/results)")
    p.add_argument("--no-readme", action="store_true", help="leave the README alone")
    p.add_argument("--copy-to", type=Path, help="also copy the written files (and the record) here, e.g. $OUT")
    p.add_argument("--tests-log", type=Path, help="pytest output of the GPU tests, summarised in the results")
    p.add_argument("--tests-rc", help="exit status of that pytest run")
    p.add_argument("--build-rc", help="exit status of the CUDA extension build")
    p.add_argument("--memcheck-rc", help="exit status of the compute-sanitizer stage")
    p.add_argument("--list", action="store_true", help="print the selected cases and exit")
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.pytest_args = extra
    return args


def record_path(out: Path, device: str, commit: str, quick: bool) -> Path:
    meta = dict(kind="cpu" if device.startswith("CPU") else "cuda", device=device, commit=commit)
    stem = report_mod.results_stem(dict(meta, time_utc="")).replace("-unknown-time", "")
    wgmma = "-wgmma" if _backend.cuda_wgmma_requested() else ""  # another kernel behind the cuda rows: its own record
    return out / "partial" / f"{stem}{'-quick' if quick else ''}{wgmma}.jsonl"


def pytest_command(args, record: Path, benchmark_json: Path, time_budget: float | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", str(HERE), "-q", "-p", "no:cacheprovider", "-rfE",
           f"--bench-record={record}", f"--benchmark-json={benchmark_json}",
           "--benchmark-columns=median,iqr,rounds", "--benchmark-sort=name"]
    for flag, value in (("--bench-ops", args.ops), ("--bench-providers", args.providers),
                        ("--bench-part", args.part), ("--bench-time-budget", time_budget)):
        if value is not None:
            cmd.append(f"{flag}={value}")
    if args.quick:
        cmd.append("--bench-quick")
    return cmd + args.pytest_args


def stopped_early(record: Path) -> bool:
    """Whether the last pytest session on `record` stopped itself (after a CUDA error, conftest.py) rather than
    running out of tests or time."""
    last = [e["type"] for e in report_mod.read_record(record) if e.get("type") in ("plan", "stopped")]
    return bool(last) and last[-1] == "stopped"


def run_suite(cmd: list[str]) -> int:
    """Runs pytest and returns its exit status. On SIGINT (`timeout -s INT` signals the whole process group, as a
    terminal's Ctrl-C does) pytest gets it too: it stops after writing what it has, which is waited for here."""
    proc = subprocess.Popen(cmd, cwd=REPO)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        try:
            return proc.wait(timeout=60)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            proc.terminate()
            return proc.wait()


def stage_entry(args) -> dict | None:
    """The outcomes of run_gpu.sh's stages (build, GPU tests, memcheck) as a record line, so a report of a record
    resumed in a later call still shows them."""
    entry = {"type": "stages"}
    for name in ("build_rc", "memcheck_rc"):
        if getattr(args, name) is not None:
            entry[name] = getattr(args, name)
    if args.tests_log is not None:
        text = args.tests_log.read_text(errors="replace") if args.tests_log.is_file() else ""
        entry["gpu_tests"] = dict(report_mod.parse_pytest_log(text), rc=args.tests_rc, log=args.tests_log.name)
    return entry if len(entry) > 1 else None


def write_all(records: list[Path], args) -> list[Path]:
    """The report of one record, or of several merged (e.g. families measured in different runs; a test in
    several keeps its last result), and a copy of the merged record beside it (<stem>.record.jsonl: the raw data a
    later merge reads)."""
    entries = [e for record in records for e in report_mod.read_record(record)]
    report = report_mod.derive(report_mod.from_record(entries))
    if report["meta"].get("kind") == "unknown":
        print(f"{', '.join(map(str, records))}: no test has been recorded yet; nothing to report", file=sys.stderr)
        return []
    report["meta"]["written_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    paths = report_mod.write_report(report, args.out, args.copy_to)
    stem = report_mod.results_stem(report["meta"])
    raw = args.out / f"{stem}.record.jsonl"
    raw.write_text("".join(json.dumps(e, default=str) + "\n" for e in entries))
    paths.append(raw)
    if args.copy_to is not None:
        shutil.copy(raw, args.copy_to / raw.name)
    readme = args.readme or (REPO / "README.md" if args.out.resolve() == DEFAULT_OUT.resolve() else None)
    if report["meta"].get("kind") == "cuda" and readme is not None and not args.no_readme:
        link = os.path.relpath(args.out / stem, readme.parent)
        if report_mod.update_readme(readme, report_mod.readme_block(report, link)):
            print(f"rewrote the results block of {readme}")
        else:
            print(f"{readme} has no results block ({report_mod.README_BEGIN}); left alone")
    print("\n" + report_mod.render_markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths))
    return paths


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        return 0 if write_all(args.report, args) else 1
    import suite

    if args.list:  # the GPU cases wherever it runs, and a CPU's own when it has no GPU
        ops = tuple(args.ops.split(",")) if args.ops else cases.OPS
        listed = [("cuda", c) for c in cases.all_cases(quick=args.quick)]
        listed += [("cpu", c) for c in cases.cpu_cases()] if suite.DEVICE == "cpu" else []
        for device, case in listed:
            if case.op in ops:
                runs = " ".join(f"{p}:{m}" for p, m in case.runs(device))
                print(f"{device:<4} {case.id:<44} {case.shape:<44} fwd+bwd {case.flops('fwd+bwd') / 1e9:9.2f} GFLOP "
                      f"{case.min_bytes('fwd+bwd') / 1e6:9.1f} MB  {runs}")
        return 0
    record = record_path(args.out, suite.device_name(), suite.git_commit(), args.quick)
    if args.fresh and record.exists():
        record.rename(record.with_suffix(f".{int(time.time())}.old"))
    record.parent.mkdir(parents=True, exist_ok=True)
    if (stages := stage_entry(args)) is not None:
        with open(record, "a") as f:
            f.write(json.dumps(stages) + "\n")
    print(f"suite on {suite.device_name()}, commit {suite.git_commit()}; record {record}", flush=True)
    started = time.monotonic()
    benchmark_jsons, rcs = [], []
    for attempt in range(5):
        left = None if args.time_budget is None else args.time_budget - (time.monotonic() - started)
        if attempt and left is not None and left < 30:
            break
        benchmark_jsons.append(record.with_name(f"{record.stem}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
                                                ".pytest-benchmark.json"))
        rcs.append(run_suite(pytest_command(args, record, benchmark_jsons[-1], left)))
        print(f"pytest exit status {rcs[-1]} (1: a test failed; 2: stopped; 5: nothing left to run)", flush=True)
        if not stopped_early(record):
            break
        print("the suite stopped after a CUDA error; resuming in a fresh process", flush=True)
    if not record.is_file():
        print("no record was written", file=sys.stderr)
        return 1
    paths = write_all([record], args)
    if args.copy_to is not None:
        for extra in (record, *benchmark_jsons):
            if extra.is_file():
                (args.copy_to / extra.name).write_bytes(extra.read_bytes())
    pending = report_mod.from_record(report_mod.read_record(record))["pending"]
    if pending:
        print(f"{len(pending)} test(s) not run yet: run the same command again to continue", flush=True)
    return 0 if paths and all(rc in (0, 5) for rc in rcs) else 1


if __name__ == "__main__":
    sys.exit(main())
