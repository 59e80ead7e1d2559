"""The bfloat16 selection pass of the CPU kNN (pyfici.backends.knn.select_bf16): forced on
(PYFICI_KNN_BF16=on, any CPU), its results must be the exact top-k, identical to the
float32 pass, on every metric and at the numerical edges; its error bound must hold for
every gallery item; rows it cannot certify must go through the float32 pass."""

import math

import pytest
import torch
from test_knn_numerics import METRICS, top

from pyfici import _native
from pyfici.backends import knn as kb
from pyfici.ops import knn, knn_average

pytestmark = pytest.mark.skipif(not _native.has_cpu(), reason="the CPU backend is not built")


def _both(fn):
    with _native.use_knn_bf16("on"):
        a = fn()
    with _native.use_knn_bf16("off"):
        b = fn()
    return a, b


def _count_float32_rows(monkeypatch):
    seen = []
    orig = kb._float32_rows

    def wrapped(x, y, rows, *args, **kw):
        seen.append(rows.clone())
        return orig(x, y, rows, *args, **kw)

    monkeypatch.setattr(kb, "_float32_rows", wrapped)
    return seen


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (7, 13, 5, 3), (67, 1031, 33, 10), (131, 2003, 17, 97),
                                   (40, 3001, 515, 7)])
def test_bf16_pass_is_exact(metric, shape, cpu_isa):
    Q, G, D, k = shape
    gen = torch.Generator().manual_seed(Q + G + D)
    x, y = torch.randn(Q, D, generator=gen), torch.randn(G, D, generator=gen)
    rv, ri, _ = top(x, y, k, metric)
    (v1, i1), (v2, i2) = _both(lambda: knn(x, y, k, metric=metric, tile=20000))
    assert torch.equal(i1, ri), (metric, shape, int((i1 != ri).any(1).sum()))
    assert torch.equal(i1, i2) and torch.equal(v1, v2)
    assert torch.allclose(v1.double(), rv, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("metric", METRICS)
def test_bf16_pass_exclude_self_and_average(metric):
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(777, 24, generator=gen)
    (v1, i1), (v2, i2) = _both(lambda: knn(y[:90], y, 11, metric=metric, exclude_self=True, tile=5000))
    assert torch.equal(i1, i2) and torch.equal(v1, v2)
    assert not (i1 == torch.arange(90)[:, None]).any()
    a1, a2 = _both(lambda: knn_average(y[:90], y, 11, metric=metric, exclude_self=True))
    assert torch.equal(a1, a2)


def test_bf16_pass_with_a_column_offset():
    """The sharded path's call: global indices from col_offset, exclusion by global index."""
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(60, 16, generator=gen), torch.randn(500, 16, generator=gen)
    for es in (False, True):
        (v1, i1), (v2, i2) = (
            kb.knn_local(x, y, 6, "cosine", es, 4096, "cpu", col_offset=20, available=500, bf16=flag)
            for flag in (True, False)
        )
        assert torch.equal(i1, i2) and torch.equal(v1, v2)
        if es:
            assert not (i1 == torch.arange(60)[:, None]).any()


@pytest.mark.parametrize("metric", METRICS)
def test_bf16_pass_near_ties_fall_back_to_float32(metric, monkeypatch):
    """Duplicated gallery rows with tiny perturbations: the bf16 scores cannot separate them,
    so those rows must run the float32 pass (counted), and the result stays exact."""
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(30, 12, generator=gen)
    y = base.repeat(40, 1) + 1e-4 * torch.randn(1200, 12, generator=gen)
    x = base[:20] + 1e-4 * torch.randn(20, 12, generator=gen)
    seen = _count_float32_rows(monkeypatch)
    rv, ri, _ = top(x, y, 5, metric)
    with _native.use_knn_bf16("on"):
        v, i = knn(x, y, 5, metric=metric)
    assert seen and sum(r.numel() for r in seen) > 0, "no row went through the float32 pass"
    assert torch.equal(i, ri), metric
    # exclude_self through the float32 pass: the own row must still be dropped
    seen.clear()
    with _native.use_knn_bf16("on"):
        v, i = knn(y[:50], y, 5, metric=metric, exclude_self=True)
    assert sum(r.numel() for r in seen) > 0
    ref = top(y[:50], y, 6, metric)
    d = ref[2].clone()
    d[torch.arange(50), torch.arange(50)] = float("inf")
    assert torch.equal(i, torch.sort(d, dim=1, stable=True).indices[:, :5]), metric


@pytest.mark.parametrize("metric", METRICS)
def test_bf16_pass_at_the_numerical_edges(metric):
    """Far from the origin (centred), huge and tiny magnitudes (scaled), zero rows."""
    gen = torch.Generator().manual_seed(6)
    cases = [
        (torch.randn(30, 8, generator=gen) + 1e5, torch.randn(400, 8, generator=gen) + 1e5),
        (torch.randn(30, 8, generator=gen) * 1e-20, torch.randn(400, 8, generator=gen) * 1e-20),
        (torch.randn(30, 8, generator=gen) * 1e15, torch.randn(400, 8, generator=gen) * 1e15),
    ]
    x, y = torch.randn(30, 8, generator=gen), torch.randn(400, 8, generator=gen)
    x[3] = 0
    y[::7] = 0
    cases.append((x, y))
    for x, y in cases:
        if metric in ("sqeuclidean", "ip") and float(x.abs().max()) > 1e10:
            continue  # values beyond float32: refused on both passes (test_knn_numerics)
        ri = top(x, y, 4, metric)[1]
        (v1, i1), (v2, i2) = _both(lambda x=x, y=y: knn(x, y, 4, metric=metric))
        assert torch.equal(i1, ri), (metric, float(x.abs().max()))
        assert torch.equal(i1, i2) and torch.equal(v1, v2)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("D", [3, 64, 700])
def test_bf16_bound_holds_for_every_gallery_item(metric, D):
    """_bf16_upper applied to each item's own scanned score must bound its exact ranking
    score: the certificate's soundness, checked on every (query, item) pair."""
    gen = torch.Generator().manual_seed(D)
    x = torch.randn(40, D, generator=gen) * 3 + 0.5
    y = torch.randn(900, D, generator=gen) * 3 + 0.5
    space = kb.make_space(x, y, metric, "cpu")
    L = y.shape[0]  # keep every item: scores of all of them, sorted
    scores, cand, terms = kb.select_bf16(x, y, L, space, False, 1 << 16)
    xp, yp = space.apply(x).double(), space.apply(y).double()
    exact = xp @ yp.T
    if metric == "cosine":
        exact = exact / yp.norm(dim=1).clamp_min(1e-300)
    elif metric in ("sqeuclidean", "euclidean"):
        exact = exact - 0.5 * yp.square().sum(1)
    exact_of_cand = exact.gather(1, cand)
    xn = xp.norm(dim=1, keepdim=True)
    ym = space.ymax
    E = kb.tile_error(xn, ym, metric, D, torch.float32)
    sub = kb.Bf16Terms(terms.ex[:, None], terms.xt[:, None], terms.ey, terms.yt, terms.amax)
    upper = kb._bf16_upper(scores.double(), E, sub, metric, D, ym)
    assert bool((upper >= exact_of_cand).all()), float((exact_of_cand - upper).max())
    # and it is not vacuous: within a few bf16 roundings of the scores' scale
    scale = (xn * (1.0 if metric == "cosine" else ym)).expand_as(upper)
    assert float(((upper - scores.double()) / scale).max()) < 8 * 2.0**-8


def test_bf16_choice_rule_and_modes(monkeypatch):
    on, why = _native.auto_knn_bf16({"amx_bf16": True}, True, "")
    assert on and "AMX-BF16" in why
    on, why = _native.auto_knn_bf16({"avx512bf16": True}, True, "")
    assert on and "AVX512-BF16" in why
    assert not _native.auto_knn_bf16({"avx2": True}, True, "")[0]
    assert not _native.auto_knn_bf16({"amx_bf16": True}, False, "")[0]
    on, why = _native.auto_knn_bf16({"amx_bf16": True}, True, "rounds more than once")
    assert not on and "rounds more than once" in why
    monkeypatch.setenv("PYFICI_KNN_BF16", "maybe")
    with pytest.raises(ValueError, match="PYFICI_KNN_BF16='maybe'"):
        _native.knn_bf16_choice()
    monkeypatch.setenv("PYFICI_KNN_BF16", "off")
    assert _native.knn_bf16_choice()[0] is False
    assert _native.knn_bf16_info().startswith("float32")
    monkeypatch.delenv("PYFICI_KNN_BF16")
    assert "cpu_knn_select" in _native.info()
    # forced on: allowed only where torch's bf16 GEMM follows the one-rounding model
    monkeypatch.setenv("PYFICI_KNN_BF16", "on")
    if not _native.knn_bf16_probe():
        assert _native.knn_bf16_choice()[:1] == (True,)
    monkeypatch.setattr(_native, "knn_bf16_probe", lambda: "rounds more than once (simulated)")
    with pytest.raises(RuntimeError, match="cannot be certified here .*simulated"):
        _native.knn_bf16_choice()
    monkeypatch.setenv("PYFICI_KNN_BF16", "auto")
    on, why, forced = _native.knn_bf16_choice()
    assert not forced and (not on) and ("simulated" in why or "no bfloat16" in why or "oneDNN" in why)


def test_auto_mode_keeps_small_products_in_float32(monkeypatch):
    with _native.use_knn_bf16("auto"):
        assert not kb.use_bf16(torch.float32, 10, 50, 8, "cpu")  # far below BF16_MIN_WORK
        assert not kb.use_bf16(torch.float64, 10, 50, 8, "cpu")
    with _native.use_knn_bf16("on"):
        assert kb.use_bf16(torch.float32, 10, 50, 8, "cpu")
        assert not kb.use_bf16(torch.float64, 10, 50, 8, "cpu")  # float64 keeps its own pass
        assert not kb.use_bf16(torch.float32, 10, 50, 8, "cuda")
    assert kb.BF16_MIN_WORK >= 1 << 30 and math.log2(kb.BF16_MIN_WORK) % 1 == 0
