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
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt.schedules import current_lr
from metaopt.schedules.plateau import has_stop_signal, should_stop
from metaopt.unroll import unroll

PyTree = Any
MakeTx = Callable[[PyTree], optax.GradientTransformation]


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
                  feed_val_loss: bool = False):
  """``step(hparams, state, _) -> (state, metrics)``: one minibatch update.

  With ``feed_val_loss``, ``tx.update`` also gets ``val_loss=state.val_loss``
  and ``new_eval=state.new_eval``. When ``state.stopped`` is tracked and the
  optimizer state holds a stop signal, a step that finds the signal set (or
  starts stopped) leaves params and optimizer state unchanged (except for the
  signal itself) and records a NaN loss.
  """
  def step(hparams, state: TrainState, _):
    del hparams  # already inside tx
    batch = task.sample_batch(arrays, jax.random.fold_in(state.key, state.step))
    loss, grads = jax.value_and_grad(task.loss)(state.params, batch)
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
                  feed_val_loss: bool = False):
  """``run(hparams, key, arrays) -> TrainResult``, pure and jit/vmap-able.

  ``feed_val_loss``: pass the latest validation loss to the optimizer (see the
  module docstring). Early stopping needs it to ever trigger.
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
    step = training_step(task, tx, arrays, feed_val_loss=feed_val_loss)

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
               feed_val_loss: bool = False) -> tuple[TrainResult, float]:
  """Trains one run per (hparams row, key) pair in one compiled program.

  ``hparams`` leaves and ``keys`` share a leading axis. Runs are vmapped, or
  with ``vectorize=False`` mapped one after another (vmapped convolutions
  become grouped convolutions, which are slow on the CPU). ``feed_val_loss``:
  see :func:`make_train_fn`. Returns the stacked
  results (as numpy) and the wall time of the compiled call in seconds.
  """
  one = make_train_fn(task, make_tx, steps=steps, eval_every=eval_every,
                      feed_val_loss=feed_val_loss)
  if vectorize:
    run = jax.jit(jax.vmap(one, in_axes=(0, 0, None)))
  else:
    run = jax.jit(lambda h, k, a: jax.lax.map(lambda hk: one(*hk, a), (h, k)))
  arrays = task.arrays()
  compiled = run.lower(hparams, keys, arrays).compile()
  start = time.perf_counter()
  result = jax.block_until_ready(compiled(hparams, keys, arrays))
  return jax.tree.map(np.asarray, result), time.perf_counter() - start
