"""pyfici.optim (LayerwiseSGD / LayerwiseAdamW) and pyfici.ops.optim against torch.optim
(foreach=False) plus the Apex-ASP mask steps, every backend, awkward shapes."""

import math

import pytest
import torch
from conftest import backends_for

import pyfici
from pyfici.ops import layerwise_adamw_step_, layerwise_sgd_step_, weight_variation
from pyfici.optim import LayerwiseAdamW, LayerwiseSGD

SHAPES = [(3, 4), (0,), (1,), (37, 11), (7,), (1, 1, 1), (5, 3, 3, 3), (40013,), (0, 5), (131,)]
SMALL_SHAPES = [(3, 4), (0,), (1,), (13,), (2, 3, 2)]  # for the Triton interpreter


def _backends(device):
    return backends_for(device) + ["torch"]


def _shapes(be):
    return SMALL_SHAPES if be == "triton" else SHAPES


def _rel_err(a, b):
    worst = 0.0
    for x, y in zip(a, b):
        if x.numel():
            worst = max(worst, ((x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1e-30)).item())
    return worst


def _run_pair(Opt, TOpt, kw_groups, be, device, shapes, steps=20, with_masks=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) for s in shapes]
    a = [torch.nn.Parameter(t.clone().to(device)) for t in init]
    b = [torch.nn.Parameter(t.clone().to(device)) for t in init]
    masks = [((torch.rand(s, generator=gen) > 0.3).to(device) if len(s) >= 2 and with_masks else None) for s in shapes]
    n = len(shapes)
    cut = [0, n // 3, 2 * n // 3, n]
    ga = [dict(params=a[cut[i]:cut[i + 1]], **kw_groups[i]) for i in range(3)]
    gb = [dict(params=b[cut[i]:cut[i + 1]], **kw_groups[i]) for i in range(3)]
    oa = Opt(ga, backend=be)
    ob = TOpt(gb, foreach=False)
    for p, m in zip(a, masks):
        if m is not None:
            oa.set_mask(p, m)
    with torch.no_grad():
        for p, m in zip(b, masks):
            if m is not None:
                p.mul_(m)
    for it in range(steps):
        for k, (x, y) in enumerate(zip(oa.param_groups, ob.param_groups)):
            lr = kw_groups[k]["lr"] * (1.0 + 0.5 * math.sin(it + k))
            x["lr"] = y["lr"] = lr
        for pa, pb, m in zip(a, b, masks):
            gr = torch.randn(pa.shape, generator=gen).to(device)
            pa.grad = gr.clone()
            pb.grad = gr.clone() if m is None else gr * m
        oa.step()
        ob.step()
        with torch.no_grad():
            for p, m in zip(b, masks):
                if m is not None:
                    p.mul_(m)
    return a, b, masks, oa, ob


SGD_GROUPS = [
    [dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
     dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3),
     dict(lr=0.02, momentum=0.0, weight_decay=0.0)],
    [dict(lr=0.1), dict(lr=0.01, weight_decay=0.01), dict(lr=0.3, momentum=0.5)],
]


@pytest.mark.parametrize("groups", SGD_GROUPS)
def test_sgd_matches_torch(device, groups):
    for be in _backends(device):
        a, b, masks, *_ = _run_pair(LayerwiseSGD, torch.optim.SGD, groups, be, device, _shapes(be))
        assert _rel_err(a, b) < 1e-6, be
        for p, m in zip(a, masks):
            if m is not None:
                assert (p[~m] == 0).all(), be


