"""The CUDA C++ backend of causal_linear_attention.

Everywhere a C++ compiler and the CUDA headers are: the kernels' source itself, compiled for the CPU under
tests/emulation/cuda_emulation.h (blocks run as fibers, ldmatrix and mma.sync emulated) and driven by
ops/linear_attention/cuda.py, against the float64 reference for every dtype, feature map and normalize, the sizes
the kernels tile specially, packed sequences, strided inputs, NaN, and the float16 range guards.
Wherever the extension is built: the kernels' element-wise math (feature maps, their derivatives, the normalizer and
its gradient) compiled for the host against the reference's functions and torch autograd, NaN included; the codes
and limits shared with Python; launchers refusing bad params. On a GPU: backend="cuda" against the float64 reference
(output, final state and key sum, every gradient) for every dtype, feature map and normalize, with and without
states, packed sequences, strided inputs, and the sizes the kernels tile specially (T around the 64-token chunk,
K and V that are not multiples of 16, up to 256), plus the float16 range guards."""

from __future__ import annotations

import math

import emulated_kernels
import pytest
import test_linear_attention as family_tests
import torch
from utils import HAS_CUDA, assert_close, cuda, requires_cuda

import hadamard_kernels as hk
from hadamard_kernels import _backend
from hadamard_kernels.ops.linear_attention import cuda as la_cuda
from hadamard_kernels.ops.linear_attention import reference
from hadamard_kernels.ops.linear_attention.common import FEATURE_MAPS, MAX_HEAD_DIM, SegmentPlan

EXT, EXT_MISSING = _backend.cuda_extension()
needs_ext = pytest.mark.skipif(EXT is None, reason=f"hadamard_kernels._C not built: {EXT_MISSING}")


# ---------------------------------------------------------------- codes and limits shared with Python
@needs_ext
def test_codes_and_limits_match_python():
    assert tuple(EXT.FEATURE_MAPS) == FEATURE_MAPS
    assert EXT.LINEAR_ATTENTION_MAX_DIM == la_cuda.MAX_DIM == MAX_HEAD_DIM


def test_unsupported_names_the_limit():
    q = torch.empty(1, 3, 2, 8, device="meta")
    v = torch.empty(1, 3, 2, 300, device="meta")
    options = ("identity", False, 1.0, 1e-6, False, None)
    assert la_cuda.unsupported(q, q, q, None, None, *options) is None
    assert "K, V <= 256" in la_cuda.unsupported(q, q, v, None, None, *options)
    wide = torch.empty(1, 3, 2, 257, device="meta")
    assert "K=257" in la_cuda.unsupported(wide, wide, q, None, None, *options)
    assert "float64" in la_cuda.unsupported(q.double(), q.double(), q.double(), None, None, *options)


def test_rows_view_copies_only_when_needed():
    """The kernels index [B * T, H, D] with a row stride: slices of a fused projection need no copy."""
    qkv = torch.randn(2, 5, 3, 3 * 8)
    q = qkv[..., 8:16]
    view, row_stride, head_stride = la_cuda._rows(q)
    assert view.data_ptr() == q.data_ptr() and (row_stride, head_stride) == (3 * 24, 24)
    swapped = torch.randn(2, 3, 5, 8).transpose(1, 2)  # heads outside tokens: no [B * T] row view
    view, row_stride, head_stride = la_cuda._rows(swapped)
    assert view.is_contiguous() and (row_stride, head_stride) == (24, 8)
    one_token = torch.randn(4, 3, 1, 8).transpose(1, 2)  # T = 1: rows are the batch
    view, row_stride, _ = la_cuda._rows(one_token)
    assert view.data_ptr() == one_token.data_ptr() and row_stride == one_token.stride(0)


# ---------------------------------------------------------------- the device math, compiled for the host
_X = [0.0, -0.0, 1e-30, -1e-30, 1e-4, -1e-4, 0.3, -0.3, 1.0, -1.0, 2.5, -2.5, 20.0, -20.0, 80.0, -80.0, -90.0,
      -104.0, 1e30, -1e30, math.inf, -math.inf, math.nan]


def _assert_same(name, got, want, rtol=4e-7):
    """Same NaN and infinity pattern; finite values within rtol * (1 + |want|)."""
    got_nan, want_nan = torch.isnan(got), torch.isnan(want)
    assert torch.equal(got_nan, want_nan), f"{name}: NaN at {got_nan.nonzero().flatten().tolist()}, want " \
                                           f"{want_nan.nonzero().flatten().tolist()}"
    infinite = torch.isinf(want) | torch.isinf(got)
    assert torch.equal(got[infinite], want[infinite]), f"{name}: {got[infinite]} != {want[infinite]}"
    finite = ~(want_nan | infinite)
    bad = (got[finite] - want[finite]).abs() > rtol * (1 + want[finite].abs())
    assert not bad.any(), f"{name}: {got[finite][bad].tolist()} != {want[finite][bad].tolist()}"


