"""A CPU GEMM on the chosen provider, for code that computes its own tiles.

``mm_nt(x, y)`` is ``x @ y.T`` (``torch.addmm`` with ``bias``) computed by the GEMM
provider of :func:`pyfici._native.tile_gemm_provider` (``PYFICI_GEMM``; its auto rule
is :func:`pyfici._native.auto_tile_gemm`): torch.mm, or
OpenBLAS from scipy-openblas32 on all of torch's threads (OpenMP threads, each
calling OpenBLAS single-threaded on a block of rows). Results agree with torch
to rounding (a different BLAS sums in a different order); use it where that is fine
(approximate scores that are refined or certified, distances).
"""

from __future__ import annotations

import torch

from pyfici import _native


def mm_nt(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor | None = None, *, alpha: float = 1.0,
          bias: torch.Tensor | None = None) -> torch.Tensor:
    """``alpha * x @ y.T`` (+ ``bias`` [N], broadcast over the rows) -> [M, N].

    x [M, K], y [N, K]: float32 or float64 tensors of one dtype. ``out``: an optional
    contiguous [M, N] tensor of that dtype to write into. CPU tensors use the chosen
    provider; other devices (and non-float dtypes) use torch.
    """
    M, N = x.shape[0], y.shape[0]
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    use_blas = (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and y.dtype == x.dtype
                and out.dtype == x.dtype and out.is_contiguous() and M * N > 0 and x.shape[1] > 0
                and not torch.compiler.is_compiling() and _native.tile_gemm_provider() == "openblas")
    if not use_blas:
        if bias is None:
            return torch.mm(x, y.T, out=out) if alpha == 1.0 else torch.mm(x, y.T, out=out).mul_(alpha)
        return torch.addmm(bias[None, :], x, y.T, beta=1.0, alpha=alpha, out=out)
    x = x.contiguous()
    y = y.contiguous()
    beta = 0.0
    if bias is not None:
        out.copy_(bias[None, :].expand(M, N))
        beta = 1.0
    # OpenMP threads each running OpenBLAS single-threaded on a block of rows: the
    # callers scan the result with OpenMP next, which OpenBLAS's own (spinning)
    # thread pool would slow down
    _native.openblas_module().gemm_nt_omp(_native.DTYPE_CODES[x.dtype], M, N, x.shape[1], x.data_ptr(),
                                          y.data_ptr(), out.data_ptr(), _native.num_threads(), alpha, beta)
    return out
