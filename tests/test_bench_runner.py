"""benchmarks/run.py and benchmarks/cases.py on the CPU: the eager baselines against the reference, the accuracy
gate, error rows, derived numbers and the JSON / markdown writing, with fake timings (no GPU needed)."""

from __future__ import annotations

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


# ---------------------------------------------------------------- run.py
def test_help_and_list_work_without_a_gpu():
    for flags in (["--help"], ["--list", "--quick"]):
        done = subprocess.run([sys.executable, str(BENCH_DIR / "run.py"), *flags], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
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
