"""Result tables (Markdown), JSON and plots shared by the experiments."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np


def run_directory(root, name: str, *, resume: bool) -> pathlib.Path:
  """``root/name``; a fresh run never reuses a directory, so nothing earlier is lost."""
  root = pathlib.Path(root)
  path = root / name
  if not resume:
    i = 1
    while path.exists():
      i += 1
      path = root / f"{name}-{i}"
  path.mkdir(parents=True, exist_ok=True)
  return path


def jsonable(x):
  """``x`` with numpy and jax values as JSON types (non-finite floats as None)."""
  if isinstance(x, Mapping):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, np.ndarray) or hasattr(x, "__array__"):
    return jsonable(np.asarray(x).tolist())
  if isinstance(x, (np.floating, float)):
    return None if not math.isfinite(float(x)) else float(x)
  if isinstance(x, np.integer):
    return int(x)
  return x


def write_json(path, data: Any) -> None:
  pathlib.Path(path).write_text(json.dumps(jsonable(data), indent=1) + "\n")


def fmt(x, digits: int = 4) -> str:
  """A table cell: numbers to ``digits`` significant figures, None as a dash."""
  if x is None:
    return "–"
  if isinstance(x, str):
    return x
  x = float(x)
  if not math.isfinite(x):
    return "–"
  if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
    return f"{x:.{max(digits - 2, 1)}e}"
  return f"{x:.{digits}g}"


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def plot_panels(path, panels: Mapping[str, Mapping[str, tuple]], *, ylabel: str,
                xlabel: str = "step", logy: bool = False, ymin=None) -> None:
  """One subplot per panel, one line per method: ``panels[title][method] = (x, y)``."""
  import matplotlib  # 0.66 s to import with pyplot; only plotting needs it
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # after use("Agg"): no display here

  n = len(panels)
  cols = min(n, 3)
  rows = math.ceil(n / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
  for ax, (title, lines) in zip(axes.flat, panels.items()):
    for method, (x, y) in lines.items():
      ax.plot(x, y, label=method, lw=1.4)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
      ax.set_yscale("log")
    if ymin is not None:
      ax.set_ylim(bottom=ymin)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[n:]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
