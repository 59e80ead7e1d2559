"""Faces in photos: detection (scikit-image's LBP frontal-face cascade or a
user-supplied detector), square crops for the generator, paste-back with a
feathered elliptical blend, and blurring of faces too small to process.

Images are float32 ``[H, W, 3]`` arrays in [0, 1]; boxes are
:class:`FaceBox` (row, col, height, width) in pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F


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
        import skimage.data as sd
        from skimage.feature import Cascade

        self.cascade = Cascade(sd.lbp_frontal_face_cascade_filename())
        self.scale_factor, self.step_ratio = scale_factor, step_ratio
        self.min_size, self.max_size, self.min_neighbors = min_size, max_size, min_neighbors

    def __call__(self, img: np.ndarray) -> list[FaceBox]:
        h, w = img.shape[:2]
        mx = self.max_size or min(h, w)
        if min(h, w) < self.min_size:
            return []
        dets = self.cascade.detect_multi_scale(img=np.ascontiguousarray(img, dtype=np.float32), scale_factor=self.scale_factor,
                                               step_ratio=self.step_ratio, min_size=(self.min_size, self.min_size),
                                               max_size=(mx, mx))
        raw = [FaceBox(d["r"], d["c"], d["height"], d["width"]) for d in dets]
        return [b for b in merge_boxes(raw) if b.score >= self.min_neighbors]


def crop_box(box: FaceBox, margin: float = 1.3) -> tuple[int, int, int]:
    """Square crop (top, left, side) around a detection, ``margin`` x its size,
    centred on the box (may extend past the image: see :func:`extract_crop`)."""
    side = int(round(max(box.h, box.w) * margin))
    cy, cx = box.r + box.h / 2, box.c + box.w / 2
    return int(round(cy - side / 2)), int(round(cx - side / 2)), side


def extract_crop(img: np.ndarray, top: int, left: int, side: int, size: int) -> torch.Tensor:
    """Square crop (edge-replicated outside the image) -> ``[3, size, size]`` in [-1, 1]."""
    h, w = img.shape[:2]
    pad = max(0, -top, -left, top + side - h, left + side - w)
    src = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="edge") if pad else img
    c = src[top + pad : top + pad + side, left + pad : left + pad + side]
    t = torch.from_numpy(np.ascontiguousarray(c)).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return t[0].clamp(0, 1) * 2 - 1


def feather_mask(side: int, feather: float = 0.12) -> np.ndarray:
    """``[side, side]`` float mask: 1 inside an ellipse filling ~90% of the
    square, falling smoothly to 0 over ``feather`` x side."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float64)
    c = (side - 1) / 2
    r = np.sqrt(((y - c) / (0.46 * side)) ** 2 + ((x - c) / (0.42 * side)) ** 2)
    return np.clip((1.0 - r) / feather + 0.5, 0.0, 1.0).astype(np.float32)


def paste_crop(img: np.ndarray, face: torch.Tensor, top: int, left: int, side: int) -> None:
    """Blend ``face`` (``[3, S, S]`` in [-1, 1]) into ``img`` (a copy owned by the
    caller, modified in place) at the square (top, left, side)."""
    h, w = img.shape[:2]
    f = F.interpolate(((face.float().cpu()[None] + 1) / 2).clamp(0, 1), size=(side, side), mode="bilinear",
                      align_corners=False, antialias=True)[0].permute(1, 2, 0).numpy()
    m = feather_mask(side)[..., None]
    r0, c0 = max(0, top), max(0, left)
    r1, c1 = min(h, top + side), min(w, left + side)
    if r1 <= r0 or c1 <= c0:
        return
    fs = f[r0 - top : r1 - top, c0 - left : c1 - left]
    ms = m[r0 - top : r1 - top, c0 - left : c1 - left]
    img[r0:r1, c0:c1] = ms * fs + (1 - ms) * img[r0:r1, c0:c1]


def blur_box(img: np.ndarray, box: FaceBox, margin: float = 1.2) -> None:
    """Strong Gaussian blur of the (enlarged) box region in place (sigma = side/4),
    blended with the feathered mask. Used for faces too small to re-generate."""
    from scipy.ndimage import gaussian_filter

    top, left, side = crop_box(box, margin)
    h, w = img.shape[:2]
    r0, c0, r1, c1 = max(0, top), max(0, left), min(h, top + side), min(w, left + side)
    if r1 <= r0 or c1 <= c0:
        return
    region = img[r0:r1, c0:c1]
    sigma = max(2.0, side / 4)
    blurred = np.stack([gaussian_filter(region[..., ch], sigma, mode="nearest") for ch in range(3)], -1)
    m = feather_mask(side, feather=0.3)[r0 - top : r1 - top, c0 - left : c1 - left][..., None]
    img[r0:r1, c0:c1] = m * blurred + (1 - m) * region
