"""`metaopt run maml-transfer`: a MAML initialization vs random init and joint pre-training.

Across datasets: meta-train on some datasets' classes, meta-validate on others,
meta-test on a dataset and classes never seen. Every method adapts to a test
episode the same way: ``finetune_steps`` SGD steps at ``task_lr`` on the
support set of an N-way K-shot episode, scored on its query set.

- MAML: a Conv4 meta-trained with second-order MAML (the checkpoint with the
  best meta-validation accuracy is kept).
- random init: the same Conv4 from a fresh random initialization.
- joint pre-training: the Conv4 trained as one classifier over all meta-train
  classes (Adam, batch ``batch_size``), then a fresh N-way head.

Offline (the default) the datasets are MNIST-5k and scikit-learn's digits with
rotations as new classes; with ``--data-dir`` they are the tfds datasets of
:data:`metaopt.tasks.tfds_data.TRANSFER_SPLITS`. BatchNorm uses per-task batch
statistics (support while adapting, query when scoring), as in the original
MAML, for every method.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt import config as config_lib
from metaopt import report
from metaopt.experiments.protocol import Result, finish
from metaopt.meta.maml import maml, pretrain
from metaopt.tasks import fewshot, tfds_data
from metaopt.tasks.backbone import load_params
from metaopt.tasks.models import Conv4
from metaopt.train import run_loop, scan_advance
from metaopt.validation import check_int, check_number, check_positive, check_seed

# Offline: (dataset, digit classes); every class also rotated by 90, 180 and 270 degrees.
OFFLINE_SPLITS = {
    "meta_train": (("mnist5k", tuple(range(7))),),
    "meta_val": (("mnist5k", (7, 8, 9)),),
    "meta_test": (("digits", (7, 8, 9)),),
}


@dataclasses.dataclass(frozen=True)
class Config:
  data_dir: Optional[str] = None   # tfds datasets instead of the offline ones
  image_size: int = 16
  filters: int = 32                # Conv4 width (64 in the MAML paper; see docs)
  n_way: int = 5
  k_shot: int = 1
  num_query: int = 15
  meta_lr: float = 1e-3
  task_lr: float = 1e-2
  inner_steps: int = 5             # adaptation steps in meta-training
  finetune_steps: int = 10         # adaptation steps at meta-test, for every method
  meta_iterations: int = 1000
  meta_batch: int = 4
  batch_size: int = 32             # joint pre-training batch
  pretrain_steps: Optional[int] = None  # default: meta_iterations * meta_batch
  episodes: int = 600              # meta-test episodes
  val_every: int = 100
  val_episodes: int = 100
  finetune_lrs: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)  # tuned on meta-val for baselines
  threshold: float = 0.5           # query accuracy for "steps to reach"
  max_per_class: Optional[int] = 200  # tfds only
  backbone: Optional[str] = None   # checkpoint of Conv4 weights to start MAML from
  seed: int = 0

  def __post_init__(self):
    for name in ("image_size", "filters", "n_way", "k_shot", "num_query", "inner_steps",
                 "finetune_steps", "meta_iterations", "meta_batch", "batch_size", "episodes",
                 "val_every", "val_episodes"):
      check_int(name, getattr(self, name))
    for name in ("pretrain_steps", "max_per_class"):
      if getattr(self, name) is not None:
        check_int(name, getattr(self, name))
    check_seed("seed", self.seed)
    check_positive("meta_lr", self.meta_lr)
    check_positive("task_lr", self.task_lr)
    for lr in self.finetune_lrs:
      check_positive("finetune_lrs", lr)
    check_number("threshold", self.threshold, low=0.0, high=1.0)
    if self.data_dir is not None:
      tfds_data.require_data_extra()
      if not pathlib.Path(self.data_dir).expanduser().is_dir():
        raise FileNotFoundError(f"data_dir {self.data_dir!r} is not a folder; point it at "
                                "prepared tfds data: --set data_dir=D")
    if self.backbone is not None and not pathlib.Path(self.backbone).exists():
      raise FileNotFoundError(f"backbone {self.backbone!r} does not exist")


# Fields a rerun with --name may change: the run continues from its checkpoint.
RUN_LENGTH = ("meta_iterations",)


def default_config(seed: int = 0) -> Config:
  return Config(seed=seed)


def quick_config(seed: int = 0) -> Config:
  return Config(image_size=8, filters=8, meta_iterations=40, inner_steps=2, finetune_steps=3,
                episodes=40, val_every=20, val_episodes=20, pretrain_steps=40,
                finetune_lrs=(0.1,), seed=seed)


def load_pools(config: Config, progress: bool = False) -> dict[str, fewshot.ClassPool]:
  """One class pool per role, classes prefixed by their dataset."""
  if config.data_dir is None:
    pools = {}
    for role, sources in OFFLINE_SPLITS.items():
      parts = []
      for name, classes in sources:
        pool = fewshot.select_classes(
            fewshot.offline_pool(name, image_size=config.image_size), classes)
        parts.append(_prefixed(fewshot.with_rotations(pool), name))
      pools[role] = _concat(parts, role)
    return pools
  pools = {}
  for role, names in tfds_data.TRANSFER_SPLITS.items():
    parts = []
    for name in names:
      if name in tfds_data.MISSING:
        print(f"metaopt: skipping {name}: {tfds_data.MISSING[name]}", flush=True)
        continue
      pool = tfds_data.load_class_pool(
          name, split=tfds_data.ALL_SPLITS[tfds_data.tfds_name(name)], data_dir=config.data_dir,
          image_size=config.image_size, max_per_class=config.max_per_class, seed=config.seed,
          progress=progress)
      parts.append(_prefixed(pool, name))
    if not parts:
      raise ValueError(f"no dataset of {role} is available in tfds")
    pools[role] = _concat(parts, role)
  return pools


def _prefixed(pool, name):
  return fewshot.ClassPool(pool.x, pool.y, tuple(f"{name}:{c}" for c in pool.class_names), name)


def _concat(pools, role):
  offsets = np.cumsum([0] + [p.num_classes for p in pools])
  return fewshot.ClassPool(np.concatenate([p.x for p in pools]),
                           np.concatenate([p.y + o for p, o in zip(pools, offsets)]).astype(np.int32),
                           sum((p.class_names for p in pools), ()), role)


def _ci95(x) -> float:
  x = np.asarray(x, np.float64)
  return float(1.96 * x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def _flops(fn, *args) -> Optional[float]:
  """XLA's estimate of the floating-point operations of one call (None if unavailable)."""
  try:
    cost = jax.jit(fn).lower(*args).cost_analysis()  # from the HLO: no compilation
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])
  except Exception:  # cost analysis is backend-dependent; it only feeds a report column
    return None


