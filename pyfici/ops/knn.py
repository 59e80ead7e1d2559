"""Family 2: exact batched kNN and the fused k-nearest (manifold) average.

Semantics (every backend):

* ``metric``: "sqeuclidean", "euclidean", "cosine" (distance 1 - cos, in
  [0, 2]; a zero vector has cosine 0 with everything) or "ip" (inner product, a
  *similarity*). Distances are returned sorted ascending (nearest first); "ip" is
  returned sorted *descending* (most similar first). Either way column 0 is the
  best neighbour.
* Exact: the result is the top-k of the direct formula (``sum (x_d - y_d)^2``,
  ``x.y``, ``1 - x.y / (|x| |y|)``) evaluated in double precision, for inputs at
  any offset and at any scale the dtype holds; values are that double result
  rounded to the output dtype (so a float32 squared distance above 3.4e38 is inf).
* Ties go to the lower gallery index; identical gallery rows always tie.
  ``exclude_self=True`` removes gallery item i from query i's candidates (use it
  when the queries are the gallery).
* Indices are int64 [Q, k]; values are float32, float64 for float64 inputs
  (the triton backend computes in float32).
* Not differentiable: inputs that require grad are refused (pass ``.detach()``).

How it runs (pyfici.backends.knn): BLAS score tiles and a native top-(k + 8)
selection, then the candidates' exact values, and a certificate from the tiles'
rounding-error bound that no other gallery item can enter the top k; a row
that cannot be certified is recomputed by the direct formula. Extra memory is
one or two score tiles (``tile`` elements, default 8M = 32 MB in float32),
independent of Q and G.

``knn_average`` averages the k selected gallery rows of each query, gathered in
place (no [Q, k, D] buffer).

Sharded galleries: with ``sharded=True`` each ``torch.distributed`` rank
passes its own gallery shard (shards are concatenated in rank order to form the
global gallery) and the same queries; each rank selects its exact local top-k, the
lists are all-gathered and merged (ties to the lower global index), and every
rank returns the global result. ``knn_average`` then all-reduces the partial
sums of the neighbours each rank owns.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pyfici.backends import k_same as ks
from pyfici.backends import knn as kb
from pyfici.ops import reference
from pyfici.ops._backend import choose_backend
from pyfici.ops._register import extra_arg, op_like
from pyfici.ops._validate import (
    as_tensor,
    check_feature_pair,
    check_finite,
    check_float,
    check_int_range,
    check_ndim,
)
from pyfici.ops.distance import _mul_pow2, unit_rows

METRICS = ("sqeuclidean", "euclidean", "cosine", "ip")
DEFAULT_TILE = kb.DEFAULT_TILE
MAX_K = {"cuda": 2048, "triton": 128}  # the cpu and torch backends take any k <= G


class KnnResult(NamedTuple):
    """Result of :func:`knn` (as ``torch.topk``): values [Q, k], int64 indices [Q, k]."""

    values: torch.Tensor
    indices: torch.Tensor


# ---------------------------------------------------------------------------
# custom ops
# ---------------------------------------------------------------------------


def _out_dtype(x: torch.Tensor, y: torch.Tensor, backend: str) -> torch.dtype:
    if backend == "triton":
        return torch.float32
    return kb.compute_dtype(x, y)


def _run(fn, queries: torch.Tensor, *args):
    """Run a native backend function (its last argument is the backend); the CUDA
    module with the queries' device current."""
    if args[-1] == "cuda":
        with torch.cuda.device(queries.device):
            return fn(queries, *args)
    return fn(queries, *args)


def _knn_impl(queries, gallery, k, metric, exclude_self, backend, tile):
    if backend == "torch":
        vals, idx = reference.knn(queries, gallery, k, metric, exclude_self)
        kb.check_output(vals, idx, metric)
        return vals, idx
    return _run(kb.knn, queries, gallery, k, metric, exclude_self, tile, backend)


