"""The baselines a learned LR is measured against, all from optax.

- The base optimizer a schedule or a controller scales (:class:`BaseOptimizer`): optax's
  Adam, AdamW or SGD with momentum, with the weight decay the plans state.
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


@dataclasses.dataclass(frozen=True)
class BaseOptimizer:
  """The optimizer whose LR a schedule or a controller sets: ``optax.adam``,
  ``optax.adamw`` or ``optax.sgd`` (with ``momentum``; 0 is plain SGD).

  ``weight_decay`` follows the plans' (PyTorch's) meaning: for adam and sgd it adds
  ``weight_decay * params`` to the gradient (L2, ``optax.add_decayed_weights`` first);
  for adamw it is AdamW's decoupled decay, scaled by the LR.
  """
  name: str = "adam"
  momentum: float = 0.9       # sgd only
  nesterov: bool = False      # sgd only
  weight_decay: float = 0.0

  def __post_init__(self):
    check_choice("optimizer", self.name, OPTIMIZERS)
    check_number("optimizer.momentum", self.momentum, low=0.0, high=1.0, high_open=True)
    check_number("optimizer.weight_decay", self.weight_decay, low=0.0)
    if not isinstance(self.nesterov, bool):
      raise ValueError(f"optimizer.nesterov must be true or false, got {self.nesterov!r}")

  @property
  def label(self) -> str:
    """How reports name it: "Adam", "AdamW", "SGD (momentum 0.9)"."""
    if self.name == "sgd":
      return f"SGD (momentum {self.momentum:g})" if self.momentum else "SGD"
    return {"adam": "Adam", "adamw": "AdamW"}[self.name]

  def direction(self, *, eps_root: float = 0.0) -> optax.GradientTransformation:
    """The update before the LR is applied (``learning_rate * direction`` is the step;
    chain a controller after it). ``eps_root > 0`` keeps meta-gradients through Adam's
    square root finite."""
    decay = [optax.add_decayed_weights(self.weight_decay)] if self.weight_decay else []
    if self.name == "sgd":
      trace = [optax.trace(decay=self.momentum, nesterov=self.nesterov)] if self.momentum else []
      return optax.chain(*decay, *trace) if decay or trace else optax.identity()
    adam = optax.scale_by_adam(eps_root=eps_root)
    return optax.chain(adam, *decay) if self.name == "adamw" else optax.chain(*decay, adam)

  def __call__(self, learning_rate) -> optax.GradientTransformation:
    """The whole optimizer at ``learning_rate`` (a number, traced value or schedule): its
    direction, then ``optax.scale_by_learning_rate``, as ``optax.adam``, ``optax.adamw``
    and ``optax.sgd`` are built (tested equal to them)."""
    return optax.chain(self.direction(), optax.scale_by_learning_rate(learning_rate))


def with_schedule(name: str, total_steps: int, optimizer: BaseOptimizer = BaseOptimizer()
                  ) -> Callable[..., optax.GradientTransformation]:
  """``make_tx(lr)``: ``optimizer`` whose LR follows schedule ``name`` with peak ``lr``,
  under ``optax.inject_hyperparams`` (the applied LR is in the state)."""
  unit_schedule(name, total_steps)  # validates the name now, not under jit
  return lambda lr: optax.inject_hyperparams(optimizer.__call__)(
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
    return optax.inject_hyperparams(optimizer.__call__)(
        learning_rate=schedule)
  return make_tx


def _prodigy_linear_decay(total_steps: Optional[int]) -> optax.GradientTransformation:
  """Prodigy with the schedule its docstring recommends: ``learning_rate`` decaying
  linearly from 1.0 to 0 over the run (the recommended 0-20% warmup taken as 0%)."""
  if total_steps is None:
    raise ValueError("self-tuning optimizer 'prodigy_linear_decay' needs total_steps, the "
                     "length of the run its LR decays over")
  check_int("total_steps", total_steps)
  return optax.contrib.prodigy(learning_rate=optax.linear_schedule(1.0, 0.0, total_steps))


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
