"""Per-step cost of training with the learned LR transform versus plain Adam + cosine.

Candidates, on every shape below:
  learned_lr:    optax.chain(scale_by_adam(), metaopt.scale_by_learned_lr(LRController(),
                 theta, learning_rate=1e-3, total_steps=N)), theta random (non-zero output layer);
  pretrained_lr: optax.chain(scale_by_adam(), metaopt.pretrained_lr(total_steps=N)), the
                 shipped controller (since 2026-12-02 it reads no norm feature, so it skips
                 the norm of the update that learned_lr computes);
  hd_adam:       metaopt.hypergradient_adam(1e-3) (its reference is optax.adam(1e-3)).
References: adam_cosine = optax.adam(optax.cosine_decay_schedule(1e-3, N)); adam = optax.adam(1e-3).
All run the same jitted training step (sample batch, forward, backward, update) as a
lax.scan of 500 steps (50 for the stand-ins) via metaopt.train.training_step + metaopt.unroll, compiled
before timing, interleaved (A B C D E A B ...), median of the rounds, on two clocks:
wall time, and this process's CPU time (all threads), which a machine shared with
other jobs disturbs much less. Each shape's numbers go to
results/benchmarks/bench_learned_lr_overhead/<shape>.json; ``--shapes 0,2`` runs some of
them (e.g. one process per shape), and the table covers every shape measured so far.
Shapes: the held-out tasks of the lr-schedule experiment (relu MLPs at batch 32 and the
ResNet, encoder and speech stand-ins; N their training lengths), a wide tanh MLP at batch 16 (N = 1,500; outside every benchmark and
experiment), and the MNIST MLP at batch 128 this benchmark started with.
Target: learned_lr / adam_cosine and pretrained_lr / adam_cosine <= 1.03 on every shape
(paired CPU-time ratio; an earlier target was 1.05 on the batch-128 MLP only).

--ablate adds, on every shape, the pieces of the learned LR's cost (see ``ablations``);
--profile times nothing and counts, for every optimizer and piece, the XLA ops of the
compiled step and the bytes it accesses.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import common
import metaopt
from metaopt.experiments.lr_schedule import HELDOUT
from metaopt.tasks import TaskConfig, make_task

NAME = "bench_learned_lr_overhead"
TARGET = 1.03
LR = 1e-3


class TanhMLP(nn.Module):
  """Flatten, Dense+tanh per hidden width, Dense to logits (a model no task family has)."""
  widths: tuple[int, ...]
  classes: int

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    for w in self.widths:
      x = nn.tanh(nn.Dense(w)(x))
    return nn.Dense(self.classes)(x)


def tanh_task(config: TaskConfig):
  """``config``'s task (its data, batch and length) with a tanh MLP of its width and depth."""
  task = make_task(config)
  classes = int(task.data.y_train.max()) + 1
  return dataclasses.replace(task, model=TanhMLP((config.width,) * config.depth, classes))


SHAPES = {  # label -> (task config, model builder)
    **{f"held-out {c.dataset} {'relu' if c.model == 'mlp' else c.model} {c.width}x{c.depth} "
       f"b{c.batch_size}": (c, make_task) for c in HELDOUT},
    "wide tanh mnist5k 1024x2 b16": (TaskConfig("mnist5k", "mlp", 1024, 2, 16, 1500, 0),
                                     tanh_task),
    "mnist5k relu 256x2 b128": (TaskConfig("mnist5k", "mlp", 256, 2, 128, 1000, 0), make_task),
}


def candidates(total_steps: int, theta) -> dict:
  controller = metaopt.LRController()
  return {
      "adam_cosine": lambda: optax.adam(optax.cosine_decay_schedule(LR, total_steps)),
      "learned_lr": lambda: optax.chain(optax.scale_by_adam(), metaopt.scale_by_learned_lr(
          controller, theta, learning_rate=LR, total_steps=total_steps)),
      "pretrained_lr": lambda: optax.chain(optax.scale_by_adam(),
                                           metaopt.pretrained_lr(total_steps=total_steps)),
      "adam": lambda: optax.adam(LR),
      "hd_adam": lambda: metaopt.hypergradient_adam(LR),
  }


def _norm_only() -> optax.GradientTransformation:
  """Adam + cosine that also reduces the update norm into its state (the norm feature's pass)."""
  def init(params):
    del params
    return jnp.zeros((), jnp.float32)

  def update(updates, state, params=None):
    del state, params
    return updates, optax.tree.norm(updates).astype(jnp.float32)
  return optax.GradientTransformation(init, update)


