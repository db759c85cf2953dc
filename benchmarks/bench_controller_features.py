"""Does the learned LR need the update-norm features? Quality without them, on validation.

The norm of the update direction is the only controller input that needs a pass over
every parameter at each step, and on XLA:CPU that pass costs 20-35% of a batch-32 MLP's
training step (docs/benchmarks.md, "Where the extra time goes"). This benchmark
meta-trains the lr-schedule experiment's default controller twice, the same command and
seed, once on every feature (``metaopt.FEATURE_NAMES``; this reproduced the controller
shipped until 2026-12-02) and once without ``metaopt.NORM_FEATURES`` (the lr-schedule
default since, and the shipped controller), and compares the two on
validation tasks: the meta-training datasets (digits, mnist1d, synthetic) at widths,
depths and lengths meta-training never used, scored on their validation split. The
held-out tasks of lr-schedule (other datasets and model families) play no part here.

Decision rule, fixed before the run: the controller without the norm features replaces
the shipped one if its mean final validation accuracy over the validation tasks is at
most 0.5 point below the full controller's (the overhead it removes is measured by
bench_learned_lr_overhead.py). Adam at 1e-3 is trained alongside, for scale.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import common
from metaopt.experiments.lr_schedule import default_config
from metaopt.experiments.protocol import seed_keys
from metaopt.meta.lr import learned_lr_tx, meta_train
from metaopt.schedules.learned_lr import FEATURE_NAMES, NORM_FEATURES, load_controller
from metaopt.schedules.baselines import scheduled
from metaopt.tasks import TaskConfig, make_task
from metaopt.train import train_grid

NAME = "bench_controller_features"
TOLERANCE = 0.005
NO_NORM = tuple(f for f in FEATURE_NAMES if f not in NORM_FEATURES)
# The meta-training datasets at shapes and lengths the family (widths 32/128, depths 1/2,
# 200-2000 steps) never had.
VALIDATION = (
    TaskConfig("digits", "mlp", 64, 3, 32, 3000, 0),
    TaskConfig("mnist1d", "mlp", 64, 2, 32, 3000, 0),
    TaskConfig("mnist1d", "mlp", 256, 1, 64, 1500, 0),
    TaskConfig("synthetic", "mlp", 64, 3, 32, 1500, 0),
)


def main():
  args = common.parse_args(__doc__.splitlines()[0])
  base = default_config().meta
  seeds = 1 if args.quick else 3
  if args.quick:
    base = base.__class__(**{**base.__dict__, "meta_steps": 8})
  variants = {"all features": FEATURE_NAMES, "no norm features": NO_NORM}
  trained, result = {}, {"variants": {}, "tasks": {}, "tolerance": TOLERANCE}
  for name, features in variants.items():
    config = base.__class__(**{**base.__dict__, "features": features})
    start = time.perf_counter()
    meta = meta_train(config, progress=False)
    seconds = time.perf_counter() - start
    trained[name] = (meta.controller, meta.theta, config)
    record = dict(features=list(features), meta_train_seconds=seconds,
                  skipped_members=meta.skipped_members)
    if not args.quick and features == default_config().meta.features:  # the shipped one's
      shipped = load_controller().theta
      record["reproduces_shipped"] = all(np.array_equal(a, b) for a, b in zip(
          jax.tree.leaves(meta.theta), jax.tree.leaves(shipped)))
    result["variants"][name] = record
    print(f"meta-trained '{name}' in {seconds:.0f} s: {record}", flush=True)

  rows = []
  for task_config in VALIDATION:
    if args.quick:
      task_config = task_config._replace(total_steps=200)
    task = make_task(task_config)
    steps = task_config.total_steps
    keys = seed_keys(seeds, task_config.seed)
    finals = {}
    for name, (controller, theta, config) in trained.items():
      res, _ = train_grid(task, lambda _, c=controller, t=theta, m=config:
                          learned_lr_tx(c, t, m, steps), jnp.zeros(seeds), keys,
                          steps=steps, eval_every=steps // 10)
      finals[name] = res.val_accuracy[:, -1]
    res, _ = train_grid(task, scheduled(("constant",), steps, base.optimizer),
                        {"lr": jnp.full(seeds, 1e-3, jnp.float32),
                         "schedule": jnp.zeros(seeds, jnp.int32)}, keys,
                        steps=steps, eval_every=steps // 10)
    finals["adam 1e-3"] = res.val_accuracy[:, -1]
    result["tasks"][task_config.name] = {k: v.tolist() for k, v in finals.items()}
    rows.append([task_config.name] + [f"{v.mean():.4f} ± {v.std():.4f}" for v in finals.values()])
    print(rows[-1], flush=True)

  means = {name: float(np.mean([np.mean(t[name]) for t in result["tasks"].values()]))
           for name in [*variants, "adam 1e-3"]}
  difference = means["no norm features"] - means["all features"]
  result.update(means=means, difference=difference, replace=bool(difference >= -TOLERANCE))
  rows.append(["mean"] + [f"{means[n]:.4f}" for n in means])
  print(f"\nFinal validation accuracy, mean ± std over {seeds} seeds\n")
  print(common.table(["validation task", *variants, "adam 1e-3"], rows))
  print(f"\nno norm - all features: {difference:+.4f} (replace if >= {-TOLERANCE}): "
        f"{'replace' if result['replace'] else 'keep'}")
  print(f"wrote {common.write_json(NAME, result, quick=args.quick)}")


if __name__ == "__main__":
  main()
