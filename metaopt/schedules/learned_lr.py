"""A learned learning-rate controller as an optax transform and a stateful schedule.

The controller is a small Flax network over scale-free training-state features:
an MLP (:class:`LRController`) or an LSTM (:class:`LSTMController`, whose memory
travels in the optimizer state beside the features). Its weights ``theta`` live
in the optimizer state too, so ``jax.grad`` through an unroll of training steps
reaches them. With ``update_every=N`` the controller decides once per ``N`` steps
and the LR is held in between.

A controller travels as a folder of two files (:func:`save_controller`,
:func:`load_controller`): ``lr_controller.msgpack`` (the weights) and
``lr_controller.json`` (format version, network kind and shape, feature names,
the LR, the bounds and the update interval it was trained with). An MLP that
decides every step is written as format version 1, exactly as before; an LSTM
or an update interval above 1 needs version 2. :func:`pretrained_lr` deploys
one, by default the controller shipped with metaopt.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from metaopt.schedules.common import check_float_updates, current_lr, scale_by_lr
from metaopt.validation import (check_choice, check_int, check_number, check_positive, renamed,
                                required, shown)

PyTree = Any

# Decays of the training-loss moving averages: time scales of ~10, 100, 1000 steps.
LOSS_EMA_DECAYS = (0.9, 0.99, 0.999)
NORM_EMA_DECAY = 0.99
FEATURE_NAMES = (
    "fraction_done",          # step / total_steps, in [0, 1]
    "log_loss_vs_initial",    # log(loss / first loss)
    "log_loss_vs_ema_10",     # log(loss / EMA over ~10 steps)
    "log_loss_vs_ema_100",
    "log_loss_vs_ema_1000",
    "log_ema_10_vs_ema_100",  # short-term trend of the loss
    "log_norm_vs_initial",    # log(previous update norm / first update norm)
    "log_norm_vs_ema",        # log(previous update norm / its EMA over ~100 steps)
    "log_lr_vs_base",         # previous LR relative to base_lr
    "has_val_loss",           # 1 when a validation loss is passed
    "log_val_vs_initial",     # log(val loss / first val loss)
    "log_val_vs_train",       # log(val loss / train-loss EMA): generalization gap
)
NUM_FEATURES = len(FEATURE_NAMES)
# The features that need the norm of the update direction: a reduction over every
# parameter at each step, which on XLA:CPU costs about as much as half of Adam's update
# pass (docs/benchmarks.md). A controller that reads neither skips it.
NORM_FEATURES = ("log_norm_vs_initial", "log_norm_vs_ema")
# The bounds and response of the LR, shared by meta-training (MetaLRConfig) and
# deployment: a controller runs with the settings it was trained with.
DEFAULT_SETTINGS = dict(min_lr_factor=1e-2, max_lr_factor=10.0, max_log_change=0.25,
                        response_time=0.02, min_response_steps=10.0)
SETTINGS = tuple(DEFAULT_SETTINGS)
FEATURE_CLIP = 5.0
F32_TINY = float(np.finfo(np.float32).tiny)
F32_MAX = float(np.finfo(np.float32).max) / 2  # margin for the rounding of exp
_TINY = 1e-12


class LRController(nn.Module):
  """MLP from :data:`FEATURE_NAMES` to a raw log-LR multiplier.

  The output layer starts at zero, so an untrained controller keeps ``base_lr``.
  """
  hidden: Sequence[int] = (32, 32)

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    x = features
    for width in self.hidden:
      x = nn.tanh(nn.Dense(width)(x))
    return nn.Dense(1, kernel_init=nn.initializers.zeros)(x)[..., 0]


class LSTMController(nn.Module):
  """Recurrent controller: stacked LSTM cells (one per entry of ``hidden``) over
  :data:`FEATURE_NAMES`, then a raw log-LR multiplier.

  ``__call__(features, memory) -> (raw, memory)``. The memory holds each layer's
  ``(c, h)``; it starts at :meth:`initial_memory` (zeros) and is carried in the
  optimizer state (``LearnedLRState.memory``). The output layer starts at zero, so
  an untrained controller keeps ``base_lr``.
  """
  hidden: Sequence[int] = (16,)

  @nn.compact
  def __call__(self, features: jax.Array, memory: PyTree) -> tuple[jax.Array, PyTree]:
    x, carries = features, []
    for width, carry in zip(self.hidden, memory, strict=True):
      carry, x = nn.OptimizedLSTMCell(width)(carry, x)
      carries.append(carry)
    return nn.Dense(1, kernel_init=nn.initializers.zeros)(x)[..., 0], tuple(carries)

  def initial_memory(self) -> PyTree:
    """The memory before the first step: zero ``(c, h)`` per layer, float32."""
    return tuple((jnp.zeros((w,), jnp.float32), jnp.zeros((w,), jnp.float32))
                 for w in self.hidden)


CONTROLLERS = {"mlp": LRController, "lstm": LSTMController}  # kind -> Flax module


def make_controller(kind: str = "mlp", hidden: Sequence[int] = (32, 32)) -> nn.Module:
  """The controller of ``kind`` (``"mlp"`` or ``"lstm"``, :data:`CONTROLLERS`) with
  layer widths ``hidden``."""
  kind = check_choice("controller", kind, CONTROLLERS)
  return CONTROLLERS[kind](hidden=tuple(check_int("hidden", h) for h in hidden))


def controller_kind(controller: nn.Module) -> str:
  """``"mlp"`` or ``"lstm"``: the :data:`CONTROLLERS` entry ``controller`` is."""
  for kind, cls in CONTROLLERS.items():
    if type(controller) is cls:
      return kind
  raise ValueError(f"controller must be one of {', '.join(c.__name__ for c in CONTROLLERS.values())}"
                   f" to be saved, got {controller!r}")


def is_recurrent(controller) -> bool:
  """Whether ``controller`` carries a memory (it has an ``initial_memory()`` method)."""
  return callable(getattr(controller, "initial_memory", None))


def controller_memory(controller) -> PyTree:
  """The memory a controller starts with: ``controller.initial_memory()`` for a
  recurrent one, ``()`` (no leaves) for a feed-forward one or a plain callable."""
  return controller.initial_memory() if is_recurrent(controller) else ()


def apply_controller(controller, theta: PyTree, features: jax.Array,
                     memory: PyTree = ()) -> tuple[jax.Array, PyTree]:
  """One decision of any controller: ``(raw log-LR output, next memory)``. A feed-forward
  controller (Flax module or callable ``(theta, features) -> raw``) returns ``memory``
  unchanged."""
  return _controller_apply(controller)(theta, features, memory)


def check_features(features: Optional[Sequence[str]], caller: str = "features"
                   ) -> tuple[str, ...]:
  """``features`` as a tuple of names from :data:`FEATURE_NAMES` (``None``: all of them);
  a ValueError naming an unknown or repeated name."""
  if features is None:
    return FEATURE_NAMES
  if isinstance(features, str) or not all(isinstance(f, str) for f in features):
    raise ValueError(f"{caller}: features must be a list of names from "
                     f"{', '.join(FEATURE_NAMES)}, got {features!r}")
  features = tuple(features)
  unknown = [f for f in features if f not in FEATURE_NAMES]
  if unknown:
    raise ValueError(f"{caller}: unknown feature {unknown[0]!r}; accepted: "
                     f"{', '.join(FEATURE_NAMES)}")
  repeated = sorted({f for f in features if features.count(f) > 1})
  if repeated or not features:
    raise ValueError(f"{caller}: features must name at least one feature, each once, "
                     f"got {list(features)}")
  return features


def init_controller(key: jax.Array, controller: nn.Module = LRController(),
                    features: Optional[Sequence[str]] = None) -> PyTree:
  """Fresh controller weights ``theta`` for a controller reading ``features`` (names from
  :data:`FEATURE_NAMES`, default all); an untrained controller keeps base_lr."""
  inputs = jnp.zeros((len(check_features(features, "init_controller")),))
  if is_recurrent(controller):
    return controller.init(key, inputs, controller_memory(controller))["params"]
  return controller.init(key, inputs)["params"]


class LRFeatureState(NamedTuple):
  """Running statistics the controller's features are computed from."""
  count: jax.Array          # steps taken (int32)
  total_steps: jax.Array    # horizon the fraction-done feature refers to
  initial_loss: jax.Array
  loss_emas: jax.Array      # one EMA per entry of LOSS_EMA_DECAYS
  initial_norm: jax.Array   # 0 until the first finite, positive norm
  norm_ema: jax.Array
  last_norm: jax.Array      # norm of the previous step's incoming update
  initial_val_loss: jax.Array  # NaN until a finite validation loss is seen
  min_loss: jax.Array = None   # lowest training loss so far (+inf before any)


