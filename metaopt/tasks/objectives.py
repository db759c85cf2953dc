"""What a task optimizes and reports: per-example losses and metrics over model outputs.

A task's dataset names its objective (``Dataset.objective``). Every objective reports
an ``accuracy`` (for speech: word accuracy, 1 - WER), so training loops, experiments
and reports treat every modality alike.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metaopt.validation import check_choice


class Objective(NamedTuple):
  """``losses(outputs, y) -> [batch]`` and ``metrics(outputs, y) -> {name: mean}``; an
  objective whose metrics also take ``weight=`` (per-example 0/1, for padded splits) can
  be evaluated on padded data (:meth:`metaopt.tasks.Task.metrics`)."""
  losses: Callable[[Any, Any], jax.Array]
  metrics: Callable[[Any, Any], dict]


def _classification_losses(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def _classification_metrics(logits, y, weight=None):
  """Accuracy and macro-F1 (the mean F1 over the classes that occur among the labels or
  the predictions, as scikit-learn's ``f1_score(average="macro")``)."""
  pred = jnp.argmax(logits, axis=-1)
  w = jnp.ones(y.shape, jnp.float32) if weight is None else weight
  correct = (pred == y).astype(jnp.float32)
  classes = logits.shape[-1]
  truth = jax.nn.one_hot(y, classes) * w[:, None]
  guess = jax.nn.one_hot(pred, classes) * w[:, None]
  tp = jnp.sum(truth * guess, axis=0)
  denom = jnp.sum(truth, axis=0) + jnp.sum(guess, axis=0)   # 2 tp + fp + fn
  present = denom > 0
  f1 = jnp.where(present, 2 * tp / jnp.maximum(denom, 1e-12), 0.0)
  return {"accuracy": weighted_mean(correct, w),
          "macro_f1": jnp.sum(f1) / jnp.maximum(jnp.sum(present), 1)}


def weighted_mean(values, weight):
  """Mean of ``values`` weighted by ``weight`` (0/1 masks of padded rows)."""
  return jnp.sum(values * weight) / jnp.maximum(jnp.sum(weight), 1.0)


CLASSIFICATION = Objective(_classification_losses, _classification_metrics)
OBJECTIVES: dict[str, Objective] = {"classification": CLASSIFICATION}


def register(name: str, objective: Objective) -> None:
  """Makes ``objective`` available to datasets under ``name``."""
  OBJECTIVES[name] = objective


def get(name: str) -> Objective:
  return OBJECTIVES[check_choice("objective", name, OBJECTIVES)]
