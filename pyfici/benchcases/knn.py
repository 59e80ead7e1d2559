"""Benchmarks of family 2 (exact kNN, k-nearest averaging, k-Same) against what
users run today: chunked ``torch.mm`` alone (the GEMM floor), chunked
``torch.mm`` + ``topk`` + gather + mean, and faiss-cpu ``IndexFlatIP.search``
+ mean. Unit-norm embeddings (as FICGAN's identity codes), cosine / inner
product, k = 10."""

from __future__ import annotations

import torch

from pyfici.bench import Case
from pyfici.deid import k_same
from pyfici.ops import knn, knn_average

# (Q, G, D, k) for knn_average; N for k_same
SIZES = {
    "small": {"avg": (2000, 10000, 512, 10), "ksame": 10000},
    "full": {"avg": (20000, 100000, 512, 10), "ksame": 100000},
    "small-cuda": {"avg": (50000, 50000, 512, 10), "ksame": 0},
    "full-cuda": {"avg": (1000000, 1000000, 512, 10), "ksame": 0},
}
CHUNK = 1024  # query rows per torch.mm chunk in the anchors ([1024, G] float32 output)


def unit_rows(n: int, d: int, seed: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return torch.nn.functional.normalize(x, dim=1).to(device)


def mm_alone(x: torch.Tensor, y: torch.Tensor, chunk: int = CHUNK):
    out = torch.empty((min(chunk, x.shape[0]), y.shape[0]), dtype=x.dtype, device=x.device)

    def run():
        for q0 in range(0, x.shape[0], chunk):
            xq = x[q0 : q0 + chunk]
            torch.mm(xq, y.T, out=out[: xq.shape[0]])
        return out

    return run


def mm_topk_mean(x: torch.Tensor, y: torch.Tensor, k: int, chunk: int = CHUNK):
    out = torch.empty((min(chunk, x.shape[0]), y.shape[0]), dtype=x.dtype, device=x.device)
    res = torch.empty_like(x)

    def run():
        for q0 in range(0, x.shape[0], chunk):
            xq = x[q0 : q0 + chunk]
            s = torch.mm(xq, y.T, out=out[: xq.shape[0]])
            idx = s.topk(k, dim=1).indices
            res[q0 : q0 + chunk] = torch.nn.functional.normalize(y[idx].sum(1), dim=1)
        return res

    return run


def faiss_search_mean(x: torch.Tensor, y: torch.Tensor, k: int):
    try:
        import faiss  # type: ignore
    except Exception:
        return None
    faiss.omp_set_num_threads(torch.get_num_threads())
    xn, yn = x.numpy(), y.numpy()
    index = faiss.IndexFlatIP(y.shape[1])
    index.add(yn)

    def run():
        _, idx = index.search(xn, k)
        nb = y[torch.from_numpy(idx)]
        return torch.nn.functional.normalize(nb.sum(1), dim=1)

    return run


def cases(size: str, device: str) -> list[Case]:
    key = size if device == "cpu" else f"{size}-cuda"
    Q, G, D, k = SIZES[key]["avg"]
    full = size == "full"
    out: list[Case] = []

    def setup_avg():
        x = unit_rows(Q, D, 0, device)
        y = unit_rows(G, D, 1, device)
        fns = {
            "pyfici knn_average": lambda: knn_average(x, y, k, metric="cosine", check_values=False),
            "chunked torch.mm alone": mm_alone(x, y),
            "torch.mm + topk + gather + mean": mm_topk_mean(x, y, k),
        }
        if device == "cpu":
            f = faiss_search_mean(x, y, k)
            if f is not None:
                fns["faiss IndexFlatIP.search + mean"] = (f, 1) if full else f
        return fns

    out.append(Case("knn", f"knn_average Q={Q} G={G} D={D} k={k}", setup_avg,
                    ours="pyfici knn_average", note="cosine, unit-norm rows", repeats=2 if full else 3))

    def setup_knn():
        x = unit_rows(Q, D, 0, device)
        y = unit_rows(G, D, 1, device)

        def topk_only():
            buf = torch.empty((min(CHUNK, Q), G), device=device)
            vals, idx = [], []
            for q0 in range(0, Q, CHUNK):
                xq = x[q0 : q0 + CHUNK]
                v, i = torch.mm(xq, y.T, out=buf[: xq.shape[0]]).topk(k, dim=1)
                vals.append(v)
                idx.append(i)
            return torch.cat(vals), torch.cat(idx)

        return {
            "pyfici knn (ip)": lambda: knn(x, y, k, metric="ip", check_values=False),
            "torch.mm + topk": topk_only,
        }

    out.append(Case("knn", f"knn ip Q={Q} G={G} D={D} k={k}", setup_knn, ours="pyfici knn (ip)",
                    repeats=2 if full else 3))

    N = SIZES[key]["ksame"]
    if N and device == "cpu":

        def setup_ksame():
            e = unit_rows(N, D, 2, device)
            return {
                "pyfici k_same (greedy)": lambda: k_same(e, k),
                "one all-vs-all knn pass": lambda: knn(e, e, k, metric="cosine", check_values=False),
            }

        out.append(Case("knn", f"k_same N={N} D={D} k={k}", setup_ksame, ours="pyfici k_same (greedy)",
                        note="target: <= 0.35x one all-vs-all knn pass (lists only for the ~N/k seeds)", repeats=1 if full else 3, warmup=0 if full else 1))
    return out
