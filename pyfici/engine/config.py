"""Run configurations as dataclasses, and the command-line arguments generated from them.

A method declares its settings once::

    @dataclass
    class MyConfig(RunConfig):
        epochs: int = option(10, "training epochs", min=1)
        dataset: str = option("builtin", "dataset", choices=lambda: sorted(RETRIEVAL_DATASETS))

and gets ``--epochs`` / ``--dataset`` with help, default and choices from
:func:`add_config_arguments`, the dataclass back from :func:`config_from_args`,
and the same range / choice checks for library callers from :func:`validate`
(a :class:`UserError` naming the flag). :class:`RunConfig` holds the options
every command shares: ``--out``, ``--resume``, ``--device``, ``--seed``,
``--workers``, ``--quiet``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyfici.engine.errors import UserError
from pyfici.engine.runtime import DEVICE_HELP


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices: Any = None, min: float | None = None,
           flag: str | None = None, cli: bool = True, metavar: str | None = None, validate: bool = True,
           default_factory: Callable[[], Any] | None = None, parse: Callable[[str], Any] | None = None) -> Any:
    """A dataclass field with its command-line description.

    ``choices``: a sequence or a zero-argument callable returning one (read when
    the parser is built, so registries can be used); ``min``: smallest allowed
    value of a number (``None`` = unchecked; ``None`` values always pass);
    ``flag``: the option name when it is not ``--field-name``; ``cli=False``:
    library-only setting; ``validate=False``: the choices are offered on the command line but
    :func:`validate` accepts other values (e.g. a custom model's name). A bool field becomes ``--name`` when its default is
    False and ``--no-name`` when it is True. ``parse``: the argparse ``type`` of a field written as
    one word (e.g. ``2,2,0`` for a tuple) instead of the default parsing.
    """
    md = {"help": help, "choices": choices, "min": min, "flag": flag, "cli": cli, "metavar": metavar,
          "validate": validate, "parse": parse}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=md)
    return dataclasses.field(default=default, metadata=md)


@dataclass
class RunConfig:
    """The settings every pyfici command shares."""

    out: str | None = option(None, "output folder (checkpoint.pt, final.pt, metrics.json, plots)")
    resume: bool = option(False, "continue the run in --out from its checkpoint.pt (an error when there is none)")
    device: str = option("auto", DEVICE_HELP)
    seed: int = option(0, "random seed")
    workers: int = option(0, "data-loading worker processes (0: load in the main process)", min=0)
    quiet: bool = option(False, "no progress bars")

    # settings that may differ between a run and its resume (they do not change the trajectory)
    RESUME_FREE: typing.ClassVar[tuple[str, ...]] = ("out", "resume", "device", "quiet")

    def resume_key(self) -> dict:
        d = dataclasses.asdict(self)
        for k in self.RESUME_FREE:
            d.pop(k, None)
        return d


def fill_presets(cfg, quick: bool) -> None:
    """Set ``cfg.quick`` and give every field left ``None`` its value from the config class's
    ``BUILTIN_QUICK`` preset (``quick``: the short run on the built-in data) or ``RELEASED``."""
    cfg.quick = quick
    for k, v in (cfg.BUILTIN_QUICK if quick else cfg.RELEASED).items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _choices(f: dataclasses.Field):
    c = f.metadata.get("choices")
    return list(c()) if callable(c) else (list(c) if c is not None else None)


def _base_type(hint) -> tuple[Any, bool]:
    """(type, optional) of a field's annotation."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return hint, False


def _number(kind: type, flag: str, lo: float | None) -> Callable[[str], Any]:
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if lo is not None and v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo:g}, got {text}")
        return v

    parse.__name__ = kind.__name__
    return parse


