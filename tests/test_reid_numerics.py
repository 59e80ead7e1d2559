"""Numerics at the edges for the distance / ranking / re-ranking / evaluation
ops: every case gives the exact answer or a clear error, never a silent wrong
number. Cases that go through native code run in a subprocess, so a crash
fails the test instead of killing the run."""

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pyfici.ops import pairwise_distance, reid_rank_stats
from pyfici.reid import evaluate, evaluate_distmat, recall_at_k, rerank, rerank_distmat


def run_case(code: str) -> dict:
    """Run ``code`` (which prints one JSON line last) in a fresh interpreter."""
    src = "import json, torch, numpy as np\n" + textwrap.dedent(code)
    p = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"rc {p.returncode}\n{p.stdout}\n{p.stderr}"
    return json.loads(p.stdout.strip().splitlines()[-1])


def _ids(Q, G, n_ids, n_cams, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, n_ids, (Q,), generator=g), torch.randint(0, n_ids, (G,), generator=g),
            torch.randint(0, n_cams, (Q,), generator=g), torch.randint(0, n_cams, (G,), generator=g))


# ---------------------------------------------------------------------------
# overflow / underflow / offset: the exact answer
# ---------------------------------------------------------------------------


def test_evaluate_overflowing_squares_gives_the_float64_answer():
    out = run_case("""
        from pyfici.reid import evaluate, evaluate_distmat
        g = torch.Generator().manual_seed(3)
        q = torch.randn(40, 16, generator=g)
        gal = torch.randn(300, 16, generator=g)
        ids = (torch.randint(0, 8, (40,), generator=g), torch.randint(0, 8, (300,), generator=g),
               torch.randint(0, 3, (40,), generator=g), torch.randint(0, 3, (300,), generator=g))
        res = {}
        for metric in ("euclidean", "sqeuclidean", "cosine"):
            for protocol in ("torchreid", "market1501"):
                for s in (1e-20, 1.0, 1e20):
                    # finite float32; the squared norms overflow at 1e20 and underflow at 1e-20
                    qs, gs = q * s, gal * s
                    r = evaluate(qs, gs, *ids, metric=metric, protocol=protocol, max_rank=10)
                    q64, g64 = qs.double(), gs.double()
                    if metric == "cosine":
                        ref = 1 - (q64 / q64.norm(dim=1, keepdim=True)) @ (g64 / g64.norm(dim=1, keepdim=True)).T
                    else:
                        ref = torch.cdist(q64 / s, g64 / s)  # float64 direct: the ranking at scale s
                    e = evaluate_distmat(ref, *ids, protocol=protocol, max_rank=10, backend="torch")
                    res[f"{metric} {protocol} {s}"] = [r.mAP, e.mAP, r.mINP, e.mINP, r.cmc.tolist(), e.cmc.tolist()]
        print(json.dumps(res))
    """)
    assert len(out) == 18
    for case, (m, m_ref, inp, inp_ref, cmc, cmc_ref) in out.items():
        assert 0.0 <= m <= 1.0 and 0.0 <= inp <= 1.0, case
        assert m == pytest.approx(m_ref, abs=1e-12), case
        assert inp == pytest.approx(inp_ref, abs=1e-12), case
        assert cmc == pytest.approx(cmc_ref, abs=1e-12), case


def test_pairwise_distance_extreme_scales_match_cdist():
    out = run_case("""
        from pyfici.ops import pairwise_distance
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(9, 7, generator=g), torch.randn(11, 7, generator=g)
        res = {}
        for s in (1e-30, 1e-20, 1e20, 1e30):
            d = pairwise_distance(x * s, y * s, "euclidean", backend="cpu")
            ref = torch.cdist((x * s).double(), (y * s).double())
            d2 = pairwise_distance(x * s, y * s, "sqeuclidean", backend="cpu")
            res[str(s)] = [bool(torch.isfinite(d).all()), float(((d.double() - ref) / ref).abs().max()),
                           bool(torch.isnan(d2).any()), int(torch.isinf(d2).sum()),
                           int((ref * ref > torch.finfo(torch.float32).max).sum())]
        print(json.dumps(res))
    """)
    for s, (finite, rel, nan2, inf2, over2) in out.items():
        assert finite and rel < 1e-5, s
        assert not nan2, s
        assert inf2 == over2, s  # a squared distance above float32's range is inf, as its true value rounds


