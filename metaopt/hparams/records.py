"""Training results as run-store rows: what a grid of runs writes into a :class:`RunStore`."""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from metaopt.hparams import features
from metaopt.hparams.store import RunStore
from metaopt.train import TrainResult, run_status, steps_per_epoch

PyTree = Any


def model_record(task) -> dict:
  """The ``model`` column of a task's runs: family, width, depth and parameter count."""
  cfg = task.config
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
      jax.eval_shape(task.init, jax.random.PRNGKey(0))))
  return {"family": cfg.model, "width": cfg.width, "depth": cfg.depth, "n_params": n_params}


def _hparam_rows(hparams: PyTree, n: int) -> tuple[list[dict], list[dict]]:
  """Per-run (scalar, array) hyperparameter dicts from a batched pytree (dict keys name them)."""
  flat = jax.tree_util.tree_flatten_with_path(hparams)[0]
  scalars, arrays = [{} for _ in range(n)], [{} for _ in range(n)]
  for path, leaf in flat:
    name = ".".join(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p))))
                    for p in path) or "hparam"
    values = np.asarray(leaf).reshape(n, -1)
    for s, a, v in zip(scalars, arrays, values):
      if v.size == 1:  # shortest decimal of the stored precision: 1e-3, not 0.0010000000474974513
        s[name] = float(str(v[0])) if np.issubdtype(v.dtype, np.floating) else v[0].item()
      else:
        a[name] = v.tolist()
  return scalars, arrays


def result_rows(task, hparams: PyTree, result: TrainResult, wall_time: float, *,
                task_features: Optional[dict] = None, run_info: Optional[dict] = None,
                run_keys: Optional[list] = None, keys: Any = None,
                model: Optional[dict] = None) -> list[dict]:
  """RunStore rows (dicts of ``RunStore.add`` arguments) for a grid trained by train_grid.

  Hyperparameters: the task's ``batch_size`` and ``layers`` (its depth), the
  ``hparams`` row (a dict's keys, else ``hparam``) and ``run_info``. Metrics:
  final val/test loss and accuracy, best val accuracy, last-chunk train loss.
  Curves: the same per evaluation. Features: ``task_features`` or the task's
  meta-features from metaopt.hparams.features. Wall time: an equal share.
  """
  n = int(np.asarray(result.val_loss).shape[0])
  cfg = task.config
  steps = int(np.asarray(result.train_loss).shape[-1])
  evals = np.asarray(result.eval_steps).reshape(n, -1)[0]
  every = int(evals[1] - evals[0]) if len(evals) > 1 else steps
  if task_features is None:
    task_features = features.task_features(task.data, model_family=cfg.model,
                                           epochs=steps / steps_per_epoch(task))
  if model is None:
    model = model_record(task)
  status = run_status(result)
  train_loss = np.asarray(result.train_loss).reshape(n, -1, every)
  with np.errstate(all="ignore"):
    chunk_loss = np.array([[np.nanmean(c) if np.isfinite(c).any() else np.nan for c in run]
                           for run in train_loss])
  key_data = None
  if keys is not None:
    k = np.asarray(jax.random.key_data(keys) if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
                   else keys)
    key_data = k.reshape(n, -1).tolist()
  rows = []
  scalars, arrays = _hparam_rows(hparams, n)
  for i, hp in enumerate(scalars):
    curves = {name: np.asarray(getattr(result, name))[i].tolist()
              for name in ("val_loss", "val_accuracy", "test_loss", "test_accuracy")}
    curves["train_loss"] = [math.nan] + chunk_loss[i].tolist()  # aligned with eval_steps
    val_acc = np.asarray(result.val_accuracy)[i]
    metrics = {name: float(values[-1]) for name, values in curves.items()}
    metrics["best_val_accuracy"] = float(np.nanmax(val_acc)) if np.isfinite(val_acc).any() \
        else math.nan
    extra = {"steps": steps, "eval_every": every, "eval_steps": evals.tolist(),
             "dataset_seed": cfg.seed}
    if key_data is not None:
      extra["key"] = key_data[i]
    if arrays[i]:
      extra["array_hparams"] = arrays[i]
    rows.append(dict(
        task=cfg.dataset, task_features=task_features,
        hparams={"batch_size": cfg.batch_size, "layers": cfg.depth, **hp, **(run_info or {})},
        metrics=metrics, curves=curves, model=model, status=str(status[i]),
        wall_time=wall_time / n, run_key=None if run_keys is None else run_keys[i],
        extra=extra))
  return rows


def record_runs(store: Any, task, hparams: PyTree, result: TrainResult, wall_time: float,
                **kw) -> list[int]:
  """Add :func:`result_rows` to ``store`` (a RunStore, or a path opened and closed here)."""
  rows = result_rows(task, hparams, result, wall_time, **kw)
  if isinstance(store, RunStore):
    return store.add_many(rows)
  with RunStore(store) as opened:
    return opened.add_many(rows)
