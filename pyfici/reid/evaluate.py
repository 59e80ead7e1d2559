"""ReID evaluation: CMC, mAP, mINP and Recall@K, without full-row sorts.

Protocols (see docs/reid.md):

- ``"torchreid"``: torchreid / fast-reid. Gallery items with the query's ID
  and camera are dropped; queries with no remaining match are skipped and
  counted; AP = mean precision at the hits; mINP = matches / (1 + rank of the
  hardest match).
- ``"market1501"``: the official Market-1501 code: junk also includes
  gallery ID -1; AP by the trapezoid rule (starting precision 1). ID 0
  (distractors) counts as a negative.
- ``"cuhk03"``: the classic single-shot CUHK03 CMC: for each query and each of
  ``num_repeats`` repeats, one gallery sample per identity is drawn (among
  the valid ones), and the CMC is averaged over repeats. The draw is a hash
  of (seed, query index, repeat, gallery index), so it is deterministic and
  identical on every device. AP and mINP are computed on the full valid
  gallery, as torchreid does.

Ties in distance go to the lower gallery index (a stable order). torchreid's
``np.argsort`` is not stable, so on exactly tied distances its results may
differ from run to run; on distinct distances they are identical.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import torch

from pyfici.ops import reid_rank_stats
from pyfici.ops._backend import choose_backend
from pyfici.ops._validate import (
    as_ids,
    as_tensor,
    check_feature_pair,
    check_finite,
    check_float,
    check_int_range,
    check_length,
    check_ndim,
    check_nonempty,
    check_not_meta,
)
from pyfici.ops.distance import (
    METRICS,
    _pairwise_distance_op,
    apply_epilogue,
    condition_features,
    distance_tile,
    distance_tile_raw,
    duplicate_rows,
    prepare_gallery,
    rank_stats_checked_cpu,
    tie_duplicates_,
)

PROTOCOLS = ("torchreid", "market1501", "cuhk03")
# pyfici's defaults are the evaluation of the papers it implements (rolling-back, AutoLR):
# L2-normalised features compared by cosine distance, the official single-query
# Market-1501 protocol. The CLI (`pyfici eval reid`, the training methods) uses the
# same. torchreid / fast-reid semantics: protocol="torchreid" (metric "euclidean" as
# torchreid's default), or the drop-ins in pyfici.compat.
DEFAULT_PROTOCOL = "market1501"
DEFAULT_METRIC = "cosine"


@dataclass
class ReIDResult:
    """Result of an evaluation. ``cmc[r]`` = fraction of valid queries whose
    first true match is within the top r+1 (float64 tensor of length max_rank)."""

    cmc: torch.Tensor
    mAP: float
    mINP: float
    num_valid: int
    num_queries: int
    protocol: str
    per_query_ap: torch.Tensor = field(repr=False)

    @property
    def rank1(self) -> float:
        return float(self.cmc[0])

    def rank(self, r: int) -> float:
        """CMC at rank r (1-based)."""
        return float(self.cmc[r - 1])

    def as_dict(self) -> dict:
        ranks = {f"rank{r}": self.rank(r) for r in (1, 5, 10, 20) if r <= len(self.cmc)}
        return {"mAP": self.mAP, "mINP": self.mINP, **ranks, "num_valid": self.num_valid,
                "num_queries": self.num_queries, "protocol": self.protocol, "cmc": self.cmc.tolist()}


class _Accumulator:
    def __init__(self, max_rank: int, device: torch.device):
        self.max_rank = max_rank
        self.cmc_counts = torch.zeros(max_rank, dtype=torch.float64, device=device)
        self.ap_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.inp_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.valid = torch.zeros((), dtype=torch.int64, device=device)
        self.aps: list[torch.Tensor] = []
        self.arange = torch.arange(max_rank, device=device)

    def add(self, ap, first, inp, nmatch, cmc_rows: torch.Tensor | None = None):
        ok = nmatch > 0
        self.valid += ok.sum()
        self.ap_sum += torch.where(ok, ap, torch.zeros_like(ap)).sum()
        self.inp_sum += torch.where(ok, inp, torch.zeros_like(inp)).sum()
        if cmc_rows is None:
            # queries whose first hit is at rank r count for ranks r.. max_rank-1: a
            # histogram and a prefix sum (O(Q), no [Q, max_rank] temporary)
            r = torch.where(ok, first, torch.full_like(first, self.max_rank)).clamp_(0, self.max_rank)
            self.cmc_counts += torch.bincount(r, minlength=self.max_rank + 1)[: self.max_rank].cumsum(0).double()
        else:
            self.cmc_counts += torch.where(ok[:, None], cmc_rows, torch.zeros_like(cmc_rows)).sum(0)
        self.aps.append(ap)

    def result(self, num_queries: int, protocol: str) -> ReIDResult:
        nv = int(self.valid)  # the one host synchronisation, at the very end
        if nv == 0:
            raise ValueError(
                f"no valid query: none of the {num_queries} queries has a true match in the gallery "
                f"under the {protocol!r} protocol (check the pids and camids)"
            )
        return ReIDResult(
            cmc=(self.cmc_counts / nv).cpu(),
            mAP=float(self.ap_sum) / nv,
            mINP=float(self.inp_sum) / nv,
            num_valid=nv,
            num_queries=num_queries,
            protocol=protocol,
            per_query_ap=torch.cat(self.aps).cpu(),
        )


def _check_ids(Q: int, G: int, device, q_pids, g_pids, q_camids, g_camids, qname="query", gname="gallery"):
    out = []
    for name, arr, n, other in (
        ("q_pids", q_pids, Q, qname),
        ("g_pids", g_pids, G, gname),
        ("q_camids", q_camids, Q, qname),
        ("g_camids", g_camids, G, gname),
    ):
        t = as_ids(name, arr, device=device)
        check_length(name, t, n, other)
        out.append(t)
    return out


def _check_protocol(protocol: str, max_rank: int) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: expected one of {PROTOCOLS}, got {protocol!r}")
    check_int_range("max_rank", max_rank, 1)


def _clip_max_rank(max_rank: int, G: int) -> int:
    if G < max_rank:
        warnings.warn(f"max_rank={max_rank} is larger than the gallery ({G}); using {G}", stacklevel=3)
        return G
    return max_rank


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 on int64 tensors (wrapping arithmetic; logical shifts emulated)."""

    def lsr(v, s):
        return (v >> s) & ((1 << (64 - s)) - 1)

    x = x + (-7046029254386353131)  # 0x9E3779B97F4A7C15 as signed int64
    x = (x ^ lsr(x, 30)) * (-4658895280553007687)  # 0xBF58476D1CE4E5B9
    x = (x ^ lsr(x, 27)) * (-7723592293110705685)  # 0x94D049BB133111EB
    return x ^ lsr(x, 31)


