"""``LayerwiseSGD`` and ``LayerwiseAdamW``: drop-in replacements for
``torch.optim.SGD`` / ``torch.optim.AdamW`` whose step is ONE fused pyfici op
per (device, dtype) for all param groups, with optional pruning masks.

How a step works: the params are packed once into buckets by (device, dtype)
(re-packed after ``add_param_group``, ``load_state_dict``, ``set_mask`` /
``clear_mask``). Each step builds, on the CPU, the per-tensor learning rates
from the groups' ``lr`` (Python floats, so lr schedulers work unchanged) and
copies them to the device with ``non_blocking=True`` from pageable memory
(the driver stages the copy; no device synchronisation). Per-tensor
hyper-parameter tables are cached and rebuilt only when a group's momentum /
weight decay / betas change. A param without ``.grad`` is skipped (frozen for
that step), as in torch. ``torch.amp.GradScaler`` is supported without a host
sync: the optimizer declares ``_step_supports_amp_scaling`` and the kernels
unscale and skip on ``found_inf`` themselves.

Masks (``set_mask``) live in ``state[param]["mask"]`` (bool) and round-trip
through ``state_dict``. Optimizer state is float32 whatever the param dtype.
"""

from __future__ import annotations

import math
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


class _Bucket:
    __slots__ = ("device", "dtype", "params", "group_of", "masks", "state_a", "state_b", "steps",
                 "init", "hyper_key", "hyper", "backend", "plan")

    def __init__(self, device, dtype):
        self.device, self.dtype = device, dtype
        self.params: list[torch.Tensor] = []
        self.group_of: list[int] = []
        self.masks: list[torch.Tensor | None] = []
        self.state_a: list[torch.Tensor] = []  # momentum buffers / exp_avgs
        self.state_b: list[torch.Tensor] = []  # exp_avg_sqs
        self.steps: torch.Tensor | None = None
        self.init: list[bool] = []
        self.hyper_key = None
        self.hyper: torch.Tensor | None = None
        self.backend = ""
        self.plan: ops.StepPlan | None = None


