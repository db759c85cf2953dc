"""MAML-style initialization learning on the unroll core: MAML, FOMAML, Meta-SGD and ANIL.

The inner problem: ``theta = {"params": initial params}`` (plus
``"inner_lr"``, per-parameter inner LRs, for Meta-SGD); ``init`` picks the
parameters that adapt; ``step`` is one SGD step on the support set; the
meta-loss is the query loss of the adapted parameters. Meta-gradients come
from :func:`metaopt.estimators.full` (second order) or
:func:`metaopt.estimators.first_order` (FOMAML) through :func:`metaopt.unroll`,
vmapped over the tasks of a meta-batch.

BatchNorm: models see one task at a time (``vmap``), so batch statistics are
per task and never mix across a meta-batch. :class:`metaopt.tasks.models.Conv4`
normalizes with the statistics of the batch it is given, support during
adaptation and query at evaluation, like the original MAML (transductive).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax

from metaopt import estimators
from metaopt.sharding import Sharding, population_map, resolve, shards
from metaopt.train import run_loop, scan_advance
from metaopt.unroll import InnerProblem, population_mean, unroll
from metaopt.validation import check_int, check_positive

PyTree = Any
Batch = PyTree
LossFn = Callable[[PyTree, Batch], jax.Array]
AdaptOnly = Union[None, str, Sequence[str], Callable[[str], bool]]


class MAMLState(NamedTuple):
  theta: dict         # {"params": initial params} (+ {"inner_lr": per-leaf LRs} for Meta-SGD)
  opt_state: PyTree   # meta-optimizer state
  step: jax.Array     # meta-iterations done


class MAML(NamedTuple):
  """Pure functions of one MAML variant (see :func:`maml`)."""

  init: Callable[[PyTree], MAMLState]
  meta_step: Callable[..., tuple[MAMLState, dict]]
  adapt: Callable[..., PyTree]
  evaluate: Callable[..., dict]
  meta_gradient: Callable[..., tuple[jax.Array, PyTree, dict]]
  problem: InnerProblem
  inner_steps: int


def param_names(params: PyTree) -> list[str]:
  """``"Dense_0/kernel"``-style paths of every leaf, in ``jax.tree.leaves`` order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  return ["/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                   for k in path) for path, _ in flat]


def _selector(adapt_only: AdaptOnly) -> Callable[[str], bool]:
  if adapt_only is None:
    return lambda name: True
  if callable(adapt_only):
    return adapt_only
  prefixes = (adapt_only,) if isinstance(adapt_only, str) else tuple(adapt_only)
  return lambda name: any(name == p or name.startswith(p.rstrip("/") + "/") for p in prefixes)


def repeat(batch: Batch, steps: int) -> Batch:
  """The same batch for each of ``steps`` inner steps (a leading time axis)."""
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (steps,) + x.shape), batch)


