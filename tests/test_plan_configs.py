"""The named configurations of the plans' workloads (`metaopt run <experiment> --config
<name>`): each loads, states its estimate, and runs end to end on tfds mock data with tiny
models of its own families and its own optimizer settings."""

import dataclasses
import functools
import json

import pytest
import tensorflow_datasets as tfds

from metaopt import cli
from metaopt import config as config_lib
from metaopt import experiments
from metaopt.meta.rl import RLConfig
from metaopt.meta.supervised import SupervisedConfig
from metaopt.tasks import TaskConfig, speech, task_family
from metaopt.tasks.tfds_data import load_class_pool

NAMED = [(e, n) for e in experiments.REGISTRY for n in experiments.named_configs(e)]
OFFLINE = {("lr-schedule", "mlp_heldout")}  # `make demo`'s: offline MLP tasks, no plan data


def named(experiment: str, name: str, data_dir):
  """The experiment's default configuration with the named file merged in, and then
  ``data_dir`` (as ``--config NAME --set data_dir=D`` does)."""
  module = experiments.load(experiment)
  data = config_lib.load_file(experiments.config_file(experiment, name))
  config = config_lib.merge_all(module.default_config(0), [data], [f"data_dir={data_dir}"])
  return module, config, data


def test_the_plans_have_named_configs_with_estimates():
  assert {(e, n) for e, n in NAMED} >= {
      ("lr-schedule", "cifar10_resnet18"), ("adaptive-lr", "cifar10_resnet18"),
      ("adaptive-lr", "imdb_bert"), ("adaptive-lr", "librispeech_ctc"),
      ("controllers", "plan_workloads"), ("maml-transfer", "plan_transfer")}
  for experiment, name in NAMED:
    estimate = experiments.estimate(experiments.named_configs(experiment)[name])
    if (experiment, name) in OFFLINE:
      assert "no GPU needed" in estimate and "CPU cores" in estimate, name
    else:
      assert "GPU memory" in estimate and "GPU-hours" in estimate, (experiment, name)


def test_the_demo_config_is_the_defaults_mlp_tasks():
  _, config, _ = named("lr-schedule", "mlp_heldout", "/data")
  lr_schedule = experiments.load("lr-schedule")
  assert config.heldout == lr_schedule.MLP_HELDOUT
  assert config.meta == lr_schedule.default_config(0).meta  # the same controller


@pytest.mark.parametrize("experiment, name", NAMED)
def test_named_config_resolves_through_the_cli(experiment, name, tmp_path, capsys):
  args = ["run", experiment, "--config", name, "--print-config", "--out", str(tmp_path),
          "--set", f"data_dir={tmp_path}"]
  assert cli.main(args) == 0
  printed = json.loads(capsys.readouterr().out)
  _, config, data = named(experiment, name, tmp_path)
  want = json.loads(config_lib.dumps(config))
  assert printed == want
  for key, value in data.items():  # every field of the file reached the configuration
    if key != "data_dir" and not isinstance(value, (dict, list)):
      assert printed[key] == value, key


