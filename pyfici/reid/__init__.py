"""ReID and retrieval evaluation on pyfici's ops."""

from pyfici.reid.evaluate import PROTOCOLS, ReIDResult, evaluate, evaluate_distmat, recall_at_k

__all__ = ["PROTOCOLS", "ReIDResult", "evaluate", "evaluate_distmat", "recall_at_k"]
# re-ranking (pyfici.reid.rerank) is appended below when built.
from pyfici.reid.rerank import rerank, rerank_distmat  # noqa: E402

__all__ += ["rerank", "rerank_distmat"]
from pyfici.reid.query_expansion import average_query_expansion  # noqa: E402

__all__ += ["average_query_expansion"]
from pyfici.reid.features import (  # noqa: E402
    FeatureSet,
    evaluate_features,
    extract_features,
    load_features,
    save_features,
)
from pyfici.reid.visualize import visualize_from_features, visualize_ranked_results  # noqa: E402

__all__ += ["FeatureSet", "evaluate_features", "extract_features", "load_features", "save_features",
            "visualize_from_features", "visualize_ranked_results"]
