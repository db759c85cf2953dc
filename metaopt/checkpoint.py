"""Orbax checkpoints of a meta-training loop: an array pytree plus a JSON progress record."""

from __future__ import annotations

import pathlib
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp

PyTree = Any


class Checkpoints:
  """Saves every ``every`` steps under ``directory``; restores the latest.

  The pytree is restored against an abstract target built from the JSON record
  (``make_target(progress)``), so NamedTuple states come back as NamedTuples.
  """

  def __init__(self, directory, *, every: int, keep: int = 2):
    if every < 1:
      raise ValueError(f"checkpoint interval must be >= 1, got {every}")
    self.directory = pathlib.Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "progress"),
        options=ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep))

  def save(self, step: int, state: PyTree, progress: dict, *, force: bool = False) -> bool:
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      progress=ocp.args.JsonSave(progress)), force=force)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def restore(self, make_target: Callable[[dict], PyTree]) -> Optional[tuple[int, PyTree, dict]]:
    """``(step, state, progress)`` of the latest checkpoint, or ``None``."""
    step = self.manager.latest_step()
    if step is None:
      return None
    progress = self.manager.restore(
        step, args=ocp.args.Composite(progress=ocp.args.JsonRestore()))["progress"]
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, make_target(progress))
    state = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    return step, state, progress

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
