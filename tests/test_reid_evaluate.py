import numpy as np
import pytest
import torch
from conftest import backends_for
from reid_reference import market_official_ap, torchreid_eval

from pyfici.compat.torchreid import evaluate_rank
from pyfici.reid import evaluate, evaluate_distmat, recall_at_k


def _data(Q, G, D, n_ids, n_cams, seed, minus1=False):
    rng = np.random.default_rng(seed)
    q_pids = rng.integers(0, n_ids, Q)
    g_pids = rng.integers(-1 if minus1 else 0, n_ids, G)
    q_cams = rng.integers(0, n_cams, Q)
    g_cams = rng.integers(0, n_cams, G)
    qf = rng.standard_normal((Q, D)).astype(np.float32)
    gf = rng.standard_normal((G, D)).astype(np.float32)
    return qf, gf, q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("shape", [(2, 60), (17, 97), (23, 1013)])
def test_evaluate_distmat_matches_numpy_torchreid(shape):
    Q, G = shape
    _, _, qp, gp, qc, gc = _data(Q, G, 4, 7, 3, seed=Q)
    dist = np.random.default_rng(G).random((Q, G))
    cmc_ref, map_ref, minp_ref, nv = torchreid_eval(dist, qp, gp, qc, gc, 50)
    for be in backends_for("cpu") + ["torch"]:
        r = evaluate_distmat(dist, qp, gp, qc, gc, max_rank=50, backend=be, protocol="torchreid") if G >= 50 else None
        if r is None:
            with pytest.warns(UserWarning, match="max_rank"):
                r = evaluate_distmat(dist, qp, gp, qc, gc, max_rank=50, backend=be, protocol="torchreid")
        assert r.num_valid == nv
        np.testing.assert_allclose(r.cmc.numpy(), cmc_ref, atol=1e-12)
        assert r.mAP == pytest.approx(map_ref, abs=1e-12)
        assert r.mINP == pytest.approx(minp_ref, abs=1e-12)


def test_market_protocol_matches_official_compute_ap():
    _, _, qp, gp, qc, gc = _data(29, 401, 4, 9, 4, seed=5, minus1=True)
    dist = np.random.default_rng(1).random((29, 401))
    map_ref, nv = market_official_ap(dist, qp, gp, qc, gc)
    for be in backends_for("cpu") + ["torch"]:
        r = evaluate_distmat(dist, qp, gp, qc, gc, protocol="market1501", backend=be)
        assert r.num_valid == nv
        assert r.mAP == pytest.approx(map_ref, abs=1e-12)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_evaluate_from_features_equals_from_distmat(metric):
    qf, gf, qp, gp, qc, gc = _data(61, 389, 24, 11, 3, seed=2)
    from pyfici.ops import pairwise_distance

    dist = pairwise_distance(torch.from_numpy(qf), torch.from_numpy(gf), metric, backend="cpu")
    a = evaluate_distmat(dist, qp, gp, qc, gc, max_rank=20)
    for tile in (1, 7, 1000):
        b = evaluate(qf, gf, qp, gp, qc, gc, metric=metric, max_rank=20, tile=tile)
        assert torch.equal(a.cmc, b.cmc)
        assert a.mAP == pytest.approx(b.mAP, abs=1e-12)
        assert a.num_valid == b.num_valid


def test_triton_backend_evaluate_matches_cpu():
    pytest.importorskip("triton")
    qf, gf, qp, gp, qc, gc = _data(9, 140, 16, 5, 3, seed=9)
    a = evaluate(qf, gf, qp, gp, qc, gc, max_rank=10, backend="cpu")
    b = evaluate(qf, gf, qp, gp, qc, gc, max_rank=10, backend="triton")
    assert torch.allclose(a.cmc, b.cmc)
    assert a.mAP == pytest.approx(b.mAP, abs=1e-6)


def test_cuhk03_protocol_single_shot():
    _, _, qp, gp, qc, gc = _data(31, 300, 4, 10, 2, seed=4)
    dist = np.random.default_rng(2).random((31, 300))
    r1 = evaluate_distmat(dist, qp, gp, qc, gc, protocol="cuhk03", max_rank=10)
    r2 = evaluate_distmat(dist, qp, gp, qc, gc, protocol="cuhk03", max_rank=10)
    assert torch.equal(r1.cmc, r2.cmc)  # deterministic for a seed
    r3 = evaluate_distmat(dist, qp, gp, qc, gc, protocol="cuhk03", max_rank=10, seed=1)
    assert not torch.equal(r1.cmc, r3.cmc)
    full = evaluate_distmat(dist, qp, gp, qc, gc, protocol="torchreid", max_rank=10)
    assert r1.mAP == pytest.approx(full.mAP)  # AP on the full valid gallery, as torchreid
    # 10 identities: the sampled match is always within the top 10 sampled items
    assert r1.cmc[9] == pytest.approx(1.0)
    assert (torch.diff(r1.cmc) >= 0).all()


