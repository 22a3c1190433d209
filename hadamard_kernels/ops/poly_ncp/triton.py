"""Triton kernels for poly_ncp.

Forward: one program owns BM rows and all k columns (k padded to KP, a power of 2). It keeps y_n in registers
down the chain: s_n = y_{n-1} S_n^T (+ s_n) is a [BM, KP] x [KP, KP] tl.dot, a_n = x A_n^T (+ a_n) a tl.dot
over chunks of d, and y_n = a_n * s_n; only y_N is written. The k x k weight must fit one dot operand in shared
memory, hence MAX_K (larger k takes the wide path below).

Precision: products and accumulation in fp32; y (and in the backward dL/ds) is cast to the input dtype for the
k x k dot, as tensor cores need, i.e. rounded once per degree (~2^-9 relative for bf16, inside its 1e-2).
fp32 inputs use exact fp32 dots unless torch's TF32 switch is on.

Backward (only the inputs are saved): one program per row tile recomputes the chain, parking y_1..y_{N-1} in a
workspace ys [N-1, M, k] (input dtype), then walks n = N..2 with g = dL/dy_n:
    grad_a_n = g * s_n,  grad_s_n = g * a_n,  g <- grad_s_n @ S_n,  and finally grad_a_1 = g,
recomputing a_n and s_n from x and ys (the last degree's are still in registers). GEMMs in torch turn
grad_a [M, N, k], grad_s [N-1, M, k] and ys into the weight and input gradients
(common.backward_in_row_chunks). Those three are the transient memory, (3N-2)·k elements per row; rows are
processed in chunks so it stays below common.WORKSPACE_BYTES (1 GiB), whatever M.

k > MAX_K (the wide path, any k): one launch per degree. A program owns a [BM, BN] tile of y_n and computes both
GEMMs of its columns with K-loops, a_n over d and s_n over k, reading y_{n-1} from an [M, k] buffer (input dtype:
the same rounding the fast path applies before the k x k dot); so the chain lives in device memory. The forward
alternates between the output and one [M, k] buffer (its only transient memory). The backward first reruns the
chain into ys, then walks n = N..1 with one launch per degree: g = dL/dy_n is grad_y, or grad_s_{n+1} S_{n+1}
(a third GEMM per tile, reading the grad_s slab the previous launch wrote), and the tile writes grad_a_n = g * s_n,
grad_s_n = g * a_n. It writes exactly the fast path's grad_a, grad_s and ys, so the transient memory and the GEMMs
in torch are the same.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._library import triton_autotune
from .._triton_lib import stacked_projection
from .common import backward_in_row_chunks

# Largest k of the fast path (larger k takes the wide path): the [KP, KP] tile of S_n is one dot operand, staged
# whole in shared memory next to the pipelined x / A_n chunks. On an H100 (227 KiB per block) KP = 256 needed
# 288 KiB (fp32: the tile alone is 256 KiB) and 400 KiB (bf16, d % 16 == 0, BM=32 BD=64 3 stages); KP = 128 was
# verified there in fp32, fp16 and bf16.
MAX_K = 128

_CONFIGS = [
    triton.Config({"BM": bm, "BD": bd}, num_warps=w, num_stages=s)
    for bm, bd, w, s in [(32, 64, 4, 2), (16, 64, 4, 3), (64, 32, 4, 2), (64, 64, 8, 2)]
]
_KEY = ["D", "KP", "N", "HAS_A_BIAS", "HAS_S_BIAS", "IEEE"]

# The wide path: [BM, BN] tiles of one degree, contraction chunks of BK. The backward keeps two fp32 accumulators
# live (g and s, then g and a), hence its smaller tiles.
_WIDE_FWD_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4),
                             (32, 32, 32, 4, 2)]
]
_WIDE_BWD_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [(64, 128, 32, 8, 3), (128, 64, 32, 8, 3), (64, 64, 32, 4, 3), (32, 32, 32, 4, 2)]
]
_WIDE_KEY = ["D", "K", "HAS_PREV", "HAS_A_BIAS", "HAS_S_BIAS", "IEEE"]


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, ACC: tl.constexpr):
    if IEEE:
        out = tl.dot(a, b, input_precision="ieee", out_dtype=ACC)
    else:
        out = tl.dot(a, b, out_dtype=ACC)
    return out


@triton.jit
def _s_weight_tile(sw_ptr, i, o_k, K, TRANSPOSE: tl.constexpr):
    """S_{i+2} as a [KP, KP] tile (0 beyond K): S^T (rows = input features) when TRANSPOSE, else S."""
    m_k = o_k < K
    p_s = sw_ptr + i * K * K  # int32 is enough: K <= MAX_K
    if TRANSPOSE:
        p_s += o_k[None, :] * K + o_k[:, None]
    else:
        p_s += o_k[:, None] * K + o_k[None, :]
    return tl.load(p_s, mask=m_k[:, None] & m_k[None, :], other=0.0)


@triton.jit
def _s_projection(y, sw_ptr, sb_ptr, i, o_k, K, HAS_S_BIAS: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr):
    """s = y @ S_{i+2}^T (+ s_{i+2}) for a [BM, KP] tile y; y is cast to the weight dtype for the dot."""
    b_s = _s_weight_tile(sw_ptr, i, o_k, K, True)
    s = _dot(y.to(b_s.dtype), b_s, IEEE, ACC)
    if HAS_S_BIAS:
        s += tl.load(sb_ptr + i * K + o_k, mask=o_k < K, other=0.0).to(ACC)[None, :]
    return s


@triton.jit
def _slab_offsets(o_m, o_k, i, M, K):
    """Offsets of the tile in slab i of an [N-1, M, K] tensor: int64 through o_m; i * M stays in int32 because
    the backward's row chunks keep (N-1) * M * K elements within common.WORKSPACE_BYTES."""
    return (o_m[:, None] + i * M) * K + o_k[None, :]


