"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), exact and memory-bounded.

Two ops, both ``[Q, G]`` float32 results equal to the widely used numpy
``re_ranking(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda_value)``:

* ``rerank_features(query, gallery, ...)``: from features. The N x N graph
  (N = Q + G) is never held: row panels ``X[r0:r1] @ X[r0:].T`` (torch GEMM;
  only the upper half of the symmetric matrix) are folded into per-row top-K
  lists, row maxima and the query x gallery values by the backend, which then
  runs the sparse phases (k-reciprocal sets, expansion, weights, query
  expansion, Jaccard, blend).
* ``rerank_distmat(q_g, q_q, g_g, ...)``: from the three distance matrices
  (the reference's signature), scanned in row panels the same way.

Backends: ``cpu`` (C++, csrc/cpu/rerank.cpp), ``triton`` (GPU: torch for the
panels and the sparse set logic, a Triton kernel for the Jaccard + blend,
kernels/rerank.py) and ``torch`` (dense reference, pyfici.ops.reference).
See docs/ops_rerank.md for the reference's surprising points that we match.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch

from pyfici import _native
from pyfici.backends.gemm import mm_nt
from pyfici.ops import reference
from pyfici.ops._backend import choose_backend
from pyfici.ops._register import extra_arg, op_like
from pyfici.ops._validate import (
    as_tensor,
    check_feature_pair,
    check_finite,
    check_float,
    check_int_range,
    check_ndim,
    check_no_grad,
    check_not_meta,
    check_same_device,
)
from pyfici.ops.distance import _SAFE_EXP, _mul_pow2, condition_features

METRICS = ("euclidean", "sqeuclidean", "cosine")
_MODES = {"distmat": 0, "euclidean": 1, "sqeuclidean": 2, "cosine": 3}
_SUPPORTED = ("cpu", "triton", "torch")
TILE_BYTES = 128 << 20  # default budget for one distance panel
PROGRESS_MIN_N = 50_000  # show a progress bar (tqdm, stderr) for graphs at least this large


def _progress(it, N: int, total: int):
    if N < PROGRESS_MIN_N:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=f"rerank scan (N={N})", unit="panel", leave=False)


