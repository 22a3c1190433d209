"""Triton kernels for poly_chain.

Forward: one program owns a [BM, BK] tile of y. For n = 1..N it computes z_n = x W_n^T (+ b_n) over d with
tl.dot, applies the activation and multiplies the factor into the running product, so the N intermediate
[M, k] tensors never leave registers.

Backward: y_N = prod_n f_n with f_1 = u_1 and f_n = 1 + u_n (ccp) or u_n (product), so
dL/du_n = dy * prod_{m != n} f_m. That leave-one-out product is prefix * suffix (exact when a factor is 0, no
division): pass 1 walks n forward and parks the prefix products in an fp32 workspace; pass 2 walks n backward,
recomputes z_n, multiplies prefix by the running suffix and writes grad_z = dL/dz_n. Two GEMMs on grad_z give
dx and dweight (common.grads_from_grad_z).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._library import triton_autotune
from .common import ACTIVATIONS, grads_from_grad_z

_ACT_CODE = {name: code for code, name in enumerate(ACTIVATIONS)}
_MODE_CCP, _MODE_PRODUCT = 0, 1

# The first entry is the default when autotuning is off; the rest are shapes that suit H100 wgmma tiles.
_CONFIGS = [
    triton.Config({"BM": bm, "BK": bk, "BD": bd}, num_warps=w, num_stages=s)
    for bm, bk, bd, w, s in [
        (128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4), (128, 64, 32, 4, 4), (64, 32, 64, 4, 4), (32, 32, 32, 2, 4),
    ]
]


@triton.jit
def _activation(z, ACT: tl.constexpr):
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        z = 2.0 * tl.sigmoid(2.0 * z) - 1.0  # tanh
    elif ACT == 3:
        z = tl.sigmoid(z)
    elif ACT == 4:
        z = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    return z


@triton.jit
def _activation_grad(z, ACT: tl.constexpr):
    if ACT == 0:
        g = tl.full(z.shape, 1.0, z.dtype)
    elif ACT == 1:
        g = tl.where(z > 0.0, 1.0, 0.0).to(z.dtype)
    elif ACT == 2:
        t = 2.0 * tl.sigmoid(2.0 * z) - 1.0
        g = 1.0 - t * t
    elif ACT == 3:
        s = tl.sigmoid(z)
        g = s * (1.0 - s)
    else:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        g = cdf + z * pdf
    return g


@triton.jit
def _projection(x_ptr, w_ptr, b_ptr, n, o_m, o_k, M, D, K, stride_xm,
                HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr,
                BK: tl.constexpr, BD: tl.constexpr):
    """z_n for the [BM, BK] tile: x[o_m, :] @ W[n, o_k, :]^T (+ b[n, o_k]), accumulated in ACC."""
    acc = tl.zeros((BM, BK), dtype=ACC)
    m_m = o_m < M
    m_k = o_k < K
    # Row n*K + o_k of the [N*K, D] weight; int64 before multiplying by D.
    p_w = w_ptr + (n * K + o_k)[None, :].to(tl.int64) * D
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < D
        b_x = tl.load(x_ptr + o_m[:, None] * stride_xm + o_d[None, :], mask=m_m[:, None] & m_d[None, :], other=0.0)
        b_w = tl.load(p_w + o_d[:, None], mask=m_k[None, :] & m_d[:, None], other=0.0)
        if IEEE:
            acc += tl.dot(b_x, b_w, input_precision="ieee", out_dtype=ACC)
        else:
            acc += tl.dot(b_x, b_w, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n * K + o_k, mask=m_k, other=0.0).to(ACC)[None, :]
    return acc


@triton.jit
def _factor(u, n, MODE: tl.constexpr):
    """f_1 = u_1; f_n = 1 + u_n (ccp) or u_n (product)."""
    if MODE == 0:
        u = u + tl.where(n > 0, 1.0, 0.0)
    return u


@triton_autotune(_CONFIGS, key=["D", "K", "N", "HAS_BIAS", "MODE", "ACT"])
@triton.jit
def _poly_chain_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, D, K, N, scale, stride_xm, stride_ym,
                           HAS_BIAS: tl.constexpr, MODE: tl.constexpr, ACT: tl.constexpr, IEEE: tl.constexpr,
                           ACC: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    i_m, i_k = tl.program_id(0), tl.program_id(1)
    o_m = i_m.to(tl.int64) * BM + tl.arange(0, BM)
    o_k = i_k * BK + tl.arange(0, BK)
    y = tl.full((BM, BK), 1.0, ACC)
    for n in range(N):
        z = _projection(x_ptr, w_ptr, b_ptr, n, o_m, o_k, M, D, K, stride_xm, HAS_BIAS, IEEE, ACC, BM, BK, BD)
        y *= _factor(scale * _activation(z, ACT), n, MODE)
    mask = (o_m < M)[:, None] & (o_k < K)[None, :]
    tl.store(y_ptr + o_m[:, None] * stride_ym + o_k[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton_autotune(_CONFIGS, key=["D", "K", "N", "HAS_BIAS", "MODE", "ACT"])
@triton.jit
def _poly_chain_bwd_kernel(x_ptr, w_ptr, b_ptr, gy_ptr, gz_ptr, prefix_ptr, M, D, K, N, scale, stride_xm, stride_gym,
                           HAS_BIAS: tl.constexpr, MODE: tl.constexpr, ACT: tl.constexpr, IEEE: tl.constexpr,
                           ACC: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    """grad_z [M, N, k] = dy * (prod_{m<n} f_m) * (prod_{m>n} f_m) * scale * act'(z_n)."""
    i_m, i_k = tl.program_id(0), tl.program_id(1)
    o_m = i_m.to(tl.int64) * BM + tl.arange(0, BM)
    o_k = i_k * BK + tl.arange(0, BK)
    mask = (o_m < M)[:, None] & (o_k < K)[None, :]
    # [M, N, k] offsets of this tile for degree 0; degree n adds n * K.
    o_mnk = o_m[:, None] * N * K + o_k[None, :]

    prefix = tl.full((BM, BK), 1.0, ACC)
    for n in range(N):
        tl.store(prefix_ptr + o_mnk + n * K, prefix, mask=mask)
        z = _projection(x_ptr, w_ptr, b_ptr, n, o_m, o_k, M, D, K, stride_xm, HAS_BIAS, IEEE, ACC, BM, BK, BD)
        prefix *= _factor(scale * _activation(z, ACT), n, MODE)

    dy = tl.load(gy_ptr + o_m[:, None] * stride_gym + o_k[None, :], mask=mask, other=0.0).to(ACC)
    suffix = tl.full((BM, BK), 1.0, ACC)
    for i in range(N):
        n = N - 1 - i
        z = _projection(x_ptr, w_ptr, b_ptr, n, o_m, o_k, M, D, K, stride_xm, HAS_BIAS, IEEE, ACC, BM, BK, BD)
        before = tl.load(prefix_ptr + o_mnk + n * K, mask=mask, other=0.0)
        dz = dy * before * suffix * scale * _activation_grad(z, ACT)
        tl.store(gz_ptr + o_mnk + n * K, dz.to(gz_ptr.dtype.element_ty), mask=mask)
        suffix *= _factor(scale * _activation(z, ACT), n, MODE)


