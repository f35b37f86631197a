"""Test-time training: per-task adapters, base frozen, test outputs unread, vmap and shards;
pooled evaluation of the adapted tasks (rows of many tasks per call) against the per-task one."""

from __future__ import annotations

import concurrent.futures
import json

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from jax.sharding import Mesh

from onn_jax import app, config, ttt
from onn_jax.config import ConfigError
from onn_jax.data.serialize import encode_grid
from onn_jax.data.tasks import Task, TaskList
from onn_jax.data.tokens import END
from onn_jax.evaluation import augscore
from onn_jax.evaluation.model_fns import ModelFns
from onn_jax.model import moe
from onn_jax.model.transformer import Transformer, init_params
from onn_jax.parallel import AXIS

from conftest import tiny_config

TTT = dict(steps=4, batch_size=2, learning_rate=3e-3, chunk=0)


def _task(task_id: str, seed: int, demos: int = 3, side: int = 3) -> Task:
  """A task whose rule is: flip left-right and add 1 to every colour (mod 10)."""
  rng = np.random.default_rng(seed)

  def pair():
    grid = rng.integers(0, 5, (side, side)).astype(np.int32)
    return grid, ((grid[:, ::-1] + 1) % 10).astype(np.int32)
  return Task(id=task_id, train=[pair() for _ in range(demos)], test=[pair()])


@pytest.fixture(scope="module")
def setup():
  cfg = tiny_config(ttt=TTT, data=dict(buckets=[128]))
  params = jax.device_get(init_params(cfg.model, jax.random.PRNGKey(0)))
  tasks = {"a": _task("a", 1), "b": _task("b", 2), "one_demo": _task("one_demo", 3, demos=1),
           "huge": _task("huge", 4, side=12)}
  return cfg, params, tasks


@pytest.fixture(scope="module")
def together(setup):
  """Tasks a and b adapted together (one vmapped chunk); one_demo and huge are not adapted."""
  cfg, params, tasks = setup
  before = jax.tree.map(np.copy, params)
  adapters, info = ttt.adapt(cfg, params, list(tasks.values()))
  return adapters, info, before


def _max_diff(x, y) -> float:
  return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)))


@pytest.mark.parametrize("override, key", [
    ("ttt.steps=-1", "ttt.steps"), ("ttt.learning_rate=0", "ttt.learning_rate"),
    ("ttt.batch_size=0", "ttt.batch_size"), ("ttt.chunk=-2", "ttt.chunk"),
    ("ttt.weight_decay=-0.1", "ttt.weight_decay"), ("ttt.params=[]", "ttt.params"),
    ("ttt.params=attn", "ttt.params"), ("ttt.stepz=3", "ttt.stepz")])
def test_bad_ttt_values_are_one_line_config_errors(override, key):
  with pytest.raises(ConfigError) as err:
    config.load(None, [override])
  assert key in str(err.value) and "\n" not in str(err.value)


def test_a_pattern_matching_no_parameter_names_ttt_params(setup):
  _, params, _ = setup
  with pytest.raises(ConfigError, match=r"ttt\.params: '\*/atn/\*' matches no parameter"):
    ttt.adapted_paths(params, ["*/attn/*", "*/atn/*"])


def test_the_adapter_is_the_matched_subset_and_merge_puts_it_back(setup):
  cfg, params, _ = setup
  last = f"block_{cfg.model.num_layers - 1}"
  paths = ttt.adapted_paths(params, ("*/attn/*", "*norm/scale"))
  names = {"/".join(p) for p in paths}
  assert f"{last}/attn/q_proj/kernel" in names and "final_norm/scale" in names
  assert not any("/moe/" in n or n.startswith(("embedding", "lm_head")) for n in names)
  adapter = ttt.split(params, paths)
  changed = jax.tree.map(lambda x: x + 1.0, adapter)
  merged = ttt.merge(params, changed)
  np.testing.assert_array_equal(merged[last]["attn"]["q_proj"]["kernel"],
                                params[last]["attn"]["q_proj"]["kernel"] + 1.0)
  np.testing.assert_array_equal(merged[last]["moe"]["w_in"], params[last]["moe"]["w_in"])


