"""pytest-benchmark: causal_linear_attention, every provider (eager, compiled, flash-linear-attention's
chunk_linear_attn when installed, triton, cuda) x mode x case (benchmarks/cases.py). Needs a CUDA GPU.

    python -m pytest benchmarks/bench_linear_attention.py --benchmark-columns=median,iqr,rounds -k "fwd+bwd"
"""

import cases
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA GPU")


@pytest.mark.parametrize("case", cases.linear_attention_cases(), ids=str)
@pytest.mark.parametrize("mode", cases.MODES)
@pytest.mark.parametrize("provider", cases.LinearAttentionCase.providers)
def test_linear_attention(benchmark, provider, mode, case):
    cases.run_pytest_benchmark(benchmark, case, provider, mode)
