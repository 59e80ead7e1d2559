"""Person re-identification datasets read from their official folder layouts,
and a small built-in ReID-style dataset made from real images that ship with
pip packages.

Every reader returns a :class:`ReIDDataset` whose ``train``, ``query`` and
``gallery`` are lists of ``(image, pid, camid)`` tuples:

- ``image`` is a file path (``str``) for the on-disk datasets, or a
  ``PIL.Image.Image`` for the built-in one (:class:`ReIDImageDataset` reads
  both);
- ``pid`` is an ``int``: training pids are relabelled to ``0 .. num_train_pids-1``
  (the classifier's targets); query / gallery pids are the original ones
  (``0`` = distractor, kept in the gallery as a negative);
- ``camid`` is an ``int`` counted from 0 (``c1`` -> 0).

Protocol decisions (the same as torchreid / fast-reid, which the published
numbers use):

- Market-1501 / DukeMTMC-reID: file names ``PPPP_cC...`` (``0002_c1s1_000451_03.jpg``,
  ``0001_c2_f0046182.jpg``). Images with pid ``-1`` ("junk": the Market-1501
  evaluation ignores them) are left out of every split, which is what ignoring
  them means for CMC / mAP. Pid ``0`` ("distractor") is kept in the gallery
  (it counts as a negative) and left out of train (it is not an identity).
- CUHK03-NP (the "new protocol" of Zhong et al. 2017: 767 train / 700 test
  identities): ``cuhk03-np/{detected,labeled}/{bounding_box_train,query,bounding_box_test}``,
  same file-name convention.
- MSMT17: V1 layout ``MSMT17_V1/{train,test}`` with ``list_train.txt``,
  ``list_val.txt``, ``list_query.txt``, ``list_gallery.txt`` (lines
  ``0000/0000_000_01_0303morning_0015_0.jpg 0``; the camera is the third
  ``_`` field, counted from 1). Train = list_train + list_val, as torchreid
  does. V2 layout (``MSMT17_V2/{mask_train_v2,mask_test_v2}`` with the same
  list files) is read too.

Errors name the file or folder that was expected.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pyfici.data._image import ImageDataset, is_image_file
from pyfici.data._registry import load_by_name
from pyfici.data.builtin import PHOTO_NAMES, skimage_photos

__all__ = [
    "ReIDDataset",
    "ReIDImageDataset",
    "PKSampler",
    "market1501",
    "dukemtmc",
    "cuhk03_np",
    "msmt17",
    "builtin_reid",
    "load_reid_dataset",
    "REID_DATASETS",
]

Item = tuple[Any, int, int]

_NAME_RE = re.compile(r"^([-\d]+)_c(\d+)")


@dataclass
class ReIDDataset:
    """Train / query / gallery lists of ``(image, pid, camid)``; train pids relabelled."""

    name: str
    train: list[Item]
    query: list[Item]
    gallery: list[Item]
    train_pid_names: list[int] = field(default_factory=list)  # original pid of each relabelled train pid

    @property
    def num_train_pids(self) -> int:
        return len({p for _, p, _ in self.train})

    @property
    def num_train_cams(self) -> int:
        return len({c for _, _, c in self.train})

    def summary(self) -> str:
        def row(name: str, items: list[Item]) -> str:
            return f"  {name:<8} {len({p for _, p, _ in items}):>6} ids {len(items):>8} images {len({c for _, _, c in items}):>4} cameras"

        return "\n".join([f"{self.name}:", row("train", self.train), row("query", self.query), row("gallery", self.gallery)])


# ----------------------------------------------------------------------------- helpers


def _relabel(items: list[Item]) -> tuple[list[Item], list[int]]:
    pids = sorted({p for _, p, _ in items})
    mapping = {p: i for i, p in enumerate(pids)}
    return [(x, mapping[p], c) for x, p, c in items], pids


def _find_dir(root: Path, candidates: Sequence[str], marker: str, dataset: str) -> Path:
    """The first of root, root/candidate... that holds ``marker``; error naming what was expected."""
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"{dataset}: root folder {root} does not exist")
    tried = [root] + [root / c for c in candidates]
    for d in tried:
        if (d / marker).is_dir():
            return d
    looked = ", ".join(str(d / marker) for d in tried)
    raise FileNotFoundError(f"{dataset}: expected the folder '{marker}' (looked for: {looked})")


def _read_named_dir(d: Path, dataset: str, *, drop_distractors: bool, num_cams: int | None) -> list[Item]:
    if not d.is_dir():
        raise FileNotFoundError(f"{dataset}: expected the folder {d}")
    items: list[Item] = []
    files = sorted(p for p in d.iterdir() if is_image_file(p))
    if not files:
        raise FileNotFoundError(f"{dataset}: the folder {d} holds no images (*.jpg / *.png)")
    for p in files:
        m = _NAME_RE.match(p.name)
        if m is None:
            raise ValueError(f"{dataset}: malformed file name {p} (expected 'PPPP_cC...', e.g. 0002_c1s1_000451_03.jpg)")
        pid, cam = int(m.group(1)), int(m.group(2))
        if pid == -1:
            continue  # junk: ignored by the protocol
        if pid < 0:
            raise ValueError(f"{dataset}: bad person id {pid} in {p}")
        if pid == 0 and drop_distractors:
            continue
        if cam < 1 or (num_cams is not None and cam > num_cams):
            raise ValueError(f"{dataset}: camera {cam} in {p} is out of range 1..{num_cams}")
        items.append((str(p), pid, cam - 1))
    return items


def _market_style(root: Path, candidates: Sequence[str], dataset: str, num_cams: int | None) -> ReIDDataset:
    base = _find_dir(root, candidates, "bounding_box_train", dataset)
    train = _read_named_dir(base / "bounding_box_train", dataset, drop_distractors=True, num_cams=num_cams)
    query = _read_named_dir(base / "query", dataset, drop_distractors=True, num_cams=num_cams)
    gallery = _read_named_dir(base / "bounding_box_test", dataset, drop_distractors=False, num_cams=num_cams)
    train, names = _relabel(train)
    return ReIDDataset(dataset, train, query, gallery, names)


# ----------------------------------------------------------------------------- readers


def market1501(root: str | Path) -> ReIDDataset:
    """Market-1501 from ``root`` (the folder holding ``bounding_box_train``, or its parent
    with ``Market-1501-v15.09.15`` / ``market1501``). 6 cameras."""
    return _market_style(Path(root), ["Market-1501-v15.09.15", "Market-1501", "market1501"], "Market-1501", 6)


def dukemtmc(root: str | Path) -> ReIDDataset:
    """DukeMTMC-reID from ``root`` (the folder holding ``bounding_box_train``, or its parent
    with ``DukeMTMC-reID`` / ``dukemtmc-reid``). 8 cameras."""
    return _market_style(Path(root), ["DukeMTMC-reID", "dukemtmc-reid", "dukemtmcreid/DukeMTMC-reID"], "DukeMTMC-reID", 8)


def cuhk03_np(root: str | Path, variant: str = "detected") -> ReIDDataset:
    """CUHK03-NP (new protocol), ``variant`` ``'detected'`` or ``'labeled'``; ``root`` is the
    ``cuhk03-np`` folder or a parent of it. 2 cameras."""
    if variant not in ("detected", "labeled"):
        raise ValueError(f"CUHK03-NP: variant must be 'detected' or 'labeled', got {variant!r}")
    cands = [variant, f"cuhk03-np/{variant}", f"cuhk03_np/{variant}", f"cuhk03/cuhk03-np/{variant}"]
    return _market_style(Path(root), cands, f"CUHK03-NP-{variant}", 2)


def _read_msmt_list(list_file: Path, img_dir: Path, dataset: str) -> list[Item]:
    if not list_file.is_file():
        raise FileNotFoundError(f"{dataset}: expected the list file {list_file}")
    items: list[Item] = []
    for n, line in enumerate(list_file.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{dataset}: {list_file} line {n}: expected 'relative/path.jpg PID', got {line!r}")
        rel, pid_s = parts
        fields = Path(rel).name.split("_")
        try:
            pid, cam = int(pid_s), int(fields[2])
        except (ValueError, IndexError):
            raise ValueError(
                f"{dataset}: {list_file} line {n}: cannot read pid / camera from {line!r} "
                "(expected e.g. '0000/0000_000_01_0303morning_0015_0.jpg 0')"
            ) from None
        items.append((str(img_dir / rel), pid, cam - 1))
    return items


def msmt17(root: str | Path) -> ReIDDataset:
    """MSMT17 V1 (``train/``, ``test/``) or V2 (``mask_train_v2/``, ``mask_test_v2/``) with the
    four list files; ``root`` is that folder or its parent (``MSMT17_V1`` / ``MSMT17_V2`` / ``msmt17``)."""
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"MSMT17: root folder {root} does not exist")
    layouts = [("train", "test"), ("mask_train_v2", "mask_test_v2")]
    tried = []
    for d in [root, root / "MSMT17_V1", root / "MSMT17_V2", root / "msmt17", root / "msmt17/MSMT17_V1", root / "msmt17/MSMT17_V2"]:
        for tr, te in layouts:
            tried.append(str(d / tr))
            if (d / tr).is_dir():
                train = _read_msmt_list(d / "list_train.txt", d / tr, "MSMT17")
                # list_val holds more images of the training identities (same pid numbering): train on both
                val = _read_msmt_list(d / "list_val.txt", d / tr, "MSMT17") if (d / "list_val.txt").is_file() else []
                query = _read_msmt_list(d / "list_query.txt", d / te, "MSMT17")
                gallery = _read_msmt_list(d / "list_gallery.txt", d / te, "MSMT17")
                train_all, names = _relabel(train + val)
                return ReIDDataset("MSMT17", train_all, query, gallery, names)
    raise FileNotFoundError(f"MSMT17: expected a train folder with list_train.txt beside it (looked for: {', '.join(tried)})")


# ----------------------------------------------------------------------------- built-in data


def _source_images() -> list[Any]:
    """The 16 scikit-image photographs the built-in identities are made from."""
    return skimage_photos(PHOTO_NAMES[:16])


def _camera_params(num_cams: int) -> list[dict]:
    """Fixed per-camera transforms: crop offset / scale, colour gain, brightness, flip."""
    rng = np.random.default_rng(1234)
    cams = []
    for c in range(num_cams):
        cams.append(
            dict(
                dx=float(rng.uniform(-0.2, 0.2)),
                dy=float(rng.uniform(-0.1, 0.1)),
                scale=float(rng.uniform(0.75, 1.25)),
                gain=rng.uniform(0.65, 1.35, size=3),
                bright=float(rng.uniform(-35, 35)),
                flip=bool(c % 2),
            )
        )
    return cams


_SOURCE_ORDER = (0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15)  # colour and grey images interleaved


def builtin_reid(
    num_ids: int = 32,
    num_cams: int = 3,
    images_per_cam: int = 3,
    size: tuple[int, int] = (128, 64),
    num_train_ids: int | None = None,
    seed: int = 0,
) -> ReIDDataset:
    """A small ReID-style dataset made from real photographs shipped with scikit-image.

    Identities: the 16 source images (``astronaut``, ``chelsea``, ``coffee``,
    ``rocket``, ``hubble_deep_field``, ``immunohistochemistry``, ``retina``,
    ``colorwheel`` and the grey ``camera``, ``coins``, ``horse``, ``clock``,
    ``moon``, ``brick``, ``grass``, ``gravel`` as RGB) are each cut into
    ``ceil(num_ids / 16)`` person-shaped (2:1) regions side by side; each
    region is one identity, and identities of the same image are numbered
    consecutively, so neighbouring identities share texture and colour and
    are easy to confuse (both the training and the test split hold such
    pairs). Cameras: every camera applies one fixed transform (crop offset up
    to +-20%, scale 0.75-1.25, per-channel colour gain 0.65-1.35, brightness
    +-35, horizontal flip for odd cameras). Every image then adds a seeded
    jitter of the crop (+-8%), of the colour gain (+-10%) and brightness
    (+-10), and, with probability 1/2, an occluding box of a random colour
    covering 10-25% of the image. Splits: the first ``num_train_ids``
    identities (default half) are training identities with all their images;
    for the others, image 0 of every camera is a query and the rest are the
    gallery. Images are returned in memory as ``PIL.Image`` (``size`` =
    (height, width)). Deterministic for a given ``seed``.
    """
    from PIL import Image

    if num_ids < 2:
        raise ValueError(f"builtin_reid: num_ids must be >= 2, got {num_ids}")
    if num_cams < 2:
        raise ValueError(f"builtin_reid: num_cams must be >= 2 (ReID needs cross-camera matches), got {num_cams}")
    if images_per_cam < 2:
        raise ValueError(f"builtin_reid: images_per_cam must be >= 2 (one query, one gallery), got {images_per_cam}")
    ntr = num_ids // 2 if num_train_ids is None else num_train_ids
    if not 1 <= ntr < num_ids:
        raise ValueError(f"builtin_reid: num_train_ids must be in 1..{num_ids - 1}, got {ntr}")
    srcs = _source_images()
    srcs = [srcs[i] for i in _SOURCE_ORDER]
    cams = _camera_params(num_cams)
    H, W = size
    rng = np.random.default_rng(seed)
    per_src = -(-num_ids // len(srcs))
    train: list[Item] = []
    query: list[Item] = []
    gallery: list[Item] = []
    for pid in range(num_ids):
        src = srcs[pid // per_src]
        region = pid % per_src
        sw, sh = src.size
        rh = 0.8 * sh
        rw = min(rh / 2.0, sw / (per_src + 0.5))
        cx = (region + 0.75) * (sw - rw) / (per_src + 0.5) + rw / 2
        cy = sh / 2
        for c, cp in enumerate(cams):
            for k in range(images_per_cam):
                jx, jy, jb = rng.uniform(-0.08, 0.08), rng.uniform(-0.08, 0.08), rng.uniform(-10, 10)
                jg = rng.uniform(0.9, 1.1, size=3)
                w, h = min(sw, rw * cp["scale"]), min(sh, rh * cp["scale"])
                x0 = float(np.clip(cx + (cp["dx"] + jx) * rw - w / 2, 0, sw - w))
                y0 = float(np.clip(cy + (cp["dy"] + jy) * rh - h / 2, 0, sh - h))
                im = src.resize((W, H), Image.BILINEAR, box=(x0, y0, x0 + w, y0 + h))
                a = np.asarray(im, dtype=np.float32) * (cp["gain"] * jg)[None, None, :] + cp["bright"] + jb
                if rng.uniform() < 0.5:
                    area = rng.uniform(0.10, 0.25) * H * W
                    bh = int(min(H, max(1, np.sqrt(area * 2))))
                    bw = int(min(W, max(1, area / bh)))
                    y, x = int(rng.integers(0, H - bh + 1)), int(rng.integers(0, W - bw + 1))
                    a[y : y + bh, x : x + bw] = rng.uniform(0, 255, size=3)
                im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
                if cp["flip"]:
                    im = im.transpose(Image.FLIP_LEFT_RIGHT)
                if pid < ntr:
                    train.append((im, pid, c))
                elif k == 0:
                    query.append((im, pid, c))
                else:
                    gallery.append((im, pid, c))
    return ReIDDataset("builtin", train, query, gallery, list(range(ntr)))


# ----------------------------------------------------------------------------- registry and torch glue

REID_DATASETS: dict[str, Callable[..., ReIDDataset]] = {
    "market1501": market1501,
    "dukemtmc": dukemtmc,
    "cuhk03-detected": lambda root: cuhk03_np(root, "detected"),
    "cuhk03-labeled": lambda root: cuhk03_np(root, "labeled"),
    "msmt17": msmt17,
    "builtin": None,  # type: ignore[dict-item]
}


def load_reid_dataset(name: str, root: str | Path | None = None, **builtin_kwargs: Any) -> ReIDDataset:
    """Load a dataset by name (``market1501``, ``dukemtmc``, ``cuhk03-detected``,
    ``cuhk03-labeled``, ``msmt17``, ``builtin``). ``root`` is required except for ``builtin``."""
    return load_by_name("ReID", REID_DATASETS, name, root, builtin_reid, builtin_kwargs)


class ReIDImageDataset(ImageDataset):
    """``torch.utils.data.Dataset`` over ``(image, pid, camid)`` items; returns
    ``(transform(image), pid, camid)``; ``image`` is a path or a PIL image."""


class PKSampler:
    """Batch sampler for triplet training: each batch holds ``p`` identities x ``k`` images.

    Identities with fewer than ``k`` images are sampled with replacement. One
    epoch visits every identity once (``len(pids) // p`` batches). Call
    :meth:`set_epoch` for a new, reproducible shuffle; under DDP give each
    rank its ``rank`` / ``world_size`` so ranks draw disjoint batches.
    """

    def __init__(self, pids: Sequence[int], p: int, k: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if p < 2 or k < 2:
            raise ValueError(f"PKSampler: p and k must be >= 2 for batch-hard triplets, got p={p}, k={k}")
        self.index: dict[int, list[int]] = {}
        for i, pid in enumerate(pids):
            self.index.setdefault(int(pid), []).append(i)
        if len(self.index) < p:
            raise ValueError(f"PKSampler: p={p} identities per batch but the data has only {len(self.index)}")
        self.p, self.k, self.seed, self.epoch = p, k, seed, 0
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index) // self.p // self.world_size

    def __iter__(self):
        rng = np.random.default_rng(self.seed + 1000003 * self.epoch)
        ids = list(self.index)
        rng.shuffle(ids)
        batches = []
        for b in range(len(ids) // self.p):
            batch = []
            for pid in ids[b * self.p : (b + 1) * self.p]:
                pool = self.index[pid]
                batch.extend(int(i) for i in rng.choice(pool, size=self.k, replace=len(pool) < self.k))
            batches.append(batch)
        n = len(self)
        yield from batches[self.rank * n : (self.rank + 1) * n]
