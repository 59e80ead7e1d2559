"""Pruning masks for :meth:`LayerwiseSGD.set_mask` / :meth:`LayerwiseAdamW.set_mask`
(bool tensors of the weight's shape, True = keep), without writing them by hand.

- :func:`magnitude_mask` / :func:`global_magnitude_masks`: unstructured magnitude
  pruning of one tensor or of many with one global threshold, the masks
  ``torch.nn.utils.prune.l1_unstructured`` / ``global_unstructured`` compute
  (the same elements, ties included).
- :func:`nm_mask` / :func:`nm_masks`: N:M structured sparsity as Apex ASP
  computes it (``m4n2_1d``: in each group of 4 consecutive weights along the
  input dimension the 2 of largest magnitude are kept).
- :func:`torch_prune_masks`: the masks a model already carries from
  ``torch.nn.utils.prune`` (``weight_mask`` buffers next to ``weight_orig``) or
  from a mask parametrization (``torch.ao.pruning``'s ``FakeSparsity``), keyed by
  the parameter the optimizer sees.

Every function returns masks on the weight's device; ``optimizer.set_masks(...)``
applies a dict of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import cache
from itertools import permutations

import torch
from torch import nn

__all__ = ["magnitude_mask", "global_magnitude_masks", "nm_mask", "nm_masks", "torch_prune_masks"]


def _n_pruned(amount, numel: int, name: str = "sparsity") -> int:
    """Elements to prune: a fraction in [0, 1] (rounded, as torch.nn.utils.prune) or a count."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise TypeError(f"{name}: expected a float in [0, 1] or an int count, got {type(amount).__name__}")
    if isinstance(amount, int):
        if not 0 <= amount <= numel:
            raise ValueError(f"{name}: a count must be in [0, {numel}], got {amount}")
        return amount
    if not 0.0 <= amount <= 1.0:
        raise ValueError(f"{name}: a fraction must be in [0, 1], got {amount}")
    return round(amount * numel)


def _check_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating point tensor, got {t.dtype}")
    return t.detach()


def magnitude_mask(weight: torch.Tensor, sparsity: float | int) -> torch.Tensor:
    """Keep-mask pruning the ``sparsity`` fraction (or count) of ``weight``'s elements of
    smallest magnitude. The pruned elements are those of
    ``torch.nn.utils.prune.l1_unstructured(module, name, amount=sparsity)``.

    Returns a bool tensor of ``weight``'s shape and device.
    """
    w = _check_tensor("weight", weight)
    k = _n_pruned(sparsity, w.numel())
    mask = torch.ones(w.shape, dtype=torch.bool, device=w.device)
    if k:
        idx = torch.topk(w.abs().reshape(-1), k=k, largest=False).indices
        mask.view(-1)[idx] = False
    return mask


def global_magnitude_masks(weights: Iterable[torch.Tensor], sparsity: float | int) -> list[torch.Tensor]:
    """Keep-masks pruning the ``sparsity`` fraction (or count) of all elements of
    ``weights`` taken together, smallest magnitude first (one global threshold, so
    layers are pruned unevenly). The pruned elements are those of
    ``torch.nn.utils.prune.global_unstructured(..., pruning_method=L1Unstructured,
    amount=sparsity)`` on the same tensors in the same order.

    Returns one bool mask per weight (its shape and device).
    """
    ws = [_check_tensor(f"weights[{i}]", w) for i, w in enumerate(weights)]
    if not ws:
        return []
    dev = ws[0].device
    for i, w in enumerate(ws):
        if w.device != dev:
            raise ValueError(f"weights[{i}]: all weights must be on one device ({dev}), got {w.device}")
    flat = torch.cat([w.reshape(-1).abs().to(torch.float64 if w.dtype == torch.float64 else torch.float32)
                      for w in ws])
    k = _n_pruned(sparsity, flat.numel())
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=dev)
    if k:
        keep[torch.topk(flat, k=k, largest=False).indices] = False
    out, start = [], 0
    for w in ws:
        out.append(keep[start:start + w.numel()].reshape(w.shape).clone())
        start += w.numel()
    return out


@cache
def _nm_patterns(n: int, m: int) -> torch.Tensor:
    """The valid keep-patterns of a group of m (n ones), float32 [P, m], in the order Apex
    ASP enumerates them: the iteration order of the set of the permutations of
    n ones followed by m - n zeros. A tie between patterns goes to the first in this order."""
    base = [1.0] * n + [0.0] * (m - n)
    return torch.tensor(list(set(permutations(base))), dtype=torch.float32)


