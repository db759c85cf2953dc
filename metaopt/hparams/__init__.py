"""Hyperparameters from past runs: the run store, task meta-features, sweeps, search
baselines and the predictor. Sweeps: :func:`metaopt.hparams.sweep.sweep`."""

from metaopt.hparams.features import TASK_FEATURE_NAMES, dataset_features, task_features
from metaopt.hparams.predictor import Predictor
from metaopt.hparams.records import record_runs, result_rows
from metaopt.hparams.search import (Outcome, Trial, predicted_search, random_search,
                                    tpe_search)
from metaopt.hparams.space import DEFAULT_SPACE, Param, Space
from metaopt.hparams.store import MODES, STATUSES, ImportReport, Run, RunStore
from metaopt.hparams.sweep import SweepReport, TrainingObjective, load_space

__all__ = ["RunStore", "Run", "ImportReport", "STATUSES", "MODES", "Space", "Param",
           "DEFAULT_SPACE", "Predictor", "TASK_FEATURE_NAMES", "dataset_features",
           "task_features", "record_runs", "result_rows", "Outcome", "Trial",
           "random_search", "tpe_search", "predicted_search", "TrainingObjective",
           "SweepReport", "load_space"]
