"""pyfici's public ops. Every op is a ``torch.library.custom_op`` under the
``pyfici::`` namespace with a fake (meta) implementation, so it works under
``torch.compile(fullgraph=True)``; each has the backends ``cpu`` (C++),
``cuda`` (CUDA C++), ``triton`` and ``torch`` (pyfici.ops.reference).
Choose with ``backend=`` or ``PYFICI_BACKEND``; see pyfici.ops._backend.
"""

from pyfici.ops import reference
from pyfici.ops._backend import BACKENDS, choose_backend
from pyfici.ops.distance import pairwise_distance, reid_rank_stats

__all__ = ["BACKENDS", "choose_backend", "reference", "pairwise_distance", "reid_rank_stats"]
# Each op family appends its imports below (and extends __all__).
from pyfici.ops.optim import layerwise_adamw_step_, layerwise_sgd_step_, weight_variation  # noqa: E402

__all__ += ["layerwise_sgd_step_", "layerwise_adamw_step_", "weight_variation"]
from pyfici.ops.knn import KnnResult, k_same_partition, knn, knn_average  # noqa: E402

__all__ += ["knn", "knn_average", "KnnResult", "k_same_partition"]
from pyfici.ops.rerank import rerank_distmat, rerank_features  # noqa: E402

__all__ += ["rerank_features", "rerank_distmat"]
