"""poly_ncp's CUDA C++ kernels (csrc/poly_ncp.cu) without a GPU: the real source built by the host compiler under
tests/emulation/cuda_emulation.h and wmma_emulation.h (tests/emulation/poly_ncp_module.cpp) and driven by
hadamard_kernels/ops/poly_ncp/cuda.py on CPU tensors, against the float64 reference, in float32 (the SIMT path),
float16 and bfloat16 (wmma): the fast path, the per-degree path (k > 256, or forced), launcher errors, and the
per-degree launches into guard buffers. On a GPU, tests/test_poly_ncp.py runs the built extension itself."""

from __future__ import annotations

import emulated_kernels
import pytest
import torch
from guard import assert_guard_untouched, check_guards, guard_buffer, guarded_copy
from test_poly_ncp import NAMES, make_inputs
from utils import assert_close

from hadamard_kernels.ops.poly_ncp import common as ncp_common
from hadamard_kernels.ops.poly_ncp import cuda as ncp_cuda
from hadamard_kernels.ops.poly_ncp import reference as ncp_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="session")
def emulated_extension():
    """csrc/poly_ncp.cu built by the host compiler under the CPU emulation."""
    kernels = [emulated_kernels.CSRC / "poly_ncp.cu"]
    return emulated_kernels.build("hk_poly_ncp_emulated", "poly_ncp_module.cpp", kernels, flags=("-Werror",))


@pytest.fixture
def emulated(emulated_extension, monkeypatch):
    """cuda.py's functions run the emulated kernels on CPU tensors."""
    emulated_kernels.run_on_cpu(ncp_cuda, emulated_extension, monkeypatch)
    return emulated_extension


@pytest.fixture
def per_degree(monkeypatch):
    """Every k takes the per-degree path, so it is checked at small, cheap sizes too."""
    monkeypatch.setattr(ncp_cuda, "MAX_K", 0)


def check_against_reference(inputs, seed=3):
    """cuda.py's forward and backward (all five gradients) against the float64 reference."""
    dtype = inputs[0].dtype
    exact = [None if t is None else t.double() for t in inputs]
    y = ncp_cuda.forward(*inputs)
    assert_close("y", y, ncp_reference.forward(*exact), dtype)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    needs = [t is not None for t in inputs]
    grads = ncp_cuda.backward(grad_y.to(dtype), *inputs, needs)
    ref = ncp_reference.backward(grad_y.to(dtype).double(), *exact, needs)
    for name, got, want in zip(NAMES, grads, ref):
        if want is not None:
            assert_close(f"d{name}", got, want, dtype)


def test_max_k_matches_the_source(emulated_extension):
    assert emulated_extension.POLY_NCP_MAX_K == ncp_cuda.MAX_K


@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_path(emulated, dtype):
    check_against_reference(make_inputs(lead=(3, 13), d=45, k=23, N=3, dtype=dtype))


@pytest.mark.parametrize("dtype, bias", [(torch.float32, True), (torch.bfloat16, False)])
def test_k_past_the_fast_path(emulated, dtype, bias):
    """k = 257: the per-degree path (5 column tiles, the last one column wide), odd d."""
    check_against_reference(make_inputs(lead=(3,), d=7, k=ncp_cuda.MAX_K + 1, N=2, dtype=dtype, bias=bias))


@pytest.mark.parametrize("dtype, shape", [
    (torch.float32, dict(lead=(70,), d=45, k=23, N=3)),     # two row tiles (the last ragged), d past a chunk
    (torch.float16, dict(lead=(5,), d=9, k=70, N=2)),       # two column tiles, even N: y_1 in the workspace
    (torch.bfloat16, dict(lead=(2, 3), d=33, k=5, N=1)),    # N = 1: no chain, no workspace
])
def test_per_degree_path(emulated, per_degree, dtype, shape):
    check_against_reference(make_inputs(**shape, dtype=dtype))