def test_base_parameters_are_unchanged_and_skipped_tasks_counted(setup, together):
  _, params, _ = setup
  adapters, info, before = together
  assert _max_diff(params, before) == 0.0
  assert sorted(adapters) == ["a", "b"]
  assert info["adapted"] == 2 and info["not_adapted"] == {"few_demos": 1, "too_long": 1}
  assert info["steps"] == 4 and info["params"] == ["*/attn/*", "*norm/scale"]
  # The adapters moved away from the base.
  base_adapter = ttt.split(params, ttt.adapted_paths(params, info["params"]))
  assert _max_diff(adapters["a"], base_adapter) > 1e-4


def test_task_streams_never_pack_and_reach_long_buckets(setup):
  """TTT batches are unpacked whatever data.pack says: with data.pack_len below the longest
  bucket, a short task gets its own bucket and a long one the long bucket (fewer rows under
  data.max_batch_tokens), neither refused."""
  cfg, _, tasks = setup
  packing = config.replace(cfg, data={"buckets": [64, 128, 2048], "pack": True, "pack_len": 128,
                                      "max_batch_tokens": 2048})
  short, why_short = ttt.task_stream(tasks["a"], packing)
  long, why_long = ttt.task_stream(tasks["huge"], packing)
  assert why_short == why_long == ""
  assert short.buckets[0] <= 128 and long.buckets == (2048,)
  assert long.batch(0)["inputs"].shape == (1, 2048)  # 2048 tokens a batch: one row
  assert short.batch(0)["inputs"].shape == (2, short.buckets[0])
  # Tasks' batches are stacked: no answer_tokens, whose width (EAVI's budget) is per task.
  assert "answer_tokens" not in short.batch(0) and "answer_tokens" not in long.batch(0)


def test_chunks_hold_about_as_many_tokens_at_every_length(setup):
  cfg, _, _ = setup
  longest = config.replace(cfg, data={"buckets": [64, 128, 2048]}, ttt={"chunk": 2})
  assert [ttt.tasks_per_chunk(longest, n) for n in (64, 128, 2048)] == [64, 32, 2]
  at_pack_len = config.replace(longest, data={"pack": True, "pack_len": 128})
  assert [ttt.tasks_per_chunk(at_pack_len, n) for n in (64, 128, 2048)] == [4, 2, 1]
  # pack_len is ignored without packing: the longest bucket anchors the chunks.
  unpacked = config.replace(at_pack_len, data={"pack": False})
  assert [ttt.tasks_per_chunk(unpacked, n) for n in (64, 128, 2048)] == [64, 32, 2]
  assert ttt.tasks_per_chunk(config.replace(longest, ttt={"chunk": 0}), 64) == 0  # all at once


def test_test_outputs_are_never_read(setup, together):
  cfg, params, tasks = setup
  a = tasks["a"]
  unknown = Task(id="a", train=a.train, test=[(a.test[0][0], None)])
  garbage = Task(id="a", train=a.train, test=[(a.test[0][0], np.full((7, 2), 9, np.int32))])
  for variant in (unknown, garbage):
    adapters, _ = ttt.adapt(cfg, params, [variant, tasks["b"]])
    assert _max_diff(adapters["a"], together[0]["a"]) == 0.0


# The compressed keys' bias shifts every compressed key of a query by the same vector, which
# the softmax (and so the block selection) ignores: its gradient is float32 rounding noise,
# which Adam scales up to steps of ~lr whatever its size. It moves no output.
SHIFT_INVARIANT = "k_compressor/fc2/bias"


def _assert_same_adaptation(x, y, cfg) -> None:
  """x == y up to float32 reassociation (vmapped or sharded matmuls sum in another order).

  Both runs see the same batches; their gradients differ by rounding, relatively ~1e-6 for
  sums over a few thousand tokens; an AdamW step (at most ~lr a coordinate) passes a relative
  gradient error on at most 1:1, so after ``steps`` steps a coordinate differs by well under
  1e-3 * steps * lr (a margin of ~100x for cancellation). Shift-invariant leaves: <= their
  largest possible movement, 2 * steps * lr.
  """
  t = cfg.ttt
  flat_x, flat_y = flatten_dict(x), flatten_dict(y)
  assert flat_x.keys() == flat_y.keys()
  for path, leaf in flat_x.items():
    name = "/".join(path)
    bound = (2.0 if name.endswith(SHIFT_INVARIANT) else 1e-3) * t.steps * t.learning_rate
    diff = float(np.max(np.abs(leaf - flat_y[path])))
    assert diff <= bound, (name, diff, bound)


