"""Plain, readable torch implementations of every pyfici op (the ``torch``
backend). Tests compare every native backend against these, in float64 where
it matters. They favour clarity over speed and memory.

Each op family appends its section to this file.
"""

from __future__ import annotations

import numpy as np
import torch


def sqrt_(t: torch.Tensor) -> torch.Tensor:
    """In-place square root, correctly rounded (IEEE 754) on every CPU.

    ``torch.sqrt`` on CPU tensors goes through MKL's vector math library when
    torch links MKL, and on a non-Intel CPU that path is not correctly rounded:
    on an AMD EPYC (Zen 4, torch 2.14.1) 17% of float32 and 1.2% of float64
    results were one ulp off (largest relative error 0.75 ulp). Distances that
    differ by one ulp reorder near-ties, so rankings would depend on the CPU
    vendor, and torch's elementwise epilogue would not match the C++ kernels
    (which use the IEEE ``sqrt`` instruction). CPU tensors therefore take
    numpy's ``sqrt`` (the IEEE instruction) in place; other devices use torch's,
    which is correctly rounded on CUDA.
    """
    if (t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and not t.requires_grad
            and not torch.compiler.is_compiling()):
        a = t.numpy()
        np.sqrt(a, out=a)
        return t
    return t.sqrt_()


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """x / ||x|| along the last dim; zero rows stay zero (no epsilon). Each row is
    first divided by its largest magnitude, so no row's squares underflow or
    overflow whatever its scale (a row of float32 1e-30s, or of float64 2**-1000s,
    has the same unit row as a row of 1s)."""
    m = x.abs().amax(dim=-1, keepdim=True)
    x = x / torch.where(m > 0, m, torch.ones_like(m))
    n = x.norm(dim=-1, keepdim=True)
    return x / torch.where(n > 0, n, torch.ones_like(n))


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
        xn = unit_rows(x)
        yn = unit_rows(y)
        d = (1.0 - xn @ yn.T).clamp_(0.0, 2.0)
    elif metric in ("euclidean", "sqeuclidean"):
        d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
        d.clamp_(min=0.0)
        if metric == "euclidean":
            sqrt_(d)
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


# ---------------------------------------------------------------------------
# family 2: fused layer-wise optimizer steps with pruning masks, weight variation
# ---------------------------------------------------------------------------
# Per-tensor hyper-parameter tables (float64 rows, one per tensor), shared by
# every backend of pyfici.ops.optim:
#   SGD   [n, 6]: weight_decay, momentum, dampening, nesterov, init_momentum, maximize
#   AdamW [n, 6]: beta1, beta2, eps, weight_decay, amsgrad, maximize
# Math (and optimizer state) is float64 for float64 params, float32 otherwise.


