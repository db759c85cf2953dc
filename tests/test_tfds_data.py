import numpy as np
import pytest
import tensorflow_datasets as tfds

from metaopt.tasks import tfds_data
from metaopt.tasks.tfds_data import MISSING, TFDS_NAMES, ClassPool, load_class_pool

N = 48


@pytest.fixture
def mock_tfds():
  # Random examples, no network; inside the mock every split gives the same examples.
  with tfds.testing.mock_data(num_examples=N):
    yield


def test_plan_names_map_to_existing_tfds_builders():
  for plan, name in TFDS_NAMES.items():
    assert tfds.builder_cls(name).name == name, plan
  for plan in MISSING:
    with pytest.raises(ValueError, match="not available"):
      tfds_data.tfds_name(plan)
  assert "fgvc_aircraft" in MISSING
  roles = [n for names in tfds_data.TRANSFER_SPLITS.values() for n in names]
  assert set(roles) <= set(TFDS_NAMES) | set(MISSING)
  assert set(tfds_data.ALL_SPLITS) == set(TFDS_NAMES.values())


def test_cifar100_pool_matches_the_source_examples(mock_tfds):
  pool = load_class_pool("cifar100", split="train", image_size=32)
  assert isinstance(pool, ClassPool) and pool.name == "cifar100"
  assert pool.x.shape == (N, 32, 32, 3) and pool.x.dtype == np.float32
  assert pool.y.shape == (N,) and pool.y.dtype == np.int32
  assert 0.0 <= pool.x.min() and pool.x.max() <= 1.0
  # Labels are contiguous 0..C-1 over the classes present.
  assert set(pool.y.tolist()) == set(range(pool.num_classes))
  # Same size -> no resampling: every image and label is the source's, in order.
  source = tfds.data_source("cifar100", split="train")
  names = source.dataset_info.features["label"].names
  for i in (0, 7, N - 1):
    example = source[i]
    np.testing.assert_allclose(pool.x[i] * 255.0, example["image"], atol=1e-3)
    assert pool.class_names[pool.y[i]] == names[int(example["label"])]


def test_omniglot_resize_grayscale_and_label_key(mock_tfds):
  pool = load_class_pool("omniglot", split="test", image_size=28, grayscale=True)
  assert pool.x.shape == (N, 28, 28, 1) and pool.x.dtype == np.float32
  assert pool.y.min() == 0 and pool.y.max() == pool.num_classes - 1
  assert pool.num_classes <= 1623
  by_alphabet = load_class_pool("omniglot", split="test", image_size=8, label_key="alphabet")
  assert by_alphabet.x.shape == (N, 8, 8, 3)
  assert by_alphabet.num_classes <= 50
  with pytest.raises(ValueError, match="label_key 'image'.*accepted"):
    load_class_pool("omniglot", split="test", label_key="image")


def test_max_per_class_is_respected_and_seeded(mock_tfds):
  full = load_class_pool("cifar100", split="train", label_key="coarse_label", image_size=4)
  counts = np.bincount(full.y)
  assert counts.max() > 1  # 48 examples over 20 classes: the cap must bite
  pools = [
      load_class_pool(
          "cifar100", split="train", label_key="coarse_label", image_size=4,
          max_per_class=1, seed=seed,
      )
      for seed in (0, 0, 1, 2)
  ]
  for pool in pools:
    assert np.bincount(pool.y).max() == 1
    assert pool.num_classes == full.num_classes == len(pool.y)  # every class kept once
  np.testing.assert_array_equal(pools[0].x, pools[1].x)  # same seed, same subset
  # Another seed picks other examples of some repeated class.
  assert any(not np.array_equal(pools[0].x, p.x) for p in pools[2:])


def test_plan_name_and_split_expression(mock_tfds):
  pool = load_class_pool("flowers102", split=tfds_data.ALL_SPLITS["oxford_flowers102"],
                         image_size=8)
  assert pool.name == "oxford_flowers102" and pool.x.shape == (N, 8, 8, 3)


def test_bad_names_and_arguments():
  with pytest.raises(ValueError, match="unknown dataset 'imagenet'.*cifar100.*omniglot"):
    load_class_pool("imagenet", split="train")
  with pytest.raises(ValueError, match="fgvc_aircraft.*not available.*tensorflow-datasets"):
    load_class_pool("fgvc_aircraft", split="train")
  with pytest.raises(ValueError, match="image_size"):
    load_class_pool("cifar100", split="train", image_size=0)
  with pytest.raises(ValueError, match="max_per_class"):
    load_class_pool("cifar100", split="train", max_per_class=0)


def test_unprepared_data_is_a_file_not_found_error(tmp_path):
  data_dir = tmp_path / "tfds"
  with pytest.raises(FileNotFoundError, match=r"'cifar100'.*tfds.*tfds build cifar100"):
    load_class_pool("cifar100", split="train", data_dir=data_dir)
  with pytest.raises(FileNotFoundError, match="cars196.*404"):
    load_class_pool("stanford_cars", split="train", data_dir=data_dir)
  assert not any(data_dir.rglob("*.array_record*"))  # nothing was downloaded or written
