"""Scaling out: device meshes, the ``sharding=`` option, chunked vmap and multi-host start.

A leaf utility (it imports no other metaopt module). Every
``sharding=`` argument of metaopt (:func:`metaopt.meta_train`, :func:`metaopt.maml`,
:func:`metaopt.train_grid`, :func:`metaopt.estimators.es` and ``pes``) accepts

- ``None``: no sharding, one device (the default; nothing changes);
- ``"auto"``: a one-axis mesh over every device (``None`` when there is only one);
- a :class:`jax.sharding.Mesh`: the mapped axis is split over all of its axes;
- a :class:`jax.sharding.NamedSharding`: the mapped axis is split over the mesh axes
  named by the first entry of its ``PartitionSpec``.

The mapped axis (a population of inner runs, the tasks of a meta-batch, the runs of a
grid) is constrained to that sharding inside ``jit``; whatever averages over it becomes
a collective that XLA inserts. Results match one device to floating-point tolerance.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

PyTree = Any
Sharding = Union[None, str, Mesh, NamedSharding]
AXIS = "batch"  # the axis name of meshes made here


def shown(value: Any, limit: int = 80) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def check_int(name: str, value: Any, low: int = 1) -> int:
  """``value`` as an int >= ``low``; ``ValueError`` naming it otherwise."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
      or value < low:
    raise ValueError(f"{name} must be an integer >= {low}, got {shown(value)}")
  return int(value)


def make_mesh(devices: Optional[Sequence[jax.Device]] = None, axis_name: str = AXIS) -> Mesh:
  """A one-axis mesh over ``devices`` (default: every device of every process).

  Its axis type is ``Auto``: XLA propagates shardings from the constrained mapped axis,
  as the ``sharding=`` options expect.
  """
  if not isinstance(axis_name, str) or not axis_name:
    raise ValueError(f"axis_name must be a non-empty string, got {shown(axis_name)}")
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("make_mesh needs at least one device, got an empty list")
  return Mesh(np.asarray(devices), (axis_name,), axis_types=(AxisType.Auto,))


def _axis_names(spec_entry) -> tuple:
  if spec_entry is None:
    return ()
  return tuple(spec_entry) if isinstance(spec_entry, tuple) else (spec_entry,)


def resolve(sharding: Sharding, size: Optional[int] = None, *,
            what: str = "population") -> Optional[NamedSharding]:
  """A ``sharding=`` argument as a :class:`NamedSharding` of a leading axis, or ``None``.

  ``size``, the length of that axis (``what`` names it in errors), must divide evenly
  over the devices the axis is split across. Raises ``ValueError`` naming a bad value.
  """
  if sharding is None:
    return None
  if isinstance(sharding, str):
    if sharding != "auto":
      raise ValueError(f"sharding must be None, 'auto', a jax.sharding.Mesh or a "
                       f"NamedSharding, got {shown(sharding)}")
    if jax.device_count() == 1:
      return None
    out = NamedSharding(make_mesh(), PartitionSpec(AXIS))
  elif isinstance(sharding, Mesh):
    names = tuple(sharding.axis_names)
    out = NamedSharding(sharding, PartitionSpec(names if len(names) > 1 else names[0]))
  elif isinstance(sharding, NamedSharding):
    spec = sharding.spec
    names = _axis_names(spec[0]) if len(spec) else ()
    if not names:
      raise ValueError(f"the sharding's PartitionSpec {spec} does not split the leading "
                       f"({what}) axis; give it a mesh axis name first, e.g. "
                       f"PartitionSpec({sharding.mesh.axis_names[0]!r})")
    missing = [n for n in names if n not in sharding.mesh.axis_names]
    if missing:
      raise ValueError(f"mesh axis {missing[0]!r} does not exist; the mesh has axes "
                       f"{tuple(sharding.mesh.axis_names)}")
    out = NamedSharding(sharding.mesh, PartitionSpec(spec[0]))
  else:
    raise ValueError(f"sharding must be None, 'auto', a jax.sharding.Mesh or a "
                     f"NamedSharding, got {type(sharding).__name__} {shown(sharding)}")
  if size is not None:
    check_divisible(size, out, what=what)
  return out