def test_a_name_that_is_neither_file_nor_config_lists_the_named_ones(tmp_path, capsys):
  assert cli.main(["run", "adaptive-lr", "--config", "cifar10", "--out", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "'cifar10' is neither a file nor a named configuration" in err
  assert "cifar10_resnet18, imdb_bert, librispeech_ctc" in err
  assert not list(tmp_path.iterdir())  # a failed start leaves no run folder


def _tiny_task(task: TaskConfig, total_steps: int) -> TaskConfig:
  return task._replace(width=8, depth=1, batch_size=4, total_steps=total_steps)


# One adaptive method per adaptive-lr configuration keeps each test at two compiled programs.
ADAPTIVE_TINY = {"resnet18": ("plateau",), "bert": ("hd_adam",), "speech_ctc": ("hd_sgd",)}


def tiny(experiment: str, config, data_dir):
  """``config`` with tiny models and runs, keeping its datasets, model families,
  optimizer, LRs and dropout. The methods that are the same program on every workload
  (the shipped controller, the self-tuning optimizers) run in the other experiments'
  tests."""
  if experiment == "lr-schedule":
    family = config.meta.family._replace(widths=(4,), depths=(1,), batch_sizes=(4,),
                                         total_steps=(10,))
    meta = dataclasses.replace(config.meta, family=family, meta_steps=2, lanes=1, population=2,
                               segment_length=5, checkpoint_every=2, hidden=(4,))
    return dataclasses.replace(config, meta=meta, seeds=1, lrs=config.lrs[:2], evals=2,
                               heldout=tuple(_tiny_task(t, 4) for t in config.heldout),
                               self_tuning=(), include_pretrained=False, data_dir=data_dir)
  if experiment == "adaptive-lr":
    return dataclasses.replace(config, width=8, depth=1, batch_size=4, epochs=2, seeds=1,
                               tune_lrs=config.tune_lrs[:2], start_factors=(10.0,), patience=1,
                               adaptive=ADAPTIVE_TINY[config.model], self_tuning=(),
                               include_pretrained=False, data_dir=data_dir)
  if experiment == "controllers":
    family = task_family(datasets=("iris",), widths=(8,), depths=(1,), batch_sizes=(16,),
                         total_steps=(20,))
    # Held out: the RL policy (the method fed validation losses); the shipped and the
    # supervised controller are the same learned-LR program as lr-schedule's.
    return dataclasses.replace(
        config, seeds=1, lrs=(1e-3,), evals=2, run_pes=False, evaluate=("rl",),
        heldout=tuple(_tiny_task(t, 10) for t in config.heldout), data_dir=data_dir,
        supervised=SupervisedConfig(family=family, tasks=1, points=5, lookahead=2,
                                    schedules=("constant", "cosine"), schedule_lrs=(1e-3,),
                                    meta_epochs=2),
        rl=RLConfig(family=family, epochs=5, epoch_steps=4, episodes=2, iterations=1,
                    update_epochs=1, minibatches=1))
  raise AssertionError(experiment)


@pytest.fixture
def mock_tfds(monkeypatch):
  # Random examples for every tfds set and split, no network, no data folder. Mock
  # utterances are 1 frame and under 24 characters: LibriSpeech's real maxima (1,600
  # frames, 400 characters) would only pad them, at 100 times the work of each step.
  monkeypatch.setattr(speech, "load_librispeech", functools.partial(
      speech.load_librispeech, max_frames=8, max_label_length=24))
  with tfds.testing.mock_data(num_examples=12):
    yield


@pytest.mark.parametrize("experiment, name",
                         [(e, n) for e, n in NAMED
                          if e != "maml-transfer" and (e, n) not in OFFLINE])
def test_named_config_runs_end_to_end_on_mock_data(experiment, name, mock_tfds, tmp_path):
  _, config, _ = named(experiment, name, tmp_path)
  config = tiny(experiment, config, str(tmp_path))
  # Through the CLI, as a user reruns a run folder's config.json.
  (tmp_path / "tiny.json").write_text(config_lib.dumps(config))
  assert cli.main(["run", experiment, "--config", str(tmp_path / "tiny.json"), "--out",
                   str(tmp_path), "--name", "run", "--no-progress"]) == 0
  result = json.loads((tmp_path / "run" / "results.json").read_text())
  rows = result["rows"]
  tasks = {r["task"] for r in rows}
  assert len(tasks) == (len(config.datasets) if experiment == "adaptive-lr"
                        else len(config.heldout))
  for row in rows:
    assert 0.0 <= row["test acc"] <= 1.0, row
  methods = {r["method"] for r in rows}
  if experiment == "lr-schedule":
    label = config.meta.optimizer.label
    assert f"{label} (the base optimizer" in (tmp_path / "run" / "report.md").read_text()
    assert {"tuned constant", "tuned step", "tuned cosine", "learned (this run)"} <= methods
    assert ("Adam 1e-3" in methods) == (config.meta.optimizer.name == "adam")
  elif experiment == "adaptive-lr":
    base = config.optimizer.label
    adaptive = {"plateau": "reduce on plateau", "hd_sgd": "hypergradient SGD",
                "hd_adam": "hypergradient Adam"}
    assert {experiments.load("adaptive-lr").method_labels(config)["adam_1e-3"],
            f"tuned constant {base}", "tuned cosine",
            *(adaptive[m] for m in config.adaptive)} <= methods
  else:  # what the controllers' own end-to-end test checked on an MLP, here on the plan's
    out = tmp_path / "run"
    for name in ("report.md", "results.json", "lr.png", "loss.png", "curves.csv",
                 "supervised/meta_dataset.npz", "supervised/meta_dataset.csv",
                 "supervised/controller/lr_controller.json", "rl/policy/rl_policy.json",
                 "rl/metrics.jsonl"):
      assert (out / name).stat().st_size > 0, name
    assert {"Adam 1e-3", "tuned cosine", "RL (PPO)"} <= methods
    assert not methods & {"TBPTT (shipped)", "supervised"}  # meta-trained, not evaluated
    for row in rows:  # +inf (null) only for a warmup from LR 0
      tv = row["log-LR total variation"]
      assert tv >= 0.0 if row["method"] != "tuned cosine" else tv is None or tv >= 0.0, row
    assert result["compute"]["pes"]["note"].startswith("not available")
    assert result["compute"]["rl"]["inner_steps"] == 1 * 2 * 5 * 4
    # The RL policy acts once per evaluation: its LR is constant within each of the 2.
    for task in tasks:
      lr = result["curves"][task]["rl"]["learning_rate"][0]
      assert len(lr) == 10 and len(set(lr[:5])) == 1 and len(set(lr[5:])) == 1
    for row in rows:  # macro-F1 on the classification tasks, WER on speech
      speech = row["task"].startswith("librispeech")
      assert (row["test F1"] is None) == speech and (row["test WER"] is None) != speech, row
      if speech:
        assert row["test WER"] >= 0 and row["test acc"] == pytest.approx(
            max(0.0, 1.0 - row["test WER"]), abs=1e-6)
      else:
        assert 0.0 <= row["test F1"] <= 1.0
    report = (out / "report.md").read_text()
    assert "## Who wins where" in report and "RL transfer" in report
    assert "PES: not available" in report
  assert (tmp_path / "run" / "report.md").exists()


def test_maml_transfer_plan_runs_end_to_end_on_mock_data(tmp_path):
  _, config, _ = named("maml-transfer", "plan_transfer", tmp_path)
  tiny_config = dataclasses.replace(
      config, image_size=8, filters=4, n_way=2, num_query=1, meta_iterations=2, inner_steps=1,
      finetune_steps=1, episodes=4, val_every=2, val_episodes=2, pretrain_steps=2,
      finetune_lrs=(0.1,), task_lr=0.1, meta_batch=2, max_per_class=5)
  (tmp_path / "tiny.json").write_text(config_lib.dumps(tiny_config))
  with tfds.testing.mock_data(num_examples=60):
    omniglot = load_class_pool("omniglot", split="train", image_size=8, grayscale=True)
    assert cli.main(["run", "maml-transfer", "--config", str(tmp_path / "tiny.json"), "--out",
                     str(tmp_path), "--name", "run", "--no-progress"]) == 0
  result = json.loads((tmp_path / "run" / "results.json").read_text())
  assert [r["method"] for r in result["results"]][:3] == ["MAML", "random init",
                                                         "joint pre-training"]
  assert all(0.0 <= r["accuracy"] <= 1.0 for r in result["results"])
  assert omniglot.x.shape[1:] == (8, 8, 1)
  roles = result["data"]  # the plan's roles; fgvc_aircraft is not in tfds
  assert set(roles["meta_train"]["datasets"]) == {"cifar100", "caltech101", "flowers102"}
  assert roles["meta_val"]["datasets"] == ["stanford_cars"]
  assert set(roles["meta_test"]["datasets"]) <= {"oxford_pets", "sun397"}
  assert result["config"]["image_size"] == 8 and (tmp_path / "run" / "report.md").exists()
