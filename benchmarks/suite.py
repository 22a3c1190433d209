"""The pytest-benchmark suite's body: which (case, provider, mode) tests run here, and what one of them does.

`pytest benchmarks/` is the suite (bench_*.py, one file per family; conftest.py holds the options, the order, parts,
the time budget, resuming and the record of every test); `run.py` runs it and reports from its record. One test
(`run_benchmark`): check the provider's forward and gradients against the float64 reference once per case, then time
`mode` with measure.measure (CUDA events, L2 flushed; the CPU clock on a CPU), record peak memory and the bytes saved
for the backward, and hand the samples to the pytest-benchmark fixture, so `--benchmark-json` and
`--benchmark-compare` see the same numbers as the report.

A provider that cannot run a case here is skipped with the reason, never failed: a backend that is not available
(not built, no GPU), a per-call size limit (the op's NotImplementedError), an optional provider that is not installed
(fla), out of device memory. A fused backend whose result is wrong is timed and then failed; a baseline whose result
is wrong (bf16 eager forms of some formulas) is recorded as "wrong" and passes.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import gc
import os
import platform
import subprocess
from pathlib import Path

import cases
import measure
import pytest
import torch

import hadamard_kernels as hk
from hadamard_kernels import _backend

REPO = Path(__file__).resolve().parent.parent
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ("triton", "cuda", "reference")


@dataclasses.dataclass
class Selection:
    """What the suite runs (set from the command line by conftest.py)."""

    quick: bool = False
    ops: tuple[str, ...] = cases.OPS
    providers: tuple[str, ...] = cases.PROVIDERS


SELECTION = Selection()


def selected_cases() -> list[cases.AnyCase]:
    """The cases of this device in run order: the tiny CPU cases on a CPU, the GPU cases (or the quick ones) on a
    GPU."""
    chosen = cases.cpu_cases() if DEVICE == "cpu" else cases.all_cases(quick=SELECTION.quick)
    return [c for c in chosen if c.op in SELECTION.ops]


def params(ops: tuple[str, ...]) -> list:
    """pytest params (case, provider, mode) of the selected cases of `ops`, in run order. A quick run leaves out
    max-autotune (minutes of compiling per case), and on a CPU times fwd+bwd only."""
    return [pytest.param(case, provider, mode, id=f"{case.id}-{mode}-{provider}")
            for case in selected_cases() if case.op in ops
            for provider, mode in case.runs(DEVICE) if provider in SELECTION.providers
            and not (SELECTION.quick and (provider == "max-autotune" or (DEVICE == "cpu" and mode != "fwd+bwd")))]


def run_priority(case: cases.AnyCase, provider: str, mode: str) -> int:
    """The tests run by priority, then case by case, so a run cut short by its budget (one GPU call rarely fits the
    suite) has the numbers the issues' goals are judged by: 0 every case's headline mode (fwd+bwd; fwd for a case
    timed forward only), 1 its other modes, 2 the size sweeps, 3 max-autotune (minutes of compiling per case)."""
    if provider == "max-autotune":
        return 3
    if case.sweep:
        return 2
    headline = "fwd+bwd" if any(m == "fwd+bwd" for _, m in case.runs(DEVICE)) else "fwd"
    return 0 if mode == headline else 1


def run_key(case_index: int, case: cases.AnyCase, provider: str, mode: str) -> tuple[int, int, int]:
    """Where a test runs: by its priority, then its case's place in the run (`case_index`), then its place among
    the case's runs."""
    return run_priority(case, provider, mode), case_index, case.runs(DEVICE).index((provider, mode))


def parse_part(value: str | None) -> tuple[int, int] | None:
    """"K/M" -> (K, M) with 1 <= K <= M; None stays None."""
    if value is None:
        return None
    try:
        k, m = (int(v) for v in value.split("/"))
    except ValueError:
        k = m = 0
    if not 1 <= k <= m:
        raise ValueError(f"--bench-part must be K/M with 1 <= K <= M, got {value!r}")
    return k, m


def in_part(case_index: int, part: tuple[int, int] | None) -> bool:
    """Part K of M holds every M-th case from the K-th, so each part takes the families in turn."""
    return part is None or case_index % part[1] == part[0] - 1


# ---------------------------------------------------------------- the session
def git_commit() -> str:
    """HEAD of the checkout (marked when tracked files differ), else $HADAMARD_KERNELS_COMMIT (for a copy of the
    tree without .git), else "unknown"."""
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("HADAMARD_KERNELS_COMMIT", "unknown")


def device_name() -> str:
    if DEVICE == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()}"


@functools.lru_cache(maxsize=1)
def session_meta() -> dict:
    """Device, versions, commit, the timing method and (on a GPU) the measured ceilings: the same for every test of
    a session. The ceilings are measured on first use."""
    import triton

    now = datetime.datetime.now(datetime.timezone.utc)
    meta = dict(kind=DEVICE, device=device_name(), commit=git_commit(), time_utc=now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                python=platform.python_version(), timing=measure.timing_method(DEVICE), fla=cases.fla_version(),
                triton_interpret=os.environ.get("TRITON_INTERPRET") == "1", cpu_threads=torch.get_num_threads(),
                cuda_wgmma=_backend.cuda_wgmma_requested())
    if DEVICE == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 stays fp32 in every provider (DESIGN.md accuracy)
        props = torch.cuda.get_device_properties(0)
        meta.update(sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                    ceilings=measure_ceilings())
    return meta