def test_vmapped_tasks_adapt_as_each_alone_and_ttt_lowers_the_loss(setup, together):
  cfg, params, tasks = setup
  one_per_chunk = config.replace(cfg, ttt={"chunk": 1})  # a and b each alone, one after another
  lines = []
  alone, info = ttt.adapt(one_per_chunk, params, [tasks["a"], tasks["b"]], log=lines.append)
  assert info["adapted"] == 2
  chunks = [line.split(":")[2] for line in lines if ": tasks " in line]
  assert chunks == [" tasks 1..1 of 2", " tasks 2..2 of 2"]
  assert sum("compiled the steps at lengths 128 at once" in line for line in lines) == 1
  assert info["loo_ce_after"] < info["loo_ce_before"] - 0.05
  for name in ("a", "b"):
    _assert_same_adaptation(alone[name], together[0][name], cfg)


def test_steps_compiled_ahead_in_the_background_adapt_as_compiled_in_place(setup, together):
  """compile_ahead (as train.main calls it while training, with other parameter values of the
  same shapes) leaves adapt its programs: adapt waits for them and its adapters are the ones
  adapt compiling in place gives, bit for bit. Steps of other shapes are not taken from it."""
  cfg, params, tasks = setup
  other = jax.device_get(init_params(cfg.model, jax.random.PRNGKey(1)))
  ttt.compile_ahead(cfg, other, list(tasks.values()))
  lines = []
  ahead, info = ttt.adapt(cfg, params, list(tasks.values()), log=lines.append)
  assert sum(line.startswith("ttt: compiled the steps at lengths 128 in the background in ")
             for line in lines) == 1
  assert not ttt._ahead
  assert info["adapted"] == together[1]["adapted"] == 2
  for name in ("a", "b"):
    for x, y in zip(jax.tree.leaves(ahead[name]), jax.tree.leaves(together[0][name])):
      np.testing.assert_array_equal(x, y)
  ttt.compile_ahead(cfg, other, list(tasks.values()))
  lines = []
  ttt.adapt(cfg, params, [tasks["a"]], log=lines.append)  # one task a chunk: other shapes
  assert not any("in the background" in line for line in lines) and not ttt._ahead


def test_sharded_over_eight_devices_equals_one_device(setup, together):
  cfg, params, tasks = setup
  assert jax.device_count() == 8
  mesh = Mesh(np.array(jax.devices()), (AXIS,))
  sharded, info = ttt.adapt(cfg, params, [tasks["a"], tasks["b"]], mesh=mesh)
  assert info["adapted"] == 2
  for name in ("a", "b"):
    _assert_same_adaptation(sharded[name], together[0][name], cfg)


class _FakeFns:
  """Generates, for every prompt, a 1x1 grid holding the colour in params["colour"]."""

  def __init__(self, params):
    self.colour = int(params["colour"])

  def generate(self, prompts, max_new, num_samples):
    answer = np.asarray(encode_grid(np.full((1, 1), self.colour)) + [END], np.int32)
    return [[answer] * (1 + num_samples) for _ in prompts]

  def logprob(self, sequences, answer_starts):
    return np.zeros(len(sequences))


def test_each_adapted_task_is_scored_with_its_own_weights_in_task_order():
  tasks = [_task(name, i) for i, name in enumerate(["p", "q", "r"])]
  base = {"colour": np.array(1), "other": np.array(0)}
  evaluate = ttt.per_task_evaluate(base, {"q": {"colour": np.array(7)}}, _FakeFns)
  base_fns = _FakeFns(base)
  records = evaluate(tasks, mode="augscore", generate_fn=base_fns.generate,
                     logprob_fn=base_fns.logprob, max_len=128, batch_size=4)
  assert [r["task_id"] for r in records] == ["p", "q", "r"]
  assert [int(r["ranked"][0][0, 0]) for r in records] == [1, 7, 1]


