"""What the programs in ``train/`` do, as functions: train, then evaluate; or evaluate a run.

Errors a user can cause (bad data, bad checkpoint, impossible config, a run that cannot go
on) end with one line on stderr naming the culprit and a non-zero exit code.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from onn_jax import checkpoint, config, faults, output, plots
from onn_jax.config import Config, ConfigError, data_sources
from onn_jax.data.pipeline import duplicates_line, load_joined
from onn_jax.data.tasks import DataError, TaskList, filter_max_grid
from onn_jax.evaluation import augscore
from onn_jax.evaluation.model_fns import ModelFns
from onn_jax.model.transformer import Transformer, init_params
from onn_jax.parallel import (AXIS, DISTRIBUTED_KEYS, is_main_process,
                              maybe_initialize_distributed, resolve_mode)
from onn_jax import ttt  # test-time training (before evaluation, when ttt.steps > 0)

USER_ERRORS = (ConfigError, DataError, checkpoint.CheckpointError, faults.OutputError)


def _fail(err: BaseException) -> int:
  print(f"error: {err}", file=sys.stderr)
  return 1


def load_eval_tasks(spec: str, cfg: Config, max_tasks: int, max_grid: int | None = None,
                    log=print) -> TaskList:
  """``arc-agi-1:evaluation``, a task folder or a Kaggle challenges JSON (or several joined
  by "+", as ``data.train``) -> sorted tasks.

  ``max_grid`` (default ``cfg.data.max_grid``) and ``max_tasks`` select a subset: the run's
  own evaluation split only; a user's ``--data`` is evaluated whole (see
  :func:`evaluate_checkpoint`). Nothing is left out unsaid: each malformed task skipped under
  ``data.skip_bad`` is named in a line and kept in the result's ``skipped`` (scores.json lists
  them) and, when the data is evaluated whole, in ``malformed_tests`` (submission.json answers
  their test inputs); a task id given twice is kept once and counted, and the tasks the
  filters leave out are counted in one line. No task left is a :class:`DataError`."""
  loaded, duplicates = load_joined(spec, cfg.data.skip_bad)
  other = next((d for d in duplicates if not d.same), None)
  if other is not None:  # a submission holds one answer per task id
    raise DataError(f"{spec}: task {other.task_id} is in {other.kept} and, with other "
                    f"contents, in {other.dropped}: a submission answers one task per id; "
                    "evaluate them apart")
  skipped = loaded.skipped
  for where, reason in skipped:
    log(f"eval data: skipped {where}: {reason}")
  for note in loaded.notes:
    log(f"eval data: {note}")
  if duplicates:
    log(f"eval data: {duplicates_line(duplicates)}")
  tasks = list(loaded)
  max_grid = cfg.data.max_grid if max_grid is None else max_grid
  if max_grid < 30:  # a CPU-sized run only sees small grids; said in the protocol
    tasks = filter_max_grid(tasks, max_grid)
  tasks.sort(key=lambda t: t.id)
  kept = tasks[:max_tasks] if max_tasks else tasks
  if len(kept) < len(loaded):
    why = [f"data.max_grid={max_grid} leaves {len(tasks)}"] if len(tasks) < len(loaded) else []
    why += [f"eval.max_tasks={max_tasks}"] if len(kept) < len(tasks) else []
    log(f"eval data: {len(kept)} of the {len(loaded)} tasks of {spec} evaluated "
        f"({', '.join(why)})")
  if not kept:
    raise DataError(f"{spec}: no evaluation task left ({len(loaded)} loaded, "
                    f"{len(skipped)} malformed skipped"
                    + (f", data.max_grid={max_grid} leaves none" if loaded else "") + ")")
  whole = len(kept) == len(loaded)  # a subset's submission holds the subset only
  return TaskList(kept, skipped, loaded.malformed_tests if whole else {})


def default_eval_folder(data: str | None) -> str:
  """``train.evaluate``'s output folder in the run without ``--out``: ``eval`` for the run's
  own evaluation (no ``--data``: where ``train.main`` wrote it, with the same selection),
  else ``eval_`` and the data's name (``eval_arc-agi-1_training``, ``eval_challenges`` for
  ``.../challenges.json``): data given with ``--data`` is evaluated whole, so its results
  never replace the run's own."""
  if not data:
    return "eval"
  names = [re.sub(r"\.json$", "", os.path.basename(os.path.normpath(source)), flags=re.I)
           or source for source in data_sources(data)]
  return "eval_" + re.sub(r"[^A-Za-z0-9._+-]", "_", "+".join(names))


