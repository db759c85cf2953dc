"""Sweeps: fill a RunStore with training runs over the offline task suite.

A task is a (dataset, model family) pair. Each gets ``trials_per_task``
configurations drawn from a :class:`~metaopt.hparams.space.Space` with a numpy
Generator seeded by (seed, dataset, model), so a sweep always draws the same
configurations, and each run gets a deterministic ``run_key``: a resumed sweep
skips the runs already in the store.

One compiled program serves many runs. Configurations are grouped by the
hyperparameters that change the program: ``width``, and ``layers`` only for the
families not in ``MASK_DEPTH`` (the cnn: its blocks change the channel count and
the image size, so none can be skipped). Within a group the rest are traced and
the runs vmapped through :func:`metaopt.train.train_grid`:

- ``layers`` (mlp, rnn, transformer): masked depth. The group's program is the
  model at the group's largest depth called with each run's ``active_depth``
  (:mod:`metaopt.tasks.models`): layers past it pass their input through. Each run
  starts from its own configuration's initial parameters (``task.init`` at its real
  depth with its key), zero-padded into the deep model's layout
  (:func:`~metaopt.tasks.models.pad_depth`); the padded parameters get zero
  gradients and AdamW keeps them zero, so the run computes what the unpadded model
  computes (to float rounding). A group of one depth trains that model unmasked.
  Width is not masked: a wider dropout mask would draw different random numbers than
  the run's own width, so runs of different widths compile a program each.

- the dataset (mlp, ``SHARED``): datasets padded to one :class:`PadLayout` (inputs,
  rows, classes, steps per epoch; see :func:`pad_layouts`) train in one program,
  compiled once per process; each run still trains what it trains alone, from its own
  ``task.init`` (:func:`_padded_init`), to float rounding.

- ``learning_rate``, ``weight_decay``, ``beta1``: AdamW arguments;
- ``dropout``: the traced dropout rate of the model;
- ``batch_size``: gradient accumulation. Every step samples a micro-batch of
  ``m = gcd(batch sizes of the group)`` examples and ``optax.MultiSteps`` applies
  one AdamW update per ``batch_size / m`` micro-batches (sampling with
  replacement, so this is exactly a batch of ``batch_size``). A run of E epochs
  is ``E * ceil(n_train / m)`` micro-steps for every batch size; validation and
  test are evaluated once per epoch.

Bounded work. Configurations are drawn when a run needs them (trial i is the
i-th draw of the task's seeded Generator), at most ``GROUP_RUNS`` runs train in
one compiled call, and ``trials_per_task`` and ``epochs`` are bounded by
``MAX_TRIALS`` and ``MAX_EPOCHS``. A configuration error (a value the space
cannot give a sweep) raises before any training and is not recorded; a run is
recorded as failed only for an error during its training.

Parallel workers are separate processes (spawn), each taking whole tasks and
writing into the one store. The parent tears them down on an error, Ctrl-C
(SIGINT) or SIGTERM; each worker also exits by itself within a second once the
parent is gone (even after a ``kill -9``), so no orphan keeps writing. Rows
are written with ``on_conflict="skip"``: a run another process stored first is
skipped, never an error.

Many hosts. On a PostgreSQL store (``postgresql://...``) workers on any number of
hosts run the same sweep and claim its runs instead of taking whole tasks, one unit
(the runs of a task that share a compiled program) at a time, through the store's
``claims`` table (:class:`metaopt.hparams.store.Claims`): no run is claimed twice, a
worker's heartbeat keeps its claims alive, and the claims of a worker that died go to
another one after ``claim_timeout`` seconds. Every worker returns once every run of
the sweep is stored.
"""

from __future__ import annotations

import collections.abc
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import multiprocessing
import operator
import os
import queue
import secrets
import signal
import socket
import threading
import time
import zlib
from typing import (Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Optional, Sequence,
                    Union)

import flax.linen as nn
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
from metaopt.hparams.store import Claims, RunStore
from metaopt.tasks import TaskConfig, make_task
from metaopt.tasks.data import DATASETS, is_image_dataset, num_train_examples
from metaopt.tasks.models import DEPTH_MASKED, MODEL_KINDS, VMAPPED, make_model, pad_depth
from metaopt.validation import check_choice, check_int, is_number

