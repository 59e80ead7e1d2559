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
