"""The stages of de-identifying photos, each its own function.

``read -> detect -> align -> embed -> partition -> generate -> paste back ->
write + report``. The generator is the only method-specific stage (FICGAN's
composition lives in :mod:`pyfici.methods.ficgan.deid`); everything here
works on plain arrays:

- :func:`read_images`: files (never modified) -> :class:`SourceImage` (uint8
  RGB pixels, the file's format, a processing scale for ``max_res``);
- :func:`detect_faces`: dlib's CNN detector (:mod:`pyfici.models.dlib_mmod`)
  or any callable; detections in a band below the threshold are kept as
  "uncertain" so that the fallback can hide them;
- :func:`align_faces`: 5 landmarks (:mod:`pyfici.models.dlib_shape`), the
  generator crop and the recognizer chip from the same landmarks, and the
  decision per face: ``deidentify`` or a fallback with its reason (too small,
  uncertain score, failed alignment);
- :func:`partition_identities`: k-Same over identities
  (:func:`pyfici.deid.k_same`), spherical-mean surrogates;
- :func:`compose_output`: paste-back of generated crops
  (:func:`pyfici.deid.align.paste_back`) and fallbacks
  (:func:`pyfici.deid.align.obfuscate`) into a copy of the image;
- :func:`write_image`: the input's format (JPEG in, JPEG out at ``quality``),
  without EXIF or other metadata, atomically.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pyfici.deid import check_k_anonymity, k_same
from pyfici.deid.align import (
    FICGAN_CROP_PADDING,
    FICGAN_CROP_SHIFT,
    RECOGNIZER_CHIP,
    extract_chips,
    face_chip_transform,
    obfuscate,
    paste_back,
)
from pyfici.errors import UserError

READ_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
FALLBACKS = ("blur", "pixelate", "fill", "keep")
# PIL format name -> what is written back (formats PIL cannot write become PNG)
_WRITE_FORMATS = {"JPEG": "JPEG", "PNG": "PNG", "BMP": "BMP", "TIFF": "TIFF", "WEBP": "WEBP"}


def display_name(name: str) -> str:
    """A file name that is valid UTF-8 text (undecodable bytes shown as ``\\xNN``)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


# --------------------------------------------------------------------------- read


@dataclass
class SourceImage:
    """One input image: ``pixels`` uint8 ``[H, W, 3]`` RGB at full resolution,
    ``name`` relative to the input folder (may hold undecodable bytes as
    surrogates), ``format`` the PIL format read, ``scale`` <= 1 the factor of
    the processing copy (``max_res``)."""

    name: str
    path: str | None
    pixels: np.ndarray
    format: str
    scale: float = 1.0
    notes: list[str] = field(default_factory=list)
    max_res: int | None = None  # cap on the longer side of any copy scanned for faces


