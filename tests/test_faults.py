"""Fault injection: bad CLI input, damaged checkpoints, torn metrics files, run identity,
and kill -9 during a run (in subprocesses, marked slow: CI runs them, a developer can
skip them with -m "not slow")."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest

from metaopt import cli
from metaopt.checkpoint import Checkpoints
from metaopt.train import read_metrics, run_loop

# --- the CLI's error boundary ------------------------------------------------------------


def bad_paths(tmp: pathlib.Path) -> dict:
  a_file = tmp / "a-file"
  a_file.write_text("x")
  (tmp / "a-folder").mkdir()
  return {"file": str(a_file), "under_file": str(a_file / "sub"), "folder": str(tmp / "a-folder")}


CASES = [
    # (arguments with {file}/{under_file}/{folder} placeholders, what the one line says)
    (["run", "lr-schedule", "--out", "{file}"], "is a file, not a folder"),
    (["run", "lr-schedule", "--out", "{under_file}"], "cannot be created"),
    (["run", "lr-schedule", "--save-controller", "{file}"], "is a file, not a folder"),
    (["run", "lr-schedule", "--save-controller", "{under_file}"], "cannot be created"),
    (["run", "lr-schedule", "--store", "{folder}"], "is a folder"),
    (["run", "lr-schedule", "--store", "{under_file}"], "does not exist"),
    (["run", "lr-schedule", "--seed", str(2 ** 63)], "is outside [0, 4294967295]"),
    (["run", "lr-schedule", "--seed", "-1"], "is outside [0, 4294967295]"),
    (["run", "lr-schedule", "--set", f"meta.seed={2 ** 40}"], "seed must be an integer in"),
    (["run", "lr-schedule", "--name", "../x"], "must be a single folder name"),
    (["run", "lr-schedule", "--name", "/abs"], "must be a single folder name"),
    (["run", "lr-schedule", "--name", "a/b"], "must be a single folder name"),
    (["run", "lr-schedule", "--name", "."], "must be a single folder name"),
    (["run", "lr-schedule", "--name", ""], "must be a single folder name"),
    (["run", "lr-schedule", "--name", "a\x07b"], "must be a single folder name"),
    (["run", "lr-schedule", "--config", "{folder}"], "is a folder"),
    (["sweep", "--store", "{folder}"], "is a folder"),
    (["sweep", "--store", "{file}.db", "--space", "{folder}"], "Is a directory"),
    (["sweep", "--store", "{file}.db", "--trials", "1000000000"], "is outside [1, 100000]"),
    (["sweep", "--store", "{file}.db", "--epochs", "1000000000"], "is outside [1, 10000]"),
    (["hparams", "fit", "--store", "{folder}", "--out", "{folder}"], "no run store"),
    (["hparams", "fit", "--store", "{file}", "--out", "{folder}", "--steps", str(2 ** 40)],
     "is outside [1, 1000000]"),
    (["hparams", "suggest", "--predictor", "{folder}", "-k", "100000"], "is outside [1, 1000]"),
    (["hparams", "suggest", "--predictor", "{folder}", "--features", "{folder}"],
     "no saved predictor"),
]


@pytest.mark.parametrize("args, needle", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_gets_one_line_exit_2_and_no_run_folder(tmp_path, capsys, args, needle):
  paths = bad_paths(tmp_path)
  out = tmp_path / "runs"
  args = [a.format(**paths) for a in args]
  if args[0] == "run" and "--out" not in args:
    args += ["--out", str(out)]
  before = sorted(p.name for p in tmp_path.iterdir())
  assert cli.main(args) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and needle in err, err
  assert "Traceback" not in err
  assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created


def test_a_read_only_out_folder_is_named_before_any_work(tmp_path, capsys):
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o500)
  try:
    if os.access(locked, os.W_OK):
      pytest.skip("running as root: a read-only folder is writable anyway")
    assert cli.main(["run", "lr-schedule", "--out", str(locked / "runs")]) == 2
    assert "is not writable" in capsys.readouterr().err
  finally:
    locked.chmod(0o700)


# --- run identity ------------------------------------------------------------------------


def started_run(tmp_path, capsys, *extra):
  """A run folder as `metaopt run lr-schedule --quick --name r` records it (no training)."""
  assert cli.main(["run", "lr-schedule", "--quick", *extra, "--print-config"]) == 0
  folder = tmp_path / "r"
  folder.mkdir()
  (folder / "config.json").write_text(capsys.readouterr().out)
  return folder


@pytest.mark.parametrize("changed, field", [
    (["--seed", "7"], "meta.seed"),
    (["--set", "lrs=[0.1]"], "lrs"),
    (["--set", "meta.family.datasets=[\"iris\"]"], "meta.family.datasets"),
])
def test_resuming_with_a_different_configuration_is_refused(tmp_path, capsys, changed, field):
  started_run(tmp_path, capsys)
  args = ["run", "lr-schedule", "--quick", "--out", str(tmp_path), "--name", "r", *changed]
  assert cli.main(args) == 2
  err = capsys.readouterr().err
  assert f"different '{field}'" in err and "--force-new" in err and err.count("\n") == 1
  assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_force_new_starts_a_new_folder_and_a_longer_run_may_resume(tmp_path, capsys,
                                                                   monkeypatch):
  started_run(tmp_path, capsys)
  ran = []
  monkeypatch.setattr("metaopt.experiments.lr_schedule.run",
                      lambda config, out, **kw: ran.append(out) or _Done(out))
  base = ["run", "lr-schedule", "--quick", "--out", str(tmp_path), "--name", "r"]
  assert cli.main(base + ["--seed", "7", "--force-new"]) == 0
  assert ran[-1].name == "r-2"
  assert cli.main(base + ["--set", "meta.meta_steps=99"]) == 0   # the run length may grow
  assert ran[-1].name == "r"
  assert json.loads((tmp_path / "r" / "config.json").read_text())["meta"]["meta_steps"] == 99


class _Done:
  def __init__(self, out):
    self.report = out / "report.md"

  def summary_lines(self):
    return []


def test_a_shorter_run_than_its_checkpoint_is_refused(tmp_path):
  advance = lambda state, record, start, n: (state, record, [{} for _ in range(n)])
  run_loop(advance, {"x": jnp.zeros(2)}, steps=6, chunk=2, directory=tmp_path)
  with pytest.raises(ValueError, match="is at step 6, beyond steps=4"):
    run_loop(advance, {"x": jnp.zeros(2)}, steps=4, chunk=2, directory=tmp_path)


# --- damaged checkpoints and torn metrics ---------------------------------------------


def two_checkpoints(root):
  ckpt = Checkpoints(root, every=1, keep=3)
  for step in (1, 2):
    ckpt.save(step, {"a": jnp.arange(1000.0) * step},
              {"record": {"step": step}, "seconds": 0.0})
  ckpt.close()


def truncate(path, size=10):
  with open(path, "r+b") as f:
    f.truncate(size)


DAMAGE = {
    "state folder gone": lambda d: shutil.rmtree(d / "state"),
    "progress folder gone": lambda d: shutil.rmtree(d / "progress"),
    "ocdbt chunks truncated": lambda d: [truncate(p) for p in
                                         (d / "state" / "ocdbt.process_0" / "d").iterdir()],
    "state/d truncated": lambda d: [truncate(p, 100) for p in (d / "state" / "d").iterdir()],
    "manifest truncated": lambda d: truncate(d / "state" / "manifest.ocdbt", 5),
    "array metadata garbage": lambda d: (d / "state" / "_METADATA").write_text("{nope"),
    "progress garbage": lambda d: (d / "progress" / "metadata").write_text("{nope"),
    "progress not a record": lambda d: (d / "progress" / "metadata").write_text("[1, 2]"),
    "empty step folder": lambda d: [shutil.rmtree(d), d.mkdir()],
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_restore_falls_back_past_a_damaged_checkpoint_and_keeps_it_aside(tmp_path, capsys,
                                                                         damage):
  root = tmp_path / "checkpoints"
  two_checkpoints(root)
  DAMAGE[damage](root / "2")
  ckpt = Checkpoints(root, every=1, keep=3)
  step, state, progress = ckpt.restore(
      lambda p: {"a": jnp.zeros(1000)},
      validate=lambda p: p["record"]["step"])
  ckpt.close()
  assert step == 1 and float(state["a"][1]) == 1.0 and progress["record"] == {"step": 1}
  err = capsys.readouterr().err
  assert "checkpoint 2" in err and "does not restore" in err and "moved it to" in err
  assert (root / "damaged" / "2").is_dir()   # kept, not deleted


def test_a_torn_last_metrics_line_is_dropped_and_a_bad_middle_line_is_named(tmp_path, capsys):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 0, "x": 1}\n{"step": 1, "x": 2}\n{"step": 2, "x"')
  assert [r["step"] for r in read_metrics(path)] == [0, 1]
  assert "dropped the torn last line 3" in capsys.readouterr().err
  path.write_text('{"step": 0}\n{oops\n{"step": 2}\n')
  with pytest.raises(ValueError, match="metrics.jsonl, line 2"):
    read_metrics(path)


# --- kill -9 through the CLI ---------------------------------------------------------------

# 30 meta steps: long enough that the killed run is still meta-training when the kill lands
# on a loaded machine (8 could all finish between the checkpoint's appearance and the kill).
TINY = ["--quick", "--no-progress", "--set", "meta.meta_steps=30", "--set", "meta.checkpoint_every=2",
        "--set", "seeds=1", "--set", "lrs=[0.001]", "--set", "evals=2",
        "--set", "include_pretrained=false", "--set", "self_tuning=[]",
        "--set", "heldout=[{dataset='iris', model='mlp', width=8, depth=1, batch_size=16, "
                 "total_steps=40, seed=0}]"]


def metaopt(args, env, **kw):
  return subprocess.Popen([sys.executable, "-m", "metaopt.cli", *args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def comparable(results_json: pathlib.Path) -> dict:
  data = json.loads(results_json.read_text())
  for row in data["rows"]:
    row.pop("wall s (all runs)")
  for row in data["time_to_target"]["rows"]:   # wall time differs between any two runs
    row.pop("time to target s")
  data.pop("timings")
  data["config"].pop("save_controller")   # the two runs save to different folders
  return data


@pytest.mark.slow
def test_kill_9_and_damage_then_resume_give_the_uninterrupted_result(tmp_path, capsys):
  # The run that is killed is a real `metaopt` process; the uninterrupted run and the
  # reruns call the same entry point in this process (no jax import each, and the
  # uninterrupted run fills the compilation cache the killed process reads).
  env = dict(os.environ)  # the session's compilation cache (conftest.py)
  base = ["run", "lr-schedule", *TINY, "--out", str(tmp_path / "runs")]
  assert cli.main(base + ["--name", "whole", "--save-controller", str(tmp_path / "c1")]) == 0

  args = base + ["--name", "cut", "--save-controller", str(tmp_path / "c2")]
  cut = tmp_path / "runs" / "cut"
  checkpoints = cut / "meta" / "checkpoints"
  for kill_after in (2,):   # kill -9 once a checkpoint exists
    proc = metaopt(args, env)
    deadline = time.time() + 240
    while not (checkpoints / str(kill_after)).exists() and proc.poll() is None:
      assert time.time() < deadline
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read()
  assert not (cut / "results.json").exists()   # killed before the end of the run
  capsys.readouterr()
  assert cli.main(args) == 0
  assert "resumed meta-training at step" in capsys.readouterr().out
  c1 = (tmp_path / "c1" / "lr_controller.msgpack").read_bytes()
  assert (tmp_path / "c2" / "lr_controller.msgpack").read_bytes() == c1
  assert comparable(cut / "results.json") == comparable(
      tmp_path / "runs" / "whole" / "results.json")

  # The newest checkpoint loses its state and a kill tears the metrics file: the rerun
  # falls back to the one before and ends with the same controller.
  newest = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  shutil.rmtree(checkpoints / str(newest) / "state")
  with open(cut / "meta" / "metrics.jsonl", "a") as f:
    f.write('{"step": 30, "meta_lo')
  shutil.rmtree(tmp_path / "c2")
  assert cli.main(args) == 0
  err = capsys.readouterr().err
  assert f"checkpoint {newest}" in err and "does not restore" in err
  assert (tmp_path / "c2" / "lr_controller.msgpack").read_bytes() == c1
