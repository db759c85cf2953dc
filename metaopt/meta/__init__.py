"""Meta-training on the unroll core: learned LR controllers and MAML-style initializations."""

from metaopt.meta.lr import MetaLRConfig, MetaTrainResult, lr_problem, meta_train
from metaopt.meta.maml import MAML, MAMLState, maml, meta_train_maml, pretrain

__all__ = ["MetaLRConfig", "MetaTrainResult", "lr_problem", "meta_train", "MAML", "MAMLState",
           "maml", "meta_train_maml", "pretrain"]
