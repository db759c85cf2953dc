"""The controller file format: save and load round trips, settings travel with the
weights, and every way a file can be wrong gets one clear error."""

import json

import jax
import numpy as np
import optax
import pytest

import metaopt
from metaopt.schedules import learned_lr

CONTROLLER = metaopt.LRController(hidden=(4,))
SETTINGS = dict(min_lr_factor=0.1, max_lr_factor=3.0, max_log_change=0.2,
                response_time=0.05, min_response_steps=5.0)


def saved(tmp_path, **kw):
  theta = jax.tree.map(lambda x: x + 0.5, metaopt.init_controller(jax.random.key(1), CONTROLLER))
  metaopt.save_controller(tmp_path, theta, settings=SETTINGS, hidden=(4,),
                          learning_rate=3e-3, **kw)
  return theta


def test_weights_settings_and_learning_rate_round_trip(tmp_path):
  theta = saved(tmp_path, info={"note": "test"})
  loaded = metaopt.load_controller(tmp_path)
  assert loaded.controller.hidden == (4,) and loaded.settings == SETTINGS
  assert loaded.learning_rate == 3e-3 and loaded.info == {"note": "test"}
  jax.tree.map(np.testing.assert_array_equal, theta, loaded.theta)


def test_pretrained_lr_from_a_path_runs_with_the_saved_settings(tmp_path):
  theta = saved(tmp_path)
  from_file = metaopt.pretrained_lr(tmp_path, total_steps=50)
  by_hand = metaopt.scale_by_learned_lr(CONTROLLER, theta, learning_rate=3e-3, total_steps=50,
                                        **SETTINGS)
  params = {"w": np.ones(3, np.float32)}
  grads = {"w": np.full(3, 0.5, np.float32)}
  for tx in (from_file, by_hand):
    state = tx.init(params)
    lrs = []
    for i in range(5):
      _, state = tx.update(grads, state, params, value=np.float32(1.0 / (i + 1)))
      lrs.append(float(metaopt.current_lr(state)))
    tx.lrs = lrs
  np.testing.assert_array_equal(from_file.lrs, by_hand.lrs)
  assert from_file.lrs[-1] != 3e-3


def test_the_shipped_controller_loads_with_its_training_settings():
  shipped = metaopt.load_controller()
  assert shipped.settings == learned_lr.DEFAULT_SETTINGS
  assert shipped.learning_rate == 1e-3 and shipped.controller.hidden == (32, 32)
  schedule = metaopt.LearnedLRSchedule.from_file(total_steps=100)
  assert schedule.spec.base_lr == 1e-3 and schedule.spec.log_min == np.log(0.01)


@pytest.mark.parametrize("damage, error, match", [
    (lambda c: c.update(version=learned_lr.FILE_VERSION + 1), ValueError,
     f"format version {learned_lr.FILE_VERSION + 1}.*upgrade metaopt"),
    (lambda c: c.update(format="other"), ValueError, "not a metaopt controller file"),
    (lambda c: c.pop("settings"), ValueError, "lacks 'settings'"),
    (lambda c: c["settings"].pop("max_log_change"), ValueError, "missing \\['max_log_change'\\]"),
    (lambda c: c["settings"].update(min_lr_factor=5.0), ValueError, "min_lr_factor"),
    (lambda c: c.update(hidden=[5]), ValueError, "shape"),
])
def test_a_damaged_config_gets_a_clear_error(tmp_path, damage, error, match):
  saved(tmp_path)
  path = tmp_path / learned_lr.CONFIG_FILE
  config = json.loads(path.read_text())
  damage(config)
  path.write_text(json.dumps(config))
  with pytest.raises(error, match=match):
    metaopt.load_controller(tmp_path)


