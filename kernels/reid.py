"""Triton kernels for family 1: fused pairwise distance and ReID rank statistics."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _pairwise_distance_kernel(
    X, Y, XN, YN, OUT, M, N, D,
    sxm, sxd, sym, syd, som, son,
    METRIC: tl.constexpr,  # 0 sqeuclidean, 1 euclidean, 2 cosine (X, Y pre-normalised)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(X + offs_m[:, None] * sxm + offs_d[None, :] * sxd,
                    mask=(offs_m[:, None] < M) & (offs_d[None, :] < D), other=0.0)
        y = tl.load(Y + offs_n[:, None] * sym + offs_d[None, :] * syd,
                    mask=(offs_n[:, None] < N) & (offs_d[None, :] < D), other=0.0)
        acc += tl.dot(x.to(tl.float32), tl.trans(y.to(tl.float32)), input_precision="ieee")
    if METRIC == 2:
        d = 1.0 - acc
        d = tl.minimum(tl.maximum(d, 0.0), 2.0)
    else:
        xn = tl.load(XN + offs_m, mask=offs_m < M, other=0.0)
        yn = tl.load(YN + offs_n, mask=offs_n < N, other=0.0)
        d = xn[:, None] + yn[None, :] - 2.0 * acc
        d = tl.maximum(d, 0.0)
        if METRIC == 1:
            d = tl.sqrt(d)
    tl.store(OUT + offs_m[:, None] * som + offs_n[None, :] * son, d,
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def pairwise_distance(x: torch.Tensor, y: torch.Tensor, metric: str, self_distance: bool) -> torch.Tensor:
    """Fused GEMM + distance epilogue (float32 accumulation and output)."""
    M, D = x.shape
    N = y.shape[0]
    out = torch.empty((M, N), dtype=torch.float32, device=x.device)
    if M == 0 or N == 0:
        return out
    code = {"sqeuclidean": 0, "euclidean": 1, "cosine": 2}[metric]
    xf, yf = x.float(), y.float()
    if code == 2:
        xf = xf / xf.norm(dim=1, keepdim=True).clamp_min(1e-12)
        yf = yf / yf.norm(dim=1, keepdim=True).clamp_min(1e-12)
    xn = (xf * xf).sum(1)
    yn = (yf * yf).sum(1)
    BM, BN, BD = 64, 64, 32
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _pairwise_distance_kernel[grid](
        xf, yf, xn, yn, out, M, N, D,
        xf.stride(0), xf.stride(1), yf.stride(0), yf.stride(1), out.stride(0), out.stride(1),
        METRIC=code, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD,
    )
    if self_distance:
        out.fill_diagonal_(0.0)
    return out


@triton.jit
def _reid_rank_stats_kernel(
    DIST, QP, GP, QC, GC, AP, FIRST, INP, NMATCH, G, ld,
    JUNK_M1: tl.constexpr, TRAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per query. Blocks of gallery items that contain matches are
    # ranked against the whole row by counting (no sort); other blocks are skipped.
    q = tl.program_id(0)
    qp = tl.load(QP + q)
    qc = tl.load(QC + q)
    row = DIST + q.to(tl.int64) * ld
    ap = tl.zeros((), dtype=tl.float64)
    first = tl.full((), 2**62, dtype=tl.int64)
    last = tl.full((), -1, dtype=tl.int64)
    total = tl.zeros((), dtype=tl.int64)
    for m0 in range(0, G, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        in_m = offs_m < G
        pm = tl.load(GP + offs_m, mask=in_m, other=-2)
        cm = tl.load(GC + offs_m, mask=in_m, other=-2)
        is_match = in_m & (pm == qp) & (cm != qc)
        if JUNK_M1:
            is_match = is_match & (qp != -1)
        nm = tl.sum(is_match.to(tl.int64), axis=0)
        if nm > 0:
            dm = tl.load(row + offs_m, mask=in_m, other=0.0)
            c_all = tl.zeros((BLOCK_M,), dtype=tl.int64)
            c_match = tl.zeros((BLOCK_M,), dtype=tl.int64)
            for n0 in range(0, G, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                in_n = offs_n < G
                dn = tl.load(row + offs_n, mask=in_n, other=0.0)
                pn = tl.load(GP + offs_n, mask=in_n, other=-2)
                cn = tl.load(GC + offs_n, mask=in_n, other=-2)
                valid = in_n & ~((pn == qp) & (cn == qc))
                if JUNK_M1:
                    valid = valid & (pn != -1)
                # a NaN distance ranks after every number (+inf included), NaNs among
                # themselves by index, as the CPU kernel and torch's sort place them
                lower = offs_n[None, :] < offs_m[:, None]
                before = tl.where((dm != dm)[:, None], (dn == dn)[None, :] | lower,
                                  (dn[None, :] < dm[:, None]) | ((dn[None, :] == dm[:, None]) & lower))
                b = before & valid[None, :]
                c_all += tl.sum(b.to(tl.int64), axis=1)
                c_match += tl.sum((b & (pn == qp)[None, :]).to(tl.int64), axis=1)
            r = c_all.to(tl.float64)
            h = c_match.to(tl.float64) + 1.0
            prec = h / (r + 1.0)
            if TRAP:
                prev = tl.where(c_all == 0, 1.0, (h - 1.0) / tl.maximum(r, 1.0))
                contrib = 0.5 * (prev + prec)
            else:
                contrib = prec
            ap += tl.sum(tl.where(is_match, contrib, 0.0), axis=0)
            first = tl.minimum(first, tl.min(tl.where(is_match, c_all, 2**62), axis=0))
            last = tl.maximum(last, tl.max(tl.where(is_match, c_all, -1), axis=0))
            total += nm
    has = total > 0
    tot_f = tl.maximum(total, 1).to(tl.float64)
    nan = float("nan")
    tl.store(AP + q, tl.where(has, ap / tot_f, nan))
    tl.store(INP + q, tl.where(has, tot_f / (last.to(tl.float64) + 1.0), nan))
    tl.store(FIRST + q, tl.where(has, first, -1))
    tl.store(NMATCH + q, total)


def reid_rank_stats_(dist, q_pids, g_pids, q_camids, g_camids, junk_minus1: bool, trapezoid: bool,
                     ap, first, inp, nmatch) -> None:
    """Fills the [Q] outputs ap (float64), first (int64), inp (float64), nmatch (int64)."""
    Q, G = dist.shape
    if Q == 0:
        return
    _reid_rank_stats_kernel[(Q,)](
        dist, q_pids, g_pids, q_camids, g_camids, ap, first, inp, nmatch, G, dist.stride(0),
        JUNK_M1=junk_minus1, TRAP=trapezoid, BLOCK_M=32, BLOCK_N=256,
    )
