"""A meta-model of past training runs that suggests hyperparameters for a new task.

:class:`Predictor` is an ensemble of small Flax MLPs over (standardized task
meta-features, encoded hyperparameters) that predicts how a configuration ranks
on a task. The ensemble members differ in their initialization and in a
Poisson bootstrap over tasks; they are ``vmap``-ed, so fitting is one compiled
program (the steps are a :func:`metaopt.unroll` scan).

Targets. Tasks differ in difficulty (90% accuracy is poor on digits and good
on mnist1d), so the metric is normalized within each task: a run's target is
its quantile among the task's runs, ``(rank - 0.5) / n`` in (0, 1), 1 being the
best (for ``mode="min"`` the lowest metric is best). Ties share their average
rank. A run whose status is not "completed" (diverged, failed) or whose metric
is missing or not finite ranks below every completed run of its task: failed
runs get the worst value. ``predicted`` in :meth:`Predictor.suggest` is this
quantile: the fraction of a comparable task's past runs the configuration is
expected to beat. ``uncertainty`` is the standard deviation across the ensemble.

Meta-features. Numbers (and bools) are used as they are, except positive
features spanning at least two decades, which are log10-scaled; strings are
one-hot encoded (``"name=value"`` columns). All columns are standardized with
the mean and standard deviation over the training tasks.

Extrapolation. The predictor only knows the tasks it was fitted on. For each
numeric column (log10-scaled where the column is) it keeps the fitted range
``[low, high]`` over the training tasks; a task's *extrapolation distance* is
the largest ``excess / (high - low)`` over the columns, ``excess`` being how far
the task's value lies outside the range (0 inside it; infinite outside a column
that was constant in fitting, and for a string value never seen in fitting).
:meth:`Predictor.predict` and :meth:`Predictor.suggest` refuse a task whose
distance exceeds 1, that is a feature beyond the fitted min or max by more than
the fitted range's width, unless called with ``extrapolate=True``. For any task
outside the range (distance ``r > 0``) the reported ``uncertainty`` ``s`` is
inflated towards ``UNKNOWN_STD`` = 1/sqrt(12), the spread of a quantile about
which nothing is known (uniform on (0, 1)): ``s + (UNKNOWN_STD - s) * r / (1 + r)``,
halfway there at the edge of what is accepted without ``extrapolate`` and all
the way for an infinite distance. Values a task cannot have (``n_train <= 0``,
``epochs <= 0``, fractions outside [0, 1]: ``features.FEATURE_DOMAINS``) and
non-finite ones are refused even with ``extrapolate=True``.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import time
from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.stats import rankdata

from metaopt.hparams.features import FEATURE_DOMAINS
from metaopt.hparams.space import Space
from metaopt.hparams.store import MODES
from metaopt.unroll import unroll
from metaopt.validation import check_choice, check_int, check_number, is_number

FORMAT_VERSION = 2   # 2: the fitted range of each feature column (features.low, .high)
FEATURE_CLIP = 3.0   # standardized meta-features are clipped to [-3, 3]
UNKNOWN_STD = 1.0 / math.sqrt(12.0)  # std of a quantile uniform on (0, 1): no information
# Bounds on the work one call may ask for (a typo such as -k 100000 errs instead of hanging).
MAX_STEPS = 1_000_000
MAX_ENSEMBLE = 100
MAX_K = 1000
MAX_CANDIDATES = 100_000
MAX_REFINE = 20
_JSON_NAME = "predictor.json"
_WEIGHTS_NAME = "predictor.msgpack"


class _Net(nn.Module):
  """MLP from (features, encoded hparams) to a predicted within-task quantile."""
  hidden: tuple[int, ...]

  @nn.compact
  def __call__(self, x):
    for width in self.hidden:
      x = nn.swish(nn.Dense(width)(x))
    return nn.sigmoid(nn.Dense(1)(x)[..., 0])


class FeatureSpec(NamedTuple):
  """How task meta-features become the network's input columns."""
  names: tuple[str, ...]          # the task features a task must provide
  columns: tuple[str, ...]        # input columns ("name" or "name=value" for strings)
  sources: tuple[str, ...]        # per column: the feature it reads
  levels: tuple[str | None, ...]  # per column: the string a one-hot column tests (None: a number)
  log: tuple[bool, ...]           # per column: log10 before standardizing
  mean: np.ndarray
  std: np.ndarray
  low: np.ndarray                 # per column: the fitted range over the training tasks
  high: np.ndarray


