"""The ``metaopt`` command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import shutil
import sqlite3
import sys
from typing import Optional, Sequence

from metaopt import config as config_lib
from metaopt import experiments, report, train
from metaopt.hparams import Predictor, RunStore
from metaopt.hparams import db
from metaopt.hparams import sweep as sweep_lib
from metaopt.hparams.features import task_features
from metaopt.tasks import DATASETS, MODEL_KINDS, load_dataset
from metaopt.validation import (SEED_MAX, check_folder_name, check_writable_file,
                                check_writable_folder)

# Shorthand flags of `metaopt run` for config fields only some experiments have.
FIELD_FLAGS = {"--data-dir": "data_dir", "--backbone": "backbone", "--store": "store",
               "--save-controller": "save_controller"}


def _int_in(low: int, high: int):
  """An argparse type: an integer in [low, high], named in the error."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not low <= value <= high:
      raise argparse.ArgumentTypeError(f"{value} is outside [{low}, {high}]")
    return value
  return parse


def _positive_float(high: float):
  def parse(text: str) -> float:
    try:
      value = float(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= high):
      raise argparse.ArgumentTypeError(f"{text} is outside (0, {high:g}]")
    return value
  return parse


SEED = _int_in(0, SEED_MAX)


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line and exit 2, no usage dump
    print(f"metaopt: error: {message}", file=sys.stderr)
    sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="metaopt", description="Learning how to optimize, in JAX.")
  commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
  names = ", ".join(experiments.REGISTRY)
  run = commands.add_parser(
      "run", help="run an experiment: " + "; ".join(
          f"{k}: {v.summary}" for k, v in experiments.REGISTRY.items()),
      description="Run an experiment and write report.md, results.json, plots and "
      "config.json into a new run folder. The configuration starts from the experiment's "
      "default (or --quick), then --config, then each --set in order.")
  run.add_argument("experiment", help=f"one of: {names}")
  run.add_argument("--quick", action="store_true",
                   help="start from the tiny configuration (under a minute on 2 CPU cores)")
  run.add_argument("--config", metavar="FILE|NAME", help="TOML or JSON file of config fields "
                   "(a run folder's config.json reproduces that run), or the name of one of "
                   "the experiment's named configurations (`metaopt list` shows them)")
  run.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", dest="overrides",
                   help="set one config field, e.g. --set meta.meta_steps=20 (repeatable)")
  run.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration as JSON and exit")
  run.add_argument("--out", default="results", help="parent folder of run folders (default: results)")
  run.add_argument("--name", help="run folder name; an existing folder of that name is resumed")
  run.add_argument("--seed", type=SEED, default=0,
                   help=f"seed of the default configuration, 0 to {SEED_MAX}")
  run.add_argument("--force-new", action="store_true",
                   help="with --name of an existing run whose configuration differs: start a "
                   "new run folder instead of refusing")
  run.add_argument("--no-progress", action="store_true", help="no progress bars")
  for flag, field in FIELD_FLAGS.items():
    run.add_argument(flag, dest=field, metavar="PATH",
                     help=f"shorthand for --set {field}=PATH (experiments with that field)")
  sweep = commands.add_parser(
      "sweep", help="train configurations from a search space over the offline task suite "
      "into a run store", description="Fill a run store with training runs: each "
      "(dataset, model) pair gets --trials configurations. Resumes: runs already in the "
      "store are skipped.")
  sweep.add_argument("--store", required=True, metavar="PATH|URL",
                     help="run store: an SQLite file, or postgresql://USER:PASSWORD@HOST:PORT/DB "
                     "shared by workers on many hosts (each runs the same command)")
  sweep.add_argument("--datasets", help="comma-separated (default: all; see `metaopt list`)")
  sweep.add_argument("--models", help=f"comma-separated from {','.join(MODEL_KINDS)} "
                     "(default: all; cnn only runs on image datasets)")
  sweep.add_argument("--trials", type=_int_in(1, 100_000),
                     help="configurations per (dataset, model), up to 100,000 (default 30)")
  sweep.add_argument("--epochs", type=_int_in(1, 10_000),
                     help="epochs per run, up to 10,000 (default 5)")
  sweep.add_argument("--workers", type=_int_in(1, 256), default=1,
                     help="parallel processes (default 1)")
  sweep.add_argument("--space", metavar="JSON",
                     help="search space file: a list of {name, type, low, high, log} or "
                     "{name, type: categorical, choices} (default: the built-in space)")
  sweep.add_argument("--seed", type=SEED, default=0)
  sweep.add_argument("--claim-timeout", type=_positive_float(sweep_lib.MAX_CLAIM_TIMEOUT),
                     default=sweep_lib.CLAIM_TIMEOUT, metavar="SECONDS",
                     help="PostgreSQL stores: runs claimed by a worker that stopped renewing "
                     f"its claims go to another worker after this long (default "
                     f"{sweep_lib.CLAIM_TIMEOUT:g})")
  sweep.add_argument("--quick", action="store_true",
                     help="a tiny sweep: iris and wine, mlp, 4 trials, 2 epochs")
  sweep.add_argument("--no-progress", action="store_true", help="no progress bars")
  hparams = commands.add_parser("hparams", help="hyperparameter predictor: fit, suggest")
  hp_commands = hparams.add_subparsers(dest="hparams_command", metavar="ACTION",
                                       parser_class=_Parser)
  fit = hp_commands.add_parser("fit", help="fit a predictor on a run store")
  fit.add_argument("--store", required=True, metavar="PATH|URL",
                   help="run store: SQLite file or postgresql:// URL (metaopt sweep writes one)")
  fit.add_argument("--out", required=True, help="folder to save the predictor to")
  fit.add_argument("--metric", default="val_accuracy")
  fit.add_argument("--mode", default="max", help="max or min: which metric values are better")
  fit.add_argument("--space", help="search space JSON file (default: inferred from the runs)")
  fit.add_argument("--steps", type=_int_in(1, 1_000_000), default=2000,
                   help="training steps of the predictor, up to 1,000,000")
  fit.add_argument("--seed", type=SEED, default=0)
  suggest = hp_commands.add_parser("suggest", help="suggest hyperparameters for a task")
  suggest.add_argument("--predictor", required=True, help="folder of a saved predictor")
  suggest.add_argument("--dataset", help="an offline dataset (its meta-features are computed)")
  suggest.add_argument("--model", help="model family, with --dataset")
  suggest.add_argument("--epochs", type=_positive_float(1e6), default=5,
                       help="training budget, with --dataset")
  suggest.add_argument("--features", help="JSON file of the task's meta-features "
                                          "(instead of --dataset/--model)")
  suggest.add_argument("-k", type=_int_in(1, 1000), default=1,
                       help="number of configurations, up to 1,000")
  suggest.add_argument("--json", action="store_true", help="print JSON")
  suggest.add_argument("--extrapolate", action="store_true",
                       help="answer for a task whose meta-features lie far outside those of "
                       "the stored tasks (the uncertainty grows with the distance)")
  commands.add_parser("list", help="list experiments and datasets")
  return parser


