"""Meta-gradient estimators over an :class:`~metaopt.unroll.InnerProblem`.

Each estimator returns an :class:`Estimate` of ``d meta_loss / d theta``. All are
pure functions of arrays: ``jax.jit`` them with the problem closed over, and
``jax.vmap`` them over a population of tasks (``in_axes=(None, 0, 0, 0)``).

- :func:`tbptt`: backprop through one truncated segment that starts from a
  carried ``state`` (treated as a constant); returns the state to carry on.
- :func:`full`: backprop through the whole run, including ``init(theta, key)``.
- :func:`first_order`: ``full`` with inner gradients treated as constants (FOMAML).
- :func:`es`: antithetic evolution strategies over one truncated segment, fresh
  perturbations every call (biased for truncations, like TBPTT).
- :func:`pes`: persistent evolution strategies (Vicol et al., 2021): each
  antithetic pair carries its own + and - inner runs and the sum of its
  perturbations across truncations, which makes the estimate unbiased for the
  whole run. State: :class:`PESState` from :func:`pes_init`.

``es`` and ``pes`` run the inner problem forward only (no backward pass), vmapped
over the perturbed runs. ``population`` counts perturbed inner runs and must be
even: ``population // 2`` antithetic pairs ``theta + eps``, ``theta - eps`` with
``eps ~ N(0, sigma^2 I)``. The estimate is the mean over pairs of
``(L(theta + eps) - L(theta - eps)) / (2 sigma^2) * eps`` (PES: times the pair's
accumulated perturbations instead of ``eps``).

:func:`get` looks an estimator up by name (:data:`ESTIMATORS`); :data:`TRUNCATED`
names those that continue a carried state segment by segment.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from metaopt.sharding import Sharding, constrain, resolve
from metaopt.unroll import InnerProblem, inner_step, unroll, with_meta_loss
from metaopt.validation import check_choice, check_int, check_positive

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


# --- evolution strategies: forward runs only --------------------------------------


class PESState(NamedTuple):
  """What :func:`pes` carries from one truncation to the next, per antithetic pair.

  Every leaf has a leading axis of ``pairs`` (``particles``: ``(2, pairs)``).
  """
  particles: PyTree       # inner states; [0] runs with theta + eps, [1] with theta - eps
  accumulator: PyTree     # like theta: the pair's perturbations summed since its run restarted
  truncations: jax.Array  # int32: truncations of the current run done; 0 = restarts at the next call
  runs: jax.Array         # int32: runs started; run r starts from init(theta +- eps, fold_in(keys[i], r))
  keys: jax.Array         # PRNG key of each pair's sequence of runs

  @property
  def pairs(self) -> int:
    return self.truncations.shape[0]

  @property
  def pos(self) -> PyTree:
    """Inner states of the ``theta + eps`` runs."""
    return jax.tree.map(lambda x: x[0], self.particles)

  @property
  def neg(self) -> PyTree:
    """Inner states of the ``theta - eps`` runs."""
    return jax.tree.map(lambda x: x[1], self.particles)


def _pairs(population: Any) -> int:
  """Antithetic pairs in ``population`` perturbed runs; ValueError unless even and >= 2."""
  population = check_int("population", population, low=2)
  if population % 2:
    raise ValueError(f"population must be even for antithetic sampling (one theta + eps "
                     f"and one theta - eps run per pair), got {population}")
  return population // 2


def _check_sigma(sigma: Any) -> None:
  check_positive("sigma", sigma, traced_ok=True)


def _perturbations(theta: PyTree, key: jax.Array, pairs: int, sigma) -> PyTree:
  """``eps ~ N(0, sigma^2 I)`` like ``theta``, with a leading axis of ``pairs``."""
  leaves, treedef = jax.tree.flatten(theta)
  for x in leaves:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      raise ValueError(f"es and pes perturb floating-point meta-parameters only; theta has "
                       f"a leaf of dtype {jnp.result_type(x)}")
  keys = jax.random.split(key, len(leaves))
  eps = [(sigma * jax.random.normal(k, (pairs,) + jnp.shape(x))).astype(jnp.result_type(x))
         for k, x in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, eps)


def _antithetic(theta: PyTree, eps: PyTree) -> PyTree:
  """Meta-parameters of every run, leading axes ``(2, pairs)``: theta + eps, theta - eps."""
  return jax.tree.map(lambda t, e: jnp.stack([t + e, t - e]), theta, eps)


def _where(mask: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
  """``new`` where ``mask`` (over the leading axes) is true, else ``old``, in old's dtype."""
  m = mask.reshape(mask.shape + (1,) * (jnp.ndim(old) - mask.ndim))
  out = jnp.where(m, new, old)
  return out if out.dtype == old.dtype else out.astype(old.dtype)