class LearnedLRState(NamedTuple):
  """State of :func:`scale_by_learned_lr`: controller weights, features, current LR,
  and the controller's memory (``()`` for a feed-forward controller)."""
  theta: PyTree
  features: LRFeatureState
  learning_rate: jax.Array  # the LR applied at the latest step
  memory: PyTree = ()       # a recurrent controller's state, e.g. LSTMController's (c, h)


class ControllerSpec(NamedTuple):
  """Settings that turn controller outputs into a bounded LR.

  Python floats when the settings are concrete; float32 arrays when they are
  traced (``optax.inject_hyperparams`` under ``jit``, or ``jax.grad`` with
  respect to them).
  """
  apply: Callable[[PyTree, jax.Array, PyTree], tuple[jax.Array, PyTree]]  # (theta, x, memory)
  base_lr: Union[float, jax.Array]
  log_min: Union[float, jax.Array]         # lower bound of log(lr / base_lr)
  log_max: Union[float, jax.Array]         # upper bound of log(lr / base_lr)
  max_log_change: Union[float, jax.Array]  # largest |change| of log(lr) in one step
  response_time: Union[float, jax.Array]   # time to follow the target, in total_steps
  min_response_steps: Union[float, jax.Array]
  update_every: int = 1  # the controller decides once per this many steps (a Python int)
  features: Optional[tuple[int, ...]] = None  # indices into FEATURE_NAMES it reads; None: all

  @property
  def reads_norm(self) -> bool:
    """Whether the controller reads a feature of the update norm."""
    return self.features is None or any(FEATURE_NAMES[i] in NORM_FEATURES
                                         for i in self.features)


