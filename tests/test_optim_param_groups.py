"""pyfici.optim.layer_decay_param_groups against timm's param_groups_layer_decay: its
definition as timm documents it (layer scale layer_decay ** (L - 1 - i) per layer,
the head 1; no weight decay for ndim <= 1 params and no_weight_decay names; groups
per (layer, decay) in order of first parameter), and timm itself when it is
importable (timm's ResNet group_matcher gives the same layers as pyfici's ResNet
grouping: stem, one per residual block, head)."""

import fnmatch

import pytest
import torch
import torchvision
from torch import nn

from pyfici.models import generic_groups, groups_for
from pyfici.optim import LayerwiseSGD, layer_decay_param_groups


def _timm_definition(model, layer_map, n_layers, weight_decay, layer_decay, no_wd=(), min_scale=0.0):
    layer_max = n_layers - 1
    scales = [max(min_scale, layer_decay ** (layer_max - i)) for i in range(n_layers)]
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        nd = p.ndim <= 1 or any(fnmatch.fnmatch(name, pat) for pat in no_wd)
        lid = layer_map.get(name, layer_max)
        key = f"layer_{lid}_{'no_decay' if nd else 'decay'}"
        groups.setdefault(key, {"lr_scale": scales[lid], "weight_decay": 0.0 if nd else weight_decay, "params": []})
        groups[key]["params"].append(p)
    return list(groups.values())


def _same(ours, want):
    assert len(ours) == len(want)
    for a, b in zip(ours, want):
        assert a["lr_scale"] == pytest.approx(b["lr_scale"], rel=1e-15)
        assert a["weight_decay"] == b["weight_decay"]
        assert [id(p) for p in a["params"]] == [id(p) for p in b["params"]]


def test_resnet_groups_match_timm_definition():
    model = torchvision.models.resnet18()
    model.layer1[0].conv1.weight.requires_grad_(False)  # frozen params are left out, as in timm
    lg = groups_for(model)
    layer_map = {}
    modules = dict(model.named_modules())
    for i, (_, paths) in enumerate(lg.groups):
        for path in paths:
            for pn, _ in modules[path].named_parameters(prefix=path):
                layer_map[pn] = i
    for wd, ld, no_wd, ms in ((0.05, 0.75, (), 0.0), (0.1, 0.5, ("fc.*",), 0.01), (0.0, 1.0, (), 0.0)):
        ours = layer_decay_param_groups(model, weight_decay=wd, layer_decay=ld, no_weight_decay_list=no_wd, min_scale=ms)
        _same(ours, _timm_definition(model, layer_map, len(lg), wd, ld, no_wd, ms))
    g = layer_decay_param_groups(model, lr=0.1, layer_decay=0.5)
    head = [x for x in g if any(p is model.fc.weight for p in x["params"])][0]
    stem = [x for x in g if any(p is model.conv1.weight for p in x["params"])][0]
    assert head["lr"] == 0.1 and head["lr_scale"] == 1.0 and head["weight_decay"] == 0.05
    assert stem["lr_scale"] == 0.5 ** (len(lg) - 1) and stem["name"] == "layer_0_decay"
    bn = [x for x in g if any(p is model.bn1.weight for p in x["params"])][0]
    assert bn["weight_decay"] == 0.0 and bn["name"] == "layer_0_no_decay"


def test_same_groups_as_timm_itself():
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install timm to compare with it)")
    from timm.optim import param_groups_layer_decay

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False)
    for wd, ld in ((0.05, 0.75), (0.1, 0.6)):
        want = param_groups_layer_decay(model, weight_decay=wd, layer_decay=ld)
        ours = layer_decay_param_groups(model, weight_decay=wd, layer_decay=ld)
        _same(ours, want)


def test_unlisted_params_go_to_the_last_layer_and_optimizer_runs():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3)
            self.block = nn.Conv2d(4, 4, 3)
            self.head = nn.Linear(4, 2)
            self.scale = nn.Parameter(torch.ones(4, 4))  # in no group: treated as the last layer

        def no_weight_decay(self):
            return {"scale"}

    net = Net()
    lg = generic_groups(net, ["stem", "block", "head"], stem="stem", head="head")
    g = layer_decay_param_groups(net, lr=0.2, weight_decay=0.01, layer_decay=0.5, groups=lg)
    names = [x["name"] for x in g]
    # in order of first parameter: the module's own `scale` comes before its children's
    assert names == ["layer_2_no_decay", "layer_0_decay", "layer_0_no_decay", "layer_1_decay", "layer_1_no_decay",
                     "layer_2_decay"]
    last_nd = g[0]
    # `scale` (2-d, but in no_weight_decay()) shares the head's no-decay group with the head bias
    assert [id(p) for p in last_nd["params"]] == [id(net.scale), id(net.head.bias)] and last_nd["weight_decay"] == 0.0
    assert [x["lr"] for x in g] == pytest.approx([0.2, 0.05, 0.05, 0.1, 0.1, 0.2])
    opt = LayerwiseSGD(g, lr=1.0, momentum=0.9)
    net.head(net.block(net.stem(torch.randn(1, 3, 7, 7))).mean((2, 3))).sum().backward()
    before = net.stem.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, net.stem.weight)
    with pytest.raises(ValueError, match="layer_decay: must be in"):
        layer_decay_param_groups(net, layer_decay=0.0, groups=lg)
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        layer_decay_param_groups([net.stem.weight])
