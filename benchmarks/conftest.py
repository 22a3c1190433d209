"""pytest setup of the benchmark suite (`python -m pytest benchmarks`; `python -m pytest tests` never sees it).

- collects bench_*.py (one file per family; each names its ops in OPS) and parametrizes their test with the
  (case, provider, mode) triples of suite.params: the GPU cases on a GPU, the tiny CPU cases on a CPU;
- orders the tests by `suite.run_key` (every case's headline mode first, max-autotune last), then case by
  case (the quick cases of every family first), so a run cut short has covered every family;
- options: --bench-quick, --bench-ops, --bench-providers, --bench-part K/M (every M-th case from the K-th), a time
  budget after which no test starts (--bench-time-budget S), and --bench-record FILE: every test's result is appended
  to FILE as one JSON line when it ends (so an interrupted run keeps what it measured), and the tests FILE already
  holds are not run again (a run resumes where the last one stopped);
- adds the session's device, versions and ceilings to pytest-benchmark's JSON and machine info.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # A CPU runs the Triton kernels through the interpreter (set before any kernel module is imported), with each
    # kernel's first config (the interpreter would run every one).
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("HADAMARD_KERNELS_AUTOTUNE", "0")
    # One thread: tiny ops gain nothing from more, and on a shared machine spinning OpenMP threads of one test can
    # stretch another's calls a hundredfold.
    torch.set_num_threads(1)

import cases  # noqa: E402
import suite  # noqa: E402

BUDGET_SKIP = pytest.StashKey[bool]()


def pytest_addoption(parser):
    group = parser.getgroup("hadamard_kernels benchmarks")
    group.addoption("--bench-quick", action="store_true", help="the quick cases only (one or two per family)")
    group.addoption("--bench-ops", default=None, help=f"comma-separated subset of {','.join(cases.OPS)}")
    group.addoption("--bench-providers", default=None, help=f"comma-separated subset of {','.join(cases.PROVIDERS)}")
    group.addoption("--bench-part", default=None, metavar="K/M",
                    help="run part K of M: every M-th case starting from the K-th (1-based)")
    group.addoption("--bench-time-budget", type=float, default=None, metavar="S",
                    help="start no test after S seconds (the rest are skipped and left for the next run)")
    group.addoption("--bench-record", default=None, metavar="FILE",
                    help="append each test's result to FILE (JSON lines) and skip the tests FILE already holds")


def _subset(config, option: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    value = config.getoption(option)
    if value is None:
        return allowed
    chosen = tuple(v for v in value.split(",") if v)
    if unknown := [v for v in chosen if v not in allowed]:
        raise pytest.UsageError(f"{option}: unknown {unknown}; choose from {','.join(allowed)}")
    return chosen


def pytest_configure(config):
    suite.SELECTION = suite.Selection(quick=config.getoption("--bench-quick"),
                                      ops=_subset(config, "--bench-ops", cases.OPS),
                                      providers=_subset(config, "--bench-providers", cases.PROVIDERS))
    try:
        config._bench_part = suite.parse_part(config.getoption("--bench-part"))
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    record = config.getoption("--bench-record")
    config._bench_record = Path(record) if record else None
    config._bench_started = time.monotonic()
    config._bench_session_written = False


def pytest_report_header(config):
    kind = "GPU" if suite.DEVICE == "cuda" else "CPU (a pipeline check: these times are not kernel speed)"
    return [f"hadamard_kernels benchmarks on {kind}: {suite.device_name()}",
            f"timer: {suite.measure.timing_method(suite.DEVICE)}"]


def pytest_collect_file(file_path, parent):
    # pytest collects test_*.py by default; the benchmark files are bench_*.py so the test run leaves them alone.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        metafunc.parametrize(("case", "provider", "mode"), suite.params(metafunc.module.OPS))


def recorded_ids(path: Path | None) -> set[str]:
    """Node ids of the tests a record file holds (a line cut short by a kill is ignored)."""
    done = set()
    if path is not None and path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if entry.get("type") == "test":
                done.add(entry["nodeid"])
    return done


def pytest_collection_modifyitems(session, config, items):
    order = {case: i for i, case in enumerate(suite.selected_cases())}

    def case_index(item) -> int:
        spec = getattr(item, "callspec", None)
        # len(order): not a case of this run (e.g. the placeholder of a family with no case here)
        return order.get(spec.params.get("case") if spec is not None else None, len(order))

    def key(item):
        index = case_index(item)
        if index == len(order):
            return (0, index, 0)
        return suite.run_key(index, *(item.callspec.params[name] for name in ("case", "provider", "mode")))

    items.sort(key=key)
    done = recorded_ids(config._bench_record)
    keep, drop = [], []
    for item in items:  # (a family with no case selected here has only pytest's empty-parameter-set item: dropped)
        index = case_index(item)
        wanted = index < len(order) and suite.in_part(index, config._bench_part) and item.nodeid not in done
        (keep if wanted else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    if config._bench_record is not None:  # what this session means to run: the report lists what it did not reach
        config._bench_record.parent.mkdir(parents=True, exist_ok=True)
        _append(config, dict(type="plan", nodeids=[item.nodeid for item in keep]))


def pytest_runtest_setup(item):
    budget = item.config.getoption("--bench-time-budget")
    if budget is not None and time.monotonic() - item.config._bench_started > budget:
        item.stash[BUDGET_SKIP] = True
        pytest.skip(f"time budget of {budget:g} s reached (left for the next run)")


# ---------------------------------------------------------------- the record
def _append(config, entry: dict) -> None:
    with open(config._bench_record, "a") as f:
        f.write(json.dumps(entry, default=str) + "\n")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    spec = getattr(item, "callspec", None)
    if (item.config._bench_record is None or report.when != "call" or spec is None
            or not isinstance(spec.params.get("case"), cases.CASE_TYPES) or item.stash.get(BUDGET_SKIP, False)):
        return report
    if not item.config._bench_session_written and suite.session_meta.cache_info().currsize:
        _append(item.config, dict(type="session", **suite.session_meta()))
        item.config._bench_session_written = True
    info = dict(getattr(item.funcargs.get("benchmark"), "extra_info", {}))
    for key in ("case", "provider", "mode", "device_kind"):  # the params, in full below
        info.pop(key, None)
    entry = dict(type="test", nodeid=item.nodeid, case=spec.params["case"].describe(),
                 provider=spec.params["provider"], mode=spec.params["mode"], **info)
    if report.skipped:
        entry.update(status="skipped", error=_skip_reason(report))
    elif report.failed and info.get("status") != "wrong":
        exc = call.excinfo.value if call.excinfo is not None else None
        entry.update(status="error", error=suite.short_error(exc) if exc is not None else "failed",
                     error_full=report.longreprtext[-20000:])
        if "CUDA error" in entry["error_full"] or "CUDA_ERROR" in entry["error_full"]:
            # An illegal access or a device-side assert poisons the process's CUDA context: every later test would
            # fail (and be recorded as done). Stop here; the next run resumes after this test.
            item.session.shouldstop = f"a CUDA error in {item.nodeid} left the device unusable in this process"
            _append(item.config, entry)
            _append(item.config, dict(type="stopped", reason=item.session.shouldstop))
            return report
    _append(item.config, entry)
    return report


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["hadamard_kernels_device"] = suite.device_name()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    if suite.session_meta.cache_info().currsize:
        output_json["hadamard_kernels"] = suite.session_meta()
