"""`metaopt run adaptive-lr`: adaptive LR methods against fixed schedules, with early stopping.

Methods on every dataset (an MLP by default; ``model`` picks another family) and on
every ``workload`` (a dataset with its own model and budget: by default a small ResNet,
a BERT-style encoder and a CTC speech recognizer on the offline stand-ins), on the
base optimizer (``optimizer``: Adam by default, AdamW or SGD with momentum) at
``learning_rate`` (1e-3): a constant LR (that one, and tuned on validation accuracy over
a small grid), step decay, cosine, reduce-on-plateau, hypergradient SGD and Adam, the
learned controller shipped with metaopt (on Adam or AdamW) and optax.contrib's
self-tuning optimizers. The validation split is evaluated
once per epoch and fed to the optimizer; every method stops early after
``patience`` epochs without a 1% relative improvement of the validation loss
(``plateau_lr``'s own signal for plateau, ``early_stopping`` chained after the
others). Final numbers are the test split at the step training stopped (no
restore of the best weights), as mean and std over seeds.
"""

from __future__ import annotations

import dataclasses
import time
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt import config as config_lib
from metaopt import report
from metaopt.experiments.lr_schedule import SELF_TUNING_LABELS, pretrained_optimizer
from metaopt.experiments.protocol import (TTT_COLUMNS, Result, best_index, curve_rows, finish,
                                          lr_curve, lr_stability, plot_method_curves,
                                          seed_keys, time_to_target, train_and_record)
from metaopt.schedules import learned_lr
from metaopt.schedules.baselines import SELF_TUNING, BaseOptimizer, scheduled, self_tuning
from metaopt.schedules.hypergradient import hypergradient_adam, hypergradient_sgd
from metaopt.schedules.plateau import early_stopping, plateau_lr
from metaopt.tasks import DATASETS, TaskConfig, make_task
from metaopt.tasks.data import dataset_names
from metaopt.tasks.models import VMAPPED, model_kinds
from metaopt.tasks.tfds_data import using_data_dir
from metaopt.train import steps_per_epoch
from metaopt.validation import check_choice, check_int, check_number, check_positive, check_seed


ADAPTIVE = ("plateau", "hd_sgd", "hd_adam")


class Workload(NamedTuple):
  """A dataset with a model, size and epoch budget of its own, trained after the
  ``datasets`` (which share the config's ``model``, ``width``, ``depth``, ``batch_size``
  and ``epochs``)."""

  dataset: str
  model: str
  width: int
  depth: int
  batch_size: int
  epochs: int

  @property
  def name(self) -> str:
    """The report's task name, e.g. "mnist5k_28-resnet18-4x2"."""
    return f"{self.dataset}-{self.model}-{self.width}x{self.depth}"


# The offline stand-ins of the plans' workloads (every method, early stopping included,
# runs on them as on the datasets): convolutions with BatchNorm (a ResNet-18's first two
# stages on MNIST-5k at 28x28), attention (a BERT-style encoder on the generated sentiment
# task) and a CTC loss (the speech recognizer on spoken words; accuracy is max(0, 1 - WER)).
# A few epochs each, so the comparison takes minutes per workload on 2 CPU cores.
STANDINS = (
    Workload("mnist5k_28", "resnet18", 4, 2, 32, 3),
    Workload("sentiment_synth", "bert", 32, 2, 32, 5),
    Workload("spoken_words", "speech_ctc", 64, 1, 16, 5),
)


