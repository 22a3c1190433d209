"""The public poly_ncp op: torch.library registration, fake, autograd, checks and backend dispatch."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

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

_IMPLS = BackendModules("poly_ncp", __package__)


@torch.library.custom_op("hadamard_kernels::poly_ncp", mutates_args=())
def poly_ncp_op(x: Tensor, a_weight: Tensor, a_bias: Optional[Tensor], s_weight: Tensor, s_bias: Optional[Tensor],
                backend: Optional[str]) -> Tensor:
    # Also reached by torch.ops.hadamard_kernels.poly_ncp directly, so the kernels never see unchecked input.
    check_args(x, a_weight, a_bias, s_weight, s_bias)
    if x.numel() == 0:
        return x.new_zeros((*x.shape[:-1], a_weight.shape[1]))
    inputs = (x, a_weight, a_bias, s_weight, s_bias)
    return _IMPLS.select(backend, x, inputs).forward(*inputs)


@poly_ncp_op.register_fake
def _(x, a_weight, a_bias, s_weight, s_bias, backend):
    check_args(x, a_weight, a_bias, s_weight, s_bias)
    return x.new_empty((*x.shape[:-1], a_weight.shape[1]))


@backward_custom_op("hadamard_kernels::poly_ncp_backward")
def poly_ncp_backward_op(grad_y: Tensor, x: Tensor, a_weight: Tensor, a_bias: Optional[Tensor], s_weight: Tensor,
                         s_bias: Optional[Tensor], backend: Optional[str], needs: list[bool]) -> list[Tensor]:
    inputs = (x, a_weight, a_bias, s_weight, s_bias)
    if x.numel() == 0:
        return grads_to_tensors(empty_batch_grads(inputs, needs), x)
    return grads_to_tensors(_IMPLS.select(backend, x, inputs).backward(grad_y, *inputs, needs), x)


poly_ncp_backward_op.register_fake(fake_backward(num_inputs=5))
register_autograd(poly_ncp_op, poly_ncp_backward_op, num_inputs=5)


def poly_ncp(x: Tensor, a_weight: Tensor, a_bias: Optional[Tensor], s_weight: Tensor, s_bias: Optional[Tensor], *,
             backend: Optional[str] = None) -> Tensor:
    """NCP polynomial layer (Π-net with nested coupled products), fused.

    x [..., d], a_weight [N, k, d] (A_1..A_N), a_bias [N, k] or None, s_weight [N-1, k, k] (S_2..S_N, nn.Linear
    layout), s_bias [N-1, k] or None; for N = 1 pass s_weight of shape (0, k, k) and s_bias (0, k) or None.
    y_1 = A_1 x + a_1,  y_n = (A_n x + a_n) * (S_n y_{n-1} + s_n).  Returns y_N [..., k].
    backend: None (auto), "reference", "triton" or "cuda".
    """
    x, a_weight, a_bias, s_weight, s_bias = autocast_inputs(x, a_weight, a_bias, s_weight, s_bias)
    # Checked here too, so wrong types get a ValueError rather than the schema's cast error.
    check_args(x, a_weight, a_bias, s_weight, s_bias)
    return poly_ncp_op(x, a_weight, a_bias, s_weight, s_bias, backend)