def test_pairwise_distance_far_from_origin_is_accurate():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 8, generator=g) + 1e6
    y = torch.randn(500, 8, generator=g) + 1e6
    ref = torch.cdist(x.double(), y.double())
    for be in ("cpu", "torch"):
        d = pairwise_distance(x, y, backend=be)
        assert (d.double() - ref).abs().max() < 1e-4, be
        assert torch.equal(d.argmin(1), ref.argmin(1)), be


def test_rerank_overflowing_features_no_nan_and_scale_invariant():
    out = run_case("""
        from pyfici.reid import rerank
        g = torch.Generator().manual_seed(2)
        q, gal = torch.randn(12, 6, generator=g), torch.randn(40, 6, generator=g)
        base = rerank(q, gal, k1=6, k2=3)
        res = {}
        for s in (2.0**-70, 2.0**70, 1e20, 1e-20):
            r = rerank(q * s, gal * s, k1=6, k2=3)
            res[str(s)] = [int(torch.isnan(r).sum()), float((r - base).abs().max())]
        rd = rerank(q + 1e5, gal + 1e5, k1=6, k2=3)
        res["offset"] = [int(torch.isnan(rd).sum()), 0.0]
        print(json.dumps(res))
    """)
    for s, (nan, diff) in out.items():
        assert nan == 0, s
        assert diff < 1e-4, s


def test_rerank_features_of_any_scale_in_every_dtype_and_metric():
    # the reference squares the distances in float32: float32 sqeuclidean features of
    # 2**30 overflowed there (NaN rows; from 2**35 the CPU kernel read unset candidate
    # entries and crashed), float64 features of 2**-60 squared to 0 (all NaN). Powers
    # of two scale every distance exactly, so the result must not change at all.
    out = run_case("""
        from pyfici.reid import rerank
        g = torch.Generator().manual_seed(5)
        res = {}
        for dt in (torch.float32, torch.float64):
            q = torch.randn(12, 6, generator=g, dtype=dt)
            gal = torch.randn(40, 6, generator=g, dtype=dt)
            for metric in ("euclidean", "sqeuclidean", "cosine"):
                for be in ("cpu", "torch"):
                    base = rerank(q, gal, k1=6, k2=3, metric=metric, backend=be)
                    exps = (-100, -60, -30, 30, 35, 39, 60, 100) + ((-300, 300) if dt == torch.float64 else ())
                    for e in exps:
                        r = rerank(q * 2.0**e, gal * 2.0**e, k1=6, k2=3, metric=metric, backend=be)
                        res[f"{dt} {metric} {be} 2**{e}"] = [int(torch.isnan(r).sum()), float((r - base).abs().max())]
        print(json.dumps(res))
    """)
    assert len(out) == 2 * 3 * 2 * 8 + 3 * 2 * 2
    for case, (nan, diff) in out.items():
        assert nan == 0, case
        assert diff <= (2e-7 if "cosine" in case else 0.0), case


@pytest.mark.parametrize("scale", [1e-30, 1e-200, 1e30, 1e200])
def test_rerank_distmat_float64_distances_outside_the_float32_range(scale):
    g = torch.Generator().manual_seed(6)
    q, gal = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(20, 5, generator=g, dtype=torch.float64)
    d = [torch.cdist(a, b) for a, b in ((q, gal), (q, q), (gal, gal))]
    for be in ("cpu", "torch"):
        base = rerank_distmat(*d, k1=5, k2=2, backend=be)
        r = rerank_distmat(*[t * scale for t in d], k1=5, k2=2, backend=be)
        assert not torch.isnan(r).any(), be
        assert (r - base).abs().max() < 1e-6, be


