"""The CPU GEMM provider under the kNN tiles: OpenBLAS from scipy-openblas32 loaded at
run time (dlopen) and the C++ tile worker, against torch.mm and the reference."""

import os
import subprocess
import sys
import warnings

import pytest
import torch

import pyfici.backends.knn as bk
from pyfici import _native
from pyfici.deid import k_same
from pyfici.ops import knn, knn_average, reference

METRICS = ["sqeuclidean", "euclidean", "cosine", "ip"]
# (Q, G, D, k): one query (the gallery split over threads), primes, k near G, Q over a block
SHAPES = [(1, 1, 1, 1), (1, 4099, 7, 5), (7, 13, 5, 13), (67, 1031, 33, 10), (261, 2003, 17, 23)]
# usable: installed, loaded, and its GEMM passed pyfici's check on this CPU (_native.gemm_probe)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    OPENBLAS_ERROR = _native.openblas_error()
HAS_OPENBLAS = not OPENBLAS_ERROR


def _openblas_or_skip():
    try:
        return _native.openblas_module()
    except RuntimeError as e:  # pragma: no cover - the dependency is installed with pyfici
        pytest.skip(str(e))


def _data(Q, G, D, dtype, seed, offset=0.0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(Q, D, generator=gen, dtype=torch.float64) * scale + offset
    y = torch.randn(G, D, generator=gen, dtype=torch.float64) * scale + offset
    return x.to(dtype), y.to(dtype)


def _run(code: str, **env):
    e = dict(os.environ)
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bare_gemm_matches_torch_mm(cpu_isa, dtype):
    mod = _openblas_or_skip()
    gen = torch.Generator().manual_seed(1)
    for m, n, k in [(1, 1, 1), (3, 257, 5), (131, 67, 513), (64, 1024, 64)]:
        a = torch.randn(m, k, generator=gen, dtype=dtype)
        b = torch.randn(n, k, generator=gen, dtype=dtype)
        c = torch.full((m, n), float("nan"), dtype=dtype)
        for threads in (1, 2):
            mod.gemm_nt(_native.DTYPE_CODES[dtype], m, n, k, a.data_ptr(), b.data_ptr(), c.data_ptr(), threads)
            tol = 1e-4 if dtype == torch.float32 else 1e-12
            assert torch.allclose(c, a @ b.T, rtol=tol, atol=tol * k), (cpu_isa, m, n, k, threads)


def test_gemm_probe_passes_a_right_gemm_and_names_a_wrong_one():
    assert _native.gemm_probe(lambda a, b, threads: a @ b.T) == ""
    # off by more than rounding, in float32 only
    off = _native.gemm_probe(lambda a, b, threads: (a @ b.T) * (1 + 1e-3) if a.dtype == torch.float32 else a @ b.T)
    assert off.startswith("float32 1x1x1 on 1 thread(s): error "), off

    def nan_column(a, b, threads):
        c = a @ b.T
        if c.shape[1] > 50:
            c[:, 50] = float("nan")
        return c

    assert _native.gemm_probe(nan_column).startswith("float32 37x53x29 on 1 thread(s): error NaN"), \
        _native.gemm_probe(nan_column)
    # float64 computed in float32: right for float32, wrong for float64
    f64 = _native.gemm_probe(lambda a, b, threads: (a.float() @ b.float().T).to(a.dtype))
    assert f64.startswith("float64 "), f64
    # only the threaded path wrong
    thr = _native.gemm_probe(lambda a, b, threads: a @ b.T if threads == 1 else (a @ b.T).flip(0))
    assert "on 2 thread(s)" in thr, thr


def test_the_loaded_openblas_passes_the_probe(cpu_isa):
    mod = _openblas_or_skip()
    assert _native.gemm_probe(lambda a, b, t: _native._module_gemm(mod, a, b, t)) == ""


def test_an_openblas_that_fails_the_probe_is_refused_with_a_warning(monkeypatch):
    _openblas_or_skip()
    monkeypatch.setattr(_native, "_OPENBLAS_CONFIG", {})
    monkeypatch.setattr(_native, "_OPENBLAS_BAD", {})
    monkeypatch.setattr(_native, "gemm_probe", lambda gemm: "float32 5x7x3 on 1 thread(s): error NaN, bound 1e-06")
    with pytest.warns(RuntimeWarning, match="computed wrong products on this CPU"):
        err = _native.openblas_error()
    assert "float32 5x7x3" in err and "OPENBLAS_CORETYPE" in err
    # refused from then on, without a second warning; auto takes torch.mm and says why
    assert _native.openblas_error() == err
    assert _native.gemm_choice() == ("torch", f"OpenBLAS unavailable: {err}")
    assert _native.tile_gemm_choice()[0] == "torch"
    assert "computed wrong products" in _native.gemm_info()
    with pytest.raises(RuntimeError, match="PYFICI_GEMM=openblas: OpenBLAS cannot be used .*wrong products"), \
            _native.use_gemm("openblas"):
        _native.gemm_choice()
    # the ops still give the reference's answer (on torch.mm tiles)
    x, y = _data(9, 300, 7, torch.float64, 3)
    _, i = knn(x, y, 5, metric="euclidean")
    _, ri = reference.knn(x, y, 5, "euclidean")
    assert torch.equal(i, ri)


def test_bad_gemm_calls_raise():
    mod = _openblas_or_skip()
    with pytest.raises(ValueError, match="dtype must be float32 or float64"):
        mod.gemm_nt(_native.DTYPE_CODES[torch.int64], 1, 1, 1, 0, 0, 0, 1)
    with pytest.raises(RuntimeError, match="a BLAS is already loaded from .*asked for /other/lib.so"):
        mod.gemm_load("/other/lib.so", "scipy_")
    with pytest.raises(ValueError, match="must be positive"):
        mod.knn_select_gemm(0, 0, 0, 0, 1, 1, 0, 1.0, 0, 0, 1, 0, 0, 0, -1, 1, 1, 1)
    # a module that has no BLAS yet: unknown files and libraries without the symbols are refused
    code = (
        "import ctypes.util, pyfici._C_generic as m\n"
        "for path in ('/nonexistent/libx.so', ctypes.util.find_library('m')):\n"
        "    try:\n        m.gemm_load(path, 'scipy_')\n    except RuntimeError as e:\n        print(e)\n"
        "print(m.gemm_loaded())\n"
        "try:\n    m.knn_select_gemm(0, 0, 0, 1, 1, 1, 0, 1.0, 0, 0, 1, 0, 0, 0, -1, 1, 1, 1)\n"
        "except RuntimeError as e:\n    print(e)\n"
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0].startswith("gemm_load: cannot open /nonexistent/libx.so")
    assert "has no symbol scipy_cblas_sgemm" in out[1]
    assert out[2] == "False" and "the BLAS GEMM is not loaded" in out[3]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("metric", METRICS)
def test_knn_openblas_equals_torch_path_and_reference(cpu_isa, metric, dtype):
    _openblas_or_skip()
    for Q, G, D, k in SHAPES:
        # far from the origin (centred tiles), huge (scaled tiles) and plain data
        for offset, scale in ((0.0, 1.0), (50.0, 1.0), (0.0, 2.0**40)):
            if dtype == torch.float32 and scale > 1 and metric in ("sqeuclidean", "ip"):
                continue  # values beyond the float32 range are refused (tested in test_knn)
            x, y = _data(Q, G, D, dtype, Q + G + D, offset, scale)
            rv, ri = reference.knn(x.double(), y.double(), k, metric)
            for tile in (1 << 23, 300, 7) if Q * G < 10**4 else (1 << 23, 4999):
                with _native.use_gemm("torch"):
                    tv, ti = knn(x, y, k, metric=metric, tile=tile)
                with _native.use_gemm("openblas"):
                    ov, oi = knn(x, y, k, metric=metric, tile=tile)
                what = (cpu_isa, metric, dtype, Q, G, D, k, offset, scale, tile)
                assert torch.equal(oi, ti) and torch.equal(ov, tv), what
                assert torch.equal(oi, ri), what
                tol = 1e-9 if dtype == torch.float64 else 1e-5
                assert torch.allclose(ov.double(), rv, rtol=tol, atol=tol * 10), what


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_selection_lists_equal_the_torch_path_bit_for_bit(threads):
    """Integer-valued inputs make every GEMM exact, so both providers see the same scores:
    the worker's candidate lists (ties included; the gallery split over threads and merged
    when there are few query blocks) must be the Python tile loop's, entry for entry."""
    _openblas_or_skip()
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(3)
        for Q, G, D, L in [(1, 5000, 4, 9), (3, 977, 3, 40), (300, 1500, 5, 18), (517, 64, 2, 64)]:
            for dtype in (torch.float32, torch.float64):
                x = torch.randint(-3, 4, (Q, D), generator=gen).to(dtype)
                y = torch.randint(-3, 4, (G, D), generator=gen).to(dtype)  # many exact ties
                for metric in ("ip", "sqeuclidean"):
                    space = bk.make_space(x, y, metric)
                    for tile, excl, col_off in ((1 << 23, False, 0), (97, True, 0), (1 << 12, False, 10**6)):
                        if excl and Q > G:
                            continue
                        out = {}
                        for prov in ("torch", "openblas"):
                            with _native.use_gemm(prov):
                                out[prov] = bk.select_tiles(x, y, L, space, excl, tile, "cpu", col_offset=col_off,
                                                            self_offset=col_off)
                        what = (Q, G, D, L, dtype, metric, tile, excl, threads)
                        assert torch.equal(out["openblas"][1], out["torch"][1]), what
                        assert torch.equal(out["openblas"][0], out["torch"][0]), what
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("metric", METRICS)
def test_ties_duplicates_and_exclusion_with_openblas(cpu_isa, metric):
    _openblas_or_skip()
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(5, 9, generator=gen, dtype=torch.float64) * 3 + 0.5
    gallery = torch.cat([base, base, base])  # row j == j + 5 == j + 10
    dup = torch.randn(4, 6, generator=gen).repeat(30, 1)  # far more duplicates than the margin
    with _native.use_gemm("openblas"):
        for tile in (3, 40, 1 << 20):
            for dtype in (torch.float32, torch.float64):
                b, g = base.to(dtype), gallery.to(dtype)
                v, i = knn(b, g, 3, metric=metric, tile=tile)
                assert torch.equal(i, reference.knn(b.double(), g.double(), 3, metric)[1]), (metric, tile)
                assert torch.equal(v, v[:, :1].expand_as(v))  # exact ties
                v, i = knn(g, g, 4, metric=metric, exclude_self=True, tile=tile)
                rv, ri = reference.knn(g.double(), g.double(), 4, metric, exclude_self=True)
                assert torch.equal(i, ri), (metric, tile, dtype)
            _, i = knn(dup, dup, 25, metric=metric, tile=64)
            assert torch.equal(i, reference.knn(dup, dup, 25, metric)[1]), metric


def test_knn_average_and_k_same_with_openblas(cpu_isa):
    _openblas_or_skip()
    x, y = _data(37, 503, 11, torch.float64, 5)
    w = torch.rand(7, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    for metric in METRICS:
        for spherical in (True, False):
            with _native.use_gemm("torch"):
                want = knn_average(x, y, 7, metric=metric, spherical=spherical, weights=w, tile=2048)
            with _native.use_gemm("openblas"):
                got = knn_average(x, y, 7, metric=metric, spherical=spherical, weights=w, tile=2048)
            assert torch.equal(got, want), (metric, spherical)
    e = _data(400, 1, 6, torch.float64, 6)[0]
    with _native.use_gemm("openblas"):
        assign = k_same(e, 5, seed=2).assignment
    assert torch.equal(assign, reference.k_same(e, 5, "cosine", 2, "greedy"))


def test_worker_tile_fits_the_cache_and_the_tile_bound():
    for Q, G, tile in [(1, 1, 1 << 23), (20000, 100000, 1 << 23), (5, 10**6, 1 << 23), (300, 50, 64), (9, 9, 1)]:
        for itemsize in (4, 8):
            tq, tg = bk.worker_tile_shape(Q, G, tile, itemsize)
            assert 1 <= tq <= min(Q, bk.WORKER_TILE_ROWS) and 1 <= tg <= G
            assert tq * tg <= max(1, min(tile, bk.WORKER_TILE_BYTES // itemsize)), (Q, G, tile)
    assert bk.worker_tile_shape(20000, 100000, 1 << 23) == (512, 1024)
    assert bk.worker_tile_shape(20000, 100000, 1 << 23, 8) == (256, 1024)


def test_auto_rule():
    assert _native.auto_gemm("intel", True, "")[0] == "openblas"
    assert _native.auto_gemm("intel", False, "")[0] == "openblas"
    assert _native.auto_gemm("amd", True, "")[0] == "openblas"
    assert _native.auto_gemm("other", False, "")[0] == "openblas"
    for vendor in ("intel", "amd", "other"):
        name, why = _native.auto_gemm(vendor, True, "no wheel here")
        assert name == "torch" and "OpenBLAS unavailable: no wheel here" in why


def test_auto_tile_rule():
    assert _native.auto_tile_gemm("intel", True, "")[0] == "torch"
    assert _native.auto_tile_gemm("intel", False, "")[0] == "openblas"
    assert _native.auto_tile_gemm("amd", True, "")[0] == "openblas"
    assert _native.auto_tile_gemm("other", True, "")[0] == "openblas"
    name, why = _native.auto_tile_gemm("amd", True, "no wheel here")
    assert name == "torch" and "OpenBLAS unavailable: no wheel here" in why
    want = _native.auto_tile_gemm(_native.cpu_vendor(), torch.backends.mkl.is_available(), _native.openblas_error())
    assert _native.tile_gemm_provider() == want[0] and want[1] in _native.info()["cpu_tile_gemm"]
    with _native.use_gemm("torch"):
        assert _native.tile_gemm_provider() == "torch"
        assert "forced (PYFICI_GEMM=torch)" in _native.info()["cpu_tile_gemm"]
    if HAS_OPENBLAS:
        with _native.use_gemm("openblas"):
            assert _native.tile_gemm_provider() == "openblas"


def test_forced_choices_and_info():
    with _native.use_gemm("torch"):
        assert _native.gemm_choice() == ("torch", "forced (PYFICI_GEMM=torch)")
        assert _native.info()["cpu_gemm"].startswith("torch.mm")
    if HAS_OPENBLAS:
        with _native.use_gemm("openblas"):
            assert _native.gemm_provider() == "openblas"
            assert "OpenBLAS" in _native.info()["cpu_gemm"]
    with pytest.raises(ValueError, match="PYFICI_GEMM='mkl' is not one of"):
        with _native.use_gemm("mkl"):
            pass
    r = _run("import torch; from pyfici.ops import knn; knn(torch.randn(2, 3), torch.randn(4, 3), 1)",
             PYFICI_GEMM="fast")
    assert r.returncode != 0 and "PYFICI_GEMM='fast' is not one of" in r.stderr


def test_forced_openblas_without_the_package_raises_and_auto_says_why():
    hide = "import sys; sys.modules['scipy_openblas32'] = None; import torch; from pyfici import _native; "
    r = _run(hide + "from pyfici.ops import knn; knn(torch.randn(2, 3), torch.randn(4, 3), 1)",
             PYFICI_GEMM="openblas")
    assert r.returncode != 0
    assert "PYFICI_GEMM=openblas: OpenBLAS cannot be used" in r.stderr and "pip install scipy-openblas32" in r.stderr
    # auto: torch.mm, and the rule says why wherever it would have picked OpenBLAS
    r = _run(hide + "print(_native.gemm_provider()); print(_native.auto_gemm('amd', True, _native.openblas_error()))",
             PYFICI_GEMM="auto")
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == "torch" and "OpenBLAS unavailable: the scipy-openblas32 package is not usable" in out[1]


def test_the_cpu_modules_do_not_link_a_blas_or_libtorch():
    for isa in _native.CPU_ISAS_SUPPORTED:
        with _native.use_isa(isa) as mod:
            r = subprocess.run(["ldd", mod.__file__], capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip("ldd is not available")
            assert "openblas" not in r.stdout and "torch" not in r.stdout and "mkl" not in r.stdout, r.stdout


@pytest.mark.parametrize("gemm", ["torch", "openblas"] if HAS_OPENBLAS else ["torch"])
def test_mm_nt_on_each_provider(gemm):
    from pyfici.backends.gemm import mm_nt

    gen = torch.Generator().manual_seed(9)
    with _native.use_gemm(gemm):
        for M, N, K in [(1, 1, 1), (5, 0, 3), (3, 4, 0), (67, 131, 33), (300, 7, 513)]:
            for dtype in (torch.float32, torch.float64):
                x = torch.randint(-4, 5, (M, K), generator=gen).to(dtype)
                y = torch.randint(-4, 5, (N, K), generator=gen).to(dtype)
                bias = torch.randint(-9, 9, (N,), generator=gen).to(dtype)
                want = x @ y.T  # integer data: every BLAS is exact
                assert torch.equal(mm_nt(x, y), want), (gemm, M, N, K, dtype)
                assert torch.equal(mm_nt(x, y, alpha=-2.0, bias=bias), bias - 2 * want)
                out = torch.full((M, N), float("nan"), dtype=dtype)
                assert mm_nt(x, y, out, bias=bias) is out and torch.equal(out, bias + want)
                # non-contiguous inputs are fine
                xt = torch.cat([x, x], 1)[:, :K]
                assert torch.equal(mm_nt(xt, y, alpha=0.5), 0.5 * want)


@pytest.mark.skipif(not HAS_OPENBLAS, reason=f"needs a usable OpenBLAS ({OPENBLAS_ERROR})")
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_evaluate_and_rerank_tiles_on_each_provider(metric, monkeypatch):
    """evaluate's distance tiles and rerank's panels run on the chosen GEMM provider
    (OpenBLAS under PYFICI_GEMM=openblas, torch.mm under torch), with the same results
    to rounding."""
    from pyfici.backends import gemm as gemm_mod
    from pyfici.reid import evaluate, rerank

    gen = torch.Generator().manual_seed(4)
    Q, G, D = 37, 411, 24
    q, g = _data(Q, G, D, torch.float32, 4)
    qp, gp = torch.randint(0, 30, (Q,), generator=gen), torch.randint(0, 30, (G,), generator=gen)
    qc, gc = torch.randint(0, 3, (Q,), generator=gen), torch.randint(0, 3, (G,), generator=gen)
    calls = []
    real = _native.openblas_module

    def counting_module():
        calls.append(1)
        return real()

    monkeypatch.setattr(gemm_mod._native, "openblas_module", counting_module)
    res = {}
    for name in ("torch", "openblas"):
        calls.clear()
        with _native.use_gemm(name):
            ev = evaluate(q, g, qp, gp, qc, gc, metric=metric, tile=16)
            rr = rerank(q, g, k1=6, k2=3, metric=metric, tile=64)
        assert (len(calls) > 0) == (name == "openblas"), (name, len(calls))
        res[name] = (ev, rr)
    (ev_t, rr_t), (ev_o, rr_o) = res["torch"], res["openblas"]
    assert abs(ev_t.mAP - ev_o.mAP) < 1e-6 and torch.allclose(ev_t.cmc, ev_o.cmc, atol=1e-6)
    assert torch.allclose(rr_t, rr_o, rtol=0, atol=1e-5)
