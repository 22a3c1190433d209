"""The public poly_sa ops (poly_sa_pool and poly_sa): torch.library registration, fake, autograd, checks and
backend dispatch. Each backend module has pool_forward / pool_backward and forward / backward."""

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
from .common import check_args, check_pool_args

_POOL_IMPLS = BackendModules("poly_sa_pool", __package__)
_IMPLS = BackendModules("poly_sa", __package__)


@torch.library.custom_op("hadamard_kernels::poly_sa_pool", mutates_args=())
def poly_sa_pool_op(z: Tensor, w1: Tensor, w2: Tensor, mask: Optional[Tensor], backend: Optional[str]) -> Tensor:
    # Also reached by torch.ops.hadamard_kernels.poly_sa_pool directly, so the kernels never see unchecked input.
    check_pool_args(z, w1, w2, mask)
    if z.numel() == 0:
        return z.new_zeros((z.shape[0], z.shape[2]))
    args = (z, w1, w2, mask)
    return _POOL_IMPLS.select(backend, z, args).pool_forward(*args)


@poly_sa_pool_op.register_fake
def _(z, w1, w2, mask, backend):
    check_pool_args(z, w1, w2, mask)
    return z.new_empty((z.shape[0], z.shape[2]))


@backward_custom_op("hadamard_kernels::poly_sa_pool_backward")
def poly_sa_pool_backward_op(grad_m: Tensor, z: Tensor, w1: Tensor, w2: Tensor, mask: Optional[Tensor],
                             backend: Optional[str], needs: list[bool]) -> list[Tensor]:
    if z.numel() == 0:
        return grads_to_tensors(empty_batch_grads((z, w1, w2), needs), z)
    args = (z, w1, w2, mask)
    return grads_to_tensors(_POOL_IMPLS.select(backend, z, args).pool_backward(grad_m, *args, needs), z)


poly_sa_pool_backward_op.register_fake(fake_backward(num_inputs=3))
register_autograd(poly_sa_pool_op, poly_sa_pool_backward_op, num_inputs=3)


@torch.library.custom_op("hadamard_kernels::poly_sa", mutates_args=())
def poly_sa_op(z: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, alpha: Tensor, beta: Tensor, mask: Optional[Tensor],
               backend: Optional[str]) -> Tensor:
    check_args(z, w1, w2, w3, alpha, beta, mask)
    if z.numel() == 0:
        return z.new_zeros(z.shape)
    args = (z, w1, w2, w3, alpha, beta, mask)
    return _IMPLS.select(backend, z, args).forward(*args).contiguous()  # the fake's strides, whatever z's


@poly_sa_op.register_fake
def _(z, w1, w2, w3, alpha, beta, mask, backend):
    check_args(z, w1, w2, w3, alpha, beta, mask)
    return z.new_empty(z.shape)


@backward_custom_op("hadamard_kernels::poly_sa_backward")
def poly_sa_backward_op(grad_y: Tensor, z: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, alpha: Tensor, beta: Tensor,
                        mask: Optional[Tensor], backend: Optional[str], needs: list[bool]) -> list[Tensor]:
    inputs = (z, w1, w2, w3, alpha, beta)
    if z.numel() == 0:
        return grads_to_tensors(empty_batch_grads(inputs, needs), z)
    args = (*inputs, mask)
    return grads_to_tensors(_IMPLS.select(backend, z, args).backward(grad_y, *args, needs), z)


poly_sa_backward_op.register_fake(fake_backward(num_inputs=6))
register_autograd(poly_sa_op, poly_sa_backward_op, num_inputs=6)


def poly_sa_pool(z: Tensor, w1: Tensor, w2: Tensor, *, mask: Optional[Tensor] = None,
                 backend: Optional[str] = None) -> Tensor:
    """Poly-SA's pooled second-degree term, fused: m = mean over tokens of (z @ w1) * (z @ w2).

    z [B, N, C], w1, w2 [C, C] (note z @ w, not w.T), mask [B, N] bool or None (True = real token: padded tokens
    are left out of the mean; a row with no real token gives m = 0). Returns m [B, C] in z's dtype; the
    projections and their product are never written to memory. backend: None (auto), "reference", "triton" or
    "cuda".
    """
    z, w1, w2 = autocast_inputs(z, w1, w2)
    check_pool_args(z, w1, w2, mask)
    return poly_sa_pool_op(z, w1, w2, mask, backend)


def _scalar_tensor(name, value, like):
    if isinstance(value, Tensor):
        return value
    value = _checks.check_finite_float(name, value)
    if not isinstance(like, Tensor):
        return torch.tensor(value)
    # A fill on the device, not a copy from host memory: no host sync, and a CUDA graph can capture it.
    return torch.full((), value, dtype=like.dtype, device=like.device)


def poly_sa(z: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, alpha: Tensor | float, beta: Tensor | float, *,
            mask: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """Poly-SA, polynomial self-attention linear in tokens (the Hadamard-product survey's PolySA), fused:

        m = mean over real tokens of (z @ w1) * (z @ w2)      [B, C]  (poly_sa_pool)
        Y = alpha * z + beta * ((z * m[:, None, :]) @ w3)     [B, N, C]

    z [B, N, C]; w1, w2, w3 [C, C]; alpha, beta scalar tensors of shape () or (1,) (the survey's (1,)
    parameters) or numbers; mask [B, N] bool or None (padded tokens are left out of the mean, their outputs are
    still computed with it). Gradients reach z, w1, w2, w3, alpha and beta; the backward recomputes the
    projections. backend: None (auto), "reference", "triton" or "cuda".
    """
    z, w1, w2, w3, alpha, beta = autocast_inputs(z, w1, w2, w3, alpha, beta)
    alpha, beta = _scalar_tensor("alpha", alpha, z), _scalar_tensor("beta", beta, z)
    check_args(z, w1, w2, w3, alpha, beta, mask)
    return poly_sa_op(z, w1, w2, w3, alpha, beta, mask, backend)
