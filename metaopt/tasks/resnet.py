"""ResNet-18 and ResNet-50 for images, with BatchNorm statistics and an optional bfloat16
compute dtype; pretrained weights from a local orbax, msgpack or ``.npz`` file.

The CIFAR variant (the default) starts with one 3x3 convolution and no max-pool, as in
the CIFAR experiments of He et al. (2016) and most CIFAR code; the ImageNet variant
(``stem="imagenet"``) starts with a 7x7 stride-2 convolution and a 3x3 max-pool, the
layout of ImageNet-pretrained weights. Blocks are ResNet v1.5 (the stride of a
bottleneck sits on its 3x3 convolution, as in torchvision). BatchNorm keeps running
statistics in the ``"batch_stats"`` collection: ``train=True`` normalizes with the
batch's statistics and updates them (apply with ``mutable=["batch_stats"]``),
``train=False`` normalizes with the running ones.

Mixed precision: ``dtype=jnp.bfloat16`` computes convolutions and matrix products in
bfloat16 while the parameters (the master weights the optimizer updates) and the
BatchNorm statistics stay float32; logits come back as float32.
"""

from __future__ import annotations

import functools
import os
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from metaopt.tasks.backbone import load_params
from metaopt.tasks.models import dropout, register_model
from metaopt.validation import check_choice, check_int

