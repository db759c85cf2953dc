"""Sweeps into a run store: rows, resume after interruption, the CLI, recording train_grid,
bounded work, no orphaned workers."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

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
  # Drawn lazily: a billion trials cost nothing until asked for, and trial i is the same.
  huge = S.trial_configs(SPACE, "iris", "mlp", 10 ** 9, 0)
  assert len(huge) == 10 ** 9 and huge[4] == a[4] == list(a)[4] and huge[:5] == list(a)
  assert a[-1] == a[4] and a[1:4:2] == [a[1], a[3]]
  with pytest.raises(IndexError):
    a[5]
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
      (["--trials", "0"], "--trials: 0 is outside [1, 100000]"),
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
  monkeypatch.setattr(adaptive_lr, "quick_config", tiny)
  store = tmp_path / "exp.db"
  args = ["run", "adaptive-lr", "--quick", "--out", str(tmp_path), "--no-progress",
          "--store", str(store)]
  assert cli.main(args) == 0
  with RunStore(store) as s:
    runs = s.runs()
  methods = {r.hparams["method"] for r in runs}
  assert {"schedules", "hd_adam", "plateau", "hd_sgd"} <= methods
  seeds = tiny().seeds
  # The constant and cosine grids (2 LRs each) and step decay.
  assert sum(r.hparams["method"] == "schedules" for r in runs) == (2 + 2 + 1) * seeds
  assert all(r.task == "iris" and r.hparams["experiment"] == "adaptive-lr" for r in runs)
  assert all(len(r.curves["val_loss"]) == 3 for r in runs)  # 2 epochs + the initial evaluation
  (tmp_path / "notes.txt").write_text("not a store")
  assert cli.main(args[:-1] + [str(tmp_path / "notes.txt")]) == 2
  assert "not a metaopt run store" in capsys.readouterr().err


def fake_train_grid(task, make_tx, hparams, keys, *, steps, eval_every, **kw):
  """train_grid's result shapes without training: every run completes at accuracy 0.5."""
  n, evals = keys.shape[0], steps // eval_every + 1
  if kw.get("capacity"):  # a padded program: eval_every real steps of each capacity slots
    eval_every = int(kw["arrays"]["eval_every"])
  full = lambda value, width: np.full((n, width), value, np.float32)
  return TrainResult(train_loss=full(1.0, steps), learning_rate=full(1e-3, steps),
                     eval_steps=np.tile(np.arange(evals) * eval_every, (n, 1)),
                     val_loss=full(1.0, evals), val_accuracy=full(0.5, evals),
                     test_loss=full(1.0, evals), test_accuracy=full(0.5, evals),
                     stopped_at=None), 0.01


def test_huge_sweeps_are_refused_before_any_work(tmp_path):
  path = tmp_path / "a.db"
  for kw, message in (({"trials_per_task": 10 ** 9},
                       r"trials_per_task must be an integer in \[1, 100000\], got 1000000000"),
                      ({"epochs": 10 ** 9}, r"epochs must be an integer in \[1, 10000\]")):
    with pytest.raises(ValueError, match=message):
      S.sweep(path, datasets=["iris"], models=["mlp"], space=SPACE, progress=False, **kw)
  assert not path.exists()
  with pytest.raises(ValueError, match=r"epochs must be an integer in \[1, 10000\]"):
    S.TrainingObjective("iris", epochs=10 ** 9)


def test_only_training_errors_are_recorded_as_failed_runs(tmp_path, monkeypatch):
  path = tmp_path / "runs.db"
  kw = dict(datasets=["iris"], models=["mlp"], space=SPACE, trials_per_task=2, epochs=1,
            progress=False)

  def misconfigured(*args, **kwargs):
    raise ValueError("need steps >= 1 divisible by eval_every >= 1")

  monkeypatch.setattr(metaopt.train, "train_grid", misconfigured)
  with pytest.raises(ValueError, match="divisible by eval_every"):
    S.sweep(path, **kw)
  with RunStore(path) as store:
    assert len(store) == 0        # nothing recorded: a rerun after the fix trains them

  def crashed(*args, **kwargs):
    raise RuntimeError("XLA ran out of memory")

  monkeypatch.setattr(metaopt.train, "train_grid", crashed)
  report = S.sweep(path, **kw)
  assert (report.added, report.failed) == (2, 2)
  with RunStore(path) as store:
    assert {r.extra["error"] for r in store.runs()} == {"RuntimeError: XLA ran out of memory"}