def _forward(problem, thetas, states, batches, meta_batches, *, average, length, shared,
             sharding=None):
  """Objective, final state and metrics of every run, vmapped over axes ``(2, pairs)``.

  With ``shared`` every run starts from the one ``states``; with ``sharding`` the
  pairs axis is split across devices.
  """
  def run(th, s):
    return _objective(problem, th, s, batches, meta_batches, average=average,
                      first_order=False, remat=False, length=length)
  axis = None if shared else 0
  thetas = constrain(thetas, sharding, axis=1)
  states = states if shared else constrain(states, sharding, axis=1)
  out = jax.vmap(jax.vmap(run, (0, axis)), (0, axis))(thetas, states)
  losses, (states, metrics) = constrain(out, sharding, axis=1)
  return losses, states, metrics


def _combine(losses: jax.Array, directions: PyTree, sigma):
  """Mean over the pairs whose two losses are finite of
  ``(L+ - L-) / (2 sigma^2) * direction``, the mean loss, and which pairs counted."""
  delta = losses[0] - losses[1]
  finite = jnp.isfinite(delta)
  n = jnp.sum(finite)
  # A pair with a non-finite loss gets weight 0 (not NaN * 0): one diverged run
  # does not poison the others; finite_pairs says which were dropped.
  weight = jnp.where(finite, delta, 0.0) / (2 * sigma ** 2 * jnp.maximum(n, 1))
  grad = jax.tree.map(
      lambda d: jnp.where(n > 0, jnp.tensordot(weight.astype(d.dtype), d, 1), jnp.nan), directions)
  mid = jnp.where(finite, 0.5 * (losses[0] + losses[1]), 0.0)
  loss = jnp.where(n > 0, jnp.sum(mid) / jnp.maximum(n, 1), jnp.nan)
  return loss, grad, finite


def es(problem: InnerProblem, theta: PyTree, state: PyTree, batches: PyTree,
       meta_batches: PyTree, *, key: jax.Array, population: int = 2, sigma=0.01,
       average: bool = True, length: Optional[int] = None,
       sharding: Sharding = None) -> Estimate:
  """Antithetic evolution strategies over one segment that continues ``state``.

  Every call draws fresh perturbations, so like :func:`tbptt` it sees only this
  segment's effect of ``theta``: biased for truncated runs (learned_optimization's
  ``TruncatedES``). No backward pass: ``population`` forward runs, vmapped.

  Args:
    problem, theta, state, batches, meta_batches, average, length: as :func:`tbptt`;
      every run starts from ``state`` and sees the same batches.
    key: PRNG key of the perturbations.
    population: perturbed runs, even: ``population // 2`` pairs ``theta +- eps``.
    sigma: standard deviation of ``eps`` (positive, finite).
    sharding: split the pairs across devices (:mod:`metaopt.sharding`); ``pairs``
      must divide evenly over them.

  Returns:
    ``Estimate(meta_loss, grad, state, metrics)``: ``meta_loss`` is the mean of the
    runs' objectives; ``state`` is the end of the first ``theta + eps`` run, to carry
    on as the next segment's start. ``metrics`` holds the per-step metrics with leading
    axes ``(2, pairs)`` (+ runs, then - runs), ``particle_meta_loss`` ``(2, pairs)`` and
    ``finite_pairs`` ``(pairs,)``: pairs with a non-finite loss are left out of the mean.
  """
  pairs = _pairs(population)
  _check_sigma(sigma)
  eps = _perturbations(theta, key, pairs, sigma)
  losses, states, metrics = _forward(problem, _antithetic(theta, eps), state, batches,
                                     meta_batches, average=average, length=length,
                                     shared=True,
                                     sharding=resolve(sharding, pairs, what="pairs"))
  loss, grad, finite = _combine(losses, eps, sigma)
  carried = jax.tree.map(lambda x: x[0, 0], states)
  return Estimate(loss, grad, carried,
                  dict(metrics, particle_meta_loss=losses, finite_pairs=finite))


def _run_keys(keys: jax.Array, runs: jax.Array) -> jax.Array:
  return jax.vmap(jax.random.fold_in)(keys, runs)


def _mask(reset: Any, pairs: int) -> jax.Array:
  reset = jnp.asarray(reset)
  if reset.dtype != jnp.bool_ or reset.shape not in ((), (pairs,)):
    raise ValueError(f"reset must be a boolean mask of shape ({pairs},) (one entry per "
                     f"antithetic pair) or a single bool, got dtype {reset.dtype} and "
                     f"shape {reset.shape}")
  return jnp.broadcast_to(reset, (pairs,))


def pes_init(problem: InnerProblem, theta: PyTree, key: jax.Array, *,
             population: int = 2) -> PESState:
  """A :class:`PESState` of ``population // 2`` antithetic pairs whose runs all start
  at the next :func:`pes` call (there, from ``init(theta +- eps)``).

  ``population`` counts perturbed runs and must be even. Pair ``i``'s runs take their
  init keys from ``split(key)[i]``, so its data do not depend on the perturbations.
  """
  pairs = _pairs(population)
  keys = jax.random.split(key, pairs)
  zeros = jnp.zeros(pairs, jnp.int32)
  # Placeholders with the right structure: pes() re-initializes every pair (truncations 0).
  first = jax.vmap(problem.init, in_axes=(None, 0))(theta, _run_keys(keys, zeros))
  particles = jax.tree.map(lambda x: jnp.stack([x, x]), first)
  accumulator = jax.tree.map(
      lambda t: jnp.zeros((pairs,) + jnp.shape(t), jnp.result_type(t)), theta)
  return PESState(particles, accumulator, zeros, zeros, keys)


