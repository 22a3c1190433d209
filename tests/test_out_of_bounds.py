"""Every raw Triton kernel, on every tile path, with sizes that leave ragged tiles, writes only inside its outputs.

The launchers allocate their outputs, and under the interpreter a store past a tile is overwritten later by the
program that owns that memory; so each kernel is launched here directly (grid and arguments copied from its
launcher: the one `launch_*` function per kernel below) into guard buffers (tests/guard.py): sentinels before and
after every output and, where the kernel takes a row stride, after every row. Inputs sit in NaN guards too, so an
unmasked load shows up as NaN in the values, which are checked against the reference.

A new kernel needs a `launch_*` function returning a `Launch` and its entries in CASES (and a plant in PLANTS).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
import triton
import triton.language as tl
from guard import Guard, assert_guard_untouched, check_guards, guard_buffer, guarded_copy, planted, raw_kernel
from utils import assert_close, cpu_backends

from hadamard_kernels.ops._projections import projection_grads
from hadamard_kernels.ops.lrnn import reference as lrnn_reference
from hadamard_kernels.ops.lrnn import triton as lrnn_triton
from hadamard_kernels.ops.poly_chain import reference as chain_reference
from hadamard_kernels.ops.poly_chain import triton as chain_triton
from hadamard_kernels.ops.poly_gate import common as gate_common
from hadamard_kernels.ops.poly_gate import reference as gate_reference
from hadamard_kernels.ops.poly_gate import triton as gate_triton
from hadamard_kernels.ops.poly_ncp import common as ncp_common
from hadamard_kernels.ops.poly_ncp import reference as ncp_reference
from hadamard_kernels.ops.poly_ncp import triton as ncp_triton
from hadamard_kernels.ops.poly_sa import reference as sa_reference
from hadamard_kernels.ops.poly_sa import triton as sa_triton

pytestmark = pytest.mark.skipif("triton" not in cpu_backends(), reason="needs the Triton interpreter "
                                "(TRITON_INTERPRET=1, set by conftest.py on a machine without a GPU)")

ROW_PAD = 3  # sentinel columns after each row of a row-strided tensor
# Row counts, input and output features that no tile size divides.
M, D, K = 37, 45, 39


class Launch(NamedTuple):
    outputs: list[Guard]  # must be fully written, their guards untouched
    inputs: list[Guard]  # their guards must stay untouched too
    check_values: Callable[[], None]  # outputs against the float64 reference


def randn(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


# ---------------------------------------------------------------- poly_chain
def chain_inputs(N, dtype, bias=True, seed=0):
    x = randn(M, D, dtype=dtype, seed=seed)
    weight = randn(N, K, D, dtype=dtype, seed=seed + 1, scale=1 / math.sqrt(D))
    b = randn(N, K, dtype=dtype, seed=seed + 2, scale=0.5) if bias else None
    return x, weight, b


def launch_chain_fwd(config, N, mode="ccp", activation="tanh", scale=0.7, bias=True, dtype=torch.float64,
                     kernel=None, store_z=False):
    """poly_chain.triton.forward with one explicit tile config, into a row-padded y (and z [M, N, K] with store_z)."""
    kernel = kernel or raw_kernel(chain_triton._poly_chain_fwd_kernel)
    x, weight, bias = chain_inputs(N, dtype, bias)
    flags = chain_triton._flags(x, bias, mode, activation)
    # x and y row-padded (the kernel takes their row strides); weight and bias are indexed as contiguous.
    gx, gw = guarded_copy(x, name="x", row_pad=ROW_PAD), guarded_copy(weight, name="weight")
    gb = guarded_copy(bias, name="bias") if bias is not None else None
    y = guard_buffer((M, K), dtype, name=f"poly_chain fwd y {config}", row_pad=ROW_PAD)
    z = guard_buffer((M, N, K), dtype, name=f"poly_chain fwd z {config}") if store_z else None
    NP = triton.next_power_of_2(N)
    columns = config["BC"] // NP if config["GROUPED"] else config["BC"]
    grid = (triton.cdiv(M, config["BM"]) * triton.cdiv(K, columns),)
    kernel[grid](gx.view, gw.view, (gb or gx).view, y.view, (z or y).view, M, D, K, N, scale, gx.view.stride(0),
                 y.view.stride(0), STORE_Z=store_z, NP=NP, **flags, **config)

    def check_values():
        ref = chain_reference.forward(*(None if t is None else t.double() for t in (x, weight, bias)), mode,
                                      activation, scale, save_projections=store_z)
        assert_close(y.name, y.view, ref[0] if store_z else ref, dtype)
        if store_z:
            assert_close(z.name, z.view, ref[1], dtype)

    return Launch([y] + ([z] if z else []), [g for g in (gx, gw, gb) if g], check_values)


def launch_chain_grad_z(BR, N, mode="ccp", activation="gelu", scale=0.7, bias=True, dtype=torch.float64,
                        kernel=None):
    """poly_chain.triton.backward's grad_z kernel with block size BR; the values are checked through the gradients
    the launcher forms from grad_z."""
    kernel = kernel or raw_kernel(chain_triton._poly_chain_grad_z_kernel)
    x, weight, bias = chain_inputs(N, dtype, bias)
    gy = randn(M, K, dtype=dtype, seed=3)
    flags = chain_triton._flags(x, bias, mode, activation)
    # The kernel indexes z (bias included) as contiguous [M, N, K].
    z = guarded_copy(x @ weight.view(N * K, D).T + (0 if bias is None else bias.view(N * K)), name="z")
    g = guarded_copy(gy, name="grad_y")  # no row stride argument: contiguous
    grad_z = guard_buffer((M, N, K), dtype, name=f"poly_chain grad_z BR={BR}")
    kernel[(triton.cdiv(M * K, BR),)](
        z.view, g.view, grad_z.view, M * K, K, N, scale, MODE=flags["MODE"], ACT=flags["ACT"], ACC=flags["ACC"],
        NP=triton.next_power_of_2(N), BR=BR)

    def check_values():
        needs = (True, True, bias is not None)
        grads = projection_grads(grad_z.view, x, weight, bias is not None, needs)
        ref = chain_reference.backward(gy.double(), x.double(), weight.double(),
                                       None if bias is None else bias.double(), mode, activation, scale, needs)
        for name, out, expected in zip(("dx", "dweight", "dbias"), grads, ref):
            if expected is not None:
                assert_close(f"{grad_z.name} -> {name}", out, expected, dtype)

    return Launch([grad_z], [z, g], check_values)


# ---------------------------------------------------------------- poly_ncp
def ncp_inputs(N, K, dtype, bias=True, seed=0):
    x = randn(M, D, dtype=dtype, seed=seed)
    a_weight = randn(N, K, D, dtype=dtype, seed=seed + 1, scale=1 / math.sqrt(D))
    s_weight = randn(N - 1, K, K, dtype=dtype, seed=seed + 2, scale=1 / math.sqrt(K))
    a_bias = randn(N, K, dtype=dtype, seed=seed + 3, scale=0.5) if bias else None
    s_bias = randn(N - 1, K, dtype=dtype, seed=seed + 4, scale=0.5) if bias else None
    return x, a_weight, a_bias, s_weight, s_bias


def _ncp_operands(inputs):
    """The launcher's weight operands (a dummy pointer for an absent or empty tensor), each in a NaN guard."""
    operands, (_, K, N), flags = ncp_triton._launch_args(*inputs)
    names = ("a_weight", "a_bias", "s_weight", "s_bias")
    return [guarded_copy(t, name=name) for name, t in zip(names, operands)], K, N, flags


