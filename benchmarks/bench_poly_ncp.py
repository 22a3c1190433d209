"""pytest-benchmark: poly_ncp, and the hk.nn.NCP module vs the survey's forward.
Every provider x mode x case of this device (benchmarks/cases.py, conftest.py).

    python -m pytest benchmarks/bench_poly_ncp.py --benchmark-columns=median,iqr,rounds -k "fwd+bwd"
"""

import suite

OPS = ("poly_ncp", "NCP")


def test_poly_ncp(benchmark, case, provider, mode):
    suite.run_benchmark(benchmark, case, provider, mode)