def _cuhk03_cmc_rows(dist, q_idx, q_pids, g_pids, q_camids, g_camids, max_rank, num_repeats, seed):
    """[Qt, max_rank] CMC rows averaged over repeats (single-shot sampling)."""
    Qt, G = dist.shape
    dev = dist.device
    uniq, g_group = torch.unique(g_pids, return_inverse=True)
    n_groups = uniq.numel()
    valid = ~((g_pids[None, :] == q_pids[:, None]) & (g_camids[None, :] == q_camids[:, None]))
    is_match = (g_pids[None, :] == q_pids[:, None]) & valid
    jj = torch.arange(G, device=dev, dtype=torch.int64)
    rows = torch.zeros(Qt, max_rank, dtype=torch.float64, device=dev)
    big = torch.iinfo(torch.int64).max
    arange_r = torch.arange(max_rank, device=dev)
    for r in range(num_repeats):
        key = _splitmix64(((seed * 1_000_003 + q_idx[:, None]) * 1_000_033 + r) * 1_000_037 + jj[None, :])
        key = key & ((1 << 62) - 1)
        key = torch.where(valid, key, torch.full_like(key, big))
        gmin = torch.full((Qt, n_groups), big, dtype=torch.int64, device=dev)
        gmin.scatter_reduce_(1, g_group[None, :].expand(Qt, G), key, reduce="amin")
        chosen = (key == gmin.gather(1, g_group[None, :].expand(Qt, G))) & valid
        cm = chosen & is_match  # at most one per query
        has = cm.any(1)
        jm = torch.where(cm, jj[None, :], torch.full_like(key, G)).amin(1).clamp_max(G - 1)
        dm = dist.gather(1, jm[:, None])
        before = (dist < dm) | ((dist == dm) & (jj[None, :] < jm[:, None]))
        rank = (before & chosen).sum(1)
        rows += ((rank[:, None] <= arange_r[None, :]) & has[:, None]).double()
    return rows / num_repeats


