"""Per-step cost of hypergradient Adam versus plain optax.adam.

Candidates: metaopt's fused ``hypergradient_adam(1e-3)`` (one-step-lagged LR,
no extra buffer) and the exact generic wrapper
``hypergradient_lr(optax.scale_by_adam(), 1e-3, beta=1e-7)``.
Reference: ``optax.adam(1e-3)``.
All run the same jitted training step (sample batch, forward, backward, update)
as a lax.scan of STEPS steps via metaopt.train.training_step + metaopt.unroll,
compiled before timing and measured in interleaved rounds (A B C A B C ...).
Target: fused / adam <= 1.03 on the main size (mnist5k MLP 784-256-256-10,
batch 128). The generic wrapper's ratio is recorded, not targeted.
"""

from __future__ import annotations

import optax

import common
from metaopt.schedules.hypergradient import hypergradient_adam, hypergradient_lr
from metaopt.tasks import TaskConfig, make_task

NAME = "hypergradient_overhead"
TARGET = 1.03
LR, BETA = 1e-3, 1e-7
SIZES = {  # label -> task; the target applies to "main"
    "main": TaskConfig("mnist5k", "mlp", 256, 2, 128, 1000, 0),   # 784-256-256-10
    "small": TaskConfig("digits", "mlp", 64, 1, 32, 1000, 0),     # 64-64-10
}
CANDIDATES = {
    "adam": lambda: optax.adam(LR),
    "hd_adam_fused": lambda: hypergradient_adam(LR, beta=BETA),
    "hd_generic": lambda: hypergradient_lr(optax.scale_by_adam(), LR, beta=BETA),
}


def main():
  args = common.parse_args(__doc__.splitlines()[0])
  steps = 20 if args.quick else 200
  results, rows, notes = {}, [], []
  status_main = None
  for label, config in SIZES.items():
    task = make_task(config)
    fns = {name: common.scanned_training(task, make(), steps) for name, make in CANDIDATES.items()}
    stats = common.interleaved(fns, repeats=args.repeats)
    per_step = {k: v["median"] / steps for k, v in stats.items()}
    ratios = {}
    for cand in ("hd_adam_fused", "hd_generic"):
      r = common.ratio(stats, cand, "adam")
      ratios[cand] = r
      targeted = label == "main" and cand == "hd_adam_fused"
      status = common.verdict(r["ratio"], TARGET) if targeted else "(recorded)"
      if targeted:
        status_main = status
      rows.append([f"{label}: {config.name}", cand, common.fmt_time(per_step[cand]),
                   common.fmt_time(per_step["adam"]),
                   f"{(per_step[cand] - per_step['adam']) * 1e6:+.1f} us",
                   f"{r['ratio']:.3f}", f"{r['paired_median']:.3f}",
                   f"{max(s['spread'] for s in stats.values()):.1%}", status])
    results[label] = dict(task=config._asdict(), steps_per_call=steps, stats=stats,
                          ratios=ratios, per_step_seconds=per_step,
                          target=TARGET if label == "main" else None)
    if note := common.spread_note(stats):
      notes.append(f"{label}: {note}")

  print(f"\nHypergradient overhead per training step ({steps}-step lax.scan, median of "
        f"{args.repeats} interleaved repeats; target fused/adam <= {TARGET} on main)\n")
  print(common.table(["size", "candidate", "candidate / step", "adam / step", "extra / step",
                      "ratio", "paired ratio", "max IQR/med", "target"], rows))
  for note in notes:
    print(note)
  print(f"\n{status_main}: hd_adam_fused / adam = {results['main']['ratios']['hd_adam_fused']['ratio']:.3f}"
        f" (paired {results['main']['ratios']['hd_adam_fused']['paired_median']:.3f}), "
        f"target <= {TARGET}" + (" [--quick: not meaningful]" if args.quick else ""))
  path = common.write_json(NAME, dict(quick=args.quick, repeats=args.repeats, target=TARGET,
                                      status=status_main, results=results))
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
