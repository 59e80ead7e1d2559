"""scikit-image's LBP frontal-face cascade as a face detector: the detector
``pyfici deid`` used before dlib's CNN detector was ported
(:mod:`pyfici.models.dlib_mmod`, the default now); kept as a comparison
(tests/data/measure_detection_recall.py) and as an alternative ``detector``
for :func:`pyfici.methods.ficgan.deid.deidentify`.

Images are float32 ``[H, W, 3]`` arrays in [0, 1]; boxes are
:class:`FaceBox` (row, col, height, width) in pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from pyfici.errors import require


@dataclass
class FaceBox:
    r: int
    c: int
    h: int
    w: int
    score: int = 1  # number of raw detections merged into this one

    def to_dict(self) -> dict:
        return asdict(self)


Detector = Callable[[np.ndarray], list[FaceBox]]


def _iou(a: FaceBox, b: FaceBox) -> float:
    r0, c0 = max(a.r, b.r), max(a.c, b.c)
    r1, c1 = min(a.r + a.h, b.r + b.h), min(a.c + a.w, b.c + b.w)
    inter = max(0, r1 - r0) * max(0, c1 - c0)
    return inter / float(a.h * a.w + b.h * b.w - inter)


def merge_boxes(boxes: list[FaceBox], iou: float = 0.3) -> list[FaceBox]:
    """Group overlapping raw detections (IoU > ``iou``) and average each group;
    ``score`` = group size. Sorted by score then size, largest first."""
    groups: list[list[FaceBox]] = []
    for b in sorted(boxes, key=lambda b: -b.h * b.w):
        for g in groups:
            if _iou(g[0], b) > iou:
                g.append(b)
                break
        else:
            groups.append([b])
    out = []
    for g in groups:
        out.append(FaceBox(int(round(np.mean([b.r for b in g]))), int(round(np.mean([b.c for b in g]))),
                           int(round(np.mean([b.h for b in g]))), int(round(np.mean([b.w for b in g]))), len(g)))
    return sorted(out, key=lambda b: (-b.score, -b.h * b.w))


class LBPCascadeDetector:
    """scikit-image's LBP frontal-face cascade (``lbp_frontal_face_cascade_filename``).
    Its smallest window is 24x24 pixels: smaller faces are not found."""

    name = "skimage LBP frontal-face cascade"

    def __init__(self, scale_factor: float = 1.2, step_ratio: float = 1.0, min_size: int = 24,
                 max_size: int | None = None, min_neighbors: int = 1):
        sd = require("skimage.data", "data", "the scikit-image face detector")
        Cascade = require("skimage.feature", "data", "the scikit-image face detector").Cascade

        self.cascade = Cascade(sd.lbp_frontal_face_cascade_filename())
        self.scale_factor, self.step_ratio = scale_factor, step_ratio
        self.min_size, self.max_size, self.min_neighbors = min_size, max_size, min_neighbors

    def __call__(self, img: np.ndarray) -> list[FaceBox]:
        if img.dtype == np.uint8:
            img = img.astype(np.float32) / 255.0
        h, w = img.shape[:2]
        mx = self.max_size or min(h, w)
        if min(h, w) < self.min_size:
            return []
        dets = self.cascade.detect_multi_scale(img=np.ascontiguousarray(img, dtype=np.float32), scale_factor=self.scale_factor,
                                               step_ratio=self.step_ratio, min_size=(self.min_size, self.min_size),
                                               max_size=(mx, mx))
        raw = [FaceBox(d["r"], d["c"], d["height"], d["width"]) for d in dets]
        return [b for b in merge_boxes(raw) if b.score >= self.min_neighbors]
