"""pytest-benchmark: poly_chain, and the hk.nn.CCP module vs the survey's forward.
Every provider x mode x case of this device (benchmarks/cases.py, conftest.py).

    python -m pytest benchmarks/bench_poly_chain.py --benchmark-columns=median,iqr,rounds -k "fwd+bwd"
"""

import suite

OPS = ("poly_chain", "CCP")


def test_poly_chain(benchmark, case, provider, mode):
    suite.run_benchmark(benchmark, case, provider, mode)
