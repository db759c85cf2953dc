"""The run store: round trips, concurrent writers, imports with bad rows, foreign files.

Tests taking ``store_url`` (or ``new_store_url``) run twice: on an SQLite file and on a
throwaway PostgreSQL server (tests/conftest.py); the others test SQLite's file handling."""

import json
import math
import multiprocessing
import os
import pathlib
import re
import shutil
import signal
import socket
import sqlite3
import tempfile
import time
import warnings

import numpy as np
import pytest

from metaopt.hparams import Run, RunStore
from metaopt.hparams import db as db_lib
from metaopt.hparams.db import mask, sqlite_path

try:
  import psycopg
except ImportError:  # the optional `postgres` extra: its tests skip without it
  psycopg = None


def row(i, task="iris", **kw):
  base = dict(task=task, task_features={"n_train": 90.0, "n_classes": 3.0 + i % 2},
              hparams={"learning_rate": 10.0 ** (-1 - i % 4), "batch_size": 16 * (1 + i % 3),
                       "optimizer": "adam"},
              metrics={"val_accuracy": 0.5 + i / 100, "val_loss": 1.0 / (i + 1)},
              model={"family": "mlp", "width": 32, "depth": 2},
              curves={"val_loss": [2.0, 1.0, 1.0 / (i + 1)]}, wall_time=0.1 * i,
              run_key=f"{task}-{i}", extra={"note": f"run {i}"})
  base.update(kw)
  return base


def comparable(runs):
  """Runs without the store-assigned id, NaN made comparable."""
  def fix(x):
    if isinstance(x, float) and math.isnan(x):
      return "nan"
    if isinstance(x, dict):
      return {k: fix(v) for k, v in x.items()}
    if isinstance(x, list):
      return [fix(v) for v in x]
    return x
  return [fix(r._replace(id=0)._asdict()) for r in runs]


def raw_sql(url, statement):
  """Runs one statement on a store's database behind the store's back."""
  path = sqlite_path(url)
  if path is None:
    with psycopg.connect(url, autocommit=True) as con:
      con.execute(statement)
    return
  con = sqlite3.connect(path)
  with con:
    con.execute(statement)
  con.close()


def test_add_then_read_back_equal(store_url):
  with RunStore(store_url) as store:
    ids = [store.add(**row(i)) for i in range(3)]
    diverged = store.add("wine", task_features={"n_train": 100}, hparams={"lr": np.float32(3.0)},
                         metrics={"val_loss": float("nan")}, status="diverged",
                         curves={"val_loss": np.array([1.0, np.inf])})
    runs = store.runs()
    assert [r.id for r in runs] == ids + [diverged]
    for i, r in enumerate(runs[:3]):
      expected = row(i)
      assert isinstance(r, Run)
      for field in ("task", "task_features", "hparams", "metrics", "model", "curves",
                    "wall_time", "run_key", "extra"):
        assert getattr(r, field) == pytest.approx(expected[field]) if field == "wall_time" \
            else getattr(r, field) == expected[field], field
      assert r.status == "completed"
      assert set(r.versions) >= {"python", "jax", "flax", "optax", "metaopt"}
    d = runs[3]
    assert d.status == "diverged" and math.isnan(d.metrics["val_loss"])
    assert d.curves["val_loss"][0] == 1.0 and math.isnan(d.curves["val_loss"][1])
    assert d.hparams == {"lr": 3.0} and d.task_features == {"n_train": 100.0}
    assert len(store) == 4 and store.has("iris-1") and not store.has("iris-9")
    assert store.run_keys() == {"iris-0", "iris-1", "iris-2"}
    assert store.tasks() == {"iris": row(2)["task_features"], "wine": {"n_train": 100.0}}
    assert [r.id for r in store.runs(task="wine")] == [diverged]
    assert [r.id for r in store.runs(status="diverged")] == [diverged]
  # Reopening reads the same rows.
  with RunStore(store_url) as again:
    assert comparable(again.runs()) == comparable(runs)


