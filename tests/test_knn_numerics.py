"""knn at the numerical edges: far from the origin, at huge and tiny scales, non-finite
inputs, inputs that require grad; property tests against a float64 direct reference."""

import pytest
import torch
from conftest import backends_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyfici.deid import k_same
from pyfici.ops import knn, knn_average

METRICS = ["sqeuclidean", "euclidean", "cosine", "ip"]
F32_MAX = torch.finfo(torch.float32).max


def direct(x: torch.Tensor, y: torch.Tensor, metric: str) -> torch.Tensor:
    """[Q, G] values of the direct formula in float64 (ip negated: smaller is better)."""
    x, y = x.double(), y.double()
    if metric in ("sqeuclidean", "euclidean"):
        d = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
        return d.sqrt() if metric == "euclidean" else d
    xy = (x[:, None, :] * y[None, :, :]).sum(-1)
    if metric == "ip":
        return -xy
    xn, yn = x.norm(dim=1), y.norm(dim=1)
    xn = torch.where(xn > 0, xn, torch.ones_like(xn))
    yn = torch.where(yn > 0, yn, torch.ones_like(yn))
    return (1.0 - xy / (xn[:, None] * yn[None, :])).clamp(0.0, 2.0)


def top(x, y, k, metric):
    d = direct(x, y, metric)
    v, i = torch.sort(d, dim=1, stable=True)
    v = -v if metric == "ip" else v
    return v[:, :k], i[:, :k], d


def _backends():
    return backends_for("cpu") + ["torch"]


@pytest.mark.parametrize("metric", METRICS)
def test_knn_far_from_the_origin_is_exact(metric):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=gen) + 1e6
    y = torch.randn(500, 8, generator=gen) + 1e6
    rv, ri, _ = top(x, y, 5, metric)
    for be in _backends():
        v, i = knn(x, y, 5, metric=metric, tile=999, backend=be)
        assert torch.equal(i, ri), (be, metric, int((i != ri).any(1).sum()))
        assert torch.allclose(v.double(), rv, rtol=1e-6, atol=1e-6), (be, metric)
    for dt in (torch.float64,):
        v, i = knn(x.to(dt), y.to(dt), 5, metric=metric, tile=999)
        assert torch.equal(i, ri), metric