def evaluate_distmat(
    distmat,
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    *,
    max_rank: int = 50,
    protocol: str = DEFAULT_PROTOCOL,
    num_repeats: int = 10,
    seed: int = 0,
    backend: str | None = None,
) -> ReIDResult:
    """Evaluate a [Q, G] distance matrix (torch tensor or numpy array).

    Returns a :class:`ReIDResult` with ``cmc`` (length ``max_rank``, clipped
    to the gallery size with a warning, as torchreid does), ``mAP``, ``mINP``
    and ``num_valid`` (queries with at least one true match). Raises ValueError
    naming the argument on bad input, and when no query is valid.
    """
    _check_protocol(protocol, max_rank)
    dist = _features("distmat", distmat)
    check_ndim("distmat", dist, 2, "Q,G")
    check_nonempty("distmat", dist, 0)
    check_nonempty("distmat", dist, 1)
    Q, G = dist.shape
    max_rank = _clip_max_rank(max_rank, G)
    ids = _check_ids(Q, G, dist.device, q_pids, g_pids, q_camids, g_camids, "distmat", "the columns of distmat")
    check_float("distmat", dist)
    acc = _Accumulator(max_rank, dist.device)
    rank_protocol = "torchreid" if protocol == "cuhk03" else protocol
    be = choose_backend("reid_rank_stats", dist.device, backend, cuda_default="cuda")
    if be == "cpu" and dist.dtype in (torch.float32, torch.float64) and dist.stride(1) == 1:
        # the CPU kernel checks finiteness in its one pass over the matrix
        ap, first, inp, nm = rank_stats_checked_cpu(dist, *ids, rank_protocol)
    else:
        check_finite("distmat", dist)
        ap, first, inp, nm = reid_rank_stats(dist, *ids, protocol=rank_protocol, check_finite_values=False,
                                             backend=backend)
    rows = None
    if protocol == "cuhk03":
        q_idx = torch.arange(Q, device=dist.device)
        rows = _cuhk03_cmc_rows(dist, q_idx, ids[0], ids[1], ids[2], ids[3], max_rank, num_repeats, seed)
    acc.add(ap, first, inp, nm, rows)
    return acc.result(Q, protocol)


def _features(name: str, x) -> torch.Tensor:
    """Evaluation input -> tensor: detached (evaluation is not differentiable;
    the numbers are the same with or without grad), meta tensors refused."""
    t = as_tensor(name, x)
    check_not_meta(name, t)
    return t.detach()


