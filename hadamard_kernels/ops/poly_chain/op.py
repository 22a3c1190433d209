"""The public poly_chain op: torch.library registration, fake, autograd, checks and backend dispatch."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import _checks
from .._library import (
    BackendModules,
    autocast_inputs,
    empty_batch_grads,
    fake_backward,
    grads_to_tensors,
    register_autograd,
)
from .common import check_args

_IMPLS = BackendModules("poly_chain", __package__)


@torch.library.custom_op("hadamard_kernels::poly_chain", mutates_args=())
def poly_chain_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], mode: str, activation: str, scale: float,
                  backend: Optional[str]) -> Tensor:
    # Also reached by torch.ops.hadamard_kernels.poly_chain directly, so the kernels never see unchecked input.
    check_args(x, weight, bias, mode, activation)
    if x.numel() == 0:
        return x.new_zeros((*x.shape[:-1], weight.shape[1]))
    args = (x, weight, bias, mode, activation, scale)
    return _IMPLS.select(backend, x, args).forward(*args)


@poly_chain_op.register_fake
def _(x, weight, bias, mode, activation, scale, backend):
    check_args(x, weight, bias, mode, activation)
    return x.new_empty((*x.shape[:-1], weight.shape[1]))


@torch.library.custom_op("hadamard_kernels::poly_chain_backward", mutates_args=())
def poly_chain_backward_op(grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], mode: str,
                           activation: str, scale: float, backend: Optional[str], needs: list[bool]) -> list[Tensor]:
    if x.numel() == 0:
        return grads_to_tensors(empty_batch_grads((x, weight, bias), needs), x)
    args = (x, weight, bias, mode, activation, scale)
    return grads_to_tensors(_IMPLS.select(backend, x, args).backward(grad_y, *args, needs), x)


poly_chain_backward_op.register_fake(fake_backward(num_inputs=3))
register_autograd(poly_chain_op, poly_chain_backward_op, num_inputs=3)


def poly_chain(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, mode: str = "ccp",
               activation: str = "identity", scale: float = 1.0, backend: Optional[str] = None) -> Tensor:
    """Product-chain polynomial layer (Π-net CCP / PNN), fused.

    x [..., d], weight [N, k, d] (the N projections U_1..U_N in nn.Linear layout), bias [N, k] or None.
    u_n = scale * act(x @ weight[n].T + bias[n]), act in identity | relu | tanh | sigmoid | gelu (erf).
    mode="ccp": y_1 = u_1, y_n = u_n * y_{n-1} + y_{n-1};  mode="product": y_n = u_n * y_{n-1}.
    Returns y_N [..., k]. backend: None (auto), "reference", "triton" or "cuda".
    """
    x, weight, bias = autocast_inputs(x, weight, bias)
    # Checked here too, so wrong types get a ValueError rather than the schema's cast error.
    check_args(x, weight, bias, mode, activation)
    scale = _checks.check_finite_float("scale", scale)
    return poly_chain_op(x, weight, bias, mode, activation, scale, backend)