def _knn_average_impl(queries, gallery, k, metric, spherical, weights, exclude_self, backend, tile):
    if backend == "torch":
        return reference.knn_average(queries, gallery, k, metric, spherical, weights, exclude_self)
    return _run(kb.knn_average, queries, gallery, k, metric, spherical, weights, exclude_self, tile, backend)


_TILE = extra_arg("tile", int)
_knn_op = op_like("knn", reference.knn, _knn_impl, extra=[_TILE])
_knn_average_op = op_like("knn_average", reference.knn_average, _knn_average_impl, extra=[_TILE])


@_knn_op.register_fake
def _(queries, gallery, k, metric, exclude_self, backend, tile):
    Q = queries.shape[0]
    dt = _out_dtype(queries, gallery, backend)
    return queries.new_empty((Q, k), dtype=dt), queries.new_empty((Q, k), dtype=torch.int64)


@_knn_average_op.register_fake
def _(queries, gallery, k, metric, spherical, weights, exclude_self, backend, tile):
    return queries.new_empty(queries.shape, dtype=_out_dtype(queries, gallery, backend))


# ---------------------------------------------------------------------------
# validation and public API
# ---------------------------------------------------------------------------


def _validate(queries, gallery, k, metric, exclude_self, tile, check_values, sharded=False):
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    x, y, dev = check_feature_pair("queries", queries, "gallery", gallery)
    for name, t in (("queries", x), ("gallery", y)):
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"{name}: requires grad, but knn / knn_average are not differentiable "
                f"(pass {name}.detach(), or call inside torch.no_grad())"
            )
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
) -> KnnResult:
    """Exact k nearest gallery rows of every query.

    queries [Q, D], gallery [G, D] (float16/bfloat16/float32/float64; computed
    in float32, or float64 if either input is float64). Returns
    :class:`KnnResult` ``(values [Q, k], indices int64 [Q, k])``, best first: distances ascending
    for "sqeuclidean" / "euclidean" / "cosine" (1 - cos), inner products
    descending for "ip". Ties go to the lower gallery index.

    exclude_self: gallery item i is never a neighbour of query i (queries are
    the first rows of the gallery, typically the same tensor); k <= G - 1.
    tile: score-tile size in elements (memory bound: ``tile`` x 4 or 8 bytes).
    sharded: ``gallery`` is this rank's shard of a gallery split over the ranks
    of ``group`` (default group), concatenated in rank order; every rank gets
    the global result with global indices. Raises ValueError (naming the
    argument) for k < 1, k > G, differing dims, NaN/Inf, empty inputs, or inputs
    that require grad.
    """
    x, y, dev = _validate(queries, gallery, k, metric, exclude_self, tile, check_values, sharded)
    be = choose_backend("knn", dev, backend, cuda_default="cuda")
    _check_backend_k(be, k)
    if sharded:
        offset, world = _check_sharded_k(x, y, k, exclude_self, group)
        local = _local_op(metric, tile, be)
        return KnnResult(*kb.knn_sharded(x, y, k, metric, exclude_self, tile, be, group, offset, world, local))
    return KnnResult(*_knn_op(x, y, k, metric, exclude_self, be, tile))


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
    w = _check_weights(weights, x.shape[0], k, dev, kb.compute_dtype(x, y))
    if sharded:
        offset, world = _check_sharded_k(x, y, k, exclude_self, group)
        local = _local_op(metric, tile, be)
        return kb.knn_average_sharded(x, y, k, metric, spherical, w, exclude_self, tile, be, group, offset, world,
                                      local)
    return _knn_average_op(x, y, k, metric, spherical, w, exclude_self, be, tile)


def _local_op(metric: str, tile: int, be: str):
    """This rank's single-process knn (no exclusion) for the sharded path."""
    return lambda xs, ys, kk: _knn_op(xs, ys, kk, metric, False, be, tile)


