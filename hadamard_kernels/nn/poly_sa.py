"""Poly-SA module: polynomial self-attention pooling, linear in tokens.

`PolySA(channels)` is a drop-in for the instructional module of the Hadamard-product survey (arXiv 2504.13112,
§S.2): parameters `W1, W2, W3` (C x C, initialised randn / sqrt(C)) and `alpha, beta` (shape (1,), randn), created
in that order, so the same seed gives the same values and `load_state_dict` works in both directions. The forward is
the survey's
    m = mean over tokens of (z @ W1) * (z @ W2),   Y = alpha * z + beta * ((z * m) @ W3)
(z @ W, not W.T), run by the fused op `poly_sa`; beyond the survey, `forward(z, mask)` takes an optional padding
mask (B, N) bool, True = real token, whose padded tokens are left out of the mean.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import _checks
from ..ops.poly_sa import poly_sa


class PolySA(nn.Module):
    """z [B, N, channels] -> Y [B, N, channels], Y = alpha * z + beta * ((z * m) @ W3) with
    m = mean over (real) tokens of (z @ W1) * (z @ W2). `backend` (None = auto, "reference", "triton" or "cuda")
    is passed to the op on every call."""

    def __init__(self, channels: int, *, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        _checks.check_positive_int("channels", channels)
        self.channels = channels
        self.backend = backend
        factory = dict(device=device, dtype=dtype)
        # The survey's order and initialisation: W1, W2, W3 = randn(C, C) / sqrt(C), then alpha, beta = randn(1).
        self.W1 = nn.Parameter(torch.randn(channels, channels, **factory) / math.sqrt(channels))
        self.W2 = nn.Parameter(torch.randn(channels, channels, **factory) / math.sqrt(channels))
        self.W3 = nn.Parameter(torch.randn(channels, channels, **factory) / math.sqrt(channels))
        self.alpha = nn.Parameter(torch.randn(1, **factory))
        self.beta = nn.Parameter(torch.randn(1, **factory))

    def forward(self, z: Tensor, mask: Tensor | None = None) -> Tensor:
        return poly_sa(z, self.W1, self.W2, self.W3, self.alpha, self.beta, mask=mask, backend=self.backend)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


__all__ = ["PolySA"]
