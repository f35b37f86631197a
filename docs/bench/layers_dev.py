"""Session 30 dev: the NSA and cuDNN GQA layers at 32 x 2048 and 8 x 8192, as train.bench's
layers section times them (without its DynMoE density table), one process."""
import json, os
from pathlib import Path
import jax
from onn_jax import config
from train import bench
m = config.load("configs/arc1.yaml").model
OUT = Path(os.environ["OUT"])
out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
for B, T in ((32, 2048), (8, 8192)):
  for name in ("full", "nsa", "full", "nsa"):
    fn, args = bench.layer_fwd_bwd(m, name, B, T)
    r = bench.measure(fn, args, bench.FULL_SIZES, loop=True)
    out.setdefault(f"{name}_{B}x{T}", []).append(r)
    print(name, B, T, r, flush=True)
    json.dump(out, open(OUT / "layers_dev.json", "w"), indent=0)
