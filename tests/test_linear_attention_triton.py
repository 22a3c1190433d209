"""The raw Triton kernels of causal_linear_attention (hadamard_kernels/ops/linear_attention/triton.py) against a naive
float64 formula: every pass (o, dq, dk, dv, d initial state, d initial key sum), every tile path (column blocks,
segment split, varlen tables, the T = 1 decode kernel), chunk boundaries, odd sizes, NaN propagation and the
dtypes the interpreter runs (float64, float32, float16; bf16 needs a GPU).

The naive formula is the masked matrix form per sequence and head, tril(phi(Q) phi(K)^T) V + phi(Q) S_0, with the
normalizer rowsum(tril(...)) + phi(Q) z_0 + eps; its gradients come from autograd. Sizes stay small: the interpreter
runs every program serially.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from guard import check_guards, guard_buffer, guarded_copy
from utils import REL_TOL, assert_close, cpu_backends

from hadamard_kernels.ops.linear_attention.common import FEATURE_MAPS

pytestmark = pytest.mark.skipif("triton" not in cpu_backends(), reason="needs the Triton interpreter "
                                "(TRITON_INTERPRET=1, set by conftest.py on a machine without a GPU)")

if "triton" in cpu_backends():
    from hadamard_kernels.ops.linear_attention import triton as la_triton

GRAD_NAMES = ("dq", "dk", "dv", "d_initial_state", "d_initial_key_sum")
SCALE, EPS = 0.7, 1e-6


# ----------------------------------------------------------------------------------------------- the naive formula
def phi(x, feature_map):
    if feature_map == "identity":
        return x
    if feature_map == "elu1":
        return F.elu(x) + 1
    return torch.relu(x)


def naive(q, k, v, S0, z0, feature_map, normalize, scale, eps, cu_seqlens):
    """float64 (o, S_T, z_T); S0 [N, H, K, V], z0 [N, H, K] tensors (zeros for none)."""
    Q, K = phi(q, feature_map), phi(k, feature_map)
    if cu_seqlens is None:
        pieces = [(b, slice(None)) for b in range(q.shape[0])]
    else:
        bounds = cu_seqlens.tolist()
        pieces = [(0, slice(s, e)) for s, e in zip(bounds[:-1], bounds[1:])]
    outs, states, key_sums = [], [], []
    for n, (b, rows) in enumerate(pieces):
        Qn, Kn, Vn = (x[b, rows].transpose(0, 1) for x in (Q, K, v))  # [H, Tn, D]
        A = torch.tril(Qn @ Kn.transpose(1, 2))  # masked fill: a NaN above the diagonal does not leak
        num = A @ Vn + Qn @ S0[n]
        if normalize:
            den = A.sum(-1) + (Qn @ z0[n][..., None])[..., 0] + eps
            outs.append(scale * num / den[..., None])
        else:
            outs.append(scale * num)
        states.append(S0[n] + Kn.transpose(1, 2) @ Vn)
        key_sums.append(z0[n] + Kn.sum(1))
    if cu_seqlens is None:
        o = torch.stack([x.transpose(0, 1) for x in outs])
    else:
        o = torch.cat([x.transpose(0, 1) for x in outs])[None]
    return o, torch.stack(states), torch.stack(key_sums)


# ----------------------------------------------------------------------------------------------- helpers
def make_inputs(B=1, T=65, H=1, K=16, V=16, *, N=None, dtype=torch.float64, normalize=False, states=True, seed=0,
                positive=False):
    """q, k, v, initial state, initial key sum (None when not normalize or not states), in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    N = B if N is None else N
    randn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    if positive:  # identity + normalize: keep the denominators away from 0
        q, k = q.abs() + 0.1, k.abs() + 0.1
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    S0 = randn(N, H, K, V).to(sdt) if states else None
    z0 = (torch.rand(N, H, K, generator=g, dtype=torch.float64) * 2).to(sdt) if states and normalize else None
    return q.to(dtype), k.to(dtype), v.to(dtype), S0, z0


