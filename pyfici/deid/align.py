"""Face alignment from 5 landmarks, chip extraction, paste-back and fallback
obfuscation.

- :func:`face_chip_transform` is dlib's ``get_face_chip_details`` for the
  5-point model: the least-squares similarity transform from a template of
  the 5 landmarks (in a ``size`` x ``size`` chip with ``padding`` around the
  face) to the detected landmarks, turned into dlib's chip rectangle (angle,
  centre, scale) and then into the affine map chip pixel -> image pixel that
  dlib's ``extract_image_chip`` samples with. With ``size=150, padding=0.25``
  it gives the chip dlib's face-recognition network expects.
- :func:`extract_chips` samples chips bilinearly (zeros outside the image); a
  Gaussian pre-filter matched to the sampling step keeps downscaled chips
  free of aliasing (dlib uses an image pyramid for the same purpose).
- :func:`paste_back` warps a generated chip into a *copy* of the image by the
  inverse map, through a feathered elliptical mask in chip space, after
  matching the chip's colour statistics (per-channel mean and standard
  deviation inside the mask) to the original face.
- :func:`obfuscate` blurs, pixelates or fills a box (the fallback for faces
  that cannot be de-identified).

Images are numpy ``[H, W, 3]``; uint8 or float in [0, 1] (outputs keep the
input's dtype). Transforms are ``[2, 3]`` float64 arrays mapping chip
(x, y, 1) to image (x, y).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from pyfici.models.dlib_shape import similarity_transform

# dlib's mean positions of the 5 landmarks in the unit face square (get_face_chip_details)
FACE5_TEMPLATE = np.array([
    [0.8595674595992, 0.2134981538014],
    [0.6460604764104, 0.2289674387677],
    [0.1205750620789, 0.2137274526848],
    [0.3340850613712, 0.2290642403242],
    [0.4901123135679, 0.6277975316475],
])

RECOGNIZER_CHIP = (150, 0.25)  # size, padding of dlib's face-recognition chip
# The FICGAN crop: the framing of the face crops the built-in model is trained on
# (scikit-image's LFW subset), measured by fitting the template to the landmarks of
# LFW crops pasted into the composed test scenes: the crop side is 1.54 template
# units (padding 0.27) and its centre 0.10 right, 0.05 up of the template centre.
FICGAN_CROP_PADDING = 0.27
FICGAN_CROP_SHIFT = (0.10, -0.05)


def face_chip_transform(landmarks: np.ndarray, size: int = 150, padding: float = 0.25,
                        shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """``landmarks`` ``[..., 5, 2]`` (dlib's 5-point order) -> chip-to-image affine
    maps ``[..., 2, 3]`` for a ``size`` x ``size`` chip, as dlib's
    ``get_face_chip_details`` + ``extract_image_chip`` compute them.

    ``shift`` (not in dlib; default none) moves the chip centre by that many
    template units (the face square of the 5-point template) right and down."""
    lm = np.asarray(landmarks, np.float64)
    if lm.shape[-2:] != (5, 2):
        raise ValueError(f"landmarks: expected [..., 5, 2], got shape {lm.shape}")
    if size < 2 or padding < 0:
        raise ValueError(f"size must be >= 2 and padding >= 0, got size={size}, padding={padding}")
    chip = (padding + FACE5_TEMPLATE - np.asarray(shift, np.float64)) / (2 * padding + 1) * size
    A, t = similarity_transform(np.broadcast_to(chip, lm.shape), lm)
    p = A[..., :, 0]  # m @ (1, 0)
    angle = np.arctan2(p[..., 1], p[..., 0])
    scale = np.hypot(p[..., 0], p[..., 1])
    centre = np.einsum("...ij,j->...i", A, np.array([size / 2.0, size / 2.0])) + t
    half = (size * scale - 1) / 2  # centered_drect(width) spans width - 1
    cos, sin = np.cos(angle), np.sin(angle)

    def corner(dx, dy):  # rotate_point(centre, centre + (dx, dy), angle)
        return np.stack([centre[..., 0] + cos * dx - sin * dy, centre[..., 1] + sin * dx + cos * dy], -1)

    tl, tr, bl = corner(-half, -half), corner(half, -half), corner(-half, half)
    n = size - 1
    M = np.empty(lm.shape[:-2] + (2, 3))
    M[..., :, 0] = (tr - tl) / n
    M[..., :, 1] = (bl - tl) / n
    M[..., :, 2] = tl
    return M


def invert_affine(M: np.ndarray) -> np.ndarray:
    """Inverse of ``[..., 2, 3]`` affine maps."""
    A = M[..., :, :2]
    Ai = np.linalg.inv(A)
    out = np.empty_like(M)
    out[..., :, :2] = Ai
    out[..., :, 2] = -np.einsum("...ij,...j->...i", Ai, M[..., :, 2])
    return out


def _to_float_tensor(image: np.ndarray) -> tuple[torch.Tensor, bool]:
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"image: expected [H, W, 3], got shape {a.shape}")
    is_u8 = a.dtype == np.uint8
    t = torch.from_numpy(np.ascontiguousarray(a)).float()
    if is_u8:
        t = t / 255.0
    return t.permute(2, 0, 1)[None], is_u8


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma < 0.3:
        return x
    r = max(1, int(math.ceil(3 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype) / sigma) ** 2)
    k = (k / k.sum()).to(x.device)
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _sample(img: torch.Tensor, M: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear samples of ``img`` [1, C, H, W] at M @ (x, y, 1) for the chip grid ``size`` (h, w)."""
    h, w = size
    H, W = img.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    Mt = torch.from_numpy(np.asarray(M, np.float64))
    gx = Mt[0, 0] * xs + Mt[0, 1] * ys + Mt[0, 2]
    gy = Mt[1, 0] * xs + Mt[1, 1] * ys + Mt[1, 2]
    grid = torch.stack([2 * gx / max(W - 1, 1) - 1, 2 * gy / max(H - 1, 1) - 1], -1)[None].to(img)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def extract_chips(image: np.ndarray, transforms: np.ndarray, size: int) -> torch.Tensor:
    """Chips ``[n, 3, size, size]`` float in [0, 1] sampled from ``image`` at the
    chip-to-image maps ``transforms`` ``[n, 2, 3]`` (zeros outside the image)."""
    img, _ = _to_float_tensor(image)
    H, W = img.shape[-2:]
    T = np.asarray(transforms, np.float64).reshape(-1, 2, 3)
    out = []
    for M in T:
        step = math.sqrt(abs(np.linalg.det(M[:, :2])))  # image pixels per chip pixel
        if step <= 1.0:
            out.append(_sample(img, M, (size, size))[0])
            continue
        # blur only the region the chip covers (plus the kernel radius), then sample it
        sigma = 0.5 * math.sqrt(step * step - 1.0)
        corners = M @ np.array([[0, 0, 1], [size - 1, 0, 1], [0, size - 1, 1], [size - 1, size - 1, 1]]).T
        r = int(math.ceil(3 * sigma)) + 2
        x0, x1 = max(0, int(math.floor(corners[0].min())) - r), min(W, int(math.ceil(corners[0].max())) + r + 1)
        y0, y1 = max(0, int(math.floor(corners[1].min())) - r), min(H, int(math.ceil(corners[1].max())) + r + 1)
        if x1 <= x0 or y1 <= y0:
            out.append(torch.zeros(3, size, size))
            continue
        Mr = M.copy()
        Mr[:, 2] -= (x0, y0)
        out.append(_sample_region(_gaussian_blur(img[..., y0:y1, x0:x1], sigma), Mr, size, (H, W), x0, y0))
    return torch.stack(out) if out else torch.zeros(0, 3, size, size)


def _sample_region(region: torch.Tensor, M: np.ndarray, size: int, full_hw, x0: int, y0: int) -> torch.Tensor:
    """Sample a blurred crop ``region`` (at offset x0, y0 of the full image);
    points outside the full image are zero, as for an unblurred sample."""
    chip = _sample(region, M, (size, size))[0]
    H, W = full_hw
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    gx = M[0, 0] * xs + M[0, 1] * ys + M[0, 2] + x0
    gy = M[1, 0] * xs + M[1, 1] * ys + M[1, 2] + y0
    inside = torch.from_numpy(((gx >= 0) & (gx <= W - 1) & (gy >= 0) & (gy <= H - 1)).astype(np.float32))
    return chip * inside


def chip_mask(size: int, feather: float = 0.1, rx: float = 0.42, ry: float = 0.48, cy: float = 0.52) -> np.ndarray:
    """``[size, size]`` float mask in chip space: 1 inside an ellipse around the
    face (semi-axes ``rx``, ``ry`` of the chip side, centre ``cy`` down), falling
    smoothly to 0 over ``feather`` of the chip side."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / max(size - 1, 1)
    r = np.sqrt(((x - 0.5) / rx) ** 2 + ((y - cy) / ry) ** 2)
    edge = feather / max(rx, ry)
    t = np.clip((1.0 - r) / edge, 0.0, 1.0)
    return (t * t * (3 - 2 * t)).astype(np.float32)  # smoothstep


def match_colour(chip: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Shift and scale each channel of ``chip`` [3, h, w] so that its mean and
    standard deviation inside ``mask`` [h, w] equal those of ``target``."""
    w = mask.clamp(0, 1)
    tot = w.sum().clamp_min(1e-6)

    def stats(x):
        m = (x * w).sum((1, 2)) / tot
        v = (((x - m[:, None, None]) ** 2) * w).sum((1, 2)) / tot
        return m, v.clamp_min(1e-8).sqrt()

    mc, sc = stats(chip)
    mt, st = stats(target)
    gain = (st / sc).clamp(0.5, 2.0)
    return ((chip - mc[:, None, None]) * gain[:, None, None] + mt[:, None, None]).clamp(0, 1)


def paste_back(image: np.ndarray, chips: torch.Tensor, transforms: np.ndarray, feather: float = 0.1,
               colour_match: bool = True) -> np.ndarray:
    """A copy of ``image`` with each chip ``[n, 3, s, s]`` (float in [0, 1]) warped in
    by the inverse of its chip-to-image map ``transforms`` ``[n, 2, 3]``, blended
    through :func:`chip_mask`. ``image`` itself is never modified."""
    img, is_u8 = _to_float_tensor(image)
    out = img.clone()
    H, W = out.shape[-2:]
    T = np.asarray(transforms, np.float64).reshape(-1, 2, 3)
    if len(T) != len(chips):
        raise ValueError(f"chips: {len(chips)} chips for {len(T)} transforms")
    for chip, M in zip(chips, T):
        s = chip.shape[-1]
        mask = torch.from_numpy(chip_mask(s, feather))
        chip = chip.float().cpu().clamp(0, 1)
        if colour_match:
            orig = extract_chips(image, M[None], s)[0]
            chip = match_colour(chip, orig, mask * (orig.sum(0) > 0).float())
        corners = M @ np.array([[0, 0, 1], [s - 1, 0, 1], [0, s - 1, 1], [s - 1, s - 1, 1]]).T
        x0, x1 = max(0, int(math.floor(corners[0].min()))), min(W, int(math.ceil(corners[0].max())) + 1)
        y0, y1 = max(0, int(math.floor(corners[1].min()))), min(H, int(math.ceil(corners[1].max())) + 1)
        if x1 <= x0 or y1 <= y0:
            continue
        inv = invert_affine(M)
        # image (x, y) of the region -> chip coordinates
        Mi = inv.copy()
        Mi[:, 2] = inv[:, 2] + inv[:, 0] * x0 + inv[:, 1] * y0
        src = torch.cat([chip, mask[None]], 0)[None]
        warped = _sample(src, Mi, (y1 - y0, x1 - x0))[0]
        a = warped[3:4]
        region = out[0, :, y0:y1, x0:x1]
        out[0, :, y0:y1, x0:x1] = a * warped[:3] + (1 - a) * region
    res = out[0].permute(1, 2, 0).numpy()
    if is_u8:
        return np.clip(np.round(res * 255.0), 0, 255).astype(np.uint8)
    return res.astype(np.asarray(image).dtype, copy=False)


def obfuscate(image: np.ndarray, box, mode: str = "blur", margin: float = 1.2) -> np.ndarray:
    """A copy of ``image`` with the box ``(x0, y0, x1, y1)`` (exclusive x1, y1),
    enlarged ``margin`` times about its centre, blurred (Gaussian, sigma = side / 4),
    pixelated (blocks of side / 6), or filled with the region's mean colour
    (``mode`` = ``"fill"``), through a feathered elliptical mask. ``"keep"``
    returns an unchanged copy."""
    if mode not in ("blur", "pixelate", "fill", "keep"):
        raise ValueError(f"mode: expected blur, pixelate, fill or keep, got {mode!r}")
    img, is_u8 = _to_float_tensor(image)
    out = img.clone()
    if mode != "keep":
        x0, y0, x1, y1 = (float(v) for v in box)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        side = max(x1 - x0, y1 - y0) * margin
        H, W = out.shape[-2:]
        lft, t = int(math.floor(cx - side / 2)), int(math.floor(cy - side / 2))
        r, b = int(math.ceil(cx + side / 2)), int(math.ceil(cy + side / 2))
        lft, t, r, b = max(0, lft), max(0, t), min(W, r), min(H, b)
        if r > lft and b > t:
            region = out[:, :, t:b, lft:r]
            if mode == "blur":
                new = _gaussian_blur(region, max(2.0, side / 4))
            elif mode == "pixelate":
                blk = max(2, int(round(side / 6)))
                small = F.avg_pool2d(region, blk, blk, ceil_mode=True)
                new = F.interpolate(small, scale_factor=blk, mode="nearest")[..., :b - t, :r - lft]
            else:
                new = region.mean((2, 3), keepdim=True).expand_as(region)
            yy, xx = torch.meshgrid(torch.arange(t, b, dtype=torch.float32), torch.arange(lft, r, dtype=torch.float32),
                                    indexing="ij")
            rr = torch.sqrt(((xx + 0.5 - cx) / (side / 2)) ** 2 + ((yy + 0.5 - cy) / (side / 2)) ** 2)
            m = ((1.0 - rr) / 0.25 + 0.5).clamp(0, 1) if mode != "pixelate" else (rr <= 1.0).float()
            out[:, :, t:b, lft:r] = m * new + (1 - m) * region
    res = out[0].permute(1, 2, 0).numpy()
    if is_u8:
        return np.clip(np.round(res * 255.0), 0, 255).astype(np.uint8)
    return res.astype(np.asarray(image).dtype, copy=False)


__all__ = ["FACE5_TEMPLATE", "RECOGNIZER_CHIP", "chip_mask", "extract_chips", "face_chip_transform",
           "invert_affine", "match_colour", "obfuscate", "paste_back"]
