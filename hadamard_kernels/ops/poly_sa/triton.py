"""Triton kernels for poly_sa (Poly-SA, DESIGN.md §3).

Pool (forward, and recomputed by the backward): a program owns one batch row b, a block of BJ columns and a split of
the tokens; for each tile of BT tokens it reads z once per BK-chunk for both projections (two tl.dot into two fp32
[BT, BJ] accumulators), multiplies them, drops padded tokens and sums the tile over its tokens into a [BJ] fp32
accumulator. The projections and their product stay in registers. Each program stores its sum in
part[b, split, columns]; one torch.sum over the splits (a fixed order: the same bits run to run) and the division by
the count of real tokens give m (B, C) in fp32 (float64 for float64 inputs). The split count depends only on the
shape and the device (token_split), never on the tile config.

Output: Y = alpha * z + beta * ((z * m) @ w3) as one GEMM over flat token rows whose A operand z * m is formed in
registers (m gathered per row's batch, rounded to the input dtype for the tensor cores), with the residual and the
scalars in the epilogue (alpha, beta read from device memory: no host sync).

Backward (only the inputs are saved; m is recomputed by the pool kernel). With G = dL/dY and Gp = G @ w3^T:
- one kernel per (batch, column block, token split) computes Gp, writes dz = alpha G + beta Gp * m and
  u = beta z * m, and sums q = sum_t Gp * z (so dm = beta q, dbeta = sum m * q) and sum_t G * z (dalpha) into
  per-program partials, reduced by torch.sum in a fixed order;
- dw3 = u^T G (one GEMM);
- one kernel over flat token rows recomputes both projections of a [BT, BJ] tile and writes the pool's
  gradient grad_p = [s * (z w2) | s * (z w1)] (M, 2C) with s = dm / count (0 on padded tokens): a gradient, not the
  projections;
- two GEMMs: dz += grad_p @ [w1 | w2]^T and [dw1 | dw2] = z^T grad_p (as poly_chain's backward).
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from .._library import triton_autotune
from .common import (
    accumulate_dtype,
    fused_entry_points,
    pool_mean,
    rows,
    token_split,
)

# Tiles: BT tokens x BJ (or BI) columns, BK the contraction chunk; the first config of each list is the default.
# Register use on sm_90 (bf16, ptxas -v of the build) picks the lists: two [BT, BJ] fp32 accumulators
# (pool, pool gradient) spill at 128 x 128 or 64 x 128 with 4 warps, so those take 8; the output-backward epilogue
# spills at 128 x 128.
_TWO_ACC_CONFIGS = [
    triton.Config({"BT": bt, "BJ": bj, "BK": bk}, num_warps=w, num_stages=s)
    for bt, bj, bk, w, s in [
        (128, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (64, 64, 64, 4, 4), (32, 32, 32, 4, 2),
    ]
]
_OUT_CONFIGS = [
    triton.Config({"BT": bt, "BJ": bj, "BK": bk}, num_warps=w, num_stages=s)
    for bt, bj, bk, w, s in [
        (128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (32, 32, 32, 4, 2),
    ]
]
_OUT_BWD_CONFIGS = [
    triton.Config({"BT": bt, "BI": bi, "BK": bk}, num_warps=w, num_stages=s)
    for bt, bi, bk, w, s in [
        (128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (64, 64, 64, 4, 4), (64, 64, 64, 8, 4), (32, 32, 32, 4, 2),
    ]
]


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr, ACC: tl.constexpr):
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=ACC)
    else:
        acc = tl.dot(a, b, acc, out_dtype=ACC)
    return acc


@triton.jit
def _projections(z_ptr, w1_ptr, w2_ptr, rows, m_rows, o_j, m_j, C, stride_z, IEEE: tl.constexpr,
                 ACC: tl.constexpr, BT: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr):
    """[BT, BJ] tiles of z @ w1 and z @ w2 (rows `rows` of z [*, C], columns o_j of w [C, C]), each z chunk read
    once for both."""
    p1 = tl.zeros((BT, BJ), ACC)
    p2 = tl.zeros((BT, BJ), ACC)
    p_z = z_ptr + rows[:, None] * stride_z
    for k0 in range(0, C, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < C
        b_z = tl.load(p_z + o_k[None, :], mask=m_rows[:, None] & m_k[None, :], other=0.0)
        o_w = o_k[:, None] * C + o_j[None, :]
        m_w = m_k[:, None] & m_j[None, :]
        p1 = _dot(b_z, tl.load(w1_ptr + o_w, mask=m_w, other=0.0), p1, IEEE, ACC)
        p2 = _dot(b_z, tl.load(w2_ptr + o_w, mask=m_w, other=0.0), p2, IEEE, ACC)
    return p1, p2


@triton.jit
def _real_tokens(mask_ptr, rows, m_rows, HAS_MASK: tl.constexpr):
    keep = m_rows
    if HAS_MASK:
        keep = keep & (tl.load(mask_ptr + rows, mask=m_rows, other=0) != 0)
    return keep


@triton.jit
def _poly_sa_pool_kernel(z_ptr, w1_ptr, w2_ptr, mask_ptr, part_ptr, N, C, tokens_per_split, n_splits, stride_z,
                         HAS_MASK: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr, BT: tl.constexpr,
                         BJ: tl.constexpr, BK: tl.constexpr):
    """part[b, split, j] = sum over the split's real tokens t of (z_t @ w1)_j * (z_t @ w2)_j.

    Program (b * column blocks + column block, split); z rows are b * N + t."""
    n_j = tl.cdiv(C, BJ)
    i_b, i_j = tl.program_id(0) // n_j, tl.program_id(0) % n_j
    i_s = tl.program_id(1)
    o_j = i_j * BJ + tl.arange(0, BJ)
    m_j = o_j < C
    t_end = tl.minimum((i_s + 1) * tokens_per_split, N)
    acc = tl.zeros((BJ,), ACC)
    for t0 in range(i_s * tokens_per_split, t_end, BT):
        o_t = t0 + tl.arange(0, BT)
        m_t = o_t < t_end
        rows = i_b.to(tl.int64) * N + o_t
        p1, p2 = _projections(z_ptr, w1_ptr, w2_ptr, rows, m_t, o_j, m_j, C, stride_z, IEEE, ACC, BT, BJ, BK)
        keep = _real_tokens(mask_ptr, rows, m_t, HAS_MASK)
        acc += tl.sum(tl.where(keep[:, None], p1 * p2, 0.0), axis=0)
    tl.store(part_ptr + (i_b.to(tl.int64) * n_splits + i_s) * C + o_j, acc, mask=m_j)


@triton.jit
def _poly_sa_out_kernel(z_ptr, m_ptr, w3_ptr, alpha_ptr, beta_ptr, y_ptr, M, N, C, stride_z, stride_y,
                        IEEE: tl.constexpr, ACC: tl.constexpr, BT: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr):
    """y [M, C] = alpha * z + beta * ((z * m[row // N]) @ w3) for a [BT, BJ] tile of flat token rows."""
    n_j = tl.cdiv(C, BJ)
    i_t, i_j = tl.program_id(0) // n_j, tl.program_id(0) % n_j
    rows = i_t.to(tl.int64) * BT + tl.arange(0, BT)
    m_rows = rows < M
    o_j = i_j * BJ + tl.arange(0, BJ)
    m_j = o_j < C
    p_z = z_ptr + rows[:, None] * stride_z
    p_m = m_ptr + (rows // N)[:, None] * C
    acc = tl.zeros((BT, BJ), ACC)
    for k0 in range(0, C, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < C
        m_a = m_rows[:, None] & m_k[None, :]
        b_z = tl.load(p_z + o_k[None, :], mask=m_a, other=0.0)
        b_u = (b_z.to(ACC) * tl.load(p_m + o_k[None, :], mask=m_a, other=0.0)).to(b_z.dtype)
        b_w = tl.load(w3_ptr + o_k[:, None] * C + o_j[None, :], mask=m_k[:, None] & m_j[None, :], other=0.0)
        acc = _dot(b_u, b_w, acc, IEEE, ACC)
    alpha = tl.load(alpha_ptr).to(ACC)
    beta = tl.load(beta_ptr).to(ACC)
    m_y = m_rows[:, None] & m_j[None, :]
    z_j = tl.load(p_z + o_j[None, :], mask=m_y, other=0.0).to(ACC)
    y = alpha * z_j + beta * acc
    tl.store(y_ptr + rows[:, None] * stride_y + o_j[None, :], y.to(y_ptr.dtype.element_ty), mask=m_y)


@triton.jit
def _poly_sa_out_bwd_kernel(z_ptr, g_ptr, m_ptr, w3_ptr, alpha_ptr, beta_ptr, dz_ptr, u_ptr, part_ptr, N, C,
                            tokens_per_split, n_splits, part_plane, stride_z, stride_g, stride_dz, stride_u,
                            IEEE: tl.constexpr, ACC: tl.constexpr, BT: tl.constexpr, BI: tl.constexpr,
                            BK: tl.constexpr):
    """For the tokens of one split of batch row b and a block of BI columns, with Gp = G @ w3^T:
    dz = alpha G + beta Gp * m_b, u = beta z * m_b (both [M, C], input dtype), and the partial sums
    part[0, b, split, i] = sum_t Gp * z, part[1, b, split, i] = sum_t G * z (planes part_plane apart)."""
    n_i = tl.cdiv(C, BI)
    i_b, i_i = tl.program_id(0) // n_i, tl.program_id(0) % n_i
    i_s = tl.program_id(1)
    o_i = i_i * BI + tl.arange(0, BI)
    m_i = o_i < C
    m_b = tl.load(m_ptr + i_b.to(tl.int64) * C + o_i, mask=m_i, other=0.0)[None, :]
    alpha = tl.load(alpha_ptr).to(ACC)
    beta = tl.load(beta_ptr).to(ACC)
    acc_q = tl.zeros((BI,), ACC)
    acc_a = tl.zeros((BI,), ACC)
    t_end = tl.minimum((i_s + 1) * tokens_per_split, N)
    for t0 in range(i_s * tokens_per_split, t_end, BT):
        o_t = t0 + tl.arange(0, BT)
        m_t = o_t < t_end
        rows = (i_b.to(tl.int64) * N + o_t)[:, None]
        p_g = g_ptr + rows * stride_g
        gp = tl.zeros((BT, BI), ACC)
        for k0 in range(0, C, BK):
            o_k = k0 + tl.arange(0, BK)
            m_k = o_k < C
            b_g = tl.load(p_g + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
            b_w = tl.load(w3_ptr + o_i[:, None] * C + o_k[None, :], mask=m_i[:, None] & m_k[None, :], other=0.0)
            gp = _dot(b_g, tl.trans(b_w), gp, IEEE, ACC)
        # z's uses first, then grad_y's: fewer fp32 tiles live at once than with both loaded up front (on sm_90 the
        # [128, 64] tile spilled that way).
        m_tile = m_t[:, None] & m_i[None, :]
        b_z = tl.load(z_ptr + rows * stride_z + o_i[None, :], mask=m_tile, other=0.0).to(ACC)
        acc_q += tl.sum(gp * b_z, axis=0)
        tl.store(u_ptr + rows * stride_u + o_i[None, :], (beta * b_z * m_b).to(u_ptr.dtype.element_ty),
                 mask=m_tile)
        b_g = tl.load(p_g + o_i[None, :], mask=m_tile, other=0.0).to(ACC)
        acc_a += tl.sum(b_g * b_z, axis=0)
        dz = alpha * b_g + beta * gp * m_b
        tl.store(dz_ptr + rows * stride_dz + o_i[None, :], dz.to(dz_ptr.dtype.element_ty), mask=m_tile)
    p_part = part_ptr + (i_b.to(tl.int64) * n_splits + i_s) * C + o_i
    tl.store(p_part, acc_q, mask=m_i)
    tl.store(p_part + part_plane, acc_a, mask=m_i)


@triton.jit
def _poly_sa_pool_bwd_kernel(z_ptr, w1_ptr, w2_ptr, mask_ptr, s_ptr, gp_ptr, M, N, C, stride_z, stride_gp,
                             HAS_MASK: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr, BT: tl.constexpr,
                             BJ: tl.constexpr, BK: tl.constexpr):
    """grad_p [M, 2C] = [dp1 | dp2] for a [BT, BJ] tile of flat token rows: dp1 = s_b * (z @ w2),
    dp2 = s_b * (z @ w1) on real tokens, 0 on padded ones (s = dL/dm / count, [B, C])."""
    n_j = tl.cdiv(C, BJ)
    i_t, i_j = tl.program_id(0) // n_j, tl.program_id(0) % n_j
    rows = i_t.to(tl.int64) * BT + tl.arange(0, BT)
    m_rows = rows < M
    o_j = i_j * BJ + tl.arange(0, BJ)
    m_j = o_j < C
    p1, p2 = _projections(z_ptr, w1_ptr, w2_ptr, rows, m_rows, o_j, m_j, C, stride_z, IEEE, ACC, BT, BJ, BK)
    keep = _real_tokens(mask_ptr, rows, m_rows, HAS_MASK)[:, None]
    m_tile = m_rows[:, None] & m_j[None, :]
    s = tl.load(s_ptr + (rows // N)[:, None] * C + o_j[None, :], mask=m_tile, other=0.0)
    p_out = gp_ptr + rows[:, None] * stride_gp + o_j[None, :]
    tl.store(p_out, tl.where(keep, s * p2, 0.0).to(gp_ptr.dtype.element_ty), mask=m_tile)
    tl.store(p_out + C, tl.where(keep, s * p1, 0.0).to(gp_ptr.dtype.element_ty), mask=m_tile)


_pool_tuned = triton_autotune(_TWO_ACC_CONFIGS, key=["N", "C", "HAS_MASK"])(_poly_sa_pool_kernel)
_out_tuned = triton_autotune(_OUT_CONFIGS, key=["C"])(_poly_sa_out_kernel)
_out_bwd_tuned = triton_autotune(_OUT_BWD_CONFIGS, key=["N", "C"])(_poly_sa_out_bwd_kernel)
_pool_bwd_tuned = triton_autotune(_TWO_ACC_CONFIGS, key=["C", "HAS_MASK"])(_poly_sa_pool_bwd_kernel)


# ---------------------------------------------------------------- launchers
def _flags(dtype):
    return dict(
        # fp32 inputs honour torch's TF32 switch; fp64 (interpreter) accumulates in fp64.
        IEEE=dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32,
        ACC=tl.float64 if dtype == torch.float64 else tl.float32,
    )


def _mask_arg(mask, like):
    """(pointer, HAS_MASK): the mask as bytes, flat over (B, N) rows."""
    if mask is None:
        return like, False
    return mask.contiguous().view(torch.uint8), True


def _config(config, tuned, raw):
    """(kernel, launch config): the autotuned entry point, or the raw kernel with an explicit config (tests)."""
    return (raw, config) if config else (tuned, {})


def pool_sum(z, w1, w2, mask, *, tokens_per_split=None, **config):
    """m (B, C) in the accumulate dtype (fp32, fp64 for fp64). config: an explicit tile (BT, BJ, BK, num_warps) and
    tokens_per_split for tests; by default autotuned and common.token_split."""
    B, N, C = z.shape
    z2 = rows(z)
    per = tokens_per_split or token_split(B, N, C, z.device)
    splits = triton.cdiv(N, per)
    part = torch.empty((B, splits, C), device=z.device, dtype=accumulate_dtype(z.dtype))
    mask_ptr, has_mask = _mask_arg(mask, z2)
    kernel, config = _config(config, _pool_tuned, _poly_sa_pool_kernel)
    grid = lambda meta: (B * triton.cdiv(C, meta["BJ"]), splits)  # noqa: E731
    kernel[grid](z2, w1.contiguous(), w2.contiguous(), mask_ptr, part, N, C, per, splits, z2.stride(0),
                 HAS_MASK=has_mask, **_flags(z.dtype), **config)
    return pool_mean(part, z, mask)


def pool_gradient(s, z, w1, w2, mask, **config):
    """grad_p (B*N, 2C) = [dp1 | dp2], dp = dL/d(z @ w), from s = dL/dm / count (B, C)."""
    B, N, C = z.shape
    z2 = rows(z)
    M = z2.shape[0]
    grad_p = torch.empty((M, 2 * C), device=z.device, dtype=z.dtype)
    mask_ptr, has_mask = _mask_arg(mask, z2)
    kernel, config = _config(config, _pool_bwd_tuned, _poly_sa_pool_bwd_kernel)
    grid = lambda meta: (triton.cdiv(M, meta["BT"]) * triton.cdiv(C, meta["BJ"]),)  # noqa: E731
    kernel[grid](z2, w1.contiguous(), w2.contiguous(), mask_ptr, s.contiguous(), grad_p, M, N, C, z2.stride(0),
                 grad_p.stride(0), HAS_MASK=has_mask, **_flags(z.dtype), **config)
    return grad_p


def out_forward(z, m, w3, alpha, beta, **config):
    """Y (B, N, C) = alpha * z + beta * ((z * m) @ w3) with m (B, C) in the accumulate dtype."""
    B, N, C = z.shape
    z2 = rows(z)
    M = z2.shape[0]
    y = torch.empty((M, C), device=z.device, dtype=z.dtype)
    kernel, config = _config(config, _out_tuned, _poly_sa_out_kernel)
    grid = lambda meta: (triton.cdiv(M, meta["BT"]) * triton.cdiv(C, meta["BJ"]),)  # noqa: E731
    kernel[grid](z2, m.contiguous(), w3.contiguous(), alpha, beta, y, M, N, C, z2.stride(0), y.stride(0),
                 **_flags(z.dtype), **config)
    return y.view(z.shape)


def out_backward(grad_y, z, m, w3, alpha, beta, *, tokens_per_split=None, **config):
    """(dz_direct [B*N, C], u [B*N, C], q [B, C], dalpha 0-d): dz_direct = alpha G + beta (G @ w3^T) * m,
    u = beta z * m, q = sum over tokens of (G @ w3^T) * z, dalpha = sum G * z (sums in the accumulate dtype)."""
    B, N, C = z.shape
    z2, g2 = rows(z), rows(grad_y)
    M = z2.shape[0]
    per = tokens_per_split or token_split(B, N, C, z.device)
    splits = triton.cdiv(N, per)
    dz = torch.empty((M, C), device=z.device, dtype=z.dtype)
    u = torch.empty((M, C), device=z.device, dtype=z.dtype)
    part = torch.empty((2, B, splits, C), device=z.device, dtype=accumulate_dtype(z.dtype))
    kernel, config = _config(config, _out_bwd_tuned, _poly_sa_out_bwd_kernel)
    grid = lambda meta: (B * triton.cdiv(C, meta["BI"]), splits)  # noqa: E731
    kernel[grid](z2, g2, m.contiguous(), w3.contiguous(), alpha, beta, dz, u, part, N, C, per, splits,
                 B * splits * C, z2.stride(0), g2.stride(0), dz.stride(0), u.stride(0), **_flags(z.dtype), **config)
    return dz, u, part[0].sum(1), part[1].sum()


pool_forward, pool_backward, forward, backward = fused_entry_points(sys.modules[__name__])
