"""The one timer of the benchmarks, and the memory columns; pytest-benchmark gets its samples from here.

`measure(step, device)` times repetitions of `step`:
- on a GPU with CUDA events around each repetition, the L2 cache flushed (a 256 MiB buffer zeroed) before each, after
  a warm-up that absorbs autotuning and compilation (the first call) and then runs for `warmup_ms`; the number of
  repetitions fills `rep_ms` (between `min_reps` and `max_reps`). The events sit on the stream, so each sample is the
  GPU time from the repetition's first launch to its last kernel's end: launch gaps count when the host is slower
  than the GPU (small shapes), which is what a user of that call pays. This is `triton.testing.do_bench`'s method
  (which the runner used before), with every sample kept.
- on a CPU with `time.perf_counter` around each call: a check that the pipeline runs (the Triton interpreter is not
  kernel speed), labelled CPU wherever it is shown.

`graph_step(step)` captures one call of `step` in a CUDA graph and returns its replay, so the same timer measures the
step without per-call launch and dispatch cost (the difference is that overhead).

`feed_benchmark(benchmark, samples)` hands the samples to a pytest-benchmark fixture, so its statistics, groups,
`--benchmark-json` and `--benchmark-compare` are those of this timer (pytest-benchmark's own loop would time the
host's wall clock with a hot L2).

`peak_mib` and `saved_bytes` are the memory columns: device memory one call allocates beyond what was allocated
before it (GPU only), and the bytes autograd saves for the backward (any device: `saved_tensors_hooks` see every
tensor saved, a storage counted once).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Iterable

import torch

L2_FLUSH_BYTES = 256 * 2**20  # larger than any current GPU's L2 (H100: 50 MB), as triton.testing.do_bench
GPU_TIMING = dict(warmup_ms=25.0, rep_ms=100.0, min_reps=10, max_reps=1000)
CPU_TIMING = dict(warmup_ms=0.0, rep_ms=50.0, min_reps=2, max_reps=20)


@dataclasses.dataclass
class Samples:
    """Seconds per repetition, and how they were taken."""

    seconds: list[float]
    method: str

    def percentile(self, q: float) -> float:
        """The q-th percentile (0..100), linear between the sorted samples."""
        return percentile(self.seconds, q)

    def summary(self) -> dict:
        """What the results keep: p20 / p50 (median) / p80, mean, min, max in milliseconds, and the count."""
        ms = [s * 1e3 for s in self.seconds]
        return dict(p20_ms=percentile(ms, 20), p50_ms=percentile(ms, 50), p80_ms=percentile(ms, 80),
                    mean_ms=statistics.fmean(ms), min_ms=min(ms), max_ms=max(ms), rounds=len(ms),
                    method=self.method)


def percentile(values: Iterable[float], q: float) -> float:
    data = sorted(values)
    if not data:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    pos = (len(data) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def timing_method(device: str) -> str:
    if device == "cuda":
        return (f"CUDA events per repetition, L2 flushed ({L2_FLUSH_BYTES >> 20} MiB zeroed) before each; first call "
                f"and {GPU_TIMING['warmup_ms']:g} ms of warm-up untimed; repetitions fill {GPU_TIMING['rep_ms']:g} ms "
                f"({GPU_TIMING['min_reps']}–{GPU_TIMING['max_reps']})")
    return ("CPU wall clock (time.perf_counter) per call, first call untimed: a pipeline check (reference, Triton "
            "interpreter, eager on the CPU), not kernel speed")


def _reps(estimate_s: float, warmup_ms: float, rep_ms: float, min_reps: int, max_reps: int) -> tuple[int, int]:
    estimate_ms = max(estimate_s * 1e3, 1e-6)
    return math.ceil(warmup_ms / estimate_ms), max(min_reps, min(max_reps, math.ceil(rep_ms / estimate_ms)))


def measure(step: Callable[[], object], device: str, warm: bool = False, **options) -> Samples:
    """Times repetitions of `step` (see the module docstring); `options` override GPU_TIMING / CPU_TIMING. `warm`:
    the step has run already (its first call, which compiles and autotunes, was not timed), so no untimed first
    call is made here."""
    if device == "cuda":
        return _measure_cuda(step, warm, **{**GPU_TIMING, **options})
    if device == "cpu":
        return _measure_cpu(step, warm, **{**CPU_TIMING, **options})
    raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")


def _measure_cpu(step, warm, warmup_ms, rep_ms, min_reps, max_reps) -> Samples:
    if not warm:
        step()  # compiles, autotunes, fills caches: never a sample
    start = time.perf_counter()
    step()
    samples = [time.perf_counter() - start]
    _, reps = _reps(samples[0], warmup_ms, rep_ms, min_reps, max_reps)
    for _ in range(reps - 1):
        start = time.perf_counter()
        step()
        samples.append(time.perf_counter() - start)
    return Samples(samples, "cpu-clock")


_flush_buffer: torch.Tensor | None = None


def _flush_l2() -> None:
    global _flush_buffer
    if _flush_buffer is None:
        _flush_buffer = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    _flush_buffer.zero_()


def _measure_cuda(step, warm, warmup_ms, rep_ms, min_reps, max_reps) -> Samples:
    if not warm:
        step()  # the first call compiles and autotunes
    torch.cuda.synchronize()
    # Estimate one repetition (with its flush, as timed below) from five, then warm up for warmup_ms.
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(5):
        _flush_l2()
        step()
    end.record()
    torch.cuda.synchronize()
    warm, reps = _reps(begin.elapsed_time(end) / 5e3, warmup_ms, rep_ms, min_reps, max_reps)
    for _ in range(warm):
        step()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for first, last in zip(starts, ends):
        _flush_l2()
        first.record()
        step()
        last.record()
    torch.cuda.synchronize()
    return Samples([first.elapsed_time(last) / 1e3 for first, last in zip(starts, ends)], "cuda-events")


def graph_step(step: Callable[[], object]) -> Callable[[], None]:
    """One call of `step` captured in a CUDA graph; returns its replay. The step is warmed up on a side stream first
    (as torch.cuda.graphs requires: autotuning, compilation and lazy allocations happen outside the capture).
    Raises whatever the capture raises (a host synchronisation inside the step, for instance)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    torch.cuda.synchronize()

    def replay():
        graph.replay()

    replay.graph = graph  # keeps the graph (and its memory pool) alive as long as the replay
    return replay