def launch_ncp_fwd(BM, BD, N, K=K, bias=True, dtype=torch.float64, kernel=None):
    """poly_ncp.triton.forward with explicit BM, BD (KP = next power of 2 of K, at least 16), into a row-padded y."""
    kernel = kernel or raw_kernel(ncp_triton._poly_ncp_fwd_kernel)
    inputs = ncp_inputs(N, K, dtype, bias)
    operands, K, N, flags = _ncp_operands(inputs)
    x = guarded_copy(inputs[0], name="x", row_pad=ROW_PAD)
    y = guard_buffer((M, K), dtype, name=f"poly_ncp fwd y BM={BM} BD={BD} KP={flags['KP']}", row_pad=ROW_PAD)
    kernel[(triton.cdiv(M, BM),)](x.view, *(g.view for g in operands), y.view, M, D, K, N, x.view.stride(0),
                                  y.view.stride(0), **flags, BM=BM, BD=BD)

    def check_values():
        ref = ncp_reference.forward(*(None if t is None else t.double() for t in inputs))
        assert_close(y.name, y.view, ref, dtype)

    return Launch([y], [x, *operands], check_values)


def launch_ncp_bwd(BM, BD, N, K=K, bias=True, dtype=torch.float64, kernel=None):
    """poly_ncp.triton.backward's kernel with explicit BM, BD: grad_a, grad_s, ys guarded (the kernel indexes them
    as contiguous), grad_y row-padded; the values are checked through the gradients the launcher forms."""
    kernel = kernel or raw_kernel(ncp_triton._poly_ncp_bwd_kernel)
    inputs = ncp_inputs(N, K, dtype, bias)
    gy = randn(M, K, dtype=dtype, seed=5)
    operands, K, N, flags = _ncp_operands(inputs)
    outputs, guarded = [], list(operands)

    def chain_grads(x2d, grad_y):  # the launcher's chain_grads with guarded tensors
        rows = x2d.shape[0]
        x, g = guarded_copy(x2d, name="x", row_pad=ROW_PAD), guarded_copy(grad_y, name="grad_y", row_pad=ROW_PAD)
        tag = f"BM={BM} BD={BD} KP={flags['KP']}"
        grad_a = guard_buffer((rows, N, K), dtype, name=f"poly_ncp bwd grad_a {tag}")
        grad_s = guard_buffer((N - 1, rows, K), dtype, name=f"poly_ncp bwd grad_s {tag}")
        ys = guard_buffer((N - 1, rows, K), dtype, name=f"poly_ncp bwd ys {tag}")
        kernel[(triton.cdiv(rows, BM),)](x.view, *(o.view for o in operands), g.view, grad_a.view, grad_s.view,
                                         ys.view, rows, D, K, N, x.view.stride(0), g.view.stride(0), **flags,
                                         BM=BM, BD=BD)
        outputs.extend([grad_a, grad_s, ys])
        guarded.extend([x, g])
        return grad_a.view, grad_s.view, ys.view

    needs = (True, True, bias, N > 1, bias and N > 1)
    grads = ncp_common.backward_in_row_chunks(chain_grads, gy, *inputs, needs)

    def check_values():
        ref = ncp_reference.backward(gy.double(), *(None if t is None else t.double() for t in inputs), needs)
        for name, out, expected in zip(("dx", "da_weight", "da_bias", "ds_weight", "ds_bias"), grads, ref):
            if expected is not None:
                assert_close(f"poly_ncp bwd -> {name}", out, expected, dtype)

    return Launch(outputs, guarded, check_values)


def _ncp_wide_degree(dtype, seed=0):
    """One degree's operands for the wide kernels: x [M, D], A [K, D], a [K], S [K, K], s [K] and an [M, K] input
    (y_{n-1}), each in a NaN guard (x and the [M, K] input row-padded)."""
    t = dict(x=randn(M, D, dtype=dtype, seed=seed), aw=randn(K, D, dtype=dtype, seed=seed + 1, scale=1 / math.sqrt(D)),
             ab=randn(K, dtype=dtype, seed=seed + 2, scale=0.5), sw=randn(K, K, dtype=dtype, seed=seed + 3,
                                                                            scale=1 / math.sqrt(K)),
             sb=randn(K, dtype=dtype, seed=seed + 4, scale=0.5), prev=randn(M, K, dtype=dtype, seed=seed + 5))
    guards = {name: guarded_copy(v, name=name, row_pad=ROW_PAD if name in ("x", "prev") else 0)
              for name, v in t.items()}
    return t, guards


def _ncp_wide_flags(dtype, bias, prev):
    return dict(HAS_A_BIAS=bias, HAS_S_BIAS=bias and prev, IEEE=dtype == torch.float32,
                ACC=tl.float64 if dtype == torch.float64 else tl.float32)


def _ncp_wide_a_s(t, bias):
    """a = x A^T (+ a) and s = prev S^T (+ s) in float64."""
    d = {k: v.double() for k, v in t.items()}
    return d["x"] @ d["aw"].T + (d["ab"] if bias else 0), d["prev"] @ d["sw"].T + (d["sb"] if bias else 0)


def launch_ncp_wide_fwd(BM, BN, BK, prev=True, bias=True, dtype=torch.float64, kernel=None):
    """poly_ncp.triton's wide forward kernel (one degree) with an explicit tile, into a row-padded y."""
    kernel = kernel or raw_kernel(ncp_triton._poly_ncp_wide_fwd_kernel)
    t, g = _ncp_wide_degree(dtype)
    y = guard_buffer((M, K), dtype, name=f"poly_ncp wide fwd y BM={BM} BN={BN} BK={BK}", row_pad=ROW_PAD)
    kernel[(triton.cdiv(M, BM) * triton.cdiv(K, BN),)](
        g["x"].view, g["aw"].view, g["ab"].view, g["sw"].view, g["sb"].view, g["prev"].view, y.view, M, D, K,
        g["x"].view.stride(0), g["prev"].view.stride(0), y.view.stride(0), HAS_PREV=prev,
        **_ncp_wide_flags(dtype, bias, prev), BM=BM, BN=BN, BK=BK)

    def check_values():
        a, s_ = _ncp_wide_a_s(t, bias)
        assert_close(y.name, y.view, a * s_ if prev else a, dtype)

    return Launch([y], list(g.values()), check_values)


