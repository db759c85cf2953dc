"""AlgoPerf-style scoring (time to target, performance profiles), the LR stability
measure of the experiments' tables, and the optax.contrib self-tuning baselines in the
experiments' training loop."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metaopt.experiments import protocol
from metaopt.schedules import (SELF_TUNING, current_lr, early_stopping, evaluation_params,
                               self_tuning)
from metaopt.tasks import TaskConfig, make_task
from metaopt.train import train_grid

STEPS = np.array([0, 10, 20, 30, 40])


@pytest.mark.parametrize("curve, expected", [
    ([0.1, 0.5, 0.9, 0.95, 0.95], 20.0),    # reached
    ([0.1, 0.2, 0.3, 0.5, 0.91], 40.0),     # reached at the last evaluation
    ([0.1, 0.2, 0.3, 0.5, 0.89], None),     # never reached
    ([0.1, np.nan, 0.95, 0.2, 0.2], 20.0),  # a NaN is not a hit; a later drop does not undo one
])
def test_steps_to_target_on_hand_made_curves(curve, expected):
  assert protocol.steps_to_target(STEPS, curve, 0.9) == expected


def test_lower_is_better_targets():
  assert protocol.steps_to_target(STEPS, [3, 2, 1, 0.5, 0.4], 1.0, higher_is_better=False) == 20


def test_performance_profile_and_score_on_a_hand_made_table():
  costs = {"a": {"w1": 100, "w2": 400, "w3": None},
           "b": {"w1": 200, "w2": 100, "w3": 300},
           "c": {"w1": None, "w2": None, "w3": None}}
  taus = [1.0, 2.0, 4.0]
  profile = protocol.performance_profile(costs, taus)
  # a: fastest on w1, 4x on w2, never on w3; b: 2x on w1, fastest on w2 and w3.
  np.testing.assert_allclose(profile["a"], [1 / 3, 1 / 3, 2 / 3])
  np.testing.assert_allclose(profile["b"], [2 / 3, 1.0, 1.0])
  np.testing.assert_allclose(profile["c"], [0.0, 0.0, 0.0])
  assert protocol.profile_score(profile["b"], taus) > protocol.profile_score(profile["a"], taus)
  assert protocol.profile_score(np.ones(3), taus) == pytest.approx(1.0)
  assert protocol.profile_score(profile["c"], taus) == 0.0


def _lr_curves(lr, stopped_at=None):
  return types.SimpleNamespace(learning_rate=np.asarray(lr, np.float32), stopped_at=stopped_at)


def test_lr_stability_cuts_each_seed_at_its_stop_and_drops_unknown_lrs():
  nan, inf = np.nan, np.inf
  curves = _lr_curves([[1, 2, 4, nan, nan],    # stopped after 3 steps: NaN from there on
                       [3, inf, 3, 3, 7]],     # an infinite LR is dropped; 7 after the stop
                      stopped_at=np.array([3, 4]))
  variance, tv = protocol.lr_stability(curves)
  # Seed 1: [1, 2, 4]: variance 14/9, total variation 1 + 2; seed 2: [3, 3, 3]: 0 and 0.
  assert variance == pytest.approx(7 / 9) and tv == pytest.approx(1.5)
  # A run stopped at step 0 keeps its first LR; a seed with no LR at all makes both NaN.
  assert protocol.lr_stability(_lr_curves([[2, 5]], np.array([0]))) == (0.0, 0.0)
  assert np.isnan(protocol.lr_stability(_lr_curves([[1, 2], [nan, nan]], np.array([2, 2])))).all()


def test_log_lr_stability_is_scale_free_and_infinite_when_the_lr_reaches_zero():
  e = np.e
  # No stopped_at (the hand schedules and the controllers run to the end): the whole curve.
  curves = types.SimpleNamespace(learning_rate=np.array([[1, e, e ** 3, np.nan]]))
  assert protocol.lr_stability(curves, log=True)[1] == pytest.approx(3.0)   # 1 + 2
  assert protocol.lr_stability(_lr_curves([[1e-3] * 4, [5.0] * 4]), log=True) == (0.0, 0.0)
  # A cosine decayed to 0: log 0 = -inf, so the total variation is +inf (the report shows
  # "–"); staying at 0 adds nothing more, and the variance is that of the LR itself.
  variance, tv = protocol.lr_stability(_lr_curves([[1.0, 0.5, 0.0, 0.0], [1, 1, 1, 1]],
                                                  stopped_at=None), log=True)
  assert tv == np.inf
  assert variance == pytest.approx(np.var([1.0, 0.5, 0.0, 0.0]) / 2)
  # The cut at the stop applies too; without log the same decay has a finite variation.
  _, tv = protocol.lr_stability(_lr_curves([[1, e, 0, 0]], np.array([2])), log=True)
  assert tv == pytest.approx(1.0)
  assert protocol.lr_stability(_lr_curves([[1.0, 0.5, 0.0, 0.0]]))[1] == pytest.approx(1.0)


@pytest.mark.parametrize("call, match", [
    (lambda: protocol.performance_profile({"a": {"w": 1}}, []), "taus must be a non-empty"),
    (lambda: protocol.performance_profile({"a": {"w": 1}}, [0.5, 2]), "taus must be"),
    (lambda: protocol.profile_score(np.ones(1), [1.0]), "at least two taus"),
    (lambda: protocol.validation_target("iris", [np.nan]), "workload 'iris' has no finite"),
    (lambda: protocol.validation_target("iris", []), "needs a validation split"),
    (lambda: self_tuning("adagrad_free"), "unknown self-tuning optimizer 'adagrad_free'; "
                                          "accepted: schedule_free_adamw"),
    (lambda: self_tuning("prodigy_linear_decay"), "'prodigy_linear_decay' needs total_steps"),
    (lambda: self_tuning("prodigy_linear_decay", 0), "total_steps must be an integer >= 1"),
])
def test_bad_input_is_named(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_every_self_tuning_baseline_trains_in_the_experiments_loop():
  """As adaptive-lr runs them: validation losses fed, early stopping chained after."""
  task = make_task(TaskConfig("iris", "mlp", 8, 1, 16, 20, 0))
  for name in SELF_TUNING:
    make_tx = lambda _, n=name: optax.chain(self_tuning(n, 20), early_stopping(5))
    res, _ = train_grid(task, make_tx, jnp.zeros(1), jax.random.PRNGKey(0)[None], steps=20,
                        eval_every=10, feed_val_loss=True)
    assert np.all(np.isfinite(res.train_loss)), name
    assert res.val_loss[0, -1] != res.val_loss[0, 0], name   # the parameters moved


def test_schedule_free_is_evaluated_at_its_averaged_parameters():
  tx = self_tuning("schedule_free_adamw")
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  for _ in range(3):
    updates, state = tx.update({"w": jnp.ones(3)}, state, params)
    params = optax.apply_updates(params, updates)
  averaged = evaluation_params(state, params)
  np.testing.assert_allclose(averaged["w"],
                             optax.contrib.schedule_free_eval_params(state, params)["w"])
  assert not np.allclose(averaged["w"], params["w"])
  assert evaluation_params(optax.adam(1e-3).init(params), params) is params


def test_prodigy_linear_decay_is_prodigy_whose_lr_reaches_zero_at_total_steps():
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  decayed, plain = self_tuning("prodigy_linear_decay", 4), self_tuning("prodigy")
  s_decayed, s_plain = decayed.init(params), plain.init(params)
  grad = {"w": jnp.array([0.5, -1.0, 2.0])}
  for step in range(5):
    u_decayed, s_decayed = decayed.update(grad, s_decayed, params)
    u_plain, s_plain = plain.update(grad, s_plain, params)
    # Prodigy's step scales with the schedule: 1 - step / 4, then 0 from step 4 on.
    np.testing.assert_allclose(u_decayed["w"], (1 - min(step, 4) / 4) * u_plain["w"],
                               rtol=1e-5, atol=1e-12)
    if step < 4:
      assert np.all(u_decayed["w"] != 0)
    # The LR a training loop records is the step applied: Prodigy's estimate D times
    # the decay factor of the step just taken, not D alone.
    estimate = s_decayed.inner_state.estim_lr
    np.testing.assert_allclose(current_lr(s_decayed), (1 - min(step, 4) / 4) * estimate,
                               rtol=1e-6)
    np.testing.assert_allclose(current_lr(s_plain), s_plain.estim_lr, rtol=1e-6)
