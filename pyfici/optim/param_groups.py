"""Layer-wise learning-rate param groups on pyfici.models layer groupings, with
timm's ``param_groups_layer_decay`` semantics.

The layers are the model's :class:`pyfici.models.LayerGroups` (stem first, head
last; :func:`pyfici.models.groups_for` finds them for the built-in backbones,
``pyfici.models.generic_groups`` gives them for any model). Layer ``i`` of ``L``
gets ``lr_scale = max(min_scale, layer_decay ** (L - 1 - i))`` (the head 1, each
layer below it ``layer_decay`` times the one above); a trainable parameter in no
group is treated as the last layer, as timm does. Parameters with ``ndim <= 1``
(norm weights, biases) and those whose name matches a ``no_weight_decay_list``
pattern (fnmatch, plus the model's ``no_weight_decay()`` names when it has that
method) get weight decay 0, the others ``weight_decay``. Groups are named
``layer_<i>_decay`` / ``layer_<i>_no_decay`` and ordered by their first parameter
in ``model.named_parameters()``, as timm orders them.

Each group carries ``lr_scale`` (what timm's schedulers multiply the base lr by)
and, when ``lr`` is given, ``lr = lr * lr_scale`` so torch.optim /
pyfici.optim use the scaled rates directly.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Collection

from torch import nn

__all__ = ["layer_decay_param_groups"]


def _layer_of_params(model: nn.Module, groups) -> dict[str, int]:
    """Parameter name -> layer index from the groups' module paths."""
    modules = dict(model.named_modules())
    out: dict[str, int] = {}
    for i, (gname, paths) in enumerate(groups.groups):
        for path in paths:
            if path not in modules:
                raise ValueError(f"layer group {gname!r}: the model has no submodule {path!r}")
            for pn, _ in modules[path].named_parameters(prefix=path):
                if pn in out and out[pn] != i:
                    raise ValueError(f"parameter {pn} is in two layer groups ({groups.names[out[pn]]!r} and {gname!r})")
                out[pn] = i
    return out


def layer_decay_param_groups(
    model: nn.Module,
    *,
    lr: float | None = None,
    weight_decay: float = 0.05,
    layer_decay: float = 0.75,
    no_weight_decay_list: Collection[str] = (),
    min_scale: float = 0.0,
    groups=None,
) -> list[dict]:
    """Param groups with layer-wise lr decay and no weight decay on norms / biases.

    model: any ``nn.Module``; groups: its :class:`pyfici.models.LayerGroups` (default
    ``pyfici.models.groups_for(model)``, which raises with instructions for an unknown
    model). lr: base learning rate; when given, each group's ``lr`` is ``lr * lr_scale``.
    weight_decay, layer_decay, no_weight_decay_list, min_scale: as timm's
    ``param_groups_layer_decay``.

    Returns a list of dicts with ``params``, ``lr_scale``, ``weight_decay``, ``name``
    (and ``lr``), for ``LayerwiseSGD`` / ``LayerwiseAdamW`` or any torch optimizer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay: must be in (0, 1], got {layer_decay}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay: must be >= 0, got {weight_decay}")
    if lr is not None and lr < 0:
        raise ValueError(f"lr: must be >= 0, got {lr}")
    if groups is None:
        from pyfici.models import groups_for

        groups = groups_for(model)
    layer_map = _layer_of_params(model, groups)
    n_layers = len(groups)
    if n_layers == 0:
        raise ValueError("groups: the layer grouping is empty")
    layer_max = n_layers - 1
    scales = [max(min_scale, layer_decay ** (layer_max - i)) for i in range(n_layers)]
    patterns = set(no_weight_decay_list)
    if hasattr(model, "no_weight_decay"):
        patterns |= set(model.no_weight_decay())

    out: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or any(fnmatch.fnmatch(name, pat) for pat in patterns)
        layer = layer_map.get(name, layer_max)
        key = f"layer_{layer}_{'no_decay' if no_decay else 'decay'}"
        g = out.get(key)
        if g is None:
            g = out[key] = {"name": key, "params": [], "lr_scale": scales[layer],
                            "weight_decay": 0.0 if no_decay else weight_decay}
            if lr is not None:
                g["lr"] = lr * scales[layer]
        g["params"].append(p)
    return list(out.values())
