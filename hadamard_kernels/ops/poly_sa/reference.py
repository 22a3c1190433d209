"""The oracle for poly_sa and poly_sa_pool: the survey's formula in plain PyTorch, in float32 (float64 stays float64).

    p1 = z @ w1, p2 = z @ w2                      (B, N, C)
    m  = sum over real tokens of p1 * p2 / count  (B, C); 0 for a row with no real token
    Y  = alpha * z + beta * ((z * m) @ w3)        (B, N, C)

The backward is written out by hand (gradcheck verifies it against finite differences of `forward`): with
u = z * m and G = dL/dY,
    dalpha = sum(G * z),  dbeta = sum(G * (u @ w3)),  dw3 = u^T (beta G),  du = beta G @ w3^T,
    dm = sum over all tokens of du * z  (every output reads m, padded tokens' too),
and the pool's backward from dm: s = dm / count, dp1 = s * p2 and dp2 = s * p1 on real tokens (0 on padded ones),
    dz += dp1 @ w1^T + dp2 @ w2^T,  dw1 = z^T dp1,  dw2 = z^T dp2.
"""

from __future__ import annotations

import torch

from .common import accumulate_dtype


def _cast(*tensors, dtype):
    return [t.to(dtype) for t in tensors]


def _counts(z, mask):
    """(B, 1) number of real tokens, at least 1 (a row with none sums nothing, so its m is 0 either way)."""
    B, N, _ = z.shape
    counts = torch.full((B,), N, dtype=z.dtype, device=z.device) if mask is None else mask.sum(1).to(z.dtype)
    return counts.clamp_min(1)[:, None]


def _only_real(x, mask):
    """x (B, N, C) with padded tokens set to 0 (a select, so an inf or NaN there is left out too)."""
    return x if mask is None else torch.where(mask[..., None], x, 0.0)


def _pool(zc, w1c, w2c, mask):
    return _only_real((zc @ w1c) * (zc @ w2c), mask).sum(1) / _counts(zc, mask)


def _pool_backward(dm, zc, w1c, w2c, mask, needs):
    """(dz, dw1, dw2) of m = pool(z) from dm (B, C), all in the compute dtype; None where not needed."""
    C = zc.shape[-1]
    s = (dm / _counts(zc, mask))[:, None, :]
    dp1 = _only_real(s * (zc @ w2c), mask)
    dp2 = _only_real(s * (zc @ w1c), mask)
    dz = dp1 @ w1c.T + dp2 @ w2c.T if needs[0] else None
    z2 = zc.reshape(-1, C)
    dw1 = z2.T @ dp1.reshape(-1, C) if needs[1] else None
    dw2 = z2.T @ dp2.reshape(-1, C) if needs[2] else None
    return dz, dw1, dw2


def pool_forward(z, w1, w2, mask):
    """z (B, N, C), w1, w2 (C, C), mask (B, N) bool | None -> m (B, C) in z's dtype."""
    acc = accumulate_dtype(z.dtype)
    return _pool(*_cast(z, w1, w2, dtype=acc), mask).to(z.dtype)


def pool_backward(grad_m, z, w1, w2, mask, needs):
    acc = accumulate_dtype(z.dtype)
    zc, w1c, w2c = _cast(z, w1, w2, dtype=acc)
    grads = _pool_backward(grad_m.to(acc), zc, w1c, w2c, mask, needs)
    return tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, (z, w1, w2)))


def forward(z, w1, w2, w3, alpha, beta, mask):
    """-> Y (B, N, C) in z's dtype: alpha * z + beta * ((z * m) @ w3), m = pool_forward(z, w1, w2, mask)."""
    acc = accumulate_dtype(z.dtype)
    zc, w1c, w2c, w3c, a, b = _cast(z, w1, w2, w3, alpha, beta, dtype=acc)
    m = _pool(zc, w1c, w2c, mask)
    return (a * zc + b * ((zc * m[:, None, :]) @ w3c)).to(z.dtype)


def backward(grad_y, z, w1, w2, w3, alpha, beta, mask, needs):
    acc = accumulate_dtype(z.dtype)
    zc, w1c, w2c, w3c, a, b, g = _cast(z, w1, w2, w3, alpha, beta, grad_y, dtype=acc)
    C = z.shape[-1]
    m = _pool(zc, w1c, w2c, mask)
    u = zc * m[:, None, :]
    dalpha = (g * zc).sum().reshape(alpha.shape)
    dbeta = (g * (u @ w3c)).sum().reshape(beta.shape)
    dw3 = u.reshape(-1, C).T @ (b * g).reshape(-1, C)
    du = b * (g @ w3c.T)
    dm = (du * zc).sum(1)
    dz_pool, dw1, dw2 = _pool_backward(dm, zc, w1c, w2c, mask, (needs[0], needs[1], needs[2]))
    dz = a * g + du * m[:, None, :] + dz_pool if needs[0] else None
    grads = (dz, dw1, dw2, dw3, dalpha, dbeta)
    return tuple(None if (grad is None or not need) else grad.to(t.dtype)
                 for grad, need, t in zip(grads, needs, (z, w1, w2, w3, alpha, beta)))
