"""metaopt: learning how to optimize, in JAX."""

from metaopt import estimators
from metaopt.schedules import (
    FEATURE_NAMES,
    LearnedLRSchedule,
    LearnedLRState,
    LRController,
    current_lr,
    init_controller,
    pretrained_lr,
    scale_by_learned_lr,
    with_theta,
)
from metaopt.unroll import InnerProblem, unroll

__version__ = "0.1.0"
