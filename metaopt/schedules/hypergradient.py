"""Hypergradient descent: the learning rate adapts itself online.

Baydin et al., 2018, "Online Learning Rate Adaptation with Hypergradient Descent"
(https://arxiv.org/abs/1703.04782). With the update ``theta_t = theta_{t-1} -
lr_t * u_t``, where ``u`` is an optimizer's direction (``g`` for SGD,
``m_hat / (sqrt(v_hat) + eps)`` for Adam), the derivative of the loss with
respect to the previous step's LR is ``-<g_t, u_{t-1}>``. One gradient step on
the LR gives

* additive (the paper's SGD-HD, SGDN-HD, Adam-HD):
  ``lr_t = lr_{t-1} + beta * <g_t, u_{t-1}>``;
* multiplicative (the paper's normalized "HD multiplicative" rule):
  ``lr_t = lr_{t-1} * (1 + beta * <g_t, u_{t-1}> / (|g_t| |u_{t-1}| + tiny))``,

so the LR grows while consecutive steps agree and shrinks when they oscillate.
``u_0 = 0``: the first step uses the initial ``learning_rate``.

Two implementations:

* :func:`hypergradient_lr` wraps any direction transform (the way
  ``optax.contrib.mechanize`` wraps its base optimizer) and applies the exact
  rule. It keeps ``u_{t-1}`` in its state (one parameter-sized buffer) and needs
  the reduction ``<g_t, u_{t-1}>`` before it can scale ``u_t``: a second pass.
* :func:`hypergradient_adam` is Adam-HD fused into one pass. It recomputes
  ``u_{t-1}`` from the stored moments instead of keeping it, and applies the
  hypergradient of the previous step, so the LR lags the exact rule by one step.
  Its opt-in variants: ``per_layer`` (one LR per parameter leaf, moved by that leaf's
  hypergradient) and ``normalized`` (an Adam-style step on ``log lr``).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt.schedules.common import check_float_updates, scale_by_lr
from metaopt.validation import check_number, renamed, required, shown

PyTree = Any
_TINY = 1e-12  # keeps the multiplicative rule's normalization finite when u_{t-1} = 0


class HypergradientState(NamedTuple):
  """State of :func:`hypergradient_lr` (and :func:`hypergradient_sgd`)."""
  learning_rate: jax.Array   # float32 LR applied at the latest step, lr_t
  hypergradient: jax.Array   # h_t = <g_t, u_{t-1}> (cosine if multiplicative), which set lr_t
  prev_direction: PyTree     # u_t, the direction of the latest step (zeros before the first)
  direction_state: PyTree    # state of the wrapped direction transform


class HypergradientAdamState(NamedTuple):
  """State of :func:`hypergradient_adam`: Adam's moments, the LR, a pending hypergradient."""
  count: jax.Array           # int32 steps taken
  mu: PyTree                 # Adam's first moment
  nu: PyTree                 # Adam's second moment
  learning_rate: jax.Array   # float32 LR applied at the latest step
  hypergradient: jax.Array   # h_t = <g_t, u_{t-1}> (cosine if multiplicative): moves the *next* LR


class HypergradientAdamVariantState(NamedTuple):
  """State of :func:`hypergradient_adam` with ``normalized`` or ``per_layer``.

  LR-shaped fields are scalars, or with ``per_layer`` vectors with one entry per
  parameter leaf (in ``jax.tree.leaves`` order).
  """
  count: jax.Array           # int32 steps taken
  mu: PyTree                 # Adam's first moment
  nu: PyTree                 # Adam's second moment
  learning_rate: jax.Array   # float32 LR of the latest step (per layer: their geometric mean)
  layer_lrs: jax.Array       # float32 LR(s) applied at the latest step
  hypergradient: jax.Array   # h_t (cosine if multiplicative), per layer with per_layer
  hyper_mu: jax.Array        # normalized: moving average of h (zeros otherwise)
  hyper_nu: jax.Array        # normalized: moving average of h ** 2 (zeros otherwise)