def read_image_file(path: str | os.PathLike, name: str | None = None) -> SourceImage:
    """Read one file with PIL (the file is only read); alpha is composited over
    mid-grey, grey and palette images become RGB. Raises :class:`UserError`
    naming the file when it is not a readable image."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path)
    notes: list[str] = []
    try:
        with Image.open(p) as im:
            fmt = im.format or "PNG"
            im = ImageOps.exif_transpose(im)  # pixels as displayed; the EXIF itself is not kept
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (128, 128, 128, 255))
                im = Image.alpha_composite(bg, im)
                notes.append("alpha composited over grey")
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                arr = np.round(arr / max(arr.max(), 1) * 255).astype(np.uint8)
                im = Image.fromarray(arr)
                notes.append("16-bit converted to 8-bit")
            if im.mode != "RGB":
                if im.mode not in ("RGBA",):
                    notes.append(f"{im.mode} converted to RGB")
                im = im.convert("RGB")
            pixels = np.array(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"{display_name(str(p))}: not a readable image ({type(e).__name__}: {e})") from None
    return SourceImage(name if name is not None else p.name, str(p), pixels, fmt, 1.0, notes)


def list_image_files(folder: Path) -> list[Path]:
    return sorted((f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in READ_EXTENSIONS),
                  key=lambda f: os.fsencode(str(f)))


def read_images(spec: str, max_res: int | None = None) -> tuple[list[SourceImage], list[dict]]:
    """``spec``: an image file or a folder (searched recursively). Returns the
    images and the skipped files (``{"file", "reason"}``). ``max_res``: the
    processing copy's longer side is at most this (the output keeps the full
    resolution). Raises :class:`UserError` when nothing can be read."""
    if max_res is not None and max_res < 32:
        raise UserError(f"--max-res must be >= 32 pixels, got {max_res}")
    p = Path(spec)
    if not p.exists():
        raise UserError(f"--input {display_name(spec)}: no such file or folder")
    skipped: list[dict] = []
    if p.is_file():
        if p.suffix.lower() not in READ_EXTENSIONS:
            raise UserError(f"--input {display_name(spec)}: not an image file (expected {', '.join(READ_EXTENSIONS)})")
        imgs = [read_image_file(p)]
    else:
        files = list_image_files(p)
        if not files:
            raise UserError(f"--input {display_name(spec)}: the folder holds no image files ({', '.join(READ_EXTENSIONS)})")
        imgs = []
        for f in files:
            try:
                imgs.append(read_image_file(f, str(f.relative_to(p))))
            except UserError as e:
                skipped.append({"file": display_name(str(f)), "reason": str(e)})
        if not imgs:
            raise UserError(f"--input {display_name(spec)}: none of the {len(files)} image files could be read: "
                            + "; ".join(s["reason"] for s in skipped[:3]))
    for im in imgs:
        h, w = im.pixels.shape[:2]
        im.max_res = max_res
        if max_res and max(h, w) > max_res:
            im.scale = max_res / max(h, w)
    return imgs, skipped


def processing_copy(img: SourceImage, scale: float | None = None) -> np.ndarray:
    """The pixels at ``scale`` (default ``img.scale``; antialiased), for detection."""
    scale = img.scale if scale is None else scale
    if scale >= 1.0:
        return img.pixels
    h, w = img.pixels.shape[:2]
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    t = torch.from_numpy(img.pixels).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)
    return t[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()


# --------------------------------------------------------------------------- detect


@dataclass
class FaceDetection:
    """A face in a source image: ``box`` (x0, y0, x1, y1) float, exclusive x1/y1,
    in full-resolution pixels; ``score`` the detector's."""

    image_index: int
    box: tuple[float, float, float, float]
    score: float

    def box_dict(self) -> dict:
        x0, y0, x1, y1 = self.box
        return {"r": int(round(y0)), "c": int(round(x0)), "h": int(round(y1 - y0)), "w": int(round(x1 - x0))}


# The CNN detector's 80 px window finds faces (side of a tight LFW-style face
# square) of about this many pixels and more in the image it scans: measured on
# the composed scenes, recall 0.93 for 24-31 px faces at scale 80 / 24 and 1.00
# at 86 / 24, 1.00 for 32-39 px at 86 / 32 (docs/deid.md).
SMALLEST_FACE_AT_SCALE_1 = 86.0
MIN_DETECT_FACE = 24  # default smallest face (pixels) that detection must find


def detection_scale(height: int, width: int, min_size: float = MIN_DETECT_FACE, max_res: int | None = None) -> float:
    """Factor by which an image of ``height x width`` is resized before the CNN
    detector scans it, so that faces of ``min_size`` pixels and more are found:
    ``SMALLEST_FACE_AT_SCALE_1 / min_size`` (> 1 enlarges), capped so that the
    scanned copy's longer side is at most ``max_res``. The smallest face then
    found is ``SMALLEST_FACE_AT_SCALE_1 / scale`` (:func:`smallest_face_found`)."""
    if not (min_size > 0 and np.isfinite(min_size)):
        raise UserError(f"--min-detect must be a positive number of pixels, got {min_size!r}")
    s = SMALLEST_FACE_AT_SCALE_1 / float(min_size)
    if max_res:
        s = min(s, max_res / max(height, width, 1))
    return s


def smallest_face_found(scale: float) -> float:
    """Side (pixels) of the smallest face the detector finds at ``scale``."""
    return SMALLEST_FACE_AT_SCALE_1 / scale


