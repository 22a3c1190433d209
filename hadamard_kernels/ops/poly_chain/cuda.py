"""CUDA C++ backend of poly_chain: launchers for the kernels in csrc/poly_chain.cu (module hadamard_kernels._C).

Forward: one kernel computes y [M, k]: each block a 128-row tile of 128 (degree, output column) slots, d streamed
through a cp.async ring, the N projections and the chain in registers (with save_projections it also writes them,
z [M, N, k]). With HADAMARD_KERNELS_CUDA_WGMMA=1, float16/bfloat16 on an sm_90 GPU take the Hopper kernel instead
(wgmma, 128 x 256 slots; opt-in until its GPU tests pass on an H100). Backward (common.backward, shared with the
Triton backend): z saved by the forward or recomputed by one cuBLAS GEMM, then one element-wise kernel writes
grad_z = dL/dz with prefix/suffix products in fp32 registers (no workspace), then two cuBLAS GEMMs give dx and
dweight (ops/_projections.py).
"""

from __future__ import annotations

import torch

from ..._backend import cuda_wgmma_requested, require_cuda_extension
from ..._backend import is_hopper as _is_hopper
from . import common
from .common import ACTIVATIONS, MODES

_WGMMA_DTYPES = (torch.float16, torch.bfloat16)  # wgmma has no exact float32 (tf32 only)
_INT32_MAX = 2**31 - 1


def _use_wgmma(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The forward takes the Hopper kernel: asked for (HADAMARD_KERNELS_CUDA_WGMMA=1), float16/bfloat16 on an sm_90
    GPU, and N * k rows of W within its 32-bit row index."""
    N, K = weight.shape[:2]
    return (cuda_wgmma_requested() and x.dtype in _WGMMA_DTYPES and N * K <= _INT32_MAX
            and _is_hopper(x.device))


def _params(ext, M, shape, dtype, mode, activation, scale, **pointers):
    """The kernels' PolyChainParams for M rows and weight `shape` (N, k, d); `pointers`: the data_ptr() of the
    operands the launcher uses. Every operand is contiguous, so the row strides are d and k (not stride(0), which
    PyTorch leaves arbitrary for a single row)."""
    N, K, D = shape
    return ext.PolyChainParams(
        M=M, d=D, k=K, N=N, x_row_stride=D, y_row_stride=K, dtype=ext.DTYPES.index(str(dtype).removeprefix("torch.")),
        activation=ACTIVATIONS.index(activation), mode=MODES.index(mode), scale=float(scale), **pointers)


def forward(x, weight, bias, mode, activation, scale, *, save_projections=False):
    """With save_projections, returns (y, z [..., N, k]): the kernel also writes z (params.z)."""
    ext = require_cuda_extension()
    x2d, weight, bias = common.operands(x, weight, bias)
    N, K = weight.shape[:2]
    y = torch.empty((x2d.shape[0], K), device=x.device, dtype=x.dtype)
    z = torch.empty((x2d.shape[0], N, K), device=x.device, dtype=x.dtype) if save_projections else None
    with torch.cuda.device(x.device):
        params = _params(ext, x2d.shape[0], weight.shape, x.dtype, mode, activation, scale, x=x2d.data_ptr(),
                         weight=weight.data_ptr(), bias=bias.data_ptr() if bias is not None else 0, y=y.data_ptr(),
                         z=z.data_ptr() if save_projections else 0, wgmma=_use_wgmma(x, weight))
        ext.poly_chain_fwd(params, torch.cuda.current_stream().cuda_stream)
    y = y.view(*x.shape[:-1], K)
    return (y, z.view(*x.shape[:-1], N, K)) if save_projections else y


def backward(grad_y, x, weight, bias, mode, activation, scale, needs, projections=None):
    ext = require_cuda_extension()

    def grad_z(z, gy, out):
        with torch.cuda.device(x.device):
            params = _params(ext, gy.shape[0], weight.shape, x.dtype, mode, activation, scale, z=z.data_ptr(),
                             grad_y=gy.data_ptr(), grad_z=out.data_ptr())
            ext.poly_chain_bwd(params, torch.cuda.current_stream().cuda_stream)

    return common.backward(grad_z, grad_y, x, weight, bias, needs, projections)
