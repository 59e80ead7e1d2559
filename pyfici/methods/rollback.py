"""Rolling-back fine-tuning for person re-identification.

"Backbone can not be trained at once: rolling back to pre-trained network for
person re-identification" (Ro et al., AAAI 2019, arXiv:1901.06140). Training
runs in periods; at the start of every period after the first, the high layer
groups are *rolled back*: every state entry of theirs (weights, biases and BN
running statistics) is copied again from the pre-trained network, while the
low groups and the head keep what they learned. See docs/rollback.md.

Library API::

    from pyfici.methods.rollback import RollbackConfig, run
    result = run(RollbackConfig(dataset="builtin", backbone="efficientnet_lite0",
                                epochs_per_period=3, out="runs/rb"))
    result["evaluations"][-1]["mAP"]

A schedule is data: a list of :class:`Period` (kept groups, reset groups, LR
per group). Group names are the layer groups of :mod:`pyfici.models`
(``stem``, ``layer1.0``, ..., ``head``) or a prefix of them (``layer1`` means
every ``layer1.*`` group). :func:`released_schedule` is the authors' 4-period
ResNet schedule; :func:`default_schedule` builds the same shape for any
grouping (blocks split into 4 contiguous stages). A schedule naming a group
that the backbone lacks is refused by :func:`resolve_schedule` before any
training. Schedules load from JSON (``--schedule FILE``)::

    [{"kept": ["stem", "layer1", "layer2", "layer3", "layer4", "head"], "reset": [],
      "lr": {"stem": 0.01, "layer1": 0.01, ..., "head": 0.1}}, ...]

Decisions where the paper and the released code are silent are listed in
docs/rollback.md (baseline LR schedule, optimizer state at period starts,
triplet mining, generic schedules).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from pyfici.methods._common import (
    atomic_save,
    check_resume_config,
    distributed_info,
    load_checkpoint,
    resolve_device,
    seed_everything,
    write_json,
)

__all__ = [
    "Period",
    "RollbackConfig",
    "ResolvedPeriod",
    "released_schedule",
    "default_schedule",
    "baseline_schedule",
    "load_schedule",
    "resolve_schedule",
    "roll_back_",
    "batch_hard_triplet_loss",
    "extract_features",
    "evaluate_model",
    "run",
    "demo",
    "add_train_arguments",
    "train_main",
    "add_eval_arguments",
    "eval_main",
]

# ----------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class Period:
    """One period of a rolling-back schedule.

    ``kept``: group names (or prefixes) that keep their current weights at the
    start of the period; ``reset``: groups copied back from the pre-trained
    state (weights and BN running stats); together they must cover every
    group once. ``lr``: learning rate per group name / prefix (every group
    must get exactly one; the most specific name wins when a group name and a
    prefix of it are both given).
    """

    kept: tuple[str, ...]
    reset: tuple[str, ...]
    lr: dict[str, float]

    def to_dict(self) -> dict:
        return {"kept": list(self.kept), "reset": list(self.reset), "lr": dict(self.lr)}

    @staticmethod
    def from_dict(d: dict) -> Period:
        missing = [k for k in ("kept", "reset", "lr") if k not in d]
        if missing:
            raise ValueError(f"schedule period: missing keys {missing} in {d!r} (expected kept, reset, lr)")
        return Period(tuple(d["kept"]), tuple(d["reset"]), {str(k): float(v) for k, v in d["lr"].items()})


@dataclass(frozen=True)
class ResolvedPeriod:
    """A :class:`Period` resolved against a model's groups: exact group names."""

    kept: tuple[str, ...]
    reset: tuple[str, ...]
    lr: dict[str, float]


def released_schedule(lr_first: float = 0.01, lr_head_first: float = 0.1, lr_kept: float = 0.001,
                      lr_reset: float = 0.01, lr_head: float = 0.01) -> list[Period]:
    """The authors' 4-period ResNet schedule (PAPERS.md section 3).

    | period | kept | reset | LR kept | LR reset | LR head |
    | 1 | all (pre-trained + new head) | - | 0.01 | - | 0.1 |
    | 2 | stem, head | layer1-4 | 0.001 | 0.01 | 0.01 |
    | 3 | stem, layer1, head | layer2-4 | 0.001 | 0.01 | 0.01 |
    | 4 | stem, layer1-2, head | layer3-4 | 0.001 | 0.01 | 0.01 |
    """
    body = ["stem", "layer1", "layer2", "layer3", "layer4"]
    return _stage_schedule(body, lr_first, lr_head_first, lr_kept, lr_reset, lr_head)