class _Rule(NamedTuple):
  beta: float
  min_lr: float
  max_lr: float
  multiplicative: bool


def _rule(learning_rate, *, beta, min_lr, max_lr, multiplicative, caller: str) -> _Rule:
  """The update rule; concrete values are checked, traced ones (``inject_hyperparams``,
  ``jit``) are taken as they are. Errors name ``caller``, the function the user called."""
  required(caller, "learning_rate", learning_rate, "the initial LR")
  try:
    lr = check_number("learning_rate", learning_rate, low=0.0, low_open=True, traced_ok=True)
    b = check_number("beta", beta, low=0.0, traced_ok=True)
    low = check_number("min_lr", min_lr, low=0.0, traced_ok=True)
    high = check_number("max_lr", max_lr, low=0.0, traced_ok=True)
  except ValueError as e:
    raise ValueError(f"{caller}: {e}") from None
  if low is not None and high is not None and low > high:
    raise ValueError(f"{caller}: need min_lr <= max_lr, got min_lr={min_lr!r}, "
                     f"max_lr={max_lr!r}")
  if lr is not None and low is not None and high is not None and not low <= lr <= high:
    raise ValueError(f"{caller}: learning_rate={learning_rate!r} is outside "
                     f"[min_lr={min_lr!r}, max_lr={max_lr!r}]; widen the bounds or change "
                     "learning_rate")
  given = lambda checked, value: value if checked is None else checked
  return _Rule(given(b, beta), given(low, min_lr), given(high, max_lr), bool(multiplicative))


def _signal(rule: _Rule, dot, grad_sq=None, prev_sq=None) -> jax.Array:
  """The hypergradient signal: ``<g, u_prev>``, normalized for the multiplicative rule."""
  dot = jnp.asarray(dot, jnp.float32)
  if not rule.multiplicative:
    return dot
  norms = jnp.sqrt(jnp.asarray(grad_sq, jnp.float32)) * jnp.sqrt(jnp.asarray(prev_sq, jnp.float32))
  return dot / (norms + _TINY)


def _next_lr(rule: _Rule, lr: jax.Array, signal: jax.Array) -> jax.Array:
  """``lr`` moved by ``signal`` and clipped; unchanged when ``signal`` is not finite."""
  ok = jnp.isfinite(signal)
  signal = jnp.where(ok, signal, 0.0)  # double where: finite gradients through the LR
  if rule.multiplicative:
    proposed = lr * (1.0 + rule.beta * signal)
  else:
    proposed = lr + rule.beta * signal
  return jnp.where(ok, jnp.clip(proposed, rule.min_lr, rule.max_lr), lr).astype(jnp.float32)


def _partial_sum(x: jax.Array) -> jax.Array:
  """A float32 vector with the same sum as ``x``: row sums of a matrix view.

  Row sums as a dot with a ones vector measured faster on XLA:CPU than a full
  reduction; concatenating the partial sums of all leaves and summing once
  keeps the number of small ops per step low.
  """
  x = x.astype(jnp.float32)
  if x.ndim < 2:
    return x.reshape(-1)
  rows = x.reshape(-1, x.shape[-1])
  ones = jnp.ones((rows.shape[-1],), jnp.float32)
  return jnp.dot(rows, ones, precision=jax.lax.Precision.HIGHEST)


def _zeros(params: PyTree) -> PyTree:
  """Zeros like ``params``, never weak-typed (so state types are stable across steps)."""
  return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.result_type(p)), params)


