import numpy as np
import pytest
import torch
from conftest import backends_for

import pyfici
from pyfici.ops import pairwise_distance, reid_rank_stats


def _ids(Q, G, n_ids, n_cams, gen, junk=True):
    lo = -1 if junk else 0
    return (
        torch.randint(0, n_ids, (Q,), generator=gen),
        torch.randint(lo, n_ids, (G,), generator=gen),
        torch.randint(0, n_cams, (Q,), generator=gen),
        torch.randint(0, n_cams, (G,), generator=gen),
    )


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 13, 5), (67, 131, 33), (0, 5, 3)])
def test_pairwise_distance_matches_reference(device, metric, shape):
    M, N, D = shape
    gen = torch.Generator().manual_seed(M * 100 + N)
    x = torch.randn(M, D, generator=gen).to(device)
    y = torch.randn(N, D, generator=gen).to(device)
    ref = pyfici.ops.reference.pairwise_distance(x.double(), y.double(), metric)
    for be in backends_for(device):
        d = pairwise_distance(x, y, metric, backend=be)
        assert d.shape == (M, N)
        assert d.dtype == torch.float32
        tol = 1e-4 * max(1.0, D)
        assert torch.allclose(d.double(), ref, atol=tol, rtol=1e-4), be
        assert (d >= 0).all()


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_pairwise_self_distance_is_exactly_zero(metric):
    x = torch.randn(37, 16) * 100
    for be in backends_for("cpu") + ["torch"]:
        d = pairwise_distance(x, metric=metric, backend=be)
        assert (d.diagonal() == 0).all(), be
        assert torch.isfinite(d).all()


def test_pairwise_distance_float64_stays_float64():
    x = torch.randn(5, 3, dtype=torch.float64)
    assert pairwise_distance(x, x, backend="cpu").dtype == torch.float64


def test_pairwise_distance_bad_input():
    with pytest.raises(ValueError, match="metric"):
        pairwise_distance(torch.randn(2, 3), torch.randn(2, 3), "manhattan")
    with pytest.raises(ValueError, match="y: feature dimension"):
        pairwise_distance(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="x: expected a 2-d"):
        pairwise_distance(torch.randn(3), torch.randn(2, 3))
    with pytest.raises(TypeError, match="x: expected dtype"):
        pairwise_distance(torch.ones(2, 3, dtype=torch.int64), torch.randn(2, 3))
    with pytest.raises(ValueError, match="backend"):
        pairwise_distance(torch.randn(2, 3), torch.randn(2, 3), backend="nope")
    with pytest.raises(ValueError, match="'cuda' needs CUDA tensors"):
        pairwise_distance(torch.randn(2, 3), torch.randn(2, 3), backend="cuda")


@pytest.mark.parametrize("protocol", ["torchreid", "market1501"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (13, 1), (11, 301), (3, 1031)])
def test_rank_stats_all_backends_match_reference(device, protocol, shape):
    Q, G = shape
    gen = torch.Generator().manual_seed(Q * 7 + G)
    dist = torch.rand(Q, G, generator=gen, dtype=torch.float64)
    ids = _ids(Q, G, 6, 3, gen)
    ref = reid_rank_stats(dist, *ids, protocol=protocol, backend="torch")
    for be in backends_for(device):
        for dt in (torch.float64, torch.float32):
            d = dist.to(dt).to(device)
            out = reid_rank_stats(d, *[i.to(device) for i in ids], protocol=protocol, backend=be)
            ref_dt = reid_rank_stats(dist.to(dt), *ids, protocol=protocol, backend="torch")
            for a, b in zip(out, ref_dt):
                assert torch.allclose(a.cpu(), b, equal_nan=True, rtol=1e-12, atol=1e-12), (be, dt)
        # float64 result equals the float64 reference computed above
        out = reid_rank_stats(dist.to(device), *[i.to(device) for i in ids], protocol=protocol, backend=be)
        for a, b in zip(out, ref):
            assert torch.allclose(a.cpu(), b, equal_nan=True), be


def test_rank_stats_ties_go_to_lower_index():
    # all distances equal: stable order = gallery index order
    dist = torch.zeros(1, 6)
    q_p, q_c = torch.tensor([1]), torch.tensor([0])
    g_p = torch.tensor([2, 1, 3, 1, 2, 2])
    g_c = torch.tensor([1, 1, 1, 1, 1, 1])
    for be in backends_for("cpu") + ["torch"]:
        ap, first, inp, nm = reid_rank_stats(dist, q_p, g_p, q_c, g_c, backend=be)
        assert first.item() == 1 and nm.item() == 2
        assert ap.item() == pytest.approx((1 / 2 + 2 / 4) / 2)
        assert inp.item() == pytest.approx(2 / 4)


def test_rank_stats_many_matches_uses_sort_path():
    # > 256 matches in a row exercises the C++ sort path
    gen = torch.Generator().manual_seed(3)
    G = 2000
    dist = torch.rand(3, G, generator=gen, dtype=torch.float64)
    g_p = torch.where(torch.rand(G, generator=gen) < 0.4, 1, 2)
    g_c = torch.randint(0, 4, (G,), generator=gen)
    q_p, q_c = torch.tensor([1, 1, 2]), torch.tensor([0, 1, 2])
    ref = reid_rank_stats(dist, q_p, g_p, q_c, g_c, backend="torch")
    out = reid_rank_stats(dist, q_p, g_p, q_c, g_c, backend="cpu")
    for a, b in zip(out, ref):
        assert torch.allclose(a, b)


