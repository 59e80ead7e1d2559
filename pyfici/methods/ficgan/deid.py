"""De-identification with manifold k-Same: ``pyfici deid`` and :func:`deidentify`.

:func:`deidentify` only composes the stages of :mod:`pyfici.deid.pipeline`:
read the inputs (never modified) -> detect faces (dlib's CNN detector, or
take each image as an aligned crop) -> align (5 landmarks, the generator crop
from them) -> embed (the model's identity encoder; one identity per face, or
per label with ``labels``) -> partition (k-Same over identities,
:func:`pyfici.deid.k_same`) -> generate (every face with its cluster's
surrogate on the chosen levels, slerped by ``degree``) -> paste back (inverse
warp, feathered mask, colour matching; faces that cannot be de-identified get
the ``fallback``) -> write (the input's format, no metadata) + report.

The k-anonymity guarantee (each surrogate stands for >= k identities, so any
recognizer re-identifies at most 1/k of the outputs *through the identity
code*) holds only with ``degree == 1`` and all three level groups taking the
surrogate; otherwise the source identity code reaches the generator and the
report says ``k_anonymous: false``. The attribute path may still leak
identity: the measured re-identification rate (with a recognizer the model
was not trained against) is what tells.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pyfici.deid import pipeline as P
from pyfici.engine import UserError
from pyfici.engine.config import count_type
from pyfici.engine.files import atomic_write_text, write_json
from pyfici.engine.rundir import make_output_folder
from pyfici.engine.runtime import resolve_device
from pyfici.methods.ficgan.model import FICGAN, GROUPS, slerp


class DeidError(UserError, ValueError):
    """Bad input for de-identification (the message says what and how to fix it)."""


@contextlib.contextmanager
def _deid_errors():
    """Stage errors (UserError) surface as DeidError."""
    try:
        yield
    except DeidError:
        raise
    except UserError as e:
        raise DeidError(str(e)) from None


Partition = P.Partition


def k_same_partition(emb: torch.Tensor, k: int, seed: int = 0) -> Partition:
    """k-Same partition of identity embeddings ``[N, D]`` by
    :func:`pyfici.deid.k_same` (greedy, cosine; spherical-mean surrogates)."""
    return P.partition_identities(emb, k, seed)


def is_k_anonymous(assignment: torch.Tensor, k: int) -> bool:
    from pyfici.deid import check_k_anonymity

    return bool(check_k_anonymity(assignment, k))


# --------------------------------------------------------------------------- stages specific to FICGAN


@dataclass
class Face:
    """One face to generate: its crop ``[3, S, S]`` in [-1, 1], where it came
    from (``aligned`` index into the pipeline's faces, or ``None`` when the whole
    image is an aligned crop)."""

    image_index: int
    crop: torch.Tensor
    aligned: int | None
    identity: str = ""


@dataclass
class Inputs:
    images: list[P.SourceImage]
    skipped: list[dict] = field(default_factory=list)

    @property
    def sources(self) -> list[str]:
        return [im.path or f"builtin:{im.name}" for im in self.images]


def read_inputs(spec: str, max_res: int | None = None) -> Inputs:
    """Stage *read*: ``spec`` an image file, a folder, or ``"builtin"`` (the
    faces that ship with scikit-image and matplotlib)."""
    if spec == "builtin":
        from pyfici.methods.ficgan.data import builtin_face_images

        imgs = [P.SourceImage(li.name, None, np.clip(np.round(li.image * 255), 0, 255).astype(np.uint8), "PNG",
                              1.0, list(li.notes)) for li in builtin_face_images()]
        return Inputs(imgs)
    with _deid_errors():
        imgs, skipped = P.read_images(spec, max_res)
    return Inputs(imgs, skipped)


def looks_aligned(img: np.ndarray, size: int) -> bool:
    """``--faces auto``: an image is taken as an aligned face crop when it is
    roughly square (aspect 0.8..1.25) and its shorter side is at most
    max(256, 2 x size) pixels; anything else is a photo to search for faces."""
    h, w = img.shape[:2]
    return 0.8 <= h / w <= 1.25 and min(h, w) <= max(256, 2 * size)


def _centre_crop(pixels: np.ndarray, size: int) -> torch.Tensor:
    import torch.nn.functional as F

    h, w = pixels.shape[:2]
    s = min(h, w)
    t, left = (h - s) // 2, (w - s) // 2
    x = torch.from_numpy(np.ascontiguousarray(pixels[t:t + s, left:left + s])).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x[0].clamp(0, 1) * 2 - 1


@dataclass
class FoundFaces:
    faces: list[Face]
    aligned: list[P.AlignedFace]  # every detection with its action
    no_face: list[dict]


def find_faces(inputs: Inputs, size: int, mode: str = "auto", detector=None, min_face: int = 40,
               det_threshold: float = 0.0, fallback: str = "blur", upsample: int | None = None, det_band: float = 0.3,
               min_detect: float | None = None) -> FoundFaces:
    """Stages *detect* and *align*: aligned crops as they are (``mode`` aligned,
    or auto for small square images); faces detected in the other images.
    ``upsample=None`` scans at the scale that finds faces of ``min_detect``
    pixels (default :data:`pyfici.deid.pipeline.MIN_DETECT_FACE`)."""
    faces: list[Face] = []
    photos = [i for i, im in enumerate(inputs.images)
              if not (mode == "aligned" or (mode == "auto" and looks_aligned(im.pixels, size)))]
    for i, im in enumerate(inputs.images):
        if i not in photos:
            faces.append(Face(i, _centre_crop(im.pixels, size), None))
    sub = [inputs.images[i] for i in photos]
    with _deid_errors():
        dets = P.detect_faces(sub, detector, threshold=det_threshold, band=det_band, upsample=upsample,
                              min_size=P.MIN_DETECT_FACE if min_detect is None else min_detect)
        al = P.align_faces(sub, dets, size, threshold=det_threshold, min_face=min_face, fallback=fallback)
    for a in al:
        a.det.image_index = photos[a.det.image_index]
    crops = P.face_crops(inputs.images, [a for a in al if a.action == "deidentify"], size)
    j = 0
    for n, a in enumerate(al):
        if a.action == "deidentify":
            faces.append(Face(a.det.image_index, crops[j] * 2 - 1, n))
            j += 1
    found = {a.det.image_index for a in al}
    no_face = [{"image": P.display_name(inputs.images[i].name), "reason": "no face found by "
                + ("dlib's CNN face detector" if detector is None else getattr(detector, "name", "the detector"))}
               for i in photos if i not in found]
    return FoundFaces(faces, al, no_face)


def read_labels(path: str, names: list[str]) -> dict[str, str]:
    """Labels file: one ``NAME LABEL`` or ``NAME,LABEL`` per line (NAME: file
    name relative to --input, or its base name); '#' starts a comment."""
    p = Path(path)
    if not p.is_file():
        raise DeidError(f"--labels {path}: no such file")
    lab: dict[str, str] = {}
    for ln, line in enumerate(p.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = [q for q in line.replace(",", " ").replace("\t", " ").split(" ") if q]
        if len(parts) != 2:
            raise DeidError(f"--labels {path}:{ln}: expected 'NAME LABEL', got {line!r}")
        lab[parts[0]] = parts[1]
    out = {}
    missing = []
    for n in names:
        v = lab.get(n, lab.get(Path(n).name))
        if v is None:
            missing.append(n)
        else:
            out[n] = v
    if missing:
        raise DeidError(f"--labels {path}: no label for {len(missing)} input image(s), e.g. {missing[:3]}")
    return out


def assign_identities(inputs: Inputs, faces: list[Face], labels: str | None) -> tuple[list[str], torch.Tensor]:
    """One identity per face (aligned crops: per image), or per label; extra
    faces in one photo are identities of their own."""
    names = [inputs.images[f.image_index].name for f in faces]
    if labels:
        lab = read_labels(labels, sorted(set(names)))
        seen: dict[tuple[int, str], int] = {}
        for f, n in zip(faces, names):
            j = seen.setdefault((f.image_index, lab[n]), 0)
            seen[(f.image_index, lab[n])] += 1
            f.identity = lab[n] if j == 0 else f"{lab[n]}#face{j}"
    else:
        for idx, (f, n) in enumerate(zip(faces, names)):
            f.identity = n if f.aligned is None else f"{n}#face{idx}"
    id_names = sorted({f.identity for f in faces})
    return id_names, torch.tensor([id_names.index(f.identity) for f in faces], dtype=torch.long)


def _embed(model: FICGAN, x: torch.Tensor, dev) -> torch.Tensor:
    """Stage *embed*: the model's identity encoder."""
    with torch.no_grad():
        return torch.cat([model.identity(x[i:i + 32].to(dev)).cpu() for i in range(0, len(x), 32)])


