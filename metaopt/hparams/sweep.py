"""Sweeps: fill a RunStore with training runs over the offline task suite.

A task is a (dataset, model family) pair. Each gets ``trials_per_task``
configurations drawn from a :class:`~metaopt.hparams.space.Space` with a numpy
Generator seeded by (seed, dataset, model), so a sweep always draws the same
configurations, and each run gets a deterministic ``run_key``: a resumed sweep
skips the runs already in the store.

One compiled program serves many runs. Configurations are grouped by their
static hyperparameters (``layers``, ``width``: they change shapes); within a
group the rest are traced and the runs vmapped through
:func:`metaopt.train.train_grid`:

- ``learning_rate``, ``weight_decay``, ``beta1``: AdamW arguments;
- ``dropout``: the traced dropout rate of the model;
- ``batch_size``: gradient accumulation. Every step samples a micro-batch of
  ``m = gcd(batch sizes of the group)`` examples and ``optax.MultiSteps`` applies
  one AdamW update per ``batch_size / m`` micro-batches (sampling with
  replacement, so this is exactly a batch of ``batch_size``). A run of E epochs
  is ``E * ceil(n_train / m)`` micro-steps for every batch size; validation and
  test are evaluated once per epoch.

Parallel workers are separate processes (spawn), each taking whole tasks and
writing into the one store.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import multiprocessing
import os
import queue
import time
import zlib
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from metaopt import train
from metaopt.hparams.features import task_features
from metaopt.hparams.records import model_record, result_rows
from metaopt.hparams.search import Outcome, json_key
from metaopt.hparams.space import DEFAULT_SPACE, Space
from metaopt.hparams.store import RunStore
from metaopt.tasks import TaskConfig, make_task
from metaopt.tasks.data import DATASETS, IMAGE_SHAPES, num_train_examples
from metaopt.tasks.models import MODEL_KINDS
from metaopt.validation import check_choice, check_int

# Hyperparameters a sweep knows how to apply, with the value used when the space lacks one.
KNOWN_HPARAMS: dict[str, Any] = {
    "learning_rate": 1e-3, "batch_size": 32, "layers": 2, "dropout": None,
    "weight_decay": 0.0, "beta1": 0.9, "width": None,
}
STATIC_HPARAMS = ("layers", "width")  # change shapes: one compile per distinct value
WIDTHS: dict[str, int] = {"mlp": 64, "cnn": 8, "rnn": 32, "transformer": 32}
# Families whose runs are vmapped; the others run one after another in one program (lax.map):
# vmapped convolutions are slow on the CPU, and vmapped GRU groups of 8 runs hung the XLA CPU
# runtime (all threads idle in block_until_ready) with jax 0.10.2 here.
VMAPPED = ("mlp", "transformer")
QUICK = dict(datasets=("iris", "wine"), models=("mlp",), trials_per_task=4, epochs=2)


class SweepReport(NamedTuple):
  """What a sweep did."""
  added: int                # runs recorded by this call
  skipped: int              # runs already in the store (resumed)
  diverged: int             # of the added, non-finite loss
  failed: int               # of the added, an error during training
  tasks: int                # (dataset, model) pairs swept
  invalid: list             # (dataset, model, reason) pairs left out
  wall_time: float          # seconds for the whole call


def space_id(space: Space) -> str:
  """Short hash of a space's JSON form (part of every run_key)."""
  text = json.dumps(space.to_json(), sort_keys=True)
  return hashlib.sha1(text.encode()).hexdigest()[:8]


def run_key(dataset: str, model: str, trial: int, *, epochs: int, seed: int, space: Space) -> str:
  """The deterministic id of one sweep run."""
  return f"sweep/{dataset}/{model}/e{epochs}/s{seed}/{space_id(space)}/t{trial}"


def trial_configs(space: Space, dataset: str, model: str, trials: int, seed: int) -> list[dict]:
  """The first ``trials`` configurations of a task; trial i is the same for any ``trials``."""
  rng = np.random.default_rng([seed, zlib.crc32(dataset.encode()), zlib.crc32(model.encode())])
  return [space.sample(rng) for _ in range(trials)]


