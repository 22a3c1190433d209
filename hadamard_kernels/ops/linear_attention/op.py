"""The public causal linear attention ops: torch.library registration, fake, autograd, checks and backend dispatch."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import _checks
from .._library import (
    BackendModules,
    autocast_inputs,
    backward_custom_op,
    fake_backward,
    grads_to_tensors,
    register_autograd,
)
from .common import check_args, state_dtype

_IMPLS = BackendModules("causal_linear_attention", __package__)


def _select(backend, q, args):
    """The backend module for this call; an empty sequence (T = 0) needs no kernel and runs the reference."""
    impl = _IMPLS.select(backend, q, args)
    return _IMPLS.module("reference") if q.shape[1] == 0 else impl


def _num_states(q, cu_seqlens) -> int:
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


@torch.library.custom_op("hadamard_kernels::causal_linear_attention", mutates_args=())
def causal_linear_attention_op(q: Tensor, k: Tensor, v: Tensor, initial_state: Optional[Tensor],
                               initial_key_sum: Optional[Tensor], feature_map: str, normalize: bool, scale: float,
                               eps: float, output_final_state: bool, cu_seqlens: Optional[Tensor],
                               backend: Optional[str]) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (o, final_state, final_key_sum); a state that is not asked for is an empty tensor."""
    # Also reached by torch.ops.hadamard_kernels.causal_linear_attention directly: the kernels never see
    # unchecked input.
    check_args(q, k, v, initial_state, initial_key_sum, feature_map, normalize, cu_seqlens)
    args = (q, k, v, initial_state, initial_key_sum, feature_map, normalize, scale, eps, output_final_state,
            cu_seqlens)
    o, *states = _select(backend, q, args).forward(*args)
    # A state not asked for travels as an empty tensor (custom ops cannot return None).
    return o, *[q.new_empty(0, dtype=state_dtype(q.dtype)) if s is None else s for s in states]


@causal_linear_attention_op.register_fake
def _(q, k, v, initial_state, initial_key_sum, feature_map, normalize, scale, eps, output_final_state, cu_seqlens,
      backend):
    check_args(q, k, v, initial_state, initial_key_sum, feature_map, normalize, cu_seqlens)
    n, (_, _, heads, head_dim), value_dim = _num_states(q, cu_seqlens), q.shape, v.shape[-1]
    state_shape = (n, heads, head_dim, value_dim) if output_final_state else (0,)
    key_sum_shape = (n, heads, head_dim) if (output_final_state and normalize) else (0,)
    dtype = state_dtype(q.dtype)
    return q.new_empty(v.shape), q.new_empty(state_shape, dtype=dtype), q.new_empty(key_sum_shape, dtype=dtype)


@backward_custom_op("hadamard_kernels::causal_linear_attention_backward")
def causal_linear_attention_backward_op(
        grad_o: Tensor, grad_final_state: Optional[Tensor], grad_final_key_sum: Optional[Tensor], q: Tensor,
        k: Tensor, v: Tensor, initial_state: Optional[Tensor], initial_key_sum: Optional[Tensor], feature_map: str,
        normalize: bool, scale: float, eps: float, output_final_state: bool, cu_seqlens: Optional[Tensor],
        backend: Optional[str], needs: list[bool]) -> list[Tensor]:
    args = (q, k, v, initial_state, initial_key_sum, feature_map, normalize, scale, eps, output_final_state,
            cu_seqlens)
    grads = _select(backend, q, args).backward(grad_o, grad_final_state, grad_final_key_sum, q, k, v, initial_state,
                                               initial_key_sum, feature_map, normalize, scale, eps, cu_seqlens,
                                               needs)
    return grads_to_tensors(grads, q)


causal_linear_attention_backward_op.register_fake(fake_backward(num_inputs=5, num_grads=3))
register_autograd(causal_linear_attention_op, causal_linear_attention_backward_op, num_inputs=5)


