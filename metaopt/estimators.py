"""Meta-gradient estimators over an :class:`~metaopt.unroll.InnerProblem`.

Each estimator returns an :class:`Estimate` of ``d meta_loss / d theta``. All are
pure functions of arrays: ``jax.jit`` them with the problem closed over, and
``jax.vmap`` them over a population of tasks (``in_axes=(None, 0, 0, 0)``).

- :func:`tbptt`: backprop through one truncated segment that starts from a
  carried ``state`` (treated as a constant); returns the state to carry on.
- :func:`full`: backprop through the whole run, including ``init(theta, key)``.
- :func:`first_order`: ``full`` with inner gradients treated as constants (FOMAML).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from metaopt.unroll import InnerProblem, inner_step, unroll, with_meta_loss

PyTree = Any


class Estimate(NamedTuple):
  meta_loss: jax.Array   # the objective that was differentiated
  grad: PyTree           # its gradient with respect to theta
  state: PyTree          # inner state at the end of the unroll
  metrics: dict          # per-step metrics stacked over the unroll


def _objective(problem, theta, state, batches, meta_batches, *, average,
               first_order, remat, length):
  """Meta-loss of an unroll from ``state``: mean over steps, or at the end."""
  if average:
    step = with_meta_loss(problem, first_order=first_order)
    state, metrics = unroll(step, theta, state, (batches, meta_batches), remat=remat,
                            length=length)
    return jnp.mean(metrics["meta_loss"]), (state, metrics)
  step = inner_step(problem, first_order=first_order)
  state, metrics = unroll(step, theta, state, batches, remat=remat, length=length)
  return problem.meta_loss(theta, state, meta_batches), (state, metrics)


def tbptt(problem: InnerProblem, theta: PyTree, state: PyTree, batches: PyTree,
          meta_batches: PyTree, *, average: bool = True, remat: bool = False,
          first_order: bool = False, length: Optional[int] = None) -> Estimate:
  """Truncated backprop through one segment that continues ``state``.

  Args:
    problem: the inner problem.
    theta: meta-parameters.
    state: inner state carried from the previous segment; no gradient flows
      into it (that is the truncation).
    batches: per-step training batches, leading axis = segment length.
    meta_batches: per-step meta-batches (``average=True``) or a single one.
    average: average the meta-loss over every step of the segment (reduces the
      short-horizon bias of judging only the last step) instead of the last.
    remat: rematerialize each step in the backward pass.
    first_order: use ``problem.first_order_step``.
    length: number of steps, for steps that draw their own data (``batches``
      and ``meta_batches`` then ``None``).
  """
  state = jax.lax.stop_gradient(state)
  objective = lambda th: _objective(problem, th, state, batches, meta_batches,
                                    average=average, first_order=first_order,
                                    remat=remat, length=length)
  (loss, (state, metrics)), grad = jax.value_and_grad(objective, has_aux=True)(theta)
  return Estimate(loss, grad, state, metrics)


def full(problem: InnerProblem, theta: PyTree, key: jax.Array, batches: PyTree,
         meta_batches: PyTree, *, average: bool = False, remat: bool = False,
         first_order: bool = False, length: Optional[int] = None) -> Estimate:
  """Backprop through the whole inner run, from ``init(theta, key)`` to the end."""
  def objective(th):
    state = problem.init(th, key)
    return _objective(problem, th, state, batches, meta_batches, average=average,
                      first_order=first_order, remat=remat, length=length)
  (loss, (state, metrics)), grad = jax.value_and_grad(objective, has_aux=True)(theta)
  return Estimate(loss, grad, state, metrics)


def first_order(problem: InnerProblem, theta: PyTree, key: jax.Array,
                batches: PyTree, meta_batches: PyTree, *, average: bool = False,
                remat: bool = False, length: Optional[int] = None) -> Estimate:
  """First-order estimator: :func:`full` with inner gradients held constant."""
  return full(problem, theta, key, batches, meta_batches, average=average,
              remat=remat, first_order=True, length=length)
