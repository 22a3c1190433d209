"""pytest-benchmark: poly_gate (MONet's PolyMlp gate).
Every provider x mode x case of this device (benchmarks/cases.py, conftest.py).

    python -m pytest benchmarks/bench_poly_gate.py --benchmark-columns=median,iqr,rounds -k "fwd+bwd"
"""

import suite

OPS = ("poly_gate",)


def test_poly_gate(benchmark, case, provider, mode):
    suite.run_benchmark(benchmark, case, provider, mode)