def shards(sharding: NamedSharding) -> int:
  """How many pieces ``sharding`` cuts its leading axis into."""
  names = _axis_names(sharding.spec[0]) if len(sharding.spec) else ()
  return math.prod(sharding.mesh.shape[n] for n in names)


def check_divisible(size: int, sharding: Optional[NamedSharding], *,
                    what: str = "population") -> None:
  """``ValueError`` unless ``size`` splits evenly over the devices of ``sharding``."""
  if sharding is None:
    return
  n = shards(sharding)
  if size % n:
    axes = ", ".join(repr(a) for a in _axis_names(sharding.spec[0]))
    raise ValueError(f"{what}={size} is not divisible by the {n} devices of mesh axis "
                     f"{axes}; use a {what} that is a multiple of {n}")


def _leading(sharding: NamedSharding, axis: int, ndim: int) -> NamedSharding:
  spec = [None] * ndim
  spec[axis] = sharding.spec[0]
  return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def constrain(tree: PyTree, sharding: Optional[NamedSharding], axis: int = 0) -> PyTree:
  """Inside ``jit``: every array leaf split along ``axis`` as ``sharding`` says (others
  replicated). ``None`` returns ``tree`` unchanged; leaves with fewer axes pass through."""
  if sharding is None:
    return tree
  return jax.tree.map(
      lambda x: (jax.lax.with_sharding_constraint(x, _leading(sharding, axis, x.ndim))
                 if hasattr(x, "ndim") and x.ndim > axis else x), tree)


def replicated(sharding: NamedSharding) -> NamedSharding:
  """Every device of ``sharding``'s mesh holds a full copy."""
  return NamedSharding(sharding.mesh, PartitionSpec())


def put(tree: PyTree, sharding: Optional[NamedSharding], axis: int = 0) -> PyTree:
  """Outside ``jit``: :func:`jax.device_put` of every leaf, split along ``axis``.

  In a multi-process run every process passes the same global values.
  """
  if sharding is None:
    return tree
  return jax.tree.map(lambda x: jax.device_put(
      x, _leading(sharding, axis, np.ndim(x)) if np.ndim(x) > axis else replicated(sharding)),
      tree)


def abstract(tree: PyTree, sharding: Optional[NamedSharding], *, split: bool = True,
             axis: int = 0) -> PyTree:
  """``jax.ShapeDtypeStruct`` leaves placed as :func:`put` (``split``) or :func:`replicate`
  would place them: a restore target that brings a checkpoint back onto the mesh."""
  if sharding is None:
    return tree

  def one(x):
    shape = np.shape(x)
    where = (_leading(sharding, axis, len(shape)) if split and len(shape) > axis
             else replicated(sharding))
    return jax.ShapeDtypeStruct(shape, x.dtype, sharding=where)
  return jax.tree.map(one, tree)


def replicate(tree: PyTree, sharding: Optional[NamedSharding]) -> PyTree:
  """Outside ``jit``: a full copy of ``tree`` on every device of the mesh."""
  if sharding is None:
    return tree
  return jax.device_put(tree, replicated(sharding))


# --- a population, mapped in chunks and split across devices ---------------------------


def _normalize_axes(in_axes, n_args: int) -> tuple:
  axes = (in_axes,) * n_args if not isinstance(in_axes, (tuple, list)) else tuple(in_axes)
  if len(axes) != n_args or any(a not in (0, None) for a in axes):
    raise ValueError(f"in_axes must be 0, None or one of them per argument, got {in_axes!r}")
  return axes