@dataclasses.dataclass(frozen=True)
class Config:
  datasets: tuple[str, ...] = DATASETS
  model: str = "mlp"
  width: int = 64
  depth: int = 2
  batch_size: int = 32
  epochs: int = 50
  seeds: int = 3
  learning_rate: float = 1e-3
  optimizer: BaseOptimizer = BaseOptimizer()  # what every scheduled method's LR scales
  dropout: float = 0.0            # dropout rate in training, for every method
  patience: int = 10              # evaluations (epochs) without improvement before stopping
  rtol: float = 0.01              # relative improvement that resets the patience count
  hd_sgd_lr: float = 0.01         # initial LR of hypergradient SGD
  adaptive: tuple[str, ...] = ADAPTIVE  # the adaptive methods to run (each is a program)
  tune_lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)  # constant-Adam grid (must hold learning_rate)
  start_factors: tuple[float, ...] = (10.0, 0.1)    # Adam-HD starts, relative to the tuned LR
  threshold: float = 1.1          # val-loss target: this times the best final val loss on the task
  include_pretrained: bool = True
  self_tuning: tuple[str, ...] = tuple(SELF_TUNING)  # optax.contrib baselines, at defaults
  workloads: tuple[Workload, ...] = STANDINS  # more tasks, each with its own model
  seed: int = 0
  data_dir: Optional[str] = None  # prepared tfds data (default: $TFDS_DATA_DIR)
  store: Optional[str] = None     # run store (SQLite file) recording every training run

  def __post_init__(self):
    if not self.datasets and not self.workloads:
      raise ValueError("datasets and workloads are both empty: name at least one dataset")
    for name in self.datasets:
      check_choice("dataset", name, dataset_names())
    check_choice("model", self.model, model_kinds())
    for w in self.workloads:
      check_choice("workload dataset", w.dataset, dataset_names())
      check_choice("workload model", w.model, model_kinds())
      for name in ("width", "depth", "batch_size", "epochs"):
        check_int(f"workload {name}", getattr(w, name))
    names = list(self.datasets) + [w.name for w in self.workloads]
    if len(set(names)) < len(names):
      repeated = next(n for n in names if names.count(n) > 1)
      raise ValueError(f"task {repeated!r} appears twice in datasets and workloads")
    check_number("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
    for name in ("width", "depth", "batch_size", "epochs", "seeds", "patience"):
      check_int(name, getattr(self, name))
    check_seed("seed", self.seed)
    for name in self.adaptive:
      check_choice("adaptive method", name, ADAPTIVE)
    for name in ("learning_rate", "hd_sgd_lr", "threshold"):
      check_positive(name, getattr(self, name))
    check_number("rtol", self.rtol, low=0.0, high=1.0)
    for lr in self.tune_lrs + self.start_factors:
      check_positive("tune_lrs and start_factors", lr)
    for name in self.self_tuning:
      check_choice("self-tuning optimizer", name, SELF_TUNING)
    if self.learning_rate not in self.tune_lrs:
      raise ValueError(f"tune_lrs={self.tune_lrs!r} must hold learning_rate={self.learning_rate!r}")


# Fields a rerun with --name may change: the run continues from its checkpoint.
RUN_LENGTH = ()


def default_config(seed: int = 0) -> Config:
  return Config(seed=seed)


def tasks(config: Config) -> dict[str, Workload]:
  """Every task of a run by report name: the ``datasets`` (named by dataset) with the
  config's model and budget, then the ``workloads``."""
  shared = {d: Workload(d, config.model, config.width, config.depth, config.batch_size,
                        config.epochs) for d in config.datasets}
  return shared | {w.name: w for w in config.workloads}


def quick_config(seed: int = 0) -> Config:
  return Config(datasets=("iris", "wine"), epochs=3, seeds=1, tune_lrs=(1e-3, 3e-3), seed=seed,
                workloads=(),
                self_tuning=("schedule_free_adamw", "prodigy"))  # two of five: stays quick


METHODS = ("adam_1e-3", "tuned_constant", "step", "cosine", "tuned_cosine", "plateau",
           "hd_sgd", "hd_adam", "pretrained", *SELF_TUNING)
LABELS = {"adam_1e-3": "Adam 1e-3", "tuned_constant": "tuned constant Adam",
          "step": "step decay", "cosine": "cosine", "plateau": "reduce on plateau",
          "hd_sgd": "hypergradient SGD", "hd_adam": "hypergradient Adam",
          "pretrained": "learned (shipped)", "tuned_cosine": "tuned cosine",
          **SELF_TUNING_LABELS}


def without_extra_args(tx, *names: str) -> optax.GradientTransformationExtraArgs:
  """``tx`` with the extra args ``names`` hidden from its ``update``."""
  tx = optax.with_extra_args_support(tx)

  def update_fn(updates, state, params=None, **extra_args):
    kept = {k: v for k, v in extra_args.items() if k not in names}
    return tx.update(updates, state, params, **kept)

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)


SCHEDULE_NAMES = ("constant", "step", "cosine")


def scheduled_base(config: Config, steps: int):
  """``make_tx({"lr", "schedule"})``: the base optimizer with a traced peak LR and schedule
  index, so the constant-LR grid, step decay and cosine share one compiled program."""
  make = scheduled(SCHEDULE_NAMES, steps, config.optimizer)
  return lambda h: optax.chain(make(h), early_stopping(config.patience, rtol=config.rtol))


