"""PES: unbiased over a long horizon where TBPTT is not, and the cost of a PES meta-step.

Bias. A noisy quadratic whose inner state follows a linear recurrence with a learned
step size, w <- w - exp(theta) * (h * w + noise), noise ~ N(0, s^2) per coordinate.
The meta-objective J(theta) is the expected loss 0.5 * sum(h * w_t^2) averaged over all
N steps of a run, in closed form (E[w_t^2] is a geometric series), and so is its
gradient (:func:`true_gradient`; checked against a float64 finite difference). Runs
of N steps are cut into K = N / T truncations of T steps; each of G independent
inner runs ("groups", vmapped) restarts every K truncations, group g first at
truncation g mod K (staggered). For every complete run the K per-truncation
estimates are summed and divided by K: one draw of an estimate of dJ/dtheta.
PES (one antithetic pair per group, ``estimators.pes``) should be unbiased; TBPTT
(``estimators.tbptt``) and truncated ES (``estimators.es``, fresh perturbations
every truncation) see only each truncation's share and are biased. Reported: the
mean over runs, its standard error (runs are independent), and the z-score
(mean - truth) / SE. Target: |z| <= 2 for PES, and TBPTT's bias visible (|z| > 2).

Cost. ``estimators.pes`` on the learned-LR inner problem (``metaopt.meta.lr.lr_problem``,
meta-loss = log val loss averaged over the T steps) against the forward unroll it
perturbs: the same T steps and meta-losses at the unperturbed theta, one run per
antithetic pair (vmapped over pairs), no gradient. Target: ratio <= 2.5 (a pair runs
two perturbed copies, so about 2.0 is the floor). Also timed, to say where the time
goes: the forward of 2 x pairs runs at one theta, the same with a perturbed theta per
run (PES's forward work without its bookkeeping), PES with every pair restarting,
and TBPTT per pair; all in the same process, interleaved.

The headline bias check runs at T = 10 over ``--seeds`` seeds (default 5); the sweep
over T uses seed 0. ``--part bias`` or ``--part cost`` runs one half.
"""

from __future__ import annotations

import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import common
import metaopt
from metaopt import estimators, report
from metaopt.tasks import TaskConfig
from metaopt.unroll import InnerProblem, with_meta_loss

NAME = "bench_pes"
TARGET_COST = 2.5
DOCS_DIR = common.ROOT / "docs" / "results" / "pes"

# The noisy quadratic (Wu et al., 2018's short-horizon setting): a noisy, stiff
# direction that favours small steps now, and a flat one far from its optimum that
# favours large steps over the whole run.
CURVATURE = np.array([1.0, 0.02])
W0 = np.array([0.0, 5.0])
NOISE = np.array([1.0, 0.0])
LOG_LR = float(np.log(0.1))
HORIZON = 200
SIGMA = 0.01

COST_TASKS = [TaskConfig("digits", "mlp", 64, 2, 32, 1000, 0),
              TaskConfig("mnist5k", "mlp", 256, 2, 64, 1000, 0)]
COST_T = 25
TOTAL_STEPS = 1000.0


class QState(NamedTuple):
  w: jax.Array
  key: jax.Array
  t: jax.Array


def noisy_quadratic() -> InnerProblem:
  """theta = {"log_lr": scalar}; each step draws its gradient noise from the state's key."""
  h, noise = jnp.asarray(CURVATURE, jnp.float32), jnp.asarray(NOISE, jnp.float32)

  def loss(w):
    return 0.5 * jnp.sum(h * w ** 2)

  def init(theta, key):
    return QState(jnp.asarray(W0, jnp.float32), key, jnp.zeros((), jnp.int32))

  def step(theta, s, _):
    xi = noise * jax.random.normal(jax.random.fold_in(s.key, s.t), h.shape)
    w = s.w - jnp.exp(theta["log_lr"]) * (h * s.w + xi)
    return QState(w, s.key, s.t + 1), {"loss": loss(s.w)}

  return InnerProblem(init=init, step=step, meta_loss=lambda theta, s, _: loss(s.w))


