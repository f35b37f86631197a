"""The training task set and the deterministic batch stream."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from onn_jax.config import DataConfig
from onn_jax.data import pipeline
from onn_jax.data.pipeline import (ANSWER_BUDGET_ALIGN, BatchStream, build_training_tasks, collate,
                                   rows_within)
from onn_jax.data.serialize import (decode_grid, leave_one_out, parse_sequence,
                                    sequence_length, serialize)
from onn_jax.data.tasks import Task, load_tasks
from onn_jax.data.tokens import END, IN, OUT, PAD

CFG = DataConfig(buckets=(128, 256), color_perm="1-9", d8=True, shuffle_demos=True)


def _tasks(n: int = 6, seed: int = 0) -> list[Task]:
  """Small tasks of distinct random grids; every third task has an unknown test output."""
  rng = np.random.default_rng(seed)

  def grid(lo: int = 1, hi: int = 7) -> np.ndarray:
    return rng.integers(0, 10, size=rng.integers(lo, hi, size=2)).astype(np.int32)

  return [Task(f"t{j}", [(grid(), grid()) for _ in range(2 + j % 3)],
               [(grid(), None if j % 3 == 2 else grid())]) for j in range(n)]


def _sequence(batch: dict, b: int) -> np.ndarray:
  """Row b's token sequence: inputs plus the final target."""
  n = int(batch["valid"][b].sum())
  return np.append(batch["inputs"][b, :n], batch["targets"][b, n - 1])


def _view_of(originals: list[np.ndarray], images: list[np.ndarray]) -> bool:
  """Whether one D8 element and one colour bijection fixing 0 map every original to its image."""
  from onn_jax.data.augment import d8_apply
  for k in range(8):
    moved = [d8_apply(g, k) for g in originals]
    if any(m.shape != i.shape for m, i in zip(moved, images)):
      continue
    src = np.concatenate([m.ravel() for m in moved])
    dst = np.concatenate([i.ravel() for i in images])
    table = {}
    if all(table.setdefault(int(s), int(d)) == d for s, d in zip(src, dst)):
      if len(set(table.values())) == len(table) and table.get(0, 0) == 0:
        return True
  return False


@pytest.fixture(scope="module")
def stream() -> BatchStream:
  return BatchStream(_tasks(), CFG, batch_size=8, seed=3)


def test_items_cover_known_tests_and_leave_one_out(stream):
  tasks = _tasks()
  known = sum(o is not None for t in tasks for _, o in t.test)
  loo = sum(len(leave_one_out(t)) for t in tasks)
  assert stream.num_items == known + loo and stream.num_too_long == 0
  assert np.isclose(stream.bucket_probs.sum(), 1.0)


def test_same_seed_same_batches_different_seed_differs(stream):
  other = BatchStream(_tasks(), CFG, batch_size=8, seed=3)
  for step in (0, 1, 17, 10**6):
    a, b = stream.batch(step), other.batch(step)
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  # The batch does not depend on what was drawn before (a resumed run sees the same data).
  np.testing.assert_array_equal(stream.batch(17)["inputs"], other.batch(17)["inputs"])
  different = BatchStream(_tasks(), CFG, batch_size=8, seed=4)
  differs = [not np.array_equal(stream.batch(s)["inputs"], different.batch(s)["inputs"])
             for s in range(4)]
  assert all(differs)
  assert not np.array_equal(stream.batch(0)["inputs"], stream.batch(1)["inputs"])


def test_iteration_from_a_start_step(stream):
  it = stream.iterate(5)
  for step in (5, 6):
    np.testing.assert_array_equal(next(it)["inputs"], stream.batch(step)["inputs"])
  resumed = BatchStream(_tasks(), CFG, batch_size=8, seed=3, start_step=9)
  np.testing.assert_array_equal(next(iter(resumed))["targets"], stream.batch(9)["targets"])


def test_batch_shapes_shift_and_answer_mask(stream):
  lengths = set()
  for step in range(12):
    batch = stream.batch(step)
    B, T = batch["inputs"].shape
    lengths.add(T)
    assert B == 8 and T in CFG.buckets
    assert batch["inputs"].dtype == np.int32 and batch["targets"].dtype == np.int32
    assert batch["loss_mask"].dtype == np.float32 and batch["valid"].dtype == bool
    assert batch["answer_start"].shape == (B,) and "positions" not in batch  # RoPE: 0..T-1
    valid = batch["valid"]
    # Targets are inputs shifted by one; padding is PAD, masked and invalid.
    np.testing.assert_array_equal(batch["inputs"][:, 1:][valid[:, 1:]],
                                  batch["targets"][:, :-1][valid[:, 1:]])
    assert np.all(batch["inputs"][~valid] == PAD) and np.all(batch["targets"][~valid] == PAD)
    assert np.all(batch["loss_mask"][~valid] == 0)
    for b in range(B):
      start, n = int(batch["answer_start"][b]), int(batch["answer_len"][b])
      expected = np.zeros(T, np.float32)
      expected[start - 1:start - 1 + n] = 1
      np.testing.assert_array_equal(batch["loss_mask"][b], expected)
      assert batch["inputs"][b, start - 1] == OUT and batch["targets"][b, start - 2 + n] == END
      assert decode_grid(batch["targets"][b, start - 1:]) is not None
      assert int(valid[b].sum()) == start - 2 + n + 1
  assert lengths == set(CFG.buckets)  # both buckets are drawn


