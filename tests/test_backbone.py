import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from metaopt.tasks.backbone import load_params, save_params


class Net(nn.Module):
  """A backbone with BatchNorm statistics and a named classifier head (dense: fast init)."""

  num_classes: int
  head: str = "head"

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(4, name="stem")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(x))
    x = nn.Dense(8, name="body")(x)
    return nn.Dense(self.num_classes, name=self.head)(x)


X = jnp.ones((2, 5))


@functools.lru_cache(maxsize=None)
def _init(seed, **kw):
  # Cached: flax init dominates this file's time. Never mutated.
  return Net(**kw).init(jax.random.key(seed), X)


def _assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_tree_differs(a, b):
  assert any(
      not np.array_equal(np.asarray(x), np.asarray(y))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def _orbax_save(path, tree):
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, tree)
  checkpointer.wait_until_finished()
  return path


def test_msgpack_roundtrip_exact(tmp_path):
  saved, fresh = _init(0, num_classes=3), _init(1, num_classes=3)
  _assert_tree_differs(saved, fresh)
  path = save_params(tmp_path / "sub" / "ckpt.msgpack", saved)
  loaded = load_params(path, fresh)
  _assert_tree_equal(loaded, saved)


def test_orbax_roundtrip_exact_keeps_namedtuples(tmp_path):
  import optax

  params = _init(0, num_classes=3)
  state = {"params": params, "opt": optax.adam(1e-3).init(params)}
  path = _orbax_save(tmp_path / "orbax", state)
  target = {"params": _init(1, num_classes=3), "opt": optax.adam(1e-3).init(params)}
  loaded = load_params(path, target)
  _assert_tree_equal(loaded, state)
  assert type(loaded["opt"][0]).__name__ == "ScaleByAdamState"


@pytest.mark.parametrize("fmt", ["msgpack", "orbax"])
def test_partial_load_replaces_backbone_keeps_new_head(tmp_path, fmt):
  pretrained = _init(0, num_classes=10)
  target = _init(1, num_classes=5, head="new_head")
  if fmt == "msgpack":
    path = save_params(tmp_path / "backbone.msgpack", pretrained)
  else:
    path = _orbax_save(tmp_path / "backbone", pretrained)
  params, loaded = load_params(path, target, strict=False, exclude=["params/head"])
  assert "params/stem/kernel" in loaded and "batch_stats/bn/mean" in loaded
  assert not any("head" in p for p in loaded)
  for name in ("stem", "bn", "body"):
    _assert_tree_equal(params["params"][name], pretrained["params"][name])
  _assert_tree_equal(params["params"]["new_head"], target["params"]["new_head"])


@pytest.mark.parametrize("fmt", ["msgpack", "orbax"])
def test_head_with_other_class_count_is_a_shape_error_unless_excluded(tmp_path, fmt):
  if fmt == "msgpack":
    path = save_params(tmp_path / "p.msgpack", _init(0, num_classes=10))
  else:
    path = _orbax_save(tmp_path / "p", _init(0, num_classes=10))
  target = _init(1, num_classes=5)
  with pytest.raises(ValueError, match=r"'params/head/bias'.*\(10,\).*\(5,\)"):
    load_params(path, target, strict=False)
  params, loaded = load_params(path, target, strict=False, exclude=["params/head"])
  _assert_tree_equal(params["params"]["head"], target["params"]["head"])
  assert "params/body/kernel" in loaded


@pytest.mark.parametrize("fmt", ["msgpack", "orbax"])
def test_strict_shape_mismatch_names_path_and_shapes(tmp_path, fmt):
  saved = _init(0, num_classes=3)
  target = _init(0, num_classes=4)
  if fmt == "msgpack":
    path = save_params(tmp_path / "p.msgpack", saved)
  else:
    path = _orbax_save(tmp_path / "p", saved)
  with pytest.raises(ValueError, match=r"'params/head/kernel'.*\(8, 3\).*\(8, 4\)"):
    load_params(path, target)


def test_strict_load_rejects_different_paths(tmp_path):
  path = save_params(tmp_path / "p.msgpack", _init(0, num_classes=3))
  with pytest.raises(ValueError, match="new_head"):
    load_params(path, _init(0, num_classes=3, head="new_head"))


def test_missing_file_and_garbage_files(tmp_path):
  target = _init(0, num_classes=3)
  with pytest.raises(FileNotFoundError, match="nope.msgpack"):
    load_params(tmp_path / "nope.msgpack", target)
  garbage = tmp_path / "garbage.bin"
  garbage.write_bytes(b"\xc1 this is not msgpack \x00\xff" * 10)
  with pytest.raises(ValueError, match="not a flax msgpack checkpoint"):
    load_params(garbage, target)
  text = tmp_path / "notes.txt"
  text.write_text("hello")  # decodes to a msgpack int, not a dict of arrays
  with pytest.raises(ValueError, match="garbage|not a"):
    load_params(text, target)
  (tmp_path / "emptydir").mkdir()
  with pytest.raises(ValueError, match="not an orbax checkpoint"):
    load_params(tmp_path / "emptydir", target)


def test_unrelated_checkpoint_shares_no_paths(tmp_path):
  path = save_params(tmp_path / "p.msgpack", {"encoder": {"w": np.ones(3, np.float32)}})
  with pytest.raises(ValueError, match="shares no parameter paths"):
    load_params(path, _init(0, num_classes=3), strict=False)
