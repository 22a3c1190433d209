import itertools
import os

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors through the interpreter. The variable must be set before
# triton.jit sees the kernels, i.e. before any backend module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Test runs use each Triton kernel's default config: autotuning every constexpr variant of every test would compile
# each one once per config. The benchmarks autotune (and check results before timing them).
os.environ.setdefault("HADAMARD_KERNELS_AUTOTUNE", "0")


# ---------------------------------------------------------------- shards (parallel GPU test processes)
def pytest_addoption(parser):
    parser.addoption("--shard", default=None, metavar="K/M",
                     help="run shard K of M: the selected tests taken from the test files in turn, then every M-th "
                          "from the K-th, so M processes run them all and a run cut short has covered every file "
                          "(benchmarks/run_gpu.sh runs the GPU tests this way)")


def parse_shard(value: str) -> tuple[int, int]:
    """"K/M" -> (K, M) with 1 <= K <= M."""
    try:
        k, m = (int(v) for v in value.split("/"))
    except ValueError:
        k = m = 0
    if not 1 <= k <= m:
        raise pytest.UsageError(f"--shard must be K/M with 1 <= K <= M, got {value!r}")
    return k, m


def interleave_files(items: list) -> list:
    """The items of each test file in their order, the files taken in turn: the first test of every file, then the
    second, ..."""
    by_file: dict = {}
    for item in items:
        by_file.setdefault(item.path, []).append(item)
    return [item for row in itertools.zip_longest(*by_file.values()) for item in row if item is not None]


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected theirs, so shards split what is left evenly
def pytest_collection_modifyitems(config, items):
    if (value := config.getoption("--shard")) is None:
        return
    k, m = parse_shard(value)
    ordered = interleave_files(items)
    config.hook.pytest_deselected(items=[item for i, item in enumerate(ordered) if i % m != k - 1])
    items[:] = ordered[k - 1::m]
