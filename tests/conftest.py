import os

import pytest
import torch

# Triton kernels run on CPU tensors under the interpreter when there is no GPU.
# This must be set before any triton.jit decoration (i.e. before pyfici.kernels imports).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _has_triton():
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = _has_triton()


def backends_for(device: str):
    """Backends to compare with the reference on this device."""
    from pyfici import _native

    out = []
    if device == "cpu":
        out.append("cpu")
        if HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1":
            out.append("triton")
    else:
        if _native.has_cuda():
            out.append("cuda")
        if HAS_TRITON:
            out.append("triton")
    return out


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    return request.param


def _cpu_isas():
    from pyfici import _native

    if os.environ.get("PYFICI_CPU_ISA"):
        return [_native.CPU_ISA or "none"]
    return list(_native.CPU_ISAS_SUPPORTED) or ["none"]


@pytest.fixture(params=_cpu_isas())
def cpu_isa(request):
    """Runs a test once per CPU instruction-set variant this machine supports (generic,
    avx2, avx512): the CPU ops call that variant inside the test."""
    from pyfici import _native

    if request.param == "none":
        pytest.skip("no CPU variant of pyfici is built")
    with _native.use_isa(request.param):
        yield request.param