def test_rows_are_consistent_views_of_an_item(stream):
  """Each row is one item under a single D8 element and colour permutation (0 fixed), with
  its demos a reordering of (a prefix of) the item's demos."""
  items = stream.items
  for step in range(3):
    batch = stream.batch(step)
    for b in range(batch["inputs"].shape[0]):
      demos, test_in, test_out = parse_sequence(_sequence(batch, b))
      found = False
      for task, ti in items:
        if len(demos) > len(task.train):
          continue
        orig_in, orig_out = task.test[ti]
        if not _view_of([orig_in, orig_out], [test_in, test_out]):
          continue
        # Each shown demo is the same view of a distinct demo of the item.
        used = set()
        for di, do in demos:
          match = next((j for j, (i, o) in enumerate(task.train) if j not in used
                        and _view_of([orig_in, orig_out, i, o], [test_in, test_out, di, do])),
                       None)
          if match is None:
            break
          used.add(match)
        else:
          found = True
          break
      assert found, (step, b)


def test_trailing_demos_dropped_and_too_long_counted():
  rng = np.random.default_rng(1)
  big = lambda: rng.integers(0, 10, (8, 8)).astype(np.int32)  # noqa: E731
  many = Task("many", [(big(), big()) for _ in range(6)], [(big(), big())])
  huge = Task("huge", [(np.zeros((30, 30), np.int32),) * 2], [(np.zeros((30, 30), np.int32),) * 2])
  one_demo = sequence_length(many.train[:1], *many.test[0])
  cfg = dataclasses.replace(CFG, buckets=(one_demo + 80,))
  s = BatchStream([many, huge], cfg, batch_size=4, seed=0)
  # "huge" (and nothing else) fits no bucket; "many" has 1 test item and 6 leave-one-out items.
  assert s.num_too_long == 1 and s.num_items == 7
  for step in range(3):
    batch = s.batch(step)
    for b in range(4):
      demos, _, _ = parse_sequence(_sequence(batch, b))
      assert 1 <= len(demos) <= 2  # 8x8 demos take 146 tokens each
  with pytest.raises(ValueError, match="no training sequence fits"):
    BatchStream([huge], cfg, batch_size=4, seed=0)


def test_transposes_always_fit_their_bucket():
  """A wide grid needs more tokens once transposed (1x30: 31 tokens, 30x1: 60): items are
  bucketed by their worst orientation, so a bucket exactly that long never overflows."""
  wide = (np.arange(30).reshape(1, 30) % 10).astype(np.int32)
  small = wide[:, :5]
  task = Task("wide", [(wide, wide), (small, small)], [(wide, wide)])
  # Transposed, with the short demo only: BOS IN 30x1 OUT 30x1 END + IN 5x1 OUT 5x1.
  worst = 3 + 2 * 60 + 1 + 2 + 2 * 10
  assert worst == 146 and sequence_length([(small, small)], wide, wide) == 80
  cfg = dataclasses.replace(CFG, buckets=(worst - 1,))
  s = BatchStream([task], cfg, batch_size=8, seed=0)
  assert s.num_too_long == 0 and s.num_items == 3  # the test pair and 2 leave-one-out items
  shapes = set()
  for step in range(6):
    batch = s.batch(step)
    assert batch["inputs"].shape == (8, worst - 1)
    for b in range(8):
      shapes.add(decode_grid(batch["targets"][b, batch["answer_start"][b] - 1:]).shape)
  assert {(1, 30), (30, 1)} <= shapes
  with pytest.raises(ValueError, match="no training sequence fits"):
    BatchStream([task], dataclasses.replace(CFG, buckets=(worst - 2,)), batch_size=8, seed=0)
  # Without D8 the identity orientation (80 tokens) is all that must fit.
  assert BatchStream([task], dataclasses.replace(CFG, d8=False, buckets=(79,)), batch_size=8,
                     seed=0).num_items == 3


