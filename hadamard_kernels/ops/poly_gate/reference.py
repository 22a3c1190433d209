"""The oracle for poly_gate: two LayerNorms, the gate and the shift in plain PyTorch, in float32 (float64 stays
float64).

The backward is written out by hand (gradcheck verifies it against finite differences of `forward`): the LayerNorm
input gradient in its textbook form and the shift's transpose as explicit slice additions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import spatial_shift as shift
from .common import spatial_shift_adjoint


def _compute_dtype(a):
    return torch.float64 if a.dtype == torch.float64 else torch.float32


def _normalise(x, eps):
    """(x - mean) / sqrt(var + eps) over the last dim (biased variance, as nn.LayerNorm) and 1 / sqrt(var + eps)."""
    mean = x.mean(-1, keepdim=True)
    rstd = torch.rsqrt((x - mean).square().mean(-1, keepdim=True) + eps)
    return (x - mean) * rstd, rstd


def _alpha(alpha, like):
    return 1.0 if alpha is None else alpha.to(like.dtype)


def forward(a, b, ln1_weight, ln1_bias, ln2_weight, ln2_bias, alpha, eps, spatial_shift):
    """a, b [..., C] (a [B, W, H, C] with spatial_shift) -> y [..., C]:
    n1 = LN1(shift(a) or a), n2 = LN2(b), y = n1 + alpha * n1 * n2 (alpha None means 1)."""
    compute = _compute_dtype(a)
    C = a.shape[-1]
    x1 = (shift(a) if spatial_shift else a).to(compute)
    n1 = F.layer_norm(x1, (C,), ln1_weight.to(compute), ln1_bias.to(compute), eps)
    n2 = F.layer_norm(b.to(compute), (C,), ln2_weight.to(compute), ln2_bias.to(compute), eps)
    return (n1 + _alpha(alpha, n1) * n1 * n2).to(a.dtype)


def _layer_norm_backward(dn, xhat, rstd, weight):
    """dL/dx, dL/dweight, dL/dbias of n = xhat * weight + bias, xhat = (x - mean) * rstd, from dL/dn."""
    dxhat = dn * weight
    dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    rows = tuple(range(dn.dim() - 1))
    return dx, (dn * xhat).sum(rows), dn.sum(rows)


def backward(grad_y, a, b, ln1_weight, ln1_bias, ln2_weight, ln2_bias, alpha, eps, spatial_shift, needs):
    compute = _compute_dtype(a)
    x1 = (shift(a) if spatial_shift else a).to(compute)
    xhat1, rstd1 = _normalise(x1, eps)
    xhat2, rstd2 = _normalise(b.to(compute), eps)
    w1, w2 = ln1_weight.to(compute), ln2_weight.to(compute)
    n1 = xhat1 * w1 + ln1_bias.to(compute)
    n2 = xhat2 * w2 + ln2_bias.to(compute)
    g = grad_y.to(compute)
    al = _alpha(alpha, g)
    # y = n1 + alpha * n1 * n2
    dn1 = g * (1 + al * n2)
    dn2 = g * al * n1
    dx1, dw1, db1 = _layer_norm_backward(dn1, xhat1, rstd1, w1)
    dx2, dw2, db2 = _layer_norm_backward(dn2, xhat2, rstd2, w2)
    dalpha = None
    if alpha is not None and needs[6]:
        per_channel = (g * n1 * n2).reshape(-1, a.shape[-1]).sum(0)
        dalpha = per_channel.reshape(alpha.shape) if alpha.numel() == a.shape[-1] and alpha.dim() == 1 \
            else per_channel.sum().reshape(alpha.shape)
    da = (spatial_shift_adjoint(dx1) if spatial_shift else dx1) if needs[0] else None
    grads = (da, dx2 if needs[1] else None, dw1, db1, dw2, db2, dalpha)
    dtypes = (a.dtype, b.dtype, ln1_weight.dtype, ln1_bias.dtype, ln2_weight.dtype, ln2_bias.dtype,
              None if alpha is None else alpha.dtype)
    return tuple(None if (g is None or not need) else g.to(dtype) for g, need, dtype in zip(grads, needs, dtypes))
