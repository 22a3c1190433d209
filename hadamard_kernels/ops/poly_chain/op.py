"""The public poly_chain op: torch.library registration, fake, autograd, checks and backend dispatch."""

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

_IMPLS = BackendModules("poly_chain", __package__)


@torch.library.custom_op("hadamard_kernels::poly_chain", mutates_args=())
def poly_chain_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], mode: str, activation: str, scale: float,
                  save_projections: bool, backend: Optional[str]) -> tuple[Tensor, Tensor]:
    """(y, z): z [..., N, k] the pre-activation projections when save_projections, else an empty placeholder."""
    # Also reached by torch.ops.hadamard_kernels.poly_chain directly, so the kernels never see unchecked input.
    check_args(x, weight, bias, mode, activation)
    if x.numel() == 0:
        y, z = _fake_outputs(x, weight, save_projections)
        return y.zero_(), z.zero_()
    args = (x, weight, bias, mode, activation, scale)
    impl = _IMPLS.select(backend, x, args)
    if save_projections:
        return impl.forward(*args, save_projections=True)
    return impl.forward(*args), x.new_empty(0)


def _fake_outputs(x, weight, save_projections):
    N, K = weight.shape[:2]
    return x.new_empty((*x.shape[:-1], K)), x.new_empty((*x.shape[:-1], N, K) if save_projections else (0,))


@poly_chain_op.register_fake
def _(x, weight, bias, mode, activation, scale, save_projections, backend):
    check_args(x, weight, bias, mode, activation)
    return _fake_outputs(x, weight, save_projections)


@backward_custom_op("hadamard_kernels::poly_chain_backward")
def poly_chain_backward_op(grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], projections: Tensor,
                           mode: str, activation: str, scale: float, save_projections: bool, backend: Optional[str],
                           needs: list[bool]) -> list[Tensor]:
    """projections: z saved by the forward (save_projections), or an empty placeholder: then recomputed."""
    if x.numel() == 0:
        return grads_to_tensors(empty_batch_grads((x, weight, bias), needs), x)
    args = (x, weight, bias, mode, activation, scale)
    saved = projections if projections.numel() > 0 else None
    return grads_to_tensors(_IMPLS.select(backend, x, args).backward(grad_y, *args, needs, projections=saved), x)


poly_chain_backward_op.register_fake(fake_backward(num_inputs=3))
register_autograd(poly_chain_op, poly_chain_backward_op, num_inputs=3, saved_outputs=(1,))


def poly_chain(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, mode: str = "ccp",
               activation: str = "identity", scale: float = 1.0, save_projections: bool = False,
               backend: Optional[str] = None) -> Tensor:
    """Product-chain polynomial layer (Π-net CCP / PNN), fused.

    x [..., d], weight [N, k, d] (the N projections U_1..U_N in nn.Linear layout), bias [N, k] or None.
    u_n = scale * act(x @ weight[n].T + bias[n]), act in identity | relu | tanh | sigmoid | gelu (erf).
    mode="ccp": y_1 = u_1, y_n = u_n * y_{n-1} + y_{n-1};  mode="product": y_n = u_n * y_{n-1}.
    Returns y_N [..., k]. backend: None (auto), "reference", "triton" or "cuda".

    save_projections: what autograd keeps for the backward. False (default): the inputs only; the backward
    recomputes the projections z = x W^T + b with one GEMM (three GEMMs in all). True: the forward also writes z
    [..., N, k] (N * k elements of x's dtype per row) and keeps it; the backward skips the recompute (two GEMMs).
    Only when autograd records the call (grad enabled and an input requires grad); otherwise nothing is kept.
    """
    x, weight, bias = autocast_inputs(x, weight, bias)
    # Checked here too, so wrong types get a ValueError rather than the schema's cast error.
    check_args(x, weight, bias, mode, activation)
    scale = _checks.check_finite_float("scale", scale)
    if not isinstance(save_projections, bool):
        raise ValueError(f"save_projections must be a bool, got {save_projections!r}")
    recorded = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    return poly_chain_op(x, weight, bias, mode, activation, scale, save_projections and recorded, backend)[0]
