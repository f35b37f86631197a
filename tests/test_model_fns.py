"""The model side of evaluation: batched generation and log-probabilities, one or 8 devices."""

from __future__ import annotations

import collections
import concurrent.futures

import jax
import numpy as np
from jax.sharding import Mesh

from onn_jax.data.serialize import encode_grid, serialize
from onn_jax.data.tasks import Task
from onn_jax.data.tokens import END
from onn_jax.decode import generate_jit
from onn_jax.evaluation import augscore, model_fns
from onn_jax.evaluation.model_fns import ModelFns
from onn_jax.model.transformer import Transformer, init_params

from conftest import tiny_config


def _prompts(n):
  rng = np.random.default_rng(0)
  out = []
  for i in range(n):
    grid = rng.integers(0, 10, size=(2 + i % 3, 3))
    out.append(serialize([(grid, grid.T)], grid).tokens)
  return out


def test_sharded_evaluation_equals_one_device():
  cfg = tiny_config()
  model = Transformer(cfg.model)
  params = init_params(cfg.model, jax.random.PRNGKey(0))
  prompts = _prompts(10)
  one = ModelFns(model, params, batch_size=6)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  many = ModelFns(model, params, batch_size=6, mesh=mesh)
  assert many.batch_size % len(jax.devices()) == 0
  gen_one, gen_many = one.generate(prompts, 8, 0), many.generate(prompts, 8, 0)
  for a, b in zip(gen_one, gen_many):
    assert len(a) == len(b) == 1
    np.testing.assert_array_equal(a[0], b[0])  # greedy: identical
  answers = [np.asarray(encode_grid(np.ones((2, 2), int)) + [END]) for _ in prompts]
  seqs = [np.concatenate([p, a]) for p, a in zip(prompts, answers)]
  starts = [len(p) for p in prompts]
  np.testing.assert_allclose(one.logprob(seqs, starts), many.logprob(seqs, starts),
                             rtol=1e-5)


def test_logprob_is_the_sum_of_answer_token_logprobs():
  cfg = tiny_config()
  model = Transformer(cfg.model)
  params = init_params(cfg.model, jax.random.PRNGKey(1))
  fns = ModelFns(model, params, batch_size=4)
  prompt = _prompts(1)[0]
  answer = np.asarray(encode_grid(np.zeros((1, 2), int)) + [END])
  seq = np.concatenate([prompt, answer])
  logits = model.apply({"params": params}, seq[None, :-1])[0][0]
  logp = jax.nn.log_softmax(logits, -1)
  want = sum(float(logp[t - 1, seq[t]]) for t in range(len(prompt), len(seq)))
  np.testing.assert_allclose(fns.logprob([seq], [len(prompt)])[0], want, rtol=1e-5)


def test_rows_per_call_follow_the_token_budget():
  """arc1's budget: 64 rows up to 2048-token prompts (+ 1024 answer tokens), 11 at 16384; on
  8 devices a multiple of 8, at least one row per device."""
  cfg = tiny_config()
  model = Transformer(cfg.model)
  params = init_params(cfg.model, jax.random.PRNGKey(0))
  one = ModelFns(model, params, batch_size=64, max_batch_tokens=196608)
  assert [one.rows(n) for n in (1024, 3072, 16384 + 1024, 10**6)] == [64, 64, 11, 1]
  assert ModelFns(model, params, batch_size=6).rows(10**6) == 6  # no budget: batch_size
  mesh = Mesh(np.array(jax.devices()), ("data",))
  many = ModelFns(model, params, batch_size=60, max_batch_tokens=196608, mesh=mesh)
  assert many.batch_size == 64
  assert [many.rows(n) for n in (3072, 16384 + 1024, 10**6)] == [64, 8, 8]