def _controller_apply(controller) -> Callable[[PyTree, jax.Array, PyTree],
                                              tuple[jax.Array, PyTree]]:
  """``(theta, features, memory) -> (raw, memory)`` for any controller."""
  if isinstance(controller, nn.Module):
    if is_recurrent(controller):
      return lambda theta, x, memory: controller.apply({"params": theta}, x, memory)
    return lambda theta, x, memory: (controller.apply({"params": theta}, x), memory)
  if callable(controller):
    return lambda theta, x, memory: (controller(theta, x), memory)
  raise ValueError(f"controller must be a flax Module or a callable, got {controller!r}")


def _spec(controller, *, base_lr, min_lr_factor, max_lr_factor, max_log_change,
          response_time, min_response_steps, caller: str, update_every: int = 1,
          features: Optional[Sequence[str]] = None):
  """Concrete settings are checked and kept as Python floats (so float32 runs are
  bit for bit what they were); traced ones are taken as float32 arrays. Errors
  name ``caller``, the function the user called."""
  try:
    spec = _checked_spec(controller, base_lr=base_lr, min_lr_factor=min_lr_factor,
                         max_lr_factor=max_lr_factor, max_log_change=max_log_change,
                         response_time=response_time, min_response_steps=min_response_steps,
                         update_every=update_every)
  except ValueError as e:
    raise ValueError(f"{caller}: {e}") from None
  names = check_features(features, caller)
  return spec._replace(features=None if names == FEATURE_NAMES
                       else tuple(FEATURE_NAMES.index(f) for f in names))


def _checked_spec(controller, *, base_lr, min_lr_factor, max_lr_factor, max_log_change,
                  response_time, min_response_steps, update_every=1):
  every = check_int("update_every", update_every)
  base = check_positive("learning_rate", base_lr, traced_ok=True)
  change = check_positive("max_log_change", max_log_change, traced_ok=True)
  response = check_positive("response_time", response_time, traced_ok=True)
  min_steps = check_number("min_response_steps", min_response_steps, low=1.0, traced_ok=True)
  low = check_number("min_lr_factor", min_lr_factor, low=0.0, low_open=True, high=1.0,
                     traced_ok=True)
  high = check_number("max_lr_factor", max_lr_factor, low=1.0, traced_ok=True)
  # The LR lives in float32: every LR the bounds allow must be a normal float32.
  if base is not None:
    for label, lr in (("learning_rate", base),
                      ("learning_rate * min_lr_factor", base * low if low else None),
                      ("learning_rate * max_lr_factor", base * high if high else None)):
      if lr is not None and not F32_TINY <= lr <= F32_MAX:
        raise ValueError(f"{label} = {lr:g} is outside the float32 range "
                         f"[{F32_TINY:g}, {F32_MAX:g}] the LR is kept in")

  def value(checked, given):
    return checked if checked is not None else jnp.asarray(given, jnp.float32)

  def log(checked, given):
    return math.log(checked) if checked is not None else jnp.log(value(None, given))

  return ControllerSpec(_controller_apply(controller), value(base, base_lr),
                        log(low, min_lr_factor), log(high, max_lr_factor),
                        value(change, max_log_change), value(response, response_time),
                        value(min_steps, min_response_steps), every)


def init_lr_state(theta: PyTree, *, base_lr: float, total_steps,
                  memory: PyTree = ()) -> LearnedLRState:
  nan = jnp.full((), jnp.nan, jnp.float32)
  zero = jnp.zeros((), jnp.float32)
  features = LRFeatureState(
      count=jnp.zeros((), jnp.int32),
      total_steps=jnp.asarray(total_steps, jnp.float32),
      initial_loss=zero, loss_emas=jnp.zeros((len(LOSS_EMA_DECAYS),), jnp.float32),
      initial_norm=zero, norm_ema=zero, last_norm=zero, initial_val_loss=nan,
      min_loss=jnp.full((), jnp.inf, jnp.float32))
  return LearnedLRState(theta, features, jnp.asarray(base_lr, jnp.float32), memory)


def _log_ratio(a, b):
  """log(a / b) for positive a, b, finite (and with finite gradients) everywhere."""
  return jnp.log(jnp.maximum(a, _TINY)) - jnp.log(jnp.maximum(b, _TINY))


def _finite_or(x, fallback):
  """``x`` where finite, else ``fallback``; the double where keeps gradients finite."""
  ok = jnp.isfinite(x)
  return jnp.where(ok, jnp.where(ok, x, 0.0), fallback)


