"""Rolling-back's schedule: periods (kept / reset groups, LR per group), the presets,
their validation against a model's groups, and the roll-back itself."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn


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
    """The authors' 4-period ResNet schedule.

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


def fingerprint(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-tensor (sum, sum of squares) in float64: identifies a pre-trained state."""
    rows = [torch.stack([v.double().sum(), v.double().pow(2).sum()]) for _, v in sorted(state.items())]
    return torch.stack(rows).cpu() if rows else torch.zeros(0, 2, dtype=torch.float64)

