"""Properties of every LR transform, checked with Hypothesis: whatever sequence of
losses, gradients and validation metrics a run feeds it (finite or not, negative,
huge), for every params dtype, the LR stays finite, positive and within its bounds."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import metaopt

CONTROLLER = metaopt.LRController(hidden=(8,))
THETA = jax.tree.map(lambda x: 0.7 * jnp.ones_like(x) if x.ndim == 2 else x,
                     metaopt.init_controller(jax.random.key(0), CONTROLLER))
LR = 1e-2
# name: (optax transform, lowest LR, highest LR)
TRANSFORMS = {
    "scale_by_learned_lr": (lambda: optax.chain(optax.scale_by_adam(), metaopt.scale_by_learned_lr(
        CONTROLLER, THETA, learning_rate=LR, total_steps=20)), LR * 1e-2, LR * 10),
    "pretrained_lr": (lambda: optax.chain(optax.scale_by_adam(), metaopt.pretrained_lr(
        learning_rate=LR, total_steps=20)), LR * 1e-2, LR * 10),
    "hypergradient_sgd": (lambda: metaopt.hypergradient_sgd(LR, beta=1e-2), 1e-8, 1.0),
    "hypergradient_adam": (lambda: metaopt.hypergradient_adam(LR, beta=1e-2), 1e-8, 1.0),
    "hypergradient_multiplicative": (lambda: metaopt.hypergradient_lr(
        optax.scale_by_adam(), LR, beta=0.5, multiplicative=True), 1e-8, 1.0),
    "plateau_lr": (lambda: optax.chain(optax.scale_by_adam(), metaopt.plateau_lr(
        LR, patience=1, min_lr=1e-5)), 1e-5, LR),
}
DTYPES = ("float16", "bfloat16", "float32", "float64")
VALUES = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.sampled_from([0.0, -1.0, 1e30, -1e30, 1e-30]))
STEP = st.tuples(VALUES, VALUES, VALUES, st.booleans())  # loss, gradient scale, val loss, new eval


@functools.lru_cache(maxsize=None)
def jitted_step(name, dtype):
  tx = TRANSFORMS[name][0]()

  @jax.jit
  def step(state, params, loss, scale, val_loss, new_eval):
    grads = jax.tree.map(lambda p: (scale * jnp.ones_like(p, jnp.float32)).astype(p.dtype),
                         params)
    _, state = tx.update(grads, state, params, value=loss, val_loss=val_loss, new_eval=new_eval)
    return state
  return tx, step


def run(name, dtype, steps):
  tx, step = jitted_step(name, dtype)
  params = {"w": jnp.ones((3,), dtype), "b": jnp.zeros((), dtype)}
  state = tx.init(params)
  lrs = []
  for loss, scale, val_loss, new_eval in steps:
    state = step(state, params, jnp.float32(loss), jnp.float32(scale), jnp.float32(val_loss),
                 jnp.bool_(new_eval))
    lrs.append(float(metaopt.current_lr(state)))
  return np.asarray(lrs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", TRANSFORMS)
@settings(max_examples=12, deadline=None, derandomize=True)
@given(steps=st.lists(STEP, min_size=1, max_size=6))
def test_the_lr_stays_finite_positive_and_in_its_bounds(name, dtype, steps):
  low, high = TRANSFORMS[name][1:]
  with jax.enable_x64(dtype == "float64"):
    lrs = run(name, dtype, steps)
  assert np.all(np.isfinite(lrs)), lrs
  assert np.all(lrs > 0), lrs
  assert np.all(lrs >= low * (1 - 1e-5)) and np.all(lrs <= high * (1 + 1e-5)), lrs
