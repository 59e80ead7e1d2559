"""kNN on the cpu, cuda and triton backends: approximate selection, exact refinement,
certification.

1. Selection. The gallery is walked in score tiles ``S = X_t @ Y_t^T``: on the CPU
   with the GEMM provider of ``pyfici._native.gemm_choice()`` (``torch``: torch.mm per
   tile from Python; ``openblas``: the whole tile loop in one C++ call with OpenBLAS),
   on CUDA with torch.mm (cuBLAS); the Triton kernel computes its own tiles with
   ``tl.dot``. A native kernel merges each tile into a running per-row list of the
   ``L = k + MARGIN`` best *ranking scores* ``x.y_j * a_j + b_j`` (bigger is
   better): ``a = 1/||y||`` for cosine, ``b = -||y||^2 / 2`` for (sq)euclidean, so
   no normalised copy of the gallery is made. The scores are computed on a
   transformed copy of each tile: centred on the gallery mean for (sq)euclidean
   when the data sit far from the origin (distances do not change, the
   cancellation in ``||x||^2 + ||y||^2 - 2 x.y`` does), and scaled by one power of
   two (exact) when the magnitudes would overflow or underflow the dtype's squares.
   On CPUs with bfloat16 matrix instructions (AMX-BF16 / AVX512-BF16) float32 inputs are
   selected from bfloat16 tiles instead (select_bf16: torch.mm of bf16 copies, oneDNN), with
   more candidates and a certificate of its own (_bf16_upper); its uncertified rows run the
   float32 pass. ``PYFICI_KNN_BF16=auto|on|off``; docs/ops_knn.md, "The bfloat16 selection".
2. Refinement. The L candidates of every query get exact values from the direct
   formula (``sum (x_d - y_d)^2``, ``x.y``, ``1 - x.y / (|x| |y|)``, accumulated in
   double in a fixed order per pair) and are sorted by (value, index). A value never
   depends on the tile a row fell into, so identical gallery rows tie exactly and
   ties go to the lower index on every backend.
3. Certification. The rounding error of a tile score is bounded
   (``|err| <= E = 4 (D + 4) u (|x'| Y'max + Y'max^2)`` in the transformed space, u the
   unit roundoff of the dtype). A row is certified when no gallery item outside its
   list can reach its k-th exact value even with that error (or when the list holds
   every candidate). Rows that are not certified (many near-ties at the k-th
   place) are recomputed by the direct formula over the whole gallery. The result
   is therefore the exact top-k of the direct formula for every row.

Memory: two score tiles on the CPU with torch.mm (the selection of one tile runs on a
helper thread while BLAS fills the next), one 2 MB tile per thread with OpenBLAS
(scanned right after its GEMM, while in cache), one on CUDA, plus one transformed query and
gallery tile when a transform is needed; independent of Q and G otherwise.
Deciding the transform and the uncertified rows reads a few scalars back to the
host (one synchronisation per call on CUDA).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch

from pyfici import _native
from pyfici.ops.reference import sqrt_

DEFAULT_TILE = 1 << 23  # score-tile elements (32 MB in float32)
MAX_TILE_ROWS = 1024
MARGIN = 8  # candidates kept beyond k, so near-ties at the k-th place rarely need the fallback
# the bf16 selection pass (CPU, float32 inputs): its scores carry ~2^-8 relative error, so it
# keeps more candidates (measured at D = 512, cosine, k = 10, 100k gallery: with the bound
# below 32 extra certify every one of 2000 rows); and it runs only where the product is big
# enough to repay converting the inputs to bfloat16 (auto mode)
MARGIN_BF16 = 32
BF16_MIN_WORK = 1 << 32  # Q * G * D below which auto mode keeps the float32 pass
_U_BF16 = 2.0**-8
_KEMPTY = torch.iinfo(torch.int64).max  # index of an unused heap entry (knn_select_tile_heap)
MAX_LIST = {"cuda": 2048}  # largest candidate list a selection kernel keeps
_ROW_CHUNK_ELEMS = 1 << 22  # elements of the gathered [rows, L, D] block in the torch refinement

_PIPELINE = os.environ.get("PYFICI_KNN_PIPELINE", "1") != "0"
# the C++ worker (GEMM provider "openblas"): the score tile of each thread, 512 x 1024 in
# float32 (2 MB, a core's L2 here; measured single-threaded at D = 512: 512 x 1024 tiles
# 129-133 GFLOP/s, 256 x 1024 123, 128 x 2048 105, one 1024 x 8192 GEMM 133-140)
WORKER_TILE_BYTES = 2 << 20
WORKER_TILE_ROWS = 512
_SELECTOR: tuple[int, ThreadPoolExecutor] | None = None


def compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def tile_shape(Q: int, G: int, tile: int) -> tuple[int, int]:
    tq = max(1, min(Q, MAX_TILE_ROWS, max(tile // min(G, 8192), math.isqrt(tile) // 4)))
    tg = max(1, min(G, tile // tq))
    return tq, tg


def _unit(dt: torch.dtype) -> float:
    return 2.0**-53 if dt == torch.float64 else 2.0**-24


def _selector() -> ThreadPoolExecutor:
    """One helper thread for pipelined CPU selection (re-created after a fork)."""
    global _SELECTOR
    if _SELECTOR is None or _SELECTOR[0] != os.getpid():
        _SELECTOR = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="pyfici-knn-select"))
    return _SELECTOR[1]


# ---------------------------------------------------------------------------
# the transformed space of the approximate scores
# ---------------------------------------------------------------------------


class Space(NamedTuple):
    """x' = (x - mu) * c, y' = (y - mu) * c, and the per-column score terms."""

    mu: torch.Tensor | None  # [D] in the compute dtype, or None (no centring)
    c: float  # a power of two (1.0: no scaling)
    a: torch.Tensor | None  # [G] 1/||y'|| (cosine)
    b: torch.Tensor | None  # [G] -||y'||^2 / 2 ((sq)euclidean)
    ymax: float  # max ||y'||

    @property
    def transformed(self) -> bool:
        return self.mu is not None or self.c != 1.0

    def apply(self, t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if not self.transformed:
            return t
        if out is None:
            out = torch.empty_like(t)
        if self.mu is not None:
            torch.sub(t, self.mu, out=out)
        else:
            out.copy_(t)
        if self.c != 1.0:
            out.mul_(self.c)
        return out


def _row_chunks(n: int, d: int):
    step = max(1, (1 << 20) // max(1, d))
    for r0 in range(0, n, step):
        yield r0, min(n, r0 + step)


def row_stats(t: torch.Tensor, backend: str, mu: torch.Tensor | None = None, c: float = 1.0,
              colsum: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """One pass over the rows of t: (||(t_r - mu) * c||^2 as float64 [N], the float64 column
    sums or None, max |t|)."""
    N, D = t.shape
    if N == 0:
        return torch.zeros(0, dtype=torch.float64, device=t.device), None, 0.0
    if backend == "cpu":
        n2 = torch.empty(N, dtype=torch.float64)
        cs = torch.zeros(D, dtype=torch.float64) if colsum else None
        mu64 = mu.double().contiguous() if mu is not None else None
        amax = _native.cpu_module().knn_row_stats(
            t.data_ptr(), _native.DTYPE_CODES[t.dtype], N, D, mu64.data_ptr() if mu64 is not None else 0, c,
            n2.data_ptr(), cs.data_ptr() if cs is not None else 0, _native.num_threads(),
        )
        return n2, cs, amax
    n2 = torch.empty(N, dtype=torch.float64, device=t.device)
    cs = torch.zeros(D, dtype=torch.float64, device=t.device) if colsum else None
    amax = 0.0
    for r0, r1 in _row_chunks(N, D):
        tc = t[r0:r1].double()
        amax = max(amax, float(tc.abs().max()))
        if cs is not None:
            cs += tc.sum(0)
        if mu is not None:
            tc = tc - mu.double()
        n2[r0:r1] = (tc * c).square().sum(1)
    return n2, cs, amax


def make_space(x: torch.Tensor, y: torch.Tensor, metric: str, backend: str = "cpu") -> Space:
    G, D = y.shape
    dt = y.dtype
    mu = None
    shift = 0.0
    euclid = metric in ("sqeuclidean", "euclidean")
    n2, colsum, amax_y = row_stats(y, backend, colsum=euclid)
    amax_x = amax_y if x.data_ptr() == y.data_ptr() and x.shape == y.shape else row_stats(x, backend)[2]
    if euclid and G > 0:
        m = colsum / G
        off2 = float(m.square().sum())
        spread2 = float(n2.sum()) / G - off2  # mean ||y - m||^2
        # centre when the offset dominates the spread: then the expansion cancels digits
        # (spread2 is itself inaccurate exactly then, which only strengthens the test)
        if off2 > 16.0 * max(spread2, 0.0):
            mu = m.to(dt)
            shift = float(mu.abs().max())
    amax = max(amax_x, amax_y) + shift
    c = 1.0
    if amax > 0 and math.isfinite(amax) and not (2.0**-20 <= amax <= 2.0**20):
        c = math.ldexp(1.0, -math.frexp(amax)[1])  # largest magnitude in [0.5, 1)
    sp = Space(mu, c, None, None, 0.0)
    a = b = None
    ymax2 = 0.0
    if G > 0:
        if sp.transformed:
            n2 = row_stats(y, backend, mu, c)[0]
        ymax2 = float(n2.max())
        if metric == "cosine":
            nrm = n2.sqrt()
            a = (1.0 / torch.where(nrm > 0, nrm, torch.ones_like(nrm))).to(dt)
        elif euclid:
            b = (n2 * -0.5).to(dt)
    return Space(mu, c, a, b, math.sqrt(ymax2))


# ---------------------------------------------------------------------------
# 1. selection over score tiles (cpu / cuda)
# ---------------------------------------------------------------------------


def select_tiles(
    x: torch.Tensor,
    y: torch.Tensor,
    L: int,
    space: Space,
    exclude_self: bool,
    tile: int,
    backend: str,
    col_offset: int = 0,
    self_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The L best ranking scores and global indices of every query, best first
    (approximate: computed from the BLAS tiles of the transformed inputs).

    Gallery column j has global index col_offset + j; with exclude_self, query i
    excludes global index self_offset + i. Unused list entries hold (-inf, -1).
    """
    if backend == "cpu" and _native.gemm_provider() == "openblas":
        return _select_worker(x, y, L, space, exclude_self, tile, col_offset, self_offset)
    Q, G = x.shape[0], y.shape[0]
    dt, dev = x.dtype, x.device
    code = _native.DTYPE_CODES[dt]
    tq, tg = tile_shape(Q, G, tile)
    out_s = torch.empty((Q, L), dtype=dt, device=dev)
    out_i = torch.empty((Q, L), dtype=torch.int64, device=dev)
    # CPU: two score buffers, so the selection of tile t (one helper thread, GIL
    # released) runs while BLAS computes tile t + 1; the memory-bound scan then
    # hides under the compute-bound GEMM. CUDA: one buffer, stream-ordered.
    pipelined = backend == "cpu" and Q * G > tq * tg and _PIPELINE
    bufs = [torch.empty(tq * tg, dtype=dt, device=dev) for _ in range(2 if pipelined else 1)]
    xbuf = torch.empty((tq, x.shape[1]), dtype=dt, device=dev) if space.transformed else None
    ybufs = [torch.empty((tg, y.shape[1]), dtype=dt, device=dev) for _ in range(len(bufs))] if space.transformed else None
    nthreads = 1 if pipelined else _native.num_threads()
    mod = _native.cpu_module() if backend == "cpu" else _native.cuda_module()
    a, b = space.a, space.b
    pending = None
    which = 0
    try:
        for q0 in range(0, Q, tq):
            q1 = min(Q, q0 + tq)
            rows = q1 - q0
            vals = out_s[q0:q1]
            idx = out_i[q0:q1]
            vals.fill_(float("-inf"))
            idx.fill_(-1)
            xq = x[q0:q1] if xbuf is None else space.apply(x[q0:q1], xbuf[:rows])
            for g0 in range(0, G, tg):
                g1 = min(G, g0 + tg)
                cols = g1 - g0
                S = bufs[which][: rows * cols].view(rows, cols)
                yt = y[g0:g1] if ybufs is None else space.apply(y[g0:g1], ybufs[which][:cols])
                which = (which + 1) % len(bufs)
                torch.mm(xq, yt.T, out=S)
                a_ptr = a[g0:g1].data_ptr() if a is not None else 0
                b_ptr = b[g0:g1].data_ptr() if b is not None else 0
                self_off = (self_offset + q0) if exclude_self else -1
                args = (S.data_ptr(), code, rows, cols, cols, col_offset + g0, a_ptr, b_ptr, L,
                        vals.data_ptr(), idx.data_ptr(), self_off)
                if pending is not None:
                    pending.result()
                    pending = None
                if pipelined:
                    pending = _selector().submit(mod.knn_select_tile, *args, nthreads)
                elif backend == "cpu":
                    mod.knn_select_tile(*args, nthreads)
                else:
                    mod.knn_select_tile(*args, _native.stream_ptr(dev))
    finally:
        if pending is not None:
            pending.result()
    return out_s, out_i


