"""The training run behind ``python -m train.main``: data, model, steps, checkpoints, metrics.

The registered training stages in order (:mod:`onn_jax.stages`: teacher forcing for
``train.pretrain_steps``, every ``train.eavi_every``-th of them an EAVI step when set, then EAVI
for ``train.eavi_steps``), then evaluation on ``data.eval``. A run on a workdir that holds
checkpoints resumes from the latest one and continues bit-identically (the stage and the batch
at step s depend only on (config, seed, s), and the RNG lives in the checkpointed state).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from onn_jax import checkpoint, config, experts, faults, output, stages, steps, tblog
from onn_jax.config import Config
from onn_jax.data.pipeline import BatchStream, build_training_tasks
from onn_jax.model import attention, moe
from onn_jax.model.transformer import Transformer, count_params
from onn_jax.parallel import (Runner, cancel_background, host_value, is_main_process,
                              peak_memory, platform_line)


class TrainingStopped(RuntimeError):
  """The run cannot go on (e.g. repeated non-finite losses); the message says why."""


class MetricsWriter:
  """Appends one JSON object per line to ``metrics.jsonl`` (process 0 only)."""

  def __init__(self, path: Path, enabled: bool):
    self.path, self.enabled = path, enabled

  def truncate_after(self, step: int) -> None:
    """Drops records of steps after ``step``: a resumed run logs them again."""
    if not self.path.exists():
      return
    lines = self.path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and _record_step(line) <= step]
    self.path.write_text("".join(line + "\n" for line in kept))

  def write(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    with self.path.open("a") as f:
      f.write(json.dumps(output.jsonable(record)) + "\n")


def _set_aside_previous_run(workdir: Path, log) -> None:
  """A run starting fresh in a workdir whose metrics.jsonl holds records (its checkpoints were
  deleted, or it stopped before its first save) moves that file and its config.yaml to
  ``previous-N/`` and says so: the new run would otherwise write over them unsaid."""
  metrics = workdir / "metrics.jsonl"
  if not metrics.is_file() or not metrics.read_text().strip():
    return
  number = 1
  while (workdir / f"previous-{number}").exists():
    number += 1
  aside = workdir / f"previous-{number}"
  aside.mkdir()
  moved = [name for name in ("metrics.jsonl", "config.yaml", "tensorboard")
           if (workdir / name).exists()]
  for name in moved:
    shutil.move(str(workdir / name), str(aside / name))
  names = ", ".join(moved[:-1]) + " and " + moved[-1] if len(moved) > 1 else moved[0]
  log(f"{workdir} holds no checkpoint but an earlier run's records: starting at step 0; its "
      f"{names} moved to {aside}")


def _record_step(line: str) -> int:
  try:
    return int(json.loads(line).get("step", 0))
  except (ValueError, AttributeError):
    return 1 << 62  # a torn last line: dropped


def make_runner(cfg: Config, model: Transformer) -> Runner:
  """A Runner holding every registered stage's step (compiled on first use)."""
  return Runner(cfg, {stage.name: functools.partial(stage.step, model=model, cfg=cfg)
                      for stage in stages.registered()})


def initial_state(cfg: Config, model: Transformer, mngr, log) -> steps.TrainState:
  """Fresh, resumed from the workdir's latest checkpoint, or started from ``init_from``."""
  state = steps.init_state(cfg, model, jax.random.PRNGKey(cfg.train.seed))
  if mngr.latest_step() is not None:
    state, record = checkpoint.restore(mngr, state, log=log, set_aside=is_main_process())
    log(f"resumed from {mngr.directory} at step {int(state.step)}"
        + (f" (train.init_from={cfg.train.init_from} is for a run's start only: not read)"
           if cfg.train.init_from else ""))
  elif cfg.train.init_from:
    _warn_if_other_model(cfg, Path(cfg.train.init_from), log)
    params, record = checkpoint.load_params(cfg.train.init_from, state.params, log=log)
    state = steps.init_state(cfg, model, jax.random.PRNGKey(cfg.train.seed), params=params)
    weights = ("its EMA weights (train.ema_decay)" if record.get("weights") == "ema"
               else "its parameters")
    log(f"parameters from {cfg.train.init_from} (step {record.get('step', '?')}, {weights})")
  return state


# Model settings that change what the same parameters compute without changing their shapes
# (checked for train.init_from).
SAME_PARAMS_OTHER_MODEL = ("cmp_rope",)


