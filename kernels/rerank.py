"""Triton kernel for k-reciprocal re-ranking: Jaccard distance + lambda blend.

Each program takes one query row and BLOCK_G gallery rows. The query's sparse
V row is scattered into a dense scratch row (length N); each gallery row is a
padded sparse row (column indices ascending, ``N`` as padding). The program
walks the gallery entries in column order and adds min(v_query, v_gallery) in
float32, the same order as the reference's accumulation, so the sum is
deterministic and matches numpy's. The result overwrites ``OUT``, which holds
the raw (squared, un-normalised) query x gallery values on entry.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _jaccard_blend_kernel(
    SCRATCH, GIDX, GVAL, OUT, ROWMAX,
    q0, G, NV, NS, MG, ldo,
    w_jac, w_orig,
    BLOCK_G: tl.constexpr,
):
    qi = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs_g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = offs_g < G
    acc = tl.zeros((BLOCK_G,), dtype=tl.float32)
    row = SCRATCH + qi.to(tl.int64) * NS
    for t in range(0, MG):
        c = tl.load(GIDX + offs_g.to(tl.int64) * MG + t, mask=gmask, other=NV)
        valid = gmask & (c < NV)
        vg = tl.load(GVAL + offs_g.to(tl.int64) * MG + t, mask=valid, other=0.0)
        vq = tl.load(row + c, mask=valid, other=0.0)
        acc += tl.minimum(vq, vg)
    jac = 1.0 - acc / (2.0 - acc)
    q = q0 + qi
    optr = OUT + q.to(tl.int64) * ldo + offs_g
    raw = tl.load(optr, mask=gmask, other=0.0)
    m = tl.load(ROWMAX + q)
    orig = raw / m
    tl.store(optr, jac * w_jac + orig * w_orig, mask=gmask)


def jaccard_blend_(
    out: torch.Tensor,
    rowmax: torch.Tensor,
    q_idx: torch.Tensor,
    q_val: torch.Tensor,
    g_idx: torch.Tensor,
    g_val: torch.Tensor,
    n_all: int,
    lambda_value: float,
    scratch_bytes: int = 256 << 20,
) -> torch.Tensor:
    """In place: ``out`` [Q, G] float32 raw values -> final re-ranked distances.

    q_idx/q_val [Q, Mq] and g_idx/g_val [G, Mg]: padded sparse V rows
    (int32/int64 column indices ascending, ``n_all`` = padding; float32 values).
    rowmax [Q] float32: the per-row normalisation of the raw values.
    """
    Q, G = out.shape
    if Q == 0 or G == 0:
        return out
    g_idx = g_idx.to(torch.int32).contiguous()
    g_val = g_val.contiguous()
    MG = g_idx.shape[1]
    cq = max(1, min(Q, scratch_bytes // max(1, 4 * n_all)))
    scratch = torch.zeros((cq, n_all + 1), dtype=torch.float32, device=out.device)
    BLOCK_G = 128
    for a in range(0, Q, cq):
        b = min(Q, a + cq)
        s = scratch[: b - a]
        s.zero_()
        s.scatter_(1, q_idx[a:b].long(), q_val[a:b])  # padding lands in column n_all
        grid = (b - a, triton.cdiv(G, BLOCK_G))
        _jaccard_blend_kernel[grid](
            s, g_idx, g_val, out, rowmax,
            a, G, n_all, n_all + 1, MG, out.stride(0),
            float(1.0 - lambda_value), float(lambda_value),
            BLOCK_G=BLOCK_G,
        )
    return out
