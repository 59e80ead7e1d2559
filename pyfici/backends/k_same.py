"""The k-Same partition on the cpu backend: candidate lists from one exact kNN pass,
the greedy / MDAV loops in C++ (the CPU module), and list refreshes on demand.

One all-versus-all kNN pass gives every point a candidate list of its W nearest
neighbours. The loop takes a seed's first k-1 *alive* candidates: since a list
is a prefix of the seed's sorted neighbour list and points only ever leave, these
are exactly its k-1 nearest alive points. When a list runs out, that point and
the next ``refresh_batch`` alive points of the visiting order get fresh lists
computed against the alive points only, and the loop goes on. The result equals
the plain algorithm (pyfici.ops.reference.k_same).
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
    cand = _lists(x, x, W, tile, exclude_self=True) if N >= 2 * k else None
    next_cluster, n_alive = 0, N

    def refresh(points: torch.Tensor) -> None:
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

    if N >= 2 * k and method == "greedy":
        visit = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
        pos = 0
        while True:
            status, pos, next_cluster, n_alive = mod.k_same_sweep(
                cand.data_ptr(), W, k, visit.data_ptr(), pos, N, alive.data_ptr(), assign.data_ptr(),
                next_cluster, n_alive,
            )
            if status == 0:
                break
            ahead = visit[pos:]
            ahead = ahead[alive[ahead].bool()][:refresh_batch]
            refresh(ahead)
    elif N >= 2 * k:
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
