"""Per-step cost of training with the learned LR transform versus plain Adam + cosine.

Candidate: optax.chain(scale_by_adam(), metaopt.scale_by_learned_lr(LRController(),
theta, learning_rate=1e-3, total_steps=N)), theta random (non-zero output layer).
Reference: optax.adam(optax.cosine_decay_schedule(1e-3, N)).
Both run the same jitted training step (sample batch, forward, backward, update)
as a lax.scan of STEPS steps via metaopt.train.training_step + metaopt.unroll.
Target: ratio <= 1.05 on the main size (mnist5k MLP 784-256-256-10, batch 128).
"""

from __future__ import annotations

import jax
import optax

import common
import metaopt
from metaopt.tasks import TaskConfig, make_task

NAME = "bench_learned_lr_overhead"
TARGET = 1.05
TOTAL_STEPS = 1000  # N: horizon of both schedules
SIZES = {  # label -> task; the target applies to "main"
    "main": TaskConfig("mnist5k", "mlp", 256, 2, 128, TOTAL_STEPS, 0),   # 784-256-256-10
    "small": TaskConfig("digits", "mlp", 64, 1, 32, TOTAL_STEPS, 0),     # 64-64-10
}


def main():
  args = common.parse_args(__doc__.splitlines()[0])
  steps = 20 if args.quick else 200
  controller = metaopt.LRController()
  theta = common.random_theta(metaopt.init_controller(jax.random.PRNGKey(0), controller),
                              jax.random.PRNGKey(42))
  results, rows, notes = {}, [], []
  for label, config in SIZES.items():
    task = make_task(config)
    learned = optax.chain(optax.scale_by_adam(), metaopt.scale_by_learned_lr(
        controller, theta, learning_rate=1e-3, total_steps=TOTAL_STEPS))
    reference = optax.adam(optax.cosine_decay_schedule(1e-3, TOTAL_STEPS))
    stats = common.interleaved({"learned_lr": common.scanned_training(task, learned, steps),
                                "adam_cosine": common.scanned_training(task, reference, steps)},
                               repeats=args.repeats)
    r = common.ratio(stats, "learned_lr", "adam_cosine")
    per_step = {k: v["median"] / steps for k, v in stats.items()}
    status = common.verdict(r["ratio"], TARGET) if label == "main" else "(recorded)"
    rows.append([f"{label}: {config.name}", common.fmt_time(per_step["learned_lr"]),
                 common.fmt_time(per_step["adam_cosine"]),
                 f"{(per_step['learned_lr'] - per_step['adam_cosine']) * 1e6:+.1f} us",
                 f"{r['ratio']:.3f}", f"{r['paired_median']:.3f}",
                 f"{max(s['spread'] for s in stats.values()):.1%}", status])
    results[label] = dict(task=config._asdict(), steps_per_call=steps, stats=stats, ratio=r,
                          per_step_seconds=per_step, target=TARGET if label == "main" else None,
                          status=status)
    if note := common.spread_note(stats):
      notes.append(f"{label}: {note}")

  print(f"\nLearned-LR overhead per training step ({steps}-step lax.scan, "
        f"median of {args.repeats} interleaved repeats; target ratio <= {TARGET} on main)\n")
  print(common.table(["size", "learned LR / step", "adam+cosine / step", "extra / step",
                      "ratio", "paired ratio", "max IQR/med", "target"], rows))
  for note in notes:
    print(note)
  path = common.write_json(NAME, dict(repeats=args.repeats, results=results), quick=args.quick)
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
