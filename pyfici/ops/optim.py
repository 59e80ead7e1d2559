"""Family 2: fused layer-wise optimizer steps with pruning masks, and weight variation.

``layerwise_sgd_step_`` / ``layerwise_adamw_step_`` update many tensors in one
pass over memory: each tensor has its own learning rate (``lrs``, a tensor on
the params' device, so changing it needs no recompile, host sync or graph
recapture) and optionally its own momentum / weight decay / betas / maximize /
amsgrad, an optional pruning mask (Apex ASP semantics: the gradient is zeroed
where the mask is 0, the usual step is taken, the param is zeroed there, so a
pruned weight stays exactly zero), and AMP ``grad_scale`` / ``found_inf`` handled inside the
kernel without a host sync. A tensor whose lr is 0 and whose weight decay is 0
is frozen: its memory is not touched at all (nor its optimizer state).

``weight_variation(params, snapshots)`` gives each tensor's sum of squared
differences in one fused pass (what AutoLR measures every epoch).

float32 / float16 / bfloat16 params step in float32 math with float32 state;
float64 params in float64 math with float64 state. Any dense layout works
(param, grad and state sharing strides are one flat buffer to the kernels).

Backends: ``cpu`` (C++/OpenMP over chunks of all tensors, csrc/cpu/optim.cpp),
``cuda`` (multi-tensor apply with a device chunk table, kernels/cuda/optim.cu),
``triton`` (one launch per tensor, kernels/optim.py) and ``torch``
(pyfici.ops.reference). See docs/ops_optim.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch

from pyfici import _native
from pyfici.ops import reference
from pyfici.ops._backend import choose_backend
from pyfici.ops._register import no_output, op_like

PARAM_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
MASK_DTYPES = (torch.bool, torch.uint8)
SGD_HYPER_COLS = 6
ADAMW_HYPER_COLS = 6

# ---------------------------------------------------------------------------
# helpers shared by the ops and pyfici.optim
# ---------------------------------------------------------------------------


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """dtype of the optimizer state (and of the step math) for params of ``param_dtype``:
    float64 for float64 params, float32 for float32 / float16 / bfloat16."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def is_dense(t: torch.Tensor) -> bool:
    """True when ``t``'s elements fill ``numel`` consecutive slots from ``data_ptr()``
    without overlap (any permutation of a contiguous layout: channels_last, a transpose...).
    Such a tensor is one flat buffer to the kernels."""
    if t.is_contiguous() or t.numel() <= 1:
        return True
    expect = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expect:
            return False
        expect *= size
    return True


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same strides wherever a dimension has more than one element, so
    element k of one flat buffer is element k of the other."""
    if a.shape != b.shape:
        return False
    if a.stride() == b.stride():
        return True
    return all(sa == sb for sz, sa, sb in zip(a.shape, a.stride(), b.stride()) if sz > 1)


def in_layout_of(t: torch.Tensor, p: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` (cast to ``dtype``) with ``p``'s memory layout: ``t`` itself when it already
    has it, else a copy (``p`` must be dense)."""
    dtype = t.dtype if dtype is None else dtype
    if t.dtype == dtype and same_layout(t, p):
        return t
    out = torch.empty_like(p, dtype=dtype)  # empty_like keeps a dense tensor's strides
    out.copy_(t)
    return out


