import pytest
import torch
from conftest import backends_for

from pyfici.ops import knn, knn_average, reference

METRICS = ["sqeuclidean", "euclidean", "cosine", "ip"]
# (Q, G, D, k); small tiles below force many gallery and query tiles
SHAPES = [(1, 1, 1, 1), (7, 13, 5, 3), (67, 1031, 33, 10), (131, 2003, 17, 97)]
TRITON_SHAPES = [(1, 1, 1, 1), (7, 69, 9, 10)]


def _shapes(be):
    return TRITON_SHAPES if be == "triton" else SHAPES


def _data(Q, G, D, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed + Q * 31 + G)
    return torch.randn(Q, D, generator=gen, dtype=dtype), torch.randn(G, D, generator=gen, dtype=dtype)


def _close(v, ref, be):
    tol = 1e-4 if be == "triton" or v.dtype == torch.float32 else 1e-9
    return torch.allclose(v.double().cpu(), ref.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("metric", METRICS)
def test_knn_float64_matches_reference_exactly(device, metric):
    for be in backends_for(device):
        for Q, G, D, k in _shapes(be):
            x, y = _data(Q, G, D)
            rv, ri = reference.knn(x, y, k, metric)
            v, i = knn(x.to(device), y.to(device), k, metric=metric, tile=16384, backend=be)
            assert v.shape == (Q, k) and i.shape == (Q, k) and i.dtype == torch.int64
            assert torch.equal(i.cpu(), ri), (be, metric, Q, G, D, k)
            assert _close(v, rv, be), (be, metric, Q, G, D, k)


@pytest.mark.parametrize("metric", METRICS)
def test_knn_float32_indices_and_values(device, metric):
    for be in backends_for(device):
        for Q, G, D, k in _shapes(be):
            x, y = _data(Q, G, D, torch.float32, seed=1)
            rv, ri = reference.knn(x.double(), y.double(), k, metric)
            v, i = knn(x.to(device), y.to(device), k, metric=metric, tile=16384, backend=be)
            assert v.dtype == torch.float32
            assert torch.equal(i.cpu(), ri), (be, metric, Q, G, D, k)
            assert torch.allclose(v.double().cpu(), rv, rtol=1e-5, atol=1e-4), (be, metric)


@pytest.mark.parametrize("metric", METRICS)
def test_knn_exclude_self(device, metric):
    for be in backends_for(device):
        Q, G, D, k = (9, 40, 6, 5) if be == "triton" else (50, 301, 7, 12)
        _, y = _data(Q, G, D)
        rv, ri = reference.knn(y[:Q], y, k, metric, exclude_self=True)
        v, i = knn(y[:Q].to(device), y.to(device), k, metric=metric, exclude_self=True, tile=2048, backend=be)
        assert torch.equal(i.cpu(), ri), be
        assert not (i.cpu() == torch.arange(Q)[:, None]).any()
    # k = G - 1 with the gallery as queries
    y = _data(1, 11, 3)[1]
    v, i = knn(y, y, 10, exclude_self=True)
    assert torch.equal(i, reference.knn(y, y, 10, "sqeuclidean", True)[1])


def _best_base_row(base: torch.Tensor, metric: str) -> torch.Tensor:
    """Index of each row's best base row by the float64 direct formula."""
    b = base.double()
    if metric == "ip":
        return (b[:, None, :] * b[None, :, :]).sum(-1).argmax(1)
    return torch.arange(base.shape[0])  # every distance: the row itself (distance 0)


TIE_TILES = [1, 7, 16, 40, 4096]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("metric", METRICS)
def test_knn_ties_go_to_lower_index(metric, dtype):
    # the gallery holds each row three times (j, j + 5, j + 10): the copies land in tiles of
    # different shapes, and must still tie exactly and come out in index order
    gen = torch.Generator().manual_seed(11)
    for D in (3, 8, 37):
        base = (torch.randn(5, D, generator=gen, dtype=torch.float64) * 3 + 0.5).to(dtype)
        gallery = torch.cat([base, base, base])
        best = _best_base_row(base, metric)[:, None]
        for be in backends_for("cpu") + ["torch"]:
            for tile in TIE_TILES if be == "cpu" else TIE_TILES[:1]:
                for k in (1, 2, 3):
                    v, i = knn(base, gallery, k, metric=metric, tile=tile, backend=be)
                    want = best + torch.tensor([0, 5, 10])[:k]
                    assert torch.equal(i, want), (be, metric, D, tile, k)
                    assert torch.equal(v, v[:, :1].expand_as(v)), (be, metric, D, tile, k)  # exact ties


def test_knn_all_identical_rows():
    same = torch.ones(23, 4)
    for be in backends_for("cpu") + ["torch"]:
        for tile in (5, 4096):
            _, i = knn(same[:3], same, 20, tile=tile, backend=be if be != "triton" or tile == 4096 else "cpu")
            assert torch.equal(i, torch.arange(20).expand(3, 20)), be
    # duplicates well beyond the candidate margin, split over many tiles: the fallback path
    gen = torch.Generator().manual_seed(2)
    dup = torch.randn(4, 6, generator=gen).repeat(30, 1)  # row r == row r + 4 == ...
    for metric in METRICS:
        rv, ri = reference.knn(dup, dup, 25, metric)
        for be in backends_for("cpu"):
            if be == "triton" and metric != "sqeuclidean":
                continue
            v, i = knn(dup, dup, 25, metric=metric, tile=64, backend=be)
            assert torch.equal(i, ri), (be, metric)


def test_knn_cpu_every_isa(cpu_isa):
    """The cpu backend under each instruction-set variant the machine runs."""
    from pyfici.deid import k_same

    for metric in METRICS:
        for dtype in (torch.float64, torch.float32):
            for Q, G, D, k in SHAPES[:3] + [(41, 3001, 19, 12)]:
                x, y = _data(Q, G, D, dtype, seed=4)
                rv, ri = reference.knn(x.double(), y.double(), k, metric)
                v, i = knn(x, y, k, metric=metric, tile=16384, backend="cpu")
                assert torch.equal(i, ri), (cpu_isa, metric, dtype, Q, G, D, k)
                assert torch.allclose(v.double(), rv, rtol=1e-5, atol=1e-4), (cpu_isa, metric, dtype)
        x, y = _data(37, 503, 11, seed=5)
        for spherical in (True, False):
            ref = reference.knn_average(x, y, 7, metric, spherical)
            assert _close(knn_average(x, y, 7, metric=metric, spherical=spherical, tile=2048), ref, "cpu")
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert torch.equal(k_same(x, 5, seed=2).assignment, reference.k_same(x, 5, "cosine", 2, "greedy"))


def test_knn_large_k_and_sorted():
    x, y = _data(3, 2100, 5)
    for k in (1024, 2100):
        v, i = knn(x, y, k, metric="euclidean", tile=3000)
        rv, ri = reference.knn(x, y, k, "euclidean")
        assert torch.equal(i, ri)
        assert (v[:, 1:] >= v[:, :-1]).all()
    v, i = knn(x, y, 200, metric="ip")
    assert (v[:, 1:] <= v[:, :-1]).all()  # ip: similarity, descending


@pytest.mark.gpu
def test_cuda_k_up_to_2048_and_a_clear_error_beyond():
    x, y = _data(5, 3000, 9)
    for k in (1025, 2048):
        v, i = knn(x.cuda(), y.cuda(), k, metric="euclidean", tile=4096, backend="cuda")
        rv, ri = reference.knn(x, y, k, "euclidean")
        assert torch.equal(i.cpu(), ri), k
        assert _close(v, rv, "cuda"), k
        avg = knn_average(x.cuda(), y.cuda(), k, metric="cosine", backend="cuda")
        assert _close(avg, reference.knn_average(x, y, k, "cosine", True), "cuda"), k
    with pytest.raises(ValueError, match="k: the cuda backend handles k <= 2048"):
        knn(x.cuda(), y.cuda(), 2049, backend="cuda")


def test_knn_half_inputs_and_numpy():
    x, y = _data(6, 50, 8, torch.float32)
    v, i = knn(x.half(), y.bfloat16(), 4)
    assert v.dtype == torch.float32
    rv, ri = reference.knn(x.half().double(), y.bfloat16().double(), 4)
    assert torch.equal(i, ri)
    v2, i2 = knn(x.numpy(), y.numpy(), 4)
    assert torch.equal(i2, reference.knn(x, y, 4)[1])


@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean", "ip"])
@pytest.mark.parametrize("spherical", [True, False])
def test_knn_average_matches_reference(device, metric, spherical):
    for be in backends_for(device):
        if be == "triton" and device == "cpu" and metric != "cosine":
            continue  # the interpreter is slow: one metric is enough there
        for Q, G, D, k in _shapes(be):
            x, y = _data(Q, G, D)
            ref = reference.knn_average(x, y, k, metric, spherical)
            out = knn_average(x.to(device), y.to(device), k, metric=metric, spherical=spherical, tile=2048, backend=be)
            assert out.shape == (Q, D)
            assert _close(out, ref, be), (be, metric, Q, G, D, k)
            if spherical:
                assert torch.allclose(out.double().norm(dim=1).cpu(), torch.ones(Q, dtype=torch.float64))


def test_knn_average_weights(device):
    for be in backends_for(device):
        Q, G, D, k = (5, 40, 6, 4) if be == "triton" else (37, 503, 11, 7)
        x, y = _data(Q, G, D)
        gen = torch.Generator().manual_seed(3)
        for w in (torch.rand(k, generator=gen, dtype=torch.float64), torch.rand(Q, k, generator=gen, dtype=torch.float64)):
            for spherical in (True, False):
                ref = reference.knn_average(x, y, k, "cosine", spherical, w)
                out = knn_average(x.to(device), y.to(device), k, spherical=spherical, weights=w.to(device), backend=be)
                assert _close(out, ref, be), (be, tuple(w.shape), spherical)


def test_knn_average_exclude_self_and_float32():
    x, y = _data(30, 200, 16, torch.float32)
    out = knn_average(y[:30], y, 5, exclude_self=True, tile=512)
    ref = reference.knn_average(y[:30].double(), y.double(), 5, "cosine", True, None, True)
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), ref, atol=1e-5)