@needs_ext
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_feature_map_host_matches_reference(feature_map):
    code = FEATURE_MAPS.index(feature_map)
    x = torch.tensor(_X, dtype=torch.float32).double()  # float32 inputs, as the kernels see them
    got = torch.tensor([EXT.linear_attention_feature_map_host(code, v) for v in x.tolist()], dtype=torch.float64)
    grad = torch.tensor([EXT.linear_attention_feature_map_grad_host(code, v) for v in x.tolist()],
                        dtype=torch.float64)
    _assert_same(f"{feature_map}", got, reference.phi(x, feature_map))
    _assert_same(f"{feature_map}'", grad, reference.phi_grad(x, feature_map))


@needs_ext
def test_feature_maps_keep_nan_like_torch():
    nan = float("nan")
    for feature_map in FEATURE_MAPS:
        assert math.isnan(EXT.linear_attention_feature_map_host(FEATURE_MAPS.index(feature_map), nan)), feature_map
    assert math.isnan(torch.relu(torch.tensor(nan)).item())  # what relu follows
    assert EXT.linear_attention_feature_map_host(FEATURE_MAPS.index("relu"), -2.0) == 0.0
    assert EXT.linear_attention_feature_map_host(FEATURE_MAPS.index("elu1"), -2.0) == pytest.approx(math.exp(-2.0))


@needs_ext
def test_feature_map_host_rejects_unknown_code():
    with pytest.raises(ValueError, match="feature map code"):
        EXT.linear_attention_feature_map_host(len(FEATURE_MAPS), 0.0)
    with pytest.raises(ValueError, match="feature map code"):
        EXT.linear_attention_feature_map_grad_host(-1, 0.0)


@needs_ext
def test_normalizer_host_matches_autograd():
    """o = scale * num / den and its gradient (d num, d den) for one element, against torch autograd in float64.
    den = 0 cases check that inf and NaN come out where torch puts them."""
    g = torch.Generator().manual_seed(0)
    cases = [(n, d, s, go) for n, d, s, go in (torch.randn(40, 4, generator=g) * torch.tensor([3.0, 2.0, 1.0, 1.0]))
             .tolist()]
    cases += [(5.0, 1e-6, 0.7, -1.3), (1e8, 1e-8, 1.0, 1.0), (0.0, 0.0, 1.0, 1.0), (1.0, 0.0, 0.5, 2.0),
              (-3.0, 4.0, -2.0, 0.0)]
    # float32 inputs, as the kernels see them
    cases = [tuple(torch.tensor(c, dtype=torch.float32).double().tolist()) for c in cases]
    got_o, got_dnum, got_dden, want_o, want_dnum, want_dden = ([] for _ in range(6))
    for num, den, scale, grad_o in cases:
        o = EXT.linear_attention_normalized_output_host(num, den, scale)
        dnum, dden = EXT.linear_attention_normalizer_grads_host(grad_o, o, den, scale)
        n = torch.tensor(num, dtype=torch.float64, requires_grad=True)
        d = torch.tensor(den, dtype=torch.float64, requires_grad=True)
        ref = scale * n / d
        ref.backward(torch.tensor(grad_o, dtype=torch.float64))
        for lst, value in ((got_o, o), (got_dnum, dnum), (got_dden, dden), (want_o, ref.item()),
                           (want_dnum, n.grad.item()), (want_dden, d.grad.item())):
            lst.append(value)
    as_tensor = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
    # float32 arithmetic: a few roundings
    _assert_same("o", as_tensor(got_o), as_tensor(want_o), rtol=1e-6)
    _assert_same("d num", as_tensor(got_dnum), as_tensor(want_dnum), rtol=1e-6)
    _assert_same("d den", as_tensor(got_dden), as_tensor(want_dden), rtol=1e-6)


# ---------------------------------------------------------------- the kernels' source, emulated on the CPU
@pytest.fixture(scope="session")
def emulated_extension():
    """csrc/linear_attention*.cu built by the host compiler under tests/emulation/cuda_emulation.h, as a module with
    the linear_attention part of _C's interface."""
    return emulated_kernels.build("hk_linear_attention_emulated", "linear_attention_module.cpp",
                                 sorted(emulated_kernels.CSRC.glob("linear_attention*")))


@pytest.fixture
def emulated(emulated_extension, monkeypatch):
    """cuda.py's forward / backward run the emulated kernels on CPU tensors."""
    emulated_kernels.run_on_cpu(la_cuda, emulated_extension, monkeypatch)
    return emulated_extension


