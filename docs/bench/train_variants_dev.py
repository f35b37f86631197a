"""Session 31 dev: the arc1 teacher-forcing step at 32 x 2048, the SDL target's routing
(train.bench's train section, one case), under the defaults and train.nsa_kernel_check
variants in one process, in the order given (e.g. ",before_s31,,before_s31": "" is the
defaults). Writes $OUT/train_variants_dev.json."""
import json, os, sys
from pathlib import Path
import jax
from onn_jax import config
from train import bench
from train.nsa_kernel_check import variant
cfg = config.load("configs/arc1.yaml")
OUT = Path(os.environ["OUT"])
packed = os.environ.get("PACKED") == "1"
out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "packed": packed}
for var in sys.argv[1].split(","):
  with variant(var or None):
    runner = bench.StepRunner(cfg, bench.FULL_SIZES)  # its own compiled programs
    timing, _ = runner.time_step("train", 2048, bench.FULL_SIZES.iters, packed=packed,
                                 loop=True, routing="target")
  r = dict(ms=timing.median_ms, min_ms=timing.min_ms, loop_ms=timing.loop_ms,
           compile_s=timing.compile_s)
  out.setdefault(var or "default", []).append(r)
  print(var or "default", r, flush=True)
  json.dump(out, open(OUT / "train_variants_dev.json", "w"), indent=0)
