"""The shared training loop, the baseline schedules, and the shipped controller."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metaopt
from metaopt.schedules.baselines import SCHEDULES, adam_with_schedule, unit_schedule
from metaopt.tasks import TaskConfig, make_task
from metaopt.train import make_train_fn, run_loop, train_grid

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
