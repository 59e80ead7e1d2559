import argparse
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from pyfici.engine import UserError
from pyfici.engine.config import RunConfig, add_config_arguments, config_from_args, option, validate
from pyfici.engine.files import atomic_save, atomic_write_text, load_checkpoint
from pyfici.engine.rundir import LOCK, RunDir, check_output_path, check_resume_config


def test_user_error_is_one_line():
    assert str(UserError("a\n  b")) == "a b"


def test_atomic_files_respect_umask(tmp_path):
    old = os.umask(0o027)
    try:
        p = atomic_write_text("x", tmp_path / "a.txt")
    finally:
        os.umask(old)
    assert (p.stat().st_mode & 0o777) == 0o640
    old = os.umask(0o022)
    try:
        p = atomic_save({"kind": "k", "w": torch.ones(2)}, tmp_path / "c.pt")
    finally:
        os.umask(old)
    assert (p.stat().st_mode & 0o777) == 0o644
    assert [q.name for q in tmp_path.iterdir() if q.name.endswith(".tmp")] == []


def test_load_checkpoint_corrupt_empty_foreign_hostile(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        load_checkpoint(tmp_path / "empty.pt")
    (tmp_path / "junk.pt").write_bytes(os.urandom(300))
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(tmp_path / "junk.pt")
    good = tmp_path / "good.pt"
    atomic_save({"kind": "autolr", "x": torch.arange(3)}, good)
    (tmp_path / "trunc.pt").write_bytes(good.read_bytes()[:-40])
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(tmp_path / "trunc.pt")
    with pytest.raises(UserError, match="not a rollback checkpoint.*autolr"):
        load_checkpoint(good, kind="rollback")
    assert load_checkpoint(good, kind="autolr")["x"].tolist() == [0, 1, 2]

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"kind": "autolr", "p": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UserError) as e:
        load_checkpoint(tmp_path / "evil.pt", kind="autolr")
    assert "weights_only=False" not in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "plain.pt").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(UserError):
        load_checkpoint(tmp_path / "plain.pt", kind="autolr")


def test_rundir_lock_refuses_second_run_and_takes_stale_lock(tmp_path):
    out = tmp_path / "run"
    with RunDir(out) as rd:
        assert (out / LOCK).read_text().split()[0] == str(os.getpid())
        with pytest.raises(UserError, match="another pyfici run"):
            RunDir(out).open()
        assert rd.checkpoint.name == "checkpoint.pt" and rd.final.name == "final.pt"
    assert not (out / LOCK).exists()
    # a lock held by a live process of another program
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        import socket

        (out / LOCK).write_text(f"{proc.pid} {socket.gethostname()}\n")
        with pytest.raises(UserError, match=f"pid {proc.pid}"):
            RunDir(out).open()
    finally:
        proc.kill()
        proc.wait()
    # now stale: the process is gone
    with RunDir(out):
        pass


def test_rundir_removes_stale_temp_files_and_checks_resume(tmp_path):
    out = tmp_path / "run"
    (out / "samples").mkdir(parents=True)
    stale = [out / ".checkpoint.pt.ab12CD_9.tmp", out / "samples" / ".step_000001.png.zzzzzzzz.tmp"]
    for s in stale:
        s.write_bytes(b"x" * 10)
    keep = out / "notes.tmp"
    keep.write_text("mine")
    with pytest.raises(UserError, match="nothing to resume"):
        RunDir(out, resume=True).open()
    with RunDir(out) as rd:
        assert rd.resume_checkpoint("autolr") is None
        rd.save_checkpoint({"kind": "autolr", "epoch": 1})
    assert not any(s.exists() for s in stale) and keep.exists()
    with RunDir(out, resume=True) as rd:
        assert rd.resume_checkpoint("autolr")["epoch"] == 1
        with pytest.raises(UserError, match="not a rollback"):
            rd.resume_checkpoint("rollback")


def test_output_inside_input_refused_before_writing(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for out in (data, data / "sub" / "run"):
        with pytest.raises(UserError, match="input folder --data"):
            RunDir(out, inputs=[("--data", data)]).open()
    assert list(data.iterdir()) == []
    ck = tmp_path / "r" / "checkpoint.pt"
    ck.parent.mkdir()
    ck.write_bytes(b"x")
    with pytest.raises(UserError, match="overwrite the input --checkpoint"):
        check_output_path(tmp_path / "r", [("--checkpoint", ck)])
    check_output_path(tmp_path / "elsewhere", [("--data", data), ("--data", "builtin")])


def test_unusable_out_refused_up_front(tmp_path):
    """Runs as root too (where a read-only folder is still writable): an --out below a file,
    or that is a file, is refused when the run folder opens, before any epoch."""
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(UserError, match="cannot create"):
        RunDir(f / "run").open()
    with pytest.raises(UserError, match="not a folder"):
        RunDir(f).open()
    assert f.read_text() == "x"


def test_unwritable_out(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(UserError, match="cannot"):
            RunDir(ro / "run").open()
        with pytest.raises(UserError, match="cannot write"):
            RunDir(ro).open()
    finally:
        ro.chmod(0o700)


def test_resume_config_difference_is_one_line():
    with pytest.raises(UserError) as e:
        check_resume_config({"lr": 0.1, "workers": 2}, {"lr": 0.2, "workers": 2})
    assert "lr: checkpoint 0.1, this run 0.2" in str(e.value) and "\n" not in str(e.value)
    check_resume_config({"lr": 0.1, "device": "cpu"}, {"lr": 0.1, "device": "cuda"}, ignore=("device",))


@dataclass
class _Cfg(RunConfig):
    epochs: int = option(3, "epochs", min=1)
    size: tuple[int, int] = option((8, 4), "H W", min=1)
    kind: str = option("a", "a kind", choices=lambda: ["a", "b"])
    limit: int | None = option(None, "optional limit", min=0)
    flip: bool = option(True, "flip images")
    hidden: int = option(5, "library only", cli=False)


def test_config_arguments_generated_from_dataclass():
    p = argparse.ArgumentParser()
    add_config_arguments(p, _Cfg, defaults={"out": "runs/x"})
    a = p.parse_args(["--epochs", "4", "--size", "6", "2", "--kind", "b", "--no-flip", "--resume"])
    cfg = config_from_args(_Cfg, a)
    assert (cfg.epochs, cfg.size, cfg.kind, cfg.flip, cfg.resume, cfg.out, cfg.hidden) == (4, (6, 2), "b", False, True,
                                                                                           "runs/x", 5)
    assert "(default 3)" in p.format_help() and "--hidden" not in p.format_help()
    for bad in (["--epochs", "0"], ["--limit", "-1"], ["--kind", "c"], ["--epochs", "x"], ["--workers", "-2"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
    with pytest.raises(UserError, match="--epochs must be >= 1"):
        validate(_Cfg(epochs=0))
    with pytest.raises(UserError, match="--kind 'z'"):
        validate(_Cfg(kind="z"))
    validate(_Cfg())
