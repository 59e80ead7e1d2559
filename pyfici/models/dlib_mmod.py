"""dlib's CNN face detector (``mmod_human_face_detector.dat``, max-margin
object detection) as a torch module, without dlib.

The file ships in the CC0 PyPI package ``face-recognition-models`` and uses
the serialisation read by :mod:`pyfici.models.dlib_face` (same integer,
float and tensor encodings, same nested ``add_layer`` layout); only the loss
record (``loss_mmod_`` with its detector-window options) and the input record
(``input_rgb_image_pyramid``) differ.

Network (what the file holds, checked when it is read): input RGB,
``(pixel - mean) / 256``; a "downsampler" of three 5x5 stride-2 convolutions
(16, 32, 32 filters, no padding), each followed by a per-channel affine and
ReLU; three 5x5 convolutions with 45 filters and padding 2 (affine, ReLU); a
9x9 convolution with one filter and padding 4 giving the score map.

Detection follows dlib's ``loss_mmod_::to_label`` with its input layer:

1. The image pyramid: the normalised image and its pyramid levels (each
   level 5/6 of the previous one, ``floor``ed, while at least 5 rows remain),
   laid out in one tiled canvas as ``compute_tiled_image_pyramid_details`` does
   (levels down the left column, the rest doubling back up the right side;
   10 px between levels, 11 px outer border, zeros elsewhere). Each level is a
   bilinear (corner-aligned) resize of the previous level.
2. One forward pass over the canvas. Every score-map cell with a score above
   the threshold is a detection: its centre is mapped back through the layers
   (``p * stride - padding + kernel // 2``, last layer first), the 80x80
   detector window is centred on it, the window is assigned to the nearest
   pyramid level and mapped up to image coordinates
   (``p * 6/5 + 0.3`` per level), and rounded (``lround``) to an integer box.
3. Non-maximum suppression, greedy by descending score: a box is dropped when
   it overlaps a kept box with intersection / (area of the bounding box of
   the pair) above 0.338 (dlib's ``test_box_overlap`` thresholds, read from
   the file).

``upsample`` repeats dlib's Python binding: the image is first enlarged
``upsample`` times by ``pyramid_up`` (x2, bilinear) and the boxes mapped back
with ``rect_down``; it finds faces down to about 40 px per step (80 px at 0).

Boxes are dlib rectangles ``(left, top, right, bottom)`` with inclusive
integer corners; :class:`Detections` also gives them as ``xyxy`` with an
exclusive right/bottom edge.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pyfici.models.dlib_face import (
    DlibFormatError,
    LayerRecord,
    _Reader,
    find_dlib_model_file,
    read_dlib_layers,
)

MMOD_FILE = "mmod_human_face_detector.dat"


@dataclass
class DlibMMODFile:
    """Everything :func:`read_dlib_mmod` read from the file."""

    path: str
    size: int
    windows: list[tuple[int, int]]  # detector windows (width, height)
    options: dict
    input: dict
    versions: list[int]
    layers: list[LayerRecord]


def read_dlib_mmod(path: str | os.PathLike | None = None) -> DlibMMODFile:
    """Parse ``mmod_human_face_detector.dat`` (default: the copy in
    ``face-recognition-models``); every byte is accounted for.

    Raises :class:`~pyfici.models.dlib_face.DlibFormatError` naming the byte
    offset when the file is not a dlib MMOD network, ``FileNotFoundError`` when
    it is missing."""
    path = Path(path) if path is not None else find_dlib_model_file(MMOD_FILE)
    data = path.read_bytes()
    r = _Reader(data, str(path))
    if r.int() != 1:
        raise r.fail("expected add_loss_layer version 1")
    kind = r.str()
    if kind != "loss_mmod_":
        raise r.fail(f"expected 'loss_mmod_', found {kind!r} (not a dlib MMOD detector)")
    version = r.int()
    if not 1 <= version <= 4:
        raise r.fail(f"mmod_options version {version}, expected 1..4")
    windows = []
    if version == 1:
        windows.append((r.int(), r.int()))
    else:
        n = r.int()
        if not 0 < n < 1000:
            raise r.fail(f"bad number of detector windows {n}")
        for _ in range(n):
            v = r.int()
            w, h = r.int(), r.int()
            if v >= 2:
                r.str(256)
            windows.append((w, h))
    opts = {"loss_per_false_alarm": r.float(), "loss_per_missed_target": r.float(),
            "truth_match_iou_threshold": r.float(),
            "nms_iou": r.float(), "nms_percent_covered": r.float(),
            "ignore_iou": r.float(), "ignore_percent_covered": r.float(),
            "use_bounding_box_regression": False}
    if version >= 3:
        r.int()  # assume_image_pyramid (uint8)
    if version >= 4:
        opts["use_bounding_box_regression"] = r.bool()
        opts["bbr_lambda"] = r.float()

    def read_input(r: _Reader) -> dict:
        kind = r.str()
        if kind not in ("input_rgb_image_pyramid", "input_rgb_image_pyramid2"):
            raise r.fail(f"expected 'input_rgb_image_pyramid', found {kind!r}")
        inp = {"mean": (r.float(), r.float(), r.float()), "padding": 10, "outer_padding": 11}
        if kind == "input_rgb_image_pyramid2":
            inp["padding"], inp["outer_padding"] = r.int(), r.int()
        return inp

    versions, inp, layers = read_dlib_layers(r, read_input)
    return DlibMMODFile(str(path), len(data), windows, opts, inp, versions, layers)


# --------------------------------------------------------------------------- geometry (dlib's)

PYRAMID_N = 6  # pyramid_down<6>: each level 5/6 of the previous one


def tiled_pyramid_layout(nr: int, nc: int, padding: int = 10, outer_padding: int = 11
                         ) -> tuple[list[tuple[int, int, int, int]], int, int]:
    """dlib's ``compute_tiled_image_pyramid_details`` for ``pyramid_down<6>``.

    Returns (rects, canvas_rows, canvas_cols); each rect is
    ``(left, top, right, bottom)`` inclusive, level 0 first."""
    if nr * nc == 0:
        return [], 0, 0
    sizes = [(nc, nr)]
    rate = (PYRAMID_N - 1.0) / PYRAMID_N
    r_, c_ = nr, nc
    while True:
        r_, c_ = math.floor(rate * r_), math.floor(rate * c_)
        if r_ * c_ == 0 or r_ < 5:
            break
        sizes.append((c_, r_))
    total_height = sum(h + padding for _, h in sizes) - 2 * padding
    w0, h0 = sizes[0]
    height, prev_width = 0, 0
    for w, h in sizes:
        if w <= w0 - prev_width - padding and (height - h0) * 2 >= total_height - h0:
            break
        height += h + padding
        prev_width = w
    height -= padding
    width = w0
    canvas_r, canvas_c = height + 2 * outer_padding, width + 2 * outer_padding
    rects: list[tuple[int, int, int, int]] = []
    y, i = outer_padding, 0
    while y < height + outer_padding and i < len(sizes):
        w, h = sizes[i]
        rects.append((outer_padding, y, outer_padding + w - 1, y + h - 1))
        y += h + padding
        i += 1
    y -= padding
    first = rects[0]
    while i < len(sizes):
        w, h = sizes[i]
        # rectangle(p1, p2) with p1 = (outer + width - 1, y - 1), p2 = p1 - br_corner
        x1, y1 = outer_padding + width - 1, y - 1
        x0, y0 = x1 - (w - 1), y1 - (h - 1)
        if not (x1 < first[0] or x0 > first[2] or y1 < first[1] or y0 > first[3]):
            break  # would intersect the full-size level
        rects.append((x0, y0, x1, y1))
        y -= h + padding
        i += 1
    return rects, canvas_r, canvas_c


def _lround(x: np.ndarray) -> np.ndarray:
    """C's lround: halves away from zero."""
    return np.where(x >= 0, np.floor(x + 0.5), np.ceil(x - 0.5)).astype(np.int64)


