"""Meta-training the LR controller: resume equals uninterrupted, non-finite handling, logs."""

import json

import jax
import numpy as np
import pytest

import jax.numpy as jnp

from metaopt import estimators
from metaopt.meta import lr as meta_lr
from metaopt.meta.lr import MetaLRConfig, _finite_mean, meta_train
from metaopt.schedules import BaseOptimizer, init_controller
from metaopt.tasks import TaskConfig, make_task, task_family

FAMILY = task_family(datasets=("digits",), widths=(16,), depths=(1,), batch_sizes=(16,),
                     total_steps=(30, 60))


def tiny(**kw):
  base = dict(family=FAMILY, lanes=2, population=2, segment_length=10, meta_steps=7,
              checkpoint_every=2, hidden=(8,), seed=3)
  return MetaLRConfig(**{**base, **kw})


def leaves_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_equals_uninterrupted(tmp_path):
  config = tiny()
  full = meta_train(config, tmp_path / "full", progress=False)
  # Killed after step 5 (last checkpoint at 4), then restarted twice.
  meta_train(config, tmp_path / "resumed", progress=False, stop_after=5)
  resumed = meta_train(config, tmp_path / "resumed", progress=False)
  leaves_equal(full.theta, resumed.theta)
  assert any(np.abs(np.asarray(x)).sum() > 0 for x in jax.tree.leaves(full.theta))
  lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == list(range(7))
  assert [h["meta_loss"] for h in resumed.history] == [h["meta_loss"] for h in full.history]
  # A finished run restarted does no more work and gives the same theta.
  again = meta_train(config, tmp_path / "resumed", progress=False)
  leaves_equal(full.theta, again.theta)


def test_theta_moves_and_the_meta_loss_is_recorded():
  result = meta_train(tiny(meta_steps=3, lanes=1), progress=False)
  assert len(result.history) == 3
  assert all(np.isfinite(h["meta_loss"]) and h["meta_grad_norm"] > 0 for h in result.history)
  last_layer = result.theta["Dense_1"]["kernel"]
  assert np.abs(np.asarray(last_layer)).sum() > 0  # zero at init


def test_finite_mean_drops_non_finite_members():
  values = jnp.array([1.0, jnp.nan, 3.0])
  grads = {"w": jnp.array([[1.0, 1.0], [2.0, 2.0], [3.0, jnp.inf]])}
  mean, grad, n_ok = _finite_mean(values, grads)
  assert int(n_ok) == 1 and float(mean) == 1.0
  np.testing.assert_array_equal(grad["w"], [1.0, 1.0])


def test_non_finite_meta_gradients_are_skipped_and_counted(monkeypatch):
  original = meta_lr.lr_problem

  def nan_problem(*args, **kw):
    problem = original(*args, **kw)
    return problem._replace(meta_loss=lambda th, s, b: problem.meta_loss(th, s, b) * jnp.nan)
  monkeypatch.setattr(meta_lr, "lr_problem", nan_problem)
  config = tiny(meta_steps=2, lanes=1)
  result = meta_train(config, progress=False)
  assert result.skipped_members == 2 * config.population
  assert result.skipped_steps == 2
  initial = init_controller(jax.random.fold_in(jax.random.PRNGKey(config.seed), 0),
                            result.controller)
  leaves_equal(result.theta, initial)  # no update was applied


@pytest.mark.parametrize("kw, match", [
    (dict(segment_length=7), "not multiples of segment_length=7"),
    (dict(meta_lr=0.0), "meta_lr"),
    (dict(lanes=0), "lanes"),
])
def test_bad_config_raises(kw, match):
  with pytest.raises(ValueError, match=match):
    tiny(**kw)


TABULAR = task_family(datasets=("iris",), widths=(8,), depths=(1,), batch_sizes=(8,),
                      total_steps=(20,))


def test_lanes_alternate_between_families_and_batches_are_masked_per_family():
  config = tiny(lanes=3, meta_steps=1, families=(TABULAR,), segment_length=10)
  trainer = meta_lr.MetaTrainer(config)
  state, record = trainer.initial()
  datasets = [trainer._task(lane, 0).config.dataset for lane in range(3)]
  assert datasets == ["digits", "iris", "digits"]
  # Each dataset's batches are sampled at its own families' largest batch size.
  assert config.max_batch(trainer._task(1, 0).config) == 8
  assert config.max_batch(trainer._task(0, 0).config) == 16
  state, record, rows = trainer.advance(state, record, 0, 1)
  assert len(rows) == 1 and np.isfinite(rows[0]["meta_loss"])


