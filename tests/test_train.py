"""The shared training loop, the baseline schedules, and the shipped controller."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metaopt
from metaopt.schedules.baselines import (SCHEDULES, BaseOptimizer, adam_with_schedule, scheduled,
                                         unit_schedule, with_schedule)
from metaopt.tasks import TaskConfig, load_dataset, make_task
from metaopt.tasks.tfds_data import default_data_dir, using_data_dir
from metaopt.train import initial_variables, make_train_fn, run_loop, train_grid

TASK = make_task(TaskConfig("iris", "mlp", 8, 1, 16, 40, 0))


def test_lr_is_recorded_at_every_step_and_matches_the_schedule():
  lrs = jnp.array([1e-3, 1e-2])
  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(2))
  res, _ = train_grid(TASK, adam_with_schedule("cosine", 40), lrs, keys,
                      steps=40, eval_every=10)
  expected = np.array([optax.cosine_decay_schedule(1.0, 40)(i) for i in range(40)])
  np.testing.assert_allclose(res.learning_rate, np.outer(lrs, expected), rtol=1e-5)
  assert res.test_loss.shape == (2, 5) and res.eval_steps.tolist()[0] == [0, 10, 20, 30, 40]
  assert res.train_loss[1, -5:].mean() < res.train_loss[1, :5].mean()


def test_sequential_grid_equals_vectorized_grid():
  lrs = jnp.array([3e-3, 1e-2])
  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(2))
  kw = dict(steps=20, eval_every=10)
  a, _ = train_grid(TASK, adam_with_schedule("step", 20), lrs, keys, **kw)
  b, _ = train_grid(TASK, adam_with_schedule("step", 20), lrs, keys, vectorize=False, **kw)
  np.testing.assert_allclose(a.test_loss, b.test_loss, rtol=1e-4)


def test_same_seed_same_numbers():
  run = jax.jit(make_train_fn(TASK, adam_with_schedule("constant", 20), steps=20, eval_every=5))
  a = run(1e-3, jax.random.PRNGKey(7), TASK.arrays())
  b = run(1e-3, jax.random.PRNGKey(7), TASK.arrays())
  np.testing.assert_array_equal(a.train_loss, b.train_loss)


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_peaks_at_one(name):
  values = np.array([unit_schedule(name, 100)(i) for i in range(100)])
  assert values.max() == pytest.approx(1.0, rel=1e-6) and values.min() >= 0


def test_bad_names_and_lengths_raise():
  with pytest.raises(ValueError, match="unknown schedule 'linear'; accepted: constant"):
    adam_with_schedule("linear", 10)
  with pytest.raises(ValueError, match="steps=10, eval_every=3"):
    make_train_fn(TASK, adam_with_schedule("constant", 10), steps=10, eval_every=3)




def test_pretrained_controller_trains_a_task():
  steps = 40
  make_tx = lambda _: optax.chain(optax.scale_by_adam(),
                                  metaopt.pretrained_lr(learning_rate=1e-2, total_steps=steps))
  res, _ = train_grid(TASK, make_tx, jnp.zeros(1), jax.random.PRNGKey(0)[None],
                      steps=steps, eval_every=10)
  lr = res.learning_rate[0]
  assert np.all(np.isfinite(lr)) and np.all(lr > 0)
  assert res.test_loss[0, -1] < res.test_loss[0, 0]


def counting_advance(calls):
  """A toy advance: the state sums the global steps it has seen; one metric per step."""
  def advance(state, record, start, n):
    calls.append((start, n))
    steps = jnp.arange(start, start + n)
    state = {"total": state["total"] + jnp.sum(steps), "last": jnp.int32(start + n)}
    return state, dict(record, chunks=record["chunks"] + 1), {"step_squared": steps ** 2}
  return advance


@pytest.mark.parametrize("optimizer", [
    BaseOptimizer(), BaseOptimizer("adamw", weight_decay=0.1), BaseOptimizer("sgd"),
    BaseOptimizer("sgd", momentum=0.0, weight_decay=0.01), BaseOptimizer("adam", weight_decay=0.01),
    BaseOptimizer("sgd", nesterov=True)])
def test_base_optimizer_is_optax_own_and_its_direction_times_the_lr(optimizer):
  params = {"w": jnp.array([1.0, -2.0, 0.5])}
  grads = [{"w": jnp.array([0.3, -0.1, 0.2])}, {"w": jnp.array([-0.2, 0.4, 0.1])}]
  optax_own = {"adam": optax.adam(0.1), "adamw": optax.adamw(0.1, weight_decay=0.1),
               "sgd": optax.sgd(0.1, momentum=optimizer.momentum or None,
                                nesterov=optimizer.nesterov)}[optimizer.name]
  if optimizer.weight_decay and optimizer.name != "adamw":  # PyTorch's L2 on the gradient
    optax_own = optax.chain(optax.add_decayed_weights(optimizer.weight_decay), optax_own)
  txs = [optimizer(0.1), optax.chain(optimizer.direction(), optax.scale(-0.1)), optax_own,
         with_schedule("constant", 10, optimizer)(0.1),
         scheduled(("cosine", "constant"), 10, optimizer)({"lr": 0.1, "schedule": 1})]
  outs = []
  for tx in txs:
    state, p = tx.init(params), params
    for g in grads:
      u, state = tx.update(g, state, p)
      p = optax.apply_updates(p, u)
    outs.append(p["w"])
  for out in outs[1:]:
    np.testing.assert_allclose(out, outs[0], rtol=1e-6)
  assert metaopt.schedules.current_lr(state) == pytest.approx(0.1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="rmsprop"), "unknown optimizer 'rmsprop'; accepted: adam, adamw, sgd"),
    (dict(name="sgd", momentum=1.0), r"optimizer.momentum must be a finite number in \[0, 1\)"),
    (dict(weight_decay=-1e-4), "optimizer.weight_decay must be"),
    (dict(step_size="dadapt"), "unknown optimizer.step_size 'dadapt'; accepted: constant, "
                               "prodigy, prodigy_linear_decay"),
])
def test_bad_base_optimizer_is_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    BaseOptimizer(**kwargs)


@pytest.mark.parametrize("step_size", ["prodigy", "prodigy_linear_decay"])
def test_direction_on_prodigys_estimate_is_adams_times_d_times_its_decay(step_size):
  """Each step: Adam's direction times the D of a Prodigy run on the same gradients (and
  its linear decay over 8 steps); the LR chained after is a multiplier of that."""
  params = {"w": jnp.array([1.0, -2.0, 0.5])}
  decay = step_size == "prodigy_linear_decay"
  optimizer = BaseOptimizer(step_size=step_size)
  tx = with_schedule("constant", 8, optimizer)(0.5)   # optimizer(0.5, total_steps=8), injected
  adam = optax.scale_by_adam()
  prodigy = optax.contrib.prodigy(
      learning_rate=optax.linear_schedule(1.0, 0.0, 8) if decay else 1.0)
  states = [tx.init(params), adam.init(params), prodigy.init(params)]
  p = params
  for step in range(9):
    g = {"w": jnp.array([0.3, -0.1, 0.2]) * (step + 1)}
    u, states[0] = tx.update(g, states[0], p)
    direction, states[1] = adam.update(g, states[1], p)
    _, states[2] = prodigy.update(g, states[2], p)
    factor = (1 - min(step, 8) / 8) if decay else 1.0
    np.testing.assert_allclose(u["w"], -0.5 * factor * states[2].estim_lr * direction["w"],
                               rtol=1e-5)
    p = optax.apply_updates(p, u)
  assert float(states[2].estim_lr) > 1e-6            # D grew: the check is not trivial
  assert metaopt.schedules.current_lr(states[0]) == pytest.approx(0.5)  # the multiplier
  assert optimizer.label == ("Adam on Prodigy's D, linear decay" if decay
                             else "Adam on Prodigy's D")


def test_prodigys_decay_needs_the_run_length():
  with pytest.raises(ValueError, match="step_size='prodigy_linear_decay' needs total_steps"):
    BaseOptimizer(step_size="prodigy_linear_decay").direction()


def test_the_initialization_drawn_outside_the_program_is_the_inline_one():
  keys = jax.random.split(jax.random.PRNGKey(3), 2)
  params, _ = initial_variables(TASK, keys)
  for i, key in enumerate(keys):
    inline = TASK.init(jax.random.split(key)[0])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[i], b), params, inline)


def test_an_experiments_data_dir_is_where_tfds_data_is_read(tmp_path, monkeypatch):
  monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
  assert default_data_dir() is None
  with using_data_dir(tmp_path / "tfds"):
    assert default_data_dir() == str(tmp_path / "tfds")
    with pytest.raises(FileNotFoundError, match=f"not prepared in data_dir '{tmp_path}/tfds'"):
      load_dataset("cifar10")
  assert default_data_dir() is None
  with using_data_dir("~/prepared"):
    assert default_data_dir() == str(pathlib.Path.home() / "prepared")


def test_run_loop_cuts_chunks_at_checkpoints_and_writes_one_line_per_step(tmp_path):
  calls = []
  state = {"total": jnp.int32(0), "last": jnp.int32(0)}
  result = run_loop(counting_advance(calls), state, steps=10, chunk=4, checkpoint_every=3,
                    record={"chunks": 0}, directory=tmp_path)
  assert calls == [(0, 3), (3, 1), (4, 2), (6, 2), (8, 1), (9, 1)]
  assert int(result.state["total"]) == sum(range(10)) and result.record["chunks"] == 6
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert lines == [{"step": t, "step_squared": t * t} for t in range(10)]
  assert result.curves()["step_squared"].tolist() == [t * t for t in range(10)]


def test_run_loop_resumes_to_the_uninterrupted_result(tmp_path):
  state = {"total": jnp.int32(0), "last": jnp.int32(0)}
  full = run_loop(counting_advance([]), state, steps=10, chunk=2, record={"chunks": 0},
                  directory=tmp_path / "full")
  run_loop(counting_advance([]), state, steps=10, chunk=2, record={"chunks": 0},
           directory=tmp_path / "cut", stop_after=7)   # stops at 7; the checkpoint is at 6
  calls = []
  resumed = run_loop(counting_advance(calls), state, steps=10, chunk=2, record={"chunks": 0},
                     directory=tmp_path / "cut")
  assert calls[0] == (6, 2) and resumed.start == 6
  assert int(resumed.state["total"]) == int(full.state["total"])
  assert resumed.record == full.record
  assert (tmp_path / "cut" / "metrics.jsonl").read_text() == \
      (tmp_path / "full" / "metrics.jsonl").read_text()
  assert [h["step"] for h in resumed.history] == list(range(10))


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps must be an integer >= 1, got 0"),
    (dict(steps=5, chunk=0), "chunk must be an integer >= 1, got 0"),
    (dict(steps=5, checkpoint_every=-1), "checkpoint_every must be an integer >= 1, got -1"),
])
def test_run_loop_bad_arguments_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    run_loop(counting_advance([]), {"total": jnp.int32(0)}, record={"chunks": 0}, **kwargs)


def test_split_metrics_are_each_splits_own_and_macro_f1_is_scikit_learns():
  from sklearn.metrics import f1_score
  params = TASK.init(jax.random.PRNGKey(0))
  d = TASK.data
  x = np.concatenate([d.x_val, d.x_test])
  y = np.concatenate([d.y_val, d.y_test])
  w_val = np.r_[np.ones(len(d.y_val)), np.zeros(len(d.y_test))].astype(np.float32)
  val, test = TASK.split_metrics(params, x, y, (w_val, 1 - w_val))
  for got, (xs, ys) in ((val, (d.x_val, d.y_val)), (test, (d.x_test, d.y_test))):
    alone = TASK.metrics(params, xs, ys)
    assert float(got["loss"]) == pytest.approx(float(alone["loss"]), rel=1e-5)
    assert float(got["accuracy"]) == pytest.approx(float(alone["accuracy"]), rel=1e-6)
    pred = np.argmax(np.asarray(TASK.model.apply({"params": params}, xs)), axis=-1)
    assert float(got["macro_f1"]) == pytest.approx(f1_score(ys, pred, average="macro"),
                                                   rel=1e-5)
