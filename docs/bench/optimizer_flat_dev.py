"""Session 33 dev: what the optimizer update costs in a step, and what one flat vector would.
Its "setting" arm needs steps.UPDATE_LAYOUT, removed in session 34 (the flat update made the
arc1 step 0.5 ms slower on an H100): run it at commit 5f14626; the other two run anywhere.

`steps._guarded_update` (clip, AdamW, the non-finite guard, the EMA) runs leaf by leaf over the
model's parameter tree (arc1: 141 leaves, a few small kernels each a step: the norms, the
finiteness reductions, the updates and the selects). Timed back to back, donated and carried as a
training loop runs it, against the same arithmetic on one flat vector: the gradients and the
parameters ravelled (one concatenation each), the moments and the EMA kept flat, the new
parameters unravelled. Same optimizer settings (cfg.train), weight decay on every entry (the
flat form's mask is not modelled: a timing, not a result); and "setting", what
steps.UPDATE_LAYOUT="flat" runs (the moments and the EMA ravelled and unravelled every step,
so the state keeps its trees; added after session 33's H100 run, whose raw file has "tree" and
"flat" only). Usage:
CONFIG=configs/arc1.yaml python docs/bench/optimizer_flat_dev.py (writes
$OUT/optimizer_flat_dev.json)."""
import json, os
from pathlib import Path
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from onn_jax import config, steps
from train import bench

cfg = config.load(os.environ.get("CONFIG", "configs/arc1.yaml"))
OUT = Path(os.environ.get("OUT", "."))
t = cfg.train
runner = bench.StepRunner(cfg, bench.FULL_SIZES)
state = runner.fresh_state()
leaves = jax.tree.leaves(state.params)
keys = jax.random.split(jax.random.key(1), len(leaves))
grads = jax.tree.unflatten(jax.tree.structure(state.params), [
    1e-3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
       "leaves": len(leaves), "params": int(sum(x.size for x in leaves))}


def tree_update(s, g):
  return (steps._guarded_update(s, g, jnp.bool_(True), cfg)[0],)


def setting_update(s, g):
  old = steps.UPDATE_LAYOUT
  steps.UPDATE_LAYOUT = "flat"
  try:
    return (steps._guarded_update(s, g, jnp.bool_(True), cfg)[0],)
  finally:
    steps.UPDATE_LAYOUT = old


def flat_update(s, g):
  params, m, v, ema, step = s
  p, unravel = ravel_pytree(params)
  gf, _ = ravel_pytree(g)
  lr = steps.learning_rate_schedule(cfg)(step)
  norm = jnp.sqrt(jnp.sum(gf * gf))
  gf = jnp.where(norm < t.grad_clip, gf, gf / norm * t.grad_clip)
  m2 = t.b1 * m + (1 - t.b1) * gf
  v2 = t.b2 * v + (1 - t.b2) * gf * gf
  n = (step + 1).astype(jnp.float32)
  u = (m2 / (1 - t.b1 ** n)) / (jnp.sqrt(v2 / (1 - t.b2 ** n)) + 1e-8) + t.weight_decay * p
  p2 = p - lr * u
  ok = jnp.isfinite(norm) & jnp.all(jnp.isfinite(p2))
  p2, m2, v2 = (jnp.where(ok, a, b) for a, b in ((p2, p), (m2, m), (v2, v)))
  d = steps.ema_decay_at(t.ema_decay, step + 1)
  ema2 = jnp.where(ok, d * ema + (1 - d) * p2, ema)
  return ((unravel(p2), m2, v2, ema2, step + 1),)


p0, _ = ravel_pytree(state.params)
flat_state = (state.params, jnp.zeros_like(p0), jnp.zeros_like(p0), p0, state.step)
for _ in range(2):
  arms = [("tree", tree_update, state), ("flat", flat_update, flat_state)]
  if hasattr(steps, "UPDATE_LAYOUT"):
    arms.append(("setting", setting_update, state))
  for name, fn, s in arms:
    s = jax.tree.map(jnp.copy, s)  # each its own buffers: the call donates them
    timing, _ = bench.benchmark(fn, (s, grads), warmup=bench.FULL_SIZES.warmup,
                                iters=bench.FULL_SIZES.iters, donate=(0,), carry=True,
                                loop=True)
    r = dict(ms=timing.median_ms, min_ms=timing.min_ms, loop_ms=timing.loop_ms,
             compile_s=timing.compile_s)
    out.setdefault(name, []).append(r)
    print(name, r, flush=True)
    json.dump(out, open(OUT / "optimizer_flat_dev.json", "w"), indent=0)
