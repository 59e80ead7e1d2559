"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) for ReID evaluation.

``rerank(query, gallery)`` gives the re-ranked [Q, G] distance matrix from
features without ever holding an N x N matrix (N = Q + G);
``rerank_distmat(q_g, q_q, g_g)`` is a drop-in for the widely used numpy
``re_ranking`` with the same signature and result (numpy in, numpy out).
See docs/ops_rerank.md.
"""

from __future__ import annotations

import numpy as np
import torch

from pyfici.ops import rerank as _ops

CONVENTIONS = ("reference", "torchreid")


def rerank(
    query: torch.Tensor,
    gallery: torch.Tensor,
    *,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    metric: str = "euclidean",
    convention: str = "reference",
    tile: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Re-ranked distances of ``query`` [Q, D] to ``gallery`` [G, D] -> [Q, G] float32.

    k1: size of the k-reciprocal neighbourhoods (the lists hold k1 + 1
    entries, the sample itself included); k2: neighbours averaged in the local
    query expansion (1 = none); lambda_value: weight of the original distance
    in the final blend (0 = Jaccard only). metric: "euclidean" (default, as
    torchreid), "sqeuclidean" or "cosine" — the reference squares whatever
    distance it is given. Lower is closer.

    convention: "reference" (default): the numpy ``re_ranking`` given the
    ``metric`` distance matrices (for "euclidean": true euclidean distances,
    squared inside). "torchreid": the numbers of torchreid's engine
    (``test(rerank=True)``) with ``dist_metric=metric``: its "euclidean"
    matrices already hold SQUARED distances, which re_ranking squares again
    (this equals ``metric="sqeuclidean"`` here); its "cosine" is ours. Inputs are detached (re-ranking is
    not differentiable); any finite features work (they are rescaled and
    centred first; the result is invariant to both).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention: expected one of {CONVENTIONS}, got {convention!r}")
    if convention == "torchreid" and metric == "euclidean":
        # torchreid's compute_distance_matrix(metric="euclidean") returns squared
        # distances and its engine hands those to re_ranking, which squares them again
        metric = "sqeuclidean"
    return _ops.rerank_features(_detached(query), _detached(gallery), k1, k2, lambda_value, metric,
                                tile=tile, backend=backend)


def _detached(x):
    """Evaluation inputs are detached (re-ranking is not differentiable)."""
    return x.detach() if isinstance(x, torch.Tensor) else x


def rerank_distmat(q_g, q_q, g_g, k1: int = 20, k2: int = 6, lambda_value: float = 0.3, *, tile: int | None = None,
                   backend: str | None = None):
    """Re-ranking from the query x gallery [Q, G], query x query [Q, Q] and
    gallery x gallery [G, G] distance matrices -> [Q, G] float32, the result of
    the reference ``re_ranking(q_g_dist, q_q_dist, g_g_dist, k1, k2,
    lambda_value)``. Returns a numpy array when the three inputs are numpy
    arrays, else a tensor on their device."""
    as_numpy = all(isinstance(a, np.ndarray) for a in (q_g, q_q, g_g))
    q_g, q_q, g_g = (_detached(t) for t in (q_g, q_q, g_g))
    out = _ops.rerank_distmat(q_g, q_q, g_g, k1, k2, lambda_value, tile=tile, backend=backend)
    return out.cpu().numpy() if as_numpy else out