def test_pooled_evaluation_routes_every_row_to_its_task_group():
  """augscore hands the model each row's group (here: the colour a task's weights answer)."""
  tasks = [_task(name, i) for i, name in enumerate(["p", "q", "r"])]
  colours = {"p": 1, "q": 7, "r": 4}
  seen = []

  def generate(prompts, max_new, num_samples, groups):
    seen.append(list(groups))
    return [[np.asarray(encode_grid(np.full((1, 1), g)) + [END], np.int32)] for g in groups]

  def logprob(sequences, answer_starts, groups):
    return np.asarray(groups, np.float64)

  records = augscore.evaluate(tasks, mode="augscore", views=augscore.make_views()[:2],
                              generate_fn=generate, logprob_fn=logprob, max_len=128,
                              batch_size=4, group_of=lambda task: colours[task.id],
                              progress=False)
  assert [int(r["ranked"][0][0, 0]) for r in records] == [1, 7, 4]
  assert [r["scores"] for r in records] == [[2.0], [14.0], [8.0]]  # two views each
  assert sorted(g for call in seen for g in call) == [1, 1, 4, 4, 7, 7]


# TTT long enough that the tiny model's generations parse as grids (candidates to score).
FORMED = dict(steps=40, learning_rate=0.01, params=["*"], chunk=0, batch_size=2)


@pytest.fixture(scope="module")
def formed():
  """Adapters of a and b trained to emit grids; one_demo stays on the base, huge is too long."""
  cfg = tiny_config(ttt=FORMED, data=dict(buckets=[128]))
  params = jax.device_get(init_params(cfg.model, jax.random.PRNGKey(0)))
  tasks = [_task("a", 1), _task("b", 2), _task("one_demo", 3, demos=1),
           _task("huge", 4, side=12)]
  adapters, _ = ttt.adapt(cfg, params, tasks, log=lambda _: None)
  return cfg, params, tasks, adapters


def _pooled(formed, mode, *, mesh=None, tasks=None, max_len=128, views=None, **kwargs):
  """(records, ModelFns) of a pooled evaluation: every task's rows in shared calls."""
  cfg, params, all_tasks, adapters = formed
  stacked, index = ttt.stack(params, adapters)
  fns = ModelFns(Transformer(cfg.model), params, batch_size=8, mesh=mesh, adapters=stacked,
                 **kwargs)
  records = augscore.evaluate(tasks or all_tasks, mode=mode, views=views,
                              generate_fn=fns.generate, logprob_fn=fns.logprob,
                              max_len=max_len, batch_size=8,
                              group_of=lambda task: index.get(task.id, 0), progress=False,
                              prepare=fns.prepare)
  # Every call ran a program compiled ahead (ModelFns.prepare), as in train.main's evaluation.
  ready = {key[:4] if key[0] == "generate" else key for key in fns._ready}
  assert set(fns.shapes) <= ready
  return records, fns


# Scores are float32 log-probabilities summed in float64 over a test input's views and answer
# tokens (~100 terms); pooling changes how the matmuls sum (a batched matmul per row against
# one shared matmul) and the padding, a few ulps per logit, amplified at most ~10x by two
# layers and a log-softmax: 1e3 ulps of float32 relative to the score is a wide margin.
SCORE_RTOL = 1e3 * float(np.finfo(np.float32).eps)


def _assert_same_records(got, want):
  assert [(r["task_id"], r["test_index"]) for r in got] == \
      [(r["task_id"], r["test_index"]) for r in want]
  for g, w in zip(got, want):
    assert (g["counts"], g["order"], g["malformed"], g["views"], g["score_views"]) == \
        (w["counts"], w["order"], w["malformed"], w["views"], w["score_views"])
    assert all(np.array_equal(x, y) for x, y in zip(g["candidates"], w["candidates"]))
    np.testing.assert_allclose(g["scores"], w["scores"], rtol=SCORE_RTOL)


