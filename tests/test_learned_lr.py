"""The learned-LR transform: optax contract, safety, and meta-gradients reaching theta."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metaopt
from metaopt.schedules.learned_lr import FEATURE_CLIP, LRController, controller_features, _spec

CONTROLLER = LRController(hidden=(8,))
PARAMS = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array(0.5, jnp.float32)}


def random_theta(seed=0, scale=0.5):
  """Controller weights with a non-zero output layer, so the LR actually moves."""
  theta = metaopt.init_controller(jax.random.key(seed), CONTROLLER)
  leaves, tree = jax.tree.flatten(theta)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def quadratic_loss(params):
  return jnp.sum((params["w"] - 0.3) ** 2) + (params["b"] + 1.0) ** 2 + 0.1


def learned(theta=None, **kw):
  theta = random_theta() if theta is None else theta
  return optax.chain(optax.scale_by_adam(eps_root=1e-8),
                     metaopt.scale_by_learned_lr(CONTROLLER, theta, learning_rate=1e-2,
                                                 total_steps=50, **kw))


def scheduled(theta=None):
  theta = random_theta() if theta is None else theta
  sched = metaopt.LearnedLRSchedule(CONTROLLER, theta, learning_rate=1e-2, total_steps=50)
  return optax.inject_hyperparams(optax.adam)(learning_rate=sched)




def run(tx, steps=20, **extra):
  params, state = PARAMS, tx.init(PARAMS)
  lrs = []
  for _ in range(steps):
    loss, grads = jax.value_and_grad(quadratic_loss)(params)
    updates, state = tx.update(grads, state, params, value=loss, **extra)
    params = optax.apply_updates(params, updates)
    lrs.append(metaopt.current_lr(state))
  return params, state, jnp.stack(lrs)


def run_schedule(tx, steps=20):
  """A loop that feeds a LearnedLRSchedule its two extra args: the loss, and the norm of
  the previous step's update direction."""
  params, state, norm, lrs = PARAMS, tx.init(PARAMS), jnp.float32(0.0), []
  for _ in range(steps):
    loss, grads = jax.value_and_grad(quadratic_loss)(params)
    updates, state = tx.update(grads, state, params, value=loss, grad_norm=norm)
    norm = metaopt.direction_norm(updates, state)
    params = optax.apply_updates(params, updates)
    lrs.append(metaopt.current_lr(state))
  return jnp.stack(lrs)


@pytest.mark.parametrize("source", ["random", "shipped"])
def test_schedule_under_inject_hyperparams_follows_the_chained_transform(source):
  if source == "shipped":
    chained = optax.chain(optax.scale_by_adam(), metaopt.pretrained_lr(total_steps=40))
    schedule = metaopt.LearnedLRSchedule.from_file(total_steps=40)
  else:
    theta = random_theta(3)
    chained = optax.chain(optax.scale_by_adam(), metaopt.scale_by_learned_lr(
        CONTROLLER, theta, learning_rate=1e-2, total_steps=40))
    schedule = metaopt.LearnedLRSchedule(CONTROLLER, theta, learning_rate=1e-2, total_steps=40)
  _, _, lr_chain = run(chained, steps=40)
  lr_sched = run_schedule(optax.inject_hyperparams(optax.adam)(learning_rate=schedule), steps=40)
  np.testing.assert_allclose(lr_sched, lr_chain, rtol=1e-4)
  assert float(jnp.std(lr_chain)) > 0  # the LR does move


def test_schedule_without_its_extra_args_raises_at_trace_time():
  tx = scheduled()
  state = tx.init(PARAMS)   # initializing needs no extra args
  grads = jax.grad(quadratic_loss)(PARAMS)
  with pytest.raises(ValueError, match="LearnedLRSchedule needs the training loss"):
    jax.jit(lambda s: tx.update(grads, s, PARAMS))(state)
  with pytest.raises(ValueError, match="LearnedLRSchedule needs grad_norm="):
    jax.jit(lambda s: tx.update(grads, s, PARAMS, value=1.0))(state)