def pes_reset(state: PESState, reset: Any) -> PESState:
  """``state`` with the pairs where the boolean mask ``reset`` is true restarting at the
  next :func:`pes` call: zero accumulator and truncation count. The others keep theirs."""
  reset = _mask(reset, state.pairs)
  accumulator = jax.tree.map(lambda a: _where(reset, jnp.zeros_like(a), a), state.accumulator)
  return state._replace(accumulator=accumulator,
                        truncations=jnp.where(reset, 0, state.truncations))


def _restart(problem: InnerProblem, thetas: PyTree, state: PESState, restart: jax.Array):
  """The particles, those of restarting pairs replaced by ``init(theta +- eps, key)``."""
  def fresh(particles):
    keys = _run_keys(state.keys, state.runs)
    # + and - runs of a pair share the init key: same data, only theta differs.
    new = jax.vmap(jax.vmap(problem.init), in_axes=(0, None))(thetas, keys)
    both = jnp.broadcast_to(restart, (2,) + restart.shape)
    return jax.tree.map(lambda n, o: _where(both, n, o), new, particles)
  # Most calls restart no pair: skip the init then (under vmap both branches run).
  return jax.lax.cond(jnp.any(restart), fresh, lambda p: p, state.particles)


def pes(problem: InnerProblem, theta: PyTree, state: PESState, batches: PyTree,
        meta_batches: PyTree, *, key: jax.Array, sigma=0.01, reset: Any = None,
        average: bool = True, length: Optional[int] = None,
        sharding: Sharding = None) -> Estimate:
  """Persistent evolution strategies (Vicol et al., 2021) over one truncation.

  Each antithetic pair continues its own ``theta + eps`` and ``theta - eps`` runs
  from ``state`` with fresh perturbations ``eps`` for this truncation, and weighs
  its loss difference by the sum of every perturbation its runs have seen since they
  started: over a whole run the estimates add up to an unbiased estimate of the
  gradient of the whole run's loss, not only this truncation's share. No backward
  pass: ``2 * pairs`` forward runs, vmapped.

  Args:
    problem, theta, batches, meta_batches, average, length: as :func:`tbptt`; every
      run sees the same batches (steps that draw their own data from their state,
      with ``length=``, give each pair its own data).
    state: a :class:`PESState` (:func:`pes_init`, or the previous call's
      ``Estimate.state``); its size fixes the population.
    key: PRNG key of this truncation's perturbations.
    sigma: standard deviation of ``eps`` (positive, finite).
    reset: optional boolean mask ``(pairs,)``: those pairs restart their runs now
      (:func:`pes_reset`), from ``init(theta +- eps)``, with a zero accumulator.
      Pairs restarted at different calls keep truncations unsynchronized.
    sharding: as for :func:`es`.

  Returns:
    ``Estimate(meta_loss, grad, state, metrics)``: ``state`` is the next
    :class:`PESState`; ``metrics`` as for :func:`es`.
  """
  _check_sigma(sigma)
  if not isinstance(state, PESState):
    raise ValueError(f"pes needs the PESState of pes_init or of its previous call, "
                     f"got {type(state).__name__}")
  if reset is not None:
    state = pes_reset(state, reset)
  eps = _perturbations(theta, key, state.pairs, sigma)
  thetas = _antithetic(theta, eps)
  restart = state.truncations == 0
  particles = _restart(problem, thetas, state, restart)
  accumulator = jax.tree.map(lambda a, e: _where(restart, e, a + e), state.accumulator, eps)
  losses, particles, metrics = _forward(problem, thetas, particles, batches, meta_batches,
                                        average=average, length=length, shared=False,
                                        sharding=resolve(sharding, state.pairs, what="pairs"))
  loss, grad, finite = _combine(losses, accumulator, sigma)
  new = PESState(particles, accumulator, jnp.where(restart, 1, state.truncations + 1),
                 state.runs + restart.astype(jnp.int32), state.keys)
  return Estimate(loss, grad, new, dict(metrics, particle_meta_loss=losses, finite_pairs=finite))


ESTIMATORS: dict[str, Callable[..., Estimate]] = {
    "tbptt": tbptt, "full": full, "first_order": first_order, "es": es, "pes": pes}
TRUNCATED = ("tbptt", "es", "pes")  # continue a carried state, segment by segment


def get(name: str) -> Callable[..., Estimate]:
  """The estimator called ``name``: one of :data:`ESTIMATORS`."""
  return ESTIMATORS[check_choice("estimator", name, ESTIMATORS)]
