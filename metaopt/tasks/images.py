"""Image workloads: offline stand-ins, tfds pipelines for CIFAR and the transfer sets, and a
jitted training step with donated buffers. Importing this module registers the datasets
and the ResNets (:mod:`metaopt.tasks.resnet`).

Stand-ins (offline, selectable by name): ``mnist5k_28``, ``mnist5k_32``, ``digits_28``,
``digits_32``: MNIST-5k and scikit-learn's digits as (S, S, 1) images, resized bilinearly
to side S, split like ``load_dataset("mnist5k")`` (the same test examples) and standardized
with the training split's pixel mean and standard deviation.

tfds sets (:data:`IMAGE_SETS`): ``cifar10``, ``cifar100``, ``oxford_flowers102``,
``oxford_iiit_pet``, ``cars196``, ``sun397``, ``caltech101``, read with
``tfds.data_source`` and grain (:func:`image_batches`: seeded shuffling, batching,
threaded prefetch, CIFAR augmentation in numpy). A dataset without a validation split
gets one carved from its training split by a seeded permutation. ``load_dataset(name)``
loads every split into memory from ``$TFDS_DATA_DIR`` (default ~/tensorflow_datasets);
:func:`load_image_dataset` takes ``data_dir``, a size and a cap on examples.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from metaopt.tasks import objectives, tfds_data
from metaopt.tasks.data import (NUM_EXAMPLES, PIXEL_MAX, Dataset, split_indices, raw_examples,
                                register_dataset)
from metaopt.tasks.resnet import resnet  # noqa: F401  (registers the ResNet model kinds)
from metaopt.validation import check_choice, check_int, check_number, check_seed

SPLITS: tuple[str, ...] = ("train", "val", "test")

# --- offline stand-ins -------------------------------------------------------------------

# name -> (offline source, side length)
STANDINS: dict[str, tuple[str, int]] = {
    f"{source}_{size}": (source, size) for source in ("mnist5k", "digits") for size in (28, 32)
}


def _resize(image: np.ndarray, size: int) -> np.ndarray:
  """A float32 [H, W] image resized bilinearly to [size, size]."""
  pil = Image.fromarray(np.asarray(image, np.float32))
  return np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR), np.float32)


@functools.lru_cache(maxsize=8)
def standin_images(name: str) -> tuple[np.ndarray, np.ndarray]:
  """Unsplit ``(images [N, S, S] float32 in [0, 1], labels [N] int32)`` of a stand-in;
  cached and read-only."""
  source, size = STANDINS[check_choice("image stand-in", name, STANDINS)]
  x, y = raw_examples(source, 0)
  side = int(round(np.sqrt(x.shape[1])))
  images = x.reshape(-1, side, side) / np.float32(PIXEL_MAX[source])
  if side != size:
    images = np.stack([_resize(image, size) for image in images])
  images = np.ascontiguousarray(images, np.float32)
  images.flags.writeable = False
  return images, y


def load_standin(name: str, *, seed: int = 0, val_fraction: float = 0.2,
                 test_fraction: float = 0.2) -> Dataset:
  """A stand-in as a Dataset of (S, S, 1) images, split as ``load_dataset`` splits its
  source (stratified, seeded) and standardized with the training split's statistics."""
  images, y = standin_images(name)
  train, val, test = split_indices(y, seed, val_fraction, test_fraction)
  mean, std = images[train].mean(), images[train].std()
  x = ((images - mean) / max(float(std), 1e-8)).astype(np.float32)[..., None]
  size = STANDINS[name][1]
  return Dataset(name=name, x_train=x[train], y_train=y[train], x_val=x[val], y_val=y[val],
                 x_test=x[test], y_test=y[test], num_classes=int(y.max()) + 1,
                 image_shape=(size, size, 1), info={"source": STANDINS[name][0]})


for _name, (_source, _) in STANDINS.items():
  register_dataset(_name, functools.partial(load_standin, _name),
                   num_examples=NUM_EXAMPLES[_source], modality="image")


# --- tfds image sets ---------------------------------------------------------------------

class ImageSet(NamedTuple):
  """What the pipelines need to know about a tfds image classification set."""
  splits: tuple[str, ...]            # the splits tfds provides
  image_size: int                    # default side of the square images served
  mean: tuple[float, float, float]   # per-channel statistics of the [0, 1] pixels
  std: tuple[float, float, float]
  num_examples: int                  # over all splits
  augment: bool = False              # random crop + flip on the training split by default


