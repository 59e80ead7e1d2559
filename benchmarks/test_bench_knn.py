"""pytest-benchmark view of pyfici.benchcases.knn:
``pytest benchmarks/test_bench_knn.py --bench-size full``."""

import pytest
from conftest import run_case

import pyfici.benchcases.knn as cases

cases.MEASURE_MEMORY = False  # `pyfici bench --family knn` reports it; here setup runs once per test


@pytest.mark.parametrize("impl", range(6))
@pytest.mark.parametrize("case", range(3))
def test_knn(benchmark, case, impl, bench_size, bench_device):
    run_case(benchmark, "knn", case, impl, bench_size, bench_device)
