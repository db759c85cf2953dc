"""Every code block in README.md and docs/ runs as written.

Python blocks of a page run in order in one namespace (like a notebook), in an
empty working folder. Shell blocks: every ``metaopt run`` line resolves its
configuration (``--print-config``, nothing is trained), other ``metaopt`` lines
parse, ``make`` targets exist, benchmark scripts parse their arguments (and stop
there). JSON blocks parse (run-store
rows validate). A page may put one directive in an HTML comment on the line before
a block, visible in the Markdown source:

  <!-- docs-test {"replace": [["meta_steps=300", "meta_steps=2"]]} -->   smaller sizes
  <!-- docs-test {"setup": "fill_run_store"} -->    a run store for the block to read
  <!-- docs-test {"file": "name.csv"} -->           write this block to a file
  <!-- docs-test {"skip": "why"} -->                not run here, with the reason
"""

import contextlib
import io
import json
import pathlib
import re
import runpy
import shlex
import sys

import numpy as np
import pytest

from metaopt import cli
from metaopt.hparams import DEFAULT_SPACE, RunStore
from metaopt.hparams.features import task_features
from metaopt.hparams.store import validate_row
from metaopt.tasks import load_dataset

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DIRECTIVE = re.compile(r"<!--\s*docs-test\s+(\{.*\})\s*-->")
# Commands a reader runs once, that need the network or a clone: not run here.
NOT_CHECKED = ("git", "cd", "pip", "tfds")


def blocks(page: pathlib.Path):
  """(language, code, directive, line) of every fenced block of a page."""
  lines = page.read_text().splitlines()
  out, i = [], 0
  while i < len(lines):
    fence = re.match(r"^```(\w*)\s*$", lines[i])
    if not fence:
      i += 1
      continue
    start = i
    i += 1
    body = []
    while not lines[i].startswith("```"):
      body.append(lines[i])
      i += 1
    i += 1
    directive = {}
    if start > 0 and (m := DIRECTIVE.match(lines[start - 1].strip())):
      directive = json.loads(m.group(1))
    out.append((fence.group(1) or "text", "\n".join(body) + "\n", directive, start + 1))
  return out


def fill_run_store(path="runs.sqlite"):
  """A small store of runs on two datasets, for blocks that fit a predictor."""
  rng = np.random.default_rng(0)
  with RunStore(path) as store:
    for name in ("iris", "wine", "digits"):
      features = task_features(load_dataset(name), model_family="mlp", epochs=5)
      for _ in range(12):
        h = DEFAULT_SPACE.sample(rng)
        acc = 0.9 - 0.1 * abs(np.log10(h["learning_rate"]) + 2.5) + 0.02 * rng.normal()
        store.add(name, task_features=features, hparams=h, metrics={"val_accuracy": acc})


SETUPS = {"fill_run_store": fill_run_store}


def check_benchmark_arguments(script: pathlib.Path, args: list[str], command: str,
                              monkeypatch) -> None:
  """The script parses ``args`` with its own parser and exits 0 before any work."""
  assert script.is_file(), command
  with monkeypatch.context() as patch:
    patch.setenv("METAOPT_BENCH_CHECK_ARGS", "1")
    patch.setattr(sys, "argv", [str(script), *args])
    patch.syspath_prepend(str(script.parent))   # the scripts' `import common`
    err = io.StringIO()
    with pytest.raises(SystemExit) as stop, contextlib.redirect_stderr(err):
      runpy.run_path(str(script), run_name="__main__")
  assert stop.value.code in (0, None), f"{command}: {err.getvalue().strip()}"


def run_command(line: str, makefile: str, monkeypatch) -> None:
  for command in line.split("&&"):
    words = shlex.split(command, comments=True)
    if not words or words[0] in NOT_CHECKED:
      continue
    if words[0] == "metaopt":
      if words[1] == "run":
        with contextlib.redirect_stdout(io.StringIO()):
          assert cli.main(words[1:] + ["--print-config"]) == 0, command
      else:
        cli.build_parser().parse_args(words[1:])  # exits 2 on a bad option
    elif words[0] == "make":
      assert re.search(rf"^{words[1]}:", makefile, re.M), command
    elif words[0].endswith("python") and words[1].startswith("benchmarks/"):
      check_benchmark_arguments(ROOT / words[1], words[2:], command, monkeypatch)
    else:
      pytest.fail(f"no check for the documented command {command!r}")


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_code_block_runs(page, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  makefile = (ROOT / "Makefile").read_text()
  namespace: dict = {}
  for language, code, directive, line in blocks(page):
    where = f"{page.name}:{line}"
    if "skip" in directive:
      assert directive["skip"], f"{where}: a skipped block says why"
      continue
    for old, new in directive.get("replace", []):
      assert old in code, f"{where}: the directive replaces {old!r}, which is not in the block"
      code = code.replace(old, new)
    if "file" in directive:
      pathlib.Path(directive["file"]).write_text(code)
      continue
    if "setup" in directive:
      SETUPS[directive["setup"]]()
    if language == "python":
      exec(compile(code, where, "exec"), namespace)
    elif language in ("bash", "sh", "text") and not directive:
      for command in code.splitlines():
        if command.strip() and not command.lstrip().startswith("#"):
          run_command(command, makefile, monkeypatch)
    elif language == "json":
      for row in code.strip().splitlines():
        validate_row(json.loads(row))


def test_a_stale_directive_fails(tmp_path):
  page = tmp_path / "page.md"
  page.write_text('<!-- docs-test {"replace": [["steps=9", "steps=1"]]} -->\n```python\nx = 1\n```\n')
  (language, code, directive, line), = blocks(page)
  assert directive == {"replace": [["steps=9", "steps=1"]]} and "steps=9" not in code


def test_a_documented_benchmark_option_the_script_lacks_fails(monkeypatch):
  script = ROOT / "benchmarks" / "bench_hd_recovery.py"
  check_benchmark_arguments(script, ["--seeds", "30", "--rule", "normalized, beta 0.1"], "ok",
                            monkeypatch)
  for args, says in ((["--rule", "normalized, beta 9"], "invalid choice"),
                     (["--sedes", "30"], "unrecognized arguments")):
    with pytest.raises(AssertionError, match=says):
      check_benchmark_arguments(script, args, "bad", monkeypatch)
