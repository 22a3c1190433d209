"""The benchmark harness on the CPU: the eager baselines against the reference, the cases and their counts, the
accuracy gate, the timer and the memory columns, one suite test (skips, wrong results), the report built from a
record (derived numbers, markdown, README block, charts), with fake timings where a GPU would be needed.
(tests/test_bench_pipeline.py runs the whole pipeline on the CPU.)"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from utils import assert_close

import hadamard_kernels as hk

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))  # the benchmark modules import their siblings, as they do when run from there
import cases  # noqa: E402
import chart  # noqa: E402
import measure  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
import suite  # noqa: E402

SVG = "{http://www.w3.org/2000/svg}"

TINY = [
    cases.Case("poly_chain", "tiny", M=13, d=10, k=6, N=3, dtype=torch.float32),
    cases.Case("poly_ncp", "tiny", M=13, d=10, k=6, N=3, dtype=torch.float32),
    cases.Case("CCP", "tiny", M=5, d=12, k=6, N=3, dtype=torch.float32, channels=3),
    cases.Case("NCP", "tiny", M=5, d=16, k=6, N=2, dtype=torch.float32),
    cases.LinearAttentionCase("tiny", B=2, T=13, H=3, Dk=5, Dv=4, dtype=torch.float32, scale=0.5),
    cases.LinearAttentionCase("tiny-chunked", B=1, T=150, H=2, Dk=8, Dv=6, dtype=torch.float32, feature_map="elu1",
                              normalize=True, eager="chunked"),
    cases.PolySACase("tiny", B=3, N=5, C=4, dtype=torch.float32),
    cases.PolyGateCase("tiny", B=2, W=3, H=5, C=7, dtype=torch.float32),
    cases.PolyGateCase("tiny-noshift", B=2, W=3, H=5, C=7, spatial=False, dtype=torch.float32),
    cases.LRNNCase("lrnn", "tiny", M=7, d=3, rank=5, dbar=4, activation="spder", dtype=torch.float32),
    cases.LRNNCase("LRNN", "tiny", M=7, d=2, rank=6, dbar=3, layers=3, dtype=torch.float32),
    cases.LinearAttentionCase("tiny-decode", B=3, T=1, H=2, Dk=5, Dv=4, dtype=torch.float32, scale=0.5, decode=True),
    cases.LinearAttentionCase("tiny-decode-norm", B=3, T=1, H=2, Dk=5, Dv=4, dtype=torch.float32, feature_map="elu1",
                              normalize=True, decode=True),
]


def _t(g, *shape, grad=False):
    return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=grad)


# ---------------------------------------------------------------- the eager formulas are the ops
@pytest.mark.parametrize("mode", ["ccp", "product"])
@pytest.mark.parametrize("activation", ["identity", "relu", "gelu"])
@pytest.mark.parametrize("bias", [True, False])
def test_poly_chain_eager_formula_is_the_op(mode, activation, bias):
    g = torch.Generator().manual_seed(0)
    x, weight, b = _t(g, 2, 7, 9), _t(g, 4, 5, 9), _t(g, 4, 5) if bias else None
    options = dict(mode=mode, activation=activation, scale=0.6)
    assert_close("eager", cases.poly_chain_eager(x, weight, b, **options),
                 hk.poly_chain(x, weight, b, **options, backend="reference"))


@pytest.mark.parametrize("N", [1, 3])
def test_poly_ncp_eager_formula_is_the_op(N):
    g = torch.Generator().manual_seed(1)
    args = (_t(g, 11, 8), _t(g, N, 5, 8), _t(g, N, 5), _t(g, N - 1, 5, 5), _t(g, N - 1, 5))
    assert_close("eager", cases.poly_ncp_eager(*args), hk.poly_ncp(*args, backend="reference"))


@pytest.mark.parametrize("feature_map", ["identity", "elu1", "relu"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("form", ["masked", "chunked"])
def test_linear_attention_eager_formula_is_the_op(feature_map, normalize, form):
    """Forward and every gradient of the eager forms against the op's reference; the chunked form with chunks of 4
    on T = 13 (several chunks, a ragged last one)."""
    g = torch.Generator().manual_seed(2)
    q, k, v, grad = _t(g, 2, 13, 3, 5, grad=True), _t(g, 2, 13, 3, 5, grad=True), _t(g, 2, 13, 3, 4, grad=True), \
        _t(g, 2, 13, 3, 4)
    if normalize and feature_map == "identity":  # keep the normalizer away from zero
        q, k = (x.detach().abs().requires_grad_() for x in (q, k))
    options = dict(feature_map=feature_map, normalize=normalize, scale=0.7, eps=1e-3)
    eager = (cases.linear_attention_masked if form == "masked"
             else functools.partial(cases.linear_attention_chunked, chunk=4))
    results = []
    for fn in (eager, functools.partial(hk.causal_linear_attention, backend="reference")):
        out = fn(q, k, v, **options)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    for name, got, ref in zip(("o", "dq", "dk", "dv"), *results):
        assert_close(name, got, ref)


def test_poly_sa_eager_formula_and_counts():
    """The survey's formula (the eager baseline) is the op; 6·B·N·C² model FLOPs forward, bytes as documented."""
    g = torch.Generator().manual_seed(0)
    args = (_t(g, 2, 5, 4), _t(g, 4, 4), _t(g, 4, 4), _t(g, 4, 4), _t(g, 1), _t(g, 1))
    assert_close("eager", cases.poly_sa_eager(*args), hk.poly_sa(*args, backend="reference"))
    case = cases.PolySACase("x", B=2, N=5, C=4)
    assert case.flops("fwd") == 6 * 2 * 5 * 16 and case.flops("fwd+bwd") == 3 * case.flops("fwd")
    assert case.min_bytes("fwd") == 2 * (2 * 40 + 3 * 16 + 2)
    assert case.describe()["shape"] == "B=2 N=5 C=4"
    assert {(c.B, c.N, c.C) for c in cases.poly_sa_cases()} == {(64, 197, 384), (32, 3136, 96), (8, 16384, 512)}


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 4, 9), (2, 4, 1, 8)])
def test_spatial_shift_eager_is_the_op(shape):
    """The eager shift (concatenated slices) is hk.spatial_shift, odd sizes and single-pixel axes included."""
    x = torch.randn(*shape, dtype=torch.float64)
    assert torch.equal(cases.spatial_shift_eager(x), hk.spatial_shift(x))


@pytest.mark.parametrize("spatial", [True, False])
@pytest.mark.parametrize("alpha", ["none", "scalar", "channel"])
def test_poly_gate_eager_formula_is_the_op(spatial, alpha):
    """The PolyMlp formula between the linear layers, forward and every gradient, against the op's reference."""
    g = torch.Generator().manual_seed(3)
    C = 7
    a, b = _t(g, 2, 3, 5, C, grad=True), _t(g, 2, 3, 5, C, grad=True)
    params = [_t(g, C, grad=True) for _ in range(4)]
    al = {"none": None, "scalar": _t(g, 1, grad=True), "channel": _t(g, C, grad=True)}[alpha]
    inputs = [t for t in (a, b, *params, al) if t is not None]
    grad = _t(g, 2, 3, 5, C)
    results = []
    for fn in (cases.poly_gate_eager, functools.partial(hk.poly_gate, backend="reference")):
        out = fn(a, b, *params, al, eps=1e-5, spatial_shift=spatial)
        results.append((out, *torch.autograd.grad(out, inputs, grad)))
    for i, (got, ref) in enumerate(zip(*results)):
        assert_close(f"output {i}" if i == 0 else f"gradient {i - 1}", got, ref)


