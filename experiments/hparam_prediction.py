"""`metaopt run hparam-prediction`: predicted hyperparameters against search, leave one dataset out.

1. A sweep (:func:`metaopt.hparams.sweep.sweep`) fills a run store with random
   configurations of the search space on every (dataset, model) task; a rerun
   resumes it.
2. For each held-out dataset, a :class:`~metaopt.hparams.Predictor` is fitted
   on the other datasets' runs only and suggests configurations for the
   held-out task from its meta-features. Its top-1 and top-3 are trained for
   real, and so are random search, classic TPE and TPE warm-started with the
   top-3 (``enqueue_trial``), for ``max(budgets)`` trials and several seeds. All
   trials train with the sweep's protocol (:class:`~metaopt.hparams.search.TrainingObjective`).

Measures (``score`` = the metric, negated when lower is better; runs that did
not complete score worst):

- normalized regret of a method after t trials: ``(best - found) / (best - median)``,
  where ``best`` is the best known score on the held-out task (its stored
  sweep runs and every trial of every method) and ``median`` the median score
  of its stored random configurations: 0 is the best known configuration, 1
  a typical random one;
- trials to come within 1% of the best: the first t with ``found >= best - 0.01 * |best|``;
- compute saved: trials (and their training seconds) random search and TPE
  need to match the top-1 prediction's score, minus the one run it costs;
- distance between the predicted top-1 and the best known configuration in the
  encoded space ([0, 1] per parameter, log scale for the LR; Euclidean).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from metaopt import config as config_lib
from metaopt import report
from metaopt.experiments.protocol import Result, finish
from metaopt.hparams import DEFAULT_SPACE, Predictor, RunStore, Space
from metaopt.hparams.search import (CachedObjective, Outcome, best_so_far, predicted_search,
                                    random_search, score, tpe_search)
from metaopt.hparams.store import MODES
from metaopt.hparams.sweep import TrainingObjective, sweep
from metaopt.tasks.data import DATASETS
from metaopt.tasks.models import MODEL_KINDS
from metaopt.validation import check_choice, check_int, check_seed

METHODS = ("predicted", "random", "tpe", "tpe_warm")
LABELS = {"predicted": "predicted top-k", "random": "random search", "tpe": "TPE",
          "tpe_warm": "TPE warm-started"}


@dataclasses.dataclass(frozen=True)
class Config:
  datasets: tuple[str, ...] = DATASETS
  model: str = "mlp"               # family swept and evaluated
  trials_per_task: int = 50        # sweep configurations per (dataset, model)
  epochs: int = 5                  # training epochs of every run (sweep and trials)
  budgets: tuple[int, ...] = (1, 3, 10, 30)  # trials at which the methods are compared
  seeds: int = 2                   # search seeds per method and dataset
  top_k: int = 3                   # predicted configurations trained (top-1 and top-k)
  metric: str = "val_accuracy"
  mode: str = "max"
  space: Optional[tuple[dict, ...]] = None  # a Space's JSON (tuple of dicts); None: default
  predictor_steps: int = 2000
  predictor_ensemble: int = 5
  predictor_hidden: tuple[int, ...] = (64, 64)
  workers: int = 1                 # sweep processes
  seed: int = 0
  store: Optional[str] = None      # run store to sweep into (default: store.sqlite in the run)

  def __post_init__(self):
    if len(self.datasets) < 2:
      raise ValueError("leave-one-dataset-out needs at least 2 datasets, got "
                       f"{list(self.datasets)}")
    for name in self.datasets:
      check_choice("dataset", name, DATASETS)
    check_choice("model", self.model, MODEL_KINDS)
    check_choice("mode", self.mode, MODES)
    check_seed("seed", self.seed)
    for name in ("trials_per_task", "epochs", "seeds", "top_k", "predictor_steps",
                 "predictor_ensemble", "workers"):
      check_int(name, getattr(self, name))
    if not self.budgets:
      raise ValueError("budgets must hold at least one trial count")
    for b in (*self.budgets, *self.predictor_hidden):
      check_int("budgets and predictor_hidden", b)
    if self.space is not None:
      Space.from_json(list(self.space))


# Fields a rerun with --name may change: the run continues from its checkpoint.
RUN_LENGTH = ("trials_per_task",)


def default_config(seed: int = 0) -> Config:
  return Config(seed=seed)


# The quick configuration's space: the default one with two batch sizes and a fixed
# depth, so each task compiles one training program (compiles dominate tiny runs).
QUICK_SPACE = (
    {"name": "learning_rate", "type": "float", "low": 1e-5, "high": 1e-1, "log": True},
    {"name": "batch_size", "type": "categorical", "choices": [16, 32]},
    {"name": "layers", "type": "categorical", "choices": [2]},
    {"name": "dropout", "type": "float", "low": 0.1, "high": 0.5, "log": False},
)


def quick_config(seed: int = 0) -> Config:
  return Config(datasets=("iris", "wine", "breast_cancer"), trials_per_task=8, epochs=2,
                budgets=(1, 3, 10), seeds=1, predictor_steps=300, predictor_ensemble=3,
                predictor_hidden=(32, 32), space=QUICK_SPACE, seed=seed)


def space_of(config: Config) -> Space:
  return DEFAULT_SPACE if config.space is None else Space.from_json(list(config.space))


def _dataset(run) -> str:
  return run.task.split("/")[0]


def _within(found: float, best: float) -> bool:
  return found >= best - 0.01 * abs(best)


def _first_within(curve: np.ndarray, best: float) -> Optional[int]:
  hits = np.flatnonzero([_within(v, best) for v in curve])
  return int(hits[0]) + 1 if len(hits) else None


def _regret(found: np.ndarray, best: float, median: float, worst: float) -> np.ndarray:
  found = np.where(np.isfinite(found), found, worst)
  return (best - found) / max(best - median, 1e-12)


def evaluate_dataset(config: Config, dataset: str, runs: list, space: Space, *,
                     progress: bool = True) -> dict:
  """Fit on the other datasets, then every method on the held-out one."""
  mode, budget = config.mode, max(config.budgets)
  train_runs = [r for r in runs if _dataset(r) != dataset]
  held = [r for r in runs if _dataset(r) == dataset]
  if not held:
    raise ValueError(f"the store has no runs of held-out dataset {dataset!r}")
  start = time.perf_counter()
  predictor = Predictor.fit(train_runs, metric=config.metric, mode=mode, space=space,
                            seed=config.seed, steps=config.predictor_steps,
                            ensemble=config.predictor_ensemble, hidden=config.predictor_hidden)
  fit_seconds = time.perf_counter() - start
  features = held[-1].task_features
  start = time.perf_counter()
  # Leaving a dataset out is extrapolation by design: allowed, and its distance recorded.
  suggestions = predictor.suggest(features, k=config.top_k, seed=config.seed, extrapolate=True)
  suggest_seconds = time.perf_counter() - start

  objective = CachedObjective(TrainingObjective(dataset, config.model, epochs=config.epochs,
                                                seed=config.seed, metric=config.metric))
  trials = {"predicted": [predicted_search(objective, suggestions)]}
  trials["random"] = [random_search(objective, space, budget, seed=1000 * config.seed + s,
                                    mode=mode) for s in range(config.seeds)]
  trials["tpe"] = [tpe_search(objective, space, budget, seed=config.seed + s, mode=mode)
                   for s in range(config.seeds)]
  warm = [s["hparams"] for s in suggestions]
  trials["tpe_warm"] = [tpe_search(objective, space, budget, seed=config.seed + s, mode=mode,
                                   warm_start=warm) for s in range(config.seeds)]

  stored = np.array([score(_stored_outcome(r, config.metric), mode) for r in held])
  every = [(t.hparams, score(t.outcome, mode)) for ts in trials.values() for tr in ts for t in tr]
  every += [(r.hparams, s) for r, s in zip(held, stored)]
  finite = [s for _, s in every if math.isfinite(s)]
  best = max(finite)
  worst = min(finite)
  best_hparams = next(h for h, s in every if s == best)
  median = float(np.median(np.where(np.isfinite(stored), stored, worst)))

  curves, within = {}, {}
  for method, runs_ in trials.items():
    cs = [best_so_far(tr, mode) for tr in runs_]
    curves[method] = [_regret(c, best, median, worst) for c in cs]
    within[method] = [_first_within(c, best) for c in cs]
  top1 = score(trials["predicted"][0][0].outcome, mode)
  at = lambda method, b: [float(c[b - 1]) for c in curves[method] if len(c) >= b]

  # Compute saved: trials each search needs to reach the top-1 prediction's score.
  wall = np.mean([o.wall_time for o in objective.seen.values()])
  match = {}
  for method in ("random", "tpe"):
    need = [next((i + 1 for i, v in enumerate(best_so_far(tr, mode)) if v >= top1), None)
            for tr in trials[method]]
    match[method] = need
  p = space.encode(trials["predicted"][0][0].hparams)
  distance = float(np.linalg.norm(p - space.encode(best_hparams)))
  lr = {"predicted": trials["predicted"][0][0].hparams.get("learning_rate"),
        "best": best_hparams.get("learning_rate")}
  rand10 = [float(best_so_far(tr, mode)[9]) for tr in trials["random"] if len(tr) >= 10]
  return dict(
      dataset=dataset, task=held[-1].task, n_train_runs=len(train_runs), n_stored=len(held),
      fit_seconds=fit_seconds, suggest_seconds=suggest_seconds,
      compile_seconds=objective.objective.compile_time, trained=objective.calls,
      mean_trial_seconds=float(wall), suggestions=suggestions, best=best, median=median,
      best_hparams=best_hparams, top1_score=top1,
      top3_score=float(max(score(t.outcome, mode) for t in trials["predicted"][0])),
      random10_scores=rand10,
      top1_beats_random10=bool(rand10 and top1 > float(np.mean(rand10))),
      top1_ties_random10=bool(rand10 and top1 == float(np.mean(rand10))),
      regret={m: {b: at(m, b) for b in config.budgets} for m in METHODS},
      regret_curves={m: [c.tolist() for c in v] for m, v in curves.items()},
      trials_to_1pct=within, trials_to_match_top1=match, distance=distance, learning_rate=lr,
      trials={m: [[dict(hparams=t.hparams, value=t.outcome.value, status=t.outcome.status,
                        wall_time=t.outcome.wall_time, source=t.source) for t in tr] for tr in v]
              for m, v in trials.items()})


def _stored_outcome(run, metric):
  return Outcome(float(run.metrics.get(metric, math.nan)), run.status)


def _mean(xs):
  xs = [x for x in xs if x is not None and math.isfinite(x)]
  return float(np.mean(xs)) if xs else None


def summarize(config: Config, results: list[dict]) -> dict:
  n = len(results)
  wins = sum(r["top1_beats_random10"] for r in results)
  ties = sum(r.get("top1_ties_random10", False) for r in results)
  mean_regret = {m: {b: _mean([x for r in results for x in r["regret"][m][b]])
                     for b in config.budgets} for m in METHODS}
  has10 = 10 in config.budgets
  warm10 = mean_regret["tpe_warm"].get(10) if has10 else None
  plain10 = mean_regret["tpe"].get(10) if has10 else None
  return dict(
      datasets=n, top1_beats_random10=wins, top1_beats_random10_fraction=wins / max(n, 1),
      top1_ties_random10=ties,
      target1_passed=bool(has10 and wins >= 0.7 * n),
      tpe_warm_regret10=warm10, tpe_regret10=plain10,
      target2_passed=bool(has10 and warm10 is not None and plain10 is not None
                          and warm10 < plain10),
      mean_regret=mean_regret,
      mean_distance=_mean([r["distance"] for r in results]),
      fit_seconds=_mean([r["fit_seconds"] for r in results]),
      suggest_seconds=_mean([r["suggest_seconds"] for r in results]))


def report_text(config: Config, results: list[dict], summary: dict, info: dict) -> str:
  budgets = config.budgets
  lines = ["# Hyperparameter prediction: leave one dataset out", ""]
  lines += [f"Configuration: {config.model} on {len(results)} held-out datasets; sweep of "
            f"{config.trials_per_task} random configurations per dataset, {config.epochs} epochs "
            f"per run; search budgets {', '.join(map(str, budgets))}; {config.seeds} seed(s) per "
            f"search method; metric `{config.metric}` ({config.mode}). Predictor: ensemble of "
            f"{config.predictor_ensemble} MLPs {list(config.predictor_hidden)}, "
            f"{config.predictor_steps} steps, fitted on the other datasets' runs only. "
            f"This invocation took {info['wall_seconds'] / 60:.1f} min (its sweep "
            f"{info['sweep_seconds'] / 60:.1f} min; a resumed sweep skips stored runs); the "
            f"{info['runs']} stored runs hold {info.get('stored_run_seconds', 0) / 60:.1f} min "
            "of training (excluding compilation).", ""]
  lines += ["Normalized regret after t trials = (best - found) / (best - median): `best` is the "
            "best known score on the held-out task (its stored sweep runs and every trial of "
            "every method), `median` the median of its stored random configurations, so 0 is the "
            "best known configuration and 1 a typical random one. Runs that did not complete "
            "count as the worst score seen. `predicted` at t = 1 is the top-1 suggestion, at "
            "t = 3 the best of the top-3; TPE warm-started tries the top-3 first.", ""]
  t1 = "PASS" if summary["target1_passed"] else "FAIL"
  t2 = "PASS" if summary["target2_passed"] else "FAIL"
  lines += ["## Targets", "",
            "| target | measured | verdict |", "|---|---|---|",
            f"| top-1 prediction beats random search with 10 trials (its mean best over seeds) on "
            f">= 70% of held-out datasets | {summary['top1_beats_random10']} of "
            f"{summary['datasets']} ({100 * summary['top1_beats_random10_fraction']:.0f}%; "
            f"ties, which do not count: {summary['top1_ties_random10']}) | {t1} |",
            f"| TPE warm-started beats plain TPE at 10 trials on average (mean normalized regret) "
            f"| {report.fmt(summary['tpe_warm_regret10'])} vs {report.fmt(summary['tpe_regret10'])}"
            f" | {t2} |", ""]
  lines += ["## Mean normalized regret over held-out datasets and seeds", ""]
  rows = [dict({"method": LABELS[m]}, **{f"t={b}": summary["mean_regret"][m][b] for b in budgets})
          for m in METHODS]
  lines += [report.markdown_table(rows, ["method"] + [f"t={b}" for b in budgets]), "",
            "(`predicted` has no entry beyond its top-k.)", "", "![regret](regret.png)", ""]
  lines += ["## Per held-out dataset", ""]
  cols = ["dataset", "best", "median", "top-1", "top-3", "random@10", "beats",
          "TPE@10 regret", "warm@10 regret", "distance", "LR predicted", "LR best"]
  rows = []
  for r in results:
    rows.append({"dataset": r["dataset"], "best": r["best"], "median": r["median"],
                 "top-1": r["top1_score"], "top-3": r["top3_score"],
                 "random@10": _mean(r["random10_scores"]),
                 "beats": ("yes" if r["top1_beats_random10"] else
                           "tie" if r.get("top1_ties_random10") else "no"),
                 "TPE@10 regret": _mean(r["regret"]["tpe"].get(10, [])),
                 "warm@10 regret": _mean(r["regret"]["tpe_warm"].get(10, [])),
                 "distance": r["distance"], "LR predicted": r["learning_rate"]["predicted"],
                 "LR best": r["learning_rate"]["best"]})
  lines += [report.markdown_table(rows, cols), "",
            "Scores are the metric of one training run (validation split). `distance`: "
            "Euclidean distance in the encoded space between the top-1 and the best known "
            "configuration.", ""]
  lines += ["## Trials to come within 1% of the best known score", "",
            "Median over seeds; `>N` when not reached within the budget.", ""]
  rows = []
  for r in results:
    row = {"dataset": r["dataset"]}
    for m in METHODS:
      xs = r["trials_to_1pct"][m]
      limit = config.top_k if m == "predicted" else max(budgets)
      hits = [x for x in xs if x is not None]
      row[m] = (str(int(np.median(hits))) if len(hits) * 2 > len(xs) else f">{limit}")
    rows.append(row)
  lines += [report.markdown_table(rows, ["dataset"] + list(METHODS)), ""]
  lines += ["## Compute saved by the top-1 prediction", "",
            "Trials random search / TPE needed to reach the top-1 prediction's score (median "
            "over seeds; `>N` when never within the budget), and the training seconds that saves "
            "(those trials minus the prediction's single run, at the task's mean seconds per "
            "trial). The predictor's own cost is its fit on the stored runs and one `suggest` "
            "call.", ""]
  rows = []
  for r in results:
    row = {"dataset": r["dataset"], "fit s": r["fit_seconds"], "suggest s": r["suggest_seconds"],
           "s / trial": r["mean_trial_seconds"]}
    for m in ("random", "tpe"):
      xs = r["trials_to_match_top1"][m]
      hits = [x for x in xs if x is not None]
      if len(hits) * 2 > len(xs):
        k = int(np.median(hits))
        row[m] = str(k)
        row[f"{m} s saved"] = (k - 1) * r["mean_trial_seconds"]
      else:
        row[m] = f">{max(budgets)}"
        row[f"{m} s saved"] = f">{(max(budgets) - 1) * r['mean_trial_seconds']:.3g}"
    rows.append(row)
  lines += [report.markdown_table(rows, ["dataset", "random", "random s saved", "tpe",
                                         "tpe s saved", "s / trial", "fit s", "suggest s"]), ""]
  lines += ["## Predicted configurations", ""]
  for r in results:
    s = "; ".join(f"{_fmt_h(x['hparams'])} (pred {x['predicted']:.3f} ± {x['uncertainty']:.3f})"
                  for x in r["suggestions"])
    lines.append(f"- **{r['dataset']}**: {s}. Best known: {_fmt_h(r['best_hparams'])}.")
  lines.append("")
  return "\n".join(lines)


def _fmt_h(h: dict) -> str:
  return ", ".join(f"{k}={report.fmt(v, 3) if isinstance(v, float) else v}"
                   for k, v in sorted(h.items()))


def plot(config: Config, out, results: list[dict], summary: dict) -> None:
  panels = {}
  for r in results:
    lines = {}
    for m in METHODS:
      cs = r["regret_curves"][m]
      if cs:
        y = np.mean(np.asarray(cs, np.float64), axis=0)
        lines[LABELS[m]] = (np.arange(1, len(y) + 1), np.maximum(y, 1e-3))
    panels[r["dataset"]] = lines
  mean = {}
  for m in METHODS:
    curves = [np.mean(np.asarray(r["regret_curves"][m]), axis=0) for r in results]
    y = np.mean(np.asarray(curves), axis=0)
    mean[LABELS[m]] = (np.arange(1, len(y) + 1), np.maximum(y, 1e-3))
  report.plot_panels(out / "regret.png", {"mean over held-out datasets": mean},
                     ylabel="normalized regret (floor 1e-3)", xlabel="trials", logy=True)
  report.plot_panels(out / "regret_per_dataset.png", panels,
                     ylabel="normalized regret (floor 1e-3)", xlabel="trials", logy=True)


def run(config: Config, out, *, progress: bool = True, store=None) -> Result:
  """Sweep (or resume) into ``out/store.sqlite`` (or ``store``, default ``config.store``),
  then leave one dataset out."""
  store = config.store if store is None else store
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  space = space_of(config)
  start = time.perf_counter()
  store_path = pathlib.Path(store) if store is not None else out / "store.sqlite"
  with RunStore(store_path) as st:
    sweep(st, datasets=config.datasets, models=(config.model,), space=space,
          trials_per_task=config.trials_per_task, epochs=config.epochs, seed=config.seed,
          workers=config.workers, progress=progress)
    sweep_seconds = time.perf_counter() - start
    runs = [r for r in st.runs() if r.task.split("/")[0] in config.datasets
            and (r.model or {}).get("family", config.model) == config.model
            and (r.extra or {}).get("epochs", config.epochs) == config.epochs]
  results = []
  partial = out / "partial.json"   # finished datasets, so an interrupted run resumes
  key = json.loads(json.dumps(config_lib.to_dict(config)))
  done = {}
  if partial.exists():
    saved = json.loads(partial.read_text())
    if saved.get("config") == key:
      done = {r["dataset"]: r for r in saved["results"]}
  for dataset in tqdm(config.datasets, desc="held-out datasets", disable=not progress):
    if dataset in done:
      results.append(done[dataset])
      continue
    results.append(json.loads(json.dumps(report.jsonable(
        evaluate_dataset(config, dataset, runs, space, progress=progress)))))
    report.write_json(partial, dict(config=key, results=results))
  results = _restore_budget_keys(results)
  summary = summarize(config, results)
  info = dict(wall_seconds=time.perf_counter() - start, sweep_seconds=sweep_seconds,
              store=str(store_path), runs=len(runs),
              stored_run_seconds=float(sum(r.wall_time or 0.0 for r in runs)))
  plot(config, out, results, summary)
  data = dict(config=config_lib.to_dict(config), info=info, summary=summary, datasets=results)
  s = summary
  terminal = [
      f"top-1 prediction beats random search at 10 trials on {s['top1_beats_random10']} of "
      f"{s['datasets']} held-out datasets",
      f"mean normalized regret at 10 trials: TPE warm-started {report.fmt(s['tpe_warm_regret10'])}"
      f", TPE {report.fmt(s['tpe_regret10'])}"]
  rows = [{"task": r["dataset"], "method": m, "metric": "normalized_regret", "step": t + 1,
           "value": v, "std": s, "runs": len(r["regret_curves"][m])}
          for r in results for m in METHODS if r["regret_curves"][m]
          for t, (v, s) in enumerate(zip(np.mean(r["regret_curves"][m], axis=0),
                                         np.std(r["regret_curves"][m], axis=0)))]
  return finish(out, report_text(config, results, summary, info), data, terminal, rows)


def _restore_budget_keys(results: list[dict]) -> list[dict]:
  """JSON turned the integer budget keys into strings; turn them back."""
  for r in results:
    r["regret"] = {m: {int(b): v for b, v in d.items()} for m, d in r["regret"].items()}
  return results