def _scorer(gallery: torch.Tensor, metric: str, backend: str | None):
    """tile -> [tile, G] distances of features already conditioned by
    :func:`pyfici.ops.distance.condition_features`. The gallery is prepared
    once (norms, normalisation); the triton backend uses its fused kernel."""
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    be = backend or os.environ.get("PYFICI_BACKEND")
    if be in ("triton", "torch"):
        be = choose_backend("pairwise_distance", gallery.device, be, cuda_default="cuda")
        return lambda q: (_pairwise_distance_op(q, gallery, metric, False, be), 0, None)
    yp, yn = prepare_gallery(gallery, metric)
    if gallery.device.type == "cpu" and be in (None, "cpu"):
        # the CPU rank kernel applies the distance epilogue as it reads the tile;
        # the tiles share one buffer (each is reduced before the next is computed)
        # identical gallery rows get their first copy's column: exact ties (ranked by index)
        # whatever the BLAS kernel's rounding by position (see duplicate_rows)
        buf = []
        dups = duplicate_rows(gallery)

        def raw_tile(q):
            n = q.shape[0] * yp.shape[0]
            if not buf or buf[0].numel() < n:
                buf[:] = [torch.empty(n, dtype=yp.dtype)]
            raw, epi, qn = distance_tile_raw(q, yp, yn, metric, buf[0][:n].view(q.shape[0], yp.shape[0]))
            return tie_duplicates_(raw, dups), epi, qn

        return raw_tile
    return lambda q: (distance_tile(q, yp, yn, metric), 0, None)


