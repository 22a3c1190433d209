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
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .._library import autocast_inputs
from .common import check_args, state_dtype
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


class _RankPrefix(torch.autograd.Function):
    """(sum_{i < rank} x_i, sum_i x_i) over the ranks of the group, x flat."""

    @staticmethod
    def forward(ctx, x, group):
        rank = dist.get_rank(group)
        gathered = _all_gather(x, group)  # [world, n]
        ctx.group = group
        return gathered[:rank].sum(0), gathered.sum(0)

    @staticmethod
    def backward(ctx, grad_before, grad_total):
        rank = dist.get_rank(ctx.group)
        gathered = _all_gather(torch.stack([grad_before, grad_total]), ctx.group)  # [world, 2, n]
        # x_i enters the prefix of every later rank and the total of every rank.
        return gathered[rank + 1:, 0].sum(0) + gathered[:, 1].sum(0), None


def context_parallel_linear_attention(q: Tensor, k: Tensor, v: Tensor, *, group=None, feature_map: str = "identity",
                                      normalize: bool = False, scale: float = 1.0, eps: float = 1e-6,
                                      initial_state=None, output_final_state: bool = False,
                                      backend: Optional[str] = None):
    """causal_linear_attention of a sequence split over the ranks of `group` (None: the default group).

    q, k [B, T_r, H, Dk], v [B, T_r, H, Dv]: rank r's piece, the tokens after those of ranks 0..r-1 (T_r may differ
    between ranks, and be 0; B, H, Dk, Dv and the dtype must be the same on every rank). Returns rank r's outputs
    o [B, T_r, H, Dv], equal to the same rows of one causal_linear_attention call on the whole sequence, gradients
    included. initial_state: the state before rank 0's first token, given on rank 0 only (None elsewhere).
    output_final_state=True returns (o, final_state), the state after the last rank's last token, on every rank.
    Other arguments as causal_linear_attention's; packed sequences (cu_seqlens) are not supported here.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("context_parallel_linear_attention needs an initialized torch.distributed process group "
                           "(torch.distributed.init_process_group)")
    q, k, v = autocast_inputs(q, k, v)
    state, key_sum = _split_state(initial_state, normalize)
    check_args(q, k, v, state, key_sum, feature_map, normalize, None)
    rank = dist.get_rank(group)
    if initial_state is not None and rank != 0:
        raise ValueError(f"initial_state is the state before rank 0's tokens: pass it on rank 0 only, got one on "
                         f"rank {rank}")

    batch, _, heads, head_dim = q.shape
    shape = (batch, heads, head_dim, v.shape[-1])
    piece_state, piece_key_sum = _PieceSum.apply(k, v, feature_map)
    # One flat buffer per exchange: the state, then (with normalize) the key sum. Rank 0's initial state travels
    # inside its piece: every later start state and the total include it.
    sizes = [piece_state.numel()] + ([piece_key_sum.numel()] if normalize else [])
    piece = torch.cat([piece_state.flatten()] + ([piece_key_sum.flatten()] if normalize else []))
    initial = None
    if state is not None:
        initial = torch.cat([state.flatten()] + ([key_sum.flatten()] if normalize else []))
        piece = piece + initial
    before, total = _RankPrefix.apply(piece, group)
    start = before if initial is None else initial  # rank 0 starts from the initial state (before is 0 there)

    def unflatten(flat):
        parts = flat.split(sizes)
        return (parts[0].view(shape), parts[1].view(shape[:3])) if normalize else parts[0].view(shape)

    o = causal_linear_attention(q, k, v, feature_map=feature_map, normalize=normalize, scale=scale, eps=eps,
                                initial_state=unflatten(start), backend=backend)
    return (o, unflatten(total)) if output_final_state else o
