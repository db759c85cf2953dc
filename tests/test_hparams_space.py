"""Search spaces: validation, sampling, encoding, JSON and inference."""

import json
import math

import numpy as np
import pytest

from metaopt.hparams import DEFAULT_SPACE, Param, Space


def test_default_space_matches_the_issue():
  s = DEFAULT_SPACE
  assert s.names == ("learning_rate", "batch_size", "layers", "dropout")
  lr = s["learning_rate"]
  assert (lr.kind, lr.low, lr.high, lr.log) == ("float", 1e-5, 1e-1, True)
  assert s["batch_size"].choices == (16, 32, 64, 128)
  assert (s["layers"].kind, s["layers"].low, s["layers"].high) == ("int", 2, 5)
  assert (s["dropout"].low, s["dropout"].high, s["dropout"].log) == (0.1, 0.5, False)


def test_sample_types_ranges_and_uniformity():
  rng = np.random.default_rng(0)
  xs = [DEFAULT_SPACE.sample(rng) for _ in range(4000)]
  assert all(type(x["layers"]) is int and type(x["batch_size"]) is int for x in xs)
  assert all(type(x["learning_rate"]) is float for x in xs)
  for name, choices in (("layers", (2, 3, 4, 5)), ("batch_size", (16, 32, 64, 128))):
    counts = np.array([sum(x[name] == c for x in xs) for c in choices])
    assert counts.min() > 850, (name, counts)   # each ~1000: uniform, endpoints included
  logs = np.log10([x["learning_rate"] for x in xs])
  assert logs.min() >= -5 and logs.max() <= -1
  # log-uniform: each decade gets about a quarter of the draws
  hist, _ = np.histogram(logs, bins=[-5, -4, -3, -2, -1])
  assert hist.min() > 850, hist
  d = np.array([x["dropout"] for x in xs])
  assert 0.1 <= d.min() and d.max() <= 0.5
  # seeded
  assert DEFAULT_SPACE.sample(np.random.default_rng(3)) == DEFAULT_SPACE.sample(np.random.default_rng(3))


def test_categories_keep_their_type():
  s = Space([Param("act", "categorical", choices=("relu", "tanh")),
             Param("bn", "categorical", choices=(True, False)),
             Param("w", "categorical", choices=(0.5, 1))])
  rng = np.random.default_rng(1)
  for _ in range(50):
    h = s.sample(rng)
    assert h["act"] in ("relu", "tanh") and isinstance(h["bn"], bool)
    assert s.decode(s.encode(h)) == h
  # 1 is not the same category as True, nor "1" as 1
  with pytest.raises(ValueError, match="not one of the choices"):
    s.validate({"act": "relu", "bn": 1, "w": 1})
  assert s.validate({"act": "relu", "bn": True, "w": 1.0})["w"] == 1


def test_encode_decode_round_trip_and_scale():
  s = DEFAULT_SPACE
  rng = np.random.default_rng(2)
  for _ in range(300):
    h = s.sample(rng)
    v = s.encode(h)
    assert v.shape == (4,) and np.all((0 <= v) & (v <= 1))
    back = s.decode(v)
    assert back["batch_size"] == h["batch_size"] and back["layers"] == h["layers"]
    assert math.isclose(back["learning_rate"], h["learning_rate"], rel_tol=1e-12)
    assert math.isclose(back["dropout"], h["dropout"], rel_tol=1e-12)
  v = s.encode({"learning_rate": 1e-3, "batch_size": 128, "layers": 2, "dropout": 0.3})
  np.testing.assert_allclose(v, [0.5, 1.0, 0.0, 0.5], atol=1e-12)  # log scale: 1e-3 is the middle
  # decode clips and snaps
  h = s.decode([-1.0, 0.3, 2.0, 0.0])
  assert h == {"learning_rate": 1e-5, "batch_size": 32, "layers": 5, "dropout": 0.1}
  with pytest.raises(ValueError, match="shape"):
    s.decode([0.5, 0.5])


