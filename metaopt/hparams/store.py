"""A record of past training runs: an SQLite file with a versioned schema.

One row per run: the task id and its meta-features, the model, the
hyperparameters, final metrics, per-epoch curves, wall time, a status and the
software versions that produced it. Several processes may write into one file
at once (WAL journal + busy timeout: writers wait for each other instead of
failing). Dict-valued columns are JSON text; a row that does not decode (e.g.
written half-way or by another program) is skipped with a warning, never losing
the rest.

Runs logged elsewhere come in through JSON Lines or CSV; see ``docs/run_store.md``.
"""

from __future__ import annotations

import csv
import datetime
import functools
import importlib.metadata
import json
import math
import numbers
import os
import pathlib
import platform
import sqlite3
import time
import warnings
from typing import Any, Iterable, Iterator, NamedTuple, Optional, Union

import numpy as np

from metaopt.validation import is_number as _is_number

SCHEMA_VERSION = 1
FORMAT = "metaopt-runstore"
STATUSES: tuple[str, ...] = ("completed", "diverged", "failed")
MODES: tuple[str, ...] = ("max", "min")  # which values of a metric are better
BUSY_TIMEOUT_MS = 60_000

_SQLITE_HEADER = b"SQLite format 3\x00"
_JSON_COLUMNS = ("task_features", "model", "hparams", "metrics", "curves", "versions", "extra")
_COLUMNS = ("id", "run_key", "task", "task_features", "model", "hparams", "metrics", "curves",
            "status", "wall_time", "versions", "created", "extra")
# Keys a JSON Lines row may carry; "id" is the exporting store's own and is ignored on import.
ROW_KEYS: tuple[str, ...] = ("task", "task_features", "hparams", "metrics", "model", "curves",
                             "status", "wall_time", "run_key", "versions", "created", "extra",
                             "id")
_REQUIRED = ("task", "task_features", "hparams", "metrics")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  run_key TEXT UNIQUE,
  task TEXT NOT NULL,
  task_features TEXT NOT NULL,
  model TEXT NOT NULL,
  hparams TEXT NOT NULL,
  metrics TEXT NOT NULL,
  curves TEXT NOT NULL,
  status TEXT NOT NULL,
  wall_time REAL,
  versions TEXT NOT NULL,
  created TEXT NOT NULL,
  extra TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_task ON runs (task);
