"""pytest-benchmark view of pyfici.benchcases.optim:
``pytest benchmarks/test_bench_optim.py --bench-size full``."""

import pytest
from conftest import run_case


@pytest.mark.parametrize("impl", range(5))
@pytest.mark.parametrize("case", range(8))
def test_optim(benchmark, case, impl, bench_size, bench_device):
    run_case(benchmark, "optim", case, impl, bench_size, bench_device)