def detect_faces(images: list[SourceImage], detector=None, threshold: float = 0.0, band: float = 0.3,
                 upsample: int | None = None, batch_size: int = 4,
                 min_size: float = MIN_DETECT_FACE) -> list[FaceDetection]:
    """Faces in every image, scores above ``threshold - band`` (those below
    ``threshold`` are uncertain: see :func:`align_faces`).

    ``detector``: ``None`` for dlib's CNN detector (:mod:`pyfici.models.dlib_mmod`),
    or a callable ``uint8 [H, W, 3] -> list of (x0, y0, x1, y1[, score])`` /
    objects with ``r, c, h, w`` (score 1).

    ``upsample``: ``None`` (default) scans each image resized by
    :func:`detection_scale` so that faces of ``min_size`` pixels and more are
    found, the copy capped at the image's ``max_res``; an integer is dlib's
    ``upsample_num_times`` on the processing copy (``img.scale``), as dlib does it."""
    out: list[FaceDetection] = []
    if detector is None:
        from pyfici.models.dlib_mmod import load_dlib_mmod

        det = load_dlib_mmod()
        if upsample is not None:
            copies = [processing_copy(im) for im in images]
            res = det.detect(copies, threshold=threshold - band, upsample=upsample, batch_size=batch_size)
            for i, (im, r) in enumerate(zip(images, res)):
                for b, s in zip(r.xyxy, r.scores):
                    out.append(FaceDetection(i, tuple(float(v) / im.scale for v in b), float(s)))
            return out
        groups: dict[float, list[int]] = {}
        for i, im in enumerate(images):
            h, w = im.pixels.shape[:2]
            groups.setdefault(detection_scale(h, w, min_size, im.max_res), []).append(i)
        found: dict[int, list[FaceDetection]] = {}
        for sc, idx in groups.items():
            if sc > 1.0:  # enlarged inside the detector; boxes come back in image pixels
                res = det.detect([images[i].pixels for i in idx], threshold=threshold - band, batch_size=batch_size,
                                 scale=sc)
                back = 1.0
            else:
                res = det.detect([processing_copy(images[i], sc) for i in idx], threshold=threshold - band,
                                 batch_size=batch_size)
                back = sc
            for i, r in zip(idx, res):
                found[i] = [FaceDetection(i, tuple(float(v) / back for v in b), float(s))
                            for b, s in zip(r.xyxy, r.scores)]
        return [d for i in range(len(images)) for d in found.get(i, [])]
    for i, im in enumerate(images):
        for d in detector(processing_copy(im)):
            if hasattr(d, "r"):
                box, s = (d.c, d.r, d.c + d.w, d.r + d.h), 1.0
            else:
                box, s = tuple(d[:4]), float(d[4]) if len(d) > 4 else 1.0
            if s > threshold - band:
                out.append(FaceDetection(i, tuple(float(v) / im.scale for v in box), s))
    return out


# --------------------------------------------------------------------------- align


@dataclass
class AlignedFace:
    """A detected face after alignment: ``action`` is ``"deidentify"`` or the
    fallback, with ``reason``; ``crop_transform`` / ``chip_transform`` map the
    generator crop / recognizer chip to image pixels."""

    det: FaceDetection
    landmarks: np.ndarray | None
    crop_transform: np.ndarray | None
    chip_transform: np.ndarray | None
    action: str
    reason: str = ""


def _to_dlib_rect(box) -> np.ndarray:
    x0, y0, x1, y1 = box
    return np.array([[round(x0), round(y0), round(x1) - 1, round(y1) - 1]], np.int64)


def align_faces(images: list[SourceImage], dets: list[FaceDetection], crop_size: int, *, threshold: float = 0.0,
                min_face: int = 40, fallback: str = "blur", predictor=None,
                crop_padding: float = FICGAN_CROP_PADDING, crop_shift=FICGAN_CROP_SHIFT) -> list[AlignedFace]:
    """5 landmarks per detection (full resolution) and the decision per face:

    - score below ``threshold`` (in the uncertainty band): ``fallback``;
    - box side below ``min_face`` pixels: ``fallback`` (too small to generate);
    - alignment failed (landmarks off the box, a degenerate or implausible
      transform: scale outside 0.3..3 x the box): ``fallback``;
    - otherwise ``deidentify``."""
    if fallback not in FALLBACKS:
        raise UserError(f"--fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}")
    if predictor is None:
        from pyfici.models.dlib_shape import load_shape_predictor

        predictor = load_shape_predictor()
    out = []
    for d in dets:
        x0, y0, x1, y1 = d.box
        side = min(x1 - x0, y1 - y0)
        if d.score <= threshold:
            out.append(AlignedFace(d, None, None, None, fallback, f"score {d.score:.3f} <= threshold {threshold}"))
            continue
        if side < min_face:
            out.append(AlignedFace(d, None, None, None, fallback, f"face {side:.0f} px < --min-face {min_face}"))
            continue
        lm = predictor.predict(images[d.image_index].pixels, _to_dlib_rect(d.box))[0]
        crop = face_chip_transform(lm, crop_size, crop_padding, crop_shift)
        chip = face_chip_transform(lm, *RECOGNIZER_CHIP)
        scale = np.sqrt(abs(np.linalg.det(crop[:, :2]))) * crop_size / max(side, 1.0)
        margin = 0.5 * max(x1 - x0, y1 - y0)
        inside = ((lm[:, 0] > x0 - margin) & (lm[:, 0] < x1 + margin) & (lm[:, 1] > y0 - margin) & (lm[:, 1] < y1 + margin)).all()
        if not np.isfinite(crop).all() or not inside or not 0.3 <= scale <= 3.0:
            out.append(AlignedFace(d, lm, None, None, fallback, "alignment failed (landmarks implausible for the box)"))
            continue
        out.append(AlignedFace(d, lm, crop, chip, "deidentify"))
    return out


