"""context_parallel_linear_attention: a sequence (or a packed batch) split over the ranks of a gloo process group
(CPU processes) gives the rows, final state and gradients of one causal_linear_attention call on the whole of it; on
a GPU, the same over NCCL with one rank."""

from __future__ import annotations

import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from utils import assert_close, cuda, requires_cuda

import hadamard_kernels as hk
from hadamard_kernels.ops.linear_attention.common import state_dtype

PIECES = (70, 0, 53)  # rank 0 crosses a chunk boundary, rank 1 holds no token
# Rank r's loss counts the final state with weight FINAL_WEIGHTS[r]; they add up to 1, so the sum of the ranks'
# losses is the one-call loss, and the final state's gradient must be gathered from every rank.
FINAL_WEIGHTS = (0.5, 0.25, 0.25)
CASES = [  # backend, dtype, feature_map, normalize, initial state
    ("reference", torch.float64, "identity", False, False),
    ("reference", torch.float64, "elu1", True, True),
    ("reference", torch.float64, "relu", False, True),
    ("triton", torch.float64, "elu1", True, False),
    ("triton", torch.float32, "identity", False, True),
]


def _inputs(dtype, normalize, with_initial, total_tokens):
    """The whole sequence's inputs and loss weights, the same on every rank (seeded)."""
    g = torch.Generator().manual_seed(0)
    B, H, K, V = 2, 2, 5, 7  # odd head dims
    q, k, v = (torch.randn(B, total_tokens, H, d, generator=g, dtype=dtype) for d in (K, K, V))
    state = None
    if with_initial:
        S = torch.randn(B, H, K, V, generator=g, dtype=torch.float64).to(state_dtype(dtype))
        state = (S, torch.rand(B, H, K, generator=g, dtype=S.dtype) + 1) if normalize else S
    weight_o = torch.randn(B, total_tokens, H, V, generator=g, dtype=dtype)
    weight_final = [torch.randn(B, H, K, V, generator=g, dtype=torch.float64),
                    torch.randn(B, H, K, generator=g, dtype=torch.float64)]
    return q, k, v, state, weight_o, weight_final


def _leaves(x):
    if x is None:
        return None
    if isinstance(x, tuple):
        return tuple(_leaves(t) for t in x)
    return x.detach().clone().requires_grad_()


def _flat(x):
    return [] if x is None else list(x) if isinstance(x, tuple) else [x]


def _loss(o, final, weight_o, weight_final, final_weight):
    loss = (o * weight_o).sum()
    for f, w in zip(_flat(final), weight_final):
        loss = loss + final_weight * (f * w.to(f.dtype)).sum()
    return loss


def _check_case(rank, backend, dtype, feature_map, normalize, with_initial):
    begin, end = sum(PIECES[:rank]), sum(PIECES[:rank + 1])
    q, k, v, state, weight_o, weight_final = _inputs(dtype, normalize, with_initial, sum(PIECES))
    options = dict(feature_map=feature_map, normalize=normalize, scale=0.7, output_final_state=True, backend=backend)

    whole = [_leaves(t) for t in (q, k, v)]
    whole_state = _leaves(state)
    o, final = hk.causal_linear_attention(*whole, initial_state=whole_state, **options)
    inputs = whole + _flat(whole_state)
    grads = torch.autograd.grad(_loss(o, final, weight_o, weight_final, 1.0), inputs)

    piece = [_leaves(t[:, begin:end]) for t in (q, k, v)]
    piece_state = _leaves(state) if rank == 0 else None
    o_piece, final_piece = hk.context_parallel_linear_attention(*piece, initial_state=piece_state, **options)
    piece_inputs = piece + _flat(piece_state)
    piece_grads = torch.autograd.grad(
        _loss(o_piece, final_piece, weight_o[:, begin:end], weight_final, FINAL_WEIGHTS[rank]), piece_inputs)

    case = f"rank {rank}, {backend} {dtype} {feature_map} normalize={normalize} initial={with_initial}"
    assert_close(f"o ({case})", o_piece, o[:, begin:end])
    for name, got, want in zip(("final state", "final key sum"), _flat(final_piece), _flat(final)):
        assert_close(f"{name} ({case})", got, want)
    for name, got, want in zip(("dq", "dk", "dv"), piece_grads[:3], grads[:3]):
        assert_close(f"{name} ({case})", got, want[:, begin:end])
    if rank == 0:
        for name, got, want in zip(("d initial state", "d initial key sum"), piece_grads[3:], grads[3:]):
            assert_close(f"{name} ({case})", got, want)


# Packed sequences over ranks: (pieces, cu_seqlens of the whole batch). Sequences that span two ranks across an empty
# one, three ranks, a rank inside one sequence, empty sequences, a rank starting exactly at a boundary, and two
# sequences each spanning two ranks (rank 2's start state must leave out rank 0's piece of the first).
PACKED = [((70, 0, 53), (0, 30, 100, 101, 123)),
          ((40, 30, 53), (0, 10, 10, 90, 123)),
          ((40, 30, 53), (0, 40, 70, 123)),
          ((40, 30, 53), (0, 50, 123))]


