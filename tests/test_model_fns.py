"""The model side of evaluation: batched generation and log-probabilities, one or 8 devices."""

from __future__ import annotations

import collections

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