def run_case(q, k, v, S0, z0, feature_map="identity", normalize=False, *, cu_seqlens=None, scale=SCALE, eps=EPS,
             needs=(True,) * 5, final_grads=True, check=True, seed=1, tol=None, **launch):
    """Forward (with final states) and backward of the raw Triton backend against the naive formula on the float64
    copies of the inputs; returns (triton results, naive results). launch: segment= / config= of the backend."""
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    o, S_T, z_T = la_triton.forward(q, k, v, S0, z0, feature_map, normalize, scale, eps, True, cu_seqlens, **launch)
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(o.shape, generator=g, dtype=torch.float64)
    gS = torch.randn(N, H, K, V, generator=g, dtype=torch.float64) if final_grads else None
    gz = torch.randn(N, H, K, generator=g, dtype=torch.float64) if (final_grads and normalize) else None
    sdt = S_T.dtype
    grads = la_triton.backward(go.to(q.dtype), None if gS is None else gS.to(sdt), None if gz is None else gz.to(sdt),
                               q, k, v, S0, z0, feature_map, normalize, scale, eps, cu_seqlens, list(needs), **launch)

    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    S0_ = (S0.double() if S0 is not None else torch.zeros(N, H, K, V, dtype=torch.float64)).requires_grad_()
    z0_ = (z0.double() if z0 is not None else torch.zeros(N, H, K, dtype=torch.float64)).requires_grad_()
    ref = naive(*leaves, S0_, z0_, feature_map, normalize, scale, eps, cu_seqlens)
    outs = [ref[0], ref[1]] + ([ref[2]] if normalize else [])
    gouts = [go, gS if gS is not None else torch.zeros_like(ref[1])] + (
        [gz if gz is not None else torch.zeros_like(ref[2])] if normalize else [])
    ref_grads = torch.autograd.grad(outs, [*leaves, S0_, z0_], gouts, allow_unused=True)
    if check:
        dtype = q.dtype
        assert o.dtype == q.dtype and S_T.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_close("o", o, ref[0], dtype, tol)
        assert_close("final_state", S_T, ref[1], dtype, tol)
        if normalize:
            assert_close("final_key_sum", z_T, ref[2], dtype, tol)
        else:
            assert z_T is None
        for name, need, got, want in zip(GRAD_NAMES, needs, grads, ref_grads):
            if name == "d_initial_key_sum" and not normalize:
                assert got is None, name
            elif not need:
                assert got is None, f"{name} was not asked for"
            else:
                assert got.dtype == (q.dtype if name in ("dq", "dk", "dv") else sdt), name
                assert_close(name, got, want, dtype, tol)
    return (o, S_T, z_T, grads), (ref, ref_grads)


# ----------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("T", [63, 64, 65, 130])
def test_chunk_boundaries(T):
    """T around the 64-token chunk, every feature map / normalize pair spread over the cases."""
    fm = FEATURE_MAPS[T % 3]
    normalize = T % 2 == 1
    run_case(*make_inputs(T=T, H=2, K=24, V=20, normalize=normalize, seed=T), fm, normalize)


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("normalize", [False, True])
def test_feature_maps_and_normalize(feature_map, normalize):
    positive = feature_map == "identity" and normalize
    run_case(*make_inputs(T=100, K=16, V=24, normalize=normalize, positive=positive), feature_map, normalize)


@pytest.mark.parametrize("K,V", [(1, 1), (60, 100), (100, 60), (1, 33)])
def test_odd_head_dims(K, V):
    """Dk, Dv not multiples of 16 (masked columns, DA padded to a power of 2), odd H. (With Dk = 1 and normalize,
    o = scale * S / z does not depend on q: dq is rounding noise, so Dk = 1 runs unnormalized.)"""
    normalize = K > 1
    run_case(*make_inputs(T=70, H=3 if K * V < 100 else 1, K=K, V=V, normalize=normalize), "elu1", normalize)


@pytest.mark.parametrize("feature_map, normalize", [("elu1", True), ("relu", False)])
def test_wide_head_dims(feature_map, normalize):
    """Dk = 200, Dv = 136: every pass on the 256-wide a, b tiles (padded), in 16-column blocks of c."""
    run_case(*make_inputs(T=70, K=200, V=136, normalize=normalize), feature_map, normalize)


@pytest.mark.parametrize("wgmma", [True, False], ids=["sm90-forms", "sm80-forms"])
@pytest.mark.parametrize("feature_map, normalize", [("identity", False), ("elu1", True)])
def test_wide_head_dims_fp16(feature_map, normalize, wgmma, monkeypatch):
    """fp16 at Dk = 200, Dv = 136: the tf32 dot against the state in both of its forms (transposed where the target
    has wgmma: dq, dk and, with the identity map and no key sum, o and dv; direct otherwise)."""
    monkeypatch.setattr(la_triton, "_has_wgmma", lambda q: wgmma)
    run_case(*make_inputs(T=70, K=200, V=136, dtype=torch.float16, normalize=normalize), feature_map, normalize)