# Accepted values of each known hyperparameter: (check, description).
_VALID = {
    "learning_rate": (lambda v: v > 0, "> 0"),
    "batch_size": (lambda v: float(v).is_integer() and v >= 1, "integers >= 1"),
    "layers": (lambda v: float(v).is_integer() and v >= 1, "integers >= 1"),
    "width": (lambda v: float(v).is_integer() and v >= 1, "integers >= 1"),
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
}


def check_space(space: Space) -> None:
  """ValueError if the space has a hyperparameter a sweep cannot apply, or values it can't."""
  unknown = [n for n in space.names if n not in KNOWN_HPARAMS]
  if unknown:
    raise ValueError(f"sweeps cannot apply hyperparameter(s) {', '.join(map(repr, unknown))}; "
                     f"known: {', '.join(KNOWN_HPARAMS)}")
  for name in space.names:
    p = space[name]
    values = p.choices if p.kind == "categorical" else (p.low, p.high)
    ok, accepted = _VALID[name]
    for v in values:
      if isinstance(v, (str, bool)) or not ok(v):
        raise ValueError(f"space parameter {name!r}: values must be {accepted}, got {v!r}")


def resolve_hparams(config: dict, model: str) -> dict:
  """A sampled config with defaults filled in and values checked."""
  h = {k: v for k, v in KNOWN_HPARAMS.items()}
  h.update(config)
  if h["width"] is None:
    h["width"] = WIDTHS[model]
  for name in ("batch_size", "layers", "width"):
    v = h[name]
    if isinstance(v, bool) or not float(v).is_integer() or v < 1:
      raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    h[name] = int(v)
  if not h["learning_rate"] > 0:
    raise ValueError(f"learning_rate must be > 0, got {h['learning_rate']!r}")
  if h["dropout"] is not None and not 0 <= h["dropout"] < 1:
    raise ValueError(f"dropout must be in [0, 1), got {h['dropout']!r}")
  if not 0 <= h["beta1"] < 1:
    raise ValueError(f"beta1 must be in [0, 1), got {h['beta1']!r}")
  return h


def tasks_of(datasets: Sequence[str], models: Sequence[str]) -> tuple[list, list]:
  """Valid (dataset, model) pairs, and (dataset, model, reason) for the invalid ones."""
  for d in datasets:
    check_choice("dataset", d, DATASETS)
  for m in models:
    check_choice("model", m, MODEL_KINDS)
  valid, invalid = [], []
  for d in datasets:
    for m in models:
      if m == "cnn" and d not in IMAGE_SHAPES:
        invalid.append((d, m, "cnn needs an image dataset"))
      else:
        valid.append((d, m))
  return valid, invalid


def make_sweep_tx(h):
  """AdamW from the traced hyperparameters of :func:`traced_hparams`, one update per
  ``accumulate`` micro-batches (``optax.MultiSteps``)."""
  inner = optax.adamw(h["learning_rate"], b1=h["beta1"], weight_decay=h["weight_decay"])
  return optax.MultiSteps(inner, every_k_schedule=lambda _: h["accumulate"])


