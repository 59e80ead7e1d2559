"""Drop-ins for fast-reid's evaluation functions (``fastreid.evaluation``).

Swap ``from fastreid.evaluation.rank import evaluate_rank`` for
``from pyfici.compat.fastreid import evaluate_rank`` (likewise
``evaluate_roc`` and ``aqe``): same arguments, same return values, the same
numbers bit for bit as fast-reid's Cython evaluator, computed by pyfici's
sort-free rank kernel.

What "the same numbers" takes, and what is reproduced:

- fast-reid casts the distance matrix to float32 before ranking, so distances
  that differ only in float64 tie; so does this module.
- It sums precision at each hit into a float32 accumulator (a float64 term
  rounded to float32 per hit) and divides by the float32 hit count; AP here
  is that same sequence of roundings, replayed from the ranks of the matches.
  INP and the CMC are exact ratios rounded once to float32, as there.
- Ties between a true match and another gallery item at exactly the same
  float32 distance: fast-reid orders them as ``np.argsort`` (numpy's default,
  unstable sort) happens to. Those rows (and only those; the kernel counts
  the ties) are ranked by that same ``np.argsort`` call, so the results are
  identical there too. Every other row is independent of tie order.
- ``use_metric_cuhk03=True`` (fast-reid: one gallery sample per identity drawn
  with numpy's global RNG, 10 repeats, returns ``(cmc, mAP)``): pyfici's seeded
  single-shot draw is used; the CMC differs draw by draw (it cannot consume
  numpy's global RNG the same way), the mAP is fast-reid's (on the full gallery).
- ``use_cython`` is accepted and ignored.
"""

from __future__ import annotations

import numpy as np
import torch

from pyfici.compat._rank import rank_drop_in
from pyfici.ops._validate import (
    as_ids,
    as_tensor,
    check_length,
    check_ndim,
    check_nonempty,
    check_not_meta,
)
from pyfici.ops.distance import reid_match_ranks
from pyfici.reid.evaluate import evaluate_distmat
from pyfici.reid.query_expansion import average_query_expansion

__all__ = ["evaluate_rank", "evaluate_roc", "aqe"]


def _inputs(distmat, q_pids, g_pids, q_camids, g_camids):
    d = as_tensor("distmat", distmat)
    check_not_meta("distmat", d)
    d = d.detach()
    check_ndim("distmat", d, 2, "Q,G")
    check_nonempty("distmat", d, 0)
    check_nonempty("distmat", d, 1)
    if not (d.is_floating_point() or d.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"distmat: expected a float (or integer) matrix, got {d.dtype}")
    d = d.cpu().to(torch.float32).contiguous()  # as fast-reid: np.asarray(distmat, dtype=np.float32)
    Q, G = d.shape
    ids = []
    for name, t, n, other in (("q_pids", q_pids, Q, "distmat"), ("g_pids", g_pids, G, "the columns of distmat"),
                              ("q_camids", q_camids, Q, "distmat"), ("g_camids", g_camids, G, "the columns of distmat")):
        t = as_ids(name, t).cpu()
        check_length(name, t, n, other)
        ids.append(t)
    return d, ids


def _float32_ap(rank_lists: list[np.ndarray]) -> np.ndarray:
    """fast-reid's AP of each query from the sorted 0-based ranks of its matches:
    ``acc = float32(acc + hits / (rank + 1.0))`` per hit, then ``acc / float32(n)``
    (vectorised over queries, sequential over hits as there)."""
    n = np.asarray([len(r) for r in rank_lists], dtype=np.int64)
    if n.size == 0:
        return np.zeros(0, dtype=np.float32)
    R = np.zeros((n.size, int(n.max())), dtype=np.float64)
    for i, r in enumerate(rank_lists):
        R[i, : len(r)] = r
    acc = np.zeros(n.size, dtype=np.float32)
    for k in range(R.shape[1]):
        live = k < n
        step = (acc.astype(np.float64) + (k + 1.0) / (R[:, k] + 1.0)).astype(np.float32)
        acc = np.where(live, step, acc)
    return (acc / n.astype(np.float32)).astype(np.float32)


