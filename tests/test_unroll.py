"""The unroll core and the estimators: truncation, remat, meta-gradients vs finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metaopt
from metaopt import estimators
from metaopt.unroll import InnerProblem, segments

DIM, STEPS = 3, 12
CURVATURE = jnp.array([1.0, 0.5, 2.0])


def quadratic_problem():
  """SGD on a noisy quadratic; theta = (log lr, initial params)."""
  def loss(w, target):
    return 0.5 * jnp.sum(CURVATURE * (w - target) ** 2)

  def make_step(first_order):
    def step(theta, w, target):
      g = jax.grad(loss)(w, target)
      if first_order:
        g = jax.lax.stop_gradient(g)
      return w - jnp.exp(theta["log_lr"]) * g, {"loss": loss(w, target)}
    return step

  return InnerProblem(
      init=lambda theta, key: theta["w0"],
      step=make_step(False),
      meta_loss=lambda theta, w, target: loss(w, target),
      first_order_step=make_step(True))


def data(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  batches = 1.0 + 0.3 * jax.random.normal(k1, (STEPS, DIM))
  meta_batches = 1.0 + 0.3 * jax.random.normal(k2, (STEPS, DIM))
  return batches, meta_batches


THETA = {"log_lr": jnp.log(0.3), "w0": jnp.array([0.5, -1.0, 2.0])}


def finite_difference(f, theta, direction, eps=1e-3):
  plus = jax.tree.map(lambda t, d: t + eps * d, theta, direction)
  minus = jax.tree.map(lambda t, d: t - eps * d, theta, direction)
  return (f(plus) - f(minus)) / (2 * eps)


def directional(grad, direction):
  return sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))


@pytest.mark.parametrize("average", [True, False])
def test_full_matches_finite_differences(average):
  problem = quadratic_problem()
  batches, meta_batches = data()
  meta = meta_batches if average else meta_batches[-1]
  key = jax.random.key(0)
  est = jax.jit(lambda th: estimators.full(problem, th, key, batches, meta, average=average))(THETA)
  f = lambda th: estimators.full(problem, th, key, batches, meta, average=average).meta_loss
  for seed in range(3):
    d = jax.tree.map(lambda x: jax.random.normal(jax.random.key(seed), jnp.shape(x)), THETA)
    np.testing.assert_allclose(directional(est.grad, d), finite_difference(f, THETA, d),
                               rtol=2e-3, atol=1e-4)
  assert abs(float(est.grad["log_lr"])) > 1e-3  # the test would notice a zero gradient


def test_tbptt_matches_finite_differences_and_ignores_carried_state():
  problem = quadratic_problem()
  batches, meta_batches = data(1)
  w_carried = jnp.array([0.2, 0.1, -0.3])
  est = estimators.tbptt(problem, THETA, w_carried, batches, meta_batches)
  f = lambda th: estimators.tbptt(problem, th, w_carried, batches, meta_batches).meta_loss
  d = {"log_lr": jnp.array(1.0), "w0": jnp.zeros(DIM)}
  np.testing.assert_allclose(directional(est.grad, d), finite_difference(f, THETA, d),
                             rtol=2e-3, atol=1e-4)
  # The segment starts from the carried state, not from init(theta): no gradient to w0.
  np.testing.assert_array_equal(est.grad["w0"], jnp.zeros(DIM))
  assert est.metrics["meta_loss"].shape == (STEPS,)


def test_first_order_drops_second_order_terms():
  problem = quadratic_problem()
  batches, meta_batches = data(2)
  key = jax.random.key(0)
  fo = estimators.first_order(problem, THETA, key, batches, meta_batches[-1])
  so = estimators.full(problem, THETA, key, batches, meta_batches[-1])
  # FOMAML on SGD: d w_T / d w_0 is the identity, so grad_w0 = grad of the final loss.
  w_final = so.state
  expected = CURVATURE * (w_final - meta_batches[-1])
  np.testing.assert_allclose(fo.grad["w0"], expected, rtol=1e-5)
  assert not np.allclose(fo.grad["w0"], so.grad["w0"], rtol=1e-2)
  np.testing.assert_allclose(fo.meta_loss, so.meta_loss, rtol=1e-6)


def test_first_order_needs_a_first_order_step():
  problem = quadratic_problem()._replace(first_order_step=None)
  batches, meta_batches = data()
  with pytest.raises(ValueError, match="first_order_step"):
    estimators.first_order(problem, THETA, jax.random.key(0), batches, meta_batches[-1])


def test_stitched_segments_equal_one_long_unroll():
  problem = quadratic_problem()
  batches, _ = data(3)
  w0 = THETA["w0"]
  long_state, long_metrics = metaopt.unroll(problem.step, THETA, w0, batches)
  state, losses = w0, []
  for segment in segments(batches, 4):
    state, m = metaopt.unroll(problem.step, THETA, state, segment)
    losses.append(m["loss"])
  np.testing.assert_allclose(state, long_state, rtol=1e-6)
  np.testing.assert_allclose(jnp.concatenate(losses), long_metrics["loss"], rtol=1e-6)


def test_segments_rejects_a_length_that_does_not_divide():
  with pytest.raises(ValueError, match="segment_length=5"):
    segments(jnp.zeros((12, 2)), 5)


def test_remat_gives_the_same_gradient():
  problem = quadratic_problem()
  batches, meta_batches = data(4)
  key = jax.random.key(0)
  plain = estimators.full(problem, THETA, key, batches, meta_batches, average=True)
  remat = estimators.full(problem, THETA, key, batches, meta_batches, average=True, remat=True)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), plain.grad, remat.grad)


def test_estimators_vmap_over_a_population():
  problem = quadratic_problem()
  pops = [data(s) for s in range(4)]
  batches = jnp.stack([p[0] for p in pops])
  meta = jnp.stack([p[1] for p in pops])
  states = jnp.stack([THETA["w0"] + i for i in range(4)])
  tb = jax.jit(jax.vmap(lambda s, b, m: estimators.tbptt(problem, THETA, s, b, m)))
  est = tb(states, batches, meta)
  assert est.grad["log_lr"].shape == (4,)
  one = estimators.tbptt(problem, THETA, states[2], batches[2], meta[2])
  np.testing.assert_allclose(est.grad["log_lr"][2], one.grad["log_lr"], rtol=1e-5)


def test_unroll_needs_batches_or_length():
  with pytest.raises(ValueError, match="length"):
    metaopt.unroll(lambda t, s, b: (s, {}), None, 0.0, None)
