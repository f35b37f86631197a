"""Task loading, validation errors, skip_bad, leakage guard and the size filter."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from onn_jax.data.tasks import (DataError, Task, TaskList, filter_max_grid, load_tasks,
                                remove_leaked)

GOOD = {"train": [{"input": [[1, 2], [3, 4]], "output": [[4, 3], [2, 1]]},
                  {"input": [[0]], "output": [[5]]}],
        "test": [{"input": [[7, 8, 9]], "output": [[9, 8, 7]]}]}


def _bad(mutate):
  task = json.loads(json.dumps(GOOD))
  mutate(task)
  return task


MALFORMED = {
    "ragged": (_bad(lambda t: t["train"][0].__setitem__("input", [[1, 2], [3]])),
               "train[0].input: ragged rows"),
    "colour10": (_bad(lambda t: t["test"][0].__setitem__("input", [[1, 10, 2]])),
                 "test[0].input: colour 10 at (0, 1) is outside 0..9"),
    "big": (_bad(lambda t: t["train"][1].__setitem__("output", [[0] * 31] * 31)),
            "train[1].output: grid is 31x31, more than 30 per side"),
    "notest": (_bad(lambda t: t.__setitem__("test", [])), "no test input"),
    "nodemo": (_bad(lambda t: t.pop("train")), "no demonstration pairs"),
    "float": (_bad(lambda t: t["train"][0].__setitem__("output", [[1.5, 2], [3, 4]])),
              "train[0].output: grid cells are not integers"),
    "emptygrid": (_bad(lambda t: t["train"][0].__setitem__("input", [])),
                  "train[0].input: grid is not a non-empty list of rows"),
    "nooutput": (_bad(lambda t: t["train"][0].pop("output")), "train[0]: no 'output' grid"),
    "trainobject": (_bad(lambda t: t.__setitem__("train", t["train"][0])),
                    "'train' is not a list (got dict)"),
}


def _write(path, obj):
  with open(path, "w") as f:
    json.dump(obj, f)
  return str(path)


@pytest.fixture(scope="module")
def arc1_eval():
  return load_tasks("arc-agi-1", "evaluation")


def test_bundled_sources_load_sorted_int32(arc1_eval):
  compact = load_tasks("arc-agi-1:evaluation")
  assert isinstance(arc1_eval, TaskList) and arc1_eval.skipped == []
  assert len(arc1_eval) == 400 and [t.id for t in compact] == [t.id for t in arc1_eval]
  ids = [t.id for t in arc1_eval]
  assert ids == sorted(ids)
  for task in arc1_eval[:20]:
    assert task.train and task.test
    for i, o in task.train + task.test:
      assert i.dtype == np.int32 and o.dtype == np.int32 and i.ndim == 2


def test_bundled_source_errors():
  with pytest.raises(DataError, match="needs a split"):
    load_tasks("arc-agi-1")
  with pytest.raises(DataError, match="split 'dev' is not one of training, evaluation"):
    load_tasks("arc-agi-2:dev")
  with pytest.raises(DataError, match="names split 'training' but split='evaluation'"):
    load_tasks("arc-agi-1:training", "evaluation")
  with pytest.raises(DataError, match="'nowhere/x' is not arc-agi-1"):
    load_tasks("nowhere/x")


def test_folder_source(tmp_path):
  _write(tmp_path / "bbb.json", GOOD)
  task_a = json.loads(json.dumps(GOOD))
  del task_a["test"][0]["output"]
  _write(tmp_path / "aaa.json", task_a)
  (tmp_path / "notes.txt").write_text("ignored")
  tasks = load_tasks(str(tmp_path))
  assert [t.id for t in tasks] == ["aaa", "bbb"]
  assert tasks[0].test[0][1] is None
  np.testing.assert_array_equal(tasks[1].test[0][1], [[9, 8, 7]])
  np.testing.assert_array_equal(tasks[1].train[0][0], [[1, 2], [3, 4]])
  # A split names a sub-folder.
  os.makedirs(tmp_path / "training")
  _write(tmp_path / "training" / "ccc.json", GOOD)
  assert [t.id for t in load_tasks(str(tmp_path), "training")] == ["ccc"]
  with pytest.raises(DataError, match="no sub-folder 'evaluation'"):
    load_tasks(str(tmp_path), "evaluation")


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_task_names_file_task_and_reason(tmp_path, case):
  task, reason = MALFORMED[case]
  path = _write(tmp_path / "t01.json", task)
  with pytest.raises(DataError) as err:
    load_tasks(str(tmp_path))
  message = str(err.value)
  assert "\n" not in message
  assert message.startswith(f"{path}: task t01: ") and reason in message, message


def test_invalid_json_names_the_file(tmp_path):
  path = tmp_path / "broken.json"
  path.write_text('{"train": [')
  with pytest.raises(DataError, match=r"broken\.json: invalid JSON \(line 1"):
    load_tasks(str(tmp_path))
  with pytest.raises(DataError, match=r"broken\.json: invalid JSON"):
    load_tasks(str(path))  # as a challenges file


def test_skip_bad_counts_and_lists(tmp_path):
  _write(tmp_path / "good.json", GOOD)
  for case in ("ragged", "colour10", "big", "notest"):
    _write(tmp_path / f"{case}.json", MALFORMED[case][0])
  (tmp_path / "broken.json").write_text("not json")
  with pytest.raises(DataError):
    load_tasks(str(tmp_path))
  tasks = load_tasks(str(tmp_path), skip_bad=True)
  assert [t.id for t in tasks] == ["good"]
  assert len(tasks.skipped) == 5
  reasons = dict((os.path.basename(w.split(":")[0]), r) for w, r in tasks.skipped)
  assert reasons["broken.json"].startswith("invalid JSON")
  assert reasons["ragged.json"].startswith("ragged rows")
  assert reasons["big.json"] == "grid is 31x31, more than 30 per side"
  # Each skipped task's test inputs as far as they can be read (evaluation answers them).
  readable = {k: [None if g is None else g.tolist() for g in v]
              for k, v in tasks.malformed_tests.items()}
  assert readable == {"ragged": [[[7, 8, 9]]], "big": [[[7, 8, 9]]], "colour10": [None],
                      "notest": [], "broken": []}


def test_challenges_with_solutions_beside_given_and_missing(tmp_path):
  challenges = json.loads(json.dumps(  # (a copy: GOOD stays as it is for the other tests)
      {"t2": GOOD, "t1": {"train": GOOD["train"], "test": [{"input": [[1]]},
                                                          {"input": [[2, 2]]}]}}))
  for task in challenges.values():
    for pair in task["test"]:
      pair.pop("output", None)
  path = _write(tmp_path / "x_challenges.json", challenges)
  # No solutions anywhere: test outputs are None.
  tasks = load_tasks(path)
  assert [t.id for t in tasks] == ["t1", "t2"]
  assert all(o is None for t in tasks for _, o in t.test)
  # Solutions found beside the challenges file.
  solutions = {"t1": [[[3]], [[4, 4]]], "t2": [[[9, 8, 7]]]}
  _write(tmp_path / "x_solutions.json", solutions)
  tasks = load_tasks(path)
  np.testing.assert_array_equal(tasks[0].test[1][1], [[4, 4]])
  np.testing.assert_array_equal(tasks[1].test[0][1], [[9, 8, 7]])
  # Solutions given explicitly, and a given-but-missing file.
  other = _write(tmp_path / "other.json", {"t1": [[[5]], [[6, 6]]], "t2": [[[1, 1, 1]]]})
  assert load_tasks(path, solutions=other)[0].test[0][1].tolist() == [[5]]
  missing = str(tmp_path / "nope_solutions.json")
  with pytest.raises(DataError, match=f"{missing}: solutions file not found"):
    load_tasks(path, solutions=missing)
  # Solution count must match the test inputs; a task without solutions is an error.
  _write(tmp_path / "x_solutions.json", {"t1": [[[3]]], "t2": [[[9, 8, 7]]]})
  with pytest.raises(DataError, match="x_solutions.json: task t1: 1 solutions for 2 test inputs"):
    load_tasks(path)
  # A bad solution grid names the solutions file, not the challenges file.
  _write(tmp_path / "x_solutions.json", {"t1": [[[3]], [[11]]], "t2": [[[9, 8, 7]]]})
  with pytest.raises(DataError, match=r"x_solutions.json: task t1: solution\[1\]: colour 11"):
    load_tasks(path)
  _write(tmp_path / "x_solutions.json", {"t2": [[[9, 8, 7]]]})
  with pytest.raises(DataError, match="x_solutions.json: task t1: no solutions for this task"):
    load_tasks(path)
  assert [t.id for t in load_tasks(path, skip_bad=True)] == ["t2"]
  # A file named challenges.json finds solutions.json; one named otherwise finds none.
  plain = _write(tmp_path / "challenges.json", challenges)
  assert load_tasks(plain)[0].test[0][1] is None
  _write(tmp_path / "solutions.json", solutions)
  assert load_tasks(plain)[0].test[1][1].tolist() == [[4, 4]]
  assert load_tasks(_write(tmp_path / "mine.json", challenges))[0].test[0][1] is None
  # The suffixes in another case, as *.JSON files are read: X_Challenges.JSON's solutions are
  # X_Solutions.JSON (found however the suffix is written; the name before it as it stands).
  (tmp_path / "upper").mkdir()
  shouting = _write(tmp_path / "upper" / "X_Challenges.JSON", challenges)
  _write(tmp_path / "upper" / "Y_Solutions.JSON", {"t1": [[[7]], [[7, 7]]], "t2": [[[7]]]})
  assert load_tasks(shouting)[0].test[0][1] is None  # another name before the suffix
  _write(tmp_path / "upper" / "X_Solutions.JSON", solutions)
  assert load_tasks(shouting)[0].test[1][1].tolist() == [[4, 4]]
  # A challenges file without tasks is an error, as an empty folder is.
  with pytest.raises(DataError, match=r"empty_challenges.json: challenges file holds no tasks"):
    load_tasks(_write(tmp_path / "empty_challenges.json", {}))


def test_a_key_given_twice_is_an_error_not_the_last_value(tmp_path):
  """JSON keeps the last of two equal keys: a task id written twice in a challenges file (or a
  pair's "input" twice) would lose a task or a grid without a word. It is a one-line error
  naming the file and the key, or a skipped (and named) file with data.skip_bad."""
  text = '{"aa01": %s, "bb02": %s, "aa01": %s}' % ((json.dumps(GOOD),) * 3)
  path = tmp_path / "dup_challenges.json"
  path.write_text(text)
  with pytest.raises(DataError, match=r"dup_challenges.json: key 'aa01' appears twice"):
    load_tasks(str(path))
  folder = tmp_path / "folder"
  folder.mkdir()
  (folder / "good.json").write_text(json.dumps(GOOD))
  pair = '{"input": [[1]], "input": [[2]], "output": [[3]]}'
  (folder / "twice.json").write_text('{"train": [%s], "test": [%s]}' % (pair, pair))
  with pytest.raises(DataError, match=r"twice.json: key 'input' appears twice"):
    load_tasks(str(folder))
  tasks = load_tasks(str(folder), skip_bad=True)
  assert [t.id for t in tasks] == ["good"] and len(tasks.skipped) == 1


def test_a_folder_reads_json_files_whatever_the_case_of_the_suffix(tmp_path):
  (tmp_path / "upper.JSON").write_text(json.dumps(GOOD))
  (tmp_path / "lower.json").write_text(json.dumps(GOOD))
  (tmp_path / "notes.txt").write_text("not a task")
  assert [t.id for t in load_tasks(str(tmp_path))] == ["lower", "upper"]


def test_odd_sources_and_files_are_read_or_named(tmp_path):
  """One task file given as a source is its task (it was read as a challenges file: an error
  about a task named "train", or under skip_bad phantom tasks "train" and "test"); a folder
  named like a task file is not one; a file named ".json" has no id to answer under; a
  byte-order mark is read past; JSON nested too deeply is one line."""
  path = _write(tmp_path / "mytask.json", GOOD)
  tasks = load_tasks(path)
  assert [t.id for t in tasks] == ["mytask"] and len(tasks[0].train) == 2
  assert tasks[0].test[0][1].tolist() == [[9, 8, 7]]
  with pytest.raises(DataError, match="mytask.json: a task file, not a challenges JSON"):
    load_tasks(path, solutions=path)
  folder = tmp_path / "f"
  folder.mkdir()
  _write(folder / "a.json", GOOD)
  (folder / "sub.json").mkdir()
  assert [t.id for t in load_tasks(str(folder))] == ["a"]
  _write(folder / ".json", GOOD)
  with pytest.raises(DataError, match=r"\.json: an empty task id"):
    load_tasks(str(folder))
  loaded = load_tasks(str(folder), skip_bad=True)
  assert [t.id for t in loaded] == ["a"] and len(loaded.skipped) == 1
  assert "" not in loaded.malformed_tests
  os.remove(folder / ".json")
  with open(folder / "b.json", "w", encoding="utf-8-sig") as f:
    json.dump(GOOD, f)
  assert [t.id for t in load_tasks(str(folder))] == ["a", "b"]
  with open(folder / "c.json", "w") as f:
    f.write('{"train": ' + "[" * 100_000 + "]" * 100_000 + ', "test": []}')
  with pytest.raises(DataError, match=r"c.json: invalid JSON \(nested too deeply\)$"):
    load_tasks(str(folder))
  challenges = _write(tmp_path / "x_challenges.json", {"": GOOD})
  with pytest.raises(DataError, match="task '': an empty task id"):
    load_tasks(challenges)


def test_solutions_that_disagree_or_go_unused_are_said(tmp_path):
  """A solution that differs from an output the challenges file gives is an error (it replaced
  it silently); solutions for ids the challenges file lacks are a note, not dropped unsaid."""
  challenges = _write(tmp_path / "x_challenges.json", {"t1": GOOD})
  solution = GOOD["test"][0]["output"]
  _write(tmp_path / "x_solutions.json", {"t1": [solution], "t2": [solution], "t3": [[[1]]]})
  tasks = load_tasks(challenges)
  assert [t.id for t in tasks] == ["t1"]
  assert tasks.notes == [f"{tmp_path / 'x_solutions.json'}: 2 solutions for task ids that "
                         f"{challenges} does not hold, not used (t2, t3)"]
  _write(tmp_path / "x_solutions.json", {"t1": [[[1, 2]]]})
  with pytest.raises(DataError, match=r"x_solutions.json: task t1: solution\[0\] differs from "
                     r"the output of test\[0\] in .*x_challenges.json"):
    load_tasks(challenges)


def test_leakage_guard_arc2_training_vs_arc1_evaluation(arc1_eval):
  arc2_train = load_tasks("arc-agi-2", "training")
  kept, removed = remove_leaked(arc2_train, arc1_eval)
  print(f"leakage guard: {len(removed)} of {len(arc2_train)} ARC-AGI-2 training tasks removed "
        f"as leaked from ARC-AGI-1 evaluation")
  assert len(kept) + len(removed) == len(arc2_train)
  assert len(removed) > 100
  eval_ids = {t.id for t in arc1_eval}
  assert not any(t.id in eval_ids for t in kept)
  # Every removed task really overlaps: by id or by an identical (input, output) pair.
  eval_pairs = {(i.tobytes(), i.shape, o.tobytes(), o.shape) for t in arc1_eval
                for i, o in t.train + t.test}
  for task in removed:
    assert task.id in eval_ids or any((i.tobytes(), i.shape, o.tobytes(), o.shape) in eval_pairs
                                      for i, o in task.train + task.test)


def test_leakage_guard_catches_renamed_content():
  g = lambda v: np.array(v, np.int32)  # noqa: E731
  evaluation = [Task("e1", [(g([[1]]), g([[2]]))], [(g([[3]]), g([[4]]))])]
  train = [Task("e1", [(g([[7]]), g([[7]]))], [(g([[7]]), None)]),  # same id
           Task("r1", [(g([[0]]), g([[0]]))], [(g([[3]]), g([[4]]))]),  # eval test pair
           Task("r2", [(g([[1]]), g([[2]]))], [(g([[0]]), None)]),  # eval demo pair
           Task("ok", [(g([[1]]), g([[3]]))], [(g([[3]]), g([[5]]))]),  # inputs alone shared
           Task("ok2", [(g([[1, 2]]), g([[2]]))], [(g([[4]]), None)])]
  kept, removed = remove_leaked(train, evaluation)
  assert [t.id for t in kept] == ["ok", "ok2"]
  assert [t.id for t in removed] == ["e1", "r1", "r2"]


def test_filter_max_grid():
  small = Task("s", [(np.zeros((3, 5), np.int32), np.zeros((5, 3), np.int32))],
               [(np.zeros((2, 2), np.int32), None)])
  wide_out = Task("w", [(np.zeros((3, 3), np.int32), np.zeros((3, 3), np.int32))],
                  [(np.zeros((2, 2), np.int32), np.zeros((1, 6), np.int32))])
  assert [t.id for t in filter_max_grid([small, wide_out], 5)] == ["s"]
  assert [t.id for t in filter_max_grid([small, wide_out], 6)] == ["s", "w"]
  assert filter_max_grid([small, wide_out], 4) == []


def test_tasks_with_the_same_pairs_in_another_demonstration_order_are_the_same():
  """ARC-AGI-2 holds many ARC-AGI-1 tasks with their demonstrations in another order: the same
  task (a join that gives both keeps one, evaluation included); another pair is not."""
  from onn_jax.data.tasks import same_contents
  task = load_tasks("arc-agi-1:training")[0]
  assert same_contents(task, Task("x", task.train[::-1], task.test))
  assert not same_contents(task, Task("x", task.train[1:], task.test))
  flipped = [(i, o[::-1]) for i, o in task.test]
  assert not same_contents(task, Task("x", task.train, flipped)) or all(
      (o == o[::-1]).all() for _, o in task.test)
  from onn_jax.data.pipeline import load_joined
  _, duplicates = load_joined("arc-agi-1:evaluation+arc-agi-2:evaluation", False)
  assert duplicates and all(d.same for d in duplicates)  # (refused before, by order alone)
