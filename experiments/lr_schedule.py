"""`metaopt run lr-schedule`: meta-train an LR controller, then compare it on held-out tasks.

Methods on every held-out task (datasets and widths the controller never saw):
Adam at a constant 1e-3 (when the base optimizer is Adam); best-of-grid constant, step,
and cosine (with and without warmup) schedules of the base optimizer (``meta.optimizer``:
Adam by default, AdamW or SGD with momentum); the controller meta-trained by this run on
that optimizer; the controller shipped with metaopt (on Adam); and optax.contrib's
self-tuning optimizers. Grids are tuned on the final validation
accuracy (ties: validation loss); everything is reported on the test split,
averaged over seeds.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from metaopt import config as config_lib
from metaopt import report
from metaopt.experiments.protocol import (TTT_COLUMNS, Result, best_index, curve_rows, finish,
                                          lr_curve, plot_method_curves, seed_keys,
                                          time_to_target, train_and_record)
from metaopt.meta.lr import MetaLRConfig, config_of_saved, learned_lr_tx, meta_train
from metaopt.schedules import learned_lr
from metaopt.schedules.baselines import (DEFAULT_LRS, SELF_TUNING, BaseOptimizer, scheduled,
                                         self_tuning)
from metaopt.tasks import TaskConfig, check_task_config, make_task, task_family
from metaopt.tasks.models import VMAPPED
from metaopt.tasks.tfds_data import using_data_dir
from metaopt.validation import check_choice, check_int, check_positive

TRAIN_FAMILY = task_family(
    datasets=("digits", "mnist1d", "synthetic"),
    widths=(32, 128), depths=(1, 2), batch_sizes=(16, 32, 64, 128),
    total_steps=(200, 500, 1000, 2000))

# Held out: datasets (mnist5k, breast_cancer), widths and depths never seen in meta-training,
# and a run longer than any in it.
MLP_HELDOUT = (
    TaskConfig("mnist5k", "mlp", 192, 2, 32, 1500, 0),
    TaskConfig("breast_cancer", "mlp", 48, 2, 32, 500, 0),
    TaskConfig("mnist5k", "mlp", 96, 1, 32, 4000, 0),
    TaskConfig("mnist1d", "mlp", 96, 3, 32, 3000, 0),
)
# Held out too: model families meta-training never saw, on the offline stand-ins of the
# plans' workloads: convolutions with BatchNorm (a ResNet-18's first two stages on MNIST-5k
# at 28x28), attention (a BERT-style encoder on the generated sentiment task) and a CTC
# loss (the speech recognizer on spoken words; accuracy is max(0, 1 - WER)). Sized so each
# trains its whole comparison in minutes on 2 CPU cores.
STANDIN_HELDOUT = (
    TaskConfig("mnist5k_28", "resnet18", 4, 2, 32, 300, 0),
    TaskConfig("sentiment_synth", "bert", 32, 2, 32, 600, 0),
    TaskConfig("spoken_words", "speech_ctc", 64, 1, 16, 500, 0),
)
HELDOUT = MLP_HELDOUT + STANDIN_HELDOUT


@dataclasses.dataclass(frozen=True)
class Config:
  meta: MetaLRConfig
  heldout: tuple[TaskConfig, ...] = HELDOUT
  seeds: int = 3                  # evaluation seeds per held-out task
  lrs: tuple[float, ...] = DEFAULT_LRS  # tuning grid of every hand schedule
  evals: int = 20                 # evaluations per training run
  include_pretrained: bool = True
  self_tuning: tuple[str, ...] = tuple(SELF_TUNING)  # optax.contrib baselines, at defaults
  save_controller: Optional[str] = None  # also write the meta-trained controller here
  data_dir: Optional[str] = None     # prepared tfds data (default: $TFDS_DATA_DIR)
  store: Optional[str] = None     # run store (SQLite file) recording every evaluation run

  def __post_init__(self):
    check_evaluation(self)


def check_evaluation(config) -> None:
  """Checks the evaluation fields an experiment on the held-out tasks shares with this one:
  seeds, evals, lrs, self_tuning, heldout."""
  for name in ("seeds", "evals"):
    check_int(name, getattr(config, name))
  if not config.lrs:
    raise ValueError("lrs must hold at least one learning rate")
  for lr in config.lrs:
    check_positive("lrs", lr)
  for name in config.self_tuning:
    check_choice("self-tuning optimizer", name, SELF_TUNING)
  if not config.heldout:
    raise ValueError("heldout must hold at least one task")
  for task in config.heldout:
    check_task_config(task)
    if task.total_steps % config.evals:
      raise ValueError(f"held-out task {task.name}: total_steps={task.total_steps} is not a "
                       f"multiple of evals={config.evals}")


# Fields a rerun with --name may change: the run continues from its checkpoint.
RUN_LENGTH = ("meta.meta_steps",)


# The shipped controller reads every feature but the update norm's: on validation tasks
# it did as well without them (benchmarks/bench_controller_features.py), and computing the
# norm costs 20-35% of a small model's training step on the CPU.
FEATURES = tuple(f for f in learned_lr.FEATURE_NAMES if f not in learned_lr.NORM_FEATURES)


def default_config(seed: int = 0) -> Config:
  return Config(meta=MetaLRConfig(family=TRAIN_FAMILY, meta_steps=400, seed=seed,
                                  features=FEATURES))


def quick_config(seed: int = 0) -> Config:
  family = task_family(datasets=("digits",), widths=(32,), depths=(1,), batch_sizes=(32,),
                       total_steps=(200,))
  return Config(
      meta=MetaLRConfig(family=family, meta_steps=24, lanes=1, population=2,
                        segment_length=25, checkpoint_every=8, seed=seed),
      heldout=(TaskConfig("wine", "mlp", 48, 1, 32, 300, 0),),
      seeds=1, lrs=(3e-4, 1e-3, 3e-3), evals=10,
      self_tuning=("schedule_free_adamw", "prodigy"))  # two of five: a quick run stays quick


HAND = ("constant", "step", "cosine", "warmup_cosine")


def pretrained_optimizer(optimizer: BaseOptimizer) -> BaseOptimizer:
  """The base optimizer the shipped controller runs on: the run's when it is Adam or AdamW
  (the directions it was meta-trained on), else plain Adam; never on Prodigy's D (its LRs
  are absolute)."""
  if optimizer.name not in ("adam", "adamw"):
    return BaseOptimizer()
  return dataclasses.replace(optimizer, step_size="constant")


def evaluate_task(config: Config, task_config: TaskConfig, thetas: dict, store=None) -> dict:
  """Trains every method on one held-out task; returns curves and timings per method.

  ``store``: a RunStore or path that records every training run (None: not recorded).
  """
  task = make_task(task_config)
  steps, every = task_config.total_steps, task_config.total_steps // config.evals
  seeds = seed_keys(config.seeds, task_config.seed)
  vectorize = task_config.model in VMAPPED
  out = {}

  def grid(make_tx, hparams, keys, method):
    return train_and_record(task, make_tx, hparams, keys, store=store, steps=steps,
                            eval_every=every, vectorize=vectorize,
                            run_info={"experiment": "lr-schedule", "method": method})

  # Every hand schedule over the LR grid and the seeds: one vmapped call, one program.
  n, k = len(config.lrs), config.seeds
  lrs = np.repeat(np.asarray(config.lrs, np.float32), k)
  hparams = {"lr": jnp.asarray(np.tile(lrs, len(HAND))),
             "schedule": jnp.asarray(np.repeat(np.arange(len(HAND), dtype=np.int32), n * k))}
  res, wall = grid(scheduled(HAND, steps, config.meta.optimizer), hparams,
                   jnp.tile(seeds, (len(HAND) * n, 1)), "hand_schedules")
  res = jax.tree.map(lambda x: x.reshape((len(HAND), n, k) + x.shape[1:]), res)
  per_grid = wall / len(HAND)   # every row costs the same
  for j, name in enumerate(HAND):
    sched = jax.tree.map(lambda x: x[j], res)
    best = best_index(sched.val_accuracy[:, :, -1].mean(axis=1),
                      sched.val_loss[:, :, -1].mean(axis=1))
    out[name] = dict(curves=jax.tree.map(lambda x: x[best], sched), lr=float(config.lrs[best]),
                     wall_time=per_grid, runs=n * k, grid=n)
    if name == "constant" and config.meta.optimizer.name == "adam" and 1e-3 in config.lrs:
      out["adam_1e-3"] = dict(curves=jax.tree.map(lambda x: x[list(config.lrs).index(1e-3)], sched),
                              lr=1e-3, wall_time=per_grid / n, runs=k)

  for name, (controller, theta, meta_cfg) in thetas.items():
    make_tx = lambda _, c=controller, t=theta, m=meta_cfg: learned_lr_tx(c, t, m, steps)
    res, wall = grid(make_tx, jnp.zeros(config.seeds), seeds, name)
    out[name] = dict(curves=res, lr=None, wall_time=wall, runs=config.seeds)
  for name in config.self_tuning:  # one run each, no tuning
    res, wall = grid(lambda _, n=name: self_tuning(n, steps), jnp.zeros(config.seeds), seeds,
                     name)
    out[name] = dict(curves=res, lr=None, wall_time=wall, runs=config.seeds)
  # Tuned cosine = the better of cosine and warmup-cosine on validation.
  variants = ("cosine", "warmup_cosine")
  final = lambda field: np.array([getattr(out[n]["curves"], field)[:, -1].mean()
                                  for n in variants])
  pick = variants[best_index(final("val_accuracy"), final("val_loss"))]
  out["tuned_cosine"] = dict(out[pick], variant=pick,
                             wall_time=out["cosine"]["wall_time"] + out["warmup_cosine"]["wall_time"],
                             runs=out["cosine"]["runs"] + out["warmup_cosine"]["runs"],
                             grid=2 * len(config.lrs))
  return out


def _steps_to_reach(curves, target: float) -> Optional[float]:
  """Mean over seeds of the first evaluated step whose test loss <= target (None if never)."""
  hits = []
  for loss in curves.test_loss:
    idx = np.nonzero(loss <= target)[0]
    if not len(idx):
      return None
    hits.append(curves.eval_steps[0][idx[0]])
  return float(np.mean(hits))


METHOD_ORDER = ("adam_1e-3", "constant", "step", "tuned_cosine", "learned", "pretrained",
                *SELF_TUNING)
SELF_TUNING_LABELS = {"schedule_free_adamw": "schedule-free AdamW", "prodigy": "Prodigy",
                      "prodigy_linear_decay": "Prodigy, linear decay",
                      "dadapt_adamw": "D-Adaptation AdamW", "mechanic": "Mechanic (Adam)",
                      "dog": "DoG"}
LABELS = {"adam_1e-3": "Adam 1e-3", "constant": "tuned constant", "step": "tuned step",
          "tuned_cosine": "tuned cosine", "learned": "learned (this run)",
          "pretrained": "pretrained (shipped)", **SELF_TUNING_LABELS}


COLUMNS = ("task", "method", "test loss", "test acc", "acc spread", "steps to cosine loss",
           "wall s (all runs)", "runs", "LR variance", "chosen LR")


def _extra_columns(method: dict) -> dict:
  """The columns of this experiment's table that the controllers' table does not have."""
  with warnings.catch_warnings():  # no LR at all (DoG, Mechanic): NaN, without a warning
    warnings.simplefilter("ignore", RuntimeWarning)
    variance = float(np.nanvar(method["curves"].learning_rate, axis=1).mean())
  return {"wall s (all runs)": method["wall_time"], "LR variance": variance}


def table_rows(results: dict, order: tuple = METHOD_ORDER, labels: dict = LABELS,
               columns: tuple = COLUMNS, extra: Callable[[dict], dict] = _extra_columns
               ) -> list[dict]:
  """One row per task and method of ``order`` (``results[task][method]``): final test loss
  and accuracy (mean and spread over seeds), steps to the tuned cosine's final test loss,
  runs and chosen LR, and the columns ``extra(results[task][method])`` adds; each row
  holds the ``columns`` (default: this experiment's), in their order."""
  rows = []
  for task_name, methods in results.items():
    target = float(methods["tuned_cosine"]["curves"].test_loss[:, -1].mean())
    for m in order:
      if m not in methods:
        continue
      r = methods[m]
      c = r["curves"]
      row = {
          "task": task_name, "method": labels[m],
          "test loss": float(c.test_loss[:, -1].mean()),
          "loss spread": float(c.test_loss[:, -1].std()),
          "test acc": float(c.test_accuracy[:, -1].mean()),
          "acc spread": float(c.test_accuracy[:, -1].std()),
          "steps to cosine loss": _steps_to_reach(c, target),
          "runs": r["runs"], "chosen LR": r.get("lr"), **extra(r)}
      rows.append({k: row[k] for k in columns})
  return rows


def quality_summary(results: dict) -> dict:
  """Learned/pretrained vs tuned cosine and Adam 1e-3: per-task ratios, mean and worst."""
  summary = {}
  for m in ("learned", "pretrained"):
    ratios, loss_ratios, wins = {}, {}, {}
    for task_name, methods in results.items():
      if m not in methods:
        continue
      acc = lambda k: float(methods[k]["curves"].test_accuracy[:, -1].mean())
      loss = lambda k: float(methods[k]["curves"].test_loss[:, -1].mean())
      ratios[task_name] = acc(m) / max(acc("tuned_cosine"), 1e-12)
      loss_ratios[task_name] = loss(m) / max(loss("tuned_cosine"), 1e-12)
      if "adam_1e-3" in methods:
        wins[task_name] = acc(m) - acc("adam_1e-3")
    if ratios:
      summary[m] = dict(acc_ratio_to_tuned_cosine=ratios,
                        mean_ratio=float(np.mean(list(ratios.values()))),
                        worst_ratio=float(np.min(list(ratios.values()))),
                        worst_task=min(ratios, key=ratios.get),
                        test_loss_ratio_to_tuned_cosine=loss_ratios,
                        acc_gain_over_adam_1e3=wins,
                        mean_acc_gain_over_self_tuning={
                            b: float(np.mean([
                                float(ms[m]["curves"].test_accuracy[:, -1].mean())
                                - float(ms[b]["curves"].test_accuracy[:, -1].mean())
                                for ms in results.values() if b in ms and m in ms]))
                            for b in SELF_TUNING if any(b in ms for ms in results.values())})
  return summary


def write_report(out, config: Config, results: dict, meta_result, timings: dict) -> Result:
  rows = table_rows(results)
  summary = quality_summary(results)
  labels = {m: LABELS[m] for m in METHOD_ORDER}
  plot_method_curves(out / "lr.png", {t: {m: r["curves"] for m, r in ms.items()}
                                      for t, ms in results.items()}, labels, lr_curve,
                     ylabel="learning rate", logy=True, ymin=1e-6)
  plot_method_curves(out / "loss.png", {t: {m: r["curves"] for m, r in ms.items()}
                                        for t, ms in results.items()}, labels,
                     lambda c: (c.eval_steps[0], c.test_loss.mean(axis=0)),
                     ylabel="test loss", logy=True)
  meta_hist = [h for h in meta_result.history if h["meta_loss"] is not None]
  if meta_hist:
    steps = [h["step"] for h in meta_hist]
    losses = [h["meta_loss"] for h in meta_hist]
    window = max(len(losses) // 20, 1)
    report.plot_panels(
        out / "meta_loss.png",
        {"meta-training": {f"moving average ({window} steps)": (
            steps, report.moving_average(losses, window))}},
        faint={"meta-training": {f"moving average ({window} steps)": (steps, losses)}},
        ylabel="mean log val loss", xlabel="meta step")

  lines = ["# Learned LR schedule vs tuned hand schedules", "",
           f"Meta-trained for {config.meta.meta_steps} meta steps on "
           f"{', '.join(config.meta.family.datasets)} MLPs "
           f"(widths {config.meta.family.widths}, depths {config.meta.family.depths}, "
           f"batch sizes {config.meta.family.batch_sizes}, "
           f"lengths {config.meta.family.total_steps}) in {timings['meta_train']:.0f} s; "
           f"{meta_result.skipped_members} inner runs dropped for non-finite meta-gradients.",
           f"Evaluated on held-out tasks with {config.seeds} seed(s) each; hand schedules are "
           f"{config.meta.optimizer.label} (the base optimizer of the learned controller too), "
           f"tuned best-of-grid over LR {list(config.lrs)} on final validation accuracy "
           "(ties: loss). "
           "Numbers are test-split means over seeds at the end of training; where the loss "
           "is CTC (speech), `test acc` is max(0, 1 - word error rate).", "",
           report.markdown_table(rows, COLUMNS), "",
           "`steps to cosine loss`: first evaluated step whose test loss is at or below the "
           "tuned cosine's final test loss (– if never). `wall s` covers every run the method "
           "needed (the whole grid for tuned schedules), compiled, on this machine; Adam 1e-3 "
           "runs inside the constant grid, so its time is that grid's time per LR.", "",
           "## Learned vs tuned cosine (test accuracy ratio)", ""]
  for m, s in summary.items():
    lines.append(f"- {LABELS[m]}: mean {s['mean_ratio']:.4f}, worst {s['worst_ratio']:.4f} "
                 f"({s['worst_task']}); test-loss ratio per task: "
                 + ", ".join(f"{k} {v:.3f}" for k, v in s["test_loss_ratio_to_tuned_cosine"].items())
                 + "; accuracy gain over Adam 1e-3 per task: "
                 + ", ".join(f"{k} {v:+.4f}" for k, v in s["acc_gain_over_adam_1e3"].items())
                 + "; mean accuracy gain over each self-tuning optimizer: "
                 + ", ".join(f"{LABELS[k]} {v:+.4f}"
                             for k, v in s["mean_acc_gain_over_self_tuning"].items()))
  ttt_rows, profile = time_to_target(results, "tuned_cosine", labels, out)
  ranked = sorted(profile["score"].items(), key=lambda kv: -kv[1])
  lines += ["", "## Time to target (AlgoPerf style)", "",
            "Each held-out task's target is the tuned cosine's final validation accuracy (mean "
            "over seeds). `steps to target`: the first evaluated step at which a method's mean "
            "validation accuracy reaches it. A tuned method is charged its whole grid (its "
            "steps plus one full run for every other configuration it tried: the LR grid, "
            "twice for cosine with and without warmup); Adam 1e-3, the learned controllers "
            "and the self-tuning optimizers one run. `time to target s`: that cost at the "
            "method's measured time per step. The performance profile is the fraction of "
            "tasks a method reaches within tau times the cheapest method's cost; its score "
            "is the area under it over log tau in [1, 4], normalized (1: cheapest everywhere).",
            "", report.markdown_table(ttt_rows, TTT_COLUMNS), "",
            "| method | profile score |", "|---|---|"]
  lines += [f"| {LABELS[m]} | {v:.3f} |" for m, v in ranked]
  lines += ["", "![performance profile](profile.png)"]
  lines += ["", "![LR over steps](lr.png)", "", "![test loss](loss.png)", "",
            "![meta-training](meta_loss.png)", "",
           "The meta-loss (faint: every meta step; bold: its moving average) is a sawtooth: "
           "each lane restarts on a new task when its run ends, and a fresh run's early "
           "validation losses are higher than a nearly trained one's.", ""]
  data = {"config": config_lib.to_dict(config), "rows": rows, "summary": summary,
          "time_to_target": {"rows": ttt_rows, "score": profile["score"],
                             "costs": profile["costs"]},
          "timings": timings,
          "curves": {t: {m: r["curves"]._asdict() for m, r in ms.items()}
                     for t, ms in results.items()}}
  terminal = [f"{LABELS[m]}: test accuracy / tuned cosine: mean {s['mean_ratio']:.4f}, "
              f"worst {s['worst_ratio']:.4f} ({s['worst_task']})" for m, s in summary.items()]
  curves = [row for t, ms in results.items() for m, r in ms.items()
            for row in curve_rows(t, m, r["curves"])]
  return finish(out, "\n".join(lines), data, terminal, curves)


def run(config: Config, out, *, progress: bool = True, store=None) -> Result:
  """Meta-trains, evaluates, and writes report.md, results.json and plots into ``out``.

  ``store``: a RunStore or path recording every evaluation training run (default:
  ``config.store``).
  """
  store = config.store if store is None else store
  with using_data_dir(config.data_dir):
    timings = {}
    meta_result = meta_train(config.meta, out / "meta", progress=progress)
    timings["meta_train"] = meta_result.seconds
    if config.save_controller:
      meta_result.save(config.save_controller,
                       info={"command": "metaopt run lr-schedule --save-controller DIR"})
    thetas = {"learned": (meta_result.controller, meta_result.theta, config.meta)}
    if config.include_pretrained and learned_lr.PRETRAINED_WEIGHTS.exists():
      shipped = learned_lr.load_controller()
      shipped_cfg = config_of_saved(dataclasses.replace(
          config.meta, optimizer=pretrained_optimizer(config.meta.optimizer)), shipped)
      thetas["pretrained"] = (shipped.controller, shipped.theta, shipped_cfg)
    results = {}
    start = time.perf_counter()
    tasks = config.heldout
    for i, tc in enumerate(tasks):
      print(f"[{i + 1}/{len(tasks)}] evaluating on {tc.name}", flush=True)
      results[tc.name] = evaluate_task(config, tc, thetas, store=store)
    timings["evaluation"] = time.perf_counter() - start
    return write_report(out, config, results, meta_result, timings)
