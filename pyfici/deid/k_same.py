"""The k-Same partition (Newton, Sweeney, Malin, IEEE TKDE 2005) that gives
FICGAN's de-identification its k-anonymity guarantee.

Averaging each face's own k nearest neighbours is *not* k-anonymous (the
neighbourhoods overlap); a partition is::

    H = all embeddings; clusters = []
    while |H| >= 2k:
        s = a member of H      (greedy: the next alive point of a seeded random
                                permutation; mdav: the point farthest from the
                                centroid of H, ties to the lower index)
        K = s and its k-1 nearest members of H (ties to the lower index)
        clusters.append(K); H = H minus K
    clusters.append(H)         # k..2k-1 members

Every cluster therefore has between k and 2k-1 members (one cluster of N
members when k <= N < 2k), and every member gets the cluster's surrogate.

Fast path: one all-versus-all :func:`pyfici.ops.knn` pass gives every point a
candidate list of its W nearest neighbours (W = 2k + 8 by default). The loop
(C++) takes s's first k-1 *alive* candidates: since a candidate list is a
prefix of s's sorted neighbour list and points only ever leave H, these are
exactly s's k-1 nearest alive points. When a list runs out, that point and
the next ``refresh_batch`` alive points of the visiting order get fresh lists
computed against the alive points only (one batched kNN), and the loop goes
on. The result is identical to the plain algorithm above (the ``torch``
backend, :func:`pyfici.ops.reference.k_same`).

"cosine" partitions the unit-normalised embeddings by Euclidean distance
(the same neighbour order as 1 - cos); surrogates are then spherical means
sum(e_i / |e_i|) / |sum(...)|. For the other metrics surrogates are the
arithmetic means of the members.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pyfici import _native
from pyfici.ops import reference
from pyfici.ops._backend import choose_backend
from pyfici.ops._validate import as_tensor, check_finite, check_float, check_int_range, check_ndim
from pyfici.ops.knn import DEFAULT_TILE, _select_tiles

METHODS = ("greedy", "mdav")
METRICS = ("cosine", "sqeuclidean", "euclidean")


class KSame(NamedTuple):
    """Result of :func:`k_same`.

    assignment: int64 [N], the cluster of each embedding (0..C-1, in creation order).
    surrogates: [C, D] float (float64 for float64 input), the cluster surrogates.
    sizes: int64 [C], members per cluster (each in [k, 2k-1], or N if N < 2k).
    """

    assignment: torch.Tensor
    surrogates: torch.Tensor
    sizes: torch.Tensor


def check_k_anonymity(assignment, k: int) -> bool:
    """True iff every item is assigned (ids >= 0) and every cluster has >= k members."""
    a = as_tensor("assignment", assignment)
    check_ndim("assignment", a, 1, "N")
    check_int_range("k", k, 1)
    if a.is_floating_point():
        raise TypeError(f"assignment: expected an integer tensor, got {a.dtype}")
    if a.numel() == 0:
        return False
    if bool((a < 0).any()):
        return False
    counts = torch.bincount(a.long().cpu())
    counts = counts[counts > 0]
    return bool((counts >= k).all())


def surrogates_of(x: torch.Tensor, assignment: torch.Tensor, n_clusters: int, spherical: bool) -> torch.Tensor:
    """Per-cluster spherical (or arithmetic) means of the rows of x -> [C, D]."""
    acc_dt = torch.float64
    xs = x.to(acc_dt)
    if spherical:
        xs = xs / xs.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sums = torch.zeros((n_clusters, x.shape[1]), dtype=acc_dt, device=x.device).index_add_(0, assignment, xs)
    if spherical:
        out = sums / sums.norm(dim=1, keepdim=True).clamp_min(1e-12)
    else:
        sizes = torch.bincount(assignment, minlength=n_clusters).to(acc_dt)
        out = sums / sizes[:, None]
    return out.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def _lists(q: torch.Tensor, g: torch.Tensor, W: int, tile: int, exclude_self: bool) -> torch.Tensor:
    """[len(q), W] nearest-first gallery indices (squared euclidean), -1 padded."""
    G = g.shape[0]
    kk = min(W, G - 1 if exclude_self else G)
    out = torch.full((q.shape[0], W), -1, dtype=torch.int64)
    if kk >= 1:
        _, idx = _select_tiles(q, g, kk, "sqeuclidean", exclude_self, tile, "cpu")
        out[:, :kk] = idx
    return out


def _partition_cpu(x: torch.Tensor, k: int, seed: int, method: str, W: int, tile: int,
                   refresh_batch: int) -> torch.Tensor:
    N = x.shape[0]
    mod = _native.cpu_module()
    alive = torch.ones(N, dtype=torch.uint8)
    assign = torch.full((N,), -1, dtype=torch.int64)
    W = max(1, min(W, N - 1)) if N > 1 else 1
    cand = _lists(x, x, W, tile, exclude_self=True) if N >= 2 * k else None
    next_cluster, n_alive = 0, N

    def refresh(points: torch.Tensor) -> None:
        alive_idx = torch.nonzero(alive, as_tuple=False).squeeze(1)
        g = x.index_select(0, alive_idx)
        q = x.index_select(0, points)
        kk = min(W + 1, g.shape[0])
        loc = _lists(q, g, kk, tile, exclude_self=False)
        glob = torch.where(loc < 0, loc, alive_idx[loc.clamp_min(0)])
        # drop the point itself; keep W entries
        glob = torch.where(glob == points[:, None], torch.full_like(glob, -1), glob)
        order = torch.argsort((glob < 0).to(torch.int8), dim=1, stable=True)
        glob = glob.gather(1, order)[:, :W]
        cand[points] = -1
        cand[points, : glob.shape[1]] = glob

    if N >= 2 * k and method == "greedy":
        visit = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
        pos = 0
        while True:
            status, pos, next_cluster, n_alive = mod.k_same_sweep(
                cand.data_ptr(), W, k, visit.data_ptr(), pos, N, alive.data_ptr(), assign.data_ptr(),
                next_cluster, n_alive,
            )
            if status == 0:
                break
            ahead = visit[pos:]
            ahead = ahead[alive[ahead].bool()][:refresh_batch]
            refresh(ahead)
    elif N >= 2 * k:
        xs = x.contiguous()
        total = xs.double().sum(0).contiguous()
        while True:
            status, point, next_cluster, n_alive = mod.k_same_mdav(
                xs.data_ptr(), _native.DTYPE_CODES[xs.dtype], N, xs.shape[1], cand.data_ptr(), W, k,
                alive.data_ptr(), assign.data_ptr(), total.data_ptr(), next_cluster, n_alive,
                _native.num_threads(),
            )
            if status == 0:
                break
            refresh(torch.tensor([point], dtype=torch.int64))
    assign[alive.bool()] = next_cluster
    return assign


def k_same(
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
) -> KSame:
    """The k-Same partition of ``embeddings`` [N, D] (one row per identity).

    Returns :class:`KSame` (assignment int64 [N], surrogates [C, D], sizes int64 [C]).
    Every cluster has k..2k-1 members (a single cluster when k <= N < 2k).
    metric: "cosine" (default; spherical-mean surrogates), "sqeuclidean" or
    "euclidean" (arithmetic-mean surrogates). method: "greedy" (s drawn by a
    permutation seeded with ``seed``) or "mdav" (s = farthest from the centroid
    of the remaining points; costs one pass over the remaining points per
    cluster, so it is O(N^2 D / k) and much slower than greedy on large N).
    Deterministic for a given seed. candidates: candidate-list width (default
    2k + 8). backend: "cpu" (default for CPU tensors) or "torch" (the plain
    algorithm on the full float64 distance matrix; O(N^2) memory).
    Raises ValueError if k < 1 or N < k (naming k), on NaN/Inf or empty input.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    x = as_tensor("embeddings", embeddings)
    check_ndim("embeddings", x, 2, "N,D")
    check_float("embeddings", x)
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"embeddings: is empty (shape {tuple(x.shape)})")
    N = x.shape[0]
    check_int_range("k", k, 1, N, f"(k-Same needs at least k = {k} embeddings, got N = {N})"
                    if isinstance(k, int) and k > N else "")
    check_finite("embeddings", x)
    if not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    dev = x.device
    # the partition loop is sequential: it runs on the CPU (CUDA inputs are copied over once)
    be = choose_backend("k_same", torch.device("cpu"), backend, supported=("cpu", "torch"))
    x = x.cpu()
    if be == "torch":
        assign = reference.k_same(x.cpu(), k, metric, seed, method)
    else:
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        xc = x.to(dt).contiguous()
        if metric == "cosine":
            xc = xc / xc.norm(dim=1, keepdim=True).clamp_min(1e-12)
        W = candidates if candidates is not None else 2 * k + 8
        check_int_range("candidates", W, 1)
        assign = _partition_cpu(xc, k, seed, method, W, tile, refresh_batch)
    assign = assign.to(dev)
    C = int(assign.max()) + 1
    sizes = torch.bincount(assign, minlength=C)
    sur = surrogates_of(x, assign, C, spherical=metric == "cosine")
    return KSame(assign, sur, sizes)