def _numeric_feature(x) -> bool:
  """Numbers and bools (a bool feature is a 0/1 column)."""
  return is_number(x) or isinstance(x, (bool, np.bool_))


def _feature_columns(task_features: Mapping[str, Mapping[str, Any]],
                     names: Sequence[str] | None) -> FeatureSpec:
  """Infer the input columns from the training tasks' features."""
  if names is None:
    names = sorted({n for f in task_features.values() for n in f})
  names = tuple(names)
  for task, f in task_features.items():
    missing = [n for n in names if n not in f]
    if missing:
      raise ValueError(f"meta-features missing for task {task!r}: {', '.join(missing)}")
  columns, sources, levels, logs, values = [], [], [], [], []
  for n in names:
    vals = [f[n] for f in task_features.values()]
    if all(_numeric_feature(v) for v in vals):
      v = np.asarray(vals, np.float64)
      if not np.all(np.isfinite(v)):
        bad = [t for t, f in task_features.items() if not math.isfinite(float(f[n]))]
        raise ValueError(f"meta-feature {n!r} is not finite for task(s) {', '.join(bad)}")
      log = bool(v.min() > 0 and v.max() / v.min() >= 100.0)
      columns.append(n)
      sources.append(n)
      levels.append(None)
      logs.append(log)
      values.append(np.log10(v) if log else v)
    elif all(isinstance(v, str) or _numeric_feature(v) for v in vals):
      for level in sorted({str(v) for v in vals}):
        columns.append(f"{n}={level}")
        sources.append(n)
        levels.append(level)
        logs.append(False)
        values.append(np.asarray([float(str(v) == level) for v in vals]))
    else:
      raise ValueError(f"meta-feature {n!r} must be a number or a string, got "
                       f"{next(v for v in vals if not _numeric_feature(v))!r}")
  x = np.stack(values, axis=1) if values else np.zeros((len(task_features), 0))
  mean, std = x.mean(axis=0), x.std(axis=0)
  std = np.where(std > 1e-8, std, 1.0)
  return FeatureSpec(names, tuple(columns), tuple(sources), tuple(levels), tuple(logs), mean, std,
                     x.min(axis=0), x.max(axis=0))


def _column_values(spec: FeatureSpec, features: Mapping[str, Any], task: str) -> np.ndarray:
  """The input columns of one task's features before standardizing; ValueError naming
  missing or non-finite ones."""
  if not isinstance(features, Mapping):
    raise ValueError(f"task features must be a mapping of name to value, got {features!r}")
  missing = [n for n in spec.names if n not in features]
  if missing:
    raise ValueError(f"meta-features missing for {task}: {', '.join(missing)} "
                     f"(the predictor needs: {', '.join(spec.names)})")
  out = np.empty(len(spec.columns))
  for i, (col, name, level, log) in enumerate(zip(spec.columns, spec.sources, spec.levels,
                                                  spec.log)):
    if level is not None:
      out[i] = float(str(features[name]) == level)
      continue
    v = features[name]
    if not _numeric_feature(v) or not math.isfinite(float(v)):
      raise ValueError(f"meta-feature {col!r} of {task} must be a finite number, got {v!r}")
    v = float(v)
    if log:
      if v <= 0:
        raise ValueError(f"meta-feature {col!r} of {task} must be positive (it is log-scaled), "
                         f"got {v!r}")
      v = float(np.log10(v))  # as in fitting, so a training task is exactly at its value
    out[i] = v
  return out


