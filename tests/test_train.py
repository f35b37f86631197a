"""Training end to end: the program, exact resume, expert reset, non-finite steps."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onn_jax import app, checkpoint, config, experts, parallel, run, stages, steps
from onn_jax.data.pipeline import BatchStream, build_training_tasks
from onn_jax.model import attention, moe
from onn_jax.model.transformer import Transformer

from conftest import tiny_config

RUN_CFG = dict(train=dict(pretrain_steps=4, eavi_steps=2, log_every=2, reset_every=3,
                          batch_size=4),
               data=dict(buckets=[128], max_train_tasks=20),
               eval=dict(max_tasks=2, batch_size=4, mode="augscore"))


def _write_config(path, cfg):
  config.save(cfg, path)
  return str(path)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """One whole run of ``python -m train.main`` (in-process): pretrain, EAVI, evaluation."""
  workdir = tmp_path_factory.mktemp("run")
  cfg = tiny_config(**RUN_CFG)
  with contextlib.redirect_stdout(io.StringIO()) as out:
    assert app.train_and_evaluate(cfg, workdir) == 0
  RUN_OUTPUT["stdout"] = out.getvalue()
  return workdir, cfg


RUN_OUTPUT: dict[str, str] = {}  # what finished_run printed


def test_run_says_where_it_runs_what_it_compiles_and_how_it_ended(finished_run):
  workdir, _ = finished_run
  lines = RUN_OUTPUT["stdout"].splitlines()
  device = jax.devices()[0]
  assert any(f"on {device.platform} ({device.device_kind}) x " in line for line in lines)
  # The start line names the expert dispatch that model.moe_impl=auto takes here.
  dispatch = moe.describe("auto", 1.25)
  assert any(f"; experts {dispatch}; on " in line for line in lines)
  # One bucket (128): one compile per stage; EAVI's in the background, during pre-training,
  # and waited for at its first step.
  said = [l for l in lines if l.startswith("compil")]
  assert len(said) == 4
  assert said[:3] == ["compiling pretrain steps (buckets 128)",
                      said[1], "compiling eavi steps (buckets 128) in the background"]
  assert re.fullmatch(r"compiled pretrain steps in [0-9.]+ s", said[1])
  assert re.fullmatch(r"compiled eavi steps in the background in [0-9.]+ s \(waited [0-9.]+ s\)",
                      said[3])
  scores = json.loads((workdir / "eval" / "scores.json").read_text())
  last = lines[-1]
  assert last.startswith(f"evaluation (augscore): solved {scores['solved']} of "
                         f"{scores['num_test_inputs']} test outputs")
  assert f"{scores['malformed']} of {scores['generations']} generations malformed" in last
  assert last.endswith(f"scores in {workdir / 'eval' / 'scores.json'}")


def test_run_writes_metrics_checkpoints_plots_and_evaluation(finished_run):
  workdir, cfg = finished_run
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  steps_logged = [r for r in records if "event" not in r]
  assert [r["step"] for r in steps_logged] == [2, 4, 6]
  assert [r["stage"] for r in steps_logged] == ["pretrain", "pretrain", "eavi"]
  for r in steps_logged:
    for key in ("loss", "ce", "sdl_diversity", "sdl_sparsity", "answer_acc", "answer_exact",
                "experts_per_token", "fallback_frac", "dead_experts", "lr", "grad_norm",
                "tokens_per_s", "step_s"):
      assert np.isfinite(r[key]), key
    # Buckets of 128 hold shorter sequences too: padding counts only in tokens_per_s.
    assert 0 < r["real_tokens_per_s"] < r["tokens_per_s"]
    # The waits for the device and for batches are parts of the window's time a step.
    assert 0 < r["device_wait_s"] and 0 <= r["batch_wait_s"] and 0 < r["queue_s"]
    assert r["device_wait_s"] + r["batch_wait_s"] + r["queue_s"] <= r["step_s"]
  # The first step of each stage compiles its buckets, and its interval says so.
  assert [r["compiled_steps"] for r in steps_logged] == [1, 0, 1]
  assert "free_exact" in steps_logged[-1] and "exc_ce" in steps_logged[-1]
  resets = [r for r in records if r.get("event") == "reset"]
  L = cfg.model.num_layers  # a reset event per layer (test_expert_reset_*: two layers)
  assert [r["step"] for r in resets] == [3] * L + [6] * L
  assert {r["layer"] for r in resets} == set(range(L))
  assert config.load(workdir / "config.yaml") == cfg
  mngr = checkpoint.manager(workdir / "checkpoints")
  assert mngr.latest_step() == 6
  mngr.close()
  for name in ("loss.png", "accuracy.png", "experts.png"):
    assert (workdir / "plots" / name).stat().st_size > 0
  scores = json.loads((workdir / "eval" / "scores.json").read_text())
  assert scores["num_tasks"] == 2 and 0.0 <= scores["score"] <= 1.0
  assert scores["protocol"]["train"] == cfg.data.train
  submission = json.loads((workdir / "eval" / "submission.json").read_text())
  assert len(submission) == 2
  assert all({"attempt_1", "attempt_2"} <= set(entry) for v in submission.values()
             for entry in v)


def _final_state(workdir, cfg):
  model = Transformer(cfg.model)
  target = steps.init_state(cfg, model, jax.random.PRNGKey(0))
  mngr = checkpoint.manager(workdir / "checkpoints", async_save=False)
  state, _ = checkpoint.restore(mngr, target)
  mngr.close()
  return state


@pytest.mark.parametrize("eavi_every, stop", [(0, 5), (3, 2)])
def test_resume_in_a_new_process_is_bit_identical(finished_run, tmp_path, eavi_every, stop):
  """Stop inside the EAVI stage (step 5 of 4 + 2), or with train.eavi_every=3 (steps pretrain,
  pretrain, EAVI, pretrain, EAVI, EAVI) just before the interleaved EAVI step, then a new
  process resumes for the rest: same params, Adam state, RNG (which drives the rollouts) and
  routing counts as the uninterrupted run."""
  whole_dir, cfg = finished_run
  if eavi_every:
    cfg = config.replace(cfg, train={"eavi_every": eavi_every})
    whole_dir = tmp_path / "whole"
    assert run.train(cfg, whole_dir, log=lambda *_: None).finished
  sliced = tmp_path / "sliced"
  cfg_path = _write_config(tmp_path / "cfg.yaml", cfg)
  assert app.train_and_evaluate(config.replace(cfg, train={"run_steps": stop}), sliced) == 0
  assert checkpoint.manager(sliced / "checkpoints").latest_step() == stop
  proc = subprocess.run([sys.executable, "-m", "train.main", "--config", cfg_path,
                         "--workdir", str(sliced), "eval.mode=greedy", "eval.max_tasks=1"],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "resumed" in proc.stdout + proc.stderr
  whole, resumed = _final_state(whole_dir, cfg), _final_state(sliced, cfg)
  assert int(resumed.step) == int(whole.step) == 6
  for a, b in zip(jax.tree.leaves((whole.params, whole.opt_state, whole.rng, whole.routing)),
                  jax.tree.leaves((resumed.params, resumed.opt_state, resumed.rng,
                                   resumed.routing))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_init_from_is_a_clear_error(tmp_path, capsys):
  cfg = tiny_config(train={"init_from": str(tmp_path / "nowhere")})
  assert app.train_and_evaluate(cfg, tmp_path / "w") == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "nowhere" in err[0]


def test_init_from_takes_parameters(finished_run, tmp_path):
  source, cfg = finished_run
  model = Transformer(cfg.model)
  state = steps.init_state(cfg, model, jax.random.PRNGKey(7))
  params, record = checkpoint.load_params(source, state.params)
  expected = _final_state(source, cfg).params
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The run that starts from it says which weights it took (the source's EMA when it kept one).
  lines = []
  started = run.initial_state(config.replace(cfg, train={"init_from": str(source)}), model,
                              checkpoint.manager(tmp_path / "new"), lines.append)
  for a, b in zip(jax.tree.leaves(started.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  said = "its EMA weights" if record["weights"] == "ema" else "its parameters"
  assert lines[-1] == f"parameters from {source} (step {record['step']}, {said}" + (
      " (train.ema_decay))" if record["weights"] == "ema" else ")")
  bigger = config.replace(cfg, model={"d_model": 48})
  with pytest.raises(checkpoint.CheckpointError, match="shape|structure"):
    checkpoint.load_params(source, steps.init_state(bigger, Transformer(bigger.model),
                                                    jax.random.PRNGKey(0)).params)


# -- expert reset ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_state():
  cfg = tiny_config(model={"num_layers": 2})  # dead experts in two layers
  model = Transformer(cfg.model)
  tasks, _ = build_training_tasks(cfg.data, log=lambda *_: None)
  stream = BatchStream(tasks, cfg.data, cfg.train.batch_size, 0)
  step = jax.jit(lambda s, b: steps.train_step(s, b, model=model, cfg=cfg))
  state = steps.init_state(cfg, model, jax.random.PRNGKey(0))
  for i in range(2):  # non-zero Adam moments everywhere
    state, _ = step(state, stream.batch(i))
  return cfg, model, stream, state


def test_expert_reset_reinitialises_only_dead_experts(trained_state):
  cfg, _, _, state = trained_state
  L, E = cfg.model.num_layers, cfg.model.num_experts
  window = np.ones((L, E), np.float32)
  window[0, 1] = window[1, 3] = 0  # dead: layer 0 expert 1, layer 1 expert 3
  params, opt_state, _, dead = experts.reset_dead_experts(
      state.params, state.opt_state, jnp.asarray(window), jax.random.PRNGKey(9), cfg.model)
  np.testing.assert_array_equal(np.asarray(dead), window == 0)
  changed = 0
  for (path, old), new in zip(jax.tree_util.tree_flatten_with_path(state.params)[0],
                              jax.tree.leaves(params)):
    name = jax.tree_util.keystr(path)
    old, new = np.asarray(old), np.asarray(new)
    if "['moe']" in name:
      layer = 0 if "block_0" in name else 1
      alive = window[layer] > 0
      np.testing.assert_array_equal(new[alive], old[alive])
      changed += int(not np.array_equal(new[~alive], old[~alive]))
    else:
      np.testing.assert_array_equal(new, old)
  assert changed >= 2 * 4  # prototypes, w_in, w_out, b_? ... of both dead experts are fresh
  moments = 0
  for (path, old), new in zip(jax.tree_util.tree_flatten_with_path(state.opt_state)[0],
                              jax.tree.leaves(opt_state)):
    name = jax.tree_util.keystr(path)
    old, new = np.asarray(old), np.asarray(new)
    if "['moe']" in name and new.ndim:
      layer = 0 if "block_0" in name else 1
      alive = window[layer] > 0
      assert not new[~alive].any()
      np.testing.assert_array_equal(new[alive], old[alive])
      moments += 1
    else:
      np.testing.assert_array_equal(new, old)
  assert moments == 2 * 2 * 6  # mu and nu of 6 expert leaves in 2 layers


def test_expert_reset_with_no_dead_expert_changes_nothing(trained_state):
  cfg, _, _, state = trained_state
  window = jnp.ones((cfg.model.num_layers, cfg.model.num_experts))
  params, opt_state, _, dead = experts.reset_dead_experts(
      state.params, state.opt_state, window, jax.random.PRNGKey(1), cfg.model)
  assert not np.asarray(dead).any()
  for a, b in zip(jax.tree.leaves((state.params, state.opt_state)),
                  jax.tree.leaves((params, opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# -- non-finite steps --------------------------------------------------------------------------

def test_non_finite_step_is_skipped_and_counted(trained_state):
  cfg, model, stream, state = trained_state
  bad = state.replace(params=jax.tree_util.tree_map_with_path(
      lambda p, x: x.at[0].set(jnp.nan) if "embedding" in jax.tree_util.keystr(p) else x,
      state.params))
  new, metrics = jax.jit(lambda s, b: steps.train_step(s, b, model=model, cfg=cfg))(
      bad, stream.batch(5))
  assert not np.isfinite(float(metrics["loss"]))
  assert int(metrics["skipped"]) == 1 and int(new.skipped) == int(state.skipped) + 1
  assert int(new.nonfinite) == 1 and int(new.step) == int(state.step) + 1
  for a, b in zip(jax.tree.leaves((bad.params, bad.opt_state)),
                  jax.tree.leaves((new.params, new.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_optimizer_ops_carry_their_scope(trained_state):
  """The update's and the gradient norm's operations are named under ``optimizer`` in the
  step's program (``train.bench --profile`` books kernels by their name scope). Read from the
  lowered program's locations: a compiled program may come from JAX's compilation cache,
  whose key leaves op names out."""
  cfg, model, stream, state = trained_state
  text = jax.jit(lambda s, b: steps.train_step(s, b, model=model, cfg=cfg)).lower(
      state, stream.batch(0)).as_text(debug_info=True)
  names = set(re.findall(r'loc\("([^"]+)"', text))
  mine = {n.split("optimizer/", 1)[1] for n in names if "/optimizer/" in n}
  # The guard's (is_finite, select_n) and the logged norm's (square: optax squares otherwise).
  assert {"is_finite", "select_n", "square"} <= mine, sorted(mine)
  assert not [n for n in names if n.endswith("/square") and "Transformer" not in n
              and "/optimizer/" not in n]
  assert any("/block_0/" in n and "/optimizer/" not in n for n in names)


def test_repeated_non_finite_steps_stop_the_run(tmp_path, capsys):
  cfg = tiny_config(train={"learning_rate": 1e30, "warmup_steps": 0, "grad_clip": 1e30,
                           "pretrain_steps": 6, "max_nonfinite": 2},
                    data={"eval": ""})
  code = app.train_and_evaluate(cfg, tmp_path / "w")
  err = capsys.readouterr().err
  assert code == 1 and "train.max_nonfinite" in err


def test_evaluate_program_on_a_kaggle_json_without_solutions(finished_run, tmp_path):
  """A user's file (in a folder whose name holds a "+", which joins sources elsewhere) is
  evaluated whole; without --out its outputs go to RUN_DIR/eval_<its name>, beside the run's
  own eval/, which stays as it was; eval.sheet_tasks picks the tasks drawn (0: no sheet)."""
  workdir, cfg = finished_run
  run_dir = tmp_path / "run"
  shutil.copytree(workdir, run_dir)
  own = (run_dir / "eval" / "submission.json").read_text()
  from onn_jax.data.tasks import load_tasks
  tasks = app.load_eval_tasks(cfg.data.eval, cfg, 2)
  challenges = {t.id: {"train": [{"input": i.tolist(), "output": o.tolist()} for i, o in t.train],
                       "test": [{"input": i.tolist()} for i, _ in t.test]} for t in tasks}
  (tmp_path / "my+data").mkdir()
  path = tmp_path / "my+data" / "arc-agi_test_challenges.json"
  path.write_text(json.dumps(challenges))
  assert len(load_tasks(str(path))) == 2
  from train import evaluate
  heights = []
  for sheet_tasks in (2, 1, 0):  # the last names the run by its checkpoints/ folder
    given = run_dir / "checkpoints" if sheet_tasks == 0 else run_dir
    assert evaluate.main(["--checkpoint", str(given), "--data", str(path), "eval.mode=greedy",
                          f"eval.sheet_tasks={sheet_tasks}"]) == 0
    out = run_dir / "eval_arc-agi_test_challenges"
    scores = json.loads((out / "scores.json").read_text())
    assert "score" not in scores and "omitted" in json.dumps(scores)
    # The protocol names what was evaluated, not the run's own data.eval and its max_grid.
    assert (scores["protocol"]["eval"], scores["protocol"]["max_grid"]) == (str(path), 30)
    assert scores["protocol"]["train"] == cfg.data.train
    submission = json.loads((out / "submission.json").read_text())
    assert sorted(submission) == sorted(challenges)
    if sheet_tasks:
      from matplotlib.image import imread
      heights.append(imread(out / "sheet.png").shape[0])
      (out / "sheet.png").unlink()
    else:
      assert not (out / "sheet.png").exists()
  assert heights[1] < heights[0]
  assert scores["protocol"]["eval_max_tasks"] == 0  # whole
  # A filter given on this command line applies, and the protocol says so.
  assert evaluate.main(["--checkpoint", str(run_dir), "--data", str(path), "eval.mode=greedy",
                        "eval.max_tasks=1", "--out", str(tmp_path / "one")]) == 0
  scores = json.loads((tmp_path / "one" / "scores.json").read_text())
  assert scores["protocol"]["eval_max_tasks"] == 1
  assert len(json.loads((tmp_path / "one" / "submission.json").read_text())) == 1
  assert not list((run_dir / "checkpoints").glob("eval*"))
  assert (run_dir / "eval" / "submission.json").read_text() == own
  assert app.default_eval_folder(None) == "eval"  # the run's own evaluation, its selection
  assert app.default_eval_folder(cfg.data.eval) == "eval_arc-agi-1_evaluation"  # whole
  assert app.default_eval_folder(" ARC-AGI-1:Training") == "eval_ARC-AGI-1_Training"
  assert app.default_eval_folder("a/tasks/+b.JSON") == "eval_tasks+b"
  assert app.default_eval_folder("data/v1.1/") == "eval_v1.1"


def test_evaluate_program_missing_checkpoint_is_one_line(tmp_path, capsys):
  from train import evaluate
  assert evaluate.main(["--checkpoint", str(tmp_path / "none")]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "none" in err[0]


def test_ctrl_c_writes_a_checkpoint_and_resume_logs_each_step_once(tmp_path, monkeypatch):
  cfg = tiny_config(**{**RUN_CFG, "data": {**RUN_CFG["data"], "eval": ""},
                       "checkpoint": {"every": 2, "async_save": False}})
  real_batch = BatchStream.batch

  def interrupted(self, step, **kwargs):
    if step == 3:
      raise KeyboardInterrupt
    return real_batch(self, step, **kwargs)

  monkeypatch.setattr(BatchStream, "batch", interrupted)
  assert app.train_and_evaluate(cfg, tmp_path) == 130
  mngr = checkpoint.manager(tmp_path / "checkpoints")
  assert mngr.latest_step() == 3  # step 2 by schedule, step 3 by the interrupt
  mngr.close()
  monkeypatch.setattr(BatchStream, "batch", real_batch)
  assert app.train_and_evaluate(cfg, tmp_path) == 0
  logged = [json.loads(line)["step"] for line in
            (tmp_path / "metrics.jsonl").read_text().splitlines() if '"event"' not in line]
  assert logged == sorted(set(logged)) and logged[-1] == 6


def test_a_fresh_start_over_an_earlier_runs_records_moves_them_aside(tmp_path, capsys):
  """A workdir whose checkpoints were deleted (or whose run stopped before its first save)
  still holds that run's metrics.jsonl and config.yaml: the new run, starting at step 0, moves
  both to previous-1/ and says so, instead of writing over them."""
  cfg = tiny_config(**{**RUN_CFG, "data": {**RUN_CFG["data"], "eval": ""},
                       "checkpoint": {"every": 2, "async_save": False}})
  assert app.train_and_evaluate(cfg, tmp_path) == 0
  earlier = (tmp_path / "metrics.jsonl").read_text()
  shutil.rmtree(tmp_path / "checkpoints")
  (tmp_path / "tensorboard").mkdir()  # its TensorBoard events, which went on the new run's
  (tmp_path / "tensorboard" / "events").write_text("x")
  capsys.readouterr()
  other = config.replace(cfg, train={"seed": 7})  # another run's config, no resume check left
  assert app.train_and_evaluate(other, tmp_path) == 0
  out = capsys.readouterr().out
  aside = tmp_path / "previous-1"
  assert (f"{tmp_path} holds no checkpoint but an earlier run's records: starting at step 0; "
          f"its metrics.jsonl, config.yaml and tensorboard moved to {aside}") in out
  assert (aside / "tensorboard" / "events").read_text() == "x"
  assert not (tmp_path / "tensorboard").exists()
  assert (aside / "metrics.jsonl").read_text() == earlier
  assert config.load(aside / "config.yaml").train.seed == cfg.train.seed
  assert config.load(tmp_path / "config.yaml").train.seed == 7
  logged = [json.loads(line)["step"] for line in
            (tmp_path / "metrics.jsonl").read_text().splitlines() if '"event"' not in line]
  assert logged == sorted(set(logged)) and logged[-1] == 6


def test_training_compiles_nothing_on_its_own_thread_once_steps_run(tmp_path, monkeypatch):
  """With train.background_compile (the default), every program the training loop runs is
  compiled before its first step (the first stage's steps, the expert reset) or on the
  compile thread (the later stages'): none on the training thread once steps run, where it
  would wait behind a background compilation (on a GPU, steps stalled for minutes beside
  them; README Quick start). Counted from JAX's compile events (a cache load counts too)."""
  cfg = tiny_config(**{**RUN_CFG, "data": {**RUN_CFG["data"], "eval": ""},
                       "train": {**RUN_CFG["train"], "reset_every": 2},
                       "checkpoint": {"every": 2, "async_save": True}})  # as runs save
  assert cfg.train.background_compile
  events: list[tuple[str, str]] = []  # (thread, what): a compilation or "step"

  def compiled(event, duration, **meta):
    if event == "/jax/core/compile/backend_compile_duration":
      events.append((threading.current_thread().name, meta.get("fun_name", "?")))

  real_run = parallel.Runner.run

  def run_step(self, *args, **kwargs):
    events.append((threading.current_thread().name, "step"))
    return real_run(self, *args, **kwargs)

  monkeypatch.setattr(parallel.Runner, "run", run_step)
  jax.monitoring.register_event_duration_secs_listener(compiled)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      run.train(cfg, tmp_path, log=lambda *_: None)
  finally:
    jax.monitoring.unregister_event_duration_listener(compiled)
  main = threading.main_thread().name
  first = events.index((main, "step"))
  assert sum(what == "step" for _, what in events) == 6
  assert any(thread != main and what != "step" for thread, what in events)  # EAVI's, there
  late = [what for thread, what in events[first:] if thread == main and what != "step"]
  assert late == [], late


def test_steps_compile_once_per_length_bucket():
  """No recompilation after the first step of each bucket (the fast-defaults promise)."""
  from onn_jax import run
  cfg = tiny_config(data={"buckets": [96, 128, 256]}, train={"batch_size": 4})
  model = Transformer(cfg.model)
  runner = run.make_runner(cfg, model)
  tasks, _ = build_training_tasks(cfg.data, log=lambda *_: None)
  stream = BatchStream(tasks, cfg.data, 4, 0)
  state = runner.put_state(steps.init_state(cfg, model, jax.random.PRNGKey(0)))
  lengths = set()
  for step in range(8):
    batch = stream.batch(step)
    lengths.add(batch["inputs"].shape[1])
    state, _ = runner.run("pretrain", state, runner.put_batch(batch))
  assert len(lengths) >= 2  # several buckets were drawn
  assert runner._steps["pretrain"]._cache_size() == len(lengths)


def test_eavi_steps_draw_from_answer_groups_when_set():
  """eavi.answer_groups reaches EAVI's batches (and the shapes compiled for them), not the
  teacher-forcing steps'."""
  cfg = tiny_config(train={"pretrain_steps": 2, "eavi_steps": 6},
                    eavi={"answer_groups": [20]})
  tasks, _ = build_training_tasks(cfg.data, log=lambda *_: None)
  stream = BatchStream(tasks, cfg.data, 8, 0)
  for step in range(8):
    groups = (20,) if step >= 2 else ()
    want = stream.batch(step, answer_groups=groups)
    got = run.batch_at(cfg, stream, step)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  lengths = run.stage_lengths(cfg, stream, "eavi", 2, 8)
  assert lengths == {L: min(s for s in range(2, 8)
                            if stream.length_at(s, answer_groups=(20,)) == L)
                     for L in {stream.length_at(s, answer_groups=(20,)) for s in range(2, 8)}}


@pytest.mark.parametrize("background,fill", [(False, False), (True, False), (False, True)])
def test_packing_stage_with_long_buckets_runs_packed_rows_and_fewer_longer_rows(background, fill):
  """data.pack_len below the longest bucket with a token budget: a packing stage's steps are
  packed rows of pack_len or rows of the longer bucket, fewer of them (unpacked, or with
  ``data.pack_fill`` packed after their own sequences); each trains.
  ``stage_lengths`` names every row length the steps draw, at its first step, without building
  a batch; the runner compiles them ahead (``precompile``, now or in the background, which the
  first step waits for) and runs every step on those programs, with the jitted step's
  result."""
  cfg = tiny_config(data={"buckets": [128, 256], "pack": True, "pack_len": 128,
                          "max_batch_tokens": 8 * 128, "max_grid": 8, "pack_fill": fill},
                    train={"pretrain_steps": 10})
  model = Transformer(cfg.model)
  runner = run.make_runner(cfg, model)
  tasks, _ = build_training_tasks(cfg.data, log=lambda *_: None)
  stream = BatchStream(tasks, cfg.data, 8, 0, pack_align=attention.pack_alignment(cfg.model))
  state0 = steps.init_state(cfg, model, jax.random.PRNGKey(0))
  state = runner.put_state(state0)
  lengths = run.stage_lengths(cfg, stream, "pretrain", 0, 10)
  runner.precompile("pretrain", state, [run.batch_at(cfg, stream, s) for s in lengths.values()],
                    background=background)
  if not background:
    assert runner.wait_compiled("pretrain") is None  # nothing left pending
  shapes, firsts, outs = set(), {}, []
  for step in range(10):
    batch = run.batch_at(cfg, stream, step)
    shapes.add(batch["inputs"].shape)
    firsts.setdefault(batch["inputs"].shape[1], step)
    assert ("segment_start" in batch) == (fill or batch["inputs"].shape[1] == 128)
    state, out = runner.run("pretrain", state, runner.put_batch(batch))
    outs.append(out)
    assert np.isfinite(float(out["loss"]))
  assert shapes == {(8, 128), (4, 256)}
  assert lengths == firsts
  assert not runner._pending  # the first run waited for the background compilation
  assert runner._steps["pretrain"]._cache_size() == 0  # every step ran a precompiled program
  _, jitted = runner._steps["pretrain"](runner.put_state(state0),
                                        runner.put_batch(run.batch_at(cfg, stream, 0)))
  assert jax.tree.structure(jitted) == jax.tree.structure(outs[0])
  for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(outs[0])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_with_other_data_or_model_is_one_clear_line(finished_run, tmp_path, capsys):
  """A resume may change execution choices and stage lengths, never what defines the batches
  or the model; a refused resume leaves the workdir as it was."""
  from onn_jax import run
  workdir, cfg = finished_run
  saved = config.load(workdir / "config.yaml")
  run.check_resume(saved, config.replace(cfg, train={"eavi_steps": 9, "learning_rate": 1e-4},
                                         model={"remat": True, "moe_impl": "tiled",
                                                "moe_capacity": 2.0, "moe_tile": 64},
                                         parallel={"mode": "pmap"},
                                         eval={"mode": "vote"}))
  for changed, name in [(config.replace(cfg, data={"buckets": (128, 256)}), "data.buckets"),
                        (config.replace(cfg, train={"seed": 5}), "train.seed"),
                        (config.replace(cfg, model={"num_experts": 6}), "model.num_experts"),
                        (config.replace(cfg, train={"ema_decay": 0.9}), "train.ema_decay")]:
    with pytest.raises(config.ConfigError, match=name.replace(".", r"\.")):
      run.check_resume(saved, changed)
  # A state of another layout (here: with an EMA the run never kept) is one clear error too.
  with_ema = config.replace(cfg, train={"ema_decay": 0.9})
  target = steps.init_state(with_ema, Transformer(with_ema.model), jax.random.PRNGKey(0))
  mngr = checkpoint.manager(workdir / "checkpoints", async_save=False)
  with pytest.raises(checkpoint.CheckpointError, match="does not fit") as info:
    checkpoint.restore(mngr, target)
  mngr.close()
  assert "\n" not in str(info.value)
  before = (workdir / "config.yaml").read_text()
  assert app.train_and_evaluate(config.replace(cfg, train={"batch_size": 8}), workdir) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "train.batch_size=8" in err[0] and "checkpointed run" in err[0]
  assert (workdir / "config.yaml").read_text() == before


def test_stages_shortened_below_the_checkpoint_are_said(finished_run, tmp_path):
  """A resume whose stages end before the checkpoint's step trains nothing and says so; the
  checkpoint's state stands (it is what evaluation then scores)."""
  from onn_jax import run
  workdir, cfg = finished_run
  shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
  shutil.copy(workdir / "config.yaml", tmp_path / "config.yaml")
  done = stages.total_steps(cfg)
  lines = []
  result = run.train(config.replace(cfg, train={"pretrain_steps": 1, "eavi_steps": 0}),
                     tmp_path, log=lines.append)
  assert result.finished and result.step == done
  assert f"the checkpoint's step {done} is past the 1 steps of train.pretrain_steps + " \
         f"train.eavi_steps: nothing left to train; the step-{done} state stands" in lines


def test_eval_weights_picks_the_ema_or_the_raw_parameters(tmp_path, monkeypatch, capsys):
  cfg = tiny_config(train={"pretrain_steps": 2, "ema_decay": 0.5, "batch_size": 4},
                    data={"buckets": [128], "max_train_tasks": 20, "eval": ""})
  assert app.train_and_evaluate(cfg, tmp_path) == 0
  state = _final_state(tmp_path, cfg)
  seen = {}
  monkeypatch.setattr(app, "evaluate_params",
                      lambda cfg, params, tasks, out, extra: seen.update(params=params, out=out,
                                                                         tasks=tasks, **extra))
  for weights, expected in (("ema", state.ema), ("params", state.params)):
    assert app.evaluate_checkpoint(tmp_path, "arc-agi-1:evaluation", tmp_path / weights,
                                   [f"eval.weights={weights}", "eval.max_tasks=1"]) == 0
    assert seen["weights"] == weights
    for a, b in zip(jax.tree.leaves(seen["params"]), jax.tree.leaves(expected)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.ema),
                                                      jax.tree.leaves(state.params)))
  assert "warning" not in capsys.readouterr().err
  # Scoring the run's own training split, whose test pairs it trained on, is said.
  assert app.evaluate_checkpoint(tmp_path, "arc-agi-1:training", tmp_path / "train", []) == 0
  assert "training data of this run" in capsys.readouterr().err
  # Also when the training split is one of several joined sources; the warning names it.
  assert app.evaluate_checkpoint(tmp_path, "arc-agi-1:evaluation+arc-agi-1:training", None,
                                 ["eval.max_tasks=1"]) == 0
  assert seen["out"] == tmp_path / "eval_arc-agi-1_evaluation+arc-agi-1_training"
  assert ("warning: arc-agi-1:training is training data of this run"
          in capsys.readouterr().err)
  assert app._same_source("ARC-AGI-1:training ", "arc-agi-1:training")
  assert app._same_source(str(tmp_path) + "/", os.path.relpath(tmp_path))
  assert not app._same_source(str(tmp_path), str(tmp_path / "train"))
  # An override that does not load is a config error, as in train.main: one line, exit code 2.
  assert app.evaluate_checkpoint(tmp_path, None, None, ["eval.weights=best"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("config error: ") and "eval.weights" in err[0]
  # A user's challenges file is evaluated whole: the run's data.max_grid (5) and
  # eval.max_tasks do not drop its tasks; a filter given on the command line does apply.
  big = [[1] * 8] * 8
  challenges = {f"t{i}": {"train": [{"input": big if i == 0 else [[i]], "output": [[i]]}],
                          "test": [{"input": [[i]]}]} for i in range(3)}
  (tmp_path / "challenges.json").write_text(json.dumps(challenges))
  for overrides, ids in (([], ["t0", "t1", "t2"]), (["eval.max_tasks=2"], ["t0", "t1"]),
                         (["data.max_grid=5"], ["t1", "t2"])):
    assert app.evaluate_checkpoint(tmp_path, str(tmp_path / "challenges.json"), tmp_path / "u",
                                   overrides) == 0
    assert [t.id for t in seen["tasks"]] == ids
  out = capsys.readouterr().out
  assert "eval data: 2 of the 3 tasks of" in out and "(eval.max_tasks=2)" in out
  assert "(data.max_grid=5 leaves 2)" in out
  # Under data.skip_bad a malformed task is named in a line and handed on in the tasks'
  # ``skipped`` (scores.json's skipped_malformed); none left, or none fitting the filter, is an
  # error naming the data, not an empty submission.
  challenges["t9"] = {"train": [{"input": [[10]], "output": [[1]]}], "test": [{"input": [[1]]}]}
  (tmp_path / "challenges.json").write_text(json.dumps(challenges))
  assert app.evaluate_checkpoint(tmp_path, str(tmp_path / "challenges.json"), tmp_path / "u",
                                 []) == 1
  assert "task t9: train[0].input: colour 10" in capsys.readouterr().err
  assert app.evaluate_checkpoint(tmp_path, str(tmp_path / "challenges.json"), tmp_path / "u",
                                 ["data.skip_bad=true"]) == 0
  assert [t.id for t in seen["tasks"]] == ["t0", "t1", "t2"]
  assert [w.split(": ", 1)[1] for w, _ in seen["tasks"].skipped] == ["task t9: train[0].input"]
  assert {k: [g.tolist() for g in v] for k, v in seen["tasks"].malformed_tests.items()} == {
      "t9": [[[1]]]}  # its test input, answered in submission.json
  assert "eval data: skipped " in capsys.readouterr().out
  (tmp_path / "bad.json").write_text(json.dumps({"t9": challenges["t9"]}))
  assert app.evaluate_checkpoint(tmp_path, str(tmp_path / "bad.json"), tmp_path / "u",
                                 ["data.skip_bad=true"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"error: {tmp_path / 'bad.json'}: no evaluation task left (0 loaded, 1 "
                 "malformed skipped)"]
  (tmp_path / "big.json").write_text(json.dumps({"t0": challenges["t0"]}))
  assert app.evaluate_checkpoint(tmp_path, str(tmp_path / "big.json"), tmp_path / "u",
                                 ["data.max_grid=5"]) == 1
  assert "no evaluation task left (1 loaded, 0 malformed skipped, data.max_grid=5 leaves none)" \
      in capsys.readouterr().err
  # Sources join with "+", as data.train's do.
  (tmp_path / "more.json").write_text(json.dumps({"t5": challenges["t1"]}))
  assert app.evaluate_checkpoint(
      tmp_path, f"{tmp_path / 'big.json'}+{tmp_path / 'more.json'}", tmp_path / "u", []) == 0
  assert [t.id for t in seen["tasks"]] == ["t0", "t5"]
  # A source that is not there, in a spec "+" splits, says the spec was split.
  assert app.evaluate_checkpoint(tmp_path, f"{tmp_path / 'my+data.json'}", tmp_path / "u",
                                 []) == 1
  assert capsys.readouterr().err.strip() == (
      f"error: source {str(tmp_path / 'my')!r} is not arc-agi-1, arc-agi-2, an existing folder "
      f"or a JSON file ({str(tmp_path / 'my+data.json')!r} names 2 sources joined by '+')")
  # Joining a multi-host job is this command's choice: the flags a run was trained with are not
  # inherited (it may be evaluated on one host); flags on the command line reach jax first.
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  saved = (tmp_path / "config.yaml").read_text()
  assert "coordinator_address: ''" in saved
  (tmp_path / "config.yaml").write_text(saved.replace("coordinator_address: ''",
                                                      "coordinator_address: 10.0.0.1:1234"))
  assert app.evaluate_checkpoint(tmp_path, "arc-agi-1:evaluation", tmp_path / "d",
                                 ["eval.max_tasks=1"]) == 0
  assert calls == []
  flags = ["parallel.coordinator_address=10.0.0.2:5678", "parallel.num_processes=2",
           "parallel.process_id=1"]
  assert app.evaluate_checkpoint(tmp_path, "arc-agi-1:evaluation", tmp_path / "d",
                                 ["eval.max_tasks=1"] + flags) == 0
  assert calls == [dict(coordinator_address="10.0.0.2:5678", num_processes=2, process_id=1)]


def test_learning_rate_follows_the_run_step_across_a_skipped_step(trained_state):
  """A skipped step 0 then a good step 1: the update uses the schedule at step 1 (> 0), not at
  optax's count of applied updates (still 0, where the warmup's rate is 0 and nothing moves)."""
  cfg, model, stream, _ = trained_state
  cfg = config.replace(cfg, train={"warmup_steps": 8})
  step = jax.jit(lambda s, b: steps.train_step(s, b, model=model, cfg=cfg))
  fresh = steps.init_state(cfg, model, jax.random.PRNGKey(3))
  bad = fresh.replace(params=jax.tree_util.tree_map_with_path(
      lambda p, x: x.at[0].set(jnp.nan) if "embedding" in jax.tree_util.keystr(p) else x,
      fresh.params))
  skipped, _ = step(bad, stream.batch(5))
  assert int(skipped.skipped) == 1 and int(skipped.step) == 1
  after_skip, metrics = step(skipped.replace(params=fresh.params), stream.batch(6))
  direct, _ = step(fresh.replace(step=fresh.step + 1), stream.batch(6))
  np.testing.assert_allclose(float(metrics["lr"]), float(steps.learning_rate_schedule(cfg)(1)),
                             rtol=1e-6)
  assert float(metrics["lr"]) > 0
  assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                 zip(jax.tree.leaves(after_skip.params), jax.tree.leaves(fresh.params)))
  for a, b in zip(jax.tree.leaves(after_skip.params), jax.tree.leaves(direct.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_ema_is_the_bias_corrected_average_of_the_steps(trained_state):
  """EMA after n steps = sum_k d^(n-k) p_k / sum_k d^(n-k) over the parameters p_k after each
  step: the first update takes the parameters whole, so the initialisation keeps no weight."""
  cfg, model, stream, _ = trained_state
  d = 0.9
  cfg = config.replace(cfg, train={"ema_decay": d})
  step = jax.jit(lambda s, b: steps.train_step(s, b, model=model, cfg=cfg))
  state = steps.init_state(cfg, model, jax.random.PRNGKey(1))
  seen = []
  for i in range(4):
    state, _ = step(state, stream.batch(i))
    seen.append([np.asarray(x, np.float64) for x in jax.tree.leaves(state.params)])
    if i == 0:
      for a, b in zip(jax.tree.leaves(state.ema), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  n = len(seen)
  w = np.array([d ** (n - k) for k in range(1, n + 1)])
  for leaf, ema in enumerate(jax.tree.leaves(state.ema)):
    ps = np.stack([s[leaf] for s in seen])
    expected = np.tensordot(w / w.sum(), ps, axes=1)
    # float32 recursion: n updates of a few roundings each, relative to the largest value.
    bound = 4 * n * np.finfo(np.float32).eps * np.max(np.abs(ps), axis=0)
    assert np.all(np.abs(np.asarray(ema, np.float64) - expected) <= bound)
  assert not np.allclose(np.asarray(jax.tree.leaves(state.ema)[0]),
                         np.asarray(jax.tree.leaves(state.params)[0]))


def test_ema_keeps_the_parameters_dtype(trained_state):
  """bfloat16 parameters keep a bfloat16 EMA: the state a checkpoint is restored into (and the
  compiled step) has the dtypes of init_state."""
  cfg, _, stream, _ = trained_state
  cfg = config.replace(cfg, train={"ema_decay": 0.9}, model={"param_dtype": "bfloat16"})
  model = Transformer(cfg.model)
  state = steps.init_state(cfg, model, jax.random.PRNGKey(1))
  after, _ = jax.jit(lambda s, b: steps.train_step(s, b, model=model, cfg=cfg))(
      state, stream.batch(0))
  assert {x.dtype for x in jax.tree.leaves(state.ema)} == {jnp.dtype(jnp.bfloat16)}
  assert [x.dtype for x in jax.tree.leaves(after.ema)] == \
      [x.dtype for x in jax.tree.leaves(state.ema)]


_CACHE_PROBE = """
import sys, jax, jax.numpy as jnp
from onn_jax import app, config
cfg = config.load("default", [f"train.jax_cache_dir={sys.argv[1]}"])
app.use_compile_cache(cfg)
jax.jit(lambda x: jnp.sin(x) * 3)(jnp.arange(5.0)).block_until_ready()
print(jax.config.jax_compilation_cache_dir)
"""


@pytest.mark.parametrize("preset", [False, True])
def test_compiled_programs_go_to_train_jax_cache_dir_unless_a_cache_is_set(tmp_path, preset):
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  mine, theirs = tmp_path / "mine", tmp_path / "theirs"
  if preset:
    env["JAX_COMPILATION_CACHE_DIR"] = str(theirs)
  done = subprocess.run([sys.executable, "-c", _CACHE_PROBE, str(mine)], env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  used = theirs if preset else mine
  assert done.stdout.strip() == str(used)
  assert any(used.iterdir())  # the program was written there
  assert not (theirs if not preset else mine).exists()


@pytest.mark.parametrize("enabled", [True, False])
def test_a_stage_announces_its_compile_on_any_process(enabled, capsys):
  """Processes other than 0 run a disabled bar (no description): announcing a stage's compile
  there must say nothing and not fail (it did: AttributeError at the first step of every
  process but 0)."""
  from onn_jax import output

  class Runner:
    def precompile(self, name, state, batches, background=False):
      self.compiled = (name, [b["inputs"].shape for b in batches])

  cfg = tiny_config(data={"buckets": [128, 256]}, train={"pretrain_steps": 6})
  tasks, _ = build_training_tasks(cfg.data, log=lambda *_: None)
  stream = BatchStream(tasks, cfg.data, 8, 0)
  bar, runner = output.progress(6, "train", enabled=enabled), Runner()
  run._compile_stage(cfg, stream, runner, None, "pretrain", 0, 6, bar)
  bar.close()
  drawn = sorted({stream.batch(step)["inputs"].shape for step in range(6)})
  assert sorted(runner.compiled[1]) == drawn and runner.compiled[0] == "pretrain"
  said = capsys.readouterr()
  lines = [l for l in (said.out + said.err).splitlines() if "compil" in l]
  assert len(lines) == (2 if enabled else 0)
  if enabled:
    assert lines[0] == ("compiling pretrain steps (buckets "
                        f"{', '.join(str(s[1]) for s in drawn)})")
    assert lines[1].startswith("compiled pretrain steps in ")


def test_a_stop_signal_after_a_non_finite_step_not_read_yet_still_logs_it(tmp_path,
                                                                         monkeypatch):
  """Step 2 overflows (see below) and is not a logging step, so its count is read one step
  late; a stop signal before step 3 checkpoints at step 2 and writes step 2's record first
  (it was lost: "every non-finite step is logged")."""
  import signal
  import time
  cfg = tiny_config(train={"learning_rate": 1e30, "warmup_steps": 0, "grad_clip": 1e30,
                           "pretrain_steps": 8, "max_nonfinite": 3, "log_every": 100},
                    checkpoint={"every": 100, "async_save": False}, data={"eval": ""})
  real = run.Prefetch.get

  def get(self, step):
    if step == 2:  # after step 2, before step 3
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.05)
    return real(self, step)

  monkeypatch.setattr(run.Prefetch, "get", get)
  assert app.train_and_evaluate(cfg, tmp_path / "w") == 128 + signal.SIGTERM
  records = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text()
             .splitlines() if '"event"' not in line]
  assert [(r["step"], r["nonfinite"]) for r in records] == [(2, 1)]
  assert [p.name for p in (tmp_path / "w" / "checkpoints").glob("[0-9]*")] == ["2"]


@pytest.mark.parametrize("max_nonfinite", [1, 3])
def test_non_finite_steps_read_one_step_late_still_stop_the_run_at_the_right_step(
    tmp_path, capsys, max_nonfinite):
  """The loop reads the count of non-finite steps one step late while steps are finite (and at
  once at logging and checkpoint steps): a run whose steps overflow from its second on (the
  first Adam update, at most lr = 1e30 per entry, leaves the parameters finite; at the next
  step a product of two such weights, e.g. an attention score, is ~1e60, past float32's
  3.4e38, on any CPU) stops naming the step where
  the count reached train.max_nonfinite, and keeps no checkpoint."""
  cfg = tiny_config(train={"learning_rate": 1e30, "warmup_steps": 0, "grad_clip": 1e30,
                           "pretrain_steps": 8, "max_nonfinite": max_nonfinite,
                           "log_every": 100},
                    checkpoint={"every": 100}, data={"eval": ""})
  code = app.train_and_evaluate(cfg, tmp_path / "w")
  err = capsys.readouterr().err
  assert code == 1, err
  assert (f"train.max_nonfinite: {max_nonfinite} non-finite steps in a row at step "
          f"{max_nonfinite + 1};") in err
  assert not list((tmp_path / "w" / "checkpoints").glob("[0-9]*"))
  # Every non-finite step that ran has its record, the first one too (read late, logged late).
  # At 1 the stop is read one step late: step 3 ran (non-finite too) before it.
  ran = max_nonfinite + (max_nonfinite == 1)
  records = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text()
             .splitlines() if '"event"' not in line]
  assert [r["step"] for r in records] == list(range(2, ran + 2))
  assert [r["nonfinite"] for r in records] == list(range(1, ran + 1))
