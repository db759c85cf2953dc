"""Hypergradient descent: update rules by hand, the fused Adam's one-step lag, safety, contract."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metaopt
from metaopt.schedules.hypergradient import (
    HypergradientAdamState, HypergradientState, hypergradient_adam, hypergradient_lr,
    hypergradient_sgd)

# f(theta) = 0.5 * sum(A * theta**2): gradient A * theta.
A = np.array([1.0, 3.0])
THETA0 = np.array([1.0, -2.0])


def quad_grad(theta):
  return A * theta


def run_quadratic(tx, steps):
  """Runs ``tx`` on the quadratic; returns per-step params and LRs (numpy)."""
  params = jnp.asarray(THETA0, jnp.float32)
  state = tx.init(params)
  thetas, lrs = [], []
  for _ in range(steps):
    grads = jnp.asarray(quad_grad(np.asarray(params, np.float64)), jnp.float32)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    thetas.append(np.asarray(params, np.float64))
    lrs.append(float(state.learning_rate))
  return np.stack(thetas), np.array(lrs)


# --- plain numpy references, written out independently of the code under test ---

def ref_sgd(lr, beta, steps, momentum=0.0, nesterov=False, multiplicative=False):
  theta, buf, u_prev = THETA0.copy(), np.zeros(2), np.zeros(2)
  thetas, lrs = [], []
  for _ in range(steps):
    g = quad_grad(theta)
    h = g @ u_prev
    if multiplicative:
      lr = lr * (1 + beta * h / (np.linalg.norm(g) * np.linalg.norm(u_prev) + 1e-12))
    else:
      lr = lr + beta * h
    lr = min(max(lr, 1e-8), 1.0)
    buf = momentum * buf + g
    u = g + momentum * buf if nesterov else (buf if momentum else g)
    theta = theta - lr * u
    u_prev = u
    thetas.append(theta)
    lrs.append(lr)
  return np.stack(thetas), np.array(lrs)


def ref_adam(lr, beta, steps, lagged, multiplicative=False, b1=0.9, b2=0.999, eps=1e-8):
  theta, m, v, u_prev = THETA0.copy(), np.zeros(2), np.zeros(2), np.zeros(2)
  pending = 0.0
  thetas, lrs = [], []
  for t in range(1, steps + 1):
    g = quad_grad(theta)
    h = g @ u_prev
    if multiplicative:
      h = h / (np.linalg.norm(g) * np.linalg.norm(u_prev) + 1e-12)
    signal, pending = (pending, h) if lagged else (h, None)
    lr = lr * (1 + beta * signal) if multiplicative else lr + beta * signal
    lr = min(max(lr, 1e-8), 1.0)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    u = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    theta = theta - lr * u
    u_prev = u
    thetas.append(theta)
    lrs.append(lr)
  return np.stack(thetas), np.array(lrs)


def test_sgd_hd_two_steps_by_hand():
  # lr0 = 0.1, beta = 0.01. Step 1: g1 = (1, -6), u0 = 0 so lr1 = 0.1,
  # theta1 = (0.9, -1.4). Step 2: g2 = (0.9, -4.2), <g2, g1> = 0.9 + 25.2 = 26.1,
  # lr2 = 0.1 + 0.01 * 26.1 = 0.361, theta2 = theta1 - 0.361 * g2 = (0.5751, 0.1162).
  thetas, lrs = run_quadratic(hypergradient_sgd(0.1, beta=0.01), 2)
  np.testing.assert_allclose(lrs, [0.1, 0.361], rtol=1e-6)
  np.testing.assert_allclose(thetas[0], [0.9, -1.4], rtol=1e-6)
  np.testing.assert_allclose(thetas[1], [0.5751, 0.1162], rtol=1e-5)


VARIANTS = {
    # name: (transform, numpy reference)
    "sgd": (lambda: hypergradient_sgd(0.1, beta=0.01),
            lambda n: ref_sgd(0.1, 0.01, n)),
    "sgd_momentum": (lambda: hypergradient_sgd(0.05, beta=0.002, momentum=0.5),
                     lambda n: ref_sgd(0.05, 0.002, n, momentum=0.5)),
    "sgd_nesterov": (lambda: hypergradient_sgd(0.05, beta=0.002, momentum=0.5, nesterov=True),
                     lambda n: ref_sgd(0.05, 0.002, n, momentum=0.5, nesterov=True)),
    "sgd_multiplicative": (lambda: hypergradient_sgd(0.1, beta=0.5, multiplicative=True),
                           lambda n: ref_sgd(0.1, 0.5, n, multiplicative=True)),
    "adam_generic": (lambda: hypergradient_lr(optax.scale_by_adam(), 0.1, beta=0.01),
                     lambda n: ref_adam(0.1, 0.01, n, lagged=False)),
    "adam_fused": (lambda: hypergradient_adam(0.1, beta=0.01),
                   lambda n: ref_adam(0.1, 0.01, n, lagged=True)),
    "adam_fused_multiplicative": (
        lambda: hypergradient_adam(0.1, beta=0.5, multiplicative=True),
        lambda n: ref_adam(0.1, 0.5, n, lagged=True, multiplicative=True)),
    "adam_generic_multiplicative": (
        lambda: hypergradient_lr(optax.scale_by_adam(), 0.1, beta=0.5, multiplicative=True),
        lambda n: ref_adam(0.1, 0.5, n, lagged=False, multiplicative=True)),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_update_rule_matches_numpy_reference(name):
  make, reference = VARIANTS[name]
  steps = 4  # the fused Adam's LR first moves at step 3
  thetas, lrs = run_quadratic(make(), steps)
  want_thetas, want_lrs = reference(steps)
  np.testing.assert_allclose(lrs, want_lrs, rtol=1e-5)
  np.testing.assert_allclose(thetas, want_thetas, rtol=1e-4, atol=1e-6)
  assert np.all((want_lrs > 1e-8) & (want_lrs < 1.0))  # no clipping in these examples
  assert abs(lrs[-1] - lrs[0]) > 0.2 * lrs[0]  # the LR really moved


def gradient_sequence(steps=12, seed=0):
  """Correlated random gradients for a {"w": (2, 2), "b": (2,)} parameter tree."""
  rng = np.random.RandomState(seed)
  drift = {"w": rng.randn(2, 2), "b": rng.randn(2)}
  return [{k: jnp.asarray(d + 0.7 * rng.randn(*d.shape), jnp.float32) for k, d in drift.items()}
          for _ in range(steps)]


def feed(tx, grads_seq):
  params = jax.tree.map(jnp.zeros_like, grads_seq[0])
  state = tx.init(params)
  lrs, hs, ups = [], [], []
  for g in grads_seq:
    u, state = tx.update(g, state, params)
    lrs.append(float(state.learning_rate))
    hs.append(float(state.hypergradient))
    ups.append(u)
  return np.array(lrs), np.array(hs), ups


@pytest.mark.parametrize("kw", [dict(beta=2e-3), dict(beta=2e-3, max_lr=0.02),
                                dict(beta=0.3, multiplicative=True)],
                         ids=["additive", "clipped", "multiplicative"])
def test_fused_adam_lags_the_exact_rule_by_one_step(kw):
  """Same gradients: fused lr_{t+1} == exact lr_t, and fused updates use lr_{t-1}.

  With g_t fixed, both keep the same moments, so u_t and h_t = <g_t, u_{t-1}>
  agree. Exact: lr_t = clip(lr_{t-1} + beta h_t); fused: lr_t = clip(lr_{t-1} +
  beta h_{t-1}) with h_0 = 0. Both start at lr_0 and h_1 = 0, so by induction
  fused lr_{t+1} = exact lr_t.
  """
  grads = gradient_sequence()
  lr_g, h_g, up_g = feed(hypergradient_lr(optax.scale_by_adam(), 0.01, **kw), grads)
  lr_f, h_f, up_f = feed(hypergradient_adam(0.01, **kw), grads)
  assert lr_f[0] == pytest.approx(0.01) and lr_g[0] == pytest.approx(0.01)
  np.testing.assert_allclose(lr_f[1:], lr_g[:-1], rtol=1e-5)
  np.testing.assert_allclose(h_f, h_g, rtol=1e-4, atol=1e-6)
  prev_lr_g = np.concatenate([[0.01], lr_g[:-1]])
  for t, (uf, ug) in enumerate(zip(up_f, up_g)):  # -lr_{t-1} u_t versus -lr_t u_t
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a * lr_g[t], b * prev_lr_g[t], rtol=1e-4, atol=1e-8), uf, ug)
  assert lr_g.max() > 0.0105 or lr_g.min() < 0.0095  # the LR moved
  if "max_lr" in kw:
    assert lr_g.max() == pytest.approx(kw["max_lr"])  # clipping happened


# --- the variants: normalized and per-layer -------------------------------------

TWO_LEAVES = {"a": np.array([1.0, -2.0]), "b": np.array([0.5])}   # jax.tree.leaves order
CURVATURE = {"a": np.array([1.0, 3.0]), "b": np.array([2.0])}


def two_leaf_loss(p):
  """0.5 sum(c x^2) + 0.1 sum(x^4): not a quadratic, so finite differences mean something."""
  return sum(0.5 * (CURVATURE[k] * p[k] ** 2).sum() + 0.1 * (p[k] ** 4).sum() for k in p)


def two_leaf_grad(p):
  return {k: CURVATURE[k] * p[k] + 0.4 * p[k] ** 3 for k in p}


def ref_adam_variant(lr0, beta, steps, *, normalized, per_layer, multiplicative,
                     hb1=0.9, hb2=0.99, b1=0.9, b2=0.999, eps=1e-8):
  """hypergradient_adam's variants written out in numpy: LRs and params per step."""
  keys = sorted(TWO_LEAVES)
  p = {k: TWO_LEAVES[k].copy() for k in keys}
  m, v, u_prev = ({k: np.zeros_like(p[k]) for k in keys} for _ in range(3))
  n = len(keys) if per_layer else 1
  lrs, pending, hm, hv = np.full(n, lr0), np.zeros(n), np.zeros(n), np.zeros(n)
  out_lrs, out_p = [], []
  for t in range(1, steps + 1):
    if normalized:  # the averages hold h_2 .. h_{t-1}
      k = t - 2
      mh, vh = (hm / (1 - hb1 ** k), hv / (1 - hb2 ** k)) if k > 0 else (hm, hv)
      lrs = lrs * np.exp(beta * mh / np.sqrt(vh + 1e-24))
    elif multiplicative:
      lrs = lrs * (1 + beta * pending)
    else:
      lrs = lrs + beta * pending
    lrs = np.clip(lrs, 1e-8, 1.0)
    g = two_leaf_grad(p)
    dot, gg, uu = (np.array([(x[k] * y[k]).sum() for k in keys])
                   for x, y in ((g, u_prev), (g, g), (u_prev, u_prev)))
    if not per_layer:
      dot, gg, uu = dot.sum(keepdims=True), gg.sum(keepdims=True), uu.sum(keepdims=True)
    h = dot / (np.sqrt(gg) * np.sqrt(uu) + 1e-12) if multiplicative else dot
    if normalized and t > 1:
      hm, hv = hb1 * hm + (1 - hb1) * h, hb2 * hv + (1 - hb2) * h * h
    pending = h
    for i, k in enumerate(keys):
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      u_prev[k] = (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
      p[k] = p[k] - lrs[i if per_layer else 0] * u_prev[k]
    out_lrs.append(lrs.copy())
    out_p.append({k: p[k].copy() for k in keys})
  return out_lrs, out_p


ADAM_VARIANTS = {
    "normalized": dict(beta=0.05, normalized=True),
    "normalized_per_layer": dict(beta=0.05, normalized=True, per_layer=True),
}


@pytest.mark.parametrize("name", ADAM_VARIANTS)
def test_adam_variant_matches_numpy_reference(name):
  kw = ADAM_VARIANTS[name]
  tx = hypergradient_adam(0.1, **kw)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), TWO_LEAVES)
  state = tx.init(params)
  assert type(state).__name__ == "HypergradientAdamVariantState"
  update = jax.jit(tx.update)
  lrs = []
  for _ in range(6):
    grads = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32),
                         two_leaf_grad(jax.tree.map(np.asarray, params)))
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    lrs.append(np.asarray(state.layer_lrs))
  want_lrs, want_params = ref_adam_variant(
      0.1, kw["beta"], 6, normalized=kw.get("normalized", False),
      per_layer=kw.get("per_layer", False), multiplicative=kw.get("multiplicative", False))
  np.testing.assert_allclose(np.stack(lrs).reshape(6, -1), np.stack(want_lrs), rtol=1e-5)
  for k in TWO_LEAVES:
    np.testing.assert_allclose(params[k], want_params[-1][k], rtol=1e-4, atol=1e-6)
  assert np.abs(np.log(want_lrs[-1] / 0.1)).max() > 0.05   # the LR really moved
  if kw.get("per_layer"):
    assert abs(want_lrs[-1][0] - want_lrs[-1][1]) > 1e-3 * want_lrs[-1][0]  # and per layer
    assert float(state.learning_rate) == pytest.approx(np.exp(np.log(lrs[-1]).mean()), rel=1e-6)


