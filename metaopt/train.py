"""Plain training and evaluation, on the unroll core, shared by baselines and experiments.

One training run is ``steps`` optimizer steps in chunks of ``eval_every``; after
each chunk the whole validation and test splits are evaluated. The optimizer is
built inside the jitted function from ``hparams`` (e.g. a peak LR), so a grid of
hyperparameters or seeds is one ``jax.vmap``, compiled once.
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt.schedules import current_lr
from metaopt.unroll import unroll

PyTree = Any
MakeTx = Callable[[PyTree], optax.GradientTransformation]


class TrainState(NamedTuple):
  params: PyTree
  opt_state: PyTree
  key: jax.Array  # raw uint32 key; batches are drawn from fold_in(key, step)
  step: jax.Array


class TrainResult(NamedTuple):
  """Curves of one run (leading axes added by vmap for grids)."""
  train_loss: jax.Array      # [steps] minibatch loss at every step
  learning_rate: jax.Array   # [steps] LR applied at every step (NaN if unknown)
  eval_steps: jax.Array      # [evals] step count of each evaluation, 0 first
  val_loss: jax.Array        # [evals]
  val_accuracy: jax.Array
  test_loss: jax.Array
  test_accuracy: jax.Array


def training_step(task, tx: optax.GradientTransformation, arrays: dict):
  """``step(hparams, state, _) -> (state, metrics)``: one minibatch update."""
  def step(hparams, state: TrainState, _):
    del hparams  # already inside tx
    batch = task.sample_batch(arrays, jax.random.fold_in(state.key, state.step))
    loss, grads = jax.value_and_grad(task.loss)(state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, value=loss)
    params = optax.apply_updates(state.params, updates)
    new = TrainState(params, opt_state, state.key, state.step + 1)
    return new, {"loss": loss, "learning_rate": current_lr(opt_state)}
  return step


def make_train_fn(task, make_tx: MakeTx, *, steps: int, eval_every: int):
  """``run(hparams, key, arrays) -> TrainResult``, pure and jit/vmap-able."""
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
    state = TrainState(params, tx.init(params), data_key, jnp.zeros((), jnp.int32))
    step = training_step(task, tx, arrays)

    def chunk(state, _):
      state, metrics = unroll(step, hparams, state, None, length=eval_every)
      return state, (metrics, evaluate(state.params, arrays))

    first = evaluate(params, arrays)
    _, (metrics, evals) = jax.lax.scan(chunk, state, None, length=steps // eval_every)
    evals = [jnp.concatenate([f[None], e]) for f, e in zip(first, evals)]
    return TrainResult(
        train_loss=metrics["loss"].reshape(-1),
        learning_rate=metrics["learning_rate"].reshape(-1),
        eval_steps=jnp.arange(0, steps + 1, eval_every),
        val_loss=evals[0], val_accuracy=evals[1],
        test_loss=evals[2], test_accuracy=evals[3])

  return run


def train_grid(task, make_tx: MakeTx, hparams: PyTree, keys: jax.Array, *,
               steps: int, eval_every: int, vectorize: bool = True
               ) -> tuple[TrainResult, float]:
  """Trains one run per (hparams row, key) pair in one compiled program.

  ``hparams`` leaves and ``keys`` share a leading axis. Runs are vmapped, or
  with ``vectorize=False`` mapped one after another (vmapped convolutions
  become grouped convolutions, which are slow on the CPU). Returns the stacked
  results (as numpy) and the wall time of the compiled call in seconds.
  """
  one = make_train_fn(task, make_tx, steps=steps, eval_every=eval_every)
  if vectorize:
    run = jax.jit(jax.vmap(one, in_axes=(0, 0, None)))
  else:
    run = jax.jit(lambda h, k, a: jax.lax.map(lambda hk: one(*hk, a), (h, k)))
  arrays = task.arrays()
  compiled = run.lower(hparams, keys, arrays).compile()
  start = time.perf_counter()
  result = jax.block_until_ready(compiled(hparams, keys, arrays))
  return jax.tree.map(np.asarray, result), time.perf_counter() - start
