"""The masked layer-wise optimizer step on each CPU variant, in one process, interleaved.

``pyfici bench`` times one variant per process (``PYFICI_CPU_ISA``), and on a shared
cloud host two processes minutes apart can differ by 30% in memory bandwidth. This
script builds one optimizer per variant on the same ResNet-50 parameter set (19 groups,
bool masks on the convolutions, as the bench) and steps them round-robin, so every
variant sees the same machine state. It prints the minimum and median step time per
variant, for 1 and 2 threads, SGD (momentum, Nesterov, weight decay) and AdamW.

    python benchmarks/optim_isa_interleaved.py              # every variant this CPU runs
    python benchmarks/optim_isa_interleaved.py --rounds 61 --isa avx2 --isa avx512

Use it to see which variant the dispatch should prefer for the step on a CPU; the
ratio to torch's own step is the bench's job.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def main(argv=None) -> int:
    from pyfici import _native
    from pyfici.benchcases import optim as bo
    from pyfici.optim import LayerwiseAdamW, LayerwiseSGD

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=31, help="timed steps per variant (default 31)")
    ap.add_argument("--isa", action="append", choices=("generic", "avx2", "avx512"),
                    help="variant to include (repeatable; default: every one this CPU supports)")
    ap.add_argument("--threads", type=int, action="append", help="thread counts (default: 1 and 2)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    isas = args.isa or [i for i in _native.CPU_ISAS_SUPPORTED if i != "generic"]
    missing = [i for i in isas if i not in _native.CPU_ISAS_SUPPORTED]
    if missing:
        ap.error(f"--isa {missing[0]}: not supported on this CPU (supported: {', '.join(_native.CPU_ISAS_SUPPORTED)})")

    import torchvision

    shapes = [tuple(p.shape) for p in torchvision.models.resnet50().parameters()]
    group_of = [min(18, i * 19 // len(shapes)) for i in range(len(shapes))]
    print(f"{_native.cpu_model()} ({platform.machine()}), torch {torch.__version__}, "
          f"{args.rounds} interleaved steps per variant; ms, minimum / median")
    steps = (("SGD", LayerwiseSGD, dict(momentum=0.9, nesterov=True, weight_decay=5e-4)),
             ("AdamW", LayerwiseAdamW, dict(weight_decay=0.01)))
    for nt in args.threads or [1, 2]:
        torch.set_num_threads(nt)
        for name, cls, kw in steps:
            opts = {}
            for isa in isas:
                params, masks = bo._make(shapes, "cpu")
                opt = cls(bo._param_groups(params, group_of, lr=0.01), **kw)
                for p, m in zip(params, masks):
                    if m is not None:
                        opt.set_mask(p, m)
                with _native.use_isa(isa):
                    opt.step()  # first step: state allocation, not timed
                opts[isa] = opt
            times = {isa: [] for isa in opts}
            for _ in range(args.rounds):
                for isa, opt in opts.items():
                    with _native.use_isa(isa):
                        t0 = time.perf_counter()
                        opt.step()
                        times[isa].append(time.perf_counter() - t0)
            cells = "  ".join(f"{isa} {min(v) * 1e3:.2f} / {statistics.median(v) * 1e3:.2f}" for isa, v in times.items())
            print(f"{name:5s} {nt} thread{'s' if nt > 1 else ' '}  {cells}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
