"""The baselines a learned LR is measured against, all from optax.

- Hand-made LR schedules, as ``make_tx(lr)`` factories for grids: Adam under
  ``optax.inject_hyperparams`` so the applied LR is readable from the state; the peak
  LR may be traced, so a grid is one vmap.
- The self-tuning optimizers of ``optax.contrib`` that people reach for to avoid
  tuning, at their documented defaults (never a copy): schedule-free AdamW (evaluated
  at its averaged parameters, see :func:`metaopt.schedules.evaluation_params`),
  Prodigy, D-Adaptation AdamW, Mechanic on Adam and DoG.
"""

from __future__ import annotations

from typing import Callable

import optax

from metaopt.validation import check_choice

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


def adam_with_schedule(name: str, total_steps: int) -> Callable[..., optax.GradientTransformation]:
  """``make_tx(lr)``: Adam whose LR follows schedule ``name`` with peak ``lr``."""
  unit_schedule(name, total_steps)  # validates the name now, not under jit
  return lambda lr: optax.inject_hyperparams(optax.adam)(
      learning_rate=schedule_fn(name, lr, total_steps))


# name: a complete optimizer at optax.contrib's documented defaults.
SELF_TUNING: dict[str, Callable[[], optax.GradientTransformation]] = {
    "schedule_free_adamw": lambda: optax.contrib.schedule_free_adamw(),
    "prodigy": lambda: optax.contrib.prodigy(),
    "dadapt_adamw": lambda: optax.contrib.dadapt_adamw(),
    # Mechanic learns the scale of its base optimizer's updates: base LR 1.0, as its
    # docstring says.
    "mechanic": lambda: optax.contrib.mechanize(optax.adam(1.0)),
    "dog": lambda: optax.contrib.dog(),
}


def self_tuning(name: str) -> optax.GradientTransformation:
  """The ``optax.contrib`` self-tuning optimizer ``name`` at its defaults."""
  return SELF_TUNING[check_choice("self-tuning optimizer", name, SELF_TUNING)]()