def launch_ncp_wide_bwd(BM, BN, BK, from_y=False, prev=True, bias=True, dtype=torch.float64, kernel=None):
    """poly_ncp.triton's wide backward kernel (one degree) with an explicit tile: g [M, K] (grad_y, or grad_s of the
    next degree times gw [K, K]) row-padded; ga, gs row-padded guards."""
    kernel = kernel or raw_kernel(ncp_triton._poly_ncp_wide_bwd_kernel)
    t, g = _ncp_wide_degree(dtype)
    g_in = randn(M, K, dtype=dtype, seed=7)
    gw = randn(K, K, dtype=dtype, seed=8, scale=1 / math.sqrt(K))
    g["g"], g["gw"] = guarded_copy(g_in, name="g", row_pad=ROW_PAD), guarded_copy(gw, name="gw")
    tag = f"BM={BM} BN={BN} BK={BK} from_y={from_y} prev={prev}"
    ga = guard_buffer((M, K), dtype, name=f"poly_ncp wide bwd ga {tag}", row_pad=ROW_PAD)
    gs = guard_buffer((M, K), dtype, name=f"poly_ncp wide bwd gs {tag}", row_pad=ROW_PAD)
    kernel[(triton.cdiv(M, BM) * triton.cdiv(K, BN),)](
        g["x"].view, g["aw"].view, g["ab"].view, g["sw"].view, g["sb"].view, g["prev"].view, g["g"].view,
        g["gw"].view, ga.view, gs.view, M, D, K, g["x"].view.stride(0), g["prev"].view.stride(0),
        g["g"].view.stride(0), ga.view.stride(0), gs.view.stride(0), G_FROM_Y=from_y, HAS_PREV=prev,
        **_ncp_wide_flags(dtype, bias, prev), BM=BM, BN=BN, BK=BK)

    def check_values():
        grad = g_in.double() if from_y else g_in.double() @ gw.double()
        a, s_ = _ncp_wide_a_s(t, bias)
        assert_close(ga.name, ga.view, grad * s_ if prev else grad, dtype)
        if prev:
            assert_close(gs.name, gs.view, grad * a, dtype)

    # Without prev (degree 1) gs is not written.
    return Launch([ga, gs] if prev else [ga], list(g.values()), check_values)


# ---------------------------------------------------------------- poly_gate
def gate_inputs(shape, dtype, seed=0):
    C = shape[-1]
    return [randn(*shape, dtype=dtype, seed=seed), randn(*shape, dtype=dtype, seed=seed + 1),
            1 + randn(C, dtype=dtype, seed=seed + 2, scale=0.3), randn(C, dtype=dtype, seed=seed + 3, scale=0.2),
            1 + randn(C, dtype=dtype, seed=seed + 4, scale=0.3), randn(C, dtype=dtype, seed=seed + 5, scale=0.2),
            randn(C, dtype=dtype, seed=seed + 6, scale=0.5)]


def _gate_operands(inputs):
    """a and b as row-padded [M, C] guards (the kernels take their row strides), the parameters in NaN guards."""
    C = inputs[0].shape[-1]
    rows = [guarded_copy(t.reshape(-1, C), name=name, row_pad=ROW_PAD) for name, t in zip("ab", inputs[:2])]
    names = ("ln1_weight", "ln1_bias", "ln2_weight", "ln2_bias", "alpha")
    return rows, [guarded_copy(t, name=name) for name, t in zip(names, inputs[2:])]


def _gate_dims(shape, spatial):
    return (shape[1], shape[2]) if spatial else (1, 1)


def launch_gate_fwd(BM, shape, spatial, dtype=torch.float64, kernel=None, BC=None):
    """poly_gate.triton's forward with BM rows per program, into a row-padded y: the whole-row kernel, or with BC
    the wide kernel (rows in chunks of BC channels)."""
    wide = BC is not None
    kernel = kernel or raw_kernel(gate_triton._poly_gate_wide_fwd_kernel if wide else gate_triton._poly_gate_fwd_kernel)
    inputs = gate_inputs(shape, dtype)
    (a, b), params = _gate_operands(inputs)
    M, C = a.view.shape
    name = f"poly_gate {'wide ' if wide else ''}fwd y BM={BM}{f' BC={BC}' if wide else ''} spatial={spatial}"
    y = guard_buffer((M, C), dtype, name=name, row_pad=ROW_PAD)
    kernel[(triton.cdiv(M, BM),)](
        a.view, b.view, *(g.view for g in params), y.view, M, C, *_gate_dims(shape, spatial),
        *gate_common.shift_groups(C), a.view.stride(0), b.view.stride(0), y.view.stride(0), 1, 1e-6,
        SPATIAL=spatial, HAS_ALPHA=True, ACC=gate_triton._acc(dtype), BM=BM, BC=BC or triton.next_power_of_2(C))

    def check_values():
        ref = gate_reference.forward(*(t.double() for t in inputs), 1e-6, spatial)
        assert_close(y.name, y.view, ref.reshape(M, C), dtype)

    return Launch([y], [a, b, *params], check_values)


def launch_gate_bwd(TW, TH, programs, shape, spatial, dtype=torch.float64, kernel=None):
    """poly_gate.triton.backward's kernel with a [TW, TH]-row tiling and `programs` persistent programs: da, db
    row-padded, the partial sums guarded; the values are checked through the gradients the launcher forms."""
    kernel = kernel or raw_kernel(gate_triton._poly_gate_bwd_kernel)
    inputs = gate_inputs(shape, dtype)
    gy = randn(*shape, dtype=dtype, seed=9)
    (a, b), params = _gate_operands(inputs)
    g = guarded_copy(gy.reshape(a.view.shape), name="grad_y", row_pad=ROW_PAD)
    M, C = a.view.shape
    config = dict(TW=TW, TH=TH, BC=triton.next_power_of_2(C))
    dims = _gate_dims(shape, spatial)
    n_tiles, tiles_w, tiles_h = gate_triton.tile_counts(M, C, dims if spatial else None, config)
    tag = f"TW={TW} TH={TH} programs={programs} spatial={spatial}"
    da = guard_buffer((M, C), dtype, name=f"poly_gate bwd da {tag}", row_pad=ROW_PAD)
    db = guard_buffer((M, C), dtype, name=f"poly_gate bwd db {tag}", row_pad=ROW_PAD)
    part = guard_buffer((5, programs, C), torch.float64 if dtype == torch.float64 else torch.float32,
                        name=f"poly_gate bwd partial sums {tag}")
    kernel[(programs,)](
        a.view, b.view, g.view, *(t.view for t in params), da.view, db.view, part.view, M, C, *dims,
        *gate_common.shift_groups(C), n_tiles, tiles_w, tiles_h, a.view.stride(0), b.view.stride(0),
        g.view.stride(0), da.view.stride(0), db.view.stride(0), 1, 1e-6, SPATIAL=spatial, HAS_ALPHA=True,
        ACC=gate_triton._acc(dtype), **config)

    def check_values():
        ref = gate_reference.backward(gy.double(), *(t.double() for t in inputs), 1e-6, spatial, [True] * 7)
        got = [da.view.reshape(shape), db.view.reshape(shape),
               *gate_common.reduce_param_grads(part.view, inputs[6], [True] * 5, [dtype] * 5)]
        for name, out, expected in zip(("da", "db", "dln1_weight", "dln1_bias", "dln2_weight", "dln2_bias",
                                        "dalpha"), got, ref):
            assert_close(f"poly_gate bwd -> {name}", out, expected, dtype)

    return Launch([da, db, part], [a, b, g, *params], check_values)