def ablations(total_steps: int, theta) -> dict:
  """Pieces of learned_lr's cost: the norm of the update alone (on adam + cosine), the
  learned LR without the controller network, and without the norm features; and the
  shipped controller with its LR lagged one step (off the update's critical path)."""
  zero = lambda th, x: jnp.zeros((), jnp.float32) * th  # no network: features + smoothing only
  keep = np.array([i for i, f in enumerate(metaopt.FEATURE_NAMES)
                   if f not in metaopt.NORM_FEATURES])
  first = theta["Dense_0"]
  no_norm_theta = {**theta, "Dense_0": {**first, "kernel": first["kernel"][keep]}}
  return {
      "learned_lr, no norm features": lambda: optax.chain(
          optax.scale_by_adam(), metaopt.scale_by_learned_lr(
              metaopt.LRController(), no_norm_theta, learning_rate=LR, total_steps=total_steps,
              features=[metaopt.FEATURE_NAMES[i] for i in keep])),
      "adam_cosine+norm": lambda: optax.chain(
          optax.adam(optax.cosine_decay_schedule(LR, total_steps)), _norm_only()),
      "learned_lr, no controller network": lambda: optax.chain(
          optax.scale_by_adam(), metaopt.scale_by_learned_lr(
              zero, jnp.zeros((), jnp.float32), learning_rate=LR, total_steps=total_steps)),
      "pretrained_lr, LR lagged one step": lambda: optax.chain(
          optax.scale_by_adam(), metaopt.pretrained_lr(total_steps=total_steps, lagged=True)),
  }


_NOT_WORK = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast"}


def step_profile(task, tx) -> dict:
  """What XLA makes of one training step with ``tx``: the ops of the compiled scan body
  (each one a separate kernel on XLA:CPU, with a fixed cost) and the bytes the program
  reads and writes (XLA's cost analysis), for a 10-step scan."""
  from metaopt.train import training_step
  state = common.initial_run_state(task, tx)
  step = training_step(task, tx, task.arrays())
  run = jax.jit(lambda state, arrays: metaopt.unroll(step, None, state, None, length=10))
  compiled = run.lower(state, task.arrays()).compile()
  text = compiled.as_text()
  bodies, name, current = {}, None, []
  for line in text.split("\n"):
    if (m := re.match(r"^(?:ENTRY )?%?(\S+) \(.*\{$", line)):
      name, current = m.group(1), []
    elif line.startswith("}") and name:
      bodies[name], name = current, None
    elif name:
      current.append(line)
  loops = set(re.findall(r"body=%?([\w.\-]+)", text))
  main_body = max(loops, key=lambda b: len(bodies.get(b, [])))
  ops = [m.group(1) for line in bodies[main_body]
         if (m := re.match(r"\s+(?:ROOT )?\S+ = .*? ([a-z\-]+)\(", line))]
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return dict(ops=sum(op not in _NOT_WORK for op in ops),
              bytes=float(cost.get("bytes accessed", float("nan"))))


def interleaved_both_clocks(fns: dict, *, repeats: int, min_seconds: float = 0.05):
  """common.interleaved, timing each measurement on the wall clock and on this process's
  CPU clock (all threads): ``(wall_stats, cpu_stats)``, each in common.interleaved's format.

  On a machine shared with other jobs the wall clock also counts the time this process
  waited for a CPU; its CPU time does not, so CPU-time ratios stay readable under load.
  """
  calls = {}
  for name, fn in fns.items():
    jax.block_until_ready(fn())   # compile (if not already) and warm up
    jax.block_until_ready(fn())
    start = time.perf_counter()
    jax.block_until_ready(fn())
    calls[name] = max(1, math.ceil(min_seconds / max(time.perf_counter() - start, 1e-9)))
  samples = {clock: {name: [] for name in fns} for clock in ("wall", "cpu")}
  for _ in range(repeats):
    for name, fn in fns.items():
      wall, cpu = time.perf_counter(), time.process_time()
      for _ in range(calls[name]):
        jax.block_until_ready(fn())
      samples["cpu"][name].append((time.process_time() - cpu) / calls[name])
      samples["wall"][name].append((time.perf_counter() - wall) / calls[name])
  out = []
  for clock in ("wall", "cpu"):
    stats = {}
    for name, xs in samples[clock].items():
      xs = np.asarray(xs)
      q25, med, q75 = np.percentile(xs, [25, 50, 75])
      stats[name] = dict(median=float(med), q25=float(q25), q75=float(q75), min=float(xs.min()),
                         max=float(xs.max()), spread=float((q75 - q25) / med),
                         calls_per_repeat=calls[name], repeats=len(xs), samples=xs.tolist())
    out.append(stats)
  return tuple(out)


def profile(labels, theta, folder):
  """The --profile table: XLA ops per step and bytes accessed, against each reference."""
  rows, out = [], {}
  for label in labels:
    config, build = SHAPES[label]
    task = build(config)
    makers = {**candidates(config.total_steps, theta), **ablations(config.total_steps, theta)}
    out[label] = prof = {name: step_profile(task, make()) for name, make in makers.items()}
    for name, p in prof.items():
      ref = "adam" if name in ("adam", "hd_adam") else "adam_cosine"
      rows.append([label, f"{name} (vs {ref})", p["ops"], p["ops"] - prof[ref]["ops"],
                   f"{p['bytes'] / prof[ref]['bytes']:.3f}"])
    print(label, {k: v["ops"] for k, v in prof.items()}, flush=True)
  print("\nXLA ops in the compiled step and bytes accessed (XLA cost analysis), "
        "against the reference\n")
  print(common.table(["shape", "optimizer", "XLA ops / step", "extra ops", "bytes / reference"],
                     rows))
  (folder / "profile.json").write_text(json.dumps(dict(profile=out,
                                                       environment=common.environment()),
                                                  indent=1))
  print(f"\nwrote {folder}/profile.json")


