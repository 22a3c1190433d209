"""The public poly_gate op (and spatial_shift): torch.library registration, fake, autograd, checks and dispatch."""

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
from . import common
from .common import check_args

_IMPLS = BackendModules("poly_gate", __package__)


@torch.library.custom_op("hadamard_kernels::poly_gate", mutates_args=())
def poly_gate_op(a: Tensor, b: Tensor, ln1_weight: Tensor, ln1_bias: Tensor, ln2_weight: Tensor, ln2_bias: Tensor,
                 alpha: Optional[Tensor], eps: float, spatial_shift: bool, backend: Optional[str]) -> Tensor:
    # Also reached by torch.ops.hadamard_kernels.poly_gate directly, so the kernels never see unchecked input.
    check_args(a, b, ln1_weight, ln1_bias, ln2_weight, ln2_bias, alpha, eps, spatial_shift)
    if a.numel() == 0:
        return a.new_zeros(a.shape)
    args = (a, b, ln1_weight, ln1_bias, ln2_weight, ln2_bias, alpha, eps, spatial_shift)
    return _IMPLS.select(backend, a, args).forward(*args).contiguous()  # the fake's strides, whatever a's


@poly_gate_op.register_fake
def _(a, b, ln1_weight, ln1_bias, ln2_weight, ln2_bias, alpha, eps, spatial_shift, backend):
    check_args(a, b, ln1_weight, ln1_bias, ln2_weight, ln2_bias, alpha, eps, spatial_shift)
    return a.new_empty(a.shape)


@backward_custom_op("hadamard_kernels::poly_gate_backward")
def poly_gate_backward_op(grad_y: Tensor, a: Tensor, b: Tensor, ln1_weight: Tensor, ln1_bias: Tensor,
                          ln2_weight: Tensor, ln2_bias: Tensor, alpha: Optional[Tensor], eps: float,
                          spatial_shift: bool, backend: Optional[str], needs: list[bool]) -> list[Tensor]:
    inputs = (a, b, ln1_weight, ln1_bias, ln2_weight, ln2_bias, alpha)
    if a.numel() == 0:
        return grads_to_tensors(empty_batch_grads(inputs, needs), a)
    args = (*inputs, eps, spatial_shift)
    return grads_to_tensors(_IMPLS.select(backend, a, args).backward(grad_y, *args, needs), a)


poly_gate_backward_op.register_fake(fake_backward(num_inputs=7))
register_autograd(poly_gate_op, poly_gate_backward_op, num_inputs=7)


def poly_gate(a: Tensor, b: Tensor, ln1_weight: Tensor, ln1_bias: Tensor, ln2_weight: Tensor, ln2_bias: Tensor,
              alpha: Optional[Tensor | float] = None, *, eps: float = 1e-6, spatial_shift: bool = False,
              backend: Optional[str] = None) -> Tensor:
    """MONet's polynomial gate (PolyMlp between its linear layers), fused: LayerNorm, Hadamard product, residual.

    a, b [..., C]; ln*_weight, ln*_bias [C]; alpha None (means 1), a scalar tensor (shape () or (1,), as PolyMlp's
    `alpha`) or per-channel [C], or a number (a constant).
    n1 = LN1(a), n2 = LN2(b) (LayerNorm over the last dim with eps, statistics in float32);
    returns n1 + alpha * n1 * n2 [..., C]. With spatial_shift=True, a is [B, W, H, C] and LN1 reads
    spatial_shift(a) (the shift fused as an index remap); b is not shifted.
    Gradients reach a, b, the four LayerNorm parameters and alpha. backend: None (auto), "reference", "triton"
    or "cuda".
    """
    a, b, ln1_weight, ln1_bias, ln2_weight, ln2_bias, alpha = autocast_inputs(
        a, b, ln1_weight, ln1_bias, ln2_weight, ln2_bias, alpha)
    if alpha is not None and not isinstance(alpha, torch.Tensor):
        value = _checks.check_finite_float("alpha", alpha)
        # A fill on the device, not a copy from host memory: no host sync, and a CUDA graph can capture it.
        alpha = (torch.full((), value, dtype=a.dtype, device=a.device) if isinstance(a, torch.Tensor)
                 else torch.tensor(value))
    # Checked here too, so wrong types get a ValueError rather than the schema's cast error.
    check_args(a, b, ln1_weight, ln1_bias, ln2_weight, ln2_bias, alpha, eps, spatial_shift)
    return poly_gate_op(a, b, ln1_weight, ln1_bias, ln2_weight, ln2_bias, alpha, float(eps), spatial_shift, backend)


def spatial_shift(x: Tensor) -> Tensor:
    """MONet's spatial shift, out of place: x [B, W, H, C] -> [B, W, H, C], the channel groups [0, C//4),
    [C//4, C//2), [C//2, 3C//4), [3C//4, C) moved by one pixel along +W, -W, +H, -H; the border row keeps its own
    value (DESIGN.md §5). Plain differentiable PyTorch (poly_gate fuses the same shift into its read of `a`)."""
    common.check_shift_input(x)
    return common.spatial_shift(x)