def test_rerank_scan_guard_raises_instead_of_reading_unset_candidates():
    from pyfici.ops.rerank import _check_scan

    _check_scan(torch.full((4,), 3, dtype=torch.int32), torch.ones(4), 3, "features")
    with pytest.raises(ValueError, match="not finite in float32"):
        _check_scan(torch.tensor([3, 2, 3], dtype=torch.int32), torch.ones(3), 3, "features")
    with pytest.raises(ValueError, match="not finite in float32"):
        _check_scan(torch.full((3,), 3, dtype=torch.int32), torch.tensor([1.0, float("inf"), 1.0]), 3, "distmat")


def test_rerank_distmat_large_distances_no_nan():
    g = torch.Generator().manual_seed(4)
    q, gal = torch.randn(8, 5, generator=g), torch.randn(20, 5, generator=g)
    d = [torch.cdist(a, b) for a, b in ((q, gal), (q, q), (gal, gal))]
    base = rerank_distmat(*d, k1=5, k2=2)
    big = rerank_distmat(*[t * 1e25 for t in d], k1=5, k2=2)
    assert not torch.isnan(big).any()
    assert (big - base).abs().max() < 1e-5


# ---------------------------------------------------------------------------
# NaN never counts as a match or a rank
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["torchreid", "market1501"])
def test_rank_kernel_puts_nan_after_every_number(protocol):
    out = run_case(f"""
        from pyfici.ops import reid_rank_stats
        g = torch.Generator().manual_seed(5)
        Q, G = 13, 401
        d = torch.rand(Q, G, generator=g)
        d[torch.rand(Q, G, generator=g) < 0.2] = float("nan")
        d[0, :] = float("nan")
        ids = (torch.randint(0, 6, (Q,), generator=g), torch.randint(-1, 6, (G,), generator=g),
               torch.randint(0, 3, (Q,), generator=g), torch.randint(0, 3, (G,), generator=g))
        a = reid_rank_stats(d, *ids, protocol="{protocol}", check_finite_values=False, backend="cpu")
        b = reid_rank_stats(d, *ids, protocol="{protocol}", check_finite_values=False, backend="torch")
        ok = all(torch.allclose(x.double(), y.double(), equal_nan=True, rtol=0, atol=1e-12) for x, y in zip(a, b))
        print(json.dumps([ok, float(a[0].nan_to_num(0).max()), float(a[2].nan_to_num(0).max())]))
    """)
    ok, ap_max, inp_max = out
    assert ok
    assert ap_max <= 1.0 and inp_max <= 1.0


@pytest.mark.parametrize("protocol", ["torchreid", "market1501"])
def test_every_rank_backend_puts_nan_after_every_number(device, protocol):
    """The GPU kernels (CUDA, Triton: on the CPU under TRITON_INTERPRET=1) rank a NaN
    distance after every number, +inf included, NaNs among themselves by index: the
    CPU kernel's and the torch reference's order. A row of NaN only (row 0) must not
    score AP 1 (NaN matches once ranked before every number there)."""
    from conftest import backends_for

    backends = [b for b in backends_for(device) if b != "cpu"]
    if not backends:
        pytest.skip(f"no GPU-kernel backend runs on {device} here")
    out = run_case(f"""
        from pyfici.ops import reid_rank_stats
        res = []
        for seed in (5, 6):
            g = torch.Generator().manual_seed(seed)
            Q, G = 6, 97
            d = torch.rand(Q, G, generator=g)
            d[torch.rand(Q, G, generator=g) < 0.2] = float("nan")
            d[0, :] = float("nan")
            d[1, ::7] = float("inf")
            ids = (torch.randint(0, 6, (Q,), generator=g), torch.randint(-1, 6, (G,), generator=g),
                   torch.randint(0, 3, (Q,), generator=g), torch.randint(0, 3, (G,), generator=g))
            ref = reid_rank_stats(d, *ids, protocol="{protocol}", check_finite_values=False, backend="torch")
            for be in {backends!r}:
                dv = d.to("{device}")
                a = reid_rank_stats(dv, *(t.to("{device}") for t in ids), protocol="{protocol}",
                                    check_finite_values=False, backend=be)
                res.append([be, all(torch.allclose(x.cpu().double(), y.double(), equal_nan=True, rtol=0, atol=1e-12)
                                    for x, y in zip(a, ref)), float(ref[0][0]), float(a[0][0].cpu())])
        print(json.dumps(res))
    """)
    for be, ok, ref_ap0, ap0 in out:
        assert ok, (be, device, protocol)
        assert ref_ap0 < 1.0 and abs(ap0 - ref_ap0) <= 1e-12