@pytest.mark.parametrize("mode", ["greedy", "augscore"])
def test_pooled_evaluation_equals_the_per_task_one(formed, mode):
  cfg, params, tasks, adapters = formed
  model = Transformer(cfg.model)
  per_task_fns = []

  def make_fns(p):
    per_task_fns.append(ModelFns(model, p, batch_size=8))
    return per_task_fns[-1]

  base = make_fns(params)
  want = ttt.per_task_evaluate(params, adapters, make_fns)(
      tasks, mode=mode, generate_fn=base.generate, logprob_fn=base.logprob, max_len=128,
      batch_size=8, progress=False)
  got, fns = _pooled(formed, mode)
  _assert_same_records(got, want)
  if mode == "augscore":  # the adapters make candidates: the scores were compared
    assert sum(len(r["candidates"]) for r in got) >= 3
  # No more calls than task by task, of the same padded shapes (no program per task).
  assert sum(fns.shapes.values()) <= sum(sum(f.shapes.values()) for f in per_task_fns)
  assert all(rows == 8 for _, rows, *_ in fns.shapes)
  assert {s[2:] for s in fns.shapes} <= {s[2:] for f in per_task_fns for s in f.shapes}


def test_pooled_evaluation_sharded_over_eight_devices_equals_one_device(formed):
  mesh = Mesh(np.array(jax.devices()), (AXIS,))
  got, fns = _pooled(formed, "augscore", mesh=mesh)
  assert fns.batch_size == 8 and fns.num_devices == 8
  _assert_same_records(got, _pooled(formed, "augscore")[0])


def test_long_prompts_run_in_fewer_rows_under_the_token_budget(formed):
  """A 6x6 task needs ~330 tokens: over data.buckets (128) but within an eval max_len of 512."""
  _, _, tasks, _ = formed
  long = _task("long", 5, side=6)
  mixed = [tasks[1], long, tasks[0]]
  views = augscore.make_views()[:1]
  unbatched, _ = _pooled(formed, "augscore", tasks=mixed, max_len=512, views=views)
  # Generation: 1 row of 512 + 256 (prompt + answer budget), 2 of 128 + 256; scoring: 6 of 128.
  budget = 800
  records, fns = _pooled(formed, "augscore", tasks=mixed, max_len=512, views=views,
                         max_batch_tokens=budget)
  _assert_same_records(records, unbatched)
  assert all(r["views"] == 1 and not r["shortened"] for r in records)  # every task attempted
  assert sum(len(r["candidates"]) for r in records) >= 1  # and some scored
  assert dict(fns.shapes) == {("generate", 1, 512, 256): 1, ("generate", 2, 128, 256): 1,
                              ("logprob", 6, 128): 1}
  for kind, rows, *lengths in fns.shapes:
    assert rows * sum(lengths) <= budget or rows == 1, (kind, rows, lengths)
  # Within the training buckets alone it would not fit even with one demonstration.
  short, _ = _pooled(formed, "greedy", tasks=[long], max_len=128)
  assert short[0]["skipped"] and short[0]["fallback"]


def test_evaluation_with_ttt_records_its_settings_in_scores(setup, tmp_path):
  cfg, params, tasks = setup
  out = tmp_path / "eval"
  lines = []
  chosen = TaskList([tasks["a"], tasks["one_demo"]],
                    [("x.json: task bad", "colour 10"), ("x.json: task worse", "no test")],
                    {"bad": [np.array([[1, 2]]), None], "worse": []})
  summary = app.evaluate_params(cfg, params, chosen, out, extra={"step": 0}, log=lines.append)
  assert summary["num_tasks"] == 2
  scores = json.loads((out / "scores.json").read_text())
  # Malformed tasks skipped on loading (data.skip_bad) are listed, answered as far as their
  # test inputs could be read, not scored, and said in the last line.
  assert scores["skipped_malformed"] == [{"where": "x.json: task bad", "reason": "colour 10"},
                                         {"where": "x.json: task worse", "reason": "no test"}]
  assert scores["malformed_answered"] == {"tasks": 2, "test_inputs": 3}
  assert lines[-1].endswith("; 2 malformed tasks skipped (data.skip_bad; named in scores.json's "
                            "skipped_malformed), 3 test inputs of 2 of them answered with the "
                            "input itself ([[0]] where unreadable), not scored")
  assert scores["ttt"]["adapted"] == 1 and scores["ttt"]["not_adapted"]["few_demos"] == 1
  assert scores["ttt"]["steps"] == 4 and scores["step"] == 0
  assert scores["protocol"]["eval_max_len"] == 128  # eval.max_len 0: the longest bucket
  submission = json.loads((out / "submission.json").read_text())
  assert sorted(submission) == ["a", "bad", "one_demo", "worse"]
  assert submission["bad"] == [{"attempt_1": [[1, 2]], "attempt_2": [[1, 2]]},
                               {"attempt_1": [[0]], "attempt_2": [[0]]}]
  assert submission["worse"] == [{"attempt_1": [[0]], "attempt_2": [[0]]}]
  assert all({"attempt_1", "attempt_2"} <= set(entry) for v in submission.values()
             for entry in v)