@pytest.mark.parametrize("make, match", [
    (lambda: metaopt.pretrained_lr(total_steps=None), "pretrained_lr: total_steps is required"),
    (lambda: metaopt.pretrained_lr(total_steps=0), "pretrained_lr: total_steps must be"),
    (lambda: metaopt.pretrained_lr(total_steps=10, learning_rate=-1.0),
     "pretrained_lr: learning_rate must be a positive"),
    (lambda: metaopt.scale_by_learned_lr(CONTROLLER, random_theta(), total_steps=10),
     "scale_by_learned_lr: learning_rate is required"),
    (lambda: metaopt.LearnedLRSchedule(CONTROLLER, random_theta(), learning_rate=1e-3,
                                       total_steps=10, max_lr_factor=float("inf")),
     "LearnedLRSchedule: max_lr_factor must be a finite number"),
])
def test_errors_name_the_function_called(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_a_loss_that_is_not_a_scalar_is_named():
  tx = learned()
  with pytest.raises(ValueError, match=r"value must be the scalar training loss, got an array "
                                       r"of shape \(8,\)"):
    tx.update(PARAMS, tx.init(PARAMS), PARAMS, value=jnp.ones(8))


def test_old_keyword_names_still_work_with_a_deprecation_warning():
  with pytest.warns(DeprecationWarning, match=r"pretrained_lr\(base_lr=...\) is deprecated"):
    old = metaopt.pretrained_lr(base_lr=1e-2, total_steps=20)
  new = metaopt.pretrained_lr(learning_rate=1e-2, total_steps=20)
  np.testing.assert_array_equal(run(optax.chain(optax.scale_by_adam(), old), 5)[2],
                                run(optax.chain(optax.scale_by_adam(), new), 5)[2])
  with pytest.warns(DeprecationWarning, match="initial_lr"):
    metaopt.hypergradient_adam(initial_lr=1e-3)
  with pytest.warns(DeprecationWarning, match="base_lr"):
    metaopt.plateau_lr(base_lr=1e-3)
  with pytest.raises(ValueError, match="give learning_rate= only"):
    metaopt.plateau_lr(1e-3, base_lr=1e-3)


def test_untrained_controller_keeps_base_lr_and_matches_adam():
  theta = metaopt.init_controller(jax.random.key(0), CONTROLLER)
  params, _, lrs = run(learned(theta), steps=10)
  np.testing.assert_allclose(lrs, 1e-2)
  ref_params, _, _ = run(optax.inject_hyperparams(optax.adam)(learning_rate=1e-2, eps_root=1e-8), 10)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), params, ref_params)


def test_lr_stays_in_bounds_and_moves_slowly():
  theta = random_theta(1, scale=5.0)  # a wild controller
  _, _, lrs = run(learned(theta, min_lr_factor=0.1, max_lr_factor=3.0, max_log_change=0.1,
                          min_response_steps=1.0), 40)
  assert jnp.all(lrs >= 1e-3 * (1 - 1e-5)) and jnp.all(lrs <= 3e-2 * (1 + 1e-5))
  steps = jnp.abs(jnp.diff(jnp.log(jnp.concatenate([jnp.array([1e-2]), lrs]))))
  assert float(steps.max()) <= 0.1 + 1e-5


def test_losses_at_or_below_zero_still_drive_the_controller():
  """A loss with a negative offset crosses zero: the features are taken on shifted losses,
  so the LR keeps moving (it used to freeze at learning_rate), finite and in its bounds."""
  def lrs(offset):
    tx = learned()
    params, state, out = PARAMS, tx.init(PARAMS), []
    for _ in range(40):
      loss, grads = jax.value_and_grad(quadratic_loss)(params)
      updates, state = tx.update(grads, state, params, value=loss - offset)
      params = optax.apply_updates(params, updates)
      out.append(float(metaopt.current_lr(state)))
    return np.asarray(out)
  shifted = lrs(offset=3.0)  # the loss starts near 14 - 3 and falls below zero
  assert np.all(np.isfinite(shifted)) and np.all(shifted > 0)
  assert np.all(shifted <= 1e-2 * 10 * (1 + 1e-6)) and np.all(shifted >= 1e-2 * 1e-2 * (1 - 1e-6))
  assert len(np.unique(shifted[-20:])) > 1   # not frozen
  np.testing.assert_array_equal(lrs(offset=0.0), lrs(offset=0.0))


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_non_finite_loss_never_gives_a_nan_lr(bad):
  tx = learned()
  params, state = PARAMS, tx.init(PARAMS)
  grads = jax.grad(quadratic_loss)(params)
  _, state = tx.update(grads, state, params, value=quadratic_loss(params))
  lr_before = metaopt.current_lr(state)
  nan_grads = jax.tree.map(lambda g: g * jnp.nan, grads)
  updates, state = tx.update(nan_grads, state, params, value=jnp.asarray(bad))
  assert metaopt.current_lr(state) == lr_before
  # Features stay finite and training recovers on the next good step.
  updates, state = tx.update(grads, state, params, value=quadratic_loss(params))
  assert jnp.isfinite(metaopt.current_lr(state))
  feats, _ = controller_features(state[1], _spec(CONTROLLER, base_lr=1e-2, caller="test", min_lr_factor=1e-3,
                                                 max_lr_factor=10., max_log_change=.25, response_time=.02, min_response_steps=10.),
                                 jnp.asarray(0.7), jnp.asarray(1.0), None)
  assert jnp.all(jnp.isfinite(feats)) and jnp.all(jnp.abs(feats) <= FEATURE_CLIP)


