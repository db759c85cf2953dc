"""Hypergradient Adam started from a badly chosen LR: which rule recovers?

For every offline dataset of the adaptive-lr experiment (its protocol: MLP 64x2, batch
32, 50 epochs, validation every epoch, early stopping after 10 epochs without a 1%
improvement, 3 seeds), Adam-HD starts from 10x and 0.1x the tuned constant Adam LR
(tuned over 3e-4, 1e-3, 3e-3 on validation accuracy). Rules: the paper's additive
update at its default beta, and the normalized multiplicative rule at several betas.
A rule is chosen on the mean *validation* accuracy over datasets and starts (never
on test); the target is a final test accuracy within 2% (relative) of the tuned
constant's, on every start.

    .venv/bin/python benchmarks/bench_hd_recovery.py [--quick]
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import optax

import common
from metaopt.experiments import adaptive_lr
from metaopt.experiments.protocol import best_index, seed_keys
from metaopt.schedules import early_stopping, hypergradient_adam
from metaopt.tasks import TaskConfig, make_task
from metaopt.train import steps_per_epoch, train_grid

RULES = {"additive, beta 1e-7 (paper)": dict(beta=1e-7),
         "multiplicative, beta 0.01": dict(beta=0.01, multiplicative=True),
         "multiplicative, beta 0.03": dict(beta=0.03, multiplicative=True),
         "multiplicative, beta 0.1": dict(beta=0.1, multiplicative=True)}
FACTORS = (10.0, 0.1)


def main():
  args = common.parse_args(__doc__.splitlines()[0])
  config = adaptive_lr.default_config(0)
  datasets = ("iris", "wine") if args.quick else config.datasets
  epochs, seeds = (3, 1) if args.quick else (config.epochs, config.seeds)
  rows = []
  for dataset in datasets:
    probe = make_task(TaskConfig(dataset, "mlp", config.width, config.depth, config.batch_size,
                                 1, config.seed))
    every = steps_per_epoch(probe)
    steps = every * epochs
    task = make_task(probe.config._replace(total_steps=steps))
    keys = seed_keys(seeds, config.seed)
    stop = lambda: early_stopping(config.patience, rtol=config.rtol)
    tune = jnp.asarray(np.repeat(np.asarray(config.tune_lrs, np.float32), seeds))
    const, _ = train_grid(task, lambda lr: optax.chain(optax.adam(lr), stop()), tune,
                          jnp.tile(keys, (len(config.tune_lrs), 1)), steps=steps,
                          eval_every=every, feed_val_loss=True)
    val = const.val_accuracy[:, -1].reshape(len(config.tune_lrs), seeds).mean(1)
    loss = const.val_loss[:, -1].reshape(len(config.tune_lrs), seeds).mean(1)
    best = best_index(val, loss)
    tuned_lr = float(config.tune_lrs[best])
    tuned_test = float(const.test_accuracy[:, -1].reshape(len(config.tune_lrs), seeds)[best].mean())
    starts = jnp.asarray(np.repeat([f * tuned_lr for f in FACTORS], seeds).astype(np.float32))
    for rule, kw in RULES.items():
      make_tx = lambda lr0, kw=kw: optax.chain(hypergradient_adam(lr0, **kw), stop())
      res, _ = train_grid(task, make_tx, starts, jnp.tile(keys, (len(FACTORS), 1)), steps=steps,
                          eval_every=every, feed_val_loss=True)
      for j, f in enumerate(FACTORS):
        part = slice(j * seeds, (j + 1) * seeds)
        test = float(res.test_accuracy[part, -1].mean())
        rows.append(dict(dataset=dataset, rule=rule, start=f"{f:g}x", tuned_lr=tuned_lr,
                         tuned_test=tuned_test, val=float(res.val_accuracy[part, -1].mean()),
                         test=test, passed=bool(test >= 0.98 * tuned_test),
                         final_lr=float(np.nanmean(res.learning_rate[part, -1]))))
      print(dataset, rule, [(r["start"], round(r["test"], 4), r["passed"]) for r in rows[-2:]],
            "tuned", round(tuned_test, 4), flush=True)
  by_rule = {}
  for rule in RULES:
    mine = [r for r in rows if r["rule"] == rule]
    by_rule[rule] = dict(mean_val=float(np.mean([r["val"] for r in mine])),
                         passed=sum(r["passed"] for r in mine), starts=len(mine))
  chosen = max(by_rule, key=lambda r: by_rule[r]["mean_val"])
  print("\n| rule | mean val acc | starts within 2% of tuned (test) |\n|---|---|---|")
  for rule, s in by_rule.items():
    print(f"| {rule}{' (chosen on validation)' if rule == chosen else ''} | "
          f"{s['mean_val']:.4f} | {s['passed']} of {s['starts']} |")
  path = common.RESULTS_DIR / f"hd_recovery{'.quick' if args.quick else ''}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(dict(rows=rows, by_rule=by_rule, chosen=chosen), indent=1))
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