def _per_tensor(name: str, value, n: int, *, finite: bool = True) -> list[float]:
    """A float or a length-n sequence / 1-d tensor -> list of n floats."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = float(value)
        else:
            value = value.detach().cpu().tolist()
    if isinstance(value, (bool, int, float, np.floating, np.integer)):
        vals = [float(value)] * n
    elif isinstance(value, Sequence):
        if len(value) != n:
            raise ValueError(f"{name}: expected a float or a sequence of {n} values (one per tensor), got {len(value)}")
        vals = [float(v) for v in value]
    else:
        raise TypeError(f"{name}: expected a float or a sequence of floats, got {type(value).__name__}")
    if finite:
        for i, v in enumerate(vals):
            if not math.isfinite(v):
                raise ValueError(f"{name}: must be finite, got {v} (tensor {i})")
    return vals


def _columns(n: int, **values) -> dict[str, list[float]]:
    """Each keyword argument (a scalar or n values) -> its n floats, in argument order."""
    return {name: _per_tensor(name, v, n) for name, v in values.items()}


def _check_at_least(cols: dict[str, list[float]], low: float, *names: str) -> None:
    for name in names:
        for i, v in enumerate(cols[name]):
            if v < low:
                raise ValueError(f"{name}: must be >= {low:g}, got {v} (tensor {i})")


def _table(cols: dict[str, list[float]], flags: tuple[str, ...]) -> torch.Tensor:
    """The columns as one float64 [n, len(cols)] table (CPU); ``flags`` become 0 / 1."""
    data = [[float(v != 0) for v in vals] if name in flags else vals for name, vals in cols.items()]
    n = len(next(iter(cols.values())))
    return torch.tensor(data, dtype=torch.float64).reshape(len(cols), n).T.contiguous()


def sgd_hyper(n: int, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, init_momentum=False,
              maximize=False) -> torch.Tensor:
    """Per-tensor SGD table float64 [n, 6] (CPU): weight_decay, momentum, dampening,
    nesterov, init_momentum, maximize (flags as 0 / 1).

    Each argument is a scalar or a length-n sequence. ``init_momentum`` marks
    tensors whose momentum buffer does not exist yet (torch's first step: the
    buffer becomes the gradient, without dampening).
    """
    c = _columns(n, weight_decay=weight_decay, momentum=momentum, dampening=dampening, nesterov=nesterov,
                 init_momentum=init_momentum, maximize=maximize)
    _check_at_least(c, 0.0, "momentum", "weight_decay")
    for i, (m, d, ne) in enumerate(zip(c["momentum"], c["dampening"], c["nesterov"])):
        if ne != 0 and (m <= 0 or d != 0):
            raise ValueError(f"nesterov: needs momentum > 0 and dampening == 0 (tensor {i}: momentum {m}, dampening {d})")
    return _table(c, ("nesterov", "init_momentum", "maximize"))


def adamw_hyper(n: int, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, amsgrad=False,
                maximize=False) -> torch.Tensor:
    """Per-tensor AdamW table float64 [n, 6] (CPU): beta1, beta2, eps, weight_decay,
    amsgrad, maximize (flags as 0 / 1)."""
    c = _columns(n, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                 maximize=maximize)
    for name in ("beta1", "beta2"):
        for i, v in enumerate(c[name]):
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name}: must be in [0, 1), got {v} (tensor {i})")
    _check_at_least(c, 0.0, "eps", "weight_decay")
    return _table(c, ("amsgrad", "maximize"))


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None or t.numel() == 0 else t.data_ptr()


def _meta(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), -1)


def chunk_table(numel: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunks of ``chunk`` elements over tensors with ``numel`` elements, in tensor
    order: (tensor index [nchunks], first element [nchunks]), int64. Empty tensors
    have no chunk."""
    numel = np.asarray(numel, dtype=np.int64)
    per = (numel + chunk - 1) // chunk
    nchunks = int(per.sum())
    tidx = np.repeat(np.arange(len(numel), dtype=np.int64), per)
    first = np.repeat(np.cumsum(per) - per, per)
    start = (np.arange(nchunks, dtype=np.int64) - first) * chunk
    return tidx, start


def _ptrs(ts) -> np.ndarray:
    return np.fromiter(map(torch.Tensor.data_ptr, ts), dtype=np.int64, count=len(ts))


