"""k-reciprocal re-ranking: every backend vs the dense numpy reference
(pyfici.benchcases.rerank_numpy_reference) and a stored reference output."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HAS_CUDA, backends_for

import pyfici
from pyfici.benchcases import rerank_numpy_reference as npref
from pyfici.reid import evaluate, evaluate_distmat, rerank, rerank_distmat

ROOT = Path(__file__).resolve().parents[1]

DATA = ROOT / "tests" / "data" / "rerank_expected.npz"
TOL = 1e-5


def _clustered(Q, G, D, seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    n_id = max(1, (Q + G) // 6)
    c = rng.standard_normal((n_id, D))
    x = c[rng.integers(0, n_id, Q + G)] + 0.6 * rng.standard_normal((Q + G, D))
    return x[:Q].astype(dtype), x[Q:].astype(dtype)


def _dists(q, g):
    qq, gg = npref.pairwise_euclidean(q, q), npref.pairwise_euclidean(g, g)
    np.fill_diagonal(qq, 0.0)
    np.fill_diagonal(gg, 0.0)
    return npref.pairwise_euclidean(q, g), qq, gg


def assert_matches(ours, ref, tol=TOL, tie=1e-6):
    """Distances within tol and the same ranking of every row, except where
    the reference's own consecutive values are closer than ``tie``."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape
    if ours.size == 0:
        return
    assert np.abs(ours - ref).max() <= tol
    order = np.argsort(ref, axis=1, kind="stable")
    s = np.take_along_axis(ours, order, 1)
    gaps = np.diff(np.take_along_axis(ref, order, 1), axis=1)
    assert ((np.diff(s, axis=1) >= 0) | (gaps < tie)).all()


def _backends(device, tiny):
    out = ["torch"] + backends_for(device)
    if not tiny and not HAS_CUDA:
        out = [b for b in out if b != "triton"]  # the Triton interpreter is slow: tiny sizes only
    return out


PARAMS = [(20, 6, 0.3), (5, 1, 0.0), (3, 3, 1.0), (4, 7, 0.5), (1, 2, 0.3)]


@pytest.mark.parametrize("shape", [(1, 1), (1, 4), (3, 2), (5, 11), (13, 29), (31, 97), (60, 200)])
@pytest.mark.parametrize("params", PARAMS)
def test_distmat_matches_numpy_reference(device, shape, params):
    Q, G = shape
    k1, k2, lam = params
    q, g = _clustered(Q, G, 6, Q * 1000 + G)
    qg, qq, gg = _dists(q, g)
    ref = npref.re_ranking(qg, qq, gg, k1, k2, lam)
    tiny = Q + G <= 16
    for be in _backends(device, tiny):
        if be == "torch" and Q + G > 150 and params != PARAMS[0]:
            continue  # the dense torch reference is slow
        args = [torch.from_numpy(a).to(device) for a in (qg, qq, gg)]
        out = rerank_distmat(*args, k1, k2, lam, backend=be)
        assert out.dtype == torch.float32 and out.device.type == device
        assert_matches(out.cpu().numpy(), ref)


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
@pytest.mark.parametrize("shape", [(2, 3), (17, 43), (47, 151)])
def test_features_match_numpy_reference(device, metric, shape):
    Q, G = shape
    q, g = _clustered(Q, G, 9, Q + 7 * G)
    tq, tg = torch.from_numpy(q), torch.from_numpy(g)
    d = [pyfici.ops.reference.pairwise_distance(a, b, metric, s).numpy() for a, b, s in ((tq, tg, False), (tq, tq, True), (tg, tg, True))]
    ref = npref.re_ranking(*d)
    for be in _backends(device, Q + G <= 16):
        out = rerank(tq.to(device), tg.to(device), metric=metric, backend=be)
        assert_matches(out.cpu().numpy(), ref)


def test_float32_features_close_to_float32_distmat():
    q, g = _clustered(40, 120, 32, 5, np.float32)
    tq, tg = torch.from_numpy(q), torch.from_numpy(g)
    a = rerank(tq, tg).numpy()
    b = rerank_distmat(*_dists(q.astype(np.float64), g.astype(np.float64)))
    assert a.dtype == np.float32 and b.dtype == np.float32
    assert np.abs(a - b).max() < 1e-4


@pytest.mark.parametrize("tile", [1, 7, 64, None])
def test_tiles_do_not_change_the_result(tile):
    q, g = _clustered(23, 71, 8, 3)
    tq, tg = torch.from_numpy(q), torch.from_numpy(g)
    base = rerank(tq, tg, k1=6, k2=3)
    assert torch.equal(rerank(tq, tg, k1=6, k2=3, tile=tile), base)
    dm = [torch.from_numpy(a) for a in _dists(q, g)]
    base = rerank_distmat(*dm, 6, 3, 0.3)
    assert torch.equal(rerank_distmat(*dm, 6, 3, 0.3, tile=tile), base)
    assert torch.equal(rerank_distmat(*dm, 6, 3, 0.3), base)  # deterministic


