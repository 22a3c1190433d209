"""The CUDA poly_chain forward (csrc/poly_chain_forward.cuh) on the CPU emulation, through the launcher, in the cases
its tiling has that the backend tests (tests/test_poly_chain_cuda.py) do not reach: N > 8 (several passes over d with
the partial product carried), N = 1 and 8 (the slot layout's extremes), more than one band of row tiles and several
column tiles (the L2 swizzle), d of more chunks than pipeline stages with a ragged last chunk (the cp.async zero-fill
bound), x or W not 16-byte aligned (the synchronous loads), row-padded x and y, and the optional z output. Every
tensor sits in a guard buffer: a copy past a row or a store past a tile fails. With the emulation's cp.async (a copy
lands only at the wait that covers it, its destination NaN until then), a pipeline that reads a stage early fails."""

from __future__ import annotations

import math

import emulated_kernels
import pytest
import torch
from guard import assert_guard_untouched, check_guards, guard_buffer, guarded_copy
from utils import assert_close

from hadamard_kernels.ops.poly_chain import reference
from hadamard_kernels.ops.poly_chain.common import ACTIVATIONS, MODES


@pytest.fixture(scope="module")
def ext():
    return emulated_kernels.build("hk_poly_chain_emulated", "poly_chain_module.cpp",
                                  sorted(emulated_kernels.CSRC.glob("poly_chain*")), flags=("-Werror",))


