"""MAML on the unroll core: meta-gradients, variants, BatchNorm isolation, few-shot episodes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaopt.meta.maml import maml, meta_train_maml, pretrain, repeat
from metaopt.tasks.fewshot import (
    classification_metrics, cross_entropy_loss, fewshot_family, mse_loss, offline_fewshot_splits,
    offline_pool, sinusoid_family, split_classes, with_rotations)
from metaopt.tasks.models import MLP, Conv4

SINE = sinusoid_family(k_shot=5, num_query=5)


def tanh_mlp():
  """A tiny smooth regressor, so finite differences are accurate in float32."""
  import flax.linen as nn

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(1)(jnp.tanh(nn.Dense(6)(x)))

  model = Tiny()
  return model, model.init(jax.random.key(0), jnp.zeros((1, 1)))["params"]


def episodes(meta_batch=3, seed=0):
  return SINE.sample(jax.random.key(seed), meta_batch)


def flat_direction(tree, seed=1):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def objective(m, support, query):
  """The meta-loss computed independently of the estimators: adapt, then query loss."""
  def f(theta):
    state = m.init(theta["params"])._replace(theta=theta)
    return jnp.mean(m.evaluate(state, support, query)["loss"])
  return f


@pytest.mark.parametrize("variant", ["maml", "meta_sgd", "anil"])
def test_second_order_meta_gradient_matches_finite_differences(variant):
  model, params = tanh_mlp()
  m = maml(mse_loss(model), inner_lr=0.1, inner_steps=3, learn_inner_lr=variant == "meta_sgd",
           adapt_only="Dense_1" if variant == "anil" else None)
  support, query = episodes()
  theta = m.init(params).theta
  loss, grad, _ = jax.jit(m.meta_gradient)(theta, support, query)
  f = jax.jit(objective(m, support, query))
  np.testing.assert_allclose(loss, f(theta), rtol=1e-5)
  for seed in range(3):
    d = flat_direction(theta, seed)
    if "inner_lr" in d:  # inner LRs are 0.1: a unit step would leave the linear regime
      d["inner_lr"] = jax.tree.map(lambda v: 0.1 * v, d["inner_lr"])
    eps = 1e-2
    plus = jax.tree.map(lambda t, v: t + eps * v, theta, d)
    minus = jax.tree.map(lambda t, v: t - eps * v, theta, d)
    fd = (f(plus) - f(minus)) / (2 * eps)
    analytic = sum(jnp.vdot(g, v) for g, v in zip(jax.tree.leaves(grad), jax.tree.leaves(d)))
    np.testing.assert_allclose(analytic, fd, rtol=2e-2, atol=1e-4)


def test_first_order_is_second_order_without_second_order_terms():
  model, params = tanh_mlp()
  loss_fn = mse_loss(model)
  support, query = episodes()
  fo = maml(loss_fn, inner_lr=0.1, inner_steps=3, first_order=True)
  so = maml(loss_fn, inner_lr=0.1, inner_steps=3)
  theta = fo.init(params).theta
  _, g_fo, _ = fo.meta_gradient(theta, support, query)
  # FOMAML: the query gradient at the adapted parameters, averaged over tasks.
  state = fo.init(params)
  per_task = [jax.grad(loss_fn)(fo.adapt(state, jax.tree.map(lambda x: x[i], support)),
                                jax.tree.map(lambda x: x[i], query)) for i in range(3)]
  expected = jax.tree.map(lambda *g: jnp.mean(jnp.stack(g), 0), *per_task)
  for a, b in zip(jax.tree.leaves(g_fo["params"]), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  _, g_so, _ = so.meta_gradient(theta, support, query)
  gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in
            zip(jax.tree.leaves(g_so), jax.tree.leaves(g_fo)))
  assert gap > 1e-4  # the second-order terms are really there


def test_meta_sgd_inner_lr_receives_gradients_and_learns():
  model, params = tanh_mlp()
  m = maml(mse_loss(model), inner_lr=0.05, inner_steps=2, learn_inner_lr=True)
  state = m.init(params)
  assert len(state.theta["inner_lr"]) == len(jax.tree.leaves(params))
  _, grad, _ = m.meta_gradient(state.theta, *episodes())
  assert all(float(jnp.abs(g).max()) > 0 for g in grad["inner_lr"])
  new, _ = jax.jit(m.meta_step)(state, *episodes())
  changed = [not np.allclose(a, b) for a, b in zip(new.theta["inner_lr"], state.theta["inner_lr"])]
  assert all(changed)


def test_anil_adapts_only_the_head():
  model, params = tanh_mlp()
  m = maml(mse_loss(model), inner_lr=0.1, inner_steps=2, adapt_only=["Dense_1"])
  support, _ = episodes()
  adapted = m.adapt(m.init(params), jax.tree.map(lambda x: x[0], support), steps=4)
  np.testing.assert_array_equal(adapted["Dense_0"]["kernel"], params["Dense_0"]["kernel"])
  assert not np.allclose(adapted["Dense_1"]["kernel"], params["Dense_1"]["kernel"])
  with pytest.raises(ValueError, match="selects no parameter.*Dense_0/bias"):
    maml(mse_loss(model), inner_lr=0.1, inner_steps=1, adapt_only="Head").init(params)


def test_adapt_takes_more_steps_at_test_time():
  model, params = tanh_mlp()
  m = maml(mse_loss(model), inner_lr=0.1, inner_steps=1)
  state = m.init(params)
  support, query = episodes()
  ev1 = m.evaluate(state, support, query)
  ev5 = m.evaluate(state, support, query, steps=5, curve=True)
  assert ev5["curve/loss"].shape == (3, 6)
  np.testing.assert_allclose(ev5["curve/loss"][:, 1], ev1["loss"], rtol=1e-5)
  np.testing.assert_allclose(ev5["curve/loss"][:, 0], ev1["loss_before"], rtol=1e-6)
  np.testing.assert_allclose(ev5["curve/loss"][:, -1], ev5["loss"], rtol=1e-6)


def test_meta_training_lowers_query_loss_and_resumes_exactly():
  model = MLP(hidden=(16,), num_classes=1)
  params = model.init(jax.random.key(0), jnp.zeros((1, 1)))["params"]
  m = maml(mse_loss(model), inner_lr=0.01, inner_steps=2)
  sample = lambda k: SINE.sample(k, 4)
  key = jax.random.key(3)
  full, history = meta_train_maml(m, m.init(params), sample, key=key, iterations=60, chunk=20)
  assert history["query_loss"].shape == (60,)
  assert history["query_loss"][-20:].mean() < history["query_loss"][:20].mean()
  half, _ = meta_train_maml(m, m.init(params), sample, key=key, iterations=40, chunk=20)
  resumed, rest = meta_train_maml(m, half, sample, key=key, iterations=60, chunk=20)
  assert rest["query_loss"].shape == (20,)
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_pretrain_lowers_loss():
  model = MLP(hidden=(16,), num_classes=1)
  params = model.init(jax.random.key(0), jnp.zeros((1, 1)))["params"]
  sample = lambda k: SINE.points(k, SINE.sample_task(jax.random.fold_in(k, 1)), 20)
  _, history = pretrain(mse_loss(model), params, sample, key=jax.random.key(0), steps=40,
                        chunk=20)
  assert history["loss"].shape == (40,)


def conv_setup(filters=4):
  pools = offline_fewshot_splits("digits")
  family = fewshot_family(pools["train"], n_way=3, k_shot=2, num_query=4)
  model = Conv4(num_classes=3, filters=filters)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
  return family, model, params


def test_batchnorm_statistics_stay_within_a_task():
  family, model, params = conv_setup()
  m = maml(cross_entropy_loss(model), inner_lr=0.1, inner_steps=2,
           metrics_fn=classification_metrics(model, 3))
  state = m.init(params)
  a = family.sample(jax.random.key(0), 2)
  b = family.sample(jax.random.key(1), 2)
  # Same task 0, a different task 1 beside it (with very different inputs).
  mixed = jax.tree.map(lambda x, y: jnp.stack([x[0], 5.0 * y[1] if x.dtype == jnp.float32
                                               else y[1]]), a, b)
  ev_a = jax.jit(m.evaluate)(state, *a)
  ev_mixed = jax.jit(m.evaluate)(state, *mixed)
  np.testing.assert_allclose(ev_mixed["loss"][0], ev_a["loss"][0], rtol=1e-5)
  assert not np.isclose(ev_mixed["loss"][1], ev_a["loss"][1])
  # Mapping tasks one after another gives the same numbers as vmapping them.
  mapped = maml(cross_entropy_loss(model), inner_lr=0.1, inner_steps=2,
                metrics_fn=classification_metrics(model, 3), vectorize=False)
  ev_map = jax.jit(mapped.evaluate)(state, *a)
  np.testing.assert_allclose(ev_map["loss"], ev_a["loss"], rtol=1e-5)
  assert set(ev_a) >= {"loss", "accuracy", "macro_f1", "loss_before", "accuracy_before"}


def test_episodes_never_share_classes_across_splits():
  pools = offline_fewshot_splits("digits")
  names = {k: set(p.class_names) for k, p in pools.items()}
  assert len(names["train"] | names["val"] | names["test"]) == 40  # 10 digits x 4 rotations
  assert not names["train"] & names["val"] and not names["train"] & names["test"]
  assert not names["val"] & names["test"]
  # Every image of a sampled episode belongs to its split's pool, one class per label.
  for split, pool in pools.items():
    family = fewshot_family(pool, n_way=5, k_shot=2, num_query=3)
    support, query = family.sample(jax.random.key(0), 4)
    flat = pool.x.reshape(len(pool.x), -1)
    lookup = {row.tobytes(): pool.class_names[c] for row, c in zip(flat, pool.y)}
    for t in range(4):
      classes = set()
      for batch in (support, query):
        x = np.asarray(batch["x"][t]).reshape(len(batch["x"][t]), -1)
        for row, label in zip(x, np.asarray(batch["y"][t])):
          assert row.tobytes() in lookup, split
          classes.add((int(label), lookup[row.tobytes()]))
      assert len(classes) == 5  # 5 labels, each always the same class
    assert support["x"].shape == (4, 10, 8, 8, 1) and query["y"].shape == (4, 15)


def test_compiled_sampling_draws_what_the_episodes_draw():
  # sample() is compiled; each of its episodes is what episode() draws from its key.
  pool = offline_fewshot_splits("digits")["train"]
  key = jax.random.key(3)
  for family in (SINE, fewshot_family(pool, n_way=3, k_shot=1, num_query=2)):
    support, query = family.sample(key, 3)
    for t, k in enumerate(jax.random.split(key, 3)):
      one_support, one_query = family.episode(k)
      for got, want in ((support, one_support), (query, one_query)):
        for name in ("x", "y"):
          np.testing.assert_allclose(got[name][t], want[name], rtol=1e-6)


def test_rotations_are_new_classes():
  pool = offline_pool("digits")
  rotated = with_rotations(pool, (0, 90))
  assert rotated.num_classes == 20 and rotated.class_names[10] == "0@90"
  np.testing.assert_array_equal(rotated.x[len(pool.x)], np.rot90(pool.x[0]))


def test_bad_episode_sizes_and_steps_name_the_numbers():
  pools = split_classes(offline_pool("digits"))
  with pytest.raises(ValueError, match="n_way=7 exceeds the 2 classes"):
    fewshot_family(pools["val"], n_way=7)
  with pytest.raises(ValueError, match=r"k_shot \+ num_query = 100 \+ 100 = 200 exceeds the"):
    fewshot_family(pools["train"], n_way=2, k_shot=100, num_query=100)
  with pytest.raises(ValueError, match="inner_steps must be an integer >= 1, got 0"):
    maml(lambda p, b: 0.0, inner_lr=0.1, inner_steps=0)
  with pytest.raises(ValueError, match="k_shot must be an integer >= 1, got 0"):
    sinusoid_family(k_shot=0)


def test_sinusoid_family_ranges():
  support, query = sinusoid_family(k_shot=20).sample(jax.random.key(0), 50)
  assert support["x"].shape == (50, 20, 1) and query["x"].shape == (50, 10, 1)
  assert float(jnp.abs(support["x"]).max()) <= 5.0
  assert float(jnp.abs(support["y"]).max()) <= 5.0
  assert float(jnp.abs(support["y"]).max()) > 1.0


def test_repeat_adds_a_time_axis():
  b = repeat({"x": jnp.ones((2, 3))}, 4)
  assert b["x"].shape == (4, 2, 3)


def test_meta_training_resumes_from_its_checkpoints_on_the_driver(tmp_path):
  model = MLP(hidden=(8,), num_classes=1)
  params = model.init(jax.random.key(0), jnp.zeros((1, 1)))["params"]
  m = maml(mse_loss(model), inner_lr=0.01, inner_steps=1)
  sample = lambda k: SINE.sample(k, 2)
  kw = dict(key=jax.random.key(5), iterations=6, chunk=2)
  full, history = meta_train_maml(m, m.init(params), sample, directory=tmp_path / "a", **kw)
  meta_train_maml(m, m.init(params), sample, directory=tmp_path / "b", stop_after=3, **kw)
  resumed, resumed_history = meta_train_maml(m, m.init(params), sample,
                                             directory=tmp_path / "b", **kw)
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(history["query_loss"], resumed_history["query_loss"])
  assert (tmp_path / "a" / "metrics.jsonl").read_text() == \
      (tmp_path / "b" / "metrics.jsonl").read_text()
