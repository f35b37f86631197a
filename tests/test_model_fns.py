"""The model side of evaluation: batched generation and log-probabilities, one or 8 devices."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from onn_jax.data.serialize import encode_grid, serialize
from onn_jax.data.tokens import END
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