def test_runs_stored_meanwhile_are_skipped_not_an_error(tmp_path, monkeypatch):
  path = tmp_path / "runs.db"
  kw = dict(datasets=["iris"], models=["mlp"], space=SPACE, trials_per_task=3, epochs=1, seed=2,
            progress=False)
  key = S.run_key("iris", "mlp", 1, epochs=1, seed=2, space=SPACE)

  def old_sweep_writes_first(task, *args, **kwargs):
    # A sweep killed earlier left a worker behind that stores trial 1 while this one trains.
    with RunStore(path) as other:
      other.add("iris", task_features={}, hparams={}, metrics={}, run_key=key,
                extra={"writer": "old"})
    return fake_train_grid(task, *args, **kwargs)

  monkeypatch.setattr(metaopt.train, "train_grid", old_sweep_writes_first)
  report = S.sweep(path, **kw)
  assert (report.added, report.skipped) == (2, 1)
  with RunStore(path) as store:
    runs = {r.run_key: r for r in store.runs()}
  assert len(runs) == 3 and runs[key].extra == {"writer": "old"}   # left as it was
  # Stored before its group trains: skipped without training.
  monkeypatch.setattr(metaopt.train, "train_grid", fake_train_grid)
  with RunStore(path) as store:
    store.add("iris", task_features={}, hparams={}, metrics={}, run_key=key.replace("/t1", "/t3"))
  more = S.sweep(path, **dict(kw, trials_per_task=5))
  assert (more.added, more.skipped) == (1, 4)


def _children(psutil, pid):
  try:
    return psutil.Process(pid).children()
  except psutil.NoSuchProcess:
    return []


def _alive(psutil, process):
  try:
    return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
  except psutil.NoSuchProcess:
    return False


def test_workers_die_with_a_killed_sweep(tmp_path):
  psutil = pytest.importorskip("psutil")  # installed with orbax-checkpoint; only this test uses it
  path = tmp_path / "runs.db"
  script = ("import json, sys\n"
            "from metaopt.hparams import sweep as S\n"
            "from metaopt.hparams.space import Space\n"
            "S.sweep(sys.argv[1], datasets=['iris', 'wine', 'breast_cancer'], models=['mlp'],\n"
            "        space=Space.from_json(json.loads(sys.argv[2])), trials_per_task=2,\n"
            "        epochs=200, workers=2, progress=False)\n")
  log = open(tmp_path / "sweep.log", "w")
  sweep = subprocess.Popen([sys.executable, "-c", script, str(path),
                            json.dumps(SPACE.to_json())], stdout=log, stderr=log)
  left = []
  try:
    deadline = time.monotonic() + 60
    while True:  # until both workers have opened the store: they are at work
      workers = [p for p in _children(psutil, sweep.pid)
                 if "spawn_main" in " ".join(p.cmdline())]
      busy = [p for p in workers if any(f.path == str(path) for f in p.open_files())]
      if len(busy) == 2:
        break
      assert sweep.poll() is None and time.monotonic() < deadline, \
          (tmp_path / "sweep.log").read_text()
      time.sleep(0.1)
    left = _children(psutil, sweep.pid)   # the workers and multiprocessing's helpers
    os.kill(sweep.pid, signal.SIGKILL)
    sweep.wait()
    deadline = time.monotonic() + 5
    while any(_alive(psutil, p) for p in left) and time.monotonic() < deadline:
      time.sleep(0.1)
    assert not [p.pid for p in left if _alive(psutil, p)]
  finally:  # whatever failed, leave no process of this test behind
    for p in left + _children(psutil, sweep.pid):
      if _alive(psutil, p):
        p.kill()
    if sweep.poll() is None:
      sweep.kill()
      sweep.wait()
    log.close()