class _LayerwiseOptimizer(Optimizer):
    _step_supports_amp_scaling = True
    _unsupported_flags: tuple[str, ...] = ()
    _fp32_state_keys: tuple[str, ...] = ()

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

        The param is multiplied by the mask now, and every step multiplies the gradient
        by it before the update and the param after it (Apex ASP semantics).
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
        mask = mask.to(torch.bool).contiguous()
        param.mul_(mask)
        self.state[param]["mask"] = mask
        self._buckets = None

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
        # torch casts floating state to the param's dtype: keep ours float32 (and masks bool)
        for k, v in saved.items():
            p = id_map.get(k)
            if p is None or p not in self.state:
                continue
            st = self.state[p]
            for key in self._fp32_state_keys:
                if isinstance(v.get(key), torch.Tensor):
                    st[key] = v[key].detach().to(device=p.device, dtype=torch.float32).clone().contiguous()
            if isinstance(v.get("mask"), torch.Tensor):
                st["mask"] = v["mask"].to(device=p.device, dtype=torch.bool).contiguous()
            if "step" in st:
                st["step"] = torch.as_tensor(st["step"], dtype=torch.float32).detach().clone()
        self._buckets = None

    def _pack(self) -> list[_Bucket]:
        buckets: dict[tuple, _Bucket] = {}
        for gi, g in enumerate(self.param_groups):
            for flag in self._unsupported_flags:
                if g.get(flag):
                    raise NotImplementedError(f"param_groups[{gi}]['{flag}'] = True is not supported by {type(self).__name__}")
            for p in g["params"]:
                if p.is_sparse:
                    raise ValueError("params: sparse params are not supported")
                if p.dtype not in ops.PARAM_DTYPES:
                    raise TypeError(f"params: dtype {p.dtype} is not supported (float32, float16, bfloat16)")
                if not p.is_contiguous():
                    raise ValueError(f"params: a param of shape {tuple(p.shape)} is not contiguous")
                key = (p.device, p.dtype)
                b = buckets.get(key)
                if b is None:
                    b = buckets[key] = _Bucket(p.device, p.dtype)
                    b.backend = choose_backend(self._op_name, p.device, self._backend)
                b.params.append(p)
                b.group_of.append(gi)
                st = self.state[p] if p in self.state else {}
                b.masks.append(st.get("mask"))
        out = list(buckets.values())
        for b in out:
            self._init_bucket_state(b)
        return out

    def _lrs(self, b: _Bucket, has_grad: list[bool]) -> torch.Tensor:
        group_lr = []
        for i, g in enumerate(self.param_groups):
            lr = g["lr"]
            lr = float(lr)
            if not math.isfinite(lr):
                raise ValueError(f"param_groups[{i}]['lr']: must be finite, got {lr}")
            group_lr.append(lr)
        lrs = np.asarray(group_lr, dtype=np.float32)[np.asarray(b.group_of)] * np.asarray(has_grad, dtype=np.float32)
        t = torch.from_numpy(lrs)
        return t if b.device.type == "cpu" else t.to(b.device, non_blocking=True)

    def _grads(self, b: _Bucket) -> tuple[list[torch.Tensor], list[bool]]:
        # torch checks shape, dtype and device when .grad is assigned; only layout is ours to check
        ph = _placeholder(b.device)
        grads = [p.grad for p in b.params]
        has = [g is not None for g in grads]
        for i, g in enumerate(grads):
            if g is None:
                grads[i] = ph
            elif not g.is_contiguous():
                if g.is_sparse:
                    raise ValueError("grads: sparse gradients are not supported")
                grads[i] = g.contiguous()
        return grads, has

    def _amp(self, dev: torch.device):
        gs = getattr(self, "grad_scale", None)
        fi = getattr(self, "found_inf", None)
        if gs is not None:
            gs = gs.to(device=dev, dtype=torch.float32, non_blocking=True).reshape(())
        if fi is not None:
            fi = fi.to(device=dev, dtype=torch.float32, non_blocking=True).reshape(())
        return gs, fi

    @torch.no_grad()
    def step(self, closure=None):
        """One fused step over all param groups; returns closure() if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._buckets is None:
            self._buckets = self._pack()
        for b in self._buckets:
            if b.params:
                self._step_bucket(b)
        return loss


class LayerwiseSGD(_LayerwiseOptimizer):
    """``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay) where all groups
    step in one fused op per (device, dtype), with optional pruning masks.

    Differences from torch: ``maximize`` and ``differentiable`` are not supported;
    ``foreach`` / ``fused`` are accepted and ignored; a param whose group has lr == 0 and
    weight_decay == 0 is not touched at all (torch would still update its momentum buffer);
    momentum buffers are float32 for every param dtype. ``backend`` picks the pyfici backend.
    """

    _op_name = "layerwise_sgd_step_"
    _unsupported_flags = ("maximize", "differentiable")
    _fp32_state_keys = ("momentum_buffer",)

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None,
                 backend: str | None = None):
        if not math.isfinite(float(lr)) or float(lr) < 0.0:
            raise ValueError(f"lr: must be finite and >= 0, got {lr}")
        if momentum < 0.0:
            raise ValueError(f"momentum: must be >= 0, got {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay: must be >= 0, got {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov: needs momentum > 0 and zero dampening")
        if maximize or differentiable:
            raise NotImplementedError("LayerwiseSGD: maximize and differentiable are not supported")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=False, foreach=None, differentiable=False, fused=None)
        super().__init__(params, defaults, backend)

    def _init_bucket_state(self, b: _Bucket) -> None:
        ph = _placeholder(b.device)
        for p in b.params:
            st = self.state[p] if p in self.state else {}
            buf = st.get("momentum_buffer")
            b.state_a.append(buf if buf is not None else ph)
            b.init.append(False)

    def _step_bucket(self, b: _Bucket) -> None:
        grads, has = self._grads(b)
        groups = self.param_groups
        ph = _placeholder(b.device)
        for i, p in enumerate(b.params):
            g = groups[b.group_of[i]]
            if has[i] and g["momentum"] != 0 and b.state_a[i] is ph:
                buf = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
                self.state[p]["momentum_buffer"] = buf
                b.state_a[i] = buf
                b.init[i] = True
        key = (tuple((g["momentum"], g["dampening"], g["nesterov"], g["weight_decay"]) for g in groups),
               tuple(has), tuple(b.init))
        if key != b.hyper_key:
            rows = [groups[gi] for gi in b.group_of]
            b.hyper = ops.sgd_hyper(
                len(rows),
                momentum=[r["momentum"] for r in rows],
                dampening=[r["dampening"] for r in rows],
                nesterov=[r["nesterov"] for r in rows],
                weight_decay=[r["weight_decay"] if h else 0.0 for r, h in zip(rows, has)],
                init_momentum=b.init,
            )
            b.hyper_key = key
            b.plan = ops.sgd_plan(b.params, b.state_a, b.hyper, b.masks)
        lrs = self._lrs(b, has)
        gs, fi = self._amp(b.device)
        ops.sgd_step_packed(b.params, grads, b.state_a, lrs, b.hyper, b.masks, gs, fi, b.backend, b.plan)
        if any(b.init):
            for i, gi in enumerate(b.group_of):
                g = groups[gi]
                if b.init[i] and has[i] and (g["lr"] != 0 or g["weight_decay"] != 0):
                    b.init[i] = False


class LayerwiseAdamW(_LayerwiseOptimizer):
    """``torch.optim.AdamW`` (decoupled weight decay, amsgrad=False) where all groups step
    in one fused op per (device, dtype), with optional pruning masks.

    Differences from torch: ``amsgrad``, ``maximize``, ``differentiable`` are not supported;
    ``foreach`` / ``fused`` / ``capturable`` are accepted and ignored; a param whose group
    has lr == 0 and weight_decay == 0 is not touched (its step count does not advance);
    state (exp_avg, exp_avg_sq) is float32 for every param dtype; ``state[p]["step"]`` is a
    float32 scalar tensor on the param's device (a view into one per-bucket tensor).
    """

    _op_name = "layerwise_adamw_step_"
    _unsupported_flags = ("amsgrad", "maximize", "differentiable")
    _fp32_state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, foreach: bool | None = None, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None, backend: str | None = None):
        if not math.isfinite(float(lr)) or float(lr) < 0.0:
            raise ValueError(f"lr: must be finite and >= 0, got {lr}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"betas: each must be in [0, 1), got {betas}")
        if eps < 0.0 or weight_decay < 0.0:
            raise ValueError(f"eps and weight_decay: must be >= 0, got {eps}, {weight_decay}")
        if amsgrad or maximize or differentiable:
            raise NotImplementedError("LayerwiseAdamW: amsgrad, maximize and differentiable are not supported")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=False,
                        maximize=False, foreach=None, capturable=False, differentiable=False, fused=None)
        super().__init__(params, defaults, backend)

    def _init_bucket_state(self, b: _Bucket) -> None:
        steps = []
        for p in b.params:
            st = self.state[p]
            if "exp_avg" not in st:
                st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
                st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            steps.append(float(st["step"]) if "step" in st else 0.0)
            b.state_a.append(st["exp_avg"])
            b.state_b.append(st["exp_avg_sq"])
        b.steps = torch.tensor(steps, dtype=torch.float32).to(b.device)
        for i, p in enumerate(b.params):
            self.state[p]["step"] = b.steps[i]

    def _step_bucket(self, b: _Bucket) -> None:
        grads, has = self._grads(b)
        groups = self.param_groups
        key = (tuple((g["betas"][0], g["betas"][1], g["eps"], g["weight_decay"]) for g in groups), tuple(has))
        if key != b.hyper_key:
            rows = [groups[gi] for gi in b.group_of]
            b.hyper = ops.adamw_hyper(
                len(rows),
                beta1=[r["betas"][0] for r in rows],
                beta2=[r["betas"][1] for r in rows],
                eps=[r["eps"] for r in rows],
                weight_decay=[r["weight_decay"] if h else 0.0 for r, h in zip(rows, has)],
            )
            b.hyper_key = key
            b.plan = ops.adamw_plan(b.params, b.state_a, b.state_b, b.hyper, b.masks)
        lrs = self._lrs(b, has)
        gs, fi = self._amp(b.device)
        ops.adamw_step_packed(b.params, grads, b.state_a, b.state_b, lrs, b.steps, b.hyper, b.masks, gs, fi, b.backend, b.plan)
