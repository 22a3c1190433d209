"""poly_sa's CUDA C++ kernels (csrc/poly_sa.cu) without a GPU: the real source built by the host compiler under
tests/emulation/cuda_emulation.h (blocks run as fibers; tests/emulation/poly_sa_module.cpp emulates the wmma calls)
and driven by hadamard_kernels/ops/poly_sa/cuda.py on CPU tensors, against the float64 reference, in float32
(the SIMT path), float16 and bfloat16 (the tensor-core path); every launcher into guard buffers (no store outside
its outputs). On a GPU, tests/test_poly_sa.py runs the built extension itself."""

from __future__ import annotations

import math

import emulated_kernels
import pytest
import torch
from guard import assert_guard_untouched, check_guards, guard_buffer, guarded_copy
from utils import assert_close

from hadamard_kernels.ops.poly_sa import common as sa_common
from hadamard_kernels.ops.poly_sa import cuda as sa_cuda
from hadamard_kernels.ops.poly_sa import reference as sa_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GRAD_NAMES = ("dz", "dw1", "dw2", "dw3", "dalpha", "dbeta")


@pytest.fixture(scope="session")
def emulated_extension():
    """csrc/poly_sa.cu built by the host compiler under tests/emulation/cuda_emulation.h."""
    return emulated_kernels.build("hk_poly_sa_emulated", "poly_sa_module.cpp", [emulated_kernels.CSRC / "poly_sa.cu"],
                                 flags=("-Werror",))


@pytest.fixture
def emulated(emulated_extension, monkeypatch):
    """cuda.py's functions run the emulated kernels on CPU tensors."""
    emulated_kernels.run_on_cpu(sa_cuda, emulated_extension, monkeypatch)
    return emulated_extension


def make_inputs(B=2, N=37, C=45, dtype=torch.float32, seed=0):
    """[z, w1, w2, w3, alpha, beta] (the survey's scales) and an output gradient."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, N, C, generator=g)
    ws = [torch.randn(C, C, generator=g) / math.sqrt(C) for _ in range(3)]
    scalars = [torch.randn(1, generator=g) for _ in range(2)]
    return [t.to(dtype) for t in (z, *ws, *scalars)], torch.randn(B, N, C, generator=g).to(dtype)


def make_mask(kind, B, N, seed=1):
    if kind == "none":
        return None
    mask = torch.rand(B, N, generator=torch.Generator().manual_seed(seed)) < 0.6
    if kind == "all-false":
        return torch.zeros(B, N, dtype=torch.bool)
    mask[0] = True
    mask[-1] = False
    return mask


def check_against_reference(inputs, grad_y, mask):
    """cuda.py's poly_sa and poly_sa_pool, forward and backward, against the float64 reference."""
    dtype = inputs[0].dtype
    exact = [t.double() for t in inputs]
    y = sa_cuda.forward(*inputs, mask)
    assert_close("y", y, sa_reference.forward(*exact, mask), dtype)
    grads = sa_cuda.backward(grad_y, *inputs, mask, [True] * 6)
    ref_grads = sa_reference.backward(grad_y.double(), *exact, mask, [True] * 6)
    for name, got, ref in zip(GRAD_NAMES, grads, ref_grads):
        assert_close(name, got, ref, dtype)
    m = sa_cuda.pool_forward(*inputs[:3], mask)
    assert_close("m", m, sa_reference.pool_forward(*exact[:3], mask), dtype)
    grad_m = grad_y[:, 0]
    pool_grads = sa_cuda.pool_backward(grad_m, *inputs[:3], mask, [True] * 3)
    ref_pool_grads = sa_reference.pool_backward(grad_m.double(), *exact[:3], mask, [True] * 3)
    for name, got, ref in zip(("pool dz", "pool dw1", "pool dw2"), pool_grads, ref_pool_grads):
        assert_close(name, got, ref, dtype)
    return y, grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "ragged"])
def test_emulated_matches_reference(emulated, dtype, mask_kind):
    inputs, grad_y = make_inputs(dtype=dtype)
    check_against_reference(inputs, grad_y, make_mask(mask_kind, 2, 37))


@pytest.mark.parametrize("shape", [
    dict(B=1, N=1, C=1),      # one token, one channel
    dict(B=3, N=1, C=20),     # N = 1
    dict(B=1, N=200, C=16),   # two token splits of 128 (the second ragged), a multiple-of-16 C
    dict(B=2, N=9, C=70),     # two column blocks, three contraction slices
])
def test_emulated_shapes(emulated, shape):
    inputs, grad_y = make_inputs(**shape, dtype=torch.bfloat16)
    check_against_reference(inputs, grad_y, make_mask("ragged", shape["B"], shape["N"]) if shape["B"] > 1 else None)


def test_emulated_no_real_token_and_determinism(emulated):
    """All tokens padded: m = 0 exactly and Y = alpha z; two runs give the same bits."""
    inputs, grad_y = make_inputs(dtype=torch.float16)
    mask = make_mask("all-false", 2, 37)
    m = sa_cuda.pool_sum(*inputs[:3], mask)
    assert torch.equal(m, torch.zeros_like(m))
    y, grads = check_against_reference(inputs, grad_y, mask)
    assert torch.equal(y, (inputs[4].float() * inputs[0].float()).half())
    again = sa_cuda.backward(grad_y, *inputs, mask, [True] * 6)
    for name, a, b in zip(GRAD_NAMES, grads, again):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------- every launcher writes only its outputs
