"""pytest-benchmark view of pyfici.benchcases.rerank:
``pytest benchmarks/test_bench_rerank.py --bench-size full`` (the full size
runs Market-1501 scale and the dense numpy anchor up to 2,000 x 8,000)."""

import pytest
from conftest import run_case


@pytest.mark.parametrize("impl", range(2))
@pytest.mark.parametrize("case", range(3))
def test_rerank(benchmark, case, impl, bench_size, bench_device):
    run_case(benchmark, "rerank", case, impl, bench_size, bench_device)
