"""Test clips of real faces: the astronaut (``skimage.data.astronaut``),
Grace Hopper (matplotlib's ``grace_hopper.jpg``) and an LFW face
(``skimage.data.lfw_subset()[3]``), three people moving and scaling over a
textured background, with a 440 Hz mono audio track (AAC). H.264 (MPEG-4 where
libx264 is missing), written with PyAV.

``make_clip(path, width, height, frames, fps)``: each face moves along its own
path (a slow ellipse, so the three never overlap) and scales between its
smallest and largest side; ``CLIP_PEOPLE`` people are visible in every frame.
"""

from __future__ import annotations

from pathlib import Path

import face_scenes
import numpy as np

CLIP_PEOPLE = 3


def face_patches() -> list[np.ndarray]:
    """The three faces, uint8 RGB squares around dlib's face box (about 1.6 x
    the box side, so that the pasted square holds the whole face)."""
    import skimage.data as sd

    ast = face_scenes.astronaut()[41:191, 140:290]
    gh = face_scenes.grace_hopper()[103:353, 148:398]
    lfw = np.repeat(np.round(sd.lfw_subset()[3] * 255).astype(np.uint8)[..., None], 3, -1)
    return [ast, gh, lfw]


def face_track(i: int, t: float, width: int, height: int) -> tuple[int, int, int]:
    """(x0, y0, side) of person ``i`` at time ``t`` in [0, 1]: person i lives in
    its own third of the frame, moves on an ellipse there and scales."""
    u = min(width / 3, height)
    lo, hi = 0.45 * u, 0.75 * u  # patch side; the face (dlib's box) is about 0.6 of it: 75-125 px in 854x480
    side = lo + (hi - lo) * (0.5 - 0.5 * np.cos(2 * np.pi * (t + i / 3)))
    cx = (i + 0.5) * width / 3 + 0.12 * u * np.sin(2 * np.pi * (t + 0.2 * i))
    cy = 0.5 * height + 0.18 * (height - hi) * np.cos(2 * np.pi * (t + 0.3 * i))
    return int(round(cx - side / 2)), int(round(cy - side / 2)), int(round(side))


def make_clip(path: str | Path, width: int = 320, height: int = 240, frames: int = 12, fps: int = 12,
              audio: bool = True) -> list[list[tuple[int, int, int]]]:
    """Write the clip; returns per frame the (x0, y0, side) of each person."""
    import av
    from skimage.transform import resize

    bg = face_scenes._backgrounds()[0]
    bg = resize(bg, (height, width, 3), anti_aliasing=True)
    faces = [f.astype(np.float64) / 255 for f in face_patches()]
    out = av.open(str(path), "w")
    vs = out.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
    vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
    if audio:
        aus = out.add_stream("aac", rate=16000)
        aus.layout = "mono"
    where = []
    for t in range(frames):
        img = bg.copy()
        pos = []
        for i, f in enumerate(faces):
            x, y, s = face_track(i, t / max(frames - 1, 1), width, height)
            p = resize(f, (s, s, 3), anti_aliasing=s < f.shape[0])
            yy, xx = np.mgrid[0:s, 0:s] / (s - 1) - 0.5
            m = np.clip((0.5 - np.sqrt(xx ** 2 + yy ** 2)) / 0.06, 0, 1)[..., None]
            img[y:y + s, x:x + s] = m * p + (1 - m) * img[y:y + s, x:x + s]
            pos.append((x, y, s))
        where.append(pos)
        frame = av.VideoFrame.from_ndarray(np.round(img * 255).astype(np.uint8), format="rgb24")
        for pk in vs.encode(frame):
            out.mux(pk)
    streams = [vs]
    if audio:
        n = int(16000 * frames / fps)
        tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / 16000)).astype(np.float32)
        for i in range(0, n, 1024):
            af = av.AudioFrame.from_ndarray(tone[None, i:i + 1024], format="fltp", layout="mono")
            af.sample_rate = 16000
            for pk in aus.encode(af):
                out.mux(pk)
        streams.append(aus)
    for st in streams:
        for pk in st.encode():
            out.mux(pk)
    out.close()
    return where
