"""Which metric matches which project: torchreid's re-ranked numbers, and the
library / CLI defaults."""

import importlib.util
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

from pyfici.compat.torchreid import re_ranking
from pyfici.reid import evaluate, rerank
from pyfici.reid.evaluate import DEFAULT_METRIC, DEFAULT_PROTOCOL


def _torchreid_module(rel: str):
    spec = importlib.util.find_spec("torchreid")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torchreid is not installed")
    base = Path(list(spec.submodule_search_locations)[0])
    for root in (base / "reid", base):
        path = root / rel
        if path.is_file():
            s = importlib.util.spec_from_file_location("_torchreid_" + path.stem, path)
            mod = importlib.util.module_from_spec(s)
            s.loader.exec_module(mod)  # distance.py needs torch only, rerank.py numpy only
            return mod
    pytest.skip(f"torchreid has no {rel}")


def _features(seed=0, Q=25, G=90, D=16):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(12, D, generator=g)
    x = c[torch.randint(0, 12, (Q + G,), generator=g)] + 0.5 * torch.randn(Q + G, D, generator=g)
    return x[:Q].contiguous(), x[Q:].contiguous()


def _close_with_ranking(ours, ref, tol=1e-5):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert np.abs(ours - ref).max() <= tol
    order = np.argsort(ref, axis=1, kind="stable")
    s = np.take_along_axis(ours, order, 1)
    gaps = np.diff(np.take_along_axis(ref, order, 1), axis=1)
    assert ((np.diff(s, axis=1) >= 0) | (gaps < 1e-6)).all()


@pytest.mark.parametrize("dist_metric", ["euclidean", "cosine"])
def test_rerank_torchreid_convention_reproduces_torchreid_engine(dist_metric):
    dist = _torchreid_module("metrics/distance.py")
    rr = _torchreid_module("utils/rerank.py")
    q, g = _features(1)
    # what torchreid's engine does with rerank=True
    qg = dist.compute_distance_matrix(q, g, dist_metric).numpy()
    qq = dist.compute_distance_matrix(q, q, dist_metric).numpy()
    gg = dist.compute_distance_matrix(g, g, dist_metric).numpy()
    ref = rr.re_ranking(qg, qq, gg)
    ours = rerank(q, g, metric=dist_metric, convention="torchreid").numpy()
    _close_with_ranking(ours, ref)
    # the drop-in re_ranking on the same matrices
    _close_with_ranking(re_ranking(qg, qq, gg), ref)
    if dist_metric == "euclidean":
        # torchreid's "euclidean" holds squared distances: the reference convention differs
        plain = rerank(q, g, metric="euclidean").numpy()
        assert np.abs(plain - ref).max() > 1e-3
        _close_with_ranking(rerank(q, g, metric="sqeuclidean").numpy(), ref)


def test_torchreid_euclidean_is_squared():
    dist = _torchreid_module("metrics/distance.py")
    q, g = _features(2)
    d = dist.compute_distance_matrix(q, g, "euclidean")
    torch.testing.assert_close(d, torch.cdist(q, g) ** 2, rtol=1e-4, atol=1e-4)


def test_rerank_convention_bad_value():
    q, g = _features(3, 4, 6, 3)
    with pytest.raises(ValueError, match="convention"):
        rerank(q, g, convention="fastreid")


def test_library_and_cli_defaults_agree():
    sig = inspect.signature(evaluate)
    assert sig.parameters["protocol"].default == DEFAULT_PROTOCOL == "market1501"
    assert sig.parameters["metric"].default == DEFAULT_METRIC == "cosine"
    from pyfici.engine import evaluation

    e = inspect.signature(evaluation.evaluate_reid_features)
    assert e.parameters["protocol"].default == DEFAULT_PROTOCOL
    src = inspect.getsource(evaluation.evaluate_reid_features)
    assert f'metric="{DEFAULT_METRIC}"' in src
