"""CUDA C++ backend of poly_ncp: launchers for the kernels in csrc/poly_ncp.cu (module hadamard_kernels._C).

Forward: one kernel; a block owns a few rows and all k columns and runs the chain in shared memory (tensor-core
MMAs for float16/bfloat16, exact fp32 FMAs for float32). Backward: one kernel per chunk of rows recomputes the
chain and writes grad_a, grad_s and ys; GEMMs in torch turn them into the gradients
(common.backward_in_row_chunks, which also bounds that transient memory).

k > MAX_K: the per-degree path (one launch per degree and 64 x 64 tile of y_n, the chain in device memory; see
csrc/poly_ncp.cu). Its forward needs one [M, k] workspace (the second buffer of the chain); its backward writes the
same grad_a, grad_s and ys.
"""

from __future__ import annotations

import torch

from ..._backend import require_cuda_extension
from .common import backward_in_row_chunks

# kPolyNcpMaxK in csrc/include/hadamard_kernels/poly_ncp.h (exported as _C.POLY_NCP_MAX_K): up to this k a block
# keeps [rows, k] fp32 tiles of a, s and dL/dy in shared memory; larger k takes the per-degree path.
MAX_K = 256


def _prepare(a_weight, a_bias, s_weight, s_bias):
    N = a_weight.shape[0]
    contiguous = lambda t: None if t is None else t.contiguous()  # noqa: E731
    # With N = 1 the S tensors are empty and never read: pass null pointers.
    if N == 1:
        s_weight = s_bias = None
    return contiguous(a_weight), contiguous(a_bias), contiguous(s_weight), contiguous(s_bias)


def _params(ext, x2d, a_weight, a_bias, s_weight, s_bias, **buffers):
    """The kernel's PolyNcpParams; `buffers` names the output pointers and y_row_stride."""
    N, K, D = a_weight.shape
    ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    return ext.PolyNcpParams(
        x=x2d.data_ptr(), a_weight=a_weight.data_ptr(), a_bias=ptr(a_bias), s_weight=ptr(s_weight),
        s_bias=ptr(s_bias), M=x2d.shape[0], d=D, k=K, N=N, x_row_stride=x2d.stride(0),
        dtype=ext.DTYPES.index(str(x2d.dtype).removeprefix("torch.")), per_degree=K > MAX_K, **buffers)


def forward(x, a_weight, a_bias, s_weight, s_bias):
    ext = require_cuda_extension()
    weights = _prepare(a_weight, a_bias, s_weight, s_bias)
    N, K, _ = a_weight.shape
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty((x2d.shape[0], K), device=x.device, dtype=x.dtype)
    workspace = torch.empty_like(y) if (K > MAX_K and N > 1) else None
    with torch.cuda.device(x.device):
        params = _params(ext, x2d, *weights, y=y.data_ptr(), y_row_stride=y.stride(0),
                         workspace=0 if workspace is None else workspace.data_ptr())
        ext.poly_ncp_fwd(params, torch.cuda.current_stream().cuda_stream)
    return y.view(*x.shape[:-1], K)


def backward(grad_y, x, a_weight, a_bias, s_weight, s_bias, needs):
    ext = require_cuda_extension()
    weights = _prepare(a_weight, a_bias, s_weight, s_bias)
    N, K, _ = a_weight.shape

    def chain_grads(x2d, gy):
        M = x2d.shape[0]
        grad_a = x2d.new_empty((M, N, K))
        grad_s, ys = x2d.new_empty((N - 1, M, K)), x2d.new_empty((N - 1, M, K))
        with torch.cuda.device(x2d.device):
            params = _params(ext, x2d, *weights, grad_y=gy.data_ptr(), y_row_stride=gy.stride(0),
                             grad_a=grad_a.data_ptr(), grad_s=grad_s.data_ptr() if N > 1 else 0,
                             ys=ys.data_ptr() if N > 1 else 0)
            ext.poly_ncp_bwd(params, torch.cuda.current_stream().cuda_stream)
        return grad_a, grad_s, ys

    return backward_in_row_chunks(chain_grads, grad_y, x, a_weight, a_bias, s_weight, s_bias, needs)
