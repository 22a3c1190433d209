"""The CUDA C++ extension hadamard_kernels._C: it is built, its host-side math and codes agree with Python, and
(on a GPU) the cuda backend of every op matches the float64 reference."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from utils import HAS_CUDA, assert_close, cuda, requires_cuda

import hadamard_kernels as hk
from hadamard_kernels import _backend
from hadamard_kernels.ops.poly_chain.common import ACTIVATIONS, MODES

EXT, EXT_MISSING = _backend.cuda_extension()


def nvcc_present() -> bool:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [Path(cuda_home) / "bin" / "nvcc"] if cuda_home else []
    candidates += [Path(p) for p in filter(None, [shutil.which("nvcc")])] + [Path("/usr/local/cuda/bin/nvcc")]
    return any(c.is_file() for c in candidates)


needs_ext = pytest.mark.skipif(EXT is None, reason=f"hadamard_kernels._C not built: {EXT_MISSING}")


# ---------------------------------------------------------------- the build
def test_extension_built_where_nvcc_is():
    """CI installs with HADAMARD_KERNELS_CUDA=1 on a machine with nvcc, so an import failure here means a kernel
    or the binding stopped compiling (or linking). Opt out with HADAMARD_KERNELS_CUDA=0."""
    if EXT is not None:
        return
    if os.environ.get("HADAMARD_KERNELS_CUDA", "auto") == "0" or not nvcc_present():
        pytest.skip(f"no CUDA build requested here ({EXT_MISSING})")
    pytest.fail(f"nvcc is present but {EXT_MISSING}")


def _configure(tmp_path, *options) -> str:
    """Configures CMakeLists.txt in tmp_path (no compile; again in the same folder: the compiler checks are cached)
    and returns the generated build.ninja."""
    import sys

    pybind11 = pytest.importorskip("pybind11")
    if shutil.which("cmake") is None or shutil.which("ninja") is None or not nvcc_present():
        pytest.skip("needs cmake, ninja and nvcc")
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    root = Path(__file__).resolve().parent.parent
    subprocess.run(["cmake", str(root), "-G", "Ninja", f"-DCMAKE_CUDA_COMPILER={nvcc}",
                    f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", *options],
                   cwd=tmp_path, check=True, capture_output=True)
    return (tmp_path / "build.ninja").read_text()


def test_build_flags(tmp_path):
    """Warnings are errors only with HK_WERROR (CI); the default architectures are SASS for sm_80 and sm_90a plus
    compute_80 PTX (which newer GPUs JIT-compile), and no sm_90a PTX (which runs nowhere else)."""
    default = _configure(tmp_path)
    assert "Werror" not in default
    codes = set(re.findall(r"--generate-code=arch=(compute_\w+),code=\[([\w,]+)\]", default))
    targets = {(arch, code) for arch, codes_ in codes for code in codes_.split(",")}
    assert targets == {("compute_80", "sm_80"), ("compute_80", "compute_80"), ("compute_90a", "sm_90a")}, targets
    strict = _configure(tmp_path, "-DHK_WERROR=ON")
    assert "-Werror=all-warnings" in strict and "-Xcompiler=-Werror" in strict


# ---------------------------------------------------------------- the machine code of the built extension
def _cuobjdump() -> str | None:
    """cuobjdump: the CUDA toolkit's, else the one Triton ships."""
    if found := shutil.which("cuobjdump"):
        return found
    import triton
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.is_file() else None


