"""The run directory: fixed file names, a lock, path checks and the resume policy.

Layout of ``--out DIR`` (the same for every method)::

    checkpoint.pt   the resumable state, rewritten atomically after every epoch / interval
    final.pt        the final weights and the configuration (what evaluation and de-identification read)
    metrics.json    the configuration and every logged number
    *.png           plots
    .pyfici.lock    "<pid> <host>" of the run that holds the folder

Opening a :class:`RunDir` (before anything is written):

- refuses an output folder equal to or inside an input folder (or equal to an
  input file, or one that would overwrite an input file);
- creates the folder and takes the lock; a second run on the same folder is
  refused while the first is alive; a lock left by a dead process is taken over;
- removes temporary files left by a save that was killed.

Resume policy: ``--resume`` continues from ``checkpoint.pt`` and is an error
when there is none; without ``--resume`` a run starts from the beginning (and
replaces the files of an earlier run in the folder). A checkpoint is read with
``weights_only=True`` and must be of the method's kind and of the same
configuration (the keys that may differ are named by the method).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pyfici.engine.errors import UserError
from pyfici.engine.files import TMP_PATTERN, atomic_save, load_checkpoint, save_figure, write_json

CHECKPOINT = "checkpoint.pt"
FINAL = "final.pt"
METRICS = "metrics.json"
LOCK = ".pyfici.lock"
_OUTPUT_NAMES = (CHECKPOINT, FINAL, METRICS)
_HELD: set[str] = set()  # lock files this process holds


def make_output_folder(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Create the output folder ``path`` (and its parents) -> Path; a path that is a
    file, or a folder that cannot be created, is a :class:`UserError` naming ``flag``."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{flag} {path}: exists and is not a folder") from None
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create the folder ({e.strerror})") from None
    return path


def check_output_file(path: str | os.PathLike, flag: str) -> None:
    """Before a long run: ``path`` must be writable as a file, i.e. not a folder, and its
    nearest existing parent a folder this process may write in (no file or folder is
    created; the write itself can still fail, e.g. as root on a read-only mount)."""
    p = Path(path).absolute()
    if p.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file name")
    q = p.parent
    while not q.exists():
        q = q.parent
    if not q.is_dir():
        raise UserError(f"{flag} {path}: {q} is not a folder")
    if not os.access(q, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write in {q} (permission denied)")


def check_output_path(out: str | os.PathLike, inputs: Iterable[tuple[str, str | os.PathLike | None]]) -> None:
    """Refuse ``out`` when it is, or lies inside, an input folder, or would replace an input file.

    ``inputs``: ``(flag, path)`` pairs such as ``("--data", "faces/")``; ``None`` paths are skipped."""
    ro = Path(out).expanduser().resolve()
    for flag, p in inputs:
        if p is None or str(p) == "builtin":
            continue
        ri = Path(p).expanduser().resolve()
        if ri.is_dir() and (ro == ri or ri in ro.parents):
            raise UserError(f"--out {out} is {'the' if ro == ri else 'inside the'} input folder {flag} {p}: "
                            "choose an output folder outside the inputs")
        if ri.is_file() and (ro == ri or (ri.parent == ro and ri.name in _OUTPUT_NAMES + (LOCK,))):
            raise UserError(f"--out {out} would overwrite the input {flag} {p}: choose another output folder")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunDir:
    """One run's output folder (see the module docstring). Use as a context manager:

    ``with RunDir(out, inputs=[("--data", data)], resume=args.resume) as rd: ...``

    ``main=False`` (ranks other than 0 under torchrun) checks nothing and writes nothing;
    ``path=None`` is a run that keeps no files (library use).
    """

    def __init__(self, path: str | os.PathLike | None, *, inputs: Sequence[tuple[str, Any]] = (), resume: bool = False,
                 main: bool = True):
        self.path = Path(path) if path is not None else None
        self.resume = bool(resume)
        if self.path is None and self.resume:
            raise UserError("--resume needs --out (the folder of the run to continue)")
        self.main = main and self.path is not None
        self._inputs = list(inputs)
        self._lock: Path | None = None

    # ------------------------------------------------------------------ names
    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def final(self) -> Path:
        return self.path / FINAL

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    def file(self, name: str) -> Path:
        return self.path / name

    # ------------------------------------------------------------------ open / close
    def open(self) -> RunDir:
        if not self.main:
            return self
        check_output_path(self.path, self._inputs)
        if self.resume and not self.checkpoint.is_file():
            raise UserError(f"--resume: nothing to resume in {self.path} (no {CHECKPOINT}); "
                            "run without --resume to start a new run")
        make_output_folder(self.path)
        self._take_lock()
        self._remove_stale_temp_files()
        return self

    def close(self) -> None:
        lock, self._lock = self._lock, None
        if lock is None:
            return
        _HELD.discard(str(lock))
        try:
            if lock.read_text().split()[:1] == [str(os.getpid())]:
                lock.unlink()
        except OSError:
            pass

    def __enter__(self) -> RunDir:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def _take_lock(self) -> None:
        lock = self.path / LOCK
        me = f"{os.getpid()} {socket.gethostname()}\n"
        for _ in range(5):
            try:
                fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                if self._lock_is_held(lock):
                    raise UserError(self._held_message(lock)) from None
                try:
                    lock.unlink()  # left by a process that no longer runs
                except FileNotFoundError:
                    pass
                continue
            except OSError as e:
                raise UserError(f"--out {self.path}: cannot write there ({e.strerror})") from None
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self._lock = lock
            _HELD.add(str(lock))
            return
        raise UserError(f"--out {self.path}: could not take the lock {lock} (other runs keep starting there)")

    def _lock_is_held(self, lock: Path) -> bool:
        try:
            words = lock.read_text().split()
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return False
        except OSError:
            return True
        if len(words) < 2 or not words[0].isdigit():
            return age < 10.0  # being written by a run that is starting right now
        pid, host = int(words[0]), words[1]
        if host != socket.gethostname():
            return True  # cannot tell whether a process on another machine is alive
        if pid == os.getpid():
            return str(lock) in _HELD
        return _pid_alive(pid)

    def _held_message(self, lock: Path) -> str:
        try:
            pid, host = lock.read_text().split()[:2]
            who = f"pid {pid} on {host}"
        except (OSError, ValueError):
            who = "another process"
        return (f"--out {self.path}: another pyfici run ({who}) is using this folder; wait for it to end or "
                f"choose another --out (if no such run exists, delete {lock})")

    def _remove_stale_temp_files(self) -> None:
        for root, _dirs, files in os.walk(self.path):
            for name in files:
                if TMP_PATTERN.match(name):
                    try:
                        os.unlink(os.path.join(root, name))
                    except OSError:
                        pass

    # ------------------------------------------------------------------ resume and writes
    def resume_checkpoint(self, kind: str) -> dict | None:
        """The checkpoint to continue from (``--resume``), or ``None`` for a new run."""
        if not self.resume:
            return None
        return load_checkpoint(self.checkpoint, kind=kind, what="--resume: checkpoint")

    def save_checkpoint(self, state: dict) -> None:
        if self.main:
            atomic_save(state, self.checkpoint)

    def save_final(self, state: dict) -> None:
        if self.main:
            atomic_save(state, self.final)

    def write_metrics(self, obj: Any) -> None:
        if self.main:
            write_json(obj, self.metrics)

    def save_plot(self, fig, name: str, dpi: int = 100) -> None:
        """Write a matplotlib figure as ``name``; a plot that fails warns and never stops a run."""
        if not self.main:
            return
        try:
            save_figure(fig, self.path / name, dpi=dpi)
        except Exception as e:  # noqa: BLE001 - a plot must never kill a training run
            from pyfici.engine.runtime import log

            log(f"warning: could not write the plot {name}: {e}")


def check_resume_config(saved: dict, current: dict, ignore: Sequence[str] = ()) -> None:
    """Refuse to resume from a checkpoint of another configuration, naming every key that differs."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if key in ignore:
            continue
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if a != b:
            diffs.append(f"{key}: checkpoint {a!r}, this run {b!r}")
    if diffs:
        raise UserError("--resume: the checkpoint was written with another configuration (" + "; ".join(diffs)
                        + "); resume with the same settings or start a new run in another --out")