def _generate(model: FICGAN, x: torch.Tensor, codes: dict[str, torch.Tensor], dev) -> torch.Tensor:
    """Stage *generate*; ``codes``: per-group codes in the generator's code space
    (:meth:`FICGAN.center_codes`)."""
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), 32):
            c = {g: v[i:i + 32].to(dev) for g, v in codes.items()}
            outs.append(model.generate(x[i:i + 32].to(dev), c, centered=True).float().cpu())
    return torch.cat(outs) if outs else x.clone()


def parse_levels(levels: str | list[str] | tuple[str, ...]) -> list[str]:
    lv = [s.strip() for s in levels.split(",")] if isinstance(levels, str) else list(levels)
    bad = [s for s in lv if s not in GROUPS]
    if bad or not lv:
        raise DeidError(f"--levels: expected a comma-separated subset of {','.join(GROUPS)}, got {levels!r}")
    return [g for g in GROUPS if g in lv]


def _check_args(k, degree, levels, faces_mode, fallback, quality) -> list[str]:
    if not isinstance(k, int) or k < 1:
        raise DeidError(f"--k must be a positive integer, got {k!r}")
    if not 0.0 <= degree <= 1.0:
        raise DeidError(f"--degree must be in [0, 1], got {degree}")
    if faces_mode not in ("auto", "aligned", "detect"):
        raise DeidError(f"--faces must be auto, aligned or detect, got {faces_mode!r}")
    if fallback not in P.FALLBACKS:
        raise DeidError(f"--fallback must be one of {', '.join(P.FALLBACKS)}, got {fallback!r}")
    if not 1 <= int(quality) <= 100:
        raise DeidError(f"--quality must be in 1..100, got {quality}")
    return parse_levels(levels)


