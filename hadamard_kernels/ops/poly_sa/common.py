"""poly_sa's spec shared by its backends: argument checks and the token counts of the masked mean (DESIGN.md §3).

    m = mean over real tokens of (z @ w1) * (z @ w2)            (B, C)   poly_sa_pool
    Y = alpha * z + beta * ((z * m[:, None, :]) @ w3)           (B, N, C) poly_sa

z (B, N, C); w1, w2, w3 (C, C), multiplied as z @ w (not w.T, as the survey's code); alpha, beta scalar tensors of
shape () or (1,); mask (B, N) bool or None, True = real token. A row with no real token has m = 0.
"""

from __future__ import annotations

import torch

from ... import _checks


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
