"""``LayerwiseSGD`` and ``LayerwiseAdamW``: drop-in replacements for
``torch.optim.SGD`` / ``torch.optim.AdamW`` whose step is ONE fused pyfici op
per (device, dtype) for all param groups, with optional pruning masks.

How a step works: the params are packed once into buckets by (device, dtype)
(re-packed after ``add_param_group``, ``load_state_dict``, ``set_mask`` /
``clear_mask``, and whenever a param's size, strides, dtype or device changed,
e.g. after ``param.data = ...`` or ``model.to(memory_format=...)``). Each step
builds, on the CPU, the per-tensor learning rates from the groups' ``lr``
(Python floats or 1-element tensors, so lr schedulers work unchanged) and copies
them to the device with ``non_blocking=True`` from pageable memory (the driver
stages the copy; no device synchronisation); lrs that are tensors on the
params' device are gathered on the device. Per-tensor hyper-parameter tables
are cached and rebuilt only when a group's momentum / weight decay / betas /
flags change. A param without ``.grad`` is skipped (frozen for that step), as
in torch. ``torch.amp.GradScaler`` is supported without a host sync: the
optimizer declares ``_step_supports_amp_scaling`` and the kernels unscale and
skip on ``found_inf`` themselves.

Masks (``set_mask``) live in ``state[param]["mask"]`` (bool) and round-trip
through ``state_dict``. Optimizer state is float64 for float64 params and
float32 for every other param dtype, in the param's memory layout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from itertools import chain

import numpy as np
import torch
from torch.optim import Optimizer

from pyfici.ops import optim as ops
from pyfici.ops._backend import choose_backend

_EMPTY: dict = {}


def _placeholder(dev: torch.device) -> torch.Tensor:
    t = _EMPTY.get(dev)
    if t is None:
        t = _EMPTY[dev] = torch.empty(0, device=dev)
    return t


def _scalar_key(x):
    """A hashable, comparable stand-in for a hyper-parameter that may be a 1-element tensor."""
    if isinstance(x, torch.Tensor):
        return float(x)
    if isinstance(x, (tuple, list)):
        return tuple(_scalar_key(v) for v in x)
    return x


def _check_lr(lr) -> None:
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")


def _check_impl_flags(name: str, foreach, fused, differentiable: bool, capturable: bool = False) -> None:
    if differentiable:
        raise ValueError(
            f"{name}: differentiable=True is not supported: the step is one fused in-place kernel that autograd "
            "does not see; use torch.optim for a differentiable optimizer step")
    if capturable:
        raise ValueError(
            f"{name}: capturable=True is not supported: a step copies per-tensor learning rates and pointer tables "
            "from the host, which a CUDA graph cannot capture. The step never synchronises with the device, so "
            "capturable=False costs no host sync; use torch.optim with capturable=True to capture the step in a CUDA graph")
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


class _Bucket:
    __slots__ = ("device", "dtype", "params", "where", "group_of", "masks", "state_a", "state_b", "state_c",
                 "steps", "init", "hyper_key", "hyper", "backend", "plan", "layout", "ptrs", "group_idx_dev")

    def __init__(self, device, dtype):
        self.device, self.dtype = device, dtype
        self.params: list[torch.Tensor] = []
        self.where: list[tuple[int, int]] = []  # (group, index in the group) of each param
        self.group_of: list[int] = []
        self.masks: list[torch.Tensor | None] = []
        self.state_a: list[torch.Tensor] = []  # momentum buffers / exp_avgs
        self.state_b: list[torch.Tensor] = []  # exp_avg_sqs
        self.state_c: list[torch.Tensor] = []  # max_exp_avg_sqs (amsgrad)
        self.steps: torch.Tensor | None = None
        self.init: list[bool] = []
        self.hyper_key = None
        self.hyper: torch.Tensor | None = None
        self.backend = ""
        self.plan: ops.StepPlan | None = None
        self.layout = None
        self.ptrs: np.ndarray | None = None
        self.group_idx_dev: torch.Tensor | None = None


def _layout_of(params: list[torch.Tensor]):
    return tuple(map(torch.Tensor.size, params)), tuple(map(torch.Tensor.stride, params))


class _LayerwiseOptimizer(Optimizer):
    _step_supports_amp_scaling = True
    _state_keys: tuple[str, ...] = ()

    def __init__(self, params, defaults, backend: str | None):
        self._backend = backend
        self._buckets: list[_Bucket] | None = None
        super().__init__(params, defaults)

    # ---- masks ---------------------------------------------------------------
    def _find(self, param: torch.Tensor) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                if p is param:
                    return
        raise ValueError("param: this tensor is not one of the optimizer's params")

    @torch.no_grad()
    def set_mask(self, param: torch.Tensor, mask: torch.Tensor) -> None:
        """Keep ``param`` pruned by ``mask`` (bool/uint8, the param's shape and device; True = keep).

        The param is zeroed where the mask is 0 now, and every step zeroes the gradient there
        before the update and the param after it (Apex ASP semantics), so a pruned weight
        stays exactly 0.
        """
        self._find(param)
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask: expected a torch.Tensor, got {type(mask).__name__}")
        if mask.shape != param.shape:
            raise ValueError(f"mask: expected shape {tuple(param.shape)} (the param's), got {tuple(mask.shape)}")
        if mask.device != param.device:
            raise ValueError(f"mask: expected device {param.device} (the param's), got {mask.device}")
        if mask.dtype not in ops.MASK_DTYPES:
            raise TypeError(f"mask: expected dtype bool or uint8, got {mask.dtype}")
        mask = mask.detach() != 0
        mask = ops.in_layout_of(mask, param) if ops.is_dense(param) else mask.contiguous()
        param.masked_fill_(~mask, 0.0)
        self.state[param]["mask"] = mask
        self._buckets = None

    def set_masks(self, masks: Mapping[torch.Tensor, torch.Tensor]) -> None:
        """``set_mask`` for every (param, mask) pair of ``masks`` (e.g. from
        :func:`pyfici.optim.masks.torch_prune_masks` or :func:`pyfici.optim.masks.nm_masks`)."""
        for p, m in masks.items():
            self.set_mask(p, m)

    def clear_mask(self, param: torch.Tensor) -> None:
        """Stop masking ``param``."""
        self._find(param)
        if param in self.state:
            self.state[param].pop("mask", None)
        self._buckets = None

    def get_mask(self, param: torch.Tensor) -> torch.Tensor | None:
        return self.state[param].get("mask") if param in self.state else None

    # ---- packing -------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._buckets = None

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        id_map = dict(zip(ids, chain.from_iterable(g["params"] for g in self.param_groups)))
        # torch casts floating state to the param's dtype: keep ours in the state dtype (and masks bool)
        for k, v in saved.items():
            p = id_map.get(k)
            if p is None or p not in self.state:
                continue
            st = self.state[p]
            for key in self._state_keys:
                if isinstance(v.get(key), torch.Tensor):
                    st[key] = v[key].detach().to(device=p.device, dtype=ops.state_dtype(p.dtype)).clone()
            if isinstance(v.get("mask"), torch.Tensor):
                st["mask"] = v["mask"].to(device=p.device, dtype=torch.bool)
            if "step" in st:
                st["step"] = torch.as_tensor(st["step"], dtype=torch.float32).detach().clone()
        self._buckets = None

    def _state_tensor(self, where: tuple[int, int], p: torch.Tensor, key: str, dtype: torch.dtype | None = None):
        """state[p][key] checked against p (the same shape, else the error torch would give)
        and brought into p's layout and the state dtype; None if absent."""
        st = self.state[p] if p in self.state else {}
        t = st.get(key)
        if t is None:
            return None
        if t.shape != p.shape:
            gi, j = where
            raise RuntimeError(
                f"param_groups[{gi}]['params'][{j}] has shape {tuple(p.shape)} but its optimizer state '{key}' has "
                f"shape {tuple(t.shape)} (was param.data replaced by a tensor of another size?)")
        want = ops.state_dtype(p.dtype) if dtype is None else dtype
        if t.dtype != want or t.device != p.device or not ops.same_layout(t, p):
            t = ops.in_layout_of(t.to(p.device), p, want)
            st[key] = t
        return t

    def _new_state(self, p: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(p, dtype=ops.state_dtype(p.dtype), memory_format=torch.preserve_format)

    def _pack(self) -> list[_Bucket]:
        buckets: dict[tuple, _Bucket] = {}
        for gi, g in enumerate(self.param_groups):
            _check_impl_flags(f"param_groups[{gi}]", g.get("foreach"), g.get("fused"),
                              bool(g.get("differentiable")), bool(g.get("capturable")))
            for j, p in enumerate(g["params"]):
                if p.is_sparse:
                    raise ValueError("params: sparse params are not supported")
                if p.dtype not in ops.PARAM_DTYPES:
                    raise TypeError(f"params: dtype {p.dtype} is not supported (float32, float64, float16, bfloat16)")
                if not ops.is_dense(p):
                    raise ValueError(f"params: a param of shape {tuple(p.shape)} and stride {p.stride()} is not dense "
                                     "(a view with gaps or overlaps); give the optimizer dense tensors")
                key = (p.device, p.dtype)
                b = buckets.get(key)
                if b is None:
                    b = buckets[key] = _Bucket(p.device, p.dtype)
                    b.backend = choose_backend(self._op_name, p.device, self._backend)
                b.params.append(p)
                b.where.append((gi, j))
                b.group_of.append(gi)
                b.masks.append(self._state_tensor((gi, j), p, "mask", torch.bool))
        out = list(buckets.values())
        for b in out:
            b.layout = _layout_of(b.params)
            self._init_bucket_state(b)
        return out

    def _lrs(self, b: _Bucket, has_grad: list[bool]) -> torch.Tensor:
        group_lr: list = []
        on_device = False
        for i, g in enumerate(self.param_groups):
            lr = g["lr"]
            if isinstance(lr, torch.Tensor) and lr.device.type != "cpu":
                on_device = True  # gathered on the device below: no host sync
                group_lr.append(lr)
                continue
            lr = float(lr)
            if not math.isfinite(lr):
                raise ValueError(f"param_groups[{i}]['lr']: must be finite, got {lr}")
            group_lr.append(lr)
        if not on_device:
            lrs = np.asarray(group_lr, dtype=np.float64)[np.asarray(b.group_of)] * np.asarray(has_grad, dtype=np.float64)
            t = torch.from_numpy(lrs)
            return t if b.device.type == "cpu" else t.to(b.device, non_blocking=True)
        dev = b.device
        per_group = torch.stack([lr.reshape(()).to(dev, torch.float64) if isinstance(lr, torch.Tensor)
                                 else torch.full((), lr, dtype=torch.float64, device=dev) for lr in group_lr])
        if b.group_idx_dev is None:
            b.group_idx_dev = torch.tensor(b.group_of, dtype=torch.int64).to(dev, non_blocking=True)
        has = torch.tensor(has_grad, dtype=torch.float64).to(dev, non_blocking=True)
        return per_group.index_select(0, b.group_idx_dev) * has

    def _grads(self, b: _Bucket, check: bool) -> tuple[list[torch.Tensor], list[bool]]:
        """The params' grads (a placeholder where there is none), in each param's layout.
        ``check``: also compare shapes and dtypes (after a re-pack: a grad left over from
        before ``param.data`` was replaced)."""
        ph = _placeholder(b.device)
        grads = [p.grad for p in b.params]
        has = [g is not None for g in grads]
        if check:
            for (gi, j), p, g in zip(b.where, b.params, grads):
                if g is not None and (g.shape != p.shape or g.dtype != p.dtype or g.device != p.device):
                    raise RuntimeError(
                        f"param_groups[{gi}]['params'][{j}]: its grad ({g.dtype}, shape {tuple(g.shape)}, {g.device}) "
                        f"does not match the param ({p.dtype}, shape {tuple(p.shape)}, {p.device})")
        gstrides = tuple(g.stride() if g is not None else s for g, s in zip(grads, b.layout[1]))
        same = gstrides == b.layout[1]
        for i, g in enumerate(grads):
            if g is None:
                grads[i] = ph
            elif g.is_sparse:
                raise ValueError("grads: sparse gradients are not supported")
            elif not same and not ops.same_layout(g, b.params[i]):
                grads[i] = ops.in_layout_of(g, b.params[i])
        return grads, has

    def _amp(self, dev: torch.device):
        gs = getattr(self, "grad_scale", None)
        fi = getattr(self, "found_inf", None)
        if gs is not None:
            gs = gs.to(device=dev, dtype=torch.float32, non_blocking=True).reshape(())
        if fi is not None:
            fi = fi.to(device=dev, dtype=torch.float32, non_blocking=True).reshape(())
        return gs, fi

    def _changed(self, b: _Bucket) -> bool:
        """Did a param of ``b`` change size, strides, dtype or device since it was packed?"""
        if _layout_of(b.params) != b.layout:
            return True
        ptrs = ops._ptrs(b.params)
        if b.ptrs is None or not np.array_equal(ptrs, b.ptrs):
            b.ptrs = ptrs  # new storage (param.data = ...): dtype and device may have changed with it
            return any(p.dtype != b.dtype or p.device != b.device for p in b.params)
        return False

    @torch.no_grad()
    def step(self, closure=None):
        """One fused step over all param groups; returns closure() if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        fresh = self._buckets is None
        if not fresh and any(self._changed(b) for b in self._buckets):
            self._buckets, fresh = None, True
        if fresh:
            self._buckets = self._pack()
        for b in self._buckets:
            if b.params:
                self._step_bucket(b, fresh)
        return loss


class LayerwiseSGD(_LayerwiseOptimizer):
    """``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay, maximize) where all
    groups step in one fused op per (device, dtype), with optional pruning masks.

    Same as torch: the update of every element (float64 math for float64 params, float32
    otherwise), param groups, lr schedulers, a 1-element tensor ``lr``, any dense memory
    layout (channels_last...), ``state_dict`` in torch's format (``momentum_buffer``).
    ``foreach`` / ``fused`` are accepted and stored (every pyfici step is one fused kernel
    whatever they say; ``fused=True`` with ``foreach=True`` raises as in torch).
    Differences: ``differentiable=True`` raises ValueError; a param whose group has lr == 0
    and weight_decay == 0 is not touched at all (torch would still update its momentum
    buffer); momentum buffers are float32 for float16 / bfloat16 params.
    ``backend`` picks the pyfici backend (see pyfici.ops).
    """

    _op_name = "layerwise_sgd_step_"
    _state_keys = ("momentum_buffer",)

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None,
                 backend: str | None = None):
        _check_lr(lr)
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        _check_impl_flags("LayerwiseSGD", foreach, fused, differentiable)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=False, fused=fused)
        super().__init__(params, defaults, backend)

    def _init_bucket_state(self, b: _Bucket) -> None:
        ph = _placeholder(b.device)
        for w, p in zip(b.where, b.params):
            buf = self._state_tensor(w, p, "momentum_buffer")
            b.state_a.append(buf if buf is not None else ph)
            b.init.append(False)

    def _step_bucket(self, b: _Bucket, fresh: bool) -> None:
        grads, has = self._grads(b, fresh)
        groups = self.param_groups
        ph = _placeholder(b.device)
        for i, p in enumerate(b.params):
            g = groups[b.group_of[i]]
            if has[i] and g["momentum"] != 0 and b.state_a[i] is ph:
                buf = self._new_state(p)
                self.state[p]["momentum_buffer"] = buf
                b.state_a[i] = buf
                b.init[i] = True
        key = (_scalar_key(tuple((g["momentum"], g["dampening"], g["nesterov"], g["weight_decay"], g["maximize"])
                                 for g in groups)), tuple(has), tuple(b.init))
        if key != b.hyper_key:
            rows = [groups[gi] for gi in b.group_of]
            b.hyper = ops.sgd_hyper(
                len(rows),
                momentum=[float(r["momentum"]) for r in rows],
                dampening=[float(r["dampening"]) for r in rows],
                nesterov=[r["nesterov"] for r in rows],
                weight_decay=[float(r["weight_decay"]) if h else 0.0 for r, h in zip(rows, has)],
                init_momentum=b.init,
                maximize=[r["maximize"] for r in rows],
            )
            b.hyper_key = key
            b.plan = ops.sgd_plan(b.params, b.state_a, b.hyper, b.masks)
        lrs = self._lrs(b, has)
        gs, fi = self._amp(b.device)
        ops.sgd_step_packed(b.params, grads, b.state_a, lrs, b.hyper, b.masks, gs, fi, b.backend, b.plan)
        if any(b.init):
            for i, gi in enumerate(b.group_of):
                g = groups[gi]
                if b.init[i] and has[i] and (_scalar_key(g["lr"]) != 0 or g["weight_decay"] != 0):
                    b.init[i] = False


class LayerwiseAdamW(_LayerwiseOptimizer):
    """``torch.optim.AdamW`` (decoupled weight decay, amsgrad, maximize) where all groups step
    in one fused op per (device, dtype), with optional pruning masks.

    Same as torch: the update of every element (float64 math for float64 params, float32
    otherwise), param groups, lr schedulers, 1-element tensor ``lr`` / ``betas``, any dense
    memory layout, ``state_dict`` in torch's format (``step``, ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq``). ``foreach`` / ``fused`` are accepted and stored (every pyfici step
    is one fused kernel; the combinations torch refuses raise as in torch).
    Differences: ``capturable=True`` and ``differentiable=True`` raise ValueError (the step
    never synchronises with the device, but it is not CUDA-graph capturable); a param whose
    group has lr == 0 and weight_decay == 0 is not touched (its step count does not
    advance); state is float32 for float16 / bfloat16 params; ``state[p]["step"]`` is a
    float32 scalar tensor on the param's device (a view into one per-bucket tensor) and the
    state exists from the first step on for every param.
    """

    _op_name = "layerwise_adamw_step_"
    _state_keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, foreach: bool | None = None, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None, backend: str | None = None):
        if isinstance(lr, torch.Tensor):
            if foreach and not capturable:
                raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        _check_lr(lr)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if isinstance(betas[0], torch.Tensor) != isinstance(betas[1], torch.Tensor):
            raise ValueError("betas must be either both floats or both Tensors")
        for k in (0, 1):
            if isinstance(betas[k], torch.Tensor):
                if foreach and not capturable:
                    raise ValueError(f"betas[{k}] as a Tensor is not supported for capturable=False and foreach=True")
                if betas[k].numel() != 1:
                    raise ValueError(f"Tensor betas[{k}] must be 1-element")
        _check_impl_flags("LayerwiseAdamW", foreach, fused, differentiable, capturable)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=False, differentiable=False, fused=fused)
        super().__init__(params, defaults, backend)

    def _init_bucket_state(self, b: _Bucket) -> None:
        steps = []
        ph = _placeholder(b.device)
        for w, p in zip(b.where, b.params):
            st = self.state[p]
            ea = self._state_tensor(w, p, "exp_avg")
            eas = self._state_tensor(w, p, "exp_avg_sq")
            if ea is None or eas is None:
                ea = st["exp_avg"] = self._new_state(p)
                eas = st["exp_avg_sq"] = self._new_state(p)
            mx = self._state_tensor(w, p, "max_exp_avg_sq")
            if mx is None and self.param_groups[w[0]]["amsgrad"]:
                mx = st["max_exp_avg_sq"] = self._new_state(p)
            steps.append(float(st["step"]) if "step" in st else 0.0)
            b.state_a.append(ea)
            b.state_b.append(eas)
            b.state_c.append(mx if mx is not None else ph)
        b.steps = torch.tensor(steps, dtype=torch.float32).to(b.device)
        for i, p in enumerate(b.params):
            self.state[p]["step"] = b.steps[i]

    def _step_bucket(self, b: _Bucket, fresh: bool) -> None:
        grads, has = self._grads(b, fresh)
        groups = self.param_groups
        key = (_scalar_key(tuple((g["betas"][0], g["betas"][1], g["eps"], g["weight_decay"], g["amsgrad"], g["maximize"])
                                 for g in groups)), tuple(has))
        if key != b.hyper_key:
            ph = _placeholder(b.device)
            for i, p in enumerate(b.params):
                if groups[b.group_of[i]]["amsgrad"] and b.state_c[i] is ph:  # amsgrad switched on
                    b.state_c[i] = self.state[p]["max_exp_avg_sq"] = self._new_state(p)
            rows = [groups[gi] for gi in b.group_of]
            b.hyper = ops.adamw_hyper(
                len(rows),
                beta1=[float(r["betas"][0]) for r in rows],
                beta2=[float(r["betas"][1]) for r in rows],
                eps=[float(r["eps"]) for r in rows],
                weight_decay=[float(r["weight_decay"]) if h else 0.0 for r, h in zip(rows, has)],
                amsgrad=[r["amsgrad"] for r in rows],
                maximize=[r["maximize"] for r in rows],
            )
            b.hyper_key = key
            b.plan = ops.adamw_plan(b.params, b.state_a, b.state_b, b.state_c, b.hyper, b.masks)
        lrs = self._lrs(b, has)
        gs, fi = self._amp(b.device)
        ops.adamw_step_packed(b.params, grads, b.state_a, b.state_b, b.state_c, lrs, b.steps, b.hyper, b.masks,
                              gs, fi, b.backend, b.plan)