def _row_by_argsort(row: np.ndarray, g_pids: np.ndarray, g_camids: np.ndarray, q_pid: int, q_cam: int) -> np.ndarray:
    """Sorted ranks of the matches with numpy's default argsort order of one float32 row."""
    order = np.argsort(row)
    keep = (g_pids[order] != q_pid) | (g_camids[order] != q_cam)
    hit = g_pids[order][keep] == q_pid
    return np.nonzero(hit)[0].astype(np.int64)


def _fastreid_rank(distmat, ids, max_rank, use_metric_cuhk03):
    d, ids = _inputs(distmat, *ids)
    if use_metric_cuhk03:
        mr = min(int(max_rank), d.shape[1])
        res = evaluate_distmat(d, *ids, max_rank=mr, protocol="cuhk03")
        ap = _all_ap(d, ids)[0]
        # fast-reid sums the per-query AP (0 for skipped queries) in float32, in query order
        total = np.cumsum(ap, dtype=np.float32)[-1] if ap.size else np.float32(0)
        return res.cmc.numpy().astype(np.float32), float(np.float32(total / np.float32(ap.size)))
    Q, G = d.shape
    mr = int(max_rank)
    if mr < 1:
        raise ValueError(f"max_rank: must be >= 1, got {max_rank}")
    mr = min(mr, G)
    all_ap, all_inp, first = _all_ap(d, ids, with_inp=True)
    nv = all_ap.size
    if nv == 0:
        raise ValueError("no valid query: all query identities are missing from the gallery "
                         "(after dropping same-ID-same-camera items)")
    counts = (first[:, None] <= np.arange(mr)[None, :]).sum(0)
    cmc = (counts.astype(np.float64) / nv).astype(np.float32)
    return cmc, all_ap, all_inp


evaluate_rank = rank_drop_in(_fastreid_rank, """fast-reid's ``evaluate_rank`` -> ``(all_cmc, all_AP, all_INP)``: float32
    CMC of length ``max_rank`` (clipped to the gallery size), and float32 AP and
    INP of each valid query (queries with no match in the gallery, after
    dropping the same-ID-same-camera items, are skipped). Raises ValueError
    when no query is valid (fast-reid: AssertionError). With
    ``use_metric_cuhk03=True`` returns ``(all_cmc, mAP)`` as fast-reid does.""")


def _all_ap(d: torch.Tensor, ids, with_inp: bool = False):
    """Per valid query, in query order: float32 AP (and INP, first-hit rank) as fast-reid computes them."""
    ranks, offsets, ties = reid_match_ranks(d, *ids, with_ties=True)
    ranks_np, off, ties_np = ranks.numpy(), offsets.numpy(), ties.numpy()
    counts = np.diff(off)
    valid = np.nonzero(counts > 0)[0]
    tie_sum = np.zeros(counts.size, dtype=np.int64)
    if ties_np.size:
        np.add.at(tie_sum, np.repeat(np.arange(counts.size), counts), ties_np)
    dn = d.numpy()
    qp, gp, qc, gc = (t.numpy() for t in ids)
    lists = []
    for q in valid.tolist():
        r = ranks_np[off[q]:off[q + 1]]
        if tie_sum[q]:
            # a match ties with another item: if a tied item is not a match, the order is numpy's
            vals = dn[q, _match_columns(gp, gc, int(qp[q]), int(qc[q]))]
            _, same = np.unique(vals, return_counts=True)
            if int(tie_sum[q]) != int((same * (same - 1)).sum()):
                r = _row_by_argsort(dn[q], gp, gc, int(qp[q]), int(qc[q]))
        lists.append(r)
    ap = _float32_ap(lists)
    if not with_inp:
        return (ap,)
    inp = np.asarray([np.float32(len(r) / (int(r[-1]) + 1.0)) for r in lists], dtype=np.float32)
    first = np.asarray([int(r[0]) for r in lists], dtype=np.int64)
    return ap, inp, first


def _match_columns(g_pids, g_camids, q_pid, q_cam):
    return np.nonzero((g_pids == q_pid) & (g_camids != q_cam))[0]


