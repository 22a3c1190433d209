"""The CPU emulation's cp.async (tests/emulation/cuda_emulation.h, csrc/include/hadamard_kernels/cp_async.h): a copy
lands only when a wait_group covers its group, zero-fill writes zeros, and the destination reads as NaN until then,
so kernel tests on the emulation catch a pipeline that reads a stage before waiting for it."""

from __future__ import annotations

import emulated_kernels
import pytest
import torch


@pytest.fixture(scope="module")
def probe():
    return emulated_kernels.build("hk_cp_async_emulated", "cp_async_module.cpp", [], flags=("-Werror",))


def test_cp_async_lands_at_its_wait(probe):
    threads, steps = probe.THREADS, probe.STEPS
    src = torch.arange(2 * threads * 4, dtype=torch.float32).view(2, threads, 4) + 1
    out = torch.full((steps, 2, threads, 4), -1.0)
    probe.probe(src.data_ptr(), out.data_ptr())
    poison = torch.full((threads, 4), float("nan"))
    group1 = src[1].clone()
    group1[1::2] = 0  # odd threads zero-filled (src-size 0)
    expected = [
        (poison, torch.full((threads, 4), 7.0)),  # issued: its slot is poisoned, the other still holds the old data
        (poison, poison),  # committed, not waited for
        (poison, poison),  # wait_group 2: both groups may still be in flight
        (src[0], poison),  # wait_group 1: the older group landed
        (src[0], group1),  # wait_group 0: everything
        (src[0].roll(-1, 0), group1.roll(-1, 0)),  # thread t + 1's copies, seen after __syncthreads
    ]
    for step, slots in enumerate(expected):
        for s, want in enumerate(slots):
            torch.testing.assert_close(out[step, s], want, equal_nan=True, rtol=0, atol=0,
                                       msg=lambda m, step=step, s=s: f"step {step}, slot {s}: {m}")
