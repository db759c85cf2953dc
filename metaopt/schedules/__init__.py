"""Optax transforms that set the learning rate."""

from metaopt.schedules.hypergradient import (
    HypergradientAdamState,
    HypergradientState,
    hypergradient_adam,
    hypergradient_lr,
    hypergradient_sgd,
)
from metaopt.schedules.learned_lr import (
    FEATURE_NAMES,
    LearnedLRSchedule,
    LearnedLRState,
    LRController,
    current_lr,
    init_controller,
    load_controller,
    pretrained_lr,
    save_controller,
    scale_by_learned_lr,
    with_theta,
)
from metaopt.schedules.plateau import EarlyStoppingState, PlateauState, early_stopping, plateau_lr, should_stop
