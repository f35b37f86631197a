"""TTT at CPU default scale: the tf runs of a CPU EAVI verdict study (README Results: 350
steps, 3 seeds), free-running greedy answer-token accuracy and exact match on the held-out test
outputs of their 46 training tasks, without TTT and with ttt.steps=32 at two learning rates.

  python docs/ttt/ttt_cpu.py runs/verdict_cpu ttt_cpu.json            # attention + norms
  python docs/ttt/ttt_cpu.py runs/verdict_cpu ttt_all.json "*" 1e-3   # the whole model
"""
import dataclasses, json, sys, time
import jax, numpy as np
from onn_jax import config, checkpoint, ttt, analysis
from onn_jax.data.pipeline import build_training_tasks
from onn_jax.model.transformer import init_params

defaults = ["runs/verdict_cpu", "ttt_cpu.json", "*/attn/*,*norm/scale", "1e-4,1e-3"]
study, dest, patterns, rates = (sys.argv[1:] + defaults[len(sys.argv) - 1:])[:4]
patterns = patterns.split(",")
out = {}
for seed in (0, 1, 2):
  run = f"{study}/runs/tf_s{seed}"
  cfg = config.load(f"{run}/config.yaml", ["eval.batch_size=2"], saved_run=True)
  params, rec = checkpoint.load_params(run, init_params(cfg.model, jax.random.PRNGKey(0)), prefer_ema=False)
  data = dataclasses.replace(cfg.data, hold_out_train_tests=False, eval_demos=False)
  tasks = [t for t in build_training_tasks(data, log=lambda _: None)[0] if t.test]
  base = analysis.summarise_rollouts(analysis.rollouts(cfg, params, tasks))
  out[f"s{seed}/none"] = base; print(seed, "none", base, flush=True)
  for lr in (float(r) for r in rates.split(",")):
    c = config.replace(cfg, ttt={"steps": 32, "learning_rate": lr, "warmup_steps": 4,
                                 "params": patterns})
    t0 = time.time()
    adapters, info = ttt.adapt(c, params, tasks, log=lambda _: None)
    recs = []
    for task in tasks:
      p = ttt.merge(params, adapters[task.id]) if task.id in adapters else params
      recs += analysis.rollouts(c, p, [task])
    s = analysis.summarise_rollouts(recs)
    s.update(loo_before=info["loo_ce_before"], loo_after=info["loo_ce_after"], adapted=info["adapted"], ttt_s=info["seconds"], total_s=round(time.time() - t0, 1))
    out[f"s{seed}/{lr}"] = s; print(seed, lr, s, flush=True)
json.dump(out, open(dest, "w"), indent=1)
