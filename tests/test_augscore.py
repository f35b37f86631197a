"""The AugScore protocol with a fake model whose generations and log-probabilities are known."""

from __future__ import annotations

import json

import numpy as np
import pytest

from onn_jax.data.augment import View
from onn_jax.data.serialize import decode_grid, encode_grid, parse_sequence
from onn_jax.data.tasks import Task
from onn_jax.data.tokens import END, IN, NEWLINE, OUT
from onn_jax.evaluation import augscore
from onn_jax.evaluation.scoring import score_submission, validate_submission

MAX_LEN = 400


def _key(grid) -> tuple:
  grid = np.asarray(grid)
  return grid.shape, grid.astype(np.int8).tobytes()


def _answer(grid) -> np.ndarray:
  return np.asarray(encode_grid(grid) + [END], np.int32)


@pytest.fixture(scope="module")
def views() -> list[View]:
  return augscore.make_views(2, "1-9", seed=3)


@pytest.fixture(scope="module")
def tasks() -> list[Task]:
  rng = np.random.default_rng(0)

  def grid(h, w):
    # Colours 1..9 with no symmetry, so every view of a test input is a different grid and
    # the fake model can tell the view from the prompt.
    return rng.permutation(np.arange(1, 10).repeat(2))[:h * w].reshape(h, w)

  demos = [(grid(2, 3), grid(3, 2)), (grid(3, 3), grid(1, 4))]
  return [
      Task("alpha", demos, [(grid(3, 4), grid(2, 5))]),
      Task("beta", demos[::-1], [(grid(2, 4), grid(4, 3)), (grid(4, 3), grid(1, 2))]),
  ]


class FakeModel:
  """Generates from a per-(task, test, view) plan and scores from a table.

  It recognises (task, test, view) from the prompt's test input, so a view that was applied or
  inverted wrongly shows up as a wrong candidate or a failed lookup.
  """

  def __init__(self, tasks, views, plan, table=None):
    self.views = views
    self.plan = plan  # (task id, test, view) -> list of token arrays (greedy first)
    self.table = table  # (task id, test, candidate key, view) -> log-probability
    self.where = {}
    for task in tasks:
      for t, (x, _) in enumerate(task.test):
        for v, view in enumerate(views):
          key = _key(view.apply(x))
          assert key not in self.where, "test inputs must identify the view"
          self.where[key] = (task.id, t, v)
    self.gen_calls = []
    self.lp_calls = []

  def locate(self, prompt):
    assert prompt[-1] == OUT
    _, test_input, output = parse_sequence(prompt)
    assert output is None
    return self.where[_key(test_input)]

  def generate(self, prompts, max_new, num_samples):
    self.gen_calls.append(([len(p) for p in prompts], max_new, num_samples))
    # Like a real decoder, a generation stops after max_new tokens.
    return [[g[:max_new] for g in self.plan(*self.locate(p), max_new)[:1 + num_samples]]
            for p in prompts]

  def logprob(self, sequences, answer_starts):
    self.lp_calls.append([len(s) for s in sequences])
    out = []
    for seq, start in zip(sequences, answer_starts):
      assert len(seq) <= MAX_LEN and seq[-1] == END
      task_id, t, v = self.locate(seq[:start])
      canonical = self.views[v].invert(decode_grid(seq[start:]))
      out.append(self.table[(task_id, t, _key(canonical), v)])
    return np.asarray(out)


def test_make_views_are_exact_and_deterministic(views):
  assert len(views) == 8 * 3
  assert views[:8] == [View(d8=k) for k in range(8)]
  assert len(set(views)) == len(views)
  assert all(v.perm[0] == 0 and v.perm != tuple(range(10)) for v in views[8:])
  assert [v.d8 for v in views[8:]] == [k for k in range(8) for _ in range(2)]
  assert augscore.make_views(2, "1-9", seed=3) == views
  assert augscore.make_views(2, "1-9", seed=4) != views
  rng = np.random.default_rng(1)
  for h, w in [(1, 5), (3, 2), (4, 7)]:
    g = rng.integers(0, 10, (h, w))
    images = set()
    for view in views:
      image = view.apply(g)
      assert np.array_equal(view.invert(image), g)
      images.add(_key(image))
    assert len(images) > 8  # the colour permutations really move colours
  with pytest.raises(ValueError, match="other than 'none'"):
    augscore.make_views(1, "none", 0)


