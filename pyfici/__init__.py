"""pyfici: fast fused ops and training methods for face de-identification
(FICGAN, k-Same), layer-wise fine-tuning (AutoLR, rolling-back) and person
re-identification.

Public API (import from here or from the sub-packages):

- ``pyfici.ops``: the compiled ops (``pairwise_distance``, ``reid_rank_stats``, ...)
- ``pyfici.reid``: ``evaluate``, ``evaluate_distmat``, ``recall_at_k``
- ``pyfici.compat.torchreid``: ``evaluate_rank`` drop-in
"""

__version__ = "0.1.0"

from pyfici import ops, reid  # noqa: E402

__all__ = ["__version__", "ops", "reid"]