def test_rank_stats_bad_input():
    d = torch.rand(3, 4)
    p3, p4 = torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="q_pids: expected a 1-d array of length 3"):
        reid_rank_stats(d, p4, p4, p3, p4)
    with pytest.raises(ValueError, match="g_camids"):
        reid_rank_stats(d, p3, p4, p3, p3)
    bad = d.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="distmat: contains non-finite"):
        reid_rank_stats(bad, p3, p4, p3, p4)
    with pytest.raises(ValueError, match="no queries"):
        reid_rank_stats(torch.rand(0, 4), p3[:0], p4, p3[:0], p4)
    with pytest.raises(ValueError, match="gallery is empty"):
        reid_rank_stats(torch.rand(3, 0), p3, p4[:0], p3, p4[:0])
    with pytest.raises(ValueError, match="protocol"):
        reid_rank_stats(d, p3, p4, p3, p4, protocol="cuhk")


def test_ops_work_under_torch_compile():
    x = torch.randn(9, 4)
    y = torch.randn(11, 4)

    @torch.compile(fullgraph=True, backend="eager")
    def f(a, b):
        return torch.ops.pyfici.pairwise_distance(a, b, "euclidean", False, "cpu") * 2

    assert torch.allclose(f(x, y), 2 * pairwise_distance(x, y, backend="cpu"))


def test_env_backend_override(monkeypatch):
    monkeypatch.setenv("PYFICI_BACKEND", "torch")
    x = torch.randn(4, 3)
    d = pairwise_distance(x, x)
    # the torch backend is the reference applied to the conditioned features, bit for bit
    from pyfici.ops.distance import condition_features

    xc, yc, _ = condition_features(x, x, "euclidean")
    assert torch.equal(d, pyfici.ops.reference.pairwise_distance(xc, yc, "euclidean"))
    monkeypatch.setenv("PYFICI_BACKEND", "bogus")
    with pytest.raises(ValueError, match="PYFICI_BACKEND="):
        pairwise_distance(x, x)


def test_numpy_inputs_are_accepted():
    d = np.random.rand(4, 6).astype(np.float32)
    ap, first, inp, nm = reid_rank_stats(d, np.zeros(4, int), np.zeros(6, int), np.zeros(4, int), np.ones(6, int))
    assert (nm == 6).all() and (first == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_kernel_every_isa_matches_reference(cpu_isa, dtype):
    """The ISA-written counting loops (AVX-512 masked compares, AVX2 compare-subtract,
    portable) on ragged lengths around the vector widths, ties, NaN junk and >256 matches."""
    gen = torch.Generator().manual_seed(17)
    for Q, G, n_ids in ((5, 1, 1), (7, 15, 3), (9, 16, 2), (6, 17, 4), (11, 33, 5), (4, 129, 3), (3, 700, 2)):
        dist = torch.rand(Q, G, generator=gen, dtype=torch.float64)
        dist[:, ::5] = dist[:, :1].clone()  # exact ties
        dist = dist.to(dtype)
        ids = _ids(Q, G, n_ids, 3, gen)
        for protocol in ("torchreid", "market1501"):
            ref = reid_rank_stats(dist, *ids, protocol=protocol, backend="torch")
            out = reid_rank_stats(dist, *ids, protocol=protocol, backend="cpu")
            for a, b in zip(out, ref):
                assert torch.allclose(a, b, equal_nan=True, rtol=0, atol=1e-12), (cpu_isa, Q, G, protocol)


@pytest.mark.parametrize("spread", ["small", "huge"])
def test_rank_kernel_label_values_any_int64(cpu_isa, spread):
    """Pid and camera labels are coded densely in the kernel: by a table when
    they span few values, by a sort when they are far apart (hashes, extreme
    int64s). Both give the answers of the same labels renamed 0..n-1, and -1
    stays the junk pid under the Market protocol."""
    gen = torch.Generator().manual_seed(23)
    Q, G = 13, 301
    dist = torch.rand(Q, G, generator=gen)
    qp, gp, qc, gc = _ids(Q, G, 9, 4, gen)  # gallery pids include -1
    if spread == "small":
        pid_of = torch.tensor([-1] + [7 + 3 * i for i in range(9)])   # -1 and a short range
        cam_of = torch.tensor([2, 3, 5, 11])
    else:
        big = torch.iinfo(torch.int64)
        pid_of = torch.tensor([-1, big.min, big.max, -(2**62), 2**62, 5, -7, 10**15, -(10**15), 2**40])
        cam_of = torch.tensor([big.min, 0, big.max, 2**33])

    def rename(p, c):
        return pid_of[p + 1], cam_of[c]

    qp2, qc2 = rename(qp, qc)
    gp2, gc2 = rename(gp, gc)
    for protocol in ("torchreid", "market1501"):
        ref = reid_rank_stats(dist, qp, gp, qc, gc, protocol=protocol, backend="torch")
        out = reid_rank_stats(dist, qp2, gp2, qc2, gc2, protocol=protocol, backend="cpu")
        assert (ref[3] > 0).any()
        for a, b in zip(out, ref):
            assert torch.allclose(a, b, equal_nan=True, rtol=0, atol=1e-12), (cpu_isa, spread, protocol)
