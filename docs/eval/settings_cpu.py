"""Evaluation settings compared on the runs of a CPU verdict study (README Results:
`configs/default.yaml`, 350 steps, 3 seeds): each setting scores the held-out test outputs of
the runs' 46 training tasks with the final weights. Besides the official score: coverage, the
test outputs that some candidate matches (what a perfect ranking would reach), and the rank
of the right candidate where there is one.

  python docs/eval/settings_cpu.py STUDY OUT.json SETTING [SETTING ...]

A setting is comma-separated overrides, e.g. the grid grammar (docs/eval/grid_cpu_default.json,
on runs/verdict_cpu, written by this script's first form with other keys) and more views
(docs/eval/color_perms_cpu_outputs_seed0.json: seed 0 of the study with data.loss_on=outputs,
collected from this script's printed rows as seeds 1 and 2 did not finish):

  python docs/eval/settings_cpu.py runs/verdict_cpu grid.json eval.mode=greedy,eval.grid=false \\
      eval.mode=greedy,eval.grid=true eval.mode=augscore,eval.grid=false eval.mode=augscore,eval.grid=true
  python docs/eval/settings_cpu.py runs/loss_outputs perms.json eval.mode=augscore,eval.color_perms=0 \\
      eval.mode=augscore,eval.color_perms=3
"""
import dataclasses, json, sys, tempfile, time
from pathlib import Path
import jax
from onn_jax import app, checkpoint, config
from onn_jax.data.pipeline import build_training_tasks
from onn_jax.model.transformer import init_params

study, dest, settings = sys.argv[1], sys.argv[2], sys.argv[3:]
out = {}
for seed in (0, 1, 2):
  run = f"{study}/runs/tf_s{seed}"
  cfg = config.load(f"{run}/config.yaml", [], saved_run=True)
  params, _ = checkpoint.load_params(run, init_params(cfg.model, jax.random.PRNGKey(0)),
                                     prefer_ema=False)
  data = dataclasses.replace(cfg.data, hold_out_train_tests=False, eval_demos=False)
  tasks = sorted((t for t in build_training_tasks(data, log=lambda _: None)[0] if t.test),
                 key=lambda t: t.id)
  for setting in settings:
    c = config.load(f"{run}/config.yaml", setting.split(","), saved_run=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
      s = app.evaluate_params(c, params, tasks, Path(tmp), log=lambda _: None)
      ranks = [json.loads(line)["rank"] for line in open(Path(tmp) / "results.jsonl")]
    row = {k: s[k] for k in ("solved", "num_test_inputs", "score", "pass@1", "pass@2",
                             "malformed", "generations", "fallback", "mean_candidates")}
    row.update(covered=sum(r is not None for r in ranks),
               right_ranks=sorted(r for r in ranks if r is not None),
               seconds=round(time.time() - t0, 1))
    out[f"s{seed}/{setting}"] = row
    print(seed, setting, row, flush=True)
json.dump(out, open(dest, "w"), indent=1)