def test_an_adaptation_given_to_the_evaluation_is_the_one_it_scores_with(setup, together,
                                                                          tmp_path, monkeypatch):
  """evaluate_params(adapted=ttt.adapt(...)) adapts nothing itself and scores exactly as when it
  adapts the same tasks (the verdict adapts a split once for greedy and AugScore)."""
  cfg, params, tasks = setup
  chosen = list(tasks.values())
  cfg = config.replace(cfg, train={"background_compile": False})
  app.evaluate_params(cfg, params, chosen, tmp_path / "own")
  monkeypatch.setattr(ttt, "adapt", lambda *a, **k: pytest.fail("adapted again"))
  adapters, info, _ = together
  app.evaluate_params(cfg, params, chosen, tmp_path / "given", adapted=(adapters, info))
  for name in ("results.jsonl", "submission.json"):
    assert (tmp_path / "given" / name).read_text() == (tmp_path / "own" / name).read_text()
  given = json.loads((tmp_path / "given" / "scores.json").read_text())
  assert given["ttt"]["adapted"] == 2 and given["ttt"]["steps"] == cfg.ttt.steps
  with pytest.raises(ValueError, match="an adaptation given with ttt.steps=0"):
    app.evaluate_params(config.replace(cfg, ttt={"steps": 0}), params, chosen, tmp_path / "no",
                        adapted=(adapters, info))


def test_a_bad_pattern_fails_before_training_or_loading(tmp_path, capsys):
  cfg = tiny_config(ttt=dict(steps=2, params=["*/atn/*"]))
  assert app.train_and_evaluate(cfg, tmp_path / "run") == 1
  assert not (tmp_path / "run" / "checkpoints").exists()
  config.save(cfg, tmp_path / "config.yaml")
  assert app.evaluate_checkpoint(tmp_path, None, None, []) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 2 and all(line.startswith("error: ttt.params:") for line in err)


def test_train_main_compiles_ttt_while_training_and_evaluation_uses_it(tmp_path, capsys):
  """train.main starts TTT's compilation before its first step, from the training state's
  parameters; evaluation (of the EMA weights) finds those programs for its own."""
  cfg = tiny_config(ttt=TTT, train=dict(pretrain_steps=2, ema_decay=0.9, batch_size=4),
                    data=dict(buckets=[128], max_train_tasks=8), eval=dict(max_tasks=2))
  assert app.train_and_evaluate(cfg, tmp_path / "run") == 0
  out = capsys.readouterr().out.splitlines()
  assert sum(line.startswith("ttt: compiled the steps at lengths 128 in the background in ")
             for line in out) == 1, out
  assert not ttt._ahead


def test_bad_evaluation_data_fails_before_training(tmp_path, capsys):
  """train.main loads its evaluation tasks before training (TTT compiles them during it): a
  data.eval that cannot be read is one line before the first step, not after the training."""
  cfg = tiny_config(data=dict(eval=str(tmp_path / "missing.json")))
  assert app.train_and_evaluate(cfg, tmp_path / "run") == 1
  assert not (tmp_path / "run" / "checkpoints").exists()
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and "missing.json" in err[0], err


def test_generation_programs_compiled_while_ttt_runs_give_the_same_evaluation(setup, tmp_path):
  """With train.background_compile, evaluation compiles its generation programs on the worker
  thread while TTT adapts (under placeholder adapters of the same leaf shapes) and its scoring
  programs while it generates, then runs on them: the same records as compiling them when the
  generation and the scoring start. When TTT adapts no task, the plain model's generation
  programs are compiled instead."""
  cfg, params, tasks = setup
  for chosen in ([tasks["a"], tasks["b"], tasks["one_demo"]], [tasks["one_demo"]]):
    results = {}
    for background in (True, False):
      lines, out = [], tmp_path / f"{len(chosen)}_{background}"
      c = config.replace(cfg, train={"background_compile": background},
                         eval={"mode": "augscore", "max_tasks": 0})
      app.evaluate_params(c, params, chosen, out, log=lines.append)
      results[background] = (out / "results.jsonl").read_text()
      said = [line for line in lines if line.startswith("evaluation: compiled")]
      ahead = any(" generate programs in the background in " in line for line in said)
      assert ahead == (background and len(chosen) > 1), said  # no adapter: other programs
      # Compiled in place: without the background, or (no adapters) for the plain model.
      assert any(" generate programs at once" in line for line in said) == (
          not background or len(chosen) == 1), said
      # Scoring's compile in the background during the generation (after TTT, so for the
      # model it scores with): none is left to compile when scoring starts, if it does.
      if background:
        assert not any(" logprob programs at once" in line for line in said), said
    assert results[True] == results[False]


