"""Validation-driven LR control: reduce on plateau with an LR floor, and early stopping.

``optax.contrib.reduce_on_plateau`` does the LR reduction. This module adds what
it lacks for a training run that is evaluated once per epoch:

* an absolute minimum LR (it only has ``min_scale``);
* an early-stopping signal, ``state.stop``, that the training loop obeys;
* a validation metric fed only when it is fresh: ``update`` runs every step
  inside a jitted training step, but the plateau logic advances only on the
  steps that pass ``new_eval=True`` with a new ``val_loss``;
* one rule for non-finite metrics: NaN, +inf and -inf never improve, and are
  counted.

Mapping to PyTorch's ``ReduceLROnPlateau(mode="min", threshold_mode="rel")``:
``rtol`` is its ``threshold`` and ``factor`` its ``factor``; its ``patience=P``
reduces after P + 1 evaluations without improvement, which is ``patience=P + 1``
here (optax's convention). Comparisons are made in float32.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from optax.contrib import ReduceLROnPlateauState, reduce_on_plateau

from metaopt.schedules.common import check_float_updates, scale_by_lr
from metaopt.validation import check_int, check_number, renamed, required

PyTree = Any


class PlateauState(NamedTuple):
  """State of :func:`plateau_lr`."""
  learning_rate: jax.Array      # float32 LR the updates are scaled by
  stop: jax.Array               # bool: no improvement in early_stopping_patience evaluations
  evals: jax.Array              # int32 evaluations counted so far
  evals_since_best: jax.Array   # int32 evaluations since the last improvement
  nan_evals: jax.Array          # int32 evaluations whose val_loss was NaN or inf
  plateau: ReduceLROnPlateauState  # optax's reduce-on-plateau state (scale, best_value, ...)


def plateau_lr(
    learning_rate: Optional[float] = None,
    *,
    factor: float = 0.1,
    patience: int = 5,
    rtol: float = 0.01,
    atol: float = 0.0,
    cooldown: int = 0,
    min_lr: float = 1e-6,
    early_stopping_patience: Optional[int] = 10,
    base_lr: Optional[float] = None,
) -> optax.GradientTransformationExtraArgs:
  """Scales updates by ``-lr``; ``lr`` drops by ``factor`` when the validation loss plateaus.

  Chain it after a direction, as ``optax.scale_by_learning_rate`` would be:
  ``optax.chain(optax.scale_by_adam(), plateau_lr(1e-3))``.

  ``update`` reads the monitored metric from a keyword extra arg:

  * ``val_loss``: a scalar validation loss; or, when no ``val_loss`` is given,
  * ``value``: the metric to monitor, as ``optax.contrib.reduce_on_plateau``
    reads it (a training loop that passes its training loss as ``value`` at
    every step and no ``val_loss`` reduces on the training loss);
  * ``new_eval``: a bool (Python or traced) saying the metric is a fresh
    evaluation. Default ``True`` when a metric is given.

  An evaluation is counted only when a metric is given and ``new_eval`` is true;
  otherwise the state passes through unchanged and updates are scaled by the
  current LR. So a jitted step can call ``update`` every step with the latest
  validation loss and ``new_eval = (step % steps_per_epoch == 0)``.

  On each evaluation, the loss improves when ``val_loss < (1 - rtol) * best -
  atol``; a NaN, +inf or -inf never improves and is counted in ``state.nan_evals``.
  After ``patience`` evaluations in a row without improvement, the LR is
  multiplied by ``factor`` (never below ``min_lr``), then ``cooldown``
  evaluations are ignored (``optax.contrib.reduce_on_plateau``). After
  ``early_stopping_patience`` evaluations without improvement (LR reductions
  do not reset this count), ``state.stop`` becomes and stays true; the
  training loop should stop (see :func:`should_stop`). The transform itself
  keeps scaling updates.

  Args:
    learning_rate: LR before any reduction.
    factor: reduction factor, in ``(0, 1)``.
    patience: evaluations without improvement before a reduction, ``>= 1``.
    rtol, atol: relative and absolute improvement thresholds.
    cooldown: evaluations to wait after a reduction, ``>= 0``.
    min_lr: LR floor, in ``[0, learning_rate]``.
    early_stopping_patience: evaluations without improvement before
      ``stop``; ``None`` never stops.
    base_lr: the old name of ``learning_rate`` (deprecated).

  ``learning_rate`` and ``min_lr`` may be traced (``optax.inject_hyperparams``,
  ``jax.grad``); the others must be Python numbers
  (``optax.contrib.reduce_on_plateau`` checks them with ``if``), so
  ``inject_hyperparams`` needs them in ``static_args``.
  """
  learning_rate = renamed("plateau_lr", "learning_rate", learning_rate, "base_lr", base_lr)
  required("plateau_lr", "learning_rate", learning_rate, "the LR before any reduction")
  try:
    # learning_rate and min_lr only enter arithmetic, so they may be traced.
    base = check_number("learning_rate", learning_rate, low=0.0, low_open=True, traced_ok=True)
    check_number("factor", factor, low=0.0, low_open=True, high=1.0, high_open=True)
    patience = check_int("patience", patience, low=1)
    cooldown = check_int("cooldown", cooldown, low=0)
    floor = check_number("min_lr", min_lr, low=0.0, traced_ok=True)
    check_number("rtol", rtol, low=0.0, high=1.0)
    check_number("atol", atol, low=0.0)
    if early_stopping_patience is not None:
      early_stopping_patience = check_int("early_stopping_patience",
                                          early_stopping_patience, low=1)
  except ValueError as e:
    raise ValueError(f"plateau_lr: {e}") from None
  if base is not None and floor is not None and floor > base:
    raise ValueError(f"plateau_lr: min_lr={min_lr!r} must not exceed "
                     f"learning_rate={learning_rate!r}")
  if base is None or floor is None:  # float32, like the plateau state they meet
    base = jnp.asarray(learning_rate, jnp.float32) if base is None else base
    floor = jnp.asarray(min_lr, jnp.float32) if floor is None else floor
    min_scale = jnp.asarray(floor / base, jnp.float32)
  else:
    min_scale = floor / base
  inner = reduce_on_plateau(factor=factor, patience=patience, rtol=rtol, atol=atol,
                            cooldown=cooldown, min_scale=min_scale)

  def init_fn(params):
    del params  # the plateau state is float32 whatever the parameters' dtype
    return PlateauState(
        learning_rate=jnp.asarray(base, jnp.float32),
        stop=jnp.asarray(False),
        evals=jnp.zeros((), jnp.int32),
        evals_since_best=jnp.zeros((), jnp.int32),
        nan_evals=jnp.zeros((), jnp.int32),
        plateau=inner.init(jnp.zeros((), jnp.float32)))

  def evaluate(state: PlateauState, val_loss: jax.Array) -> PlateauState:
    best = state.plateau.best_value
    finite = jnp.isfinite(val_loss)
    improved = finite & (val_loss < (1 - rtol) * best - atol)
    # optax would take -inf as the best value ever: it sees +inf, no improvement.
    _, plateau = inner.update((), state.plateau, value=jnp.where(finite, val_loss, jnp.inf))
    since_best = jnp.where(improved, 0, state.evals_since_best + 1).astype(jnp.int32)
    stop = state.stop
    if early_stopping_patience is not None:
      stop = stop | (since_best >= early_stopping_patience)
    lr = jnp.maximum(base * plateau.scale.astype(jnp.float32), floor)
    return PlateauState(
        learning_rate=lr.astype(jnp.float32),
        stop=stop,
        evals=state.evals + 1,
        evals_since_best=since_best,
        nan_evals=state.nan_evals + jnp.where(jnp.isfinite(val_loss), 0, 1).astype(jnp.int32),
        plateau=plateau)

  def update_fn(updates, state, params=None, *, val_loss=None, new_eval=None, value=None,
                **extra_args):
    del params, extra_args
    check_float_updates(updates, "plateau_lr")
    if val_loss is None:
      val_loss = value
    if val_loss is None:
      if new_eval is not False:
        raise ValueError("plateau_lr needs a metric to watch: pass update(..., "
                         "val_loss=loss, new_eval=flag) (or value=, as for "
                         "optax.contrib.reduce_on_plateau); new_eval=False on steps "
                         "without one")
    elif new_eval is not False:
      val_loss = jnp.asarray(val_loss)
      if val_loss.shape != ():
        raise ValueError("plateau_lr: val_loss must be a scalar, got shape "
                         f"{val_loss.shape}")
      val_loss = val_loss.astype(jnp.float32)
      advanced = evaluate(state, val_loss)
      if new_eval is None or new_eval is True:
        state = advanced
      else:
        flag = jnp.asarray(new_eval)
        if flag.shape != ():
          raise ValueError(f"plateau_lr: new_eval must be a scalar bool, got shape {flag.shape}")
        flag = flag.astype(bool)
        state = jax.tree.map(lambda new, old: jnp.where(flag, new, old), advanced, state)
    return scale_by_lr(updates, state.learning_rate), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class EarlyStoppingState(NamedTuple):
  """State of :func:`early_stopping`."""
  stop: jax.Array               # bool: no improvement in patience evaluations
  evals: jax.Array              # int32 evaluations counted so far
  evals_since_best: jax.Array   # int32 evaluations since the last improvement
  best_value: jax.Array         # float32 best validation loss so far (inf before any)


def early_stopping(patience: int = 10, *, rtol: float = 0.01,
                   atol: float = 0.0) -> optax.GradientTransformationExtraArgs:
  """Leaves updates unchanged; ``state.stop`` says the validation loss stopped improving.

  The stop-only part of :func:`plateau_lr`, for optimizers that set their LR
  another way: ``optax.chain(optax.adam(1e-3), early_stopping(10))``. It reads
  ``val_loss`` and ``new_eval`` the way :func:`plateau_lr` does, counts an
  evaluation as an improvement when ``val_loss < (1 - rtol) * best - atol``,
  and sets ``stop`` (for good) after ``patience`` evaluations in a row without
  one; a NaN, +inf or -inf never improves. :func:`should_stop` reads it. ``rtol`` and
  ``atol`` may be traced (``optax.inject_hyperparams``); ``patience`` must be a Python
  int. Unlike :func:`plateau_lr` it never reads ``value``: a training loop that
  passes its training loss at every step does not stop on it.
  """
  try:
    patience = check_int("patience", patience, low=1)
    # rtol and atol only enter arithmetic, so they may be traced.
    checked_rtol = check_number("rtol", rtol, low=0.0, high=1.0, traced_ok=True)
    checked_atol = check_number("atol", atol, low=0.0, traced_ok=True)
  except ValueError as e:
    raise ValueError(f"early_stopping: {e}") from None
  rtol = rtol if checked_rtol is None else checked_rtol
  atol = atol if checked_atol is None else checked_atol

  def init_fn(params):
    del params
    return EarlyStoppingState(stop=jnp.asarray(False), evals=jnp.zeros((), jnp.int32),
                              evals_since_best=jnp.zeros((), jnp.int32),
                              best_value=jnp.asarray(jnp.inf, jnp.float32))

  def update_fn(updates, state, params=None, *, val_loss=None, new_eval=None, **extra_args):
    del params, extra_args
    if new_eval is False:
      return updates, state
    if val_loss is None:
      raise ValueError("early_stopping needs the validation loss: pass update(..., "
                       "val_loss=loss, new_eval=flag) (metaopt.train_grid: "
                       "feed_val_loss=True); new_eval=False on steps without one")
    val_loss = jnp.asarray(val_loss, jnp.float32)
    if val_loss.shape != ():
      raise ValueError(f"early_stopping: val_loss must be a scalar, got shape {val_loss.shape}")
    improved = jnp.isfinite(val_loss) & (val_loss < (1 - rtol) * state.best_value - atol)
    since_best = jnp.where(improved, 0, state.evals_since_best + 1).astype(jnp.int32)
    advanced = EarlyStoppingState(
        stop=state.stop | (since_best >= patience), evals=state.evals + 1,
        evals_since_best=since_best,
        best_value=jnp.where(improved, val_loss, state.best_value))
    flag = jnp.asarray(True if new_eval is None else new_eval).astype(bool)
    state = jax.tree.map(lambda new, old: jnp.where(flag, new, old), advanced, state)
    return updates, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