def test_process_sharding_returns_the_right_rows():
  full = BatchStream(_tasks(), CFG, batch_size=8, seed=5)
  parts = [BatchStream(_tasks(), CFG, batch_size=8, seed=5, process_index=p, process_count=4)
           for p in range(4)]
  for step in (0, 7):
    want = full.batch(step)
    got = [p.batch(step) for p in parts]
    for key in want:
      assert got[0][key].shape[0] == 2
      np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])
  with pytest.raises(ValueError, match="train.batch_size=6 is not divisible by the process "
                                       "count 4"):
    BatchStream(_tasks(), CFG, batch_size=6, seed=0, process_count=4)


def test_outputs_loss_mask_and_no_augmentation():
  cfg = dataclasses.replace(CFG, loss_on="outputs", d8=False, color_perm="none",
                            shuffle_demos=False, buckets=(512,))
  tasks = _tasks(3)
  s = BatchStream(tasks, cfg, batch_size=4, seed=0)
  batch = s.batch(0)
  for b in range(4):
    seq = _sequence(batch, b)
    # Without augmentation the row is exactly serialize() of some item, unchanged.
    candidates = [serialize(t.train, *t.test[i], loss_on="outputs") for t, i in s.items]
    match = [ex for ex in candidates if np.array_equal(ex.tokens, seq)]
    assert match
    np.testing.assert_array_equal(batch["loss_mask"][b, :len(seq) - 1], match[0].loss_mask[1:])
    assert batch["loss_mask"][b].sum() > batch["answer_len"][b]
    # Never a marker as a target under the mask.
    masked_targets = batch["targets"][b][batch["loss_mask"][b] > 0]
    assert not np.isin(masked_targets, [IN, OUT, PAD]).any()


def test_collate_rejects_overlong_examples():
  ex = serialize(_tasks(1)[0].train, *_tasks(1)[0].test[0], task_id="t0")
  batch = collate([ex], len(ex.tokens) - 1)
  assert batch["valid"].all()
  with pytest.raises(ValueError, match="task t0 test 0: .* do not fit a batch of length"):
    collate([ex], len(ex.tokens) - 2)


def test_build_training_tasks_guard_filter_limit_and_eval_demos():
  cfg = DataConfig(train="arc-agi-1:training+arc-agi-2:training", eval="arc-agi-1:evaluation",
                   eval_demos=True, max_grid=20)
  lines = []
  tasks, info = build_training_tasks(cfg, log=lines.append)
  evaluation = load_tasks("arc-agi-1:evaluation")
  eval_ids = {t.id for t in evaluation}
  print(info)
  assert info["duplicates_removed"] > 300  # ARC-AGI-2 training holds ARC-AGI-1 training
  assert info["leaked_removed"] > 100 and info["too_large"] > 0
  assert any("leakage guard removed" in line for line in lines)
  train_part = [t for t in tasks if "/loo" not in t.id]
  demo_part = [t for t in tasks if "/loo" in t.id]
  assert len(train_part) == info["train_tasks"] and len(demo_part) == info["eval_demo_tasks"] > 0
  assert not any(t.id in eval_ids for t in train_part)
  assert len({t.id for t in train_part}) == len(train_part)
  assert all(max(g.shape) <= 20 for t in tasks for p in t.train + t.test for g in p)
  # Evaluation demo tasks hold only their own task's demonstration pairs: test pairs (and so
  # test outputs) never enter.
  by_id = {t.id: t for t in evaluation}
  for task in demo_part:
    source = by_id[task.id.split("/loo")[0]]
    loo_index = int(task.id.split("/loo")[1])
    assert len(task.train) == len(source.train) - 1 and len(task.test) == 1
    np.testing.assert_array_equal(task.test[0][1], source.train[loo_index][1])
    for i, o in task.train + task.test:
      assert any(np.array_equal(i, si) and np.array_equal(o, so) for si, so in source.train)

  limited, info2 = build_training_tasks(
      dataclasses.replace(cfg, train="arc-agi-1:training", eval="", eval_demos=False,
                          max_train_tasks=25), log=lambda _: None)
  assert [t.id for t in limited] == sorted(t.id for t in limited) and len(limited) == 25
  assert info2["leaked_removed"] == 0 and info2["limit_removed"] > 0


def test_hold_out_train_tests_keeps_every_test_output_out_of_the_stream():
  cfg = DataConfig(train="arc-agi-1:training", eval="", max_train_tasks=40, buckets=(1024,),
                   hold_out_train_tests=True)
  lines = []
  tasks, info = build_training_tasks(cfg, log=lines.append)
  assert any("held out" in line for line in lines) and "held out" in info["protocol"]
  assert len(tasks) == 40 and all(t.test == [] for t in tasks)
  source = {t.id: t for t in load_tasks("arc-agi-1:training")}
  stream = BatchStream(tasks, cfg, batch_size=4, seed=0)
  # Every item's target is one of its task's demonstration outputs, and a held-out test pair
  # is never a target unless the task also shows it as a demonstration.
  assert len(stream.items) + stream.num_too_long == sum(
      len(t.train) for t in tasks if len(t.train) >= 2)
  assert len(stream.items) > 50
  for task, test_index in stream.items:
    original = source[task.id.split("/loo")[0]]
    target_in, target_out = task.test[test_index]
    assert any(np.array_equal(target_in, i) and np.array_equal(target_out, o)
               for i, o in original.train)
    for pair in task.train + task.test:
      for test_in, test_out in original.test:
        if np.array_equal(pair[0], test_in) and np.array_equal(pair[1], test_out):
          assert any(np.array_equal(test_in, i) and np.array_equal(test_out, o)
                     for i, o in original.train)
  kept, _ = build_training_tasks(dataclasses.replace(cfg, hold_out_train_tests=False),
                                 log=lambda _: None)
  assert sum(len(t.test) for t in kept) >= 40