PAIRS = (("learned_lr", "adam_cosine"), ("pretrained_lr", "adam_cosine"), ("hd_adam", "adam"))


def main():
  args = common.parse_args(__doc__.splitlines()[0], lambda p: (
      p.add_argument("--ablate", action="store_true",
                     help="also time the pieces of the learned LR's cost"),
      p.add_argument("--profile", action="store_true",
                     help="no timing: count the XLA ops and bytes of each optimizer's step"),
      p.add_argument("--shapes", default=None,
                     help="comma-separated indices into SHAPES to run (default: all); "
                          "every run rewrites the table from all shapes measured so far")))
  scan_steps = 20 if args.quick else 500
  theta = common.random_theta(metaopt.init_controller(jax.random.PRNGKey(0),
                                                      metaopt.LRController()),
                              jax.random.PRNGKey(42))
  labels = list(SHAPES)[:2] if args.quick else list(SHAPES)
  if args.shapes is not None:
    picked = [int(i) for i in args.shapes.split(",")]
    if not all(0 <= i < len(labels) for i in picked):
      raise SystemExit(f"--shapes: indices in 0..{len(labels) - 1}, got {args.shapes}")
    labels = [labels[i] for i in picked]
  folder = common.RESULTS_DIR / f"{NAME}{'.quick' if args.quick else ''}"
  folder.mkdir(parents=True, exist_ok=True)
  if args.profile:
    return profile(labels, theta, folder)
  for label in labels:
    config, build = SHAPES[label]
    task = build(config)
    n = config.total_steps
    makers = candidates(n, theta)
    if args.ablate:
      makers.update(ablations(n, theta))
    # The stand-ins' steps take 5-50 ms: a shorter scan keeps a round in seconds.
    steps = scan_steps if config.model == "mlp" else max(1, scan_steps // 10)
    compiled = {name: common.scanned_training(task, make(), steps) for name, make in makers.items()}
    wall, cpu = interleaved_both_clocks(compiled, repeats=args.repeats)
    result = dict(task=config._asdict(), model=type(task.model).__name__, steps_per_call=steps,
                  repeats=args.repeats, target=TARGET, environment=common.environment())
    for clock, stats in (("wall", wall), ("cpu", cpu)):
      pairs = PAIRS + tuple((name, "adam_cosine") for name in makers
                            if name not in dict(PAIRS) and name not in ("adam", "adam_cosine"))
      result[clock] = dict(stats=stats, ratios={c: common.ratio(stats, c, r) for c, r in pairs},
                           per_step_seconds={k: v["median"] / steps for k, v in stats.items()})
    (folder / f"{label}.json").write_text(json.dumps(result, indent=1))
    print(label, {c: round(r["paired_median"], 3) for c, r in result["cpu"]["ratios"].items()},
          flush=True)

  rows, ablation_rows = [], []
  for label in SHAPES:
    path = folder / f"{label}.json"
    if not path.exists():
      continue
    result = json.loads(path.read_text())
    for cand, ref in PAIRS:
      cells = []
      for clock in ("cpu", "wall"):
        r = result[clock]["ratios"][cand]
        cells += [f"{r['ratio']:.3f}", f"{r['paired_median']:.3f}"]
      per_step = result["cpu"]["per_step_seconds"]
      status = (common.verdict(result["cpu"]["ratios"][cand]["paired_median"], TARGET)
                if ref == "adam_cosine" else "(recorded)")
      rows.append([label, f"{cand} / {ref}", common.fmt_time(per_step[cand]),
                   common.fmt_time(per_step[ref]), *cells,
                   f"{result['environment']['loadavg'][0]:.1f}", status])
    for name, r in result["cpu"]["ratios"].items():
      if name not in dict(PAIRS):
        extra = (result["cpu"]["per_step_seconds"][name]
                 - result["cpu"]["per_step_seconds"]["adam_cosine"]) * 1e6
        ablation_rows.append([label, name, f"{extra:+.1f} us", f"{r['paired_median']:.3f}"])
  print(f"\nLearned-LR overhead per training step ({scan_steps}-step lax.scan, "
        f"{max(1, scan_steps // 10)} for the stand-ins; median of "
        f"{args.repeats} interleaved rounds; target paired CPU-time ratio <= {TARGET} for the "
        "learned LR)\n")
  print(common.table(["shape", "candidate / reference", "candidate CPU / step",
                      "reference CPU / step", "CPU ratio", "CPU paired", "wall ratio",
                      "wall paired", "load avg", "target"], rows))
  if ablation_rows:
    print("\nWhere the learned LR's extra CPU time goes (each row vs adam_cosine)\n")
    print(common.table(["shape", "optimizer", "extra CPU / step", "paired ratio"], ablation_rows))
  print(f"\nwrote {folder}/")


if __name__ == "__main__":
  main()
