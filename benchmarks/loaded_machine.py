"""pyfici and its anchors on a loaded machine.

A training loop's DataLoader workers compete with the optimizer step and the
knn search for the same cores. This script times chosen ``pyfici bench`` cases
twice in one run: on the idle machine, then with ``--busy N`` processes each
spinning on one core (a stand-in for N busy data-loading workers). It prints,
per implementation, the idle and loaded medians and the slowdown, and per case
the anchor / pyfici ratio idle and loaded: pyfici must not collapse under load
where its anchor does not (an OpenMP team that spin-waits at its barriers
for a core another process holds is the usual cause).

    python benchmarks/loaded_machine.py                     # optim + knn + reid, small sizes
    python benchmarks/loaded_machine.py --size full --family optim --busy 1

Run it on an otherwise idle machine; the numbers are meaningful only relative
to the idle run of the same invocation.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time

import torch

from pyfici import _native
from pyfici.bench import load_cases, time_interleaved


def _spin(stop) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


class Busy:
    """``n`` processes that each keep one core busy until the block ends."""

    def __init__(self, n: int):
        self.n = n
        self.stop = mp.get_context("spawn").Event() if n else None
        self.procs = []

    def __enter__(self):
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=_spin, args=(self.stop,), daemon=True) for _ in range(self.n)]
        for p in self.procs:
            p.start()
        time.sleep(0.5 if self.n else 0)  # let them reach the loop
        return self

    def __exit__(self, *exc):
        if self.stop is not None:
            self.stop.set()
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()


def measure(cases, repeats: int | None, busy: int) -> dict[tuple[str, str], float]:
    out = {}
    with Busy(busy):
        for case in cases:
            print(f"[loaded] busy={busy} {case.family}/{case.name} ...", file=sys.stderr, flush=True)
            fns = case.setup()
            for impl, runs in time_interleaved(case, fns, "cpu", repeats).items():
                out[(case.name, impl)] = statistics.median(runs)
            del fns
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", action="append", choices=["optim", "knn", "reid"],
                   help="case families (repeatable; default optim, knn and reid)")
    p.add_argument("--size", choices=["small", "full"], default="small")
    p.add_argument("--busy", type=int, default=1, help="spinning processes in the loaded run (default 1)")
    p.add_argument("--match", default="", help="only cases whose name contains this text")
    p.add_argument("--repeats", type=int, default=None)
    a = p.parse_args(argv)
    if a.busy < 1:
        p.error("--busy must be >= 1")
    fams = a.family or ["optim", "knn", "reid"]
    cases = [c for c in load_cases(fams, a.size, "cpu") if a.match in c.name]
    if not cases:
        p.error(f"no case matches {a.match!r}")
    idle = measure(cases, a.repeats, 0)
    loaded = measure(cases, a.repeats, a.busy)
    print(f"# {platform.processor() or platform.machine()}: {_cpu_model()}, ISA {_native.CPU_ISA}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, busy processes {a.busy}")
    print(f"{'case':<40} {'implementation':<44} {'idle ms':>9} {'loaded ms':>10} {'slowdown':>9} "
          f"{'ratio idle':>10} {'ratio loaded':>12}")
    for case in cases:
        ours = (case.name, case.ours)
        for (name, impl), t0 in idle.items():
            if name != case.name:
                continue
            t1 = loaded[(name, impl)]
            r0 = r1 = ""
            if impl != case.ours and ours in idle:
                r0 = f"{t0 / idle[ours]:.2f}x"
                r1 = f"{t1 / loaded[ours]:.2f}x"
            print(f"{name[:40]:<40} {impl[:44]:<44} {t0 * 1e3:>9.1f} {t1 * 1e3:>10.1f} {t1 / t0:>8.2f}x "
                  f"{r0:>10} {r1:>12}")
    return 0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