def maml(loss_fn: LossFn, *, inner_lr: float, inner_steps: int, first_order: bool = False,
         learn_inner_lr: bool = False, adapt_only: AdaptOnly = None,
         meta_optimizer: Optional[optax.GradientTransformation] = None,
         metrics_fn: Optional[Callable[[PyTree, Batch], dict]] = None,
         vectorize: bool = True, sharding: Sharding = None,
         chunk_size: Optional[int] = None) -> MAML:
  """MAML and its variants as pure, jit-able functions.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, any pure loss over a pytree batch.
    inner_lr: SGD step size of adaptation (the initial value for Meta-SGD).
    inner_steps: adaptation steps during meta-training.
    first_order: FOMAML: treat inner gradients as constants.
    learn_inner_lr: Meta-SGD: a learned inner LR per parameter entry, part of ``theta``.
    adapt_only: ANIL and friends: the parameters that adapt, as path prefixes
      (``"Dense_0"``, ``"Dense_0/kernel"``) or a predicate on the path; the
      rest keep their meta-learned values. ``None``: everything adapts.
    meta_optimizer: defaults to ``optax.adam(1e-3)``.
    metrics_fn: ``metrics_fn(params, batch) -> dict`` of extra query metrics
      reported by ``evaluate`` (e.g. accuracy).
    vectorize: ``vmap`` over the tasks of a meta-batch; ``False`` maps them one
      after another (``lax.map``), faster for convolutions on CPU.
    sharding: split the meta-batch across devices (``None``, ``"auto"``, a ``Mesh``
      or a ``NamedSharding``: :mod:`metaopt.sharding`); the meta-gradient's mean
      over tasks becomes an all-reduce. The meta-batch must divide evenly.
    chunk_size: vmap that many tasks at a time (a divisor of the meta-batch), so
      memory grows with the chunk rather than the meta-batch.

  Returns:
    A :class:`MAML` whose functions are

    - ``init(params) -> MAMLState``;
    - ``meta_gradient(theta, support, query) -> (meta_loss, grad, metrics)``;
    - ``meta_step(state, support, query) -> (state, metrics)``, with a leading
      meta-batch axis on ``support`` and ``query``;
    - ``adapt(state, support, steps=None) -> params`` for one task, with
      ``steps`` adaptation steps (default ``inner_steps``; more at test time is fine);
    - ``evaluate(state, support, query, steps=None, curve=False) -> metrics`` per
      task of a meta-batch: query ``loss`` (and ``metrics_fn``) after adaptation,
      the same before it as ``<name>_before``, and with ``curve`` the values after
      every step as ``curve/<name>`` of shape [tasks, steps + 1].
  """
  inner_steps = check_int("inner_steps", inner_steps)
  check_positive("inner_lr", inner_lr)
  meta_optimizer = optax.adam(1e-3) if meta_optimizer is None else meta_optimizer
  spec = resolve(sharding, what="meta-batch")
  selected = _selector(adapt_only)

  def adapted_indices(params) -> list[int]:
    names = param_names(params)
    idx = [i for i, n in enumerate(names) if selected(n)]
    if not idx:
      raise ValueError(f"adapt_only={adapt_only!r} selects no parameter; parameters: "
                       f"{', '.join(names)}")
    return idx

  def split(params) -> tuple:
    leaves = jax.tree.leaves(params)
    return tuple(leaves[i] for i in adapted_indices(params))

  def merge(params, adapted: tuple) -> PyTree:
    leaves, treedef = jax.tree.flatten(params)
    for i, a in zip(adapted_indices(params), adapted):
      leaves[i] = a
    return jax.tree.unflatten(treedef, leaves)

  def make_step(stop_inner_grad: bool):
    def step(theta, adapted, batch):
      loss, grads = jax.value_and_grad(lambda a: loss_fn(merge(theta["params"], a), batch))(
          adapted)
      if stop_inner_grad:
        grads = jax.lax.stop_gradient(grads)
      lrs = theta["inner_lr"] if learn_inner_lr else (inner_lr,) * len(adapted)
      return tuple(a - lr * g for a, lr, g in zip(adapted, lrs, grads)), {"loss": loss}
    return step

  problem = InnerProblem(
      init=lambda theta, key: split(theta["params"]),
      step=make_step(False),
      meta_loss=lambda theta, adapted, query: loss_fn(merge(theta["params"], adapted), query),
      first_order_step=make_step(True))
  estimate = estimators.first_order if first_order else estimators.full

  def over_tasks(fn, *batches):
    if spec is not None or chunk_size is not None:
      # One task per device at a time when not vectorized.
      size = chunk_size if vectorize or spec is None else shards(spec)
      return population_map(fn, 0, chunk_size=size, sharding=spec, what="meta-batch")(*batches)
    if vectorize:
      return jax.vmap(fn)(*batches)
    return jax.lax.map(lambda b: fn(*b), batches)

  def init(params) -> MAMLState:
    theta = {"params": params}
    adapted = split(params)  # also checks that adapt_only selects something
    if learn_inner_lr:
      theta["inner_lr"] = tuple(jnp.full_like(a, inner_lr) for a in adapted)
    return MAMLState(theta, meta_optimizer.init(theta), jnp.zeros((), jnp.int32))

  def meta_gradient(theta, support: Batch, query: Batch) -> tuple[jax.Array, PyTree, dict]:
    """Mean query loss after adaptation over a meta-batch, and its gradient in ``theta``."""
    def task(s, q):
      est = estimate(problem, theta, None, repeat(s, inner_steps), q)
      return est.meta_loss, est.grad, est.metrics["loss"][0]
    losses, grads, before = over_tasks(task, support, query)
    return losses.mean(), population_mean(grads), {"support_loss_before": before.mean()}

  def meta_step(state: MAMLState, support: Batch, query: Batch) -> tuple[MAMLState, dict]:
    loss, grad, metrics = meta_gradient(state.theta, support, query)
    updates, opt_state = meta_optimizer.update(grad, state.opt_state, state.theta)
    theta = optax.apply_updates(state.theta, updates)
    metrics = dict(metrics, query_loss=loss, meta_grad_norm=optax.tree.norm(grad))
    return MAMLState(theta, opt_state, state.step + 1), metrics

  def adapt(state: MAMLState, support: Batch, steps: Optional[int] = None) -> PyTree:
    steps = inner_steps if steps is None else check_int("steps", steps)
    adapted, _ = unroll(problem.step, state.theta, problem.init(state.theta, None),
                        repeat(support, steps))
    return merge(state.theta["params"], adapted)

  def measure(params, batch) -> dict:
    out = {"loss": loss_fn(params, batch)}
    if metrics_fn is not None:
      out.update(metrics_fn(params, batch))
    return out

  def evaluate(state: MAMLState, support: Batch, query: Batch, steps: Optional[int] = None,
               curve: bool = False) -> dict:
    steps = inner_steps if steps is None else check_int("steps", steps)
    theta = state.theta

    def task(s, q):
      def step_and_measure(th, adapted, batch):
        adapted, m = problem.step(th, adapted, batch)
        return adapted, (measure(merge(th["params"], adapted), q) if curve else m)
      adapted, per_step = unroll(step_and_measure, theta, problem.init(theta, None),
                                 repeat(s, steps))
      before = measure(theta["params"], q)
      after = measure(merge(theta["params"], adapted), q)
      out = dict(after, **{f"{k}_before": v for k, v in before.items()})
      if curve:
        out.update({f"curve/{k}": jnp.concatenate([before[k][None], per_step[k]])
                    for k in before})
      return out
    return over_tasks(task, support, query)

  return MAML(init, meta_step, adapt, evaluate, meta_gradient, problem, inner_steps)