def expected_objective(log_lr: float, steps: int = HORIZON) -> float:
  """J: the expected loss after each of ``steps`` steps, averaged (float64)."""
  a, h, t = np.exp(log_lr), CURVATURE, np.arange(1, steps + 1)[:, None]
  q = (1 - a * h) ** 2
  v = q ** t * W0 ** 2 + a ** 2 * NOISE ** 2 * (1 - q ** t) / (1 - q)
  return float(np.mean(0.5 * np.sum(h * v, axis=1)))


def true_gradient(log_lr: float, steps: int = HORIZON) -> float:
  """dJ/dlog_lr in closed form: E[w_t^2] = q^t w0^2 + a^2 s^2 (1 - q^t) / (1 - q), q = (1 - a h)^2."""
  a, h, t = np.exp(log_lr), CURVATURE, np.arange(1, steps + 1)[:, None]
  q, dq = (1 - a * h) ** 2, -2 * h * (1 - a * h)
  A, dA = q ** t, t * q ** (t - 1) * dq
  B, dB = (1 - A) / (1 - q), (-dA * (1 - q) + (1 - A) * dq) / (1 - q) ** 2
  dv = dA * W0 ** 2 + 2 * a * NOISE ** 2 * B + a ** 2 * NOISE ** 2 * dB
  return float(a * np.mean(0.5 * np.sum(h * dv, axis=1)))


# --- bias ----------------------------------------------------------------------------


