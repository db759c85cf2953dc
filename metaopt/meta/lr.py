"""Meta-training a learned LR controller with truncated backprop through training.

Several *lanes* train side by side, each on its own task drawn from a
:class:`~metaopt.tasks.TaskFamily` (dataset, width, depth, batch size, training
length) with a vmapped population of inner runs that differ in seed. Every meta
step advances each lane by one truncation segment and averages the TBPTT
meta-gradients; the meta-loss is the log validation loss averaged over the
segment's steps, which counters the short-horizon bias of judging only its end.
With ``meta_objective="val_error"`` it is the validation error (1 - accuracy) instead:
what the reports measure, piecewise constant in ``theta``, so only the forward
estimators (``es``, ``pes``) can follow it.
When a lane's run reaches its ``total_steps`` (or goes non-finite) it starts a
new task. Everything random derives from ``seed``, so a run killed at any point
and resumed from its orbax checkpoint ends with the same ``theta``.

``estimator="es"`` or ``"pes"`` replaces the backward pass by ``population``
antithetically perturbed forward runs per lane (:mod:`metaopt.estimators`);
under PES each lane carries its :class:`~metaopt.estimators.PESState` (runs and
accumulated perturbations) in the loop's state and checkpoints, and the lanes'
first runs end at staggered points so their restarts are not synchronized.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt import estimators
from metaopt.schedules import (CONTROLLERS, BaseOptimizer, LRController, current_lr,
                               init_controller, make_controller, save_controller,
                               scale_by_learned_lr, with_theta)
from metaopt.schedules.learned_lr import (DEFAULT_SETTINGS, FEATURE_NAMES, check_features,
                                         controller_kind)
from metaopt.tasks import TaskFamily, make_task, task_family
from metaopt.sharding import Sharding, abstract, population_map, replicate, resolve
from metaopt.train import run_loop
from metaopt.unroll import InnerProblem
from metaopt.validation import check_choice, check_int, check_positive, check_seed

PyTree = Any
VAL_BATCH = 128
META_OBJECTIVES = ("log_val_loss", "val_error")


@dataclasses.dataclass(frozen=True)
class MetaLRConfig:
  """Settings of :func:`meta_train`."""
  family: TaskFamily
  lanes: int = 4                 # tasks trained side by side each meta step
  population: int = 2            # inner runs per lane, vmapped: seeds (tbptt), perturbed runs (es/pes)
  segment_length: int = 25       # inner steps per truncation
  meta_steps: int = 300
  meta_lr: float = 3e-3
  clip_norm: float = 1.0         # global-norm clip of the meta-gradient
  learning_rate: float = 1e-3     # the LR an untrained controller keeps; bounds are relative to it
  hidden: tuple[int, ...] = (32, 32)
  min_lr_factor: float = DEFAULT_SETTINGS["min_lr_factor"]
  max_lr_factor: float = DEFAULT_SETTINGS["max_lr_factor"]
  max_log_change: float = DEFAULT_SETTINGS["max_log_change"]
  response_time: float = DEFAULT_SETTINGS["response_time"]
  min_response_steps: float = DEFAULT_SETTINGS["min_response_steps"]
  checkpoint_every: int = 50
  seed: int = 0
  estimator: str = "tbptt"       # meta-gradient: "tbptt" (backprop), "es" or "pes" (forward only)
  sigma: float = 0.01            # es/pes: standard deviation of theta's perturbations
  controller: str = "mlp"        # "mlp" (LRController) or "lstm" (LSTMController), widths `hidden`
  update_every: int = 1          # the controller decides once per this many inner steps
  optimizer: BaseOptimizer = BaseOptimizer()  # the directions the controller's LR scales
  features: tuple[str, ...] = FEATURE_NAMES  # what the controller reads (learned_lr.FEATURE_NAMES)
  # More families, e.g. encoders beside MLPs (a family is a product of its choices):
  # lane i draws its tasks from lane_family(i), i.e. (family, *families)[i % (1 + len)].
  families: tuple[TaskFamily, ...] = ()
  # What each step's validation batch scores: "log_val_loss", or "val_error" (1 - accuracy,
  # es/pes only), so a run that trades accuracy for a lower loss is not rewarded.
  meta_objective: str = "log_val_loss"

  def __post_init__(self):
    for name in ("lanes", "population", "segment_length", "meta_steps", "checkpoint_every",
                 "update_every"):
      check_int(name, getattr(self, name))
    check_choice("estimator", self.estimator, estimators.TRUNCATED)
    check_choice("controller", self.controller, CONTROLLERS)
    check_choice("meta_objective", self.meta_objective, META_OBJECTIVES)
    if self.meta_objective == "val_error" and self.estimator == "tbptt":
      raise ValueError("meta_objective='val_error' has no gradient (accuracy is piecewise "
                       "constant in theta): use estimator='es' or 'pes', got estimator='tbptt'")
    check_positive("sigma", self.sigma)
    if self.estimator in ("es", "pes") and self.population % 2:
      raise ValueError(f"population must be even with estimator={self.estimator!r} (antithetic "
                       f"pairs theta + eps, theta - eps), got {self.population}")
    check_seed("seed", self.seed)
    for name in ("meta_lr", "clip_norm", "learning_rate"):
      check_positive(name, getattr(self, name))
    for label, family in (("family", self.family),
                          *((f"families[{i}]", f) for i, f in enumerate(self.families))):
      if not isinstance(family, TaskFamily):
        raise ValueError(f"{label} must be a TaskFamily (metaopt.tasks.task_family), "
                         f"got {family!r}")
      task_family(*family)  # names, sizes, batches that fit
    for width in self.hidden:
      check_int("hidden", width)
    object.__setattr__(self, "features", check_features(self.features, "MetaLRConfig"))
    bad = sorted({s for f in self.task_families for s in f.total_steps
                  if s % self.segment_length})
    if bad:
      raise ValueError(f"training lengths {bad} are not multiples of "
                       f"segment_length={self.segment_length}")

  @property
  def task_families(self) -> tuple[TaskFamily, ...]:
    return (self.family, *self.families)

  def lane_family(self, lane: int) -> TaskFamily:
    """The family meta-training lane ``lane`` draws its tasks from."""
    return self.task_families[lane % len(self.task_families)]

  def max_batch(self, task_config) -> int:
    """The largest batch size of the families with ``task_config``'s dataset: a lane's
    batches are sampled at this size and masked down to the task's."""
    families = [f for f in self.task_families if task_config.dataset in f.datasets]
    return max(b for f in families or (self.family,) for b in f.batch_sizes)

  @property
  def settings(self) -> dict:
    """Keyword arguments of :func:`scale_by_learned_lr` besides learning_rate and
    total_steps: the controller runs with these wherever it is deployed."""
    return dict(min_lr_factor=self.min_lr_factor, max_lr_factor=self.max_lr_factor,
                max_log_change=self.max_log_change, response_time=self.response_time,
                min_response_steps=self.min_response_steps)


