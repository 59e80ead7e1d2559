"""Benchmarks of family 1 (ReID evaluation) against what users run today:
torchreid's evaluation (its Cython ``evaluate_cy`` when importable, else its
pure-Python ``eval_market1501`` from the installed ``torchreid`` package), the
numpy argsort of the matrix alone, and the matrix product alone."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch

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

        def mm_only():
            for q0 in range(0, Q, tile):
                torch.mm(qf[q0 : q0 + tile], gf.T)

        def cdist_argsort():
            d = torch.cdist(qf, gf)
            torch.argsort(d, dim=1)

        return {
            "pyfici evaluate (features)": lambda: evaluate(qf, gf, qp, gp, qc, gc, max_rank=50),
            "matrix product alone (torch.mm tiles)": mm_only,
            "torch.cdist + torch.argsort": cdist_argsort,
        }

    out.append(Case("reid", f"eval from features D={D}", setup_features, ours="pyfici evaluate (features)", repeats=3))
    return out
