"""LayerwiseSGD / LayerwiseAdamW against torch's own optimizer test database
(torch.testing._internal.common_optimizers.optim_db): every SGD and AdamW
configuration it lists for the CPU, in float32 and float64, on every backend that
runs here, 20 steps with an lr scheduler, params of awkward shapes and layouts
(channels_last, a transposed param, empty and one-element tensors) in two groups.
torch.optim with foreach=False is the reference; params and optimizer state must
agree within 1e-6 relative (float32) / 1e-12 (float64). The database's
construction-error inputs must raise what torch raises."""

import warnings

import pytest
import torch
from conftest import backends_for

from pyfici.optim import LayerwiseAdamW, LayerwiseSGD

common_optimizers = pytest.importorskip("torch.testing._internal.common_optimizers",
                                        reason="torch's optimizer test database needs expecttest")

OURS = {torch.optim.SGD: LayerwiseSGD, torch.optim.AdamW: LayerwiseAdamW}
INFOS = {o.optim_cls: o for o in common_optimizers.optim_db if o.optim_cls in OURS}
STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _configs():
    out = []
    for cls, info in INFOS.items():
        for inp in info.optim_inputs_func(device="cpu", dtype=torch.float32):
            out.append(pytest.param(cls, inp.kwargs, id=f"{cls.__name__}-{inp.desc.replace(' ', '_')}"))
    return out


def _shapes(be):
    if be != "cpu":  # the Triton interpreter and the per-tensor reference are slow: few, small tensors
        return [((3, 2, 2, 2), "channels_last"), ((3, 4), "transposed"), ((0,), None), ((13,), None), ((1,), None)]
    return [((5, 3, 3, 3), "channels_last"), ((4, 6, 1, 5), "channels_last"), ((37, 11), "transposed"),
            ((0,), None), ((1,), None), ((40013,), None), ((131,), None), ((2, 3, 7), None)]


def _make(shape, layout, dtype, gen):
    t = torch.randn(shape, generator=gen, dtype=dtype)
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        t = torch.randn(shape[::-1], generator=gen, dtype=dtype).t()
    return t


def _clone_kwargs(kw):
    out = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor):
            v = v.clone()
        elif isinstance(v, tuple):
            v = tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in v)
        out[k] = v
    return out


def _group_kwargs(kw, k):
    """The second group gets another lr (a tensor when the config's lr is one)."""
    kw = _clone_kwargs(kw)
    if k == 1:
        lr = kw.get("lr", 1e-3)
        kw["lr"] = lr * 3.0 if isinstance(lr, torch.Tensor) else float(lr) * 3.0
    return kw


def _rel(a, b):
    if a.numel() == 0:
        return 0.0
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _run(cls, kwargs, dtype, be, impl, steps=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    specs = _shapes(be)
    init = [_make(s, lay, dtype, gen) for s, lay in specs]
    a = [torch.nn.Parameter(t.clone(memory_format=torch.preserve_format)) for t in init]
    b = [torch.nn.Parameter(t.clone(memory_format=torch.preserve_format)) for t in init]
    half = len(a) // 2
    ours = OURS[cls]([dict(params=a[:half], **_group_kwargs(kwargs, 0)), dict(params=a[half:], **_group_kwargs(kwargs, 1))],
                     backend=be, **impl)
    ref = cls([dict(params=b[:half], **_group_kwargs(kwargs, 0)), dict(params=b[half:], **_group_kwargs(kwargs, 1))],
              foreach=False)
    sched = [torch.optim.lr_scheduler.StepLR(o, step_size=4, gamma=0.7) for o in (ours, ref)]
    for it in range(steps):
        for k, (x, y) in enumerate(zip(a, b)):
            if (it + k) % 7 == 3:  # no grad this step: skipped by both
                x.grad = y.grad = None
                continue
            g = torch.randn(x.shape, generator=gen, dtype=dtype)
            if not (k == 0 and it % 2):  # mostly in the param's layout, sometimes contiguous
                g = torch.empty_like(x).copy_(g)
            x.grad = g.clone()
            y.grad = g.clone()
        ours.step()
        ref.step()
        for s in sched:
            s.step()
    return a, b, ours, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("cls,kwargs", _configs())
def test_optim_db_config_matches_torch(cls, kwargs, dtype):
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for be in backends_for("cpu") + ["torch"]:
        for impl in ({}, {"fused": True}) if be == "cpu" else ({},):
            a, b, ours, ref = _run(cls, kwargs, dtype, be, impl)
            for i, (x, y) in enumerate(zip(a, b)):
                assert x.stride() == y.stride(), (be, i)
                err = _rel(x.detach(), y.detach())
                assert err < tol, f"{be} {impl} param {i}: rel err {err:.3g}"
                sx, sy = ours.state[x], ref.state[y]
                for key in STATE_KEYS:
                    if key in sy:
                        assert sx[key].dtype == y.dtype and sx[key].stride() == x.stride(), (be, key)
                        err = _rel(sx[key], sy[key])
                        assert err < tol, f"{be} {impl} param {i} state {key}: rel err {err:.3g}"
                if "step" in sy:
                    assert float(sx["step"]) == float(sy["step"]), (be, i)


def test_optim_db_foreach_flag_accepted():
    """foreach=True/False is accepted (and stored) wherever torch accepts it."""
    for cls, kw in ((torch.optim.SGD, {"momentum": 0.9}), (torch.optim.AdamW, {"amsgrad": True})):
        for foreach in (None, True, False):
            a, b, ours, _ = _run(cls, kw, torch.float32, "cpu", {"foreach": foreach}, steps=3)
            assert ours.param_groups[0]["foreach"] == foreach
            assert max(_rel(x.detach(), y.detach()) for x, y in zip(a, b)) < 1e-6


def _error_inputs():
    out = []
    for cls, info in INFOS.items():
        for e in info.optim_error_inputs_func(device="cpu", dtype=torch.float32):
            inp = e.optimizer_error_input
            if e.error_on != common_optimizers.OptimizerErrorEnum.CONSTRUCTION_ERROR:
                continue
            out.append(pytest.param(cls, inp, e.error_type, e.error_regex,
                                    id=f"{cls.__name__}-{inp.desc.replace(' ', '_')}"))
    return out


@pytest.mark.parametrize("cls,inp,error_type,regex", _error_inputs())
def test_optim_db_construction_errors_match_torch(cls, inp, error_type, regex):
    params = inp.params
    if params is None:
        params = [torch.nn.Parameter(torch.randn(3))]
    if issubclass(error_type, Warning):
        with pytest.warns(error_type, match=regex):
            OURS[cls](params, **inp.kwargs)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error_type, match=regex):
            OURS[cls](params, **inp.kwargs)