_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
IMAGE_SETS: dict[str, ImageSet] = {
    "cifar10": ImageSet(("train", "test"), 32, (0.4914, 0.4822, 0.4465),
                        (0.2470, 0.2435, 0.2616), 60_000, augment=True),
    "cifar100": ImageSet(("train", "test"), 32, (0.5071, 0.4865, 0.4409),
                         (0.2673, 0.2564, 0.2762), 60_000, augment=True),
    "oxford_flowers102": ImageSet(("train", "validation", "test"), 64, *_IMAGENET, 8_189),
    "oxford_iiit_pet": ImageSet(("train", "test"), 64, *_IMAGENET, 7_349),
    "cars196": ImageSet(("train", "test"), 64, *_IMAGENET, 16_185),
    "sun397": ImageSet(("train", "validation", "test"), 64, *_IMAGENET, 108_753),
    "caltech101": ImageSet(("train", "test"), 64, *_IMAGENET, 9_144),
}


def image_set_name(name: str) -> str:
  """The tfds name of a supported image set; plan names (``flowers102``, ...) are accepted."""
  if name in tfds_data.MISSING:
    tfds_data.tfds_name(name)  # raises, saying why the set is not available
  tname = tfds_data.TFDS_NAMES.get(name, name)
  if tname not in IMAGE_SETS:
    raise ValueError(f"unknown image dataset {name!r}; accepted: {', '.join(IMAGE_SETS)}")
  return tname


class SplitSource(NamedTuple):
  """Random access to the examples of one split (a carved one included)."""
  source: Any            # the tfds data source of the underlying tfds split
  indices: np.ndarray    # the examples of the split, in dataset order

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[i])]

  @property
  def num_classes(self) -> int:
    return int(self.source.dataset_info.features["label"].num_classes)


def split_source(name: str, split: str = "train", *, data_dir=None, val_fraction: float = 0.1,
                 split_seed: int = 0, max_examples: int | None = None) -> SplitSource:
  """The examples of ``split`` (train, val or test) of an image set. Without a tfds
  validation split, val is ``val_fraction`` of tfds' train (a permutation seeded by
  ``split_seed``) and train the rest; ``max_examples`` keeps a seeded random subset."""
  tname = image_set_name(name)
  check_choice("split", split, SPLITS)
  check_number("val_fraction", val_fraction, low=0.0, high=1.0, low_open=True, high_open=True)
  split_seed = check_seed("split_seed", split_seed)
  if max_examples is not None:
    max_examples = check_int("max_examples", max_examples)
  carve = split != "test" and "validation" not in IMAGE_SETS[tname].splits
  tfds_split = "train" if carve else {"train": "train", "val": "validation", "test": "test"}[split]
  source = tfds_data.open_source(tname, split=tfds_split, data_dir=data_dir)
  indices = np.arange(len(source))
  if carve:
    perm = np.random.default_rng(split_seed).permutation(len(source))
    n_val = max(1, int(round(val_fraction * len(source))))
    indices = np.sort(perm[:n_val] if split == "val" else perm[n_val:])
  if max_examples is not None and max_examples < len(indices):
    rng = np.random.default_rng([split_seed, 1])
    indices = np.sort(rng.choice(indices, max_examples, replace=False))
  if not len(indices):
    raise ValueError(f"split {split!r} of dataset {tname!r} has no examples")
  return SplitSource(source, indices)


def random_crop_flip(images: np.ndarray, rng: np.random.Generator, padding: int = 4,
                     flip: bool = True, fill: float = 0) -> np.ndarray:
  """CIFAR augmentation of a batch [B, H, W, C]: pad by ``padding`` pixels of value
  ``fill``, crop a random H x W window per image, and (``flip``) flip each image
  horizontally with probability 1/2."""
  b, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                  constant_values=fill)
  rows = rng.integers(0, 2 * padding + 1, b)[:, None] + np.arange(h)
  cols = rng.integers(0, 2 * padding + 1, b)[:, None] + np.arange(w)
  if flip:
    cols = np.where(rng.random(b)[:, None] < 0.5, cols[:, ::-1], cols)
  return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _decode(example: dict, size: int) -> dict:
  """One tfds example -> {"x": uint8 [size, size, 3], "y": int32}."""
  image = np.asarray(example["image"])
  if image.ndim == 2:
    image = image[..., None]
  image = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]
  if image.shape[:2] != (size, size):  # aspect ratio not kept
    image = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
  return {"x": image, "y": np.int32(example["label"])}