def _box_overlaps(a: np.ndarray, b: np.ndarray, iou: float, covered: float) -> np.ndarray:
    """dlib's ``test_box_overlap`` of box ``a`` [4] against boxes ``b`` [M, 4]
    (inclusive integer corners): intersection / area of the pair's bounding box
    > ``iou``, or intersection / either area > ``covered``."""
    iw = np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]) + 1
    ih = np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]) + 1
    inner = np.where((iw > 0) & (ih > 0), iw * ih, 0).astype(np.float64)
    ow = np.maximum(a[2], b[:, 2]) - np.minimum(a[0], b[:, 0]) + 1
    oh = np.maximum(a[3], b[:, 3]) - np.minimum(a[1], b[:, 1]) + 1
    area_a = float((a[2] - a[0] + 1) * (a[3] - a[1] + 1))
    area_b = ((b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)).astype(np.float64)
    hit = (inner / (ow * oh) > iou) | (inner / area_a > covered) | (inner / area_b > covered)
    return (inner > 0) & hit


def nms_dlib(boxes: np.ndarray, scores: np.ndarray, iou: float, covered: float = 1.0) -> np.ndarray:
    """Greedy NMS in descending score order with dlib's overlap test; returns
    the kept indices (into ``boxes``) in descending score order. Equal scores
    keep the earlier index first."""
    order = np.argsort(-scores, kind="stable")
    kept: list[int] = []
    for i in order:
        if kept and _box_overlaps(boxes[i], boxes[kept], iou, covered).any():
            continue
        kept.append(int(i))
    return np.asarray(kept, dtype=np.int64)


