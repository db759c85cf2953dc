"""Sweeps that train rather than compile: three ways of grouping runs into programs.

The same sweep (by default the hparam-prediction experiment's: every offline dataset x
mlp, 50 trials per task, 5 epochs) runs once per grouping, each in a fresh process
with the persistent XLA cache off (every program compiles cold), into its own store:

- ``per-depth``: one compiled program per task and ``layers`` value
  (``sweep.MASK_DEPTH = ()``, ``sweep.SHARED = ()``), the sweep before masking;
- ``masked``: one program per task, depth masked (``sweep.SHARED = ()``);
- ``shared``: depth masked and datasets padded to shared layouts
  (:class:`metaopt.hparams.sweep.PadLayout`): one program per layout, reused by every
  dataset of it (the default).

Measured per grouping: wall time of the sweep call, CPU time of the process, the time
in the compiled training calls (``train_grid``'s own timing: training), the time jax
spends tracing, lowering and compiling (``jax.monitoring`` duration events), the
number of training calls and of backend compiles. Checked: all three store the same
run keys with the same statuses, hyperparameters and model records; the relative
differences of final validation losses are summarized (median, 99th percentile,
largest, how many exceed 1e-4: high-LR runs are chaotic, so float rounding that
differs between programs can grow over training).

    .venv/bin/python benchmarks/bench_sweep_compile.py [--quick] [--datasets a,b]
        [--models mlp] [--trials 50] [--epochs 5] [--groupings per-depth,masked,shared]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import metaopt.train  # noqa: E402
from metaopt.hparams import RunStore  # noqa: E402
from metaopt.hparams import sweep as S  # noqa: E402
from metaopt.tasks.data import DATASETS  # noqa: E402

COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
GROUPINGS = {"per-depth": dict(MASK_DEPTH=(), SHARED=()),
             "masked": dict(MASK_DEPTH=S.MASK_DEPTH, SHARED=()),
             "shared": dict(MASK_DEPTH=S.MASK_DEPTH, SHARED=S.SHARED)}
QUICK = dict(datasets="iris,wine", models="mlp", trials=8, epochs=2)


def extra_args(parser):
  parser.add_argument("--datasets", default=",".join(DATASETS))
  parser.add_argument("--models", default="mlp")
  parser.add_argument("--trials", type=int, default=50)
  parser.add_argument("--epochs", type=int, default=5)
  parser.add_argument("--groupings", default=",".join(GROUPINGS))
  parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one grouping
  parser.add_argument("--store", default=None, help=argparse.SUPPRESS)


class Meter:
  """Sums of jax's compile-event durations and of train_grid's timings."""

  def __init__(self):
    self.totals = collections.defaultdict(float)
    jax.monitoring.register_event_duration_secs_listener(self._event)
    self._real = metaopt.train.train_grid
    metaopt.train.train_grid = self._train_grid

  def _event(self, event, duration, **kw):
    if event in COMPILE_EVENTS:
      self.totals[event.rsplit("/", 1)[1]] += duration
      if event.endswith("backend_compile_duration"):
        self.totals["backend_compiles"] += 1

  def _train_grid(self, *args, **kw):
    result, wall = self._real(*args, **kw)
    self.totals["training_calls"] += 1
    self.totals["train_s"] += wall
    return result, wall


def run_one(args) -> None:
  """One grouping's sweep in this process; prints its measurements as JSON."""
  for name, value in GROUPINGS[args.one].items():
    setattr(S, name, value)
  jax.config.update("jax_enable_compilation_cache", False)  # cold: every program compiles
  meter = Meter()
  c0 = time.process_time()
  report = S.sweep(args.store, datasets=args.datasets.split(","), models=args.models.split(","),
                   trials_per_task=args.trials, epochs=args.epochs, progress=False)
  t = meter.totals
  compile_s = sum(t[e.rsplit("/", 1)[1]] for e in COMPILE_EVENTS)
  print(json.dumps(dict(wall_s=report.wall_time, cpu_s=time.process_time() - c0,
                        train_s=t["train_s"], train_fraction=t["train_s"] / report.wall_time,
                        compile_s=compile_s, compile_fraction=compile_s / report.wall_time,
                        training_calls=int(t["training_calls"]),
                        backend_compiles=int(t["backend_compiles"]), added=report.added,
                        events=dict(t))))


