"""A sweep across processes on one PostgreSQL store, one worker killed with kill -9.

Four `metaopt sweep --store postgresql://...` workers (separate processes, as on four
hosts) run the same sweep with real training. Worker 0 is killed with SIGKILL while
it trains a unit it claimed, once all four are at work. Checked: every configuration
is stored exactly once, no row lost or duplicated, every run trained (to its end) by
exactly one worker, the killed worker's unit retrained by one survivor after the claim
timeout, and no claim left behind. Each worker logs, with times, the run keys of
every group it starts and finishes (a wrapper around ``sweep.run_group``).

Without ``--store`` a throwaway PostgreSQL server is started from the installed
binaries (tests/pg_server.py; Debian's `postgresql` package) and removed at the end.

    .venv/bin/python benchmarks/bench_sweep_claims.py [--quick] [--store URL]
"""

from __future__ import annotations

import collections
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
import common  # noqa: E402
import pg_server  # noqa: E402

from metaopt.hparams import RunStore  # noqa: E402
from metaopt.hparams import sweep as S  # noqa: E402
from metaopt.hparams.space import Param, Space  # noqa: E402

WORKERS = 4
# The default space with two depths, so that each task has up to two units.
SPACE = Space([Param("learning_rate", "float", 1e-5, 1e-1, log=True),
               Param("batch_size", "categorical", choices=(16, 32, 64, 128)),
               Param("layers", "categorical", choices=(1, 2)),
               Param("dropout", "float", 0.1, 0.5)])
FULL = dict(datasets=["iris", "wine", "breast_cancer", "synthetic_small", "synthetic_easy",
                      "digits"], trials=8, epochs=2, timeout=20.0)
QUICK = dict(datasets=["iris", "wine", "breast_cancer"], trials=4, epochs=1, timeout=10.0)

WORKER = r"""
import json, sys, time
from metaopt import cli
from metaopt.hparams import sweep as S

log = open(sys.argv[1], "a", buffering=1)
real = S.run_group

def logged(store, dataset, model, configs, keys, **kw):
  todo = sorted(keys[i] for i in configs if not store.has(keys[i]))
  log.write(json.dumps({"t": time.time(), "train": todo}) + "\n")
  counts = real(store, dataset, model, configs, keys, **kw)
  log.write(json.dumps({"t": time.time(), "stored": todo}) + "\n")
  return counts

S.run_group = logged
sys.exit(cli.main(sys.argv[2:]))
"""


def events(path: pathlib.Path) -> list[dict]:
  return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def main() -> None:
  args = common.parse_args(__doc__.splitlines()[0], lambda p: p.add_argument(
      "--store", help="an empty PostgreSQL database to use (default: a throwaway server)"))
  cfg = QUICK if args.quick else FULL
  server = None
  if args.store is None:
    reason = pg_server.missing()
    if reason:
      sys.exit(f"cannot start PostgreSQL: {reason}")
    server = pg_server.Server()
    url = server.new_database("bench")
  else:
    url = args.store
  work = pathlib.Path(tempfile.mkdtemp(prefix="bench-sweep-claims-"))
  try:
    result = run(url, cfg, work)
  finally:
    if server is not None:
      server.stop()
  if result["ok"]:
    shutil.rmtree(work)
  else:
    print(f"the workers' logs are in {work}")
  print(common.table(["quantity", "value"], [[k, v] for k, v in result["summary"].items()]))
  print("PASS" if result["ok"] else "FAIL", "- every configuration trained and stored once")
  print(f"wrote {common.write_json('sweep_claims', result, quick=args.quick)}")


