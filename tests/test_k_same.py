import pytest
import torch

from pyfici.deid import KSame, check_k_anonymity, k_same
from pyfici.ops import reference


def _check(res: KSame, N: int, k: int):
    a, sur, sizes = res
    assert a.shape == (N,) and a.dtype == torch.int64
    assert check_k_anonymity(a, k)
    C = int(a.max()) + 1
    assert sizes.shape == (C,) and int(sizes.sum()) == N
    assert torch.equal(torch.bincount(a, minlength=C), sizes)
    if N >= 2 * k:
        assert int(sizes.min()) >= k and int(sizes.max()) <= 2 * k - 1
    else:
        assert C == 1
    assert sur.shape[0] == C


@pytest.mark.parametrize("method", ["greedy", "mdav"])
@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
@pytest.mark.parametrize("N,k,D", [(10, 10, 4), (19, 10, 4), (20, 10, 4), (101, 3, 5), (397, 7, 3), (1200, 10, 16)])
def test_k_same_equals_plain_algorithm(method, metric, N, k, D):
    if method == "mdav" and N > 1000:
        pytest.skip("the plain mdav reference is slow at this size")
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(N + k), dtype=torch.float64)
    res = k_same(x, k, metric=metric, method=method, seed=5)
    _check(res, N, k)
    ref = reference.k_same(x, k, metric, 5, method)
    if method == "greedy":
        assert torch.equal(res.assignment, ref)
    else:  # the incremental centroid may differ from the reference's in the last bits
        assert (res.assignment == ref).double().mean() > 0.9