@pytest.mark.parametrize("activation", ["sin", "spder", "arctan", "tanh", "mlp"])
def test_lrnn_eager_formula_is_the_op(activation):
    """DESIGN.md §4 as the eager baseline writes it, forward and every gradient (g_params too), against the op's
    reference; sin with omega != 1, a gamma of our own for tanh."""
    g = torch.Generator().manual_seed(4)
    rank, dbar, h = 3, 4, 2
    x, weight, bias = _t(g, 2, 5, 3, grad=True), _t(g, rank * dbar, 3, grad=True), _t(g, rank * dbar, grad=True)
    options = dict(rank=rank, dbar=dbar, activation=activation, omega=1.7 if activation == "sin" else 1.0,
                   gamma=0.3 if activation == "tanh" else None)
    g_params = _t(g, 3, rank, dbar, h, grad=True) if activation == "mlp" else None
    inputs = [t for t in (x, weight, bias, g_params) if t is not None]
    grad = _t(g, 2, 5, rank)
    results = []
    for fn in (cases.lrnn_product_eager, functools.partial(hk.lrnn_product, backend="reference")):
        out = fn(x, weight, bias, g_params=g_params, **options)
        results.append((out, *torch.autograd.grad(out, inputs, grad)))
    for i, (got, ref) in enumerate(zip(*results)):
        assert_close(f"output {i}" if i == 0 else f"gradient {i - 1}", got, ref)


def test_lrnn_deep_eager_is_the_module():
    torch.manual_seed(0)
    model = hk.nn.LRNN(2, [6, 5], 3, dbar=3, backend="reference").double()
    x = torch.randn(7, 2, dtype=torch.float64)
    assert_close("deep LRNN", cases.lrnn_deep_eager(model, x), model(x))


# ---------------------------------------------------------------- cases
def test_case_counts():
    case = cases.Case("poly_chain", "x", M=8, d=5, k=3, N=2, dtype=torch.bfloat16)
    assert case.flops("fwd") == 2 * 8 * 2 * 3 * 5 and case.flops("fwd+bwd") == 3 * case.flops("fwd")
    x, w, y = 8 * 5, 2 * 3 * (5 + 1), 8 * 3
    assert case.min_bytes("fwd") == 2 * (x + w + y)
    assert case.min_bytes("fwd+bwd") == case.min_bytes("fwd+bwd-graph") == 2 * (x + w + y) + 2 * (2 * x + 2 * w + y)
    ncp = cases.Case("poly_ncp", "x", M=8, d=5, k=3, N=2)
    assert ncp.flops("fwd") == case.flops("fwd") + 2 * 8 * 1 * 3 * 3
    gate = cases.PolyGateCase("x", B=2, W=3, H=4, C=8)
    assert gate.flops("fwd+bwd") == 0, "memory-bound: judged by GB/s"
    assert gate.min_bytes("fwd") == 2 * 3 * 24 * 8 and gate.min_bytes("bwd") == 2 * 5 * 24 * 8
    assert gate.min_bytes("fwd+bwd") == 2 * 8 * 24 * 8
    inr = cases.LRNNCase("lrnn", "x", M=10, d=2, rank=4, dbar=3)
    assert inr.flops("fwd") == 2 * 10 * 2 * 12 and inr.flops("fwd+bwd") == 3 * inr.flops("fwd")
    assert inr.min_bytes("fwd") == 2 * (10 * 2 + 3 * 12 + 10 * 4)
    deep = cases.LRNNCase("LRNN", "x", M=10, d=2, rank=4, dbar=3, layers=2, out_features=5)
    assert deep.flops("fwd") == 2 * 10 * (2 * 12 + 4 * 12 + 4 * 5)
    assert deep.min_bytes("fwd") == 2 * (10 * 2 + (3 * 12 + 5 * 12 + 5 * 5 + 2 * 4 * 2) + 10 * 5)
    with pytest.raises(ValueError, match="mode must be one of"):
        case.flops("backward")


def test_gpu_run_order_takes_every_headline_first(monkeypatch):
    """One GPU call runs a few minutes of a suite that needs far more: the headline mode of every case (fwd+bwd; fwd
    for a decode step) for every provider but max-autotune comes before any other mode, quick cases first; the
    size sweeps and then max-autotune come last."""
    import suite

    monkeypatch.setattr(suite, "DEVICE", "cuda")
    every = cases.all_cases()
    runs = sorted((suite.run_key(i, case, provider, mode), case, provider, mode)
                  for i, case in enumerate(every) for provider, mode in case.runs("cuda"))
    priorities = [key[0] for key, *_ in runs]
    assert priorities == sorted(priorities) and set(priorities) == {0, 1, 2, 3}
    headline = [(case, provider, mode) for key, case, provider, mode in runs if key[0] == 0]
    main_cases = [case for case in every if not case.sweep]
    assert {case for case, _, _ in headline} == set(main_cases)
    assert all(mode == ("fwd" if case.decode else "fwd+bwd") for case, _, mode in headline
               if isinstance(case, cases.LinearAttentionCase))
    assert all(mode == "fwd+bwd" and provider != "max-autotune" for case, provider, mode in headline
               if not isinstance(case, cases.LinearAttentionCase))
    quick = cases.all_cases(quick=True)
    first_cases = list(dict.fromkeys(case for case, _, _ in headline))
    assert first_cases[:len(quick)] == quick, "the quick cases' headlines first"
    assert all(provider == "max-autotune" for key, _, provider, _ in runs if key[0] == 3)
    assert all(case.sweep for key, case, _, _ in runs if key[0] == 2)


def test_case_lists():
    """Issue 19's shapes and the MNIST CCP, issue 18's MONet shapes; unique ids; the quick cases first, taking every
    family in turn; one sweep per family, on one axis, sizes increasing."""
    every = cases.all_cases()
    ids = [c.id for c in every]
    assert len(ids) == len(set(ids)), "case ids are unique"
    quick = cases.all_cases(quick=True)
    assert every[:len(quick)] == quick, "the quick cases run first (a time budget cuts the tail)"
    assert [c.op for c in quick[:7]] == ["poly_chain", "linear_attention", "poly_ncp", "poly_gate", "CCP", "poly_sa",
                                         "lrnn"]
    for op in ("poly_chain", "poly_ncp"):
        shapes = {(c.d, c.k, c.N) for c in every if c.op == op and c.M == 65536 and c.dtype == torch.bfloat16
                  and not c.sweep}
        assert shapes == {(64, 64, 4), (256, 256, 8), (1024, 1024, 4), (4096, 4096, 2)}, op
    assert any(c.op == "poly_chain" and c.dtype == torch.float16 for c in every)
    assert any(c.op == "CCP" and (c.M, c.d, c.k, c.N) == (4096, 784, 16, 4) for c in every), "the survey's MNIST CCP"
    gates = {(c.B, c.W, c.H, c.C, c.spatial) for c in cases.poly_gate_cases() if c.dtype == torch.bfloat16}
    assert gates == {(64, 28, 28, C, s) for C in (576, 1152) for s in (True, False)}
    lrnn = {(c.op, c.M, c.d, c.rank, c.dbar, c.layers) for c in cases.lrnn_cases()}
    assert {("lrnn", 65536, 2, 256, 8, 1), ("LRNN", 65536, 2, 512, 16, 4)} <= lrnn, "issue 17's INR and deep LRNN"
    sweeps = [c for c in every if c.sweep]
    assert {c.op for c in sweeps} == {"poly_chain", "poly_ncp", "linear_attention", "poly_sa", "poly_gate", "lrnn"}
    for op in {c.op for c in sweeps}:
        points = [c for c in sweeps if c.op == op]
        assert len({c.sweep for c in points}) == 1 and len(points) >= 4, op
        assert [c.sweep_x for c in points] == sorted(c.sweep_x for c in points), op
    assert all(c.dtype == torch.float32 for c in cases.cpu_cases())


