"""The hparam-prediction experiment end to end on a tiny configuration, and the
`metaopt hparams fit|suggest` commands."""

import dataclasses
import json
import math

import numpy as np
import pytest

from metaopt import cli
from metaopt.experiments import hparam_prediction as hp
from metaopt.hparams import DEFAULT_SPACE, RunStore, Space
from metaopt.hparams.search import CachedObjective, Outcome, random_search, tpe_search


def tiny_config():
  space = tuple(dict(p) for p in hp.QUICK_SPACE)
  return dataclasses.replace(hp.quick_config(0), datasets=("iris", "wine"), trials_per_task=4,
                             epochs=1, budgets=(1, 2), seeds=1, top_k=2, predictor_steps=50,
                             predictor_ensemble=2, predictor_hidden=(8,), space=space)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("hp")
  config = tiny_config()
  return config, out, hp.run(config, out, progress=False).data


def test_tiny_experiment_end_to_end(tiny_run):
  config, out, result = tiny_run
  text = (out / "report.md").read_text()
  for heading in ("## Targets", "## Mean normalized regret", "## Per held-out dataset",
                  "## Trials to come within 1%", "## Compute saved", "## Predicted configurations"):
    assert heading in text
  assert "| iris |" in text and "| wine |" in text
  assert (out / "regret.png").stat().st_size > 1000
  assert (out / "regret_per_dataset.png").stat().st_size > 1000
  saved = json.loads((out / "results.json").read_text())
  assert [d["dataset"] for d in saved["datasets"]] == ["iris", "wine"]
  space = Space.from_json(list(config.space))
  with RunStore(out / "store.sqlite") as store:
    assert len(store) == 8     # the sweep: 4 runs per dataset
  for d in result["datasets"]:
    assert d["n_train_runs"] == 4 and d["n_stored"] == 4   # only the other dataset's runs
    scores = [t["value"] for ts in d["trials"].values() for tr in ts for t in tr
              if t["status"] == "completed"]
    assert d["best"] >= max(scores) and d["best"] >= d["top1_score"]
    expected = (d["best"] - d["top1_score"]) / max(d["best"] - d["median"], 1e-12)
    assert math.isclose(d["regret"]["predicted"][1][0], expected, rel_tol=1e-6)
    assert all(r >= -1e-9 for m in hp.METHODS for b in config.budgets
               for r in d["regret"][m][b])
    # warm-started TPE first tries the predicted configurations, in order
    top = [s["hparams"] for s in d["suggestions"]]
    warm = [t["hparams"] for t in d["trials"]["tpe_warm"][0]]
    assert warm == top[:len(warm)]
    assert [t["source"] for t in d["trials"]["tpe_warm"][0]] == ["predictor", "predictor"]
    for h in top:
      space.validate(h)
    assert 0 <= d["distance"] <= math.sqrt(space.dim)
  s = result["summary"]
  assert s["datasets"] == 2 and 0 <= s["top1_beats_random10"] <= 2
  assert not s["target1_passed"]       # budgets without 10 cannot pass the 10-trial targets
  assert "| top-1 prediction beats random search" in text and "FAIL" in text


def test_tiny_experiment_resumes_without_retraining(tiny_run, monkeypatch):
  config, out, result = tiny_run
  def boom(*a, **k):
    raise AssertionError("a finished dataset was evaluated again")
  monkeypatch.setattr(hp, "evaluate_dataset", boom)
  again = hp.run(config, out, progress=False).data
  assert json.dumps(again["summary"]) == json.dumps(result["summary"])


def test_searches_on_a_known_objective():
  calls = []
  def objective(configs):
    calls.extend(configs)
    return [Outcome(-(math.log10(c["learning_rate"]) + 2) ** 2) for c in configs]
  cached = CachedObjective(objective)
  r1 = random_search(cached, DEFAULT_SPACE, 5, seed=1)
  assert random_search(cached, DEFAULT_SPACE, 5, seed=1) == r1
  assert len(calls) == 5                              # the cache trained each config once
  t = tpe_search(cached, DEFAULT_SPACE, 15, seed=0, n_startup_trials=5)
  best = max(x.outcome.value for x in t)
  assert best > max(x.outcome.value for x in t[:5])  # TPE improves on its random start
  warm = tpe_search(cached, DEFAULT_SPACE, 3, seed=0,
                    warm_start=[{"learning_rate": 1e-2, "batch_size": 32, "layers": 2,
                                 "dropout": 0.2}])
  assert warm[0].hparams["learning_rate"] == 1e-2 and warm[0].outcome.value == 0.0
  with pytest.raises(ValueError, match="budget must be an integer >= 1"):
    random_search(cached, DEFAULT_SPACE, 0)
  with pytest.raises(ValueError, match="outside the range"):
    tpe_search(cached, DEFAULT_SPACE, 2, warm_start=[{"learning_rate": 1.0, "batch_size": 32,
                                                       "layers": 2, "dropout": 0.2}])


