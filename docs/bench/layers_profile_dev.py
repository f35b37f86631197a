"""Session 30 dev: per-kernel profiles of the NSA / cuDNN layers with the bf16-partials default,
plus the NSA layer's optimized HLO (to map fusion names to their ops)."""
import gzip, json, os, sys
from pathlib import Path
import jax
from onn_jax import config
from train import bench, profile as profiling
m = config.load("configs/arc1.yaml").model
OUT = Path(os.environ["OUT"])
out = {"device": jax.devices()[0].device_kind}
for name, B, T in (("nsa", 32, 2048), ("full", 32, 2048), ("nsa", 8, 8192)):
  fn, args = bench.layer_fwd_bwd(m, name, B, T)
  compiled = jax.jit(fn).lower(*args).compile()
  if name == "nsa" and T == 2048:
    with gzip.open(OUT / "hlo_nsa_32x2048.txt.gz", "wt") as f:
      f.write(compiled.as_text())
  s = profiling.profile(compiled, args, Path("/tmp/prof") / f"{name}{T}", top=90)
  s.pop("trace", None)
  out[f"{name}_{B}x{T}"] = s
  print(name, B, T, s["wall_ms"], s["kernel_us_per_call"], s["kernels_per_call"], flush=True)
  json.dump(out, open(OUT / "prof_dev.json", "w"), indent=0)
# The 1 x 32768 layer (issue #16's 2x goal), as train.bench's layers section times it.
for name in ("full", "nsa"):
  fn, args = bench.layer_fwd_bwd(m, name, 1, 32768)
  out[f"time_{name}_1x32768"] = r = bench.measure(fn, args, bench.FULL_SIZES, loop=True)
  print(name, 32768, r, flush=True)
  json.dump(out, open(OUT / "prof_dev.json", "w"), indent=0)