def launch_gate_wide_bwd(BM, BC, programs, shape, spatial, dtype=torch.float64, kernel=None):
    """poly_gate.triton's wide backward kernel: da (the shifted input's gradient with the shift, in the accumulation
    dtype, as the launcher allocates it) and db row-padded, the partial sums guarded (zeroed first)."""
    kernel = kernel or raw_kernel(gate_triton._poly_gate_wide_bwd_kernel)
    inputs = gate_inputs(shape, dtype)
    gy = randn(*shape, dtype=dtype, seed=9)
    (a, b), params = _gate_operands(inputs)
    g = guarded_copy(gy.reshape(a.view.shape), name="grad_y", row_pad=ROW_PAD)
    M, C = a.view.shape
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tag = f"BM={BM} BC={BC} programs={programs} spatial={spatial}"
    da = guard_buffer((M, C), acc if spatial else dtype, name=f"poly_gate wide bwd da {tag}", row_pad=ROW_PAD)
    db = guard_buffer((M, C), dtype, name=f"poly_gate wide bwd db {tag}", row_pad=ROW_PAD)
    part = guard_buffer((5, programs, C), acc, name=f"poly_gate wide bwd partial sums {tag}")
    part.view.zero_()
    kernel[(programs,)](
        a.view, b.view, g.view, *(t.view for t in params), da.view, db.view, part.view, M, C,
        *_gate_dims(shape, spatial), *gate_common.shift_groups(C), triton.cdiv(M, BM), a.view.stride(0),
        b.view.stride(0), g.view.stride(0), da.view.stride(0), db.view.stride(0), 1, 1e-6, SPATIAL=spatial,
        HAS_ALPHA=True, ACC=gate_triton._acc(dtype), BM=BM, BC=BC)

    def check_values():
        ref = gate_reference.backward(gy.double(), *(t.double() for t in inputs), 1e-6, spatial, [True] * 7)
        d_a = gate_common.spatial_shift_adjoint(da.view.reshape(shape)) if spatial else da.view.reshape(shape)
        got = [d_a, db.view.reshape(shape),
               *gate_common.reduce_param_grads(part.view, inputs[6], [True] * 5, [dtype] * 5)]
        for name, out, expected in zip(("da", "db", "dln1_weight", "dln1_bias", "dln2_weight", "dln2_bias",
                                        "dalpha"), got, ref):
            assert_close(f"poly_gate wide bwd -> {name}", out, expected, dtype)

    return Launch([da, db, part], [a, b, g, *params], check_values)


# ---------------------------------------------------------------- poly_sa
# B batch rows of SA_N tokens and SA_C channels: 16-token splits leave a ragged last split, 16-wide tiles 3 column
# blocks (the last ragged) and 3 contraction chunks.
SA_B, SA_N, SA_C = 2, 37, 45


def sa_inputs(dtype, seed=0):
    """z [B*N, C] rows, w1, w2, w3, alpha, beta, a ragged mask [B*N] (row 1 has 20 real tokens) and grad_y."""
    rows = SA_B * SA_N
    ws = [randn(SA_C, SA_C, dtype=dtype, seed=seed + 1 + i, scale=1 / math.sqrt(SA_C)) for i in range(3)]
    mask = (torch.arange(SA_N)[None, :] < torch.tensor([SA_N, 20])[:, None]).reshape(-1)
    return dict(z=randn(rows, SA_C, dtype=dtype, seed=seed), w1=ws[0], w2=ws[1], w3=ws[2],
                alpha=randn(1, dtype=dtype, seed=seed + 4), beta=randn(1, dtype=dtype, seed=seed + 5), mask=mask,
                g=randn(rows, SA_C, dtype=dtype, seed=seed + 6))


def _sa_flags(dtype):
    return sa_triton._flags(dtype)


def _sa_reference_m(t, masked):
    """m [B, C] in float64 from the float64 reference."""
    z = t["z"].double().view(SA_B, SA_N, SA_C)
    mask = t["mask"].view(SA_B, SA_N) if masked else None
    return sa_reference.pool_forward(z, t["w1"].double(), t["w2"].double(), mask)


def _sa_acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def launch_sa_pool(BT, BJ, BK, tokens_per_split, masked=True, dtype=torch.float64, kernel=None):
    """poly_sa.triton's pool kernel with an explicit tile and token split: z row-padded, partial sums guarded."""
    kernel = kernel or raw_kernel(sa_triton._poly_sa_pool_kernel)
    t = sa_inputs(dtype)
    splits = triton.cdiv(SA_N, tokens_per_split)
    z = guarded_copy(t["z"], name="z", row_pad=ROW_PAD)
    w1, w2 = guarded_copy(t["w1"], name="w1"), guarded_copy(t["w2"], name="w2")
    mask = guarded_copy(t["mask"].to(torch.uint8), name="mask")
    tag = f"BT={BT} BJ={BJ} BK={BK} split={tokens_per_split}"
    part = guard_buffer((SA_B, splits, SA_C), _sa_acc(dtype), name=f"poly_sa pool partial sums {tag}")
    kernel[(SA_B * triton.cdiv(SA_C, BJ), splits)](
        z.view, w1.view, w2.view, mask.view, part.view, SA_N, SA_C, tokens_per_split, splits, z.view.stride(0),
        HAS_MASK=masked, **_sa_flags(dtype), BT=BT, BJ=BJ, BK=BK)

    def check_values():
        counts = t["mask"].view(SA_B, SA_N).sum(1) if masked else torch.full((SA_B,), SA_N)
        m = part.view.double().sum(1) / counts.clamp_min(1)[:, None]
        assert_close(part.name, m, _sa_reference_m(t, masked), dtype)

    return Launch([part], [z, w1, w2, mask], check_values)


def launch_sa_out(BT, BJ, BK, dtype=torch.float64, kernel=None):
    """poly_sa.triton's output kernel with an explicit tile, into a row-padded y."""
    kernel = kernel or raw_kernel(sa_triton._poly_sa_out_kernel)
    t = sa_inputs(dtype)
    m_exact = _sa_reference_m(t, True)
    z = guarded_copy(t["z"], name="z", row_pad=ROW_PAD)
    m = guarded_copy(m_exact.to(_sa_acc(dtype)), name="m")
    w3, alpha, beta = (guarded_copy(t[k], name=k) for k in ("w3", "alpha", "beta"))
    rows = SA_B * SA_N
    y = guard_buffer((rows, SA_C), dtype, name=f"poly_sa out y BT={BT} BJ={BJ} BK={BK}", row_pad=ROW_PAD)
    kernel[(triton.cdiv(rows, BT) * triton.cdiv(SA_C, BJ),)](
        z.view, m.view, w3.view, alpha.view, beta.view, y.view, rows, SA_N, SA_C, z.view.stride(0), y.view.stride(0),
        **_sa_flags(dtype), BT=BT, BJ=BJ, BK=BK)

    def check_values():
        z3 = t["z"].double().view(SA_B, SA_N, SA_C)
        ref = t["alpha"].double() * z3 + t["beta"].double() * ((z3 * m_exact[:, None, :]) @ t["w3"].double())
        assert_close(y.name, y.view, ref.view(rows, SA_C), dtype)

    return Launch([y], [z, m, w3, alpha, beta], check_values)


