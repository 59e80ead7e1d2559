"""Deterministic test scenes of real faces for the detector and landmark checks.

Built only from images that ship with scikit-image and matplotlib (numpy,
scipy and scikit-image; no torch, so that the dlib reference scripts can use
it too):

- ``astronaut``: ``skimage.data.astronaut()``;
- ``grace_hopper``: matplotlib's ``grace_hopper.jpg``;
- ``scene_NN``: the 100 real LFW face crops of ``skimage.data.lfw_subset()[:100]``
  (25x25 grey), each scaled to a side between 24 and 200 pixels (log-uniform),
  rotated by -30..30 degrees, blended with a soft elliptical mask onto a
  textured background (scikit-image's brick, grass, gravel, coffee, rocket,
  immunohistochemistry images, tinted), without overlap; 5 faces per 480x360
  scene, 20 scenes. ``truth`` lists each face as (centre x, centre y, side,
  angle in degrees, LFW index).
"""

from __future__ import annotations

import numpy as np

SCENE_W, SCENE_H = 480, 360
FACES_PER_SCENE = 5
MIN_SIDE, MAX_SIDE = 24, 200


def grace_hopper() -> np.ndarray:
    import matplotlib.cbook as cbook
    from PIL import Image

    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as im:
        return np.asarray(im.convert("RGB")).copy()


def astronaut() -> np.ndarray:
    import skimage.data as sd

    return sd.astronaut().copy()


def _backgrounds() -> list[np.ndarray]:
    import skimage.data as sd
    from skimage.transform import resize

    out = []
    tints = [(1.0, 0.85, 0.7), (0.7, 1.0, 0.75), (0.9, 0.9, 1.0)]
    for g, tint in zip((sd.brick(), sd.grass(), sd.gravel()), tints):
        g = resize(g.astype(np.float64) / 255.0, (SCENE_H, SCENE_W), order=1, anti_aliasing=True)
        out.append(np.clip(g[..., None] * np.asarray(tint), 0, 1))
    for c in (sd.coffee(), sd.rocket(), sd.immunohistochemistry()):
        out.append(resize(c.astype(np.float64) / 255.0, (SCENE_H, SCENE_W, 3), order=1, anti_aliasing=True))
    return out


def _face_patch(face: np.ndarray, side: int, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """(patch [P, P], alpha [P, P]): the grey face scaled to ``side``, rotated about
    its centre, on a canvas large enough for the rotation; alpha is a soft ellipse."""
    from skimage.transform import resize, rotate

    f = resize(face, (side, side), order=1, anti_aliasing=side < face.shape[0])
    pad = int(np.ceil(side * 0.25)) + 2
    big = np.pad(f, pad, mode="edge")
    y, x = np.mgrid[0:big.shape[0], 0:big.shape[1]].astype(np.float64)
    c = (big.shape[0] - 1) / 2
    r = np.sqrt(((x - c) / (0.56 * side)) ** 2 + ((y - c) / (0.62 * side)) ** 2)
    alpha = np.clip((1.0 - r) / 0.12, 0, 1)
    big = rotate(big, angle, order=1, mode="edge")
    alpha = rotate(alpha, angle, order=1, mode="constant", cval=0)
    return big, alpha


def composed_scenes(n_scenes: int = 20) -> list[dict]:
    """``[{"name", "image" uint8 [360, 480, 3], "truth" [(cx, cy, side, angle, lfw_index)]}]``.

    Scenes 0-19 use each of the 100 faces once; later scenes (for the recall
    measurement) reuse them with new sizes, angles and places."""
    import skimage.data as sd

    lfw = sd.lfw_subset()[:100]
    rng = np.random.default_rng(20240613)
    bgs = _backgrounds()
    per_pass = len(lfw) // FACES_PER_SCENE
    scenes = []
    for s in range(n_scenes):
        if s % per_pass == 0:  # a new pass over the faces
            sides = np.exp(rng.uniform(np.log(MIN_SIDE), np.log(MAX_SIDE), size=len(lfw)))
            angles = rng.uniform(-30, 30, size=len(lfw))
            order = rng.permutation(len(lfw))
        img = bgs[s % len(bgs)].copy()
        q = s % per_pass
        ids = order[q * FACES_PER_SCENE:(q + 1) * FACES_PER_SCENE]
        ids = sorted(ids, key=lambda i: -sides[i])  # place the largest first
        placed: list[tuple[float, float, float]] = []
        truth = []
        for i in ids:
            side = int(round(sides[i]))
            patch, alpha = _face_patch(lfw[i], side, float(angles[i]))
            ph = patch.shape[0]
            for _ in range(2000):
                cx = rng.uniform(side * 0.6, SCENE_W - side * 0.6)
                cy = rng.uniform(side * 0.6, SCENE_H - side * 0.6)
                if all(abs(cx - px) > (side + ps) * 0.62 or abs(cy - py) > (side + ps) * 0.62 for px, py, ps in placed):
                    break
            else:
                continue  # no room left for this face in the scene
            x0, y0 = int(round(cx - (ph - 1) / 2)), int(round(cy - (ph - 1) / 2))
            ys0, xs0 = max(0, -y0), max(0, -x0)
            ys1, xs1 = min(ph, SCENE_H - y0), min(ph, SCENE_W - x0)
            a = alpha[ys0:ys1, xs0:xs1, None]
            region = img[y0 + ys0:y0 + ys1, x0 + xs0:x0 + xs1]
            img[y0 + ys0:y0 + ys1, x0 + xs0:x0 + xs1] = a * patch[ys0:ys1, xs0:xs1, None] + (1 - a) * region
            cxa, cya = x0 + (ph - 1) / 2, y0 + (ph - 1) / 2
            placed.append((cxa, cya, side))
            truth.append((float(cxa), float(cya), side, float(angles[i]), int(i)))
        scenes.append({"name": f"scene_{s:02d}", "image": np.round(np.clip(img, 0, 1) * 255).astype(np.uint8),
                       "truth": truth})
    return scenes


def truth_boxes(truth) -> np.ndarray:
    """``[n, 4]`` (x0, y0, x1, y1) upright squares of each pasted face (exclusive x1, y1)."""
    return np.asarray([(cx - s / 2 + 0.5, cy - s / 2 + 0.5, cx + s / 2 + 0.5, cy + s / 2 + 0.5)
                       for cx, cy, s, _, _ in truth], dtype=np.float64).reshape(-1, 4)


def reference_images() -> dict[str, np.ndarray]:
    """All images the dlib reference covers, by name."""
    out = {"astronaut": astronaut(), "grace_hopper": grace_hopper()}
    for sc in composed_scenes():
        out[sc["name"]] = sc["image"]
    return out
