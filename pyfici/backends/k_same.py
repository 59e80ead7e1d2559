"""The k-Same partition on the cpu backend: candidate lists from one exact kNN pass,
the greedy / MDAV loops in C++ (the CPU module), and list refreshes on demand.

A candidate list holds a point's W nearest *alive* points at the time it was
computed (one exact kNN against the alive points). The loop takes a seed's first
k-1 alive candidates: since a list is a prefix of the seed's sorted neighbour
list and points only ever leave, these are exactly its k-1 nearest alive points.
greedy computes lists lazily: when the sweep reaches an alive point without a
list (or whose list ran out), that point and the next max(refresh_batch,
alive / 32) alive points of the visiting order without a usable list (none, or fewer than k-1
alive entries left) get lists in one batched kNN. Only
the ~N/k seeds (plus the points absorbed while their batch waits) ever need one,
so the work is about N^2 D / (2k) instead of one N^2 D all-versus-all pass.
mdav (whose seeds are not known in advance) starts from one all-versus-all pass
and refreshes single points. The result equals the plain algorithm
(pyfici.ops.reference.k_same).
"""

from __future__ import annotations

import torch

from pyfici import _native
from pyfici.backends import knn as kb


def _lists(q: torch.Tensor, g: torch.Tensor, W: int, tile: int, exclude_self: bool) -> torch.Tensor:
    """[len(q), W] nearest-first gallery indices (squared euclidean, exact), -1 padded."""
    G = g.shape[0]
    kk = min(W, G - 1 if exclude_self else G)
    out = torch.full((q.shape[0], W), -1, dtype=torch.int64)
    if kk >= 1:
        _, idx = kb.knn_local(q.contiguous(), g.contiguous(), kk, "sqeuclidean", exclude_self, tile, "cpu")
        out[:, :kk] = idx
    return out


def partition(x: torch.Tensor, k: int, seed: int, method: str, W: int, tile: int, refresh_batch: int) -> torch.Tensor:
    """Cluster ids int64 [N] of the rows of x (float32/64, contiguous, on the CPU; unit
    rows for cosine), clustered by squared euclidean distance."""
    N = x.shape[0]
    mod = _native.cpu_module()
    alive = torch.ones(N, dtype=torch.uint8)
    assign = torch.full((N,), -1, dtype=torch.int64)
    W = max(1, min(W, N - 1)) if N > 1 else 1
    next_cluster, n_alive = 0, N
    if N < 2 * k:
        assign[:] = 0
        return assign
    cand = torch.full((N, W), -1, dtype=torch.int64)
    has_list = torch.zeros(N, dtype=torch.bool)

    def refresh(points: torch.Tensor) -> None:
        """Fresh lists for `points`: their W nearest alive points (exact, ties to the lower index)."""
        alive_idx = torch.nonzero(alive, as_tuple=False).squeeze(1)
        g = x.index_select(0, alive_idx)
        q = x.index_select(0, points)
        kk = min(W + 1, g.shape[0])
        loc = _lists(q, g, kk, tile, exclude_self=False)
        glob = torch.where(loc < 0, loc, alive_idx[loc.clamp_min(0)])
        # drop the point itself; keep W entries
        glob = torch.where(glob == points[:, None], torch.full_like(glob, -1), glob)
        order = torch.argsort((glob < 0).to(torch.int8), dim=1, stable=True)
        glob = glob.gather(1, order)[:, :W]
        cand[points] = -1
        cand[points, : glob.shape[1]] = glob
        has_list[points] = True

    def _needing_lists(ahead: torch.Tensor, n: int) -> torch.Tensor:
        """The first n alive points of `ahead` whose list is missing or ran short."""
        out = []
        have = 0
        step = max(4 * n, 1024)
        for a0 in range(0, ahead.numel(), step):
            a = ahead[a0 : a0 + step]
            a = a[alive[a].bool()]
            c = cand[a]
            live = (alive[c.clamp_min(0)].bool() & (c >= 0)).sum(1)
            a = a[~has_list[a] | (live < k - 1)]
            out.append(a[: n - have])
            have += out[-1].numel()
            if have >= n:
                break
        return torch.cat(out) if out else ahead[:0]

    if method == "greedy":
        # Lists only for the points the sweep reaches while alive (about N/k seeds), in
        # batches along the visiting order, instead of one all-versus-all pass.
        visit = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
        pos = 0
        while True:
            status, pos, next_cluster, n_alive = mod.k_same_sweep(
                cand.data_ptr(), W, k, visit.data_ptr(), pos, N, alive.data_ptr(), assign.data_ptr(),
                next_cluster, n_alive,
            )
            if status == 0:
                break
            # batches grow with the alive set: fewer, larger GEMMs; a few lists are wasted on
            # points absorbed into a cluster before their turn
            batch = max(refresh_batch, n_alive // 32)
            refresh(torch.cat([visit[pos : pos + 1], _needing_lists(visit[pos + 1 :], batch - 1)]))
    else:
        cand = _lists(x, x, W, tile, exclude_self=True)
        has_list[:] = True
        total = x.double().sum(0).contiguous()
        while True:
            status, point, next_cluster, n_alive = mod.k_same_mdav(
                x.data_ptr(), _native.DTYPE_CODES[x.dtype], N, x.shape[1], cand.data_ptr(), W, k,
                alive.data_ptr(), assign.data_ptr(), total.data_ptr(), next_cluster, n_alive,
                _native.num_threads(),
            )
            if status == 0:
                break
            refresh(torch.tensor([point], dtype=torch.int64))
    assign[alive.bool()] = next_cluster
    return assign
