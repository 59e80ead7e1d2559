"""Layer-wise optimizers: drop-in ``torch.optim.SGD`` / ``AdamW`` replacements whose
step is one fused pyfici op per (device, dtype) for all param groups, with
per-group learning rates and optional pruning masks (see pyfici.ops.optim);
pruning-mask builders (:mod:`pyfici.optim.masks`) and layer-wise lr groups
(:mod:`pyfici.optim.param_groups`)."""

from pyfici.optim.layerwise import LayerwiseAdamW, LayerwiseSGD
from pyfici.optim.masks import (
           global_magnitude_masks,
           magnitude_mask,
           nm_mask,
           nm_masks,
           torch_prune_masks,
)
from pyfici.optim.param_groups import layer_decay_param_groups

__all__ = ["LayerwiseSGD", "LayerwiseAdamW", "magnitude_mask", "global_magnitude_masks", "nm_mask", "nm_masks",
           "torch_prune_masks", "layer_decay_param_groups"]