def test_knn_bad_input():
    x, y = torch.randn(4, 3), torch.randn(10, 3)
    with pytest.raises(ValueError, match="k: must be in"):
        knn(x, y, 0)
    with pytest.raises(ValueError, match="k: must be in .*gallery size"):
        knn(x, y, 11)
    with pytest.raises(ValueError, match="k: must be in"):
        knn(y, y, 10, exclude_self=True)
    with pytest.raises(TypeError, match="k: expected an int"):
        knn(x, y, 2.0)
    with pytest.raises(ValueError, match="gallery: feature dimension 4 differs"):
        knn(x, torch.randn(10, 4), 2)
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="queries: contains non-finite"):
        knn(bad, y, 2)
    bad = y.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="gallery: contains non-finite"):
        knn_average(x, bad, 2)
    with pytest.raises(ValueError, match="queries: is empty"):
        knn(torch.randn(0, 3), y, 2)
    with pytest.raises(ValueError, match="gallery: is empty"):
        knn(x, torch.randn(0, 3), 1)
    with pytest.raises(ValueError, match="queries: has zero features"):
        knn(torch.randn(2, 0), torch.randn(3, 0), 1)
    with pytest.raises(ValueError, match="metric"):
        knn(x, y, 2, metric="manhattan")
    with pytest.raises(ValueError, match="queries: expected a 2-d"):
        knn(torch.randn(3), y, 2)
    with pytest.raises(TypeError, match="gallery: expected dtype"):
        knn(x, torch.ones(10, 3, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="tile: must be"):
        knn(x, y, 2, tile=0)
    with pytest.raises(ValueError, match=r"weights: expected shape \[k\]"):
        knn_average(x, y, 2, weights=torch.ones(3))
    with pytest.raises(ValueError, match="'cuda' needs CUDA tensors"):
        knn(x, y, 2, backend="cuda")


def test_knn_triton_rejects_large_k():
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton on CPU tensors needs TRITON_INTERPRET=1")
    with pytest.raises(ValueError, match="k: the triton backend handles k <= 128"):
        knn(torch.randn(2, 3), torch.randn(300, 3), 129, backend="triton")


def test_knn_under_torch_compile():
    x, y = _data(9, 70, 5, torch.float32)

    @torch.compile(fullgraph=True, backend="eager")
    def f(a, b):
        return knn(a, b, 4, check_values=False)

    v, i = f(x, y)
    assert torch.equal(i, reference.knn(x, y, 4)[1])
