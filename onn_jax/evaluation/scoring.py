"""The official ARC score of a Kaggle submission, and the submission's schema check.

A submission maps every task id to one entry per test input, in order; each entry is
``{"attempt_1": grid, "attempt_2": grid}`` with a grid a non-empty rectangular list of lists of
integers 0..9. The official score gives each task the fraction of its test outputs matched
exactly (shape and values) by either attempt, then averages over tasks.
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

import numpy as np

from onn_jax.data.tasks import Task

ATTEMPTS = ("attempt_1", "attempt_2")


def grid_problem(grid: Any) -> str | None:
  """Why ``grid`` is not a valid submission grid, or None when it is.

  Valid: a non-empty list (or tuple) of equally long, non-empty rows of integers 0..9. Booleans
  and floats are rejected so that ``1.0`` or ``True`` never pass as colour 1.
  """
  if not isinstance(grid, (list, tuple)):
    return f"grid is a {type(grid).__name__}, not a list of rows"
  if not grid:
    return "grid has no rows"
  width = None
  for r, row in enumerate(grid):
    if not isinstance(row, (list, tuple)):
      return f"row {r} is a {type(row).__name__}, not a list"
    if not row:
      return f"row {r} is empty"
    if width is None:
      width = len(row)
    elif len(row) != width:
      return f"row {r} has length {len(row)}, expected {width} (not rectangular)"
    for c, value in enumerate(row):
      if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        return f"cell ({r}, {c}) is {value!r}, not an integer"
      if not 0 <= int(value) <= 9:
        return f"cell ({r}, {c}) is {int(value)}, outside 0..9"
  return None


def validate_submission(submission: Any, tasks: Sequence[Task]) -> None:
  """Checks ``submission`` against the Kaggle schema for ``tasks``; raises ValueError if not.

  Every task id must be present (and no other), with exactly one entry per test input, each a
  dict holding valid ``attempt_1`` and ``attempt_2`` grids. The message names the task id, the
  test index and the attempt at fault.
  """
  if not isinstance(submission, dict):
    raise ValueError(f"submission is a {type(submission).__name__}, expected a dict of task ids")
  expected = {task.id for task in tasks}
  for task_id in submission:
    if task_id not in expected:
      raise ValueError(f"submission has unexpected task id {task_id!r}")
  for task in tasks:
    if task.id not in submission:
      raise ValueError(f"submission is missing task {task.id!r}")
    entries = submission[task.id]
    if not isinstance(entries, list):
      raise ValueError(
          f"submission task {task.id!r}: expected a list of {len(task.test)} test entries, "
          f"got a {type(entries).__name__}")
    if len(entries) != len(task.test):
      raise ValueError(
          f"submission task {task.id!r}: {len(entries)} test entries, expected {len(task.test)}")
    for index, entry in enumerate(entries):
      if not isinstance(entry, dict):
        raise ValueError(
            f"submission task {task.id!r} test {index}: entry is a {type(entry).__name__}, "
            "expected a dict with attempt_1 and attempt_2")
      for attempt in ATTEMPTS:
        if attempt not in entry:
          raise ValueError(f"submission task {task.id!r} test {index}: {attempt} is missing")
        problem = grid_problem(entry[attempt])
        if problem is not None:
          raise ValueError(f"submission task {task.id!r} test {index} {attempt}: {problem}")


def grids_equal(attempt: Any, target: np.ndarray) -> bool:
  """Exact match of a submitted grid (list of lists) with a target [h, w]: shape and values.

  A malformed attempt matches nothing rather than raising, so scoring a bad submission gives
  it no credit for that grid.
  """
  if grid_problem(attempt) is not None:
    return False
  attempt_hw = np.asarray(attempt, dtype=np.int64)
  target_hw = np.asarray(target)
  return attempt_hw.shape == target_hw.shape and bool(np.array_equal(attempt_hw, target_hw))


def score_submission(submission: dict, tasks: Sequence[Task]) -> dict:
  """The official ARC score of ``submission`` on ``tasks`` (all of which must have solutions).

  Returns ``score`` (= ``pass@2``: mean over tasks of the fraction of test outputs matched by
  either attempt), ``pass@1`` (the same with ``attempt_1`` alone), ``num_tasks`` and
  ``per_task`` {task id: fraction by either attempt}. Raises ValueError when a task has no
  solution for some test input, or the submission lacks a task or a test entry.
  """
  if not tasks:
    raise ValueError("score_submission: no tasks to score")
  per_task: dict[str, float] = {}
  per_task_1: dict[str, float] = {}
  for task in tasks:
    for index, (_, target) in enumerate(task.test):
      if target is None:
        raise ValueError(
            f"task {task.id!r} test {index} has no solution; it cannot be scored")
    entries = submission.get(task.id)
    if entries is None:
      raise ValueError(f"submission is missing task {task.id!r}")
    if len(entries) != len(task.test):
      raise ValueError(
          f"submission task {task.id!r}: {len(entries)} test entries, expected {len(task.test)}")
    hits_2 = hits_1 = 0
    for entry, (_, target) in zip(entries, task.test):
      first = grids_equal(entry.get("attempt_1"), target)
      hits_1 += first
      hits_2 += first or grids_equal(entry.get("attempt_2"), target)
    per_task[task.id] = hits_2 / len(task.test)
    per_task_1[task.id] = hits_1 / len(task.test)
  score = float(np.mean(list(per_task.values())))
  return {
      "score": score,
      "pass@1": float(np.mean(list(per_task_1.values()))),
      "pass@2": score,
      "num_tasks": len(tasks),
      "per_task": per_task,
  }


def has_solutions(tasks: Sequence[Task]) -> bool:
  """Whether every test input of every task has a known output."""
  return all(out is not None for task in tasks for _, out in task.test)
