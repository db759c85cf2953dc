"""The hyperparameter predictor: recovers a known optimum, round trips, errors,
refuses tasks it knows nothing about."""

import json
import math

import flax.serialization
import jax
import numpy as np
import pytest

from metaopt.hparams import Param, Predictor, RunStore, Space
from metaopt.hparams import predictor as P
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
  with pytest.raises(ValueError, match=r"k must be an integer in \[1, 1000\], got 0"):
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


def raw_std(predictor, features, hparams):
  """The ensemble's own spread, before any inflation for extrapolation."""
  f = predictor.feature_vector(features)
  u = np.stack([predictor.space.encode(h) for h in hparams]).astype(np.float32)
  return np.asarray(P._score(predictor._net, predictor.params, f, u)[1])


def test_tasks_far_outside_the_fitted_range_are_refused_or_flagged(predictor):
  h = [{"learning_rate": 1e-3, "batch_size": 32}]
  # Fitted on f in [0, 1] and other in [0, 2]: up to one range width beyond is accepted.
  assert predictor.extrapolation({"f": 0.5, "other": 1.0}) == 0.0
  assert predictor.extrapolation({"f": 1.5, "other": 1.0}) == pytest.approx(0.5)
  assert predictor.extrapolation({"f": 0.5, "other": -3.0}) == pytest.approx(1.5)
  for method in (lambda f, **kw: predictor.suggest(f, **kw),
                 lambda f, **kw: predictor.predict(f, h, **kw)):
    with pytest.raises(ValueError, match=r"meta-feature 'f' of the task is 2\.5, far outside what "
                                         r"the predictor knows \(the fitted range is \[0, 1\]\); "
                                         r".*pass extrapolate=True"):
      method({"f": 2.5, "other": 1.0})
    with pytest.raises(ValueError, match=r"'other' of the task is -3, .*\[0, 2\]"):
      method({"f": 0.5, "other": -3.0})
  inside = predictor.predict({"f": 0.5, "other": 1.0}, h)["uncertainty"]
  np.testing.assert_allclose(inside, raw_std(predictor, {"f": 0.5, "other": 1.0}, h))
  # Outside, the uncertainty moves towards that of a uniform quantile by r / (1 + r).
  for f, r in ((1.5, 0.5), (2.5, 1.5), (1e6, 1e6 - 1)):
    task = {"f": f, "other": 1.0}
    s = raw_std(predictor, task, h)
    got = predictor.predict(task, h, extrapolate=True)["uncertainty"]
    np.testing.assert_allclose(got, s + (P.UNKNOWN_STD - s) * r / (1 + r), rtol=1e-5)
  top = predictor.suggest({"f": 2.5, "other": 1.0}, k=2, extrapolate=True)
  assert len(top) == 2 and all(t["uncertainty"] > 0.6 * P.UNKNOWN_STD for t in top)
  near = predictor.suggest({"f": 0.9, "other": 1.0}, k=2)
  assert all(t["uncertainty"] < 0.6 * P.UNKNOWN_STD for t in near)


@pytest.fixture(scope="module")
def sized_predictor():
  """A tiny predictor over features with a domain: n_train, epochs (always 5 here)."""
  rng = np.random.default_rng(1)
  rows = []
  for t, n in enumerate((100, 1000, 10000)):
    for _ in range(10):
      h = SPACE.sample(rng)
      rows.append(dict(task=f"t{t}", task_features={"n_train": float(n), "epochs": 5.0},
                       hparams=h, metrics={"score": -abs(math.log10(h["learning_rate"]) + 3)},
                       status="completed"))
  return P.Predictor.fit(rows, metric="score", steps=20, ensemble=2, hidden=(8,))


