"""Sweeps on a PostgreSQL store: workers claim runs (no run twice), the claims of a killed
worker go to another one after the timeout, bad store URLs are one line.

Training is replaced by a stand-in returning train_grid's shapes (as in test_sweep.py):
what is tested here is who trains what, and that takes seconds this way."""

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import metaopt.train
from metaopt import cli
from metaopt.hparams import RunStore
from metaopt.hparams import db as db_lib
from metaopt.hparams import sweep as S
from metaopt.hparams.space import Param, Space
from metaopt.hparams.store import Claims
from metaopt.train import TrainResult

# Two widths: each task has two units (groups of runs sharing one compiled program; the
# depths share one, masked).
SPACE = Space([Param("learning_rate", "float", 1e-3, 1e-1, log=True),
               Param("batch_size", "categorical", choices=(16, 32)),
               Param("layers", "categorical", choices=(1, 2)),
               Param("width", "categorical", choices=(8, 16))])


def fake_train_grid(task, make_tx, hparams, keys, *, steps, eval_every, **kw):
  """train_grid's result shapes without training: every run completes at accuracy 0.5."""
  n, evals = keys.shape[0], steps // eval_every + 1
  if kw.get("capacity"):  # a padded program: eval_every real steps of each capacity slots
    eval_every = int(kw["arrays"]["eval_every"])
  full = lambda value, width: np.full((n, width), value, np.float32)
  return TrainResult(train_loss=full(1.0, steps), learning_rate=full(1e-3, steps),
                     eval_steps=np.tile(np.arange(evals) * eval_every, (n, 1)),
                     val_loss=full(1.0, evals), val_accuracy=full(0.5, evals),
                     test_loss=full(1.0, evals), test_accuracy=full(0.5, evals),
                     stopped_at=None), 0.01


def _stored(store, keys):
  store.add_many([dict(task="t", task_features={}, hparams={}, metrics={}, run_key=k)
                  for k in keys])


def test_claims_hand_out_each_run_once_and_stale_claims_again(postgres_server, tmp_path):
  url = postgres_server.new_database()
  with RunStore(url) as one, RunStore(url) as two:
    a, b = Claims(one, "a", timeout=0.6), Claims(two, "b", timeout=0.6)
    plan = [(f"k{i}", f"u{i % 2}", i) for i in range(6)]
    a.plan(plan)
    b.plan(plan)  # every worker plans the same runs: recorded once
    unit_a, got_a = a.take(["u0", "u1"], 10)
    unit_b, got_b = b.take(["u0", "u1"], 10)
    assert {unit_a, unit_b} == {"u0", "u1"} and len(got_a) == len(got_b) == 3
    assert not {k for k, _ in got_a} & {k for k, _ in got_b}
    assert a.take(["u0", "u1"], 10) == (None, []) and a.unfinished(["u0", "u1"]) == 6
    # a stores its runs; b keeps renewing its claims while a waits, then stops renewing.
    _stored(one, [k for k, _ in got_a])
    a.finish([k for k, _ in got_a])
    assert a.unfinished(["u0", "u1"]) == 3
    for _ in range(3):
      time.sleep(0.3)
      assert b.renew() == 3 and a.take(["u0", "u1"], 10) == (None, [])
    time.sleep(0.8)  # b died: its claims are stale
    unit, got = a.take(["u0", "u1"], 2)
    assert unit == unit_b and got == got_b[:2]  # at most `limit` runs, in trial order
    assert b.renew() == 1  # b lost the two runs a took over
    b.release()  # b stops early: its last run is free at once
    assert a.take(["u0", "u1"], 10) == (unit_b, got_b[2:])
    a.forget_finished(["u0", "u1"])
    assert a.unfinished(["u0", "u1"]) == 3
  with RunStore(postgres_server.new_database()) as fresh:
    assert fresh.runs() == []
  with pytest.raises(ValueError, match="claims need a PostgreSQL run store"):
    Claims(RunStore(tmp_path / "x.db"), "a", 1.0)


WORKER = r"""
import json, sys, time
import numpy as np
import metaopt.train
from metaopt.hparams import sweep as S
from metaopt.hparams.space import Space
from metaopt.train import TrainResult

url, space, log_path, delay, timeout, gate = sys.argv[1:7]
log = open(log_path, "a", buffering=1)
while gate and not open(gate).read():  # started with the others; sweeps once the victim works
  time.sleep(0.05)

def fake_train_grid(task, make_tx, hparams, keys, *, steps, eval_every, **kw):
  n, evals = keys.shape[0], steps // eval_every + 1
  if kw.get("capacity"):  # a padded program: eval_every real steps of each capacity slots
    eval_every = int(kw["arrays"]["eval_every"])
  full = lambda value, width: np.full((n, width), value, np.float32)
  return TrainResult(full(1.0, steps), full(1e-3, steps),
                     np.tile(np.arange(evals) * eval_every, (n, 1)), full(1.0, evals),
                     full(0.5, evals), full(1.0, evals), full(0.5, evals)), 0.01

real = S.run_group
def logged(store, dataset, model, configs, keys, **kw):
  todo = sorted(keys[i] for i in configs if not store.has(keys[i]))
  log.write(json.dumps({"train": todo}) + "\n")
  time.sleep(float(delay))
  counts = real(store, dataset, model, configs, keys, **kw)
  log.write(json.dumps({"stored": todo}) + "\n")
  return counts

S.run_group = logged
metaopt.train.train_grid = fake_train_grid
report = S.sweep(url, datasets=["iris", "wine", "breast_cancer"], models=["mlp"],
                 space=Space.from_json(json.loads(space)), trials_per_task=6, epochs=1,
                 progress=False, claim_timeout=float(timeout))
log.write(json.dumps({"report": report._asdict()}) + "\n")
"""


