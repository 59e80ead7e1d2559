"""The run skeleton shared by every pyfici training and evaluation command.

- :mod:`.errors`: :class:`UserError`, the one exception for mistakes a user can fix, and
  :class:`MissingDependency` (a UserError and an ImportError) for an optional package not installed.
- :mod:`.runtime`: device choice, torch.distributed setup under torchrun, rank-0 logging, seeding.
- :mod:`.files`: atomic writes, JSON, checkpoint loading with ``weights_only=True``.
- :mod:`.rundir`: the run directory (fixed names, lock, path checks, resume policy).
- :mod:`.loop`: :class:`Trainer` with hooks, one supervised epoch with progress.
- :mod:`.evaluation`: feature extraction, ReID and retrieval evaluation.
- :mod:`.config`: config dataclasses and the command-line options generated from them.
- :mod:`.eval_reid`: the `pyfici eval reid` command.

Only the errors are imported eagerly; the rest loads on first use.
"""

from __future__ import annotations

import importlib

from pyfici.engine.errors import MissingDependency, UserError

_LAZY = {
    "RunConfig": "config", "option": "config", "add_config_arguments": "config", "config_from_args": "config",
    "validate": "config", "add_json_argument": "config", "emit_json": "config", "add_command_arguments": "config",
    "count_type": "config",
    "Runtime": "runtime", "setup": "runtime", "log": "runtime", "resolve_device": "runtime",
    "seed_everything": "runtime", "distributed_info": "runtime", "torch_threads": "runtime",
    "atomic_save": "files", "atomic_write_text": "files", "write_json": "files", "load_checkpoint": "files",
    "save_figure": "files",
    "RunDir": "rundir", "check_output_path": "rundir", "check_resume_config": "rundir",
    "Trainer": "loop", "Hook": "loop", "CallbackHook": "loop", "train_epoch": "loop", "progress": "loop",
    "extract_features": "evaluation", "evaluate_reid": "evaluation", "evaluate_reid_features": "evaluation",
    "evaluate_retrieval": "evaluation",
}

__all__ = ["MissingDependency", "UserError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"pyfici.engine.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'pyfici.engine' has no attribute {name!r}")
