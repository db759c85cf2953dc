"""metaopt.sharding: sharded equals unsharded on 4 forced CPU devices (one subprocess),
chunked vmap equals vmap, bad ``sharding=`` values, and the multi-host start."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from metaopt import sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Runs with 4 CPU devices; prints one JSON line of relative differences and errors.
MULTI_DEVICE = textwrap.dedent("""
  import json
  import jax, jax.numpy as jnp, numpy as np, optax
  from metaopt import estimators, sharding
  from metaopt.meta.lr import MetaLRConfig, meta_train
  from metaopt.meta.maml import maml
  from metaopt.tasks import TaskConfig, make_task, task_family
  from metaopt.train import train_grid
  from metaopt.unroll import InnerProblem

  assert jax.device_count() == 4, jax.devices()
  def rel(a, b):
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))
                     / (np.max(np.abs(np.asarray(x))) + 1e-30)) for x, y in zip(a, b))
  def spread(tree):  # how many devices the first leaf lives on
    return len(jax.tree.leaves(tree)[0].sharding.device_set)
  out = {}

  # meta_train: the population of each lane split over the 4 devices.
  family = task_family(datasets=("iris",), widths=(4,), depths=(1,), batch_sizes=(8,),
                       total_steps=(10,))
  config = MetaLRConfig(family=family, lanes=1, population=4, segment_length=5,
                        meta_steps=2, hidden=(4,), seed=1)
  one = meta_train(config, progress=False)
  four = meta_train(config, progress=False, sharding="auto")
  out["meta_train"] = rel(one.theta, four.theta)
  out["meta_train_moved"] = float(sum(np.abs(np.asarray(x)).sum()
                                      for x in jax.tree.leaves(one.theta)))
  try:
    meta_train(MetaLRConfig(**{**config.__dict__, "population": 6}), sharding="auto")
  except ValueError as e:
    out["indivisible"] = str(e)

  # A MAML meta-step over a meta-batch of 8 tasks, split over the devices.
  def loss_fn(p, b):
    return jnp.mean((jnp.tanh(b["x"] @ p["w1"]) @ p["w2"] - b["y"]) ** 2)
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  params = {"w1": jax.random.normal(k[0], (1, 16)), "w2": jax.random.normal(k[1], (16, 1))}
  x = jax.random.uniform(k[2], (8, 5, 1), minval=-3, maxval=3)
  phase = jax.random.uniform(k[3], (8, 1, 1), maxval=3)
  episode = {"x": x, "y": jnp.sin(x + phase)}
  grads = {}
  for name, kw in {"plain": {}, "sharded": {"sharding": "auto"},
                   "chunked": {"sharding": sharding.make_mesh(), "chunk_size": 4}}.items():
    m = maml(loss_fn, inner_lr=0.1, inner_steps=2, meta_optimizer=optax.sgd(1.0), **kw)
    state, metrics = jax.jit(m.meta_step)(m.init(params), episode, episode)
    # With SGD at LR 1 the step is the meta-gradient itself.
    grads[name] = jax.tree.map(lambda a, b: a - b, m.init(params).theta, state.theta)
  out["maml_devices"] = spread(grads["sharded"])
  for name in ("sharded", "chunked"):
    out[f"maml_{name}"] = rel(grads["plain"], grads[name])

  # train_grid: 4 runs, one per device.
  task = make_task(TaskConfig("iris", "mlp", 4, 1, 8, 10, 0))
  lrs, keys = jnp.array([1e-3, 3e-3, 1e-2, 3e-2]), jax.random.split(jax.random.PRNGKey(1), 4)
  grid = lambda **kw: train_grid(task, lambda lr: optax.adam(lr), lrs, keys, steps=4,
                                 eval_every=4, **kw)[0]
  out["train_grid"] = rel(grid(), grid(sharding="auto"))

  # ES: the pairs split over the devices.
  def step(theta, w, _):
    return w - jnp.exp(theta["log_lr"]) * w, {"loss": jnp.sum(w ** 2)}
  problem = InnerProblem(lambda theta, key: theta["w0"], step, lambda th, w, _: jnp.sum(w ** 2))
  theta = {"log_lr": jnp.full(3, -2.0), "w0": jnp.ones(3)}
  es = lambda **kw: jax.jit(lambda th: estimators.es(
      problem, th, th["w0"], None, None, key=jax.random.PRNGKey(2), population=8,
      length=4, **kw).grad)(theta)
  out["es"] = rel(es(), es(sharding="auto"))

  # Data parallelism: a batch split over the devices, params replicated or split.
  mesh = sharding.make_mesh()
  big = {"w1": jax.random.normal(k[0], (8, 64)), "w2": jax.random.normal(k[1], (64, 2)),
         "b": jnp.zeros(2)}
  batch = {"x": jax.random.normal(k[2], (32, 8)), "y": jax.random.normal(k[3], (32, 2))}
  grad = jax.jit(jax.grad(loss_fn))
  ref = grad(big, batch)
  sb = sharding.shard_batch(batch, mesh)
  out["batch_devices"] = spread(sb)
  out["data_parallel"] = rel(ref, grad(sharding.shard_params(big, mesh), sb))
  split = sharding.shard_params(big, mesh, min_size=128)
  out["param_specs"] = [str(split[n].sharding.spec) for n in ("w1", "w2", "b")]
  out["param_parallel"] = rel(ref, grad(split, sb))

  # Chunked and sharded population_map equals vmap.
  f = lambda th, x: (jnp.tanh(x @ th).sum(), x * th[0, 0])
  th, xs = jnp.ones((3, 2)), jnp.arange(48.0).reshape(16, 3) / 40
  want = jax.vmap(f, (None, 0))(th, xs)
  got = jax.jit(sharding.population_map(f, (None, 0), chunk_size=8,
                                        sharding=sharding.resolve("auto")))(th, xs)
  out["chunked_sharded"] = rel(want, got)
  out["chunked_devices"] = spread(got)
  print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def four_devices():
  # Low XLA optimization: compiling, not running, is the cost of these tiny programs.
  flags = ("--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0 "
           "--xla_llvm_disable_expensive_passes=true")
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", METAOPT_XLA_CACHE="")
  done = subprocess.run([sys.executable, "-c", MULTI_DEVICE], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=600)
  line = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
  assert done.returncode == 0 and line, done.stderr[-3000:]
  return json.loads(line[0][len("RESULT "):])