def traced_hparams(resolved: Sequence[dict], micro: int, *, dropout: bool = True) -> dict:
  """The traced hyperparameters of runs (rows of :func:`resolve_hparams`), stacked:
  AdamW's arguments, the gradient-accumulation count for micro-batches of ``micro``
  examples, and (with ``dropout``) the dropout rate."""
  column = lambda name: jnp.asarray([h[name] for h in resolved], jnp.float32)
  out = {"learning_rate": column("learning_rate"), "beta1": column("beta1"),
         "weight_decay": column("weight_decay"),
         "accumulate": jnp.asarray([h["batch_size"] // micro for h in resolved], jnp.int32)}
  if dropout:
    out["dropout"] = jnp.asarray([h["dropout"] or 0.0 for h in resolved], jnp.float32)
  return out


def micro_batch(space: Space, configs: Sequence[dict], n_train: int) -> int:
  """The micro-batch every step of a task samples: the gcd of the batch sizes the space
  allows (categorical) or the task's configurations draw (int range), at most n_train."""
  if "batch_size" in space.names and space["batch_size"].kind == "categorical":
    sizes = [int(c) for c in space["batch_size"].choices]
  else:
    sizes = [int(resolve_hparams(c, "mlp")["batch_size"]) for c in configs]
  m = math.gcd(*sizes)
  return next(d for d in range(min(m, n_train), 0, -1) if m % d == 0)


def run_group(store: RunStore, dataset: str, model: str, configs: dict[int, dict],
              keys: dict[int, str], *, micro: int, epochs: int, seed: int,
              on_runs: Callable[[int], None] = lambda n: None) -> dict[str, int]:
  """Train the given trials of one task (grouped by static hyperparameters) into ``store``,
  sampling micro-batches of ``micro`` examples (see the module docstring)."""
  counts = {"added": 0, "diverged": 0, "failed": 0}
  resolved = {i: resolve_hparams(c, model) for i, c in configs.items()}
  groups: dict[tuple, list[int]] = {}
  for i, h in resolved.items():
    groups.setdefault((h["layers"], h["width"]), []).append(i)
  features = None
  for (layers, width), trials in sorted(groups.items()):
    task = make_task(TaskConfig(dataset, model, width, layers, micro, 1, seed))
    if features is None:
      features = task_features(task.data, model_family=model, epochs=epochs, seed=seed)
    per_epoch = train.steps_per_epoch(task)
    use_dropout = any(resolved[i]["dropout"] is not None for i in trials)
    hparams = traced_hparams([resolved[i] for i in trials], micro, dropout=use_dropout)
    run_keys = [keys[i] for i in trials]
    seeds = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(seed),
                                          zlib.crc32(k.encode()) & 0x7FFFFFFF)
                       for k in run_keys])
    model_info = model_record(task)
    extra = {"source": "sweep", "micro_batch": micro, "epochs": epochs}
    try:
      result, wall = train.train_grid(
          task, make_sweep_tx, hparams, seeds, steps=epochs * per_epoch, eval_every=per_epoch,
          vectorize=model in VMAPPED, dropout=(lambda h: h["dropout"]) if use_dropout else None)
      rows = result_rows(task, hparams, result, wall, task_features=features,
                         run_keys=run_keys, keys=seeds, model=model_info)
    except (KeyboardInterrupt, SystemExit):
      raise
    except Exception as e:  # recorded, so a resumed sweep does not retry a broken config forever
      rows = [dict(task=dataset, task_features=features, hparams={}, metrics={},
                   model=model_info, status="failed", run_key=k,
                   extra={"error": f"{type(e).__name__}: {e}"}) for k in run_keys]
    for row, i in zip(rows, trials):
      row["hparams"] = dict(configs[i])  # the sampled values, as the space gives them
      row["extra"] = {**row.get("extra", {}), **extra, "trial": i}
    store.add_many(rows)
    counts["added"] += len(rows)
    counts["diverged"] += sum(r["status"] == "diverged" for r in rows)
    counts["failed"] += sum(r["status"] == "failed" for r in rows)
    on_runs(len(rows))
  return counts



