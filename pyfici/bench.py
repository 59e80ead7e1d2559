"""``pyfici bench``: time every op against what users would use instead.

Each op family has a module ``pyfici.benchcases.<family>`` with
``cases(size, device) -> list[Case]``. A case's ``setup()`` builds its inputs
once and returns zero-argument callables: ours first ("pyfici"), then the
anchors. Every callable is warmed up, then timed ``repeats`` times (with
``torch.cuda.synchronize`` on the GPU); the table shows medians and the
ratio anchor / ours measured in the same run (> 1 means pyfici is faster).
The timed runs of a case are interleaved (one run of each implementation per
round): on a shared cloud machine the memory bandwidth drifts by tens of per
cent within a minute, and timing all runs of one implementation before the
next would fold that drift into the ratio.
The pytest-benchmark suite in benchmarks/ runs the same cases.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

FAMILIES = ("reid", "optim", "knn", "rerank")


@dataclass
class Case:
    family: str
    name: str
    setup: Callable[[], dict[str, Callable[[], object]]]
    ours: str = "pyfici"
    note: str = ""
    repeats: int = 5
    warmup: int = 1


@dataclass
class Row:
    family: str
    case: str
    impl: str
    median_s: float
    runs: list[float] = field(default_factory=list)
    ratio: float | None = None  # anchor time / ours time (None for ours)
    note: str = ""


def load_cases(families, size: str, device: str) -> list[Case]:
    out: list[Case] = []
    for fam in families:
        try:
            mod = importlib.import_module(f"pyfici.benchcases.{fam}")
        except ModuleNotFoundError as e:
            if e.name == f"pyfici.benchcases.{fam}":
                print(f"[bench] no benchmark cases for family {fam!r} in this build", file=sys.stderr)
                continue
            raise
        out.extend(mod.cases(size, device))
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], repeats: int, warmup: int, device: str) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        runs.append(time.perf_counter() - t0)
    return runs


def timing_plan(case: Case, fn, repeats: int | None = None) -> tuple[Callable[[], object], int, int]:
    """(callable, timed runs, warm-up runs) of one implementation of a case. An implementation
    given as ``(fn, n)`` is a slow anchor: no warm-up and at most ``n`` runs. Used by
    ``pyfici bench`` and by the pytest-benchmark suite in benchmarks/."""
    reps, warm = repeats or case.repeats, case.warmup
    if isinstance(fn, tuple):
        fn, reps, warm = fn[0], min(reps, fn[1]), 0
    return fn, reps, warm


def time_interleaved(case: Case, fns: dict, device: str, repeats: int | None = None) -> dict[str, list[float]]:
    """{implementation: timed runs}: each implementation warmed up, then timed in rounds,
    one run of every implementation (that has runs left, see :func:`timing_plan`) per round."""
    plans = {impl: timing_plan(case, fn, repeats) for impl, fn in fns.items()}
    for fn, _, warm in plans.values():
        for _ in range(warm):
            fn()
    _sync(device)
    runs: dict[str, list[float]] = {impl: [] for impl in plans}
    for r in range(max((reps for _, reps, _ in plans.values()), default=0)):
        for impl, (fn, reps, _) in plans.items():
            if r < reps:
                runs[impl] += time_call(fn, 1, 0, device)
    return runs


def run_cases(cases: list[Case], device: str, repeats: int | None = None, progress: bool = True) -> list[Row]:
    rows: list[Row] = []
    for case in cases:
        if progress:
            print(f"[bench] {case.family}/{case.name} ...", file=sys.stderr, flush=True)
        fns = case.setup()
        ours_t = None
        for impl, runs in time_interleaved(case, fns, device, repeats).items():
            med = statistics.median(runs)
            row = Row(case.family, case.name, impl, med, runs, note=case.note if impl == case.ours else "")
            if impl == case.ours:
                ours_t = med
            elif ours_t:
                row.ratio = med / ours_t
            rows.append(row)
            if progress:
                print(f"[bench]   {impl:<40} {med * 1e3:10.2f} ms", file=sys.stderr, flush=True)
        del fns
    return rows


def format_table(rows: list[Row]) -> str:
    lines = [f"{'family':<8} {'case':<34} {'implementation':<44} {'median ms':>11} {'anchor/pyfici':>13}"]
    lines.append("-" * len(lines[0]))
    for r in rows:
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}x"
        lines.append(f"{r.family:<8} {r.case:<34} {r.impl:<44} {r.median_s * 1e3:>11.2f} {ratio:>13}")
    return "\n".join(lines)


def machine_line(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        what = torch.cuda.get_device_name()
    else:
        from pyfici import _native

        what = (f"{_native.cpu_model()} ({platform.machine()}), pyfici CPU variant {_native.CPU_ISA or 'none'}, "
                f"{torch.get_num_threads()} threads")
    return f"{what}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}"


def plot_rows(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    anchors = [r for r in rows if r.ratio is not None]
    if not anchors:
        return
    labels = [f"{r.family}/{r.case}\nvs {r.impl}" for r in anchors]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(anchors) + 1.2))
    ax.barh(range(len(anchors)), [r.ratio for r in anchors], color=["tab:green" if r.ratio >= 1 else "tab:red" for r in anchors])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(range(len(anchors)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xlabel("speed-up of pyfici (anchor time / pyfici time)")
    ax.invert_yaxis()
    fig.tight_layout()
    from pyfici.engine import UserError
    from pyfici.engine.files import save_figure

    try:
        save_figure(fig, path, dpi=110)
    except OSError as e:
        raise UserError(f"--plot {path}: cannot write it ({e.strerror})") from None
    finally:
        plt.close(fig)


def run(families=FAMILIES, size: str = "small", device: str = "cpu", repeats: int | None = None, progress: bool = True) -> list[Row]:
    if device == "cuda" and not torch.cuda.is_available():
        from pyfici.engine import UserError

        raise UserError("--device cuda: no CUDA device is visible")
    return run_cases(load_cases(families, size, device), device, repeats, progress)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pyfici.engine.config import add_json_argument, count_type

    p.add_argument("--size", choices=("small", "full"), default="small", help="small: seconds; full: the sizes of real workloads (Market-1501, MSMT17 galleries, ResNet-50 parameter sets)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    p.add_argument("--family", action="append", choices=FAMILIES, help="restrict to a family (repeatable)")
    p.add_argument("--repeats", type=count_type(1), default=None, help="timed runs per implementation")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    add_json_argument(p)
    p.add_argument("--plot", metavar="PATH", help="write a speed-up bar chart (PNG)")


def main(args: argparse.Namespace) -> int:
    from pyfici.engine.config import emit_json
    from pyfici.engine.rundir import check_output_file

    # before the (long) run, not after it
    if args.json not in (None, "-"):
        check_output_file(args.json, "--json")
    if args.plot:
        check_output_file(args.plot, "--plot")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = run(tuple(args.family or FAMILIES), args.size, device, args.repeats, progress=not args.quiet)
    result = {"machine": machine_line(device), "size": args.size, "device": device, "rows": [r.__dict__ for r in rows]}
    if args.json == "-":
        emit_json(result, "-")
        return 0
    print(f"pyfici bench --size {args.size} --device {device}: {machine_line(device)}")
    print(format_table(rows))
    emit_json(result, args.json)
    if args.plot:
        plot_rows(rows, args.plot)
    return 0