def launch_sa_out_bwd(BT, BI, BK, tokens_per_split, dtype=torch.float64, kernel=None):
    """poly_sa.triton's output-backward kernel with an explicit tile and token split: z and grad_y row-padded, dz and
    u row-padded guards, the partial sums guarded."""
    kernel = kernel or raw_kernel(sa_triton._poly_sa_out_bwd_kernel)
    t = sa_inputs(dtype)
    m_exact = _sa_reference_m(t, True)
    splits = triton.cdiv(SA_N, tokens_per_split)
    rows = SA_B * SA_N
    z, g = guarded_copy(t["z"], name="z", row_pad=ROW_PAD), guarded_copy(t["g"], name="grad_y", row_pad=ROW_PAD)
    m = guarded_copy(m_exact.to(_sa_acc(dtype)), name="m")
    w3, alpha, beta = (guarded_copy(t[k], name=k) for k in ("w3", "alpha", "beta"))
    tag = f"BT={BT} BI={BI} BK={BK} split={tokens_per_split}"
    dz = guard_buffer((rows, SA_C), dtype, name=f"poly_sa out bwd dz {tag}", row_pad=ROW_PAD)
    u = guard_buffer((rows, SA_C), dtype, name=f"poly_sa out bwd u {tag}", row_pad=ROW_PAD)
    part = guard_buffer((2, SA_B, splits, SA_C), _sa_acc(dtype), name=f"poly_sa out bwd partial sums {tag}")
    kernel[(SA_B * triton.cdiv(SA_C, BI), splits)](
        z.view, g.view, m.view, w3.view, alpha.view, beta.view, dz.view, u.view, part.view, SA_N, SA_C,
        tokens_per_split, splits, SA_B * splits * SA_C, z.view.stride(0), g.view.stride(0), dz.view.stride(0),
        u.view.stride(0), **_sa_flags(dtype), BT=BT, BI=BI, BK=BK)

    def check_values():
        zd, gd = t["z"].double(), t["g"].double()
        alpha_d, beta_d = t["alpha"].double(), t["beta"].double()
        m_rows = m_exact.repeat_interleave(SA_N, 0)
        gp = gd @ t["w3"].double().T
        assert_close(dz.name, dz.view, alpha_d * gd + beta_d * gp * m_rows, dtype)
        assert_close(u.name, u.view, beta_d * zd * m_rows, dtype)
        sums = part.view.double().sum(2)
        assert_close(f"{part.name} (q)", sums[0], (gp * zd).view(SA_B, SA_N, SA_C).sum(1), dtype)
        assert_close(f"{part.name} (dalpha)", sums[1].sum(), (gd * zd).sum(), dtype)

    return Launch([dz, u, part], [z, g, m, w3, alpha, beta], check_values)


def launch_sa_pool_bwd(BT, BJ, BK, masked=True, dtype=torch.float64, kernel=None):
    """poly_sa.triton's pool-gradient kernel with an explicit tile, into a row-padded grad_p [B*N, 2C]."""
    kernel = kernel or raw_kernel(sa_triton._poly_sa_pool_bwd_kernel)
    t = sa_inputs(dtype)
    s_exact = randn(SA_B, SA_C, dtype=torch.float64, seed=9)
    z = guarded_copy(t["z"], name="z", row_pad=ROW_PAD)
    w1, w2 = guarded_copy(t["w1"], name="w1"), guarded_copy(t["w2"], name="w2")
    mask = guarded_copy(t["mask"].to(torch.uint8), name="mask")
    s = guarded_copy(s_exact.to(_sa_acc(dtype)), name="s")
    rows = SA_B * SA_N
    grad_p = guard_buffer((rows, 2 * SA_C), dtype, name=f"poly_sa grad_p BT={BT} BJ={BJ} BK={BK}", row_pad=ROW_PAD)
    kernel[(triton.cdiv(rows, BT) * triton.cdiv(SA_C, BJ),)](
        z.view, w1.view, w2.view, mask.view, s.view, grad_p.view, rows, SA_N, SA_C, z.view.stride(0),
        grad_p.view.stride(0), HAS_MASK=masked, **_sa_flags(dtype), BT=BT, BJ=BJ, BK=BK)

    def check_values():
        zd = t["z"].double()
        s_rows = s_exact.repeat_interleave(SA_N, 0)
        keep = t["mask"][:, None] if masked else torch.ones(rows, 1, dtype=torch.bool)
        expected = torch.cat([s_rows * (zd @ t["w2"].double()), s_rows * (zd @ t["w1"].double())], 1)
        assert_close(grad_p.name, grad_p.view, torch.where(keep, expected, 0.0), dtype)

    return Launch([grad_p], [z, w1, w2, mask, s], check_values)


# ---------------------------------------------------------------- lrnn
# M rows, D inputs; LRNN_RANK neurons in blocks of BN // DBP (the last ragged), dbar 3 and 5 padded to 4 and 8.
LRNN_RANK, LRNN_H = 7, 3


def lrnn_inputs(dbar, activation, dtype, bias=True, seed=0):
    columns = LRNN_RANK * dbar
    x = randn(M, D, dtype=dtype, seed=seed)
    weight = randn(columns, D, dtype=dtype, seed=seed + 1, scale=1 / math.sqrt(D))
    b = randn(columns, dtype=dtype, seed=seed + 2, scale=0.5) if bias else None
    g_params = randn(3, LRNN_RANK, dbar, LRNN_H, dtype=dtype, seed=seed + 3, scale=0.5) if activation == "mlp" else None
    return x, weight, b, g_params


def _lrnn_options(dbar, activation):
    return LRNN_RANK, dbar, activation, 1.5 if activation == "sin" else 1.0, dbar ** -0.5


def _double(*ts):
    return [None if t is None else t.double() for t in ts]


def launch_lrnn_fwd(BM, BN, BD, dbar, activation="spder", bias=True, dtype=torch.float64, kernel=None):
    """lrnn.triton's forward kernel with an explicit tile, x and phi row-padded."""
    kernel = kernel or raw_kernel(lrnn_triton._lrnn_fwd_kernel)
    x, weight, bias, g_params = lrnn_inputs(dbar, activation, dtype, bias)
    options = _lrnn_options(dbar, activation)
    _, _, _, h, flags = lrnn_triton._launch_args(x, weight, bias, g_params, LRNN_RANK, dbar, activation)
    gx, gw = guarded_copy(x, name="x", row_pad=ROW_PAD), guarded_copy(weight, name="weight")
    gb = guarded_copy(bias, name="bias") if bias is not None else None
    gp = guarded_copy(g_params, name="g_params") if g_params is not None else None
    phi = guard_buffer((M, LRNN_RANK), dtype, name=f"lrnn fwd phi BM={BM} BN={BN} dbar={dbar}", row_pad=ROW_PAD)
    grid = (triton.cdiv(M, BM), triton.cdiv(LRNN_RANK, lrnn_triton._neurons_per_tile(BN, flags["DBP"])))
    kernel[grid](gx.view, gw.view, (gb or gx).view, (gp or gx).view, phi.view, M, D, LRNN_RANK, dbar, h, options[3],
                 options[4], gx.view.stride(0), phi.view.stride(0), **flags, BM=BM, BN=BN, BD=BD)

    def check_values():
        assert_close(phi.name, phi.view, lrnn_reference.forward(*_double(x, weight, bias, g_params), *options), dtype)

    return Launch([phi], [g for g in (gx, gw, gb, gp) if g], check_values)