def _check_out(out: str | os.PathLike, input: str, inputs: Inputs) -> None:
    """Refuse an output folder that is (inside) the input folder or an input file, before writing."""
    from pyfici.engine.rundir import check_output_path

    if input == "builtin":
        return
    with _deid_errors():
        check_output_path(out, [("--input", input)])
    od = Path(out).resolve()
    images_dir = od / "images"
    src = Path(input).resolve()
    if src.is_dir() and (images_dir == src or src in images_dir.parents):
        raise DeidError(f"--out {out} would write its images/ into the input folder --input {input}: "
                        "choose an output folder outside the inputs")
    sources = {Path(im.path).resolve() for im in inputs.images if im.path}
    if od in sources:
        raise DeidError(f"--out {out} is an input file")
    for im in inputs.images:
        if P.output_path(od, im).resolve() in sources:
            raise DeidError(f"--out {out} would overwrite the input file {im.path}: choose another output folder")


def deidentify(model: FICGAN, input: str, k: int, out: str | os.PathLike, *, degree: float = 1.0,
               levels: str | list[str] = "coarse,middle,fine", example: str | None = None, labels: str | None = None,
               faces_mode: str = "auto", min_face: int = 40, detector=None, recognizer: str = "lbph",
               det_threshold: float = 0.0, det_band: float = 0.3, fallback: str = "blur", upsample: int | None = None,
               min_detect: float | None = None, quality: int = 95, max_res: int | None = None, seed: int = 0, device: str = "cpu",
               checkpoint: str | None = None) -> dict:
    """De-identify ``input`` (file, folder or ``"builtin"``) into ``out``; returns
    the report (also ``out/report.json``, ``out/report.md``, ``out/grid.png``,
    ``out/images/``). Raises :class:`DeidError` with a clear message on bad
    input, before anything is written."""
    dev = resolve_device(device)
    lv = _check_args(k, degree, levels, faces_mode, fallback, quality)
    size = model.cfg.size
    out_dir = Path(out)
    inputs = read_inputs(input, max_res)
    _check_out(out, input, inputs)
    found = find_faces(inputs, size, faces_mode, detector, min_face, det_threshold, fallback, upsample, det_band,
                       min_detect)
    faces = found.faces
    if not faces and not found.aligned:
        raise DeidError(f"--input {input}: no face found in any image ({len(found.no_face)} image(s) searched); "
                        "use --faces aligned if the images are already face crops")
    id_names, id_of_face = assign_identities(inputs, faces, labels)
    if faces and k > len(id_names):
        raise DeidError(f"--k {k} is larger than the number of identities ({len(id_names)} in {len(faces)} face(s)); "
                        f"k-anonymity needs at least k identities: use --k <= {len(id_names)} or add images")
    example_crop = None
    if example:
        ex = read_inputs(example)
        ex_found = find_faces(ex, size, faces_mode, detector, min_face, det_threshold, fallback, upsample,
                              det_band, min_detect)
        if not ex_found.faces:
            raise DeidError(f"--example {example}: no face found")
        example_crop = ex_found.faces[0].crop
    x = torch.stack([f.crop for f in faces]) if faces else torch.zeros(0, 3, size, size)
    fallbacks = [a for a in found.aligned if a.action != "deidentify"]
    report: dict = {"k": k, "degree": degree, "levels": lv, "example": example, "labels": labels,
                    "checkpoint": str(checkpoint) if checkpoint else None, "input": P.display_name(input),
                    "image_size": size, "faces_mode": faces_mode, "n_images": len(inputs.images),
                    "n_faces": len(faces), "n_identities": len(id_names), "skipped_files": inputs.skipped,
                    "no_face": found.no_face, "detector": {"name": "dlib CNN (mmod_human_face_detector, pyfici port)"
                                                           if detector is None else getattr(detector, "name", "custom"),
                                                           "threshold": det_threshold, "upsample": upsample,
                                                           "min_detect": P.MIN_DETECT_FACE if min_detect is None
                                                           else min_detect},
                    "fallback": fallback,
                    "blurred_small_faces": [{"image": P.display_name(inputs.images[a.det.image_index].name),
                                             "box": a.det.box_dict(), "score": a.det.score, "action": a.action,
                                             "reason": a.reason} for a in fallbacks],
                    "conversions": {P.display_name(im.name): im.notes for im in inputs.images if im.notes}}
    make_output_folder(out_dir)
    outputs, recon, hits, id_dist, part, k_anon = x.clone(), x.clone(), [], [], None, True
    if faces:
        z_face = _embed(model, x, dev)
        # partition, surrogates and slerp live in the generator's code space
        with torch.no_grad():
            c_face = model.center_codes(z_face.to(dev)).cpu()
        part = k_same_partition(P.identity_embeddings(c_face, id_of_face, len(id_names)), k, seed)
        anon_partition = part.is_k_anonymous(k)
        cluster_of_face = part.assignment[id_of_face]
        target = part.surrogates[cluster_of_face]
        example_cluster = None
        if example_crop is not None:
            with torch.no_grad():
                c_ex = model.center_codes(_embed(model, example_crop[None], dev).to(dev)).cpu()
            example_cluster = int(torch.argmax(part.surrogates @ c_ex[0]))
            target = part.surrogates[example_cluster].expand_as(target)
        z_mix = slerp(c_face, target, degree)
        outputs = _generate(model, x, {g: (z_mix if g in lv else c_face) for g in GROUPS}, dev)
        recon = _generate(model, x, {g: c_face for g in GROUPS}, dev)
        k_anon, reasons = bool(anon_partition and degree >= 1.0 and len(lv) == len(GROUPS)), []
        if degree < 1.0:
            reasons.append(f"degree {degree} < 1: the output code is a slerp that still contains the source identity")
        if len(lv) < len(GROUPS):
            reasons.append(f"levels {','.join(g for g in GROUPS if g not in lv)} keep the source identity code")
        if not anon_partition:
            reasons.append("a cluster has fewer than k identities")
        report.update(measure(model, x, outputs, recon, z_face, id_of_face, k, recognizer, dev))
        hits = report.pop("_hits")
        id_dist = report.pop("_id_dist")
        report.update({"k_anonymous": k_anon, "not_k_anonymous_because": reasons, "partition": part.implementation,
                       "partition_is_k_anonymous": anon_partition, "n_clusters": len(part.sizes),
                       "cluster_sizes": part.sizes.tolist(), "example_cluster": example_cluster,
                       "num_identities": len(id_names)})
        if not k_anon:
            report["warnings"] = []
    else:
        report.update({"k_anonymous": True, "not_k_anonymous_because": [], "cluster_sizes": [],
                       "reidentification_rate": 0.0, "recognizer": "none (no face large enough to generate)",
                       "warnings": []})
    report["outputs"] = write_outputs(inputs, found, faces, outputs, out_dir, quality)
    report["faces"] = face_rows(inputs, found, faces, part, id_of_face, k_anon, k, hits, id_dist)
    if faces:
        from pyfici.methods.ficgan.data import save_grid

        n = min(len(faces), 12)
        grid = out_dir / "grid.png"
        save_grid([x[:n], outputs[:n], recon[:n]], grid)
        report["grid"] = str(grid)
        report["grid_rows"] = ["input", "de-identified", "reconstruction (own identity)"]
    write_json(report, out_dir / "report.json")
    atomic_write_text(report_markdown(report), out_dir / "report.md")
    return report