def _same_source(a: str, b: str) -> bool:
  """Whether two data sources name the same tasks: ``arc-agi-1:training`` in any case, a path
  however it is written (relative, absolute, a trailing slash)."""
  if os.path.exists(a) and os.path.exists(b):
    return os.path.realpath(a) == os.path.realpath(b)
  return a.strip().lower() == b.strip().lower()


def protocol(cfg: Config) -> dict[str, Any]:
  d = cfg.data
  return {"train": d.train, "eval": d.eval, "eval_demos": d.eval_demos,
          "hold_out_train_tests": d.hold_out_train_tests,
          "leakage_guard": d.leakage_guard, "max_grid": d.max_grid,
          "pretrain_steps": cfg.train.pretrain_steps, "eavi_every": cfg.train.eavi_every,
          "eavi_steps": cfg.train.eavi_steps,
          "eval_max_len": eval_max_len(cfg), "eval_grid": cfg.eval.grid,
          "eval_max_tasks": cfg.eval.max_tasks}


def eval_max_len(cfg: Config) -> int:
  """The evaluation's limit on prompt plus answer tokens: ``eval.max_len``, or when 0 the
  longest training bucket."""
  return cfg.eval.max_len or cfg.data.buckets[-1]


def eval_mesh(cfg: Config) -> Mesh | None:
  """The evaluation's mesh: tasks x views split over every device of every host, or None on
  one device."""
  return None if resolve_mode(cfg) == "single" else Mesh(np.array(jax.devices()), (AXIS,))


def evaluate_params(cfg: Config, params, tasks: list, out_dir: Path, *, extra: dict | None = None,
                    adapted: tuple | None = None, log=output.say) -> dict:
  """Runs ``cfg.eval.mode`` on ``tasks`` and writes submission.json, scores.json, results.jsonl
  and sheet.png into ``out_dir``. Returns the summary.

  With ``ttt.steps > 0`` every task is first adapted (:func:`ttt.adapt`; ``adapted``: what it
  returned for these ``params`` and ``tasks`` already, e.g. to score one adaptation in both
  modes; no generation program then compiles during an adaptation), then all tasks are
  evaluated together, each row of a model call under its own task's adapter (the tasks that
  were not adapted under the base weights)."""
  if adapted is not None and cfg.ttt.steps <= 0:
    raise ValueError("evaluate_params: an adaptation given with ttt.steps=0")
  e = cfg.eval
  model = Transformer(cfg.model)
  mesh = eval_mesh(cfg)
  if mesh is not None:
    # Host copies, the same on every process: placing an array held by one process's device
    # on a mesh of several hosts would be a cross-host transfer, which jax refuses.
    params = jax.device_get(params)
  views = augscore.make_views(e.color_perms, cfg.data.color_perm if cfg.data.color_perm != "none"
                              else "1-9", cfg.train.seed)
  fns = ModelFns(model, params, batch_size=e.batch_size, max_batch_tokens=e.max_batch_tokens,
                 temperature=e.temperature, seed=cfg.train.seed, mesh=mesh,
                 adapters=ttt.placeholder_adapters(cfg, params) if cfg.ttt.steps > 0 else None,
                 grid=e.grid, log=log if is_main_process() else None)
  calls = None  # the generation's calls, when its programs or scoring's compile ahead
  if cfg.train.background_compile and (
      (cfg.ttt.steps > 0 and adapted is None) or e.mode == "augscore"):
    calls = augscore.generation_calls(tasks, mode=e.mode, views=views,
                                      max_len=eval_max_len(cfg), batch_size=e.batch_size)
  group_of = None
  if cfg.ttt.steps > 0:  # test-time training: each adapted task is scored with its own weights
    if adapted is None:
      if calls is not None:  # the generation's programs compile while TTT runs
        fns.prepare_in_background("generate", calls, 0 if e.mode == "greedy" else e.samples)
      adapted = ttt.adapt(cfg, params, tasks, mesh=mesh,
                          log=log if is_main_process() else lambda _: None)
    adapted, ttt_info = adapted
    adapters, index = ttt.stack(params, adapted)
    fns.use_adapters(adapters)
    if adapters is not None:
      group_of = lambda task: index.get(task.id, 0)  # 0: the base's own leaves
    extra = {**(extra or {}), "ttt": ttt_info}
  if calls is not None and e.mode == "augscore":
    # The scoring's programs compile while the generation runs, after the generation's own
    # (none left to compile if they did during TTT). The candidates' lengths are not known
    # yet, so every length band they can fall in (augscore.scoring_calls).
    fns.prepare("generate", calls, e.samples)
    fns.prepare_in_background("logprob", augscore.scoring_calls(calls, eval_max_len(cfg)), 0)
  records = augscore.evaluate(
      tasks, mode=e.mode, views=views, generate_fn=fns.generate,
      logprob_fn=fns.logprob if e.mode == "augscore" else None, max_len=eval_max_len(cfg),
      batch_size=e.batch_size, samples=e.samples,
      group_of=group_of, progress=is_main_process(), prepare=fns.prepare)
  summary = augscore.summarise(records, tasks, e.mode)
  skipped = list(getattr(tasks, "skipped", []))  # malformed tasks of data.skip_bad
  malformed = getattr(tasks, "malformed_tests", {})  # answered unless a subset is evaluated
  answered = sum(max(len(grids), 1) for grids in malformed.values())
  if skipped:
    extra = {**(extra or {}), "skipped_malformed": [{"where": where, "reason": reason}
                                                    for where, reason in skipped],
             "malformed_answered": {"tasks": len(malformed), "test_inputs": answered}}
  if is_main_process():
    augscore.write_outputs(records, tasks, out_dir, e.mode,
                           {"protocol": protocol(cfg), **(extra or {})}, e.sheet_tasks)
    said = ""
    if skipped:
      said = (f"; {len(skipped)} malformed tasks skipped (data.skip_bad; named in scores.json's "
              "skipped_malformed), " + (
                  f"{answered} test inputs of {len(malformed)} of them answered with the input "
                  "itself ([[0]] where unreadable), not scored" if malformed else
                  "not answered (read well from another source, or a subset evaluated)"))
    log(f"evaluation ({e.mode}): " + augscore.describe(summary, out_dir) + said)
  return summary


