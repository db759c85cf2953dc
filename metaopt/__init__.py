"""metaopt: learning how to optimize, in JAX."""

from metaopt import estimators
from metaopt.schedules import (
    FEATURE_NAMES,
    LearnedLRSchedule,
    LearnedLRState,
    LRController,
    current_lr,
    early_stopping,
    hypergradient_adam,
    hypergradient_lr,
    hypergradient_sgd,
    init_controller,
    plateau_lr,
    pretrained_lr,
    scale_by_learned_lr,
    should_stop,
    with_theta,
)
from metaopt.unroll import InnerProblem, unroll

__version__ = "0.1.0"