# Hyperparameters a sweep knows how to apply, with the value used when the space lacks one.
KNOWN_HPARAMS: dict[str, Any] = {
    "learning_rate": 1e-3, "batch_size": 32, "layers": 2, "dropout": None,
    "weight_decay": 0.0, "beta1": 0.9, "width": None,
}
STATIC_HPARAMS = ("layers", "width")  # change shapes (layers: masked for MASK_DEPTH)
# Families whose depth is masked (traced) instead of static; () is the old grouping,
# one program per depth (benchmarks/bench_sweep_compile.py compares the two).
MASK_DEPTH: tuple[str, ...] = DEPTH_MASKED
WIDTHS: dict[str, int] = {"mlp": 64, "cnn": 8, "rnn": 32, "transformer": 32}
# Families whose tasks share compiled programs across datasets (padded, see PadLayout);
# () compiles one program per task (benchmarks/bench_sweep_compile.py compares the two).
SHARED: tuple[str, ...] = ("mlp",)
# Inputs of up to 64 features are padded to 64 and share one program, up to 256 another;
# wider ones keep their own (padding them would cost more training than a compile).
FEATURE_BUCKETS = (64, 256)
PROGRAMS_KEPT = 16      # compiled programs a process keeps for later tasks
QUICK = dict(datasets=("iris", "wine"), models=("mlp",), trials_per_task=4, epochs=2)
MAX_TRIALS = 100_000    # per task
MAX_EPOCHS = 10_000
GROUP_RUNS = 256        # runs trained in one compiled call at most (bounded memory)
PARENT_POLL = 0.5       # seconds between a worker's checks that the sweep process lives
# PostgreSQL stores: seconds after which the claims of a worker that stopped renewing
# them (killed, or cut off from the server) go to another worker. Live workers renew
# theirs every CLAIM_TIMEOUT / 4 s, so this bounds only how long a dead worker's runs wait.
CLAIM_TIMEOUT = 600.0
MAX_CLAIM_TIMEOUT = 7 * 86400.0


class SweepReport(NamedTuple):
  """What a sweep did."""
  added: int                # runs recorded by this call
  skipped: int              # runs already in the store (resumed, stored meanwhile or,
                            # on PostgreSQL, by other workers)
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
  return _key_prefix(dataset, model, epochs, seed, space) + str(trial)


def _key_prefix(dataset: str, model: str, epochs: int, seed: int, space: Space) -> str:
  return f"sweep/{dataset}/{model}/e{epochs}/s{seed}/{space_id(space)}/t"


class TrialConfigs(collections.abc.Sequence):
  """The configurations of a task's trials, drawn when asked for: trial i is the i-th
  draw of a Generator seeded by (seed, dataset, model), whatever the number of trials.
  Iterating draws them one after another; ``configs[i]`` replays the first i draws."""

  def __init__(self, space: Space, dataset: str, model: str, trials: int, seed: int):
    self.space = space
    self.trials = check_int("trials", trials, low=0)
    self._seed = [seed, zlib.crc32(dataset.encode()), zlib.crc32(model.encode())]

  def _draws(self) -> Iterator[dict]:
    rng = np.random.default_rng(self._seed)
    while True:
      yield self.space.sample(rng)

  def __len__(self) -> int:
    return self.trials

  def __iter__(self) -> Iterator[dict]:
    return itertools.islice(self._draws(), self.trials)

  def __getitem__(self, index):
    if isinstance(index, slice):
      start, stop, step = index.indices(self.trials)
      if step < 0:
        return list(self)[index]
      return list(itertools.islice(self._draws(), start, max(start, stop), step))
    i = operator.index(index)
    i = i + self.trials if i < 0 else i
    if not 0 <= i < self.trials:
      raise IndexError(f"trial {index} of {self.trials}")
    return next(itertools.islice(self._draws(), i, None))

  def __eq__(self, other) -> bool:
    if not isinstance(other, collections.abc.Sequence) or isinstance(other, str):
      return NotImplemented
    return len(self) == len(other) and all(a == b for a, b in zip(self, other))

  __hash__ = None

  def __repr__(self) -> str:
    return f"TrialConfigs({self.trials} trials, seed {self._seed})"


def trial_configs(space: Space, dataset: str, model: str, trials: int, seed: int) -> TrialConfigs:
  """The first ``trials`` configurations of a task, drawn lazily (:class:`TrialConfigs`);
  trial i is the same for any ``trials``."""
  return TrialConfigs(space, dataset, model, trials, seed)


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
      if m == "cnn" and not is_image_dataset(d):
        invalid.append((d, m, "cnn needs an image dataset"))
      else:
        valid.append((d, m))
  return valid, invalid


def make_sweep_tx(h):
  """AdamW from the traced hyperparameters of :func:`traced_hparams`, one update per
  ``accumulate`` micro-batches (``optax.MultiSteps``)."""
  inner = optax.adamw(h["learning_rate"], b1=h["beta1"], weight_decay=h["weight_decay"])
  return optax.MultiSteps(inner, every_k_schedule=lambda _: h["accumulate"])


