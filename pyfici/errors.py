"""The one exception type for mistakes a user can fix.

It lives at the bottom of the package so every layer (ops, data, deid, engine,
methods) can raise it; ``pyfici.engine`` re-exports it.

A ``UserError`` means a bad argument, a missing or corrupt input file, or an
unusable output folder. ``pyfici.cli.main`` prints its message as one line
(``pyfici: error: <message>``) on stderr and exits with status 2, without a
traceback; library callers get an ordinary exception.
"""

from __future__ import annotations

import contextlib
import importlib


class UserError(Exception):
    """A problem with the user's input that the user can fix; the message says what and how."""

    def __str__(self) -> str:
        # always one line: the CLI prints it after "pyfici: error: "
        return " ".join(super().__str__().split())


@contextlib.contextmanager
def user_errors(*types: type[BaseException]):
    """Re-raise the given exception types (default ``ValueError``, ``FileNotFoundError``) as
    :class:`UserError`: for calls into readers whose errors describe the user's input."""
    types = types or (ValueError, FileNotFoundError)
    try:
        yield
    except UserError:
        raise
    except types as e:
        raise UserError(str(e)) from None


# pip names of the optional packages whose import names differ
_PIP_NAMES = {"skimage": "scikit-image", "sklearn": "scikit-learn"}


class MissingDependency(UserError, ImportError):
    """An optional package that a feature needs is not installed. An ``ImportError``
    for library callers (``except ImportError`` keeps working) and a ``UserError`` for
    the CLI: one line naming the package and the pip command, exit status 2."""


def require(module: str, extra: str, purpose: str):
    """``importlib.import_module(module)``, or :class:`MissingDependency` saying that
    ``purpose`` needs the package and how to install it (``pip install 'pyfici[extra]'``).
    pyfici's base install leaves out what only some features use (torchvision,
    scikit-image, scikit-learn), so that it installs beside any torch >= 2.4."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        pkg = _PIP_NAMES.get(top, top)
        raise MissingDependency(f"{purpose} needs {pkg}, which is not importable ({e}): "
                                f"pip install {pkg}, or pip install 'pyfici[{extra}]'") from e
