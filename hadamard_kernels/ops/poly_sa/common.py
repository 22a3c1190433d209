"""poly_sa's spec shared by its backends: argument checks and the token counts of the masked mean (DESIGN.md §3).

    m = mean over real tokens of (z @ w1) * (z @ w2)            (B, C)   poly_sa_pool
    Y = alpha * z + beta * ((z * m[:, None, :]) @ w3)           (B, N, C) poly_sa

z (B, N, C); w1, w2, w3 (C, C), multiplied as z @ w (not w.T, as the survey's code); alpha, beta scalar tensors of
shape () or (1,); mask (B, N) bool or None, True = real token. A row with no real token has m = 0.
"""

from __future__ import annotations

import torch

from ... import _checks

# A split of one batch row's tokens (the token-reducing kernels of the fused backends) is a whole number of
# SPLIT_ALIGN tokens.
SPLIT_ALIGN = 128


def check_scalar(name: str, t) -> None:
    _checks.check_tensor(name, t)
    if t.shape not in ((), (1,)):
        raise ValueError(f"{name} must be a scalar tensor of shape () or (1,) (or a number), got shape "
                         f"{tuple(t.shape)}")


def check_mask(mask, z) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must have dtype torch.bool (True = real token), got {mask.dtype}")
    _checks.check_shape("mask", mask, tuple(z.shape[:2]), "(B, N) like z.shape[:2]")
    if mask.device != z.device:
        raise ValueError(f"mask must be on z's device {z.device}, got {mask.device}")


def check_pool_args(z, w1, w2, mask) -> int:
    """z (B, N, C), w1, w2 (C, C), mask (B, N) bool or None. Returns C."""
    _checks.check_tensor("z", z, ndim=3)
    C = z.shape[-1]
    _checks.check_positive("z.shape[-1]", C, "the channels C")
    for name, w in (("w1", w1), ("w2", w2)):
        _checks.check_tensor(name, w)
        _checks.check_shape(name, w, (C, C), "(C, C) with C = z.shape[-1]")
    _checks.check_same_dtype_device("z", z, w1=w1, w2=w2)
    check_mask(mask, z)
    return C


def check_args(z, w1, w2, w3, alpha, beta, mask) -> None:
    C = check_pool_args(z, w1, w2, mask)
    _checks.check_tensor("w3", w3)
    _checks.check_shape("w3", w3, (C, C), "(C, C) with C = z.shape[-1]")
    check_scalar("alpha", alpha)
    check_scalar("beta", beta)
    _checks.check_same_dtype_device("z", z, w3=w3, alpha=alpha, beta=beta)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs: what every sum and product of the family is taken in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def inverse_counts(z, mask) -> torch.Tensor:
    """(B,) 1 / (number of real tokens) in the accumulate dtype, 0 for a row with none (so m = 0 there)."""
    B, N, _ = z.shape
    acc = accumulate_dtype(z.dtype)
    if mask is None:
        return torch.full((B,), 1.0 / N if N else 0.0, dtype=acc, device=z.device)
    counts = mask.sum(1, dtype=acc)
    return torch.where(counts > 0, 1.0 / counts.clamp_min(1), 0.0)


# ---------------------------------------------------------------- shared by the fused backends (triton, cuda)
def rows(t):
    """t [B, N, C] as a [B*N, C] view with unit channel stride (a copy only when no such view exists): row
    b * N + t is token t of batch row b."""
    t2 = t.reshape(-1, t.shape[-1])
    # Unit channel stride even for a single row, and rows that do not overlap (an expanded tensor's do).
    return t2 if t2.stride(-1) == 1 and (t2.shape[0] <= 1 or t2.stride(0) >= t2.shape[-1]) else t2.contiguous()


def row_stride(t2) -> int:
    """The row stride of rows(t) for the kernels: a single row's stride is never used (and may be anything)."""
    return t2.stride(0) if t2.shape[0] > 1 else t2.shape[-1]


def token_split(B: int, N: int, C: int, device: torch.device) -> int:
    """Tokens per split of a batch row in the token-reducing kernels: enough programs for the GPU (about four per
    SM, counting 128-column blocks) and a whole number of SPLIT_ALIGN tokens. A function of the shape and the device
    only, so the order of every sum (and so the bits of the result) does not depend on the tile config."""
    programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    splits = max(1, min(_cdiv(N, SPLIT_ALIGN), _cdiv(programs, B * _cdiv(C, 128))))
    return _cdiv(_cdiv(N, splits), SPLIT_ALIGN) * SPLIT_ALIGN


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pool_mean(part, z, mask):
    """m (B, C) from the kernels' per-split sums part (B, splits, C): a torch.sum over the splits in a fixed order
    (the same bits run to run), times 1 / count."""
    return part.sum(1) * inverse_counts(z, mask)[:, None]


