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

from metaopt.hparams.space import Space

MODES = ("max", "min")


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


def _key(hparams: Mapping[str, Any]) -> str:
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
      k = _key(h)
      if k not in self.seen and k not in keys:
        todo.append(dict(h))
        keys.append(k)
    if todo:
      outcomes = list(self.objective(todo))
      if len(outcomes) != len(todo):
        raise ValueError(f"objective returned {len(outcomes)} outcomes for {len(todo)} configs")
      self.calls += len(todo)
      self.seen.update(zip(keys, outcomes))
    return [self.seen[_key(h)] for h in configs]


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
  if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
    raise ValueError(f"budget must be an integer >= 1, got {budget!r}")
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}; accepted: {', '.join(MODES)}")


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
  import optuna
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
  import optuna

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


class TrainingObjective:
  """Trains configurations of one (dataset, model family) task for real, exactly as
  :func:`metaopt.hparams.sweep.sweep` trains its runs, and returns their :class:`Outcome`.

  Same protocol as the sweep, so fresh trials and stored runs are comparable:
  AdamW (``learning_rate``, ``beta1``, ``weight_decay`` with the sweep's
  defaults when the configuration lacks them), the traced ``dropout`` rate,
  ``batch_size`` by gradient accumulation over micro-batches of ``micro_batch``
  examples (the gcd of the space's batch sizes), ``layers`` and the sweep's
  width for the family, ``epochs`` passes evaluated after each, data split by
  ``seed``. ``metric`` is read after the last epoch. Everything but ``layers``
  and ``width`` is traced, so all configurations with the same depth reuse one
  compiled program (cached here across calls). Each configuration's run key is
  derived from its values, so a configuration always gives the same outcome.
  """

  METRICS = ("val_accuracy", "val_loss", "test_accuracy", "test_loss", "best_val_accuracy")

  def __init__(self, dataset: str, model: str = "mlp", *, epochs: int = 5, seed: int = 0,
               metric: str = "val_accuracy", micro_batch: int = 16):
    from metaopt.hparams.sweep import tasks_of
    valid, invalid = tasks_of([dataset], [model])
    if invalid:
      raise ValueError(f"cannot train {model!r} on {dataset!r}: {invalid[0][2]}")
    if metric not in self.METRICS:
      raise ValueError(f"unknown metric {metric!r}; accepted: {', '.join(self.METRICS)}")
    for label, v in (("epochs", epochs), ("micro_batch", micro_batch)):
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{label} must be an integer >= 1, got {v!r}")
    self.dataset, self.model, self.epochs, self.seed = dataset, model, epochs, seed
    self.metric, self.micro_batch = metric, micro_batch
    self._programs: dict[tuple[int, int], tuple] = {}
    self.compile_time = 0.0

  def _program(self, layers: int, width: int):
    key = (layers, width)
    if key not in self._programs:
      import jax

      from metaopt.hparams.sweep import make_sweep_tx
      from metaopt.tasks import TaskConfig, make_task
      from metaopt.train import make_train_fn, steps_per_epoch

      start = time.perf_counter()
      task = make_task(TaskConfig(self.dataset, self.model, width, layers, self.micro_batch, 1,
                                  self.seed))
      per_epoch = steps_per_epoch(task)
      run = make_train_fn(task, make_sweep_tx, steps=self.epochs * per_epoch, eval_every=per_epoch,
                          dropout=lambda h: h["dropout"])
      arrays = task.arrays()
      compiled = jax.jit(run).lower(self._traced(dict(self._defaults(), batch_size=16)),
                                    jax.random.PRNGKey(0), arrays).compile()
      self._programs[key] = (compiled, arrays)
      self.compile_time += time.perf_counter() - start
    return self._programs[key]

  def _defaults(self) -> dict:
    from metaopt.hparams.sweep import resolve_hparams
    return resolve_hparams({}, self.model)

  def _traced(self, h: dict) -> dict:
    import jax.numpy as jnp
    return {"learning_rate": jnp.float32(h["learning_rate"]), "beta1": jnp.float32(h["beta1"]),
            "weight_decay": jnp.float32(h["weight_decay"]),
            "dropout": jnp.float32(h["dropout"] or 0.0),
            "accumulate": jnp.int32(h["batch_size"] // self.micro_batch)}

  def __call__(self, configs: Sequence[Mapping[str, Any]]) -> list[Outcome]:
    import zlib

    import jax

    from metaopt.hparams.sweep import KNOWN_HPARAMS, resolve_hparams
    from metaopt.train import run_status

    out = []
    for config in configs:
      unknown = sorted(set(config) - set(KNOWN_HPARAMS))
      if unknown:
        raise ValueError(f"cannot train hyperparameter(s) {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(KNOWN_HPARAMS)}")
      h = resolve_hparams(dict(config), self.model)
      if h["batch_size"] % self.micro_batch:
        raise ValueError(f"batch_size {h['batch_size']} is not a multiple of the micro-batch "
                         f"{self.micro_batch}")
      compiled, arrays = self._program(h["layers"], h["width"])
      key = jax.random.fold_in(jax.random.PRNGKey(self.seed),
                               zlib.crc32(_key(config).encode()) & 0x7FFFFFFF)
      start = time.perf_counter()
      result = jax.block_until_ready(compiled(self._traced(h), key, arrays))
      wall = time.perf_counter() - start
      curves = {k: np.asarray(getattr(result, k)) for k in
                ("val_loss", "val_accuracy", "test_loss", "test_accuracy")}
      metrics = {k: float(v[-1]) for k, v in curves.items()}
      metrics["best_val_accuracy"] = float(np.nanmax(curves["val_accuracy"]))
      ok = run_status(result)[0] == "completed"
      out.append(Outcome(metrics[self.metric] if ok else math.nan,
                         "completed" if ok else "diverged", wall, metrics))
    return out