def panel_rows(n: int, itemsize: int, tile: int | None) -> int:
    """Rows per distance panel: ``tile`` or as many as fit TILE_BYTES (64..1024)."""
    if tile is not None:
        return tile
    return int(max(64, min(1024, TILE_BYTES // max(1, n * itemsize))))


def list_length(n: int, k1: int, k2: int) -> int:
    """Neighbours kept per row: the reference uses k1 + 1 (self included) and k2."""
    return min(n, max(k1 + 1, k2))


def _stacked_view(query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor | None:
    """The contiguous [Q + G, D] tensor whose row blocks ``query`` and ``gallery`` are, or None."""
    if not (query.is_contiguous() and gallery.is_contiguous() and query.dtype == gallery.dtype
            and query.shape[1:] == gallery.shape[1:] and query.untyped_storage().data_ptr()
            == gallery.untyped_storage().data_ptr()):
        return None
    if query.numel() and gallery.data_ptr() != query.data_ptr() + query.numel() * query.element_size():
        return None
    return torch.as_strided(query, (query.shape[0] + gallery.shape[0], query.shape[1]), (query.shape[1], 1))


def prepare_features(query: torch.Tensor, gallery: torch.Tensor, metric: str):
    """[N, D] stacked features in the compute dtype (normalised for cosine) and their squared norms."""
    dt = torch.float64 if torch.float64 in (query.dtype, gallery.dtype) else torch.float32
    query, gallery = query.to(dt), gallery.to(dt)
    if (metric != "cosine" and query.device.type == "cpu" and _native.has_cpu()
            and not torch.compiler.is_compiling()):
        # one pass: the stacked copy and its squared norms (csrc/cpu/rerank.cpp)
        query, gallery = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, gallery))
        Q, G, D = query.shape[0], gallery.shape[0], query.shape[1]
        norms = torch.empty(Q + G, dtype=dt)
        x = _stacked_view(query, gallery)  # already one buffer (condition_features(stacked=True)): norms only
        copy = x is None
        if copy:
            x = torch.empty((Q + G, D), dtype=dt)
        _native.cpu_module().rerank_stack(_native.DTYPE_CODES[dt], query.data_ptr(), Q, query.stride(0),
                                          gallery.data_ptr(), G, gallery.stride(0), D,
                                          x.data_ptr() if copy else 0, norms.data_ptr(), _native.num_threads())
        return x, norms
    x = torch.cat([query, gallery]).contiguous()
    if metric == "cosine":
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return x, None
    return x, (x * x).sum(1)


def distmat_panel(q_g: torch.Tensor, q_q: torch.Tensor, g_g: torch.Tensor, r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
    """Rows r0:r1 (all in the query part, or all in the gallery part) of the
    graph matrix whose row r is column r of the reference's assembled matrix."""
    Q = q_g.shape[0]
    if r1 <= Q:
        return torch.cat([q_q[:, r0:r1].T, q_g[r0:r1]], dim=1, out=out)
    g0, g1 = r0 - Q, r1 - Q
    return torch.cat([q_g[:, g0:g1].T, g_g[:, g0:g1].T], dim=1, out=out)


def panel_bounds(N: int, Q: int, rows: int):
    """Row panels of at most ``rows`` rows that never straddle the query/gallery boundary."""
    for a, b in ((0, Q), (Q, N)):
        for r0 in range(a, b, rows):
            yield r0, min(b, r0 + rows)


# ---------------------------------------------------------------------------
# CPU backend
# ---------------------------------------------------------------------------


def _cpu_state(N: int, Q: int, G: int, K: int):
    return (
        torch.empty((N, K), dtype=torch.float32),
        torch.empty((N, K), dtype=torch.int32),
        torch.zeros(N, dtype=torch.int32),
        torch.zeros(N, dtype=torch.float32),
        torch.empty((Q, G), dtype=torch.float32),
    )


_ZERO_COLUMN = {
    "features": "query / gallery: every feature is at distance 0 from every other (all equal, or all of one "
                "direction for cosine)",
    "distmat": "q_g / q_q / g_g: an item is at distance 0 from every item (a zero column of the assembled matrix)",
}


def _check_rowmax(rowmax: torch.Tensor, inputs: str) -> None:
    """Each column of the distance graph is divided by its maximum: a column of zeros
    (an item at distance 0 from every item: all features equal, or all of one direction
    for cosine) has no re-ranked distances (0 / 0; the reference numpy code, like the
    ``torch`` backend, returns NaN everywhere then)."""
    if bool((rowmax == 0).any()):
        raise ValueError(f"{_ZERO_COLUMN[inputs]}: the re-ranked distances are undefined (0 / 0)")


def _check_scan(cnt: torch.Tensor, rowmax: torch.Tensor, K: int, inputs: str) -> None:
    """The finishing pass indexes the candidate lists: every row must hold K
    candidates and a finite row maximum. Finite inputs conditioned as above
    always give that; this turns a broken invariant into an exception
    instead of reads through unset list entries."""
    if bool((cnt < K).any()) or not bool(torch.isfinite(rowmax).all()):
        raise ValueError("rerank: the squared distances of these inputs are not finite in float32 "
                         "(the re-ranking squares the distances in float32, as the reference does)")
    _check_rowmax(rowmax, inputs)


def _cpu_rerank_features(query, gallery, k1, k2, lambda_value, metric, tile):
    C = _native.cpu_module()
    nt = _native.num_threads()
    Q, G = query.shape[0], gallery.shape[0]
    N = Q + G
    x, norms = prepare_features(query, gallery, metric)
    dcode = _native.DTYPE_CODES[x.dtype]
    mode = _MODES[metric]
    K = list_length(N, k1, k2)
    topv, topi, cnt, rowmax, out = _cpu_state(N, Q, G, K)
    nptr = norms.data_ptr() if norms is not None else 0
    rows = panel_rows(N, x.element_size(), tile)
    buf = torch.empty(min(rows, N) * N, dtype=x.dtype)
    for r0 in _progress(range(0, N, rows), N, -(-N // rows)):
        r1 = min(N, r0 + rows)
        w = N - r0
        t = buf[: (r1 - r0) * w].view(r1 - r0, w)
        mm_nt(x[r0:r1], x[r0:], out=t)
        C.rerank_scan(t.data_ptr(), dcode, mode, w, r0, r1 - r0, r0, w, nptr, Q, G,
                      topv.data_ptr(), topi.data_ptr(), cnt.data_ptr(), rowmax.data_ptr(), K,
                      out.data_ptr(), G, True, nt)
    del buf
    _check_scan(cnt, rowmax, K, "features")
    C.rerank_finish(dcode, mode, x.data_ptr(), nptr, x.shape[1], x.shape[1], 0, 0, 0, 0, 0, 0, Q, G,
                    topv.data_ptr(), topi.data_ptr(), rowmax.data_ptr(), K, k1, k2, float(lambda_value),
                    out.data_ptr(), G, nt)
    return out


def _cpu_rerank_distmat(q_g, q_q, g_g, k1, k2, lambda_value, tile):
    C = _native.cpu_module()
    nt = _native.num_threads()
    Q, G = q_g.shape
    N = Q + G
    dcode = _native.DTYPE_CODES[q_g.dtype]
    K = list_length(N, k1, k2)
    topv, topi, cnt, rowmax, out = _cpu_state(N, Q, G, K)
    rows = panel_rows(N, q_g.element_size(), tile)
    buf = torch.empty(min(rows, N) * N, dtype=q_g.dtype)
    for r0, r1 in panel_bounds(N, Q, rows):
        t = distmat_panel(q_g, q_q, g_g, r0, r1, buf[: (r1 - r0) * N].view(r1 - r0, N))
        C.rerank_scan(t.data_ptr(), dcode, 0, N, r0, r1 - r0, 0, N, 0, Q, G,
                      topv.data_ptr(), topi.data_ptr(), cnt.data_ptr(), rowmax.data_ptr(), K,
                      out.data_ptr(), G, False, nt)
    del buf
    _check_scan(cnt, rowmax, K, "distmat")
    C.rerank_finish(dcode, 0, 0, 0, 0, 0, q_q.data_ptr(), q_q.stride(0), q_g.data_ptr(), q_g.stride(0),
                    g_g.data_ptr(), g_g.stride(0), Q, G, topv.data_ptr(), topi.data_ptr(), rowmax.data_ptr(), K,
                    k1, k2, float(lambda_value), out.data_ptr(), G, nt)
    return out


# ---------------------------------------------------------------------------
# GPU backend ("triton"): torch on the device for the panels and the sparse set
# logic (vectorised over rows, in chunks), the Triton kernel for the Jaccard +
# blend. Also runs on CPU tensors under TRITON_INTERPRET=1 (that is how CI
# checks it).
# ---------------------------------------------------------------------------

_CHUNK_ELEMS = 1 << 24  # elements of the largest temporary in the vectorised phases


def _raw_from_panel(p: torch.Tensor, mode: int, nr, nc) -> torch.Tensor:
    if mode == 0:
        return (p * p).float()
    if mode == 3:
        d = (1.0 - p).clamp_(0.0, 2.0)
        return (d * d).float()
    d2 = ((nr[:, None] + nc[None, :]) - 2.0 * p).clamp_(min=0.0)
    return (d2 * d2).float() if mode == 2 else d2.float()


def _device_pass1(panels, N: int, Q: int, G: int, K: int, mode: int, device):
    """Per-row sorted neighbour lists (stable sort of the normalised float32
    row, i.e. ties to the lower index), row maxima and the raw [Q, G] block."""
    topi = torch.empty((N, K), dtype=torch.int64, device=device)
    rowmax = torch.empty(N, dtype=torch.float32, device=device)
    out = torch.empty((Q, G), dtype=torch.float32, device=device)
    for r0, r1, raw in panels:
        if mode != 0:
            ar = torch.arange(r0, r1, device=device)
            raw[ar - r0, ar] = 0.0
        m = raw.max(1).values
        rowmax[r0:r1] = m
        if r0 < Q:
            qe = min(r1, Q)
            out[r0:qe] = raw[: qe - r0, Q:]
        o = raw / m[:, None]
        topi[r0:r1] = torch.sort(o, dim=1, stable=True).indices[:, :K]
    return topi, rowmax, out


def _chunks(n: int, per_row: int):
    step = max(1, _CHUNK_ELEMS // max(1, per_row))
    for a in range(0, n, step):
        yield a, min(n, a + step)


def _reciprocal_mask(nn: torch.Tensor, k: int) -> torch.Tensor:
    """[N, k] bool: entry t of row i's list has i among its own first k."""
    N = nn.shape[0]
    out = torch.empty((N, k), dtype=torch.bool, device=nn.device)
    head = nn[:, :k]
    for a, b in _chunks(N, k * k):
        rows = torch.arange(a, b, device=nn.device)
        out[a:b] = (head[head[a:b]] == rows[:, None, None]).any(-1)
    return out


def _compact(idx: torch.Tensor, val: torch.Tensor, pad: int):
    """Sort padded rows by index (pad = largest) and drop all-padding columns."""
    idx, order = torch.sort(idx, dim=1, stable=True)
    val = torch.gather(val, 1, order)
    width = int((idx < pad).sum(1).max()) if idx.numel() else 0
    return idx[:, : max(width, 1)], val[:, : max(width, 1)]


def _device_sparse_v(nn, rowmax, pair_raw, N: int, k1: int):
    """Expanded k-reciprocal sets and their normalised Gaussian weights as
    padded sparse rows (indices ascending, N = padding)."""
    dev = nn.device
    k_rec = min(k1 + 1, N)
    k_half = min(round(k1 / 2) + 1, N)
    rmask = _reciprocal_mask(nn, k_rec)
    hmask = _reciprocal_mask(nn, k_half)
    hlen = hmask.sum(1).double()
    head, hhead = nn[:, :k_rec], nn[:, :k_half]
    width = k_rec + k_rec * k_half
    idx_all = torch.full((N, width), N, dtype=torch.int64, device=dev)
    for a, b in _chunks(N, k_rec * k_half * k_rec):
        R = torch.where(rmask[a:b], head[a:b], N)  # [c, kr]
        H = hhead[head[a:b]]  # [c, kr, kh] half lists of the candidates
        Hm = hmask[head[a:b]]
        in_r = (H[..., None] == R[:, None, None, :]).any(-1)
        common = (in_r & Hm).sum(-1).double()
        accept = rmask[a:b] & (common > 2.0 / 3 * hlen[head[a:b]])
        ext = torch.where(accept[..., None] & Hm, H, N).flatten(1)
        e = torch.sort(torch.cat([R, ext], 1), dim=1).values
        dup = torch.zeros_like(e, dtype=torch.bool)
        dup[:, 1:] = e[:, 1:] == e[:, :-1]
        idx_all[a:b] = torch.where(dup, N, e)
    idx_all, _ = _compact(idx_all, torch.zeros_like(idx_all, dtype=torch.float32), N)
    vals = torch.zeros(idx_all.shape, dtype=torch.float32, device=dev)
    for a, b in _chunks(N, idx_all.shape[1] * pair_raw.cost):
        ids = idx_all[a:b]
        valid = ids < N
        raw = pair_raw(torch.arange(a, b, device=dev), ids.clamp(max=N - 1))
        w = torch.exp(-(raw / rowmax[a:b, None]))
        w = torch.where(valid, w, 0.0)
        vals[a:b] = torch.where(valid, w / w.sum(1, keepdim=True), 0.0)  # padding stays 0 even for an empty set
    return idx_all, vals


def _device_query_expansion(nn, vidx, vval, N: int, k2: int):
    """Mean of the V rows of the first k2 neighbours, summed in neighbour order
    (float32, as numpy's mean over axis 0) -> padded sparse rows."""
    if k2 == 1:
        return vidx, vval
    k2 = min(k2, N)
    M = vidx.shape[1]
    L = k2 * M
    oi = torch.full((N, L), N, dtype=torch.int64, device=vidx.device)
    ov = torch.zeros((N, L), dtype=torch.float32, device=vidx.device)
    for a, b in _chunks(N, L * 4):
        nb = nn[a:b, :k2]
        ii = vidx[nb].flatten(1)  # neighbour-major order
        vv = vval[nb].flatten(1)
        ii, order = torch.sort(ii, dim=1, stable=True)
        vv = torch.gather(vv, 1, order)
        acc = vv.clone()
        for s in range(1, k2):
            same = torch.zeros_like(ii, dtype=torch.bool)
            same[:, :-s] = ii[:, s:] == ii[:, :-s]
            nxt = torch.zeros_like(vv)
            nxt[:, :-s] = vv[:, s:]
            acc = acc + torch.where(same, nxt, 0.0)
        start = torch.ones_like(ii, dtype=torch.bool)
        start[:, 1:] = ii[:, 1:] != ii[:, :-1]
        start &= ii < N
        oi[a:b] = torch.where(start, ii, N)
        ov[a:b] = torch.where(start, acc / float(k2), 0.0)
    return _compact(oi, ov, N)


class _FeaturePairs:
    """raw value of (row, column) pairs from features, like the panels."""

    def __init__(self, x, norms, mode):
        self.x, self.norms, self.mode = x, norms, mode
        self.cost = x.shape[1]

    def __call__(self, rows, cols):
        dots = torch.bmm(self.x[cols], self.x[rows][:, :, None])[..., 0]
        nr = self.norms[rows][:, None] if self.norms is not None else None
        nc = self.norms[cols] if self.norms is not None else None
        if self.mode == 3:
            d = (1.0 - dots).clamp_(0.0, 2.0)
            raw = (d * d).float()
        else:
            d2 = ((nr + nc) - 2.0 * dots).clamp_(min=0.0)
            raw = (d2 * d2).float() if self.mode == 2 else d2.float()
        return torch.where(cols == rows[:, None], 0.0, raw)


class _DistmatPairs:
    """raw value of (row, column) pairs of the graph matrix from the three
    matrices: row r of the graph is column r of the assembled matrix."""

    def __init__(self, q_g, q_q, g_g):
        self.q_g, self.q_q, self.g_g = q_g, q_q, g_g
        self.Q = q_g.shape[0]
        self.cost = 4

    def __call__(self, rows, cols):
        Q = self.Q
        r = rows[:, None].expand_as(cols)
        qq = self.q_q[cols.clamp(max=Q - 1), r.clamp(max=Q - 1)]
        qg_rq = self.q_g[r.clamp(max=Q - 1), (cols - Q).clamp(min=0)]
        qg_rg = self.q_g[cols.clamp(max=Q - 1), (r - Q).clamp(min=0)]
        gg = self.g_g[(cols - Q).clamp(min=0), (r - Q).clamp(min=0)]
        v = torch.where(r < Q, torch.where(cols < Q, qq, qg_rq), torch.where(cols < Q, qg_rg, gg))
        return (v * v).float()


def _device_rerank(panels, pairs, N, Q, G, k1, k2, lambda_value, mode, device, inputs):
    from pyfici.kernels import rerank as tk

    K = list_length(N, k1, k2)
    nn, rowmax, out = _device_pass1(panels, N, Q, G, K, mode, device)
    _check_rowmax(rowmax, inputs)
    vidx, vval = _device_sparse_v(nn, rowmax, pairs, N, k1)
    vidx, vval = _device_query_expansion(nn, vidx, vval, N, k2)
    return tk.jaccard_blend_(out, rowmax[:Q].contiguous(), vidx[:Q], vval[:Q], vidx[Q:], vval[Q:], N, lambda_value)


def _device_rerank_features(query, gallery, k1, k2, lambda_value, metric, tile):
    Q, G = query.shape[0], gallery.shape[0]
    N = Q + G
    x, norms = prepare_features(query, gallery, metric)
    mode = _MODES[metric]
    rows = panel_rows(N, 4, tile)

    def panels():
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            p = x[r0:r1] @ x.T
            yield r0, r1, _raw_from_panel(p, mode, norms[r0:r1] if norms is not None else None, norms)

    return _device_rerank(panels(), _FeaturePairs(x, norms, mode), N, Q, G, k1, k2, lambda_value, mode, x.device,
                          "features")


def _device_rerank_distmat(q_g, q_q, g_g, k1, k2, lambda_value, tile):
    Q, G = q_g.shape
    N = Q + G
    rows = panel_rows(N, 4, tile)

    def panels():
        for r0, r1 in panel_bounds(N, Q, rows):
            p = distmat_panel(q_g, q_q, g_g, r0, r1, q_g.new_empty((r1 - r0, N)))
            yield r0, r1, _raw_from_panel(p, 0, None, None)

    return _device_rerank(panels(), _DistmatPairs(q_g, q_q, g_g), N, Q, G, k1, k2, lambda_value, 0, q_g.device,
                          "distmat")


# ---------------------------------------------------------------------------
# custom ops
# ---------------------------------------------------------------------------


class _Rerank(NamedTuple):
    """One re-ranking op's backends (each takes the reference's arguments; cpu and
    triton then the panel rows or None) and its result size (Q, G) from those arguments."""

    torch: Callable
    triton: Callable
    cpu: Callable
    size: Callable


_FEATURES = _Rerank(reference.rerank, _device_rerank_features, _cpu_rerank_features,
                    lambda a: (a[0].shape[0], a[1].shape[0]))
_DISTMAT = _Rerank(reference.rerank_distmat, _device_rerank_distmat, _cpu_rerank_distmat,
                   lambda a: tuple(a[0].shape))


def _rerank_impl(kind: _Rerank, *args) -> torch.Tensor:
    """``args``: the op's arguments (the reference's, backend, tile; tile 0 = default)."""
    ref_args, backend, tile = args[:-2], args[-2], args[-1]
    Q, G = kind.size(ref_args)
    if Q == 0 or G == 0:
        return ref_args[0].new_zeros((Q, G), dtype=torch.float32)
    if backend == "torch":
        return kind.torch(*ref_args)
    run = kind.triton if backend == "triton" else kind.cpu
    return run(*ref_args, tile if tile > 0 else None)


def _rerank_fake(kind: _Rerank, *args) -> torch.Tensor:
    return args[0].new_empty(kind.size(args[:-2]), dtype=torch.float32)


_rerank_op = op_like("rerank", reference.rerank, partial(_rerank_impl, _FEATURES), extra=[extra_arg("tile", int)])
_rerank_op.register_fake(partial(_rerank_fake, _FEATURES))
_rerank_distmat_op = op_like("rerank_distmat", reference.rerank_distmat, partial(_rerank_impl, _DISTMAT),
                             extra=[extra_arg("tile", int)])
_rerank_distmat_op.register_fake(partial(_rerank_fake, _DISTMAT))


# ---------------------------------------------------------------------------
# public ops
# ---------------------------------------------------------------------------


def _check_params(k1, k2, lambda_value, tile):
    check_int_range("k1", k1, 1)
    check_int_range("k2", k2, 1)
    if not isinstance(lambda_value, (int, float)) or isinstance(lambda_value, bool):
        raise TypeError(f"lambda_value: expected a float, got {type(lambda_value).__name__}")
    if not 0.0 <= float(lambda_value) <= 1.0:
        raise ValueError(f"lambda_value: must be in [0, 1], got {lambda_value}")
    if tile is not None:
        check_int_range("tile", tile, 1)


def rerank_features(
    query: torch.Tensor,
    gallery: torch.Tensor,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    metric: str = "euclidean",
    *,
    tile: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Re-ranked distances of ``query`` [Q, D] to ``gallery`` [G, D] -> [Q, G] float32.

    Equal to the reference ``re_ranking(q_g, q_q, g_g, k1, k2, lambda_value)``
    given the ``metric`` distance matrices (self distances 0); for
    "euclidean" the squared distance the reference uses is taken directly
    (no sqrt then square). Inputs float32/float64 (float16/bfloat16 are
    upcast to float32; float64 inputs compute distances in float64). ``tile``:
    rows per distance panel (default: a 128 MB panel).
    """
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    _check_params(k1, k2, lambda_value, tile)
    query, gallery, dev = check_feature_pair("query", query, "gallery", gallery)
    for name, t in (("query", query), ("gallery", gallery)):
        check_not_meta(name, t)
        check_no_grad(name, t, "rerank_features")
    be = choose_backend("rerank", dev, backend, cuda_default="triton", supported=_SUPPORTED)
    if query.shape[0] and gallery.shape[0]:
        # The result is invariant to a common scale of the distances and to a
        # translation of the features: condition them so that the expansion
        # neither overflows (features ~1e20) nor cancels (features far from 0).
        dt = torch.float64 if torch.float64 in (query.dtype, gallery.dtype) else torch.float32
        query, gallery, _ = condition_features(query.to(dt), gallery.to(dt), metric, xname="query", yname="gallery",
                                               stacked=True)
        if metric != "cosine" and not torch.compiler.is_compiling():
            # the reference squares the distances in float32 (see _scaled_distances):
            # squared sqeuclidean distances are 4th powers of the features, which
            # overflow float32 from features of 2**30 (float32 inputs are only
            # conditioned for their own range, float64 ones for float64's).
            # Inside torch.compile graphs condition_features already scales every
            # input to a largest magnitude near 1.
            query, gallery = _scaled_distances(query, gallery, limit=_FEATURE_EXP)
    return _rerank_op(query, gallery, int(k1), int(k2), float(lambda_value), metric, be, int(tile or 0))


_FEATURE_EXP = 8  # features are scaled to a largest magnitude in 2**-8 .. 2**8 before re-ranking


def _scaled_distances(*mats: torch.Tensor, limit: int = _SAFE_EXP[torch.float32]) -> tuple[torch.Tensor, ...]:
    """The matrices times one power of two that keeps their squares in range
    (the re-ranked result is invariant to a common scale of the distances).
    The range is float32's in every dtype: like the reference, the squared
    distances are cast to float32, so float64 distances of 1e-30 (or features
    of 2**-60, whose squared-euclidean distances are 2**-120) would square to
    0 there and re-rank to NaN (0 / 0) without it."""
    m = 0.0
    for t in mats:
        if t.numel():  # the largest magnitude from min and max: one pass, no |t| temporary
            lo, hi = torch.aminmax(t)
            m = max(m, -float(lo), float(hi))
    if m == 0.0:
        return mats
    e = math.frexp(m)[1]
    if abs(e) <= limit:
        return mats
    return tuple(_mul_pow2(t, -e) for t in mats)


def rerank_distmat(
    q_g: torch.Tensor,
    q_q: torch.Tensor,
    g_g: torch.Tensor,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    *,
    tile: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Re-ranking from distance matrices ``q_g`` [Q, G], ``q_q`` [Q, Q],
    ``g_g`` [G, G] -> [Q, G] float32, as the reference (which squares the
    given distances). If any input is float64 the squares are taken in
    float64, as numpy would after promotion; float16/bfloat16 are upcast to
    float32. The matrices need not be symmetric: like the reference, row r of
    the graph is column r of the assembled matrix."""
    _check_params(k1, k2, lambda_value, tile)
    q_g = as_tensor("q_g", q_g)
    q_q = as_tensor("q_q", q_q)
    g_g = as_tensor("g_g", g_g)
    check_ndim("q_g", q_g, 2, "Q,G")
    check_ndim("q_q", q_q, 2, "Q,Q")
    check_ndim("g_g", g_g, 2, "G,G")
    for name, t in (("q_g", q_g), ("q_q", q_q), ("g_g", g_g)):
        check_float(name, t)
    Q, G = q_g.shape
    if tuple(q_q.shape) != (Q, Q):
        raise ValueError(f"q_q: expected shape [{Q}, {Q}] (Q from q_g), got {tuple(q_q.shape)}")
    if tuple(g_g.shape) != (G, G):
        raise ValueError(f"g_g: expected shape [{G}, {G}] (G from q_g), got {tuple(g_g.shape)}")
    dev = check_same_device(q_g=q_g, q_q=q_q, g_g=g_g)
    for name, t in (("q_g", q_g), ("q_q", q_q), ("g_g", g_g)):
        check_not_meta(name, t)
        check_no_grad(name, t, "rerank_distmat")
    if not torch.compiler.is_compiling():
        for name, t in (("q_g", q_g), ("q_q", q_q), ("g_g", g_g)):
            check_finite(name, t)
    dt = torch.float64 if torch.float64 in (q_g.dtype, q_q.dtype, g_g.dtype) else torch.float32
    q_g, q_q, g_g = (t.to(dt).contiguous() for t in (q_g, q_q, g_g))
    if not torch.compiler.is_compiling():
        q_g, q_q, g_g = _scaled_distances(q_g, q_q, g_g)
    be = choose_backend("rerank_distmat", dev, backend, cuda_default="triton", supported=_SUPPORTED)
    return _rerank_distmat_op(q_g, q_q, g_g, int(k1), int(k2), float(lambda_value), be, int(tile or 0))
