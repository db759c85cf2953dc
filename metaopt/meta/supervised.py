"""An LR controller learned from a supervised meta-dataset.

1. *Preliminary runs*: on tasks drawn from a :class:`~metaopt.tasks.TaskFamily`, Adam
   trains under hand schedules (constant, cosine, step; several peak LRs), all
   vmapped in one program per task. At ``points`` fixed points of each run the state
   (parameters, Adam moments, data key, step) is saved, together with the features
   the learned-LR controller would see there (:data:`metaopt.FEATURE_NAMES`).
2. *Look-ahead*: from every saved state, every LR of ``lr_grid`` trains
   ``lookahead`` more steps (same batches for every LR); the state is labelled with
   the LR whose run ends with the lowest validation loss.
3. The meta-dataset (features, label, every look-ahead loss, where each state came
   from) is written to ``meta_dataset.npz`` with a ``.csv`` and ``.json`` beside it,
   for people to read and for reuse (:func:`load_meta_dataset`).
4. *Fit*: an :class:`~metaopt.LRController` (or an LSTM controller, fed each run's
   states in order) learns ``log(label / learning_rate)`` from the features (mean
   squared error of its bounded output; Adam, meta LR 1e-3, meta-batch 32, 50
   meta-epochs as in the plan).

The result is an ordinary controller file (:func:`metaopt.save_controller`), so
``metaopt.pretrained_lr(path, total_steps=...)`` deploys it through
:func:`metaopt.scale_by_learned_lr`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
import time
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt.schedules import init_controller, save_controller, unit_schedule
from metaopt.schedules.learned_lr import (CONTROLLERS, DEFAULT_SETTINGS, FEATURE_NAMES,
                                          ControllerSpec, LearnedLRState, apply_controller,
                                          controller_features, controller_memory, init_lr_state,
                                          is_recurrent, make_controller)
from metaopt.tasks import TaskFamily, make_task, task_family
from metaopt.train import run_loop
from metaopt.unroll import unroll
from metaopt.validation import check_choice, check_int, check_positive, check_seed

PyTree = Any
DATASET_FILE = "meta_dataset.npz"
DATASET_FORMAT = "metaopt-lr-meta-dataset"
DATASET_VERSION = 1
PRELIMINARY_SCHEDULES = ("constant", "cosine", "step")
CONTROLLER_KINDS = tuple(CONTROLLERS)  # "mlp" (LRController), "lstm" (LSTMController)


def check_lr_grid(lrs: Sequence[float], name: str = "lr_grid") -> tuple[float, ...]:
  """``lrs`` as a non-empty tuple of positive, finite floats; ValueError naming a bad entry."""
  lrs = tuple(lrs)
  if not lrs:
    raise ValueError(f"{name} must hold at least one learning rate, got an empty grid")
  for i, lr in enumerate(lrs):
    check_positive(f"{name}[{i}]", lr)
  return tuple(float(lr) for lr in lrs)


@dataclasses.dataclass(frozen=True)
class SupervisedConfig:
  """Settings of :func:`train_supervised`."""
  family: TaskFamily
  tasks: int = 6                  # tasks of the family with preliminary runs
  schedules: tuple[str, ...] = PRELIMINARY_SCHEDULES
  schedule_lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)  # peak LRs of the preliminary runs
  points: int = 10                # saved states per run, one per "epoch"
  lookahead: int = 25             # steps each LR of the grid trains from a saved state
  lr_grid: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
  meta_lr: float = 1e-3           # the plan: Adam 1e-3, meta-batch 32, 50 meta-epochs
  meta_batch: int = 32
  meta_epochs: int = 50
  learning_rate: float = 1e-3     # what an untrained controller keeps; bounds relative to it
  hidden: tuple[int, ...] = (32, 32)
  controller: str = "mlp"         # or "lstm": fitted on each run's sequence of states
  min_lr_factor: float = DEFAULT_SETTINGS["min_lr_factor"]
  max_lr_factor: float = DEFAULT_SETTINGS["max_lr_factor"]
  max_log_change: float = DEFAULT_SETTINGS["max_log_change"]
  response_time: float = DEFAULT_SETTINGS["response_time"]
  min_response_steps: float = DEFAULT_SETTINGS["min_response_steps"]
  seed: int = 0

  def __post_init__(self):
    for name in ("tasks", "points", "lookahead", "meta_batch", "meta_epochs"):
      check_int(name, getattr(self, name))
    check_seed("seed", self.seed)
    for name in ("meta_lr", "learning_rate"):
      check_positive(name, getattr(self, name))
    check_choice("controller kind", self.controller, CONTROLLER_KINDS)
    if not isinstance(self.family, TaskFamily):
      raise ValueError(f"family must be a TaskFamily (metaopt.tasks.task_family), "
                       f"got {self.family!r}")
    task_family(*self.family)
    if not self.schedules:
      raise ValueError("schedules must name at least one preliminary schedule")
    for name in self.schedules:
      check_choice("preliminary schedule", name, PRELIMINARY_SCHEDULES)
    check_lr_grid(self.schedule_lrs, "schedule_lrs")
    grid = check_lr_grid(self.lr_grid)
    for width in self.hidden:
      check_int("hidden", width)
    low = self.learning_rate * self.min_lr_factor
    high = self.learning_rate * self.max_lr_factor
    for i, lr in enumerate(grid):
      if not low <= lr <= high:
        raise ValueError(f"lr_grid[{i}] = {lr:g} is outside the controller's range "
                         f"[{low:g}, {high:g}] (learning_rate x [min_lr_factor, "
                         "max_lr_factor]); it could never be reached")
    bad = [s for s in self.family.total_steps if s % self.points]
    if bad:
      raise ValueError(f"training lengths {bad} are not multiples of points={self.points}")

  @property
  def settings(self) -> dict:
    """The keyword arguments the controller is deployed with (see MetaLRConfig.settings)."""
    return dict(min_lr_factor=self.min_lr_factor, max_lr_factor=self.max_lr_factor,
                max_log_change=self.max_log_change, response_time=self.response_time,
                min_response_steps=self.min_response_steps)


class MetaDataset(NamedTuple):
  """Labelled states, one row each (numpy arrays with a leading axis of rows)."""
  features: np.ndarray          # [n, len(FEATURE_NAMES)] what the controller sees there
  label: np.ndarray             # [n] the grid LR with the lowest look-ahead val loss
  lookahead_loss: np.ndarray    # [n, grid] validation loss after each look-ahead
  lr_grid: np.ndarray           # [grid]
  task: np.ndarray              # [n] task name
  schedule: np.ndarray          # [n] preliminary schedule
  schedule_lr: np.ndarray       # [n] its peak LR
  step: np.ndarray              # [n] step of the run the state was saved at
  total_steps: np.ndarray       # [n] length of that run
  learning_rate: float = 1e-3   # the controller's base LR: targets are log(label / it)
  run: Optional[np.ndarray] = None  # [n] which preliminary run (a sequence for an LSTM)

  @property
  def rows(self) -> int:
    return int(self.label.shape[0])

  @property
  def targets(self) -> np.ndarray:
    """What the controller is fitted to: ``log(label / learning_rate)``."""
    return np.log(self.label / self.learning_rate).astype(np.float32)


# --- labelling ---------------------------------------------------------------------------


def lookahead_losses(step, val_loss, states: PyTree, lrs: Sequence[float], steps: int
                     ) -> jax.Array:
  """Validation loss after ``steps`` steps at each LR of ``lrs``, from each state.

  ``step(state, lr) -> state`` is one training step; ``val_loss(state) -> scalar``.
  ``states`` has a leading axis of states. Returns ``[states, len(lrs)]``: one
  vmapped scan over states and LRs (jit the caller, or this, to compile it once).
  """
  lrs = jnp.asarray(check_lr_grid(lrs), jnp.float32)
  steps = check_int("lookahead steps", steps)

  def one(state, lr):
    final, _ = unroll(lambda lr_, s, _: (step(s, lr_), None), lr, state, None, length=steps)
    return val_loss(final)

  return jax.vmap(lambda s: jax.vmap(lambda lr: one(s, lr))(lrs))(states)


def best_lrs(losses, lrs: Sequence[float]) -> np.ndarray:
  """Per row of ``losses`` ``[n, len(lrs)]``, the LR with the lowest loss (NaN loses;
  ties go to the smaller LR); NaN for a row where every loss is non-finite."""
  losses = np.asarray(losses, np.float64)
  lrs = np.asarray(check_lr_grid(lrs), np.float64)
  if losses.ndim != 2 or losses.shape[1] != len(lrs):
    raise ValueError(f"losses must have shape [states, {len(lrs)}], got {losses.shape}")
  order = np.argsort(lrs, kind="stable")
  safe = np.where(np.isfinite(losses), losses, np.inf)[:, order]
  best = lrs[order][np.argmin(safe, axis=1)]
  return np.where(np.isfinite(safe).any(axis=1), best, np.nan)


# --- preliminary runs ----------------------------------------------------------------------


class PrelimState(NamedTuple):
  params: PyTree
  adam: PyTree
  features: LearnedLRState  # the controller's feature statistics along the run
  key: jax.Array
  step: jax.Array


def _direction():
  # The direction learned_lr_tx scales (eps_root as in meta-training).
  return optax.scale_by_adam(eps_root=1e-8)


def _collect_fn(task, config: SupervisedConfig):
  """``collect(hparams, key, arrays) -> (features, losses)`` for one task, jitted:
  preliminary runs vmapped over ``hparams = (schedule index, peak LR)``, then every
  look-ahead from each saved state."""
  total = task.config.total_steps
  every = total // config.points
  units = [unit_schedule(name, total) for name in config.schedules]
  spec = ControllerSpec(None, config.learning_rate, 0.0, 0.0, 1.0, 1.0, 1.0)
  direction = _direction()

  def train_step(state: PrelimState, lr, arrays):
    key = jax.random.fold_in(state.key, state.step)
    loss, grads = jax.value_and_grad(task.loss)(state.params, task.sample_batch(arrays, key))
    updates, adam = direction.update(grads, state.adam)
    params = jax.tree.map(lambda p, u: p - lr * u, state.params, updates)
    return loss, updates, PrelimState(params, adam, state.features, state.key, state.step + 1)

  def prelim_step(hp, state: PrelimState, arrays):
    index, peak = hp
    lr = peak * jnp.stack([u(state.step) for u in units])[index]
    loss, updates, new = train_step(state, lr, arrays)
    f = state.features
    feats, stats = controller_features(f, spec, loss, f.features.last_norm, None)
    stats = stats._replace(last_norm=optax.tree.norm(updates).astype(jnp.float32))
    new = new._replace(features=LearnedLRState(None, stats, jnp.asarray(lr, jnp.float32)))
    return new, feats

  def run(hp, key, arrays):
    params = task.init(jax.random.fold_in(key, 0))
    state = PrelimState(params, direction.init(params),
                        init_lr_state(None, base_lr=config.learning_rate, total_steps=total),
                        jax.random.fold_in(key, 1), jnp.zeros((), jnp.int32))

    def epoch(state, _):
      # The state saved at the start of each epoch, and the features the controller
      # computes at that step: the decision the label is for.
      new, feats = unroll(lambda h, s, _: prelim_step(h, s, arrays), hp, state, None,
                          length=every)
      return new, (state, feats[0])

    _, (saved, feats) = jax.lax.scan(epoch, state, None, length=config.points)
    return saved, feats

  def val_loss(state: PrelimState, arrays):
    return task.metrics(state.params, arrays["x_val"], arrays["y_val"])["loss"]

  def collect(hparams, keys, arrays):
    saved, feats = jax.vmap(run, in_axes=(0, 0, None))(hparams, keys, arrays)
    flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), saved)
    losses = lookahead_losses(lambda s, lr: train_step(s, lr, arrays)[2],
                              lambda s: val_loss(s, arrays), flat, config.lr_grid,
                              config.lookahead)
    return feats.reshape((-1, feats.shape[-1])), losses

  return jax.jit(collect)


def collect_meta_dataset(config: SupervisedConfig, *, progress: bool = True
                         ) -> tuple[MetaDataset, dict]:
  """Preliminary runs, look-aheads and labels on ``config.tasks`` tasks of the family.

  Returns the meta-dataset and its cost: ``inner_steps`` (every training step of the
  preliminary runs and look-aheads) and ``seconds``.
  """
  root = jax.random.PRNGKey(config.seed)
  grid = np.asarray(config.lr_grid, np.float32)
  runs = [(i, lr) for i in range(len(config.schedules)) for lr in config.schedule_lrs]
  hparams = (jnp.asarray([i for i, _ in runs], jnp.int32),
             jnp.asarray([lr for _, lr in runs], jnp.float32))
  parts, cost = [], {"inner_steps": 0}
  fns: dict = {}

  def advance(state, record, start, n):
    rows = []
    for t in range(start, start + n):
      task = make_task(config.family.sample(jax.random.fold_in(root, t)))
      c = task.config
      shape = (c.dataset, c.model, c.width, c.depth, c.batch_size, c.total_steps)
      if shape not in fns:
        fns[shape] = _collect_fn(task, config)
      keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(root, 10_000 + t), r))(
          jnp.arange(len(runs)))
      feats, losses = jax.device_get(fns[shape](hparams, keys, task.arrays()))
      every = c.total_steps // config.points
      labels = best_lrs(losses, grid)
      parts.append(dict(
          features=feats, label=labels, lookahead_loss=losses,
          task=np.repeat(c.name, len(labels)),
          schedule=np.repeat([config.schedules[i] for i, _ in runs], config.points),
          schedule_lr=np.repeat([lr for _, lr in runs], config.points).astype(np.float32),
          step=np.tile(np.arange(config.points) * every, len(runs)),
          run=np.repeat(np.arange(len(runs)) + t * len(runs), config.points),
          total_steps=np.full(len(labels), c.total_steps)))
      cost["inner_steps"] += len(runs) * c.total_steps + losses.size * config.lookahead
      rows.append({"task": c.name, "states": int(np.isfinite(labels).sum()),
                   "mean_log_label": float(np.nanmean(np.log(labels)))})
    return state, record, rows

  result = run_loop(advance, {}, steps=config.tasks, progress=progress,
                    desc="preliminary runs", postfix=lambda r: {"task": r["task"]})
  cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  keep = np.isfinite(cat["label"]) & np.all(np.isfinite(cat["features"]), axis=1)
  cat = {k: v[keep] for k, v in cat.items()}
  cost["seconds"] = result.seconds
  cost["dropped_states"] = int((~keep).sum())
  return MetaDataset(lr_grid=grid, learning_rate=float(config.learning_rate), **cat), cost


# --- the meta-dataset file ---------------------------------------------------------------


def save_meta_dataset(path, dataset: MetaDataset, *, info: Optional[dict] = None
                      ) -> pathlib.Path:
  """Writes ``dataset`` to ``path`` (a ``.npz``), with ``.json`` (what the columns are,
  the grid, ``info``) and ``.csv`` (one row per state: where it came from, its
  features by name, the label and every look-ahead loss) beside it."""
  path = pathlib.Path(path)
  if path.suffix != ".npz":
    raise ValueError(f"meta-dataset path {str(path)!r} must end in .npz")
  path.parent.mkdir(parents=True, exist_ok=True)
  arrays = {k: np.asarray(v) for k, v in dataset._asdict().items() if v is not None}
  arrays["task"] = arrays["task"].astype(str)
  arrays["schedule"] = arrays["schedule"].astype(str)
  np.savez(path, feature_names=np.asarray(FEATURE_NAMES), format=np.asarray(DATASET_FORMAT),
           version=np.asarray(DATASET_VERSION), **arrays)
  meta = dict(format=DATASET_FORMAT, version=DATASET_VERSION, rows=dataset.rows,
              feature_names=list(FEATURE_NAMES), lr_grid=dataset.lr_grid.tolist(),
              learning_rate=dataset.learning_rate,
              label="the grid LR whose look-ahead ended with the lowest validation loss",
              target="log(label / learning_rate), what the controller is fitted to",
              info=dict(info or {}))
  path.with_suffix(".json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
  loss_cols = [f"lookahead_loss@{lr:g}" for lr in dataset.lr_grid]
  with path.with_suffix(".csv").open("w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["task", "schedule", "schedule_lr", "step", "total_steps",
                     *FEATURE_NAMES, "label", *loss_cols])
    for i in range(dataset.rows):
      writer.writerow([dataset.task[i], dataset.schedule[i], f"{dataset.schedule_lr[i]:g}",
                       int(dataset.step[i]), int(dataset.total_steps[i]),
                       *(f"{x:.6g}" for x in dataset.features[i]), f"{dataset.label[i]:g}",
                       *(f"{x:.6g}" for x in dataset.lookahead_loss[i])])
  return path


def load_meta_dataset(path) -> MetaDataset:
  """The meta-dataset saved at ``path`` by :func:`save_meta_dataset`."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"meta-dataset {path} not found; write one with "
                            "metaopt.meta.supervised.save_meta_dataset")
  with np.load(path, allow_pickle=False) as z:
    if "format" not in z or str(z["format"]) != DATASET_FORMAT:
      raise ValueError(f"{path} is not a metaopt meta-dataset")
    if int(z["version"]) > DATASET_VERSION:
      raise ValueError(f"{path} has meta-dataset version {int(z['version'])}; this metaopt "
                       f"reads version {DATASET_VERSION} and older: upgrade metaopt")
    if tuple(z["feature_names"].tolist()) != FEATURE_NAMES:
      raise ValueError(f"{path} holds features {z['feature_names'].tolist()}, this version "
                       f"computes {list(FEATURE_NAMES)}")
    fields = {k: z[k] for k in MetaDataset._fields if k != "learning_rate" and k in z}
    return MetaDataset(learning_rate=float(z["learning_rate"]), **fields)