def _skip_flag(found_inf: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if found_inf is None:
        return torch.zeros((), dtype=torch.bool, device=device)
    return found_inf.reshape(()).to(device) != 0


def _math_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _step_grad(grad, p_shape, dt, grad_scale, maximize: bool, mask) -> torch.Tensor:
    """grad / grad_scale (as the float32 reciprocal, like GradScaler), negated for
    maximize, zero where the mask is 0 (a select: an inf/NaN grad of a pruned weight
    is dropped, not multiplied by 0). An empty placeholder (a param without a gradient,
    which the optimizers pass frozen: lr 0, weight decay 0) reads as zeros."""
    g = grad.to(dt) if grad.shape == p_shape else torch.zeros(p_shape, dtype=dt, device=grad.device)
    if grad_scale is not None:
        g = g * torch.reciprocal(grad_scale.float().reshape(())).to(dt)
    if maximize:
        g = -g
    if mask is not None:
        g = torch.where(mask != 0, g, torch.zeros((), dtype=dt, device=g.device))
    return g


def _apply_mask(x: torch.Tensor, mask) -> torch.Tensor:
    if mask is None:
        return x
    return torch.where(mask != 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


def layerwise_sgd_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    lrs: torch.Tensor,
    hyper: torch.Tensor,
    masks: list[torch.Tensor | None],
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
) -> None:
    """SGD (torch.optim.SGD semantics, maximize included) with Apex-ASP masking, tensor by tensor.

    g = grad / grad_scale; g = -g if maximize; g = 0 where mask == 0; g += wd * p;
    buf = g (first step) or momentum * buf + (1 - dampening) * g; d = g + momentum * buf
    (Nesterov) or buf (or g without momentum); p -= lr * d; p = 0 where mask == 0.
    Tensors with lr == 0 and wd == 0 are not touched; nothing is touched when
    found_inf != 0 (no host sync: the new values are selected with torch.where).
    """
    for i, p in enumerate(params):
        if p.numel() == 0:
            continue
        wd, mom, damp, nest, init, maximize = (float(v) for v in hyper[i].tolist())
        if mom != 0 and momentum_buffers[i].shape != p.shape:
            continue  # no buffer yet: the optimizers pass a param without a gradient this way, frozen
        dt = _math_dtype(p)
        lr = lrs[i].to(dt)
        skip = _skip_flag(found_inf, p.device) | ((lr == 0) & (wd == 0))
        m = masks[i]
        g = _step_grad(grads[i], p.shape, dt, grad_scale, maximize != 0, m)
        pf = p.to(dt)
        if wd != 0:
            g = g.add(pf, alpha=wd)
        if mom != 0:
            buf = momentum_buffers[i]
            new_buf = g.clone() if init != 0 else buf.mul(mom).add(g, alpha=1.0 - damp)
            d = g.add(new_buf, alpha=mom) if nest != 0 else new_buf
            buf.copy_(torch.where(skip, buf, new_buf))
        else:
            d = g
        new_p = _apply_mask(pf - lr * d, m)
        p.copy_(torch.where(skip, pf, new_p).to(p.dtype))



def layerwise_adamw_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
    lrs: torch.Tensor,
    steps: torch.Tensor,
    hyper: torch.Tensor,
    masks: list[torch.Tensor | None],
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
) -> None:
    """AdamW (torch.optim.AdamW semantics, amsgrad and maximize included) with Apex-ASP masking.

    ``steps`` [n] float32 holds each tensor's step count; it is incremented for every
    tensor that is stepped (not frozen, no found_inf), and the bias corrections use the
    incremented count. ``max_exp_avg_sqs[i]`` is read and written only where amsgrad is on.
    """
    for i, p in enumerate(params):
        b1, b2, eps, wd, ams, maximize = (float(v) for v in hyper[i].tolist())
        dt = _math_dtype(p)
        lr = lrs[i].double()
        skip = _skip_flag(found_inf, p.device) | ((lr == 0) & (wd == 0))
        step = steps[i].double() + 1.0
        m = masks[i]
        g = _step_grad(grads[i], p.shape, dt, grad_scale, maximize != 0, m)
        pf = p.to(dt)
        new_p = pf * (1.0 - lr * wd).to(dt)
        ea = exp_avgs[i].lerp(g, 1.0 - b1)
        eas = exp_avg_sqs[i].mul(b2).addcmul(g, g, value=1.0 - b2)
        second = eas
        if ams != 0:
            second = torch.maximum(max_exp_avg_sqs[i], eas)
            max_exp_avg_sqs[i].copy_(torch.where(skip, max_exp_avg_sqs[i], second))
        bc1 = 1.0 - b1**step
        bc2_sqrt = (1.0 - b2**step).sqrt()
        step_size = (lr / bc1).to(dt)
        denom = second.sqrt() / bc2_sqrt.to(dt) + eps
        new_p = _apply_mask(new_p - step_size * (ea / denom), m)
        exp_avgs[i].copy_(torch.where(skip, exp_avgs[i], ea))
        exp_avg_sqs[i].copy_(torch.where(skip, exp_avg_sqs[i], eas))
        p.copy_(torch.where(skip, pf, new_p).to(p.dtype))
        steps[i] = torch.where(skip, steps[i], steps[i] + 1)