class StepPlan:
    """What stays the same between the steps of a packed optimizer: the element
    counts, the state and mask pointer rows (pyfici.optim re-plans whenever it
    creates state or re-packs), the chunk table and the device copy of the hyper
    table. Param and grad pointers are read at every step."""

    def __init__(self, params, state_rows: list[list[int]], masks, hyper: torch.Tensor):
        self.numel = np.fromiter(map(torch.Tensor.numel, params), dtype=np.int64, count=len(params))
        self.state_rows = [np.asarray(r, dtype=np.int64).reshape(len(params)) for r in state_rows]
        self.mask_row = np.asarray([0 if m is None else m.data_ptr() for m in masks], dtype=np.int64).reshape(len(params))
        self.hyper = hyper if hyper.device.type == "cpu" else hyper.cpu()
        self._chunks: tuple[np.ndarray, np.ndarray] | None = None
        self._hyper_dev: dict = {}

    def meta(self, params, grads) -> torch.Tensor:
        """int64 [R, n]: numel, param, grad, state rows..., mask."""
        return torch.from_numpy(np.stack([self.numel, _ptrs(params), _ptrs(grads), *self.state_rows, self.mask_row]))

    def chunks(self) -> tuple[np.ndarray, np.ndarray]:
        if self._chunks is None:
            self._chunks = chunk_table(self.numel, _native.cuda_module().optim_chunk_size())
        return self._chunks

    def hyper_on(self, dev: torch.device) -> torch.Tensor:
        h = self._hyper_dev.get(dev)
        if h is None:
            h = self._hyper_dev[dev] = self.hyper.to(dev, non_blocking=True)
        return h


def sgd_plan(params, momentum_buffers, hyper, masks) -> StepPlan:
    mom = hyper[:, 1].tolist()
    return StepPlan(params, [[b.data_ptr() if m != 0 else 0 for b, m in zip(momentum_buffers, mom)]], masks, hyper)


def adamw_plan(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, hyper, masks) -> StepPlan:
    ams = hyper[:, 4].tolist()
    return StepPlan(params, [list(_ptrs(exp_avgs)), list(_ptrs(exp_avg_sqs)),
                             [_ptr(v) if a != 0 else 0 for v, a in zip(max_exp_avg_sqs, ams)]], masks, hyper)


def _cuda_tables(meta: torch.Tensor, device: torch.device, chunks: tuple[np.ndarray, np.ndarray]) -> tuple[torch.Tensor, int]:
    """meta [R, n] + chunk table (tensor index, start) in ONE host->device copy.
    Returns (device int64 tensor [R*n + 2*nchunks], nchunks)."""
    tidx, start = chunks
    host = torch.cat([meta.reshape(-1), torch.from_numpy(tidx), torch.from_numpy(start)])
    # pageable source: the copy is staged by the driver, no device synchronisation
    return host.to(device, non_blocking=True), len(tidx)


def _scalar_ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------


def _optional_state_list(name: str, x, unused: list[bool], dev: torch.device, when: str) -> list:
    """A state list that may be None when no tensor uses it (``unused[i]`` all True): then
    empty placeholders; otherwise a list of ``len(unused)`` tensors."""
    n = len(unused)
    if x is None:
        if not all(unused):
            raise ValueError(f"{name}: required (n tensors) {when}")
        x = [torch.empty(0, device=dev)] * n
    return _as_list(name, x, n)


def _as_list(name: str, x, n: int | None = None, *, optional_items: bool = False) -> list:
    if isinstance(x, torch.Tensor) or not isinstance(x, Sequence):
        raise TypeError(f"{name}: expected a list of tensors, got {type(x).__name__}")
    x = list(x)
    if n is not None and len(x) != n:
        raise ValueError(f"{name}: expected {n} tensors (one per param), got {len(x)}")
    for i, t in enumerate(x):
        if t is None and optional_items:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}]: expected a torch.Tensor, got {type(t).__name__}")
    return x