def _check_packed(rank, pieces, offsets, backend, dtype, feature_map, normalize):
    begin, end = sum(pieces[:rank]), sum(pieces[:rank + 1])
    q, k, v, _, weight_o, _ = _inputs(dtype, normalize, False, sum(pieces))
    q, k, v, weight_o = (t[:1] for t in (q, k, v, weight_o))
    cu = torch.tensor(offsets, dtype=torch.int32)
    options = dict(feature_map=feature_map, normalize=normalize, scale=0.7)
    whole = [_leaves(t.double()) for t in (q, k, v)]  # the float64 reference of the whole batch: the oracle
    o = hk.causal_linear_attention(*whole, cu_seqlens=cu, backend="reference", **options)
    grads = torch.autograd.grad((o * weight_o.double()).sum(), whole)
    piece = [_leaves(t[:, begin:end]) for t in (q, k, v)]
    o_piece = hk.context_parallel_linear_attention(*piece, cu_seqlens=cu, backend=backend, **options)
    piece_grads = torch.autograd.grad((o_piece * weight_o[:, begin:end]).sum(), piece)
    case = f"rank {rank}, pieces {pieces}, cu_seqlens {offsets}, {backend} {dtype} {feature_map} normalize={normalize}"
    assert_close(f"o ({case})", o_piece, o[:, begin:end])
    for name, got, want in zip(("dq", "dk", "dv"), piece_grads, grads):
        assert_close(f"{name} ({case})", got, want[:, begin:end])


def _check_module(rank):
    """LinearSelfAttention(x_piece, context_parallel_group=...): the rows of the whole sequence's output, and the
    weight gradients summed over the ranks (what data parallel training all-reduces) are the whole sequence's."""
    begin, end = sum(PIECES[:rank]), sum(PIECES[:rank + 1])
    torch.manual_seed(0)
    attn = hk.nn.LinearSelfAttention(12, num_heads=3, feature_map="elu1", normalize=True).double()
    x = torch.randn(2, sum(PIECES), 12, dtype=torch.float64)
    weight = torch.randn_like(x)
    out = attn(x)
    grads = torch.autograd.grad((out * weight).sum(), list(attn.parameters()))
    out_piece = attn(x[:, begin:end], context_parallel_group=dist.group.WORLD)
    piece_grads = torch.autograd.grad((out_piece * weight[:, begin:end]).sum(), list(attn.parameters()))
    assert_close(f"module output (rank {rank})", out_piece, out[:, begin:end])
    for (name, _), got, want in zip(attn.named_parameters(), piece_grads, grads):
        got = got.clone()
        dist.all_reduce(got)
        assert_close(f"d {name} summed over ranks (rank {rank})", got, want)
    cu = torch.tensor([0, 50, 123], dtype=torch.int32)  # packed: two sequences, each spanning two ranks
    out = attn(x[:1], cu_seqlens=cu)
    out_piece = attn(x[:1, begin:end], cu_seqlens=cu, context_parallel_group=dist.group.WORLD)
    assert_close(f"module output, packed (rank {rank})", out_piece, out[:, begin:end])


def _worker(rank, world, init_file):
    # A rank that fails ends the run (spawn stops the others); the timeout bounds a collective left waiting anyway.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        for case in CASES:
            _check_case(rank, *case)
        _check_module(rank)
        for i, (pieces, offsets) in enumerate(PACKED):
            _check_packed(rank, pieces, offsets, "reference", torch.float64, "elu1", i % 2 == 0)
        _check_packed(rank, *PACKED[1], "triton", torch.float32, "relu", True)
        x = torch.zeros(1, PIECES[rank], 1, 4)
        with pytest.raises(NotImplementedError, match="output_final_state"):
            hk.context_parallel_linear_attention(x, x, x, cu_seqlens=torch.tensor([0, 123], dtype=torch.int32),
                                                 output_final_state=True)
        with pytest.raises(ValueError, match="end at T = 123"):  # the whole batch's length, not the piece's
            hk.context_parallel_linear_attention(x, x, x, cu_seqlens=torch.tensor([0, PIECES[rank]], dtype=torch.int32))
        x = torch.zeros(1, 3, 1, 4)
        if rank == 1:  # raises before any collective, so the other ranks do not wait for it
            with pytest.raises(ValueError, match="initial_state.*rank 0 only"):
                hk.context_parallel_linear_attention(x, x, x, initial_state=torch.zeros(1, 1, 4, 4))
        # No rank tears gloo down while another is still in a collective (under load a rank once aborted in it).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_pieces_over_ranks_equal_one_call():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(len(PIECES), os.path.join(tmp, "rendezvous")), nprocs=len(PIECES), join=True)


def test_needs_a_process_group():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    x = torch.zeros(1, 3, 1, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        hk.context_parallel_linear_attention(x, x, x)


def _one_gpu_worker(rank, init_file):
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=1,
                            timeout=datetime.timedelta(seconds=300))
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, 300, 4, 64, device="cuda", generator=g) for _ in range(3))
        cu = torch.tensor([0, 100, 300], dtype=torch.int32, device="cuda")
        for packed in (None, cu):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            o = hk.context_parallel_linear_attention(*leaves, feature_map="elu1", normalize=True, cu_seqlens=packed)
            grads = torch.autograd.grad(o.sum(), leaves)
            ref = [t.double().cpu().requires_grad_() for t in (q, k, v)]
            o_ref = hk.causal_linear_attention(*ref, feature_map="elu1", normalize=True,
                                               cu_seqlens=None if packed is None else packed.cpu())
            grads_ref = torch.autograd.grad(o_ref.sum(), ref)
            assert_close(f"o (packed={packed is not None})", o, o_ref)
            for name, got, want in zip(("dq", "dk", "dv"), grads, grads_ref):
                assert_close(f"{name} (packed={packed is not None})", got, want)
    finally:
        dist.destroy_process_group()


@cuda
@requires_cuda
def test_one_rank_over_nccl_on_a_gpu():
    """The exchange on CUDA tensors over NCCL (one rank: one GPU), against the float64 reference."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_one_gpu_worker, args=(os.path.join(tmp, "rendezvous"),), nprocs=1, join=True)
