"""Cost of one MAML meta-iteration on the sinusoid family vs a minimal hand-written JAX version.

Setting (issue 4): 2x40 ReLU MLP, 5 inner SGD steps at LR 0.01, K = 10 support and
10 query points, meta-batch 25, Adam(1e-3) meta-update. Candidates, jitted, timed
interleaved in one process on the same episodes:
  maml_2nd: ``metaopt.meta.maml.maml(...).meta_step`` (second order, the default).
  hand_2nd: ``jax.value_and_grad`` of the mean over a ``jax.vmap`` of a
    ``jax.lax.scan`` of 5 SGD steps, then the same optax Adam update. Target:
    maml_2nd / hand_2nd <= 1.10. Its loss and updated params are checked against maml_2nd.
  maml_1st / hand_1st: the same, first order (FOMAML; recorded, no target).
Also recorded: second-order / first-order cost.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import common
from metaopt.meta.maml import maml
from metaopt.tasks.fewshot import mse_loss, sinusoid_family
from metaopt.tasks.models import MLP

NAME = "bench_maml"
TARGET = 1.10
INNER_LR, INNER_STEPS, K, META_BATCH = 0.01, 5, 10, 25


def hand_written(model, optimizer, first_order: bool):
  def loss(params, batch):
    return jnp.mean(jnp.square(model.apply({"params": params}, batch["x"]) - batch["y"]))

  def task_loss(params, support, query):
    def inner(p, _):
      g = jax.grad(loss)(p, support)
      if first_order:
        g = jax.lax.stop_gradient(g)
      return jax.tree.map(lambda a, b: a - INNER_LR * b, p, g), None
    adapted, _ = jax.lax.scan(inner, params, None, length=INNER_STEPS)
    return loss(adapted, query)

  def meta_step(params, opt_state, support, query):
    value, grad = jax.value_and_grad(
        lambda p: jnp.mean(jax.vmap(task_loss, (None, 0, 0))(p, support, query)))(params)
    updates, opt_state = optimizer.update(grad, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value
  return jax.jit(meta_step)


def main():
  args = common.parse_args(__doc__.splitlines()[0])
  model = MLP(hidden=(40, 40), num_classes=1)
  params = model.init(jax.random.key(0), jnp.zeros((1, 1)))["params"]
  support, query = sinusoid_family(k_shot=K, num_query=K).sample(jax.random.key(1), META_BATCH)
  optimizer = optax.adam(1e-3)
  fns, checks = {}, {}
  for order, first in (("2nd", False), ("1st", True)):
    m = maml(mse_loss(model), inner_lr=INNER_LR, inner_steps=INNER_STEPS, first_order=first,
             meta_optimizer=optimizer)
    state = m.init(params)
    step = jax.jit(m.meta_step).lower(state, support, query).compile()
    hand = hand_written(model, optimizer, first)
    opt_state = optimizer.init(params)
    hand = hand.lower(params, opt_state, support, query).compile()
    fns[f"maml_{order}"] = lambda step=step, state=state: step(state, support, query)
    fns[f"hand_{order}"] = lambda hand=hand, o=opt_state: hand(params, o, support, query)
    new_state, metrics = step(state, support, query)
    new_params, _, value = hand(params, opt_state, support, query)
    np.testing.assert_allclose(metrics["query_loss"], value, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(new_state.theta["params"]), jax.tree.leaves(new_params)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    checks[order] = "loss and updated params equal (rtol 1e-5 / 1e-4)"
  stats = common.interleaved(fns, repeats=args.repeats)
  ratios = {
      "maml_2nd_vs_hand_2nd": common.ratio(stats, "maml_2nd", "hand_2nd"),
      "maml_1st_vs_hand_1st": common.ratio(stats, "maml_1st", "hand_1st"),
      "maml_2nd_vs_maml_1st": common.ratio(stats, "maml_2nd", "maml_1st"),
      "hand_2nd_vs_hand_1st": common.ratio(stats, "hand_2nd", "hand_1st"),
  }
  rows = [[name, common.fmt_time(s["median"]), f"{s['spread']:.0%}"] for name, s in stats.items()]
  print(f"MAML meta-iteration, sinusoid 2x40 MLP, {INNER_STEPS} steps, K={K}, "
        f"meta-batch {META_BATCH} (median of {args.repeats} interleaved rounds)")
  print(common.table(["candidate", "time", "IQR/median"], rows))
  print()
  rrows = [[k, f"{r['ratio']:.3f}", f"{r['paired_median']:.3f}"] for k, r in ratios.items()]
  print(common.table(["ratio", "of medians", "paired median"], rrows))
  verdict = common.verdict(ratios["maml_2nd_vs_hand_2nd"]["ratio"], TARGET)
  print(f"\nmaml_2nd / hand_2nd = {ratios['maml_2nd_vs_hand_2nd']['ratio']:.3f} "
        f"(target <= {TARGET}): {verdict}")
  if note := common.spread_note(stats):
    print(note)
  path = common.write_json(NAME, dict(repeats=args.repeats, stats=stats, ratios=ratios,
                                      checks=checks, verdict=verdict), quick=args.quick)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