# kind -> (block type, blocks per stage); a model of depth d keeps the first d stages.
ARCHITECTURES: dict[str, tuple[str, tuple[int, ...]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}
STEMS = ("cifar", "imagenet")
PRECISIONS = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PRECISION_ENV = "METAOPT_COMPUTE_DTYPE"  # auto (default), float32 or bfloat16


def compute_dtype() -> Any:
  """The compute dtype registered ResNets use: ``$METAOPT_COMPUTE_DTYPE`` (float32 or
  bfloat16), or with ``auto`` (the default) bfloat16 on a GPU or TPU and float32 on the
  CPU, where bfloat16 convolutions are slower than float32 ones."""
  name = os.environ.get(PRECISION_ENV, "auto") or "auto"
  check_choice(PRECISION_ENV, name, ("auto", *PRECISIONS))
  if name == "auto":
    name = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  return PRECISIONS[name]


def _conv(features, size, strides=1, name=None, dtype=jnp.float32):
  pad = size // 2  # explicit symmetric padding, as in torchvision (pretrained weights agree)
  return nn.Conv(features, (size, size), (strides, strides), padding=((pad, pad), (pad, pad)),
                 use_bias=False, dtype=dtype, param_dtype=jnp.float32, name=name)


def _norm(train, name=None, dtype=jnp.float32):
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      dtype=dtype, param_dtype=jnp.float32, name=name)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with BatchNorm and a (projected) shortcut."""
  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(_conv, dtype=self.dtype)
    norm = functools.partial(_norm, train, dtype=self.dtype)
    y = nn.relu(norm(name="bn1")(conv(self.features, 3, self.strides, name="conv1")(x)))
    y = norm(name="bn2")(conv(self.features, 3, name="conv2")(y))
    if self.strides != 1 or x.shape[-1] != self.features:
      x = norm(name="proj_bn")(conv(self.features, 1, self.strides, name="proj_conv")(x))
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """1x1 down, 3x3 (strided), 1x1 up to 4x ``features``, with a (projected) shortcut."""
  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(_conv, dtype=self.dtype)
    norm = functools.partial(_norm, train, dtype=self.dtype)
    out = 4 * self.features
    y = nn.relu(norm(name="bn1")(conv(self.features, 1, name="conv1")(x)))
    y = nn.relu(norm(name="bn2")(conv(self.features, 3, self.strides, name="conv2")(y)))
    y = norm(name="bn3")(conv(out, 1, name="conv3")(y))
    if self.strides != 1 or x.shape[-1] != out:
      x = norm(name="proj_bn")(conv(out, 1, self.strides, name="proj_conv")(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """A ResNet classifier over images of ``image_shape`` (H, W, C), flat or not.

  ``width`` is the number of channels of the first stage (64 in the paper); stage ``i``
  has ``width * 2**i`` (times 4 at the output of a bottleneck). ``__call__(x,
  dropout_rate=None, *, train=False)``: dropout (rate may be traced) before the classifier.
  """
  num_classes: int
  image_shape: tuple[int, int, int]
  stage_sizes: tuple[int, ...] = (2, 2, 2, 2)
  block: str = "basic"
  width: int = 64
  stem: str = "cifar"
  dtype: Any = jnp.float32
  kind: str = "resnet"  # the model kind, for error messages

  @nn.compact
  def __call__(self, x: jnp.ndarray, dropout_rate=None, *, train: bool = False) -> jnp.ndarray:
    shape = tuple(self.image_shape)
    if tuple(x.shape[1:]) != shape:
      if int(np.prod(x.shape[1:])) != int(np.prod(shape)):
        raise ValueError(f"model {self.kind!r} expects images of shape {shape} (or "
                         f"{int(np.prod(shape))} flat features), got {tuple(x.shape[1:])}")
      x = x.reshape((x.shape[0], *shape))
    x = x.astype(self.dtype)
    if self.stem == "imagenet":
      x = nn.relu(_norm(train, "stem_bn", self.dtype)(_conv(self.width, 7, 2, "stem_conv",
                                                            self.dtype)(x)))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    else:
      x = nn.relu(_norm(train, "stem_bn", self.dtype)(_conv(self.width, 3, 1, "stem_conv",
                                                            self.dtype)(x)))
    cls = BasicBlock if self.block == "basic" else Bottleneck
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = cls(self.width * 2**i, strides, self.dtype, name=f"stage{i + 1}_block{j}")(x, train)
    x = dropout(self, x.mean(axis=(1, 2)), dropout_rate)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name="head")(x)
    return logits.astype(jnp.float32)


def resnet(kind: str, *, width: int = 64, depth: int = 4, num_classes: int,
           image_shape: tuple[int, ...] | None, stem: str = "cifar",
           dtype: Any = None) -> ResNet:
  """A ResNet of ``kind`` (resnet18, resnet50) keeping its first ``depth`` stages (4: the
  paper's network), ``width`` channels in the first stage; ``dtype`` None: :func:`compute_dtype`."""
  check_choice("model", kind, ARCHITECTURES)
  check_choice("stem", stem, STEMS)
  block, sizes = ARCHITECTURES[kind]
  check_int("width", width)
  check_int(f"depth (stages of {kind})", depth, high=len(sizes))
  check_int("num_classes", num_classes)
  if image_shape is None or len(image_shape) != 3:
    raise ValueError(f"model {kind!r} needs an image dataset with image_shape (H, W, C), "
                     f"got {image_shape!r}")
  return ResNet(num_classes=int(num_classes), image_shape=tuple(int(s) for s in image_shape),
                stage_sizes=sizes[:depth], block=block, width=int(width), stem=stem,
                dtype=compute_dtype() if dtype is None else dtype, kind=kind)


def _builder(kind: str, stem: str):
  def build(*, width, depth, num_classes, image_shape, info=None):
    return resnet(kind, width=width, depth=depth, num_classes=num_classes,
                  image_shape=image_shape, stem=stem)
  return build


for _kind in ARCHITECTURES:
  register_model(_kind, _builder(_kind, "cifar"))
register_model("resnet50_imagenet", _builder("resnet50", "imagenet"))


# --- pretrained weights ------------------------------------------------------------------

def save_npz(path, variables: dict) -> pathlib.Path:
  """Writes every variable (params and batch_stats) to an ``.npz`` keyed by its path,
  e.g. ``params/stem_conv/kernel``, ``batch_stats/stem_bn/mean``: the layout
  :func:`load_weights` reads (convert other checkpoints to it)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  flat = traverse_util.flatten_dict(jax.device_get(dict(variables)), sep="/")
  with path.open("wb") as f:
    np.savez(f, **{k: np.asarray(v) for k, v in flat.items()})
  return path


def _load_npz(path: pathlib.Path, variables: dict, excluded: tuple[str, ...]) -> dict:
  keep = lambda k: not any(k == p or k.startswith(p + "/") for p in excluded)
  where = repr(str(path))
  try:
    with np.load(path, allow_pickle=False) as npz:
      stored = {k: npz[k] for k in npz.files}
  except (OSError, ValueError) as e:
    raise ValueError(f"{where} is not an .npz weight file ({e})") from e
  target = traverse_util.flatten_dict(dict(variables), sep="/")
  # Parameters first, then the other collections (batch_stats).
  for key in sorted(target, key=lambda k: (not k.startswith("params/"), k)):
    if not keep(key):
      continue
    if key not in stored:
      raise ValueError(f"weights {where} have no {key!r} (the model's first missing "
                       f"variable; the file has e.g. {sorted(stored)[:3]})")
    if np.shape(stored[key]) != np.shape(target[key]):
      raise ValueError(f"weights {where}: {key!r} has shape {np.shape(stored[key])}, the "
                       f"model expects {np.shape(target[key])} (first mismatch)")
  extra = [k for k in stored if keep(k) and k not in target]
  if extra:
    raise ValueError(f"weights {where} hold {extra[0]!r}, which the model does not have "
                     f"({len(extra)} such); exclude it with exclude=")
  merged = {k: (np.asarray(stored[k], np.asarray(v).dtype) if keep(k) else v)
            for k, v in target.items()}
  return traverse_util.unflatten_dict(merged, sep="/")


def load_weights(path, variables: dict, *, exclude=("params/head",)) -> dict:
  """``variables`` (params and batch_stats of a freshly initialized ResNet) with every
  entry not under an ``exclude`` prefix (by default: the classifier, whose classes differ
  in transfer) replaced by the stored one, from an ``.npz`` file (:func:`save_npz`
  layout), a flax msgpack file or an orbax checkpoint directory. A missing, extra or
  differently shaped entry is a one-line ValueError naming the first one."""
  path = pathlib.Path(os.fspath(path))
  if not path.exists():
    raise FileNotFoundError(f"weights {str(path)!r} do not exist; expected an .npz file, a "
                            "flax msgpack file or an orbax checkpoint directory")
  excluded = tuple(p.strip("/") for p in exclude)
  if path.suffix == ".npz":
    return _load_npz(path, variables, excluded)
  return load_params(path, dict(variables), strict=True, exclude=excluded)
