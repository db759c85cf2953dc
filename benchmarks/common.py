"""Shared helpers for the benchmark scripts: interleaved timing, tables, JSON output.

Timing method: every candidate is a zero-argument callable around an already
jitted and compiled function. Each one is warmed up, then the callables are
measured in turn (A B A B ...) for ``repeats`` rounds. One measurement runs the
callable ``n`` times back to back, ``n`` chosen so it lasts >= ``min_seconds``,
and records the mean time per call. We report the median over rounds, and
ratios of medians (plus the median of the per-round ratios, which cancels slow
drifts in machine load that hit both sides of a round alike).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import time
from typing import Any, Callable

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "results" / "benchmarks"
NOISY_SPREAD = 0.10  # relative interquartile range above which a timing is flagged
# Set by tests/test_docs.py: parse a documented command's arguments, then exit 0 unrun.
CHECK_ARGS_ONLY = "METAOPT_BENCH_CHECK_ARGS"


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None):
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--quick", action="store_true",
                      help="smoke mode: small sizes, few repeats (numbers not meaningful)")
  parser.add_argument("--repeats", type=int, default=None,
                      help="timing rounds per candidate (default 15, 3 with --quick)")
  if extra is not None:
    extra(parser)
  args = parser.parse_args()
  if os.environ.get(CHECK_ARGS_ONLY):
    raise SystemExit(0)
  if args.repeats is None:
    args.repeats = 3 if args.quick else 15
  return args


def _per_call(fn: Callable[[], Any], n: int) -> float:
  start = time.perf_counter()
  for _ in range(n):
    jax.block_until_ready(fn())
  return (time.perf_counter() - start) / n


def interleaved(fns: dict[str, Callable[[], Any]], *, repeats: int = 15,
                min_seconds: float = 0.05) -> dict[str, dict]:
  """Times each callable in interleaved rounds; returns per-name statistics (seconds)."""
  calls = {}
  for name, fn in fns.items():
    jax.block_until_ready(fn())   # compile (if not already) and warm up
    jax.block_until_ready(fn())
    one = _per_call(fn, 1)
    calls[name] = max(1, math.ceil(min_seconds / max(one, 1e-9)))
  samples: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      samples[name].append(_per_call(fn, calls[name]))
  stats = {}
  for name, xs in samples.items():
    xs = np.asarray(xs)
    q25, med, q75 = np.percentile(xs, [25, 50, 75])
    stats[name] = dict(median=float(med), q25=float(q25), q75=float(q75),
                       min=float(xs.min()), max=float(xs.max()),
                       spread=float((q75 - q25) / med), calls_per_repeat=calls[name],
                       repeats=len(xs), samples=xs.tolist())
  return stats


def ratio(stats: dict, candidate: str, reference: str) -> dict:
  """Candidate/reference time ratio: of the medians, and the median per-round ratio."""
  a, b = stats[candidate], stats[reference]
  paired = np.asarray(a["samples"]) / np.asarray(b["samples"])
  return dict(ratio=a["median"] / b["median"], paired_median=float(np.median(paired)),
              paired_q25=float(np.percentile(paired, 25)),
              paired_q75=float(np.percentile(paired, 75)),
              noisy=bool(a["spread"] > NOISY_SPREAD or b["spread"] > NOISY_SPREAD))


def verdict(value: float, target: float) -> str:
  return "PASS" if value <= target else "FAIL"


def fmt_time(seconds: float) -> str:
  for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
    if seconds >= scale:
      return f"{seconds / scale:.3g} {unit}"
  return f"{seconds / 1e-9:.3g} ns"


def fmt_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1024


def table(headers: list[str], rows: list[list[Any]]) -> str:
  """A Markdown table (also readable in a terminal)."""
  cells = [[str(c) for c in r] for r in [headers] + rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
  line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
  sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def spread_note(stats: dict) -> str:
  noisy = [f"{k} ({v['spread']:.0%})" for k, v in stats.items() if v["spread"] > NOISY_SPREAD]
  if not noisy:
    return ""
  return ("note: large spread (IQR/median > {:.0%}) for: {}; another process may have "
          "been using the CPUs, trust the paired ratios more.".format(NOISY_SPREAD,
                                                                      ", ".join(noisy)))


def environment() -> dict:
  return dict(jax=jax.__version__, backend=jax.default_backend(),
              devices=[str(d) for d in jax.devices()], cpu_count=os.cpu_count(),
              platform=platform.platform(), python=platform.python_version(),
              loadavg=list(os.getloadavg()))


def write_json(name: str, data: dict, *, quick: bool = False) -> pathlib.Path:
  """Writes results/benchmarks/<name>.json (<name>.quick.json for smoke runs)."""
  RESULTS_DIR.mkdir(parents=True, exist_ok=True)
  path = RESULTS_DIR / f"{name}{'.quick' if quick else ''}.json"
  stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
  data = dict({"quick": quick}, **data, environment=dict(environment(), time=stamp))
  path.write_text(json.dumps(data, indent=2) + "\n")
  return path


def random_theta(theta: Any, key: jax.Array, scale: float = 0.1) -> Any:
  """Controller weights replaced by N(0, scale^2) draws (non-zero output layer)."""
  leaves, treedef = jax.tree.flatten(theta)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape, x.dtype)
                                      for k, x in zip(keys, leaves)])


def initial_run_state(task, tx):
  """A fresh ``metaopt.train.RunState`` of ``task`` with ``tx``; a stateful model's (BatchNorm)
  statistics travel in ``model_state``."""
  import jax.numpy as jnp
  from metaopt.train import RunState

  variables = task.init_variables(jax.random.PRNGKey(0))
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k != "params"} if task.stateful else None
  return RunState(params, tx.init(params), jax.random.PRNGKey(1), jnp.zeros((), jnp.int32),
                  model_state=model_state)


def scanned_training(task, tx, steps: int) -> Callable[[], Any]:
  """A compiled ``run() -> final state`` of ``steps`` training steps of ``task`` with ``tx``."""
  import metaopt
  from metaopt.train import training_step

  arrays = task.arrays()
  state = initial_run_state(task, tx)
  step = training_step(task, tx, arrays)
  run = jax.jit(lambda state, arrays: metaopt.unroll(step, None, state, None, length=steps))
  compiled = run.lower(state, arrays).compile()
  return lambda: compiled(state, arrays)


def learned_lr_setup(config, total_steps: float):
  """The learned-LR inner problem on ``config`` with a random non-zero controller:
  a namespace of task, arrays, controller, meta_config, theta, problem(arrays), state."""
  import metaopt
  from metaopt.meta.lr import MetaLRConfig, lr_problem
  from metaopt.tasks import make_task, task_family

  task = make_task(config)
  arrays = task.arrays()
  meta_config = MetaLRConfig(family=task_family([config.dataset]))
  controller = metaopt.LRController(hidden=meta_config.hidden)
  theta = random_theta(metaopt.init_controller(jax.random.PRNGKey(0), controller),
                       jax.random.PRNGKey(42))
  problem = lambda a: lr_problem(task, a, controller, meta_config, total_steps)
  state = jax.jit(lambda th, k, a: problem(a).init(th, k))(theta, jax.random.PRNGKey(1), arrays)
  return argparse.Namespace(task=task, arrays=arrays, controller=controller,
                            meta_config=meta_config, theta=theta, problem=problem, state=state)