def test_adamw_matches_torch(device):
    groups = [dict(lr=1e-2, weight_decay=0.1), dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0),
              dict(lr=1e-3, weight_decay=1e-2)]
    for be in _backends(device):
        a, b, masks, *_ = _run_pair(LayerwiseAdamW, torch.optim.AdamW, groups, be, device, _shapes(be))
        assert _rel_err(a, b) < 1e-6, be
        for p, m in zip(a, masks):
            if m is not None:
                assert (p[~m] == 0).all(), be


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params(dtype):
    shapes = [(33, 7), (1,), (0,), (1001,)]
    for be in backends_for("cpu") + ["torch"]:
        shp = SMALL_SHAPES if be == "triton" else shapes
        ps = [torch.randn(s).to(dtype) for s in shp]
        ref = [p.float().clone() for p in ps]
        gs = [torch.randn(s).to(dtype) for s in shp]
        bufs = [torch.zeros(s) for s in shp]
        rbufs = [torch.zeros(s) for s in shp]
        lrs = torch.linspace(0.01, 0.1, len(shp))
        layerwise_sgd_step_(ps, gs, bufs, lrs, momentum=0.9, weight_decay=1e-2, backend=be)
        layerwise_sgd_step_(ref, [g.float() for g in gs], rbufs, lrs, momentum=0.9, weight_decay=1e-2, backend="torch")
        for p, r in zip(ps, ref):
            assert torch.allclose(p.float(), r.to(dtype).float(), rtol=1e-2, atol=1e-2), be
        for x, y in zip(bufs, rbufs):
            assert torch.allclose(x, y, rtol=1e-6, atol=1e-7), be


def test_frozen_and_found_inf_and_grad_scale():
    for be in backends_for("cpu") + ["torch"]:
        ps = [torch.randn(5), torch.randn(3, 3)]
        gs = [torch.randn(5), torch.randn(3, 3)]
        bufs = [torch.randn(5), torch.randn(3, 3)]
        p0 = [p.clone() for p in ps]
        b0 = [b.clone() for b in bufs]
        # frozen: lr 0 and no weight decay -> nothing touched, not even the buffer
        layerwise_sgd_step_(ps, gs, bufs, torch.tensor([0.0, 0.1]), momentum=0.9, weight_decay=[0.0, 0.0], backend=be)
        assert torch.equal(ps[0], p0[0]) and torch.equal(bufs[0], b0[0]), be
        assert not torch.equal(ps[1], p0[1]), be
        # found_inf skips everything
        p1 = [p.clone() for p in ps]
        layerwise_sgd_step_(ps, gs, bufs, [0.1, 0.1], momentum=0.9, found_inf=torch.ones(1), backend=be)
        assert all(torch.equal(x, y) for x, y in zip(ps, p1)), be
        # grad_scale: scaled grads give the unscaled step
        q = [p.clone() for p in ps]
        qb = [b.clone() for b in bufs]
        layerwise_sgd_step_(ps, [g * 1024 for g in gs], bufs, [0.1, 0.2], momentum=0.9,
                            grad_scale=torch.tensor([1024.0]), found_inf=torch.zeros(1), backend=be)
        layerwise_sgd_step_(q, gs, qb, [0.1, 0.2], momentum=0.9, backend="torch")
        assert _rel_err(ps, q) < 1e-6, be


def test_adamw_op_steps_and_frozen():
    for be in backends_for("cpu") + ["torch"]:
        ps = [torch.randn(4), torch.randn(2, 2), torch.randn(0)]
        m = [torch.zeros(4), torch.zeros(2, 2), torch.zeros(0)]
        v = [torch.zeros(4), torch.zeros(2, 2), torch.zeros(0)]
        steps = torch.tensor([3.0, 0.0, 0.0])
        p0 = ps[0].clone()
        layerwise_adamw_step_(ps, [torch.randn(4), torch.randn(2, 2), torch.randn(0)], m, v,
                              torch.tensor([0.0, 1e-3, 1e-3]), steps, weight_decay=0.0, backend=be)
        assert steps.tolist() == [3.0, 1.0, 1.0], be  # an empty tensor's step advances, as in torch
        assert torch.equal(ps[0], p0), be


