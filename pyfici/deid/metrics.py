"""Privacy and utility metrics for face de-identification.

Images are float tensors ``[N, 3, S, S]`` in [-1, 1] (aligned face crops);
embeddings ``[N, D]``.

- :func:`reidentification_rate`: fraction of outputs whose nearest original
  *identity* (by a recognizer) is their own. k-Same bounds it by 1/k for any
  recognizer when the output depends on the identity only through the
  cluster surrogate.
- :func:`identity_distance`: cosine distance between each output and its
  source identity (by a recognizer).
- :func:`attribute_preservation`: pixel error and SSIM outside the identity
  region (the central face ellipse: eyes, nose, mouth), plus identity-invariant
  statistics (mean colour and brightness of the non-identity region).
- :func:`reconstruction_quality`: L1 / PSNR / SSIM of G(a, E_id(x)) vs x.

Recognizers (``recognizer=``):

- ``"lbph"``: local-binary-pattern histograms on a 4x4 grid of the grey
  face, compared by chi-square (Ahonen, Hadid, Pietikainen, TPAMI 2006), the
  classic face recognizer. It shares nothing with the dlib network used for the
  identity loss, so the generator was never optimised against it; this is the
  default *evaluation* recognizer.
- ``"dlib"``: the pyfici port of dlib's ResNet (the training recognizer; the
  generator was optimised to move its embedding to the surrogate).
- any callable ``[N,3,S,S] -> [N,D]`` embeddings (cosine distance).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pyfici.errors import require

Recognizer = str | Callable[[torch.Tensor], torch.Tensor]


def identity_region_r2(size: int, scale: float = 1.0, device=None) -> torch.Tensor:
    """``[size, size]`` squared elliptic radius of every pixel of an aligned face
    crop: 1 on the boundary of the identity region (centre (0.55 H, 0.5 W), radii
    0.32 H and 0.27 W, both times ``scale``). Shared by :func:`identity_region_mask`
    and FICGAN's attribute-input mask."""
    yy, xx = torch.meshgrid(torch.arange(size, device=device, dtype=torch.float32),
                            torch.arange(size, device=device, dtype=torch.float32), indexing="ij")
    cy, cx = 0.55 * (size - 1), 0.5 * (size - 1)
    return ((yy - cy) / (0.32 * scale * size)) ** 2 + ((xx - cx) / (0.27 * scale * size)) ** 2


def identity_region_mask(size: int, device=None) -> torch.Tensor:
    """``[size, size]`` bool mask of the identity region of an aligned face crop:
    an ellipse centred at (0.55 H, 0.5 W) with radii 0.32 H and 0.27 W, covering
    eyebrows, eyes, nose and mouth in CelebA/FFHQ/LFW-style crops."""
    return identity_region_r2(size, device=device) <= 1.0


