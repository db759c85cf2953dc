import math
import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metaopt.tasks import (
    DATASETS,
    TaskConfig,
    TaskFamily,
    load_dataset,
    make_model,
    make_task,
    task_family,
)
from metaopt.tasks import data as data_mod


def _config(**overrides) -> TaskConfig:
  base = dict(
      dataset="digits", model="mlp", width=16, depth=1, batch_size=32, total_steps=10, seed=0
  )
  return TaskConfig(**{**base, **overrides})


@pytest.mark.parametrize("name", DATASETS)
def test_dataset_loads_with_valid_standardized_splits(name):
  d = load_dataset(name)
  sizes = [len(d.x_train), len(d.x_val), len(d.x_test)]
  assert sum(sizes) == data_mod.NUM_EXAMPLES[name]
  assert [len(d.y_train), len(d.y_val), len(d.y_test)] == sizes
  assert len(d.x_train) == data_mod.num_train_examples(name)
  for x, y in [(d.x_train, d.y_train), (d.x_val, d.y_val), (d.x_test, d.y_test)]:
    assert x.dtype == np.float32 and y.dtype == np.int32
    assert x.ndim == 2 and y.min() >= 0 and y.max() < d.num_classes
  assert set(np.unique(d.y_train)) == set(range(d.num_classes))
  assert abs(float(d.x_train.mean())) < 1e-3
  if d.image_shape is not None:
    assert d.x_train.shape[1] == math.prod(d.image_shape)
    assert abs(float(d.x_train.std()) - 1.0) < 1e-3  # one global std for images
  else:
    np.testing.assert_allclose(d.x_train.mean(axis=0), 0.0, atol=1e-4)


def test_split_indices_partition_the_examples():
  y = np.repeat(np.arange(5), 40)
  train, val, test = data_mod.split_indices(y, 3, 0.2, 0.2)
  every = np.concatenate([train, val, test])
  assert len(every) == len(y) and len(np.unique(every)) == len(y)
  assert (len(train), len(val), len(test)) == (120, 40, 40)
  assert np.bincount(y[test]).tolist() == [8] * 5  # stratified


def test_image_datasets_keep_pixel_structure():
  d = load_dataset("digits")
  # Digits pixels take 17 raw values; one global affine map keeps exactly those levels,
  # per-pixel standardization would create many more.
  assert len(np.unique(np.concatenate([d.x_train, d.x_val, d.x_test]))) == 17


def test_mnist1d_leaves_global_rngs_untouched(monkeypatch):
  monkeypatch.setattr(data_mod, "MNIST1D_NUM_SAMPLES", 200)
  np.random.seed(1234)
  random.seed(1234)
  np_expected, py_expected = np.random.rand(3), random.random()
  np.random.seed(1234)
  random.seed(1234)
  x, y = data_mod._mnist1d(seed=5)
  assert x.shape == (200, 40) and y.shape == (200,)
  np.testing.assert_array_equal(np.random.rand(3), np_expected)
  assert random.random() == py_expected


def test_same_seed_same_splits_different_seed_different():
  a, b, c = (load_dataset("digits", seed=s) for s in (1, 1, 2))
  for field in ("x_train", "y_train", "x_val", "x_test"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
  assert not np.array_equal(a.x_train, c.x_train)
  s1, s2 = load_dataset("synthetic", seed=1), load_dataset("synthetic", seed=2)
  assert not np.array_equal(s1.x_train[:5], s2.x_train[:5])


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        (dict(name="foo"), "'foo'"),
        (dict(name="digits", val_fraction=1.5), "1.5"),
        (dict(name="digits", test_fraction=0.0), "0.0"),
        (dict(name="digits", val_fraction=0.6, test_fraction=0.45), "0.45"),
    ],
)
def test_load_dataset_rejects_bad_inputs(kwargs, bad):
  name = kwargs.pop("name")
  with pytest.raises(ValueError, match=bad):
    load_dataset(name, **kwargs)


def test_unknown_dataset_lists_accepted_names():
  with pytest.raises(ValueError, match="accepted: digits, wine"):
    load_dataset("foo")


@pytest.fixture(scope="module")
def digits_task():
  return make_task(_config(width=32, batch_size=32))


def test_mlp_loss_at_init_is_near_log_num_classes(digits_task):
  task = digits_task
  arrays = task.arrays()
  params = task.init(jax.random.key(0))

  @jax.jit
  def evaluate(params, arrays):
    loss = task.loss(params, {"x": arrays["x_train"], "y": arrays["y_train"]})
    return loss, task.metrics(params, arrays["x_val"], arrays["y_val"])

  loss, m = evaluate(params, arrays)
  assert abs(float(loss) - math.log(10)) < 0.5
  assert set(m) == {"loss", "accuracy", "macro_f1"} and 0.0 <= float(m["accuracy"]) <= 1.0
  assert 0.0 <= float(m["macro_f1"]) <= 1.0


