"""Why Prodigy leaves the BERT-style encoder at chance: its step-size estimate on a plateau.

Every Prodigy and D-Adaptation run of the lr-schedule experiment ends its held-out encoder
task at chance (test accuracy 0.50) while Adam at 1e-3 reaches 0.88. This traces Prodigy's
D estimate (``estim_lr``, read from the state every step) and the training loss on
*validation* encoders: the generated sentiment task at another seed (another vocabulary,
other reviews and held-out phrasings) and at shapes other than the held-out task's.

Compared, same seeds (3 each): Adam 1e-3; Prodigy at its defaults (``estim_lr0=1e-6``);
Prodigy with its linear decay (``prodigy_linear_decay``); Prodigy started from larger
estimates, ``estim_lr0`` in {1e-5, 1e-4}; and Prodigy with the whole schedule its docstring
recommends, a warmup (5% or 10% of the run, within the recommended 0-20%; with
``safeguard_warmup=True``, which the Prodigy authors advise with a warmup) then the linear
decay. For reference, D-Adaptation AdamW (its D estimate is traced the same way) and
schedule-free AdamW (no estimate), at their defaults. Reported per method: the step at
which the training loss leaves the plateau (its mean over the last 25 steps first below
0.6, against ln 2 = 0.693 at chance), the D estimate at steps 100 and 300 and at the end,
and the final validation accuracy.
"""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np
import optax

import common
from metaopt.experiments.protocol import seed_keys
from metaopt.schedules.baselines import self_tuning
from metaopt.tasks import TaskConfig, make_task
from metaopt.train import train_grid

NAME = "bench_prodigy_plateau"
# Not the held-out encoder (sentiment_synth bert 32x2, batch 32, 600 steps, dataset seed 0).
TASKS = (TaskConfig("sentiment_synth", "bert", 48, 1, 32, 600, 1),
         TaskConfig("sentiment_synth", "bert", 64, 2, 32, 600, 1))
PLATEAU_LOSS = 0.6
WINDOW = 25
WARMUPS = (0.05, 0.1)  # fractions of the run, within the docstring's 0-20%


def methods(steps: int) -> dict:
  """name -> make_tx(_)."""
  return {
      "Adam 1e-3": lambda _: optax.adam(1e-3),
      "Prodigy": lambda _: self_tuning("prodigy"),
      # Not self_tuning("prodigy_linear_decay"), whose traced LR is D times the decay.
      "Prodigy, linear decay": lambda _: optax.contrib.prodigy(
          learning_rate=optax.linear_schedule(1.0, 0.0, steps)),
      "Prodigy, estim_lr0=1e-5": lambda _: optax.contrib.prodigy(estim_lr0=1e-5),
      "Prodigy, estim_lr0=1e-4": lambda _: optax.contrib.prodigy(estim_lr0=1e-4),
      **{f"Prodigy, {100 * w:g}% warmup, linear decay": lambda _, w=w: optax.contrib.prodigy(
          learning_rate=warmup_linear_decay(w, steps), safeguard_warmup=True)
         for w in WARMUPS},
      # The other estimate-based baseline, and the one self-tuning run that trains the
      # held-out encoder.
      "D-Adaptation AdamW": lambda _: self_tuning("dadapt_adamw"),
      "schedule-free AdamW": lambda _: self_tuning("schedule_free_adamw"),
  }


def warmup_linear_decay(warmup: float, steps: int) -> optax.Schedule:
  """0 -> 1 linearly over the first ``warmup`` of ``steps``, then 1 -> 0 linearly."""
  n = max(1, int(warmup * steps))
  return optax.join_schedules([optax.linear_schedule(0.0, 1.0, n),
                               optax.linear_schedule(1.0, 0.0, steps - n)], [n])


def escape_step(train_loss: np.ndarray) -> float:
  """First step whose trailing WINDOW-step mean training loss is below PLATEAU_LOSS
  (NaN: never)."""
  means = np.convolve(train_loss, np.ones(WINDOW) / WINDOW, mode="valid")
  below = np.flatnonzero(means < PLATEAU_LOSS)
  return float(below[0] + WINDOW - 1) if below.size else float("nan")


def evaluate(task_config: TaskConfig, seeds: int) -> dict:
  task = make_task(task_config)
  steps = task_config.total_steps
  out = {}
  for name, make_tx in methods(steps).items():
    res, _ = train_grid(task, make_tx, jnp.zeros(seeds), seed_keys(seeds, task_config.seed),
                        steps=steps, eval_every=steps // 10)
    lr = np.asarray(res.learning_rate)
    out[name] = dict(
        escape_step=[escape_step(np.asarray(loss)) for loss in res.train_loss],
        d_100=lr[:, 99].tolist(), d_300=lr[:, 299].tolist(), d_final=lr[:, -1].tolist(),
        val_accuracy=np.asarray(res.val_accuracy)[:, -1].tolist())
  return out


def cell(values, fmt: str) -> str:
  values = np.asarray(values, float)
  if np.all(np.isnan(values)):
    return "–"
  reached = values[~np.isnan(values)]
  never = f" ({values.size - reached.size} never)" if reached.size < values.size else ""
  return format(float(np.mean(reached)), fmt) + never


def main():
  args = common.parse_args(__doc__.splitlines()[0])
  seeds, tasks = (1, [TASKS[0]._replace(total_steps=300)]) if args.quick else (3, TASKS)
  result = dict(seeds=seeds, plateau_loss=PLATEAU_LOSS, window=WINDOW, tasks={})
  for task_config in tasks:
    start = time.perf_counter()
    result["tasks"][task_config.name] = rows = evaluate(task_config, seeds)
    table = [[name, cell(r["escape_step"], ".0f"), cell(r["d_100"], ".2e"),
              cell(r["d_300"], ".2e"),
              cell(r["d_final"], ".2e"), cell(r["val_accuracy"], ".4f")]
             for name, r in rows.items()]
    print(f"\n{task_config.name}, mean over {seeds} seeds "
          f"({time.perf_counter() - start:.0f} s)\n")
    print(common.table(["method", "leaves the plateau at step", "D at 100", "D at 300",
                        "final D", "final val acc"], table))
  result["summary"] = summary(result["tasks"])
  print(f"\nOver all {len(tasks)} tasks\n")
  print(common.table(["method", "runs that leave the plateau", "mean final val acc"],
                     [[name, f"{r['left_plateau']} of {r['runs']}", f"{r['val_accuracy']:.4f}"]
                      for name, r in result["summary"].items()]))
  print(f"wrote {common.write_json(NAME, result, quick=args.quick)}")


def summary(tasks: dict) -> dict:
  """Per method, over every task and seed: runs that left the plateau, and the mean of the
  tasks' mean final validation accuracy."""
  names = next(iter(tasks.values()))
  return {name: dict(
      runs=sum(len(t[name]["escape_step"]) for t in tasks.values()),
      left_plateau=int(sum(np.sum(~np.isnan(t[name]["escape_step"])) for t in tasks.values())),
      val_accuracy=float(np.mean([np.mean(t[name]["val_accuracy"]) for t in tasks.values()])))
      for name in names}


if __name__ == "__main__":
  main()
