"""Face images for FICGAN: reading any image file safely, the built-in faces,
folders of aligned faces.

Images are float32 numpy arrays ``[H, W, 3]`` in [0, 1] (RGB) here and float
tensors ``[N, 3, S, S]`` in [-1, 1] for the networks. Input files are only
ever opened for reading.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pyfici.data._image import IMAGE_EXTENSIONS
from pyfici.errors import require

IMAGE_EXTS = IMAGE_EXTENSIONS  # the name de-identification imports


class ImageInputError(ValueError):
    """An input image that cannot be used (unreadable, bad shape or type)."""


@dataclass
class LoadedImage:
    name: str
    image: np.ndarray  # [H, W, 3] float32 in [0, 1]
    notes: list[str] = field(default_factory=list)  # conversions applied (grayscale, alpha, 16-bit ...)


def to_rgb_float(arr: np.ndarray, name: str = "image") -> tuple[np.ndarray, list[str]]:
    """Any image array (gray, gray+alpha, RGB, RGBA; uint8, uint16, int, float,
    bool) -> ``[H, W, 3]`` float32 in [0, 1] plus notes on what was converted.
    Alpha is composited over mid-grey."""
    notes: list[str] = []
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 2, 3, 4):
        a = np.moveaxis(a, 0, -1)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (1, 2, 3, 4)):
        raise ImageInputError(f"{name}: unsupported image shape {a.shape} (expected HxW, HxWx1/2/3/4)")
    if a.shape[0] < 2 or a.shape[1] < 2:
        raise ImageInputError(f"{name}: image too small ({a.shape[0]}x{a.shape[1]})")
    if a.dtype == np.bool_:
        a = a.astype(np.float32)
        notes.append("binary image")
    elif a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    elif a.dtype == np.uint16:
        a = a.astype(np.float32) / 65535.0
        notes.append("16-bit converted to float")
    elif np.issubdtype(a.dtype, np.integer):
        hi = 65535.0 if a.max() > 255 else 255.0
        a = a.astype(np.float32) / hi
        notes.append(f"{arr.dtype} converted to float")
    elif np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise ImageInputError(f"{name}: image contains NaN or infinite values")
        if a.max() > 1.0 + 1e-6:
            a = a / (255.0 if a.max() <= 255.0 else a.max())
    else:
        raise ImageInputError(f"{name}: unsupported pixel type {a.dtype}")
    a = np.clip(a, 0.0, 1.0)
    if a.ndim == 2:
        a = a[..., None]
    c = a.shape[-1]
    if c in (2, 4):
        alpha = a[..., -1:]
        a = a[..., :-1] * alpha + 0.5 * (1 - alpha)
        notes.append("alpha channel composited over grey")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
        notes.append("grayscale converted to RGB")
    return np.ascontiguousarray(a, dtype=np.float32), notes


def read_image(path: str | os.PathLike) -> LoadedImage:
    """Read one image file (never modified) -> :class:`LoadedImage`; raises
    :class:`ImageInputError` with the file name when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise ImageInputError(f"{path}: not a file")
    try:
        import warnings

        import imageio.v3 as iio

        with warnings.catch_warnings():  # imageio's legacy plugins warn while probing unreadable files
            warnings.simplefilter("ignore", DeprecationWarning)
            arr = iio.imread(path)
    except Exception as e:  # noqa: BLE001 - any decoder failure becomes a clear message
        try:
            from PIL import Image

            with Image.open(path) as im:
                arr = np.array(im)
        except Exception:  # noqa: BLE001
            raise ImageInputError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
    if arr.ndim == 4:  # animated / multi-page: first frame
        arr = arr[0]
    img, notes = to_rgb_float(arr, str(path))
    return LoadedImage(path.name, img, notes)


