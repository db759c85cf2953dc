"""The ``metaopt`` command."""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from typing import Optional, Sequence

EXPERIMENTS = {
    "lr-schedule": "meta-train an LR controller and compare it with tuned optax schedules",
    "adaptive-lr": "plateau, hypergradient and learned LRs vs fixed schedules, with early stopping",
    "hparam-prediction": "predicted hyperparameters vs random search and TPE, leave one dataset out",
    "maml-transfer": "MAML initialization vs random init and joint pre-training on unseen datasets",
}


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line and exit 2, no usage dump
    print(f"metaopt: error: {message}", file=sys.stderr)
    sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="metaopt", description="Learning how to optimize, in JAX.")
  commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
  run = commands.add_parser(
      "run", help="run an experiment: " + "; ".join(f"{k}: {v}" for k, v in EXPERIMENTS.items()),
      description="Run an experiment and write report.md, results.json and plots.")
  run.add_argument("experiment", help=f"one of: {', '.join(EXPERIMENTS)}")
  run.add_argument("--quick", action="store_true", help="a tiny configuration (under 2 minutes)")
  run.add_argument("--out", default="results", help="parent folder of run folders (default: results)")
  run.add_argument("--name", help="run folder name; an existing folder of that name is resumed")
  run.add_argument("--seed", type=int, default=0)
  run.add_argument("--meta-steps", type=int, help="override the number of meta-training steps")
  run.add_argument("--save-controller", metavar="DIR",
                   help="also write the meta-trained controller (msgpack + JSON) to DIR")
  run.add_argument("--no-progress", action="store_true", help="no progress bars")
  run.add_argument("--data-dir", metavar="DIR",
                   help="maml-transfer: prepared tfds datasets instead of the offline ones")
  run.add_argument("--backbone", metavar="FILE",
                   help="maml-transfer: Conv4 weights (msgpack file or orbax folder) to start from")
  run.add_argument("--store", metavar="PATH",
                   help="also record every training run into this run store (SQLite file)")
  sweep = commands.add_parser(
      "sweep", help="train configurations from a search space over the offline task suite "
      "into a run store", description="Fill a run store with training runs: each "
      "(dataset, model) pair gets --trials configurations. Resumes: runs already in the "
      "store are skipped.")
  sweep.add_argument("--store", required=True, metavar="PATH", help="run store (SQLite file)")
  sweep.add_argument("--datasets", help="comma-separated (default: all; see `metaopt list`)")
  sweep.add_argument("--models", help="comma-separated from mlp,cnn,rnn,transformer "
                     "(default: all; cnn only runs on image datasets)")
  sweep.add_argument("--trials", type=int, help="configurations per (dataset, model) (default 30)")
  sweep.add_argument("--epochs", type=int, help="epochs per run (default 5)")
  sweep.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
  sweep.add_argument("--space", metavar="JSON",
                     help="search space file: a list of {name, type, low, high, log} or "
                     "{name, type: categorical, choices} (default: the built-in space)")
  sweep.add_argument("--seed", type=int, default=0)
  sweep.add_argument("--quick", action="store_true",
                     help="a tiny sweep: iris and wine, mlp, 4 trials, 2 epochs")
  sweep.add_argument("--no-progress", action="store_true", help="no progress bars")
  hparams = commands.add_parser("hparams", help="hyperparameter predictor: fit, suggest")
  hp_commands = hparams.add_subparsers(dest="hparams_command", metavar="ACTION",
                                       parser_class=_Parser)
  fit = hp_commands.add_parser("fit", help="fit a predictor on a run store")
  fit.add_argument("--store", required=True, help="run store file (metaopt sweep writes one)")
  fit.add_argument("--out", required=True, help="folder to save the predictor to")
  fit.add_argument("--metric", default="val_accuracy")
  fit.add_argument("--mode", default="max", help="max or min: which metric values are better")
  fit.add_argument("--space", help="search space JSON file (default: inferred from the runs)")
  fit.add_argument("--steps", type=int, default=2000, help="training steps of the predictor")
  fit.add_argument("--seed", type=int, default=0)
  suggest = hp_commands.add_parser("suggest", help="suggest hyperparameters for a task")
  suggest.add_argument("--predictor", required=True, help="folder of a saved predictor")
  suggest.add_argument("--dataset", help="an offline dataset (its meta-features are computed)")
  suggest.add_argument("--model", help="model family, with --dataset")
  suggest.add_argument("--epochs", type=float, default=5, help="training budget, with --dataset")
  suggest.add_argument("--features", help="JSON file of the task's meta-features "
                                          "(instead of --dataset/--model)")
  suggest.add_argument("-k", type=int, default=1, help="number of configurations")
  suggest.add_argument("--json", action="store_true", help="print JSON")
  commands.add_parser("list", help="list experiments and datasets")
  return parser