def test_meta_trains_a_multiplier_of_prodigys_estimate():
  """optimizer.step_size: the controller's LR (learning_rate=1.0 untrained) scales
  Adam's direction times Prodigy's D and its decay; the LR recorded is the multiplier."""
  config = tiny(meta_steps=1, lanes=1, learning_rate=1.0,
                optimizer=BaseOptimizer(step_size="prodigy_linear_decay"))
  result = meta_train(config, progress=False)
  assert all(np.isfinite(h["meta_loss"]) and h["meta_grad_norm"] > 0 for h in result.history)
  assert result.history[0]["mean_lr"] == pytest.approx(1.0, rel=0.05)
  task = make_task(TaskConfig("digits", "mlp", 16, 1, 16, 30, 0))
  tx = meta_lr.learned_lr_tx(result.controller, result.theta, config, 30)
  params = task.init_variables(jax.random.PRNGKey(0))["params"]
  state = tx.init(params)
  grads = jax.grad(task.loss)(params, task.sample_batch(task.arrays(), jax.random.PRNGKey(1)))
  updates, _ = tx.update(grads, state, params, value=jnp.float32(2.0))
  # Prodigy's D starts at 1e-6: the first step is about 1e-6 times Adam's unit step.
  largest = max(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(updates))
  assert 1e-8 < largest < 1e-4


@pytest.mark.parametrize("families, match", [
    ((FAMILY._replace(total_steps=(35,)),), r"training lengths \[35\] are not multiples"),
    (("iris",), r"families\[0\] must be a TaskFamily .*got 'iris'"),
    ((TABULAR._replace(datasets=("nope",)),), "unknown dataset 'nope'"),
])
def test_bad_families_name_the_value(families, match):
  with pytest.raises(ValueError, match=match):
    tiny(families=families)


# --- es and pes ---------------------------------------------------------------------------


