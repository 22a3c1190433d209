"""Context parallelism: one causal linear attention over a sequence whose tokens are split across the ranks of a
torch.distributed process group.

Rank r of the group holds the tokens [t_r, t_r+1) of every sequence of the batch (rank order is token order; pieces
may differ in length, and may be empty). The state is a sum over tokens, so the state at the start of rank r's
piece is S_0 + sum_{i<r} phi(K_i)^T V_i (and z likewise):
  1. each rank sums its own piece, phi(K_r)^T V_r and sum_t phi(K_r) (one batched GEMM per head, fp32),
  2. one all_gather gives every rank every piece's sum; rank r adds those of the ranks before it to S_0,
  3. the fused op runs on the local piece from that start state (the whole sequence's outputs, bit for bit the
     same algorithm as one call, up to the order of fp32 additions).
The backward runs the exchange reversed: a piece's sum enters the start state of every later rank and the final
state, so its gradient is the sum of theirs; one all_gather again. A rank sends B x H x Dk x (Dv + 1) floats in the
forward (Dv without normalize) and twice that in the backward, whatever T; all_gather rather than a chain of sends
keeps it one step of latency. Autograd needs every rank to run the backward (the exchange is a collective).

Packed sequences (cu_seqlens over the whole packed batch) may span ranks. Each rank learns every rank's piece length
(one small all_gather), so every rank knows which sequences each piece starts and ends in; the exchange then carries
each rank's last sequence's partial sum, and a rank whose first sequence began earlier starts it from the sum of
the pieces of that sequence on the ranks before it.
"""

from __future__ import annotations

import bisect
import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .._library import autocast_inputs
from .common import check_args, check_cu_seqlens, state_dtype
from .op import _split_state, causal_linear_attention
from .reference import phi, phi_grad


class _PieceSum(torch.autograd.Function):
    """(phi(k)^T v [B, H, Dk, Dv], sum_t phi(k) [B, H, Dk]) in the state dtype. Saves k and v only (the fused op
    keeps them anyway); the backward recomputes phi(k)."""

    @staticmethod
    def forward(ctx, k, v, feature_map: str):
        dtype = state_dtype(k.dtype)
        features = phi(k.to(dtype), feature_map)
        ctx.save_for_backward(k, v)
        ctx.feature_map = feature_map
        return torch.einsum("bthk,bthv->bhkv", features, v.to(dtype)), features.sum(1)

    @staticmethod
    def backward(ctx, grad_state, grad_key_sum):
        k, v = ctx.saved_tensors
        dtype = state_dtype(k.dtype)
        k32, v32 = k.to(dtype), v.to(dtype)
        grad_features = torch.einsum("bthv,bhkv->bthk", v32, grad_state) + grad_key_sum[:, None]
        grad_k = grad_features * phi_grad(k32, ctx.feature_map)
        grad_v = torch.einsum("bthk,bhkv->bthv", phi(k32, ctx.feature_map), grad_state)
        return grad_k.to(k.dtype), grad_v.to(v.dtype), None


def _all_gather(x: Tensor, group) -> Tensor:
    """[world, *x.shape]: x of every rank of the group, in rank order."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)


class _RankMix(torch.autograd.Function):
    """y_j = sum_i mix[rank, j, i] x_i over the ranks i of the group: the start states (and total) each rank needs
    from the pieces' sums. x flat; mix [world, outputs, world] of 0/1, the same on every rank. The backward gathers
    every rank's output gradients: x_i's gradient is sum_{r, j} mix[r, j, i] dy_{r, j}."""

    @staticmethod
    def forward(ctx, x, mix, group):
        gathered = _all_gather(x, group)  # [world, n]
        mix = mix.to(device=x.device, dtype=x.dtype)  # built on the host; x may be on a GPU
        ctx.group, ctx.mix = group, mix
        return tuple(weights @ gathered for weights in mix[dist.get_rank(group)])

    @staticmethod
    def backward(ctx, *grads):
        gathered = _all_gather(torch.stack(grads), ctx.group)  # [world, outputs, n]
        weights = ctx.mix[:, :, dist.get_rank(ctx.group)]  # [world, outputs]
        return torch.einsum("ro,ron->n", weights, gathered), None, None


def _piece_lengths(t: int, device, group) -> list[int]:
    """Every rank's number of tokens (one small all_gather and a host sync)."""
    return _all_gather(torch.tensor([t], dtype=torch.int64, device=device), group).flatten().tolist()


def _flat_state(state, key_sum, normalize):
    return torch.cat([state.flatten()] + ([key_sum.flatten()] if normalize else []))


