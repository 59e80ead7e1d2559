"""Family 1: embedding distance and ReID ranking statistics.

``pairwise_distance`` gives users the full [M, N] matrix. The GEMM is torch's
(BLAS on the CPU, cuBLAS on the GPU) for the ``cpu``, ``cuda`` and ``torch``
backends; the ``triton`` backend fuses the GEMM with the distance epilogue.

``reid_rank_stats`` reduces a [Q, G] distance tile to per-query AP, first-hit
rank, INP and match count without sorting the gallery rows (see
csrc/cpu/reid_rank.cpp). It is the engine of :mod:`pyfici.reid`.
"""

from __future__ import annotations

import torch

from pyfici import _native
from pyfici.backends.gemm import mm_nt
from pyfici.ops import reference
from pyfici.ops._backend import choose_backend
from pyfici.ops._register import extra_arg, op_like
from pyfici.ops._validate import (
    as_ids,
    as_tensor,
    check_feature_pair,
    check_finite,
    check_float,
    check_length,
    check_ndim,
    check_no_grad,
    check_not_meta,
)

METRICS = ("euclidean", "sqeuclidean", "cosine")

# ---------------------------------------------------------------------------
# conditioning: no overflow, no underflow, no cancellation in the expansion
# ---------------------------------------------------------------------------
# ||x||^2 + ||y||^2 - 2 x.y overflows for finite float32 features above ~1e19
# (the squares exceed 3.4e38: inf - inf = NaN), underflows below ~1e-19, and
# loses every significant digit when the features sit far from the origin
# (x = randn + 1e6: the three terms are ~1e12 and their difference ~1). Before
# the expansion the features are therefore scaled by a power of two (exact:
# only the exponent changes) into a safe range and centred on the gallery mean
# (the distances are translation invariant; for points near the mean the
# subtraction is exact). The distances of the conditioned features times 2**e
# are the distances of the inputs; rankings need no undo at all. Cosine only
# needs each row scaled (it is scale invariant per row).

_SAFE_EXP = {torch.float32: 40, torch.float64: 400}  # |log2 max|x|| below this: no rescaling
_STEP = 100  # largest power of two applied in one multiplication (representable in float32)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _mul_pow2(t: torch.Tensor, k: int) -> torch.Tensor:
    """t * 2**k without forming an unrepresentable power (a fresh tensor unless k == 0)."""
    while k != 0:
        step = max(-_STEP, min(_STEP, k))
        t = t * (2.0**step)
        k -= step
    return t


