"""Session 31 dev: the arc1 sequential EAVI rollout (train.bench's decode section, default
kernels: 32 rows, EAVI's budget at the 2048 bucket, 2048-slot cache) under the defaults and
train.nsa_kernel_check variants in one process, in the order given (e.g.
",proj_three,,proj_three"; "" is the defaults). Writes $OUT/rollout_variants_dev.json."""
import json, os, sys
from pathlib import Path
import jax
from onn_jax import config
from train import bench
from train.nsa_kernel_check import variant
cfg = config.load("configs/arc1.yaml")
OUT = Path(os.environ["OUT"])
stream = bench.config_stream(cfg)
budgets = dict(zip(stream.buckets, stream.answer_budgets))
out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
for var in sys.argv[1].split(","):
  with variant(var or None):
    runner = bench.StepRunner(cfg, bench.FULL_SIZES, answer_budgets=budgets)
    timing, budget = runner.time_rollout(2048)
  rows = cfg.train.batch_size
  r = dict(ms=timing.median_ms, min_ms=timing.min_ms, compile_s=timing.compile_s,
           budget=budget, tokens_per_s=rows * budget / (timing.median_ms / 1e3))
  out.setdefault(var or "default", []).append(r)
  print(var or "default", r, flush=True)
  json.dump(out, open(OUT / "rollout_variants_dev.json", "w"), indent=0)
