"""Triton kernels for poly_gate (MONet's PolyMlp gate, DESIGN.md §5).

Forward: a program owns BM whole rows ([BM, BC] in registers, BC = next power of 2 of C) and reads each row of a
and b once: with the spatial shift, element (row r, channel c) of LN1's input is read from row r ± 1 or r ± H of a
(an index remap, no shifted copy); the two LayerNorms' statistics (mean, then the centred variance) are taken in
float32 (float64 for float64 inputs) and y = n1 + alpha * n1 * n2 is written once.

Backward: one persistent kernel. Each program walks tiles of rows, recomputes the statistics (nothing but a and b is
saved by the forward), writes da and db once and keeps its share of the five parameter gradients (LN1 and LN2
weight and bias, alpha per channel) in registers; a [5, programs, C] buffer of those partial sums is reduced by one
torch.sum. The shift's transpose is a scatter that is a permutation of rows once the two reads of each border pixel
are added together: for the +W group, row w sends its gradient to row (w - 1) mod W, row 1 sends its own plus row
0's, and row 0 sends 0 (to row W - 1, which no output read). The tiles of the spatial case are 2 x 2 pixels (4 x 4
for an axis of length 3) or larger, in an order that puts pixels 0 and 1, and W - 2 and W - 1, of each axis in one
tile, so those sums stay in registers: no atomics, and every element of da is written exactly once.

Rows wider than MAX_C channels (the wide path, any C): the kernels walk a row in chunks of BC channels instead of
holding it, reading it once per pass: the forward three times (mean, centred variance, output), the backward four
(the same statistics, the two row sums of each LayerNorm's input gradient, then the gradients). The parameter
gradients' per-program sums are added into the [5, programs, C] buffer chunk by chunk. With the shift, the wide
backward writes the gradient of the shifted input (float32) and torch applies the shift's transpose
(common.spatial_shift_adjoint): an [M, C] float32 buffer and its transpose as transient memory, for the rare rows
that wide.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import PARAM_GRADS, reduce_param_grads, shift_groups, spatial_shift_adjoint

# Up to MAX_C channels a program keeps whole rows in registers; wider rows would spill and take the wide path.
MAX_C = 8192


@triton.jit
def _group(c, G1, G2, G3):
    """Channel group of channel c: 0 (+W), 1 (-W), 2 (+H), 3 (-H)."""
    return (c >= G1).to(tl.int32) + (c >= G2).to(tl.int32) + (c >= G3).to(tl.int32)


@triton.jit
def _shift_source(r, grp, W, H):
    """The row of a that row r (flat over (B, W, H)) of the shifted tensor reads, in channel group grp."""
    w = (r // H) % W
    h = r % H
    step = tl.where(grp == 0, tl.where(w > 0, -H, 0),
                    tl.where(grp == 1, tl.where(w < W - 1, H, 0),
                             tl.where(grp == 2, tl.where(h > 0, -1, 0), tl.where(h < H - 1, 1, 0))))
    return r + step


@triton.jit
def _normalise(x, m_c, C, eps):
    """(xhat, rstd) of the rows of x over its last axis (masked channels m_c hold 0): two-pass statistics."""
    mean = tl.sum(x, axis=len(x.shape) - 1, keep_dims=True) / C
    xc = tl.where(m_c, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=len(x.shape) - 1, keep_dims=True) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    return xc * rstd, rstd


@triton.jit
def _input_grad(dn, xhat, rstd, weight, C):
    """dL/dx of n = xhat * weight + bias: rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))."""
    dxhat = dn * weight
    m1 = tl.sum(dxhat, axis=len(dn.shape) - 1, keep_dims=True) / C
    m2 = tl.sum(dxhat * xhat, axis=len(dn.shape) - 1, keep_dims=True) / C
    return rstd * (dxhat - m1 - xhat * m2)


@triton.jit
def _poly_gate_fwd_kernel(a_ptr, b_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, alpha_ptr, y_ptr, M, C, W, H, G1, G2, G3,
                          stride_a, stride_b, stride_y, alpha_stride, eps, SPATIAL: tl.constexpr,
                          HAS_ALPHA: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    """y [M, C] = n1 + alpha * n1 * n2 for rows i_m * BM .. + BM; n1 = LN1(shift(a) or a), n2 = LN2(b)."""
    o_m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    o_c = tl.arange(0, BC)
    m_c = (o_c < C)[None, :]
    mask = (o_m < M)[:, None] & m_c
    rows = o_m[:, None]
    if SPATIAL:
        src = _shift_source(rows, _group(o_c, G1, G2, G3)[None, :], W, H)
    else:
        src = rows
    x1 = tl.load(a_ptr + src * stride_a + o_c[None, :], mask=mask, other=0.0).to(ACC)
    x2 = tl.load(b_ptr + rows * stride_b + o_c[None, :], mask=mask, other=0.0).to(ACC)
    xhat1, _ = _normalise(x1, m_c, C, eps)
    xhat2, _ = _normalise(x2, m_c, C, eps)
    n1 = (xhat1 * tl.load(w1_ptr + o_c, mask=o_c < C, other=0.0).to(ACC)[None, :]
          + tl.load(b1_ptr + o_c, mask=o_c < C, other=0.0).to(ACC)[None, :])
    n2 = (xhat2 * tl.load(w2_ptr + o_c, mask=o_c < C, other=0.0).to(ACC)[None, :]
          + tl.load(b2_ptr + o_c, mask=o_c < C, other=0.0).to(ACC)[None, :])
    if HAS_ALPHA:
        y = n1 + tl.load(alpha_ptr + o_c * alpha_stride, mask=o_c < C, other=0.0).to(ACC)[None, :] * n1 * n2
    else:
        y = n1 + n1 * n2
    tl.store(y_ptr + rows * stride_y + o_c[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _border_first(k, n):
    """Pixel of tile position k along an axis of length n: 0, 1, n - 2, n - 1, then 2 .. n - 3 (identity for n < 4),
    so that 2-pixel tiles hold both pairs whose shifted gradients are summed. -1 past the axis."""
    pixel = tl.where(k < 2, k, tl.where(k < 4, n - 4 + k, k - 2))
    pixel = tl.where(n >= 4, pixel, k)
    return tl.where(k < n, pixel, -1)


@triton.jit
def _poly_gate_bwd_kernel(a_ptr, b_ptr, gy_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, alpha_ptr, da_ptr, db_ptr, part_ptr,
                          M, C, W, H, G1, G2, G3, n_tiles, tiles_w, tiles_h, stride_a, stride_b, stride_g, stride_da,
                          stride_db, alpha_stride, eps, SPATIAL: tl.constexpr, HAS_ALPHA: tl.constexpr,
                          ACC: tl.constexpr, TW: tl.constexpr, TH: tl.constexpr, BC: tl.constexpr):
    """da, db [M, C] and the partial sums part[k, program, C] of the parameter gradients
    (k = dln1_weight, dln1_bias, dln2_weight, dln2_bias, dalpha per channel).

    A tile is [TW, TH] rows x BC channels: TW x TH pixels of one image with SPATIAL (rows (b, w, h)), else TH
    consecutive rows (TW = 1)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    o_c = tl.arange(0, BC)
    m_c1 = o_c < C
    c3 = o_c[None, None, :]
    m_c = m_c1[None, None, :]
    grp = _group(c3, G1, G2, G3)
    acc_dw1 = tl.zeros((BC,), ACC)
    acc_db1 = tl.zeros((BC,), ACC)
    acc_dw2 = tl.zeros((BC,), ACC)
    acc_db2 = tl.zeros((BC,), ACC)
    acc_dalpha = tl.zeros((BC,), ACC)
    for t in range(pid, n_tiles, programs):
        if SPATIAL:
            per_image = tiles_w * tiles_h
            i_b = t // per_image
            i_w = (t % per_image) // tiles_h
            i_h = t % tiles_h
            px_w = _border_first(i_w * TW + tl.arange(0, TW), W)[:, None, None]
            px_h = _border_first(i_h * TH + tl.arange(0, TH), H)[None, :, None]
            valid = (px_w >= 0) & (px_h >= 0)
            r = ((i_b * W + px_w) * H + px_h).to(tl.int64)  # row index < M; int64 for the offsets
            src = _shift_source(r, grp, W, H)
        else:
            r = (tl.arange(0, TH).to(tl.int64) + t * TH)[None, :, None]
            valid = r < M
            src = r
        mask = valid & m_c
        # The parameters are re-read per tile (cache hits) rather than held: registers go to the five sums.
        w1 = tl.load(w1_ptr + c3, mask=m_c, other=0.0).to(ACC)
        b1 = tl.load(b1_ptr + c3, mask=m_c, other=0.0).to(ACC)
        w2 = tl.load(w2_ptr + c3, mask=m_c, other=0.0).to(ACC)
        b2 = tl.load(b2_ptr + c3, mask=m_c, other=0.0).to(ACC)
        if HAS_ALPHA:
            alpha = tl.load(alpha_ptr + c3 * alpha_stride, mask=m_c, other=0.0).to(ACC)
        else:
            alpha = tl.full((1, 1, BC), 1.0, ACC)
        # Ordered to keep few [TW, TH, BC] tensors alive at once: LN2's branch is finished (db stored) before
        # LN1's input gradient is formed.
        x2 = tl.load(b_ptr + r * stride_b + c3, mask=mask, other=0.0).to(ACC)
        xhat2, rstd2 = _normalise(x2, m_c, C, eps)
        x1 = tl.load(a_ptr + src * stride_a + c3, mask=mask, other=0.0).to(ACC)
        xhat1, rstd1 = _normalise(x1, m_c, C, eps)
        n1 = xhat1 * w1 + b1
        n2 = xhat2 * w2 + b2
        g = tl.load(gy_ptr + r * stride_g + c3, mask=mask, other=0.0).to(ACC)
        # y = n1 + alpha * n1 * n2; padding rows and channels contribute nothing, whatever the parameters hold.
        acc_dalpha += tl.sum(tl.sum(tl.where(mask, g * n1 * n2, 0.0), axis=0), axis=0)
        dn2 = tl.where(mask, g * alpha * n1, 0.0)
        dn1 = tl.where(mask, g * (1.0 + alpha * n2), 0.0)
        acc_dw2 += tl.sum(tl.sum(dn2 * xhat2, axis=0), axis=0)
        acc_db2 += tl.sum(tl.sum(dn2, axis=0), axis=0)
        dx2 = _input_grad(dn2, xhat2, rstd2, w2, C)
        tl.store(db_ptr + r * stride_db + c3, dx2.to(db_ptr.dtype.element_ty), mask=mask)
        acc_dw1 += tl.sum(tl.sum(dn1 * xhat1, axis=0), axis=0)
        acc_db1 += tl.sum(tl.sum(dn1, axis=0), axis=0)
        dx1 = _input_grad(dn1, xhat1, rstd1, w1, C)
        if SPATIAL:
            # The shift's transpose as a row permutation; the two reads of each border pixel summed in registers.
            # Groups 0/1 (+W/-W) add the term of pixel w = 0 / W - 1 to the row that sends to it (w = 1 / W - 2,
            # or the pixel itself when W = 1), groups 2/3 the same along H. One reduction per axis serves both
            # groups of that axis (their channels are disjoint).
            dx1 = tl.where(mask, dx1, 0.0)
            first_w = (W > 1).to(tl.int32)  # min(1, W - 1)
            last_w = W - 1 - first_w  # max(W - 2, 0)
            first_h = (H > 1).to(tl.int32)
            last_h = H - 1 - first_h
            border_w = ((grp == 0) & (px_w == 0)) | ((grp == 1) & (px_w == W - 1))
            border_h = ((grp == 2) & (px_h == 0)) | ((grp == 3) & (px_h == H - 1))
            from_w = tl.sum(tl.where(border_w, dx1, 0.0), axis=0, keep_dims=True)
            from_h = tl.sum(tl.where(border_h, dx1, 0.0), axis=1, keep_dims=True)
            own = tl.where(grp == 0, px_w >= 1, tl.where(grp == 1, px_w <= W - 2,
                                                         tl.where(grp == 2, px_h >= 1, px_h <= H - 2)))
            carrier_w = ((grp == 0) & (px_w == first_w)) | ((grp == 1) & (px_w == last_w))
            carrier_h = ((grp == 2) & (px_h == first_h)) | ((grp == 3) & (px_h == last_h))
            value = (tl.where(own, dx1, 0.0) + tl.where(carrier_w, from_w, 0.0)
                     + tl.where(carrier_h, from_h, 0.0)).to(da_ptr.dtype.element_ty)
            # Target rows per group ([TW, TH, 1]): one masked store per group keeps the row offsets per row.
            t0 = tl.where(px_w >= 1, r - H, r + (W - 1) * H)  # (w - 1) mod W
            t1 = tl.where(px_w <= W - 2, r + H, r - (W - 1) * H)  # (w + 1) mod W
            t2 = tl.where(px_h >= 1, r - 1, r + (H - 1))  # (h - 1) mod H
            t3 = tl.where(px_h <= H - 2, r + 1, r - (H - 1))  # (h + 1) mod H
            tl.store(da_ptr + t0 * stride_da + c3, value, mask=mask & (grp == 0))
            tl.store(da_ptr + t1 * stride_da + c3, value, mask=mask & (grp == 1))
            tl.store(da_ptr + t2 * stride_da + c3, value, mask=mask & (grp == 2))
            tl.store(da_ptr + t3 * stride_da + c3, value, mask=mask & (grp == 3))
        else:
            tl.store(da_ptr + r * stride_da + c3, dx1.to(da_ptr.dtype.element_ty), mask=mask)
    p_part = part_ptr + pid.to(tl.int64) * C + o_c
    stride_k = programs.to(tl.int64) * C
    tl.store(p_part, acc_dw1, mask=m_c1)
    tl.store(p_part + stride_k, acc_db1, mask=m_c1)
    tl.store(p_part + 2 * stride_k, acc_dw2, mask=m_c1)
    tl.store(p_part + 3 * stride_k, acc_db2, mask=m_c1)
    tl.store(p_part + 4 * stride_k, acc_dalpha, mask=m_c1)


