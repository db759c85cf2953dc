"""What every experiment shares: its result, how methods are picked on validation,
evaluation seeds, and the per-method curve plots."""

from __future__ import annotations

import dataclasses
import pathlib
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence

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
  """Mean applied LR over seeds, per step (``TrainResult.learning_rate`` [seeds, steps]);
  NaN for a method whose state shows no LR (DoG, Mechanic)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return (np.arange(1, curves.learning_rate.shape[1] + 1),
            np.nanmean(curves.learning_rate, axis=0))


def lr_stability(curves, log: bool = False) -> tuple[float, float]:
  """How much the applied LR moves: the mean over seeds of its variance over the steps of
  a run and of its total variation (sum of |lr_t - lr_t-1|; with ``log``, of
  |log lr_t - log lr_t-1|: scale-free, 0 for a constant LR).

  Each seed's curve (``curves.learning_rate`` [seeds, steps]) is cut at the step early
  stopping froze it (``curves.stopped_at``; not cut when None). Steps with no LR are
  dropped: NaN (not reported, or after the stop), and without ``log`` also infinite
  ones; with ``log`` an LR that reaches 0 is kept, so the total variation is +inf. Both
  are NaN when a seed has no LR left.
  """
  lrs = np.asarray(curves.learning_rate, np.float64)
  stops = (np.full(len(lrs), lrs.shape[1]) if getattr(curves, "stopped_at", None) is None
           else np.asarray(curves.stopped_at).reshape(-1))
  variances, variations = [], []
  for lr, stop in zip(lrs, stops):
    lr = lr[:max(int(stop), 1)]
    lr = lr[~np.isnan(lr)] if log else lr[np.isfinite(lr)]
    if not len(lr):
      return float("nan"), float("nan")
    variances.append(np.var(lr))
    if log:
      with np.errstate(divide="ignore", invalid="ignore"):
        lr = np.log(lr)
    with np.errstate(invalid="ignore"):  # -inf - -inf: an LR staying at 0 adds nothing
      variations.append(np.nansum(np.abs(np.diff(lr))))
  return float(np.mean(variances)), float(np.mean(variations))


# --- time to target, in the style of AlgoPerf ------------------------------------------------


def steps_to_target(eval_steps, metric, target: float, *, higher_is_better: bool = True
                    ) -> Optional[float]:
  """The first evaluated step whose metric reaches ``target`` (None if never).

  ``metric`` is one value per evaluation (e.g. the mean over seeds).
  """
  eval_steps, metric = np.asarray(eval_steps), np.asarray(metric, np.float64)
  if eval_steps.shape != metric.shape or metric.ndim != 1:
    raise ValueError(f"need one metric per evaluated step, got shapes {eval_steps.shape} and "
                     f"{metric.shape}")
  reached = metric >= target if higher_is_better else metric <= target
  hits = np.flatnonzero(reached & np.isfinite(metric))
  return float(eval_steps[hits[0]]) if len(hits) else None


def validation_target(workload: str, val_metric) -> float:
  """The target of a workload: the final validation metric of its reference run (the
  best-of-grid cosine); ValueError when there is none to compute it from."""
  values = np.asarray(val_metric, np.float64).reshape(-1)
  if values.size == 0 or not np.isfinite(values[-1]):
    raise ValueError(f"workload {workload!r} has no finite validation metric to set a target "
                     "from (it needs a validation split and a reference run that finished)")
  return float(values[-1])


def performance_profile(costs: Mapping[str, Mapping[str, Optional[float]]],
                        taus: Sequence[float]) -> dict[str, np.ndarray]:
  """For each method, the fraction of workloads on which it reaches the target within
  ``tau`` times the cheapest method's cost, for every ``tau``.

  ``costs[method][workload]``: the cost (steps) to reach the workload's target, None
  when never reached. A workload no method reaches counts against every method.
  """
  taus = np.asarray(taus, np.float64)
  if taus.size == 0 or not np.all(np.isfinite(taus)) or np.any(taus < 1):
    raise ValueError(f"taus must be a non-empty range of finite values >= 1, got "
                     f"{taus.tolist()}")
  workloads = sorted({w for per in costs.values() for w in per})
  if not workloads:
    raise ValueError("performance_profile needs at least one workload")
  cost = np.array([[np.inf if costs[m].get(w) is None else float(costs[m][w])
                    for w in workloads] for m in costs])
  best = cost.min(axis=0)
  with np.errstate(invalid="ignore", divide="ignore"):
    ratio = np.where(np.isfinite(best), cost / best, np.inf)
  return {m: (ratio[i][None, :] <= taus[:, None]).mean(axis=1) for i, m in enumerate(costs)}


def profile_score(profile: np.ndarray, taus: Sequence[float]) -> float:
  """AlgoPerf's single number: the area under a performance profile over log(tau),
  normalized to [0, 1] (1: the fastest method on every workload)."""
  taus = np.log(np.asarray(taus, np.float64))
  if taus.size < 2 or taus[-1] <= taus[0]:
    raise ValueError("profile_score needs an increasing range of at least two taus")
  profile = np.asarray(profile, np.float64)
  return float(np.sum((profile[1:] + profile[:-1]) / 2 * np.diff(taus)) / (taus[-1] - taus[0]))


TAUS = np.exp(np.linspace(0.0, np.log(4.0), 61))  # AlgoPerf's range: 1 to 4 times the fastest


TTT_COLUMNS = ("task", "method", "target", "steps to target", "cost (steps, grid charged)",
               "time to target s")


def time_to_target(results: Mapping[str, Mapping[str, Mapping[str, Any]]], reference: str,
                   labels: Mapping[str, str], out=None) -> tuple[list[dict], dict]:
  """Steps and wall time each method needs to reach each workload's validation target.

  ``results[task][method]`` holds ``curves`` (a TrainResult over seeds), ``wall_time``
  (of all its runs), ``runs`` (how many) and ``grid`` (configurations tried to pick it:
  1 for a method used as it is). The target is the final mean validation accuracy of
  ``reference`` (the best-of-grid cosine). A tuned method is charged its whole grid:
  its own steps to the target plus ``grid - 1`` full runs. Returns the table rows and
  ``{"profile": {method: [fractions]}, "score": {method: s}, "taus": [...]}``; with
  ``out``, also plots ``profile.png``.
  """
  rows, costs = [], {m: {} for m in labels}
  for task, methods in results.items():
    ref = methods[reference]["curves"]
    target = validation_target(task, np.nanmean(ref.val_accuracy, axis=0))
    for m in labels:
      if m not in methods:
        continue
      r = methods[m]
      c = r["curves"]
      total = c.learning_rate.shape[-1]
      steps = steps_to_target(c.eval_steps[0], np.nanmean(c.val_accuracy, axis=0), target)
      cost = None if steps is None else steps + (r.get("grid", 1) - 1) * total
      per_step = r["wall_time"] / (r["runs"] * total)
      costs[m][task] = cost
      rows.append({"task": task, "method": labels[m], "target": target,
                   "steps to target": steps, "cost (steps, grid charged)": cost,
                   "time to target s": None if cost is None else cost * per_step})
  profile = performance_profile(costs, TAUS)
  scores = {m: profile_score(p, TAUS) for m, p in profile.items()}
  if out is not None:
    report.plot_panels(pathlib.Path(out) / "profile.png",
                       {"performance profile (AlgoPerf style)":
                        {f"{labels[m]} ({scores[m]:.2f})": (TAUS, p) for m, p in profile.items()}},
                       xlabel="tau: cost / cheapest method's cost",
                       ylabel="fraction of workloads at target")
  return rows, {"taus": TAUS, "profile": profile, "score": scores, "costs": costs}