# -- token budgets: long buckets with fewer rows, unpacked beside packed rows ----------------

# Items of _tasks(12) by bucket: 8 in 64, 19 in 128, 17 in 256. Packed rows of 128; the 256
# bucket gets 1024 // 256 = 4 rows.
LONG = dataclasses.replace(CFG, buckets=(64, 128, 256), pack=True, pack_len=128,
                           max_batch_tokens=8 * 128)


def test_rows_within_a_token_budget():
  assert rows_within(256, 8, 0) == 8  # no budget
  assert rows_within(128, 8, 1024) == 8 and rows_within(256, 8, 1024) == 4
  assert rows_within(2048, 8, 1024, multiple=2) == 2  # at least one multiple
  assert rows_within(128, 16, 768, multiple=4) == 4  # 6 rows, down to a multiple of 4


def test_a_budget_that_binds_nowhere_and_pack_len_longest_change_nothing():
  plain = dataclasses.replace(LONG, pack_len=0, max_batch_tokens=0)
  same = dataclasses.replace(LONG, pack_len=256, max_batch_tokens=8 * 256)
  a, b = (BatchStream(_tasks(12), c, batch_size=8, seed=2, pack_align=8) for c in (plain, same))
  for step in range(4):
    for got, want in ((b.batch(step), a.batch(step)), (b.packed_batch(step),
                                                       a.packed_batch(step))):
      assert got.keys() == want.keys()
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])


def test_pack_len_is_ignored_without_packing():
  """A config packing at 2048 with its buckets overridden to shorter ones and packing off
  (as the EAVI verdict does with arc1) draws the unpacked batches, not a pack_len error."""
  unpacked = dataclasses.replace(LONG, pack=False, max_batch_tokens=0)
  other = dataclasses.replace(unpacked, pack_len=2048)
  a, b = (BatchStream(_tasks(12), c, batch_size=8, seed=2) for c in (unpacked, other))
  for key, want in a.batch(3).items():
    np.testing.assert_array_equal(b.batch(3)[key], want)
  with pytest.raises(ValueError, match="data.pack_len=2048"):
    BatchStream(_tasks(12), dataclasses.replace(other, pack=True), batch_size=8, seed=2)


def test_bucket_and_step_kind_probabilities_draw_every_item_alike():
  s = BatchStream(_tasks(12), LONG, batch_size=8, seed=0, pack_align=8)
  counts = [len(ix) for ix in s.bucket_items]
  assert s.rows == [8, 8, 4] and counts == [8, 19, 17]
  # Unpacked: a bucket's share is the batches that draw each of its items once, items / rows.
  np.testing.assert_allclose(s.bucket_probs, np.array([8 / 8, 19 / 8, 17 / 4]) / (1 + 19 / 8
                                                                                   + 17 / 4))
  # Packed: the 8 + 19 items up to pack_len share rows of 128 (over the sequences a packed
  # batch holds, measured on steps 0-7); the 256 bucket trains unpacked, 4 rows a batch.
  packed = 27 / np.mean([sum(len(row) for row in s.pack_rows(k)) for k in range(8)])
  np.testing.assert_allclose(s.kind_probs, np.array([packed, 17 / 4]) / (packed + 17 / 4))
  steps = 300
  kinds = [s.packed_batch(step)["inputs"].shape for step in range(steps)]
  assert set(kinds) == {(8, 128), (4, 256)}
  long = kinds.count((4, 256))
  p = s.kind_probs[1]
  assert abs(long - steps * p) <= 4 * np.sqrt(steps * p * (1 - p))  # binomial, 4 sigma


def test_long_steps_draw_only_long_items_and_packed_rows_only_short(monkeypatch):
  s = BatchStream(_tasks(12), LONG, batch_size=8, seed=1, pack_align=8)
  long_items = set(s.bucket_items[2].tolist())
  drawn: list[int] = []
  real = BatchStream._example
  monkeypatch.setattr(BatchStream, "_example",
                      lambda self, item, *a: drawn.append(item) or real(self, item, *a))
  seen = set()
  for step in range(12):
    drawn.clear()
    batch = s.packed_batch(step)
    seen.add(batch["inputs"].shape)
    if batch["inputs"].shape == (4, 256):  # one sequence a row, no segments
      assert set(drawn) <= long_items and len(drawn) == 4 and "segment_start" not in batch
    else:
      assert batch["inputs"].shape == (8, 128) and not set(drawn) & long_items
      assert "segment_start" in batch
  assert len(seen) == 2


