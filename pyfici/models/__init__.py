"""Backbones and ordered layer groupings (stem, blocks, head) for layer-wise
fine-tuning (AutoLR, rolling-back)."""

from pyfici.models.backbones import (
    BACKBONES,
    RELEASED_PRUNE,
    EfficientNetRetrieval,
    LayerGroups,
    PrunedBlock,
    ResNetRetrieval,
    block_preserves_shape,
    build_backbone,
    efficientnet_groups,
    generic_groups,
    groups_for,
    pool_features,
    prune_blocks,
    resnet_groups,
    retrieval_head,
)

__all__ = [
    "BACKBONES", "RELEASED_PRUNE", "EfficientNetRetrieval", "LayerGroups", "PrunedBlock",
    "ResNetRetrieval", "block_preserves_shape", "build_backbone", "efficientnet_groups",
    "generic_groups", "groups_for", "pool_features", "prune_blocks", "resnet_groups",
    "retrieval_head",
]
