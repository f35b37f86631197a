"""Serialisation: exact roundtrip on all of ARC, layout, loss masks, fit, decode, leave-one-out."""

from __future__ import annotations

import numpy as np
import pytest

from onn_jax.data.serialize import (Example, decode_grid, encode_grid, fit, leave_one_out,
                                    parse_sequence, sequence_length, serialize)
from onn_jax.data.tasks import Task, load_tasks
from onn_jax.data.tokens import BOS, END, IN, NEWLINE, OUT, PAD

SOURCES = ["arc-agi-1:training", "arc-agi-1:evaluation", "arc-agi-2:training",
           "arc-agi-2:evaluation"]


def _grid(rows) -> np.ndarray:
  return np.array(rows, np.int32)


A, B = _grid([[1, 2, 3], [4, 5, 6]]), _grid([[7], [8]])
C, D = _grid([[0]]), _grid([[9, 9]])
T_IN, T_OUT = _grid([[3, 0], [0, 3], [1, 1]]), _grid([[2, 2, 2]])


@pytest.mark.parametrize("source", SOURCES)
def test_every_arc_task_roundtrips(source):
  tasks = load_tasks(source)
  checked = 0
  for task in tasks:
    for k, (test_in, test_out) in enumerate(task.test):
      ex = serialize(task.train, test_in, test_out, task_id=task.id, test_index=k)
      assert len(ex.tokens) == sequence_length(task.train, test_in, test_out)
      demos, got_in, got_out = parse_sequence(ex.tokens)
      assert len(demos) == len(task.train)
      for (i, o), (gi, go) in zip(task.train, demos):
        np.testing.assert_array_equal(gi, i)
        np.testing.assert_array_equal(go, o)
      np.testing.assert_array_equal(got_in, test_in)
      np.testing.assert_array_equal(got_out, test_out)
      np.testing.assert_array_equal(decode_grid(ex.tokens[ex.answer_start:]), test_out)
      checked += 1
  assert checked >= len(tasks)


def test_layout_and_answer_mask():
  ex = serialize([(A, B)], T_IN, T_OUT, task_id="x", test_index=1)
  expected = ([BOS, IN] + [1, 2, 3, NEWLINE, 4, 5, 6, NEWLINE] + [OUT] + [7, NEWLINE, 8, NEWLINE]
              + [IN] + [3, 0, NEWLINE, 0, 3, NEWLINE, 1, 1, NEWLINE] + [OUT]
              + [2, 2, 2, NEWLINE, END])
  assert ex.tokens.dtype == np.int32 and ex.tokens.tolist() == expected
  assert encode_grid(A) == [1, 2, 3, NEWLINE, 4, 5, 6, NEWLINE]
  assert ex.answer_len == 5 and ex.answer_start == len(expected) - 5
  assert ex.tokens[ex.answer_start - 1] == OUT
  assert np.flatnonzero(ex.loss_mask).tolist() == list(range(ex.answer_start, len(expected)))
  assert (ex.task_id, ex.test_index) == ("x", 1)


def test_outputs_mask_covers_every_output_grid_but_no_marker():
  ex = serialize([(A, B), (C, D)], T_IN, T_OUT, loss_on="outputs")
  toks = ex.tokens.tolist()
  # Output grids are the runs right after each OUT, up to the next IN/END (END included).
  expected = np.zeros(len(toks), bool)
  for pos in np.flatnonzero(ex.tokens == OUT):
    j = pos + 1
    while j < len(toks) and toks[j] not in (IN,):
      expected[j] = True
      j += 1
  assert np.array_equal(ex.loss_mask, expected)
  assert not ex.loss_mask[np.isin(ex.tokens, [BOS, IN, OUT])].any()
  with pytest.raises(ValueError, match="loss_on 'all' is not one of answer, outputs"):
    serialize([(A, B)], T_IN, T_OUT, loss_on="all")


def test_prompt_without_answer():
  ex = serialize([(A, B)], T_IN)
  assert ex.tokens[-1] == OUT and ex.answer_len == 0 and ex.answer_start == len(ex.tokens)
  assert not ex.loss_mask.any()
  demos, test_in, test_out = parse_sequence(ex.tokens)
  assert test_out is None and np.array_equal(test_in, T_IN) and len(demos) == 1
  # Trailing padding is ignored by parse_sequence.
  padded = np.concatenate([serialize([(A, B)], T_IN, T_OUT).tokens, np.full(4, PAD, np.int32)])
  assert np.array_equal(parse_sequence(padded)[2], T_OUT)


