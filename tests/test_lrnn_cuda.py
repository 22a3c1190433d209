"""The CUDA C++ backend of lrnn_product (csrc/lrnn.cu, ops/lrnn/cuda.py).

Everywhere a C++ compiler and the CUDA headers are: the kernels' source itself, compiled for the CPU under
tests/emulation/cuda_emulation.h (blocks run as fibers, mma.sync emulated) and driven by ops/lrnn/cuda.py on CPU
tensors, against the float64 reference for every activation in float32 (the exact-FMA path), float16 and bfloat16
(the tensor-core path): odd sizes (d = 1, 2 and slices of 32 with a ragged end, dbar = 1, 33 and 64, several column
tiles, a partial row tile), no bias, factors that are exactly 0, spder at z = 0, several row chunks and splits, the
same bits run to run, and every launcher into guard buffers (no store outside its outputs).
Wherever the extension is built: the kernels' element math compiled for the host against the reference's functions,
the codes and limits shared with Python, launchers refusing bad params.
On a GPU: backend="cuda" through the public op against the float64 reference, forward and every gradient."""

from __future__ import annotations

import math

import emulated_kernels
import pytest
import torch
from guard import assert_guard_untouched, check_guards, guard_buffer, guarded_copy
from utils import assert_close, check_backend_module, cuda, forward_backward, requires_cuda

import hadamard_kernels as hk
from hadamard_kernels import _backend
from hadamard_kernels.ops.lrnn import common as lrnn_common
from hadamard_kernels.ops.lrnn import cuda as lrnn_cuda
from hadamard_kernels.ops.lrnn import reference
from hadamard_kernels.ops.lrnn.common import ACTIVATIONS