def _stage_schedule(body: Sequence[Any], lr_first, lr_head_first, lr_kept, lr_reset, lr_head) -> list[Period]:
    """Periods for ordered body stages ``body`` (stem first; each a name or a list of names)."""
    stages = [[s] if isinstance(s, str) else list(s) for s in body]
    flat = [g for s in stages for g in s]
    periods = [Period(tuple(flat) + ("head",), (), {**{g: lr_first for g in flat}, "head": lr_head_first})]
    for p in range(2, len(stages)):
        kept = [g for s in stages[: p - 1] for g in s]
        reset = [g for s in stages[p - 1 :] for g in s]
        lr = {**{g: lr_kept for g in kept}, **{g: lr_reset for g in reset}, "head": lr_head}
        periods.append(Period(tuple(kept) + ("head",), tuple(reset), lr))
    return periods


def default_schedule(groups, num_stages: int = 4, **lrs: float) -> list[Period]:
    """The released schedule's shape for any :class:`pyfici.models.LayerGroups`.

    ResNets (groups ``layerK.i``) use the released preset. Otherwise the block
    groups (everything between stem and head) are split into ``num_stages``
    contiguous stages of near-equal size; with the stem that gives
    ``num_stages`` periods: period p keeps the stem and stages 1..p-2 and
    resets the rest, as the released schedule does.
    """
    names = groups.names
    if groups.head is None or groups.stem is None:
        raise ValueError("default_schedule: the grouping needs a stem and a head group (LayerGroups(stem=..., head=...))")
    if all(any(b == f"layer{k}" or b.startswith(f"layer{k}.") for b in groups.blocks) for k in range(1, 5)) and \
            all(b.startswith("layer") for b in groups.blocks):
        return released_schedule(**lrs)
    blocks = groups.blocks
    if len(blocks) < num_stages:
        raise ValueError(f"default_schedule: {len(blocks)} block groups cannot make {num_stages} stages ({names})")
    bounds = [round(i * len(blocks) / num_stages) for i in range(num_stages + 1)]
    stages = [[groups.stem]] + [blocks[bounds[i] : bounds[i + 1]] for i in range(num_stages)]
    kw = dict(lr_first=0.01, lr_head_first=0.1, lr_kept=0.001, lr_reset=0.01, lr_head=0.01)
    kw.update(lrs)
    return _stage_schedule(stages, **kw)


def baseline_schedule(schedule: Sequence[Period]) -> list[Period]:
    """Fine-tuning at once: one period, nothing reset, the first period's LRs."""
    return [Period(schedule[0].kept, (), dict(schedule[0].lr))]


