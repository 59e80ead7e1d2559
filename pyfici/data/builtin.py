"""The built-in sample sets: real images that ship with pip packages (no download),
one loader each. The datasets built from them live with their task
(:func:`pyfici.data.retrieval.builtin_retrieval`, :func:`pyfici.data.reid.builtin_reid`,
the FICGAN faces).

- :func:`skimage_photos`: real photographs of scikit-image (:data:`PHOTO_NAMES`), RGB.
- :func:`lfw_faces`: the 100 real 25x25 LFW face crops of ``skimage.data.lfw_subset()``
  (the first 100 of its 200 images; the others are not faces).
- :func:`sklearn_digits`: the UCI optical digits of ``sklearn.datasets.load_digits``
  (1,797 8x8 images, 10 classes, written by 43 people).
- :func:`builtin_images`: the photographs, then the faces, as RGB PIL images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pyfici.errors import require

__all__ = ["PHOTO_NAMES", "builtin_images", "lfw_faces", "skimage_photos", "sklearn_digits"]

PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
               "retina", "colorwheel", "camera", "coins", "horse", "clock", "moon", "brick", "grass", "gravel",
               "cell", "page", "text")


def _skimage_data():
    return require("skimage.data", "data", "the built-in data")


def _to_rgb_uint8(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint8:
        a = (a.astype(np.float64) * (255.0 / max(float(a.max()), 1e-12))).clip(0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.stack([a, a, a], axis=-1)
    return np.ascontiguousarray(a[..., :3])


def skimage_photos(names: Sequence[str] = PHOTO_NAMES) -> list[Any]:
    """The named scikit-image photographs as RGB ``PIL.Image`` (grey ones copied to RGB;
    non-8-bit ones scaled to 0..255)."""
    from PIL import Image

    data = _skimage_data()
    return [Image.fromarray(_to_rgb_uint8(getattr(data, name)())) for name in names]


def lfw_faces() -> np.ndarray:
    """(100, 25, 25) float32 grey LFW face crops (values as scikit-image gives them)."""
    return _skimage_data().lfw_subset()[:100]


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """``(images (1797, 8, 8) float 0..16, labels (1797,) int)``."""
    d = require("sklearn.datasets", "data", "the built-in retrieval data").load_digits()
    return d.images, d.target


def builtin_images(n: int | None = None) -> list[Any]:
    """Real RGB images (``PIL.Image.Image``, mode RGB) in a fixed order: the scikit-image
    photographs of :data:`PHOTO_NAMES` (sizes 172x448 .. 1411x1411), then the 100 LFW
    face crops (25x25). ``n`` = how many (default all, 119); raises ``ValueError`` if
    more are asked than exist."""
    from PIL import Image

    if n is not None and n <= len(PHOTO_NAMES):
        if n < 0:
            raise ValueError(f"builtin_images: n must be in 0..{len(PHOTO_NAMES) + 100}, got {n}")
        return skimage_photos(PHOTO_NAMES[:n])
    out = skimage_photos() + [Image.fromarray(_to_rgb_uint8(f)) for f in lfw_faces()]
    if n is not None:
        if n > len(out):
            raise ValueError(f"builtin_images: n must be in 0..{len(out)}, got {n}")
        out = out[:n]
    return out