def use_compile_cache(cfg: Config) -> None:
  """Points JAX's persistent compilation cache at ``train.jax_cache_dir`` unless that is empty
  or a cache is set already (JAX_COMPILATION_CACHE_DIR, jax.config)."""
  if cfg.train.jax_cache_dir and not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir",
                      str(Path(cfg.train.jax_cache_dir).expanduser()))


def train_and_evaluate(cfg: Config, workdir: Path) -> int:
  """``python -m train.main``: train the configured stages, plot, evaluate on ``data.eval``.
  The workdir stays locked until the evaluation has written its files (a second run there
  would otherwise start beside it); a stop signal during the evaluation is one line."""
  from onn_jax import run  # heavy: jitted steps
  use_compile_cache(cfg)
  workdir = Path(workdir)
  when = "before the first step"  # where a stop signal the training did not report came
  try:
    maybe_initialize_distributed(cfg)
    ttt.check(cfg)
    tasks = load_eval_tasks(cfg.data.eval, cfg, cfg.eval.max_tasks) if cfg.data.eval else []
    ahead = None
    if tasks and cfg.ttt.steps > 0 and cfg.train.background_compile:
      ahead = lambda params: ttt.compile_ahead(cfg, params, tasks, mesh=eval_mesh(cfg))
    with run.hold_workdir(workdir), faults.SignalGuard():
      result = run.train(cfg, workdir, ahead=ahead, locked=True)
      when = (f"after training, checkpointed at step {result.step}: run the same command again "
              "to go on")
      if is_main_process():
        plots.plot_training(workdir / "metrics.jsonl", workdir / "plots")
      if not result.finished:
        print(f"stopped at step {result.step} of {result.total} (train.run_steps); "
              "run the same command again to resume")
        return 0
      if not cfg.data.eval:
        return 0
      when = (f"during the evaluation; training is done and checkpointed at step "
              f"{result.step}: run the same command again to evaluate")
      state = result.state
      use_ema = cfg.eval.weights == "ema" and bool(jax.tree.leaves(state.ema))
      evaluate_params(cfg, jax.device_get(state.ema if use_ema else state.params), tasks,
                      workdir / "eval",
                      extra={"step": result.step, "weights": "ema" if use_ema else "params"})
  except USER_ERRORS + (run.TrainingStopped,) as err:
    return _fail(err)
  except KeyboardInterrupt as err:  # run.train has checkpointed and said so, when it could
    if not getattr(err, "reported", False):
      when = getattr(err, "when", when)  # run.train's, for one after its last step
      print(f"interrupted ({getattr(err, 'name', 'SIGINT')}) {when}", file=sys.stderr)
    return getattr(err, "exit_code", 130)
  return 0