def test_sample_batch_under_jit(digits_task):
  task = digits_task
  arrays = task.arrays()
  assert task.arrays() is arrays  # cached
  sample = jax.jit(task.sample_batch, static_argnames=("split", "batch_size"))
  batch = sample(arrays, jax.random.key(1))
  assert batch["x"].shape == (32, 64) and batch["y"].shape == (32,)
  assert batch["y"].dtype == jnp.int32
  val = sample(arrays, jax.random.key(1), split="val", batch_size=5)
  assert val["x"].shape == (5, 64)
  again = sample(arrays, jax.random.key(1))
  np.testing.assert_array_equal(batch["x"], again["x"])
  with pytest.raises(ValueError, match="'dev'"):
    task.sample_batch(arrays, jax.random.key(0), split="dev")


def test_cnn_on_digits_runs_forward():
  task = make_task(_config(model="cnn", width=4, depth=2))
  params = task.init(jax.random.key(0))
  arrays = task.arrays()

  @jax.jit
  def forward(params, x, y):
    return task.model.apply({"params": params}, x), task.metrics(params, x, y)

  logits, m = forward(params, arrays["x_val"], arrays["y_val"])
  assert logits.shape == (len(task.data.x_val), 10)
  assert np.isfinite(float(m["loss"]))


def test_adam_trains_digits_mlp(digits_task):
  task = digits_task
  arrays = task.arrays()
  opt = optax.adam(1e-2)
  params = task.init(jax.random.key(0))

  @jax.jit
  def train(params, arrays, key):
    def step(carry, k):
      params, opt_state = carry
      grads = jax.grad(task.loss)(params, task.sample_batch(arrays, k))
      updates, opt_state = opt.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), jax.random.split(key, 200))
    return params

  evaluate = jax.jit(task.metrics)
  before = evaluate(params, arrays["x_train"], arrays["y_train"])
  params = train(params, arrays, jax.random.key(1))
  after = evaluate(params, arrays["x_train"], arrays["y_train"])
  test = evaluate(params, arrays["x_test"], arrays["y_test"])
  assert float(before["loss"]) > 2.0
  assert float(after["loss"]) < 0.5
  assert float(test["accuracy"]) > 0.85


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        (dict(kind="lstm"), "'lstm'"),
        (dict(kind="mlp", width=0), "0"),
        (dict(kind="mlp", depth=-2), "-2"),
        (dict(kind="cnn", image_shape=None), "None"),
    ],
)
def test_make_model_rejects_bad_inputs(kwargs, bad):
  args = dict(width=8, depth=1, num_classes=3, image_shape=None) | kwargs
  with pytest.raises(ValueError, match=bad):
    make_model(args.pop("kind"), **args)


@pytest.mark.parametrize(
    "overrides, bad",
    [
        (dict(batch_size=5000), "5000"),
        (dict(batch_size=0), "0"),
        (dict(model="cnn", dataset="wine"), "'wine'"),
        (dict(model="resnet"), "'resnet'"),
        (dict(dataset="imagenet"), "'imagenet'"),
        (dict(width=0), "width"),
    ],
)
def test_make_task_rejects_bad_configs(overrides, bad):
  with pytest.raises(ValueError, match=bad):
    make_task(_config(**overrides))


def test_batch_size_error_names_both_numbers():
  with pytest.raises(ValueError, match=r"batch_size 5000 .* 1077 training examples"):
    make_task(_config(batch_size=5000))


def test_config_name():
  cfg = _config(width=64, depth=2, batch_size=32, total_steps=1000)
  assert cfg.name == "digits-mlp-64x2-b32-s1000"


def test_family_sample_is_deterministic_and_valid():
  fam = task_family(
      datasets=("digits", "iris", "wine"),
      models=("mlp", "cnn"),
      widths=(8, 16),
      depths=(1, 2),
      batch_sizes=(16, 32),
      total_steps=(50, 100),
  )
  assert isinstance(fam, TaskFamily)
  keys = jax.random.split(jax.random.key(0), 24)
  configs = [fam.sample(k) for k in keys]
  assert configs == [fam.sample(k) for k in keys]
  assert len(set(configs)) > 8
  for cfg in configs:
    ints = (cfg.width, cfg.depth, cfg.batch_size, cfg.total_steps, cfg.seed)
    assert all(type(v) is int for v in ints)
    assert cfg.dataset in fam.datasets and cfg.width in fam.widths
    assert cfg.model == "mlp" or cfg.dataset == "digits"
  assert any(c.model == "cnn" for c in configs)
  make_task(configs[0])  # a sampled config builds


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        (dict(datasets=("cifar",)), "'cifar'"),
        (dict(datasets=("digits",), models=("lstm",)), "'lstm'"),
        (dict(datasets=()), r"\(\)"),
        (dict(datasets=("digits",), widths=()), "widths"),
        (dict(datasets=("digits",), depths=(1, 0)), "0"),
        (dict(datasets=("digits",), total_steps=(-5,)), "-5"),
        (dict(datasets=("iris",), batch_sizes=(256,)), "256"),
    ],
)
def test_task_family_rejects_bad_inputs(kwargs, bad):
  with pytest.raises(ValueError, match=bad):
    task_family(**kwargs)
