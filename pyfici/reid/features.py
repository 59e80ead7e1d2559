"""Feature extraction for ReID evaluation with any torch model, and
evaluation from saved features.

``extract_features(model, data)`` runs ``model`` over a dataset or an image
folder and returns a :class:`FeatureSet` (features, pids, camids, image
paths). ``save_features`` / ``load_features`` keep it in one ``.pt`` file
(plain tensors and strings, loadable with ``weights_only=True``), and
``evaluate_features(query, gallery)`` evaluates two of them.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class FeatureSet:
    """Features of N images: ``features`` [N, D] float32 (CPU), ``pids`` and
    ``camids`` [N] int64, ``paths`` (N image paths, or None when the data
    gave no paths)."""

    features: torch.Tensor
    pids: torch.Tensor
    camids: torch.Tensor
    paths: list[str] | None = None

    def __len__(self) -> int:
        return self.features.shape[0]


def parse_market_name(path: str) -> tuple[int, int]:
    """(pid, camid) of a Market-1501 / DukeMTMC-reID file name such as
    ``0002_c1s1_000451_03.jpg`` (pid 2, camera 1); (-1, -1) if it does not match."""
    m = MARKET_NAME.match(os.path.basename(path))
    return (int(m.group(1)), int(m.group(2))) if m else (-1, -1)


def list_images(folder: str | os.PathLike) -> list[str]:
    """Image files under ``folder`` (recursive), sorted by path."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"data: {str(folder)!r} is not a folder")
    return sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def default_transform(image_size: tuple[int, int] = (256, 128)):
    """PIL image -> float tensor [3, H, W]: resize to ``image_size`` (H, W),
    scale to [0, 1], normalise with the ImageNet mean and std."""
    import numpy as np

    h, w = image_size
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def tf(img):
        from PIL import Image

        img = img.convert("RGB").resize((w, h), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        return (x - mean) / std

    return tf


class ImageFolderDataset(torch.utils.data.Dataset):
    """The images of a folder as ``(transform(image), pid, camid)`` items, with
    (pid, camid) from ``parse_name(path)`` (Market-1501 file names by default)."""

    def __init__(self, paths: Sequence[str], transform: Callable, parse_name: Callable[[str], tuple[int, int]]):
        self.paths = list(paths)
        self.transform = transform
        self.labels = [parse_name(p) for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            img = im.convert("RGB")
        pid, cam = self.labels[i]
        return self.transform(img), pid, cam


def _as_batch_features(out) -> torch.Tensor:
    """A model's output -> [B, D]: a tensor (pooled over space if [B, C, H, W]),
    the first tensor of a tuple / list, or ``features`` / ``feat`` of a dict."""
    if isinstance(out, dict):
        for k in ("features", "feat", "feats", "embeddings"):
            if k in out:
                out = out[k]
                break
        else:
            out = next(iter(out.values()))
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"model: expected the forward pass to return a tensor, got {type(out).__name__}")
    if out.dim() == 4:
        out = out.mean(dim=(2, 3))
    if out.dim() != 2:
        out = out.flatten(1)
    return out


def _split_item(item):
    if isinstance(item, (tuple, list)):
        img = item[0]
        pid = item[1] if len(item) > 1 else -1
        cam = item[2] if len(item) > 2 else -1
        return img, pid, cam
    return item, -1, -1


def _collate(batch):
    imgs, pids, cams = zip(*(_split_item(b) for b in batch))
    if not all(isinstance(x, torch.Tensor) for x in imgs):
        raise TypeError("data: dataset items must be image tensors (or (tensor, pid, camid) tuples); "
                        "give a transform that returns tensors")
    return torch.stack(imgs), torch.as_tensor([int(p) for p in pids]), torch.as_tensor([int(c) for c in cams])


def extract_features(
    model: torch.nn.Module,
    data,
    *,
    flip: bool = True,
    normalize: bool = True,
    batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device | None = None,
    transform: Callable | None = None,
    image_size: tuple[int, int] = (256, 128),
    parse_name: Callable[[str], tuple[int, int]] = parse_market_name,
    progress: bool = False,
) -> FeatureSet:
    """ReID features of every image of ``data`` computed by any torch ``model``.

    data: a ``torch.utils.data.Dataset`` whose items are image tensors or
    ``(tensor, pid, camid, ...)`` tuples, or a folder of images (searched
    recursively, sorted by path; pid and camera from ``parse_name``, Market-1501
    file names by default, -1 when a name does not match; images loaded with
    ``transform``, default: resize to ``image_size`` (H, W) + ImageNet
    normalisation). The model's output may be [B, D], [B, C, H, W] (averaged
    over space), a tuple (first element) or a dict (``features``/``feat``).
    ``flip``: add the features of the horizontally mirrored batch (the papers'
    evaluation); ``normalize``: L2-normalise the (summed) features. The model
    runs in eval mode under ``torch.no_grad()`` on ``device`` (default: its
    parameters' device) and its mode is restored. Returns a :class:`FeatureSet`
    on the CPU.
    """
    if not isinstance(model, torch.nn.Module) and not callable(model):
        raise TypeError(f"model: expected a torch.nn.Module or callable, got {type(model).__name__}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be an int >= 1, got {batch_size!r}")
    paths = None
    if isinstance(data, (str, os.PathLike)):
        paths = list_images(data)
        if not paths:
            raise ValueError(f"data: no images ({', '.join(IMAGE_EXTENSIONS)}) under {str(data)!r}")
        data = ImageFolderDataset(paths, transform or default_transform(image_size), parse_name)
    elif transform is not None:
        raise ValueError("transform: only used with an image folder (a dataset applies its own)")
    elif hasattr(data, "paths") and isinstance(data.paths, (list, tuple)):
        paths = [str(p) for p in data.paths]
    if device is None:
        p = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=_collate)
    was_training = model.training if isinstance(model, torch.nn.Module) else None
    if was_training is not None:
        model.eval()
    feats, pids, cams = [], [], []
    it = loader
    if progress:
        from tqdm import tqdm

        it = tqdm(loader, desc="features", unit="batch", file=sys.stderr)
    try:
        with torch.no_grad():
            for x, pid, cam in it:
                x = x.to(device)
                f = _as_batch_features(model(x)).float()
                if flip:
                    f = f + _as_batch_features(model(x.flip(-1))).float()
                if normalize:
                    f = torch.nn.functional.normalize(f, p=2, dim=1)
                feats.append(f.cpu())
                pids.append(pid)
                cams.append(cam)
    finally:
        if was_training:
            model.train()
    if not feats:
        raise ValueError("data: is empty")
    return FeatureSet(torch.cat(feats), torch.cat(pids).long(), torch.cat(cams).long(), paths)


