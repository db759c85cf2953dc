"""Scaling meta-training: memory and throughput vs population, sharded vs one device.

1. One device: a lane's meta-gradient segment (``MetaTrainer``'s vmapped TBPTT
   over the population) for populations of 8, 64 and 512, plain vmap and chunked
   (``chunk_size=8``): XLA's temp buffer size (``compiled.memory_analysis()``),
   time per segment (interleaved with the other variant, median) and tasks per
   second, and the largest relative difference of the chunked meta-gradient.
2. Forced CPU devices (a subprocess per device count with
   ``XLA_FLAGS=--xla_force_host_platform_device_count=N``): ``meta_train`` for 20
   meta steps with ``sharding="auto"`` and without, in the same process; the largest
   relative difference of ``theta``, and the wall time of each run (compiles included).
   The same for a MAML meta-step on a meta-batch of 16 tasks.
3. Two processes on localhost (``jax.distributed`` over gloo, 2 CPU devices each)
   against one process: ``theta`` after 20 meta steps.

The CPU devices share the machine's 2 cores, so sharding cannot be faster here; the
device counts test correctness and the cost of the inserted collectives.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np

import common
from metaopt.meta.lr import MetaLRConfig, MetaTrainer
from metaopt.tasks import task_family

NAME = "bench_scaling"
FAMILY = dict(datasets=("digits",), widths=(32,), depths=(1,), batch_sizes=(32,),
              total_steps=(100,))
CHUNK = 8

# Meta-training sharded and not in one process with N forced devices; a MAML step too.
DEVICES_SCRIPT = textwrap.dedent("""
  import json, sys, time
  import jax, jax.numpy as jnp, numpy as np, optax
  from metaopt.meta.lr import MetaLRConfig, meta_train
  from metaopt.meta.maml import maml
  from metaopt.tasks import task_family
  family = task_family(**json.loads(sys.argv[1]))
  population, steps = int(sys.argv[2]), int(sys.argv[3])
  config = MetaLRConfig(family=family, lanes=2, population=population, segment_length=10,
                        meta_steps=steps, seed=0)
  def rel(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))
                     / np.max(np.abs(np.asarray(x)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  out = {"devices": jax.device_count()}
  runs = {}
  for name, sharding in (("one", None), ("sharded", "auto")):
    start = time.perf_counter()
    runs[name] = meta_train(config, progress=False, sharding=sharding).theta
    out[f"{name}_seconds"] = time.perf_counter() - start
  out["theta_rel_diff"] = rel(runs["one"], runs["sharded"])
  def loss_fn(p, b):
    return jnp.mean((jnp.tanh(b["x"] @ p["w1"]) @ p["w2"] - b["y"]) ** 2)
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  params = {"w1": jax.random.normal(k[0], (1, 40)), "w2": jax.random.normal(k[1], (40, 1))}
  x = jax.random.uniform(k[2], (16, 10, 1), minval=-5, maxval=5)
  episode = {"x": x, "y": jnp.sin(x + jax.random.uniform(k[3], (16, 1, 1), maxval=3))}
  grads = {}
  for name, sharding in (("one", None), ("sharded", "auto")):
    m = maml(loss_fn, inner_lr=0.01, inner_steps=5, sharding=sharding)
    grads[name] = jax.jit(m.meta_gradient)(m.init(params).theta, episode, episode)[1]
  out["maml_grad_rel_diff"] = rel(grads["one"], grads["sharded"])
  print("RESULT " + json.dumps(out), flush=True)
""")

# One process of a (possibly multi-process) run: theta after `steps` meta steps.
PROCESS_SCRIPT = textwrap.dedent("""
  import json, sys
  import jax, numpy as np
  from metaopt import sharding
  layout = sharding.initialize()
  from metaopt.meta.lr import MetaLRConfig, meta_train
  from metaopt.tasks import task_family
  family = task_family(**json.loads(sys.argv[1]))
  config = MetaLRConfig(family=family, lanes=2, population=4, segment_length=10,
                        meta_steps=int(sys.argv[2]), seed=0)
  theta = meta_train(config, progress=False,
                     sharding="auto" if layout.count > 1 else None).theta
  print("RESULT " + json.dumps({"process": layout.index, "devices": jax.device_count(),
        "theta": [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(theta)]}),
        flush=True)
""")


def result_line(text: str) -> dict:
  lines = [l for l in text.splitlines() if l.startswith("RESULT ")]
  if not lines:
    raise RuntimeError(text[-3000:])
  return json.loads(lines[-1][len("RESULT "):])


def cpu_env(**extra) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu", METAOPT_XLA_CACHE="", **extra)


def segment_variant(population: int, chunk_size):
  """The compiled segment of lane 0 and a zero-argument call of it."""
  config = MetaLRConfig(family=task_family(**FAMILY), lanes=1, population=population,
                        segment_length=10, seed=0)
  trainer = MetaTrainer(config, chunk_size=chunk_size)
  state, _ = trainer.initial()
  task = trainer._task(0, 0)
  args = (common.random_theta(state["theta"], jax.random.PRNGKey(1)), state["lanes"][0],
          task.arrays(), np.float32(task.config.total_steps), np.int32(task.config.batch_size))
  compiled = trainer._fns_for(task).segment.lower(*args).compile()
  return compiled, (lambda: compiled(*args))


def memory_and_throughput(populations, repeats) -> list[dict]:
  rows = []
  for p in populations:
    variants = {"vmap": None, f"chunk {CHUNK}": CHUNK}
    built = {name: segment_variant(p, c) for name, c in variants.items()}
    grads = {name: call()[1] for name, (_, call) in built.items()}
    ref = jax.tree.leaves(grads["vmap"])
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(a))))
               for a, b in zip(ref, jax.tree.leaves(grads[f"chunk {CHUNK}"])))
    stats = common.interleaved({n: call for n, (_, call) in built.items()}, repeats=repeats)
    for name, (compiled, _) in built.items():
      mem = compiled.memory_analysis()
      rows.append(dict(population=p, variant=name, temp_bytes=int(mem.temp_size_in_bytes),
                       temp_bytes_per_task=mem.temp_size_in_bytes / p,
                       seconds=stats[name]["median"], spread=stats[name]["spread"],
                       tasks_per_second=p / stats[name]["median"],
                       chunk_rel_diff=diff))
      print(f"population {p} {name}: temp {common.fmt_bytes(mem.temp_size_in_bytes)}, "
            f"{common.fmt_time(stats[name]['median'])} per segment", flush=True)
  return rows


def forced_devices(devices: int, steps: int) -> dict:
  done = subprocess.run(
      [sys.executable, "-c", DEVICES_SCRIPT, json.dumps(FAMILY), str(devices), str(steps)],
      capture_output=True, text=True,
      env=cpu_env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"))
  return result_line(done.stdout + done.stderr)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def two_processes(steps: int) -> dict:
  """theta of a 2-process run (2 CPU devices each) vs one process, one device."""
  cmd = [sys.executable, "-c", PROCESS_SCRIPT, json.dumps(FAMILY), str(steps)]
  start = time.perf_counter()
  single = result_line(subprocess.run(cmd, capture_output=True, text=True,
                                      env=cpu_env()).stdout)
  single_seconds = time.perf_counter() - start
  port = free_port()
  start = time.perf_counter()
  procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=cpu_env(JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                        JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                                        XLA_FLAGS="--xla_force_host_platform_device_count=2"))
           for i in range(2)]
  outs = [result_line(p.communicate(timeout=1800)[0]) for p in procs]
  multi_seconds = time.perf_counter() - start
  diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(a))))
             for o in outs for a, b in zip(single["theta"], o["theta"]))
  return dict(processes=2, global_devices=outs[0]["devices"], theta_rel_diff=diff,
              one_process_seconds=single_seconds, two_process_seconds=multi_seconds)


def main():
  args = common.parse_args(__doc__.splitlines()[0], lambda p: p.add_argument(
      "--devices", type=int, nargs="+", default=[4, 8], help="forced CPU device counts"))
  populations = [8, 32] if args.quick else [8, 64, 512]
  steps = 2 if args.quick else 20
  memory = memory_and_throughput(populations, args.repeats)
  sharded = [forced_devices(n, steps) for n in args.devices]
  for s in sharded:
    print(f"{s['devices']} devices: theta rel diff {s['theta_rel_diff']:.2e}, "
          f"MAML grad rel diff {s['maml_grad_rel_diff']:.2e}", flush=True)
  multi = two_processes(steps)
  print(common.table(
      ["population", "variant", "XLA temp", "temp / task", "time / segment", "tasks / s",
       "chunked vs vmap (rel)"],
      [[r["population"], r["variant"], common.fmt_bytes(r["temp_bytes"]),
        common.fmt_bytes(r["temp_bytes_per_task"]), common.fmt_time(r["seconds"]),
        f"{r['tasks_per_second']:.0f}", f"{r['chunk_rel_diff']:.1e}"] for r in memory]))
  print()
  print(common.table(
      ["devices", f"theta after {steps} meta steps (rel diff)", "MAML meta-gradient (rel diff)",
       "1 device (s)", "sharded (s)"],
      [[s["devices"], f"{s['theta_rel_diff']:.1e}", f"{s['maml_grad_rel_diff']:.1e}",
        f"{s['one_seconds']:.1f}", f"{s['sharded_seconds']:.1f}"] for s in sharded]))
  print(f"\n2 processes x 2 devices vs 1 process: theta rel diff {multi['theta_rel_diff']:.1e} "
        f"({multi['two_process_seconds']:.1f} s vs {multi['one_process_seconds']:.1f} s)")
  path = common.write_json(NAME, dict(chunk_size=CHUNK, family=FAMILY, meta_steps=steps,
                                      memory=memory, sharded=sharded, two_processes=multi),
                           quick=args.quick)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