# ------------------------------------------------------------------------------ the CLI

@pytest.fixture(scope="module")
def tiny_predictor(tmp_path_factory):
  """A store of synthetic runs with the real meta-features of two datasets, a
  predictor fitted by `metaopt hparams fit`."""
  from metaopt.hparams.features import task_features
  from metaopt.tasks.data import load_dataset
  tmp = tmp_path_factory.mktemp("cli")
  rng = np.random.default_rng(0)
  with RunStore(tmp / "runs.sqlite") as store:
    for d in ("iris", "wine"):
      f = task_features(load_dataset(d), model_family="mlp", epochs=5)
      for _ in range(12):
        h = DEFAULT_SPACE.sample(rng)
        store.add(d, task_features=f, hparams=h,
                  metrics={"val_accuracy": 1 - abs(math.log10(h["learning_rate"]) + 2.5) / 4})
  assert cli.main(["hparams", "fit", "--store", str(tmp / "runs.sqlite"),
                   "--out", str(tmp / "pred"), "--steps", "50"]) == 0
  return tmp


def test_cli_suggest(tiny_predictor, capsys):
  capsys.readouterr()
  # breast_cancer's meta-features lie far outside the two stored tasks': refused...
  assert cli.main(["hparams", "suggest", "--predictor", str(tiny_predictor / "pred"),
                   "--dataset", "breast_cancer", "--model", "mlp"]) == 2
  assert "--extrapolate" in capsys.readouterr().err
  # ... unless asked for, with an uncertainty that says so.
  assert cli.main(["hparams", "suggest", "--predictor", str(tiny_predictor / "pred"),
                   "--dataset", "breast_cancer", "--model", "mlp", "-k", "2", "--json",
                   "--extrapolate"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert len(out) == 2 and out[0]["predicted"] >= out[1]["predicted"]
  for s in out:
    assert set(s) == {"hparams", "predicted", "uncertainty"}
    assert set(s["hparams"]) == set(DEFAULT_SPACE.names)
  # the same task through a features file, as text
  from metaopt.hparams.features import task_features
  from metaopt.tasks.data import load_dataset
  f = task_features(load_dataset("breast_cancer"), model_family="mlp", epochs=5)
  (tiny_predictor / "f.json").write_text(json.dumps(f))
  assert cli.main(["hparams", "suggest", "--predictor", str(tiny_predictor / "pred"),
                   "--features", str(tiny_predictor / "f.json"), "-k", "2",
                   "--extrapolate"]) == 0
  text = capsys.readouterr().out
  assert text.startswith("1. ") and "learning_rate=" in text and "\n2. " in text


def test_cli_errors_are_one_line(tiny_predictor, capsys):
  pred = str(tiny_predictor / "pred")
  (tiny_predictor / "partial.json").write_text(json.dumps({"n_train": 100.0}))
  cases = [
      (["--features", str(tiny_predictor / "partial.json")], "meta-features missing"),
      (["--dataset", "iris"], "--dataset needs --model"),
      (["--dataset", "nope", "--model", "mlp"], "unknown dataset 'nope'"),
      ([], "either --features FILE or --dataset"),
      (["--features", str(tiny_predictor / "missing.json")], "no features file"),
  ]
  for extra, message in cases:
    capsys.readouterr()
    assert cli.main(["hparams", "suggest", "--predictor", pred] + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("metaopt: error:") and message in err and err.count("\n") == 1, err
  assert cli.main(["hparams", "suggest", "--predictor", str(tiny_predictor / "none"),
                   "--dataset", "iris", "--model", "mlp"]) == 2
  assert "no saved predictor" in capsys.readouterr().err
