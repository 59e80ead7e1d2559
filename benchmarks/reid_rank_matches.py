"""Where the time of ``evaluate_distmat`` goes: the cost per true match.

The CPU rank kernel reads each query row once (turning distances into order keys)
and counts, for every true match of the query, the valid items ranked before it
(one compare per gallery item per match, up to 8 / 6 / 4 matches per pass over an L1
chunk on avx512 / avx2 / generic).
This script times ``reid_rank_stats`` on the bench's Market-1501-size matrix
(3,368 x 15,913 uniform random distances) with ids that give no match, about 5 and
about 18 matches per query (the bench's 751 identities), on each CPU variant this
machine runs, and prints the minimum and median of the timed runs. The no-match case
with the finiteness check is the kernel's one read of the matrix into keys (it counts
NaN / Inf on the way); the slope over the matches is the counting.

    python benchmarks/reid_rank_matches.py
    python benchmarks/reid_rank_matches.py --isa avx2 --runs 15
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def main(argv=None) -> int:
    from pyfici import _native
    from pyfici.benchcases.reid import market_like_ids
    from pyfici.ops import reid_rank_stats

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--isa", action="append", choices=("generic", "avx2", "avx512"),
                   help="CPU variant (repeatable; default: every one this CPU runs)")
    p.add_argument("--runs", type=int, default=9)
    args = p.parse_args(argv)
    isas = args.isa or list(_native.CPU_ISAS_SUPPORTED)
    Q, G = 3368, 15913
    qp, gp, qc, gc = market_like_ids(Q, G, 751)
    d = torch.rand(Q, G, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(3)
    cases = {
        "no match, finiteness checked (one read)": (qp, gp + 10**6, True),
        "no match, unchecked": (qp, gp + 10**6, False),
        "~5 matches per query": (torch.randint(0, 3000, (Q,), generator=gen), torch.randint(0, 3000, (G,), generator=gen), False),
        "~18 matches per query (the bench's ids)": (qp, gp, False),
        "~18 matches per query, finiteness checked": (qp, gp, True),
    }
    print(f"{_native.cpu_model()} ({platform.machine()}), {torch.get_num_threads()} threads, Q x G = {Q} x {G}")
    for isa in isas:
        with _native.use_isa(isa):
            for name, (a, b, check) in cases.items():
                n = reid_rank_stats(d, a, b, qc, gc, protocol="market1501", check_finite_values=check)[3]
                ts = []
                for _ in range(args.runs):
                    t = time.perf_counter()
                    reid_rank_stats(d, a, b, qc, gc, protocol="market1501", check_finite_values=check)
                    ts.append(time.perf_counter() - t)
                print(f"{isa:8s} {name:44s} matches/query {n.double().mean().item():5.1f}  "
                      f"min {min(ts) * 1e3:6.1f} ms  median {statistics.median(ts) * 1e3:6.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
