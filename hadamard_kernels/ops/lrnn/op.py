"""The public lrnn_product op: torch.library registration, fake, autograd, checks and backend dispatch. The op
bodies flatten the leading dims, so the backend modules see x (M, d) contiguous."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import _checks
from .._library import (
    BackendModules,
    autocast_inputs,
    backward_custom_op,
    empty_batch_grads,
    fake_backward,
    grads_to_tensors,
    register_autograd,
)
from .common import check_args

_IMPLS = BackendModules("lrnn_product", __package__)


@torch.library.custom_op("hadamard_kernels::lrnn_product", mutates_args=())
def lrnn_product_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], g_params: Optional[Tensor], rank: int,
                    dbar: int, activation: str, omega: float, gamma: float, backend: Optional[str]) -> Tensor:
    # Also reached by torch.ops.hadamard_kernels.lrnn_product directly, so the kernels never see unchecked input.
    check_args(x, weight, bias, g_params, rank, dbar, activation, omega, gamma)
    if x.numel() == 0:
        return x.new_zeros((*x.shape[:-1], rank))
    args = (x.reshape(-1, x.shape[-1]).contiguous(), weight, bias, g_params, rank, dbar, activation, omega, gamma)
    return _IMPLS.select(backend, x, args).forward(*args).view(*x.shape[:-1], rank)


@lrnn_product_op.register_fake
def _(x, weight, bias, g_params, rank, dbar, activation, omega, gamma, backend):
    check_args(x, weight, bias, g_params, rank, dbar, activation, omega, gamma)
    return x.new_empty((*x.shape[:-1], rank))


@backward_custom_op("hadamard_kernels::lrnn_product_backward")
def lrnn_product_backward_op(grad_phi: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                             g_params: Optional[Tensor], rank: int, dbar: int, activation: str, omega: float,
                             gamma: float, backend: Optional[str], needs: list[bool]) -> list[Tensor]:
    if x.numel() == 0:
        return grads_to_tensors(empty_batch_grads((x, weight, bias, g_params), needs), x)
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    args = (x2d, weight, bias, g_params, rank, dbar, activation, omega, gamma)
    dx, dweight, dbias, dg = _IMPLS.select(backend, x, args).backward(grad_phi.reshape(-1, rank), *args, needs)
    return grads_to_tensors((dx.view(x.shape) if dx is not None else None, dweight, dbias, dg), x)


lrnn_product_backward_op.register_fake(fake_backward(num_inputs=4))
register_autograd(lrnn_product_op, lrnn_product_backward_op, num_inputs=4)


def lrnn_product(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, rank: int, dbar: int,
                 activation: str = "sin", omega: float = 1.0, gamma: Optional[float] = None,
                 g_params: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """LRNN sum-of-products activation (Maharaj & Nair), fused:

        z = x @ weight.T + bias, viewed as (..., rank, dbar)   (weight row l * dbar + j: neuron l, component j)
        phi_l = prod_j (1 + gamma * g(z_lj))                   -> (..., rank) in x's dtype

    x (..., d), weight (rank * dbar, d), bias (rank * dbar,) or None. g is one of
    - "sin": sin(omega z) (SIREN-like; omega is used by this activation only, any other needs omega=1);
    - "spder": sin(z) sqrt|z|, whose derivative sqrt|z| (cos z + sinc(z) / 2) is exactly 0 at z = 0 (its limit);
    - "arctan", "tanh";
    - "mlp": a learnable tiny network per component, g_lj(z) = sum_i a_lji tanh(w_lji z + c_lji), with
      g_params (3, rank, dbar, h) = torch.stack([a, w, c]), 1 <= h <= 16 (gradients reach g_params too).
    gamma defaults to dbar ** -0.5. Products over dbar are taken in float32 (float64 stays float64), so long
    products in fp16/bf16 do not overflow before the output's own range. The backward recomputes z (nothing but
    the inputs is saved). backend: None (auto), "reference", "triton" or "cuda".
    """
    x, weight, bias, g_params = autocast_inputs(x, weight, bias, g_params)
    # Checked here too, so wrong types get a ValueError rather than the schema's cast error.
    check_args(x, weight, bias, g_params, rank, dbar, activation, omega, gamma)
    omega = _checks.check_finite_float("omega", omega)
    gamma = dbar ** -0.5 if gamma is None else _checks.check_finite_float("gamma", gamma)
    return lrnn_product_op(x, weight, bias, g_params, rank, dbar, activation, omega, gamma, backend)
