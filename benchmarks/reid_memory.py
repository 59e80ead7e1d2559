"""Peak extra memory and time of ``pyfici.reid.evaluate`` from features at the
Market-1501 size (3,368 x 15,913 queries x gallery, D = 2048, random features).

    python benchmarks/reid_memory.py [Q G D]

The features exist before the measurement; the peak RSS growth is the
process's ru_maxrss after one evaluation minus its RSS before it (a first
tiny call has warmed pyfici up).
"""

import os
import resource
import sys
import time

import torch

from pyfici.benchcases.reid import market_like_ids
from pyfici.reid import evaluate


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(Q: int = 3368, G: int = 15913, D: int = 2048) -> None:
    qp, gp, qc, gc = market_like_ids(Q, G, min(751, G))
    g = torch.Generator().manual_seed(2)
    qf = torch.randn(Q, D, generator=g)
    gf = torch.randn(G, D, generator=g)
    evaluate(qf[:5], gf[:50], qp[:5], gp[:50], qc[:5], gc[:50])
    base = _rss()
    t = time.perf_counter()
    evaluate(qf, gf, qp, gp, qc, gc, max_rank=50)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"evaluate {Q}x{G} D={D}: {seconds * 1e3:.0f} ms, peak RSS growth {(peak - base) / 2**20:.0f} MB, "
          f"{torch.get_num_threads()} threads")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]))