def traced_hparams(resolved: Sequence[dict], micro: int, *, dropout: bool = True,
                   depth: bool = False) -> dict:
  """The traced hyperparameters of runs (rows of :func:`resolve_hparams`), stacked:
  AdamW's arguments, the gradient-accumulation count for micro-batches of ``micro``
  examples, (with ``dropout``) the dropout rate and (with ``depth``) ``layers``, the
  active depth of a masked model."""
  column = lambda name: jnp.asarray([h[name] for h in resolved], jnp.float32)
  out = {"learning_rate": column("learning_rate"), "beta1": column("beta1"),
         "weight_decay": column("weight_decay"),
         "accumulate": jnp.asarray([h["batch_size"] // micro for h in resolved], jnp.int32)}
  if dropout:
    out["dropout"] = jnp.asarray([h["dropout"] or 0.0 for h in resolved], jnp.float32)
  if depth:
    out["layers"] = jnp.asarray([h["layers"] for h in resolved], jnp.int32)
  return out


def group_key(h: dict, model: str) -> tuple[int, int]:
  """``(layers, width)`` of the compiled program a run (a row of :func:`resolve_hparams`)
  trains in; ``layers`` is 0 (any depth) for the families of ``MASK_DEPTH``."""
  return (0 if model in MASK_DEPTH else h["layers"], h["width"])


def _shaped(task, depth: int, num_classes: Optional[int] = None):
  """``task`` with its model at ``depth`` layers (the same data), and ``num_classes``
  outputs (default the data's; more for a padded layout's head)."""
  cfg = task.config._replace(depth=depth)
  model = make_model(cfg.model, width=cfg.width, depth=depth,
                     num_classes=num_classes or task.data.num_classes,
                     image_shape=task.data.image_shape, info=task.data.info)
  return dataclasses.replace(task, config=cfg, model=model)


def masked_init(task, depths: Sequence[int]):
  """``init(hparams, key)`` for :func:`metaopt.train.make_train_fn`: the parameters of
  ``task``'s model at the run's depth ``hparams["layers"]`` (one of ``depths``), as
  ``task.init`` at that depth gives them, zero-padded to ``task``'s depth (:func:`pad_depth`)."""
  kind, deep = task.config.model, task.config.depth
  like = jax.eval_shape(task.init, jax.random.PRNGKey(0))
  inits = {d: _shaped(task, d).init for d in sorted(set(depths))}

  def init(hparams, key):
    params = None
    for d, real in inits.items():
      padded = pad_depth(kind, real(key), like, depth=d, max_depth=deep)
      params = padded if params is None else jax.tree.map(
          lambda a, b: jnp.where(hparams["layers"] == d, a, b), padded, params)
    return params
  return init


def micro_batch(space: Space, configs: Iterable[dict], n_train: int) -> int:
  """The micro-batch every step of a task samples: the gcd of the batch sizes the space
  allows (categorical) or the task's configurations draw (int range), at most n_train."""
  if _categorical_batch(space):
    m = math.gcd(*(int(c) for c in space["batch_size"].choices))
  else:
    m = math.gcd(*(int(resolve_hparams(c, "mlp")["batch_size"]) for c in configs))
  return _divisor_at_most(m, n_train)


def _categorical_batch(space: Space) -> bool:
  return "batch_size" in space.names and space["batch_size"].kind == "categorical"


def _divisor_at_most(m: int, n: int) -> int:
  """The largest divisor of ``m`` that is at most ``n``."""
  return next(d for d in range(min(m, n), 0, -1) if m % d == 0)


COUNTS = ("added", "skipped", "diverged", "failed")


class PadLayout(NamedTuple):
  """The padded shapes a group of datasets trains in, so that one compiled program serves
  all of them (:func:`metaopt.train.pad_splits`): inputs zero-padded to ``features``,
  splits to ``rows`` (train, val, test) rows, the head to ``classes`` (the extra logits
  masked, :func:`metaopt.tasks.models.mask_classes`), and ``capacity`` step slots per
  epoch (the group's most steps per epoch). Padded rows are never sampled or counted and
  padded weights get zero gradients, so each run computes what it computes unpadded."""
  features: int
  rows: tuple[int, int, int]
  classes: int
  capacity: int
  micro: int


def pad_layouts(jobs: Sequence[tuple], seed: int) -> dict[tuple[str, str], PadLayout]:
  """The :class:`PadLayout` of each (dataset, model) of ``jobs`` ((dataset, model, trials,
  micro) as :func:`sweep` plans them) whose family is in ``SHARED``: datasets of one
  family, micro-batch and feature bucket (``FEATURE_BUCKETS``; wider inputs each alone)
  share one layout. Datasets with another objective than classification train unpadded."""
  shapes, groups = {}, {}
  for dataset, model, _, micro in jobs:
    if model not in SHARED:
      continue
    data = make_task(TaskConfig(dataset, model, 1, 1, micro, 1, seed)).data
    if data.objective != "classification":  # padding masks classes and weighs accuracy
      continue
    features = int(np.prod(data.x_train.shape[1:]))
    bucket = next((b for b in FEATURE_BUCKETS if features <= b), features)
    shapes[dataset, model] = (features, tuple(data.num_examples(s) for s in ("train", "val", "test")),
                              data.num_classes, math.ceil(data.num_examples("train") / micro))
    groups.setdefault((model, micro, bucket), []).append((dataset, model))
  out = {}
  for (model, micro, bucket), members in groups.items():
    rows = tuple(max(shapes[m][1][i] for m in members) for i in range(3))
    layout = PadLayout(bucket, rows, max(shapes[m][2] for m in members),
                       max(shapes[m][3] for m in members), micro)
    out.update(dict.fromkeys(members, layout))
  return out


_PROGRAMS: dict = {}  # compiled training programs of this process (train.train_grid)


def _keep_programs() -> dict:
  while len(_PROGRAMS) > PROGRAMS_KEPT:
    _PROGRAMS.pop(next(iter(_PROGRAMS)))
  return _PROGRAMS


class _KernelKeys(nn.Module):
  """The layers of :class:`metaopt.tasks.models.MLP` with the same names, recording the
  PRNG key flax gives each kernel: a parameter's key depends on its module's name, not on
  its shape, so these are the keys of every model of the family up to this depth."""
  hidden: Sequence[int]
  num_classes: int
  keep: Callable[[jax.Array], None]

  @nn.compact
  def __call__(self, x):
    def record(key, shape, dtype):
      self.keep(key)
      return jnp.zeros(shape, dtype)
    for width in self.hidden:
      x = nn.Dense(width, kernel_init=record)(x)
    return nn.Dense(self.num_classes, kernel_init=record)(x)


def lecun_stddev(fan_in: int) -> np.float32:
  """The standard deviation flax's default (lecun normal) kernel init scales its draws by."""
  return np.float32(np.sqrt(np.float32(1.0 / fan_in)) / np.float32(.87962566103423978))


def _padded_init(layout: PadLayout, width: int, deep: int):
  """``init(hparams, key)`` of runs in a layout's program: ``task.init`` of the run's own
  model (``hparams["layers"]`` hidden layers, ``hparams["features"]`` inputs,
  ``hparams["classes"]`` classes), bit for bit, laid out zero-padded as the layout's mlp
  at ``deep`` layers, so one compiled init serves every dataset and depth. It redraws
  each kernel with the key flax gives it (:class:`_KernelKeys`): jax's threefry draws
  each element from its row-major index (``jax_threefry_partitionable``), so the first
  ``features`` rows of a draw at the padded shape are the real draw, and the head's real
  ``[width, classes]`` draw is read from a flat draw by index."""
  if not jax.config.jax_threefry_partitionable:
    raise ValueError("the sweep's shared programs need jax_threefry_partitionable=True")
  example = jnp.zeros((1, layout.features), jnp.float32)
  draw = lambda key, shape: jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)
  zeros = lambda n: jnp.zeros((n,), jnp.float32)

  def init(hparams, key):
    keys = []
    _KernelKeys((width,) * deep, layout.classes, keys.append).init(key, example)
    depth, classes = hparams["layers"], hparams["classes"]
    rows = jnp.arange(layout.features)[:, None] < hparams["features"]
    params = {"Dense_0": {"kernel": jnp.where(rows, draw(keys[0], (layout.features, width))
                                              * hparams["stddev_in"], 0.0),
                          "bias": zeros(width)}}
    for i in range(1, deep):
      kernel = draw(keys[i], (width, width)) * lecun_stddev(width)
      params[f"Dense_{i}"] = {"kernel": jnp.where(i < depth, kernel, 0.0), "bias": zeros(width)}
    # The run's head is its Dense_<depth>: that layer's key, drawn at [width, classes].
    head_key = jnp.stack([jax.random.key_data(k) if jnp.issubdtype(k.dtype, jax.dtypes.prng_key)
                          else k for k in keys])[depth]
    flat = draw(head_key, (width * layout.classes,)) * lecun_stddev(width)
    r, c = jnp.meshgrid(jnp.arange(width), jnp.arange(layout.classes), indexing="ij")
    kernel = jnp.where(c < classes, flat[r * classes + jnp.minimum(c, classes - 1)], 0.0)
    params[f"Dense_{deep}"] = {"kernel": kernel, "bias": zeros(layout.classes)}
    return params
  return init


def run_group(store: RunStore, dataset: str, model: str, configs: dict[int, dict],
              keys: dict[int, str], *, micro: int, epochs: int, seed: int,
              on_runs: Callable[[int], None] = lambda n: None,
              layout: Optional[PadLayout] = None) -> dict[str, int]:
  """Train the given trials of one task (grouped by :func:`group_key`) into ``store``,
  sampling micro-batches of ``micro`` examples (see the module docstring). Trials whose
  run_key is stored meanwhile (by another process) are skipped, not trained or written.
  With a ``layout`` (:func:`pad_layouts`) the task trains padded, in a program it shares
  with the other datasets of that layout. Returns the counts of ``COUNTS``."""
  counts = dict.fromkeys(COUNTS, 0)
  resolved = {i: resolve_hparams(c, model) for i, c in configs.items()}
  groups: dict[tuple, list[int]] = {}
  for i, h in resolved.items():
    groups.setdefault(group_key(h, model), []).append(i)
  features = None
  for (_, width), trials in sorted(groups.items()):
    stored = [i for i in trials if store.has(keys[i])]
    if stored:
      counts["skipped"] += len(stored)
      on_runs(len(stored))
      trials = [i for i in trials if i not in stored]
      if not trials:
        continue
    depths = [resolved[i]["layers"] for i in trials]
    masked = len(set(depths)) > 1  # one depth: that model, unmasked
    task = make_task(TaskConfig(dataset, model, width, max(depths), micro, 1, seed))
    if features is None:
      features = task_features(task.data, model_family=model, epochs=epochs, seed=seed)
    per_epoch = train.steps_per_epoch(task)
    use_dropout = any(resolved[i]["dropout"] is not None for i in trials)
    hparams = traced_hparams([resolved[i] for i in trials], micro, dropout=use_dropout,
                             depth=masked)
    run_keys = [keys[i] for i in trials]
    seeds = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(seed),
                                          zlib.crc32(k.encode()) & 0x7FFFFFFF)
                       for k in run_keys])
    records = {d: model_record(_shaped(task, d)) for d in set(depths)}
    model_info = model_record(task)
    extra = {"source": "sweep", "micro_batch": micro, "epochs": epochs}
    drop = (lambda h: h["dropout"]) if use_dropout else None
    try:
      if layout is not None:
        result, wall = _train_padded(task, layout, hparams, depths, seeds, epochs=epochs,
                                     dropout=drop, vectorize=model in VMAPPED)
      else:
        shapes = {}
        if masked:
          shapes = dict(model_args=lambda h: {"active_depth": h["layers"]},
                        init=masked_init(task, depths))
        result, wall = train.train_grid(
            task, make_sweep_tx, hparams, seeds, steps=epochs * per_epoch,
            eval_every=per_epoch, vectorize=model in VMAPPED, dropout=drop, **shapes)
      rows = result_rows(task, hparams, result, wall, task_features=features,
                         run_keys=run_keys, keys=seeds, model=model_info)
    except (ValueError, TypeError):
      raise  # a configuration (or a bug) to fix, not a run that failed: nothing recorded
    except Exception as e:  # recorded, so a resumed sweep does not retry a broken config forever
      rows = [dict(task=dataset, task_features=features, hparams={}, metrics={},
                   model=model_info, status="failed", run_key=k,
                   extra={"error": f"{type(e).__name__}: {e}"}) for k in run_keys]
    for row, i in zip(rows, trials):
      row["hparams"] = dict(configs[i])  # the sampled values, as the space gives them
      row["model"] = records[resolved[i]["layers"]]  # its own depth, not the group's
      row["extra"] = {**row.get("extra", {}), **extra, "trial": i}
    # Another process may have stored some of these runs while they trained (a sweep
    # resumed while an old one still ran): those are skipped, the others written.
    fresh = [r for r in rows if not store.has(r["run_key"])]
    added = len(store.add_many(fresh, on_conflict="skip"))
    counts["added"] += added
    counts["skipped"] += len(rows) - added
    counts["diverged"] += sum(r["status"] == "diverged" for r in fresh)
    counts["failed"] += sum(r["status"] == "failed" for r in fresh)
    on_runs(len(rows))
  return counts