def _check_params(params: list[torch.Tensor]) -> tuple[torch.device, torch.dtype]:
    if not params:
        return torch.device("cpu"), torch.float32
    dev, dt = params[0].device, params[0].dtype
    for i, p in enumerate(params):
        if p.dtype not in PARAM_DTYPES:
            raise TypeError(f"params[{i}]: expected dtype in {[str(d) for d in PARAM_DTYPES]}, got {p.dtype}")
        if p.dtype != dt:
            raise TypeError(f"params[{i}]: all params must have one dtype ({dt}), got {p.dtype}; call once per dtype")
        if p.device != dev:
            raise ValueError(f"params[{i}]: all params must be on one device ({dev}), got {p.device}")
        if not is_dense(p):
            raise ValueError(f"params[{i}]: must be dense and non-overlapping (any dimension order, no gaps), "
                             f"got shape {tuple(p.shape)} stride {p.stride()}")
    return dev, dt


def _check_like(name: str, ts: list, params: list[torch.Tensor], dtypes, *, inplace: bool, skip=None) -> list:
    out = []
    for i, (t, p) in enumerate(zip(ts, params)):
        if t is None or (skip is not None and skip[i]):
            out.append(t)
            continue
        if t.shape != p.shape:
            raise ValueError(f"{name}[{i}]: expected shape {tuple(p.shape)} (the param's), got {tuple(t.shape)}")
        if t.device != p.device:
            raise ValueError(f"{name}[{i}]: expected device {p.device} (the param's), got {t.device}")
        want = [p.dtype] if dtypes is None else dtypes
        if t.dtype not in want:
            raise TypeError(f"{name}[{i}]: expected dtype in {[str(d) for d in want]}, got {t.dtype}")
        if not same_layout(t, p):
            if inplace:
                raise ValueError(f"{name}[{i}]: must have its param's memory layout (it is updated in place): "
                                 f"param stride {p.stride()}, got {t.stride()}")
            t = in_layout_of(t, p)
        out.append(t)
    return out


def _check_lrs(lrs, n: int, dev: torch.device) -> torch.Tensor:
    if not isinstance(lrs, torch.Tensor):
        lrs = torch.tensor(_per_tensor("lrs", lrs, n), dtype=torch.float64)
    if lrs.dim() != 1 or lrs.shape[0] != n:
        raise ValueError(f"lrs: expected a 1-d tensor of {n} learning rates (one per param), got shape {tuple(lrs.shape)}")
    if not lrs.is_floating_point():
        raise TypeError(f"lrs: expected a floating point tensor, got {lrs.dtype}")
    if lrs.device.type == "cpu" and n and not bool(torch.isfinite(lrs).all()):
        # checked only where it costs no device sync (GPU lrs are trusted)
        bad = torch.nonzero(~torch.isfinite(lrs)).flatten().tolist()
        raise ValueError(f"lrs: must be finite, got non-finite values at tensors {bad[:10]}")
    if lrs.device != dev:
        if lrs.device.type != "cpu":
            raise ValueError(f"lrs: expected device {dev} (the params') or cpu, got {lrs.device}")
        lrs = lrs.to(torch.float64).to(dev, non_blocking=True)
    return lrs.to(torch.float64).contiguous()


def _check_scalar(name: str, t: torch.Tensor | None, dev: torch.device) -> torch.Tensor | None:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a float32 tensor with one element, got {type(t).__name__}")
    if t.numel() != 1 or t.dtype != torch.float32:
        raise ValueError(f"{name}: expected a float32 tensor with one element, got {t.dtype} shape {tuple(t.shape)}")
    if t.device != dev:
        raise ValueError(f"{name}: expected device {dev} (the params'), got {t.device}")
    return t.reshape(())


# ---------------------------------------------------------------------------
# layerwise_sgd_step_
# ---------------------------------------------------------------------------


def _triton():
    from pyfici.kernels import optim as tk

    return tk