class Bf16Terms(NamedTuple):
    """The measured terms of the bf16 pass's error bound (see certified): per query row the
    norms of the bfloat16 rounding residual ``|x' - bf16(x')|`` and of ``bf16(x')``; over the
    gallery the largest residual norm and the largest bf16 row norm (both times a_j = 1/|y'_j|
    for cosine), and max a_j (1 for the other metrics)."""

    ex: torch.Tensor  # [Q] float64
    xt: torch.Tensor  # [Q] float64
    ey: float
    yt: float
    amax: float


def use_bf16(dtype: torch.dtype, Q: int, G: int, D: int, backend: str) -> bool:
    """Whether knn_local runs its selection pass in bfloat16 for Q queries against G gallery
    rows of D dims (CPU, float32 inputs; see pyfici._native.knn_bf16_choice)."""
    if backend != "cpu" or dtype != torch.float32 or Q == 0 or G == 0:
        return False
    on, _, forced = _native.knn_bf16_choice()
    return on and (forced or Q * G * D >= BF16_MIN_WORK)


def select_bf16(x, y, L: int, space: Space, exclude_self: bool, tile: int, col_offset: int = 0):
    """select_tiles with bfloat16 score tiles: the transformed inputs are rounded to bfloat16
    (C++ knn_rows_bf16: queries once per block of up to 2^24 elements, each gallery tile once
    per such block), ``torch.mm`` of the bf16 tiles (oneDNN; AMX where the CPU has it) gives
    bf16 scores, and the C++ scan merges them into heaps kept across tiles (sorted once at the
    end). Returns (scores float32 [Q, L], global indices [Q, L], Bf16Terms)."""
    Q, D = x.shape
    G = y.shape[0]
    mod = _native.cpu_module()
    nt = _native.num_threads()
    f32, bf16 = _native.DTYPE_CODES[torch.float32], _native.DTYPE_CODES[torch.bfloat16]
    mu = space.mu.contiguous() if space.mu is not None else None
    mu_ptr = mu.data_ptr() if mu is not None else 0
    tq, tg = tile_shape(Q, G, tile)
    qs = max(tq, min(Q, ((1 << 24) // D) // tq * tq))  # queries converted at a time
    hv = torch.full((Q, L), float("-inf"), dtype=torch.float32)
    hi = torch.full((Q, L), _KEMPTY, dtype=torch.int64)
    ex2, xt2 = torch.empty(Q, dtype=torch.float64), torch.empty(Q, dtype=torch.float64)
    xb = torch.empty((min(Q, qs), D), dtype=torch.bfloat16)
    yb = torch.empty((tg, D), dtype=torch.bfloat16)
    ey2, yt2 = torch.empty(tg, dtype=torch.float64), torch.empty(tg, dtype=torch.float64)
    S = torch.empty(tq * tg, dtype=torch.bfloat16)
    a, b = space.a, space.b
    ey = yt = 0.0
    for s0 in range(0, Q, qs):
        s1 = min(Q, s0 + qs)
        mod.knn_rows_bf16(x[s0].data_ptr(), f32, s1 - s0, D, mu_ptr, space.c, xb.data_ptr(), ex2[s0].data_ptr(),
                          xt2[s0].data_ptr(), nt)
        for g0 in range(0, G, tg):
            g1 = min(G, g0 + tg)
            cols = g1 - g0
            mod.knn_rows_bf16(y[g0].data_ptr(), f32, cols, D, mu_ptr, space.c, yb.data_ptr(), ey2.data_ptr(),
                              yt2.data_ptr(), nt)
            if s0 == 0:
                e, t = ey2[:cols].sqrt(), yt2[:cols].sqrt()
                if a is not None:  # relative to |y'_j| (a_j is 1/|y'_j| to float32 rounding)
                    e, t = e * a[g0:g1] * (1 + 2.0**-20), t * a[g0:g1] * (1 + 2.0**-20)
                ey, yt = max(ey, float(e.max())), max(yt, float(t.max()))
            a_ptr = a[g0:g1].data_ptr() if a is not None else 0
            b_ptr = b[g0:g1].data_ptr() if b is not None else 0
            for q0 in range(s0, s1, tq):
                q1 = min(s1, q0 + tq)
                rows = q1 - q0
                St = S[: rows * cols].view(rows, cols)
                torch.mm(xb[q0 - s0 : q1 - s0], yb[:cols].T, out=St)
                mod.knn_select_tile_heap(St.data_ptr(), bf16, f32, rows, cols, cols, col_offset + g0, a_ptr, b_ptr,
                                         L, hv[q0].data_ptr(), hi[q0].data_ptr(), q0 if exclude_self else -1, nt)
    mod.knn_heap_sort(hv.data_ptr(), hi.data_ptr(), f32, Q, L, nt)
    amax = float(a.max()) if a is not None else 1.0
    return hv, hi, Bf16Terms(ex2.sqrt(), xt2.sqrt(), ey, yt, amax)


def worker_tile_shape(Q: int, G: int, tile: int, itemsize: int = 4) -> tuple[int, int]:
    """Score tile of the C++ worker: at most WORKER_TILE_BYTES (one tile per thread, sized
    to stay in a core's L2 between the GEMM and the scan) and at most ``tile`` elements."""
    elems = max(1, min(tile, WORKER_TILE_BYTES // itemsize))
    tq = max(1, min(Q, WORKER_TILE_ROWS, elems // min(G, 1024)))
    return tq, max(1, min(G, elems // tq))


def _select_worker(x, y, L: int, space: Space, exclude_self: bool, tile: int, col_offset: int, self_offset: int):
    """select_tiles with the whole tile loop in C++ (GEMM from OpenBLAS, the scan of each
    tile right after its GEMM): one call, no Python per tile."""
    Q, G = x.shape[0], y.shape[0]
    dt = x.dtype
    out_s = torch.full((Q, L), float("-inf"), dtype=dt)
    out_i = torch.full((Q, L), -1, dtype=torch.int64)
    if Q == 0 or G == 0:
        return out_s, out_i
    mod = _native.openblas_module()
    tq, tg = worker_tile_shape(Q, G, tile, x.element_size())
    mu = space.mu.contiguous() if space.mu is not None else None
    mod.knn_select_gemm(
        x.data_ptr(), y.data_ptr(), _native.DTYPE_CODES[dt], Q, G, x.shape[1],
        mu.data_ptr() if mu is not None else 0, space.c,
        space.a.data_ptr() if space.a is not None else 0, space.b.data_ptr() if space.b is not None else 0,
        L, out_s.data_ptr(), out_i.data_ptr(), col_offset, self_offset if exclude_self else -1, tq, tg,
        _native.num_threads(),
    )
    return out_s, out_i


def _select_triton(x, y, L, space: Space, exclude_self: bool):
    from pyfici.kernels import knn as tk

    return tk.knn_scores(space.apply(x), space.apply(y), space.a, space.b, L, exclude_self)


# ---------------------------------------------------------------------------
# 2. exact values of the candidates, and the direct fallback
# ---------------------------------------------------------------------------


def _pair_values(xr: torch.Tensor, yr: torch.Tensor, metric: str) -> torch.Tensor:
    """Direct-formula values in float64: xr [R, 1, D] against yr [R, L, D] -> [R, L]."""
    if metric in ("sqeuclidean", "euclidean"):
        v = (xr - yr).square().sum(-1)
        return sqrt_(v) if metric == "euclidean" else v
    xy = (xr * yr).sum(-1)
    if metric == "ip":
        return xy
    xn = xr.square().sum(-1).sqrt()
    yn = yr.square().sum(-1).sqrt()
    den = torch.where(xn > 0, xn, torch.ones_like(xn)) * torch.where(yn > 0, yn, torch.ones_like(yn))
    return (1.0 - xy / den).clamp_(0.0, 2.0)


def _sort_pairs(v: torch.Tensor, i: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort rows by (value, index): distances ascending, ip descending; -1 indices last."""
    big = torch.iinfo(torch.int64).max
    key = torch.where(i < 0, torch.full_like(i, big), i)
    o1 = torch.argsort(key, dim=1, stable=True)
    v, i = v.gather(1, o1), i.gather(1, o1)
    o2 = torch.argsort(v, dim=1, descending=metric == "ip", stable=True)
    return v.gather(1, o2), i.gather(1, o2)


def _worst(metric: str) -> float:
    return float("-inf") if metric == "ip" else float("inf")


def refine(x, y, cand, k: int, metric: str, backend: str, col_offset: int = 0):
    """Exact values of the candidates (global indices cand [Q, L], -1 = none; row j of
    y has global index col_offset + j), sorted by (value, index): the best k values in
    x's dtype, their indices, and the k-th value in float64."""
    Q, L = cand.shape
    D = x.shape[1]
    dt = x.dtype
    vals = torch.empty((Q, k), dtype=dt, device=x.device)
    idx = torch.empty((Q, k), dtype=torch.int64, device=x.device)
    kth = torch.empty(Q, dtype=torch.float64, device=x.device)
    local = cand if col_offset == 0 else torch.where(cand < 0, cand, cand - col_offset)
    if backend == "cpu":
        local = local.contiguous()
        _native.cpu_module().knn_refine(
            x.data_ptr(), y.data_ptr(), _native.DTYPE_CODES[dt], Q, D, L, _native.METRIC_CODES[metric],
            local.data_ptr(), k, vals.data_ptr(), idx.data_ptr(), kth.data_ptr(), _native.num_threads(),
        )
    else:
        step = max(1, _ROW_CHUNK_ELEMS // max(1, L * D))
        for r0 in range(0, Q, step):
            r1 = min(Q, r0 + step)
            c = local[r0:r1]
            yr = y[c.clamp_min(0)].double()
            v = _pair_values(x[r0:r1, None, :].double(), yr, metric)
            v = torch.where(c >= 0, v, torch.full_like(v, _worst(metric)))
            v, i = _sort_pairs(v, c, metric)
            vals[r0:r1] = v[:, :k].to(dt)
            idx[r0:r1] = i[:, :k]
            kth[r0:r1] = v[:, k - 1]
    if col_offset:
        idx = torch.where(idx < 0, idx, idx + col_offset)
    return vals, idx, kth


def exact_rows(x, y, rows: torch.Tensor, k: int, metric: str, backend: str, self_offset: int):
    """Direct-formula top-k of the query rows ``rows`` over all of y (local indices);
    with self_offset >= 0, query q excludes y row q - self_offset."""
    R = rows.numel()
    G, D = y.shape
    dt = x.dtype
    if backend == "cpu":
        rows = rows.contiguous()
        vals = torch.empty((R, k), dtype=dt)
        idx = torch.empty((R, k), dtype=torch.int64)
        _native.cpu_module().knn_exact_rows(
            x.data_ptr(), y.data_ptr(), _native.DTYPE_CODES[dt], rows.data_ptr(), R, G, D,
            _native.METRIC_CODES[metric], k, self_offset, vals.data_ptr(), idx.data_ptr(), 0,
            _native.num_threads(),
        )
        return vals, idx
    worst = _worst(metric)
    sv = torch.full((R, k), worst, dtype=torch.float64, device=x.device)
    si = torch.full((R, k), -1, dtype=torch.int64, device=x.device)
    xr = x[rows].double()[:, None, :]
    step = max(1, _ROW_CHUNK_ELEMS // max(1, R * D))
    for g0 in range(0, G, step):
        g1 = min(G, g0 + step)
        v = _pair_values(xr, y[g0:g1].double()[None, :, :], metric)
        j = torch.arange(g0, g1, device=x.device).expand(R, g1 - g0)
        if self_offset >= 0:
            own = j == (rows - self_offset)[:, None]
            v = torch.where(own, torch.full_like(v, worst), v)
            j = torch.where(own, torch.full_like(j, -1), j)
        # state entries precede the chunk and have lower indices: a stable value sort keeps ties in index order
        v = torch.cat([sv, v], 1)
        j = torch.cat([si, j], 1)
        o = torch.argsort(v, dim=1, descending=metric == "ip", stable=True)
        v, j = v.gather(1, o), j.gather(1, o)
        # entries with index -1 sort like any other worst value; push them behind real ones
        v, j = _sort_pairs(v, j, metric)
        sv, si = v[:, :k], j[:, :k]
    return sv.to(dt), si


# ---------------------------------------------------------------------------
# 3. certification
# ---------------------------------------------------------------------------


def _bf16_upper(last, E32, terms: Bf16Terms, metric: str, D: int, ym: float) -> torch.Tensor:
    """The largest ranking score a gallery item outside a row's list can have after the bf16
    pass (transformed space). With x~ = bf16(x'), e_x = x' - x~ (likewise for y), f the
    float32-accumulated x~.y~ and s = bf16(f) the tile score:
      x'.y' = x~.y~ + e_x.y' + x~.e_y,  so |x'.y' - f| <= |e_x||y'| + |x~||e_y| + g_D |x~||y~|
    (Cauchy-Schwarz; g_D = D 2^-24 / (1 - D 2^-24), the float32 sum of exact bf16 products), and
    |s - f| <= u_b |f| (u_b = 2^-8; sign preserved), so f <= phi(s) with phi(t) = t / (1 - u_b)
    for t >= 0 and t / (1 + u_b) below. Outside items have scanned scores <= last, and the
    float32 side of the scan (a_j, b_j, the products) is within E32, the float32 pass's bound.
    cosine (score s a_j, |y'_j| a_j = 1): phi(last + E32) + |e_x| + |x~| ey + g_D |x~| yt;
    ip: phi(last + E32) + |e_x| ym + |x~| ey + g_D |x~| yt; (sq)euclidean (score s + b_j):
    last + E32 + u_b (1 + g_D) |x~| yt + the same input terms. A last term covers flushed
    subnormals (AMX treats them as zero): 2^-125 (sqrt(D) (|x~| + yt) + D + 1) max a_j."""
    ub = _U_BF16
    gam = D * 2.0**-24 / (1.0 - D * 2.0**-24)
    ex, xt = terms.ex, terms.xt
    tiny = 2.0**-125 * (math.sqrt(D) * (xt + terms.yt) + D + 1) * terms.amax
    scale = 1.0 if metric == "cosine" else ym
    e_in = ex * scale + xt * terms.ey + gam * xt * terms.yt + tiny
    t = last + E32
    if metric in ("sqeuclidean", "euclidean"):
        return t + ub * (1.0 + gam) * xt * terms.yt + e_in
    return torch.where(t >= 0, t / (1.0 - ub), t / (1.0 + ub)) + e_in


def tile_error(xn, ym: float, metric: str, D: int, dt: torch.dtype):
    """The bound E on a float32/64 tile's ranking-score error for queries of norm xn (in the
    transformed space; ym = max ||y'||): ``4 (D + 4) u`` (a factor 4 of slack) times
    ``|x'| Y'max + Y'max^2`` ((sq)euclidean), ``|x'|`` (cosine) or ``|x'| Y'max`` (ip)."""
    g = 4.0 * (D + 4) * _unit(dt)
    if metric in ("sqeuclidean", "euclidean"):
        return g * (xn * ym + ym * ym)
    return g * xn if metric == "cosine" else g * xn * ym


def certified(x, space: Space, scores, cand, kth, metric: str, complete: bool, backend: str,
              bf16: Bf16Terms | None = None) -> torch.Tensor:
    """bool [Q]: no gallery item outside a row's list can reach the row's k-th exact value
    (``bf16``: the scores came from select_bf16, whose bound is _bf16_upper)."""
    Q, L = cand.shape
    if complete:
        return torch.ones(Q, dtype=torch.bool, device=x.device)
    D = x.shape[1]
    gd = 8.0 * (D + 4) * 2.0**-53  # rounding of the double-precision exact values
    last = scores[:, -1].double()
    short = cand[:, -1] < 0  # fewer candidates than L: every column was seen
    xn2 = row_stats(x, backend, space.mu, space.c)[0]
    xn = xn2.sqrt()
    ym = space.ymax
    c2 = space.c * space.c
    E = tile_error(xn, ym, metric, D, x.dtype)
    # the largest ranking score any gallery item outside the list can have
    upper = last + E if bf16 is None else _bf16_upper(last, E, bf16, metric, D, ym)
    if metric in ("sqeuclidean", "euclidean"):
        kd = kth.square() if metric == "euclidean" else kth
        bound = xn2 - 2.0 * upper  # smallest possible squared distance outside the list
        ok = bound * (1.0 - gd) > kd * c2
    elif metric == "cosine":
        safe = torch.where(xn > 0, xn, torch.ones_like(xn))
        bound = 1.0 - upper / safe  # smallest possible 1 - cos outside the list
        ok = (bound - gd > kth) | (xn == 0)
    else:
        ok = upper + gd * xn * ym < kth * c2
    return ok | short


# ---------------------------------------------------------------------------
# the backend entry points
# ---------------------------------------------------------------------------


def list_length(k: int, available: int, backend: str, margin: int = MARGIN) -> int:
    return max(k, min(available, k + margin, MAX_LIST.get(backend, k + margin)))


_F64_SAFE_EXP = 400  # float64 inputs beyond 2**+-400 are scaled before the double-precision formula


def _float64_exponent(x: torch.Tensor, y: torch.Tensor) -> int:
    """e for float64 inputs whose largest magnitude is outside 2**-400 .. 2**400, else 0.
    The refinement and the certificate evaluate the direct formula in double, whose
    squares overflow beyond 2**511 and underflow below 2**-511; every metric's ranking
    is unchanged by one power of two applied to x and y, and the values are scaled
    back exactly (a squared distance or an inner product beyond float64's range is
    then inf, which check_output refuses). float32 / bfloat16 / float16 inputs never
    need it: their squares are taken in double."""
    if x.dtype != torch.float64 or torch.compiler.is_compiling():
        return 0
    m = max((float(t.abs().max()) for t in (x, y) if t.numel()), default=0.0)
    if m == 0.0 or not math.isfinite(m):
        return 0
    e = math.frexp(m)[1]
    return e if abs(e) > _F64_SAFE_EXP else 0


def knn_local(x, y, k: int, metric: str, exclude_self: bool, tile: int, backend: str,
              col_offset: int = 0, available: int | None = None, bf16: bool | None = None):
    """Exact top-k (values in x's dtype, global int64 indices) of x [Q, D] over the
    gallery y [G, D] (x, y contiguous, same float dtype). Column j has global index
    col_offset + j; with exclude_self, query i excludes global index i. ``available``:
    candidates per query (default G, or G - 1 with exclude_self); k <= available.
    ``bf16``: run the selection pass in bfloat16 (default: use_bf16); the rows it cannot
    certify run the float32 pass, and the rows that one cannot certify the direct formula."""
    e = _float64_exponent(x, y)
    if e:
        from pyfici.ops.distance import _mul_pow2  # (pyfici.ops imports this module)

        xs = _mul_pow2(x, -e)
        ys = xs if y is x else _mul_pow2(y, -e)
        vals, idx = knn_local(xs, ys, k, metric, exclude_self, tile, backend, col_offset, available, bf16)
        if metric != "cosine":
            vals = _mul_pow2(vals, e if metric == "euclidean" else 2 * e)
        return vals, idx
    G = y.shape[0]
    if available is None:
        available = G - 1 if exclude_self else G
    if bf16 is None:
        bf16 = use_bf16(x.dtype, x.shape[0], G, x.shape[1], backend)
    L = list_length(k, available, backend, MARGIN_BF16 if bf16 else MARGIN)
    space = make_space(x, y, metric, backend)
    terms = None
    if bf16:
        scores, cand, terms = select_bf16(x, y, L, space, exclude_self, tile, col_offset)
    elif backend == "triton":  # (called with col_offset = 0 only)
        scores, cand = _select_triton(x, y, L, space, exclude_self)
    else:
        scores, cand = select_tiles(x, y, L, space, exclude_self, tile, backend, col_offset=col_offset)
    vals, idx, kth = refine(x, y, cand, k, metric, backend, col_offset)
    ok = certified(x, space, scores, cand, kth, metric, complete=L >= available, backend=backend, bf16=terms)
    bad = torch.nonzero(~ok, as_tuple=False).squeeze(1)
    if bad.numel() and bf16:
        v, i = _float32_rows(x, y, bad, k, metric, exclude_self, tile, backend, col_offset, available)
        vals[bad] = v
        idx[bad] = i
    elif bad.numel():
        self_off = col_offset if exclude_self else -1
        v, i = exact_rows(x, y, bad, k, metric, backend, self_off)
        vals[bad] = v
        idx[bad] = torch.where(i < 0, i, i + col_offset)
    return vals, idx


def _float32_rows(x, y, rows: torch.Tensor, k: int, metric: str, exclude_self: bool, tile: int, backend: str,
                  col_offset: int, available: int):
    """knn_local's float32 pass for the query rows ``rows`` (global indices, int64): with
    exclude_self the k + 1 best without exclusion, less the row's own index (a value-sorted
    list minus one entry keeps its order)."""
    xs = x.index_select(0, rows).contiguous()
    extra = 1 if exclude_self else 0
    v, i = knn_local(xs, y, k + extra, metric, False, tile, backend, col_offset, available + extra, bf16=False)
    if exclude_self:
        own = (i == rows[:, None]).to(torch.int8)
        o = torch.argsort(own, dim=1, stable=True)[:, :k]
        v, i = v.gather(1, o), i.gather(1, o)
    return v, i


def check_output(vals: torch.Tensor | None, idx: torch.Tensor, metric: str) -> None:
    """Refuse a result that is not an answer: a row without k neighbours (only possible
    for non-finite inputs, whose check check_values=False skipped) or values that
    overflow the output dtype."""
    if bool((idx < 0).any()):
        raise ValueError(
            "queries / gallery: some rows have no finite ranking values: the inputs hold NaN or Inf "
            "(check_values=False skipped the check that names them)"
        )
    if vals is not None and metric in ("sqeuclidean", "ip"):
        if bool(torch.isinf(vals).any()):
            hint = [] if vals.dtype == torch.float64 else ["float64 inputs"]
            hint += ["metric='euclidean'"] if metric == "sqeuclidean" else []
            raise ValueError(
                f"metric: the {metric} values of these inputs exceed the {vals.dtype} range "
                f"(|v| > {torch.finfo(vals.dtype).max:.3g})" + (f"; pass {' or '.join(hint)}" if hint else "")
            )


def knn(x, y, k: int, metric: str, exclude_self: bool, tile: int, backend: str):
    dt = compute_dtype(x, y) if backend != "triton" else torch.float32
    x = x.to(dt).contiguous()
    y = y.to(dt).contiguous()
    vals, idx = knn_local(x, y, k, metric, exclude_self, tile, backend)
    check_output(vals, idx, metric)
    return vals, idx


def average_rows(backend, y, idx, w, lo, hi, normalize_rows, spherical, finalize, out):
    """out = the weighted (spherical) mean of the selected rows idx [Q, k] of y (global
    indices in [lo, hi) are y's rows; others skipped)."""
    dt = y.dtype
    rows, k = idx.shape
    idx = idx.contiguous()
    w_ptr = w.data_ptr() if w is not None else 0
    args = (y.data_ptr(), _native.DTYPE_CODES[dt], y.shape[1], idx.data_ptr(), w_ptr, rows, k, lo, hi,
            normalize_rows, spherical, finalize, out.data_ptr())
    if backend == "cpu":
        _native.cpu_module().knn_average_rows(*args, _native.num_threads())
    else:
        _native.cuda_module().knn_average_rows(*args, _native.stream_ptr(y.device))


def knn_average(x, y, k: int, metric: str, spherical: bool, w, exclude_self: bool, tile: int, backend: str):
    dt = compute_dtype(x, y) if backend != "triton" else torch.float32
    x = x.to(dt).contiguous()
    y = y.to(dt).contiguous()
    _, idx = knn_local(x, y, k, metric, exclude_self, tile, backend)
    check_output(None, idx, metric)
    if backend == "triton":
        from pyfici.kernels import knn as tk

        return tk.average(y, idx, w, metric == "cosine", spherical)
    out = torch.empty((x.shape[0], x.shape[1]), dtype=dt, device=x.device)
    w = w.to(dt).contiguous() if w is not None else None
    average_rows(backend, y, idx, w, 0, y.shape[0], metric == "cosine", spherical, True, out)
    return out


# ---------------------------------------------------------------------------
# gallery sharded over torch.distributed
# ---------------------------------------------------------------------------


def _device_ctx(backend: str, dev: torch.device):
    import contextlib

    return torch.cuda.device(dev) if backend == "cuda" else contextlib.nullcontext()


def shard_layout(G_local: int, dev: torch.device, group) -> tuple[int, int, int]:
    """(offset of this rank's shard, total gallery size, world size)."""
    import torch.distributed as dist

    sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([G_local], dtype=torch.int64, device=dev), group=group)
    sizes_l = [int(s) for s in sizes]
    rank = dist.get_rank(group)
    return sum(sizes_l[:rank]), sum(sizes_l), len(sizes_l)


def merge_lists(vals: torch.Tensor, idx: torch.Tensor, k: int, metric: str):
    """Merge concatenated per-shard lists [Q, R*k]: best k by (value, index)."""
    v, i = _sort_pairs(vals, idx, metric)
    return v[:, :k], i[:, :k]


def _local_topk(x, y, k, metric, exclude_self, tile, backend, offset, dt, local):
    """This shard's exact top-k with global indices, padded to k with (worst, -1)."""
    Q, G = x.shape[0], y.shape[0]
    worst = _worst(metric)
    vals = torch.full((Q, k), worst, dtype=dt, device=x.device)
    idx = torch.full((Q, k), -1, dtype=torch.int64, device=x.device)
    if G == 0:
        return vals, idx
    kk = min(k, G)
    if backend in ("cpu", "cuda"):
        xs, ys = x.to(dt).contiguous(), y.to(dt).contiguous()
        with _device_ctx(backend, x.device):
            v, i = knn_local(xs, ys, kk, metric, exclude_self, tile, backend, col_offset=offset, available=G)
    else:
        # no column offset in these backends: select without exclusion, then drop the own row
        v, i = local(x, y, min(kk + 1, G) if exclude_self else kk)
        i = i + offset
        if exclude_self:
            own = i == torch.arange(Q, device=x.device)[:, None]
            v = torch.where(own, torch.full_like(v, worst), v)
            i = torch.where(own, torch.full_like(i, -1), i)
            v, i = merge_lists(v, i, kk, metric)
    vals[:, : v.shape[1]] = v.to(dt)
    idx[:, : i.shape[1]] = i
    return vals, idx


def knn_sharded(x, y, k, metric, exclude_self, tile, backend, group, offset, world, local=None):
    """Global top-k over a gallery sharded over the ranks of ``group`` (this rank's shard y
    starts at global index ``offset``). ``local(x, y, k)``: the single-process op, used by
    the backends without a column offset (triton, torch)."""
    import torch.distributed as dist

    dt = compute_dtype(x, y) if backend != "triton" else torch.float32
    v, i = _local_topk(x, y, k, metric, exclude_self, tile, backend, offset, dt, local)
    vs = [torch.empty_like(v) for _ in range(world)]
    is_ = [torch.empty_like(i) for _ in range(world)]
    dist.all_gather(vs, v.contiguous(), group=group)
    dist.all_gather(is_, i.contiguous(), group=group)
    vals, idx = merge_lists(torch.cat(vs, 1), torch.cat(is_, 1), k, metric)
    check_output(vals, idx, metric)
    return vals, idx


def knn_average_sharded(x, y, k, metric, spherical, w, exclude_self, tile, backend, group, offset, world,
                        local=None):
    import torch.distributed as dist

    _, idx = knn_sharded(x, y, k, metric, exclude_self, tile, backend, group, offset, world, local)
    dt = compute_dtype(x, y)
    yl = y.to(dt).contiguous()
    Q, D = x.shape
    part = torch.zeros((Q, D), dtype=dt, device=x.device)
    lo, hi = offset, offset + y.shape[0]
    if backend in ("cpu", "cuda") and y.shape[0] > 0:
        with _device_ctx(backend, x.device):
            ww = w.to(dt).contiguous() if w is not None else None
            average_rows(backend, yl, idx, ww, lo, hi, metric == "cosine", spherical, False, part)
    elif y.shape[0] > 0:
        own = (idx >= lo) & (idx < hi)
        nb = yl[(idx - lo).clamp(0, y.shape[0] - 1)].double()
        if metric == "cosine":
            n = nb.norm(dim=2, keepdim=True)
            nb = nb / torch.where(n > 0, n, torch.ones_like(n))
        ww = torch.ones(idx.shape, dtype=torch.float64, device=x.device) if w is None else w.double()
        part = (torch.where(own, ww, torch.zeros_like(ww))[..., None] * nb).sum(1).to(dt)
    dist.all_reduce(part, group=group)
    if spherical:
        n = part.norm(dim=1, keepdim=True)
        return part / torch.where(n > 0, n, torch.ones_like(n))
    wsum = torch.full((Q, 1), float(k), dtype=dt, device=x.device) if w is None else w.to(dt).sum(1, keepdim=True)
    return part / torch.where(wsum == 0, torch.ones_like(wsum), wsum)
