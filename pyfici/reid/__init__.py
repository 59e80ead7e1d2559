"""ReID and retrieval evaluation on pyfici's ops."""

from pyfici.reid.evaluate import PROTOCOLS, ReIDResult, evaluate, evaluate_distmat, recall_at_k

__all__ = ["PROTOCOLS", "ReIDResult", "evaluate", "evaluate_distmat", "recall_at_k"]
# re-ranking (pyfici.reid.rerank) is appended below when built.
