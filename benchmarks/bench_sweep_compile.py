"""Sweeps that train rather than compile: masked depth against one program per depth.

The same sweep (the offline suite: by default every dataset and model family of
`metaopt sweep`, 8 trials per task, 2 epochs) is run twice in this process, task by
task, into two stores: with the old grouping (``sweep.MASK_DEPTH = ()``: one compiled
program per ``layers`` value) and with depth masked (one program per task). The two
alternate which goes first from task to task, so load that drifts hits both alike.
The persistent XLA cache is off (every program compiles cold).

Measured per grouping: wall time of the sweep calls, CPU time of this process, the
time in the compiled training calls (``train_grid``'s own timing: training), the
time jax spends tracing, lowering and compiling (``jax.monitoring`` duration events),
the number of compiled training programs (``train_grid`` calls) and of all backend
compiles. Checked: both store the same run keys with the same statuses; the largest
relative difference of a final validation loss is reported.

    .venv/bin/python benchmarks/bench_sweep_compile.py [--quick] [--datasets a,b]
        [--models mlp,rnn] [--trials 8] [--epochs 2]
"""

from __future__ import annotations

import collections
import os
import pathlib
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
from metaopt.tasks.models import MODEL_KINDS  # noqa: E402

COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
GROUPINGS = {"per-depth": (), "masked": S.MASK_DEPTH}
QUICK = dict(datasets="iris,wine", models="mlp", trials=8, epochs=2)


def extra_args(parser):
  parser.add_argument("--datasets", default=",".join(DATASETS))
  parser.add_argument("--models", default=",".join(MODEL_KINDS))
  parser.add_argument("--trials", type=int, default=8)
  parser.add_argument("--epochs", type=int, default=2)


class Meter:
  """Sums of jax's compile-event durations and of train_grid's timings, per grouping."""

  def __init__(self):
    self.current = None
    self.totals = collections.defaultdict(lambda: collections.defaultdict(float))
    jax.monitoring.register_event_duration_secs_listener(self._event)
    self._real = metaopt.train.train_grid
    metaopt.train.train_grid = self._train_grid

  def _event(self, event, duration, **kw):
    if self.current is not None and event in COMPILE_EVENTS:
      self.totals[self.current][event.rsplit("/", 1)[1]] += duration
      if event.endswith("backend_compile_duration"):
        self.totals[self.current]["backend_compiles"] += 1

  def _train_grid(self, *args, **kw):
    start = time.perf_counter()
    result, wall = self._real(*args, **kw)
    t = self.totals[self.current]
    t["programs"] += 1
    t["train_s"] += wall
    t["train_grid_s"] += time.perf_counter() - start
    return result, wall


def main():
  args = common.parse_args(__doc__.splitlines()[0], extra_args)
  if args.quick:
    for k, v in QUICK.items():
      setattr(args, k, v)
  jax.config.update("jax_enable_compilation_cache", False)  # cold: every program compiles
  tasks, invalid = S.tasks_of(args.datasets.split(","), args.models.split(","))
  meter = Meter()
  wall, cpu = collections.Counter(), collections.Counter()
  per_task = []
  load_before = os.getloadavg()
  with tempfile.TemporaryDirectory() as tmp:
    for n, (dataset, model) in enumerate(tasks):
      order = list(GROUPINGS) if n % 2 == 0 else list(GROUPINGS)[::-1]
      row = {"task": f"{dataset}/{model}"}
      for name in order:
        S.MASK_DEPTH = GROUPINGS[name]
        meter.current = name
        c0 = time.process_time()
        report = S.sweep(pathlib.Path(tmp) / f"{name}.db", datasets=[dataset], models=[model],
                         trials_per_task=args.trials, epochs=args.epochs, progress=False)
        meter.current = None
        wall[name] += report.wall_time
        cpu[name] += time.process_time() - c0
        row[name] = report.wall_time
      print(f"{row['task']}: per-depth {row['per-depth']:.1f} s, masked {row['masked']:.1f} s",
            flush=True)
      per_task.append(row)
    S.MASK_DEPTH = GROUPINGS["masked"]
    runs = {}
    for name in GROUPINGS:
      with RunStore(pathlib.Path(tmp) / f"{name}.db") as store:
        runs[name] = {r.run_key: r for r in store.runs()}
  old, new = runs["per-depth"], runs["masked"]
  same = sorted(old) == sorted(new) and all(old[k].status == new[k].status for k in old)
  diffs = [abs(new[k].metrics["val_loss"] - old[k].metrics["val_loss"]) /
           max(abs(old[k].metrics["val_loss"]), 1e-12) for k in old
           if k in new and np.isfinite(old[k].metrics["val_loss"])]
  results = {}
  for name in GROUPINGS:
    t = meter.totals[name]
    compile_s = sum(t[e.rsplit("/", 1)[1]] for e in COMPILE_EVENTS)
    results[name] = dict(wall_s=wall[name], cpu_s=cpu[name], train_s=t["train_s"],
                         train_fraction=t["train_s"] / wall[name], compile_s=compile_s,
                         compile_fraction=compile_s / wall[name],
                         programs=int(t["programs"]), backend_compiles=int(t["backend_compiles"]),
                         events={k: v for k, v in t.items()})
  speedup = wall["per-depth"] / wall["masked"]
  rows = [[name, f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", f"{r['train_s']:.1f}",
           f"{r['train_fraction']:.1%}", f"{r['compile_s']:.1f}", r["programs"],
           r["backend_compiles"]] for name, r in results.items()]
  print(common.table(["grouping", "wall s", "CPU s", "training s", "training share",
                      "compiling s", "training programs", "backend compiles"], rows))
  print(f"masked vs per-depth: {speedup:.2f}x faster (wall), "
        f"{cpu['per-depth'] / cpu['masked']:.2f}x less CPU; {len(tasks)} tasks, "
        f"{len(old)} runs each; same run keys and statuses: {same}; largest relative "
        f"difference of a final val_loss: {max(diffs, default=0):.2e}")
  print(f"load average before {load_before}, after {os.getloadavg()}")
  path = common.write_json("sweep_compile", dict(
      tasks=[f"{d}/{m}" for d, m in tasks], invalid=invalid, trials=args.trials,
      epochs=args.epochs, results=results, speedup_wall=speedup,
      cpu_ratio=cpu["per-depth"] / cpu["masked"], same_rows=same,
      max_val_loss_rel_diff=max(diffs, default=0.0), per_task=per_task,
      loadavg_before=list(load_before)), quick=args.quick)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