def compare(stores: dict[str, pathlib.Path], reference: str) -> dict:
  """Same keys, statuses, hyperparameters and model records as ``reference``'s store;
  relative differences of the final validation losses."""
  runs = {}
  for name, path in stores.items():
    with RunStore(path) as store:
      runs[name] = {r.run_key: r for r in store.runs()}
  ref = runs[reference]
  out = {}
  for name, got in runs.items():
    if name == reference:
      continue
    same = sorted(got) == sorted(ref) and all(
        got[k].status == ref[k].status and got[k].hparams == ref[k].hparams
        and got[k].model == ref[k].model for k in ref)
    diffs = np.asarray([abs(got[k].metrics["val_loss"] - ref[k].metrics["val_loss"])
                        / max(abs(ref[k].metrics["val_loss"]), 1e-12) for k in ref
                        if k in got and np.isfinite(ref[k].metrics["val_loss"])
                        and np.isfinite(got[k].metrics["val_loss"])])
    out[name] = dict(same_rows=same, runs=len(got), median=float(np.median(diffs)),
                     p99=float(np.quantile(diffs, 0.99)), max=float(diffs.max()),
                     above_1e4=int((diffs > 1e-4).sum()))
  for name, got in runs.items():  # what a predictor learns from: the runs' outcomes
    acc = np.asarray([r.metrics.get("val_accuracy", np.nan) for r in got.values()])
    out.setdefault(name, {}).update(
        mean_val_accuracy=float(np.nanmean(acc)), median_val_accuracy=float(np.nanmedian(acc)),
        diverged=sum(r.status == "diverged" for r in got.values()))
  return out


def main():
  args = common.parse_args(__doc__.splitlines()[0], extra_args)
  if args.one:
    return run_one(args)
  if args.quick:
    for k, v in QUICK.items():
      setattr(args, k, v)
  names = args.groupings.split(",")
  load_before = os.getloadavg()
  results, stores = {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    for name in names:
      stores[name] = pathlib.Path(tmp) / f"{name}.db"
      cmd = [sys.executable, __file__, "--one", name, "--store", str(stores[name]),
             "--datasets", args.datasets, "--models", args.models,
             "--trials", str(args.trials), "--epochs", str(args.epochs)]
      env = {**os.environ, "METAOPT_XLA_CACHE": ""}
      out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
      results[name] = json.loads(out.stdout.strip().splitlines()[-1])
      print(f"{name}: {results[name]['wall_s']:.1f} s", flush=True)
    checks = compare(stores, names[0])
  rows = [[name, f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", f"{r['train_s']:.1f}",
           f"{r['train_fraction']:.1%}", f"{r['compile_s']:.1f}", r["training_calls"],
           r["backend_compiles"]] for name, r in results.items()]
  print(common.table(["grouping", "wall s", "CPU s", "training s", "training share",
                      "compiling s", "training calls", "backend compiles"], rows))
  base = results[names[0]]
  for name in names[1:]:
    c = checks[name]
    print(f"{name} vs {names[0]}: {base['wall_s'] / results[name]['wall_s']:.2f}x faster "
          f"(wall), {base['cpu_s'] / results[name]['cpu_s']:.2f}x less CPU; same run keys, "
          f"statuses, hparams and models: {c['same_rows']}; final val_loss relative "
          f"difference median {c['median']:.1e}, 99% {c['p99']:.1e}, max {c['max']:.1e}, "
          f"{c['above_1e4']} of {c['runs']} above 1e-4")
  for name in names:
    c = checks[name]
    print(f"{name}: final val accuracy mean {c['mean_val_accuracy']:.4f}, median "
          f"{c['median_val_accuracy']:.4f}; {c['diverged']} diverged")
  print(f"load average before {load_before}, after {os.getloadavg()}")
  path = common.write_json("sweep_compile", dict(
      datasets=args.datasets, models=args.models, trials=args.trials, epochs=args.epochs,
      results=results, checks=checks, loadavg_before=list(load_before)), quick=args.quick)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