@triton_autotune(_CONFIGS, key=_KEY)
@triton.jit
def _poly_ncp_fwd_kernel(x_ptr, aw_ptr, ab_ptr, sw_ptr, sb_ptr, y_ptr, M, D, K, N, stride_xm, stride_ym,
                         HAS_A_BIAS: tl.constexpr, HAS_S_BIAS: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr,
                         KP: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr):
    """y [M, K] = y_N for x [M, D]; a_weight [N, K, D], s_weight [N-1, K, K] contiguous."""
    i_m = tl.program_id(0)
    o_m = i_m.to(tl.int64) * BM + tl.arange(0, BM)
    o_k = tl.arange(0, KP)
    y = stacked_projection(x_ptr, aw_ptr, ab_ptr, 0, o_m, o_k, M, D, K, stride_xm, HAS_A_BIAS, IEEE, ACC,
                           BM, KP, BD, o_k < K)
    for n in range(1, N):
        # s first: y is dead after it, which keeps one [BM, KP] tile fewer live during the d loop.
        s = _s_projection(y, sw_ptr, sb_ptr, n - 1, o_k, K, HAS_S_BIAS, IEEE, ACC)
        y = s * stacked_projection(x_ptr, aw_ptr, ab_ptr, n, o_m, o_k, M, D, K, stride_xm, HAS_A_BIAS, IEEE, ACC,
                                   BM, KP, BD, o_k < K)
    mask = (o_m < M)[:, None] & (o_k < K)[None, :]
    tl.store(y_ptr + o_m[:, None] * stride_ym + o_k[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton_autotune(_CONFIGS, key=_KEY)
@triton.jit
def _poly_ncp_bwd_kernel(x_ptr, aw_ptr, ab_ptr, sw_ptr, sb_ptr, gy_ptr, ga_ptr, gs_ptr, ys_ptr, M, D, K, N,
                         stride_xm, stride_gym,
                         HAS_A_BIAS: tl.constexpr, HAS_S_BIAS: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr,
                         KP: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr):
    """grad_a [M, N, K] = dL/d(A_n x + a_n), grad_s [N-1, M, K] = dL/d(S_n y_{n-1} + s_n),
    ys [N-1, M, K] = y_1..y_{N-1}."""
    i_m = tl.program_id(0)
    o_m = i_m.to(tl.int64) * BM + tl.arange(0, BM)
    o_k = tl.arange(0, KP)
    mask = (o_m < M)[:, None] & (o_k < K)[None, :]
    o_mnk = o_m[:, None] * N * K + o_k[None, :]  # the tile in grad_a's degree-0 slab

    # Pass 1: the forward chain, parking y_1..y_{N-1}. a and s end as a_N and s_N.
    a = stacked_projection(x_ptr, aw_ptr, ab_ptr, 0, o_m, o_k, M, D, K, stride_xm, HAS_A_BIAS, IEEE, ACC,
                           BM, KP, BD, o_k < K)
    y = a
    s = tl.zeros((BM, KP), dtype=ACC)
    for n in range(1, N):
        tl.store(ys_ptr + _slab_offsets(o_m, o_k, n - 1, M, K), y.to(ys_ptr.dtype.element_ty), mask=mask)
        s = _s_projection(y, sw_ptr, sb_ptr, n - 1, o_k, K, HAS_S_BIAS, IEEE, ACC)
        a = stacked_projection(x_ptr, aw_ptr, ab_ptr, n, o_m, o_k, M, D, K, stride_xm, HAS_A_BIAS, IEEE, ACC,
                               BM, KP, BD, o_k < K)
        y = a * s

    # Pass 2: g = dL/dy_n for n = N..2 (0-based n = N-1..1).
    g = tl.load(gy_ptr + o_m[:, None] * stride_gym + o_k[None, :], mask=mask, other=0.0).to(ACC)
    for i in range(1, N):
        n = N - i
        if i > 1:
            # Recompute from the parked y_{n-1}: the same rounded values pass 1 fed to the dot.
            y_prev = tl.load(ys_ptr + _slab_offsets(o_m, o_k, n - 1, M, K), mask=mask, other=0.0)
            s = _s_projection(y_prev, sw_ptr, sb_ptr, n - 1, o_k, K, HAS_S_BIAS, IEEE, ACC)
            a = stacked_projection(x_ptr, aw_ptr, ab_ptr, n, o_m, o_k, M, D, K, stride_xm, HAS_A_BIAS, IEEE, ACC,
                                   BM, KP, BD, o_k < K)
        tl.store(ga_ptr + o_mnk + n * K, (g * s).to(ga_ptr.dtype.element_ty), mask=mask)
        g_s = (g * a).to(gs_ptr.dtype.element_ty)
        tl.store(gs_ptr + _slab_offsets(o_m, o_k, n - 1, M, K), g_s, mask=mask)
        g = _dot(g_s, _s_weight_tile(sw_ptr, n - 1, o_k, K, False), IEEE, ACC)
    tl.store(ga_ptr + o_mnk, g.to(ga_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _times_matrix(a_ptr, stride_am, w_ptr, o_m, o_j, M, K, IEEE: tl.constexpr, ACC: tl.constexpr,
                  BM: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr):
    """[BM, BJ] tile (rows o_m, columns o_j) of A W for A [M, K] (rows stride_am apart) and W [K, K] row-major."""
    acc = tl.zeros((BM, BJ), dtype=ACC)
    m_m = o_m < M
    m_j = o_j < K
    for l0 in range(0, K, BK):
        o_l = l0 + tl.arange(0, BK)
        m_l = o_l < K
        b_a = tl.load(a_ptr + o_m[:, None] * stride_am + o_l[None, :], mask=m_m[:, None] & m_l[None, :], other=0.0)
        b_w = tl.load(w_ptr + o_l[:, None].to(tl.int64) * K + o_j[None, :], mask=m_l[:, None] & m_j[None, :],
                      other=0.0)
        acc += _dot(b_a, b_w, IEEE, ACC)
    return acc


@triton.jit
def _wide_tile(M, K, BM: tl.constexpr, BN: tl.constexpr):
    """Rows and columns of this program's tile: the column tiles of a row block are neighbours in the grid, so
    they share its x and y_{n-1} rows in L2."""
    col_tiles = tl.cdiv(K, BN)
    pid = tl.program_id(0)
    o_m = (pid // col_tiles).to(tl.int64) * BM + tl.arange(0, BM)
    o_j = (pid % col_tiles) * BN + tl.arange(0, BN)
    return o_m, o_j, (o_m < M)[:, None] & (o_j < K)[None, :]


@triton_autotune(_WIDE_FWD_CONFIGS, key=_WIDE_KEY)
@triton.jit
def _poly_ncp_wide_fwd_kernel(x_ptr, aw_ptr, ab_ptr, sw_ptr, sb_ptr, prev_ptr, y_ptr, M, D, K, stride_xm,
                              stride_pm, stride_ym, HAS_PREV: tl.constexpr, HAS_A_BIAS: tl.constexpr,
                              HAS_S_BIAS: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr,
                              BN: tl.constexpr, BK: tl.constexpr):
    """One degree: y [M, K] = (x A^T + a) * (prev S^T + s) with prev = y_{n-1} [M, K] (HAS_PREV), else x A^T + a.
    A [K, D], a [K], S [K, K], s [K] are this degree's weights (contiguous)."""
    o_m, o_j, mask = _wide_tile(M, K, BM, BN)
    m_j = o_j < K
    y = stacked_projection(x_ptr, aw_ptr, ab_ptr, 0, o_m, o_j, M, D, K, stride_xm, HAS_A_BIAS, IEEE, ACC, BM, BN, BK,
                           m_j)
    if HAS_PREV:
        y *= stacked_projection(prev_ptr, sw_ptr, sb_ptr, 0, o_m, o_j, M, K, K, stride_pm, HAS_S_BIAS, IEEE, ACC,
                                BM, BN, BK, m_j)
    tl.store(y_ptr + o_m[:, None] * stride_ym + o_j[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton_autotune(_WIDE_BWD_CONFIGS, key=["G_FROM_Y", *_WIDE_KEY])
@triton.jit
def _poly_ncp_wide_bwd_kernel(x_ptr, aw_ptr, ab_ptr, sw_ptr, sb_ptr, prev_ptr, g_ptr, gw_ptr, ga_ptr, gs_ptr,
                              M, D, K, stride_xm, stride_pm, stride_gm, stride_gam, stride_gsm,
                              G_FROM_Y: tl.constexpr, HAS_PREV: tl.constexpr, HAS_A_BIAS: tl.constexpr,
                              HAS_S_BIAS: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr,
                              BN: tl.constexpr, BK: tl.constexpr):
    """One degree of the backward walk. g = dL/dy_n is g_ptr [M, K] itself (G_FROM_Y: grad_y) or g_ptr @ gw
    (grad_s_{n+1} S_{n+1}, gw [K, K]). With HAS_PREV (n > 1), s = prev S^T + s and a = x A^T + a as in the
    forward, and the tile writes ga = g * s and gs = g * a; else (n = 1) ga = g."""
    o_m, o_j, mask = _wide_tile(M, K, BM, BN)
    m_j = o_j < K
    if G_FROM_Y:
        g = tl.load(g_ptr + o_m[:, None] * stride_gm + o_j[None, :], mask=mask, other=0.0).to(ACC)
    else:
        g = _times_matrix(g_ptr, stride_gm, gw_ptr, o_m, o_j, M, K, IEEE, ACC, BM, BN, BK)
    if HAS_PREV:
        s = stacked_projection(prev_ptr, sw_ptr, sb_ptr, 0, o_m, o_j, M, K, K, stride_pm, HAS_S_BIAS, IEEE, ACC,
                               BM, BN, BK, m_j)
        tl.store(ga_ptr + o_m[:, None] * stride_gam + o_j[None, :], (g * s).to(ga_ptr.dtype.element_ty), mask=mask)
        a = stacked_projection(x_ptr, aw_ptr, ab_ptr, 0, o_m, o_j, M, D, K, stride_xm, HAS_A_BIAS, IEEE, ACC, BM, BN,
                               BK, m_j)
        tl.store(gs_ptr + o_m[:, None] * stride_gsm + o_j[None, :], (g * a).to(gs_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ga_ptr + o_m[:, None] * stride_gam + o_j[None, :], g.to(ga_ptr.dtype.element_ty), mask=mask)


def _launch_args(x, a_weight, a_bias, s_weight, s_bias):
    """Contiguous operands (a dummy pointer stands in for an absent or empty tensor) and constexpr flags."""
    N, K, D = a_weight.shape
    a_weight = a_weight.contiguous()
    operands = (a_weight, a_bias.contiguous() if a_bias is not None else a_weight,
                s_weight.contiguous() if N > 1 else a_weight,
                s_bias.contiguous() if (s_bias is not None and N > 1) else a_weight)
    flags = dict(
        HAS_A_BIAS=a_bias is not None,
        HAS_S_BIAS=s_bias is not None,
        # fp32 inputs honour torch's TF32 switch; fp64 (interpreter) accumulates in fp64.
        IEEE=x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32,
        ACC=tl.float64 if x.dtype == torch.float64 else tl.float32,
        KP=max(16, triton.next_power_of_2(K)),  # tl.dot needs every dim >= 16
    )
    return operands, (D, K, N), flags


def _grid(M):
    return lambda meta: (triton.cdiv(M, meta["BM"]),)


def _wide_grid(M, K):
    return lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(K, meta["BN"]),)


def _degree(operands, flags, n):
    """Degree n's (0-based) weight operands as contiguous views (S_n and s_n are those of n >= 1) and its flags;
    the wide kernels index one degree's weights from 0."""
    aw, ab, sw, sb = operands
    has_ab, has_sb = flags["HAS_A_BIAS"], flags["HAS_S_BIAS"] and n > 0
    weights = (aw[n], ab[n] if has_ab else aw, sw[n - 1] if n > 0 else aw, sb[n - 1] if has_sb else aw)
    return weights, dict(HAS_A_BIAS=has_ab, HAS_S_BIAS=has_sb, IEEE=flags["IEEE"], ACC=flags["ACC"])


def _wide_chain(x2d, operands, D, K, flags, outputs):
    """The forward chain on the wide path: y_n (0-based n) into outputs[n], an [M, K] tensor with unit column
    stride; the last output holds y_N when len(outputs) = N."""
    M = x2d.shape[0]
    for n, y in enumerate(outputs):
        prev = outputs[n - 1] if n > 0 else y  # not read for n = 0
        weights, degree_flags = _degree(operands, flags, n)
        _poly_ncp_wide_fwd_kernel[_wide_grid(M, K)](x2d, *weights, prev, y, M, D, K, x2d.stride(0), prev.stride(0),
                                                    y.stride(0), HAS_PREV=n > 0, **degree_flags)


def _wide_chain_grads(x2d, gy, operands, D, K, N, flags, grad_a, grad_s, ys):
    """The wide path's backward: ys from _wide_chain, then one launch per degree n = N..1 (see the docstring)."""
    M = x2d.shape[0]
    _wide_chain(x2d, operands, D, K, flags, list(ys))
    sw = operands[2]
    for n in range(N - 1, -1, -1):
        # g: grad_y for the last degree, else grad_s of degree n + 1 (slab n) times its S (s_weight[n]).
        g, gw = (gy, gy) if n == N - 1 else (grad_s[n], sw[n])
        prev = ys[n - 1] if n > 0 else g
        gs = grad_s[n - 1] if n > 0 else g  # not written for n = 0
        ga = grad_a[:, n]
        weights, degree_flags = _degree(operands, flags, n)
        _poly_ncp_wide_bwd_kernel[_wide_grid(M, K)](
            x2d, *weights, prev, g, gw, ga, gs, M, D, K, x2d.stride(0), prev.stride(0), g.stride(0), ga.stride(0),
            gs.stride(0), G_FROM_Y=n == N - 1, HAS_PREV=n > 0, **degree_flags)


def forward(x, a_weight, a_bias, s_weight, s_bias):
    operands, (D, K, N), flags = _launch_args(x, a_weight, a_bias, s_weight, s_bias)
    x2d = x.reshape(-1, D).contiguous()
    M = x2d.shape[0]
    y = torch.empty((M, K), device=x.device, dtype=x.dtype)
    if K <= MAX_K:
        _poly_ncp_fwd_kernel[_grid(M)](x2d, *operands, y, M, D, K, N, x2d.stride(0), y.stride(0), **flags)
    else:
        # y and one buffer alternate so that y_N lands in y.
        other = torch.empty_like(y) if N > 1 else y
        _wide_chain(x2d, operands, D, K, flags, [y if (N - 1 - n) % 2 == 0 else other for n in range(N)])
    return y.view(*x.shape[:-1], K)


def backward(grad_y, x, a_weight, a_bias, s_weight, s_bias, needs):
    operands, (D, K, N), flags = _launch_args(x, a_weight, a_bias, s_weight, s_bias)

    def chain_grads(x2d, gy):
        M = x2d.shape[0]
        grad_a = x2d.new_empty((M, N, K))
        grad_s, ys = x2d.new_empty((N - 1, M, K)), x2d.new_empty((N - 1, M, K))
        if K <= MAX_K:
            _poly_ncp_bwd_kernel[_grid(M)](x2d, *operands, gy, grad_a, grad_s, ys, M, D, K, N, x2d.stride(0),
                                           gy.stride(0), **flags)
        else:
            _wide_chain_grads(x2d, gy, operands, D, K, N, flags, grad_a, grad_s, ys)
        return grad_a, grad_s, ys

    return backward_in_row_chunks(chain_grads, grad_y, x, a_weight, a_bias, s_weight, s_bias, needs)