def test_grad_scaler_integration():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    ref = torch.nn.Linear(8, 3)
    ref.load_state_dict(model.state_dict())
    opt = LayerwiseSGD(model.parameters(), lr=0.1, momentum=0.9)
    ropt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, foreach=False)
    sa = torch.amp.GradScaler("cpu", init_scale=256.0)
    sb = torch.amp.GradScaler("cpu", init_scale=256.0)
    for it in range(4):
        x = torch.randn(16, 8)
        if it == 2:
            x[0, 0] = float("inf")  # this step is skipped by both
        for mod, o, s in ((model, opt, sa), (ref, ropt, sb)):
            o.zero_grad()
            s.scale(mod(x).square().mean()).backward()
            s.step(o)
            s.update()
    assert _rel_err(list(model.parameters()), list(ref.parameters())) < 1e-6


def test_state_dict_round_trip_and_torch_state():
    torch.manual_seed(0)
    for Opt, TOpt, kw in ((LayerwiseSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
                          (LayerwiseAdamW, torch.optim.AdamW, dict(lr=1e-2))):
        base = [torch.randn(6, 3), torch.randn(4)]
        a = [torch.nn.Parameter(t.clone()) for t in base]
        b = [torch.nn.Parameter(t.clone()) for t in base]
        ta = TOpt(a, foreach=False, **kw)
        for _ in range(3):
            for p in a:
                p.grad = torch.randn(p.shape)
            ta.step()
        with torch.no_grad():
            for x, y in zip(b, a):
                x.copy_(y)
        ob = Opt(b, **kw)
        ob.load_state_dict(ta.state_dict())  # a torch state dict
        mask = torch.rand(6, 3) > 0.5
        ob.set_mask(b[0], mask)
        with torch.no_grad():
            a[0].mul_(mask)
        for _ in range(3):
            for x, y in zip(a, b):
                g = torch.randn(x.shape)
                y.grad = g.clone()
                x.grad = g * mask if x.dim() == 2 else g
            ta.step()
            ob.step()
            with torch.no_grad():
                a[0].mul_(mask)
        assert _rel_err(b, a) < 1e-6, Opt.__name__
        # our own round trip (mask included), into a fresh optimizer
        c = [torch.nn.Parameter(t.detach().clone()) for t in b]
        oc = Opt(c, **kw)
        oc.load_state_dict(ob.state_dict())
        assert torch.equal(oc.get_mask(c[0]), mask)
        for x, y in zip(b, c):
            g = torch.randn(x.shape)
            x.grad, y.grad = g.clone(), g.clone()
        ob.step()
        oc.step()
        assert all(torch.equal(x, y) for x, y in zip(b, c)), Opt.__name__
        oc.clear_mask(c[0])
        assert oc.get_mask(c[0]) is None


def test_sgd_one_call_per_device_dtype(monkeypatch):
    calls = []
    orig = pyfici.ops.optim._sgd_impl

    def spy(*args):
        calls.append(len(args[0]))
        return orig(*args)

    monkeypatch.setattr(pyfici.ops.optim, "_sgd_impl", spy)
    ps = [torch.nn.Parameter(torch.randn(3)) for _ in range(6)]
    opt = LayerwiseSGD([{"params": ps[i:i + 2], "lr": 0.1 * (i + 1)} for i in range(0, 6, 2)], momentum=0.9)
    for p in ps:
        p.grad = torch.randn(3)
    opt.step()
    assert calls == [6]


def test_weight_variation(device):
    gen = torch.Generator().manual_seed(1)
    for be in _backends(device):
        shp = SMALL_SHAPES if be == "triton" else SHAPES
        a = [torch.randn(s, generator=gen).to(device) for s in shp]
        b = [(x + 0.1 * torch.randn(x.shape, generator=gen).to(device)) for x in a]
        ref = pyfici.ops.reference.weight_variation([x.double() for x in a], [y.double() for y in b])
        out = weight_variation(a, b, backend=be)
        assert out.dtype == torch.float32 and out.shape == (len(shp),)
        assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-12), be
        out64 = weight_variation([x.double() for x in a], [y.double() for y in b], backend=be)
        assert out64.dtype == torch.float64
        tol = 1e-5 if be == "triton" else 1e-12
        assert torch.allclose(out64, ref, rtol=tol), be
    mixed = weight_variation([torch.ones(3, dtype=torch.bfloat16), torch.ones(2)], [torch.zeros(3, dtype=torch.bfloat16), torch.zeros(2)])
    assert mixed.tolist() == [3.0, 2.0]
    assert weight_variation([], []).shape == (0,)


