"""Deep-metric-learning / retrieval datasets read from their official folder layouts.

Every reader takes the dataset root and returns a :class:`RetrievalSplit`:
``train`` and ``test`` lists of ``(image, label)`` (``image`` = file path or
``PIL.Image``), the dataset's Recall@K list, and for In-shop a separate
``query`` / ``gallery``. Training labels are relabelled to ``0..C-1`` (the
classifier's targets); test labels are the original class ids. Test classes
are disjoint from training classes (the zero-shot retrieval protocol), except
In-shop whose query/gallery share the test items.

Layouts and splits (the standard ones in the metric-learning literature):

- ``cub200``: ``CUB_200_2011/`` or the root itself holding ``images.txt``
  (``<id> <relative path>``), ``image_class_labels.txt`` (``<id> <class 1..200>``)
  and ``images/``. Classes 1-100 train, 101-200 test. K = 1, 2, 4, 8, 16, 32.
- ``cars196``: ``cars_annos.mat`` (the combined annotation file; fields
  ``relative_im_path``, ``class``) and the images it names (``car_ims/``).
  Classes 1-98 train, 99-196 test. K = 1, 2, 4, 8, 16, 32.
- ``sop``: ``Stanford_Online_Products/`` or the root holding ``Ebay_train.txt`` /
  ``Ebay_test.txt`` (header line, then ``image_id class_id super_class_id path``).
  K = 1, 10, 100, 1000.
- ``inshop``: ``Eval/list_eval_partition.txt`` (or at the root; two header lines,
  then ``image_name item_id evaluation_status`` with status train/query/gallery)
  and the images it names (``img/...``). K = 1, 10, 20, 30, 40, 50.
- ``aircraft``: FGVC-Aircraft ``fgvc-aircraft-2013b/data/`` (or ``data/`` or the
  root) with ``images_variant_trainval.txt``, ``images_variant_test.txt``
  (``<image id> <variant name>``) and ``images/<id>.jpg``. Decision: the
  retrieval protocol needs disjoint train / test classes and the official files
  split images, not classes, so we take the 100 *variants* sorted by name, use
  the first 50 for training and the last 50 for testing, with every image of
  those variants from trainval + test (the split used by e.g. the
  Proxy-Anchor / "metric learning reality check" style benchmarks differs between
  papers; this one is deterministic and documented). K = 1, 2, 4, 8, 16, 32.
- ``builtin`` (:func:`builtin_retrieval`, no files): the handwritten digits of
  ``sklearn.datasets.load_digits``; digits 0-4 train, 5-9 test (searched against
  themselves minus self, like CUB's 101-200); each 8x8 image scaled to 0..255,
  upscaled (bicubic) to ``size`` x ``size`` and copied to RGB; ``per_class``
  caps the images per class (the first ones in file order). K = 1, 2, 4, 8.

Errors name the file that was expected or that is malformed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pyfici.data._image import ImageDataset
from pyfici.data._registry import load_by_name
from pyfici.data.builtin import sklearn_digits

__all__ = [
    "RetrievalSplit",
    "RetrievalImageDataset",
    "cub200",
    "cars196",
    "sop",
    "inshop",
    "aircraft",
    "load_retrieval_dataset",
    "RETRIEVAL_DATASETS",
    "RECALL_KS",
    "BuiltinRetrieval",
    "builtin_retrieval",
]

Item = tuple[Any, int]

RECALL_KS: dict[str, tuple[int, ...]] = {
    "cub200": (1, 2, 4, 8, 16, 32),
    "cars196": (1, 2, 4, 8, 16, 32),
    "aircraft": (1, 2, 4, 8, 16, 32),
    "sop": (1, 10, 100, 1000),
    "inshop": (1, 10, 20, 30, 40, 50),
    "builtin": (1, 2, 4, 8),
}


@dataclass
class RetrievalSplit:
    """A retrieval dataset: ``train`` / ``test`` lists of ``(image, label)``.

    ``query`` / ``gallery`` are set when the protocol has a separate query set
    (In-shop); otherwise the test set is searched against itself, minus self.
    """

    name: str
    train: list[Item]
    test: list[Item]
    ks: tuple[int, ...]
    query: list[Item] | None = None
    gallery: list[Item] | None = None
    info: dict = field(default_factory=dict)

    @property
    def num_train_classes(self) -> int:
        return len({y for _, y in self.train})

    def __repr__(self) -> str:
        q = f", query={len(self.query)}, gallery={len(self.gallery)}" if self.query is not None else ""
        return (f"RetrievalSplit({self.name!r}, train={len(self.train)} images / {self.num_train_classes} classes, "
                f"test={len(self.test)}{q}, ks={self.ks})")


class RetrievalImageDataset(ImageDataset):
    """``torch.utils.data.Dataset`` over ``(image, label)`` items: loads a path
    with PIL (RGB) or uses a ``PIL.Image`` as is, applies ``transform``."""


def _find(root: Path, candidates: Sequence[str], what: str) -> Path:
    for c in candidates:
        p = root / c
        if p.exists():
            return p
    raise FileNotFoundError(
        f"{what}: expected {root / candidates[0]}" + (
            f" (also looked for {', '.join(str(root / c) for c in candidates[1:])})" if len(candidates) > 1 else ""))


def _relabel(items: list[Item]) -> list[Item]:
    ids = {y: i for i, y in enumerate(sorted({y for _, y in items}))}
    return [(p, ids[y]) for p, y in items]


def _read_lines(path: Path) -> list[str]:
    try:
        return [ln for ln in path.read_text().splitlines() if ln.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a text file ({e})") from None


def _check_nonempty(name: str, items: list[Item], file: Path, what: str) -> None:
    if not items:
        raise ValueError(f"{name}: no {what} images found from {file}")


# the zero-shot class split: classes 1..first_half train, the rest test
_CLASS_SPLITS = {"cub200": (100, 200), "cars196": (98, 196)}


def _class_split(name: str, items: list[Item], source: Path) -> RetrievalSplit:
    """``items`` (path, class id from 1) split by :data:`_CLASS_SPLITS`; errors name ``source``."""
    last_train, n_classes = _CLASS_SPLITS[name]
    train = [it for it in items if it[1] <= last_train]
    test = [it for it in items if it[1] > last_train]
    _check_nonempty(name, train, source, f"training (classes 1-{last_train})")
    _check_nonempty(name, test, source, f"test (classes {last_train + 1}-{n_classes})")
    return RetrievalSplit(name, _relabel(train), test, RECALL_KS[name])


def cub200(root: str | Path) -> RetrievalSplit:
    """CUB-200-2011: classes 1-100 train, 101-200 test (see module docstring)."""
    root = Path(root)
    base = root / "CUB_200_2011" if (root / "CUB_200_2011" / "images.txt").exists() else root
    images_txt = _find(base, ["images.txt"], "cub200")
    labels_txt = _find(base, ["image_class_labels.txt"], "cub200")
    paths: dict[str, str] = {}
    for n, ln in enumerate(_read_lines(images_txt), 1):
        parts = ln.split(maxsplit=1)
        if len(parts) != 2:
            raise ValueError(f"{images_txt}:{n}: expected '<image id> <path>', got {ln!r}")
        paths[parts[0]] = parts[1].strip()
    items: list[Item] = []
    for n, ln in enumerate(_read_lines(labels_txt), 1):
        parts = ln.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise ValueError(f"{labels_txt}:{n}: expected '<image id> <class id>', got {ln!r}")
        if parts[0] not in paths:
            raise ValueError(f"{labels_txt}:{n}: image id {parts[0]} is not in {images_txt}")
        items.append((str(base / "images" / paths[parts[0]]), int(parts[1])))
    return _class_split("cub200", items, labels_txt)


def cars196(root: str | Path) -> RetrievalSplit:
    """Stanford Cars196 from ``cars_annos.mat``: classes 1-98 train, 99-196 test."""
    root = Path(root)
    mat = _find(root, ["cars_annos.mat", "devkit/cars_annos.mat"], "cars196")
    try:
        import scipy.io
    except ImportError as e:
        raise ImportError("cars196 needs scipy (pip install scipy) to read cars_annos.mat") from e
    try:
        annos = scipy.io.loadmat(str(mat), squeeze_me=True)["annotations"]
    except KeyError:
        raise ValueError(f"{mat}: no 'annotations' variable (is it cars_annos.mat?)") from None
    except Exception as e:  # scipy raises several types for a corrupt file
        raise ValueError(f"{mat}: cannot read the MATLAB file ({e})") from None
    names = annos.dtype.names or ()
    for f in ("relative_im_path", "class"):
        if f not in names:
            raise ValueError(f"{mat}: annotations lack the field {f!r} (fields: {names})")
    items = [(str(root / str(a["relative_im_path"])), int(a["class"])) for a in annos.reshape(-1)]
    return _class_split("cars196", items, mat)


def _read_sop_file(path: Path, base: Path) -> list[Item]:
    lines = _read_lines(path)
    if not lines or not lines[0].lower().startswith("image_id"):
        raise ValueError(f"{path}: expected the header 'image_id class_id super_class_id path'")
    out = []
    for n, ln in enumerate(lines[1:], 2):
        parts = ln.split()
        if len(parts) != 4 or not parts[1].isdigit():
            raise ValueError(f"{path}:{n}: expected 'image_id class_id super_class_id path', got {ln!r}")
        out.append((str(base / parts[3]), int(parts[1])))
    return out


def sop(root: str | Path) -> RetrievalSplit:
    """Stanford Online Products: Ebay_train.txt (11,318 classes) / Ebay_test.txt (11,316)."""
    root = Path(root)
    base = root / "Stanford_Online_Products" if (root / "Stanford_Online_Products" / "Ebay_train.txt").exists() else root
    tr = _find(base, ["Ebay_train.txt"], "sop")
    te = _find(base, ["Ebay_test.txt"], "sop")
    train, test = _read_sop_file(tr, base), _read_sop_file(te, base)
    _check_nonempty("sop", train, tr, "training")
    _check_nonempty("sop", test, te, "test")
    return RetrievalSplit("sop", _relabel(train), test, RECALL_KS["sop"])


def inshop(root: str | Path) -> RetrievalSplit:
    """In-shop Clothes Retrieval: list_eval_partition.txt train / query / gallery."""
    root = Path(root)
    part = _find(root, ["Eval/list_eval_partition.txt", "list_eval_partition.txt"], "inshop")
    lines = _read_lines(part)
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise ValueError(f"{part}: expected a count line, a header line, then 'image_name item_id evaluation_status'")
    split: dict[str, list[tuple[str, str]]] = {"train": [], "query": [], "gallery": []}
    for n, ln in enumerate(lines[2:], 3):
        parts = ln.split()
        if len(parts) != 3 or parts[2] not in split:
            raise ValueError(f"{part}:{n}: expected 'image_name item_id train|query|gallery', got {ln!r}")
        split[parts[2]].append((str(root / parts[0]), parts[1]))
    for k in split:
        _check_nonempty("inshop", split[k], part, k)  # type: ignore[arg-type]
    ids = {s: i for i, s in enumerate(sorted({y for _, y in split["query"]} | {y for _, y in split["gallery"]}))}
    query = [(p, ids[y]) for p, y in split["query"]]
    gallery = [(p, ids[y]) for p, y in split["gallery"]]
    train = _relabel(split["train"])  # type: ignore[arg-type]
    return RetrievalSplit("inshop", train, query + gallery, RECALL_KS["inshop"], query=query, gallery=gallery)


def aircraft(root: str | Path) -> RetrievalSplit:
    """FGVC-Aircraft variants, first 50 (sorted by name) train / last 50 test (see module docstring)."""
    root = Path(root)
    data = None
    for c in ("fgvc-aircraft-2013b/data", "data", "."):
        if (root / c / "images_variant_trainval.txt").exists():
            data = root / c
            break
    if data is None:
        raise FileNotFoundError(f"aircraft: expected {root / 'fgvc-aircraft-2013b/data/images_variant_trainval.txt'} "
                                f"(also looked in {root / 'data'} and {root})")
    items: list[tuple[str, str]] = []
    for fname in ("images_variant_trainval.txt", "images_variant_test.txt"):
        f = data / fname
        if not f.exists():
            raise FileNotFoundError(f"aircraft: expected {f}")
        for n, ln in enumerate(_read_lines(f), 1):
            parts = ln.split(maxsplit=1)
            if len(parts) != 2:
                raise ValueError(f"{f}:{n}: expected '<image id> <variant>', got {ln!r}")
            items.append((str(data / "images" / f"{parts[0]}.jpg"), parts[1].strip()))
    variants = sorted({v for _, v in items})
    if len(variants) < 2:
        raise ValueError(f"aircraft: need at least 2 variants in {data}, found {len(variants)}")
    half = len(variants) // 2
    vid = {v: i for i, v in enumerate(variants)}
    train = [(p, vid[v]) for p, v in items if vid[v] < half]
    test = [(p, vid[v]) for p, v in items if vid[v] >= half]
    return RetrievalSplit("aircraft", _relabel(train), test, RECALL_KS["aircraft"],
                          info={"train_variants": variants[:half], "test_variants": variants[half:]})


def _digits(size: int, per_class: int | None) -> list[tuple[Any, int]]:
    """The digits as RGB ``size`` x ``size`` PIL images (0..16 scaled to 0..255, bicubic),
    the first ``per_class`` of each class in file order."""
    from PIL import Image

    images, targets = sklearn_digits()
    counts: dict[int, int] = {}
    items = []
    for img, y in zip(images, targets):
        y = int(y)
        if per_class is not None and counts.get(y, 0) >= per_class:
            continue
        counts[y] = counts.get(y, 0) + 1
        a = (img * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        items.append((Image.fromarray(a).resize((size, size), Image.BICUBIC).convert("RGB"), y))
    return items


def builtin_retrieval(size: int = 64, per_class: int | None = 60) -> RetrievalSplit:
    """The built-in retrieval task (see the module docstring): digits 0-4 train
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


def _builtin(root: str | Path | None = None, **kwargs: Any) -> RetrievalSplit:
    return builtin_retrieval(**kwargs)


RETRIEVAL_DATASETS: dict[str, Callable[..., RetrievalSplit]] = {
    "cub200": cub200,
    "cars196": cars196,
    "sop": sop,
    "inshop": inshop,
    "aircraft": aircraft,
    "builtin": _builtin,
}


def load_retrieval_dataset(name: str, root: str | Path | None = None, **builtin_kwargs: Any) -> RetrievalSplit:
    """Read dataset ``name`` (``cub200``, ``cars196``, ``sop``, ``inshop``, ``aircraft``,
    ``builtin``) from ``root`` (required except for ``builtin``)."""
    return load_by_name("retrieval", RETRIEVAL_DATASETS, name, root, _builtin, builtin_kwargs)