def population_map(fn: Callable, in_axes: Union[int, None, Sequence] = 0, *,
                   chunk_size: Optional[int] = None,
                   sharding: Optional[NamedSharding] = None,
                   what: str = "population") -> Callable:
  """``jax.vmap(fn, in_axes)`` over a leading population axis, optionally in chunks and
  split across devices.

  With ``chunk_size`` the population runs ``chunk_size`` members at a time in a
  ``lax.map`` over vmapped chunks, so memory grows with the chunk, not the population.
  Chunk ``j`` holds members ``j, j + n_chunks, ...``: with ``sharding`` each chunk is
  itself split across the devices, so chunking and sharding compose. Results equal
  ``jax.vmap``'s. ``in_axes``: ``0`` (mapped) or ``None`` (shared) per argument;
  ``what`` names the mapped axis in errors. Without both options this is exactly ``jax.vmap(fn, in_axes)``.
  """
  if chunk_size is not None:
    chunk_size = check_int("chunk_size", chunk_size)
  if chunk_size is None and sharding is None:
    return jax.vmap(fn, in_axes)

  def mapped(*args):
    axes = _normalize_axes(in_axes, len(args))
    sizes = {x.shape[0] for a, ax in zip(args, axes) if ax == 0 for x in jax.tree.leaves(a)}
    if len(sizes) != 1:
      raise ValueError(f"population_map needs one leading size over the mapped arguments, "
                       f"got {sorted(sizes)}")
    n = sizes.pop()
    check_divisible(n, sharding, what=what)
    args = [constrain(a, sharding) if ax == 0 else a for a, ax in zip(args, axes)]
    if chunk_size is None or chunk_size >= n:
      return constrain(jax.vmap(fn, axes)(*args), sharding)
    if n % chunk_size:
      raise ValueError(f"chunk_size={chunk_size} does not divide the {what} of {n}; "
                       f"use a divisor of {n}")
    check_divisible(chunk_size, sharding, what="chunk_size")
    chunks = n // chunk_size
    # [n] -> [chunk_size, chunks] keeps each device's contiguous block of members on it;
    # the map then walks the second axis, each step taking members spread over devices.
    split = lambda x: constrain(
        jnp.swapaxes(x.reshape((chunk_size, chunks) + x.shape[1:]), 0, 1), sharding, axis=1)
    stacked = [jax.tree.map(split, a) if ax == 0 else None for a, ax in zip(args, axes)]

    def body(chunk):
      full = [c if ax == 0 else a for c, a, ax in zip(chunk, args, axes)]
      return constrain(jax.vmap(fn, axes)(*full), sharding)

    out = jax.lax.map(body, stacked)
    return constrain(jax.tree.map(
        lambda y: jnp.swapaxes(y, 0, 1).reshape((n,) + y.shape[2:]), out), sharding)

  return mapped


# --- data parallelism inside a task --------------------------------------------------


def batch_sharding(mesh: Mesh, axis_name: Optional[str] = None) -> NamedSharding:
  """Examples of a batch split over ``axis_name`` (default: every axis of ``mesh``)."""
  if axis_name is None:
    return resolve(mesh)
  return resolve(NamedSharding(mesh, PartitionSpec(axis_name)), what="batch")


def shard_batch(batch: PyTree, mesh: Mesh, axis_name: Optional[str] = None) -> PyTree:
  """``batch`` with its leading (example) axis split across ``mesh``: data parallelism."""
  sharding = batch_sharding(mesh, axis_name)
  for x in jax.tree.leaves(batch):
    check_divisible(np.shape(x)[0], sharding, what="batch size")
  return put(batch, sharding)