def test_bad_inputs():
    p = [torch.randn(3), torch.randn(2, 2)]
    g = [torch.randn(3), torch.randn(2, 2)]
    b = [torch.zeros(3), torch.zeros(2, 2)]
    with pytest.raises(ValueError, match="grads: expected 2 tensors"):
        layerwise_sgd_step_(p, g[:1], b, [0.1, 0.1], momentum=0.9)
    with pytest.raises(ValueError, match="lrs: expected a 1-d tensor of 2"):
        layerwise_sgd_step_(p, g, b, torch.ones(3), momentum=0.9)
    with pytest.raises(ValueError, match=r"momentum_buffers\[1\]: expected shape \(2, 2\)"):
        layerwise_sgd_step_(p, g, [torch.zeros(3), torch.zeros(4)], [0.1, 0.1], momentum=0.9)
    with pytest.raises(ValueError, match=r"masks\[0\]: expected shape \(3,\)"):
        layerwise_sgd_step_(p, g, b, [0.1, 0.1], momentum=0.9, masks=[torch.ones(4, dtype=torch.bool), None])
    with pytest.raises(ValueError, match=r"masks\[1\]: expected device cpu"):
        layerwise_sgd_step_(p, g, b, [0.1, 0.1], masks=[None, torch.ones(2, 2, dtype=torch.bool, device="meta")])
    with pytest.raises(ValueError, match=r"grads\[0\]: expected shape \(3,\)"):
        layerwise_sgd_step_(p, [torch.randn(4), g[1]], b, [0.1, 0.1])
    with pytest.raises(TypeError, match=r"params\[1\]: all params must have one dtype"):
        layerwise_sgd_step_([p[0], p[1].bfloat16()], g, b, [0.1, 0.1])
    with pytest.raises(ValueError, match="found_inf: expected a float32 tensor with one element"):
        layerwise_sgd_step_(p, g, b, [0.1, 0.1], found_inf=torch.zeros(2))
    with pytest.raises(TypeError, match=r"masks\[0\]: expected dtype"):
        layerwise_sgd_step_(p, g, b, [0.1, 0.1], masks=[torch.ones(3), None])
    with pytest.raises(ValueError, match="lrs: must be finite"):
        layerwise_sgd_step_(p, g, b, torch.tensor([0.1, float("nan")]), momentum=0.9)
    with pytest.raises(ValueError, match="lrs: must be finite"):
        layerwise_sgd_step_(p, g, b, [0.1, float("inf")], momentum=0.9)
    with pytest.raises(ValueError, match="momentum_buffers: required"):
        layerwise_sgd_step_(p, g, None, [0.1, 0.1], momentum=0.9)
    with pytest.raises(ValueError, match="nesterov"):
        layerwise_sgd_step_(p, g, b, [0.1, 0.1], nesterov=True)
    with pytest.raises(ValueError, match="exp_avg_sqs: expected 2"):
        layerwise_adamw_step_(p, g, b, b[:1], [0.1, 0.1], torch.zeros(2))
    with pytest.raises(ValueError, match="steps: expected a float32 tensor"):
        layerwise_adamw_step_(p, g, b, b, [0.1, 0.1], torch.zeros(3))
    with pytest.raises(ValueError, match="snapshots: expected 2"):
        weight_variation(p, g[:1])
    with pytest.raises(ValueError, match=r"snapshots\[1\]: expected shape"):
        weight_variation(p, [g[0], torch.randn(4)])
    opt = LayerwiseSGD([torch.nn.Parameter(torch.randn(3))], lr=0.1)
    with pytest.raises(ValueError, match="param: this tensor is not"):
        opt.set_mask(torch.randn(3), torch.ones(3, dtype=torch.bool))
    q = opt.param_groups[0]["params"][0]
    with pytest.raises(ValueError, match="mask: expected shape"):
        opt.set_mask(q, torch.ones(4, dtype=torch.bool))
    if torch.device("meta") != q.device:
        with pytest.raises(ValueError, match="mask: expected device"):
            opt.set_mask(q, torch.ones(3, dtype=torch.bool, device="meta"))
    opt.param_groups[0]["lr"] = float("nan")
    q.grad = torch.randn(3)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\]: must be finite"):
        opt.step()


