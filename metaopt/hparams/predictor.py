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

from metaopt.hparams.space import Space
from metaopt.hparams.store import MODES
from metaopt.unroll import unroll
from metaopt.validation import check_choice, check_int, is_number

FORMAT_VERSION = 1
FEATURE_CLIP = 3.0   # standardized meta-features are clipped to [-3, 3]
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
  return FeatureSpec(names, tuple(columns), tuple(sources), tuple(levels), tuple(logs), mean, std)


def _feature_vector(spec: FeatureSpec, features: Mapping[str, Any], task: str = "the task") -> np.ndarray:
  """Standardized input columns of one task's features; ValueError naming missing ones."""
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
      v = math.log10(v)
    out[i] = v
  # Clipped: a task far outside the stored ones gets the prediction of the
  # nearest edge instead of an extrapolation.
  return np.clip((out - spec.mean) / spec.std, -FEATURE_CLIP, FEATURE_CLIP).astype(np.float32)


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
    for label, v in (("ensemble", ensemble), ("steps", steps), ("batch_size", batch_size)):
      check_int(label, v)
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
    ok = np.isfinite(raw) & np.array([(_get(r, "status") or "completed") == "completed"
                                      for r in runs])
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
    """The standardized network input for a task's meta-features."""
    return _feature_vector(self.features, task_features)

  def predict(self, task_features: Mapping[str, Any],
              hparams: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> dict:
    """Ensemble mean and standard deviation of the predicted quantile of each
    configuration on the task: ``{"predicted": [n], "uncertainty": [n]}``."""
    if isinstance(hparams, Mapping):
      hparams = [hparams]
    f = self.feature_vector(task_features)
    u = np.stack([self.space.encode(h) for h in hparams]).astype(np.float32)
    mean, std = _score(self._net, self.params, jnp.asarray(f), jnp.asarray(u))
    return {"predicted": np.asarray(mean), "uncertainty": np.asarray(std)}

  def suggest(self, task_features: Mapping[str, Any], k: int = 1, *, candidates: int = 4096,
              refine: int = 3, min_distance: float = 0.1, risk: float = 1.0,
              seed: int = 0) -> list[dict]:
    """The ``k`` configurations of the space with the best predicted outcome.

    Scores ``candidates`` random points of the space plus the best stored
    configurations, then refines each of the best 64 by ``refine`` rounds of
    local search (shrinking Gaussian moves). Returned
    configurations are ranked by ``predicted - risk * uncertainty`` (a lower
    confidence bound: where the ensemble disagrees, the prediction is an
    extrapolation), distinct and, best first, at
    least ``min_distance`` apart in the encoded space (Euclidean) when the space
    allows, best first, each ``{"hparams", "predicted", "uncertainty"}``.
    """
    check_int("k", k)
    check_int("candidates", candidates)
    f = self.feature_vector(task_features)
    u, mean, std = _search(self._net, self.params, self.space, f, self.anchors,
                           np.random.default_rng(seed), candidates=candidates,
                           refine=refine, top=max(64, 4 * k), risk=float(risk))
    u, mean, std = np.asarray(u, np.float64), np.asarray(mean), np.asarray(std)
    order = np.argsort(-(mean - risk * std), kind="stable")[:max(512, 8 * k)]
    chosen, configs = [], []
    for radius in (min_distance, 0.0):
      for i in order:
        if len(chosen) == k:
          break
        if i in chosen or any(np.linalg.norm(u[i] - u[j]) < radius for j in chosen):
          continue
        h = self.space.decode(u[i])
        if h not in configs:
          chosen.append(i)
          configs.append(h)
    out = []
    for i in chosen:
      out.append({"hparams": self.space.decode(u[i]), "predicted": float(mean[i]),
                  "uncertainty": float(std[i])})
    return out

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
                              levels=list(self.features.levels), log=list(self.features.log)),
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
                       f"metaopt reads version {FORMAT_VERSION}")
    try:
      state = flax.serialization.msgpack_restore((path / _WEIGHTS_NAME).read_bytes())
    except Exception as e:  # msgpack raises several types on corrupt input
      raise ValueError(f"{path / _WEIGHTS_NAME} is not a readable predictor weights file "
                       f"({type(e).__name__})") from None
    f = meta["features"]
    spec = FeatureSpec(tuple(f["names"]), tuple(f["columns"]), tuple(f["sources"]),
                       tuple(f["levels"]), tuple(f["log"]),
                       np.asarray(state["feature_mean"]), np.asarray(state["feature_std"]))
    return cls(params=state["params"], space=Space.from_json(meta["space"]), features=spec,
               metric=meta["metric"], mode=meta["mode"], hidden=meta["hidden"],
               anchors=np.asarray(state["anchors"]), info=meta.get("info"))


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
