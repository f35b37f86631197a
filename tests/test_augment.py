"""D8 group laws, colour permutations and task-level augmentation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from onn_jax.data.augment import (NUM_D8, View, augment_task, color_apply, color_inverse,
                                  color_permutation, d8_apply, d8_compose, d8_invert, d8_inverse)
from onn_jax.data.serialize import parse_sequence, serialize
from onn_jax.data.tasks import Task
from onn_jax.data.tokens import VOCAB_SIZE

# Distinct cells on a non-square grid: every symmetry gives a different array.
PROBE = np.arange(12, dtype=np.int32).reshape(3, 4)


def _task(seed: int = 0, demos: int = 3, known: bool = True) -> Task:
  rng = np.random.default_rng(seed)

  def grid() -> np.ndarray:
    return rng.integers(0, 10, size=rng.integers(1, 6, size=2)).astype(np.int32)

  return Task(f"task{seed}", [(grid(), grid()) for _ in range(demos)],
              [(grid(), grid() if known else None), (grid(), None)])


def test_d8_has_eight_distinct_elements_and_identity():
  images = [d8_apply(PROBE, k) for k in range(NUM_D8)]
  keys = {(g.shape, g.tobytes()) for g in images}
  assert len(keys) == NUM_D8
  assert np.array_equal(images[0], PROBE)
  assert sorted({g.shape for g in images}) == [(3, 4), (4, 3)]


@pytest.mark.parametrize("k", range(NUM_D8))
def test_d8_inverse_undoes_each_element(k):
  assert np.array_equal(d8_invert(d8_apply(PROBE, k), k), PROBE)
  assert np.array_equal(d8_apply(d8_invert(PROBE, k), k), PROBE)
  assert d8_compose(k, d8_inverse(k)) == 0 and d8_compose(d8_inverse(k), k) == 0


def test_d8_composition_is_closed_and_associative():
  table = np.array([[d8_compose(a, b) for b in range(NUM_D8)] for a in range(NUM_D8)])
  for a, b in itertools.product(range(NUM_D8), repeat=2):
    c = table[a, b]
    assert 0 <= c < NUM_D8
    assert np.array_equal(d8_apply(d8_apply(PROBE, b), a), d8_apply(PROBE, c))
  # A group table: every row and column is a permutation (Latin square); associativity holds.
  assert all(sorted(row) == list(range(NUM_D8)) for row in table)
  assert all(sorted(col) == list(range(NUM_D8)) for col in table.T)
  for a, b, c in itertools.product(range(NUM_D8), repeat=3):
    assert table[table[a, b], c] == table[a, table[b, c]]
  # D8 is not abelian: some pair does not commute.
  assert not np.array_equal(table, table.T)


@pytest.mark.parametrize("mode", ["none", "1-9", "all"])
def test_color_permutation_modes_and_inverse(mode):
  rng = np.random.default_rng(3)
  perms = [color_permutation(rng, mode) for _ in range(20)]
  grid = np.arange(10).reshape(2, 5)
  for perm in perms:
    assert sorted(perm.tolist()) == list(range(10))
    assert np.array_equal(color_apply(color_apply(grid, perm), color_inverse(perm)), grid)
    assert np.array_equal(color_inverse(perm)[perm], np.arange(10))
    if mode != "all":
      assert perm[0] == 0
  distinct = {tuple(p) for p in perms}
  assert len(distinct) == (1 if mode == "none" else 20)
  if mode == "all":
    assert any(p[0] != 0 for p in perms)
  with pytest.raises(ValueError, match="'some' is not one of none, 1-9, all"):
    color_permutation(rng, "some")


def test_view_invert_is_exact():
  rng = np.random.default_rng(1)
  for k in range(NUM_D8):
    view = View(d8=k, perm=tuple(color_permutation(rng, "all").tolist()))
    assert np.array_equal(view.invert(view.apply(PROBE % 10)), PROBE % 10)


def test_augment_task_transforms_every_grid_and_reorders_demos():
  task = _task(0, demos=3)
  view = View(d8=5, perm=tuple(color_permutation(np.random.default_rng(2), "1-9").tolist()))
  out = augment_task(task, view, demo_order=[2, 0, 1])
  assert out.id == task.id and len(out.train) == 3 and len(out.test) == 2
  for (i, o), j in zip(out.train, [2, 0, 1]):
    assert i.dtype == np.int32
    assert np.array_equal(view.invert(i), task.train[j][0])
    assert np.array_equal(view.invert(o), task.train[j][1])
  assert np.array_equal(view.invert(out.test[0][1]), task.test[0][1])
  assert out.test[1][1] is None
  assert np.array_equal(augment_task(task, View()).train[1][0], task.train[1][0])
  with pytest.raises(ValueError, match="task0: demo_order \\[0, 0, 1\\] is not a permutation"):
    augment_task(task, view, demo_order=[0, 0, 1])


def test_augment_then_serialise_equals_serialise_of_augmented():
  """A colour permutation commutes with serialisation (it maps colour tokens and fixes the
  markers); a D8 view of the parsed sequence's grids gives the augmented task's sequence."""
  task = _task(4, demos=4)
  rng = np.random.default_rng(7)
  for k in range(NUM_D8):
    perm = color_permutation(rng, "all")
    order = rng.permutation(4)
    view = View(d8=k, perm=tuple(perm.tolist()))
    augmented = augment_task(task, view, order)
    ex_aug = serialize(augmented.train, *augmented.test[0], loss_on="outputs")
    # Serialise first, then augment the sequence's grids.
    ex = serialize([task.train[j] for j in order], *task.test[0], loss_on="outputs")
    demos, test_in, test_out = parse_sequence(ex.tokens)
    redone = serialize([(view.apply(i), view.apply(o)) for i, o in demos], view.apply(test_in),
                       view.apply(test_out), loss_on="outputs")
    assert np.array_equal(redone.tokens, ex_aug.tokens)
    assert np.array_equal(redone.loss_mask, ex_aug.loss_mask)
    if k == 0:  # a pure colour permutation is a token map over the whole sequence
      token_map = np.arange(VOCAB_SIZE)
      token_map[:10] = perm
      assert np.array_equal(token_map[ex.tokens], ex_aug.tokens)
      assert np.array_equal(ex.loss_mask, ex_aug.loss_mask)
