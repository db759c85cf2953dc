"""Small Flax classifiers that take flat feature vectors."""

from __future__ import annotations

import numbers
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

MODEL_KINDS: tuple[str, ...] = ("mlp", "cnn")


class MLP(nn.Module):
  """Flatten, then Dense+relu for each hidden width, then Dense to logits."""

  hidden: Sequence[int]
  num_classes: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
  """Conv3x3+relu+avg-pool blocks on the reshaped image, global mean pool, Dense to logits."""

  num_classes: int
  image_shape: tuple[int, ...]
  channels: Sequence[int] = (16, 32)

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = x.reshape((x.shape[0], *self.image_shape))
    for ch in self.channels:
      x = nn.relu(nn.Conv(ch, (3, 3), padding="SAME")(x))
      if min(x.shape[1], x.shape[2]) // 2 >= 2:
        x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


def make_model(
    kind: str,
    *,
    width: int,
    depth: int,
    num_classes: int,
    image_shape: tuple[int, ...] | None = None,
) -> nn.Module:
  """An MLP with `depth` hidden layers of `width`, or a CNN with `depth` conv blocks of
  `width`, 2*`width`, ... channels."""
  if kind not in MODEL_KINDS:
    raise ValueError(f"unknown model {kind!r}; accepted: {', '.join(MODEL_KINDS)}")
  for label, value in (("width", width), ("depth", depth), ("num_classes", num_classes)):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
      raise ValueError(f"{label} must be an integer >= 1, got {value!r}")
  width, depth, num_classes = int(width), int(depth), int(num_classes)
  if kind == "mlp":
    return MLP(hidden=(width,) * depth, num_classes=num_classes)
  if image_shape is None or len(image_shape) != 3:
    raise ValueError(
        f"model 'cnn' needs an image dataset with image_shape (H, W, C), got {image_shape!r}; "
        "use 'mlp' for tabular data"
    )
  return CNN(
      num_classes=num_classes,
      image_shape=tuple(image_shape),
      channels=tuple(width * 2**i for i in range(depth)),
  )
