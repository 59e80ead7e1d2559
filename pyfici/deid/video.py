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

from pyfici.engine.errors import UserError

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


@dataclass
class Track:
    id: int
    faces: list[TrackedFace] = field(default_factory=list)
    identity: int = -1

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


__all__ = ["Track", "TrackedFace", "VIDEO_EXTENSIONS", "VideoWriter", "box_iou", "build_tracks", "is_video",
           "iter_frames", "merge_tracks", "smooth_track", "video_info"]
