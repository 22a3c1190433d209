"""pytest-benchmark: poly_sa (Poly-SA).
Every provider x mode x case of this device (benchmarks/cases.py, conftest.py).

    python -m pytest benchmarks/bench_poly_sa.py --benchmark-columns=median,iqr,rounds -k "fwd+bwd"
"""

import suite

OPS = ("poly_sa",)


def test_poly_sa(benchmark, case, provider, mode):
    suite.run_benchmark(benchmark, case, provider, mode)
