"""Family 2: exact batched kNN and the fused k-nearest (manifold) average.

Semantics (every backend):

* ``metric``: "sqeuclidean", "euclidean", "cosine" (distance 1 - cos, in
  [0, 2]) or "ip" (inner product, a *similarity*). Distances are returned
  sorted ascending (nearest first); "ip" is returned sorted *descending*
  (most similar first). Either way column 0 is the best neighbour.
* Ties go to the lower gallery index. ``exclude_self=True`` removes gallery
  item i from query i's candidates (use it when the queries are the gallery).
* Indices are int64 [Q, k]; values are float32, float64 for float64 inputs
  (the triton backend computes in float32).

How it runs: the gallery is walked in tiles. A score tile
``S = X_tile @ Y_tile^T`` comes from ``torch.mm`` (MKL / cuBLAS); a native
kernel merges each tile into a running per-row top-k list (C++ on the CPU with
OpenMP over rows, a block-per-row CUDA kernel on the GPU). The ranking score of
gallery item j is ``x.y_j * a_j + b_j`` with ``a = 1/||y||`` (cosine) or
``b = -||y||^2 / 2`` ((sq)euclidean), so no normalised copy of the gallery is
made. Extra memory is two score tiles on the CPU (``tile`` elements each,
default 8M = 32 MB in float32; the selection of one tile runs on a helper
thread while BLAS fills the other), one on CUDA, independent of Q and G. On the CPU the
selected neighbours' values are recomputed exactly (double accumulation) and
re-sorted; on CUDA / Triton they are derived from the float32 scores.

``knn_average`` fuses the average into the same pass: after a query tile is
done, the k selected gallery rows of each query are gathered and summed in
place (no [Q, k, D] buffer).

Sharded galleries: with ``sharded=True`` each ``torch.distributed`` rank
passes its own gallery shard (shards are concatenated in rank order to form the
global gallery) and the same queries; each rank selects its local top-k, the
lists are all-gathered and merged (ties to the lower global index), and every
rank returns the global result. ``knn_average`` then all-reduces the partial
sums of the neighbours each rank owns.
"""

from __future__ import annotations

import math
import os

import torch

from pyfici import _native
from pyfici.ops import reference
from pyfici.ops._backend import choose_backend
from pyfici.ops._validate import (
    as_tensor,
    check_feature_pair,
    check_finite,
    check_float,
    check_int_range,
)

METRICS = ("sqeuclidean", "euclidean", "cosine", "ip")
METRIC_CODES = {"sqeuclidean": 0, "euclidean": 1, "cosine": 2, "ip": 3}
DEFAULT_TILE = 1 << 23  # score-tile elements (32 MB in float32)
MAX_TILE_ROWS = 1024
MAX_K = {"cuda": 1024, "triton": 128}  # the cpu and torch backends take any k <= G


