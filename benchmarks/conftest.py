import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--bench-size", default="small", choices=("small", "full"))
    parser.addoption("--bench-device", default="cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def bench_size(request):
    return request.config.getoption("--bench-size")


@pytest.fixture
def bench_device(request):
    return request.config.getoption("--bench-device")


def run_case(benchmark, family, index, impl_index, size, device):
    """Time implementation ``impl_index`` of case ``index`` of a family, as ``pyfici bench`` does."""
    from pyfici.bench import load_cases, timing_plan

    cases = load_cases((family,), size, device)
    if index >= len(cases):
        pytest.skip(f"no case {index} for {device}/{size}")
    case = cases[index]
    fns = case.setup()
    names = list(fns)
    if impl_index >= len(names):
        pytest.skip("implementation not available here")
    name = names[impl_index]
    benchmark.extra_info["case"] = case.name
    benchmark.extra_info["impl"] = name
    fn, rounds, warm = timing_plan(case, fns[name])
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warm, iterations=1)