def test_batch_and_heads_without_states():
    """B > 1, odd H, no initial state (zeros) and no final-state gradients."""
    run_case(*make_inputs(B=2, T=66, H=3, K=8, V=12, states=False), "relu", False, final_grads=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("normalize", [False, True])
def test_low_precision(dtype, normalize):
    """fp32 (ieee dots) and fp16 (tf32 inter-chunk dot, fp32 key sum) within the DESIGN.md targets."""
    run_case(*make_inputs(T=130, H=2, K=32, V=48, dtype=dtype, normalize=normalize), "elu1", normalize)


@pytest.mark.parametrize("config", [dict(BC=16), dict(BC=32), dict(BC=64), dict(BC=128)])
def test_column_block_paths(config):
    """Every column-block width of the chunk and segment-sum kernels, with the state split over several blocks."""
    run_case(*make_inputs(T=80, K=40, V=72, normalize=True), "elu1", True, config=config, segment=1)


@pytest.mark.parametrize("segment", [1, 2])
@pytest.mark.parametrize("normalize", [False, True])
def test_segment_split(segment, normalize):
    """Sequences cut into segments: segment sums, the in-place scan (which writes the final states) and the chunk
    kernel starting from scanned states, forward and every backward pass (reverse scans for dk, dv)."""
    run_case(*make_inputs(B=2, T=200, K=20, V=24, normalize=normalize, seed=segment), "elu1", normalize,
             segment=segment)


VARLEN_CASES = {
    "empty_first": [0, 0, 70, 71, 200],
    "empty_middle": [0, 63, 63, 129, 130],
    "one_sequence": [0, 130],
}


@pytest.mark.parametrize("case", list(VARLEN_CASES))
@pytest.mark.parametrize("segment", [None, 1])
def test_varlen(case, segment):
    """Packed sequences, one of them empty and lengths off the chunk grid; an empty sequence keeps its initial state
    as final state and passes the final-state gradients to the initial ones."""
    cu = torch.tensor(VARLEN_CASES[case], dtype=torch.int32)
    normalize = segment is None
    q, k, v, S0, z0 = make_inputs(T=int(cu[-1]), H=2, K=12, V=20, N=len(cu) - 1, normalize=normalize)
    run_case(q, k, v, S0, z0, "elu1", normalize, cu_seqlens=cu, segment=segment)


def test_varlen_matches_separate_calls():
    """A packed batch gives, per sequence, what a call on that sequence alone gives."""
    cu = torch.tensor([0, 40, 40, 107], dtype=torch.int32)
    q, k, v, S0, z0 = make_inputs(T=107, K=8, V=8, N=3, normalize=True)
    o, S_T, z_T = la_triton.forward(q, k, v, S0, z0, "elu1", True, SCALE, EPS, True, cu)
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if e == s:
            assert torch.equal(S_T[n], S0[n]) and torch.equal(z_T[n], z0[n])
            continue
        o1, S1, z1 = la_triton.forward(q[:, s:e], k[:, s:e], v[:, s:e], S0[n:n + 1], z0[n:n + 1], "elu1", True,
                                       SCALE, EPS, True, None)
        assert_close("o", o[:, s:e], o1.double(), torch.float64)
        assert_close("final_state", S_T[n:n + 1], S1.double(), torch.float64)
        assert_close("final_key_sum", z_T[n:n + 1], z1.double(), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_decode_step(dtype, feature_map):
    """T = 1 without cu_seqlens runs the decode kernel; its backward runs the chunked passes."""
    normalize = feature_map != "identity"
    run_case(*make_inputs(B=3, T=1, H=1, K=20, V=36, dtype=dtype, normalize=normalize), feature_map, normalize)


def test_decode_equals_chunked_forward():
    """The decode kernel and the chunked kernel (forced by a config) agree on one token."""
    q, k, v, S0, z0 = make_inputs(B=2, T=1, H=3, K=20, V=36, normalize=True)
    fast = la_triton.forward(q, k, v, S0, z0, "elu1", True, SCALE, EPS, True, None)
    assert la_triton._decode_kernel is not None
    chunked = la_triton.forward(q, k, v, S0, z0, "elu1", True, SCALE, EPS, True, None, config=dict(BC=32))
    for name, a, b in zip(("o", "final_state", "final_key_sum"), fast, chunked):
        assert_close(name, a, b, torch.float64)


@pytest.mark.parametrize("K,V", [(5, 7), (1, 1)])
def test_decode_without_state_or_final_state(K, V):
    q, k, v, _, _ = make_inputs(B=2, T=1, H=1, K=K, V=V, states=False)
    o, S_T, z_T = la_triton.forward(q, k, v, None, None, "relu", False, 1.0, 0.0, False, None)
    assert S_T is None and z_T is None
    ref = naive(q, k, v, torch.zeros(2, 1, K, V, dtype=q.dtype), torch.zeros(2, 1, K, dtype=q.dtype), "relu", False,
                1.0, 0.0, None)[0]
    assert_close("o", o, ref, torch.float64)


@pytest.mark.parametrize("needs", [(False, False, False, True, True), (True, False, False, False, False),
                                   (False, True, False, False, False), (False, False, True, False, False),
                                   (False, False, False, False, True)])
def test_needs_subsets(needs):
    """Only the gradients asked for are returned (the others are None), and they are right."""
    run_case(*make_inputs(T=70, K=8, V=8, normalize=True), "elu1", True, needs=needs)


def test_strided_inputs():
    """q, k, v sliced from wider tensors (non-contiguous) give the contiguous result."""
    q, k, v, S0, z0 = make_inputs(T=70, H=2, K=16, V=16, normalize=True)
    wide = torch.cat([q, k, v], dim=-1)
    qs, ks, vs = wide[..., :16], wide[..., 16:32], wide[..., 32:]
    assert not qs.is_contiguous()
    run_case(qs, ks, vs, S0, z0, "elu1", True)


def test_nan_in_q_propagates_like_the_formula():
    """A NaN in q[t0] (second chunk) makes exactly o[t0] NaN (and nothing in the states); in the backward it reaches
    dv at rows <= t0 and d initial state at row j (as the formula says), dk at column j of rows <= t0 and, through
    the chunk's masked product, possibly later rows of that chunk only; dq does not depend on q (identity)."""
    q, k, v, S0, z0 = make_inputs(T=150, H=2, K=8, V=8)
    t0, j, h = 70, 3, 1
    q[0, t0, h, j] = float("nan")
    (o, S_T, _, grads), (ref, ref_grads) = run_case(q, k, v, S0, z0, "identity", False, check=False)
    assert_close("o", o, ref[0], torch.float64)
    assert torch.isnan(o[0, :, h]).any(-1).nonzero().flatten().tolist() == [t0]
    assert_close("final_state", S_T, ref[1], torch.float64)
    dq, dk, dv, dS0, _ = grads
    assert_close("dq", dq, ref_grads[0], torch.float64)
    assert_close("dv", dv, ref_grads[2], torch.float64)
    assert_close("d_initial_state", dS0, ref_grads[3], torch.float64)
    assert torch.isnan(dk[0, :t0 + 1, h, j]).all()
    assert not torch.isnan(dk[0, 128:]).any() and not torch.isnan(dk[0, :, 0]).any()
    assert not torch.isnan(dk[0, :, h, :j]).any() and not torch.isnan(dk[0, :, h, j + 1:]).any()


@pytest.mark.parametrize("feature_map", ["elu1", "relu"])
def test_nan_in_q_normalized(feature_map):
    """With normalize the NaN row of q stays in its row of o; other heads and other sequences stay finite in
    every gradient."""
    cu = torch.tensor([0, 90, 150], dtype=torch.int32)
    q, k, v, S0, z0 = make_inputs(T=150, H=2, K=8, V=8, N=2, normalize=True)
    q[0, 100, 1, 2] = float("nan")
    (o, S_T, z_T, grads), (ref, _) = run_case(q, k, v, S0, z0, feature_map, True, cu_seqlens=cu, check=False)
    assert_close("o", o, ref[0], torch.float64)
    assert torch.isnan(o[0, :, 1]).any(-1).nonzero().flatten().tolist() == [100]
    assert_close("final_state", S_T, ref[1], torch.float64)
    assert_close("final_key_sum", z_T, ref[2], torch.float64)
    for name, g in zip(GRAD_NAMES, grads):
        if name in ("dq", "dk", "dv"):
            assert not torch.isnan(g[0, :90]).any() and not torch.isnan(g[0, :, 0]).any(), name
        else:
            assert not torch.isnan(g[0]).any() and not torch.isnan(g[:, 0]).any(), name


def test_key_sum_beyond_fp16_range():
    """fp16 with elu1 + normalize and a key sum past fp16's range (65504): it and den stay fp32, so o and the final
    key sum are right and the gradients finite (they are ~1e-7 here, at fp16's subnormal limit, so only finite)."""
    q, k, v, _, _ = make_inputs(T=130, K=16, V=16, dtype=torch.float16, normalize=True, states=False)
    z0 = torch.full((1, 1, 16), 70000.0)
    (o, _, z_T, grads), (ref, _) = run_case(q, k, v, None, z0, "elu1", True, final_grads=False, check=False)
    assert_close("o", o, ref[0], torch.float16)
    assert_close("final_key_sum", z_T, ref[2], torch.float16)
    assert z_T.dtype == torch.float32 and z_T.min() > 65504
    for name, g in zip(GRAD_NAMES, grads):
        assert torch.isfinite(g).all(), name


@pytest.mark.parametrize("segment", [None, 1])
@pytest.mark.parametrize("varlen", [False, True])
def test_stores_stay_in_bounds(segment, varlen):
    """Every pass launched into guard buffers (tests/guard.py), with ragged column blocks (BC = 16 over Dk = 20,
    Dv = 36), a ragged last chunk and, for varlen, an empty sequence: each output (o, den, x, dq, dk, dv, the final
    states and the initial-state gradients) is fully written, nothing past it is, and no masked-off load reads an
    input's guard (its NaN would reach the values, which match the formula)."""
    cu = torch.tensor([0, 5, 5, 70], dtype=torch.int32) if varlen else None
    B, T, H, K, V = (1, 70, 2, 20, 36) if varlen else (2, 70, 2, 20, 36)
    N = B if cu is None else len(cu) - 1
    q, k, v, S0, z0 = make_inputs(B=B, T=T, H=H, K=K, V=V, N=N, normalize=True)
    g = torch.Generator().manual_seed(3)
    go, G, g_z = torch.randn(B, T, H, V, generator=g), torch.randn(N, H, K, V, generator=g), torch.randn(N, H, K,
                                                                                                       generator=g)
    go, G, g_z = go.double(), G.double(), g_z.double()
    ins = {name: guarded_copy(t, name=name).view for name, t in
           dict(q=q, k=k, v=v, S0=S0, z0=z0, do=go, G=G, g_z=g_z).items()}
    outs = {name: guard_buffer(shape, torch.float64, name=name) for name, shape in
            dict(o=v.shape, den=q.shape[:3], x=q.shape[:3], S_T=S0.shape, z_T=z0.shape, dq=q.shape, dk=k.shape,
                 dv=v.shape, dS0=S0.shape, dz0=z0.shape).items()}
    o_ = {name: guard.view for name, guard in outs.items()}
    options = dict(feature_map="elu1", normalize=True, scale=SCALE, eps=EPS, config=dict(BC=16))
    qg, kg, vg = ins["q"], ins["k"], ins["v"]
    plan = lambda DC: la_triton.SegmentPlan(qg, cu, N, H, DC, segment)  # noqa: E731
    la_triton._pass(la_triton._MODE_O, qg, kg, vg, None, None, o_["den"], o_["o"], ins["S0"], ins["z0"], o_["S_T"],
                    o_["z_T"], plan=plan(V), store_den=True, **options)
    la_triton._den_grad(ins["do"], o_["o"], SCALE, o_["x"])
    la_triton._pass(la_triton._MODE_DQ, qg, kg, vg, ins["do"], o_["x"], o_["den"], o_["dq"], ins["S0"], ins["z0"],
                    None, None, plan=plan(K), **options)
    la_triton._pass(la_triton._MODE_DK, qg, kg, vg, ins["do"], o_["x"], o_["den"], o_["dk"], ins["G"], ins["g_z"],
                    None, o_["dz0"], plan=plan(K), **options)
    la_triton._pass(la_triton._MODE_DV, qg, kg, vg, ins["do"], o_["x"], o_["den"], o_["dv"], ins["G"], None,
                    o_["dS0"], None, plan=plan(V), **options)
    check_guards(*outs.values())

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, S0, z0)]
    ref = naive(*leaves, "elu1", True, SCALE, EPS, cu)
    ref_grads = torch.autograd.grad(ref, leaves, (go, G, g_z))
    for name, want in zip(("o", "S_T", "z_T", "dq", "dk", "dv", "dS0", "dz0"), (*ref, *ref_grads)):
        assert_close(name, o_[name], want, torch.float64)


def test_unsupported_sizes():
    q = torch.zeros(1, 2, 1, 257)
    v = torch.zeros(1, 2, 1, 8)
    assert "256" in la_triton.unsupported(q, q, v, None, None, "identity", False, 1.0, 1e-6, False, None)
    assert la_triton.unsupported(q[..., :256], q[..., :256], v, None, None, "identity", False, 1.0, 1e-6, False,
                                 None) is None


def test_tolerances_cover_the_dtypes_used():
    assert all(d in REL_TOL for d in (torch.float64, torch.float32, torch.float16))
