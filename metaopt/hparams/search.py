"""Search baselines over a :class:`~metaopt.hparams.Space`: random search, Optuna's
classic TPE, and TPE warm-started with a predictor's suggestions.

An objective is a callable ``objective(configs) -> list[Outcome]`` that trains
(or looks up) every configuration of a list; taking a list lets random search
train a whole batch in one compiled program. TPE asks for one configuration at
a time. :class:`CachedObjective` wraps an objective so that a configuration
is trained once however many searches propose it.

Failed and diverged trials count as the worst value: they never become the
best so far, and TPE is told they failed (``TrialState.FAIL``).
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
import optuna

from metaopt.hparams.space import Space
from metaopt.hparams.store import MODES
from metaopt.validation import check_choice, check_int


class Outcome(NamedTuple):
  """The result of training one configuration."""
  value: float                 # the metric (NaN when the run did not complete)
  status: str = "completed"    # "completed", "diverged" or "failed"
  wall_time: float = 0.0       # seconds of training
  metrics: Mapping[str, float] | None = None   # everything else measured


class Trial(NamedTuple):
  """One configuration a search tried and its outcome."""
  hparams: dict
  outcome: Outcome
  source: str = "search"       # "random", "tpe", "predictor" (an enqueued suggestion), ...


Objective = Callable[[Sequence[Mapping[str, Any]]], Sequence[Outcome]]


def json_key(hparams: Mapping[str, Any]) -> str:
  return json.dumps(hparams, sort_keys=True)


class CachedObjective:
  """``objective`` evaluated at most once per distinct configuration.

  ``calls`` counts configurations actually trained; ``seen`` maps each to its outcome.
  """

  def __init__(self, objective: Objective):
    self.objective = objective
    self.seen: dict[str, Outcome] = {}
    self.calls = 0

  def __call__(self, configs: Sequence[Mapping[str, Any]]) -> list[Outcome]:
    todo, keys = [], []
    for h in configs:
      k = json_key(h)
      if k not in self.seen and k not in keys:
        todo.append(dict(h))
        keys.append(k)
    if todo:
      outcomes = list(self.objective(todo))
      if len(outcomes) != len(todo):
        raise ValueError(f"objective returned {len(outcomes)} outcomes for {len(todo)} configs")
      self.calls += len(todo)
      self.seen.update(zip(keys, outcomes))
    return [self.seen[json_key(h)] for h in configs]


def score(outcome: Outcome, mode: str) -> float:
  """Higher is better: the value (negated for ``mode="min"``), -inf for a run that
  did not complete or whose value is not finite."""
  if outcome.status != "completed" or not math.isfinite(outcome.value):
    return -math.inf
  return outcome.value if mode == "max" else -outcome.value


def best_so_far(trials: Sequence[Trial], mode: str) -> np.ndarray:
  """[len(trials)] the best score (see :func:`score`) among the first t+1 trials."""
  return np.maximum.accumulate(np.array([score(t.outcome, mode) for t in trials], np.float64))


def _check(space: Space, budget: int, mode: str) -> None:
  if not isinstance(space, Space):
    raise ValueError(f"space must be a metaopt.hparams.Space, got {type(space).__name__}")
  check_int("budget", budget)
  check_choice("mode", mode, MODES)


def random_search(objective: Objective, space: Space, budget: int, *, seed: int = 0,
                  mode: str = "max") -> list[Trial]:
  """``budget`` configurations drawn independently from ``space`` with
  ``np.random.default_rng(seed)``, trained as one batch."""
  _check(space, budget, mode)
  rng = np.random.default_rng(seed)
  configs = [space.sample(rng) for _ in range(budget)]
  return [Trial(h, o, "random") for h, o in zip(configs, objective(configs))]


def optuna_distributions(space: Space) -> dict:
  """The space as Optuna distributions (float/int with log, categorical)."""
  out = {}
  for p in space.params:
    if p.kind == "float":
      out[p.name] = optuna.distributions.FloatDistribution(p.low, p.high, log=p.log)
    elif p.kind == "int":
      out[p.name] = optuna.distributions.IntDistribution(p.low, p.high, log=p.log)
    else:
      out[p.name] = optuna.distributions.CategoricalDistribution(list(p.choices))
  return out


def tpe_search(objective: Objective, space: Space, budget: int, *, seed: int = 0,
               mode: str = "max", warm_start: Sequence[Mapping[str, Any]] = (),
               n_startup_trials: int = 10) -> list[Trial]:
  """Optuna's classic TPE (``TPESampler(multivariate=False, constant_liar=False)``,
  pinned because Optuna 5 defaults to the multivariate variant) for ``budget`` trials.

  ``warm_start``: configurations tried first (``study.enqueue_trial``), e.g. a
  predictor's top-k; they count toward the budget and TPE learns from them.
  ``n_startup_trials``: random trials (Optuna's default 10) before TPE models
  the results; enqueued trials count among them.
  """
  _check(space, budget, mode)
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  sampler = optuna.samplers.TPESampler(seed=seed, multivariate=False, constant_liar=False,
                                       n_startup_trials=n_startup_trials)
  study = optuna.create_study(direction="maximize" if mode == "max" else "minimize",
                              sampler=sampler)
  warm = [space.validate(h) for h in warm_start]
  for h in warm:
    study.enqueue_trial(h)
  dists = optuna_distributions(space)
  trials = []
  for i in range(budget):
    trial = study.ask(dists)
    h = space.validate({name: trial.params[name] for name in space.names})
    outcome = objective([h])[0]
    if outcome.status == "completed" and math.isfinite(outcome.value):
      study.tell(trial, outcome.value)
    else:
      study.tell(trial, state=optuna.trial.TrialState.FAIL)
    trials.append(Trial(h, outcome, "predictor" if i < len(warm) else "tpe"))
  return trials


def predicted_search(objective: Objective, suggestions: Sequence[Mapping[str, Any]],
                     budget: int | None = None) -> list[Trial]:
  """The first ``budget`` (default all) of a predictor's suggestions, trained as a batch.
  ``suggestions``: hparams dicts or ``Predictor.suggest`` entries."""
  configs = [dict(s["hparams"]) if "hparams" in s else dict(s) for s in suggestions]
  configs = configs[:budget] if budget is not None else configs
  return [Trial(h, o, "predictor") for h, o in zip(configs, objective(configs))]


def timed(objective: Objective) -> Objective:
  """``objective`` with each outcome's wall time set to its share of the call when unset."""
  def run(configs):
    start = time.perf_counter()
    outcomes = list(objective(configs))
    share = (time.perf_counter() - start) / max(len(configs), 1)
    return [o if o.wall_time else o._replace(wall_time=share) for o in outcomes]
  return run
