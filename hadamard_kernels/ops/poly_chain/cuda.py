"""CUDA C++ backend of poly_chain: launchers for the kernels in csrc/poly_chain.cu (module hadamard_kernels._C).

Forward: one kernel computes y [M, k] with the N projections of each 64 x 64 output tile and the chain in
registers. Backward: one kernel computes grad_z [M, N, k] = dL/d(x W_n^T + b_n) with prefix/suffix products
(an fp32 workspace holds the per-degree terms between its two passes), then two cuBLAS GEMMs give dx and
dweight (ops/_projections.py).
"""

from __future__ import annotations

import torch

from ..._backend import require_cuda_extension
from .._projections import projection_grads
from .common import ACTIVATIONS, MODES


def _prepare(x, weight, bias):
    """2D contiguous views the kernels index with row strides."""
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    return x2d, weight.contiguous(), (bias.contiguous() if bias is not None else None)


def _params(ext, x2d, weight, bias, mode, activation, scale, **buffers):
    """The kernel's PolyChainParams; `buffers` names the output pointers. Every operand is contiguous, so the row
    strides are d and k (not stride(0), which PyTorch leaves arbitrary for a single row)."""
    N, K, D = weight.shape
    return ext.PolyChainParams(
        x=x2d.data_ptr(), weight=weight.data_ptr(), bias=bias.data_ptr() if bias is not None else 0,
        M=x2d.shape[0], d=D, k=K, N=N, x_row_stride=D, y_row_stride=K,
        dtype=ext.DTYPES.index(str(x2d.dtype).removeprefix("torch.")),
        activation=ACTIVATIONS.index(activation), mode=MODES.index(mode), scale=float(scale), **buffers)


def forward(x, weight, bias, mode, activation, scale):
    ext = require_cuda_extension()
    x2d, weight, bias = _prepare(x, weight, bias)
    K = weight.shape[1]
    y = torch.empty((x2d.shape[0], K), device=x.device, dtype=x.dtype)
    with torch.cuda.device(x.device):
        params = _params(ext, x2d, weight, bias, mode, activation, scale, y=y.data_ptr())
        ext.poly_chain_fwd(params, torch.cuda.current_stream().cuda_stream)
    return y.view(*x.shape[:-1], K)


def backward(grad_y, x, weight, bias, mode, activation, scale, needs):
    ext = require_cuda_extension()
    x2d, weight, bias = _prepare(x, weight, bias)
    N, K, _ = weight.shape
    M = x2d.shape[0]
    gy = grad_y.reshape(M, K).contiguous()
    grad_z = torch.empty((M, N, K), device=x.device, dtype=x.dtype)
    with torch.cuda.device(x.device):
        params = _params(ext, x2d, weight, bias, mode, activation, scale, grad_y=gy.data_ptr(),
                         grad_z=grad_z.data_ptr())
        workspace = torch.empty(ext.poly_chain_bwd_workspace_bytes(params), device=x.device, dtype=torch.uint8)
        params.workspace = workspace.data_ptr()
        ext.poly_chain_bwd(params, torch.cuda.current_stream().cuda_stream)
    dx, dw, db = projection_grads(grad_z, x2d, weight, bias is not None, needs)
    return (dx.view(x.shape) if dx is not None else None), dw, db
