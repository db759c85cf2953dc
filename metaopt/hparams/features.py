"""Meta-features of a task: named numbers describing its data, model and budget.

The predictor compares tasks through these numbers. ``task_features`` returns
the names in ``TASK_FEATURE_NAMES`` (plus ``log10_params``, ``depth`` and
``log10_steps`` when those are given). Sweeps leave those three out because
depth (``layers``) and steps (through ``batch_size``) are hyperparameters there;
each run's actual size is in its ``model`` record. Any dict of named numbers may
be used instead: the store takes whatever features it is given.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from typing import Optional

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from metaopt.tasks.data import Dataset
from metaopt.tasks.models import MODEL_KINDS
from metaopt.validation import check_choice, check_number

DATA_FEATURE_NAMES: tuple[str, ...] = (
    "n_train", "log10_n_train", "n_features", "log10_n_features", "n_classes",
    "log10_features_per_example", "class_entropy", "minority_fraction",
    "mean_abs", "std", "mean_abs_skew", "mean_kurtosis", "frac_at_min", "pca95_fraction",
    "majority_accuracy", "linear_probe_accuracy",
)
MODEL_FEATURE_NAMES: tuple[str, ...] = tuple(f"model_{f}" for f in MODEL_KINDS)
BUDGET_FEATURE_NAMES: tuple[str, ...] = ("epochs", "log10_epochs")
# What task_features always returns (and what sweeps record).
TASK_FEATURE_NAMES: tuple[str, ...] = DATA_FEATURE_NAMES + MODEL_FEATURE_NAMES + BUDGET_FEATURE_NAMES

# The values each feature can take at all, as (low, high, low_open): a predictor refuses
# others outright (n_train = -5 is no task), whatever its fitted range.
FEATURE_DOMAINS: dict[str, tuple[float | None, float | None, bool]] = {
    "n_train": (0.0, None, True), "n_features": (0.0, None, True), "n_classes": (1.0, None, False),
    "class_entropy": (0.0, 1.0, False), "minority_fraction": (0.0, 1.0, False),
    "mean_abs": (0.0, None, False), "std": (0.0, None, False),
    "mean_abs_skew": (0.0, None, False), "frac_at_min": (0.0, 1.0, False),
    "pca95_fraction": (0.0, 1.0, True), "majority_accuracy": (0.0, 1.0, False),
    "linear_probe_accuracy": (0.0, 1.0, False),
    **{name: (0.0, 1.0, False) for name in MODEL_FEATURE_NAMES},
    "epochs": (0.0, None, True), "depth": (1.0, None, False),
}

PROBE_SUBSAMPLE = 2000  # training examples the linear probe sees
STATS_SUBSAMPLE = 2000  # examples the input statistics are computed on


def _fingerprint(data: Dataset) -> str:
  h = hashlib.sha1()
  for a in (data.x_train, data.y_train, data.x_val, data.y_val):
    a = np.ascontiguousarray(a)
    h.update(str((a.shape, a.dtype.str)).encode())
    h.update(a.tobytes())
  return h.hexdigest()


def dataset_features(data: Dataset, *, seed: int = 0) -> dict[str, float]:
  """Data meta-features: sizes (and their log10), class balance, input statistics of the
  training split, and a linear probe's validation accuracy (a cheap landmark).

  Deterministic for a given dataset and ``seed`` (which picks the subsamples);
  cached by the arrays' content.
  """
  if not isinstance(data, Dataset):
    raise ValueError(f"dataset_features takes a metaopt Dataset, got {type(data).__name__}")
  key = (data.name, _fingerprint(data), int(seed))
  if key not in _CACHE:
    _CACHE[key] = _compute(data, int(seed))
  return dict(_CACHE[key])


_CACHE: dict[tuple, dict] = {}  # (name, content hash, seed) -> features


def _compute(data: Dataset, seed: int) -> dict[str, float]:
  rng = np.random.default_rng(seed)
  x = np.asarray(data.x_train, np.float64)
  y = np.asarray(data.y_train)
  n, d = x.shape
  c = int(data.num_classes)
  counts = np.bincount(y, minlength=c).astype(np.float64)
  p = counts / counts.sum()
  nz = p[p > 0]
  entropy = float(-(nz * np.log(nz)).sum() / math.log(c)) if c > 1 else 0.0

  sub = x[rng.permutation(n)[:STATS_SUBSAMPLE]]
  mean, std = sub.mean(0), sub.std(0)
  live = std > 1e-8
  z = (sub[:, live] - mean[live]) / std[live]
  skew = np.abs((z ** 3).mean(0)).mean() if live.any() else 0.0
  kurt = (z ** 4).mean(0).mean() - 3.0 if live.any() else 0.0
  at_min = float((sub == sub.min(0)).mean())
  sv = np.linalg.svd(sub - mean, compute_uv=False) ** 2
  explained = np.cumsum(sv) / max(sv.sum(), 1e-12)
  pca95 = (int(np.searchsorted(explained, 0.95)) + 1) / d

  majority = float((np.asarray(data.y_val) == int(np.argmax(counts))).mean())
  probe = _linear_probe(data, rng)
  return {
      "n_train": float(n), "log10_n_train": math.log10(n),
      "n_features": float(d), "log10_n_features": math.log10(d),
      "n_classes": float(c), "log10_features_per_example": math.log10(d / n),
      "class_entropy": entropy, "minority_fraction": float(p.min()),
      "mean_abs": float(np.abs(sub).mean()), "std": float(sub.std()),
      "mean_abs_skew": float(skew), "mean_kurtosis": float(kurt),
      "frac_at_min": at_min, "pca95_fraction": float(pca95),
      "majority_accuracy": majority, "linear_probe_accuracy": probe,
  }


def _linear_probe(data: Dataset, rng: np.random.Generator) -> float:
  """Validation accuracy of a logistic regression on a subsample of the training split."""
  idx = rng.permutation(len(data.y_train))[:PROBE_SUBSAMPLE]
  y = np.asarray(data.y_train)[idx]
  if len(np.unique(y)) < 2:
    return float((np.asarray(data.y_val) == y[0]).mean())
  model = LogisticRegression(max_iter=200)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    model.fit(np.asarray(data.x_train)[idx], y)
  return float(model.score(np.asarray(data.x_val), np.asarray(data.y_val)))


def model_features(family: str, n_params: Optional[int] = None,
                   depth: Optional[int] = None) -> dict[str, float]:
  """One-hot model family, plus ``log10_params`` and ``depth`` when given."""
  check_choice("model family", family, MODEL_KINDS)
  out = {f"model_{f}": float(f == family) for f in MODEL_KINDS}
  if n_params is not None:
    out["log10_params"] = math.log10(check_number("n_params", n_params, low=1))
  if depth is not None:
    out["depth"] = check_number("depth", depth, low=1)
  return out


def budget_features(epochs: float, steps: Optional[int] = None) -> dict[str, float]:
  """The training budget: epochs (and log10), plus ``log10_steps`` when given."""
  epochs = check_number("epochs", epochs, low=0, low_open=True)
  out = {"epochs": epochs, "log10_epochs": math.log10(epochs)}
  if steps is not None:
    out["log10_steps"] = math.log10(check_number("steps", steps, low=1))
  return out


def task_features(data: Dataset, *, model_family: str, epochs: float,
                  n_params: Optional[int] = None, depth: Optional[int] = None,
                  steps: Optional[int] = None, seed: int = 0) -> dict[str, float]:
  """Data, model and budget meta-features of one task, keyed as in ``TASK_FEATURE_NAMES``
  (plus ``log10_params``, ``depth``, ``log10_steps`` for the optional arguments).
  A cnn needs an image dataset (one with an ``image_shape``)."""
  check_choice("model family", model_family, MODEL_KINDS)
  if model_family == "cnn" and isinstance(data, Dataset) and data.image_shape is None:
    raise ValueError(f"model family 'cnn' needs an image dataset; {data.name!r} is tabular "
                     "(it has no image_shape)")
  return {**dataset_features(data, seed=seed), **model_features(model_family, n_params, depth),
          **budget_features(epochs, steps)}