def resolve_config(args, module):
  """The experiment's configuration from the default (or --quick), --config, the
  shorthand flags and every --set, in that order; ValueError naming a bad field."""
  config = (module.quick_config if args.quick else module.default_config)(args.seed)
  layers = []
  if args.config is not None:
    path = experiments.config_file(args.experiment, args.config)
    layers.append(config_lib.load_file(path))
  fields = {f.name for f in dataclasses.fields(config)}
  for flag, field in FIELD_FLAGS.items():
    value = getattr(args, field)
    if value is not None:
      if field not in fields:
        raise ValueError(f"{flag}: experiment {args.experiment!r} has no config field "
                         f"{field!r}")
      layers.append({field: value})
  return config_lib.merge_all(config, layers, args.overrides)


def _first_difference(old, new, path=""):
  """The first field path where two JSON configurations differ, or None."""
  if isinstance(old, dict) and isinstance(new, dict):
    for key in list(old) + [k for k in new if k not in old]:
      found = _first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else key)
      if found is not None:
        return found
    return None
  return None if old == new else path


def run_folder(args, module, config) -> pathlib.Path:
  """The run folder, checked before any work: a new one, or the folder ``--name`` names
  when its recorded configuration matches (``module.RUN_LENGTH`` fields may differ: a
  longer run continues from its checkpoint)."""
  root = check_writable_folder("--out", args.out)
  named = args.config is not None and args.config in experiments.named_configs(args.experiment)
  name = (args.name if args.name is not None
          else f"{args.experiment}{'-quick' if args.quick else ''}"
               f"{'-' + args.config if named else ''}")
  check_folder_name("--name", name)
  existing = root / name
  resume = args.name is not None and existing.exists()
  if resume:
    if not existing.is_dir():
      raise ValueError(f"--name {name!r}: {str(existing)!r} is a file, not a run folder")
    saved = existing / "config.json"
    if saved.exists():
      old = json.loads(saved.read_text())
      new = json.loads(config_lib.dumps(config))
      for field in getattr(module, "RUN_LENGTH", ()):
        _set(old, field, _get(new, field))
      field = _first_difference(old, new)
      if field is not None and not args.force_new:
        raise ValueError(f"run folder {str(existing)!r} was started with a different "
                         f"{field!r} ({_get(old, field)!r}, now {_get(new, field)!r}); pass "
                         "--force-new for a new run folder, or another --name")
      resume = field is None
  return report.run_directory(root, name, resume=resume)


def _get(tree, path: str):
  for key in path.split("."):
    tree = tree.get(key) if isinstance(tree, dict) else None
  return tree


def _set(tree, path: str, value) -> None:
  *parents, last = path.split(".")
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[last] = value


