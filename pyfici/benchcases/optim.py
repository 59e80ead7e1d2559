"""Benchmark cases for family 2 (fused layer-wise optimizer steps, weight variation).

Workload: ResNet-50's parameter list (161 tensors, 25.6M parameters) in 19
groups with different lrs, bool masks (30% zeros) on every conv weight, SGD
momentum 0.9 Nesterov, weight decay 5e-4 (AdamW: weight decay 1e-2). Anchors,
timed in the same case so their ratios come from one run:

- the Apex-ASP pattern on torch's best optimizer (``_foreach_mul_(grads,
  masks)``, the fused step, ``_foreach_mul_(params, masks)``), bool masks.
  Goal: anchor / pyfici >= 2;
- torch's fused optimizer in one group WITHOUT masks (the fastest unmasked
  step torch has). Goal: anchor / pyfici >= 1 / 1.15, i.e. the masked pyfici
  step costs at most 1.15x torch's unmasked one.

On the CPU each of these cases runs at 2 threads and at 1 thread (every
implementation inside the case sets ``torch.set_num_threads``; pyfici's kernels
use torch's thread count), so the lead can time all of them with
``pyfici bench --family optim --size full`` on an idle machine. Extra rows: the
ASP pattern with float masks and a plain copy that moves the same number of
bytes as the masked SGD step (anchor / ours of that row = fraction of copy
bandwidth). ``size="full"`` on cuda adds a 1B-parameter list.
"""

from __future__ import annotations

import os

import torch

from pyfici.bench import Case


