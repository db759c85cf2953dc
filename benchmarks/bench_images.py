"""Images (issue 11): training and input-pipeline throughput of the ResNets, and ResNet-18
on the MNIST-5k stand-in.

Throughput: for ResNet-18 and ResNet-50 at a tiny size (width 4, all four stages, CIFAR
shape 32x32x3, batch 64) on the CPU, images per second of the jitted training step
(``images.make_train_step``: forward, backward, SGD update, buffers donated; the batch is
already in memory) against images per second of the CIFAR-10 input pipeline alone
(``images.image_batches``: seeded shuffle, decode, batching, random crop + flip,
standardization, 4 prefetch threads) on ``tfds.testing.mock_data`` (no CIFAR here: the
mock builds random uint8 examples, so PNG decoding of real array_record files is not in
this number). Timings are interleaved (common.interleaved). Target: the pipeline >= 3x
training, for each model. Donation is checked: the state passed in must be deleted.

Quality: ResNet-18 (all four stages, width ``--width``, default 8) on ``mnist5k_28`` (3,000 train,
1,000 test images), SGD with Nesterov momentum 0.9, one-cycle cosine LR peaking at 0.1,
weight decay 5e-4, batch 128, random crops with 2 pixels of padding, ``--epochs``
epochs. Target: >= 97% test accuracy in < 10 minutes of wall time (compilation
included) on the 2-core machine; the load average is recorded.
"""

from __future__ import annotations

import os
import resource
import time

import jax
import numpy as np
import optax
import tensorflow_datasets as tfds

import common
from metaopt.tasks import images
from metaopt.tasks.resnet import resnet

NAME = "bench_images"
TARGET_RATIO = 3.0
TARGET_ACCURACY, TARGET_SECONDS = 0.97, 600.0


def throughput(kind: str, *, width: int, batch: int, repeats: int, mock_examples: int) -> dict:
  model = resnet(kind, width=width, depth=4, num_classes=10, image_shape=(32, 32, 3))
  tx = optax.sgd(0.01, momentum=0.9)
  with tfds.testing.mock_data(num_examples=mock_examples):
    it = iter(images.image_batches("cifar10", "train", batch_size=batch, num_epochs=None))
    first = next(it)
    state = images.init_train_state(model, tx, jax.random.key(0), first["x"][:1])
    step = images.make_train_step(model, tx)
    old = jax.tree.leaves(state)
    holder = [step(state, first)[0]]
    donated = all(leaf.is_deleted() for leaf in old)

    def train():
      holder[0], metrics = step(holder[0], first)
      return metrics

    def pipeline():
      return next(it)["x"]

    stats = common.interleaved({"train": train, "pipeline": pipeline}, repeats=repeats)
  train_ips = batch / stats["train"]["median"]
  pipe_ips = batch / stats["pipeline"]["median"]
  paired = np.median(np.asarray(stats["train"]["samples"]) /
                     np.asarray(stats["pipeline"]["samples"]))
  return dict(model=kind, width=width, batch=batch, donated=donated,
              train_images_per_s=train_ips, pipeline_images_per_s=pipe_ips,
              ratio=pipe_ips / train_ips, paired_ratio=float(paired), stats=stats)