def config_of_saved(config: MetaLRConfig, saved) -> MetaLRConfig:
  """``config`` with what a saved controller (:func:`metaopt.load_controller`) was trained
  with: network kind and widths, LR, settings, update interval and features; its
  :func:`learned_lr_tx` then runs that controller as deployed."""
  return dataclasses.replace(config, hidden=tuple(saved.controller.hidden),
                             controller=controller_kind(saved.controller),
                             learning_rate=saved.learning_rate, **saved.settings,
                             update_every=saved.update_every, features=saved.features)


class InnerState(NamedTuple):
  params: PyTree
  opt_state: PyTree
  key: jax.Array   # raw uint32 key; step t draws fold_in(fold_in(key, t), 0/1)
  step: jax.Array
  model_state: PyTree = None  # a stateful model's BatchNorm statistics; None otherwise


def learned_lr_tx(controller, theta, config: MetaLRConfig, total_steps):
  """The base optimizer's directions (Adam by default) scaled by the learned LR
  (``eps_root`` keeps meta-gradients through Adam finite)."""
  return optax.chain(
      config.optimizer.direction(eps_root=1e-8, total_steps=total_steps),
      scale_by_learned_lr(controller, theta, learning_rate=config.learning_rate,
                          total_steps=total_steps, update_every=config.update_every,
                          features=config.features, **config.settings))


