"""The ``evaluate_rank`` signature torchreid defined and fast-reid kept."""

from __future__ import annotations

from collections.abc import Callable


def rank_drop_in(compute: Callable, doc: str) -> Callable:
    """An ``evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50,
    use_metric_cuhk03=False, use_cython=True)`` that returns
    ``compute(distmat, (q_pids, g_pids, q_camids, g_camids), max_rank, use_metric_cuhk03)``
    (``use_cython`` is accepted and ignored), documented by ``doc``."""

    def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50,
                      use_metric_cuhk03: bool = False, use_cython: bool = True):
        return compute(distmat, (q_pids, g_pids, q_camids, g_camids), max_rank, use_metric_cuhk03)

    evaluate_rank.__doc__ = doc
    evaluate_rank.__module__ = compute.__module__
    return evaluate_rank