def test_custom_ops_pass_opcheck():
    from pyfici.ops import optim as o

    ps = [torch.randn(5), torch.randn(2, 3)]
    gs = [torch.randn(5), torch.randn(2, 3)]
    bufs = [torch.zeros(5), torch.zeros(2, 3)]
    masks = [None, torch.rand(2, 3) > 0.5]
    lrs = torch.tensor([0.1, 0.2], dtype=torch.float64)
    torch.library.opcheck(o._sgd_op, (ps, gs, bufs, lrs, o.sgd_hyper(2, momentum=0.9), masks, None, None, "cpu"))
    steps = torch.zeros(2)
    torch.library.opcheck(o._adamw_op, (ps, gs, [b.clone() for b in bufs], [b.clone() for b in bufs],
                                        [b.clone() for b in bufs], lrs, steps, o.adamw_hyper(2, amsgrad=True), masks,
                                        None, None, "cpu"))
    torch.library.opcheck(o._weight_variation_op, (ps, gs, "cpu"))


def test_chunk_table_layout():
    import numpy as np

    from pyfici.ops.optim import chunk_table

    numel = np.array([0, 5, 8, 0, 17, 1])
    tidx, start = chunk_table(numel, 4)
    assert tidx.tolist() == [1, 1, 2, 2, 4, 4, 4, 4, 4, 5]
    assert start.tolist() == [0, 4, 0, 4, 0, 4, 8, 12, 16, 0]
    tidx, start = chunk_table(np.array([0, 0]), 4)
    assert tidx.size == 0 and start.size == 0


def test_mixed_dtypes_one_call_each(monkeypatch):
    calls = []
    orig = pyfici.ops.optim._sgd_impl

    def spy(*args):
        calls.append((len(args[0]), args[0][0].dtype))
        return orig(*args)

    monkeypatch.setattr(pyfici.ops.optim, "_sgd_impl", spy)
    ps = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(4).bfloat16()),
          torch.nn.Parameter(torch.randn(2)), torch.nn.Parameter(torch.randn(5).bfloat16())]
    opt = LayerwiseSGD([{"params": ps[:2], "lr": 0.1}, {"params": ps[2:], "lr": 0.2}], momentum=0.9)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    assert sorted(calls, key=str) == sorted([(2, torch.float32), (2, torch.bfloat16)], key=str)
    assert all(opt.state[p]["momentum_buffer"].dtype == torch.float32 for p in ps)


def test_loading_torch_amsgrad_state_matches_torch():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3, 5))
    t = torch.optim.AdamW([p], lr=1e-2, amsgrad=True, foreach=False)
    for _ in range(3):
        p.grad = torch.randn(3, 5)
        t.step()
    q = torch.nn.Parameter(p.detach().clone())
    o = LayerwiseAdamW([q], lr=1e-2, amsgrad=True)
    o.load_state_dict(t.state_dict())
    for _ in range(3):
        g = torch.randn(3, 5)
        p.grad, q.grad = g.clone(), g.clone()
        t.step()
        o.step()
    assert _rel_err([q], [p]) < 1e-6
    assert _rel_err([o.state[q]["max_exp_avg_sq"]], [t.state[p]["max_exp_avg_sq"]]) < 1e-6
    assert float(o.state[q]["step"]) == 6.0