def test_mixed_depths_share_one_program_and_train_as_the_unmasked_models(tmp_path, monkeypatch):
  # Depths 1 and 2 of one task train in one masked program (the old grouping compiled one
  # per depth), and a depth-1 run's curves are its unmasked model's (dropout masks included).
  space = Space([Param("learning_rate", "float", 1e-3, 1e-1, log=True),
                 Param("layers", "categorical", choices=(1, 2)),
                 Param("dropout", "float", 0.1, 0.5)])
  real, programs = metaopt.train.train_grid, []

  def counted(task, *args, **kw):
    programs.append(task.config.depth)
    return real(task, *args, **kw)

  monkeypatch.setattr(metaopt.train, "train_grid", counted)
  assert S.sweep(tmp_path / "masked.db", datasets=["iris"], models=["mlp"], space=space,
                 trials_per_task=4, epochs=1, progress=False).added == 4
  assert programs == [2]
  with RunStore(tmp_path / "masked.db") as store:
    masked = {r.run_key: r for r in store.runs()}
  assert sorted(masked) == sorted(S.run_key("iris", "mlp", i, epochs=1, seed=0, space=space)
                                  for i in range(4))
  assert {r.status for r in masked.values()} == {"completed"}
  assert {r.hparams["layers"] for r in masked.values()} == {1, 2}
  assert all(r.model["depth"] == r.hparams["layers"] for r in masked.values())

  monkeypatch.setattr(S, "MASK_DEPTH", ())  # the old grouping: a program of depth 1
  shallow = [r.extra["trial"] for r in masked.values() if r.hparams["layers"] == 1]
  with RunStore(tmp_path / "old.db") as store:
    S.run_task(store, space, "iris", "mlp", shallow, epochs=1, seed=0,
               micro=next(iter(masked.values())).extra["micro_batch"])
    old = store.runs()
  assert programs == [2, 1] and len(old) == len(shallow)
  for o in old:
    r = masked[o.run_key]
    assert (r.status, r.hparams, r.model) == (o.status, o.hparams, o.model)
    for name in ("train_loss", "val_loss", "test_loss"):
      np.testing.assert_allclose(r.curves[name], o.curves[name], rtol=1e-5)


def test_padded_init_is_each_runs_own_task_init_bit_for_bit():
  # One compiled init serves every dataset and depth of a layout, and gives exactly the
  # parameters task.init gives the run's own model, zero-padded.
  layout = S.PadLayout(features=16, rows=(120, 40, 40), classes=4, capacity=8, micro=16)
  init = jax.jit(S._padded_init(layout, 8, 3))
  key = jax.random.PRNGKey(3)
  for dataset in ("iris", "wine"):
    task = make_task(TaskConfig(dataset, "mlp", 8, 3, 16, 1, 0))
    features, classes = int(np.prod(task.data.x_train.shape[1:])), task.data.num_classes
    for depth in (1, 3):
      got = init({"layers": jnp.int32(depth), "classes": jnp.int32(classes),
                  "features": jnp.int32(features),
                  "stddev_in": jnp.float32(S.lecun_stddev(features))}, key)
      want = S._shaped(task, depth).init(key)
      for name, layer in want.items():
        target = "Dense_3" if name == f"Dense_{depth}" else name  # the head moves to the end
        for leaf, value in layer.items():
          padded = np.array(got[target][leaf])
          real = tuple(slice(0, n) for n in value.shape)
          np.testing.assert_array_equal(padded[real], np.asarray(value))
          padded[real] = 0
          assert not padded.any(), (dataset, depth, name, leaf)  # the padding is zero
      for i in range(depth, 3):
        assert not np.asarray(got[f"Dense_{i}"]["kernel"]).any()


def test_datasets_of_a_layout_share_one_program_and_train_as_unpadded(tmp_path, monkeypatch):
  S._PROGRAMS.clear()
  kw = dict(datasets=["iris", "wine"], models=["mlp"], space=SPACE, trials_per_task=2,
            epochs=1, progress=False)
  assert S.sweep(tmp_path / "shared.db", **kw).added == 4
  assert len(S._PROGRAMS) == 1  # one compiled training program for both datasets
  monkeypatch.setattr(S, "SHARED", ())  # one program per task, unpadded
  assert S.sweep(tmp_path / "own.db", **kw).added == 4
  with RunStore(tmp_path / "shared.db") as a, RunStore(tmp_path / "own.db") as b:
    shared, own = {r.run_key: r for r in a.runs()}, {r.run_key: r for r in b.runs()}
  assert sorted(shared) == sorted(own)
  for k, r in own.items():
    s = shared[k]
    assert (s.status, s.hparams, s.model, s.task_features) == (
        r.status, r.hparams, r.model, r.task_features)
    assert s.extra["eval_steps"] == r.extra["eval_steps"] and s.extra["steps"] == r.extra["steps"]
    for name in ("train_loss", "val_loss", "val_accuracy", "test_loss", "test_accuracy"):
      np.testing.assert_allclose(s.curves[name], r.curves[name], rtol=1e-5, atol=1e-6)


def test_pad_splits_refuses_data_larger_than_its_layout():
  task = make_task(TaskConfig("iris", "mlp", 8, 1, 16, 1, 0))
  with pytest.raises(ValueError, match="cannot pad train of shape"):
    metaopt.train.pad_splits(task.arrays(), {"train": 10, "val": 40, "test": 40}, 4,
                             eval_every=6)