def test_per_layer_hypergradient_matches_finite_differences():
  """h_l after step t is -d loss(theta_t) / d lr_l, the derivative in layer l's LR of
  step t - 1: central differences of the loss in each layer's LR, in float64."""
  with jax.enable_x64(True):
    tx = hypergradient_adam(0.05, beta=0.0, per_layer=True)
    update = jax.jit(tx.update)
    params = jax.tree.map(jnp.asarray, TWO_LEAVES)
    state = tx.init(params)
    for _ in range(3):
      before = params
      updates, state = update(two_leaf_grad(params), state, params)
      params = optax.apply_updates(params, updates)
    _, state = update(two_leaf_grad(params), state, params)  # h of the last step
    lr, delta = 0.05, 1e-6
    for i, k in enumerate(sorted(TWO_LEAVES)):
      def loss_at(layer_lr):
        moved = dict(params)
        moved[k] = before[k] + updates[k] * (layer_lr / lr)   # that layer's step at layer_lr
        return float(two_leaf_loss(jax.tree.map(np.asarray, moved)))
      fd = (loss_at(lr + delta) - loss_at(lr - delta)) / (2 * delta)
      assert float(state.hypergradient[i]) == pytest.approx(-fd, rel=1e-6, abs=1e-10)
      assert abs(fd) > 1e-3   # a real signal