def run_forward(ext, M, d, k, N, dtype, *, mode="ccp", activation="tanh", scale=0.7, bias=True, row_pad=0,
                x_shift=0, store_z=True, seed=0, wgmma=False):
    """The forward launcher (the Hopper kernel with `wgmma`) on guarded inputs (x with row_pad + x_shift padding
    columns and x_shift elements off its buffer's alignment), y and z checked against the float64 reference."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, d, generator=g, dtype=torch.float64)
    weight = torch.randn(N, k, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    b = 0.5 * torch.randn(N, k, generator=g, dtype=torch.float64) if bias else None
    inputs = [None if t is None else t.to(dtype) for t in (x, weight, b)]
    gx = guarded_copy(inputs[0], name="x", row_pad=row_pad + x_shift, pad=1024 + x_shift)
    gw = guarded_copy(inputs[1], name="weight")
    gb = guarded_copy(inputs[2], name="bias") if bias else None
    y = guard_buffer((M, k), dtype, name="y", row_pad=row_pad)
    z = guard_buffer((M, N, k), dtype, name="z") if store_z else None
    params = ext.PolyChainParams(
        x=gx.view.data_ptr(), weight=gw.view.data_ptr(), bias=gb.view.data_ptr() if bias else 0,
        y=y.view.data_ptr(), z=z.view.data_ptr() if store_z else 0, M=M, d=d, k=k, N=N,
        x_row_stride=d + row_pad + x_shift, y_row_stride=k + row_pad,
        dtype=ext.DTYPES.index(str(dtype).removeprefix("torch.")), activation=ACTIVATIONS.index(activation),
        mode=MODES.index(mode), scale=scale, wgmma=wgmma)
    ext.poly_chain_fwd(params, 0)
    check_guards(y, *([z] if store_z else []))
    for guard in (gx, gw, gb):
        if guard is not None:
            assert_guard_untouched(guard, f"input {guard.name}")
    wide = [None if t is None else t.double() for t in inputs]
    assert_close("y", y.view, reference.forward(*wide, mode, activation, scale), dtype)
    if store_z:
        ref_z = torch.stack([wide[0] @ wide[1][n].T + (wide[2][n] if bias else 0) for n in range(N)], 1)
        assert_close("z", z.view, ref_z, dtype)


CASES = [
    # d 200: 7 chunks of 32 halves (13 of 16 floats), more than the 4 stages, the last ragged; 2 row tiles
    dict(M=130, d=200, k=40, N=5, row_pad=8),
    dict(M=20, d=72, k=33, N=9),                                   # 2 passes of 5 degrees, the last with 4
    dict(M=9, d=40, k=21, N=17, scale=0.3, store_z=False),         # 3 passes of 6 (the last 5)
    dict(M=20, d=40, k=150, N=1, activation="sigmoid"),            # 8 runs per warp: 128 columns, 2 column tiles
    dict(M=7, d=64, k=50, N=8, mode="product", scale=1.3),        # one run of 8 degrees per warp, 4 column tiles
    dict(M=1100, d=16, k=150, N=2, bias=False),                    # 9 row tiles: a full band of 8 and a band of 1
    dict(M=20, d=32, k=16, N=3, x_shift=1, activation="gelu"),     # x unaligned: x synchronous, W by cp.async
    dict(M=67, d=45, k=23, N=3, row_pad=3, activation="relu"),     # d odd: x and W both synchronous
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_forward_tiling_cases(ext, case, dtype):
    run_forward(ext, **case, dtype=dtype)


# The Hopper kernel (csrc/poly_chain_forward_wgmma.cuh): 128-row x 256-slot tiles, up to 32 degrees in a pass, d in
# chunks of 64 through 4 stages refilled 2 steps ahead, persistent blocks (3 on the emulation) whose loads run on
# into their next tile; the emulation performs each wgmma at the wait that covers it, reading shared memory through
# the descriptor and its 128-byte swizzle then.
WGMMA_CASES = [
    # d 300: 5 chunks, more than the stages, the last ragged; 2 row tiles
    dict(M=130, d=300, k=40, N=5, row_pad=8),
    dict(M=20, d=72, k=9, N=33, scale=0.3),                        # 2 passes of 17 degrees, the last with 16
    dict(M=9, d=40, k=20, N=32, mode="product", scale=1.2),       # one run of all 32 n-tiles per block
    dict(M=20, d=64, k=170, N=3, activation="sigmoid"),            # 30 of 32 n-tiles used: 80 columns, 3 column tiles
    dict(M=5, d=24, k=300, N=1, store_z=False, activation="identity"),  # 32 runs: 256 columns, 2 column tiles
    dict(M=1100, d=16, k=24, N=2, bias=False),                     # 9 row tiles: a band of 8 and a band of 1
    # 7 tiles of 2 passes x 2 chunks on the emulation's 3 blocks (3, 2, 2 each): the next tile's first steps load
    # during the previous tile's last MMAs and epilogue
    dict(M=800, d=72, k=9, N=33, scale=0.3, row_pad=5),
    dict(M=20, d=32, k=16, N=3, x_shift=1, activation="gelu"),     # x unaligned: x synchronous, W by cp.async
    dict(M=67, d=45, k=23, N=4, row_pad=3, activation="relu"),     # d odd: x and W both synchronous
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", WGMMA_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_wgmma_forward_tiling_cases(ext, case, dtype):
    run_forward(ext, **case, dtype=dtype, wgmma=True)


def test_wgmma_forward_refuses_float32(ext):
    with pytest.raises(RuntimeError, match="CUDA error 1"):  # cudaErrorInvalidValue
        run_forward(ext, M=4, d=8, k=8, N=2, dtype=torch.float32, wgmma=True)


@pytest.mark.parametrize("wgmma", [False, True], ids=["mma_sync", "wgmma"])
def test_forward_nan_stays_in_its_row(ext, wgmma):
    """A NaN in one row of x is a NaN in every output of that row and nowhere else (the projections and the chain
    keep it; no other row reads it), in both forward kernels."""
    M, d, k, N = 40, 72, 24, 3
    g = torch.Generator().manual_seed(3)
    x = torch.randn(M, d, generator=g).to(torch.bfloat16)
    weight = (torch.randn(N, k, d, generator=g) / math.sqrt(d)).to(torch.bfloat16)
    x[17, 5] = float("nan")
    y = torch.empty(M, k, dtype=torch.bfloat16)
    params = ext.PolyChainParams(
        x=x.data_ptr(), weight=weight.data_ptr(), bias=0, y=y.data_ptr(), z=0, M=M, d=d, k=k, N=N, x_row_stride=d,
        y_row_stride=k, dtype=ext.DTYPES.index("bfloat16"), activation=ACTIVATIONS.index("tanh"),
        mode=MODES.index("ccp"), scale=0.7, wgmma=wgmma)
    ext.poly_chain_fwd(params, 0)
    assert y[17].isnan().all(), "the NaN row"
    others = torch.cat([y[:17], y[18:]])
    assert not others.isnan().any(), "a NaN leaked into another row"
    keep = torch.ones(M, dtype=torch.bool)
    keep[17] = False
    ref = reference.forward(x[keep].double(), weight.double(), None, "ccp", "tanh", 0.7)
    assert_close("y", others, ref, torch.bfloat16)
