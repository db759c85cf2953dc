"""Hypergradient Adam started from a badly chosen LR: which rule recovers?

For every offline dataset of the adaptive-lr experiment (its protocol: MLP 64x2, batch
32, 50 epochs, validation every epoch, early stopping after 10 epochs without a 1%
improvement, 3 seeds), Adam-HD starts from 10x and 0.1x the tuned constant Adam LR
(tuned over 3e-4, 1e-3, 3e-3 on validation accuracy). Rules: the paper's additive
update at its default beta, the normalized multiplicative rule at several betas, and
the variants of ``hypergradient_adam`` (``per_layer``: one LR per parameter leaf;
``normalized``: an Adam-normalized step on log LR) at two betas each.
A rule is chosen on the mean *validation* accuracy over datasets and starts (never
on test); the target is a final test accuracy within 2% (relative) of the tuned
constant's, on every start.

    .venv/bin/python benchmarks/bench_hd_recovery.py [--quick] [--datasets a,b]
        [--seeds N] [--rule NAME ...]

``--seeds`` re-measures with more seeds (the tuned constant too: its LR is re-chosen on the
mean over them), into results/benchmarks/hd_recovery.seedsN/; ``--rule`` (repeatable) runs
only the named rules, and the choice is among those.

Each dataset's rows are written to results/benchmarks/hd_recovery/<dataset>.json as soon as
they are done (so datasets can run in separate processes with ``--datasets``); the table and
the choice of rule cover every dataset whose file is there, and name the missing ones.
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
         "multiplicative, beta 0.1": dict(beta=0.1, multiplicative=True),
         "per-layer multiplicative, beta 0.1": dict(beta=0.1, multiplicative=True,
                                                    per_layer=True),
         "normalized, beta 0.03": dict(beta=0.03, normalized=True),
         "normalized, beta 0.1": dict(beta=0.1, normalized=True),
         "per-layer normalized, beta 0.03": dict(beta=0.03, normalized=True, per_layer=True),
         "per-layer normalized, beta 0.1": dict(beta=0.1, normalized=True, per_layer=True)}
# Run only when named with --rule (a probe on two datasets, docs/benchmarks.md).
PROBES = {"normalized, beta 0.3": dict(beta=0.3, normalized=True),
          "per-layer normalized, beta 0.3": dict(beta=0.3, normalized=True, per_layer=True)}
FACTORS = (10.0, 0.1)


def add_arguments(parser):
  parser.add_argument("--datasets", default=None,
                      help="comma-separated datasets to run (default: all)")
  parser.add_argument("--seeds", type=int, default=None,
                      help="seeds per start and per tuning LR (default: the protocol's 3)")
  parser.add_argument("--rule", action="append", choices=[*RULES, *PROBES], default=None,
                      help="a rule to run (repeatable; default: every rule)")


def main():
  args = common.parse_args(__doc__.splitlines()[0], add_arguments)
  config = adaptive_lr.default_config(0)
  rules = {name: {**RULES, **PROBES}[name] for name in (args.rule or RULES)}
  all_datasets = ("iris", "wine") if args.quick else config.datasets
  datasets = all_datasets if args.datasets is None else tuple(
      d for d in args.datasets.split(",") if d)  # --datasets "": only rebuild the table
  unknown = sorted(set(datasets) - set(all_datasets))
  if unknown:
    raise SystemExit(f"--datasets: unknown {unknown}; accepted: {', '.join(all_datasets)}")
  epochs, seeds = (3, 1) if args.quick else (config.epochs, config.seeds)
  seeds = args.seeds or seeds
  name = ("hd_recovery" + (f".seeds{seeds}" if args.seeds else "")
          + (".quick" if args.quick else ""))
  folder = common.RESULTS_DIR / name
  folder.mkdir(parents=True, exist_ok=True)
  for dataset in datasets:
    rows = []
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
    tuned_tests = const.test_accuracy[:, -1].reshape(len(config.tune_lrs), seeds)[best]
    tuned_test = float(tuned_tests.mean())
    starts = jnp.asarray(np.repeat([f * tuned_lr for f in FACTORS], seeds).astype(np.float32))
    for rule, kw in rules.items():
      make_tx = lambda lr0, kw=kw: optax.chain(hypergradient_adam(lr0, **kw), stop())
      res, _ = train_grid(task, make_tx, starts, jnp.tile(keys, (len(FACTORS), 1)), steps=steps,
                          eval_every=every, feed_val_loss=True)
      for j, f in enumerate(FACTORS):
        part = slice(j * seeds, (j + 1) * seeds)
        test = float(res.test_accuracy[part, -1].mean())
        rows.append(dict(dataset=dataset, rule=rule, start=f"{f:g}x", tuned_lr=tuned_lr,
                         tuned_test=tuned_test, tuned_test_std=float(tuned_tests.std()),
                         test_std=float(res.test_accuracy[part, -1].std()),
                         val=float(res.val_accuracy[part, -1].mean()),
                         test=test, passed=bool(test >= 0.98 * tuned_test),
                         final_lr=float(np.nanmean(res.learning_rate[part, -1]))))
      print(dataset, rule, [(r["start"], round(r["test"], 4), r["passed"]) for r in rows[-2:]],
            "tuned", round(tuned_test, 4), flush=True)
    (folder / f"{dataset}.json").write_text(json.dumps(dict(
        rows=rows, environment=common.environment()), indent=1))
  rows, missing = [], []
  for dataset in all_datasets:
    path = folder / f"{dataset}.json"
    if path.exists():
      rows += [r for r in json.loads(path.read_text())["rows"] if r["rule"] in rules]
    else:
      missing.append(dataset)
  by_rule = {}
  for rule in rules:
    mine = [r for r in rows if r["rule"] == rule]
    by_rule[rule] = dict(mean_val=float(np.mean([r["val"] for r in mine])),
                         passed=sum(r["passed"] for r in mine), starts=len(mine))
  chosen = max(by_rule, key=lambda r: by_rule[r]["mean_val"])
  print("\n| rule | mean val acc | starts within 2% of tuned (test) |\n|---|---|---|")
  for rule, s in by_rule.items():
    label = "" if rule != chosen else (" (the only rule run)" if len(rules) == 1
                                        else " (chosen on validation)")
    print(f"| {rule}{label} | "
          f"{s['mean_val']:.4f} | {s['passed']} of {s['starts']} |")
  if missing:
    print(f"not yet run (no file in {folder}): {', '.join(missing)}")
  # mean ± std over seeds (files written before the std was recorded: the mean)
  cell = lambda r, key: f"{r[key]:.4f}" + (f" ± {r[key + '_std']:.4f}"
                                           if key + "_std" in r else "")
  print("\n| dataset | tuned LR | tuned test | start | " + " | ".join(rules) + " |")
  print("|---" * (4 + len(rules)) + "|")
  for dataset in all_datasets:
    for f in FACTORS:
      mine = {r["rule"]: r for r in rows if r["dataset"] == dataset and r["start"] == f"{f:g}x"}
      if mine:
        first = next(iter(mine.values()))
        cells = [f"{cell(mine[k], 'test')} {'pass' if mine[k]['passed'] else '**fail**'}"
                 if k in mine else "–" for k in rules]
        print(f"| {dataset} | {first['tuned_lr']:g} | {cell(first, 'tuned_test')} | {f:g}x | "
              + " | ".join(cells) + " |")
  path = common.RESULTS_DIR / f"{name}.json"
  path.write_text(json.dumps(dict(rows=rows, by_rule=by_rule, chosen=chosen, missing=missing,
                                  environment=common.environment()), indent=1))
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