def test_runs():
    """What each case times: fwd, bwd, fwd+bwd per provider (compiled: no bwd), fwd+bwd from a CUDA graph on the
    small cases, max-autotune fwd+bwd where marked, sweeps fwd+bwd only; on a CPU the reference, the interpreter and
    eager."""
    mnist = cases.module_cases()[0]
    runs = mnist.runs("cuda")
    assert ("triton", "fwd+bwd-graph") in runs and ("compiled", "fwd") in runs and ("compiled", "bwd") not in runs
    assert ("eager", "bwd") in runs and not any(p == "max-autotune" for p, _ in runs)
    headline = cases.poly_chain_cases()[1]
    assert headline.runs("cuda")[-1] == ("max-autotune", "fwd+bwd") and headline.runs("cuda").count(
        ("max-autotune", "fwd+bwd")) == 1
    sweep = next(c for c in cases.sweep_cases() if not c.graph)
    assert {m for _, m in sweep.runs("cuda")} == {"fwd+bwd"}
    # poly_chain cases also time the cuda backend's Hopper forward (its backward is cuda's: no bwd of its own)
    assert ("cuda-wgmma", "fwd") in headline.runs("cuda") and ("cuda-wgmma", "bwd") not in headline.runs("cuda")
    assert not any(p == "cuda-wgmma" for p, _ in mnist.runs("cuda")), "the modules and poly_ncp have no wgmma kernel"
    la = cases.linear_attention_cases()[0]
    assert {p for p, _ in la.runs("cuda")} == {"eager", "compiled", "fla", "triton", "cuda"}
    assert {p for p, _ in la.runs("cpu")} == {"eager", "reference", "triton"}
    assert {m for _, m in la.runs("cpu")} == {"fwd", "bwd", "fwd+bwd"}


def test_linear_attention_case_counts():
    C = cases.CHUNK
    case = cases.LinearAttentionCase("x", B=2, T=100, H=3, Dk=8, Dv=6)
    per_token = 2 * C * (8 + 6) + 4 * 8 * 6
    assert case.flops("fwd") == 2 * 100 * 3 * per_token
    assert case.flops("bwd") == 2 * case.flops("fwd") and case.flops("fwd+bwd") == 3 * case.flops("fwd")
    normalized = dataclasses.replace(case, normalize=True)  # the key-sum column: Dv + 1
    assert normalized.flops("fwd") == 2 * 100 * 3 * (2 * C * (8 + 7) + 4 * 8 * 7)
    qk, v = 2 * 100 * 3 * 8, 2 * 100 * 3 * 6
    assert case.min_bytes("fwd") == 2 * (2 * qk + 2 * v)  # q, k, v, o in bf16
    assert case.min_bytes("fwd+bwd") == 2 * (4 * qk + 4 * v)  # + do, dq, dk, dv
    assert case.min_bytes("bwd") == 2 * (4 * qk + 3 * v)
    described = case.describe()
    assert described["flops_fwd_bwd"] == case.flops("fwd+bwd") and "masked" in described["eager"]
    forms = {c.label: c.eager_form for c in cases.linear_attention_cases()}
    assert forms["1x8192x96x128"] == "chunked", "12.9 GB of T x T scores: the chunked form"
    assert forms["8x2048x32x256"] == forms["8x1024x8x64"] == "masked"
    assert all(c.feature_map == "elu1" and c.scale == 1.0 for c in cases.linear_attention_cases() if c.normalize)


def test_linear_attention_decode_case():
    """A decode step: T = 1 from a float32 state, timed fwd only (inference); no intra-chunk FLOPs; the state read and
    written counts in the bytes. Its eager step equals the op: TINY's decode cases pass the accuracy gate."""
    case = cases.LinearAttentionCase("x", B=2, T=1, H=3, Dk=8, Dv=6, decode=True)
    assert {m for _, m in case.runs("cuda")} == {"fwd"} and {m for _, m in case.runs("cpu")} == {"fwd"}
    assert case.flops("fwd") == 2 * 3 * 4 * 8 * 6
    assert case.min_bytes("fwd") == 2 * (2 * 2 * 3 * 8 + 2 * 2 * 3 * 6) + 2 * 4 * 2 * 3 * 8 * 6
    normalized = dataclasses.replace(case, normalize=True)
    assert normalized.min_bytes("fwd") - case.min_bytes("fwd") == 2 * 4 * 2 * 3 * 8, "the key sum in and out"
    with pytest.raises(ValueError, match="T = 1"):
        cases.LinearAttentionCase("x", B=2, T=5, H=3, Dk=8, Dv=6, decode=True)
    assert {c.label for c in cases.linear_attention_cases() if c.decode} == {"decode-64x32x128",
                                                                             "decode-64x32x128-elu1-norm"}


def fake_fused_recurrent_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False):
    """fla's recurrent op on its documented semantics: o_t = scale * q_t S_t, S_t = S_{t-1} + k_t^T v_t."""
    S = initial_state.clone()
    outs = []
    for t in range(q.shape[1]):
        S = S + k[:, t, :, :, None].float() * v[:, t, :, None, :].float()
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t].float(), S))
    return torch.stack(outs, 1).to(q.dtype), (S if output_final_state else None)


def test_fla_decode_provider(monkeypatch):
    """The decode adapter hands fla the state and asks for the new one; fla's normalize has no key-sum state, so
    the normalize case is skipped, not compared."""
    monkeypatch.setattr(cases, "import_fla_fused_recurrent_linear_attn", lambda: fake_fused_recurrent_linear_attn)
    plain, norm = TINY[-2:]
    assert cases.check_accuracy(plain, cases.make_workload(plain, "fla", "cpu"), "cpu")["accurate"]
    with pytest.raises(cases.ProviderUnavailable, match="key-sum state"):
        cases.make_workload(norm, "fla", "cpu")


def test_every_provider_sees_the_same_inputs():
    for case in TINY:
        eager = cases.make_workload(case, "eager", "cpu")
        ref = cases.make_workload(case, "reference", "cpu", dtype=torch.float64)
        assert len(eager.leaves) == len(ref.leaves), case
        for a, b in zip(eager.leaves, ref.leaves):
            assert torch.equal(a.double(), b), case
        assert torch.equal(eager.grad_out.double(), ref.grad_out)