"""


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

def _scalar(x: Any) -> Any:
  """numpy / jax 0-d values -> Python scalars; anything else unchanged."""
  if isinstance(x, np.generic):
    return x.item()
  if hasattr(x, "shape") and getattr(x, "shape", None) == () and hasattr(x, "item"):
    return x.item()
  return x


def _check_name(where: str, name: Any) -> None:
  if not isinstance(name, str) or not name:
    raise ValueError(f"{where}: names must be non-empty strings, got {name!r}")


def _check_dict(where: str, value: Any) -> dict:
  if not isinstance(value, dict):
    raise ValueError(f"{where} must be a dict of name -> value, got {type(value).__name__} "
                     f"{value!r:.80}")
  for name in value:
    _check_name(where, name)
  return value


def _features(value: Any) -> dict[str, float]:
  out = {}
  for name, v in _check_dict("task_features", value).items():
    v = _scalar(v)
    if not _is_number(v) or not math.isfinite(v):
      raise ValueError(f"task_features[{name!r}] must be a finite number, got {v!r}")
    out[name] = float(v)
  return out


def _metrics(value: Any) -> dict[str, float]:
  out = {}
  for name, v in _check_dict("metrics", value).items():
    v = _scalar(v)
    if v is None:  # how JSON spells a non-finite metric
      v = math.nan
    if not _is_number(v):
      raise ValueError(f"metrics[{name!r}] must be a number, got {v!r}")
    out[name] = float(v)
  return out


def _json_scalar(where: str, v: Any) -> Any:
  v = _scalar(v)
  if isinstance(v, bool) or v is None or isinstance(v, str):
    return v
  if isinstance(v, numbers.Integral):
    return int(v)
  if _is_number(v):
    if not math.isfinite(v):
      raise ValueError(f"{where} must be finite, got {v!r}")
    return float(v)
  raise ValueError(f"{where} must be a number, string, bool or null, got "
                   f"{type(v).__name__} {v!r:.80}")


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
      if x is None:
        x = math.nan
      if not _is_number(x):
        raise ValueError(f"curves[{name!r}] must be a list of numbers, got element {x!r}")
      vals.append(float(x))
    out[name] = vals
  return out


def _jsonable(where: str, value: Any) -> dict:
  value = {} if value is None else _check_dict(where, value)
  try:
    return json.loads(_dumps(value))
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where} must be JSON-serializable: {e}") from None


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


def validate_row(row: dict) -> dict:
  """A run row checked and normalized (the columns ``add`` takes); ValueError names the problem."""
  if not isinstance(row, dict):
    raise ValueError(f"a run row must be a JSON object, got {type(row).__name__}")
  unknown = sorted(set(row) - set(ROW_KEYS))
  if unknown:
    raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))}; accepted: "
                     f"{', '.join(ROW_KEYS)}")
  missing = [k for k in _REQUIRED if k not in row]
  if missing:
    raise ValueError(f"missing required field(s) {', '.join(map(repr, missing))}")
  task = row["task"]
  if not isinstance(task, str) or not task:
    raise ValueError(f"task must be a non-empty string, got {task!r}")
  status = row.get("status", "completed")
  if status is None:
    status = "completed"
  if status not in STATUSES:
    raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
  wall_time = _scalar(row.get("wall_time"))
  if wall_time is not None:
    if not _is_number(wall_time) or not math.isfinite(wall_time) or wall_time < 0:
      raise ValueError(f"wall_time must be a number of seconds >= 0 or null, got {wall_time!r}")
    wall_time = float(wall_time)
  run_key = row.get("run_key")
  if run_key is not None and (not isinstance(run_key, str) or not run_key):
    raise ValueError(f"run_key must be a non-empty string or null, got {run_key!r}")
  versions = row.get("versions")
  if versions is None:
    versions = software_versions()
  versions = {k: str(v) for k, v in _check_dict("versions", versions).items()}
  created = row.get("created") or _now()
  if not isinstance(created, str):
    raise ValueError(f"created must be an ISO 8601 string, got {created!r}")
  return dict(
      run_key=run_key, task=task, task_features=_features(row["task_features"]),
      model=_jsonable("model", row.get("model")), hparams=_hparams(row["hparams"]),
      metrics=_metrics(row["metrics"]), curves=_curves(row.get("curves")), status=status,
      wall_time=wall_time, versions=versions, created=created,
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

class RunStore:
  """A run store in an SQLite file; a path that does not exist yet creates one.

  ``RunStore(path)`` raises ValueError if the file is not a run store or was
  written by a newer schema version. Use as a context manager or ``close()``.
  """

  def __init__(self, path: Union[str, os.PathLike]):
    self.path = pathlib.Path(path)
    if self.path.is_dir():
      raise ValueError(f"run store path {str(self.path)!r} is a directory; pass a file path")
    if not self.path.parent.exists():
      raise FileNotFoundError(f"folder {str(self.path.parent)!r} of run store does not exist")
    existed = self.path.exists() and self.path.stat().st_size > 0
    if existed:
      with open(self.path, "rb") as f:
        if f.read(len(_SQLITE_HEADER)) != _SQLITE_HEADER:
          raise ValueError(f"{str(self.path)!r} is not a metaopt run store (not an SQLite file)")
    # Autocommit mode: transactions are explicit BEGIN IMMEDIATE ... COMMIT.
    self._db = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_MS / 1000,
                               isolation_level=None, check_same_thread=False)
    try:
      self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
      self._check_foreign()
      self._retry(lambda: self._db.execute("PRAGMA journal_mode = WAL"))
      self._db.execute("PRAGMA synchronous = NORMAL")
      with self._transaction():
        self._create_or_check()
    except sqlite3.DatabaseError as e:
      self._db.close()
      raise ValueError(f"{str(self.path)!r} is not a metaopt run store ({e})") from None
    except BaseException:
      self._db.close()
      raise

  # -- opening

  def _tables(self) -> set[str]:
    rows = self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {r[0] for r in rows}

  def _marker(self) -> dict[str, str]:
    return dict(self._db.execute("SELECT key, value FROM meta").fetchall())

  def _check_foreign(self) -> None:
    """Refuse an SQLite file of another program before changing anything in it."""
    tables = self._tables()
    if not tables:
      return
    if "meta" not in tables:
      raise ValueError(f"{str(self.path)!r} is an SQLite database but not a metaopt run store "
                       f"(no meta table; tables: {', '.join(sorted(tables))})")
    self._check_marker(self._marker())

  def _check_marker(self, meta: dict[str, str]) -> None:
    if meta.get("format") != FORMAT:
      raise ValueError(f"{str(self.path)!r} is an SQLite database but not a metaopt run store "
                       f"(format marker {meta.get('format')!r}, expected {FORMAT!r})")
    try:
      version = int(meta.get("schema_version", ""))
    except ValueError:
      raise ValueError(f"{str(self.path)!r}: unreadable schema_version "
                       f"{meta.get('schema_version')!r}") from None
    if version > SCHEMA_VERSION:
      raise ValueError(f"{str(self.path)!r} has run store schema version {version}, newer than "
                       f"version {SCHEMA_VERSION} that this metaopt reads; upgrade metaopt")

  def _create_or_check(self) -> None:
    tables = self._tables()
    if not tables:
      for statement in _SCHEMA.split(";"):
        if statement.strip():
          self._db.execute(statement)
      self._db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                           [("format", FORMAT), ("schema_version", str(SCHEMA_VERSION)),
                            ("created", _now())])
    else:  # another process may have created it between the check and the lock
      self._check_foreign()

  def _retry(self, fn, attempts: int = 200):
    for i in range(attempts):
      try:
        return fn()
      except sqlite3.OperationalError as e:
        if "locked" not in str(e) and "busy" not in str(e) or i == attempts - 1:
          raise
        time.sleep(0.05)

  class _Tx:
    def __init__(self, store):
      self.store = store

    def __enter__(self):
      self.store._retry(lambda: self.store._db.execute("BEGIN IMMEDIATE"))
      return self.store._db

    def __exit__(self, exc_type, exc, tb):
      if exc_type is None:
        self.store._retry(lambda: self.store._db.execute("COMMIT"))
      else:
        self.store._db.execute("ROLLBACK")
      return False

  def _transaction(self) -> "RunStore._Tx":
    return RunStore._Tx(self)

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
    return f"RunStore({str(self.path)!r})"

  def _conn(self) -> sqlite3.Connection:
    if self._db is None:
      raise ValueError(f"run store {str(self.path)!r} is closed")
    return self._db

  # -- writing

  def add(self, task: str, *, task_features: dict, hparams: dict, metrics: dict,
          model: Optional[dict] = None, curves: Optional[dict] = None,
          status: str = "completed", wall_time: Optional[float] = None,
          run_key: Optional[str] = None, extra: Optional[dict] = None,
          versions: Optional[dict] = None, created: Optional[str] = None) -> int:
    """Record one run and return its id. ``versions`` default to this process's."""
    row = validate_row(dict(task=task, task_features=task_features, hparams=hparams,
                            metrics=metrics, model=model, curves=curves, status=status,
                            wall_time=wall_time, run_key=run_key, extra=extra,
                            versions=versions, created=created))
    return self._insert([row])[0]

  def add_many(self, rows: Iterable[dict]) -> list[int]:
    """Record several runs (dicts of ``add``'s arguments) in one transaction; all or none."""
    checked = []
    for i, row in enumerate(rows):
      try:
        checked.append(validate_row(row))
      except ValueError as e:
        raise ValueError(f"row {i}: {e}") from None
    return self._insert(checked)

  def _insert(self, rows: list[dict]) -> list[int]:
    sql = (f"INSERT INTO runs ({', '.join(_COLUMNS[1:])}) "
           f"VALUES ({', '.join('?' * (len(_COLUMNS) - 1))})")
    ids = []
    with self._transaction() as db:
      for row in rows:
        try:
          ids.append(db.execute(sql, _to_sql(row)).lastrowid)
        except sqlite3.IntegrityError:
          raise ValueError(f"run_key {row['run_key']!r} is already in the store") from None
    return ids

  # -- reading

  def _select(self, where: str = "", args: tuple = ()) -> Iterator[Run]:
    cursor = self._conn().execute(f"SELECT {', '.join(_COLUMNS)} FROM runs {where} ORDER BY id",
                                  args)
    for values in cursor:
      try:
        yield _from_sql(values)
      except (ValueError, TypeError, KeyError) as e:
        warnings.warn(f"run store {str(self.path)!r}: skipping corrupt run id {values[0]}: {e}",
                      RuntimeWarning, stacklevel=3)

  def runs(self, *, task: Optional[str] = None, status: Optional[str] = None) -> list[Run]:
    """All readable runs in insertion order, optionally only one task and/or status."""
    if status is not None and status not in STATUSES:
      raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    clauses, args = [], []
    if task is not None:
      clauses.append("task = ?")
      args.append(task)
    if status is not None:
      clauses.append("status = ?")
      args.append(status)
    where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
    return list(self._select(where, tuple(args)))

  def has(self, run_key: str) -> bool:
    """Whether a run with this run_key is stored."""
    row = self._conn().execute("SELECT 1 FROM runs WHERE run_key = ?", (run_key,)).fetchone()
    return row is not None

  def run_keys(self) -> set[str]:
    """Every stored run_key."""
    rows = self._conn().execute("SELECT run_key FROM runs WHERE run_key IS NOT NULL")
    return {r[0] for r in rows}

  def tasks(self) -> dict[str, dict]:
    """Task id -> its meta-features (those of the task's most recent readable run)."""
    return {run.task: run.task_features for run in self._select()}

  def __len__(self) -> int:
    return self._conn().execute("SELECT COUNT(*) FROM runs").fetchone()[0]

  @property
  def schema_version(self) -> int:
    return int(self._marker()["schema_version"])

  # -- import / export

  def _import(self, rows: Iterable[tuple[int, Any]]) -> ImportReport:
    """Insert valid rows in one transaction; (line, reason) for the others."""
    rejected, imported = [], 0
    sql = (f"INSERT INTO runs ({', '.join(_COLUMNS[1:])}) "
           f"VALUES ({', '.join('?' * (len(_COLUMNS) - 1))})")
    with self._transaction() as db:
      for line, row in rows:
        if isinstance(row, Exception):
          rejected.append((line, str(row)))
          continue
        try:
          checked = validate_row({k: v for k, v in row.items() if k != "id"}
                                 if isinstance(row, dict) else row)
          db.execute(sql, _to_sql(checked))
          imported += 1
        except ValueError as e:
          rejected.append((line, str(e)))
        except sqlite3.IntegrityError:
          rejected.append((line, f"run_key {row.get('run_key')!r} is already in the store"))
    return ImportReport(imported, rejected)

  def import_jsonl(self, path: Union[str, os.PathLike]) -> ImportReport:
    """Import runs from JSON Lines, one run per line; bad lines are rejected, the rest kept."""
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"no JSON Lines file at {str(path)!r}")

    def rows():
      with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
          if not raw.strip():
            continue
          try:
            yield line_no, json.loads(raw.decode("utf-8"))
          except UnicodeDecodeError as e:
            yield line_no, ValueError(f"not UTF-8 text: {e.reason} at byte {e.start}")
          except json.JSONDecodeError as e:
            yield line_no, ValueError(f"invalid JSON: {e.msg} at column {e.colno}")
    return self._import(rows())

  def export_jsonl(self, path: Union[str, os.PathLike]) -> int:
    """Write every readable run as one JSON object per line (non-finite numbers as null)."""
    count = 0
    with open(path, "w", encoding="utf-8") as f:
      for run in self._select():
        f.write(json.dumps(_finite_or_none(run._asdict()), allow_nan=False) + "\n")
        count += 1
    return count

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

  def import_csv(self, path: Union[str, os.PathLike]) -> ImportReport:
    """Import runs from a CSV in the flattened layout ``export_csv`` writes."""
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"no CSV file at {str(path)!r}")

    def rows():
      with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
          return
        _check_csv_header(header)
        for line_no_before, cells in _numbered(reader):
          try:
            yield line_no_before, _row_from_csv(header, cells)
          except ValueError as e:
            yield line_no_before, e
    return self._import(rows())