def image_batches(name: str, split: str = "train", *, batch_size: int, data_dir=None,
                  seed: int = 0, image_size: int | None = None, augment: bool | None = None,
                  shuffle: bool | None = None, num_epochs: int | None = 1,
                  drop_remainder: bool | None = None, val_fraction: float = 0.1,
                  split_seed: int = 0, max_examples: int | None = None,
                  num_threads: int = 4, prefetch: int = 8):
  """A grain ``IterDataset`` of batches ``{"x": float32 [B, S, S, 3], "y": int32 [B]}``.

  Images are resized to ``image_size`` (default: the set's, :data:`IMAGE_SETS`) and
  standardized per channel. On the training split by default: a shuffle seeded by
  ``seed`` (a new order every epoch), the set's augmentation (CIFAR: random crop with
  4 pixels of padding and horizontal flips, seeded by ``seed``) and dropping a last
  partial batch. ``num_epochs=None`` repeats forever. ``num_threads`` threads read and
  prepare ``prefetch`` batches ahead. Other arguments: :func:`split_source`.
  """
  import grain  # the optional `data` extra; 0.5 s to import

  tname = image_set_name(name)
  spec = IMAGE_SETS[tname]
  check_int("batch_size", batch_size)
  seed = check_seed("seed", seed)
  size = spec.image_size if image_size is None else check_int("image_size", image_size)
  if num_epochs is not None:
    check_int("num_epochs", num_epochs)
  check_int("num_threads", num_threads)
  check_int("prefetch", prefetch)
  train = split == "train"
  augment = spec.augment and train if augment is None else bool(augment)
  shuffle = train if shuffle is None else bool(shuffle)
  drop = train if drop_remainder is None else bool(drop_remainder)
  source = split_source(tname, split, data_dir=data_dir, val_fraction=val_fraction,
                        split_seed=split_seed, max_examples=max_examples)
  if drop and batch_size > len(source):
    raise ValueError(f"batch_size {batch_size} exceeds the {len(source)} examples of split "
                     f"{split!r} of {tname!r} (a partial last batch is dropped)")
  scale = (1.0 / (255.0 * np.asarray(spec.std))).astype(np.float32)
  offset = (np.asarray(spec.mean) / np.asarray(spec.std)).astype(np.float32)

  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  ds = ds.map(functools.partial(_decode, size=size)).batch(batch_size, drop_remainder=drop)
  if augment:
    ds = ds.random_map(lambda b, rng: {"x": random_crop_flip(b["x"], rng), "y": b["y"]},
                       seed=seed + 1)
  ds = ds.map(lambda b: {"x": b["x"].astype(np.float32) * scale - offset, "y": b["y"]})
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                              prefetch_buffer_size=prefetch))


@functools.lru_cache(maxsize=2)
def _load_image_dataset(tname, data_dir, size, max_examples, split_seed, val_fraction, sizes):
  del sizes  # only part of the cache key
  arrays, num_classes = {}, None
  for split in SPLITS:
    num_classes = split_source(tname, split, data_dir=data_dir, val_fraction=val_fraction,
                               split_seed=split_seed).num_classes
    batches = list(image_batches(tname, split, batch_size=256, data_dir=data_dir,
                                 image_size=size, augment=False, shuffle=False,
                                 drop_remainder=False,
                                 val_fraction=val_fraction, split_seed=split_seed,
                                 max_examples=max_examples))
    for part in ("x", "y"):
      arrays[f"{part}_{split}"] = np.concatenate([b[part] for b in batches])
      arrays[f"{part}_{split}"].flags.writeable = False
  spec = IMAGE_SETS[tname]
  return Dataset(name=tname, **arrays, num_classes=num_classes, image_shape=(size, size, 3),
                 info={"mean": spec.mean, "std": spec.std, "data_dir": data_dir})