def context_parallel_linear_attention(q: Tensor, k: Tensor, v: Tensor, *, group=None, feature_map: str = "identity",
                                      normalize: bool = False, scale: float = 1.0, eps: float = 1e-6,
                                      initial_state=None, output_final_state: bool = False,
                                      cu_seqlens: Optional[Tensor] = None, backend: Optional[str] = None):
    """causal_linear_attention of sequences split over the ranks of `group` (None: the default group).

    q, k [B, T_r, H, Dk], v [B, T_r, H, Dv]: rank r's piece, the tokens after those of ranks 0..r-1 (T_r may differ
    between ranks, and be 0; B, H, Dk, Dv and the dtype must be the same on every rank). Returns rank r's outputs
    o [B, T_r, H, Dv], equal to the same rows of one causal_linear_attention call on the whole sequence, gradients
    included. initial_state: the state before rank 0's first token, given on rank 0 only (None elsewhere).
    output_final_state=True returns (o, final_state), the state after the last rank's last token, on every rank.
    cu_seqlens: packed sequences (B = 1), the int32 offsets [n + 1] of the whole packed batch, the same on every
    rank; a sequence may span ranks. initial_state and output_final_state are not supported with it.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("context_parallel_linear_attention needs an initialized torch.distributed process group "
                           "(torch.distributed.init_process_group)")
    q, k, v = autocast_inputs(q, k, v)
    state, key_sum = _split_state(initial_state, normalize)
    check_args(q, k, v, state, key_sum, feature_map, normalize, None)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if initial_state is not None and rank != 0:
        raise ValueError(f"initial_state is the state before rank 0's tokens: pass it on rank 0 only, got one on "
                         f"rank {rank}")
    options = dict(feature_map=feature_map, normalize=normalize, scale=scale, eps=eps, backend=backend)
    batch, _, heads, head_dim = q.shape
    shape = (batch, heads, head_dim, v.shape[-1])
    sizes = [math.prod(shape)] + ([math.prod(shape[:3])] if normalize else [])

    def piece_sum(k_part, v_part):
        """The flat state contribution of these tokens: the state, then (with normalize) the key sum."""
        return _flat_state(*_PieceSum.apply(k_part, v_part, feature_map), normalize)

    def unflatten(flat):
        parts = flat.split(sizes)
        return (parts[0].view(shape), parts[1].view(shape[:3])) if normalize else parts[0].view(shape)

    if cu_seqlens is not None:
        if initial_state is not None or output_final_state:
            raise NotImplementedError("context_parallel_linear_attention with cu_seqlens supports neither "
                                      "initial_state nor output_final_state")
        return _packed(q, k, v, cu_seqlens, group, rank, world, piece_sum, unflatten, options)

    # Rank 0's initial state travels inside its piece: every later start state and the total include it.
    piece = piece_sum(k, v)
    initial = None if state is None else _flat_state(state, key_sum, normalize)
    if initial is not None:
        piece = piece + initial
    mix = torch.stack([torch.stack([torch.arange(world) < r, torch.ones(world, dtype=torch.bool)])
                       for r in range(world)])  # [world, (before, total), world]
    before, total = _RankMix.apply(piece, mix, group)
    start = before if initial is None else initial  # rank 0 starts from the initial state (before is 0 there)
    o = causal_linear_attention(q, k, v, initial_state=unflatten(start), **options)
    return (o, unflatten(total)) if output_final_state else o


def _packed(q, k, v, cu_seqlens, group, rank, world, piece_sum, unflatten, options):
    """The cu_seqlens form. Every rank finds every rank's first and last sequence from the pieces' lengths; the
    only state a rank needs from the others is its first sequence's, when that sequence began on an earlier rank:
    the sum of the last-sequence pieces of the ranks before it that end inside that sequence."""
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens, q, k, v must have batch size 1 (packed sequences), got B = {q.shape[0]}")
    lengths = _piece_lengths(q.shape[1], q.device, group)
    begins = [sum(lengths[:r]) for r in range(world + 1)]
    check_cu_seqlens(cu_seqlens, q.new_empty((1, begins[-1], 0, 0)))  # the whole packed batch
    offsets = cu_seqlens.tolist()

    def sequence_at(token):  # the sequence holding this token (a non-empty one)
        return bisect.bisect_right(offsets, token) - 1

    first = [sequence_at(begins[r]) if lengths[r] else -1 for r in range(world)]
    last = [sequence_at(begins[r + 1] - 1) if lengths[r] else -1 for r in range(world)]
    # Rank r's first sequence began on an earlier rank: it needs the pieces of the ranks before it that end in it.
    continues = [lengths[r] > 0 and offsets[first[r]] < begins[r] for r in range(world)]
    mix = torch.tensor([[[continues[r] and i < r and last[i] == first[r] for i in range(world)]]
                        for r in range(world)])  # [world, 1, world]
    T = lengths[rank]
    # This rank's sequences as local offsets: first[rank] .. last[rank], clipped to the piece.
    local = [0] + [offsets[s] - begins[rank] for s in range(first[rank] + 1, last[rank] + 1)] + [T] if T else [0, 0]
    tail = local[-2]  # where this rank's last sequence starts in the piece
    (start,) = _RankMix.apply(piece_sum(k[:, tail:], v[:, tail:]), mix, group)
    # The first sequence runs from `start` even where it begins on this rank (start is 0 there), and an empty piece
    # too: the backward of every rank then reaches the exchange, a collective that needs them all.
    head = local[1]
    outs = [causal_linear_attention(q[:, :head], k[:, :head], v[:, :head], initial_state=unflatten(start), **options)]
    if head < T:
        cu = torch.tensor(local[1:], dtype=torch.int32, device=q.device) - head
        outs.append(causal_linear_attention(q[:, head:], k[:, head:], v[:, head:], cu_seqlens=cu, **options))
    return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
