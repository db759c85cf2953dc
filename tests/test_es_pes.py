"""ES and PES: against the analytic gradient of a quadratic, the PES accumulator's resets,
jit and vmap, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaopt import estimators
from metaopt.estimators import PESState, es, pes, pes_init, pes_reset
from metaopt.unroll import InnerProblem

CURVATURE = np.array([1.0, 0.25])
THETA = {"log_lr": jnp.log(jnp.array([0.3, 0.6])), "w0": jnp.array([1.0, -2.0])}
T, K = 5, 4          # truncation length, truncations per run
SIGMA = 0.01
SEEDS = 64           # independent estimates per statistical check
OTHERS = np.array([0, 2])  # the pairs that are not restarted in the reset test


def quadratic():
  """GD on 0.5 * sum(h * w^2) with per-coordinate step sizes exp(log_lr) from w0.

  The state follows a linear recurrence, w_t = (1 - lr * h)^t * w0, so every
  meta-gradient is a closed-form sum (:func:`analytic`).
  """
  def loss(w):
    return 0.5 * jnp.sum(CURVATURE * w ** 2)

  def step(theta, w, _):
    return w - jnp.exp(theta["log_lr"]) * CURVATURE * w, {"loss": loss(w)}

  return InnerProblem(init=lambda theta, key: theta["w0"], step=step,
                      meta_loss=lambda theta, w, _: loss(w))


def analytic(theta, w_start, steps, *, through_init):
  """Gradient of the mean over ``steps`` steps of the loss after each step, from
  ``w_start`` (``through_init``: w_start = theta["w0"], so w0 gets a gradient too)."""
  lr, h = np.exp(np.asarray(theta["log_lr"], np.float64)), CURVATURE
  w, r, t = np.asarray(w_start, np.float64), 1 - lr * h, np.arange(1, steps + 1)[:, None]
  d_lr = np.mean(0.5 * h * w ** 2 * 2 * t * r ** (2 * t - 1) * -h, axis=0)
  d_w0 = np.mean(h * w * r ** (2 * t), axis=0) if through_init else np.zeros(2)
  return {"log_lr": lr * d_lr, "w0": d_w0}


def pes_over_a_run(problem, population):
  """Jitted ``seeds -> (mean over K truncations of the PES estimate)``: one whole run
  per pair, vmapped over independent seeds."""
  def one(seed):
    key = jax.random.key(seed)
    state = pes_init(problem, THETA, jax.random.fold_in(key, 0), population=population)

    def truncation(state, k):
      est = pes(problem, THETA, state, None, None, key=jax.random.fold_in(key, k + 1),
                sigma=SIGMA, length=T)
      return est.state, est.grad
    _, grads = jax.lax.scan(truncation, state, jnp.arange(K))
    return jax.tree.map(lambda g: jnp.mean(g, 0), grads)
  return jax.jit(jax.vmap(one))


def check_unbiased(draws, truth):
  """Every coordinate's mean over seeds within 3 standard errors of the truth, and the
  standard error small enough (10% of the truth) that a bias of 30% would fail."""
  for name in truth:
    x = np.asarray(draws[name], np.float64)
    mean, se = x.mean(0), x.std(0, ddof=1) / np.sqrt(len(x))
    np.testing.assert_array_less(np.abs(mean - truth[name]), 3 * se + 1e-7, err_msg=name)
    big = np.abs(truth[name]) > 0
    np.testing.assert_array_less(se[big], 0.1 * np.abs(truth[name][big]), err_msg=name)


def rmse(draws, truth):
  return np.sqrt(np.mean([(np.asarray(draws[n]) - truth[n]) ** 2 for n in truth]))


def test_the_analytic_gradient_is_the_backprop_gradient():
  problem = quadratic()
  full = estimators.full(problem, THETA, jax.random.key(0), None, None, average=True,
                         length=T * K)
  truth = analytic(THETA, THETA["w0"], T * K, through_init=True)
  for name in truth:
    np.testing.assert_allclose(full.grad[name], truth[name], rtol=1e-4)


def test_es_matches_the_analytic_gradient_of_its_segment():
  problem = quadratic()
  w = jnp.array([0.5, 1.5])   # a carried state: ES sees only this segment, like TBPTT
  truth = analytic(THETA, w, T, through_init=False)
  np.testing.assert_allclose(estimators.tbptt(problem, THETA, w, None, None, length=T).grad["log_lr"],
                             truth["log_lr"], rtol=1e-4)

  def draws(population):
    f = jax.jit(jax.vmap(lambda k: es(problem, THETA, w, None, None, key=k,
                                      population=population, sigma=SIGMA, length=T).grad))
    return f(jax.random.split(jax.random.key(1), SEEDS))

  small, large = draws(32), draws(128)
  check_unbiased(large, truth)   # w0 does not act on this segment: its truth is 0
  # Four times the population: the error shrinks like 1/sqrt(n), by about half.
  assert 0.3 < rmse(large, truth) / rmse(small, truth) < 0.7


def test_pes_is_unbiased_for_the_whole_run_where_tbptt_is_not():
  problem = quadratic()
  truth = analytic(THETA, THETA["w0"], T * K, through_init=True)
  small = pes_over_a_run(problem, 32)(jnp.arange(SEEDS))
  large = pes_over_a_run(problem, 128)(jnp.arange(SEEDS))
  check_unbiased(large, truth)   # including w0, which acts only through init(theta + eps)
  assert 0.3 < rmse(large, truth) / rmse(small, truth) < 0.7

  # TBPTT over the same truncations misses every truncation's effect on the next:
  # by a third on the slow coordinate (h = 0.25), many of PES's standard errors.
  w, grads = THETA["w0"], []
  for _ in range(K):
    est = estimators.tbptt(problem, THETA, w, None, None, length=T)
    w, grads = est.state, grads + [est.grad["log_lr"]]
  tbptt_bias = np.mean(grads, 0)[1] - truth["log_lr"][1]
  se = np.asarray(large["log_lr"])[:, 1].std(ddof=1) / np.sqrt(SEEDS)
  assert abs(tbptt_bias) > 8 * se and abs(tbptt_bias) > 0.25 * abs(truth["log_lr"][1])


def test_a_restarted_pair_gets_a_zero_accumulator_and_the_others_keep_theirs():
  problem = quadratic()
  state = pes_init(problem, THETA, jax.random.key(0), population=6)
  assert state.pairs == 3
  for k in range(3):
    state = pes(problem, THETA, state, None, None, key=jax.random.key(k), sigma=SIGMA,
                length=T).state
  acc = state.accumulator["log_lr"]
  assert np.all(np.asarray(state.truncations) == 3) and np.all(np.abs(acc) > 0)

  mask = jnp.array([False, True, False])
  marked = pes_reset(state, mask)
  np.testing.assert_array_equal(marked.accumulator["log_lr"][1], 0.0)
  np.testing.assert_array_equal(marked.accumulator["log_lr"][OTHERS], acc[OTHERS])
  np.testing.assert_array_equal(marked.truncations, [3, 0, 3])

  key = jax.random.key(9)
  kept = pes(problem, THETA, state, None, None, key=key, sigma=SIGMA, length=T).state
  reset = pes(problem, THETA, state, None, None, key=key, sigma=SIGMA, length=T,
              reset=mask).state
  eps = kept.accumulator["log_lr"] - acc         # this truncation's perturbations
  np.testing.assert_allclose(reset.accumulator["log_lr"][1], eps[1], rtol=1e-5, atol=1e-8)
  np.testing.assert_array_equal(reset.accumulator["log_lr"][OTHERS],
                                kept.accumulator["log_lr"][OTHERS])
  np.testing.assert_array_equal(reset.truncations, [4, 1, 4])
  np.testing.assert_array_equal(reset.runs, [1, 2, 1])
  # The restarted pair ran one truncation from init(theta +- eps), with the same eps.
  eps_w0 = kept.accumulator["w0"][1] - state.accumulator["w0"][1]
  for sign, particles in ((1, reset.pos), (-1, reset.neg)):
    lr, w = jnp.exp(THETA["log_lr"] + sign * eps[1]), THETA["w0"] + sign * eps_w0
    for _ in range(T):
      w = w - lr * CURVATURE * w
    np.testing.assert_allclose(particles[1], w, rtol=1e-5)
  np.testing.assert_array_equal(reset.pos[OTHERS], kept.pos[OTHERS])


def test_es_and_pes_jit_and_vmap_over_tasks():
  problem = quadratic()
  keys = jax.random.split(jax.random.key(3), 3)
  states = jax.vmap(lambda k: pes_init(problem, THETA, k, population=4))(keys)
  step = jax.jit(jax.vmap(lambda s, k: pes(problem, THETA, s, None, None, key=k,
                                           sigma=SIGMA, length=T)))
  est = step(states, keys)
  assert est.grad["log_lr"].shape == (3, 2) and est.state.truncations.shape == (3, 2)
  one = pes(problem, THETA, jax.tree.map(lambda x: x[1], states), None, None, key=keys[1],
            sigma=SIGMA, length=T)
  # (L+ - L-) / 2 sigma^2 magnifies float32 rounding, which differs under vmap.
  np.testing.assert_allclose(est.grad["log_lr"][1], one.grad["log_lr"], rtol=1e-3)
  again = step(states, keys)                    # same keys, same numbers
  np.testing.assert_array_equal(est.grad["w0"], again.grad["w0"])
  assert est.metrics["loss"].shape == (3, 2, 2, T)   # tasks, (+/-), pairs, steps

  ws = jnp.array([[0.5, 1.0], [1.0, 1.0], [2.0, -1.0]])
  es_step = jax.jit(jax.vmap(lambda w, k: es(problem, THETA, w, None, None, key=k,
                                             population=4, sigma=SIGMA, length=T)))
  est = es_step(ws, keys)
  one = es(problem, THETA, ws[2], None, None, key=keys[2], population=4, sigma=SIGMA, length=T)
  np.testing.assert_allclose(est.grad["log_lr"][2], one.grad["log_lr"], rtol=1e-3)
  np.testing.assert_allclose(est.state[2], one.state, rtol=1e-6)


def test_es_and_pes_need_no_gradient_of_the_inner_run():
  # A step size quantized to a grid: backprop sees a zero gradient, ES the smoothed one.
  problem = quadratic()._replace(step=lambda theta, w, _: (
      w - jnp.exp(jnp.round(theta["log_lr"] * 10) / 10) * CURVATURE * w, {}))
  w = jnp.array([1.0, 1.0])
  tb = estimators.tbptt(problem, THETA, w, None, None, length=T)
  np.testing.assert_array_equal(tb.grad["log_lr"], 0.0)
  grads = jax.vmap(lambda k: es(problem, THETA, w, None, None, key=k, population=64,
                                sigma=0.1, length=T).grad)(jax.random.split(jax.random.key(0), 16))
  # Larger steps lower the loss here: the smoothed gradient is negative in both coordinates.
  assert np.all(np.mean(grads["log_lr"], 0) < -5 * np.std(grads["log_lr"], 0) / 4)


def test_pairs_with_a_non_finite_loss_are_left_out():
  problem = quadratic()
  state = pes_init(problem, THETA, jax.random.key(0), population=4)
  state = state._replace(truncations=jnp.ones(2, jnp.int32),
                         particles=state.particles.at[0, 1].set(jnp.nan))
  est = pes(problem, THETA, state, None, None, key=jax.random.key(1), sigma=SIGMA, length=T)
  np.testing.assert_array_equal(est.metrics["finite_pairs"], [True, False])
  assert np.all(np.isfinite(est.grad["log_lr"])) and np.isfinite(est.meta_loss)
  # The loop restarts the diverged pair: it is finite again.
  est = pes(problem, THETA, est.state, None, None, key=jax.random.key(2), sigma=SIGMA,
            length=T, reset=~est.metrics["finite_pairs"])
  np.testing.assert_array_equal(est.metrics["finite_pairs"], [True, True])


@pytest.mark.parametrize("population", [3, 7, 1, 0, -2, 2.0, True])
def test_a_population_that_is_not_an_even_count_is_refused(population):
  problem, key = quadratic(), jax.random.key(0)
  with pytest.raises(ValueError, match=f"population .*{population!r}"):
    es(problem, THETA, THETA["w0"], None, None, key=key, population=population, length=T)
  with pytest.raises(ValueError, match=f"population .*{population!r}"):
    pes_init(problem, THETA, key, population=population)


@pytest.mark.parametrize("sigma", [0.0, -0.1, float("nan"), float("inf")])
def test_a_bad_perturbation_scale_is_refused(sigma):
  problem, key = quadratic(), jax.random.key(0)
  with pytest.raises(ValueError, match=f"sigma .*{sigma!r}"):
    es(problem, THETA, THETA["w0"], None, None, key=key, sigma=sigma, length=T)
  state = pes_init(problem, THETA, key)
  with pytest.raises(ValueError, match=f"sigma .*{sigma!r}"):
    pes(problem, THETA, state, None, None, key=key, sigma=sigma, length=T)


def test_other_bad_input_is_refused():
  problem, key = quadratic(), jax.random.key(0)
  state = pes_init(problem, THETA, key, population=4)
  with pytest.raises(ValueError, match=r"reset .*shape \(2,\).*\(3,\)"):
    pes(problem, THETA, state, None, None, key=key, length=T, reset=jnp.array([True] * 3))
  with pytest.raises(ValueError, match="reset .*int32"):
    pes_reset(state, jnp.array([0, 1]))
  with pytest.raises(ValueError, match="PESState"):
    pes(problem, THETA, THETA["w0"], None, None, key=key, length=T)
  with pytest.raises(ValueError, match="int32"):
    es(problem, {"n": jnp.array(3)}, THETA["w0"], None, None, key=key, length=T)


def test_estimators_by_name():
  assert estimators.get("pes") is pes and estimators.get("es") is es
  assert estimators.get("tbptt") is estimators.tbptt
  assert set(estimators.TRUNCATED) <= set(estimators.ESTIMATORS)
  with pytest.raises(ValueError, match="unknown estimator 'pse'.*tbptt.*pes"):
    estimators.get("pse")
  assert isinstance(pes_init(quadratic(), THETA, jax.random.key(0)), PESState)