def load_schedule(path: str | os.PathLike) -> list[Period]:
    """Read a schedule from a JSON file: a list of ``{"kept": [...], "reset": [...], "lr": {...}}``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--schedule: no such file: {p}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--schedule {p}: not valid JSON ({e})") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"--schedule {p}: expected a non-empty JSON list of periods")
    return [Period.from_dict(d) for d in data]


def _match(selector: str, names: Sequence[str]) -> list[str]:
    return [n for n in names if n == selector or n.startswith(selector + ".")]


def resolve_schedule(schedule: Sequence[Period], groups) -> list[ResolvedPeriod]:
    """Check a schedule against a model's groups and expand names / prefixes.

    Refuses (``ValueError``, before any training) a schedule that names a group
    the backbone lacks, leaves a group out, lists one twice, resets the head
    (it is never re-initialised after period 1), resets anything in period 1
    (which starts from the pre-trained state), or gives an LR <= 0 or none.
    """
    names = groups.names
    head = groups.head
    if not schedule:
        raise ValueError("schedule: no periods")
    out = []
    for pi, per in enumerate(schedule, 1):
        where = f"schedule period {pi}"
        resolved: dict[str, str] = {}
        for kind, sels in (("kept", per.kept), ("reset", per.reset)):
            for sel in sels:
                hit = _match(sel, names)
                if not hit:
                    raise ValueError(f"{where}: {kind} names the group {sel!r}, which the backbone lacks; its groups are {names}")
                for g in hit:
                    if g in resolved:
                        raise ValueError(f"{where}: group {g!r} is listed twice ({resolved[g]} and {kind})")
                    resolved[g] = kind
        left = [g for g in names if g not in resolved]
        if left:
            raise ValueError(f"{where}: groups {left} are neither kept nor reset")
        reset = tuple(g for g in names if resolved[g] == "reset")
        if head is not None and head in reset:
            raise ValueError(f"{where}: resets the head {head!r}; the head is never re-initialised after period 1")
        if pi == 1 and reset:
            raise ValueError(f"{where}: period 1 starts from the pre-trained state; its reset list must be empty, got {list(reset)}")
        lr: dict[str, float] = {}
        for g in names:
            cands = [(len(sel), sel) for sel in per.lr if _match(sel, [g])]
            if not cands:
                raise ValueError(f"{where}: no learning rate for group {g!r} (lr keys: {list(per.lr)})")
            lr[g] = float(per.lr[max(cands)[1]])
            if not (lr[g] > 0 and math.isfinite(lr[g])):
                raise ValueError(f"{where}: learning rate of {g!r} must be a positive number, got {lr[g]}")
        unknown = [sel for sel in per.lr if not _match(sel, names)]
        if unknown:
            raise ValueError(f"{where}: lr names groups the backbone lacks: {unknown}; its groups are {names}")
        out.append(ResolvedPeriod(tuple(g for g in names if resolved[g] == "kept"), reset, lr))
    return out


# ----------------------------------------------------------------------------- roll-back


def _group_keys(model: nn.Module, groups, group_names: Sequence[str]) -> list[str]:
    """state_dict keys (parameters AND buffers) owned by the named groups."""
    keys = list(model.state_dict().keys())
    out = []
    for g in group_names:
        for path in groups.paths(g):
            out.extend(k for k in keys if k.startswith(path + "."))
    return out


def pretrained_state(model: nn.Module, groups) -> dict[str, torch.Tensor]:
    """A copy of every state entry of the non-head groups (the roll-back target)."""
    names = [g for g in groups.names if g != groups.head]
    sd = model.state_dict()
    return {k: sd[k].detach().clone() for k in _group_keys(model, groups, names)}


@torch.no_grad()
def roll_back_(model: nn.Module, groups, reset: Sequence[str], pretrained: dict[str, torch.Tensor]) -> int:
    """Copy every state entry of the ``reset`` groups (weights, biases, BN running
    mean / var / num_batches_tracked) from ``pretrained``, in place. Returns the
    number of tensors copied."""
    sd = model.state_dict()
    keys = _group_keys(model, groups, reset)
    for k in keys:
        if k not in pretrained:
            raise KeyError(f"roll-back: {k} has no pre-trained value")
        sd[k].copy_(pretrained[k])
    return len(keys)


def _fingerprint(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-tensor (sum, sum of squares) in float64: identifies a pre-trained state."""
    rows = [torch.stack([v.double().sum(), v.double().pow(2).sum()]) for _, v in sorted(state.items())]
    return torch.stack(rows).cpu() if rows else torch.zeros(0, 2, dtype=torch.float64)


# ----------------------------------------------------------------------------- losses


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


# ----------------------------------------------------------------------------- config


@dataclass
class RollbackConfig:
    """Everything a rolling-back (or baseline) run depends on.

    Released defaults: batch 32, 288x144, SGD momentum 0.9 Nesterov, weight
    decay 5e-4, 40 epochs per period, StepLR(step = half a period, gamma 0.1).
    """

    dataset: str = "builtin"
    root: str | None = None
    backbone: str = "resnet50"
    pretrained: str | None = None
    schedule: str | None = None  # JSON file; None = default_schedule(groups)
    epochs_per_period: int = 40
    baseline: bool = False
    batch_size: int = 32
    image_size: tuple[int, int] = (288, 144)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    lr_step: int | None = None  # StepLR step in epochs; None = ceil(half a period) (half the run for --baseline)
    lr_gamma: float = 0.1
    triplet: bool = False
    triplet_margin: float = 0.3
    triplet_weight: float = 1.0
    p: int = 8  # identities per batch with --triplet (PK sampling)
    k: int = 4  # images per identity with --triplet
    eval_every: int = 10  # evaluate before training, every N epochs and at the end; 0 = only at the end
    protocol: str = "market1501"
    max_rank: int = 50
    seed: int = 0
    device: str = "auto"
    workers: int = 2
    out: str = "runs/rollback"
    resume: bool = False
    stop_after_epochs: int | None = None  # end this invocation after N epochs in total (resume later)
    builtin_ids: int = 32
    builtin_cams: int = 3
    builtin_images_per_cam: int = 3
    quiet: bool = False
    threads: int | None = None  # torch.set_num_threads for this run (None = leave as is)

    # keys that do not change the training trajectory (allowed to differ on --resume)
    RESUME_IGNORE = ("device", "workers", "out", "resume", "stop_after_epochs", "quiet", "eval_every", "max_rank",
                     "threads")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        return d


