"""De-identification with manifold k-Same: ``pyfici deid`` and :func:`deidentify`.

Pipeline: read inputs (never modified) -> faces (aligned crops as they are,
or detected in photos) -> identity embeddings (one per identity: the
spherical mean of its faces when ``labels`` are given) -> k-Same partition of
the identities (:func:`pyfici.deid.k_same`) -> every face is generated with
its cluster's surrogate identity (spherical mean of the cluster) on the
chosen levels, slerped by ``degree`` -> outputs pasted back (photos), faces
too small blurred -> images, grid, ``report.json`` and ``report.md``.

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
import html
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pyfici.deid import check_k_anonymity, k_same
from pyfici.methods._common import atomic_write_text, resolve_device, write_json
from pyfici.methods.ficgan.data import (
    IMAGE_EXTS,
    ImageInputError,
    LoadedImage,
    builtin_face_images,
    list_images,
    read_image,
    resize_tensor,
    save_grid,
    save_png,
)
from pyfici.methods.ficgan.detect import (
    FaceBox,
    LBPCascadeDetector,
    blur_box,
    crop_box,
    extract_crop,
    paste_crop,
)
from pyfici.methods.ficgan.model import FICGAN, GROUPS, slerp


class DeidError(ValueError):
    """Bad input for de-identification (the message says what and how to fix it)."""


# --------------------------------------------------------------------------- k-Same


@dataclass
class Partition:
    assignment: torch.Tensor  # [N] long, cluster of each identity
    surrogates: torch.Tensor  # [C, D] unit-norm spherical means
    sizes: torch.Tensor  # [C] long
    implementation: str


def k_same_partition(emb: torch.Tensor, k: int, seed: int = 0) -> Partition:
    """k-Same partition of identity embeddings ``[N, D]`` by
    :func:`pyfici.deid.k_same` (greedy, cosine; spherical-mean surrogates)."""
    res = k_same(emb, k, metric="cosine", seed=seed, method="greedy")
    return Partition(res.assignment.long().cpu(), F.normalize(res.surrogates.float().cpu(), dim=1),
                     res.sizes.long().cpu(), "pyfici.deid.k_same (greedy, cosine)")


def is_k_anonymous(assignment: torch.Tensor, k: int) -> bool:
    return bool(check_k_anonymity(assignment, k))


# --------------------------------------------------------------------------- inputs


@dataclass
class Face:
    image_index: int
    crop: torch.Tensor  # [3, S, S] in [-1, 1]
    box: FaceBox | None  # None: the whole image is an aligned crop
    square: tuple[int, int, int] | None  # (top, left, side) of the crop in the image
    identity: str = ""


@dataclass
class Inputs:
    images: list[LoadedImage]
    sources: list[str]  # path of each image (or "builtin:NAME")
    skipped: list[dict] = field(default_factory=list)  # unreadable files


def gather_inputs(spec: str) -> Inputs:
    """``spec``: an image file, a folder (searched recursively), or ``"builtin"``."""
    if spec == "builtin":
        imgs = builtin_face_images()
        return Inputs(imgs, [f"builtin:{i.name}" for i in imgs])
    p = Path(spec)
    if not p.exists():
        raise DeidError(f"--input {spec}: no such file or folder")
    if p.is_file():
        if p.suffix.lower() not in IMAGE_EXTS:
            raise DeidError(f"--input {spec}: not an image file (expected one of {', '.join(IMAGE_EXTS)})")
        try:
            return Inputs([read_image(p)], [str(p)])
        except ImageInputError as e:
            raise DeidError(f"--input: {e}") from e
    files = list_images(p)
    if not files:
        raise DeidError(f"--input {spec}: the folder holds no image files ({', '.join(IMAGE_EXTS)})")
    out = Inputs([], [])
    for f in files:
        try:
            img = read_image(f)
        except ImageInputError as e:
            out.skipped.append({"file": str(f), "reason": str(e)})
            continue
        img.name = str(f.relative_to(p))
        out.images.append(img)
        out.sources.append(str(f))
    if not out.images:
        raise DeidError(f"--input {spec}: none of the {len(files)} image files could be read: "
                        + "; ".join(s["reason"] for s in out.skipped[:3]))
    return out


def looks_aligned(img: np.ndarray, size: int) -> bool:
    """``--faces auto``: an image is taken as an aligned face crop when it is
    roughly square (aspect 0.8..1.25) and its shorter side is at most
    max(256, 2 x size) pixels; anything else is a photo to search for faces."""
    h, w = img.shape[:2]
    return 0.8 <= h / w <= 1.25 and min(h, w) <= max(256, 2 * size)


def find_faces(inputs: Inputs, size: int, mode: str = "auto", detector=None, min_face: int = 32,
               margin: float = 1.3) -> tuple[list[Face], list[dict], list[dict]]:
    """-> (faces to generate, small faces to blur [{image_index, box}], images with no face)."""
    faces: list[Face] = []
    small: list[dict] = []
    no_face: list[dict] = []
    det = detector
    for i, li in enumerate(inputs.images):
        img = li.image
        if mode == "aligned" or (mode == "auto" and looks_aligned(img, size)):
            h, w = img.shape[:2]
            s = min(h, w)
            t, left = (h - s) // 2, (w - s) // 2
            faces.append(Face(i, resize_tensor(img[t : t + s, left : left + s], size), None, (t, left, s)))
            continue
        if det is None:
            det = LBPCascadeDetector()
        boxes = det(img)
        if not boxes:
            no_face.append({"image": li.name, "reason": f"no face found by {getattr(det, 'name', 'the detector')}"})
            continue
        for b in boxes:
            if min(b.h, b.w) < min_face:
                small.append({"image_index": i, "image": li.name, "box": b.to_dict()})
                continue
            top, left, side = crop_box(b, margin)
            faces.append(Face(i, extract_crop(img, top, left, side, size), b, (top, left, side)))
    return faces, small, no_face


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


# --------------------------------------------------------------------------- main routine


def _embed(model: FICGAN, x: torch.Tensor, dev) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.identity(x[i:i + 32].to(dev)).cpu() for i in range(0, len(x), 32)])


def _generate(model: FICGAN, x: torch.Tensor, codes: dict[str, torch.Tensor], dev) -> torch.Tensor:
    """``codes``: per-group codes in the generator's code space (:meth:`FICGAN.center_codes`)."""
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


