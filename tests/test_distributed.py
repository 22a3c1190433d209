"""Data parallel training with the modules (custom ops inside): DistributedDataParallel and FSDP2 (`fully_shard`)
over 2 gloo CPU processes give the gradients of one process on the whole batch."""

from __future__ import annotations

import datetime
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from utils import assert_close

import hadamard_kernels as hk

WORLD = 2


def _model() -> nn.Module:
    torch.manual_seed(0)  # the same parameters in every process
    return nn.Sequential(hk.nn.LinearSelfAttention(8, num_heads=2, feature_map="elu1", normalize=True),
                         hk.nn.PolySA(8), hk.nn.PolyChain(8, 8, 3)).double()


def _batch() -> torch.Tensor:
    return torch.randn(2 * WORLD, 11, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _reference_grads() -> dict[str, torch.Tensor]:
    """One process, the whole batch: the gradients of the mean loss."""
    model = _model()
    model(_batch()).square().mean().backward()
    return {name: p.grad for name, p in model.named_parameters()}


def _worker(rank, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=300))
    try:
        expected = _reference_grads()
        local = _batch().chunk(WORLD)[rank]  # each rank's loss is the mean over its equal share of the batch

        ddp = nn.parallel.DistributedDataParallel(_model())
        ddp(local).square().mean().backward()
        for name, p in ddp.module.named_parameters():
            assert_close(f"DDP d{name} (rank {rank})", p.grad, expected[name])

        from torch.distributed.fsdp import fully_shard

        sharded = _model()
        for layer in sharded:
            fully_shard(layer)
        fully_shard(sharded)
        sharded(local).square().mean().backward()
        for name, p in sharded.named_parameters():
            assert_close(f"FSDP2 d{name} (rank {rank})", p.grad.full_tensor(), expected[name])
        dist.barrier()  # no rank tears gloo down while another is still in a collective
    finally:
        dist.destroy_process_group()


def test_ddp_and_fsdp2_match_one_process():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "rendezvous"),), nprocs=WORLD, join=True)
