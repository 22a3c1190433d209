"""pytest-benchmark: lrnn_product and the deep hk.nn.LRNN module.
Every provider x mode x case of this device (benchmarks/cases.py, conftest.py).

    python -m pytest benchmarks/bench_lrnn.py --benchmark-columns=median,iqr,rounds -k "fwd+bwd"
"""

import suite

OPS = ("lrnn", "LRNN")


def test_lrnn(benchmark, case, provider, mode):
    suite.run_benchmark(benchmark, case, provider, mode)