# ---------------------------------------------------------------- pytest-benchmark
def feed_benchmark(benchmark, samples: Samples) -> None:
    """Records `samples` as the rounds of a pytest-benchmark fixture (nothing under --benchmark-disable).

    pytest-benchmark times `target` between two calls of its timer; here its timer replays the samples (0, then the
    sample's seconds), so the fixture's statistics are exactly those of `measure()`. The JSON names the timer
    `hadamard_kernels_samples`."""
    if benchmark.disabled:
        return
    clock = iter([t for s in samples.seconds for t in (0.0, s)])

    def hadamard_kernels_samples() -> float:
        return next(clock)

    benchmark._timer = hadamard_kernels_samples  # read by the runner pedantic() builds
    benchmark.pedantic(lambda: None, rounds=len(samples.seconds), iterations=1, warmup_rounds=0)


# ---------------------------------------------------------------- memory
def peak_mib(step: Callable[[], object], device: str) -> float | None:
    """Device memory one call of `step` allocates beyond what was allocated before it (MiB); None on the CPU (no
    allocator statistics there)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def saved_bytes(forward: Callable[[], object], inputs: Iterable[torch.Tensor]) -> dict:
    """Bytes autograd keeps for the backward of one `forward()`: every tensor saved goes through
    saved_tensors_hooks (on any device); a storage is counted once however many views of it are saved.
    Returns {"saved_bytes": all of them, "saved_extra_bytes": those that are not storages of `inputs` (the
    activations a provider keeps beyond its inputs)}."""
    storages: dict[tuple[str, int], int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        storages[(str(t.device), storage.data_ptr())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    input_keys = {(str(t.device), t.untyped_storage().data_ptr()) for t in inputs}
    del out
    return dict(saved_bytes=sum(storages.values()),
                saved_extra_bytes=sum(n for key, n in storages.items() if key not in input_keys))
