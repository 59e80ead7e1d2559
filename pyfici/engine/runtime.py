"""Where a run executes: device choice, torch.distributed under torchrun, rank-0 logging, seeding.

:func:`setup` reads the torchrun environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``); with more than one process it initialises the default process
group (NCCL on CUDA, gloo on the CPU) unless the caller already did, and each
process uses ``cuda:LOCAL_RANK``. :meth:`Runtime.close` destroys a process
group that :func:`setup` created. Logs go to stderr and only from rank 0.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pyfici.engine.errors import UserError

DEVICE_HELP = "auto (CUDA when available, else CPU), cpu, cuda or cuda:N"


def log(*parts: object) -> None:
    """Print a progress / log line on stderr (rank 0 only)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*parts, file=sys.stderr, flush=True)


def distributed_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun environment; (0, 1, 0) outside it."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(device: str, flag: str = "--device"):
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` -> ``torch.device``; UserError when it cannot be used."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"{flag} {device!r}: expected {DEVICE_HELP}") from None
    if d.type not in ("cpu", "cuda"):
        raise UserError(f"{flag} {device!r}: expected {DEVICE_HELP}")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {device}: CUDA is not available on this machine (use --device cpu)")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise UserError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return d


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads (``None``: unchanged), then restore the count."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Runtime:
    """The process's place in a run: ``device``, ``rank``, ``world``, ``local_rank``."""

    device: object
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_process_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def log(self, *parts: object) -> None:
        if self.main:
            print(*parts, file=sys.stderr, flush=True)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owns_process_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_process_group = False

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def setup(device: str = "auto") -> Runtime:
    """The :class:`Runtime` for ``--device`` (see the module docstring)."""
    import torch

    rank, world, local = distributed_info()
    dev = resolve_device(device)
    owns = False
    if world > 1:
        if dev.type == "cuda":
            dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
            owns = True
    return Runtime(dev, rank, world, local, owns)
