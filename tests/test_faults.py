"""Faults: preemption signals, damaged checkpoints, shared workdirs, device changes, impossible
numbers, unwritable outputs, data that leaves nothing to train on."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import glob
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onn_jax import app, checkpoint, config, faults, parallel, run, steps
from onn_jax.data.pipeline import BatchStream, build_training_tasks
from onn_jax.data.tasks import DataError, load_tasks
from onn_jax.model.transformer import Transformer

from conftest import (fast_compile_flags, release, suite_xla_flags, tiny_config, with_flags,
                      xla_flags_with_devices)

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(train=dict(pretrain_steps=4, batch_size=4, log_every=1),
             data=dict(buckets=[128], max_train_tasks=20, eval=""),
             checkpoint=dict(every=2, async_save=False))


@pytest.fixture(autouse=True)
def default_signal_handlers():
  """Python's own handlers for the stop signals during each test: a suite started with some
  of them ignored (`nohup`'s SIGHUP, SIGINT in a script's background job) would otherwise
  test the guard that leaves ignored signals ignored, not the one that stops a run."""
  defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
  if hasattr(signal, "SIGHUP"):
    defaults[signal.SIGHUP] = signal.SIG_DFL
  before = {signum: signal.signal(signum, handler) for signum, handler in defaults.items()}
  yield
  for signum, handler in before.items():
    signal.signal(signum, handler)


def _said(err: str) -> list[str]:
  """stderr's lines without the progress bar's (tqdm writes it there too)."""
  return [line for line in err.splitlines()
          if line.strip() and not line.startswith(("train:", "pretrain:"))]


def _one_line(text: str) -> str:
  lines = [line for line in text.strip().splitlines() if line.strip()]
  assert len(lines) == 1, lines
  return lines[0]


# -- preemption signals --------------------------------------------------------------------------

def test_preemption_signal_checkpoints_the_current_step(tmp_path):
  """A real signal to a real ``python -m train.main``: checkpoint at the step it reached, one
  line, exit 128 + signal, no temporary folder (nor an earlier kill's) and no lock left."""
  cfg = tiny_config(**{**SMALL, "train": {**SMALL["train"], "pretrain_steps": 10_000},
                       "checkpoint": {"every": 10_000, "async_save": True}})
  cfg_path = tmp_path / "cfg.yaml"
  config.save(cfg, cfg_path)
  workdir = tmp_path / "w"
  # What a save cut short by SIGKILL leaves behind: the run removes it.
  (workdir / "checkpoints" / "7.orbax-checkpoint-tmp-99" / "state").mkdir(parents=True)
  # Output to files, not pipes: nothing reads a pipe until the end, and a child that writes
  # more than a pipe holds (64 KiB) blocks in its write. jax 0.10.0 on an AMD CPU logs ~3 KB to
  # stderr for every program it loads from the compilation cache (XLA:CPU's AOT loader
  # comparing feature lists), which stalled the run before its first step until the deadline.
  out_path, err_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
  with out_path.open("w") as out_file, err_path.open("w") as err_file:
    proc = subprocess.Popen([sys.executable, "-m", "train.main", "--config", str(cfg_path),
                             "--workdir", str(workdir)], cwd=ROOT, stdout=out_file,
                            stderr=err_file, text=True)
  metrics = workdir / "metrics.jsonl"
  reached = lambda: metrics.exists() and metrics.read_text().count("\n") >= 2  # two steps
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None and not reached():
    time.sleep(0.2)
  if not reached():  # ended, or still starting: a signal now would not test a step
    proc.kill()
    proc.wait()
    pytest.fail(f"the run did not reach step 2 (exit {proc.returncode}): "
                f"{err_path.read_text()[-2000:]}")
  sig = signal.SIGTERM  # SIGHUP takes the same path (test_a_signal_during_a_scheduled_save...)
  proc.send_signal(sig)
  try:
    proc.wait(timeout=120)
  finally:
    if proc.poll() is None:  # never left running (it would train 10000 steps)
      proc.kill()
      proc.wait()
  out, err = out_path.read_text(), err_path.read_text()
  assert proc.returncode == 128 + sig, err[-2000:]
  name = signal.Signals(sig).name
  line = [s for s in out.splitlines() if s.startswith("interrupted")]
  assert len(line) == 1 and f"({name}): checkpoint at step" in line[0], out[-2000:]
  at = int(line[0].split("checkpoint at step ")[1].split()[0])
  assert at >= 2 and "Traceback" not in err
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [str(at)]
  assert not (workdir / faults.WorkdirLock.NAME).exists()
  mngr = checkpoint.manager(workdir / "checkpoints")  # whole: it restores
  target = steps.init_state(cfg, Transformer(cfg.model), jax.random.PRNGKey(0))
  assert int(checkpoint.restore(mngr, target)[0].step) == at
  mngr.close()


def test_a_signal_during_a_step_waits_for_the_new_state():
  """Preemption lands at any moment, mostly inside a step (which donates the old state): the
  signal waits until the step has handed back its state, silently, then stops the run."""
  lines = []
  state = "old"
  with faults.SignalGuard(log=lines.append) as guard:
    with pytest.raises(faults.Interrupted):
      with guard.step():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler has run by now (main thread, between bytecodes)
        state = "new"
  assert state == "new" and lines == []


def test_a_resume_without_config_yaml_is_checked_against_the_checkpoints_config(tmp_path,
                                                                                   capsys):
  """Only checkpoints/ copied (config.yaml lost): the resume is checked against the config
  saved in the latest checkpoint's record, as against config.yaml (it spliced two runs without
  a word before); train.init_from given to a resume is said not to be read."""
  cfg = tiny_config(**SMALL)
  assert app.train_and_evaluate(cfg, tmp_path) == 0  # steps 2 and 4 saved
  (tmp_path / "config.yaml").unlink()
  DAMAGE["deleted record"](tmp_path / "checkpoints" / "4")  # checked against step 2's then
  capsys.readouterr()
  assert app.train_and_evaluate(config.replace(cfg, train={"seed": 5}), tmp_path) == 1
  assert _one_line(capsys.readouterr().err).startswith(
      "error: train.seed=5 differs from the checkpointed run's 0")
  assert not (tmp_path / "config.yaml").exists()
  assert app.train_and_evaluate(config.replace(cfg, train={"init_from": str(tmp_path)}),
                                tmp_path) == 0
  assert (f"resumed from {tmp_path / 'checkpoints'} at step 2 (train.init_from={tmp_path} is "
          "for a run's start only: not read)") in capsys.readouterr().out


def test_a_signal_inside_the_step_before_an_expert_reset_resumes_exactly(tmp_path, monkeypatch,
                                                                         capsys):
  """A signal landing inside the step that ends on a reset step (step 4 of
  train.reset_every=2) waits for that reset and the step's records as well: the checkpoint
  holds the reset state, and the resumed run ends bit-identical to an uninterrupted one. The
  interrupt came before the reset, and the resumed run (at step 4) never did it, before."""
  cfg = tiny_config(**{**SMALL, "train": {**SMALL["train"], "reset_every": 2,
                                          "pretrain_steps": 6},
                       "model": {"num_experts": 16, "init_threshold": 0.9},  # experts die
                       "checkpoint": {"every": 100, "async_save": False}})
  assert app.train_and_evaluate(cfg, tmp_path / "whole") == 0
  records = lambda workdir: [json.loads(line) for line in
                             (workdir / "metrics.jsonl").read_text().splitlines()]
  resets = [r for r in records(tmp_path / "whole") if r.get("event") == "reset"]
  assert any(r["experts"] for r in resets if r["step"] == 4)  # the reset changes the state
  real_run, calls = parallel.Runner.run, []

  def run_step(self, *args, **kwargs):
    out = real_run(self, *args, **kwargs)
    calls.append(1)
    if len(calls) == 4:  # the step that makes step 4 has handed back its state
      os.kill(os.getpid(), signal.SIGTERM)
    return out

  monkeypatch.setattr(parallel.Runner, "run", run_step)
  assert app.train_and_evaluate(cfg, tmp_path / "cut") == 128 + signal.SIGTERM
  assert "interrupted (SIGTERM): checkpoint at step 4" in capsys.readouterr().out
  monkeypatch.setattr(parallel.Runner, "run", real_run)
  assert app.train_and_evaluate(cfg, tmp_path / "cut") == 0
  target = steps.init_state(cfg, Transformer(cfg.model), jax.random.PRNGKey(0))
  final = []
  for name in ("whole", "cut"):
    mngr = checkpoint.manager(tmp_path / name / "checkpoints")
    final.append(checkpoint.restore(mngr, target)[0])
    mngr.close()
  assert int(final[1].step) == 6
  for a, b in zip(jax.tree.leaves(final[0]), jax.tree.leaves(final[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  drop_timing = lambda rs: [{k: v for k, v in r.items() if k in ("step", "event", "layer",
                                                                 "experts", "loss")}
                            for r in rs]
  assert drop_timing(records(tmp_path / "cut")) == drop_timing(records(tmp_path / "whole"))


def test_signals_ignored_by_whoever_started_the_run_stay_ignored(monkeypatch):
  """``nohup`` starts a run with SIGHUP ignored (and a shell script's ``&`` job with SIGINT
  ignored): logging out must not stop it, as it stopped at its next step before."""
  previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
  try:
    with faults.SignalGuard(lambda line: None):
      assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
      assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # the guard's handler
      os.kill(os.getpid(), signal.SIGHUP)
      time.sleep(0.05)  # nothing is raised
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
  finally:
    signal.signal(signal.SIGHUP, previous)


def test_a_second_signal_during_the_save_is_held_back(tmp_path, monkeypatch, capsys):
  """SIGTERM at step 3, then SIGINT and SIGTERM (real signals to this process) while that
  checkpoint is written: the save completes, each extra signal is one line."""
  cfg = tiny_config(**SMALL)
  # The main thread asks for step 3's batch right before running step 3 (batches themselves
  # are built ahead on a worker thread, so a signal sent from there would come a step early).
  real_get, real_save = run.Prefetch.get, checkpoint.save

  def get(self, step):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return real_get(self, step)

  def save(mngr, step, state, record):
    if step == 3:
      os.kill(os.getpid(), signal.SIGINT)
      os.kill(os.getpid(), signal.SIGTERM)
    real_save(mngr, step, state, record)

  monkeypatch.setattr(run.Prefetch, "get", get)
  monkeypatch.setattr(checkpoint, "save", save)
  assert app.train_and_evaluate(cfg, tmp_path) == 128 + signal.SIGTERM
  out = capsys.readouterr().out
  assert "SIGINT during the checkpoint save: the save finishes first" in out
  assert "SIGTERM during the checkpoint save: the save finishes first" in out
  assert "interrupted (SIGTERM): checkpoint at step 3" in out
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "3"]
  mngr = checkpoint.manager(tmp_path / "checkpoints")
  target = steps.init_state(cfg, Transformer(cfg.model), jax.random.PRNGKey(0))
  state, record = checkpoint.restore(mngr, target)
  mngr.close()
  assert int(state.step) == 3 and record["step"] == 3
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers given back


def test_a_signal_during_a_scheduled_save_stops_after_it():
  lines = []
  with faults.SignalGuard(lines.append) as guard:
    with pytest.raises(faults.Interrupted) as info:
      with guard.saving():
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.01)
        lines.append("saved")
  assert info.value.exit_code == 128 + signal.SIGHUP
  assert lines == ["SIGHUP during the checkpoint save: the save finishes first", "saved"]


# -- damaged checkpoints -------------------------------------------------------------------------

def _biggest_array_file(step_dir: Path) -> Path:
  return max((Path(p) for p in glob.glob(str(step_dir / "state" / "**" / "d" / "*"),
                                         recursive=True)), key=lambda p: p.stat().st_size)


def _truncate(path: Path) -> None:
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


def _flip(path: Path) -> None:
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x10
  path.write_bytes(bytes(data))


def _cut(path: Path, size: int = 100) -> None:
  path.write_bytes(path.read_bytes()[:size])


def _other_digest(step_dir: Path) -> None:
  """Arrays that read back but differ from what was saved, made deterministic: a flipped bit
  in the (zstd-compressed) array files is caught either by the decompression or, when it lands
  in the data, by the digest, depending on how Orbax grouped the arrays into files in that
  save; changing the digest written beside them always reaches the digest's check."""
  path = step_dir / "record" / "metadata"
  record = json.loads(path.read_text())
  record["digest"] = f"{(int(record['digest'], 16) ^ 1):08x}"
  path.write_text(json.dumps(record))


DAMAGE = {
    "truncated array": lambda d: _truncate(_biggest_array_file(d)),
    "array cut to 100 bytes": lambda d: _cut(_biggest_array_file(d)),
    "bit-flipped array": lambda d: _flip(_biggest_array_file(d)),
    "arrays unlike their digest": _other_digest,
    "truncated _METADATA": lambda d: _truncate(d / "state" / "_METADATA"),
    "deleted record": lambda d: shutil.rmtree(d / "record"),
}


@pytest.fixture(scope="module")
def saved_states(tmp_path_factory):
  """Checkpoints at steps 2 and 4 of two different states (no training: fast)."""
  cfg = tiny_config()
  model = Transformer(cfg.model)
  states = {s: steps.init_state(cfg, model, jax.random.PRNGKey(s)).replace(step=jnp.int32(s))
            for s in (2, 4)}
  source = tmp_path_factory.mktemp("ckpt")
  mngr = checkpoint.manager(source, async_save=False)
  for s, state in states.items():
    checkpoint.save(mngr, s, state, {"step": s})
  mngr.close()
  return cfg, states, source


def test_a_relative_checkpoint_path_loads(saved_states, tmp_path, monkeypatch):
  """``train.init_from=runs/x`` and ``--checkpoint runs/x`` are relative to the working folder
  (Orbax reads metadata from absolute paths only)."""
  cfg, states, source = saved_states
  shutil.copytree(source, tmp_path / "run" / "checkpoints")
  monkeypatch.chdir(tmp_path)
  params, record = checkpoint.load_params("run", states[4].params)
  assert record["step"] == 4


@pytest.fixture
def collect_damaged_reads():
  """For a test that reads a damaged array: Orbax's reader leaves un-awaited coroutines whose
  errors surface when they are garbage-collected, expected there. Collected as the test ends,
  under its filter (``IGNORE_DAMAGED_READS``), rather than in whichever test runs later."""
  yield
  gc.collect()


IGNORE_DAMAGED_READS = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.mark.parametrize("damage", list(DAMAGE))
@IGNORE_DAMAGED_READS
@pytest.mark.usefixtures("collect_damaged_reads")
def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact(saved_states, tmp_path,
                                                                   damage, capsys):
  cfg, states, source = saved_states
  directory = tmp_path / "checkpoints"
  shutil.copytree(source, directory)
  DAMAGE[damage](directory / "4")
  # Evaluation / init_from: parameters of step 2, one warning line, nothing moved.
  params, record = checkpoint.load_params(directory, states[2].params)
  assert record["step"] == 2
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(states[2].params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  line = _one_line(capsys.readouterr().err)
  assert f"{directory} step 4 is damaged" in line and "using step 2" in line
  # Resume: the whole state of step 2; the damaged step is moved aside (it is written again).
  logged = []
  mngr = checkpoint.manager(directory, async_save=False)
  state, record = checkpoint.restore(mngr, states[4], log=logged.append, set_aside=True)
  assert int(state.step) == 2 and record == {"step": 2} and mngr.all_steps() == [2]
  mngr.close()
  assert len(logged) == 1 and "using step 2" in logged[0] and "damaged" in logged[0]
  assert (tmp_path / "checkpoints.damaged" / "4").is_dir()


def test_a_step_removed_while_it_is_read_is_not_called_damaged(saved_states, tmp_path,
                                                                  monkeypatch, capsys):
  """train.evaluate beside a run still training, which removes its older steps as it saves
  (checkpoint.keep): a step gone while it was read is not damage; the steps are listed again
  and the newest there is read, without a warning (it failed with "no intact checkpoint" or a
  traceback before)."""
  cfg, states, source = saved_states
  directory = tmp_path / "checkpoints"
  shutil.copytree(source, directory)
  real, reads = checkpoint._restore_step, []

  def rotated(mngr, step, abstract):
    reads.append(step)
    if step == 4 and reads.count(4) == 1:  # the run removes step 4 while it is read
      shutil.rmtree(directory / "4")
      raise checkpoint._Damaged("it cannot be read: [Errno 2] No such file or directory")
    return real(mngr, step, abstract)

  monkeypatch.setattr(checkpoint, "_restore_step", rotated)
  params, record = checkpoint.load_params(directory, states[2].params)
  assert record["step"] == 2 and reads == [4, 2]
  assert capsys.readouterr().err == ""
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(states[2].params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_same_step_damaged_again_is_set_aside_beside_the_first(saved_states, tmp_path):
  """A rerun writes step 4 again, and it is damaged again: both copies are kept, one line."""
  cfg, states, source = saved_states
  directory = tmp_path / "checkpoints"
  shutil.copytree(source, directory)
  for _ in range(3):
    shutil.rmtree(directory / "4", ignore_errors=True)
    shutil.copytree(source / "4", directory / "4")
    DAMAGE["truncated _METADATA"](directory / "4")
    mngr = checkpoint.manager(directory, async_save=False)
    state, _ = checkpoint.restore(mngr, states[4], log=lambda _: None, set_aside=True)
    mngr.close()
    assert int(state.step) == 2
  aside = sorted(p.name for p in (tmp_path / "checkpoints.damaged").iterdir())
  assert aside == ["4", "4.1", "4.2"]


@IGNORE_DAMAGED_READS
@pytest.mark.usefixtures("collect_damaged_reads")
def test_no_intact_checkpoint_is_one_line_naming_the_folder(saved_states, tmp_path):
  cfg, states, source = saved_states
  directory = tmp_path / "checkpoints"
  shutil.copytree(source, directory)
  DAMAGE["truncated array"](directory / "4")
  DAMAGE["deleted record"](directory / "2")
  with pytest.raises(checkpoint.CheckpointError) as info:
    checkpoint.load_params(directory, states[2].params)
  message = str(info.value)
  assert "\n" not in message and message.startswith(f"{directory}: no intact checkpoint")
  assert "step 4" in message and "2 damaged too" in message


def test_a_damaged_checkpoint_of_another_model_still_does_not_fit(saved_states, tmp_path):
  """Damage is skipped, a misfit is not: the intact older step of another model is an error."""
  cfg, states, source = saved_states
  directory = tmp_path / "checkpoints"
  shutil.copytree(source, directory)
  DAMAGE["truncated _METADATA"](directory / "4")  # its tree cannot be read: damaged
  bigger = config.replace(cfg, model={"num_experts": 6})
  target = steps.init_state(bigger, Transformer(bigger.model), jax.random.PRNGKey(0))
  mngr = checkpoint.manager(directory, async_save=False)
  with pytest.raises(checkpoint.CheckpointError, match="step 2: the saved state does not fit"):
    checkpoint.restore(mngr, target)
  mngr.close()


@IGNORE_DAMAGED_READS
@pytest.mark.usefixtures("collect_damaged_reads")
def test_evaluate_program_falls_back_with_one_warning(saved_states, tmp_path, capsys):
  cfg, _, source = saved_states
  run_dir = tmp_path / "run"
  shutil.copytree(source, run_dir / "checkpoints")
  config.save(cfg, run_dir / "config.yaml")
  DAMAGE["arrays unlike their digest"](run_dir / "checkpoints" / "4")
  from train import evaluate
  assert evaluate.main(["--checkpoint", str(run_dir), "eval.max_tasks=1"]) == 0
  err = capsys.readouterr().err
  warnings = [line for line in err.splitlines() if line.startswith("warning:")]
  assert len(warnings) == 1 and "Traceback" not in err
  assert "step 4 is damaged (its arrays do not match" in warnings[0]
  assert json.loads((run_dir / "eval" / "scores.json").read_text())["step"] == 2


def test_a_damaged_array_is_one_line_in_a_fresh_process(saved_states, tmp_path):
  """Orbax's other reads of a damaged step, pending when its first bad read ends the restore,
  fail later from other threads (callbacks on the closed event loop, coroutines and tasks
  collected with their errors unread): Python printed each, ~9,500 lines in all around the
  one-line warning. Now stderr holds that line alone, in a process of its own (no pytest
  hooks), its garbage collected before it exits."""
  cfg, states, source = saved_states
  directory = tmp_path / "checkpoints"
  shutil.copytree(source, directory)
  DAMAGE["array cut to 100 bytes"](directory / "4")
  np.save(tmp_path / "embedding.npy", np.asarray(states[2].params["embedding"]))
  code = f"""
import gc, sys, time; sys.path.insert(0, {str(ROOT / 'tests')!r})
import jax, numpy as np
from conftest import tiny_config
from onn_jax import checkpoint
from onn_jax.model.transformer import init_params
for _ in range(3):
  params, record = checkpoint.load_params({str(directory)!r}, init_params(
      tiny_config().model, jax.random.PRNGKey(0)))
  np.testing.assert_array_equal(params["embedding"], np.load({str(tmp_path / 'embedding.npy')!r}))
  time.sleep(0.2)
  gc.collect()
print("step", record["step"])
"""
  env = {**os.environ, "XLA_FLAGS": xla_flags_with_devices(1)}
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0 and "step 2" in proc.stdout, proc.stderr[-3000:]
  # XLA's own log lines aside (jax 0.10.0 logs two for each program read from the cache)
  lines = [x for x in proc.stderr.strip().splitlines()
           if not re.match(r"[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ ", x)]
  assert len(lines) == 3 and all(f"{directory} step 4 is damaged" in x for x in lines), (
      f"{len(lines)} lines: " + proc.stderr[:2000])


def test_only_the_abandoned_reads_errors_are_dropped(monkeypatch):
  """The hook and the log filter drop the abandoned reads' errors alone: the same error with
  an object, another coroutine's, another task's log record reach the hook and the log."""
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  checkpoint._quiet_abandoned_reads()
  assert sys.unraisablehook is checkpoint._drop_abandoned_reads
  loop = asyncio.new_event_loop()
  loop.close()
  with pytest.raises(RuntimeError, match="Event loop is closed") as closed:
    loop.call_soon_threadsafe(print)

  def unraisable(obj, err):
    return types.SimpleNamespace(exc_type=type(err), exc_value=err, err_msg=None, object=obj,
                                 exc_traceback=err.__traceback__)

  async def other_coroutine():
    pass

  mine = other_coroutine()
  kept = [unraisable(loop, closed.value), unraisable(mine, ValueError("not a read")),
          unraisable(None, RuntimeError("Event loop is closed"))]
  for u in [unraisable(None, closed.value)] + kept:
    sys.unraisablehook(u)
  mine.close()
  assert seen == kept
  record = logging.LogRecord("asyncio", logging.ERROR, __file__, 1,
                             "Task exception was never retrieved\nfuture: <Task mine>", None, None)
  assert checkpoint._not_an_abandoned_task(record)
  record.msg = "Future exception was never retrieved\nfuture: <Future ValueError('OUT_OF_RANGE: " \
               "Error reading \"a/0.0\" in OCDBT database at local file')>"
  assert not checkpoint._not_an_abandoned_task(record)


# -- a checkpoint on any device count ------------------------------------------------------------

def test_checkpoint_of_two_devices_loads_on_one(saved_states, tmp_path):
  cfg, states, _ = saved_states
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  mngr = checkpoint.manager(tmp_path / "checkpoints", async_save=False)
  checkpoint.save(mngr, 4, jax.device_put(states[4], replicated), {"step": 4})
  mngr.close()
  np.save(tmp_path / "embedding.npy", np.asarray(states[4].params["embedding"]))
  code = f"""
import sys; sys.path.insert(0, {str(ROOT / 'tests')!r})
import jax, numpy as np
from conftest import tiny_config
from onn_jax import checkpoint
from onn_jax.model.transformer import init_params
assert jax.device_count() == 1
params, record = checkpoint.load_params({str(tmp_path)!r}, init_params(tiny_config().model,
                                        jax.random.PRNGKey(0)))
np.testing.assert_array_equal(params["embedding"], np.load({str(tmp_path / 'embedding.npy')!r}))
print("step", record["step"])
"""
  env = {**os.environ, "XLA_FLAGS": xla_flags_with_devices(1)}
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0 and "step 4" in proc.stdout, proc.stderr[-3000:]


# -- one run per workdir -------------------------------------------------------------------------

def test_a_locked_workdir_stops_a_second_run_with_one_line(tmp_path, capsys):
  other = subprocess.Popen(["sleep", "60"])
  try:
    lock = faults.WorkdirLock(tmp_path)
    lock.owner["pid"] = other.pid
    lock.acquire()
    assert app.train_and_evaluate(tiny_config(**SMALL), tmp_path) == 1
    line = _one_line(capsys.readouterr().err)
    assert f"pid {other.pid}" in line and "in use by another run" in line
    assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "checkpoints").exists()
  finally:
    other.kill()
    other.wait()


def test_the_lock_covers_the_evaluation_and_a_signal_there_is_one_line(tmp_path, monkeypatch,
                                                                        capsys):
  """train.main holds the workdir's lock until its evaluation is written (a second run
  started beside the evaluation before, and both wrote eval/); a stop signal during the
  evaluation, of train.main or train.evaluate, is one line and 128 + the signal (a traceback,
  or for SIGTERM no word at all, before)."""
  cfg = tiny_config(**{**SMALL, "data": {**SMALL["data"], "eval": "arc-agi-1:evaluation"},
                       "eval": {"max_tasks": 1}})
  seen = []

  def evaluate(*args, **kwargs):
    seen.append((tmp_path / faults.WorkdirLock.NAME).exists())
    if len(seen) == 1:  # train.main's (train.evaluate takes no lock)
      with pytest.raises(faults.OutputError, match="in use by another run"):
        run.hold_workdir(tmp_path).acquire()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    raise AssertionError("the signal did not stop the evaluation")

  monkeypatch.setattr(app, "evaluate_params", evaluate)
  assert app.train_and_evaluate(cfg, tmp_path) == 128 + signal.SIGTERM
  assert seen == [True] and not (tmp_path / faults.WorkdirLock.NAME).exists()
  said = _said(capsys.readouterr().err)
  assert said == ["interrupted (SIGTERM) during the evaluation; training is done and "
                  "checkpointed at step 4: run the same command again to evaluate"]
  from train import evaluate as evaluate_program
  assert evaluate_program.main(["--checkpoint", str(tmp_path), "--out",
                                str(tmp_path / "e")]) == 128 + signal.SIGTERM
  assert _one_line(capsys.readouterr().err) == (
      f"interrupted (SIGTERM) during train.evaluate: run it again for its files in "
      f"{tmp_path / 'e'}")
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
  # Between the training and the evaluation (here: drawing the curves), it says so too.
  monkeypatch.setattr(app.plots, "plot_training",
                      lambda *args: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(0.05)))
  assert app.train_and_evaluate(cfg, tmp_path) == 128 + signal.SIGTERM
  said = _said(capsys.readouterr().err)
  assert said == ["interrupted (SIGTERM) after training, checkpointed at step 4: run the same "
                  "command again to go on"]


def test_a_signal_in_the_cleanup_names_the_slice_or_the_training(tmp_path, monkeypatch,
                                                                  capsys):
  """A stop signal while a run closes (waiting for its last save) is one line naming where it
  stands: after a ``train.run_steps`` slice its last step is this run's, not the training's."""
  from onn_jax import checkpoint
  real = checkpoint.wait_until_saved

  def wait(mngr):
    real(mngr)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)

  monkeypatch.setattr(checkpoint, "wait_until_saved", wait)
  for steps, last in ((2, "this run's last step"), (0, "the training's last step")):
    cfg = tiny_config(**{**SMALL, "train": {**SMALL["train"], "run_steps": steps}})
    assert app.train_and_evaluate(cfg, tmp_path) == 128 + signal.SIGTERM
    at = 2 if steps else 4
    assert _said(capsys.readouterr().err)[-1] == (
        f"interrupted (SIGTERM) after {last}, checkpointed at step {at} in "
        f"{tmp_path / 'checkpoints'}: run the same command again to go on")


def test_a_save_that_fails_mid_run_is_one_line(tmp_path, monkeypatch, capsys):
  """A disk that fills (or a folder made read-only) during a run: the failed save is one line
  naming the folder and exit code 1, and the earlier checkpoints stand (Orbax's traceback
  before)."""
  import orbax.checkpoint as ocp
  real = ocp.CheckpointManager.save

  def save(self, step, *args, **kwargs):
    if step == 4:
      raise OSError(28, "No space left on device")
    return real(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  assert app.train_and_evaluate(tiny_config(**SMALL), tmp_path) == 1
  said = _said(capsys.readouterr().err)
  assert said == [f"error: {tmp_path / 'checkpoints'}: saving step 4 failed (No space left on "
                  "device); the checkpoints written before it stand"]
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]


def test_a_stale_lock_is_taken_over_and_released(tmp_path):
  gone = subprocess.Popen(["true"])
  gone.wait()
  (tmp_path / faults.WorkdirLock.NAME).write_text(json.dumps(
      {"host": faults.socket.gethostname(), "pid": gone.pid, "started": "then"}))
  lines = []
  with faults.WorkdirLock(tmp_path, lines.append) as lock:
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    with pytest.raises(faults.OutputError, match=f"pid {os.getpid()}"):
      faults.WorkdirLock(tmp_path).acquire()  # held, even by this very process
  assert len(lines) == 1 and f"stale lock {lock.path} of pid {gone.pid}" in lines[0]
  assert not lock.path.exists()
  # A lock naming this process's pid that no lock of this process holds was left by an earlier
  # process with the same pid (a container restarted under the same host name): stale too.
  (tmp_path / faults.WorkdirLock.NAME).write_text(json.dumps(
      {"host": faults.socket.gethostname(), "pid": os.getpid(), "started": "before a restart"}))
  with faults.WorkdirLock(tmp_path, lines.append):
    pass
  assert lines[1] == (f"workdir: removing the stale lock {lock.path} of pid {os.getpid()}, an "
                      "earlier process with this one's pid")


# -- non-finite numbers --------------------------------------------------------------------------

def test_non_finite_rate_skips_the_step(saved_states):
  """Loss and gradients are finite, the rate (so the update) is not: the step is skipped like a
  NaN loss."""
  cfg, states, _ = saved_states
  unchecked = dataclasses.replace(cfg, train=dataclasses.replace(
      cfg.train, learning_rate=float("inf"), warmup_steps=0))  # what validation now refuses
  state = states[2]
  grads = jax.tree.map(jnp.ones_like, state.params)
  new, lr, finite = jax.jit(lambda s, g: steps._guarded_update(
      s, g, jnp.bool_(True), unchecked))(state, grads)
  assert not np.isfinite(float(lr))
  assert not bool(finite) and int(new.nonfinite) == 1 and int(new.skipped) == 1
  for a, b in zip(jax.tree.leaves((state.params, state.opt_state)),
                  jax.tree.leaves((new.params, new.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_update_guard_does_not_read_the_parameters(saved_states):
  """The skip decision comes from scalars (the loss, the gradients' norm, the rate), never from
  the parameters, so that XLA can fuse the guard's selects into the update
  (steps._guarded_update): a parameter already infinite does not skip a step with finite
  gradients. Fails if any check of the (new) parameters comes back, whatever its form."""
  cfg, states, _ = saved_states
  state = states[2]
  leaves, treedef = jax.tree.flatten(state.params)
  leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.inf)
  damaged = state.replace(params=jax.tree.unflatten(treedef, leaves))
  grads = jax.tree.map(jnp.ones_like, state.params)
  new, _, finite = jax.jit(lambda s, g: steps._guarded_update(s, g, jnp.bool_(True), cfg))(
      damaged, grads)
  assert bool(finite) and int(new.skipped) == int(state.skipped)
  moved = [not np.array_equal(np.asarray(a), np.asarray(b))
           for a, b in zip(jax.tree.leaves(new.params)[1:], leaves[1:])]
  assert all(moved)


def test_a_non_finite_state_is_never_checkpointed(saved_states, tmp_path):
  """checkpoint.save refuses a state holding a NaN (one line naming the leaf and the step), so
  it can never push an intact checkpoint out of the kept ones (keep=2 here)."""
  cfg, states, source = saved_states
  directory = tmp_path / "checkpoints"
  shutil.copytree(source, directory)
  state = states[4]
  leaves, treedef = jax.tree.flatten(state.params)
  leaves[-1] = leaves[-1].at[(0,) * leaves[-1].ndim].set(jnp.nan)
  bad = state.replace(params=jax.tree.unflatten(treedef, leaves), step=jnp.int32(6))
  mngr = checkpoint.manager(directory, keep=2, async_save=False)
  with pytest.raises(checkpoint.CheckpointError) as info:
    checkpoint.save(mngr, 6, bad, {"step": 6})
  message = str(info.value)
  assert "step 6" in message and "non-finite" in message and "\n" not in message
  path = jax.tree_util.keystr(jax.tree_util.tree_flatten_with_path(state.params)[0][-1][0])
  assert all(part in message for part in re.findall(r"\w+", path))
  mngr.close()
  reader = checkpoint.manager(directory, async_save=False)
  assert reader.all_steps() == [2, 4]
  reader.close()


@pytest.mark.parametrize("override,culprit", [
    ("train.learning_rate=inf", "train.learning_rate: expected a finite number"),
    ("train.learning_rate=.nan", "train.learning_rate: expected a finite number"),
    ("eavi.learning_rate=-1e-3", "eavi.learning_rate: must be positive"),
    ("train.weight_decay=-0.1", "train.weight_decay: must be >= 0"),
    ("train.b2=1.0", "train.b2: must be in [0, 1)"),
    ("train.b1=0.99999999", "train.b1: must be in [0, 1) in float32"),  # 1.0 in float32
    ("model.rope_theta=-inf", "model.rope_theta: expected a finite number"),
    ("data.train=a++b", "data.train: 'a++b' has an empty source"),
])
def test_impossible_numbers_and_sources_are_config_errors(override, culprit):
  with pytest.raises(config.ConfigError) as info:
    config.load(None, [override])
  assert culprit in str(info.value) and "\n" not in str(info.value)


# -- outputs and data ----------------------------------------------------------------------------

def test_workdir_that_is_a_file_is_one_line(tmp_path, capsys):
  (tmp_path / "f").write_text("")
  assert app.train_and_evaluate(tiny_config(**SMALL), tmp_path / "f") == 1
  assert "--workdir" in _one_line(capsys.readouterr().err)
  assert app.train_and_evaluate(tiny_config(**SMALL), tmp_path / "f" / "w") == 1
  assert "not writable" in _one_line(capsys.readouterr().err)
  # A workdir whose checkpoint folder cannot take a save (here a file in its place; a
  # read-only folder or another user's alike) is one line before the first step, not Orbax's
  # traceback (and, with async saves, its minutes-long wait) at the first save.
  (tmp_path / "w").mkdir()
  (tmp_path / "w" / "checkpoints").write_text("")
  assert app.train_and_evaluate(tiny_config(**SMALL), tmp_path / "w") == 1
  assert _one_line(capsys.readouterr().err) == (
      f"error: the checkpoint folder {tmp_path / 'w' / 'checkpoints'}: is a file, not a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_workdir_is_one_line(tmp_path, capsys):
  (tmp_path / "ro").mkdir(mode=0o555)
  assert app.train_and_evaluate(tiny_config(**SMALL), tmp_path / "ro") == 1
  assert "--workdir" in _one_line(capsys.readouterr().err)


def test_unwritable_out_fails_before_the_evaluation(saved_states, tmp_path, capsys, monkeypatch):
  cfg, _, source = saved_states
  shutil.copytree(source, tmp_path / "run" / "checkpoints")
  config.save(cfg, tmp_path / "run" / "config.yaml")
  (tmp_path / "file").write_text("")
  monkeypatch.setattr(app, "evaluate_params", lambda *a, **k: pytest.fail("evaluation ran"))
  from train import evaluate
  assert evaluate.main(["--checkpoint", str(tmp_path / "run"), "--out",
                        str(tmp_path / "file" / "out")]) == 1
  line = _one_line(capsys.readouterr().err)
  assert "--out" in line and "not writable" in line


def test_no_training_task_left_is_one_line(tmp_path, capsys):
  cfg = tiny_config(**{**SMALL, "data": {**SMALL["data"], "train": "arc-agi-1:evaluation",
                                        "eval": "arc-agi-1:evaluation", "max_grid": 5}})
  assert app.train_and_evaluate(cfg, tmp_path) == 1
  line = _one_line(capsys.readouterr().err)
  assert "data.train: no training task left" in line and "leaked" in line
  # No evaluation task left is found first, before any training: one line naming the filter.
  tiny = config.replace(cfg, data={"max_grid": 1})
  assert app.train_and_evaluate(tiny, tmp_path / "tiny") == 1
  assert _one_line(capsys.readouterr().err) == (
      "error: arc-agi-1:evaluation: no evaluation task left (400 loaded, 0 malformed skipped, "
      "data.max_grid=1 leaves none)")
  assert not (tmp_path / "tiny" / "checkpoints").exists()


def test_tasks_too_long_for_every_bucket_are_logged_and_not_counted(tmp_path):
  small = [[1]]
  big = [[1] * 5] * 5
  for name, grid in (("small", small), ("big", big)):
    (tmp_path / f"{name}.json").write_text(json.dumps(
        {"train": [{"input": grid, "output": grid}] * 2,
         "test": [{"input": grid, "output": grid}]}))
  cfg = tiny_config(data={"train": str(tmp_path), "eval": "", "buckets": [32],
                          "max_train_tasks": 0})
  tasks, _ = build_training_tasks(cfg.data, log=lambda *_: None)
  stream = BatchStream(tasks, cfg.data, 8, 0)
  assert stream.num_too_long == 3 and stream.num_tasks_too_long == 1 and stream.num_items == 3
  only_big = dataclasses.replace(cfg.data, train=str(tmp_path / "big.json"))
  (tmp_path / "big.json").write_text(json.dumps({"big": json.loads(
      (tmp_path / "big.json").read_text())}))
  with pytest.raises(DataError, match="data.buckets: no training sequence fits"):
    BatchStream(build_training_tasks(only_big, log=lambda *_: None)[0], only_big, 8, 0)
  # A task with one demonstration and no test output gives no sequence: counted apart, and a
  # data of nothing else is an error that says so (not one about the buckets).
  lone = {"train": [{"input": small, "output": small}], "test": [{"input": small}]}
  both = dataclasses.replace(cfg.data, train=str(tmp_path / "both"))
  (tmp_path / "both").mkdir()
  for name, task in (("lone", lone), ("small", json.loads((tmp_path / "small.json").read_text()))):
    (tmp_path / "both" / f"{name}.json").write_text(json.dumps(task))
  stream = BatchStream(build_training_tasks(both, log=lambda *_: None)[0], both, 8, 0)
  assert stream.num_tasks_empty == 1 and stream.num_tasks_too_long == 0
  only_lone = dataclasses.replace(cfg.data, train=str(tmp_path / "lone.json"))
  (tmp_path / "lone.json").write_text(json.dumps({"lone": lone}))
  with pytest.raises(DataError, match=r"^data.train: none of the 1 training tasks gives a "
                                      r"sequence \(each needs a test output or at least 2 "):
    BatchStream(build_training_tasks(only_lone, log=lambda *_: None)[0], only_lone, 8, 0)


def test_a_boolean_colour_is_rejected(tmp_path):
  (tmp_path / "t.json").write_text(json.dumps(
      {"train": [{"input": [[True, 0]], "output": [[1]]}], "test": [{"input": [[1]]}]}))
  with pytest.raises(DataError, match=r"train\[0\].input: colour True at \(0, 0\) is not an "
                                      "integer"):
    load_tasks(str(tmp_path))


def test_the_suites_compile_flags_drop_the_preset_from_jax_0_12():
  # The XLA:CPU fast-compile preset crashes jax 0.12's test processes (tests/conftest.py);
  # older jax keeps it, and no version gets a flag its XLA does not list.
  every = {"--xla_cpu_use_fusion_emitters", "--xla_cpu_opt_preset",
           "--xla_cpu_parallel_codegen_split_count"}
  preset = "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_COMPILE"
  assert release("0.12.0.1") == (0, 12, 0, 1) and release("0.11.2") == (0, 11, 2)
  assert release("0.12.1.dev20261201+cuda") == (0, 12, 1, 20261201)
  assert preset in fast_compile_flags(every, "0.10.2")
  assert preset in fast_compile_flags(every, "0.11.2")
  for version in ("0.12.0", "0.12.0.1", "0.13.0"):
    flags = fast_compile_flags(every, version)
    assert preset not in flags and "--xla_cpu_parallel_codegen_split_count=1" in flags
  assert fast_compile_flags({"--xla_cpu_opt_preset"}, "0.10.2") == [preset]


def test_the_suites_xla_flags_keep_a_users_own(monkeypatch):
  """A user's XLA_FLAGS keeps its flags and gains the suite's eight host devices (and the
  fast-compile flags it does not set); one that sets the device count itself, as the suite's
  first process does for the xdist workers, is left as it is."""
  assert with_flags("--a=1 --b=2", ["--b=3", "--c=4"]) == "--a=1 --b=2 --c=4"
  assert with_flags("", ["--c=4"]) == "--c=4"
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "0")  # no compile flags: devices alone
  assert suite_xla_flags("--xla_cpu_max_isa=AVX2") == (
      "--xla_cpu_max_isa=AVX2 --xla_force_host_platform_device_count=8")
  assert suite_xla_flags("") == "--xla_force_host_platform_device_count=8"
  given = "--xla_force_host_platform_device_count=2 --xla_cpu_max_isa=AVX2"
  assert suite_xla_flags(given) == given