def evaluate_roc(distmat, q_pids, g_pids, q_camids, g_camids, use_cython: bool = True):
    """fast-reid's ``evaluate_roc`` -> ``(scores, labels)`` float32 arrays: for
    every query (none skipped) the distances of its true matches, then (after
    all queries' matches) the distances of its other gallery items, each query's
    values in ascending order; same-ID-same-camera items are dropped. Labels
    are 0 for a true match and 1 otherwise. Feed them to :func:`roc_curve` /
    :func:`tpr_at_fpr` (or sklearn's ``roc_curve(labels, scores)``)."""
    d, ids = _inputs(distmat, q_pids, g_pids, q_camids, g_camids)
    qp, gp, qc, gc = ids
    srt, order = torch.sort(d, dim=1, stable=True)
    gpo, gco = gp[order], gc[order]
    same = gpo == qp[:, None]
    keep = ~(same & (gco == qc[:, None]))
    pos = srt[same & keep]  # row-major: query by query, ascending within a query
    neg = srt[~same & keep]
    scores = torch.cat([pos, neg]).numpy()
    labels = np.concatenate([np.zeros(pos.numel(), dtype=np.float32), np.ones(neg.numel(), dtype=np.float32)])
    return scores, labels


def roc_curve(labels, scores):
    """ROC of scores for the positive label 1 -> ``(fpr, tpr, thresholds)``,
    the curve ``sklearn.metrics.roc_curve(labels, scores)`` returns (default
    ``drop_intermediate=True``): one point per distinct score from the highest
    down, collinear interior points dropped, a leading (0, 0) point at +inf."""
    y = torch.as_tensor(np.asarray(labels)).to(torch.float64).flatten()
    s = torch.as_tensor(np.asarray(scores)).flatten()
    if y.numel() != s.numel():
        raise ValueError(f"scores: expected {y.numel()} values (one per label), got {s.numel()}")
    if y.numel() == 0:
        raise ValueError("labels: is empty")
    order = torch.argsort(s, stable=True).flip(0)  # descending, as sklearn (mergesort, reversed)
    s = s[order]
    y = y[order]
    distinct = torch.nonzero(s[1:] != s[:-1]).flatten()
    idx = torch.cat([distinct, torch.tensor([s.numel() - 1])])
    tps = torch.cumsum(y, 0)[idx]
    fps = 1 + idx.to(torch.float64) - tps
    thr = s[idx].to(torch.float64)
    if fps.numel() > 2:
        keep = torch.ones(fps.numel(), dtype=torch.bool)
        keep[1:-1] = (torch.diff(fps, 2) != 0) | (torch.diff(tps, 2) != 0)
        fps, tps, thr = fps[keep], tps[keep], thr[keep]
    fps = torch.cat([torch.zeros(1, dtype=torch.float64), fps])
    tps = torch.cat([torch.zeros(1, dtype=torch.float64), tps])
    thr = torch.cat([torch.tensor([float("inf")], dtype=torch.float64), thr])
    fpr = fps / fps[-1] if fps[-1] > 0 else torch.full_like(fps, float("nan"))
    tpr = tps / tps[-1] if tps[-1] > 0 else torch.full_like(tps, float("nan"))
    return fpr.numpy(), tpr.numpy(), thr.numpy()


def tpr_at_fpr(distmat, q_pids, g_pids, q_camids, g_camids, fprs=(1e-4, 1e-3, 1e-2)) -> dict[float, float]:
    """fast-reid's verification numbers: ``{fpr: TPR}`` at the ROC point whose
    FPR is nearest to each requested one (``argmin |fpr_curve - fpr|``, the
    first on ties), on the curve of :func:`roc_curve` over
    :func:`evaluate_roc`'s scores, exactly as fast-reid's ReID evaluator
    reports ``TPR@FPR=1e-04`` etc."""
    scores, labels = evaluate_roc(distmat, q_pids, g_pids, q_camids, g_camids)
    f, t, _ = roc_curve(labels, scores)
    return {float(x): float(t[int(np.argmin(np.abs(f - x)))]) for x in fprs}


def aqe(query_feat, gallery_feat, qe_times: int = 1, qe_k: int = 10, alpha: float = 3.0):
    """fast-reid's average query expansion -> ``(query_feat, gallery_feat)``:
    see :func:`pyfici.reid.average_query_expansion` (same arguments, same result
    to float32 rounding, without the N x N similarity matrix)."""
    return average_query_expansion(query_feat, gallery_feat, qe_times=qe_times, qe_k=qe_k, alpha=alpha)
