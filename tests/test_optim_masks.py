"""pyfici.optim.masks: magnitude masks equal torch.nn.utils.prune's, the 2:4 mask equals
Apex ASP's m4n2_1d pattern (its algorithm written out here from its definition:
per output row and kernel position, groups of 4 along the input channels, the best
of the 6 keep-2 patterns by summed magnitude, ties to the first pattern in ASP's
enumeration), and a torch.nn.utils.prune'd model trains under LayerwiseSGD with its
zeros kept."""

from itertools import permutations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from pyfici.optim import (
    LayerwiseAdamW,
    LayerwiseSGD,
    global_magnitude_masks,
    magnitude_mask,
    nm_mask,
    nm_masks,
    torch_prune_masks,
)


def _asp_m4n2_1d(w: torch.Tensor) -> torch.Tensor:
    """Apex ASP's create_mask(w, "m4n2_1d") from its definition: the weight is laid out
    as rows of input channels (1-d: one row; 2-d [K, C]; 3-d [K, C, R] as [K*R, C];
    4-d [K, C, R, S] as [R*S*K, C]); each group of 4 consecutive entries of a row
    scores the 6 keep-2 patterns by summed |w| (float32) and takes the best, the first
    of the enumeration order (Python's set of the permutations of [1, 1, 0, 0]) on ties."""
    pats = torch.tensor(list(set(permutations([1.0, 1.0, 0.0, 0.0]))))
    t = w.detach().float()
    shape = t.shape
    if t.dim() == 1:
        rows = t.view(1, -1)
    elif t.dim() == 2:
        rows = t
    elif t.dim() == 3:
        rows = t.permute(0, 2, 1).reshape(shape[0] * shape[2], shape[1])
    else:
        rows = t.permute(2, 3, 0, 1).reshape(shape[2] * shape[3] * shape[0], shape[1])
    g = rows.abs().reshape(-1, 4)
    mask = pats[torch.argmax(g @ pats.t(), dim=1)].reshape(rows.shape)
    if t.dim() <= 2:
        return mask.reshape(shape).bool()
    if t.dim() == 3:
        return mask.view(shape[0], shape[2], shape[1]).permute(0, 2, 1).bool()
    return mask.view(shape[2], shape[3], shape[0], shape[1]).permute(2, 3, 0, 1).bool()


SHAPES_24 = [(16,), (8, 12), (3, 8, 5), (6, 16, 3, 3), (4, 4, 1, 1), (1, 4)]


@pytest.mark.parametrize("shape", SHAPES_24)
def test_nm_mask_equals_asp_m4n2_1d_random(shape):
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.float64):
        w = torch.randn(shape, generator=gen).to(dtype)
        m = nm_mask(w)
        assert m.dtype == torch.bool and m.shape == w.shape
        assert torch.equal(m, _asp_m4n2_1d(w)), dtype
        # from the definition: in every group of 4 along the input dim, the 2 largest |w| are kept
        x = w.float().abs().reshape(1, -1) if w.dim() == 1 else w.float().abs().movedim(1, -1)
        km = m.reshape(1, -1) if w.dim() == 1 else m.movedim(1, -1)
        xg, kg = x.reshape(-1, 4), km.reshape(-1, 4)
        assert (kg.sum(1) == 2).all()
        top2 = torch.zeros_like(kg)
        top2.scatter_(1, xg.topk(2, dim=1).indices, True)
        assert torch.equal(kg, top2)


def test_nm_mask_ties_and_zeros_like_asp():
    # ties everywhere: equal magnitudes, signs, zeros, and pairs of equal sums
    vals = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, -2.0, 2.0, 2.0, -2.0, 3.0, 1.0, 2.0, 2.0],
                         [0.5, -0.5, 0.25, 0.75, 1.0, 0.0, 1.0, 0.0, 0.0, 3.0, 0.0, 3.0, 5.0, 5.0, 5.0, 1.0]])
    for w in (vals, vals.reshape(2, 16, 1, 1).repeat(1, 1, 2, 3), vals[:, :8].reshape(2, 8, 1)):
        assert torch.equal(nm_mask(w), _asp_m4n2_1d(w))
    gen = torch.Generator().manual_seed(3)
    w = torch.randint(-2, 3, (12, 32, 3, 3), generator=gen).float()  # many ties
    assert torch.equal(nm_mask(w), _asp_m4n2_1d(w))


