"""Plain training and evaluation, on the unroll core, shared by baselines and experiments.

One training run is ``steps`` optimizer steps in chunks of ``eval_every``; after
each chunk the whole validation and test splits are evaluated. The optimizer is
built inside the jitted function from ``hparams`` (e.g. a peak LR), so a grid of
hyperparameters or seeds is one ``jax.vmap``, compiled once.

Validation-driven optimizers: with ``feed_val_loss=True`` every step passes the
latest validation loss to ``tx.update`` as ``val_loss`` (and the validation accuracy as
``val_accuracy``), with ``new_eval=True`` on the first step after each evaluation
(``False`` otherwise). When the
optimizer state holds a stop signal (``plateau_lr``, ``early_stopping``), the
loop obeys it: from the step that reads the stopping evaluation on, parameters
and optimizer state are frozen, and ``TrainResult.stopped_at`` records that step.

Dropout: ``dropout=fn`` picks the rate from ``hparams`` (``fn(hparams)``, may be
traced, so a grid of rates is one program); each step draws its masks from
``fold_in(step key, 1)``, so runs stay deterministic.

Runs of different shapes in one program: ``model_args=fn`` gives keyword arguments of
the model's call from ``hparams`` (``{"active_depth": ...}``, see
:func:`metaopt.tasks.models.pad_depth`), and ``init=fn`` each run's initial parameters
from ``hparams`` and its init key (zero-padded from its own shape) instead of ``task.init``.

The host-side driver, :func:`run_loop`, runs any jitted chunk of steps in a
Python loop with a progress bar, metrics as JSON Lines, orbax checkpoints and
exact resume; meta-training (learned LRs, MAML) and pre-training run on it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from tqdm.auto import tqdm

from metaopt import report
from metaopt.checkpoint import Checkpoints
from metaopt.schedules import current_lr, evaluation_params, has_stop_signal, should_stop
from metaopt.sharding import Sharding, is_primary, population_map, resolve, shards
from metaopt.unroll import unroll
from metaopt.validation import check_int

PyTree = Any
MakeTx = Callable[[PyTree], optax.GradientTransformation]
DropoutFn = Callable[[PyTree], jax.Array]
ModelArgsFn = Callable[[PyTree], dict]
InitFn = Callable[[PyTree, jax.Array], PyTree]


class RunState(NamedTuple):
  """The carry of one run of :func:`make_train_fn`."""
  params: PyTree
  opt_state: PyTree
  key: jax.Array  # raw uint32 key; batches are drawn from fold_in(key, step)
  step: jax.Array
  val_loss: Any = None   # latest validation loss (None: not tracked)
  new_eval: Any = None   # bool: val_loss is fresh (the first step after an evaluation)
  stopped: Any = None    # bool: early stopping has frozen the run (None: not tracked)
  stop_step: Any = None  # int32 step at which the run stopped (steps if it never did)
  model_state: Any = None  # a stateful model's state (BatchNorm statistics); None otherwise
  val_accuracy: Any = None  # latest validation accuracy (None: not tracked)


class TrainState(train_state.TrainState):
  """Flax's ``TrainState`` whose ``apply_gradients`` forwards optax extra args.

  ``state.apply_gradients(grads=grads, value=loss)`` passes ``value=loss`` (and any
  other keyword that is not a field of the state, such as ``val_loss=`` or
  ``new_eval=``) to ``tx.update``, which Flax's own ``apply_gradients`` never does:
  metaopt's learned LRs need the loss, the plateau transforms a validation loss.
  Keywords that name fields of the state are replaced, as in Flax.
  """

  def apply_gradients(self, *, grads, **kwargs):
    fields = {f.name for f in dataclasses.fields(self)}
    replaced = {k: v for k, v in kwargs.items() if k in fields}
    extra_args = {k: v for k, v in kwargs.items() if k not in fields}
    owg = train_state.OVERWRITE_WITH_GRADIENT
    grads_with_opt = grads["params"] if owg in grads else grads
    params_with_opt = self.params["params"] if owg in grads else self.params
    updates, opt_state = self.tx.update(grads_with_opt, self.opt_state, params_with_opt,
                                        **extra_args)
    params = optax.apply_updates(params_with_opt, updates)
    if owg in grads:  # as in Flax: these gradients overwrite their parameters
      params = {"params": params, owg: grads[owg]}
    return self.replace(**{"step": self.step + 1, "params": params, "opt_state": opt_state,
                           **replaced})


class TrainResult(NamedTuple):
  """Curves of one run (leading axes added by vmap for grids)."""
  train_loss: jax.Array      # [steps] minibatch loss at every step
  learning_rate: jax.Array   # [steps] LR applied at every step (NaN if unknown)
  eval_steps: jax.Array      # [evals] step count of each evaluation, 0 first
  val_loss: jax.Array        # [evals]
  val_accuracy: jax.Array
  test_loss: jax.Array
  test_accuracy: jax.Array
  stopped_at: jax.Array = None  # [] step at which early stopping froze the run, or steps
  test_metrics: dict = None     # {name: [evals]}: the objective's other test metrics
                                # (classification: macro_f1; ctc: wer)


def steps_per_epoch(task) -> int:
  """Minibatches per pass over the training split: ``ceil(n_train / batch_size)``."""
  return math.ceil(task.data.num_examples("train") / task.config.batch_size)


def training_step(task, tx: optax.GradientTransformation, arrays: dict, *,
                  feed_val_loss: bool = False, dropout: Optional[DropoutFn] = None,
                  model_args: Optional[ModelArgsFn] = None):
  """``step(hparams, state, _) -> (state, metrics)``: one minibatch update.

  With ``feed_val_loss``, ``tx.update`` also gets ``val_loss=state.val_loss``,
  ``val_accuracy=state.val_accuracy`` (when tracked) and ``new_eval=state.new_eval``.
  When ``state.stopped`` is tracked and the optimizer state holds a stop signal, a
  step that finds the signal set (or starts stopped) leaves params and optimizer state
  unchanged (except for the signal itself) and records a NaN loss. With ``dropout``, the loss drops
  activations at rate ``dropout(hparams)``; with ``model_args``, the model is called with
  the keyword arguments ``model_args(hparams)``.
  """
  def step(hparams, state: RunState, _):
    step_key = jax.random.fold_in(state.key, state.step)
    batch = task.sample_batch(arrays, step_key)
    kw = {}
    if dropout is not None:  # hparams are otherwise already inside tx
      kw = dict(dropout_rate=dropout(hparams), key=jax.random.fold_in(step_key, 1))
    if model_args is not None:
      kw["model_kwargs"] = model_args(hparams)
    # BatchNorm statistics (if any) move with the step, as in any Flax training loop.
    (loss, model_state), grads = jax.value_and_grad(task.loss_and_state, has_aux=True)(
        state.params, state.model_state, batch, **kw)
    extra = {}
    if feed_val_loss and state.val_loss is not None:
      extra = dict(val_loss=state.val_loss, new_eval=state.new_eval)
      if state.val_accuracy is not None:  # for controllers that read it (metaopt.meta.rl)
        extra["val_accuracy"] = state.val_accuracy
    updates, opt_state = tx.update(grads, state.opt_state, state.params, value=loss, **extra)
    params = optax.apply_updates(state.params, updates)
    new = state._replace(params=params, opt_state=opt_state, step=state.step + 1,
                         model_state=model_state)
    if state.new_eval is not None:
      new = new._replace(new_eval=jnp.zeros_like(state.new_eval))
    if state.stopped is not None and has_stop_signal(opt_state):
      stop = state.stopped | should_stop(opt_state)
      pick = lambda cond, a, b: jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)
      new = new._replace(
          params=pick(stop, state.params, params),
          model_state=pick(stop, state.model_state, model_state),
          opt_state=pick(state.stopped, state.opt_state, opt_state),
          stopped=stop,
          stop_step=jnp.where(stop & ~state.stopped, state.step, state.stop_step))
      loss = jnp.where(stop, jnp.nan, loss)
    return new, {"loss": loss, "learning_rate": current_lr(new.opt_state)}
  return step


def make_train_fn(task, make_tx: MakeTx, *, steps: int, eval_every: int,
                  feed_val_loss: bool = False, dropout: Optional[DropoutFn] = None,
                  model_args: Optional[ModelArgsFn] = None, init: Optional[InitFn] = None,
                  capacity: Optional[int] = None):
  """``run(hparams, key, arrays) -> TrainResult``, pure and jit/vmap-able.

  ``feed_val_loss``: pass the latest validation loss to the optimizer (see the
  module docstring). Early stopping needs it to ever trigger. ``dropout``: a
  function of ``hparams`` giving the dropout rate (None: no dropout). ``model_args``:
  a function of ``hparams`` giving more keyword arguments of the model's call. ``init``:
  ``init(hparams, init_key)`` gives the initial parameters (default ``task.init(init_key)``).

  ``capacity``: one program for datasets of different sizes (:func:`pad_splits`). Each
  of the ``steps // eval_every`` chunks has ``capacity`` step slots, of which the first
  ``arrays["eval_every"]`` (traced, at most ``capacity``) train and the others skip
  (``lax.cond`` on an unbatched predicate: no work, a NaN loss); evaluations weigh
  their rows by ``arrays["w_val"]``, ``arrays["w_test"]``. :func:`unpad_steps` drops the
  skipped slots from the result.
  """
  if steps < 1 or eval_every < 1 or steps % eval_every:
    raise ValueError(f"need steps >= 1 divisible by eval_every >= 1, got "
                     f"steps={steps}, eval_every={eval_every}")
  n_evals = steps // eval_every
  if capacity is not None:
    check_int("capacity", capacity)

  def run(hparams, key, arrays, initial=None) -> TrainResult:
    tx = make_tx(hparams)
    kw = {} if model_args is None else dict(model_kwargs=model_args(hparams))
    every = eval_every if capacity is None else arrays["eval_every"]

    # Validation and test in one forward pass (one compiled copy of the model's inference).
    x_eval, y_eval, weights = _eval_split(arrays)

    def evaluate(params, model_state=None):
      val, test = task.split_metrics(params, x_eval, y_eval, weights, model_state, **kw)
      extra = {k: v for k, v in test.items() if k not in ("loss", "accuracy")}
      return (val["loss"], val["accuracy"], test["loss"], test["accuracy"], extra)

    init_key, data_key = jax.random.split(key)
    if initial is not None:   # drawn outside the program (initial_variables)
      params, model_state = initial
    else:
      params = task.init(init_key) if init is None else init(hparams, init_key)
      model_state = task.init_state(init_key) if task.stateful else None
    nan = jnp.asarray(jnp.nan, jnp.float32)
    state = RunState(params, tx.init(params), data_key, jnp.zeros((), jnp.int32),
                       val_loss=nan, new_eval=jnp.asarray(False),
                       stopped=jnp.asarray(False),
                       stop_step=jnp.asarray(n_evals * every, jnp.int32),
                       model_state=model_state, val_accuracy=nan)
    step = training_step(task, tx, arrays, feed_val_loss=feed_val_loss, dropout=dropout,
                         model_args=model_args)
    if capacity is not None:
      step = _gated(step, every)

    def train_chunk(state):
      if capacity is None:
        return unroll(step, hparams, state, None, length=eval_every)
      return unroll(step, hparams, state, jnp.arange(capacity))

    def skip_chunk(state):
      metrics = jax.eval_shape(train_chunk, state)[1]
      return state, jax.tree.map(lambda m: jnp.full(m.shape, jnp.nan, m.dtype), metrics)

    def chunk(state, i):
      # Chunk 0 trains no step: it is the initial evaluation, inside the scan so that
      # the evaluation is compiled once. It is the first val_loss, but not a new one: the
      # optimizer counts only the evaluations after each chunk of steps.
      state, metrics = jax.lax.cond(i > 0, train_chunk, skip_chunk, state)
      # Schedule-free optimizers are evaluated at their averaged parameters.
      evals = evaluate(evaluation_params(state.opt_state, state.params), state.model_state)
      state = state._replace(val_loss=evals[0], val_accuracy=evals[1], new_eval=i > 0)
      return state, (metrics, evals)

    final, (metrics, evals) = jax.lax.scan(chunk, state, jnp.arange(n_evals + 1))
    metrics = jax.tree.map(lambda m: m[1:], metrics)
    return TrainResult(
        train_loss=metrics["loss"].reshape(-1),
        learning_rate=metrics["learning_rate"].reshape(-1),
        eval_steps=jnp.arange(n_evals + 1) * every,
        val_loss=evals[0], val_accuracy=evals[1],
        test_loss=evals[2], test_accuracy=evals[3],
        stopped_at=final.stop_step, test_metrics=evals[4])

  return run


def _eval_split(arrays: dict) -> tuple:
  """Validation and test inputs and labels concatenated, with the 0/1 row weights of
  each (padded rows, :func:`pad_splits`, weigh 0)."""
  cat = lambda a, b: jax.tree.map(lambda u, v: jnp.concatenate([u, v]), a, b)
  n_val = len(jax.tree.leaves(arrays["y_val"])[0])
  n_test = len(jax.tree.leaves(arrays["y_test"])[0])
  w_val = arrays.get("w_val", jnp.ones(n_val, jnp.float32))
  w_test = arrays.get("w_test", jnp.ones(n_test, jnp.float32))
  weights = (jnp.concatenate([w_val, jnp.zeros(n_test, jnp.float32)]),
             jnp.concatenate([jnp.zeros(n_val, jnp.float32), w_test]))
  return cat(arrays["x_val"], arrays["x_test"]), cat(arrays["y_val"], arrays["y_test"]), weights


def _gated(step, every):
  """``step`` over slot ``i`` of a chunk: a real step while ``i < every``, else the state
  unchanged and NaN metrics."""
  def gated(hparams, state, i):
    skipped = lambda s: (s, jax.tree.map(lambda m: jnp.full(m.shape, jnp.nan, m.dtype),
                                         jax.eval_shape(step, hparams, s, None)[1]))
    return jax.lax.cond(i < every, lambda s: step(hparams, s, None), skipped, state)
  return gated


def pad_splits(arrays: dict, rows: dict[str, int], features: int, *, eval_every: int) -> dict:
  """``arrays`` (flat float inputs, integer labels) zero-padded to ``rows[split]`` rows and
  ``features`` columns, with what :func:`make_train_fn` (``capacity=``) and
  :meth:`metaopt.tasks.Task.sample_batch` read to ignore the padding: ``n_train``, the
  0/1 row weights ``w_val``, ``w_test``, and ``eval_every``. Datasets padded alike share
  one compiled program."""
  out = {}
  for split in ("train", "val", "test"):
    x, y = np.asarray(arrays[f"x_{split}"]), np.asarray(arrays[f"y_{split}"])
    n, total = x.shape[0], rows[split]
    x = x.reshape(n, -1)
    if total < n or features < x.shape[1]:
      raise ValueError(f"cannot pad {split} of shape {x.shape} to {total} rows x "
                       f"{features} features")
    out[f"x_{split}"] = jnp.asarray(np.pad(x, ((0, total - n), (0, features - x.shape[1]))))
    out[f"y_{split}"] = jnp.asarray(np.pad(y, (0, total - n)))
    if split == "train":
      out["n_train"] = jnp.asarray(n, jnp.int32)
    else:
      out[f"w_{split}"] = jnp.asarray(np.arange(total) < n, jnp.float32)
  out["eval_every"] = jnp.asarray(eval_every, jnp.int32)
  return out


def unpad_steps(result: TrainResult, eval_every: int, capacity: int) -> TrainResult:
  """A result of :func:`make_train_fn` with ``capacity=``, without its skipped slots: the
  per-step curves of ``eval_every`` real steps per chunk, as an unpadded run gives them."""
  def trim(a):
    a = np.asarray(a)
    chunks = a.reshape(*a.shape[:-1], -1, capacity)[..., :eval_every]
    return chunks.reshape(*a.shape[:-1], -1)
  return result._replace(train_loss=trim(result.train_loss),
                         learning_rate=trim(result.learning_rate))


def train_grid(task, make_tx: MakeTx, hparams: PyTree, keys: jax.Array, *,
               steps: int, eval_every: int, vectorize: bool = True,
               feed_val_loss: bool = False, dropout: Optional[DropoutFn] = None,
               sharding: Sharding = None, model_args: Optional[ModelArgsFn] = None,
               init: Optional[InitFn] = None, capacity: Optional[int] = None,
               arrays: Optional[dict] = None, programs: Optional[dict] = None,
               program_key: Any = None) -> tuple[TrainResult, float]:
  """Trains one run per (hparams row, key) pair in one compiled program.

  ``hparams`` leaves and ``keys`` share a leading axis. Runs are vmapped, or
  with ``vectorize=False`` mapped one after another (vmapped convolutions
  become grouped convolutions, which are slow on the CPU). ``feed_val_loss``,
  ``dropout``: see :func:`make_train_fn`. Returns the stacked results (as numpy)
  and the wall time of the compiled call in seconds; ``metaopt.hparams.record_runs``
  writes them into a run store. ``sharding`` splits the runs across devices
  (:mod:`metaopt.sharding`; their number must divide evenly), one run per device at
  a time with ``vectorize=False``. ``model_args``, ``init``, ``capacity``: see
  :func:`make_train_fn`; ``arrays``: the data (default ``task.arrays()``; padded ones for
  ``capacity``, :func:`pad_splits`). ``programs``: a dict that keeps compiled programs
  under ``program_key`` (which must name everything the program's code depends on;
  the argument shapes are added to it), so later calls reuse them.
  """
  arrays = task.arrays() if arrays is None else arrays
  initial = initial_variables(task, keys) if init is None else None
  leaves, tree = jax.tree.flatten((hparams, keys, arrays, initial))
  signature = (program_key, tree, tuple((a.shape, str(a.dtype)) for a in leaves))
  compiled = None if programs is None else programs.get(signature)
  if compiled is None:
    one = make_train_fn(task, make_tx, steps=steps, eval_every=eval_every,
                        feed_val_loss=feed_val_loss, dropout=dropout, model_args=model_args,
                        init=init, capacity=capacity)
    spec = resolve(sharding, len(keys), what="runs")
    if spec is not None:
      run = jax.jit(population_map(one, (0, 0, None, 0), sharding=spec, what="runs",
                                   chunk_size=None if vectorize else shards(spec)))
    elif vectorize:
      run = jax.jit(jax.vmap(one, in_axes=(0, 0, None, 0)))
    else:
      run = jax.jit(lambda h, k, a, i: jax.lax.map(lambda hki: one(hki[0], hki[1], a, hki[2]),
                                                   (h, k, i)))
    compiled = run.lower(hparams, keys, arrays, initial).compile()
    if programs is not None:
      programs[signature] = compiled
  start = time.perf_counter()
  result = jax.block_until_ready(compiled(hparams, keys, arrays, initial))
  return jax.tree.map(np.asarray, result), time.perf_counter() - start


def initial_variables(task, keys: jax.Array) -> tuple:
  """``(params, model_state)`` of one run per key, drawn as :func:`make_train_fn` draws
  them. Compiled once per model and input shape (:meth:`Task.init_variables`) and shared
  by every training program: inlined into each, a tiny ResNet's initialization was 4 of
  the 7 s its program took to compile. One key at a time: vmapped, it compiled twice as
  slowly."""
  def draw(key):
    variables = task.init_variables(jax.random.split(key)[0])
    state = ({k: v for k, v in variables.items() if k != "params"} if task.stateful
             else None)
    return variables["params"], state
  draws = [draw(key) for key in keys]
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *draws)


def run_status(result: TrainResult) -> np.ndarray:
  """Per run: "diverged" if the training loss (before any early stop) or the validation
  loss became non-finite, else "completed"."""
  loss = np.atleast_2d(result.train_loss)
  steps = loss.shape[-1]
  stop = (np.full(len(loss), steps) if result.stopped_at is None
          else np.asarray(result.stopped_at).reshape(-1))
  live = np.arange(steps)[None, :] < stop[:, None]
  bad_train = (~np.isfinite(loss) & live).any(axis=-1)
  bad_val = ~np.isfinite(np.atleast_2d(result.val_loss)).all(axis=-1)
  return np.where(bad_train | bad_val, "diverged", "completed")


# --- the host-side driver ----------------------------------------------------------------

Metrics = Union[dict, list]
Advance = Callable[[PyTree, dict, int, int], tuple[PyTree, dict, Metrics]]
METRICS_FILE = "metrics.jsonl"


class LoopResult(NamedTuple):
  """What :func:`run_loop` ends with."""
  state: PyTree        # the array state after the last step
  record: dict         # the host-side record after the last step
  history: list        # one dict per step, {"step": t, **metrics}, resumed steps included
  start: int           # the step this call started from (> 0 after a resume)
  seconds: float       # wall time of every call that contributed, resumes included

  def curves(self) -> dict[str, np.ndarray]:
    """The numeric per-step metrics of ``history`` as arrays."""
    keys = [k for k in (self.history[0] if self.history else {}) if k != "step"]
    out = {}
    for k in keys:
      values = [h.get(k) for h in self.history]
      if all(isinstance(v, (int, float)) or v is None for v in values):
        out[k] = np.asarray([np.nan if v is None else v for v in values], np.float64)
    return out


def _per_step(metrics: Metrics, n: int) -> list[dict]:
  """A chunk's metrics as ``n`` JSON-able dicts (from a dict of [n, ...] arrays or a list)."""
  if isinstance(metrics, list):
    rows = metrics
  else:
    arrays = {k: np.asarray(v) for k, v in metrics.items()}
    rows = [{k: v[i] for k, v in arrays.items()} for i in range(n)]
  plain = lambda v: v.item() if isinstance(v, np.ndarray) and v.ndim == 0 else (
      v.tolist() if isinstance(v, np.ndarray) else v.item() if isinstance(v, np.generic) else v)
  return [{k: plain(v) for k, v in row.items()} for row in rows]


