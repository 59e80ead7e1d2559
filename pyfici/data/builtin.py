"""Built-in datasets made of real images that ship with pip packages (no download).

- :func:`builtin_images`: real RGB photographs from scikit-image
  (``astronaut``, ``chelsea``, ``coffee``, ``rocket``, ...; grey ones as RGB), then
  the 100 real LFW face crops of ``skimage.data.lfw_subset()`` (25x25 grey -> RGB).
  Source images for ReID-style data and demos.
- :func:`builtin_retrieval` / :class:`BuiltinRetrieval`: a class-disjoint
  retrieval task on the real handwritten digits of ``sklearn.datasets.load_digits``
  (UCI optical digits, 1,797 8x8 images of 10 classes written by 43 people):
  digits 0-4 are the training classes, 5-9 the test classes (searched against
  themselves minus self, like CUB's 101-200). Each image is grey 0..16, scaled to
  0..255, upscaled (bicubic) to ``size`` x ``size`` and copied to RGB.
  ``per_class`` caps the images per class (the first ones in file order).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pyfici.data.retrieval import RECALL_KS, RetrievalImageDataset, RetrievalSplit

__all__ = ["builtin_images", "builtin_retrieval", "BuiltinRetrieval", "PHOTO_NAMES"]

PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
               "retina", "colorwheel", "camera", "coins", "horse", "clock", "moon", "brick", "grass", "gravel",
               "cell", "page", "text")


def _to_rgb_uint8(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint8:
        a = (a.astype(np.float64) * (255.0 / max(float(a.max()), 1e-12))).clip(0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.stack([a, a, a], axis=-1)
    return np.ascontiguousarray(a[..., :3])


def builtin_images(n: int | None = None) -> list[Any]:
    """Real RGB images (``PIL.Image.Image``, mode RGB) from pip packages, in a fixed order:
    the scikit-image photographs of :data:`PHOTO_NAMES` (sizes 172x448 .. 1411x1411),
    then the 100 real LFW face crops (25x25). ``n`` = how many (default all, 119);
    raises ``ValueError`` if more are asked than exist."""
    from PIL import Image
    from skimage import data

    out = [Image.fromarray(_to_rgb_uint8(getattr(data, name)())) for name in PHOTO_NAMES]
    if n is not None and n <= len(out):
        return out[:n]
    faces = data.lfw_subset()[:100]  # the first 100 are faces, the rest are not
    out += [Image.fromarray(_to_rgb_uint8(f)) for f in faces]
    if n is not None:
        if n < 0 or n > len(out):
            raise ValueError(f"builtin_images: n must be in 0..{len(out)}, got {n}")
        out = out[:n]
    return out


def _digits(size: int, per_class: int | None) -> list[tuple[Any, int]]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the built-in retrieval data needs scikit-learn (pip install scikit-learn, "
                          "or pyfici[data])") from e
    from PIL import Image

    d = load_digits()
    counts: dict[int, int] = {}
    items = []
    for img, y in zip(d.images, d.target):
        y = int(y)
        if per_class is not None and counts.get(y, 0) >= per_class:
            continue
        counts[y] = counts.get(y, 0) + 1
        a = (img * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        im = Image.fromarray(a).resize((size, size), Image.BICUBIC).convert("RGB")
        items.append((im, y))
    return items


def builtin_retrieval(size: int = 64, per_class: int | None = 60) -> RetrievalSplit:
    """The built-in retrieval task (see module docstring): digits 0-4 train
    (labels 0-4), digits 5-9 test (labels 5-9); K = 1, 2, 4, 8."""
    if size < 8:
        raise ValueError(f"builtin_retrieval: size must be >= 8, got {size}")
    if per_class is not None and per_class < 2:
        raise ValueError(f"builtin_retrieval: per_class must be >= 2 (a query needs a positive), got {per_class}")
    items = _digits(size, per_class)
    train = [(im, y) for im, y in items if y < 5]
    test = [(im, y) for im, y in items if y >= 5]
    return RetrievalSplit("builtin", train, test, RECALL_KS["builtin"],
                          info={"source": "sklearn.datasets.load_digits", "size": size, "per_class": per_class})


class BuiltinRetrieval(RetrievalImageDataset):
    """``torch.utils.data.Dataset`` of the built-in retrieval task: ``split`` = ``"train"``
    (digits 0-4) or ``"test"`` (digits 5-9); items are ``(transform(PIL image), label)``."""

    def __init__(self, split: str = "train", transform=None, size: int = 64, per_class: int | None = 60):
        if split not in ("train", "test"):
            raise ValueError(f"BuiltinRetrieval: split must be 'train' or 'test', got {split!r}")
        s = builtin_retrieval(size=size, per_class=per_class)
        super().__init__(s.train if split == "train" else s.test, transform)
        self.ks = s.ks
