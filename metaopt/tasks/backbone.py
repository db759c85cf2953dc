"""Starting-backbone checkpoints: save and load parameter pytrees.

Two formats are read: a single flax msgpack file (`flax.serialization.to_bytes`, what
`save_params` writes) and an orbax checkpoint directory (`ocp.StandardCheckpointer`).
A strict load restores a whole pytree; a partial load (`strict=False`) copies the
parameters whose paths exist in both the checkpoint and the target (a pretrained
backbone) and keeps the target's other leaves (a new classifier head).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Literal, Sequence, overload

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization, traverse_util

PyTree = Any

_ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA")


def save_params(path, params: PyTree) -> pathlib.Path:
  """Write `params` to `path` as one flax msgpack file; returns the path."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(serialization.to_bytes(jax.device_get(params)))
  return path


def _flat(state: Any, *, keep_empty: bool = False) -> dict[str, Any]:
  """'a/b/c' -> leaf of a nested state dict (empty subtrees kept as `empty_node`)."""
  if not isinstance(state, dict):
    return {"": state}
  return traverse_util.flatten_dict(state, sep="/", keep_empty_nodes=keep_empty)


def _read_msgpack(path: pathlib.Path) -> dict:
  try:
    state = serialization.msgpack_restore(path.read_bytes())
  except Exception as e:  # msgpack raises several unrelated types on garbage input
    raise ValueError(
        f"{str(path)!r} is not a flax msgpack checkpoint (could not decode it: {e}); "
        "accepted: a file written by save_params / flax.serialization.to_bytes, "
        "or an orbax checkpoint directory"
    ) from e
  if not isinstance(state, dict) or not state:
    raise ValueError(
        f"{str(path)!r} is not a parameter checkpoint: it decodes to "
        f"{type(state).__name__}, not a nested dict of arrays"
    )
  return state


def _orbax_shapes(path: pathlib.Path) -> dict[str, tuple[int, ...]]:
  meta = ocp.StandardCheckpointer().metadata(path)
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  flat = _flat(serialization.to_state_dict(tree))
  # Empty subtrees (e.g. optax EmptyState) appear as None leaves: no parameters there.
  return {k: tuple(v.shape) for k, v in flat.items() if v is not None}


def _check_shapes(
    stored: dict[str, tuple[int, ...]], target: dict[str, tuple[int, ...]], where: str
) -> None:
  bad = [
      f"{key!r}: checkpoint has {tuple(stored[key])}, the model expects {tuple(target[key])}"
      for key in sorted(stored.keys() & target.keys())
      if tuple(stored[key]) != tuple(target[key])
  ]
  if bad:
    more = f"; ... ({len(bad)} in all)" if len(bad) > 5 else ""
    raise ValueError(
        f"shape mismatch in checkpoint {where} for parameter " + "; ".join(bad[:5]) + more
    )


def _check_same_paths(stored: set[str], target: set[str], where: str) -> None:
  missing, unexpected = sorted(target - stored), sorted(stored - target)
  if missing or unexpected:
    raise ValueError(
        f"checkpoint {where} does not match the model's parameter paths: "
        f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
        f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}; "
        "use strict=False to load only the matching paths"
    )


@overload
def load_params(
    path, target: PyTree, *, strict: Literal[True] = ..., exclude: Sequence[str] = ...
) -> PyTree: ...


@overload
def load_params(
    path, target: PyTree, *, strict: Literal[False], exclude: Sequence[str] = ...
) -> tuple[PyTree, tuple[str, ...]]: ...


def load_params(path, target, *, strict=True, exclude=()):
  """Load parameters from a msgpack file or an orbax directory into `target`'s structure.

  `target` is a pytree like the one saved (e.g. freshly initialized params) and fixes
  the structure, shapes and dtypes of the result (stored values are cast to the
  target's dtypes). With `strict=True` the checkpoint must hold exactly the target's
  paths; the restored pytree is returned. With `strict=False` only paths present in
  both are loaded, the rest of `target` is kept, and `(params, loaded_paths)` is
  returned, paths written 'params/Conv_0/kernel'. `exclude` lists path prefixes never
  loaded (e.g. an old classifier head). Raises FileNotFoundError for a missing path,
  ValueError for a file that is not a checkpoint or any shape mismatch.
  """
  path = pathlib.Path(os.fspath(path))
  if not path.exists():
    raise FileNotFoundError(
        f"checkpoint {str(path)!r} does not exist; expected a flax msgpack file "
        "(save_params) or an orbax checkpoint directory"
    )
  excluded = tuple(p.strip("/") for p in exclude)

  def keep(key: str) -> bool:
    return not any(key == p or key.startswith(p + "/") for p in excluded)

  target_state = serialization.to_state_dict(target)
  # Empty subtrees (e.g. no batch_stats) are not parameters but must survive the merge.
  target_full = _flat(target_state, keep_empty=True)
  target_flat = {k: v for k, v in target_full.items() if v is not traverse_util.empty_node}
  target_shapes = {k: np.shape(v) for k, v in target_flat.items()}
  where = repr(str(path))

  if path.is_dir():
    if not any((path / m).exists() for m in _ORBAX_MARKERS):
      raise ValueError(
          f"directory {where} is not an orbax checkpoint (no {_ORBAX_MARKERS[0]} file); "
          "accepted: an ocp.StandardCheckpointer directory or a flax msgpack file"
      )
    stored_shapes = {k: v for k, v in _orbax_shapes(path).items() if keep(k)}
    _check_shapes(stored_shapes, target_shapes, where)
    checkpointer = ocp.StandardCheckpointer()
    if strict and not excluded:
      _check_same_paths(set(stored_shapes), set(target_shapes), where)
      # An abstract target restores the exact structure (NamedTuples stay NamedTuples).
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
      return checkpointer.restore(path, abstract)
    restored = _flat(serialization.to_state_dict(checkpointer.restore(path)))
    stored_flat = {k: v for k, v in restored.items() if v is not None}
  else:
    stored_flat = _flat(_read_msgpack(path))
    _check_shapes(
        {k: np.shape(v) for k, v in stored_flat.items() if keep(k)}, target_shapes, where
    )
    if strict and not excluded:
      _check_same_paths(set(stored_flat), set(target_flat), where)

  loaded = tuple(sorted(k for k in stored_flat.keys() & target_flat.keys() if keep(k)))
  if strict and excluded:
    _check_same_paths(set(loaded), {k for k in target_flat if keep(k)}, where)
  if not loaded:
    raise ValueError(
        f"checkpoint {where} shares no parameter paths with the model "
        f"(checkpoint: {sorted(stored_flat)[:5]}, model: {sorted(target_flat)[:5]})"
    )
  merged = dict(target_full)
  for key in loaded:
    merged[key] = np.asarray(stored_flat[key], dtype=np.asarray(target_flat[key]).dtype)
  if set(merged) == {""}:
    state = merged[""]
  else:
    state = traverse_util.unflatten_dict(merged, sep="/")
  params = serialization.from_state_dict(target, state)
  if strict:
    return params
  return params, loaded
