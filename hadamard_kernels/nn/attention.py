"""Causal linear self-attention module.

`LinearSelfAttention(hidden_dim)` is a drop-in for the instructional module of the Hadamard-product survey
(arXiv 2504.13112, §S.2): submodules `W_q`, `W_k`, `W_v` (nn.Linear hidden -> hidden, created in that order, so the
same seed gives the same weights), output `((Q K^T) ∘ M) V` with the lower-triangular mask M, no 1/sqrt(d) scaling,
no normalizer and no output projection. Options beyond the survey: heads, a feature map, the normalizer, the
recurrent state for decoding one token at a time, and sequences split over ranks (context parallel). The math runs
in the fused op `causal_linear_attention`.
"""

from __future__ import annotations

from torch import Tensor, nn

from .. import _checks
from ..ops.linear_attention import (
    causal_linear_attention,
    causal_linear_attention_step,
    context_parallel_linear_attention,
)
from ..ops.linear_attention.common import FEATURE_MAPS


class LinearSelfAttention(nn.Module):
    """x [B, T, hidden_dim] -> [B, T, hidden_dim]: per head h (hidden_dim split into num_heads),
    o_t = scale * sum_{s<=t} (phi(q_t).phi(k_s)) v_s (divided by sum_{s<=t} phi(q_t).phi(k_s) + eps when
    normalize), with q, k, v = W_q x, W_k x, W_v x.

    `forward(x, state=None, output_final_state=False, cu_seqlens=None, context_parallel_group=None)`: `state`
    continues a sequence from a previous call (float32 [B, H, Dh, Dh], or the tuple (S, z) with normalize); with
    output_final_state=True it returns (out, new_state). With context_parallel_group (a torch.distributed group), x
    is this rank's piece of the sequences, as hk.context_parallel_linear_attention takes it (state then on rank 0
    only; cu_seqlens, if given, the whole packed batch's offsets). `step(x_t, state)` decodes one token
    [B, 1, hidden_dim] (or [B, hidden_dim])."""

    def __init__(self, hidden_dim: int, *, num_heads: int = 1, feature_map: str = "identity",
                 normalize: bool = False, scale: float = 1.0, eps: float = 1e-6, bias: bool = True,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        _checks.check_positive_int("hidden_dim", hidden_dim)
        _checks.check_positive_int("num_heads", num_heads)
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim must be a multiple of num_heads ({num_heads}), got {hidden_dim}")
        _checks.check_choice("feature_map", feature_map, FEATURE_MAPS)
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize must be a bool, got {normalize!r}")
        self.hidden_dim, self.num_heads = hidden_dim, num_heads
        self.feature_map, self.normalize = feature_map, normalize
        self.scale = _checks.check_finite_float("scale", scale)
        self.eps = _checks.check_finite_float("eps", eps)
        self.backend = backend
        factory = dict(device=device, dtype=dtype)
        self.W_q = nn.Linear(hidden_dim, hidden_dim, bias=bias, **factory)
        self.W_k = nn.Linear(hidden_dim, hidden_dim, bias=bias, **factory)
        self.W_v = nn.Linear(hidden_dim, hidden_dim, bias=bias, **factory)

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.hidden_dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, T, {self.hidden_dim}), got {shape}")
        split = (*x.shape[:2], self.num_heads, self.hidden_dim // self.num_heads)
        return self.W_q(x).view(split), self.W_k(x).view(split), self.W_v(x).view(split)

    def _options(self):
        return dict(feature_map=self.feature_map, normalize=self.normalize, scale=self.scale, eps=self.eps,
                    backend=self.backend)

    def forward(self, x: Tensor, state=None, output_final_state: bool = False, cu_seqlens: Tensor | None = None,
                context_parallel_group=None):
        q, k, v = self._heads(x)
        if context_parallel_group is not None:  # x is this rank's piece of the sequences
            out = context_parallel_linear_attention(q, k, v, group=context_parallel_group, initial_state=state,
                                                    output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                                    **self._options())
        else:
            out = causal_linear_attention(q, k, v, initial_state=state, output_final_state=output_final_state,
                                          cu_seqlens=cu_seqlens, **self._options())
        if output_final_state:
            o, new_state = out
            return o.flatten(2), new_state
        return out.flatten(2)

    def step(self, x_t: Tensor, state=None):
        """One decoding step: x_t [B, 1, hidden_dim] or [B, hidden_dim] -> (out of x_t's shape, new state)."""
        squeeze = isinstance(x_t, Tensor) and x_t.dim() == 2
        if squeeze:
            x_t = x_t.unsqueeze(1)
        q, k, v = self._heads(x_t)
        o, new_state = causal_linear_attention_step(q, k, v, state, **self._options())
        o = o.flatten(2)
        return (o.squeeze(1) if squeeze else o), new_state

    def extra_repr(self) -> str:
        return (f"hidden_dim={self.hidden_dim}, num_heads={self.num_heads}, feature_map={self.feature_map!r}, "
                f"normalize={self.normalize}, scale={self.scale}")


__all__ = ["LinearSelfAttention"]
