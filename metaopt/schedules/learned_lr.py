"""A learned learning-rate controller as an optax transform and a stateful schedule.

The controller is a small Flax MLP over scale-free training-state features. Its
weights ``theta`` live in the optimizer state, so ``jax.grad`` through an unroll
of training steps reaches them.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import serialization

from metaopt.schedules.common import scale_by_lr
from metaopt.validation import check_number, check_positive

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
FEATURE_CLIP = 5.0
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


def init_controller(key: jax.Array, controller: nn.Module = LRController()) -> PyTree:
  """Fresh controller weights ``theta`` (an untrained controller keeps base_lr)."""
  return controller.init(key, jnp.zeros((NUM_FEATURES,)))["params"]


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


class LearnedLRState(NamedTuple):
  """State of :func:`scale_by_learned_lr`: controller weights, features, current LR."""
  theta: PyTree
  features: LRFeatureState
  learning_rate: jax.Array  # the LR applied at the latest step


class ControllerSpec(NamedTuple):
  """Settings that turn controller outputs into a bounded LR.

  Python floats when the settings are concrete; float32 arrays when they are
  traced (``optax.inject_hyperparams`` under ``jit``, or ``jax.grad`` with
  respect to them).
  """
  apply: Callable[[PyTree, jax.Array], jax.Array]
  base_lr: Union[float, jax.Array]
  log_min: Union[float, jax.Array]         # lower bound of log(lr / base_lr)
  log_max: Union[float, jax.Array]         # upper bound of log(lr / base_lr)
  max_log_change: Union[float, jax.Array]  # largest |change| of log(lr) in one step
  response_time: Union[float, jax.Array]   # time to follow the target, in total_steps
  min_response_steps: Union[float, jax.Array]


def _controller_apply(controller) -> Callable[[PyTree, jax.Array], jax.Array]:
  if isinstance(controller, nn.Module):
    return lambda theta, x: controller.apply({"params": theta}, x)
  if callable(controller):
    return controller
  raise ValueError(f"controller must be a flax Module or a callable, got {controller!r}")


def _spec(controller, *, base_lr, min_lr_factor, max_lr_factor, max_log_change,
          response_time, min_response_steps):
  """Concrete settings are checked and kept as Python floats (so float32 runs are
  bit for bit what they were); traced ones are taken as float32 arrays."""
  base = check_positive("base_lr", base_lr, traced_ok=True)
  change = check_positive("max_log_change", max_log_change, traced_ok=True)
  response = check_positive("response_time", response_time, traced_ok=True)
  min_steps = check_number("min_response_steps", min_response_steps, low=1.0, traced_ok=True)
  low = check_number("min_lr_factor", min_lr_factor, low=0.0, low_open=True, high=1.0,
                     traced_ok=True)
  high = check_number("max_lr_factor", max_lr_factor, low=1.0, traced_ok=True)

  def value(checked, given):
    return checked if checked is not None else jnp.asarray(given, jnp.float32)

  def log(checked, given):
    return math.log(checked) if checked is not None else jnp.log(value(None, given))

  return ControllerSpec(_controller_apply(controller), value(base, base_lr),
                        log(low, min_lr_factor), log(high, max_lr_factor),
                        value(change, max_log_change), value(response, response_time),
                        value(min_steps, min_response_steps))


def init_lr_state(theta: PyTree, *, base_lr: float, total_steps) -> LearnedLRState:
  nan = jnp.full((), jnp.nan, jnp.float32)
  zero = jnp.zeros((), jnp.float32)
  features = LRFeatureState(
      count=jnp.zeros((), jnp.int32),
      total_steps=jnp.asarray(total_steps, jnp.float32),
      initial_loss=zero, loss_emas=jnp.zeros((len(LOSS_EMA_DECAYS),), jnp.float32),
      initial_norm=zero, norm_ema=zero, last_norm=zero, initial_val_loss=nan)
  return LearnedLRState(theta, features, jnp.asarray(base_lr, jnp.float32))


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
  """
  f = state.features
  first = f.count == 0
  loss = jnp.asarray(loss, jnp.float32)
  initial_loss = jnp.where(first, loss, f.initial_loss)
  decays = jnp.asarray(LOSS_EMA_DECAYS, jnp.float32)
  prev_emas = jnp.where(first, loss, f.loss_emas)
  loss_emas = decays * prev_emas + (1 - decays) * loss

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
                 jnp.where(has_val, _log_ratio(safe_val, safe_init), 0.0),
                 jnp.where(has_val, _log_ratio(safe_val, loss_emas[1]), 0.0)]

  count = f.count + 1
  fraction = jnp.clip(count / jnp.maximum(f.total_steps, 1.0), 0.0, 1.0)
  features = jnp.stack([
      fraction,
      _log_ratio(loss, initial_loss),
      _log_ratio(loss, prev_emas[0]),
      _log_ratio(loss, prev_emas[1]),
      _log_ratio(loss, prev_emas[2]),
      _log_ratio(prev_emas[0], prev_emas[1]),
      *norm_feats,
      jnp.log(state.learning_rate / spec.base_lr),
      *val_feats,
  ]).astype(jnp.float32)
  features = jnp.clip(features, -FEATURE_CLIP, FEATURE_CLIP)
  new_f = LRFeatureState(count, f.total_steps, initial_loss, loss_emas,
                         initial_norm, norm_ema, f.last_norm, initial_val)
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
  keeps the previous LR and features, so a NaN in the inner run never becomes a
  NaN learning rate.
  """
  loss = jnp.asarray(loss, jnp.float32)
  ok = jnp.isfinite(loss) & (loss > 0)
  safe_loss = jnp.where(ok, loss, 1.0)
  features, new_f = controller_features(state, spec, safe_loss, norm, val_loss)
  raw = jnp.asarray(spec.apply(state.theta, features), jnp.float32).reshape(())
  target = _bounded(_finite_or(raw, 0.0), spec.log_min, spec.log_max)
  prev = jnp.log(state.learning_rate / spec.base_lr)
  response_steps = jnp.maximum(spec.min_response_steps,
                               spec.response_time * state.features.total_steps)
  change = jnp.clip((target - prev) / response_steps,
                    -spec.max_log_change, spec.max_log_change)
  ok = ok & jnp.isfinite(raw)
  new_lr = jnp.where(ok, spec.base_lr * jnp.exp(prev + change), state.learning_rate)
  keep = lambda new, old: jnp.where(ok, new, old)
  new_f = jax.tree.map(keep, new_f, state.features)
  new_f = new_f._replace(count=state.features.count + 1)  # steps still count
  return LearnedLRState(state.theta, new_f, new_lr.astype(jnp.float32))


def scale_by_learned_lr(
    controller: Union[nn.Module, Callable[[PyTree, jax.Array], jax.Array]],
    theta: PyTree,
    *,
    base_lr: float,
    total_steps,
    min_lr_factor: float = 1e-3,
    max_lr_factor: float = 10.0,
    max_log_change: float = 0.25,
    response_time: float = 0.02,
    min_response_steps: float = 10.0,
) -> optax.GradientTransformationExtraArgs:
  """Scales updates by ``-lr``, with ``lr`` chosen each step by a learned controller.

  Chain it after a direction, as ``optax.scale_by_learning_rate`` would be:
  ``optax.chain(optax.scale_by_adam(), scale_by_learned_lr(...))``. The LR is
  ``base_lr * exp(z)`` with ``z`` in ``[log(min_lr_factor), log(max_lr_factor)]``;
  ``z`` follows the controller's target with a time constant of
  ``max(min_response_steps, response_time * total_steps)`` steps and changes by
  at most ``max_log_change`` per step.

  Args:
    controller: an :class:`LRController` (any flax Module mapping the
      :data:`FEATURE_NAMES` vector to a scalar) or ``apply(theta, features)``.
    theta: the controller's weights; they are kept in the state.
    base_lr: the LR of an untrained controller; bounds are relative to it.
    total_steps: training length, for the fraction-done feature.
    min_lr_factor, max_lr_factor: bounds of ``lr / base_lr``.
    max_log_change: bound on ``|log(lr_t / lr_{t-1})|``.
    response_time, min_response_steps: how fast the LR follows the controller.

  ``update`` takes the training loss as keyword ``value`` (required) and an
  optional ``val_loss``; other extra args are ignored. The numeric settings may
  be traced (``optax.inject_hyperparams`` with ``static_args=("controller",)``,
  ``jax.grad``); concrete ones are checked here.
  """
  spec = _spec(controller, base_lr=base_lr, min_lr_factor=min_lr_factor,
               max_lr_factor=max_lr_factor, max_log_change=max_log_change,
               response_time=response_time, min_response_steps=min_response_steps)
  check_positive("total_steps", total_steps, traced_ok=True)

  def init_fn(params):
    del params
    return init_lr_state(theta, base_lr=spec.base_lr, total_steps=total_steps)

  def update_fn(updates, state, params=None, *, value=None, val_loss=None, **extra_args):
    del params, extra_args
    if value is None:
      raise ValueError("scale_by_learned_lr needs the training loss: "
                       "call update(updates, state, params, value=loss)")
    # The norm feature uses the previous step's update: this step's norm then
    # needs no pass over the parameters before the scaling, and fuses with it.
    state = advance(state, spec, loss=value, norm=state.features.last_norm,
                    val_loss=val_loss)
    # float32 whatever the updates' dtype, so the state's types never change;
    # half-precision updates are summed in float32 (their squares overflow float16).
    wide = jax.tree.map(lambda u: u.astype(jnp.promote_types(u.dtype, jnp.float32)), updates)
    norm = optax.tree.norm(wide).astype(jnp.float32)
    features = state.features._replace(last_norm=norm)
    return scale_by_lr(updates, state.learning_rate), state._replace(features=features)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class LearnedLRSchedule(optax.schedules.StatefulSchedule):
  """The learned controller as an optax stateful schedule.

  ``optax.inject_hyperparams(optax.adamw)(learning_rate=LearnedLRSchedule(...))``
  then feeds it the extra args of each update: ``value`` (training loss,
  required for the LR to move), optional ``val_loss`` and ``grad_norm``.
  """

  def __init__(self, controller, theta, *, base_lr: float, total_steps,
               min_lr_factor: float = 1e-3, max_lr_factor: float = 10.0,
               max_log_change: float = 0.25, response_time: float = 0.02,
               min_response_steps: float = 10.0):
    self.spec = _spec(controller, base_lr=base_lr, min_lr_factor=min_lr_factor,
                      max_lr_factor=max_lr_factor, max_log_change=max_log_change,
                      response_time=response_time, min_response_steps=min_response_steps)
    check_positive("total_steps", total_steps, traced_ok=True)
    self.theta = theta
    self.total_steps = total_steps

  def init(self) -> LearnedLRState:
    return init_lr_state(self.theta, base_lr=self.spec.base_lr,
                         total_steps=self.total_steps)

  def update(self, state: LearnedLRState, *, value=None, val_loss=None,
             grad_norm=None, **extra_args) -> LearnedLRState:
    del extra_args
    if value is None:  # nothing to react to: hold the LR, still count the step
      f = state.features
      return state._replace(features=f._replace(count=f.count + 1))
    return advance(state, self.spec, loss=value, norm=grad_norm, val_loss=val_loss)

  def __call__(self, state: LearnedLRState, **extra_args) -> jax.Array:
    # Weakly typed, like optax's own schedules: inject_hyperparams then casts it
    # to the params' dtype, so bfloat16 updates stay bfloat16 (a strong float32
    # LR would upcast them). For float32 params the value is unchanged.
    return jax.lax.full_like(0.0, self.update(state, **extra_args).learning_rate)


def with_theta(opt_state: PyTree, theta: PyTree) -> PyTree:
  """``opt_state`` with the controller weights of every learned-LR state set to ``theta``."""
  is_lr_state = lambda x: isinstance(x, LearnedLRState)
  return jax.tree.map(lambda s: s._replace(theta=theta) if is_lr_state(s) else s,
                      opt_state, is_leaf=is_lr_state)


# --- shipped weights ------------------------------------------------------------

PRETRAINED_DIR = pathlib.Path(__file__).parent / "pretrained"
PRETRAINED_WEIGHTS = PRETRAINED_DIR / "lr_controller.msgpack"
PRETRAINED_CONFIG = PRETRAINED_DIR / "lr_controller.json"


SETTINGS = ("min_lr_factor", "max_lr_factor", "max_log_change", "response_time",
            "min_response_steps")


def save_controller(theta: PyTree, directory: Union[str, pathlib.Path], *,
                    hidden: Sequence[int], settings: dict,
                    info: Optional[dict] = None) -> None:
  """Writes controller weights (msgpack) and their settings (JSON) to ``directory``.

  ``settings`` holds the :data:`SETTINGS` keyword arguments of
  :func:`scale_by_learned_lr` the weights were trained with.
  """
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / PRETRAINED_WEIGHTS.name).write_bytes(
      serialization.msgpack_serialize(jax.tree.map(lambda x: jax.device_get(x), theta)))
  config = dict(hidden=list(hidden), features=list(FEATURE_NAMES),
                settings={k: float(settings[k]) for k in SETTINGS}, **(info or {}))
  (directory / PRETRAINED_CONFIG.name).write_text(json.dumps(config, indent=2) + "\n")


def load_controller(directory: Union[str, pathlib.Path] = PRETRAINED_DIR
                    ) -> tuple[LRController, PyTree, dict]:
  """Reads ``(controller, theta, config)`` written by :func:`save_controller`."""
  directory = pathlib.Path(directory)
  weights, config_path = directory / PRETRAINED_WEIGHTS.name, directory / PRETRAINED_CONFIG.name
  for path in (weights, config_path):
    if not path.is_file():
      raise FileNotFoundError(
          f"controller file {path} not found; write it with "
          "`metaopt run lr-schedule --save-controller DIR`")
  config = json.loads(config_path.read_text())
  if tuple(config["features"]) != FEATURE_NAMES:
    raise ValueError(f"controller in {directory} was trained on features "
                     f"{config['features']}, this version computes {list(FEATURE_NAMES)}")
  controller = LRController(hidden=tuple(config["hidden"]))
  template = init_controller(jax.random.key(0), controller)
  theta = serialization.from_state_dict(
      template, serialization.msgpack_restore(weights.read_bytes()))
  theta = jax.tree.map(jnp.asarray, theta)
  return controller, theta, config


def pretrained_lr(*, base_lr: float = 1e-3, total_steps,
                  min_lr_factor: Optional[float] = None,
                  max_lr_factor: Optional[float] = None,
                  max_log_change: Optional[float] = None,
                  response_time: Optional[float] = None,
                  min_response_steps: Optional[float] = None,
                  ) -> optax.GradientTransformationExtraArgs:
  """:func:`scale_by_learned_lr` with the controller weights shipped in metaopt.

  ``optax.chain(optax.scale_by_adam(), metaopt.pretrained_lr(total_steps=5000))``
  gives a learned schedule with no meta-training. See ``docs/benchmarks.md`` for
  how the weights were trained and how well they transfer. Each of the
  :data:`SETTINGS` left at ``None`` is the one the weights were trained with.
  Every argument is named, so ``optax.inject_hyperparams(pretrained_lr)`` can
  inject them.
  """
  controller, theta, config = load_controller(PRETRAINED_DIR)
  given = dict(min_lr_factor=min_lr_factor, max_lr_factor=max_lr_factor,
               max_log_change=max_log_change, response_time=response_time,
               min_response_steps=min_response_steps)
  settings = {k: config["settings"][k] if given[k] is None else given[k] for k in SETTINGS}
  return scale_by_learned_lr(controller, theta, base_lr=base_lr, total_steps=total_steps,
                             **settings)
