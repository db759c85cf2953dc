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
  name = args.name or f"{args.experiment}{'-quick' if args.quick else ''}"
  out = report.run_directory(args.out, name, resume=args.name is not None)
  print(f"metaopt: writing {out}", flush=True)
  result = experiment.run(config, out, progress=not args.no_progress,
                          save_controller=args.save_controller)
  if args.experiment == "lr-schedule":
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


def _list() -> int:
  from metaopt.tasks import DATASETS
  print("experiments:")
  for k, v in EXPERIMENTS.items():
    print(f"  {k:14s} {v}")
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
    _enable_compilation_cache()
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