def controller_features(state: LearnedLRState, spec: ControllerSpec, loss, norm,
                        val_loss) -> tuple[jax.Array, LRFeatureState]:
  """The feature vector for this step and the updated running statistics.

  ``loss`` must be finite here (the caller holds the state on a bad step);
  ``norm`` and ``val_loss`` may be ``None``, and ``norm`` may be zero or
  non-finite (no norm yet); their features are then zero.

  The loss features are log ratios, so they need positive losses. Once a loss <= 0
  has been seen, every loss (training and validation) is shifted by
  ``2 |lowest loss| + |first loss|`` before the logs: a loss that can be zero or
  negative (a hinge, a log-likelihood) still drives the controller. While every
  loss has been positive the shift is exactly zero.
  """
  f = state.features
  first = f.count == 0
  loss = jnp.asarray(loss, jnp.float32)
  initial_loss = jnp.where(first, loss, f.initial_loss)
  decays = jnp.asarray(LOSS_EMA_DECAYS, jnp.float32)
  prev_emas = jnp.where(first, loss, f.loss_emas)
  loss_emas = decays * prev_emas + (1 - decays) * loss
  min_loss = jnp.minimum(f.min_loss, loss)
  # A constant for the gradient: the shift only moves where the logs are taken.
  shift = jax.lax.stop_gradient(jnp.where(
      min_loss > 0, 0.0, 2 * jnp.abs(min_loss) + jnp.abs(initial_loss) + _TINY))

  if norm is None:
    initial_norm, norm_ema = f.initial_norm, f.norm_ema
    norm_feats = [jnp.zeros(()), jnp.zeros(())]
  else:
    norm = jnp.asarray(norm, jnp.float32)
    valid = jnp.isfinite(norm) & (norm > 0)
    norm = jnp.where(valid, norm, 1.0)
    start = valid & (f.initial_norm <= 0)
    initial_norm = jnp.where(start, norm, f.initial_norm)
    prev_norm_ema = jnp.where(start, norm, f.norm_ema)
    norm_ema = jnp.where(valid, NORM_EMA_DECAY * prev_norm_ema + (1 - NORM_EMA_DECAY) * norm,
                         f.norm_ema)
    norm_feats = [jnp.where(valid, _log_ratio(norm, initial_norm), 0.0),
                  jnp.where(valid, _log_ratio(norm, prev_norm_ema), 0.0)]

  if val_loss is None:
    initial_val = f.initial_val_loss
    val_feats = [jnp.zeros(()), jnp.zeros(()), jnp.zeros(())]
  else:
    val_loss = jnp.asarray(val_loss, jnp.float32)
    has_val = jnp.isfinite(val_loss)
    initial_val = jnp.where(jnp.isfinite(f.initial_val_loss), f.initial_val_loss,
                            jnp.where(has_val, val_loss, jnp.nan))
    safe_val = jnp.where(has_val, val_loss, 1.0)
    safe_init = jnp.where(jnp.isfinite(initial_val), initial_val, 1.0)
    val_feats = [has_val.astype(jnp.float32),
                 jnp.where(has_val, _log_ratio(safe_val + shift, safe_init + shift), 0.0),
                 jnp.where(has_val, _log_ratio(safe_val + shift, loss_emas[1] + shift), 0.0)]

  count = f.count + 1
  fraction = jnp.clip(count / jnp.maximum(f.total_steps, 1.0), 0.0, 1.0)
  features = jnp.stack([
      fraction,
      _log_ratio(loss + shift, initial_loss + shift),
      _log_ratio(loss + shift, prev_emas[0] + shift),
      _log_ratio(loss + shift, prev_emas[1] + shift),
      _log_ratio(loss + shift, prev_emas[2] + shift),
      _log_ratio(prev_emas[0] + shift, prev_emas[1] + shift),
      *norm_feats,
      jnp.log(state.learning_rate / spec.base_lr),
      *val_feats,
  ]).astype(jnp.float32)
  features = jnp.clip(features, -FEATURE_CLIP, FEATURE_CLIP)
  new_f = LRFeatureState(count, f.total_steps, initial_loss, loss_emas,
                         initial_norm, norm_ema, f.last_norm, initial_val, min_loss)
  return features, new_f


def _bounded(raw, low, high):
  """Smoothly squashes ``raw`` into (low, high) with unit slope at zero."""
  return jnp.where(raw > 0, high * jnp.tanh(raw / high), low * jnp.tanh(raw / low))


def advance(state: LearnedLRState, spec: ControllerSpec, *, loss, norm=None,
            val_loss=None) -> LearnedLRState:
  """One controller step: update the features and choose this step's LR.

  ``log(lr)`` moves a fraction ``1 / response_steps`` of the way to the
  controller's bounded target each step (a smooth, never-saturating rate limit),
  and by at most ``max_log_change``. A non-finite ``loss`` or controller output
  keeps the previous LR, features and memory, so a NaN in the inner run never
  becomes a NaN learning rate.

  With ``spec.update_every = N > 1`` the features still update every step, but the
  controller decides (and its memory advances) only at steps ``0, N, 2N, ...``;
  each decision moves the LR as far as ``N`` steps of following a fixed target
  would, and the LR is held until the next one.
  """
  loss = jnp.asarray(loss, jnp.float32)
  ok = jnp.isfinite(loss)
  safe_loss = jnp.where(ok, loss, 1.0)
  features, new_f = controller_features(state, spec, safe_loss, norm, val_loss)
  if spec.features is not None:
    features = features[np.asarray(spec.features)]
  raw, memory = spec.apply(state.theta, features, state.memory)
  raw = jnp.asarray(raw, jnp.float32).reshape(())
  target = _bounded(_finite_or(raw, 0.0), spec.log_min, spec.log_max)
  prev = jnp.log(state.learning_rate / spec.base_lr)
  response_steps = jnp.maximum(spec.min_response_steps,
                               spec.response_time * state.features.total_steps)
  every = spec.update_every
  if every == 1:
    change = jnp.clip((target - prev) / response_steps,
                      -spec.max_log_change, spec.max_log_change)
  else:
    # N steps toward a fixed target, compounded, and N steps' worth of the bound.
    follow = 1 - (1 - 1 / response_steps) ** every
    change = jnp.clip((target - prev) * follow,
                      -every * spec.max_log_change, every * spec.max_log_change)
  ok = ok & jnp.isfinite(raw)
  decide = ok if every == 1 else ok & (state.features.count % every == 0)
  new_lr = jnp.where(decide, spec.base_lr * jnp.exp(prev + change), state.learning_rate)
  keep = lambda new, old: jnp.where(ok, new, old)
  new_f = jax.tree.map(keep, new_f, state.features)
  new_f = new_f._replace(count=state.features.count + 1)  # steps still count
  memory = jax.tree.map(lambda new, old: jnp.where(decide, new, old).astype(old.dtype),
                        memory, state.memory)
  return LearnedLRState(state.theta, new_f, new_lr.astype(jnp.float32), memory)


