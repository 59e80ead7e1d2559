"""The CPU optimizer kernels under every instruction-set variant this machine runs
(generic / avx2 / avx512: the float32 loops are hand-written per ISA), against the
torch reference: every SGD momentum kind, AdamW with amsgrad / both lerp forms /
maximize, masks, sizes around the vector widths (4, 8, 16 lanes), all dtypes."""

import pytest
import torch

from pyfici.ops import layerwise_adamw_step_, layerwise_sgd_step_, weight_variation

SIZES = [(1,), (3,), (4,), (7,), (8,), (15,), (16,), (17,), (33,), (5, 13), (40013,)]


def _rel(a, b):
    worst = 0.0
    for x, y in zip(a, b):
        if x.numel():
            worst = max(worst, ((x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1e-30)).item())
    return worst


def _data(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=gen).to(dtype) for s in SIZES]
    gs = [torch.randn(s, generator=gen).to(dtype) for s in SIZES]
    masks = [(torch.rand(s, generator=gen) > 0.4) if i % 2 == 0 else None for i, s in enumerate(SIZES)]
    return ps, gs, masks


TOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 1e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kw", [
    dict(momentum=0.0, weight_decay=0.0),
    dict(momentum=0.9, weight_decay=5e-4, nesterov=True),
    dict(momentum=0.9, dampening=0.3, weight_decay=0.01),
    dict(momentum=0.5, maximize=True),
    dict(momentum=0.9, nesterov=True, init_momentum=True, weight_decay=0.1),
], ids=["plain", "nesterov_wd", "dampening", "maximize", "first_step"])
def test_sgd_every_isa(cpu_isa, dtype, kw):
    ps, gs, masks = _data(dtype, 0)
    ref = [p.clone() for p in ps]
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    bufs = [torch.randn(p.shape, generator=torch.Generator().manual_seed(1)).to(sdt) for p in ps]
    rbufs = [b.clone() for b in bufs]
    lrs = torch.linspace(0.01, 0.2, len(ps), dtype=torch.float64)
    scale = torch.tensor([64.0])
    for _ in range(3):
        layerwise_sgd_step_(ps, [g * 64 for g in gs], bufs, lrs, masks=masks, grad_scale=scale, backend="cpu", **kw)
        layerwise_sgd_step_(ref, [g * 64 for g in gs], rbufs, lrs, masks=masks, grad_scale=scale, backend="torch", **kw)
    assert _rel(ps, ref) < TOL[dtype] and _rel(bufs, rbufs) < max(TOL[dtype], 1e-6), cpu_isa
    for p, m in zip(ps, masks):
        if m is not None:
            assert (p[~m] == 0).all(), cpu_isa


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kw", [
    dict(beta1=0.9, beta2=0.999, weight_decay=0.01),
    dict(beta1=0.3, beta2=0.9, weight_decay=0.0, amsgrad=True),
    dict(beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1, amsgrad=True, maximize=True),
], ids=["default", "lerp_hi_amsgrad", "amsgrad_maximize"])
def test_adamw_every_isa(cpu_isa, dtype, kw):
    ps, gs, masks = _data(dtype, 2)
    ref = [p.clone() for p in ps]
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    st = [[torch.zeros(p.shape, dtype=sdt) for p in ps] for _ in range(3)]
    rst = [[torch.zeros(p.shape, dtype=sdt) for p in ps] for _ in range(3)]
    steps, rsteps = torch.zeros(len(ps)), torch.zeros(len(ps))
    lrs = torch.linspace(1e-3, 1e-2, len(ps), dtype=torch.float64)
    for it in range(4):
        grads = [g * (1 + it) for g in gs]
        layerwise_adamw_step_(ps, grads, st[0], st[1], lrs, steps, max_exp_avg_sqs=st[2], masks=masks, backend="cpu", **kw)
        layerwise_adamw_step_(ref, grads, rst[0], rst[1], lrs, rsteps, max_exp_avg_sqs=rst[2], masks=masks,
                              backend="torch", **kw)
    assert _rel(ps, ref) < TOL[dtype], cpu_isa
    for a, b in zip(st, rst):
        assert _rel(a, b) < max(TOL[dtype], 1e-6), cpu_isa
    assert torch.equal(steps, rsteps)
    for p, m in zip(ps, masks):
        if m is not None:
            assert (p[~m] == 0).all(), cpu_isa


def test_adamw_amsgrad_nan_propagates_every_isa(cpu_isa):
    """torch.maximum propagates NaN from either side; so does the kernel's running max."""
    n = 37
    p = torch.zeros(n)
    vmax = torch.zeros(n)
    vmax[3] = float("nan")
    g = torch.ones(n)
    g[20] = float("nan")
    ref_p, ref_vmax = p.clone(), vmax.clone()
    args = dict(amsgrad=True, weight_decay=0.0)
    layerwise_adamw_step_([p], [g], [torch.zeros(n)], [torch.zeros(n)], [0.1], torch.zeros(1),
                          max_exp_avg_sqs=[vmax], backend="cpu", **args)
    layerwise_adamw_step_([ref_p], [g], [torch.zeros(n)], [torch.zeros(n)], [0.1], torch.zeros(1),
                          max_exp_avg_sqs=[ref_vmax], backend="torch", **args)
    assert torch.equal(vmax.isnan(), ref_vmax.isnan()) and vmax.isnan()[[3, 20]].all(), cpu_isa
    assert torch.equal(p.isnan(), ref_p.isnan()), cpu_isa


def test_weight_variation_every_isa(cpu_isa):
    gen = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        a = [torch.randn(s, generator=gen).to(dtype) for s in SIZES]
        b = [x + 0.1 * torch.randn(x.shape, generator=gen).to(dtype) for x in a]
        want = torch.stack([((x.double() - y.double()) ** 2).sum() for x, y in zip(a, b)])
        out = weight_variation(a, b, backend="cpu")
        assert torch.allclose(out.double(), want, rtol=1e-6 if dtype != torch.float64 else 1e-12), (cpu_isa, dtype)