def _split_state(initial_state, normalize: bool):
    """(S, z): with normalize the state is the tuple (S, z) (z the key sum), without it the tensor S."""
    if initial_state is None:
        return None, None
    if normalize:
        if not (isinstance(initial_state, (tuple, list)) and len(initial_state) == 2):
            raise ValueError("initial_state must be the tuple (S, z) of the state (n, H, Dk, Dv) and the key sum "
                             f"(n, H, Dk) when normalize=True, got {type(initial_state).__name__}")
        return tuple(initial_state)
    if isinstance(initial_state, (tuple, list)):
        raise ValueError("initial_state must be the state tensor S (n, H, Dk, Dv) when normalize=False, got a "
                         f"{type(initial_state).__name__} (the (S, z) tuple is the normalize=True state)")
    return initial_state, None


def causal_linear_attention(q: Tensor, k: Tensor, v: Tensor, *, feature_map: str = "identity",
                            normalize: bool = False, scale: float = 1.0, eps: float = 1e-6, initial_state=None,
                            output_final_state: bool = False, cu_seqlens: Optional[Tensor] = None,
                            backend: Optional[str] = None):
    """Causal-masked linear attention ((phi(Q) phi(K)^T) ∘ M) V, computed without the T x T matrix.

    q, k [B, T, H, Dk], v [B, T, H, Dv]; feature_map phi in identity | elu1 (elu(x) + 1) | relu, applied to q, k.
    o_t = scale * sum_{s<=t} (phi(q_t).phi(k_s)) v_s; with normalize=True divided by
    sum_{s<=t} phi(q_t).phi(k_s) + eps (the key sum z). The state S_t = S_0 + sum_{s<=t} phi(k_s)^T v_s is float32
    [n, H, Dk, Dv] (n = B, or the number of packed sequences), with normalize the tuple (S, z), z [n, H, Dk].
    initial_state seeds it; output_final_state=True returns (o, final_state). cu_seqlens: int32 [n + 1] offsets of
    packed sequences in a B = 1 batch (no attention crosses a boundary). Returns o [B, T, H, Dv] in q's dtype.
    backend: None (auto), "reference", "triton" or "cuda".
    """
    q, k, v = autocast_inputs(q, k, v)  # states stay float32
    if not isinstance(normalize, bool):
        raise ValueError(f"normalize must be a bool, got {normalize!r}")
    if not isinstance(output_final_state, bool):
        raise ValueError(f"output_final_state must be a bool, got {output_final_state!r}")
    state, key_sum = _split_state(initial_state, normalize)
    check_args(q, k, v, state, key_sum, feature_map, normalize, cu_seqlens)
    scale = _checks.check_finite_float("scale", scale)
    eps = _checks.check_finite_float("eps", eps)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    o, final_state, final_key_sum = causal_linear_attention_op(q, k, v, state, key_sum, feature_map, normalize,
                                                               scale, eps, output_final_state, cu_seqlens, backend)
    if not output_final_state:
        return o
    return o, ((final_state, final_key_sum) if normalize else final_state)


def causal_linear_attention_step(q: Tensor, k: Tensor, v: Tensor, state=None, *, feature_map: str = "identity",
                                 normalize: bool = False, scale: float = 1.0, eps: float = 1e-6,
                                 backend: Optional[str] = None):
    """One decoding step: q, k [B, 1, H, Dk], v [B, 1, H, Dv], state as causal_linear_attention's (None = zeros).
    Returns (o [B, 1, H, Dv], new_state), equal to the chunked op on the same tokens."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if isinstance(t, Tensor) and (t.dim() != 4 or t.shape[1] != 1):
            raise ValueError(f"{name} must have shape (B, 1, H, D): one token, got {tuple(t.shape)}")
    return causal_linear_attention(q, k, v, feature_map=feature_map, normalize=normalize, scale=scale, eps=eps,
                                   initial_state=state, output_final_state=True, backend=backend)
