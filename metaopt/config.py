"""Configurations as frozen dataclasses: JSON/TOML files and ``path.to.field=value`` overrides.

An experiment's ``Config`` is a frozen dataclass whose fields are typed (nested
dataclasses and NamedTuples included). :func:`to_dict` gives its JSON form;
:func:`merge` applies a (possibly partial) mapping from a file onto a config and
:func:`override` one ``--set`` assignment, both checking every value against the
field's type and naming the field and the accepted type when it does not fit.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import tomllib
import types
import typing
from typing import Any, Mapping, Union

_NONE_WORDS = ("none", "null")


def _is_namedtuple(tp: Any) -> bool:
  return isinstance(tp, type) and issubclass(tp, tuple) and hasattr(tp, "_fields")


def _is_record(tp: Any) -> bool:
  return dataclasses.is_dataclass(tp) or _is_namedtuple(tp)


def _fields(tp: Any) -> dict[str, Any]:
  """Field name -> type of a dataclass or NamedTuple class."""
  hints = typing.get_type_hints(tp)
  names = [f.name for f in dataclasses.fields(tp)] if dataclasses.is_dataclass(tp) else tp._fields
  return {n: hints.get(n, Any) for n in names}


def to_dict(config: Any) -> Any:
  """The JSON form of a config: records become dicts, tuples lists."""
  if _is_record(type(config)):
    return {name: to_dict(getattr(config, name)) for name in _fields(type(config))}
  if isinstance(config, (list, tuple)):
    return [to_dict(v) for v in config]
  if isinstance(config, Mapping):
    return {str(k): to_dict(v) for k, v in config.items()}
  return config


def _type_name(tp: Any) -> str:
  origin = typing.get_origin(tp)
  if origin in (Union, types.UnionType):
    return " or ".join(_type_name(a) for a in typing.get_args(tp))
  if origin is tuple:
    args = typing.get_args(tp)
    inner = (f"{_type_name(args[0])}s" if len(args) == 2 and args[1] is Ellipsis
             else ", ".join(map(_type_name, args)))
    return f"a list of {inner}"
  if tp is type(None):
    return "none"
  if _is_record(tp):
    return f"a table of {tp.__name__} fields"
  return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
          dict: "a table"}.get(tp, getattr(tp, "__name__", str(tp)))


def _fail(path: str, tp: Any, value: Any) -> ValueError:
  return ValueError(f"config field {path!r}: expected {_type_name(tp)}, got {value!r}")


def coerce(value: Any, tp: Any, path: str, current: Any = None) -> Any:
  """``value`` (JSON/TOML data) as type ``tp``; ``current`` fills missing record fields."""
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if tp is Any:
    return value
  if origin in (Union, types.UnionType):
    options = [a for a in args if a is not type(None)]
    nullable = len(options) < len(args)
    if nullable and (value is None or (isinstance(value, str) and str not in options
                                       and value.lower() in _NONE_WORDS)):
      return None
    for arg in options:
      try:
        return coerce(value, arg, path, current)
      except ValueError:
        continue
    raise _fail(path, tp, value)
  if tp is bool:
    if isinstance(value, bool):
      return value
    raise _fail(path, tp, value)
  if tp is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    raise _fail(path, tp, value)
  if tp is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    raise _fail(path, tp, value)
  if tp is str:
    if isinstance(value, str):
      return value
    raise _fail(path, tp, value)
  if tp in (dict, Mapping) or origin in (dict, Mapping):
    if isinstance(value, Mapping):
      return dict(value)
    raise _fail(path, tp, value)
  if tp is tuple or origin is tuple:
    if not isinstance(value, (list, tuple)):
      raise _fail(path, tp, value)
    if not args:
      return tuple(_frozen(v) for v in value)
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
      raise _fail(path, tp, value)
    return tuple(coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
  if _is_record(tp):
    if isinstance(value, tp):
      return value
    if not isinstance(value, Mapping):
      raise _fail(path, tp, value)
    return merge(current if isinstance(current, tp) else None, value, cls=tp, where=path)
  raise ValueError(f"config field {path!r} has a type this loader cannot read: {tp!r}")


def _frozen(value: Any) -> Any:
  """Lists become tuples (all the way down), so configs stay hashable."""
  if isinstance(value, list):
    return tuple(_frozen(v) for v in value)
  if isinstance(value, dict):
    return {k: _frozen(v) for k, v in value.items()}
  return value


def merge(config: Any, data: Mapping, *, cls: Any = None, where: str = "") -> Any:
  """``config`` with the fields in ``data`` replaced (recursively for records), or a new
  ``cls`` built from ``data`` when ``config`` is None. Unknown fields are refused."""
  cls = type(config) if config is not None else cls
  if not isinstance(data, Mapping):
    raise _fail(where or cls.__name__, cls, data)
  fields = _fields(cls)
  unknown = [k for k in data if k not in fields]
  if unknown:
    at = f" in {where!r}" if where else ""
    raise ValueError(f"unknown config field {unknown[0]!r}{at}; accepted: {', '.join(fields)}")
  values = {}
  for name, tp in fields.items():
    path = f"{where}.{name}" if where else name
    current = getattr(config, name) if config is not None else None
    if name in data:
      values[name] = coerce(data[name], tp, path, current)
    elif config is not None:
      values[name] = current
  try:
    if config is None:
      return cls(**values)
    return (dataclasses.replace(config, **values) if dataclasses.is_dataclass(config)
            else config._replace(**values))
  except TypeError as e:  # a required field of a new record is missing
    raise ValueError(f"config {where or cls.__name__!r}: {e}") from None


def parse_value(text: str) -> Any:
  """A ``--set`` value: TOML (``3``, ``1e-3``, ``true``, ``"a b"``, ``[1, 2]``,
  ``{x = 1}``), else JSON (``null``), else the text itself (a bare string)."""
  try:
    return tomllib.loads(f"value = {text}")["value"]
  except tomllib.TOMLDecodeError:
    pass
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def assignment(text: str) -> dict:
  """One ``path.to.field=value`` assignment as a nested mapping ``{path: {to: {field: v}}}``."""
  path, eq, value = text.partition("=")
  path = path.strip()
  if not eq or not path:
    raise ValueError(f"--set {text!r}: expected path.to.field=value")
  nested: Any = parse_value(value.strip())
  for name in reversed(path.split(".")):
    nested = {name: nested}
  return nested


def _deep_update(into: dict, data: Mapping) -> dict:
  for key, value in data.items():
    if isinstance(value, Mapping) and isinstance(into.get(key), Mapping):
      into[key] = _deep_update(dict(into[key]), value)
    else:
      into[key] = value
  return into


def merge_all(config: Any, layers: list, assignments: list) -> Any:
  """``config`` with every mapping of ``layers`` and then every ``--set`` assignment applied,
  in order, checked once at the end: a field that only the whole set of changes makes valid
  (a file's ``data_dir`` replaced by ``--set``) is not refused half-way. A failure is
  reported as the first layer or assignment that fails on its own."""
  combined: dict = {}
  for layer in [*layers, *map(assignment, assignments)]:
    _deep_update(combined, layer)
  try:
    return merge(config, combined)
  except ValueError:
    for layer in layers:
      config = merge(config, layer)
    for text in assignments:
      config = override(config, text)
    return config


def override(config: Any, text: str) -> Any:
  """``config`` with one ``path.to.field=value`` assignment applied."""
  (head, nested), = assignment(text).items()
  path, _, raw = text.partition("=")
  value = parse_value(raw.strip())
  try:
    return merge(config, {head: nested})
  except ValueError as e:
    if isinstance(value, str) and "," in value:  # a bare list: a,b,c
      try:
        return override(config, f"{path.strip()}={json.dumps(value.split(','))}")
      except ValueError:
        pass
    raise ValueError(f"--set {text!r}: {e}") from None


def load_file(path: Union[str, pathlib.Path]) -> dict:
  """A configuration mapping from a TOML (``.toml``) or JSON file."""
  path = pathlib.Path(path)
  if path.is_dir():
    raise ValueError(f"config file {str(path)!r} is a folder; pass a TOML or JSON file")
  if not path.is_file():
    raise FileNotFoundError(f"no config file at {str(path)!r}")
  try:
    text = path.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"cannot read config file {str(path)!r}: {e}") from None
  try:
    data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
  except tomllib.TOMLDecodeError as e:
    raise ValueError(f"config file {str(path)!r} is not valid TOML: {e}") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"config file {str(path)!r} is not valid JSON: {e.msg} at line "
                     f"{e.lineno}") from None
  if not isinstance(data, dict):
    raise ValueError(f"config file {str(path)!r} must hold a table of fields, "
                     f"got {type(data).__name__}")
  return data


def _format(value: Any, indent: int) -> str:
  """JSON with one field per line; lists of plain values stay on one line."""
  pad, inner = "  " * indent, "  " * (indent + 1)
  if isinstance(value, dict) and value:
    items = [f"{inner}{json.dumps(k)}: {_format(v, indent + 1)}" for k, v in value.items()]
    return "{\n" + ",\n".join(items) + f"\n{pad}}}"
  if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
    return "[\n" + ",\n".join(inner + _format(v, indent + 1) for v in value) + f"\n{pad}]"
  return json.dumps(value)


def dumps(config: Any) -> str:
  """The JSON text of a config (what ``config.json`` holds and ``--print-config`` prints)."""
  return _format(to_dict(config), 0) + "\n"
