"""The benchmark pipeline end to end on a CPU, as CI runs it: `python -m hadamard_kernels bench --quick` runs the
pytest-benchmark suite on the tiny CPU cases (reference, Triton interpreter, eager), records every test, resumes a
record an earlier run left (its tests are not run again), and writes the report."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from utils import HAS_CUDA

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import cases  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
import suite  # noqa: E402

# A test an earlier run recorded (the slowest one under the interpreter): the run must resume around it.
DONE = "benchmarks/bench_poly_ncp.py::test_poly_ncp[poly_ncp-cpu-tiny-fp32-fwd+bwd-triton]"


def bench(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hadamard_kernels", "bench", "--quick", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)


@pytest.mark.skipif(HAS_CUDA, reason="the CPU pipeline; a GPU machine runs the real suite (run_gpu.sh)")
def test_bench_quick_runs_on_a_cpu_and_writes_the_results(tmp_path):
    readme_before = (REPO / "README.md").read_text()
    record = run.record_path(tmp_path, suite.device_name(), suite.git_commit(), quick=True)
    record.parent.mkdir(parents=True)
    earlier = dict(type="test", nodeid=DONE, case=cases.cpu_cases()[1].describe(), provider="triton",
                   mode="fwd+bwd", status="skipped", error="planted by the test as an earlier run's result")
    record.write_text(json.dumps(earlier) + "\n")
    done = bench(tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    md_files = sorted(tmp_path.glob("cpu-*.md"))
    assert len(md_files) == 1, sorted(p.name for p in tmp_path.iterdir())
    stem = md_files[0].stem
    assert {p.name for p in tmp_path.iterdir() if p.is_file()} == {f"{stem}.{ext}" for ext in
                                                                   ("json", "md", "svg", "record.jsonl")}
    ET.parse(tmp_path / f"{stem}.svg")

    results = json.loads((tmp_path / f"{stem}.json").read_text())
    assert results["meta"]["kind"] == "cpu" and not results["pending"]
    ids = {c.id for c in cases.cpu_cases()}
    assert {e["case"]["id"] for e in results["cases"]} == ids
    for entry in results["cases"]:
        rows = {r["provider"]: r for r in entry["rows"]}
        assert set(rows) == {"eager", "reference", "triton"}, entry["case"]["id"]
        for provider, row in rows.items():
            assert not any(k.startswith(("speedup", "tflops", "gbps")) for k in row), "no kernel-speed numbers"
            if entry["case"]["id"] == "poly_ncp-cpu-tiny-fp32" and provider == "triton":
                assert row["status"] == "skipped" and "planted" in row["error"], "resumed, not run again"
                continue
            assert row["status"] == "ok" and row["ms_fwd_bwd"] > 0, (entry["case"]["id"], row)

    md = md_files[0].read_text()
    assert report.CPU_BANNER in md and "CPU ms fwd+bwd" in md
    assert "TFLOP/s" not in md and "×" not in md

    # The pytest-benchmark JSON holds the same measurements as the report (one timer, one set of samples).
    bench_json = json.loads(next(record.parent.glob("*.pytest-benchmark.json")).read_text())
    stats = {b["fullname"]: b for b in bench_json["benchmarks"]}
    tests = [e for e in report.read_record(record) if e["type"] == "test" and e["nodeid"] != DONE]
    assert len(tests) == len(stats) == 3 * len(ids) - 1
    for t in tests:
        assert stats[t["nodeid"]]["stats"]["median"] * 1e3 == pytest.approx(t["timing"]["p50_ms"])
        assert stats[t["nodeid"]]["group"] == f"{t['case']['id']} fwd+bwd"
        assert stats[t["nodeid"]]["options"]["timer"] == "hadamard_kernels_samples"
    assert bench_json["hadamard_kernels"]["kind"] == "cpu"
    assert (REPO / "README.md").read_text() == readme_before, "a CPU run never touches the README"
