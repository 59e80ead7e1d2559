"""Re-export of :mod:`pyfici.errors` (the engine's user-error type and helper)."""

from pyfici.errors import MissingDependency, UserError, require, user_errors

__all__ = ["MissingDependency", "UserError", "require", "user_errors"]
