"""Whole-task serialisation of ARC tasks into token sequences, and back.

A task with demonstrations (x_1, y_1) .. (x_n, y_n) and test input x* becomes

    BOS  IN x_1 OUT y_1  ...  IN x_n OUT y_n  IN x*  OUT  y* END

where a grid is its rows of colour tokens, each row closed by NEWLINE (so an h x w grid takes
h * (w + 1) tokens). The answer is y*'s tokens followed by END; without y* the sequence stops
right after the final OUT (a prompt for generation). Vocabulary: :mod:`onn_jax.data.tokens`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from onn_jax.data.tasks import MAX_SIDE, Grid, Task
from onn_jax.data.tokens import BOS, END, IN, NEWLINE, NUM_COLORS, OUT, PAD

Pair = tuple[Grid, Grid]
LOSS_ON = ("answer", "outputs")
LOO_TAG = "/loo"


@dataclasses.dataclass
class Example:
  """One serialised sequence.

  tokens: int32 [L], no padding.
  loss_mask: bool [L], True where the token is a supervised target (answer tokens incl. END;
    with loss_on="outputs" also every demo output grid's tokens, never the IN/OUT markers).
  answer_start: index of the first answer token (the one right after the final OUT).
  answer_len: answer tokens incl. END; 0 when the answer is unknown (a prompt).
  """
  tokens: np.ndarray
  loss_mask: np.ndarray
  answer_start: int
  answer_len: int
  task_id: str = ""
  test_index: int = 0


def grid_length(shape: Sequence[int]) -> int:
  """Tokens taken by an [h, w] grid: h rows of w colours plus a NEWLINE each."""
  h, w = shape
  return h * (w + 1)


def longest_answer(max_grid: int) -> int:
  """Answer tokens of the largest grid ``max_grid`` allows: its rows, NEWLINEs and END."""
  return grid_length((max_grid, max_grid)) + 1


def _grid_tokens(grid: Grid) -> np.ndarray:
  grid = np.asarray(grid, dtype=np.int32)
  newline_H1 = np.full((grid.shape[0], 1), NEWLINE, np.int32)
  return np.concatenate([grid, newline_H1], axis=1).reshape(-1)


def encode_grid(grid: Grid) -> list[int]:
  """The tokens of one [h, w] grid: each row's colours followed by NEWLINE."""
  return _grid_tokens(grid).tolist()


def sequence_length(demos: Sequence[Pair], test_input: Grid, test_output: Grid | None = None
                    ) -> int:
  """len(serialize(demos, test_input, test_output).tokens), without serialising."""
  n = 1 + 2 + grid_length(np.shape(test_input))
  if test_output is not None:
    n += grid_length(np.shape(test_output)) + 1
  return n + sum(2 + grid_length(np.shape(i)) + grid_length(np.shape(o)) for i, o in demos)


def serialize(demos: Sequence[Pair], test_input: Grid, test_output: Grid | None = None, *,
              loss_on: str = "answer", task_id: str = "", test_index: int = 0) -> Example:
  """Serialises demonstrations and one test pair into an :class:`Example` (see module doc)."""
  if loss_on not in LOSS_ON:
    raise ValueError(f"loss_on {loss_on!r} is not one of {', '.join(LOSS_ON)}")
  mark_outputs = loss_on == "outputs"
  pieces: list[np.ndarray] = [np.array([BOS], np.int32)]
  masks: list[np.ndarray] = [np.zeros(1, bool)]

  def add(tokens: np.ndarray, supervised: bool) -> None:
    pieces.append(tokens)
    masks.append(np.full(len(tokens), supervised))

  for inp, out in demos:
    add(np.array([IN], np.int32), False)
    add(_grid_tokens(inp), False)
    add(np.array([OUT], np.int32), False)
    add(_grid_tokens(out), mark_outputs)
  add(np.array([IN], np.int32), False)
  add(_grid_tokens(test_input), False)
  add(np.array([OUT], np.int32), False)
  answer_start = sum(len(p) for p in pieces)
  answer_len = 0
  if test_output is not None:
    answer = np.concatenate([_grid_tokens(test_output), np.array([END], np.int32)])
    add(answer, True)
    answer_len = len(answer)
  return Example(tokens=np.concatenate(pieces), loss_mask=np.concatenate(masks),
                 answer_start=answer_start, answer_len=answer_len, task_id=task_id,
                 test_index=test_index)


def fit(demos: Sequence[Pair], test_input: Grid, test_output: Grid | None, max_len: int,
        **kw: Any) -> Example | None:
  """Serialises with as many leading demos as fit: trailing demos are dropped until the
  sequence has at most ``max_len`` tokens. None when it does not fit even with one demo.
  ``kw`` goes to :func:`serialize`."""
  fixed = sequence_length([], test_input, test_output)
  demo_lens = np.array([2 + grid_length(np.shape(i)) + grid_length(np.shape(o))
                        for i, o in demos], np.int64)
  totals = fixed + np.cumsum(demo_lens)  # totals[k - 1]: length with the first k demos
  if len(demos) == 0:
    return serialize([], test_input, test_output, **kw) if fixed <= max_len else None
  keep = int(np.searchsorted(totals, max_len, side="right"))  # totals is increasing
  if keep == 0:
    return None
  return serialize(list(demos[:keep]), test_input, test_output, **kw)


def _parse_grid(segment: np.ndarray) -> Grid | None:
  """A grid from its tokens (rows closed by NEWLINE, nothing else), or None if malformed."""
  if segment.size == 0 or segment[-1] != NEWLINE:
    return None
  is_newline = segment == NEWLINE
  if not np.all(is_newline | ((segment >= 0) & (segment < NUM_COLORS))):
    return None
  row_ends = np.flatnonzero(is_newline)
  widths = np.diff(row_ends, prepend=-1) - 1
  w = int(widths[0])
  if w < 1 or np.any(widths != w):
    return None
  h = len(row_ends)
  if h > MAX_SIDE or w > MAX_SIDE:
    return None
  return segment[~is_newline].reshape(h, w).astype(np.int32)


def decode_grid(tokens: Any) -> Grid | None:
  """The grid generated after the final OUT: tokens up to the first END.

  Returns an int32 [h, w] grid, or None (never raises) when there is no END, the grid is empty,
  rows are ragged or not closed by NEWLINE, a non-colour token other than NEWLINE occurs before
  END, or a side exceeds 30.
  """
  try:
    array = np.asarray(tokens)
    if array.ndim != 1 or array.dtype.kind not in "iu":
      return None
    array = array.astype(np.int64)
  except (TypeError, ValueError):
    return None
  ends = np.flatnonzero(array == END)
  if ends.size == 0:
    return None
  return _parse_grid(array[:ends[0]])


def parse_sequence(tokens: Any) -> tuple[list[Pair], Grid, Grid | None]:
  """The inverse of :func:`serialize`: (demos, test_input, test_output or None).

  Trailing PAD tokens are ignored. Raises ValueError on a sequence serialize cannot produce.
  """
  array = np.asarray(tokens).astype(np.int64)
  n = len(array)
  while n and array[n - 1] == PAD:
    n -= 1
  array = array[:n]
  if n == 0 or array[0] != BOS:
    raise ValueError("sequence does not start with BOS")
  marks = np.flatnonzero((array == IN) | (array == OUT) | (array == END))
  kinds = array[marks]
  answered = len(kinds) > 0 and kinds[-1] == END
  body = kinds[:-1] if answered else kinds
  if len(body) < 2 or len(body) % 2 or np.any(body[0::2] != IN) or np.any(body[1::2] != OUT):
    raise ValueError("markers are not (IN OUT)+ optionally followed by END")
  if marks[0] != 1:
    raise ValueError("tokens between BOS and the first IN")
  bounds = np.append(marks, n)

  def grid(j: int) -> Grid:
    g = _parse_grid(array[bounds[j] + 1:bounds[j + 1]])
    if g is None:
      raise ValueError(f"malformed grid after the marker at position {int(bounds[j])}")
    return g

  pairs = len(body) // 2
  demos = [(grid(2 * d), grid(2 * d + 1)) for d in range(pairs - 1)]
  test_input = grid(len(body) - 2)
  if answered:
    if bounds[-2] != n - 1:
      raise ValueError("tokens after END")
    return demos, test_input, grid(len(body) - 1)
  if bounds[len(body) - 1] != n - 1:
    raise ValueError("tokens after the final OUT but no END")
  return demos, test_input, None


def leave_one_out(task: Task) -> list[Task]:
  """Tasks made from demonstrations alone: for each demo i (of >= 2), a Task with id
  f"{task.id}/loo{i}" whose single test pair is demo i and whose demos are the others, in
  order. The original test pairs are never used. Fewer than 2 demos: []."""
  if len(task.train) < 2:
    return []
  return [Task(id=f"{task.id}{LOO_TAG}{i}",
               train=[p for j, p in enumerate(task.train) if j != i],
               test=[task.train[i]], loo_of=task.id) for i in range(len(task.train))]


def is_leave_one_out(task: Task) -> bool:
  """Whether the task was made by :func:`leave_one_out` (a user's task id may hold "/loo")."""
  return task.loo_of is not None
