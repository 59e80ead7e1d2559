"""Triton kernels for family 2: fused score + top-k selection, and the fused
k-nearest average.

``_knn_kernel``: one program per block of BLOCK_M queries walks the gallery in
BLOCK_N tiles; each tile's scores come from ``tl.dot`` (float32 accumulation)
and stay in registers. A running [BLOCK_M, KP] top-k state (best first) is
merged with a tile only when some score in the tile beats a row's k-th best:
K rounds of "take the best of state and tile (ties to the lower gallery
index), then knock it out". Tiles are visited in increasing index order, so
state entries always have lower indices than tile entries. Meant for small k
(k <= MAX_K); the score of column j is x.y_j * a_j + b_j as in pyfici.ops.knn.

``_knn_average_kernel``: one program per query gathers its k selected gallery
rows (optionally scaled by 1/||y|| for cosine) and writes the weighted sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_K = 128
_BIG = 2**31 - 1


@triton.jit
def _knn_kernel(
    X, Y, A, B, OV, OI, Q, G, D,
    sxq, sxd, syg, syd,
    K: tl.constexpr, KP: tl.constexpr, HAS_A: tl.constexpr, HAS_B: tl.constexpr, EXCL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = offs_m < Q
    kcols = tl.arange(0, KP)
    sv = tl.full((BLOCK_M, KP), float("-inf"), dtype=tl.float32)
    si = tl.full((BLOCK_M, KP), -1, dtype=tl.int32)
    for n0 in range(0, G, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_n = offs_n < G
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            in_d = offs_d < D
            x = tl.load(X + offs_m[:, None] * sxq + offs_d[None, :] * sxd,
                        mask=in_m[:, None] & in_d[None, :], other=0.0)
            y = tl.load(Y + offs_n[:, None] * syg + offs_d[None, :] * syd,
                        mask=in_n[:, None] & in_d[None, :], other=0.0)
            acc += tl.dot(x, tl.trans(y), input_precision="ieee")
        s = acc
        if HAS_A:
            a = tl.load(A + offs_n, mask=in_n, other=1.0)
            s = s * a[None, :]
        if HAS_B:
            b = tl.load(B + offs_n, mask=in_n, other=0.0)
            s = s + b[None, :]
        valid = in_n[None, :] & in_m[:, None]
        if EXCL:
            valid = valid & (offs_n[None, :] != offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
        thresh = tl.max(tl.where(kcols[None, :] == K - 1, sv, float("-inf")), axis=1)
        need = tl.max(tl.where(s > thresh[:, None], 1, 0))
        if need > 0:
            nv = tl.full((BLOCK_M, KP), float("-inf"), dtype=tl.float32)
            ni = tl.full((BLOCK_M, KP), -1, dtype=tl.int32)
            for t in range(K):
                best = tl.maximum(tl.max(s, axis=1), tl.max(sv, axis=1))
                it = tl.min(tl.where(s == best[:, None], offs_n[None, :], _BIG), axis=1)
                ist = tl.min(tl.where(sv == best[:, None], si, _BIG), axis=1)
                bi = tl.minimum(it, ist)
                nv = tl.where(kcols[None, :] == t, best[:, None], nv)
                ni = tl.where(kcols[None, :] == t, bi[:, None], ni)
                s = tl.where(offs_n[None, :] == bi[:, None], float("-inf"), s)
                sv = tl.where(si == bi[:, None], float("-inf"), sv)
            sv = nv
            si = ni
    out_mask = in_m[:, None] & (kcols[None, :] < K)
    tl.store(OV + offs_m[:, None] * K + kcols[None, :], sv, mask=out_mask)
    tl.store(OI + offs_m[:, None] * K + kcols[None, :], si.to(tl.int64), mask=out_mask)


@triton.jit
def _knn_average_kernel(Y, IDX, W, INV, OUT, D, syg, K: tl.constexpr, HAS_W: tl.constexpr,
                        HAS_INV: tl.constexpr, BLOCK_D: tl.constexpr):
    q = tl.program_id(0)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        in_d = offs_d < D
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for t in range(K):
            j = tl.load(IDX + q * K + t)
            scale = 1.0
            if HAS_W:
                scale = tl.load(W + q * K + t)
            if HAS_INV:
                scale = scale * tl.load(INV + j)
            y = tl.load(Y + j * syg + offs_d, mask=in_d, other=0.0)
            acc += scale * y
        tl.store(OUT + q * D + offs_d, acc, mask=in_d)


def _prepare(queries: torch.Tensor, gallery: torch.Tensor, metric: str):
    x = queries.float().contiguous()
    y = gallery.float().contiguous()
    a = b = None
    if metric == "cosine":
        a = (1.0 / y.norm(dim=1).clamp_min(1e-12)).contiguous()
    elif metric in ("sqeuclidean", "euclidean"):
        b = ((y * y).sum(1) * -0.5).contiguous()
    return x, y, a, b


def knn_scores(x: torch.Tensor, y: torch.Tensor, a, b, k: int, exclude_self: bool):
    """Top-k ranking scores (float32, best first) and int64 indices [Q, k]."""
    if k > MAX_K:
        raise ValueError(f"k: the triton backend handles k <= {MAX_K}, got {k} (use backend='cpu' or 'cuda')")
    Q, D = x.shape
    G = y.shape[0]
    ov = torch.empty((Q, k), dtype=torch.float32, device=x.device)
    oi = torch.empty((Q, k), dtype=torch.int64, device=x.device)
    KP = max(16, triton.next_power_of_2(k))
    BM, BN, BD = 16, 64 if KP <= 32 else 32, 32
    dummy = x
    grid = (triton.cdiv(Q, BM),)
    _knn_kernel[grid](
        x, y, a if a is not None else dummy, b if b is not None else dummy, ov, oi, Q, G, D,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        K=k, KP=KP, HAS_A=a is not None, HAS_B=b is not None, EXCL=exclude_self,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD,
    )
    return ov, oi


def knn(queries, gallery, k: int, metric: str, exclude_self: bool):
    from pyfici.ops.knn import scores_to_values

    x, y, a, b = _prepare(queries, gallery, metric)
    ov, oi = knn_scores(x, y, a, b, k, exclude_self)
    return scores_to_values(ov, x, metric), oi


def knn_average(queries, gallery, k: int, metric: str, spherical: bool, weights, exclude_self: bool):
    x, y, a, b = _prepare(queries, gallery, metric)
    _, idx = knn_scores(x, y, a, b, k, exclude_self)
    Q, D = x.shape
    out = torch.empty((Q, D), dtype=torch.float32, device=x.device)
    w = weights.float().contiguous() if weights is not None else None
    _knn_average_kernel[(Q,)](
        y, idx, w if w is not None else x, a if a is not None else x, out, D, y.stride(0),
        K=k, HAS_W=w is not None, HAS_INV=a is not None, BLOCK_D=min(256, triton.next_power_of_2(D)),
    )
    if spherical:
        return out / out.norm(dim=1, keepdim=True).clamp_min(1e-12)
    wsum = torch.full((Q, 1), float(k), device=x.device) if w is None else w.sum(1, keepdim=True)
    return out / torch.where(wsum == 0, torch.ones_like(wsum), wsum)