class TrainingObjective:
  """Trains configurations of one (dataset, model family) task for real, exactly as
  :func:`metaopt.hparams.sweep.sweep` trains its runs, and returns their :class:`Outcome`.

  Same protocol as the sweep, so fresh trials and stored runs are comparable:
  AdamW (``learning_rate``, ``beta1``, ``weight_decay`` with the sweep's
  defaults when the configuration lacks them), the traced ``dropout`` rate,
  ``batch_size`` by gradient accumulation over micro-batches of ``micro_batch``
  examples (the gcd of the space's batch sizes), ``layers`` and the sweep's
  width for the family, ``epochs`` passes evaluated after each, data split by
  ``seed``. ``metric`` is read after the last epoch. Everything but ``layers``
  and ``width`` is traced, so all configurations with the same depth reuse one
  compiled program (cached here across calls). Each configuration's run key is
  derived from its values, so a configuration always gives the same outcome.
  """

  METRICS = ("val_accuracy", "val_loss", "test_accuracy", "test_loss", "best_val_accuracy")

  def __init__(self, dataset: str, model: str = "mlp", *, epochs: int = 5, seed: int = 0,
               metric: str = "val_accuracy", micro_batch: int = 16):
    valid, invalid = tasks_of([dataset], [model])
    if invalid:
      raise ValueError(f"cannot train {model!r} on {dataset!r}: {invalid[0][2]}")
    check_choice("metric", metric, self.METRICS)
    for label, v in (("epochs", epochs), ("micro_batch", micro_batch)):
      check_int(label, v)
    self.dataset, self.model, self.epochs, self.seed = dataset, model, epochs, seed
    self.metric, self.micro_batch = metric, micro_batch
    self._programs: dict[tuple[int, int], tuple] = {}
    self.compile_time = 0.0

  def _program(self, layers: int, width: int):
    key = (layers, width)
    if key not in self._programs:
      start = time.perf_counter()
      task = make_task(TaskConfig(self.dataset, self.model, width, layers, self.micro_batch, 1,
                                  self.seed))
      per_epoch = train.steps_per_epoch(task)
      run = train.make_train_fn(task, make_sweep_tx, steps=self.epochs * per_epoch, eval_every=per_epoch,
                          dropout=lambda h: h["dropout"])
      arrays = task.arrays()
      compiled = jax.jit(run).lower(self._traced(dict(self._defaults(), batch_size=16)),
                                    jax.random.PRNGKey(0), arrays).compile()
      self._programs[key] = (compiled, arrays)
      self.compile_time += time.perf_counter() - start
    return self._programs[key]

  def _defaults(self) -> dict:
    return resolve_hparams({}, self.model)

  def _traced(self, h: dict) -> dict:
    return jax.tree.map(lambda x: x[0], traced_hparams([h], self.micro_batch))

  def __call__(self, configs: Sequence[Mapping[str, Any]]) -> list[Outcome]:
    out = []
    for config in configs:
      unknown = sorted(set(config) - set(KNOWN_HPARAMS))
      if unknown:
        raise ValueError(f"cannot train hyperparameter(s) {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(KNOWN_HPARAMS)}")
      h = resolve_hparams(dict(config), self.model)
      if h["batch_size"] % self.micro_batch:
        raise ValueError(f"batch_size {h['batch_size']} is not a multiple of the micro-batch "
                         f"{self.micro_batch}")
      compiled, arrays = self._program(h["layers"], h["width"])
      key = jax.random.fold_in(jax.random.PRNGKey(self.seed),
                               zlib.crc32(json_key(config).encode()) & 0x7FFFFFFF)
      start = time.perf_counter()
      result = jax.block_until_ready(compiled(self._traced(h), key, arrays))
      wall = time.perf_counter() - start
      curves = {k: np.asarray(getattr(result, k)) for k in
                ("val_loss", "val_accuracy", "test_loss", "test_accuracy")}
      metrics = {k: float(v[-1]) for k, v in curves.items()}
      metrics["best_val_accuracy"] = float(np.nanmax(curves["val_accuracy"]))
      ok = train.run_status(result)[0] == "completed"
      out.append(Outcome(metrics[self.metric] if ok else math.nan,
                         "completed" if ok else "diverged", wall, metrics))
    return out


def _worker_init(cache_dir: Optional[str]) -> None:
  train.enable_compilation_cache(cache_dir or "")


def _worker(path: str, dataset: str, model: str, configs: dict, keys: dict, micro: int,
            epochs: int, seed: int, progress_queue) -> dict:
  with RunStore(path) as store:
    report = (lambda n: progress_queue.put(n)) if progress_queue is not None else (lambda n: None)
    return run_group(store, dataset, model, configs, keys, micro=micro, epochs=epochs,
                     seed=seed, on_runs=report)


