"""metaopt: learning how to optimize, in JAX.

The public surface: the unroll core and its estimators, the LR transforms (optax
``GradientTransformationExtraArgs``), meta-training of LR controllers and of
MAML-style initializations, and hyperparameters from past runs.
"""

from metaopt import estimators, sharding
from metaopt.estimators import Estimate, first_order, full, tbptt
from metaopt.hparams import Predictor, RunStore, Space, TASK_FEATURE_NAMES
from metaopt.meta import (MAML, MAMLState, MetaLRConfig, MetaTrainResult, RLConfig, RLResult,
                          SupervisedConfig, SupervisedResult, maml, meta_train, meta_train_maml,
                          pretrain, rl_adam, scale_by_rl_lr, train_rl, train_supervised)
from metaopt.schedules import (
    FEATURE_NAMES,
    NORM_FEATURES,
    LearnedLRSchedule,
    LearnedLRState,
    LRController,
    LSTMController,
    SavedController,
    controller_memory,
    current_lr,
    direction_norm,
    early_stopping,
    hypergradient_adam,
    hypergradient_lr,
    hypergradient_sgd,
    init_controller,
    load_controller,
    make_controller,
    plateau_lr,
    pretrained_lr,
    save_controller,
    scale_by_learned_lr,
    should_stop,
    with_theta,
)
from metaopt.sharding import initialize, make_mesh, population_map, shard_batch, shard_params
from metaopt.train import LoopResult, TrainResult, TrainState, run_loop, train_grid
from metaopt.unroll import InnerProblem, unroll

__version__ = "0.1.0"

__all__ = [
    "unroll", "InnerProblem", "estimators", "Estimate", "tbptt", "full", "first_order",
    "FEATURE_NAMES", "NORM_FEATURES", "LRController", "init_controller", "scale_by_learned_lr",
    "LearnedLRSchedule", "LearnedLRState", "pretrained_lr", "save_controller",
    "load_controller", "SavedController", "with_theta", "current_lr", "direction_norm",
    "LSTMController", "make_controller", "controller_memory",
    "hypergradient_lr", "hypergradient_sgd", "hypergradient_adam",
    "plateau_lr", "early_stopping", "should_stop",
    "TrainState", "train_grid", "TrainResult", "run_loop", "LoopResult",
    "sharding", "make_mesh", "population_map", "shard_batch", "shard_params", "initialize",
    "meta_train", "MetaLRConfig", "MetaTrainResult",
    "maml", "MAML", "MAMLState", "meta_train_maml", "pretrain",
    "train_supervised", "SupervisedConfig", "SupervisedResult",
    "train_rl", "RLConfig", "RLResult", "scale_by_rl_lr", "rl_adam",
    "RunStore", "Predictor", "Space", "TASK_FEATURE_NAMES",
]