@pytest.mark.parametrize("case", TINY, ids=str)
def test_accuracy_gate(case):
    work = cases.make_workload(case, "eager", "cpu")
    good = cases.check_accuracy(case, work, "cpu")
    assert good["accurate"] and good["rel_err_fwd"] < 1e-6 and good["rel_err_bwd"] < 1e-5
    forward = work.forward
    work.forward = lambda: forward() * 1.01  # a fast wrong kernel
    bad = cases.check_accuracy(case, work, "cpu")
    assert not bad["accurate"] and bad["rel_err_fwd"] > 5e-3
    work.forward = lambda: forward() * float("nan")
    assert math.isinf(cases.check_accuracy(case, work, "cpu")["rel_err_fwd"])


@pytest.mark.parametrize("mode", cases.MODES[:3])
def test_steps_run(mode):
    work = cases.make_workload(TINY[0], "eager", "cpu")
    step = cases.make_step(work, mode)
    step()
    step()
    if mode != "fwd":
        assert all(t.grad is not None for t in work.leaves), "the step's backward fills the gradients once"
    else:
        assert all(t.grad is None for t in work.leaves)


def test_wgmma_provider(monkeypatch):
    """cuda-wgmma: the cuda backend with HADAMARD_KERNELS_CUDA_WGMMA=1 around each call (and restored after it);
    skipped off Hopper and for float32."""
    name = hk._backend.ENV_CUDA_WGMMA
    chain = next(c for c in TINY if c.op == "poly_chain")
    with pytest.raises(cases.ProviderUnavailable, match="sm_90 GPU"):  # this machine has none
        cases.make_workload(dataclasses.replace(chain, dtype=torch.bfloat16), "cuda-wgmma", "cpu")
    with pytest.raises(cases.ProviderUnavailable, match="float16/bfloat16 only"):
        cases.make_workload(dataclasses.replace(chain, dtype=torch.float32), "cuda-wgmma", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    seen = []
    wrapped = cases._with_wgmma(lambda: seen.append(os.environ.get(name)))
    monkeypatch.setenv(name, "0")
    wrapped()
    assert seen == ["1"] and os.environ[name] == "0"
    monkeypatch.delenv(name)
    wrapped()
    assert seen == ["1", "1"] and name not in os.environ
    assert cases.backend_of("cuda-wgmma") == "cuda" and cases.backend_of("compiled") is None


# ---------------------------------------------------------------- the fla provider
def fake_chunk_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False, normalize=True,
                           head_first=False):
    """A stand-in with the semantics of fla's chunk_linear_attn (q, k already feature-mapped): o = scale * masked
    form; normalize divides by scale * q_t . cumsum(k)_t + 1e-10 (so the scale cancels); returns (o, state)."""
    assert not head_first, "the benchmark passes [B, T, H, D] with head_first=False"
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    o = cases.linear_attention_masked(q, k, v, scale=scale)
    if normalize:
        o = o / ((q * scale * k.cumsum(1)).sum(-1, keepdim=True) + 1e-10)
    return o, None


@pytest.mark.parametrize("case", TINY[4:6], ids=str)
def test_fla_provider(case, monkeypatch):
    """The adapter (feature map in PyTorch, scale, normalize passed explicitly, head_first=False) computes the case's
    function on a stand-in with fla's semantics, so a real fla's result is comparable."""
    monkeypatch.setattr(cases, "import_fla_chunk_linear_attn", lambda: fake_chunk_linear_attn)
    assert cases.check_accuracy(case, cases.make_workload(case, "fla", "cpu"), "cpu")["accurate"]


def test_fla_provider_skips(monkeypatch):
    monkeypatch.setitem(sys.modules, "fla", None)  # `import fla...` raises ImportError, installed or not
    with pytest.raises(cases.ProviderUnavailable, match="flash-linear-attention is not installed"):
        cases.make_workload(TINY[4], "fla", "cpu")

    def without_normalize(q, k, v, scale=None, initial_state=None, output_final_state=False):
        return cases.linear_attention_masked(q, k, v, scale=scale), None

    monkeypatch.setattr(cases, "import_fla_chunk_linear_attn", lambda: without_normalize)
    with pytest.raises(cases.ProviderUnavailable, match="no normalize option"):
        cases.make_workload(TINY[5], "fla", "cpu")
    monkeypatch.setattr(cases, "import_fla_chunk_linear_attn", lambda: fake_chunk_linear_attn)
    with pytest.raises(cases.ProviderUnavailable, match="cancels scale"):
        cases.make_workload(dataclasses.replace(TINY[5], scale=0.5), "fla", "cpu")
    with pytest.raises(ValueError, match="provider must be one of"):
        cases.make_workload(TINY[0], "fla", "cpu")  # fla has no poly_chain


# ---------------------------------------------------------------- the timer and the memory columns
def test_percentiles_and_summary():
    assert measure.percentile([4, 1, 3, 2, 5], 50) == 3
    assert measure.percentile([1, 2, 3, 4, 5], 20) == pytest.approx(1.8)
    assert measure.percentile([1, 2, 3, 4, 5], 80) == pytest.approx(4.2)
    assert measure.percentile([7], 20) == 7
    with pytest.raises(ValueError):
        measure.percentile([], 50)
    summary = measure.Samples([0.001, 0.002, 0.003, 0.004, 0.005], "x").summary()
    assert summary["p50_ms"] == pytest.approx(3.0) and summary["p20_ms"] == pytest.approx(1.8)
    assert summary["rounds"] == 5 and summary["min_ms"] == pytest.approx(1.0)


def test_measure_on_cpu_leaves_the_first_call_untimed():
    calls = []
    samples = measure.measure(lambda: calls.append(1), "cpu", min_reps=4, max_reps=4)
    assert len(samples.seconds) == 4 and len(calls) == 5 and samples.method == "cpu-clock"
    calls.clear()
    assert len(measure.measure(lambda: calls.append(1), "cpu", warm=True, min_reps=3, max_reps=3).seconds) == 3
    assert len(calls) == 3
    assert measure.peak_mib(lambda: None, "cpu") is None
    with pytest.raises(ValueError, match="device must be"):
        measure.measure(lambda: None, "tpu")


def test_saved_bytes_counts_each_storage_once():
    """Saved tensors on any device through saved_tensors_hooks; views of one storage counted once; the inputs'
    storages are not 'extra'."""
    x = torch.randn(64, 32, requires_grad=True)  # 8 KiB

    def forward():
        h = x * x  # saves x twice: an input, counted once
        e = torch.exp(h)  # saves its output e (8 KiB)
        return (e * e[:, :16].repeat(1, 2)).sum()  # saves e again (and a view of it) and the repeat (8 KiB)

    counted = measure.saved_bytes(forward, [x])
    assert counted == {"saved_bytes": 3 * 8192, "saved_extra_bytes": 2 * 8192}


@pytest.fixture
def fresh_suite_caches():
    """run_benchmark keeps the workload and accuracy of the case in flight: start and end each test without them."""
    suite._workloads.clear()
    suite._accuracy.clear()
    yield
    suite._workloads.clear()
    suite._accuracy.clear()


