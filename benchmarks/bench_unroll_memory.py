"""Peak memory of a meta-gradient through a long unroll, with and without remat.

``estimators.tbptt(lr_problem(...), theta, state, None, None, length=T, remat=r)``
with T = 1000 (the learned-LR inner problem; the meta-gradient reaches theta
through all T steps), for r = False and r = True. Memory is measured two ways:
  * XLA's buffer assignment: ``jax.jit(f).lower(...).compile().memory_analysis()``;
  * peak RSS growth of a fresh subprocess per variant: compile, reset the RSS
    high-water mark, run once; ``ru_maxrss`` minus the resident set before the run.
The compute-time cost of remat is timed in this process (interleaved, median).
No target beyond: remat should use less memory.
"""

from __future__ import annotations

import gc
import json
import resource
import subprocess
import sys
import time

import jax

import common
from metaopt import estimators

from metaopt.tasks import TaskConfig

NAME = "bench_unroll_memory"
TASKS = {"digits": TaskConfig("digits", "mlp", 64, 2, 32, 1000, 0),
         "mnist5k": TaskConfig("mnist5k", "mlp", 64, 2, 64, 1000, 0)}
TIMED = "digits"  # the task whose compute time is measured
MEMORY_FIELDS = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
                 "alias_size_in_bytes", "generated_code_size_in_bytes", "peak_memory_in_bytes")


def build(task_name: str, T: int, remat: bool):
  """The compiled meta-gradient and a zero-argument call of it."""
  config = TASKS[task_name]
  setup = common.learned_lr_setup(config, float(config.total_steps))
  theta, state, arrays, problem = setup.theta, setup.state, setup.arrays, setup.problem
  jax.block_until_ready((theta, state, arrays))
  fn = lambda th, s, a: estimators.tbptt(problem(a), th, s, None, None, length=T, remat=remat)
  compiled = jax.jit(fn).lower(theta, state, arrays).compile()
  return compiled, (lambda: compiled(theta, state, arrays))


def memory_stats(compiled) -> dict:
  stats = compiled.memory_analysis()
  return {f: int(getattr(stats, f)) for f in MEMORY_FIELDS if hasattr(stats, f)}


def current_rss_bytes() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  return 0


def reset_peak_rss() -> bool:
  """Resets the process's RSS high-water mark (Linux >= 4.0); False if not possible."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def child(task_name: str, T: int, remat: bool) -> None:
  """Subprocess body: compile, then one execution; print RSS numbers as JSON.

  The high-water mark is reset after compiling, so ``ru_maxrss`` afterwards is
  the peak of the execution alone; growth = that peak - the RSS just before it.
  """
  compiled, call = build(task_name, T, remat)
  gc.collect()
  time.sleep(0.5)  # let background compile/dispatch threads settle
  reset = reset_peak_rss()
  before = current_rss_bytes()
  before_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  jax.block_until_ready(call())
  after_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print("RESULT " + json.dumps(dict(
      rss_before=before, peak_before=before_peak, peak_after=after_peak,
      growth=after_peak - before, peak_was_reset=reset,
      # If the run did not set a new high-water mark, growth is only an upper bound.
      growth_is_upper_bound=after_peak <= before_peak)))


def rss_in_subprocess(task_name: str, T: int, remat: bool) -> dict:
  cmd = [sys.executable, __file__, "--child", task_name, "--length", str(T)]
  cmd += ["--remat"] if remat else []
  out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
  line = [l for l in out.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


def extra_args(parser):
  parser.add_argument("--child", default=None,
                      help="internal: run one variant (a task name) for the RSS measurement")
  parser.add_argument("--length", type=int, default=None, help="unroll length T")
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--no-rss", action="store_true", help="skip the RSS subprocesses")


def main():
  args = common.parse_args(__doc__.splitlines()[0], extra_args)
  T = args.length or (100 if args.quick else 1000)
  if args.child:
    return child(args.child, T, args.remat)

  results, rows, calls = {}, [], {}
  for name in TASKS:
    for remat in (False, True):
      variant = f"{name} remat={remat}"
      compiled, call = build(name, T, remat)
      mem = memory_stats(compiled)
      rss = None if args.no_rss else rss_in_subprocess(name, T, remat)
      results[variant] = dict(task=TASKS[name]._asdict(), T=T, remat=remat,
                              memory_analysis=mem, rss=rss)
      if name == TIMED:
        calls["remat" if remat else "no_remat"] = call
      rss_text = "-" if rss is None else (common.fmt_bytes(rss["growth"]) +
                                          (" (upper bound)" if rss["growth_is_upper_bound"] else ""))
      rows.append([variant, common.fmt_bytes(mem["temp_size_in_bytes"]),
                   common.fmt_bytes(mem["argument_size_in_bytes"]),
                   common.fmt_bytes(mem["output_size_in_bytes"]),
                   common.fmt_bytes(mem.get("peak_memory_in_bytes", float("nan"))), rss_text])
      print(f"done {variant}", flush=True)

  stats = common.interleaved(calls, repeats=args.repeats)
  time_ratio = common.ratio(stats, "remat", "no_remat")
  summary = []
  for name in TASKS:
    off, on = results[f"{name} remat=False"], results[f"{name} remat=True"]
    temp = on["memory_analysis"]["temp_size_in_bytes"] / off["memory_analysis"]["temp_size_in_bytes"]
    rss = (None if off["rss"] is None else on["rss"]["growth"] / max(off["rss"]["growth"], 1))
    verdict = "PASS" if temp < 1 and (rss is None or rss < 1) else "FAIL"
    summary.append(dict(task=name, temp_ratio=temp, rss_growth_ratio=rss, status=verdict))

  print(f"\nMeta-gradient through a {T}-step learned-LR unroll (estimators.tbptt, length={T})\n")
  print(common.table(["variant", "XLA temp", "arguments", "outputs", "XLA peak*",
                      "RSS growth (subprocess)"], rows))
  print()
  print(common.table(["task", "remat/no-remat XLA temp", "remat/no-remat RSS growth",
                      "remat uses less memory"],
                     [[s["task"], f"{s['temp_ratio']:.3f}",
                       "-" if s["rss_growth_ratio"] is None else f"{s['rss_growth_ratio']:.3f}",
                       s["status"]] for s in summary]))
  print(f"\nCompute time ({TASKS[TIMED].name}, median of {args.repeats} interleaved repeats): "
        f"no remat {common.fmt_time(stats['no_remat']['median'])}, "
        f"remat {common.fmt_time(stats['remat']['median'])}, ratio {time_ratio['ratio']:.3f} "
        f"(paired {time_ratio['paired_median']:.3f})")
  print("memory_analysis() fields (all in the JSON): " + ", ".join(
      f"{k}={common.fmt_bytes(v)}" for k, v in results[f"{TIMED} remat=False"]["memory_analysis"].items()))
  print("* peak_memory_in_bytes as reported by the CPU backend (it leaves out temp buffers).")
  if note := common.spread_note(stats):
    print(note)
  path = common.write_json(NAME, dict(repeats=args.repeats, T=T,
                                      results=results, summary=summary,
                                      timing=dict(task=TIMED, stats=stats, ratio=time_ratio)), quick=args.quick)
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
