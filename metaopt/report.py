"""Results as people read them: Markdown tables, JSON, CSV, TensorBoard event files
(when ``tensorboardX`` is installed: the ``tensorboard`` extra) and plots."""

from __future__ import annotations

import csv
import json
import math
import pathlib
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

try:
  import tensorboardX  # optional (the `tensorboard` extra); 0.07 s to import
except ImportError:
  tensorboardX = None


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


def write_csv(path, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> int:
  """One line per row, the given columns (empty for a missing value or a non-finite
  number); returns the number of rows."""
  count = 0
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    for row in rows:
      cells = []
      for c in columns:
        v = jsonable(row.get(c))
        cells.append("" if v is None else v)
      writer.writerow(cells)
      count += 1
  return count


class ScalarLog:
  """TensorBoard event files under ``logdir`` when ``tensorboardX`` is installed; a
  no-op otherwise. ``add(tag, value, step)``; use as a context manager."""

  def __init__(self, logdir):
    self.writer = None if tensorboardX is None else tensorboardX.SummaryWriter(str(logdir))

  def add(self, tag: str, value: Any, step: int) -> None:
    if self.writer is not None and value is not None and math.isfinite(float(value)):
      self.writer.add_scalar(tag, float(value), int(step))

  def add_row(self, row: Mapping[str, Any], step: int, prefix: str = "") -> None:
    """Every finite number of ``row`` as a scalar ``prefix + key``."""
    for key, value in row.items():
      if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        self.add(prefix + key, value, step)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()

  def __enter__(self) -> "ScalarLog":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def moving_average(y: Sequence[float], window: int) -> np.ndarray:
  """The mean of the last ``window`` values at each point (fewer at the start)."""
  y = np.asarray(y, np.float64)
  sums = np.cumsum(np.concatenate([[0.0], y]))
  idx = np.arange(1, len(y) + 1)
  start = np.maximum(idx - window, 0)
  return (sums[idx] - sums[start]) / (idx - start)


STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "v", "D", "x", "+", "*", "P")


def plot_panels(path, panels: Mapping[str, Mapping[str, tuple]], *, ylabel: str,
                xlabel: str = "step", logy: bool = False, ymin=None,
                hlines: Optional[Mapping[str, float]] = None,
                faint: Optional[Mapping[str, Mapping[str, tuple]]] = None) -> None:
  """One subplot per panel, one line per method: ``panels[title][method] = (x, y)``, or
  ``(x, y, low, high)`` for a shaded band. Lines differ in colour, style and marker,
  so overlapping methods stay visible; integer x values get integer ticks.
  ``hlines``: labelled horizontal reference lines on every panel (e.g. chance level).
  ``faint``: raw values drawn thin and light under the lines of the same names."""
  import matplotlib  # 0.66 s to import with pyplot; only plotting needs it
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # after use("Agg"): no display here
  from matplotlib.ticker import MaxNLocator  # part of matplotlib, imported with it

  n = len(panels)
  cols = min(n, 3)
  rows = math.ceil(n / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
  for ax, (title, lines) in zip(axes.flat, panels.items()):
    for i, (method, line) in enumerate(lines.items()):
      x, y = np.asarray(line[0]), np.asarray(line[1])
      color = f"C{i % 10}"
      raw = (faint or {}).get(title, {}).get(method)
      if raw is not None:
        ax.plot(raw[0], raw[1], color=color, lw=0.6, alpha=0.3)
      every = max(len(x) // 12, 1)
      ax.plot(x, y, label=method, lw=1.4, color=color, ls=STYLES[i % len(STYLES)],
              marker=MARKERS[i % len(MARKERS)], markevery=every, markersize=4)
      if len(line) == 4:
        ax.fill_between(x, line[2], line[3], color=color, alpha=0.15, lw=0)
    for label, level in (hlines or {}).items():
      ax.axhline(level, color="0.4", lw=1.0, ls=":", label=label)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
      ax.set_yscale("log")
    if ymin is not None:
      ax.set_ylim(bottom=ymin)
    xs = [np.asarray(line[0]) for line in lines.values()]
    if xs and all(np.issubdtype(x.dtype, np.integer) or np.all(np.mod(x, 1) == 0) for x in xs):
      ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[n:]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