def method_labels(config: Config) -> dict:
  """Report names; "adam_1e-3" is the base optimizer at ``learning_rate`` (Adam 1e-3 by
  default)."""
  base = config.optimizer.label
  lr = config.learning_rate
  text = f"{lr:.0e}".replace("e-0", "e-") if lr < 0.01 else f"{lr:g}"  # 1e-3, 0.01
  return dict(LABELS, **{"adam_1e-3": f"{base} {text}",
                         "tuned_constant": f"tuned constant {base}"})


def method_txs(config: Config, steps: int) -> dict:
  """``make_tx(_)`` of the methods that get a program each (the LR is fixed)."""
  stop = lambda: early_stopping(config.patience, rtol=config.rtol)
  lr = config.learning_rate
  txs = {
      "plateau": lambda _: optax.chain(
          config.optimizer.direction(),
          plateau_lr(lr, factor=0.1, rtol=config.rtol, min_lr=1e-6,
                     early_stopping_patience=config.patience)),
      "hd_sgd": lambda _: optax.chain(hypergradient_sgd(config.hd_sgd_lr), stop()),
  }
  txs = {name: tx for name, tx in txs.items() if name in config.adaptive}
  if config.include_pretrained and learned_lr.PRETRAINED_WEIGHTS.exists():
    # The controller was meta-trained without validation losses: hide them from it.
    txs["pretrained"] = lambda _: optax.chain(
        pretrained_optimizer(config.optimizer).direction(),
        without_extra_args(learned_lr.pretrained_lr(learning_rate=lr, total_steps=steps), "val_loss"),
        stop())
  for name in config.self_tuning:  # one run each, no tuning; they stop early like the others
    txs[name] = lambda _, n=name: optax.chain(self_tuning(n, steps), stop())
  return txs


def evaluate_task(config: Config, workload: Workload, store=None) -> dict:
  """Trains every method on one workload; returns curves, timings and the quality-target runs.

  ``store``: a RunStore or path that records every training run (None: not recorded).
  """
  probe = make_task(TaskConfig(workload.dataset, workload.model, workload.width,
                               workload.depth, workload.batch_size, 1, config.seed))
  every = steps_per_epoch(probe)
  steps = every * workload.epochs
  task = make_task(probe.config._replace(total_steps=steps))
  seeds = seed_keys(config.seeds, config.seed)
  stop = lambda: early_stopping(config.patience, rtol=config.rtol)
  dropout = (lambda _: config.dropout) if config.dropout else None
  out = {"steps": steps, "steps_per_epoch": every, "methods": {}}
  methods = out["methods"]

  def train(make_tx, hparams, keys, method: str):
    return train_and_record(task, make_tx, hparams, keys, store=store, steps=steps,
                            eval_every=every, feed_val_loss=True,
                            vectorize=workload.model in VMAPPED, dropout=dropout,
                            run_info={"experiment": "adaptive-lr", "method": method})

  def grid(make_tx, hparams: dict, groups: int, method: str):
    """One vmapped call over ``groups`` x seeds rows; curves reshaped to [groups, seeds, ...]."""
    res, wall = train(make_tx, hparams, jnp.tile(seeds, (groups, 1)), method)
    return jax.tree.map(lambda x: x.reshape((groups, config.seeds) + x.shape[1:]), res), wall

  # Constant over the tuning grid, step decay, and cosine over the tuning grid (the
  # time-to-target reference, best on validation): one program.
  n = len(config.tune_lrs)
  lrs = list(config.tune_lrs) + [config.learning_rate] + list(config.tune_lrs)
  ids = [0] * n + [1] + [2] * n
  rep = lambda v, dtype: jnp.asarray(np.repeat(np.asarray(v, dtype), config.seeds))
  res, wall = grid(scheduled_base(config, steps),
                   {"lr": rep(lrs, np.float32), "schedule": rep(ids, np.int32)}, 2 * n + 1,
                   "schedules")
  per_run = wall / (2 * n + 1)  # every row costs the same
  pick = lambda j: jax.tree.map(lambda x: x[j], res)
  final = lambda rows: (res.val_accuracy[rows, :, -1].mean(axis=1),
                        res.val_loss[rows, :, -1].mean(axis=1))
  best = best_index(*final(slice(0, n)))
  tuned_lr = float(config.tune_lrs[best])
  at_lr = list(config.tune_lrs).index(config.learning_rate)
  methods["adam_1e-3"] = dict(curves=pick(at_lr), wall_time=per_run, runs=config.seeds,
                              lr=config.learning_rate)
  methods["tuned_constant"] = dict(curves=pick(best), wall_time=per_run, runs=config.seeds,
                                   lr=tuned_lr, grid=n)
  methods["step"] = dict(curves=pick(n), wall_time=per_run, runs=config.seeds, lr=None)
  methods["cosine"] = dict(curves=pick(n + 1 + at_lr), wall_time=per_run, runs=config.seeds,
                           lr=None)
  out["tuning"] = dict(lrs=list(config.tune_lrs), val_accuracy=final(slice(0, n))[0])
  best = best_index(*final(slice(n + 1, 2 * n + 1)))
  methods["tuned_cosine"] = dict(curves=pick(n + 1 + best), wall_time=n * per_run,
                                 runs=n * config.seeds, lr=float(config.tune_lrs[best]), grid=n)

  out["hd_starts"] = {}
  if "hd_adam" in config.adaptive:
    # Hypergradient Adam from learning_rate, and (the quality target) from 10x and 0.1x the
    # tuned constant LR, default beta: one program.
    starts = [config.learning_rate] + [f * tuned_lr for f in config.start_factors]
    hd = lambda lr0: optax.chain(hypergradient_adam(lr0), stop())
    res, wall = grid(hd, rep(starts, np.float32), len(starts), "hd_adam")
    pick = lambda j: jax.tree.map(lambda x: x[j], res)
    methods["hd_adam"] = dict(curves=pick(0), wall_time=wall / len(starts), runs=config.seeds,
                              lr=config.learning_rate)
    out["hd_starts"] = {f"{f:g}x": dict(curves=pick(j + 1), initial_lr=f * tuned_lr)
                        for j, f in enumerate(config.start_factors)}

  for name, make_tx in method_txs(config, steps).items():
    res, wall = train(make_tx, jnp.zeros(config.seeds), seeds, name)
    methods[name] = dict(curves=res, wall_time=wall, runs=config.seeds, lr=None)
  return out


