"""Identical feature rows tie exactly on the CPU paths, whatever the BLAS's rounding.

OpenBLAS's Haswell sgemm kernel (what an AVX2-only CPU runs, or any x86 CPU under
``OPENBLAS_CORETYPE=Haswell``) rounds the same dot product differently by where the row
falls in its register blocks, so two copies of one gallery image got distances a few
ulps apart and ranked by rounding instead of by index (mAP 4e-7 off the reference).
These tests make the GEMM position-dependent on purpose (a 1-ulp nudge of every other
column and row), so they check the fix on any BLAS, and run the real Haswell kernel in
a subprocess where the CPU has AVX2."""

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import pyfici.ops.distance as distance
from pyfici import _native
from pyfici.ops import pairwise_distance
from pyfici.ops.distance import duplicate_rows
from pyfici.reid import evaluate, recall_at_k


def _brute_duplicates(x):
    dup, rep = [], []
    for i in range(x.shape[0]):
        for r in range(i):
            if bool((x[i] == x[r]).all()):
                dup.append(i)
                rep.append(r)
                break
    return dup, rep


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 5), (2, 1), (37, 3), (301, 17), (1000, 64)])
def test_duplicate_rows_matches_brute_force(cpu_isa, dtype, shape):
    n, d = shape
    gen = torch.Generator().manual_seed(n * 31 + d)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)
    if n > 2:
        src = torch.randint(0, n, (n // 3,), generator=gen)
        dst = torch.randint(0, n, (n // 3,), generator=gen)
        x[dst] = x[src].clone()
        x[n // 2] = 0.0
        x[n - 1] = -0.0  # equal by value to the +0.0 row
    want = _brute_duplicates(x)
    got = duplicate_rows(x)
    if not want[0]:
        assert got is None
    else:
        assert got is not None
        assert got[0].tolist() == want[0] and got[1].tolist() == want[1]
    # the torch.unique path (other devices, strided rows, torch.compile) groups the same way
    strided = torch.empty(d, n, dtype=dtype).t()
    strided.copy_(x)
    assert strided.stride(1) != 1 or n == 1 or d == 1
    other = duplicate_rows(strided)
    assert (other is None) == (got is None)
    if got is not None:
        assert torch.equal(other[0], got[0]) and torch.equal(other[1], got[1])


def test_hash_collision_never_ties_different_rows(monkeypatch):
    """Every row hashing alike (a worst-case collision) still ties only equal rows."""
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])

    class _Collide:
        """The CPU module, with a row hash that is 0 for every row."""

        def __getattr__(self, name):
            return getattr(real(), name)

        @staticmethod
        def row_hash(ptr, dtype, n, cols, ld, out_ptr, nthreads):
            ctypes.memset(out_ptr, 0, 8 * n)

    real = _native.cpu_module
    if not _native.has_cpu():
        pytest.skip("the CPU module is not built")
    monkeypatch.setattr(_native, "cpu_module", lambda: _Collide())
    dup, rep = duplicate_rows(x)
    # rows 2 and 3 equal rows 0 and 1; rows 1, 3, 4 are not copies of row 0
    assert dup.tolist() == [2] and rep.tolist() == [0]


def _nudged_mm_nt(real):
    """A GEMM that rounds by position: every other column, and every third row, 1 ulp up."""

    def mm_nt(x, y, out=None, *, alpha=1.0, bias=None):
        d = real(x, y, out, alpha=alpha, bias=bias)
        d[:, 1::2] = torch.nextafter(d[:, 1::2], torch.full_like(d[:, 1::2], float("inf")))
        d[2::3] = torch.nextafter(d[2::3], torch.full_like(d[2::3], float("inf")))
        return d

    return mm_nt


def _data(Q, G, D, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(Q, D, generator=gen)
    y = torch.randn(G, D, generator=gen)
    y[::9] = y[:1].clone()
    y[22::18] = y[4:5].clone()  # a second group (4 + 18 k is never a multiple of 9)
    x[::4] = x[:1].clone()
    ids = (torch.randint(0, 40, (Q,), generator=gen), torch.randint(-1, 40, (G,), generator=gen),
           torch.randint(0, 3, (Q,), generator=gen), torch.randint(0, 3, (G,), generator=gen))
    return x, y, ids


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_evaluate_ties_identical_gallery_rows_on_a_position_dependent_gemm(monkeypatch, metric):
    x, y, ids = _data(23, 3001, 12, 7)
    ref = evaluate(x, y, *ids, metric=metric, backend="torch")
    monkeypatch.setattr(distance, "mm_nt", _nudged_mm_nt(distance.mm_nt))
    out = evaluate(x, y, *ids, metric=metric, backend="cpu", tile=7)
    assert torch.equal(torch.as_tensor(out.cmc), torch.as_tensor(ref.cmc))
    assert out.mAP == pytest.approx(ref.mAP, abs=1e-12) and out.mINP == pytest.approx(ref.mINP, abs=1e-12)


def test_recall_at_k_ties_identical_samples_on_a_position_dependent_gemm(monkeypatch):
    x, _, _ = _data(400, 1, 8, 3)
    labels = torch.arange(400) % 50
    ref = recall_at_k(x, labels, ks=(1, 2, 5), backend="torch")
    monkeypatch.setattr(distance, "mm_nt", _nudged_mm_nt(distance.mm_nt))
    assert recall_at_k(x, labels, ks=(1, 2, 5), backend="cpu") == ref


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_pairwise_distance_identical_rows_equal_on_a_position_dependent_gemm(monkeypatch, metric):
    x, y, _ = _data(41, 300, 10, 5)
    monkeypatch.setattr(distance, "mm_nt", _nudged_mm_nt(distance.mm_nt))
    d = pairwise_distance(x, y, metric, backend="cpu")
    assert torch.equal(d[:, ::9], d[:, :1].expand(-1, d[:, ::9].shape[1]))
    assert torch.equal(d[:, 4::18], d[:, 4:5].expand(-1, d[:, 4::18].shape[1]))
    assert torch.equal(d[::4], d[:1].expand(d[::4].shape[0], -1))
    s = pairwise_distance(y, None, metric, backend="cpu")
    assert torch.equal(s[:, ::9], s[:, :1].expand(-1, s[:, ::9].shape[1]))
    assert torch.equal(s[::9], s[:1].expand(s[::9].shape[0], -1))
    assert bool((s[::9, 0] == 0).all()) and bool((s.diagonal() == 0).all())


@pytest.mark.skipif(not (_native.has_cpu() and _native.cpu_feature_flags().get("avx2")),
                    reason="OpenBLAS's Haswell kernel needs AVX2")
def test_real_haswell_openblas_kernel_ties_identical_rows():
    code = textwrap.dedent("""
        import torch
        from pyfici import _native
        from pyfici.ops import pairwise_distance
        from pyfici.reid import evaluate
        try:
            _native.openblas_module()
        except RuntimeError as e:
            print("SKIP", e)
            raise SystemExit(0)
        gen = torch.Generator().manual_seed(11)
        Q, G, D = 23, 4500, 12
        x = torch.randn(Q, D, generator=gen)
        y = torch.randn(G, D, generator=gen)
        y[::9] = y[:1].clone()
        ids = (torch.randint(0, 50, (Q,), generator=gen), torch.randint(-1, 50, (G,), generator=gen),
               torch.randint(0, 3, (Q,), generator=gen), torch.randint(0, 3, (G,), generator=gen))
        d = pairwise_distance(x, y, "sqeuclidean", backend="cpu")
        assert torch.equal(d[:, ::9], d[:, :1].expand(-1, d[:, ::9].shape[1]))
        for metric in ("sqeuclidean", "cosine"):
            ref = evaluate(x, y, *ids, metric=metric, backend="torch")
            out = evaluate(x, y, *ids, metric=metric, backend="cpu")
            assert torch.equal(torch.as_tensor(out.cmc), torch.as_tensor(ref.cmc)), metric
            assert abs(out.mAP - ref.mAP) < 1e-12 and abs(out.mINP - ref.mINP) < 1e-12, metric
        print("OK", _native._OPENBLAS_CONFIG)
    """)
    env = {**os.environ, "OPENBLAS_CORETYPE": "Haswell", "PYFICI_GEMM": "openblas"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    if r.stdout.startswith("SKIP"):
        pytest.skip(r.stdout.strip())
    assert r.stdout.startswith("OK"), r.stdout
