"""The experiments of ``metaopt run``: one module each, all on one protocol.

Every experiment module offers a frozen dataclass ``Config`` (checked when it is
built), ``default_config(seed)``, ``quick_config(seed)`` and
``run(config, out, *, progress, store=None) -> Result`` (see
:mod:`metaopt.experiments.protocol`), and ``RUN_LENGTH``: the config fields a rerun of
the same run folder may change (a longer run continues from its checkpoint). :data:`REGISTRY` is the one list the CLI reads;
modules are imported only when used.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import NamedTuple

from metaopt.validation import check_choice


class Entry(NamedTuple):
  module: str    # module under metaopt.experiments
  summary: str   # one line for `metaopt list` and `metaopt run --help`


REGISTRY: dict[str, Entry] = {
    "lr-schedule": Entry("lr_schedule", "meta-train an LR controller and compare it with tuned "
                                        "optax schedules"),
    "adaptive-lr": Entry("adaptive_lr", "plateau, hypergradient and learned LRs vs fixed "
                                        "schedules, with early stopping"),
    "hparam-prediction": Entry("hparam_prediction", "predicted hyperparameters vs random search "
                                                    "and TPE, leave one dataset out"),
    "maml-transfer": Entry("maml_transfer", "MAML initialization vs random init and joint "
                                            "pre-training on unseen datasets"),
    "controllers": Entry("controllers", "LR controllers learned by TBPTT, PES, a supervised "
                                        "meta-dataset and RL vs hand schedules"),
}


__all__ = ["REGISTRY", "Entry", "load"]


def load(name: str) -> ModuleType:
  """The module of experiment ``name``; ValueError naming the accepted ones."""
  check_choice("experiment", name, REGISTRY)
  return importlib.import_module(f"metaopt.experiments.{REGISTRY[name].module}")
