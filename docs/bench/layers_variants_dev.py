"""Session 31 dev: the NSA layer (train.bench's layers section) under the defaults and under
train.nsa_kernel_check variants, and the cuDNN GQA layer, alternated twice in one process at
32 x 2048 and 8 x 8192. Usage: python docs/bench/layers_variants_dev.py VARIANT[,VARIANT...]
(writes $OUT/layers_variants_dev.json); LAYER_SIZES="32x2048" for some sizes only."""
import json, os, sys
from pathlib import Path
import jax
from onn_jax import config
from train import bench
from train.nsa_kernel_check import variant
m = config.load("configs/arc1.yaml").model
OUT = Path(os.environ["OUT"])
names = [None] + [v for v in sys.argv[1].split(",") if v]
out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "variants": names[1:]}
sizes = os.environ.get("LAYER_SIZES", "32x2048,8x8192").split(",")
for B, T in (tuple(map(int, s.split("x"))) for s in sizes):
  for _ in range(2):
    for layer, var in [("full", None)] + [("nsa", v) for v in names]:
      with variant(var):
        fn, args = bench.layer_fwd_bwd(m, layer, B, T)
        r = bench.measure(fn, args, bench.FULL_SIZES, loop=True)
      key = f"{layer}[{var}]_{B}x{T}" if var else f"{layer}_{B}x{T}"
      out.setdefault(key, []).append(r)
      print(key, r, flush=True)
      json.dump(out, open(OUT / "layers_variants_dev.json", "w"), indent=0)