class _StepKind(NamedTuple):
    """What differs between the fused optimizer steps: the op's name (also the native
    and Triton entry), its plain reference, how many of its arguments are per-tensor
    lists / vectors, and how a StepPlan is made from them."""

    name: str
    reference: Callable
    n_lists: int  # params, grads, then the state lists
    n_vectors: int  # per-tensor device vectors handed to the kernels: lrs (, steps)
    plan: Callable  # (lists, hyper, masks) -> StepPlan


def _step(kind: _StepKind, *args) -> None:
    """Run one fused step. ``args``: the op's arguments (lists..., vectors..., hyper,
    masks, grad_scale, found_inf), then the backend, then optionally a StepPlan."""
    nargs = kind.n_lists + kind.n_vectors + 4
    op_args, backend = args[:nargs], args[nargs]
    plan = args[nargs + 1] if len(args) > nargs + 1 else None
    lists = op_args[:kind.n_lists]
    vectors = op_args[kind.n_lists:kind.n_lists + kind.n_vectors]
    hyper, masks, grad_scale, found_inf = op_args[-4:]
    params = lists[0]
    n = len(params)
    if n == 0:
        return
    if backend == "torch":
        return kind.reference(*lists, *vectors, hyper.cpu(), masks, grad_scale, found_inf)
    if backend == "triton":
        return getattr(_triton(), kind.name)(*op_args)
    if plan is None:
        plan = kind.plan(lists, hyper, masks)
    meta = plan.meta(params, lists[1])
    code = _native.DTYPE_CODES[params[0].dtype]
    vec_ptrs = [v.data_ptr() for v in vectors]
    flags = (_scalar_ptr(grad_scale), _scalar_ptr(found_inf))
    if backend == "cpu":
        entry = getattr(_native.cpu_module(), kind.name.rstrip("_"))
        entry(n, meta.data_ptr(), *vec_ptrs, plan.hyper.data_ptr(), code, *flags, _native.num_threads())
        return
    dev = params[0].device
    with torch.cuda.device(dev):
        tables, nchunks = _cuda_tables(meta, dev, plan.chunks())
        entry = getattr(_native.cuda_module(), kind.name.rstrip("_"))
        entry(n, nchunks, tables.data_ptr(), *vec_ptrs, plan.hyper_on(dev).data_ptr(), code, *flags,
              _native.stream_ptr(dev))


def _bump_versions(tensors: list[torch.Tensor]) -> None:
    try:  # one call for the whole list (torch >= 2.5)
        torch.autograd.graph.increment_version(tensors)
    except TypeError:  # pragma: no cover - older torch takes one tensor at a time
        for t in tensors:
            torch.autograd.graph.increment_version(t)


def _packed(op, impl, args, backend, plan, written: list[torch.Tensor]) -> None:
    """The registered op under torch.compile; in eager mode the implementation directly
    plus ONE version-counter bump for everything written (the custom-op wrapper bumps
    tensor by tensor)."""
    if torch.compiler.is_compiling():
        return op(*args, backend)
    impl(*args, backend, plan)
    _bump_versions(written)


_SGD = _StepKind("layerwise_sgd_step_", reference.layerwise_sgd_step_, 3, 1,
                 lambda lists, hyper, masks: sgd_plan(lists[0], lists[2], hyper, masks))


def _sgd_impl(*args) -> None:
    """The SGD op's arguments, the backend, optionally a StepPlan."""
    _step(_SGD, *args)


_sgd_op = op_like(_SGD.name, _SGD.reference, lambda *args: _sgd_impl(*args),
                  mutates_args=("params", "momentum_buffers"))
_sgd_op.register_fake(no_output)


def sgd_step_packed(params, grads, momentum_buffers, lrs, hyper, masks, grad_scale, found_inf, backend,
                    plan: StepPlan | None = None) -> None:
    """Entry for pyfici.optim (inputs already validated); see :func:`_packed`."""
    args = (params, grads, momentum_buffers, lrs, hyper, masks, grad_scale, found_inf)
    _packed(_sgd_op, _sgd_impl, args, backend, plan, params + momentum_buffers)