def list_images(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _centre_square(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    s = min(h, w)
    t, left = (h - s) // 2, (w - s) // 2
    return img[t : t + s, left : left + s]


def resize_tensor(img: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """[H, W, 3] in [0, 1] -> [3, size, size] in [-1, 1] (bilinear, antialiased)."""
    t = torch.as_tensor(np.ascontiguousarray(img), dtype=torch.float32).permute(2, 0, 1)[None]
    if t.shape[-1] != size or t.shape[-2] != size:
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (t[0].clamp(0, 1) * 2 - 1).contiguous()


def builtin_face_images() -> list[LoadedImage]:
    """The real faces that ship with pip packages: the 100 LFW face crops of
    ``skimage.data.lfw_subset()`` (25x25 grey), the face of
    ``skimage.data.astronaut()`` (Eileen Collins) and of matplotlib's
    ``grace_hopper.jpg``; every image is a distinct identity as far as we know
    (the LFW subset has no labels)."""
    from pyfici.data.builtin import lfw_faces

    sd = require("skimage.data", "data", "the built-in faces")

    out = []
    for i, f in enumerate(lfw_faces()):
        img, notes = to_rgb_float(f.astype(np.float32), f"lfw_{i:03d}")
        out.append(LoadedImage(f"lfw_{i:03d}.png", img, notes))
    ast = sd.astronaut()
    out.append(LoadedImage("astronaut.png", _square_crop(ast, 60, 170, 110) / 255.0, []))
    try:
        import matplotlib.cbook as cb
        import skimage.io as io

        gh = io.imread(cb.get_sample_data("grace_hopper.jpg", asfileobj=False))
        out.append(LoadedImage("grace_hopper.png", _square_crop(gh, 100, 160, 225) / 255.0, []))
    except Exception:  # noqa: BLE001 - optional extra face
        pass
    return out


def _square_crop(img: np.ndarray, r: int, c: int, s: int) -> np.ndarray:
    return np.ascontiguousarray(img[r : r + s, c : c + s, :3]).astype(np.float32)


def load_face_folder(data: str, size: int) -> tuple[torch.Tensor, list[str]]:
    """``data``: a folder of aligned face crops (CelebA-HQ / FFHQ style, any
    depth) or ``"builtin"`` -> (images ``[N, 3, size, size]`` in [-1, 1],
    names). Unreadable files raise :class:`ImageInputError` naming the file."""
    if data == "builtin":
        items = builtin_face_images()
    else:
        p = Path(data)
        if not p.exists():
            raise ImageInputError(f"--data {data}: no such folder")
        files = [p] if p.is_file() else list_images(p)
        if not files:
            raise ImageInputError(f"--data {data}: no image files ({', '.join(IMAGE_EXTS)})")
        items = [read_image(f) for f in files]
    imgs = torch.stack([resize_tensor(_centre_square(it.image), size) for it in items])
    return imgs, [it.name for it in items]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> [H, W, 3] uint8."""
    a = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
    return a.permute(1, 2, 0).numpy()


def save_png(arr: np.ndarray, path: str | os.PathLike) -> None:
    """Write a uint8 [H, W, 3] array as PNG atomically (temp file + rename, mode from the umask)."""
    from PIL import Image

    from pyfici.engine.files import atomic_write

    atomic_write(path, lambda f: Image.fromarray(arr).save(f, format="PNG"))


def save_grid(rows: list[torch.Tensor], path: str | os.PathLike, pad: int = 2) -> None:
    """rows: list of ``[N, 3, S, S]`` tensors in [-1, 1] (same N, S) -> one PNG,
    one row per tensor."""
    n, s = rows[0].shape[0], rows[0].shape[-1]
    grid = np.full((len(rows) * (s + pad) + pad, n * (s + pad) + pad, 3), 255, np.uint8)
    for r, t in enumerate(rows):
        for c in range(n):
            y, x = pad + r * (s + pad), pad + c * (s + pad)
            grid[y : y + s, x : x + s] = to_uint8(t[c])
    save_png(grid, path)