def _run(args) -> int:
  module = experiments.load(args.experiment)
  config = resolve_config(args, module)
  if args.print_config:
    print(config_lib.dumps(config), end="")
    return 0
  store = getattr(config, "store", None)
  if store is not None:
    _check_store("--store", store)
    RunStore(store).close()  # a bad path fails now, not after the training
  if getattr(config, "save_controller", None) is not None:
    check_writable_folder("--save-controller", config.save_controller)
  out = run_folder(args, module, config)
  fresh = not (out / "config.json").exists()
  (out / "config.json").write_text(config_lib.dumps(config))
  train.enable_compilation_cache()
  print(f"metaopt: writing {out}", flush=True)
  try:
    result = module.run(config, out, progress=not args.no_progress)
  except USER_ERRORS:
    if fresh and [p.name for p in out.iterdir()] == ["config.json"]:
      shutil.rmtree(out)  # a failed start leaves no half-made run folder
    raise
  for line in result.summary_lines():
    print(line)
  print(f"metaopt: report at {result.report}")
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


def _check_store(label: str, store) -> None:
  """An SQLite store's file must be writable; a database URL is checked by opening it."""
  path = db.sqlite_path(store)
  if path is not None:
    check_writable_file(label, path)


def _sweep(args) -> int:
  quick = sweep_lib.QUICK if args.quick else {}
  datasets = _split(args.datasets, "datasets", DATASETS) or quick.get("datasets")
  models = _split(args.models, "models", MODEL_KINDS) or quick.get("models")
  trials = args.trials if args.trials is not None else quick.get("trials_per_task", 30)
  epochs = args.epochs if args.epochs is not None else quick.get("epochs", 5)
  _check_store("--store", args.store)
  space = sweep_lib.load_space(args.space) if args.space else sweep_lib.DEFAULT_SPACE
  report = sweep_lib.sweep(args.store, datasets=datasets, models=models, space=space,
                           trials_per_task=trials, epochs=epochs, seed=args.seed,
                           workers=args.workers, progress=not args.no_progress,
                           claim_timeout=args.claim_timeout)
  print(f"metaopt: {report.added} runs added ({report.diverged} diverged, {report.failed} "
        f"failed), {report.skipped} already in the store, {report.tasks} tasks, "
        f"{report.wall_time:.1f} s; store {db.mask(args.store)}")
  for d, m, reason in report.invalid:
    print(f"  skipped {d}/{m}: {reason}")
  return 0


def _hparams(args, parser) -> int:
  """``metaopt hparams fit|suggest``."""
  if args.hparams_command is None:
    raise ValueError("metaopt hparams needs an action: fit or suggest")
  if args.hparams_command == "fit":
    path = db.sqlite_path(args.store)
    if path is not None and not path.is_file():
      raise FileNotFoundError(f"no run store at {args.store!r}")
    check_writable_folder("--out", args.out)  # before the fitting, not after
    space = None
    if args.space:
      space = sweep_lib.load_space(args.space)
    with RunStore(args.store, create=False) as store:
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
    if pathlib.Path(args.features).is_dir():
      raise ValueError(f"--features {args.features!r} is a folder; pass a JSON file")
    try:
      features = json.loads(pathlib.Path(args.features).read_text())
    except FileNotFoundError:
      raise FileNotFoundError(f"no features file at {args.features!r}") from None
    except json.JSONDecodeError as e:
      raise ValueError(f"features file {args.features!r} is not valid JSON: {e.msg}") from None
  else:
    if args.model is None:
      raise ValueError("--dataset needs --model (one of mlp, cnn, rnn, transformer)")
    features = task_features(load_dataset(args.dataset), model_family=args.model,
                             epochs=args.epochs)
  suggestions = predictor.suggest(features, k=args.k, extrapolate=args.extrapolate)
  if args.json:
    print(json.dumps(suggestions, indent=1))
  else:
    for i, s in enumerate(suggestions, 1):
      h = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in s["hparams"].items())
      print(f"{i}. {h}  (expected to beat {100 * s['predicted']:.0f}% of a comparable "
            f"task's past runs on {predictor.metric}; ensemble spread "
            f"{100 * s['uncertainty']:.0f} points)")
  return 0


def _list() -> int:
  print("experiments:")
  for k, v in experiments.REGISTRY.items():
    print(f"  {k:18s} {v.summary}")
    for name, path in experiments.named_configs(k).items():
      print(f"    --config {name} (estimate: {experiments.estimate(path)})")
  print("datasets: " + ", ".join(DATASETS))
  return 0


# What a user's input can cause: one line, exit 2, no traceback.
USER_ERRORS = (ValueError, OSError, OverflowError, sqlite3.Error)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = build_parser()
  try:
    args = parser.parse_args(argv)
  except SystemExit as e:  # a bad option (one line printed already), or --help
    return e.code
  if args.command is None:
    parser.print_help()
    return 2
  try:
    if args.command == "list":
      return _list()
    if args.command == "hparams":
      return _hparams(args, parser)
    if args.command == "sweep":
      train.enable_compilation_cache()
      return _sweep(args)
    return _run(args)
  except USER_ERRORS as e:
    message = " ".join(str(e).split()) or type(e).__name__
    print(f"metaopt: error: {message}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    how = {"run": "rerun with the same --name to resume from the last checkpoint",
           "sweep": "rerun the same command to resume: stored runs are skipped"}
    print(f"metaopt: interrupted; {how.get(args.command, 'nothing was saved')}",
          file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
