"""Atomic output files and safe checkpoint loading.

Every file a run writes goes to a temporary file beside its final name, is
flushed to disk and then renamed over the final name (atomic on POSIX), so an
interrupted run leaves either the old file or the new one, never a truncated
one. The temporary name is ``.<name>.<8 random characters>.tmp``; a run
directory removes such leftovers of a killed save when it is opened
(:mod:`pyfici.engine.rundir`). Files get the mode the umask allows (0666 minus
the umask), like any file a program creates.

Checkpoints hold only tensors and plain Python containers and are read with
``torch.load(weights_only=True)``: loading one never runs code from the file.
A file that is missing, empty, truncated, not a checkpoint, or holds other
objects is reported as one :class:`~pyfici.engine.UserError` line.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyfici.engine.errors import UserError

TMP_PATTERN = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], binary: bool = True) -> Path:
    """Write ``path`` through ``write(file)``: temp file beside it, fsync, chmod per umask, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), _file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda f: f.write(text), binary=False)


def _json_default(o: Any):
    import numpy as np
    import torch

    if isinstance(o, (torch.Tensor, np.ndarray)):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=_json_default)


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write_text(to_json(obj), path)


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """``fig.savefig`` (format from the suffix) to ``path`` atomically."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi))


def load_checkpoint(path: str | os.PathLike, kind: str | tuple[str, ...] | None = None,
                    what: str = "checkpoint") -> dict:
    """Read a checkpoint written by :func:`atomic_save` on the CPU (``weights_only=True``).

    ``kind``: the value(s) its ``"kind"`` entry must have. Raises
    :class:`UserError` (one line, naming the file) for a missing, empty,
    corrupt, foreign or non-tensor file.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path}: no such file")
    if path.stat().st_size == 0:
        raise UserError(f"{what} {path}: the file is empty (not a pyfici checkpoint)")
    try:
        with warnings.catch_warnings():  # torch's warnings about foreign pickles are not for the user
            warnings.simplefilter("ignore")
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{what} {path}: holds objects other than tensors and plain containers; "
                        "refusing to load it (not a pyfici checkpoint)") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, AttributeError,
            TypeError, IndexError):
        raise UserError(f"{what} {path}: unreadable or corrupt (not a complete pyfici checkpoint)") from None
    kinds = (kind,) if isinstance(kind, str) else kind
    found = ck.get("kind") if isinstance(ck, dict) else None
    if not isinstance(ck, dict) or (kinds is not None and found not in kinds):
        want = " or ".join(kinds) if kinds else "pyfici"
        raise UserError(f"{what} {path}: not a {want} checkpoint"
                        + (f" (it is a {found} checkpoint)" if isinstance(found, str) else ""))
    return ck
