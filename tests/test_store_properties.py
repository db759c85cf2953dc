"""Property tests of the run store's imports: no input line aborts an import, and no
good line is lost, whatever the other lines hold."""

import csv
import io
import json
import math
import pathlib
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metaopt.hparams import STATUSES, RunStore

SETTINGS = settings(max_examples=50, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=6)
finite = st.floats(allow_nan=False, allow_infinity=False)
any_float = st.floats()  # NaN and inf are written as JSON's NaN / Infinity tokens
int64 = st.integers(-2 ** 63, 2 ** 63 - 1)
json_values = st.recursive(
    st.none() | st.booleans() | int64 | finite | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                 max_size=3),
    max_leaves=8)

valid_rows = st.fixed_dictionaries(
    {"task_features": st.dictionaries(names, finite | st.integers(-10 ** 300, 10 ** 300),
                                      max_size=3),
     "hparams": st.dictionaries(names, st.none() | st.booleans() | int64 | finite
                                | st.text(max_size=10), max_size=3),
     "metrics": st.dictionaries(names, any_float | st.none(), max_size=3)},
    optional={"status": st.sampled_from(STATUSES),
              "wall_time": st.floats(0, 1e9) | st.none(),
              "curves": st.dictionaries(names, st.lists(any_float | st.none(), max_size=4),
                                        max_size=2),
              "model": st.dictionaries(names, json_values, max_size=2),
              "extra": st.dictionaries(names, json_values, max_size=2),
              "created": st.datetimes().map(lambda t: t.isoformat())})

# (field, raw JSON) pairs that make any row invalid, put in by text substitution because
# most of them cannot be written by json.dumps.
BAD_VALUES = [
    (("hparams",), "1" + "0" * 320),                   # beyond float64 and int64
    (("hparams",), "9" * 5000),                        # beyond int() of a string
    (("hparams",), "[" * 100_000 + "]" * 100_000),     # RecursionError in json
    (("hparams",), "1e400"),                           # overflows to inf
    (("hparams",), str(2 ** 63)),                      # beyond int64
    (("hparams",), '"' + "x" * 20_000 + '"'),          # a string too long
    (("hparams",), '"\\ud800"'),                       # a lone surrogate
    (("task_features",), "NaN"),
    (("task_features",), "-1e999"),
    (("task_features",), "1" + "0" * 320),
    (("metrics",), "1" + "0" * 320),
    (("metrics",), '"high"'),
    (("extra",), "[" * 40 + "]" * 40),                 # nesting beyond 32 levels
    (("extra",), "18446744073709551616"),
    (("model",), '{"a":' * 40 + "1" + "}" * 40),
    (("curves",), '[1, "x"]'),
    (("created",), '"not a date"'),
    (("created",), "20240501"),
    (("wall_time",), "-1"),
    (("wall_time",), "1" + "0" * 320),
    (("status",), '"crashed"'),
    (("task",), '""'),
    (("task",), "[" * 2000 + "]" * 2000),
]


@st.composite
def bad_rows(draw):
  row = draw(valid_rows)
  (field,), value = draw(st.sampled_from(BAD_VALUES))
  if field in ("hparams", "task_features", "metrics", "extra", "model", "curves"):
    row[field] = dict(row.get(field) or {}, **{"bad value": "@@BAD@@"})
  else:
    row[field] = "@@BAD@@"
  row.setdefault("task", "bad")
  return json.dumps(row).replace('"@@BAD@@"', value)


garbage_text = st.text(st.characters(codec="utf-8", exclude_characters="\n"), max_size=30)
garbage_bytes = st.binary(max_size=30).map(lambda b: b.replace(b"\n", b""))
# Any JSON value but a dict that could be a valid row: a dict gets an unknown key.
garbage_json = json_values.map(lambda v: json.dumps(dict(v, **{"not a field": 1})
                                                    if isinstance(v, dict) else v))