def _train_padded(task, layout: PadLayout, hparams: dict, depths: Sequence[int], seeds, *,
                  epochs: int, dropout, vectorize: bool):
  """:func:`metaopt.train.train_grid` of ``task``'s runs in the layout's padded program
  (compiled once per process for every dataset of the layout); the result as unpadded."""
  deep = max(depths)
  per_epoch = train.steps_per_epoch(task)
  program = _shaped(task, deep, layout.classes)
  arrays = train.pad_splits(task.arrays(), dict(zip(("train", "val", "test"), layout.rows)),
                            layout.features, eval_every=per_epoch)
  full = lambda v: jnp.full(len(depths), v, jnp.int32)
  features = int(np.prod(task.data.x_train.shape[1:]))
  inputs = {**hparams, "layers": jnp.asarray(depths, jnp.int32),
            "classes": full(task.data.num_classes), "features": full(features),
            "stddev_in": jnp.full(len(depths), lecun_stddev(features))}
  result, wall = train.train_grid(
      program, make_sweep_tx, inputs, seeds, steps=epochs * layout.capacity,
      eval_every=layout.capacity, capacity=layout.capacity, arrays=arrays, vectorize=vectorize,
      dropout=dropout, model_args=lambda h: {"active_depth": h["layers"],
                                             "active_classes": h["classes"]},
      init=_padded_init(layout, task.config.width, deep), programs=_keep_programs(),
      program_key=("sweep", task.config.model, task.config.width, deep, layout, epochs,
                   dropout is not None, vectorize))
  return train.unpad_steps(result, per_epoch, layout.capacity), wall


