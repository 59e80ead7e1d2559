"""Backend choice for pyfici ops.

Order of precedence: the op's ``backend=`` argument, then the environment
variable ``PYFICI_BACKEND``, then the op's default for the tensors' device
("cpu" -> the C++ module, "cuda" -> the CUDA module unless the op prefers
Triton). A requested or default backend that is not built raises a
RuntimeError that says how to rebuild: pyfici never falls back silently to a
slower path. ``backend="torch"`` always works (the readable reference).
"""

from __future__ import annotations

import os

import torch

from pyfici import _native

BACKENDS = ("cpu", "cuda", "triton", "torch")


def _available(backend: str) -> tuple[bool, str]:
    if backend == "cpu":
        return _native.has_cpu(), _native.cpu_error()
    if backend == "cuda":
        return _native.has_cuda(), "pyfici._cuda is not built (no CUDA compiler at build time?)"
    if backend == "triton":
        return _native.has_triton(), "triton is not importable (pip install triton)"
    return True, ""


def choose_backend(
    op: str,
    device: torch.device,
    backend: str | None = None,
    *,
    cuda_default: str = "cuda",
    supported: tuple[str, ...] = BACKENDS,
) -> str:
    """Resolve which backend runs ``op`` on tensors living on ``device``."""
    source = "backend="
    if backend is None:
        env = os.environ.get("PYFICI_BACKEND")
        if env:
            backend, source = env, "PYFICI_BACKEND="
    if backend is None:
        if device.type == "cpu":
            backend = "cpu"
        elif device.type == "cuda":
            backend = cuda_default
        else:
            raise ValueError(f"{op}: tensors on device '{device}' are not supported (use cpu or cuda, or backend='torch')")
        source = "default backend "
    if backend not in BACKENDS:
        raise ValueError(f"{op}: {source}{backend!r} is not one of {BACKENDS}")
    if backend not in supported:
        raise ValueError(f"{op}: {source}{backend!r} is not implemented for this op (it has {supported})")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"{op}: {source}'cpu' needs CPU tensors, got tensors on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"{op}: {source}'cuda' needs CUDA tensors, got tensors on {device}")
    if backend == "triton" and device.type != "cuda" and not _native.triton_interpret():
        raise ValueError(
            f"{op}: {source}'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device}"
        )
    ok, why = _available(backend)
    if not ok:
        raise RuntimeError(f"{op}: backend {backend!r} is unavailable: {why}; {_native.REBUILD_HINT}")
    return backend