def test_adam_variant_skips_a_non_finite_hypergradient():
  tx = hypergradient_adam(0.05, beta=0.1, normalized=True, per_layer=True)
  good = jax.grad(loss_fn)(PARAMS)
  broken = jax.tree.map(lambda x: x.at[0].set(np.nan), good)
  state, update = tx.init(PARAMS), jax.jit(tx.update)
  for g in (good, good, good):
    _, state = update(g, state, PARAMS)
  _, bad = update(broken, state, PARAMS)   # both leaves' h are NaN ("b" has a NaN too)
  assert bool(jnp.all(~jnp.isfinite(bad.hypergradient)))
  np.testing.assert_array_equal(bad.hyper_mu, state.hyper_mu)
  np.testing.assert_array_equal(bad.hyper_nu, state.hyper_nu)
  _, after = update(good, bad, PARAMS)
  assert bool(jnp.all(jnp.isfinite(after.layer_lrs)))


def test_zero_beta_is_plain_adam():
  # Under jit: eagerly, 1 - b2**t is evaluated with a different pow rounding,
  # which the cancellation magnifies to ~1e-5 relative differences.
  grads = gradient_sequence(6)
  params = jax.tree.map(jnp.zeros_like, grads[0])
  txs = [hypergradient_adam(3e-3, beta=0.0),
         hypergradient_lr(optax.scale_by_adam(), 3e-3, beta=0.0), optax.adam(3e-3)]
  states = [tx.init(params) for tx in txs]
  updates = [jax.jit(tx.update) for tx in txs]
  for g in grads:
    outs = [update(g, state, params) for update, state in zip(updates, states)]
    states = [state for _, state in outs]
    for u, _ in outs[:2]:
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-10),
                   u, outs[2][0])