def test_per_degree_zero_factor(emulated, per_degree):
    """A zero row of A_2 and a_2: its gradient is g * s_2, not 0; S_2's row and s_2's entry get exactly 0."""
    inputs = make_inputs(lead=(9,), d=6, k=5, N=3, dtype=torch.float32)
    inputs[1][1, 2] = 0.0
    inputs[2][1, 2] = 0.0
    check_against_reference(inputs)
    grads = ncp_cuda.backward(torch.ones(9, 5), *inputs, [True] * 5)
    assert grads[1][1, 2].abs().sum() > 0 and grads[3][0, 2].abs().sum() == 0 and grads[4][0, 2] == 0


# ---------------------------------------------------------------- the launchers
def _params(ext, inputs, **fields):
    x, a_weight, a_bias, s_weight, s_bias = inputs
    N, K, D = a_weight.shape
    return ext.PolyNcpParams(x=x.data_ptr(), a_weight=a_weight.data_ptr(), a_bias=a_bias.data_ptr(),
                             s_weight=s_weight.data_ptr(), s_bias=s_bias.data_ptr(), M=x.shape[0], d=D, k=K, N=N,
                             x_row_stride=x.stride(0), dtype=0, **fields)


def test_per_degree_forward_needs_a_workspace(emulated_extension):
    inputs = make_inputs(lead=(4,), d=3, k=ncp_cuda.MAX_K + 1, N=2, dtype=torch.float32)
    y = torch.empty(4, ncp_cuda.MAX_K + 1)
    with pytest.raises(RuntimeError, match="poly_ncp_fwd failed"):
        emulated_extension.poly_ncp_fwd(_params(emulated_extension, inputs, y=y.data_ptr(), y_row_stride=y.stride(0)),
                                        0)


ROW_PAD = 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_degree_launches_stay_in_bounds(emulated_extension, dtype):
    """Row-padded x, y and grad_y, everything in guards; 70 rows and 70 columns leave ragged 64 x 64 tiles."""
    M, K, N, D = 70, 70, 3, 5
    inputs = make_inputs(lead=(M,), d=D, k=K, N=N, dtype=dtype)
    x = guarded_copy(inputs[0], name="x", row_pad=ROW_PAD)
    weights = [guarded_copy(t, name=n) for n, t in zip(NAMES[1:], inputs[1:])]
    gy = torch.randn(M, K, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    g = guarded_copy(gy, name="grad_y", row_pad=ROW_PAD)
    y = guard_buffer((M, K), dtype, name="y", row_pad=ROW_PAD)
    workspace = guard_buffer((M, K), dtype, name="workspace")
    grad_a = guard_buffer((M, N, K), dtype, name="grad_a")
    grad_s, ys = guard_buffer((N - 1, M, K), dtype, name="grad_s"), guard_buffer((N - 1, M, K), dtype, name="ys")
    ext = emulated_extension
    code = ext.DTYPES.index(str(dtype).removeprefix("torch."))
    common = dict(x=x.view.data_ptr(), a_weight=weights[0].view.data_ptr(), a_bias=weights[1].view.data_ptr(),
                  s_weight=weights[2].view.data_ptr(), s_bias=weights[3].view.data_ptr(), M=M, d=D, k=K, N=N,
                  x_row_stride=x.view.stride(0), dtype=code, per_degree=True)
    ext.poly_ncp_fwd(ext.PolyNcpParams(**common, y=y.view.data_ptr(), y_row_stride=y.view.stride(0),
                                       workspace=workspace.view.data_ptr()), 0)
    ext.poly_ncp_bwd(ext.PolyNcpParams(**common, grad_y=g.view.data_ptr(), y_row_stride=g.view.stride(0),
                                       grad_a=grad_a.view.data_ptr(), grad_s=grad_s.view.data_ptr(),
                                       ys=ys.view.data_ptr()), 0)
    check_guards(y, workspace, grad_a, grad_s, ys)  # N = 3: y_1 and y_3 in y, y_2 in the workspace
    for guard in (x, g, *weights):
        assert_guard_untouched(guard, f"input {guard.name}")
    exact = [t.double() for t in inputs]
    assert_close("y", y.view, ncp_reference.forward(*exact), dtype)
    grads = ncp_common.backward_in_row_chunks(lambda *_: (grad_a.view, grad_s.view, ys.view), gy, *inputs, [True] * 5)
    for name, got, want in zip(NAMES, grads, ncp_reference.backward(gy.double(), *exact, [True] * 5)):
        assert_close(f"d{name}", got, want, dtype)