def launch_lrnn_grad_z(BM, BN, BD, rows, dbar, activation="spder", bias=True, dtype=torch.float64, kernel=None):
    """lrnn.triton's grad_z kernel with an explicit tile and `rows` per program: x, grad_phi and grad_z row-padded,
    the mlp's partial sums guarded; the values are checked through the gradients the launcher forms from them."""
    kernel = kernel or raw_kernel(lrnn_triton._lrnn_grad_z_kernel)
    x, weight, bias, g_params = lrnn_inputs(dbar, activation, dtype, bias)
    options = _lrnn_options(dbar, activation)
    _, _, _, h, flags = lrnn_triton._launch_args(x, weight, bias, g_params, LRNN_RANK, dbar, activation)
    dphi = randn(M, LRNN_RANK, dtype=dtype, seed=5)
    gx, gw = guarded_copy(x, name="x", row_pad=ROW_PAD), guarded_copy(weight, name="weight")
    gb = guarded_copy(bias, name="bias") if bias is not None else None
    gp = guarded_copy(g_params, name="g_params") if g_params is not None else None
    gd = guarded_copy(dphi, name="grad_phi", row_pad=ROW_PAD)
    tag = f"BM={BM} BN={BN} rows={rows} dbar={dbar}"
    columns = LRNN_RANK * dbar
    grad_z = guard_buffer((M, columns), dtype, name=f"lrnn grad_z {tag}", row_pad=ROW_PAD)
    splits = triton.cdiv(M, rows)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    part = guard_buffer((splits, 3, columns, h) if gp else (1,), acc, name=f"lrnn g_params partial sums {tag}")
    grid = (splits, triton.cdiv(LRNN_RANK, lrnn_triton._neurons_per_tile(BN, flags["DBP"])))
    kernel[grid](gx.view, gw.view, (gb or gx).view, (gp or gx).view, gd.view, grad_z.view, part.view, M, D,
                 LRNN_RANK, dbar, h, rows, options[3], options[4], gx.view.stride(0), gd.view.stride(0),
                 grad_z.view.stride(0), **flags, BM=BM, BN=BN, BD=BD)

    def check_values():
        gz = grad_z.view.double()
        ref = lrnn_reference.backward(dphi.double(), *_double(x, weight, bias, g_params), *options, [True] * 4)
        assert_close(f"{grad_z.name} -> dx", gz @ weight.double(), ref[0], dtype)
        assert_close(f"{grad_z.name} -> dweight", gz.T @ x.double(), ref[1], dtype)
        if gp is not None:
            assert_close(part.name, part.view.double().sum(0).view(g_params.shape), ref[3], dtype)

    return Launch([grad_z, part] if gp else [grad_z], [g for g in (gx, gw, gb, gp, gd) if g], check_values)


# ---------------------------------------------------------------- the cases
def loop(BM=16, BC=32, BD=16, GROUP_M=2):  # 3 row tiles of M = 37: groups of 2 and 1
    return dict(BM=BM, BC=BC, BD=BD, GROUPED=False, GROUP_M=GROUP_M)


def grouped(BM=16, BC=64, BD=16, GROUP_M=1):  # one row tile per group: the order row tiles outermost
    return dict(BM=BM, BC=BC, BD=BD, GROUPED=True, GROUP_M=GROUP_M)


