import json
import subprocess
import sys

from pyfici import _native
from pyfici.cli import main


def test_info_lists_backends(capsys):
    assert main(["info", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    for key in ("pyfici", "torch", "triton", "backend_cpu", "backend_cuda", "backend_triton", "devices"):
        assert key in d
    assert d["backend_cpu"].startswith("built")


def test_python_m_pyfici_info():
    out = subprocess.run([sys.executable, "-m", "pyfici", "info"], capture_output=True, text=True, check=True).stdout
    assert "backend_cpu" in out and "torch" in out


def test_cuda_module_compiled_when_nvcc_present():
    # CI builds on a machine with nvcc: the CUDA module must be built and importable
    import shutil

    if shutil.which("nvcc") is None:
        import pytest

        pytest.skip("no nvcc on this machine")
    assert _native.has_cuda(), _native._CUDA_ERROR
    assert "80" in _native.cuda_module().__archs__


def test_bench_small_prints_table(capsys):
    assert main(["bench", "--family", "reid", "--size", "small", "--device", "cpu", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "anchor/pyfici" in out and "pyfici evaluate_distmat" in out
    from pyfici import _native

    assert f"pyfici CPU variant {_native.CPU_ISA}" in out and _native.cpu_model() in out


def test_bench_interleaves_the_timed_runs():
    """One run of every implementation per round (drift on a shared machine hits all of them
    alike); a slow anchor given as (fn, n) gets no warm-up and at most n runs."""
    from pyfici.bench import Case, time_interleaved

    calls = []
    fns = {"pyfici": lambda: calls.append("a"), "anchor": lambda: calls.append("b"),
           "slow": (lambda: calls.append("s"), 2)}
    case = Case("optim", "t", lambda: fns, repeats=4, warmup=1)
    runs = time_interleaved(case, fns, "cpu")
    assert [len(runs[k]) for k in ("pyfici", "anchor", "slow")] == [4, 4, 2]
    assert calls == ["a", "b"] + ["a", "b", "s"] * 2 + ["a", "b"] * 2
    assert all(t >= 0 for r in runs.values() for t in r)


# ----------------------------------------------------------------------------- the CLI convention

import pytest  # noqa: E402
import torch  # noqa: E402

TRAIN = [("train", "autolr"), ("train", "rollback"), ("train", "ficgan")]


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("pyfici: error: "), err
    for n in needles:
        assert n in errors[0], (n, errors[0])
    assert "Traceback" not in err and "weights_only=False" not in err


@pytest.mark.parametrize("cmd", TRAIN + [("eval", "reid")])
def test_convention_flags_exist(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    help_ = capsys.readouterr().out
    flags = ["--device", "--quiet", "--json"] + (["--out", "--resume", "--seed"] if cmd[0] == "train" else ["--workers"])
    if cmd != ("train", "ficgan"):
        flags.append("--workers")
    for flag in flags:
        assert flag in help_, (cmd, flag)


@pytest.mark.parametrize("argv", [
    ["train", "rollback", "--stop-after-epochs", "-1"],
    ["train", "autolr", "--epochs", "0"],
    ["train", "autolr", "--workers", "-3"],
    ["train", "autolr", "--dataset", "nope"],
    ["train", "ficgan", "--data", "builtin", "--out", "x", "--steps", "-5"],
    ["eval", "reid", "--features", "f.pt", "--batch-size", "0"],
    ["train", "rollback", "--image-size", "32"],
])
def test_bad_argument_exits_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    _one_line_error(capsys, argv[1])


@pytest.mark.parametrize("cmd", TRAIN)
def test_resume_with_nothing_to_resume(cmd, tmp_path, capsys):
    extra = ["--data", "builtin"] if cmd[1] == "ficgan" else []
    assert main([*cmd, *extra, "--out", str(tmp_path / "empty"), "--resume", "--device", "cpu"]) == 2
    _one_line_error(capsys, "nothing to resume")


@pytest.mark.parametrize("cmd", TRAIN)
def test_two_runs_on_one_out_refused(cmd, tmp_path, capsys):
    from pyfici.engine import RunDir

    extra = ["--data", "builtin"] if cmd[1] == "ficgan" else []
    with RunDir(tmp_path / "run"):
        assert main([*cmd, *extra, "--out", str(tmp_path / "run"), "--device", "cpu"]) == 2
    _one_line_error(capsys, "another pyfici run")


def test_out_inside_input_refused_before_writing(tmp_path, capsys):
    faces = tmp_path / "faces"
    faces.mkdir()
    (faces / "a.png").write_bytes(b"")
    for out in (faces, faces / "runs" / "x"):
        assert main(["train", "ficgan", "--data", str(faces), "--out", str(out), "--steps", "1"]) == 2
        _one_line_error(capsys, "input folder --data")
    assert sorted(p.name for p in faces.rglob("*")) == ["a.png"]
    root = _market(tmp_path / "market")
    assert main(["train", "rollback", "--dataset", "market1501", "--root", str(root), "--out", str(root / "o")]) == 2
    _one_line_error(capsys, "inside the input folder --root")


def _market(root, empty_query: bool = False):
    from PIL import Image

    img = Image.new("RGB", (16, 32), (120, 30, 60))
    for sub, pids in (("bounding_box_train", (1, 2)), ("query", (3,)), ("bounding_box_test", (3, 4))):
        (root / sub).mkdir(parents=True)
        for pid in pids:
            for cam in (1, 2):
                img.save(root / sub / f"{pid:04d}_c{cam}s1_000001_00.jpg")
    if empty_query:
        (root / "query" / "0003_c3s1_000002_00.jpg").write_bytes(b"")
    return root


def test_empty_image_refused_up_front(tmp_path, capsys):
    root = _market(tmp_path / "market", empty_query=True)
    out = tmp_path / "o"
    assert main(["train", "rollback", "--dataset", "market1501", "--root", str(root), "--out", str(out),
                 "--backbone", "resnet18", "--pretrained", "none", "--device", "cpu"]) == 2
    _one_line_error(capsys, "0003_c3s1_000002_00.jpg (empty)")
    assert not (out / "checkpoint.pt").exists()


def test_eval_reid_corrupt_checkpoint_and_features(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    assert main(["eval", "reid", "--checkpoint", str(bad)]) == 2
    _one_line_error(capsys, "bad.pt")
    torch.save({"kind": "ficgan", "weights": {}}, tmp_path / "gan.pt")
    assert main(["eval", "reid", "--checkpoint", str(tmp_path / "gan.pt")]) == 2
    _one_line_error(capsys, "not a rollback or autolr checkpoint")
    g = torch.Generator().manual_seed(0)
    f = {part: {"feats": torch.randn(n, 8, generator=g), "pids": torch.arange(n) % 5,
                "camids": (torch.arange(n) + (part == "gallery")) % 2} for part, n in (("query", 10), ("gallery", 30))}
    torch.save(f, tmp_path / "feats.pt")
    assert main(["eval", "reid", "--features", str(tmp_path / "feats.pt"), "--json", "-", "--device", "cpu"]) == 0
    d = json.loads(capsys.readouterr().out)
    from pyfici.reid import evaluate

    ref = evaluate(f["query"]["feats"], f["gallery"]["feats"], f["query"]["pids"], f["gallery"]["pids"],
                   f["query"]["camids"], f["gallery"]["camids"], metric="cosine", max_rank=30,
                   protocol="market1501")
    assert d["mAP"] == pytest.approx(ref.mAP) and d["protocol"] == "market1501"
    f["query"]["feats"] = torch.randn(10, 4)
    torch.save(f, tmp_path / "feats2.pt")
    assert main(["eval", "reid", "--features", str(tmp_path / "feats2.pt")]) == 2
    _one_line_error(capsys, "different widths")


def test_quick_builtin_defaults_and_released_defaults():
    from pyfici.methods.autolr import AutoLRConfig
    from pyfici.methods.rollback import RollbackConfig

    q = AutoLRConfig(dataset="builtin")
    assert (q.quick, q.backbone, q.image_size, q.epochs, q.max_retries, q.threads) == (True, "efficientnet_lite0",
                                                                                      32, 5, 2, 1)
    r = AutoLRConfig(dataset="builtin", backbone="resnet50")
    assert (r.quick, r.image_size, r.epochs, r.batch_size, r.max_retries, r.threads) == (False, 224, 50, 40, 10, None)
    assert AutoLRConfig(dataset="cub200", root="x").backbone == "resnet50"
    assert AutoLRConfig(dataset="builtin", epochs=7).epochs == 7
    q = RollbackConfig(dataset="builtin")
    assert (q.quick, q.backbone, q.image_size, q.epochs_per_period, q.workers, q.threads) == (
        True, "efficientnet_lite0", (96, 48), 2, 0, 1)
    r = RollbackConfig(dataset="market1501", root="x")
    assert (r.backbone, r.image_size, r.epochs_per_period, r.eval_every, r.workers, r.threads) == (
        "resnet50", (288, 144), 40, 10, 2, None)


def test_ficgan_flags_come_from_its_config_dataclass(capsys):
    import argparse
    import dataclasses

    from pyfici.methods.ficgan.train import FICGANTrainConfig, add_train_arguments

    p = argparse.ArgumentParser(exit_on_error=False)
    add_train_arguments(p)
    by_dest = {a.dest: a for a in p._actions}
    fields = [f for f in dataclasses.fields(FICGANTrainConfig) if f.name != "workers"]
    assert "workers" not in by_dest
    for f in fields:
        a = by_dest[f.name]
        if f.name in ("data", "out"):
            assert a.required, f.name
        elif f.name == "steps":  # no CLI default: --data builtin alone picks the quick run
            assert a.default is None and str(f.default) in a.help
        else:
            want = list(f.default) if isinstance(f.default, tuple) else f.default
            assert a.default == want, (f.name, a.default, want)
            assert f.metadata["help"] in a.help, f.name
            choices = f.metadata["choices"]
            assert (list(a.choices) if a.choices else None) == (list(choices) if choices else None), f.name
    # the parsed flags give back the dataclass, with the comma-separated tuple and the negated bools
    args = p.parse_args(["--data", "faces", "--out", "o", "--attr-group-channels", "4,2,1", "--no-amp",
                         "--no-id-augment", "--id-loss", "cos", "--steps", "3"])
    from pyfici.engine.config import config_from_args

    cfg = config_from_args(FICGANTrainConfig, args)
    assert cfg.attr_group_channels == (4, 2, 1) and cfg.amp is False and cfg.id_augment is False
    assert (cfg.id_loss, cfg.steps, cfg.lr) == ("cos", 3, FICGANTrainConfig.lr)
    with pytest.raises(SystemExit) as e:
        main(["train", "ficgan", "--data", "builtin", "--out", "x", "--attr-group-channels", "2,x"])
    assert e.value.code == 2
    _one_line_error(capsys, "--attr-group-channels")


def test_unusable_output_paths_exit_2_with_one_line(tmp_path, capsys):
    # a user error in an output path: one line and status 2, before any long work
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    cases = [
        (["demo", "--out", str(a_file)], "exists and is not a folder"),
        (["bench", "--size", "small", "--family", "optim", "--json", str(a_dir)], "is a folder; give a file name"),
        (["bench", "--size", "small", "--family", "optim", "--plot", str(a_file / "x.png")], "is not a folder"),
        (["info", "--json", str(a_dir)], "is a folder; give a file name"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "[bench]" not in err, argv  # refused before the benchmark ran
        assert err.strip().splitlines() == [err.strip()] and err.startswith("pyfici: error: "), err
        assert msg in err and "Traceback" not in err, (msg, err)
    assert a_file.read_text() == "x"
    assert not any(a_dir.iterdir())


def test_unreadable_pretrained_weights_and_inverted_lr_range_exit_2(tmp_path, capsys):
    import pickle

    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    text = tmp_path / "text.pth"
    text.write_text("not a checkpoint\n")
    obj = tmp_path / "obj.pth"
    torch.save({"w": torch.ones(2)}, obj)
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(obj.read_bytes()[:60])
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump(object(), f)
    base = ["train", "autolr", "--dataset", "builtin", "--device", "cpu", "--epochs", "1"]
    for path, msg in ((empty, "the file is empty"), (text, "refusing to load it"), (trunc, "truncated"),
                      (evil, "refusing to load it")):
        assert main([*base, "--out", str(tmp_path / f"run_{path.stem}"), "--pretrained", str(path)]) == 2, path
        _one_line_error(capsys, "--pretrained", msg)
    assert main([*base, "--out", str(tmp_path / "lr"), "--lr-min", "1", "--lr-max", "0.1"]) == 2
    _one_line_error(capsys, "--lr-min 1 is above --lr-max 0.1")


_MISSING = """
import sys
for m in {mods!r}:
    sys.modules[m] = None  # import m now raises ImportError, as if it were not installed
from pyfici.cli import main
sys.exit(main({argv!r}))
"""


@pytest.mark.parametrize("argv, mods, pkg, extra", [
    (["train", "autolr", "--dataset", "builtin", "--epochs", "1", "--quiet"], ["torchvision"], "torchvision", "vision"),
    (["train", "rollback", "--dataset", "builtin", "--epochs", "1", "--quiet"], ["torchvision"], "torchvision", "vision"),
    (["train", "ficgan", "--data", "builtin", "--steps", "2", "--quiet"], ["skimage"], "scikit-image", "data"),
])
def test_missing_optional_package_exits_2_with_one_line(argv, mods, pkg, extra, tmp_path):
    """pyfici's base install leaves out torchvision and scikit-image (so that it installs
    beside any torch); a command that needs one says so in one line, exit 2, and writes nothing."""
    out = tmp_path / "run"
    code = _MISSING.format(mods=mods, argv=argv + ["--out", str(out)])
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert lines[0].startswith("pyfici: error: ") and f"needs {pkg}" in lines[0]
    assert f"pip install 'pyfici[{extra}]'" in lines[0]
    assert not out.exists() or not any(out.iterdir())


def test_require_is_an_import_error_for_library_callers():
    from pyfici.errors import MissingDependency, UserError, require

    with pytest.raises(ImportError, match=r"the thing needs no_such_pkg_pyfici.*pip install 'pyfici\[vision\]'"):
        require("no_such_pkg_pyfici.sub", "vision", "the thing")
    assert issubclass(MissingDependency, UserError)
    assert require("json", "vision", "x") is json


def test_demo_part_without_its_package_is_reported_not_run(tmp_path):
    out = tmp_path / "demo"
    code = _MISSING.format(mods=["torchvision"], argv=["demo", "--only", "autolr", "--quick", "--out", str(out)])
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr
    assert "demo: autolr: not run:" in p.stderr and "needs torchvision" in p.stderr
    html = (out / "report.html").read_text()
    assert "autolr: NOT RUN" in html and "pyfici[vision]" in html