def cpu_inputs(B=2, T=130, H=2, K=40, V=24, *, dtype=torch.float32, feature_map="identity", normalize=False,
               states=True, n=None, seed=0, v_mean=0.0, state_scale=1.0, key_sum_scale=1.0):
    """q, k, v [B, T, H, *] in `dtype` and float32 states (or None) on the CPU; see make_inputs."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V) + v_mean
    if normalize and feature_map == "identity":
        q, k = q.abs(), k.abs()
    elif normalize and feature_map == "relu":
        q, k = q + 1, k + 1
    n = B if n is None else n
    S0 = (state_scale * randn(n, H, K, V)).float() if states else None
    z0 = (key_sum_scale * (1 + torch.rand(n, H, K, generator=g, dtype=torch.float64))).float() \
        if (states and normalize) else None
    return [q.to(dtype), k.to(dtype), v.to(dtype), S0, z0]


def check_emulated(inputs, *, feature_map="identity", normalize=False, scale=0.7, eps=1e-6, cu_seqlens=None,
                   needs=None, final_grads=True, tol=None, seed=1, segment=None):
    """cuda.forward / cuda.backward (emulated kernels) against reference.forward / backward on float64 copies, with the
    backend modules' own signatures (what op.py calls); segment: cut sequences into segments of that many chunks.
    Returns (outputs, gradients)."""
    q, k, v, S0, z0 = inputs
    dtype, n = q.dtype, (q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1)
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    options = (feature_map, normalize, scale, eps)
    g = torch.Generator().manual_seed(seed)
    grad_o = torch.randn(v.shape, generator=g, dtype=torch.float64)
    grad_S = torch.randn(n, H, K, V, generator=g, dtype=torch.float64) if final_grads else None
    grad_z = torch.randn(n, H, K, generator=g, dtype=torch.float64) if (final_grads and normalize) else None
    needs = needs or [True, True, True, S0 is not None, z0 is not None]

    outs = la_cuda.forward(q, k, v, S0, z0, *options, True, cu_seqlens, segment=segment)
    grads = la_cuda.backward(grad_o.to(dtype), *(None if t is None else t.float() for t in (grad_S, grad_z)),
                             q, k, v, S0, z0, *options, cu_seqlens, needs, segment=segment)
    wide = [None if t is None else t.double() for t in inputs]
    ref_outs = reference.forward(*wide, *options, True, cu_seqlens)
    ref_grads = reference.backward(grad_o, grad_S, grad_z, *wide, *options, cu_seqlens, needs)
    for name, out, ref in zip(OUT_NAMES, outs, ref_outs):
        assert (out is None) == (ref is None), f"{name}: {out is None=} but {ref is None=}"
        if ref is not None:
            assert out.dtype == (dtype if name == "o" else torch.float32), f"{name}: dtype {out.dtype}"
            assert_close(name, out, ref, dtype, tol)
    for name, need, grad, ref in zip(GRAD_NAMES, needs, grads, ref_grads):
        if need and ref is not None:
            assert grad is not None and grad.shape == ref.shape, f"{name} missing or misshapen"
            assert_close(name, grad, ref, dtype, tol)
        elif not need:
            assert grad is None, f"{name} computed but not asked for"
    return outs, grads


EMULATED_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_shared_memory_formula_matches_the_kernels(emulated_extension):
    """cuda.shared_bytes (unsupported() compares it with the GPU's limit) against the kernels' own, plus static."""
    for code, dtype in enumerate(EMULATED_DTYPES):
        for K, V in ((1, 1), (64, 3), (65, 200), (256, 256)):
            dynamic = emulated_extension.scan_shared_bytes(code, max(K, V))
            assert 0 < la_cuda.shared_bytes(dtype, K, V) - dynamic <= 4096, (dtype, K, V)


@pytest.mark.parametrize("dtype", EMULATED_DTYPES, ids=str)
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalize"])
def test_emulated_matches_reference(emulated, dtype, feature_map, normalize):
    inputs = cpu_inputs(dtype=dtype, feature_map=feature_map, normalize=normalize)
    check_emulated(inputs, feature_map=feature_map, normalize=normalize)


@pytest.mark.parametrize("dtype", EMULATED_DTYPES, ids=str)
@pytest.mark.parametrize("size", [
    *[dict(T=T, K=60, V=100) for T in (1, 63, 64, 65)],           # around the 64-token chunk
    dict(T=65, K=3, V=17), dict(T=65, K=100, V=100),               # tails of 16 and 64
    dict(T=65, K=256, V=60), dict(T=65, K=60, V=256),              # the 256 limit, one side at a time
], ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_emulated_sizes(emulated, dtype, size):
    normalize = (size["T"] + size["K"]) % 2 == 1  # both paths over the sizes, without doubling the list
    inputs = cpu_inputs(B=2 if size["T"] < 65 else 1, H=2, **size, dtype=dtype, feature_map="elu1",
                        normalize=normalize)
    check_emulated(inputs, feature_map="elu1", normalize=normalize, scale=1 / math.sqrt(size["K"]))


def test_emulated_single_feature(emulated):
    """K = V = 1 (without normalize: there o = S / z would not depend on q at all)."""
    check_emulated(cpu_inputs(B=2, T=70, H=3, K=1, V=1, dtype=torch.bfloat16), feature_map="relu")


@pytest.mark.parametrize("dtype", EMULATED_DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalize"])
def test_emulated_varlen(emulated, dtype, normalize):
    cu = [0, 0, 1, 64, 64, 129, 200, 263]  # empty, 1, 63, empty, 65, 71 and 63 tokens
    inputs = cpu_inputs(B=1, T=cu[-1], H=2, K=40, V=72, n=len(cu) - 1, dtype=dtype, feature_map="relu",
                        normalize=normalize)
    outs, _ = check_emulated(inputs, feature_map="relu", normalize=normalize,
                             cu_seqlens=torch.tensor(cu, dtype=torch.int32))
    assert torch.equal(outs[1][[0, 3]], inputs[3][[0, 3]]), "an empty sequence's final state is its initial state"


def test_emulated_strided_inputs(emulated):
    """Slices of one fused projection: read in place with their row strides (16-byte loads do not apply)."""
    B, T, H, K, V = 2, 100, 3, 24, 40
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, T, H, 2 * K + V + 3, generator=g).to(torch.bfloat16)
    q, k, v = qkv[..., :K], qkv[..., K + 1:2 * K + 1], qkv[..., 2 * K + 3:]
    assert la_cuda._rows(q)[0].data_ptr() == q.data_ptr()
    check_emulated([q, k, v, None, None], feature_map="elu1", normalize=True)
    check_emulated([q, k, v, None, None], feature_map="identity", final_grads=False)


@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalize"])
def test_emulated_each_gradient_alone(emulated, normalize):
    """The backward runs only the passes a gradient needs; each alone must still be right."""
    inputs = cpu_inputs(B=2, T=100, H=2, K=36, V=20, feature_map="elu1", normalize=normalize)
    for which in range(5 if normalize else 4):
        needs = [i == which for i in range(5)]
        check_emulated(inputs, feature_map="elu1", normalize=normalize, needs=needs)


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalize"])
def test_emulated_nan_propagates_like_reference(emulated, feature_map, normalize):
    inputs = cpu_inputs(B=1, T=150, H=2, K=24, V=16, feature_map=feature_map, normalize=normalize)
    inputs[0][0, 100, 1, 3] = float("nan")
    inputs[1][0, 20, 0, 5] = float("nan")
    check_emulated(inputs, feature_map=feature_map, normalize=normalize)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_emulated_half_precision_guards(emulated, dtype):
    """float16's range and 16-bit rounding, each guarded in the kernels:
    - a state of ~1e5 (float16 overflows at 65504) is scaled by a power of two before the tensor cores;
    - a key sum of ~1e6 makes d num = grad_o / den ~1e-6, below float16's normal range: stored scaled by F per chunk;
    - values with a large mean make the normalizer's gradient terms cancel to leading order: the state enters as
      hi + lo, den sums P as rounded, and grad_o . o is taken with d num as the gradient passes round it."""
    check_emulated(cpu_inputs(T=200, K=32, V=32, dtype=dtype, state_scale=1e5), scale=1e-3)
    check_emulated(cpu_inputs(T=200, K=32, V=32, dtype=dtype, feature_map="elu1", normalize=True,
                              state_scale=1e6, key_sum_scale=1e6), feature_map="elu1", normalize=True, scale=1.0)
    check_emulated(cpu_inputs(B=1, T=300, K=32, V=32, dtype=dtype, feature_map="elu1", normalize=True, states=False,
                              v_mean=3.0), feature_map="elu1", normalize=True)


# ---------------------------------------------------------------- one-token decode
@pytest.mark.parametrize("dtype", EMULATED_DTYPES, ids=str)
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalize"])
def test_emulated_decode(emulated, dtype, feature_map, normalize):
    """T = 1 (decoding) runs the decode kernel, one 256-thread block per (sequence, head, 64 columns), against the
    reference; with and without states (K = 100: rows in 4 groups of unequal length; V = 72: two column blocks).
    Not normalize without states: one token from zeros gives o = scale * v * (q.k) / (q.k + eps), whose dq and dk
    vanish to leading order (no relative error to measure)."""
    B, H, K, V = 3, 2, 100, 72
    for states in (True,) if normalize else (True, False):
        inputs = cpu_inputs(B=B, T=1, H=H, K=K, V=V, dtype=dtype, feature_map=feature_map, normalize=normalize,
                            states=states, seed=int(states))
        emulated.take_launches()
        check_emulated(inputs, feature_map=feature_map, normalize=normalize, scale=0.1)
        assert emulated.take_launches()[0] == (B * H, 2, 256), "the forward did not run the decode kernel"


@pytest.mark.parametrize("dtype", EMULATED_DTYPES, ids=str)
def test_emulated_decode_token_by_token(emulated, dtype):
    """Decoding 20 tokens one at a time, the state handed over, gives the chunked forward's outputs and final state
    (both within the dtype's tolerance of the float64 reference); without output_final_state no state comes back."""
    q, k, v, S0, z0 = cpu_inputs(B=2, T=20, H=2, K=24, V=40, dtype=dtype, feature_map="elu1", normalize=True)
    options = ("elu1", True, 0.5, 1e-6)
    o_all, S_all, z_all = la_cuda.forward(q, k, v, S0, z0, *options, True, None)
    S, z, steps = S0, z0, []
    for t in range(q.shape[1]):
        o_t, S, z = la_cuda.forward(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], S, z, *options, True, None)
        steps.append(o_t)
    wide = [x.double() for x in (q, k, v, S0, z0)]
    o_ref, S_ref, z_ref = reference.forward(*wide, *options, True, None)
    for name, got, chunked, ref in (("o", torch.cat(steps, 1), o_all, o_ref), ("S", S, S_all, S_ref),
                                     ("z", z, z_all, z_ref)):
        assert_close(f"{name} step by step", got, ref, dtype)
        assert_close(f"{name} chunked", chunked, ref, dtype)
    o_t, S_t, z_t = la_cuda.forward(q[:, :1], k[:, :1], v[:, :1], S0, z0, *options, False, None)
    assert S_t is None and z_t is None
    assert_close("o without the final state", o_t, o_ref[:, :1], dtype)


# ---------------------------------------------------------------- sequences split into segments
def split_launches(N, nseg, H, K, V, normalize, passes):
    """The launches (grid x, grid y, threads) a split launcher enqueues: per pass the segment sums and the pass
    itself, one block of 128 threads per (segment, head, 64 columns), and between them the segment scan, one block
    per (sequence, head, 256 elements of the state and the normalize vector)."""
    launches = []
    for name in passes:
        columns = K if name in ("dq", "dk") else V
        vec = K if normalize and name != "dv" else 0
        scan = (N * nseg * H, math.ceil(columns / 64), 128)
        launches += [scan, (N * H, math.ceil((K * V + vec) / 256), 256), scan]
    return launches


@pytest.mark.parametrize("dtype", EMULATED_DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalize"])
def test_emulated_segment_split(emulated, dtype, normalize):
    """Sequences of 3 chunks cut into segments of 1 chunk (from initial states) and of 2 chunks (2 + 1, from zeros),
    as few sequences x heads on many SMs are on a GPU: the segment sums, their scan into start and final states and
    every pass from its segment's start state. The launches show that the split ran."""
    B, H, K, V = 2, 2, 24, 72
    for segment, nseg, states in ((1, 3, True), (2, 2, False)):
        inputs = cpu_inputs(B=B, T=150, H=H, K=K, V=V, dtype=dtype, feature_map="elu1", normalize=normalize,
                            states=states, seed=segment)
        emulated.take_launches()
        check_emulated(inputs, feature_map="elu1", normalize=normalize, segment=segment)
        passes = ["o", *(["o"] if normalize else []), "dq", "dk", "dv"]
        assert emulated.take_launches() == split_launches(B, nseg, H, K, V, normalize, passes)


def test_segment_plan_splits_only_shorter_segments():
    """A segment as long as the sequence (4 chunks) is no split; on a CPU tensor only a forced length splits."""
    q = torch.empty(2, 200, 2, 8)
    assert not SegmentPlan(q, None, 2, 2, 8, 4).split
    assert not SegmentPlan(q, None, 2, 2, 8).split, "the CPU has no SMs to fill"
    plan = SegmentPlan(q, None, 2, 2, 8, 3)
    assert plan.split and (plan.L, plan.nseg, plan.G) == (3, 2, 4)


@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalize"])
def test_emulated_segment_split_varlen(emulated, normalize):
    """Packed sequences of 0, 1, 63, 0, 65, 71 and 63 tokens in segments of one chunk: 9 segments, on a grid sized
    for 12 (the plan's bound without a host sync); empty sequences hand their initial state through."""
    cu = [0, 0, 1, 64, 64, 129, 200, 263]
    inputs = cpu_inputs(B=1, T=cu[-1], H=2, K=24, V=40, n=len(cu) - 1, dtype=torch.float16, feature_map="relu",
                        normalize=normalize)
    emulated.take_launches()
    outs, _ = check_emulated(inputs, feature_map="relu", normalize=normalize,
                             cu_seqlens=torch.tensor(cu, dtype=torch.int32), segment=1)
    assert emulated.take_launches()[0] == (12 * 2, 1, 128)
    assert torch.equal(outs[1][[0, 3]], inputs[3][[0, 3]]), "an empty sequence's final state is its initial state"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_emulated_segment_split_guards_and_single_gradients(emulated, dtype):
    """float16's state scaling from a segment's start state (a state of ~1e5 summed over segments), and each
    gradient alone through the split passes."""
    check_emulated(cpu_inputs(B=1, T=150, K=32, V=32, dtype=dtype, state_scale=1e5), scale=1e-3, segment=1)
    inputs = cpu_inputs(B=1, T=130, H=2, K=36, V=20, dtype=dtype, feature_map="elu1", normalize=True)
    for which in range(5):
        check_emulated(inputs, feature_map="elu1", normalize=True, needs=[i == which for i in range(5)], segment=2)


# ---------------------------------------------------------------- launchers refuse bad params without a GPU
def _params(**fields):
    base = dict(q=256, k=256, v=256, o=256, grad_o=256, B=2, T=10, H=3, K=16, V=8, N=2, q_row_stride=48,
                q_head_stride=16, k_row_stride=48, k_head_stride=16, v_row_stride=24, v_head_stride=8,
                o_row_stride=24, o_head_stride=8, dtype=0, feature_map=1, normalize=True, scale=1.0, eps=1e-6)
    return EXT.LinearAttentionParams(**{**base, **fields})


@needs_ext
@pytest.mark.parametrize("bad", [
    dict(K=MAX_HEAD_DIM + 1), dict(V=MAX_HEAD_DIM + 1), dict(T=0), dict(N=3), dict(feature_map=3), dict(q=0),
    dict(dtype=7),
    # a split: a negative length, a grid that is not N x segments per sequence (T = 10 is one chunk), packed
    # sequences without the segment tables or with a grid below the bound
    dict(segment_chunks=-1), dict(segment_chunks=1, segments=3, workspace=256),
    dict(B=1, N=2, cu_seqlens=256, segment_chunks=1, segments=3, workspace=256),
    dict(B=1, N=2, cu_seqlens=256, segment_chunks=1, segments=2, segment_offsets=256, segment_sequence=256,
         workspace=256),
], ids=str)
def test_launcher_errors_become_runtime_errors(bad):
    """Invalid params are refused before any launch (so this is safe on a GPU too) and raise RuntimeError."""
    params = _params(**bad)
    with pytest.raises(RuntimeError, match="linear_attention_fwd failed"):
        EXT.linear_attention_fwd(params, 0)
    with pytest.raises(RuntimeError, match="linear_attention_bwd failed"):
        EXT.linear_attention_bwd(params, 0)


@needs_ext
def test_backward_needs_its_workspace():
    params = _params(workspace=0)
    with pytest.raises(RuntimeError, match="linear_attention_bwd failed"):
        EXT.linear_attention_bwd(params, 0)
    params = _params(grad_o=0, workspace=256)
    with pytest.raises(RuntimeError, match="linear_attention_bwd failed"):
        EXT.linear_attention_bwd(params, 0)


@needs_ext
def test_workspace_bytes():
    # den [B*T, H] and ceil(V / 64) partial sums of grad_o . o, float32; nothing without normalize.
    assert EXT.linear_attention_bwd_workspace_bytes(_params(V=130)) == (1 + 3) * 2 * 10 * 3 * 4
    assert EXT.linear_attention_bwd_workspace_bytes(_params(normalize=False)) == 0
    assert EXT.linear_attention_bwd_workspace_bytes(_params(K=MAX_HEAD_DIM + 1)) == 0
    # A split adds the segment sums: [segments, H] states K x V and vectors K, float32 (T = 10: one chunk).
    split = dict(segment_chunks=1, segments=2)
    sums = 2 * 3 * (16 * 8 + 16) * 4
    assert EXT.linear_attention_fwd_workspace_bytes(_params(**split)) == sums
    assert EXT.linear_attention_fwd_workspace_bytes(_params()) == 0
    assert EXT.linear_attention_bwd_workspace_bytes(_params(**split)) == (1 + 1) * 2 * 10 * 3 * 4 + sums
    assert EXT.linear_attention_bwd_workspace_bytes(_params(**split, normalize=False)) == sums


@needs_ext
@pytest.mark.skipif(HAS_CUDA, reason="checks the error path of a machine without a GPU")
def test_launch_without_gpu_raises():
    with pytest.raises(RuntimeError, match="linear_attention_fwd failed"):
        EXT.linear_attention_fwd(_params(), 0)


# ---------------------------------------------------------------- on a GPU, against the float64 reference
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _no_tf32():
    # The float64 reference runs on the GPU too; keep any float32 matmul of the test itself IEEE. (Saved and
    # restored by hand: monkeypatch's undo deletes the attribute, which torch's cuBLAS module does not allow.)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def make_inputs(B=2, T=100, H=2, K=20, V=12, **options):
    """The family's test inputs (tests/test_linear_attention.py) on the GPU: q, k, v in `dtype`, float32 states."""
    return family_tests.make_inputs(B, T, H, K, V, device="cuda", **options)


# The family's run: forward + backward through utils.forward_backward, which asserts that backend="cuda" called the
# _C launchers in both phases.
run = family_tests.run


OUT_NAMES = ("o", "final_state", "final_key_sum")
GRAD_NAMES = ("dq", "dk", "dv", "d_initial_state", "d_initial_key_sum")


def check(inputs, *, cu_seqlens=None, tol=None, **options):
    """backend="cuda" against backend="reference" on float64 copies: every output and every gradient."""
    outs, grads, grads_out = run(inputs, backend="cuda", cu_seqlens=cu_seqlens, **options)
    ref_outs, ref_grads, _ = run([None if t is None else t.double() for t in inputs], grads_out,
                                 backend="reference", cu_seqlens=cu_seqlens, **options)
    dtype = inputs[0].dtype
    for name, out, ref in zip(OUT_NAMES, outs, ref_outs):
        assert out.dtype == (dtype if name == "o" else torch.float32), f"{name}: dtype {out.dtype}"
        assert_close(name, out, ref, dtype, tol)
    for name, grad, ref in zip(GRAD_NAMES, grads, ref_grads):
        if ref is not None:
            assert grad is not None, f"{name} missing"
            assert grad.dtype == inputs[GRAD_NAMES.index(name)].dtype, f"{name}: dtype {grad.dtype}"
            assert_close(name, grad, ref, dtype, tol)
    return outs, grads


@cuda
@requires_cuda
def test_cuda_backend_runs_the_kernels(monkeypatch):
    calls = []
    for name in ("linear_attention_fwd", "linear_attention_bwd"):
        original = getattr(EXT, name)
        monkeypatch.setattr(EXT, name, lambda *a, _o=original, _n=name: (calls.append(_n), _o(*a))[1])
    check(make_inputs(dtype=torch.bfloat16, feature_map="elu1", normalize=True), feature_map="elu1", normalize=True)
    assert calls == ["linear_attention_fwd", "linear_attention_bwd"]


@cuda
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_few_heads_long_sequence_split(dtype):
    """1 sequence x 2 heads x 1 column block on a GPU of many SMs: the plan cuts the sequence into segments (the
    emulation tests check the grids), and outputs and gradients still match over 4096 tokens."""
    inputs = make_inputs(B=1, T=4096, H=2, K=64, V=64, dtype=dtype, feature_map="elu1", normalize=True)
    plan = SegmentPlan(inputs[0], None, 1, 2, 64)
    assert plan.split and plan.G > 2, "expected a split"
    check(inputs, feature_map="elu1", normalize=True, scale=0.125)


@cuda
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalize"])
@pytest.mark.parametrize("states", [True, False], ids=["states", "nostates"])
def test_matches_reference(dtype, feature_map, normalize, states):
    inputs = make_inputs(B=2, T=200, H=3, K=64, V=48, dtype=dtype, feature_map=feature_map, normalize=normalize,
                         states=states)
    check(inputs, feature_map=feature_map, normalize=normalize, scale=0.6, eps=1e-6)


@cuda
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", [
    *[dict(T=T, K=60, V=100) for T in (1, 63, 64, 65, 1000)],       # around the 64-token chunk
    *[dict(T=65, K=K, V=V) for K, V in ((60, 60), (100, 100), (128, 128), (256, 256), (60, 256), (256, 60),
                                        (100, 128), (1, 1), (3, 17))],  # tails of 16 and 64, the 256 limit
    dict(T=1000, K=256, V=256),
    dict(B=1, T=130, H=128, K=16, V=16),                            # many heads
], ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_sizes(dtype, size):
    shape = dict(B=2, H=2) | size
    # Both paths over the sizes without doubling the list; not for K = 1, where o = S / z does not depend on q.
    normalize = size["T"] % 2 == 1 and size["K"] > 1
    inputs = make_inputs(**shape, dtype=dtype, feature_map="elu1", normalize=normalize)
    # Normalize by the number of features: keeps o = O(1) for every K, V.
    check(inputs, feature_map="elu1", normalize=normalize, scale=1 / math.sqrt(size["K"]))


CU_SEQLENS = [0, 0, 1, 64, 64, 129, 200, 263, 1263]  # empty, 1, 63, 0, 65, 71, 63 and 1000 tokens


@cuda
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalize"])
def test_varlen_matches_reference_and_separate_calls(dtype, normalize):
    n = len(CU_SEQLENS) - 1
    inputs = make_inputs(B=1, T=CU_SEQLENS[-1], H=3, K=40, V=72, n=n, dtype=dtype, feature_map="relu",
                         normalize=normalize)
    cu = torch.tensor(CU_SEQLENS, dtype=torch.int32, device="cuda")
    outs, _ = check(inputs, cu_seqlens=cu, feature_map="relu", normalize=normalize)
    # No state crosses a boundary: each sequence alone gives the same output and final state, bit for bit
    # (the kernel runs the same instructions on the same data).
    q, k, v, S0, z0 = inputs
    for i, (start, end) in enumerate(zip(CU_SEQLENS[:-1], CU_SEQLENS[1:])):
        if start == end:
            S_end = outs[1][i]
            assert torch.equal(S_end, S0[i]), f"sequence {i} is empty: its final state is its initial state"
            continue
        initial = (S0[i:i + 1], z0[i:i + 1]) if normalize else S0[i:i + 1]
        o, state = hk.causal_linear_attention(q[:, start:end], k[:, start:end], v[:, start:end],
                                              feature_map="relu", normalize=normalize, initial_state=initial,
                                              output_final_state=True, backend="cuda")
        assert torch.equal(o, outs[0][:, start:end]), f"sequence {i}: o differs from its own call"
        S = state[0] if normalize else state
        assert torch.equal(S, outs[1][i:i + 1]), f"sequence {i}: final state differs from its own call"


@cuda
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_inputs(dtype):
    """q, k, v sliced from one fused projection (read in place with row strides) and heads-major tensors (copied)."""
    B, T, H, K, V = 2, 150, 3, 24, 40
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, T, H, 2 * K + V + 5, generator=g, dtype=torch.float64).to("cuda", dtype)
    q, k, v = qkv[..., :K], qkv[..., K:2 * K], qkv[..., 2 * K + 5:]
    check([q, k, v, None, None], feature_map="elu1", normalize=True)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    check([q, k, v, None, None], feature_map="identity", normalize=False)


