"""poly_chain's CUDA C++ kernels (csrc/poly_chain*.cu) without a GPU: the real source built by the host compiler under
tests/emulation/cuda_emulation.h (blocks run as fibers, ldmatrix and mma.sync emulated) and driven by
hadamard_kernels/ops/poly_chain/cuda.py on CPU tensors, against the float64 reference in float32 (the exact-FMA path),
float16 and bfloat16 (the tensor-core path): every activation and mode, bias or none, odd sizes (M, d, k not multiples
of the tile, of the d slice or of 8), N = 1..5 and past the grad_z kernel's 16 degrees in registers, unaligned x
(no 16-byte loads), exact zero factors, the forward's optional z output and the backward from it (save_projections),
every launcher into guard buffers (no store outside its outputs; grad_z also in place over z) and launchers refusing
bad params. On a GPU, tests/test_poly_chain.py runs the built extension itself."""

from __future__ import annotations

import math

import emulated_kernels
import pytest
import torch
from guard import assert_guard_untouched, check_guards, guard_buffer, guarded_copy
from utils import assert_close, check_backend_module

from hadamard_kernels import _backend
from hadamard_kernels.ops.poly_chain import cuda as chain_cuda
from hadamard_kernels.ops.poly_chain import reference
from hadamard_kernels.ops.poly_chain.common import ACTIVATIONS, MODES

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GRAD_NAMES = ("dx", "dweight", "dbias")


@pytest.fixture(scope="session")
def emulated_extension():
    """csrc/poly_chain*.cu built by the host compiler under tests/emulation/cuda_emulation.h."""
    return emulated_kernels.build("hk_poly_chain_emulated", "poly_chain_module.cpp",
                                  sorted(emulated_kernels.CSRC.glob("poly_chain*")), flags=("-Werror",))


@pytest.fixture
def emulated(emulated_extension, monkeypatch):
    """cuda.py's forward / backward run the emulated kernels on CPU tensors."""
    emulated_kernels.run_on_cpu(chain_cuda, emulated_extension, monkeypatch)
    return emulated_extension


def make_inputs(M=67, d=45, k=23, N=3, *, bias=True, dtype=torch.float32, seed=0):
    """[x, weight, bias] in `dtype` (projections scaled so every u_n is O(1)) and an output gradient."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, d, generator=g, dtype=torch.float64)
    weight = torch.randn(N, k, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    b = 0.5 * torch.randn(N, k, generator=g, dtype=torch.float64) if bias else None
    grad_y = torch.randn(M, k, generator=g, dtype=torch.float64)
    return [None if t is None else t.to(dtype) for t in (x, weight, b)], grad_y.to(dtype)


def check_emulated(inputs, grad_y, mode="ccp", activation="tanh", scale=0.7, needs=(True,) * 3):
    """cuda.forward / cuda.backward (the emulated kernels) against the reference on float64 copies, with the backend
    modules' signatures (what op.py calls). Returns (y, gradients)."""
    return check_backend_module(chain_cuda, reference, inputs, (mode, activation, scale), grad_y, needs, GRAD_NAMES)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_emulated_matches_reference(emulated, dtype, activation):
    """M 67, d 45, k 23 (multiples of no tile, d slice or 8: ragged edges everywhere); ccp with bias and
    product without, at once."""
    for i, mode in enumerate(MODES):
        inputs, grad_y = make_inputs(dtype=dtype, bias=i == 0, seed=i)
        check_emulated(inputs, grad_y, mode, activation, scale=0.7 if mode == "ccp" else 1.3)


