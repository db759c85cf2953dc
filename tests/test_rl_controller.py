"""The RL LR controller: PPO learns to lower a too-high LR; the deployed transform; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaopt.meta import rl
from metaopt.tasks import task_family

# Iris at a starting LR of 0.3: Adam bounces around; only a lower LR improves the
# validation loss (raising it, up to 10x, only makes things worse).
FAMILY = task_family(datasets=("iris",), widths=(16,), depths=(1,), batch_sizes=(16,),
                     total_steps=(50,))


def test_policy_learns_to_lower_the_lr_where_only_lowering_helps():
  config = rl.RLConfig(family=FAMILY, epochs=5, epoch_steps=10, episodes=16, iterations=30,
                       learning_rate=0.3, min_lr_factor=1e-3, meta_lr=1e-3, minibatches=4,
                       seed=0)
  result = rl.train_rl(config, progress=False)
  steps = [h["mean_log_multiplier"] for h in result.history]
  assert abs(np.mean(steps[:3])) < 0.1            # untrained: keeps the LR on average
  assert np.mean(steps[-5:]) < -0.15               # trained: multiplies it down every epoch
  # ... and ends its runs far below the starting LR.
  assert np.mean([h["final_lr"] for h in result.history[-5:]]) < 0.5 * config.learning_rate


def test_deployed_transform_decides_once_per_epoch():
  settings = dict(rl.RLConfig(family=FAMILY).policy_settings, init_std=0.3)
  params = rl.init_policy(jax.random.PRNGKey(0), settings)
  # A policy that always asks for the largest multiplier.
  params["Dense_2"]["bias"] = jnp.full_like(params["Dense_2"]["bias"], 5.0)
  tx = rl.rl_adam(params, settings, total_steps=12, epoch_steps=4)
  state = tx.init(jnp.ones(3))
  update = jax.jit(tx.update)
  lrs = []
  for t in range(12):
    _, state = update(jnp.ones(3), state, jnp.ones(3), value=1.0 / (t + 1), val_loss=0.5,
                      val_accuracy=0.5)
    lrs.append(float(state[-1].learning_rate))
  high = settings["action_range"][1]
  np.testing.assert_allclose(lrs, np.repeat([1e-3 * high, 1e-3 * high ** 2,
                                             1e-3 * high ** 3], 4), rtol=1e-5)
  with pytest.raises(ValueError, match="needs value=.*val_loss=.*val_accuracy="):
    tx.update(jnp.ones(3), tx.init(jnp.ones(3)), jnp.ones(3), value=1.0, val_loss=0.5)


def test_policy_file_round_trips(tmp_path):
  settings = dict(rl.RLConfig(family=FAMILY, action="discrete").policy_settings, init_std=0.3)
  params = rl.init_policy(jax.random.PRNGKey(1), settings)
  back, s = rl.load_policy(rl.save_policy(tmp_path / "p", params, settings))
  assert s["action"] == "discrete"
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kw, needle", [
    (dict(action_range=(0.5, 0.9)), "action_range must contain 1 (0 < low <= 1 <= high, "
                                     "low < high), got (0.5, 0.9)"),
    (dict(action_range=(1.1, 2.0)), "got (1.1, 2.0)"),
    (dict(action_range=(0.0, 2.0)), "got (0.0, 2.0)"),
    (dict(action_range=(1.0,)), "action_range must be two multipliers (low, high), got (1.0,)"),
    (dict(epoch_steps=0), "epoch_steps must be an integer >= 1, got 0"),
    (dict(action="gaussian"), "unknown action 'gaussian'; accepted: continuous, discrete"),
    (dict(minibatches=3), "minibatches=3 must divide epochs x episodes"),
])
def test_bad_settings_are_refused_naming_the_value(kw, needle):
  with pytest.raises(ValueError) as e:
    rl.RLConfig(family=FAMILY, **kw)
  assert needle in str(e.value)


def test_bad_deployment_intervals_are_refused():
  settings = rl.RLConfig(family=FAMILY).policy_settings
  with pytest.raises(ValueError, match="epoch_steps must be an integer >= 1, got 0"):
    rl.scale_by_rl_lr({}, settings, total_steps=10, epoch_steps=0)
  with pytest.raises(ValueError, match="action_range must contain 1"):
    rl.scale_by_rl_lr({}, dict(settings, action_range=[2.0, 3.0]), total_steps=10,
                      epoch_steps=2)