def count_type(lo: int = 0) -> Callable[[str], int]:
    """An argparse ``type`` for an integer >= ``lo`` (a bad value: one-line argparse error, exit 2)."""
    return _number(int, "", lo)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (),
                         defaults: dict[str, Any] | None = None, required: tuple[str, ...] = ()) -> None:
    """Add one option per field of dataclass ``cls`` (see :func:`option`), with the default in the help.

    ``defaults``: CLI defaults that differ from the dataclass's (e.g. an ``--out`` folder);
    ``required``: fields the command line must give (no default there)."""
    hints = typing.get_type_hints(cls)
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("cli", True) or "help" not in f.metadata:
            continue
        flag = _flag(f)
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        kind, _optional = _base_type(hints[f.name])
        help_ = f.metadata.get("help", "")
        kw: dict[str, Any] = {"dest": f.name, "help": help_}
        if kind is bool:
            if default:
                flag = f.metadata.get("flag") or "--no-" + f.name.replace("_", "-")
                kw["action"] = "store_false"
            else:
                kw["action"] = "store_true"
            parser.add_argument(flag, **kw)
            continue
        origin = typing.get_origin(kind)
        lo = f.metadata.get("min")
        if f.metadata.get("parse") is not None:
            kw["type"] = f.metadata["parse"]
            shown = ",".join(map(str, default)) if origin in (tuple, list) and default is not None else default
        elif origin in (tuple, list):
            args = typing.get_args(kind)
            elem = args[0] if args else str
            kw["type"] = _number(elem, flag, lo) if elem in (int, float) else elem
            kw["nargs"] = len(args) if origin is tuple and Ellipsis not in args else "+"
            shown = " ".join(map(str, default)) if default is not None else None
        else:
            kw["type"] = _number(kind, flag, lo) if kind in (int, float) else str
            shown = default
        choices = _choices(f)
        if choices is not None:
            kw["choices"] = choices
        if f.metadata.get("metavar"):
            kw["metavar"] = f.metadata["metavar"]
        if f.name in required:
            kw["required"] = True
        else:
            kw["default"] = list(default) if isinstance(default, tuple) else default
            if shown is not None and "default" not in help_:
                kw["help"] = f"{help_} (default {shown})" if help_ else f"default {shown}"
        parser.add_argument(flag, **kw)


def config_from_args(cls: type, args: argparse.Namespace, **overrides: Any):
    """The dataclass ``cls`` from parsed arguments (fields the parser lacks keep their defaults)."""
    hints = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name):
            v = getattr(args, f.name)
            if isinstance(v, list) and typing.get_origin(_base_type(hints[f.name])[0]) is tuple:
                v = tuple(v)
            kw[f.name] = v
    kw.update(overrides)
    return cls(**kw)


def validate(cfg) -> None:
    """Check every field's ``min`` and ``choices`` (a :class:`UserError` naming the flag)."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if v is None:
            continue
        lo = f.metadata.get("min")
        values = v if isinstance(v, (tuple, list)) else (v,)
        if lo is not None and any(isinstance(x, (int, float)) and not isinstance(x, bool) and not x >= lo
                                  for x in values):
            raise UserError(f"{_flag(f)} must be >= {lo:g}, got {v}")
        choices = _choices(f) if f.metadata.get("validate", True) else None
        if choices is not None and v not in choices:
            raise UserError(f"{_flag(f)} {v!r}: choose one of {', '.join(map(str, choices))}")


def add_command_arguments(parser: argparse.ArgumentParser, cls: type, out: str) -> None:
    """A training command's options: the fields of ``cls`` (``--out`` defaulting to ``out``) and ``--json``."""
    add_config_arguments(parser, cls, defaults={"out": out})
    add_json_argument(parser)


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="write the result as JSON to PATH ('-': to stdout)")


def emit_json(result: Any, target: str | None) -> None:
    """Write ``result`` for ``--json PATH|-``."""
    from pyfici.engine.files import atomic_write_text, to_json

    if target is None:
        return
    if target == "-":
        print(to_json(result))
    else:
        try:
            atomic_write_text(to_json(result) + "\n", target)
        except IsADirectoryError:
            raise UserError(f"--json {target}: is a folder; give a file name") from None
        except OSError as e:
            raise UserError(f"--json {target}: cannot write it ({e.strerror})") from None