@pytest.mark.parametrize("size", [
    dict(M=1, d=1, k=1, N=1),      # one element: d = 1 is a padded slice, N = 1 is y = u_1
    dict(M=5, d=16, k=70, N=2),    # k past 64; d = 16 takes the 16-byte loads
    dict(M=130, d=8, k=9, N=4),    # M past 128; one 8-wide slice
    dict(M=3, d=64, k=23, N=5),    # whole d slices, N = 5
], ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_sizes(emulated, size, dtype):
    inputs, grad_y = make_inputs(**size, dtype=dtype, bias=size["N"] != 4)
    check_emulated(inputs, grad_y, "ccp", "gelu", scale=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_emulated_unaligned_x(emulated, dtype):
    """x one element into its storage (not 16-byte aligned, d a multiple of the vector width): element loads."""
    (x, weight, bias), grad_y = make_inputs(M=20, d=32, k=16, N=3, dtype=dtype)
    shifted = torch.empty(x.numel() + 1, dtype=dtype)[1:].view_as(x).copy_(x)
    assert shifted.is_contiguous() and shifted.data_ptr() % 16 != 0
    check_emulated([shifted, weight, bias], grad_y, "product", "sigmoid", scale=1.5)


@pytest.mark.parametrize("mode", MODES)
def test_emulated_zero_factors_exact_gradients(emulated, mode):
    """A factor of exactly 0 (1 + u = 0 in ccp, u = 0 in product): the other degrees' gradients are exactly 0 and
    the zero factor's are not (prefix x suffix products, no division)."""
    (x, weight, bias), grad_y = make_inputs(M=9, d=6, k=5, N=4)
    weight[1] = 0.0
    bias[1] = -1.0 if mode == "ccp" else 0.0  # identity: u_2 = bias -> factor 0
    _, (_, dw, db) = check_emulated([x, weight, bias], grad_y, mode, "identity", scale=1.0)
    assert dw[1].abs().sum() > 0 and db[1].abs().sum() > 0, "the zero factor's gradients must not vanish"
    assert dw[[0, 2, 3]].abs().sum() == 0, "the other factors see the zero: their gradients are exactly 0"


def test_emulated_one_row_with_any_stride(emulated):
    """A contiguous (1, d) tensor may carry any row stride (PyTorch ignores the stride of a size-1 dim): the launchers
    must not hand it to the kernels as the row stride."""
    (x, weight, bias), grad_y = make_inputs(M=1, d=6, k=4, N=2)
    x, grad_y = x.reshape(6, 1).t(), grad_y.reshape(4, 1).t()
    assert x.is_contiguous() and x.stride(0) == 1 and grad_y.is_contiguous() and grad_y.stride(0) == 1
    check_emulated([x, weight, bias], grad_y)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_save_projections(emulated, dtype):
    """The forward also writes z (the STORE_Z kernels); the backward from that z (no recompute GEMM) matches the
    reference and leaves z as it was (a second backward must find it intact)."""
    inputs, grad_y = make_inputs(M=67, d=40, k=70, N=3, dtype=dtype, bias=dtype != torch.float16)
    options = ("product", "gelu", 1.1)
    wide = [None if t is None else t.double() for t in inputs]
    y, z = chain_cuda.forward(*inputs, *options, save_projections=True)
    ref_y, ref_z = reference.forward(*wide, *options, save_projections=True)
    assert z.shape == (67, 3, 70) and z.dtype == dtype
    assert_close("y", y, ref_y, dtype)
    assert_close("z", z, ref_z, dtype)
    kept = z.clone()
    grads = chain_cuda.backward(grad_y, *inputs, *options, [True] * 3, projections=z)
    assert torch.equal(z, kept), "the backward wrote into the saved z"
    ref_grads = reference.backward(grad_y.double(), *wide, *options, [True] * 3)
    for name, t, got, want in zip(GRAD_NAMES, inputs, grads, ref_grads):
        if t is not None:
            assert_close(name, got, want, dtype)


class RecordingExtension:
    """The emulated extension, recording the `wgmma` field of every forward launch."""

    def __init__(self, ext):
        self._ext, self.wgmma = ext, []

    def __getattr__(self, name):
        return getattr(self._ext, name)

    def poly_chain_fwd(self, params, stream):
        self.wgmma.append(params.wgmma)
        self._ext.poly_chain_fwd(params, stream)


@pytest.mark.parametrize("requested, dtype, hopper, expected", [
    ("1", torch.float16, True, True), ("1", torch.bfloat16, True, True),
    ("1", torch.float32, True, False),   # no exact fp32 in wgmma: the mma.sync kernel
    ("1", torch.bfloat16, False, False),  # not an sm_90 GPU
    ("0", torch.bfloat16, True, False), (None, torch.bfloat16, True, False),  # not asked for
])
def test_emulated_wgmma_forward_is_opt_in(emulated, monkeypatch, requested, dtype, hopper, expected):
    """HADAMARD_KERNELS_CUDA_WGMMA=1 routes the fp16/bf16 forward on a Hopper GPU (patched here) to the wgmma kernel,
    and only then; either way the forward and the gradients match the reference."""
    if requested is None:
        monkeypatch.delenv(_backend.ENV_CUDA_WGMMA, raising=False)
    else:
        monkeypatch.setenv(_backend.ENV_CUDA_WGMMA, requested)
    monkeypatch.setattr(chain_cuda, "_is_hopper", lambda device: hopper)
    recording = RecordingExtension(emulated)
    monkeypatch.setattr(chain_cuda, "require_cuda_extension", lambda: recording)
    inputs, grad_y = make_inputs(M=70, d=72, k=40, N=5, dtype=dtype)
    check_emulated(inputs, grad_y, "ccp", "gelu")
    assert recording.wgmma == [expected]


def test_wgmma_needs_w_rows_within_32_bits(monkeypatch):
    """The kernel indexes W's N * k rows in 32 bits: past that the forward stays on the mma.sync kernel."""
    monkeypatch.setenv(_backend.ENV_CUDA_WGMMA, "1")
    monkeypatch.setattr(chain_cuda, "_is_hopper", lambda device: True)
    x = torch.empty(4, 8, dtype=torch.bfloat16)
    assert chain_cuda._use_wgmma(x, torch.empty(2, 2**30 - 1, 8, dtype=torch.bfloat16, device="meta"))
    assert not chain_cuda._use_wgmma(x, torch.empty(2, 2**30, 8, dtype=torch.bfloat16, device="meta"))


def test_wgmma_switch_rejects_other_values(monkeypatch):
    monkeypatch.setenv(_backend.ENV_CUDA_WGMMA, "yes")
    with pytest.raises(ValueError, match=_backend.ENV_CUDA_WGMMA):
        _backend.cuda_wgmma_requested()


def test_emulated_each_gradient_alone(emulated):
    inputs, grad_y = make_inputs(M=10, d=12, k=7, N=2, dtype=torch.float16)
    for which in range(3):
        check_emulated(inputs, grad_y, "ccp", "relu", needs=tuple(i == which for i in range(3)))


@pytest.mark.parametrize("N", [17, 35])
def test_emulated_many_degrees(emulated, N):
    """N past the grad_z kernel's 16 degrees in registers: the prefix carried across blocks of 16, the suffix of the
    later blocks recomputed from z. Then one factor of exactly 0, in the first block or in the last: every other
    degree's gradient is exactly 0, its own is not."""
    (x, weight, bias), grad_y = make_inputs(M=5, d=6, k=3, N=N, seed=N)
    check_emulated([x, weight, bias], grad_y, "ccp", "tanh", scale=0.3)
    for zero in (2, N - 1):
        w, b = weight.clone(), bias.clone()
        w[zero], b[zero] = 0.0, 0.0  # product, identity: u = 0 is the factor
        _, (_, dw, db) = check_emulated([x, w, b], grad_y, "product", "identity", scale=1.0)
        others = [n for n in range(N) if n != zero]
        assert dw[others].abs().sum() == 0 and db[others].abs().sum() == 0
        assert dw[zero].abs().sum() > 0 and db[zero].abs().sum() > 0


# ---------------------------------------------------------------- every launcher writes only its outputs
def _exact_grad_z(z, mode, activation, scale, grad_y):
    """dL/dz [M, N, k] in float64 by autograd through the reference forward's formula, at the given z."""
    z = z.double().requires_grad_()
    act = reference._ACTIVATIONS[activation]
    factors = [scale * act(z[:, n]) + (0 if mode == "product" or n == 0 else 1) for n in range(z.shape[1])]
    return torch.autograd.grad(math.prod(factors), z, grad_y.double())[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d, row_pad", [(5, 3), (40, 8)])
def test_emulated_launchers_stay_in_bounds(emulated_extension, dtype, d, row_pad):
    """M 67, k 70, N 3 (partial row and column tiles); row-padded x, y and grad_y.
    d = 40 with 8 padding columns takes the 16-byte loads, d = 5 the element loads. The forward also writes z, the
    backward reads it into a separate grad_z and then in place."""
    ext = emulated_extension
    M, k, N = 67, 70, 3
    mode, activation, scale = ("ccp", "tanh", 0.6) if d == 5 else ("product", "gelu", 1.2)
    (x, weight, bias), grad_y = make_inputs(M=M, d=d, k=k, N=N, dtype=dtype)
    gx = guarded_copy(x, name="x", row_pad=row_pad)
    gw, gb = guarded_copy(weight, name="weight"), guarded_copy(bias, name="bias")
    ggy = guarded_copy(grad_y, name="grad_y", row_pad=row_pad)
    y = guard_buffer((M, k), dtype, name="y", row_pad=row_pad)
    z = guard_buffer((M, N, k), dtype, name="z")
    gz = guard_buffer((M, N, k), dtype, name="grad_z")
    common = dict(M=M, d=d, k=k, N=N, x_row_stride=d + row_pad, y_row_stride=k + row_pad,
                  dtype=ext.DTYPES.index(str(dtype).removeprefix("torch.")), activation=ACTIVATIONS.index(activation),
                  mode=MODES.index(mode), scale=scale)
    ext.poly_chain_fwd(ext.PolyChainParams(**common, x=gx.view.data_ptr(), weight=gw.view.data_ptr(),
                                           bias=gb.view.data_ptr(), y=y.view.data_ptr(), z=z.view.data_ptr()), 0)
    check_guards(y, z)
    wide = [t.double() for t in (x, weight, bias)]
    assert_close("y", y.view, reference.forward(*wide, mode, activation, scale), dtype)
    z_exact = torch.stack([wide[0] @ wide[1][n].T + wide[2][n] for n in range(N)], 1)
    assert_close("z", z.view, z_exact, dtype)

    z_in = guarded_copy(z.view, name="z (input)")
    ext.poly_chain_bwd(ext.PolyChainParams(**common, z=z_in.view.data_ptr(), grad_y=ggy.view.data_ptr(),
                                           grad_z=gz.view.data_ptr()), 0)
    check_guards(gz)
    for guard in (gx, gw, gb, ggy, z_in):
        assert_guard_untouched(guard, f"input {guard.name}")
    want = _exact_grad_z(z.view, mode, activation, scale, grad_y)
    assert_close("grad_z", gz.view, want, dtype)
    assert torch.equal(z_in.view, z.view), "the backward wrote into its input z"

    ext.poly_chain_bwd(ext.PolyChainParams(**common, z=z_in.view.data_ptr(), grad_y=ggy.view.data_ptr(),
                                           grad_z=z_in.view.data_ptr()), 0)
    assert_guard_untouched(z_in, "grad_z in place over z")
    assert torch.equal(z_in.view, gz.view), "in place over z differs from the separate output"


def _bad_params(ext, **fields):
    """Valid params for a 10 x 4 input, k 3, N 2 (pointers are never dereferenced: the launchers refuse)."""
    base = dict(x=256, weight=256, bias=0, y=256, z=256, grad_y=256, grad_z=256, M=10, d=4, k=3, N=2,
                x_row_stride=4, y_row_stride=3, dtype=0, activation=0, mode=0, scale=1.0)
    return ext.PolyChainParams(**{**base, **fields})


BAD = [dict(M=0), dict(d=0), dict(k=0), dict(N=0), dict(N=2 ** 31), dict(y_row_stride=2), dict(mode=2),
       dict(mode=-1), dict(activation=5), dict(activation=-1), dict(dtype=7)]


@pytest.mark.parametrize("bad", BAD, ids=str)
def test_emulated_launchers_refuse_bad_params(emulated_extension, bad):
    """Refused before any launch, so this is safe on a GPU too; RuntimeError through the bindings."""
    ext = emulated_extension
    with pytest.raises(RuntimeError, match="poly_chain_fwd failed"):
        ext.poly_chain_fwd(_bad_params(ext, **bad), 0)
    with pytest.raises(RuntimeError, match="poly_chain_bwd failed"):
        ext.poly_chain_bwd(_bad_params(ext, **bad), 0)


@pytest.mark.parametrize("bad", [dict(x=0), dict(weight=0), dict(y=0), dict(x_row_stride=3)], ids=str)
def test_emulated_forward_refuses_bad_params(emulated_extension, bad):
    with pytest.raises(RuntimeError, match="poly_chain_fwd failed"):
        emulated_extension.poly_chain_fwd(_bad_params(emulated_extension, **bad), 0)


@pytest.mark.parametrize("bad", [dict(z=0), dict(grad_y=0), dict(grad_z=0)], ids=str)
def test_emulated_backward_refuses_bad_params(emulated_extension, bad):
    with pytest.raises(RuntimeError, match="poly_chain_bwd failed"):
        emulated_extension.poly_chain_bwd(_bad_params(emulated_extension, **bad), 0)
