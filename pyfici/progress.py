"""Progress bars for long work: tqdm on stderr, off with ``quiet`` and on ranks other than 0.

At the bottom of the package so every layer (deid, reid, engine, methods) can use it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable


def progress(iterable: Iterable, *, desc: str, quiet: bool = False, main: bool = True, total: int | None = None,
             initial: int = 0, leave: bool = False):
    """A tqdm bar on stderr (the iterable itself when ``quiet`` or not on rank 0)."""
    if quiet or not main:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, initial=initial, leave=leave, file=sys.stderr, dynamic_ncols=True)
