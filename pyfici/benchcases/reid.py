"""Benchmarks of family 1 (ReID evaluation) against what users run today:
fast-reid's Cython evaluator (``rank_cy.pyx`` from the installed ``fastreid``
wheel, compiled here with Cython on first use), torchreid's evaluation (its
Cython ``evaluate_cy`` when importable, else its pure-Python
``eval_market1501`` from the installed ``torchreid`` package), the numpy
argsort of the matrix alone, and the matrix product alone."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from pyfici import _native
from pyfici.backends.gemm import mm_nt
from pyfici.bench import Case
from pyfici.reid import evaluate, evaluate_distmat

SIZES = {"small": (800, 4000, 256, 200), "full": (3368, 15913, 2048, 751)}


def market_like_ids(Q: int, G: int, n_ids: int, seed: int = 0):
    """Market-1501-like labels: n_ids identities, 6 cameras."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, n_ids, (Q,), generator=g),
        torch.randint(0, n_ids, (G,), generator=g),
        torch.randint(0, 6, (Q,), generator=g),
        torch.randint(0, 6, (G,), generator=g),
    )


def torchreid_evaluator():
    """(name, fn) of torchreid's evaluation, loaded without importing torchreid's
    heavy package __init__ (it needs cv2 etc.); None if torchreid is absent."""
    spec = importlib.util.find_spec("torchreid")
    if spec is None or spec.origin is None:
        return None
    base = os.path.dirname(spec.origin)
    try:
        from torchreid.metrics.rank_cylib.rank_cy import evaluate_cy  # type: ignore

        return "torchreid evaluate_cy (Cython)", lambda *a: evaluate_cy(*a, False)
    except Exception:
        pass
    for rel in (("reid", "metrics", "rank.py"), ("metrics", "rank.py")):
        path = os.path.join(base, *rel)
        if os.path.exists(path):
            s = importlib.util.spec_from_file_location("_torchreid_rank", path)
            mod = importlib.util.module_from_spec(s)
            s.loader.exec_module(mod)
            return "torchreid eval_market1501 (Python)", mod.eval_market1501
    return None


def fastreid_cython(module: str = "rank_cy"):
    """fast-reid's own compiled evaluator module (``rank_cy`` or ``roc_cy``).

    The ``fastreid`` wheel (``pip install --no-deps fastreid``) ships the Cython
    sources ``fastreid/evaluation/rank_cylib/{rank_cy,roc_cy}.pyx`` but no
    compiled module. They are found without importing fastreid (its package
    imports need its training dependencies), compiled with Cython and the C
    compiler once, and cached under ``$PYFICI_CACHE`` (default
    ``~/.cache/pyfici``)/fastreid_cython keyed by the source's hash. Returns
    ``(module, None)``, or ``(None, reason)`` when fastreid, Cython or a
    compiler is missing or the build fails.
    """
    spec = importlib.util.find_spec("fastreid")
    if spec is None or not spec.submodule_search_locations:
        return None, "fastreid is not installed (pip install --no-deps fastreid)"
    src = Path(list(spec.submodule_search_locations)[0]) / "evaluation" / "rank_cylib" / f"{module}.pyx"
    if not src.is_file():
        return None, f"the installed fastreid has no {src.name}"
    try:
        import Cython
        from Cython.Build import cythonize
        from setuptools import Extension
        from setuptools.dist import Distribution
    except ImportError as e:
        return None, f"cannot build fast-reid's Cython evaluator: {e} (pip install cython setuptools)"
    key = hashlib.sha256(src.read_bytes() + Cython.__version__.encode() + sys.version.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("PYFICI_CACHE", Path.home() / ".cache" / "pyfici")) / "fastreid_cython" / key
    name = f"_fastreid_{module}_{key}"
    built = list(cache.glob(f"{name}*.so")) if cache.is_dir() else []
    if not built:
        try:
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory() as tmp:
                pyx = Path(tmp) / f"{name}.pyx"
                shutil.copyfile(src, pyx)
                ext = Extension(name, [str(pyx)], include_dirs=[np.get_include()],
                                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")])
                mods = cythonize([ext], language_level=3, quiet=True, build_dir=tmp)
                dist = Distribution({"ext_modules": mods})
                cmd = dist.get_command_obj("build_ext")
                cmd.build_lib = str(cache)
                cmd.build_temp = tmp
                cmd.ensure_finalized()
                cmd.run()
        except Exception as e:  # a compiler error, a missing header
            return None, f"building fast-reid's {src.name} failed: {type(e).__name__}: {e}"
        built = list(cache.glob(f"{name}*.so"))
        if not built:
            return None, f"building fast-reid's {src.name} produced no module"
    s = importlib.util.spec_from_file_location(name, built[0])
    mod = importlib.util.module_from_spec(s)
    try:
        s.loader.exec_module(mod)
    except ImportError as e:  # roc_cy imports faiss
        return None, f"fast-reid's compiled {module} does not import: {e}"
    return mod, None


def cases(size: str, device: str) -> list[Case]:
    Q, G, D, n_ids = SIZES[size]
    out = []
    if device == "cpu":

        def setup_distmat():
            qp, gp, qc, gc = market_like_ids(Q, G, n_ids)
            dist = torch.rand(Q, G, generator=torch.Generator().manual_seed(1))
            dn = dist.numpy()
            qpn, gpn, qcn, gcn = (t.numpy() for t in (qp, gp, qc, gc))
            fns = {
                "pyfici evaluate_distmat": lambda: evaluate_distmat(dist, qp, gp, qc, gc, max_rank=50),
                "numpy argsort of the matrix alone": lambda: np.argsort(dn, axis=1),
            }
            fr, _ = fastreid_cython("rank_cy")
            if fr is not None:
                fns["fast-reid evaluate_cy (Cython, from its wheel)"] = (
                    lambda: fr.evaluate_cy(dn, qpn, gpn, qcn, gcn, 50, False), 1)
            tr = torchreid_evaluator()
            if tr is not None:
                name, fn = tr
                fns[name] = (lambda: fn(dn, qpn, gpn, qcn, gcn, 50), 1)
            return fns

        out.append(Case("reid", f"eval from distmat {Q}x{G}", setup_distmat, ours="pyfici evaluate_distmat", repeats=3))

    def setup_features():
        dev = torch.device(device)
        qp, gp, qc, gc = (t.to(dev) for t in market_like_ids(Q, G, n_ids))
        g = torch.Generator().manual_seed(2)
        qf = torch.randn(Q, D, generator=g).to(dev)
        gf = torch.randn(G, D, generator=g).to(dev)
        tile = max(1, (64 << 20) // (4 * G))

        def mm_only(gemm=None):
            def run():
                with _native.use_gemm(gemm) if gemm else contextlib.nullcontext():
                    for q0 in range(0, Q, tile):
                        mm_nt(qf[q0 : q0 + tile], gf)
            return run

        def cdist_argsort():
            d = torch.cdist(qf, gf)
            torch.argsort(d, dim=1)

        fns = {"pyfici evaluate (features)": lambda: evaluate(qf, gf, qp, gp, qc, gc, max_rank=50),
               "matrix product alone (torch.mm tiles)": mm_only("torch" if device == "cpu" else None)}
        if device == "cpu" and not _native.openblas_error():
            fns["matrix product alone (OpenBLAS tiles)"] = mm_only("openblas")
        fns["torch.cdist + torch.argsort"] = cdist_argsort
        return fns

    out.append(Case("reid", f"eval from features D={D}", setup_features, ours="pyfici evaluate (features)", repeats=3))
    return out