def test_impossible_and_unknown_task_values(sized_predictor):
  ok = {"n_train": 500.0, "epochs": 5.0}
  assert len(sized_predictor.suggest(ok)) == 1
  for bad, message in (({"n_train": -5.0}, r"'n_train' of the task must be a finite number in "
                                           r"\(0, inf\), got -5"),
                       ({"epochs": 0.0}, r"'epochs' of the task must be a finite number in "
                                         r"\(0, inf\), got 0"),
                       ({"epochs": math.inf}, r"'epochs' of the task must be a finite number"),
                       ({"n_train": math.nan}, r"'n_train' of the task must be a finite number")):
    for extrapolate in (False, True):   # refused outright
      with pytest.raises(ValueError, match=message):
        sized_predictor.suggest({**ok, **bad}, extrapolate=extrapolate)
  # epochs was 5 in every fitted task: any other value is unknown territory.
  with pytest.raises(ValueError, match=r"'epochs' of the task is 1e\+308, far outside what the "
                                       r"predictor knows \(the predictor was fitted on epochs = 5 "
                                       r"only\)"):
    sized_predictor.suggest({**ok, "epochs": 1e308})
  far = sized_predictor.predict({**ok, "epochs": 6.0}, {"learning_rate": 1e-3, "batch_size": 32},
                                extrapolate=True)
  assert far["uncertainty"][0] == pytest.approx(P.UNKNOWN_STD)
  # n_train is log-scaled (it spans two decades): its range is judged in decades.
  assert sized_predictor.extrapolation({**ok, "n_train": 1e5}) == pytest.approx(0.5)
  with pytest.raises(ValueError, match=r"'n_train' of the task is 1e\+07, .*\[100, 10000\]"):
    sized_predictor.suggest({**ok, "n_train": 1e7})


def test_fit_refuses_stores_without_a_usable_run():
  rows = synthetic_rows()[:30]
  nan = [dict(r, metrics={"score": math.nan}) for r in rows]
  with pytest.raises(ValueError, match=r"none of the 30 runs completed with a finite 'score' "
                                       r"\(\d+ did not complete, 30 have no finite value\): "
                                       r"nothing to fit"):
    Predictor.fit(nan, metric="score")
  failed = [dict(r, metrics={"score": 1.0}, status="failed") for r in rows]
  with pytest.raises(ValueError, match=r"none of the 30 runs .*\(30 did not complete, "
                                       r"0 have no finite value\)"):
    Predictor.fit(failed, metric="score")


def test_work_is_bounded(predictor):
  f = {"f": 0.5, "other": 1.0}
  with pytest.raises(ValueError,
                     match=r"steps must be an integer in \[1, 1000000\], got 1099511627776"):
    Predictor.fit(synthetic_rows()[:30], metric="score", steps=2 ** 40)
  with pytest.raises(ValueError, match=r"k must be an integer in \[1, 1000\], got 100000"):
    predictor.suggest(f, k=100_000)
  with pytest.raises(ValueError, match=r"candidates must be an integer in \[1, 100000\]"):
    predictor.suggest(f, candidates=10 ** 7)
  with pytest.raises(ValueError, match=r"refine must be an integer in \[0, 20\]"):
    predictor.suggest(f, refine=10 ** 9)
  top = predictor.suggest(f, k=300, candidates=256, refine=1)
  assert len(top) == 300 and len({json.dumps(t["hparams"], sort_keys=True) for t in top}) == 300


def test_load_names_a_missing_key(predictor, tmp_path):
  for path, source in (("features.low", "predictor.json"), ("metric", "predictor.json"),
                       ("anchors", "predictor.msgpack")):
    folder = predictor.save(tmp_path / path)
    meta = json.loads((folder / "predictor.json").read_text())
    if source == "predictor.json":
      *parents, last = path.split(".")
      tree = meta
      for key in parents:
        tree = tree[key]
      del tree[last]
      (folder / "predictor.json").write_text(json.dumps(meta))
    else:
      state = flax.serialization.msgpack_restore((folder / source).read_bytes())
      del state[path]
      (folder / source).write_bytes(flax.serialization.msgpack_serialize(state))
    with pytest.raises(ValueError, match=rf"{source} lacks the key '{path}'"):
      Predictor.load(folder)
  meta = json.loads((folder / "predictor.json").read_text())
  (folder / "predictor.json").write_text(json.dumps(dict(meta, version=1)))
  with pytest.raises(ValueError, match="format version 1; this metaopt reads version 2"):
    Predictor.load(folder)