# --- the transform matrix: safety and the optax contract ----------------------

TRANSFORMS = {
    "sgd": lambda **kw: hypergradient_sgd(0.05, **{"beta": 1e-3, **kw}),
    "sgd_nesterov": lambda **kw: hypergradient_sgd(0.05, momentum=0.9, nesterov=True,
                                                   **{"beta": 1e-3, **kw}),
    "sgd_multiplicative": lambda **kw: hypergradient_sgd(0.05, multiplicative=True,
                                                         **{"beta": 0.02, **kw}),
    "adam_fused": lambda **kw: hypergradient_adam(0.05, **{"beta": 1e-3, **kw}),
    "adam_fused_multiplicative": lambda **kw: hypergradient_adam(
        0.05, multiplicative=True, **{"beta": 0.02, **kw}),
    "adam_generic": lambda **kw: hypergradient_lr(optax.scale_by_adam(), 0.05,
                                                  **{"beta": 1e-3, **kw}),
}
FUSED = {"adam_fused", "adam_fused_multiplicative"}  # LR lags one step
PARAMS = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.5, -1.0])}


def loss_fn(params):
  return jnp.sum((params["w"] - 0.3) ** 2) + jnp.sum((params["b"] + 1.0) ** 2)


def lr_path(tx, grads_seq):
  state = tx.init(PARAMS)
  out = []
  for g in grads_seq:
    _, state = tx.update(g, state, PARAMS)
    out.append(float(state.learning_rate))
  return np.array(out)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_lr_is_clipped_to_bounds(name):
  g = jax.tree.map(jnp.ones_like, PARAMS)
  neg = jax.tree.map(lambda x: -x, g)
  bounds = dict(min_lr=0.01, max_lr=0.2, beta=5.0 if "multiplicative" not in name else 0.9)
  agree = lr_path(TRANSFORMS[name](**bounds), [g] * 8)             # h > 0: LR grows
  oscillate = lr_path(TRANSFORMS[name](**bounds), [g, neg] * 4)     # h < 0: LR shrinks
  for path in (agree, oscillate):
    assert np.all(path >= np.float32(0.01)) and np.all(path <= np.float32(0.2))
  assert agree[-1] == np.float32(0.2)
  assert oscillate[-1] == np.float32(0.01)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("name", TRANSFORMS)
