"""Hand-made LR schedules from optax, as ``make_tx(lr)`` factories for grids.

Every baseline is Adam under ``optax.inject_hyperparams`` so the applied LR is
readable from the state; the peak LR may be traced, so a grid is one vmap.
"""

from __future__ import annotations

from typing import Callable

import optax

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
