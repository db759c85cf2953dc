"""An LR controller learned by reinforcement learning (PPO), after Xu et al. (2019).

An *episode* is a short training run of a task drawn from a
:class:`~metaopt.tasks.TaskFamily`: Adam with weight decay, ``epochs`` epochs of
``epoch_steps`` steps. Before each epoch the policy reads epoch-level metrics
(:data:`OBSERVATION_NAMES`: training and validation loss, validation accuracy, the
current LR, progress, recent change) and multiplies the LR by its action; the
reward is the epoch's validation improvement, ``log(previous val loss / val loss)``,
so an episode's return is ``log(first val loss / last val loss)``.

Actions are an LR multiplier, either continuous in ``action_range`` (a Gaussian in
log space, clipped to the range) or discrete {down, keep, up} (multiply by
``action_range[0]``, 1 or ``action_range[1]``). The policy and a learned value
baseline are trained with PPO (clipped surrogate objective, GAE), on many episodes
vmapped and jitted: one compiled program per task shape runs a PPO iteration
(rollout, advantages, update).

Deployment: :func:`scale_by_rl_lr` is an optax transform that changes the LR once
per ``epoch_steps`` steps by the policy's mean action; it needs the epoch's
validation loss and accuracy as extra args (``val_loss=``, ``val_accuracy=``), which
``metaopt.train`` passes with ``feed_val_loss=True`` when it evaluates every
``epoch_steps`` steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from metaopt.schedules import scale_by_lr
from metaopt.tasks import TaskFamily, make_task, task_family
from metaopt.train import run_loop
from metaopt.unroll import unroll
from metaopt.validation import check_choice, check_int, check_number, check_positive, check_seed

PyTree = Any
OBSERVATION_NAMES = (
    "progress",               # epochs done / epochs
    "log_train_vs_initial",   # log(mean training loss of the last epoch / first one)
    "log_val_vs_initial",     # log(val loss / first val loss)
    "val_accuracy",
    "log_val_change",         # log(val loss / previous val loss): recent change
    "log_train_change",       # log(train loss / previous epoch's)
    "log_val_vs_train",       # generalization gap
    "log_lr_vs_base",         # current LR relative to the starting LR
)
NUM_OBSERVATIONS = len(OBSERVATION_NAMES)
OBS_CLIP = 5.0
ACTIONS = ("continuous", "discrete")
POLICY_FILE = "rl_policy.msgpack"
POLICY_CONFIG = "rl_policy.json"
POLICY_FORMAT = "metaopt-rl-lr-policy"
_TINY = 1e-12


def check_action_range(action_range: Sequence[float]) -> tuple[float, float]:
  """``(low, high)`` LR multipliers with ``0 < low <= 1 <= high`` and ``low < high``;
  ValueError naming the value otherwise."""
  try:
    low, high = (float(x) for x in action_range)
  except (TypeError, ValueError):
    raise ValueError(f"action_range must be two multipliers (low, high), "
                     f"got {action_range!r}") from None
  if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= 1 <= high and low < high):
    raise ValueError(f"action_range must contain 1 (0 < low <= 1 <= high, low < high), "
                     f"got {tuple(action_range)!r}")
  return low, high


def check_update_every(name: str, value: Any) -> int:
  """An update interval: an integer >= 1 (steps between LR decisions)."""
  return check_int(name, value, low=1)


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """Settings of :func:`train_rl`."""
  family: TaskFamily              # datasets, models, widths, depths, batch sizes of episodes
  epochs: int = 20                # decisions per episode
  epoch_steps: int = 20           # inner steps per epoch
  episodes: int = 16              # episodes per PPO iteration, vmapped (one task, many seeds)
  iterations: int = 100           # PPO iterations; each draws a task from the family
  action: str = "continuous"      # or "discrete": {down, keep, up}
  action_range: tuple[float, float] = (0.5, 2.0)
  learning_rate: float = 1e-3     # inner Adam LR at the start of every run
  weight_decay: float = 1e-5
  min_lr_factor: float = 1e-2     # the LR stays within learning_rate x [min, max]
  max_lr_factor: float = 10.0
  meta_lr: float = 1e-4           # PPO's Adam
  hidden: tuple[int, ...] = (32, 32)
  update_epochs: int = 4          # PPO passes over each rollout
  minibatches: int = 4
  clip_eps: float = 0.2
  gamma: float = 0.99
  gae_lambda: float = 0.95
  value_coef: float = 0.5
  entropy_coef: float = 0.0
  max_grad_norm: float = 0.5
  init_std: float = 0.3           # initial std of the log-multiplier (continuous actions)
  checkpoint_every: int = 25
  seed: int = 0

  def __post_init__(self):
    for name in ("epochs", "episodes", "iterations", "update_epochs", "minibatches",
                 "checkpoint_every"):
      check_int(name, getattr(self, name))
    check_update_every("epoch_steps", self.epoch_steps)
    check_seed("seed", self.seed)
    check_choice("action", self.action, ACTIONS)
    check_action_range(self.action_range)
    for name in ("learning_rate", "meta_lr", "clip_eps", "max_grad_norm", "init_std"):
      check_positive(name, getattr(self, name))
    check_number("weight_decay", self.weight_decay, low=0.0)
    check_number("min_lr_factor", self.min_lr_factor, low=0.0, low_open=True, high=1.0)
    check_number("max_lr_factor", self.max_lr_factor, low=1.0)
    for name in ("gamma", "gae_lambda"):
      check_number(name, getattr(self, name), low=0.0, high=1.0)
    for name in ("value_coef", "entropy_coef"):
      check_number(name, getattr(self, name), low=0.0)
    for width in self.hidden:
      check_int("hidden", width)
    if (self.epochs * self.episodes) % self.minibatches:
      raise ValueError(f"minibatches={self.minibatches} must divide epochs x episodes = "
                       f"{self.epochs * self.episodes}")
    if not isinstance(self.family, TaskFamily):
      raise ValueError(f"family must be a TaskFamily (metaopt.tasks.task_family), "
                       f"got {self.family!r}")
    task_family(*self.family)

  @property
  def policy_settings(self) -> dict:
    """What deployment needs besides the weights (:func:`scale_by_rl_lr`)."""
    return dict(action=self.action, action_range=list(self.action_range),
                hidden=list(self.hidden), epochs=self.epochs,
                min_lr_factor=self.min_lr_factor, max_lr_factor=self.max_lr_factor,
                learning_rate=self.learning_rate, weight_decay=self.weight_decay)


# --- the policy -------------------------------------------------------------------------


class Policy(nn.Module):
  """Actor and critic MLPs (tanh) over :data:`OBSERVATION_NAMES`.

  Returns ``(actor output, value)``: the mean log-multiplier for continuous actions
  (with a learned ``log_std``), or the logits of {down, keep, up}. The actor's last
  layer starts near zero: an untrained policy keeps the LR on average.
  """
  hidden: Sequence[int] = (32, 32)
  discrete: bool = False
  init_std: float = 0.3

  @nn.compact
  def __call__(self, obs):
    a = obs
    for width in self.hidden:
      a = nn.tanh(nn.Dense(width, kernel_init=nn.initializers.orthogonal(np.sqrt(2)))(a))
    out = nn.Dense(3 if self.discrete else 1, kernel_init=nn.initializers.orthogonal(0.01))(a)
    v = obs
    for width in self.hidden:
      v = nn.tanh(nn.Dense(width, kernel_init=nn.initializers.orthogonal(np.sqrt(2)))(v))
    value = nn.Dense(1, kernel_init=nn.initializers.orthogonal(1.0))(v)[..., 0]
    if self.discrete:
      return out, value
    log_std = self.param("log_std", nn.initializers.constant(math.log(self.init_std)), ())
    return (out[..., 0], jnp.broadcast_to(log_std, out.shape[:-1])), value


def _policy(settings: dict) -> Policy:
  return Policy(hidden=tuple(settings["hidden"]), discrete=settings["action"] == "discrete",
                init_std=settings.get("init_std", 0.3))


def _log_prob(out, action, discrete: bool):
  if discrete:
    return jnp.take_along_axis(jax.nn.log_softmax(out), action[..., None], axis=-1)[..., 0]
  mean, log_std = out
  return -0.5 * ((action - mean) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * math.log(2 * math.pi)


def _entropy(out, discrete: bool):
  if discrete:
    logp = jax.nn.log_softmax(out)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  return out[1] + 0.5 * math.log(2 * math.pi * math.e)


def _multiplier(action, settings: dict, discrete: bool):
  """LR multiplier of an action: a clipped log-multiplier, or down/keep/up."""
  low, high = settings["action_range"]
  if discrete:
    return jnp.asarray([low, 1.0, high], jnp.float32)[action]
  return jnp.exp(jnp.clip(action, math.log(low), math.log(high)))


def _mean_action(out, discrete: bool):
  return jnp.argmax(out, axis=-1) if discrete else out[0]


def init_policy(key: jax.Array, settings: dict) -> PyTree:
  """Fresh policy weights for ``settings`` (:attr:`RLConfig.policy_settings`)."""
  return _policy(settings).init(key, jnp.zeros((NUM_OBSERVATIONS,)))["params"]


# --- epoch-level metrics, shared by episodes and the deployed transform --------------------


class EpochStats(NamedTuple):
  """What the observation is computed from, updated once per epoch."""
  epoch: jax.Array         # decisions made so far
  initial_train: jax.Array
  initial_val: jax.Array
  prev_train: jax.Array
  prev_val: jax.Array


def _safe_log_ratio(a, b):
  ok = jnp.isfinite(a) & jnp.isfinite(b) & (a > 0) & (b > 0)
  r = jnp.log(jnp.maximum(jnp.where(ok, a, 1.0), _TINY)) - jnp.log(
      jnp.maximum(jnp.where(ok, b, 1.0), _TINY))
  return jnp.where(ok, r, OBS_CLIP)  # a blown-up loss reads as "much worse"


def init_stats(train_loss, val_loss) -> EpochStats:
  t, v = jnp.asarray(train_loss, jnp.float32), jnp.asarray(val_loss, jnp.float32)
  return EpochStats(jnp.zeros((), jnp.int32), t, v, t, v)


def observe(stats: EpochStats, train_loss, val_loss, val_accuracy, lr, base_lr, epochs
            ) -> tuple[jax.Array, EpochStats]:
  """The observation before the next epoch, and the stats it leaves for the one after."""
  train_loss = jnp.asarray(train_loss, jnp.float32)
  val_loss = jnp.asarray(val_loss, jnp.float32)
  obs = jnp.stack([
      jnp.clip(stats.epoch / epochs, 0.0, 1.0),
      _safe_log_ratio(train_loss, stats.initial_train),
      _safe_log_ratio(val_loss, stats.initial_val),
      jnp.where(jnp.isfinite(val_accuracy), val_accuracy, 0.0),
      _safe_log_ratio(val_loss, stats.prev_val),
      _safe_log_ratio(train_loss, stats.prev_train),
      _safe_log_ratio(val_loss, train_loss),
      jnp.log(lr / base_lr),
  ]).astype(jnp.float32)
  obs = jnp.clip(obs, -OBS_CLIP, OBS_CLIP)
  return obs, EpochStats(stats.epoch + 1, stats.initial_train, stats.initial_val,
                         train_loss, val_loss)


def _next_lr(lr, multiplier, settings: dict):
  base = settings["learning_rate"]
  return jnp.clip(lr * multiplier, base * settings["min_lr_factor"],
                  base * settings["max_lr_factor"]).astype(jnp.float32)


# --- episodes and PPO -----------------------------------------------------------------------


class EpisodeState(NamedTuple):
  params: PyTree
  opt_state: PyTree
  key: jax.Array
  step: jax.Array
  lr: jax.Array
  stats: EpochStats
  val_loss: jax.Array
  val_accuracy: jax.Array
  train_loss: jax.Array    # mean training loss of the last epoch


class Transition(NamedTuple):
  obs: jax.Array
  action: jax.Array
  log_prob: jax.Array
  value: jax.Array
  reward: jax.Array
  lr: jax.Array


def direction(weight_decay: float) -> optax.GradientTransformation:
  """The inner optimizer's direction: Adam, plus decoupled weight decay (AdamW)."""
  return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(weight_decay))