def lr_problem(task, arrays: dict, controller, config: MetaLRConfig, total_steps,
               batch_size=None) -> InnerProblem:
  """The inner problem: train ``task`` with the controller; meta-loss = log val loss
  (or the validation error, ``config.meta_objective``) on a fresh batch each step.

  With ``batch_size`` (possibly traced) each step samples its families' largest
  batch and masks it down to ``batch_size`` examples, so tasks that differ only
  in batch size share one compiled program. A stateful model (BatchNorm) carries its
  statistics in the state through the unroll and ignores ``batch_size``: it trains on
  batches of its task's own size (masked rows would enter the batch statistics), and
  the meta-loss reads the running statistics, as evaluation does.
  """
  if task.stateful:
    batch_size = None
  tx = learned_lr_tx(controller, None, config, total_steps)
  max_batch = config.max_batch(task.config)

  def sample_train_batch(key):
    if batch_size is None:
      return task.sample_batch(arrays, key)
    batch = task.sample_batch(arrays, key, batch_size=max_batch)
    return dict(batch, weight=(jnp.arange(max_batch) < batch_size).astype(jnp.float32))

  def init(theta, key):
    variables = task.init_variables(jax.random.fold_in(key, 0))
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    opt_state = learned_lr_tx(controller, theta, config, total_steps).init(params)
    return InnerState(params, opt_state, key, jnp.zeros((), jnp.int32),
                      model_state if task.stateful else None)

  def step(theta, state, _):
    key = jax.random.fold_in(jax.random.fold_in(state.key, state.step), 0)
    (loss, model_state), grads = jax.value_and_grad(task.loss_and_state, has_aux=True)(
        state.params, state.model_state, sample_train_batch(key))
    # theta enters through the state; re-inserting it is what jax.grad differentiates.
    updates, opt_state = tx.update(grads, with_theta(state.opt_state, theta),
                                   state.params, value=loss)
    new = InnerState(optax.apply_updates(state.params, updates), opt_state,
                     state.key, state.step + 1, model_state)
    return new, {"loss": loss, "learning_rate": current_lr(opt_state)}

  def meta_loss(theta, state, _):
    key = jax.random.fold_in(jax.random.fold_in(state.key, state.step), 1)
    batch = task.sample_batch(arrays, key, split="val", batch_size=VAL_BATCH)
    if config.meta_objective == "val_error" or task.stateful:
      # Inference mode (a stateful model's running statistics), as evaluation scores it.
      metrics = task.metrics(state.params, batch["x"], batch["y"], state.model_state)
      if config.meta_objective == "val_error":
        return 1.0 - metrics["accuracy"]
      return jnp.log(metrics["loss"])
    return jnp.log(task.loss(state.params, batch))

  return InnerProblem(init=init, step=step, meta_loss=meta_loss)


def _finite_mean(values, grads):
  """Mean of the members whose loss and gradient are finite, and how many were not."""
  ok = jnp.isfinite(values)
  for g in jax.tree.leaves(grads):
    ok &= jnp.all(jnp.isfinite(g.reshape(g.shape[0], -1)), axis=1)
  n = jnp.sum(ok)
  mean = lambda x: jnp.sum(jnp.where(ok.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0.0), 0) / jnp.maximum(n, 1)
  return mean(values), jax.tree.map(mean, grads), n


class _LaneFns(NamedTuple):
  init: Any
  segment: Any


class MetaTrainResult(NamedTuple):
  theta: PyTree
  controller: LRController  # or an LSTMController (MetaLRConfig.controller="lstm")
  history: list        # one dict of metrics per meta step
  skipped_members: int  # inner runs whose meta-gradient was non-finite, dropped
  skipped_steps: int    # meta steps with no finite meta-gradient at all
  seconds: float       # meta-training wall time, resumed runs included
  config: Optional["MetaLRConfig"] = None

  def save(self, path, *, info: Optional[dict] = None):
    """Writes the controller with the settings and LR it was trained with
    (:func:`metaopt.save_controller`), for :func:`metaopt.pretrained_lr` (``path=``)."""
    return save_controller(path, self.theta, settings=self.config.settings,
                           hidden=self.config.hidden, learning_rate=self.config.learning_rate,
                           kind=self.config.controller, update_every=self.config.update_every,
                           features=self.config.features, info={"meta_steps": self.config.meta_steps, "seed": self.config.seed,
                                 **(info or {})})


