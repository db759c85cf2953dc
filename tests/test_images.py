"""Images (issue 11): stand-ins, tfds pipelines on mock data, ResNets with BatchNorm state,
mixed precision, the jitted training step, and pretrained-weight loading."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

import metaopt.tasks.images  # noqa: F401  (registers the image datasets and models)
from metaopt.tasks import TaskConfig, images, load_dataset, make_task, resnet
from metaopt.tasks.models import make_model

N = 40  # mock examples per split


@pytest.fixture
def mock_tfds():
  # Random examples, no network; inside the mock every split gives the same examples.
  with tfds.testing.mock_data(num_examples=N):
    yield


# --- stand-ins ---------------------------------------------------------------------------

def test_standins_are_deterministic_and_keep_their_sources_labels():
  a = load_dataset("mnist5k_28", seed=3)
  b = load_dataset("mnist5k_28", seed=3)
  np.testing.assert_array_equal(a.x_train, b.x_train)
  assert a.image_shape == (28, 28, 1) and a.x_train.shape == (3000, 28, 28, 1)
  assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int32
  # Same split and standardization as the flat offline set: the very same examples.
  flat = load_dataset("mnist5k", seed=3)
  np.testing.assert_allclose(a.x_test.reshape(len(a.x_test), -1), flat.x_test, atol=1e-5)
  np.testing.assert_array_equal(a.y_test, flat.y_test)
  assert not np.array_equal(load_dataset("mnist5k_28", seed=4).y_test, a.y_test)

  big = load_dataset("digits_32", seed=1)
  small = load_dataset("digits", seed=1)
  assert big.image_shape == (32, 32, 1) and big.num_classes == 10
  np.testing.assert_array_equal(big.y_train, small.y_train)
  # Shrunk back to 8x8, each upsampled image still matches its own digit.
  shrunk = big.x_train[:50, :, :, 0].reshape(50, 8, 4, 8, 4).mean(axis=(2, 4)).reshape(50, -1)
  corr = np.corrcoef(shrunk, small.x_train[:50])[:50, 50:]
  assert (np.argmax(corr, axis=1) == np.arange(50)).mean() > 0.9
  assert abs(float(big.x_train.mean())) < 1e-3 and abs(float(big.x_train.std()) - 1) < 1e-3


# --- tfds pipelines ----------------------------------------------------------------------

@pytest.mark.parametrize("name", list(images.IMAGE_SETS))
def test_pipeline_shapes_dtypes_and_splits(mock_tfds, name):
  size = 8 if images.IMAGE_SETS[name].image_size != 32 else 32
  batches = list(images.image_batches(name, "train", batch_size=8, image_size=size))
  x, y = batches[0]["x"], batches[0]["y"]
  assert x.shape == (8, size, size, 3) and x.dtype == np.float32
  assert y.shape == (8,) and y.dtype == np.int32
  train = images.split_source(name, "train")
  val = images.split_source(name, "val")
  assert 0 <= y.min() and y.max() < train.num_classes
  assert len(batches) == len(train) // 8  # the partial last batch is dropped
  if "validation" in images.IMAGE_SETS[name].splits:
    assert len(val) == len(train) == N  # tfds' own validation split
  else:  # carved from train: disjoint, together all of it
    assert len(val) == 4 and not set(val.indices) & set(train.indices)
    assert sorted([*val.indices, *train.indices]) == list(range(N))


def test_pipeline_is_seeded_and_reshuffles_each_epoch(mock_tfds):
  def run(seed, **kw):
    return [b["x"] for b in images.image_batches("cifar10", "train", batch_size=6, seed=seed,
                                                 num_epochs=2, **kw)]
  a, b, c = run(0), run(0), run(1)
  assert len(a) == 12
  for u, v in zip(a, b):
    np.testing.assert_array_equal(u, v)
  assert not np.array_equal(a[0], c[0])
  plain = run(0, augment=False)
  epoch1, epoch2 = np.concatenate(plain[:6]), np.concatenate(plain[6:])
  assert not np.array_equal(epoch1, epoch2)  # a new order in the second epoch ...
  np.testing.assert_allclose(np.sort(epoch1.ravel()), np.sort(epoch2.ravel()))  # same images
  test = [b["x"] for b in images.image_batches("cifar10", "test", batch_size=16)]
  assert [len(t) for t in test] == [16, 16, 8]  # evaluation keeps every example, in order


def test_random_crop_flip_moves_windows_of_the_padded_image():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 255, (16, 6, 5, 3)).astype(np.uint8)
  out = images.random_crop_flip(x, np.random.default_rng(1), padding=2)
  assert out.shape == x.shape and out.dtype == x.dtype
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  flipped = 0
  for i in range(16):
    windows = [padded[i, r:r + 6, c:c + 5] for r in range(5) for c in range(5)]
    plain = any(np.array_equal(out[i], w) for w in windows)
    mirror = any(np.array_equal(out[i], w[:, ::-1]) for w in windows)
    assert plain or mirror
    flipped += mirror and not plain
  assert 0 < flipped < 16
  same = images.random_crop_flip(x, np.random.default_rng(1), padding=0, flip=False)
  np.testing.assert_array_equal(same, x)


def test_load_image_dataset_into_memory(mock_tfds):
  data = images.load_image_dataset("flowers102", image_size=8, max_examples=10)
  assert data.name == "oxford_flowers102" and data.image_shape == (8, 8, 3)
  assert data.x_train.shape == (10, 8, 8, 3) and data.x_test.dtype == np.float32
  assert data.num_classes == 102 and data.y_val.dtype == np.int32
  cifar = load_dataset("cifar10", seed=2)  # registered: read from $TFDS_DATA_DIR
  assert cifar.x_train.shape == (N - 8, 32, 32, 3) and len(cifar.x_val) == 8


def test_bad_input_gets_one_line_errors(mock_tfds, tmp_path):
  def one_line(excinfo):
    assert "\n" not in str(excinfo.value)
  with pytest.raises(ValueError, match="unknown image dataset 'cifar11'; accepted: cifar10") as e:
    images.image_batches("cifar11", batch_size=4)
  one_line(e)
  with pytest.raises(ValueError, match="fgvc_aircraft.*not available"):
    images.split_source("fgvc_aircraft")
  with pytest.raises(ValueError, match="split.*'validation'.*train, val, test") as e:
    images.split_source("cifar10", "validation")
  one_line(e)
  with pytest.raises(ValueError, match="batch_size 64 exceeds the 36 examples"):
    images.image_batches("cifar10", batch_size=64)


def test_missing_data_names_the_command_that_prepares_it(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"'cifar10'.*tfds build cifar10 --data_dir "
                     r".*--manual_dir") as e:
    images.image_batches("cifar10", batch_size=4, data_dir=tmp_path / "tfds")
  assert "\n" not in str(e.value)


# --- models ------------------------------------------------------------------------------

def test_full_size_parameter_counts_match_the_published_networks():
  def count(kind, stem, classes):
    model = resnet.resnet(kind, num_classes=classes, image_shape=(32, 32, 3), stem=stem)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    return sum(a.size for a in jax.tree.leaves(shapes["params"]))
  assert count("resnet18", "cifar", 10) == 11_173_962   # kuangliu/pytorch-cifar ResNet18
  assert count("resnet50", "cifar", 10) == 23_520_842
  assert count("resnet50", "imagenet", 1000) == 25_557_032  # torchvision resnet50


def test_bfloat16_compute_keeps_float32_master_weights(monkeypatch):
  model = resnet.resnet("resnet18", width=4, depth=1, num_classes=3, image_shape=(8, 8, 1),
                        dtype=jnp.bfloat16)
  x = jnp.zeros((2, 8, 8, 1))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  out, inter = jax.eval_shape(lambda v: model.apply(v, x, capture_intermediates=True),
                              variables)
  assert out.dtype == jnp.float32
  assert inter["intermediates"]["stem_conv"]["__call__"][0].dtype == jnp.bfloat16
  monkeypatch.setenv(resnet.PRECISION_ENV, "auto")
  assert resnet.compute_dtype() == jnp.float32  # off on the CPU by default
  monkeypatch.setenv(resnet.PRECISION_ENV, "bfloat16")
  assert resnet.compute_dtype() == jnp.bfloat16
  monkeypatch.setenv(resnet.PRECISION_ENV, "half")
  with pytest.raises(ValueError, match="METAOPT_COMPUTE_DTYPE.*'half'"):
    resnet.compute_dtype()


def random_variables(model, x, seed=0):
  """He-normal kernels, unit BatchNorm scales and variances: built in numpy from the
  shapes, so no initializer is compiled (compiling is most of a test's time)."""
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    if name in ("scale", "var"):
      return np.ones(s.shape, s.dtype)
    if name in ("bias", "mean"):
      return np.zeros(s.shape, s.dtype)
    return (rng.normal(size=s.shape) * np.sqrt(2 / np.prod(s.shape[:-1]))).astype(s.dtype)
  return jax.tree_util.tree_map_with_path(fill, jax.eval_shape(model.init, jax.random.key(0), x))


@pytest.fixture(scope="module")
def tiny():
  """A ResNet-18 (one stage, width 4) task on digits_28 and its jitted training step."""
  task = make_task(TaskConfig("digits_28", "resnet18", width=4, depth=1, batch_size=4,
                              total_steps=2, seed=0))
  tx = optax.sgd(0.1, momentum=0.9)
  variables = random_variables(task.model, task.data.x_train[:1])
  state = images.ImageTrainState(variables["params"], variables["batch_stats"],
                            tx.init(variables["params"]), jnp.zeros((), jnp.int32))
  return task, variables, state, images.make_train_step(task.model, tx)


def test_train_step_donates_and_updates_batch_norm_state(tiny):
  task, variables, state, step = tiny
  assert task.stateful
  batch = {"x": task.data.x_train[:4], "y": task.data.y_train[:4]}
  copy = jax.tree.map(jnp.array, state)
  new, metrics = step(copy, batch)
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves(copy))  # buffers donated
  assert int(new.step) == 1 and np.isfinite(metrics["loss"]) and "accuracy" in metrics
  moved = jax.tree.map(lambda a, b: not np.allclose(a, b), new.batch_stats, state.batch_stats)
  assert all(jax.tree.leaves(moved))  # every running mean and variance moved
  assert any(jax.tree.leaves(jax.tree.map(lambda a, b: not np.allclose(a, b), new.params,
                                          state.params)))

  # Evaluation uses the running statistics: other statistics give other outputs, and an
  # example's logits do not depend on the rest of the batch.
  x = jnp.asarray(task.data.x_test[:4])
  apply = jax.jit(lambda v, x: task.model.apply(v, x, train=False))
  out = apply(variables, x)
  assert not np.allclose(out, apply({**variables, "batch_stats": new.batch_stats}, x))
  others = x.at[1:].set(x[1:] * 3.0 + 1.0)
  np.testing.assert_allclose(out[0], apply(variables, others)[0], rtol=1e-5, atol=1e-5)


