"""Names kept for modules that still import them from here; they live in :mod:`pyfici.engine`."""

from pyfici.engine.files import atomic_save, atomic_write_text, load_checkpoint, write_json
from pyfici.engine.rundir import check_resume_config
from pyfici.engine.runtime import distributed_info, resolve_device, seed_everything

__all__ = ["atomic_save", "atomic_write_text", "check_resume_config", "distributed_info", "load_checkpoint",
           "resolve_device", "seed_everything", "write_json"]