class MetaTrainer:
  """The meta-training loop on :func:`metaopt.train.run_loop`; see :func:`meta_train`.

  The loop's array state is ``{"theta", "meta_opt_state", "lanes"}`` (the inner
  states of every lane); its record says which task each lane is on: the
  lane's restart ``round`` (which fixes the task) and its step ``t`` in that task.
  """

  def __init__(self, config: MetaLRConfig, *, sharding: Sharding = None,
               chunk_size: Optional[int] = None):
    self.config = config
    # The population axis of each lane: split across devices and/or mapped in chunks.
    self.sharding = resolve(sharding, config.population)
    if chunk_size is not None and config.population % check_int("chunk_size", chunk_size):
      raise ValueError(f"chunk_size={chunk_size} does not divide population="
                       f"{config.population}; use a divisor of it")
    self._map = dict(chunk_size=chunk_size, sharding=self.sharding)
    self.controller = make_controller(config.controller, config.hidden)
    self.meta_opt = optax.chain(optax.clip_by_global_norm(config.clip_norm),
                                optax.adam(config.meta_lr))
    self.root = jax.random.PRNGKey(config.seed)
    self._fns: dict = {}
    self._tasks: dict = {}   # lane -> (round, task) of the task it is on
    self._apply = jax.jit(self._apply_update)

  # --- lanes -------------------------------------------------------------------

  def _fns_for(self, task) -> _LaneFns:
    """Jitted init/segment functions, compiled once per task *shape*.

    Training length, batch size and data are arguments, so tasks that differ
    only in those (or in seed) share the compiled code.
    """
    c = task.config
    # A stateful model's batches are not masked (lr_problem): one program per batch size.
    shape_key = (c.dataset, c.model, c.width, c.depth) + ((c.batch_size,) if task.stateful
                                                          else ())
    if shape_key not in self._fns:
      config, controller, K = self.config, self.controller, self.config.segment_length

      def init(theta, keys, arrays, total_steps):
        problem = lr_problem(task, arrays, controller, config, total_steps)
        return population_map(problem.init, (None, 0), **self._map)(theta, keys)

      def segment(theta, states, arrays, total_steps, batch_size):
        problem = lr_problem(task, arrays, controller, config, total_steps, batch_size)
        est = population_map(lambda s: estimators.tbptt(problem, theta, s, None, None,
                                                        length=K), **self._map)(states)
        loss, grad, n_ok = _finite_mean(est.meta_loss, est.grad)
        lr = est.metrics["learning_rate"]
        return loss, grad, n_ok, est.state, jnp.mean(lr), jnp.mean(est.metrics["loss"])

      if config.estimator != "tbptt":
        init, segment = self._perturbed_fns(task)
      self._fns[shape_key] = _LaneFns(jax.jit(init), jax.jit(segment))
    return self._fns[shape_key]

  def _perturbed_fns(self, task):
    """init/segment of a lane under ``es`` or ``pes``: forward runs only.

    A lane's state is one inner state (es: every perturbed run continues it) or a
    :class:`~metaopt.estimators.PESState` (pes: each antithetic pair carries its
    own two runs and accumulated perturbations). ``n_ok`` counts the runs of the
    pairs whose losses were finite.
    """
    config, controller, K = self.config, self.controller, self.config.segment_length

    def init(theta, keys, arrays, total_steps):
      problem = lr_problem(task, arrays, controller, config, total_steps)
      if config.estimator == "es":
        return problem.init(theta, keys[0])
      state = estimators.pes_init(problem, theta, keys[0], population=config.population)
      # Every pair starts its runs at the first pes() call (truncations 0), which overwrites
      # these placeholders: zeros let XLA drop their computation (a faster compile).
      return state._replace(particles=jax.tree.map(jnp.zeros_like, state.particles))

    def segment(theta, state, arrays, total_steps, batch_size, key):
      problem = lr_problem(task, arrays, controller, config, total_steps, batch_size)
      kw = dict(key=key, sigma=config.sigma, length=K, sharding=self.sharding)  # pairs axis
      if config.estimator == "es":
        est = estimators.es(problem, theta, state, None, None, population=config.population,
                            **kw)
      else:
        est = estimators.pes(problem, theta, state, None, None, **kw)
      ok = jnp.isfinite(est.meta_loss)
      for g in jax.tree.leaves(est.grad):
        ok &= jnp.all(jnp.isfinite(g))
      n_ok = jnp.where(ok, 2 * jnp.sum(est.metrics["finite_pairs"]), 0)
      return (est.meta_loss, est.grad, n_ok, est.state,
              jnp.nanmean(est.metrics["learning_rate"]), jnp.nanmean(est.metrics["loss"]))
    return init, segment

  def _members(self) -> int:
    """Init keys per lane: one per seed (tbptt); one (es, pes: the estimator splits it)."""
    return self.config.population if self.config.estimator == "tbptt" else 1

  def _run_end(self, lane: int, record: dict, task) -> int:
    """The step at which the lane's current run ends. Under pes, lane ``i``'s first run
    is cut after about ``(i + 1) / lanes`` of its segments, so the lanes' runs (and
    their accumulators) restart at staggered meta steps, not all at once."""
    total = task.config.total_steps
    if self.config.estimator != "pes" or record["round"] > 0:
      return total
    K, lanes = self.config.segment_length, self.config.lanes
    return K * max(1, -(-(total // K) * (lane + 1) // lanes))

  def _perturbation_key(self, lane: int, meta_step: int) -> jax.Array:
    """es/pes perturbations of ``lane`` at ``meta_step``: fixed by the seed, so a resumed
    run draws what the uninterrupted one did."""
    return jax.random.fold_in(jax.random.fold_in(self.root, 2000 + lane), meta_step)

  def _task(self, lane: int, round_: int):
    """The task lane ``lane`` trains in its restart ``round_`` (drawn from the seed)."""
    if self._tasks.get(lane, (None,))[0] != round_:
      key = jax.random.fold_in(jax.random.fold_in(self.root, 1000 + lane), round_)
      self._tasks[lane] = (round_, make_task(self.config.lane_family(lane).sample(key)))
    return self._tasks[lane][1]

  def _start_lane(self, theta, lane: int, round_: int) -> PyTree:
    """Fresh inner states of the population on the lane's task of ``round_``."""
    task = self._task(lane, round_)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(task.config.seed), i))(
        jnp.arange(self._members()))
    return self._fns_for(task).init(theta, keys, task.arrays(),
                                    jnp.float32(task.config.total_steps))

  # --- the loop --------------------------------------------------------------------

  def _apply_update(self, theta, opt_state, grad):
    updates, opt_state = self.meta_opt.update(grad, opt_state, theta)
    return optax.apply_updates(theta, updates), opt_state, optax.tree.norm(grad)

  def initial(self) -> tuple[PyTree, dict]:
    """The loop's state and record at meta step 0."""
    theta = init_controller(jax.random.fold_in(self.root, 0), self.controller,
                            self.config.features)
    lanes = [self._start_lane(theta, i, 0) for i in range(self.config.lanes)]
    record = {"lanes": [{"round": 0, "t": 0} for _ in range(self.config.lanes)],
              "skipped_members": 0, "skipped_steps": 0}
    # Sharded: theta starts replicated, as every meta step leaves it (one compiled step).
    meta = replicate({"theta": theta, "meta_opt_state": self.meta_opt.init(theta)},
                     self.sharding)
    return {**meta, "lanes": lanes}, record

  def target(self, record: dict) -> PyTree:
    """Abstract loop state for the lanes recorded in ``record`` (restores checkpoints)."""
    theta = init_controller(jax.random.fold_in(self.root, 0), self.controller,
                            self.config.features)
    states = []
    for i, lane in enumerate(record["lanes"]):
      task = self._task(i, lane["round"])
      keys = jnp.zeros((self._members(), 2), jnp.uint32)
      states.append(jax.eval_shape(self._fns_for(task).init, theta, keys, task.arrays(),
                                   jnp.float32(1.0)))
    meta = {"theta": theta, "meta_opt_state": self.meta_opt.init(theta)}
    # Sharded: restore onto the mesh, theta replicated and tbptt populations split
    # (es/pes lane states come back replicated; their pairs are split inside the step).
    return {**abstract(meta, self.sharding, split=False),
            "lanes": abstract(states, self.sharding, split=self.config.estimator == "tbptt")}

  def advance(self, state: PyTree, record: dict, start: int, n: int):
    """``n`` meta steps: each lane runs one truncation; lanes that finish their task or
    go non-finite restart on a new one. Returns the loop's ``(state, record, rows)``."""
    cfg = self.config
    theta, opt_state, lanes = state["theta"], state["meta_opt_state"], list(state["lanes"])
    record = {**record, "lanes": [dict(l) for l in record["lanes"]]}
    rows = []
    for j in range(n):
      grads, weights, losses, lrs, names = [], [], [], [], []
      for i, lane in enumerate(record["lanes"]):
        task = self._task(i, lane["round"])
        key = () if cfg.estimator == "tbptt" else (self._perturbation_key(i, start + j),)
        loss, grad, n_ok, states, lr, _ = self._fns_for(task).segment(
            theta, lanes[i], task.arrays(), jnp.float32(task.config.total_steps),
            jnp.int32(task.config.batch_size), *key)
        n_ok = int(n_ok)
        record["skipped_members"] += cfg.population - n_ok
        if n_ok:
          grads.append(grad)
          weights.append(n_ok)
          losses.append(float(loss))
          lrs.append(float(lr))
        names.append(task.config.name)
        t = lane["t"] + cfg.segment_length
        if n_ok < cfg.population or t >= self._run_end(i, lane, task):
          record["lanes"][i] = {"round": lane["round"] + 1, "t": 0}
          lanes[i] = self._start_lane(theta, i, lane["round"] + 1)
        else:
          record["lanes"][i] = {"round": lane["round"], "t": t}
          lanes[i] = states
      if grads:
        w = np.asarray(weights, np.float32) / sum(weights)
        grad = jax.tree.map(lambda *g: sum(wi * gi for wi, gi in zip(w, g)), *grads)
        theta, opt_state, gnorm = self._apply(theta, opt_state, grad)
        gnorm = float(gnorm)
      else:
        record["skipped_steps"] += 1
        gnorm = float("nan")
      rows.append({"meta_loss": float(np.average(losses, weights=weights)) if losses else None,
                   "meta_grad_norm": gnorm, "mean_lr": float(np.mean(lrs)) if lrs else None,
                   "skipped_members": record["skipped_members"],
                   "skipped_steps": record["skipped_steps"], "tasks": names})
    return {"theta": theta, "meta_opt_state": opt_state, "lanes": lanes}, record, rows

  def run(self, out_dir: Optional[str] = None, *, progress: bool = True,
          stop_after: Optional[int] = None) -> MetaTrainResult:
    """Meta-trains, resuming from ``out_dir``'s checkpoints when there are any.

    ``stop_after`` ends the loop early at that meta step, as a kill would
    (for tests of resume).
    """
    state, record = self.initial()
    postfix = lambda row: ({} if row["meta_loss"] is None else
                           {"meta_loss": f"{row['meta_loss']:.3f}", "lr": f"{row['mean_lr']:.2e}"})
    result = run_loop(self.advance, state, record=record, steps=self.config.meta_steps,
                      directory=out_dir, checkpoint_every=self.config.checkpoint_every,
                      target=self.target, progress=progress, desc="meta-training",
                      postfix=postfix, stop_after=stop_after)
    return MetaTrainResult(result.state["theta"], self.controller, result.history,
                           result.record["skipped_members"], result.record["skipped_steps"],
                           result.seconds, self.config)


def meta_train(config: MetaLRConfig, out_dir: Optional[str] = None, *,
               progress: bool = True, stop_after: Optional[int] = None,
               sharding: Sharding = None, chunk_size: Optional[int] = None) -> MetaTrainResult:
  """Meta-trains an :class:`LRController` (``config.controller="lstm"``: an
  :class:`~metaopt.schedules.LSTMController`) on ``config.family`` (and
  ``config.families``), with the meta-gradients of ``config.estimator`` (``"tbptt"``,
  ``"es"`` or ``"pes"``).

  With ``out_dir`` it writes ``metrics.jsonl`` (one line per meta step) and
  orbax checkpoints every ``config.checkpoint_every`` steps, and resumes from
  the latest checkpoint found there.

  ``sharding`` splits each lane's population across devices (``None``, ``"auto"``,
  a ``Mesh`` or a ``NamedSharding``: :mod:`metaopt.sharding`); the population must
  divide evenly over them. ``chunk_size`` vmaps that many members at a time, so
  memory stays flat as the population grows. Both give the same ``theta`` as
  neither, to floating-point tolerance.
  """
  return MetaTrainer(config, sharding=sharding, chunk_size=chunk_size).run(
      out_dir, progress=progress, stop_after=stop_after)
