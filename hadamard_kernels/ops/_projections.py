"""Gradients of stacked projections z_n = x W_n^T + b_n (n = 1..N), shared by the polynomial families: their
fused backward kernels write grad_z = dL/dz, and two GEMMs (cuBLAS through torch) reduce it."""

from __future__ import annotations

import torch


def projection_grads(grad_z: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, has_bias: bool, needs):
    """dx, dweight, dbias from grad_z = dL/d(x W_n^T + b_n) laid out (M, N, k): two GEMMs and a column sum.

    With that layout, dx = grad_z.view(M, N*k) @ weight.view(N*k, d) and dweight.view(N*k, d) = grad_z^T @ x."""
    M, N, k = grad_z.shape
    gz = grad_z.view(M, N * k)
    need_x, need_w, need_b = needs
    dx = gz @ weight.reshape(N * k, -1) if need_x else None
    dw = (gz.t() @ x2d).view(N, k, -1) if need_w else None
    acc = torch.float64 if grad_z.dtype == torch.float64 else torch.float32
    db = grad_z.sum(0, dtype=acc).to(grad_z.dtype) if (need_b and has_bias) else None
    return dx, dw, db
