"""pyfici.compat.fastreid against fast-reid's own code: its Cython evaluator and
ROC (compiled from the sources in the ``fastreid`` wheel) and its AQE."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from pyfici.benchcases.reid import fastreid_cython
from pyfici.compat import fastreid as fr


@pytest.fixture(scope="module")
def rank_cy():
    mod, why = fastreid_cython("rank_cy")
    if mod is None:
        pytest.skip(why)
    return mod


@pytest.fixture(scope="module")
def roc_cy():
    mod, why = fastreid_cython("roc_cy")
    if mod is None:
        pytest.skip(why)
    return mod


def _ids(Q, G, n_ids, n_cams, seed):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, n_ids, Q), rng.integers(0, n_ids, G), rng.integers(0, n_cams, Q), rng.integers(0, n_cams, G))


def _distmats(Q, G, seed):
    rng = np.random.default_rng(seed)
    yield "random", rng.random((Q, G)).astype(np.float32)
    yield "float64", rng.random((Q, G))  # cast to float32 by both
    yield "ties", (np.rint(rng.random((Q, G)) * 7) / 7).astype(np.float32)  # matches tie with non-matches
    yield "all equal", np.ones((Q, G), dtype=np.float32)
    x = rng.standard_normal((Q, 8)).astype(np.float32)
    y = rng.standard_normal((G, 8)).astype(np.float32)
    yield "features", np.sqrt(((x[:, None] - y[None]) ** 2).sum(-1))


@pytest.mark.parametrize("shape", [(1, 60), (17, 97), (40, 1013), (5, 300)])
def test_evaluate_rank_bit_identical_to_fastreid_cython(rank_cy, shape):
    Q, G = shape
    ids = _ids(Q, G, 6, 3, Q + G)
    for what, d in _distmats(Q, G, G):
        ref_cmc, ref_ap, ref_inp = rank_cy.evaluate_cy(d, *ids, 50, False)
        cmc, ap, inp = fr.evaluate_rank(d, *ids, max_rank=50)
        assert cmc.dtype == np.float32 and ap.dtype == np.float32 and inp.dtype == np.float32
        np.testing.assert_array_equal(cmc, ref_cmc, err_msg=what)
        np.testing.assert_array_equal(ap, ref_ap, err_msg=what)
        np.testing.assert_array_equal(inp, ref_inp, err_msg=what)


def test_evaluate_rank_many_matches_per_query(rank_cy):
    # more than 256 matches per query takes the kernel's sort path
    Q, G = 4, 1500
    ids = _ids(Q, G, 2, 2, 7)
    for what, d in _distmats(Q, G, 3):
        ref = rank_cy.evaluate_cy(d, *ids, 20, False)
        ours = fr.evaluate_rank(d, *ids, max_rank=20)
        for a, b in zip(ours, ref):
            np.testing.assert_array_equal(a, b, err_msg=what)


def test_evaluate_rank_tensors_and_no_valid_query(rank_cy):
    Q, G = 6, 80
    ids = _ids(Q, G, 5, 2, 1)
    d = np.random.default_rng(0).random((Q, G)).astype(np.float32)
    a = fr.evaluate_rank(torch.from_numpy(d), *[torch.from_numpy(t) for t in ids], max_rank=10)
    b = rank_cy.evaluate_cy(d, *ids, 10, False)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="no valid query"):
        fr.evaluate_rank(d, np.full(Q, 99), ids[1], ids[2], ids[3])


def test_cuhk03_map_matches_fastreid(rank_cy):
    Q, G = 12, 200
    ids = _ids(Q, G, 10, 2, 4)
    d = np.random.default_rng(5).random((Q, G)).astype(np.float32)
    _, ref_map = rank_cy.evaluate_cy(d, *ids, 10, True)
    cmc, m = fr.evaluate_rank(d, *ids, max_rank=10, use_metric_cuhk03=True)
    assert m == float(np.float32(ref_map))
    assert cmc.shape == (10,) and cmc.dtype == np.float32


@pytest.mark.parametrize("seed", range(3))
def test_evaluate_roc_identical_to_fastreid(roc_cy, seed):
    Q, G = 13, 211
    ids = _ids(Q, G, 5, 3, seed)
    for what, d in _distmats(Q, G, seed):
        d = np.ascontiguousarray(d, dtype=np.float32)
        ref_s, ref_l = roc_cy.evaluate_roc_cy(d, *ids)
        s, lab = fr.evaluate_roc(d, *ids)
        np.testing.assert_array_equal(s, ref_s, err_msg=what)
        np.testing.assert_array_equal(lab, ref_l, err_msg=what)


def test_roc_curve_and_tpr_at_fpr_match_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    Q, G = 30, 400
    ids = _ids(Q, G, 8, 3, 2)
    for d in (rng.random((Q, G)).astype(np.float32), (np.rint(rng.random((Q, G)) * 50) / 50).astype(np.float32)):
        scores, labels = fr.evaluate_roc(d, *ids)
        f, t, thr = fr.roc_curve(labels, scores)
        rf, rt, rthr = metrics.roc_curve(labels, scores)
        np.testing.assert_array_equal(f, rf)
        np.testing.assert_array_equal(t, rt)
        np.testing.assert_array_equal(thr[1:], rthr[1:])
        got = fr.tpr_at_fpr(d, *ids)
        for x in (1e-4, 1e-3, 1e-2):
            assert got[x] == float(rt[np.argmin(np.abs(rf - x))])


def _fastreid_aqe():
    spec = importlib.util.find_spec("fastreid")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("fastreid is not installed (pip install --no-deps fastreid)")
    path = Path(list(spec.submodule_search_locations)[0]) / "evaluation" / "query_expansion.py"
    s = importlib.util.spec_from_file_location("_fastreid_query_expansion", path)
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    return mod.aqe


@pytest.mark.parametrize("args", [(1, 10, 3.0), (2, 5, 3.0), (1, 1, 1.0), (3, 7, 2.0)])
def test_aqe_matches_fastreid(args):
    ref_aqe = _fastreid_aqe()
    qe_times, qe_k, alpha = args
    g = torch.Generator().manual_seed(qe_k)
    q = torch.randn(23, 16, generator=g)
    gal = torch.randn(71, 16, generator=g)
    rq, rg = ref_aqe(q.clone(), gal.clone(), qe_times, qe_k, alpha)
    for tile in (None, 5):
        oq, og = fr.aqe(q, gal, qe_times, qe_k, alpha) if tile is None else \
            __import__("pyfici.reid", fromlist=["x"]).average_query_expansion(
                q, gal, qe_times=qe_times, qe_k=qe_k, alpha=alpha, tile=tile)
        assert oq.shape == rq.shape and og.shape == rg.shape
        torch.testing.assert_close(oq, rq.float(), rtol=1e-5, atol=1e-6, equal_nan=True)
        torch.testing.assert_close(og, rg.float(), rtol=1e-5, atol=1e-6, equal_nan=True)


def test_aqe_bad_arguments():
    from pyfici.reid import average_query_expansion

    q, g = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="qe_k: must be <="):
        average_query_expansion(q, g, qe_k=9)
    with pytest.raises(ValueError, match="gallery: feature dimension"):
        average_query_expansion(q, torch.randn(5, 3))
    with pytest.raises(ValueError, match="qe_k: must be >= 1"):
        average_query_expansion(q, g, qe_k=0)


@pytest.mark.parametrize("dtype,exps", [(torch.float32, (-100, -60, 60, 100)), (torch.float64, (-1000, 1000))])
def test_aqe_of_any_scale(dtype, exps):
    # the expansion is linear in the features: F.normalize's 1e-12 clamp (features of
    # 2**-60) and float32 squares (2**100) made every expanded feature 0
    from pyfici.reid import average_query_expansion

    g = torch.Generator().manual_seed(3)
    q, gal = torch.randn(10, 6, generator=g, dtype=dtype), torch.randn(30, 6, generator=g, dtype=dtype)
    bq, bg = average_query_expansion(q, gal)
    for e in exps:
        s = 2.0**e
        rq, rg = average_query_expansion(q * s, gal * s)
        for r, b in ((rq, bq), (rg, bg)):
            rel = ((r.double() / s - b.double()).abs().max() / b.double().abs().max()).item()
            assert rel < (1e-6 if dtype == torch.float32 else 1e-14), (e, rel)