def _warn_if_other_model(cfg: Config, source: Path, log) -> None:
  """``train.init_from``: one line when the source run computed its model otherwise (e.g. a run
  saved before ``model.cmp_rope`` existed reloads as ``query``); its parameters still load."""
  path = source / "config.yaml" if (source / "config.yaml").is_file() else \
      source.parent / "config.yaml"
  if not path.is_file():
    return
  try:
    saved = config.load(path, saved_run=True).model
  except config.ConfigError:
    return
  for key in SAME_PARAMS_OTHER_MODEL:
    if getattr(saved, key) != getattr(cfg.model, key):
      log(f"warning: train.init_from={source} was trained with model.{key}="
          f"{getattr(saved, key)!r}, this run uses {getattr(cfg.model, key)!r}")


# What a resumed run must share with the run that wrote its checkpoints: the model and the data
# (the batch at step s is a function of these, the seed and the batch size) and the EMA setting
# (it decides what the checkpointed state holds). Execution choices (parallel layout, remat, NSA
# implementation, compute dtype), stage lengths, optimiser and EAVI settings, checkpointing and
# evaluation may change between invocations.
# The expert dispatch (moe_*) computes the same forward pass; a sparse one leaves out a part of
# the gate's gradient (DynMoE.impl), so switching it mid-run is allowed as a deliberate choice.
RESUME_MAY_CHANGE = {"model": {"remat", "nsa_impl", "compute_dtype", "moe_impl", "moe_capacity",
                               "moe_tile"},
                     "train": set(config.TrainConfig.__dataclass_fields__)
                     - {"seed", "batch_size", "ema_decay"}}
RESUME_FIXED_SECTIONS = ("model", "data", "train")


def _saved_config(path: Path) -> Config:
  try:
    return config.load(path, saved_run=True)
  except config.ConfigError as err:
    raise config.ConfigError(f"{path} (the checkpointed run's): {err}") from None


def _checkpointed_config(workdir: Path, mngr, log) -> Config | None:
  """The config of the run a resume continues: its config.yaml, or (that file lost, e.g. only
  ``checkpoints/`` was copied) the one saved in its latest checkpoint's record."""
  if (workdir / "config.yaml").is_file():
    return _saved_config(workdir / "config.yaml")
  for step in sorted(mngr.all_steps(), reverse=True):  # a damaged step's may not read
    record = checkpoint.read_record(mngr, step) or {}
    if isinstance(record.get("config"), dict):
      try:
        return config.from_saved_run(record["config"])
      except config.ConfigError as err:
        raise config.ConfigError(f"{mngr.directory} step {step} (the checkpointed run's "
                                 f"config): {err}") from None
  log(f"{workdir} has no config.yaml and no checkpoint there has a readable config: this "
      "resume cannot be checked against the run it continues")
  return None


def check_resume(saved: Config, cfg: Config) -> None:
  """Raises ConfigError naming the first setting that differs from the checkpointed run's."""
  old, new = config.to_dict(saved), config.to_dict(cfg)
  for section in RESUME_FIXED_SECTIONS:
    for key, value in new[section].items():
      if key in RESUME_MAY_CHANGE.get(section, ()) or old[section].get(key) == value:
        continue
      raise config.ConfigError(
          f"{section}.{key}={value!r} differs from the checkpointed run's "
          f"{old[section].get(key)!r}: resuming would splice two different runs; use a new "
          "--workdir (or train.init_from) or set it back")


@dataclasses.dataclass
class TrainResult:
  """What :func:`train` hands back."""
  step: int  # the run's step when this invocation stopped
  total: int  # the run's steps over all stages
  finished: bool  # step == total (train.run_steps may stop earlier)
  last: dict[str, Any]  # the last logged metrics record ({} if none was logged)
  state: steps.TrainState  # one unreplicated copy, on the host's devices
  model: Transformer
  stream: BatchStream
  info: dict[str, Any]  # the training data's protocol and counts