def _numbered(reader) -> Iterator[tuple[int, list[str]]]:
  """CSV records with the line number each starts on (records may span lines)."""
  start = reader.line_num + 1
  for cells in reader:
    yield start, cells
    start = reader.line_num + 1


def _csv_cell(v: Any) -> str:
  return v if isinstance(v, str) else json.dumps(v)


def _parse_cell(text: str) -> Any:
  """A cell as JSON (numbers, true/false, null, NaN) if it parses, else the string."""
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


_CSV_PREFIXES = {"feature": "task_features", "hparam": "hparams", "metric": "metrics",
                 "model": "model"}
_CSV_JSON = ("curves", "versions", "extra")


def _check_csv_header(header: list[str]) -> None:
  known = ("task", "status", "wall_time", "run_key", "created", "id") + _CSV_JSON
  bad = [n for n in header
         if n not in known and not (n.partition(".")[0] in _CSV_PREFIXES and "." in n)]
  if bad:
    raise ValueError(f"unknown CSV column(s) {', '.join(map(repr, bad))}; accepted: "
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
        raise ValueError(f"column {name!r}: {text!r} is not a number")
      row.setdefault(_CSV_PREFIXES[prefix], {})[rest] = value
    elif name in _CSV_JSON:
      try:
        row[name] = json.loads(text)
      except json.JSONDecodeError as e:
        raise ValueError(f"column {name!r}: invalid JSON ({e.msg})") from None
    elif name == "wall_time":
      try:
        row[name] = float(text)
      except ValueError:
        raise ValueError(f"column 'wall_time': {text!r} is not a number") from None
    else:  # task, status, run_key, created, id (checked by _check_csv_header)
      row[name] = text
  if "task" not in row:
    raise ValueError("missing 'task'")
  return row