def nm_mask(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """N:M structured keep-mask of ``weight`` as Apex ASP computes it (``m4n2_1d`` for
    the default 2:4): within each group of ``m`` consecutive elements along the input
    dimension, the pattern of ``n`` kept elements with the largest sum of magnitudes
    (the ``n`` largest; ties resolved as ASP resolves them).

    The input dimension is dim 1 (Linear ``[out, in]``, Conv ``[out, in, *kernel]``:
    groups run over input channels at each output channel and kernel position); for a
    1-d tensor, the tensor itself. Magnitudes are compared in float32, as ASP does. A
    last group shorter than ``m`` (input dimension not a multiple of ``m``, which ASP
    itself refuses) is scored as if padded with zeros. Returns a bool tensor of
    ``weight``'s shape and device.
    """
    w = _check_tensor("weight", weight)
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
        raise ValueError(f"n, m: expected integers with 0 < n <= m, got n={n}, m={m}")
    if w.dim() == 0:
        raise ValueError("weight: expected a tensor with at least one dimension, got a scalar")
    x = w.reshape(1, -1) if w.dim() == 1 else w.movedim(1, -1)
    lead, c = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, c).float().abs()
    pad = (-c) % m
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    groups = rows.reshape(-1, m)
    patterns = _nm_patterns(n, m).to(groups.device)
    best = torch.argmax(groups @ patterns.t(), dim=1)
    keep = patterns[best].bool().reshape(rows.shape)[:, :c].reshape(*lead, c)
    keep = keep.reshape(w.shape) if w.dim() == 1 else keep.movedim(-1, 1)
    return keep.contiguous()


def nm_masks(model: nn.Module, n: int = 2, m: int = 4, *, types=(nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d),
             min_in_features: int = 0) -> dict[nn.Parameter, torch.Tensor]:
    """:func:`nm_mask` for the ``weight`` of every module of ``types`` in ``model`` whose
    input dimension is a multiple of ``m`` and at least ``min_in_features`` (Apex ASP
    prunes Linear and Conv weights whose input dimension suits the sparse tensor cores).
    Returns ``{weight parameter: mask}`` for ``optimizer.set_masks``."""
    out: dict[nn.Parameter, torch.Tensor] = {}
    for mod in model.modules():
        if not isinstance(mod, types):
            continue
        w = getattr(mod, "weight", None)
        if not isinstance(w, nn.Parameter) or w.dim() < 2:
            continue
        c = w.shape[1]
        if c % m or c < min_in_features:
            continue
        out[w] = nm_mask(w, n, m)
    return out


def torch_prune_masks(model: nn.Module) -> dict[nn.Parameter, torch.Tensor]:
    """The pruning masks ``model`` carries, keyed by the parameter the optimizer updates:

    - ``torch.nn.utils.prune``: a module pruned on ``name`` has the parameter
      ``name + "_orig"`` and the buffer ``name + "_mask"``; the mask is keyed by the
      ``_orig`` parameter (the optimizer's param; the module's ``name`` is recomputed
      from it as ``orig * mask`` at every forward).
    - parametrizations (``torch.nn.utils.parametrize``) whose parametrization object has a
      ``mask`` tensor of the parameter's shape (``torch.ao.pruning``'s ``FakeSparsity``):
      keyed by ``module.parametrizations[name].original``.

    ``optimizer.set_masks(torch_prune_masks(model))`` then keeps the pruned weights at
    exactly 0 in the optimizer's params and state, with the fused masked step.
    """
    out: dict[nn.Parameter, torch.Tensor] = {}
    for mod in model.modules():
        params = dict(mod.named_parameters(recurse=False))
        for bname, buf in mod.named_buffers(recurse=False):
            if not bname.endswith("_mask") or buf is None:
                continue
            orig = params.get(bname[: -len("_mask")] + "_orig")
            if orig is not None and buf.shape == orig.shape:
                out[orig] = buf.detach() != 0
        plists = getattr(mod, "parametrizations", None)
        if isinstance(plists, Mapping) or isinstance(plists, nn.ModuleDict):
            for _, plist in plists.items():
                orig = getattr(plist, "original", None)
                if not isinstance(orig, nn.Parameter):
                    continue
                for par in plist:
                    mask = getattr(par, "mask", None)
                    if isinstance(mask, torch.Tensor) and mask.shape == orig.shape:
                        out[orig] = mask.detach() != 0
    return out