def _module(experiment: str):
  """The experiment's module: default_config(seed), quick_config(seed), run(config, out, ...)."""
  import importlib
  return importlib.import_module("metaopt.experiments." + experiment.replace("-", "_"))


def _run(args) -> int:
  if args.experiment not in EXPERIMENTS:
    raise ValueError(f"unknown experiment {args.experiment!r}; accepted: {', '.join(EXPERIMENTS)}")
  if args.meta_steps is not None and args.meta_steps < 1:
    raise ValueError(f"--meta-steps must be >= 1, got {args.meta_steps}")
  if args.meta_steps is not None and args.experiment != "lr-schedule":
    raise ValueError("--meta-steps applies only to the lr-schedule experiment")
  import dataclasses

  from metaopt import report

  experiment = _module(args.experiment)
  config = (experiment.quick_config if args.quick else experiment.default_config)(args.seed)
  if args.meta_steps is not None:
    config = dataclasses.replace(config, meta=dataclasses.replace(config.meta,
                                                                  meta_steps=args.meta_steps))
  for flag, value in (("--data-dir", args.data_dir), ("--backbone", args.backbone)):
    if value is not None and args.experiment != "maml-transfer":
      raise ValueError(f"{flag} applies only to the maml-transfer experiment")
  if args.data_dir is not None:
    if not pathlib.Path(args.data_dir).is_dir():
      raise FileNotFoundError(f"--data-dir {args.data_dir!r} is not a folder")
    config = dataclasses.replace(config, data_dir=args.data_dir)
  if args.backbone is not None:
    if not pathlib.Path(args.backbone).exists():
      raise FileNotFoundError(f"--backbone {args.backbone!r} does not exist")
    config = dataclasses.replace(config, backbone=args.backbone)
  extra = {}
  if args.store is not None:
    import inspect

    from metaopt.hparams.store import RunStore
    if "store" not in inspect.signature(experiment.run).parameters:
      raise ValueError(f"--store is not supported by experiment {args.experiment!r}")
    RunStore(args.store).close()  # a bad path fails now, not after the training
    extra["store"] = args.store
  name = args.name or f"{args.experiment}{'-quick' if args.quick else ''}"
  out = report.run_directory(args.out, name, resume=args.name is not None)
  print(f"metaopt: writing {out}", flush=True)
  result = experiment.run(config, out, progress=not args.no_progress,
                          save_controller=args.save_controller, **extra)
  if args.experiment == "hparam-prediction":
    s = result["summary"]
    print(f"top-1 prediction beats random search at 10 trials on {s['top1_beats_random10']} of "
          f"{s['datasets']} held-out datasets: {'PASS' if s['target1_passed'] else 'FAIL'}")
    print(f"mean normalized regret at 10 trials: TPE warm-started {s['tpe_warm_regret10']}, "
          f"TPE {s['tpe_regret10']}: {'PASS' if s['target2_passed'] else 'FAIL'}")
  elif args.experiment == "maml-transfer":
    for row in result["results"]:
      print(f"{row['method']}: meta-test accuracy {row['accuracy']:.4f} "
            f"± {row['accuracy ±95%']:.4f}, macro-F1 {row['macro-F1']:.4f}")
  elif args.experiment == "lr-schedule":
    for method, s in result["summary"].items():
      print(f"{method}: test accuracy / tuned cosine: mean {s['mean_ratio']:.4f}, "
            f"worst {s['worst_ratio']:.4f} ({s['worst_task']})")
  else:
    for dataset, t in result["quality_target"].items():
      starts = ", ".join(f"{k} {v['test_acc']:.4f}" for k, v in t["starts"].items())
      print(f"{dataset}: Adam-HD test accuracy from {starts} vs tuned constant "
            f"{t['tuned_acc']:.4f}: {'PASS' if t['passed'] else 'FAIL'}")
  print(f"metaopt: report at {out / 'report.md'}")
  return 0


def _split(text, label: str, accepted) -> tuple | None:
  if text is None:
    return None
  names = tuple(n.strip() for n in text.split(",") if n.strip())
  if not names:
    raise ValueError(f"--{label} needs at least one name; accepted: {', '.join(accepted)}")
  for n in names:
    if n not in accepted:
      raise ValueError(f"unknown {label[:-1]} {n!r} in --{label}; accepted: {', '.join(accepted)}")
  return names


