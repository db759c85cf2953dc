"""Meta-training on the unroll core: learned LR controllers and MAML-style initializations."""

from metaopt.meta.lr import MetaLRConfig, MetaTrainResult, lr_problem, meta_train
from metaopt.meta.maml import MAML, MAMLState, maml, meta_train_maml, pretrain
from metaopt.meta.rl import (RLConfig, RLResult, load_policy, rl_adam, save_policy,
                             scale_by_rl_lr, train_rl)
from metaopt.meta.supervised import (MetaDataset, SupervisedConfig, SupervisedResult,
                                     load_meta_dataset, save_meta_dataset, train_supervised)

__all__ = ["MetaLRConfig", "MetaTrainResult", "lr_problem", "meta_train", "MAML", "MAMLState",
           "maml", "meta_train_maml", "pretrain",
           "SupervisedConfig", "SupervisedResult", "MetaDataset", "train_supervised",
           "save_meta_dataset", "load_meta_dataset",
           "RLConfig", "RLResult", "train_rl", "scale_by_rl_lr", "rl_adam", "save_policy",
           "load_policy"]