class FakeBenchmark:
    """The part of pytest-benchmark's fixture run_benchmark uses, disabled (no statistics are kept)."""

    def __init__(self):
        self.extra_info, self.group, self.disabled = {}, None, True


def test_run_benchmark_records_a_row(monkeypatch, fresh_suite_caches):
    monkeypatch.setattr(measure, "CPU_TIMING", dict(measure.CPU_TIMING, min_reps=2, max_reps=2))
    bench = FakeBenchmark()
    suite.run_benchmark(bench, TINY[7], "eager", "fwd+bwd")
    info = bench.extra_info
    assert bench.group == f"{TINY[7].id} fwd+bwd" and info["status"] == "ok" and info["timing"]["rounds"] == 2
    assert info["saved_bytes"] > info["saved_extra_bytes"] > 0 and info["peak_mib"] is None


def test_run_benchmark_skips_and_failures(monkeypatch, fresh_suite_caches):
    """A backend's size limit and a provider that cannot run here are skips with the reason; a wrong fused result
    is timed, then failed; a wrong baseline passes, recorded as wrong."""
    monkeypatch.setattr(measure, "CPU_TIMING", dict(measure.CPU_TIMING, min_reps=2, max_reps=2))
    import hadamard_kernels.ops.poly_gate.triton as gate_triton

    monkeypatch.setattr(gate_triton, "unsupported", lambda *args: "rows wider than 4", raising=False)
    with pytest.raises(pytest.skip.Exception, match="NotImplementedError: .*rows wider than 4"):
        suite.run_benchmark(FakeBenchmark(), TINY[8], "triton", "fwd+bwd")
    monkeypatch.setitem(sys.modules, "fla", None)
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        suite.run_benchmark(FakeBenchmark(), TINY[4], "fla", "fwd")
    op = hk.poly_chain
    monkeypatch.setattr(cases, "poly_chain_eager", lambda *a, **k: op(*a, **k, backend="reference") * 1.1)
    bench = FakeBenchmark()
    suite.run_benchmark(bench, TINY[0], "eager", "fwd")
    assert bench.extra_info["status"] == "wrong" and bench.extra_info["timing"]["rounds"] == 2
    # The float64 oracle of TINY[0] is cached by now; the fused op (here the reference backend) goes wrong.
    monkeypatch.setattr(hk, "poly_chain", lambda *a, **k: op(*a, **k) * 1.1)
    bench = FakeBenchmark()
    with pytest.raises(pytest.fail.Exception, match="timed, but wrong"):
        suite.run_benchmark(bench, TINY[0], "reference", "fwd")
    assert bench.extra_info["status"] == "wrong" and "timing" in bench.extra_info


def test_quick_params_leave_out_max_autotune(monkeypatch):
    monkeypatch.setattr(suite, "DEVICE", "cuda")
    monkeypatch.setattr(suite, "SELECTION", suite.Selection(quick=True))
    quick = [p.values for p in suite.params(cases.OPS)]
    assert len({c for c, _, _ in quick}) == len(cases.all_cases(quick=True))
    assert not any(provider == "max-autotune" for _, provider, _ in quick)
    monkeypatch.setattr(suite, "SELECTION", suite.Selection(ops=("poly_gate",)))
    full = [p.values for p in suite.params(("poly_gate",))]
    assert ("max-autotune", "fwd+bwd") in {(p, m) for _, p, m in full} and {c.op for c, _, _ in full} == {"poly_gate"}


