"""Rolling-back fine-tuning for person re-identification.

"Backbone can not be trained at once: rolling back to pre-trained network for
person re-identification" (Ro et al., AAAI 2019, arXiv:1901.06140). Training
runs in periods; at the start of every period after the first, the high layer
groups are *rolled back*: every state entry of theirs (weights, biases and BN
running statistics) is copied again from the pre-trained network, while the
low groups and the head keep what they learned. See docs/rollback.md.

Library API::

    from pyfici.methods.rollback import RollbackConfig, run
    result = run(RollbackConfig(dataset="builtin", backbone="efficientnet_lite0",
                                epochs_per_period=3, out="runs/rb"))
    result["evaluations"][-1]["mAP"]

A schedule is data: a list of :class:`Period` (kept groups, reset groups, LR
per group). Group names are the layer groups of :mod:`pyfici.models`
(``stem``, ``layer1.0``, ..., ``head``) or a prefix of them (``layer1`` means
every ``layer1.*`` group). :func:`released_schedule` is the authors' 4-period
ResNet schedule; :func:`default_schedule` builds the same shape for any
grouping (blocks split into 4 contiguous stages). A schedule naming a group
that the backbone lacks is refused by :func:`resolve_schedule` before any
training. Schedules load from JSON (``--schedule FILE``)::

    [{"kept": ["stem", "layer1", "layer2", "layer3", "layer4", "head"], "reset": [],
      "lr": {"stem": 0.01, "layer1": 0.01, ..., "head": 0.1}}, ...]

Decisions where the paper and the released code are silent are listed in
docs/rollback.md (baseline LR schedule, optimizer state at period starts,
triplet mining, generic schedules).

Layout: :mod:`.schedule` (periods, presets, the roll-back), :mod:`.train` (the
run on :mod:`pyfici.engine`, ``pyfici train rollback``).
"""

from pyfici.methods.rollback.schedule import (
    Period,
    ResolvedPeriod,
    baseline_schedule,
    default_schedule,
    fingerprint,
    load_schedule,
    pretrained_state,
    released_schedule,
    resolve_schedule,
    roll_back_,
)
from pyfici.methods.rollback.train import (
    RollbackConfig,
    add_train_arguments,
    batch_hard_triplet_loss,
    demo,
    run,
    train_main,
)

# the schedule (data and its checks), then the run
__all__ = ["Period", "ResolvedPeriod", "baseline_schedule", "default_schedule", "fingerprint", "load_schedule",
           "pretrained_state", "released_schedule", "resolve_schedule", "roll_back_",
           "RollbackConfig", "add_train_arguments", "batch_hard_triplet_loss", "demo", "run", "train_main"]