def measure(model: FICGAN, x, outputs, recon, z_face, id_of_face, k: int, recognizer: str, dev) -> dict:
    """Stage *report*: re-identification rates (two recognizers), identity
    distance, attribute preservation, reconstruction quality, the 1/k check."""
    from pyfici.deid import metrics as M
    from pyfici.models.dlib_face import DlibFaceEncoder

    rr_eval, hits = M.reidentification_rate(x, outputs, id_of_face, recognizer=recognizer, return_matches=True)
    rr = {recognizer: rr_eval}
    other = "dlib" if recognizer != "dlib" else "lbph"
    z_out = _embed(model, outputs, dev)
    same_encoder = other == "dlib" and isinstance(model.E_id, DlibFaceEncoder)
    try:
        rr[other] = M.reidentification_rate(x, outputs, id_of_face, recognizer=other,
                                            features=(z_face, z_out) if same_encoder else None)
    except Exception as e:  # noqa: BLE001 - the second recognizer is informative only
        rr[other] = f"unavailable: {e}"
    id_dist = (1 - (z_face * z_out).sum(1)).tolist()
    n_f = len(x)
    margin = 2 * (max(1.0 / k * (1 - 1.0 / k), 1e-12) / max(1, n_f)) ** 0.5
    within = bool(rr_eval <= 1.0 / k + margin)
    ap = {kk: v for kk, v in M.attribute_preservation(x, outputs).items() if kk != "per_image"}
    out = {
        "reidentification_rate": rr_eval,
        "reidentification_bound_1_over_k": 1.0 / k,
        "recognizer": M.recognizer_name(recognizer),
        "reidentification_rate_by_recognizer": {M.recognizer_name(kk): v for kk, v in rr.items()},
        "reidentification_rate_of_reconstructions": M.reidentification_rate(x, recon, id_of_face, recognizer=recognizer),
        "identity_distance_to_source": {"recognizer": "identity encoder of the model (cosine distance)",
                                        "mean": float(np.mean(id_dist)), "min": float(np.min(id_dist))},
        "attribute_preservation": ap,
        "reconstruction_quality": M.reconstruction_quality(x, recon),
        # Empirical check of the guarantee: the bound 1/k plus two binomial standard errors. A higher
        # rate means identity leaks through the attribute path (the code-level guarantee does not carry over).
        "reidentification_within_bound": within,
        "reidentification_bound_with_noise": 1.0 / k + margin,
        "warnings": [] if within else [
            f"measured re-identification rate {rr_eval:.3f} exceeds 1/k = {1.0 / k:.3f} (+{margin:.3f} sampling noise): "
            "the generator carries the source identity through the attribute path, so these images are NOT "
            "k-anonymous in practice even though every identity code is a k-Same surrogate"],
        "identity_distance": float(np.mean(id_dist)),
        "ssim_outside": ap["ssim_outside"],
        "_hits": hits, "_id_dist": id_dist,
    }
    return out


