"""What every experiment shares: its result, how methods are picked on validation,
evaluation seeds, and the per-method curve plots."""

from __future__ import annotations

import dataclasses
import pathlib
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from metaopt import report
from metaopt.hparams import record_runs
from metaopt.train import TrainResult, train_grid


@dataclasses.dataclass(frozen=True)
class Result:
  """What ``run`` returns: the report's path, the content of ``results.json``, and the
  measured results in a few lines for the terminal."""
  report: pathlib.Path
  data: dict
  lines: tuple[str, ...] = ()

  def summary_lines(self) -> list[str]:
    return list(self.lines)


CURVE_COLUMNS = ("task", "method", "metric", "step", "value", "std", "runs")


def finish(out, report_text: str, data: dict, lines: Sequence[str],
           curves: Sequence[Mapping[str, Any]] = ()) -> Result:
  """Writes ``report.md``, ``results.json`` and the curves (``curves.csv``, one row per
  task, method, metric and step; TensorBoard event files under ``tensorboard/`` when
  tensorboardX is installed) into ``out``; returns the :class:`Result`."""
  out = pathlib.Path(out)
  (out / "report.md").write_text(report_text)
  report.write_json(out / "results.json", data)
  report.write_csv(out / "curves.csv", curves, CURVE_COLUMNS)
  with report.ScalarLog(out / "tensorboard") as log:
    for row in curves:
      log.add(f"{row['task']}/{row['method']}/{row['metric']}", row["value"], row["step"])
  return Result(out / "report.md", data, tuple(lines))


PER_STEP = ("learning_rate", "train_loss")
PER_EVAL = ("val_loss", "val_accuracy", "test_loss", "test_accuracy")


def curve_rows(task: str, method: str, curves: TrainResult) -> list[dict]:
  """``curves.csv`` rows of one method's training runs (leading axis: seeds): the mean
  and spread over seeds of the per-step LR and training loss, and of every evaluation."""
  rows = []
  for metric in PER_STEP + PER_EVAL:
    values = np.asarray(getattr(curves, metric), np.float64)
    steps = (np.arange(1, values.shape[-1] + 1) if metric in PER_STEP
             else np.asarray(curves.eval_steps)[0])
    with warnings.catch_warnings():  # a step where every seed is NaN (stopped early)
      warnings.simplefilter("ignore", RuntimeWarning)
      mean, std = np.nanmean(values, axis=0), np.nanstd(values, axis=0)
    rows += [{"task": task, "method": method, "metric": metric, "step": int(t), "value": m,
              "std": d, "runs": values.shape[0]} for t, m, d in zip(steps, mean, std)]
  return rows


def train_and_record(task, make_tx, hparams, keys, *, store, run_info: dict,
                     **train_kw) -> tuple[TrainResult, float]:
  """:func:`metaopt.train_grid`, and every run recorded into ``store`` (a RunStore or a
  path; None: not recorded) with ``run_info`` among its hyperparameters."""
  result, wall = train_grid(task, make_tx, hparams, keys, **train_kw)
  if store is not None:
    record_runs(store, task, hparams, result, wall, keys=keys, run_info=run_info)
  return result, wall


def best_index(val_accuracy: np.ndarray, val_loss: np.ndarray) -> int:
  """Index of the highest validation accuracy, ties broken by lower loss; NaN loses."""
  acc = np.nan_to_num(val_accuracy, nan=-np.inf)
  loss = np.nan_to_num(val_loss, nan=np.inf)
  return int(np.lexsort((loss, -acc))[0])


def seed_keys(seeds: int, offset: int) -> jax.Array:
  """``seeds`` evaluation keys, ``PRNGKey(offset * 1000 + i)`` (Python ints: no int32
  overflow for large offsets; jax keys take them modulo 2**32)."""
  return jnp.stack([jax.random.PRNGKey(offset * 1000 + i) for i in range(seeds)])


def plot_method_curves(path, tasks: Mapping[str, Mapping[str, Any]], labels: Mapping[str, str],
                       curve: Callable[[Any], tuple], **plot_kw) -> None:
  """One panel per task, one line per method: ``curve(curves) -> (x, y)``, methods in the
  order of ``labels``."""
  panels = {task: {labels[m]: curve(methods[m]) for m in labels if m in methods}
            for task, methods in tasks.items()}
  report.plot_panels(path, panels, **plot_kw)


def lr_curve(curves) -> tuple:
  """Mean applied LR over seeds, per step (``TrainResult.learning_rate`` [seeds, steps])."""
  return np.arange(1, curves.learning_rate.shape[1] + 1), np.nanmean(curves.learning_rate, axis=0)