# --- meta-training and the pre-training baseline, on the host-side driver ---------------

SampleFn = Callable[[jax.Array], Any]


def meta_train_maml(m: MAML, state: MAMLState, sample_episodes: SampleFn, *, key: jax.Array,
               iterations: int, chunk: int = 50, progress: bool = False, directory=None,
               checkpoint_every: Optional[int] = None,
               stop_after: Optional[int] = None) -> tuple[MAMLState, dict]:
  """Meta-steps on episodes ``sample_episodes(fold_in(key, t)) -> (support, query)``
  up to iteration ``iterations``, from ``state.step`` (a state returned earlier continues).

  Runs on :func:`metaopt.train.run_loop` in jitted chunks of ``chunk`` steps; with
  ``directory`` it writes ``metrics.jsonl`` and checkpoints and resumes from them.
  Returns the final state and the per-step metrics as arrays: of the steps this
  call ran, and with ``directory`` also of those read back from its metrics file.
  """
  advance = scan_advance(lambda s, episodes: m.meta_step(s, *episodes), sample_episodes, key)
  result = run_loop(advance, state, steps=iterations, chunk=chunk, start=int(state.step),
                    directory=directory, checkpoint_every=checkpoint_every, progress=progress,
                    desc="meta-training", stop_after=stop_after)
  return result.state, result.curves()


class PretrainState(NamedTuple):
  params: PyTree
  opt_state: PyTree
  step: jax.Array


def pretrain(loss_fn: LossFn, params: PyTree, sample_batch: SampleFn, *, key: jax.Array,
             steps: int, optimizer: Optional[optax.GradientTransformation] = None,
             chunk: int = 50, progress: bool = False) -> tuple[PyTree, dict]:
  """Joint pre-training baseline: plain training of ``params`` on ``sample_batch(key_t)``."""
  optimizer = optax.adam(1e-3) if optimizer is None else optimizer

  def step(s: PretrainState, batch):
    loss, grads = jax.value_and_grad(loss_fn)(s.params, batch)
    updates, opt_state = optimizer.update(grads, s.opt_state, s.params)
    return PretrainState(optax.apply_updates(s.params, updates), opt_state, s.step + 1), {
        "loss": loss}

  state = PretrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))
  result = run_loop(scan_advance(step, sample_batch, key), state, steps=steps,
                    chunk=min(chunk, steps), progress=progress, desc="pre-training")
  return result.state.params, result.curves()