def episode_fns(task, config: RLConfig):
  """``(rollout, iteration)`` for one task, pure: see :func:`train_rl`."""
  settings = dict(config.policy_settings, init_std=config.init_std)
  policy = _policy(settings)
  discrete = config.action == "discrete"
  tx = direction(config.weight_decay)

  def evaluate(params, arrays):
    m = task.metrics(params, arrays["x_val"], arrays["y_val"])
    return m["loss"], m["accuracy"]

  def start(key, arrays):
    params = task.init(jax.random.fold_in(key, 0))
    data_key = jax.random.fold_in(key, 1)
    first = task.loss(params, task.sample_batch(arrays, jax.random.fold_in(data_key, 0)))
    val, acc = evaluate(params, arrays)
    return EpisodeState(params, tx.init(params), data_key, jnp.zeros((), jnp.int32),
                        jnp.asarray(config.learning_rate, jnp.float32), init_stats(first, val),
                        val, acc, first)

  def train_step(lr, state: EpisodeState, arrays):
    key = jax.random.fold_in(state.key, state.step)
    loss, grads = jax.value_and_grad(task.loss)(state.params, task.sample_batch(arrays, key))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, scale_by_lr(updates, lr))
    return state._replace(params=params, opt_state=opt_state, step=state.step + 1), loss

  def env_step(policy_params, state: EpisodeState, key, arrays):
    obs, stats = observe(state.stats, state.train_loss, state.val_loss, state.val_accuracy,
                         state.lr, config.learning_rate, config.epochs)
    out, value = policy.apply({"params": policy_params}, obs)
    if discrete:
      action = jax.random.categorical(key, out)
    else:
      mean, log_std = out
      action = mean + jnp.exp(log_std) * jax.random.normal(key, ())
    log_prob = _log_prob(out, action, discrete)
    lr = _next_lr(state.lr, _multiplier(action, settings, discrete), settings)
    state, losses = unroll(lambda lr_, s, _: train_step(lr_, s, arrays), lr, state, None,
                           length=config.epoch_steps)
    val, acc = evaluate(state.params, arrays)
    reward = jnp.clip(_safe_log_ratio(state.val_loss, val), -OBS_CLIP, OBS_CLIP)
    # A run that blew up is punished once per epoch, and its params stay blown up.
    reward = jnp.where(jnp.isfinite(val), reward, -OBS_CLIP)
    state = state._replace(lr=lr, stats=stats, val_loss=val, val_accuracy=acc,
                           train_loss=jnp.mean(losses))
    return state, Transition(obs, action, log_prob, value, reward, lr)

  def rollout(policy_params, key, arrays):
    """``episodes`` episodes vmapped: transitions ``[epochs, episodes]``, final states."""
    keys = jax.random.split(jax.random.fold_in(key, 0), config.episodes)
    states = jax.vmap(start, in_axes=(0, None))(keys, arrays)

    def epoch(states, k):
      ks = jax.random.split(k, config.episodes)
      return jax.vmap(lambda s, kk: env_step(policy_params, s, kk, arrays))(states, ks)

    return jax.lax.scan(epoch, states, jax.random.split(jax.random.fold_in(key, 1),
                                                        config.epochs))

  def gae(traj: Transition):
    def back(carry, t):
      adv, next_value = carry
      delta = t.reward + config.gamma * next_value - t.value
      adv = delta + config.gamma * config.gae_lambda * adv
      return (adv, t.value), adv
    last = jnp.zeros_like(traj.value[0])
    # The episode ends after its last epoch: nothing to bootstrap from.
    _, adv = jax.lax.scan(back, (last, last), traj, reverse=True)
    return adv, adv + traj.value

  def loss_fn(params, batch, adv, target):
    out, value = policy.apply({"params": params}, batch.obs)
    log_prob = _log_prob(out, batch.action, discrete)
    clipped_value = batch.value + jnp.clip(value - batch.value, -config.clip_eps, config.clip_eps)
    value_loss = 0.5 * jnp.mean(jnp.maximum((value - target) ** 2, (clipped_value - target) ** 2))
    ratio = jnp.exp(log_prob - batch.log_prob)
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    actor = -jnp.mean(jnp.minimum(ratio * adv,
                                  jnp.clip(ratio, 1 - config.clip_eps, 1 + config.clip_eps) * adv))
    entropy = jnp.mean(_entropy(out, discrete))
    total = actor + config.value_coef * value_loss - config.entropy_coef * entropy
    return total, (actor, value_loss, entropy)

  opt = ppo_optimizer(config)

  def iteration(policy_params, opt_state, key, arrays):
    """One PPO iteration: roll out, estimate advantages, ``update_epochs`` passes."""
    _, traj = rollout(policy_params, jax.random.fold_in(key, 0), arrays)
    adv, target = gae(traj)
    n = config.epochs * config.episodes
    flat = jax.tree.map(lambda x: x.reshape((n,) + x.shape[2:]), (traj, adv, target))

    def update_epoch(carry, k):
      def minibatch(carry, idx):
        params, opt_state = carry
        batch, a, tg = jax.tree.map(lambda x: x[idx], flat)
        (loss, aux), grad = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, a, tg)
        updates, opt_state = opt.update(grad, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), (loss, *aux)
      order = jax.random.permutation(k, n).reshape(config.minibatches, -1)
      return jax.lax.scan(minibatch, carry, order)

    (policy_params, opt_state), (loss, actor, value_loss, entropy) = jax.lax.scan(
        update_epoch, (policy_params, opt_state),
        jax.random.split(jax.random.fold_in(key, 1), config.update_epochs))
    metrics = {"return": jnp.mean(jnp.sum(traj.reward, axis=0)),
               "final_lr": jnp.mean(traj.lr[-1]),
               "mean_log_multiplier": jnp.mean(jnp.log(traj.lr[1:] / traj.lr[:-1]))
               if config.epochs > 1 else jnp.mean(jnp.log(traj.lr[0] / config.learning_rate)),
               "value_loss": jnp.mean(value_loss), "entropy": jnp.mean(entropy)}
    return policy_params, opt_state, metrics

  return rollout, iteration