def luma(x: torch.Tensor) -> torch.Tensor:
    """BT.601 luma ``[N, 1, H, W]`` of RGB images ``[N, 3, H, W]`` (any range)."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def lbph_features(images: torch.Tensor, grid: int = 4, size: int = 64) -> torch.Tensor:
    """Local-binary-pattern histograms (uniform LBP, P=8, R=1; 10 bins) on a
    ``grid x grid`` split of the grey face resized to ``size`` -> ``[N, grid*grid*10]``
    (each cell's histogram sums to 1)."""
    local_binary_pattern = require("skimage.feature", "data", "the LBPH face features").local_binary_pattern

    x = images.detach().float().cpu()
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    grey = ((x.clamp(-1, 1) + 1) * 127.5)
    grey = luma(grey)[:, 0].round().to(torch.uint8).numpy()
    feats = []
    cell = size // grid
    for g in grey:
        lbp = local_binary_pattern(g, 8, 1, method="uniform")
        h = []
        for i in range(grid):
            for j in range(grid):
                c = lbp[i * cell : (i + 1) * cell, j * cell : (j + 1) * cell]
                hist = np.bincount(c.astype(np.int64).ravel(), minlength=10)[:10].astype(np.float64)
                h.append(hist / max(1.0, hist.sum()))
        feats.append(np.concatenate(h))
    return torch.from_numpy(np.stack(feats)).float()


def _chi2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Chi-square distance between rows of a [N, F] and b [M, F] -> [N, M]."""
    num = (a[:, None, :] - b[None, :, :]) ** 2
    den = a[:, None, :] + b[None, :, :] + 1e-10
    return (num / den).sum(-1)


def recognizer_name(recognizer: Recognizer) -> str:
    if isinstance(recognizer, str):
        return {"lbph": "LBPH (uniform LBP 8,1 histograms, 4x4 grid, chi-square; Ahonen et al. 2006)",
                "dlib": "dlib face-recognition ResNet v1 (pyfici port), cosine"}.get(recognizer, recognizer)
    return getattr(recognizer, "name", type(recognizer).__name__)


_ENCODERS: dict = {}


def _resolve(recognizer: Recognizer):
    """-> (embed fn, distance fn(a, b) -> [N, M])."""
    if recognizer == "lbph":
        return lbph_features, _chi2
    if recognizer == "dlib":
        if "dlib" not in _ENCODERS:
            from pyfici.models.dlib_face import DlibFaceEncoder

            _ENCODERS["dlib"] = DlibFaceEncoder()
        recognizer = _ENCODERS["dlib"]
    if isinstance(recognizer, str):
        raise ValueError(f"unknown recognizer {recognizer!r} (use 'lbph', 'dlib' or a callable)")

    def embed(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([F.normalize(recognizer(x[i:i + 32]).float().cpu(), dim=1) for i in range(0, len(x), 32)])

    return embed, lambda a, b: 1 - a @ b.T


def _identity_gallery(emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-identity mean of the originals' features -> (gallery [I, F], identity ids [I])."""
    ids = torch.unique(labels)
    return torch.stack([emb[labels == i].mean(0) for i in ids]), ids


def reidentification_rate(originals: torch.Tensor, outputs: torch.Tensor, labels: Sequence[int] | torch.Tensor | None = None,
                          recognizer: Recognizer = "lbph", return_matches: bool = False,
                          features: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Fraction of ``outputs[i]`` whose nearest original identity (gallery: one
    entry per identity, the mean feature of its originals) is ``labels[i]``.

    ``labels`` default: every image its own identity. Ties go to the lower
    identity index. With ``return_matches`` also returns the bool ``[N]`` hits.
    """
    n = len(originals)
    if len(outputs) != n:
        raise ValueError(f"outputs: expected {n} images (one per original), got {len(outputs)}")
    lab = torch.arange(n) if labels is None else torch.as_tensor(labels).long().cpu()
    if features is not None:
        eo, eq = (F.normalize(f.float().cpu(), dim=1) for f in features)

        def dist(a, b):
            return 1 - a @ b.T
    else:
        embed, dist = _resolve(recognizer)
        eo, eq = embed(originals), embed(outputs)
    gal, ids = _identity_gallery(eo, lab)
    d = dist(eq, gal)
    pred = ids[d.argmin(dim=1)]
    hits = pred == lab
    rate = float(hits.float().mean()) if n else 0.0
    return (rate, hits) if return_matches else rate


def identity_distance(sources: torch.Tensor, outputs: torch.Tensor, recognizer: Recognizer = "dlib") -> torch.Tensor:
    """Per-image distance ``[N]`` between output and source by ``recognizer``
    (cosine distance for embeddings; chi-square for ``"lbph"``)."""
    embed, dist = _resolve(recognizer)
    a, b = embed(sources), embed(outputs)
    return torch.stack([dist(a[i:i + 1], b[i:i + 1])[0, 0] for i in range(len(a))]) if len(a) else torch.zeros(0)


def _ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    structural_similarity = require("skimage.metrics", "data", "SSIM").structural_similarity

    win = min(7, (min(a.shape[:2]) // 2) * 2 - 1)
    _, m = structural_similarity(a, b, channel_axis=-1, data_range=1.0, full=True, win_size=win)
    return m.mean(-1)


def _to_np(x: torch.Tensor) -> np.ndarray:
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy().astype(np.float64)


def attribute_preservation(sources: torch.Tensor, outputs: torch.Tensor) -> dict:
    """Utility outside the identity region (:func:`identity_region_mask`):
    ``l1_outside`` (mean |difference| in [0, 1] units), ``ssim_outside`` (mean
    SSIM map outside the ellipse), ``ssim_full``, and identity-invariant
    statistics: ``mean_colour_shift`` (L2 distance of the mean RGB outside the
    ellipse, i.e. background / hair / lighting colour) and
    ``brightness_corr`` (correlation of per-image mean brightness of source and
    output: lighting should be kept)."""
    a, b = _to_np(sources), _to_np(outputs)
    s = a.shape[1]
    out_mask = ~identity_region_mask(s).numpy()
    l1 = np.abs(a - b).mean(-1)[:, out_mask].mean(1)
    ssim_out, ssim_full = [], []
    for x, y in zip(a, b):
        m = _ssim_map(x, y)
        ssim_out.append(m[out_mask].mean())
        ssim_full.append(m.mean())
    col = np.linalg.norm(a[:, out_mask].mean(1) - b[:, out_mask].mean(1), axis=-1)
    ba, bb = a.mean(axis=(1, 2, 3)), b.mean(axis=(1, 2, 3))
    corr = float(np.corrcoef(ba, bb)[0, 1]) if len(a) > 2 and ba.std() > 0 and bb.std() > 0 else float("nan")
    return {"l1_outside": float(l1.mean()), "ssim_outside": float(np.mean(ssim_out)), "ssim_full": float(np.mean(ssim_full)),
            "mean_colour_shift": float(col.mean()), "brightness_corr": corr,
            "per_image": {"l1_outside": l1.tolist(), "ssim_outside": [float(v) for v in ssim_out]}}


def reconstruction_quality(sources: torch.Tensor, reconstructions: torch.Tensor) -> dict:
    """G(E_attr(x), E_id(x)) vs x: ``l1``, ``psnr`` (dB, [0, 1] range), ``ssim``."""
    a, b = _to_np(sources), _to_np(reconstructions)
    mse = ((a - b) ** 2).mean(axis=(1, 2, 3))
    psnr = 10 * np.log10(1.0 / np.maximum(mse, 1e-12))
    ssim = [float(_ssim_map(x, y).mean()) for x, y in zip(a, b)]
    return {"l1": float(np.abs(a - b).mean()), "psnr": float(psnr.mean()), "ssim": float(np.mean(ssim))}


__all__ = [
    "attribute_preservation",
    "identity_distance",
    "identity_region_mask",
    "identity_region_r2",
    "lbph_features",
    "luma",
    "reconstruction_quality",
    "recognizer_name",
    "reidentification_rate",
]