def test_non_symmetric_distmat_follows_reference():
    rng = np.random.default_rng(11)
    Q, G = 9, 23
    qg, qq, gg = rng.random((Q, G)) + 0.1, rng.random((Q, Q)) + 0.1, rng.random((G, G)) + 0.1
    np.fill_diagonal(qq, 0.0)
    np.fill_diagonal(gg, 0.0)
    ref = npref.re_ranking(qg, qq, gg, 4, 3, 0.3)
    for be in ["torch"] + backends_for("cpu"):
        assert_matches(rerank_distmat(torch.from_numpy(qg), torch.from_numpy(qq), torch.from_numpy(gg), 4, 3, 0.3, backend=be).numpy(), ref)


def test_float32_distmat_and_numpy_io():
    q, g = _clustered(12, 40, 5, 8)
    qg, qq, gg = (a.astype(np.float32) for a in _dists(q, g))
    ref = npref.re_ranking(qg, qq, gg)
    out = rerank_distmat(qg, qq, gg)
    assert isinstance(out, np.ndarray)
    assert_matches(out, ref)


def test_stored_reference_output():
    z = np.load(DATA)
    q, g, k1, k2, lam = z["query"], z["gallery"], int(z["k1"]), int(z["k2"]), float(z["lambda_value"])
    for be in ["torch"] + backends_for("cpu"):
        if be == "triton":
            continue  # covered on tiny inputs above
        out = rerank(torch.from_numpy(q), torch.from_numpy(g), k1=k1, k2=k2, lambda_value=lam, backend=be)
        assert_matches(out.numpy(), z["expected"])


def test_empty_and_defaults():
    q = torch.randn(0, 4, dtype=torch.float64)
    g = torch.randn(5, 4, dtype=torch.float64)
    assert rerank(q, g).shape == (0, 5)
    assert rerank(g, q).shape == (5, 0)
    x = torch.randn(1, 3)
    out = rerank(x, x + 1)
    assert out.shape == (1, 1) and torch.isfinite(out).all()
    # all distances 0: the reference divides 0 by a zero row max (NaN); the native
    # backends refuse (tests/test_reid_numerics.py)
    assert torch.isnan(rerank(x, x, backend="torch")).all()
    with pytest.raises(ValueError, match="query / gallery: every feature is at distance 0"):
        rerank(x, x)


def test_evaluate_with_rerank():
    from pyfici.benchcases.rerank import features

    q, g = features(30, 120, 16, seed=2)
    gen = torch.Generator().manual_seed(0)
    q_p, g_p = torch.randint(0, 10, (30,), generator=gen), torch.randint(0, 10, (120,), generator=gen)
    q_c, g_c = torch.zeros(30, dtype=torch.long), torch.ones(120, dtype=torch.long)
    r = evaluate(q, g, q_p, g_p, q_c, g_c, rerank=True, max_rank=5)
    r2 = evaluate_distmat(rerank(q, g, metric="cosine"), q_p, g_p, q_c, g_c, max_rank=5)  # evaluate's default metric
    assert r.mAP == pytest.approx(r2.mAP)


def test_bad_inputs():
    q, g = torch.randn(4, 3), torch.randn(6, 3)
    with pytest.raises(ValueError, match="k1"):
        rerank(q, g, k1=0)
    with pytest.raises(ValueError, match="k2"):
        rerank(q, g, k2=0)
    with pytest.raises(ValueError, match="lambda_value"):
        rerank(q, g, lambda_value=1.5)
    with pytest.raises(ValueError, match="metric"):
        rerank(q, g, metric="manhattan")
    with pytest.raises(ValueError, match="gallery"):
        rerank(q, torch.randn(6, 4))
    with pytest.raises(ValueError, match="query"):
        rerank(torch.tensor([[float("nan"), 0.0, 0.0]]), g)
    with pytest.raises(TypeError, match="query"):
        rerank(torch.ones(4, 3, dtype=torch.long), g)
    with pytest.raises(ValueError, match="q_q"):
        rerank_distmat(torch.rand(4, 6), torch.rand(3, 3), torch.rand(6, 6))
    with pytest.raises(ValueError, match="g_g"):
        rerank_distmat(torch.rand(4, 6), torch.rand(4, 4), torch.rand(5, 6))
    with pytest.raises(ValueError, match="tile"):
        rerank(q, g, tile=0)
    with pytest.raises(ValueError, match="not implemented"):
        rerank(q, g, backend="cuda")


