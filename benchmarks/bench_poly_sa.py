"""pytest-benchmark: poly_sa (Poly-SA), every provider x mode x case (benchmarks/cases.py). Needs a CUDA GPU.

    python -m pytest benchmarks/bench_poly_sa.py --benchmark-columns=median,iqr,rounds -k "bf16 and fwd+bwd"
"""

import cases
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA GPU")


@pytest.mark.parametrize("case", cases.poly_sa_cases(), ids=str)
@pytest.mark.parametrize("mode", cases.MODES)
@pytest.mark.parametrize("provider", cases.PolySACase.providers)
def test_poly_sa(benchmark, provider, mode, case):
    cases.run_pytest_benchmark(benchmark, case, provider, mode)
