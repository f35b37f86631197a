"""The grid grammar at evaluation (eval.grid), CPU default scale: the tf runs of a CPU EAVI
verdict study (README Results: 350 steps, 3 seeds), AugScore (and its greedy candidate) on the
held-out test outputs of their 46 training tasks, with and without the grammar.

  python docs/eval/grid_cpu.py runs/verdict_cpu grid_cpu.json
"""
import dataclasses, json, sys, tempfile, time
from pathlib import Path
import jax
from onn_jax import app, checkpoint, config
from onn_jax.data.pipeline import build_training_tasks
from onn_jax.model.transformer import init_params

study, dest = (sys.argv[1:] + ["runs/verdict_cpu", "grid_cpu.json"][len(sys.argv) - 1:])[:2]
out = {}
for seed in (0, 1, 2):
  run = f"{study}/runs/tf_s{seed}"
  cfg = config.load(f"{run}/config.yaml", [], saved_run=True)
  params, _ = checkpoint.load_params(run, init_params(cfg.model, jax.random.PRNGKey(0)),
                                     prefer_ema=False)
  data = dataclasses.replace(cfg.data, hold_out_train_tests=False, eval_demos=False)
  tasks = sorted((t for t in build_training_tasks(data, log=lambda _: None)[0] if t.test),
                 key=lambda t: t.id)
  for mode in ("greedy", "augscore"):
    for grid in (False, True):
      c = config.replace(cfg, eval={"grid": grid, "mode": mode})
      t0 = time.time()
      with tempfile.TemporaryDirectory() as tmp:
        s = app.evaluate_params(c, params, tasks, Path(tmp), log=lambda _: None)
      row = {k: s[k] for k in ("solved", "num_test_inputs", "malformed", "generations",
                               "fallback", "score")}
      row["seconds"] = round(time.time() - t0, 1)
      out[f"s{seed}/{mode}/grid={grid}"] = row
      print(seed, mode, grid, row, flush=True)
json.dump(out, open(dest, "w"), indent=1)