# ----------------------------------------------------------------------------- data / model plumbing


def _transforms(image_size: Sequence[int], train: bool):
    try:
        from torchvision import transforms as T
    except ImportError as e:
        raise ImportError("rolling-back needs torchvision for its image transforms: pip install 'pyfici[vision]'") from e

    t = [T.Resize(tuple(image_size), interpolation=T.InterpolationMode.BICUBIC)]
    if train:
        t.append(T.RandomHorizontalFlip())
    t += [T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
    return T.Compose(t)


def _load_dataset(cfg: RollbackConfig):
    from pyfici.data.reid import load_reid_dataset

    if cfg.dataset == "builtin":
        return load_reid_dataset("builtin", num_ids=cfg.builtin_ids, num_cams=cfg.builtin_cams,
                                 images_per_cam=cfg.builtin_images_per_cam, size=tuple(cfg.image_size), seed=cfg.seed)
    return load_reid_dataset(cfg.dataset, cfg.root)


def _build_model(cfg: RollbackConfig, num_classes: int, model_fn: Callable[[int], nn.Module] | None):
    from pyfici.models import build_backbone, groups_for

    torch.manual_seed(cfg.seed)  # the new head's initialisation
    model = model_fn(num_classes) if model_fn is not None else build_backbone(cfg.backbone, cfg.pretrained, num_classes)
    for attr in ("features", "head"):
        if not hasattr(model, attr):
            raise ValueError(f"rolling-back needs a model with .features(x) and .head (see pyfici.models); "
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


@torch.no_grad()
def extract_features(model: nn.Module, items, image_size: Sequence[int], device, batch_size: int = 64,
                     workers: int = 0) -> torch.Tensor:
    """Pooled features of ``items`` ((image, pid, camid) tuples): original + flipped
    summed, L2-normalised -> (N, D) float32 on ``device``."""
    from pyfici.data.reid import ReIDImageDataset
    from pyfici.models import pool_features

    m = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    was = m.training
    m.eval()
    loader = torch.utils.data.DataLoader(ReIDImageDataset(items, _transforms(image_size, train=False)),
                                         batch_size=batch_size, shuffle=False, num_workers=workers,
                                         generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone
    feats = [pool_features(m, x.to(device)) for x, _, _ in loader]
    m.train(was)
    return torch.cat(feats)


def evaluate_model(model: nn.Module, data, image_size: Sequence[int], device, protocol: str = "market1501",
                   max_rank: int = 50, batch_size: int = 64, workers: int = 0, rerank: bool = False):
    """Evaluate a model on ``data.query`` vs ``data.gallery`` with ``pyfici.reid.evaluate``
    (cosine on pooled, flip-summed, L2-normalised features). Returns a ``ReIDResult``."""
    import pyfici.reid as reid

    if rerank and not hasattr(reid, "rerank"):
        try:
            import pyfici.reid.rerank  # noqa: F401
        except ImportError:
            raise RuntimeError("--rerank: pyfici.reid.rerank is not available in this build of pyfici") from None
    qf = extract_features(model, data.query, image_size, device, batch_size, workers)
    gf = extract_features(model, data.gallery, image_size, device, batch_size, workers)

    def ids(items, j):
        return torch.tensor([it[j] for it in items], dtype=torch.long, device=qf.device)

    return reid.evaluate(qf, gf, ids(data.query, 1), ids(data.gallery, 1), ids(data.query, 2), ids(data.gallery, 2),
                         metric="cosine", max_rank=min(max_rank, len(data.gallery)), protocol=protocol, rerank=rerank)


# ----------------------------------------------------------------------------- training


def _plot(history: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [e["epoch"] for e in history["epochs"]]
    loss = [e["loss"] for e in history["epochs"]]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(ep, loss, color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss", color="tab:blue")
    ax2 = ax.twinx()
    ev = history["evaluations"]
    ax2.plot([e["epoch"] for e in ev], [100 * e["mAP"] for e in ev], "o-", color="tab:red", label="mAP")
    ax2.set_ylabel("mAP (%)", color="tab:red")
    for i, e in enumerate(history["rollback_epochs"]):
        ax.axvline(e + 0.5, color="gray", ls="--", lw=1, label="roll-back" if i == 0 else None)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def run(cfg: RollbackConfig, *, model_fn: Callable[[int], nn.Module] | None = None, data=None,
        schedule: Sequence[Period] | None = None) -> dict:
    """Train with rolling-back (or the fine-tune-at-once baseline with ``cfg.baseline``).

    ``model_fn(num_classes)`` overrides ``cfg.backbone`` (a model with
    ``.features(x)``, ``.head`` and a grouping known to
    ``pyfici.models.groups_for``); ``data`` overrides the dataset (a
    ``ReIDDataset``); ``schedule`` overrides ``cfg.schedule``. Writes
    ``cfg.out``/``last.pt`` (atomic, every epoch), ``metrics.json`` and
    ``curves.png``. Returns ``{"evaluations": [...], "epochs": [...],
    "rollback_epochs": [...], "final": {...}, "cmc": [...], "config": {...},
    "seconds_per_epoch": float, "model": nn.Module}``. ``cfg.threads`` applies
    to this call only.
    """
    threads = torch.get_num_threads()
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        return _run(cfg, model_fn, data, schedule)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: RollbackConfig, model_fn, data, schedule) -> dict:
    rank, world, local = distributed_info()
    distributed = world > 1
    if distributed and not torch.distributed.is_initialized():
        backend = "nccl" if cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available()) else "gloo"
        torch.distributed.init_process_group(backend)
    device = resolve_device(cfg.device)
    if distributed and device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    main = rank == 0
    say = (lambda *a: print(*a, flush=True)) if (main and not cfg.quiet) else (lambda *a: None)
    if cfg.epochs_per_period < 1:
        raise ValueError(f"--epochs-per-period must be >= 1, got {cfg.epochs_per_period}")
    if cfg.protocol not in ("market1501", "torchreid", "cuhk03"):
        raise ValueError(f"--protocol must be market1501, torchreid or cuhk03, got {cfg.protocol!r}")

    seed_everything(cfg.seed)
    data = data if data is not None else _load_dataset(cfg)
    num_classes = data.num_train_pids
    if num_classes < 2:
        raise ValueError(f"{data.name}: the training split has {num_classes} identities; need at least 2")
    model, groups = _build_model(cfg, num_classes, model_fn)
    if schedule is None:
        schedule = load_schedule(cfg.schedule) if cfg.schedule else default_schedule(groups)
    periods = resolve_schedule(schedule, groups)  # refuses bad schedules before training
    if cfg.baseline:
        period_epochs = cfg.epochs_per_period * len(periods)
        periods = [ResolvedPeriod(tuple(groups.names), (), dict(periods[0].lr))]
    else:
        period_epochs = cfg.epochs_per_period
    total = period_epochs * len(periods)
    model.to(device)
    pre = pretrained_state(model, groups)
    fingerprint = _fingerprint(pre)

    out = Path(cfg.out)
    ckpt_path = out / "last.pt"
    history: dict[str, Any] = {"epochs": [], "evaluations": [], "rollback_epochs": []}
    start_epoch = 0
    ckpt = None
    conf = cfg.to_dict()
    conf["schedule_periods"] = [asdict(p) for p in periods]
    if cfg.resume:
        if ckpt_path.is_file():
            ckpt = load_checkpoint(ckpt_path, map_location="cpu")
            check_resume_config(ckpt["config"], conf, ignore=RollbackConfig.RESUME_IGNORE)
            saved_fp = ckpt["pretrained_fingerprint"]
            # float64 sums: tolerant to summation order on another device, not to other weights
            if saved_fp.shape != fingerprint.shape or not torch.allclose(saved_fp, fingerprint, rtol=1e-9, atol=1e-9):
                raise ValueError("--resume: the pre-trained weights differ from those the checkpoint was trained from")
            model.load_state_dict(ckpt["model"])
            history = ckpt["history"]
            start_epoch = int(ckpt["epoch"])
            say(f"resuming from {ckpt_path} after epoch {start_epoch}")
        else:
            say(f"--resume: no checkpoint at {ckpt_path}; starting from the beginning")

    fwd = _TrainForward(model)
    if distributed:
        fwd = nn.parallel.DistributedDataParallel(fwd, device_ids=[device.index] if device.type == "cuda" else None)

    from pyfici.data.reid import PKSampler, ReIDImageDataset

    train_set = ReIDImageDataset(data.train, _transforms(cfg.image_size, train=True))
    train_pids = [p for _, p, _ in data.train]

    def loader_for(epoch: int):
        g = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
        kw = dict(num_workers=cfg.workers, generator=g, persistent_workers=False)
        if cfg.triplet:
            s = PKSampler(train_pids, cfg.p, cfg.k, seed=cfg.seed, rank=rank, world_size=world)
            s.set_epoch(epoch)
            return torch.utils.data.DataLoader(train_set, batch_sampler=s, **kw)
        n_rank = len(train_set) // world
        # drop the ragged last batch when there are full ones, and always a batch of 1 (BatchNorm1d cannot train on it)
        drop = n_rank > cfg.batch_size or n_rank % cfg.batch_size == 1
        if distributed:
            s = torch.utils.data.distributed.DistributedSampler(train_set, num_replicas=world, rank=rank,
                                                                shuffle=True, seed=cfg.seed, drop_last=True)
            s.set_epoch(epoch)
            return torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, sampler=s, drop_last=drop, **kw)
        return torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=drop, **kw)

    def save(epoch_done: int, opt, sched) -> None:
        if not main:
            return
        state = {
            "config": conf, "epoch": epoch_done, "model": model.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "torch_rng": torch.get_rng_state(), "history": history,
            "pretrained_fingerprint": fingerprint, "num_classes": num_classes,
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        atomic_save(state, ckpt_path)

    def evaluate_now(epoch: int, period: int) -> None:
        if main:
            res = evaluate_model(model, data, cfg.image_size, device, cfg.protocol, cfg.max_rank, workers=cfg.workers)
            row = {"epoch": epoch + 1, "period": period + 1, "mAP": res.mAP, "rank1": res.rank1, "mINP": res.mINP,
                   **{f"rank{r}": res.rank(r) for r in (5, 10) if r <= len(res.cmc)}, "cmc": res.cmc.tolist()}
            history["evaluations"].append(row)
            say(f"  eval epoch {epoch + 1}: mAP {100 * res.mAP:.2f}  rank-1 {100 * res.rank1:.2f}  mINP {100 * res.mINP:.2f}")
        if distributed:
            torch.distributed.barrier()

    opt = sched = None
    stop_at = total if cfg.stop_after_epochs is None else min(total, cfg.stop_after_epochs)
    mode = "baseline (fine-tune at once)" if cfg.baseline else f"rolling-back, {len(periods)} periods"
    say(f"{mode}: {total} epochs, {num_classes} training identities, {len(data.train)} images, device {device}")
    if start_epoch == 0 and cfg.eval_every > 0 and stop_at > 0:
        evaluate_now(-1, 0)  # the pre-trained backbone (epoch 0): the reference every curve starts from
    for epoch in range(start_epoch, stop_at):
        period_idx, in_period = divmod(epoch, period_epochs)
        period = periods[period_idx]
        if opt is None or in_period == 0:
            if in_period == 0 and period_idx > 0:
                # a checkpoint taken at a period's end precedes the roll-back, so resuming there rolls back too
                n = roll_back_(model, groups, period.reset, pre)
                if epoch not in history["rollback_epochs"]:
                    history["rollback_epochs"].append(epoch)
                say(f"period {period_idx + 1}: rolled back {len(period.reset)} groups ({n} tensors) to the pre-trained state")
            opt = _make_optimizer(cfg, model, groups, period)
            sched = torch.optim.lr_scheduler.StepLR(opt, _lr_step(cfg, period_epochs), cfg.lr_gamma)
            if ckpt is not None and epoch == start_epoch and in_period != 0:
                opt.load_state_dict(ckpt["optimizer"])
                sched.load_state_dict(ckpt["scheduler"])
            if ckpt is not None and epoch == start_epoch:
                torch.set_rng_state(ckpt["torch_rng"])
                if "cuda_rng" in ckpt and torch.cuda.is_available():
                    torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        model.train()
        lrs = {pg["name"]: pg["lr"] for pg in opt.param_groups}
        t0 = time.perf_counter()
        loader = loader_for(epoch)
        tot_loss, tot_n, correct = 0.0, 0, 0
        try:
            from tqdm import tqdm

            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{total} (period {period_idx + 1})", leave=False,
                       disable=not main or cfg.quiet, dynamic_ncols=True)
        except ImportError:  # pragma: no cover
            bar = loader
        for x, pid, _ in bar:
            x, pid = x.to(device, non_blocking=True), pid.to(device, non_blocking=True)
            feat, logits = fwd(x)
            loss = F.cross_entropy(logits, pid)
            if cfg.triplet:
                loss = loss + cfg.triplet_weight * batch_hard_triplet_loss(feat, pid, cfg.triplet_margin)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            b = x.shape[0]
            loss_v = float(loss.detach())
            tot_loss += loss_v * b
            tot_n += b
            correct += int((logits.argmax(1) == pid).sum())
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss_v:.3f}")
        sched.step()
        dt = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "period": period_idx + 1, "loss": tot_loss / max(tot_n, 1),
               "train_acc": correct / max(tot_n, 1), "seconds": dt, "lr": lrs}
        history["epochs"].append(row)
        lr_txt = " ".join(f"{k}={v:g}" for k, v in _compact_lrs(lrs).items())
        say(f"epoch {epoch + 1}/{total} period {period_idx + 1}: loss {row['loss']:.4f} acc {100 * row['train_acc']:.1f}% "
            f"{dt:.1f}s  lr {lr_txt}")
        last = epoch + 1 == total
        if last or (cfg.eval_every > 0 and (epoch + 1) % cfg.eval_every == 0):
            evaluate_now(epoch, period_idx)
        save(epoch + 1, opt, sched)
        if main:
            _write_outputs(out, history, conf, cfg.baseline)
    ckpt = None
    if distributed:
        torch.distributed.barrier()
    ev = history["evaluations"]
    final = {k: v for k, v in ev[-1].items() if k != "cmc"} if ev else {}
    secs = [e["seconds"] for e in history["epochs"]]
    return {**history, "final": final, "cmc": ev[-1]["cmc"] if ev else [], "config": conf,
            "seconds_per_epoch": sum(secs) / len(secs) if secs else float("nan"),
            "completed_epochs": len(history["epochs"]), "total_epochs": total, "model": model}