def test_generation_in_every_view_maps_back(tasks, views):
  """Each view generates the view of the true answer; all must collapse to one candidate."""
  truth = {(t.id, i): y for t in tasks for i, (_, y) in enumerate(t.test)}
  model = FakeModel(tasks, views, lambda tid, t, v, _: [_answer(views[v].apply(truth[(tid, t)]))])
  records = augscore.evaluate(tasks, mode="vote", views=views, generate_fn=model.generate,
                              max_len=MAX_LEN, batch_size=5, progress=False)
  assert [(r["task_id"], r["test_index"]) for r in records] == [("alpha", 0), ("beta", 0),
                                                                 ("beta", 1)]
  for r in records:
    assert len(r["candidates"]) == 1 and r["counts"] == [len(views)]
    assert np.array_equal(r["ranked"][0], truth[(r["task_id"], r["test_index"])])
    assert r["correct_1"] is True and r["correct_2"] is True and r["malformed"] == 0
  # Every (task, test, view) prompt generated once, in batches of at most batch_size.
  sizes = [len(lens) for lens, _, _ in model.gen_calls]
  assert sum(sizes) == 3 * len(views) and max(sizes) <= 5
  for lens, max_new, num_samples in model.gen_calls:
    assert num_samples == 0 and max_new >= 1
    assert max(lens) + max_new <= MAX_LEN and max_new <= augscore.MAX_ANSWER_TOKENS


def _plan_and_table(tasks, views):
  """Three candidates per test input plus malformed generations; vote and AugScore disagree."""
  rng = np.random.default_rng(7)
  plans, table, expected = {}, {}, {}
  for task in tasks:
    for t, (_, y) in enumerate(task.test):
      a = np.asarray(y)
      b = a.copy()
      b[0, 0] = (b[0, 0] + 1) % 10
      c = np.full((a.shape[1], a.shape[0] + 1), 3)
      cands = [a, b, c]
      # Greedy: b in half the views, a and c in a quarter each; the sample: a, b or malformed.
      greedy = [1 if v % 2 else (0 if v % 4 == 0 else 2) for v in range(len(views))]
      votes = np.zeros(3, int)
      malformed = 0
      for v in range(len(views)):
        votes[greedy[v]] += 1
        if v % 3 == 0:
          votes[0 if v % 6 == 0 else 1] += 1
        else:
          malformed += 1
      # Log-probabilities: a best in total although b has the most votes, c worst.
      lp = rng.normal(-5.0, 1.0, (3, len(views)))
      lp[0] += 3.0
      lp[2] -= 2.0
      for ci, cand in enumerate(cands):
        for v in range(len(views)):
          table[(task.id, t, _key(cand), v)] = lp[ci, v]
      plans[(task.id, t)] = (cands, greedy)
      expected[(task.id, t)] = (cands, votes, lp.sum(1), malformed)

  garbage = [
      np.array([1, 2, NEWLINE, 3, NEWLINE, END]),  # ragged rows
      np.array([1, 2, IN, END]),  # a marker inside the grid
      np.array([END]),  # empty grid
      np.array([[1, NEWLINE, END]]),  # wrong rank
  ]

  def plan(task_id, t, v, max_new):
    cands, greedy = plans[(task_id, t)]
    first = _answer(views[v].apply(cands[greedy[v]]))
    if v % 6 == 0:
      first = first[:-1]  # END dropped by the caller: still a valid generation
    if v % 3 == 0:
      second = _answer(views[v].apply(cands[0 if v % 6 == 0 else 1]))
    elif v % 3 == 1:
      second = garbage[v % len(garbage)]
    else:
      second = np.ones(max_new, np.int32)  # ran out of budget without END
    return [first, second]

  return plan, table, expected


@pytest.mark.parametrize("mode", ["augscore", "vote"])
def test_ranking_by_summed_logprob_and_votes(tasks, views, mode):
  plan, table, expected = _plan_and_table(tasks, views)
  model = FakeModel(tasks, views, plan, table)
  records = augscore.evaluate(tasks, mode=mode, views=views, generate_fn=model.generate,
                              logprob_fn=model.logprob, max_len=MAX_LEN, batch_size=7,
                              samples=1, progress=False)
  for r in records:
    cands, votes, lp_sum, malformed = expected[(r["task_id"], r["test_index"])]
    assert r["malformed"] == malformed > 0
    assert r["generations"] == 2 * len(views)
    # Candidates in first-seen order: view 0 greedy is a (0), view 1 b (1), view 2 c (2).
    assert [_key(g) for g in r["candidates"]] == [_key(g) for g in cands]
    assert r["counts"] == votes.tolist()
    if mode == "augscore":
      np.testing.assert_allclose(r["scores"], lp_sum, rtol=1e-12)
      order = np.argsort(-lp_sum, kind="stable")
      assert r["score_views"] == len(views)
    else:
      assert r["scores"] == votes.tolist()
      order = np.argsort(-votes, kind="stable")
    assert order[0] != np.argmax(votes) or mode == "vote"  # the two modes really differ
    assert [_key(g) for g in r["ranked"]] == [_key(cands[i]) for i in order]
    assert r["correct_1"] == (order[0] == 0) and r["correct_2"] == (0 in order[:2])
    assert r["rank"] == list(order).index(0) + 1  # candidate 0 is the right answer
  if mode == "augscore":
    n_pairs = sum(len(r["candidates"]) for r in records) * len(views)
    assert sum(len(c) for c in model.lp_calls) == n_pairs
    assert max(len(c) for c in model.lp_calls) <= 7
  else:
    assert model.lp_calls == []


def test_results_do_not_depend_on_batch_size(tasks, views):
  plan, table, _ = _plan_and_table(tasks, views)
  runs = []
  for batch_size in (1, 64):
    model = FakeModel(tasks, views, plan, table)
    runs.append(augscore.evaluate(tasks, mode="augscore", views=views, generate_fn=model.generate,
                                  logprob_fn=model.logprob, max_len=MAX_LEN,
                                  batch_size=batch_size, samples=1, progress=False))
  for r1, r2 in zip(*runs):
    assert r1["order"] == r2["order"] and r1["counts"] == r2["counts"]
    np.testing.assert_allclose(r1["scores"], r2["scores"], rtol=1e-12)


def test_a_short_prompt_beside_a_long_one_keeps_its_answer_room():
  """A batch shares one answer budget, the limit less its longest prompt: a shorter prompt
  fitted with a larger answer's room is batched apart instead of losing its answer's end (it
  was cut off, malformed, and the result depended on eval.batch_size)."""
  def grid(h, w, colour):
    return np.full((h, w), colour, np.int32)
  long_prompt = Task("A", [(grid(4, 4, 1), grid(1, 1, 2))] * 4, [(grid(4, 4, 1), grid(1, 1, 2))])
  big_answer = Task("B", [(grid(5, 5, 3), grid(5, 5, 4))], [(grid(5, 5, 3), grid(5, 5, 4))])
  answers = {task.id: _answer(task.test[0][1]) for task in (long_prompt, big_answer)}
  lengths = {}
  for task in (long_prompt, big_answer):
    prompt, _ = augscore.fit_prompt(task.train, task.test[0][0], 1, 10**6)
    lengths[task.id] = len(prompt)
  # Room for both answers alone, not for B's answer after A's prompt.
  max_len = lengths["A"] + len(answers["B"]) - 1
  assert lengths["B"] + len(answers["B"]) <= max_len
  calls = []

  def generate(prompts, max_new, samples):  # the right answer, cut at max_new
    calls.append(([len(p) for p in prompts], max_new))
    return [[answers["B" if 3 in p else "A"][:max_new]] for p in prompts]

  for batch_size in (1, 2):
    calls.clear()
    records = augscore.evaluate([long_prompt, big_answer], mode="greedy", generate_fn=generate,
                                max_len=max_len, batch_size=batch_size, progress=False)
    assert [(r["task_id"], r["correct_1"], r["malformed"]) for r in records] == [
        ("A", True, 0), ("B", True, 0)]
    assert calls == [([lengths["A"]], max_len - lengths["A"]),
                     ([lengths["B"]], max_len - lengths["B"])]
  # Where every job fits beside the others, batches are the length order's runs, unchanged.
  assert augscore._room_batches([0, 1, 2, 3], [9, 8, 7, 6], [1, 2, 3, 4], 2, 20) == [[0, 1],
                                                                                     [2, 3]]
  # Job 3 (6 tokens, room 9) waits: beside job 2's 7 tokens it would get 8.
  assert augscore._room_batches([0, 1, 2, 3], [9, 8, 7, 6], [1, 2, 3, 9], 2, 15) == [[0, 1], [2],
                                                                                     [3]]


def test_greedy_mode_uses_identity_view_only(tasks, views):
  truth = {(t.id, i): y for t in tasks for i, (_, y) in enumerate(t.test)}
  model = FakeModel(tasks, views,
                    lambda tid, t, v, _: [_answer(views[v].apply(truth[(tid, t)]))] * 3)
  records = augscore.evaluate(tasks, mode="greedy", views=views, generate_fn=model.generate,
                              max_len=MAX_LEN, batch_size=8, samples=2, progress=False)
  assert [c[2] for c in model.gen_calls] == [0]  # no samples in greedy mode
  assert sum(len(c[0]) for c in model.gen_calls) == 3
  assert all(r["views"] == 1 and r["counts"] == [1] and r["correct_1"] for r in records)


def test_unfit_task_and_budget_cap(tasks, views):
  big = np.arange(400).reshape(20, 20) % 10
  huge = Task("huge", [(big, big)], [(big, big.T)])
  everything = tasks + [huge]
  truth = {(t.id, i): y for t in tasks for i, (_, y) in enumerate(t.test)}
  model = FakeModel(tasks, views, lambda tid, t, v, _: [_answer(views[v].apply(truth[(tid, t)]))])
  records = augscore.evaluate(everything, mode="vote", views=views[:8],
                              generate_fn=model.generate, max_len=MAX_LEN, batch_size=4,
                              max_answer_tokens=12, progress=False)
  assert all(max_new <= 12 for _, max_new, _ in model.gen_calls)
  by_id = {(r["task_id"], r["test_index"]): r for r in records}
  assert by_id[("huge", 0)]["skipped"] and by_id[("huge", 0)]["candidates"] == []
  # alpha's 2x5 answer takes 13 tokens: cut off by the cap in every view, so all malformed;
  # beta's 1x2 answer (4 tokens) fits.
  assert by_id[("alpha", 0)]["malformed"] == 8 and by_id[("alpha", 0)]["candidates"] == []
  assert by_id[("beta", 1)]["correct_1"] is True
  summary = augscore.summarise(records, everything)
  assert summary["skipped"] == 1 and summary["malformed"] == by_id[("alpha", 0)]["malformed"] + \
      by_id[("beta", 0)]["malformed"]
  assert summary["per_task"] == {"alpha": 0.0, "beta": 0.5, "huge": 0.0}
  # No candidate (too long to attempt, or all malformed): the test input as both attempts.
  # beta's first answer (4x3: 16 tokens) is cut off too.
  assert summary["fallback"] == 3 and summary["shortened"] == 0
  for key in (("huge", 0), ("alpha", 0), ("beta", 0)):
    assert by_id[key]["fallback"] and len(by_id[key]["ranked"]) == 1
    test_input = everything[[t.id for t in everything].index(key[0])].test[0][0]
    np.testing.assert_array_equal(by_id[key]["ranked"][0], test_input)


def test_fit_prompt_drops_the_largest_demonstrations_first():
  def demo(h, w):
    return np.ones((h, w), np.int32), np.ones((h, w), np.int32)

  small, large, medium = demo(1, 1), demo(4, 4), demo(2, 2)
  test_input = np.ones((2, 3), np.int32)
  demos = [small, large, medium]
  full, dropped = augscore.fit_prompt(demos, test_input, room=9, max_len=1000)
  assert dropped == 0
  # Room for everything but the 4x4 demo (2 + 2 * 20 = 42 tokens): it alone is dropped and the
  # others keep their order.
  prompt, dropped = augscore.fit_prompt(demos, test_input, room=9, max_len=len(full) + 9 - 1)
  assert dropped == 1 and len(prompt) == len(full) - 42
  got_demos, got_input, _ = parse_sequence(prompt)
  assert [d[0].shape for d in got_demos] == [(1, 1), (2, 2)]
  np.testing.assert_array_equal(got_input, test_input)
  # Room for one demo only: the smallest (1x1: IN, 1 + newline, OUT, 1 + newline = 6 tokens)
  # is kept; with one token less nothing fits (never a prompt without a demonstration).
  one, dropped = augscore.fit_prompt(demos, test_input, room=9, max_len=1 + 6 + 2 + 8 + 9)
  assert dropped == 2 and [d[0].shape for d in parse_sequence(one)[0]] == [(1, 1)]
  assert augscore.fit_prompt(demos, test_input, room=9, max_len=1 + 6 + 2 + 8 + 8) == (None, 3)


def test_shortened_test_inputs_are_answered_and_counted(tmp_path):
  rng = np.random.default_rng(1)
  big = rng.integers(1, 10, (9, 9))
  task = Task("long", [(big, big), (big[:2, :2], big[:2, :2])], [(big[:2, :3], big[:3, :2])])
  # 1 + (2 + 90 + 90) + (2 + 6 + 6) + 2 + 8 = 207 tokens with both demos: over 150.
  answer = big[:3, :2]
  records = augscore.evaluate([task], mode="vote", views=[View()], max_len=150, batch_size=2,
                              generate_fn=lambda p, m, s: [[_answer(answer)] for _ in p],
                              progress=False)
  assert records[0]["shortened"] and not records[0]["fallback"] and records[0]["correct_1"]
  scores = augscore.write_outputs(records, [task], tmp_path, "vote")
  assert scores["shortened"] == 1 and scores["fallback"] == 0 and scores["solved"] == 1
  line = json.loads((tmp_path / "results.jsonl").read_text())
  assert line["shortened"] is True and line["fallback"] is False
  words = augscore.describe(scores, tmp_path)
  assert words.startswith("solved 1 of 1 test outputs") and "1 test inputs shortened" in words


def test_generate_fn_contract_errors(tasks, views):
  with pytest.raises(ValueError, match="returned 0 results for"):
    augscore.evaluate(tasks, mode="vote", views=views[:2], generate_fn=lambda p, m, s: [],
                      max_len=MAX_LEN, batch_size=4, progress=False)
  with pytest.raises(ValueError, match="augscore mode needs a logprob_fn"):
    augscore.evaluate(tasks, mode="augscore", generate_fn=lambda p, m, s: [], max_len=MAX_LEN,
                      batch_size=4, progress=False)
  with pytest.raises(ValueError, match="eval mode 'best' is not one of"):
    augscore.evaluate(tasks, mode="best", generate_fn=lambda p, m, s: [], max_len=MAX_LEN,
                      batch_size=4, progress=False)


def test_write_outputs(tasks, views, tmp_path):
  plan, table, _ = _plan_and_table(tasks, views)
  model = FakeModel(tasks, views, plan, table)
  hidden = Task("hidden", tasks[0].train, [(tasks[0].test[0][0], None)])
  everything = tasks + [hidden]
  records = augscore.evaluate(tasks, mode="augscore", views=views, generate_fn=model.generate,
                              logprob_fn=model.logprob, max_len=MAX_LEN, batch_size=16,
                              samples=1, progress=False)
  scores = augscore.write_outputs(records, tasks, tmp_path / "eval", "augscore",
                                  {"protocol": "test", "mode": "overridden?"})
  out = tmp_path / "eval"
  submission = json.loads((out / "submission.json").read_text())
  validate_submission(submission, tasks)
  assert set(submission) == {"alpha", "beta"}
  assert all(set(e) == {"attempt_1", "attempt_2"} for es in submission.values() for e in es)
  written = json.loads((out / "scores.json").read_text())
  assert written == scores
  assert written["protocol"] == "test" and written["mode"] == "augscore"
  # A NaN in what is passed along (a diverged TTT's CE) is null: scores.json stays strict JSON.
  augscore.write_outputs(records, tasks, tmp_path / "nan", "augscore",
                         {"ttt": {"loo_ce_after": float("nan")}}, sheet_tasks=0)
  strict = json.loads((tmp_path / "nan" / "scores.json").read_text(),
                      parse_constant=lambda name: pytest.fail(f"scores.json holds {name}"))
  assert strict["ttt"] == {"loo_ce_after": None}
  assert written["score"] == score_submission(submission, tasks)["score"]
  assert written["malformed"] == sum(r["malformed"] for r in records)
  lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
  assert [(x["task_id"], x["test_index"]) for x in lines] == [("alpha", 0), ("beta", 0),
                                                               ("beta", 1)]
  assert lines[0]["candidates"][0] == np.asarray(tasks[0].test[0][1]).tolist()
  assert [x["rank"] for x in lines] == [r["rank"] for r in records]
  assert written["found"] == sum(r["rank"] is not None for r in records) >= written["solved"]
  assert [group["tasks"] for group in written["by_size"]] == [1, 1]
  assert written["by_size"][0]["cells"][0] == min(augscore.task_cells(t) for t in tasks)
  assert np.mean([g["score"] for g in written["by_size"]]) == pytest.approx(written["score"])
  assert (out / "sheet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  # Without solutions: a submission all the same, scores omitted and said to be.
  hidden_records = augscore.evaluate([hidden], mode="greedy", generate_fn=model.generate,
                                     max_len=MAX_LEN, batch_size=2, progress=False)
  assert hidden_records[0]["correct_1"] is None
  hidden_scores = augscore.write_outputs(records + hidden_records, everything, tmp_path / "h",
                                         "augscore", {})
  # Here some test outputs are known: how many are not is said, here and in the summary line.
  assert hidden_scores["scores"] == "omitted: 1 of 4 test outputs have no solution"
  assert "score" not in hidden_scores
  assert "(1 of 4 test outputs have no solution: not scored)" in augscore.describe(hidden_scores)
  validate_submission(json.loads((tmp_path / "h" / "submission.json").read_text()), everything)
  alone = augscore.write_outputs(hidden_records, [hidden], tmp_path / "h1", "augscore", {})
  assert alone["scores"] == "omitted: no solutions"
  assert "(no solutions: not scored)" in augscore.describe(alone)


def test_scores_by_task_size_split_the_tasks_into_quarters_smallest_first():
  def task(name, side, demos=1):
    grid = np.zeros((side, side), np.int32)
    return Task(name, [(grid, grid)] * demos, [(grid, grid)])

  tasks = [task("e", 5), task("a", 1), task("c", 3), task("b", 2), task("d", 4, demos=2)]
  assert augscore.task_cells(tasks[4]) == 4 * 16 + 16
  per_task = {"a": 1.0, "b": 0.0, "c": 0.5, "d": 1.0, "e": 0.0}
  groups = augscore.by_size(tasks, per_task)
  assert groups == [{"cells": [3, 12], "tasks": 2, "score": 0.5},
                    {"cells": [27, 27], "tasks": 1, "score": 0.5},
                    {"cells": [75, 75], "tasks": 1, "score": 0.0},
                    {"cells": [80, 80], "tasks": 1, "score": 1.0}]
  assert augscore.by_size(tasks[:2], per_task) == [
      {"cells": [3, 3], "tasks": 1, "score": 1.0}, {"cells": [75, 75], "tasks": 1, "score": 0.0}]