def test_non_finite_gradient_leaves_lr_unchanged(name, bad):
  good = [jax.grad(loss_fn)(PARAMS)] * 2
  broken = jax.tree.map(lambda x: x.at[0].set(bad), good[0])
  lrs = lr_path(TRANSFORMS[name](beta=0.01), good + [broken] + good)
  assert np.all(np.isfinite(lrs))
  # The exact rule applies h_3 (non-finite) at step 3; the fused one at step 4.
  applied = 3 if name in FUSED else 2
  assert lrs[applied] == lrs[applied - 1]
  assert lrs[1] != lrs[0] or name in FUSED  # finite hypergradients do move it
  if name not in FUSED:
    assert lrs[2] == lrs[1]


@pytest.mark.parametrize("name", TRANSFORMS)
def test_scan_keeps_state_structure_and_dtypes(name):
  tx = TRANSFORMS[name]()
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)

  def body(carry, _):
    params, state = carry
    grads = jax.grad(lambda p: loss_fn(jax.tree.map(lambda x: x.astype(jnp.float32), p)))(params)
    updates, state = tx.update(grads, state, params)
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
    return (optax.apply_updates(params, updates), state), state.learning_rate

  (_, state), lrs = jax.lax.scan(body, (params, tx.init(params)), None, length=4)
  assert lrs.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(lrs)))


