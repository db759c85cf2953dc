"""Speed and quality: the speech recognizer (speech_ctc) on the spoken-word stand-in.

Speed, at tiny size (width 32, depth 1, batch 32) on the CPU: audio seconds per second
of one jitted training step with donated buffers (Adam, CTC loss, a random batch of 32
training utterances), and of the input pipeline alone (every batch of 32 of the training
split's raw audio in turn, log-mel features in one jitted call per batch, padded to the
dataset's fixed frame count), timed interleaved. Both count the same unpadded audio: an
utterance's frames x the 10 ms hop, the training step by the training split's mean.
Target (issue 11): the pipeline at least 3x faster than training.

Quality: a ``--width`` x ``--depth`` recognizer trained with Adam (warmup + cosine) on
``spoken_words`` (generated here, formant synthesizer unless espeak-ng is installed),
word error rate of greedy decoding on the test split (held-out speakers; half of its
utterances hold word pairs never seen in training). Target: WER < 20% in under
10 minutes of wall time on 2 CPU cores, data generation and compilation included.
The load average and the process's CPU seconds are recorded: other processes share the
cores, and CPU seconds / 2 is what the run would take on 2 idle cores.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
import optax

import common
from metaopt.tasks import TaskConfig, make_task
from metaopt.tasks import speech

NAME = "bench_speech"


def train_chunk(task, tx, chunk: int):
  """``run(params, opt_state, key, arrays) -> (params, opt_state, losses)``: ``chunk``
  training steps in one jitted call with params and optimizer state donated."""
  def step(carry, key):
    params, opt_state = carry
    batch = task.sample_batch(arrays_holder[0], key)
    loss, grads = jax.value_and_grad(task.loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  arrays_holder = [None]

  def run(params, opt_state, key, arrays):
    arrays_holder[0] = arrays
    keys = jax.random.split(key, chunk)
    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), keys)
    return params, opt_state, losses

  return jax.jit(run, donate_argnums=(0, 1))


def speed(args) -> dict:
  """Audio seconds per second: one training step vs the feature pipeline alone."""
  load_start = os.getloadavg()
  task = make_task(TaskConfig("spoken_words", "speech_ctc", width=32, depth=1,
                              batch_size=32, total_steps=1, seed=0))
  utt = speech.generate_utterances(speech.SPOKEN_WORDS["spoken_words"][0], seed=0,
                                   synthesizer=task.data.info["synthesizer"])
  max_frames = task.data.info["max_frames"]
  hop = speech.LogMelConfig().hop_length
  # The pipeline reads the training split in batches of 32 (the last partial batch
  # dropped, as speech_batches does); one call is one pass over all of them.
  train_audio = [utt.audio[i] for i in np.flatnonzero(utt.split == 0)]
  batches = [train_audio[i:i + 32] for i in range(0, len(train_audio) - 31, 32)]
  frame_counts = [speech.num_frames(len(a)) for b in batches for a in b]
  audio_seconds = sum(frame_counts) * hop / speech.SAMPLE_RATE

  def pipeline():
    return [speech.batch_log_mel(b, speech.SAMPLE_RATE, max_frames=max_frames)["features"]
            for b in batches]

  tx = optax.adam(1e-3)
  run = train_chunk(task, tx, 1)
  arrays = task.arrays()
  params = task.init(jax.random.PRNGKey(0))
  state = {"params": params, "opt": tx.init(params), "i": 0}
  # A step trains on a random batch of the training split: count its expected audio
  # seconds from the split's frame counts (unpadded), as for the pipeline.
  mean_frames = float(np.mean(task.data.x_train["lengths"]))
  step_audio_seconds = 32 * mean_frames * hop / speech.SAMPLE_RATE
  if abs(mean_frames / np.mean(frame_counts) - 1) > 0.02:
    raise RuntimeError("the pipeline's utterances are not the training split's")

  def train():
    state["i"] += 1
    state["params"], state["opt"], losses = run(state["params"], state["opt"],
                                                jax.random.PRNGKey(state["i"]), arrays)
    return losses

  stats = common.interleaved({"train_step": train, "pipeline": pipeline},
                             repeats=args.repeats)
  train_rate = step_audio_seconds / stats["train_step"]["median"]
  pipe_rate = audio_seconds / stats["pipeline"]["median"]
  paired = np.median(np.asarray(stats["train_step"]["samples"]) / step_audio_seconds
                     / (np.asarray(stats["pipeline"]["samples"]) / audio_seconds))
  return dict(train_audio_seconds_per_second=train_rate,
              train_step_audio_seconds=step_audio_seconds,
              pipeline_batches=len(batches), pipeline_audio_seconds=audio_seconds,
              pipeline_seconds_per_batch=stats["pipeline"]["median"] / len(batches),
              loadavg_start=list(load_start), loadavg_end=list(os.getloadavg()),
              pipeline_audio_seconds_per_second=pipe_rate,
              pipeline_over_training=pipe_rate / train_rate,
              pipeline_over_training_paired=float(paired),
              stats={k: {kk: vv for kk, vv in v.items() if kk != "samples"}
                     for k, v in stats.items()},
              note=common.spread_note(stats))


def quality(args) -> dict:
  """Train on spoken_words and score WER on the held-out test split."""
  start, cpu_start = time.perf_counter(), time.process_time()
  load_start = os.getloadavg()
  task = make_task(TaskConfig("spoken_words", "speech_ctc", width=args.width, depth=args.depth,
                              batch_size=args.batch, total_steps=args.steps, seed=0))
  data_seconds = time.perf_counter() - start
  schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(300, args.steps // 10),
                                                args.steps, args.lr * 0.05)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))
  chunk = min(args.chunk, args.steps)
  run = train_chunk(task, tx, chunk)
  arrays = task.arrays()
  params = task.init(jax.random.PRNGKey(0))
  opt_state = tx.init(params)
  evaluate = jax.jit(lambda p, x, y: task.metrics(p, x, y))
  curve = []
  for i in range(args.steps // chunk):
    params, opt_state, losses = run(params, opt_state, jax.random.PRNGKey(i + 1), arrays)
    val = evaluate(params, arrays["x_val"], arrays["y_val"])
    curve.append(dict(step=(i + 1) * chunk, train_loss=float(losses.mean()),
                      val_loss=float(val["loss"]), val_wer=float(val["wer"]),
                      seconds=time.perf_counter() - start))
    print(curve[-1], flush=True)
  test = evaluate(params, arrays["x_test"], arrays["y_test"])
  seconds = time.perf_counter() - start
  cpu_seconds = time.process_time() - cpu_start
  # Host-side check: transcripts and numpy WER, overall and on held-out word pairs.
  logits, paddings = task.model.apply({"params": params}, arrays["x_test"])
  hyps = speech.transcribe(logits, paddings)
  refs = task.data.info["texts"]["test"]
  held = [i for i, r in enumerate(refs) if any(
      speech._held_out_pair(speech.WORDS.index(a), speech.WORDS.index(b))
      for a, b in zip(r.split(), r.split()[1:]))]
  return dict(width=args.width, depth=args.depth, batch=args.batch, steps=args.steps,
              lr=args.lr, synthesizer=task.data.info["synthesizer"],
              train_utterances=task.data.num_examples("train"),
              test_utterances=task.data.num_examples("test"),
              test_wer=float(test["wer"]),
              test_wer_host=speech.word_error_rate(refs, hyps),
              held_out_pairs_wer=speech.word_error_rate([refs[i] for i in held],
                                                        [hyps[i] for i in held]),
              held_out_pair_utterances=len(held),
              examples=[dict(ref=refs[i], hyp=hyps[i]) for i in range(8)],
              seconds=seconds, cpu_seconds=cpu_seconds, data_seconds=data_seconds,
              loadavg_start=list(load_start), loadavg_end=list(os.getloadavg()),
              curve=curve)


def main():
  def extra(p):
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--chunk", type=int, default=250)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-quality", action="store_true")
  args = common.parse_args(__doc__.splitlines()[0], extra)
  if args.quick:
    args.steps, args.chunk, args.width = 100, 50, 32
  out = {}
  if not args.skip_speed:
    out["speed"] = speed(args)
    s = out["speed"]
    print(common.table(
        ["train audio s/s", "pipeline audio s/s", "pipeline / train", "paired", "target >= 3"],
        [[f"{s['train_audio_seconds_per_second']:.0f}",
          f"{s['pipeline_audio_seconds_per_second']:.0f}",
          f"{s['pipeline_over_training']:.2f}", f"{s['pipeline_over_training_paired']:.2f}",
          "pass" if s["pipeline_over_training"] >= 3 else "FAIL"]]))
    st = s["stats"]
    print(f"median train step {st['train_step']['median'] * 1e3:.1f} ms (spread "
          f"{st['train_step']['spread']:.0%}), pipeline {s['pipeline_seconds_per_batch'] * 1e3:.1f}"
          f" ms per batch (spread {st['pipeline']['spread']:.0%}), load average "
          f"{s['loadavg_start'][0]:.2f} -> {s['loadavg_end'][0]:.2f}")
    if s["note"]:
      print(s["note"])
  if not args.skip_quality:
    out["quality"] = q = quality(args)
    print(common.table(
        ["model", "steps", "test WER", "held-out pairs WER", "wall s", "CPU s", "load avg",
         "target"],
        [[f"{q['width']}x{q['depth']}", q["steps"], f"{q['test_wer']:.3f}",
          f"{q['held_out_pairs_wer']:.3f}", f"{q['seconds']:.0f}", f"{q['cpu_seconds']:.0f}",
          f"{q['loadavg_start'][0]:.1f} -> {q['loadavg_end'][0]:.1f}",
          "pass" if q["test_wer"] < 0.2 and q["seconds"] < 600 else "FAIL"]]))
  path = common.write_json(NAME, out, quick=args.quick)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
