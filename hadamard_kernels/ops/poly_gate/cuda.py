"""CUDA C++ backend of poly_gate: launchers for the kernels in csrc/poly_gate.cu (module hadamard_kernels._C).

Forward: a warp per row (statistics in float32, the shift as an index remap). Backward: one persistent kernel over
tiles of rows writes da, db and per-block sums of the parameter gradients, which one torch.sum reduces
(common.reduce_param_grads).
"""

from __future__ import annotations

import torch

from ..._backend import require_cuda_extension
from .common import PARAM_GRADS, reduce_param_grads

# kPolyGateMaxC in csrc/include/hadamard_kernels/poly_gate.h (exported as _C.POLY_GATE_MAX_C): a backward block
# keeps five [C] float32 rows of parameter-gradient sums in shared memory.
MAX_C = 2048


def unsupported(a, b, ln1_weight, ln1_bias, ln2_weight, ln2_bias, alpha, eps, spatial_shift):
    C = a.shape[-1]
    if C > MAX_C:
        return f"the cuda backward keeps [C] float32 sums in shared memory and supports C <= {MAX_C}, got C={C}"
    return None


def _rows(t, C):
    """t [..., C] as an [M, C] view with unit channel stride (a copy only when no such view exists)."""
    t2 = t.reshape(-1, C)
    return t2 if t2.stride(-1) == 1 and t2.stride(0) >= C else t2.contiguous()


def _params(ext, a2, b2, params, alpha, eps, spatial_dims, **buffers):
    """The kernels' PolyGateParams; `buffers` names the outputs, the grad_y pointer and their row strides."""
    M, C = a2.shape
    W, H = spatial_dims or (1, 1)
    alpha_flat = None if alpha is None else alpha.reshape(-1).contiguous()
    return ext.PolyGateParams(
        a=a2.data_ptr(), b=b2.data_ptr(), ln1_weight=params[0].data_ptr(), ln1_bias=params[1].data_ptr(),
        ln2_weight=params[2].data_ptr(), ln2_bias=params[3].data_ptr(),
        alpha=0 if alpha_flat is None else alpha_flat.data_ptr(),
        alpha_stride=0 if alpha_flat is None or alpha_flat.numel() == 1 else 1,
        M=M, C=C, W=W, H=H, a_row_stride=a2.stride(0), b_row_stride=b2.stride(0), eps=float(eps),
        spatial=spatial_dims is not None, dtype=ext.DTYPES.index(str(a2.dtype).removeprefix("torch.")), **buffers), \
        alpha_flat


def _inputs(a, b, ln1_weight, ln1_bias, ln2_weight, ln2_bias, spatial_shift):
    C = a.shape[-1]
    spatial_dims = (a.shape[1], a.shape[2]) if spatial_shift else None
    return _rows(a, C), _rows(b, C), [t.contiguous() for t in (ln1_weight, ln1_bias, ln2_weight, ln2_bias)], \
        spatial_dims


def forward(a, b, ln1_weight, ln1_bias, ln2_weight, ln2_bias, alpha, eps, spatial_shift):
    ext = require_cuda_extension()
    a2, b2, params, spatial_dims = _inputs(a, b, ln1_weight, ln1_bias, ln2_weight, ln2_bias, spatial_shift)
    y = torch.empty(a2.shape, device=a.device, dtype=a.dtype)
    with torch.cuda.device(a.device):
        p, _keep = _params(ext, a2, b2, params, alpha, eps, spatial_dims, y=y.data_ptr(), y_row_stride=y.stride(0))
        ext.poly_gate_fwd(p, torch.cuda.current_stream().cuda_stream)
    return y.view(a.shape)


def backward_blocks(M: int, device: torch.device) -> int:
    """Blocks of the persistent backward: a few per SM (each writes one row of partial sums), at most one per
    8 rows."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(4 * sms, (M + 7) // 8))


def backward(grad_y, a, b, ln1_weight, ln1_bias, ln2_weight, ln2_bias, alpha, eps, spatial_shift, needs):
    ext = require_cuda_extension()
    a2, b2, params, spatial_dims = _inputs(a, b, ln1_weight, ln1_bias, ln2_weight, ln2_bias, spatial_shift)
    M, C = a2.shape
    g2 = _rows(grad_y, C)
    da = torch.empty((M, C), device=a.device, dtype=a.dtype)
    db = torch.empty((M, C), device=a.device, dtype=b.dtype)
    grid = backward_blocks(M, a.device)
    part = torch.empty((PARAM_GRADS, grid, C), device=a.device, dtype=torch.float32)
    with torch.cuda.device(a.device):
        p, _keep = _params(ext, a2, b2, params, alpha, eps, spatial_dims, grad_y=g2.data_ptr(),
                           y_row_stride=g2.stride(0), da=da.data_ptr(), da_row_stride=da.stride(0), db=db.data_ptr(),
                           db_row_stride=db.stride(0), partial=part.data_ptr(), grid=grid)
        ext.poly_gate_bwd(p, torch.cuda.current_stream().cuda_stream)
    dtypes = [t.dtype for t in (ln1_weight, ln1_bias, ln2_weight, ln2_bias)] + [None if alpha is None else alpha.dtype]
    param_grads = reduce_param_grads(part, alpha, needs[2:], dtypes)
    return (da.view(a.shape) if needs[0] else None, db.view(b.shape) if needs[1] else None, *param_grads)