def initial_params(config: Config, model, key, dummy):
  """Random Conv4 weights, with every array but the head from ``config.backbone`` if set."""
  params = jax.jit(model.init)(key, dummy)["params"]
  if config.backbone is None:
    return params
  loaded, paths = load_params(config.backbone, {"params": params}, strict=False,
                              exclude=("params/Dense_0",))
  print(f"metaopt: loaded {len(paths)} arrays from {config.backbone}", flush=True)
  return loaded["params"]


def run(config: Config, out, *, progress: bool = True, store=None) -> Result:
  """Meta-trains, pre-trains, evaluates on meta-test episodes; writes report.md and plots.

  Meta-training writes ``metrics.jsonl`` and checkpoints into ``out`` and resumes from them.
  """
  if store is not None:
    raise ValueError("maml-transfer trains no runs a run store could record; drop --store")
  start_all = time.perf_counter()
  pools = load_pools(config, progress)
  for role, pool in pools.items():  # an episode needs k_shot + num_query images per class
    kept = fewshot.drop_small_classes(pool, config.k_shot + config.num_query)
    if kept.num_classes < pool.num_classes:
      print(f"metaopt: {role}: dropped {pool.num_classes - kept.num_classes} classes with fewer "
            f"than {config.k_shot + config.num_query} images", flush=True)
    pools[role] = kept
  channels = pools["meta_train"].x.shape[-1]
  families = {role: fewshot.fewshot_family(pool, n_way=config.n_way, k_shot=config.k_shot,
                                           num_query=config.num_query)
              for role, pool in pools.items()}
  model = Conv4(num_classes=config.n_way, filters=config.filters)
  loss_fn = fewshot.cross_entropy_loss(model)
  metrics_fn = fewshot.classification_metrics(model, config.n_way)
  dummy = jnp.zeros((1, config.image_size, config.image_size, channels))
  key = jax.random.key(config.seed)
  init_key, head_key, meta_key, pre_key, val_key, test_key = jax.random.split(key, 6)
  init_params = initial_params(config, model, init_key, dummy)

  make = lambda lr, vectorize: maml(loss_fn, inner_lr=lr, inner_steps=config.inner_steps,
                                    meta_optimizer=optax.adam(config.meta_lr),
                                    metrics_fn=metrics_fn, vectorize=vectorize)
  learner = make(config.task_lr, True)
  # Evaluating 50 tasks at once: vmapped convolutions with per-task weights become grouped
  # convolutions, 3.7x slower on CPU than mapping the tasks one after another.
  evaluators = {lr: jax.jit(make(lr, False).evaluate, static_argnames=("steps", "curve"))
                for lr in sorted({config.task_lr, *config.finetune_lrs})}

  chunk = min(50, config.val_episodes, config.episodes)

  def score(state, episodes, steps, lr=config.task_lr):
    """Per-episode metrics over ``episodes`` (support, query), in equal chunks (one compile)."""
    n = jax.tree.leaves(episodes)[0].shape[0]
    pad = -n % chunk
    episodes = jax.tree.map(lambda x: jnp.concatenate([x, x[:pad]]), episodes)
    parts = [evaluators[lr](state, *jax.tree.map(lambda x: x[i:i + chunk], episodes),
                            steps=steps, curve=True) for i in range(0, n + pad, chunk)]
    return {k: np.concatenate([np.asarray(p[k]) for p in parts])[:n] for k in parts[0]}

  def tuned_lr(state) -> float:
    """The fine-tuning LR with the best meta-validation accuracy."""
    accs = {lr: float(score(state, val_episodes, config.finetune_steps, lr)["accuracy"].mean())
            for lr in config.finetune_lrs}
    return max(accs, key=accs.get)

  val_episodes = families["meta_val"].sample(val_key, config.val_episodes)
  test_episodes = families["meta_test"].sample(test_key, config.episodes)
  sample_train = lambda k: families["meta_train"].sample(k, config.meta_batch)

  # --- MAML, with meta-validation and resumable checkpoints -----------------------------
  train_chunk = scan_advance(lambda s, episodes: learner.meta_step(s, *episodes), sample_train,
                             meta_key)

  def advance(loop, record, start, n):
    """Meta-train ``n`` steps, then meta-validate; keep the best state so far."""
    state, _, metrics = train_chunk(loop["state"], record, start, n)
    acc = float(score(state, val_episodes, config.finetune_steps)["accuracy"].mean())
    record = dict(record, val=record["val"] + [[start + n, acc]])
    best = loop["best"]
    if acc > record["best_val_accuracy"]:
      record.update(best_val_accuracy=acc, best_step=start + n)
      best = state
    return {"state": state, "best": best}, record, metrics

  initial = learner.init(init_params)
  trained = run_loop(advance, {"state": initial, "best": initial}, steps=config.meta_iterations,
                     chunk=config.val_every, record={"val": [], "best_val_accuracy": -1.0,
                                                     "best_step": 0},
                     directory=out, keep=1, progress=progress, desc="meta-training MAML")
  state, best, progress_record = trained.state["state"], trained.state["best"], trained.record
  maml_seconds = trained.seconds
  meta_flops = _flops(learner.meta_step, state, *sample_train(meta_key))

  # --- joint pre-training on all meta-train classes ------------------------------------
  train_pool = pools["meta_train"]
  wide = Conv4(num_classes=train_pool.num_classes, filters=config.filters)
  wide_params = dict(init_params, Dense_0=wide.init(init_key, dummy)["params"]["Dense_0"])
  x_all, y_all = jnp.asarray(train_pool.x), jnp.asarray(train_pool.y)

  def sample_images(k):
    idx = jax.random.randint(k, (config.batch_size,), 0, x_all.shape[0])
    return {"x": x_all[idx], "y": y_all[idx]}
  pretrain_steps = config.pretrain_steps or config.meta_iterations * config.meta_batch
  pre_loss = fewshot.cross_entropy_loss(wide)
  start = time.perf_counter()
  pre_params, _ = pretrain(pre_loss, wide_params, sample_images, key=pre_key,
                           steps=pretrain_steps, optimizer=optax.adam(config.meta_lr),
                           chunk=min(500, pretrain_steps), progress=progress)
  pre_seconds = time.perf_counter() - start
  pre_flops = _flops(lambda p, b: jax.value_and_grad(pre_loss)(p, b), wide_params,
                     sample_images(pre_key))
  fresh_head = model.init(head_key, dummy)["params"]["Dense_0"]
  pre_params = dict(pre_params, Dense_0=fresh_head)

  # --- meta-test -----------------------------------------------------------------------
  random_start, pre_start = learner.init(init_params), learner.init(pre_params)
  starts = {  # method: (start, fine-tuning LR)
      "MAML": (best, config.task_lr),
      "random init": (random_start, config.task_lr),
      "joint pre-training": (pre_start, config.task_lr),
  }
  if config.finetune_lrs:
    starts["MAML, tuned LR"] = (best, tuned_lr(best))
    starts["random init, tuned LR"] = (random_start, tuned_lr(random_start))
    starts["joint pre-training, tuned LR"] = (pre_start, tuned_lr(pre_start))
  rows, curves, per_method = [], {}, {}
  for method, (s, lr) in starts.items():
    start = time.perf_counter()
    m = score(s, test_episodes, config.finetune_steps, lr)
    eval_seconds = time.perf_counter() - start
    mean_curve = m["curve/accuracy"].mean(0)
    reached = np.flatnonzero(mean_curve >= config.threshold)
    per_episode = np.where((m["curve/accuracy"] >= config.threshold).any(1),
                           np.argmax(m["curve/accuracy"] >= config.threshold, axis=1), np.nan)
    row = {
        "method": method, "fine-tuning LR": lr,
        "accuracy": float(m["accuracy"].mean()), "accuracy ±95%": _ci95(m["accuracy"]),
        "macro-F1": float(m["macro_f1"].mean()), "macro-F1 ±95%": _ci95(m["macro_f1"]),
        "accuracy before": float(m["accuracy_before"].mean()),
        "steps to threshold": int(reached[0]) if len(reached) else None,
        "episodes reaching": float(np.isfinite(per_episode).mean()),
        "eval s": eval_seconds,
    }
    rows.append(row)
    per_method[method] = {k: v.tolist() for k, v in m.items() if not k.startswith("curve/")}
    half = 1.96 * m["curve/accuracy"].std(0, ddof=1) / math.sqrt(len(m["curve/accuracy"]))
    curves[method] = (np.arange(config.finetune_steps + 1), mean_curve, mean_curve - half,
                      mean_curve + half)

  compute = [
      {"method": "MAML", "train s": maml_seconds, "train steps": config.meta_iterations,
       "GFLOP/step": meta_flops and meta_flops / 1e9,
       "total TFLOP": meta_flops and meta_flops * config.meta_iterations / 1e12},
      {"method": "joint pre-training", "train s": pre_seconds, "train steps": pretrain_steps,
       "GFLOP/step": pre_flops and pre_flops / 1e9,
       "total TFLOP": pre_flops and pre_flops * pretrain_steps / 1e12},
      {"method": "random init", "train s": 0.0, "train steps": 0, "GFLOP/step": 0.0,
       "total TFLOP": 0.0},
  ]
  val_curve = np.asarray(progress_record["val"]) if progress_record["val"] else np.zeros((0, 2))
  report.plot_panels(out / "adaptation.png",
                     {f"meta-test query accuracy ({config.n_way}-way {config.k_shot}-shot), "
                      "mean and 95% interval over episodes": curves},
                     hlines={f"chance (1/{config.n_way})": 1.0 / config.n_way},
                     ylabel="query accuracy", xlabel="fine-tuning step")
  if len(val_curve):
    report.plot_panels(out / "meta_validation.png",
                       {"MAML meta-validation": {"MAML": (val_curve[:, 0], val_curve[:, 1])}},
                       ylabel="query accuracy", xlabel="meta-iteration")
  result = {
      "config": config_lib.to_dict(config),
      "data": {role: {"classes": p.num_classes, "images": int(len(p.x)),
                      "datasets": sorted({c.split(":")[0] for c in p.class_names})}
               for role, p in pools.items()},
      "results": rows, "compute": compute, "meta_validation": progress_record,
      "per_episode": per_method, "seconds": time.perf_counter() - start_all,
  }
  terminal = [f"{row['method']}: meta-test accuracy {row['accuracy']:.4f} "
              f"± {row['accuracy ±95%']:.4f}, macro-F1 {row['macro-F1']:.4f}" for row in rows]
  rows = [{"task": "meta-test", "method": method, "metric": "query_accuracy", "step": int(t),
           "value": mean, "std": (high - mean) / 1.96 * math.sqrt(config.episodes),
           "runs": config.episodes}
          for method, (steps, means, _, highs) in curves.items()
          for t, mean, high in zip(steps, means, highs)]
  rows += [{"task": "meta-validation", "method": "MAML", "metric": "query_accuracy",
            "step": int(t), "value": acc, "std": None, "runs": config.val_episodes}
           for t, acc in progress_record["val"]]
  return finish(out, _report(config, result), result, terminal, rows)