class _StepInputs(NamedTuple):
    n: int
    device: torch.device
    dtype: torch.dtype
    params: list
    grads: list
    masks: list
    lrs: torch.Tensor
    grad_scale: torch.Tensor | None
    found_inf: torch.Tensor | None


def _check_step_inputs(params, grads, masks, lrs, grad_scale, found_inf) -> _StepInputs:
    """Validate the arguments every fused step takes (see :func:`layerwise_sgd_step_`)."""
    params = _as_list("params", params)
    n = len(params)
    grads = _as_list("grads", grads, n)
    dev, dt = _check_params(params)
    grads = _check_like("grads", grads, params, None, inplace=False)
    masks = [None] * n if masks is None else _as_list("masks", masks, n, optional_items=True)
    masks = _check_like("masks", masks, params, list(MASK_DTYPES), inplace=False)
    return _StepInputs(n, dev, dt, params, grads, masks, _check_lrs(lrs, n, dev),
                       _check_scalar("grad_scale", grad_scale, dev), _check_scalar("found_inf", found_inf, dev))


def _check_state(name: str, ts, params, dt: torch.dtype, skip=None) -> list:
    return _check_like(name, ts, params, [state_dtype(dt)], inplace=True, skip=skip)


def layerwise_sgd_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor] | None,
    lrs,
    *,
    momentum=0.0,
    dampening=0.0,
    nesterov=False,
    weight_decay=0.0,
    maximize=False,
    masks: Sequence[torch.Tensor | None] | None = None,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    init_momentum=False,
    backend: str | None = None,
) -> None:
    """One SGD step (torch.optim.SGD semantics) over n tensors, in place, in one pass.

    params: n dense tensors of one dtype (float32, float64, float16 or bfloat16) on one
        device; any non-overlapping layout without gaps (contiguous, channels_last, a
        transpose) is one flat buffer to the kernels.
    grads: n tensors, each the shape and dtype of its param (read only, never modified);
        one with another memory layout than its param is copied into the param's.
    momentum_buffers: n tensors of the params' shapes and memory layouts, float64 for
        float64 params, float32 otherwise (updated in place); an entry is ignored where
        that tensor's momentum is 0, and the list may be None when every momentum is 0.
    lrs: float tensor [n] (on the params' device; a CPU tensor or a sequence is copied
        there without a host sync), one learning rate per tensor; used as float64.
    momentum, dampening, weight_decay: float or n floats; nesterov, maximize: bool or n bools.
    masks: None, or n entries each None or a bool/uint8 tensor of the param's shape:
        the gradient is zeroed where the mask is 0 before the step and the param after it
        (Apex ASP; a pruned weight stays exactly 0 whatever its gradient).
    grad_scale, found_inf: float32 one-element tensors on the params' device (as from
        torch.amp.GradScaler): grads are multiplied by 1 / grad_scale, and nothing is
        updated when found_inf != 0; no host synchronisation.
    init_momentum: bool or n bools: the buffer does not exist yet (torch's first step:
        buf = g instead of momentum * buf + (1 - dampening) * g).

    Math is float64 for float64 params, float32 otherwise. A tensor with lr == 0 and
    weight_decay == 0 is not touched (nor its buffer).
    """
    c = _check_step_inputs(params, grads, masks, lrs, grad_scale, found_inf)
    hyper = sgd_hyper(c.n, momentum, dampening, nesterov, weight_decay, init_momentum, maximize)
    no_mom = [m == 0 for m in hyper[:, 1].tolist()]
    momentum_buffers = _optional_state_list("momentum_buffers", momentum_buffers, no_mom, c.device,
                                            "when momentum != 0")
    momentum_buffers = _check_state("momentum_buffers", momentum_buffers, c.params, c.dtype, skip=no_mom)
    be = choose_backend("layerwise_sgd_step_", c.device, backend, cuda_default="cuda")
    _sgd_op(c.params, c.grads, momentum_buffers, c.lrs, hyper, c.masks, c.grad_scale, c.found_inf, be)