CASES = [
    # poly_chain forward, degree loop: 3 row tiles and 2 column tiles, both ragged; N = 1 has no loop.
    pytest.param(launch_chain_fwd, dict(config=loop(), N=1, bias=False), id="chain_fwd-loop-N1"),
    pytest.param(launch_chain_fwd, dict(config=loop(), N=3, mode="product"), id="chain_fwd-loop-N3"),
    pytest.param(launch_chain_fwd, dict(config=loop(), N=2, dtype=torch.float32), id="chain_fwd-loop-N2-fp32"),
    pytest.param(launch_chain_fwd, dict(config=loop(BM=32, BC=64, BD=32), N=2, dtype=torch.float16),
                 id="chain_fwd-loop-N2-fp16"),
    # grouped: BC // NP output columns per program (32, 16, 8), padding degrees for N = 3, 5.
    pytest.param(launch_chain_fwd, dict(config=grouped(), N=2), id="chain_fwd-grouped-N2"),
    pytest.param(launch_chain_fwd, dict(config=grouped(), N=3, bias=False), id="chain_fwd-grouped-N3"),
    pytest.param(launch_chain_fwd, dict(config=grouped(), N=5, mode="product"), id="chain_fwd-grouped-N5"),
    # ... and storing z (save_projections), both paths.
    pytest.param(launch_chain_fwd, dict(config=loop(), N=3, store_z=True), id="chain_fwd-loop-N3-z"),
    pytest.param(launch_chain_fwd, dict(config=grouped(), N=3, bias=False, store_z=True), id="chain_fwd-grouped-N3-z"),
    # poly_chain grad_z: the launcher's BR and a small one; N padded to NP degrees for N = 3, 5.
    pytest.param(launch_chain_grad_z, dict(BR=16, N=1), id="chain_grad_z-BR16-N1"),
    pytest.param(launch_chain_grad_z, dict(BR=16, N=3, mode="product", bias=False), id="chain_grad_z-BR16-N3"),
    pytest.param(launch_chain_grad_z, dict(BR=128, N=5), id="chain_grad_z-BR128-N5"),
    pytest.param(launch_chain_grad_z, dict(BR=64, N=3, dtype=torch.float32), id="chain_grad_z-BR64-N3-fp32"),
    # poly_ncp: KP = 64 (K = 39) and 16 (K = 5, below tl.dot's minimum), N = 1 (no chain) and N > 1.
    pytest.param(launch_ncp_fwd, dict(BM=16, BD=16, N=1), id="ncp_fwd-N1"),
    pytest.param(launch_ncp_fwd, dict(BM=16, BD=16, N=3, bias=False), id="ncp_fwd-N3"),
    pytest.param(launch_ncp_fwd, dict(BM=32, BD=32, N=2, K=5, dtype=torch.float32), id="ncp_fwd-N2-K5-fp32"),
    pytest.param(launch_ncp_bwd, dict(BM=16, BD=16, N=1), id="ncp_bwd-N1"),
    pytest.param(launch_ncp_bwd, dict(BM=16, BD=16, N=3), id="ncp_bwd-N3"),
    pytest.param(launch_ncp_bwd, dict(BM=32, BD=32, N=2, K=5, bias=False, dtype=torch.float32),
                 id="ncp_bwd-N2-K5-fp32"),
    # poly_ncp's wide path (k > 128): one degree, [16, 16] tiles of K = 39 columns (ragged), d = 45 in 16-chunks.
    pytest.param(launch_ncp_wide_fwd, dict(BM=16, BN=16, BK=16), id="ncp_wide_fwd"),
    pytest.param(launch_ncp_wide_fwd, dict(BM=32, BN=16, BK=32, prev=False, dtype=torch.float32),
                 id="ncp_wide_fwd-first-fp32"),
    pytest.param(launch_ncp_wide_bwd, dict(BM=16, BN=16, BK=16), id="ncp_wide_bwd"),
    pytest.param(launch_ncp_wide_bwd, dict(BM=16, BN=32, BK=16, from_y=True, bias=False, dtype=torch.float16),
                 id="ncp_wide_bwd-last-fp16"),
    pytest.param(launch_ncp_wide_bwd, dict(BM=32, BN=16, BK=16, prev=False, dtype=torch.float32),
                 id="ncp_wide_bwd-first-fp32"),
    # poly_gate: C = 45 in a 64-wide block; ragged row tiles; pixel tiles (2 x 2, 4 x 2) over a 5 x 7 and a 3 x 2
    # image (W = 3: 4-pixel tiles along W, the last half empty), persistent programs with several tiles each.
    pytest.param(launch_gate_fwd, dict(BM=8, shape=(37, 45), spatial=False), id="gate_fwd-flat"),
    pytest.param(launch_gate_fwd, dict(BM=4, shape=(2, 5, 7, 45), spatial=True), id="gate_fwd-spatial"),
    pytest.param(launch_gate_fwd, dict(BM=16, shape=(1, 3, 2, 21), spatial=True, dtype=torch.float16),
                 id="gate_fwd-spatial-fp16"),
    pytest.param(launch_gate_bwd, dict(TW=1, TH=8, programs=3, shape=(37, 45), spatial=False), id="gate_bwd-flat"),
    pytest.param(launch_gate_bwd, dict(TW=2, TH=2, programs=5, shape=(2, 5, 7, 45), spatial=True),
                 id="gate_bwd-spatial-2x2"),
    pytest.param(launch_gate_bwd, dict(TW=4, TH=2, programs=2, shape=(1, 3, 2, 21), spatial=True,
                                       dtype=torch.float32), id="gate_bwd-spatial-W3-fp32"),
    # poly_gate's wide path (C > 8192), at C = 45: 16- and 32-channel chunks (the last ragged), ragged row tiles.
    pytest.param(launch_gate_fwd, dict(BM=8, BC=16, shape=(37, 45), spatial=False), id="gate_wide_fwd-flat"),
    pytest.param(launch_gate_fwd, dict(BM=4, BC=32, shape=(2, 5, 7, 45), spatial=True, dtype=torch.float16),
                 id="gate_wide_fwd-spatial-fp16"),
    pytest.param(launch_gate_wide_bwd, dict(BM=8, BC=16, programs=3, shape=(37, 45), spatial=False),
                 id="gate_wide_bwd-flat"),
    pytest.param(launch_gate_wide_bwd, dict(BM=4, BC=32, programs=2, shape=(2, 5, 7, 45), spatial=True,
                                            dtype=torch.float32), id="gate_wide_bwd-spatial-fp32"),
    # poly_sa: 37 tokens per batch row, C = 45; 16-token splits (the last ragged), 16-wide tiles (3 column blocks and
    # 3 contraction chunks), one split of 128 tokens; the flat-row kernels' tiles straddle batch rows.
    pytest.param(launch_sa_pool, dict(BT=16, BJ=16, BK=16, tokens_per_split=16), id="sa_pool-split16"),
    pytest.param(launch_sa_pool, dict(BT=32, BJ=32, BK=16, tokens_per_split=128, masked=False, dtype=torch.float32),
                 id="sa_pool-one-split-fp32"),
    pytest.param(launch_sa_pool, dict(BT=16, BJ=32, BK=32, tokens_per_split=32, dtype=torch.float16),
                 id="sa_pool-split32-fp16"),
    pytest.param(launch_sa_out, dict(BT=16, BJ=16, BK=16), id="sa_out"),
    pytest.param(launch_sa_out, dict(BT=32, BJ=32, BK=32, dtype=torch.float16), id="sa_out-fp16"),
    pytest.param(launch_sa_out_bwd, dict(BT=16, BI=16, BK=16, tokens_per_split=16), id="sa_out_bwd-split16"),
    pytest.param(launch_sa_out_bwd, dict(BT=32, BI=32, BK=16, tokens_per_split=128, dtype=torch.float32),
                 id="sa_out_bwd-one-split-fp32"),
    pytest.param(launch_sa_pool_bwd, dict(BT=16, BJ=16, BK=16), id="sa_pool_bwd"),
    pytest.param(launch_sa_pool_bwd, dict(BT=32, BJ=32, BK=32, masked=False, dtype=torch.float16),
                 id="sa_pool_bwd-fp16"),
    # lrnn: 7 neurons in blocks of 4 (dbar 3 -> 4 components, the last block ragged) or 2 (dbar 5 -> 8), one
    # neuron per block when BN < DBP (dbar 33 -> 64); rows in 16-row splits (the last ragged) or one split.
    pytest.param(launch_lrnn_fwd, dict(BM=16, BN=16, BD=16, dbar=3), id="lrnn_fwd-dbar3"),
    pytest.param(launch_lrnn_fwd, dict(BM=16, BN=16, BD=16, dbar=5, activation="mlp", bias=False),
                 id="lrnn_fwd-dbar5-mlp"),
    pytest.param(launch_lrnn_fwd, dict(BM=32, BN=32, BD=32, dbar=33, activation="sin", dtype=torch.float32),
                 id="lrnn_fwd-dbar33-fp32"),
    pytest.param(launch_lrnn_fwd, dict(BM=16, BN=32, BD=16, dbar=1, activation="tanh", dtype=torch.float16),
                 id="lrnn_fwd-dbar1-fp16"),
    pytest.param(launch_lrnn_grad_z, dict(BM=16, BN=16, BD=16, rows=16, dbar=3), id="lrnn_grad_z-dbar3"),
    pytest.param(launch_lrnn_grad_z, dict(BM=16, BN=16, BD=16, rows=16, dbar=5, activation="mlp"),
                 id="lrnn_grad_z-dbar5-mlp"),
    pytest.param(launch_lrnn_grad_z, dict(BM=16, BN=32, BD=32, rows=128, dbar=3, activation="mlp", bias=False,
                                          dtype=torch.float32), id="lrnn_grad_z-one-split-mlp-fp32"),
    pytest.param(launch_lrnn_grad_z, dict(BM=32, BN=32, BD=16, rows=32, dbar=33, activation="arctan",
                                          dtype=torch.float32), id="lrnn_grad_z-dbar33-fp32"),
]


@pytest.mark.parametrize("launch, params", CASES)
def test_stores_stay_in_bounds(launch, params):
    result = launch(**params)
    check_guards(*result.outputs)
    for guard in result.inputs:
        assert_guard_untouched(guard, f"input {guard.name}")
    result.check_values()