def test_prepared_programs_give_the_jitted_results_and_are_the_ones_run():
  """augscore.evaluate announces its calls (``prepare``); ModelFns compiles their programs at
  once and runs every call on them: the same records as without, sampled generations
  included (same keys), and no call compiles through the jitted functions."""
  cfg = tiny_config()
  model = Transformer(cfg.model)
  params = init_params(cfg.model, jax.random.PRNGKey(2))
  tasks = []
  for k, side in enumerate((2, 3, 5)):  # prompts of different padded lengths
    grid = np.random.default_rng(k).integers(0, 10, size=(side, side))
    tasks.append(Task(id=f"t{k}", train=[(grid, grid.T), (grid.T, grid)],
                               test=[(grid, grid.T)]))
  views = augscore.make_views()[:3]

  def evaluate(fns, prepare):
    return augscore.evaluate(tasks, mode="augscore", views=views, generate_fn=fns.generate,
                             logprob_fn=fns.logprob, max_len=256, batch_size=4, samples=1,
                             max_answer_tokens=40, progress=False,
                             prepare=fns.prepare if prepare else None)

  want = evaluate(ModelFns(model, params, batch_size=4), False)
  caches = generate_jit._cache_size(), model_fns._logprob_jit._cache_size()
  lines = []
  fns = ModelFns(model, params, batch_size=4, log=lines.append)
  got = evaluate(fns, True)
  kinds = collections.Counter(key[0] for key in fns._ready)  # one line per kind compiled
  assert [line.split(" programs")[0] for line in lines] == [
      f"evaluation: compiled {count} {kind}" for kind, count in kinds.items()]
  assert (generate_jit._cache_size(), model_fns._logprob_jit._cache_size()) == caches
  assert len({key for key in fns.shapes if key[0] == "generate"}) >= 2
  assert {key[:4] for key in fns._ready if key[0] == "generate"} | {
      key for key in fns._ready if key[0] == "logprob"} == set(fns.shapes)
  for g, w in zip(got, want):
    assert (g["counts"], g["order"], g["malformed"]) == (w["counts"], w["order"], w["malformed"])
    assert all(np.array_equal(x, y) for x, y in zip(g["candidates"], w["candidates"]))
    np.testing.assert_array_equal(g["scores"], w["scores"])


def test_a_shape_that_several_calls_share_compiles_once():
  """Sequences of one padded length that need two calls (the token budget holds 2 rows) and a
  second announced call of that length: one program, compiled once, for all three calls."""
  cfg = tiny_config()
  model = Transformer(cfg.model)
  params = init_params(cfg.model, jax.random.PRNGKey(0))
  lines = []
  fns = ModelFns(model, params, batch_size=4, max_batch_tokens=256, log=lines.append)
  assert fns.rows(128) == 2
  fns.prepare("logprob", [([100, 110, 120, 127], 0), ([101], 0)], 0)
  assert list(fns._ready) == [("logprob", 2, 128)]
  assert lines[0].startswith("evaluation: compiled 1 logprob programs at once in ")


def test_scoring_calls_cover_the_lengths_scoring_meets():
  """The scoring of an evaluation runs only shapes that ``augscore.scoring_calls`` (made from
  its generation calls, before any candidate exists) announced."""
  cfg = tiny_config()
  model = Transformer(cfg.model)
  params = init_params(cfg.model, jax.random.PRNGKey(3))
  tasks = []
  for k, side in enumerate((2, 4, 6)):
    grid = np.random.default_rng(k).integers(0, 10, size=(side, side + 1))
    tasks.append(Task(id=f"t{k}", train=[(grid, grid.T), (grid.T, grid)], test=[(grid, grid.T)]))
  views = augscore.make_views()[:4]
  kw = dict(mode="augscore", views=views, max_len=256, batch_size=4)
  calls = augscore.scoring_calls(augscore.generation_calls(tasks, **kw), 256)
  lengths = [n for lengths, _ in calls for n in lengths]
  assert lengths == sorted(lengths) and lengths[-1] <= 256
  fns = ModelFns(model, params, batch_size=4)
  announced = set(fns._wanted("logprob", calls, 0))
  augscore.evaluate(tasks, generate_fn=fns.generate, logprob_fn=fns.logprob, samples=1,
                    progress=False, **kw)
  scored = {key for key in fns.shapes if key[0] == "logprob"}
  assert scored and scored <= announced


def test_a_call_waits_only_for_the_background_compilation_of_its_own_program():
  """A generation does not wait for a scoring compilation still running in the background; a
  background compilation that failed is said, and its programs compile at their first call."""
  cfg = tiny_config()
  model = Transformer(cfg.model)
  params = init_params(cfg.model, jax.random.PRNGKey(0))
  lines = []
  fns = ModelFns(model, params, batch_size=4, log=lines.append)
  prompts = _prompts(3)
  running = concurrent.futures.Future()  # never finishes
  fns._background.append(([("logprob", 4, 4096)], running))
  want = ModelFns(model, params, batch_size=4).generate(prompts, 8, 0)
  got = fns.generate(prompts, 8, 0)  # would hang if it waited for ``running``
  assert all(np.array_equal(a[0], b[0]) for a, b in zip(got, want))
  assert fns._background == [([("logprob", 4, 4096)], running)] and not lines
  failed = concurrent.futures.Future()
  failed.set_exception(RuntimeError("out of host memory"))
  key = ("logprob", 4, 64)
  fns._background = [([key], failed)]
  answers = [np.asarray(encode_grid(np.ones((1, 2), int)) + [END]) for _ in prompts]
  seqs = [np.concatenate([p, a])[:60] for p, a in zip(prompts, answers)]
  fns.logprob(seqs, [len(s) - 3 for s in seqs])
  assert fns._background == [] and key not in fns._ready
  assert lines == ["evaluation: the background compilation of 1 logprob programs failed "
                   "(RuntimeError: out of host memory); they compile when first called"]
