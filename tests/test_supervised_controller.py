"""The supervised LR controller: look-ahead labels, the meta-dataset file, the fit, bad input."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import metaopt
from metaopt.meta import supervised
from metaopt.schedules.learned_lr import FEATURE_NAMES
from metaopt.tasks import task_family

FAMILY = task_family(datasets=("iris",), widths=(8,), depths=(1,), batch_sizes=(16,),
                     total_steps=(40,))


def test_labels_pick_the_best_lookahead_lr_on_a_quadratic():
  # f(x) = h x^2 / 2 with gradient descent: after K steps x = (1 - lr h)^K x0, so the
  # validation loss is h (1 - lr h)^(2K) x0^2 / 2 and the best LR is 1 / h.
  h = jnp.asarray([1.0, 4.0, 10.0, 2.5])
  states = {"x": jnp.ones(4), "h": h}
  grid = (0.05, 0.1, 0.25, 0.4, 1.0, 2.0)
  step = lambda s, lr: {"x": s["x"] - lr * s["h"] * s["x"], "h": s["h"]}
  val = lambda s: 0.5 * s["h"] * s["x"] ** 2
  losses = supervised.lookahead_losses(step, val, states, grid, 3)
  expected = 0.5 * h[:, None] * (1 - jnp.asarray(grid)[None, :] * h[:, None]) ** 6
  np.testing.assert_allclose(losses, expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(supervised.best_lrs(losses, grid), [1.0, 0.25, 0.1, 0.4])
  # A row that diverged everywhere has no label; NaN never wins.
  bad = np.asarray(losses).copy()
  bad[0] = np.nan
  bad[1, 2] = np.nan  # was the best of row 1; 0.1 and 0.4 then tie, the smaller wins
  labels = supervised.best_lrs(bad, grid)
  assert np.isnan(labels[0]) and labels[1] == 0.1


def _dataset(rows=7, seed=0):
  rng = np.random.default_rng(seed)
  grid = np.asarray([1e-4, 1e-3, 1e-2], np.float32)
  losses = rng.uniform(0.1, 2.0, (rows, 3)).astype(np.float32)
  return supervised.MetaDataset(
      features=rng.normal(size=(rows, len(FEATURE_NAMES))).astype(np.float32),
      label=grid[np.argmin(losses, axis=1)], lookahead_loss=losses, lr_grid=grid,
      task=np.asarray([f"task{i % 2}" for i in range(rows)]),
      schedule=np.asarray(["cosine"] * rows), schedule_lr=np.full(rows, 1e-3, np.float32),
      step=np.arange(rows) * 10, total_steps=np.full(rows, 100), learning_rate=1e-3)


def test_meta_dataset_file_round_trips(tmp_path):
  data = _dataset()
  path = supervised.save_meta_dataset(tmp_path / "m" / "meta_dataset.npz", data,
                                      info={"note": "test"})
  back = supervised.load_meta_dataset(path)
  for name in supervised.MetaDataset._fields:
    np.testing.assert_array_equal(np.asarray(getattr(back, name)),
                                  np.asarray(getattr(data, name)), err_msg=name)
  meta = json.loads(path.with_suffix(".json").read_text())
  assert meta["rows"] == 7 and meta["feature_names"] == list(FEATURE_NAMES)
  assert meta["info"] == {"note": "test"}
  lines = path.with_suffix(".csv").read_text().splitlines()
  assert len(lines) == 8 and "label" in lines[0] and "lookahead_loss@0.001" in lines[0]
  with pytest.raises(ValueError, match="must end in .npz"):
    supervised.save_meta_dataset(tmp_path / "m.csv", data)
  with pytest.raises(FileNotFoundError, match="not found"):
    supervised.load_meta_dataset(tmp_path / "missing.npz")


def test_fit_learns_the_labels_and_deploys_through_pretrained_lr(tmp_path):
  # Labels that depend on the first feature: the fit must separate them.
  data = _dataset(rows=64, seed=1)
  grid = data.lr_grid
  label = np.where(data.features[:, 0] > 0, grid[2], grid[0])
  data = data._replace(label=label)
  config = supervised.SupervisedConfig(family=FAMILY, points=4, lr_grid=tuple(grid.tolist()),
                                       meta_lr=1e-2, meta_epochs=40)
  fit = supervised.fit_controller(data, config, progress=False)
  assert fit.history[-1]["mse"] < 0.2 * fit.history[0]["mse"]
  assert fit.history[-1]["label_accuracy"] >= 0.9
  result = supervised.SupervisedResult(fit.theta, metaopt.LRController(hidden=(32, 32)), data,
                                       fit.history, 0, 0.0, config)
  path = result.save(tmp_path / "controller")
  saved = metaopt.load_controller(path)
  assert saved.info["method"] == "supervised meta-dataset"
  tx = metaopt.pretrained_lr(path, total_steps=100)  # the ordinary controller file format
  assert tx.init(jnp.zeros(3)) is not None


@pytest.mark.parametrize("grid, needle", [
    ((1e-3, 0.0), "lr_grid[1] must be a positive finite number, got 0.0"),
    ((-1e-3,), "lr_grid[0] must be a positive finite number, got -0.001"),
    ((1e-3, float("nan")), "lr_grid[1] must be a positive finite number, got nan"),
    ((), "lr_grid must hold at least one learning rate"),
    ((1e-3, 1.0), "lr_grid[1] = 1 is outside the controller's range"),
])
def test_bad_lookahead_grids_are_refused_naming_the_value(grid, needle):
  with pytest.raises(ValueError) as e:
    supervised.SupervisedConfig(family=FAMILY, points=4, lr_grid=grid)
  assert needle in str(e.value)
  if "outside" not in needle:
    with pytest.raises(ValueError, match="lr_grid"):
      supervised.lookahead_losses(lambda s, lr: s, lambda s: s, jnp.ones(2), grid, 2)


def test_other_bad_settings_are_refused():
  with pytest.raises(ValueError, match="not multiples of points=3"):
    supervised.SupervisedConfig(family=FAMILY, points=3)
  with pytest.raises(ValueError, match="unknown preliminary schedule 'linear'"):
    supervised.SupervisedConfig(family=FAMILY, points=4, schedules=("linear",))
  with pytest.raises(ValueError, match="lookahead must be an integer >= 1, got 0"):
    supervised.SupervisedConfig(family=FAMILY, points=4, lookahead=0)


def test_an_lstm_controller_reads_each_run_in_order(tmp_path):
  # Every state looks the same; only the position in its run tells the label (high LR
  # at the first decision, low after): an LSTM, fed its run in order, can learn that.
  runs, points = 8, 4
  data = _dataset(rows=runs * points)
  grid = data.lr_grid
  data = data._replace(features=np.ones_like(data.features),
                       label=np.tile(np.r_[grid[2], np.full(points - 1, grid[0])], runs),
                       step=np.tile(np.arange(points) * 10, runs),
                       run=np.repeat(np.arange(runs), points))
  config = supervised.SupervisedConfig(family=FAMILY, points=4, lr_grid=tuple(grid.tolist()),
                                       controller="lstm", hidden=(8,), meta_lr=3e-2,
                                       meta_batch=4, meta_epochs=30)
  fit = supervised.fit_controller(data, config, progress=False)
  assert fit.history[-1]["label_accuracy"] == 1.0
  result = supervised.SupervisedResult(fit.theta, None, data, fit.history, 0, 0.0, config)
  saved = metaopt.load_controller(result.save(tmp_path / "lstm", update_every=10))
  assert type(saved.controller).__name__ == "LSTMController" and saved.update_every == 10
