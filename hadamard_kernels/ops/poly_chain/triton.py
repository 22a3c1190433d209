"""Triton kernels for poly_chain.

Forward: one program owns a tile of y and computes z_n = x W_n^T (+ b_n) over d with tl.dot, applies the
activation and multiplies the factors, so the N intermediate [M, k] tensors never leave registers. Two tile
paths, both autotune candidates: the degree loop (one dot per degree into a [BM, BC] tile) and the grouped path
(all degrees side by side in one [BM, BC] dot, product over the degree axis; for small k). With save_projections
(the STORE_Z constexpr) it also stores z [M, N, k], which the backward then reads instead of recomputing it.

Backward: y_N = prod_n f_n with f_1 = u_1 and f_n = 1 + u_n (ccp) or u_n (product), so
dL/dz_n = dy * prod_{m != n} f_m * scale * act'(z_n). The flow is common.backward (shared with the CUDA backend):
one GEMM recomputes all projections, z = x @ W.view(N*k, d)^T + b laid out [M, N, k] (transient), then one
elementwise kernel (here) holds the N factors of a block of (row, column) pairs in registers and forms the
leave-one-out products as exclusive prefix * exclusive suffix scans (exact when a factor is 0, no division), writing
grad_z [M, N, k] over z. Two GEMMs on grad_z give dx and dweight (ops/_projections.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._library import triton_autotune
from .._triton_lib import activation, activation_grad, stacked_projection
from . import common
from .common import ACTIVATIONS

_ACT_CODE = {name: code for code, name in enumerate(ACTIVATIONS)}
_MODE_CCP, _MODE_PRODUCT = 0, 1

# Program order of the forward: GROUP_M row tiles at a time, each across all column tiles, so the programs that run
# together share x rows (and the weight tiles) in L2; row tiles outermost would re-read all of x from memory once
# per column tile when x is larger than L2 (M 65536 x d 1024 bf16 is 128 MiB). 8 as in Triton's matmul tutorial.
_GROUP_M = 8

# Forward tile configs. BC is the number of columns a program's dot produces. Degree-loop configs (GROUPED=False):
# BC output columns, one dot per degree n. Grouped configs (GROUPED=True): the N degrees side by side, BC/NP output
# columns of each (NP = next power of 2 of N), so x is read once per d-chunk for all N projections and small k
# still gives full-width dots; degrees past N are padding. The first config is the default when autotuning is off.
_LOOP_CONFIGS = [
    triton.Config({"BM": bm, "BC": bc, "BD": bd, "GROUPED": False, "GROUP_M": _GROUP_M}, num_warps=w, num_stages=s)
    for bm, bc, bd, w, s in [
        (128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4), (128, 64, 32, 4, 4), (64, 32, 64, 4, 4), (32, 32, 32, 2, 4),
    ]
]
_GROUPED_CONFIGS = [
    triton.Config({"BM": bm, "BC": bc, "BD": bd, "GROUPED": True, "GROUP_M": _GROUP_M}, num_warps=w, num_stages=s)
    for bm, bc, bd, w, s in [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (64, 256, 64, 8, 3)]
]
_MAX_GROUPED_NP = 16  # the grouped configs need BC // NP >= 1 output columns; 16 keeps >= 8
_FWD_KEY = ["D", "K", "N", "HAS_BIAS", "MODE", "ACT", "STORE_Z"]


@triton.jit
def _factor(u, n, MODE: tl.constexpr):
    """f_1 = u_1; f_n = 1 + u_n (ccp) or u_n (product)."""
    if MODE == 0:
        u = u + tl.where(n > 0, 1.0, 0.0)
    return u


@triton.jit
def _multiply(a, b):
    return a * b


@triton.jit
def _poly_chain_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, z_ptr, M, D, K, N, scale, stride_xm, stride_ym,
                           HAS_BIAS: tl.constexpr, MODE: tl.constexpr, ACT: tl.constexpr, IEEE: tl.constexpr,
                           ACC: tl.constexpr, STORE_Z: tl.constexpr, NP: tl.constexpr, BM: tl.constexpr,
                           BC: tl.constexpr, BD: tl.constexpr, GROUPED: tl.constexpr, GROUP_M: tl.constexpr):
    """y [M, K] = prod_n f_n(x W_n^T + b_n) for a [BM, BC] (degree loop) or [BM, BC // NP] (grouped) tile; with
    STORE_Z also z [M, N, K] = x W_n^T + b_n (for a backward without its recompute GEMM). A 1D grid of
    row tiles x column tiles, in groups of GROUP_M row tiles (the last group may have fewer)."""
    n_m, n_k = tl.cdiv(M, BM), tl.cdiv(K, BC // NP if GROUPED else BC)
    pid = tl.program_id(0)
    first_m = pid // (GROUP_M * n_k) * GROUP_M
    rows = tl.minimum(n_m - first_m, GROUP_M)
    i_m = first_m + pid % (GROUP_M * n_k) % rows
    i_k = pid % (GROUP_M * n_k) // rows
    o_m = i_m.to(tl.int64) * BM + tl.arange(0, BM)
    m_m = (o_m < M)[:, None]
    if GROUPED:
        # Column c of the dot is degree c // BK, output column i_k * BK + c % BK (BK = BC // NP).
        o_c = tl.arange(0, BC)
        c_n = o_c // (BC // NP)
        c_k = i_k * (BC // NP) + o_c % (BC // NP)
        m_c = (c_n < N) & (c_k < K)
        z = stacked_projection(x_ptr, w_ptr, b_ptr, 0, o_m, c_n * K + c_k, M, D, K, stride_xm, HAS_BIAS, IEEE, ACC,
                               BM, BC, BD, m_c)
        if STORE_Z:
            tl.store(z_ptr + o_m[:, None] * N * K + (c_n * K + c_k)[None, :], z.to(z_ptr.dtype.element_ty),
                     mask=m_m & m_c[None, :])
        f = tl.where(m_c[None, :], _factor(scale * activation(z, ACT), c_n[None, :], MODE), 1.0)
        y = tl.reduce(tl.reshape(f, (BM, NP, BC // NP)), 1, _multiply)
        o_k = i_k * (BC // NP) + tl.arange(0, BC // NP)
    else:
        o_k = i_k * BC + tl.arange(0, BC)
        y = tl.full((BM, BC), 1.0, ACC)
        for n in range(N):
            z = stacked_projection(x_ptr, w_ptr, b_ptr, n, o_m, o_k, M, D, K, stride_xm, HAS_BIAS, IEEE, ACC,
                                   BM, BC, BD, o_k < K)
            if STORE_Z:
                tl.store(z_ptr + o_m[:, None] * N * K + n * K + o_k[None, :], z.to(z_ptr.dtype.element_ty),
                         mask=m_m & (o_k < K)[None, :])
            y *= _factor(scale * activation(z, ACT), n, MODE)
    mask = (o_m < M)[:, None] & (o_k < K)[None, :]
    tl.store(y_ptr + o_m[:, None] * stride_ym + o_k[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


# Two autotuned entry points over the same kernel: the grouped configs only where N fits them.
_fwd_loop = triton_autotune(_LOOP_CONFIGS, key=_FWD_KEY)(_poly_chain_fwd_kernel)
_fwd_any = triton_autotune(_LOOP_CONFIGS + _GROUPED_CONFIGS, key=_FWD_KEY)(_poly_chain_fwd_kernel)


@triton.jit
def _chain_factor(z_ptr, p, o_n, mask, scale, MODE: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr):
    """Factor f_n at z offsets p, degree o_n; 1 where the degree is outside 0..N-1 (the identity of the scans)."""
    z = tl.load(z_ptr + p, mask=mask, other=0.0).to(ACC)
    f = _factor(scale * activation(z, ACT), o_n, MODE)
    return tl.where(mask, f, 1.0), z


@triton.jit
def _poly_chain_grad_z_kernel(z_ptr, gy_ptr, gz_ptr, R, K, N, scale, MODE: tl.constexpr, ACT: tl.constexpr,
                              ACC: tl.constexpr, NP: tl.constexpr, BR: tl.constexpr):
    """grad_z[m, n, j] = dy[m, j] * (prod_{i<n} f_i) * (prod_{i>n} f_i) * scale * act'(z[m, n, j]), z with the bias.

    A program owns BR (row, column) pairs r = m*K + j and all N degrees ([BR, NP] block, NP = next pow2 of N); it
    loads all of them before it stores, so gz_ptr may be z_ptr (in place)."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_n = tl.arange(0, NP)[None, :]
    m_r = (o_r < R)[:, None]
    # Element (m, n, j) of the [M, N, K] tensors sits at (m*N + n)*K + j.
    p = ((o_r // K) * N * K + o_r % K)[:, None] + o_n * K
    f_prev, _ = _chain_factor(z_ptr, p - K, o_n - 1, m_r & (o_n >= 1) & (o_n <= N), scale, MODE, ACT, ACC)
    f_next, _ = _chain_factor(z_ptr, p + K, o_n + 1, m_r & (o_n + 1 < N), scale, MODE, ACT, ACC)
    _, z = _chain_factor(z_ptr, p, o_n, m_r & (o_n < N), scale, MODE, ACT, ACC)
    # Inclusive scans of the shifted factors are the exclusive prefix / suffix products.
    leave_one_out = tl.cumprod(f_prev, axis=1) * tl.cumprod(f_next, axis=1, reverse=True)
    dy = tl.load(gy_ptr + o_r, mask=o_r < R, other=0.0).to(ACC)[:, None]
    dz = dy * leave_one_out * scale * activation_grad(z, ACT)
    tl.store(gz_ptr + p, dz.to(gz_ptr.dtype.element_ty), mask=m_r & (o_n < N))


def _flags(x, bias, mode, activation):
    """The kernels' constexpr flags."""
    return dict(
        HAS_BIAS=bias is not None,
        MODE=_MODE_CCP if mode == "ccp" else _MODE_PRODUCT,
        ACT=_ACT_CODE[activation],
        # fp32 inputs honour torch's TF32 switch; fp64 (interpreter) accumulates in fp64.
        IEEE=x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32,
        ACC=tl.float64 if x.dtype == torch.float64 else tl.float32,
    )


def forward(x, weight, bias, mode, activation, scale, *, save_projections=False, kernel=None, **config):
    """With save_projections, returns (y, z [..., N, k]). kernel/config: a raw launch of _poly_chain_fwd_kernel with
    an explicit config (tests of every tile path); by default the autotuned entry point."""
    x2d, weight, bias = common.operands(x, weight, bias)
    (M, D), (N, K) = x2d.shape, weight.shape[:2]
    flags = _flags(x, bias, mode, activation)
    NP = triton.next_power_of_2(N)
    if kernel is None:
        kernel = _fwd_any if 1 < N and NP <= _MAX_GROUPED_NP else _fwd_loop

    def grid(meta):
        columns = meta["BC"] // NP if meta["GROUPED"] else meta["BC"]
        return (triton.cdiv(M, meta["BM"]) * triton.cdiv(K, columns),)

    y = torch.empty((M, K), device=x.device, dtype=x.dtype)
    z = torch.empty((M, N, K), device=x.device, dtype=x.dtype) if save_projections else y
    kernel[grid](x2d, weight, bias if bias is not None else x2d, y, z, M, D, K, N, scale, x2d.stride(0), y.stride(0),
                 STORE_Z=save_projections, NP=NP, **flags, **config)
    y = y.view(*x.shape[:-1], K)
    return (y, z.view(*x.shape[:-1], N, K)) if save_projections else y


def backward(grad_y, x, weight, bias, mode, activation, scale, needs, projections=None):
    N, K = weight.shape[:2]
    flags = _flags(x, bias, mode, activation)
    BR = 128 if N <= 8 else 64  # keep the [BR, NP] blocks of the three factor loads in registers

    def grad_z(z, gy, out):
        R = gy.numel()
        _poly_chain_grad_z_kernel[(triton.cdiv(R, BR),)](
            z, gy, out, R, K, N, scale, MODE=flags["MODE"], ACT=flags["ACT"], ACC=flags["ACC"],
            NP=triton.next_power_of_2(N), BR=BR)

    return common.backward(grad_z, grad_y, x, weight, bias, needs, projections)