def test_forward_and_backward_of_every_model_kind():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
  for kind in ("resnet50", "resnet50_imagenet"):  # resnet18: the `tiny` fixture
    model = make_model(kind, width=2, depth=1, num_classes=3, image_shape=(8, 8, 3))
    variables = random_variables(model, x)

    def loss(params):
      out, state = model.apply({**variables, "params": params}, x, train=True,
                               mutable=["batch_stats"])
      return jnp.mean(out ** 2), (out, state)
    (value, (out, state)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        variables["params"])
    assert out.shape == (2, 3) and np.isfinite(value)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["stem_conv"]["kernel"]).sum()) > 0
    assert set(state) == {"batch_stats"}


def test_images_of_the_wrong_shape_are_refused(tiny):
  task, variables, _, _ = tiny
  with pytest.raises(ValueError, match=r"'resnet18' expects images of shape \(28, 28, 1\).*"
                     r"got \(32, 32, 1\)"):
    jax.eval_shape(task.model.apply, variables, jnp.zeros((1, 32, 32, 1)))
  flat = jax.eval_shape(task.model.apply, variables, jnp.zeros((2, 28 * 28)))
  assert flat.shape == (2, 10)  # flat inputs of the right size are reshaped
  with pytest.raises(ValueError, match="image_shape"):
    resnet.resnet("resnet18", num_classes=2, image_shape=(64,))


