"""A record of past training runs: an SQLite file, or a PostgreSQL database that many
hosts share, with a versioned schema.

One row per run: the task id and its meta-features, the model, the
hyperparameters, final metrics, per-epoch curves, wall time, a status and the
software versions that produced it. Several processes may write into one store
at once (SQLite: WAL journal + busy timeout, writers wait for each other instead
of failing; PostgreSQL: the server's transactions). Dict-valued columns are JSON
text; a row that does not decode (e.g. written half-way or by another program)
is skipped with a warning, never losing the rest. Every value is checked before
it is written (finite numbers that fit a float64, bounded strings and nesting),
so whatever is stored can be read back and learned from. Opening an SQLite file
runs ``PRAGMA quick_check``: a damaged file is opened read-only, or refused, and
never written. What differs between the two databases lives in
:mod:`metaopt.hparams.db`; everything here holds for both.

Runs logged elsewhere come in through JSON Lines or CSV; see ``docs/run_store.md``.
"""

from __future__ import annotations

import csv
import datetime
import functools
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import re
import reprlib
import warnings
from typing import Any, Iterable, Iterator, NamedTuple, Optional, Union

import numpy as np

from metaopt.hparams import db as db_lib
from metaopt.hparams.db import StoreAccessError  # noqa: F401 (raised by the backends)
from metaopt.validation import check_choice, check_int, is_integer
from metaopt.validation import is_number as _is_number

SCHEMA_VERSION = 1
FORMAT = "metaopt-runstore"
STATUSES: tuple[str, ...] = ("completed", "diverged", "failed")
MODES: tuple[str, ...] = ("max", "min")  # which values of a metric are better
BUSY_TIMEOUT_MS = db_lib.BUSY_TIMEOUT_MS
CONFLICTS: tuple[str, ...] = ("error", "skip")  # add_many(on_conflict=...)

# Bounds on what a row may hold, so that every stored value can be read back and used.
MAX_TEXT = 10_000        # characters of a task, run_key, name, hparam or version string
MAX_JSON = 1_000_000     # characters of the model or extra column as JSON
MAX_DEPTH = 32           # nesting levels of model and extra
INT64 = (-2 ** 63, 2 ** 63 - 1)  # integer hparams and integers in model / extra
_JSON_INT_DIGITS = 400   # a JSON integer with more digits cannot fit in a float64
_CSV_RECORD_LINES = 1000  # a CSV record spanning more lines is malformed (an unclosed quote)

_JSON_COLUMNS = ("task_features", "model", "hparams", "metrics", "curves", "versions", "extra")
_COLUMNS = ("id", "run_key", "task", "task_features", "model", "hparams", "metrics", "curves",
            "status", "wall_time", "versions", "created", "extra")
# Keys a JSON Lines row may carry; "id" is the exporting store's own and is ignored on import.
ROW_KEYS: tuple[str, ...] = ("task", "task_features", "hparams", "metrics", "model", "curves",
                             "status", "wall_time", "run_key", "versions", "created", "extra",
                             "id")
_REQUIRED = ("task", "task_features", "hparams", "metrics")



class Run(NamedTuple):
  """One stored training run."""
  id: int
  task: str
  task_features: dict       # name -> float
  model: dict               # e.g. {"family": "mlp", "width": 64, "depth": 2, "n_params": 9000}
  hparams: dict             # name -> number, string or bool
  metrics: dict             # name -> float (NaN when non-finite)
  curves: dict              # name -> list of floats, one per evaluation
  status: str               # one of STATUSES
  wall_time: Optional[float]  # seconds
  versions: dict            # package -> version string
  run_key: Optional[str]    # unique id used to resume sweeps
  created: str              # ISO 8601 UTC timestamp
  extra: dict               # anything else


class ImportReport(NamedTuple):
  """How many rows were imported, and (line number, reason) for each rejected row."""
  imported: int
  rejected: list