def face_crops(images: list[SourceImage], faces: list[AlignedFace], size: int, which: str = "crop") -> torch.Tensor:
    """``[n, 3, size, size]`` float in [0, 1]: the generator crops (``which="crop"``)
    or recognizer chips (``"chip"``) of the faces to de-identify."""
    out = []
    for f in faces:
        M = f.crop_transform if which == "crop" else f.chip_transform
        out.append(extract_chips(images[f.det.image_index].pixels, M[None], size)[0])
    return torch.stack(out) if out else torch.zeros(0, 3, size, size)


# --------------------------------------------------------------------------- partition


@dataclass
class Partition:
    assignment: torch.Tensor  # [N] long, cluster of each identity
    surrogates: torch.Tensor  # [C, D] unit-norm spherical means
    sizes: torch.Tensor  # [C] long
    implementation: str

    def is_k_anonymous(self, k: int) -> bool:
        return bool(check_k_anonymity(self.assignment, k))


def identity_embeddings(codes: torch.Tensor, id_of_face: torch.Tensor, n_ids: int) -> torch.Tensor:
    """One unit vector per identity: the spherical mean of its faces' codes."""
    z = torch.zeros(n_ids, codes.shape[1], dtype=codes.dtype).index_add_(0, id_of_face, codes)
    return F.normalize(z, dim=1)


def partition_identities(emb: torch.Tensor, k: int, seed: int = 0) -> Partition:
    """k-Same partition of identity embeddings ``[N, D]`` (greedy, cosine) with
    spherical-mean surrogates."""
    res = k_same(emb, k, metric="cosine", seed=seed, method="greedy")
    return Partition(res.assignment.long().cpu(), F.normalize(res.surrogates.float().cpu(), dim=1),
                     res.sizes.long().cpu(), "pyfici.deid.k_same (greedy, cosine)")


# --------------------------------------------------------------------------- paste back + write


def compose_output(img: SourceImage, faces: list[AlignedFace], generated: dict[int, torch.Tensor]) -> np.ndarray:
    """A copy of ``img.pixels`` with every face of this image handled: generated
    crops (``generated[i]``, ``[3, s, s]`` in [0, 1], keyed by the index in
    ``faces``) pasted back, the others obfuscated by their action."""
    out = img.pixels
    todo = [(i, f) for i, f in enumerate(faces) if f.action == "deidentify" and i in generated]
    if todo:
        out = paste_back(out, torch.stack([generated[i] for i, _ in todo]),
                         np.stack([f.crop_transform for _, f in todo]))
    for i, f in enumerate(faces):
        if f.action == "deidentify" and i in generated:
            continue
        mode = f.action if f.action in FALLBACKS else "blur"
        if mode != "keep":
            out = obfuscate(out, f.det.box, mode)
    return out if out is not img.pixels else img.pixels.copy()


def output_path(out_dir: Path, img: SourceImage) -> Path:
    """``out_dir/images/<name as given>``: the name keeps its extension, so that
    ``a.jpg`` and ``a.png`` never collide; formats PIL cannot write get ``.png`` added."""
    rel = Path(img.name)
    if img.format not in _WRITE_FORMATS:
        rel = rel.with_name(rel.name + ".png")
    return out_dir / "images" / rel


def write_image(pixels: np.ndarray, dst: Path, fmt: str, quality: int = 95) -> Path:
    """Write uint8 RGB ``pixels`` in ``fmt`` (the input's format; JPEG at
    ``quality``) with no metadata (no EXIF, ICC, text chunks), atomically."""
    from PIL import Image

    fmt = _WRITE_FORMATS.get(fmt, "PNG")
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=dst.suffix or ".img", dir=dst.parent)
    os.close(fd)
    try:
        im = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), "RGB")
        kw = {"quality": int(quality), "optimize": True} if fmt == "JPEG" else {}
        if fmt == "WEBP":
            kw = {"quality": int(quality)}
        im.save(tmp, format=fmt, **kw)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dst


__all__ = ["AlignedFace", "FALLBACKS", "FaceDetection", "MIN_DETECT_FACE", "Partition", "SMALLEST_FACE_AT_SCALE_1",
           "SourceImage", "align_faces", "compose_output", "detect_faces", "detection_scale", "display_name",
           "face_crops", "identity_embeddings", "output_path", "partition_identities", "processing_copy",
           "read_image_file", "read_images", "smallest_face_found", "write_image"]