def test_steps_compiled_ahead_for_another_task_order_or_lost_are_compiled_in_place():
  """Programs compiled ahead are taken only for the same lengths in the same order (they are
  paired by it); a background compilation that failed is said and compiled in place."""
  cfg = tiny_config(ttt=TTT, data=dict(buckets=[64, 128, 256], max_grid=8))
  params = jax.device_get(init_params(cfg.model, jax.random.PRNGKey(0)))
  small, large = _task("small", 1, side=2), _task("large", 2, side=6)
  ttt.compile_ahead(cfg, params, [small, large])
  lines = []
  _, info = ttt.adapt(cfg, params, [large, small], log=lines.append)
  assert info["adapted"] == 2 and not ttt._ahead
  assert any("at once in" in line for line in lines), lines
  failed = concurrent.futures.Future()
  failed.set_exception(MemoryError("host memory"))
  ttt._ahead.append(({}, failed))
  lines = []
  _, info = ttt.adapt(cfg, params, [small], log=lines.append)
  assert info["adapted"] == 1 and not ttt._ahead
  assert lines[0] == ("ttt: compiling the steps in the background failed (MemoryError: host "
                      "memory); compiling them here")
  assert any("at once in" in line for line in lines), lines


def test_models_vmapped_over_tasks_or_rows_never_dispatch_experts_sparsely(setup, together,
                                                                            monkeypatch):
  """A sparse expert dispatch (``model.moe_impl=tiled``, what ``auto`` runs on a GPU) decides
  its exact dense fallback by a ``lax.cond``, which ``jax.vmap`` turns into a select that
  computes both branches. TTT (tasks vmapped) and the evaluation's per-task adapters (rows
  vmapped) so run the experts dense (``transformer.for_vmap``); an evaluation without adapters
  keeps the sparse dispatch (which shows that the probe sees it), with the same log-probs."""
  cfg, params, tasks = setup
  tiled = config.replace(cfg, model={"moe_impl": "tiled", "moe_tile": 8})
  sparse_calls = []
  real = moe.experts_sparse

  def probe(*args, **kwargs):
    sparse_calls.append(kwargs.get("impl", args[7] if len(args) > 7 else "tiled"))
    return real(*args, **kwargs)

  monkeypatch.setattr(moe, "experts_sparse", probe)
  adapters, info = ttt.adapt(tiled, params, [tasks["a"], tasks["b"]])
  assert info["adapted"] == 2 and sparse_calls == []
  # Dense experts under vmap: the adaptation is the default (dense) config's.
  for name in ("a", "b"):
    _assert_same_adaptation(adapters[name], together[0][name], cfg)
  stacked, index = ttt.stack(params, adapters)
  sequences = [np.arange(40, dtype=np.int32) % 10, np.arange(30, dtype=np.int32) % 9]  # no PAD
  pooled = ModelFns(Transformer(tiled.model), params, batch_size=2, adapters=stacked)
  assert pooled.row_model.model.cfg.moe_impl == "dense"
  pooled.logprob(sequences, [20, 15], groups=[index["a"], index["b"]])
  assert sparse_calls == []
  plain_tiled = ModelFns(Transformer(tiled.model), params, batch_size=2)
  got = plain_tiled.logprob(sequences, [20, 15])
  assert sparse_calls and set(sparse_calls) == {"tiled"}
  want = ModelFns(Transformer(cfg.model), params, batch_size=2).logprob(sequences, [20, 15])
  np.testing.assert_allclose(got, want, rtol=SCORE_RTOL)
