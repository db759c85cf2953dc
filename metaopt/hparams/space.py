"""Hyperparameter search spaces: named float, int and categorical parameters.

A :class:`Space` validates hyperparameter dicts, samples them from a seeded
numpy ``Generator``, maps them to a vector in ``[0, 1]^d`` (log scale where a
parameter is log-scaled; a category's position among its choices) and back,
reads and writes a JSON form, and can be inferred from past runs.

JSON form: a list with one object per parameter::

  [{"name": "learning_rate", "type": "float", "low": 1e-5, "high": 0.1, "log": true},
   {"name": "layers", "type": "int", "low": 2, "high": 5},
   {"name": "batch_size", "type": "categorical", "choices": [16, 32, 64, 128]}]
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from metaopt.validation import is_number as _is_number

KINDS: tuple[str, ...] = ("float", "int", "categorical")


class Param(NamedTuple):
  """One hyperparameter: ``kind`` is "float", "int" or "categorical".

  Numeric parameters take values in ``[low, high]`` (log-uniform when ``log``);
  categorical ones take one of ``choices`` (JSON scalars: numbers, strings, bools).
  """
  name: str
  kind: str
  low: float | None = None
  high: float | None = None
  log: bool = False
  choices: tuple | None = None


def _python_scalar(x: Any) -> Any:
  """numpy scalars become the matching Python scalar (JSON and equality friendly)."""
  if isinstance(x, np.generic):
    return x.item()
  return x


def _same(a: Any, b: Any) -> bool:
  """Equality that keeps True apart from 1 and "1" apart from 1."""
  if isinstance(a, (bool, np.bool_)) != isinstance(b, (bool, np.bool_)):
    return False
  if isinstance(a, str) != isinstance(b, str):
    return False
  return a == b


def _check_param(p: Param) -> Param:
  """``p`` with normalized types; ValueError naming the problem if it is not valid."""
  if not isinstance(p.name, str) or not p.name:
    raise ValueError(f"parameter name must be a non-empty string, got {p.name!r}")
  if p.kind not in KINDS:
    raise ValueError(f"parameter {p.name!r}: unknown type {p.kind!r}; accepted: {', '.join(KINDS)}")
  if p.kind == "categorical":
    if p.low is not None or p.high is not None or p.log:
      raise ValueError(f"parameter {p.name!r}: a categorical parameter takes choices, "
                       "not low/high/log")
    if p.choices is None or isinstance(p.choices, (str, bytes)) or len(p.choices) == 0:
      raise ValueError(f"parameter {p.name!r}: categorical needs a non-empty list of choices, "
                       f"got {p.choices!r}")
    choices = tuple(_python_scalar(c) for c in p.choices)
    for c in choices:
      if not (isinstance(c, (str, bool)) or (_is_number(c) and math.isfinite(c))):
        raise ValueError(f"parameter {p.name!r}: choice {c!r} is not a number, string or bool")
    for i, c in enumerate(choices):
      if any(_same(c, d) for d in choices[:i]):
        raise ValueError(f"parameter {p.name!r}: duplicate choice {c!r}")
    return Param(p.name, p.kind, choices=choices)
  if p.choices is not None:
    raise ValueError(f"parameter {p.name!r}: a {p.kind} parameter takes low/high, not choices")
  for label, v in (("low", p.low), ("high", p.high)):
    if not _is_number(v) or not math.isfinite(v):
      raise ValueError(f"parameter {p.name!r}: {label} must be a finite number, got {v!r}")
  if not isinstance(p.log, (bool, np.bool_)):
    raise ValueError(f"parameter {p.name!r}: log must be true or false, got {p.log!r}")
  low, high = _python_scalar(p.low), _python_scalar(p.high)
  if p.kind == "int":
    if low != int(low) or high != int(high):
      raise ValueError(f"parameter {p.name!r}: int bounds must be integers, got [{low}, {high}]")
    low, high = int(low), int(high)
  else:
    low, high = float(low), float(high)
  if not low < high:
    raise ValueError(f"parameter {p.name!r}: need low < high, got [{low}, {high}]")
  if p.log and low <= 0:
    raise ValueError(f"parameter {p.name!r}: a log-scaled parameter needs low > 0, got {low}")
  return Param(p.name, p.kind, low, high, bool(p.log))


class Space:
  """An ordered set of :class:`Param`; see the module docstring for the JSON form."""

  def __init__(self, params: Iterable[Param]):
    params = tuple(_check_param(Param(*p) if not isinstance(p, Param) else p) for p in params)
    if not params:
      raise ValueError("a space needs at least one parameter")
    names = [p.name for p in params]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
      raise ValueError(f"duplicate parameter names: {', '.join(dup)}")
    self.params: tuple[Param, ...] = params

  # -- basics ---------------------------------------------------------------------
  @property
  def names(self) -> tuple[str, ...]:
    return tuple(p.name for p in self.params)

  @property
  def dim(self) -> int:
    """Length of an encoded vector (one entry per parameter)."""
    return len(self.params)

  def __getitem__(self, name: str) -> Param:
    for p in self.params:
      if p.name == name:
        return p
    raise KeyError(name)

  def __eq__(self, other) -> bool:
    return isinstance(other, Space) and self.to_json() == other.to_json()

  def __hash__(self):
    return hash(repr(self.to_json()))

  def __repr__(self) -> str:
    return f"Space({list(self.params)!r})"

  # -- checking -------------------------------------------------------------------
  def _check_value(self, p: Param, value: Any) -> Any:
    value = _python_scalar(value)
    if p.kind == "categorical":
      for c in p.choices:
        if _same(value, c) or (_is_number(value) and _is_number(c) and value == c):
          return c
      raise ValueError(f"hyperparameter {p.name!r}: value {value!r} is not one of the choices "
                       f"{list(p.choices)}")
    if not _is_number(value) or not math.isfinite(value):
      raise ValueError(f"hyperparameter {p.name!r}: value {value!r} is not a finite number "
                       f"(range [{p.low}, {p.high}])")
    if p.kind == "int":
      if value != int(value):
        raise ValueError(f"hyperparameter {p.name!r}: value {value!r} is not an integer "
                         f"(range [{p.low}, {p.high}])")
      value = int(value)
    else:
      value = float(value)
    # A relative tolerance absorbs float round trips through JSON/encode/decode.
    tol = 1e-9 * max(abs(p.low), abs(p.high))
    if not p.low - tol <= value <= p.high + tol:
      raise ValueError(f"hyperparameter {p.name!r}: value {value!r} is outside the range "
                       f"[{p.low}, {p.high}]")
    return min(max(value, p.low), p.high)

  def validate(self, hparams: Mapping[str, Any]) -> dict:
    """The hparams with canonical Python types; ValueError on an unknown name,
    a missing name or a value outside the space."""
    if not isinstance(hparams, Mapping):
      raise ValueError(f"hyperparameters must be a mapping of name to value, got {hparams!r}")
    unknown = [k for k in hparams if k not in self.names]
    if unknown:
      raise ValueError(f"unknown hyperparameter {', '.join(map(repr, unknown))}; accepted: "
                       f"{', '.join(self.names)}")
    missing = [n for n in self.names if n not in hparams]
    if missing:
      raise ValueError(f"missing hyperparameter {', '.join(map(repr, missing))}; the space has: "
                       f"{', '.join(self.names)}")
    return {p.name: self._check_value(p, hparams[p.name]) for p in self.params}

  # -- sampling and encoding ------------------------------------------------------
  def sample(self, rng: np.random.Generator) -> dict:
    """One configuration drawn independently per parameter (log-uniform where ``log``)."""
    if not isinstance(rng, np.random.Generator):
      raise ValueError(f"sample needs a numpy Generator (np.random.default_rng(seed)), got {rng!r}")
    return self.decode(rng.random(self.dim))

  def encode(self, hparams: Mapping[str, Any]) -> np.ndarray:
    """A float64 vector in [0, 1]: position within [low, high] (of the logs where
    ``log``), or index / (choices - 1) for categories (0.5 for a single choice)."""
    h = self.validate(hparams)
    out = np.empty(self.dim)
    for i, p in enumerate(self.params):
      v = h[p.name]
      if p.kind == "categorical":
        n = len(p.choices)
        j = next(j for j, c in enumerate(p.choices) if _same(c, v))
        out[i] = j / (n - 1) if n > 1 else 0.5
      elif p.log:
        out[i] = (math.log(v) - math.log(p.low)) / (math.log(p.high) - math.log(p.low))
      else:
        out[i] = (v - p.low) / (p.high - p.low)
    return np.clip(out, 0.0, 1.0)

  def decode(self, vec: Sequence[float]) -> dict:
    """The configuration at a point of [0, 1]^d (clipped into it): the point is
    snapped onto the grid first (:meth:`snap`), so categories and linear ints split
    [0, 1] into equal bins (uniform points sample them uniformly) and log-scaled
    ints are rounded. ``decode(encode(h)) == h``."""
    vec = np.asarray(vec, np.float64)
    if vec.shape != (self.dim,):
      raise ValueError(f"encoded vector must have shape ({self.dim},), got {vec.shape}")
    if not np.all(np.isfinite(vec)):
      raise ValueError(f"encoded vector has non-finite entries: {vec.tolist()}")
    out = {}
    for u, p in zip(self.snap(vec).tolist(), self.params):
      if p.kind == "categorical":
        n = len(p.choices)
        out[p.name] = p.choices[int(round(u * (n - 1))) if n > 1 else 0]
        continue
      if p.log:
        v = math.exp(math.log(p.low) + u * (math.log(p.high) - math.log(p.low)))
      else:
        v = p.low + u * (p.high - p.low)
      v = min(max(v, p.low), p.high)
      out[p.name] = int(round(v)) if p.kind == "int" else float(v)
    return out

  def snap(self, u: np.ndarray) -> np.ndarray:
    """Encoded points ``u`` [..., dim] moved onto the space's grid, all at once:
    categories to their choice's position, ints to the position of the integer
    their bin (or, log-scaled, their rounded value) holds; floats only clipped."""
    u = np.clip(np.asarray(u, np.float64), 0.0, 1.0)
    cols = []
    for i, p in enumerate(self.params):
      x = u[..., i]
      if p.kind == "categorical":
        n = len(p.choices)
        j = np.clip(np.floor(x * n), 0, n - 1)
        x = j / (n - 1) if n > 1 else np.full_like(x, 0.5)
      elif p.kind == "int" and not p.log:
        v = np.clip(np.floor(p.low + x * (p.high - p.low + 1)), p.low, p.high)
        x = (v - p.low) / (p.high - p.low)
      elif p.kind == "int":
        lo, hi = math.log(p.low), math.log(p.high)
        v = np.clip(np.round(np.exp(lo + x * (hi - lo))), p.low, p.high)
        x = (np.log(v) - lo) / (hi - lo)
      cols.append(x)
    return np.stack(cols, axis=-1)

  # -- JSON -----------------------------------------------------------------------
  def to_json(self) -> list[dict]:
    out = []
    for p in self.params:
      if p.kind == "categorical":
        out.append({"name": p.name, "type": "categorical", "choices": list(p.choices)})
      else:
        out.append({"name": p.name, "type": p.kind, "low": p.low, "high": p.high, "log": p.log})
    return out

  @classmethod
  def from_json(cls, obj: Any) -> "Space":
    """The space of a JSON list of parameter objects (see the module docstring)."""
    if isinstance(obj, Mapping) and "params" in obj:
      obj = obj["params"]
    if not isinstance(obj, (list, tuple)):
      raise ValueError(f"a space must be a JSON list of parameter objects, got {type(obj).__name__}")
    params = []
    for i, spec in enumerate(obj):
      if not isinstance(spec, Mapping):
        raise ValueError(f"space entry {i} must be an object, got {spec!r}")
      allowed = {"name", "type", "low", "high", "log", "choices"}
      extra = sorted(set(spec) - allowed)
      if extra:
        raise ValueError(f"space entry {i} ({spec.get('name')!r}): unknown keys {extra}; "
                         f"accepted: {', '.join(sorted(allowed))}")
      for key in ("name", "type"):
        if key not in spec:
          raise ValueError(f"space entry {i} has no {key!r}: {dict(spec)!r}")
      if spec["type"] not in KINDS:
        raise ValueError(f"space entry {i} ({spec['name']!r}): unknown type {spec['type']!r}; "
                         f"accepted: {', '.join(KINDS)}")
      if spec["type"] == "categorical":
        choices = spec.get("choices")
        params.append(Param(spec["name"], "categorical",
                            choices=tuple(choices) if isinstance(choices, list) else choices))
      else:
        for key in ("low", "high"):
          if key not in spec:
            raise ValueError(f"space entry {i} ({spec['name']!r}): a {spec['type']} parameter "
                             f"needs {key!r}")
        params.append(Param(spec["name"], spec["type"], spec["low"], spec["high"],
                            spec.get("log", False)))
    return cls(params)

  # -- inference ------------------------------------------------------------------
  @classmethod
  def infer(cls, hparam_dicts: Iterable[Mapping[str, Any]], *,
            log_decades: float = 2.0) -> "Space":
    """The space spanned by past configurations.

    Numbers give a range [min, max]; all-integer values stay integer; positive
    values spanning at least ``log_decades`` decades are log-scaled. Strings and
    bools give categories, and so do integers with few distinct, widely spread
    values (such as batch sizes 16, 32, 64, 128: at most 8 values over a span
    more than twice their count). A parameter with a single value becomes a
    one-choice category. Every dict must have the same names.
    """
    rows = [dict(h) for h in hparam_dicts]
    if not rows:
      raise ValueError("cannot infer a space from zero configurations")
    names = list(rows[0])
    for i, h in enumerate(rows):
      if set(h) != set(names):
        diff = sorted(set(h) ^ set(names))
        raise ValueError(f"configuration {i} has different hyperparameter names than the first "
                         f"(differing: {', '.join(diff)})")
    params = []
    for name in names:
      values = [_python_scalar(h[name]) for h in rows]
      numeric = all(_is_number(v) for v in values)
      if numeric and not all(math.isfinite(v) for v in values):
        raise ValueError(f"hyperparameter {name!r} has non-finite values")
      distinct = {}   # by a hashable key that keeps True apart from 1 and "1" apart from 1
      for v in values:
        kind = "bool" if isinstance(v, (bool, np.bool_)) else "str" if isinstance(v, str) else "num"
        distinct.setdefault((kind, v), v)
      distinct = list(distinct.values())
      if not numeric:
        for v in distinct:
          if not isinstance(v, (str, bool, numbers.Real)):
            raise ValueError(f"hyperparameter {name!r}: value {v!r} is not a number, string or bool")
        key = lambda v: (type(v).__name__, v) if not isinstance(v, bool) else ("bool", v)
        params.append(Param(name, "categorical", choices=tuple(sorted(distinct, key=key))))
        continue
      if len(distinct) == 1:
        params.append(Param(name, "categorical", choices=(distinct[0],)))
        continue
      lo, hi = min(values), max(values)
      integral = all(isinstance(v, numbers.Integral) for v in values)
      if integral and len(distinct) <= 8 and hi - lo + 1 > 2 * len(distinct):
        params.append(Param(name, "categorical", choices=tuple(sorted(int(v) for v in distinct))))
        continue
      log = lo > 0 and math.log10(hi / lo) >= log_decades
      params.append(Param(name, "int" if integral else "float",
                          int(lo) if integral else float(lo), int(hi) if integral else float(hi),
                          log))
    return cls(params)


DEFAULT_SPACE = Space([
    Param("learning_rate", "float", 1e-5, 1e-1, log=True),
    Param("batch_size", "categorical", choices=(16, 32, 64, 128)),
    Param("layers", "int", 2, 5),
    Param("dropout", "float", 0.1, 0.5),
])
"""The issue's space: LR log-uniform in [1e-5, 1e-1], batch size in {16, 32, 64, 128},
2 to 5 layers, dropout in [0.1, 0.5]."""