def _pow2_tensor(k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2**k as a 1-element tensor of ``dtype`` built from its exponent bits (exact; |k| <= _STEP)."""
    k = k.reshape(1)
    if dtype == torch.float64:
        return ((k.to(torch.int64) + 1023) << 52).view(torch.float64)
    return ((k.to(torch.int32) + 127) << 23).view(torch.float32)


def _mul_pow2_tensor(t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """t * 2**k for an integer 0-d tensor k, no host synchronisation (for torch.compile graphs)."""
    k = k.to(torch.int64)
    for _ in range(3):  # |k| <= 3 * _STEP covers every float32 exponent; float64 has safe k
        step = k.clamp(-_STEP, _STEP)
        t = t * _pow2_tensor(step, t.dtype)
        k = k - step
    return t


def _row_abs_max(x: torch.Tensor) -> torch.Tensor:
    """[rows, 1] largest magnitude of each row (NaN where a row holds a NaN): one
    read of x by the native kernel for CPU float rows, torch elsewhere."""
    if not x.shape[1]:
        return x.new_ones((x.shape[0], 1))
    if (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.stride(1) == 1
            and x.shape[0] and _native.has_cpu() and not torch.compiler.is_compiling()):
        m = torch.empty((x.shape[0], 1), dtype=x.dtype)
        _native.cpu_module().row_abs_max(x.data_ptr(), _native.DTYPE_CODES[x.dtype], x.shape[0], x.shape[1],
                                         x.stride(0), m.data_ptr(), _native.num_threads())
        return m
    return x.abs().amax(dim=1, keepdim=True)


def duplicate_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The rows of the 2-D tensor ``x`` equal (by value) to an earlier row: ``(dup, rep)``,
    int64 indices of those rows (ascending) and of the first row each one equals, or None when all rows
    differ. Why: a BLAS kernel may round the same dot product differently depending on
    where a row falls in its register blocks (OpenBLAS's Haswell sgemm kernel, which
    AVX2-only CPUs and ``OPENBLAS_CORETYPE=Haswell`` run, does), so identical features
    would get distances a few ulps apart and rank by rounding instead of by index. The
    CPU distance paths copy the representative's distances to its duplicates, which makes
    identical rows tie exactly on every BLAS.

    CPU float32 / float64 rows are hashed by the native kernel (one read of ``x``); the
    candidate pairs that share a hash are then compared value by value, so a hash
    collision never ties two different rows (it can only leave a true duplicate untied,
    about once in 2**64 pairs). Elsewhere ``torch.unique(dim=0)`` groups the rows."""
    n = x.shape[0]
    if n < 2 or x.numel() == 0:
        return None
    if (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.stride(1) == 1
            and _native.has_cpu() and not torch.compiler.is_compiling()):
        h = torch.empty(n, dtype=torch.int64)
        _native.cpu_module().row_hash(x.data_ptr(), _native.DTYPE_CODES[x.dtype], n, x.shape[1], x.stride(0),
                                      h.data_ptr(), _native.num_threads())
    else:
        h = torch.unique(x, dim=0, return_inverse=True)[1]
    hs, order = torch.sort(h, stable=True)
    start = torch.ones(n, dtype=torch.bool, device=x.device)
    start[1:] = hs[1:] != hs[:-1]
    if bool(start.all()):
        return None
    rep = order[start][torch.cumsum(start, 0) - 1]  # the first (lowest) index of each hash group
    keep = ~start
    dup, rep = order[keep], rep[keep]
    same = (x[dup] == x[rep]).all(1)
    if not bool(same.all()):
        dup, rep = dup[same], rep[same]
    if not dup.numel():
        return None
    o = torch.argsort(dup)
    return dup[o], rep[o]


def tie_duplicates_(d: torch.Tensor, dups: tuple[torch.Tensor, torch.Tensor] | None, dim: int = 1) -> torch.Tensor:
    """Slices ``dup`` of ``d`` along ``dim`` (1: columns, 0: rows) set to slices ``rep``
    (``dups`` from :func:`duplicate_rows` of the features behind them), in place."""
    if dups is not None:
        dup, rep = dups
        d.index_copy_(dim, dup, d.index_select(dim, rep))
    return d


def _row_scaled(x: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """Rows ready for their norms: a row whose largest magnitude m is outside
    2**-s .. 2**s (below 2**-39 at the latest; s = ``_SAFE_EXP``: 40 for float32, so the squares of a row of
    up to 2**20 values neither overflow nor underflow) is divided by m; the
    other rows (all of them, for features of ordinary magnitude) are returned
    as they are, without a pass over them (``x`` itself when no row needs it:
    callers do not write into the result). With ``name``, non-finite values
    (seen in the row maxima: NaN and Inf propagate) raise ValueError naming it."""
    m = _row_abs_max(x)
    if name is not None and not bool(torch.isfinite(m).all()):
        check_finite(name, x)
        raise ValueError(f"{name}: contains non-finite values")
    s = _SAFE_EXP[x.dtype] if x.dtype in _SAFE_EXP else _SAFE_EXP[torch.float32]
    # the low end is at least 2**-39 in every dtype: the normalisation after this clamps
    # norms at 1e-12 (the torch.nn.functional.normalize convention), so a nonzero row must
    # reach it with a norm above that (2**-39 = 1.8e-12), or its cosines would be off
    unsafe = (m > 0) & ((m < max(2.0**-s, 2.0**-39)) | (m > 2.0**s))
    if not torch.compiler.is_compiling() and not bool(unsafe.any()):
        return x
    return x / torch.where(unsafe, m, torch.ones_like(m))  # a division by 1 leaves a row exact


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows of ``x`` divided by their norms (zero rows stay zero), accurate at
    any finite magnitude: rows outside the safe range are first divided by their
    largest magnitude (:func:`_row_scaled`), so float32 rows of 1e-30 or 1e30
    are neither lost to underflow / overflow in the squares nor met by a norm
    clamp. Same dtype as ``x``; ``x`` is not modified."""
    x = _row_scaled(x)
    n = x.norm(dim=1, keepdim=True)
    return x / torch.where(n > 0, n, torch.ones_like(n))


def condition_features(x: torch.Tensor, y: torch.Tensor | None, metric: str, *, check: bool = True,
                       xname: str = "x", yname: str = "y", stacked: bool = False):
    """Features ready for the expansion -> ``(x', y', e)``.

    ``x'`` and ``y'`` are in the compute dtype (float64 for float64 ``x``,
    else float32), scaled by ``2**-e`` and (for the euclidean metrics) centred
    on the mean of ``y``; the distances between them times ``2**e`` (squared
    ones times ``4**e``) are those of the inputs. ``y=None``: ``y' is x'``.
    With ``check`` the values are also checked to be finite (one reduction,
    the only host synchronisation); inside torch.compile graphs the scale is
    computed without leaving the device and ``e`` is a 0-d tensor.
    ``stacked`` (euclidean metrics, ``y`` given): the centred ``x'`` and ``y'`` are
    written into one [rows of x + rows of y, D] buffer and returned as its two
    consecutive row blocks (re-ranking stacks them: no second copy).
    """
    dt = compute_dtype(x)
    same = y is None
    x = x.to(dt)
    y = x if same else y.to(dt)
    if metric == "cosine":
        checked = check and not torch.compiler.is_compiling()
        x = _row_scaled(x, xname if checked else None)
        return x, (x if same else _row_scaled(y, yname if checked else None)), 0
    if x.numel() == 0 and y.numel() == 0:
        return x, y, 0
    # largest magnitude from one min/max pass per tensor (NaN propagates: it also flags non-finite input)
    ext = [torch.stack(torch.aminmax(t)) for t in ((x,) if same else (x, y)) if t.numel()]
    amax = torch.cat(ext).abs().amax()
    if torch.compiler.is_compiling():
        e = torch.frexp(amax).exponent
        x = _mul_pow2_tensor(x, -e)
        y = x if same else _mul_pow2_tensor(y, -e)
    else:
        m = float(amax)
        if check and not (m < float("inf")):
            check_finite(xname, x)
            check_finite(yname, y)
        e = torch.frexp(torch.tensor(m, dtype=torch.float64)).exponent.item() if m > 0 else 0
        if abs(e) <= _SAFE_EXP[dt]:
            e = 0
        x = _mul_pow2(x, -e)
        y = x if same else _mul_pow2(y, -e)
    c = y.mean(0) if y.shape[0] else y.new_zeros(y.shape[1])
    if stacked and not same:
        buf = torch.empty((x.shape[0] + y.shape[0], x.shape[1]), dtype=x.dtype, device=x.device)
        xs, ys = buf[: x.shape[0]], buf[x.shape[0]:]
        return torch.sub(x, c, out=xs), torch.sub(y, c, out=ys), e
    x = x - c
    return x, (x if same else y - c), e


def undo_scale(d: torch.Tensor, e, metric: str) -> torch.Tensor:
    """Distances of conditioned features -> distances of the inputs (in place where possible)."""
    if metric == "cosine":
        return d
    k = e if metric == "euclidean" else 2 * e
    if isinstance(k, torch.Tensor):
        return _mul_pow2_tensor(d, k)
    while k != 0:
        step = max(-_STEP, min(_STEP, k))
        d.mul_(2.0**step)
        k -= step
    return d


# ---------------------------------------------------------------------------
# pairwise_distance
# ---------------------------------------------------------------------------


def prepare_gallery(y: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gallery-side work done once for many query tiles: the float32/64 copy,
    normalised rows for cosine, squared norms for (sq)euclidean."""
    out_dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
    y = y.to(out_dtype)
    if metric == "cosine":
        return y / y.norm(dim=1, keepdim=True).clamp_min(1e-12), None
    return y, (y * y).sum(1)


EPILOGUES = {"none": 0, "sqeuclidean": 1, "euclidean": 2, "cosine": 3}


def distance_tile_raw(x: torch.Tensor, y: torch.Tensor, y_norms: torch.Tensor | None, metric: str,
                      out: torch.Tensor | None = None):
    """The GEMM part of :func:`distance_tile` only: returns ``(raw, epilogue, q_norms)``
    where ``apply_epilogue(raw, epilogue, q_norms)`` is ``distance_tile(...)``.
    The CPU rank kernel applies the same epilogue (bit for bit) while it reads
    the tile, saving three passes over memory. ``out``: an optional contiguous
    [x rows, y rows] tensor of y's dtype to write ``raw`` into (a tile loop
    reuses one buffer instead of faulting in fresh memory for every tile)."""
    x = x.to(y.dtype)
    if metric == "cosine":
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return mm_nt(x, y, out), EPILOGUES["cosine"], None
    d = mm_nt(x, y, out, alpha=-2.0, bias=y_norms)
    return d, EPILOGUES[metric], (x * x).sum(1)


def apply_epilogue(raw: torch.Tensor, epilogue: int, q_norms: torch.Tensor | None, *,
                   inplace: bool = False) -> torch.Tensor:
    """Distance epilogue of :func:`distance_tile_raw` (0 none, 1 sqeuclidean
    max(raw + ||q||^2, 0), 2 euclidean sqrt of that, 3 cosine clamp(1 - raw, 0, 2))."""
    if epilogue == 0:
        return raw
    d = raw if inplace else raw.clone()
    if epilogue == 3:
        return d.neg_().add_(1.0).clamp_(0.0, 2.0)
    d.add_(q_norms[:, None]).clamp_(min=0.0)
    return reference.sqrt_(d) if epilogue == 2 else d


def distance_tile(x: torch.Tensor, y: torch.Tensor, y_norms: torch.Tensor | None, metric: str) -> torch.Tensor:
    """Distances of a query tile to a gallery prepared by :func:`prepare_gallery` (torch GEMM)."""
    return apply_epilogue(*distance_tile_raw(x, y, y_norms, metric), inplace=True)


def _distance_gemm(x: torch.Tensor, y: torch.Tensor, metric: str, self_distance: bool) -> torch.Tensor:
    """The GEMM backends' distances; repeated rows of ``x`` (rows of the result) and of
    ``y`` (columns) get their first copy's distances, so identical features tie exactly
    whatever the BLAS's rounding (:func:`duplicate_rows`), and with ``self_distance`` two
    copies of a point are exactly 0 apart."""
    yp, yn = prepare_gallery(y, metric)
    d = distance_tile(x, yp, yn, metric)
    if self_distance:
        d.fill_diagonal_(0.0)
    y_dups = duplicate_rows(y)
    x_dups = y_dups if self_distance else duplicate_rows(x)
    tie_duplicates_(d, y_dups, dim=1)
    return tie_duplicates_(d, x_dups, dim=0)


@torch.library.custom_op("pyfici::pairwise_distance", mutates_args=())
def _pairwise_distance_op(x: torch.Tensor, y: torch.Tensor, metric: str, self_distance: bool, backend: str) -> torch.Tensor:
    if backend == "torch":
        return reference.pairwise_distance(x, y, metric, self_distance)
    if backend == "triton":
        from pyfici.kernels import reid as tk

        return tk.pairwise_distance(x, y, metric, self_distance)
    return _distance_gemm(x, y, metric, self_distance)


@_pairwise_distance_op.register_fake
def _(x, y, metric, self_distance, backend):
    dtype = torch.float64 if x.dtype == torch.float64 and backend != "triton" else torch.float32
    return x.new_empty((x.shape[0], y.shape[0]), dtype=dtype)


def pairwise_distance(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    metric: str = "euclidean",
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Distances between the rows of ``x`` [M, D] and ``y`` [N, D] -> [M, N].

    metric: "euclidean", "sqeuclidean" (both via ||x||^2 + ||y||^2 - 2 x.y,
    clamped at 0 so no NaN from rounding) or "cosine" (1 - cosine similarity,
    clamped to [0, 2]). With ``y=None`` the distances of ``x`` to itself are
    returned and the diagonal is exactly 0. Output float32 (float64 for
    float64 inputs, except on the triton backend which accumulates in float32).

    Any finite input gives finite, accurate distances: the features are
    scaled by a power of two and centred before the expansion (see
    :func:`condition_features`), so float32 features of magnitude 1e-20 or
    1e20, or far from the origin, are handled; a squared distance above the
    dtype's range is inf. NaN / Inf inputs raise ValueError (torch.cdist
    would propagate them); tensors that require grad raise (the op has no
    autograd formula: pass ``.detach()``); meta tensors raise.
    """
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    self_distance = y is None
    x = as_tensor("x", x)
    x, y, dev = check_feature_pair("x", x, "y", x if y is None else y, "M,D", "N,D")
    check_not_meta("x", x)
    check_not_meta("y", y)
    check_no_grad("x", x, "pairwise_distance")
    check_no_grad("y", y, "pairwise_distance")
    be = choose_backend("pairwise_distance", dev, backend, cuda_default="cuda")
    xc, yc, e = condition_features(x, None if self_distance else y, metric)
    d = _pairwise_distance_op(xc, yc, metric, self_distance, be)
    return undo_scale(d, e, metric)


# ---------------------------------------------------------------------------
# reid_rank_stats
# ---------------------------------------------------------------------------

_DIST_DTYPES = (torch.float32, torch.float64)


def _reid_rank_stats_impl(dist, q_pids, g_pids, q_camids, g_camids, junk_minus1, trapezoid, backend, epilogue=0,
                          q_norms=None):
    if epilogue != 0 and backend != "cpu":
        dist = apply_epilogue(dist, epilogue, q_norms)
        epilogue = 0
    if backend == "torch":
        return reference.reid_rank_stats(dist, q_pids, g_pids, q_camids, g_camids, junk_minus1, trapezoid)
    Q, G = dist.shape
    dev = dist.device
    ap = torch.empty(Q, dtype=torch.float64, device=dev)
    inp = torch.empty(Q, dtype=torch.float64, device=dev)
    first = torch.empty(Q, dtype=torch.int64, device=dev)
    nmatch = torch.empty(Q, dtype=torch.int64, device=dev)
    if backend == "triton":
        from pyfici.kernels import reid as tk

        tk.reid_rank_stats_(dist, q_pids, g_pids, q_camids, g_camids, junk_minus1, trapezoid, ap, first, inp, nmatch)
        return ap, first, inp, nmatch
    if Q == 0:
        return ap, first, inp, nmatch
    args = (
        dist.data_ptr(), _native.DTYPE_CODES[dist.dtype], Q, G, dist.stride(0),
        q_pids.data_ptr(), g_pids.data_ptr(), q_camids.data_ptr(), g_camids.data_ptr(),
        junk_minus1, trapezoid, ap.data_ptr(), first.data_ptr(), inp.data_ptr(), nmatch.data_ptr(),
    )
    if backend == "cpu":
        qn_ptr = q_norms.data_ptr() if (epilogue != 0 and q_norms is not None) else 0
        _native.cpu_module().reid_rank_stats(*args, _native.num_threads(), epilogue, qn_ptr, 0, 0, 0, 0)
    else:
        with torch.cuda.device(dev):
            _native.cuda_module().reid_rank_stats(*args, _native.stream_ptr(dev))
    return ap, first, inp, nmatch


_reid_rank_stats_op = op_like("reid_rank_stats", reference.reid_rank_stats, _reid_rank_stats_impl,
                              extra=[extra_arg("epilogue", int, 0), extra_arg("q_norms", torch.Tensor | None, None)])


@_reid_rank_stats_op.register_fake
def _(dist, *args):
    Q = dist.shape[0]
    return (
        dist.new_empty(Q, dtype=torch.float64),
        dist.new_empty(Q, dtype=torch.int64),
        dist.new_empty(Q, dtype=torch.float64),
        dist.new_empty(Q, dtype=torch.int64),
    )


def reid_rank_stats(
    dist: torch.Tensor,
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    *,
    protocol: str = "torchreid",
    check_finite_values: bool = True,
    backend: str | None = None,
    epilogue: int = 0,
    q_norms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-query ranking statistics of a [Q, G] distance matrix (lower = closer).

    Returns ``(ap, first_rank, inp, num_matches)``: float64 [Q] average
    precision, int64 [Q] 0-based rank of the first true match among the valid
    gallery items (-1 if none), float64 [Q] inverse negative penalty
    (num_matches / (1 + rank of the hardest match)), int64 [Q] matches.
    protocol: "torchreid" (junk = same pid and camera; AP = mean precision at
    hits) or "market1501" (junk also pid -1; AP by the official trapezoid
    rule). Ties in distance go to the lower gallery index. Float ids must
    be integral (1.5 raises instead of becoming 1). With
    ``check_finite_values=False`` the caller promises finite distances; the
    CPU kernel still ranks a NaN distance after every number (as numpy's
    sort does) and never counts it as a hit before a real distance.

    ``epilogue`` / ``q_norms`` (internal, used by pyfici.reid.evaluate): the
    tile holds the raw GEMM output of :func:`distance_tile_raw` and the
    distance epilogue is applied on the fly.
    """
    if protocol not in ("torchreid", "market1501"):
        raise ValueError(f"protocol: expected 'torchreid' or 'market1501', got {protocol!r}")
    dist = as_tensor("distmat", dist)
    check_ndim("distmat", dist, 2, "Q,G")
    check_not_meta("distmat", dist)
    check_no_grad("distmat", dist, "reid_rank_stats")
    if dist.dtype not in _DIST_DTYPES:
        check_float("distmat", dist)
        dist = dist.float()
    if dist.shape[0] == 0:
        raise ValueError("distmat: there are no queries (shape[0] == 0)")
    if dist.shape[1] == 0:
        raise ValueError("distmat: the gallery is empty (shape[1] == 0)")
    if dist.stride(1) != 1:
        dist = dist.contiguous()
    Q, G = dist.shape
    dev = dist.device
    q_pids = as_ids("q_pids", q_pids, device=dev)
    g_pids = as_ids("g_pids", g_pids, device=dev)
    q_camids = as_ids("q_camids", q_camids, device=dev)
    g_camids = as_ids("g_camids", g_camids, device=dev)
    check_length("q_pids", q_pids, Q, "distmat")
    check_length("q_camids", q_camids, Q, "distmat")
    check_length("g_pids", g_pids, G, "the columns of distmat")
    check_length("g_camids", g_camids, G, "the columns of distmat")
    be = choose_backend("reid_rank_stats", dev, backend, cuda_default="cuda")
    market = protocol == "market1501"
    if epilogue not in (0, 1, 2, 3):
        raise ValueError(f"epilogue: expected 0..3, got {epilogue}")
    if (check_finite_values and be == "cpu" and epilogue == 0 and dist.dtype in (torch.float32, torch.float64)
            and not torch.compiler.is_compiling()):
        # the CPU kernel counts NaN / Inf in its one read of the matrix (no separate pass)
        return rank_stats_checked_cpu(dist, q_pids, g_pids, q_camids, g_camids, protocol)
    if check_finite_values:
        check_finite("distmat", dist)
    if epilogue in (1, 2):
        if q_norms is None or q_norms.shape != (Q,) or q_norms.dtype != dist.dtype or q_norms.device != dev:
            raise ValueError(f"q_norms: expected a [{Q}] {dist.dtype} tensor on {dev} for epilogue {epilogue}")
        q_norms = q_norms.contiguous()
    else:
        q_norms = None
    return _reid_rank_stats_op(dist, q_pids, g_pids, q_camids, g_camids, market, market, be, epilogue, q_norms)


def match_counts(q_pids: torch.Tensor, g_pids: torch.Tensor, q_camids: torch.Tensor, g_camids: torch.Tensor) -> torch.Tensor:
    """[Q] int64: gallery items with the query's pid and another camera (the
    matches under the torchreid protocol), without a [Q, G] matrix."""
    g = torch.stack([g_pids, g_camids], 1)
    pairs, pair_count = torch.unique(g, dim=0, return_counts=True)
    pids, pid_count = torch.unique(g_pids, return_counts=True)

    def lookup(keys, table, counts):
        if table.numel() == 0:
            return torch.zeros(keys.shape[0], dtype=torch.int64, device=keys.device)
        pos = torch.searchsorted(table, keys).clamp_max(table.numel() - 1)
        return torch.where(table[pos] == keys, counts[pos], torch.zeros_like(pos))

    same_pid = lookup(q_pids, pids, pid_count)
    # pairs are sorted lexicographically: search them through one int64 key per (pid, camera) rank
    cam_vals = torch.unique(torch.cat([g_camids, q_camids]))
    pid_vals = torch.unique(torch.cat([g_pids, q_pids]))
    n_cam = cam_vals.numel()
    pkey = (torch.searchsorted(pid_vals, pairs[:, 0].contiguous()) * n_cam
            + torch.searchsorted(cam_vals, pairs[:, 1].contiguous()))
    qkey = torch.searchsorted(pid_vals, q_pids) * n_cam + torch.searchsorted(cam_vals, q_camids)
    same_pid_cam = lookup(qkey, pkey, pair_count)
    return same_pid - same_pid_cam


def reid_match_ranks(dist: torch.Tensor, q_pids, g_pids, q_camids, g_camids, *, with_ties: bool = False):
    """Sorted 0-based ranks of every query's matches (torchreid protocol, ties
    to the lower index) from a CPU [Q, G] float32/float64 distance matrix.

    Returns ``(ranks, offsets, ties)``: the ranks of query q are
    ``ranks[offsets[q]:offsets[q + 1]]``; ``ties`` (or None) gives for each the
    number of other valid gallery items at exactly the same distance. Used to
    reproduce other libraries' float arithmetic and tie orders exactly.
    """
    dist = as_tensor("distmat", dist)
    check_ndim("distmat", dist, 2, "Q,G")
    if dist.device.type != "cpu":
        raise ValueError(f"distmat: reid_match_ranks runs on the CPU, got a tensor on {dist.device}")
    if dist.dtype not in _DIST_DTYPES:
        raise TypeError(f"distmat: expected float32 or float64, got {dist.dtype}")
    dist = dist.contiguous()
    Q, G = dist.shape
    ids = [as_ids(n, t) for n, t in zip(("q_pids", "g_pids", "q_camids", "g_camids"), (q_pids, g_pids, q_camids, g_camids))]
    for n, t, k in zip(("q_pids", "g_pids", "q_camids", "g_camids"), ids, (Q, G, Q, G)):
        check_length(n, t, k, "distmat")
    counts = match_counts(*ids)
    offsets = torch.zeros(Q + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=offsets[1:])
    total = int(offsets[-1])
    ranks = torch.empty(total, dtype=torch.int64)
    ties = torch.empty(total, dtype=torch.int64) if with_ties else None
    ap = torch.empty(Q, dtype=torch.float64)
    inp = torch.empty(Q, dtype=torch.float64)
    first = torch.empty(Q, dtype=torch.int64)
    nmatch = torch.empty(Q, dtype=torch.int64)
    if Q and G:
        _native.cpu_module().reid_rank_stats(
            dist.data_ptr(), _native.DTYPE_CODES[dist.dtype], Q, G, dist.stride(0),
            ids[0].data_ptr(), ids[1].data_ptr(), ids[2].data_ptr(), ids[3].data_ptr(), False, False,
            ap.data_ptr(), first.data_ptr(), inp.data_ptr(), nmatch.data_ptr(), _native.num_threads(), 0, 0,
            ranks.data_ptr(), offsets.data_ptr(), ties.data_ptr() if ties is not None else 0, 0)
        if not torch.equal(nmatch, counts):
            raise RuntimeError("reid_match_ranks: match counts disagree with the kernel's")
    return ranks, offsets, ties


def rank_stats_checked_cpu(dist: torch.Tensor, q_pids, g_pids, q_camids, g_camids, protocol: str):
    """:func:`reid_rank_stats` of a validated CPU float32/float64 matrix with
    contiguous rows and the finiteness check fused into the kernel's one pass
    over the matrix (instead of a separate reduction). Raises ValueError
    naming ``distmat`` if it holds NaN / Inf."""
    Q, G = dist.shape
    market = protocol == "market1501"
    ap = torch.empty(Q, dtype=torch.float64)
    inp = torch.empty(Q, dtype=torch.float64)
    first = torch.empty(Q, dtype=torch.int64)
    nmatch = torch.empty(Q, dtype=torch.int64)
    bad = torch.zeros(1, dtype=torch.int64)
    _native.cpu_module().reid_rank_stats(
        dist.data_ptr(), _native.DTYPE_CODES[dist.dtype], Q, G, dist.stride(0),
        q_pids.data_ptr(), g_pids.data_ptr(), q_camids.data_ptr(), g_camids.data_ptr(), market, market,
        ap.data_ptr(), first.data_ptr(), inp.data_ptr(), nmatch.data_ptr(), _native.num_threads(), 0, 0,
        0, 0, 0, bad.data_ptr())
    if int(bad):
        check_finite("distmat", dist)
        raise ValueError(f"distmat: contains {int(bad)} non-finite values")
    return ap, first, inp, nmatch