def _epochs_to(curves, target: float) -> tuple[Optional[float], int]:
  """Mean first epoch with val loss <= target over the seeds that reach it, and how many do."""
  hits = [np.nonzero(loss <= target)[0] for loss in curves.val_loss]
  hits = [h[0] for h in hits if len(h)]  # eval index = epoch (evaluated once per epoch)
  return (float(np.mean(hits)) if hits else None), len(hits)


def table_rows(results: dict, labels: dict = LABELS) -> list[dict]:
  rows = []
  for dataset, r in results.items():
    methods = r["methods"]
    target = min(float(m["curves"].val_loss[:, -1].mean()) for m in methods.values())
    target *= r["threshold"]
    base = methods["adam_1e-3"]
    base_step = base["wall_time"] / (base["runs"] * r["steps"])
    for m in METHODS:
      if m not in methods:
        continue
      c = methods[m]["curves"]
      epochs, reached = _epochs_to(c, target)
      per_step = methods[m]["wall_time"] / (methods[m]["runs"] * r["steps"])
      var, tv = lr_stability(c)
      rows.append({
          "task": dataset, "method": labels[m],
          "test acc": float(c.test_accuracy[:, -1].mean()),
          "acc std": float(c.test_accuracy[:, -1].std()),
          "test loss": float(c.test_loss[:, -1].mean()),
          "loss std": float(c.test_loss[:, -1].std()),
          "epochs to target": epochs, "reached": f"{reached}/{len(c.val_loss)}",
          "stop epoch": float(np.mean(c.stopped_at)) / r["steps_per_epoch"],
          "wall s": methods[m]["wall_time"],
          "us/step": 1e6 * per_step, "step time / Adam": per_step / base_step,
          "LR var": var, "LR TV": tv,
          "final LR": _nan_mean([lr[min(int(s), len(lr)) - 1] for lr, s in
                                 zip(c.learning_rate, c.stopped_at)]),
      })
  return rows


def _nan_mean(values) -> float:
  """Mean of the finite values; NaN (without a warning) when there are none, as for
  optimizers that report no LR."""
  values = np.asarray(values, np.float64)
  return float(values[np.isfinite(values)].mean()) if np.isfinite(values).any() else float("nan")