def _resources(arch: str) -> dict[str, dict[str, int]]:
    """cuobjdump -res-usage of _C's `arch` cubins: {mangled kernel name: {"REG": .., "STACK": .., "LOCAL": ..}}."""
    out = subprocess.run([_cuobjdump(), "-res-usage", "-arch", arch, EXT.__file__], capture_output=True, text=True,
                         check=True).stdout
    found = re.findall(r"Function (\S+):\s+REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    return {name: dict(REG=int(r), STACK=int(st), LOCAL=int(lo)) for name, r, st, lo in found}


needs_cuobjdump = pytest.mark.skipif(EXT is None or _cuobjdump() is None, reason="needs the built _C and cuobjdump")


@needs_ext
@needs_cuobjdump
def test_poly_chain_forward_kernels_do_not_spill():
    """Every poly_chain forward instance, mma.sync (sm_80, sm_90a) and wgmma (sm_90a), keeps its state in registers:
    no stack, no local memory. The wgmma instances have a body on sm_90a only."""
    for arch in ("sm_80", "sm_90a"):
        kernels = {n: r for n, r in _resources(arch).items() if "poly_chain_fwd" in n}
        wgmma = {n: r for n, r in kernels.items() if "wgmma" in n}
        assert len(kernels) - len(wgmma) == 60 and len(wgmma) == 40, (arch, len(kernels), len(wgmma))
        for name, res in kernels.items():
            assert res["STACK"] == 0 and res["LOCAL"] == 0, f"{arch} {name}: {res}"
            assert res["REG"] <= 255, f"{arch} {name}: {res}"
        if arch == "sm_90a":
            assert all(res["REG"] > 64 for res in wgmma.values()), "wgmma instances compiled without their body"


@needs_ext
@needs_cuobjdump
def test_linear_attention_kernels_stay_in_registers():
    """The linear attention scan kernel's 24 instances per architecture (3 dtypes x 4 passes, each also as the segment
    sums of a split pass), the decode kernel's 3 and the segment scan: no spills, no stack (ptxas -v readings in
    docs/decisions.md). The 16-bit scans load their tiles with cp.async (LDGSTS in the SASS of a bfloat16 pass and
    its segment sums), float32's synchronously."""
    for arch in ("sm_80", "sm_90a"):
        kernels = {n: r for n, r in _resources(arch).items() if "linear_attention" in n}
        scans = [n for n in kernels if "scan_kernelI" in n]
        decode = [n for n in kernels if "decode_kernel" in n]
        assert len(scans) == 24 and len(decode) == 3, (arch, sorted(kernels))
        assert sum("segment_scan_kernel" in n for n in kernels) == 1, (arch, sorted(kernels))
        for name, res in kernels.items():
            assert res["STACK"] == 0 and res["LOCAL"] == 0 and res["REG"] <= 255, f"{arch} {name}: {res}"
        forward = [n for n in scans if "scan_kernelI13__nv_bfloat16Li0E" in n or "scan_kernelIfLi0ELb0E" in n]
        assert len(forward) == 3, (arch, forward)  # bfloat16 pass and sums, float32 pass
        for name in forward:
            sass = subprocess.run([_cuobjdump(), "-sass", "-arch", arch, "-fun", name, EXT.__file__],
                                  capture_output=True, text=True, check=True).stdout
            assert ("LDGSTS" in sass) == ("nv_bfloat16" in name), f"{arch} {name}: cp.async (LDGSTS) use"


@needs_ext
@needs_cuobjdump
@pytest.mark.parametrize("dtype", ["__half", "__nv_bfloat16"])
def test_wgmma_forward_machine_code(dtype):
    """The sm_90a wgmma forward compiles to what it was written for: 4 HGMMA 64x256x16 per step of d (one group),
    cp.async (LDGSTS) loads, the proxy fence, and exactly one wgmma wait per step plus one per pass. A wait the
    compiler injects because accumulator registers moved while a group was in flight (ptxas C7517) would add one and
    serialise the pipeline."""
    name = next(n for n in _resources("sm_90a") if "poly_chain_fwd_wgmma_kernel" in n and dtype in n)
    sass = subprocess.run([_cuobjdump(), "-sass", "-arch", "sm_90a", "-fun", name, EXT.__file__], capture_output=True,
                          text=True, check=True).stdout
    hgmma = len(re.findall(r"HGMMA\.64x256x16\.F32", sass))
    waits = len(re.findall(r"WARPGROUP\.DEPBAR", sass))
    assert hgmma > 0 and hgmma % 4 == 0, hgmma
    assert waits == hgmma // 4 + 1, f"{waits} wgmma waits for {hgmma // 4} steps"
    assert "LDGSTS" in sass and "FENCE.VIEW.ASYNC.S" in sass and "WARPGROUP.ARRIVE" in sass


# ---------------------------------------------------------------- codes shared with Python
@needs_ext
def test_codes_match_python():
    assert tuple(EXT.ACTIVATIONS) == ACTIVATIONS
    assert tuple(EXT.POLY_CHAIN_MODES) == MODES
    assert tuple(EXT.DTYPES) == tuple(str(d).removeprefix("torch.") for d in _backend.GPU_DTYPES)


# ---------------------------------------------------------------- the device math, compiled for the host
_Z = [0.0, -0.0, 1e-4, -1e-4, 0.3, -0.3, 1.0, -1.0, 2.5, -2.5, 5.0, -5.0, 9.0, -9.0, 20.0, -20.0, 60.0, -60.0,
      100.0, -100.0, 1e4, -1e4]


def _reference(activation: str, z: torch.Tensor):
    """(act(z), act'(z)) in float64 from torch's own functions."""
    z = z.clone().requires_grad_()
    fn = {"identity": lambda t: t * 1, "relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
          "gelu": torch.nn.functional.gelu}[activation]
    out = fn(z)
    (grad,) = torch.autograd.grad(out.sum(), z)
    return out.detach(), grad


@needs_ext
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_host_matches_torch(activation):
    code = ACTIVATIONS.index(activation)
    # float32 inputs, as the kernels see them.
    z = torch.tensor(_Z, dtype=torch.float32).double()
    ref, ref_grad = _reference(activation, z)
    out = torch.tensor([EXT.activation_host(code, v) for v in z.tolist()], dtype=torch.float64)
    grad = torch.tensor([EXT.activation_grad_host(code, v) for v in z.tolist()], dtype=torch.float64)
    for name, got, want in (("act", out, ref), ("act'", grad, ref_grad)):
        assert not torch.isnan(got).any(), f"{activation} {name}: NaN at z = {z[torch.isnan(got)].tolist()}"
        bad = (got - want).abs() > 4e-7 * (1 + want.abs())
        assert not bad.any(), (f"{activation} {name}: z = {z[bad].tolist()} gives {got[bad].tolist()}, "
                               f"expected {want[bad].tolist()}")


@needs_ext
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_host_nan_and_inf_match_torch(activation):
    """NaN in gives NaN out (relu too, as torch.relu: `z > 0 ? z : 0` would give 0), relu'(NaN) = 1 as in torch's
    backward, and the infinities give torch's values (NaN where torch's formula has inf * 0)."""
    code = ACTIVATIONS.index(activation)
    z = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0], dtype=torch.float64)
    ref, ref_grad = _reference(activation, z)
    out = torch.tensor([EXT.activation_host(code, v) for v in z.tolist()], dtype=torch.float64)
    grad = torch.tensor([EXT.activation_grad_host(code, v) for v in z.tolist()], dtype=torch.float64)
    for name, got, want in (("act", out, ref), ("act'", grad, ref_grad)):
        assert torch.equal(got.isnan(), want.isnan()), f"{activation} {name}({z.tolist()}) = {got.tolist()}, " \
                                                       f"torch gives {want.tolist()}"
        keep = ~want.isnan()
        assert torch.equal(got[keep], want[keep]), f"{activation} {name}: {got.tolist()} != torch's {want.tolist()}"