def pyramid_up_size(nr: int, nc: int) -> tuple[int, int]:
    """Size of dlib's ``pyramid_up(img, pyramid_down<2>)`` output: the image
    rectangle mapped up by ``(p + (1.25, 0.75)) * 2`` and rounded."""
    right = int(_lround(np.array([(nc - 1 + 1.25) * 2]))[0])
    bottom = int(_lround(np.array([(nr - 1 + 0.75) * 2]))[0])
    return bottom + 1, right + 1


def _resize_corners(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """dlib's bilinear ``resize_image``: source = dest * (in - 1) / (out - 1)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


# --------------------------------------------------------------------------- module


def _affine_of(rec: LayerRecord) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(rec.arrays["gamma"].copy()).view(1, -1, 1, 1),
            torch.from_numpy(rec.arrays["beta"].copy()).view(1, -1, 1, 1))


@dataclass
class Detections:
    """Faces found in one image: ``boxes`` int64 ``[n, 4]`` dlib rectangles
    (left, top, right, bottom; inclusive), ``scores`` float ``[n]`` (descending)."""

    boxes: np.ndarray
    scores: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def xyxy(self) -> np.ndarray:
        """``[n, 4]`` float (x0, y0, x1, y1) with exclusive x1, y1."""
        b = self.boxes.astype(np.float64).reshape(-1, 4).copy()
        b[:, 2:] += 1
        return b

    def __len__(self) -> int:
        return len(self.scores)


class DlibMMODDetector(nn.Module):
    """dlib's CNN face detector (no dlib at run time).

    ``forward(x)``: ``x`` float32 ``[N, 3, H, W]`` already normalised
    (``(pixel - mean) / 256``), returns the score map ``[N, 1, h, w]``.
    :meth:`detect` takes uint8 RGB images and returns :class:`Detections`.
    """

    def __init__(self, net: DlibMMODFile | None = None):
        super().__init__()
        net = net if net is not None else read_dlib_mmod()
        kinds = [r.kind for r in net.layers]
        conv = ("con_4", "con_5", "con_6")
        expect = [k for _ in range(6) for k in ("conv", "affine_", "relu_")] + ["conv"]
        got = ["conv" if k in conv else k for k in kinds]
        if got != expect:
            raise DlibFormatError(f"{net.path}: unexpected MMOD layer sequence {kinds}")
        if net.options["use_bounding_box_regression"]:
            raise DlibFormatError(f"{net.path}: detectors with bounding-box regression are not supported")
        self.convs = nn.ModuleList()
        self._geometry = []  # (stride, padding, kernel) per conv, input first
        for rec in net.layers:
            if rec.kind in conv:
                w = torch.from_numpy(rec.arrays["weight"].copy())
                g = rec.ints
                c = nn.Conv2d(w.shape[1], w.shape[0], (g["nr"], g["nc"]), (g["stride_y"], g["stride_x"]),
                              (g["padding_y"], g["padding_x"]), bias=True)
                with torch.no_grad():
                    c.weight.copy_(w)
                    c.bias.copy_(torch.from_numpy(rec.arrays["bias"].copy()))
                self.convs.append(c)
                self._geometry.append(((g["stride_x"], g["stride_y"]), (g["padding_x"], g["padding_y"]),
                                       (g["nc"], g["nr"])))
        for j, rec in enumerate(r for r in net.layers if r.kind == "affine_"):
            gamma, beta = _affine_of(rec)
            self.register_buffer(f"gamma{j}", gamma)
            self.register_buffer(f"beta{j}", beta)
        self.register_buffer("mean", torch.tensor(net.input["mean"], dtype=torch.float32).view(1, 3, 1, 1))
        if len(net.windows) != 1:
            raise DlibFormatError(f"{net.path}: expected one detector window, found {net.windows}")
        self.window = net.windows[0]
        self.padding, self.outer_padding = net.input["padding"], net.input["outer_padding"]
        self.nms_iou = net.options["nms_iou"]
        self.nms_covered = net.options["nms_percent_covered"]
        self.path = net.path
        self._folded: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._folded is None or self._folded[0][0].device != x.device:
            self._fold()
        x = x.contiguous(memory_format=torch.channels_last)
        for j, (w, b) in enumerate(self._folded):
            x = F.conv2d(x, w, b, self.convs[j].stride, self.convs[j].padding)
            if j < 6:
                x = F.relu_(x)
        return x

    def _fold(self) -> None:
        """Each per-channel affine folded into the convolution before it
        (``conv(x) * g + b == conv_{w * g}(x) + (bias * g + b)``): one pass over
        the activations less per layer, same result to float rounding."""
        folded = []
        for j, c in enumerate(self.convs):
            w, b = c.weight, c.bias
            if j < 6:
                g, beta = getattr(self, f"gamma{j}").flatten(), getattr(self, f"beta{j}").flatten()
                w, b = w * g.view(-1, 1, 1, 1), b * g + beta
            folded.append((w.contiguous(memory_format=torch.channels_last), b.contiguous()))
        self._folded = folded

    def output_to_input(self, c: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map score-map cells (column, row) to canvas coordinates, last layer first."""
        x, y = c.astype(np.float64), r.astype(np.float64)
        for (sx, sy), (px, py), (kx, ky) in reversed(self._geometry):
            x = x * sx - px + kx // 2
            y = y * sy - py + ky // 2
        return x, y

    def _fits(self, h: int, w: int) -> bool:
        """Whether every layer has at least one output cell for an [h, w] input."""
        for (sx, sy), (px, py), (kx, ky) in self._geometry:
            h, w = (h + 2 * py - ky) // sy + 1, (w + 2 * px - kx) // sx + 1
            if h < 1 or w < 1:
                return False
        return True

    # ---------------------------------------------------------------- canvas

    def build_canvas(self, images: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
        """``images`` float ``[N, 3, H, W]`` RGB in 0..255 -> the tiled pyramid
        canvas ``[N, 3, R, C]`` (normalised) and the level rectangles."""
        n, _, h, w = images.shape
        rects, cr, cc = tiled_pyramid_layout(h, w, self.padding, self.outer_padding)
        # channels-last (the layout the convolutions run in), so the canvas is not copied again
        canvas = images.new_zeros((n, cr, cc, 3)).permute(0, 3, 1, 2)
        if not rects:
            return canvas, rects
        lvl = (images.float() - self.mean.to(images.device)) / 256.0
        for i, (x0, y0, x1, y1) in enumerate(rects):
            if i > 0:
                lvl = _resize_corners(lvl, (y1 - y0 + 1, x1 - x0 + 1))
            canvas[:, :, y0:y1 + 1, x0:x1 + 1] = lvl
        return canvas, rects

    def _to_dets(self, score: np.ndarray, rects, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        rr, cc = np.nonzero(score > threshold)
        s = score[rr, cc].astype(np.float64)
        if len(s) == 0:
            return np.zeros((0, 4), np.int64), s
        x, y = self.output_to_input(cc, rr)
        ww, wh = self.window[0] - 1.0, self.window[1] - 1.0
        x0, t, r_, b = x - ww / 2, y - wh / 2, x + ww / 2, y + wh / 2
        # nearest level to the (rounded) window centre
        px = np.floor((x0 + r_) / 2 + 0.5)
        py = np.floor((t + b) / 2 + 0.5)
        R = np.asarray(rects, dtype=np.float64)  # [L, 4]
        dx = np.maximum(np.maximum(R[None, :, 0] - px[:, None], px[:, None] - R[None, :, 2]), 0)
        dy = np.maximum(np.maximum(R[None, :, 1] - py[:, None], py[:, None] - R[None, :, 3]), 0)
        dist = np.sqrt(dx * dx + dy * dy)
        inside = dist == 0
        level = np.where(inside.any(1), inside.argmax(1), dist.argmin(1))
        ox, oy = R[level, 0], R[level, 1]
        ratio = PYRAMID_N / (PYRAMID_N - 1.0)
        pts = [x0 - ox, t - oy, r_ - ox, b - oy]
        for k in range(int(level.max())):
            m = level > k  # point_up applied ``level`` times per detection
            pts = [np.where(m, p * ratio + 0.3, p) for p in pts]
        boxes = np.stack([_lround(p) for p in pts], 1)
        return boxes, s

    @torch.no_grad()
    def detect(self, images, threshold: float = 0.0, upsample: int = 0, batch_size: int = 8,
               scale: float | None = None) -> list[Detections]:
        """Faces in uint8 RGB images (``[H, W, 3]`` numpy arrays, a list of them,
        or a uint8 tensor ``[N, H, W, 3]``).

        ``threshold``: keep cells scoring above it (dlib's default 0; lower finds
        more faces and more false alarms). ``upsample``: enlarge the image that
        many times by 2 first (dlib's ``upsample_num_times``). ``scale``: instead
        of ``upsample``, resize the image by this factor first (bilinear,
        antialiased when shrinking; boxes mapped back to the image), so that the
        smallest face found is about ``80 / scale`` pixels for any factor, not only
        powers of 2. Images of the same
        size go through the network together, ``batch_size`` at a time, on this
        module's device. Returns one :class:`Detections` per image."""
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        if isinstance(images, torch.Tensor):
            if images.dim() != 4 or images.shape[-1] != 3:
                raise ValueError(f"images: expected a uint8 tensor [N, H, W, 3], got shape {tuple(images.shape)}")
            images = list(images.cpu().numpy())
        arrs = []
        for i, im in enumerate(images):
            a = np.asarray(im)
            if a.ndim == 2:
                a = np.repeat(a[..., None], 3, -1)
            if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
                raise ValueError(f"images[{i}]: expected uint8 RGB [H, W, 3], got {a.dtype} {a.shape}")
            arrs.append(a)
        if int(upsample) != upsample or upsample < 0:
            raise ValueError(f"upsample: expected an integer >= 0, got {upsample!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if scale is not None:
            if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
                raise ValueError(f"scale: expected a finite number > 0, got {scale!r}")
            if upsample:
                raise ValueError(f"scale and upsample: give one of them, got scale={scale!r}, upsample={upsample!r}")
            scale = float(scale)
        dev = self.mean.device
        out: list[Detections | None] = [None] * len(arrs)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, a in enumerate(arrs):
            groups.setdefault(a.shape[:2], []).append(i)
        for idx in groups.values():
            for s in range(0, len(idx), batch_size):
                part = idx[s:s + batch_size]
                x = torch.from_numpy(np.stack([arrs[i] for i in part])).to(dev).permute(0, 3, 1, 2).float()
                for _ in range(upsample):
                    # dlib's RGB resize truncates to uint8
                    x = _resize_corners(x, pyramid_up_size(x.shape[2], x.shape[3])).floor().clamp(0, 255)
                if scale is not None and scale != 1.0:
                    size = (max(1, round(x.shape[2] * scale)), max(1, round(x.shape[3] * scale)))
                    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
                canvas, rects = self.build_canvas(x)
                if not rects or not self._fits(canvas.shape[2], canvas.shape[3]):
                    for i in part:
                        out[i] = Detections(np.zeros((0, 4), np.int64), np.zeros(0))
                    continue
                scores = self(canvas)[:, 0].float().cpu().numpy()
                for j, i in enumerate(part):
                    boxes, sc = self._to_dets(scores[j], rects, threshold)
                    keep = nms_dlib(boxes, sc, self.nms_iou, self.nms_covered) if len(sc) else np.zeros(0, np.int64)
                    boxes, sc = boxes[keep], sc[keep]
                    if upsample and len(sc):
                        b = boxes.astype(np.float64)
                        for _ in range(upsample):
                            b = b / 2.0 - np.array([1.25, 0.75, 1.25, 0.75])
                        boxes = _lround(b)
                    if scale is not None and scale != 1.0 and len(sc):
                        # pixel edges l - 0.5 and r + 0.5 mapped by (u + 0.5) / scale - 0.5
                        b = boxes.astype(np.float64)
                        boxes = _lround(np.stack([b[:, 0] / scale, b[:, 1] / scale,
                                                  (b[:, 2] + 1) / scale - 1, (b[:, 3] + 1) / scale - 1], 1))
                    out[i] = Detections(boxes.reshape(-1, 4), sc, {"upsample": upsample, "threshold": threshold,
                                                                   "scale": scale})
        return out  # type: ignore[return-value]


_CACHE: dict[str, DlibMMODDetector] = {}


def load_dlib_mmod(path: str | os.PathLike | None = None) -> DlibMMODDetector:
    """Read and build :class:`DlibMMODDetector` (cached per path, on the CPU;
    ``.to(device)`` a copy for the GPU)."""
    key = str(path) if path is not None else str(find_dlib_model_file(MMOD_FILE))
    if key not in _CACHE:
        _CACHE[key] = DlibMMODDetector(read_dlib_mmod(key))
    return _CACHE[key]


__all__ = ["Detections", "DlibMMODDetector", "DlibMMODFile", "load_dlib_mmod", "nms_dlib", "read_dlib_mmod",
           "tiled_pyramid_layout"]
