"""Cost of a TBPTT meta-gradient step over T inner steps of the learned-LR problem.

Candidate: ``estimators.tbptt(lr_problem(task, ...), theta, state, None, None, length=T)``
(jitted): T training steps with the learned LR, the log val loss after each,
and the gradient of their mean with respect to the controller weights theta.
References, in the same process, interleaved:
  (a) plain_adam: T training steps with optax.adam(base_lr) via
      metaopt.train.training_step + metaopt.unroll, no meta-loss, no gradient.
      Target ratio <= 3.0.
  (b) hand_written: the same meta-gradient written directly with
      jax.value_and_grad over a jax.lax.scan, no metaopt.unroll/estimators.
      Target ratio <= 1.10. Its loss and gradient are checked against the candidate.
  (info) forward_learned: the candidate's T steps without meta-loss or gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import common
import metaopt
from metaopt import estimators
from metaopt.meta.lr import VAL_BATCH
from metaopt.tasks import TaskConfig
from metaopt.train import RunState, training_step

NAME = "bench_tbptt"
TARGET_PLAIN, TARGET_HAND = 3.0, 1.10
TOTAL_STEPS = 1000.0
TASKS = [TaskConfig("digits", "mlp", 64, 2, 32, 1000, 0),
         TaskConfig("mnist5k", "mlp", 256, 2, 64, 1000, 0)]


def hand_written(task, controller, config, T):
  """value_and_grad of the mean log val loss over a scan of T learned-LR Adam steps."""
  def meta_grad(theta, state, arrays):
    tx = optax.chain(optax.scale_by_adam(eps_root=1e-8), metaopt.scale_by_learned_lr(
        controller, theta, learning_rate=config.learning_rate, total_steps=TOTAL_STEPS, **config.settings))

    def objective(theta):
      def body(carry, t):
        params, opt_state = carry
        batch = task.sample_batch(arrays, jax.random.fold_in(jax.random.fold_in(state.key, t), 0))
        loss, grads = jax.value_and_grad(task.loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params, value=loss)
        params = optax.apply_updates(params, updates)
        val_key = jax.random.fold_in(jax.random.fold_in(state.key, t + 1), 1)
        val = task.sample_batch(arrays, val_key, split="val", batch_size=VAL_BATCH)
        return (params, opt_state), jnp.log(task.loss(params, val))

      carry = (state.params, metaopt.with_theta(state.opt_state, theta))
      carry, log_val = jax.lax.scan(body, carry, state.step + jnp.arange(T))
      return jnp.mean(log_val), carry

    (loss, carry), grad = jax.value_and_grad(objective, has_aux=True)(theta)
    return loss, grad, carry
  return meta_grad


def bench_task(config: TaskConfig, T: int, repeats: int) -> dict:
  setup = common.learned_lr_setup(config, TOTAL_STEPS)
  task, arrays, controller, meta_config = (setup.task, setup.arrays, setup.controller,
                                           setup.meta_config)
  theta, problem, state = setup.theta, setup.problem, setup.state

  flops = {}

  def compiled(fn, *args, name):
    exe = jax.jit(fn).lower(*args).compile()
    cost = exe.cost_analysis()
    flops[name] = (cost[0] if isinstance(cost, list) else cost).get("flops")
    return exe, (lambda: exe(*args))

  tbptt_exe, tbptt_call = compiled(
      lambda th, s, a: estimators.tbptt(problem(a), th, s, None, None, length=T),
      theta, state, arrays, name="tbptt")
  hand_exe, hand_call = compiled(hand_written(task, controller, meta_config, T),
                                 theta, state, arrays, name="hand_written")
  forward_call = compiled(
      lambda th, s, a: metaopt.unroll(problem(a).step, th, s, None, length=T),
      theta, state, arrays, name="forward_learned")[1]
  adam = optax.adam(meta_config.learning_rate)
  params = task.init(jax.random.PRNGKey(0))
  train_state = RunState(params, adam.init(params), jax.random.PRNGKey(1),
                           jnp.zeros((), jnp.int32))
  plain_call = compiled(
      lambda s, a: metaopt.unroll(training_step(task, adam, a), None, s, None, length=T),
      train_state, arrays, name="plain_adam")[1]

  # Same computation check: library estimate vs hand-written one.
  est = tbptt_exe(theta, state, arrays)
  loss_h, grad_h, _ = hand_exe(theta, state, arrays)
  g_lib = np.concatenate([np.ravel(x) for x in jax.tree.leaves(est.grad)])
  g_hand = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grad_h)])
  check = dict(loss_lib=float(est.meta_loss), loss_hand=float(loss_h),
               grad_rel_diff=float(np.linalg.norm(g_lib - g_hand) / np.linalg.norm(g_lib)),
               grad_norm=float(np.linalg.norm(g_lib)))

  stats = common.interleaved({"tbptt": tbptt_call, "hand_written": hand_call,
                              "plain_adam": plain_call, "forward_learned": forward_call},
                             repeats=repeats)
  # XLA's flop estimate counts each scan body once, so ratios are per inner step.
  return dict(task=config._asdict(), T=T, stats=stats, check=check, xla_flops=flops,
              vs_plain=common.ratio(stats, "tbptt", "plain_adam"),
              vs_hand=common.ratio(stats, "tbptt", "hand_written"),
              forward_vs_plain=common.ratio(stats, "forward_learned", "plain_adam"))


def main():
  args = common.parse_args(__doc__.splitlines()[0])
  lengths = (5, 10) if args.quick else (25, 100)
  results, rows, notes = [], [], []
  for config in TASKS:
    for T in lengths:
      r = bench_task(config, T, args.repeats)
      results.append(r)
      s = r["stats"]
      rows.append([config.name, T, common.fmt_time(s["tbptt"]["median"]),
                   common.fmt_time(s["hand_written"]["median"]),
                   common.fmt_time(s["plain_adam"]["median"]),
                   common.fmt_time(s["forward_learned"]["median"]),
                   f"{r['vs_plain']['ratio']:.2f} ({r['vs_plain']['paired_median']:.2f})",
                   common.verdict(r["vs_plain"]["ratio"], TARGET_PLAIN),
                   f"{r['vs_hand']['ratio']:.3f} ({r['vs_hand']['paired_median']:.3f})",
                   common.verdict(r["vs_hand"]["ratio"], TARGET_HAND),
                   f"{r['check']['grad_rel_diff']:.1e}"])
      f = r["xla_flops"]
      notes.append(f"{config.name} T={T}: XLA flop estimate per step, tbptt/plain_adam = "
                   f"{f['tbptt'] / f['plain_adam']:.1f}, tbptt/hand_written = "
                   f"{f['tbptt'] / f['hand_written']:.2f}")
      if note := common.spread_note(s):
        notes.append(f"{config.name} T={T}: {note}")
      print(f"done {config.name} T={T}", flush=True)

  print(f"\nTBPTT meta-gradient step vs references (median of {args.repeats} interleaved "
        f"repeats; ratio of medians, paired median in parentheses)\n")
  print(common.table(["task", "T", "tbptt", "hand-written", "plain adam", "fwd learned",
                      f"tbptt/plain (<= {TARGET_PLAIN})", "", f"tbptt/hand (<= {TARGET_HAND})",
                      "", "grad rel diff"], rows))
  for note in notes:
    print(note)
  path = common.write_json(NAME, dict(repeats=args.repeats,
                                      targets=dict(vs_plain=TARGET_PLAIN, vs_hand=TARGET_HAND),
                                      results=results), quick=args.quick)
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