def _tree_dot(a: PyTree, b: PyTree) -> jax.Array:
  """``<a, b>`` over all leaves, in float32."""
  parts = [_partial_sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
  return jnp.sum(jnp.concatenate(parts)) if parts else jnp.zeros((), jnp.float32)


def _zero_after(x: jax.Array) -> jax.Array:
  """A scalar 0 that depends on ``x`` (XLA cannot fold ``finite * 0``)."""
  return jnp.where(jnp.isfinite(x), x, 0.0) * 0.0


class _AdamStep(NamedTuple):
  """What an Adam-HD update starts from (both implementations)."""
  count: jax.Array       # steps taken after this one
  prev_c1: jax.Array     # bias corrections of step t - 1 (u_0 = 0: any non-zero value)
  prev_c2: jax.Array
  c1: jax.Array          # and of step t
  c2: jax.Array
  grads: list            # leaves of the gradients, and of the moments in the same order
  treedef: Any
  mus: list
  nus: list


def _adam_step(updates: PyTree, state, b1, b2) -> _AdamStep:
  """The step count, bias corrections and flattened gradients and moments of one update
  of an Adam-HD state (``count``, ``mu``, ``nu``)."""
  count = optax.safe_increment(state.count)
  # Bias corrections of step t - 1 (where u_0 = 0: any non-zero value) and t.
  prev_c1 = jnp.where(state.count > 0, 1 - b1 ** state.count, 1.0)
  prev_c2 = jnp.where(state.count > 0, 1 - b2 ** state.count, 1.0)
  c1, c2 = 1 - b1 ** count, 1 - b2 ** count
  grads, treedef = jax.tree.flatten(updates)
  mus, nus = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
  return _AdamStep(count, prev_c1, prev_c2, c1, c2, grads, treedef, mus, nus)


def _adam_direction(m: jax.Array, v: jax.Array, c1, c2, eps, eps_root) -> jax.Array:
  """Adam's direction ``m_hat / (sqrt(v_hat + eps_root) + eps)`` of one leaf."""
  return (m / c1.astype(m.dtype)) / (jnp.sqrt(v / c2.astype(v.dtype) + eps_root) + eps)


def _adam_updates(step: _AdamStep, lrs: jax.Array, zero: jax.Array, *, per_layer: bool,
                  b1, b2, eps, eps_root) -> tuple[PyTree, PyTree, PyTree]:
  """Pass 2 of Adam-HD: the new moments and the updates ``-lr * u_t`` (``lrs[i]`` for leaf
  ``i`` with ``per_layer``), as trees.

  ``zero`` is a 0 computed from pass 1: the moment updates overwrite mu and nu in place;
  making them depend on h orders pass 1 first, otherwise XLA keeps a copy of the old
  moments for it (two extra parameter-sized copies per step). The casts keep the moments
  and updates in the params' dtype when b1, b2, eps or eps_root are float32 arrays
  (traced or injected) and the params are not; they are no-ops otherwise.
  """
  out = []
  for i, (g, m, v) in enumerate(zip(step.grads, step.mus, step.nus)):
    lr = lrs[i] if per_layer else lrs
    m_dtype, v_dtype = m.dtype, v.dtype
    m = ((1 - b1) * g + b1 * (m + zero.astype(m.dtype))).astype(m_dtype)
    v = ((1 - b2) * (g ** 2) + b2 * (v + zero.astype(v.dtype))).astype(v_dtype)
    u = _adam_direction(m, v, step.c1, step.c2, eps, eps_root)
    out.append((((-lr).astype(u.dtype) * u).astype(m_dtype), m, v))
  new_updates, mu, nu = (step.treedef.unflatten([o[i] for o in out]) for i in range(3))
  return new_updates, mu, nu


def hypergradient_lr(
    direction: Union[optax.GradientTransformation, optax.GradientTransformationExtraArgs],
    learning_rate: Optional[float] = None,
    *,
    beta: Optional[float] = None,
    min_lr: float = 1e-8,
    max_lr: float = 1.0,
    multiplicative: bool = False,
    initial_lr: Optional[float] = None,
) -> optax.GradientTransformationExtraArgs:
  """Scales ``direction``'s output by ``-lr``, with ``lr`` learned by hypergradient descent.

  A complete optimizer: ``hypergradient_lr(optax.scale_by_adam(), 1e-3,
  beta=1e-7)`` is Adam-HD. It wraps the direction (rather than being chained
  after it) because the rule needs the raw gradient ``g_t`` as well as the
  direction ``u_t``. At step ``t``::

    lr_t = clip(lr_{t-1} + beta * <g_t, u_{t-1}>, min_lr, max_lr)   # additive
    lr_t = clip(lr_{t-1} * (1 + beta * cos(g_t, u_{t-1})), ...)      # multiplicative
    updates = -lr_t * u_t

  with ``u_0 = 0``. The rule is exact (no lag); it keeps ``u_{t-1}`` in the
  state. For Adam, :func:`hypergradient_adam` is a faster fused version.

  Args:
    direction: the transform giving ``u`` from the gradient, e.g.
      ``optax.scale_by_adam()``, ``optax.trace(0.9)`` or ``optax.identity()``.
      Extra args of ``update`` are passed on to it.
    learning_rate: ``lr_0``, in ``[min_lr, max_lr]``.
    beta: the hypergradient step size (the LR's LR), ``>= 0``; ``0`` keeps
      ``learning_rate``.
    min_lr, max_lr: bounds the LR is clipped to after every change.
    multiplicative: use the normalized multiplicative rule.
    initial_lr: the old name of ``learning_rate`` (deprecated).

  A non-finite hypergradient (a NaN or inf in ``g_t`` or ``u_{t-1}``) leaves
  the LR unchanged. The current LR is ``state.learning_rate`` (also found by
  ``optax.tree_utils.tree_get(state, "learning_rate")``).
  """
  learning_rate = renamed("hypergradient_lr", "learning_rate", learning_rate, "initial_lr",
                          initial_lr)
  required("hypergradient_lr", "beta", beta, "the hypergradient step size")
  return _hypergradient_lr(direction, learning_rate, beta=beta, min_lr=min_lr, max_lr=max_lr,
                           multiplicative=multiplicative, caller="hypergradient_lr")


def _hypergradient_lr(direction, learning_rate, *, beta, min_lr, max_lr, multiplicative,
                      caller: str) -> optax.GradientTransformationExtraArgs:
  """:func:`hypergradient_lr`, with errors naming ``caller``."""
  rule = _rule(learning_rate, beta=beta, min_lr=min_lr, max_lr=max_lr,
               multiplicative=multiplicative, caller=caller)
  direction = optax.with_extra_args_support(direction)

  def init_fn(params):
    return HypergradientState(
        learning_rate=jnp.asarray(learning_rate, jnp.float32),
        hypergradient=jnp.zeros((), jnp.float32),
        prev_direction=_zeros(params),
        direction_state=direction.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    check_float_updates(updates, caller)
    grads = updates
    u, direction_state = direction.update(grads, state.direction_state, params, **extra_args)
    # The direction's state and output keep their dtypes (optax.trace with a
    # float32 decay would otherwise turn a bfloat16 trace into float32).
    direction_state = optax.tree.cast_like(direction_state, state.direction_state)
    u = jax.tree.map(lambda x, p: x.astype(p.dtype), u, state.prev_direction)
    prev = state.prev_direction
    if rule.multiplicative:
      signal = _signal(rule, _tree_dot(grads, prev), _tree_dot(grads, grads),
                       _tree_dot(prev, prev))
    else:
      signal = _signal(rule, _tree_dot(grads, prev))
    lr = _next_lr(rule, state.learning_rate, signal)
    return scale_by_lr(u, lr), HypergradientState(lr, signal, u, direction_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def hypergradient_sgd(
    learning_rate: Optional[float] = None,
    *,
    beta: float = 1e-3,
    momentum: Optional[float] = None,
    nesterov: bool = False,
    min_lr: float = 1e-8,
    max_lr: float = 1.0,
    multiplicative: bool = False,
    initial_lr: Optional[float] = None,
) -> optax.GradientTransformationExtraArgs:
  """SGD-HD (no momentum) and SGDN-HD (``momentum > 0, nesterov=True``).

  :func:`hypergradient_lr` around ``optax.trace(momentum, nesterov)``, or
  around the identity when ``momentum`` is ``None`` or a Python ``0``.
  ``beta=1e-3`` is the paper's value for its MLP experiments. ``initial_lr``: the old
  name of ``learning_rate`` (deprecated).
  """
  learning_rate = renamed("hypergradient_sgd", "learning_rate", learning_rate, "initial_lr",
                          initial_lr)
  try:
    check_number("momentum", momentum if momentum is not None else 0.0, low=0.0, high=1.0,
                 high_open=True, traced_ok=True)
  except ValueError as e:
    raise ValueError(f"hypergradient_sgd: {e}") from None
  if momentum is None or (isinstance(momentum, (int, float)) and momentum == 0):
    direction = optax.identity()
  else:
    direction = optax.trace(decay=momentum, nesterov=nesterov)
  return _hypergradient_lr(direction, learning_rate, beta=beta, min_lr=min_lr, max_lr=max_lr,
                           multiplicative=multiplicative, caller="hypergradient_sgd")


def hypergradient_adam(
    learning_rate: Optional[float] = None,
    *,
    beta: float = 1e-7,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    min_lr: float = 1e-8,
    max_lr: float = 1.0,
    multiplicative: bool = False,
    normalized: bool = False,
    per_layer: bool = False,
    hyper_b1: float = 0.9,
    hyper_b2: float = 0.99,
    initial_lr: Optional[float] = None,
) -> optax.GradientTransformationExtraArgs:
  """Adam-HD, fused into a single pass over the parameters. A complete optimizer.

  Adam's direction is ``u_t = m_hat_t / (sqrt(v_hat_t + eps_root) + eps)``.
  Step ``t`` computes, in the same elementwise pass that updates the moments,
  the hypergradient ``h_t = <g_t, u_{t-1}>``, with ``u_{t-1}`` recomputed from
  the stored moments (no extra buffer). The LR it applies uses the *previous*
  step's hypergradient::

    lr_t = clip(lr_{t-1} + beta * h_{t-1}, min_lr, max_lr)   (h_0 = 0)
    updates = -lr_t * u_t

  **One-step lag.** On the same gradient sequence, this LR at step ``t + 1``
  equals the exact rule's LR at step ``t`` (:func:`hypergradient_lr` around
  ``optax.scale_by_adam``), so ``lr_1 = lr_2 = learning_rate``. The hypergradient
  ``h_t`` is not yet applied after step ``t``: it is in
  ``state.hypergradient``. With ``beta = 1e-7`` the LR moves slowly, and the
  lag changes little. The lag is what lets the whole update be one pass: the
  exact rule must finish the reduction before it can scale ``u_t``.

  Args:
    learning_rate: ``lr_0``, in ``[min_lr, max_lr]``.
    beta: hypergradient step size; ``1e-7`` is the paper's value for its MLPs.
    b1, b2, eps, eps_root: as in ``optax.adam``; ``eps_root > 0`` to
      differentiate through the update.
    min_lr, max_lr: bounds the LR is clipped to.
    multiplicative: normalized multiplicative rule (``h`` is then the cosine
      of ``g_t`` and ``u_{t-1}``).
    normalized: a normalized hypergradient step on ``log lr``, Adam-style:
      ``lr_t = clip(lr_{t-1} * exp(beta * m_hat / sqrt(v_hat)), min_lr, max_lr)``
      with ``m``, ``v`` moving averages (``hyper_b1``, ``hyper_b2``, bias
      corrected) of ``h`` and ``h ** 2``. The step is free of the scale of ``h``
      and of its noise level, so one ``beta`` (a bound of roughly ``beta`` on the
      relative change per step) can fit many models; ``beta`` is then no longer the
      paper's. With ``per_layer``, ``beta=0.1`` recovered best from a 10x or 0.1x
      bad LR in ``benchmarks/bench_hd_recovery.py`` (docs/benchmarks.md).
    per_layer: one LR per parameter leaf, each moved by the hypergradient of its
      own leaf (``h_l = <g_t^l, u_{t-1}^l>``, the derivative of the loss with
      respect to that leaf's previous LR, negated). ``state.learning_rate`` is
      their geometric mean; ``state.layer_lrs`` holds them.
    hyper_b1, hyper_b2: decay rates of the moving averages of ``normalized``,
      in ``[0, 1)``.
    initial_lr: the old name of ``learning_rate`` (deprecated).

  A non-finite ``h`` leaves the LR (and the moving averages) unchanged. With
  ``beta=0`` this is ``optax.adam(learning_rate)``. ``normalized`` or
  ``per_layer`` switch the state to :class:`HypergradientAdamVariantState`.
  """
  learning_rate = renamed("hypergradient_adam", "learning_rate", learning_rate, "initial_lr",
                          initial_lr)
  rule = _rule(learning_rate, beta=beta, min_lr=min_lr, max_lr=max_lr,
               multiplicative=multiplicative, caller="hypergradient_adam")
  for name, flag in (("normalized", normalized), ("per_layer", per_layer)):
    if not isinstance(flag, (bool, np.bool_)):
      raise ValueError(f"hypergradient_adam: {name} must be True or False, got {shown(flag)}")
  if normalized or per_layer:
    try:
      hb1 = check_number("hyper_b1", hyper_b1, low=0.0, high=1.0, high_open=True, traced_ok=True)
      hb2 = check_number("hyper_b2", hyper_b2, low=0.0, high=1.0, high_open=True, traced_ok=True)
    except ValueError as e:
      raise ValueError(f"hypergradient_adam: {e}") from None
    return _hypergradient_adam_variant(
        learning_rate, rule, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
        normalized=bool(normalized), per_layer=bool(per_layer),
        hyper_b1=hyper_b1 if hb1 is None else hb1, hyper_b2=hyper_b2 if hb2 is None else hb2)

  def init_fn(params):
    return HypergradientAdamState(
        count=jnp.zeros((), jnp.int32),
        mu=_zeros(params),
        nu=_zeros(params),
        learning_rate=jnp.asarray(learning_rate, jnp.float32),
        hypergradient=jnp.zeros((), jnp.float32))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    check_float_updates(updates, "hypergradient_adam")
    lr = _next_lr(rule, state.learning_rate, state.hypergradient)
    step = _adam_step(updates, state, b1, b2)

    # Pass 1: the hypergradient h_t = <g_t, u_{t-1}>, u_{t-1} recomputed from
    # the moments before they are updated.
    products = [[], [], []]  # g * u_prev, g * g, u_prev * u_prev
    for g, m, v in zip(step.grads, step.mus, step.nus):
      u_prev = _adam_direction(m, v, step.prev_c1, step.prev_c2, eps, eps_root)
      products[0].append(_partial_sum(g * u_prev))
      if rule.multiplicative:
        products[1].append(_partial_sum(g * g))
        products[2].append(_partial_sum(u_prev * u_prev))
    sums = [jnp.sum(jnp.concatenate(p)) if p else jnp.zeros((), jnp.float32)
            for p in products]
    signal = _signal(rule, *sums)

    # Pass 2: Adam, ordered after pass 1 (see _adam_updates).
    new_updates, mu, nu = _adam_updates(step, lr, _zero_after(sums[0]), per_layer=False,
                                        b1=b1, b2=b2, eps=eps, eps_root=eps_root)
    return new_updates, HypergradientAdamState(step.count, mu, nu, lr, signal)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _hypergradient_adam_variant(learning_rate, rule: _Rule, *, b1, b2, eps, eps_root,
                                normalized: bool, per_layer: bool, hyper_b1,
                                hyper_b2) -> optax.GradientTransformationExtraArgs:
  """:func:`hypergradient_adam` with a normalized and/or per-layer LR (same single pass)."""

  def init_fn(params):
    shape = (len(jax.tree.leaves(params)),) if per_layer else ()
    zeros = jnp.zeros(shape, jnp.float32)
    return HypergradientAdamVariantState(
        count=jnp.zeros((), jnp.int32), mu=_zeros(params), nu=_zeros(params),
        learning_rate=jnp.asarray(learning_rate, jnp.float32),
        layer_lrs=jnp.full(shape, learning_rate, jnp.float32),
        hypergradient=zeros, hyper_mu=zeros, hyper_nu=zeros)

  def next_lrs(state):
    """The LR(s) of this step, from what the previous steps measured."""
    if not normalized:
      return _next_lr(rule, state.layer_lrs, state.hypergradient)
    # The averages hold h_2 .. h_{t-1} (h_1 = 0: u_0 = 0, not averaged).
    k = jnp.maximum(state.count - 1, 0)
    c1 = jnp.where(k > 0, 1 - hyper_b1 ** k, 1.0)
    c2 = jnp.where(k > 0, 1 - hyper_b2 ** k, 1.0)
    # _TINY ** 2 inside the root: finite (and differentiable) when every h was 0.
    step = (state.hyper_mu / c1) / jnp.sqrt(state.hyper_nu / c2 + _TINY ** 2)
    return jnp.clip(state.layer_lrs * jnp.exp(rule.beta * step), rule.min_lr,
                    rule.max_lr).astype(jnp.float32)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    check_float_updates(updates, "hypergradient_adam")
    lrs = next_lrs(state)
    step = _adam_step(updates, state, b1, b2)

    # Pass 1, as in hypergradient_adam: <g_t, u_{t-1}> (and the norms), per leaf.
    products = [[], [], []]
    for g, m, v in zip(step.grads, step.mus, step.nus):
      u_prev = _adam_direction(m, v, step.prev_c1, step.prev_c2, eps, eps_root)
      pairs = ((g, u_prev), (g, g), (u_prev, u_prev)) if rule.multiplicative else ((g, u_prev),)
      for i, (x, y) in enumerate(pairs):
        products[i].append(_partial_sum(x * y))
    if per_layer:
      sums = [jnp.stack([jnp.sum(x) for x in p]) if p else jnp.zeros((0,), jnp.float32)
              for p in products]
    else:
      sums = [jnp.sum(jnp.concatenate(p)) if p else jnp.zeros((), jnp.float32)
              for p in products]
    signal = _signal(rule, *sums[:3 if rule.multiplicative else 1])

    hyper_mu, hyper_nu = state.hyper_mu, state.hyper_nu
    if normalized:
      ok = jnp.isfinite(signal) & (state.count > 0)
      h = jnp.where(ok, signal, 0.0)  # double where: finite gradients through the LR
      hyper_mu = jnp.where(ok, hyper_b1 * hyper_mu + (1 - hyper_b1) * h, hyper_mu)
      hyper_nu = jnp.where(ok, hyper_b2 * hyper_nu + (1 - hyper_b2) * h * h, hyper_nu)
      hyper_mu, hyper_nu = hyper_mu.astype(jnp.float32), hyper_nu.astype(jnp.float32)

    # Pass 2: Adam, each leaf scaled by its LR; ordered after pass 1 (see _adam_updates).
    new_updates, mu, nu = _adam_updates(step, lrs, _zero_after(jnp.sum(sums[0])),
                                        per_layer=per_layer, b1=b1, b2=b2, eps=eps,
                                        eps_root=eps_root)
    shown_lr = jnp.exp(jnp.mean(jnp.log(lrs))) if per_layer else lrs
    return new_updates, HypergradientAdamVariantState(
        step.count, mu, nu, shown_lr.astype(jnp.float32), lrs, signal.astype(jnp.float32),
        hyper_mu, hyper_nu)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