def deidentify(model: FICGAN, input: str, k: int, out: str | os.PathLike, *, degree: float = 1.0,
               levels: str | list[str] = "coarse,middle,fine", example: str | None = None, labels: str | None = None,
               faces_mode: str = "auto", min_face: int = 32, detector=None, recognizer: str = "lbph",
               seed: int = 0, device: str = "cpu", checkpoint: str | None = None) -> dict:
    """De-identify ``input`` (file, folder or ``"builtin"``) into ``out``; returns
    the report (also ``out/report.json``, ``out/report.md``, ``out/grid.png``,
    ``out/images/``). Raises :class:`DeidError` with a clear message on bad input."""
    dev = resolve_device(device)
    if not isinstance(k, int) or k < 1:
        raise DeidError(f"--k must be a positive integer, got {k!r}")
    if not 0.0 <= degree <= 1.0:
        raise DeidError(f"--degree must be in [0, 1], got {degree}")
    lv = parse_levels(levels)
    if faces_mode not in ("auto", "aligned", "detect"):
        raise DeidError(f"--faces must be auto, aligned or detect, got {faces_mode!r}")
    size = model.cfg.size
    out_dir = Path(out)
    inputs = gather_inputs(input)
    in_paths = {Path(s).resolve() for s in inputs.sources if not s.startswith("builtin:")}
    if input != "builtin":
        root = Path(input).resolve()
        od = out_dir.resolve()
        if od == root or (root.is_dir() and root in od.parents) or od in in_paths:
            raise DeidError(f"--out {out}: must not be (inside) the input folder; inputs are never overwritten")
    faces, small, no_face = find_faces(inputs, size, faces_mode, detector, min_face)
    if not faces and not small:
        raise DeidError(f"--input {input}: no face found in any image ({len(no_face)} image(s) searched); "
                        "use --faces aligned if the images are already face crops")
    # identities
    names = [inputs.images[f.image_index].name for f in faces]
    if labels:
        lab = read_labels(labels, sorted({n for n in names}))
        seen: dict[tuple[int, str], int] = {}
        for f, n in zip(faces, names):
            j = seen.setdefault((f.image_index, lab[n]), 0)
            seen[(f.image_index, lab[n])] += 1
            f.identity = lab[n] if j == 0 else f"{lab[n]}#face{j}"  # extra faces in one photo: own identity
    else:
        for idx, (f, n) in enumerate(zip(faces, names)):
            f.identity = n if f.box is None else f"{n}#face{idx}"
    id_names = sorted({f.identity for f in faces})
    id_of_face = torch.tensor([id_names.index(f.identity) for f in faces], dtype=torch.long)
    if faces and k > len(id_names):
        raise DeidError(f"--k {k} is larger than the number of identities ({len(id_names)} in {len(faces)} face(s)); "
                        f"k-anonymity needs at least k identities: use --k <= {len(id_names)} or add images")
    out_dir.mkdir(parents=True, exist_ok=True)
    x = torch.stack([f.crop for f in faces]) if faces else torch.zeros(0, 3, size, size)
    report: dict = {"k": k, "degree": degree, "levels": lv, "example": example, "labels": labels,
                    "checkpoint": str(checkpoint) if checkpoint else None, "input": input, "image_size": size,
                    "faces_mode": faces_mode, "n_images": len(inputs.images), "n_faces": len(faces),
                    "n_identities": len(id_names), "skipped_files": inputs.skipped, "no_face": no_face,
                    "blurred_small_faces": [{k2: v for k2, v in s.items() if k2 != "image_index"} for s in small],
                    "conversions": {li.name: li.notes for li in inputs.images if li.notes}}
    outputs = x.clone()
    if faces:
        z_face = _embed(model, x, dev)
        # partition, surrogates and slerp live in the generator's code space (identity embeddings
        # centred on the training mean when the model was trained so; else the embeddings themselves)
        with torch.no_grad():
            c_face = model.center_codes(z_face.to(dev)).cpu()
        z_id = F.normalize(torch.zeros(len(id_names), c_face.shape[1]).index_add_(0, id_of_face, c_face), dim=1)
        part = k_same_partition(z_id, k, seed)
        anon_partition = is_k_anonymous(part.assignment, k)
        cluster_of_face = part.assignment[id_of_face]
        target = part.surrogates[cluster_of_face]
        example_cluster = None
        if example:
            ex = gather_inputs(example)
            ex_faces, _, _ = find_faces(ex, size, faces_mode, detector, min_face)
            if not ex_faces:
                raise DeidError(f"--example {example}: no face found")
            with torch.no_grad():
                c_ex = model.center_codes(_embed(model, ex_faces[0].crop[None], dev).to(dev)).cpu()
            example_cluster = int(torch.argmax(part.surrogates @ c_ex[0]))
            target = part.surrogates[example_cluster].expand_as(target)
        z_mix = slerp(c_face, target, degree)
        codes = {g: (z_mix if g in lv else c_face) for g in GROUPS}
        outputs = _generate(model, x, codes, dev)
        recon = _generate(model, x, {g: c_face for g in GROUPS}, dev)
        full_control = degree >= 1.0 and len(lv) == len(GROUPS)
        k_anon = bool(anon_partition and full_control)
        reasons = []
        if degree < 1.0:
            reasons.append(f"degree {degree} < 1: the output code is a slerp that still contains the source identity")
        if len(lv) < len(GROUPS):
            reasons.append(f"levels {','.join(g for g in GROUPS if g not in lv)} keep the source identity code")
        if not anon_partition:
            reasons.append("a cluster has fewer than k identities")
        from pyfici.deid import metrics as M

        rr_eval, hits = M.reidentification_rate(x, outputs, id_of_face, recognizer=recognizer, return_matches=True)
        rr = {recognizer: rr_eval}
        other = "dlib" if recognizer != "dlib" else "lbph"
        z_out = _embed(model, outputs, dev)
        from pyfici.models.dlib_face import DlibFaceEncoder

        same_encoder = other == "dlib" and isinstance(model.E_id, DlibFaceEncoder)
        try:
            rr[other] = M.reidentification_rate(x, outputs, id_of_face, recognizer=other,
                                                features=(z_face, z_out) if same_encoder else None)
        except Exception as e:  # noqa: BLE001 - the second recognizer is informative only
            rr[other] = f"unavailable: {e}"
        id_dist = (1 - (z_face * z_out).sum(1)).tolist()
        rr_recon = M.reidentification_rate(x, recon, id_of_face, recognizer=recognizer)
        report.update({
            "k_anonymous": k_anon,
            "not_k_anonymous_because": reasons,
            "partition": part.implementation,
            "partition_is_k_anonymous": anon_partition,
            "n_clusters": len(part.sizes),
            "cluster_sizes": part.sizes.tolist(),
            "example_cluster": example_cluster,
            "reidentification_rate": rr_eval,
            "reidentification_bound_1_over_k": 1.0 / k,
            "recognizer": M.recognizer_name(recognizer),
            "reidentification_rate_by_recognizer": {M.recognizer_name(kk): v for kk, v in rr.items()},
            "reidentification_rate_of_reconstructions": rr_recon,
            "identity_distance_to_source": {"recognizer": "identity encoder of the model (cosine distance)",
                                            "mean": float(np.mean(id_dist)), "min": float(np.min(id_dist))},
            "attribute_preservation": {kk: v for kk, v in M.attribute_preservation(x, outputs).items() if kk != "per_image"},
            "reconstruction_quality": M.reconstruction_quality(x, recon),
        })
        # Empirical check of the guarantee: the bound 1/k plus two binomial
        # standard errors. A higher rate means identity leaks through the
        # attribute path (the code-level guarantee does not carry over).
        n_f = len(faces)
        margin = 2 * (max(1.0 / k * (1 - 1.0 / k), 1e-12) / max(1, n_f)) ** 0.5
        within = bool(rr_eval <= 1.0 / k + margin)
        report["reidentification_within_bound"] = within
        report["reidentification_bound_with_noise"] = 1.0 / k + margin
        report["warnings"] = [] if within or not k_anon else [
            f"measured re-identification rate {rr_eval:.3f} exceeds 1/k = {1.0 / k:.3f} (+{margin:.3f} sampling noise): "
            "the generator carries the source identity through the attribute path, so these images are NOT "
            "k-anonymous in practice even though every identity code is a k-Same surrogate"]
        # flat aliases used by pyfici.demo's table
        report["num_identities"] = len(id_names)
        report["identity_distance"] = report["identity_distance_to_source"]["mean"]
        report["ssim_outside"] = report["attribute_preservation"]["ssim_outside"]
    else:
        report.update({"k_anonymous": True, "not_k_anonymous_because": [], "cluster_sizes": [],
                       "reidentification_rate": 0.0, "recognizer": "none (no face large enough to generate)"})
    # ---- write images (copies; inputs untouched)
    img_dir = out_dir / "images"
    per_output = []
    edited = {i: li.image.copy() for i, li in enumerate(inputs.images)}
    for j, f in enumerate(faces):
        if f.box is None:
            continue
        paste_crop(edited[f.image_index], outputs[j], *f.square)  # type: ignore[misc]
    for s in small:
        blur_box(edited[s["image_index"]], FaceBox(**s["box"]))
    touched = {f.image_index for f in faces} | {s["image_index"] for s in small}
    for i in sorted(touched):
        li = inputs.images[i]
        aligned = [j for j, f in enumerate(faces) if f.image_index == i and f.box is None]
        if aligned:
            arr = ((outputs[aligned[0]].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        else:
            arr = (np.clip(edited[i], 0, 1) * 255).round().astype(np.uint8)
        dst = img_dir / (str(Path(li.name).with_suffix("")) + ".png")
        if dst.resolve() in in_paths:
            raise DeidError(f"refusing to overwrite input file {dst}")
        save_png(arr, dst)
        per_output.append({"input": inputs.sources[i], "output": str(dst)})
    face_rows = []
    for j, f in enumerate(faces):
        c = int(cluster_of_face[j])
        face_rows.append({"image": inputs.images[f.image_index].name, "identity": f.identity, "cluster": c,
                          "cluster_size": int(part.sizes[c]), "box": f.box.to_dict() if f.box else None,
                          "keeps_guarantee": bool(k_anon and int(part.sizes[c]) >= k),
                          "reidentified": bool(hits[j]), "identity_distance": float(id_dist[j])})
    report["outputs"] = per_output
    report["faces"] = face_rows
    if faces:
        n = min(len(faces), 12)
        grid = out_dir / "grid.png"
        save_grid([x[:n], outputs[:n], recon[:n]], grid)
        report["grid"] = str(grid)
        report["grid_rows"] = ["input", "de-identified", "reconstruction (own identity)"]
    write_json(report, out_dir / "report.json")
    atomic_write_text(report_markdown(report), out_dir / "report.md")
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
    for key, title in (("blurred_small_faces", "faces too small: blurred"), ("no_face", "images with no face"),
                       ("skipped_files", "unreadable files (skipped)")):
        if r.get(key):
            lines += ["", f"## {title}", ""] + [f"- {esc(str(v))}" for v in r[key]]
    if r.get("grid"):
        lines += ["", f"![grid]({Path(r['grid']).name})", "", "rows: " + ", ".join(r.get("grid_rows", []))]
    if r.get("faces"):
        lines += ["", "| image | cluster | size | keeps guarantee | re-identified |", "|---|---|---|---|---|"]
        lines += [f"| {esc(f['image'])} | {f['cluster']} | {f['cluster_size']} | {f['keeps_guarantee']} | {f['reidentified']} |"
                  for f in r["faces"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- CLI and library helpers


def add_deid_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="FICGAN weights (last.pt from pyfici train ficgan)")
    p.add_argument("--input", required=True, help="an image, a folder of images, or 'builtin'")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--out", required=True)
    p.add_argument("--degree", type=float, default=1.0, help="alpha in [0,1]: slerp toward the surrogate (<1: not k-anonymous)")
    p.add_argument("--levels", default="coarse,middle,fine", help="levels that take the surrogate identity")
    p.add_argument("--example", default=None, help="image whose cluster's surrogate every output takes")
    p.add_argument("--labels", default=None, help="file of 'NAME LABEL' lines: partition identities, not images")
    p.add_argument("--faces", dest="faces_mode", default="auto", choices=("auto", "aligned", "detect"))
    p.add_argument("--min-face", type=int, default=32, help="faces smaller than this (pixels) are blurred")
    p.add_argument("--size", type=int, default=None, help="expected image size of the checkpoint (checked)")
    p.add_argument("--recognizer", default="lbph", choices=("lbph", "dlib"), help="evaluation recognizer")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)


def load_checkpoint_for_deid(path: str, size: int | None, device: str = "cpu") -> FICGAN:
    from pyfici.methods.ficgan.train import load_ficgan

    try:
        model = load_ficgan(path, device=resolve_device(device))
    except FileNotFoundError as e:
        raise DeidError(f"--checkpoint: {e}") from e
    except (RuntimeError, KeyError, TypeError) as e:
        raise DeidError(f"--checkpoint {path}: not a FICGAN checkpoint of this pyfici version ({type(e).__name__}: {e})") from e
    except Exception as e:  # noqa: BLE001 - unpickling errors of foreign files
        if isinstance(e, ValueError):
            raise DeidError(str(e)) from e
        raise DeidError(f"--checkpoint {path}: cannot load ({type(e).__name__}: {e})") from e
    if size is not None and size != model.cfg.size:
        raise DeidError(f"--checkpoint {path} was trained at image size {model.cfg.size}, not --size {size}; "
                        f"use a checkpoint trained with --size {size} or drop --size")
    return model


def deid_main(args) -> int:
    try:
        model = load_checkpoint_for_deid(args.checkpoint, args.size, args.device)
        r = deidentify(model, args.input, args.k, args.out, degree=args.degree, levels=args.levels,
                       example=args.example, labels=args.labels, faces_mode=args.faces_mode, min_face=args.min_face,
                       recognizer=args.recognizer, seed=args.seed, device=args.device, checkpoint=args.checkpoint)
    except (DeidError, ImageInputError) as e:
        print(f"pyfici deid: error: {e}")
        return 2
    print(f"k={r['k']} k_anonymous={r['k_anonymous']} clusters={r.get('cluster_sizes')} "
          f"reidentification_rate={r.get('reidentification_rate')} ({r.get('recognizer')})")
    for why in r.get("not_k_anonymous_because", []):
        print(f"  not k-anonymous: {why}")
    for w in r.get("warnings", []):
        print(f"  WARNING: {w}")
    for s in r.get("no_face", []):
        print(f"  no face: {s['image']}")
    for s in r.get("blurred_small_faces", []):
        print(f"  face too small, blurred: {s['image']} {s['box']}")
    for s in r.get("skipped_files", []):
        print(f"  skipped: {s['reason']}")
    print(f"report: {Path(args.out) / 'report.json'}")
    return 0


def deidentify_builtin(checkpoint: str | os.PathLike, ks=(2, 5, 10), out: str | os.PathLike = "runs/ficgan_deid",
                       **kw) -> list[dict]:
    """De-identify the built-in faces at each k; returns the reports (each with
    ``report["grid"]``, the grid PNG path; written to ``out/k{K}/``)."""
    model = load_checkpoint_for_deid(str(checkpoint), None, kw.get("device", "cpu"))
    return [deidentify(model, "builtin", int(k), Path(out) / f"k{k}", checkpoint=str(checkpoint), **kw) for k in ks]