def test_bad_values_name_the_problem(store_url):
  store = RunStore(store_url)
  cases = [
      (dict(row(0), status="exploded"), "status must be one of completed, diverged, failed"),
      (dict(row(0), task=3), "task must be a non-empty string, got 3"),
      (dict(row(0), task_features={"n": "big"}), "task_features['n'] must be a finite number"),
      (dict(row(0), metrics={"acc": [1, 2]}), "metrics['acc'] must be a number"),
      (dict(row(0), hparams={"lr": {"a": 1}}), "hparams['lr'] must be a number, string, bool"),
      (dict(row(0), wall_time=-1.0), "wall_time must be a number of seconds >= 0"),
  ]
  for kwargs, needle in cases:
    with pytest.raises(ValueError, match=None) as e:
      store.add(**kwargs)
    assert needle in str(e.value)
  first = store.add(**row(0))
  with pytest.raises(ValueError, match="run_key 'iris-0' is already in the store"):
    store.add(**row(0))
  # add_many is all or nothing, and names the bad row.
  with pytest.raises(ValueError, match="row 1: status"):
    store.add_many([row(1), dict(row(2), status="nope")])
  assert len(store) == 1
  ids = store.add_many([row(1), row(2)])  # increasing (PostgreSQL may leave gaps)
  assert len(ids) == 2 and first < ids[0] < ids[1]
  assert [r.id for r in store.runs()] == [first] + ids
  store.close()


def test_jsonl_and_csv_round_trip(tmp_path, new_store_url):
  src = RunStore(new_store_url())
  src.add_many([row(i) for i in range(4)] + [row(9, task="wine", run_key=None, curves=None,
                                                  metrics={"val_loss": float("nan")},
                                                  status="diverged")])
  assert src.export_jsonl(tmp_path / "runs.jsonl") == 5
  lines = (tmp_path / "runs.jsonl").read_text().splitlines()
  assert json.loads(lines[-1])["metrics"] == {"val_loss": None}  # standard JSON, no NaN
  assert src.export_csv(tmp_path / "runs.csv") == 5
  for fmt in ("jsonl", "csv"):
    dst = RunStore(new_store_url())
    report = getattr(dst, f"import_{fmt}")(tmp_path / f"runs.{fmt}")
    assert report.imported == 5 and report.rejected == [], report
    assert comparable(dst.runs()) == comparable(src.runs()), fmt
    # Importing again: every run_key is a duplicate; the run without one comes in again.
    again = getattr(dst, f"import_{fmt}")(tmp_path / f"runs.{fmt}")
    assert again.imported == 1 and [line for line, _ in again.rejected] == \
        ([1, 2, 3, 4] if fmt == "jsonl" else [2, 3, 4, 5])
    assert "already in the store" in again.rejected[0][1]