def test_fit_drops_trailing_demos():
  demos = [(A, B), (C, D), (A, A), (C, C)]
  full = serialize(demos, T_IN, T_OUT)
  assert fit(demos, T_IN, T_OUT, len(full.tokens)).tokens.tolist() == full.tokens.tolist()
  for keep in range(1, len(demos) + 1):
    exact = sequence_length(demos[:keep], T_IN, T_OUT)
    ex = fit(demos, T_IN, T_OUT, exact, loss_on="outputs", task_id="t")
    assert len(parse_sequence(ex.tokens)[0]) == keep and len(ex.tokens) == exact
    assert ex.task_id == "t" and ex.loss_mask.sum() > ex.answer_len  # kw reached serialize
    if keep < len(demos):  # one token short of the next demo still keeps `keep`
      ex = fit(demos, T_IN, T_OUT, sequence_length(demos[:keep + 1], T_IN, T_OUT) - 1)
      assert len(parse_sequence(ex.tokens)[0]) == keep
  assert fit(demos, T_IN, T_OUT, sequence_length(demos[:1], T_IN, T_OUT) - 1) is None


GOOD_GRIDS = [_grid([[5]]), A, B, _grid(np.arange(30 * 30).reshape(30, 30) % 10)]


@pytest.mark.parametrize("grid", GOOD_GRIDS, ids=lambda g: "x".join(map(str, g.shape)))
def test_decode_grid_roundtrips(grid):
  tokens = encode_grid(grid) + [END, 3, PAD, PAD]  # anything after END is ignored
  out = decode_grid(tokens)
  assert out.dtype == np.int32 and np.array_equal(out, grid)
  assert np.array_equal(decode_grid(np.array(tokens, np.int64)), grid)


BAD_GENERATIONS = {
    "no END": [1, 2, NEWLINE, 3, 4, NEWLINE],
    "empty": [END],
    "only newline": [NEWLINE, END],
    "ragged rows": [1, 2, NEWLINE, 3, NEWLINE, END],
    "empty row": [1, NEWLINE, NEWLINE, END],
    "row not closed": [1, 2, NEWLINE, 3, 4, END],
    "PAD inside": [1, PAD, NEWLINE, END],
    "OUT inside": [1, 2, NEWLINE, OUT, 3, 4, NEWLINE, END],
    "BOS inside": [BOS, 1, NEWLINE, END],
    "negative": [-1, NEWLINE, END],
    "out of vocab": [99, NEWLINE, END],
    "31 wide": [1] * 31 + [NEWLINE, END],
    "31 tall": [1, NEWLINE] * 31 + [END],
    "2-D input": [[1, NEWLINE, END]],
    "float tokens": [1.0, float(NEWLINE), float(END)],
    "not numbers": ["a", "b"],
}


@pytest.mark.parametrize("case", sorted(BAD_GENERATIONS))
def test_decode_grid_rejects_malformed(case):
  assert decode_grid(BAD_GENERATIONS[case]) is None


def test_parse_sequence_rejects_non_sequences():
  good = serialize([(A, B)], T_IN, T_OUT).tokens
  with pytest.raises(ValueError, match="does not start with BOS"):
    parse_sequence(good[1:])
  with pytest.raises(ValueError, match="markers"):
    parse_sequence(np.delete(good, np.flatnonzero(good == OUT)[0]))
  with pytest.raises(ValueError, match="tokens after END"):
    parse_sequence(np.append(good, 3))
  with pytest.raises(ValueError, match="malformed grid"):
    parse_sequence(np.delete(good, 4))  # drops a colour from A's first row: ragged


def test_leave_one_out_never_contains_test_outputs():
  rng = np.random.default_rng(0)
  # Test grids use colour 9 only; demos never do, so any 9 in a sequence is a leak.
  demos = [(rng.integers(0, 9, (2, 3)).astype(np.int32),
            rng.integers(0, 9, (3, 2)).astype(np.int32)) for _ in range(4)]
  task = Task("t", demos, [(np.full((2, 2), 9, np.int32), np.full((3, 3), 9, np.int32))])
  loo = leave_one_out(task)
  assert [t.id for t in loo] == ["t/loo0", "t/loo1", "t/loo2", "t/loo3"]
  for i, sub in enumerate(loo):
    assert len(sub.test) == 1 and sub.test[0][0] is demos[i][0] and sub.test[0][1] is demos[i][1]
    assert [p[0] is q[0] for p, q in zip(sub.train, demos[:i] + demos[i + 1:])] == [True] * 3
    ex = serialize(sub.train, *sub.test[0], loss_on="outputs")
    assert not np.any(ex.tokens == 9)
  assert leave_one_out(Task("one", demos[:1], task.test)) == []


def test_example_fields_are_arrays():
  ex = serialize([(A, B)], T_IN, T_OUT)
  assert isinstance(ex, Example)
  assert ex.loss_mask.dtype == bool and ex.loss_mask.shape == ex.tokens.shape