def pool_gradient_gemms(grad_p, z, w1, w2, needs, dz=None):
    """(dz, dw1, dw2) from the pool's gradient grad_p = [dp1 | dp2] (B*N, 2C), dp = dL/d(z @ w): two GEMMs,
    dz (+)= grad_p @ [w1 | w2]^T and [dw1 | dw2] = z^T grad_p. `dz` (B*N, C): a gradient to add to."""
    C = z.shape[-1]
    dz_out = dw1 = dw2 = None
    if needs[0]:
        w_cat = torch.cat([w1, w2], 1)  # [C, 2C]: dz = dp1 @ w1^T + dp2 @ w2^T
        dz_out = (grad_p @ w_cat.T if dz is None else torch.addmm(dz, grad_p, w_cat.T)).view(z.shape)
    if needs[1] or needs[2]:
        dw = rows(z).T @ grad_p
        # Own storage each (custom op outputs may not alias).
        dw1 = dw[:, :C].clone(memory_format=torch.contiguous_format) if needs[1] else None
        dw2 = dw[:, C:].clone(memory_format=torch.contiguous_format) if needs[2] else None
    return dz_out, dw1, dw2


def fused_pool_backward(kernels, grad_m, z, w1, w2, mask, needs):
    """poly_sa_pool's backward on a fused backend's kernels (`kernels.pool_gradient`)."""
    s = grad_m.to(accumulate_dtype(z.dtype)) * inverse_counts(z, mask)[:, None]
    if not any(needs):
        return None, None, None
    return pool_gradient_gemms(kernels.pool_gradient(s, z, w1, w2, mask), z, w1, w2, needs)


def fused_backward(kernels, grad_y, z, w1, w2, w3, alpha, beta, mask, needs):
    """poly_sa's backward on a fused backend's kernels: `pool_sum` recomputes m, `out_backward` gives
    dz_direct = alpha G + beta (G @ w3^T) * m, u = beta z * m, q = sum over tokens of (G @ w3^T) * z and
    dalpha = sum G * z; then dw3 = u^T G, dm = beta q, dbeta = sum m * q, and the pool's backward from dm."""
    m = kernels.pool_sum(z, w1, w2, mask)
    dz, u, q, dalpha = kernels.out_backward(grad_y, z, m, w3, alpha, beta)
    dbeta = (m * q).sum()
    dw3 = u.T @ rows(grad_y) if needs[3] else None
    del u  # freed before grad_p is allocated: the backward's transient peak is dz + grad_p
    dw1 = dw2 = None
    if any(needs[:3]):
        s = beta.to(m.dtype).reshape(()) * q * inverse_counts(z, mask)[:, None]
        grad_p = kernels.pool_gradient(s, z, w1, w2, mask)
        dz, dw1, dw2 = pool_gradient_gemms(grad_p, z, w1, w2, needs[:3], dz=dz)
    return (dz, dw1, dw2, dw3, dalpha.reshape(alpha.shape).to(alpha.dtype) if needs[4] else None,
            dbeta.reshape(beta.shape).to(beta.dtype) if needs[5] else None)


def fused_entry_points(kernels):
    """(pool_forward, pool_backward, forward, backward): the backend interface of a fused backend module, built on
    its four kernel launchers (`pool_sum`, `pool_gradient`, `out_forward`, `out_backward`)."""
    def pool_forward(z, w1, w2, mask):
        return kernels.pool_sum(z, w1, w2, mask).to(z.dtype)

    def pool_backward(grad_m, z, w1, w2, mask, needs):
        return fused_pool_backward(kernels, grad_m, z, w1, w2, mask, needs)

    def forward(z, w1, w2, w3, alpha, beta, mask):
        return kernels.out_forward(z, kernels.pool_sum(z, w1, w2, mask), w3, alpha, beta)

    def backward(grad_y, z, w1, w2, w3, alpha, beta, mask, needs):
        return fused_backward(kernels, grad_y, z, w1, w2, w3, alpha, beta, mask, needs)

    return pool_forward, pool_backward, forward, backward