def ppo_optimizer(config: RLConfig) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                     optax.adam(config.meta_lr, eps=1e-5))


class RLResult(NamedTuple):
  params: PyTree          # policy weights
  settings: dict          # RLConfig.policy_settings
  history: list           # one dict per PPO iteration
  inner_steps: int        # training steps of every episode
  seconds: float
  config: Optional[RLConfig] = None

  def transform(self, *, total_steps: int, epoch_steps: int
                ) -> optax.GradientTransformationExtraArgs:
    """The policy as an optimizer: see :func:`rl_adam`."""
    return rl_adam(self.params, self.settings, total_steps=total_steps, epoch_steps=epoch_steps)

  def save(self, path, *, info: Optional[dict] = None) -> pathlib.Path:
    """Writes the policy (:func:`save_policy`)."""
    return save_policy(path, self.params, self.settings, info=info)


def train_rl(config: RLConfig, out_dir=None, *, progress: bool = True,
             stop_after: Optional[int] = None) -> RLResult:
  """Trains the policy with PPO on episodes from ``config.family``.

  Every iteration draws a task (from ``seed`` and the iteration number) and runs
  ``episodes`` vmapped episodes on it. With ``out_dir``, writes ``metrics.jsonl`` and
  orbax checkpoints on the host-side driver (:func:`metaopt.run_loop`), and resumes.
  """
  settings = dict(config.policy_settings, init_std=config.init_std)
  root = jax.random.PRNGKey(config.seed)
  opt = ppo_optimizer(config)
  params = init_policy(jax.random.fold_in(root, 0), settings)
  fns: dict = {}

  def advance(state, record, start, n):
    params, opt_state = state["params"], state["opt_state"]
    rows = []
    for t in range(start, start + n):
      task = make_task(config.family.sample(jax.random.fold_in(root, 1 + t)))
      c = task.config
      shape = (c.dataset, c.model, c.width, c.depth, c.batch_size)
      if shape not in fns:
        fns[shape] = jax.jit(episode_fns(task, config)[1])
      params, opt_state, metrics = fns[shape](params, opt_state,
                                              jax.random.fold_in(root, 100_000 + t),
                                              task.arrays())
      rows.append({k: float(v) for k, v in metrics.items()} | {"task": c.name})
    return {"params": params, "opt_state": opt_state}, record, rows

  state = {"params": params, "opt_state": opt.init(params)}
  result = run_loop(advance, state, steps=config.iterations, directory=out_dir,
                    checkpoint_every=config.checkpoint_every, progress=progress,
                    desc="PPO", stop_after=stop_after,
                    postfix=lambda r: {"return": f"{r['return']:.3f}",
                                       "lr": f"{r['final_lr']:.1e}"})
  inner = config.iterations * config.episodes * config.epochs * config.epoch_steps
  return RLResult(result.state["params"], settings, result.history, inner, result.seconds,
                  config)