# --- pretrained weights ------------------------------------------------------------------

def test_weights_round_trip_and_mismatches_name_the_first_one(tiny, tmp_path):
  task, variables, _, _ = tiny
  variables = jax.tree.map(np.asarray, variables)
  path = resnet.save_npz(tmp_path / "w.npz", variables)
  other = jax.tree.map(np.zeros_like, variables)
  other["params"]["head"]["kernel"] = np.zeros((16, 7), np.float32)  # another class count
  loaded = resnet.load_weights(path, other)
  np.testing.assert_array_equal(loaded["params"]["stem_conv"]["kernel"],
                                variables["params"]["stem_conv"]["kernel"])
  np.testing.assert_array_equal(loaded["batch_stats"]["stem_bn"]["var"],
                                variables["batch_stats"]["stem_bn"]["var"])
  assert loaded["params"]["head"]["kernel"].shape == (16, 7)  # excluded: kept
  assert not loaded["params"]["head"]["kernel"].any()

  wider = resnet.resnet("resnet18", width=8, depth=1, num_classes=10, image_shape=(28, 28, 1))
  target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                        jax.eval_shape(wider.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1))))
  with pytest.raises(ValueError, match=r"'params/stage1_block0/bn1/bias' has shape \(4,\), "
                     r"the model expects \(8,\) \(first mismatch\)") as e:
    resnet.load_weights(path, target)
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="the model's first missing"):
    resnet.load_weights(path, {**variables, "params": {**variables["params"], "extra": {
        "kernel": np.zeros(1)}}})
  with pytest.raises(FileNotFoundError, match="do not exist"):
    resnet.load_weights(tmp_path / "none.npz", variables)

  ckpt = tmp_path / "orbax"
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(ckpt, variables)
  restored = resnet.load_weights(ckpt, variables, exclude=())
  np.testing.assert_array_equal(restored["params"]["head"]["kernel"],
                                variables["params"]["head"]["kernel"])
  with pytest.raises(ValueError, match=r"shape mismatch.*'batch_stats/stage1_block0/bn1/mean':"
                     r" checkpoint has \(4,\), the model expects \(8,\)"):
    resnet.load_weights(ckpt, target)