def _default_postfix(row: dict) -> dict:
  return {k: f"{v:.4g}" for k, v in row.items()
          if k != "step" and isinstance(v, float) and math.isfinite(v)}


def run_loop(advance: Advance, state: PyTree, *, steps: int, chunk: int = 1,
             start: int = 0, record: Optional[dict] = None, directory=None,
             checkpoint_every: Optional[int] = None, keep: int = 2,
             target: Optional[Callable[[dict], PyTree]] = None, progress: bool = False,
             desc: str = "training", postfix: Optional[Callable[[dict], dict]] = None,
             stop_after: Optional[int] = None) -> LoopResult:
  """Runs ``advance`` from step 0 (or the last checkpoint) to ``steps``.

  Args:
    advance: ``advance(state, record, start, n) -> (state, record, metrics)`` runs
      steps ``start .. start + n - 1``; typically a jitted :func:`metaopt.unroll`
      of ``n`` steps. ``metrics`` is a dict of arrays with leading axis ``n`` or a
      list of ``n`` dicts. Anything random must derive from the global step, so
      that chunks of any length give the same numbers.
    state: the array pytree at step ``start`` (what orbax checkpoints).
    steps: total number of steps.
    chunk: steps per call of ``advance``.
    start: the step ``state`` is at (a state carried over from an earlier call).
    record: JSON-able host-side state at step 0 (saved beside ``state``).
    directory: where ``metrics.jsonl`` (one line per step) and ``checkpoints/`` go.
      A directory with checkpoints resumes from the latest, and its metrics file is
      cut back to the restored step. ``None``: nothing is written.
    checkpoint_every: steps between checkpoints (default: ``chunk``); the last step
      is always saved. Chunks are cut so that checkpoints fall between them.
    keep: checkpoints kept.
    target: ``target(record) -> pytree`` shaped like the state saved with ``record``
      (default: ``state``), for states whose shapes depend on the record.
    progress: show a progress bar; ``postfix(row)`` picks what it shows of the
      latest step (default: every finite float metric).
    stop_after: end at this step as a kill would (no extra checkpoint); for tests.
  """
  steps = check_int("steps", steps)
  chunk = check_int("chunk", chunk)
  every = check_int("checkpoint_every", chunk if checkpoint_every is None else checkpoint_every)
  record = dict(record or {})
  start, seconds, history = check_int("start", start, low=0), 0.0, []
  checkpoints = metrics_file = None
  if directory is not None:
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metrics_file = directory / METRICS_FILE
    checkpoints = Checkpoints(directory / "checkpoints", every=every, keep=keep)
    initial = state
    restored = checkpoints.restore(lambda saved: initial if target is None
                                   else target(saved["record"]), validate=_check_progress)
    if restored is not None:
      start, state, saved = restored
      record, seconds = saved["record"], saved["seconds"]
      if start > steps:
        checkpoints.close()
        raise ValueError(f"the checkpoint in {directory} is at step {start}, beyond "
                         f"steps={steps}; ask for at least {start} steps or use a new folder")
      print(f"metaopt: resumed {desc} at step {start} from {directory}", flush=True)
    # Keep the lines of the steps the state has seen, and only those.
    history = [h for h in read_metrics(metrics_file) if h["step"] < start]
    if is_primary():  # in a multi-host run every process holds the same rows
      metrics_file.write_text("".join(json.dumps(h) + "\n" for h in history))

  end = steps if stop_after is None else min(steps, check_int("stop_after", stop_after, low=0))
  postfix = postfix or _default_postfix
  began = time.perf_counter()
  bar = tqdm(total=steps, initial=start, disable=not progress, desc=desc, unit="step",
             dynamic_ncols=True)
  step = start
  while step < end:
    n = min(chunk - step % chunk, every - step % every, end - step)
    state, record, metrics = advance(state, record, step, n)
    rows = [{"step": step + i, **m} for i, m in enumerate(_per_step(metrics, n))]
    history += rows
    step += n
    if metrics_file is not None and is_primary():
      with metrics_file.open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    if checkpoints is not None:
      checkpoints.save(step, state, {"record": record,
                                     "seconds": seconds + time.perf_counter() - began},
                       force=step == steps)
    bar.update(n)
    bar.set_postfix(postfix(rows[-1]))
  bar.close()
  if checkpoints is not None:
    checkpoints.close()
  if directory is not None and is_primary():
    write_metrics(directory, history, logged_from=start)
  return LoopResult(state, record, history, start, seconds + time.perf_counter() - began)


