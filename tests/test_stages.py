"""Training stages: the plan, the joined schedule, and a new stage run without touching run.py."""

from __future__ import annotations

import json

import optax
import pytest

from onn_jax import run, stages, steps

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
