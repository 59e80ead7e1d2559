"""Loads the compiled modules ``pyfici._C`` (CPU) and ``pyfici._cuda`` (CUDA).

Neither links libtorch: functions take raw pointers (``tensor.data_ptr()``),
sizes, dtype codes (:data:`DTYPE_CODES`) and, for CUDA, the caller's stream.
"""

from __future__ import annotations

import importlib
import os

import torch

REBUILD_HINT = (
    "rebuild pyfici from its source folder with `pip install --no-build-isolation -e .` "
    "(needs cmake and a C++17 compiler; nvcc for the CUDA backend), or pass backend='torch' "
    "to use the slow reference implementation"
)


def _load(name: str):
    try:
        return importlib.import_module(f"pyfici.{name}"), None
    except ImportError as e:  # pragma: no cover - depends on the build
        return None, str(e)


_C, _C_ERROR = _load("_C")
_cuda, _CUDA_ERROR = (None, "disabled by PYFICI_NO_CUDA") if os.environ.get("PYFICI_NO_CUDA") == "1" else _load("_cuda")


def _code_tables():
    """DTYPE_CODES (torch dtype -> int) and METRIC_CODES (name -> int) from the native
    module's table (csrc/codes.h); every native module exports the same one."""
    mod = _C if _C is not None else _cuda
    if mod is None:
        return {}, {}
    dtypes = {getattr(torch, name): code for name, code in mod.DTYPE_CODES.items()}
    return dtypes, dict(mod.METRIC_CODES)


DTYPE_CODES, METRIC_CODES = _code_tables()


def cpu_module():
    """The CPU module, or a RuntimeError that says how to rebuild."""
    if _C is None:
        raise RuntimeError(f"pyfici._C (the CPU backend) is not built or failed to load ({_C_ERROR}); {REBUILD_HINT}")
    return _C


def cuda_module():
    """The CUDA module, or a RuntimeError that says how to rebuild."""
    if _cuda is None:
        raise RuntimeError(
            f"pyfici._cuda (the CUDA backend) is not built or failed to load ({_CUDA_ERROR}); {REBUILD_HINT}"
        )
    return _cuda


def has_cpu() -> bool:
    return _C is not None


def has_cuda() -> bool:
    return _cuda is not None


def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def num_threads() -> int:
    return max(1, torch.get_num_threads())


def stream_ptr(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def info() -> dict:
    """What is built and importable, for ``pyfici info``."""
    import pyfici

    d: dict = {
        "pyfici": pyfici.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton

        d["triton"] = triton.__version__
    except Exception as e:
        d["triton"] = f"not importable ({type(e).__name__})"
    d["backend_cpu"] = (
        f"built ({_C.__simd__}, {_C.__compiler__}, OpenMP max threads {_C.max_threads()})" if _C else f"missing: {_C_ERROR}"
    )
    if _cuda is not None:
        d["backend_cuda"] = f"built (archs {_cuda.__archs__}, cudart {_cuda.runtime_version()})"
    else:
        d["backend_cuda"] = f"missing: {_CUDA_ERROR}"
    d["backend_triton"] = "importable" if has_triton() else "missing (pip install triton)"
    d["backend_torch"] = "always"
    return d
