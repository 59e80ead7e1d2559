"""The ``pyfici`` command: info, train, deid, eval, bench, demo.

Each command lives in its own module, which exposes ``add_arguments(parser)``
(or ``add_<name>_arguments``) and a ``main(args) -> int`` function; this file
only wires them up, importing a module only when its command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command path -> (module, add-arguments function, main function, help)
COMMANDS: dict[tuple[str, ...], tuple[str, str, str, str]] = {
    ("info",): ("pyfici.cli", "_add_info_arguments", "_info_main", "versions, built backends, devices"),
    ("train", "autolr"): ("pyfici.methods.autolr", "add_train_arguments", "train_main", "AutoLR fine-tuning"),
    ("train", "rollback"): ("pyfici.methods.rollback", "add_train_arguments", "train_main", "rolling-back fine-tuning for ReID"),
    ("train", "ficgan"): ("pyfici.methods.ficgan.train", "add_train_arguments", "train_main", "train FICGAN"),
    ("deid",): ("pyfici.methods.ficgan.deid", "add_deid_arguments", "deid_main", "de-identify faces with k-anonymity"),
    ("eval", "reid"): ("pyfici.engine.eval_reid", "add_arguments", "main", "evaluate a trained model or saved features"),
    ("bench",): ("pyfici.bench", "add_arguments", "main", "benchmark every op against the anchors"),
    ("demo",): ("pyfici.demo", "add_arguments", "main", "run everything on built-in data, write an HTML report"),
}


def _add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="write the result as JSON to PATH (no PATH or '-': to stdout)")


def _info_main(args: argparse.Namespace) -> int:

    from pyfici._native import info

    d = info()
    if args.json is not None:
        from pyfici.engine.config import emit_json

        emit_json(d, args.json)
    else:
        width = max(len(k) for k in d)
        for k, v in d.items():
            print(f"{k:<{width}}  {v}")
    return 0


class _Parser(argparse.ArgumentParser):
    """Reports a bad command line as one line on stderr (exit status 2), like a UserError."""

    def error(self, message: str):
        command = self.prog.removeprefix("pyfici").strip()
        where = f"{command}: " if command else ""
        self.exit(2, f"pyfici: error: {where}{' '.join(message.split())} (see {self.prog} --help)\n")


def _build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = _Parser(prog="pyfici", description="pyfici: fast ops and methods for de-identification, fine-tuning and ReID")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, (mod, add, main, help_) in COMMANDS.items():
        if len(path) == 1:
            p = sub.add_parser(path[0], help=help_)
        else:
            if path[0] not in groups:
                gp = sub.add_parser(path[0], help=f"{path[0]} commands")
                groups[path[0]] = gp.add_subparsers(dest="subcommand", metavar="WHAT", required=True)
            p = groups[path[0]].add_parser(path[1], help=help_)
        p.set_defaults(_target=(mod, main))
        # only import the module of the command being run (imports are heavy)
        if _selected(argv, path):
            getattr(importlib.import_module(mod), add)(p)
    return parser


def _selected(argv: list[str], path: tuple[str, ...]) -> bool:
    words = [a for a in argv if not a.startswith("-")]
    return tuple(words[: len(path)]) == path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser(argv)
    args = parser.parse_args(argv)
    mod, main_ = args._target
    from pyfici.engine.errors import UserError

    try:
        return int(getattr(importlib.import_module(mod), main_)(args) or 0)
    except UserError as e:
        print(f"pyfici: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
