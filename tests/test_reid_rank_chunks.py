"""The CPU rank-statistics kernel counts each gallery row in L1-sized chunks of
integer order keys. These cases cross the chunk boundaries (2048 keys) with
matches on and next to them, exact ties across chunks, -0.0 next to +0.0, +inf
and NaN distances, for every CPU variant the machine runs."""

import pytest
import torch

from pyfici.ops import reid_rank_stats
from pyfici.reid import evaluate


def _ids(Q, G, n_ids, n_cams, gen):
    return (
        torch.randint(0, n_ids, (Q,), generator=gen),
        torch.randint(-1, n_ids, (G,), generator=gen),
        torch.randint(0, n_cams, (Q,), generator=gen),
        torch.randint(0, n_cams, (G,), generator=gen),
    )


def _check(dist, ids, cpu_isa, finite=True):
    for protocol in ("torchreid", "market1501"):
        kw = dict(protocol=protocol, check_finite_values=finite)
        ref = reid_rank_stats(dist, *ids, backend="torch", **kw)
        out = reid_rank_stats(dist, *ids, backend="cpu", **kw)
        for a, b in zip(out, ref):
            assert torch.allclose(a, b, equal_nan=True, rtol=0, atol=1e-12), (cpu_isa, dist.shape, protocol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("G", [2047, 2048, 2049, 4096 + 37, 6150])
def test_chunk_boundaries_ties_and_signed_zero(cpu_isa, dtype, G):
    gen = torch.Generator().manual_seed(G)
    Q = 9
    dist = torch.rand(Q, G, generator=gen, dtype=torch.float64)
    dist[:, ::7] = dist[:, :1].clone()  # exact ties in every chunk
    dist = dist.to(dtype)
    # the first rows: values 0 and -0 only (all tied), then a few coarse levels
    dist[0] = 0.0
    dist[0, ::3] = -0.0
    dist[1] = torch.randint(0, 3, (G,), generator=gen).to(dtype) - 1.0
    dist[1, ::4] *= -0.0
    ids = _ids(Q, G, 60, 3, gen)
    # matches at the chunk edges: items 2047, 2048, 4095, 4096 get query 2's pid
    qp, gp, qc, gc = ids
    for j in (0, 2047, 2048, 4095, 4096, G - 1):
        if j < G:
            gp[j] = qp[2]
            gc[j] = (qc[2] + 1) % 3
    _check(dist, (qp, gp, qc, gc), cpu_isa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inf_and_nan_distances_across_chunks(cpu_isa, dtype):
    gen = torch.Generator().manual_seed(3)
    Q, G = 6, 5000
    dist = torch.rand(Q, G, generator=gen, dtype=torch.float64).to(dtype)
    dist[:, 100::900] = float("inf")
    dist[:, 2048::1000] = float("nan")
    # unchecked: a NaN distance ranks as +inf, after every number, ties by index
    _check(dist, _ids(Q, G, 40, 4, gen), cpu_isa, finite=False)


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_features_fused_epilogue_wide_gallery(cpu_isa, metric):
    gen = torch.Generator().manual_seed(11)
    Q, G, D = 23, 4500, 12
    x = torch.randn(Q, D, generator=gen)
    y = torch.randn(G, D, generator=gen)
    y[::9] = y[:1].clone()  # identical gallery rows: exact distance ties
    qp, gp, qc, gc = _ids(Q, G, 50, 3, gen)
    ref = evaluate(x, y, qp, gp, qc, gc, metric=metric, backend="torch")
    out = evaluate(x, y, qp, gp, qc, gc, metric=metric, backend="cpu")
    assert torch.allclose(torch.as_tensor(out.cmc), torch.as_tensor(ref.cmc), rtol=0, atol=1e-12)
    assert abs(out.mAP - ref.mAP) < 1e-12 and abs(out.mINP - ref.mINP) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_abs_max_kernel_matches_torch(cpu_isa, dtype):
    """The cosine conditioning's row scale (native on CPU rows): the same values as
    abs().amax, NaN where a row holds one, Inf for an infinite entry, strided rows."""
    from pyfici.ops.distance import _row_abs_max

    gen = torch.Generator().manual_seed(5)
    for rows, cols in ((1, 1), (3, 15), (4, 16), (5, 17), (9, 1000), (2, 4099)):
        x = torch.randn(rows, cols, generator=gen, dtype=torch.float64).to(dtype) * 1e3
        x[0, 0] = -0.0
        assert torch.equal(_row_abs_max(x), x.abs().amax(dim=1, keepdim=True)), (cpu_isa, rows, cols)
        part = x[:, : max(1, cols - 1)]  # row stride larger than the row
        assert torch.equal(_row_abs_max(part), part.abs().amax(dim=1, keepdim=True))
        if rows > 1:
            y = x.clone()
            y[-1, -1] = float("nan")
            y[0, -1] = float("-inf")
            m = _row_abs_max(y)
            assert torch.isnan(m[-1]).all() and m[0].item() == float("inf")
            assert torch.equal(m[1:-1], y[1:-1].abs().amax(dim=1, keepdim=True))


def test_cosine_conditioning_names_the_non_finite_input():
    from pyfici.ops.distance import condition_features

    x = torch.randn(5, 8)
    x[2, 3] = float("inf")
    with pytest.raises(ValueError, match=r"^query: contains non-finite values \(0 NaN, 1 Inf\)"):
        condition_features(x, torch.randn(4, 8), "cosine", xname="query", yname="gallery")
    with pytest.raises(ValueError, match="^gallery: contains non-finite"):
        condition_features(torch.randn(4, 8), x, "cosine", xname="query", yname="gallery")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cosine_conditioning_scales_only_extreme_rows(dtype):
    """Rows of ordinary magnitude are used as they are (no pass over them);
    a row whose largest magnitude would over- or underflow its squared norm is
    divided by it, and the cosine distances stay right for every row."""
    from pyfici.ops import pairwise_distance
    from pyfici.ops.distance import _SAFE_EXP, condition_features

    s = _SAFE_EXP[dtype]
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 300, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randn(7, 300, generator=gen, dtype=torch.float64).to(dtype)
    xc, yc, _ = condition_features(x, y, "cosine")
    assert xc is x and yc is y
    big, small = x.clone(), y.clone()
    big[1] *= 2.0 ** (s + 30)
    small[2] *= 2.0 ** -(s + 30)
    small[3] = 0.0
    xc, yc, _ = condition_features(big, small, "cosine")
    assert torch.equal(xc[0], big[0]) and torch.equal(yc[0], small[0])
    assert xc[1].abs().max() == 1.0 and yc[2].abs().max() == 1.0 and torch.equal(yc[3], small[3])
    ref = 1.0 - torch.nn.functional.normalize(x.double(), dim=1) @ torch.nn.functional.normalize(y.double(), dim=1).T
    ref[:, 3] = 1.0  # a zero row is at cosine distance 1 from everything
    d = pairwise_distance(big, small, metric="cosine").double()
    assert torch.allclose(d, ref.clamp(0, 2), rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_match_counts_junk_items_and_negative_nan(cpu_isa, dtype):
    """Queries with 0..9 matches (the counting shares passes between matches
    four at a time: every remainder), same-camera junk items and junk-pid (-1)
    items on the chunk edges, and NaN of both signs."""
    gen = torch.Generator().manual_seed(11)
    Q, G = 3, 2 * 2048 + 301
    dist = torch.rand(Q, G, generator=gen, dtype=torch.float64).to(dtype)
    dist[:, 5::97] = -float("nan")
    dist[:, 9::113] = float("nan")
    edges = [0, 2047, 2048, 2049, 4095, 4096, 4097, G - 1, 17, 3000]
    for n_match in range(len(edges)):
        qp = torch.full((Q,), 1000)
        qc = torch.zeros(Q, dtype=torch.int64)
        gp = torch.randint(0, 50, (G,), generator=gen)
        gc = torch.randint(0, 4, (G,), generator=gen)
        gp[1::5] = -1
        for j in edges[:n_match]:  # the matches (another camera) ...
            gp[j], gc[j] = 1000, 1 + j % 3
        for j in edges[n_match:n_match + 3]:  # ... and same-camera junk items of the same pid
            gp[j], gc[j] = 1000, 0
        for protocol in ("torchreid", "market1501"):
            kw = dict(protocol=protocol, check_finite_values=False)
            ref = reid_rank_stats(dist, qp, gp, qc, gc, backend="torch", **kw)
            out = reid_rank_stats(dist, qp, gp, qc, gc, backend="cpu", **kw)
            assert out[3].tolist() == [n_match] * Q, (cpu_isa, protocol)
            for a, b in zip(out, ref):
                assert torch.allclose(a, b, equal_nan=True, rtol=0, atol=1e-12), (cpu_isa, protocol, n_match)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sqrt_is_correctly_rounded(dtype):
    """The euclidean epilogue's square root (pyfici.ops.reference.sqrt_) is the IEEE one on
    every CPU: torch.sqrt through MKL's vector math on an AMD EPYC was one ulp off for 17% of
    float32 values, which reordered near-ties against the C++ rank kernel's sqrt."""
    import math

    from pyfici.ops.reference import sqrt_

    gen = torch.Generator().manual_seed(2)
    x = (torch.rand(20000, generator=gen, dtype=torch.float64) * 100).to(dtype)
    x[:3] = torch.tensor([0.0, -0.0, 4.0], dtype=dtype)
    ref = torch.tensor([math.sqrt(v) for v in x.tolist()], dtype=torch.float64).to(dtype)
    # (for float32: math.sqrt in float64 rounded to float32 is the correctly rounded root)
    got = sqrt_(x.clone())
    assert torch.equal(got, ref)
    assert torch.equal(torch.signbit(got[:2]), torch.tensor([False, True]))
    buf = x.clone()
    out = sqrt_(buf[::3])  # a strided view, written in place
    assert torch.equal(out, ref[::3]) and torch.equal(buf[1::3], x[1::3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("epilogue", [1, 2, 3])
def test_fused_epilogue_keys_match_the_applied_epilogue(cpu_isa, dtype, epilogue):
    """The rank kernel's fused distance epilogue (the float rows have an AVX2 / AVX-512
    loop of their own) gives the ranks of the epilogue applied first: raw values on both
    sides of each clamp (below -||q||^2, above 1 for cosine, exactly at them), -0.0, +-Inf
    and NaN, at row lengths around the vector widths and a chunk edge."""
    from pyfici.ops.distance import apply_epilogue

    for G in (1, 7, 8, 15, 16, 17, 33, 2049):
        gen = torch.Generator().manual_seed(1000 * epilogue + G)
        Q = 5
        qn = (torch.rand(Q, generator=gen, dtype=torch.float64) * 2).to(dtype)
        if epilogue == 3:
            raw = torch.rand(Q, G, generator=gen, dtype=torch.float64) * 4 - 2  # 1 - raw in [-1, 3]
            raw[:, ::5] = 1.0  # a distance of exactly 0 (1 - 1)
            raw[:, 1::7] = -1.0  # exactly 2
        else:
            raw = torch.rand(Q, G, generator=gen, dtype=torch.float64) * 4 - 3  # raw + qn below and above 0
            raw[:, ::5] = -qn[:, None].to(torch.float64)  # exactly 0
        raw = raw.to(dtype)
        raw[:, 2::6] = -0.0
        raw[:, 3::11] = float("inf")
        raw[:, 4::13] = float("-inf")
        raw[1, ::3] = float("nan")
        ids = _ids(Q, G, max(2, G // 4), 3, gen)
        qn_arg = qn if epilogue != 3 else None
        for protocol in ("torchreid", "market1501"):
            kw = dict(protocol=protocol, check_finite_values=False)
            ref = reid_rank_stats(apply_epilogue(raw, epilogue, qn_arg), *ids, backend="torch", **kw)
            out = reid_rank_stats(raw, *ids, backend="cpu", epilogue=epilogue, q_norms=qn_arg, **kw)
            for a, b in zip(out, ref):
                assert torch.allclose(a, b, equal_nan=True, rtol=0, atol=1e-12), (cpu_isa, G, protocol)


@pytest.mark.parametrize("epilogue", [0, 1, 2, 3])
def test_finite_row_fast_path_and_its_exact_fallback(cpu_isa, epilogue):
    """float32 rows of finite values take a shorter key pass (no NaN fix, no count of
    non-finite values) and any chunk with a non-finite value, or a row whose query norm
    is not finite, is made again by the exact pass. Rows with a single NaN / +-Inf at a
    chunk's first or last vector, in the scalar tail, and finite rows with an infinite
    or NaN query norm rank as the epilogue applied first; the fused finiteness count
    is the number of non-finite raw values."""
    from pyfici.ops.distance import apply_epilogue

    Q, G = 8, 2 * 2048 + 21
    gen = torch.Generator().manual_seed(77 + epilogue)
    raw = torch.rand(Q, G, generator=gen) * 2 - (0.5 if epilogue == 3 else 1.0)
    raw[1, 2047] = float("nan")  # last vector of the first chunk
    raw[2, 2048] = float("inf")  # first vector of the second chunk
    raw[3, G - 1] = float("-inf")  # scalar tail
    raw[4, 0] = -float("nan")
    qn = torch.rand(Q, generator=gen) + 0.5
    qn[5] = float("inf")
    qn[6] = float("nan")
    ids = _ids(Q, G, 12, 3, gen)
    qn_arg = qn if epilogue in (1, 2) else None
    ref_dist = raw if epilogue == 0 else apply_epilogue(raw, epilogue, qn_arg)
    for protocol in ("torchreid", "market1501"):
        kw = dict(protocol=protocol, check_finite_values=False)
        ref = reid_rank_stats(ref_dist, *ids, backend="torch", **kw)
        out = reid_rank_stats(raw, *ids, backend="cpu", epilogue=epilogue, q_norms=qn_arg, **kw)
        for a, b in zip(out, ref):
            assert torch.allclose(a, b, equal_nan=True, rtol=0, atol=1e-12), (cpu_isa, protocol)
    # the kernel's fused count of non-finite raw values (what evaluate_distmat's check reads)
    from pyfici import _native

    for rows, want in (([0, 5, 6, 7], 0), (list(range(Q)), 4)):
        x = raw[rows].contiguous()
        q = [t[rows].contiguous() if i % 2 == 0 else t for i, t in enumerate(ids)]
        res = [torch.empty(len(rows), dtype=dt) for dt in (torch.float64, torch.int64, torch.float64, torch.int64)]
        qn_rows = qn[rows].contiguous()
        bad = torch.zeros(1, dtype=torch.int64)
        _native.cpu_module().reid_rank_stats(
            x.data_ptr(), _native.DTYPE_CODES[x.dtype], len(rows), G, x.stride(0),
            *(t.data_ptr() for t in q), True, True, *(r.data_ptr() for r in res), _native.num_threads(),
            epilogue, qn_rows.data_ptr() if qn_arg is not None else 0, 0, 0, 0, bad.data_ptr())
        assert int(bad) == want, (cpu_isa, epilogue, rows)
