"""`metaopt run controllers`: LR controllers learned three ways, against the hand schedules.

On the MLP held-out tasks of the lr-schedule experiment (datasets, widths and lengths
no controller saw; ``heldout`` takes others, the plans' workloads among them), every
method trains with several seeds:

- the TBPTT controller shipped with metaopt (truncated backprop, ``metaopt run
  lr-schedule``);
- a PES controller meta-trained by this run (``meta_train`` with ``estimator="pes"``),
  when this metaopt has it; otherwise reported as not available;
- the supervised controller (:mod:`metaopt.meta.supervised`), trained by this run;
- the RL controller (:mod:`metaopt.meta.rl`, PPO), trained by this run: one run per
  seed, no tuning;
- the hand baselines of lr-schedule: Adam at 1e-3, and best-of-grid constant, step and
  cosine (with and without warmup) Adam; optionally the ``optax.contrib`` self-tuning
  optimizers.

Reported: final test accuracy and loss (mean and spread over seeds), steps to reach the
tuned cosine's final test loss, LR stability (variance of the LR, and total variation
of log LR over the run), and the compute each method spent on meta-training (inner
steps, wall time).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

import jax.numpy as jnp
import numpy as np
import optax

from metaopt import config as config_lib
from metaopt import report
from metaopt.experiments import lr_schedule
from metaopt.experiments.protocol import (Result, curve_rows, finish, lr_curve, lr_stability,
                                          plot_method_curves, seed_keys, train_and_record)
from metaopt.meta.lr import MetaLRConfig, config_of_saved, learned_lr_tx, meta_train
from metaopt.meta.rl import RLConfig, train_rl
from metaopt.meta.supervised import SupervisedConfig, train_supervised
from metaopt.schedules import learned_lr, scale_by_learned_lr
from metaopt.schedules.baselines import DEFAULT_LRS, SELF_TUNING
from metaopt.tasks import TaskConfig, make_task, task_family
from metaopt.tasks.models import VMAPPED
from metaopt.tasks.tfds_data import using_data_dir
from metaopt.validation import check_choice

# Episodes and preliminary runs: the lr-schedule training datasets, few shapes (one
# compiled program per shape), so that meta-training fits the time budget.
TRAIN_FAMILY = task_family(datasets=("digits", "mnist1d", "synthetic"), widths=(64,),
                           depths=(1, 2), batch_sizes=(32,), total_steps=(500, 1000))


LEARNED = ("tbptt", "pes", "supervised", "rl")


@dataclasses.dataclass(frozen=True)
class Config:
  supervised: SupervisedConfig
  rl: RLConfig
  pes: MetaLRConfig                  # meta-trained with estimator="pes" when available
  heldout: tuple[TaskConfig, ...] = lr_schedule.MLP_HELDOUT
  seeds: int = 3                     # evaluation seeds per held-out task
  lrs: tuple[float, ...] = DEFAULT_LRS  # tuning grid of every hand schedule
  evals: int = 20                    # evaluations per run; the RL policy acts after each
  run_pes: bool = True
  self_tuning: tuple[str, ...] = ()  # optax.contrib baselines, at defaults
  evaluate: tuple[str, ...] = LEARNED  # the learned methods evaluated on the held-out tasks
  data_dir: Optional[str] = None     # prepared tfds data (default: $TFDS_DATA_DIR)
  store: Optional[str] = None        # run store recording every evaluation run

  def __post_init__(self):
    lr_schedule.check_evaluation(self)
    for name in self.evaluate:
      check_choice("learned method", name, LEARNED)
    for task in self.heldout:
      if task.total_steps % self.supervised.points:
        raise ValueError(f"held-out task {task.name}: total_steps={task.total_steps} is not a "
                         f"multiple of supervised.points={self.supervised.points}")


RUN_LENGTH = ()


def default_config(seed: int = 0) -> Config:
  return Config(
      supervised=SupervisedConfig(family=TRAIN_FAMILY, tasks=4, seed=seed),
      rl=RLConfig(family=TRAIN_FAMILY, epochs=20, epoch_steps=20, episodes=16,
                  iterations=80, meta_lr=1e-3, seed=seed),
      pes=MetaLRConfig(family=TRAIN_FAMILY, lanes=2, population=4, meta_steps=60,
                       seed=seed))


def quick_config(seed: int = 0) -> Config:
  family = task_family(datasets=("digits",), widths=(32,), depths=(1,), batch_sizes=(32,),
                       total_steps=(200,))
  return Config(
      supervised=SupervisedConfig(family=family, tasks=1, points=10, lookahead=10, seed=seed),
      rl=RLConfig(family=family, epochs=10, epoch_steps=10, episodes=8, iterations=20,
                  minibatches=2, seed=seed),
      pes=MetaLRConfig(family=family, lanes=1, population=2, meta_steps=8, checkpoint_every=4,
                       seed=seed),
      heldout=(TaskConfig("wine", "mlp", 48, 1, 32, 300, 0),), seeds=2,
      lrs=(3e-4, 1e-3, 3e-3), evals=10)


# --- meta-training ---------------------------------------------------------------------


def pes_available() -> Optional[str]:
  """None when ``meta_train`` takes ``estimator="pes"``; otherwise why not."""
  fields = {f.name for f in dataclasses.fields(MetaLRConfig)}
  if "estimator" not in fields:
    return "this metaopt's meta_train has no estimator= setting"
  return None


def _shipped_compute() -> dict:
  """Meta-training cost of the shipped TBPTT controller, from its file and the
  lr-schedule default configuration it was trained with."""
  saved = learned_lr.load_controller()
  meta = lr_schedule.default_config().meta
  steps = int(saved.info.get("meta_steps", meta.meta_steps))
  return {"inner_steps": steps * meta.lanes * meta.population * meta.segment_length,
          "seconds": saved.info.get("seconds"),
          "note": f"{steps} meta steps of `metaopt run lr-schedule` (wall time not recorded "
                  "with the shipped file)"}


def meta_train_all(config: Config, out, *, progress: bool) -> tuple[dict, dict]:
  """Every learned method: ``(methods, compute)``; ``methods[name]`` builds a
  ``make_tx(total_steps, epoch_steps)`` and ``compute[name]`` is its meta-training cost."""
  methods, compute = {}, {}
  shipped = learned_lr.load_controller()
  shipped_cfg = config_of_saved(config.pes, shipped)
  methods["tbptt"] = lambda steps, every, s=shipped, c=shipped_cfg: learned_lr_tx(
      s.controller, s.theta, c, steps)
  compute["tbptt"] = _shipped_compute()

  why = pes_available() if config.run_pes else "switched off (run_pes = false)"
  if why is None:
    try:
      pes_cfg = dataclasses.replace(config.pes, estimator="pes")
      print("meta-training the PES controller", flush=True)
      pes = meta_train(pes_cfg, out / "pes", progress=progress)
    except Exception as e:  # an estimator this metaopt cannot run is reported, not fatal
      why = f"meta_train(estimator='pes') failed: {type(e).__name__}: {e}"
    else:
      methods["pes"] = lambda steps, every, r=pes, c=pes_cfg: learned_lr_tx(
          r.controller, r.theta, c, steps)
      compute["pes"] = {"inner_steps": pes_cfg.meta_steps * pes_cfg.lanes
                        * pes_cfg.population * pes_cfg.segment_length,
                        "seconds": pes.seconds}
  if why is not None:
    compute["pes"] = {"inner_steps": None, "seconds": None, "note": f"not available: {why}"}

  print("building the supervised meta-dataset and fitting the controller", flush=True)
  sup = train_supervised(config.supervised, out / "supervised", progress=progress)
  sc = config.supervised
  methods["supervised"] = lambda steps, every, r=sup: optax.chain(
      optax.scale_by_adam(eps_root=1e-8),
      scale_by_learned_lr(r.controller, r.theta, learning_rate=sc.learning_rate,
                          total_steps=steps, update_every=max(steps // sc.points, 1),
                          **sc.settings))
  compute["supervised"] = {"inner_steps": sup.inner_steps, "seconds": sup.seconds,
                           "states": sup.dataset.rows,
                           "fit": sup.history[-1] if sup.history else {}}

  print("training the RL policy (PPO)", flush=True)
  rl = train_rl(config.rl, out / "rl", progress=progress)
  rl.save(out / "rl" / "policy")
  methods["rl"] = lambda steps, every, r=rl: r.transform(total_steps=steps, epoch_steps=every)
  compute["rl"] = {"inner_steps": rl.inner_steps, "seconds": rl.seconds,
                   "final_return": rl.history[-1]["return"] if rl.history else None}
  return methods, compute


# --- evaluation ----------------------------------------------------------------------


def evaluate_task(config: Config, task_config: TaskConfig, methods: dict, store=None) -> dict:
  """The hand baselines (lr-schedule's evaluation) and every learned method on one task."""
  base = lr_schedule.Config(meta=config.pes, heldout=(task_config,), seeds=config.seeds,
                            lrs=config.lrs, evals=config.evals, include_pretrained=False,
                            self_tuning=config.self_tuning)
  out = lr_schedule.evaluate_task(base, task_config, {}, store=store)
  task = make_task(task_config)
  steps, every = task_config.total_steps, task_config.total_steps // config.evals
  keys = seed_keys(config.seeds, task_config.seed)  # the seeds of the hand baselines
  for name, make in methods.items():
    if name not in config.evaluate:  # meta-trained (its files written), not held out
      continue
    res, wall = train_and_record(
        task, lambda _, m=make: m(steps, every), jnp.zeros(config.seeds), keys, store=store,
        steps=steps, eval_every=every, vectorize=task_config.model in VMAPPED,
        feed_val_loss=name == "rl",
        run_info={"experiment": "controllers", "method": name})
    out[name] = dict(curves=res, lr=None, wall_time=wall, runs=config.seeds)
  return out


METHOD_ORDER = ("adam_1e-3", "constant", "step", "tuned_cosine", *LEARNED, *SELF_TUNING)
LABELS = {"adam_1e-3": "Adam 1e-3", "constant": "tuned constant", "step": "tuned step",
          "tuned_cosine": "tuned cosine", "tbptt": "TBPTT (shipped)", "pes": "PES",
          "supervised": "supervised", "rl": "RL (PPO)", **lr_schedule.SELF_TUNING_LABELS}


COLUMNS = ("task", "method", "test loss", "loss spread", "test acc", "acc spread", "test F1",
           "test WER", "steps to cosine loss", "LR variance", "log-LR total variation", "runs",
           "chosen LR")


def _final_test_metric(curves, name: str):
  """Mean over seeds of a test metric's last evaluation (None when the objective has none:
  macro-F1 is classification's, WER speech's)."""
  metrics = curves.test_metrics or {}
  return float(np.mean(np.asarray(metrics[name])[:, -1])) if name in metrics else None


def _stability_columns(method: dict) -> dict:
  """Macro-F1 or WER; LR variance and total variation of log LR (+inf when the LR reaches 0)."""
  variance, tv = lr_stability(method["curves"], log=True)
  return {"LR variance": variance, "log-LR total variation": tv,
          "test F1": _final_test_metric(method["curves"], "macro_f1"),
          "test WER": _final_test_metric(method["curves"], "wer")}


def table_rows(results: dict, compute: dict) -> list[dict]:
  return lr_schedule.table_rows(results, order=METHOD_ORDER, labels=LABELS, columns=COLUMNS,
                                extra=_stability_columns)


COMPUTE_COLUMNS = ("method", "meta-training inner steps", "meta-training wall s", "note")


def verdicts(results: dict) -> dict:
  """Per task the best method on test loss and accuracy; per learned method its mean
  gain over Adam 1e-3 and over the tuned cosine, and the tasks it wins and loses."""
  best, per_method = {}, {}
  final = lambda ms, m, f: float(getattr(ms[m]["curves"], f)[:, -1].mean())
  for task_name, methods in results.items():
    present = [m for m in METHOD_ORDER if m in methods]
    best[task_name] = {
        "test loss": LABELS[min(present, key=lambda m: final(methods, m, "test_loss"))],
        "test acc": LABELS[max(present, key=lambda m: final(methods, m, "test_accuracy"))]}
  for m in LEARNED:
    tasks = [t for t, ms in results.items() if m in ms]
    if not tasks:
      continue
    gain = lambda ref, f: {t: final(results[t], m, f) - final(results[t], ref, f) for t in tasks}
    acc_adam, loss_adam = gain("adam_1e-3", "test_accuracy"), gain("adam_1e-3", "test_loss")
    acc_cos, loss_cos = gain("tuned_cosine", "test_accuracy"), gain("tuned_cosine", "test_loss")
    per_method[m] = {
        "acc_gain_over_adam_1e-3": acc_adam, "mean_acc_gain_over_adam_1e-3":
        float(np.mean(list(acc_adam.values()))),
        "loss_change_vs_adam_1e-3": loss_adam, "mean_loss_change_vs_adam_1e-3":
        float(np.mean(list(loss_adam.values()))),
        "acc_gain_over_tuned_cosine": acc_cos, "mean_acc_gain_over_tuned_cosine":
        float(np.mean(list(acc_cos.values()))),
        "mean_loss_change_vs_tuned_cosine": float(np.mean(list(loss_cos.values()))),
        "beats_adam_1e-3_on_mean_accuracy": bool(np.mean(list(acc_adam.values())) > 0)}
  return {"best": best, "methods": per_method}


def write_report(out, config: Config, results: dict, compute: dict, timings: dict) -> Result:
  rows = table_rows(results, compute)
  judged = verdicts(results)
  labels = {m: LABELS[m] for m in METHOD_ORDER}
  by_task = {t: {m: r["curves"] for m, r in ms.items()} for t, ms in results.items()}
  plot_method_curves(out / "lr.png", by_task, labels, lr_curve, ylabel="learning rate",
                     logy=True, ymin=1e-6)
  plot_method_curves(out / "loss.png", by_task, labels,
                     lambda c: (c.eval_steps[0], c.test_loss.mean(axis=0)),
                     ylabel="test loss", logy=True)
  compute_rows = [{"method": LABELS[m], "meta-training inner steps": c.get("inner_steps"),
                   "meta-training wall s": c.get("seconds"), "note": c.get("note", "")}
                  for m, c in compute.items()]
  lines = ["# LR controllers learned three ways vs hand schedules", "",
           f"Held-out tasks ({', '.join(t.name for t in config.heldout)}), "
           f"{config.seeds} seed(s) each; "
           f"hand schedules are Adam tuned best-of-grid over LR {list(config.lrs)} on final "
           "validation accuracy (ties: loss). The learned controllers run once per seed, "
           "untuned. Numbers are test-split means over seeds at the end of training "
           "(spread: standard deviation over seeds).", "",
           report.markdown_table(rows, COLUMNS), "",
           "`test F1`: macro-F1 on the test split (classification); `test WER`: word error "
           "rate (speech; there `test acc` is max(0, 1 - WER)). `steps to cosine loss`: mean over seeds of the first evaluated step whose test "
           "loss is at or below the tuned cosine's final test loss (– if a seed never gets "
           "there). `LR variance`: variance of the applied LR over the steps of a run; "
           "`log-LR total variation`: the sum of |change of log LR| over the run (0 for a "
           "constant LR; a cosine to zero is large because log LR falls steeply at the end).",
           "", "## Meta-training compute", "",
           report.markdown_table(compute_rows, COMPUTE_COLUMNS), "",
           "Inner steps: every training step the method ran to learn its controller "
           "(TBPTT and PES: lanes x population x segment length per meta step; supervised: "
           "preliminary runs plus every look-ahead; RL: every step of every episode). "
           "Hand schedules spend their compute on tuning instead: their `runs` column "
           "counts the grid.", "",
           "## Who wins where", ""]
  for task_name, b in judged["best"].items():
    lines.append(f"- {task_name}: lowest test loss **{b['test loss']}**, highest test "
                 f"accuracy **{b['test acc']}**.")
  lines += [""]
  for m, v in judged["methods"].items():
    wins = [t for t, g in v["acc_gain_over_adam_1e-3"].items() if g > 0]
    losses = [t for t, g in v["acc_gain_over_adam_1e-3"].items() if g < 0]
    lines.append(
        f"- {LABELS[m]}: test accuracy vs Adam 1e-3 {v['mean_acc_gain_over_adam_1e-3']:+.4f} "
        f"on the mean (test loss {v['mean_loss_change_vs_adam_1e-3']:+.4f}); vs tuned cosine "
        f"{v['mean_acc_gain_over_tuned_cosine']:+.4f} (loss "
        f"{v['mean_loss_change_vs_tuned_cosine']:+.4f}). Beats Adam 1e-3 on "
        f"{', '.join(wins) or 'no task'}; loses on {', '.join(losses) or 'no task'}.")
  if "pes" in compute and compute["pes"].get("note", "").startswith("not available"):
    lines += ["", f"PES: {compute['pes']['note']}."]
  rl_v = judged["methods"].get("rl")
  if rl_v is not None:
    lines += ["", "## RL transfer (Xu et al., 2019)", "",
              "The policy was trained with PPO on episodes of "
              f"{', '.join(config.rl.family.datasets)} MLPs and evaluated once per seed on "
              "the held-out tasks, acting after each evaluation. Mean test-accuracy gain over "
              f"Adam at a constant 1e-3: {rl_v['mean_acc_gain_over_adam_1e-3']:+.4f} "
              f"({'beats' if rl_v['beats_adam_1e-3_on_mean_accuracy'] else 'does not beat'} "
              "it on the mean); mean test-loss change "
              f"{rl_v['mean_loss_change_vs_adam_1e-3']:+.4f}."]
  lines += ["", "![LR over steps](lr.png)", "", "![test loss](loss.png)", "",
            f"Wall time: meta-training {timings['meta_training']:.0f} s, evaluation "
            f"{timings['evaluation']:.0f} s.", ""]
  data = {"config": config_lib.to_dict(config), "rows": rows, "compute": compute,
          "verdicts": judged, "timings": timings,
          "curves": {t: {m: r["curves"]._asdict() for m, r in ms.items()}
                     for t, ms in results.items()}}
  terminal = [f"{LABELS[m]}: test accuracy vs Adam 1e-3 {v['mean_acc_gain_over_adam_1e-3']:+.4f}"
              f", vs tuned cosine {v['mean_acc_gain_over_tuned_cosine']:+.4f} (mean over tasks)"
              for m, v in judged["methods"].items()]
  curves = [row for t, ms in results.items() for m, r in ms.items()
            for row in curve_rows(t, m, r["curves"])]
  return finish(out, "\n".join(lines), data, terminal, curves)


def run(config: Config, out, *, progress: bool = True, store=None) -> Result:
  """Meta-trains the PES, supervised and RL controllers, evaluates every method on the
  held-out tasks, and writes report.md, results.json and plots into ``out``."""
  store = config.store if store is None else store
  with using_data_dir(config.data_dir):
    start = time.perf_counter()
    methods, compute = meta_train_all(config, out, progress=progress)
    timings = {"meta_training": time.perf_counter() - start}
    start = time.perf_counter()
    results = {}
    for i, tc in enumerate(config.heldout):
      print(f"[{i + 1}/{len(config.heldout)}] evaluating on {tc.name}", flush=True)
      results[tc.name] = evaluate_task(config, tc, methods, store=store)
    timings["evaluation"] = time.perf_counter() - start
    return write_report(out, config, results, compute, timings)