@functools.lru_cache(maxsize=1)
def software_versions() -> dict[str, str]:
  """Versions of python, jax, jaxlib, flax, optax and metaopt in this process."""
  out = {"python": platform.python_version()}
  for pkg in ("jax", "jaxlib", "flax", "optax", "metaopt"):
    try:
      out[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      out[pkg] = "unknown"
  return out


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


# ----------------------------------------------------------------------------- validation

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel = 3


def _digits(n: int) -> int:
  """About how many decimal digits ``n`` has (without str(): it refuses > 4300 digits)."""
  return int(abs(n).bit_length() * 0.30103) + 1


def _show(v: Any) -> str:
  """A short repr for messages; safe for huge integers, long strings, deep nesting."""
  if is_integer(v) and abs(int(v)).bit_length() > 128:
    return f"an integer of about {_digits(int(v))} digits"
  try:
    return _REPR.repr(v)
  except Exception:  # a foreign object whose repr fails
    return f"a {type(v).__name__}"


def _scalar(x: Any) -> Any:
  """numpy / jax 0-d values -> Python scalars; anything else unchanged."""
  if isinstance(x, np.generic):
    return x.item()
  if hasattr(x, "shape") and getattr(x, "shape", None) == () and hasattr(x, "item"):
    return x.item()
  return x


_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # bytes that surrogateescape could not decode


def _text(where: str, value: str, limit: Optional[int] = MAX_TEXT) -> str:
  """A string that SQLite and the exports can write: bounded, valid Unicode."""
  if limit is not None and len(value) > limit:
    raise ValueError(f"{where} must be at most {limit} characters, got {len(value)}")
  if not value.isascii():
    try:
      value.encode("utf-8")
    except UnicodeEncodeError:
      raise ValueError(f"{where} is not valid Unicode text (it holds a lone surrogate), "
                       f"got {_show(value)}") from None
  return value


def _column_text(where: str, value: str) -> str:
  """A string stored in a column of its own (not inside JSON, which escapes it): also no
  NUL character, which PostgreSQL text cannot hold."""
  _text(where, value)
  if "\x00" in value:
    raise ValueError(f"{where} must not contain a NUL character, got {_show(value)}")
  return value


def _check_name(where: str, name: Any) -> None:
  if not isinstance(name, str) or not name:
    raise ValueError(f"{where}: names must be non-empty strings, got {_show(name)}")
  _text(f"{where}: name", name)


def _check_dict(where: str, value: Any) -> dict:
  if not isinstance(value, dict):
    raise ValueError(f"{where} must be a dict of name -> value, got {type(value).__name__} "
                     f"{_show(value)}")
  for name in value:
    _check_name(where, name)
  return value


def _float(where: str, v: Any, *, finite: bool) -> float:
  """``v`` as a float64; ValueError (never OverflowError) when it is not a number or
  does not fit, or is not finite when ``finite``."""
  if not _is_number(v):
    raise ValueError(f"{where} must be {'a finite' if finite else 'a'} number, got {_show(v)}")
  try:
    x = float(v)
  except OverflowError:  # an int (or Fraction) beyond about 1.8e308
    raise ValueError(f"{where} must fit in a float64 (magnitude below 1.8e308), "
                     f"got {_show(v)}") from None
  if finite and not math.isfinite(x):
    raise ValueError(f"{where} must be a finite number, got {_show(v)}")
  return x


def _int64(where: str, v: Any) -> int:
  if abs(int(v)).bit_length() > 64:  # before check_int, whose message prints the value
    raise ValueError(f"{where} must be an integer in [{INT64[0]}, {INT64[1]}], "
                     f"got {_show(v)}")
  return check_int(where, v, low=INT64[0], high=INT64[1])


def _features(value: Any) -> dict[str, float]:
  return {name: _float(f"task_features[{name!r}]", _scalar(v), finite=True)
          for name, v in _check_dict("task_features", value).items()}


def _metrics(value: Any) -> dict[str, float]:
  out = {}
  for name, v in _check_dict("metrics", value).items():
    v = _scalar(v)
    # None is how JSON spells a non-finite metric.
    out[name] = math.nan if v is None else _float(f"metrics[{name!r}]", v, finite=False)
  return out


def _json_scalar(where: str, v: Any) -> Any:
  v = _scalar(v)
  if isinstance(v, bool) or v is None:
    return v
  if isinstance(v, str):
    return _text(where, v)
  if is_integer(v):
    return _int64(where, v)
  if _is_number(v):
    return _float(where, v, finite=True)
  raise ValueError(f"{where} must be a number, string, bool or null, got "
                   f"{type(v).__name__} {_show(v)}")


def _hparams(value: Any) -> dict:
  return {name: _json_scalar(f"hparams[{name!r}]", v)
          for name, v in _check_dict("hparams", value).items()}


def _curves(value: Any) -> dict[str, list]:
  out = {}
  for name, v in _check_dict("curves", value or {}).items():
    v = np.asarray(v) if not isinstance(v, (list, tuple)) else v
    if isinstance(v, np.ndarray):
      if v.ndim != 1 or not np.issubdtype(v.dtype, np.number):
        raise ValueError(f"curves[{name!r}] must be a 1-d list of numbers, got shape {v.shape}")
      v = v.tolist()
    vals = []
    for x in v:
      x = _scalar(x)
      if x is not None and not _is_number(x):
        raise ValueError(f"curves[{name!r}] must be a list of numbers, got element {_show(x)}")
      vals.append(math.nan if x is None else _float(f"curves[{name!r}]", x, finite=False))
    out[name] = vals
  return out


def _check_json(where: str, value: Any, depth: int = 0) -> None:
  """Bounded nesting, int64 integers and valid strings (recursion stops at MAX_DEPTH)."""
  value = _scalar(value)
  if isinstance(value, str):
    _text(where, value, limit=None)  # the whole column is bounded by MAX_JSON
  elif is_integer(value):
    _int64(where, value)
  elif _is_number(value):
    _float(where, value, finite=False)  # non-finite is stored as null
  elif isinstance(value, (dict, list, tuple)):
    if depth >= MAX_DEPTH:
      raise ValueError(f"{where} is nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, dict):
      for k in value:
        if isinstance(k, str):
          _text(f"{where}: key", k)
      value = value.values()
    for v in value:
      _check_json(where, v, depth + 1)


def _jsonable(where: str, value: Any) -> dict:
  value = {} if value is None else _check_dict(where, value)
  _check_json(where, value)
  try:
    text = _dumps(value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where} must be JSON-serializable: {e}") from None
  if len(text) > MAX_JSON:
    raise ValueError(f"{where} must be at most {MAX_JSON} characters as JSON, got {len(text)}")
  return json.loads(text)


def _finite_or_none(x: Any) -> Any:
  """NaN/inf -> None recursively, so stored JSON is standard JSON."""
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _finite_or_none(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite_or_none(v) for v in x]
  return _scalar(x) if isinstance(x, np.generic) else x


def _dumps(value: Any) -> str:
  return json.dumps(_finite_or_none(value), allow_nan=False,
                    separators=(",", ":"))


def _created(value: Any) -> str:
  """An ISO 8601 time as a normalized UTC string; None is now."""
  if value is None:
    return _now()
  if isinstance(value, datetime.datetime):
    t = value
  else:
    if not isinstance(value, str) or len(value) > 64:
      raise ValueError(f"created must be an ISO 8601 date and time string such as "
                       f"'2024-05-01T12:00:00+00:00', got {_show(value)}")
    try:
      t = datetime.datetime.fromisoformat(value)
    except ValueError:
      raise ValueError(f"created must be an ISO 8601 date and time such as "
                       f"'2024-05-01T12:00:00+00:00', got {_show(value)}") from None
  if t.tzinfo is None:  # naive times are taken as UTC, as add() records them
    t = t.replace(tzinfo=datetime.timezone.utc)
  try:
    t = t.astimezone(datetime.timezone.utc)
  except OverflowError:  # e.g. year 1 with a positive offset
    raise ValueError(f"created is out of range in UTC, got {_show(value)}") from None
  return t.isoformat(timespec="microseconds")


def _version(name: str, v: Any) -> str:
  v = _scalar(v)
  if not isinstance(v, (str, bool)) and not _is_number(v):
    raise ValueError(f"versions[{name!r}] must be a string, got {type(v).__name__} {_show(v)}")
  if is_integer(v) and abs(int(v)).bit_length() > 64:
    raise ValueError(f"versions[{name!r}] must be a string, got {_show(v)}")
  return _text(f"versions[{name!r}]", str(v))


def validate_row(row: dict) -> dict:
  """A run row checked and normalized (the columns ``add`` takes); ValueError names the problem."""
  try:
    return _validate_row(row)
  except OverflowError as e:  # a safety net: the checks above should catch these first
    raise ValueError(f"a number is out of range: {e}") from None
  except RecursionError:
    raise ValueError("a value is nested too deeply (or contains itself)") from None


def _validate_row(row: dict) -> dict:
  if not isinstance(row, dict):
    raise ValueError(f"a run row must be a JSON object, got {type(row).__name__}")
  unknown = sorted(_show(k) for k in row if k not in ROW_KEYS)
  if unknown:
    raise ValueError(f"unknown field(s) {', '.join(unknown)}; accepted: "
                     f"{', '.join(ROW_KEYS)}")
  missing = [k for k in _REQUIRED if k not in row]
  if missing:
    raise ValueError(f"missing required field(s) {', '.join(map(repr, missing))}")
  task = row["task"]
  if not isinstance(task, str) or not task:
    raise ValueError(f"task must be a non-empty string, got {_show(task)}")
  _column_text("task", task)
  status = row.get("status", "completed")
  if status is None:
    status = "completed"
  if not isinstance(status, str) or status not in STATUSES:
    raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {_show(status)}")
  wall_time = _scalar(row.get("wall_time"))
  if wall_time is not None:
    try:
      seconds = _float("wall_time", wall_time, finite=True)
    except ValueError:
      seconds = -1.0
    if seconds < 0:
      raise ValueError(f"wall_time must be a number of seconds >= 0 or null, got "
                       f"{_show(wall_time)}")
    wall_time = seconds
  run_key = row.get("run_key")
  if run_key is not None:
    if not isinstance(run_key, str) or not run_key:
      raise ValueError(f"run_key must be a non-empty string or null, got {_show(run_key)}")
    _column_text("run_key", run_key)
  versions = row.get("versions")
  if versions is None:
    versions = software_versions()
  versions = {k: _version(k, v) for k, v in _check_dict("versions", versions).items()}
  return dict(
      run_key=run_key, task=task, task_features=_features(row["task_features"]),
      model=_jsonable("model", row.get("model")), hparams=_hparams(row["hparams"]),
      metrics=_metrics(row["metrics"]), curves=_curves(row.get("curves")), status=status,
      wall_time=wall_time, versions=versions, created=_created(row.get("created")),
      extra=_jsonable("extra", row.get("extra")))


def _to_sql(row: dict) -> tuple:
  return tuple(_dumps(row[c]) if c in _JSON_COLUMNS else row[c] for c in _COLUMNS[1:])


def _nan(d: dict) -> dict:
  return {k: math.nan if v is None else v for k, v in d.items()}


def _from_sql(values: tuple) -> Run:
  rec = dict(zip(_COLUMNS, values))
  for c in _JSON_COLUMNS:
    rec[c] = json.loads(rec[c])
    if not isinstance(rec[c], dict):
      raise ValueError(f"column {c} is not a JSON object")
  if not isinstance(rec["task"], str) or rec["status"] not in STATUSES:
    raise ValueError(f"bad task {rec['task']!r} or status {rec['status']!r}")
  rec["metrics"] = _nan(rec["metrics"])
  rec["curves"] = {k: [math.nan if x is None else x for x in v] for k, v in rec["curves"].items()}
  return Run(**rec)


# ----------------------------------------------------------------------------- the store

_INSERT = (f"INSERT INTO runs ({', '.join(_COLUMNS[1:])}) "
           f"VALUES ({', '.join('?' * (len(_COLUMNS) - 1))}) ON CONFLICT (run_key) DO NOTHING")


def _guarded(method):
  """A public method of an open store, database errors turned into one-line ValueErrors."""
  @functools.wraps(method)
  def run(self, *args, **kwargs):
    backend = self._conn()  # a closed store says so instead of failing on None
    try:
      return method(self, *args, **kwargs)
    except backend.errors as e:
      raise backend.error(e) from None
  return run


class RunStore:
  """A run store in an SQLite file or a PostgreSQL database.

  ``RunStore(path)`` opens the store at ``path``, a file path or ``sqlite:///PATH``
  (created when the path does not exist yet or is an empty, 0-byte file), or
  ``postgresql://USER:PASSWORD@HOST:PORT/DATABASE`` (the tables are created in an
  existing database; a server that cannot be reached is retried for a few seconds,
  then ConnectionError names its host and port). ``RunStore(path, create=False)``
  opens a store that must exist already (for readers): FileNotFoundError if there
  is no file (or database), ValueError if it is empty.

  Opening raises ValueError if the file or database is not a run store, was written
  by a newer schema version, or is too damaged to read; every refused one is left
  untouched. An SQLite file that ``PRAGMA quick_check`` finds damaged but that still
  opens is opened read-only (``damaged`` holds the finding, a RuntimeWarning says
  so): writing raises ValueError. A folder or file this user may not write raises
  StoreAccessError (a PermissionError and a ValueError). Every method of a closed
  store raises ValueError. Use as a context manager or ``close()``.
  """

  def __init__(self, path: Union[str, os.PathLike], *, create: bool = True):
    self._db = None
    self.damaged: Optional[str] = None  # what quick_check found; the store is then read-only
    if not isinstance(create, bool):
      raise ValueError(f"create must be True or False, got {_show(create)}")
    target = db_lib.parse_target(path)
    self.kind = target.kind     # "sqlite" or "postgresql"
    self.url = target.url       # what opens this store again, e.g. in a worker process
    self.name = target.name     # what messages show (the URL without its password)
    self.path = target.path     # the SQLite file (None for a database server)
    backend = db_lib.connect(target, create=create)
    try:
      # Reading only until the database is known to be a healthy run store.
      if not self._check_foreign(backend) and not create:
        raise ValueError(backend.empty_message)
      self.damaged = backend.check_health()
      if self.damaged is not None:
        backend.read_only()
        self._db = backend
        warnings.warn(f"run store {self.name!r} is damaged ({self.damaged}); opened read-only",
                      RuntimeWarning, stacklevel=2)
        return
      backend.prepare_writes()
      with backend.transaction():
        self._create_or_check(backend)
    except backend.errors as e:
      backend.close()
      raise backend.error(e, opening=True) from None
    except BaseException:
      backend.close()
      raise
    self._db = backend

  # -- opening

  def _check_foreign(self, backend) -> set[str]:
    """Refuse a database of another program before changing anything in it; the
    tables of the database (none for a new store)."""
    tables = backend.tables()
    if not tables:
      return tables
    if "meta" not in tables:
      raise ValueError(f"{self.name!r} is {backend.label} but not a metaopt run store "
                       f"(no meta table; tables: {', '.join(sorted(tables))})")
    self._check_marker(backend, dict(backend.execute("SELECT key, value FROM meta").fetchall()))
    return tables

  def _check_marker(self, backend, meta: dict[str, str]) -> None:
    if meta.get("format") != FORMAT:
      raise ValueError(f"{self.name!r} is {backend.label} but not a metaopt run store "
                       f"(format marker {meta.get('format')!r}, expected {FORMAT!r})")
    try:
      version = int(meta.get("schema_version", ""))
    except ValueError:
      raise ValueError(f"{self.name!r}: unreadable schema_version "
                       f"{meta.get('schema_version')!r}") from None
    if version > SCHEMA_VERSION:
      raise ValueError(f"{self.name!r} has run store schema version {version}, newer than "
                       f"version {SCHEMA_VERSION} that this metaopt reads; upgrade metaopt")

  def _create_or_check(self, backend) -> None:
    backend.lock_schema()
    if not backend.tables():
      for statement in backend.schema:
        backend.execute(statement)
      backend.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                          [("format", FORMAT), ("schema_version", str(SCHEMA_VERSION)),
                           ("created", _now())])
    else:  # another process may have created it between the check and the lock
      self._check_foreign(backend)

  def _marker(self) -> dict[str, str]:
    return dict(self._conn().execute("SELECT key, value FROM meta").fetchall())

  def _transaction(self):
    return self._conn().transaction()

  def _writable(self) -> None:
    if self.damaged is not None:
      raise ValueError(f"run store {self.name!r} is damaged ({self.damaged}) and was "
                       "opened read-only; nothing was written (export_jsonl what is readable "
                       "and import it into a new store)")

  # -- lifecycle

  def close(self) -> None:
    """Close the connection (idempotent)."""
    if self._db is not None:
      self._db.close()
      self._db = None

  def __enter__(self) -> "RunStore":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __repr__(self) -> str:
    return f"RunStore({self.name!r})"

  def _conn(self):
    if self._db is None:
      raise ValueError(f"run store {self.name!r} is closed")
    return self._db

  # -- writing

  @_guarded
  def add(self, task: str, *, task_features: dict, hparams: dict, metrics: dict,
          model: Optional[dict] = None, curves: Optional[dict] = None,
          status: str = "completed", wall_time: Optional[float] = None,
          run_key: Optional[str] = None, extra: Optional[dict] = None,
          versions: Optional[dict] = None, created: Optional[str] = None) -> int:
    """Record one run and return its id. ``versions`` default to this process's,
    ``created`` (an ISO 8601 time, stored in UTC) to now."""
    self._writable()
    row = validate_row(dict(task=task, task_features=task_features, hparams=hparams,
                            metrics=metrics, model=model, curves=curves, status=status,
                            wall_time=wall_time, run_key=run_key, extra=extra,
                            versions=versions, created=created))
    return self._insert([row])[0]

  @_guarded
  def add_many(self, rows: Iterable[dict], *, on_conflict: str = "error") -> list[int]:
    """Record several runs (dicts of ``add``'s arguments) in one transaction; all or none.

    ``on_conflict="skip"`` leaves out rows whose run_key is already stored (e.g. written
    by a worker killed before it could report them) instead of raising; the ids returned
    are those of the rows added.
    """
    check_choice("on_conflict", on_conflict, CONFLICTS)
    self._writable()
    checked = []
    for i, row in enumerate(rows):
      try:
        checked.append(validate_row(row))
      except ValueError as e:
        raise ValueError(f"row {i}: {e}") from None
    return self._insert(checked, skip_stored=on_conflict == "skip")

  def _insert(self, rows: list[dict], skip_stored: bool = False) -> list[int]:
    ids = []
    with self._transaction() as db:
      for row in rows:
        run_id = db.insert(_INSERT, _to_sql(row))
        if run_id is not None:
          ids.append(run_id)
        elif not skip_stored:  # raised inside the transaction: nothing is written
          raise ValueError(f"run_key {row['run_key']!r} is already in the store")
    return ids

  # -- reading

  def _select(self, where: str = "", args: tuple = ()) -> Iterator[Run]:
    cursor = self._conn().execute(f"SELECT {', '.join(_COLUMNS)} FROM runs {where} ORDER BY id",
                                  args)
    for values in cursor:
      try:
        yield _from_sql(values)
      except (ValueError, TypeError, KeyError, RecursionError) as e:
        warnings.warn(f"run store {self.name!r}: skipping corrupt run id {values[0]}: {e}",
                      RuntimeWarning, stacklevel=3)

  @_guarded
  def runs(self, *, task: Optional[str] = None, status: Optional[str] = None) -> list[Run]:
    """All readable runs in insertion order, optionally only one task and/or status."""
    if status is not None and status not in STATUSES:
      raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {_show(status)}")
    clauses, args = [], []
    if task is not None:
      clauses.append("task = ?")
      args.append(task)
    if status is not None:
      clauses.append("status = ?")
      args.append(status)
    where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
    return list(self._select(where, tuple(args)))

  @_guarded
  def has(self, run_key: str) -> bool:
    """Whether a run with this run_key is stored."""
    row = self._conn().execute("SELECT 1 FROM runs WHERE run_key = ?", (run_key,)).fetchone()
    return row is not None

  @_guarded
  def run_keys(self) -> set[str]:
    """Every stored run_key."""
    rows = self._conn().execute("SELECT run_key FROM runs WHERE run_key IS NOT NULL")
    return {r[0] for r in rows}

  @_guarded
  def tasks(self) -> dict[str, dict]:
    """Task id -> its meta-features (those of the task's most recent readable run)."""
    return {run.task: run.task_features for run in self._select()}

  @_guarded
  def __len__(self) -> int:
    return self._conn().execute("SELECT COUNT(*) FROM runs").fetchone()[0]

  @property
  @_guarded
  def schema_version(self) -> int:
    return int(self._marker()["schema_version"])

  # -- import / export

  def _import(self, rows: Iterable[tuple[int, Any]]) -> ImportReport:
    """Insert valid rows in one transaction; (line, reason) for the others."""
    rejected, imported = [], 0
    with self._transaction() as db:
      for line, row in rows:
        if isinstance(row, Exception):
          rejected.append((line, str(row)))
          continue
        try:
          checked = validate_row({k: v for k, v in row.items() if k != "id"}
                                 if isinstance(row, dict) else row)
        except ValueError as e:
          rejected.append((line, str(e)))
          continue
        if db.insert(_INSERT, _to_sql(checked)) is None:
          rejected.append((line, f"run_key {_show(checked['run_key'])} is already in the store"))
        else:
          imported += 1
    return ImportReport(imported, rejected)

  @_guarded
  def import_jsonl(self, path: Union[str, os.PathLike]) -> ImportReport:
    """Import runs from JSON Lines, one run per line; bad lines are rejected, the rest kept."""
    self._writable()
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"no JSON Lines file at {str(path)!r}")

    def rows():
      with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
          if not raw.strip():
            continue
          try:
            yield line_no, _json_line(raw)
          except ValueError as e:
            yield line_no, e
    return self._import(rows())

  @_guarded
  def export_jsonl(self, path: Union[str, os.PathLike]) -> int:
    """Write every readable run as one JSON object per line (non-finite numbers as null)."""
    count = 0
    with open(path, "w", encoding="utf-8") as f:
      for run in self._select():
        f.write(json.dumps(_finite_or_none(run._asdict()), allow_nan=False) + "\n")
        count += 1
    return count

  @_guarded
  def export_csv(self, path: Union[str, os.PathLike]) -> int:
    """Write every readable run as one CSV row with flattened columns (docs/run_store.md)."""
    runs = list(self._select())
    groups = {"feature": "task_features", "hparam": "hparams", "metric": "metrics",
              "model": "model"}
    names = {prefix: sorted({k for r in runs for k in getattr(r, field)})
             for prefix, field in groups.items()}
    header = (["id", "run_key", "task", "status", "wall_time", "created"]
              + [f"{p}.{n}" for p in groups for n in names[p]]
              + ["curves", "versions", "extra"])
    with open(path, "w", encoding="utf-8", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(header)
      for r in runs:
        cells = [r.id, r.run_key or "", r.task, r.status,
                 "" if r.wall_time is None else repr(r.wall_time), r.created]
        for p, field in groups.items():
          d = getattr(r, field)
          cells += [_csv_cell(d[n]) if n in d else "" for n in names[p]]
        cells += [_dumps(r.curves), _dumps(r.versions), _dumps(r.extra)]
        writer.writerow(cells)
    return len(runs)

  @_guarded
  def import_csv(self, path: Union[str, os.PathLike]) -> ImportReport:
    """Import runs from a CSV in the flattened layout ``export_csv`` writes; a malformed
    record is rejected with its line number, the rest kept."""
    self._writable()
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"no CSV file at {str(path)!r}")

    def rows():
      # Undecodable bytes become lone surrogates, so one bad byte rejects one record.
      with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        yield from _csv_rows(_Lines(f))
    return self._import(rows())


