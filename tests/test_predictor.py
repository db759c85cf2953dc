"""The hyperparameter predictor: recovers a known optimum, round trips, errors."""

import json
import math

import jax
import numpy as np
import pytest

from metaopt.hparams import Param, Predictor, RunStore, Space
from metaopt.hparams.predictor import task_quantiles

SPACE = Space([Param("learning_rate", "float", 1e-5, 1e-1, log=True),
               Param("batch_size", "categorical", choices=(16, 32, 64, 128))])
TRAIN_F = np.linspace(0.0, 1.0, 9)   # held-out values below are not among them
HELD_OUT_F = (0.2, 0.55, 0.8)


def best_log_lr(f):
  return -4.0 + 2.0 * f


def synthetic_rows(seed=0, runs_per_task=40):
  """Tasks whose best log10 LR is -4 + 2 f; batch size does not matter; LRs far
  above the optimum diverge (metric NaN, status "diverged")."""
  rng = np.random.default_rng(seed)
  rows = []
  for t, f in enumerate(TRAIN_F):
    scale = rng.uniform(0.5, 2.0)     # tasks differ in metric scale and offset
    offset = rng.uniform(-1, 1)
    for _ in range(runs_per_task):
      h = SPACE.sample(rng)
      gap = math.log10(h["learning_rate"]) - best_log_lr(f)
      if gap > 2.2:
        rows.append(dict(task=f"task{t}", task_features={"f": f, "other": float(t % 3)},
                         hparams=h, metrics={"score": float("nan")}, status="diverged"))
        continue
      m = offset - scale * gap ** 2 + 0.05 * rng.normal()
      rows.append(dict(task=f"task{t}", task_features={"f": f, "other": float(t % 3)},
                       hparams=h, metrics={"score": m}, status="completed"))
  return rows


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  s = RunStore(tmp_path_factory.mktemp("store") / "runs.sqlite")
  s.add_many(synthetic_rows())
  yield s
  s.close()


@pytest.fixture(scope="module")
def predictor(store):
  return Predictor.fit(store, metric="score", mode="max", seed=0, steps=400, hidden=(32, 32))


def test_recovers_the_optimum_on_held_out_tasks(predictor):
  inferred = SPACE.infer([r["hparams"] for r in synthetic_rows()])
  assert sorted(predictor.space.params) == sorted(inferred.params)   # inferred from the store
  assert predictor.space["learning_rate"].log
  for f in HELD_OUT_F:
    top = predictor.suggest({"f": f, "other": 1.0}, k=3)
    assert len(top) == 3
    lr = top[0]["hparams"]["learning_rate"]
    assert abs(math.log10(lr) - best_log_lr(f)) < 0.35, (f, lr)
    preds = [s["predicted"] for s in top]
    assert preds == sorted(preds, reverse=True)
    assert all(s["uncertainty"] >= 0 for s in top)
    configs = [s["hparams"] for s in top]
    assert all(configs[i] != configs[j] for i in range(3) for j in range(i))
    for c in configs:
      predictor.space.validate(c)
  # the prediction follows the feature: a low-f task gets a much lower LR
  low = predictor.suggest({"f": 0.1, "other": 0.0})[0]["hparams"]["learning_rate"]
  high = predictor.suggest({"f": 0.9, "other": 0.0})[0]["hparams"]["learning_rate"]
  assert math.log10(high) - math.log10(low) > 1.0


def test_predicted_ranking_and_determinism(predictor):
  f = {"f": 0.55, "other": 2.0}
  good = {"learning_rate": 10 ** best_log_lr(0.55), "batch_size": 32}
  bad = {"learning_rate": 2e-5, "batch_size": 32}
  p = predictor.predict(f, [good, bad])
  assert p["predicted"][0] > p["predicted"][1] + 0.3
  assert predictor.suggest(f, k=2, seed=3) == predictor.suggest(f, k=2, seed=3)