def test_long_steps_split_over_processes():
  whole = BatchStream(_tasks(12), LONG, batch_size=8, seed=1, pack_align=8)
  step = next(k for k in range(50) if whole.packed_batch(k)["inputs"].shape[0] == 4)
  parts = [BatchStream(_tasks(12), LONG, batch_size=8, seed=1, pack_align=8, process_index=i,
                       process_count=2) for i in range(2)]
  want = whole.packed_batch(step)
  for key in want:
    np.testing.assert_array_equal(np.concatenate([p.packed_batch(step)[key] for p in parts]),
                                  want[key])
  with pytest.raises(ValueError, match="bucket 256 4 rows, which do not divide over 8 "):
    BatchStream(_tasks(12), LONG, batch_size=8, seed=1, process_count=8)


def test_every_item_is_drawn_about_equally_often_whatever_its_bucket(monkeypatch):
  """Draws per item and step, packed (buckets 64, 128) against long (256): equal up to the
  noise of which kind each step drew (binomial) and the 8-step estimate of a packed batch's
  size."""
  s = BatchStream(_tasks(12), LONG, batch_size=8, seed=4, pack_align=8)
  long_items = set(s.bucket_items[2].tolist())
  counts = {"long": 0, "packed": 0}
  real = BatchStream._example

  def count(self, item, *a):
    counts["long" if item in long_items else "packed"] += 1
    return real(self, item, *a)

  monkeypatch.setattr(BatchStream, "_example", count)
  steps = 1500
  packed_steps = sum(s.packed_batch(k)["inputs"].shape == (8, 128) for k in range(steps))
  counts["packed"] -= packed_steps  # the drawn sequence that closes each packed batch
  rate = {"long": counts["long"] / 17, "packed": counts["packed"] / 27}
  # Relative errors, 4 sigma each: the packed steps' count (binomial), the estimate of a packed
  # batch's sequences from 8 batches, and their mean over this run's packed batches.
  p = s.kind_probs[0]
  sigma = np.sqrt(steps * p * (1 - p))
  sizes = [sum(len(row) for row in s.pack_rows(k)) for k in range(8)]
  spread = np.std(sizes, ddof=1) / np.mean(sizes)
  tolerance = 4 * (sigma * (1 / (steps * p) + 1 / (steps * (1 - p))) + spread / np.sqrt(8)
                   + spread / np.sqrt(packed_steps))
  assert abs(rate["packed"] / rate["long"] - 1) < tolerance, (rate, tolerance)


# data.pack_fill: the long bucket's rows are filled with items up to pack_len after their own.
FILL = dataclasses.replace(LONG, pack_fill=True)


def test_pack_fill_rows_start_with_the_long_steps_own_sequences_then_short_ones():
  """A filled long row holds, from position 0 and token for token, the sequence the unpacked
  long step draws for it at that step, then items up to pack_len, whole, at aligned starts;
  the rows get more real tokens."""
  plain = BatchStream(_tasks(12), LONG, batch_size=8, seed=1, pack_align=8)
  fill = BatchStream(_tasks(12), FILL, batch_size=8, seed=1, pack_align=8)
  long_items = set(fill.bucket_items[2].tolist())
  index = {(task.id, i): k for k, (task, i) in enumerate(fill.items)}
  long_steps = [k for k in range(40) if fill._packed_kind(k) == 1][:4]
  assert long_steps
  for step in long_steps:
    want, got = plain.batch(step, 2), fill.packed_batch(step)
    assert got["inputs"].shape == want["inputs"].shape == (4, 256)
    for b in range(4):
      n = int(want["valid"][b].sum())
      for key in ("inputs", "targets", "loss_mask"):
        np.testing.assert_array_equal(got[key][b, :n], want[key][b, :n])
      assert not got["segment_start"][b, :n].any()
    rows = fill.pack_rows(step, 1)
    assert [index[r[0].task_id, r[0].test_index] in long_items for r in rows] == [True] * 4
    fillers = [ex for row in rows for ex in row[1:]]
    assert not {index[ex.task_id, ex.test_index] for ex in fillers} & long_items
    for b, row in enumerate(rows):  # each sequence starts at an aligned position of its own
      starts = np.unique(got["segment_start"][b])
      assert len(starts) == len(row) and not (starts % 8).any()
    assert got["valid"].sum() == want["valid"].sum() + sum(len(ex.tokens) - 1 for ex in fillers)
  real = [fill.packed_batch(k)["valid"].mean() - plain.batch(k, 2)["valid"].mean()
          for k in long_steps]
  assert min(real) >= 0 and max(real) > 0


