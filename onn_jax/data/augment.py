"""Exact, invertible augmentations of ARC grids and tasks.

The dihedral group D8 of the square acts on grids; element ``k`` in 0..7 is
``rot90^(k % 4)`` followed, for ``k >= 4``, by a transpose. Colour permutations act on values.
Every transform here has an exact inverse, which evaluation uses to map predictions made in an
augmented view back to the task's own frame.
"""

from __future__ import annotations

import dataclasses

import numpy as np

NUM_D8 = 8


def d8_apply(grid: np.ndarray, k: int) -> np.ndarray:
  """Applies D8 element k to an [h, w] grid."""
  out = np.rot90(grid, k % 4)
  if k >= 4:
    out = out.T
  return np.ascontiguousarray(out)


def d8_compose(a: int, b: int) -> int:
  """The element c with d8_apply(g, c) == d8_apply(d8_apply(g, b), a)."""
  probe = np.arange(6).reshape(2, 3)
  target = d8_apply(d8_apply(probe, b), a)
  for c in range(NUM_D8):
    candidate = d8_apply(probe, c)
    if candidate.shape == target.shape and np.array_equal(candidate, target):
      return c
  raise AssertionError("D8 is closed under composition")


def d8_inverse(k: int) -> int:
  """The element that undoes k: rotations invert to the opposite rotation, reflections to
  themselves."""
  return (4 - k) % 4 if k < 4 else k


def d8_invert(grid: np.ndarray, k: int) -> np.ndarray:
  return d8_apply(grid, d8_inverse(k))


def color_permutation(rng: np.random.Generator, mode: str) -> np.ndarray:
  """A permutation of the 10 colours as a lookup table ``perm[c]``.

  mode: ``none`` (identity), ``1-9`` (0, the usual background, stays fixed) or ``all``.
  """
  perm = np.arange(10)
  if mode == "1-9":
    perm[1:] = 1 + rng.permutation(9)
  elif mode == "all":
    perm = rng.permutation(10)
  elif mode != "none":
    raise ValueError(f"colour permutation mode {mode!r} is not one of none, 1-9, all")
  return perm


def color_apply(grid: np.ndarray, perm: np.ndarray) -> np.ndarray:
  return perm[grid]


def color_inverse(perm: np.ndarray) -> np.ndarray:
  inverse = np.empty_like(perm)
  inverse[perm] = np.arange(len(perm))
  return inverse


@dataclasses.dataclass(frozen=True)
class View:
  """One augmented frame of a task: a D8 element then a colour permutation."""
  d8: int = 0
  perm: tuple[int, ...] = tuple(range(10))

  def apply(self, grid: np.ndarray) -> np.ndarray:
    return color_apply(d8_apply(grid, self.d8), np.asarray(self.perm))

  def invert(self, grid: np.ndarray) -> np.ndarray:
    return d8_invert(color_apply(grid, color_inverse(np.asarray(self.perm))), self.d8)


# Task-level augmentation. Imported here (not at the top) so the grid-level functions above stay
# free of the task module; tasks.py does not import this module, so there is no cycle.
from typing import Sequence  # noqa: E402

from onn_jax.data.tasks import Task  # noqa: E402


def augment_task(task: Task, view: View, demo_order: Sequence[int] | None = None) -> Task:
  """The task seen through ``view``: every grid transformed (unknown test outputs stay None)
  and, when ``demo_order`` (a permutation of the demo indices) is given, demos reordered to
  ``[train[j] for j in demo_order]``. The id is kept."""
  order = list(range(len(task.train))) if demo_order is None else [int(j) for j in demo_order]
  if sorted(order) != list(range(len(task.train))):
    raise ValueError(f"task {task.id}: demo_order {order} is not a permutation of "
                     f"0..{len(task.train) - 1}")

  def apply(grid: np.ndarray) -> np.ndarray:
    return view.apply(grid).astype(np.int32)

  train = [(apply(task.train[j][0]), apply(task.train[j][1])) for j in order]
  test = [(apply(i), None if o is None else apply(o)) for i, o in task.test]
  return dataclasses.replace(task, train=train, test=test)