def test_pes_resumes_exactly_with_staggered_restarts(tmp_path):
  """Each lane's PESState follows its run and restarts with it, lane 0's first run is cut
  short (staggered), the LR rises where TBPTT raises it, and a killed run resumed from its
  checkpoint (PES states included) ends as the uninterrupted one."""
  config = tiny(estimator="pes", population=4)
  trainer = meta_lr.MetaTrainer(config)
  state, record = trainer.initial()
  restarts, rows = {0: [], 1: []}, []
  for step in range(config.meta_steps):  # uninterrupted, one meta step at a time
    state, record, row = trainer.advance(state, record, step, 1)
    rows += row
    for i, lane in enumerate(record["lanes"]):
      pes_state = state["lanes"][i]
      assert isinstance(pes_state, estimators.PESState) and pes_state.pairs == 2
      # Truncations done in the current run: 0 right after a restart (fresh accumulator).
      np.testing.assert_array_equal(pes_state.truncations, lane["t"] // config.segment_length)
      if lane["t"] == 0:
        restarts[i].append(step)
  # Lane 0's first run (30 or 60 steps) ends after half its segments, lane 1's at its end.
  first = [trainer._task(i, 0).config.total_steps // config.segment_length for i in (0, 1)]
  assert restarts[0][0] == -(-first[0] // 2) - 1 and restarts[1][0] == first[1] - 1
  assert restarts[0][0] != restarts[1][0]
  assert all(np.isfinite(r["meta_grad_norm"]) and r["meta_grad_norm"] > 0 for r in rows)
  # Digits at Adam 1e-3: a larger LR lowers the loss, TBPTT's meta-gradient raises it, so does PES.
  assert rows[-1]["mean_lr"] > rows[0]["mean_lr"] > 1e-3

  trainer.run(tmp_path, progress=False, stop_after=5)   # killed after step 5
  resumed = trainer.run(tmp_path, progress=False)  # restores the checkpoint of step 4
  leaves_equal(state["theta"], resumed.theta)
  assert [h["meta_loss"] for h in resumed.history] == [r["meta_loss"] for r in rows]


@pytest.mark.parametrize("kw, match", [
    (dict(estimator="pes", population=3), "population must be even .*got 3"),
    (dict(estimator="es", population=1), "population must be even .*got 1"),
    (dict(estimator="pes", sigma=0.0), "sigma must be a positive .*got 0.0"),
    (dict(sigma=-1.0), "sigma must be a positive .*got -1.0"),
    (dict(update_every=0), "update_every must be an integer >= 1, got 0"),
    (dict(estimator="full"), "unknown estimator 'full'; accepted: tbptt, es, pes"),
    (dict(controller="gru"), "unknown controller 'gru'; accepted: mlp, lstm"),
    (dict(meta_objective="accuracy"),
     "unknown meta_objective 'accuracy'; accepted: log_val_loss, val_error"),
    (dict(meta_objective="val_error"), "use estimator='es' or 'pes', got estimator='tbptt'"),
])
def test_bad_estimator_settings_name_the_value(kw, match):
  with pytest.raises(ValueError, match=match):
    tiny(**kw)




def test_val_error_meta_objective_is_the_validation_error_and_pes_follows_it():
  config = tiny(estimator="pes", population=4, meta_objective="val_error", meta_steps=3)
  task = make_task(TaskConfig("digits", "mlp", 16, 1, 16, 30, 0))
  arrays = task.arrays()
  controller = meta_lr.make_controller("mlp", config.hidden)
  theta = init_controller(jax.random.key(0), controller)
  problem = meta_lr.lr_problem(task, arrays, controller, config, 30)
  state = problem.init(theta, jax.random.key(1))
  for _ in range(5):
    state, _ = problem.step(theta, state, None)
  error = problem.meta_loss(theta, state, None)
  # The same validation batch meta_loss draws, scored by the task's own metrics.
  key = jax.random.fold_in(jax.random.fold_in(state.key, state.step), 1)
  batch = task.sample_batch(arrays, key, split="val", batch_size=meta_lr.VAL_BATCH)
  accuracy = task.metrics(state.params, batch["x"], batch["y"])["accuracy"]
  np.testing.assert_allclose(float(error), 1.0 - float(accuracy), rtol=1e-6)
  assert 0.0 < float(error) < 1.0
  log_loss = meta_lr.lr_problem(task, arrays, controller, tiny(), 30).meta_loss(
      theta, state, None)
  assert float(log_loss) != float(error)  # the default objective is another number

  result = meta_train(config, progress=False)
  assert all(0.0 <= h["meta_loss"] <= 1.0 for h in result.history)
  # Accuracy is flat under small perturbations (an untrained controller's output layer is
  # zero, so they barely move the LR at first): some early estimates are exactly zero.
  assert any(h["meta_grad_norm"] > 0 for h in result.history)
  assert np.abs(np.asarray(result.theta["Dense_1"]["kernel"])).sum() > 0  # zero at init


def test_batchnorm_statistics_are_carried_and_the_meta_gradient_agrees_with_differences():
  # A stateful model: a ResNet's first stage (BatchNorm) on the 8x8 digits, through the
  # compiled init and segment meta_train runs (one population member, 5 steps).
  family = task_family(datasets=("digits",), models=("resnet18",), widths=(2,), depths=(1,),
                       batch_sizes=(8,), total_steps=(20,))
  config = tiny(family=family, lanes=1, population=1, segment_length=5)
  trainer = meta_lr.MetaTrainer(config)
  task = make_task(TaskConfig("digits", "resnet18", 2, 1, 8, 20, 0))
  fns, arrays = trainer._fns_for(task), task.arrays()
  theta = init_controller(jax.random.key(1), trainer.controller)
  states = fns.init(theta, jax.random.split(jax.random.key(2), 1), arrays, jnp.float32(20))
  assert set(states.model_state) == {"batch_stats"}
  segment = lambda th: fns.segment(th, states, arrays, jnp.float32(20), jnp.int32(8))
  loss, grad, n_ok, after, _, _ = segment(theta)
  assert int(n_ok) == 1
  # Five training steps moved the running statistics the meta-loss evaluates with.
  assert not any(np.allclose(a, b) for a, b in zip(jax.tree.leaves(after.model_state),
                                                    jax.tree.leaves(states.model_state)))
  one = jax.tree.map(lambda x: x[0], after)
  key = jax.random.fold_in(jax.random.fold_in(one.key, one.step), 1)
  val = task.sample_batch(arrays, key, split="val", batch_size=meta_lr.VAL_BATCH)
  running = task.metrics(one.params, val["x"], val["y"], one.model_state)["loss"]
  problem = meta_lr.lr_problem(task, arrays, trainer.controller, config, 20)
  np.testing.assert_allclose(problem.meta_loss(theta, one, None), jnp.log(running), rtol=1e-5)
  # The ReLUs make the meta-loss piecewise smooth and float32 central differences of a
  # gradient this small are noisy (test_unroll checks TBPTT tightly on a smooth problem):
  # here they must agree in sign and within a factor of 2.
  eps = 0.1
  for seed in (5, 6):
    d = jax.tree.map(lambda x: jax.random.normal(jax.random.key(seed), x.shape), theta)
    fd = (segment(jax.tree.map(lambda t, v: t + eps * v, theta, d))[0]
          - segment(jax.tree.map(lambda t, v: t - eps * v, theta, d))[0]) / (2 * eps)
    analytic = sum(jnp.vdot(g, v) for g, v in zip(jax.tree.leaves(grad), jax.tree.leaves(d)))
    assert abs(float(analytic)) > 1e-5  # the check below would notice a zero gradient
    assert 0.5 < float(analytic) / float(fd) < 2.0, (float(analytic), float(fd))
  # Masked rows would enter the batch statistics: a smaller traced batch size is ignored.
  masked = meta_lr.lr_problem(task, arrays, trainer.controller, config, 20, batch_size=4)
  # Compiled: op by op, a ResNet step dispatches a few hundred programs (about 10 s).
  one_step = lambda p: jax.jit(lambda th, s: p.step(th, s, None)[0].model_state)(theta, state0)
  state0 = problem.init(theta, jax.random.key(2))
  leaves_equal(one_step(masked), one_step(problem))