def test_pack_fill_step_kinds_count_the_short_items_the_long_rows_take():
  """The packed rows' share is what the items up to pack_len still need after the long
  steps' rows took theirs (8-step estimates of both), so every item stays as likely."""
  s = BatchStream(_tasks(12), FILL, batch_size=8, seed=0, pack_align=8)
  per_batch = np.mean([sum(len(row) for row in s.pack_rows(k)) for k in range(8)])
  taken = np.mean([sum(len(row) - 1 for row in s.pack_rows(k, 1)) for k in range(8)])
  assert taken > 0
  packed = (27 - 17 / 4 * taken) / per_batch
  np.testing.assert_allclose(s.kind_probs, np.array([packed, 17 / 4]) / (packed + 17 / 4))


def test_pack_fill_is_ignored_without_packing_and_changes_no_packed_row():
  off = dataclasses.replace(LONG, pack=False, max_batch_tokens=0)
  a, b = (BatchStream(_tasks(12), c, batch_size=8, seed=2) for c in
          (off, dataclasses.replace(off, pack_fill=True)))
  for key, want in a.batch(3).items():
    np.testing.assert_array_equal(b.batch(3)[key], want)
  c, d = (BatchStream(_tasks(12), cfg, batch_size=8, seed=2, pack_align=8) for cfg in (LONG, FILL))
  assert [[ex.tokens.tolist() for ex in row] for row in c.pack_rows(5)] == \
      [[ex.tokens.tolist() for ex in row] for row in d.pack_rows(5)]


def test_pack_fill_with_no_item_up_to_pack_len_trains_the_long_rows_as_they_are():
  """Nothing fits pack_len: every step is a longer bucket's, and its rows hold their own
  sequences only (as without pack_fill), in the packed layout."""
  cfg = dataclasses.replace(FILL, buckets=(8, 256), pack_len=8)
  plain = BatchStream(_tasks(12), dataclasses.replace(cfg, pack_fill=False), batch_size=8,
                      seed=3, pack_align=8)
  fill = BatchStream(_tasks(12), cfg, batch_size=8, seed=3, pack_align=8)
  assert len(fill.pack_items) == 0 and list(fill.kind_probs) == [0.0, 1.0]
  for step in range(3):
    want, got = plain.packed_batch(step), fill.packed_batch(step)
    assert not got["segment_start"].any()
    for key in ("inputs", "targets", "loss_mask", "valid"):
      np.testing.assert_array_equal(got[key], want[key])


def test_pack_fill_draws_every_item_about_equally_often(monkeypatch):
  """Sequences that train per item, short (up to pack_len: packed rows and the long rows'
  rest) against long, over many steps. With the kinds' probabilities estimated from 200
  batches each (8 in a run: their noise is not this test's subject), equal up to the noise of
  the step kinds (binomial) and of the batches' sizes: 4 sigma of their root sum of squares,
  each weighted by its share of the short items' draws. Without the long rows' rest counted
  the short items train 1.44x as often here."""
  monkeypatch.setattr(pipeline, "_PACK_SAMPLES", 200)
  s = BatchStream(_tasks(12), FILL, batch_size=8, seed=4, pack_align=8)
  long_items = set(s.bucket_items[2].tolist())
  index = {(task.id, i): k for k, (task, i) in enumerate(s.items)}
  steps = 3000
  short: dict[int, list[int]] = {0: [], 1: []}  # short sequences in each batch, by kind
  long = 0
  for step in range(steps):
    kind = s._packed_kind(step)
    drawn = [index[ex.task_id, ex.test_index] for row in s.pack_rows(step, kind) for ex in row]
    short[kind].append(sum(item not in long_items for item in drawn))
    long += len(drawn) - short[kind][-1]
  ratio = (sum(map(sum, short.values())) / 27) / (long / 17)
  n0, n1 = len(short[0]), len(short[1])
  share0 = sum(short[0]) / (sum(short[0]) + sum(short[1]))
  kinds = np.sqrt(steps * n0 / steps * n1 / steps) * (1 / n0 + 1 / n1) * share0
  sizes = [share * np.std(x, ddof=1) / np.mean(x) * np.sqrt(1 / 200 + 1 / len(x))
           for share, x in ((share0, short[0]), (1 - share0, short[1]))]
  tolerance = 4 * np.sqrt(kinds ** 2 + sum(v ** 2 for v in sizes))
  assert abs(ratio - 1) < tolerance, (ratio, tolerance)