def param_shardings(params: PyTree, mesh: Mesh, *, min_size: Optional[int] = None,
                    axis_name: Optional[str] = None) -> PyTree:
  """A :class:`NamedSharding` per parameter: replicated, or with ``min_size`` (entries)
  set, leaves at least that big split along their largest axis that divides evenly over
  the mesh axis, for models too large for one device. Use as ``jit``'s shardings or
  with :func:`jax.device_put`."""
  sharding = batch_sharding(mesh, axis_name)
  n = shards(sharding)
  if min_size is not None:
    min_size = check_int("min_size", min_size)

  def one(x):
    shape = np.shape(x)
    if min_size is None or math.prod(shape) < min_size:
      return replicated(sharding)
    fits = [d for d in range(len(shape)) if shape[d] % n == 0]
    if not fits:
      return replicated(sharding)
    return _leading(sharding, max(fits, key=lambda d: shape[d]), len(shape))
  return jax.tree.map(one, params)


def shard_params(params: PyTree, mesh: Mesh, *, min_size: Optional[int] = None,
                 axis_name: Optional[str] = None) -> PyTree:
  """``params`` placed by :func:`param_shardings`: replicated by default."""
  return jax.device_put(params, param_shardings(params, mesh, min_size=min_size,
                                                axis_name=axis_name))


# --- many hosts ----------------------------------------------------------------------


class Processes(NamedTuple):
  """What :func:`initialize` found: how many processes, and which one this is."""
  count: int
  index: int
  coordinator: Optional[str]   # host:port of process 0 (None: one process, or SLURM's)
  source: str                  # "single", "env" (JAX_* variables) or "slurm"


def _env_int(env: Mapping[str, str], name: str, low: int = 0) -> int:
  value = env.get(name)
  try:
    number = int(value)
  except (TypeError, ValueError):
    number = None
  if number is None or number < low:
    raise ValueError(f"environment variable {name} must be an integer >= {low}, "
                     f"got {shown(value)}")
  return number


def processes(env: Optional[Mapping[str, str]] = None) -> Processes:
  """The process layout the environment describes, without starting anything.

  ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0) with ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID`` come first; else SLURM's ``SLURM_NTASKS`` and ``SLURM_PROCID``
  (JAX finds the coordinator from ``SLURM_STEP_NODELIST``); else one process.
  """
  env = os.environ if env is None else env
  if env.get("JAX_COORDINATOR_ADDRESS"):
    address = env["JAX_COORDINATOR_ADDRESS"]
    if ":" not in address:
      raise ValueError(f"JAX_COORDINATOR_ADDRESS must be host:port, got {shown(address)}")
    count = _env_int(env, "JAX_NUM_PROCESSES", low=1)
    index = _env_int(env, "JAX_PROCESS_ID")
    source = "env"
  elif env.get("SLURM_JOB_ID") and env.get("SLURM_NTASKS"):
    address, source = None, "slurm"
    count = _env_int(env, "SLURM_NTASKS", low=1)
    index = _env_int(env, "SLURM_PROCID")
  else:
    return Processes(1, 0, None, "single")
  if index >= count:
    raise ValueError(f"process id {index} is not below the process count {count}")
  return Processes(count, index, address, source)


def process_slice() -> slice:
  """This process's share of a dataset's examples: ``slice(index, None, count)``, as
  grain's ``ShardByJaxProcess`` picks them. Index a numpy array or a
  ``grain.MapDataset`` with it so each host reads only its shard."""
  return slice(jax.process_index(), None, jax.process_count())


def is_primary() -> bool:
  """Process 0, the one that writes files every process would write alike."""
  return jax.process_index() == 0


def initialize(env: Optional[Mapping[str, str]] = None) -> Processes:
  """Calls :func:`jax.distributed.initialize` with the layout of :func:`processes`, once
  per process and before anything touches a device; one process: nothing to do.

  Every process then sees every device of the cluster in ``jax.devices()``, and a
  ``sharding="auto"`` spans them all.
  """
  layout = processes(env)
  if layout.count == 1 or jax.distributed.is_initialized():
    return layout
  jax.distributed.initialize(coordinator_address=layout.coordinator,
                             num_processes=layout.count, process_id=layout.index)
  return layout
