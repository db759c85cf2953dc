"""`metaopt run controllers` end to end on the smallest configuration that exercises it."""

import dataclasses
import json

import pytest

from metaopt import cli
from metaopt.experiments import controllers
from metaopt.meta.rl import RLConfig
from metaopt.meta.supervised import SupervisedConfig
from metaopt.tasks import TaskConfig, task_family

FAMILY = task_family(datasets=("iris",), widths=(8,), depths=(1,), batch_sizes=(16,),
                     total_steps=(20,))
QUICK = controllers.quick_config


def tiny_quick(seed=0):
  config = QUICK(seed)
  return dataclasses.replace(
      config,
      # The held-out task, grid and evaluations of test_cli's tiny lr-schedule run: the hand
      # baselines' programs are then shared through the session's compilation cache.
      heldout=(TaskConfig("iris", "mlp", 12, 1, 16, 100, 0),), seeds=1, lrs=(1e-3, 1e-2),
      evals=5, run_pes=False,
      supervised=SupervisedConfig(family=FAMILY, tasks=1, points=5, lookahead=2,
                                  schedules=("constant", "cosine"), schedule_lrs=(1e-3,),
                                  meta_epochs=2, seed=seed),
      rl=RLConfig(family=FAMILY, epochs=5, epoch_steps=4, episodes=2, iterations=1,
                  update_epochs=1, minibatches=1, seed=seed))


def test_run_controllers_end_to_end(tmp_path, monkeypatch):
  monkeypatch.setattr(controllers, "quick_config", tiny_quick)
  assert cli.main(["run", "controllers", "--quick", "--out", str(tmp_path),
                   "--no-progress"]) == 0
  out = tmp_path / "controllers-quick"
  for name in ("report.md", "results.json", "lr.png", "loss.png", "curves.csv",
               "supervised/meta_dataset.npz", "supervised/meta_dataset.csv",
               "supervised/controller/lr_controller.json", "rl/policy/rl_policy.json",
               "rl/metrics.jsonl"):
    assert (out / name).stat().st_size > 0, name
  results = json.loads((out / "results.json").read_text())
  methods = {r["method"] for r in results["rows"]}
  assert {"Adam 1e-3", "tuned cosine", "TBPTT (shipped)", "supervised", "RL (PPO)"} <= methods
  for row in results["rows"]:
    assert 0.0 <= row["test acc"] <= 1.0 and row["log-LR total variation"] >= 0.0
  assert results["compute"]["pes"]["note"].startswith("not available")
  assert results["compute"]["rl"]["inner_steps"] == 1 * 2 * 5 * 4
  curves = results["curves"]["iris-mlp-12x1-b16-s100"]
  # The RL policy acts once per evaluation: its LR is constant within each of the 5 epochs.
  lr = curves["rl"]["learning_rate"][0]
  assert len(lr) == 100 and all(len(set(lr[i * 20:(i + 1) * 20])) == 1 for i in range(5))
  report = (out / "report.md").read_text()
  assert "## Who wins where" in report and "RL transfer" in report
  assert "PES: not available" in report


def test_bad_config_is_refused():
  config = controllers.quick_config()
  with pytest.raises(ValueError, match="not a multiple of evals=7"):
    dataclasses.replace(config, evals=7)