# --- deployment ---------------------------------------------------------------------------


class RLLRState(NamedTuple):
  """State of :func:`scale_by_rl_lr`."""
  params: PyTree           # policy weights
  count: jax.Array         # steps taken
  learning_rate: jax.Array  # the LR applied at the latest step
  loss_sum: jax.Array      # training losses of the current epoch, summed
  loss_count: jax.Array
  stats: EpochStats


def scale_by_rl_lr(params: PyTree, settings: dict, *, total_steps: int, epoch_steps: int
                   ) -> optax.GradientTransformationExtraArgs:
  """Scales updates by ``-lr``; every ``epoch_steps`` steps the policy multiplies ``lr``
  by its mean action.

  ``update(updates, state, params, *, value, val_loss, val_accuracy)``: ``value`` is
  the training loss (every step); ``val_loss`` and ``val_accuracy`` are those of an
  evaluation made at the start of the current epoch (the initial one at step 0): read
  at the steps that decide, ignored between. ``metaopt.train`` passes ``val_loss``
  and ``val_accuracy`` with ``feed_val_loss=True``; evaluate every ``epoch_steps``
  steps (``eval_every=epoch_steps``) so that each decision sees a fresh one.
  ``total_steps`` sets the progress the policy reads (epochs done / epochs in the run).
  ``settings`` is :attr:`RLConfig.policy_settings` (or what :func:`load_policy` returns).
  """
  epoch_steps = check_update_every("epoch_steps", epoch_steps)
  total_steps = check_int("total_steps", total_steps)
  check_action_range(settings["action_range"])
  policy = _policy(settings)
  discrete = settings["action"] == "discrete"
  base = float(settings["learning_rate"])
  epochs = -(-total_steps // epoch_steps)  # progress = epochs done / epochs of this run

  def init_fn(_):
    zero = jnp.zeros((), jnp.float32)
    return RLLRState(params, jnp.zeros((), jnp.int32), jnp.asarray(base, jnp.float32), zero,
                     zero, init_stats(jnp.nan, jnp.nan))

  def update_fn(updates, state: RLLRState, params=None, *, value=None, val_loss=None,
                val_accuracy=None, **extra_args):
    del params, extra_args
    if value is None or val_loss is None or val_accuracy is None:
      raise ValueError("scale_by_rl_lr needs value= (the training loss), val_loss= and "
                       "val_accuracy= at every step: metaopt.train passes the last two with "
                       "feed_val_loss=True")
    value = jnp.asarray(value, jnp.float32)
    first = state.count == 0
    decide = state.count % epoch_steps == 0
    train_loss = jnp.where(first, value, state.loss_sum / jnp.maximum(state.loss_count, 1.0))
    stats = jax.tree.map(lambda s, f: jnp.where(first, f, s), state.stats,
                         init_stats(value, val_loss))
    obs, new_stats = observe(stats, train_loss, val_loss, val_accuracy, state.learning_rate,
                             base, epochs)
    out, _ = policy.apply({"params": state.params}, obs)
    lr = _next_lr(state.learning_rate, _multiplier(_mean_action(out, discrete), settings,
                                                   discrete), settings)
    lr = jnp.where(decide, lr, state.learning_rate)
    stats = jax.tree.map(lambda n, s: jnp.where(decide, n, s), new_stats, stats)
    loss_sum = jnp.where(decide, value, state.loss_sum + value)
    loss_count = jnp.where(decide, 1.0, state.loss_count + 1.0)
    new = RLLRState(state.params, state.count + 1, lr, loss_sum, loss_count, stats)
    return scale_by_lr(updates, lr), new

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def rl_adam(params: PyTree, settings: dict, *, total_steps: int, epoch_steps: int
            ) -> optax.GradientTransformationExtraArgs:
  """Adam with the weight decay the policy was trained with, its LR set by the policy
  once per ``epoch_steps`` steps of a ``total_steps`` run (:func:`scale_by_rl_lr`)."""
  return optax.chain(direction(settings["weight_decay"]),
                     scale_by_rl_lr(params, settings, total_steps=total_steps,
                                    epoch_steps=epoch_steps))


def save_policy(path, params: PyTree, settings: dict, *, info: Optional[dict] = None
                ) -> pathlib.Path:
  """Writes ``rl_policy.msgpack`` (weights) and ``rl_policy.json`` (settings) to ``path``."""
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  (path / POLICY_FILE).write_bytes(serialization.msgpack_serialize(jax.device_get(params)))
  config = dict(format=POLICY_FORMAT, version=1, observations=list(OBSERVATION_NAMES),
                settings=settings, info=dict(info or {}))
  (path / POLICY_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
  return path


def load_policy(path) -> tuple[PyTree, dict]:
  """``(params, settings)`` of the policy saved in ``path``."""
  path = pathlib.Path(path)
  for file in (path / POLICY_FILE, path / POLICY_CONFIG):
    if not file.is_file():
      raise FileNotFoundError(f"policy file {file} not found; write one with "
                              "metaopt.meta.rl.save_policy")
  config = json.loads((path / POLICY_CONFIG).read_text())
  if config.get("format") != POLICY_FORMAT:
    raise ValueError(f"{path / POLICY_CONFIG} is not a metaopt RL policy file")
  if tuple(config.get("observations", ())) != OBSERVATION_NAMES:
    raise ValueError(f"policy in {path} reads observations {config.get('observations')}, "
                     f"this version computes {list(OBSERVATION_NAMES)}")
  settings = config["settings"]
  template = init_policy(jax.random.key(0), settings)
  params = serialization.from_state_dict(
      template, serialization.msgpack_restore((path / POLICY_FILE).read_bytes()))
  return jax.tree.map(jnp.asarray, params), settings
