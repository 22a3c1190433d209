"""benchmarks/run.py and benchmarks/cases.py on the CPU: the eager baselines against the reference, the accuracy
gate, error and skipped rows, the fla adapter (on a stand-in with fla's semantics), derived numbers and the JSON /
markdown / SVG writing, with fake timings (no GPU needed)."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from utils import HAS_CUDA, assert_close

import hadamard_kernels as hk

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))  # run.py imports its sibling `cases`, as it does when run as a script
import cases  # noqa: E402
import chart  # noqa: E402

_spec = importlib.util.spec_from_file_location("hk_bench_run", BENCH_DIR / "run.py")
bench_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_run)

TINY = [
    cases.Case("poly_chain", "tiny", M=13, d=10, k=6, N=3, dtype=torch.float32),
    cases.Case("poly_ncp", "tiny", M=13, d=10, k=6, N=3, dtype=torch.float32),
    cases.Case("CCP", "tiny", M=5, d=12, k=6, N=3, dtype=torch.float32, channels=3),
    cases.Case("NCP", "tiny", M=5, d=16, k=6, N=2, dtype=torch.float32),
    cases.LinearAttentionCase("tiny", B=2, T=13, H=3, Dk=5, Dv=4, dtype=torch.float32, scale=0.5),
    cases.LinearAttentionCase("tiny-chunked", B=1, T=150, H=2, Dk=8, Dv=6, dtype=torch.float32, feature_map="elu1",
                              normalize=True, eager="chunked"),
    cases.PolySACase("tiny", B=3, N=5, C=4, dtype=torch.float32),
]


def fake_timer(step):
    step()
    return 2.0


# ---------------------------------------------------------------- cases.py
@pytest.mark.parametrize("mode", ["ccp", "product"])
@pytest.mark.parametrize("activation", ["identity", "relu", "gelu"])
@pytest.mark.parametrize("bias", [True, False])
def test_poly_chain_eager_formula_is_the_op(mode, activation, bias):
    g = torch.Generator().manual_seed(0)
    t = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    x, weight, b = t(2, 7, 9), t(4, 5, 9), t(4, 5) if bias else None
    options = dict(mode=mode, activation=activation, scale=0.6)
    assert_close("eager", cases.poly_chain_eager(x, weight, b, **options),
                 hk.poly_chain(x, weight, b, **options, backend="reference"))


@pytest.mark.parametrize("N", [1, 3])
def test_poly_ncp_eager_formula_is_the_op(N):
    g = torch.Generator().manual_seed(1)
    t = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    args = (t(11, 8), t(N, 5, 8), t(N, 5), t(N - 1, 5, 5), t(N - 1, 5))
    assert_close("eager", cases.poly_ncp_eager(*args), hk.poly_ncp(*args, backend="reference"))


@pytest.mark.parametrize("feature_map", ["identity", "elu1", "relu"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("form", ["masked", "chunked"])
def test_linear_attention_eager_formula_is_the_op(feature_map, normalize, form):
    """Forward and every gradient of the eager forms against the op's reference; the chunked form with chunks of 4
    on T = 13 (several chunks, a ragged last one)."""
    g = torch.Generator().manual_seed(2)
    t = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    q, k, v, grad = t(2, 13, 3, 5), t(2, 13, 3, 5), t(2, 13, 3, 4), t(2, 13, 3, 4).detach()
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
    z, w1, w2, w3 = torch.randn(2, 5, 4, generator=g), *(torch.randn(4, 4, generator=g) for _ in range(3))
    alpha, beta = torch.randn(1, generator=g), torch.randn(1, generator=g)
    assert_close("eager", cases.poly_sa_eager(z, w1, w2, w3, alpha, beta),
                 hk.poly_sa(z.double(), w1.double(), w2.double(), w3.double(), alpha.double(), beta.double(),
                            backend="reference"))
    case = cases.PolySACase("x", B=2, N=5, C=4)
    assert case.flops("fwd") == 6 * 2 * 5 * 16 and case.flops("fwd+bwd") == 3 * case.flops("fwd")
    assert case.min_bytes("fwd") == 2 * (2 * 40 + 3 * 16 + 2)
    assert case.describe()["shape"] == "B=2 N=5 C=4"
    assert {(c.B, c.N, c.C) for c in cases.poly_sa_cases()} == {(64, 197, 384), (32, 3136, 96), (8, 16384, 512)}


def test_case_counts():
    case = cases.Case("poly_chain", "x", M=8, d=5, k=3, N=2, dtype=torch.bfloat16)
    assert case.flops("fwd") == 2 * 8 * 2 * 3 * 5 and case.flops("fwd+bwd") == 3 * case.flops("fwd")
    x, w, y = 8 * 5, 2 * 3 * (5 + 1), 8 * 3
    assert case.min_bytes("fwd") == 2 * (x + w + y)
    assert case.min_bytes("fwd+bwd") == 2 * (x + w + y) + 2 * (2 * x + 2 * w + y)
    ncp = cases.Case("poly_ncp", "x", M=8, d=5, k=3, N=2)
    assert ncp.flops("fwd") == case.flops("fwd") + 2 * 8 * 1 * 3 * 3
    ids = [c.id for c in cases.all_cases()]
    assert len(ids) == len(set(ids)), "case ids are unique"
    quick = cases.all_cases(quick=True)
    assert cases.all_cases()[:len(quick)] == quick, "the quick cases run first (a time budget cuts the tail)"
    assert {c.op for c in quick[:4]} == {"poly_chain", "linear_attention", "poly_ncp", "CCP"}, (
        "the first cases take every family in turn")


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
    assert {(c.B, c.T, c.H, c.Dk) for c in cases.linear_attention_cases()} == {
        (1, 8192, 96, 128), (8, 1024, 8, 64), (8, 2048, 32, 256)}
    assert all(c.feature_map == "elu1" and c.scale == 1.0 for c in cases.linear_attention_cases() if c.normalize)


def test_every_provider_sees_the_same_inputs():
    for case in TINY:
        eager = cases.make_workload(case, "eager", "cpu")
        ref = cases.make_workload(case, "reference", "cpu", dtype=torch.float64)
        assert len(eager.leaves) == len(ref.leaves), case
        for a, b in zip(eager.leaves, ref.leaves):
            assert torch.equal(a.double(), b), case
        assert torch.equal(eager.grad_out.double(), ref.grad_out)


@pytest.mark.parametrize("case", TINY, ids=str)
def test_accuracy_gate(case, monkeypatch):
    work = cases.make_workload(case, "eager", "cpu")
    good = cases.check_accuracy(case, work, "cpu")
    assert good["accurate"] and good["rel_err_fwd"] < 1e-6 and good["rel_err_bwd"] < 1e-6
    forward = work.forward
    work.forward = lambda: forward() * 1.01  # a fast wrong kernel
    bad = cases.check_accuracy(case, work, "cpu")
    assert not bad["accurate"] and bad["rel_err_fwd"] > 5e-3
    work.forward = lambda: forward() * float("nan")
    assert math.isinf(cases.check_accuracy(case, work, "cpu")["rel_err_fwd"])


@pytest.mark.parametrize("mode", cases.MODES)
def test_steps_run(mode):
    work = cases.make_workload(TINY[0], "eager", "cpu")
    step = cases.make_step(work, mode)
    step()
    step()
    if mode != "fwd":
        assert all(t.grad is not None for t in work.leaves), "the step's backward fills the gradients once"
    else:
        assert all(t.grad is None for t in work.leaves)


def test_compiled_bwd_step_replays_the_backward():
    """The bwd step replays one graph's backward (retain_graph=True), which a compiled backward with donated buffers
    refuses: workloads timed in bwd mode are compiled without donation."""
    with cases.compiled_for_mode("bwd"):
        work = cases.make_workload(TINY[0], "compiled", "cpu")
        step = cases.make_step(work, "bwd")
        step()
        step()
    assert all(t.grad is not None for t in work.leaves)


# ---------------------------------------------------------------- run.py
def test_help_and_list_work_without_a_gpu():
    for flags in (["--help"], ["--list", "--quick"]):
        done = subprocess.run([sys.executable, str(BENCH_DIR / "run.py"), *flags], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert "linear_attention-8x1024x8x64-bf16" in done.stdout and "B=8 T=1024 H=8 Dk=64 Dv=64" in done.stdout
    assert "--quick" in subprocess.run([sys.executable, str(BENCH_DIR / "run.py"), "--help"], capture_output=True,
                                       text=True).stdout


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without a GPU")
def test_refuses_without_gpu(capsys):
    assert bench_run.main(["--quick"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_run_case_rows_on_cpu(monkeypatch):
    """The measuring loop with a fake timer: ok rows, a wrong provider is flagged, a failing one is an error row."""
    monkeypatch.setattr(cases, "poly_chain_eager", lambda *a, **k: hk.poly_chain(*a, **k, backend="reference") * 2)
    entry = bench_run.run_case(TINY[0], ["eager", "reference", "cuda"], fake_timer, lambda step: 1.5, device="cpu")
    rows = {row["provider"]: row for row in entry["rows"]}
    assert rows["eager"]["status"] == "wrong" and rows["eager"]["rel_err_fwd"] > 0.5
    assert rows["reference"]["status"] == "ok" and rows["reference"]["ms_fwd_bwd"] == 2.0
    assert rows["reference"]["peak_mib_fwd"] == 1.5
    assert rows["cuda"]["status"] == "error" and "RuntimeError" in rows["cuda"]["error"]
    assert entry["case"]["id"] == TINY[0].id


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


@pytest.mark.parametrize("case", [c for c in TINY if isinstance(c, cases.LinearAttentionCase)], ids=str)
def test_fla_provider(case, monkeypatch):
    """The adapter (feature map in PyTorch, scale, normalize passed explicitly, head_first=False) computes the case's
    function on a stand-in with fla's semantics, so a real fla's result is comparable."""
    monkeypatch.setattr(cases, "import_fla_chunk_linear_attn", lambda: fake_chunk_linear_attn)
    work = cases.make_workload(case, "fla", "cpu")
    assert cases.check_accuracy(case, work, "cpu")["accurate"]


def test_fla_provider_skips(monkeypatch):
    monkeypatch.setitem(sys.modules, "fla", None)  # `import fla...` raises ImportError, installed or not
    case = TINY[4]
    with pytest.raises(cases.ProviderUnavailable, match="flash-linear-attention is not installed"):
        cases.make_workload(case, "fla", "cpu")
    entry = bench_run.run_case(case, ["eager", "fla"], fake_timer, lambda step: 1.5, device="cpu")
    assert [row["status"] for row in entry["rows"]] == ["ok", "skipped"]
    assert "not installed" in entry["rows"][1]["error"]

    def without_normalize(q, k, v, scale=None, initial_state=None, output_final_state=False):
        return cases.linear_attention_masked(q, k, v, scale=scale), None

    monkeypatch.setattr(cases, "import_fla_chunk_linear_attn", lambda: without_normalize)
    with pytest.raises(cases.ProviderUnavailable, match="no normalize option"):
        cases.make_workload(TINY[5], "fla", "cpu")
    assert cases.check_accuracy(case, cases.make_workload(case, "fla", "cpu"), "cpu")["accurate"]
    monkeypatch.setattr(cases, "import_fla_chunk_linear_attn", lambda: fake_chunk_linear_attn)
    with pytest.raises(cases.ProviderUnavailable, match="cancels scale"):
        cases.make_workload(dataclasses.replace(TINY[5], scale=0.5), "fla", "cpu")
    with pytest.raises(ValueError, match="provider must be one of"):
        cases.make_workload(TINY[0], "fla", "cpu")  # fla has no poly_chain


def fake_report():
    case = cases.Case("poly_chain", "fake", M=4096, d=1024, k=1024, N=2).describe()

    def row(provider, status="ok", ms_fwd=1.0, ms_fwd_bwd=3.0, **extra):
        return dict(provider=provider, status=status, rel_err_fwd=1e-3, rel_err_bwd=2e-3, ms_fwd=ms_fwd,
                    ms_fwd_bwd=ms_fwd_bwd, peak_mib_fwd=10.0, peak_mib_fwd_bwd=30.0, **extra)

    rows = [row("eager", ms_fwd=2.0, ms_fwd_bwd=6.0), row("compiled", ms_fwd=1.0, ms_fwd_bwd=4.0),
            row("triton", ms_fwd=0.5, ms_fwd_bwd=2.0), row("cuda", status="wrong", ms_fwd=0.1, ms_fwd_bwd=0.2)]
    failing = cases.Case("poly_ncp", "fake", M=64, d=32, k=16, N=3).describe()
    error = "NotImplementedError: k | too big\nsecond line"
    error_rows = [row("eager"), dict(provider="triton", status="error", error=error)]
    meta = dict(device="NVIDIA H100 80GB HBM3", date="2026-11-25", time_utc="10:00:00", commit="abc123", torch="2.11",
                triton="3.6", cuda="13.0", python="3.12", quick=False, tf32=False, timing="do_bench median",
                build_rc=0, tests=dict(bench_run.parse_pytest_log(PYTEST_LOG), rc=1, log="tests.log"))
    ceilings = dict(matmul_tflops_bf16=800.0, matmul_tflops_fp32=50.0, copy_gbps=3000.0)
    return dict(meta=meta, ceilings=ceilings, cases=[dict(case=case, rows=rows), dict(case=failing, rows=error_rows)])


PYTEST_LOG = """\
........F..s.
=========================== short test summary info ============================
FAILED tests/test_nn.py::test_gpu_modules_match_survey[bfloat16-ccp-cuda] - AssertionError: dx: relative error
ERROR tests/test_poly_ncp.py::test_gpu[cuda] - RuntimeError: boom
1 failed, 10 passed, 1 skipped, 1 error in 12.34s
"""


def test_parse_pytest_log():
    parsed = bench_run.parse_pytest_log(PYTEST_LOG)
    assert parsed["summary"] == "1 failed, 10 passed, 1 skipped, 1 error in 12.34s"
    assert parsed["failed"] == ["FAILED tests/test_nn.py::test_gpu_modules_match_survey[bfloat16-ccp-cuda]",
                                "ERROR tests/test_poly_ncp.py::test_gpu[cuda]"]
    assert "no pytest summary" in bench_run.parse_pytest_log("....\nKeyboardInterrupt\n")["summary"]


def test_derive():
    report = bench_run.derive(fake_report())
    rows = {r["provider"]: r for r in report["cases"][0]["rows"]}
    case = report["cases"][0]["case"]
    triton = rows["triton"]
    assert triton["speedup_vs_eager_fwd"] == pytest.approx(4.0)
    assert triton["speedup_vs_eager_fwd_bwd"] == pytest.approx(3.0)
    assert triton["speedup_vs_compiled_fwd_bwd"] == pytest.approx(2.0)
    assert rows["eager"]["speedup_vs_eager_fwd"] == pytest.approx(1.0)
    assert triton["tflops_fwd_bwd"] == pytest.approx(case["flops_fwd_bwd"] / 2.0e-3 / 1e12)
    assert triton["gbps_fwd"] == pytest.approx(case["bytes_fwd"] / 0.5e-3 / 1e9)
    # Compute-bound here: the roofline time is the FLOPs at the bf16 matmul ceiling.
    assert triton["roofline_pct_fwd_bwd"] == pytest.approx(100 * case["flops_fwd_bwd"] / 800e12 / 2.0e-3)
    assert "speedup_vs_eager_fwd" not in rows["cuda"], "a wrong result earns no speedup"
    assert "tflops_fwd" not in report["cases"][1]["rows"][1], "an error row has no rates"


def test_write_report(tmp_path):
    report = bench_run.derive(fake_report())
    copy = tmp_path / "out"
    paths = bench_run.write_report(report, tmp_path / "results", copy_to=copy)
    stem = "NVIDIA-H100-80GB-HBM3-2026-11-25"
    assert [p.name for p in paths] == [f"{stem}.json", f"{stem}.md", f"{stem}.svg"]
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in paths)
    loaded = json.loads(paths[0].read_text())
    assert loaded["ceilings"]["copy_gbps"] == 3000.0
    assert loaded["cases"][0]["rows"][2]["speedup_vs_eager_fwd_bwd"] == pytest.approx(3.0)
    md = paths[1].read_text()
    for expected in ("NVIDIA H100 80GB HBM3, 2026-11-25", "commit `abc123`", "800.0 TFLOP/s", "3000 GB/s",
                     "1 failed, 10 passed, 1 skipped, 1 error in 12.34s (exit status 1)", "build: ok",
                     "| poly_chain-fake-bf16 | triton | 2.000 |", "3.00× |", "| cuda | wrong |", "wrong result",
                     r"error: NotImplementedError: k \| too big |", "none correct (triton error)",
                     "## GPU test failures", "test_gpu_modules_match_survey[bfloat16-ccp-cuda]", f"({stem}.svg)"):
        assert expected in md, f"{expected!r} missing from the markdown:\n{md}"
    # Every table row has as many cells as its header.
    for block in md.split("\n\n"):
        table = [line for line in block.splitlines() if line.startswith("|")]
        if table:
            widths = {len(line.replace("\\|", "").split("|")) for line in table}
            assert len(widths) == 1, block


def test_results_stem():
    assert bench_run.results_stem("NVIDIA H200 (141GB)", "2026-01-02") == "NVIDIA-H200-141GB-2026-01-02"


def test_chart():
    """Bars are speedups over eager, to scale on a shared axis; rows without a speedup are labelled, not drawn."""
    report = bench_run.derive(fake_report())
    svg = ET.fromstring(chart.render_svg(report))
    ns = "{http://www.w3.org/2000/svg}"
    bars = {rect.find(f"{ns}title").text: float(rect.get("width")) for rect in svg.iter(f"{ns}rect")
            if rect.find(f"{ns}title") is not None}
    # poly_chain-fake: compiled 2x / 1.5x, triton 4x / 3x over eager; cuda is wrong, the poly_ncp triton row an error.
    assert sorted(bars) == ["compiled 1.50×", "compiled 2.00×", "triton 3.00×", "triton 4.00×"]
    assert chart.axis_max(report) == 4.5
    assert bars["triton 4.00×"] == pytest.approx(chart.PANEL_W * 4 / 4.5, abs=0.1)
    assert bars["triton 4.00×"] == pytest.approx(2 * bars["compiled 2.00×"], abs=0.1)
    texts = [t.text for t in svg.iter(f"{ns}text")]
    assert texts.count("cuda: wrong result") == 2 and texts.count("triton: error") == 2
    assert "poly_chain-fake-bf16" in texts and any("commit abc123" in t for t in texts)


def test_linear_attention_report(tmp_path):
    """A linear-attention case: speedups vs fla, the byte floor, the eager form and the skipped rows in the markdown;
    fla's bar in the chart."""
    case = cases.linear_attention_cases()[1]
    rows = [dict(provider=p, status="ok", rel_err_fwd=1e-3, rel_err_bwd=2e-3, ms_fwd=fwd, ms_fwd_bwd=both,
                 peak_mib_fwd=10.0, peak_mib_fwd_bwd=30.0)
            for p, fwd, both in (("eager", 4.0, 12.0), ("compiled", 2.0, 8.0), ("fla", 0.8, 3.4),
                                 ("triton", 0.4, 1.7))]
    rows.append(dict(provider="cuda", status="skipped", error="backend cuda is not available: not built"))
    report = fake_report()
    report["cases"] = [dict(case=case.describe(), rows=rows)] + report["cases"]
    bench_run.derive(report)
    triton = report["cases"][0]["rows"][3]
    assert triton["speedup_vs_fla_fwd_bwd"] == pytest.approx(2.0)
    assert triton["byte_floor_x_fwd_bwd"] == pytest.approx(1.7 / (case.min_bytes("fwd+bwd") / 3000e9 * 1e3))
    md = bench_run.render_markdown(report)
    for expected in ("## linear_attention-1x8192x96x128-bf16: B=1 T=8192 H=96 Dk=128 Dv=128 "
                     "(identity, no normalize, scale 0.08839)",
                     "eager: chunked form", "| vs eager | vs compiled | vs fla |", "| fla | ok |",
                     "| cuda | skipped: backend cuda is not available: not built |", "linear_attention: model FLOPs",
                     "poly_chain / poly_ncp / CCP / NCP: model FLOPs"):
        assert expected in md, f"{expected!r} missing from the markdown:\n{md}"
    for block in md.split("\n\n"):  # every table row has as many cells as its header
        table = [line for line in block.splitlines() if line.startswith("|")]
        if table:
            assert len({len(line.replace("\\|", "").split("|")) for line in table}) == 1, block
    poly_table = md[md.index("## poly_chain-fake-bf16"):].split("\n\n")[1]
    assert "vs fla" not in poly_table, "a case without an fla row has no fla column"
    svg = ET.fromstring(chart.render_svg(report))
    ns = "{http://www.w3.org/2000/svg}"
    bars = [rect.find(f"{ns}title").text for rect in svg.iter(f"{ns}rect") if rect.find(f"{ns}title") is not None]
    assert "fla 3.53×" in bars and "triton 7.06×" in bars  # over eager, fwd+bwd: 12 / 3.4, 12 / 1.7
    assert [t.text for t in svg.iter(f"{ns}text")].count("cuda: skipped") == 2
    bench_run.write_report(report, tmp_path)
