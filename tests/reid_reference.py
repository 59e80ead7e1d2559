"""Straightforward numpy evaluations written from the protocol definitions
(torchreid's eval_market1501 semantics and the official Market-1501
compute_AP), used as independent references in the tests."""

import numpy as np


def torchreid_eval(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    indices = np.argsort(distmat, axis=1, kind="stable")
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    all_cmc, all_AP, all_INP = [], [], []
    for q in range(num_q):
        order = indices[q]
        remove = (g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q])
        raw = matches[q][~remove]
        if not np.any(raw):
            continue
        cmc = raw.cumsum()
        pos_max = np.where(raw == 1)[0].max()
        all_INP.append(cmc[pos_max] / (pos_max + 1.0))
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        num_rel = raw.sum()
        tmp = raw.cumsum() / (np.arange(len(raw)) + 1.0) * raw
        all_AP.append(tmp.sum() / num_rel)
    return np.asarray(all_cmc, dtype=np.float64).mean(0), float(np.mean(all_AP)), float(np.mean(all_INP)), len(all_AP)


def market_official_ap(distmat, q_pids, g_pids, q_camids, g_camids):
    aps = []
    for q in range(distmat.shape[0]):
        order = np.argsort(distmat[q], kind="stable")
        good = set(np.where((g_pids == q_pids[q]) & (g_camids != q_camids[q]))[0])
        junk = set(np.where(((g_pids == q_pids[q]) & (g_camids == q_camids[q])) | (g_pids == -1))[0])
        if not good:
            continue
        old_recall, old_precision, ap, inter, j = 0.0, 1.0, 0.0, 0, 0
        for idx in order:
            if idx in junk:
                continue
            if idx in good:
                inter += 1
            recall = inter / len(good)
            precision = inter / (j + 1.0)
            ap += (recall - old_recall) * (old_precision + precision) / 2
            old_recall, old_precision = recall, precision
            j += 1
            if inter == len(good):
                break
        aps.append(ap)
    return float(np.mean(aps)), len(aps)