def test_missing_files_and_bad_settings_name_the_problem_and_write_nothing(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    metaopt.load_controller(tmp_path)
  theta = metaopt.init_controller(jax.random.key(0), CONTROLLER)
  with pytest.raises(ValueError, match="missing \\['min_lr_factor'"):
    metaopt.save_controller(tmp_path / "a", theta, settings={}, hidden=(4,))
  with pytest.raises(ValueError, match="does not match LRController"):
    metaopt.save_controller(tmp_path / "b", theta, hidden=(8,))
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_meta_training_defaults_are_the_deployment_defaults():
  config = metaopt.MetaLRConfig(family=metaopt.meta.lr.TaskFamily(datasets=("iris",)))
  assert config.settings == learned_lr.DEFAULT_SETTINGS
  defaults = {k: p.default for k, p in
              __import__("inspect").signature(metaopt.scale_by_learned_lr).parameters.items()
              if k in learned_lr.SETTINGS}
  assert defaults == learned_lr.DEFAULT_SETTINGS


def test_a_meta_training_result_saves_what_deploys_it(tmp_path):
  family = metaopt.meta.lr.task_family(datasets=("iris",), widths=(4,), depths=(1,),
                                       batch_sizes=(16,), total_steps=(20,))
  config = metaopt.MetaLRConfig(family=family, meta_steps=1, lanes=1, population=1,
                                segment_length=10, hidden=(4,), min_lr_factor=0.05,
                                features=("log_lr_vs_base", "fraction_done"))
  result = metaopt.meta_train(config, progress=False)
  result.save(tmp_path)
  loaded = metaopt.load_controller(tmp_path)
  assert loaded.settings["min_lr_factor"] == 0.05 and loaded.info["meta_steps"] == 1
  assert loaded.features == ("log_lr_vs_base", "fraction_done")
  jax.tree.map(np.testing.assert_array_equal, result.theta, loaded.theta)
  tx = optax.chain(optax.scale_by_adam(), metaopt.pretrained_lr(tmp_path, total_steps=20))
  assert tx.init({"w": np.zeros(2, np.float32)})


def test_a_feature_subset_travels_with_the_weights_and_needs_version_2(tmp_path):
  features = ("fraction_done", "log_loss_vs_initial", "log_lr_vs_base")
  theta = jax.tree.map(lambda x: x + 0.5, metaopt.init_controller(jax.random.key(1), CONTROLLER,
                                                                  features))
  metaopt.save_controller(tmp_path, theta, settings=SETTINGS, hidden=(4,), learning_rate=3e-3,
                          features=features)
  config = json.loads((tmp_path / learned_lr.CONFIG_FILE).read_text())
  assert config["version"] == 2 and config["features"] == list(features)
  loaded = metaopt.load_controller(tmp_path)
  assert loaded.features == features
  from_file = metaopt.pretrained_lr(tmp_path, total_steps=50)
  by_hand = metaopt.scale_by_learned_lr(CONTROLLER, theta, learning_rate=3e-3, total_steps=50,
                                        features=features, **SETTINGS)
  params, grads = {"w": np.ones(3, np.float32)}, {"w": np.full(3, 0.5, np.float32)}
  lrs = {}
  for name, tx in (("file", from_file), ("hand", by_hand)):
    state = tx.init(params)
    for i in range(5):
      _, state = tx.update(grads, state, params, value=np.float32(1.0 / (i + 1)))
    lrs[name] = float(metaopt.current_lr(state))
  assert lrs["file"] == lrs["hand"] != 3e-3
  # A version-1 file promises every feature; an unknown name is refused.
  config["version"] = 1
  (tmp_path / learned_lr.CONFIG_FILE).write_text(json.dumps(config))
  with pytest.raises(ValueError, match="was trained on features"):
    metaopt.load_controller(tmp_path)
  config.update(version=2, features=["fraction_done", "mystery", "log_lr_vs_base"])
  (tmp_path / learned_lr.CONFIG_FILE).write_text(json.dumps(config))
  with pytest.raises(ValueError, match="was trained on features"):
    metaopt.load_controller(tmp_path)
  with pytest.raises(ValueError, match="does not match LRController.*on 12 features"):
    metaopt.save_controller(tmp_path / "c", theta, hidden=(4,))
  assert not (tmp_path / "c").exists()
