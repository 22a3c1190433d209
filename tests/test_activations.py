"""Activations agree with torch's on special values: NaN in gives NaN out (torch.relu keeps NaN; tl.maximum and
`z > 0 ? z : 0` drop it), and relu's derivative is torch's (0 at z = 0, 1 at NaN), on every backend."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from utils import HAS_CUDA, assert_close, cpu_backends, cuda, requires_cuda

import hadamard_kernels as hk
from hadamard_kernels.ops._triton_lib import activation as triton_activation
from hadamard_kernels.ops._triton_lib import activation_grad as triton_activation_grad
from hadamard_kernels.ops.poly_chain import reference
from hadamard_kernels.ops.poly_chain.common import ACTIVATIONS, MODES

NAN, INF = math.nan, math.inf
SPECIAL = [NAN, -INF, -3.0, -1e-3, -0.0, 0.0, 1e-3, 2.5, INF]
SPECIAL_T = torch.tensor(SPECIAL, dtype=torch.float64)
TORCH = {"identity": lambda t: t * 1, "relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
         "gelu": F.gelu}


def torch_activation(activation: str, z: torch.Tensor):
    """(act(z), act'(z)) from torch's own functions and autograd."""
    z = z.detach().clone().requires_grad_()
    out = TORCH[activation](z)
    (grad,) = torch.autograd.grad(out.sum(), z)
    return out.detach(), grad


def assert_same(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """Same NaN positions, equal infinities, close finite values."""
    got, want = got.double().cpu(), want.double().cpu()
    assert torch.equal(got.isnan(), want.isnan()), (
        f"{name}: NaN at z = {SPECIAL_T[got.isnan()].tolist()}, torch's at z = {SPECIAL_T[want.isnan()].tolist()}")
    keep = ~want.isnan()
    torch.testing.assert_close(got[keep], want[keep], rtol=rtol, atol=rtol, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------- the helpers themselves
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_helpers_match_torch(activation):
    z = SPECIAL_T.clone()
    want, want_grad = torch_activation(activation, z)
    assert_same(f"reference {activation}", reference._ACTIVATIONS[activation](z), want, 1e-15)
    assert_same(f"reference {activation}'", reference._ACTIVATION_GRADS[activation](z), want_grad, 1e-15)


@triton.jit
def _apply_activation(z_ptr, out_ptr, grad_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    z = tl.load(z_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, triton_activation(z, ACT), mask=mask)
    tl.store(grad_ptr + offsets, triton_activation_grad(z, ACT), mask=mask)


def _triton_devices():
    devices = []
    if "triton" in cpu_backends(torch.float32):
        devices.append("cpu")
    if HAS_CUDA:
        devices.append(pytest.param("cuda", marks=[cuda, requires_cuda]))
    return devices or [pytest.param("cpu", marks=pytest.mark.skip(reason="triton does not run here"))]


# gelu(-inf) = -inf * 0: numpy warns in the interpreter, and the result is NaN as in torch.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("device", _triton_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_triton_helpers_match_torch(activation, dtype, device):
    """ops/_triton_lib.py's activation and activation_grad on special values (the Triton interpreter on a CPU)."""
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("the kernels run float64 on the interpreter only")
    z = SPECIAL_T.to(device=device, dtype=dtype)
    out, grad = torch.empty_like(z), torch.empty_like(z)
    _apply_activation[(1,)](z, out, grad, z.numel(), ACT=ACTIVATIONS.index(activation), BLOCK=16)
    want, want_grad = torch_activation(activation, z.cpu())
    rtol = 1e-6 if dtype == torch.float32 else 1e-12
    assert_same(f"triton {activation}", out, want, rtol)
    assert_same(f"triton {activation}'", grad, want_grad, rtol)


# ---------------------------------------------------------------- through the op, every backend on this machine
def eager_poly_chain(x, weight, bias, mode, activation, scale):
    """The formula in plain torch ops (autograd gives its gradients)."""
    y = None
    for n in range(weight.shape[0]):
        u = scale * TORCH[activation](x @ weight[n].T + bias[n])
        y = u if y is None else (u * y if mode == "product" else u * y + y)
    return y


def nan_inputs(dtype, seed=0, N=2, k=7, d=5):
    """Inputs with a NaN in degree 1's bias at column 3 (so z_1[:, 3] is NaN) and in row 2 of x."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, d, generator=g, dtype=torch.float64)
    weight = torch.randn(N, k, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    bias = torch.randn(N, k, generator=g, dtype=torch.float64) * 0.5
    bias[0, 3] = NAN
    x[2, 1] = NAN
    return [t.to(dtype) for t in (x, weight, bias)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", cpu_backends())
def test_relu_of_nan_is_nan(backend, mode, dtype):
    """A NaN pre-activation makes its output NaN on every backend, as in the eager formula: column 3 and row 2."""
    if backend not in cpu_backends(dtype):
        pytest.skip(f"{backend} does not run {dtype} here")
    x, weight, bias = nan_inputs(dtype)
    y = hk.poly_chain(x, weight, bias, mode=mode, activation="relu", scale=0.9, backend=backend)
    want = eager_poly_chain(*(t.double() for t in (x, weight, bias)), mode, "relu", 0.9)
    finite_rows, finite_cols = [0, 1, 3, 4, 5], [0, 1, 2, 4, 5, 6]
    assert want[:, 3].isnan().all() and want[2].isnan().all()
    assert not want[finite_rows][:, finite_cols].isnan().any()
    assert_close("y", y, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", cpu_backends())
def test_relu_grad_at_nan_is_torchs(backend, dtype):
    """relu'(NaN) = 1 as in torch: in the product chain y = u_1 u_2 with z_1[:, 3] = NaN, the gradient of degree 1's
    weights and bias at column 3 is dy u_2 (finite), the same as eager autograd; relu'(NaN) = 0 would give 0."""
    if backend not in cpu_backends(dtype):
        pytest.skip(f"{backend} does not run {dtype} here")
    x, weight, bias = nan_inputs(dtype)
    x[2, 1] = 0.0  # only the bias NaN here
    grad_y = torch.randn(x.shape[0], weight.shape[1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = {}
    for name, inputs in ((backend, (x, weight, bias)), ("eager", [t.double() for t in (x, weight, bias)])):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        if name == "eager":
            y = eager_poly_chain(*leaves, "product", "relu", 1.0)
        else:
            y = hk.poly_chain(*leaves, mode="product", activation="relu", backend=backend)
        y.backward(grad_y.to(y.dtype))
        grads[name] = (leaves[1].grad[0, 3], leaves[2].grad[0, 3])
    want_w, want_b = grads["eager"]
    assert want_w.isfinite().all() and want_b.isfinite() and want_b != 0
    got_w, got_b = grads[backend]
    assert_close("dweight[0, 3]", got_w, want_w, dtype)
    assert_close("dbias[0, 3]", got_b.reshape(1), want_b.reshape(1), dtype)
