"""pyfici: fast fused ops and training methods for face de-identification
(FICGAN, k-Same), layer-wise fine-tuning (AutoLR, rolling-back) and person
re-identification.

Public API:

- ``pyfici.ops`` — compiled ops, each with cpu / cuda / triton / torch backends:
  ``pairwise_distance``, ``reid_rank_stats`` (ReID); ``layerwise_sgd_step_``,
  ``layerwise_adamw_step_``, ``weight_variation`` (fused layer-wise update);
  ``knn``, ``knn_average`` (k-nearest manifold averaging); ``rerank_features``,
  ``rerank_distmat`` (k-reciprocal re-ranking).
- ``pyfici.reid`` — ``evaluate`` (also ``sharded=True`` over torch.distributed ranks),
  ``evaluate_distmat``, ``recall_at_k``, ``rerank``, ``rerank_distmat``,
  ``average_query_expansion``, ``extract_features``, ``save_features`` /
  ``load_features`` / ``evaluate_features``, ``visualize_ranked_results``,
  ``visualize_from_features``.
- ``pyfici.optim`` — ``LayerwiseSGD``, ``LayerwiseAdamW`` (drop-in for torch.optim);
  pruning masks (``magnitude_mask``, ``global_magnitude_masks``, ``nm_mask``, ``nm_masks``,
  ``torch_prune_masks``) and ``layer_decay_param_groups``.
- ``pyfici.deid`` — ``k_same``, ``check_k_anonymity`` and privacy / utility metrics.
- ``pyfici.compat.torchreid`` — ``evaluate_rank``, ``re_ranking`` drop-ins;
  ``pyfici.compat.fastreid`` — ``evaluate_rank``, ``evaluate_roc``, ``aqe``, ``tpr_at_fpr``.
- ``pyfici.methods`` — ``autolr``, ``rollback``, ``ficgan`` (also as ``pyfici train ...``).
- ``pyfici.data``, ``pyfici.models`` — dataset readers, backbones and layer groupings.
"""

__version__ = "0.1.0"

from pyfici import deid, ops, optim, reid  # noqa: E402

__all__ = ["__version__", "ops", "reid", "optim", "deid"]