def test_validate_errors_name_the_problem():
  s = DEFAULT_SPACE
  good = {"learning_rate": 1e-3, "batch_size": 32, "layers": 3, "dropout": 0.2}
  assert s.validate(good) == good
  with pytest.raises(ValueError, match=r"unknown hyperparameter 'momentum'.*accepted: learning_rate"):
    s.validate({**good, "momentum": 0.9})
  with pytest.raises(ValueError, match=r"'learning_rate'.*value 0.5 is outside the range \[1e-05, 0.1\]"):
    s.validate({**good, "learning_rate": 0.5})
  with pytest.raises(ValueError, match=r"'layers'.*7.*outside"):
    s.validate({**good, "layers": 7})
  with pytest.raises(ValueError, match=r"'layers'.*2.5.*not an integer"):
    s.validate({**good, "layers": 2.5})
  with pytest.raises(ValueError, match=r"'batch_size'.*48.*choices"):
    s.validate({**good, "batch_size": 48})
  with pytest.raises(ValueError, match=r"missing hyperparameter 'dropout'"):
    s.validate({k: v for k, v in good.items() if k != "dropout"})
  with pytest.raises(ValueError, match="finite"):
    s.validate({**good, "dropout": float("nan")})
  assert type(s.validate({**good, "layers": 3.0})["layers"]) is int


def test_json_round_trip_and_bad_specs():
  text = json.dumps(DEFAULT_SPACE.to_json())
  assert Space.from_json(json.loads(text)) == DEFAULT_SPACE
  assert json.loads(text)[0] == {"name": "learning_rate", "type": "float", "low": 1e-5,
                                 "high": 0.1, "log": True}
  bad = [
      ([{"name": "x", "type": "complex", "low": 0, "high": 1}], "unknown type 'complex'"),
      ([{"name": "x", "type": "float", "low": 1, "high": 0}], "low < high"),
      ([{"name": "x", "type": "float", "low": 0, "high": 1, "log": True}], "low > 0"),
      ([{"name": "x", "type": "float", "high": 1}], "needs 'low'"),
      ([{"name": "x", "type": "categorical", "choices": []}], "non-empty list of choices"),
      ([{"name": "x", "type": "categorical", "choices": [1, 1]}], "duplicate choice"),
      ([{"name": "x", "type": "int", "low": 0.5, "high": 3}], "must be integers"),
      ([{"type": "float", "low": 0, "high": 1}], "has no 'name'"),
      ([{"name": "x", "type": "float", "low": 0, "high": 1, "step": 2}], "unknown keys"),
      ([{"name": "x", "type": "float", "low": 0, "high": 1}] * 2, "duplicate parameter names: x"),
      ({"name": "x"}, "JSON list"),
      ([], "at least one parameter"),
  ]
  for spec, message in bad:
    with pytest.raises(ValueError, match=message):
      Space.from_json(spec)


def test_infer_from_past_runs():
  rng = np.random.default_rng(4)
  runs = [dict(DEFAULT_SPACE.sample(rng), optimizer=str(rng.choice(["adam", "sgd"])),
               nesterov=bool(rng.integers(2)), width=int(rng.integers(8, 65)),
               momentum=float(rng.uniform(0.8, 0.99)), seed_fixed=7)
          for _ in range(300)]
  s = Space.infer(runs)
  lr = s["learning_rate"]
  assert lr.kind == "float" and lr.log and 1e-5 <= lr.low < 2e-5 and 0.08 < lr.high <= 0.1
  assert s["batch_size"] == Param("batch_size", "categorical", choices=(16, 32, 64, 128))
  assert s["layers"] == Param("layers", "int", 2, 5, False)
  assert s["width"].kind == "int" and not s["width"].log
  assert s["dropout"].kind == "float" and not s["dropout"].log
  assert not s["momentum"].log            # positive but within one decade
  assert s["optimizer"].choices == ("adam", "sgd")
  assert s["nesterov"].choices == (False, True)
  assert s["seed_fixed"].choices == (7,)
  for h in runs:
    s.validate(h)
  with pytest.raises(ValueError, match="different hyperparameter names.*dropout"):
    Space.infer([{"learning_rate": 0.1, "dropout": 0.1}, {"learning_rate": 0.2}])
  with pytest.raises(ValueError, match="zero configurations"):
    Space.infer([])


def test_snap_is_the_encoding_of_the_decoded_point():
  space = Space([Param("lr", "float", 1e-5, 1e-1, log=True), Param("layers", "int", 2, 5),
                 Param("width", "int", 8, 512, log=True),
                 Param("batch", "categorical", choices=(16, 32, 64)),
                 Param("one", "categorical", choices=("only",))])
  u = np.random.default_rng(0).uniform(-0.2, 1.2, size=(500, space.dim))
  snapped = space.snap(u)
  expected = np.stack([space.encode(space.decode(row)) for row in u])
  np.testing.assert_allclose(snapped, expected, atol=1e-12)
  assert [space.decode(row) for row in snapped] == [space.decode(row) for row in u]