def test_answer_groups_draw_rows_of_one_group_and_every_item_alike(monkeypatch):
  """``answer_groups`` (EAVI's ``eavi.answer_groups``): a batch's rows come from one cell
  (bucket x answer-length group), the cells split each bucket's items, and a cell is drawn as
  often as its items over its bucket's rows, so every item is as likely as without groups;
  ``length_at`` names the drawn bucket without building the batch."""
  s = BatchStream(_tasks(12), CFG, batch_size=8, seed=0)
  groups = (int(np.median(s.item_answer)),)
  cells, probs = s.answer_cells(groups)
  for k, pool in enumerate(s.bucket_items):
    mine = [cell for b, cell in cells if b == k]
    assert sorted(np.concatenate(mine).tolist()) == sorted(pool.tolist())
  assert len(cells) > len(s.buckets)  # some bucket really is split
  per_item = [p * s.rows[k] / len(cell) for (k, cell), p in zip(cells, probs)]
  np.testing.assert_allclose(per_item, per_item[0])
  drawn: list[int] = []
  real = BatchStream._example
  monkeypatch.setattr(BatchStream, "_example",
                      lambda self, item, *a: drawn.append(item) or real(self, item, *a))
  for step in range(24):
    drawn.clear()
    batch = s.batch(step, answer_groups=groups)
    assert batch["inputs"].shape[1] == s.length_at(step, answer_groups=groups)
    answers = s.item_answer[drawn]
    assert (answers <= groups[0]).all() or (answers > groups[0]).all()
    assert set(drawn) <= set(s.bucket_items[s.buckets.index(batch["inputs"].shape[1])].tolist())
  # The answer length counted is the longer orientation's, END included.
  task, test_index = s.items[0]
  h, w = np.shape(task.test[test_index][1])
  assert s.item_answer[0] == max(h * (w + 1), w * (h + 1)) + 1