# ----------------------------------------------------------------------------- claims

# A claim is free, or stale (not renewed for the timeout), and its run is not stored yet.
_CLAIMABLE = ("(c.worker IS NULL OR c.claimed_at < now() - make_interval(secs => ?)) "
              "AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.run_key = c.run_key)")
_UNFINISHED = "NOT EXISTS (SELECT 1 FROM runs r WHERE r.run_key = c.run_key)"


class Claims:
  """The runs of a sweep that workers on many hosts claim from a PostgreSQL run store,
  so that each run is trained once.

  ``plan`` records the sweep's runs as (run_key, unit, trial), a unit being the runs
  that share one compiled program. ``take`` claims unfinished runs of one unit for
  this worker with ``SELECT ... FOR UPDATE SKIP LOCKED``: two workers never get the
  same run. A live worker renews its claims (``renew``, from a heartbeat); a claim not
  renewed for ``timeout`` seconds is stale and goes to the next worker that asks, which
  is how the runs of a killed worker get trained. Times are the server's ``now()``, so
  the hosts' clocks do not matter. A run is finished once its row is in ``runs``.
  """

  def __init__(self, store: RunStore, worker: str, timeout: float):
    if store.kind != "postgresql":
      raise ValueError(f"claims need a PostgreSQL run store, got {store.name!r}")
    self.store, self.worker, self.timeout = store, worker, float(timeout)

  def _run(self, fn):
    backend = self.store._conn()
    try:
      return fn(backend)
    except backend.errors as e:
      raise backend.error(e) from None

  def plan(self, items: Iterable[tuple[str, str, int]]) -> None:
    """Record (run_key, unit, trial) of runs to train; runs already planned stay as they are."""
    items = list(items)

    def plan(db):
      with db.transaction():
        db.executemany("INSERT INTO claims (run_key, unit, trial) VALUES (?, ?, ?) "
                       "ON CONFLICT (run_key) DO NOTHING", items)
    if items:
      self._run(plan)

  def take(self, units: list[str], limit: int) -> tuple[Optional[str], list[tuple[str, int]]]:
    """Claim up to ``limit`` claimable runs of one of ``units``: (unit, [(run_key,
    trial), ...]), or (None, []) when no run of these units is free or stale."""
    def take(db):
      with db.transaction():
        # Each worker walks the units in an order of its own, so that workers starting
        # together take different units.
        row = db.execute(f"SELECT c.unit FROM claims c WHERE c.unit = ANY(?) AND {_CLAIMABLE} "
                         "ORDER BY md5(c.unit || ?), c.trial LIMIT 1 FOR UPDATE OF c SKIP LOCKED",
                         (units, self.timeout, self.worker)).fetchone()
        if row is None:
          return None, []
        got = db.execute(f"SELECT c.run_key, c.trial FROM claims c WHERE c.unit = ? AND "
                         f"{_CLAIMABLE} ORDER BY c.trial LIMIT ? FOR UPDATE OF c SKIP LOCKED",
                         (row[0], self.timeout, limit)).fetchall()
        db.execute("UPDATE claims SET worker = ?, claimed_at = now() WHERE run_key = ANY(?)",
                   (self.worker, [k for k, _ in got]))
        return row[0], [(k, int(t)) for k, t in got]
    return self._run(take)

  # The statements below lock claim rows in run_key order (SELECT ... ORDER BY run_key
  # FOR UPDATE) before changing them, so that a heartbeat, a worker finishing a unit and
  # another one cleaning up never wait for each other in a cycle (a deadlock).

  def renew(self) -> int:
    """Mark this worker's claims as alive now; how many it holds."""
    return self._run(lambda db: db.execute(
        "UPDATE claims SET claimed_at = now() WHERE run_key IN (SELECT run_key FROM claims "
        "WHERE worker = ? ORDER BY run_key FOR UPDATE)", (self.worker,)).rowcount)

  def finish(self, run_keys: list[str]) -> None:
    """Drop the claims of runs now stored; the others (none, unless training failed) are
    freed for another worker."""
    def finish(db):
      with db.transaction():
        db.execute("SELECT 1 FROM claims WHERE run_key = ANY(?) ORDER BY run_key FOR UPDATE",
                   (run_keys,))
        db.execute(f"DELETE FROM claims c WHERE c.run_key = ANY(?) AND NOT {_UNFINISHED}",
                   (run_keys,))
        db.execute("UPDATE claims SET worker = NULL, claimed_at = NULL "
                   "WHERE run_key = ANY(?) AND worker = ?", (run_keys, self.worker))
    if run_keys:
      self._run(finish)

  def release(self) -> None:
    """Free every claim of this worker at once (it stops early), so that other workers
    need not wait for the timeout."""
    self._run(lambda db: db.execute(
        "UPDATE claims SET worker = NULL, claimed_at = NULL WHERE run_key IN (SELECT run_key "
        "FROM claims WHERE worker = ? ORDER BY run_key FOR UPDATE)", (self.worker,)))

  def forget_finished(self, units: list[str]) -> None:
    """Drop the claims of stored runs of ``units`` (e.g. left by a worker killed after
    storing); rows another transaction holds are left for later."""
    self._run(lambda db: db.execute(
        f"DELETE FROM claims WHERE run_key IN (SELECT c.run_key FROM claims c WHERE "
        f"c.unit = ANY(?) AND NOT {_UNFINISHED} ORDER BY c.run_key FOR UPDATE OF c SKIP LOCKED)",
        (units,)))

  def unfinished(self, units: list[str]) -> int:
    """How many planned runs of ``units`` are not stored yet (claimed or not)."""
    return self._run(lambda db: db.execute(
        f"SELECT COUNT(*) FROM claims c WHERE c.unit = ANY(?) AND {_UNFINISHED}",
        (units,)).fetchone()[0])


