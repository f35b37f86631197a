"""Session 35 dev: the arc1 teacher-forcing step at 32 x 2048 (train.bench's train section, one
case, the SDL target's routing) with the update guard of today (scalars only) and with session
34's (also a finiteness reduction over every leaf of the new parameters), alternating in one
process: "new,old,new,old". PACKED=1: packed rows. Writes $OUT/update_guard_dev.json."""
import json, os, sys
from pathlib import Path
import jax
import jax.numpy as jnp
import optax
from onn_jax import config, steps
from train import bench

cfg = config.load("configs/arc1.yaml")
OUT = Path(os.environ["OUT"])
packed = os.environ.get("PACKED") == "1"
today = steps._guarded_update


def leafwise_guard(state, grads, ok, cfg):
  """Session 34's guard (commit 0d58c03): the skip decision also reads every new leaf."""
  with jax.named_scope("optimizer"):
    lr = steps.learning_rate_schedule(cfg)(state.step)
    updates, new_opt = steps.make_optimizer(cfg).update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, jax.tree.map(lambda u: lr * u, updates))
    finite = ok & jnp.all(jnp.array([jnp.all(jnp.isfinite(p))
                                     for p in jax.tree.leaves(new_params)]))
    params = steps._tree_where(finite, new_params, state.params)
    d = steps.ema_decay_at(cfg.train.ema_decay, state.step + 1)
    ema = steps._tree_where(finite, jax.tree.map(
        lambda e, p: (d * e + (1 - d) * p).astype(e.dtype), state.ema, params), state.ema)
    state = state.replace(
        step=state.step + 1, params=params,
        opt_state=steps._tree_where(finite, new_opt, state.opt_state),
        ema=ema, nonfinite=jnp.where(finite, 0, state.nonfinite + 1),
        skipped=state.skipped + (~finite).astype(jnp.int32))
  return state, lr, finite


out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "packed": packed}
for arm in sys.argv[1].split(","):
  steps._guarded_update = {"new": today, "old": leafwise_guard}[arm]
  runner = bench.StepRunner(cfg, bench.FULL_SIZES)  # its own compiled programs
  timing, _ = runner.time_step("train", 2048, bench.FULL_SIZES.iters, packed=packed,
                               loop=True, routing="target")
  r = dict(ms=timing.median_ms, min_ms=timing.min_ms, loop_ms=timing.loop_ms,
           compile_s=timing.compile_s)
  out.setdefault(arm, []).append(r)
  print(arm, r, flush=True)
  json.dump(out, open(OUT / "update_guard_dev.json", "w"), indent=0)