def _check_sharded_k(x, y, k, exclude_self, group) -> tuple[int, int]:
    """k against the total gallery size over the ranks -> (this shard's offset, world size)."""
    offset, G_total, world = kb.shard_layout(y.shape[0], x.device, group)
    hi = G_total - 1 if exclude_self else G_total
    check_int_range("k", k, 1, hi, "(k must not exceed the total gallery size over all ranks)")
    return offset, world


# ---------------------------------------------------------------------------
# the k-Same partition
# ---------------------------------------------------------------------------

K_SAME_METHODS = ("greedy", "mdav")
K_SAME_METRICS = ("cosine", "sqeuclidean", "euclidean")


def k_same_partition(
    embeddings: torch.Tensor,
    k: int,
    *,
    metric: str = "cosine",
    seed: int = 0,
    method: str = "greedy",
    candidates: int | None = None,
    tile: int = DEFAULT_TILE,
    refresh_batch: int = 256,
    backend: str | None = None,
) -> torch.Tensor:
    """The k-Same partition of ``embeddings`` [N, D] -> cluster ids int64 [N] (0..C-1 in
    creation order, on the input's device); see :func:`pyfici.deid.k_same`.

    Every cluster has k..2k-1 members (one cluster when k <= N < 2k). "cosine"
    clusters the unit rows by euclidean distance. backend: "cpu" (default; the loop is
    sequential, CUDA inputs are copied to the CPU once) or "torch" (the plain algorithm
    on the full float64 distance matrix). Inputs are detached (a partition has no
    gradient). Raises ValueError naming the argument for bad k, method, metric,
    candidates, refresh_batch, NaN/Inf or empty input.
    """
    if method not in K_SAME_METHODS:
        raise ValueError(f"method: expected one of {K_SAME_METHODS}, got {method!r}")
    if metric not in K_SAME_METRICS:
        raise ValueError(f"metric: expected one of {K_SAME_METRICS}, got {metric!r}")
    x = as_tensor("embeddings", embeddings).detach()
    check_ndim("embeddings", x, 2, "N,D")
    check_float("embeddings", x)
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"embeddings: is empty (shape {tuple(x.shape)})")
    N = x.shape[0]
    check_int_range("k", k, 1, N, f"(k-Same needs at least k = {k} embeddings, got N = {N})"
                    if isinstance(k, int) and k > N else "")
    check_finite("embeddings", x)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    W = candidates if candidates is not None else 2 * k + 8
    # a list must be able to hold a cluster's k - 1 other members: with fewer, every
    # refresh comes back short and the loop would never end
    check_int_range("candidates", W, max(1, k - 1), hint="(a candidate list must hold the k - 1 other members of a "
                    "cluster)")
    check_int_range("refresh_batch", refresh_batch, 1)
    check_int_range("tile", tile, 1)
    be = choose_backend("k_same", torch.device("cpu"), backend, supported=("cpu", "torch"))
    return _k_same_op(x, k, metric, seed, method, W, tile, refresh_batch, be)


@torch.library.custom_op("pyfici::k_same_partition", mutates_args=())
def _k_same_op(
    x: torch.Tensor, k: int, metric: str, seed: int, method: str, W: int, tile: int, refresh_batch: int, backend: str
) -> torch.Tensor:
    dev = x.device
    x = x.cpu()
    if backend == "torch":
        return reference.k_same(x, k, metric, seed, method).to(dev)
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc = x.to(dt).contiguous()
    if metric == "cosine":
        xc = unit_rows(xc).contiguous()
    else:
        # the partition is unchanged by one power of two; the C++ loop's direct
        # formula in double needs float64 rows within 2**+-400 (see kb._float64_exponent)
        e = kb._float64_exponent(xc, xc)
        xc = _mul_pow2(xc, -e).contiguous() if e else xc
    return ks.partition(xc, k, seed, method, W, tile, refresh_batch).to(dev)


@_k_same_op.register_fake
def _(x, k, metric, seed, method, W, tile, refresh_batch, backend):
    return x.new_empty((x.shape[0],), dtype=torch.int64)
