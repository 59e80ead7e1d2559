"""Image loading shared by the dataset readers."""

from __future__ import annotations

import os


def load_rgb(x):
    """A path or a ``PIL.Image`` -> an RGB ``PIL.Image`` (the file is closed after
    reading; a missing file raises FileNotFoundError naming it)."""
    from PIL import Image

    if isinstance(x, Image.Image):
        return x.convert("RGB")
    try:
        with Image.open(x) as f:
            return f.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image listed by the dataset is missing: {os.fspath(x)}") from None