def _default_tile(G: int, budget_bytes: int = 64 << 20) -> int:
    return max(1, min(4096, budget_bytes // max(1, 4 * G)))


def evaluate(
    query,
    gallery,
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    *,
    metric: str = DEFAULT_METRIC,
    max_rank: int = 50,
    protocol: str = DEFAULT_PROTOCOL,
    tile: int | None = None,
    num_repeats: int = 10,
    seed: int = 0,
    backend: str | None = None,
    rerank: bool = False,
    rerank_kwargs: dict | None = None,
    sharded: bool = False,
    group=None,
) -> ReIDResult:
    """Evaluate ReID features ``query`` [Q, D] against ``gallery`` [G, D].

    The full Q x G matrix is never held: ``tile`` queries at a time (default:
    64 MB of distances) are scored with one GEMM and reduced at once to
    per-query AP / CMC / INP. metric: "cosine" (default, the papers'
    evaluation), "euclidean" (torchreid's default) or "sqeuclidean"; protocol:
    "market1501" (default), "torchreid" or "cuhk03". ``rerank=True`` evaluates k-reciprocal
    re-ranked distances (pyfici.reid.rerank; this needs the full matrix).

    ``sharded=True``: the gallery is split over the ranks of the initialised
    ``torch.distributed`` process group ``group`` (default: the world), each
    rank passing all queries and its own consecutive slice of the gallery (and
    of ``g_pids`` / ``g_camids``), in rank order. Every rank returns the numbers
    of one process on the whole gallery (see :mod:`pyfici.reid.sharded`); CPU
    tensors (gloo), protocols "torchreid" and "market1501", no ``rerank``.
    """
    _check_protocol(protocol, max_rank)
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    query, gallery, _ = check_feature_pair("query", _features("query", query), "gallery", _features("gallery", gallery))
    check_nonempty("query", query)
    if sharded:
        return _evaluate_sharded(query, gallery, q_pids, g_pids, q_camids, g_camids, metric, max_rank, protocol,
                                 tile, rerank, group)
    check_nonempty("gallery", gallery)
    Q, G = query.shape[0], gallery.shape[0]
    max_rank = _clip_max_rank(max_rank, G)
    ids = _check_ids(Q, G, query.device, q_pids, g_pids, q_camids, g_camids)
    if rerank:
        from pyfici.reid.rerank import rerank as _rerank

        kw = {"metric": metric, **(rerank_kwargs or {})}
        dist = _rerank(query, gallery, **kw)
        return evaluate_distmat(dist, *ids, max_rank=max_rank, protocol=protocol, num_repeats=num_repeats, seed=seed, backend=backend)
    tile = tile or _default_tile(G)
    check_int_range("tile", tile, 1)
    rank_protocol = "torchreid" if protocol == "cuhk03" else protocol
    acc = _Accumulator(max_rank, query.device)
    # rankings are invariant to the conditioning's power-of-two scale: no undo needed.
    # Its min/max pass also rejects NaN / Inf features.
    query, gallery, _ = condition_features(query, gallery, metric, xname="query", yname="gallery")
    score = _scorer(gallery, metric, backend)
    for q0 in range(0, Q, tile):
        q1 = min(Q, q0 + tile)
        d, epi, qn = score(query[q0:q1])
        qp, qc = ids[0][q0:q1], ids[2][q0:q1]
        st = reid_rank_stats(d, qp, ids[1], qc, ids[3], protocol=rank_protocol, check_finite_values=False,
                             backend=backend, epilogue=epi, q_norms=qn)
        rows = None
        if protocol == "cuhk03":
            d = apply_epilogue(d, epi, qn, inplace=True)
            q_idx = torch.arange(q0, q1, device=query.device)
            rows = _cuhk03_cmc_rows(d, q_idx, qp, ids[1], qc, ids[3], max_rank, num_repeats, seed)
        acc.add(*st, rows)
        del d
    return acc.result(Q, protocol)


def _evaluate_sharded(query, gallery, q_pids, g_pids, q_camids, g_camids, metric, max_rank, protocol, tile,
                      rerank, group) -> ReIDResult:
    from pyfici.reid import sharded as sh

    if protocol == "cuhk03":
        raise ValueError("protocol: 'cuhk03' is not available with sharded=True (use 'torchreid' or 'market1501')")
    if rerank:
        raise ValueError("rerank: re-ranking needs the whole gallery on one process; it is not available with sharded=True")
    dist = sh._dist()
    Q, G = query.shape[0], gallery.shape[0]
    n = torch.tensor([G], dtype=torch.int64)
    dist.all_reduce(n, group=group)
    G_total = int(n)
    if G_total == 0:
        raise ValueError("gallery: is empty on every rank")
    max_rank = _clip_max_rank(max_rank, G_total)
    ids = _check_ids(Q, G, query.device, q_pids, g_pids, q_camids, g_camids)
    tile = tile or _default_tile(max(1, G))
    check_int_range("tile", tile, 1)
    acc = _Accumulator(max_rank, query.device)
    for st in sh.sharded_rank_stats(query, gallery, ids, metric, protocol, tile, group):
        acc.add(*st)
    return acc.result(Q, protocol)


def recall_at_k(
    features,
    labels,
    ks=(1, 2, 4, 8),
    *,
    metric: str = "cosine",
    tile: int | None = None,
    backend: str | None = None,
) -> dict[int, float]:
    """Retrieval Recall@K (query set = gallery set, each query's own entry excluded).

    A query is a hit at K if a sample with its label ranks within the top K
    of the others. Returns {K: recall}. Queries whose label has no other
    sample cannot be hit and count as misses (the denominator is all N).
    """
    feats = _features("features", features)
    check_ndim("features", feats, 2, "N,D")
    check_float("features", feats)
    check_nonempty("features", feats)
    check_finite("features", feats)
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    N = feats.shape[0]
    lab = as_ids("labels", labels, device=feats.device)
    check_length("labels", lab, N, "features")
    ks = tuple(int(k) for k in ks)
    if not ks:
        raise ValueError("ks: give at least one K")
    for k in ks:
        check_int_range("ks", k, 1, hint="(each K must be >= 1)")
    if N < 2:
        raise ValueError(f"features: need at least 2 samples for Recall@K, got {N}")
    cams = torch.arange(N, device=feats.device, dtype=torch.int64)  # junk = self only
    tile = tile or _default_tile(N)
    hits = torch.zeros(len(ks), dtype=torch.float64, device=feats.device)
    kt = torch.tensor([k - 1 for k in ks], device=feats.device)
    feats, _, _ = condition_features(feats, None, metric, xname="features")
    score = _scorer(feats, metric, backend)
    for q0 in range(0, N, tile):
        q1 = min(N, q0 + tile)
        d, epi, qn = score(feats[q0:q1])
        _, first, _, nm = reid_rank_stats(d, lab[q0:q1], lab, cams[q0:q1], cams, check_finite_values=False,
                                          backend=backend, epilogue=epi, q_norms=qn)
        ok = nm > 0
        hits += ((first[:, None] <= kt[None, :]) & ok[:, None]).sum(0).double()
    rec = (hits / N).cpu().tolist()
    return {k: float(r) for k, r in zip(ks, rec)}
