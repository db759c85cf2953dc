"""Small Flax classifiers that take flat feature vectors.

Every classifier takes ``dropout_rate`` (None: no dropout). The rate may be a
traced value, so runs with different rates share one compiled program; the
dropout mask needs a ``"dropout"`` rng at ``apply``.

Masked depth: the families of :data:`DEPTH_MASKED` also take ``active_depth`` (may be
traced, at least 1): a model built with ``depth=D`` then runs only its first
``active_depth`` layers and passes its input through the others (the stem and the head
always run). With the parameters of a shallower model zero-padded by :func:`pad_depth`,
it computes that model's function and gradients (the padded parameters get zero
gradients), so runs of any depth up to D share one compiled program.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from metaopt.validation import check_choice, check_int

# The small families every offline dataset can train (sweeps, meta-features); larger
# models of other modalities register themselves (register_model).
MODEL_KINDS: tuple[str, ...] = ("mlp", "cnn", "rnn", "transformer")
MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(kind: str, build: Callable[..., nn.Module]) -> None:
  """Makes ``make_model(kind, ...)`` call ``build(width=, depth=, num_classes=,
  image_shape=, info=)`` (``info``: the dataset's modality metadata)."""
  if kind in MODEL_KINDS:
    raise ValueError(f"model {kind!r} is built in; pick another name")
  MODEL_BUILDERS[kind] = build


def model_kinds() -> tuple[str, ...]:
  """Every model ``make_model`` builds: :data:`MODEL_KINDS` and the registered ones."""
  return MODEL_KINDS + tuple(MODEL_BUILDERS)


# Families whose runs are vmapped when a grid trains; the others run one after another in one
# program (lax.map): vmapped convolutions are slow on the CPU, and vmapped GRU groups of 8 runs
# hung the XLA CPU runtime (all threads idle in block_until_ready) with jax 0.10.2 here.
VMAPPED = ("mlp", "transformer")

# Families whose calls take ``active_depth`` (the cnn's blocks change the channel count
# and the spatial size, so a block cannot be the identity).
DEPTH_MASKED: tuple[str, ...] = ("mlp", "rnn", "transformer")
MAX_TOKENS = 16  # sequence length a flat (non-image) input is cut into for rnn/transformer


def dropout(module: nn.Module, x: jnp.ndarray, rate) -> jnp.ndarray:
  """Inverted dropout with a possibly traced ``rate`` (flax's nn.Dropout needs a static one)."""
  if rate is None:
    return x
  keep = jax.random.uniform(module.make_rng("dropout"), x.shape) >= rate
  return jnp.where(keep, x / (1.0 - rate), 0.0)


def _skip(i: int, active_depth, new: jnp.ndarray, old: jnp.ndarray) -> jnp.ndarray:
  """Layer ``i``'s output, or its input once ``i`` is at or past ``active_depth``."""
  return new if active_depth is None else jnp.where(i < active_depth, new, old)


def as_tokens(x: jnp.ndarray, image_shape: tuple[int, ...] | None) -> jnp.ndarray:
  """[batch, tokens, chunk]: image rows, or a flat input cut into at most MAX_TOKENS
  equal chunks (zero-padded at the end)."""
  n = x.shape[0]
  if image_shape is not None:
    h, w, c = image_shape
    return x.reshape((n, h, w * c))
  x = x.reshape((n, -1))
  d = x.shape[1]
  chunk = -(-d // MAX_TOKENS)
  tokens = -(-d // chunk)
  x = jnp.pad(x, ((0, 0), (0, tokens * chunk - d)))
  return x.reshape((n, tokens, chunk))


class MLP(nn.Module):
  """Flatten, then Dense+relu for each hidden width, then Dense to logits."""

  hidden: Sequence[int]
  num_classes: int

  @nn.compact
  def __call__(self, x: jnp.ndarray, dropout_rate=None, active_depth=None,
               active_classes=None) -> jnp.ndarray:
    x = x.reshape((x.shape[0], -1))
    for i, width in enumerate(self.hidden):
      y = dropout(self, nn.relu(nn.Dense(width)(x)), dropout_rate)
      x = y if i == 0 else _skip(i, active_depth, y, x)  # the first changes the width
    return mask_classes(nn.Dense(self.num_classes)(x), active_classes)


def mask_classes(logits: jnp.ndarray, active_classes) -> jnp.ndarray:
  """Logits of the first ``active_classes`` (may be traced) classes; the others get a
  logit of -1e30: softmax gives them probability 0 and their weights zero gradients,
  so a head padded with zero columns computes what the unpadded head computes."""
  if active_classes is None:
    return logits
  return jnp.where(jnp.arange(logits.shape[-1]) < active_classes, logits, -1e30)


class CNN(nn.Module):
  """Conv3x3+relu+avg-pool blocks on the reshaped image, global mean pool, Dense to logits."""

  num_classes: int
  image_shape: tuple[int, ...]
  channels: Sequence[int] = (16, 32)

  @nn.compact
  def __call__(self, x: jnp.ndarray, dropout_rate=None) -> jnp.ndarray:
    x = x.reshape((x.shape[0], *self.image_shape))
    for ch in self.channels:
      x = dropout(self, nn.relu(nn.Conv(ch, (3, 3), padding="SAME")(x)), dropout_rate)
      if min(x.shape[1], x.shape[2]) // 2 >= 2:
        x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


class RNN(nn.Module):
  """Stacked GRUs over the input's rows (images) or chunks (flat inputs); Dense on the last
  output of the top layer."""

  num_classes: int
  width: int
  depth: int
  image_shape: tuple[int, ...] | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, dropout_rate=None, active_depth=None) -> jnp.ndarray:
    h = as_tokens(x, self.image_shape)
    for i in range(self.depth):
      y = dropout(self, nn.RNN(nn.GRUCell(self.width))(h), dropout_rate)
      h = y if i == 0 else _skip(i, active_depth, y, h)  # the first changes the width
    return nn.Dense(self.num_classes)(h[:, -1])


class Transformer(nn.Module):
  """Pre-LayerNorm encoder over row/chunk tokens (learned positions), mean pool, Dense."""

  num_classes: int
  width: int
  depth: int
  heads: int = 2
  image_shape: tuple[int, ...] | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, dropout_rate=None, active_depth=None) -> jnp.ndarray:
    tokens = as_tokens(x, self.image_shape)
    pos = self.param("position", nn.initializers.normal(0.02), tokens.shape[1:2] + (self.width,))
    h = nn.Dense(self.width)(tokens) + pos
    for i in range(self.depth):
      a = nn.MultiHeadDotProductAttention(num_heads=self.heads)(nn.LayerNorm()(h))
      y = h + dropout(self, a, dropout_rate)
      m = nn.Dense(self.width)(nn.gelu(nn.Dense(2 * self.width)(nn.LayerNorm()(y))))
      h = _skip(i, active_depth, y + dropout(self, m, dropout_rate), h)
    return nn.Dense(self.num_classes)(nn.LayerNorm()(h).mean(axis=1))


def make_model(
    kind: str,
    *,
    width: int,
    depth: int,
    num_classes: int,
    image_shape: tuple[int, ...] | None = None,
    info: Any = None,
) -> nn.Module:
  """An MLP with `depth` hidden layers of `width`; a CNN with `depth` conv blocks of
  `width`, 2*`width`, ... channels; an RNN of `depth` stacked GRUs of `width`; a
  Transformer of `depth` blocks of `width` (2 heads); or a registered model, built from
  the same sizes and the dataset's ``info``."""
  check_choice("model", kind, model_kinds())
  width, depth, num_classes = (check_int(label, value) for label, value in
                               (("width", width), ("depth", depth), ("num_classes", num_classes)))
  if kind in MODEL_BUILDERS:
    return MODEL_BUILDERS[kind](width=width, depth=depth, num_classes=num_classes,
                                image_shape=image_shape, info=info)
  if kind == "mlp":
    return MLP(hidden=(width,) * depth, num_classes=num_classes)
  if kind in ("rnn", "transformer"):
    if kind == "transformer" and width % 2:
      raise ValueError(f"model 'transformer' needs an even width (2 heads), got {width}")
    image = tuple(image_shape) if image_shape is not None else None
    cls = RNN if kind == "rnn" else Transformer
    return cls(num_classes=num_classes, width=width, depth=depth, image_shape=image)
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


def pad_depth(kind: str, params: dict, like: dict, *, depth: int, max_depth: int) -> dict:
  """The parameters of a ``depth``-layer model of a :data:`DEPTH_MASKED` family, laid out
  as the ``max_depth``-layer model's (``like``: its parameters or their shapes): the
  head (and the transformer's final LayerNorm) moved to the deep model's names, the
  missing layers zeros. Call that model with ``active_depth=depth``."""
  check_choice("model", kind, DEPTH_MASKED)
  check_int("max_depth", max_depth, low=check_int("depth", depth))
  moved = {"mlp": {f"Dense_{depth}": f"Dense_{max_depth}"},
           "rnn": {},
           "transformer": {f"LayerNorm_{2 * depth}": f"LayerNorm_{2 * max_depth}",
                           f"Dense_{2 * depth + 1}": f"Dense_{2 * max_depth + 1}"}}[kind]
  source = {new: old for old, new in moved.items()}
  zeros = lambda tree: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), tree)
  out = {}
  for name, target in like.items():
    old = source.get(name, None if name in moved else name)
    out[name] = params[old] if old in params else zeros(target)
  return out


class Conv4(nn.Module):
  """The MAML/ProtoNet learner: 4 x (conv3x3 ``filters``, BatchNorm, ReLU, max-pool 2), Dense.

  BatchNorm always normalizes with the statistics of the batch it is given (no
  running averages). Under ``jax.vmap`` over a meta-batch every task gets its own
  statistics, so nothing leaks between tasks; at test time the query batch is
  normalized with its own statistics, as in the original MAML (transductive).
  """

  num_classes: int
  filters: int = 64
  blocks: int = 4

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    for i in range(self.blocks):
      x = nn.Conv(self.filters, (3, 3), padding="SAME")(x)
      x = batch_norm(x, self.param(f"bn{i}_scale", nn.initializers.ones, (self.filters,)),
                     self.param(f"bn{i}_bias", nn.initializers.zeros, (self.filters,)))
      x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2), padding="SAME")
    return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


def batch_norm(x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray,
               eps: float = 1e-5) -> jnp.ndarray:
  """Normalizes over every axis but the last with this batch's own statistics."""
  axes = tuple(range(x.ndim - 1))
  mean = x.mean(axes)
  var = jnp.square(x - mean).mean(axes)
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias
