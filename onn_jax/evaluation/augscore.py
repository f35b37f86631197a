"""The evaluation protocol, independent of the model: views, candidates, ranking, outputs.

The model enters through two callables, both batched over tasks and views:

- ``generate_fn(prompts, max_new, num_samples) -> per prompt [greedy, sample_1, ..]``: each
  prompt is an int32 [P] token array ending with OUT; each generation is the generated answer
  tokens, which should end with END (tokens after the first END are ignored). A generation
  without END that is shorter than ``max_new`` is taken to have stopped at an END that the
  caller dropped; one that used the whole budget was cut off and counts as malformed.
- ``logprob_fn(sequences, answer_starts) -> float [N]``: ``sequences[n]`` is a prompt followed
  by answer tokens incl. END, and the result is the teacher-forced total log-probability
  sum_{t >= answer_starts[n]} log p(x_t | x_<t) of those answer tokens.

Optionally ``prepare(kind, calls, num_samples)`` hears of every call before the first one
(``kind`` "generate": ``calls`` is ``[(prompt lengths, max_new)]`` in call order; "logprob":
``[(sequence lengths, 0)]``), so that a model can compile all the programs they need at once.

With ``group_of`` (a task -> int, e.g. the index of the task's own test-time-trained weights),
both are also given ``groups=``: the group of every prompt's or sequence's task, in order, so
one call can hold the rows of many tasks, each under its own weights.

Modes (for each test input):

- ``greedy``: the identity view, its greedy generation, no scoring.
- ``vote``: every view's generations, mapped back to the task's frame by the view's exact
  inverse and deduplicated; ranked by how many generations produced each candidate (ties: the
  one seen first, views in order, greedy before samples).
- ``augscore``: the same candidates, each scored by
  ``score(c) = sum_v log p(v(c) | prompt_v)`` over the views v (one teacher-forced pass per
  candidate and view), ranked by score (ties: votes, then first seen).

Length rule (:func:`fit_prompt`): while prompt plus answer exceed ``max_len``, the largest
demonstration is dropped (the others keep their order), down to one demonstration (training
never sees fewer); a test input whose prompt was cut so is counted as ``shortened``. For generation the answer's room is
estimated from the largest demo output or the test input in that view; for scoring, every
candidate of a test input shares one prompt per view that holds the largest of them, so the
candidates' scores are comparable. A view that does not fit even with one demonstration is left out
(``skipped`` when no view fits). Every test input is answered: one without any candidate (no
view fitted, or every generation was malformed) submits the fallback, its own test input, as
both attempts, and is counted as ``fallback``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from onn_jax import output
from onn_jax.data.augment import NUM_D8, View, color_permutation
from onn_jax.data.serialize import (decode_grid, encode_grid, grid_length, longest_answer,
                                    sequence_length, serialize)
from onn_jax.data.tasks import Task
from onn_jax.data.tokens import END
from onn_jax.evaluation.scoring import has_solutions, score_submission, validate_submission
from onn_jax.evaluation.submission import build_submission, grid_to_list, write_submission

MODES = ("greedy", "vote", "augscore")
MAX_ANSWER_TOKENS = longest_answer(30)  # a 30x30 grid, its NEWLINEs and END

GenerateFn = Callable[[list[np.ndarray], int, int], Sequence[Sequence[np.ndarray]]]
LogprobFn = Callable[[list[np.ndarray], list[int]], np.ndarray]
PrepareFn = Callable[[str, list[tuple[list[int], int]], int], None]


def make_views(num_color_perms: int = 0, color_mode: str = "1-9", seed: int = 0) -> list[View]:
  """The 8 D8 views with identity colours (identity first), then, for each D8 element in order,
  ``num_color_perms`` views with a distinct non-identity colour permutation drawn
  deterministically from ``seed`` under ``color_mode`` (``1-9`` or ``all``)."""
  if num_color_perms < 0:
    raise ValueError(f"num_color_perms must be >= 0, got {num_color_perms}")
  views = [View(d8=k) for k in range(NUM_D8)]
  if num_color_perms == 0:
    return views
  if color_mode == "none":
    raise ValueError(
        f"{num_color_perms} colour-permuted views need a colour mode other than 'none'")
  rng = np.random.default_rng(seed)
  identity = tuple(range(10))
  for k in range(NUM_D8):
    seen = {identity}
    for _ in range(num_color_perms):
      for _ in range(1000):
        perm = tuple(int(c) for c in color_permutation(rng, color_mode))
        if perm not in seen:
          break
      else:
        raise ValueError(f"could not draw {num_color_perms} distinct {color_mode} permutations")
      seen.add(perm)
      views.append(View(d8=k, perm=perm))
  return views


def _key(grid: np.ndarray) -> tuple:
  """Identity of a grid for deduplication: its shape and its values."""
  return grid.shape, np.ascontiguousarray(grid, dtype=np.int8).tobytes()


def _answer_tokens(grid: np.ndarray) -> np.ndarray:
  """The answer an [h, w] grid makes: its tokens then END, int32 [h * (w + 1) + 1]."""
  return np.asarray(encode_grid(grid) + [END], np.int32)


def parse_generation(tokens: Any, max_new: int) -> np.ndarray | None:
  """An int32 [h, w] grid from one generation, or None if it is malformed (see module doc)."""
  array = np.asarray(tokens)
  if array.ndim == 1 and array.dtype.kind in "iu" and not np.any(array == END) \
      and len(array) < max_new:
    array = np.append(array, END)
  return decode_grid(array)


@dataclasses.dataclass
class _Item:
  """Book-keeping for one (task, test input) while it is evaluated."""
  task: Task
  test_index: int
  keys: dict[tuple, int] = dataclasses.field(default_factory=dict)
  candidates: list[np.ndarray] = dataclasses.field(default_factory=list)
  counts: list[int] = dataclasses.field(default_factory=list)
  malformed: int = 0
  generations: int = 0
  gen_views: int = 0
  score_views: int = 0
  shortened: bool = False
  scores: np.ndarray | None = None

  def add(self, grid: np.ndarray) -> None:
    key = _key(grid)
    if key in self.keys:
      self.counts[self.keys[key]] += 1
    else:
      self.keys[key] = len(self.candidates)
      self.candidates.append(grid)
      self.counts.append(1)


def _view_task(task: Task, test_index: int, view: View) -> tuple[list, np.ndarray]:
  demos = [(view.apply(np.asarray(i)), view.apply(np.asarray(o))) for i, o in task.train]
  return demos, view.apply(np.asarray(task.test[test_index][0]))


def fit_prompt(demos: list, test_input: np.ndarray, room: int, max_len: int
               ) -> tuple[np.ndarray | None, int]:
  """(prompt, demos dropped): the prompt (int32 [P], ending with OUT) leaving ``room`` tokens
  for the answer, the largest demonstrations dropped first until it fits (ties: the later
  one), keeping at least one, as training does (a prompt without any demonstration is never
  trained on); (None, len(demos)) when it does not fit even with its smallest one."""
  alone = sequence_length([], test_input)
  sizes = [sequence_length([pair], test_input) - alone for pair in demos]
  budget = max_len - room - alone
  kept = set(range(len(demos)))
  for d in sorted(kept, key=lambda d: (-sizes[d], -d)):
    if sum(sizes[k] for k in kept) <= budget or len(kept) == 1:
      break
    kept.remove(d)
  if sum(sizes[k] for k in kept) > budget:
    return None, len(demos)
  example = serialize([demos[d] for d in sorted(kept)], test_input)
  return np.asarray(example.tokens, np.int32), len(demos) - len(kept)


def _batches(order: Sequence[int], batch_size: int) -> Iterable[list[int]]:
  for start in range(0, len(order), batch_size):
    yield list(order[start:start + batch_size])


def _groups(items: list[_Item], group_of: Callable[[Task], int] | None, rows: Sequence[int]
            ) -> dict[str, list[int]]:
  """``{"groups": [group of each row's item]}`` for the model calls, or {} without group_of."""
  if group_of is None:
    return {}
  return {"groups": [int(group_of(items[i].task)) for i in rows]}


def _generation_jobs(items: list[_Item], views: Sequence[View], *, max_len: int, batch_size: int,
                     max_answer_tokens: int):
  """Every (item, view) prompt that fits, as jobs (item, view, prompt), in length-sorted
  batches of job indices with each batch's answer budget. Counts the views and shortened
  prompts into the items."""
  jobs: list[tuple[int, int, np.ndarray]] = []
  rooms: list[int] = []  # the answer room each prompt was fitted with
  for i, item in enumerate(items):
    for v, view in enumerate(views):
      demos, test_input = _view_task(item.task, item.test_index, view)
      # Room for an answer as large as the largest output seen or the test input, in this view.
      room = max([grid_length(np.shape(o)) for _, o in demos] + [grid_length(test_input.shape)])
      room = min(room + 1, max_answer_tokens)
      prompt, dropped = fit_prompt(demos, test_input, room, max_len)
      if prompt is not None:
        jobs.append((i, v, prompt))
        rooms.append(room)
        item.gen_views += 1
        item.shortened |= dropped > 0
  # Longest first: similar lengths share a batch (less padding, a fair max_new), and the
  # largest batch runs first so an out-of-memory shows at once.
  order = sorted(range(len(jobs)), key=lambda j: -len(jobs[j][2]))
  batches = _room_batches(order, [len(prompt) for _, _, prompt in jobs], rooms, batch_size,
                          max_len)
  budget_of = [min(max_answer_tokens, max_len - max(len(jobs[j][2]) for j in batch))
               for batch in batches]
  return jobs, batches, budget_of


def _room_batches(order: Sequence[int], lengths: Sequence[int], rooms: Sequence[int],
                  batch_size: int, max_len: int) -> list[list[int]]:
  """Batches of up to ``batch_size`` jobs, taken in ``order``, whose shared answer budget
  (``max_len`` less the batch's longest prompt) leaves each job the room its prompt was fitted
  with: a job that a batch's longer prompt would cut short waits for a later batch (before,
  a short prompt with a large answer beside a long one lost its answer's end, and the result
  depended on ``eval.batch_size``). Where every job fits, the batches are ``order``'s runs."""
  batches, pending = [], list(order)
  while pending:
    batch, later, longest, room = [], [], 0, 0
    for n, j in enumerate(pending):
      if len(batch) == batch_size:
        later.extend(pending[n:])
        break
      if not batch or max(longest, lengths[j]) + max(room, rooms[j]) <= max_len:
        batch.append(j)
        longest, room = max(longest, lengths[j]), max(room, rooms[j])
      else:
        later.append(j)
    batches.append(batch)
    pending = later
  return batches


def generation_calls(tasks: Sequence[Task], *, mode: str = "augscore",
                     views: Sequence[View] | None = None, max_len: int, batch_size: int,
                     max_answer_tokens: int = MAX_ANSWER_TOKENS) -> list[tuple[list[int], int]]:
  """The generation calls :func:`evaluate` with these arguments will make (and announce to its
  ``prepare``): ``[(prompt lengths, max_new)]``, without running any. For compiling ahead."""
  views = _mode_views(mode, views)
  items = [_Item(task, t) for task in tasks for t in range(len(task.test))]
  jobs, batches, budget_of = _generation_jobs(items, views, max_len=max_len,
                                              batch_size=batch_size,
                                              max_answer_tokens=max_answer_tokens)
  return _announced(jobs, batches, budget_of)


def scoring_calls(generation: list[tuple[list[int], int]], max_len: int
                  ) -> list[tuple[list[int], int]]:
  """Scoring calls (as ``prepare`` hears of them) that cover, before any candidate exists, the
  lengths the scoring of these generation calls (:func:`generation_calls`) can meet: one
  sequence a call, from the shortest prompt plus an answer token and END to the longest prompt
  plus its budget (at most ``max_len``), each twice the last, so that every length band of a
  power of two between them is met once. For compiling ahead; a scoring prompt can hold fewer
  demonstrations than its generation prompt, so a shorter length may still turn up."""
  if not generation:
    return []
  shortest = min(min(lengths) for lengths, _ in generation) + 2
  longest = min(max_len, max(max(lengths) + max_new for lengths, max_new in generation))
  calls, n = [], shortest
  while n < longest:
    calls.append(([n], 0))
    n *= 2
  return calls + [([longest], 0)]


def _announced(jobs, batches, budget_of) -> list[tuple[list[int], int]]:
  """The generation calls as ``prepare`` hears of them: [(prompt lengths, max_new)]."""
  return [([len(jobs[j][2]) for j in batch], max_new)
          for batch, max_new in zip(batches, budget_of)]


def _mode_views(mode: str, views: Sequence[View] | None) -> Sequence[View]:
  """The views a mode generates under: the identity alone in greedy mode, else ``views`` (the
  8 D8 views when None)."""
  if mode == "greedy":
    return [View()]
  return make_views(0) if views is None else views


def _generate(items: list[_Item], views: Sequence[View], generate_fn: GenerateFn, *,
              max_len: int, batch_size: int, samples: int, max_answer_tokens: int,
              progress: bool, group_of: Callable[[Task], int] | None = None,
              prepare: PrepareFn | None = None) -> None:
  """Builds every (item, view) prompt, generates in length-sorted batches, collects candidates.

  Candidates are added in (item, view, greedy-then-samples) order whatever the batching, so
  "first seen" does not depend on batch_size.
  """
  jobs, batches, budget_of = _generation_jobs(items, views, max_len=max_len,
                                              batch_size=batch_size,
                                              max_answer_tokens=max_answer_tokens)
  outputs: list[Sequence[np.ndarray] | None] = [None] * len(jobs)
  budgets = [0] * len(jobs)
  if prepare is not None and batches:
    prepare("generate", _announced(jobs, batches, budget_of), samples)
  bar = output.progress(len(jobs), "generate", enabled=progress, unit="seq", leave=False)
  for batch, max_new in zip(batches, budget_of):
    prompts = [jobs[j][2] for j in batch]
    results = generate_fn(prompts, max_new, samples,
                          **_groups(items, group_of, [jobs[j][0] for j in batch]))
    if len(results) != len(prompts):
      raise ValueError(f"generate_fn returned {len(results)} results for {len(prompts)} prompts")
    for j, result in zip(batch, results):
      outputs[j] = result
      budgets[j] = max_new
    bar.update(len(batch))
  bar.close()
  for j, (i, v, _) in enumerate(jobs):
    item = items[i]
    for tokens in outputs[j]:
      item.generations += 1
      grid = parse_generation(tokens, budgets[j])
      if grid is None:
        item.malformed += 1
      else:
        item.add(views[v].invert(grid).astype(np.int32))


def _score(items: list[_Item], views: Sequence[View], logprob_fn: LogprobFn, *, max_len: int,
           batch_size: int, progress: bool, group_of: Callable[[Task], int] | None = None,
           prepare: PrepareFn | None = None) -> None:
  """Sets item.scores[c] = sum over usable views v of log p(v(c) | prompt_v) (batched)."""
  pairs: list[tuple[int, int, np.ndarray, int]] = []  # (item, candidate, sequence, answer start)
  for i, item in enumerate(items):
    if not item.candidates:
      continue
    item.scores = np.zeros(len(item.candidates))
    for view in views:
      answers = [_answer_tokens(view.apply(c)) for c in item.candidates]
      demos, test_input = _view_task(item.task, item.test_index, view)
      room = max(len(a) for a in answers)
      prompt, dropped = fit_prompt(demos, test_input, room, max_len)
      if prompt is None:
        continue  # this view cannot hold the largest candidate: left out for all of them
      item.score_views += 1
      item.shortened |= dropped > 0
      for c, answer in enumerate(answers):
        pairs.append((i, c, np.concatenate([prompt, answer]), len(prompt)))
  order = sorted(range(len(pairs)), key=lambda p: -len(pairs[p][2]))
  batches = list(_batches(order, batch_size))
  if prepare is not None and batches:
    prepare("logprob", [([len(pairs[p][2]) for p in batch], 0) for batch in batches], 0)
  bar = output.progress(len(pairs), "score", enabled=progress, unit="seq", leave=False)
  for batch in batches:
    logprobs = np.asarray(logprob_fn([pairs[p][2] for p in batch], [pairs[p][3] for p in batch],
                                     **_groups(items, group_of, [pairs[p][0] for p in batch])),
                          np.float64).reshape(-1)
    if len(logprobs) != len(batch):
      raise ValueError(f"logprob_fn returned {len(logprobs)} values for {len(batch)} sequences")
    for p, logprob in zip(batch, logprobs):
      i, c = pairs[p][0], pairs[p][1]
      # NaN would make the ranking arbitrary; it counts as impossible instead.
      items[i].scores[c] += logprob if not math.isnan(logprob) else -math.inf
    bar.update(len(batch))
  bar.close()


def _record(item: _Item, mode: str) -> dict:
  n = len(item.candidates)
  if mode == "augscore" and item.scores is not None and item.score_views > 0:
    scores = [float(s) for s in item.scores]
    order = sorted(range(n), key=lambda c: (-scores[c], -item.counts[c], c))
  else:
    scores = [float(k) for k in item.counts]
    order = sorted(range(n), key=lambda c: (-item.counts[c], c))
  ranked = [item.candidates[c] for c in order]
  fallback = not ranked
  if fallback:  # nothing to submit: the test input itself, as both attempts
    ranked = [np.asarray(item.task.test[item.test_index][0], np.int32)]
  target = item.task.test[item.test_index][1]
  correct_1 = correct_2 = rank = None
  if target is not None:
    target = np.asarray(target)
    rank = next((r + 1 for r, g in enumerate(ranked)
                 if g.shape == target.shape and np.array_equal(g, target)), None)
    correct_1, correct_2 = rank == 1, rank in (1, 2)
  return {
      "task_id": item.task.id,
      "test_index": item.test_index,
      "mode": mode,
      "candidates": list(item.candidates),
      "counts": list(item.counts),
      "scores": scores,
      "order": order,
      "ranked": ranked,
      "malformed": item.malformed,
      "generations": item.generations,
      "views": item.gen_views,
      "score_views": item.score_views,
      "skipped": item.gen_views == 0,
      "shortened": item.shortened,
      "fallback": fallback,
      "correct_1": correct_1,
      "correct_2": correct_2,
      "rank": rank,  # of the right answer among the ranked candidates (None: not among them)
  }


def evaluate(tasks: Sequence[Task], *, mode: str = "augscore", views: Sequence[View] | None = None,
             generate_fn: GenerateFn, logprob_fn: LogprobFn | None = None, max_len: int,
             batch_size: int, samples: int = 0, max_answer_tokens: int = MAX_ANSWER_TOKENS,
             group_of: Callable[[Task], int] | None = None, progress: bool = True,
             prepare: PrepareFn | None = None) -> list[dict]:
  """Evaluates every test input of ``tasks``; one record per (task id, test index), in order.

  A record holds ``candidates`` (int32 [h, w] grids in the task's frame, deduplicated, in the
  order first seen), ``counts`` (generations that produced each), ``scores`` (summed answer
  log-probabilities in ``augscore`` mode, else the counts), ``order`` and ``ranked`` (the
  candidates best first), ``malformed`` (generations that did not parse), ``generations``,
  ``views`` (views whose prompt fitted), ``score_views``, ``skipped`` (no view fitted),
  ``shortened`` (demonstrations were dropped to fit), ``fallback`` (no candidate: ``ranked``
  holds the test input alone) and ``correct_1`` / ``correct_2`` (None without a solution).

  ``views`` defaults to the 8 D8 views; ``greedy`` mode always uses the identity view alone and
  no samples. Every prompt plus ``max_new`` tokens fits ``max_len``, with ``max_new`` at most
  ``max_answer_tokens``. ``group_of``, ``prepare``: see the module doc (per-task weights in
  one call; the calls announced ahead).
  """
  if mode not in MODES:
    raise ValueError(f"eval mode {mode!r} is not one of {', '.join(MODES)}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if samples < 0:
    raise ValueError(f"samples must be >= 0, got {samples}")
  if max_answer_tokens < 3:  # the smallest answer, a 1x1 grid, is colour NEWLINE END
    raise ValueError(f"max_answer_tokens must be >= 3, got {max_answer_tokens}")
  if mode == "augscore" and logprob_fn is None:
    raise ValueError("augscore mode needs a logprob_fn")
  views = _mode_views(mode, views)
  if mode == "greedy":
    samples = 0
  if not views:
    raise ValueError("no views to evaluate")
  items = [_Item(task, t) for task in tasks for t in range(len(task.test))]
  _generate(items, views, generate_fn, max_len=max_len, batch_size=batch_size, samples=samples,
            max_answer_tokens=max_answer_tokens, progress=progress, group_of=group_of,
            prepare=prepare)
  if mode == "augscore":
    _score(items, views, logprob_fn, max_len=max_len, batch_size=batch_size, progress=progress,
           group_of=group_of, prepare=prepare)
  return [_record(item, mode) for item in items]


def ranked_by_task(records: Sequence[dict], tasks: Sequence[Task]) -> dict[str, list[list]]:
  """task id -> per test input its ranked candidates ([] where no record exists)."""
  by_key = {(r["task_id"], r["test_index"]): r["ranked"] for r in records}
  return {task.id: [list(by_key.get((task.id, t), [])) for t in range(len(task.test))]
          for task in tasks}


def summarise(records: Sequence[dict], tasks: Sequence[Task], mode: str | None = None) -> dict:
  """The evaluation's numbers: ``score``, ``pass@1``, ``pass@2``, ``num_tasks``, ``per_task``
  (official scoring of the submission the records make), ``malformed``, ``mode`` and counts.
  Without solutions the scores are left out and ``"scores": "omitted: no solutions"`` says so.
  """
  if mode is None:
    mode = records[0]["mode"] if records else "unknown"
  summary: dict[str, Any] = {
      "mode": mode,
      "num_tasks": len(tasks),
      "num_test_inputs": sum(len(task.test) for task in tasks),
      "malformed": int(sum(r["malformed"] for r in records)),
      "generations": int(sum(r["generations"] for r in records)),
      "skipped": int(sum(bool(r["skipped"]) for r in records)),
      "shortened": int(sum(bool(r.get("shortened")) for r in records)),
      "fallback": int(sum(bool(r.get("fallback")) for r in records)),
      "mean_candidates": float(np.mean([len(r["candidates"]) for r in records]))
                         if records else 0.0,
  }
  if tasks and has_solutions(tasks):
    summary.update(score_submission(build_submission(ranked_by_task(records, tasks)), tasks))
    summary["solved"] = int(sum(r["correct_2"] is True for r in records))
    summary["found"] = int(sum(r["rank"] is not None for r in records))
    summary["by_size"] = by_size(tasks, summary["per_task"])
  else:
    unknown = sum(out is None for task in tasks for _, out in task.test)
    total = summary["num_test_inputs"]
    summary["scores"] = ("omitted: no solutions" if unknown == total else
                         f"omitted: {unknown} of {total} test outputs have no solution")
  return summary


def task_cells(task: Task) -> int:
  """A task's size: the cells of its demonstrations' grids and of its test inputs."""
  return int(sum(np.size(i) + np.size(o) for i, o in task.train)
             + sum(np.size(i) for i, _ in task.test))


def by_size(tasks: Sequence[Task], per_task: dict[str, float], parts: int = 4) -> list[dict]:
  """The official score of each quarter (``parts``) of the tasks by :func:`task_cells`,
  smallest first: ``[{"cells": [fewest, most], "tasks": n, "score": s}]``."""
  ordered = sorted(tasks, key=lambda task: (task_cells(task), task.id))
  groups = np.array_split(np.arange(len(ordered)), min(parts, len(ordered)))
  return [{"cells": [task_cells(ordered[g[0]]), task_cells(ordered[g[-1]])],
           "tasks": len(g), "score": float(np.mean([per_task[ordered[k].id] for k in g]))}
          for g in groups if len(g)]


def describe(summary: dict, out_dir: str | Path | None = None) -> str:
  """The summary in words, e.g. for the last line of a run."""
  s = summary
  parts = []
  if "solved" in s:
    parts.append(f"solved {s['solved']} of {s['num_test_inputs']} test outputs of "
                 f"{s['num_tasks']} tasks (official score {s['score']:.1%}, "
                 f"pass@1 {s['pass@1']:.1%}); the right answer among the candidates for "
                 f"{s['found']}")
  else:
    why = s.get("scores", "omitted: no solutions").removeprefix("omitted: ")
    parts.append(f"answered {s['num_test_inputs']} test inputs of {s['num_tasks']} tasks "
                 f"({why}: not scored)")
  parts.append(f"{s['malformed']} of {s['generations']} generations malformed (no parsable "
               f"grid); {s['mean_candidates']:.1f} distinct candidates per test input")
  if s.get("shortened"):
    parts.append(f"{s['shortened']} test inputs shortened (largest demonstrations dropped "
                 "to fit the evaluation's length limit)")
  if s.get("fallback"):
    parts.append(f"{s['fallback']} without a candidate answered with their test input "
                 f"({s['skipped']} of them too long to attempt)")
  if out_dir is not None:
    parts.append(f"scores in {Path(out_dir) / 'scores.json'}")
  return "; ".join(parts)


def write_outputs(records: Sequence[dict], tasks: Sequence[Task], out_dir: str | Path,
                  mode: str, extra: dict | None = None, sheet_tasks: int = 8) -> dict:
  """Writes into ``out_dir``: ``submission.json`` (validated), ``scores.json`` (summary plus
  ``extra``; summary keys win), ``results.jsonl`` (one line per test input) and ``sheet.png``
  (test input, target and both attempts for the first ``sheet_tasks`` tasks; none at 0).
  Returns the scores dict.

  The malformed tasks loading skipped (``tasks.malformed_tests``, see TaskList) are answered
  in submission.json too, each test input with itself (``[[0]]`` where it cannot be read, one
  such entry where not even the test list can): every task given has its answers. They are
  not scored."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  ranked = ranked_by_task(records, tasks)
  submission = build_submission(ranked)
  validate_submission(submission, tasks)
  malformed = {task_id: [[] if grid is None else [grid] for grid in grids] or [[]]
               for task_id, grids in getattr(tasks, "malformed_tests", {}).items()
               if task_id not in submission}
  submission.update(build_submission(malformed))
  write_submission(submission, out_dir / "submission.json")

  scores = summarise(records, tasks, mode)
  for key, value in (extra or {}).items():
    scores.setdefault(key, value)
  with open(out_dir / "scores.json", "w") as f:  # (a NaN, e.g. a diverged TTT's CE: null)
    json.dump(output.jsonable(scores), f, indent=2, allow_nan=False)

  with open(out_dir / "results.jsonl", "w") as f:
    for r in records:
      f.write(json.dumps({
          "task_id": r["task_id"],
          "test_index": r["test_index"],
          "candidates": [grid_to_list(c) for c in r["candidates"]],
          "counts": r["counts"],
          "scores": output.jsonable(r["scores"]),
          "order": r["order"],
          "malformed": r["malformed"],
          "views": r["views"],
          "skipped": r["skipped"],
          "shortened": r["shortened"],
          "fallback": r["fallback"],
          "correct_1": r["correct_1"],
          "correct_2": r["correct_2"],
          "rank": r["rank"],
      }) + "\n")

  from onn_jax.plots import render_sheet
  rows = []
  by_key = {(r["task_id"], r["test_index"]): r for r in records}
  for task in list(tasks)[:sheet_tasks]:
    for t, (test_input, target) in enumerate(task.test):
      entry = submission[task.id][t]
      record = by_key.get((task.id, t), {})
      mark = {True: " (solved)", False: " (missed)"}.get(record.get("correct_2"), "")
      attempts = [("attempt 1", np.asarray(entry["attempt_1"])),
                  ("attempt 2", np.asarray(entry["attempt_2"]))]
      if record.get("fallback", True):  # no candidate: an empty labelled cell, not a grid
        attempts = [("no candidate\n(submitted: test input)", None), ("no candidate", None)]
      rows.append({"title": f"{task.id} [{t}]{mark}", "grids": [
          ("test input", np.asarray(test_input)),
          ("target", None if target is None else np.asarray(target)),
          *attempts,
      ]})
  if rows:  # eval.sheet_tasks=0: no sheet
    render_sheet(rows, out_dir / "sheet.png")
  return scores