def _json_line(raw: bytes) -> Any:
  """One JSON Lines line parsed; ValueError (never RecursionError) for a bad one."""
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"not UTF-8 text: {e.reason} at byte {e.start}") from None
  try:
    return json.loads(text, parse_int=_json_int)
  except json.JSONDecodeError as e:
    raise ValueError(f"invalid JSON: {e.msg} at column {e.colno}") from None
  except RecursionError:
    raise ValueError(f"JSON nested too deeply (at most {MAX_DEPTH} levels are "
                     "accepted)") from None


def _json_int(text: str) -> int:
  """A JSON integer; one too long for a float64 is refused before int() (which refuses
  more than 4300 digits with a message about sys.set_int_max_str_digits)."""
  digits = len(text.lstrip("-"))
  if digits > _JSON_INT_DIGITS:
    raise ValueError(f"an integer of {digits} digits does not fit in a float64")
  return int(text)


class _RecordTooLong(Exception):
  pass


class _Lines:
  """Physical lines of a text file for csv.reader: their numbers, the lines the current
  record took, and lines to read again after a malformed record."""

  def __init__(self, f):
    self._f = f
    self._count = 0
    self._again: list[tuple[int, str]] = []  # a stack: the next line is last
    self.taken: list[tuple[int, str]] = []

  def __iter__(self):
    return self

  def __next__(self) -> str:
    if len(self.taken) >= _CSV_RECORD_LINES:
      raise _RecordTooLong(f"a record spans more than {_CSV_RECORD_LINES} lines "
                           "(an unclosed quote?)")
    if self._again:
      item = self._again.pop()
    else:
      text = next(self._f)
      self._count += 1
      item = (self._count, text)
    self.taken.append(item)
    return item[1]

  def again(self, items: list[tuple[int, str]]) -> None:
    self._again.extend(reversed(items))


