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

The partition itself is the op :func:`pyfici.ops.k_same_partition`: one
exact all-versus-all kNN pass gives every point a candidate list of its W
nearest neighbours (W = 2k + 8 by default), a C++ loop consumes the lists and
refreshes the ones that run out. The result is identical to the plain
algorithm above (the ``torch`` backend, :func:`pyfici.ops.reference.k_same`).

"cosine" partitions the unit-normalised embeddings by Euclidean distance
(the same neighbour order as 1 - cos); surrogates are then spherical means
sum(e_i / |e_i|) / |sum(...)|. For the other metrics surrogates are the
arithmetic means of the members.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pyfici.ops import k_same_partition
from pyfici.ops._validate import as_tensor, check_int_range, check_ndim
from pyfici.ops.distance import unit_rows
from pyfici.ops.knn import K_SAME_METHODS, K_SAME_METRICS

METHODS = K_SAME_METHODS
METRICS = K_SAME_METRICS


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
        xs = unit_rows(xs)
    sums = torch.zeros((n_clusters, x.shape[1]), dtype=acc_dt, device=x.device).index_add_(0, assignment, xs)
    if spherical:
        out = unit_rows(sums)
    else:
        sizes = torch.bincount(assignment, minlength=n_clusters).to(acc_dt)
        out = sums / sizes[:, None]
    return out.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def k_same(embeddings: torch.Tensor, k: int, *, metric: str = "cosine", **options) -> KSame:
    """The k-Same partition of ``embeddings`` [N, D] (one row per identity).

    Returns :class:`KSame` (assignment int64 [N], surrogates [C, D], sizes int64 [C]).
    Every cluster has k..2k-1 members (a single cluster when k <= N < 2k).
    metric: "cosine" (default; spherical-mean surrogates), "sqeuclidean" or
    "euclidean" (arithmetic-mean surrogates). method: "greedy" (s drawn by a
    permutation seeded with ``seed``) or "mdav" (s = farthest from the centroid
    of the remaining points; costs one pass over the remaining points per
    cluster, so it is O(N^2 D / k) and much slower than greedy on large N).
    Deterministic for a given seed. candidates: candidate-list width (default
    2k + 8; at least k - 1). backend: "cpu" (default for CPU tensors) or "torch" (the plain
    algorithm on the full float64 distance matrix; O(N^2) memory).
    ``options`` (seed=0, method="greedy", candidates=None, tile, refresh_batch=256,
    backend=None) are those of :func:`pyfici.ops.k_same_partition`.
    Raises ValueError if k < 1 or N < k (naming k), on NaN/Inf or empty input.
    Not differentiable: the embeddings are detached.
    """
    assign = k_same_partition(embeddings, k, metric=metric, **options)
    x = as_tensor("embeddings", embeddings).detach()
    C = int(assign.max()) + 1
    sizes = torch.bincount(assign, minlength=C)
    sur = surrogates_of(x.to(assign.device), assign, C, spherical=metric == "cosine")
    return KSame(assign, sur, sizes)