@needs_ext
def test_cuda_runtime_info_never_raises():
    """(driver, runtime, device count, error) of the CUDA runtime linked into _C; without a GPU (or with an old
    driver) the error says why, and the cuda backend reports it instead of crashing at a launch."""
    driver, runtime, count, error = EXT.cuda_runtime_info()
    assert runtime >= 12000 and driver >= 0 and count >= 0
    assert error is None or count == 0, (count, error)
    _backend.cuda_runtime_problem.cache_clear()
    problem = _backend.cuda_runtime_problem()
    if _backend.driver_problem(driver, runtime) is not None or error is not None:
        assert problem is not None
        assert _backend.unavailable_reason("cuda", torch.device("cuda"), torch.float32) == problem
    if not HAS_CUDA:
        assert problem is not None


@needs_ext
def test_activation_host_rejects_unknown_code():
    with pytest.raises(ValueError, match="activation code"):
        EXT.activation_host(len(ACTIVATIONS), 0.0)


# ---------------------------------------------------------------- launchers reject bad params without a GPU
@needs_ext
def test_launcher_errors_become_runtime_errors():
    """Invalid sizes are refused before any launch (so this is safe on a GPU too) and surface as RuntimeError."""
    params = EXT.PolyChainParams(x=0, weight=0, M=0, d=4, k=4, N=1, x_row_stride=4, y_row_stride=4, dtype=0,
                                 activation=0, mode=0, scale=1.0)
    with pytest.raises(RuntimeError, match="poly_chain_fwd failed"):
        EXT.poly_chain_fwd(params, 0)
    with pytest.raises(RuntimeError, match="poly_chain_bwd failed"):
        EXT.poly_chain_bwd(params, 0)


@needs_ext
@pytest.mark.skipif(HAS_CUDA, reason="checks the error path of a machine without a GPU")
def test_launch_without_gpu_raises():
    params = EXT.PolyChainParams(x=256, weight=256, y=256, M=1, d=1, k=1, N=1, x_row_stride=1, y_row_stride=1,
                                 dtype=0, activation=0, mode=0, scale=1.0)
    with pytest.raises(RuntimeError, match="poly_chain_fwd failed"):
        EXT.poly_chain_fwd(params, 0)


# ---------------------------------------------------------------- poly_chain on a GPU against the reference
def make_inputs(M=37, d=45, k=23, N=5, dtype=torch.float32, bias=True, seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*(lead or (M,)), d, generator=g, dtype=torch.float64)
    weight = torch.randn(N, k, d, generator=g, dtype=torch.float64) / math.sqrt(d)  # u_n = O(1)
    b = torch.randn(N, k, generator=g, dtype=torch.float64) * 0.5 if bias else None
    cast = lambda t: None if t is None else t.to(device="cuda", dtype=dtype)  # noqa: E731
    return cast(x), cast(weight), cast(b)


