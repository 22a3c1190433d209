"""poly_ncp: every backend available here against the float64 reference, forward and all five gradients."""

from __future__ import annotations

import math

import pytest
import torch
from utils import (
    HAS_CUDA,
    assert_close,
    cpu_backends,
    cuda,
    forward_backward,
    gpu_backends,
    recorded_launches,
    rel_err,
    requires_cuda,
)

import hadamard_kernels as hk
from hadamard_kernels import _backend
from hadamard_kernels.ops.poly_ncp import common
from hadamard_kernels.ops.poly_ncp import triton as ncp_triton
from hadamard_kernels.ops.poly_ncp.op import poly_ncp_op

NAMES = ("x", "a_weight", "a_bias", "s_weight", "s_bias")


def make_inputs(lead=(3, 13), d=45, k=23, N=3, dtype=torch.float64, device="cpu", bias=True, seed=0):
    """x, a_weight, a_bias, s_weight, s_bias, scaled so every factor is O(1) and long chains stay finite."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    x = randn(*lead, d)
    a_weight = randn(N, k, d) / math.sqrt(d)
    s_weight = randn(N - 1, k, k) / math.sqrt(k)
    a_bias = randn(N, k) * 0.5 if bias else None
    # 1 + noise keeps S_n y + s_n away from 0 on average, so y_N does not shrink with the degree.
    s_bias = 1 + randn(N - 1, k) * 0.5 if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return [cast(t) for t in (x, a_weight, a_bias, s_weight, s_bias)]


def run(inputs, grad_y=None, **options):
    """Output and the five gradients of poly_ncp on leaf copies of the inputs; asserts that the backend's own
    kernels ran in the forward and in the backward (nothing launches for an empty batch)."""
    (y,), grads, (grad_y,) = forward_backward(lambda *t: hk.poly_ncp(*t, **options), inputs,
                                              None if grad_y is None else (grad_y,), backend=options.get("backend"),
                                              expect_kernels=inputs[0].numel() > 0)
    return y, grads, grad_y


def check_against_reference(inputs, backend):
    """Runs `backend` on the inputs and the reference on their float64 copies; compares all outputs."""
    y, grads, grad_y = run(inputs, backend=backend)
    ref_y, ref_grads, _ = run([None if t is None else t.double() for t in inputs], grad_y=grad_y.double(),
                              backend="reference")
    dtype = inputs[0].dtype
    assert_close("y", y, ref_y, dtype)
    for name, g, ref_g in zip(NAMES, grads, ref_grads):
        if ref_g is not None:
            assert_close(f"d{name}", g, ref_g, dtype)


# ---------------------------------------------------------------- the reference is the NCP recursion
def scalar_loop(x, a_weight, a_bias, s_weight, s_bias):
    """Brute force: every element from scalar sums, y_1 = A_1 x + a_1, y_n = (A_n x + a_n) * (S_n y_{n-1} + s_n)."""
    N, k, d = a_weight.shape
    out = []
    for row in x.reshape(-1, d).tolist():
        a = [[sum(row[i] * a_weight[n, j, i].item() for i in range(d))
              + (a_bias[n, j].item() if a_bias is not None else 0.0) for j in range(k)] for n in range(N)]
        y = a[0]
        for n in range(1, N):
            s = [sum(s_weight[n - 1, j, i].item() * y[i] for i in range(k))
                 + (s_bias[n - 1, j].item() if s_bias is not None else 0.0) for j in range(k)]
            y = [a[n][j] * s[j] for j in range(k)]
        out.append(y)
    return torch.tensor(out, dtype=torch.float64).reshape(*x.shape[:-1], k)


@pytest.mark.parametrize("N", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_reference_matches_scalar_loop(N, bias):
    inputs = make_inputs(lead=(2, 3), d=5, k=4, N=N, bias=bias)
    assert_close("y", hk.poly_ncp(*inputs, backend="reference"), scalar_loop(*inputs), tol=1e-12)


@pytest.mark.parametrize("N", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_reference_backward_gradcheck(N, bias):
    inputs = [None if t is None else t.requires_grad_() for t in make_inputs(lead=(4,), d=5, k=3, N=N, bias=bias)]
    assert torch.autograd.gradcheck(lambda *t: hk.poly_ncp(*t, backend="reference"), inputs)


# ---------------------------------------------------------------- fused backends on this machine
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(backend, dtype, bias):
    if backend not in cpu_backends(dtype):
        pytest.skip(f"{backend} does not run {dtype} on the CPU")
    check_against_reference(make_inputs(lead=(3, 13), dtype=dtype, bias=bias), backend)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("shape", [
    dict(lead=(1,), d=1, k=1, N=1),          # smallest
    dict(lead=(39,), d=45, k=23, N=1),       # N = 1: y = A_1 x + a_1, s tensors of shape (0, k, k), (0, k)
    dict(lead=(2, 2, 5), d=20, k=9, N=8),    # long chain, several leading dims
    dict(lead=(5,), d=130, k=70, N=2),       # d past several chunks, k padded to 128
])
@pytest.mark.parametrize("bias", [True, False])
def test_shapes(backend, shape, bias):
    check_against_reference(make_inputs(**shape, bias=bias), backend)


@pytest.mark.parametrize("backend", cpu_backends())
def test_zero_factors_exact_gradients(backend):
    """A zero row 2 of A_2 and a_2 makes column 2 of a_2, hence of y_2, exactly 0. That row of A_2 and a_2 still
    gets its exact gradient (g * s_2, not 0), while row 2 of S_2 and s_2[2] (gradient g * a_2) get exactly 0."""
    inputs = make_inputs(lead=(9,), d=6, k=5, N=4)
    _, a_weight, a_bias, _, _ = inputs
    a_weight[1, 2] = 0.0
    a_bias[1, 2] = 0.0
    check_against_reference(inputs, backend)
    _, grads, _ = run(inputs, backend=backend)
    assert grads[1][1, 2].abs().sum() > 0, "da_weight of the zero row must not vanish"
    assert grads[2][1, 2] != 0, "da_bias of the zero row must not vanish"
    # dL/ds_2 = g * a_2 is 0 in column 2, so row 2 of S_2 and s_2[2] get exactly zero gradient.
    assert grads[3][0, 2].abs().sum() == 0 and grads[4][0, 2] == 0


@pytest.mark.parametrize("backend", cpu_backends(torch.float16))
def test_float16_long_dot_accumulates_in_float32(backend):
    """d = 1024 in float16 with positive terms (no cancellation): within twice the rounding of the fp16 output
    itself, which a dot accumulated in fp16 misses (see the same test of poly_chain)."""
    inputs = [t.abs() for t in make_inputs(lead=(24,), d=1024, k=12, N=2, dtype=torch.float16)]
    y = hk.poly_ncp(*inputs, backend=backend)
    exact = hk.poly_ncp(*[t.double() for t in inputs], backend="reference")
    assert_close("y", y, exact, tol=2 * rel_err(exact.half(), exact))


@pytest.mark.parametrize("backend", cpu_backends())
def test_nan_propagates(backend):
    x, *params = make_inputs(lead=(6,), d=8, k=5, N=3)
    x[2, 3] = float("nan")
    y = hk.poly_ncp(x, *params, backend=backend)
    assert torch.isnan(y[2]).all() and not torch.isnan(y[[0, 1, 3, 4, 5]]).any()


@pytest.mark.parametrize("backend", cpu_backends())
def test_strided_inputs(backend):
    """Inputs sliced from wider tensors and transposed weight views give the contiguous result."""
    x, a_weight, a_bias, s_weight, s_bias = make_inputs(lead=(11,), d=9, k=6, N=3)
    wide_x = torch.zeros(11, 20, dtype=x.dtype)
    wide_x[:, 3:12] = x
    a_t = a_weight.transpose(1, 2).contiguous().transpose(1, 2)
    s_t = s_weight.transpose(1, 2).contiguous().transpose(1, 2)
    wide_sb = torch.zeros(2, 12, dtype=x.dtype)
    wide_sb[:, ::2] = s_bias
    strided = (wide_x[:, 3:12], a_t, a_bias, s_t, wide_sb[:, ::2])
    assert not any(t.is_contiguous() for t in (strided[0], a_t, s_t, strided[4]))
    y = hk.poly_ncp(*strided, backend=backend)
    assert_close("y", y, hk.poly_ncp(x, a_weight, a_bias, s_weight, s_bias, backend="reference"))


@pytest.mark.parametrize("backend", cpu_backends())
def test_empty_batch(backend):
    inputs = make_inputs(lead=(0, 4), d=7, k=3, N=2)
    y, grads, _ = run(inputs, backend=backend)
    assert y.shape == (0, 4, 3)
    assert grads[0].shape == inputs[0].shape
    for name, g, t in zip(NAMES[1:], grads[1:], inputs[1:]):
        assert g.shape == t.shape and g.abs().sum() == 0, f"d{name}"


@pytest.mark.parametrize("backend", cpu_backends())
def test_backward_in_row_chunks(backend, monkeypatch):
    """A small workspace budget splits the backward into row chunks (the last one partial); same gradients."""
    inputs = make_inputs(lead=(39,), d=10, k=7, N=3)
    monkeypatch.setattr(common, "WORKSPACE_BYTES", 16 * (3 * 3 - 2) * 7 * 8)
    assert common.rows_per_chunk(3, 7, 8) == 16
    check_against_reference(inputs, backend)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("N", [1, 3])
def test_gradcheck(backend, N):
    inputs = [t.requires_grad_() for t in make_inputs(lead=(4,), d=5, k=3, N=N)]
    assert torch.autograd.gradcheck(lambda *t: hk.poly_ncp(*t, backend=backend), inputs)


@pytest.mark.parametrize("backend", cpu_backends())
def test_opcheck(backend):
    x, a_weight, a_bias, s_weight, s_bias = make_inputs(lead=(4,), d=5, k=3, N=2)
    for ab, sb in ((a_bias, s_bias), (None, None)):
        args = (x.requires_grad_(), a_weight.requires_grad_(), ab, s_weight.requires_grad_(), sb, backend)
        torch.library.opcheck(poly_ncp_op, args)


def test_torch_compile_fullgraph():
    inputs = make_inputs(lead=(8,), d=6, k=4, N=3, dtype=torch.float32)
    fn = lambda *t: hk.poly_ncp(*t).square().sum()  # noqa: E731
    leaves = [t.clone().requires_grad_() for t in inputs]
    torch.compile(fn, fullgraph=True, backend="aot_eager")(*leaves).backward()
    expected = [t.clone().requires_grad_() for t in inputs]
    fn(*expected).backward()
    for name, a, b in zip(NAMES, leaves, expected):
        assert_close(f"d{name}", a.grad, b.grad.double())


# ---------------------------------------------------------------- bad input
def _meta(t):
    return t.to("meta")


@pytest.mark.parametrize("change, argument", [
    (lambda a: a.update(x=a["x"][..., :-1]), "x"),
    (lambda a: a.update(x=a["x"].to(torch.int32)), "x"),
    (lambda a: a.update(x=[1.0, 2.0]), "x"),
    (lambda a: a.update(a_weight=a["a_weight"][0]), "a_weight"),
    (lambda a: a.update(a_weight=a["a_weight"][:, :0]), "a_weight.shape[1]"),
    (lambda a: a.update(a_weight=a["a_weight"][:0]), "a_weight.shape[0]"),
    (lambda a: a.update(a_weight=a["a_weight"].float()), "a_weight"),
    (lambda a: a.update(a_bias=a["a_bias"][:, 1:]), "a_bias"),
    (lambda a: a.update(a_bias=a["a_bias"][:1]), "a_bias"),
    (lambda a: a.update(a_bias=a["a_bias"].float()), "a_bias"),
    (lambda a: a.update(s_weight=None), "s_weight"),
    (lambda a: a.update(s_weight=a["s_weight"][0]), "s_weight"),
    (lambda a: a.update(s_weight=torch.cat([a["s_weight"]] * 2)), "s_weight"),   # N, not N-1, matrices
    (lambda a: a.update(s_weight=a["s_weight"][:, :, 1:]), "s_weight"),
    (lambda a: a.update(s_weight=a["s_weight"].float()), "s_weight"),
    (lambda a: a.update(s_weight=_meta(a["s_weight"])), "s_weight"),             # device
    (lambda a: a.update(s_bias=torch.cat([a["s_bias"]] * 2)), "s_bias"),         # N, not N-1, rows
    (lambda a: a.update(s_bias=a["s_bias"].float()), "s_bias"),
    (lambda a: a.update(s_bias=_meta(a["s_bias"])), "s_bias"),
    (lambda a: a.update(a_bias=_meta(a["a_bias"])), "a_bias"),
    (lambda a: a.update(backend="gpu"), "backend"),
])
def test_bad_input_raises_value_error(change, argument):
    args = dict(zip(NAMES, make_inputs(lead=(3,), d=4, k=2, N=3)), backend="reference")
    change(args)
    with pytest.raises(ValueError, match=argument.replace("[", r"\[").replace("]", r"\]")):
        hk.poly_ncp(*[args.pop(name) for name in NAMES], **args)


@pytest.mark.skipif(HAS_CUDA, reason="checks the error on a machine without a GPU")
def test_unavailable_backend_raises_runtime_error():
    with pytest.raises(RuntimeError, match="backend 'cuda'.*not available"):
        hk.poly_ncp(*make_inputs(lead=(3,), d=4, k=2, N=2), backend="cuda")


# ---------------------------------------------------------------- the Triton wide path (k > MAX_K)
def check_triton_kernels(inputs):
    """check_against_reference on the triton backend; returns the names of the Triton kernels it launched."""
    with recorded_launches() as log:
        check_against_reference(inputs, "triton")
    return set(log.triton)


@pytest.fixture
def wide_path(monkeypatch):
    """Every k takes the Triton wide path (one launch per degree), so it is checked at small, cheap sizes too."""
    monkeypatch.setattr(ncp_triton, "MAX_K", 0)


@pytest.mark.skipif("triton" not in cpu_backends(), reason="needs the Triton interpreter")
@pytest.mark.parametrize("k, N, d, dtype, bias", [
    (129, 3, 33, torch.float64, True),   # just past the fast path's MAX_K = 128
    (200, 2, 17, torch.float32, False),
    (129, 1, 5, torch.float16, True),    # N = 1: y = A_1 x + a_1 only
])
def test_triton_k_past_fast_path(k, N, d, dtype, bias):
    assert k > ncp_triton.MAX_K
    launched = check_triton_kernels(make_inputs(lead=(5,), d=d, k=k, N=N, dtype=dtype, bias=bias))
    assert launched == {"_poly_ncp_wide_fwd_kernel", "_poly_ncp_wide_bwd_kernel"}, launched


@pytest.mark.skipif("triton" not in cpu_backends(), reason="needs the Triton interpreter")
@pytest.mark.parametrize("shape", [
    dict(lead=(1,), d=1, k=1, N=1),
    dict(lead=(39,), d=45, k=23, N=2),      # three row tiles (the last ragged), a ragged column tile
    dict(lead=(2, 5), d=20, k=40, N=5),     # two column tiles, odd N: y and the buffer alternate
    dict(lead=(3,), d=70, k=9, N=4),        # d past two contraction chunks
])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_wide_path_shapes(wide_path, shape, bias):
    assert "_poly_ncp_wide_fwd_kernel" in check_triton_kernels(make_inputs(**shape, bias=bias))


@pytest.mark.skipif("triton" not in cpu_backends(), reason="needs the Triton interpreter")
def test_triton_wide_path_zero_factors_and_row_chunks(wide_path, monkeypatch):
    """Exact gradients through a zero factor, and the backward split into row chunks, on the wide path."""
    test_zero_factors_exact_gradients("triton")
    test_backward_in_row_chunks("triton", monkeypatch)


@pytest.mark.skipif("triton" not in cpu_backends(), reason="needs the Triton interpreter")
def test_triton_wide_path_gradcheck(wide_path):
    inputs = [t.requires_grad_() for t in make_inputs(lead=(2,), d=3, k=2, N=2)]
    assert torch.autograd.gradcheck(lambda *t: hk.poly_ncp(*t, backend="triton"), inputs)


@pytest.mark.skipif("triton" not in cpu_backends(), reason="needs the Triton interpreter")
def test_triton_wide_path_nan_and_strides(wide_path):
    test_nan_propagates("triton")
    test_strided_inputs("triton")


@pytest.mark.skipif(_backend.cuda_extension()[0] is None, reason="hadamard_kernels._C is not built")
def test_cuda_max_k_matches_extension():
    from hadamard_kernels.ops.poly_ncp import cuda as cuda_backend

    assert _backend.cuda_extension()[0].POLY_NCP_MAX_K == cuda_backend.MAX_K


# ---------------------------------------------------------------- GPU
# Each dtype with and without biases, N = 1 and N > 1: every kernel variant compiles on first use, so the GPU
# matrix is a cover of the options rather than their full product.
GPU_CASES = [(dtype, N, bias) for dtype in (torch.float32, torch.float16, torch.bfloat16)
             for N, bias in ((5, True), (2, False), (1, True))]


@cuda
@requires_cuda
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype, N, bias", GPU_CASES)
def test_gpu_matches_reference(backend, dtype, N, bias):
    check_against_reference(make_inputs(lead=(3, 37), d=45, k=23, N=N, dtype=dtype, device="cuda", bias=bias), backend)


@cuda
@requires_cuda
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [
    dict(lead=(1,), d=1, k=1, N=1), dict(lead=(1000,), d=257, k=96, N=8),
    dict(lead=(4, 512), d=512, k=128, N=3), dict(lead=(3,), d=8, k=100, N=2), dict(lead=(700,), d=64, k=16, N=16),
])
def test_gpu_shapes(backend, dtype, shape):
    check_against_reference(make_inputs(**shape, dtype=dtype, device="cuda"), backend)


@cuda
@requires_cuda
@pytest.mark.parametrize("backend", gpu_backends())
def test_gpu_zero_factors(backend):
    inputs = make_inputs(lead=(99,), d=40, k=33, N=4, dtype=torch.float32, device="cuda")
    inputs[1][1, 2] = 0.0
    inputs[2][1, 2] = 0.0
    check_against_reference(inputs, backend)


@cuda
@requires_cuda
def test_gpu_auto_backend_and_compile():
    inputs = make_inputs(lead=(64,), d=32, k=16, N=3, dtype=torch.bfloat16, device="cuda")
    fn = torch.compile(hk.poly_ncp, fullgraph=True)
    assert_close("y", fn(*inputs), hk.poly_ncp(*(t.double() for t in inputs)))


@cuda
@requires_cuda
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [dict(lead=(300,), d=70, k=256, N=3), dict(lead=(2, 45), d=33, k=200, N=4)])
def test_gpu_wide_k(backend, dtype, shape):
    """k past the Triton fast path's MAX_K, up to the CUDA fast path's."""
    check_against_reference(make_inputs(**shape, dtype=dtype, device="cuda"), backend)


@cuda
@requires_cuda
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [dict(lead=(257,), d=96, k=512, N=3), dict(lead=(2, 70), d=129, k=1024, N=2)])
def test_gpu_k_past_every_fast_path(backend, dtype, shape):
    """k past both fast paths (one launch per degree); auto picks a fused backend there too."""
    inputs = make_inputs(**shape, dtype=dtype, device="cuda")
    check_against_reference(inputs, backend)
    if backend == "triton":
        with recorded_launches() as log:
            hk.poly_ncp(*inputs)
        assert log.triton or log.cuda, "auto ran the reference on a GPU"