def test_changing_momentum_and_missing_grads_match_torch():
    torch.manual_seed(3)
    base = [torch.randn(4, 3), torch.randn(5), torch.randn(7)]
    a = [torch.nn.Parameter(t.clone()) for t in base]
    b = [torch.nn.Parameter(t.clone()) for t in base]
    oa = LayerwiseSGD([{"params": a[:2], "lr": 0.1}, {"params": a[2:], "lr": 0.05}], dampening=0.2)
    ob = torch.optim.SGD([{"params": b[:2], "lr": 0.1}, {"params": b[2:], "lr": 0.05}], dampening=0.2, foreach=False)
    for it in range(8):
        if it == 3:  # momentum switched on mid-training: buffers start as torch's do
            for g in oa.param_groups + ob.param_groups:
                g["momentum"] = 0.9
        for k, (x, y) in enumerate(zip(a, b)):
            if (it + k) % 3 == 0:  # this param has no grad at this step
                x.grad = y.grad = None
            else:
                g = torch.randn(x.shape)
                x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    assert _rel_err(a, b) < 1e-6


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter's numpy
@pytest.mark.parametrize("Opt,TOpt,kw", [
    (LayerwiseSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    (LayerwiseSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)),
    (LayerwiseSGD, torch.optim.SGD, dict(lr=0.1, maximize=True)),
    (LayerwiseAdamW, torch.optim.AdamW, dict(lr=0.1)),
    (LayerwiseAdamW, torch.optim.AdamW, dict(lr=0.1, amsgrad=True, maximize=True)),
])
def test_inf_and_nan_grads_like_torch(Opt, TOpt, kw):
    """An inf / NaN gradient gives exactly what torch gives (-inf where torch writes -inf,
    not NaN from a 0 * inf), on every backend; a pruned weight stays 0 whatever its gradient."""
    for be in backends_for("cpu") + ["torch"]:
        for dtype in (torch.float32, torch.float64):
            base = torch.randn(4, 5, dtype=dtype)
            a, b = torch.nn.Parameter(base.clone()), torch.nn.Parameter(base.clone())
            oa, ob = Opt([a], backend=be, **kw), TOpt([b], foreach=False, **kw)
            for it in range(3):
                g = torch.randn(4, 5, dtype=dtype)
                if it == 1:
                    g[0, 0], g[1, 1], g[2, 2] = float("inf"), float("-inf"), float("nan")
                a.grad, b.grad = g.clone(), g.clone()
                oa.step()
                ob.step()
            assert torch.equal(a.isnan(), b.isnan()), (be, dtype)
            assert torch.equal(a.isposinf(), b.isposinf()) and torch.equal(a.isneginf(), b.isneginf()), (be, dtype)
            fin = torch.isfinite(b)
            assert _rel_err([a[fin]], [b[fin]]) < 1e-6, (be, dtype)
            # pruned weights: exactly 0 even with an inf / nan gradient
            c = torch.nn.Parameter(base.clone())
            oc = Opt([c], backend=be, **kw)
            mask = torch.ones(4, 5, dtype=torch.bool)
            mask[0, 0] = mask[2, 2] = False
            oc.set_mask(c, mask)
            g = torch.randn(4, 5, dtype=dtype)
            g[0, 0], g[2, 2] = float("inf"), float("nan")
            c.grad = g
            oc.step()
            assert c[0, 0].item() == 0.0 and c[2, 2].item() == 0.0, (be, dtype)
            assert torch.isfinite(c).all(), (be, dtype)


