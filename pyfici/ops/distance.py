"""Family 1: embedding distance and ReID ranking statistics.

``pairwise_distance`` gives users the full [M, N] matrix. The GEMM is torch's
(BLAS on the CPU, cuBLAS on the GPU) for the ``cpu``, ``cuda`` and ``torch``
backends; the ``triton`` backend fuses the GEMM with the distance epilogue.

``reid_rank_stats`` reduces a [Q, G] distance tile to per-query AP, first-hit
rank, INP and match count without sorting the gallery rows (see
csrc/cpu/reid_rank.cpp). It is the engine of :mod:`pyfici.reid`.
"""

from __future__ import annotations

import torch

from pyfici import _native
from pyfici.ops import reference
from pyfici.ops._backend import choose_backend
from pyfici.ops._validate import (
    as_tensor,
    check_feature_pair,
    check_finite,
    check_float,
    check_length,
    check_ndim,
)

METRICS = ("euclidean", "sqeuclidean", "cosine")

# ---------------------------------------------------------------------------
# pairwise_distance
# ---------------------------------------------------------------------------


def prepare_gallery(y: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gallery-side work done once for many query tiles: the float32/64 copy,
    normalised rows for cosine, squared norms for (sq)euclidean."""
    out_dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
    y = y.to(out_dtype)
    if metric == "cosine":
        return y / y.norm(dim=1, keepdim=True).clamp_min(1e-12), None
    return y, (y * y).sum(1)


EPILOGUES = {"none": 0, "sqeuclidean": 1, "euclidean": 2, "cosine": 3}


def distance_tile_raw(x: torch.Tensor, y: torch.Tensor, y_norms: torch.Tensor | None, metric: str):
    """The GEMM part of :func:`distance_tile` only: returns ``(raw, epilogue, q_norms)``
    where ``apply_epilogue(raw, epilogue, q_norms)`` is ``distance_tile(...)``.
    The CPU rank kernel applies the same epilogue (bit for bit) while it reads
    the tile, saving three passes over memory."""
    x = x.to(y.dtype)
    if metric == "cosine":
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return torch.mm(x, y.T), EPILOGUES["cosine"], None
    d = torch.addmm(y_norms[None, :], x, y.T, beta=1.0, alpha=-2.0)
    return d, EPILOGUES[metric], (x * x).sum(1)


def apply_epilogue(raw: torch.Tensor, epilogue: int, q_norms: torch.Tensor | None, *,
                   inplace: bool = False) -> torch.Tensor:
    """Distance epilogue of :func:`distance_tile_raw` (0 none, 1 sqeuclidean
    max(raw + ||q||^2, 0), 2 euclidean sqrt of that, 3 cosine clamp(1 - raw, 0, 2))."""
    if epilogue == 0:
        return raw
    d = raw if inplace else raw.clone()
    if epilogue == 3:
        return d.neg_().add_(1.0).clamp_(0.0, 2.0)
    d.add_(q_norms[:, None]).clamp_(min=0.0)
    return d.sqrt_() if epilogue == 2 else d


def distance_tile(x: torch.Tensor, y: torch.Tensor, y_norms: torch.Tensor | None, metric: str) -> torch.Tensor:
    """Distances of a query tile to a gallery prepared by :func:`prepare_gallery` (torch GEMM)."""
    return apply_epilogue(*distance_tile_raw(x, y, y_norms, metric), inplace=True)


def _distance_gemm(x: torch.Tensor, y: torch.Tensor, metric: str, self_distance: bool) -> torch.Tensor:
    yp, yn = prepare_gallery(y, metric)
    d = distance_tile(x, yp, yn, metric)
    if self_distance:
        d.fill_diagonal_(0.0)
    return d


@torch.library.custom_op("pyfici::pairwise_distance", mutates_args=())
def _pairwise_distance_op(x: torch.Tensor, y: torch.Tensor, metric: str, self_distance: bool, backend: str) -> torch.Tensor:
    if backend == "torch":
        return reference.pairwise_distance(x, y, metric, self_distance)
    if backend == "triton":
        from pyfici.kernels import reid as tk

        return tk.pairwise_distance(x, y, metric, self_distance)
    return _distance_gemm(x, y, metric, self_distance)


@_pairwise_distance_op.register_fake
def _(x, y, metric, self_distance, backend):
    dtype = torch.float64 if x.dtype == torch.float64 and backend != "triton" else torch.float32
    return x.new_empty((x.shape[0], y.shape[0]), dtype=dtype)


def pairwise_distance(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    metric: str = "euclidean",
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Distances between the rows of ``x`` [M, D] and ``y`` [N, D] -> [M, N].

    metric: "euclidean", "sqeuclidean" (both via ||x||^2 + ||y||^2 - 2 x.y,
    clamped at 0 so no NaN from rounding) or "cosine" (1 - cosine similarity,
    clamped to [0, 2]). With ``y=None`` the distances of ``x`` to itself are
    returned and the diagonal is exactly 0. Output float32 (float64 for
    float64 inputs, except on the triton backend which accumulates in float32).
    """
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    self_distance = y is None
    x = as_tensor("x", x)
    x, y, dev = check_feature_pair("x", x, "y", x if y is None else y, "M,D", "N,D")
    be = choose_backend("pairwise_distance", dev, backend, cuda_default="cuda")
    return _pairwise_distance_op(x, y, metric, self_distance, be)


# ---------------------------------------------------------------------------
# reid_rank_stats
# ---------------------------------------------------------------------------

_DIST_DTYPES = (torch.float32, torch.float64)


@torch.library.custom_op("pyfici::reid_rank_stats", mutates_args=())
def _reid_rank_stats_op(
    dist: torch.Tensor,
    q_pids: torch.Tensor,
    g_pids: torch.Tensor,
    q_camids: torch.Tensor,
    g_camids: torch.Tensor,
    junk_minus1: bool,
    trapezoid: bool,
    backend: str,
    epilogue: int = 0,
    q_norms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if epilogue != 0 and backend != "cpu":
        dist = apply_epilogue(dist, epilogue, q_norms)
        epilogue = 0
    if backend == "torch":
        return reference.reid_rank_stats(dist, q_pids, g_pids, q_camids, g_camids, junk_minus1, trapezoid)
    Q, G = dist.shape
    dev = dist.device
    ap = torch.empty(Q, dtype=torch.float64, device=dev)
    inp = torch.empty(Q, dtype=torch.float64, device=dev)
    first = torch.empty(Q, dtype=torch.int64, device=dev)
    nmatch = torch.empty(Q, dtype=torch.int64, device=dev)
    if backend == "triton":
        from pyfici.kernels import reid as tk

        tk.reid_rank_stats_(dist, q_pids, g_pids, q_camids, g_camids, junk_minus1, trapezoid, ap, first, inp, nmatch)
        return ap, first, inp, nmatch
    if Q == 0:
        return ap, first, inp, nmatch
    args = (
        dist.data_ptr(), _native.DTYPE_CODES[dist.dtype], Q, G, dist.stride(0),
        q_pids.data_ptr(), g_pids.data_ptr(), q_camids.data_ptr(), g_camids.data_ptr(),
        junk_minus1, trapezoid, ap.data_ptr(), first.data_ptr(), inp.data_ptr(), nmatch.data_ptr(),
    )
    if backend == "cpu":
        qn_ptr = q_norms.data_ptr() if (epilogue != 0 and q_norms is not None) else 0
        _native.cpu_module().reid_rank_stats(*args, _native.num_threads(), epilogue, qn_ptr)
    else:
        with torch.cuda.device(dev):
            _native.cuda_module().reid_rank_stats(*args, _native.stream_ptr(dev))
    return ap, first, inp, nmatch


@_reid_rank_stats_op.register_fake
def _(dist, q_pids, g_pids, q_camids, g_camids, junk_minus1, trapezoid, backend, epilogue=0, q_norms=None):
    Q = dist.shape[0]
    return (
        dist.new_empty(Q, dtype=torch.float64),
        dist.new_empty(Q, dtype=torch.int64),
        dist.new_empty(Q, dtype=torch.float64),
        dist.new_empty(Q, dtype=torch.int64),
    )


def reid_rank_stats(
    dist: torch.Tensor,
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    *,
    protocol: str = "torchreid",
    check_finite_values: bool = True,
    backend: str | None = None,
    epilogue: int = 0,
    q_norms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-query ranking statistics of a [Q, G] distance matrix (lower = closer).

    Returns ``(ap, first_rank, inp, num_matches)``: float64 [Q] average
    precision, int64 [Q] 0-based rank of the first true match among the valid
    gallery items (-1 if none), float64 [Q] inverse negative penalty
    (num_matches / (1 + rank of the hardest match)), int64 [Q] matches.
    protocol: "torchreid" (junk = same pid and camera; AP = mean precision at
    hits) or "market1501" (junk also pid -1; AP by the official trapezoid
    rule). Ties in distance go to the lower gallery index.

    ``epilogue`` / ``q_norms`` (internal, used by pyfici.reid.evaluate): the
    tile holds the raw GEMM output of :func:`distance_tile_raw` and the
    distance epilogue is applied on the fly.
    """
    if protocol not in ("torchreid", "market1501"):
        raise ValueError(f"protocol: expected 'torchreid' or 'market1501', got {protocol!r}")
    dist = as_tensor("distmat", dist)
    check_ndim("distmat", dist, 2, "Q,G")
    if dist.dtype not in _DIST_DTYPES:
        check_float("distmat", dist)
        dist = dist.float()
    if dist.shape[0] == 0:
        raise ValueError("distmat: there are no queries (shape[0] == 0)")
    if dist.shape[1] == 0:
        raise ValueError("distmat: the gallery is empty (shape[1] == 0)")
    if dist.stride(1) != 1:
        dist = dist.contiguous()
    Q, G = dist.shape
    dev = dist.device
    q_pids = as_tensor("q_pids", q_pids, dtype=torch.int64, device=dev).contiguous()
    g_pids = as_tensor("g_pids", g_pids, dtype=torch.int64, device=dev).contiguous()
    q_camids = as_tensor("q_camids", q_camids, dtype=torch.int64, device=dev).contiguous()
    g_camids = as_tensor("g_camids", g_camids, dtype=torch.int64, device=dev).contiguous()
    check_length("q_pids", q_pids, Q, "distmat")
    check_length("q_camids", q_camids, Q, "distmat")
    check_length("g_pids", g_pids, G, "the columns of distmat")
    check_length("g_camids", g_camids, G, "the columns of distmat")
    if check_finite_values:
        check_finite("distmat", dist)
    be = choose_backend("reid_rank_stats", dev, backend, cuda_default="cuda")
    market = protocol == "market1501"
    if epilogue not in (0, 1, 2, 3):
        raise ValueError(f"epilogue: expected 0..3, got {epilogue}")
    if epilogue in (1, 2):
        if q_norms is None or q_norms.shape != (Q,) or q_norms.dtype != dist.dtype or q_norms.device != dev:
            raise ValueError(f"q_norms: expected a [{Q}] {dist.dtype} tensor on {dev} for epilogue {epilogue}")
        q_norms = q_norms.contiguous()
    else:
        q_norms = None
    return _reid_rank_stats_op(dist, q_pids, g_pids, q_camids, g_camids, market, market, be, epilogue, q_norms)
