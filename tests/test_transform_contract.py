"""The optax contract, as one matrix over every metaopt transform.

Each must work under jit without recompiling on later calls, ignore extra args it
does not know, and compose inside ``optax.chain`` and ``lax.scan``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metaopt

CONTROLLER = metaopt.LRController(hidden=(8,))


def _theta():
  theta = metaopt.init_controller(jax.random.key(0), CONTROLLER)
  leaves, tree = jax.tree.flatten(theta)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(tree, [0.5 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


OPTIMIZERS = {
    "learned_lr": lambda: optax.chain(optax.scale_by_adam(), metaopt.scale_by_learned_lr(
        CONTROLLER, _theta(), base_lr=1e-2, total_steps=20)),
    "learned_lr_schedule": lambda: optax.inject_hyperparams(optax.adam)(
        learning_rate=metaopt.LearnedLRSchedule(CONTROLLER, _theta(), base_lr=1e-2,
                                                total_steps=20)),
    "pretrained_lr": lambda: optax.chain(optax.scale_by_adam(),
                                         metaopt.pretrained_lr(base_lr=1e-2, total_steps=20)),
    "hypergradient_sgd": lambda: metaopt.hypergradient_sgd(0.05),
    "hypergradient_sgd_nesterov": lambda: metaopt.hypergradient_sgd(0.05, momentum=0.9,
                                                                    nesterov=True),
    "hypergradient_adam": lambda: metaopt.hypergradient_adam(0.05),
    "hypergradient_adam_multiplicative": lambda: metaopt.hypergradient_adam(
        0.05, beta=0.02, multiplicative=True),
    "hypergradient_lr": lambda: metaopt.hypergradient_lr(optax.scale_by_adam(), 0.05, beta=1e-3),
    "plateau_lr": lambda: optax.chain(optax.scale_by_adam(), metaopt.plateau_lr(0.05, patience=1)),
}
PARAMS = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array(0.5, jnp.float32)}


def loss_fn(params):
  return jnp.sum((params["w"] - 0.3) ** 2) + (params["b"] + 1.0) ** 2 + 0.1


def metrics(i):
  """The extra args a training loop passes: loss, and a validation loss every other step."""
  return dict(val_loss=jnp.float32(1.0), new_eval=jnp.bool_(i % 2 == 0))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_jit_and_no_recompile(name):
  tx = OPTIMIZERS[name]()
  traces = []

  @jax.jit
  def step(params, state, extra):
    traces.append(1)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params, value=loss, **extra)
    return optax.apply_updates(params, updates), state

  params, state = PARAMS, tx.init(PARAMS)
  for i in range(4):
    params, state = step(params, state, metrics(i))
  assert len(traces) == 1
  assert loss_fn(params) < loss_fn(PARAMS)
  assert np.isfinite(float(metaopt.current_lr(state)))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_unknown_extra_args_are_ignored(name):
  def run(**unknown):
    tx = OPTIMIZERS[name]()
    params, state, out = PARAMS, tx.init(PARAMS), []
    for i in range(4):
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, state = tx.update(grads, state, params, value=loss, **metrics(i), **unknown)
      params = optax.apply_updates(params, updates)
      out.append(np.asarray(updates["w"]))
    return np.stack(out)
  np.testing.assert_array_equal(run(), run(epoch=3, some_other_metric=jnp.float32(7.0)))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_inside_optax_chain_and_scan(name):
  tx = optax.chain(optax.clip_by_global_norm(1.0), OPTIMIZERS[name]())

  def body(carry, i):
    params, state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params, value=loss, **metrics(i))
    return (optax.apply_updates(params, updates), state), metaopt.current_lr(state)

  (params, _), lrs = jax.lax.scan(body, (PARAMS, tx.init(PARAMS)), jnp.arange(6))
  assert bool(jnp.all(jnp.isfinite(lrs))) and bool(jnp.all(lrs > 0))
  assert loss_fn(params) < loss_fn(PARAMS)