def train(cfg: Config, workdir: str | Path, *, log=print, ahead=None, locked: bool = False
          ) -> TrainResult:
  """Runs the configured stages; returns where it stopped, the state and the last metrics.

  ``ahead(params)``, when given, is called once, before the first step, when this invocation
  will finish the training: to start work for what follows it (e.g. compiling TTT's steps
  while training runs, :func:`onn_jax.ttt.compile_ahead`). It must not keep ``params``'
  arrays: the steps donate them.

  The workdir is checked writable and locked (:func:`hold_workdir`) for the run, unless
  ``locked``: the caller holds it (``train.main`` does, over its evaluation too); SIGINT,
  SIGTERM and SIGHUP checkpoint the current step and raise :class:`faults.Interrupted`.
  """
  workdir = Path(workdir)
  with (contextlib.nullcontext() if locked else hold_workdir(workdir, log)), \
      faults.SignalGuard(log) as guard:
    return _train(cfg, workdir, log=log, guard=guard, ahead=ahead)


def hold_workdir(workdir: str | Path, log=print):
  """The workdir checked writable (and its checkpoints, on a resume: Orbax would fail at its
  first save) and locked by process 0, as a context; nothing on the other processes."""
  workdir = Path(workdir)
  if not is_main_process():
    return contextlib.nullcontext()
  faults.check_writable_dir(workdir, "--workdir")
  if (workdir / "checkpoints").exists():
    faults.check_writable_dir(workdir / "checkpoints", "the checkpoint folder")
  return faults.WorkdirLock(workdir, log)


