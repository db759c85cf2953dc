"""A learned LR on top of a parameter-free base: the controller scaling Prodigy's estimate.

Issue 12 asks whether a controller that learns the schedule around a parameter-free
optimizer's step-size estimate combines the strengths of both. The variant tried here
("controller on Prodigy's D"): Adam's direction (``eps_root`` as in meta-training), times
the D estimate of an ``optax.contrib.prodigy`` run on the same gradients and parameters
(``BaseOptimizer(step_size="prodigy")``, see ``metaopt.schedules.scale_by_prodigy_estimate``),
times the learned controller's LR with ``learning_rate=1.0``: the controller sets a
multiplier of D in [0.01, 10].
It is meta-trained exactly as the lr-schedule default (same family, features, meta steps
and seed), only the base differs.

Compared with the same seeds: Adam 1e-3; the shipped controller (on Adam); Prodigy at its
defaults; Prodigy with the schedule its docstring recommends (a linear decay from 1.0 to
0 over the run, no warmup); the controller on Prodigy's D. On validation tasks (the
meta-training datasets at shapes and lengths meta-training never used, as in
bench_controller_features.py, plus a ResNet stand-in on digits at 28x28, a family
meta-training never saw on one of its datasets) and, reported only, on the lr-schedule
experiment's held-out tasks.

The second variant ("controller on Prodigy's D, linear decay", added after the first run):
the same, with Prodigy run with its linear decay and the updates scaled by that decay
too, so an untrained controller is exactly that baseline's step on Adam's direction and
the controller learns a multiplier around it.

The third variant ("controller on Prodigy's D, linear decay, PES", added after the second
run): the second variant meta-trained with PES instead of TBPTT (``estimator="pes"``, 4
antithetic pairs per lane, the same 400 meta steps of 25-step truncations). Both earlier
variants learned to shrink the step, which is what 25-step truncations teach (the
short-horizon bias, see bench_pes.py); PES is unbiased over the whole run, so this
separates the meta-objective's horizon from the base.

The fifth variant ("..., PES, with encoders", added after the fourth): the third, with
half its lanes meta-trained on BERT-style encoders (sentiment_synth at random dataset
seeds, widths 16 and 64, one layer, batch 32, 300-1,200 steps; the held-out encoder is
32x2 at dataset seed 0), the other half on the default MLP family. Prodigy overshoots on
encoders (bench_prodigy_plateau.py), so a controller that sees them may learn to shrink
D there. From this variant on, the validation tasks include that benchmark's two
encoders (48x1 and 64x2 at dataset seed 1, 600 steps); earlier variants' recorded
results are on the five tasks without them.

The sixth to eighth variants (added after the fifth) test the meta-objective the issue
names: "a meta-objective that does not reward what hurts the user". Every controller so
far minimized the log validation loss, and the shipped one wins on test loss while losing
on accuracy (mnist1d overfits: its loss rises while its accuracy still improves).
``meta_objective="val_error"`` scores each step's validation batch by its error
(1 - accuracy), which only the forward estimators can follow. "controller on Adam, PES"
is the shipped controller's setting (Adam, base LR 1e-3) meta-trained with PES on the log
validation loss, the control; "controller on Adam, PES, validation error" the same on
the validation error; "controller on Prodigy's D, linear decay, PES, validation error"
the third variant on the validation error. PES with 4 pairs per lane and sigma 0.01 as
the third variant, 400 meta steps, the default MLP family.

The ninth ("..., PES, with encoders, sigma 0.1", added after the eighth): the fifth with
perturbations ten times larger. A run stuck on the encoders' chance plateau has a flat
meta-loss, so perturbations of sigma 0.01 (an LR about 5% off) never show PES a run that
leaves it; Prodigy's estimate overshoots the LR that trains the encoders by 1.6-6.6x
(bench_prodigy_plateau.py), and sigma 0.1 moves the LR by up to about 1.6x.

The tenth ("controller on Adam, PES, validation error, with encoders", added after the
ninth): the seventh with half its lanes on the encoders, as the fifth. Every controller
on Prodigy's D starts from a step that already leaves the encoders at chance, where no
perturbation changes the meta-loss; Adam at 1e-3 trains them, so when the MLP lanes push
its LR up, the encoder lanes' runs that get stuck should push back.

Decision rules, each fixed before its variant first ran: the controller on Prodigy's D
would replace the shipped controller if its mean final validation accuracy over the
validation tasks is at least 0.5 point above the shipped controller's and not below
Prodigy's alone (else a user is better served by Prodigy itself); the second variant if
it is at least 0.5 point above every other single run here but its sibling: Adam 1e-3,
the shipped controller, Prodigy and Prodigy with linear decay; the third to tenth by
the same rule.

``--variants`` meta-trains and evaluates only the named variants (the four reference
methods always run, in the same process and with the same seeds; ``--variants ""``: none);
the results go to results/benchmarks/bench_controller_prodigy.<variants>.json.

``--lagged`` adds the shipped controller with its LR lagged one step (each update applies
the LR chosen at the step before, which takes the controller network off the update's
critical path: bench_learned_lr_overhead.py, ``--ablate``; ``pretrained_lr(lagged=True)``),
with the shipped weights as they are, not meta-trained for it. Rule, fixed before it first ran: the lag can be adopted
without re-meta-training if its mean final validation accuracy is at most 0.5 point
below the shipped controller's (the held-out tasks reported only).
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax.numpy as jnp
import numpy as np
import optax

import common
from bench_controller_features import VALIDATION as MLP_VALIDATION
from bench_prodigy_plateau import TASKS as ENCODER_VALIDATION
from metaopt.experiments.lr_schedule import HELDOUT, default_config
from metaopt.experiments.protocol import seed_keys
from metaopt.meta import lr as meta_lr
from metaopt.schedules.baselines import BaseOptimizer, scheduled, self_tuning
from metaopt.schedules.learned_lr import load_controller, pretrained_lr
from metaopt.tasks import TaskConfig, make_task, task_family
from metaopt.tasks.models import VMAPPED
from metaopt.train import train_grid

NAME = "bench_controller_prodigy"
MARGIN = 0.005
FIRST_VARIANT = "controller on Prodigy's D"
# Meta-training encoders: not the held-out shape (32x2) nor the validation ones.
ENCODERS = task_family(datasets=("sentiment_synth",), models=("bert",), widths=(16, 64),
                       depths=(1,), batch_sizes=(32,), total_steps=(300, 600, 1200))
ON_D = BaseOptimizer(step_size="prodigy")
ON_D_DECAY = BaseOptimizer(step_size="prodigy_linear_decay")
# key -> (name, MetaLRConfig changes beyond the lr-schedule default and learning_rate=1.0)
VARIANTS = {
    "d": (FIRST_VARIANT, dict(optimizer=ON_D)),
    "d_decay": ("controller on Prodigy's D, linear decay", dict(optimizer=ON_D_DECAY)),
    "d_decay_pes": ("controller on Prodigy's D, linear decay, PES",
                    dict(optimizer=ON_D_DECAY, estimator="pes", population=8)),
    "d_decay_pes_long": ("controller on Prodigy's D, linear decay, PES x8",
                         dict(optimizer=ON_D_DECAY, estimator="pes", population=16,
                              meta_steps=1600)),
    "d_decay_pes_text": ("controller on Prodigy's D, linear decay, PES, with encoders",
                         dict(optimizer=ON_D_DECAY, estimator="pes", population=8,
                              families=(ENCODERS,))),
    "d_decay_pes_text_wide": ("controller on Prodigy's D, linear decay, PES, with encoders, "
                              "sigma 0.1",
                              dict(optimizer=ON_D_DECAY, estimator="pes", population=8,
                                   families=(ENCODERS,), sigma=0.1)),
    "adam_pes": ("controller on Adam, PES",
                 dict(learning_rate=1e-3, estimator="pes", population=8)),
    "adam_pes_error": ("controller on Adam, PES, validation error",
                       dict(learning_rate=1e-3, estimator="pes", population=8,
                            meta_objective="val_error")),
    "adam_pes_error_text": ("controller on Adam, PES, validation error, with encoders",
                            dict(learning_rate=1e-3, estimator="pes", population=8,
                                 meta_objective="val_error", families=(ENCODERS,))),
    "d_decay_pes_error": ("controller on Prodigy's D, linear decay, PES, validation error",
                          dict(optimizer=ON_D_DECAY, estimator="pes", population=8,
                               meta_objective="val_error")),
}
VALIDATION = (MLP_VALIDATION + (TaskConfig("digits_28", "resnet18", 4, 2, 32, 300, 0),)
              + ENCODER_VALIDATION)


LAGGED = "shipped controller, LR lagged one step"


def methods(steps: int, shipped, trained: dict, with_lagged: bool = False) -> dict:
  """name -> make_tx(_) for one task of ``steps`` steps; ``trained``: variant name ->
  (controller, theta, config); ``with_lagged``: also the shipped controller lagged."""
  s_controller, s_theta, s_config = shipped
  constant = scheduled(("constant",), steps, s_config.optimizer)
  out = {
      "Adam 1e-3": lambda _: constant({"lr": jnp.float32(1e-3), "schedule": jnp.int32(0)}),
      "shipped controller": lambda _: meta_lr.learned_lr_tx(s_controller, s_theta, s_config,
                                                            steps),
      "Prodigy": lambda _: self_tuning("prodigy"),
      "Prodigy, linear decay": lambda _: self_tuning("prodigy_linear_decay", steps),
  }
  if with_lagged:
    # pretrained_lr: the shipped controller's scale_by_learned_lr (check_pretrained_is_shipped).
    out[LAGGED] = lambda _: optax.chain(
        s_config.optimizer.direction(eps_root=1e-8, total_steps=steps),
        pretrained_lr(total_steps=steps, lagged=True))
  for name, (controller, theta, config) in trained.items():
    out[name] = lambda _, c=controller, t=theta, m=config: meta_lr.learned_lr_tx(c, t, m, steps)
  return out


def check_pretrained_is_shipped(shipped, steps: int = 100) -> None:
  """``pretrained_lr`` on the base direction makes the updates of the "shipped controller"
  method, so the lagged method differs from it by the lag alone."""
  s_controller, s_theta, s_config = shipped
  ours = meta_lr.learned_lr_tx(s_controller, s_theta, s_config, steps)
  theirs = optax.chain(s_config.optimizer.direction(eps_root=1e-8, total_steps=steps),
                       pretrained_lr(total_steps=steps))
  params = jnp.ones(3)
  a, b = ours.init(params), theirs.init(params)
  for t in range(30):
    grad, loss = jnp.sin(jnp.arange(3.0) + t), 2.0 / (1.0 + 0.1 * t)
    ua, a = ours.update(grad, a, params, value=loss)
    ub, b = theirs.update(grad, b, params, value=loss)
    np.testing.assert_allclose(ua, ub, rtol=1e-6)


def evaluate(task_config: TaskConfig, seeds: int, shipped, trained: dict,
             with_lagged: bool = False) -> dict:
  """Final validation and test accuracy of every method, one entry per seed."""
  task = make_task(task_config)
  steps = task_config.total_steps
  keys = seed_keys(seeds, task_config.seed)
  out = {}
  for name, make_tx in methods(steps, shipped, trained, with_lagged).items():
    res, _ = train_grid(task, make_tx, jnp.zeros(seeds), keys, steps=steps,
                        eval_every=steps // 10, vectorize=task_config.model in VMAPPED)
    out[name] = dict(val=res.val_accuracy[:, -1].tolist(), test=res.test_accuracy[:, -1].tolist())
  return out


def add_variants_arg(parser):
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help=f"comma-separated variants to meta-train and evaluate, of: "
                           f"{', '.join(VARIANTS)} (default: all; \"\": none)")
  parser.add_argument("--lagged", action="store_true",
                      help="also the shipped controller with its LR lagged one step")


def main():
  args = common.parse_args(__doc__.splitlines()[0], add_variants_arg)
  keys = [k for k in args.variants.split(",") if k]
  unknown = [k for k in keys if k not in VARIANTS]
  if unknown or not (keys or args.lagged):
    print(f"--variants {args.variants!r}: accepted: {', '.join(VARIANTS)}", file=sys.stderr)
    raise SystemExit(2)
  base = default_config().meta
  seeds = 1 if args.quick else 3
  validation, heldout = VALIDATION, HELDOUT
  if args.quick:
    base = dataclasses.replace(base, meta_steps=8)
    validation, heldout = [c._replace(total_steps=100) for c in VALIDATION[:1]], []
  saved = load_controller()
  shipped = (saved.controller, saved.theta, meta_lr.config_of_saved(base, saved))
  config = dataclasses.replace(base, learning_rate=1.0)
  trained, record = {}, {}
  variants = {VARIANTS[k][0]: VARIANTS[k] for k in keys}
  for name, (_, changes) in variants.items():
    start = time.perf_counter()
    meta_config = dataclasses.replace(config, **changes)
    if args.quick:  # a smoke test: every variant meta-trains briefly
      meta_config = dataclasses.replace(meta_config, meta_steps=base.meta_steps)
    meta = meta_lr.meta_train(meta_config, progress=False)
    seconds = time.perf_counter() - start
    print(f"meta-trained the {name} in {seconds:.0f} s ({meta.skipped_members} inner runs "
          "dropped)", flush=True)
    trained[name] = (meta.controller, meta.theta, meta_config)
    # How far meta-training moved the multiplier: the lanes' mean LR over the first and
    # the last 10% of meta steps, over the base LR (1.0 is the untrained controller).
    lrs = [row["mean_lr"] / meta_config.learning_rate for row in meta.history
           if row["mean_lr"] is not None]
    tenth = max(1, len(lrs) // 10)
    record[name] = dict(meta_train_seconds=seconds, skipped_members=meta.skipped_members,
                        mean_multiplier_first=float(np.mean(lrs[:tenth])),
                        mean_multiplier_last=float(np.mean(lrs[-tenth:])))
    print(f"  mean multiplier {record[name]['mean_multiplier_first']:.3f} over the first and "
          f"{record[name]['mean_multiplier_last']:.3f} over the last tenth of meta steps")
  if args.lagged:
    check_pretrained_is_shipped(shipped)
  result = dict(meta_training=record, seeds=seeds, margin=MARGIN, validation={}, heldout={})
  for split, configs in (("validation", validation), ("heldout", heldout)):
    for task_config in configs:
      start = time.perf_counter()
      result[split][task_config.name] = evaluate(task_config, seeds, shipped, trained,
                                                 args.lagged)
      print(task_config.name, {k: round(float(np.mean(v["val" if split == "validation" else "test"])), 4)
                               for k, v in result[split][task_config.name].items()},
            f"{time.perf_counter() - start:.0f} s", flush=True)

  names = list(methods(10, shipped, trained, args.lagged))
  for split, metric in (("validation", "val"), ("heldout", "test")):
    if not result[split]:
      continue
    rows = [[task] + [f"{np.mean(r[n][metric]):.4f} ± {np.std(r[n][metric]):.4f}" for n in names]
            for task, r in result[split].items()]
    means = {n: float(np.mean([np.mean(r[n][metric]) for r in result[split].values()]))
             for n in names}
    result[f"{split}_means"] = means
    rows.append(["mean"] + [f"{means[n]:.4f}" for n in names])
    print(f"\nFinal {metric} accuracy on the {split} tasks, mean ± std over {seeds} seeds\n")
    print(common.table([f"{split} task", *names], rows))
  means = result["validation_means"]
  verdicts = {}
  for name in variants:
    # rival -> the margin to beat it by. The first variant's rule as written before its
    # first run; since then a variant must beat every other single run of the benchmark.
    margins = ({"shipped controller": MARGIN, "Prodigy": 0.0} if name == FIRST_VARIANT
               else {n: MARGIN for n in means if n not in trained and n != LAGGED})
    gains = {r: means[name] - means[r] for r in margins}
    replace = all(gains[r] >= m for r, m in margins.items())
    verdicts[name] = dict(gains=gains, replace=replace)
    print(f"validation, {name}: " + ", ".join(f"{g:+.4f} over {r}" for r, g in gains.items())
          + f": {'replace' if replace else 'keep the shipped controller'}")
  if args.lagged:
    gap = means[LAGGED] - means["shipped controller"]
    verdicts[LAGGED] = dict(gain_over_shipped=gap, adoptable=gap >= -MARGIN)
    print(f"validation, {LAGGED}: {gap:+.4f} over the shipped controller: "
          + ("adoptable" if gap >= -MARGIN else f"more than {MARGIN:g} below"))
  result.update(verdicts=verdicts)
  suffix = "+".join(keys + ["lagged"] * args.lagged)
  name = NAME if len(keys) == len(VARIANTS) and not args.lagged else f"{NAME}.{suffix}"
  print(f"wrote {common.write_json(name, result, quick=args.quick)}")


if __name__ == "__main__":
  main()