# --- fitting -------------------------------------------------------------------------------


def _bounded(raw, low, high):
  """The squashing of scale_by_learned_lr: the log-LR target a raw output asks for."""
  return jnp.where(raw > 0, high * jnp.tanh(raw / high), low * jnp.tanh(raw / low))


class FitResult(NamedTuple):
  theta: PyTree
  history: list   # one dict per meta-epoch: mean squared error, label accuracy
  seconds: float


def _sequences(dataset: MetaDataset, recurrent: bool):
  """Rows as sequences ``[sequences, length]`` of row indices: one row each for a
  feed-forward controller; each preliminary run's states in step order for a recurrent
  one (runs that lost a state to divergence are left out)."""
  if not recurrent:
    return np.arange(dataset.rows)[:, None]
  if dataset.run is None:
    raise ValueError("an LSTM controller needs the meta-dataset's run column (rebuild it "
                     "with this metaopt)")
  runs = [np.flatnonzero(dataset.run == r) for r in np.unique(dataset.run)]
  length = max(len(r) for r in runs)
  full = [r[np.argsort(dataset.step[r], kind="stable")] for r in runs if len(r) == length]
  if not full:
    raise ValueError("no preliminary run kept all its states; an LSTM needs whole runs")
  return np.stack(full)


def fit_controller(dataset: MetaDataset, config: SupervisedConfig, *, progress: bool = True
                   ) -> FitResult:
  """Fits the controller of ``config.controller`` to ``dataset.targets`` from its
  features: Adam (``config.meta_lr``), minibatches of ``config.meta_batch`` rows (an
  MLP) or whole runs (an LSTM, which reads a run's states in order, one per decision),
  reshuffled every one of ``config.meta_epochs`` meta-epochs."""
  if dataset.rows == 0:
    raise ValueError("the meta-dataset has no labelled states (every preliminary run "
                     "diverged?); widen schedule_lrs or lr_grid")
  controller = make_controller(config.controller, config.hidden)
  recurrent = is_recurrent(controller)
  seqs = jnp.asarray(_sequences(dataset, recurrent))
  n = seqs.shape[0]
  low, high = np.log(config.min_lr_factor), np.log(config.max_lr_factor)
  x = jnp.asarray(dataset.features, jnp.float32)
  y = jnp.asarray(np.clip(dataset.targets, low, high), jnp.float32)
  grid = jnp.log(jnp.asarray(dataset.lr_grid, jnp.float32) / dataset.learning_rate)
  batch = min(config.meta_batch, n)
  batches = n // batch
  opt = optax.adam(config.meta_lr)
  root = jax.random.PRNGKey(config.seed)

  def predict_one(theta, rows):
    """Bounded targets along one sequence of rows, the memory carried as deployed."""
    def step(memory, row):
      raw, memory = apply_controller(controller, theta, x[row], memory)
      return memory, _bounded(raw, low, high)
    return jax.lax.scan(step, controller_memory(controller), rows)[1]

  predict = jax.vmap(predict_one, in_axes=(None, 0))

  def loss_fn(theta, idx):
    rows = seqs[idx]
    return jnp.mean((predict(theta, rows) - y[rows]) ** 2)

  @jax.jit
  def epoch(state, t):
    theta, opt_state = state
    order = jax.random.permutation(jax.random.fold_in(root, t), n)[:batches * batch]

    def body(carry, idx):
      theta, opt_state = carry
      loss, grad = jax.value_and_grad(loss_fn)(theta, idx)
      updates, opt_state = opt.update(grad, opt_state, theta)
      return (optax.apply_updates(theta, updates), opt_state), loss

    (theta, opt_state), losses = jax.lax.scan(body, (theta, opt_state),
                                              order.reshape(batches, batch))
    pred, target = predict(theta, seqs).reshape(-1), y[seqs].reshape(-1)
    nearest = jnp.argmin(jnp.abs(pred[:, None] - grid[None, :]), axis=1)
    accuracy = jnp.mean(jnp.abs(grid[nearest] - target) < 1e-6)
    return (theta, opt_state), {"mse": jnp.mean(losses)[None],
                                "label_accuracy": accuracy[None]}

  def advance(state, record, start, k):
    state, metrics = epoch(state, jnp.int32(start))
    return state, record, metrics

  theta = init_controller(jax.random.fold_in(root, 1), controller)
  result = run_loop(advance, (theta, opt.init(theta)), steps=config.meta_epochs,
                    progress=progress, desc="fitting the controller")
  return FitResult(result.state[0], result.history, result.seconds)


