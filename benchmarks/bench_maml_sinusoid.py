"""Quality: MAML vs joint pre-training on sinusoid regression, query MSE after 5 steps, over seeds.

Per seed: a 2x40 ReLU MLP meta-trained with second-order MAML (5 inner SGD steps at
0.01, K = 10, meta-batch 25, Adam 1e-3) and, from the same initial weights, the same
number of Adam(1e-3) steps of joint pre-training on the pooled support and query
points of 25 tasks per step (the MAML paper's "pretrained" baseline). Both are then
adapted on 1,000 unseen tasks with 5 SGD steps on K = 10 points and scored on 100
query points. Fine-tuning the pre-trained net at 0.01 is the like-for-like number;
the best of several fine-tuning LRs for it is also reported (tuned on other tasks).
Target (issue 4): MAML's query MSE after 5 steps below joint pre-training's.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import common
from metaopt.meta.maml import maml, meta_train_maml, pretrain
from metaopt.tasks.fewshot import SinusoidFamily, mse_loss
from metaopt.tasks.models import MLP

NAME = "bench_maml_sinusoid"
INNER_LR, STEPS, K, META_BATCH = 0.01, 5, 10, 25
FINETUNE_LRS = (0.001, 0.003, 0.01, 0.03, 0.1)
EVAL_TASKS, EVAL_QUERY = 1000, 100


def main():
  def extra(p):
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--iterations", type=int, default=5000)
  args = common.parse_args(__doc__.splitlines()[0], extra)
  if args.quick:
    args.seeds, args.iterations = 2, 200
  model = MLP(hidden=(40, 40), num_classes=1)
  loss_fn = mse_loss(model)
  train_family = SinusoidFamily(k_shot=K, num_query=K)
  eval_family = SinusoidFamily(k_shot=K, num_query=EVAL_QUERY)
  learner = lambda lr: maml(loss_fn, inner_lr=lr, inner_steps=STEPS)
  evaluate = {lr: jax.jit(learner(lr).evaluate) for lr in FINETUNE_LRS}
  per_seed = []
  for seed in range(args.seeds):
    params = model.init(jax.random.key(seed), jnp.zeros((1, 1)))["params"]
    m = learner(INNER_LR)
    start = time.perf_counter()
    state, history = meta_train_maml(m, m.init(params), lambda k: train_family.sample(k, META_BATCH),
                                key=jax.random.key(1000 + seed), iterations=args.iterations,
                                chunk=500)
    maml_time = time.perf_counter() - start

    def pooled(k):
      support, query = train_family.sample(k, META_BATCH)
      return jax.tree.map(lambda s, q: jnp.concatenate([s, q], 1).reshape(-1, 1), support, query)
    start = time.perf_counter()
    pre, _ = pretrain(loss_fn, params, pooled, key=jax.random.key(2000 + seed),
                      steps=args.iterations, chunk=500)
    pre_time = time.perf_counter() - start
    # Fine-tuning LR for the pre-trained net: chosen on 200 tuning tasks, scored on fresh ones.
    tune = eval_family.sample(jax.random.key(3000 + seed), 200)
    tune_mse = {lr: float(evaluate[lr](m.init(pre), *tune)["loss"].mean()) for lr in FINETUNE_LRS}
    best_lr = min(tune_mse, key=tune_mse.get)
    test = eval_family.sample(jax.random.key(4000 + seed), EVAL_TASKS)
    ev_maml = evaluate[INNER_LR](state, *test)
    ev_pre = evaluate[INNER_LR](m.init(pre), *test)
    ev_pre_tuned = evaluate[best_lr](m.init(pre), *test)
    row = dict(seed=seed, maml=float(ev_maml["loss"].mean()),
               maml_before=float(ev_maml["loss_before"].mean()),
               pretrained=float(ev_pre["loss"].mean()),
               pretrained_tuned=float(ev_pre_tuned["loss"].mean()), tuned_lr=best_lr,
               maml_seconds=maml_time, pretrain_seconds=pre_time,
               final_meta_loss=float(history["query_loss"][-100:].mean()))
    per_seed.append(row)
    print(f"seed {seed}: MAML {row['maml']:.3f}  pre-trained@0.01 {row['pretrained']:.3f}  "
          f"pre-trained@{best_lr} {row['pretrained_tuned']:.3f}  "
          f"({maml_time:.0f} s / {pre_time:.0f} s)", flush=True)

  def summary(key):
    xs = np.array([r[key] for r in per_seed])
    return dict(mean=float(xs.mean()), std=float(xs.std(ddof=1)) if len(xs) > 1 else 0.0,
                min=float(xs.min()), max=float(xs.max()))
  summaries = {k: summary(k) for k in ("maml", "pretrained", "pretrained_tuned", "maml_before")}
  wins = sum(r["maml"] < r["pretrained_tuned"] for r in per_seed)
  passed = summaries["maml"]["mean"] < summaries["pretrained_tuned"]["mean"] and wins == len(
      per_seed)
  print(f"\nquery MSE after {STEPS} steps, {EVAL_TASKS} tasks x {args.seeds} seeds "
        f"({args.iterations} meta-iterations)")
  print(common.table(["method", "mean", "std over seeds", "min", "max"],
                     [[k, f"{s['mean']:.3f}", f"{s['std']:.3f}", f"{s['min']:.3f}",
                       f"{s['max']:.3f}"] for k, s in summaries.items()]))
  print(f"MAML below tuned joint pre-training on {wins}/{len(per_seed)} seeds: "
        f"{'PASS' if passed else 'FAIL'}")
  path = common.write_json(NAME, dict(iterations=args.iterations, per_seed=per_seed,
                                      summary=summaries, wins=wins, passed=passed),
                           quick=args.quick)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