def _standardize(spec: FeatureSpec, columns: np.ndarray) -> np.ndarray:
  # Clipped: a task far outside the stored ones gets the prediction of the
  # nearest edge instead of an extrapolation.
  return np.clip((columns - spec.mean) / spec.std, -FEATURE_CLIP, FEATURE_CLIP).astype(np.float32)


def _feature_vector(spec: FeatureSpec, features: Mapping[str, Any], task: str = "the task") -> np.ndarray:
  """Standardized input columns of one task's features; ValueError naming missing ones."""
  return _standardize(spec, _column_values(spec, features, task))


def _extrapolation(spec: FeatureSpec, features: Mapping[str, Any], columns: np.ndarray,
                   task: str) -> tuple[float, str]:
  """The extrapolation distance of a task (see the module docstring) and a sentence
  on its farthest feature ("" inside the fitted range)."""
  worst, reason = 0.0, ""
  seen: dict[str, list[str]] = {}
  for name, level in zip(spec.sources, spec.levels):
    if level is not None:
      seen.setdefault(name, []).append(level)
  for name, levels in seen.items():
    if str(features[name]) not in levels:
      return math.inf, (f"meta-feature {name!r} of {task} is {features[name]!r}, a value not "
                        f"seen in fitting (seen: {', '.join(map(repr, levels))})")
  for i, (col, level, log) in enumerate(zip(spec.columns, spec.levels, spec.log)):
    if level is not None:
      continue
    lo, hi, x = float(spec.low[i]), float(spec.high[i]), float(columns[i])
    excess = max(lo - x, x - hi, 0.0)
    if excess <= 1e-9 * max(1.0, abs(lo), abs(hi)):  # rounding, e.g. a JSON round trip
      continue
    spread = hi - lo
    r = excess / spread if spread > 0 else math.inf
    if r > worst:
      shown = lambda v: f"{10 ** v:.6g}" if log else f"{v:.6g}"
      fitted = (f"the predictor was fitted on {col} = {shown(lo)} only" if spread == 0 else
                f"the fitted range is [{shown(lo)}, {shown(hi)}]")
      worst, reason = r, (f"meta-feature {col!r} of {task} is {shown(x)}, far outside what "
                          f"the predictor knows ({fitted})")
  return worst, reason


def _check_domains(features: Mapping[str, Any], names: Sequence[str], task: str) -> None:
  """Values no task can have (n_train <= 0, a fraction above 1) are refused outright."""
  if not isinstance(features, Mapping):
    return  # named by _column_values
  for name in names:
    if name in FEATURE_DOMAINS and name in features:
      low, high, low_open = FEATURE_DOMAINS[name]
      check_number(f"meta-feature {name!r} of {task}", features[name], low=low, high=high,
                   low_open=low_open)


def _get(run, name):
  return run[name] if isinstance(run, Mapping) else getattr(run, name)


def task_quantiles(scores: np.ndarray, ok: np.ndarray) -> np.ndarray:
  """Within-task quantiles ``(rank - 0.5) / n`` of ``scores`` (higher is better);
  entries with ``ok`` False rank below all others (ties share their average rank)."""
  s = np.where(ok, scores, -np.inf)
  return (rankdata(s, method="average") - 0.5) / len(s)


