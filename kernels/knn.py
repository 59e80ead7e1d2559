"""Triton kernels for family 2: fused score + top-k selection, and the fused
k-nearest average.

``_knn_kernel``: one program per block of BLOCK_M queries walks the gallery in
BLOCK_N tiles; each tile's scores come from ``tl.dot`` (float32 accumulation)
and stay in registers. A running [BLOCK_M, KP] top-k state (best first) is
merged with a tile only when some score in the tile beats a row's k-th best:
K rounds of "take the best of state and tile (ties to the lower gallery
index), then knock it out". Tiles are visited in increasing index order, so
state entries always have lower indices than tile entries. Meant for small k
(a list of up to a few hundred); the score of column j is x.y_j * a_j + b_j
(pyfici.backends.knn computes a, b and refines the selected candidates exactly).

``_knn_average_kernel``: one program per query gathers its k selected gallery
rows (optionally scaled by 1/||y|| for cosine) and writes the weighted sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_K = 128  # largest k the public ops accept on this backend
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


def knn_scores(x: torch.Tensor, y: torch.Tensor, a, b, L: int, exclude_self: bool):
    """The L best ranking scores x.y_j * a_j + b_j (float32, best first) and their int64
    indices [Q, L] (a, b: optional float32 [G] column terms; unused entries (-inf, -1))."""
    Q, D = x.shape
    G = y.shape[0]
    ov = torch.empty((Q, L), dtype=torch.float32, device=x.device)
    oi = torch.empty((Q, L), dtype=torch.int64, device=x.device)
    KP = max(16, triton.next_power_of_2(L))
    BM, BN, BD = 16, 64 if KP <= 32 else 32, 32
    dummy = x
    grid = (triton.cdiv(Q, BM),)
    _knn_kernel[grid](
        x, y, a if a is not None else dummy, b if b is not None else dummy, ov, oi, Q, G, D,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        K=L, KP=KP, HAS_A=a is not None, HAS_B=b is not None, EXCL=exclude_self,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD,
    )
    return ov, oi


def _norm_rows(t: torch.Tensor) -> torch.Tensor:
    """Row norms without overflow or underflow of the squares (scaled by the row's max)."""
    m = t.abs().amax(1, keepdim=True)
    m = torch.where(m > 0, m, torch.ones_like(m))
    return (t / m).norm(dim=1) * m[:, 0]


def average(y: torch.Tensor, idx: torch.Tensor, weights, normalize_rows: bool, spherical: bool) -> torch.Tensor:
    """Weighted (spherical) mean of the selected rows idx [Q, k] of y (float32) -> [Q, D].
    normalize_rows puts each neighbour on the unit sphere first (cosine)."""
    y = y.float().contiguous()
    idx = idx.contiguous()
    Q, k = idx.shape
    D = y.shape[1]
    inv = None
    if normalize_rows:
        n = _norm_rows(y)
        inv = (1.0 / torch.where(n > 0, n, torch.ones_like(n))).contiguous()
    out = torch.empty((Q, D), dtype=torch.float32, device=y.device)
    w = weights.float().contiguous() if weights is not None else None
    _knn_average_kernel[(Q,)](
        y, idx, w if w is not None else y, inv if inv is not None else y, out, D, y.stride(0),
        K=k, HAS_W=w is not None, HAS_INV=inv is not None, BLOCK_D=min(256, triton.next_power_of_2(D)),
    )
    if spherical:
        n = _norm_rows(out)[:, None]
        return out / torch.where(n > 0, n, torch.ones_like(n))
    wsum = torch.full((Q, 1), float(k), device=y.device) if w is None else w.sum(1, keepdim=True)
    return out / torch.where(wsum == 0, torch.ones_like(wsum), wsum)
