"""Hyperparameters from past runs: the run store, task meta-features, sweeps."""

from metaopt.hparams.space import DEFAULT_SPACE, Param, Space
from metaopt.hparams.store import STATUSES, ImportReport, Run, RunStore
from metaopt.hparams.features import FEATURE_NAMES, dataset_features, task_features
from metaopt.hparams.predictor import Predictor

__all__ = ["RunStore", "Run", "ImportReport", "STATUSES", "Space", "Param", "DEFAULT_SPACE",
           "Predictor", "FEATURE_NAMES", "dataset_features", "task_features"]
