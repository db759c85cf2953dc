"""The recurrent (LSTM) controller and the update interval: the memory travels in the optax
state through checkpoints and controller files, and update_every holds the LR between
decisions."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metaopt
from metaopt.checkpoint import Checkpoints
from metaopt.schedules import learned_lr

LSTM = metaopt.LSTMController(hidden=(4,))
EVERY = 3
STEPS = 3 * EVERY
PARAMS = {"w": jnp.arange(3.0)}


def random_theta(controller):
  """Weights whose output is not zero (a fresh controller keeps the base LR); drawn on
  the template's shapes, which is cheaper than initializing the LSTM."""
  shapes = jax.eval_shape(lambda k: metaopt.init_controller(k, controller), jax.random.key(0))
  leaves, treedef = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(treedef, [0.5 * jax.random.normal(k, x.shape, x.dtype)
                                      for k, x in zip(keys, leaves)])


THETA = random_theta(LSTM)


def lstm_tx(theta, **kw):
  # eps_root: differentiable where a gradient is zero (meta-gradients)
  return optax.chain(optax.scale_by_adam(eps_root=1e-8),
                     metaopt.scale_by_learned_lr(LSTM, theta, learning_rate=1e-2,
                                                 total_steps=40, **kw))


def run(update, state, params, steps, start=0):
  """``steps`` jitted updates on a fixed quadratic; the LR and the state after each."""
  lrs, states = [], []
  for i in range(start, start + steps):
    grads = jax.tree.map(lambda p: p * (1.0 + 0.1 * i), params)
    updates, state = update(grads, state, params, value=jnp.float32(2.0 / (i + 1)))
    params = optax.apply_updates(params, updates)
    lrs.append(float(metaopt.current_lr(state)))
    states.append(state)
  return lrs, states, params


@pytest.fixture(scope="module")
def trained():
  """An LSTM controller deciding every EVERY steps, run for STEPS steps (compiled once)."""
  tx = lstm_tx(THETA, update_every=EVERY)
  update = jax.jit(tx.update)
  lrs, states, params = run(update, tx.init(PARAMS), PARAMS, STEPS)
  return dict(tx=tx, update=update, lrs=lrs, states=states, params=params)


def test_the_memory_survives_a_checkpoint_round_trip(tmp_path, trained):
  tx, state, params = trained["tx"], trained["states"][-1], trained["params"]
  memory = state[-1].memory
  assert isinstance(state[-1], metaopt.LearnedLRState)
  assert jax.tree.structure(memory) == jax.tree.structure(LSTM.initial_memory())
  assert all(np.abs(np.asarray(x)).sum() > 0 for x in jax.tree.leaves(memory))

  ckpt = Checkpoints(tmp_path, every=1)
  ckpt.save(1, {"params": params, "opt_state": state}, {"record": {}})
  _, restored, _ = ckpt.restore(lambda _: {"params": PARAMS, "opt_state": tx.init(PARAMS)})
  ckpt.close()
  assert jax.tree.structure(restored["opt_state"]) == jax.tree.structure(state)
  jax.tree.map(np.testing.assert_array_equal, restored["opt_state"], state)
  # Training goes on from the restored state exactly as from the original.
  a = run(trained["update"], state, params, EVERY + 1, start=STEPS)[0]
  b = run(trained["update"], restored["opt_state"], restored["params"], EVERY + 1,
          start=STEPS)[0]
  assert a == b and a[-1] != a[0]


def test_update_every_holds_the_lr_and_the_memory_between_decisions(trained):
  lrs, states = trained["lrs"], trained["states"]
  for k in range(STEPS // EVERY):  # decisions at steps 0, 3, 6; held until the next one
    assert lrs[k * EVERY: (k + 1) * EVERY] == [lrs[k * EVERY]] * EVERY
  assert len(set(lrs)) == STEPS // EVERY and 1e-2 not in lrs
  memories = [s[-1].memory for s in states]
  for i in range(1, len(states)):
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(memories[i]),
                                                  jax.tree.leaves(memories[i - 1])))
    assert same == (i % EVERY != 0), i
  # Features keep counting every step.
  assert int(states[-1][-1].features.count) == STEPS


