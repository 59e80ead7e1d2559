"""AutoLR: layer-wise pruning and auto-tuning of layer-wise learning rates
(Ro & Choi, AAAI 2021, arXiv:2002.06048), as the authors' code does it, on
pyfici's fused ops (``pyfici.optim.LayerwiseSGD``, ``pyfici.ops.weight_variation``).

The algorithm (one entry per accepted epoch):

1. Trial: copy the accepted model, build a fresh layer-wise SGD (momentum 0.9,
   Nesterov, weight decay 5e-4) with the current per-group LRs, train one epoch.
2. Weight variation of every group over the epoch, over its conv / linear weights
   (BN, biases and ResNet's downsample excluded):
   ``v_l = 1e6 * sqrt(sum_c ||W_c^t - W_c^{t-1}||_F^2) / sum_c numel(W_c)``.
3. Sorting score over the L blocks (stem and head excluded), ``pi`` = ascending
   (stable) argsort of v: ``S = 1 - 2/L^2 * sum_r |r - pi(r)|``, rounded to 3
   decimals as released.
4. ``S >= tau``: accept the trial. Else discard it, compute new LRs and retry the
   same epoch. ``tau`` starts at 0.94; at every epoch >= 1, if ``tau > 0.8`` then
   ``tau *= 0.99``.
5. Target variation, computed at the first failure of an epoch and kept for the
   epoch's later retries: epoch 0, a ramp ``m + i*d`` with ``m = 2*min(v)``,
   ``d = (0.4*max(v) - m)/(L-1)``; later epochs, ``vbar = v`` repaired outward
   from the centre ``c = L//2`` with step ``d = (max v - min v)/(L-1)``.
   New LRs: ``eta_i *= vbar_i / v_i``; stem = 0.5 * eta(first block); head = 0.01.
6. After the accepted epoch ``lr_decay_epoch - 1`` (39) every LR is multiplied by 0.2.

Decisions where the paper / code are silent or unsafe (docs/autolr.md):

- Guards: a non-increasing epoch-0 ramp (``2*min(v) >= 0.4*max(v)``) is replaced
  by the ramp from ``min(v)`` to ``max(v)`` (or, when all v are equal, a ramp of
  +10% of ``min(v)`` per block); targets below ``target_floor * min(v)`` (0.1;
  repair can make them negative) are raised to it; LRs are clamped to
  ``[lr_min, lr_max]``; a group whose variation is 0 keeps its LR. Every clamp is
  reported in the epoch's ``guards``.
- Retry cap: at most ``max_retries`` (10) retries per epoch; when the cap is hit
  the trial with the best score is accepted (with the LRs it used, which the
  next epoch starts from) and ``cap_reached`` is reported.
- BN: trials train in train mode (BN statistics update). ``bn_eval=True``
  reproduces the released behaviour (BN layers in eval mode during trials).
- Pruning: ``prune="released"`` drops ResNet-50's layer4[1], layer4[2] (the
  released setting, default for resnet50). ``prune="auto"`` (default for other
  backbones) decides from the weight variation of the first trial of epoch 0:
  walking down from the highest block, a block is pruned while it preserves its
  input shape (so it can be replaced by the identity), its variation is below
  ``prune_ratio`` (0.5) x the median block variation, and no more than
  ``prune_max_fraction`` (25%) of the blocks are pruned; epoch 0 then restarts on
  the pruned model (the probe trial is reported, not counted as a retry).
  Pruned blocks are replaced by a parameter-free identity, so they leave the
  model's parameters, the optimizer and the checkpoint.
- Baseline (``baseline=True``): the same training with one LR for the whole
  backbone and ``head_lr`` for the head, one trial per epoch.

Layout: :mod:`.formulas` (the method's formulas), :mod:`.train` (the run on
:mod:`pyfici.engine`, ``pyfici train autolr``).
"""

from pyfici.methods.autolr.formulas import (
    VARIATION_SCALE,
    auto_prune_choice,
    group_variation,
    sorting_score,
    target_variation,
    tau_at,
    update_lrs,
)
from pyfici.methods.autolr.train import (
    AutoLRConfig,
    add_train_arguments,
    demo_compare,
    run_autolr,
    train_main,
)

__all__ = [
    "VARIATION_SCALE", "AutoLRConfig", "add_train_arguments", "auto_prune_choice", "demo_compare",
    "group_variation", "run_autolr", "sorting_score", "target_variation", "tau_at", "train_main", "update_lrs",
]