def _lines(path):
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for(check, procs, timeout=90):
  end = time.monotonic() + timeout
  while not check():
    for p, log in procs:
      assert p.poll() is None, log.read_text()
    assert time.monotonic() < end, "timed out"
    time.sleep(0.05)


@pytest.mark.slow
def test_four_workers_one_killed_train_every_configuration_once(postgres_server, tmp_path):
  url = postgres_server.new_database()
  RunStore(url).close()
  space = json.dumps(SPACE.to_json())
  timeout = 3.0

  logs = [tmp_path / f"worker{i}.log" for i in range(4)]
  logs[0].write_text("")

  def start(i, delay, gate):
    out = open(tmp_path / f"worker{i}.out", "w")
    p = subprocess.Popen([sys.executable, "-c", WORKER, url, space, str(logs[i]), str(delay),
                          str(timeout), gate], stdout=out, stderr=subprocess.STDOUT)
    return p, tmp_path / f"worker{i}.out"

  # The victim is killed while it trains its first unit, once the three others (which
  # start sweeping when the victim holds its first claim) are at work too.
  procs = [start(0, 600, "")] + [start(i, 0.3, str(logs[0])) for i in (1, 2, 3)]
  try:
    _wait_for(lambda: all(_lines(log) for log in logs), procs)
    os.kill(procs[0][0].pid, signal.SIGKILL)
    procs[0][0].wait()
    for p, out in procs[1:]:
      assert p.wait(timeout=120) == 0, out.read_text()
  finally:
    for p, _ in procs:
      if p.poll() is None:
        p.kill()
        p.wait()

  keys = {S.run_key(d, "mlp", i, epochs=1, seed=0, space=SPACE)
          for d in ("iris", "wine", "breast_cancer") for i in range(6)}
  with RunStore(url) as store:
    runs = store.runs()
    claims_left = store._conn().execute("SELECT COUNT(*) FROM claims").fetchone()[0]
  assert len(runs) == 18 and {r.run_key for r in runs} == keys  # none lost or duplicated
  assert {r.status for r in runs} == {"completed"} and claims_left == 0
  victim = _lines(logs[0])
  assert [list(e) for e in victim] == [["train"]]  # killed mid-run, nothing stored
  survivors = [e for log in logs[1:] for e in _lines(log)]
  trained = collections.Counter(k for e in survivors for k in e.get("train", []))
  assert set(trained) == keys and set(trained.values()) == {1}   # each trained once
  assert set(victim[0]["train"]) <= set(trained)                 # the victim's, retrained
  reports = [e["report"] for e in survivors if "report" in e]
  assert len(reports) == 3 and sum(r["added"] for r in reports) == 18
  assert all(r["added"] + r["skipped"] == 18 for r in reports)


def test_sweep_into_postgres_resumes_and_bad_stores_are_one_line(postgres_server, tmp_path,
                                                                  capsys, monkeypatch):
  monkeypatch.setattr(metaopt.train, "train_grid", fake_train_grid)
  url = postgres_server.new_database()
  (tmp_path / "space.json").write_text(json.dumps(SPACE.to_json()))
  args = ["sweep", "--store", url, "--datasets", "iris", "--models", "mlp", "--trials", "3",
          "--epochs", "1", "--space", str(tmp_path / "space.json"), "--no-progress",
          "--claim-timeout", "5"]
  assert cli.main(args) == 0
  assert "3 runs added (0 diverged, 0 failed), 0 already in the store" in capsys.readouterr().out
  assert cli.main(args) == 0  # resumed: nothing to do
  assert "0 runs added (0 diverged, 0 failed), 3 already in the store" in \
      capsys.readouterr().out
  with RunStore(url, create=False) as store:
    assert len(store) == 3

  with socket.socket() as s:  # a port nothing listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  monkeypatch.setattr(db_lib, "RETRY_DELAYS", (0.05,))
  newer = postgres_server.new_database()
  RunStore(newer).close()
  with RunStore(newer) as store:
    store._conn().execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
  for store, needle in [
      ("mysql://bob:hunter2@db/runs", "unknown database URL scheme 'mysql' in "
       "'mysql://bob:***@db/runs'; accepted: a file path, sqlite:///PATH"),
      (f"postgresql://bob:hunter2@127.0.0.1:{port}/runs", "cannot reach the PostgreSQL server "
       f"of run store 'postgresql://bob:***@127.0.0.1:{port}/runs' at 127.0.0.1:{port} after 2 "
       "attempts"),
      (newer, "has run store schema version 2, newer than version 1 that this metaopt reads"),
  ]:
    assert cli.main(["sweep", "--store", store, "--quick", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metaopt: error: ") and err.count("\n") == 1 and needle in err, err
    assert "hunter2" not in err
  assert cli.main(["sweep", "--store", url, "--quick", "--claim-timeout", "0"]) == 2
  assert "--claim-timeout: 0 is outside (0, 604800]" in capsys.readouterr().err
  with pytest.raises(ValueError, match="claim_timeout must be a number of seconds in"):
    S.sweep(url, datasets=["iris"], models=["mlp"], claim_timeout=float("nan"))
