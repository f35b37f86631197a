"""Building and writing a Kaggle ``submission.json`` from ranked candidate grids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

EMPTY_GRID = [[0]]  # what an attempt holds when no candidate exists: valid, and scores nothing


def grid_to_list(grid: np.ndarray) -> list[list[int]]:
  """An [h, w] integer array as a list of rows of plain Python ints (JSON-ready)."""
  return [[int(v) for v in row] for row in np.asarray(grid)]


def build_submission(ranked: dict[str, Sequence[Sequence[np.ndarray]]]) -> dict:
  """task id -> per test input a ranked candidate list (best first) -> the Kaggle dict.

  ``attempt_1`` is the best candidate and ``attempt_2`` the second; with a single candidate
  ``attempt_2`` repeats it, and with none both are the 1x1 grid ``[[0]]``, so every test input
  always carries both attempts.
  """
  submission: dict[str, list[dict]] = {}
  for task_id, per_test in ranked.items():
    entries = []
    for candidates in per_test:
      grids = [grid_to_list(c) for c in list(candidates)[:2]]
      if not grids:
        grids = [EMPTY_GRID]
      if len(grids) == 1:
        grids.append(grids[0])
      entries.append({"attempt_1": [list(r) for r in grids[0]],
                      "attempt_2": [list(r) for r in grids[1]]})
    submission[task_id] = entries
  return submission


def write_submission(submission: dict, path: str | Path) -> Path:
  """Writes ``submission`` as JSON to ``path`` (parents created); returns the path."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w") as f:
    json.dump(submission, f, separators=(",", ":"))
  return path