# ---------------------------------------------------------------- the guards catch planted bugs
# (launch, its case, the kernel, text of its source, the bug that replaces it, what the guards must report)
_COLUMN_MASK = "mask = (o_m < M)[:, None] & (o_k < K)[None, :]"
PLANTS = [
    pytest.param(launch_chain_fwd, dict(config=loop(), N=3), chain_triton._poly_chain_fwd_kernel,
                 _COLUMN_MASK, _COLUMN_MASK.replace("o_k < K", "o_k <= K"), "past the end of row",
                 id="chain_fwd-loop-column+1"),
    pytest.param(launch_chain_fwd, dict(config=grouped(), N=3), chain_triton._poly_chain_fwd_kernel,
                 _COLUMN_MASK, "mask = (o_k < K)[None, :]", "past the end", id="chain_fwd-grouped-no-row-mask"),
    pytest.param(launch_chain_fwd, dict(config=loop(), N=2), chain_triton._poly_chain_fwd_kernel,
                 _COLUMN_MASK, _COLUMN_MASK.replace("o_k < K", "o_k < K - 1"), "never written",
                 id="chain_fwd-column-1"),
    pytest.param(launch_chain_fwd, dict(config=grouped(), N=3, store_z=True), chain_triton._poly_chain_fwd_kernel,
                 "mask=m_m & m_c[None, :])", "mask=m_c[None, :])", "past the end", id="chain_fwd-grouped-z-no-rows"),
    pytest.param(launch_chain_fwd, dict(config=loop(), N=3, store_z=True), chain_triton._poly_chain_fwd_kernel,
                 "mask=m_m & (o_k < K)[None, :])", "mask=m_m)", "past the end", id="chain_fwd-loop-z-column-overrun"),
    pytest.param(launch_chain_grad_z, dict(BR=16, N=3), chain_triton._poly_chain_grad_z_kernel,
                 "mask=m_r & (o_n < N))", "mask=m_r)", "past the end", id="chain_grad_z-padding-degrees"),
    pytest.param(launch_chain_grad_z, dict(BR=16, N=3), chain_triton._poly_chain_grad_z_kernel,
                 "mask=m_r & (o_n < N))", "mask=(o_n < N))", "past the end", id="chain_grad_z-no-row-mask"),
    pytest.param(launch_ncp_fwd, dict(BM=16, BD=16, N=2), ncp_triton._poly_ncp_fwd_kernel,
                 _COLUMN_MASK, _COLUMN_MASK.replace("o_k < K", "o_k <= K"), "past the end of row",
                 id="ncp_fwd-column+1"),
    pytest.param(launch_ncp_bwd, dict(BM=16, BD=16, N=3), ncp_triton._poly_ncp_bwd_kernel,
                 _COLUMN_MASK, _COLUMN_MASK.replace("o_k < K", "o_k <= K"), "past the end",
                 id="ncp_bwd-column+1"),
    pytest.param(launch_ncp_wide_fwd, dict(BM=16, BN=16, BK=16), ncp_triton._poly_ncp_wide_fwd_kernel,
                 "y.to(y_ptr.dtype.element_ty), mask=mask)", "y.to(y_ptr.dtype.element_ty), mask=(o_j < K)[None, :])",
                 "past the end", id="ncp_wide_fwd-no-row-mask"),
    pytest.param(launch_ncp_wide_bwd, dict(BM=16, BN=16, BK=16), ncp_triton._poly_ncp_wide_bwd_kernel,
                 "(g * a).to(gs_ptr.dtype.element_ty), mask=mask)",
                 "(g * a).to(gs_ptr.dtype.element_ty), mask=(o_m < M)[:, None])", "past the end of row",
                 id="ncp_wide_bwd-no-column-mask"),
    pytest.param(launch_gate_fwd, dict(BM=8, shape=(37, 45), spatial=False), gate_triton._poly_gate_fwd_kernel,
                 "mask = (o_m < M)[:, None] & m_c", "mask = m_c", "past the end", id="gate_fwd-no-row-mask"),
    pytest.param(launch_gate_bwd, dict(TW=2, TH=2, programs=3, shape=(2, 5, 7, 45), spatial=True),
                 gate_triton._poly_gate_bwd_kernel, "t1 = tl.where(px_w <= W - 2, r + H, r - (W - 1) * H)",
                 "t1 = r + H", "past the end", id="gate_bwd-shift-target-unwrapped"),
    pytest.param(launch_gate_fwd, dict(BM=8, BC=16, shape=(37, 45), spatial=False),
                 gate_triton._poly_gate_wide_fwd_kernel, "y.to(y_ptr.dtype.element_ty), mask=mask)",
                 "y.to(y_ptr.dtype.element_ty), mask=m_m)", "past the end of row", id="gate_wide_fwd-no-column-mask"),
    pytest.param(launch_gate_wide_bwd, dict(BM=8, BC=16, programs=3, shape=(37, 45), spatial=False),
                 gate_triton._poly_gate_wide_bwd_kernel, "tl.sum(d_alpha, axis=0), mask=m_c)",
                 "tl.sum(d_alpha, axis=0))", "past the end", id="gate_wide_bwd-partial-sums-unmasked"),
    pytest.param(launch_sa_pool, dict(BT=16, BJ=16, BK=16, tokens_per_split=16), sa_triton._poly_sa_pool_kernel,
                 "+ o_j, acc, mask=m_j)", "+ o_j, acc)", "past the end", id="sa_pool-no-column-mask"),
    pytest.param(launch_sa_out, dict(BT=16, BJ=16, BK=16), sa_triton._poly_sa_out_kernel,
                 "m_y = m_rows[:, None] & m_j[None, :]", "m_y = m_j[None, :]", "past the end",
                 id="sa_out-no-row-mask"),
    pytest.param(launch_sa_out_bwd, dict(BT=16, BI=16, BK=16, tokens_per_split=16),
                 sa_triton._poly_sa_out_bwd_kernel, "m_tile = m_t[:, None] & m_i[None, :]",
                 "m_tile = m_i[None, :]", "past the end", id="sa_out_bwd-no-token-mask"),
    pytest.param(launch_sa_pool_bwd, dict(BT=16, BJ=16, BK=16), sa_triton._poly_sa_pool_bwd_kernel,
                 "tl.store(p_out + C, tl.where(keep, s * p1, 0.0).to(gp_ptr.dtype.element_ty), mask=m_tile)",
                 "tl.store(p_out + C, tl.where(keep, s * p1, 0.0).to(gp_ptr.dtype.element_ty), mask=m_rows[:, None])",
                 "past the end of row", id="sa_pool_bwd-column-overrun"),
    pytest.param(launch_lrnn_fwd, dict(BM=16, BN=16, BD=16, dbar=3), lrnn_triton._lrnn_fwd_kernel,
                 "mask = (o_m < M)[:, None] & (o_l < R)[None, :]", "mask = (o_m < M)[:, None]", "past the end of row",
                 id="lrnn_fwd-no-neuron-mask"),
    pytest.param(launch_lrnn_grad_z, dict(BM=16, BN=16, BD=16, rows=16, dbar=3), lrnn_triton._lrnn_grad_z_kernel,
                 "mask = m_m[:, None] & m_c[None, :]", "mask = m_c[None, :]", "past the end",
                 id="lrnn_grad_z-no-row-mask"),
    pytest.param(launch_lrnn_grad_z, dict(BM=16, BN=16, BD=16, rows=16, dbar=5, activation="mlp"),
                 lrnn_triton._lrnn_grad_z_kernel, "tl.load(p_dp + 2 * RDH + i, mask=m_c)) + dc, mask=m_c)",
                 "tl.load(p_dp + 2 * RDH + i, mask=m_c)) + dc)", "past the end",
                 id="lrnn_grad_z-partial-sums-unmasked"),
]


@pytest.mark.parametrize("launch, params, kernel, old, new, report", PLANTS)
def test_guards_catch_planted_bug(launch, params, kernel, old, new, report, tmp_path):
    """The same launch with a bug planted in a copy of the kernel's source fails the checks above."""
    result = launch(**params, kernel=planted(kernel, old, new, tmp_path))
    with pytest.raises(AssertionError, match=report):
        check_guards(*result.outputs)