def run_task(store: RunStore, space: Space, dataset: str, model: str, trials: Sequence[int], *,
             micro: int, epochs: int, seed: int,
             on_runs: Callable[[int], None] = lambda n: None,
             layout: Optional[PadLayout] = None) -> dict[str, int]:
  """Train the given trial numbers of one task into ``store`` (:func:`run_group`), drawing
  each configuration when it is reached and training at most ``GROUP_RUNS`` runs of one
  program (:func:`group_key`) at a time. Returns the counts of ``COUNTS``."""
  counts = dict.fromkeys(COUNTS, 0)
  if not trials:
    return counts
  wanted = set(trials)
  prefix = _key_prefix(dataset, model, epochs, seed, space)
  buckets: dict[tuple, dict[int, dict]] = {}

  def train_bucket(shape):
    bucket = buckets.pop(shape)
    c = run_group(store, dataset, model, bucket, {i: prefix + str(i) for i in bucket},
                  micro=micro, epochs=epochs, seed=seed, on_runs=on_runs, layout=layout)
    for k in COUNTS:
      counts[k] += c[k]

  for i, config in enumerate(trial_configs(space, dataset, model, max(wanted) + 1, seed)):
    if i in wanted:
      shape = group_key(resolve_hparams(config, model), model)
      buckets.setdefault(shape, {})[i] = config
      if len(buckets[shape]) == GROUP_RUNS:
        train_bucket(shape)
  for shape in sorted(buckets):
    train_bucket(shape)
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
    check_int("epochs", epochs, high=MAX_EPOCHS)
    check_int("micro_batch", micro_batch)
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