def write_outputs(inputs: Inputs, found: FoundFaces, faces: list[Face], outputs: torch.Tensor, out_dir: Path,
                  quality: int) -> list[dict]:
    """Stages *paste back* and *write*: every image with a face (generated or
    fallback) is written under ``out/images/`` in its own format."""
    generated: dict[int, dict[int, torch.Tensor]] = {}
    aligned_out: dict[int, torch.Tensor] = {}
    for j, f in enumerate(faces):
        crop = ((outputs[j].clamp(-1, 1) + 1) / 2).float()
        if f.aligned is None:
            aligned_out.setdefault(f.image_index, crop)
        else:
            generated.setdefault(f.image_index, {})[f.aligned] = crop
    per_image: dict[int, list[int]] = {}
    for n, a in enumerate(found.aligned):
        per_image.setdefault(a.det.image_index, []).append(n)
    rows = []
    in_paths = {Path(im.path).resolve() for im in inputs.images if im.path}
    for i in sorted(set(per_image) | set(aligned_out)):
        im = inputs.images[i]
        if i in aligned_out:
            arr = (aligned_out[i] * 255).round().byte().permute(1, 2, 0).numpy()
        else:
            idx = per_image[i]
            gen = {m: generated.get(i, {})[n] for m, n in enumerate(idx) if n in generated.get(i, {})}
            arr = P.compose_output(im, [found.aligned[n] for n in idx], gen)
        dst = P.output_path(out_dir, im)
        if dst.resolve() in in_paths:
            raise DeidError(f"refusing to overwrite input file {P.display_name(str(dst))}")
        P.write_image(arr, dst, im.format, quality)
        rows.append({"input": P.display_name(im.path or f"builtin:{im.name}"), "output": P.display_name(str(dst)),
                     "format": im.format})
    return rows


def face_rows(inputs: Inputs, found: FoundFaces, faces: list[Face], part, id_of_face, k_anon: bool, k: int,
              hits, id_dist) -> list[dict]:
    """Every face of the run: generated faces with cluster and re-identification,
    fallbacks with their reason; box (r, c, h, w), score and action."""
    rows = []
    for j, f in enumerate(faces):
        c = int(part.assignment[id_of_face[j]])
        a = found.aligned[f.aligned] if f.aligned is not None else None
        rows.append({"image": P.display_name(inputs.images[f.image_index].name), "identity": P.display_name(f.identity),
                     "cluster": c, "cluster_size": int(part.sizes[c]), "box": a.det.box_dict() if a else None,
                     "score": a.det.score if a else None, "action": "deidentify",
                     "landmarks": a.landmarks.round(2).tolist() if a else None,
                     "keeps_guarantee": bool(k_anon and int(part.sizes[c]) >= k),
                     "reidentified": bool(hits[j]), "identity_distance": float(id_dist[j])})
    for a in found.aligned:
        if a.action != "deidentify":
            rows.append({"image": P.display_name(inputs.images[a.det.image_index].name), "box": a.det.box_dict(),
                         "score": a.det.score, "action": a.action, "reason": a.reason})
    return rows


# --------------------------------------------------------------------------- video