def test_import_rejects_bad_rows_with_line_numbers_and_keeps_the_rest(tmp_path, store_url):
  good = {k: v for k, v in row(0).items() if k in ("task", "task_features", "hparams", "metrics")}
  lines = [
      json.dumps(good),                                            # 1 ok
      "{not json",                                                 # 2
      json.dumps({k: v for k, v in good.items() if k != "metrics"}),  # 3
      "",                                                          # 4 blank: ignored
      json.dumps(dict(good, task_features={"n": "many"})),         # 5
      json.dumps(dict(good, status="crashed")),                    # 6
      json.dumps(dict(good, hparms={"lr": 1})),                    # 7 typo
      json.dumps([1, 2]),                                          # 8
      json.dumps(dict(good, task="wine", curves={"val_loss": [1, None, 0.5]})),  # 9 ok
  ]
  (tmp_path / "in.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b'{"task": "\xff"}\n')
  store = RunStore(store_url)
  report = store.import_jsonl(tmp_path / "in.jsonl")
  assert report.imported == 2
  reasons = dict(report.rejected)
  assert sorted(reasons) == [2, 3, 5, 6, 7, 8, 10]
  assert "not UTF-8" in reasons[10]
  assert "invalid JSON" in reasons[2]
  assert "missing required field(s) 'metrics'" in reasons[3]
  assert "task_features['n'] must be a finite number" in reasons[5]
  assert "'crashed'" in reasons[6]
  assert "unknown field(s) 'hparms'" in reasons[7]
  assert "must be a JSON object" in reasons[8]
  assert [r.task for r in store.runs()] == ["iris", "wine"]
  assert math.isnan(store.runs()[1].curves["val_loss"][1])

  csv_text = ("task,feature.n,hparam.lr,metric.acc\n"
              "iris,1.0,0.1,0.5\n"
              "iris,lots,0.1,0.5\n"
              "wine,2.0,adam,0.7\n"
              "iris,1.0\n")
  (tmp_path / "in.csv").write_text(csv_text)
  report = store.import_csv(tmp_path / "in.csv")
  assert report.imported == 2 and [line for line, _ in report.rejected] == [3, 5]
  assert "'feature.n': 'lots' is not a number" in report.rejected[0][1]
  assert store.runs()[-1].hparams == {"lr": "adam"}
  (tmp_path / "bad_header.csv").write_text("task,colour\niris,red\n")
  with pytest.raises(ValueError, match="unknown CSV column.*'colour'"):
    store.import_csv(tmp_path / "bad_header.csv")
  with pytest.raises(FileNotFoundError, match="no JSON Lines file"):
    store.import_jsonl(tmp_path / "missing.jsonl")


def test_newer_schema_and_foreign_databases_are_refused(store_url, new_store_url):
  RunStore(store_url).close()
  raw_sql(store_url, "UPDATE meta SET value = '7' WHERE key = 'schema_version'")
  for create in (True, False):
    with pytest.raises(ValueError, match="schema version 7, newer than version 1 that this "
                       "metaopt reads; upgrade metaopt$"):
      RunStore(store_url, create=create)

  other = new_store_url()
  raw_sql(other, "CREATE TABLE people (name TEXT)")
  with pytest.raises(ValueError, match="is an? (SQLite|PostgreSQL) database but not a metaopt "
                     "run store .no meta table; tables: people"):
    RunStore(other)
  raw_sql(other, "CREATE TABLE meta (key TEXT, value TEXT)")
  raw_sql(other, "INSERT INTO meta VALUES ('format', 'something-else')")
  with pytest.raises(ValueError, match="format marker 'something-else'"):
    RunStore(other)
  raw_sql(other, "SELECT name FROM people")  # untouched: no runs table was added
  with pytest.raises(Exception, match="runs"):
    raw_sql(other, "SELECT COUNT(*) FROM runs")


def test_foreign_files_are_refused(tmp_path):
  text = tmp_path / "notes.txt"
  text.write_text("hello, this is not a database\n" * 10)
  with pytest.raises(ValueError, match="not a metaopt run store"):
    RunStore(text)
  assert text.read_text().startswith("hello")  # untouched


def test_corrupt_row_is_skipped_with_a_warning(tmp_path, store_url):
  with RunStore(store_url) as store:
    store.add_many([row(i) for i in range(3)])
  raw_sql(store_url, "UPDATE runs SET metrics = '{\"val_accuracy\": 0.5' WHERE id = 2")  # half-written
  with RunStore(store_url) as store:
    with pytest.warns(RuntimeWarning, match="skipping corrupt run id 2"):
      runs = store.runs()
    assert [r.id for r in runs] == [1, 3]
    with pytest.warns(RuntimeWarning):
      assert store.export_jsonl(tmp_path / "out.jsonl") == 2


def _writer(path, worker, n):
  with RunStore(path) as store:
    for i in range(n):
      store.add(f"task{worker}", task_features={"w": worker}, hparams={"i": i},
                metrics={"loss": float(i)}, run_key=f"{worker}-{i}")


def test_concurrent_writers_from_separate_processes_lose_no_row(store_url):
  path = store_url  # created concurrently by the writers themselves
  # fork: the children start at once (spawn re-imports jax); they use nothing but the store.
  ctx = multiprocessing.get_context("fork")
  procs = [ctx.Process(target=_writer, args=(path, w, 50)) for w in range(4)]
  for p in procs:
    p.start()
  for p in procs:
    p.join(timeout=120)
  assert [p.exitcode for p in procs] == [0, 0, 0, 0]
  with RunStore(path) as store:
    assert len(store) == 200
    assert store.run_keys() == {f"{w}-{i}" for w in range(4) for i in range(50)}
    for w in range(4):
      assert sorted(r.hparams["i"] for r in store.runs(task=f"task{w}")) == list(range(50))


# ----------------------------------------------------------------------------- robustness

GOOD = {"task": "iris", "task_features": {"n": 1.0}, "hparams": {"lr": 0.1},
        "metrics": {"acc": 0.5}}


def _line(where, raw):
  """A JSON Lines row of GOOD with the JSON text ``raw`` (which json.dumps may not be
  able to write) at ``where``: a field ("created",) or a name in one ("hparams", "x")."""
  row = json.loads(json.dumps(GOOD))
  if len(where) == 2:
    row[where[0]][where[1]] = "@@"
  else:
    row[where[0]] = "@@"
  return json.dumps(row).replace('"@@"', raw)


def test_jsonl_import_keeps_every_good_line_whatever_the_bad_ones_hold(tmp_path, store_url):
  lines = [
      json.dumps(dict(GOOD, task="first")),                       # 1 ok
      _line(("hparams", "x"), "1" + "0" * 320),                   # 2 int above 1e308
      _line(("hparams", "x"), "7" * 5000),                        # 3 beyond int() of a string
      "[" * 100_000 + "]" * 100_000,                              # 4 deep nesting
      _line(("extra",), '{"a":' * 40 + "1" + "}" * 40),           # 5 deep model/extra
      _line(("task_features", "x"), "1e400"),                     # 6 overflows to inf
      _line(("hparams", "x"), '"' + "y" * 20_000 + '"'),          # 7 long string
      _line(("created",), '"not a date"'),                        # 8
      _line(("hparams", "x"), str(2 ** 63)),                      # 9 beyond int64
      _line(("metrics", "x"), "1" + "0" * 320),                   # 10
      json.dumps(dict(GOOD, task="last")),                        # 11 ok
  ]
  path = tmp_path / "in.jsonl"
  path.write_bytes("\n".join(lines).encode() + b"\n" + b'{"task": "\xc3"}\n'
                   + json.dumps(dict(GOOD, task="after")).encode() + b"\n")
  with RunStore(store_url) as store:
    report = store.import_jsonl(path)
    assert [r.task for r in store.runs()] == ["first", "last", "after"]
  assert report.imported == 3
  reasons = dict(report.rejected)
  assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 12]
  assert "hparams['x'] must be an integer in [" in reasons[2]
  assert "integer of 5000 digits does not fit in a float64" in reasons[3]
  assert "nested too deeply" in reasons[4]
  assert "extra is nested more than 32 levels deep" in reasons[5]
  assert "task_features['x'] must be a finite number" in reasons[6]
  assert "hparams['x'] must be at most 10000 characters, got 20000" in reasons[7]
  assert "created must be an ISO 8601 date and time" in reasons[8]
  assert "9223372036854775808" in reasons[9]
  assert "metrics['x'] must fit in a float64" in reasons[10]
  assert "not UTF-8" in reasons[12]
  assert all("\n" not in r and len(r) < 400 for r in reasons.values())