# ---------------------------------------------------------------------------
# layerwise_adamw_step_
# ---------------------------------------------------------------------------


_ADAMW = _StepKind("layerwise_adamw_step_", reference.layerwise_adamw_step_, 5, 2,
                   lambda lists, hyper, masks: adamw_plan(lists[0], *lists[2:], hyper, masks))


def _adamw_impl(*args) -> None:
    """The AdamW op's arguments, the backend, optionally a StepPlan."""
    _step(_ADAMW, *args)


_adamw_op = op_like(_ADAMW.name, _ADAMW.reference, lambda *args: _adamw_impl(*args),
                    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"))
_adamw_op.register_fake(no_output)


def adamw_step_packed(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lrs, steps, hyper, masks, grad_scale,
                      found_inf, backend, plan: StepPlan | None = None) -> None:
    """Entry for pyfici.optim; see :func:`sgd_step_packed`."""
    args = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lrs, steps, hyper, masks, grad_scale, found_inf)
    written = params + exp_avgs + exp_avg_sqs + [t for t in max_exp_avg_sqs if t.numel()] + [steps]
    _packed(_adamw_op, _adamw_impl, args, backend, plan, written)


def layerwise_adamw_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    lrs,
    steps: torch.Tensor,
    *,
    beta1=0.9,
    beta2=0.999,
    eps=1e-8,
    weight_decay=1e-2,
    amsgrad=False,
    max_exp_avg_sqs: Sequence[torch.Tensor] | None = None,
    maximize=False,
    masks: Sequence[torch.Tensor | None] | None = None,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    backend: str | None = None,
) -> None:
    """One AdamW step (torch.optim.AdamW semantics) over n tensors, in place.

    params / grads / masks / lrs / maximize / grad_scale / found_inf: as in
    :func:`layerwise_sgd_step_`.
    exp_avgs, exp_avg_sqs: n tensors of the params' shapes and layouts (float64 for
        float64 params, float32 otherwise), updated in place.
    steps: float32 tensor [n] on the params' device, each tensor's step count so far; it is
        incremented for every tensor that is stepped (bias corrections use the new count).
    beta1, beta2, eps, weight_decay: float or n floats (decoupled weight decay).
    amsgrad: bool or n bools; max_exp_avg_sqs: n state tensors like exp_avg_sqs (the running
        maximum of exp_avg_sq, updated in place), required when any amsgrad is on; an entry
        is ignored where amsgrad is off.
    A tensor with lr == 0 and weight_decay == 0 is not touched (nor its state or step).
    """
    c = _check_step_inputs(params, grads, masks, lrs, grad_scale, found_inf)
    n, dev, dt = c.n, c.device, c.dtype
    hyper = adamw_hyper(n, beta1, beta2, eps, weight_decay, amsgrad, maximize)
    no_ams = [a == 0 for a in hyper[:, 4].tolist()]
    max_exp_avg_sqs = _optional_state_list("max_exp_avg_sqs", max_exp_avg_sqs, no_ams, dev,
                                           "when amsgrad is on")
    exp_avgs = _check_state("exp_avgs", _as_list("exp_avgs", exp_avgs, n), c.params, dt)
    exp_avg_sqs = _check_state("exp_avg_sqs", _as_list("exp_avg_sqs", exp_avg_sqs, n), c.params, dt)
    max_exp_avg_sqs = _check_state("max_exp_avg_sqs", max_exp_avg_sqs, c.params, dt, skip=no_ams)
    if not isinstance(steps, torch.Tensor) or steps.dim() != 1 or steps.shape[0] != n or steps.dtype != torch.float32:
        got = f"{steps.dtype} shape {tuple(steps.shape)}" if isinstance(steps, torch.Tensor) else type(steps).__name__
        raise ValueError(f"steps: expected a float32 tensor [{n}] (one step count per param), got {got}")
    if steps.device != dev or not steps.is_contiguous():
        raise ValueError(f"steps: expected a contiguous tensor on {dev} (the params' device), got {steps.device}")
    be = choose_backend("layerwise_adamw_step_", dev, backend, cuda_default="cuda")
    _adamw_op(c.params, c.grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, c.lrs, steps, hyper, c.masks, c.grad_scale,
              c.found_inf, be)