def test_k_same_small_lists_force_refreshes():
    x = torch.randn(800, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = reference.k_same(x, 5, "cosine", 1, "greedy")
    for cand, batch in ((4, 16), (5, 3), (9, 256)):
        res = k_same(x, 5, seed=1, candidates=cand, refresh_batch=batch)
        assert torch.equal(res.assignment, ref), (cand, batch)


def test_k_same_lazy_lists_in_growing_batches():
    # lists are computed only for the points the sweep reaches alive, in batches that grow
    # with the alive set; the partition stays the plain algorithm's
    x = torch.randn(2500, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = reference.k_same(x, 4, "sqeuclidean", 7, "greedy")
    for batch in (1, 256):
        res = k_same(x, 4, metric="sqeuclidean", seed=7, refresh_batch=batch)
        assert torch.equal(res.assignment, ref), batch
    x32 = x.float()
    assert torch.equal(k_same(x32, 4, seed=7).assignment, reference.k_same(x32, 4, "cosine", 7, "greedy"))


def test_k_same_is_deterministic_and_seeded():
    x = torch.randn(500, 8)
    a = k_same(x, 4, seed=3).assignment
    assert torch.equal(a, k_same(x, 4, seed=3).assignment)
    assert not torch.equal(a, k_same(x, 4, seed=4).assignment)


@pytest.mark.parametrize("method", ["greedy", "mdav"])
def test_k_same_adversarial(method):
    same = torch.ones(50, 4)
    _check(k_same(same, 7, method=method), 50, 7)
    dup = torch.randn(5, 4).repeat(20, 1)  # 5 points, each 20 times
    res = k_same(dup, 7, method=method)
    _check(res, 100, 7)
    assert torch.equal(res.assignment, reference.k_same(dup, 7, "cosine", 0, method))
    _check(k_same(torch.randn(7, 3), 7, method=method), 7, 7)  # N = k
    _check(k_same(torch.randn(13, 3), 7, method=method), 13, 7)  # k < N < 2k
    _check(k_same(torch.randn(14, 3), 7, method=method), 14, 7)  # N = 2k
    _check(k_same(torch.randn(40, 3), 1, method=method), 40, 1)


def test_k_same_surrogates_are_spherical_means():
    x = torch.randn(60, 5, dtype=torch.float64)
    res = k_same(x, 4)
    xn = x / x.norm(dim=1, keepdim=True)
    for c in range(res.surrogates.shape[0]):
        s = xn[res.assignment == c].sum(0)
        assert torch.allclose(res.surrogates[c], s / s.norm())
    res = k_same(x, 4, metric="sqeuclidean")
    for c in range(res.surrogates.shape[0]):
        assert torch.allclose(res.surrogates[c], x[res.assignment == c].mean(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e-30, 1e-13, 1.5e-12, 1e30])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_cosine_k_same_does_not_depend_on_the_scale(dtype, scale, backend):
    # cosine k-Same clusters directions: scaling every embedding by the same factor
    # must give the same partition and surrogates (a norm clamp at 1e-12 or squares
    # that underflow / overflow in float32 changed both)
    torch.manual_seed(0)
    x = torch.randn(40, 7, dtype=dtype)
    ref = k_same(x, 4, backend=backend)
    got = k_same(x * scale, 4, backend=backend)
    assert torch.equal(got.assignment, ref.assignment)
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    assert torch.allclose(got.surrogates, ref.surrogates, rtol=0, atol=tol)
    assert torch.allclose(got.surrogates.norm(dim=1), torch.ones(got.surrogates.shape[0], dtype=dtype), atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_unit_rows_at_any_scale(dtype):
    x = torch.randn(9, 5, dtype=dtype)
    x[3] = 0
    u = reference.unit_rows(x)
    for s in (1e-30, 1e-13, 1e30):
        assert torch.allclose(reference.unit_rows(x * s), u, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-14)
    assert torch.equal(u[3], torch.zeros(5, dtype=dtype))
    d = reference.pairwise_distance(x * 1e-13, x * 1e-13, "cosine")
    keep = torch.arange(9) != 3
    assert torch.allclose(d.diagonal()[keep], torch.zeros(8, dtype=dtype), atol=1e-6)


def test_k_same_torch_backend():
    x = torch.randn(90, 4, dtype=torch.float64)
    assert torch.equal(k_same(x, 6, backend="torch").assignment, k_same(x, 6).assignment)


def test_check_k_anonymity():
    assert check_k_anonymity(torch.tensor([0, 0, 1, 1, 1]), 2)
    assert not check_k_anonymity(torch.tensor([0, 0, 1, 1, 1]), 3)
    assert not check_k_anonymity(torch.tensor([0, 0, -1]), 1)
    assert check_k_anonymity(torch.tensor([3, 3, 7, 7]), 2)  # ids need not be contiguous
    assert not check_k_anonymity(torch.tensor([], dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="k: must be"):
        check_k_anonymity(torch.tensor([0]), 0)
    with pytest.raises(TypeError, match="assignment: expected an integer"):
        check_k_anonymity(torch.tensor([0.0]), 1)


def test_k_same_bad_input():
    with pytest.raises(ValueError, match="k: must be in .*needs at least k = 5"):
        k_same(torch.randn(4, 3), 5)
    with pytest.raises(ValueError, match="k: must be"):
        k_same(torch.randn(4, 3), 0)
    with pytest.raises(ValueError, match="embeddings: is empty"):
        k_same(torch.randn(0, 3), 1)
    bad = torch.randn(10, 3)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="embeddings: contains non-finite"):
        k_same(bad, 2)
    with pytest.raises(ValueError, match="method"):
        k_same(torch.randn(10, 3), 2, method="kmeans")
    with pytest.raises(ValueError, match="metric"):
        k_same(torch.randn(10, 3), 2, metric="ip")


@pytest.mark.parametrize("kind", ["random", "identical"])
def test_k_same_candidate_lists_narrower_than_a_cluster(kind):
    # candidates < k - 1: a list can never hold a cluster's other members, so every
    # refresh came back short and the partition looped forever; now refused, and
    # k - 1 itself works (identical embeddings: every distance a tie)
    x = torch.randn(40, 3) if kind == "random" else torch.ones(40, 3)
    for W in (1, 3):
        with pytest.raises(ValueError, match="candidates: must be >= 4"):
            k_same(x, 5, candidates=W)
    for method in ("greedy", "mdav"):
        for metric in ("cosine", "sqeuclidean"):
            a = k_same(x, 5, candidates=4, method=method, metric=metric, refresh_batch=1).assignment
            assert torch.equal(a, k_same(x, 5, method=method, metric=metric, backend="torch").assignment)
    assert k_same(x, 1, candidates=1).sizes.eq(1).all()