def test_meta_gradients_reach_every_lstm_weight_through_the_memory():
  """jax.grad through a few steps of training, as meta/lr.py takes it: finite, and non-zero
  for the recurrent weights too (they act only through the carried memory)."""
  def loss_after(theta):
    tx = lstm_tx(theta, update_every=2)
    def step(carry, i):
      params, state = carry
      updates, state = tx.update(params, state, params, value=jnp.sum(params["w"] ** 2) + 1.0)
      return (optax.apply_updates(params, updates), state), None
    (params, _), _ = jax.lax.scan(step, (PARAMS, tx.init(PARAMS)), jnp.arange(5))
    return jnp.sum(params["w"] ** 2)
  grads = jax.jit(jax.grad(loss_after))(THETA)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)) and np.abs(np.asarray(g)).sum() > 0, path


@pytest.mark.parametrize("make", [
    lambda: metaopt.scale_by_learned_lr(LSTM, None, learning_rate=1e-3, total_steps=10,
                                        update_every=0),
    lambda: metaopt.LearnedLRSchedule(LSTM, None, learning_rate=1e-3, total_steps=10,
                                      update_every=0),
])
def test_an_update_interval_below_one_names_the_value(make):
  with pytest.raises(ValueError, match="update_every must be an integer >= 1, got 0"):
    make()


def test_an_lstm_controller_file_round_trips_and_deploys(tmp_path, trained):
  metaopt.save_controller(tmp_path, THETA, hidden=(4,), learning_rate=1e-2, kind="lstm",
                          update_every=EVERY)
  config = json.loads((tmp_path / learned_lr.CONFIG_FILE).read_text())
  assert config["version"] == 2 and config["kind"] == "lstm" and config["update_every"] == EVERY
  loaded = metaopt.load_controller(tmp_path)
  assert isinstance(loaded.controller, metaopt.LSTMController)
  assert loaded.controller.hidden == (4,) and loaded.update_every == EVERY
  jax.tree.map(np.testing.assert_array_equal, THETA, loaded.theta)
  deployed = optax.chain(optax.scale_by_adam(eps_root=1e-8),
                         metaopt.pretrained_lr(tmp_path, total_steps=40))
  lrs = run(jax.jit(deployed.update), deployed.init(PARAMS), PARAMS, STEPS)[0]
  assert lrs == trained["lrs"]
  with pytest.raises(ValueError, match="does not match LSTMController"):
    metaopt.save_controller(tmp_path / "b", THETA, hidden=(8,), kind="lstm")
  with pytest.raises(ValueError, match="unknown controller 'gru'"):
    metaopt.save_controller(tmp_path / "c", THETA, hidden=(4,), kind="gru")


def test_a_feed_forward_controller_is_still_written_as_version_1(tmp_path):
  mlp = metaopt.LRController(hidden=(4,))
  metaopt.save_controller(tmp_path, metaopt.init_controller(jax.random.key(0), mlp),
                          hidden=(4,))
  config = json.loads((tmp_path / learned_lr.CONFIG_FILE).read_text())
  assert config["version"] == 1 and "kind" not in config and "update_every" not in config
  loaded = metaopt.load_controller(tmp_path)
  assert type(loaded.controller) is metaopt.LRController and loaded.update_every == 1
  # Its optax state carries an empty memory: no extra leaves.
  tx = metaopt.scale_by_learned_lr(mlp, loaded.theta, learning_rate=1e-3, total_steps=10)
  state = tx.init(PARAMS)
  assert state.memory == () and len(jax.tree.leaves(state)) == len(jax.tree.leaves(
      (state.theta, state.features, state.learning_rate)))