def test_param_data_replaced_raises_like_torch():
    for Opt, TOpt, kw in ((LayerwiseSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
                          (LayerwiseAdamW, torch.optim.AdamW, dict(lr=0.1))):
        p, q = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4, 3))
        o, t = Opt([p], **kw), TOpt([q], foreach=False, **kw)
        p.grad, q.grad = torch.randn(4, 3), torch.randn(4, 3)
        o.step()
        t.step()
        p.data, q.data = torch.randn(5, 3), torch.randn(5, 3)
        p.grad, q.grad = torch.randn(5, 3), torch.randn(5, 3)
        with pytest.raises(RuntimeError):
            t.step()
        with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[0\] has shape \(5, 3\) but its optimizer state"):
            o.step()
        # a slice of the same storage (same data_ptr, other size) is caught as well
        r = torch.nn.Parameter(torch.randn(6))
        o = Opt([r], **kw)
        r.grad = torch.randn(6)
        o.step()
        r.data = r.data[:4]
        r.grad = torch.randn(4)
        with pytest.raises(RuntimeError, match="has shape"):
            o.step()


def test_param_layout_change_follows_torch():
    """model.to(memory_format=channels_last) after some steps: the state follows the new layout."""
    torch.manual_seed(1)
    base = torch.randn(6, 4, 3, 3)
    a, b = torch.nn.Parameter(base.clone()), torch.nn.Parameter(base.clone())
    oa = LayerwiseSGD([a], lr=0.1, momentum=0.9)
    ob = torch.optim.SGD([b], lr=0.1, momentum=0.9, foreach=False)
    for it in range(6):
        if it == 3:
            a.data = a.data.contiguous(memory_format=torch.channels_last)
            b.data = b.data.contiguous(memory_format=torch.channels_last)
        g = torch.randn(6, 4, 3, 3)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    assert a.is_contiguous(memory_format=torch.channels_last)
    assert _rel_err([a], [b]) < 1e-6
    assert oa.state[a]["momentum_buffer"].stride() == a.stride()


def test_unsupported_flags_are_refused_clearly():
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="differentiable=True is not supported"):
        LayerwiseSGD(p, differentiable=True)
    with pytest.raises(ValueError, match="differentiable=True is not supported"):
        LayerwiseAdamW(p, differentiable=True)
    with pytest.raises(ValueError, match="capturable=True is not supported"):
        LayerwiseAdamW(p, capturable=True)
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
        LayerwiseSGD(p, fused=True, foreach=True)
    # a torch state dict with capturable=True is refused at the step, not silently run
    t = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))], capturable=False)
    sd = t.state_dict()
    sd["param_groups"][0]["capturable"] = True
    o = LayerwiseAdamW(p)
    o.load_state_dict(sd)
    p[0].grad = torch.randn(3)
    with pytest.raises(ValueError, match="capturable=True is not supported"):
        o.step()


