"""Drop-in for ``torchreid.metrics.rank.evaluate_rank``.

Swap ``from torchreid.metrics import evaluate_rank`` for
``from pyfici.compat.torchreid import evaluate_rank``: same arguments, same
return value ``(all_cmc, mAP)`` (numpy float32 CMC of length max_rank, float
mAP), computed by pyfici's sort-free ranking. ``use_cython`` is accepted and
ignored. With ``use_metric_cuhk03=True`` the single-shot CUHK03 CMC is used
(10 repeats; pyfici's seeded draw, not numpy's global RNG).
"""

from __future__ import annotations

import numpy as np

from pyfici.compat._rank import rank_drop_in
from pyfici.reid.evaluate import evaluate_distmat
from pyfici.reid.rerank import rerank_distmat


def _torchreid_rank(distmat, ids, max_rank, use_metric_cuhk03):
    res = evaluate_distmat(distmat, *ids, max_rank=max_rank, protocol="cuhk03" if use_metric_cuhk03 else "torchreid")
    return res.cmc.numpy().astype(np.float32), float(res.mAP)


evaluate_rank = rank_drop_in(_torchreid_rank, """Return ``(all_cmc, mAP)`` exactly as torchreid does (assertion -> ValueError
    when no query is valid).""")


def re_ranking(q_g_dist, q_q_dist, g_g_dist, k1: int = 20, k2: int = 6, lambda_value: float = 0.3):
    """Drop-in for ``torchreid.utils.re_ranking``: numpy [Q, G], [Q, Q], [G, G]
    distances in, the re-ranked [Q, G] float32 numpy array out, without its
    dense N x N matrices. Like torchreid's, it squares the distances it is
    given: torchreid's engine passes its "euclidean" matrices, which are
    already squared distances (``pyfici.reid.rerank(..., convention="torchreid")``
    reproduces that from features)."""
    return rerank_distmat(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda_value)
