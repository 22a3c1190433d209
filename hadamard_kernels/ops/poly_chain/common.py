"""poly_chain's spec shared by its backends: option values, argument checks, and the fused backends' backward."""

from __future__ import annotations

import torch

from ... import _checks
from .._projections import projection_grads

MODES = ("ccp", "product")
# Index = the code the kernels use (csrc/include/hadamard_kernels/activation.h, triton.py).
ACTIVATIONS = ("identity", "relu", "tanh", "sigmoid", "gelu")


def check_args(x, weight, bias, mode, activation) -> None:
    _checks.check_stacked_projection(x, "weight", weight, "bias", bias)
    _checks.check_same_dtype_device("x", x, weight=weight, bias=bias)
    _checks.check_choice("mode", mode, MODES)
    _checks.check_choice("activation", activation, ACTIVATIONS)


def operands(x, weight, bias):
    """What the fused kernels index: x as contiguous rows [M, d], weight [N, k, d] and bias [N, k] contiguous."""
    return (x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous(),
            bias.contiguous() if bias is not None else None)


def backward(grad_z_kernel, grad_y, x, weight, bias, needs, projections=None):
    """The backward both fused backends share, around their element-wise kernel -> (dx, dweight, dbias).

    z [M, N, k] = the pre-activation projections x W_n^T + b_n (bias included): `projections` when the forward saved
    them, else recomputed by one GEMM (addmm) into a transient buffer. grad_z_kernel(z, grad_y [M, k], out) writes
    dL/dz into out [M, N, k]: over the recomputed buffer itself (in place, so the transient memory is one [M, N, k]
    tensor), into a new one when z is the saved tensor (a second backward must find it intact). Two GEMMs and a column
    sum give the gradients (ops/_projections.py)."""
    x2d, weight, bias = operands(x, weight, bias)
    N, K, D = weight.shape
    M = x2d.shape[0]
    gy = grad_y.reshape(M, K).contiguous()
    if projections is None:
        w2d = weight.view(N * K, D)
        z = torch.addmm(bias.view(N * K), x2d, w2d.T) if bias is not None else x2d @ w2d.T
        z = out = z.view(M, N, K)
    else:
        z = projections.reshape(M, N, K).contiguous()
        out = torch.empty_like(z)
    grad_z_kernel(z, gy, out)
    dx, dw, db = projection_grads(out, x2d, weight, bias is not None, needs)
    return (dx.view(x.shape) if dx is not None else None), dw, db
