"""Tasks (data + Flax model + loss as pure functions) and families that sample them."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from metaopt.tasks.data import DATASETS, IMAGE_SHAPES, Dataset, load_dataset, num_train_examples
from metaopt.tasks.models import MODEL_KINDS, make_model
from metaopt.validation import check_choice, check_int, check_seed

SPLITS: tuple[str, ...] = ("train", "val", "test")


class TaskConfig(NamedTuple):
  """Everything that defines one inner training problem."""

  dataset: str
  model: str
  width: int
  depth: int
  batch_size: int
  total_steps: int
  seed: int

  @property
  def name(self) -> str:
    """Short id such as "digits-mlp-64x2-b32-s1000" (seed not included)."""
    return (
        f"{self.dataset}-{self.model}-{self.width}x{self.depth}"
        f"-b{self.batch_size}-s{self.total_steps}"
    )


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
  """A dataset, a Flax model and pure loss/metric/batch functions over explicit arrays.

  Data arrays are passed in as arguments (see `arrays`) so that jitted code takes them
  as inputs instead of baking them in as constants.
  """

  config: TaskConfig
  data: Dataset
  model: nn.Module

  @functools.cached_property
  def _arrays(self) -> dict[str, jax.Array]:
    return {
        f"{part}_{split}": jnp.asarray(getattr(self.data, f"{part}_{split}"))
        for split in SPLITS
        for part in ("x", "y")
    }

  def arrays(self) -> dict[str, jax.Array]:
    """Device copies of all splits: x_train, y_train, x_val, y_val, x_test, y_test."""
    return self._arrays

  def init(self, key: jax.Array) -> Any:
    """Fresh model parameters."""
    x = jnp.zeros((1, self.data.x_train.shape[1]), jnp.float32)
    return self.model.init(key, x)["params"]

  def loss(self, params: Any, batch: dict[str, jax.Array], *, dropout_rate: Any = None,
           key: jax.Array | None = None) -> jax.Array:
    """Mean softmax cross-entropy on batch = {"x", "y"} (and optional per-example "weight").

    Weights let one compiled program train with any batch size up to the
    sampled one: a 0/1 mask over a larger sampled batch. With ``dropout_rate``
    (may be traced) the model drops activations with masks drawn from ``key``.
    """
    if dropout_rate is None:
      logits = self.model.apply({"params": params}, batch["x"])
    else:
      if key is None:
        raise ValueError("dropout needs a PRNG key: pass key= with dropout_rate=")
      logits = self.model.apply({"params": params}, batch["x"], dropout_rate,
                                rngs={"dropout": key})
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    if "weight" not in batch:
      return losses.mean()
    return jnp.sum(losses * batch["weight"]) / jnp.maximum(jnp.sum(batch["weight"]), 1.0)

  def metrics(self, params: Any, x: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
    """Mean loss and accuracy over a whole split."""
    logits = self.model.apply({"params": params}, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    accuracy = (jnp.argmax(logits, axis=-1) == y).mean()
    return {"loss": loss, "accuracy": accuracy}

  def sample_batch(
      self,
      arrays: dict[str, jax.Array],
      key: jax.Array,
      split: str = "train",
      batch_size: int | None = None,
  ) -> dict[str, jax.Array]:
    """A uniformly sampled (with replacement) batch; `split` and `batch_size` are static."""
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")
    batch_size = self.config.batch_size if batch_size is None else batch_size
    x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
    idx = jax.random.randint(key, (batch_size,), 0, x.shape[0])
    return {"x": x[idx], "y": y[idx]}


def check_task_config(config: TaskConfig) -> TaskConfig:
  """ValueError for unknown names or sizes that are not positive integers (no data is
  loaded: whether a batch fits the dataset is checked by :func:`make_task`)."""
  if not isinstance(config, TaskConfig):
    raise ValueError(f"expected a TaskConfig, got {config!r}")
  check_choice("dataset", config.dataset, DATASETS)
  check_choice("model", config.model, MODEL_KINDS)
  for label in ("width", "depth", "batch_size", "total_steps"):
    check_int(label, getattr(config, label))
  check_seed("seed", config.seed)
  if config.model == "cnn" and config.dataset not in IMAGE_SHAPES:
    raise ValueError(
        f"model 'cnn' needs an image dataset ({', '.join(IMAGE_SHAPES)}), "
        f"got {config.dataset!r}; use 'mlp'"
    )
  return config


def make_task(config: TaskConfig) -> Task:
  """Load the data and build the model for a config; raise ValueError if it is invalid."""
  check_task_config(config)
  data = load_dataset(config.dataset, seed=int(config.seed))
  model = make_model(
      config.model,
      width=config.width,
      depth=config.depth,
      num_classes=data.num_classes,
      image_shape=data.image_shape,
  )
  n_train = data.x_train.shape[0]
  if config.batch_size > n_train:
    raise ValueError(
        f"batch_size {config.batch_size} exceeds the {n_train} training examples "
        f"of dataset {config.dataset!r}"
    )
  return Task(config=config, data=data, model=model)


class TaskFamily(NamedTuple):
  """Choices for each TaskConfig field; `sample` draws one config. Build with `task_family`."""

  datasets: tuple[str, ...]
  models: tuple[str, ...] = ("mlp",)
  widths: tuple[int, ...] = (32, 64)
  depths: tuple[int, ...] = (1, 2)
  batch_sizes: tuple[int, ...] = (32, 64)
  total_steps: tuple[int, ...] = (500, 1000)

  def sample(self, key: jax.Array) -> TaskConfig:
    """Pick each field uniformly; a cnn drawn for a tabular dataset becomes an mlp."""
    choices = (
        self.datasets,
        self.models,
        self.widths,
        self.depths,
        self.batch_sizes,
        self.total_steps,
    )
    bounds = jnp.array([len(c) for c in choices] + [2**31 - 1], jnp.int32)
    # One draw for all fields: a single dispatch, and every field depends on the key.
    draws = [int(i) for i in jax.random.randint(key, (len(bounds),), 0, bounds)]
    dataset, model, width, depth, batch_size, steps = (c[i] for c, i in zip(choices, draws))
    if model == "cnn" and dataset not in IMAGE_SHAPES:
      model = "mlp"
    return TaskConfig(
        dataset=dataset,
        model=model,
        width=int(width),
        depth=int(depth),
        batch_size=int(batch_size),
        total_steps=int(steps),
        seed=draws[-1],
    )


def task_family(
    datasets: tuple[str, ...] | list[str],
    models: tuple[str, ...] | list[str] = ("mlp",),
    widths: tuple[int, ...] | list[int] = (32, 64),
    depths: tuple[int, ...] | list[int] = (1, 2),
    batch_sizes: tuple[int, ...] | list[int] = (32, 64),
    total_steps: tuple[int, ...] | list[int] = (500, 1000),
) -> TaskFamily:
  """A validated TaskFamily: known names, non-empty choices, positive ints, batches that fit."""
  fields = {
      "datasets": tuple(datasets),
      "models": tuple(models),
      "widths": tuple(widths),
      "depths": tuple(depths),
      "batch_sizes": tuple(batch_sizes),
      "total_steps": tuple(total_steps),
  }
  for label, values in fields.items():
    if not values:
      raise ValueError(f"{label} must be a non-empty tuple, got {values!r}")
  for name in fields["datasets"]:
    check_choice("dataset", name, DATASETS)
  for name in fields["models"]:
    check_choice("model", name, MODEL_KINDS)
  for label in ("widths", "depths", "batch_sizes", "total_steps"):
    for value in fields[label]:
      check_int(label, value)
  largest = max(fields["batch_sizes"])
  for name in fields["datasets"]:
    n_train = num_train_examples(name)
    if largest > n_train:
      raise ValueError(
          f"batch_size {largest} exceeds the {n_train} training examples of dataset {name!r}"
      )
  return TaskFamily(**fields)
