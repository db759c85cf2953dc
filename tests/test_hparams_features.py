"""Task meta-features: names, values that follow the data, determinism, caching, errors."""

import math

import numpy as np
import pytest

from metaopt.hparams import features as F
from metaopt.tasks import load_dataset
from metaopt.tasks.data import Dataset


def toy(n=200, d=6, classes=2, informative=True, seed=0, name="toy"):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, classes, size=n).astype(np.int32)
  x = rng.normal(size=(n, d)).astype(np.float32)
  if informative:
    x[:, 0] += 4.0 * y
  split = lambda a: (a[: n // 2], a[n // 2:])
  (xt, xv), (yt, yv) = split(x), split(y)
  return Dataset(name, xt, yt, xv, yv, xv, yv, classes, None)


def test_task_features_have_the_documented_names_and_sizes():
  data = load_dataset("iris")
  f = F.task_features(data, model_family="mlp", epochs=10)
  assert tuple(f) == F.TASK_FEATURE_NAMES
  assert f["n_train"] == len(data.y_train) == 90 and f["n_features"] == 4 and f["n_classes"] == 3
  assert f["log10_n_train"] == pytest.approx(math.log10(90))
  assert f["class_entropy"] == pytest.approx(1.0)  # stratified: balanced
  assert f["model_mlp"] == 1.0 and f["model_rnn"] == 0.0 and f["epochs"] == 10.0
  assert all(isinstance(v, float) and math.isfinite(v) for v in f.values())
  image = toy(d=4, name="image")._replace(image_shape=(2, 2, 1))
  full = F.task_features(image, model_family="cnn", epochs=5, n_params=1000, depth=3, steps=100)
  assert full["log10_params"] == pytest.approx(3.0) and full["depth"] == 3.0
  assert full["log10_steps"] == pytest.approx(2.0) and full["model_cnn"] == 1.0


def test_landmark_and_balance_follow_the_data():
  easy, noise = F.dataset_features(toy()), F.dataset_features(toy(informative=False, name="n"))
  assert easy["linear_probe_accuracy"] > 0.9 > 0.7 > noise["linear_probe_accuracy"]
  skewed = toy(classes=4)
  y = np.where(np.arange(100) < 90, 0, skewed.y_train % 4).astype(np.int32)
  f = F.dataset_features(skewed._replace(name="skewed", y_train=y))
  assert f["class_entropy"] < 0.5 and f["minority_fraction"] < 0.05


def test_deterministic_and_cached_by_content():
  a = F.dataset_features(toy(seed=3, name="same"))
  b = F.dataset_features(toy(seed=3, name="same"))
  assert a == b
  # Same name, different arrays: not served from the cache.
  c = F.dataset_features(toy(seed=4, name="same"))
  assert c["mean_abs"] != a["mean_abs"]
  a["n_train"] = -1.0  # callers get copies
  assert F.dataset_features(toy(seed=3, name="same"))["n_train"] == 100.0


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="unknown model family 'lstm'; accepted: mlp, cnn, rnn"):
    F.model_features("lstm")
  with pytest.raises(ValueError, match=r"epochs must be a finite number in \(0, inf\), got 0"):
    F.budget_features(0)
  with pytest.raises(ValueError, match=r"epochs must be a finite number in \(0, inf\), got inf"):
    F.budget_features(math.inf)
  with pytest.raises(ValueError, match=r"steps must be a finite number in \[1, inf\), got 0"):
    F.budget_features(5, steps=0)
  with pytest.raises(ValueError, match=r"model family 'cnn' needs an image dataset; 'iris' is "
                                       r"tabular \(it has no image_shape\)"):
    F.task_features(load_dataset("iris"), model_family="cnn", epochs=5)
  with pytest.raises(ValueError, match="takes a metaopt Dataset, got ndarray"):
    F.dataset_features(np.zeros((3, 3)))
