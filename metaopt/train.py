"""Plain training and evaluation, on the unroll core, shared by baselines and experiments.

One training run is ``steps`` optimizer steps in chunks of ``eval_every``; after
each chunk the whole validation and test splits are evaluated. The optimizer is
built inside the jitted function from ``hparams`` (e.g. a peak LR), so a grid of
hyperparameters or seeds is one ``jax.vmap``, compiled once.

Validation-driven optimizers: with ``feed_val_loss=True`` every step passes the
latest validation loss to ``tx.update`` as ``val_loss``, with ``new_eval=True``
on the first step after each evaluation (``False`` otherwise). When the
optimizer state holds a stop signal (``plateau_lr``, ``early_stopping``), the
loop obeys it: from the step that reads the stopping evaluation on, parameters
and optimizer state are frozen, and ``TrainResult.stopped_at`` records that step.

Dropout: ``dropout=fn`` picks the rate from ``hparams`` (``fn(hparams)``, may be
traced, so a grid of rates is one program); each step draws its masks from
``fold_in(step key, 1)``, so runs stay deterministic.

Recording: ``train_grid(..., store=RunStore or path)`` writes one row per run
into a :class:`metaopt.hparams.RunStore` (see :func:`record_runs`).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt.schedules import current_lr
from metaopt.schedules.plateau import has_stop_signal, should_stop
from metaopt.unroll import unroll

PyTree = Any
MakeTx = Callable[[PyTree], optax.GradientTransformation]
DropoutFn = Callable[[PyTree], jax.Array]


class TrainState(NamedTuple):
  params: PyTree
  opt_state: PyTree
  key: jax.Array  # raw uint32 key; batches are drawn from fold_in(key, step)
  step: jax.Array
  val_loss: Any = None   # latest validation loss (None: not tracked)
  new_eval: Any = None   # bool: val_loss is fresh (the first step after an evaluation)
  stopped: Any = None    # bool: early stopping has frozen the run (None: not tracked)
  stop_step: Any = None  # int32 step at which the run stopped (steps if it never did)


class TrainResult(NamedTuple):
  """Curves of one run (leading axes added by vmap for grids)."""
  train_loss: jax.Array      # [steps] minibatch loss at every step
  learning_rate: jax.Array   # [steps] LR applied at every step (NaN if unknown)
  eval_steps: jax.Array      # [evals] step count of each evaluation, 0 first
  val_loss: jax.Array        # [evals]
  val_accuracy: jax.Array
  test_loss: jax.Array
  test_accuracy: jax.Array
  stopped_at: jax.Array = None  # [] step at which early stopping froze the run, or steps


def steps_per_epoch(task) -> int:
  """Minibatches per pass over the training split: ``ceil(n_train / batch_size)``."""
  return math.ceil(task.data.x_train.shape[0] / task.config.batch_size)


def training_step(task, tx: optax.GradientTransformation, arrays: dict, *,
                  feed_val_loss: bool = False, dropout: Optional[DropoutFn] = None):
  """``step(hparams, state, _) -> (state, metrics)``: one minibatch update.

  With ``feed_val_loss``, ``tx.update`` also gets ``val_loss=state.val_loss``
  and ``new_eval=state.new_eval``. When ``state.stopped`` is tracked and the
  optimizer state holds a stop signal, a step that finds the signal set (or
  starts stopped) leaves params and optimizer state unchanged (except for the
  signal itself) and records a NaN loss. With ``dropout``, the loss drops
  activations at rate ``dropout(hparams)``.
  """
  def step(hparams, state: TrainState, _):
    step_key = jax.random.fold_in(state.key, state.step)
    batch = task.sample_batch(arrays, step_key)
    kw = {}
    if dropout is not None:  # hparams are otherwise already inside tx
      kw = dict(dropout_rate=dropout(hparams), key=jax.random.fold_in(step_key, 1))
    loss, grads = jax.value_and_grad(task.loss)(state.params, batch, **kw)
    extra = {}
    if feed_val_loss and state.val_loss is not None:
      extra = dict(val_loss=state.val_loss, new_eval=state.new_eval)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, value=loss, **extra)
    params = optax.apply_updates(state.params, updates)
    new = state._replace(params=params, opt_state=opt_state, step=state.step + 1)
    if state.new_eval is not None:
      new = new._replace(new_eval=jnp.zeros_like(state.new_eval))
    if state.stopped is not None and has_stop_signal(opt_state):
      stop = state.stopped | should_stop(opt_state)
      pick = lambda cond, a, b: jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)
      new = new._replace(
          params=pick(stop, state.params, params),
          opt_state=pick(state.stopped, state.opt_state, opt_state),
          stopped=stop,
          stop_step=jnp.where(stop & ~state.stopped, state.step, state.stop_step))
      loss = jnp.where(stop, jnp.nan, loss)
    return new, {"loss": loss, "learning_rate": current_lr(new.opt_state)}
  return step


def make_train_fn(task, make_tx: MakeTx, *, steps: int, eval_every: int,
                  feed_val_loss: bool = False, dropout: Optional[DropoutFn] = None):
  """``run(hparams, key, arrays) -> TrainResult``, pure and jit/vmap-able.

  ``feed_val_loss``: pass the latest validation loss to the optimizer (see the
  module docstring). Early stopping needs it to ever trigger. ``dropout``: a
  function of ``hparams`` giving the dropout rate (None: no dropout).
  """
  if steps < 1 or eval_every < 1 or steps % eval_every:
    raise ValueError(f"need steps >= 1 divisible by eval_every >= 1, got "
                     f"steps={steps}, eval_every={eval_every}")

  def evaluate(params, arrays):
    val = task.metrics(params, arrays["x_val"], arrays["y_val"])
    test = task.metrics(params, arrays["x_test"], arrays["y_test"])
    return (val["loss"], val["accuracy"], test["loss"], test["accuracy"])

  def run(hparams, key, arrays) -> TrainResult:
    tx = make_tx(hparams)
    init_key, data_key = jax.random.split(key)
    params = task.init(init_key)
    first = evaluate(params, arrays)
    # The initial evaluation is the first val_loss, but not a new one: the
    # optimizer counts only the evaluations after each chunk of steps.
    state = TrainState(params, tx.init(params), data_key, jnp.zeros((), jnp.int32),
                       val_loss=first[0], new_eval=jnp.asarray(False),
                       stopped=jnp.asarray(False), stop_step=jnp.asarray(steps, jnp.int32))
    step = training_step(task, tx, arrays, feed_val_loss=feed_val_loss, dropout=dropout)

    def chunk(state, _):
      state, metrics = unroll(step, hparams, state, None, length=eval_every)
      evals = evaluate(state.params, arrays)
      state = state._replace(val_loss=evals[0], new_eval=jnp.asarray(True))
      return state, (metrics, evals)

    final, (metrics, evals) = jax.lax.scan(chunk, state, None, length=steps // eval_every)
    evals = [jnp.concatenate([f[None], e]) for f, e in zip(first, evals)]
    return TrainResult(
        train_loss=metrics["loss"].reshape(-1),
        learning_rate=metrics["learning_rate"].reshape(-1),
        eval_steps=jnp.arange(0, steps + 1, eval_every),
        val_loss=evals[0], val_accuracy=evals[1],
        test_loss=evals[2], test_accuracy=evals[3],
        stopped_at=final.stop_step)

  return run


def train_grid(task, make_tx: MakeTx, hparams: PyTree, keys: jax.Array, *,
               steps: int, eval_every: int, vectorize: bool = True,
               feed_val_loss: bool = False, dropout: Optional[DropoutFn] = None,
               store: Any = None, run_info: Optional[dict] = None
               ) -> tuple[TrainResult, float]:
  """Trains one run per (hparams row, key) pair in one compiled program.

  ``hparams`` leaves and ``keys`` share a leading axis. Runs are vmapped, or
  with ``vectorize=False`` mapped one after another (vmapped convolutions
  become grouped convolutions, which are slow on the CPU). ``feed_val_loss``,
  ``dropout``: see :func:`make_train_fn`. ``store``: a RunStore or a path to
  record every run into (:func:`record_runs`; ``run_info`` is added to each
  run's hyperparameters, e.g. ``{"schedule": "cosine"}``). Returns the stacked
  results (as numpy) and the wall time of the compiled call in seconds.
  """
  one = make_train_fn(task, make_tx, steps=steps, eval_every=eval_every,
                      feed_val_loss=feed_val_loss, dropout=dropout)
  if vectorize:
    run = jax.jit(jax.vmap(one, in_axes=(0, 0, None)))
  else:
    run = jax.jit(lambda h, k, a: jax.lax.map(lambda hk: one(*hk, a), (h, k)))
  arrays = task.arrays()
  compiled = run.lower(hparams, keys, arrays).compile()
  start = time.perf_counter()
  result = jax.block_until_ready(compiled(hparams, keys, arrays))
  result, wall = jax.tree.map(np.asarray, result), time.perf_counter() - start
  if store is not None:
    record_runs(store, task, hparams, result, wall, run_info=run_info, keys=keys)
  return result, wall


def _hparam_rows(hparams: PyTree, n: int) -> tuple[list[dict], list[dict]]:
  """Per-run (scalar, array) hyperparameter dicts from a batched pytree (dict keys name them)."""
  flat = jax.tree_util.tree_flatten_with_path(hparams)[0]
  scalars, arrays = [{} for _ in range(n)], [{} for _ in range(n)]
  for path, leaf in flat:
    name = ".".join(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p))))
                    for p in path) or "hparam"
    values = np.asarray(leaf).reshape(n, -1)
    for s, a, v in zip(scalars, arrays, values):
      if v.size == 1:  # shortest decimal of the stored precision: 1e-3, not 0.0010000000474974513
        s[name] = float(str(v[0])) if np.issubdtype(v.dtype, np.floating) else v[0].item()
      else:
        a[name] = v.tolist()
  return scalars, arrays


def run_status(result: TrainResult) -> np.ndarray:
  """Per run: "diverged" if the training loss (before any early stop) or the validation
  loss became non-finite, else "completed"."""
  loss = np.atleast_2d(result.train_loss)
  steps = loss.shape[-1]
  stop = (np.full(len(loss), steps) if result.stopped_at is None
          else np.asarray(result.stopped_at).reshape(-1))
  live = np.arange(steps)[None, :] < stop[:, None]
  bad_train = (~np.isfinite(loss) & live).any(axis=-1)
  bad_val = ~np.isfinite(np.atleast_2d(result.val_loss)).all(axis=-1)
  return np.where(bad_train | bad_val, "diverged", "completed")


def result_rows(task, hparams: PyTree, result: TrainResult, wall_time: float, *,
                task_features: Optional[dict] = None, run_info: Optional[dict] = None,
                run_keys: Optional[list] = None, keys: Any = None,
                model: Optional[dict] = None) -> list[dict]:
  """RunStore rows (dicts of ``RunStore.add`` arguments) for a grid trained by train_grid.

  Hyperparameters: the task's ``batch_size`` and ``layers`` (its depth), the
  ``hparams`` row (a dict's keys, else ``hparam``) and ``run_info``. Metrics:
  final val/test loss and accuracy, best val accuracy, last-chunk train loss.
  Curves: the same per evaluation. Features: ``task_features`` or the task's
  meta-features from metaopt.hparams.features. Wall time: an equal share.
  """
  n = int(np.asarray(result.val_loss).shape[0])
  cfg = task.config
  steps = int(np.asarray(result.train_loss).shape[-1])
  evals = np.asarray(result.eval_steps).reshape(n, -1)[0]
  every = int(evals[1] - evals[0]) if len(evals) > 1 else steps
  if task_features is None:
    from metaopt.hparams.features import task_features as features_of
    task_features = features_of(task.data, model_family=cfg.model,
                                epochs=steps / steps_per_epoch(task))
  if model is None:
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
        jax.eval_shape(task.init, jax.random.PRNGKey(0))))
    model = {"family": cfg.model, "width": cfg.width, "depth": cfg.depth, "n_params": n_params}
  status = run_status(result)
  train_loss = np.asarray(result.train_loss).reshape(n, -1, every)
  with np.errstate(all="ignore"):
    chunk_loss = np.array([[np.nanmean(c) if np.isfinite(c).any() else np.nan for c in run]
                           for run in train_loss])
  key_data = None
  if keys is not None:
    k = np.asarray(jax.random.key_data(keys) if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
                   else keys)
    key_data = k.reshape(n, -1).tolist()
  rows = []
  scalars, arrays = _hparam_rows(hparams, n)
  for i, hp in enumerate(scalars):
    curves = {name: np.asarray(getattr(result, name))[i].tolist()
              for name in ("val_loss", "val_accuracy", "test_loss", "test_accuracy")}
    curves["train_loss"] = [math.nan] + chunk_loss[i].tolist()  # aligned with eval_steps
    val_acc = np.asarray(result.val_accuracy)[i]
    metrics = {name: float(values[-1]) for name, values in curves.items()}
    metrics["best_val_accuracy"] = float(np.nanmax(val_acc)) if np.isfinite(val_acc).any() \
        else math.nan
    extra = {"steps": steps, "eval_every": every, "eval_steps": evals.tolist(),
             "dataset_seed": cfg.seed}
    if key_data is not None:
      extra["key"] = key_data[i]
    if arrays[i]:
      extra["array_hparams"] = arrays[i]
    rows.append(dict(
        task=cfg.dataset, task_features=task_features,
        hparams={"batch_size": cfg.batch_size, "layers": cfg.depth, **hp, **(run_info or {})},
        metrics=metrics, curves=curves, model=model, status=str(status[i]),
        wall_time=wall_time / n, run_key=None if run_keys is None else run_keys[i],
        extra=extra))
  return rows


def record_runs(store: Any, task, hparams: PyTree, result: TrainResult, wall_time: float,
                **kw) -> list[int]:
  """Add :func:`result_rows` to ``store`` (a RunStore, or a path opened and closed here)."""
  from metaopt.hparams.store import RunStore
  rows = result_rows(task, hparams, result, wall_time, **kw)
  if isinstance(store, RunStore):
    return store.add_many(rows)
  with RunStore(store) as opened:
    return opened.add_many(rows)