def test_parts():
    assert suite.parse_part(None) is None and suite.parse_part("2/3") == (2, 3)
    for bad in ("0/3", "4/3", "x", "1"):
        with pytest.raises(ValueError, match="K/M"):
            suite.parse_part(bad)
    parts = [[i for i in range(10) if suite.in_part(i, (k, 3))] for k in (1, 2, 3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]


# ---------------------------------------------------------------- the report
def _test_entry(case, provider, mode, status="ok", ms=1.0, **extra):
    entry = dict(type="test", nodeid=f"bench::{case.id}-{mode}-{provider}", case=case.describe(), provider=provider,
                 mode=mode, status=status, **extra)
    if status in ("ok", "wrong"):
        entry.update(rel_err_fwd=1e-3, rel_err_bwd=2e-3, tolerance=1e-2, peak_mib=10.0 * ms,
                     timing=dict(p20_ms=0.9 * ms, p50_ms=ms, p80_ms=1.1 * ms, rounds=20))
        if mode == "fwd+bwd":
            entry.update(saved_bytes=3 * 2**20, saved_extra_bytes=2**20)
    return entry


GPU_META = dict(type="session", kind="cuda", device="NVIDIA H100 80GB HBM3", commit="abc123",
                time_utc="2026-11-25T10:00:00Z", torch="2.11", triton="3.6", cuda="13.0", python="3.12",
                timing="CUDA events", fla=None, ceilings=dict(matmul_tflops_bf16=800.0, matmul_tflops_fp32=50.0,
                                                            copy_gbps=3000.0))


def fake_record(kind="cuda") -> list[dict]:
    chain = cases.Case("poly_chain", "fake", M=4096, d=1024, k=1024, N=2, graph=True)
    gate = cases.PolyGateCase("fake", B=8, W=28, H=28, C=576)
    sweep = [cases.Case("poly_chain", f"sw{M}", M=M, d=64, k=64, N=2, sweep="M") for M in (1024, 4096)]
    entries = [dict(GPU_META, kind=kind)]
    for provider, fwd, both in (("eager", 2.0, 6.0), ("compiled", 1.0, 4.0), ("triton", 0.5, 2.0)):
        entries += [_test_entry(chain, provider, "fwd", ms=fwd), _test_entry(chain, provider, "fwd+bwd", ms=both)]
    entries.append(_test_entry(chain, "triton", "fwd+bwd-graph", ms=1.5))
    entries.append(_test_entry(chain, "cuda", "fwd", status="wrong", ms=0.1))
    entries.append(_test_entry(chain, "cuda", "fwd+bwd", status="error", error="RuntimeError: boom | bang",
                               error_full="Traceback ...\nRuntimeError: boom | bang\n" + "x" * 500))
    entries += [_test_entry(gate, "eager", "fwd+bwd", ms=3.0), _test_entry(gate, "triton", "fwd+bwd", ms=1.0),
                _test_entry(gate, "cuda", "fwd+bwd", status="skipped", error="backend cuda is not available")]
    for i, case in enumerate(sweep):
        entries += [_test_entry(case, "eager", "fwd+bwd", ms=1.0 + i), _test_entry(case, "triton", "fwd+bwd",
                                                                                   ms=0.5 + i)]
    entries.append(dict(type="plan", nodeids=[entries[1]["nodeid"], "bench::not-run-yet"]))
    return entries


def test_report_rows_and_derived_numbers():
    rep = report.derive(report.from_record(fake_record()))
    assert rep["pending"] == ["bench::not-run-yet"] and rep["meta"]["sessions"] == 1
    chain = rep["cases"][0]
    rows = {r["provider"]: r for r in chain["rows"]}
    assert list(rows) == ["eager", "compiled", "triton", "cuda"], "providers in PROVIDERS order"
    triton = rows["triton"]
    assert triton["speedup_vs_eager_fwd"] == pytest.approx(4.0)
    assert triton["speedup_vs_eager_fwd_bwd"] == pytest.approx(3.0)
    assert triton["speedup_vs_compiled_fwd_bwd"] == pytest.approx(2.0)
    assert "speedup_vs_eager_fwd" not in rows["eager"], "eager is not a speed-up of itself"
    assert triton["launch_overhead_ms"] == pytest.approx(0.5)
    case = chain["case"]
    assert triton["tflops_fwd_bwd"] == pytest.approx(case["flops_fwd_bwd"] / 2.0e-3 / 1e12)
    assert triton["tflops_pct_fwd_bwd"] == pytest.approx(100 * triton["tflops_fwd_bwd"] / 800)
    assert triton["gbps_fwd"] == pytest.approx(case["bytes_fwd"] / 0.5e-3 / 1e9)
    assert triton["p20_fwd_bwd"] == pytest.approx(1.8) and triton["saved_bytes"] == 3 * 2**20
    cuda = rows["cuda"]
    assert cuda["status"] == "error" and cuda["error"] == "RuntimeError: boom | bang"
    assert "speedup_vs_eager_fwd" not in cuda, "a wrong result earns no speedup"
    gate = {r["provider"]: r for r in rep["cases"][1]["rows"]}
    assert gate["triton"]["tflops_fwd_bwd"] is None and gate["triton"]["gbps_pct_fwd_bwd"] > 0
    assert gate["cuda"]["status"] == "skipped"


def test_goals():
    """The issues' goals against the fastest correct backend: met, missed by how much, or not measured."""
    rep = report.derive(report.from_record(fake_record()))
    found = {(g["case"], g["goal"]): g for g in report.goals(rep)}
    chain = "poly_chain-fake-bf16"
    assert found[(chain, "fwd ≥ torch.compile")]["met"] and found[(chain, "fwd ≥ torch.compile")]["value"] == 2.0
    ceiling = found[(chain, "fwd ≥ 60% of the bf16 matmul ceiling")]
    assert not ceiling["met"] and ceiling["backend"] == "triton"
    assert found[(chain, "fwd+bwd peak memory < eager's")]["value"] == pytest.approx(20 / 60)
    gate = "poly_gate-fake-bf16"
    assert found[(gate, "fwd+bwd ≥ 3× eager")]["met"], "3.00x meets 3x"
    assert found[(gate, "fwd+bwd ≥ 1.5× torch.compile")]["met"] is None, "no compiled row: not measured"
    assert found[(gate, "saves nothing beyond a and b (and the parameters)")]["met"] is False
    md = report.render_markdown(rep)
    for expected in ("## Goals of the issues", "| poly_chain-fake-bf16 | triton | fwd ≥ torch.compile | 2.00× | met |",
                     "| not measured | — |", "missed: 1.0 MiB more", "% short |"):
        assert expected in md, f"{expected!r} missing from the markdown:\n{md}"
    assert not any(g["case"].startswith("poly_chain-sw") for g in report.goals(rep)), "sweeps have no goals"


def test_goals_of_linear_attention_and_poly_sa_and_a_forward_only_case():
    """Issue 15's goals (>= 2x fla, within 2x of the byte floor) and issue 16's (>= 2x torch.compile, saved bytes <=
    the inputs'); a decode step, timed forward only, is summarised by its forward and has no goals."""
    la = cases.LinearAttentionCase("fake", B=8, T=1024, H=8, Dk=64, Dv=64)
    step = cases.LinearAttentionCase("fake-decode", B=64, T=1, H=32, Dk=128, Dv=128, decode=True)
    sa = cases.PolySACase("fake", B=64, N=197, C=384)
    floor_ms = la.min_bytes("fwd+bwd") / 3000e9 * 1e3  # the copy ceiling of GPU_META
    entries = [dict(GPU_META), _test_entry(la, "fla", "fwd+bwd", ms=3 * floor_ms),
               _test_entry(la, "triton", "fwd+bwd", ms=1.5 * floor_ms),
               _test_entry(step, "eager", "fwd", ms=0.4), _test_entry(step, "cuda", "fwd", ms=0.1),
               _test_entry(sa, "compiled", "fwd+bwd", ms=3.0), _test_entry(sa, "cuda", "fwd+bwd", ms=2.0)]
    entries[-1]["saved_bytes"] = int(1.25 * sa.input_bytes)
    rep = report.derive(report.from_record(entries))
    found = {(g["case"], g["goal"]): g for g in report.goals(rep)}
    fla = found[("linear_attention-fake-bf16", "fwd+bwd ≥ 2× fla")]
    assert fla["met"] and fla["value"] == pytest.approx(2.0) and fla["backend"] == "triton"
    floor = found[("linear_attention-fake-bf16", "fwd+bwd within 2× of the byte floor")]
    assert floor["met"] and floor["value"] == pytest.approx(1.5)
    assert not any(g["case"] == step.id for g in report.goals(rep)), "no goal for the decode step"
    compiled = found[("poly_sa-fake-bf16", "fwd+bwd ≥ 2× torch.compile")]
    assert compiled["met"] is False and compiled["value"] == pytest.approx(1.5)
    saved = found[("poly_sa-fake-bf16", "saved for the backward ≤ the inputs")]
    assert saved["met"] is False and saved["value"] == pytest.approx(1.25)
    md = report.render_markdown(rep)
    for expected in ("1.50× the byte floor | met", "1.25× the inputs | missed: 25% over", "25% short",
                     "| linear_attention-fake-decode-bf16 | cuda | 0.100 (fwd) |", "4.00×"):
        assert expected in md, f"{expected!r} missing from the markdown:\n{md}"
    _table_widths_agree(md)
    svg = chart.render_svg(rep)
    assert "linear_attention-fake-decode-bf16 (fwd)" in svg and "cuda 4× over eager" in svg, "the step's forward drawn"


def test_lrnn_memory_goal():
    """Issue 17: fwd+bwd peak memory at most 1/dbar of eager's (here dbar 8: 10 MiB against eager's 40 is 2x the
    goal)."""
    inr = cases.LRNNCase("lrnn", "fake", M=65536, d=2, rank=256, dbar=8)
    entries = [dict(GPU_META), _test_entry(inr, "eager", "fwd+bwd", ms=4.0), _test_entry(inr, "cuda", "fwd+bwd")]
    rep = report.derive(report.from_record(entries))
    goal = {g["goal"]: g for g in report.goals(rep)}["fwd+bwd peak memory ≤ 1/dbar = 1/8 of eager's"]
    assert goal["value"] == pytest.approx(0.25) and goal["met"] is False
    assert "missed: 100% more memory" in report.render_markdown(rep)


def _auto_record(tests=None, cuda_status="ok"):
    chain = cases.Case("poly_chain", "fake", M=4096, d=1024, k=1024, N=2)
    small = cases.Case("poly_chain", "small", M=4096, d=64, k=64, N=2)
    step = cases.LinearAttentionCase("fake-decode", B=64, T=1, H=32, Dk=128, Dv=128, decode=True)
    entries = [dict(GPU_META)] + ([dict(type="stages", gpu_tests=tests)] if tests is not None else [])
    entries += [_test_entry(chain, "triton", "fwd+bwd", ms=2.0), _test_entry(chain, "cuda", "fwd+bwd", ms=1.0),
                _test_entry(chain, "cuda-wgmma", "fwd+bwd", ms=0.5),
                _test_entry(small, "triton", "fwd+bwd", ms=1.0),
                _test_entry(small, "cuda", "fwd+bwd", status=cuda_status, ms=1.5),
                _test_entry(step, "triton", "fwd", ms=0.2), _test_entry(step, "cuda", "fwd", ms=0.1)]
    return report.derive(report.from_record(entries))


def test_auto_table_from_the_measurements():
    """Issue 19: auto's table ordered by what was recorded, only for backends whose GPU tests passed and whose results
    were correct; today's order where the GPU tests gave no verdict."""
    passed = dict(summary="10 passed in 5.0s", failed=[], rc=0)
    table = {t["op"]: t for t in report.auto_table(_auto_record(passed))}
    chain = table["poly_chain"]
    rows = {r["backend"]: r for r in chain["rows"]}
    # cuda: 1/2 of the fastest (0.5, behind the opt-in wgmma kernel) and 1.5x triton's 1.0: geomean sqrt(2 * 1.5)
    assert rows["cuda"]["score"] == pytest.approx((2.0 * 1.5) ** 0.5) and rows["cuda"]["fastest"] == 0
    assert rows["triton"]["score"] == pytest.approx(4.0 ** 0.5) and rows["triton"]["fastest"] == 1
    assert rows["cuda-wgmma"]["fastest"] == 1 and rows["cuda-wgmma"]["ok"] == 1
    assert chain["suggested"] == ("cuda", "triton"), "ranked by score; the opt-in kernel is not a backend of its own"
    la = table["causal_linear_attention"]
    assert la["suggested"] == ("cuda", "triton") and la["cases"] == 1, "a forward-only case ranks by its forward"

    failed = dict(summary="1 failed, 9 passed in 5.0s", rc=1,
                  failed=["FAILED tests/test_poly_chain.py::test_gpu_shapes[cuda-bfloat16-ccp]",
                          "FAILED tests/test_lrnn.py::test_gpu_shapes[triton-sin]"])
    table = {t["op"]: t for t in report.auto_table(_auto_record(failed))}
    assert table["poly_chain"]["suggested"] == ("triton",), "a failed GPU test of the op keeps cuda out"
    assert {r["backend"]: r["gpu_test_failures"] for r in table["poly_chain"]["rows"]}["cuda-wgmma"] == 1
    assert table["causal_linear_attention"]["suggested"] == ("cuda", "triton"), "another op's failure does not count"

    triton_failed = dict(failed, failed=["FAILED tests/test_poly_chain.py::test_gpu_shapes[triton-float16-ccp]"])
    chain = report.auto_table(_auto_record(triton_failed))[0]
    assert chain["suggested"] == ("cuda", "triton") and chain["reason"].endswith("kept behind: triton"), (
        "a backend of today's table that is not ranked stays as the fallback behind the ranked ones")

    table = {t["op"]: t for t in report.auto_table(_auto_record(passed, cuda_status="wrong"))}
    assert table["poly_chain"]["suggested"] == ("triton",), "a wrong result in one case keeps cuda out"

    table = {t["op"]: t for t in report.auto_table(_auto_record(None))}
    assert table["poly_chain"]["suggested"] == ("triton",) and "no verdict" in table["poly_chain"]["reason"]
    interrupted = dict(passed, rc=124)
    assert report.auto_table(_auto_record(interrupted))[0]["suggested"] == ("triton",)

    md = report.render_markdown(_auto_record(passed))
    for expected in ("## Auto's table, as measured", "| poly_chain | cuda-wgmma (opt-in) | 1 / 1 of 2 | 1 | 1.00 |",
                     "    'poly_chain': ('cuda', 'triton'),  # ranked by score; today ('triton',)"):
        assert expected in md, f"{expected!r} missing from the markdown:\n{md}"
    _table_widths_agree(md)


def _table_widths_agree(md: str) -> None:
    for block in md.split("\n\n"):
        table = [line for line in block.splitlines() if line.startswith("|")]
        if table:
            assert len({len(line.replace("\\|", "").split("|")) for line in table}) == 1, block


def test_markdown_gpu():
    rep = report.derive(report.from_record(fake_record()))
    md = report.render_markdown(rep)
    for expected in ("NVIDIA H100 80GB HBM3, 2026-11-25T10:00:00Z", "commit `abc123`", "800.0 TFLOP/s",
                     "3000 GB/s", "| poly_chain-fake-bf16 | triton | 2.000 |", "| eager | ok |", "| baseline |",
                     "3.00×", r"error: RuntimeError: boom \| bang", "skipped: backend cuda is not available",
                     "1 not run yet", "## Per-call overhead", "| 0.500 | 25 |", "### poly_chain: time against M",
                     "GB/s (", "poly_gate: memory-bound"):
        assert expected in md, f"{expected!r} missing from the markdown:\n{md}"
    assert "x" * 200 not in md, "error cells stay short; the JSON has the full message"
    _table_widths_agree(md)


def test_markdown_cpu_is_never_kernel_speed():
    rep = report.derive(report.from_record(fake_record(kind="cpu")))
    md = report.render_markdown(rep)
    assert report.CPU_BANNER in md and "CPU ms fwd+bwd" in md
    for claim in ("TFLOP/s", "GB/s", "×", "ceiling", "vs eager"):
        assert claim not in md, f"a CPU report shows {claim!r}"
    assert "speedup_vs_eager_fwd_bwd" not in json.dumps(rep)
    _table_widths_agree(md)


def test_readme_block(tmp_path):
    rep = report.derive(report.from_record(fake_record()))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_BEGIN}\nold table\n{report.README_END}\nrest\n")
    block = report.readme_block(rep, "benchmarks/results/stem")
    assert report.update_readme(readme, block)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "old table" not in text
    for expected in ("NVIDIA H100 80GB HBM3", "2026-11-25T10:00:00Z", "`abc123`", "(benchmarks/results/stem.md)",
                     "| poly_chain-fake-bf16 | triton |", "Partial",
                     "Goals of the issues: 4 met, 3 missed, 1 not measured"):
        assert expected in text
    assert report.update_readme(readme, block) and readme.read_text() == text, "rewriting is idempotent"
    repo_readme = (BENCH_DIR.parent / "README.md").read_text()
    assert repo_readme.count(report.README_BEGIN) == repo_readme.count(report.README_END) == 1, (
        "the README has the block the runner rewrites")
    plain = tmp_path / "other.md"
    plain.write_text("no markers\n")
    assert not report.update_readme(plain, block) and plain.read_text() == "no markers\n"