COLUMNS = ("task", "method", "test acc", "acc std", "test loss", "loss std", "epochs to target",
           "reached", "stop epoch", "wall s", "us/step", "step time / Adam", "LR var", "LR TV",
           "final LR")


def quality_target(results: dict, tolerance: float = 0.02) -> dict:
  """Adam-HD from each start vs the tuned constant LR: final test accuracy, PASS within 2%."""
  out = {}
  for dataset, r in results.items():
    if not r["hd_starts"]:  # hypergradient Adam not among config.adaptive
      continue
    tuned = r["methods"]["tuned_constant"]
    tuned_acc = float(tuned["curves"].test_accuracy[:, -1].mean())
    row = {"tuned_lr": tuned["lr"], "tuned_acc": tuned_acc, "starts": {}}
    for label, s in r["hd_starts"].items():
      acc = float(s["curves"].test_accuracy[:, -1].mean())
      row["starts"][label] = dict(initial_lr=s["initial_lr"], test_acc=acc,
                                  acc_std=float(s["curves"].test_accuracy[:, -1].std()),
                                  final_lr=float(np.nanmean(s["curves"].learning_rate[:, -1])),
                                  passed=bool(acc >= (1 - tolerance) * tuned_acc))
    row["passed"] = all(s["passed"] for s in row["starts"].values())
    out[dataset] = row
  return out


