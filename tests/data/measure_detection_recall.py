"""Recall and precision of the face detectors on the composed LFW scenes
(tests/data/face_scenes.py), by face size; prints the markdown table of
docs/deid.md.

    python tests/data/measure_detection_recall.py [--scenes 60]

A pasted face (upright square of side s) is found when a detection's centre
lies inside its square and the detection's side is between 0.4 s and 2.5 s
(each detection matches at most one face); every other detection is a false
alarm. Detectors: pyfici's port of dlib's CNN detector at its default threshold
(0) with the automatic scale for a smallest face of 24 px (the default of
``pyfici.deid.pipeline.detect_faces``), 32 px and 40 px, with upsample 2, 1 and
0, and at -0.5 with upsample 2, and scikit-image's LBP frontal-face cascade as
``pyfici`` used it before (scale 1.2, min 24 px, one neighbour). Time per scene
is wall-clock and process CPU seconds (all threads).
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from face_scenes import composed_scenes, truth_boxes  # noqa: E402

BINS = [(24, 32), (32, 40), (40, 60), (60, 100), (100, 201)]


def match(truth: np.ndarray, dets: np.ndarray) -> tuple[np.ndarray, int]:
    """-> (found flag per truth face, number of false alarms)."""
    found = np.zeros(len(truth), bool)
    used = np.zeros(len(dets), bool)
    for i, (x0, y0, x1, y1) in enumerate(truth):
        s = x1 - x0
        for j, (a0, b0, a1, b1) in enumerate(dets):
            if used[j]:
                continue
            cx, cy, ds = (a0 + a1) / 2, (b0 + b1) / 2, max(a1 - a0, b1 - b0)
            if x0 <= cx <= x1 and y0 <= cy <= y1 and 0.4 * s <= ds <= 2.5 * s:
                found[i] = used[j] = True
                break
    return found, int((~used).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenes", type=int, default=60)
    args = ap.parse_args()
    from pyfici.deid.pipeline import detection_scale
    from pyfici.methods.ficgan.detect import LBPCascadeDetector
    from pyfici.models.dlib_mmod import load_dlib_mmod

    scenes = composed_scenes(args.scenes)
    cnn = load_dlib_mmod()
    lbp = LBPCascadeDetector()
    cache: dict = {}

    def up2(im, threshold):
        # NMS is greedy by descending score, so the detections at threshold 0 are those at -0.5 scoring > 0
        key = im.ctypes.data  # the scenes stay alive, so their buffers identify them
        if key not in cache:
            cache[key] = cnn.detect(im, threshold=-0.5, upsample=2)[0]
        d = cache[key]
        return d.xyxy[d.scores > threshold]

    def auto(im, min_size):
        return cnn.detect(im, scale=detection_scale(*im.shape[:2], min_size))[0].xyxy

    detectors = {
        "pyfici CNN (dlib mmod), threshold 0, scale for min 24 px (default)": lambda im: auto(im, 24),
        "pyfici CNN (dlib mmod), threshold 0, scale for min 32 px": lambda im: auto(im, 32),
        "pyfici CNN (dlib mmod), threshold 0, scale for min 40 px": lambda im: auto(im, 40),
        "pyfici CNN (dlib mmod), threshold -0.5, upsample 2": lambda im: up2(im, -0.5),
        "pyfici CNN (dlib mmod), threshold 0, upsample 2": lambda im: up2(im, 0.0),
        "pyfici CNN (dlib mmod), threshold 0, upsample 1 (dlib's)": lambda im: cnn.detect(im, upsample=1)[0].xyxy,
        "pyfici CNN (dlib mmod), threshold 0, upsample 0": lambda im: cnn.detect(im, upsample=0)[0].xyxy,
        "scikit-image LBP cascade (previous default)": lambda im: np.array(
            [(b.c, b.r, b.c + b.w, b.r + b.h) for b in lbp(im)], np.float64).reshape(-1, 4),
    }
    sides = np.concatenate([truth_boxes(s["truth"])[:, 2] - truth_boxes(s["truth"])[:, 0] for s in scenes])
    rows = {}
    for name, fn in detectors.items():
        t, c = time.time(), time.process_time()
        found, fa, ndet = [], 0, 0
        for s in scenes:
            d = fn(s["image"])
            f, a = match(truth_boxes(s["truth"]), d)
            found.append(f)
            fa += a
            ndet += len(d)
        found = np.concatenate(found)
        rows[name] = (found, fa, ndet, (time.time() - t) / len(scenes), (time.process_time() - c) / len(scenes))
    head = ("| detector | " + " | ".join(f"{lo}-{hi - 1} px" for lo, hi in BINS)
            + " | >= 40 px | precision | s / scene | CPU s / scene |")
    print(f"{len(scenes)} scenes, {len(sides)} faces; faces per size bin: "
          + ", ".join(f"{lo}-{hi - 1}: {int(((sides >= lo) & (sides < hi)).sum())}" for lo, hi in BINS))
    print()
    print(head)
    print("|" + "---|" * (len(BINS) + 5))
    for name, (found, fa, ndet, sec, cpu) in rows.items():
        cells = []
        for lo, hi in BINS:
            m = (sides >= lo) & (sides < hi)
            cells.append(f"{found[m].mean():.2f}")
        big = sides >= 40
        prec = (ndet - fa) / ndet if ndet else float("nan")
        print(f"| {name} | " + " | ".join(cells) + f" | {found[big].mean():.3f} | {prec:.3f} ({fa} false) | {sec:.2f} | {cpu:.2f} |")


if __name__ == "__main__":
    main()
