"""Session 31 dev: the per-kernel profile of the NSA layer at 32 x 2048 with the session's
defaults (as layers_profile_dev.py, that layer only), and its optimized HLO."""
import gzip, json, os
from pathlib import Path
import jax
from onn_jax import config
from train import bench, profile as profiling
m = config.load("configs/arc1.yaml").model
OUT = Path(os.environ["OUT"])
fn, args = bench.layer_fwd_bwd(m, "nsa", 32, 2048)
compiled = jax.jit(fn).lower(*args).compile()
with gzip.open(OUT / "hlo_nsa_32x2048_s31.txt.gz", "wt") as f:
  f.write(compiled.as_text())
s = profiling.profile(compiled, args, Path("/tmp/prof") / "nsa2048", top=90)
s.pop("trace", None)
print(s["wall_ms"], s["kernel_us_per_call"], s["kernels_per_call"], flush=True)
json.dump({"device": jax.devices()[0].device_kind, "nsa_32x2048": s},
          open(OUT / "prof_s31.json", "w"), indent=0)