class Predictor:
  """A fitted hyperparameter predictor; build with :meth:`fit` or :meth:`load`."""

  def __init__(self, *, params, space: Space, features: FeatureSpec, metric: str, mode: str,
               hidden: Sequence[int], anchors: np.ndarray, info: Mapping[str, Any] | None = None):
    self.params = params
    self.space = space
    self.features = features
    self.metric = metric
    self.mode = mode
    self.hidden = tuple(int(h) for h in hidden)
    self.anchors = np.asarray(anchors, np.float32).reshape(-1, space.dim)
    self.info = dict(info or {})
    self._net = _Net(self.hidden)

  @property
  def ensemble_size(self) -> int:
    return int(jax.tree.leaves(self.params)[0].shape[0])

  # -- fitting ----------------------------------------------------------------------
  @classmethod
  def fit(cls, store, *, metric: str = "val_accuracy", mode: str = "max",
          space: Space | None = None, features: Sequence[str] | None = None, seed: int = 0,
          hidden: Sequence[int] = (64, 64), ensemble: int = 5, steps: int = 2000,
          batch_size: int = 256, learning_rate: float = 3e-3, weight_decay: float = 1e-4,
          feature_noise: float = 0.5, bootstrap: bool = True) -> "Predictor":
    """Fits the ensemble on the runs of ``store`` (a RunStore or a list of runs).

    ``space``: inferred from the stored hyperparameters when None (every run
    must then lie in it). ``features``: names of the task meta-features to use
    (default: all stored ones; every task must have them). ``feature_noise``:
    standard deviation of Gaussian noise added to the standardized meta-features
    during training, so the prediction varies smoothly between the few tasks a
    store holds instead of memorizing each one.
    """
    start = time.perf_counter()
    check_choice("mode", mode, MODES)
    check_int("steps", steps, high=MAX_STEPS)
    check_int("ensemble", ensemble, high=MAX_ENSEMBLE)
    check_int("batch_size", batch_size)
    runs = list(store.runs()) if hasattr(store, "runs") else list(store)
    if not runs:
      raise ValueError("the store has no runs to fit the predictor on")
    present = {m for r in runs for m in (_get(r, "metrics") or {})}
    if metric not in present:
      raise ValueError(f"metric {metric!r} is in none of the {len(runs)} runs; stored metrics: "
                       f"{', '.join(sorted(present)) or 'none'}")
    hparams = [dict(_get(r, "hparams")) for r in runs]
    if space is None:
      space = Space.infer(hparams)
    elif not isinstance(space, Space):
      space = Space.from_json(space)
    enc = np.empty((len(runs), space.dim), np.float32)
    for i, (r, h) in enumerate(zip(runs, hparams)):
      try:
        enc[i] = space.encode(h)
      except ValueError as e:
        raise ValueError(f"run {_get(r, 'id') if _has(r, 'id') else i} of task "
                         f"{_get(r, 'task')!r}: {e}") from None

    # A task is a task id with its meta-features: runs of one id with different
    # features (e.g. two model families on one dataset) are different tasks.
    tasks, task_features = [], {}
    for r in runs:
      f = dict(_get(r, "task_features") or {})
      t = str(_get(r, "task"))
      key = t if task_features.get(t, f) == f else f"{t} {json.dumps(f, sort_keys=True)}"
      task_features.setdefault(key, f)
      tasks.append(key)
    task_ids = sorted(set(tasks))
    spec = _feature_columns({t: task_features[t] for t in task_ids}, features)
    fvec = {t: _feature_vector(spec, task_features[t], f"task {t!r}") for t in task_ids}

    # Per-task quantile targets; non-completed or metric-less runs rank last.
    sign = 1.0 if mode == "max" else -1.0
    raw = np.array([float((_get(r, "metrics") or {}).get(metric, np.nan)) for r in runs])
    completed = np.array([(_get(r, "status") or "completed") == "completed" for r in runs])
    ok = np.isfinite(raw) & completed
    if not ok.any():
      raise ValueError(f"none of the {len(runs)} runs completed with a finite {metric!r} "
                       f"({int((~completed).sum())} did not complete, "
                       f"{int((~np.isfinite(raw)).sum())} have no finite value): nothing to fit")
    target = np.empty(len(runs), np.float32)
    position = {t: j for j, t in enumerate(task_ids)}
    task_index = np.array([position[t] for t in tasks])
    for j in range(len(task_ids)):
      idx = np.flatnonzero(task_index == j)
      target[idx] = task_quantiles(sign * np.nan_to_num(raw[idx]), ok[idx])
    x = np.concatenate([np.stack([fvec[t] for t in tasks]), 2 * enc - 1], axis=1)

    # Anchors: the best stored configurations, always among suggest()'s candidates.
    good = np.flatnonzero(ok & (target >= np.quantile(target, 0.9)))
    anchors = enc[good[np.argsort(-target[good])][:256]]

    init_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
    tw = np.ones((ensemble, len(task_ids)), np.float32)
    if bootstrap and len(task_ids) > 1:
      # Poisson(1) task weights (seeded numpy: jax.random.poisson compiles slowly);
      # member 0 sees every task once.
      tw[1:] = np.random.default_rng(seed).poisson(1.0, (ensemble - 1, len(task_ids)))
    weights = jnp.asarray(tw[:, task_index])
    net = _Net(tuple(hidden))
    params = _init(net, jax.random.split(init_key, ensemble), x.shape[1])
    # Pad the rows to a power of two (never sampled) so fits on stores of similar
    # size, such as the folds of a cross-validation, share one compiled program.
    n = len(runs)
    pad = max(64, 1 << (n - 1).bit_length()) - n
    x = np.concatenate([x, np.zeros((pad, x.shape[1]), x.dtype)])
    target = np.concatenate([target, np.zeros(pad, target.dtype)])
    weights = jnp.concatenate([weights, jnp.zeros((ensemble, pad), weights.dtype)], axis=1)
    params, losses = _train(net, params, jnp.asarray(x, jnp.float32), jnp.asarray(target),
                            weights, train_key, jnp.int32(n),
                            jnp.float32(feature_noise) * (jnp.arange(x.shape[1]) < len(spec.columns)),
                            steps=steps,
                            batch_size=min(batch_size, n), learning_rate=float(learning_rate),
                            weight_decay=float(weight_decay))
    params = jax.tree.map(np.asarray, params)
    info = dict(runs=len(runs), tasks=len(task_ids), failed=int((~ok).sum()), steps=steps,
                ensemble=ensemble, seed=seed, final_loss=float(np.mean(np.asarray(losses)[-50:])),
                fit_seconds=time.perf_counter() - start)
    return cls(params=params, space=space, features=spec, metric=metric, mode=mode,
               hidden=hidden, anchors=anchors, info=info)

  # -- prediction ---------------------------------------------------------------------
  def feature_vector(self, task_features: Mapping[str, Any]) -> np.ndarray:
    """The standardized network input for a task's meta-features (no range check)."""
    return _feature_vector(self.features, task_features)

  def extrapolation(self, task_features: Mapping[str, Any]) -> float:
    """How far the task lies outside the tasks the predictor was fitted on: 0 inside
    their range, above 1 where :meth:`suggest` needs ``extrapolate=True`` (see the
    module docstring)."""
    columns = _column_values(self.features, task_features, "the task")
    return _extrapolation(self.features, task_features, columns, "the task")[0]

  def _task_input(self, task_features: Mapping[str, Any], extrapolate: bool
                  ) -> tuple[np.ndarray, float]:
    """The network input and the extrapolation distance of a task the predictor may
    answer for; ValueError for impossible values and, unless ``extrapolate``, for a
    task far outside the fitted range."""
    task = "the task"
    _check_domains(task_features, self.features.names, task)
    columns = _column_values(self.features, task_features, task)
    distance, reason = _extrapolation(self.features, task_features, columns, task)
    if distance > 1.0 and not extrapolate:
      raise ValueError(f"{reason}; the prediction would be a guess: pass extrapolate=True "
                       "(metaopt hparams suggest --extrapolate) to get it anyway, with an "
                       "uncertainty inflated accordingly")
    return _standardize(self.features, columns), distance

  def predict(self, task_features: Mapping[str, Any],
              hparams: Sequence[Mapping[str, Any]] | Mapping[str, Any], *,
              extrapolate: bool = False) -> dict:
    """Ensemble mean and standard deviation of the predicted quantile of each
    configuration on the task: ``{"predicted": [n], "uncertainty": [n]}``.
    A task far outside the fitted range is refused unless ``extrapolate``; outside
    it the uncertainty is inflated (see the module docstring)."""
    if isinstance(hparams, Mapping):
      hparams = [hparams]
    f, distance = self._task_input(task_features, extrapolate)
    u = np.stack([self.space.encode(h) for h in hparams]).astype(np.float32)
    mean, std = _score(self._net, self.params, jnp.asarray(f), jnp.asarray(u))
    return {"predicted": np.asarray(mean), "uncertainty": _inflate(np.asarray(std), distance)}

  def suggest(self, task_features: Mapping[str, Any], k: int = 1, *, candidates: int = 4096,
              refine: int = 3, min_distance: float = 0.1, risk: float = 1.0,
              seed: int = 0, extrapolate: bool = False) -> list[dict]:
    """The ``k`` configurations of the space with the best predicted outcome.

    Scores ``candidates`` random points of the space plus the best stored
    configurations, then refines each of the best 64 by ``refine`` rounds of
    local search (shrinking Gaussian moves). Returned
    configurations are ranked by ``predicted - risk * uncertainty`` (a lower
    confidence bound: where the ensemble disagrees, the prediction is an
    extrapolation), distinct and, best first, at
    least ``min_distance`` apart in the encoded space (Euclidean) when the space
    allows, best first, each ``{"hparams", "predicted", "uncertainty"}``.

    A task far outside the range of the tasks the predictor was fitted on is
    refused unless ``extrapolate``; outside that range the reported uncertainty
    is inflated (the same for every configuration, so the ranking uses the
    ensemble's own spread). ``k`` is at most 1000, ``candidates`` 100,000.
    """
    check_int("k", k, high=MAX_K)
    check_int("candidates", candidates, high=MAX_CANDIDATES)
    check_int("refine", refine, low=0, high=MAX_REFINE)
    min_distance = check_number("min_distance", min_distance, low=0)
    risk = check_number("risk", risk)
    f, distance = self._task_input(task_features, extrapolate)
    u, mean, std = _search(self._net, self.params, self.space, f, self.anchors,
                           np.random.default_rng(seed), candidates=candidates,
                           refine=refine, top=max(64, 4 * k), risk=risk)
    u, mean, std = np.asarray(u, np.float64), np.asarray(mean), np.asarray(std)
    order = np.argsort(-(mean - risk * std), kind="stable")[:max(512, 8 * k)]
    # Sets and one array of the chosen points: k up to 1000 stays fast.
    chosen, taken, configs = [], set(), set()
    picked = np.empty((k, u.shape[1]))
    for radius in (min_distance, 0.0):
      for i in order:
        n = len(chosen)
        if n == k:
          break
        if i in taken or (n and np.min(np.linalg.norm(picked[:n] - u[i], axis=1)) < radius):
          continue
        config = tuple(sorted(self.space.decode(u[i]).items()))
        if config not in configs:
          picked[n] = u[i]
          chosen.append(i)
          taken.add(i)
          configs.add(config)
    inflated = _inflate(std, distance)
    return [{"hparams": self.space.decode(u[i]), "predicted": float(mean[i]),
             "uncertainty": float(inflated[i])} for i in chosen]

  # -- persistence --------------------------------------------------------------------
  def save(self, path) -> pathlib.Path:
    """Writes ``path/predictor.json`` (space, features, settings) and
    ``path/predictor.msgpack`` (weights); returns ``path``."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = dict(format="metaopt.hparams.Predictor", version=FORMAT_VERSION, metric=self.metric,
                mode=self.mode, hidden=list(self.hidden), space=self.space.to_json(),
                features=dict(names=list(self.features.names), columns=list(self.features.columns),
                              sources=list(self.features.sources),
                              levels=list(self.features.levels), log=list(self.features.log),
                              low=[float(v) for v in self.features.low],
                              high=[float(v) for v in self.features.high]),
                info=self.info)
    state = dict(params=self.params, feature_mean=np.asarray(self.features.mean),
                 feature_std=np.asarray(self.features.std), anchors=self.anchors)
    (path / _WEIGHTS_NAME).write_bytes(flax.serialization.msgpack_serialize(
        jax.tree.map(np.asarray, flax.serialization.to_state_dict(state))))
    (path / _JSON_NAME).write_text(json.dumps(meta, indent=1) + "\n")
    return path

  @classmethod
  def load(cls, path) -> "Predictor":
    """The predictor written by :meth:`save` to ``path``."""
    path = pathlib.Path(path)
    if not (path / _JSON_NAME).is_file() or not (path / _WEIGHTS_NAME).is_file():
      raise FileNotFoundError(f"no saved predictor at {str(path)!r} (expected {_JSON_NAME} and "
                              f"{_WEIGHTS_NAME} in that folder)")
    try:
      meta = json.loads((path / _JSON_NAME).read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"{path / _JSON_NAME} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != "metaopt.hparams.Predictor":
      raise ValueError(f"{path / _JSON_NAME} is not a saved metaopt predictor")
    if meta.get("version") != FORMAT_VERSION:
      raise ValueError(f"{path} holds predictor format version {meta.get('version')!r}; this "
                       f"metaopt reads version {FORMAT_VERSION} (refit: metaopt hparams fit)")
    try:
      state = flax.serialization.msgpack_restore((path / _WEIGHTS_NAME).read_bytes())
    except Exception as e:  # msgpack raises several types on corrupt input
      raise ValueError(f"{path / _WEIGHTS_NAME} is not a readable predictor weights file "
                       f"({type(e).__name__})") from None
    json_file, weights_file = path / _JSON_NAME, path / _WEIGHTS_NAME
    meta_at = lambda key: _lookup(meta, key, json_file)
    state_at = lambda key: _lookup(state, key, weights_file)
    columns = tuple(meta_at("features.columns"))
    arrays = {}
    for key, source, value in (
        ("feature_mean", weights_file, state_at("feature_mean")),
        ("feature_std", weights_file, state_at("feature_std")),
        ("features.low", json_file, meta_at("features.low")),
        ("features.high", json_file, meta_at("features.high"))):
      arrays[key] = np.asarray(value, np.float64).reshape(-1)
      if arrays[key].shape != (len(columns),):
        raise ValueError(f"{source}: {key!r} has {arrays[key].size} values for "
                         f"{len(columns)} feature columns")
    spec = FeatureSpec(tuple(meta_at("features.names")), columns,
                       tuple(meta_at("features.sources")), tuple(meta_at("features.levels")),
                       tuple(meta_at("features.log")), arrays["feature_mean"],
                       arrays["feature_std"], arrays["features.low"], arrays["features.high"])
    return cls(params=state_at("params"), space=Space.from_json(meta_at("space")),
               features=spec, metric=meta_at("metric"), mode=meta_at("mode"),
               hidden=meta_at("hidden"), anchors=np.asarray(state_at("anchors")),
               info=meta.get("info"))


def _inflate(std: np.ndarray, distance: float) -> np.ndarray:
  """The ensemble's spread moved towards UNKNOWN_STD by ``distance / (1 + distance)``."""
  if distance <= 0:
    return std
  weight = 1.0 if math.isinf(distance) else distance / (1.0 + distance)
  return np.maximum(std, std + (UNKNOWN_STD - std) * weight)


