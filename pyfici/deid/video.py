"""Video de-identification building blocks: decoding/encoding with PyAV
(``pip install av``; ffmpeg ships inside the wheel), face tracks, smoothing,
and the atomic output file.

- :func:`video_info`, :func:`iter_frames`: frames as uint8 RGB arrays;
- :func:`build_tracks`: frame-to-frame association of detections by box
  overlap (IoU) and identity embedding (dlib descriptors, Euclidean), greedy
  by best score; a track ends after ``max_gap`` frames without its face;
- :func:`merge_tracks`: tracks of one person (mean descriptors closer than
  ``merge_distance``, never present in the same frame) become one identity,
  so that k-Same counts people, not tracks;
- :func:`smooth_track`: centred moving average of the landmarks along a
  track (the crop, and so the pasted face, does not jitter);
- :class:`VideoWriter`: H.264 (or MPEG-4 when libx264 is missing) into a
  temporary file next to the output, audio packets copied through unchanged,
  renamed onto the final name only when everything is written (an interrupted
  run leaves no file under the final name).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pyfici.errors import UserError

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")


def _av():
    try:
        import av
    except ImportError:
        raise UserError("video needs PyAV: pip install av   (or pip install 'pyfici[video]')") from None
    return av


def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def video_info(path: str | os.PathLike) -> dict:
    """``{"fps", "frames", "width", "height", "audio"}`` of a video file; raises
    :class:`UserError` when it cannot be opened or has no video stream."""
    av = _av()
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise UserError(f"{path}: no video stream")
            v = c.streams.video[0]
            fps = float(v.average_rate) if v.average_rate else 25.0
            n = v.frames or 0
            return {"fps": fps, "frames": int(n), "width": v.codec_context.width, "height": v.codec_context.height,
                    "audio": bool(c.streams.audio)}
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - ffmpeg errors of every kind mean an unreadable file
        raise UserError(f"{path}: not a readable video ({type(e).__name__}: {e})") from None


def iter_frames(path: str | os.PathLike) -> Iterator[np.ndarray]:
    """Decoded frames of the first video stream, uint8 ``[H, W, 3]`` RGB."""
    av = _av()
    with av.open(str(path)) as c:
        for frame in c.decode(video=0):
            yield frame.to_ndarray(format="rgb24")


# --------------------------------------------------------------------------- tracks


@dataclass
class TrackedFace:
    frame: int
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 (exclusive)
    score: float
    landmarks: np.ndarray  # [5, 2]
    descriptor: np.ndarray  # [128] dlib face descriptor
    code: object = None  # the generator's identity code of this face (set by the caller's embed stage)
    lbph: np.ndarray | None = None  # LBPH histogram of the generator crop (pyfici.deid.metrics.lbph_features)


@dataclass
class Track:
    id: int
    faces: list[TrackedFace] = field(default_factory=list)
    identity: int = -1
    # per recognizer ("dlib", "lbph"): whether each output face is re-identified (set by render_video)
    reid_hits: dict[str, list[bool]] = field(default_factory=dict)

    @property
    def frames(self) -> list[int]:
        return [f.frame for f in self.faces]

    def mean_descriptor(self) -> np.ndarray:
        return np.mean([f.descriptor for f in self.faces], 0)


def box_iou(a, b) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def build_tracks(per_frame: list[list[TrackedFace]], iou_min: float = 0.2, max_distance: float = 0.6,
                 max_gap: int = 5) -> list[Track]:
    """Associate each frame's faces with the open tracks: a pair is allowed when
    the boxes overlap (IoU >= ``iou_min``) or the descriptors are within
    ``max_distance`` (dlib's same-person distance) of the track's last face;
    pairs are taken greedily by IoU + (1 - distance). Unmatched faces open new
    tracks; a track closes after ``max_gap`` frames without a face."""
    tracks: list[Track] = []
    open_: list[Track] = []
    for t, faces in enumerate(per_frame):
        open_ = [tr for tr in open_ if t - tr.faces[-1].frame <= max_gap]
        pairs = []
        for i, f in enumerate(faces):
            for j, tr in enumerate(open_):
                last = tr.faces[-1]
                iou = box_iou(f.box, last.box)
                dist = float(np.linalg.norm(f.descriptor - last.descriptor))
                if iou >= iou_min or dist <= max_distance:
                    if dist <= max_distance * 1.5:  # a big jump in identity is a different face
                        pairs.append((iou + (1 - dist), i, j))
        used_f, used_t = set(), set()
        for _, i, j in sorted(pairs, reverse=True):
            if i in used_f or j in used_t:
                continue
            open_[j].faces.append(faces[i])
            used_f.add(i)
            used_t.add(j)
        for i, f in enumerate(faces):
            if i not in used_f:
                tr = Track(len(tracks), [f])
                tracks.append(tr)
                open_.append(tr)
    return tracks


def merge_tracks(tracks: list[Track], merge_distance: float = 0.5) -> int:
    """Set ``track.identity``: tracks whose mean descriptors are within
    ``merge_distance`` and which never share a frame are one person (union-find,
    closest pairs first). Returns the number of identities."""
    parent = list(range(len(tracks)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    members = {i: {i} for i in range(len(tracks))}
    frames = [set(tr.frames) for tr in tracks]
    means = [tr.mean_descriptor() for tr in tracks]
    pairs = sorted((float(np.linalg.norm(means[i] - means[j])), i, j)
                   for i in range(len(tracks)) for j in range(i + 1, len(tracks)))
    for d, i, j in pairs:
        if d > merge_distance:
            break
        a, b = find(i), find(j)
        if a == b:
            continue
        fa = set().union(*(frames[m] for m in members[a]))
        fb = set().union(*(frames[m] for m in members[b]))
        if fa & fb:
            continue  # seen together: two people
        parent[b] = a
        members[a] |= members.pop(b)
    roots = sorted({find(i) for i in range(len(tracks))})
    for i, tr in enumerate(tracks):
        tr.identity = roots.index(find(i))
    return len(roots)


def smooth_track(track: Track, radius: int = 2) -> np.ndarray:
    """Landmarks of every face of the track ``[n, 5, 2]``, averaged over the
    faces within ``radius`` frames (centred window, shorter at the ends)."""
    lm = np.stack([f.landmarks for f in track.faces])
    fr = np.asarray(track.frames)
    out = np.empty_like(lm)
    for i, t in enumerate(fr):
        m = np.abs(fr - t) <= radius
        out[i] = lm[m].mean(0)
    return out


# --------------------------------------------------------------------------- detection between key frames

REGION_GROW = 0.35  # a region is the face's box grown by this many box sides on every side
REGION_MIN_FACE = 0.7  # a region is scanned for faces down to this fraction of the box side


def _merge_regions(boxes) -> list[list[float]]:
    """Overlapping boxes joined into their bounding box (repeated until none
    overlap), so that a face seeded by two frames is scanned once."""
    out = [list(map(float, b[:4])) for b in boxes]
    merged = True
    while merged:
        merged = False
        for i in range(len(out)):
            for j in range(i + 1, len(out)):
                a, b = out[i], out[j]
                if box_iou(a, b) > 0.0:
                    out[i] = [min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])]
                    del out[j]
                    merged = True
                    break
            if merged:
                break
    return out


def detect_near(pixels: np.ndarray, boxes, threshold: float, max_scale: float, detector=None) -> list[tuple]:
    """Faces near ``boxes`` ((x0, y0, x1, y1) in frame pixels): overlapping
    boxes are joined, each region (grown by ``REGION_GROW`` of its side on every
    side, clipped to the frame) scanned by the CNN detector at the scale that
    finds faces down to ``REGION_MIN_FACE`` times the smallest seed box's side
    in it (at most ``max_scale``, the scale of a whole-frame scan); detections
    of all regions merged by dlib's NMS. Returns ``[(x0, y0, x1, y1, score)]``
    (exclusive x1, y1) above ``threshold``."""
    from pyfici.deid.pipeline import SMALLEST_FACE_AT_SCALE_1
    from pyfici.models.dlib_mmod import load_dlib_mmod, nms_dlib

    det = detector if detector is not None else load_dlib_mmod()
    H, W = pixels.shape[:2]
    rects, scores = [], []
    for region in _merge_regions(boxes):
        inside = [b for b in boxes if b[0] >= region[0] and b[1] >= region[1] and b[2] <= region[2]
                  and b[3] <= region[3]]
        side = max(1.0, min(max(b[2] - b[0], b[3] - b[1]) for b in inside))
        x0, y0, x1, y1 = region
        g = REGION_GROW * max(x1 - x0, y1 - y0)
        c0, r0 = int(max(0, np.floor(x0 - g))), int(max(0, np.floor(y0 - g)))
        c1, r1 = int(min(W, np.ceil(x1 + g))), int(min(H, np.ceil(y1 + g)))
        if c1 - c0 < 2 or r1 - r0 < 2:
            continue
        sc = min(max_scale, SMALLEST_FACE_AT_SCALE_1 / (REGION_MIN_FACE * side))
        d = det.detect(np.ascontiguousarray(pixels[r0:r1, c0:c1]), threshold=threshold,
                       scale=None if sc == 1.0 else sc)[0]
        if len(d):
            rects.append(d.boxes + np.array([c0, r0, c0, r0]))
            scores.append(d.scores)
    if not rects:
        return []
    b, sc = np.concatenate(rects), np.concatenate(scores)
    keep = nms_dlib(b, sc, det.nms_iou, det.nms_covered)
    return [(float(b[i, 0]), float(b[i, 1]), float(b[i, 2] + 1), float(b[i, 3] + 1), float(sc[i])) for i in keep]


def drop_nested(dets: list, covered: float = 0.5) -> list:
    """One box per face: a detection is dropped when more than ``covered`` of
    the smaller box's area lies inside a higher-scoring detection of the same
    frame (dlib's NMS keeps a large box around a small one, e.g. face + hair,
    which would start a second track on one face)."""
    kept: list = []
    for d in sorted(dets, key=lambda d: -d.score):
        a = d.box
        for k in kept:
            b = k.box
            iw = min(a[2], b[2]) - max(a[0], b[0])
            ih = min(a[3], b[3]) - max(a[1], b[1])
            small = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
            if iw > 0 and ih > 0 and iw * ih > covered * small:
                break
        else:
            kept.append(d)
    return kept


# --------------------------------------------------------------------------- stages


@dataclass
class FramePass:
    """What pass 1 found: tracked-face candidates per frame, fallbacks per frame."""

    per_frame: list[list[TrackedFace]]
    fallbacks: dict[int, list]  # frame -> [pipeline.AlignedFace]
    n_frames: int


def describe_video(path: str | os.PathLike, info: dict, crop_size: int, embed_crops, *, threshold: float = 0.0,
                   band: float = 0.3, upsample: int | None = None, min_face: int = 40, fallback: str = "blur",
                   max_res: int | None = None, batch: int = 8, quiet: bool = True,
                   min_detect: float | None = None, detect_every: int = 5) -> FramePass:
    """Pass 1: decode, detect, align and describe every face, about ``batch``
    frames at a time. ``embed_crops(crops [n, 3, s, s] in [-1, 1]) -> codes [n, D]``
    gives each face its generator code (``TrackedFace.code``). ``upsample`` /
    ``min_detect`` / ``max_res``: the detector's scan scale as in
    :func:`pyfici.deid.pipeline.detect_faces` (``None``: automatic from
    ``min_detect``, default :data:`pyfici.deid.pipeline.MIN_DETECT_FACE`).

    Every ``detect_every``-th frame (a key frame) is scanned whole; a frame
    between two key frames is scanned only near the faces of the frame before it
    and of the next key frame (:func:`detect_near`), so a face seen on any key
    frame is found on the frames around it. A face visible for fewer than
    ``detect_every`` frames, none of them a key frame, can be missed:
    ``detect_every=1`` scans every frame whole."""
    import torch

    from pyfici.deid import pipeline as P
    from pyfici.deid.metrics import lbph_features
    from pyfici.models.dlib_face import load_dlib_face_resnet
    from pyfici.models.dlib_shape import load_shape_predictor
    from pyfici.progress import progress

    if int(detect_every) != detect_every or detect_every < 1:
        raise UserError(f"--detect-every must be an integer >= 1, got {detect_every!r}")
    scale = min(1.0, max_res / max(info["width"], info["height"])) if max_res else 1.0
    min_size = P.MIN_DETECT_FACE if min_detect is None else min_detect
    if upsample is None:
        full_scale = P.detection_scale(info["height"], info["width"], min_size, max_res)
    else:
        full_scale = scale * 2.0 ** upsample
    net, sp = load_dlib_face_resnet(), load_shape_predictor()
    fp = FramePass([], {}, 0)
    buf: list[np.ndarray] = []
    prev: list[P.FaceDetection] = []  # the last frame's detections (from the previous batch)

    def detect(imgs: list) -> list:
        nonlocal prev
        t0 = len(fp.per_frame)
        key = [i for i in range(len(imgs)) if (t0 + i) % detect_every == 0]
        per = {i: [] for i in range(len(imgs))}
        for d in P.detect_faces([imgs[i] for i in key], None, threshold=threshold, band=band, upsample=upsample,
                                batch_size=batch, min_size=min_size):
            d.image_index = key[d.image_index]
            per[d.image_index].append(d)
        for j in key:
            per[j] = drop_nested(per[j])
        last = prev
        for i in range(len(imgs)):
            if i not in key:
                nxt = next((per[j] for j in key if j > i), [])
                seeds = [d.box for d in last] + [d.box for d in nxt]
                per[i] = drop_nested([P.FaceDetection(i, b[:4], b[4]) for b in
                                      detect_near(imgs[i].pixels, seeds, threshold - band, full_scale)])
            last = per[i]
        prev = last
        return [d for i in range(len(imgs)) for d in per[i]]

    def flush():
        t0 = len(fp.per_frame)
        imgs = [P.SourceImage(f"frame{t0 + i}", None, f, "PNG", scale, max_res=max_res) for i, f in enumerate(buf)]
        dets = detect(imgs)
        al = P.align_faces(imgs, dets, crop_size, threshold=threshold, min_face=min_face, fallback=fallback,
                           predictor=sp)
        fp.per_frame.extend([] for _ in buf)
        ok = [a for a in al if a.action == "deidentify"]
        if ok:
            with torch.no_grad():
                desc = net.embed_images(P.face_crops(imgs, ok, 150, "chip")).numpy()
            crops = P.face_crops(imgs, ok, crop_size) * 2 - 1
            codes = embed_crops(crops)
            hists = lbph_features(crops).numpy()
            for a, d, c, h in zip(ok, desc, codes, hists):
                tf = TrackedFace(t0 + a.det.image_index, a.det.box, a.det.score, a.landmarks, d, c, h)
                fp.per_frame[tf.frame].append(tf)
        for a in al:
            if a.action != "deidentify":
                fp.fallbacks.setdefault(t0 + a.det.image_index, []).append(a)
        buf.clear()

    for frame in progress(iter_frames(path), desc="detect", quiet=quiet, total=info["frames"] or None):
        buf.append(frame)
        fp.n_frames += 1
        # a batch ends on a key frame, so the frames before it know its faces
        if len(buf) >= batch and (fp.n_frames - 1) % detect_every == 0:
            flush()
    if buf:
        flush()
    return fp


def track_people(fp: FramePass, fallback: str = "blur", min_track: int = 3) -> tuple[list[Track], int]:
    """Tracks (:func:`build_tracks`), those shorter than ``min_track`` frames
    moved to the fallbacks (too brief to be sure of a person), the rest merged
    into people (:func:`merge_tracks`). Returns (tracks, number of people)."""
    from pyfici.deid import pipeline as P

    tracks = build_tracks(fp.per_frame)
    keep = [tr for tr in tracks if len(tr.faces) >= min_track]
    for tr in tracks:
        if len(tr.faces) < min_track:
            for f in tr.faces:
                fp.fallbacks.setdefault(f.frame, []).append(P.AlignedFace(
                    P.FaceDetection(f.frame, f.box, f.score), f.landmarks, None, None, fallback,
                    f"track of {len(tr.faces)} frame(s) < {min_track}"))
    for i, tr in enumerate(keep):
        tr.id = i
    return keep, merge_tracks(keep)


def render_video(path: str | os.PathLike, dst: str | os.PathLike, info: dict, fp: FramePass, tracks: list[Track],
                 n_people: int, crop_size: int, generate, *, quiet: bool = True) -> dict[int, list[bool]]:
    """Pass 2: every tracked face generated by ``generate(crops [n, 3, s, s] in
    [-1, 1], faces [TrackedFace], identities [int]) -> [n, 3, s, s] in [-1, 1]``
    from landmarks smoothed along its track, pasted back; fallbacks obfuscated;
    encoded with the audio copied (:class:`VideoWriter`, atomic). Returns per
    track whether each output face is re-identified: its dlib descriptor is
    nearest to its own person's mean descriptor among the clip's people. Each
    track's ``reid_hits`` gets the same per recognizer: ``"dlib"`` as returned
    and, when pass 1 gave the faces LBPH histograms, ``"lbph"`` (the output's
    generator crop nearest, by chi-square, to its own person's mean histogram)."""
    import torch

    from pyfici.deid import pipeline as P
    from pyfici.deid.align import (
        RECOGNIZER_CHIP,
        extract_chips,
        face_chip_transform,
        obfuscate,
        paste_back,
    )
    from pyfici.deid.metrics import _chi2, lbph_features
    from pyfici.models.dlib_face import load_dlib_face_resnet
    from pyfici.progress import progress

    net = load_dlib_face_resnet()
    gallery = np.stack([np.mean([f.descriptor for tr in tracks if tr.identity == p for f in tr.faces], 0)
                        for p in range(n_people)])
    with_lbph = all(f.lbph is not None for tr in tracks for f in tr.faces)
    if with_lbph:
        lbph_gallery = torch.from_numpy(np.stack([np.mean([f.lbph for tr in tracks if tr.identity == p
                                                           for f in tr.faces], 0) for p in range(n_people)]))
    for tr in tracks:
        tr.reid_hits = {"dlib": [], "lbph": []} if with_lbph else {"dlib": []}
    todo: dict[int, list[tuple[Track, int, np.ndarray]]] = {}
    for tr in tracks:
        for j, lm in enumerate(smooth_track(tr)):
            todo.setdefault(tr.faces[j].frame, []).append((tr, j, lm))
    hits: dict[int, list[bool]] = {tr.id: [] for tr in tracks}
    with VideoWriter(dst, path, info["fps"], info["width"], info["height"]) as w:
        for t, frame in enumerate(progress(iter_frames(path), desc="de-identify", quiet=quiet, total=fp.n_frames)):
            img, items = frame, todo.get(t, [])
            if items:
                M = np.stack([face_chip_transform(lm, crop_size, P.FICGAN_CROP_PADDING, P.FICGAN_CROP_SHIFT)
                              for _, _, lm in items])
                gen = generate(extract_chips(frame, M, crop_size) * 2 - 1, [tr.faces[j] for tr, j, _ in items],
                               [tr.identity for tr, _, _ in items])
                img = paste_back(frame, (gen.clamp(-1, 1) + 1) / 2, M)
                chips = extract_chips(img, np.stack([face_chip_transform(lm, *RECOGNIZER_CHIP) for _, _, lm in items]),
                                      RECOGNIZER_CHIP[0])
                with torch.no_grad():
                    d_out = net.embed_images(chips).numpy()
                for (tr, _, _), d in zip(items, d_out):
                    hits[tr.id].append(int(np.argmin(np.linalg.norm(gallery - d, axis=1))) == tr.identity)
                    tr.reid_hits["dlib"].append(hits[tr.id][-1])
                if with_lbph:
                    h_out = lbph_features(extract_chips(img, M, crop_size) * 2 - 1)
                    for (tr, _, _), p in zip(items, _chi2(h_out, lbph_gallery).argmin(1).tolist()):
                        tr.reid_hits["lbph"].append(p == tr.identity)
            for a in fp.fallbacks.get(t, []):
                if a.action != "keep":
                    img = obfuscate(img, a.det.box, a.action)
            w.write(img)
    return hits


def track_rows(tracks: list[Track], assignment, sizes, hits: dict[int, list[bool]]) -> list[dict]:
    """The report's row per track: frames, person, cluster, mean score, re-identification rate
    (dlib descriptor; ``_lbph``: LBPH, when :func:`render_video` measured it)."""
    rows = []
    for tr in tracks:
        c = int(assignment[tr.identity])
        rows.append({"track": tr.id, "person": tr.identity, "cluster": c, "cluster_size": int(sizes[c]),
                     "first_frame": tr.frames[0], "last_frame": tr.frames[-1], "n_frames": len(tr.faces),
                     "mean_score": float(np.mean([f.score for f in tr.faces])),
                     "reidentification_rate": float(np.mean(hits[tr.id])) if hits[tr.id] else None,
                     "reidentification_rate_lbph": (float(np.mean(tr.reid_hits["lbph"]))
                                                    if tr.reid_hits.get("lbph") else None)})
    return rows


# --------------------------------------------------------------------------- writing


class VideoWriter:
    """Encode RGB frames to ``dst`` with the audio of ``src`` copied through.

    Frames go to a temporary file in ``dst``'s folder; :meth:`close` (or leaving
    the ``with`` block normally) renames it onto ``dst``. On an exception the
    temporary file is removed and ``dst`` is untouched."""

    def __init__(self, dst: str | os.PathLike, src: str | os.PathLike, fps: float, width: int, height: int,
                 crf: int = 20):
        av = _av()
        self.dst = Path(dst)
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=".tmp-", suffix=self.dst.suffix or ".mp4", dir=self.dst.parent)
        os.close(fd)
        self.out = av.open(self.tmp, mode="w", format=_container_format(self.dst))
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        from fractions import Fraction

        rate = Fraction(fps).limit_denominator(1001)
        self.v = self.out.add_stream(codec, rate=rate)
        self.v.width, self.v.height = width - width % 2, height - height % 2
        self.v.pix_fmt = "yuv420p"
        if codec == "libx264":
            self.v.options = {"crf": str(crf), "preset": "veryfast"}
        self.src = str(src)
        self.audio_in = None
        self._in = av.open(self.src)
        if self._in.streams.audio:
            self.audio_in = self._in.streams.audio[0]
            try:
                self.a = self.out.add_stream_from_template(self.audio_in)
            except (AttributeError, ValueError):
                self.a = self.out.add_stream(template=self.audio_in)  # PyAV < 12
        self.frames = 0
        self.codec = codec

    def write(self, rgb: np.ndarray) -> None:
        import av

        h, w = self.v.height, self.v.width
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[:h, :w]), format="rgb24")
        for p in self.v.encode(frame):
            self.out.mux(p)
        self.frames += 1

    def _finish(self) -> None:
        for p in self.v.encode():
            self.out.mux(p)
        if self.audio_in is not None:
            for p in self._in.demux(self.audio_in):
                if p.dts is None:
                    continue
                p.stream = self.a
                self.out.mux(p)
        self.out.close()
        self._in.close()

    def close(self) -> Path:
        self._finish()
        os.replace(self.tmp, self.dst)
        return self.dst

    def abort(self) -> None:
        for c in (self.out, self._in):
            try:
                c.close()
            except Exception:  # noqa: BLE001, S110 - closing a half-written container may fail; it is deleted next
                pass
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        if et is None:
            self.close()
        else:
            self.abort()
        return False


def _container_format(p: Path) -> str | None:
    return {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm", ".avi": "avi"}.get(
        p.suffix.lower())


__all__ = ["FramePass", "Track", "TrackedFace", "VIDEO_EXTENSIONS", "VideoWriter", "box_iou", "build_tracks",
           "describe_video", "detect_near", "drop_nested", "is_video", "iter_frames", "merge_tracks", "render_video",
           "smooth_track", "track_people", "track_rows", "video_info"]