ROW_PAD = 3
B, N, C = 2, 37, 45  # row tiles straddle batch rows; a ragged column block


def _launch_all(ext, dtype, masked):
    """Each launcher on row-padded, NaN-guarded inputs into guarded outputs; returns the output guards, the input
    guards and the outputs' expected values."""
    inputs, grad_y = make_inputs(B, N, C, dtype=dtype)
    mask = make_mask("ragged", B, N) if masked else None
    z = guarded_copy(inputs[0].reshape(B * N, C), name="z", row_pad=ROW_PAD)
    g = guarded_copy(grad_y.reshape(B * N, C), name="grad_y", row_pad=ROW_PAD)
    weights = [guarded_copy(t, name=n) for n, t in zip(("w1", "w2", "w3", "alpha", "beta"), inputs[1:])]
    exact = [t.double() for t in inputs]
    m_exact = sa_reference.pool_forward(*exact[:3], mask)
    s_exact = torch.randn(B, C, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    m_in = guarded_copy(m_exact.float(), name="m")
    s_in = guarded_copy(s_exact.float(), name="s")
    mask_in = guarded_copy(mask.reshape(-1).to(torch.uint8), name="mask") if masked else None
    per = 16  # three splits per batch row, the last ragged
    splits = -(-N // per)
    outs = dict(pool_part=guard_buffer((B, splits, C), torch.float32, name="pool part"),
                y=guard_buffer((B * N, C), dtype, name="y", row_pad=ROW_PAD),
                dz=guard_buffer((B * N, C), dtype, name="dz", row_pad=ROW_PAD),
                u=guard_buffer((B * N, C), dtype, name="u", row_pad=ROW_PAD),
                bwd_part=guard_buffer((2, B, splits, C), torch.float32, name="out bwd part"),
                grad_p=guard_buffer((B * N, 2 * C), dtype, name="grad_p"))
    ptr = lambda guard: 0 if guard is None else guard.view.data_ptr()  # noqa: E731
    common = dict(z=ptr(z), w1=ptr(weights[0]), w2=ptr(weights[1]), w3=ptr(weights[2]), alpha=ptr(weights[3]),
                  beta=ptr(weights[4]), mask=ptr(mask_in), m=ptr(m_in), s=ptr(s_in), grad_y=ptr(g), B=B, N=N, C=C,
                  tokens_per_split=per, z_row_stride=C + ROW_PAD, g_row_stride=C + ROW_PAD,
                  out_row_stride=C + ROW_PAD, dtype=ext.DTYPES.index(str(dtype).removeprefix("torch.")))
    ext.poly_sa_pool_fwd(ext.PolySaParams(**common, part=ptr(outs["pool_part"])), 0)
    ext.poly_sa_out_fwd(ext.PolySaParams(**common, y=ptr(outs["y"])), 0)
    ext.poly_sa_out_bwd(ext.PolySaParams(**common, part=ptr(outs["bwd_part"]), dz=ptr(outs["dz"]),
                                         u=ptr(outs["u"])), 0)
    ext.poly_sa_pool_bwd(ext.PolySaParams(**common, grad_p=ptr(outs["grad_p"])), 0)

    z3, g3, (w1, w2, w3, alpha, beta) = exact[0], grad_y.double(), exact[1:]
    counts = mask.sum(1) if masked else torch.full((B,), N)
    keep = mask.reshape(-1, 1) if masked else torch.ones(B * N, 1, dtype=torch.bool)
    m_rows = m_exact.float().double().repeat_interleave(N, 0)
    gp = g3.reshape(-1, C) @ w3.T
    zr, gr = z3.reshape(-1, C), g3.reshape(-1, C)
    s_rows = s_exact.float().double().repeat_interleave(N, 0)
    expected = dict(
        pool_part=lambda t: (t.double().sum(1) / counts.clamp_min(1)[:, None], m_exact),
        y=lambda t: (t, alpha * zr + beta * ((zr * m_rows) @ w3)),
        dz=lambda t: (t, alpha * gr + beta * gp * m_rows),
        u=lambda t: (t, beta * zr * m_rows),
        bwd_part=lambda t: (t.double().sum(2)[0], (gp * zr).reshape(B, N, C).sum(1)),
        grad_p=lambda t: (t, torch.where(keep, torch.cat([s_rows * (zr @ w2), s_rows * (zr @ w1)], 1), 0.0)))
    return outs, [z, g, *weights, m_in, s_in] + ([mask_in] if masked else []), expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [True, False])
def test_emulated_launchers_stay_in_bounds(emulated_extension, dtype, masked):
    outs, inputs, expected = _launch_all(emulated_extension, dtype, masked)
    check_guards(*outs.values())
    for guard in inputs:
        assert_guard_untouched(guard, f"input {guard.name}")
    for name, guard in outs.items():
        got, want = expected[name](guard.view)
        assert_close(f"{name} ({dtype}, mask={masked})", got, want, dtype)


def test_token_split_is_a_function_of_the_shape():
    """The split (and so the order of the sums) does not depend on anything but the shape and the device."""
    assert sa_common.token_split(2, 37, 45, torch.device("cpu")) == 128
    assert sa_common.token_split(1, 1000, 16, torch.device("cpu")) == 256  # 4 splits of whole 128-token blocks
    per = sa_common.token_split(8, 16384, 512, torch.device("cpu"))
    assert per % sa_common.SPLIT_ALIGN == 0 and -(-16384 // per) >= 1
