"""Training stages: the plan, the joined schedule, and a new stage run without touching run.py."""

from __future__ import annotations

import json

import optax
import pytest

from onn_jax import config, run, stages, steps

from conftest import tiny_config


def test_plan_skips_empty_stages_and_finds_the_stage_of_each_step():
  cfg = tiny_config(train={"pretrain_steps": 3, "eavi_steps": 2})
  assert [(s.stage.name, s.start, s.length) for s in stages.plan(cfg)] == [
      ("pretrain", 0, 3), ("eavi", 3, 2)]
  assert [stages.stage_at(cfg, i).name for i in range(5)] == ["pretrain"] * 3 + ["eavi"] * 2
  with pytest.raises(ValueError, match="step 5 is past the run's 5 steps"):
    stages.stage_at(cfg, 5)
  eavi_only = tiny_config(train={"pretrain_steps": 0, "eavi_steps": 2})
  assert [s.stage.name for s in stages.plan(eavi_only)] == ["eavi"]
  assert stages.stage_at(eavi_only, 0).name == "eavi"


def test_an_interleaving_stage_takes_every_kth_step_of_the_earlier_spans():
  """train.eavi_every=3: run steps 2, 5, 8 of the 10 teacher-forcing steps are EAVI steps, then
  EAVI's own span; the plan (spans and total) is unchanged, and 0 is the two-stage run."""
  every = tiny_config(train={"pretrain_steps": 10, "eavi_steps": 2, "eavi_every": 3})
  names = [stages.stage_at(every, i).name for i in range(12)]
  assert [i for i, name in enumerate(names) if name == "eavi"] == [2, 5, 8, 10, 11]
  plain = config.replace(every, train={"eavi_every": 0})
  assert stages.plan(every) == stages.plan(plain)
  assert [stages.stage_at(plain, i).name for i in range(12)] == ["pretrain"] * 10 + ["eavi"] * 2
  # Without a stage of its own EAVI still interleaves; past the run there is no step.
  no_stage = config.replace(every, train={"eavi_steps": 0})
  assert [stages.stage_at(no_stage, i).name for i in (2, 3, 8, 9)] == [
      "eavi", "pretrain", "eavi", "pretrain"]
  with pytest.raises(ValueError, match="step 10 is past the run's 10 steps"):
    stages.stage_at(no_stage, 10)


def test_an_interleaved_step_takes_the_learning_rate_in_force():
  """The schedule does not change with eavi_every: an interleaved EAVI step runs at the
  pre-training rate of its step, not at EAVI's own warmup."""
  kwargs = dict(train={"pretrain_steps": 10, "eavi_steps": 4, "warmup_steps": 2,
                       "learning_rate": 1e-2},
                eavi={"learning_rate": 1e-4, "warmup_steps": 2})
  every = tiny_config(**{**kwargs, "train": {**kwargs["train"], "eavi_every": 3}})
  pretrain = steps.warmup_cosine(1e-2, 2, 10, every.train.min_lr_ratio)
  lr, lr_plain = steps.learning_rate_schedule(every), steps.learning_rate_schedule(
      tiny_config(**kwargs))
  for i in (2, 5, 8):
    assert stages.stage_at(every, i).name == "eavi"
    assert float(lr(i)) == pytest.approx(float(pretrain(i))) and float(lr(i)) > 1e-3
  assert [float(lr(i)) for i in range(14)] == [float(lr_plain(i)) for i in range(14)]


def test_schedule_restarts_with_each_stage():
  cfg = tiny_config(train={"pretrain_steps": 10, "eavi_steps": 10, "warmup_steps": 2,
                           "learning_rate": 1e-2},
                    eavi={"learning_rate": 1e-4, "warmup_steps": 4})
  lr = steps.learning_rate_schedule(cfg)
  assert float(lr(0)) == 0.0 and float(lr(2)) == pytest.approx(1e-2)
  assert float(lr(10)) == 0.0  # EAVI's own warmup starts from zero at its first step
  assert float(lr(14)) == pytest.approx(1e-4)


def test_a_registered_stage_runs_after_the_others(tmp_path, monkeypatch):
  """A third stage takes its steps, its schedule and its name in the metrics: nothing in the
  training loop names it."""
  def probe_step(state, batch, **kwargs):
    state, metrics = steps.train_step(state, batch, **kwargs)
    return state, {**metrics, "probe": 1.0}

  probe = stages.Stage(name="probe", step=probe_step, num_steps=lambda cfg: 2,
                       schedule=lambda cfg: optax.constant_schedule(0.5))
  monkeypatch.setitem(stages._REGISTRY, "probe", probe)
  with pytest.raises(ValueError, match="already registered"):
    stages.register(stages.Stage("probe", probe_step, probe.num_steps, probe.schedule))
  cfg = tiny_config(train={"pretrain_steps": 2, "eavi_steps": 0, "log_every": 1,
                           "batch_size": 4},
                    data={"buckets": [128], "max_train_tasks": 10})
  result = run.train(cfg, tmp_path, log=lambda *_: None)
  assert result.step == result.total == 4 and result.finished
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  logged = [r for r in records if "event" not in r]
  assert [r["stage"] for r in logged] == ["pretrain", "pretrain", "probe", "probe"]
  assert [r.get("probe") for r in logged] == [None, None, 1.0, 1.0]
  assert [r["lr"] for r in logged[2:]] == [0.5, 0.5]


def test_eavi_every_mixes_unpacked_eavi_steps_into_packed_pretraining(tmp_path, monkeypatch,
                                                                       capsys):
  """train.eavi_every=2 with data.pack: every second step is an EAVI step on an unpacked batch,
  logged as "eavi" with EAVI's metrics at the pre-training rate; each step compiles once."""
  cfg = tiny_config(train={"pretrain_steps": 4, "eavi_steps": 1, "eavi_every": 2,
                           "log_every": 1, "batch_size": 4},
                    data={"buckets": [128], "max_train_tasks": 10, "pack": True})
  packed = {}
  batch_at = run.batch_at

  def recording_batch_at(cfg, stream, step):
    batch = batch_at(cfg, stream, step)
    packed[step] = "segment_start" in batch
    return batch

  monkeypatch.setattr(run, "batch_at", recording_batch_at)
  result = run.train(cfg, tmp_path, log=lambda *_: None)
  assert result.finished and result.step == 5
  assert packed == {0: True, 1: False, 2: True, 3: False, 4: False}
  assert [l for l in capsys.readouterr().out.splitlines() if l.startswith("compiling")] == [
      "compiling pretrain steps (buckets 128)",
      "compiling eavi steps (buckets 128) in the background"]
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["stage"]) for r in records] == [
      (1, "pretrain"), (2, "eavi"), (3, "pretrain"), (4, "eavi"), (5, "eavi")]
  assert [("free_token_acc" in r) for r in records] == [False, True, False, True, True]
  lr = steps.learning_rate_schedule(cfg)
  pretrain = steps.warmup_cosine(cfg.train.learning_rate, cfg.train.warmup_steps, 4,
                                 cfg.train.min_lr_ratio)
  for r in records:  # a record's step counts the steps taken: it logs run step r["step"] - 1
    assert r["lr"] == pytest.approx(float(lr(r["step"] - 1)))
  assert records[3]["lr"] == pytest.approx(float(pretrain(3)))