def test_custom_ops_opcheck_and_compile():
    from pyfici.ops import rerank as ops

    q, g = torch.randn(5, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    torch.library.opcheck(ops._rerank_op, (q, g, 4, 3, 0.3, "euclidean", "cpu", 0),
                          test_utils=("test_schema", "test_faketensor"))
    d = [torch.rand(5, 9), torch.rand(5, 5), torch.rand(9, 9)]
    torch.library.opcheck(ops._rerank_distmat_op, (*d, 4, 3, 0.3, "cpu", 0), test_utils=("test_schema", "test_faketensor"))
    f = torch.compile(lambda a, b: rerank(a, b, k1=4, k2=3), fullgraph=True)
    assert torch.equal(f(q, g), rerank(q, g, k1=4, k2=3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stacked_features_and_norms_are_the_same_on_every_cpu_variant(dtype):
    """The CPU path stacks query and gallery rows and sums their squares in one native
    pass, in one summation order on every variant: the copy is exact, the norms agree with
    torch's to rounding and are bit-identical between generic, AVX2 and AVX-512 (so the
    re-ranked distances do not depend on which variant the CPU picks). Strided inputs
    and row lengths around the 16-lane blocks."""
    from pyfici import _native
    from pyfici.ops.rerank import prepare_features

    gen = torch.Generator().manual_seed(4)
    for D in (1, 15, 16, 17, 100):
        q = torch.randn(7, 2 * D, generator=gen, dtype=dtype)[:, ::2]  # a row stride of 2 * D
        g = torch.randn(11, D, generator=gen, dtype=dtype)
        got = {}
        for isa in _native.CPU_ISAS_SUPPORTED:
            with _native.use_isa(isa):
                got[isa] = prepare_features(q, g, "euclidean")
        ref = torch.cat([q, g])
        for isa, (x, n) in got.items():
            assert torch.equal(x, ref), (isa, D)
            assert torch.allclose(n, (ref * ref).sum(1), rtol=1e-6 if dtype == torch.float32 else 1e-14, atol=0)
            first = next(iter(got.values()))[1]
            assert torch.equal(n, first), (isa, D)


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_cpu_backend_matches_reference_on_every_cpu_variant(cpu_isa, metric):
    """The CPU backend's scan (candidate pushes written for AVX2 / AVX-512) and its
    one-pass feature stacking, on each variant this machine runs, against the numpy
    reference, from features and from distance matrices; several panels (tile)."""
    for Q, G in ((17, 43), (40, 170)):
        q, g = _clustered(Q, G, 9, 3 * Q + G)
        tq, tg = torch.from_numpy(q), torch.from_numpy(g)
        d = [pyfici.ops.reference.pairwise_distance(a, b, metric, s).numpy()
             for a, b, s in ((tq, tg, False), (tq, tq, True), (tg, tg, True))]
        ref = npref.re_ranking(*d)
        assert_matches(rerank(tq, tg, metric=metric, backend="cpu", tile=32).numpy(), ref)
        assert_matches(rerank_distmat(*(torch.from_numpy(a) for a in d), 20, 6, 0.3, backend="cpu").numpy(), ref)


def test_conditioned_features_are_stacked_once():
    """rerank_features centres query and gallery straight into one [Q + G, D] buffer
    (condition_features(stacked=True)); the CPU path then uses that buffer as the stacked
    features (no second copy) with the same values and norms as separate tensors give."""
    from pyfici.ops.distance import condition_features
    from pyfici.ops.rerank import prepare_features

    gen = torch.Generator().manual_seed(9)
    q = torch.randn(13, 37, generator=gen) + 100.0
    g = torch.randn(29, 37, generator=gen) + 100.0
    a, b, e = condition_features(q, g, "euclidean")
    sa, sb, se = condition_features(q, g, "euclidean", stacked=True)
    assert e == se and torch.equal(a, sa) and torch.equal(b, sb)
    assert sb.data_ptr() == sa.data_ptr() + sa.numel() * sa.element_size()
    x, n = prepare_features(sa, sb, "euclidean")
    assert x.data_ptr() == sa.data_ptr() and torch.equal(x, torch.cat([a, b]))
    x2, n2 = prepare_features(a, b, "euclidean")  # separate tensors: copied
    assert x2.data_ptr() not in (a.data_ptr(), b.data_ptr()) and torch.equal(x2, x) and torch.equal(n2, n)
    assert torch.equal(q, torch.randn(13, 37, generator=torch.Generator().manual_seed(9)) + 100.0)  # input unchanged
