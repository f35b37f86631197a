"""The official ARC scorer, the submission schema check and submission building."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from onn_jax.data.tasks import Task
from onn_jax.evaluation.scoring import score_submission, validate_submission
from onn_jax.evaluation.submission import build_submission, write_submission

A = np.array([[1, 2], [3, 4]])
B = np.array([[5, 5, 5]])
C = np.array([[7], [8], [9]])
D = np.array([[0, 1], [1, 0]])


def _task(task_id: str, outputs: list) -> Task:
  return Task(id=task_id, train=[(A, A)], test=[(A, o) for o in outputs])


@pytest.fixture
def tasks() -> list[Task]:
  return [_task("t1", [A]), _task("t2", [B, C]), _task("t3", [D])]


def _entry(a1, a2) -> dict:
  return {"attempt_1": np.asarray(a1).tolist(), "attempt_2": np.asarray(a2).tolist()}


def test_score_partial_credit_shapes_and_attempt_2(tasks):
  submission = {
      "t1": [_entry(A, D)],  # attempt_1 right
      # test 0: right values, wrong shape (B as a column) -> miss; test 1: attempt_2 right.
      "t2": [_entry(B.T, B.reshape(3, 1)), _entry(A, C)],
      "t3": [_entry(D.T[:1], A)],  # a truncated grid: miss
  }
  result = score_submission(submission, tasks)
  assert result["per_task"] == {"t1": 1.0, "t2": 0.5, "t3": 0.0}
  assert result["score"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
  assert result["pass@2"] == result["score"]
  # attempt_1 alone: only t1.
  assert result["pass@1"] == pytest.approx(1.0 / 3)
  assert result["num_tasks"] == 3


def test_score_all_correct_and_order_matters(tasks):
  perfect = {t.id: [_entry(o, o) for _, o in t.test] for t in tasks}
  assert score_submission(perfect, tasks)["score"] == 1.0
  swapped = copy.deepcopy(perfect)
  swapped["t2"] = swapped["t2"][::-1]  # test outputs in the wrong order
  assert score_submission(swapped, tasks)["per_task"]["t2"] == 0.0


def test_score_malformed_attempt_scores_nothing(tasks):
  submission = {t.id: [_entry(o, o) for _, o in t.test] for t in tasks}
  submission["t1"] = [{"attempt_1": [[1, 2], [3]], "attempt_2": [[1.0, 2.0], [3.0, 4.0]]}]
  assert score_submission(submission, tasks)["per_task"]["t1"] == 0.0


def test_score_without_solutions_raises(tasks):
  unsolved = tasks + [Task(id="hidden", train=[(A, A)], test=[(A, None)])]
  submission = {t.id: [_entry(A, A) for _ in t.test] for t in unsolved}
  with pytest.raises(ValueError, match="'hidden' test 0 has no solution"):
    score_submission(submission, unsolved)


def test_validate_accepts_good_submission(tasks):
  submission = {t.id: [_entry(o, A) for _, o in t.test] for t in tasks}
  validate_submission(submission, tasks)
  validate_submission(json.loads(json.dumps(submission)), tasks)


def _set(attempt: str, value):
  return lambda s: s["t1"][0].__setitem__(attempt, value)


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s.pop("t3"), "missing task 't3'"),
    (lambda s: s.__setitem__("extra", []), "unexpected task id 'extra'"),
    (lambda s: s["t2"].pop(), "'t2': 1 test entries, expected 2"),
    (lambda s: s.__setitem__("t1", {"attempt_1": [[1]]}), "'t1': expected a list"),
    (lambda s: s["t2"].__setitem__(1, [[1]]), "'t2' test 1: entry is a list"),
    (lambda s: s["t2"][1].pop("attempt_2"), "'t2' test 1: attempt_2 is missing"),
    (_set("attempt_1", []), "'t1' test 0 attempt_1: grid has no rows"),
    (_set("attempt_1", [[]]), "row 0 is empty"),
    (_set("attempt_2", [[1, 2], [3]]), "row 1 has length 1, expected 2"),
    (_set("attempt_1", [[1, 10]]), r"cell \(0, 1\) is 10, outside 0..9"),
    (_set("attempt_1", [[-1]]), "outside 0..9"),
    (_set("attempt_1", [[1.0]]), r"cell \(0, 0\) is 1.0, not an integer"),
    (_set("attempt_1", [[True]]), "not an integer"),
    (_set("attempt_1", "[[1]]"), "grid is a str"),
    (_set("attempt_1", [1, 2]), "row 0 is a int"),
])
def test_validate_rejects(tasks, mutate, message):
  submission = {t.id: [_entry(o, A) for _, o in t.test] for t in tasks}
  mutate(submission)
  with pytest.raises(ValueError, match=message):
    validate_submission(submission, tasks)


def test_validate_rejects_non_dict(tasks):
  with pytest.raises(ValueError, match="submission is a list"):
    validate_submission([], tasks)


def test_build_submission_fills_attempts(tasks, tmp_path):
  ranked = {"t1": [[A, D, B]], "t2": [[B], []], "t3": [[]]}
  submission = build_submission(ranked)
  assert submission["t1"] == [_entry(A, D)]
  assert submission["t2"][0] == _entry(B, B)  # one candidate: repeated
  assert submission["t2"][1] == _entry([[0]], [[0]])  # none: 1x1 grids
  assert submission["t3"] == [_entry([[0]], [[0]])]
  validate_submission(submission, tasks)
  path = write_submission(submission, tmp_path / "sub" / "submission.json")
  loaded = json.loads(path.read_text())
  assert loaded == submission
  result = score_submission(loaded, tasks)
  assert result["per_task"] == {"t1": 1.0, "t2": 0.5, "t3": 0.0}
  assert all(type(v) is int for row in loaded["t1"][0]["attempt_1"] for v in row)
