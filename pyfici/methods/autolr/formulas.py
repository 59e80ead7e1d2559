"""AutoLR's formulas: weight variation, sorting score, threshold schedule, target
variation, LR update and the automatic pruning rule (see the package docstring)."""

from __future__ import annotations

import math
from typing import Any

import torch

VARIATION_SCALE = 1e6

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