def resnet50_shapes(width_div: int = 1) -> tuple[list[tuple[int, ...]], list[int]]:
    """torchvision resnet50's parameter shapes in order (161 tensors, 25.6M) and a
    19-group assignment: conv1, bn1, the 16 bottlenecks, fc. ``width_div`` shrinks
    the channels (for the small size)."""
    try:  # the real thing when torchvision is installed
        if width_div == 1:
            import torchvision

            m = torchvision.models.resnet50()
            names = [n for n, _ in m.named_parameters()]
            shapes = [tuple(p.shape) for p in m.parameters()]
            return shapes, _groups(names)
    except ImportError:
        pass
    d = width_div
    shapes, names = [], []

    def add(name, shape):
        names.append(name)
        shapes.append(shape)

    add("conv1.weight", (64 // d, 3, 7, 7))
    add("bn1.weight", (64 // d,))
    add("bn1.bias", (64 // d,))
    inplanes = 64 // d
    for li, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)]):
        planes //= d
        for bi in range(blocks):
            pre = f"layer{li + 1}.{bi}."
            add(pre + "conv1.weight", (planes, inplanes, 1, 1))
            add(pre + "bn1.weight", (planes,))
            add(pre + "bn1.bias", (planes,))
            add(pre + "conv2.weight", (planes, planes, 3, 3))
            add(pre + "bn2.weight", (planes,))
            add(pre + "bn2.bias", (planes,))
            add(pre + "conv3.weight", (planes * 4, planes, 1, 1))
            add(pre + "bn3.weight", (planes * 4,))
            add(pre + "bn3.bias", (planes * 4,))
            if bi == 0:
                add(pre + "downsample.0.weight", (planes * 4, inplanes, 1, 1))
                add(pre + "downsample.1.weight", (planes * 4,))
                add(pre + "downsample.1.bias", (planes * 4,))
            inplanes = planes * 4
    add("fc.weight", (1000, inplanes))
    add("fc.bias", (1000,))
    return shapes, _groups(names)


def _groups(names: list[str]) -> list[int]:
    keys: dict[str, int] = {}
    out = []
    for n in names:
        parts = n.split(".")
        k = ".".join(parts[:2]) if parts[0].startswith("layer") else parts[0]
        out.append(keys.setdefault(k, len(keys)))
    return out


def _param_groups(params, group_of, lr=0.1):
    n_groups = max(group_of) + 1
    groups = [[] for _ in range(n_groups)]
    for p, g in zip(params, group_of):
        groups[g].append(p)
    return [{"params": ps, "lr": lr * (0.5 + i / n_groups)} for i, ps in enumerate(groups)]


def _make(shapes, device, dtype=torch.float32, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype, generator=gen)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device=device, dtype=dtype, generator=gen)
    masks = [(torch.rand(s, device=device, generator=gen) > 0.3) if len(s) == 4 else None for s in shapes]
    return params, masks


def _threads(fns: dict, nthreads: int | None) -> dict:
    """Each callable run with ``nthreads`` torch threads (restored afterwards)."""
    if nthreads is None:
        return fns

    def wrap(fn):
        def run():
            saved = torch.get_num_threads()
            torch.set_num_threads(nthreads)
            try:
                return fn()
            finally:
                torch.set_num_threads(saved)

        return run

    return {k: wrap(f) for k, f in fns.items()}


def _label(label: str, nthreads: int | None) -> str:
    return label if nthreads is None else f"{label}, {nthreads} thread{'s' if nthreads > 1 else ''}"


def _sgd_case(shapes, group_of, device, label, light: bool = False, nthreads: int | None = None):
    kw = dict(momentum=0.9, nesterov=True, weight_decay=5e-4)

    def setup():
        from pyfici.optim import LayerwiseSGD

        ours_p, masks = _make(shapes, device)
        opt = LayerwiseSGD(_param_groups(ours_p, group_of), **kw)
        for p, m in zip(ours_p, masks):
            if m is not None:
                opt.set_mask(p, m)
        fns = {"pyfici": opt.step}

        tp, _ = _make(shapes, device)
        mp = [p for p, m in zip(tp, masks) if m is not None]
        mb = [m for m in masks if m is not None]
        topt = torch.optim.SGD(_param_groups(tp, group_of), fused=True, **kw)

        def asp(ms):
            @torch.no_grad()
            def run():
                torch._foreach_mul_([p.grad for p in mp], ms)
                topt.step()
                torch._foreach_mul_(mp, ms)

            return run

        fns["torch fused SGD + foreach bool mask (ASP)"] = asp(mb)
        if not light:  # the 1B list keeps to what fits next to ours in 80 GB
            sp, _ = _make(shapes, device)
            sopt = torch.optim.SGD(sp, lr=0.1, fused=True, **kw)
            fns["torch fused SGD, 1 group, no masks"] = sopt.step
            mf = [m.float() for m in mb]
            fns["torch fused SGD + foreach float mask (ASP)"] = asp(mf)

        # a copy moving the bytes of our step: read p, g, buf (+1 B mask), write p, buf
        numel = sum(p.numel() for p in ours_p)
        nmask = sum(m.numel() for m in mb)
        nbytes = (20 * numel + nmask) // 2
        src = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        fns["copy of the same bytes"] = lambda: dst.copy_(src)
        return _threads(fns, nthreads)

    n = sum(torch.Size(s).numel() for s in shapes)
    name = f"SGD {label} ({len(shapes)} tensors, {n / 1e6:.1f}M, {max(group_of) + 1} groups, masked convs)"
    return Case("optim", _label(name, nthreads), setup,
                note="momentum 0.9 nesterov wd 5e-4; goals: ASP >= 2x, unmasked >= 0.87x")


def _sgd_nomask_case(shapes, device, label, nthreads: int | None = None):
    kw = dict(momentum=0.9, nesterov=True, weight_decay=5e-4)

    def setup():
        from pyfici.optim import LayerwiseSGD

        ps, _ = _make(shapes, device)
        opt = LayerwiseSGD(ps, lr=0.1, **kw)
        tp, _ = _make(shapes, device)
        topt = torch.optim.SGD(tp, lr=0.1, fused=True, **kw)
        return _threads({"pyfici": opt.step, "torch fused SGD": topt.step}, nthreads)

    return Case("optim", _label(f"SGD {label}, 1 group, no masks", nthreads), setup, note="target: ratio >= 1/1.15")


def _adamw_case(shapes, group_of, device, label, nthreads: int | None = None):
    def setup():
        from pyfici.optim import LayerwiseAdamW

        ps, masks = _make(shapes, device)
        opt = LayerwiseAdamW(_param_groups(ps, group_of, 1e-3), weight_decay=1e-2)
        for p, m in zip(ps, masks):
            if m is not None:
                opt.set_mask(p, m)
        tp, _ = _make(shapes, device)
        mp = [p for p, m in zip(tp, masks) if m is not None]
        mb = [m for m in masks if m is not None]
        topt = torch.optim.AdamW(_param_groups(tp, group_of, 1e-3), weight_decay=1e-2, fused=True)
        sp, _ = _make(shapes, device)
        sopt = torch.optim.AdamW(sp, lr=1e-3, weight_decay=1e-2, fused=True)

        @torch.no_grad()
        def asp():
            torch._foreach_mul_([p.grad for p in mp], mb)
            topt.step()
            torch._foreach_mul_(mp, mb)

        return _threads({"pyfici": opt.step, "torch fused AdamW + foreach bool mask (ASP)": asp,
                         "torch fused AdamW, 1 group, no masks": sopt.step}, nthreads)

    return Case("optim", _label(f"AdamW {label}, groups, masked convs", nthreads), setup,
                note="goals: ASP >= 2x, unmasked >= 0.87x")


def _variation_case(shapes, device, label):
    def setup():
        from pyfici.ops import weight_variation

        a, _ = _make(shapes, device)
        a = [p.detach() for p in a]
        b = [p + 0.01 for p in a]

        def foreach():
            d = torch._foreach_sub(a, b)
            return torch.stack(torch._foreach_norm(d)) ** 2

        return {
            "pyfici": lambda: weight_variation(a, b),
            "torch foreach sub + norm": foreach,
            "torch per-tensor loop": lambda: torch.stack([(x - y).pow(2).sum() for x, y in zip(a, b)]),
        }

    return Case("optim", f"weight_variation {label}", setup)


def cpu_thread_counts() -> list[int]:
    """The thread counts the CPU cases run at: 2 (where the machine has 2 cores) and 1."""
    return [2, 1] if (os.cpu_count() or 1) >= 2 else [1]


def cases(size: str, device: str) -> list:
    if device not in ("cpu", "cuda"):
        return []
    if size == "full":
        shapes, group_of = resnet50_shapes()
        label = "ResNet-50"
    else:
        shapes, group_of = resnet50_shapes(width_div=4)
        label = "ResNet-50/4"
    threads = cpu_thread_counts() if device == "cpu" else [None]
    out = []
    for t in threads:
        out += [_sgd_case(shapes, group_of, device, label, nthreads=t), _adamw_case(shapes, group_of, device, label, nthreads=t)]
    out += [_sgd_nomask_case(shapes, device, label, nthreads=threads[0]), _variation_case(shapes, device, label)]
    if device == "cuda" and size == "full":
        # a 1B-parameter list: ResNet-50's shapes repeated ~39 times
        big = shapes * 39
        big_groups = [g + 19 * (i // len(shapes)) for i, g in enumerate(group_of * 39)]
        c = _sgd_case(big, big_groups, device, "1B params", light=True)
        c.repeats, c.warmup = 5, 1
        out.append(c)
    return out