# --- all of it ----------------------------------------------------------------------------


class SupervisedResult(NamedTuple):
  theta: PyTree
  controller: Any        # the fitted module: LRController or LSTMController
  dataset: MetaDataset
  history: list          # the fit, one dict per meta-epoch
  inner_steps: int       # training steps spent building the meta-dataset
  seconds: float         # wall time: preliminary runs, look-aheads and fit
  config: SupervisedConfig

  def save(self, path, *, update_every: int = 1, info: Optional[dict] = None
           ) -> pathlib.Path:
    """Writes the controller (:func:`metaopt.save_controller`) for
    :func:`metaopt.pretrained_lr` (``path=``). It was fitted to decide once per epoch
    (``total_steps // points`` steps of a preliminary run): pass that interval as
    ``update_every`` here, or to ``pretrained_lr`` for each run it deploys to."""
    c = self.config
    return save_controller(path, self.theta, settings=c.settings, hidden=c.hidden,
                           learning_rate=c.learning_rate, kind=c.controller,
                           update_every=update_every,
                           info={"method": "supervised meta-dataset", "seed": c.seed,
                                 "states": self.dataset.rows, **(info or {})})


def train_supervised(config: SupervisedConfig, out_dir=None, *, progress: bool = True
                     ) -> SupervisedResult:
  """Builds the meta-dataset and fits the controller to it.

  With ``out_dir``, writes ``meta_dataset.npz`` (with ``.csv`` and ``.json``) and the
  controller files there; a meta-dataset already in ``out_dir`` is reused, not rebuilt.
  """
  start = time.perf_counter()
  path = None if out_dir is None else pathlib.Path(out_dir) / DATASET_FILE
  if path is not None and path.exists():
    dataset = load_meta_dataset(path)
    cost = json.loads(path.with_suffix(".json").read_text())["info"].get("cost", {})
    print(f"metaopt: reusing the meta-dataset {path} ({dataset.rows} states)", flush=True)
  else:
    dataset, cost = collect_meta_dataset(config, progress=progress)
    if path is not None:
      save_meta_dataset(path, dataset, info={"cost": cost, "seed": config.seed,
                                             "schedules": list(config.schedules),
                                             "schedule_lrs": list(config.schedule_lrs),
                                             "lookahead": config.lookahead})
  fit = fit_controller(dataset, config, progress=progress)
  result = SupervisedResult(fit.theta, make_controller(config.controller, config.hidden),
                            dataset,
                            fit.history, int(cost.get("inner_steps", 0)),
                            time.perf_counter() - start, config)
  if out_dir is not None:
    result.save(pathlib.Path(out_dir) / "controller")
  return result
