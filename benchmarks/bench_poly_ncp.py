"""pytest-benchmark: poly_ncp, and the hk.nn.CCP / NCP modules against the survey's forward on the same weights;
every provider x mode x case (benchmarks/cases.py). Needs a CUDA GPU.

    python -m pytest benchmarks/bench_poly_ncp.py --benchmark-columns=median,iqr,rounds -k "module and fwd+bwd"
"""

import cases
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA GPU")


@pytest.mark.parametrize("case", cases.poly_ncp_cases(), ids=str)
@pytest.mark.parametrize("mode", cases.MODES)
@pytest.mark.parametrize("provider", cases.Case.providers)
def test_poly_ncp(benchmark, provider, mode, case):
    cases.run_pytest_benchmark(benchmark, case, provider, mode)


@pytest.mark.parametrize("case", cases.module_cases(), ids=str)
@pytest.mark.parametrize("mode", cases.MODES)
@pytest.mark.parametrize("provider", cases.Case.providers)
def test_module(benchmark, provider, mode, case):
    cases.run_pytest_benchmark(benchmark, case, provider, mode)
