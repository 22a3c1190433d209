"""The oracle for poly_ncp: the NCP recursion one degree at a time, in float32 (float64 stays float64).

The backward is written out by hand, because autograd cannot run inside a custom op's backward; gradcheck
verifies it against finite differences of `forward`."""

from __future__ import annotations

import torch


def _chain(x2d, a_weight, a_bias, s_weight, s_bias):
    """Every a_n = A_n x + a_n, s_n = S_n y_{n-1} + s_n (s[0] is None) and y_n, in the compute dtype."""
    compute = torch.float64 if x2d.dtype == torch.float64 else torch.float32
    xc, A, S = x2d.to(compute), a_weight.to(compute), s_weight.to(compute)
    a_s = [xc @ A[n].T + (0 if a_bias is None else a_bias[n].to(compute)) for n in range(A.shape[0])]
    s_s, y_s = [None], [a_s[0]]
    for n in range(1, A.shape[0]):
        s_s.append(y_s[-1] @ S[n - 1].T + (0 if s_bias is None else s_bias[n - 1].to(compute)))
        y_s.append(a_s[n] * s_s[-1])
    return a_s, s_s, y_s


def forward(x, a_weight, a_bias, s_weight, s_bias):
    """x [..., d], a_weight [N, k, d], a_bias [N, k] | None, s_weight [N-1, k, k], s_bias [N-1, k] | None
    -> y_N [..., k], where y_1 = A_1 x + a_1 and y_n = (A_n x + a_n) * (S_n y_{n-1} + s_n)."""
    _, _, y_s = _chain(x.reshape(-1, x.shape[-1]), a_weight, a_bias, s_weight, s_bias)
    return y_s[-1].to(x.dtype).view(*x.shape[:-1], a_weight.shape[1])


def backward(grad_y, x, a_weight, a_bias, s_weight, s_bias, needs):
    """Walks the chain backwards with g = dL/dy_n: dL/da_n = g * s_n, dL/ds_n = g * a_n, g_{n-1} = (g * a_n) @ S_n."""
    N, K, D = a_weight.shape
    x2d = x.reshape(-1, D)
    a_s, s_s, y_s = _chain(x2d, a_weight, a_bias, s_weight, s_bias)
    compute = a_s[0].dtype
    S = s_weight.to(compute)
    g = grad_y.reshape(-1, K).to(compute)
    grad_a, grad_s = [None] * N, [None] * N
    for n in range(N - 1, 0, -1):
        grad_a[n] = g * s_s[n]
        grad_s[n] = g * a_s[n]
        g = grad_s[n] @ S[n - 1]
    grad_a[0] = g

    need_x, need_aw, need_ab, need_sw, need_sb = needs
    xc, A = x2d.to(compute), a_weight.to(compute)
    dx = sum(ga @ A[n] for n, ga in enumerate(grad_a)).to(x.dtype).view(x.shape) if need_x else None
    daw = torch.stack([ga.T @ xc for ga in grad_a]).to(a_weight.dtype) if need_aw else None
    dab = torch.stack([ga.sum(0) for ga in grad_a]).to(a_bias.dtype) if (need_ab and a_bias is not None) else None
    # Stacked over n = 2..N; the zeros keep the (0, k, k) / (0, k) shapes when N = 1.
    dsw = dsb = None
    if need_sw:
        dsw = torch.zeros_like(s_weight) if N == 1 else torch.stack(
            [grad_s[n].T @ y_s[n - 1] for n in range(1, N)]).to(s_weight.dtype)
    if need_sb and s_bias is not None:
        dsb = torch.zeros_like(s_bias) if N == 1 else torch.stack(
            [grad_s[n].sum(0) for n in range(1, N)]).to(s_bias.dtype)
    return dx, daw, dab, dsw, dsb
