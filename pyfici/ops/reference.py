"""Plain, readable torch implementations of every pyfici op (the ``torch``
backend). Tests compare every native backend against these, in float64 where
it matters. They favour clarity over speed and memory.

Each op family appends its section to this file.
"""

from __future__ import annotations

import torch

# ---------------------------------------------------------------------------
# family 1: embedding distance, ranking and ReID evaluation
# ---------------------------------------------------------------------------


def pairwise_distance(x: torch.Tensor, y: torch.Tensor, metric: str, self_distance: bool = False) -> torch.Tensor:
    """[M, D] x [N, D] -> [M, N] distances (float32, or float64 for float64 inputs).

    euclidean / sqeuclidean use ||x||^2 + ||y||^2 - 2 x.y clamped at 0; cosine is
    1 - cos, clamped to [0, 2]. With ``self_distance`` (y is x) the diagonal is 0.
    """
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(out_dtype)
    y = y.to(out_dtype)
    if metric == "cosine":
        xn = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        yn = y / y.norm(dim=1, keepdim=True).clamp_min(1e-12)
        d = (1.0 - xn @ yn.T).clamp_(0.0, 2.0)
    elif metric in ("euclidean", "sqeuclidean"):
        d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
        d.clamp_(min=0.0)
        if metric == "euclidean":
            d.sqrt_()
    else:
        raise ValueError(f"metric: unknown {metric!r}")
    if self_distance:
        d.fill_diagonal_(0.0)
    return d


def reid_rank_stats(
    dist: torch.Tensor,
    q_pids: torch.Tensor,
    g_pids: torch.Tensor,
    q_camids: torch.Tensor,
    g_camids: torch.Tensor,
    junk_minus1: bool,
    trapezoid: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-query (AP, first-hit rank, INP, number of matches) by a full stable sort.

    Junk gallery items (same pid and camera; pid -1 too if ``junk_minus1``) are
    removed; matches are the remaining items with the query's pid. Ranks are
    0-based among the valid items, ties broken by the lower gallery index.
    AP is torchreid's (mean precision at the hits), or the Market-1501 trapezoid
    rule if ``trapezoid``. Queries with no match get AP = INP = NaN, rank -1.
    """
    order = torch.argsort(dist, dim=1, stable=True)
    gp = g_pids[order]
    gc = g_camids[order]
    same = gp == q_pids[:, None]
    junk = same & (gc == q_camids[:, None])
    if junk_minus1:
        junk = junk | (gp == -1)
    match = same & ~junk
    if junk_minus1:
        match = match & (q_pids[:, None] != -1)
    valid = ~junk
    rank = torch.cumsum(valid.long(), dim=1) - 1  # rank among valid items at each sorted position
    hits = torch.cumsum(match.long(), dim=1)  # 1-based hit number at each position
    r = rank.double()
    h = hits.double()
    prec = h / (r + 1.0)
    if trapezoid:
        prev = torch.where(rank == 0, torch.ones_like(r), (h - 1.0) / r.clamp_min(1.0))
        contrib = 0.5 * (prev + prec)
    else:
        contrib = prec
    nmatch = match.sum(1)
    ap = torch.where(match, contrib, torch.zeros_like(contrib)).sum(1) / nmatch.double()
    big = torch.iinfo(torch.int64).max
    first = torch.where(match, rank, torch.full_like(rank, big)).amin(1)
    last = torch.where(match, rank, torch.full_like(rank, -1)).amax(1)
    inp = nmatch.double() / (last.double() + 1.0)
    none = nmatch == 0
    nan = torch.full_like(ap, float("nan"))
    ap = torch.where(none, nan, ap)
    inp = torch.where(none, nan, inp)
    first = torch.where(none, torch.full_like(first, -1), first)
    return ap, first, inp, nmatch
