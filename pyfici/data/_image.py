"""Image files shared by the dataset readers: the one list of image extensions,
reading, and an up-front check that every listed image can be opened."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def is_image_file(name: str | os.PathLike) -> bool:
    return os.fspath(name).lower().endswith(IMAGE_EXTENSIONS)


def load_rgb(x):
    """A path or a ``PIL.Image`` -> an RGB ``PIL.Image`` (the file is closed after reading).
    A missing file raises FileNotFoundError, an unreadable one ValueError, naming it."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(x, Image.Image):
        return x.convert("RGB")
    try:
        with Image.open(x) as f:
            return f.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image listed by the dataset is missing: {os.fspath(x)}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"image {os.fspath(x)} cannot be read ({type(e).__name__}): replace or remove it") from None


def check_images(items: Iterable, what: str = "dataset") -> None:
    """Open the header of every image path among ``items`` (tuples whose first entry is a path
    or a PIL image); raise ValueError naming the missing, empty or unreadable files. Reads
    headers only (about 0.1 ms per image), so a bad file stops a run before training, not
    at its final evaluation."""
    from PIL import Image, UnidentifiedImageError

    bad: list[str] = []
    n = 0
    for it in items:
        p = it[0]
        if not isinstance(p, (str, os.PathLike)):
            continue
        n += 1
        try:
            if os.path.getsize(p) == 0:
                bad.append(f"{os.fspath(p)} (empty)")
                continue
            with Image.open(p) as f:
                f.size  # noqa: B018 - parsing the header is the check
        except FileNotFoundError:
            bad.append(f"{os.fspath(p)} (missing)")
        except (UnidentifiedImageError, OSError, SyntaxError):
            bad.append(f"{os.fspath(p)} (not a readable image)")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ValueError(f"{what}: {len(bad)} of {n} images cannot be used: {', '.join(bad[:3])}{more}")


class ImageDataset:
    """``torch.utils.data.Dataset`` over ``(image, label, ...)`` items: loads a path with
    PIL (RGB) or uses a ``PIL.Image`` as is, applies ``transform``, and returns
    ``(transform(image), label, ...)``."""

    def __init__(self, items: Sequence[tuple], transform: Callable | None = None):
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        img, *labels = self.items[i]
        img = load_rgb(img)
        if self.transform is not None:
            img = self.transform(img)
        return (img, *labels)
