"""Re-export of :mod:`pyfici.errors` (the engine's user-error type and helper)."""

from pyfici.errors import UserError, user_errors

__all__ = ["UserError", "user_errors"]