@pytest.mark.parametrize("e", [-1000, -600, 600, 1000])
def test_knn_float64_beyond_the_double_squares(e):
    # the refinement evaluates the direct formula in double: float64 inputs of 2**+-1000
    # squared to inf / 0 there (every value 1.0 or inf, neighbours 0, 1, 2, ...). One
    # power of two changes no ranking, and scales the values exactly.
    from pyfici.ops import k_same_partition

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(20, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(150, 6, generator=gen, dtype=torch.float64)
    s = 2.0**e
    for metric in METRICS:
        ref = knn(x, y, 4, metric=metric)
        f = {"cosine": 1.0, "euclidean": s, "sqeuclidean": s * s, "ip": s * s}[metric]
        if f == float("inf"):
            with pytest.raises(ValueError, match=f"the {metric} values .* exceed the torch.float64 range"):
                knn(x * s, y * s, 4, metric=metric)
            continue
        got = knn(x * s, y * s, 4, metric=metric)
        assert torch.equal(got.indices, ref.indices), metric
        if f > 0:  # (the squared values of 2**-1000 inputs are below float64's range)
            assert torch.allclose(got.values, ref.values * f, rtol=1e-15, atol=0), metric
        avg = knn_average(x * s, y * s, 4, metric=metric)
        assert torch.allclose(avg, knn_average(x, y, 4, metric=metric), rtol=0, atol=1e-15), metric
    for metric in ("sqeuclidean", "cosine"):
        assert torch.equal(k_same_partition(y * s, 5, metric=metric), k_same_partition(y, 5, metric=metric))
    knn(x * 2.0**-1070, y * 2.0**-1070, 4)  # subnormal inputs: an answer, not an OverflowError


@pytest.mark.parametrize("scale", [1e20, 1e-20])
def test_knn_huge_and_tiny_scales(scale):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(20, 6, generator=gen) * scale
    y = torch.randn(300, 6, generator=gen) * scale
    for metric in METRICS:
        rv, ri, _ = top(x, y, 4, metric)
        for be in _backends():
            if be != "torch" and scale > 1 and metric in ("sqeuclidean", "ip"):
                # the values themselves are beyond float32: refused, never inf or -1
                with pytest.raises(ValueError, match=f"metric: the {metric} values .* exceed the torch.float32 range"):
                    knn(x, y, 4, metric=metric, backend=be)
                continue
            if be == "torch" and scale > 1 and metric in ("sqeuclidean", "ip"):
                continue
            v, i = knn(x, y, 4, metric=metric, tile=500, backend=be)
            assert torch.equal(i, ri), (be, metric, scale)
            assert torch.isfinite(v).all()
            tiny = 1e-44 if scale < 1 else 0.0  # float32 subnormal spacing near 1e-40
            assert torch.allclose(v.double(), rv.float().double(), rtol=1e-5, atol=tiny), (be, metric, scale)
        # float64 holds every value
        v, i = knn(x.double(), y.double(), 4, metric=metric)
        assert torch.equal(i, ri) and torch.isfinite(v).all()
        assert torch.allclose(v, rv, rtol=1e-12, atol=0.0)
    for be in _backends():
        avg = knn_average(x, y, 4, backend=be)
        assert torch.allclose(avg.norm(dim=1), torch.ones(20), atol=1e-5), be
        ri = top(x, y, 4, "cosine")[1]
        nb = y.double()[ri]
        want = (nb / nb.norm(dim=2, keepdim=True)).sum(1)
        want = want / want.norm(dim=1, keepdim=True)
        assert torch.allclose(avg.double(), want, atol=1e-5), be
    assert k_same(torch.cat([x, y]), 4).sizes.min() >= 4


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's numpy on NaN
def test_knn_non_finite_inputs_are_refused():
    x, y = torch.randn(4, 3), torch.randn(10, 3)
    for bad_val in (float("nan"), float("inf")):
        bad = y.clone()
        bad[:, :] = bad_val
        for be in _backends():
            with pytest.raises(ValueError, match="gallery: contains non-finite"):
                knn(x, bad, 2, backend=be)
        # check_values=False skips the check, but a result without neighbours is never returned
        for be in backends_for("cpu"):
            with pytest.raises(ValueError, match="no finite ranking values"):
                knn(x, bad, 2, backend=be, check_values=False)
            with pytest.raises(ValueError, match="no finite ranking values"):
                knn_average(x, bad, 2, backend=be, check_values=False)


def test_knn_refuses_inputs_that_require_grad():
    x = torch.randn(4, 3, requires_grad=True)
    y = torch.randn(10, 3)
    with pytest.raises(ValueError, match=r"queries: requires grad, but knn .* not differentiable .*queries.detach\(\)"):
        knn(x, y, 2)
    with pytest.raises(ValueError, match="gallery: requires grad"):
        knn_average(y[:4], y.clone().requires_grad_(), 2)
    v, i = knn(x.detach(), y, 2)
    with torch.no_grad():
        assert torch.equal(knn(x, y, 2).indices, i)  # no_grad: nothing requires grad
    # k_same builds a partition (no gradient): it detaches
    res = k_same(torch.randn(30, 4, requires_grad=True), 3)
    assert not res.surrogates.requires_grad


def test_knn_returns_a_named_tuple():
    x, y = torch.randn(4, 3), torch.randn(10, 3)
    r = knn(x, y, 3)
    assert r.values is r[0] and r.indices is r[1]
    v, i = r
    assert v.shape == i.shape == (4, 3)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    Q=st.integers(1, 9),
    G=st.integers(1, 70),
    D=st.integers(1, 12),
    kk=st.integers(1, 12),
    exp=st.integers(-20, 20),
    offset=st.sampled_from([0.0, 1.0, -3.0, 1e3, 1e6, -1e6]),
    metric=st.sampled_from(METRICS),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    tile=st.sampled_from([1, 13, 256, 1 << 16]),
    dup=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_knn_property_matches_float64_direct(Q, G, D, kk, exp, offset, metric, dtype, tile, dup, seed):
    gen = torch.Generator().manual_seed(seed)
    scale = 10.0**exp
    x = (torch.randn(Q, D, generator=gen, dtype=torch.float64) * scale + offset).to(dtype)
    y = (torch.randn(G, D, generator=gen, dtype=torch.float64) * scale + offset).to(dtype)
    if dup and G > 2:
        y[G // 2 :] = y[: G - G // 2].clone()  # identical rows in different tiles
    k = min(kk, G)
    rv, ri, d = top(x, y, k, metric)
    out32 = dtype == torch.float32
    if out32 and metric in ("sqeuclidean", "ip") and bool(rv.float().isinf().any()):
        with pytest.raises(ValueError, match="exceed the torch.float32 range"):
            knn(x, y, k, metric=metric, tile=tile, backend="cpu")
        return
    v, i = knn(x, y, k, metric=metric, tile=tile, backend="cpu")
    assert (i >= 0).all() and (i < G).all()
    # a valid top-k of the direct formula: the chosen items' reference values are the k best
    got = d.gather(1, i)
    best = d.gather(1, ri)
    mag = d.abs().amax(1, keepdim=True).clamp_min(1e-300)
    tol = 1e-13 * mag + 1e-300
    if metric == "cosine":  # 1 - cos cancels: the double formula itself is good to ~1e-16 absolute
        tol = tol + 1e-13
    assert ((got - best).abs() <= tol).all(), (got, best)
    # identical gallery rows tie exactly and come out in index order
    same = (y[i[:, 1:]] == y[i[:, :-1]]).all(-1)
    assert (~same | (i[:, 1:] > i[:, :-1])).all()
    assert (~same | (v[:, 1:] == v[:, :-1])).all()
    # the values: the float64 result rounded to the output dtype
    ref_vals = (-got if metric == "ip" else got).to(dtype).double()
    rtol = 2e-7 if out32 else 1e-12
    atol = 1e-44 if out32 else 1e-300
    if metric == "cosine":
        atol = max(atol, 1e-7 if out32 else 1e-13)
    assert torch.allclose(v.double(), ref_vals, rtol=rtol, atol=atol), (v, ref_vals)