def _check_progress(saved: dict) -> None:
  if not isinstance(saved.get("record"), dict) or not isinstance(saved.get("seconds"), (int, float)):
    raise ValueError(f"not a run_loop progress record: keys {sorted(saved)}")


def read_metrics(path) -> list[dict]:
  """The rows of a ``metrics.jsonl``. A torn last line (what a kill or a full disk
  during an append leaves) is dropped with a warning; a bad line before it is an error
  naming the file and the line."""
  path = pathlib.Path(path)
  if not path.exists():
    return []
  lines = path.read_bytes().split(b"\n")
  rows = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      if not isinstance(row, dict) or not isinstance(row.get("step"), int):
        raise ValueError("not a row with an integer step")
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
      if all(not rest.strip() for rest in lines[number:]):
        print(f"metaopt: dropped the torn last line {number} of {path}", file=sys.stderr,
              flush=True)
        break
      raise ValueError(f"{path}, line {number}: {e}; fix or remove that line") from None
    rows.append(row)
  return rows


def write_metrics(directory, history: list, logged_from: int = 0) -> None:
  """``metrics.csv`` (one line per step, every metric a column; lists joined by ``;``)
  and, when tensorboardX is installed, TensorBoard event files under ``tensorboard/`` for
  the steps from ``logged_from`` (earlier calls logged the ones before)."""
  directory = pathlib.Path(directory)
  columns = list(dict.fromkeys(k for h in history for k in h))
  flat = [{k: ";".join(map(str, v)) if isinstance(v, list) else v for k, v in h.items()}
          for h in history]
  report.write_csv(directory / "metrics.csv", flat, columns)
  with report.ScalarLog(directory / "tensorboard") as log:
    for row in history:
      if row["step"] >= logged_from:
        log.add_row({k: v for k, v in row.items() if k != "step"}, row["step"])