def test_features_are_scale_free():
  """Multiplying the loss by 1000 leaves the LR trajectory unchanged."""
  tx = learned()
  def lrs(scale):
    params, state, out = PARAMS, tx.init(PARAMS), []
    for _ in range(15):
      loss, grads = jax.value_and_grad(lambda p: scale * quadratic_loss(p))(params)
      updates, state = tx.update(grads, state, params, value=loss)
      params = optax.apply_updates(params, updates)
      out.append(metaopt.current_lr(state))
    return jnp.stack(out)
  np.testing.assert_allclose(lrs(1.0), lrs(1000.0), rtol=1e-4)


def test_val_loss_feature_changes_the_lr():
  a = run(learned(), steps=5)[2]
  b = run(learned(), steps=5, val_loss=jnp.array(0.5))[2]
  assert not np.allclose(a, b)


def test_grad_through_unroll_reaches_theta_and_matches_finite_differences():
  def meta_loss(theta):
    tx = learned(theta)
    def step(theta_, carry, _):
      params, state = carry
      loss, grads = jax.value_and_grad(quadratic_loss)(params)
      updates, state = tx.update(grads, metaopt.with_theta(state, theta_), params, value=loss)
      return (optax.apply_updates(params, updates), state), {"loss": loss}
    (params, _), _ = metaopt.unroll(step, theta, (PARAMS, tx.init(PARAMS)), None, length=15)
    return quadratic_loss(params)

  theta = random_theta(2)
  grad = jax.jit(jax.grad(meta_loss))(theta)
  leaves = jax.tree.leaves(grad)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0
  d = jax.tree.map(lambda x: jax.random.normal(jax.random.key(9), x.shape), theta)
  eps = 1e-2
  fd = (meta_loss(jax.tree.map(lambda t, v: t + eps * v, theta, d))
        - meta_loss(jax.tree.map(lambda t, v: t - eps * v, theta, d))) / (2 * eps)
  analytic = sum(jnp.vdot(g, v) for g, v in zip(leaves, jax.tree.leaves(d)))
  np.testing.assert_allclose(analytic, fd, rtol=2e-2, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(learning_rate=0.0, total_steps=10), "learning_rate"),
    (dict(learning_rate=-1e-3, total_steps=10), "learning_rate"),
    (dict(learning_rate=1e-3, total_steps=0), "total_steps"),
    (dict(learning_rate=1e-3, total_steps=10, min_lr_factor=2.0), "min_lr_factor"),
])
def test_bad_settings_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    metaopt.scale_by_learned_lr(CONTROLLER, random_theta(), **kwargs)


def test_update_without_loss_raises():
  tx = learned()
  with pytest.raises(ValueError, match="value=loss"):
    tx.update(PARAMS, tx.init(PARAMS), PARAMS)


NO_NORM = tuple(f for f in metaopt.FEATURE_NAMES if f not in metaopt.NORM_FEATURES)


def test_a_controller_on_a_feature_subset_is_the_full_one_with_those_inputs_ignored():
  """A controller reading the features without the update norm gives the LRs of the full
  controller whose first-layer weights on the norm features are zero, and never computes
  the norm (its state keeps 0)."""
  full = random_theta()
  keep = np.array([metaopt.FEATURE_NAMES.index(f) for f in NO_NORM])
  dropped = [metaopt.FEATURE_NAMES.index(f) for f in metaopt.NORM_FEATURES]
  kernel = full["Dense_0"]["kernel"]
  full = {**full, "Dense_0": {**full["Dense_0"], "kernel": kernel.at[np.array(dropped)].set(0.0)}}
  subset = {**full, "Dense_0": {**full["Dense_0"], "kernel": kernel[keep]}}
  assert metaopt.init_controller(jax.random.key(0), CONTROLLER, NO_NORM)["Dense_0"][
      "kernel"].shape == (len(NO_NORM), 8)
  _, _, lrs_full = run(learned(full))
  _, state, lrs_subset = run(learned(subset, features=NO_NORM))
  np.testing.assert_allclose(lrs_subset, lrs_full, rtol=1e-6)
  assert float(jnp.ptp(lrs_subset)) > 1e-4  # the LR moved
  assert float(state[1].features.last_norm) == 0.0
  _, full_state, _ = run(learned(full))
  assert float(full_state[1].features.last_norm) > 0.0


