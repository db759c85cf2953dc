"""The unroll core: an inner training run as a pure step function, scanned over steps.

Everything meta-learned in metaopt is an inner run ``step(theta, state, batch)``
unrolled here once: learned LR schedules, MAML initializations and the plain
training loop of the baselines all call :func:`unroll`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

PyTree = Any
Step = Callable[[PyTree, PyTree, PyTree], tuple[PyTree, dict]]


class InnerProblem(NamedTuple):
  """An inner training problem whose meta-parameters are ``theta``.

  Attributes:
    init: ``init(theta, key) -> state``; MAML's ``theta`` is the initial params.
    step: ``step(theta, state, batch) -> (state, metrics)``, one training step.
    meta_loss: ``meta_loss(theta, state, meta_batch) -> scalar``, e.g. a
      validation loss of the inner params in ``state``.
    first_order_step: optional variant of ``step`` that treats inner gradients
      as constants (``stop_gradient``), used by the ``first_order`` estimator.
  """
  init: Callable[[PyTree, jax.Array], PyTree]
  step: Step
  meta_loss: Callable[[PyTree, PyTree, PyTree], jax.Array]
  first_order_step: Optional[Step] = None


def unroll(
    step: Step,
    theta: PyTree,
    state: PyTree,
    batches: PyTree,
    *,
    length: Optional[int] = None,
    remat: bool = False,
    scan_unroll: int = 1,
) -> tuple[PyTree, dict]:
  """Runs ``step`` over the leading axis of ``batches`` with ``lax.scan``.

  Args:
    step: ``step(theta, state, batch) -> (state, metrics)``.
    theta: meta-parameters, passed unchanged to every step.
    state: the inner state carried from step to step.
    batches: a pytree whose leaves have a leading time axis (or ``None`` with
      ``length`` set, for steps that draw their own data from ``state``).
    length: number of steps when ``batches`` is ``None``.
    remat: wrap each step in ``jax.checkpoint``, so the backward pass
      recomputes activations instead of storing them (memory O(state) per step).
    scan_unroll: passed to ``lax.scan(unroll=...)``.

  Returns:
    ``(final_state, metrics)`` with every metric stacked over steps.
  """
  body = lambda s, b: step(theta, s, b)
  if remat:
    body = jax.checkpoint(body)
  if batches is None and length is None:
    raise ValueError("unroll needs batches with a leading time axis or length=")
  return jax.lax.scan(body, state, batches, length=length, unroll=scan_unroll)


def inner_step(problem: InnerProblem, *, first_order: bool = False) -> Step:
  """The problem's step, or its first-order variant."""
  if not first_order:
    return problem.step
  if problem.first_order_step is None:
    raise ValueError("first_order needs an InnerProblem with first_order_step; "
                     "this problem has first_order_step=None")
  return problem.first_order_step


def with_meta_loss(problem: InnerProblem, *, first_order: bool = False) -> Step:
  """A step over ``(batch, meta_batch)`` pairs that also reports the meta-loss."""
  step = inner_step(problem, first_order=first_order)

  def step_and_meta_loss(theta, state, batch_pair):
    batch, meta_batch = batch_pair
    state, metrics = step(theta, state, batch)
    return state, dict(metrics, meta_loss=problem.meta_loss(theta, state, meta_batch))

  return step_and_meta_loss


def segments(batches: PyTree, segment_length: int) -> PyTree:
  """Splits a ``[T, ...]`` batch pytree into ``[T // L, L, ...]`` truncation segments."""
  def split(x):
    if x.shape[0] % segment_length:
      raise ValueError(
          f"segment_length={segment_length} does not divide the {x.shape[0]} steps")
    return x.reshape((x.shape[0] // segment_length, segment_length) + x.shape[1:])
  return jax.tree.map(split, batches)


def population_mean(tree: PyTree) -> PyTree:
  """Mean over the leading (population) axis of every leaf."""
  return jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)