def test_nan_distmat_raises_by_default():
    d = torch.rand(3, 5)
    d[1, 2] = float("nan")
    ids = _ids(3, 5, 2, 2, 0)
    with pytest.raises(ValueError, match="distmat: contains non-finite"):
        evaluate_distmat(d, *ids, max_rank=5)
    with pytest.raises(ValueError, match="distmat: contains non-finite"):
        reid_rank_stats(d, *ids)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_features_raise(bad):
    x = torch.randn(4, 3)
    x[2, 1] = bad
    y = torch.randn(5, 3)
    with pytest.raises(ValueError, match="x: contains non-finite values"):
        pairwise_distance(x, y)
    with pytest.raises(ValueError, match="y: contains non-finite values"):
        pairwise_distance(y, x)
    with pytest.raises(ValueError, match="query: contains non-finite values"):
        evaluate(x, y, *_ids(4, 5, 2, 2, 1))
    with pytest.raises(ValueError, match="gallery: contains non-finite values"):
        rerank(y, x)


# ---------------------------------------------------------------------------
# ids: integral values only
# ---------------------------------------------------------------------------


def test_fractional_float_labels_raise_instead_of_merging():
    f = torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"labels: ids must be integers.*0\.5 at index 1"):
        recall_at_k(f, torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 2.5]), ks=(1, 5))
    # integral floats are fine and equal to the int64 labels
    lab = torch.tensor([0, 0, 1, 1, 2, 2])
    assert recall_at_k(f, lab.double(), ks=(1, 5)) == recall_at_k(f, lab, ks=(1, 5))


@pytest.mark.parametrize("which", range(4))
def test_fractional_pids_and_camids_raise(which):
    Q, G = 4, 9
    ids = [t.double() for t in _ids(Q, G, 3, 2, 2)]
    ids[which][1] += 0.25
    names = ["q_pids", "g_pids", "q_camids", "g_camids"]
    d = torch.rand(Q, G)
    for fn in (lambda: evaluate_distmat(d, *ids, max_rank=5),
               lambda: evaluate(torch.randn(Q, 3), torch.randn(G, 3), *ids, max_rank=5),
               lambda: reid_rank_stats(d, *ids)):
        with pytest.raises(ValueError, match=f"{names[which]}: ids must be integers"):
            fn()
    ids[which][1] = float("nan")
    with pytest.raises(ValueError, match=f"{names[which]}: ids must be integers"):
        evaluate_distmat(d, *ids, max_rank=5)


def test_numpy_float_ids_accepted_when_integral():
    Q, G = 5, 30
    ids = _ids(Q, G, 4, 2, 3)
    d = torch.rand(Q, G)
    a = evaluate_distmat(d, *ids, max_rank=5)
    b = evaluate_distmat(d.numpy(), *[t.numpy().astype(np.float32) for t in ids], max_rank=5)
    assert a.mAP == b.mAP and torch.equal(a.cmc, b.cmc)


# ---------------------------------------------------------------------------
# requires_grad and meta tensors
# ---------------------------------------------------------------------------