def test_cuhk03_single_identity_sample_brute_force():
    # gallery where each identity has exactly one valid sample: cuhk03 CMC == torchreid CMC
    rng = np.random.default_rng(0)
    G = 40
    gp = np.arange(G)
    gc = np.ones(G, dtype=int)
    qp = rng.integers(0, G, 12)
    qc = np.zeros(12, dtype=int)
    dist = rng.random((12, G))
    a = evaluate_distmat(dist, qp, gp, qc, gc, protocol="cuhk03", max_rank=10)
    b = evaluate_distmat(dist, qp, gp, qc, gc, protocol="torchreid", max_rank=10)
    assert torch.allclose(a.cmc, b.cmc)


def test_compat_evaluate_rank_signature():
    _, _, qp, gp, qc, gc = _data(20, 200, 4, 8, 3, seed=3)
    dist = np.random.default_rng(3).random((20, 200)).astype(np.float32)
    cmc, mAP = evaluate_rank(dist, qp, gp, qc, gc, max_rank=10, use_metric_cuhk03=False, use_cython=True)
    cmc_ref, map_ref, _, _ = torchreid_eval(dist, qp, gp, qc, gc, 10)
    assert cmc.dtype == np.float32 and cmc.shape == (10,)
    np.testing.assert_allclose(cmc, cmc_ref, atol=1e-6)
    assert mAP == pytest.approx(map_ref, abs=1e-6)


def _recall_brute(feats, labels, ks):
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    sim = f @ f.T
    np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")
    out = {}
    for k in ks:
        hit = [(labels[order[i, :k]] == labels[i]).any() for i in range(len(labels))]
        out[k] = float(np.mean(hit))
    return out


def test_recall_at_k_matches_brute_force():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((211, 8)).astype(np.float64)
    labels = rng.integers(0, 30, 211)
    ks = (1, 2, 4, 8, 16, 32)
    ref = _recall_brute(feats, labels, ks)
    for be in backends_for("cpu") + ["torch"]:
        got = recall_at_k(torch.from_numpy(feats), labels, ks, backend=be, tile=50)
        for k in ks:
            assert got[k] == pytest.approx(ref[k]), (be, k)


def test_evaluate_bad_input_messages():
    qf, gf, qp, gp, qc, gc = _data(5, 20, 4, 3, 2, seed=0)
    with pytest.raises(ValueError, match="gallery: feature dimension"):
        evaluate(qf, gf[:, :3], qp, gp, qc, gc)
    with pytest.raises(ValueError, match="g_pids: expected a 1-d array of length 20"):
        evaluate(qf, gf, qp, gp[:5], qc, gc)
    with pytest.raises(ValueError, match="max_rank"):
        evaluate(qf, gf, qp, gp, qc, gc, max_rank=0)
    bad = qf.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="query: contains non-finite"):
        evaluate(bad, gf, qp, gp, qc, gc)
    with pytest.raises(ValueError, match="query: is empty"):
        evaluate(qf[:0], gf, qp[:0], gp, qc[:0], gc)
    with pytest.raises(ValueError, match="protocol"):
        evaluate(qf, gf, qp, gp, qc, gc, protocol="market")
    with pytest.raises(ValueError, match="no valid query"):
        evaluate_distmat(np.random.rand(3, 4), [0, 0, 0], [1, 1, 1, 1], [0, 0, 0], [1, 1, 1, 1])
    with pytest.raises(ValueError, match="ks"):
        recall_at_k(gf, gp, ks=(0,))


def test_string_or_ragged_ids_raise_naming_the_argument():
    d = torch.rand(2, 3)
    good = dict(q_pids=[0, 1], g_pids=[0, 1, 1], q_camids=[0, 0], g_camids=[1, 1, 1])
    for name, bad in (("q_pids", ["a", "b"]), ("g_pids", np.array(["a", "b", "c"])), ("q_camids", [[0], [0, 1]])):
        args = {**good, name: bad}
        with pytest.raises(TypeError, match=f"^{name}: cannot make a tensor of .* mapped to integers first"):
            evaluate_distmat(d, *args.values())