def _compact_lrs(lrs: dict[str, float]) -> dict[str, float]:
    """Merge consecutive groups with the same LR for logging (layer1.0..layer1.2 -> layer1.0-layer1.2)."""
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


def _write_outputs(out: Path, history: dict, conf: dict, baseline: bool) -> None:
    write_json({"method": "baseline" if baseline else "rollback", "evaluations": history["evaluations"],
                "epochs": history["epochs"], "rollback_epochs": history["rollback_epochs"], "config": conf},
               out / "metrics.json")
    try:
        _plot(history, out / "curves.png", "fine-tune at once (baseline)" if baseline else "rolling-back")
    except Exception as e:  # a plot must never kill a training run
        print(f"warning: could not write the plot: {e}", file=sys.stderr)


# ----------------------------------------------------------------------------- demo helper


def demo(out: str | os.PathLike = "runs/rollback_demo", epochs_per_period: int = 2, backbone: str = "efficientnet_lite0",
         image_size: tuple[int, int] = (96, 48), seed: int = 0, quiet: bool = True,
         model_fn: Callable[[int], nn.Module] | None = None, **overrides: Any) -> dict:
    """A short rolling-back run and the same-epoch baseline on the built-in data.

    Returns ``{"rollback": result, "baseline": result}`` (see :func:`run`; each
    has ``evaluations`` with mAP / rank-1 per evaluation, ``final``, ``cmc`` and
    ``seconds_per_epoch``). EfficientNet-Lite0 with its ImageNet weights from
    pip, 32 built-in identities (16 train), 96x48 images, 4 periods x 2 epochs
    vs 8 epochs at once: a few minutes on 2 busy CPU cores (see docs/rollback.md).
    ``overrides`` go to :class:`RollbackConfig` (e.g. ``threads=1``); ``model_fn`` as in :func:`run`.
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


# ----------------------------------------------------------------------------- CLI


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    d = RollbackConfig()
    p.add_argument("--dataset", default="builtin",
                   choices=["market1501", "dukemtmc", "cuhk03-detected", "cuhk03-labeled", "msmt17", "builtin"])
    p.add_argument("--root", default=None, help="dataset folder (not needed for --dataset builtin)")
    p.add_argument("--backbone", default=d.backbone, help="resnet18|resnet34|resnet50|resnet101|efficientnet_lite0")
    p.add_argument("--pretrained", default=None, help="ImageNet state_dict file ('none' = random init)")
    p.add_argument("--schedule", default=None, help="JSON schedule file (default: the released preset)")
    p.add_argument("--epochs-per-period", type=int, default=d.epochs_per_period)
    p.add_argument("--baseline", action="store_true", help="fine-tune at once for the same total epochs")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    p.add_argument("--image-size", type=int, nargs=2, default=list(d.image_size), metavar=("H", "W"))
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--lr-step", type=int, default=None, help="StepLR step in epochs (default: half a period)")
    p.add_argument("--lr-gamma", type=float, default=d.lr_gamma)
    p.add_argument("--triplet", action="store_true", help="add a batch-hard triplet loss (PK sampling)")
    p.add_argument("--triplet-margin", type=float, default=d.triplet_margin)
    p.add_argument("--ids-per-batch", dest="p", type=int, default=d.p, metavar="P",
                   help="identities per batch with --triplet (PK sampling)")
    p.add_argument("--images-per-id", dest="k", type=int, default=d.k, metavar="K",
                   help="images per identity with --triplet (PK sampling)")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="evaluate before training, every N epochs and at the end (0: only at the end)")
    p.add_argument("--protocol", default=d.protocol, choices=["market1501", "torchreid", "cuhk03"])
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--out", default=d.out)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--stop-after-epochs", type=int, default=None, help="stop after N epochs in total (resume later)")
    p.add_argument("--builtin-ids", type=int, default=d.builtin_ids)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--quiet", action="store_true")


def _config_from_args(args: argparse.Namespace) -> RollbackConfig:
    names = {f.name for f in fields(RollbackConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names and v is not None}
    kw["image_size"] = tuple(args.image_size)
    kw["nesterov"] = True
    return RollbackConfig(**kw)


def train_main(args: argparse.Namespace) -> int:
    cfg = _config_from_args(args)
    try:
        res = run(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if res["final"] and distributed_info()[0] == 0:
        f = res["final"]
        print(f"done: mAP {100 * f['mAP']:.2f}  rank-1 {100 * f['rank1']:.2f}  "
              f"({res['seconds_per_epoch']:.1f} s/epoch); metrics in {Path(cfg.out) / 'metrics.json'}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a last.pt written by `pyfici train rollback`")
    p.add_argument("--dataset", default=None, help="default: the checkpoint's")
    p.add_argument("--root", default=None)
    p.add_argument("--protocol", default=None, choices=["market1501", "torchreid", "cuhk03"])
    p.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking (pyfici.reid.rerank)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def eval_main(args: argparse.Namespace) -> int:
    try:
        ck = load_checkpoint(args.checkpoint)
        conf = dict(ck["config"])
        known = {f.name for f in fields(RollbackConfig)}
        cfg = RollbackConfig(**{k: v for k, v in conf.items() if k in known})
        cfg.image_size = tuple(cfg.image_size)
        cfg.pretrained = "none"  # every weight comes from the checkpoint
        if args.dataset:
            cfg.dataset = args.dataset
        if args.root:
            cfg.root = args.root
        data = _load_dataset(cfg)
        device = resolve_device(args.device)
        import contextlib
        import warnings

        # the weights come from the checkpoint: silence the builder's "randomly initialised" notes
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            model, _ = _build_model(cfg, int(ck["num_classes"]), None)
        model.load_state_dict(ck["model"])
        model.to(device)
        res = evaluate_model(model, data, cfg.image_size, device, args.protocol or cfg.protocol, cfg.max_rank,
                             args.batch_size, args.workers, rerank=args.rerank)
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    d = res.as_dict()
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        print(f"{data.name} ({res.protocol}{', re-ranked' if args.rerank else ''}): {res.num_valid}/{res.num_queries} valid queries")
        for k in ("rank1", "rank5", "rank10"):
            if k in d:
                print(f"  {k:<6} {100 * d[k]:6.2f}")
        print(f"  mAP    {100 * res.mAP:6.2f}\n  mINP   {100 * res.mINP:6.2f}")
    return 0