def deidentify_video(model: FICGAN, input: str, k: int, out: str | os.PathLike, *, degree: float = 1.0,
                     levels: str | list[str] = "coarse,middle,fine", min_face: int = 40, det_threshold: float = 0.0,
                     det_band: float = 0.3, fallback: str = "blur", upsample: int | None = None,
                     max_res: int | None = None, seed: int = 0, device: str = "cpu", quiet: bool = True, batch: int = 8,
                     min_track: int = 3, checkpoint: str | None = None, min_detect: float | None = None,
                     detect_every: int = 5) -> dict:
    """De-identify a video file into ``out/<same name>`` (+ ``report.json``),
    composing the stages of :mod:`pyfici.deid.video`: describe every frame's
    faces (pass 1), track them and merge the tracks of one person, k-Same over
    the people, render (pass 2: each face with its person's surrogate, the
    same code on every frame of a track when ``degree`` is 1; faces of tracks
    shorter than ``min_track`` frames and the other fallbacks obfuscated; audio
    copied; atomic), report per track with its re-identification rate."""
    from pyfici.deid import video as V

    dev = resolve_device(device)
    lv = _check_args(k, degree, levels, "detect", fallback, 95)
    with _deid_errors():
        info = V.video_info(input)
        from pyfici.engine.rundir import check_output_path

        check_output_path(out, [("--input", input)])
        if max_res is not None and max_res < 32:
            raise UserError(f"--max-res must be >= 32 pixels, got {max_res}")
    out_dir, size = Path(out), model.cfg.size
    dst = out_dir / Path(input).name
    if dst.resolve() == Path(input).resolve():
        raise DeidError(f"--out {out} would overwrite the input video {input}: choose another output folder")

    def embed_crops(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.center_codes(_embed(model, x, dev).to(dev)).cpu()

    with _deid_errors():
        fp = V.describe_video(input, info, size, embed_crops, threshold=det_threshold, band=det_band,
                              upsample=upsample, min_face=min_face, fallback=fallback, max_res=max_res, batch=batch,
                              quiet=quiet, min_detect=min_detect, detect_every=detect_every)
    tracks, n_people = V.track_people(fp, fallback, min_track)
    if not tracks:
        raise DeidError(f"--input {input}: no face to de-identify in {fp.n_frames} frames")
    if k > n_people:
        raise DeidError(f"--k {k} is larger than the number of people found in the video ({n_people} in "
                        f"{len(tracks)} track(s)); use --k <= {n_people}")
    person_codes = torch.stack([torch.nn.functional.normalize(torch.stack(
        [f.code for tr in tracks if tr.identity == p for f in tr.faces]).sum(0), dim=0) for p in range(n_people)])
    part = k_same_partition(person_codes, k, seed)

    def generate(x: torch.Tensor, faces: list, people: list[int]) -> torch.Tensor:
        c_face = torch.stack([f.code for f in faces])
        z = slerp(c_face, part.surrogates[part.assignment[people]], degree)
        return _generate(model, x, {g: (z if g in lv else c_face) for g in GROUPS}, dev)

    make_output_folder(out_dir)
    with _deid_errors():
        hits = V.render_video(input, dst, info, fp, tracks, n_people, size, generate, quiet=quiet)
    all_hits = [h for v in hits.values() for h in v]
    rows = V.track_rows(tracks, part.assignment, part.sizes, hits)
    lbph = [(t["reidentification_rate_lbph"], t["n_frames"]) for t in rows if t["reidentification_rate_lbph"] is not None]
    report = {"input": P.display_name(input), "output": P.display_name(str(dst)), "k": k, "degree": degree,
              "levels": lv, "checkpoint": str(checkpoint) if checkpoint else None, "video": info,
              "n_frames": fp.n_frames, "n_tracks": len(tracks), "n_people": n_people,
              "cluster_sizes": part.sizes.tolist(), "partition": part.implementation,
              "k_anonymous": bool(part.is_k_anonymous(k) and degree >= 1.0 and len(lv) == len(GROUPS)),
              "tracks": rows,
              "reidentification_rate": float(np.mean(all_hits)) if all_hits else 0.0,
              "reidentification_rate_lbph": (sum(r * n for r, n in lbph) / sum(n for _, n in lbph)) if lbph else None,
              "reidentification_bound_1_over_k": 1.0 / k,
              "recognizer": "dlib face descriptor (pyfici port), nearest person of the clip",
              "detector": {"threshold": det_threshold, "band": det_band, "upsample": upsample, "max_res": max_res,
                           "min_detect": P.MIN_DETECT_FACE if min_detect is None else min_detect,
                           "detect_every": detect_every},
              "fallbacks": [{"frame": t, "box": a.det.box_dict(), "score": a.det.score, "action": a.action,
                             "reason": a.reason} for t, v in sorted(fp.fallbacks.items()) for a in v],
              "audio_copied": info["audio"]}
    write_json(report, out_dir / "report.json")
    return report


def report_markdown(r: dict) -> str:
    esc = html.escape
    lines = [f"# De-identification report (k = {r['k']})", "",
             f"- **k-anonymous: {'yes' if r.get('k_anonymous') else 'NO'}**"]
    for why in r.get("not_k_anonymous_because", []):
        lines.append(f"  - not k-anonymous: {esc(why)}")
    if r.get("k_anonymous"):
        lines.append("  - (the identity code of every output is the surrogate of >= k identities)")
    for w in r.get("warnings", []):
        lines.append(f"- **WARNING: {esc(w)}**")
    lines += [f"- degree: {r['degree']}, levels taking the surrogate: {', '.join(r['levels'])}",
              f"- images: {r['n_images']}, faces generated: {r['n_faces']}, identities: {r['n_identities']}",
              f"- cluster sizes: {r.get('cluster_sizes')} (partition: {r.get('partition', '-')})"]
    if "reidentification_rate" in r and r.get("n_faces"):
        lines += [f"- re-identification rate: **{r['reidentification_rate']:.3f}** (bound 1/k = {1 / r['k']:.3f}), "
                  f"recognizer: {esc(r['recognizer'])}"]
        for name, v in r.get("reidentification_rate_by_recognizer", {}).items():
            lines.append(f"  - {esc(name)}: {v if isinstance(v, str) else f'{v:.3f}'}")
        lines.append(f"- re-identification rate of plain reconstructions (no de-identification): "
                     f"{r['reidentification_rate_of_reconstructions']:.3f}")
        idd = r["identity_distance_to_source"]
        ap = r["attribute_preservation"]
        rq = r["reconstruction_quality"]
        lines += [f"- identity distance to source (cosine, model's encoder): mean {idd['mean']:.4f}",
                  f"- attribute preservation outside the identity region: SSIM {ap['ssim_outside']:.3f}, "
                  f"L1 {ap['l1_outside']:.4f}, mean colour shift {ap['mean_colour_shift']:.4f}",
                  f"- reconstruction quality: PSNR {rq['psnr']:.2f} dB, SSIM {rq['ssim']:.3f}, L1 {rq['l1']:.4f}"]
    for key, title in (("blurred_small_faces", "faces not generated (fallback)"), ("no_face", "images with no face"),
                       ("skipped_files", "unreadable files (skipped)")):
        if r.get(key):
            lines += ["", f"## {title}", ""] + [f"- {esc(str(v))}" for v in r[key]]
    if r.get("grid"):
        lines += ["", f"![grid]({Path(r['grid']).name})", "", "rows: " + ", ".join(r.get("grid_rows", []))]
    gen = [f for f in r.get("faces", []) if f.get("action") == "deidentify"]
    if gen:
        lines += ["", "| image | cluster | size | keeps guarantee | re-identified |", "|---|---|---|---|---|"]
        lines += [f"| {esc(f['image'])} | {f['cluster']} | {f['cluster_size']} | {f['keeps_guarantee']} | {f['reidentified']} |"
                  for f in gen]
    det = [f for f in r.get("faces", []) if f.get("box")]
    if det:
        lines += ["", "## every detected face", "", "| image | box (r, c, h, w) | score | action |", "|---|---|---|---|"]
        lines += [f"| {esc(f['image'])} | {f['box']['r']}, {f['box']['c']}, {f['box']['h']}, {f['box']['w']} | "
                  f"{f['score']:.3f} | {esc(f['action'] + (' (' + f['reason'] + ')' if f.get('reason') else ''))} |"
                  for f in det]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- CLI and library helpers


def _quality(text: str) -> int:
    """argparse type of --quality: an integer 1..100 (JPEG / WebP encoder quality)."""
    q = count_type(1)(text)
    if q > 100:
        raise argparse.ArgumentTypeError(f"must be <= 100, got {q}")
    return q


def add_deid_arguments(p: argparse.ArgumentParser) -> None:
    from pyfici.engine.config import add_json_argument
    from pyfici.engine.runtime import DEVICE_HELP

    p.add_argument("--checkpoint", required=True, help="FICGAN weights (final.pt from pyfici train ficgan)")
    p.add_argument("--input", required=True, help="an image, a folder of images, a video (.mp4, .mov, .mkv, .webm, .avi), or 'builtin'")
    p.add_argument("--k", type=count_type(1), default=10, help="k of k-anonymity (default: %(default)s)")
    p.add_argument("--out", required=True, help="output folder (not the input folder or inside it)")
    p.add_argument("--degree", type=float, default=1.0, help="alpha in [0,1]: slerp toward the surrogate (<1: not k-anonymous)")
    p.add_argument("--levels", default="coarse,middle,fine", help="levels that take the surrogate identity")
    p.add_argument("--example", default=None, help="image whose cluster's surrogate every output takes")
    p.add_argument("--labels", default=None, help="file of 'NAME LABEL' lines: partition identities, not images")
    p.add_argument("--faces", dest="faces_mode", default="auto", choices=("auto", "aligned", "detect"))
    p.add_argument("--det-threshold", type=float, default=0.0,
                   help="detector score above which a face is de-identified (default: %(default)s, dlib's)")
    p.add_argument("--det-band", type=float, default=0.3,
                   help="detections scoring up to this much below --det-threshold get the --fallback (default: %(default)s)")
    p.add_argument("--upsample", type=count_type(0), default=None,
                   help="enlarge images 2x this many times before detection, as dlib does (1 finds faces from ~40 px); "
                        "default: the scale that finds faces of --min-detect pixels")
    p.add_argument("--min-detect", type=count_type(1), default=P.MIN_DETECT_FACE,
                   help="smallest face (pixels) detection must find; sets the scan scale, capped by --max-res "
                        "(default: %(default)s; ignored with --upsample)")
    p.add_argument("--detect-every", type=count_type(1), default=5,
                   help="video: scan every N-th frame whole and the frames between near the faces already found "
                        "(1: every frame whole; default: %(default)s)")
    p.add_argument("--fallback", default="blur", choices=P.FALLBACKS,
                   help="what faces that cannot be de-identified get (too small, uncertain, failed alignment)")
    p.add_argument("--min-face", type=count_type(0), default=40, help="faces smaller than this (pixels) get the --fallback")
    p.add_argument("--quality", type=_quality, default=95, help="JPEG/WebP quality of the outputs (default: %(default)s)")
    p.add_argument("--max-res", type=count_type(1), default=None, help="detect on a copy whose longer side is at most this")
    p.add_argument("--size", type=count_type(1), default=None, help="expected image size of the checkpoint (checked)")
    p.add_argument("--recognizer", default="lbph", choices=("lbph", "dlib"), help="evaluation recognizer")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_json_argument(p)


def load_checkpoint_for_deid(path: str, size: int | None, device: str = "cpu") -> FICGAN:
    from pyfici.methods.ficgan.train import load_ficgan

    dev = resolve_device(device)  # a bad --device is reported as such
    try:
        model = load_ficgan(path, device=dev)
    except UserError as e:
        raise DeidError(str(e)) from None
    except FileNotFoundError as e:
        raise DeidError(f"--checkpoint: {e}") from None
    except (RuntimeError, KeyError, TypeError) as e:
        raise DeidError(f"--checkpoint {path}: not a FICGAN checkpoint of this pyfici version ({type(e).__name__}: {e})") from None
    except Exception as e:  # noqa: BLE001 - unpickling errors of foreign files
        if isinstance(e, ValueError):
            raise DeidError(str(e)) from None
        raise DeidError(f"--checkpoint {path}: cannot load ({type(e).__name__}: {e})") from None
    if size is not None and size != model.cfg.size:
        raise DeidError(f"--checkpoint {path} was trained at image size {model.cfg.size}, not --size {size}; "
                        f"use a checkpoint trained with --size {size} or drop --size")
    return model


def deid_main(args) -> int:
    """``pyfici deid``: errors are :class:`DeidError` (a UserError: one line on stderr, exit 2)."""
    import sys

    from pyfici.engine.config import emit_json

    model = load_checkpoint_for_deid(args.checkpoint, args.size, args.device)
    from pyfici.deid.video import is_video

    if is_video(args.input):
        r = deidentify_video(model, args.input, args.k, args.out, degree=args.degree, levels=args.levels,
                             min_face=args.min_face, det_threshold=args.det_threshold, det_band=args.det_band,
                             fallback=args.fallback, upsample=args.upsample, max_res=args.max_res, seed=args.seed,
                             device=args.device, quiet=args.quiet, checkpoint=args.checkpoint,
                             min_detect=args.min_detect, detect_every=args.detect_every)
        print(f"k={r['k']} k_anonymous={r['k_anonymous']} people={r['n_people']} tracks={r['n_tracks']} "
              f"clusters={r['cluster_sizes']} reidentification_rate={r['reidentification_rate']:.3f} (dlib), "
              f"{'n/a' if r['reidentification_rate_lbph'] is None else format(r['reidentification_rate_lbph'], '.3f')}"
              " (LBPH)")
        for t in r["tracks"]:
            print(f"  track {t['track']}: frames {t['first_frame']}-{t['last_frame']} person {t['person']} "
                  f"cluster {t['cluster']} reidentification_rate {t['reidentification_rate']}")
        print(f"video: {r['output']}")
        if getattr(args, "json", None):
            emit_json(r, args.json)
        return 0
    r = deidentify(model, args.input, args.k, args.out, degree=args.degree, levels=args.levels,
                   example=args.example, labels=args.labels, faces_mode=args.faces_mode, min_face=args.min_face,
                   det_threshold=args.det_threshold, det_band=args.det_band, fallback=args.fallback,
                   upsample=args.upsample, min_detect=args.min_detect, quality=args.quality, max_res=args.max_res,
                   recognizer=args.recognizer, seed=args.seed,
                   device=args.device, checkpoint=args.checkpoint)
    print(f"k={r['k']} k_anonymous={r['k_anonymous']} clusters={r.get('cluster_sizes')} "
          f"reidentification_rate={r.get('reidentification_rate')} ({r.get('recognizer')})")
    for why in r.get("not_k_anonymous_because", []):
        print(f"  not k-anonymous: {why}")
    for w in r.get("warnings", []):
        print(f"  WARNING: {w}")
    for s in r.get("no_face", []):
        print(f"  no face: {s['image']}", file=sys.stderr)
    for s in r.get("blurred_small_faces", []):
        print(f"  {s['action']}: {s['image']} {s['box']} ({s['reason']})", file=sys.stderr)
    for s in r.get("skipped_files", []):
        print(f"  skipped: {s['reason']}", file=sys.stderr)
    print(f"report: {P.display_name(str(Path(args.out) / 'report.json'))}")
    if getattr(args, "json", None):
        emit_json(r, args.json)
    return 0


def deidentify_builtin(checkpoint: str | os.PathLike, ks=(2, 5, 10), out: str | os.PathLike = "runs/ficgan_deid",
                       **kw) -> list[dict]:
    """De-identify the built-in faces at each k; returns the reports (each with
    ``report["grid"]``, the grid PNG path; written to ``out/k{K}/``)."""
    model = load_checkpoint_for_deid(str(checkpoint), None, kw.get("device", "cpu"))
    return [deidentify(model, "builtin", int(k), Path(out) / f"k{k}", checkpoint=str(checkpoint), **kw) for k in ks]