lines_of = st.lists(
    st.one_of(valid_rows.map(lambda r: ("valid", r)),
              bad_rows().map(lambda t: ("bad", t.encode())),
              garbage_json.map(lambda t: ("bad", t.encode())),
              garbage_text.map(lambda t: ("bad", t.encode())),
              garbage_bytes.map(lambda b: ("bad", b))),
    max_size=12)


@SETTINGS
@given(lines_of)
def test_jsonl_import_never_aborts_and_never_loses_a_good_line(items):
  raw, tasks, bad_lines = [], [], []
  for i, (kind, value) in enumerate(items):
    if kind == "valid":
      tasks.append(f"task {i}")
      raw.append(json.dumps(dict(value, task=tasks[-1]), allow_nan=True).encode())
    else:
      raw.append(value)
      if value.strip():  # blank lines are skipped, not rejected
        bad_lines.append(i + 1)
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "in.jsonl"
    path.write_bytes(b"\n".join(raw) + b"\n")
    with RunStore(pathlib.Path(tmp) / "s.db") as store:
      report = store.import_jsonl(path)
      stored = [r.task for r in store.runs()]
  assert report.imported == len(tasks)
  assert stored == tasks
  assert [line for line, _ in report.rejected] == bad_lines
  assert all(isinstance(reason, str) and "\n" not in reason for _, reason in report.rejected)


HEADER = ["task", "feature.n", "hparam.x", "metric.acc", "extra"]
# Garbage lines start with a comma: whatever follows, a record starting there has no
# task, so it can never be a valid row itself; quotes in it may still run on.


def _valid_hparam_cell(text):
  """A cell that imports as a valid hparam: cells are read as JSON when they parse."""
  try:
    value = json.loads(text)
  except ValueError:
    return True  # a string
  return (value is None or isinstance(value, (str, bool))
          or (isinstance(value, int) and -2 ** 63 <= value < 2 ** 63)
          or (isinstance(value, float) and math.isfinite(value)))


# Strings of a few characters, newlines and quotes included (a record may span lines).
hparam_cells = st.text(st.sampled_from('"\n,x') | st.characters(codec="utf-8",
                                                                exclude_characters="\r"),
                       max_size=8).filter(_valid_hparam_cell)
csv_garbage = st.text(st.sampled_from('",x1\\ {}') | st.characters(codec="utf-8"),
                      max_size=20).map(lambda t: t.replace("\n", "").replace("\r", ""))
csv_items = st.lists(
    st.one_of(
        st.tuples(finite, hparam_cells | int64.map(str), finite,
                  st.dictionaries(names, json_values, max_size=2)).map(lambda t: ("valid", t)),
        csv_garbage.map(lambda t: ("bad", b"," + t.encode())),
        garbage_bytes.map(lambda b: ("bad", b"," + b.replace(b"\r", b"")))),
    max_size=12)


@SETTINGS
@given(csv_items)
def test_csv_import_never_aborts_and_never_loses_a_good_record(items):
  raw, tasks = [], []
  for i, (kind, value) in enumerate(items):
    if kind == "valid":
      tasks.append(f"task {i}")
      out = io.StringIO()  # the line terminator is given so that a newline gets quoted
      csv.writer(out, lineterminator="\n").writerow(
          [tasks[-1], repr(value[0]), value[1], repr(value[2]), json.dumps(value[3])])
      raw.append(out.getvalue()[:-1].encode())
    else:
      raw.append(value)
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "in.csv"
    path.write_bytes(",".join(HEADER).encode() + b"\n" + b"\n".join(raw) + b"\n")
    with RunStore(pathlib.Path(tmp) / "s.db") as store:
      report = store.import_csv(path)
      stored = [r.task for r in store.runs()]
  assert stored == tasks
  assert report.imported == len(tasks)
  assert all(isinstance(reason, str) and "\n" not in reason for _, reason in report.rejected)
