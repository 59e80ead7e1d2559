"""The training loop: epochs with hooks, and one supervised epoch with a progress bar.

A method subclasses :class:`Trainer` and implements ``run_epoch(epoch) ->
dict`` (the epoch's record); :meth:`Trainer.train` runs the epochs and calls
the hooks around them, so checkpointing, metrics files, plots and logging are
hooks a method picks rather than code it rewrites. :func:`train_epoch` is
the inner loop of supervised training (forward, loss, backward, step) with a
tqdm bar on stderr.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pyfici.progress import progress


class Hook:
    """Called by :meth:`Trainer.train`; override what you need."""

    def before_train(self, trainer: Trainer) -> None:
        pass

    def after_epoch(self, trainer: Trainer, epoch: int, record: dict) -> None:
        pass

    def after_train(self, trainer: Trainer) -> None:
        pass


class CallbackHook(Hook):
    """A hook from plain functions: ``CallbackHook(after_epoch=lambda t, e, rec: ...)``."""

    def __init__(self, before_train=None, after_epoch=None, after_train=None):
        self._b, self._e, self._a = before_train, after_epoch, after_train

    def before_train(self, trainer):
        if self._b:
            self._b(trainer)

    def after_epoch(self, trainer, epoch, record):
        if self._e:
            self._e(trainer, epoch, record)

    def after_train(self, trainer):
        if self._a:
            self._a(trainer)


class Trainer:
    """Units (epochs, or steps for a step-based method) ``start .. stop - 1`` of ``run_epoch``
    with hooks. ``history`` collects the records (a ``None`` record is not kept). With
    ``desc`` the units themselves get a progress bar, ``self.bar``."""

    def __init__(self, hooks: Sequence[Hook] = ()):
        self.hooks = list(hooks)
        self.history: list[dict] = []
        self.bar: Any = None

    def run_epoch(self, epoch: int) -> dict | None:
        raise TypeError(f"{type(self).__name__} must define run_epoch(epoch) -> dict")

    def train(self, start: int, stop: int, *, desc: str | None = None, quiet: bool = False,
              main: bool = True) -> list[dict]:
        for h in self.hooks:
            h.before_train(self)
        units: Iterable[int] = range(start, stop)
        if desc is not None:
            units = self.bar = progress(units, desc=desc, quiet=quiet, main=main, total=stop, initial=start)
        for epoch in units:
            record = self.run_epoch(epoch)
            if record is not None:
                self.history.append(record)
            for h in self.hooks:
                h.after_epoch(self, epoch, record)
        for h in self.hooks:
            h.after_train(self)
        return self.history


@dataclass
class EpochStats:
    loss: float
    acc: float
    steps: int
    seen: int
    step_seconds: float  # time in optimizer.step() (synchronised on CUDA)
    seconds: float


def train_epoch(loss_fn: Callable[[Any, Any], tuple[Any, Any]], optimizer, loader: Iterable, device, *,
                desc: str = "train", quiet: bool = False, main: bool = True, max_steps: int | None = None) -> EpochStats:
    """One supervised epoch: for each ``(x, y, *rest)`` batch, ``loss, logits = loss_fn(x, y)``,
    zero_grad, backward, step. Returns the sample-weighted mean loss, accuracy of
    ``logits.argmax(1)``, and timings."""
    import torch

    t_start = time.perf_counter()
    sync = getattr(device, "type", "cpu") == "cuda"
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = steps = 0
    step_time = 0.0
    bar = progress(loader, desc=desc, quiet=quiet, main=main)
    for batch in bar:
        x = batch[0].to(device, non_blocking=True)
        y = batch[1].to(device, non_blocking=True)
        loss, logits = loss_fn(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if sync:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        optimizer.step()
        if sync:
            torch.cuda.synchronize(device)
        step_time += time.perf_counter() - t0
        loss_sum += loss.detach().double() * x.shape[0]
        correct += (logits.detach().argmax(1) == y).sum()
        seen += x.shape[0]
        steps += 1
        if hasattr(bar, "set_postfix") and steps % 5 == 1:
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if max_steps is not None and steps >= max_steps:
            break
    n = max(seen, 1)
    return EpochStats(float(loss_sum) / n, int(correct) / n, steps, seen, step_time, time.perf_counter() - t_start)