_PROGRESS = None  # a worker's queue of finished-run counts to the parent


def _worker_init(cache_dir: Optional[str], parent: int, progress) -> None:
  global _PROGRESS
  _PROGRESS = progress
  threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True,
                   name="metaopt-sweep-parent-watch").start()
  train.enable_compilation_cache(cache_dir or "")


def _exit_with_parent(parent: int) -> None:
  """Exits the worker once the sweep process is gone, however it died (kill -9 runs no
  cleanup): an orphan would keep training and writing into the store."""
  while os.getppid() == parent:
    time.sleep(PARENT_POLL)
  os._exit(1)


def _report(n: int) -> None:
  if _PROGRESS is not None:
    _PROGRESS.put(n)


def _worker(path: str, space: Space, dataset: str, model: str, trials: list, micro: int,
            epochs: int, seed: int, layout: Optional[PadLayout]) -> dict:
  with RunStore(path, create=False) as store:
    return run_task(store, space, dataset, model, trials, micro=micro, epochs=epochs,
                    seed=seed, on_runs=_report, layout=layout)


def _claim_worker(url: str, space: Space, jobs: list, epochs: int, seed: int,
                  claim_timeout: float) -> dict:
  with RunStore(url, create=False) as store:
    return claim_runs(store, space, jobs, epochs=epochs, seed=seed,
                      claim_timeout=claim_timeout, on_runs=_report)


def worker_id() -> str:
  """A name for this sweep worker, unique across hosts: host, process id, random suffix."""
  return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class _Heartbeat:
  """Renews a worker's claims every ``timeout / 4`` seconds from a thread with a
  connection of its own (training holds the worker's), so that only the claims of a
  worker that died or lost the server go stale."""

  def __init__(self, url: str, worker: str, timeout: float):
    self._url, self._worker, self._timeout = url, worker, timeout
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def __enter__(self) -> "_Heartbeat":
    store = RunStore(self._url, create=False)
    claims = Claims(store, self._worker, self._timeout)
    self._thread = threading.Thread(target=self._beat, args=(store, claims), daemon=True,
                                    name="metaopt-sweep-heartbeat")
    self._thread.start()
    return self

  def _beat(self, store: RunStore, claims: Claims) -> None:
    try:
      while not self._stop.wait(self._timeout / 4):
        try:
          claims.renew()
        except ValueError:
          pass  # the server is gone for now: the claims go stale and are trained elsewhere
    finally:
      store.close()

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()