EXT, EXT_MISSING = _backend.cuda_extension()
needs_ext = pytest.mark.skipif(EXT is None, reason=f"hadamard_kernels._C not built: {EXT_MISSING}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FIXED = [a for a in ACTIVATIONS if a != "mlp"]
GRAD_NAMES = ("dx", "dweight", "dbias", "dg_params")


def make_inputs(M=37, d=21, rank=7, dbar=3, activation="sin", *, h=4, bias=True, dtype=torch.float32, device="cpu",
                seed=0):
    """[x, weight, bias, g_params] in `dtype` (weight rows scaled so that z = O(1)) and (omega, gamma)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, d, generator=g, dtype=torch.float64)
    weight = torch.randn(rank * dbar, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    b = 0.5 * torch.randn(rank * dbar, generator=g, dtype=torch.float64) if bias else None
    g_params = None
    if activation == "mlp":
        g_params = torch.randn(3, rank, dbar, h, generator=g, dtype=torch.float64) * torch.tensor(
            [0.5, 1.0, 0.3], dtype=torch.float64).view(3, 1, 1, 1)
    inputs = [None if t is None else t.to(device, dtype) for t in (x, weight, b, g_params)]
    return inputs, (2.0 if activation == "sin" else 1.0, dbar ** -0.5)


def grad_output(M, rank, dtype, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, rank, generator=g, dtype=torch.float64).to(device, dtype)


# ---------------------------------------------------------------- limits and codes shared with Python
@needs_ext
def test_codes_and_limits_match_python():
    assert tuple(EXT.LRNN_ACTIVATIONS) == ACTIVATIONS
    assert EXT.LRNN_MAX_DBAR == lrnn_common.MAX_DBAR == lrnn_cuda.TILE_COLUMNS
    assert EXT.LRNN_MAX_HIDDEN == lrnn_common.MAX_HIDDEN


# ---------------------------------------------------------------- the device math, compiled for the host
_Z = [0.0, -0.0, 1e-30, -1e-30, 1e-6, -1e-6, 0.3, -0.3, 1.0, -1.0, 2.5, -2.5, 20.0, -20.0, 1e4, -1e4, 1e20, -1e20,
      math.inf, -math.inf, math.nan]


def _assert_same(name, got, want, rtol):
    """Same NaN and infinity pattern; finite values within rtol * (1 + |want|)."""
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{name}: NaN at {torch.isnan(got).nonzero().tolist()}"
    inf = torch.isinf(want) | torch.isinf(got)
    assert torch.equal(got[inf], want[inf]), f"{name}: {got[inf]} != {want[inf]}"
    finite = torch.isfinite(want) & torch.isfinite(got)
    bad = (got[finite] - want[finite]).abs() > rtol * (1 + want[finite].abs())
    assert not bad.any(), f"{name}: {got[finite][bad].tolist()} != {want[finite][bad].tolist()}"


def _host_values(function, code, z, omega):
    return torch.tensor([function(code, v, omega) for v in z.tolist()], dtype=torch.float64)


@needs_ext
@pytest.mark.parametrize("activation", FIXED)
def test_activation_host_matches_reference(activation):
    code = ACTIVATIONS.index(activation)
    z = torch.tensor(_Z, dtype=torch.float32).double()  # float32 inputs, as the kernels see them
    want_g, want_dg = reference._activation(activation, 1.0, z, None)
    _assert_same(f"{activation} g", _host_values(EXT.lrnn_g_host, code, z, 1.0), want_g, 2e-6)
    _assert_same(f"{activation} g'", _host_values(EXT.lrnn_g_grad_host, code, z, 1.0), want_dg, 2e-6)
    if activation == "sin":  # omega z is rounded to float32 first: moderate arguments only
        z, omega = z[z.abs() <= 2.5], torch.tensor(1.7, dtype=torch.float32).item()
        want_g, want_dg = reference._activation(activation, omega, z, None)
        _assert_same("sin(omega z)", _host_values(EXT.lrnn_g_host, code, z, omega), want_g, 2e-6)
        _assert_same("omega cos(omega z)", _host_values(EXT.lrnn_g_grad_host, code, z, omega), want_dg, 2e-6)


@needs_ext
def test_spder_gradient_is_finite_and_zero_at_zero():
    """g' = sqrt|z| (cos z + sinc(z) / 2): exactly 0 at +-0 and tending to 0 next to it, never NaN or inf."""
    code = ACTIVATIONS.index("spder")
    assert EXT.lrnn_g_grad_host(code, 0.0, 1.0) == 0.0 and EXT.lrnn_g_grad_host(code, -0.0, 1.0) == 0.0
    assert EXT.lrnn_g_host(code, 0.0, 1.0) == 0.0
    for z in (1e-38, 1e-45, -1e-45, 1e-12):  # denormals included
        z = torch.tensor(z, dtype=torch.float32).item()  # the float32 value the kernels see
        grad = EXT.lrnn_g_grad_host(code, z, 1.0)
        assert math.isfinite(grad) and abs(grad - 1.5 * math.sqrt(abs(z))) <= 1e-6 * math.sqrt(abs(z)) + 1e-30


@needs_ext
def test_mlp_host_matches_autograd():
    """g, g' and u * d g / d(a, w, c) of one mlp component against torch autograd in float64."""
    g = torch.Generator().manual_seed(0)
    for h in (1, 5, 16):
        a, w, c = (torch.randn(h, generator=g).float().double() for _ in range(3))
        z, u = 0.7, -1.3
        got = EXT.lrnn_mlp_host(z, a.tolist(), w.tolist(), c.tolist(), u)
        leaves = [torch.tensor(z, dtype=torch.float64, requires_grad=True)] + [t.clone().requires_grad_() for t in
                                                                                (a, w, c)]
        value = (leaves[1] * torch.tanh(leaves[2] * leaves[0] + leaves[3])).sum()
        grads = torch.autograd.grad(value, leaves)
        assert got[0] == pytest.approx(value.item(), rel=1e-5, abs=1e-6)
        assert got[1] == pytest.approx(grads[0].item(), rel=1e-5, abs=1e-6)
        for name, mine, want in zip("awc", got[2:], grads[1:]):
            assert mine == pytest.approx((u * want).tolist(), rel=1e-5, abs=1e-6), name


@needs_ext
def test_host_math_rejects_bad_codes_and_widths():
    with pytest.raises(ValueError, match="activation code"):
        EXT.lrnn_g_host(ACTIVATIONS.index("mlp"), 0.0, 1.0)
    with pytest.raises(ValueError, match="activation code"):
        EXT.lrnn_g_grad_host(-1, 0.0, 1.0)
    with pytest.raises(ValueError, match="same length"):
        EXT.lrnn_mlp_host(0.0, [1.0] * 17, [1.0] * 17, [1.0] * 17, 1.0)


# ---------------------------------------------------------------- the kernels' source, emulated on the CPU
@pytest.fixture(scope="session")
def emulated_extension():
    """csrc/lrnn.cu built by the host compiler under tests/emulation/cuda_emulation.h."""
    return emulated_kernels.build("hk_lrnn_emulated", "lrnn_module.cpp", [emulated_kernels.CSRC / "lrnn.cu"],
                                 flags=("-Werror",))


@pytest.fixture
def emulated(emulated_extension, monkeypatch):
    """cuda.py's forward / backward run the emulated kernels on CPU tensors."""
    emulated_kernels.run_on_cpu(lrnn_cuda, emulated_extension, monkeypatch)
    return emulated_extension


def check_emulated(inputs, rank, dbar, activation, omega, gamma, *, needs=(True,) * 4, grad_phi=None, **backward):
    """cuda.forward / cuda.backward (the emulated kernels) against reference.forward / backward on float64 copies,
    with the backend modules' signatures (what op.py calls). Returns (phi, gradients)."""
    grad_phi = grad_output(inputs[0].shape[0], rank, inputs[0].dtype) if grad_phi is None else grad_phi
    return check_backend_module(lrnn_cuda, reference, inputs, (rank, dbar, activation, omega, gamma), grad_phi, needs,
                                GRAD_NAMES, **backward)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_emulated_matches_reference(emulated, dtype, activation):
    inputs, (omega, gamma) = make_inputs(activation=activation, dtype=dtype)
    check_emulated(inputs, 7, 3, activation, omega, gamma)


@pytest.mark.parametrize("size", [
    dict(d=1, dbar=1, activation="sin"),                  # K padding to a single slice; dbar = 1 (an MLP)
    dict(d=2, dbar=33, activation="spder", bias=False),   # 33 of 64 columns per tile, one neuron each
    dict(d=70, dbar=3, activation="mlp", h=16),           # three d slices, the last ragged; widest mlp
    dict(d=40, dbar=8, activation="tanh"),                # 16-byte loads with a ragged slice, 8 neurons a tile
    dict(d=5, dbar=64, rank=3, activation="arctan"),      # the widest neuron
    dict(M=1, d=3, dbar=5, rank=30, activation="mlp", h=1),  # one row; three column tiles (12 + 12 + 6 neurons)
], ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_sizes(emulated, size, dtype):
    size = dict(size)
    activation, rank, dbar = size.pop("activation"), size.get("rank", 7), size["dbar"]
    inputs, (omega, gamma) = make_inputs(activation=activation, dtype=dtype, **size)
    check_emulated(inputs, rank, dbar, activation, omega, gamma)


def zero_factor_inputs(M, d, rank, dbar, dtype, device="cpu"):
    """mlp inputs (h = 2, gamma = 1) whose factors are exactly 0 (in float32 and float64) at components
    ZERO_COLUMNS: weight row 0 and bias 0 give z = 0, where g = -tanh(20) + tanh(z) = -1 and g' = 1. Neuron 0 has one
    such factor (its component's gradient is the product of the other factors, exact), neuron 2 two (every
    component of neuron 2 has gradient 0). A division by the product would give NaN or inf there."""
    inputs, _ = make_inputs(M=M, d=d, rank=rank, dbar=dbar, activation="mlp", h=2, dtype=dtype, device=device)
    weight, bias, g_params = inputs[1:]
    columns = [0 * dbar + 2, 2 * dbar + 0, 2 * dbar + dbar - 1]
    weight[columns] = 0
    bias[columns] = 0
    for column in columns:
        g_params[:, column // dbar, column % dbar] = torch.tensor([[-1.0, 1.0], [0.0, 1.0], [20.0, 0.0]])
    return inputs, columns


def check_zero_factors(phi, grads, columns, dbar):
    assert phi[:, [0, 2]].eq(0).all() and phi[:, [1, 3]].ne(0).all()
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
    dbias = grads[2]
    assert dbias[columns[0]] != 0 and dbias[2 * dbar:3 * dbar].eq(0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_exact_zero_factors(emulated, dtype):
    rank, dbar = 4, 5
    inputs, columns = zero_factor_inputs(37, 6, rank, dbar, dtype)
    phi, grads = check_emulated(inputs, rank, dbar, "mlp", 1.0, 1.0)
    check_zero_factors(phi, grads, columns, dbar)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_spder_at_zero(emulated, dtype):
    """Components with z = 0 exactly (zero weight row, zero bias): g = 0, g' = 0, no NaN anywhere."""
    rank, dbar = 3, 4
    inputs, _ = make_inputs(M=20, d=3, rank=rank, dbar=dbar, activation="spder", dtype=dtype)
    weight, bias = inputs[1], inputs[2]
    weight[[1, 6, 7]] = 0
    bias[[1, 6, 7]] = 0
    _, grads = check_emulated(inputs, rank, dbar, "spder", 1.0, 0.5)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
    assert torch.equal(grads[2][[1, 6, 7]], torch.zeros(3, dtype=dtype))


@pytest.mark.parametrize("activation", ["sin", "mlp"])
def test_emulated_chunks_and_splits(emulated, activation):
    """300 rows in chunks of 128 (grad_z bounded by chunk_bytes), mlp sums over several 128-row splits: the same
    gradients as one chunk (to float32 rounding) and as the reference; runs repeat bit for bit."""
    rank, dbar = 3, 7
    inputs, (omega, gamma) = make_inputs(M=300, d=2, rank=rank, dbar=dbar, activation=activation, dtype=torch.float32)
    grad_phi = grad_output(300, rank, torch.float32)
    _, whole = check_emulated(inputs, rank, dbar, activation, omega, gamma, grad_phi=grad_phi)
    small = rank * dbar * 4 * 128  # bytes of grad_z in 128 rows: three chunks
    _, chunked = check_emulated(inputs, rank, dbar, activation, omega, gamma, grad_phi=grad_phi, chunk_bytes=small)
    again = lrnn_cuda.backward(grad_phi, *inputs, rank, dbar, activation, omega, gamma, [True] * 4, chunk_bytes=small)
    for name, a, b, c in zip(GRAD_NAMES, whole, chunked, again):
        if a is not None:
            assert_close(f"{name} chunked vs whole", b, a.double(), torch.float32)
            assert torch.equal(b, c), f"{name}: not the same bits run to run"


def test_emulated_forward_in_grid_sized_launches(emulated, monkeypatch):
    """A forward whose grid would pass the launch limit runs in pieces of whole 64-row tiles (here a limit of four
    blocks and rank 20 x dbar 7 = three column tiles: one 64-row tile per launch)."""
    monkeypatch.setattr(lrnn_cuda, "_MAX_BLOCKS", 4)
    calls = []
    monkeypatch.setattr(emulated, "lrnn_fwd", lambda params, stream, _f=emulated.lrnn_fwd: (calls.append(params.M),
                                                                                           _f(params, stream)))
    inputs, (omega, gamma) = make_inputs(M=150, d=3, rank=20, dbar=7, activation="arctan")
    check_emulated(inputs, 20, 7, "arctan", omega, gamma, needs=(True, False, False, False))
    assert calls == [64, 64, 22]


def test_emulated_one_row_with_any_stride(emulated):
    """A contiguous (1, d) tensor may carry any row stride (PyTorch ignores the stride of a size-1 dim): the launchers
    must not hand it to the kernels as the row stride."""
    inputs, (omega, gamma) = make_inputs(M=1, d=6, rank=4, dbar=3, activation="sin")
    x = inputs[0].reshape(6, 1).t()
    grad_phi = grad_output(1, 4, torch.float32).reshape(4, 1).t()
    assert x.is_contiguous() and x.stride(0) == 1 and grad_phi.is_contiguous() and grad_phi.stride(0) == 1
    check_emulated([x, *inputs[1:]], 4, 3, "sin", omega, gamma, grad_phi=grad_phi)


def test_emulated_each_gradient_alone(emulated):
    inputs, (omega, gamma) = make_inputs(activation="mlp", dtype=torch.float16)
    for which in range(4):
        check_emulated(inputs, 7, 3, "mlp", omega, gamma, needs=tuple(i == which for i in range(4)))


# ---------------------------------------------------------------- every launcher writes only its outputs
def _exact_grad_z(x, weight, bias, g_params, rank, dbar, activation, omega, gamma, grad_phi):
    """dL/dz (M, rank * dbar) in float64 by autograd through the reference forward's formula."""
    z = x.double() @ weight.double().T
    z = (z if bias is None else z + bias.double()).requires_grad_()
    g, _ = reference._activation(activation, omega, z.view(-1, rank, dbar),
                                 None if g_params is None else g_params.double())
    phi = torch.prod(1 + gamma * g, -1)
    return torch.autograd.grad(phi, z, grad_phi.double())[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation, d, row_pad", [("spder", 5, 3), ("mlp", 16, 8)])
def test_emulated_launchers_stay_in_bounds(emulated_extension, dtype, activation, d, row_pad):
    """M = 150 (three 64-row tiles, the last partial; three 64-row splits), rank 7 x dbar 20 (three column tiles of 3,
    3 and 1 neurons, 60 of 64 columns used); row-padded x, grad_phi, phi and grad_z. d = 16 with 8 padding columns
    takes the 16-byte loads, d = 5 the element loads."""
    ext = emulated_extension
    M, rank, dbar, h = 150, 7, 20, 3
    inputs, (omega, gamma) = make_inputs(M=M, d=d, rank=rank, dbar=dbar, activation=activation, h=h, dtype=dtype)
    x, weight, bias, g_params = inputs
    grad_phi = grad_output(M, rank, dtype)
    gx = guarded_copy(x, name="x", row_pad=row_pad)
    gw, gb = guarded_copy(weight, name="weight"), guarded_copy(bias, name="bias")
    gg = guarded_copy(g_params, name="g_params") if g_params is not None else None
    gphi_in = guarded_copy(grad_phi, name="grad_phi", row_pad=row_pad)
    phi = guard_buffer((M, rank), dtype, name="phi", row_pad=row_pad)
    gz = guard_buffer((M, rank * dbar), dtype, name="grad_z", row_pad=row_pad)
    splits = 3
    part = guard_buffer((splits, 3, rank * dbar, h), torch.float32, name="g_params part") if gg else None
    common = dict(x=gx.view.data_ptr(), weight=gw.view.data_ptr(), bias=gb.view.data_ptr(),
                  g_params=gg.view.data_ptr() if gg else 0, M=M, d=d, rank=rank, dbar=dbar, h=h if gg else 0,
                  x_row_stride=d + row_pad, dtype=ext.DTYPES.index(str(dtype).removeprefix("torch.")),
                  activation=ACTIVATIONS.index(activation), omega=omega, gamma=gamma)
    ext.lrnn_fwd(ext.LrnnParams(**common, phi=phi.view.data_ptr(), phi_row_stride=rank + row_pad), 0)
    ext.lrnn_bwd(ext.LrnnParams(**common, grad_phi=gphi_in.view.data_ptr(), phi_row_stride=rank + row_pad,
                                grad_z=gz.view.data_ptr(), grad_z_row_stride=rank * dbar + row_pad,
                                g_params_part=part.view.data_ptr() if part else 0, rows_per_split=64), 0)
    outputs = [phi, gz] + ([part] if part else [])
    check_guards(*outputs)
    for guard in (gx, gw, gb, gphi_in) + ((gg,) if gg else ()):
        assert_guard_untouched(guard, f"input {guard.name}")
    options = (rank, dbar, activation, omega, gamma)
    wide = [None if t is None else t.double() for t in inputs]
    assert_close("phi", phi.view, reference.forward(*wide, *options), dtype)
    assert_close("grad_z", gz.view, _exact_grad_z(*inputs, *options, grad_phi), dtype)
    if part:
        want = reference.backward(grad_phi.double(), *wide, *options, [False, False, False, True])[3]
        assert_close("g_params part", part.view.double().sum(0).view(want.shape), want, dtype)


def _bad_params(ext, **fields):
    """Valid params for a 10 x 4 input, rank 3, dbar 5 (pointers are never dereferenced: the launchers refuse)."""
    base = dict(x=256, weight=256, bias=0, g_params=256, phi=256, grad_phi=256, grad_z=256, g_params_part=0, M=10,
                d=4, rank=3, dbar=5, h=2, x_row_stride=4, phi_row_stride=3, grad_z_row_stride=15, rows_per_split=64,
                dtype=0, activation=ACTIVATIONS.index("mlp"), omega=1.0, gamma=0.5)
    return ext.LrnnParams(**{**base, **fields})


BAD = [dict(dbar=65), dict(dbar=0), dict(M=0), dict(d=0), dict(rank=0), dict(activation=5), dict(activation=-1),
       dict(h=0), dict(h=17), dict(g_params=0), dict(x=0), dict(weight=0), dict(x_row_stride=3), dict(dtype=7)]


@pytest.mark.parametrize("bad", BAD, ids=str)
def test_emulated_launchers_refuse_bad_params(emulated_extension, bad):
    """Refused before any launch, so this is safe on a GPU too; RuntimeError through the bindings."""
    ext = emulated_extension
    with pytest.raises(RuntimeError, match="lrnn_fwd failed"):
        ext.lrnn_fwd(_bad_params(ext, **bad), 0)
    with pytest.raises(RuntimeError, match="lrnn_bwd failed"):
        ext.lrnn_bwd(_bad_params(ext, **bad), 0)


@pytest.mark.parametrize("bad", [dict(phi=0), dict(phi_row_stride=2)], ids=str)
def test_emulated_forward_refuses_bad_outputs(emulated_extension, bad):
    with pytest.raises(RuntimeError, match="lrnn_fwd failed"):
        emulated_extension.lrnn_fwd(_bad_params(emulated_extension, **bad), 0)


@pytest.mark.parametrize("bad", [dict(grad_phi=0), dict(phi_row_stride=2), dict(grad_z=0), dict(grad_z_row_stride=14),
                                 dict(rows_per_split=0), dict(rows_per_split=96)], ids=str)
def test_emulated_backward_refuses_bad_outputs(emulated_extension, bad):
    with pytest.raises(RuntimeError, match="lrnn_bwd failed"):
        emulated_extension.lrnn_bwd(_bad_params(emulated_extension, **bad), 0)


@needs_ext
@pytest.mark.parametrize("bad", [dict(dbar=65), dict(activation=5), dict(h=17), dict(rows_per_split=96)], ids=str)
def test_built_launchers_refuse_bad_params(bad):
    with pytest.raises(RuntimeError, match="lrnn_bwd failed"):
        EXT.lrnn_bwd(_bad_params(EXT, **bad), 0)
    if "rows_per_split" not in bad:
        with pytest.raises(RuntimeError, match="lrnn_fwd failed"):
            EXT.lrnn_fwd(_bad_params(EXT, **bad), 0)


# ---------------------------------------------------------------- on a GPU, against the float64 reference
@pytest.fixture
def _no_tf32():
    # The float64 reference runs on the GPU too; keep any float32 matmul of the test itself IEEE. (Saved and
    # restored by hand: monkeypatch's undo deletes the attribute, which torch's cuBLAS module does not allow.)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def run(inputs, rank, dbar, activation, omega, gamma, grads_out=None, *, backend):
    """hk.lrnn_product forward + backward through utils.forward_backward (which asserts that backend="cuda" called
    the _C launchers in both phases). Returns (phi, gradients, grads_out)."""
    def fn(x, weight, bias, g_params):
        return hk.lrnn_product(x, weight, bias, rank=rank, dbar=dbar, activation=activation, omega=omega,
                               gamma=gamma, g_params=g_params, backend=backend)
    outs, grads, grads_out = forward_backward(fn, inputs, grads_out, backend=backend)
    return outs[0], grads, grads_out


def check_gpu(inputs, rank, dbar, activation, omega, gamma, tol=None):
    phi, grads, grads_out = run(inputs, rank, dbar, activation, omega, gamma, backend="cuda")
    ref_phi, ref_grads, _ = run([None if t is None else t.double() for t in inputs], rank, dbar, activation, omega,
                                gamma, grads_out, backend="reference")
    dtype = inputs[0].dtype
    assert_close("phi", phi, ref_phi, dtype, tol)
    for name, t, grad, ref in zip(GRAD_NAMES, inputs, grads, ref_grads):
        if t is not None:
            assert grad is not None and grad.dtype == dtype, f"{name} missing or {grad.dtype}"
            assert_close(name, grad, ref, dtype, tol)
    return phi, grads


@cuda
@requires_cuda
@pytest.mark.usefixtures("_no_tf32")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cuda_matches_reference(dtype, activation):
    inputs, (omega, gamma) = make_inputs(M=1000, d=48, rank=40, dbar=8, activation=activation, dtype=dtype,
                                         device="cuda")
    check_gpu(inputs, 40, 8, activation, omega, gamma)


@cuda
@requires_cuda
@pytest.mark.usefixtures("_no_tf32")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", [
    dict(M=65536, d=2, rank=256, dbar=8, activation="spder"),   # the INR benchmark's layer
    dict(M=4096, d=512, rank=512, dbar=16, activation="sin"),   # a deep LRNN's hidden layer
    dict(M=333, d=1, rank=37, dbar=1, activation="tanh"),       # audio: d = 1; dbar = 1
    dict(M=130, d=4096, rank=9, dbar=33, activation="arctan", bias=False),
    dict(M=200, d=70, rank=4096, dbar=2, activation="mlp", h=16),
    dict(M=65, d=33, rank=5, dbar=64, activation="mlp", h=3),
], ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_cuda_sizes(dtype, size):
    size = dict(size)
    activation, rank, dbar = size.pop("activation"), size["rank"], size["dbar"]
    inputs, (omega, gamma) = make_inputs(activation=activation, dtype=dtype, device="cuda", **size)
    check_gpu(inputs, rank, dbar, activation, omega, gamma)


@cuda
@requires_cuda
def test_cuda_float16_long_reduction():
    """d = 1024 in float16: z accumulates in fp32 (an fp16 accumulator would miss by far more than phi's own
    rounding, which bounds the error here)."""
    inputs, (omega, gamma) = make_inputs(M=512, d=1024, rank=64, dbar=4, activation="tanh", dtype=torch.float16,
                                         device="cuda")
    phi = hk.lrnn_product(*inputs[:3], rank=64, dbar=4, activation="tanh", backend="cuda")
    ref = reference.forward(*[None if t is None else t.double() for t in inputs], 64, 4, "tanh", omega, gamma)
    rounding = (ref.half().double() - ref).norm() / ref.norm()
    assert_close("phi", phi, ref, torch.float16, tol=2 * rounding.item())


@cuda
@requires_cuda
@pytest.mark.usefixtures("_no_tf32")
def test_cuda_chunks_splits_and_determinism():
    """Several row chunks and mlp splits on the device; the same bits run to run and on another stream."""
    rank, dbar = 32, 8
    inputs, (omega, gamma) = make_inputs(M=20000, d=16, rank=rank, dbar=dbar, activation="mlp", h=8,
                                         dtype=torch.bfloat16, device="cuda")
    grad_phi = grad_output(20000, rank, torch.bfloat16, "cuda")
    small = rank * dbar * 2 * 4096
    first = lrnn_cuda.backward(grad_phi, *inputs, rank, dbar, "mlp", omega, gamma, [True] * 4, chunk_bytes=small)
    wide = [t.double() for t in inputs]
    for name, got, ref in zip(GRAD_NAMES, first, reference.backward(grad_phi.double(), *wide, rank, dbar, "mlp",
                                                                     omega, gamma, [True] * 4)):
        assert_close(name, got, ref, torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        again = lrnn_cuda.backward(grad_phi, *inputs, rank, dbar, "mlp", omega, gamma, [True] * 4, chunk_bytes=small)
    torch.cuda.current_stream().wait_stream(stream)
    for name, a, b in zip(GRAD_NAMES, first, again):
        assert torch.equal(a, b), name


@cuda
@requires_cuda
@pytest.mark.usefixtures("_no_tf32")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_exact_zero_factors(dtype):
    rank, dbar = 16, 5
    inputs, columns = zero_factor_inputs(300, 24, rank, dbar, dtype, "cuda")
    phi, grads = check_gpu(inputs, rank, dbar, "mlp", 1.0, 1.0)
    check_zero_factors(phi, grads, columns, dbar)


@cuda
@requires_cuda
def test_cuda_backward_memory_is_bounded():
    """Transient memory of the backward beyond the gradients it returns: one grad_z chunk (CHUNK_BYTES) and small
    sums, not the (M, rank * dbar) grad_z (256 MiB here)."""
    rank, dbar = 256, 8
    inputs, (omega, gamma) = make_inputs(M=65536, d=2, rank=rank, dbar=dbar, activation="spder",
                                         dtype=torch.bfloat16, device="cuda")
    args = (grad_output(65536, rank, torch.bfloat16, "cuda"), *inputs, rank, dbar, "spder", omega, gamma,
            [True, True, True, False])
    lrnn_cuda.backward(*args)  # warm-up: cuBLAS takes its workspace
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    grads = lrnn_cuda.backward(*args)
    torch.cuda.synchronize()
    returned = sum(g.numel() * g.element_size() for g in grads if g is not None)
    transient = torch.cuda.max_memory_allocated() - before - returned
    assert transient <= lrnn_common.CHUNK_BYTES + 2**20, f"{transient} bytes"