def run_estimator(method: str, T: int, groups: int, runs: int,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Per-truncation estimates ``[meta_steps, groups]`` of ``method`` over a staggered
  schedule, and each group's offset (its first restart)."""
  problem, theta = noisy_quadratic(), {"log_lr": jnp.float32(LOG_LR)}
  K = HORIZON // T
  steps = K * (runs + 1)
  offsets = jnp.arange(groups) % K
  root = jax.random.key(seed)

  def restart_mask(m):
    return (m > 0) & ((m - offsets) % K == 0)

  if method == "pes":
    def init(g):
      return estimators.pes_init(problem, theta, jax.random.fold_in(root, g), population=2)

    def one(state, m, g):
      key = jax.random.fold_in(jax.random.fold_in(root, 10_000 + g), m)
      est = estimators.pes(problem, theta, state, None, None, key=key, sigma=SIGMA,
                           reset=restart_mask(m)[g], length=T)
      return est.state, est.grad["log_lr"]
  else:
    def init(g):
      return problem.init(theta, jax.random.fold_in(jax.random.fold_in(root, g), 0))

    def one(state, m, g):
      # A new run (new data) every K truncations, like the PES pairs.
      run = jnp.where(m >= offsets[g], (m - offsets[g]) // K + 1, 0)
      fresh = problem.init(theta, jax.random.fold_in(jax.random.fold_in(root, g), run))
      state = jax.tree.map(lambda a, b: jnp.where(restart_mask(m)[g], a, b), fresh, state)
      if method == "tbptt":
        est = estimators.tbptt(problem, theta, state, None, None, length=T)
      else:
        key = jax.random.fold_in(jax.random.fold_in(root, 10_000 + g), m)
        est = estimators.es(problem, theta, state, None, None, key=key, population=2,
                            sigma=SIGMA, length=T)
      return est.state, est.grad["log_lr"]

  @jax.jit
  def simulate():
    gs = jnp.arange(groups)
    states = jax.vmap(init)(gs)

    def meta_step(states, m):
      return jax.vmap(lambda s, g: one(s, m, g))(states, gs)
    _, grads = jax.lax.scan(meta_step, states, jnp.arange(steps))
    return grads
  return np.asarray(simulate(), np.float64), np.asarray(offsets)


def run_means(grads: np.ndarray, offsets: np.ndarray, K: int) -> np.ndarray:
  """One draw per complete run: the mean of its K per-truncation estimates, in run order."""
  draws = []
  steps = grads.shape[0]
  for start in range(0, steps - K + 1):
    for g in np.nonzero(((start - offsets) % K == 0) & (start >= offsets))[0]:
      draws.append(grads[start:start + K, g].mean())
  return np.asarray(draws)


def summarize(draws: np.ndarray, truth: float) -> dict:
  mean, se = float(draws.mean()), float(draws.std(ddof=1) / np.sqrt(len(draws)))
  return dict(mean=mean, se=se, z=(mean - truth) / se, runs=len(draws),
              bias=mean - truth, std=float(draws.std(ddof=1)))


METHODS = {"pes": "PES", "tbptt": "TBPTT", "es": "truncated ES"}
HEADLINE_T = 10


def bias_study(quick: bool, seeds: int, out_dir: pathlib.Path) -> dict:
  """The headline check at T = 10 over ``seeds`` seeds, then a sweep over T (seed 0)."""
  truth = true_gradient(LOG_LR)
  eps = 1e-5
  fd = (expected_objective(LOG_LR + eps) - expected_objective(LOG_LR - eps)) / (2 * eps)
  groups, runs = (64, 4) if quick else (512, 24)
  lengths = (10, 50) if quick else (5, 10, 25, 50, 100, 200)

  def measure(method, T, seed):
    grads, offsets = run_estimator(method, T, groups, runs, seed=seed)
    draws = run_means(grads, offsets, HORIZON // T)
    r = summarize(draws, truth)
    print(f"bias: {method} T={T} seed={seed}: mean {r['mean']:+.5f} ± {r['se']:.5f} "
          f"(truth {truth:+.5f}, z {r['z']:+.1f})", flush=True)
    return draws, dict(method=method, T=T, K=HORIZON // T, seed=seed, **r)

  headline, per_seed, pooled = {}, {}, {}
  for method in METHODS:
    draws = []
    for seed in range(seeds):
      d, r = measure(method, HEADLINE_T, seed)
      draws.append(d)
      per_seed.setdefault(method, []).append(r)
    pooled[method] = np.concatenate(draws)
    headline[method] = dict(method=method, T=HEADLINE_T, K=HORIZON // HEADLINE_T, seeds=seeds,
                            **summarize(pooled[method], truth))
  sweep = {f"{m}_T{HEADLINE_T}": per_seed[m][0] for m in METHODS}
  for T in lengths:
    if T != HEADLINE_T:
      for method in METHODS:
        sweep[f"{method}_T{T}"] = measure(method, T, 0)[1]

  out_dir.mkdir(parents=True, exist_ok=True)
  running = {}
  for method, draws in pooled.items():
    n = np.arange(1, len(draws) + 1)
    mean = np.cumsum(draws) / n
    var = np.maximum(np.cumsum(draws ** 2) / n - mean ** 2, 0) * n / np.maximum(n - 1, 1)
    band = 2 * np.sqrt(var / n)
    keep = n >= 20  # the first few runs say nothing about a standard error
    running[METHODS[method]] = (n[keep], mean[keep], (mean - band)[keep], (mean + band)[keep])
  report.plot_panels(
      out_dir / "bias.png",
      {f"running mean of dJ/dlog_lr estimates, T = {HEADLINE_T} "
       f"(K = {HORIZON // HEADLINE_T}), ±2 SE": running},
      ylabel="dJ / d log_lr", xlabel="complete runs averaged", hlines={"true gradient": truth})
  by_T = {}
  for method in METHODS:
    rows = [sweep[f"{method}_T{T}"] for T in lengths]
    y, se = np.asarray([r["mean"] for r in rows]), np.asarray([r["se"] for r in rows])
    by_T[METHODS[method]] = (np.asarray(lengths), y, y - 2 * se, y + 2 * se)
  report.plot_panels(out_dir / "bias_vs_truncation.png",
                     {f"mean estimate over {HORIZON}-step runs, seed 0, ±2 SE": by_T},
                     ylabel="dJ / d log_lr", xlabel="truncation length T",
                     hlines={"true gradient": truth})
  return dict(truth=truth, finite_difference=fd, groups=groups, runs_per_group=runs,
              sigma=SIGMA, horizon=HORIZON, log_lr=LOG_LR, curvature=CURVATURE.tolist(),
              w0=W0.tolist(), noise=NOISE.tolist(), headline=headline, per_seed=per_seed,
              sweep=sweep,
              plots=[str(out_dir / "bias.png"), str(out_dir / "bias_vs_truncation.png")])


def print_bias(bias: dict) -> None:
  truth = bias["truth"]
  print(f"\nBias over {HORIZON}-step runs: true dJ/dlog_lr = {truth:+.5f} "
        f"(float64 finite difference {bias['finite_difference']:+.5f})\n")
  rows = []
  for method, r in bias["headline"].items():
    ok = abs(r["z"]) <= 2 if method == "pes" else abs(r["z"]) > 2
    zs = ", ".join(f"{x['z']:+.1f}" for x in bias["per_seed"][method])
    rows.append([METHODS[method], r["T"], r["K"], r["seeds"], r["runs"], f"{r['mean']:+.5f}",
                 f"{r['se']:.5f}", f"{r['z']:+.1f}", zs,
                 "|z| <= 2" if method == "pes" else "|z| > 2", "PASS" if ok else "FAIL"])
  print(common.table(["estimator", "T", "K", "seeds", "runs", "mean", "SE", "z", "z per seed",
                      "target", ""], rows))
  print("\nSweep over the truncation length (seed 0): mean ± SE (z)\n")
  lengths = sorted({r["T"] for r in bias["sweep"].values()})
  cell = lambda r: f"{r['mean']:+.5f} ± {r['se']:.5f} ({r['z']:+.1f})"
  print(common.table(["T", "K"] + list(METHODS.values()),
                     [[T, HORIZON // T] + [cell(bias["sweep"][f"{m}_T{T}"]) for m in METHODS]
                      for T in lengths]))


# --- cost ----------------------------------------------------------------------------


def antithetic(theta, key, pairs):
  """``theta +- eps`` for ``pairs`` draws of eps ~ N(0, SIGMA^2), leading axes (2, pairs)."""
  leaves, treedef = jax.tree.flatten(theta)
  keys = jax.random.split(key, len(leaves))
  eps = [SIGMA * jax.random.normal(k, (pairs,) + x.shape, x.dtype) for k, x in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, [jnp.stack([x + e, x - e]) for x, e in zip(leaves, eps)])


def cost_task(config: TaskConfig, T: int, population: int, repeats: int) -> dict:
  setup = common.learned_lr_setup(config, TOTAL_STEPS)
  theta, problem, arrays = setup.theta, setup.problem, setup.arrays
  pairs = population // 2
  flops = {}

  def compiled(fn, *args, name):
    exe = jax.jit(fn).lower(*args).compile()
    cost = exe.cost_analysis()
    flops[name] = (cost[0] if isinstance(cost, list) else cost).get("flops")
    return exe, (lambda: exe(*args))

  def pes_fn(th, state, key, a):
    return estimators.pes(problem(a), th, state, None, None, key=key, sigma=SIGMA, length=T)

  key = jax.random.PRNGKey(7)  # raw keys, as metaopt.meta.lr uses
  state = jax.jit(lambda th, k, a: estimators.pes_init(problem(a), th, k,
                                                       population=population))(theta, key, arrays)
  pes_exe, _ = compiled(pes_fn, theta, state, key, arrays, name="pes")
  running = pes_exe(theta, state, key, arrays).state   # past the first call: no pair restarts
  jax.block_until_ready(running)
  pes_call = lambda: pes_exe(theta, running, key, arrays)
  restarting = estimators.pes_reset(running, jnp.ones(pairs, bool))
  restart_call = lambda: pes_exe(theta, restarting, key, arrays)

  def forward(th, states, a, *, per_run_theta=False):
    """The unroll with its meta-losses, one run per state, vmapped (``per_run_theta``:
    each run with its own theta, as PES's perturbed runs)."""
    step = with_meta_loss(problem(a))
    def one(t, s):
      s, m = metaopt.unroll(step, t, s, (None, None), length=T)
      return jnp.mean(m["meta_loss"]), s
    return jax.vmap(one, in_axes=(0 if per_run_theta else None, 0))(th, states)

  pos = running.pos
  flat = lambda tree: jax.tree.map(lambda x: x.reshape((2 * pairs,) + x.shape[2:]), tree)
  both = flat(running.particles)
  thetas = flat(antithetic(theta, jax.random.PRNGKey(3), pairs))
  forward_call = compiled(forward, theta, pos, arrays, name="forward_pairs")[1]
  forward2_call = compiled(forward, theta, both, arrays, name="forward_particles")[1]
  perturbed_call = compiled(lambda th, s, a: forward(th, s, a, per_run_theta=True),
                            thetas, both, arrays, name="forward_perturbed")[1]
  tbptt_call = compiled(
      lambda th, states, a: jax.vmap(
          lambda s: estimators.tbptt(problem(a), th, s, None, None, length=T))(states),
      theta, pos, arrays, name="tbptt_pairs")[1]

  stats = common.interleaved({"pes": pes_call, "forward_pairs": forward_call,
                              "forward_particles": forward2_call,
                              "forward_perturbed": perturbed_call, "pes_restart": restart_call,
                              "tbptt_pairs": tbptt_call}, repeats=repeats)
  return dict(task=config._asdict(), T=T, population=population, pairs=pairs, stats=stats,
              xla_flops=flops,
              vs_forward=common.ratio(stats, "pes", "forward_pairs"),
              particles_vs_pairs=common.ratio(stats, "forward_particles", "forward_pairs"),
              perturbed_vs_particles=common.ratio(stats, "forward_perturbed", "forward_particles"),
              vs_perturbed=common.ratio(stats, "pes", "forward_perturbed"),
              restart_vs_pes=common.ratio(stats, "pes_restart", "pes"),
              tbptt_vs_forward=common.ratio(stats, "tbptt_pairs", "forward_pairs"))


def main():
  def extra(p):
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds of the headline bias check (default 5, 1 with --quick)")
    p.add_argument("--part", choices=("all", "bias", "cost"), default="all")
  args = common.parse_args(__doc__.splitlines()[0], extra)
  if args.seeds is None:
    args.seeds = 1 if args.quick else 5
  out_dir = common.RESULTS_DIR / "pes-quick" if args.quick else DOCS_DIR
  data = dict(repeats=args.repeats, target_cost=TARGET_COST)
  if args.part in ("all", "bias"):
    data["bias"] = bias_study(args.quick, args.seeds, out_dir)
    print_bias(data["bias"])
    print(f"plots in {out_dir}")
  if args.part in ("all", "cost"):
    data["cost"] = cost_study(args.quick, args.repeats)
  name = NAME if args.part == "all" else f"{NAME}_{args.part}"
  print(f"\nwrote {common.write_json(name, data, quick=args.quick)}")


def cost_study(quick: bool, repeats: int) -> list:
  tasks = COST_TASKS[:1] if quick else COST_TASKS
  T = 5 if quick else COST_T
  cost, rows, notes = [], [], []
  for config in tasks:
    for population in ((2,) if quick else (2, 8)):
      r = cost_task(config, T, population, repeats)
      cost.append(r)
      s = r["stats"]
      rows.append([config.name, T, population, common.fmt_time(s["pes"]["median"]),
                   common.fmt_time(s["forward_pairs"]["median"]),
                   f"{r['vs_forward']['ratio']:.2f} ({r['vs_forward']['paired_median']:.2f})",
                   common.verdict(r["vs_forward"]["ratio"], TARGET_COST),
                   f"{r['particles_vs_pairs']['ratio']:.2f}",
                   f"{r['perturbed_vs_particles']['ratio']:.2f}",
                   f"{r['vs_perturbed']['ratio']:.2f}",
                   f"{r['restart_vs_pes']['ratio']:.2f}",
                   f"{r['tbptt_vs_forward']['ratio']:.2f}"])
      f = r["xla_flops"]
      if all(f.get(k) for k in ("pes", "forward_pairs", "forward_particles", "forward_perturbed")):
        notes.append(f"{config.name} population={population}: XLA flop estimate relative to "
                     f"forward_pairs: pes {f['pes'] / f['forward_pairs']:.2f}, 2x runs "
                     f"{f['forward_particles'] / f['forward_pairs']:.2f}, 2x perturbed runs "
                     f"{f['forward_perturbed'] / f['forward_pairs']:.2f}")
      if note := common.spread_note(s):
        notes.append(f"{config.name} population={population}: {note}")
      print(f"done cost {config.name} population={population}", flush=True)
  print(f"\nPES meta-step vs the forward unroll it perturbs (median of {repeats} "
        "interleaved repeats; ratio of medians, paired median in parentheses)\n")
  print(common.table(["task", "T", "population", "pes", "forward (pairs)",
                      f"pes/forward (<= {TARGET_COST})", "", "2x runs/forward",
                      "perturbed/2x runs", "pes/perturbed", "restart/pes", "tbptt/forward"], rows))
  for note in notes:
    print(note)
  return cost


if __name__ == "__main__":
  main()