def measure_ceilings() -> dict:
    """Large bf16 / fp32 (TF32 off) matmul TFLOP/s and device-to-device copy GB/s (bytes read + written), medians of
    the suite's timer."""
    out = {name: _matmul_tflops(dtype) for name, dtype in (("matmul_tflops_bf16", torch.bfloat16),
                                                            ("matmul_tflops_fp32", torch.float32))}
    out["copy_gbps"] = _copy_gbps()
    torch.cuda.empty_cache()
    return out


def _matmul_tflops(dtype: torch.dtype, n: int = 8192) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
    return 2 * n**3 / measure.measure(lambda: a @ b, "cuda").percentile(50) / 1e12


def _copy_gbps(nbytes: int = 2**30) -> float:
    src = torch.empty(nbytes, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    return 2 * nbytes / measure.measure(lambda: dst.copy_(src), "cuda").percentile(50) / 1e9


# ---------------------------------------------------------------- one test
_workloads: dict = {}  # the workloads of the case in flight, reused across its modes
_accuracy: dict = {}


def _free() -> None:
    _workloads.clear()
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def _workload(case, provider: str) -> cases.Workload:
    key = (case, provider)
    if key not in _workloads:
        _free()  # the previous provider's tensors and compiled graphs
        _workloads[key] = cases.make_workload(case, provider, DEVICE)
    return _workloads[key]


def _check(case, provider: str, work: cases.Workload) -> dict:
    key = (case, provider)
    if key not in _accuracy:
        _accuracy.clear()
        _accuracy[key] = cases.check_accuracy(case, work, DEVICE)  # also the first (compiling) call
    return _accuracy[key]


def short_error(exc: BaseException) -> str:
    """One line for a table cell (the full message goes to the JSON)."""
    first = (str(exc).strip().splitlines() or [""])[0]
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def run_benchmark(benchmark, case: cases.AnyCase, provider: str, mode: str) -> None:
    """One test of the suite (see the module docstring); everything it finds goes to benchmark.extra_info."""
    benchmark.group = f"{case.id} {mode}"  # pytest-benchmark's tables: the providers of one case and mode together
    info = benchmark.extra_info
    info.update(case=case.id, provider=provider, mode=mode, device_kind=DEVICE)
    backend = cases.backend_of(provider)
    if backend in BACKENDS and (why := hk.available_backends(DEVICE, case.dtype)[backend]) is not None:
        pytest.skip(f"backend {backend} is not available: {why}")
    meta = session_meta()
    try:
        work = _workload(case, provider)
        accuracy = _check(case, provider, work)
        info.update(accuracy, status="ok" if accuracy["accurate"] else "wrong")
        step = cases.make_step(work, mode)
        if mode == "fwd+bwd-graph":
            step = measure.graph_step(step)  # warmed up before its capture
        elif mode != "fwd+bwd" or DEVICE == "cuda":  # (on a CPU the accuracy check was fwd+bwd's first call)
            step()  # the first call of this step (for fwd, the no-grad graph compiles here)
        info["peak_mib"] = measure.peak_mib(step, DEVICE)
        if mode == "fwd+bwd":
            info.update(measure.saved_bytes(work.forward, work.leaves))
        samples = measure.measure(step, DEVICE, warm=True)
    except cases.ProviderUnavailable as exc:
        pytest.skip(str(exc))
    except NotImplementedError as exc:  # a backend's per-call limit (DESIGN: named, never a silent fallback)
        pytest.skip(short_error(exc))
    except torch.OutOfMemoryError as exc:
        _free()
        pytest.skip(f"out of memory: {short_error(exc)}")
    finally:
        step = None
    info["timing"] = samples.summary()
    if DEVICE == "cuda":
        info.update(rates(case, mode, info["timing"]["p50_ms"], meta["ceilings"]))
    measure.feed_benchmark(benchmark, samples)
    if not accuracy["accurate"] and provider not in cases.BASELINES:
        pytest.fail(f"{provider} on {case}: relative error fwd {accuracy['rel_err_fwd']:.2e}, bwd "
                    f"{accuracy['rel_err_bwd']:.2e} > {accuracy['tolerance']:.0e} (timed, but wrong)")


def rates(case: cases.AnyCase, mode: str, ms: float, ceilings: dict) -> dict:
    """TFLOP/s, GB/s and their percentages of the ceilings (bf16 / fp16 inputs against the bf16 matmul, fp32 against
    the fp32 one) at `ms`."""
    r = cases.rates(case, mode, ms)
    peak = ceilings["matmul_tflops_fp32" if case.dtype == torch.float32 else "matmul_tflops_bf16"]
    tflops_pct = None if r["tflops"] is None else 100 * r["tflops"] / peak
    return dict(tflops=r["tflops"], gbps=r["gbps"], tflops_pct=tflops_pct,
                gbps_pct=100 * r["gbps"] / ceilings["copy_gbps"])