def _launch_args(x, weight, bias, mode, activation):
    """Shared launch settings: 2D views, constexpr flags and the grid."""
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    N, K, D = weight.shape
    M = x2d.shape[0]
    flags = dict(
        HAS_BIAS=bias is not None,
        MODE=_MODE_CCP if mode == "ccp" else _MODE_PRODUCT,
        ACT=_ACT_CODE[activation],
        # fp32 inputs honour torch's TF32 switch; fp64 (interpreter) accumulates in fp64.
        IEEE=x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32,
        ACC=tl.float64 if x.dtype == torch.float64 else tl.float32,
    )
    grid = lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(K, meta["BK"]))  # noqa: E731
    return x2d, weight, bias, (M, D, K, N), flags, grid


def forward(x, weight, bias, mode, activation, scale):
    x2d, weight, bias, (M, D, K, N), flags, grid = _launch_args(x, weight, bias, mode, activation)
    y = torch.empty((M, K), device=x.device, dtype=x.dtype)
    _poly_chain_fwd_kernel[grid](x2d, weight, bias if bias is not None else x2d, y, M, D, K, N, scale,
                                 x2d.stride(0), y.stride(0), **flags)
    return y.view(*x.shape[:-1], K)


def backward(grad_y, x, weight, bias, mode, activation, scale, needs):
    x2d, weight, bias, (M, D, K, N), flags, grid = _launch_args(x, weight, bias, mode, activation)
    gy = grad_y.reshape(M, K).contiguous()
    grad_z = torch.empty((M, N, K), device=x.device, dtype=x.dtype)
    prefix = torch.empty((M, N, K), device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    _poly_chain_bwd_kernel[grid](x2d, weight, bias if bias is not None else x2d, gy, grad_z, prefix, M, D, K, N, scale,
                                 x2d.stride(0), gy.stride(0), **flags)
    dx, dw, db = grads_from_grad_z(grad_z, x2d, weight, bias is not None, needs)
    return (dx.view(x.shape) if dx is not None else None), dw, db