def claim_runs(store: RunStore, space: Space, jobs: Sequence[tuple], *, epochs: int, seed: int,
               claim_timeout: float = CLAIM_TIMEOUT, worker: Optional[str] = None,
               on_runs: Callable[[int], None] = lambda n: None) -> dict[str, int]:
  """Train the runs of ``jobs`` ((dataset, model, trials, micro) as :func:`sweep` plans
  them) that this worker claims from a PostgreSQL ``store``, alongside any number of
  workers on other hosts, until every run is stored; see :class:`Claims`. A unit whose
  runs another worker holds is waited for, and taken over once its claims are older
  than ``claim_timeout`` seconds. Returns the counts of ``COUNTS`` of this worker."""
  worker = worker or worker_id()
  units: dict[str, tuple] = {}
  planned = []
  for dataset, model, trials, micro in jobs:
    prefix = _key_prefix(dataset, model, epochs, seed, space)
    wanted = set(trials)
    for i, config in enumerate(trial_configs(space, dataset, model, max(wanted) + 1, seed)):
      if i in wanted:
        layers, width = group_key(resolve_hparams(config, model), model)
        unit = f"{prefix[:-1]}L{layers or 'any'}-W{width}"
        units[unit] = (dataset, model, micro)
        planned.append((prefix + str(i), unit, i))
  layouts = pad_layouts(jobs, seed)
  claims = Claims(store, worker, claim_timeout)
  claims.plan(planned)
  names = sorted(units)
  counts = dict.fromkeys(COUNTS, 0)
  with _Heartbeat(store.url, worker, claim_timeout):
    try:
      while True:
        unit, got = claims.take(names, GROUP_RUNS)
        if not got:
          if unit is None and not claims.unfinished(names):
            break
          if unit is None:  # the rest is claimed: wait for it, or for its claims to go stale
            time.sleep(min(5.0, claim_timeout / 4))
          continue
        dataset, model, micro = units[unit]
        c = run_task(store, space, dataset, model, [t for _, t in got], micro=micro,
                     epochs=epochs, seed=seed, on_runs=on_runs,
                     layout=layouts.get((dataset, model)))
        claims.finish([k for k, _ in got])
        counts = {k: counts[k] + c[k] for k in counts}
    finally:
      try:
        claims.release()  # stopped early (an error, Ctrl-C): others need not wait
      except ValueError:
        pass  # the server is gone: the claims go stale after the timeout instead
  claims.forget_finished(names)
  return counts


def _plan(space: Space, dataset: str, model: str, *, trials: int, epochs: int, seed: int,
          done: set) -> tuple[list[int], int]:
  """The trial numbers of a task not in ``done`` and the task's micro-batch, in one pass
  over its configurations (each checked: bad values fail before any training)."""
  prefix = _key_prefix(dataset, model, epochs, seed, space)
  categorical = _categorical_batch(space)
  todo, sizes = [], 0
  for i, config in enumerate(trial_configs(space, dataset, model, trials, seed)):
    h = resolve_hparams(config, model)
    if not categorical:
      sizes = math.gcd(sizes, h["batch_size"])
    if prefix + str(i) not in done:
      todo.append(i)
  m = math.gcd(*(int(c) for c in space["batch_size"].choices)) if categorical else sizes
  return todo, _divisor_at_most(m, num_train_examples(dataset))