def sweep(store: Union[RunStore, str, os.PathLike], *, datasets: Optional[Sequence[str]] = None,
          models: Optional[Sequence[str]] = None, space: Space = DEFAULT_SPACE,
          trials_per_task: int = 30, epochs: int = 5, seed: int = 0, workers: int = 1,
          progress: bool = True) -> SweepReport:
  """Train ``trials_per_task`` configurations from ``space`` on every (dataset, model) pair
  (all datasets and model families by default; cnn only on image datasets) into ``store``.

  Runs already in the store (same run_key) are skipped. ``workers > 1`` trains
  tasks in that many spawned processes writing into the same store file.
  """
  start = time.perf_counter()
  datasets = tuple(DATASETS if datasets is None else datasets)
  models = tuple(MODEL_KINDS if models is None else models)
  if not datasets or not models:
    raise ValueError(f"need at least one dataset and one model, got datasets={datasets!r}, "
                     f"models={models!r}")
  for label, v in (("trials_per_task", trials_per_task), ("epochs", epochs),
                   ("workers", workers)):
    check_int(label, v)
  if not isinstance(space, Space):
    raise ValueError(f"space must be a metaopt.hparams.Space, got {type(space).__name__}")
  check_space(space)
  valid, invalid = tasks_of(datasets, models)
  own = not isinstance(store, RunStore)
  store = RunStore(store) if own else store
  try:
    done = store.run_keys()
    jobs, skipped = [], 0
    for dataset, model in valid:
      configs = trial_configs(space, dataset, model, trials_per_task, seed)
      keys = {i: run_key(dataset, model, i, epochs=epochs, seed=seed, space=space)
              for i in range(trials_per_task)}
      for c in configs:
        resolve_hparams(c, model)  # bad values fail before any training
      todo = {i: configs[i] for i in range(trials_per_task) if keys[i] not in done}
      skipped += trials_per_task - len(todo)
      if todo:
        micro = micro_batch(space, configs, num_train_examples(dataset))
        jobs.append((dataset, model, todo, {i: keys[i] for i in todo}, micro))
    total = sum(len(j[2]) for j in jobs)
    counts = {"added": 0, "diverged": 0, "failed": 0}
    with tqdm(total=total, desc="sweep runs", unit="run", disable=not progress) as bar:
      if workers == 1 or len(jobs) <= 1:
        for dataset, model, configs, keys, micro in jobs:
          bar.set_postfix_str(f"{dataset}/{model}")
          c = run_group(store, dataset, model, configs, keys, micro=micro, epochs=epochs,
                        seed=seed, on_runs=bar.update)
          counts = {k: counts[k] + c[k] for k in counts}
      else:
        counts = _parallel(store.path, jobs, epochs, seed, workers, bar, counts)
    return SweepReport(counts["added"], skipped, counts["diverged"], counts["failed"],
                       len(valid), invalid, time.perf_counter() - start)
  finally:
    if own:
      store.close()


def _parallel(path, jobs, epochs, seed, workers, bar, counts) -> dict:
  ctx = multiprocessing.get_context("spawn")
  cache_dir = jax.config.jax_compilation_cache_dir
  with ctx.Manager() as manager:
    q = manager.Queue()
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=min(workers, len(jobs)), mp_context=ctx, initializer=_worker_init,
        initargs=(cache_dir,)) as pool:
      futures = [pool.submit(_worker, str(path), *job, epochs, seed, q) for job in jobs]
      pending = set(futures)
      while pending:
        try:
          bar.update(q.get(timeout=0.5))
        except queue.Empty:
          pass
        for f in [f for f in pending if f.done()]:
          pending.discard(f)
          c = f.result()  # re-raises a worker's error
          counts = {k: counts[k] + c[k] for k in counts}
      while True:  # the last progress messages
        try:
          bar.update(q.get_nowait())
        except queue.Empty:
          break
  return counts


def load_space(path: Union[str, os.PathLike]) -> Space:
  """A Space from a JSON file: a list of {name, type, low, high, log} or
  {name, type: "categorical", choices}."""
  try:
    with open(path, encoding="utf-8") as f:
      obj = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"no space file at {str(path)!r}") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"space file {str(path)!r} is not valid JSON: {e.msg} at line {e.lineno}"
                     ) from None
  return Space.from_json(obj)
