"""Custom-op registration from the reference's signature.

Every public op runs as a ``torch.library.custom_op`` whose arguments are those
of its plain implementation in :mod:`pyfici.ops.reference` followed by the
chosen backend (and, for a few ops, internal extras). The argument list is
written once, in the reference; :func:`op_like` reads it from there, so the
op's schema and the reference cannot drift apart.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch

_BACKEND = inspect.Parameter("backend", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str)


def extra_arg(name: str, annotation, default=inspect.Parameter.empty) -> inspect.Parameter:
    """An argument the op takes after ``backend`` (an internal option with a default)."""
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation, default=default)


def op_like(
    name: str,
    reference_fn: Callable,
    impl: Callable,
    *,
    mutates_args: Sequence[str] = (),
    extra: Sequence[inspect.Parameter] = (),
):
    """Register ``impl`` as the custom op ``pyfici::name``: its arguments are
    ``reference_fn``'s (positional, without their defaults), then ``backend: str``,
    then ``extra``. ``impl`` is called with them positionally. Returns the op
    (a ``torch.library.CustomOpDef``; add its fake with ``register_fake``)."""
    sig = inspect.signature(reference_fn, eval_str=True)
    params = [p.replace(default=inspect.Parameter.empty, kind=inspect.Parameter.POSITIONAL_OR_KEYWORD)
              for p in sig.parameters.values()]

    def op(*args):
        return impl(*args)

    op.__signature__ = sig.replace(parameters=[*params, _BACKEND, *extra])
    op.__name__ = op.__qualname__ = f"{name}_op"
    op.__doc__ = f"The registered op pyfici::{name} (arguments as pyfici.ops.reference.{reference_fn.__name__}, then backend)."
    return torch.library.custom_op(f"pyfici::{name}", op, mutates_args=tuple(mutates_args))


def no_output(*args) -> None:
    """Fake (meta) implementation of an op that only mutates its inputs."""
    return None
