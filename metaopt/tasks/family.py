"""Tasks (data + Flax model + loss as pure functions) and families that sample them."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from metaopt.tasks import objectives
from metaopt.tasks.data import (Dataset, dataset_names, is_image_dataset, load_dataset,
                                num_train_examples)
from metaopt.tasks.models import model_kinds, make_model
from metaopt.validation import check_choice, check_int, check_seed

SPLITS: tuple[str, ...] = ("train", "val", "test")


@functools.partial(jax.jit, static_argnums=0)
def _init_variables(model, key, example) -> dict:
  # Compiled once per model (flax modules compare by value) and example shape: op by op,
  # a ResNet's or a Transformer's init dispatches hundreds of small programs.
  return model.init(key, example)


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
  as inputs instead of baking them in as constants. Inputs and labels may be pytrees
  (token ids, audio features with lengths). A model with state besides its parameters
  (BatchNorm statistics) is *stateful*: it takes ``train=`` and its state is carried
  by :meth:`loss_and_state` during training and read by :meth:`metrics`.
  """

  config: TaskConfig
  data: Dataset
  model: nn.Module

  @functools.cached_property
  def _arrays(self) -> dict[str, Any]:
    return {
        f"{part}_{split}": jax.tree.map(jnp.asarray, getattr(self.data, f"{part}_{split}"))
        for split in SPLITS
        for part in ("x", "y")
    }

  def arrays(self) -> dict[str, Any]:
    """Device copies of all splits: x_train, y_train, x_val, y_val, x_test, y_test."""
    return self._arrays

  @functools.cached_property
  def objective(self) -> objectives.Objective:
    return objectives.get(self.data.objective)

  def example(self) -> Any:
    """One training example with a batch axis: what ``init`` traces the model with."""
    return jax.tree.map(lambda a: jnp.asarray(a[:1]), self.data.x_train)

  def init_variables(self, key: jax.Array) -> dict:
    """Every variable collection of a fresh model: params and any state."""
    return _init_variables(self.model, key, self.example())

  def init(self, key: jax.Array) -> Any:
    """Fresh model parameters."""
    return self.init_variables(key)["params"]

  def init_state(self, key: jax.Array) -> dict:
    """Fresh model state besides the parameters ({} for most models)."""
    return {k: v for k, v in self.init_variables(key).items() if k != "params"}

  @functools.cached_property
  def stateful(self) -> bool:
    """Whether the model keeps state besides its parameters (BatchNorm statistics)."""
    return bool(jax.eval_shape(self.init_state, jax.random.PRNGKey(0)))

  def _apply(self, params, model_state, x, *, train: bool, dropout_rate=None, key=None,
             model_kwargs=None):
    """``(outputs, new_model_state)``; dropout with masks from ``key`` when a rate is given;
    ``model_kwargs``: more keyword arguments of the model's call (``active_depth``)."""
    variables = {"params": params, **(model_state or {})}
    args = (x,) if dropout_rate is None else (x, dropout_rate)
    kw = dict(model_kwargs or {})
    if dropout_rate is not None:
      if key is None:
        raise ValueError("dropout needs a PRNG key: pass key= with dropout_rate=")
      kw["rngs"] = {"dropout": key}
    if not self.stateful:
      return self.model.apply(variables, *args, **kw), model_state
    if not train:
      return self.model.apply(variables, *args, train=False, **kw), model_state
    return self.model.apply(variables, *args, train=True, mutable=list(model_state), **kw)

  def _mean_loss(self, outputs, batch) -> jax.Array:
    losses = self.objective.losses(outputs, batch["y"])
    if "weight" not in batch:
      return losses.mean()
    return objectives.weighted_mean(losses, batch["weight"])

  def loss(self, params: Any, batch: dict[str, Any], *, dropout_rate: Any = None,
           key: jax.Array | None = None, model_kwargs: dict | None = None) -> jax.Array:
    """Mean loss on batch = {"x", "y"} (and optional per-example "weight"), for a model
    without state (a stateful one trains through :meth:`loss_and_state`).

    Weights let one compiled program train with any batch size up to the
    sampled one: a 0/1 mask over a larger sampled batch. With ``dropout_rate``
    (may be traced) the model drops activations with masks drawn from ``key``.
    ``model_kwargs`` (may be traced) go to the model's call, e.g. ``active_depth``.
    """
    if self.stateful:
      raise ValueError(f"model {self.config.model!r} keeps state (BatchNorm statistics): "
                       "train it with Task.loss_and_state")
    outputs, _ = self._apply(params, None, batch["x"], train=True, dropout_rate=dropout_rate,
                             key=key, model_kwargs=model_kwargs)
    return self._mean_loss(outputs, batch)

  def loss_and_state(self, params: Any, model_state: dict, batch: dict[str, Any], *,
                     dropout_rate: Any = None, key: jax.Array | None = None,
                     model_kwargs: dict | None = None) -> tuple[jax.Array, dict]:
    """``(mean loss, new model state)`` of a training step (batch statistics updated); a
    model without state takes and returns ``model_state=None``."""
    outputs, model_state = self._apply(params, model_state, batch["x"], train=True,
                                       dropout_rate=dropout_rate, key=key,
                                       model_kwargs=model_kwargs)
    return self._mean_loss(outputs, batch), model_state

  def metrics(self, params: Any, x: Any, y: Any, model_state: dict | None = None, *,
              model_kwargs: dict | None = None, weight: Any = None) -> dict[str, jax.Array]:
    """Mean loss and the objective's metrics (always ``accuracy``) over a whole split,
    in inference mode (running BatchNorm statistics). ``weight``: per-example 0/1 of a
    padded split (only the rows weighted 1 count)."""
    return self.split_metrics(params, x, y, [weight], model_state,
                              model_kwargs=model_kwargs)[0]

  def split_metrics(self, params: Any, x: Any, y: Any, weights: Sequence[Any],
                    model_state: dict | None = None, *, model_kwargs: dict | None = None
                    ) -> list[dict[str, jax.Array]]:
    """:meth:`metrics` of several weighted subsets of one input (validation and test
    concatenated, each with its 0/1 rows; None: every row) from a single forward pass."""
    outputs, _ = self._apply(params, model_state, x, train=False, model_kwargs=model_kwargs)
    losses = self.objective.losses(outputs, y)
    return [{"loss": losses.mean() if w is None else objectives.weighted_mean(losses, w),
             **self.objective.metrics(outputs, y, weight=w)} for w in weights]

  def sample_batch(
      self,
      arrays: dict[str, Any],
      key: jax.Array,
      split: str = "train",
      batch_size: int | None = None,
  ) -> dict[str, Any]:
    """A uniformly sampled (with replacement) batch; `split` and `batch_size` are static.
    A padded split (``arrays["n_<split>"]``, may be traced) is sampled from its first
    ``n_<split>`` rows."""
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")
    batch_size = self.config.batch_size if batch_size is None else batch_size
    x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
    n = arrays.get(f"n_{split}", jax.tree.leaves(x)[0].shape[0])
    idx = jax.random.randint(key, (batch_size,), 0, n)
    return {"x": jax.tree.map(lambda a: a[idx], x), "y": jax.tree.map(lambda a: a[idx], y)}


def check_task_config(config: TaskConfig) -> TaskConfig:
  """ValueError for unknown names or sizes that are not positive integers (no data is
  loaded: whether a batch fits the dataset is checked by :func:`make_task`)."""
  if not isinstance(config, TaskConfig):
    raise ValueError(f"expected a TaskConfig, got {config!r}")
  check_choice("dataset", config.dataset, dataset_names())
  check_choice("model", config.model, model_kinds())
  for label in ("width", "depth", "batch_size", "total_steps"):
    check_int(label, getattr(config, label))
  check_seed("seed", config.seed)
  if config.model == "cnn" and not is_image_dataset(config.dataset):
    raise ValueError(
        f"model 'cnn' needs an image dataset "
        f"({', '.join(n for n in dataset_names() if is_image_dataset(n))}), "
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
      info=data.info,
  )
  n_train = data.num_examples("train")
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
    if model == "cnn" and not is_image_dataset(dataset):
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
    check_choice("dataset", name, dataset_names())
  for name in fields["models"]:
    check_choice("model", name, model_kinds())
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
