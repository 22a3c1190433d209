"""CUDA C++ backend of lrnn_product: launchers for the kernels in csrc/lrnn.cu (module hadamard_kernels._C).

Forward: one kernel; a block owns 64 rows and floor(64 / dbar) whole neurons, computes their z with a block GEMM
(mma.sync for float16/bfloat16, exact fp32 FMAs for float32) and takes g and the fp32 product over dbar in its
epilogue: only phi (M, rank) is written.

Backward, per chunk of rows (common.chunked_backward, shared with the Triton backend: grad_z of a chunk stays within
common.CHUNK_BYTES): one kernel recomputes z and writes grad_z for the chunk (leave-one-out products by exclusive
prefix and suffix products, no division) and, for mlp, per-split fp32 sums of the g_params gradients; then
dx = grad_z W, dW += grad_z^T x and db += colsum(grad_z) in torch, and the splits' sums are added in a fixed order.
"""

from __future__ import annotations

import torch

from ..._backend import require_cuda_extension
from .common import ACTIVATIONS, chunked_backward, split_rows

TILE_ROWS = 64  # rows of x per block
TILE_COLUMNS = 64  # z columns per block: floor(64 / dbar) whole neurons (common.MAX_DBAR is 64)
_MAX_BLOCKS = 2**31 - 1  # one-dimensional grid


def _column_tiles(rank: int, dbar: int) -> int:
    per = TILE_COLUMNS // dbar  # neurons per block
    return -(-rank // per)


def _row_stride(t) -> int:
    """The row stride the kernels index with: a contiguous tensor of one row may carry any stride (PyTorch ignores
    the stride of a size-1 dim), and only its row 0 is read."""
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def _params(ext, x, weight, bias, g_params, rank, dbar, activation, omega, gamma, **fields):
    """The kernels' LrnnParams for x (rows, d) with unit column stride; `fields`: the outputs and their strides."""
    return ext.LrnnParams(
        x=x.data_ptr(), weight=weight.data_ptr(), bias=0 if bias is None else bias.data_ptr(),
        g_params=0 if g_params is None else g_params.data_ptr(), M=x.shape[0], d=x.shape[1], rank=rank, dbar=dbar,
        h=0 if g_params is None else g_params.shape[-1], x_row_stride=_row_stride(x),
        dtype=ext.DTYPES.index(str(x.dtype).removeprefix("torch.")), activation=ACTIVATIONS.index(activation),
        omega=float(omega), gamma=float(gamma), **fields)


def _contiguous(weight, bias, g_params):
    return (weight.contiguous(), None if bias is None else bias.contiguous(),
            None if g_params is None else g_params.contiguous())


def _run(launcher, params, device):
    with torch.cuda.device(device):
        launcher(params, torch.cuda.current_stream().cuda_stream)


def forward(x, weight, bias, g_params, rank, dbar, activation, omega, gamma):
    ext = require_cuda_extension()
    x = x.contiguous()
    weight, bias, g_params = _contiguous(weight, bias, g_params)
    phi = torch.empty((x.shape[0], rank), device=x.device, dtype=x.dtype)
    rows = _MAX_BLOCKS // _column_tiles(rank, dbar) * TILE_ROWS  # launches of at most _MAX_BLOCKS blocks
    for r0 in range(0, x.shape[0], rows):
        part = phi[r0:r0 + rows]
        params = _params(ext, x[r0:r0 + rows], weight, bias, g_params, rank, dbar, activation, omega, gamma,
                         phi=part.data_ptr(), phi_row_stride=_row_stride(part))
        _run(ext.lrnn_fwd, params, x.device)
    return phi


def grad_z(grad_phi, x, weight, bias, g_params, rank, dbar, activation, omega, gamma, out, rows_per_split,
           param_sums):
    """Launches the backward kernel on rows x (rows, d): writes out (rows, rank * dbar) = dL/dz and returns, with
    param_sums (mlp only), the per-split sums of dL/dg_params (splits, 3, rank * dbar, h) in float32, else None. A
    block walks rows_per_split rows (a multiple of 64). Operands contiguous but for the row strides of x, grad_phi
    and out."""
    ext = require_cuda_extension()
    part = None
    if param_sums:
        splits = -(-x.shape[0] // rows_per_split)
        part = torch.empty((splits, 3, rank * dbar, g_params.shape[-1]), device=x.device, dtype=torch.float32)
    params = _params(ext, x, weight, bias, g_params, rank, dbar, activation, omega, gamma,
                     grad_phi=grad_phi.data_ptr(), phi_row_stride=_row_stride(grad_phi), grad_z=out.data_ptr(),
                     grad_z_row_stride=_row_stride(out), g_params_part=0 if part is None else part.data_ptr(),
                     rows_per_split=rows_per_split)
    _run(ext.lrnn_bwd, params, x.device)
    return part


def backward(grad_phi, x, weight, bias, g_params, rank, dbar, activation, omega, gamma, needs, *, chunk_bytes=None):
    """-> (dx, dweight, dbias, dg_params), by common.chunked_backward around the grad_z kernel (chunk_bytes: the
    budget of one grad_z chunk, common.CHUNK_BYTES by default)."""
    x = x.contiguous()
    grad_phi = grad_phi.contiguous()
    weight, bias, g_params = _contiguous(weight, bias, g_params)
    columns = rank * dbar

    def grad_z_chunk(r0, r1, gz, need_g):
        # mlp sums its parameter gradients over a split's rows: few splits of whole multiples of 128 rows
        split = split_rows(r1 - r0, columns, x.device) if need_g else TILE_ROWS
        return grad_z(grad_phi[r0:r1], x[r0:r1], weight, bias, g_params, rank, dbar, activation, omega, gamma, gz,
                      split, need_g)

    return chunked_backward(grad_z_chunk, x, weight, bias, g_params, rank, dbar, needs, chunk_bytes)
