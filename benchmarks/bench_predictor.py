"""Predictor speed: fit on 10,000 stored runs (< 1 minute) and suggest (< 1 second).

A synthetic run store: 100 tasks x 100 runs of ``DEFAULT_SPACE`` with 20
meta-features; the best log10 LR of a task is ``-4 + 2 f0`` and the metric a
noisy quadratic around it (2% of the runs diverge). Measured, on the 2-core CPU:

- reading the 10,000 runs back from the SQLite store;
- ``Predictor.fit(store)`` with the default settings (5 members, 2,000 steps),
  cold (in a fresh process: includes XLA compilation) and warm (a second fit
  with another seed, compiled program reused);
- ``predictor.suggest(features, k=3)``: the first call and the median of 20;
- as a sanity check of quality, the error of the suggested log10 LR on 5
  held-out tasks (recorded, no target).

    .venv/bin/python benchmarks/bench_predictor.py [--quick]
"""

from __future__ import annotations

import math
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

from metaopt.hparams import DEFAULT_SPACE, Predictor, RunStore  # noqa: E402

FIT_TARGET = 60.0
SUGGEST_TARGET = 1.0


def synthetic_rows(tasks: int, runs_per_task: int, features: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  rows = []
  for t in range(tasks):
    f = {f"f{i}": float(rng.uniform()) for i in range(features)}
    best = -4.0 + 2.0 * f["f0"]
    for _ in range(runs_per_task):
      h = DEFAULT_SPACE.sample(rng)
      gap = math.log10(h["learning_rate"]) - best
      diverged = rng.uniform() < 0.02
      m = 0.9 - 0.1 * gap ** 2 - 0.05 * (h["dropout"] - 0.2) + 0.02 * rng.normal()
      rows.append(dict(task=f"task{t}", task_features=f, hparams=h,
                       metrics={"val_accuracy": float("nan") if diverged else m},
                       status="diverged" if diverged else "completed"))
  return rows


def main():
  args = common.parse_args(__doc__.splitlines()[0])
  tasks, per_task = (20, 50) if args.quick else (100, 100)
  with tempfile.TemporaryDirectory() as tmp:
    store = RunStore(pathlib.Path(tmp) / "runs.sqlite")
    store.add_many(synthetic_rows(tasks, per_task, 20))
    start = time.perf_counter()
    runs = store.runs()
    read_s = time.perf_counter() - start
    store.close()

  start = time.perf_counter()
  predictor = Predictor.fit(runs, seed=0)
  fit_cold = time.perf_counter() - start
  start = time.perf_counter()
  Predictor.fit(runs, seed=1)
  fit_warm = time.perf_counter() - start

  rng = np.random.default_rng(123)
  held = [{f"f{i}": float(rng.uniform()) for i in range(20)} for _ in range(5)]
  start = time.perf_counter()
  first = predictor.suggest(held[0], k=3)
  suggest_first = time.perf_counter() - start
  times = []
  for i in range(20):
    start = time.perf_counter()
    predictor.suggest(held[i % 5], k=3, seed=i)
    times.append(time.perf_counter() - start)
  suggest_median = float(np.median(times))
  errors = [abs(math.log10(predictor.suggest(f)[0]["hparams"]["learning_rate"])
                - (-4 + 2 * f["f0"])) for f in held]
  del first

  rows = [
      ["read 10,000 runs from the store" if not args.quick else "read runs", common.fmt_time(read_s), "–", "–"],
      ["fit, cold (incl. compile)", common.fmt_time(fit_cold), f"< {FIT_TARGET:.0f} s",
       common.verdict(fit_cold, FIT_TARGET)],
      ["fit, warm (compiled)", common.fmt_time(fit_warm), f"< {FIT_TARGET:.0f} s",
       common.verdict(fit_warm, FIT_TARGET)],
      ["suggest k=3, first call", common.fmt_time(suggest_first), f"< {SUGGEST_TARGET:.0f} s",
       common.verdict(suggest_first, SUGGEST_TARGET)],
      ["suggest k=3, median of 20", common.fmt_time(suggest_median), f"< {SUGGEST_TARGET:.0f} s",
       common.verdict(suggest_median, SUGGEST_TARGET)],
  ]
  print(f"{len(runs)} runs, {tasks} tasks, 20 meta-features, DEFAULT_SPACE; "
        f"predictor: {predictor.ensemble_size} members {list(predictor.hidden)}, "
        f"{predictor.info['steps']} steps")
  print(common.table(["measure", "time", "target", "verdict"], rows))
  print(f"suggested log10 LR error on 5 held-out synthetic tasks: mean {np.mean(errors):.3f}, "
        f"max {np.max(errors):.3f} decades")
  path = common.write_json("predictor", dict(
      runs=len(runs), tasks=tasks, read_seconds=read_s, fit_cold_seconds=fit_cold,
      fit_warm_seconds=fit_warm, suggest_first_seconds=suggest_first,
      suggest_median_seconds=suggest_median, suggest_samples=times,
      lr_error_decades=errors, info=predictor.info), quick=args.quick)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
