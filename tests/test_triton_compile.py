"""Every Triton kernel compiles for the GPUs it is written for, without a GPU.

The interpreter runs the kernels' arithmetic on CPU but never builds them, so a kernel can pass every CPU test and
still fail to compile on a GPU (a tl.dot shape the hardware lacks, a layout conversion, a constexpr that only the
compiler evaluates). Here the launches that the ops make under the interpreter are recorded (tests/triton_targets.py)
and compiled with this Triton's compiler and bundled ptxas for sm_90 and sm_80 (bfloat16, each kernel's default config;
every config and float32 in the complete check below). The launches are the `_selfcheck.CASES` ops plus
the paths those small cases do not reach (wide rows, split sequences, decode, head dims 128 and 256); every kernel
of every `ops/*/triton.py` must be among them."""

from __future__ import annotations

import importlib.util
import os
import pkgutil

import pytest
import triton_targets

from hadamard_kernels import _backend, ops

pytestmark = pytest.mark.skipif(not _backend.triton_interpreting(),
                                reason="records launches under the Triton interpreter; a GPU run compiles them itself")


@pytest.fixture(scope="module")
def launches():
    """Every distinct launch, recorded in float16 (compiled as bfloat16)."""
    return triton_targets.recorded_launches("float16")


def _every_triton_kernel():
    """(module, name) of each kernel the backends launch: the `*_kernel` functions of ops/*/triton.py."""
    found = set()
    for info in pkgutil.iter_modules(ops.__path__):
        name = f"{ops.__name__}.{info.name}.triton"
        if info.ispkg and importlib.util.find_spec(name) is not None:
            module = importlib.import_module(name)
            found |= {(module.__name__, kernel) for kernel in vars(module) if kernel.endswith("_kernel")}
    assert len(found) >= 10, found  # the families are found at all
    return found


def test_every_kernel_is_recorded(launches):
    recorded = {(launch.module, launch.name) for launch in launches}
    missing = _every_triton_kernel() - recorded
    assert not missing, f"no recorded launch reaches {missing}: add a call to triton_targets.paths_beyond_the_cases"


def _assert_compiled(selected, arch):
    results = triton_targets.compile_launches(selected, arch)
    failed = [f"{launch.kernel} {dict(launch.constexprs)} warps {launch.num_warps} stages {launch.num_stages}:\n"
              f"{result['error']}" for launch, result in zip(selected, results) if not result["ok"]]
    assert not failed, f"{len(failed)} of {len(selected)} launches do not compile for sm_{arch}:\n" + \
        "\n\n".join(failed[:5])
    return results


# Shared memory a block may opt in to on sm_90 (CUDA programming guide, compute capabilities): past it a kernel
# compiles and then fails to launch (OutOfResources), which only a GPU would show.
SHARED_PER_BLOCK_SM90 = 227 * 1024


@pytest.mark.parametrize("arch", [90, 80])
def test_bf16_default_configs_compile(launches, arch):
    selected = [launch.for_arch(arch) for launch in triton_targets.as_bf16(launches)]
    results = _assert_compiled(selected, arch)
    if arch == 90:  # the default tiles of the bf16 GEMM-like kernels run on Hopper's tensor cores
        assert any(r["wgmma"] for r in results), "no bf16 launch uses wgmma on sm_90"
        # The recorded launches are the ones an H100 runs (launchers that pick configs by the device's shared
        # memory, as linear attention's at head dim 256, choose Hopper's on the CPU), so only sm_90 is held to it.
        too_big = [f"{launch.kernel} {dict(launch.constexprs)} stages {launch.num_stages}: {r['shared_bytes']} B"
                   for launch, r in zip(selected, results) if r["shared_bytes"] > SHARED_PER_BLOCK_SM90]
        assert not too_big, f"launches over sm_90's {SHARED_PER_BLOCK_SM90} B of shared memory:\n" + "\n".join(too_big)


# The complete check takes ~15 minutes on two cores, too long for every CI run: every autotune config (what a GPU
# autotunes over) and float32 (exact fp32 dots compile to long FMA sequences). Run it after changing configs or
# kernels: HADAMARD_KERNELS_COMPILE_CHECK=all python -m pytest tests/test_triton_compile.py
complete = pytest.mark.skipif(os.environ.get("HADAMARD_KERNELS_COMPILE_CHECK") != "all",
                              reason="complete compile check: set HADAMARD_KERNELS_COMPILE_CHECK=all")


@complete
def test_bf16_every_autotune_config_compiles_for_sm90(launches):
    _assert_compiled(triton_targets.as_bf16(launches, every_config=True), 90)


@complete
def test_fp32_default_configs_compile_for_sm90():
    fp32 = triton_targets.unique(launch.default_config() for launch in triton_targets.recorded_launches("float32"))
    results = _assert_compiled(fp32, 90)
    too_big = [launch.kernel for launch, r in zip(fp32, results) if r["shared_bytes"] > SHARED_PER_BLOCK_SM90]
    assert not too_big, f"float32 launches over sm_90's shared memory: {too_big}"


_PLANTED = """
import triton
import triton.language as tl


@triton.jit
def _narrow_dot_kernel(x_ptr, B: tl.constexpr):
    o = tl.arange(0, B)
    a = tl.load(x_ptr + o[:, None] * B + o[None, :])
    tl.store(x_ptr + o[:, None] * B + o[None, :], tl.dot(a, a).to(tl.bfloat16))
"""


def test_a_kernel_that_only_the_compiler_rejects_fails(tmp_path, monkeypatch):
    """The check can fail: a tl.dot of 8 x 8 tiles, which the interpreter runs, does not compile."""
    (tmp_path / "planted_narrow_dot.py").write_text(_PLANTED)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}")
    launch = triton_targets.Launch("planted_narrow_dot", "_narrow_dot_kernel", (("x_ptr", "*bf16"),), (("B", 8),),
                                   ("x_ptr",))
    result, = triton_targets.compile_launches([launch], 90)
    assert not result["ok"] and "dot" in result["error"].lower(), result
