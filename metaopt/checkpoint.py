"""Orbax checkpoints of a loop: an array pytree plus a JSON progress record.

Saves are synchronous: a step reported as saved is on disk, and a kill never loses
more than the steps since the last checkpoint. Multi-host runs use orbax's own
multi-process support: every process calls save and restore on one shared folder,
process 0 writes the metadata and the JSON record, each process its arrays' shards. Restore walks back from the newest
checkpoint to the newest one that restores and validates; a damaged one is moved
aside (never deleted) with a message saying which and why.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any
DAMAGED = "damaged"  # subfolder that damaged checkpoints are moved to


def _placed(leaf) -> bool:
  """Whether a restore target's leaf asks for a placement."""
  if isinstance(leaf, jax.Array):
    return leaf.committed
  return getattr(leaf, "sharding", None) is not None


class Checkpoints:
  """Saves every ``every`` steps under ``directory``; restores the newest good one.

  The pytree is restored against an abstract target built from the JSON record
  (``make_target(progress)``), so NamedTuple states come back as NamedTuples.
  """

  def __init__(self, directory, *, every: int, keep: int = 2):
    if every < 1:
      raise ValueError(f"checkpoint interval must be >= 1, got {every}")
    self.directory = pathlib.Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "progress"),
        options=ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                             enable_async_checkpointing=False))

  def save(self, step: int, state: PyTree, progress: dict, *, force: bool = False) -> bool:
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      progress=ocp.args.JsonSave(progress)), force=force)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def restore(self, make_target: Callable[[dict], PyTree],
              validate: Optional[Callable[[dict], None]] = None
              ) -> Optional[tuple[int, PyTree, dict]]:
    """``(step, state, progress)`` of the newest checkpoint that restores, or ``None``.

    ``validate(progress)`` raises for a progress record that is not usable. A
    checkpoint that fails is moved to ``directory/damaged/`` and an older one is tried.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        progress = self.manager.restore(
            step, args=ocp.args.Composite(progress=ocp.args.JsonRestore()))["progress"]
        if not isinstance(progress, dict):
          raise ValueError(f"the progress record is {type(progress).__name__}, not a dict")
        if validate is not None:
          validate(progress)
        fresh = make_target(progress)
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh)
        state = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
        # Restored arrays come back committed to a device; where the target places nothing
        # (an array not committed, a shape without a sharding) they are left unplaced, as
        # a fresh run's are, or every compiled program would compile again on resume.
        state = jax.tree.map(lambda x, f: x if _placed(f) else jnp.asarray(np.asarray(x)),
                             state, fresh)
        return step, state, progress
      except Exception as e:  # orbax, tensorstore and JSON raise many types on damage
        aside = self._set_aside(step)
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        print(f"metaopt: checkpoint {step} in {self.directory} does not restore "
              f"({type(e).__name__}: {reason}); moved it to {aside}, trying an older one",
              file=sys.stderr, flush=True)
    return None

  def _set_aside(self, step: int) -> pathlib.Path:
    damaged = self.directory / DAMAGED
    damaged.mkdir(exist_ok=True)
    target, i = damaged / str(step), 1
    while target.exists():
      i += 1
      target = damaged / f"{step}-{i}"
    if jax.process_index() == 0:  # multi-host: one process moves it, the others wait
      (self.directory / str(step)).rename(target)
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes(f"metaopt_set_aside_{step}")
    self.manager.reload()
    return target

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