def _cpu_seconds() -> float:
  """User + system CPU time of this process (all threads) so far."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def mnist_run(*, width: int, epochs: int, batch: int = 128, seed: int = 0,
              monitor: bool = False) -> dict:
  start = time.perf_counter()
  cpu_start = _cpu_seconds()
  load_before = os.getloadavg()
  data = images.load_standin("mnist5k_28", seed=seed)
  model = resnet("resnet18", width=width, depth=4, num_classes=10, image_shape=data.image_shape)
  steps_per_epoch = len(data.y_train) // batch
  total = epochs * steps_per_epoch
  schedule = optax.cosine_onecycle_schedule(total, 0.1, pct_start=0.2)
  tx = optax.chain(optax.add_decayed_weights(5e-4),
                   optax.sgd(schedule, momentum=0.9, nesterov=True))
  state = images.init_train_state(model, tx, jax.random.key(seed), data.x_train[:1])
  step = images.make_train_step(model, tx)
  evaluate = images.make_eval_step(model)
  background = float(data.x_train.min())  # the standardized value of a blank pixel
  rng = np.random.default_rng(seed)
  split = lambda x, y: [{"x": x[i:i + 500], "y": y[i:i + 500]} for i in range(0, len(y), 500)]
  val_batches = split(data.x_val, data.y_val)
  curve = []
  for epoch in range(epochs):
    order = rng.permutation(len(data.y_train))
    for i in range(steps_per_epoch):
      idx = order[i * batch:(i + 1) * batch]
      x = images.random_crop_flip(data.x_train[idx], rng, padding=2, flip=False,
                                  fill=background)
      state, metrics = step(state, {"x": x, "y": data.y_train[idx]})
    row = dict(epoch=epoch + 1, train_loss=float(metrics["loss"]))
    if monitor:  # its time is counted
      row["val_accuracy"] = evaluate(state, val_batches)["accuracy"]
    curve.append(dict(row, seconds=time.perf_counter() - start))
    print("  " + ", ".join(f"{k} {v:.4g}" for k, v in curve[-1].items()), flush=True)
  test = evaluate(state, split(data.x_test, data.y_test))
  val = evaluate(state, val_batches)
  seconds = time.perf_counter() - start
  return dict(width=width, epochs=epochs, steps=total, batch=batch, seed=seed,
              test_accuracy=test["accuracy"], val_accuracy=val["accuracy"],
              seconds=seconds, cpu_seconds=_cpu_seconds() - cpu_start,
              load_before=list(load_before), load_after=list(os.getloadavg()),
              curve=curve)


def main():
  def extra(p):
    p.add_argument("--width", type=int, default=8, help="ResNet-18 width on MNIST-5k")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--monitor", action="store_true", help="validation accuracy every epoch")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
  args = common.parse_args(__doc__.splitlines()[0], extra)
  if args.quick:
    args.epochs = 1
  results = {}
  if not args.skip_speed:
    rows = []
    for kind in ("resnet18", "resnet50"):
      r = throughput(kind, width=4, batch=64, repeats=args.repeats,
                     mock_examples=512 if args.quick else 4096)
      results[kind] = r
      rows.append([kind, r["width"], r["batch"], f"{r['train_images_per_s']:.0f}",
                   f"{r['pipeline_images_per_s']:.0f}", f"{r['ratio']:.1f}x",
                   f"{r['paired_ratio']:.1f}x", r["donated"],
                   common.verdict(-r["paired_ratio"], -TARGET_RATIO)])
      print(f"{kind}: train {r['train_images_per_s']:.0f} img/s, pipeline "
            f"{r['pipeline_images_per_s']:.0f} img/s", flush=True)
    print(common.table(["model", "width", "batch", "train img/s", "pipeline img/s", "ratio",
                        "paired", "donated", f"target {TARGET_RATIO}x"], rows))
    print(common.spread_note({f"{k} {n}": v for k in ("resnet18", "resnet50")
                              for n, v in results[k]["stats"].items()}))
  if not args.skip_quality:
    print(f"ResNet-18 width {args.width} on mnist5k_28, {args.epochs} epochs:", flush=True)
    q = mnist_run(width=args.width, epochs=args.epochs, monitor=args.monitor)
    results["mnist5k_resnet18"] = q
    ok = q["test_accuracy"] >= TARGET_ACCURACY and q["seconds"] < TARGET_SECONDS
    print(f"test accuracy {q['test_accuracy']:.4f} (val {q['val_accuracy']:.4f}) in "
          f"{q['seconds']:.0f} s ({q['cpu_seconds']:.0f} CPU s); load average "
          f"{q['load_before']} -> {q['load_after']}: "
          f"{'PASS' if ok else 'FAIL'} (target >= {TARGET_ACCURACY:.0%} in < "
          f"{TARGET_SECONDS:.0f} s)")
  path = common.write_json(NAME, results, quick=args.quick)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