def test_csv_import_rejects_bad_records_by_line_and_keeps_the_rest(tmp_path, store_url):
  header = b"task,feature.n,hparam.lr,metric.acc\n"
  records = [
      b"good1,1.0,0.1,0.5\n",                          # 2 ok
      b"big,1.0," + b"9" * 200_000 + b",0.5\n",        # 3 field above csv.field_size_limit
      b"bad\xffbyte,1.0,0.1,0.5\n",                    # 4 not UTF-8
      b'open,1.0,"0.1,0.5\n',                          # 5 unclosed quote: would swallow the rest
      b"good2,2.0,adam,0.7\n",                         # 6 ok
      b'"quoted"x,1.0,0.1,0.5\n',                      # 7 text after a closing quote
      b"short,1.0\n",                                  # 8
      b'"multi\nline",3.0,0.2,0.9\n',                  # 9-10 ok: a quoted newline
      b"\n",                                           # 11 blank: ignored
      b"good3,4.0,0.3,0.1\n",                          # 12 ok
  ]
  path = tmp_path / "in.csv"
  path.write_bytes(header + b"".join(records))
  with RunStore(store_url) as store:
    report = store.import_csv(path)
    assert [r.task for r in store.runs()] == ["good1", "good2", "multi\nline", "good3"]
    assert store.runs()[1].hparams == {"lr": "adam"}
  assert report.imported == 4
  reasons = dict(report.rejected)
  assert sorted(reasons) == [3, 4, 5, 7, 8], report.rejected
  # (were csv.field_size_limit raised elsewhere in the process, the number is too long)
  assert "field larger than field limit" in reasons[3] or "does not fit" in reasons[3]
  assert "not UTF-8 text: invalid byte 0xff" in reasons[4]
  assert "malformed CSV" in reasons[5]
  assert "malformed CSV" in reasons[7]
  assert "2 cells but the header has 4 columns" in reasons[8]


