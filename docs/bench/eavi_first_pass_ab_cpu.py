"""A/B on the CPU: the EAVI alignment as rows with the parallel rollout (4 passes), before
(the rollout, then steps.alignment_loss_rows over 2B rows) and after
(steps.rows_alignment_after_rollout: the teacher-forced rows give the rollout its first pass).

  python docs/bench/eavi_first_pass_ab_cpu.py
"""
import json
import statistics
import time

import jax
import jax.numpy as jnp
from onn_jax import config, steps
from onn_jax.data.pipeline import BatchStream, build_training_tasks
from onn_jax.model.transformer import Transformer

cfg = config.load("default", ["eavi.rollout=parallel", "eavi.continuation=rows", "eavi.passes=4"])
tasks, _ = build_training_tasks(cfg.data, log=lambda *_: None)
stream = BatchStream(tasks, cfg.data, cfg.train.batch_size, 0)
model = Transformer(cfg.model)
state = steps.init_state(cfg, model, jax.random.PRNGKey(0))
batch = jax.tree.map(jnp.asarray, stream.batch(0))
rng = jax.random.PRNGKey(1)

@jax.jit
def before(params, batch):
  gen = steps.excursion(model, params, batch, cfg, rng)
  g, out = jax.grad(steps.alignment_loss_rows, has_aux=True)(
      params, batch, gen.fed_BAV, steps.excursion_mask(batch, gen.tokens_BA), model=model, cfg=cfg)
  return g, out[1]["ce_sum"], gen.passes

@jax.jit
def after(params, batch):
  gen, g, out = steps.rows_alignment_after_rollout(params, batch, rng, model=model, cfg=cfg)
  return g, out[1]["ce_sum"], gen.passes

def t(fn):
  jax.block_until_ready(fn(state.params, batch))
  xs = []
  for _ in range(7):
    s = time.perf_counter(); jax.block_until_ready(fn(state.params, batch)); xs.append(time.perf_counter() - s)
  return statistics.median(xs) * 1e3

res = {"shape": list(batch["inputs"].shape)}
for rnd in range(2):
  res[f"before_ms_{rnd}"] = t(before); res[f"after_ms_{rnd}"] = t(after)
res["passes"] = [int(before(state.params, batch)[2]), int(after(state.params, batch)[2])]
print(json.dumps(res))
