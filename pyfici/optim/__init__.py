"""Layer-wise optimizers: drop-in ``torch.optim.SGD`` / ``AdamW`` replacements whose
step is one fused pyfici op per (device, dtype) for all param groups, with
per-group learning rates and optional pruning masks (see pyfici.ops.optim)."""

from pyfici.optim.layerwise import LayerwiseAdamW, LayerwiseSGD

__all__ = ["LayerwiseSGD", "LayerwiseAdamW"]
