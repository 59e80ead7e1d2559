"""Reading a dataset by its registry name (the ReID and the retrieval registries)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def load_by_name(kind: str, registry: Mapping[str, Callable | None], name: str, root: str | Path | None,
                 builtin: Callable, builtin_kwargs: dict[str, Any]):
    """``registry[name](root)``, or ``builtin(**builtin_kwargs)`` for ``"builtin"`` (no files).
    Raises ValueError for an unknown name (listing the choices) or a missing ``root``,
    FileNotFoundError when ``root`` is not a folder."""
    if name not in registry:
        raise ValueError(f"unknown {kind} dataset {name!r}; choose one of {', '.join(registry)}")
    if name == "builtin":
        return builtin(**builtin_kwargs)
    if root is None:
        raise ValueError(f"--dataset {name} needs --root DIR (the folder holding the official layout)")
    if not Path(root).is_dir():
        raise FileNotFoundError(f"--root {root}: the folder does not exist")
    return registry[name](root)
