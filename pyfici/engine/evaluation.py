"""Feature extraction and ReID / retrieval evaluation of a trained model.

Features are those of the papers' evaluation: the model's pooled features of
the image and of its horizontal mirror, summed and L2-normalised
(``pyfici.models.pool_features``), compared by cosine similarity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _unwrap(model):
    import torch.nn as nn

    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def extract_features(model, dataset, device, batch_size: int = 64, workers: int = 0):
    """Evaluation features of every item of ``dataset`` (items ``(image tensor, label, ...)``).

    Returns ``(feats, labels)``: ``feats`` (N, D) float32 on ``device`` and one
    (N,) int64 tensor per label column (``[pids, camids]`` for ReID data). The
    model is put in eval mode for the pass and restored; the global RNG is not used.
    """
    import torch

    from pyfici.models import pool_features

    m = _unwrap(model)
    was = m.training
    m.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         generator=torch.Generator().manual_seed(0))
    feats, labels = [], []
    with torch.no_grad():
        for batch in loader:
            feats.append(pool_features(m, batch[0].to(device)))
            labels.append([torch.as_tensor(b) for b in batch[1:]])
    m.train(was)
    if not feats:
        return torch.zeros(0, 0, device=device), []
    cols = [torch.cat(c).to(device=device, dtype=torch.int64) for c in zip(*labels)]
    return torch.cat(feats), cols


def evaluate_reid_features(qf, gf, q_pids, g_pids, q_camids, g_camids, protocol: str = "market1501",
                           max_rank: int = 50, rerank: bool = False):
    """``pyfici.reid.evaluate`` on features (cosine), ``max_rank`` capped by the gallery size."""
    import pyfici.reid as reid

    return reid.evaluate(qf, gf, q_pids, g_pids, q_camids, g_camids, metric="cosine",
                         max_rank=max(1, min(max_rank, gf.shape[0])), protocol=protocol, rerank=rerank)


def evaluate_reid(model, data, transform, device, protocol: str = "market1501", max_rank: int = 50,
                  batch_size: int = 64, workers: int = 0, rerank: bool = False):
    """ReID evaluation of ``model`` on ``data.query`` vs ``data.gallery`` (a ``ReIDDataset``)."""
    from pyfici.data.reid import ReIDImageDataset

    qf, (qp, qc) = extract_features(model, ReIDImageDataset(data.query, transform), device, batch_size, workers)
    gf, (gp, gc) = extract_features(model, ReIDImageDataset(data.gallery, transform), device, batch_size, workers)
    return evaluate_reid_features(qf, gf, qp, gp, qc, gc, protocol, max_rank, rerank)


def evaluate_retrieval(model, split, transform, device, batch_size: int = 64, workers: int = 0) -> dict[int, float]:
    """Recall@K of ``model`` on a ``RetrievalSplit``: the test set against itself minus self
    (CUB, Cars, SOP), or query vs gallery when the split has them (In-shop)."""
    import torch

    from pyfici.data.retrieval import RetrievalImageDataset
    from pyfici.reid import evaluate, recall_at_k

    def feats(items: Sequence[Any]):
        f, (lab,) = extract_features(model, RetrievalImageDataset(items, transform), device, batch_size, workers)
        return f, lab

    if split.query is not None:
        qf, ql = feats(split.query)
        gf, gl = feats(split.gallery)
        res = evaluate(qf, gf, ql, gl, torch.zeros_like(ql), torch.ones_like(gl), metric="cosine",
                       max_rank=min(max(split.ks), gf.shape[0]))
        return {k: float(res.rank(min(k, gf.shape[0]))) for k in split.ks}
    f, lab = feats(split.test)
    ks = [k for k in split.ks if k < f.shape[0]] or [1]
    return {int(k): float(v) for k, v in recall_at_k(f, lab, ks, metric="cosine").items()}
