"""Issue #16's rollout baseline timed again, its prefill apart (dev script, session 46).

The issue's goal is 5x "today's 22.9k rollout tokens/s": the arc1 model's EAVI excursion as
``train.bench --only eavi`` timed it on 2026-11-26 (an H200: batch 32, the full 931-token
budget after a 1748-token prompt, a 2048-slot cache, prefill included). Run with the code of
that day first on ``PYTHONPATH`` (``git archive 40d6ed0``), this script times that same
excursion and, apart, its prefill (the ``mode="prefill"`` call that opens ``generate``), so
that today's ``train.bench --only decode`` (with its prefill, and its one-token steps alone)
can be compared with it in one device call:

  mkdir -p old && git archive 40d6ed0 | tar -x -C old
  PYTHONPATH=old python docs/bench/rollout_baseline_dev.py OUT.json [--quick]

Only the 2026-11-26 API is used (``train.bench.StepRunner``, ``decode.init_cache`` through
``onn_jax.model.transformer``).
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp

from onn_jax import config
from onn_jax.model.transformer import init_cache
from train import bench


def main(argv: list[str]) -> int:
  out = argv[0]
  quick = "--quick" in argv
  cfg = config.load("configs/arc1.yaml", list(bench.QUICK_OVERRIDES) if quick else [])
  sizes = bench.QUICK_SIZES if quick else bench.FULL_SIZES
  T = cfg.data.buckets[-1]
  runner = bench.StepRunner(cfg, sizes)
  rollout, budget = runner.time_rollout(T)
  batch, params = runner.batch(T), runner.fresh_state().params
  B = cfg.train.batch_size

  def prefill(params, prompt_BP, prompt_len_B):
    valid_BP = jnp.arange(T)[None] < prompt_len_B[:, None]
    cache = init_cache(cfg.model, B, T)
    logits_BPV, cache, _ = runner.model.apply({"params": params}, prompt_BP, valid_BP,
                                              mode="prefill", cache=cache)
    return logits_BPV[jnp.arange(B), prompt_len_B - 1], cache

  pre, _ = bench.benchmark(prefill, (params, batch["inputs"], batch["answer_start"]),
                           warmup=sizes.warmup, iters=max(sizes.iters, 5))
  tokens = B * budget
  result = {
      "device_kind": jax.devices()[0].device_kind, "jax_version": jax.__version__,
      "seq_len": T, "batch": B, "rollout_budget": budget,
      "prompt_len": int(batch["answer_start"][0]),
      "rollout_ms": rollout.median_ms, "rollout_min_ms": rollout.min_ms,
      "rollout_tokens_per_s": tokens / (rollout.median_ms / 1e3),
      "prefill_ms": pre.median_ms, "prefill_min_ms": pre.min_ms,
      "steps_ms": rollout.median_ms - pre.median_ms,
      "steps_tokens_per_s": tokens / ((rollout.median_ms - pre.median_ms) / 1e3),
      "prefill_share": pre.median_ms / rollout.median_ms,
  }
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps(result, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