def run(x, weight, bias, grad_y, **options):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    y = hk.poly_chain(*leaves, **options)
    y.backward(grad_y.to(y.dtype))
    return y.detach(), [None if t is None else t.grad for t in leaves]


def check_cuda_backend(x, weight, bias, **options):
    """backend="cuda" on the inputs vs backend="reference" on their float64 copies: y, dx, dweight, dbias."""
    grad_y = torch.randn(*x.shape[:-1], weight.shape[1], device=x.device, dtype=torch.float64)
    y, grads = run(x, weight, bias, grad_y, backend="cuda", **options)
    ref_y, ref_grads = run(*(None if t is None else t.double() for t in (x, weight, bias)), grad_y,
                           backend="reference", **options)
    assert_close("y", y, ref_y, x.dtype)
    for name, g, ref_g in zip(("dx", "dweight", "dbias"), grads, ref_grads):
        if ref_g is not None:
            assert g is not None, f"{name} missing"
            assert_close(name, g, ref_g, x.dtype)
    return y, grads


@pytest.fixture(autouse=True)
def _no_tf32():
    # The float32 gradient GEMMs must be IEEE fp32 for the 1e-5 tolerance. (Saved and restored by hand:
    # monkeypatch's undo deletes the attribute, which torch's cuBLAS module does not allow.)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@cuda
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_poly_chain_matches_reference(dtype, mode, activation, bias):
    x, weight, b = make_inputs(dtype=dtype, bias=bias)
    check_cuda_backend(x, weight, b, mode=mode, activation=activation, scale=0.7)


@cuda
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [
    dict(M=1, d=1, k=1, N=1),                # smallest
    dict(M=37, d=45, k=23, N=1),             # N = 1: y = u_1
    dict(M=70, d=33, k=17, N=16),            # long chain (small scale below)
    dict(M=130, d=128, k=128, N=3),          # aligned: 16-byte loads, paired stores, several tiles
    dict(M=200, d=100, k=150, N=2),          # d % 8 = 4: scalar loads for 16-bit, vector for fp32
    dict(M=65, d=97, k=66, N=4),             # odd d, even k, tiles with one row / two columns
    dict(lead=(3, 5, 7), d=64, k=40, N=3),   # leading dims
    dict(M=3000, d=256, k=192, N=2),         # many row tiles
], ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_poly_chain_shapes(dtype, shape):
    x, weight, b = make_inputs(dtype=dtype, **shape)
    scale = 0.3 if shape["N"] >= 8 else 0.9
    check_cuda_backend(x, weight, b, mode="ccp", activation="tanh", scale=scale)


@cuda
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_poly_chain_strided_input(dtype):
    """x sliced from a wider tensor (the launcher makes it contiguous) and a non-contiguous weight."""
    xw, weight, b = make_inputs(M=50, d=90, k=31, N=3, dtype=dtype)
    x = xw[:, 5:72]
    weight = weight[:, :, 5:72].transpose(0, 1).contiguous().transpose(0, 1)
    check_cuda_backend(x, weight, b, mode="product", activation="gelu", scale=1.1)


@cuda
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_poly_chain_zero_factors(dtype, mode):
    """Exact zeros among the factors: relu with mostly-negative pre-activations, and one degree whose factor is 0
    everywhere (1 + u = 0 in ccp, u = 0 in product). Leave-one-out products must not divide."""
    x, weight, b = make_inputs(M=45, d=40, k=27, N=4, dtype=dtype)
    b[0] -= 0.8  # relu zeros in degree 1 (most of them)
    check_cuda_backend(x, weight, b, mode=mode, activation="relu", scale=1.0)

    weight[1] = 0
    b[1] = -1.0 if mode == "ccp" else 0.0  # identity: u_2 = bias
    y, grads = check_cuda_backend(x, weight, b, mode=mode, activation="identity", scale=1.0)
    assert (y == 0).all()
    # Only the zero factor's own gradient survives (its leave-one-out product is nonzero); dx is then exactly
    # 0 because W_2 = 0, which check_cuda_backend has compared with the reference.
    assert grads[1][1].abs().sum() > 0, "dweight of the zero factor must not vanish"
    assert grads[2][1].abs().sum() > 0, "dbias of the zero factor must not vanish"


@cuda
@requires_cuda
def test_poly_chain_uses_current_stream():
    x, weight, b = make_inputs(M=300, d=64, k=64, N=3, dtype=torch.bfloat16)
    expected = hk.poly_chain(x, weight, b, backend="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = hk.poly_chain(x, weight, b, backend="cuda")
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(y, expected)