def _train(cfg: Config, workdir: Path, *, log, guard: faults.SignalGuard, ahead
           ) -> TrainResult:
  main = is_main_process()
  tblog.check_available(cfg)  # before any work: a missing optional dependency is one line
  mngr = checkpoint.manager(workdir / "checkpoints", cfg.checkpoint.keep,
                            cfg.checkpoint.async_save, cleanup=True)  # this run holds the lock
  if mngr.latest_step() is not None:
    try:
      saved = _checkpointed_config(workdir, mngr, log)
      if saved is not None:
        check_resume(saved, cfg)
    except config.ConfigError:
      mngr.close()
      raise
  if main:
    workdir.mkdir(parents=True, exist_ok=True)
    if mngr.latest_step() is None:
      _set_aside_previous_run(workdir, log)
    config.save(cfg, workdir / "config.yaml")
  metrics_out = MetricsWriter(workdir / "metrics.jsonl", main)

  tasks, info = build_training_tasks(cfg.data, log=log if main else (lambda *_: None))
  stream = BatchStream(tasks, cfg.data, cfg.train.batch_size, cfg.train.seed,
                       process_index=jax.process_index(), process_count=jax.process_count(),
                       pack_align=attention.pack_alignment(cfg.model),
                       answer_quantile=cfg.eavi.budget_quantile)
  if stream.num_tasks_empty:
    log(f"data: {stream.num_tasks_empty} training tasks give no sequence (no test output and "
        "fewer than 2 demonstrations) and are not trained on")
  if stream.num_too_long:
    log(f"data: {stream.num_too_long} training sequences are longer than the longest bucket "
        f"(data.buckets={list(cfg.data.buckets)}) even with one demonstration and are dropped; "
        f"{stream.num_tasks_too_long} tasks lost all of theirs: "
        f"{len(tasks) - stream.num_tasks_empty - stream.num_tasks_too_long} training tasks are "
        "left")
  model = Transformer(cfg.model)
  runner = make_runner(cfg, model)
  state = initial_state(cfg, model, mngr, log)
  if main:
    metrics_out.truncate_after(int(state.step))
  live = tblog.open_writer(cfg, workdir, main, after=int(state.step))
  platform, warning = platform_line(cfg)
  if warning:
    log(warning)
  log(f"Tiny-ONN: {count_params(state.params):,} parameters; {len(tasks)} training tasks; "
      f"attention {attention.describe(cfg.model)}; experts "
      f"{moe.describe(cfg.model.moe_impl, cfg.model.moe_capacity)}; on {platform}; parallel mode "
      f"{runner.mode} over {runner.num_devices} device(s)")
  state = runner.put_state(state)

  t = cfg.train
  total = stages.total_steps(cfg)
  step = int(host_value(runner.get_state(state).step))
  if step > total:
    log(f"the checkpoint's step {step} is past the {total} steps of train.pretrain_steps + "
        f"train.eavi_steps: nothing left to train; the step-{step} state stands")
  stop_at = min(total, step + t.run_steps) if t.run_steps else total
  record = {"protocol": info.get("protocol", {}), "config": config.to_dict(cfg)}
  last: dict[str, Any] = {}
  bar = output.progress(total, "train", enabled=main, initial=step)
  tick, tokens_since, real_since, steps_since, compiles_since = time.perf_counter(), 0, 0, 0, 0
  # The window's waits for the device, for batches, and its time queuing steps on the device.
  device_since, batch_waited, queue_since = 0.0, 0.0, 0.0
  late = None  # the last step: (its outputs, its stage, whether its record was written)
  reset_rng = jax.random.PRNGKey(cfg.train.seed + 1)
  reset = functools.partial(_reset_transform, cfg=cfg)  # one object: compiled once
  started: set[str] = set()  # stages this invocation has run a step of

  def save(at: int) -> None:
    checkpoint.save(mngr, at, runner.get_state(state), {"step": at, **record})

  def book(at: int, at_stage: str, at_out) -> tuple[float, dict]:
    """Writes step ``at``'s record (metrics.jsonl, TensorBoard, the bar's postfix), with the
    window's rates since the last record; returns (now, the record)."""
    at_out = jax.tree.map(host_value, at_out)
    now = time.perf_counter()
    last = {"step": at, "stage": at_stage, **at_out,
            "tokens_per_s": tokens_since / max(now - tick, 1e-9),  # padding included
            "real_tokens_per_s": real_since / max(now - tick, 1e-9),
            "step_s": (now - tick) / max(steps_since, 1),
            # Of which the loop waited for the step's end (the device's work), and for
            # its batch (building it on the host): the rest is the loop's own host work.
            "device_wait_s": device_since / max(steps_since, 1),
            "batch_wait_s": (batches.waited - batch_waited) / max(steps_since, 1),
            # And how long handing the batch and the step to the device took (it should
            # not wait; it does when the device's queue is full or held by someone else).
            "queue_s": queue_since / max(steps_since, 1),
            # Steps of the interval that compiled: a stage's first step in this
            # invocation, which compiles the steps of all its buckets.
            "compiled_steps": compiles_since,
            "skipped_total": int(runner.host(state.skipped)),
            **peak_memory()}
    metrics_out.write(last)
    live.write(last)
    bar.set_postfix(loss=f"{float(at_out['loss']):.3f}",
                    acc=f"{float(at_out['answer_acc']):.3f}", refresh=False)
    return now, last

  batches = Prefetch(functools.partial(batch_at, cfg, stream), stop_at)
  completed = False
  try:
    while step < stop_at:
      stage = stages.stage_at(cfg, step).name
      if stage not in started:  # compile its steps (or wait for them) before its first step
        compiles_since += 1
        if started and t.background_compile:
          _await_compile(runner, stage, bar)
        else:
          _compile_stage(cfg, stream, runner, state, stage, step, stop_at, bar)
        if not started and t.reset_every and (stop_at // t.reset_every) * t.reset_every > step:
          # The expert reset compiles now, not at its first step (where it would stall behind
          # a background compilation).
          runner.precompile_apply(reset, state, reset_rng, np.int32(step))
        if not started and t.background_compile:  # the later stages compile while it trains
          for later in invocation_stages(cfg, step, stop_at)[1:]:
            _compile_stage(cfg, stream, runner, state, later, step, stop_at, bar,
                           background=True)
        if not started and ahead is not None and stop_at == total:
          ahead(runner.get_state(state).params)
        started.add(stage)
      if not bar.disable and not bar.desc.startswith(stage):  # disabled: no description
        bar.set_description(stage, refresh=False)
      local_batch = batches.get(step)
      # Per process: its own rows, scaled by the process count (rows are drawn alike).
      tokens_since += local_batch["inputs"].size * jax.process_count()
      real_since += int(local_batch["valid"].sum()) * jax.process_count()
      steps_since += 1
      # A stop signal waits for the step and all that belongs to it (the reset of its step,
      # its records, its scheduled save), then checkpoints the whole state (SignalGuard.step).
      with guard.step():
        queuing = time.perf_counter()
        state, out = runner.run(stage, state, runner.put_batch(local_batch))
        queue_since += time.perf_counter() - queuing
        step += 1
        if t.reset_every and step % t.reset_every == 0:
          state, dead = runner.apply(reset, state, reset_rng, np.int32(step))
          waiting = time.perf_counter()
          dead = runner.host(dead)
          device_since += time.perf_counter() - waiting
          for layer, row in enumerate(dead):
            metrics_out.write({"event": "reset", "step": step, "layer": layer,
                               "experts": np.flatnonzero(row).tolist()})
        # Consecutive non-finite steps, read one step late while every step is finite, so that
        # the device runs this step while the host waits for the last one and then queues the
        # next; read at once at a step that logs or saves, before a stage's first step (which
        # may wait for its compile) and after a non-finite one. Every non-finite step is logged.
        due = (step % t.log_every == 0 or step == stop_at or step % cfg.checkpoint.every == 0
               or stages.stage_at(cfg, step).name not in started)  # (step < stop_at here)
        waiting = time.perf_counter()
        earlier = 0 if late is None else int(host_value(late[0]["nonfinite"]))  # the last step's
        nonfinite = int(host_value(out["nonfinite"])) if due or earlier or late is None else 0
        device_since += time.perf_counter() - waiting
        logging = []  # (step, stage, out) of the records to write
        if earlier and not late[2]:  # the last step was non-finite, and its record not written
          logging.append((step - 1, late[1], late[0]))
        if due or nonfinite:
          logging.append((step, stage, out))
        for at, at_stage, at_out in logging:
          now, last = book(at, at_stage, at_out)
        if logging:
          tick, tokens_since, real_since, steps_since, compiles_since = now, 0, 0, 0, 0
          device_since, batch_waited, queue_since = 0.0, batches.waited, 0.0
        late = (out, stage, bool(due or nonfinite))
        bar.update(1)
        if max(nonfinite, earlier) >= t.max_nonfinite:
          at, count = (step - 1, earlier) if earlier >= t.max_nonfinite else (step, nonfinite)
          raise TrainingStopped(
              f"train.max_nonfinite: {count} non-finite steps in a row at step {at}; "
              f"the last good checkpoint in {mngr.directory} is kept")
        if step % cfg.checkpoint.every == 0 or step == stop_at:
          with guard.saving():  # a stop signal waits for the save, then stops the run
            save(step)
    completed = True
  except KeyboardInterrupt as err:
    name = getattr(err, "name", "SIGINT")
    bar.close()  # its line ends before the interruption's own
    with guard.saving(hold=True):  # a second signal cannot cut the step read or the save short
      try:
        at = int(runner.host(state.step))
      except RuntimeError:  # interrupted inside a step that had already taken (donated) it
        at = None
      if at is not None and late is not None and not late[2] and int(
          host_value(late[0]["nonfinite"])):  # the last step, non-finite, not read yet
        book(step, late[1], late[0])
      if at is not None and int(runner.host(state.nonfinite)) >= t.max_nonfinite:
        at = None  # stopped at a run of non-finite steps not read yet: not a state to resume
      if at is None:
        log(f"interrupted ({name}) mid-step: the latest checkpoint in {mngr.directory} stands")
      else:
        if at not in mngr.all_steps():
          save(at)
        checkpoint.wait_until_saved(mngr)
        log(f"interrupted ({name}): checkpoint at step {at} in {mngr.directory}; run the same "
            "command again to resume")
    err.reported = True
    raise
  finally:
    try:  # a stop signal here waits for the last save to be written, then stops the run
      with guard.saving(hold=not completed):  # (an interruption is on its way out already)
        running = [] if completed else cancel_background()  # the queued ones are not needed
        if running:  # XLA cannot stop a compilation
          log(f"waiting for the background compilation of {', '.join(running)} to end before "
              "exiting")
        batches.close()
        bar.close()
        live.close()
        checkpoint.wait_until_saved(mngr)
    except KeyboardInterrupt as err:
      last = "the training's last step" if step >= total else "this run's last step"
      err.when = (f"after {last}, checkpointed at step {step} in {mngr.directory}: run the "
                  "same command again to go on")
      raise
  mngr.close()
  final = runner.get_state(state)
  return TrainResult(step=step, total=total, finished=step >= total, last=last, state=final,
                     model=model, stream=stream, info=info)


def batch_at(cfg: Config, stream: BatchStream, step: int) -> dict:
  """This process's batch of the run's step ``step``: packed rows when ``data.pack`` is on and
  the step's stage takes them, else one sequence per row (from one answer-length group when the
  stage groups answers, as EAVI does with ``eavi.answer_groups``)."""
  stage = stages.stage_at(cfg, step)
  if cfg.data.pack and stage.packs:
    return stream.packed_batch(step)
  return stream.batch(step, answer_groups=stage.answer_groups(cfg))


class Prefetch:
  """``get(step)`` returns ``make(step)`` and starts ``make(step + 1)`` (below ``stop``) on a
  worker thread, so that building the next batch on the host overlaps the device's step.
  Batches depend only on the step, so prefetching changes nothing but the time."""

  def __init__(self, make, stop: int):
    self._make, self._stop = make, stop
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    self._next: tuple[int, concurrent.futures.Future] | None = None
    self.waited = 0.0  # seconds get() waited for batches, in all

  def get(self, step: int) -> dict:
    tick = time.perf_counter()
    if self._next is not None and self._next[0] == step:
      batch = self._next[1].result()
    else:
      batch = self._make(step)
    self.waited += time.perf_counter() - tick
    self._next = None
    if step + 1 < self._stop:
      self._next = (step + 1, self._pool.submit(self._make, step + 1))
    return batch

  def close(self) -> None:
    self._pool.shutdown(wait=False, cancel_futures=True)


def stage_lengths(cfg: Config, stream: BatchStream, stage: str, start: int, stop: int
                  ) -> dict[int, int]:
  """{row length: the first step that has it} over the steps ``start..stop-1`` that ``stage``
  takes: the batch shapes that stage will run in this invocation (lengths drawn as
  :func:`batch_at` draws them, without building the batches)."""
  kind = next(s for s in stages.registered() if s.name == stage)
  packed = cfg.data.pack and kind.packs
  groups = kind.answer_groups(cfg)
  possible = int(np.count_nonzero(stream.kind_probs if packed else stream.bucket_probs))
  found: dict[int, int] = {}
  for step in range(start, stop):
    if len(found) == possible:
      break
    if stages.stage_at(cfg, step).name == stage:
      found.setdefault(stream.length_at(step, packed, groups), step)
  return found


def invocation_stages(cfg: Config, start: int, stop: int) -> list[str]:
  """The stages that steps ``start..stop-1`` take, in the order of their first steps."""
  names: list[str] = []
  for step in range(start, stop):
    name = stages.stage_at(cfg, step).name
    if name not in names:
      names.append(name)
      if len(names) == len(stages.registered()):
        break
  return names


def _compile_stage(cfg: Config, stream: BatchStream, runner: Runner, state, stage: str,
                   start: int, stop: int, bar, *, background: bool = False) -> None:
  """The steps of ``stage`` for every batch shape it will run in this invocation, compiled at
  once (in threads): before its first step, or with ``background`` on a worker thread while
  an earlier stage trains (see :func:`_await_compile`). One after another, at each shape's
  first step, they took minutes on a GPU (EAVI's five buckets: about 7 minutes of an arc1
  run; at once, 3.9). The bar says so (processes other than 0 run a disabled bar and say
  nothing)."""
  lengths = stage_lengths(cfg, stream, stage, start, stop)
  if not bar.disable:
    bar.write(f"compiling {stage} steps (buckets {', '.join(map(str, sorted(lengths)))})"
              + " in the background" * background)
  tick = time.perf_counter()
  runner.precompile(stage, state, [batch_at(cfg, stream, s) for s in lengths.values()],
                    background=background)
  if not bar.disable and not background:
    bar.write(f"compiled {stage} steps in {time.perf_counter() - tick:.1f} s")


def _await_compile(runner: Runner, stage: str, bar) -> None:
  """At a stage's first step: its steps compiled in the background, waited for if need be."""
  times = runner.wait_compiled(stage)
  if times is not None and not bar.disable:
    bar.write(f"compiled {stage} steps in the background in {times[0]:.1f} s (waited "
              f"{times[1]:.1f} s)")


def _reset_transform(state: steps.TrainState, rng, step, *, cfg: Config):
  """Expert reset on the whole train state, with ``rng`` folded with ``step``; the window
  counts start again from zero."""
  rng = jax.random.fold_in(rng, step)
  params, opt_state, ema, dead = experts.reset_dead_experts(
      state.params, state.opt_state, state.routing["window_tokens"], rng, cfg.model,
      ema=state.ema)
  window = {"window_tokens": jax.numpy.zeros_like(state.routing["window_tokens"])}
  return state.replace(params=params, opt_state=opt_state, ema=ema, routing=window), dead
