"""The baselines a learned LR is measured against, all from optax.

- The base optimizer a schedule or a controller scales (:class:`BaseOptimizer`): optax's
  Adam, AdamW or SGD with momentum, with the weight decay the plans state, optionally
  scaled by Prodigy's step-size estimate (:func:`scale_by_prodigy_estimate`).
- Hand-made LR schedules, as ``make_tx(lr)`` factories for grids: the base optimizer under
  ``optax.inject_hyperparams`` so the applied LR is readable from the state; the peak
  LR may be traced, so a grid is one vmap, and :func:`scheduled` makes the schedule
  itself a traced index, so a whole comparison of schedules is one compiled program.
- The self-tuning optimizers of ``optax.contrib`` that people reach for to avoid
  tuning, at their documented defaults (never a copy): schedule-free AdamW (evaluated
  at its averaged parameters, see :func:`metaopt.schedules.evaluation_params`),
  Prodigy (also with the linear decay its docstring recommends), D-Adaptation AdamW,
  Mechanic on Adam and DoG.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from metaopt.validation import check_choice, check_int, check_number

SCHEDULES = ("constant", "step", "cosine", "warmup_cosine")
DEFAULT_LRS = (3e-4, 1e-3, 3e-3, 1e-2)
WARMUP_FRACTION = 0.05


def unit_schedule(name: str, total_steps: int) -> optax.Schedule:
  """The optax schedule ``name`` over ``total_steps`` with peak value 1."""
  if name == "constant":
    return optax.constant_schedule(1.0)
  if name == "step":  # x0.1 at 50% and again at 75% of training
    return optax.piecewise_constant_schedule(
        1.0, {int(0.5 * total_steps): 0.1, int(0.75 * total_steps): 0.1})
  if name == "cosine":
    return optax.cosine_decay_schedule(1.0, total_steps)
  if name == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, 1.0, max(1, int(WARMUP_FRACTION * total_steps)), total_steps)
  raise ValueError(f"unknown schedule {name!r}; accepted: {', '.join(SCHEDULES)}")


def schedule_fn(name: str, lr, total_steps: int) -> optax.Schedule:
  """Schedule ``name`` scaled to peak ``lr`` (which may be traced, for vmapped grids)."""
  unit = unit_schedule(name, total_steps)
  return lambda count: lr * unit(count)


OPTIMIZERS = ("adam", "adamw", "sgd")
# What multiplies the direction before the LR: 1, Prodigy's estimate D, or D times
# Prodigy's recommended linear decay over the run.
STEP_SIZES = ("constant", "prodigy", "prodigy_linear_decay")


def scale_by_prodigy_estimate(direction: optax.GradientTransformation,
                              total_steps=None) -> optax.GradientTransformation:
  """``direction``'s updates times the step-size estimate D of an ``optax.contrib.prodigy``
  run on the same gradients and parameters; with ``total_steps`` (may be traced), Prodigy
  runs with its linear decay from 1 to 0 and the updates are scaled by it too.

  Prodigy's own update is discarded. D enters under ``stop_gradient`` (meta-gradients do
  not flow through it: Prodigy's square root has no finite derivative at a gradient that
  is always zero, e.g. MNIST's blank border pixels). Prodigy's state is kept as a plain
  tuple, so :func:`~metaopt.schedules.current_lr` finds only the LR chained after.
  """
  # optax.linear_schedule(1.0, 0.0, total_steps), written out: meta-training traces
  # total_steps (one program for every training length), which linear_schedule refuses.
  decay = ((lambda count: 1.0) if total_steps is None else
           lambda count: 1.0 - jnp.clip(count, 0, total_steps) / total_steps)
  prodigy = (optax.contrib.prodigy() if total_steps is None
             else optax.contrib.prodigy(learning_rate=decay))

  def init(params):
    return tuple(prodigy.init(params)), direction.init(params)

  def update(updates, state, params=None):
    previous = optax.contrib.ProdigyState(*state[0])
    _, estimate = prodigy.update(jax.lax.stop_gradient(updates), previous,
                                 jax.lax.stop_gradient(params))
    d = jax.lax.stop_gradient(estimate.estim_lr * decay(previous.count))
    out, direction_state = direction.update(updates, state[1], params)
    return jax.tree.map(lambda u: u * d.astype(u.dtype), out), (tuple(estimate), direction_state)

  return optax.GradientTransformation(init, update)


@dataclasses.dataclass(frozen=True)
class BaseOptimizer:
  """The optimizer whose LR a schedule or a controller sets: ``optax.adam``,
  ``optax.adamw`` or ``optax.sgd`` (with ``momentum``; 0 is plain SGD).

  ``weight_decay`` follows the plans' (PyTorch's) meaning: for adam and sgd it adds
  ``weight_decay * params`` to the gradient (L2, ``optax.add_decayed_weights`` first);
  for adamw it is AdamW's decoupled decay, scaled by the LR.

  ``step_size`` other than ``"constant"`` scales the direction by Prodigy's estimate D
  (``"prodigy_linear_decay"``: and by its linear decay over the run), so the LR a
  schedule or a controller sets is a multiplier of D (use ``learning_rate=1.0``).
  """
  name: str = "adam"
  momentum: float = 0.9       # sgd only
  nesterov: bool = False      # sgd only
  weight_decay: float = 0.0
  step_size: str = "constant"

  def __post_init__(self):
    check_choice("optimizer", self.name, OPTIMIZERS)
    check_choice("optimizer.step_size", self.step_size, STEP_SIZES)
    check_number("optimizer.momentum", self.momentum, low=0.0, high=1.0, high_open=True)
    check_number("optimizer.weight_decay", self.weight_decay, low=0.0)
    if not isinstance(self.nesterov, bool):
      raise ValueError(f"optimizer.nesterov must be true or false, got {self.nesterov!r}")

  @property
  def label(self) -> str:
    """How reports name it: "Adam", "AdamW", "SGD (momentum 0.9)"."""
    if self.name == "sgd":
      label = f"SGD (momentum {self.momentum:g})" if self.momentum else "SGD"
    else:
      label = {"adam": "Adam", "adamw": "AdamW"}[self.name]
    return label + {"constant": "", "prodigy": " on Prodigy's D",
                    "prodigy_linear_decay": " on Prodigy's D, linear decay"}[self.step_size]

  def direction(self, *, eps_root: float = 0.0, total_steps=None
                ) -> optax.GradientTransformation:
    """The update before the LR is applied (``learning_rate * direction`` is the step;
    chain a controller after it). ``eps_root > 0`` keeps meta-gradients through Adam's
    square root finite. ``total_steps`` (may be traced): the run's length, needed by
    ``step_size="prodigy_linear_decay"`` only."""
    decay = [optax.add_decayed_weights(self.weight_decay)] if self.weight_decay else []
    if self.name == "sgd":
      trace = [optax.trace(decay=self.momentum, nesterov=self.nesterov)] if self.momentum else []
      out = optax.chain(*decay, *trace) if decay or trace else optax.identity()
    else:
      adam = optax.scale_by_adam(eps_root=eps_root)
      out = optax.chain(adam, *decay) if self.name == "adamw" else optax.chain(*decay, adam)
    if self.step_size == "constant":
      return out
    if self.step_size == "prodigy_linear_decay" and total_steps is None:
      raise ValueError("optimizer.step_size='prodigy_linear_decay' needs total_steps, the "
                       "length of the run its decay spans")
    return scale_by_prodigy_estimate(
        out, total_steps if self.step_size == "prodigy_linear_decay" else None)

  def __call__(self, learning_rate, total_steps=None) -> optax.GradientTransformation:
    """The whole optimizer at ``learning_rate`` (a number, traced value or schedule): its
    direction, then ``optax.scale_by_learning_rate``, as ``optax.adam``, ``optax.adamw``
    and ``optax.sgd`` are built (tested equal to them)."""
    return optax.chain(self.direction(total_steps=total_steps),
                       optax.scale_by_learning_rate(learning_rate))

  def at_length(self, total_steps) -> Callable[..., optax.GradientTransformation]:
    """``make(learning_rate)``: the whole optimizer for a run of ``total_steps`` steps
    (``learning_rate`` its only argument, as ``optax.inject_hyperparams`` wants)."""
    return lambda learning_rate: self(learning_rate, total_steps)


def with_schedule(name: str, total_steps: int, optimizer: BaseOptimizer = BaseOptimizer()
                  ) -> Callable[..., optax.GradientTransformation]:
  """``make_tx(lr)``: ``optimizer`` whose LR follows schedule ``name`` with peak ``lr``,
  under ``optax.inject_hyperparams`` (the applied LR is in the state)."""
  unit_schedule(name, total_steps)  # validates the name now, not under jit
  return lambda lr: optax.inject_hyperparams(optimizer.at_length(total_steps))(
      learning_rate=schedule_fn(name, lr, total_steps))


def adam_with_schedule(name: str, total_steps: int) -> Callable[..., optax.GradientTransformation]:
  """``make_tx(lr)``: Adam whose LR follows schedule ``name`` with peak ``lr``."""
  return with_schedule(name, total_steps)


def scheduled(names: Sequence[str], total_steps: int,
              optimizer: BaseOptimizer = BaseOptimizer()
              ) -> Callable[[dict], optax.GradientTransformation]:
  """``make_tx({"lr", "schedule"})``: ``optimizer`` with peak LR ``lr`` following schedule
  ``names[schedule]``; both may be traced, so every schedule of a comparison and every LR
  of its grid train in one compiled program."""
  units = [lambda count, u=unit_schedule(name, total_steps): jnp.asarray(u(count), jnp.float32)
           for name in names]

  def make_tx(h):
    schedule = lambda count: h["lr"] * jax.lax.switch(h["schedule"], units, count)
    return optax.inject_hyperparams(optimizer.at_length(total_steps))(learning_rate=schedule)
  return make_tx


def _prodigy_linear_decay(total_steps: Optional[int]) -> optax.GradientTransformation:
  """Prodigy with the schedule its docstring recommends: ``learning_rate`` decaying
  linearly from 1.0 to 0 over the run (the recommended 0-20% warmup taken as 0%)."""
  if total_steps is None:
    raise ValueError("self-tuning optimizer 'prodigy_linear_decay' needs total_steps, the "
                     "length of the run its LR decays over")
  check_int("total_steps", total_steps)
  # Injected, so the state holds the schedule factor and current_lr reports the step
  # applied (the estimate times the factor), not the estimate alone.
  return optax.inject_hyperparams(optax.contrib.prodigy)(
      learning_rate=optax.linear_schedule(1.0, 0.0, total_steps))


# name: factory(total_steps) of a complete optimizer from optax.contrib, at its documented
# defaults; only prodigy_linear_decay reads total_steps.
SELF_TUNING: dict[str, Callable[[Optional[int]], optax.GradientTransformation]] = {
    "schedule_free_adamw": lambda _: optax.contrib.schedule_free_adamw(),
    "prodigy": lambda _: optax.contrib.prodigy(),
    "prodigy_linear_decay": _prodigy_linear_decay,
    "dadapt_adamw": lambda _: optax.contrib.dadapt_adamw(),
    # Mechanic learns the scale of its base optimizer's updates: base LR 1.0, as its
    # docstring says.
    "mechanic": lambda _: optax.contrib.mechanize(optax.adam(1.0)),
    "dog": lambda _: optax.contrib.dog(),
}


def self_tuning(name: str, total_steps: Optional[int] = None) -> optax.GradientTransformation:
  """The ``optax.contrib`` self-tuning optimizer ``name`` at its defaults, for a run of
  ``total_steps`` steps (needed by ``prodigy_linear_decay`` only)."""
  return SELF_TUNING[check_choice("self-tuning optimizer", name, SELF_TUNING)](total_steps)
