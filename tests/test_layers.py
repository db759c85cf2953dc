"""The layer order of docs/concepts.md, checked on the source with ``ast``.

Lowest first: leaf utilities (validation, config, report, checkpoint: they import no
other metaopt module), tasks/, unroll.py, estimators.py, schedules/, train.py, meta/,
hparams/, experiments/, cli.py. A module may import its own layer and the layers
below it, only at module top; a function-level import is for an optional or slow
third-party package and says why in a comment on its line.
"""

import ast
import pathlib

import pytest

from metaopt import experiments

ROOT = pathlib.Path(__file__).resolve().parents[1]
LEAVES = ("validation", "config", "report", "checkpoint", "sharding")
ORDER = ("tasks", "unroll", "estimators", "schedules", "train", "meta", "hparams",
         "experiments", "cli")


def module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(ROOT)
  parts = list(rel.with_suffix("").parts)
  if parts[0] == "experiments":
    parts = ["metaopt"] + parts
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def layer(module: str) -> int:
  """-1 for leaves, then the index in ORDER; the package facade ``metaopt`` is top."""
  parts = module.split(".")
  if module == "metaopt":
    return len(ORDER)
  if parts[1] in LEAVES:
    return -1
  return ORDER.index(parts[1])


def sources():
  files = sorted((ROOT / "metaopt").rglob("*.py")) + sorted((ROOT / "experiments").rglob("*.py"))
  return [(module_name(p), p) for p in files]


def metaopt_imports(tree: ast.Module, module: str):
  """(line, imported module, at top level) for every import of a metaopt module."""
  top = {id(node) for node in tree.body}
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      if node.module == "metaopt":  # `from metaopt import x`: a submodule or the facade
        names = [f"metaopt.{a.name}" if (ROOT / "metaopt" / a.name).exists()
                 or (ROOT / "metaopt" / f"{a.name}.py").exists() or a.name == "experiments"
                 else "metaopt" for a in node.names]
      else:
        names = [node.module]
    for name in names:
      if name == "metaopt" or name.startswith("metaopt."):
        yield node.lineno, name, id(node) in top


def check(module: str, source: str) -> list[str]:
  """Every violation of the layer rules in one module's source."""
  problems = []
  tree = ast.parse(source)
  for line, imported, at_top in metaopt_imports(tree, module):
    if not at_top:
      problems.append(f"{module}:{line} imports {imported} inside a function")
    if module == "metaopt":
      continue
    if layer(module) == -1:
      problems.append(f"{module}:{line}: a leaf utility imports {imported}")
    elif layer(imported) > layer(module):
      problems.append(f"{module}:{line} imports {imported}, a higher layer")
  lines = source.splitlines()
  top = {id(n) for n in tree.body}
  for node in ast.walk(tree):
    if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
      if "#" not in lines[node.lineno - 1] and not any(
          n.startswith("metaopt") for n in ([a.name for a in node.names] + [getattr(node, "module", None) or ""])):
        problems.append(f"{module}:{node.lineno}: a function-level import without a comment "
                        "saying why")
  return problems


@pytest.mark.parametrize("module, path", sources(), ids=[m for m, _ in sources()])
def test_module_imports_only_its_layer_and_below(module, path):
  assert check(module, path.read_text()) == []


def test_the_checker_catches_upward_and_hidden_imports():
  assert check("metaopt.train", "from metaopt.hparams import store\n") == [
      "metaopt.train:1 imports metaopt.hparams, a higher layer"]
  assert check("metaopt.unroll", "def f():\n  from metaopt import tasks\n") == [
      "metaopt.unroll:2 imports metaopt.tasks inside a function"]
  assert check("metaopt.report", "from metaopt.tasks import data\n") == [
      "metaopt.report:1: a leaf utility imports metaopt.tasks"]
  assert check("metaopt.meta.lr", "import metaopt\n")[0].endswith("a higher layer")
  assert check("metaopt.tasks.data", "def f():\n  import scipy\n") == [
      "metaopt.tasks.data:2: a function-level import without a comment saying why"]
  assert check("metaopt.meta.lr", "from metaopt.tasks import data\nimport jax\n") == []


def test_the_cli_names_no_experiment():
  cli = (ROOT / "metaopt" / "cli.py").read_text()
  for name, entry in experiments.REGISTRY.items():
    assert name not in cli and entry.module not in cli
