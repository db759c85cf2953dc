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
  correct = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
  return {"accuracy": correct.mean() if weight is None else weighted_mean(correct, weight)}


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
