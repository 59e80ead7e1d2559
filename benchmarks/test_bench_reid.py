"""pytest-benchmark view of pyfici.benchcases.reid:
``pytest benchmarks/test_bench_reid.py --bench-size full``."""

import pytest
from conftest import run_case


@pytest.mark.parametrize("impl", range(4))
@pytest.mark.parametrize("case", range(2))
def test_reid(benchmark, case, impl, bench_size, bench_device):
    run_case(benchmark, "reid", case, impl, bench_size, bench_device)