def _csv_rows(lines: _Lines) -> Iterator[tuple[int, Any]]:
  """(first line, row dict or ValueError) per CSV record after the header.

  A bad record that spans several lines rejects only its first line: the lines after
  it are read again as records of their own, so an unclosed quote never swallows the
  good lines that follow it.
  """
  reader = csv.reader(lines, strict=True)
  try:
    header = next(reader, None)
  except (csv.Error, _RecordTooLong) as e:
    raise ValueError(f"the CSV header is malformed: {e}") from None
  if header is None:
    return
  if any(_NOT_UTF8.search(n) for n in header):
    raise ValueError("the CSV header is not UTF-8 text")
  _check_csv_header(header)
  while True:
    lines.taken = []
    row, reason = None, None
    try:
      cells = next(reader, None)
    except (csv.Error, _RecordTooLong) as e:
      cells = []
      reason = f"malformed CSV: {e}".replace("unexpected end of data",
                                             "a quoted field is not closed")
    taken = lines.taken
    if cells is None:
      return
    if not cells and reason is None:
      continue  # a blank line
    bad = reason is None and next((m for m in map(_NOT_UTF8.search, cells) if m), None)
    if bad:
      reason = f"not UTF-8 text: invalid byte 0x{ord(bad.group()) - 0xDC00:02x}"
    if reason is None:
      try:
        row = _row_from_csv(header, cells)
        if len(taken) > 1:
          validate_row(row)
      except ValueError as e:
        reason = str(e)
    if reason is not None:
      yield taken[0][0], ValueError(reason)
      lines.again(taken[1:])
      continue
    yield taken[0][0], row