def test_add_rejects_values_that_do_not_fit_the_schema(store_url):
  deep = [0]
  for _ in range(5000):
    deep = [deep]
  cyclic = {}
  cyclic["self"] = cyclic
  cases = [
      (dict(hparams={"n": 10 ** 400}), "hparams['n'] must be an integer in ["),
      (dict(hparams={"n": 10 ** 5000}), "an integer of about 5001 digits"),
      (dict(hparams={"n": 2 ** 63}), "hparams['n'] must be an integer in ["),
      (dict(hparams={"lr": float("inf")}), "hparams['lr'] must be a finite number"),
      (dict(hparams={"s": "x" * 20_000}), "hparams['s'] must be at most 10000 characters"),
      (dict(hparams={"s": "\ud800"}), "hparams['s'] is not valid Unicode text"),
      (dict(hparams={"deep": deep}), "hparams['deep'] must be a number, string, bool"),
      (dict(task_features={"n": 10 ** 400}), "task_features['n'] must fit in a float64"),
      (dict(task_features={"n": float("nan")}), "task_features['n'] must be a finite number"),
      (dict(metrics={"acc": 10 ** 400}), "metrics['acc'] must fit in a float64"),
      (dict(curves={"loss": [1.0, 10 ** 400]}), "curves['loss'] must fit in a float64"),
      (dict(curves={"loss": [deep]}), "curves['loss'] must be a list of numbers"),
      (dict(wall_time=10 ** 400), "wall_time must be a number of seconds >= 0"),
      (dict(model={"n_params": 10 ** 400}), "model must be an integer in ["),
      (dict(extra={"deep": deep}), "extra is nested more than 32 levels deep"),
      (dict(extra=cyclic), "extra is nested more than 32 levels deep"),
      (dict(extra={"blob": "x" * 2_000_000}), "extra must be at most 1000000 characters"),
      (dict(task="t" * 20_000), "task must be at most 10000 characters"),
      (dict(run_key="k" * 20_000), "run_key must be at most 10000 characters"),
      (dict(task="ir\x00is"), "task must not contain a NUL character"),
      (dict(run_key="k\x00"), "run_key must not contain a NUL character"),
      (dict(versions={"jax": ["0", "10"]}), "versions['jax'] must be a string"),
      (dict(hparams={"x" * 20_000: 1}), "hparams: name must be at most 10000 characters"),
  ]
  with RunStore(store_url) as store:
    for kwargs, needle in cases:
      with pytest.raises(ValueError) as e:
        store.add(**dict(row(0), **kwargs))
      assert needle in str(e.value), (needle, str(e.value)[:300])
      assert len(str(e.value)) < 400 and "\n" not in str(e.value)
    assert len(store) == 0
    # At the edges: the largest float64 and int64 values are accepted.
    store.add(**dict(row(0), task_features={"n": 1.7e308}, hparams={"n": 2 ** 63 - 1, "s": "\x00"},
                     metrics={"acc": float("inf")}, extra={"n": -2 ** 63}))
    assert store.runs()[0].hparams == {"n": 2 ** 63 - 1, "s": "\x00"}  # inside JSON: escaped


def test_created_is_parsed_and_stored_in_utc(store_url):
  with RunStore(store_url) as store:
    for bad in ("not a date", "2024-13-01", "", 20240501, "x" * 500):
      with pytest.raises(ValueError, match="created must be an ISO 8601 date and time"):
        store.add(**row(0, created=bad))
    store.add(**row(1, created="2024-05-01T12:00:00+02:00"))
    store.add(**row(2, created="2024-05-01T12:00:00Z"))
    store.add(**row(3, created="2024-05-01"))  # a naive time is taken as UTC
    store.add(**row(4))
    created = [r.created for r in store.runs()]
  assert created[:3] == ["2024-05-01T10:00:00.000000+00:00", "2024-05-01T12:00:00.000000+00:00",
                         "2024-05-01T00:00:00.000000+00:00"]
  assert created[3].endswith("+00:00")


