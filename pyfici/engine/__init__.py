"""The run skeleton shared by every pyfici training and evaluation command."""

from pyfici.engine.errors import UserError

__all__ = ["UserError"]
