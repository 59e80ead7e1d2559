"""Dense numpy k-reciprocal re-ranking (Zhong et al., CVPR 2017): the
benchmark anchor and the test oracle for pyfici.reid.rerank.

Written for pyfici from the paper and the behaviour of the widely copied
``re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3)``
numpy function (as used by torchreid and others). It keeps that function's
observable behaviour on purpose, including the surprising parts:

* the N x N matrix (N = Q + G) is assembled from the three blocks, the
  distances are SQUARED, cast to float32 and divided by the max of each
  COLUMN, then transposed (so row r is column r of the squared matrix over its
  max; for symmetric inputs this is a per-row normalisation);
* the neighbour lists are ``argsort`` rows of that normalised float32 matrix
  and hold k1 + 1 entries, the sample itself included; queries take part in
  the neighbourhood graph like gallery items;
* the expansion step uses round(k1 / 2) (numpy's half-to-even rounding) + 1
  neighbours and adds a candidate's half set when MORE than 2/3 of it lies in
  the k-reciprocal set of the probe;
* weights are exp(-normalised squared distance), normalised to sum 1 over the
  expanded set, in float32;
* query expansion averages the V rows of the first k2 entries of the
  neighbour list (self included), skipped when k2 == 1;
* Jaccard distance 1 - sum(min) / (2 - sum(min)) for the query rows against
  all N columns, accumulated in float32 in increasing column order;
* final = (1 - lambda) * jaccard + lambda * normalised squared distance, and
  only the [Q, G] block is returned.

Memory: several dense float32 N x N matrices (1.5 GB each at Market-1501
size), so it only runs at small sizes.
"""

from __future__ import annotations

import numpy as np


def re_ranking(q_g_dist, q_q_dist, g_g_dist, k1: int = 20, k2: int = 6, lambda_value: float = 0.3):
    q_g_dist = np.asarray(q_g_dist)
    q_q_dist = np.asarray(q_q_dist)
    g_g_dist = np.asarray(g_g_dist)
    top = np.concatenate([q_q_dist, q_g_dist], axis=1)
    bottom = np.concatenate([q_g_dist.T, g_g_dist], axis=1)
    full = np.concatenate([top, bottom], axis=0)
    full = np.power(full, 2).astype(np.float32)
    dist = np.transpose(1.0 * full / np.max(full, axis=0))
    del full, top, bottom
    num_query = q_g_dist.shape[0]
    num_all = dist.shape[0]
    V = np.zeros_like(dist, dtype=np.float32)
    ranks = np.argsort(dist).astype(np.int32)
    half = int(np.around(k1 / 2.0))

    for i in range(num_all):
        fwd = ranks[i, : k1 + 1]
        back = ranks[fwd, : k1 + 1]
        hit_rows = np.where(back == i)[0]
        recip = fwd[hit_rows]
        expanded = recip
        for cand in recip:
            c_fwd = ranks[cand, : half + 1]
            c_back = ranks[c_fwd, : half + 1]
            c_rows = np.where(c_back == cand)[0]
            c_recip = c_fwd[c_rows]
            if len(np.intersect1d(c_recip, recip)) > 2.0 / 3 * len(c_recip):
                expanded = np.append(expanded, c_recip)
        expanded = np.unique(expanded)
        w = np.exp(-dist[i, expanded])
        V[i, expanded] = 1.0 * w / np.sum(w)

    dist = dist[:num_query]
    if k2 != 1:
        V_qe = np.zeros_like(V, dtype=np.float32)
        for i in range(num_all):
            V_qe[i, :] = np.mean(V[ranks[i, :k2], :], axis=0)
        V = V_qe
        del V_qe
    del ranks

    inv_index = [np.where(V[:, c] != 0)[0] for c in range(num_all)]
    jaccard = np.zeros_like(dist, dtype=np.float32)
    for i in range(num_query):
        acc = np.zeros(shape=[1, num_all], dtype=np.float32)
        cols = np.where(V[i, :] != 0)[0]
        for c in cols:
            rows = inv_index[c]
            acc[0, rows] = acc[0, rows] + np.minimum(V[i, c], V[rows, c])
        jaccard[i] = 1 - acc / (2.0 - acc)

    final = jaccard * (1 - lambda_value) + dist * lambda_value
    return final[:num_query, num_query:]


def pairwise_euclidean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances in the inputs' precision (float64 recommended)."""
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(d2, 0.0))


def re_ranking_features(query: np.ndarray, gallery: np.ndarray, k1: int = 20, k2: int = 6, lambda_value: float = 0.3):
    """Convenience: euclidean distances (zero diagonals) then :func:`re_ranking`."""
    qq = pairwise_euclidean(query, query)
    gg = pairwise_euclidean(gallery, gallery)
    np.fill_diagonal(qq, 0.0)
    np.fill_diagonal(gg, 0.0)
    return re_ranking(pairwise_euclidean(query, gallery), qq, gg, k1, k2, lambda_value)