def sweep(store: Union[RunStore, str, os.PathLike], *, datasets: Optional[Sequence[str]] = None,
          models: Optional[Sequence[str]] = None, space: Space = DEFAULT_SPACE,
          trials_per_task: int = 30, epochs: int = 5, seed: int = 0, workers: int = 1,
          progress: bool = True, claim_timeout: float = CLAIM_TIMEOUT) -> SweepReport:
  """Train ``trials_per_task`` configurations from ``space`` on every (dataset, model) pair
  (all datasets and model families by default; cnn only on image datasets) into ``store``
  (a RunStore, a path, or a database URL).

  Runs already in the store (same run_key) are skipped. ``workers > 1`` trains
  tasks in that many spawned processes writing into the same store.
  On a PostgreSQL store, workers of this call and of the same sweep on other hosts
  claim runs (:func:`claim_runs`); the claims of a worker that died go to another one
  after ``claim_timeout`` seconds. ``trials_per_task`` is at most ``MAX_TRIALS``,
  ``epochs`` at most ``MAX_EPOCHS``.
  """
  start = time.perf_counter()
  datasets = tuple(DATASETS if datasets is None else datasets)
  models = tuple(MODEL_KINDS if models is None else models)
  if not datasets or not models:
    raise ValueError(f"need at least one dataset and one model, got datasets={datasets!r}, "
                     f"models={models!r}")
  check_int("trials_per_task", trials_per_task, high=MAX_TRIALS)
  check_int("epochs", epochs, high=MAX_EPOCHS)
  check_int("workers", workers)
  if (not is_number(claim_timeout) or isinstance(claim_timeout, bool)
      or not 0 < claim_timeout <= MAX_CLAIM_TIMEOUT):
    raise ValueError(f"claim_timeout must be a number of seconds in (0, {MAX_CLAIM_TIMEOUT:g}], "
                     f"got {claim_timeout!r}")
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
      todo, micro = _plan(space, dataset, model, trials=trials_per_task, epochs=epochs,
                          seed=seed, done=done)
      skipped += trials_per_task - len(todo)
      if todo:
        jobs.append((dataset, model, todo, micro))
    counts = dict.fromkeys(COUNTS, 0)
    claiming = store.kind == "postgresql"
    layouts = {} if claiming else pad_layouts(jobs, seed)
    with tqdm(total=sum(len(j[2]) for j in jobs), desc="sweep runs", unit="run",
              disable=not progress) as bar:
      if claiming and jobs and workers == 1:
        counts = claim_runs(store, space, jobs, epochs=epochs, seed=seed,
                            claim_timeout=claim_timeout, on_runs=bar.update)
      elif claiming and jobs:
        calls = [(_claim_worker, (store.url, space, jobs, epochs, seed, claim_timeout))] * workers
        counts = _parallel(calls, workers, bar, counts)
      elif workers == 1 or len(jobs) <= 1:
        for dataset, model, todo, micro in jobs:
          bar.set_postfix_str(f"{dataset}/{model}")
          c = run_task(store, space, dataset, model, todo, micro=micro, epochs=epochs,
                       seed=seed, on_runs=bar.update, layout=layouts.get((dataset, model)))
          counts = {k: counts[k] + c[k] for k in counts}
      else:
        calls = [(_worker, (store.url, space, dataset, model, todo, micro, epochs, seed,
                            layouts.get((dataset, model))))
                 for dataset, model, todo, micro in jobs]
        counts = _parallel(calls, min(workers, len(jobs)), bar, counts)
    if claiming:  # every run is stored now: those this call did not add were skipped
      skipped, counts["skipped"] = trials_per_task * len(valid) - counts["added"], 0
    return SweepReport(counts["added"], skipped + counts["skipped"], counts["diverged"],
                       counts["failed"], len(valid), invalid, time.perf_counter() - start)
  finally:
    if own:
      store.close()


class _Terminated(SystemExit):
  """SIGTERM in the sweep's process, raised so that the workers are torn down first."""


@contextlib.contextmanager
def _sigterm_raises():
  """SIGTERM raises :class:`_Terminated` (exit status 143) while the pool runs, in the
  main thread and unless the program handles SIGTERM itself; Ctrl-C already raises
  KeyboardInterrupt."""
  if (threading.current_thread() is not threading.main_thread()
      or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
    yield
    return

  def handler(signum, frame):
    raise _Terminated(128 + signum)

  signal.signal(signal.SIGTERM, handler)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _drain(progress, bar, timeout: Optional[float] = None) -> None:
  """Moves the bar by the counts the workers reported (waiting up to ``timeout`` for one)."""
  try:
    bar.update(progress.get(timeout=timeout) if timeout else progress.get_nowait())
    while True:
      bar.update(progress.get_nowait())
  except queue.Empty:
    pass


def _tear_down(pool: concurrent.futures.ProcessPoolExecutor, futures) -> None:
  """Cancels what has not started and terminates the workers (they may be mid-training)."""
  for f in futures:
    f.cancel()
  # ProcessPoolExecutor has no public way to stop running work before Python 3.14.
  processes = list((getattr(pool, "_processes", None) or {}).values())
  for p in processes:
    p.terminate()
  pool.shutdown(wait=False, cancel_futures=True)
  for p in processes:
    p.join(timeout=5)
    if p.is_alive():
      p.kill()


def _parallel(calls: list, processes: int, bar, counts) -> dict:
  """Runs ``calls`` ((function, args) pairs returning counts) in ``processes`` spawned
  worker processes, adding up their counts."""
  ctx = multiprocessing.get_context("spawn")
  cache_dir = jax.config.jax_compilation_cache_dir
  # A queue of the parent's, not a Manager's: a manager is a server process of its own
  # that outlived a killed sweep.
  progress = ctx.Queue()
  pool = concurrent.futures.ProcessPoolExecutor(
      max_workers=processes, mp_context=ctx, initializer=_worker_init,
      initargs=(cache_dir, os.getpid(), progress))
  futures, finished = [], False
  try:
    with _sigterm_raises():
      futures = [pool.submit(fn, *args) for fn, args in calls]
      pending = set(futures)
      while pending:
        _drain(progress, bar, timeout=0.5)
        for f in [f for f in pending if f.done()]:
          pending.discard(f)
          c = f.result()  # re-raises a worker's error
          counts = {k: counts[k] + c[k] for k in counts}
      finished = True
  finally:
    if finished:
      pool.shutdown(wait=True)
      _drain(progress, bar)  # the last reports: a worker flushes its queue as it exits
    else:  # an error, Ctrl-C or SIGTERM: no worker may outlive this call
      _tear_down(pool, futures)
    progress.close()
    progress.cancel_join_thread()
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