def test_sharded_meta_training_equals_one_device(four_devices):
  assert four_devices["meta_train_moved"] > 0
  assert four_devices["meta_train"] < 1e-5


def test_sharded_maml_meta_step_equals_one_device(four_devices):
  assert four_devices["maml_devices"] == 4
  for name in ("sharded", "chunked"):
    assert four_devices[f"maml_{name}"] < 1e-5, name


def test_sharded_grid_and_es_equal_one_device(four_devices):
  assert four_devices["train_grid"] < 1e-5
  assert four_devices["es"] < 1e-5


def test_data_and_parameter_parallel_gradients_equal_one_device(four_devices):
  assert four_devices["batch_devices"] == 4
  assert four_devices["data_parallel"] < 1e-5
  # w1 (8x64) and w2 (64x2) split on their 64 axis, the small bias replicated.
  assert four_devices["param_specs"] == ["P(None, 'batch')", "P('batch', None)", "P()"]
  assert four_devices["param_parallel"] < 1e-5


def test_a_population_that_does_not_divide_is_refused(four_devices):
  assert four_devices["indivisible"] == (
      "population=6 is not divisible by the 4 devices of mesh axis 'batch'; use a "
      "population that is a multiple of 4")


def test_chunked_and_sharded_map_equals_vmap(four_devices):
  assert four_devices["chunked_devices"] == 4
  assert four_devices["chunked_sharded"] < 1e-6


# --- one device ----------------------------------------------------------------------


def test_chunked_vmap_equals_vmap():
  f = lambda th, x, y: {"a": jnp.sin(x @ th) + y, "b": (x ** 2).sum()}
  th = jnp.linspace(-1, 1, 6).reshape(3, 2)
  xs, ys = jnp.arange(36.0).reshape(12, 3) / 20, jnp.arange(24.0).reshape(12, 2)
  want = jax.vmap(f, (None, 0, 0))(th, xs, ys)
  for chunk in (3, 20):
    got = jax.jit(sharding.population_map(f, (None, 0, 0), chunk_size=chunk))(th, xs, ys)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
  assert sharding.population_map(f, (None, 0, 0)) is not None
  with pytest.raises(ValueError, match="chunk_size=5 does not divide the population of 12"):
    sharding.population_map(f, (None, 0, 0), chunk_size=5)(th, xs, ys)
  with pytest.raises(ValueError, match="chunk_size must be an integer >= 1, got 0"):
    sharding.population_map(f, chunk_size=0)


@pytest.mark.parametrize("value, match", [
    ("everywhere", "sharding must be None, 'auto', a jax.sharding.Mesh or a NamedSharding, "
                   "got 'everywhere'"),
    (4, "got int 4"),
    (NamedSharding(sharding.make_mesh(), PartitionSpec(None)), "does not split the leading"),
])
def test_bad_sharding_values_are_named(value, match):
  with pytest.raises(ValueError, match=match):
    sharding.resolve(value, 4)


def test_a_mesh_axis_that_does_not_exist_is_named():
  mesh = sharding.make_mesh(axis_name="tasks")
  with pytest.raises(ValueError, match="nope"):
    sharding.resolve(NamedSharding(mesh, PartitionSpec("nope")))
  assert sharding.resolve(mesh, 4).spec == PartitionSpec("tasks")
  assert sharding.resolve("auto", 3) is None  # one device: nothing to split
  assert sharding.resolve(None, 3) is None


def test_initialize_is_a_no_op_on_one_host(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  assert sharding.initialize({}) == sharding.Processes(1, 0, None, "single")
  one = {"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}
  assert sharding.initialize(one).count == 1
  assert calls == []


def test_initialize_reads_the_environment(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  env = {"JAX_COORDINATOR_ADDRESS": "node0:1234", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "2", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_PROCID": "5"}
  assert sharding.initialize(env) == sharding.Processes(4, 2, "node0:1234", "env")
  slurm = {k: v for k, v in env.items() if k.startswith("SLURM")}
  assert sharding.initialize(slurm) == sharding.Processes(8, 5, None, "slurm")
  assert calls == [dict(coordinator_address="node0:1234", num_processes=4, process_id=2),
                   dict(coordinator_address=None, num_processes=8, process_id=5)]
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES must be an integer >= 1, got 'two'"):
    sharding.initialize({**env, "JAX_NUM_PROCESSES": "two"})
  with pytest.raises(ValueError, match="process id 4 is not below the process count 4"):
    sharding.initialize({**env, "JAX_PROCESS_ID": "4"})
  with pytest.raises(ValueError, match="host:port, got 'node0'"):
    sharding.initialize({**env, "JAX_COORDINATOR_ADDRESS": "node0"})
