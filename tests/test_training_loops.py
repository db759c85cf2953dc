"""Every metaopt transform in the training loops people write: a plain jitted loop,
Flax's TrainState, nnx.Optimizer and optax.MultiSteps. Each trains a tiny model with
the shipped controller and checks the LR moved away from its starting value, which
happens only if the loop really feeds the loss."""

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import metaopt

X = jax.random.normal(jax.random.key(0), (64, 4))
Y = X @ jnp.array([1.0, -2.0, 0.5, 3.0]) + 0.1
LR, STEPS = 1e-2, 30


def loss_of(predict):
  return jnp.mean((predict(X)[:, 0] - Y) ** 2)


def learned_tx():
  return optax.chain(optax.scale_by_adam(), metaopt.pretrained_lr(learning_rate=LR,
                                                                  total_steps=STEPS))


def assert_lr_moved(lrs, losses):
  lrs = np.asarray(lrs)
  assert np.all(np.isfinite(lrs)) and abs(lrs[-1] - LR) > 1e-3 * LR, lrs
  assert losses[-1] < losses[0]


def test_plain_jitted_loop():
  model = nn.Dense(1)
  params = model.init(jax.random.key(1), X)
  tx = learned_tx()
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(lambda p: loss_of(lambda x: model.apply(p, x)))(params)
    updates, opt_state = tx.update(grads, opt_state, params, value=loss)
    return optax.apply_updates(params, updates), opt_state, loss

  lrs, losses = [], []
  for _ in range(STEPS):
    params, opt_state, loss = step(params, opt_state)
    lrs.append(metaopt.current_lr(opt_state))
    losses.append(loss)
  assert_lr_moved(lrs, losses)


def test_flax_train_state_forwards_the_loss():
  model = nn.Dense(1)
  state = metaopt.TrainState.create(apply_fn=model.apply, params=model.init(jax.random.key(1), X),
                                    tx=learned_tx())

  @jax.jit
  def step(state):
    loss, grads = jax.value_and_grad(lambda p: loss_of(lambda x: state.apply_fn(p, x)))(
        state.params)
    return state.apply_gradients(grads=grads, value=loss), loss

  lrs, losses = [], []
  for _ in range(STEPS):
    state, loss = step(state)
    lrs.append(metaopt.current_lr(state.opt_state))
    losses.append(loss)
  assert_lr_moved(lrs, losses)
  assert int(state.step) == STEPS


def test_nnx_optimizer_forwards_the_loss():
  model = nnx.Linear(4, 1, rngs=nnx.Rngs(1))
  optimizer = nnx.Optimizer(model, learned_tx(), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: loss_of(m))(model)
    optimizer.update(model, grads, value=loss)
    return loss

  lrs, losses = [], []
  for _ in range(STEPS):
    losses.append(step(model, optimizer))
    lrs.append(metaopt.current_lr(optimizer.opt_state))
  assert_lr_moved(lrs, losses)


def test_multi_steps_passes_the_loss_to_every_micro_batch():
  model = nn.Dense(1)
  params = model.init(jax.random.key(1), X)
  tx = optax.MultiSteps(learned_tx(), every_k_schedule=2)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(
        lambda p: jnp.mean((model.apply(p, x)[:, 0] - y) ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state, params, value=loss)
    return optax.apply_updates(params, updates), opt_state, loss

  lrs, losses = [], []
  for i in range(2 * STEPS):
    half = slice(0, 32) if i % 2 == 0 else slice(32, 64)
    params, opt_state, loss = step(params, opt_state, X[half], Y[half])
    lrs.append(metaopt.current_lr(opt_state))
    losses.append(loss_of(lambda x: model.apply(params, x)))
  assert_lr_moved(lrs, losses)


def test_train_state_keeps_flax_field_replacement():
  model = nn.Dense(1)
  state = metaopt.TrainState.create(apply_fn=model.apply, params=model.init(jax.random.key(1), X),
                                    tx=optax.sgd(0.1))
  grads = jax.tree.map(jnp.ones_like, state.params)
  new = state.apply_gradients(grads=grads, step=41)   # a field: replaced, as in Flax
  assert int(new.step) == 41
  np.testing.assert_allclose(new.params["params"]["bias"], state.params["params"]["bias"] - 0.1)


def test_importing_and_a_training_step_trigger_no_deprecation_warning():
  """metaopt calls no deprecated API of its dependencies (optax, jax, flax, orbax)."""
  code = ("import jax, jax.numpy as jnp, optax, metaopt\n"
          "tx = optax.chain(optax.scale_by_adam(), metaopt.pretrained_lr(total_steps=10))\n"
          "p = {'w': jnp.ones(3)}\n"
          "loss, g = jax.value_and_grad(lambda p: jnp.sum(p['w'] ** 2))(p)\n"
          "u, s = jax.jit(lambda g, s, p, l: tx.update(g, s, p, value=l))(g, tx.init(p), p, loss)\n"
          "assert float(metaopt.current_lr(s)) > 0\n")
  out = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", code],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