def test_merged_records_and_the_readme(tmp_path):
    """run.py --report merges records (families measured in different runs; a test's last result wins), writes
    the merged record beside the report, and rewrites the README block of a GPU report."""
    entries = fake_record()
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("".join(json.dumps(e) + "\n" for e in entries[:5]))
    triton = next(e for e in entries if e.get("provider") == "triton" and e.get("mode") == "fwd+bwd")
    faster = dict(triton, timing=dict(p20_ms=0.5, p50_ms=0.5, p80_ms=0.5, rounds=9))  # measured again, later
    second.write_text("".join(json.dumps(e) + "\n" for e in [entries[0], *entries[5:], faster]))
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.README_BEGIN}\n{report.README_END}\n")
    out = tmp_path / "results"
    paths = run.write_all([first, second], run.parse_args(["--report", str(first), "--out", str(out),
                                                           "--readme", str(readme)]))
    merged = json.loads(paths[0].read_text())
    assert [e["case"]["id"] for e in merged["cases"]][:2] == ["poly_chain-fake-bf16", "poly_gate-fake-bf16"]
    triton = next(r for r in merged["cases"][0]["rows"] if r["provider"] == "triton")
    assert triton["ms_fwd_bwd"] == 0.5 and triton["rounds_fwd_bwd"] == 9
    assert paths[-1].name.endswith(".record.jsonl") and len(report.read_record(paths[-1])) == len(entries) + 2
    assert f"[tables](results/{paths[1].stem}.md)" in readme.read_text()