def weight_variation(params: list[torch.Tensor], snapshots: list[torch.Tensor]) -> torch.Tensor:
    """Per-tensor sum of squared differences -> [len(params)] (float64 for float64
    inputs, else float32; accumulated in float64 here)."""
    dev = params[0].device if params else torch.device("cpu")
    out_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    vals = [((p.double() - s.double()) ** 2).sum() for p, s in zip(params, snapshots)]
    if not vals:
        return torch.zeros(0, dtype=out_dtype, device=dev)
    return torch.stack(vals).to(out_dtype)


# ---------------------------------------------------------------------------
# family 2: exact kNN, k-nearest manifold averaging, k-Same
# ---------------------------------------------------------------------------


def knn(
    queries: torch.Tensor, gallery: torch.Tensor, k: int, metric: str = "sqeuclidean", exclude_self: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force exact kNN from the full [Q, G] matrix, computed in float64.

    Returns (values [Q, k], indices int64 [Q, k]). Distances ("sqeuclidean",
    "euclidean", "cosine" = 1 - cos) ascend; "ip" (inner product, a
    similarity) descends; ties go to the lower gallery index (stable sort).
    ``exclude_self`` drops gallery item i from query i's candidates.
    Values are float64 for float64 inputs, else float32.
    """
    out_dtype = torch.float64 if queries.dtype == torch.float64 else torch.float32
    x = queries.double()
    y = gallery.double()
    # direct formulas (no GEMM): identical gallery rows get identical values
    if metric == "ip":
        key = -(x[:, None, :] * y[None, :, :]).sum(-1)
    elif metric == "cosine":
        xn, yn = unit_rows(x), unit_rows(y)  # a zero row has cosine 0 with everything
        key = (1.0 - (xn[:, None, :] * yn[None, :, :]).sum(-1)).clamp(0.0, 2.0)
    elif metric in ("sqeuclidean", "euclidean"):
        key = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
        if metric == "euclidean":
            key = sqrt_(key)
    else:
        raise ValueError(f"metric: unknown {metric!r}")
    if exclude_self:
        n = min(key.shape[0], key.shape[1])
        key[torch.arange(n), torch.arange(n)] = float("inf")
    vals, idx = torch.sort(key, dim=1, stable=True)
    vals, idx = vals[:, :k], idx[:, :k]
    if metric == "ip":
        vals = -vals
    return vals.to(out_dtype), idx


def knn_average(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    metric: str = "cosine",
    spherical: bool = True,
    weights: torch.Tensor | None = None,
    exclude_self: bool = False,
) -> torch.Tensor:
    """Mean of each query's k nearest gallery rows -> [Q, D].

    For metric "cosine" the neighbours are first put on the unit sphere.
    ``weights`` ([k] per rank, or [Q, k]) weight the neighbours (default 1).
    spherical=True returns the normalised weighted sum (the spherical mean);
    otherwise the weighted sum divided by the sum of the weights.
    """
    out_dtype = torch.float64 if queries.dtype == torch.float64 else torch.float32
    _, idx = knn(queries, gallery, k, metric, exclude_self)
    nb = gallery.double()[idx]  # [Q, k, D]
    if metric == "cosine":
        nb = unit_rows(nb)
    w = torch.ones(idx.shape, dtype=torch.float64) if weights is None else weights.double().expand(idx.shape)
    s = (w[..., None] * nb).sum(1)
    if spherical:
        s = unit_rows(s)
    else:
        wsum = w.sum(1, keepdim=True)
        s = s / torch.where(wsum == 0, torch.ones_like(wsum), wsum)
    return s.to(out_dtype)


def k_same(embeddings: torch.Tensor, k: int, metric: str = "cosine", seed: int = 0, method: str = "greedy"):
    """The plain greedy k-Same partition (Newton, Sweeney, Malin 2005) on the full
    float64 distance matrix. Returns int64 assignment [N] (cluster ids 0..C-1 in
    creation order).

    greedy: s = the next alive point of ``torch.randperm(N, seed)``;
    mdav: s = the alive point farthest from the centroid of the alive points
    (ties to the lower index). The cluster is s and its k-1 nearest alive points
    (ties to the lower index); the last cluster takes the remaining k..2k-1.
    "cosine" clusters the unit-normalised rows by Euclidean distance (same order).
    """
    x = embeddings.double()
    if metric == "cosine":
        x = unit_rows(x)
    N = x.shape[0]
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    alive = torch.ones(N, dtype=torch.bool)
    assign = torch.full((N,), -1, dtype=torch.int64)
    order = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
    cluster = 0
    pos = 0
    while int(alive.sum()) >= 2 * k:
        if method == "mdav":
            c = x[alive].mean(0)
            far = ((x - c) ** 2).sum(1)
            far[~alive] = -float("inf")
            s = int(torch.argmax(far))  # first maximum = lower index
        else:
            while not alive[order[pos]]:
                pos += 1
            s = int(order[pos])
        row = d[s].clone()
        row[~alive] = float("inf")
        row[s] = float("inf")
        nb = torch.sort(row, stable=True).indices[: k - 1]
        members = torch.cat([torch.tensor([s]), nb])
        assign[members] = cluster
        alive[members] = False
        cluster += 1
    assign[alive] = cluster
    return assign


# ---------------------------------------------------------------------------
# k-reciprocal re-ranking (pyfici.ops.rerank)
# ---------------------------------------------------------------------------


def rerank_distmat(
    q_g: torch.Tensor, q_q: torch.Tensor, g_g: torch.Tensor, k1: int = 20, k2: int = 6, lambda_value: float = 0.3
) -> torch.Tensor:
    """Dense k-reciprocal re-ranking (Zhong et al., CVPR 2017), step by step
    as the widely used numpy code: [Q, G] float32. Holds N x N matrices
    (N = Q + G): for tests and small inputs only."""
    dt = torch.float64 if torch.float64 in (q_g.dtype, q_q.dtype, g_g.dtype) else torch.float32
    q_g, q_q, g_g = q_g.to(dt), q_q.to(dt), g_g.to(dt)
    full = torch.cat([torch.cat([q_q, q_g], 1), torch.cat([q_g.T, g_g], 1)], 0)
    full = (full * full).float()  # squared distances, cast to float32
    dist = (full / full.max(0).values).T.contiguous()  # row r = column r over its max
    n_all, n_q = dist.shape[0], q_g.shape[0]
    ranks = torch.sort(dist, dim=1, stable=True).indices  # k-th neighbour lists, self included
    k_rec = min(k1 + 1, n_all)
    k_half = min(round(k1 / 2) + 1, n_all)  # Python's round is half-to-even, like np.around

    def reciprocal(i: int, k: int) -> torch.Tensor:
        fwd = ranks[i, :k]
        return fwd[(ranks[fwd, :k] == i).any(1)]

    V = torch.zeros(n_all, n_all, dtype=torch.float32, device=dist.device)
    for i in range(n_all):
        R = reciprocal(i, k_rec)
        r_set = set(R.tolist())
        parts = [R]
        for c in R.tolist():
            H = reciprocal(c, k_half)
            if len(r_set & set(H.tolist())) > 2.0 / 3 * len(H):
                parts.append(H)
        E = torch.unique(torch.cat(parts))
        w = torch.exp(-dist[i, E])
        V[i, E] = w / w.sum()
    if k2 != 1:
        V = torch.stack([V[ranks[i, :k2]].mean(0) for i in range(n_all)])
    Vg = V[n_q:]
    jac = torch.empty(n_q, n_all - n_q, dtype=torch.float32, device=dist.device)
    for i in range(n_q):
        mins = torch.minimum(V[i][None, :], Vg).sum(1)
        jac[i] = 1 - mins / (2 - mins)
    return jac * (1 - lambda_value) + dist[:n_q, n_q:] * lambda_value


def rerank(
    query: torch.Tensor, gallery: torch.Tensor, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
    metric: str = "euclidean",
) -> torch.Tensor:
    """Re-ranking from features: :func:`rerank_distmat` of the three distance
    matrices of ``metric`` (self distances 0)."""
    return rerank_distmat(
        pairwise_distance(query, gallery, metric),
        pairwise_distance(query, query, metric, True),
        pairwise_distance(gallery, gallery, metric, True),
        k1, k2, lambda_value,
    )