def write_report(out, config: Config, results: dict, timings: dict) -> Result:
  all_labels = method_labels(config)
  rows = table_rows(results, all_labels)
  target = quality_target(results)
  curves = {d: {m: v["curves"] for m, v in r["methods"].items()} for d, r in results.items()}
  labels = {m: all_labels[m] for m in METHODS}
  plot_method_curves(out / "lr.png", curves, labels, lr_curve, ylabel="learning rate",
                     logy=True, ymin=1e-7)
  plot_method_curves(out / "val_loss.png", curves, labels,
                     lambda c: (c.eval_steps[0] / (c.eval_steps[0][1] - c.eval_steps[0][0]),
                                c.val_loss.mean(axis=0)),
                     ylabel="validation loss", xlabel="epoch", logy=True)

  passed = sum(t["passed"] for t in target.values())
  shared = (f"{', '.join(config.datasets)}: {config.model} {config.width}x{config.depth}, "
            f"batch {config.batch_size}, up to {config.epochs} epochs. "
            if config.datasets else "")
  own = ("Workloads with a model and budget of their own: "
         + ", ".join(f"{w.name} (batch {w.batch_size}, up to {w.epochs} epochs)"
                     for w in config.workloads)
         + "; where the loss is CTC (speech), `test acc` is max(0, 1 - word error rate). "
         if config.workloads else "")
  lines = [
      "# Adaptive learning rates vs fixed schedules", "",
      f"{shared}{own}Validation split 0.2 evaluated every epoch and fed to the optimizer, "
      f"{config.seeds} seed(s) per method. Every method stops after {config.patience} epochs "
      f"without a {config.rtol:.0%} relative improvement of the validation loss "
      "(reduce on plateau: its own signal; the others: `early_stopping` chained after). "
      "Test numbers are at the step training stopped (no restore of the best weights), mean and "
      f"std over seeds. Base optimizer {config.optimizer.label} at LR {config.learning_rate:g} "
      "for the fixed schedules and reduce on plateau (the shipped controller: "
      f"{pretrained_optimizer(config.optimizer).label}); hypergradient SGD starts at "
      f"{config.hd_sgd_lr:g}; the tuned constant is best of {list(config.tune_lrs)} on final "
      "validation accuracy.", "",
      report.markdown_table(rows, COLUMNS), "",
      f"`epochs to target`: mean first epoch whose validation loss is at most {config.threshold}x "
      "the best final validation loss among methods on the task, over the seeds that reach it "
      "(`reached`). `stop epoch`: mean epoch at which early stopping froze training (the "
      "epoch budget if never). `wall s`: compiled wall time of one method's runs (all seeds, "
      "vmapped; early-stopped runs still pay for every step under vmap); `us/step` is that per "
      "run and step, `step time / Adam` relative to "
      f"{all_labels['adam_1e-3']}. The constant and cosine grids and step decay "
      "run as one program (grid and schedules vmapped together), and "
      "hypergradient Adam with its quality-target starts as another: their time is the "
      "program's divided by its rows. `LR var`, `LR TV`: variance and total variation "
      "(sum of |LR_t - LR_t-1|) of the applied LR until stopping, mean over seeds.", "",
      "## Quality target: hypergradient Adam from a badly chosen LR", "",
      "Adam-HD with its default beta (1e-7), started from 10x and 0.1x the tuned constant "
      "Adam LR, should end within 2% (relative) of the tuned constant LR's final test "
      + (f"accuracy. Met on {passed}/{len(target)} tasks." if target else
         "accuracy. Not measured: hypergradient Adam is not among this run's `adaptive` "
         "methods."), "",
      "| task | tuned LR | tuned acc | start | initial LR | HD acc | HD std | final LR | "
      "result |", "|---|---|---|---|---|---|---|---|---|"]
  for dataset, t in target.items():
    for label, s in t["starts"].items():
      lines.append(f"| {dataset} | {report.fmt(t['tuned_lr'])} | {report.fmt(t['tuned_acc'])} | "
                   f"{label} | {report.fmt(s['initial_lr'])} | {report.fmt(s['test_acc'])} | "
                   f"{report.fmt(s['acc_std'])} | {report.fmt(s['final_lr'])} | "
                   f"{'PASS' if s['passed'] else 'FAIL'} |")
  lines += ["", f"Wall time: {timings['total']:.0f} s in all (compilation included).", "",
            "![LR over steps](lr.png)", "", "![validation loss](val_loss.png)", ""]
  labels = {m: all_labels[m] for m in METHODS}
  ttt_rows, profile = time_to_target({d: r["methods"] for d, r in results.items()},
                                     "tuned_cosine", labels, out)
  ranked = sorted(profile["score"].items(), key=lambda kv: -kv[1])
  lines += ["## Time to target (AlgoPerf style)", "",
            "Each dataset's target is the final validation accuracy of cosine tuned over "
            f"LR {list(config.tune_lrs)} (mean over seeds). A tuned method is charged its "
            "whole grid (its steps plus a full run for every other LR it tried); every other "
            "method one run. Runs that stop early keep their last evaluation. Profile: the "
            "fraction of datasets a method reaches within tau times the cheapest method's cost; "
            "score: the area under it over log tau in [1, 4], normalized.", "",
            report.markdown_table(ttt_rows, TTT_COLUMNS), "",
            "| method | profile score |", "|---|---|",
            *[f"| {all_labels[m]} | {v:.3f} |" for m, v in ranked], "",
            "![performance profile](profile.png)", ""]
  data = {"config": config_lib.to_dict(config), "rows": rows, "quality_target": target,
          "timings": timings,
          "time_to_target": {"rows": ttt_rows, "score": profile["score"],
                             "costs": profile["costs"]},
          "curves": {d: {m: v["curves"]._asdict() for m, v in r["methods"].items()}
                     | {f"hd_adam_{k}": v["curves"]._asdict() for k, v in r["hd_starts"].items()}
                     for d, r in results.items()}}
  terminal = []
  for dataset, t in target.items():
    starts = ", ".join(f"{k} {v['test_acc']:.4f}" for k, v in t["starts"].items())
    terminal.append(f"{dataset}: Adam-HD test accuracy from {starts}; tuned constant "
                    f"{t['tuned_acc']:.4f}")
  rows = [row for d, r in results.items() for m, v in r["methods"].items()
          for row in curve_rows(d, m, v["curves"])]
  rows += [row for d, r in results.items() for k, v in r["hd_starts"].items()
           for row in curve_rows(d, f"hd_adam_{k}", v["curves"])]
  return finish(out, "\n".join(lines), data, terminal, rows)


def run(config: Config, out, *, progress: bool = True, store=None) -> Result:
  """Trains every method on every dataset; writes report.md, results.json and plots to ``out``.

  ``store``: a RunStore or path recording every training run (default: ``config.store``).
  """
  del progress  # one line per dataset is all the progress there is
  store = config.store if store is None else store
  timings, results = {}, {}
  start = time.perf_counter()
  todo = tasks(config)
  for i, (name, workload) in enumerate(todo.items()):
    print(f"[{i + 1}/{len(todo)}] {name}", flush=True)
    t0 = time.perf_counter()
    with using_data_dir(config.data_dir):
      results[name] = dict(evaluate_task(config, workload, store=store),
                           threshold=config.threshold)
    timings[name] = time.perf_counter() - t0
  timings["total"] = time.perf_counter() - start
  return write_report(out, config, results, timings)