def _report(config: Config, result: dict) -> str:
  data = "\n".join(f"- {role}: {d['classes']} classes, {d['images']} images "
                   f"({', '.join(d['datasets'])})" for role, d in result["data"].items())
  missing = ""
  if config.data_dir is not None:
    missing = "\nNot in tfds, skipped: " + ", ".join(
        f"{k} ({v})" for k, v in tfds_data.MISSING.items()) + "\n"
  best = result["meta_validation"]
  return f"""# MAML transfer: MAML vs random init vs joint pre-training

{config.n_way}-way {config.k_shot}-shot, {config.num_query} query images per class,
{config.episodes} meta-test episodes. Every method adapts with {config.finetune_steps} SGD
steps on the support set, at the task LR {config.task_lr}, and also at the LR of
{', '.join(map(str, config.finetune_lrs))} with the best meta-validation accuracy. Conv4 with {config.filters} filters on
{config.image_size}x{config.image_size} images; BatchNorm with per-task batch statistics
(transductive, as in the original MAML). MAML: second order, {config.inner_steps} inner steps,
meta-batch {config.meta_batch}, Adam {config.meta_lr}, {config.meta_iterations} iterations;
the iterate with the best meta-validation accuracy (iteration {best['best_step']},
{best['best_val_accuracy']:.4f}) is tested.

{data}
{missing}
## Meta-test (mean and 95% confidence interval over episodes)

{report.markdown_table(result['results'], ['method', 'fine-tuning LR', 'accuracy', 'accuracy ±95%', 'macro-F1',
                                           'macro-F1 ±95%', 'accuracy before',
                                           'steps to threshold', 'episodes reaching'])}

"steps to threshold": the first fine-tuning step at which the mean query accuracy reaches
{config.threshold} (– if never); "episodes reaching": the fraction of episodes that reach it
within {config.finetune_steps} steps.

![adaptation](adaptation.png)

## Compute

{report.markdown_table(result['compute'], ['method', 'train s', 'train steps', 'GFLOP/step',
                                           'total TFLOP'])}

FLOPs are XLA's cost-analysis estimate of one compiled step. Total run time
{result['seconds']:.0f} s.

![meta-validation](meta_validation.png)
"""
