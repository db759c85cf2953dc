"""What every metaopt LR transform shares: the scaling step, and reading its state.

A transform that sets the LR keeps it in a ``NamedTuple`` state field named
``learning_rate`` (optax.contrib's Prodigy and D-Adaptation call theirs
``estim_lr``); one that can tell a training loop to stop keeps a bool field
``stop``. :func:`current_lr` and :func:`should_stop` find those fields anywhere
in an optimizer state (a chain, ``optax.MultiSteps``, ``inject_hyperparams``),
so a new transform needs no registration.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any
_INJECT_STATES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def scale_by_lr(updates: PyTree, learning_rate: jax.Array) -> PyTree:
  """``-learning_rate * updates``, each leaf kept in its own dtype."""
  return jax.tree.map(lambda u: (-learning_rate).astype(u.dtype) * u, updates)


def check_float_updates(updates: PyTree, caller: str) -> None:
  """ValueError (at trace time) for integer updates, which an LR would scale to zero."""
  dtypes = {str(u.dtype) for u in jax.tree.leaves(updates)
            if not jnp.issubdtype(u.dtype, jnp.inexact)}
  if dtypes:
    raise ValueError(f"{caller}: updates must be floating point (an LR scales integers "
                     f"to zero), got {', '.join(sorted(dtypes))}")


def _has_field(node: Any, field: str) -> bool:
  return isinstance(node, tuple) and field in getattr(node, "_fields", ())


LR_FIELDS = ("learning_rate", "estim_lr")


def _lr_field(node: Any):
  return next((f for f in LR_FIELDS if _has_field(node, f)), None)


def _is_lr_node(node: Any) -> bool:
  return isinstance(node, _INJECT_STATES) or _lr_field(node) is not None


def _field_values(state: PyTree, field: str) -> list:
  """The values of every NamedTuple field ``field`` in ``state``."""
  has = lambda x: _has_field(x, field)
  return [getattr(s, field) for s in jax.tree.leaves(state, is_leaf=has) if has(s)]


def current_lr(opt_state: PyTree) -> jax.Array:
  """The LR applied at the latest step, as float32: a state's ``learning_rate``
  field, or ``optax.inject_hyperparams``' ``learning_rate`` (times the step-size
  estimate of a Prodigy or D-Adaptation it wraps); NaN when there is none.

  Raises ValueError when the state holds more than one.
  """
  found = []
  for node in jax.tree.leaves(opt_state, is_leaf=_is_lr_node):
    if isinstance(node, _INJECT_STATES):
      if "learning_rate" in node.hyperparams:
        # Around an estimating optimizer (Prodigy, D-Adaptation) the injected LR is
        # the schedule factor on the estimate: the step applied is their product.
        estimates = _field_values(node.inner_state, "estim_lr") or [1.0]
        found.extend(node.hyperparams["learning_rate"] * e for e in estimates)
    elif _lr_field(node) is not None:
      found.append(getattr(node, _lr_field(node)))
  if len(found) > 1:
    raise ValueError(f"opt_state holds {len(found)} learning rates; expected one")
  return jnp.asarray(found[0], jnp.float32) if found else jnp.full((), jnp.nan)


def evaluation_params(opt_state: PyTree, params: PyTree) -> PyTree:
  """The parameters to evaluate: ``params``, or for a schedule-free optimizer anywhere in
  ``opt_state`` its averaged iterate (``optax.contrib.schedule_free_eval_params``), which
  is what its authors evaluate."""
  is_free = lambda x: isinstance(x, optax.contrib.ScheduleFreeState)
  free = [s for s in jax.tree.leaves(opt_state, is_leaf=is_free) if is_free(s)]
  if len(free) > 1:
    raise ValueError(f"opt_state holds {len(free)} schedule-free states; expected one")
  return optax.contrib.schedule_free_eval_params(free[0], params) if free else params


def has_stop_signal(state: PyTree) -> bool:
  """Whether ``state`` holds a transform with a ``stop`` field (``plateau_lr``,
  ``early_stopping``)."""
  return bool(_field_values(state, "stop"))


def should_stop(state: PyTree) -> jax.Array:
  """True when a ``plateau_lr`` or ``early_stopping`` state in ``state`` says stop.

  ``state`` is an optimizer state or chain. Pure and jit-able; with several
  such states, true when any says stop.
  """
  found = _field_values(state, "stop")
  if not found:
    raise ValueError("should_stop: the optimizer state holds no PlateauState; "
                     "build the optimizer with metaopt plateau_lr or early_stopping")
  return jnp.stack(found).any(axis=0) if len(found) > 1 else found[0]
