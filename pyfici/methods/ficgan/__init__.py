"""FICGAN (Facial Identity Controllable GAN) face de-identification with
manifold k-Same: networks (:mod:`.model`), training (:mod:`.train`),
de-identification of crops and photos (:mod:`.deid`, :mod:`.detect`).
See docs/ficgan.md for every design decision."""

from pyfici.methods.ficgan.model import FICGAN, FICGANConfig, level_groups, slerp
from pyfici.methods.ficgan.train import (
    FICGANTrainConfig,
    load_ficgan,
    run_ficgan,
    train_builtin,
    train_ficgan,
)

__all__ = [
    "FICGAN",
    "FICGANConfig",
    "FICGANTrainConfig",
    "level_groups",
    "load_ficgan",
    "run_ficgan",
    "slerp",
    "train_builtin",
    "train_ficgan",
]