def test_requires_grad_ops_raise_at_the_call_and_evaluation_detaches():
    q = torch.randn(6, 4, requires_grad=True)
    g = torch.randn(20, 4)
    with pytest.raises(ValueError, match="x: requires grad, but pairwise_distance is not differentiable"):
        pairwise_distance(q, g)
    with torch.no_grad():
        assert pairwise_distance(q, g).shape == (6, 20)
    from pyfici.ops.rerank import rerank_features

    with pytest.raises(ValueError, match="query: requires grad, but rerank_features"):
        rerank_features(q, g)
    d = torch.rand(6, 20, requires_grad=True)
    with pytest.raises(ValueError, match="distmat: requires grad"):
        reid_rank_stats(d, *_ids(6, 20, 3, 2, 4))
    # evaluation functions give the same numbers with or without grad (inputs are detached)
    ids = _ids(6, 20, 3, 2, 4)
    a = evaluate(q, g, *ids, max_rank=5)
    b = evaluate(q.detach(), g, *ids, max_rank=5)
    assert a.mAP == b.mAP
    assert evaluate_distmat(d, *ids, max_rank=5).mAP == evaluate_distmat(d.detach(), *ids, max_rank=5).mAP
    assert torch.equal(rerank(q, g, k1=4, k2=2), rerank(q.detach(), g, k1=4, k2=2))
    assert recall_at_k(q, ids[0], ks=(1,)) == recall_at_k(q.detach(), ids[0], ks=(1,))


def test_meta_tensors_raise_clearly():
    m = torch.empty(4, 3, device="meta")
    g = torch.empty(7, 3, device="meta")
    ids = [t.to("meta") for t in _ids(4, 7, 2, 2, 5)]
    for fn in (lambda: pairwise_distance(m, g), lambda: evaluate(m, g, *ids),
               lambda: evaluate_distmat(torch.empty(4, 7, device="meta"), *ids),
               lambda: recall_at_k(m, ids[0]), lambda: rerank(m, g),
               lambda: reid_rank_stats(torch.empty(4, 7, device="meta"), *ids)):
        with pytest.raises(ValueError, match="meta"):
            fn()


# ---------------------------------------------------------------------------
# property tests against float64 direct references
# ---------------------------------------------------------------------------

_EPS32 = float(torch.finfo(torch.float32).eps)
_TINY32 = float(torch.finfo(torch.float32).smallest_normal)


def _features(seed, m, n, d, log_scale, offset):
    g = torch.Generator().manual_seed(seed)
    s = 10.0**log_scale
    x = ((torch.randn(m, d, generator=g, dtype=torch.float64) + offset) * s).float()
    y = ((torch.randn(n, d, generator=g, dtype=torch.float64) + offset) * s).float()
    return x, y


_shapes = st.tuples(st.integers(1, 9), st.integers(1, 23), st.integers(1, 17))
_offsets = st.sampled_from([0.0, 1.0, 37.0, 1e3, 1e6, -1e6])
_settings = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_settings
@given(seed=st.integers(0, 2**31 - 1), shape=_shapes, log_scale=st.integers(-20, 20), offset=_offsets,
       metric=st.sampled_from(["euclidean", "sqeuclidean", "cosine"]))
def test_property_pairwise_distance_vs_float64_direct(seed, shape, log_scale, offset, metric):
    m, n, d = shape
    x, y = _features(seed, m, n, d, log_scale, offset)
    x64, y64 = x.double(), y.double()
    got = pairwise_distance(x, y, metric, backend="cpu").double()
    if metric == "cosine":
        xn, yn = x64 / x64.norm(dim=1, keepdim=True), y64 / y64.norm(dim=1, keepdim=True)
        ref = (1 - xn @ yn.T).clamp(0, 2)
        assert (got - ref).abs().max() <= 8 * d * _EPS32
        return
    ref2 = torch.cdist(x64, y64) ** 2  # direct, float64
    c = y64.mean(0)
    # expansion error on centred features: a few ulps of the centred squared norms
    bound2 = 4 * (d + 2) * _EPS32 * (((x64 - c) ** 2).sum(1)[:, None] + ((y64 - c) ** 2).sum(1)[None, :])
    if metric == "sqeuclidean":
        over = ref2 > float(torch.finfo(torch.float32).max) * (1 - 1e-5)
        assert torch.isinf(got[over]).all()
        ok = ~over
        assert ((got - ref2).abs()[ok] <= bound2[ok] * (1 + 1e-6) + 64 * _TINY32 * _EPS32).all()
    else:
        ref = ref2.sqrt()
        assert torch.isfinite(got).all()
        assert ((got - ref).abs() <= bound2.sqrt() * 1.01 + 64 * _TINY32 * _EPS32).all()