@cuda
@requires_cuda
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalize"])
def test_each_gradient_alone(normalize):
    """The backward runs only the passes a gradient needs: ask for one input's gradient at a time."""
    inputs = make_inputs(B=2, T=130, H=2, K=36, V=20, dtype=torch.float32, feature_map="elu1", normalize=normalize)
    ref_inputs = [None if t is None else t.double() for t in inputs]
    g = torch.Generator().manual_seed(5)
    grad_o = torch.randn(inputs[2].shape, generator=g, dtype=torch.float64).to("cuda")

    def grads(tensors, backend, which):
        leaves = [None if t is None else t.detach().clone().requires_grad_(i == which) for i, t in
                  enumerate(tensors)]
        q, k, v, S0, z0 = leaves
        o = hk.causal_linear_attention(q, k, v, feature_map="elu1", normalize=normalize,
                                       initial_state=(S0, z0) if normalize else S0, backend=backend)
        return torch.autograd.grad(o, leaves[which], grad_o.to(o.dtype))[0]

    for which, name in enumerate(GRAD_NAMES):
        if inputs[which] is None:
            continue
        assert_close(name, grads(inputs, "cuda", which), grads(ref_inputs, "reference", which), torch.float32)


@cuda
@requires_cuda
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalize"])
def test_nan_propagates_like_reference(feature_map, normalize):
    inputs = make_inputs(B=1, T=150, H=2, K=24, V=16, dtype=torch.float32, feature_map=feature_map,
                         normalize=normalize)
    inputs[0][0, 100, 1, 3] = float("nan")
    inputs[1][0, 20, 0, 5] = float("nan")
    check(inputs, feature_map=feature_map, normalize=normalize)