def test_nm_mask_general_and_partial_groups():
    w = torch.randn(5, 10)  # 10 input features: the last group of each row has 2 elements
    m = nm_mask(w)
    assert (m[:, :8].reshape(5, 2, 4).sum(-1) == 2).all() and m[:, 8:].all()
    m18 = nm_mask(torch.randn(4, 16), n=1, m=8)
    assert (m18.reshape(4, 2, 8).sum(-1) == 1).all()
    with pytest.raises(ValueError, match="n, m"):
        nm_mask(w, n=5, m=4)
    with pytest.raises(TypeError, match="weight: expected a floating point"):
        nm_mask(torch.ones(4, 4, dtype=torch.int64))


def test_nm_masks_on_a_model():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 1), nn.Flatten(), nn.Linear(16, 4), nn.Linear(4, 6))
    ms = nm_masks(model)
    assert set(ms) == {model[1].weight, model[3].weight, model[4].weight}  # conv0 has 3 input channels
    for p, m in ms.items():
        assert torch.equal(m, _asp_m4n2_1d(p))


def test_magnitude_masks_equal_torch_prune():
    gen = torch.Generator().manual_seed(1)
    for amount in (0.0, 0.3, 0.5, 0.999, 1.0, 7):
        lin = nn.Linear(13, 11)
        with torch.no_grad():
            lin.weight.copy_(torch.randint(-3, 4, (11, 13), generator=gen).float())  # ties
        ref = nn.Linear(13, 11)
        ref.weight.data.copy_(lin.weight.data)
        prune.l1_unstructured(ref, "weight", amount=amount)
        assert torch.equal(magnitude_mask(lin.weight, amount), ref.weight_mask.bool()), amount
    mods = [nn.Linear(7, 5), nn.Conv2d(3, 4, 3), nn.Linear(9, 2)]
    refs = [nn.Linear(7, 5), nn.Conv2d(3, 4, 3), nn.Linear(9, 2)]
    for a, b in zip(mods, refs):
        b.weight.data.copy_(a.weight.data)
    prune.global_unstructured([(b, "weight") for b in refs], pruning_method=prune.L1Unstructured, amount=0.4)
    masks = global_magnitude_masks([a.weight for a in mods], 0.4)
    for m, b in zip(masks, refs):
        assert torch.equal(m, b.weight_mask.bool())
    with pytest.raises(ValueError, match="sparsity: a fraction must be in"):
        magnitude_mask(torch.randn(3), 1.5)
    with pytest.raises(TypeError, match="sparsity: expected"):
        magnitude_mask(torch.randn(3), "half")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))


@pytest.mark.parametrize("Opt,TOpt,kw", [(LayerwiseSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
                                         (LayerwiseAdamW, torch.optim.AdamW, dict(lr=1e-2))])
def test_torch_pruned_model_keeps_its_zeros(Opt, TOpt, kw):
    ours, ref = _model(), _model()
    for m in (ours, ref):
        prune.l1_unstructured(m[0], "weight", amount=0.5)
        prune.random_unstructured(m[4], "weight", amount=0.3)
    ref[4].weight_mask.copy_(ours[4].weight_mask)
    opt = Opt(ours.parameters(), **kw)
    masks = torch_prune_masks(ours)
    assert set(masks) == {ours[0].weight_orig, ours[4].weight_orig}
    opt.set_masks(masks)
    topt = TOpt(ref.parameters(), foreach=False, **kw)
    gen = torch.Generator().manual_seed(2)
    for _ in range(6):
        x = torch.randn(4, 3, 8, 8, generator=gen)
        for m, o in ((ours, opt), (ref, topt)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for i in (0, 4):
        keep = ours[i].weight_mask.bool()
        assert (ours[i].weight_orig[~keep] == 0).all() and (ours[i].weight[~keep] == 0).all()
        # the effective weights are torch's (torch keeps stale values in weight_orig under the mask)
        err = (ours[i].weight - ref[i].weight).abs().max() / ref[i].weight.abs().max()
        assert err < 1e-5


def test_parametrization_masks_are_found():
    from torch.ao.pruning.sparsifier.utils import FakeSparsity
    from torch.nn.utils import parametrize

    lin = nn.Linear(6, 4)
    mask = torch.rand(4, 6) > 0.5
    parametrize.register_parametrization(lin, "weight", FakeSparsity(mask.float()))
    found = torch_prune_masks(lin)
    orig = lin.parametrizations.weight.original
    assert list(found) == [orig] and torch.equal(found[orig], mask)
    opt = LayerwiseSGD(lin.parameters(), lr=0.1)
    opt.set_masks(found)
    lin(torch.randn(3, 6)).sum().backward()
    opt.step()
    assert (orig[~mask] == 0).all() and (lin.weight[~mask] == 0).all()
