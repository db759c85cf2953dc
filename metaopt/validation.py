"""Argument checks shared by every layer: numbers, integers, choices.

Each check raises ``ValueError`` naming the argument, the value it got and
what is accepted. Values traced by ``jax.jit`` or ``optax.inject_hyperparams``
cannot be checked on the host: :func:`concrete` returns ``None`` for them, and
the number checks pass them through when called with ``traced_ok=True``.
"""

from __future__ import annotations

import math
import numbers
import os
import pathlib
import warnings
from typing import Any, Iterable, Optional

import jax
import numpy as np


def is_number(x: Any) -> bool:
  """A real number (Python or numpy scalar); ``bool`` is not a number here."""
  return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def is_integer(x: Any) -> bool:
  """An integer (Python or numpy); ``bool`` is not an integer here."""
  return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def concrete(value: Any) -> Optional[float]:
  """``float(value)``, or ``None`` for a value traced by jax (checked by whoever made it)."""
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    return float(value)
  except (TypeError, ValueError, OverflowError, jax.errors.ConcretizationTypeError):
    return None


def shown(value: Any, limit: int = 80) -> str:
  """``repr(value)`` for an error message: shortened, and safe for huge integers."""
  try:
    text = repr(value)
  except ValueError:  # Python refuses to print integers of more than 4300 digits
    return f"an integer of {value.bit_length()} bits"
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _interval(low, high, low_open, high_open) -> str:
  lo = "(-inf" if low is None else f"{'(' if low_open else '['}{low:g}"
  hi = "inf)" if high is None else f"{high:g}{')' if high_open else ']'}"
  return f"{lo}, {hi}"


def check_number(name: str, value: Any, *, low: Optional[float] = None,
                 high: Optional[float] = None, low_open: bool = False,
                 high_open: bool = False, traced_ok: bool = False) -> Optional[float]:
  """``value`` as a finite float within the bounds; ``None`` for a traced value
  when ``traced_ok``. ``low_open``/``high_open`` exclude the bound itself."""
  if isinstance(value, jax.core.Tracer):
    if traced_ok:
      return None
    raise ValueError(f"{name} must be a concrete number, not a traced value: it is checked "
                     "when the transform is built (keep it in static_args of "
                     f"optax.inject_hyperparams), got {shown(value)}")
  x = None if isinstance(value, (bool, np.bool_)) else concrete(value)
  ok = x is not None and math.isfinite(x)
  if ok and low is not None:
    ok = x > low if low_open else x >= low
  if ok and high is not None:
    ok = x < high if high_open else x <= high
  if not ok:
    raise ValueError(f"{name} must be a finite number in {_interval(low, high, low_open, high_open)}"
                     f", got {shown(value)}")
  return x


def check_positive(name: str, value: Any, *, traced_ok: bool = False) -> Optional[float]:
  """A finite number > 0 (``None`` for a traced value when ``traced_ok``)."""
  try:
    return check_number(name, value, low=0.0, low_open=True, traced_ok=traced_ok)
  except ValueError:
    raise ValueError(f"{name} must be a positive finite number, got {shown(value)}") from None


def check_int(name: str, value: Any, *, low: int = 1, high: Optional[int] = None) -> int:
  """``value`` as an int in ``[low, high]``; bools and non-integral floats are refused."""
  if not is_integer(value) or value < low or (high is not None and value > high):
    bound = f">= {low}" if high is None else f"in [{low}, {high}]"
    hint = (" (a Python int: it cannot be injected or traced; keep it in static_args of "
            "optax.inject_hyperparams)" if isinstance(value, jax.Array) else "")
    raise ValueError(f"{name} must be an integer {bound}{hint}, got {shown(value)}")
  return int(value)


def check_choice(name: str, value: Any, accepted: Iterable) -> Any:
  """``value`` if it is one of ``accepted``, else a ValueError listing them."""
  accepted = tuple(accepted)
  if not isinstance(value, str) and not isinstance(value, (int, float)):
    raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(map(str, accepted))}")
  if value not in accepted:
    raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(map(str, accepted))}")
  return value


def renamed(function: str, new_name: str, new_value: Any, old_name: str, old_value: Any) -> Any:
  """The value of an argument renamed from ``old_name`` to ``new_name``: the old keyword
  still works for one release, with a DeprecationWarning; giving both is an error."""
  if old_value is None:
    return new_value
  if new_value is not None:
    raise ValueError(f"{function}: give {new_name}= only ({old_name}= is its old name)")
  warnings.warn(f"{function}({old_name}=...) is deprecated; use {new_name}=...",
                DeprecationWarning, stacklevel=3)
  return old_value


def required(function: str, name: str, value: Any, what: str) -> Any:
  """``value``, or a ValueError saying ``function`` needs ``name`` (``what`` it is)."""
  if value is None:
    raise ValueError(f"{function}: {name} is required ({what})")
  return value


def _nearest_existing(path: pathlib.Path) -> pathlib.Path:
  while not path.exists() and path != path.parent:
    path = path.parent
  return path


def check_writable_folder(label: str, path) -> pathlib.Path:
  """``path`` as a folder that exists and is writable, or can be created (checked
  before any work starts); ValueError naming ``label`` and the path otherwise."""
  path = pathlib.Path(path)
  base = _nearest_existing(path.absolute())
  if base == path.absolute() and not base.is_dir():
    raise ValueError(f"{label} {str(path)!r} is a file, not a folder")
  if not base.is_dir():
    raise ValueError(f"{label} {str(path)!r} cannot be created: {str(base)!r} is a file")
  if not os.access(base, os.W_OK | os.X_OK):
    raise ValueError(f"{label} {str(path)!r} is not writable ({str(base)!r} is read-only)")
  return path


def check_writable_file(label: str, path) -> pathlib.Path:
  """``path`` as a file that can be written: not a folder, in a writable folder that exists."""
  path = pathlib.Path(path)
  if path.is_dir():
    raise ValueError(f"{label} {str(path)!r} is a folder; pass a file path")
  parent = path.absolute().parent
  if not parent.is_dir():
    raise ValueError(f"{label} {str(path)!r}: folder {str(parent)!r} does not exist")
  if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
    raise ValueError(f"{label} {str(path)!r} is not writable")
  return path


def check_folder_name(label: str, name: str) -> str:
  """A single safe folder name: not empty, no separator, not . or .., no control characters."""
  bad = (not name or name in (".", "..") or "/" in name or "\\" in name
         or any(ord(c) < 32 or ord(c) == 127 for c in name))
  if bad:
    raise ValueError(f"{label} {name!r} must be a single folder name: not empty, no '/' or "
                     "'\\', not '.' or '..', no control characters")
  return name


SEED_MAX = 2 ** 32 - 1  # one rule for every seed: what numpy and jax keys both take


def check_seed(name: str, value: Any) -> int:
  """A seed: an integer in [0, 2**32 - 1]."""
  return check_int(name, value, low=0, high=SEED_MAX)