def test_create_false_opens_only_an_existing_store(tmp_path):
  empty = tmp_path / "empty.db"
  empty.write_bytes(b"")
  with pytest.raises(ValueError, match="'.*empty.db' is empty \\(0 bytes\\), not a run store"):
    RunStore(empty, create=False)
  assert empty.read_bytes() == b""
  with pytest.raises(FileNotFoundError, match="no run store at '.*missing.db'"):
    RunStore(tmp_path / "missing.db", create=False)
  assert not (tmp_path / "missing.db").exists()
  blank = tmp_path / "blank.db"  # an SQLite file without tables
  with sqlite3.connect(blank) as db:
    db.execute("PRAGMA user_version = 1")
  before = blank.read_bytes()
  with pytest.raises(ValueError, match="is an empty SQLite database, not a run store"):
    RunStore(blank, create=False)
  assert blank.read_bytes() == before
  with RunStore(tmp_path / "s.db") as store:
    store.add(**row(0))
  with RunStore(tmp_path / "s.db", create=False) as store:
    assert len(store) == 1
  # Writers still create: a 0-byte file becomes a store.
  with RunStore(empty) as store:
    assert len(store) == 0
  assert empty.stat().st_size > 0


def test_create_false_on_a_database_server(postgres_server):
  empty = postgres_server.new_database()
  with pytest.raises(ValueError, match="is an empty PostgreSQL database, not a run store; it "
                     "was left untouched"):
    RunStore(empty, create=False)
  missing = postgres_server.url + "/no_such_db"
  for create in (True, False):
    with pytest.raises(FileNotFoundError, match="^no run store at '.*/no_such_db': database "
                       '"no_such_db" does not exist .create it first, e.g. createdb no_such_db.$'):
      RunStore(missing, create=create)
  RunStore(empty).close()
  with RunStore(empty, create=False) as store:
    assert len(store) == 0 and store.kind == "postgresql" and store.path is None


def test_database_urls_name_what_is_accepted(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with RunStore("sqlite:///rel.db") as store:        # relative to the working folder
    store.add(**row(0))
  with RunStore(f"sqlite:///{tmp_path}/rel.db") as store:   # sqlite:////abs/path
    assert store.kind == "sqlite" and store.path == tmp_path / "rel.db" and len(store) == 1
  with RunStore(tmp_path / "rel.db") as store:
    assert store.run_keys() == {"iris-0"}
  for bad, needle in [
      ("mysql://bob:hunter2@db.example.com/runs", "unknown database URL scheme 'mysql' in "
       "'mysql://bob:***@db.example.com/runs'; accepted: a file path, sqlite:///PATH"),
      ("sqlite://runs.db", "an SQLite URL is sqlite:///PATH"),
      (42, "a run store is a file path, sqlite:///PATH"),
  ]:
    with pytest.raises(ValueError) as e:
      RunStore(bad)
    assert needle in str(e.value) and "\n" not in str(e.value) and "hunter2" not in str(e.value)
  assert not any(p.name.startswith(("mysql", "sqlite")) for p in tmp_path.iterdir())
  assert mask("postgresql://u:pw@h:5/db?password=pw&sslmode=require") == \
      "postgresql://u:***@h:5/db?password=***&sslmode=require"


def test_unreachable_server_is_retried_then_named_in_one_line(monkeypatch):
  if psycopg is None:
    pytest.skip("psycopg is not installed (the postgres extra)")
  with socket.socket() as s:  # a port nothing listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  monkeypatch.setattr(db_lib, "RETRY_DELAYS", (0.1, 0.2))
  start = time.monotonic()
  with pytest.raises(ConnectionError) as e:
    RunStore(f"postgresql://bob:hunter2@127.0.0.1:{port}/runs")
  took = time.monotonic() - start
  message = str(e.value)
  assert isinstance(e.value, OSError) and "\n" not in message and "hunter2" not in message
  assert f"at 127.0.0.1:{port} after 3 attempts over" in message
  assert "Connection refused" in message and 0.3 <= took < 10


def _corrupt_page(path, page_of):
  """Overwrite the page holding the table ``page_of`` with 0xff bytes."""
  with sqlite3.connect(path) as db:
    page = db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (page_of,)).fetchone()[0]
    size = db.execute("PRAGMA page_size").fetchone()[0]
  db.close()
  data = bytearray(path.read_bytes())
  data[(page - 1) * size:page * size] = b"\xff" * size
  path.write_bytes(bytes(data))