def _lookup(tree, path: str, source) -> Any:
  """``tree[a][b]`` for ``path`` "a.b"; ValueError naming the key ``source`` lacks."""
  for key in path.split("."):
    if not isinstance(tree, Mapping) or key not in tree:
      raise ValueError(f"{source} lacks the key {path!r}; it is not a complete saved predictor "
                       "(save it again, or refit)")
    tree = tree[key]
  return tree


def _has(run, name) -> bool:
  return name in run if isinstance(run, Mapping) else hasattr(run, name)


@functools.partial(jax.jit, static_argnames=("net", "dim"))
def _init(net, keys, dim):
  return jax.vmap(lambda k: net.init(k, jnp.zeros((1, dim)))["params"])(keys)


@functools.partial(jax.jit, static_argnames=("net", "steps", "batch_size", "learning_rate",
                                             "weight_decay"))
def _train(net, params, x, y, weights, key, n, noise, *, steps, batch_size, learning_rate,
           weight_decay):
  """All ensemble members trained together: weighted MSE on minibatches sampled from
  the first ``n`` rows (the rest is padding), inputs perturbed by Gaussian noise of
  per-column scale ``noise``, AdamW."""
  tx = optax.adamw(optax.cosine_decay_schedule(learning_rate, steps, alpha=0.05),
                   weight_decay=weight_decay)

  def member_loss(p, idx, w, k):
    xi = x[idx] + noise * jax.random.normal(k, (idx.shape[0], x.shape[1]))
    pred = net.apply({"params": p}, xi)
    wi = w[idx]
    return jnp.sum(wi * (pred - y[idx]) ** 2) / jnp.maximum(jnp.sum(wi), 1.0)

  def step(_, state, __):
    params, opt_state, step_key = state
    step_key, sub, noise_key = jax.random.split(step_key, 3)
    idx = jax.random.randint(sub, (params_count, batch_size), 0, n)  # n is traced
    loss, grads = jax.vmap(jax.value_and_grad(member_loss))(
        params, idx, weights, jax.random.split(noise_key, params_count))
    updates, opt_state = tx.update(grads, opt_state, params)  # elementwise: no vmap needed
    return (optax.apply_updates(params, updates), opt_state, step_key), {"loss": loss.mean()}

  params_count = weights.shape[0]
  state = (params, tx.init(params), key)
  (params, _, _), metrics = unroll(step, None, state, None, length=steps)
  return params, metrics["loss"]


