"""Session 30 dev script (run with commit "DynMoE impl pallas, tried", removed in the next commit):
the pallas experts against tiled on the GPU: a check of one layer's outputs and gradients, then
the layer fwd+bwd at 32 x 2048 (even and trained routing) and 8 x 8192 (trained), per impl.
`python3 moe_pallas_layer_dev.py tiled,pallas,batched` with $OUT set."""
import dataclasses, json, os, sys
import jax, jax.numpy as jnp, numpy as np
from onn_jax import config
from train import bench
m = config.load("configs/arc1.yaml").model
out = {"device": jax.devices()[0].device_kind}
# 1. check: one layer fwd+bwd, tiled vs pallas, at 32 x 2048 (bf16), trained routing
res = {}
for impl in ("tiled", "pallas"):
  fn, args = bench.layer_fwd_bwd(dataclasses.replace(m, moe_impl=impl), "dynmoe", 32, 2048,
                                 "trained")
  res[impl] = jax.jit(fn)(*args)
chk = {}
for path, a in jax.tree_util.tree_leaves_with_path(res["pallas"]):
  b = [v for p, v in jax.tree_util.tree_leaves_with_path(res["tiled"]) if p == path][0]
  a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
  chk[jax.tree_util.keystr(path)] = [float(np.max(np.abs(a64 - b64))), float(np.max(np.abs(b64)))]
out["check"] = chk
print(json.dumps(chk, indent=0))
sizes = bench.FULL_SIZES
for shape, routing in (((32, 2048), "even"), ((32, 2048), "trained"), ((8, 8192), "trained")):
  for impl in sys.argv[1].split(","):
    fn, args = bench.layer_fwd_bwd(dataclasses.replace(m, moe_impl=impl), "dynmoe", *shape,
                                   routing)
    r = bench.measure(fn, args, sizes, loop=True)
    key = f"{shape[0]}x{shape[1]}_{routing}_{impl}"
    out[key] = r
    print(key, r, flush=True)
json.dump(out, open(os.environ["OUT"] + "/moe_dev.json", "w"), indent=1)