def test_damaged_store_is_read_only_or_refused_and_left_untouched(tmp_path):
  path = tmp_path / "s.db"
  with RunStore(path) as store:
    store.add_many([row(i, extra={"pad": "x" * 500}) for i in range(100)])
  good = path.read_bytes()

  _corrupt_page(path, "runs")  # a corrupted page: readable file, broken table
  damaged = path.read_bytes()
  with pytest.warns(RuntimeWarning, match="is damaged .*Page .*; opened read-only"):
    store = RunStore(path)
  assert store.damaged and "Page" in store.damaged
  with pytest.raises(ValueError, match="is damaged .* opened read-only; nothing was written"):
    store.add(**row(100))
  with pytest.raises(ValueError, match="opened read-only"):
    store.add_many([row(101)], on_conflict="skip")
  (tmp_path / "more.jsonl").write_text(json.dumps(GOOD) + "\n")
  with pytest.raises(ValueError, match="opened read-only"):
    store.import_jsonl(tmp_path / "more.jsonl")
  with pytest.raises(ValueError, match="run store '.*' is damaged: database disk image is "
                     "malformed"):
    store.runs()
  store.close()
  assert path.read_bytes() == damaged
  assert sorted(p.name for p in tmp_path.iterdir()) == ["more.jsonl", "s.db"]

  for cut in (len(good) // 2, 4096, 100):  # truncated files
    path.write_bytes(good[:cut])
    with pytest.raises(ValueError, match="is damaged: .*; it was left untouched"):
      RunStore(path)
    assert path.read_bytes() == good[:cut]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["more.jsonl", "s.db"]


def test_closed_store_raises_value_error_in_every_method(tmp_path, store_url):
  store = RunStore(store_url)
  store.add(**row(0))
  store.close()
  store.close()  # idempotent
  (tmp_path / "in.jsonl").write_text(json.dumps(GOOD) + "\n")
  (tmp_path / "in.csv").write_text("task\niris\n")
  calls = [lambda: store.add(**row(1)), lambda: store.add_many([row(1)]), store.runs,
           lambda: store.has("iris-0"), store.run_keys, store.tasks, lambda: len(store),
           lambda: store.schema_version, lambda: store.import_jsonl(tmp_path / "in.jsonl"),
           lambda: store.import_csv(tmp_path / "in.csv"),
           lambda: store.export_jsonl(tmp_path / "out.jsonl"),
           lambda: store.export_csv(tmp_path / "out.csv")]
  for call in calls:
    with pytest.raises(ValueError, match=rf"^run store '{re.escape(mask(store_url))}' is closed$"):
      call()
  assert not (tmp_path / "out.jsonl").exists()


def _open_errors(folder):
  """(type names, message) of opening a new and an existing store in ``folder``."""
  out = []
  for name in ("new.db", "old.db"):
    try:
      RunStore(folder / name).close()
      out.append(None)
    except Exception as e:  # reported to the test, which says what it expects
      out.append([type(e).__name__, isinstance(e, PermissionError), isinstance(e, ValueError),
                  str(e)])
  return out


def _as_nobody(fn, *args):
  """``fn(*args)`` in a forked child running as user nobody (root ignores permissions)."""
  read, write = os.pipe()
  pid = os.fork()
  if pid == 0:  # the child: never returns into pytest
    try:
      os.close(read)
      os.setgid(65534)  # if this fails nothing is written and the test is skipped
      os.setuid(65534)
      try:
        answer = {"result": fn(*args)}
      except Exception as e:  # reported to the parent, which fails the test
        answer = {"error": repr(e)}
      os.write(write, json.dumps(answer).encode())
    finally:
      os._exit(0)
  os.close(write)
  with os.fdopen(read, "rb") as f:
    data = f.read()
  os.waitpid(pid, 0)
  if not data:
    return None
  answer = json.loads(data)
  assert "error" not in answer, answer
  return answer["result"]


def test_store_in_a_read_only_folder_gives_a_one_line_error():
  top = pathlib.Path(tempfile.mkdtemp())  # not under tmp_path, whose parents are 0700
  try:
    os.chmod(top, 0o755)
    folder = top / "ro"
    folder.mkdir()
    with RunStore(folder / "old.db") as store:
      store.add(**row(0))
    before = (folder / "old.db").read_bytes()
    os.chmod(folder, 0o555)
    if not os.access(folder, os.W_OK):
      errors = _open_errors(folder)
    elif os.geteuid() == 0 and hasattr(os, "fork"):
      errors = _as_nobody(_open_errors, folder)
      if errors is None:
        pytest.skip("running as root and cannot switch to user nobody to test permissions")
    else:
      pytest.skip("the read-only folder is writable anyway (running as root?)")
    for error in errors:
      assert error is not None, "opened a store in a read-only folder"
      kind, is_permission, is_value, message = error
      assert is_permission and is_value, kind
      assert "\n" not in message and str(folder) in message
      assert "is not writable" in message
    assert (folder / "old.db").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["old.db"]
  finally:
    os.chmod(top / "ro", 0o755)
    shutil.rmtree(top)


def test_add_many_can_skip_run_keys_already_stored(store_url):
  with RunStore(store_url) as store:
    first = store.add_many([row(0), row(1)])
    with pytest.raises(ValueError, match="run_key 'iris-1' is already in the store"):
      store.add_many([row(2), row(1)])
    assert len(store) == 2  # all or nothing
    # A resumed sweep: row 1 was written by a worker killed before it could report it.
    added = store.add_many([row(1), row(2), row(3, run_key=None), row(2)], on_conflict="skip")
    assert len(added) == 2 and not set(added) & set(first)
    assert [r.run_key for r in store.runs()] == ["iris-0", "iris-1", "iris-2", None]
    assert [r.id for r in store.runs()][2:] == added
    assert store.add_many([row(0), row(1)], on_conflict="skip") == []
    with pytest.raises(ValueError, match="unknown on_conflict 'replace'; accepted: error, skip"):
      store.add_many([row(5)], on_conflict="replace")


def _killed_writer(path, ids_path):
  with RunStore(path) as store:
    for i in range(100_000):
      run_id = store.add(f"task{i}", task_features={"w": 1}, hparams={"i": i},
                         metrics={"loss": float(i)}, run_key=f"k-{i}")
      with open(ids_path, "a") as f:  # after the commit
        f.write(f"{run_id}\n")


def _killed_import(path, marker, n):
  def rows():
    for i in range(n):
      yield i + 1, dict(GOOD, task=f"imported{i}", extra={"pad": "x" * 400})
    pathlib.Path(marker).write_text("mid-transaction")
    time.sleep(600)
  with RunStore(path) as store:
    store._import(rows())  # what import_jsonl / import_csv run, paused before its commit


def _wait_for(check, timeout=90):
  end = time.monotonic() + timeout
  while not check():
    assert time.monotonic() < end, "timed out"
    time.sleep(0.05)


def test_killed_writer_and_killed_import_lose_no_committed_row(tmp_path, new_store_url):
  writer_db, ids = new_store_url(), tmp_path / "ids.txt"
  import_db, marker = new_store_url(), tmp_path / "marker"
  with RunStore(import_db) as store:
    store.add_many([row(i) for i in range(5)])
  # fork: the children start at once (spawn re-imports jax); they use nothing but SQLite.
  ctx = multiprocessing.get_context("fork")
  procs = [ctx.Process(target=_killed_writer, args=(str(writer_db), str(ids))),
           # SQLite: enough rows to spill into the -wal file (checked below)
           ctx.Process(target=_killed_import,
                       args=(str(import_db), str(marker), 8_000 if sqlite_path(import_db) else 500))]
  for p in procs:
    p.start()
  try:
    _wait_for(lambda: ids.exists() and ids.read_text().count("\n") >= 30)
    _wait_for(marker.exists)
    if sqlite_path(import_db) is not None:
      assert pathlib.Path(f"{import_db}-wal").stat().st_size > 1_000_000  # rows were written
  finally:
    for p in procs:
      os.kill(p.pid, signal.SIGKILL)
      p.join()
  recorded = [int(x) for x in ids.read_text().split()]
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # neither store may be reported damaged
    with RunStore(writer_db) as store:
      stored = {r.id for r in store.runs()}
      assert set(recorded) <= stored and len(stored) <= len(recorded) + 1
      store.add(**row(0))
    with RunStore(import_db) as store:
      assert [r.run_key for r in store.runs()] == [f"iris-{i}" for i in range(5)]
      assert store.import_jsonl(_write(tmp_path / "one.jsonl", [GOOD])).imported == 1


def _write(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path
