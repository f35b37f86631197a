"""More views at evaluation (eval.color_perms), CPU default scale: the tf runs of a CPU verdict
study (README Results: 350 steps, 3 seeds), AugScore on the held-out test outputs of their 46
training tasks with 0, 1 and 3 colour-permuted copies of each of the 8 D8 views (8, 16 and 32
views). Besides the official score: coverage, the test outputs that any candidate matches
(what a perfect ranking would reach), and the rank of the right candidate where it is one.

  python docs/eval/color_perms_cpu.py runs/loss_outputs color_perms_cpu.json
"""
import dataclasses, json, sys, tempfile, time
from pathlib import Path
import jax
import numpy as np
from onn_jax import app, checkpoint, config
from onn_jax.data.pipeline import build_training_tasks
from onn_jax.model.transformer import init_params

study, dest = (sys.argv[1:] + ["runs/loss_outputs", "color_perms_cpu.json"][len(sys.argv) - 1:])[:2]
out = {}
for seed in (0, 1, 2):
  run = f"{study}/runs/tf_s{seed}"
  cfg = config.load(f"{run}/config.yaml", [], saved_run=True)
  params, _ = checkpoint.load_params(run, init_params(cfg.model, jax.random.PRNGKey(0)),
                                     prefer_ema=False)
  data = dataclasses.replace(cfg.data, hold_out_train_tests=False, eval_demos=False)
  tasks = sorted((t for t in build_training_tasks(data, log=lambda _: None)[0] if t.test),
                 key=lambda t: t.id)
  targets = {(t.id, i): np.asarray(pair[1]) for t in tasks for i, pair in enumerate(t.test)}
  for perms in (0, 1, 3):
    c = config.replace(cfg, eval={"mode": "augscore", "color_perms": perms})
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
      s = app.evaluate_params(c, params, tasks, Path(tmp), log=lambda _: None)
      ranks = []
      for line in open(Path(tmp) / "results.jsonl"):
        r = json.loads(line)
        want = targets[(r["task_id"], r["test_index"])]
        hit = [k for k, cand in enumerate(r["order"])
               if np.array_equal(np.asarray(r["candidates"][cand]), want)]
        ranks.append(hit[0] + 1 if hit else None)
    row = {k: s[k] for k in ("solved", "num_test_inputs", "score", "pass@1", "pass@2",
                             "malformed", "generations", "mean_candidates")}
    row.update(covered=sum(r is not None for r in ranks),
               right_ranks=sorted(r for r in ranks if r is not None),
               seconds=round(time.time() - t0, 1))
    out[f"s{seed}/color_perms={perms}"] = row
    print(seed, perms, row, flush=True)
json.dump(out, open(dest, "w"), indent=1)