def _csv_cell(v: Any) -> str:
  return v if isinstance(v, str) else json.dumps(v)


def _parse_cell(text: str) -> Any:
  """A cell as JSON (numbers, true/false, null, NaN) if it parses, else the string."""
  try:
    return json.loads(text, parse_int=_json_int)
  except json.JSONDecodeError:
    return text
  except RecursionError:
    raise ValueError(f"cell {_show(text)} is JSON nested too deeply") from None


_CSV_PREFIXES = {"feature": "task_features", "hparam": "hparams", "metric": "metrics",
                 "model": "model"}
_CSV_JSON = ("curves", "versions", "extra")


def _check_csv_header(header: list[str]) -> None:
  known = ("task", "status", "wall_time", "run_key", "created", "id") + _CSV_JSON
  bad = [n for n in header
         if n not in known and not (n.partition(".")[0] in _CSV_PREFIXES and "." in n)]
  if bad:
    raise ValueError(f"unknown CSV column(s) {', '.join(map(_show, bad))}; accepted: "
                     "task, status, wall_time, run_key, created, id, feature.<name>, "
                     "hparam.<name>, metric.<name>, model.<name>, curves, versions, extra")
  if "task" not in header:
    raise ValueError("the CSV header has no 'task' column")


def _row_from_csv(header: list[str], cells: list[str]) -> dict:
  if len(cells) != len(header):
    raise ValueError(f"{len(cells)} cells but the header has {len(header)} columns")
  row: dict[str, Any] = {"task_features": {}, "hparams": {}, "metrics": {}}
  for name, text in zip(header, cells):
    if text == "":
      continue  # a column another run has
    prefix, dot, rest = name.partition(".")
    if dot and prefix in _CSV_PREFIXES:
      value = _parse_cell(text)
      if prefix in ("feature", "metric") and not _is_number(value):
        raise ValueError(f"column {name!r}: {_show(text)} is not a number")
      row.setdefault(_CSV_PREFIXES[prefix], {})[rest] = value
    elif name in _CSV_JSON:
      row[name] = _json_cell(name, text)
    elif name == "wall_time":
      try:
        row[name] = float(text)
      except ValueError:
        raise ValueError(f"column 'wall_time': {_show(text)} is not a number") from None
    else:  # task, status, run_key, created, id (checked by _check_csv_header)
      row[name] = text
  if "task" not in row:
    raise ValueError("missing 'task'")
  return row


def _json_cell(name: str, text: str) -> Any:
  try:
    return json.loads(text, parse_int=_json_int)
  except json.JSONDecodeError as e:
    raise ValueError(f"column {name!r}: invalid JSON ({e.msg})") from None
  except RecursionError:
    raise ValueError(f"column {name!r}: JSON nested too deeply") from None