def scanned_lrs(tx, steps=6):
  def body(carry, _):
    params, state = carry
    updates, state = tx.update(jax.grad(loss_fn)(params), state, params)
    lr = optax.tree_utils.tree_get(state, "learning_rate")
    return (optax.apply_updates(params, updates), state), lr
  return jax.jit(lambda: jax.lax.scan(body, (PARAMS, tx.init(PARAMS)), None, length=steps))()[1]


@pytest.mark.parametrize("name", TRANSFORMS)
def test_inside_optax_chain(name):
  # Global-norm clipping at 100 is inactive here, so the chain matches the transform alone.
  chained = scanned_lrs(optax.chain(optax.clip_by_global_norm(100.0), TRANSFORMS[name](beta=1e-2)))
  alone = scanned_lrs(TRANSFORMS[name](beta=1e-2))
  np.testing.assert_allclose(chained, alone, rtol=1e-6)
  assert float(chained[-1]) != pytest.approx(0.05)  # the LR moved


def test_direction_receives_extra_args():
  def update(updates, state, params=None, *, scale=1.0, **extra_args):
    del params, extra_args
    return jax.tree.map(lambda u: scale * u, updates), state

  direction = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
  tx = hypergradient_lr(direction, 0.1, beta=0.0)
  grads = jax.grad(loss_fn)(PARAMS)
  u1, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  u2, _ = tx.update(grads, tx.init(PARAMS), PARAMS, scale=2.0)
  np.testing.assert_allclose(u2["w"], 2 * u1["w"])


def test_learning_rate_is_readable_from_the_state():
  for tx, kind in [(hypergradient_sgd(0.05), HypergradientState),
                   (hypergradient_adam(0.05), HypergradientAdamState)]:
    state = tx.init(PARAMS)
    assert isinstance(state, kind)
    _, state = tx.update(jax.grad(loss_fn)(PARAMS), state, PARAMS)
    assert optax.tree_utils.tree_get(state, "learning_rate") == state.learning_rate


def test_current_lr_reads_hypergradient_states():
  for tx in (hypergradient_sgd(0.05), hypergradient_adam(0.05)):
    state = optax.chain(optax.clip_by_global_norm(1.0), tx).init(PARAMS)
    assert float(metaopt.current_lr(state)) == pytest.approx(0.05)


@pytest.mark.parametrize("make, match", [
    (lambda: hypergradient_lr(optax.identity(), 0.1, beta=-1.0), r"beta .*got -1\.0"),
    (lambda: hypergradient_adam(1e-3, beta=float("nan")), r"beta .*got nan"),
    (lambda: hypergradient_sgd(0.0), r"learning_rate .*got 0\.0"),
    (lambda: hypergradient_adam(-1e-3), r"learning_rate .*got -0\.001"),
    (lambda: hypergradient_sgd(2.0), r"learning_rate=2\.0 is outside"),
    (lambda: hypergradient_adam(1e-3, min_lr=0.5, max_lr=0.1), r"min_lr=0\.5, max_lr=0\.1"),
    (lambda: hypergradient_sgd(0.1, min_lr=-1.0), r"min_lr .*got -1\.0"),
    (lambda: hypergradient_sgd(0.1, momentum=1.5), r"momentum .*got 1\.5"),
    (lambda: hypergradient_adam(0.1, per_layer="yes"), r"per_layer must be True or False"),
    (lambda: hypergradient_adam(0.1, normalized=True, hyper_b2=1.0), r"hyper_b2 .*got 1\.0"),
])
def test_bad_input_raises_naming_the_value(make, match):
  with pytest.raises(ValueError, match=match):
    make()
