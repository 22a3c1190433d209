"""Triton kernels for lrnn_product.

A program's tile is BM rows x BR neurons; its dot has BR * DBP columns, neuron l's components j = 0..DBP-1 side by
side (DBP = dbar rounded up to a power of two; the padding components are masked to the factor 1). Column c is
weight row l * dbar + j, so for a power-of-two dbar the tile's weight rows are one contiguous block.

Forward: z = x W^T + b over d with tl.dot (fp32 accumulation), g(z) and the factors 1 + gamma g in registers, the
product over each neuron's DBP components by a reduction: only phi (M, rank) is written.

Backward: for a chunk of rows, one kernel recomputes the tile's z, forms the leave-one-out products
prod_{k != j} (1 + gamma g_k) as exclusive prefix times exclusive suffix products (inclusive tl.cumprod scans
shifted by one component, exact when a factor is 0, no division), and writes grad_z = dphi * gamma * loo * g'(z)
for the chunk; for "mlp" it also sums the g_params gradients over its rows (fp32, into per-split slots it owns:
fixed order, no atomics). Then dx = grad_z W, dW += grad_z^T x and db += colsum(grad_z) in torch (cuBLAS). The
chunk of rows is bounded by CHUNK_BYTES of grad_z, so the backward's transient memory does not grow with the batch
(docs/decisions.md, LRNN).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._library import triton_autotune
from .._triton_lib import stacked_projection, tanh
from .common import ACTIVATIONS, ROW_ALIGN, accumulate_dtype, chunked_backward, split_rows

_ACT_CODE = {name: code for code, name in enumerate(ACTIVATIONS)}
_MLP = _ACT_CODE["mlp"]

# (BM, BN, BD, warps, stages): BN = the dot's columns (BR = BN / DBP neurons, at least one); BD = the d-chunk of
# the dot (16 suits d <= 16, the coordinates of implicit representations). The first config is the default: no
# spills on sm_90 for every activation at dbar 8 and 16 in bf16 (docs/decisions.md, LRNN).
_FWD_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn, "BD": bd}, num_warps=w, num_stages=s)
    for bm, bn, bd, w, s in [
        (64, 128, 32, 8, 3), (128, 64, 32, 8, 3), (64, 128, 16, 8, 2), (128, 128, 32, 8, 3), (64, 128, 64, 8, 3),
        (128, 64, 64, 8, 3), (64, 64, 16, 4, 2), (32, 32, 16, 2, 2),
    ]
]
_BWD_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn, "BD": bd}, num_warps=w, num_stages=s)
    for bm, bn, bd, w, s in [
        (64, 64, 32, 8, 3), (64, 64, 64, 8, 3), (64, 64, 16, 8, 2), (32, 64, 32, 4, 3), (64, 128, 32, 8, 3),
        (32, 32, 16, 2, 2),
    ]
]
_KEY = ["D", "R", "DBAR", "H", "HAS_BIAS", "ACT", "DBP"]


@triton.jit
def _arctan(z):
    """atan from sqrt, division and a series (tl has no atan, the interpreter no libdevice): for |z| > 1,
    atan|z| = pi/2 - atan(1/|z|); two halvings atan(t) = 2 atan(t / (1 + sqrt(1 + t^2))) bring t into
    [0, tan(pi/16)] = [0, 0.199], where 12 terms of the Taylor series are exact to float64 rounding."""
    a = tl.abs(z)
    inverted = a > 1.0
    t = tl.where(inverted, 1.0 / tl.where(inverted, a, 1.0), a)
    t = t / (1.0 + tl.sqrt(1.0 + t * t))
    t = t / (1.0 + tl.sqrt(1.0 + t * t))
    t2 = t * t
    p = 1.0 / 25.0
    for k in tl.static_range(11, -1, -1):
        p = p * t2 * (-1.0) + 1.0 / (2 * k + 1)
    r = 4.0 * t * p
    r = tl.where(inverted, 1.5707963267948966 - r, r)
    return tl.where(z < 0.0, -r, r)


@triton.jit
def _activation(z, row, m_c, p_ptr, H, RDH, omega, ACT: tl.constexpr, GRAD: tl.constexpr):
    """(g(z), g'(z)) for a [BM, BW] tile z whose columns are weight rows `row` (masked by m_c); g'(z) only when
    GRAD (else z is returned in its place). ACT codes: the order of common.ACTIVATIONS. For mlp (ACT 4), p_ptr is
    g_params (3, rank, dbar, H) contiguous, RDH = rank * dbar * H."""
    dg = z
    if ACT == 0:  # sin(omega z)
        g = tl.sin(omega * z)
        if GRAD:
            dg = omega * tl.cos(omega * z)
    elif ACT == 1:  # spder: sin(z) sqrt|z|; g' = sqrt|z| (cos z + sinc(z) / 2), exactly 0 at z = 0
        root = tl.sqrt(tl.abs(z))
        s = tl.sin(z)
        g = s * root
        if GRAD:
            sinc = tl.where(z == 0.0, 1.0, s / tl.where(z == 0.0, 1.0, z))
            dg = root * (tl.cos(z) + 0.5 * sinc)
    elif ACT == 2:  # arctan
        g = _arctan(z)
        if GRAD:
            dg = 1.0 / (1.0 + z * z)
    elif ACT == 3:  # tanh
        g = tanh(z)
        if GRAD:
            dg = 1.0 - g * g
    else:  # mlp: sum_i a_i tanh(w_i z + c_i), per column
        g = tl.zeros(z.shape, z.dtype)
        if GRAD:
            dg = tl.zeros(z.shape, z.dtype)
        p_row = p_ptr + row.to(tl.int64) * H
        for i in range(H):
            a = tl.load(p_row + i, mask=m_c, other=0.0).to(z.dtype)[None, :]
            w = tl.load(p_row + RDH + i, mask=m_c, other=0.0).to(z.dtype)[None, :]
            c = tl.load(p_row + 2 * RDH + i, mask=m_c, other=0.0).to(z.dtype)[None, :]
            t = tanh(w * z + c)
            g += a * t
            if GRAD:
                dg += a * w * (1.0 - t * t)
    return g, dg


@triton.jit
def _multiply(a, b):
    return a * b


@triton.jit
def _exclusive_products(f, BM: tl.constexpr, BR: tl.constexpr, DBP: tl.constexpr):
    """(prod_{k < j} f_k, prod_{k > j} f_k) along the last axis of f [BM, BR, DBP]: the inclusive scans shifted by
    one component (a gather), 1 at the ends. Exact when a factor is 0: no division."""
    j = tl.broadcast_to(tl.arange(0, DBP)[None, None, :], (BM, BR, DBP))
    prefix = tl.gather(tl.cumprod(f, 2), tl.maximum(j - 1, 0), 2)
    suffix = tl.gather(tl.cumprod(f, 2, reverse=True), tl.minimum(j + 1, DBP - 1), 2)
    return tl.where(j == 0, 1.0, prefix), tl.where(j == DBP - 1, 1.0, suffix)


@triton.jit
def _tile_columns(i_n, R, DBAR, DBP: tl.constexpr, BR: tl.constexpr):
    """Column c of a neuron block: neuron l = i_n * BR + c // DBP, component j = c % DBP, weight row l * DBAR + j."""
    o_c = tl.arange(0, BR * DBP)
    o_l = i_n * BR + o_c // DBP
    o_j = o_c % DBP
    m_c = (o_l < R) & (o_j < DBAR)
    return o_l, o_l * DBAR + o_j, m_c


@triton.jit
def _lrnn_fwd_kernel(x_ptr, w_ptr, b_ptr, p_ptr, phi_ptr, M, D, R, DBAR, H, omega, gamma, stride_xm, stride_pm,
                     HAS_BIAS: tl.constexpr, ACT: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr,
                     DBP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """phi [M, R] for a tile of BM rows and BR = max(1, BN // DBP) neurons."""
    BR: tl.constexpr = (BN + DBP - 1) // DBP
    i_m, i_n = tl.program_id(0), tl.program_id(1)
    o_m = i_m.to(tl.int64) * BM + tl.arange(0, BM)
    _, row, m_c = _tile_columns(i_n, R, DBAR, DBP, BR)
    z = stacked_projection(x_ptr, w_ptr, b_ptr, 0, o_m, row, M, D, 0, stride_xm, HAS_BIAS, IEEE, ACC, BM, BR * DBP,
                           BD, m_c)
    g, _ = _activation(z, row, m_c, p_ptr, H, R * DBAR * H, omega, ACT, False)
    f = tl.where(m_c[None, :], 1.0 + gamma * g, 1.0)
    phi = tl.reduce(tl.reshape(f, (BM, BR, DBP)), 2, _multiply)
    o_l = i_n * BR + tl.arange(0, BR)
    mask = (o_m < M)[:, None] & (o_l < R)[None, :]
    tl.store(phi_ptr + o_m[:, None] * stride_pm + o_l[None, :], phi.to(phi_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lrnn_grad_z_kernel(x_ptr, w_ptr, b_ptr, p_ptr, dphi_ptr, gz_ptr, dp_ptr, M, D, R, DBAR, H, ROWS, omega, gamma,
                        stride_xm, stride_dm, stride_gm, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                        IEEE: tl.constexpr, ACC: tl.constexpr, DBP: tl.constexpr, BM: tl.constexpr,
                        BN: tl.constexpr, BD: tl.constexpr):
    """grad_z [M, R * DBAR] = dphi_l * gamma * prod_{k != j} (1 + gamma g(z_lk)) * g'(z_lj) for rows
    [i_s * ROWS, (i_s + 1) * ROWS) and a block of BR neurons; for mlp, the block's g_params gradients summed over
    those rows into dp [splits, 3, R * DBAR, H] (fp32, slot i_s: this program's alone)."""
    BR: tl.constexpr = (BN + DBP - 1) // DBP
    BW: tl.constexpr = BR * DBP
    i_s, i_n = tl.program_id(0), tl.program_id(1)
    o_l, row, m_c = _tile_columns(i_n, R, DBAR, DBP, BR)
    RDH = R * DBAR * H
    p_dp = dp_ptr + i_s.to(tl.int64) * 3 * RDH + row.to(tl.int64) * H
    row_start = i_s.to(tl.int64) * ROWS
    row_end = tl.minimum(M, row_start + ROWS)
    for m0 in range(row_start, row_end, BM):
        o_m = m0 + tl.arange(0, BM)
        m_m = o_m < row_end
        z = stacked_projection(x_ptr, w_ptr, b_ptr, 0, o_m, row, row_end, D, 0, stride_xm, HAS_BIAS, IEEE, ACC,
                               BM, BW, BD, m_c)
        g, dg = _activation(z, row, m_c, p_ptr, H, RDH, omega, ACT, True)
        f = tl.reshape(tl.where(m_c[None, :], 1.0 + gamma * g, 1.0), (BM, BR, DBP))
        prefix, suffix = _exclusive_products(f, BM, BR, DBP)
        mask = m_m[:, None] & m_c[None, :]
        # dphi gathered per column (neuron o_l); rows past the end give 0, so they add nothing to the sums below.
        dphi = tl.load(dphi_ptr + o_m[:, None] * stride_dm + o_l[None, :], mask=mask, other=0.0).to(ACC)
        grad_g = dphi * gamma * tl.reshape(prefix * suffix, (BM, BW))
        tl.store(gz_ptr + o_m[:, None] * stride_gm + row[None, :], (grad_g * dg).to(gz_ptr.dtype.element_ty),
                 mask=mask)
        if ACT == 4:
            # g = sum_i a_i t_i, t_i = tanh(w_i z + c_i): dg/da_i = t_i, dg/dc_i = a_i (1 - t_i^2), dg/dw_i = z dg/dc_i
            p_row = p_ptr + row.to(tl.int64) * H
            # The first row tile stores, the others add: the slots need no zeroing, so a rerun (the autotuner's
            # benchmark runs) gives the same sums.
            first = m0 == row_start
            for i in range(H):
                a = tl.load(p_row + i, mask=m_c, other=0.0).to(ACC)[None, :]
                w = tl.load(p_row + RDH + i, mask=m_c, other=0.0).to(ACC)[None, :]
                c = tl.load(p_row + 2 * RDH + i, mask=m_c, other=0.0).to(ACC)[None, :]
                t = tanh(w * z + c)
                s = grad_g * a * (1.0 - t * t)
                da = tl.sum(grad_g * t, 0)
                dc = tl.sum(s, 0)
                dw = tl.sum(s * z, 0)
                tl.store(p_dp + i, tl.where(first, 0.0, tl.load(p_dp + i, mask=m_c)) + da, mask=m_c)
                tl.store(p_dp + RDH + i, tl.where(first, 0.0, tl.load(p_dp + RDH + i, mask=m_c)) + dw, mask=m_c)
                tl.store(p_dp + 2 * RDH + i, tl.where(first, 0.0, tl.load(p_dp + 2 * RDH + i, mask=m_c)) + dc, mask=m_c)


_fwd = triton_autotune(_FWD_CONFIGS, key=_KEY)(_lrnn_fwd_kernel)
_grad_z = triton_autotune(_BWD_CONFIGS, key=_KEY)(_lrnn_grad_z_kernel)


def _neurons_per_tile(bn: int, dbp: int) -> int:
    return -(-bn // dbp)  # BR of the kernels


def _launch_args(x, weight, bias, g_params, rank, dbar, activation):
    """Contiguous operands and the constexpr flags shared by both kernels."""
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    g_params = g_params.contiguous() if g_params is not None else None
    flags = dict(
        HAS_BIAS=bias is not None,
        ACT=_ACT_CODE[activation],
        # fp32 inputs honour torch's TF32 switch; fp64 (interpreter) accumulates in fp64.
        IEEE=x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32,
        ACC=tl.float64 if x.dtype == torch.float64 else tl.float32,
        DBP=triton.next_power_of_2(dbar),
    )
    h = g_params.shape[-1] if g_params is not None else 0
    return weight, bias, g_params, h, flags


def forward(x, weight, bias, g_params, rank, dbar, activation, omega, gamma, *, kernel=None, **config):
    """kernel/config: a raw launch of _lrnn_fwd_kernel with an explicit tile config (tests); by default the
    autotuned entry point."""
    x = x.contiguous()
    weight, bias, g_params, h, flags = _launch_args(x, weight, bias, g_params, rank, dbar, activation)
    M, D = x.shape
    phi = torch.empty((M, rank), device=x.device, dtype=x.dtype)

    def grid(meta):
        return triton.cdiv(M, meta["BM"]), triton.cdiv(rank, _neurons_per_tile(meta["BN"], flags["DBP"]))

    (kernel or _fwd)[grid](x, weight, bias if bias is not None else x, g_params if g_params is not None else x, phi,
                           M, D, rank, dbar, h, omega, gamma, x.stride(0), phi.stride(0), **flags, **config)
    return phi


def backward(grad_phi, x, weight, bias, g_params, rank, dbar, activation, omega, gamma, needs, *, chunk_bytes=None,
             kernel=None, **config):
    """-> (dx, dweight, dbias, dg_params), by common.chunked_backward around _lrnn_grad_z_kernel (chunk_bytes: the
    budget of one grad_z chunk, common.CHUNK_BYTES by default); kernel/config: a raw launch of
    _lrnn_grad_z_kernel with an explicit tile config."""
    x = x.contiguous()
    grad_phi = grad_phi.contiguous()
    weight, bias, g_params, h, flags = _launch_args(x, weight, bias, g_params, rank, dbar, activation)
    D = x.shape[1]
    columns = rank * dbar
    mlp = flags["ACT"] == _MLP

    def grad_z_chunk(r0, r1, gz, need_g):
        rows = r1 - r0
        # The mlp kernel sums its parameter gradients over a split's rows; other activations take one row block.
        split = split_rows(rows, columns, x.device) if mlp else ROW_ALIGN
        splits = triton.cdiv(rows, split)
        part = torch.empty((splits, 3, columns, h) if mlp else (1,), device=x.device,
                           dtype=accumulate_dtype(x.dtype))

        def grid(meta):
            return splits, triton.cdiv(rank, _neurons_per_tile(meta["BN"], flags["DBP"]))

        (kernel or _grad_z)[grid](x[r0:r1], weight, bias if bias is not None else x, g_params if mlp else x,
                                  grad_phi[r0:r1], gz, part, rows, D, rank, dbar, h, split, omega, gamma, x.stride(0),
                                  grad_phi.stride(0), gz.stride(0), **flags, **config)
        return part if need_g else None

    return chunked_backward(grad_z_chunk, x, weight, bias, g_params, rank, dbar, needs, chunk_bytes)
