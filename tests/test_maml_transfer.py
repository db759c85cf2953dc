"""The maml-transfer experiment end to end on a tiny configuration, resume and backbone loading."""

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaopt import cli
from metaopt.experiments import maml_transfer
from metaopt.tasks.backbone import save_params
from metaopt.tasks.models import Conv4

# task_lr equal to the one fine-tuning LR: one compiled evaluator instead of two (~4 s).
TINY = dataclasses.replace(
    maml_transfer.quick_config(0), image_size=8, filters=4, meta_iterations=4, inner_steps=1,
    finetune_steps=2, episodes=12, val_every=2, val_episodes=4, pretrain_steps=4,
    finetune_lrs=(0.1,), task_lr=0.1, meta_batch=2, num_query=3)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("maml")
  return out, maml_transfer.run(TINY, out, progress=False).data


def test_report_has_every_method_with_confidence_intervals(tiny_run):
  out, result = tiny_run
  methods = [r["method"] for r in result["results"]]
  assert methods == ["MAML", "random init", "joint pre-training", "MAML, tuned LR",
                     "random init, tuned LR", "joint pre-training, tuned LR"]
  for row in result["results"]:
    assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["macro-F1"] <= 1.0
    assert np.isfinite(row["accuracy ±95%"]) and row["accuracy ±95%"] > 0
  assert len(result["per_episode"]["MAML"]["accuracy"]) == TINY.episodes
  assert [s for s, _ in result["meta_validation"]["val"]] == [2, 4]
  assert result["data"]["meta_test"]["datasets"] == ["digits"]
  for name in ("report.md", "results.json", "adaptation.png", "meta_validation.png"):
    assert (out / name).exists()
  assert "| MAML |" in (out / "report.md").read_text()


def test_rerun_resumes_meta_training_from_the_checkpoint(tiny_run, capsys):
  out, first = tiny_run
  again = maml_transfer.run(TINY, out, progress=False).data
  assert "resumed meta-training MAML at step 4" in capsys.readouterr().out
  assert again["meta_validation"]["val"] == first["meta_validation"]["val"]
  assert again["results"][0]["accuracy"] == first["results"][0]["accuracy"]


def test_backbone_checkpoint_is_loaded_and_mismatch_is_named(tmp_path):
  model = Conv4(num_classes=5, filters=TINY.filters)
  params = model.init(jax.random.key(7), jnp.zeros((1, 8, 8, 1)))["params"]
  path = save_params(tmp_path / "backbone.msgpack", {"params": params})
  config = dataclasses.replace(TINY, backbone=str(path))
  dummy = jnp.zeros((1, 8, 8, 1))
  loaded = maml_transfer.initial_params(config, model, jax.random.key(0), dummy)
  fresh = maml_transfer.initial_params(TINY, model, jax.random.key(0), dummy)
  np.testing.assert_array_equal(loaded["Conv_0"]["kernel"], params["Conv_0"]["kernel"])
  np.testing.assert_array_equal(loaded["bn3_scale"], params["bn3_scale"])
  np.testing.assert_array_equal(loaded["Dense_0"]["kernel"], fresh["Dense_0"]["kernel"])
  assert not np.allclose(fresh["Conv_0"]["kernel"], params["Conv_0"]["kernel"])
  wrong = Conv4(num_classes=5, filters=TINY.filters + 2)
  bad = save_params(tmp_path / "bad.msgpack",
                    {"params": wrong.init(jax.random.key(0), dummy)["params"]})
  with pytest.raises(ValueError, match=r"Conv_0/kernel.*\(3, 3, 1, [46]\).*\(3, 3, 1, [46]\)"):
    maml_transfer.initial_params(dataclasses.replace(config, backbone=str(bad)), model,
                                 jax.random.key(0), dummy)


def test_cli_rejects_flags_of_other_experiments(capsys, tmp_path):
  out = tmp_path / "runs"
  # lr-schedule has a data_dir field now, but no backbone.
  assert cli.main(["run", "lr-schedule", "--out", str(out), "--backbone", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1
  assert "--backbone: experiment 'lr-schedule' has no config field 'backbone'" in err
  assert cli.main(["run", "maml-transfer", "--out", str(out),
                   "--backbone", str(tmp_path / "none.msgpack")]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert cli.main(["run", "maml-transfer", "--out", str(out), "--store", str(tmp_path / "s")]) == 2
  assert "has no config field 'store'" in capsys.readouterr().err
  assert not out.exists()  # no run folder for a failed start


def test_bad_config_names_the_value(tmp_path):
  with pytest.raises(ValueError, match="n_way=30 exceeds the 28 classes"):
    maml_transfer.run(dataclasses.replace(TINY, n_way=30), tmp_path, progress=False)


# The tfds transfer pools (the plan's datasets on mock data) feed a whole run in
# tests/test_plan_configs.py::test_maml_transfer_plan_runs_end_to_end_on_mock_data.


def test_data_dir_without_the_data_extra_names_the_extra_before_any_work(tmp_path, capsys,
                                                                         monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "grain" else real(name, *a))
  out = tmp_path / "runs"
  assert cli.main(["run", "maml-transfer", "--out", str(out), "--data-dir", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert 'pip install "metaopt[data]"' in err and "missing: grain" in err
  assert err.count("\n") == 1 and not out.exists()
