"""Validation at the op boundary: one place, messages that name the argument
and say what was expected and what was received."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def as_tensor(name: str, x, *, dtype: torch.dtype | None = None, device: torch.device | None = None) -> torch.Tensor:
    """Accept a tensor, numpy array or sequence; return a tensor (no copy when possible)."""
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, (np.ndarray, Sequence)) and not isinstance(x, (str, bytes)):
        try:
            t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as e:
            kind = getattr(x, "dtype", None)
            what = f"a numpy array of dtype {kind}" if kind is not None else "this sequence"
            raise TypeError(f"{name}: cannot make a tensor of {what} (numbers of one shape are needed; "
                            f"{' '.join(str(e).split())}); strings or other objects must be mapped to "
                            "integers first") from None
    else:
        raise TypeError(f"{name}: expected a torch.Tensor, numpy array or sequence, got {type(x).__name__}")
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if device is not None and t.device != device:
        t = t.to(device)
    return t


def check_ndim(name: str, t: torch.Tensor, ndim: int, what: str = "") -> None:
    if t.dim() != ndim:
        shape = "[" + ", ".join(what.split(",")) + "]" if what else f"{ndim}-d"
        raise ValueError(f"{name}: expected a {ndim}-d tensor {shape}, got shape {tuple(t.shape)}")


def check_float(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> None:
    if t.dtype not in allowed:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in allowed]}, got {t.dtype}")


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise if t holds NaN or Inf. (One reduction; on CUDA this synchronises once.)"""
    check_not_meta(name, t)
    if not t.numel():
        return
    # a sum is finite iff every term is, unless finite terms overflow: then check exactly
    if t.is_floating_point() and bool(torch.isfinite(t.sum())):
        return
    if not bool(torch.isfinite(t).all()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise ValueError(f"{name}: contains non-finite values ({n_nan} NaN, {n_inf} Inf)")


def check_nonempty(name: str, t: torch.Tensor, dim: int = 0) -> None:
    if t.shape[dim] == 0:
        raise ValueError(f"{name}: is empty (shape {tuple(t.shape)})")


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {k: v.device for k, v in tensors.items() if v is not None}
    first = next(iter(devices.values()))
    for k, d in devices.items():
        if d != first:
            names = ", ".join(f"{n} on {dv}" for n, dv in devices.items())
            raise ValueError(f"{k}: all tensors must be on one device ({names})")
    return first


def check_feature_pair(
    xname: str, x, yname: str, y, x_shape: str = "Q,D", y_shape: str = "G,D"
) -> tuple[torch.Tensor, torch.Tensor, torch.device]:
    """Two feature matrices [*, D] of float dtype sharing D and a device -> (x, y, device)."""
    x = as_tensor(xname, x)
    y = as_tensor(yname, y)
    check_ndim(xname, x, 2, x_shape)
    check_ndim(yname, y, 2, y_shape)
    check_float(xname, x)
    check_float(yname, y)
    if x.shape[1] != y.shape[1]:
        owner = f"{xname}'" if xname.endswith("s") else f"{xname}'s"
        raise ValueError(f"{yname}: feature dimension {y.shape[1]} differs from {owner} {x.shape[1]}")
    return x, y, check_same_device(**{xname: x, yname: y})


def check_length(name: str, t: torch.Tensor, n: int, other: str) -> None:
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name}: expected a 1-d array of length {n} (one per row of {other}), got shape {tuple(t.shape)}")


def check_int_range(name: str, value: int, lo: int, hi: int | None = None, hint: str = "") -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name}: must be {rng}, got {value}{(' ' + hint) if hint else ''}")


def check_not_meta(name: str, t: torch.Tensor) -> None:
    """Raise for a meta tensor: it has a shape but no values to compute with."""
    if t.device.type == "meta":
        raise ValueError(f"{name}: is a meta tensor (it has a shape but no data); pass a cpu or cuda tensor")


def check_no_grad(name: str, t: torch.Tensor, op: str) -> None:
    """Raise if ``t`` would need a gradient: the op has no autograd formula, so
    the error belongs at the call, not at ``backward()``."""
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{name}: requires grad, but {op} is not differentiable; pass {name}.detach() "
            "(or call it under torch.no_grad())"
        )


def as_ids(name: str, x, *, device: torch.device | None = None) -> torch.Tensor:
    """Identity / camera / label array -> contiguous int64 tensor.

    Integer and bool arrays are taken as they are. Float arrays must hold
    integral values (``2.0`` is id 2); a fractional or non-finite value raises
    instead of being truncated (truncation would merge ids 1.0 and 1.5)."""
    t = as_tensor(name, x)
    check_not_meta(name, t)
    if t.is_complex():
        raise TypeError(f"{name}: expected integer ids, got dtype {t.dtype}")
    if t.is_floating_point():
        bad = ~torch.isfinite(t) | (t != torch.round(t))
        if t.numel() and bool(bad.any()):
            i = int(bad.flatten().nonzero()[0])
            v = float(t.flatten()[i])
            raise ValueError(
                f"{name}: ids must be integers, got the non-integral value {v!r} at index {i} "
                f"({int(bad.sum())} such values); convert them to integer ids explicitly"
            )
        if t.numel() and bool((t.abs() > 2.0**53).any()):
            raise ValueError(f"{name}: float ids above 2**53 cannot be told apart; pass integer ids")
    t = t.to(torch.int64)
    if device is not None and t.device != device:
        t = t.to(device)
    return t.contiguous()
