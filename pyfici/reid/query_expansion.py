"""Average query expansion (AQE; Chum et al., ICCV 2007), as fast-reid applies it
to ReID features before ranking.

Each feature (queries and gallery together) is replaced by the mean of its
``qe_k`` most cosine-similar features (itself included), each weighted by its
similarity to the power ``alpha``; ``qe_times`` rounds. The similarities come
from one row tile at a time (GEMM + top-k), so no N x N matrix is held.
"""

from __future__ import annotations

import torch

from pyfici.ops._validate import (
    as_tensor,
    check_feature_pair,
    check_finite,
    check_int_range,
    check_not_meta,
)
from pyfici.ops.distance import unit_rows


def average_query_expansion(
    query,
    gallery,
    *,
    qe_times: int = 1,
    qe_k: int = 10,
    alpha: float = 3.0,
    tile: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expanded ``(query [Q, D], gallery [G, D])`` features (not normalised).

    Round by round: ``s = normalize(f) @ normalize(f).T`` over all N = Q + G
    features; for each row the ``qe_k`` largest similarities (the row itself
    among them) give ``f_new = mean_j(f_j * s_j ** alpha)``. Same arguments and
    defaults as fast-reid's ``aqe`` (qe_times 1, qe_k 10, alpha 3.0); equal to
    it to float32 rounding (neighbours tied in similarity may be chosen in
    another order). A negative similarity with a non-integral ``alpha`` gives
    NaN there, as numpy's power does. Float16/bfloat16 are computed in float32;
    inputs are detached. The rows are normalised at any scale (no 1e-12 clamp: the
    expansion is linear in the features, so features of 1e-20 expand as those of 1).
    """
    q = as_tensor("query", query)
    g = as_tensor("gallery", gallery)
    check_not_meta("query", q)
    check_not_meta("gallery", g)
    q, g, _ = check_feature_pair("query", q.detach(), "gallery", g.detach())
    check_int_range("qe_times", qe_times, 0)
    check_int_range("qe_k", qe_k, 1)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise TypeError(f"alpha: expected a float, got {type(alpha).__name__}")
    if tile is not None:
        check_int_range("tile", tile, 1)
    check_finite("query", q)
    check_finite("gallery", g)
    dt = torch.float64 if torch.float64 in (q.dtype, g.dtype) else torch.float32
    feats = torch.cat([q.to(dt), g.to(dt)])
    N, D = feats.shape
    if qe_k > N:
        raise ValueError(f"qe_k: must be <= the number of features Q + G = {N}, got {qe_k}")
    rows = tile or max(1, min(N, (64 << 20) // max(1, 4 * max(N, qe_k * D))))
    for _ in range(qe_times):
        norm = unit_rows(feats)  # (F.normalize's 1e-12 clamp zeroed features below it)
        new = torch.empty_like(feats)
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            sim = norm[r0:r1] @ norm.T
            w, idx = torch.topk(sim, qe_k, dim=1, largest=True, sorted=True)
            w = torch.pow(w, alpha)
            new[r0:r1] = (feats[idx] * w[..., None]).mean(1)
        feats = new
    Q = q.shape[0]
    return feats[:Q].contiguous(), feats[Q:].contiguous()
