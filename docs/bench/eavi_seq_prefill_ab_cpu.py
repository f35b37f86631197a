"""A/B on this machine: the sequential EAVI step with its own prefill (before) against the
rollout from the alignment's teacher-forced prefill (after), same batch, same process.

  REPS=12 python docs/bench/eavi_seq_prefill_ab_cpu.py [config] [section.key=value ...]
"""
import functools, json, sys, time
import jax, jax.numpy as jnp, numpy as np
from onn_jax import config, steps
from onn_jax.model.transformer import Transformer, outside_tf
from onn_jax.data.pipeline import BatchStream, build_training_tasks

name = sys.argv[1] if len(sys.argv) > 1 else "default"
cfg = config.load(name, sys.argv[2:])
tasks, _ = build_training_tasks(cfg.data, log=lambda *_: None)
stream = BatchStream(tasks, cfg.data, cfg.train.batch_size, 0)
model = Transformer(cfg.model)
state = steps.init_state(cfg, model, jax.random.PRNGKey(0))
out = {}
for bucket in range(len(stream.buckets)):
  batch = jax.tree.map(jnp.asarray, stream.batch(0, bucket=bucket))

  def before(state, batch):  # eavi_step's sequential path before this change
    m = outside_tf(model)
    gen = steps.excursion(m, state.params, batch, cfg, state.rng)
    grads, out = jax.grad(steps.alignment_loss, has_aux=True)(
        state.params, batch, gen.fed_BAV, steps.excursion_mask(batch, gen.tokens_BA), model=m,
        cfg=cfg)
    return grads, gen.tokens_BA

  def after(state, batch):
    m = outside_tf(model)
    gen, grads, _ = steps.branch_alignment_after_rollout(state.params, batch, state.rng,
                                                         model=m, cfg=cfg)
    return grads, gen.tokens_BA

  def tf(state, batch):
    return steps.train_step(state, batch, model=model, cfg=cfg)

  fns = {"before": jax.jit(before), "after": jax.jit(after),
         "tf": jax.jit(functools.partial(steps.train_step, model=model, cfg=cfg))}
  res = {}
  for k, f in fns.items():
    jax.block_until_ready(f(state, batch))
  for rep in range(int(__import__("os").environ.get("REPS", "5"))):  # interleaved, median
    for k, f in fns.items():
      t = time.perf_counter(); jax.block_until_ready(f(state, batch))
      res.setdefault(k, []).append(time.perf_counter() - t)
  ms = {k: 1e3 * float(np.median(v)) for k, v in res.items()}
  tb, ta = fns["before"](state, batch)[1], fns["after"](state, batch)[1]
  ms["same_tokens"] = bool(np.array_equal(np.asarray(tb), np.asarray(ta)))
  ms["shape"] = list(batch["inputs"].shape)
  ms["answer_budget"] = steps.answer_budget(batch, cfg)
  ms["longest_answer"] = int(np.max(batch["answer_len"]))
  out[str(stream.buckets[bucket])] = ms
  print(stream.buckets[bucket], ms, flush=True)
print(json.dumps({"config": name, "overrides": sys.argv[2:], "jax": jax.__version__,
                  "device": jax.devices()[0].device_kind, "results": out}))