def scan_advance(step_fn: Callable[[PyTree, PyTree], tuple[PyTree, dict]],
                 sample: Callable[[jax.Array], PyTree], key: jax.Array) -> Advance:
  """An ``advance`` for :func:`run_loop` that scans ``state, metrics = step_fn(state,
  sample(fold_in(key, t)))`` over steps ``t`` in one jitted :func:`metaopt.unroll` per
  chunk (compiled once per chunk length). The record passes through unchanged."""
  def body(_, carry, __):
    state, t = carry
    state, metrics = step_fn(state, sample(jax.random.fold_in(key, t)))
    return (state, t + 1), metrics

  run_chunk = jax.jit(lambda state, t, n: unroll(body, None, (state, t), None, length=n),
                      static_argnums=2)

  def advance(state, record, start, n):
    (state, _), metrics = run_chunk(state, jnp.int32(start), n)
    return state, record, metrics
  return advance


def enable_compilation_cache(directory: Optional[str] = None) -> Optional[str]:
  """Reuse XLA compilations across processes (meta-training compiles one program per task
  shape). ``directory`` defaults to ``$METAOPT_XLA_CACHE`` or ``~/.cache/metaopt/xla``; an
  empty ``METAOPT_XLA_CACHE`` turns the cache off. Returns the directory used, if any."""
  if directory is None:
    directory = os.environ.get("METAOPT_XLA_CACHE",
                               str(pathlib.Path.home() / ".cache" / "metaopt" / "xla"))
  if directory:
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return directory or None
