"""The run store: round trips, concurrent writers, imports with bad rows, foreign files."""

import json
import math
import multiprocessing
import sqlite3

import numpy as np
import pytest

from metaopt.hparams import Run, RunStore


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


def test_add_then_read_back_equal(tmp_path):
  with RunStore(tmp_path / "runs.db") as store:
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
  with RunStore(tmp_path / "runs.db") as again:
    assert comparable(again.runs()) == comparable(runs)


def test_bad_values_name_the_problem(tmp_path):
  store = RunStore(tmp_path / "s.db")
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
  store.add(**row(0))
  with pytest.raises(ValueError, match="run_key 'iris-0' is already in the store"):
    store.add(**row(0))
  # add_many is all or nothing, and names the bad row.
  with pytest.raises(ValueError, match="row 1: status"):
    store.add_many([row(1), dict(row(2), status="nope")])
  assert len(store) == 1
  assert store.add_many([row(1), row(2)]) == [2, 3]
  store.close()


def test_jsonl_and_csv_round_trip(tmp_path):
  src = RunStore(tmp_path / "src.db")
  src.add_many([row(i) for i in range(4)] + [row(9, task="wine", run_key=None, curves=None,
                                                  metrics={"val_loss": float("nan")},
                                                  status="diverged")])
  assert src.export_jsonl(tmp_path / "runs.jsonl") == 5
  lines = (tmp_path / "runs.jsonl").read_text().splitlines()
  assert json.loads(lines[-1])["metrics"] == {"val_loss": None}  # standard JSON, no NaN
  assert src.export_csv(tmp_path / "runs.csv") == 5
  for fmt in ("jsonl", "csv"):
    dst = RunStore(tmp_path / f"dst_{fmt}.db")
    report = getattr(dst, f"import_{fmt}")(tmp_path / f"runs.{fmt}")
    assert report.imported == 5 and report.rejected == [], report
    assert comparable(dst.runs()) == comparable(src.runs()), fmt
    # Importing again: every run_key is a duplicate; the run without one comes in again.
    again = getattr(dst, f"import_{fmt}")(tmp_path / f"runs.{fmt}")
    assert again.imported == 1 and [line for line, _ in again.rejected] == \
        ([1, 2, 3, 4] if fmt == "jsonl" else [2, 3, 4, 5])
    assert "already in the store" in again.rejected[0][1]


def test_import_rejects_bad_rows_with_line_numbers_and_keeps_the_rest(tmp_path):
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
  store = RunStore(tmp_path / "s.db")
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


def test_newer_schema_and_foreign_files_are_refused(tmp_path):
  path = tmp_path / "s.db"
  RunStore(path).close()
  with sqlite3.connect(path) as db:
    db.execute("UPDATE meta SET value = '7' WHERE key = 'schema_version'")
  with pytest.raises(ValueError, match="schema version 7, newer than version 1"):
    RunStore(path)

  text = tmp_path / "notes.txt"
  text.write_text("hello, this is not a database\n" * 10)
  with pytest.raises(ValueError, match="not a metaopt run store"):
    RunStore(text)
  assert text.read_text().startswith("hello")  # untouched

  other = tmp_path / "other.db"
  with sqlite3.connect(other) as db:
    db.execute("CREATE TABLE people (name TEXT)")
  with pytest.raises(ValueError, match="SQLite database but not a metaopt run store"):
    RunStore(other)
  with sqlite3.connect(other) as db:
    db.execute("CREATE TABLE meta (key TEXT, value TEXT)")
    db.execute("INSERT INTO meta VALUES ('format', 'something-else')")
  with pytest.raises(ValueError, match="format marker 'something-else'"):
    RunStore(other)


def test_corrupt_row_is_skipped_with_a_warning(tmp_path):
  path = tmp_path / "s.db"
  with RunStore(path) as store:
    store.add_many([row(i) for i in range(3)])
  with sqlite3.connect(path) as db:
    db.execute("UPDATE runs SET metrics = '{\"val_accuracy\": 0.5' WHERE id = 2")  # half-written
  with RunStore(path) as store:
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


def test_concurrent_writers_from_separate_processes_lose_no_row(tmp_path):
  path = tmp_path / "shared.db"  # created concurrently by the writers themselves
  ctx = multiprocessing.get_context("spawn")
  procs = [ctx.Process(target=_writer, args=(str(path), w, 50)) for w in range(4)]
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