# ---------------------------------------------------------------- the wide path (C > MAX_C)
@triton.jit
def _wide_inputs(a_ptr, b_ptr, rows, o_c, mask, W, H, G1, G2, G3, stride_a, stride_b, SPATIAL: tl.constexpr,
                 ACC: tl.constexpr):
    """LN1's input (a, shifted with SPATIAL) and LN2's (b) at rows x channels o_c, in ACC."""
    if SPATIAL:
        src = _shift_source(rows, _group(o_c, G1, G2, G3)[None, :], W, H)
    else:
        src = rows
    x1 = tl.load(a_ptr + src * stride_a + o_c[None, :], mask=mask, other=0.0).to(ACC)
    x2 = tl.load(b_ptr + rows * stride_b + o_c[None, :], mask=mask, other=0.0).to(ACC)
    return x1, x2


@triton.jit
def _wide_statistics(a_ptr, b_ptr, rows, m_m, C, W, H, G1, G2, G3, stride_a, stride_b, eps, SPATIAL: tl.constexpr,
                     ACC: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    """(mean1, rstd1, mean2, rstd2) of the rows, each [BM, 1], in two passes over chunks of BC channels (the mean,
    then the centred variance, as _normalise)."""
    s1 = tl.zeros((BM, 1), ACC)
    s2 = tl.zeros((BM, 1), ACC)
    for c0 in range(0, C, BC):
        o_c = c0 + tl.arange(0, BC)
        x1, x2 = _wide_inputs(a_ptr, b_ptr, rows, o_c, m_m & (o_c < C)[None, :], W, H, G1, G2, G3, stride_a,
                              stride_b, SPATIAL, ACC)
        s1 += tl.sum(x1, axis=1, keep_dims=True)
        s2 += tl.sum(x2, axis=1, keep_dims=True)
    mean1 = s1 / C
    mean2 = s2 / C
    v1 = tl.zeros((BM, 1), ACC)
    v2 = tl.zeros((BM, 1), ACC)
    for c0 in range(0, C, BC):
        o_c = c0 + tl.arange(0, BC)
        mask = m_m & (o_c < C)[None, :]
        x1, x2 = _wide_inputs(a_ptr, b_ptr, rows, o_c, mask, W, H, G1, G2, G3, stride_a, stride_b, SPATIAL, ACC)
        d1 = tl.where(mask, x1 - mean1, 0.0)
        d2 = tl.where(mask, x2 - mean2, 0.0)
        v1 += tl.sum(d1 * d1, axis=1, keep_dims=True)
        v2 += tl.sum(d2 * d2, axis=1, keep_dims=True)
    return mean1, 1.0 / tl.sqrt(v1 / C + eps), mean2, 1.0 / tl.sqrt(v2 / C + eps)


@triton.jit
def _poly_gate_wide_fwd_kernel(a_ptr, b_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, alpha_ptr, y_ptr, M, C, W, H, G1, G2,
                               G3, stride_a, stride_b, stride_y, alpha_stride, eps, SPATIAL: tl.constexpr,
                               HAS_ALPHA: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    """_poly_gate_fwd_kernel for rows of any width: BM rows, BC channels at a time."""
    o_m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    rows = o_m[:, None]
    m_m = (o_m < M)[:, None]
    mean1, rstd1, mean2, rstd2 = _wide_statistics(a_ptr, b_ptr, rows, m_m, C, W, H, G1, G2, G3, stride_a, stride_b,
                                                  eps, SPATIAL, ACC, BM, BC)
    for c0 in range(0, C, BC):
        o_c = c0 + tl.arange(0, BC)
        m_c = o_c < C
        mask = m_m & m_c[None, :]
        x1, x2 = _wide_inputs(a_ptr, b_ptr, rows, o_c, mask, W, H, G1, G2, G3, stride_a, stride_b, SPATIAL, ACC)
        n1 = ((x1 - mean1) * rstd1 * tl.load(w1_ptr + o_c, mask=m_c, other=0.0).to(ACC)[None, :]
              + tl.load(b1_ptr + o_c, mask=m_c, other=0.0).to(ACC)[None, :])
        n2 = ((x2 - mean2) * rstd2 * tl.load(w2_ptr + o_c, mask=m_c, other=0.0).to(ACC)[None, :]
              + tl.load(b2_ptr + o_c, mask=m_c, other=0.0).to(ACC)[None, :])
        if HAS_ALPHA:
            y = n1 + tl.load(alpha_ptr + o_c * alpha_stride, mask=m_c, other=0.0).to(ACC)[None, :] * n1 * n2
        else:
            y = n1 + n1 * n2
        tl.store(y_ptr + rows * stride_y + o_c[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _wide_chunk_grads(a_ptr, b_ptr, gy_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, alpha_ptr, rows, o_c, m_c, mask, mean1,
                      rstd1, mean2, rstd2, W, H, G1, G2, G3, stride_a, stride_b, stride_g, alpha_stride,
                      SPATIAL: tl.constexpr, HAS_ALPHA: tl.constexpr, ACC: tl.constexpr):
    """A chunk's xhat1, xhat2, LN weights w1, w2 ([1, BC]), dL/dn1, dL/dn2 and dL/dalpha's terms g n1 n2 (the last
    three 0 outside `mask`)."""
    x1, x2 = _wide_inputs(a_ptr, b_ptr, rows, o_c, mask, W, H, G1, G2, G3, stride_a, stride_b, SPATIAL, ACC)
    xhat1 = (x1 - mean1) * rstd1
    xhat2 = (x2 - mean2) * rstd2
    w1 = tl.load(w1_ptr + o_c, mask=m_c, other=0.0).to(ACC)[None, :]
    w2 = tl.load(w2_ptr + o_c, mask=m_c, other=0.0).to(ACC)[None, :]
    n1 = xhat1 * w1 + tl.load(b1_ptr + o_c, mask=m_c, other=0.0).to(ACC)[None, :]
    n2 = xhat2 * w2 + tl.load(b2_ptr + o_c, mask=m_c, other=0.0).to(ACC)[None, :]
    g = tl.load(gy_ptr + rows * stride_g + o_c[None, :], mask=mask, other=0.0).to(ACC)
    if HAS_ALPHA:
        alpha = tl.load(alpha_ptr + o_c * alpha_stride, mask=m_c, other=0.0).to(ACC)[None, :]
        dn1 = tl.where(mask, g * (1.0 + alpha * n2), 0.0)
        dn2 = tl.where(mask, g * alpha * n1, 0.0)
    else:
        dn1 = tl.where(mask, g * (1.0 + n2), 0.0)
        dn2 = tl.where(mask, g * n1, 0.0)
    return xhat1, xhat2, w1, w2, dn1, dn2, tl.where(mask, g * n1 * n2, 0.0)


@triton.jit
def _poly_gate_wide_bwd_kernel(a_ptr, b_ptr, gy_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, alpha_ptr, da_ptr, db_ptr,
                               part_ptr, M, C, W, H, G1, G2, G3, n_tiles, stride_a, stride_b, stride_g, stride_da,
                               stride_db, alpha_stride, eps, SPATIAL: tl.constexpr, HAS_ALPHA: tl.constexpr,
                               ACC: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    """_poly_gate_bwd_kernel for rows of any width, persistent over tiles of BM rows, BC channels at a time: db, and
    da or (SPATIAL) the gradient of LN1's shifted input, which the launcher maps through the shift's transpose;
    part[k, program, C] (zeroed by the launcher) += the program's parameter-gradient sums."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    p_part = part_ptr + pid.to(tl.int64) * C
    stride_k = programs.to(tl.int64) * C
    for t in range(pid, n_tiles, programs):
        o_m = tl.arange(0, BM).to(tl.int64) + t * BM
        rows = o_m[:, None]
        m_m = (o_m < M)[:, None]
        mean1, rstd1, mean2, rstd2 = _wide_statistics(a_ptr, b_ptr, rows, m_m, C, W, H, G1, G2, G3, stride_a,
                                                      stride_b, eps, SPATIAL, ACC, BM, BC)
        # Row sums of each LayerNorm's input gradient: sum(dxhat) and sum(dxhat * xhat), dxhat = dn * weight.
        r1 = tl.zeros((BM, 1), ACC)
        q1 = tl.zeros((BM, 1), ACC)
        r2 = tl.zeros((BM, 1), ACC)
        q2 = tl.zeros((BM, 1), ACC)
        for c0 in range(0, C, BC):
            o_c = c0 + tl.arange(0, BC)
            m_c = o_c < C
            xhat1, xhat2, w1, w2, dn1, dn2, _ = _wide_chunk_grads(
                a_ptr, b_ptr, gy_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, alpha_ptr, rows, o_c, m_c, m_m & m_c[None, :],
                mean1, rstd1, mean2, rstd2, W, H, G1, G2, G3, stride_a, stride_b, stride_g, alpha_stride, SPATIAL,
                HAS_ALPHA, ACC)
            r1 += tl.sum(dn1 * w1, axis=1, keep_dims=True)
            q1 += tl.sum(dn1 * w1 * xhat1, axis=1, keep_dims=True)
            r2 += tl.sum(dn2 * w2, axis=1, keep_dims=True)
            q2 += tl.sum(dn2 * w2 * xhat2, axis=1, keep_dims=True)
        for c0 in range(0, C, BC):
            o_c = c0 + tl.arange(0, BC)
            m_c = o_c < C
            mask = m_m & m_c[None, :]
            xhat1, xhat2, w1, w2, dn1, dn2, d_alpha = _wide_chunk_grads(
                a_ptr, b_ptr, gy_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, alpha_ptr, rows, o_c, m_c, mask, mean1, rstd1,
                mean2, rstd2, W, H, G1, G2, G3, stride_a, stride_b, stride_g, alpha_stride, SPATIAL, HAS_ALPHA, ACC)
            dx1 = rstd1 * (dn1 * w1 - r1 / C - xhat1 * (q1 / C))
            dx2 = rstd2 * (dn2 * w2 - r2 / C - xhat2 * (q2 / C))
            tl.store(da_ptr + rows * stride_da + o_c[None, :], dx1.to(da_ptr.dtype.element_ty), mask=mask)
            tl.store(db_ptr + rows * stride_db + o_c[None, :], dx2.to(db_ptr.dtype.element_ty), mask=mask)
            p = p_part + o_c
            tl.store(p, tl.load(p, mask=m_c, other=0.0) + tl.sum(dn1 * xhat1, axis=0), mask=m_c)
            p += stride_k
            tl.store(p, tl.load(p, mask=m_c, other=0.0) + tl.sum(dn1, axis=0), mask=m_c)
            p += stride_k
            tl.store(p, tl.load(p, mask=m_c, other=0.0) + tl.sum(dn2 * xhat2, axis=0), mask=m_c)
            p += stride_k
            tl.store(p, tl.load(p, mask=m_c, other=0.0) + tl.sum(dn2, axis=0), mask=m_c)
            p += stride_k
            tl.store(p, tl.load(p, mask=m_c, other=0.0) + tl.sum(d_alpha, axis=0), mask=m_c)


# ---------------------------------------------------------------- launchers
def _rows(t, C):
    """t [..., C] as an [M, C] view with unit channel stride (a copy only when no such view exists)."""
    t2 = t.reshape(-1, C)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _num_warps(elements: int) -> int:
    return 4 if elements <= 2048 else 8 if elements <= 8192 else 16


def forward_config(C: int) -> dict:
    """BM rows of BC channels per program: about 4096 elements, at least one row."""
    BC = triton.next_power_of_2(C)
    BM = max(1, min(32, 4096 // BC))
    return dict(BM=BM, BC=BC, num_warps=_num_warps(BM * BC))


def axis_tile(n: int) -> int:
    """Fewest pixels per tile along a spatial axis of length n that keep both border pairs (0, 1) and (n - 2, n - 1)
    inside one tile each (with the order of _border_first)."""
    return 1 if n == 1 else 4 if n == 3 else 2


def backward_config(C: int, spatial_dims: tuple[int, int] | None) -> dict:
    """Tile shape [TW, TH] rows x BC channels, about 2048 elements (at least one row): pixel tiles grown from the
    smallest valid ones for the spatial case (never past the image), else TH consecutive rows (TW = 1)."""
    BC = triton.next_power_of_2(C)
    rows = max(1, min(32, 2048 // BC))
    if spatial_dims is not None:
        W, H = spatial_dims
        TW, TH = axis_tile(W), axis_tile(H)
        while TW * TH < rows and (TW < triton.next_power_of_2(W) or TH < triton.next_power_of_2(H)):
            if TH < triton.next_power_of_2(H) and (TH <= TW or TW >= triton.next_power_of_2(W)):
                TH *= 2
            else:
                TW *= 2
    else:
        TW, TH = 1, rows
    # Each thread also holds BC / threads entries of the five parameter-gradient sums across tiles. sm_90 builds
    # (ptxas -v of an sm_90 bf16 build): 8 warps keep [2, 2, 1024] and [1, 2, 1024] tiles free of spills
    # (255 and 173 registers), where 16 warps (128 registers each) spill; [2, 2, 2048] spills with either.
    elements = TW * TH * BC
    return dict(TW=TW, TH=TH, BC=BC, num_warps=16 if elements > 4096 else max(4, min(8, elements // 256)))


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _alpha_args(alpha, like):
    """(pointer, stride, HAS_ALPHA): a scalar alpha is read with stride 0."""
    if alpha is None:
        return like, 0, False
    return alpha.reshape(-1).contiguous(), (0 if alpha.numel() == 1 else 1), True


def _spatial_dims(a, spatial_shift):
    return (a.shape[1], a.shape[2]) if spatial_shift else (1, 1)


def wide_config(C: int, backward: bool) -> dict:
    """The wide path's BM rows x BC-channel chunks (fewer in the backward, which holds more tensors per chunk)."""
    BC = min(512 if backward else 1024, triton.next_power_of_2(C))
    return dict(BM=4, BC=BC, num_warps=4)


def forward(a, b, ln1_weight, ln1_bias, ln2_weight, ln2_bias, alpha, eps, spatial_shift, **config):
    """config: an explicit launch (BM, BC, num_warps) for tests; by default forward_config(C), or wide_config(C)
    for C > MAX_C (where BC is a chunk of the row)."""
    C = a.shape[-1]
    a2, b2 = _rows(a, C), _rows(b, C)
    M = a2.shape[0]
    W, H = _spatial_dims(a, spatial_shift)
    wide = C > MAX_C
    config = config or (wide_config(C, backward=False) if wide else forward_config(C))
    y = torch.empty((M, C), device=a.device, dtype=a.dtype)
    alpha_ptr, alpha_stride, has_alpha = _alpha_args(alpha, a2)
    params = [t.contiguous() for t in (ln1_weight, ln1_bias, ln2_weight, ln2_bias)]
    kernel = _poly_gate_wide_fwd_kernel if wide else _poly_gate_fwd_kernel
    kernel[(triton.cdiv(M, config["BM"]),)](
        a2, b2, *params, alpha_ptr, y, M, C, W, H, *shift_groups(C), a2.stride(0), b2.stride(0), y.stride(0),
        alpha_stride, eps, SPATIAL=spatial_shift, HAS_ALPHA=has_alpha, ACC=_acc(a.dtype), **config)
    return y.view(a.shape)


def backward_programs(n_tiles: int, device: torch.device) -> int:
    """Programs of the persistent backward: a few per SM on a GPU (each writes one row of partial sums)."""
    if device.type == "cuda":
        return max(1, min(n_tiles, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(n_tiles, 4))


def tile_counts(M, C, spatial_dims, config):
    """(n_tiles, tiles_w, tiles_h) of the backward's tiling."""
    if spatial_dims is None:
        return triton.cdiv(M, config["TH"]), 1, 1
    W, H = spatial_dims
    tiles_w, tiles_h = triton.cdiv(W, config["TW"]), triton.cdiv(H, config["TH"])
    return (M // (W * H)) * tiles_w * tiles_h, tiles_w, tiles_h


def backward(grad_y, a, b, ln1_weight, ln1_bias, ln2_weight, ln2_bias, alpha, eps, spatial_shift, needs,
             programs=None, **config):
    """config: an explicit tiling (TW, TH, BC, num_warps) and `programs` for tests; by default backward_config
    (C > MAX_C: wide_config, or an explicit BM, BC, num_warps)."""
    C = a.shape[-1]
    a2, b2, g2 = _rows(a, C), _rows(b, C), _rows(grad_y, C)
    M = a2.shape[0]
    W, H = _spatial_dims(a, spatial_shift)
    if C > MAX_C:
        return _wide_backward(a, b, a2, b2, g2, ln1_weight, ln1_bias, ln2_weight, ln2_bias, alpha, eps,
                              spatial_shift, needs, programs, config or wide_config(C, backward=True))
    spatial_dims = (W, H) if spatial_shift else None
    config = config or backward_config(C, spatial_dims)
    n_tiles, tiles_w, tiles_h = tile_counts(M, C, spatial_dims, config)
    programs = programs or backward_programs(n_tiles, a.device)
    da = torch.empty((M, C), device=a.device, dtype=a.dtype)
    db = torch.empty((M, C), device=a.device, dtype=b.dtype)
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    part = torch.empty((PARAM_GRADS, programs, C), device=a.device, dtype=acc)
    alpha_ptr, alpha_stride, has_alpha = _alpha_args(alpha, a2)
    params = [t.contiguous() for t in (ln1_weight, ln1_bias, ln2_weight, ln2_bias)]
    _poly_gate_bwd_kernel[(programs,)](
        a2, b2, g2, *params, alpha_ptr, da, db, part, M, C, W, H, *shift_groups(C), n_tiles, tiles_w, tiles_h,
        a2.stride(0), b2.stride(0), g2.stride(0), da.stride(0), db.stride(0), alpha_stride, eps,
        SPATIAL=spatial_shift, HAS_ALPHA=has_alpha, ACC=_acc(a.dtype), **config)
    dtypes = [t.dtype for t in (ln1_weight, ln1_bias, ln2_weight, ln2_bias)] + [None if alpha is None else alpha.dtype]
    param_grads = reduce_param_grads(part, alpha, needs[2:], dtypes)
    return (da.view(a.shape) if needs[0] else None, db.view(b.shape) if needs[1] else None, *param_grads)


def _wide_backward(a, b, a2, b2, g2, ln1_weight, ln1_bias, ln2_weight, ln2_bias, alpha, eps, spatial_shift, needs,
                   programs, config):
    M, C = a2.shape
    W, H = _spatial_dims(a, spatial_shift)
    n_tiles = triton.cdiv(M, config["BM"])
    programs = programs or backward_programs(n_tiles, a.device)
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    # With the shift the kernel writes the gradient of the shifted input, in float32, mapped back below.
    da = torch.empty((M, C), device=a.device, dtype=acc if spatial_shift else a.dtype)
    db = torch.empty((M, C), device=a.device, dtype=b.dtype)
    part = torch.zeros((PARAM_GRADS, programs, C), device=a.device, dtype=acc)
    alpha_ptr, alpha_stride, has_alpha = _alpha_args(alpha, a2)
    params = [t.contiguous() for t in (ln1_weight, ln1_bias, ln2_weight, ln2_bias)]
    _poly_gate_wide_bwd_kernel[(programs,)](
        a2, b2, g2, *params, alpha_ptr, da, db, part, M, C, W, H, *shift_groups(C), n_tiles, a2.stride(0),
        b2.stride(0), g2.stride(0), da.stride(0), db.stride(0), alpha_stride, eps, SPATIAL=spatial_shift,
        HAS_ALPHA=has_alpha, ACC=_acc(a.dtype), **config)
    if spatial_shift:
        da = spatial_shift_adjoint(da.view(a.shape)).to(a.dtype)
    dtypes = [t.dtype for t in (ln1_weight, ln1_bias, ln2_weight, ln2_bias)] + [None if alpha is None else alpha.dtype]
    param_grads = reduce_param_grads(part, alpha, needs[2:], dtypes)
    return (da.view(a.shape) if needs[0] else None, db.view(b.shape) if needs[1] else None, *param_grads)