@_settings
@given(seed=st.integers(0, 2**31 - 1), q=st.integers(1, 9), gsize=st.integers(2, 41), d=st.integers(2, 12),
       log_scale=st.integers(-20, 20), offset=_offsets, metric=st.sampled_from(["euclidean", "sqeuclidean"]),
       protocol=st.sampled_from(["torchreid", "market1501"]))
def test_property_evaluate_vs_float64_direct(seed, q, gsize, d, log_scale, offset, metric, protocol):
    x, y = _features(seed, q, gsize, d, log_scale, offset)
    ref = torch.cdist(x.double(), y.double())
    srt = ref.sort(1).values
    gaps = (srt[:, 1:] - srt[:, :-1]) / srt[:, 1:].clamp_min(1e-300)
    assume(bool((gaps > 1e-4).all()))  # no near-ties: the float32 ranking is then the exact one
    ids = _ids(q, gsize, 3, 2, seed % 1000)
    assume(bool(((ids[1][None, :] == ids[0][:, None]) & (ids[3][None, :] != ids[2][:, None])).any()))
    got = evaluate(x, y, *ids, metric=metric, protocol=protocol, max_rank=gsize)
    exp = evaluate_distmat(ref, *ids, protocol=protocol, max_rank=gsize, backend="torch")
    assert got.mAP == pytest.approx(exp.mAP, abs=1e-12)
    assert got.mINP == pytest.approx(exp.mINP, abs=1e-12)
    assert torch.allclose(got.cmc, exp.cmc, atol=1e-12)
    assert 0 <= got.mAP <= 1 and not math.isnan(got.mAP)


def test_cosine_of_rows_just_above_the_rescaling_threshold():
    # found by the property test above: a float32 row of magnitude 1e-12 (just above the old
    # 2**-40 rescaling threshold) met the 1e-12 norm clamp and its cosine to itself was 1.5e-6
    for dtype, v in ((torch.float32, -1e-12), (torch.float32, 9.5e-13), (torch.float64, 1e-15)):
        x = torch.tensor([[v]], dtype=dtype)
        assert float(pairwise_distance(x, x, "cosine", backend="cpu")) <= 4 * torch.finfo(dtype).eps, (dtype, v)
        y = torch.tensor([[v, 2 * v]], dtype=dtype)
        z = torch.tensor([[2 * v, v]], dtype=dtype)
        want = 1 - 4 / 5  # cos = (2 + 2) / 5
        assert abs(float(pairwise_distance(y, z, "cosine", backend="cpu")) - want) <= 8 * torch.finfo(dtype).eps


def test_rerank_of_identical_features_raises_instead_of_nan():
    # every distance 0: each graph column is divided by its maximum (0 / 0)
    same = torch.ones(3, 4), torch.ones(5, 4)
    for metric in ("euclidean", "cosine"):
        with pytest.raises(ValueError, match="query / gallery: every feature is at distance 0"):
            rerank(*same, metric=metric, backend="cpu")
    with pytest.raises(ValueError, match="query / gallery: every feature is at distance 0"):
        rerank(torch.ones(3, 4) * torch.arange(1.0, 4.0)[:, None], torch.ones(5, 4), metric="cosine", backend="cpu")
    with pytest.raises(ValueError, match="q_g / q_q / g_g: an item is at distance 0 from every item"):
        rerank_distmat(torch.zeros(3, 5), torch.zeros(3, 3), torch.zeros(5, 5), backend="cpu")
    # the reference (numpy's code, the torch backend) gives NaN there
    assert torch.isnan(rerank(*same, backend="torch")).all()
    # one duplicate pair is fine
    q, g = torch.randn(3, 4), torch.randn(5, 4)
    g[2] = q[0]
    assert not torch.isnan(rerank(q, g, backend="cpu")).any()
