"""The databases a run store lives in: an SQLite file (the embedded default) or a
PostgreSQL server that workers on many hosts share.

:class:`~metaopt.hparams.store.RunStore` holds what both have in common (the schema's
meaning, validation, rows, imports and exports); a backend here holds only what differs:
opening (SQLite's file checks; PostgreSQL's bounded retry while the server cannot be
reached), the DDL, transactions, listing tables, inserting a row, and turning the
driver's errors into one-line errors naming the store. SQL is written once with ``?``
placeholders; the PostgreSQL backend passes it to psycopg as ``%s``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pathlib
import re
import sqlite3
import stat
import time
import urllib.parse
import zlib
from typing import Any, Iterator, NamedTuple, Optional, Union

BUSY_TIMEOUT_MS = 60_000  # SQLite: how long a writer waits for another one
# PostgreSQL: seconds between connection attempts while the server cannot be reached
# (5 attempts over 7.5 s), and the limit of one attempt.
RETRY_DELAYS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
CONNECT_TIMEOUT = 10
URL_FORMS = ("a file path, sqlite:///PATH (sqlite:////abs/path for an absolute path) or "
             "postgresql://USER:PASSWORD@HOST:PORT/DATABASE")
POSTGRES_SCHEMES = ("postgresql", "postgres")

_SQLITE_HEADER = b"SQLite format 3\x00"
# A scheme of two or more letters, so that a Windows drive (C://) stays a path.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
# Serializes the creation of a store's tables by concurrent workers (PostgreSQL's
# CREATE TABLE IF NOT EXISTS is not safe against a concurrent one).
_SCHEMA_LOCK = zlib.crc32(b"metaopt-runstore")


class StoreAccessError(PermissionError, ValueError):
  """The store's file or folder may not be read or written by this user. A ValueError
  too, so whatever reports ValueErrors in one line (the CLI) reports this one."""


class Target(NamedTuple):
  """Where a store lives, from a path or URL (:func:`parse_target`)."""
  kind: str                      # "sqlite" or "postgresql"
  url: str                       # what opens the store again (a path for SQLite)
  name: str                      # what messages show: the path, or the URL without password
  path: Optional[pathlib.Path]   # the SQLite file; None for a server


def mask(url: str) -> str:
  """``url`` with its password replaced by ``***`` (for messages and reprs)."""
  try:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None and "password=" not in parts.query.lower():
      return url
    netloc = parts.netloc
    if parts.password is not None:
      user, _, host = netloc.rpartition("@")
      netloc = f"{user.partition(':')[0]}:***@{host}"
    query = re.sub(r"(?i)(password=)[^&]*", r"\1***", parts.query)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))
  except ValueError:  # e.g. a port that is not a number: show the scheme only
    return url.partition("://")[0] + "://..."


def parse_target(target: Union[str, os.PathLike]) -> Target:
  """A store's path or URL: a file path or ``sqlite:///PATH`` (SQLite), or
  ``postgresql://USER:PASSWORD@HOST:PORT/DATABASE``. ValueError for anything else."""
  if isinstance(target, os.PathLike):
    path = pathlib.Path(target)
    return Target("sqlite", str(path), str(path), path)
  if not isinstance(target, str):
    raise ValueError(f"a run store is {URL_FORMS}; got {type(target).__name__}")
  m = _SCHEME.match(target)
  if m is None:
    return Target("sqlite", target, target, pathlib.Path(target))
  scheme = m.group(1).lower()
  if scheme == "sqlite":
    path = target[m.end():]
    if not path.startswith("/") or len(path) < 2:
      raise ValueError(f"an SQLite URL is sqlite:///PATH (sqlite:////abs/path for an "
                       f"absolute path), got {target!r}")
    path = path[1:]
    return Target("sqlite", path, path, pathlib.Path(path))
  if scheme in POSTGRES_SCHEMES:
    return Target("postgresql", target, mask(target), None)
  raise ValueError(f"unknown database URL scheme {scheme!r} in {mask(target)!r}; "
                   f"accepted: {URL_FORMS}")


def sqlite_path(target: Union[str, os.PathLike]) -> Optional[pathlib.Path]:
  """The file of an SQLite store's path or URL; None for a database server."""
  return parse_target(target).path


def connect(target: Target, *, create: bool):
  """An open backend for ``target`` (see :class:`SQLite` and :class:`Postgres`)."""
  return (SQLite if target.kind == "sqlite" else Postgres)(target, create=create)