def test_feature_order_is_the_controllers_input_order():
  theta = metaopt.init_controller(jax.random.key(0), CONTROLLER, ("fraction_done",
                                                                  "log_loss_vs_initial"))
  theta = jax.tree.map(lambda x: x + 0.3, theta)
  # The same weights on the swapped inputs: a different controller.
  _, _, forward = run(learned(theta, features=("fraction_done", "log_loss_vs_initial")))
  _, _, swapped = run(learned(theta, features=("log_loss_vs_initial", "fraction_done")))
  assert not np.allclose(forward, swapped)


def test_a_schedule_on_a_subset_without_the_norm_needs_no_grad_norm():
  theta = random_theta()
  theta = {**theta, "Dense_0": {**theta["Dense_0"],
                                "kernel": theta["Dense_0"]["kernel"][:len(NO_NORM)]}}
  sched = metaopt.LearnedLRSchedule(CONTROLLER, theta, learning_rate=1e-2, total_steps=50,
                                    features=NO_NORM)
  tx = optax.inject_hyperparams(optax.adam)(learning_rate=sched)
  _, _, lrs = run(tx)  # value= only
  _, _, chained = run(learned(theta, features=NO_NORM))
  np.testing.assert_allclose(lrs, chained, rtol=1e-6)


@pytest.mark.parametrize("features, match", [
    (("fraction_done", "step_size"), "unknown feature 'step_size'; accepted: fraction_done"),
    (("fraction_done", "fraction_done"), "each once"),
    ((), "at least one feature"),
    ("fraction_done", "must be a list of names"),
])
def test_bad_feature_lists_are_named(features, match):
  with pytest.raises(ValueError, match=f"scale_by_learned_lr: .*{match}"):
    metaopt.scale_by_learned_lr(CONTROLLER, random_theta(), learning_rate=1e-2,
                                total_steps=50, features=features)
  with pytest.raises(ValueError, match=f"MetaLRConfig: .*{match}"):
    metaopt.MetaLRConfig(family=metaopt.meta.lr.task_family(datasets=("iris",)),
                         features=features)


@pytest.mark.parametrize("features", [None, NO_NORM], ids=["every feature", "no norm"])
def test_lagged_applies_the_lr_chosen_at_the_step_before(features):
  # Fixed gradients and losses: both transforms see the same inputs, so their LRs agree
  # step for step, and the lagged one scales each direction by the previous step's LR.
  names = metaopt.FEATURE_NAMES if features is None else features
  theta = random_theta()
  if features is not None:
    keep = np.array([metaopt.FEATURE_NAMES.index(f) for f in names])
    theta = {**theta, "Dense_0": {**theta["Dense_0"],
                                  "kernel": theta["Dense_0"]["kernel"][keep]}}
  make = lambda lagged: metaopt.scale_by_learned_lr(
      CONTROLLER, theta, learning_rate=1e-2, total_steps=50, features=features, lagged=lagged)
  now, late = make(False), make(True)
  a, b = now.init(PARAMS), late.init(PARAMS)
  previous = 1e-2
  for t in range(12):
    grads = jax.tree.map(lambda p: jnp.sin(p + t), PARAMS)
    loss = 2.0 / (1.0 + t)
    ua, a = now.update(grads, a, PARAMS, value=loss)
    ub, b = late.update(grads, b, PARAMS, value=loss)
    lr = float(metaopt.current_lr(a))
    assert float(metaopt.current_lr(b)) == lr
    jax.tree.map(lambda g, u: np.testing.assert_allclose(u, -lr * g, rtol=1e-6), grads, ua)
    jax.tree.map(lambda g, u: np.testing.assert_allclose(u, -previous * g, rtol=1e-6), grads, ub)
    previous = lr
  assert previous != 1e-2  # the controller moved the LR, so the lag is visible


def test_pretrained_lr_lagged_and_bad_values():
  tx = optax.chain(optax.scale_by_adam(), metaopt.pretrained_lr(total_steps=100, lagged=True))
  params, state, lrs = run(tx)
  assert np.all(np.isfinite(np.asarray(lrs)))
  for make in (lambda v: metaopt.pretrained_lr(total_steps=100, lagged=v),
               lambda v: metaopt.scale_by_learned_lr(CONTROLLER, random_theta(),
                                                     learning_rate=1e-3, total_steps=10,
                                                     lagged=v)):
    with pytest.raises(ValueError, match="lagged must be True or False, got 'yes'"):
      make("yes")