def test_save_load_round_trip(predictor, tmp_path):
  predictor.save(tmp_path / "p")
  meta = json.loads((tmp_path / "p" / "predictor.json").read_text())
  assert meta["metric"] == "score" and meta["features"]["names"] == ["f", "other"]
  back = Predictor.load(tmp_path / "p")
  assert back.space == predictor.space and back.hidden == predictor.hidden
  assert (back.metric, back.mode) == ("score", "max")
  for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(predictor.params)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(back.features.mean, predictor.features.mean)
  f = {"f": 0.3, "other": 0.0}
  assert back.suggest(f, k=3) == predictor.suggest(f, k=3)


def test_failed_runs_rank_worst():
  q = task_quantiles(np.array([0.5, 0.9, 0.1, 0.7]), np.array([True, True, False, False]))
  np.testing.assert_allclose(q, [0.625, 0.875, 0.25, 0.25])   # failed: tied at the bottom
  q = task_quantiles(np.array([3.0, 1.0, 2.0]), np.ones(3, bool))
  np.testing.assert_allclose(q, [5 / 6, 1 / 6, 0.5])


def test_fit_errors(store):
  rows = synthetic_rows()[:30]
  with pytest.raises(ValueError, match="no runs"):
    Predictor.fit([], metric="score")
  with pytest.raises(ValueError, match=r"metric 'val_accuracy' is in none of the 30 runs; "
                                       r"stored metrics: score"):
    Predictor.fit(rows)
  with pytest.raises(ValueError, match="unknown mode 'maximize'"):
    Predictor.fit(rows, metric="score", mode="maximize")
  bad = [dict(r) for r in rows] + [dict(rows[0], task="other_task", task_features={"f": 0.5})]
  with pytest.raises(ValueError, match="meta-features missing for task 'other_task': other"):
    Predictor.fit(bad, metric="score")
  narrow = Space([Param("learning_rate", "float", 1e-4, 1e-2, log=True),
                  Param("batch_size", "categorical", choices=(16, 32, 64, 128))])
  with pytest.raises(ValueError, match=r"task 'task0'.*learning_rate.*outside the range"):
    Predictor.fit(rows, metric="score", space=narrow)
  other = Space([Param("lr", "float", 1e-5, 1e-1, log=True)])
  with pytest.raises(ValueError, match="unknown hyperparameter 'learning_rate'"):
    Predictor.fit(rows, metric="score", space=other)


def test_suggest_and_load_errors(predictor, tmp_path):
  with pytest.raises(ValueError, match=r"meta-features missing for the task: other"):
    predictor.suggest({"f": 0.5})
  with pytest.raises(ValueError, match="'f'.*finite number"):
    predictor.suggest({"f": float("nan"), "other": 1.0})
  with pytest.raises(ValueError, match="k must be an integer >= 1"):
    predictor.suggest({"f": 0.5, "other": 1.0}, k=0)
  with pytest.raises(ValueError, match="unknown hyperparameter 'momentum'"):
    predictor.predict({"f": 0.5, "other": 1.0},
                      {"learning_rate": 1e-3, "batch_size": 32, "momentum": 0.9})
  with pytest.raises(ValueError, match=r"value 0.5 is outside the range"):
    predictor.predict({"f": 0.5, "other": 1.0}, {"learning_rate": 0.5, "batch_size": 32})
  with pytest.raises(FileNotFoundError, match="no saved predictor"):
    Predictor.load(tmp_path / "missing")
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "predictor.json").write_text('{"format": "something else"}')
  (tmp_path / "bad" / "predictor.msgpack").write_bytes(b"")
  with pytest.raises(ValueError, match="not a saved metaopt predictor"):
    Predictor.load(tmp_path / "bad")
  predictor.save(tmp_path / "corrupt")
  (tmp_path / "corrupt" / "predictor.msgpack").write_bytes(b"\x00garbage")
  with pytest.raises(ValueError, match="not a readable predictor weights file"):
    Predictor.load(tmp_path / "corrupt")
