"""The `metaopt` command end to end on a tiny configuration, and its error handling."""

import csv
import dataclasses
import json
import pathlib
import subprocess
import sys

import pytest

from metaopt import cli
from metaopt import report as report_lib
from metaopt.experiments import lr_schedule
from metaopt.tasks import TaskConfig


def in_process(capsys, *args):
  """`metaopt ARGS` in this process: (exit code, stdout, stderr). argparse exits by
  SystemExit; the CLI turns that into a return code, and so does this, should it escape."""
  capsys.readouterr()
  try:
    code = cli.main(list(args))
  except SystemExit as e:
    code = e.code
  out = capsys.readouterr()
  return code, out.out, out.err


def test_the_installed_command_exits_2_with_one_line():
  # One real process (the console script pip installs, else `python -m metaopt.cli`): the
  # exit code and the single stderr line survive the process boundary. The other error
  # cases are checked in-process below.
  script = pathlib.Path(sys.executable).with_name("metaopt")
  command = [str(script)] if script.exists() else [sys.executable, "-m", "metaopt.cli"]
  out = subprocess.run([*command, "run", "no-such-experiment"], capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 2, out.stderr
  assert out.stderr.strip().count("\n") == 0, out.stderr
  assert "accepted: lr-schedule, adaptive-lr" in out.stderr and "Traceback" not in out.stderr


def test_help_lists_every_command(capsys):
  code, out, _ = in_process(capsys, "--help")
  assert code == 0
  for command in ("run", "list"):
    assert command in out
  code, run_help, _ = in_process(capsys, "run", "--help")
  assert code == 0 and "lr-schedule" in run_help and "--quick" in run_help


@pytest.mark.parametrize("args, needle", [
    (("run", "no-such-experiment"),
     "unknown experiment 'no-such-experiment'; accepted: lr-schedule, adaptive-lr"),
    (("run", "lr-schedule", "--set", "meta.meta_steps=0"), "meta_steps must be an integer >= 1, got 0"),
    (("run", "lr-schedule", "--set", "meta.meta_stepz=3"), "unknown config field 'meta_stepz'"),
    (("run", "lr-schedule", "--set", "seeds=two"), "config field 'seeds': expected an integer"),
    (("run", "lr-schedule", "--set", "seeds"), "expected path.to.field=value"),
    (("run", "lr-schedule", "--seed", "abc"), "invalid int value: 'abc'"),
    (("frobnicate",), "invalid choice: 'frobnicate'"),
])
def test_user_errors_print_one_line_and_exit_2(tmp_path, capsys, args, needle):
  # --out in tmp_path: a case that wrongly got past its check would not write to ./results.
  if args[0] == "run" and len(args) > 1:
    args = (*args, "--out", str(tmp_path / "runs"))
  code, _, err = in_process(capsys, *args)
  assert code == 2, err
  assert err.count("\n") == 1 and err.endswith("\n"), err
  assert needle in err and "Traceback" not in err
  assert not (tmp_path / "runs").exists()


QUICK = lr_schedule.quick_config


def tiny_quick(seed=0):
  config = QUICK(seed)
  return dataclasses.replace(
      config, meta=dataclasses.replace(config.meta, meta_steps=4, checkpoint_every=2),
      heldout=(TaskConfig("iris", "mlp", 12, 1, 16, 100, 0),), lrs=(1e-3, 1e-2), evals=5,
      self_tuning=("prodigy",))


def test_run_writes_report_results_and_plots(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(lr_schedule, "quick_config", tiny_quick)
  args = ["run", "lr-schedule", "--quick", "--out", str(tmp_path), "--no-progress"]
  assert cli.main(args) == 0
  out = tmp_path / "lr-schedule-quick"
  for name in ("report.md", "results.json", "lr.png", "loss.png", "meta_loss.png"):
    assert (out / name).stat().st_size > 0, name
  results = json.loads((out / "results.json").read_text())
  methods = {r["method"] for r in results["rows"]}
  assert {"Adam 1e-3", "tuned constant", "tuned step", "tuned cosine",
          "learned (this run)"} <= methods
  for row in results["rows"]:
    assert 0.0 <= row["test acc"] <= 1.0
  report = (out / "report.md").read_text()
  assert "| task | method | test loss | test acc" in report
  # LR curves are recorded per step for every method.
  curves = results["curves"]["iris-mlp-12x1-b16-s100"]
  assert all(len(c["learning_rate"][0]) == 100 for c in curves.values())
  # ... and as CSV (and TensorBoard) next to results.json, for meta-training too.
  rows = list(csv.DictReader((out / "curves.csv").open()))
  lr_rows = [r for r in rows if r["metric"] == "learning_rate" and r["method"] == "learned"]
  assert [int(r["step"]) for r in lr_rows] == list(range(1, 101))
  assert {r["method"] for r in rows} >= {"constant", "tuned_cosine", "learned"}
  # The time to the tuned cosine's validation accuracy, for every method, and its profile.
  ttt = results["time_to_target"]
  assert {r["method"] for r in ttt["rows"]} >= {"tuned cosine", "Prodigy", "learned (this run)"}
  assert set(ttt["score"]) >= {"tuned_cosine", "prodigy"} and (out / "profile.png").exists()
  assert all(0.0 <= s <= 1.0 for s in ttt["score"].values())
  meta = list(csv.DictReader((out / "meta" / "metrics.csv").open()))
  assert [int(r["step"]) for r in meta] == [0, 1, 2, 3] and float(meta[0]["meta_loss"]) > -10
  assert list((out / "tensorboard").glob("events.*")) and list(
      (out / "meta" / "tensorboard").glob("events.*"))
  # config.json is the resolved configuration: --print-config gives the same text, and
  # --config reads it back to the same configuration.
  printed = tmp_path / "printed.json"
  capsys.readouterr()
  assert cli.main(args + ["--print-config"]) == 0
  printed.write_text(capsys.readouterr().out)
  saved = (out / "config.json").read_text()
  assert printed.read_text() == saved
  assert json.loads(saved)["meta"]["meta_steps"] == 4
  assert cli.main(["run", "lr-schedule", "--config", str(out / "config.json"), "--print-config"]) == 0
  assert capsys.readouterr().out == saved
  # A second run without --name gets a new folder; with --name it resumes the old one.
  assert report_lib.run_directory(tmp_path, "lr-schedule-quick", resume=False).name == \
      "lr-schedule-quick-2"
  assert report_lib.run_directory(tmp_path, "lr-schedule-quick", resume=True) == out
  assert (out / "report.md").read_text() == report


@pytest.mark.parametrize("make_file, needle", [
    (lambda d: d, "is a folder"),
    (lambda d: d / "missing.toml", "no config file at"),
    (lambda d: (d / "bad.json").write_text("{nope") and d / "bad.json", "is not valid JSON"),
    (lambda d: (d / "bad.toml").write_text("x = = 1") and d / "bad.toml", "is not valid TOML"),
    (lambda d: (d / "extra.toml").write_text("colour = 3\n") and d / "extra.toml",
     "unknown config field 'colour'"),
    (lambda d: (d / "type.toml").write_text("[meta]\nmeta_steps = 'ten'\n") and d / "type.toml",
     "config field 'meta.meta_steps': expected an integer, got 'ten'"),
])
def test_bad_config_files_get_one_line_and_no_run_folder(tmp_path, capsys, make_file, needle):
  out = tmp_path / "runs"
  path = make_file(tmp_path)
  assert cli.main(["run", "lr-schedule", "--out", str(out), "--config", str(path)]) == 2
  err = capsys.readouterr().err
  assert needle in err and err.count("\n") == 1, err
  assert not out.exists()


def test_a_toml_file_sets_nested_fields(tmp_path, capsys):
  path = tmp_path / "short.toml"
  path.write_text("seeds = 3\nlrs = [1e-3, 1e-2]\n[meta]\nmeta_steps = 7\n"
                  "[meta.family]\ndatasets = ['digits']\n")
  assert cli.main(["run", "lr-schedule", "--quick", "--config", str(path),
                   "--set", "meta.lanes=3", "--print-config"]) == 0
  config = json.loads(capsys.readouterr().out)
  assert config["seeds"] == 3 and config["lrs"] == [1e-3, 1e-2]
  assert config["meta"]["meta_steps"] == 7 and config["meta"]["lanes"] == 3
  assert config["meta"]["family"]["datasets"] == ["digits"]
  assert config["meta"]["family"]["widths"] == [32]   # the rest comes from --quick
