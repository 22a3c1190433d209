"""CUDA C++ backend of poly_sa: launchers for the kernels in csrc/poly_sa.cu (module hadamard_kernels._C).

Four kernels, each a block GEMM (64 tokens x 64 columns, tensor cores for float16/bfloat16, exact fp32 FMAs for
float32) with its own prologue and epilogue: the pool's per-split sums (both projections per z tile, the product
and the masked token sum in the epilogue), the output (z * m formed while staging the A operand, the residual in
the epilogue), the output backward (G @ w3^T; dz, u and the per-split sums of q and dalpha) and the pool's gradient
(both projections again; [s * p2 | s * p1]). The per-split sums are reduced by torch.sum in a fixed order, the
gradient GEMMs run in torch (common.fused_backward, shared with the Triton backend).
"""

from __future__ import annotations

import sys

import torch

from ..._backend import require_cuda_extension
from .common import fused_entry_points, pool_mean, row_stride, rows, token_split


def _params(ext, z, **fields):
    """The kernels' PolySaParams for z [B, N, C]; `fields` are the other pointers (tensors or None) and sizes."""
    B, N, C = z.shape
    z2 = rows(z)
    pointers = {name: (0 if t is None else t.data_ptr()) for name, t in fields.items() if not isinstance(t, int)}
    sizes = {name: v for name, v in fields.items() if isinstance(v, int)}
    return ext.PolySaParams(z=z2.data_ptr(), B=B, N=N, C=C, z_row_stride=row_stride(z2),
                            dtype=ext.DTYPES.index(str(z.dtype).removeprefix("torch.")), **pointers, **sizes)


def _mask(mask):
    return None if mask is None else mask.contiguous().view(torch.uint8)


def _run(launcher, params, device):
    with torch.cuda.device(device):
        launcher(params, torch.cuda.current_stream().cuda_stream)


def pool_sum(z, w1, w2, mask):
    """m (B, C) float32: the kernel's per-split sums, reduced over the splits in a fixed order, / count."""
    ext = require_cuda_extension()
    B, N, C = z.shape
    per = token_split(B, N, C, z.device)
    part = torch.empty((B, -(-N // per), C), device=z.device, dtype=torch.float32)
    mask8 = _mask(mask)
    params = _params(ext, z, w1=w1.contiguous(), w2=w2.contiguous(), mask=mask8, part=part, tokens_per_split=per)
    _run(ext.poly_sa_pool_fwd, params, z.device)
    return pool_mean(part, z, mask)


def pool_gradient(s, z, w1, w2, mask):
    """grad_p (B*N, 2C) = [dp1 | dp2], dp = dL/d(z @ w), from s = dL/dm / count (B, C) float32."""
    ext = require_cuda_extension()
    B, N, C = z.shape
    grad_p = torch.empty((B * N, 2 * C), device=z.device, dtype=z.dtype)
    params = _params(ext, z, w1=w1.contiguous(), w2=w2.contiguous(), mask=_mask(mask),
                     s=s.to(torch.float32).contiguous(), grad_p=grad_p)
    _run(ext.poly_sa_pool_bwd, params, z.device)
    return grad_p


def out_forward(z, m, w3, alpha, beta):
    """Y (B, N, C) = alpha * z + beta * ((z * m) @ w3) with m (B, C) float32."""
    ext = require_cuda_extension()
    B, N, C = z.shape
    y = torch.empty((B * N, C), device=z.device, dtype=z.dtype)
    params = _params(ext, z, w3=w3.contiguous(), alpha=alpha.contiguous(), beta=beta.contiguous(), m=m.contiguous(),
                     y=y, out_row_stride=C)
    _run(ext.poly_sa_out_fwd, params, z.device)
    return y.view(z.shape)


def out_backward(grad_y, z, m, w3, alpha, beta):
    """(dz_direct [B*N, C], u [B*N, C], q [B, C], dalpha 0-d) as the Triton backend's out_backward."""
    ext = require_cuda_extension()
    B, N, C = z.shape
    per = token_split(B, N, C, z.device)
    g2 = rows(grad_y)
    dz = torch.empty((B * N, C), device=z.device, dtype=z.dtype)
    u = torch.empty_like(dz)
    part = torch.empty((2, B, -(-N // per), C), device=z.device, dtype=torch.float32)
    params = _params(ext, z, w3=w3.contiguous(), alpha=alpha.contiguous(), beta=beta.contiguous(), m=m.contiguous(),
                     grad_y=g2, g_row_stride=row_stride(g2), part=part, dz=dz, u=u, out_row_stride=C,
                     tokens_per_split=per)
    _run(ext.poly_sa_out_bwd, params, z.device)
    return dz, u, part[0].sum(1), part[1].sum()


pool_forward, pool_backward, forward, backward = fused_entry_points(sys.modules[__name__])
