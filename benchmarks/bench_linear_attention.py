"""pytest-benchmark: causal_linear_attention, and flash-linear-attention's chunk_linear_attn.
Every provider x mode x case of this device (benchmarks/cases.py, conftest.py).

    python -m pytest benchmarks/bench_linear_attention.py --benchmark-columns=median,iqr,rounds -k "fwd+bwd"
"""

import suite

OPS = ("linear_attention",)


def test_linear_attention(benchmark, case, provider, mode):
    suite.run_benchmark(benchmark, case, provider, mode)