def _first_line(e: BaseException) -> str:
  return " ".join(str(e).strip().splitlines()[:1]) or type(e).__name__


# ----------------------------------------------------------------------------- SQLite

class SQLite:
  """A run store in an SQLite file: WAL journal and a busy timeout, so that several
  processes of one machine write into it at once."""

  kind = "sqlite"
  label = "an SQLite database"
  errors = (sqlite3.Error,)
  schema = ("""CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
            """CREATE TABLE IF NOT EXISTS runs (
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
)""", """CREATE INDEX IF NOT EXISTS runs_task ON runs (task)""")

  def __init__(self, target: Target, *, create: bool):
    self._db: Optional[sqlite3.Connection] = None
    self.path = target.path
    self.name = target.name
    self.empty_message = (f"{self.name!r} is an empty SQLite database, not a run store; it "
                          "was left untouched")
    size = self._size()
    if size is None:
      if not create:
        raise FileNotFoundError(f"no run store at {self.name!r}")
      if not self.path.parent.is_dir():
        raise FileNotFoundError(f"folder {str(self.path.parent)!r} of run store does not exist")
    elif size == 0:
      if not create:
        raise ValueError(f"{self.name!r} is empty (0 bytes), not a run store; it was left "
                         "untouched")
    else:
      self._check_header()
    self.existed = bool(size)
    try:
      # Autocommit mode: transactions are explicit BEGIN IMMEDIATE ... COMMIT. An
      # existing file is opened with mode=rw so that SQLite never creates one.
      uri = self.path.absolute().as_uri() + "?mode=rw" if self.existed or not create else None
      self._db = sqlite3.connect(uri or self.name, uri=uri is not None,
                                 timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                 check_same_thread=False)
      self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    except sqlite3.Error as e:
      self.close()
      raise self.error(e, opening=True) from None

  # -- opening

  def _size(self) -> Optional[int]:
    """The file's size in bytes, None if there is none; one-line errors for the rest."""
    name = self.name
    try:
      st = self.path.stat()
    except FileNotFoundError:
      return None
    except NotADirectoryError:
      raise FileNotFoundError(f"folder {str(self.path.parent)!r} of run store is not a "
                              "folder") from None
    except PermissionError:
      raise StoreAccessError(f"cannot open run store {name!r}: permission denied on its "
                             "folder") from None
    except OSError as e:
      raise ValueError(f"cannot open run store {name!r}: {e.strerror}") from None
    except ValueError as e:  # e.g. an embedded null byte
      raise ValueError(f"run store path {name!r} is not a valid path: {e}") from None
    if stat.S_ISDIR(st.st_mode):
      raise ValueError(f"run store path {name!r} is a directory; pass a file path")
    return st.st_size

  def _check_header(self) -> None:
    try:
      with open(self.path, "rb") as f:
        header = f.read(len(_SQLITE_HEADER))
    except PermissionError:
      raise StoreAccessError(f"cannot read run store {self.name!r}: permission denied") from None
    except OSError as e:
      raise ValueError(f"cannot read run store {self.name!r}: {e.strerror}") from None
    if header != _SQLITE_HEADER:
      raise ValueError(f"{self.name!r} is not a metaopt run store (not an SQLite file)")

  def check_health(self) -> Optional[str]:
    """What ``PRAGMA quick_check`` finds wrong with an existing file, None if healthy."""
    if not self.existed:
      return None
    found = [r[0] for r in self._db.execute("PRAGMA quick_check(1)").fetchall()]
    if found == ["ok"]:
      return None
    lines = [line for text in found for line in str(text).splitlines()
             if line.strip() and not line.startswith("***")]
    return "; ".join(lines) or "quick_check failed"

  def read_only(self) -> None:
    self._db.execute("PRAGMA query_only = ON")

  def prepare_writes(self) -> None:
    self._retry(lambda: self._db.execute("PRAGMA journal_mode = WAL"))
    self._db.execute("PRAGMA synchronous = NORMAL")

  def error(self, e: sqlite3.Error, *, opening: bool = False) -> Exception:
    """A one-line error naming the store for an sqlite3 error."""
    name = self.name
    code = getattr(e, "sqlite_errorname", "") or ""
    if code.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
      if opening:
        return ValueError(f"{name!r} is damaged: {e}; it was left untouched")
      return ValueError(f"run store {name!r} is damaged: {e}")
    if code.startswith(("SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_PERM", "SQLITE_AUTH")):
      folder = self.path.parent
      if not os.access(folder, os.W_OK | os.X_OK):
        return StoreAccessError(f"cannot write run store {name!r}: folder {str(folder)!r} is "
                                "not writable (SQLite keeps -wal and -shm files next to the "
                                "store)")
      if self.path.exists() and not os.access(self.path, os.R_OK | os.W_OK):
        return StoreAccessError(f"cannot write run store {name!r}: the file is read-only for "
                                "this user")
      return ValueError(f"cannot open run store {name!r}: {e}")
    if code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
      return ValueError(f"run store {name!r} stayed locked by another process for "
                        f"{BUSY_TIMEOUT_MS // 1000} s ({e})")
    return ValueError(f"run store {name!r}: {e}")

  # -- statements

  def execute(self, sql: str, args: tuple = ()):
    return self._db.execute(sql, args)

  def executemany(self, sql: str, rows) -> None:
    self._db.executemany(sql, rows)

  def tables(self) -> set[str]:
    rows = self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {r[0] for r in rows}

  def insert(self, sql: str, args: tuple) -> Optional[int]:
    """Run an ``INSERT ... ON CONFLICT DO NOTHING``: the new row's id, None if skipped."""
    cursor = self._db.execute(sql, args)
    return cursor.lastrowid if cursor.rowcount == 1 else None

  def lock_schema(self) -> None:
    pass  # BEGIN IMMEDIATE already holds the file's write lock

  def _retry(self, fn, attempts: int = 200):
    for i in range(attempts):
      try:
        return fn()
      except sqlite3.OperationalError as e:
        if "locked" not in str(e) and "busy" not in str(e) or i == attempts - 1:
          raise
        time.sleep(0.05)

  @contextlib.contextmanager
  def transaction(self) -> Iterator["SQLite"]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on an error."""
    db = self._db
    self._retry(lambda: db.execute("BEGIN IMMEDIATE"))
    try:
      yield self
    except BaseException:
      if db.in_transaction:
        try:
          db.execute("ROLLBACK")
        except sqlite3.Error:
          pass  # the original error says more; SQLite rolls back on close anyway
      raise
    self._retry(lambda: db.execute("COMMIT"))

  def close(self) -> None:
    if self._db is not None:
      self._db.close()
      self._db = None


# ----------------------------------------------------------------------------- PostgreSQL

@functools.lru_cache(maxsize=None)
def _pg_sql(sql: str) -> str:
  return sql.replace("?", "%s")  # the store's SQL holds no other ? and no %


def _psycopg():
  """The psycopg 3 module, or a one-line error saying how to install it."""
  try:
    import psycopg  # optional: only PostgreSQL stores need it (the `postgres` extra)
  except ImportError:
    raise ValueError("PostgreSQL run stores need psycopg 3: pip install 'metaopt[postgres]' "
                     "(or pip install 'psycopg[binary]')") from None
  return psycopg


# Server answers that pass with time: these are retried like an unreachable server.
_TRANSIENT = ("starting up", "shutting down", "too many", "remaining connection slots",
              "in recovery", "not yet accepting")


def _connect_reason(e: BaseException) -> str:
  """libpq's reason without its 'connection to server at ..., port ... failed:' prefix."""
  line = _first_line(e)
  line = re.sub(r"^.*?\bport \d+ failed:\s*", "", line)
  line = re.sub(r"^connection (failed|is bad):\s*", "", line)
  return re.sub(r"^FATAL:\s*", "", line).strip()


class Postgres:
  """A run store in a PostgreSQL database, shared by workers on many hosts. Every
  statement outside an explicit transaction commits at once (autocommit)."""

  kind = "postgresql"
  label = "a PostgreSQL database"
  damaged = None
  schema = ("""CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
            """CREATE TABLE IF NOT EXISTS runs (
  id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
  run_key TEXT UNIQUE,
  task TEXT NOT NULL,
  task_features TEXT NOT NULL,
  model TEXT NOT NULL,
  hparams TEXT NOT NULL,
  metrics TEXT NOT NULL,
  curves TEXT NOT NULL,
  status TEXT NOT NULL,
  wall_time DOUBLE PRECISION,
  versions TEXT NOT NULL,
  created TEXT NOT NULL,
  extra TEXT NOT NULL
)""", """CREATE INDEX IF NOT EXISTS runs_task ON runs (task)""",
            # Sweep workers on many hosts claim runs here (metaopt.hparams.sweep): one row
            # per planned run, unit = the runs that share one compiled program.
            """CREATE TABLE IF NOT EXISTS claims (
  run_key TEXT PRIMARY KEY,
  unit TEXT NOT NULL,
  trial INTEGER NOT NULL,
  worker TEXT,
  claimed_at TIMESTAMPTZ
)""", """CREATE INDEX IF NOT EXISTS claims_unit ON claims (unit)""")

  def __init__(self, target: Target, *, create: bool):
    self._db = None
    self.name = target.name
    self.path = None
    self.existed = True
    self.empty_message = (f"{self.name!r} is an empty PostgreSQL database, not a run store; "
                          "it was left untouched")
    self._pg = _psycopg()
    self.errors = (self._pg.Error,)
    try:
      info = self._pg.conninfo.conninfo_to_dict(target.url)
    except self._pg.Error as e:
      raise ValueError(f"invalid PostgreSQL URL {self.name!r}: {_first_line(e)}") from None
    self.where = f"{info.get('host') or 'localhost'}:{info.get('port') or 5432}"
    self._db = self._connect(target.url, info.get("dbname") or info.get("user") or "")

  def _connect(self, url: str, dbname: str):
    """A connection, retried with backoff while the server cannot be reached."""
    start = time.monotonic()
    delays = tuple(RETRY_DELAYS) + (None,)
    for attempt, delay in enumerate(delays, 1):
      try:
        return self._pg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
      except self._pg.Error as e:
        reason = _connect_reason(e)
        text = str(e)
        reached = "FATAL" in text and not any(t in text for t in _TRANSIENT)
        if reached:  # the server answered: retrying would not change its answer
          if "does not exist" in reason and "database" in reason:
            raise FileNotFoundError(f"no run store at {self.name!r}: {reason} (create it "
                                    f"first, e.g. createdb {dbname})") from None
          raise ValueError(f"cannot open run store {self.name!r}: {reason}") from None
        if not isinstance(e, self._pg.OperationalError) or "connection option" in reason:
          raise ValueError(f"invalid PostgreSQL URL {self.name!r}: {reason}") from None
        if delay is None:
          raise ConnectionError(
              f"cannot reach the PostgreSQL server of run store {self.name!r} at "
              f"{self.where} after {attempt} attempts over {time.monotonic() - start:.1f} s: "
              f"{reason}") from None
        time.sleep(delay)

  def check_health(self) -> Optional[str]:
    return None  # the server keeps its own files consistent

  def read_only(self) -> None:
    pass

  def prepare_writes(self) -> None:
    pass

  def error(self, e: BaseException, *, opening: bool = False) -> Exception:
    """A one-line error naming the store for a psycopg error."""
    reason = _first_line(e)
    if isinstance(e, self._pg.errors.InsufficientPrivilege):
      return StoreAccessError(f"cannot write run store {self.name!r}: {reason}")
    if isinstance(e, self._pg.OperationalError):
      return ValueError(f"run store {self.name!r}: lost the connection to {self.where}: "
                        f"{reason}")
    return ValueError(f"run store {self.name!r}: {reason}")

  # -- statements

  def execute(self, sql: str, args: tuple = ()):
    return self._db.execute(_pg_sql(sql), tuple(args) or None)

  def executemany(self, sql: str, rows) -> None:
    with self._db.cursor() as cursor:
      cursor.executemany(_pg_sql(sql), list(rows))

  def tables(self) -> set[str]:
    rows = self.execute("SELECT table_name FROM information_schema.tables "
                        "WHERE table_schema = current_schema()").fetchall()
    return {r[0] for r in rows}

  def insert(self, sql: str, args: tuple) -> Optional[int]:
    """Run an ``INSERT ... ON CONFLICT DO NOTHING``: the new row's id, None if skipped."""
    row = self.execute(sql + " RETURNING id", args).fetchone()
    return None if row is None else row[0]

  def lock_schema(self) -> None:
    self.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))

  @contextlib.contextmanager
  def transaction(self) -> Iterator["Postgres"]:
    with self._db.transaction():
      yield self

  def close(self) -> None:
    if self._db is not None:
      self._db.close()
      self._db = None


def is_postgres(backend: Any) -> bool:
  return getattr(backend, "kind", None) == "postgresql"