def test_answer_tokens_are_each_answer_at_its_buckets_budget():
  """A batch's ``answer_tokens`` hold each row's answer (END last, PAD after), as wide as EAVI's
  answer budget of its bucket: the bucket's longest answer (either orientation) rounded up to
  ANSWER_BUDGET_ALIGN, at most the bucket's length and, when no answer is longer, the longest
  answer data.max_grid allows; never below an answer of the bucket."""
  rng = np.random.default_rng(4)
  big = Task("big", [(rng.integers(0, 10, (12, 9)), rng.integers(0, 10, (9, 12)))
                     for _ in range(3)], [(rng.integers(0, 10, (12, 9)),
                                           rng.integers(0, 10, (9, 12)))])
  crop = lambda g, side: None if g is None else g[:side, :side]
  cropped = lambda side: [Task(t.id, [(crop(a, side), crop(b, side)) for a, b in t.train],
                               [(crop(a, side), crop(b, side)) for a, b in t.test])
                          for t in _tasks(12)]
  cases = [  # (max_grid, buckets, tasks, budgets expected)
      (30, (128, 256), _tasks(12), [64, 64]),
      # 12x9 answers: 9 * 13 + 1 = 118 tokens, either orientation (D8) -> 128.
      (30, (128, 1024), _tasks(12) + [big], [64, 128]),
      (4, (128, 256), cropped(4), [21, 21]),  # the grid bound (21) below one alignment step
      (4, (128, 256), _tasks(12), None)]  # grids past max_grid (unfiltered): never cut
  for max_grid, buckets, tasks, expected in cases:
    cfg = dataclasses.replace(CFG, max_grid=max_grid, buckets=buckets)
    s = BatchStream(tasks, cfg, batch_size=8, seed=1)
    bound = max_grid * (max_grid + 1) + 1
    for k, length in enumerate(s.buckets):
      budget, longest = s.answer_budgets[k], int(s.item_answer[s.bucket_items[k]].max())
      assert longest <= budget <= length
      assert budget in (length, max(longest, bound)) or (
          budget % ANSWER_BUDGET_ALIGN == 0 and budget - ANSWER_BUDGET_ALIGN < longest)
    if expected is not None:
      assert s.answer_budgets == expected
    for step in range(8):
      batch = s.batch(step)
      budget = s.answer_budgets[s.buckets.index(batch["inputs"].shape[1])]
      assert batch["answer_tokens"].shape == (8, budget)
      assert batch["answer_tokens"].dtype == np.int32
      for b in range(8):
        start, n = int(batch["answer_start"][b]), int(batch["answer_len"][b])
        np.testing.assert_array_equal(batch["answer_tokens"][b, :n],
                                      batch["targets"][b, start - 1:start - 1 + n])
        assert batch["answer_tokens"][b, n - 1] == END
        assert np.all(batch["answer_tokens"][b, n:] == PAD)
  assert "answer_tokens" not in BatchStream(tasks, cfg, 8, 1, answer_tokens=False).batch(0)
  # eavi.budget_quantile: the budget is that quantile of the bucket's answers (an answer of
  # the bucket), rounded up the same way; longer answers are cut to it.
  tasks = _tasks(12) + [big]
  cfg = dataclasses.replace(CFG, max_grid=30, buckets=(1024,))
  whole = BatchStream(tasks, cfg, batch_size=8, seed=1)
  assert BatchStream(tasks, cfg, batch_size=8, seed=1, answer_quantile=1.0).answer_budgets == (
      whole.answer_budgets) == [128]
  part = BatchStream(tasks, cfg, batch_size=8, seed=1, answer_quantile=0.5)
  answers = np.sort(part.item_answer[part.bucket_items[0]])
  median = int(answers[len(answers) // 2])  # the "higher" median: answers[ceil((n - 1) / 2)]
  assert median < answers[-1] == 121  # the big task: 12 rows of 9 + NEWLINE, END (D8)
  assert part.answer_budgets == [-(-median // ANSWER_BUDGET_ALIGN) * ANSWER_BUDGET_ALIGN] == [64]
  cut = 0
  for step in range(16):
    batch = part.batch(step)
    assert batch["answer_tokens"].shape == (8, 64)
    for b in range(8):
      start, n = int(batch["answer_start"][b]), int(batch["answer_len"][b])
      cut += n > 64
      np.testing.assert_array_equal(batch["answer_tokens"][b, :min(n, 64)],
                                    batch["targets"][b, start - 1:start - 1 + min(n, 64)])
  assert cut > 0
  # collate leaves the key out without a budget, and cuts an answer longer than it.
  ex = s._example(0, 0, 0, s.buckets[-1] + 1)
  assert "answer_tokens" not in collate([ex], s.buckets[-1])
  cut = collate([ex], s.buckets[-1], answer_budget=2)["answer_tokens"]
  np.testing.assert_array_equal(cut[0], ex.tokens[ex.answer_start:ex.answer_start + 2])


def test_a_task_id_given_twice_by_joined_sources_is_said_and_compared(tmp_path):
  """Joined sources that give one task id twice: the first is kept, and whether the contents
  differ is said; an evaluation refuses two different tasks under one id (a submission answers
  one per id; the second was dropped with only a count before)."""
  import json

  from onn_jax import app, config
  from onn_jax.data.tasks import DataError
  task = {"train": [{"input": [[1]], "output": [[2]]}, {"input": [[3]], "output": [[4]]}],
          "test": [{"input": [[5]], "output": [[6]]}]}
  for name, test_input in (("a", 5), ("b", 5), ("c", 7)):
    (tmp_path / name).mkdir()
    (tmp_path / name / "t1.json").write_text(json.dumps(
        {**task, "test": [{"input": [[test_input]], "output": [[6]]}]}))
  same, other = f"{tmp_path / 'a'}+{tmp_path / 'b'}", f"{tmp_path / 'a'}+{tmp_path / 'c'}"
  tasks, duplicates = pipeline.load_joined(other, False)
  assert [t.id for t in tasks] == ["t1"] and tasks[0].test[0][0].tolist() == [[5]]
  assert duplicates == [pipeline.Duplicate("t1", str(tmp_path / "a"), str(tmp_path / "c"), False)]
  lines = []
  _, info = build_training_tasks(DataConfig(train=other, buckets=(128,)), log=lines.append)
  assert info["duplicates_removed"] == 1
  assert (f"1 task ids given twice, the first source's kept (1 with other contents, e.g. t1 in "
          f"{tmp_path / 'a'} and {tmp_path / 'c'})") in lines[0]
  cfg = config.load("default")
  said = []
  assert [t.id for t in app.load_eval_tasks(same, cfg, 0, 30, log=said.append)] == ["t1"]
  assert said == ["eval data: 1 task ids given twice, the first source's kept"]
  with pytest.raises(DataError, match=r"task t1 is in .*a and, with other contents, in .*c: a "
                     "submission answers one task per id"):
    app.load_eval_tasks(other, cfg, 0, 30)


def test_a_users_task_id_holding_loo_is_not_taken_for_a_leave_one_out_task():
  """Leave-one-out tasks are marked as made, not recognised by "/loo" in the id: a user's task
  "my/loop" (any string is an id in a challenges file) gets its leave-one-out sequences."""
  grid = np.ones((2, 2), np.int32)
  counts = []
  for task_id in ("abc", "my/loop"):
    tasks = [Task(task_id, [(grid, grid)] * 3, [(grid, None)]),
             Task("z", [(grid, grid)] * 3, [(grid, grid)])]
    counts.append(BatchStream(tasks, DataConfig(buckets=(256,)), 2, 0).num_items)
  assert counts[0] == counts[1] == 3 + 3 + 1
  loo = leave_one_out(Task("my/loop", [(grid, grid)] * 3, []))
  assert [t.loo_of for t in loo] == ["my/loop"] * 3
