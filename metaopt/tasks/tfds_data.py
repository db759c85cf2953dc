"""Image-class pools from tensorflow-datasets, read with `tfds.data_source` and grain.

A class pool is every (image, label) of a dataset split, resized to one square size
and held in memory; few-shot families sample N-way K-shot episodes from it. Reading
goes through `tfds.data_source` (array_record files, no TensorFlow) and a grain
`MapDataset`; nothing is downloaded and nothing is cached on disk. Data must be
prepared beforehand (`tfds build NAME --data_dir DIR --file_format=array_record`).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from typing import Iterator, Optional

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from metaopt.tasks.fewshot import ClassPool
from metaopt.validation import check_int

# Plan names (issue 4) -> tensorflow-datasets builder names. tfds names are accepted too.
TFDS_NAMES: dict[str, str] = {
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    "caltech101": "caltech101",
    "flowers102": "oxford_flowers102",
    "stanford_cars": "cars196",
    "oxford_pets": "oxford_iiit_pet",
    "sun397": "sun397",
    "omniglot": "omniglot",
}

# Plan datasets that tensorflow-datasets does not provide, with the reason.
MISSING: dict[str, str] = {
    "fgvc_aircraft": (
        "FGVC Aircraft has no builder in tensorflow-datasets (checked 4.9.10: "
        "tfds.builder_cls('fgvc_aircraft') raises DatasetNotFoundError and no builder name "
        "contains 'aircraft' or 'fgvc')"
    ),
}

# Dataset roles in the cross-dataset transfer experiment (plan names; see MISSING).
TRANSFER_SPLITS: dict[str, tuple[str, ...]] = {
    "meta_train": ("cifar100", "caltech101", "flowers102"),
    "meta_val": ("stanford_cars", "fgvc_aircraft"),
    "meta_test": ("oxford_pets", "sun397"),
}

# The split expression that holds every example of a dataset (few-shot splits by class).
ALL_SPLITS: dict[str, str] = {
    "cifar10": "train+test",
    "cifar100": "train+test",
    "caltech101": "train+test",
    "oxford_flowers102": "train+validation+test",
    "cars196": "train+test",
    "oxford_iiit_pet": "train+test",
    "sun397": "train+validation+test",  # the default 'tfds' config
    "omniglot": "train+test",  # background + evaluation alphabets; small1/2 are subsets
}

# Feature holding the class of each dataset. omniglot's 'label' is the character (1623
# classes); its 'alphabet' (50) can be chosen with label_key=.
LABEL_KEYS: dict[str, str] = {name: "label" for name in ALL_SPLITS}

# Known obstacles to preparing a dataset, added to the missing-data message.
DOWNLOAD_NOTES: dict[str, str] = {
    "cifar10": (
        "without internet, put the downloaded cifar-10-binary.tar.gz in a folder M and add "
        "--manual_dir M"
    ),
    "cifar100": (
        "without internet, put the downloaded cifar-100-binary.tar.gz in a folder M and add "
        "--manual_dir M"
    ),
    "cars196": (
        "the upstream URL (ai.stanford.edu/~jkrause) returns 404 "
        "(github.com/tensorflow/datasets/issues/5053); obtain the files elsewhere and pass "
        "them with --manual_dir, or prepare the dataset from a copy"
    ),
}

# Text and speech sets: their loaders (metaopt.tasks.text, metaopt.tasks.speech) read
# them through open_source too; they are not class pools, so not in ALL_SPLITS.
SEQUENCE_SETS: tuple[str, ...] = ("imdb_reviews", "glue/sst2", "librispeech")

DATASETS: tuple[str, ...] = tuple(TFDS_NAMES) + tuple(
    n for n in TFDS_NAMES.values() if n not in TFDS_NAMES
) + SEQUENCE_SETS


DATA_EXTRA = ("tensorflow_datasets", "grain")


def require_data_extra() -> None:
  """ValueError naming the extra to install when tensorflow-datasets or grain is missing
  (checked before any work starts)."""
  missing = [m for m in DATA_EXTRA if importlib.util.find_spec(m) is None]
  if missing:
    raise ValueError(f"reading tfds data needs the `data` extra (missing: {', '.join(missing)}); "
                     "install it with: pip install \"metaopt[data]\"")


def tfds_name(name: str) -> str:
  """The tensorflow-datasets builder name of a plan or tfds dataset name."""
  if name in MISSING:
    raise ValueError(f"dataset {name!r} is not available: {MISSING[name]}")
  if name in TFDS_NAMES:
    return TFDS_NAMES[name]
  if name in TFDS_NAMES.values() or name in SEQUENCE_SETS:
    return name
  raise ValueError(
      f"unknown dataset {name!r}; accepted: {', '.join(DATASETS)} "
      f"(missing from tfds: {', '.join(MISSING)})"
  )


_DATA_DIR: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("metaopt_data_dir",
                                                                          default=None)


@contextlib.contextmanager
def using_data_dir(data_dir) -> Iterator[None]:
  """Within the block, tfds data opened without a ``data_dir`` is read from ``data_dir``
  (an experiment's ``data_dir`` field; None changes nothing)."""
  token = None if data_dir is None else _DATA_DIR.set(os.path.expanduser(os.fspath(data_dir)))
  try:
    yield
  finally:
    if token is not None:
      _DATA_DIR.reset(token)


def default_data_dir() -> Optional[str]:
  """The data folder when none is passed: :func:`using_data_dir`'s, else ``$TFDS_DATA_DIR``
  read now (tfds reads it once, at import), else None (tfds' ~/tensorflow_datasets)."""
  return _DATA_DIR.get() or os.environ.get("TFDS_DATA_DIR")


def _resolved_data_dir(data_dir) -> str:
  if data_dir is None:
    data_dir = default_data_dir()
  return os.path.expanduser(os.fspath(data_dir) if data_dir is not None
                            else "~/tensorflow_datasets")


def _missing_message(name: str, split: str, data_dir) -> str:
  where = _resolved_data_dir(data_dir)
  msg = (
      f"dataset {name!r} (split {split!r}) is not prepared in data_dir {where!r}; prepare it "
      f"with `tfds build {name} --data_dir {where} --file_format=array_record` "
      "(array_record is required by tfds.data_source; building needs `pip install tensorflow`, "
      "reading does not) or point data_dir at a prepared copy"
  )
  if name in DOWNLOAD_NOTES:
    msg += f"; note: {DOWNLOAD_NOTES[name]}"
  return msg


def open_source(name: str, *, split: str, data_dir=None):
  """A random-access `tfds.data_source` over prepared data; never downloads."""
  require_data_extra()
  import tensorflow_datasets as tfds  # the optional `data` extra; 0.4 s to import

  tname = tfds_name(name)
  if tname.startswith("glue/"):
    import tensorflow_datasets.text.glue  # noqa: F401  the `data` extra; registers glue (25 ms)
  data_dir = default_data_dir() if data_dir is None else os.path.expanduser(os.fspath(data_dir))
  try:
    return tfds.data_source(tname, split=split, data_dir=data_dir, download=False)
  except (KeyError, NotImplementedError, FileNotFoundError, AssertionError) as e:
    # An unprepared dataset surfaces as an empty split dict (KeyError) or as an
    # unsupported TFRECORD format on a non-existent directory (NotImplementedError).
    builder = tfds.builder(tname, data_dir=data_dir)
    if not builder.is_prepared():
      raise FileNotFoundError(_missing_message(tname, split, data_dir)) from e
    if isinstance(e, NotImplementedError):
      raise FileNotFoundError(
          f"dataset {tname!r} in {builder.data_dir!r} is prepared in a format "
          "tfds.data_source cannot read; rebuild it with --file_format=array_record"
      ) from e
    raise ValueError(f"cannot read split {split!r} of dataset {tname!r}: {e}") from e


def _to_image(image: np.ndarray, size: int, grayscale: bool) -> np.ndarray:
  """uint8 [H, W, C] -> float32 [size, size, 1 or 3] in [0, 1] (aspect ratio not kept)."""
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  pil = Image.fromarray(image).convert("L" if grayscale else "RGB")
  if pil.size != (size, size):
    pil = pil.resize((size, size), Image.Resampling.BILINEAR)
  out = np.asarray(pil, np.float32) / np.float32(255.0)
  return out[..., None] if grayscale else out


def load_class_pool(
    name: str,
    *,
    split: str,
    data_dir=None,
    image_size: int = 32,
    max_per_class: int | None = None,
    grayscale: bool = False,
    seed: int = 0,
    label_key: str | None = None,
    num_threads: int = 4,
    progress: bool = False,
) -> ClassPool:
  """Load a tfds image dataset split into memory as a `ClassPool`.

  Images are resized (bilinear, aspect ratio not kept) to `image_size` x `image_size`,
  RGB (3 channels) or `grayscale` (1 channel), float32 in [0, 1]. With `max_per_class`,
  at most that many examples per class are kept, chosen by a `seed`-ed shuffle of the
  split. Labels are renumbered 0..C-1 over the classes present, in the order of the
  dataset's own label ids. `split` is any tfds split expression, e.g. "train",
  "train+test" (see `ALL_SPLITS`). Raises FileNotFoundError if the data is not
  prepared under `data_dir` (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).
  """
  import grain  # the optional `data` extra; 0.5 s to import

  tname = tfds_name(name)
  check_int("image_size", image_size)
  if max_per_class is not None:
    check_int("max_per_class", max_per_class)
  source = open_source(tname, split=split, data_dir=data_dir)
  features = source.dataset_info.features
  key = label_key or LABEL_KEYS[tname]
  if key not in features or not hasattr(features[key], "num_classes"):
    accepted = [k for k in features.keys() if hasattr(features[k], "num_classes")]
    raise ValueError(f"label_key {key!r} is not a class feature of {tname!r}; accepted: {accepted}")
  total_classes = features[key].num_classes
  size, gray = int(image_size), bool(grayscale)

  def prepare(pair):
    index, example = pair
    return index, _to_image(example["image"], size, gray), int(example[key])

  # A seeded global shuffle (grain's index shuffle), so a max_per_class subset is a
  # random one per class; each element remembers its index in the split.
  ds = (
      grain.MapDataset.source(source)
      .map_with_index(lambda i, example: (i, example))
      .shuffle(seed=seed)
      .map(prepare)
      .to_iter_dataset(
          grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4 * num_threads)
      )
  )

  counts = np.zeros(total_classes, np.int64)
  full = 0  # classes that reached max_per_class: stop once every class is full
  kept_idx, kept_x, kept_y = [], [], []
  with tqdm(total=len(source), desc=f"load {tname}[{split}]", disable=not progress) as bar:
    for index, image, label in ds:
      bar.update(1)
      if max_per_class is not None and counts[label] >= max_per_class:
        continue
      counts[label] += 1
      kept_idx.append(index)
      kept_x.append(image)
      kept_y.append(label)
      if max_per_class is not None and counts[label] == max_per_class:
        full += 1
        if full == total_classes:
          break
  if not kept_x:
    raise ValueError(f"split {split!r} of dataset {tname!r} has no examples")

  # Dataset order (not read order), so the result does not depend on the seed without
  # max_per_class.
  by_index = np.argsort(np.asarray(kept_idx), kind="stable")
  x = np.stack([kept_x[i] for i in by_index])  # one copy: pools can be large
  raw_y = np.asarray(kept_y, np.int64)[by_index]
  present, y = np.unique(raw_y, return_inverse=True)
  names = features[key].names
  class_names = tuple(str(names[c]) for c in present)
  return ClassPool(x=x, y=y.astype(np.int32), class_names=class_names, name=tname)