def _compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _tile_shape(Q: int, G: int, tile: int) -> tuple[int, int]:
    tq = max(1, min(Q, MAX_TILE_ROWS, max(tile // min(G, 8192), math.isqrt(tile) // 4)))
    tg = max(1, min(G, tile // tq))
    return tq, tg


def column_terms(y: torch.Tensor, metric: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-gallery-column (a, b) of the ranking score x.y * a + b (bigger is better)."""
    if metric == "cosine":
        return 1.0 / y.norm(dim=1).clamp_min(1e-12), None
    if metric in ("sqeuclidean", "euclidean"):
        return None, (y * y).sum(1).mul_(-0.5)
    return None, None


def scores_to_values(scores: torch.Tensor, x: torch.Tensor, metric: str) -> torch.Tensor:
    """Ranking scores (x.y*a + b) of the selected neighbours -> the metric's values."""
    if metric == "ip":
        return scores
    if metric == "cosine":
        xn = x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return (1.0 - scores / xn).clamp_(0.0, 2.0)
    d = ((x * x).sum(1, keepdim=True) - 2.0 * scores).clamp_(min=0.0)
    return d.sqrt_() if metric == "euclidean" else d


# ---------------------------------------------------------------------------
# CPU / CUDA backends: torch.mm score tiles + native selection
# ---------------------------------------------------------------------------


def _select_tiles(
    x: torch.Tensor,
    y: torch.Tensor,
    k: int,
    metric: str,
    exclude_self: bool,
    tile: int,
    backend: str,
    on_rows=None,
    col_offset: int = 0,
    self_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ranking scores and global indices of every query (best first).

    ``on_rows(q0, q1, idx_rows)`` is called after each query tile (fused averaging).
    Gallery column j has global index col_offset + j; with exclude_self,
    query i excludes global index self_offset + i.
    """
    Q, G = x.shape[0], y.shape[0]
    dt, dev = x.dtype, x.device
    code = _native.DTYPE_CODES[dt]
    a, b = column_terms(y, metric)
    tq, tg = _tile_shape(Q, G, tile)
    out_s = torch.empty((Q, k), dtype=dt, device=dev)
    out_i = torch.empty((Q, k), dtype=torch.int64, device=dev)
    # CPU: two score buffers, so the selection of tile t (one helper thread, GIL
    # released) runs while BLAS computes tile t + 1; the memory-bound scan then
    # hides under the compute-bound GEMM. CUDA: one buffer, stream-ordered.
    pipelined = backend == "cpu" and Q * G > tq * tg and _PIPELINE
    bufs = [torch.empty(tq * tg, dtype=dt, device=dev) for _ in range(2 if pipelined else 1)]
    nthreads = 1 if pipelined else _native.num_threads()
    mod = _native.cpu_module() if backend == "cpu" else _native.cuda_module()
    pending = None
    which = 0
    try:
        for q0 in range(0, Q, tq):
            q1 = min(Q, q0 + tq)
            rows = q1 - q0
            vals = out_s[q0:q1]
            idx = out_i[q0:q1]
            vals.fill_(float("-inf"))
            idx.fill_(-1)
            xq = x[q0:q1]
            for g0 in range(0, G, tg):
                g1 = min(G, g0 + tg)
                cols = g1 - g0
                S = bufs[which][: rows * cols].view(rows, cols)
                which = (which + 1) % len(bufs)
                torch.mm(xq, y[g0:g1].T, out=S)
                a_ptr = a[g0:g1].data_ptr() if a is not None else 0
                b_ptr = b[g0:g1].data_ptr() if b is not None else 0
                self_off = (self_offset + q0) if exclude_self else -1
                args = (S.data_ptr(), code, rows, cols, cols, col_offset + g0, a_ptr, b_ptr, k,
                        vals.data_ptr(), idx.data_ptr(), self_off)
                if pending is not None:
                    pending.result()
                    pending = None
                if pipelined:
                    pending = _selector().submit(mod.knn_select_tile, *args, nthreads)
                elif backend == "cpu":
                    mod.knn_select_tile(*args, nthreads)
                else:
                    mod.knn_select_tile(*args, _native.stream_ptr(dev))
            if on_rows is not None:
                if pending is not None:
                    pending.result()
                    pending = None
                on_rows(q0, q1, idx)
    finally:
        if pending is not None:
            pending.result()
    return out_s, out_i


_PIPELINE = os.environ.get("PYFICI_KNN_PIPELINE", "1") != "0"
_SELECTOR: tuple[int, object] | None = None


def _selector():
    """One helper thread for pipelined CPU selection (re-created after a fork)."""
    global _SELECTOR
    from concurrent.futures import ThreadPoolExecutor

    if _SELECTOR is None or _SELECTOR[0] != os.getpid():
        _SELECTOR = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="pyfici-knn-select"))
    return _SELECTOR[1]


def _knn_native(x, y, k, metric, exclude_self, tile, backend):
    dt = _compute_dtype(x, y)
    x = x.to(dt).contiguous()
    y = y.to(dt).contiguous()
    scores, idx = _select_tiles(x, y, k, metric, exclude_self, tile, backend)
    if backend == "cpu":
        vals = torch.empty_like(scores)
        _native.cpu_module().knn_refine(
            x.data_ptr(), y.data_ptr(), _native.DTYPE_CODES[dt], x.shape[0], x.shape[1], k,
            METRIC_CODES[metric], idx.data_ptr(), vals.data_ptr(), _native.num_threads(),
        )
        return vals, idx
    return scores_to_values(scores, x, metric), idx


def _average_rows(backend, y, idx, w, q0, q1, lo, hi, normalize_rows, spherical, finalize, out):
    dt = y.dtype
    rows, k = idx.shape
    w_ptr = w[q0:q1].data_ptr() if w is not None else 0
    args = (y.data_ptr(), _native.DTYPE_CODES[dt], y.shape[1], idx.data_ptr(), w_ptr, rows, k, lo, hi,
            normalize_rows, spherical, finalize, out[q0:q1].data_ptr())
    if backend == "cpu":
        _native.cpu_module().knn_average_rows(*args, _native.num_threads())
    else:
        _native.cuda_module().knn_average_rows(*args, _native.stream_ptr(y.device))


def _knn_average_native(x, y, k, metric, spherical, w, exclude_self, tile, backend):
    dt = _compute_dtype(x, y)
    x = x.to(dt).contiguous()
    y = y.to(dt).contiguous()
    out = torch.empty((x.shape[0], x.shape[1]), dtype=dt, device=x.device)
    G = y.shape[0]
    norm_rows = metric == "cosine"

    def on_rows(q0, q1, idx_rows):
        _average_rows(backend, y, idx_rows, w, q0, q1, 0, G, norm_rows, spherical, True, out)

    _select_tiles(x, y, k, metric, exclude_self, tile, backend, on_rows=on_rows)
    return out


# ---------------------------------------------------------------------------
# custom ops
# ---------------------------------------------------------------------------


def _out_dtype(x: torch.Tensor, y: torch.Tensor, backend: str) -> torch.dtype:
    if backend == "triton":
        return torch.float32
    return _compute_dtype(x, y)


@torch.library.custom_op("pyfici::knn", mutates_args=())
def _knn_op(
    queries: torch.Tensor, gallery: torch.Tensor, k: int, metric: str, exclude_self: bool, tile: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "torch":
        return reference.knn(queries, gallery, k, metric, exclude_self)
    if backend == "triton":
        from pyfici.kernels import knn as tk

        return tk.knn(queries, gallery, k, metric, exclude_self)
    if backend == "cuda":
        with torch.cuda.device(queries.device):
            return _knn_native(queries, gallery, k, metric, exclude_self, tile, backend)
    return _knn_native(queries, gallery, k, metric, exclude_self, tile, backend)


@_knn_op.register_fake
def _(queries, gallery, k, metric, exclude_self, tile, backend):
    Q = queries.shape[0]
    dt = _out_dtype(queries, gallery, backend)
    return queries.new_empty((Q, k), dtype=dt), queries.new_empty((Q, k), dtype=torch.int64)


@torch.library.custom_op("pyfici::knn_average", mutates_args=())
def _knn_average_op(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    metric: str,
    spherical: bool,
    weights: torch.Tensor | None,
    exclude_self: bool,
    tile: int,
    backend: str,
) -> torch.Tensor:
    if backend == "torch":
        return reference.knn_average(queries, gallery, k, metric, spherical, weights, exclude_self)
    if backend == "triton":
        from pyfici.kernels import knn as tk

        return tk.knn_average(queries, gallery, k, metric, spherical, weights, exclude_self)
    if backend == "cuda":
        with torch.cuda.device(queries.device):
            return _knn_average_native(queries, gallery, k, metric, spherical, weights, exclude_self, tile, backend)
    return _knn_average_native(queries, gallery, k, metric, spherical, weights, exclude_self, tile, backend)


@_knn_average_op.register_fake
def _(queries, gallery, k, metric, spherical, weights, exclude_self, tile, backend):
    return queries.new_empty(queries.shape, dtype=_out_dtype(queries, gallery, backend))


# ---------------------------------------------------------------------------
# validation and public API
# ---------------------------------------------------------------------------


def _validate(queries, gallery, k, metric, exclude_self, tile, check_values, sharded=False):
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    x, y, dev = check_feature_pair("queries", queries, "gallery", gallery)
    if x.shape[0] == 0:
        raise ValueError(f"queries: is empty (shape {tuple(x.shape)}); pass at least one query row")
    if y.shape[0] == 0 and not sharded:
        raise ValueError(f"gallery: is empty (shape {tuple(y.shape)}); pass at least one gallery row")
    if x.shape[1] == 0:
        raise ValueError(f"queries: has zero features (shape {tuple(x.shape)})")
    check_int_range("tile", tile, 1)
    if check_values:
        check_finite("queries", x)
        check_finite("gallery", y)
    if not sharded:
        G = y.shape[0]
        hi = G - 1 if exclude_self else G
        hint = "(k must not exceed the gallery size" + (", minus 1 with exclude_self" if exclude_self else "") + ")"
        check_int_range("k", k, 1, hi, hint)
    return x, y, dev


def _check_backend_k(be: str, k: int) -> None:
    if be in MAX_K and k > MAX_K[be]:
        raise ValueError(f"k: the {be} backend handles k <= {MAX_K[be]}, got {k} (use backend='cpu' or 'torch')")


def _check_weights(weights, Q: int, k: int, dev: torch.device, dtype: torch.dtype):
    if weights is None:
        return None
    w = as_tensor("weights", weights)
    check_float("weights", w)
    if w.dim() == 1 and w.shape[0] == k:
        w = w[None, :].expand(Q, k)
    elif not (w.dim() == 2 and tuple(w.shape) == (Q, k)):
        raise ValueError(f"weights: expected shape [k] = [{k}] or [Q, k] = [{Q}, {k}], got {tuple(w.shape)}")
    if w.device != dev:
        raise ValueError(f"weights: must be on the queries' device {dev}, got {w.device}")
    check_finite("weights", w)
    return w.to(dtype).contiguous()


def knn(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    *,
    metric: str = "sqeuclidean",
    exclude_self: bool = False,
    tile: int = DEFAULT_TILE,
    sharded: bool = False,
    group=None,
    check_values: bool = True,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest gallery rows of every query.

    queries [Q, D], gallery [G, D] (float16/bfloat16/float32/float64; computed
    in float32, or float64 if either input is float64). Returns
    ``(values [Q, k], indices int64 [Q, k])``, best first: distances ascending
    for "sqeuclidean" / "euclidean" / "cosine" (1 - cos), inner products
    descending for "ip". Ties go to the lower gallery index.

    exclude_self: gallery item i is never a neighbour of query i (queries are
    the first rows of the gallery, typically the same tensor); k <= G - 1.
    tile: score-tile size in elements (memory bound: ``tile`` x 4 or 8 bytes).
    sharded: ``gallery`` is this rank's shard of a gallery split over the ranks
    of ``group`` (default group), concatenated in rank order; every rank gets
    the global result with global indices. Raises ValueError (naming the
    argument) for k < 1, k > G, differing dims, NaN/Inf, or empty inputs.
    """
    x, y, dev = _validate(queries, gallery, k, metric, exclude_self, tile, check_values, sharded)
    be = choose_backend("knn", dev, backend, cuda_default="cuda")
    _check_backend_k(be, k)
    if sharded:
        return _knn_sharded(x, y, k, metric, exclude_self, tile, be, group)
    return _knn_op(x, y, k, metric, exclude_self, tile, be)


def knn_average(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    *,
    metric: str = "cosine",
    spherical: bool = True,
    weights: torch.Tensor | None = None,
    exclude_self: bool = False,
    tile: int = DEFAULT_TILE,
    sharded: bool = False,
    group=None,
    check_values: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """The batched k-nearest manifold average -> [Q, D].

    For each query, its k nearest gallery rows (as :func:`knn`) are averaged.
    With metric "cosine" each neighbour is first projected to the unit sphere.
    ``weights``: per-rank [k] or per-query [Q, k] weights (default all 1).
    spherical=True returns the normalised weighted sum (the spherical mean,
    a unit vector); spherical=False the weighted sum divided by the weight sum.
    The average is fused with the selection: only the k selected rows of each
    query are read, no [Q, k, D] tensor is formed. dtype as :func:`knn`.
    """
    x, y, dev = _validate(queries, gallery, k, metric, exclude_self, tile, check_values, sharded)
    be = choose_backend("knn_average", dev, backend, cuda_default="cuda")
    _check_backend_k(be, k)
    w = _check_weights(weights, x.shape[0], k, dev, _compute_dtype(x, y))
    if sharded:
        return _knn_average_sharded(x, y, k, metric, spherical, w, exclude_self, tile, be, group)
    return _knn_average_op(x, y, k, metric, spherical, w, exclude_self, tile, be)


# ---------------------------------------------------------------------------
# gallery sharded over torch.distributed
# ---------------------------------------------------------------------------


def _device_ctx(be: str, dev: torch.device):
    import contextlib

    return torch.cuda.device(dev) if be == "cuda" else contextlib.nullcontext()


def _shard_offsets(G_local: int, dev: torch.device, group) -> tuple[int, int, int]:
    import torch.distributed as dist

    sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([G_local], dtype=torch.int64, device=dev), group=group)
    sizes_l = [int(s) for s in sizes]
    rank = dist.get_rank(group)
    return sum(sizes_l[:rank]), sum(sizes_l), len(sizes_l)


def _merge_lists(vals: torch.Tensor, idx: torch.Tensor, k: int, descending: bool):
    """Merge concatenated per-shard lists [Q, R*k]: best k, ties to the lower index."""
    key = torch.where(idx < 0, torch.full_like(idx, torch.iinfo(torch.int64).max), idx)
    o1 = torch.argsort(key, dim=1, stable=True)
    v1 = vals.gather(1, o1)
    i1 = idx.gather(1, o1)
    o2 = torch.argsort(v1, dim=1, descending=descending, stable=True)
    return v1.gather(1, o2)[:, :k], i1.gather(1, o2)[:, :k]


def _local_topk(x, y, k, metric, exclude_self, tile, be, offset, dt):
    """This shard's top-k with global indices, padded to k with (worst, -1)."""
    Q, G = x.shape[0], y.shape[0]
    worst = float("-inf") if metric == "ip" else float("inf")
    vals = torch.full((Q, k), worst, dtype=dt, device=x.device)
    idx = torch.full((Q, k), -1, dtype=torch.int64, device=x.device)
    if G == 0:
        return vals, idx
    kk = min(k, G)
    if be in ("cpu", "cuda"):
        xs, ys = x.to(dt).contiguous(), y.to(dt).contiguous()
        with _device_ctx(be, x.device):
            scores, i = _select_tiles(xs, ys, kk, metric, exclude_self, tile, be, col_offset=offset, self_offset=0)
        if be == "cpu":
            il = torch.where(i < 0, i, i - offset)
            v = torch.empty_like(scores)
            _native.cpu_module().knn_refine(
                xs.data_ptr(), ys.data_ptr(), _native.DTYPE_CODES[dt], Q, xs.shape[1], kk,
                METRIC_CODES[metric], il.data_ptr(), v.data_ptr(), _native.num_threads(),
            )
            i = torch.where(il < 0, il, il + offset)
        else:
            v = scores_to_values(scores, xs, metric)
        v = torch.where(i < 0, torch.full_like(v, worst), v)
    else:
        v, i = _knn_op(x, y, min(kk + 1, G) if exclude_self else kk, metric, False, tile, be)
        i = i + offset
        if exclude_self:
            own = i == torch.arange(Q, device=x.device)[:, None]
            v = torch.where(own, torch.full_like(v, worst), v)
            i = torch.where(own, torch.full_like(i, -1), i)
            v, i = _merge_lists(v, i, kk, metric == "ip")
    vals[:, : v.shape[1]] = v.to(dt)
    idx[:, : i.shape[1]] = i
    return vals, idx


def _gather_merge(x, y, k, metric, exclude_self, tile, be, group):
    import torch.distributed as dist

    offset, G_total, world = _shard_offsets(y.shape[0], x.device, group)
    hi = G_total - 1 if exclude_self else G_total
    check_int_range("k", k, 1, hi, "(k must not exceed the total gallery size over all ranks)")
    dt = _compute_dtype(x, y) if be != "triton" else torch.float32
    v, i = _local_topk(x, y, k, metric, exclude_self, tile, be, offset, dt)
    vs = [torch.empty_like(v) for _ in range(world)]
    is_ = [torch.empty_like(i) for _ in range(world)]
    dist.all_gather(vs, v.contiguous(), group=group)
    dist.all_gather(is_, i.contiguous(), group=group)
    vals, idx = _merge_lists(torch.cat(vs, 1), torch.cat(is_, 1), k, metric == "ip")
    return vals, idx, offset


def _knn_sharded(x, y, k, metric, exclude_self, tile, be, group):
    vals, idx, _ = _gather_merge(x, y, k, metric, exclude_self, tile, be, group)
    return vals, idx


def _knn_average_sharded(x, y, k, metric, spherical, w, exclude_self, tile, be, group):
    import torch.distributed as dist

    _, idx, offset = _gather_merge(x, y, k, metric, exclude_self, tile, be, group)
    dt = _compute_dtype(x, y)
    yl = y.to(dt).contiguous()
    Q, D = x.shape
    part = torch.zeros((Q, D), dtype=dt, device=x.device)
    lo, hi = offset, offset + y.shape[0]
    native = be in ("cpu", "cuda") and y.shape[0] > 0
    if native:
        with _device_ctx(be, x.device):
            _average_rows(be, yl, idx.contiguous(), w, 0, Q, lo, hi, metric == "cosine", spherical, False, part)
    elif y.shape[0] > 0:
        own = (idx >= lo) & (idx < hi)
        nb = yl[(idx - lo).clamp(0, y.shape[0] - 1)]
        if metric == "cosine":
            nb = nb / nb.norm(dim=2, keepdim=True).clamp_min(1e-12)
        ww = torch.ones(idx.shape, dtype=dt, device=x.device) if w is None else w
        part = (torch.where(own, ww, torch.zeros_like(ww))[..., None] * nb).sum(1)
    dist.all_reduce(part, group=group)
    if spherical:
        return part / part.norm(dim=1, keepdim=True).clamp_min(1e-12)
    wsum = torch.full((Q, 1), float(k), dtype=dt, device=x.device) if w is None else w.sum(1, keepdim=True)
    return part / torch.where(wsum == 0, torch.ones_like(wsum), wsum)