def run(url: str, cfg: dict, work: pathlib.Path) -> dict:
  RunStore(url).close()
  (work / "space.json").write_text(json.dumps(SPACE.to_json()))
  command = ["sweep", "--store", url, "--datasets", ",".join(cfg["datasets"]),
             "--models", "mlp", "--trials", str(cfg["trials"]), "--epochs", str(cfg["epochs"]),
             "--space", str(work / "space.json"), "--claim-timeout", str(cfg["timeout"]),
             "--no-progress"]
  # One XLA cache for the four workers, cold: as four processes on one host.
  env = dict(os.environ, METAOPT_XLA_CACHE=str(work / "xla"))
  logs = [work / f"worker{i}.log" for i in range(WORKERS)]
  outs = [open(work / f"worker{i}.out", "w") for i in range(WORKERS)]
  start = time.time()
  procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(logs[i]), *command], env=env,
                            stdout=outs[i], stderr=subprocess.STDOUT) for i in range(WORKERS)]
  killed_at = None
  try:
    while killed_at is None:  # all four at work, the victim inside a unit it claimed
      victim = events(logs[0])
      if all(events(log) for log in logs) and "train" in victim[-1]:
        os.kill(procs[0].pid, signal.SIGKILL)
        killed_at = time.time()
      elif procs[0].poll() is not None or time.time() - start > 1800:
        raise SystemExit("worker 0 finished (or nothing happened) before it could be killed: "
                         + (work / "worker0.out").read_text()[-2000:])
      time.sleep(0.05)
    procs[0].wait()
    codes = [p.wait(timeout=3600) for p in procs[1:]]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  end = time.time()

  planned = {S.run_key(d, "mlp", i, epochs=cfg["epochs"], seed=0, space=SPACE)
             for d in cfg["datasets"] for i in range(cfg["trials"])}
  with RunStore(url) as store:
    runs = store.runs()
    rows = store._conn().execute("SELECT COUNT(*), COUNT(DISTINCT run_key) FROM runs").fetchone()
    claims_left = store._conn().execute("SELECT COUNT(*) FROM claims").fetchone()[0]
  victim = events(logs[0])
  in_flight = set(victim[-1]["train"])
  victim_stored = [k for e in victim for k in e.get("stored", [])]
  survivor_events = [e for log in logs[1:] for e in events(log)]
  survivor_trained = collections.Counter(k for e in survivor_events for k in e.get("train", []))
  completed = collections.Counter(victim_stored)
  completed.update(k for e in survivor_events for k in e.get("stored", []))
  takeover = min((e["t"] for e in survivor_events
                  if in_flight & set(e.get("train", []))), default=math.nan)
  retrained_done = max((e["t"] for e in survivor_events
                        if in_flight & set(e.get("stored", []))), default=math.nan)
  ok = (codes == [0] * (WORKERS - 1) and rows[0] == rows[1] == len(planned)
        and {r.run_key for r in runs} == planned and set(completed) == planned
        and set(completed.values()) == {1} and claims_left == 0
        and not set(victim_stored) & set(survivor_trained)
        and set(survivor_trained.values()) == {1} and in_flight <= set(survivor_trained))
  summary = {
      "configurations planned": len(planned),
      "rows stored / distinct run keys": f"{rows[0]} / {rows[1]}",
      "runs stored by the killed worker before the kill": len(victim_stored),
      "runs it was training when killed (its claimed unit)": len(in_flight),
      "runs trained to the end more than once": sum(c > 1 for c in completed.values()),
      "claim timeout (s)": cfg["timeout"],
      "kill -> a survivor takes the unit over (s)": round(takeover - killed_at, 1),
      "kill -> that unit stored (s)": round(retrained_done - killed_at, 1),
      "wall time of the sweep (s)": round(end - start, 1),
      "claims left in the claims table": claims_left,
      "survivors' exit codes": codes,
      "runs stored by each survivor": [sum(len(e.get("stored", [])) for e in events(log))
                                       for log in logs[1:]],
  }
  return dict(ok=ok, summary=summary, config=dict(cfg, workers=WORKERS, space=SPACE.to_json()),
              killed_after=round(killed_at - start, 1))


if __name__ == "__main__":
  main()
