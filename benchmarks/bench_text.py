"""Text: BERT-style encoder speed (training vs input pipeline) and accuracy on the stand-in.

Speed, the tiny encoder on the CPU (hidden 64, 2 layers, 4 heads, 24 tokens, batch 64):
- training: one jitted step (forward, backward, AdamW update) with the parameters and
  optimizer state donated (checked: the old buffers are deleted after a call), on
  batches already on the device; tokens/s = batch * 24 / time per step;
- input pipeline alone: ``metaopt.tasks.text.text_batches`` over the stand-in's raw
  training texts (grain: seeded shuffle, WordPiece tokenization, padding, batching,
  prefetch), 2 threads; tokens/s over whole batches.
Both are timed interleaved (A B A B ...). Target: pipeline tokens/s >= 3 x training's.

Quality: ``train_grid`` (one compiled program, as the experiments run it) on
``sentiment_synth``, AdamW with warmup + cosine; test accuracy on the held-out
phrasings. Target: >= 90% in under 10 minutes wall time including data generation
and compilation, on this machine's 2 shared cores (load average recorded).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import common
import metaopt.tasks.text as text
from metaopt.tasks import TaskConfig, make_task
from metaopt.train import train_grid

NAME = "bench_text"
PIPELINE_TARGET = 3.0
ACCURACY_TARGET, MINUTES_TARGET = 0.90, 10.0
WIDTH, DEPTH, BATCH, STEPS, LR = 64, 2, 64, 1500, 1e-3


def make_tx(steps):
  schedule = optax.warmup_cosine_decay_schedule(0.0, 1.0, steps // 10, steps)
  return lambda h: optax.adamw(lambda s: h["lr"] * schedule(s), weight_decay=0.01)


def speed(args) -> dict:
  task = make_task(TaskConfig("sentiment_synth", "bert", WIDTH, DEPTH, BATCH, 1000, 0))
  tx = make_tx(1000)({"lr": LR})
  arrays = task.arrays()
  per_call = 5 if args.quick else 20  # batches per timed call, for both candidates
  keys = jax.random.split(jax.random.PRNGKey(0), per_call)
  batches = [task.sample_batch(arrays, k) for k in keys]

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(task.loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  jstep = jax.jit(step, donate_argnums=(0, 1))
  params = task.init(jax.random.PRNGKey(1))
  opt_state = tx.init(params)
  state = {"params": params, "opt": opt_state}
  old = jax.tree.leaves(params)[0]
  state["params"], state["opt"], _ = jstep(params, opt_state, batches[0])
  donated = bool(old.is_deleted())

  def train():
    loss = None
    for b in batches:
      state["params"], state["opt"], loss = jstep(state["params"], state["opt"], b)
    return loss

  texts = task.data.info["texts"]["train"]
  source = [{"text": t, "label": int(y)} for t, y in zip(texts, task.data.y_train)]
  split = text.TextSplit(source, np.arange(len(source)), "text")
  tokenizer = text.train_wordpiece(texts, vocab_size=1000)
  seeds = iter(range(10**9))

  def pipeline():
    it = iter(text.text_batches(split, tokenizer, max_len=text.SENTIMENT_SYNTH_MAX_LEN,
                                batch_size=BATCH, seed=next(seeds), num_threads=2))
    return [next(it) for _ in range(per_call)]

  stats = common.interleaved({"train": train, "pipeline": pipeline}, repeats=args.repeats)
  tokens = per_call * BATCH * text.SENTIMENT_SYNTH_MAX_LEN
  rate = {k: tokens / v["median"] for k, v in stats.items()}
  paired = 1.0 / common.ratio(stats, "pipeline", "train")["paired_median"]
  real = float(np.mean(task.data.x_train["attention_mask"].sum(1))) / text.SENTIMENT_SYNTH_MAX_LEN
  return dict(stats=stats, tokens_per_second=rate, pipeline_over_train=rate["pipeline"] / rate["train"],
              paired_pipeline_over_train=paired, donated=donated, batches_per_call=per_call,
              non_padding_fraction=real, note=common.spread_note(stats))


def quality(args) -> dict:
  steps = 150 if args.quick else STEPS
  load_before = os.getloadavg()
  start = time.perf_counter()
  text._sentiment_synth.cache_clear()  # time the data generation too
  task = make_task(TaskConfig("sentiment_synth", "bert", WIDTH, DEPTH, BATCH, steps, 0))
  result, run_seconds = train_grid(task, make_tx(steps), {"lr": jnp.array([LR])},
                                   jax.random.PRNGKey(0)[None], steps=steps,
                                   eval_every=steps // 10)
  wall = time.perf_counter() - start
  return dict(steps=steps, wall_seconds=wall, run_seconds=run_seconds,
              test_accuracy=float(result.test_accuracy[0, -1]),
              val_accuracy=float(result.val_accuracy[0, -1]),
              test_curve=result.test_accuracy[0].tolist(),
              val_curve=result.val_accuracy[0].tolist(),
              loadavg_before=list(load_before), loadavg_after=list(os.getloadavg()))


def main():
  args = common.parse_args(__doc__.splitlines()[0])
  s = speed(args)
  q = quality(args)
  pipe_ok = s["pipeline_over_train"] >= PIPELINE_TARGET and s["donated"]
  acc_ok = q["test_accuracy"] >= ACCURACY_TARGET and q["wall_seconds"] <= 60 * MINUTES_TARGET
  rows = [["training step (donated)", f"{s['tokens_per_second']['train']:,.0f}",
           common.fmt_time(s["stats"]["train"]["median"] / s["batches_per_call"]) + " / batch"],
          ["input pipeline alone", f"{s['tokens_per_second']['pipeline']:,.0f}",
           common.fmt_time(s["stats"]["pipeline"]["median"] / s["batches_per_call"]) + " / batch"]]
  print(f"\nTiny BERT (hidden {WIDTH}, {DEPTH} layers, batch {BATCH} x "
        f"{text.SENTIMENT_SYNTH_MAX_LEN} tokens), median of {args.repeats} interleaved rounds\n")
  print(common.table(["", "tokens / s", "time"], rows))
  if s["note"]:
    print(s["note"])
  print(f"\n{'PASS' if pipe_ok else 'FAIL'}: pipeline / training = {s['pipeline_over_train']:.1f}x "
        f"(paired {s['paired_pipeline_over_train']:.1f}x), target >= {PIPELINE_TARGET}x; "
        f"buffers donated: {s['donated']}")
  print(f"{'PASS' if acc_ok else 'FAIL'}: sentiment_synth held-out test accuracy "
        f"{q['test_accuracy']:.3f} (val {q['val_accuracy']:.3f}) after {q['steps']} steps in "
        f"{q['wall_seconds']:.0f} s wall (compiled run {q['run_seconds']:.0f} s), target >= "
        f"{ACCURACY_TARGET} in {MINUTES_TARGET:.0f} min; load average "
        f"{q['loadavg_before'][0]:.1f} -> {q['loadavg_after'][0]:.1f}"
        + (" [--quick: not meaningful]" if args.quick else ""))
  path = common.write_json(NAME, dict(speed=s, quality=q, pipeline_pass=pipe_ok,
                                      accuracy_pass=acc_ok), quick=args.quick)
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