def save_features(path: str | os.PathLike, fs: FeatureSet) -> Path:
    """Write a :class:`FeatureSet` to ``path`` (torch.save of tensors and strings;
    written to a temporary file and renamed, so a crash leaves no partial file)."""
    path = Path(path)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    torch.save({"format": "pyfici.reid.features/1", "features": fs.features.detach().cpu(),
                "pids": fs.pids.cpu(), "camids": fs.camids.cpu(), "paths": fs.paths}, tmp)
    os.replace(tmp, path)
    return path


def load_features(path: str | os.PathLike) -> FeatureSet:
    """Read a file written by :func:`save_features` (``weights_only=True``: no code runs)."""
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"features: no such file {str(path)!r}") from None
    except Exception as e:
        raise ValueError(f"features: {str(path)!r} is not a pyfici feature file ({type(e).__name__})") from None
    if not isinstance(d, dict) or d.get("format") != "pyfici.reid.features/1":
        raise ValueError(f"features: {str(path)!r} is not a pyfici feature file")
    f, p, c = d["features"], d["pids"], d["camids"]
    if f.dim() != 2 or p.shape != (f.shape[0],) or c.shape != (f.shape[0],):
        raise ValueError(f"features: {str(path)!r} has inconsistent shapes")
    return FeatureSet(f, p, c, d.get("paths"))


def evaluate_features(query: FeatureSet | str | os.PathLike, gallery: FeatureSet | str | os.PathLike, **kwargs):
    """:func:`pyfici.reid.evaluate` of two feature sets (or files written by
    :func:`save_features`); keyword arguments go to ``evaluate``."""
    from pyfici.reid.evaluate import evaluate

    q = query if isinstance(query, FeatureSet) else load_features(query)
    g = gallery if isinstance(gallery, FeatureSet) else load_features(gallery)
    return evaluate(q.features, g.features, q.pids, g.pids, q.camids, g.camids, **kwargs)