def evaluate_checkpoint(run_dir: Path, data: str | None, out_dir: Path | None,
                        overrides: list[str]) -> int:
  """``python -m train.evaluate``: a trained run (its config.yaml + checkpoints) on a split.
  A stop signal (loading, adapting, evaluating) is one line and exit code 128 + it."""
  with faults.SignalGuard():
    try:
      return _evaluate_checkpoint(run_dir, data, out_dir, overrides)
    except KeyboardInterrupt as err:
      print(f"interrupted ({getattr(err, 'name', 'SIGINT')}) during train.evaluate: "
            + (f"run it again for its files in {err.out_dir}" if hasattr(err, "out_dir") else
               "nothing written"), file=sys.stderr)
      return getattr(err, "exit_code", 130)


def _evaluate_checkpoint(run_dir: Path, data: str | None, out_dir: Path | None,
                         overrides: list[str]) -> int:
  try:
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
      ckpt_dir = checkpoint.find_checkpoint_dir(run_dir)
      cfg_path = ckpt_dir.parent / "config.yaml"
    if not cfg_path.is_file():
      raise checkpoint.CheckpointError(f"{run_dir}: no config.yaml beside the checkpoints")
    try:
      cfg = config.load(cfg_path, overrides, saved_run=True)
    except ConfigError as err:  # the run's config with this command line's overrides
      return config.fail(err)
    # Joining a multi-host job is this command's choice, not the trained run's: a run trained
    # on two hosts evaluates on one unless this command line gives the flags again.
    asked = {o.split("=", 1)[0].strip() for o in overrides}
    cfg = config.replace(cfg, parallel={key: getattr(config.ParallelConfig(), key)
                                        for key in DISTRIBUTED_KEYS
                                        if f"parallel.{key}" not in asked})
    maybe_initialize_distributed(cfg)  # before anything touches a device
    use_compile_cache(cfg)
    ttt.check(cfg)
    spec = data or cfg.data.eval
    if not spec:
      raise ConfigError("--data: no evaluation data given and the run has no data.eval")
    # The run's folder, also when --checkpoint names its checkpoints/ (Orbax's folder).
    out_dir = Path(out_dir or cfg_path.parent / default_eval_folder(data))
    if is_main_process():  # before any work: the evaluation's outputs must have a place
      faults.check_writable_dir(out_dir, "--out")
    target = init_params(cfg.model, jax.random.PRNGKey(0))
    params, record = checkpoint.load_params(run_dir, target,
                                            prefer_ema=cfg.eval.weights == "ema")
    # The user's data, whole: only a filter asked for on this command line applies.
    max_tasks = cfg.eval.max_tasks if not data or "eval.max_tasks" in asked else 0
    max_grid = cfg.data.max_grid if not data or "data.max_grid" in asked else 30
    tasks = load_eval_tasks(spec, cfg, max_tasks, max_grid)
    trained = [part for part in data_sources(spec)
               if any(_same_source(part, source) for source in data_sources(cfg.data.train))]
    if trained and not cfg.data.hold_out_train_tests:
      print(f"warning: {' and '.join(trained)} {'is' if len(trained) == 1 else 'are'} training "
            "data of this run and data.hold_out_train_tests was off: these test outputs were "
            "trained on", file=sys.stderr)
  except USER_ERRORS as err:
    return _fail(err)
  # What was evaluated: the user's data (whole, or filtered as this command line asked), not
  # the run's own data.eval and its selection.
  evaluated = {"eval": spec, "max_grid": max_grid, "eval_max_tasks": max_tasks} if data else {}
  try:
    evaluate_params(cfg, params, tasks, out_dir, extra={"step": record.get("step"),
                                                       "weights": record.get("weights"),
                                                       "data": spec,
                                                       "protocol": {**protocol(cfg),
                                                                    **evaluated}})
  except KeyboardInterrupt as err:
    err.out_dir = out_dir
    raise
  return 0
