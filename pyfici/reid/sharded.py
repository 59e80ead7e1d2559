"""ReID evaluation with the gallery split over ``torch.distributed`` ranks.

Every rank holds all queries and its own slice of the gallery (rank order =
gallery order). Per query tile:

1. each rank scores its slice (the same conditioning on every rank: the scale
   and the centre are reduced over all ranks first) and lists its true
   matches as (query row, distance, global gallery index);
2. the match lists are all-gathered (they are small: ~Q x matches per query);
3. each rank counts, for every match, its valid gallery items that come
   before it (smaller distance, or equal distance and lower global index);
   one all-reduce sums the counts into the global 0-based rank of every match;
4. AP / first-hit rank / INP follow from the sorted ranks, identically on
   every rank.

No rank ever holds more than its own [tile, G_local] distances. The numbers
are those of one process on the concatenated gallery (the single-process
path orders ties by gallery index too).
"""

from __future__ import annotations

import torch

from pyfici.ops.distance import distance_tile, prepare_gallery

_COUNT_ELEMS = 1 << 24  # largest [matches, G_local] comparison block


def _dist():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("sharded: needs an initialised torch.distributed process group "
                         "(torch.distributed.init_process_group), one gallery slice per rank")
    return dist


def _condition(query, gallery, metric, dist, group):
    """The conditioning of pyfici.ops.distance.condition_features with the
    scale and centre reduced over every rank's gallery slice."""
    import math

    from pyfici.ops._validate import check_finite
    from pyfici.ops.distance import _SAFE_EXP, _mul_pow2, _row_scaled, compute_dtype

    dt = compute_dtype(query)
    q = query.to(dt)
    g = gallery.to(dt)
    if metric == "cosine":
        check_finite("query", q)
        check_finite("gallery", g)
        return _row_scaled(q), _row_scaled(g)
    ext = [t.abs().amax() for t in (q, g) if t.numel()]
    m = torch.stack(ext).amax().to(torch.float64) if ext else torch.zeros((), dtype=torch.float64)
    m = m.reshape(1).clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    amax = float(m)
    if not amax < float("inf"):
        check_finite("query", q)
        check_finite("gallery", g)
        raise ValueError("gallery: contains non-finite values (on another rank)")
    e = math.frexp(amax)[1] if amax > 0 else 0
    if abs(e) <= _SAFE_EXP[dt]:
        e = 0
    q = _mul_pow2(q, -e)
    g = _mul_pow2(g, -e)
    s = torch.cat([g.sum(0, dtype=torch.float64), torch.tensor([float(g.shape[0])], dtype=torch.float64)])
    dist.all_reduce(s, group=group)
    c = (s[:-1] / s[-1]).to(dt)
    return q - c, g - c


def _all_gather_var(t: torch.Tensor, dist, group, world: int) -> torch.Tensor:
    """Concatenation over ranks of 1-d or 2-d tensors whose first dimension differs."""
    n = torch.tensor([t.shape[0]], dtype=torch.int64)
    ns = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(ns, n, group=group)
    sizes = [int(x) for x in ns]
    mx = max(sizes)
    pad = torch.zeros((mx, *t.shape[1:]), dtype=t.dtype)
    pad[: t.shape[0]] = t
    bufs = [torch.zeros_like(pad) for _ in range(world)]
    dist.all_gather(bufs, pad, group=group)
    return torch.cat([b[:k] for b, k in zip(bufs, sizes)])


def _stats_from_ranks(qrow, rank, Qt: int, trapezoid: bool):
    """(ap, first, inp, nmatch) per query row from the global ranks of its matches."""
    ap = torch.full((Qt,), float("nan"), dtype=torch.float64)
    inp = torch.full((Qt,), float("nan"), dtype=torch.float64)
    first = torch.full((Qt,), -1, dtype=torch.int64)
    nm = torch.bincount(qrow, minlength=Qt)
    if qrow.numel() == 0:
        return ap, first, inp, nm
    key = qrow * (int(rank.max()) + 1) + rank
    order = torch.argsort(key, stable=True)
    qrow, rank = qrow[order], rank[order]
    start = torch.cumsum(nm, 0) - nm
    k = torch.arange(qrow.numel()) - start[qrow]  # 0-based hit number within the query
    r = rank.double()
    prec = (k + 1).double() / (r + 1.0)
    if trapezoid:
        prev = torch.where(rank == 0, torch.ones_like(r), k.double() / r.clamp_min(1.0))
        contrib = 0.5 * (prev + prec)
    else:
        contrib = prec
    s = torch.zeros(Qt, dtype=torch.float64).index_add_(0, qrow, contrib)
    has = nm > 0
    ap = torch.where(has, s / nm.clamp_min(1).double(), ap)
    last = torch.full((Qt,), -1, dtype=torch.int64).scatter_reduce_(0, qrow, rank, reduce="amax")
    fst = torch.full((Qt,), -1, dtype=torch.int64).scatter_reduce_(0, qrow, rank, reduce="amin", include_self=False)
    inp = torch.where(has, nm.double() / (last.double() + 1.0), inp)
    first = torch.where(has, fst, first)
    return ap, first, inp, nm


def sharded_rank_stats(query, gallery, ids, metric: str, protocol: str, tile: int, group=None):
    """Yields ``(ap, first, inp, nmatch)`` per query tile, global over the ranks' gallery slices."""
    dist = _dist()
    world = dist.get_world_size(group)
    me = dist.get_rank(group)
    if query.device.type != "cpu":
        raise ValueError("sharded: the gloo path evaluates CPU tensors; move the features to the CPU")
    qp, gp, qc, gc = ids
    n = torch.tensor([gallery.shape[0]], dtype=torch.int64)
    ns = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(ns, n, group=group)
    offset = sum(int(x) for x in ns[:me])
    market = protocol == "market1501"
    q, g = _condition(query, gallery, metric, dist, group)
    yp, yn = prepare_gallery(g, metric)
    gidx = torch.arange(g.shape[0], dtype=torch.int64) + offset
    for q0 in range(0, q.shape[0], tile):
        q1 = min(q.shape[0], q0 + tile)
        Qt = q1 - q0
        if g.shape[0]:
            d = distance_tile(q[q0:q1], yp, yn, metric)
        else:
            d = torch.zeros((Qt, 0), dtype=yp.dtype)
        same = gp[None, :] == qp[q0:q1, None]
        junk = same & (gc[None, :] == qc[q0:q1, None])
        if market:
            junk |= (gp == -1)[None, :]
        match = same & ~junk
        if market:
            match &= (qp[q0:q1] != -1)[:, None]
        valid = ~junk
        mq, mj = torch.nonzero(match, as_tuple=True)
        local = torch.stack([mq.double(), d[mq, mj].double(), (mj + offset).double()], 1)
        allm = _all_gather_var(local, dist, group, world)
        aq = allm[:, 0].long()
        ad = allm[:, 1].to(d.dtype)
        ag = allm[:, 2].long()
        cnt = torch.zeros(aq.numel(), dtype=torch.int64)
        step = max(1, _COUNT_ELEMS // max(1, g.shape[0]))
        for a in range(0, aq.numel(), step):
            b = min(aq.numel(), a + step)
            rows = d[aq[a:b]]
            before = (rows < ad[a:b, None]) | ((rows == ad[a:b, None]) & (gidx[None, :] < ag[a:b, None]))
            cnt[a:b] = (before & valid[aq[a:b]]).sum(1)
        dist.all_reduce(cnt, group=group)
        yield _stats_from_ranks(aq, cnt, Qt, market)
