"""Optax transforms that set the learning rate."""

from metaopt.schedules.baselines import (OPTIMIZERS, SCHEDULES, SELF_TUNING, STEP_SIZES,
                                         BaseOptimizer, adam_with_schedule, scale_by_prodigy_estimate,
                                         scheduled, self_tuning, unit_schedule, with_schedule)
from metaopt.schedules.common import (current_lr, evaluation_params, has_stop_signal, scale_by_lr,
                                      should_stop)
from metaopt.schedules.hypergradient import (
    HypergradientAdamState,
    HypergradientAdamVariantState,
    HypergradientState,
    hypergradient_adam,
    hypergradient_lr,
    hypergradient_sgd,
)
from metaopt.schedules.learned_lr import (
    CONTROLLERS,
    FEATURE_NAMES,
    NORM_FEATURES,
    LearnedLRSchedule,
    LearnedLRState,
    LRController,
    LSTMController,
    SavedController,
    apply_controller,
    controller_memory,
    direction_norm,
    init_controller,
    load_controller,
    make_controller,
    pretrained_lr,
    save_controller,
    scale_by_learned_lr,
    with_theta,
)
from metaopt.schedules.plateau import EarlyStoppingState, PlateauState, early_stopping, plateau_lr

__all__ = [
    "FEATURE_NAMES", "NORM_FEATURES", "LRController", "SavedController", "direction_norm", "LearnedLRSchedule", "LearnedLRState", "init_controller",
    "load_controller", "pretrained_lr", "save_controller", "scale_by_learned_lr", "with_theta",
    "CONTROLLERS", "LSTMController", "apply_controller", "controller_memory", "make_controller",
    "HypergradientAdamState", "HypergradientAdamVariantState", "HypergradientState", "hypergradient_adam", "hypergradient_lr",
    "hypergradient_sgd",
    "EarlyStoppingState", "PlateauState", "early_stopping", "plateau_lr",
    "current_lr", "evaluation_params", "has_stop_signal", "scale_by_lr", "should_stop",
    "SCHEDULES", "adam_with_schedule", "unit_schedule", "SELF_TUNING", "self_tuning",
    "OPTIMIZERS", "BaseOptimizer", "scheduled", "with_schedule", "STEP_SIZES",
    "scale_by_prodigy_estimate",
]