def test_stopped_early(tmp_path):
    """run.py restarts the suite in a fresh process when its last session stopped itself after a CUDA error."""
    record = tmp_path / "r.jsonl"
    lines = [dict(type="plan", nodeids=[]), dict(type="stopped", reason="CUDA error"), dict(type="plan", nodeids=[])]
    for n, expected in ((1, False), (2, True), (3, False)):
        record.write_text("".join(json.dumps(e) + "\n" for e in lines[:n]))
        assert run.stopped_early(record) is expected


def test_write_report_names_and_files(tmp_path):
    rep = report.derive(report.from_record(fake_record()))
    paths = report.write_report(rep, tmp_path / "results", copy_to=tmp_path / "out")
    stem = "NVIDIA-H100-80GB-HBM3-20261125T100000Z-abc123"
    assert [p.name for p in paths] == [f"{stem}.json", f"{stem}.md", f"{stem}.svg", f"{stem}-sweeps.svg"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)
    loaded = json.loads(paths[0].read_text())
    assert "x" * 500 in json.dumps(loaded), "the full error message is in the JSON"
    later = dict(rep, meta=dict(rep["meta"], time_utc="2026-11-25T10:00:01Z"))
    assert report.results_stem(later["meta"]) != stem, "a later run never overwrites an earlier one"
    assert report.results_stem(dict(kind="cpu", device="CPU x86_64", time_utc="2026-01-02T03:04:05Z",
                                     commit="abc+dirty")) == "cpu-20260102T030405Z-abc+dirty"


def test_chart():
    """One row per case; speed-ups on a log axis (4x is as far right of 2x as 2x is of 1x, eager's line, and eager
    has no dot of its own); TFLOP/s and GB/s panels end at the ceilings; providers without a number are named."""
    rep = report.derive(report.from_record(fake_record()))
    svg = ET.fromstring(chart.render_svg(rep))
    dots = {c.find(f"{SVG}title").text: float(c.get("cx")) for c in svg.iter(f"{SVG}circle")
            if c.find(f"{SVG}title") is not None}
    assert "triton 3× over eager" in dots and "compiled 1.5× over eager" in dots
    assert not any(t.startswith("eager") and "over eager" in t for t in dots)
    one = chart.LABEL_W + chart.PANEL_W * math.log(1 / 0.5) / math.log(5 / 0.5)  # the axis runs 0.5x .. 5x
    assert dots["triton 3× over eager"] - one == pytest.approx(
        (dots["compiled 1.5× over eager"] - one) * math.log(3) / math.log(1.5), abs=0.2)
    assert "eager 2.79 TFLOP/s" in dots or any(t.startswith("eager") and "TFLOP/s" in t for t in dots)
    texts = [t.text for t in svg.iter(f"{SVG}text")]
    assert "cuda: error" in texts and "bf16 matmul 800" in texts and "copy 3000" in texts
    beyond = json.loads(json.dumps(rep))  # a value past the copy bandwidth (L2 reuse can do that) is drawn hollow
    next(r for r in beyond["cases"][0]["rows"] if r["provider"] == "triton")["gbps_fwd_bwd"] = 5000.0
    hollow = [c for c in ET.fromstring(chart.render_svg(beyond)).iter(f"{SVG}circle") if c.get("fill") == "white"]
    assert [c.find(f"{SVG}title").text for c in hollow] == ["triton 5000 GB/s (beyond the axis)"]
    assert "no FLOPs counted (memory-bound)" in texts
    sweeps = report.sweep_series([e for e in rep["cases"] if e["case"]["sweep"]])
    assert sweeps["poly_chain"]["points"]["triton"] == [(1024, 0.5), (4096, 1.5)]
    ET.fromstring(chart.render_sweeps_svg(rep, sweeps))
    cpu = ET.fromstring(chart.render_svg(report.from_record(fake_record(kind="cpu"))))
    cpu_text = " ".join(t.text for t in cpu.iter(f"{SVG}text"))
    assert "not kernel speed" in cpu_text and "over eager" not in cpu_text and "TFLOP" not in cpu_text


def test_parse_pytest_log():
    log = ("........F..s.\n=== short test summary info ===\nFAILED tests/test_nn.py::test_gpu[x] - AssertionError\n"
           "ERROR tests/test_poly_ncp.py::test_gpu[cuda] - RuntimeError: boom\n"
           "1 failed, 10 passed, 1 skipped, 1 error in 12.34s\n")
    parsed = report.parse_pytest_log(log)
    assert parsed["summary"] == "1 failed, 10 passed, 1 skipped, 1 error in 12.34s"
    assert parsed["failed"] == ["FAILED tests/test_nn.py::test_gpu[x]", "ERROR tests/test_poly_ncp.py::test_gpu[cuda]"]
    assert "no pytest summary" in report.parse_pytest_log("....\nKeyboardInterrupt\n")["summary"]


def test_parse_pytest_log_of_parallel_shards():
    """run_gpu.sh's GPU tests run as parallel shards, their logs joined under SHARD_MARK lines: one summary adds up
    their counts, takes the longest time and names a shard that printed none."""
    log = (f"{report.SHARD_MARK}1/3\n....F\nFAILED tests/a.py::t[x] - boom\n"
           "1 failed, 4 passed, 3 skipped, 600 deselected in 100.50s\n"
           f"{report.SHARD_MARK}2/3\n.....\n5 passed, 2 errors, 600 deselected in 120.00s\n"
           f"{report.SHARD_MARK}3/3\n...\nKeyboardInterrupt\n")
    parsed = report.parse_pytest_log(log)
    assert parsed["summary"] == ("1 failed, 9 passed, 3 skipped, 2 errors in 120.00s (3 shards in parallel; the "
                                 "longest); no summary line from shard 3/3 (interrupted or crashed?)")
    assert parsed["failed"] == ["FAILED tests/a.py::t[x]"]


def test_list_works_without_a_gpu():
    done = subprocess.run([sys.executable, str(BENCH_DIR / "run.py"), "--list"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "poly_gate-monet-576-shift-bf16" in done.stdout and "lrnn-inr-bf16" in done.stdout
