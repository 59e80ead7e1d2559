"""Benchmark cases for k-reciprocal re-ranking.

Anchor: the widely used dense numpy ``re_ranking``
(:mod:`pyfici.benchcases.rerank_numpy_reference`), given the three euclidean distance matrices that
torch computes first (included in its time, as ours includes the distances). Beside it, the
GEMM work rerank needs (the upper-half distance panels, timed alone): its ratio is below 1,
and 1 / ratio is how much rerank costs over its unavoidable matrix products.

``python -m pyfici.benchcases.rerank Q G D IMPL`` measures one run in this
fresh process and prints its wall time, its process CPU seconds (a
load-independent cost on a shared machine) and the peak RSS growth
(ru_maxrss minus the RSS once the random features exist). pyfici is warmed
up on a tiny input first: the first custom-op call of a process imports
torch._dynamo (1-2 s). IMPL is "pyfici", "pyfici-distmat" or
"numpy-reference"; an optional 5th argument "cuda" runs on the GPU
(default backend there: triton).
"""

from __future__ import annotations

import os
import resource
import sys
import time

import torch

from pyfici.bench import Case

SIZES = {
    "small": [(200, 800, 128)],
    "full": [(1000, 4000, 2048), (2000, 8000, 2048), (3368, 15913, 2048)],
}
NUMPY_MAX_N = 10_000  # the dense anchor needs several N x N float32 matrices


def numpy_reference():
    """The dense numpy anchor (pyfici.benchcases.rerank_numpy_reference)."""
    from pyfici.benchcases import rerank_numpy_reference

    return rerank_numpy_reference


def features(Q: int, G: int, D: int, device: str = "cpu", seed: int = 0):
    """Random unit-norm features with identity structure (clusters of ~8)."""
    gen = torch.Generator().manual_seed(seed)
    n_id = max(1, (Q + G) // 8)
    centres = torch.randn(n_id, D, generator=gen)
    ids = torch.randint(0, n_id, (Q + G,), generator=gen)
    x = centres[ids] + 0.7 * torch.randn(Q + G, D, generator=gen)
    x = x / x.norm(dim=1, keepdim=True)
    return x[:Q].contiguous().to(device), x[Q:].contiguous().to(device)


def _distances(q, g):
    from pyfici.ops import pairwise_distance

    return pairwise_distance(q, g), pairwise_distance(q), pairwise_distance(g)


def cases(size: str, device: str) -> list[Case]:
    from pyfici.reid import rerank, rerank_distmat

    out = []
    ref = numpy_reference()
    for Q, G, D in SIZES[size]:
        big = Q + G > 4000

        def setup(Q=Q, G=G, D=D, big=big):
            q, g = features(Q, G, D, device)
            rerank(q[:2], g[:3])  # the first custom-op call of a process imports torch._dynamo: not timed
            fns = {"pyfici": lambda: rerank(q, g)}
            for name, label in _gemm_providers(device):
                fns[f"its GEMM work alone (upper-half panels, {label})"] = gemm_work(q, g, name)
            if Q + G <= NUMPY_MAX_N and device == "cpu" and ref is not None:
                def anchor():
                    qg, qq, gg = _distances(q, g)
                    return ref.re_ranking(qg.numpy(), qq.numpy(), gg.numpy())

                # slow anchor: no warm-up, one run at the big sizes
                fns["numpy re_ranking (dense N x N)"] = (anchor, 1) if big else anchor
            elif device == "cpu":
                fns["pyfici rerank_distmat"] = (lambda: rerank_distmat(*_distances(q, g)), 1)
            return fns

        # pyfici and the GEMM work are warmed up and timed in rounds at every size: a
        # cold first call (page faults of the first large buffers, thread start-up) cost
        # pyfici 0.3 s of a 0.3 s run at 1000 x 4000, which the GEMM work timed after it
        # did not pay
        out.append(Case("rerank", f"{Q}x{G} D={D}", setup, repeats=3, warmup=1,
                        note="k1=20 k2=6 lambda=0.3, euclidean"))
    return out


def _gemm_providers(device: str) -> list[tuple[str | None, str]]:
    """(PYFICI_GEMM name, label) of each CPU GEMM provider that loads here (rerank's
    panels run on the chosen one); on other devices torch's."""
    if device != "cpu":
        return [(None, "torch.mm")]
    from pyfici import _native

    out = [("torch", "torch.mm")]
    if not _native.openblas_error():
        out.append(("openblas", "OpenBLAS"))
    return out


def gemm_work(q: torch.Tensor, g: torch.Tensor, gemm: str | None = None):
    """The matrix products rerank cannot avoid, timed alone: the upper-half row
    panels ``X[r0:r1] @ X[r0:].T`` of the stacked features, with the panel
    height and buffer the CPU backend uses, on the GEMM provider ``gemm``
    (PYFICI_GEMM name; None: the chosen one). rerank's time over this one is
    what its scan and sparse phases add to the GEMM."""
    import contextlib

    from pyfici import _native
    from pyfici.backends.gemm import mm_nt
    from pyfici.ops.rerank import panel_rows, prepare_features

    x, _ = prepare_features(q, g, "euclidean")
    N = x.shape[0]
    rows = panel_rows(N, x.element_size(), None)
    buf = torch.empty(min(rows, N) * N, dtype=x.dtype, device=x.device)

    def run():
        with _native.use_gemm(gemm) if gemm else contextlib.nullcontext():
            for r0 in range(0, N, rows):
                r1 = min(N, r0 + rows)
                w = N - r0
                mm_nt(x[r0:r1], x[r0:], out=buf[: (r1 - r0) * w].view(r1 - r0, w))
        return buf

    return run


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(Q: int, G: int, D: int, impl: str, device: str = "cpu") -> dict:
    """Time and peak RSS growth of one run (call in a fresh process); on
    "cuda" also the peak GPU memory allocated by torch."""
    from pyfici.reid import rerank, rerank_distmat

    q, g = features(Q, G, D, device)
    if impl.startswith("pyfici"):  # one-time import cost of torch.library dispatch (torch._dynamo), not the op's
        rerank(q[:2], g[:3])
        rerank_distmat(*_distances(q[:2], g[:3]))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = _rss_bytes()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if impl == "pyfici":
        r = rerank(q, g)
    elif impl == "pyfici-distmat":
        r = rerank_distmat(*_distances(q, g))
    elif impl == "numpy-reference":
        qg, qq, gg = _distances(q, g)
        r = numpy_reference().re_ranking(qg.cpu().numpy(), qq.cpu().numpy(), gg.cpu().numpy())
    else:
        raise ValueError(f"impl: unknown {impl!r}")
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"Q": Q, "G": G, "D": D, "impl": impl, "seconds": dt, "cpu_seconds": cpu, "peak_rss_growth_MB": (peak - base) / 2**20,
            "out_shape": tuple(r.shape), "threads": torch.get_num_threads(), "device": device,
            "peak_gpu_MB": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None}


if __name__ == "__main__":
    Q, G, D = (int(a) for a in sys.argv[1:4])
    print(measure(Q, G, D, sys.argv[4], sys.argv[5] if len(sys.argv) > 5 else "cpu"), flush=True)