def _training_loss(value, caller: str) -> jax.Array:
  """The ``value`` extra arg as a scalar; an error naming ``caller`` when it is missing."""
  if value is None:
    raise ValueError(f"{caller} needs the training loss at every step: call "
                     "tx.update(updates, state, params, value=loss)")
  value = jnp.asarray(value)
  if value.shape != ():
    raise ValueError(f"{caller}: value must be the scalar training loss, got an array of "
                     f"shape {value.shape}")
  return value


def scale_by_learned_lr(
    controller: Union[nn.Module, Callable[[PyTree, jax.Array], jax.Array]],
    theta: PyTree,
    *,
    learning_rate: Optional[float] = None,
    total_steps=None,
    min_lr_factor: float = DEFAULT_SETTINGS["min_lr_factor"],
    max_lr_factor: float = DEFAULT_SETTINGS["max_lr_factor"],
    max_log_change: float = DEFAULT_SETTINGS["max_log_change"],
    response_time: float = DEFAULT_SETTINGS["response_time"],
    min_response_steps: float = DEFAULT_SETTINGS["min_response_steps"],
    base_lr: Optional[float] = None,
    update_every: Optional[int] = None,
    features: Optional[Sequence[str]] = None,
    lagged: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Scales updates by ``-lr``, with ``lr`` chosen each step by a learned controller.

  Chain it after a direction, as ``optax.scale_by_learning_rate`` would be:
  ``optax.chain(optax.scale_by_adam(), scale_by_learned_lr(...))``. The LR is
  ``learning_rate * exp(z)`` with ``z`` in ``[log(min_lr_factor), log(max_lr_factor)]``;
  ``z`` follows the controller's target with a time constant of
  ``max(min_response_steps, response_time * total_steps)`` steps and changes by
  at most ``max_log_change`` per step.

  Args:
    controller: an :class:`LRController` (any flax Module mapping the
      :data:`FEATURE_NAMES` vector to a scalar), an :class:`LSTMController` (any
      flax Module with an ``initial_memory()`` method, called as
      ``(features, memory) -> (scalar, memory)``; the memory is kept in the state),
      or ``apply(theta, features)``.
    theta: the controller's weights; they are kept in the state.
    learning_rate: the LR of an untrained controller; bounds are relative to it.
    total_steps: training length, for the fraction-done feature.
    min_lr_factor, max_lr_factor: bounds of ``lr / learning_rate``.
    max_log_change: bound on ``|log(lr_t / lr_{t-1})|``.
    response_time, min_response_steps: how fast the LR follows the controller.
    base_lr: the old name of ``learning_rate`` (deprecated).
    update_every: the controller decides once per this many steps (``None`` or 1:
      every step; the number of steps per epoch: once per epoch) and the LR is held in
      between. A Python int >= 1 (in ``static_args`` of ``optax.inject_hyperparams``).
    features: the names from :data:`FEATURE_NAMES` the controller reads, in its input
      order (``None``: all). Without the :data:`NORM_FEATURES` the transform skips the
      norm of the update, a pass over every parameter at each step.
    lagged: each update applies the LR the controller chose at the step before (the
      first, ``learning_rate``), so this step's update does not wait for the controller
      network. On small models on a CPU that is most of its cost (docs/benchmarks.md);
      the shipped controller's accuracy is unchanged within its seeds.

  ``update`` takes the training loss as keyword ``value`` (required: without it
  the update raises) and an optional ``val_loss``; other extra args are ignored.
  The numeric settings may be traced (``optax.inject_hyperparams`` with
  ``static_args=("controller",)``, ``jax.grad``); concrete ones are checked here.
  """
  learning_rate = renamed("scale_by_learned_lr", "learning_rate", learning_rate, "base_lr",
                          base_lr)
  return _learned_lr(controller, theta, learning_rate=learning_rate, total_steps=total_steps,
                     min_lr_factor=min_lr_factor, max_lr_factor=max_lr_factor,
                     max_log_change=max_log_change, response_time=response_time,
                     min_response_steps=min_response_steps, caller="scale_by_learned_lr",
                     update_every=1 if update_every is None else update_every,
                     features=features, lagged=lagged)


def _learned_lr(controller, theta, *, learning_rate, total_steps, caller: str,
                lagged: bool = False, **settings) -> optax.GradientTransformationExtraArgs:
  """:func:`scale_by_learned_lr`, with errors naming ``caller``."""
  required(caller, "learning_rate", learning_rate, "the LR an untrained controller keeps")
  required(caller, "total_steps", total_steps, "the length of the training run")
  if not isinstance(lagged, (bool, np.bool_)):
    raise ValueError(f"{caller}: lagged must be True or False, got {shown(lagged)}")
  spec = _spec(controller, base_lr=learning_rate, caller=caller, **settings)
  _check_total_steps(total_steps, caller)
  memory = controller_memory(controller)

  def init_fn(params):
    del params
    return init_lr_state(theta, base_lr=spec.base_lr, total_steps=total_steps, memory=memory)

  def update_fn(updates, state, params=None, *, value=None, val_loss=None, **extra_args):
    del params, extra_args
    loss = _training_loss(value, caller)
    check_float_updates(updates, caller)
    previous_lr = state.learning_rate
    if not spec.reads_norm:
      state = advance(state, spec, loss=loss, val_loss=val_loss)
    else:
      # The norm feature uses the previous step's update: this step's norm then
      # needs no pass over the parameters before the scaling.
      state = advance(state, spec, loss=loss, norm=state.features.last_norm,
                      val_loss=val_loss)
      state = state._replace(features=state.features._replace(last_norm=_update_norm(updates)))
    return scale_by_lr(updates, previous_lr if lagged else state.learning_rate), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _update_norm(updates: PyTree) -> jax.Array:
  """The float32 norm of ``updates``; half-precision leaves are summed in float32 (their
  squares overflow float16), so the state's types never change."""
  wide = jax.tree.map(lambda u: u.astype(jnp.promote_types(u.dtype, jnp.float32)), updates)
  return optax.tree.norm(wide).astype(jnp.float32)


def _check_total_steps(total_steps, caller: str) -> None:
  try:
    check_positive("total_steps", total_steps, traced_ok=True)
  except ValueError as e:
    raise ValueError(f"{caller}: {e} (the length of the training run)") from None


class LearnedLRSchedule(optax.schedules.StatefulSchedule):
  """The learned controller as an optax stateful schedule.

  ``optax.inject_hyperparams(optax.adamw)(learning_rate=LearnedLRSchedule(...))``
  feeds it the extra args of each update. It needs two at every step (an update
  without them raises):

  - ``value``: the training loss;
  - ``grad_norm``: the norm of the previous step's update direction, which
    :func:`scale_by_learned_lr` tracks itself but a schedule cannot see:
    ``metaopt.direction_norm(updates, opt_state)`` after each update (``0.0`` at
    the first step). With it, the LRs equal those of ``optax.chain(direction,
    scale_by_learned_lr(...))`` on the same run. A controller whose ``features``
    leave out the :data:`NORM_FEATURES` does not need it (and ignores it).

  ``val_loss`` is optional. :meth:`from_file` builds one from a saved controller.
  """

  def __init__(self, controller, theta, *, learning_rate: Optional[float] = None,
               total_steps=None,
               min_lr_factor: float = DEFAULT_SETTINGS["min_lr_factor"],
               max_lr_factor: float = DEFAULT_SETTINGS["max_lr_factor"],
               max_log_change: float = DEFAULT_SETTINGS["max_log_change"],
               response_time: float = DEFAULT_SETTINGS["response_time"],
               min_response_steps: float = DEFAULT_SETTINGS["min_response_steps"],
               base_lr: Optional[float] = None, update_every: Optional[int] = None,
               features: Optional[Sequence[str]] = None):
    name = "LearnedLRSchedule"
    learning_rate = renamed(name, "learning_rate", learning_rate, "base_lr", base_lr)
    required(name, "learning_rate", learning_rate, "the LR an untrained controller keeps")
    required(name, "total_steps", total_steps, "the length of the training run")
    self.spec = _spec(controller, base_lr=learning_rate, min_lr_factor=min_lr_factor,
                      max_lr_factor=max_lr_factor, max_log_change=max_log_change,
                      response_time=response_time, min_response_steps=min_response_steps,
                      caller=name, update_every=1 if update_every is None else update_every,
                      features=features)
    _check_total_steps(total_steps, name)
    self.theta = theta
    self.total_steps = total_steps
    self.memory = controller_memory(controller)

  @classmethod
  def from_file(cls, path=None, *, total_steps, learning_rate: Optional[float] = None
                ) -> "LearnedLRSchedule":
    """The controller saved at ``path`` (default: the one shipped with metaopt), with
    the settings it was trained with; ``learning_rate`` defaults to its training LR."""
    saved = load_controller(path)
    return cls(saved.controller, saved.theta, total_steps=total_steps,
               learning_rate=saved.learning_rate if learning_rate is None else learning_rate,
               update_every=saved.update_every, features=saved.features, **saved.settings)

  def init(self) -> LearnedLRState:
    return init_lr_state(self.theta, base_lr=self.spec.base_lr,
                         total_steps=self.total_steps, memory=self.memory)

  def update(self, state: LearnedLRState, *, value=None, val_loss=None,
             grad_norm=None, **extra_args) -> LearnedLRState:
    del extra_args
    loss = _training_loss(value, "LearnedLRSchedule")
    if not self.spec.reads_norm:
      return advance(state, self.spec, loss=loss, val_loss=val_loss)
    if grad_norm is None:
      raise ValueError(
          "LearnedLRSchedule needs grad_norm= at every step: the norm of the previous "
          "step's update direction, metaopt.direction_norm(updates, opt_state) (0.0 at "
          "the first step); or chain metaopt.scale_by_learned_lr after the direction, "
          "which tracks it itself")
    return advance(state, self.spec, loss=loss, norm=grad_norm, val_loss=val_loss)

  def __call__(self, state: LearnedLRState, **extra_args) -> jax.Array:
    # Called without extra args only when inject_hyperparams initializes: the
    # initial LR. Weakly typed, like optax's own schedules: inject_hyperparams then
    # casts it to the params' dtype, so bfloat16 updates stay bfloat16.
    lr = state.learning_rate if not extra_args else self.update(state, **extra_args).learning_rate
    return jax.lax.full_like(0.0, lr)


def direction_norm(updates: PyTree, opt_state: PyTree) -> jax.Array:
  """The norm of the update direction of the step that produced ``updates`` (their norm
  over the LR applied, ``metaopt.current_lr(opt_state)``): the ``grad_norm`` a
  :class:`LearnedLRSchedule` reads at the next step."""
  return _update_norm(updates) / current_lr(opt_state)


def with_theta(opt_state: PyTree, theta: PyTree) -> PyTree:
  """``opt_state`` with the controller weights of every learned-LR state set to ``theta``."""
  is_lr_state = lambda x: isinstance(x, LearnedLRState)
  return jax.tree.map(lambda s: s._replace(theta=theta) if is_lr_state(s) else s,
                      opt_state, is_leaf=is_lr_state)


# --- controller files -------------------------------------------------------------

PRETRAINED_DIR = pathlib.Path(__file__).parent / "pretrained"
WEIGHTS_FILE = "lr_controller.msgpack"
CONFIG_FILE = "lr_controller.json"
PRETRAINED_WEIGHTS = PRETRAINED_DIR / WEIGHTS_FILE
FILE_FORMAT = "metaopt-lr-controller"
# Version 2 adds "kind" ("mlp" | "lstm") and "update_every", and allows "features" to
# be a subset of FEATURE_NAMES; an MLP deciding every step on every feature is still
# written as version 1, byte for byte as before, so older metaopt reads it.
FILE_VERSION = 2


class SavedController(NamedTuple):
  """A controller read by :func:`load_controller`."""
  controller: nn.Module  # an LRController or an LSTMController
  theta: PyTree
  settings: dict         # the SETTINGS keyword arguments it was trained with
  learning_rate: float   # the LR it was trained at (what an untrained controller keeps)
  info: dict             # anything else recorded with it (command, meta steps, seed)
  update_every: int = 1  # the controller decides once per this many steps
  features: tuple[str, ...] = FEATURE_NAMES  # what it reads, in its input order


def _checked_settings(settings: Optional[dict], where: str) -> dict:
  settings = dict(DEFAULT_SETTINGS if settings is None else settings)
  missing = [k for k in SETTINGS if k not in settings]
  unknown = [k for k in settings if k not in SETTINGS]
  if missing or unknown:
    raise ValueError(f"{where}: settings must hold exactly {', '.join(SETTINGS)}; "
                     f"missing {missing}, unknown {unknown}")
  _spec(lambda theta, x: x.sum(), base_lr=1.0, caller=where, **settings)
  return {k: float(settings[k]) for k in SETTINGS}


def _template(controller: nn.Module, features: Sequence[str] = FEATURE_NAMES) -> PyTree:
  """The shapes and dtypes of ``controller``'s weights, without computing them."""
  return jax.eval_shape(lambda key: init_controller(key, controller, features),
                        jax.random.key(0))


def save_controller(path: Union[str, pathlib.Path], theta: PyTree, *,
                    settings: Optional[dict] = None, hidden: Sequence[int] = (32, 32),
                    learning_rate: float = 1e-3, info: Optional[dict] = None,
                    kind: str = "mlp", update_every: int = 1,
                    features: Optional[Sequence[str]] = None) -> pathlib.Path:
  """Writes a controller to the folder ``path``: weights ``theta`` of
  ``make_controller(kind, hidden)`` (``kind`` ``"mlp"``: an ``LRController``, ``"lstm"``:
  an ``LSTMController``) reading ``features`` (default all of :data:`FEATURE_NAMES`), and
  the ``settings`` (default :data:`DEFAULT_SETTINGS`), ``learning_rate`` and
  ``update_every`` it was trained with. Checked before anything is written."""
  settings = _checked_settings(settings, "save_controller")
  features = check_features(features, "save_controller")
  try:
    controller = make_controller(kind, hidden)
    update_every = check_int("update_every", update_every)
  except ValueError as e:
    raise ValueError(f"save_controller: {e}") from None
  hidden = list(controller.hidden)
  check_positive("save_controller: learning_rate", learning_rate)
  template = _template(controller, features)
  if jax.tree.structure(template) != jax.tree.structure(theta) or any(
      jnp.shape(a) != jnp.shape(b) for a, b in zip(jax.tree.leaves(template),
                                                   jax.tree.leaves(theta))):
    raise ValueError(f"save_controller: theta does not match "
                     f"{type(controller).__name__}(hidden={hidden}) on {len(features)} features")
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  (path / WEIGHTS_FILE).write_bytes(serialization.msgpack_serialize(jax.device_get(theta)))
  # Version 1 (no kind, no update_every) whenever it says everything: older readers load it.
  extended = kind != "mlp" or update_every != 1 or features != FEATURE_NAMES
  config = dict(format=FILE_FORMAT, version=FILE_VERSION if extended else 1,
                **(dict(kind=kind, update_every=update_every) if extended else {}),
                hidden=hidden, features=list(features), learning_rate=float(learning_rate),
                settings=settings, info=dict(info or {}))
  (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
  return path


def load_controller(path: Union[str, pathlib.Path, None] = None) -> SavedController:
  """The controller saved in the folder ``path`` (default: the one shipped with metaopt)."""
  path = PRETRAINED_DIR if path is None else pathlib.Path(path)
  weights, config_path = path / WEIGHTS_FILE, path / CONFIG_FILE
  for file in (weights, config_path):
    if not file.is_file():
      raise FileNotFoundError(
          f"controller file {file} not found; write one with metaopt.save_controller or "
          "`metaopt run lr-schedule --save-controller DIR`")
  try:
    config = json.loads(config_path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{config_path} is not valid JSON: {e}") from None
  if not isinstance(config, dict) or config.get("format") != FILE_FORMAT:
    raise ValueError(f"{config_path} is not a metaopt controller file (format "
                     f"{config.get('format') if isinstance(config, dict) else None!r}, "
                     f"expected {FILE_FORMAT!r})")
  if not isinstance(config.get("version"), int) or config["version"] > FILE_VERSION:
    raise ValueError(f"{config_path} has controller format version {config.get('version')!r}; "
                     f"this metaopt reads version {FILE_VERSION} and older: upgrade metaopt")
  for key in ("hidden", "features", "settings", "learning_rate"):
    if key not in config:
      raise ValueError(f"{config_path} lacks {key!r}")
  features = config["features"]
  if (not isinstance(features, list) or not set(features) <= set(FEATURE_NAMES)
      or (config["version"] == 1 and tuple(features) != FEATURE_NAMES)):
    raise ValueError(f"controller in {path} was trained on features "
                     f"{features}, this version computes {list(FEATURE_NAMES)}")
  try:
    features = check_features(features, str(config_path))
  except ValueError as e:
    raise ValueError(str(e)) from None
  settings = _checked_settings(config["settings"], str(config_path))
  # Version 1 files are MLPs deciding every step.
  try:
    controller = make_controller(config.get("kind", "mlp"), config["hidden"])
    update_every = check_int("update_every", config.get("update_every", 1))
  except (ValueError, TypeError) as e:
    raise ValueError(f"{config_path}: {e}") from None
  name = f"{type(controller).__name__}(hidden={config['hidden']}) on {len(features)} features"
  template = _template(controller, features)
  try:
    theta = serialization.from_state_dict(
        template, serialization.msgpack_restore(weights.read_bytes()))
  except Exception as e:  # msgpack and flax raise several types on a damaged file
    raise ValueError(f"{weights} does not hold the weights of {name}: "
                     f"{type(e).__name__}") from None
  theta = jax.tree.map(jnp.asarray, theta)
  for a, b in zip(jax.tree.leaves(template), jax.tree.leaves(theta)):
    if a.shape != b.shape:
      raise ValueError(f"{weights} holds an array of shape {b.shape} where "
                       f"{name} has {a.shape}")
  return SavedController(controller, theta, settings, float(config["learning_rate"]),
                         dict(config.get("info", {})), update_every, features)


def pretrained_lr(path: Union[str, pathlib.Path, None] = None, *,
                  learning_rate: Optional[float] = None, total_steps=None,
                  min_lr_factor: Optional[float] = None,
                  max_lr_factor: Optional[float] = None,
                  max_log_change: Optional[float] = None,
                  response_time: Optional[float] = None,
                  min_response_steps: Optional[float] = None,
                  base_lr: Optional[float] = None,
                  update_every: Optional[int] = None,
                  lagged: bool = False,
                  ) -> optax.GradientTransformationExtraArgs:
  """:func:`scale_by_learned_lr` with a saved controller: by default the one shipped with
  metaopt, or the folder ``path`` (:func:`save_controller`).

  ``optax.chain(optax.scale_by_adam(), metaopt.pretrained_lr(total_steps=5000))``
  gives a learned schedule with no meta-training. See ``docs/benchmarks.md`` for
  how the shipped weights were trained and how well they transfer.
  ``learning_rate``, ``update_every`` and each of the :data:`SETTINGS` left at ``None``
  are those the controller was trained with. ``lagged``: see :func:`scale_by_learned_lr`.
  Every argument is named, so ``optax.inject_hyperparams(pretrained_lr)`` can inject them.
  """
  learning_rate = renamed("pretrained_lr", "learning_rate", learning_rate, "base_lr", base_lr)
  saved = load_controller(path)
  given = dict(min_lr_factor=min_lr_factor, max_lr_factor=max_lr_factor,
               max_log_change=max_log_change, response_time=response_time,
               min_response_steps=min_response_steps)
  settings = {k: saved.settings[k] if given[k] is None else given[k] for k in SETTINGS}
  return _learned_lr(
      saved.controller, saved.theta, total_steps=total_steps,
      learning_rate=saved.learning_rate if learning_rate is None else learning_rate,
      update_every=saved.update_every if update_every is None else update_every,
      features=saved.features, caller="pretrained_lr", lagged=lagged, **settings)
