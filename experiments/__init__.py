"""The experiments of ``metaopt run``: one module each, all on one protocol.

Every experiment module offers a frozen dataclass ``Config`` (checked when it is
built), ``default_config(seed)``, ``quick_config(seed)`` and
``run(config, out, *, progress, store=None) -> Result`` (see
:mod:`metaopt.experiments.protocol`), and ``RUN_LENGTH``: the config fields a rerun of
the same run folder may change (a longer run continues from its checkpoint). :data:`REGISTRY` is the one list the CLI reads;
modules are imported only when used.

Named configurations, the plans' workloads as partial TOML files over an experiment's
default, live in ``configs/<experiment>/<name>.toml`` (flax/examples style: configs
apart from the code); ``metaopt run <experiment> --config <name>`` reads one. Each
file opens with ``# estimate:`` lines: GPU memory and time, an estimate, not a measurement.
"""

from __future__ import annotations

import importlib
import pathlib
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


CONFIGS = pathlib.Path(__file__).parent / "configs"
ESTIMATE = "# estimate:"

__all__ = ["REGISTRY", "Entry", "load", "named_configs", "config_file", "estimate"]


def load(name: str) -> ModuleType:
  """The module of experiment ``name``; ValueError naming the accepted ones."""
  check_choice("experiment", name, REGISTRY)
  return importlib.import_module(f"metaopt.experiments.{REGISTRY[name].module}")


def named_configs(experiment: str) -> dict[str, pathlib.Path]:
  """Name -> TOML file of each named configuration of ``experiment``."""
  check_choice("experiment", experiment, REGISTRY)
  return {p.stem: p for p in sorted((CONFIGS / experiment).glob("*.toml"))}


def config_file(experiment: str, name_or_path: str) -> pathlib.Path:
  """The file ``--config`` means: an existing file, else the named configuration of
  ``experiment``; ValueError listing the named ones when it is neither."""
  path = pathlib.Path(name_or_path)
  if path.exists() or path.suffix in (".toml", ".json") or len(path.parts) > 1:
    return path   # a file (config.load_file names a missing or unreadable one)
  named = named_configs(experiment)
  if name_or_path not in named:
    accepted = ", ".join(named) or "none"
    raise ValueError(f"--config {name_or_path!r} is neither a file nor a named configuration "
                     f"of {experiment!r}; named: {accepted}")
  return named[name_or_path]


def estimate(path: pathlib.Path) -> str:
  """The ``# estimate:`` lines of a named configuration, joined."""
  lines = [line[len(ESTIMATE):].strip() for line in path.read_text().splitlines()
           if line.startswith(ESTIMATE)]
  return " ".join(lines)