def _sweep(args) -> int:
  from metaopt.hparams import sweep as sweep_lib
  from metaopt.hparams.features import MODEL_FAMILIES
  from metaopt.tasks import DATASETS

  quick = sweep_lib.QUICK if args.quick else {}
  datasets = _split(args.datasets, "datasets", DATASETS) or quick.get("datasets")
  models = _split(args.models, "models", MODEL_FAMILIES) or quick.get("models")
  trials = args.trials if args.trials is not None else quick.get("trials_per_task", 30)
  epochs = args.epochs if args.epochs is not None else quick.get("epochs", 5)
  for label, v in (("--trials", trials), ("--epochs", epochs), ("--workers", args.workers)):
    if v < 1:
      raise ValueError(f"{label} must be >= 1, got {v}")
  space = sweep_lib.load_space(args.space) if args.space else sweep_lib.DEFAULT_SPACE
  report = sweep_lib.sweep(args.store, datasets=datasets, models=models, space=space,
                           trials_per_task=trials, epochs=epochs, seed=args.seed,
                           workers=args.workers, progress=not args.no_progress)
  print(f"metaopt: {report.added} runs added ({report.diverged} diverged, {report.failed} "
        f"failed), {report.skipped} already in the store, {report.tasks} tasks, "
        f"{report.wall_time:.1f} s; store {args.store}")
  for d, m, reason in report.invalid:
    print(f"  skipped {d}/{m}: {reason}")
  return 0


def _hparams(args, parser) -> int:
  """``metaopt hparams fit|suggest``."""
  import json

  if args.hparams_command is None:
    raise ValueError("metaopt hparams needs an action: fit or suggest")
  from metaopt.hparams import Predictor, RunStore, Space
  if args.hparams_command == "fit":
    if not pathlib.Path(args.store).is_file():
      raise FileNotFoundError(f"no run store at {args.store!r}")
    space = None
    if args.space:
      from metaopt.hparams.sweep import load_space
      space = load_space(args.space)
    with RunStore(args.store) as store:
      predictor = Predictor.fit(store, metric=args.metric, mode=args.mode, space=space,
                                steps=args.steps, seed=args.seed)
    predictor.save(args.out)
    info = predictor.info
    print(f"metaopt: fitted on {info['runs']} runs of {info['tasks']} tasks in "
          f"{info['fit_seconds']:.1f} s; saved to {args.out}")
    return 0
  predictor = Predictor.load(args.predictor)
  if (args.features is None) == (args.dataset is None):
    raise ValueError("give either --features FILE or --dataset NAME --model FAMILY")
  if args.features is not None:
    if args.model is not None:
      raise ValueError("--model goes with --dataset, not with --features")
    try:
      features = json.loads(pathlib.Path(args.features).read_text())
    except FileNotFoundError:
      raise FileNotFoundError(f"no features file at {args.features!r}") from None
    except json.JSONDecodeError as e:
      raise ValueError(f"features file {args.features!r} is not valid JSON: {e.msg}") from None
  else:
    if args.model is None:
      raise ValueError("--dataset needs --model (one of mlp, cnn, rnn, transformer)")
    from metaopt.hparams.features import task_features
    from metaopt.tasks.data import load_dataset
    features = task_features(load_dataset(args.dataset), model_family=args.model,
                             epochs=args.epochs)
  suggestions = predictor.suggest(features, k=args.k)
  if args.json:
    print(json.dumps(suggestions, indent=1))
  else:
    for i, s in enumerate(suggestions, 1):
      h = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in s["hparams"].items())
      print(f"{i}. {h}  (predicted {predictor.metric} quantile {s['predicted']:.3f} "
            f"± {s['uncertainty']:.3f})")
  return 0


def _list() -> int:
  from metaopt.tasks import DATASETS
  print("experiments:")
  for k, v in EXPERIMENTS.items():
    print(f"  {k:18s} {v}")
  print("datasets: " + ", ".join(DATASETS))
  return 0


def _enable_compilation_cache() -> None:
  """Reuse XLA compilations across runs (meta-training compiles one program per task shape)."""
  import jax
  cache = os.environ.get("METAOPT_XLA_CACHE", str(pathlib.Path.home() / ".cache" / "metaopt" / "xla"))
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.command is None:
    parser.print_help()
    return 2
  try:
    if args.command == "list":
      return _list()
    if args.command == "hparams":
      return _hparams(args, parser)
    _enable_compilation_cache()
    if args.command == "sweep":
      return _sweep(args)
    return _run(args)
  except (ValueError, FileNotFoundError) as e:
    print(f"metaopt: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("metaopt: interrupted; rerun with --name to resume from the last checkpoint",
          file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
