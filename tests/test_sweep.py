"""Sweeps into a run store: rows, resume after interruption, the CLI, recording train_grid."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metaopt.train
from metaopt import cli
from metaopt.hparams import TASK_FEATURE_NAMES, RunStore, record_runs
from metaopt.hparams import sweep as S
from metaopt.hparams.space import Param, Space
from metaopt.schedules.baselines import adam_with_schedule
from metaopt.tasks import TaskConfig, make_task
from metaopt.train import TrainResult, run_status, train_grid

# layers has one value, so each task compiles once.
SPACE = Space([Param("learning_rate", "float", 1e-3, 1e-1, log=True),
               Param("batch_size", "categorical", choices=(16, 32)),
               Param("layers", "categorical", choices=(2,)),
               Param("dropout", "float", 0.1, 0.5)])


def test_sweep_writes_rows_and_resumes_after_interruption_without_repeats(tmp_path, monkeypatch):
  path = tmp_path / "runs.db"
  real, calls = metaopt.train.train_grid, []

  def interrupted(*args, **kw):
    calls.append(args[0].config.dataset)
    if len(calls) == 2:
      raise KeyboardInterrupt  # the user stops the sweep during the second task
    return real(*args, **kw)

  monkeypatch.setattr(metaopt.train, "train_grid", interrupted)
  kw = dict(datasets=["iris", "wine"], models=["mlp", "cnn"], space=SPACE, trials_per_task=3,
            epochs=2, seed=5, progress=False)
  with pytest.raises(KeyboardInterrupt):
    S.sweep(path, **kw)
  with RunStore(path) as store:
    first = store.runs()
  assert [r.task for r in first] == ["iris"] * 3

  monkeypatch.setattr(metaopt.train, "train_grid", real)
  report = S.sweep(path, **kw)
  assert (report.added, report.skipped, report.tasks) == (3, 3, 2)
  assert report.invalid == [("iris", "cnn", "cnn needs an image dataset"),
                            ("wine", "cnn", "cnn needs an image dataset")]
  again = S.sweep(path, **kw)
  assert (again.added, again.skipped) == (0, 6)

  with RunStore(path) as store:
    runs = store.runs()
  assert len(runs) == 6 and runs[:3] == first  # nothing repeated, finished rows untouched
  for dataset in ("iris", "wine"):
    configs = S.trial_configs(SPACE, dataset, "mlp", 3, 5)
    rows = [r for r in runs if r.task == dataset]
    assert [r.run_key for r in rows] == [
        S.run_key(dataset, "mlp", i, epochs=2, seed=5, space=SPACE) for i in range(3)]
    assert [r.hparams for r in rows] == configs
    for r in rows:
      assert r.status == "completed" and tuple(r.task_features) == TASK_FEATURE_NAMES
      assert r.task_features["epochs"] == 2.0 and r.task_features["model_mlp"] == 1.0
      assert r.model["family"] == "mlp" and r.model["depth"] == 2 and r.model["n_params"] > 0
      assert len(r.curves["val_accuracy"]) == 3  # before training and after each epoch
      assert 0.0 <= r.metrics["val_accuracy"] <= 1.0 and np.isfinite(r.metrics["val_loss"])
      assert r.extra["micro_batch"] == 16
  # Trials differ, and the learning rates came from the seeded draw.
  assert len({r.hparams["learning_rate"] for r in runs}) == 6
  # Some run learned something within two epochs.
  assert max(r.metrics["val_accuracy"] for r in runs if r.task == "wine") > 0.6


def test_trial_configs_are_seeded_and_prefix_stable():
  a = S.trial_configs(SPACE, "iris", "mlp", 5, 0)
  assert S.trial_configs(SPACE, "iris", "mlp", 3, 0) == a[:3]
  assert S.trial_configs(SPACE, "iris", "mlp", 5, 1) != a
  assert S.trial_configs(SPACE, "wine", "mlp", 5, 0) != a
  assert S.micro_batch(SPACE, a, 1000) == 16
  assert S.micro_batch(SPACE, a, 10) == 8  # at most the training split: 16's largest divisor <= 10


def test_bad_sweep_inputs_are_named(tmp_path):
  with pytest.raises(ValueError, match="sweeps cannot apply hyperparameter.*'momentum'"):
    S.sweep(tmp_path / "a.db", space=Space([Param("momentum", "float", 0.0, 0.9)]))
  with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
    S.sweep(tmp_path / "a.db", datasets=["cifar"])
  with pytest.raises(ValueError,
                     match=r"space parameter 'dropout': values must be in \[0, 1\), got 1.2"):
    S.sweep(tmp_path / "a.db", datasets=["iris"], models=["mlp"],
            space=Space([Param("dropout", "float", 1.2, 1.5)]))


def test_cli_sweep_on_a_tiny_config(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("METAOPT_XLA_CACHE", "")  # no persistent compilation cache in tests
  space = tmp_path / "space.json"
  space.write_text(json.dumps(SPACE.to_json()))
  store = tmp_path / "cli.db"
  args = ["sweep", "--store", str(store), "--datasets", "iris", "--models", "mlp,cnn",
          "--trials", "2", "--epochs", "1", "--space", str(space), "--no-progress"]
  assert cli.main(args) == 0
  out = capsys.readouterr().out
  assert "2 runs added" in out and "skipped iris/cnn: cnn needs an image dataset" in out
  with RunStore(store) as s:
    assert len(s) == 2 and {r.model["family"] for r in s.runs()} == {"mlp"}
  assert cli.main(args) == 0  # resumed: nothing to do
  assert "0 runs added" in capsys.readouterr().out

  (tmp_path / "bad.json").write_text('[{"name": "lr", "type": "float"')
  (tmp_path / "notes.txt").write_text("not a store")
  for bad, needle in [
      (["--models", "lstm"], "unknown model 'lstm' in --models; accepted: mlp, cnn, rnn"),
      (["--datasets", "iris,cifar"], "unknown dataset 'cifar'"),
      (["--trials", "0"], "--trials must be >= 1, got 0"),
      (["--space", str(tmp_path / "bad.json")], "is not valid JSON"),
      (["--space", str(tmp_path / "missing.json")], "no space file at"),
      (["--store", str(tmp_path / "notes.txt")], "not a metaopt run store"),
  ]:
    assert cli.main(["sweep", "--store", str(store), *bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metaopt: error: ") and err.count("\n") == 1 and needle in err, err


def test_record_runs_writes_every_run_of_a_grid(tmp_path):
  task = make_task(TaskConfig("iris", "mlp", 8, 1, 16, 20, 0))
  lrs = jnp.array([1e-2, 3e-2])
  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(2))
  res, wall = train_grid(task, adam_with_schedule("constant", 20), lrs, keys, steps=20,
                         eval_every=10)
  record_runs(tmp_path / "g.db", task, lrs, res, wall, run_info={"schedule": "constant"},
              keys=keys)
  with RunStore(tmp_path / "g.db") as store:
    runs = store.runs()
  assert [r.hparams for r in runs] == [
      {"batch_size": 16, "layers": 1, "hparam": 0.01, "schedule": "constant"},
      {"batch_size": 16, "layers": 1, "hparam": 0.03, "schedule": "constant"}]
  for i, r in enumerate(runs):
    assert r.task == "iris" and r.status == "completed"
    assert r.curves["val_loss"] == pytest.approx(res.val_loss[i].tolist())
    assert r.metrics["test_accuracy"] == pytest.approx(float(res.test_accuracy[i, -1]))
    assert r.wall_time == pytest.approx(wall / 2)
    assert r.model == {"family": "mlp", "width": 8, "depth": 1, "n_params": 4 * 8 + 8 + 8 * 3 + 3}


def test_run_status_marks_non_finite_losses_as_diverged_but_not_early_stops():
  nan = np.nan
  res = TrainResult(
      train_loss=np.array([[1.0, 0.5, 0.4, 0.3], [1.0, nan, nan, nan], [1.0, 0.5, nan, nan],
                           [1.0, 0.5, 0.4, 0.3]]),
      learning_rate=np.zeros((4, 4)), eval_steps=np.tile([0, 2, 4], (4, 1)),
      val_loss=np.array([[1.0, 0.5, 0.4], [1.0, 0.5, 0.4], [1.0, 0.5, 0.5], [1.0, np.inf, 1.0]]),
      val_accuracy=np.zeros((4, 3)), test_loss=np.zeros((4, 3)), test_accuracy=np.zeros((4, 3)),
      stopped_at=np.array([4, 4, 2, 4]))  # run 2 was early-stopped at step 2: NaN from there
  assert run_status(res).tolist() == ["completed", "diverged", "completed", "diverged"]


def test_dropout_is_traced_and_deterministic():
  task = make_task(TaskConfig("iris", "mlp", 16, 2, 16, 10, 0))
  run = jax.jit(jax.vmap(metaopt.train.make_train_fn(
      task, lambda h: adam_with_schedule("constant", 10)(h["lr"]), steps=10, eval_every=5,
      dropout=lambda h: h["dropout"]), in_axes=(0, 0, None)))
  h = {"lr": jnp.full(3, 1e-2), "dropout": jnp.array([0.0, 0.5, 0.5])}
  keys = jnp.stack([jax.random.PRNGKey(0)] * 3)
  a = run(h, keys, task.arrays())
  b = run(h, keys, task.arrays())
  np.testing.assert_array_equal(a.train_loss, b.train_loss)
  np.testing.assert_array_equal(a.train_loss[1], a.train_loss[2])
  assert not np.allclose(a.train_loss[0], a.train_loss[1])
  # Rate 0 is exactly no dropout.
  plain = jax.jit(metaopt.train.make_train_fn(task, adam_with_schedule("constant", 10),
                                              steps=10, eval_every=5))
  np.testing.assert_allclose(plain(jnp.float32(1e-2), keys[0], task.arrays()).train_loss,
                             a.train_loss[0], rtol=1e-5)


def test_cli_run_store_records_the_experiment_runs(tmp_path, monkeypatch, capsys):
  from metaopt.experiments import adaptive_lr
  quick = adaptive_lr.quick_config
  tiny = lambda seed=0: dataclasses.replace(
      quick(seed), datasets=("iris",), width=8, depth=1, epochs=2, tune_lrs=(1e-3, 1e-2),
      include_pretrained=False)
  monkeypatch.setenv("METAOPT_XLA_CACHE", "")
  monkeypatch.setattr(adaptive_lr, "quick_config", tiny)
  store = tmp_path / "exp.db"
  args = ["run", "adaptive-lr", "--quick", "--out", str(tmp_path), "--no-progress",
          "--store", str(store)]
  assert cli.main(args) == 0
  with RunStore(store) as s:
    runs = s.runs()
  methods = {r.hparams["method"] for r in runs}
  assert {"adam_schedules", "hd_adam", "plateau", "hd_sgd"} <= methods
  seeds = tiny().seeds
  assert sum(r.hparams["method"] == "adam_schedules" for r in runs) == (2 + 2) * seeds
  assert all(r.task == "iris" and r.hparams["experiment"] == "adaptive-lr" for r in runs)
  assert all(len(r.curves["val_loss"]) == 3 for r in runs)  # 2 epochs + the initial evaluation
  (tmp_path / "notes.txt").write_text("not a store")
  assert cli.main(args[:-1] + [str(tmp_path / "notes.txt")]) == 2
  assert "not a metaopt run store" in capsys.readouterr().err