@cuda
@requires_cuda
def test_float16_state_beyond_its_range():
    """A state of ~1e5 (float16 overflows at 65504) still gives the right output: the kernels scale the state by a
    power of two before it enters the float16 tensor-core products."""
    q, k, v, S0, _ = make_inputs(B=1, T=300, H=2, K=32, V=32, dtype=torch.float16)
    S0 = S0 * 1e5
    check([q, k, v, S0, None], scale=1e-3)


@cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_long_sequence_elu1_normalize(dtype):
    """T = 65536: the key sum grows like T (kept fp32) and d num = grad_o / den shrinks like 1 / T, below float16's
    normal range, so the gradient passes store it scaled by a power of two per chunk."""
    inputs = make_inputs(B=1, T=65536, H=1, K=32, V=32, dtype=dtype, feature_map="elu1", normalize=True,
                         states=False)
    outs, grads = check(inputs, feature_map="elu1", normalize=True)
    assert all(torch.isfinite(t).all() for t in (*outs, *grads[:3]))


@cuda
@requires_cuda
def test_deterministic_on_the_current_stream():
    inputs = make_inputs(B=2, T=300, H=4, K=64, V=64, dtype=torch.bfloat16, feature_map="elu1", normalize=True)
    expected = run(inputs, backend="cuda", feature_map="elu1", normalize=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = run(inputs, expected[2], backend="cuda", feature_map="elu1", normalize=True)
    torch.cuda.current_stream().wait_stream(stream)
    for a, b in zip((*expected[0], *expected[1]), (*got[0], *got[1])):
        assert torch.equal(a, b)