# ---------------------------------------------------------------------------
# weight_variation
# ---------------------------------------------------------------------------


@torch.library.custom_op("pyfici::weight_variation", mutates_args=())
def _weight_variation_op(params: list[torch.Tensor], snapshots: list[torch.Tensor], backend: str) -> torch.Tensor:
    if backend == "torch":
        return reference.weight_variation(params, snapshots)
    if backend == "triton":
        return _triton().weight_variation(params, snapshots)
    n = len(params)
    dev = params[0].device
    out_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    out = torch.zeros(n, dtype=torch.float64, device=dev)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        by_dtype.setdefault(p.dtype, []).append(i)
    for dt, idx in by_dtype.items():
        meta = _meta([
            [params[i].numel() for i in idx],
            [_ptr(params[i]) for i in idx],
            [_ptr(snapshots[i]) for i in idx],
        ])
        part = out if len(idx) == n else torch.zeros(len(idx), dtype=torch.float64, device=dev)
        if backend == "cpu":
            _native.cpu_module().weight_variation(len(idx), meta.data_ptr(), _native.DTYPE_CODES[dt], part.data_ptr(), _native.num_threads())
        else:
            with torch.cuda.device(dev):
                tables, nchunks = _cuda_tables(meta, dev, chunk_table(meta[0].numpy(), _native.cuda_module().optim_chunk_size()))
                scratch = torch.empty(nchunks, dtype=torch.float64, device=dev)
                _native.cuda_module().weight_variation(
                    len(idx), nchunks, tables.data_ptr(), _native.DTYPE_CODES[dt], scratch.data_ptr(),
                    part.data_ptr(), _native.stream_ptr(dev))
        if part is not out:
            out[torch.tensor(idx, device=dev)] = part
    return out.to(out_dtype)


@_weight_variation_op.register_fake
def _(params, snapshots, backend):
    out_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    return params[0].new_empty(len(params), dtype=out_dtype)


def weight_variation(params: Sequence[torch.Tensor], snapshots: Sequence[torch.Tensor], *, backend: str | None = None) -> torch.Tensor:
    """Per-tensor sum of squared differences ``sum((p - s)**2)`` -> Tensor [len(params)].

    params, snapshots: equal-length lists; each snapshot has its param's shape and dtype
    (any floating dtype) and device, in any memory layout (one that differs from its
    param's is copied into the param's; a param that is not dense is copied). Output float64 if any param is float64, else float32,
    on the params' device; accumulated in float64 (cpu, cuda) or float32 (triton).
    Deterministic. An empty list gives an empty float32 CPU tensor.
    """
    params = [p.detach() for p in _as_list("params", params)]
    n = len(params)
    snapshots = [s.detach() for s in _as_list("snapshots", snapshots, n)]
    if n == 0:
        return torch.zeros(0, dtype=torch.float32)
    dev = params[0].device
    for i, p in enumerate(params):
        if not p.is_floating_point():
            raise TypeError(f"params[{i}]: expected a floating point tensor, got {p.dtype}")
        if p.device != dev:
            raise ValueError(f"params[{i}]: all params must be on one device ({dev}), got {p.device}")
    params = [p if is_dense(p) else p.contiguous() for p in params]
    snapshots = _check_like("snapshots", snapshots, params, None, inplace=False)
    be = choose_backend("weight_variation", dev, backend, cuda_default="cuda")
    return _weight_variation_op(params, snapshots, be)