def _members(net, params, x):
  """[members, n] predictions of every ensemble member for inputs ``x`` [n, d]."""
  return jax.vmap(lambda p: net.apply({"params": p}, x))(params)


@functools.partial(jax.jit, static_argnames=("net",))
def _score(net, params, f, u):
  x = jnp.concatenate([jnp.broadcast_to(f, (u.shape[0], f.shape[0])), 2 * u - 1], axis=1)
  preds = _members(net, params, x)
  return preds.mean(axis=0), preds.std(axis=0)


def _score_padded(net, params, f: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """:func:`_score` of many points, padded to a power of two rows so that a few
  compiled programs serve every call."""
  n = u.shape[0]
  rows = max(64, 1 << (n - 1).bit_length())
  padded = np.zeros((rows, u.shape[1]), np.float32)
  padded[:n] = u
  mean, std = _score(net, params, jnp.asarray(f), jnp.asarray(padded))
  return np.asarray(mean)[:n], np.asarray(std)[:n]


def _search(net, params, space: Space, f: np.ndarray, anchors: np.ndarray, rng, *,
            candidates: int, refine: int, top: int, risk: float):
  """Every scored point as (u, mean, std): the ``top`` refined ones first, then the
  random candidates and anchors."""
  d = space.dim
  per_point = 8
  score = lambda u: _score_padded(net, params, f, u)

  u0 = space.snap(np.concatenate([rng.random((candidates, d)), anchors]))
  mean0, std0 = score(u0)
  m = min(top, u0.shape[0])
  i = np.argsort(-(mean0 - risk * std0), kind="stable")[:m]
  u, mean, std = u0[i], mean0[i], std0[i]
  # Local search from each of the best m points separately (keeps them diverse):
  # each round tries per_point Gaussian moves and keeps the best, sigma halving.
  rows = np.arange(m)
  for r in range(refine):
    v = space.snap(u[:, None, :] + (0.1 / 2.0 ** r) * rng.standard_normal((m, per_point, d)))
    vm, vs = score(v.reshape(-1, d))
    vm, vs = vm.reshape(m, per_point), vs.reshape(m, per_point)
    j = np.argmax(vm - risk * vs, axis=1)
    better = vm[rows, j] - risk * vs[rows, j] > mean - risk * std
    u = np.where(better[:, None], v[rows, j], u)
    mean = np.where(better, vm[rows, j], mean)
    std = np.where(better, vs[rows, j], std)
  return (np.concatenate([u, u0]), np.concatenate([mean, mean0]), np.concatenate([std, std0]))
