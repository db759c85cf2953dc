"""Plateau LR control: reductions, LR floor, early stopping, fresh-evaluation gating, contract."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metaopt

from metaopt.schedules import PlateauState, plateau_lr, should_stop

PARAMS = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array(0.5, jnp.float32)}
ONES = jax.tree.map(jnp.ones_like, PARAMS)
NAN, INF = float("nan"), float("inf")


def evaluate(tx, losses, **extra):
  """One update per validation loss; returns per-evaluation LRs, stop flags and the state."""
  state = tx.init(PARAMS)
  update = jax.jit(lambda state, loss: tx.update(ONES, state, PARAMS, val_loss=loss, **extra))
  lrs, stops = [], []
  for loss in losses:
    _, state = update(state, jnp.float32(loss))
    lrs.append(float(state.learning_rate))
    stops.append(bool(state.stop))
  return np.array(lrs), stops, state


def test_reduces_after_patience_evaluations_without_improvement():
  # evals: 1.0 (best), 0.5 (best), then 0.5 repeated: no improvement at evals 3, 4
  # -> reduce at eval 4 (patience 2), counter restarts -> reduce again at eval 6.
  lrs, _, _ = evaluate(plateau_lr(0.1, patience=2, early_stopping_patience=None),
                       [1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
  np.testing.assert_allclose(lrs, [0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)


def test_relative_threshold_decides_what_counts_as_improvement():
  # rtol 0.01: after best 1.0, 0.995 is not an improvement (needs < 0.99), 0.985 is.
  tx = plateau_lr(0.1, patience=1, rtol=0.01)
  assert evaluate(tx, [1.0, 0.995])[0][-1] == pytest.approx(0.01)
  assert evaluate(tx, [1.0, 0.985])[0][-1] == pytest.approx(0.1)


def test_lr_never_goes_below_min_lr():
  # patience 1: every non-improving evaluation divides by 10: 1e-3, 1e-4, 1e-5, then the floor.
  lrs, _, _ = evaluate(plateau_lr(1e-3, patience=1, min_lr=3e-6, early_stopping_patience=None),
                       [1.0] + [1.0] * 6)
  np.testing.assert_allclose(lrs, [1e-3, 1e-4, 1e-5, 3e-6, 3e-6, 3e-6, 3e-6], rtol=1e-5)
  assert np.all(lrs >= np.float32(3e-6))


def test_cooldown_ignores_evaluations_after_a_reduction():
  # patience 1, cooldown 2: reduce at eval 2, ignore evals 3 and 4, reduce at
  # eval 5, ignore evals 6 and 7, reduce at eval 8.
  lrs, _, _ = evaluate(plateau_lr(1.0, patience=1, cooldown=2, early_stopping_patience=None),
                       [1.0] * 8)
  np.testing.assert_allclose(lrs, [1.0, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001], rtol=1e-6)


def test_early_stopping_sets_stop_at_the_right_evaluation_and_keeps_it():
  # Best at eval 2; evals 3, 4, 5 do not improve -> stop at eval 5 (patience 3);
  # a later improvement does not clear it.
  _, stops, state = evaluate(plateau_lr(0.1, patience=10, early_stopping_patience=3),
                             [1.0, 0.9, 0.95, 0.95, 0.95, 0.5])
  assert stops == [False, False, False, False, True, True]
  assert bool(should_stop(state))


def test_lr_reductions_do_not_reset_the_early_stopping_count():
  lrs, stops, _ = evaluate(plateau_lr(0.1, patience=2, early_stopping_patience=4), [1.0] * 5)
  np.testing.assert_allclose(lrs, [0.1, 0.1, 0.01, 0.01, 0.001], rtol=1e-6)
  assert stops == [False, False, False, False, True]


def test_no_early_stopping_when_disabled():
  _, stops, _ = evaluate(plateau_lr(0.1, early_stopping_patience=None), [1.0] * 30)
  assert not any(stops)


def test_nan_val_loss_counts_as_no_improvement_and_is_counted():
  lrs, _, state = evaluate(plateau_lr(0.1, patience=2), [1.0, NAN, INF, NAN])
  np.testing.assert_allclose(lrs, [0.1, 0.1, 0.01, 0.01], rtol=1e-6)
  assert int(state.nan_evals) == 3
  assert int(state.evals) == 4 and int(state.evals_since_best) == 3
  assert float(state.plateau.best_value) == 1.0


def test_updates_are_scaled_by_minus_the_current_lr():
  tx = plateau_lr(0.1, patience=1)
  update = jax.jit(lambda g, state: tx.update(g, state, PARAMS, val_loss=1.0))
  state = tx.init(PARAMS)
  grads = {"w": jnp.array([1.0, 2.0, -3.0]), "b": jnp.array(4.0)}
  u, state = update(grads, state)
  np.testing.assert_allclose(u["w"], [-0.1, -0.2, 0.3], rtol=1e-6)
  u, state = update(grads, state)  # reduced at this evaluation
  np.testing.assert_allclose(u["w"], [-0.01, -0.02, 0.03], rtol=1e-5)


def tree_equal(a, b):
  return all(bool(jnp.array_equal(x, y, equal_nan=True))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_steps_without_a_new_evaluation_leave_the_state_unchanged():
  """A jitted step calls update every step; only flagged steps count evaluations."""
  tx = plateau_lr(0.1, patience=1, early_stopping_patience=2)
  step = jax.jit(lambda state, loss, flag: tx.update(ONES, state, PARAMS, val_loss=loss,
                                                     new_eval=flag)[1])
  count = jax.jit(lambda state, loss: tx.update(ONES, state, PARAMS, val_loss=loss)[1])
  losses = [1.0, 2.0, 2.0, 3.0, 3.0, 3.0, 4.0, 4.0, 4.0]  # latest val loss, refreshed every 3 steps
  flags = [i % 3 == 0 for i in range(len(losses))]
  state = tx.init(PARAMS)
  counted = tx.init(PARAMS)
  for loss, flag in zip(losses, flags):
    new = step(state, jnp.float32(loss), jnp.bool_(flag))
    if flag:
      counted = count(counted, jnp.float32(loss))
      assert tree_equal(new, counted)
    else:
      assert tree_equal(new, state)  # bit-for-bit unchanged
    state = new
  assert int(state.evals) == 3
  assert float(state.learning_rate) == pytest.approx(1e-3)  # evals 2 and 3 did not improve
  assert bool(state.stop)
  # The Python-level forms pass through too.
  for kwargs in (dict(new_eval=False), dict(val_loss=5.0, new_eval=False),
                 dict(value=jnp.float32(9.0), new_eval=False)):
    _, same = tx.update(ONES, state, PARAMS, **kwargs)
    assert tree_equal(same, state)
  with pytest.raises(ValueError, match="plateau_lr needs a metric to watch"):
    tx.update(ONES, state, PARAMS)


def test_value_is_the_metric_when_no_val_loss_is_given_as_in_optax():
  """optax.contrib.reduce_on_plateau reads value=; so does plateau_lr, unless a
  val_loss is given too (then value is the training loss and is ignored)."""
  tx = plateau_lr(0.1, patience=1, early_stopping_patience=None)
  state = tx.init(PARAMS)
  for loss in (1.0, 1.0, 1.0):
    _, state = tx.update(ONES, state, PARAMS, value=jnp.float32(loss))
  assert int(state.evals) == 3 and float(state.learning_rate) == pytest.approx(1e-3)
  state = tx.init(PARAMS)
  for val_loss in (3.0, 2.0, 1.0):  # improving: the constant training loss is not read
    _, state = tx.update(ONES, state, PARAMS, value=jnp.float32(1.0),
                         val_loss=jnp.float32(val_loss))
  assert int(state.evals) == 3 and float(state.learning_rate) == pytest.approx(0.1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_metrics_never_improve_in_plateau_and_early_stopping(bad):
  plateau = plateau_lr(0.1, patience=2, early_stopping_patience=2)
  stopper = metaopt.early_stopping(2)
  for tx in (plateau, stopper):
    state = tx.init(PARAMS)
    for loss in (1.0, bad, bad):
      _, state = tx.update(ONES, state, PARAMS, val_loss=jnp.float32(loss))
    assert bool(should_stop(state)), tx
  _, state = plateau.update(ONES, plateau.init(PARAMS), PARAMS, val_loss=jnp.float32(bad))
  assert int(state.nan_evals) == 1 and float(state.plateau.best_value) == np.inf


def test_should_stop_finds_the_state_inside_a_chain_and_under_vmap():
  tx = optax.chain(optax.scale_by_adam(), plateau_lr(0.1, patience=1, early_stopping_patience=1))
  update = jax.jit(lambda state, loss: tx.update(ONES, state, PARAMS, val_loss=loss)[1])
  state = tx.init(PARAMS)
  assert not bool(should_stop(state))
  state = update(update(state, 1.0), 1.0)
  assert bool(should_stop(state))
  assert optax.tree_utils.tree_get(state, "learning_rate") == pytest.approx(0.01)

  def two_runs(losses):
    s = tx.init(PARAMS)
    for loss in losses:
      _, s = tx.update(ONES, s, PARAMS, val_loss=loss)
    return should_stop(s)
  stops = jax.jit(jax.vmap(two_runs))(jnp.array([[1.0, 0.5, 0.25], [1.0, 0.5, 0.5]]))
  np.testing.assert_array_equal(stops, [False, True])


def test_current_lr_reads_the_plateau_state():
  from metaopt.schedules import current_lr
  state = optax.chain(optax.scale_by_adam(), plateau_lr(0.05)).init(PARAMS)
  assert float(current_lr(state)) == pytest.approx(0.05)


def test_should_stop_without_a_plateau_state_raises():
  with pytest.raises(ValueError, match="no PlateauState"):
    should_stop(optax.adam(1e-3).init(PARAMS))


# --- the transform contract ---------------------------------------------------

CONFIGS = {
    "defaults": dict(),
    "cooldown": dict(patience=1, cooldown=1, min_lr=1e-4),
    "no_early_stop": dict(patience=2, early_stopping_patience=None, atol=0.01),
}


def quad_loss(params):
  return jnp.sum((params["w"] - 0.3) ** 2) + (params["b"] + 1.0) ** 2


@pytest.mark.parametrize("name", CONFIGS)
def test_jit_and_no_recompile(name):
  tx = optax.chain(optax.scale_by_adam(), plateau_lr(0.05, **CONFIGS[name]))
  traces = []

  @jax.jit
  def step(params, state, val_loss, new_eval):
    traces.append(1)
    loss, grads = jax.value_and_grad(quad_loss)(params)
    updates, state = tx.update(grads, state, params, value=loss, val_loss=val_loss,
                               new_eval=new_eval)
    return optax.apply_updates(params, updates), state

  params, state = PARAMS, tx.init(PARAMS)
  for i in range(6):
    params, state = step(params, state, jnp.float32(1.0), jnp.bool_(i % 2 == 0))
  assert len(traces) == 1
  assert int(state[1].evals) == 3
  assert quad_loss(params) < quad_loss(PARAMS)


@pytest.mark.parametrize("name", CONFIGS)
def test_unknown_extra_args_are_ignored(name):
  tx = plateau_lr(0.05, **CONFIGS[name])
  losses = [1.0, 0.9, 0.9, 0.9, 0.9]
  a = evaluate(tx, losses)
  b = evaluate(tx, losses, value=jnp.float32(123.0), epoch=3)
  np.testing.assert_array_equal(a[0], b[0])
  assert a[1] == b[1]
  assert tree_equal(a[2], b[2])


@pytest.mark.parametrize("name", CONFIGS)
def test_inside_optax_chain_and_scan(name):
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(),
                   plateau_lr(0.05, **CONFIGS[name]))

  def body(carry, val_loss):
    params, state = carry
    updates, state = tx.update(jax.grad(quad_loss)(params), state, params, val_loss=val_loss)
    return (optax.apply_updates(params, updates), state), state[-1].learning_rate

  (_, state), lrs = jax.lax.scan(body, (PARAMS, tx.init(PARAMS)), jnp.ones((6,)))
  assert isinstance(state[-1], PlateauState)
  assert float(lrs[-1]) < 0.05  # the constant loss plateaued and the LR dropped
  assert bool(jnp.all(lrs >= CONFIGS[name].get("min_lr", 1e-6) * (1 - 1e-6)))


@pytest.mark.parametrize("make, match", [
    (lambda: plateau_lr(0.1, factor=0.0), r"factor .*got 0\.0"),
    (lambda: plateau_lr(0.1, factor=1.0), r"factor .*got 1\.0"),
    (lambda: plateau_lr(0.1, factor=-0.5), r"factor .*got -0\.5"),
    (lambda: plateau_lr(0.1, patience=0), r"patience .*got 0"),
    (lambda: plateau_lr(0.1, patience=2.5), r"patience .*got 2\.5"),
    (lambda: plateau_lr(0.1, cooldown=-1), r"cooldown .*got -1"),
    (lambda: plateau_lr(0.1, early_stopping_patience=0), r"early_stopping_patience .*got 0"),
    (lambda: plateau_lr(1e-3, min_lr=1e-2), r"min_lr=0\.01 must not exceed learning_rate=0\.001"),
    (lambda: plateau_lr(0.0), r"learning_rate .*got 0\.0"),
    (lambda: plateau_lr(0.1, rtol=-0.1), r"rtol .*got -0\.1"),
])
def test_bad_settings_raise_naming_the_value(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_non_scalar_metric_raises():
  tx = plateau_lr(0.1)
  with pytest.raises(ValueError, match=r"scalar, got shape \(3,\)"):
    tx.update(ONES, tx.init(PARAMS), PARAMS, val_loss=jnp.ones(3))
  with pytest.raises(ValueError, match=r"new_eval must be a scalar bool, got shape \(2,\)"):
    tx.update(ONES, tx.init(PARAMS), PARAMS, val_loss=1.0, new_eval=jnp.array([True, False]))
  with pytest.raises(ValueError, match="plateau_lr needs a metric to watch"):
    tx.update(ONES, tx.init(PARAMS), PARAMS, new_eval=True)
