"""Triton helpers shared by op families: activations and the stacked projection z_n = x W_n^T + b_n."""

import triton
import triton.language as tl


@triton.jit
def tanh(z):
    """tanh from the sigmoid (no tanh instruction in tl, and the interpreter has no libdevice)."""
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def activation(z, ACT: tl.constexpr):
    """ACT codes: 0 identity, 1 relu, 2 tanh, 3 sigmoid, 4 gelu (erf); the order of poly_chain.common.ACTIVATIONS."""
    if ACT == 1:
        z = tl.where(z < 0.0, 0.0, z)  # relu keeping NaN, as torch.relu (tl.maximum would drop it)
    elif ACT == 2:
        z = tanh(z)
    elif ACT == 3:
        z = tl.sigmoid(z)
    elif ACT == 4:
        z = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    return z


@triton.jit
def activation_grad(z, ACT: tl.constexpr):
    if ACT == 0:
        g = tl.full(z.shape, 1.0, z.dtype)
    elif ACT == 1:
        g = tl.where(z <= 0.0, 0.0, 1.0).to(z.dtype)  # 0 at z = 0 and 1 at NaN, as torch.relu's backward
    elif ACT == 2:
        t = tanh(z)
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
def stacked_projection(x_ptr, w_ptr, b_ptr, n, o_m, o_j, M, D, K, stride_xm,
                       HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr,
                       BJ: tl.constexpr, BD: tl.constexpr, m_j):
    """[BM, BJ] tile of z_n = x W_n^T (+ b_n), accumulated in ACC: rows o_m of x [M, D], rows n*K + o_j of the
    weight viewed [N*K, D] (and entries n*K + o_j of the bias), o_j masked by m_j."""
    acc = tl.zeros((BM, BJ), dtype=ACC)
    m_m = o_m < M
    # int64 before multiplying by D.
    p_w = w_ptr + (n * K + o_j)[None, :].to(tl.int64) * D
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < D
        b_x = tl.load(x_ptr + o_m[:, None] * stride_xm + o_d[None, :], mask=m_m[:, None] & m_d[None, :], other=0.0)
        b_w = tl.load(p_w + o_d[:, None], mask=m_j[None, :] & m_d[:, None], other=0.0)
        if IEEE:
            acc += tl.dot(b_x, b_w, input_precision="ieee", out_dtype=ACC)
        else:
            acc += tl.dot(b_x, b_w, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n * K + o_j, mask=m_j, other=0.0).to(ACC)[None, :]
    return acc
