"""Training data: the task set of a run, and a deterministic stream of fixed-shape batches.

:func:`build_training_tasks` turns a :class:`DataConfig` into the list of training tasks
(several sources joined, leakage guard against the evaluation split, size filter, optional
leave-one-out tasks from the evaluation demonstrations).

:class:`BatchStream` turns tasks into batches. The batch at step s depends only on (seed, s):
the bucket, the sampled sequences and every augmentation (D8 element, colour permutation, demo
order) are drawn from ``np.random.default_rng([seed, s, ...])``, so a resumed run, or another
process of the same run, sees exactly the same data.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Callable, Iterator, Sequence

import numpy as np

from onn_jax.config import DataConfig, data_sources
from onn_jax.data.augment import View, augment_task, color_permutation
from onn_jax.data.serialize import (Example, fit, grid_length, is_leave_one_out, leave_one_out,
                                    longest_answer)
from onn_jax.data.tasks import (DataError, Task, TaskList, filter_max_grid, load_tasks,
                                remove_leaked, same_contents)
from onn_jax.data.tokens import PAD

_STREAM_BATCH = 0  # rng stream ids, so per-batch and per-row draws never share a seed
_STREAM_ROW = 1
_STREAM_KIND = 2  # packed rows or a longer bucket, at a packing stage's step
# EAVI's answer budgets (BatchStream.answer_budgets) are multiples of this: the queries one
# program of NSA's block-choice kernel takes (nsa_pallas.CHOICE_TOKENS).
ANSWER_BUDGET_ALIGN = 64
_PACK_SAMPLES = 8  # packed batches (steps 0..7) that measure how many sequences one holds
_STREAM_FILL_SIM = 3  # the simulated packing that sets draw weights (data.pack_misses > 0)
_FILL_SIM_BATCHES = 400  # simulated batches of each step kind, a round
_FILL_SIM_ROUNDS = 3  # rounds of weights = 1 / acceptance (acceptance moves with the weights)
_FILL_BAND = 4  # acceptance is measured per band of lengths, this many alignment units wide
_FILL_MIN_DRAWS = 20  # simulated draws a band needs for its acceptance to count
_FILL_MIN_RATE = 0.25  # the lowest acceptance made up for (weights at most 4x)


def rows_within(length: int, batch_size: int, max_tokens: int, multiple: int = 1) -> int:
  """Rows of a batch whose rows hold ``length`` tokens: ``batch_size``, or with a token budget
  (``max_tokens`` > 0) ``max_tokens // length`` when that is fewer, rounded down to a multiple
  of ``multiple`` and at least one multiple (evaluation rounds to the device count; training
  keeps 1, so its batches never depend on the device layout)."""
  if not max_tokens:
    return batch_size
  return min(batch_size, max(multiple, max_tokens // length // multiple * multiple))


class Duplicate(typing.NamedTuple):
  """A task id that a later source of a "+" join gives again: dropped, the first kept."""
  task_id: str
  kept: str  # the source whose task is kept
  dropped: str
  same: bool  # whether both hold the same demonstrations and test pairs


def load_joined(spec: str, skip_bad: bool) -> tuple[TaskList, list[Duplicate]]:
  """Loads "a+b+c": the tasks (first occurrence of each id kept; with the malformed ones
  skipped in ``.skipped`` and ``.malformed_tests``, and each source's ``.notes``) and the
  duplicates dropped."""
  tasks = TaskList()
  first: dict[str, tuple[str, Task]] = {}
  duplicates: list[Duplicate] = []
  sources = data_sources(spec)
  for source in sources:
    if not source:
      raise DataError(f"data source list {spec!r} has an empty entry")
    try:
      loaded = load_tasks(source, skip_bad=skip_bad)
    except DataError as err:
      if len(sources) == 1 or os.path.exists(source):
        raise
      raise DataError(f"{err} ({spec!r} names {len(sources)} sources joined by '+')") from None
    tasks.skipped.extend(loaded.skipped)
    tasks.notes.extend(loaded.notes)
    for task_id, grids in loaded.malformed_tests.items():
      tasks.malformed_tests.setdefault(task_id, grids)
    for task in loaded:
      if task.id in first:
        kept_from, kept = first[task.id]
        duplicates.append(Duplicate(task.id, kept_from, source, same_contents(kept, task)))
        continue
      first[task.id] = (source, task)
      tasks.append(task)
  tasks.sort(key=lambda t: t.id)
  for task_id in set(first) & set(tasks.malformed_tests):  # read well from another source
    del tasks.malformed_tests[task_id]
  return tasks, duplicates


def duplicates_line(duplicates: Sequence[Duplicate]) -> str:
  """How many task ids a join gave twice, and how many of them with other contents."""
  other = [d for d in duplicates if not d.same]
  return (f"{len(duplicates)} task ids given twice, the first source's kept"
          + (f" ({len(other)} with other contents, e.g. {other[0].task_id} in {other[0].kept} "
             f"and {other[0].dropped})" if other else ""))


def build_training_tasks(cfg: DataConfig, log: Callable[[str], None] = print
                         ) -> tuple[list[Task], dict]:
  """The training tasks of a run, and an info dict of counts for the run's log.

  Steps: load ``cfg.train`` (sources joined by "+", a task id seen twice is kept once); when
  ``cfg.eval`` is set and ``cfg.leakage_guard``, drop tasks leaked from the evaluation split
  (:func:`remove_leaked`); keep tasks whose grids fit ``cfg.max_grid``; keep the first
  ``cfg.max_train_tasks`` by id (0: all); when ``cfg.hold_out_train_tests``, drop the training
  tasks' test pairs (each task then trains through the leave-one-out sequences of its
  demonstrations alone); when ``cfg.eval_demos``, add the leave-one-out tasks of every
  evaluation task (built from demonstrations only: test outputs are never read).

  Info keys: loaded, duplicates_removed, skipped_bad, leaked_removed, too_large,
  limit_removed, train_tasks, eval_demo_tasks, total (ints) and protocol (one line).
  """
  tasks, duplicates = load_joined(cfg.train, cfg.skip_bad)
  skipped = tasks.skipped
  info = {"loaded": len(tasks) + len(duplicates), "duplicates_removed": len(duplicates),
          "skipped_bad": len(skipped), "leaked_removed": 0, "too_large": 0, "limit_removed": 0,
          "eval_demo_tasks": 0}
  log(f"data: {info['loaded']} training tasks loaded from {cfg.train}"
      + (f"; {duplicates_line(duplicates)}" if duplicates else ""))
  for note in tasks.notes:
    log(f"data: {note}")
  for where, reason in skipped:
    log(f"data: skipped {where}: {reason}")
  if skipped:
    log(f"data: {len(skipped)} malformed tasks skipped")

  protocol = [f"train on {cfg.train}"]
  eval_tasks: list[Task] = []
  if cfg.eval and (cfg.leakage_guard or cfg.eval_demos):
    eval_tasks, _ = load_joined(cfg.eval, cfg.skip_bad)
    if eval_tasks.skipped:
      log(f"data: {len(eval_tasks.skipped)} malformed evaluation tasks skipped")
  if cfg.eval and cfg.leakage_guard:
    tasks, removed = remove_leaked(tasks, eval_tasks)
    info["leaked_removed"] = len(removed)
    log(f"data: leakage guard removed {len(removed)} training tasks sharing an id or an "
        f"(input, output) pair with {cfg.eval}")
    protocol.append(f"minus {len(removed)} tasks leaked from {cfg.eval}")
  elif cfg.eval:
    log(f"data: leakage guard is OFF; training may contain tasks of {cfg.eval}")
    protocol.append(f"leakage guard off vs {cfg.eval}")

  fitting = filter_max_grid(tasks, cfg.max_grid)
  info["too_large"] = len(tasks) - len(fitting)
  if info["too_large"]:
    log(f"data: {info['too_large']} tasks have a grid side > {cfg.max_grid} and are dropped")
    protocol.append(f"grids <= {cfg.max_grid}")
  tasks = fitting
  if cfg.max_train_tasks and len(tasks) > cfg.max_train_tasks:
    info["limit_removed"] = len(tasks) - cfg.max_train_tasks
    tasks = tasks[:cfg.max_train_tasks]
    protocol.append(f"first {cfg.max_train_tasks} by id")
  info["train_tasks"] = len(tasks)
  if cfg.hold_out_train_tests:
    tasks = [dataclasses.replace(t, test=[]) for t in tasks]
    log(f"data: the test pairs of the {len(tasks)} training tasks are held out")
    protocol.append("training tasks' test pairs held out")

  if cfg.eval_demos and cfg.eval:
    # Leave-one-out tasks read only each task's demonstrations: the test pairs (and the test
    # outputs above all) of an evaluation task never reach training.
    demo_tasks = filter_max_grid([lt for t in eval_tasks for lt in leave_one_out(t)],
                                 cfg.max_grid)
    info["eval_demo_tasks"] = len(demo_tasks)
    tasks = tasks + demo_tasks
    log(f"data: + {len(demo_tasks)} leave-one-out tasks from the demonstrations of "
        f"{len(eval_tasks)} {cfg.eval} tasks (test outputs unused)")
    protocol.append(f"plus leave-one-out of {cfg.eval} demonstrations (transductive, test "
                    "outputs unused)")
  elif cfg.eval_demos:
    log("data: eval_demos is set but data.eval is empty; no evaluation demonstrations added")
  if not tasks:
    raise DataError(
        f"data.train: no training task left of the {info['loaded']} loaded from {cfg.train} "
        f"({info['leaked_removed']} leaked from data.eval, {info['too_large']} with a grid "
        f"side > data.max_grid={cfg.max_grid}, {info['skipped_bad']} malformed)")
  info["total"] = len(tasks)
  info["protocol"] = "; ".join(protocol)
  log(f"data: {len(tasks)} training tasks ({info['protocol']})")
  return tasks, info


def collate(examples: Sequence[Example], length: int, answer_budget: int = 0
            ) -> dict[str, np.ndarray]:
  """Right-pads examples into a next-token batch of width ``length``.

  For an example with tokens t[0..n-1] (n <= length + 1): inputs = t[:-1], targets = t[1:],
  loss_mask = Example.loss_mask[1:] (the mask marks target tokens).

  Returns (B = len(examples), T = length):
    inputs int32 [B, T] (PAD-padded), targets int32 [B, T] (PAD where none),
    loss_mask float32 [B, T] (0 on padding), valid bool [B, T] (input is a real token),
    answer_start int32 [B] (index in inputs of the first answer token; the first answer token
    is predicted at targets index answer_start - 1), answer_len int32 [B].
  With ``answer_budget`` A > 0 also answer_tokens int32 [B, A]: each answer (END last; PAD
  after it, and an answer longer than A cut), whose width is EAVI's static answer budget
  (:func:`onn_jax.steps.answer_budget`; :attr:`BatchStream.answer_budgets`).
  A prompt (answer_len 0) loses its final OUT from inputs: feed Example.tokens to generate.
  """
  batch = len(examples)
  inputs_BT = np.full((batch, length), PAD, np.int32)
  targets_BT = np.full((batch, length), PAD, np.int32)
  loss_mask_BT = np.zeros((batch, length), np.float32)
  valid_BT = np.zeros((batch, length), bool)
  answer_start_B = np.zeros(batch, np.int32)
  answer_len_B = np.zeros(batch, np.int32)
  for b, ex in enumerate(examples):
    n = len(ex.tokens) - 1
    if n > length:
      raise ValueError(f"task {ex.task_id} test {ex.test_index}: {n + 1} tokens do not fit a "
                       f"batch of length {length} (at most {length + 1})")
    inputs_BT[b, :n] = ex.tokens[:-1]
    targets_BT[b, :n] = ex.tokens[1:]
    loss_mask_BT[b, :n] = ex.loss_mask[1:]
    valid_BT[b, :n] = True
    answer_start_B[b] = ex.answer_start
    answer_len_B[b] = ex.answer_len
  out = {"inputs": inputs_BT, "targets": targets_BT, "loss_mask": loss_mask_BT,
         "valid": valid_BT, "answer_start": answer_start_B, "answer_len": answer_len_B}
  if answer_budget > 0:
    answer_BA = np.full((batch, answer_budget), PAD, np.int32)
    for b, ex in enumerate(examples):
      tokens = ex.tokens[ex.answer_start:ex.answer_start + min(ex.answer_len, answer_budget)]
      answer_BA[b, :len(tokens)] = tokens
    out["answer_tokens"] = answer_BA
  return out


def collate_packed(rows: Sequence[Sequence[Example]], length: int, align: int
                   ) -> dict[str, np.ndarray]:
  """Packs each row's examples one after another into a next-token batch of width ``length``.

  Every example starts at a multiple of ``align`` (the model's
  :func:`onn_jax.model.attention.pack_alignment`); the gaps and the row's tail are padding.
  An example of n tokens takes n - 1 positions (inputs ``t[:-1]``, targets ``t[1:]``), as in
  :func:`collate`.

  Returns :func:`collate`'s ``inputs``, ``targets``, ``loss_mask``, ``valid``, and
    segment_start int32 [B, T]: the position where each token's sequence starts (padding
      belongs to the sequence before it; the model shows every sequence only itself);
    answer_mask float32 [B, T]: target positions that predict an answer token (incl. END).
  """
  batch = len(rows)
  out = {"inputs": np.full((batch, length), PAD, np.int32),
         "targets": np.full((batch, length), PAD, np.int32),
         "loss_mask": np.zeros((batch, length), np.float32),
         "valid": np.zeros((batch, length), bool),
         "segment_start": np.zeros((batch, length), np.int32),
         "answer_mask": np.zeros((batch, length), np.float32)}
  for b, examples in enumerate(rows):
    at = 0
    for ex in examples:
      n = len(ex.tokens) - 1
      if at + n > length:
        raise ValueError(f"task {ex.task_id} test {ex.test_index}: {n + 1} tokens do not fit "
                         f"row {b} at position {at} of {length}")
      out["inputs"][b, at:at + n] = ex.tokens[:-1]
      out["targets"][b, at:at + n] = ex.tokens[1:]
      out["loss_mask"][b, at:at + n] = ex.loss_mask[1:]
      out["valid"][b, at:at + n] = True
      out["segment_start"][b, at:] = at
      first = at + ex.answer_start - 1  # the position that predicts the first answer token
      out["answer_mask"][b, first:first + ex.answer_len] = 1.0
      at += packed_need(len(ex.tokens), align)
  return out


def _answer_length(task: Task, test_index: int, d8: bool) -> int:
  """Answer tokens of a test output (its grid, NEWLINEs and END), the longer orientation when
  D8 may transpose it."""
  h, w = np.shape(task.test[test_index][1])
  return max(grid_length((h, w)), grid_length((w, h)) if d8 else 0) + 1


def _item_lengths(task: Task, test_index: int, d8: bool) -> tuple[int, int]:
  """(shortest with one demo, with every demo) token counts of an item, over the orientations
  augmentation may produce (a transpose turns h * (w + 1) into w * (h + 1))."""
  inp, out = task.test[test_index]
  shortest = full = 0
  for transposed in ((False, True) if d8 else (False,)):
    def length(g: np.ndarray) -> int:
      return grid_length(g.shape[::-1] if transposed else g.shape)
    fixed = 3 + length(inp) + length(out) + 1
    demos = [2 + length(i) + length(o) for i, o in task.train]
    shortest = max(shortest, fixed + min(demos))
    full = max(full, fixed + sum(demos))
  return shortest, full


def packed_need(num_tokens, align: int):
  """Positions a sequence of ``num_tokens`` tokens takes in a packed row (it trains on all but
  the last as inputs), its start aligned to ``align``; works on arrays too."""
  return -(-(num_tokens - 1) // align) * align


def weighted_draw(cdf: np.ndarray, rng: np.random.Generator) -> int:
  """An index drawn with the probabilities whose cumulative sums are ``cdf``."""
  return min(int(np.searchsorted(cdf, rng.random(), side="right")), len(cdf) - 1)


def best_fit(room: np.ndarray, draw: Callable[[], int], allowed: int, align: int) -> list[int]:
  """Places drawn candidates in rows: each goes to the row with the least room that holds it.

  ``room``: each row's free positions (updated in place); ``draw()``: the positions the next
  candidate needs. Stops when no row has ``align`` positions left, or at the miss (a candidate
  that fits no row) after ``allowed`` of them. Returns each drawn candidate's row, -1 where it
  was passed over.
  """
  placed: list[int] = []
  misses = 0
  while room.max() >= align:
    need = draw()
    fits = np.flatnonzero(room >= need)
    if not fits.size:
      placed.append(-1)
      misses += 1
      if misses > allowed:
        break
      continue
    r = int(fits[np.argmin(room[fits])])
    room[r] -= need
    placed.append(r)
  return placed


class BatchStream:
  """An infinite, deterministic stream of fixed-shape next-token batches.

  Items are every (task, test index) with a known test output, plus the leave-one-out tasks of
  every task with >= 2 demos (so demonstrations are trained on too; tasks that are themselves
  leave-one-out tasks are not split again). An item goes to its bucket: the shortest bucket
  length L with room (L + 1 tokens) for it with all demos, else the longest one, where trailing
  demos are dropped; items that fit no bucket even with one demo are dropped and counted in
  ``num_too_long`` (``num_tasks_too_long``: tasks that lost every item so).

  A batch at bucket length L has ``rows[L]`` rows: ``batch_size``, or with ``data.max_batch_tokens``
  fewer at long buckets (:func:`rows_within`; at least one; they must divide over the
  processes, and :func:`onn_jax.parallel.check_batch` checks them against the devices).

  ``batch(step)`` draws the bucket with probability proportional to its item count over its
  rows, then ``rows`` items uniformly from it (so every item is equally likely overall), and
  augments row r from ``default_rng([seed, step, 1, r])``: a D8 element (cfg.d8), a colour
  permutation (cfg.color_perm), a demo order (cfg.shuffle_demos). Arrays have leading dimension
  ``rows // process_count``: this process's contiguous share of the global batch, which every
  process draws identically. Its ``answer_tokens`` are ``answer_budgets[bucket]`` wide: the
  longest answer in the bucket, or the ``answer_quantile`` quantile of its answers (EAVI's
  rollout and alignment budget; a longer answer is cut to it); with ``answer_tokens``
  False (streams whose batches are stacked across tasks, as test-time training's, where each
  task's budget would differ) they carry none.

  ``packed_batch(step)`` (``data.pack``) fills rows of ``data.pack_len`` (0: the longest bucket)
  with several sequences each (:func:`collate_packed`), drawn from the items of the buckets up
  to it (:meth:`pack_rows`: uniformly, or weighted so that they train uniformly). Items of
  longer buckets train in their bucket, one a row, unpacked (or with ``data.pack_fill``
  followed by items up to ``pack_len`` in the rest of the row): a step is theirs with
  probability proportional to the batches that draw each of them once (items over rows),
  against the packed rows' share (their items, less those the longer buckets' rows take, over
  the sequences a packed batch holds; means of steps 0-7), so every item is drawn about
  equally often whatever its bucket. Every process draws the whole
  packed batch and keeps its rows.
  """

  def __init__(self, tasks: Sequence[Task], cfg: DataConfig, batch_size: int, seed: int, *,
               process_index: int = 0, process_count: int = 1, start_step: int = 0,
               pack_align: int = 1, answer_tokens: bool = True,
               answer_quantile: float = 1.0):
    if batch_size < 1:
      raise ValueError(f"train.batch_size={batch_size} must be positive")
    if process_count < 1 or batch_size % process_count:
      raise ValueError(f"train.batch_size={batch_size} is not divisible by the process count "
                       f"{process_count}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} is not in 0..{process_count - 1}")
    if seed < 0:
      raise ValueError(f"train.seed={seed} must be >= 0")
    if not cfg.buckets or min(cfg.buckets) < 1:
      raise ValueError(f"data.buckets={cfg.buckets} must be a non-empty list of positive lengths")
    color_permutation(np.random.default_rng(0), cfg.color_perm)  # rejects an unknown mode now
    self.cfg = cfg
    self.batch_size = batch_size
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.start_step = start_step
    self.buckets = tuple(sorted(set(int(b) for b in cfg.buckets)))
    self.rows = [rows_within(b, batch_size, cfg.max_batch_tokens) for b in self.buckets]
    for b, rows in zip(self.buckets, self.rows):
      if rows % process_count:
        raise ValueError(f"data.max_batch_tokens={cfg.max_batch_tokens} gives bucket {b} {rows} "
                         f"rows, which do not divide over {process_count} processes")
    self.pack_len = cfg.packed_len
    if self.pack_len not in self.buckets:
      raise ValueError(f"data.pack_len={cfg.pack_len} is not one of data.buckets {cfg.buckets}")
    if pack_align < 1:
      raise ValueError(f"pack alignment {pack_align} must be positive")
    self.pack_align = pack_align

    items: list[tuple[Task, int]] = []
    origin: list[int] = []  # the index in ``tasks`` each item comes from
    for k, task in enumerate(tasks):
      n = len(items)
      items.extend((task, i) for i, (_, out) in enumerate(task.test) if out is not None)
      if not is_leave_one_out(task):
        items.extend((loo, 0) for loo in leave_one_out(task))
      origin.extend([k] * (len(items) - n))
    # Tasks that give no sequence at all: no known test output and fewer than 2 demonstrations
    # (leave-one-out needs two).
    self.num_tasks_empty = len(tasks) - len(set(origin))
    if not items:
      raise DataError(f"data.train: none of the {len(tasks)} training tasks gives a sequence "
                      "(each needs a test output or at least 2 demonstrations)")
    longest = self.buckets[-1] + 1
    self.items: list[tuple[Task, int]] = []
    self.item_tokens: list[int] = []  # tokens with every demo (any orientation), capped
    bucket_of: list[int] = []
    self.num_too_long = 0
    kept_tasks: set[int] = set()
    for (task, test_index), k in zip(items, origin):
      shortest, full = _item_lengths(task, test_index, cfg.d8)
      if shortest > longest:
        self.num_too_long += 1
        continue
      kept_tasks.add(k)
      self.items.append((task, test_index))
      self.item_tokens.append(min(full, longest))
      bucket_of.append(next((k for k, b in enumerate(self.buckets) if full <= b + 1),
                            len(self.buckets) - 1))
    self.num_tasks_too_long = len(set(origin) - kept_tasks)
    if not self.items:
      raise DataError(f"data.buckets: no training sequence fits the longest bucket "
                      f"{self.buckets[-1]} even with one demonstration ({self.num_too_long} "
                      f"sequences of {len(tasks)} tasks)")
    # Answer tokens of each item, its longer orientation under D8 (EAVI's rollout length).
    self.item_answer = np.array([_answer_length(task, test_index, cfg.d8)
                                 for task, test_index in self.items], np.int64)
    bucket_of_arr = np.array(bucket_of)
    self.bucket_items = [np.flatnonzero(bucket_of_arr == k) for k in range(len(self.buckets))]
    # EAVI's answer budget in each bucket (the width of its batches' answer_tokens): the
    # ``answer_quantile`` quantile of the bucket's items' answers (an answer of the bucket; 1:
    # the longest; eavi.budget_quantile), rounded up to ANSWER_BUDGET_ALIGN, at most the
    # bucket's length and (not below that answer) the longest one data.max_grid allows.
    self.answer_tokens = answer_tokens
    self.answer_budgets = []
    for length, ix in zip(self.buckets, self.bucket_items):
      longest = (int(np.quantile(self.item_answer[ix], answer_quantile, method="higher"))
                 if len(ix) else 1)
      self.answer_budgets.append(min(length, max(longest, longest_answer(cfg.max_grid)),
                                     -(-longest // ANSWER_BUDGET_ALIGN) * ANSWER_BUDGET_ALIGN))
    self._cells: dict[tuple[int, ...], tuple[list[tuple[int, np.ndarray]], np.ndarray]] = {}
    counts = np.array([len(ix) for ix in self.bucket_items], np.float64)
    weights = counts * (batch_size / np.array(self.rows))  # batches that draw each item once
    self.bucket_probs = weights / weights.sum()
    packed = self.buckets.index(self.pack_len)
    self.pack_items = np.concatenate(self.bucket_items[:packed + 1])  # in item order
    self.pack_items.sort()
    self._fill_cdf: np.ndarray | None = None  # uniform draws of the items up to pack_len
    self.kind_probs = self._kind_probs(counts)
    if cfg.pack and cfg.pack_misses > 0 and len(self.pack_items):
      self._fill_cdf = self._fill_draw_cdf(counts)
      self.kind_probs = self._kind_probs(counts)

  def _kind_probs(self, counts: np.ndarray) -> np.ndarray:
    """Probabilities of a packing stage's step kinds: packed rows, then each longer bucket (its
    own sequences one a row, with data.pack_fill shorter ones after them), each as likely as
    the batches it takes to draw each of its items once; packed rows for the short items that
    the longer buckets' rows do not take (none, if they take more than all: then the short
    items train more often than the long ones)."""
    packed = self.buckets.index(self.pack_len)
    if not self.cfg.pack or not counts[packed + 1:].any():
      return np.ones(1)
    longer = counts[packed + 1:] / np.array(self.rows[packed + 1:])
    packed_share = 0.0  # no sequence fits pack_len: every step is a longer bucket's
    if len(self.pack_items):
      # Draws of the items up to pack_len still wanted from packed rows: all of them, less
      # what the longer buckets' rows take in their rest (data.pack_fill), per batch drawn.
      wanted = float(len(self.pack_items))
      if self.cfg.pack_fill:
        for kind, batches in enumerate(longer, start=1):
          if batches:
            wanted -= batches * np.mean([sum(len(row) - 1 for row in self.pack_rows(s, kind))
                                         for s in range(_PACK_SAMPLES)])
      per_batch = np.mean([sum(map(len, self.pack_rows(k))) for k in range(_PACK_SAMPLES)])
      packed_share = max(wanted, 0.0) / per_batch
    kinds = np.concatenate([[packed_share], longer])
    return kinds / kinds.sum()

  def _fill_draw_cdf(self, counts: np.ndarray) -> np.ndarray:
    """The cumulative draw probabilities of the items up to pack_len with which they train
    equally often although packing passes over candidates that fit no row
    (``data.pack_misses`` > 0), the longer ones more often than the shorter.

    Each item is drawn with weight 1 / (the share of drawn candidates of its length band that
    a packed batch keeps), measured by packing lengths alone (each item's longest orientation)
    in simulated batches of every step kind, weighed by ``kind_probs``. The acceptance moves
    with the weights, so this is repeated a few rounds.
    """
    align, cfg = self.pack_align, self.cfg
    tokens = np.asarray(self.item_tokens)
    need = packed_need(tokens[self.pack_items], align)
    band = need // (_FILL_BAND * align)
    num_bands = int(band.max()) + 1
    packed = self.buckets.index(self.pack_len)
    kinds = [0] + ([k for k in range(1, len(self.kind_probs)) if counts[packed + k]]
                   if cfg.pack_fill else [])
    # [seed, 0, 3]: no batch's stream (a seed sequence pads with zeros: [seed, 3] would be the
    # stream of step 3's batch).
    rng = np.random.default_rng([self.seed, 0, _STREAM_FILL_SIM])
    own = {kind: packed_need(tokens[self.bucket_items[packed + kind]], align) for kind in kinds}
    weights = np.ones(len(need))
    for _ in range(_FILL_SIM_ROUNDS):
      cdf = np.cumsum(weights) / weights.sum()
      drawn, kept = np.zeros(num_bands), np.zeros(num_bands)
      draws = np.zeros(num_bands, np.int64)
      for kind in kinds:
        bucket = packed + kind
        length, num_rows = self.buckets[bucket], self.rows[bucket]
        for _ in range(_FILL_SIM_BATCHES):
          room = np.full(num_rows, length)
          if kind:  # each row's own sequence first
            room = np.maximum(0, room - own[kind][rng.integers(len(own[kind]), size=num_rows)])
          picks: list[int] = []

          def draw() -> int:
            picks.append(weighted_draw(cdf, rng))
            return int(need[picks[-1]])

          rows = np.array(best_fit(room, draw, int(cfg.pack_misses * num_rows), align), np.intp)
          drawn_bands = band[np.asarray(picks, np.intp)]  # none if the rows had no room
          share = self.kind_probs[kind] / _FILL_SIM_BATCHES
          drawn += share * np.bincount(drawn_bands, minlength=num_bands)
          kept += share * np.bincount(drawn_bands[rows >= 0], minlength=num_bands)
          draws += np.bincount(drawn_bands, minlength=num_bands)
      # A band drawn too rarely to measure keeps weight 1; none gets more than 1 / _FILL_MIN_RATE
      # (a band no row keeps, e.g. too long for every long row's rest and no packed steps).
      rate = np.where(draws >= _FILL_MIN_DRAWS, kept / np.maximum(drawn, 1e-12), 1.0)
      weights = 1.0 / np.clip(rate[band], _FILL_MIN_RATE, 1.0)
    return np.cumsum(weights) / weights.sum()

  @property
  def num_items(self) -> int:
    return len(self.items)

  def _example(self, item: int, step: int, row: int, capacity: int) -> Example:
    task, test_index = self.items[item]
    cfg = self.cfg
    rng = np.random.default_rng([self.seed, step, _STREAM_ROW, row])
    d8 = int(rng.integers(8)) if cfg.d8 else 0
    perm = color_permutation(rng, cfg.color_perm)
    order = rng.permutation(len(task.train)) if cfg.shuffle_demos else None
    view = View(d8=d8, perm=tuple(int(c) for c in perm))
    one_test = dataclasses.replace(task, test=[task.test[test_index]])
    seen = augment_task(one_test, view, order)
    test_in, test_out = seen.test[0]
    kw = dict(loss_on=cfg.loss_on, task_id=task.id, test_index=test_index)
    example = fit(seen.train, test_in, test_out, capacity, **kw)
    if example is None:
      # The drawn order put a long demo first; with the shortest demo first the item fits, as
      # checked when it was assigned a bucket.
      demos = sorted(seen.train, key=lambda p: grid_length(p[0].shape) + grid_length(p[1].shape))
      example = fit(demos, test_in, test_out, capacity, **kw)
    assert example is not None, (task.id, test_index, capacity)
    return example

  def _mine(self, rows: int) -> range:
    """This process's rows of a global batch of ``rows`` rows."""
    share = rows // self.process_count
    return range(self.process_index * share, (self.process_index + 1) * share)

  def answer_cells(self, groups: tuple[int, ...]) -> tuple[list[tuple[int, np.ndarray]],
                                                          np.ndarray]:
    """([(bucket, items)], probabilities): each bucket's items split by answer length at the
    edges ``groups`` (a group holds answers in (previous edge, edge], the last one the rest),
    empty cells left out; a cell is drawn with probability proportional to its items over its
    bucket's rows, so that every item is as likely as in :meth:`batch` without groups."""
    if groups not in self._cells:
      cells, weights = [], []
      edges = [0, *groups, np.iinfo(np.int64).max]
      for k, pool in enumerate(self.bucket_items):
        answer = self.item_answer[pool]
        for lo, hi in zip(edges[:-1], edges[1:]):
          cell = pool[(answer > lo) & (answer <= hi)]
          if len(cell):
            cells.append((k, cell))
            weights.append(len(cell) / self.rows[k])
      self._cells[groups] = (cells, np.array(weights) / np.sum(weights))
    return self._cells[groups]

  def _drawn_bucket(self, rng: np.random.Generator, answer_groups: tuple[int, ...] = ()
                    ) -> tuple[int, np.ndarray]:
    """(bucket index, the items to draw rows from) of an unpacked batch: the first draw of its
    step's rng (a bucket, or with ``answer_groups`` a cell of :meth:`answer_cells`)."""
    if answer_groups:
      cells, probs = self.answer_cells(tuple(answer_groups))
      return cells[int(rng.choice(len(cells), p=probs))]
    bucket = int(rng.choice(len(self.buckets), p=self.bucket_probs))
    return bucket, self.bucket_items[bucket]

  def _packed_kind(self, step: int) -> int:
    """A packing stage's step: 0 for packed rows, k for the k-th bucket past ``pack_len``."""
    if len(self.kind_probs) == 1:
      return 0
    rng = np.random.default_rng([self.seed, step, _STREAM_KIND])
    return int(rng.choice(len(self.kind_probs), p=self.kind_probs))

  def length_at(self, step: int, packed: bool = False, answer_groups: tuple[int, ...] = ()
                ) -> int:
    """The row length of the batch at ``step`` (``packed``: of :meth:`packed_batch`, else of
    :meth:`batch` with ``answer_groups``), drawn as they draw it but without building it."""
    if packed:
      return self.buckets[self.buckets.index(self.pack_len) + self._packed_kind(step)]
    rng = np.random.default_rng([self.seed, step, _STREAM_BATCH])
    return self.buckets[self._drawn_bucket(rng, answer_groups)[0]]

  def batch(self, step: int, bucket: int | None = None, answer_groups: tuple[int, ...] = ()
            ) -> dict[str, np.ndarray]:
    """This process's rows of the global batch at ``step`` (see the class doc for keys), in a
    drawn bucket or the one given. ``answer_groups`` (edges in answer tokens): the rows come
    from one drawn cell of :meth:`answer_cells`, items of similar answer length."""
    rng = np.random.default_rng([self.seed, step, _STREAM_BATCH])
    if bucket is None:
      bucket, pool = self._drawn_bucket(rng, answer_groups)
    else:
      pool = self.bucket_items[bucket]
    picks = pool[rng.integers(0, len(pool), size=self.rows[bucket])]
    length = self.buckets[bucket]
    return collate([self._example(int(picks[r]), step, r, length + 1)
                    for r in self._mine(self.rows[bucket])], length,
                   self.answer_budgets[bucket] if self.answer_tokens else 0)

  def pack_rows(self, step: int, kind: int = 0) -> list[list[Example]]:
    """The examples in each row of the global packed batch at ``step``, augmented.

    ``kind`` 0: rows of ``data.pack_len``, empty at first. ``kind`` k (``data.pack_fill``):
    rows of the k-th bucket past it, each starting with the sequence :meth:`batch` draws for
    that row at that step (the same draw and augmentation), so that only their rest is filled.
    Candidates are drawn from the items up to ``data.pack_len`` and augmented in draw order
    (draw k uses row id k, after the rows' own sequences); each goes to the row with the least
    room that still holds it (:func:`best_fit`). The batch closes when no row has room left,
    or when more than ``data.pack_misses`` per row drew a candidate that fits no row (passed
    over). At 0 only the candidate that closes the batch is passed over, so what trains is what
    was drawn, uniformly; the candidate passed over is more often a long one, and a long
    bucket's rest holds fewer candidates than packed rows do, so the longer items train a
    little less often with ``data.pack_fill`` (arc1's data, steps 0-999: items of 1536-2048
    tokens 0.96x the mean, under 512 1.02x). Passing over more fills rows better but would
    favour short sequences (they fit the gaps), so then candidates are drawn with the weights
    of :meth:`_fill_draw_cdf` (arc1's data with ``pack_fill`` at ``pack_misses=1``: every
    length band 0.996-1.022x the mean, steps 0-999).
    """
    rng = np.random.default_rng([self.seed, step, _STREAM_BATCH])
    bucket = self.buckets.index(self.pack_len) + kind
    length, align, num_rows = self.buckets[bucket], self.pack_align, self.rows[bucket]
    rows: list[list[Example]] = [[] for _ in range(num_rows)]
    if kind:
      pool = self.bucket_items[bucket]
      picks = pool[rng.integers(0, len(pool), size=num_rows)]
      rows = [[self._example(int(picks[r]), step, r, length + 1)] for r in range(num_rows)]

    def need(example: Example) -> int:
      return packed_need(len(example.tokens), align)

    room = np.array([max(0, length - sum(map(need, row))) for row in rows])
    if not len(self.pack_items):
      return rows
    drawn: list[Example] = []

    def draw() -> int:
      if self._fill_cdf is None:
        item = int(self.pack_items[rng.integers(len(self.pack_items))])
      else:
        item = int(self.pack_items[weighted_draw(self._fill_cdf, rng)])
      drawn.append(self._example(item, step, num_rows * bool(kind) + len(drawn),
                                 self.item_tokens[item]))
      return need(drawn[-1])

    placed = best_fit(room, draw, int(self.cfg.pack_misses * num_rows), align)
    for example, r in zip(drawn, placed):
      if r >= 0:
        rows[r].append(example)
    return rows

  def packed_batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of a packing stage's batch at ``step``: packed rows
    (:func:`collate_packed`), or when the step is drawn for a bucket longer than
    ``data.pack_len`` that bucket's rows: unpacked, or with ``data.pack_fill`` packed after
    their own sequences (:meth:`pack_rows`)."""
    kind = self._packed_kind(step)
    bucket = self.buckets.index(self.pack_len) + kind
    if kind and not self.cfg.pack_fill:
      return self.batch(step, bucket)
    rows = self.pack_rows(step, kind)
    mine = self._mine(len(rows))
    return collate_packed(rows[mine.start:mine.stop], self.buckets[bucket], self.pack_align)

  def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Batches of steps start_step, start_step + 1, ... forever."""
    step = start_step
    while True:
      yield self.batch(step)
      step += 1

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self.iterate(self.start_step)