def load_image_dataset(name: str, *, data_dir=None, image_size: int | None = None,
                       max_examples: int | None = None, split_seed: int = 0,
                       val_fraction: float = 0.1) -> Dataset:
  """Every split of an image set in memory (standardized float32 images, int32 labels),
  at most ``max_examples`` per split; cached. ``data_dir`` None: ``$TFDS_DATA_DIR`` or
  ~/tensorflow_datasets. Raises FileNotFoundError, with the command that prepares the
  data, when it is not there."""
  tname = image_set_name(name)
  size = IMAGE_SETS[tname].image_size if image_size is None else check_int("image_size",
                                                                           image_size)
  data_dir = (tfds_data.default_data_dir() if data_dir is None
              else os.path.expanduser(os.fspath(data_dir)))
  # The split sizes join the cache key, so data prepared again (or a mock) is read again.
  sizes = tuple(len(tfds_data.open_source(tname, split=s, data_dir=data_dir))
                for s in IMAGE_SETS[tname].splits)
  return _load_image_dataset(tname, data_dir, size, max_examples, split_seed, val_fraction,
                             sizes)


def _register_tfds(tname: str) -> None:
  def load(*, seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2) -> Dataset:
    # tfds fixes the test split; the seed and val_fraction carve validation from train.
    return load_image_dataset(tname, split_seed=seed, val_fraction=val_fraction)
  register_dataset(tname, load, num_examples=IMAGE_SETS[tname].num_examples, modality="image")


for _name in IMAGE_SETS:
  _register_tfds(_name)


# --- a training step fed by a pipeline ---------------------------------------------------

class ImageTrainState(NamedTuple):
  """What one training step of a BatchNorm model carries."""
  params: Any
  batch_stats: Any
  opt_state: Any
  step: jax.Array


def init_train_state(model, tx: optax.GradientTransformation, key: jax.Array,
                     example: Any) -> ImageTrainState:
  """Fresh parameters, BatchNorm statistics and optimizer state; ``example``: one batch of
  inputs (only its shape is used)."""
  variables = jax.jit(model.init)(key, example)
  params = variables["params"]
  return ImageTrainState(params, variables.get("batch_stats", {}), tx.init(params),
                    jnp.zeros((), jnp.int32))


def make_train_step(model, tx: optax.GradientTransformation, objective: str = "classification"):
  """``step(state, batch) -> (state, metrics)``, jitted, with the state's buffers donated
  (updated in place: do not reuse the state passed in). BatchNorm uses and updates the
  batch's statistics; ``tx.update`` also gets the loss as ``value=``."""
  obj = objectives.get(objective)
  tx = optax.with_extra_args_support(tx)

  def step(state: ImageTrainState, batch: dict) -> tuple[ImageTrainState, dict]:
    def loss_fn(params):
      outputs, new = model.apply({"params": params, "batch_stats": state.batch_stats},
                                 batch["x"], train=True, mutable=["batch_stats"])
      return obj.losses(outputs, batch["y"]).mean(), (new["batch_stats"], outputs)
    (loss, (batch_stats, outputs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, value=loss)
    params = optax.apply_updates(state.params, updates)
    return (ImageTrainState(params, batch_stats, opt_state, state.step + 1),
            {"loss": loss, **obj.metrics(outputs, batch["y"])})
  return jax.jit(step, donate_argnums=0)


def make_eval_step(model, objective: str = "classification"):
  """``evaluate(state, batches) -> {"loss", "accuracy", ...}``: means over every example
  of ``batches`` (an iterable of {"x", "y"}), with the running BatchNorm statistics."""
  obj = objectives.get(objective)

  @jax.jit
  def batch_metrics(params, batch_stats, batch):
    outputs = model.apply({"params": params, "batch_stats": batch_stats}, batch["x"],
                          train=False)
    return {"loss": obj.losses(outputs, batch["y"]).mean(), **obj.metrics(outputs, batch["y"])}

  def evaluate(state: ImageTrainState, batches: Iterable[dict]) -> dict:
    totals, count = {}, 0
    for batch in batches:
      n = len(batch["y"])
      for k, v in batch_metrics(state.params, state.batch_stats, batch).items():
        totals[k] = totals.get(k, 0.0) + float(v) * n
      count += n
    if not count:
      raise ValueError("evaluate got no batches")
    return {k: v / count for k, v in totals.items()}
  return evaluate