def test_op_level_float64_maximize_amsgrad_and_layouts():
    """The ops directly: float64 params in float64 math, maximize, amsgrad, channels_last
    params with state in their layout and grads/masks in another one; every backend."""
    gen = torch.Generator().manual_seed(5)
    for be in backends_for("cpu") + ["torch"]:
        for dtype in (torch.float32, torch.float64):
            sdt = dtype
            ps = [torch.randn(3, 4, 2, 5, generator=gen, dtype=dtype).contiguous(memory_format=torch.channels_last),
                  torch.randn(7, generator=gen, dtype=dtype)]
            gs = [torch.randn(3, 4, 2, 5, generator=gen, dtype=dtype), torch.randn(7, generator=gen, dtype=dtype)]
            masks = [torch.rand(3, 4, 2, 5, generator=gen) > 0.3, None]
            ref = [p.clone(memory_format=torch.preserve_format) for p in ps]
            st = [[torch.zeros_like(p, dtype=sdt) for p in ps] for _ in range(3)]
            rst = [[torch.zeros_like(p, dtype=sdt) for p in ps] for _ in range(3)]
            steps, rsteps = torch.zeros(2), torch.zeros(2)
            lrs = torch.tensor([0.01, 0.02], dtype=torch.float64)
            for _ in range(3):
                layerwise_adamw_step_(ps, gs, st[0], st[1], lrs, steps, amsgrad=[True, False], max_exp_avg_sqs=st[2],
                                      maximize=True, masks=masks, backend=be)
                layerwise_adamw_step_(ref, gs, rst[0], rst[1], lrs, rsteps, amsgrad=[True, False],
                                      max_exp_avg_sqs=rst[2], maximize=True, masks=masks, backend="torch")
            tol = 1e-6 if dtype == torch.float32 else 1e-12
            assert _rel_err(ps, ref) < tol, (be, dtype)
            assert _rel_err(st[2][:1], rst[2][:1]) < tol, (be, dtype)
            assert ps[0].is_contiguous(memory_format=torch.channels_last)
            assert (ps[0][~masks[0]] == 0).all()
            bufs = [torch.zeros_like(p, dtype=sdt) for p in ps]
            rbufs = [torch.zeros_like(p, dtype=sdt) for p in ref]
            layerwise_sgd_step_(ps, gs, bufs, lrs, momentum=0.9, maximize=True, masks=masks, backend=be)
            layerwise_sgd_step_(ref, gs, rbufs, lrs, momentum=0.9, maximize=True, masks=masks, backend="torch")
            assert _rel_err(ps, ref) < tol and _rel_err(bufs, rbufs) < tol, (be, dtype)
    with pytest.raises(TypeError, match=r"momentum_buffers\[0\]: expected dtype in \['torch.float64'\]"):
        layerwise_sgd_step_([torch.randn(3, dtype=torch.float64)], [torch.randn(3, dtype=torch.float64)],
                            [torch.zeros(3)], [0.1], momentum=0.9)
    with pytest.raises(ValueError, match=r"momentum_buffers\[0\]: must have its param's memory layout"):
        p = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
        layerwise_sgd_step_([p], [torch.randn(2, 3, 4, 5)], [torch.zeros(2, 3, 4, 5)], [0.1], momentum=0.9)
    with pytest.raises(ValueError, match=r"params\[0\]: must be dense"):
        layerwise_sgd_step_([torch.randn(4, 6)[:, ::2]], [torch.randn(4, 3)], None, [0.1])
    with pytest.raises(ValueError, match="max_exp_avg_sqs: required"):
        layerwise_adamw_step_([torch.randn(3)], [torch.randn(3)], [torch.zeros(3)], [torch.zeros(3)], [0.1],
                              torch.zeros(1), amsgrad=True)


def test_tensor_lr_and_weight_variation_layouts():
    torch.manual_seed(2)
    a = torch.nn.Parameter(torch.randn(5, 3))
    b = torch.nn.Parameter(a.detach().clone())
    oa = LayerwiseSGD([a], lr=torch.tensor(0.05), momentum=0.9)
    ob = torch.optim.SGD([b], lr=torch.tensor(0.05), momentum=0.9, foreach=False)
    sa = torch.optim.lr_scheduler.ExponentialLR(oa, 0.5)
    sb = torch.optim.lr_scheduler.ExponentialLR(ob, 0.5)
    for _ in range(4):
        g = torch.randn(5, 3)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
        sa.step()
        sb.step()
    assert isinstance(oa.param_groups[0]["lr"], torch.Tensor)
    assert _rel_err([a], [b]) < 1e-6
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    y = torch.randn(2, 3, 4, 5)
    for be in backends_for("cpu") + ["torch"]:
        out = weight_variation([x, x.transpose(0, 1)], [y, y.transpose(0, 1)], backend=be)
        want = ((x.double() - y.double()) ** 2).sum()
        assert torch.allclose(out.double(), want.expand(2), rtol=1e-6), be
