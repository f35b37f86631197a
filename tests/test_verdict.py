"""The EAVI verdict study (onn_jax/analysis/verdict.py, python -m train.eavi_verdict): equal-time
step plans, the table and sentence, and a tiny end-to-end study."""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import pytest

from onn_jax import config, output, stages
from onn_jax.analysis import TINY_OVERRIDES
from onn_jax.analysis.verdict import STUDY_KEYS

# The tiny sizes without the settings a study makes itself (said not to be used when given).
OWN_OVERRIDES = tuple(o for o in TINY_OVERRIDES if o.split("=", 1)[0] not in STUDY_KEYS
                      or o.startswith("train.pretrain_steps="))
from onn_jax.analysis.verdict import Plan, markdown, plan_arm, step_seconds, summarise
from train import eavi_verdict

from conftest import tiny_config


def _cost(plan: Plan, ratio: float) -> float:
  n_tf, n_eavi = plan.counts()
  return n_tf + ratio * n_eavi


@pytest.mark.parametrize("ratio", [1.6, 4.7, 5.74, 12.0])
@pytest.mark.parametrize("share", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("mixed", [False, True])
def test_eavi_plans_spend_the_budget_with_the_asked_share(ratio, share, mixed):
  """Every plan costs the budget up to rounding (one step of each kind; the mixed plan's step
  count rounds to one step, its interleave k to the nearest integer), with EAVI's share of the
  time near the one asked."""
  budget = 1000
  plan = plan_arm(mixed, True, budget, share, ratio)
  n_tf, n_eavi = plan.counts()
  cost = _cost(plan, ratio)
  if mixed:
    k = plan.every
    # k is round(1 + r (1 - f) / f): EAVI's share r / (k - 1 + r) is off by at most the
    # rounding of k (half a step of k either way).
    exact_k = 1 + ratio * (1 - share) / share
    assert abs(k - exact_k) <= 0.5 or k == 2
    assert abs(cost - budget) <= ratio + 1
    assert plan.eavi == 0 and n_eavi == plan.pretrain // k
  else:
    assert abs(cost - budget) <= ratio / 2 + 0.5 + 1e-9
    assert abs(ratio * n_eavi / cost - share) <= ratio / cost
  assert _cost(plan_arm(mixed, False, budget, share, ratio), ratio) == budget
  # A cost no plan can take (the interval between EAVI steps beyond floats) is one line.
  with pytest.raises(config.ConfigError, match="plans no run"):
    plan_arm(mixed, True, budget, 0.1, 1.7e308)


@pytest.mark.parametrize("plan", [Plan(10, 3), Plan(11, 0, 3), Plan(9, 2, 4), Plan(5, 0)])
def test_plan_counts_match_the_stages_the_run_takes(plan):
  """Plan.counts (what the study charges) equals the steps the training loop gives each stage
  (stages.stage_at with the plan's config keys), for every prefix of the run."""
  cfg = tiny_config(train={"pretrain_steps": plan.pretrain, "eavi_steps": plan.eavi,
                           "eavi_every": plan.every})
  names = [stages.stage_at(cfg, i).name for i in range(plan.pretrain + plan.eavi)]
  for upto in range(len(names) + 1):
    assert plan.counts(upto) == (names[:upto].count("pretrain"), names[:upto].count("eavi"))


def _record(arm, seed, heldout, acc):
  scores = {f"{s}_{m}": {"score": heldout if s == "heldout" else 0.0}
            for s in ("heldout", "eval") for m in ("greedy", "augscore")}
  return {"arm": arm, "seed": seed, "plan": {"pretrain": 8, "eavi": 1, "every": 0},
          "train_s": 1.0, "measured_train_s": 2.0, "budget_frac": 1.0, "scores": scores,
          "curve": [{"step": 4, "budget_frac": 0.5, "token_accuracy": 0.0, "exact_match": 0.0},
                    {"step": 9, "budget_frac": 1.0, "token_accuracy": acc,
                     "exact_match": 0.0}],
          "params": 1234, "tasks": {"train": 7, "heldout": 7, "eval": 3}, "machine": "cpu x 1"}


def test_the_sentence_says_better_or_worse_only_beyond_the_seed_spread():
  records = ([_record("tf", s, h, 0.5) for s, h in enumerate((0.10, 0.12, 0.11))]
             + [_record("soft", s, h, a) for s, (h, a) in
                enumerate(((0.20, 0.50), (0.21, 0.52), (0.22, 0.48)))]
             + [_record("argmax", s, h, 0.3) for s, h in enumerate((0.00, 0.30, 0.10))])
  verdict = summarise(records, {"ratio": 2.0, "measured": False},
                      {"config": "x", "overrides": [], "budget_tf_steps": 10,
                       "eavi_share": 0.25, "seeds": [0, 1, 2]})
  said = verdict["sentence"]
  # The scale the answer holds for comes first; the final point of each curve is compared.
  assert said.startswith("At config x (1,234 parameters; 7 training tasks; budget 10 "
                         "teacher-forcing steps; cpu x 1), against teacher forcing")
  assert "soft: held-out AugScore 21.0% vs 11.0%, better" in said
  assert "free-running token accuracy 50.0% vs 50.0%, no different" in said
  # argmax's mean (13.3%) is above tf's, but its seeds spread more than that.
  assert "argmax: held-out AugScore 13.3% vs 11.0%, no different" in said
  assert "token accuracy 30.0% vs 50.0%, worse" in said
  table = markdown(verdict)
  assert table.count("\n| ") == 4  # after the header: the separator and the three arms
  assert "| soft | 8+1 | 1.0 | 2.0 ± 0.0 |" in table and "21.0% ± 1.0%" in table
  assert "7 training tasks' held-out test outputs and 3 evaluation tasks" in table


def test_a_new_arm_is_compared_with_the_tf_runs_of_a_finished_study(tmp_path):
  """--baseline: a study without a tf arm takes the tf runs of a finished study of the same
  command (config, overrides, budget, seeds), resolved config, experts' dispatch (a study
  that did not record it ran auto dense) and machine, and its verdict
  compares with them (its scale and planned seconds its own); a study that differs in any of
  them, records no resolved config (before 2026-12-02) or has no tf arm is refused in one line;
  a study with its own tf arm does not use it."""
  from onn_jax import config
  from onn_jax.analysis.verdict import Study
  from onn_jax.parallel import platform_line
  here = platform_line(config.load("default", list(TINY_OVERRIDES)))[0]

  def study(arms, overrides=TINY_OVERRIDES, baseline=tmp_path / "old", **kw):
    return Study(out=tmp_path / "new", base=config.load("default", [*overrides,
                                                                    "train.pretrain_steps=8"]),
                 overrides=overrides, config_name="default", arms=arms, baseline=baseline,
                 **kw)

  def old_study(**changes):
    runs = [{**_record("tf", s, h, 0.5), "machine": here, "code": output.code_version()}
            for s, h in enumerate((0.10, 0.12, 0.11))]
    verdict = summarise(runs, {"ratio": 2.0, "measured": False}, study(("tf",)).meta())
    (tmp_path / "old").mkdir(exist_ok=True)
    (tmp_path / "old" / "verdict.json").write_text(json.dumps({**verdict, **changes}))
    return verdict

  old = old_study()
  runs = study(("soft_parallel",)).baseline_runs()
  assert [(r["arm"], r["seed"]) for r in runs] == [("tf", 0), ("tf", 1), ("tf", 2)]
  assert old["experts"] == "dense"  # auto on the CPU
  data = json.loads((tmp_path / "old" / "verdict.json").read_text())
  data.pop("experts")  # before 2026-12-04: auto ran dense everywhere
  (tmp_path / "old" / "verdict.json").write_text(json.dumps(data))
  assert len(study(("soft_parallel",)).baseline_runs()) == 3
  said = []
  assert study(("tf", "soft_parallel"), log=said.append).baseline_runs() == [] and said
  # The whole study (its runs stubbed): the verdict holds the baseline's tf runs beside its own.
  s = study(("soft_parallel",), ratio=1.5, log=lambda *_: None)
  s.run_one = lambda arm, seed, plan, calib: {**_record(arm, seed, 0.2 + seed / 100, 0.6),
                                              "machine": "this study's",
                                              "code": output.code_version()}
  verdict = s.run()
  assert [(arm, len(e["runs"])) for arm, e in verdict["arms"].items()] == [("tf", 3),
                                                                           ("soft_parallel", 3)]
  saved = json.loads((tmp_path / "new" / "verdict.json").read_text())
  assert saved["baseline"] == str(tmp_path / "old") and saved["scale"]["machine"] == "this study's"
  assert saved["code"] == [output.code_version()]
  assert "soft_parallel: held-out AugScore 21.0% vs 11.0%, better" in saved["sentence"]
  assert f"tf: the runs of the study {tmp_path / 'old'}." in (tmp_path / "new" / "verdict.md"
                                                               ).read_text()
  # Refusals, each naming what differs.
  for changes, culprit in (({"seeds": [0]}, "its study has seeds=[0], this one [0, 1, 2]"),
                           ({"budget_tf_steps": 9}, "budget_tf_steps=9"),
                           ({"overrides": list(TINY_OVERRIDES)[1:]}, "overrides="),
                           ({"experts": "tiled"}, "its study has experts='tiled', this one "
                                                   "'dense'"),
                           ({"base_config": None}, "does not record its resolved config")):
    old_study(**changes)
    if changes.get("base_config", 0) is None:
      data = json.loads((tmp_path / "old" / "verdict.json").read_text())
      data.pop("base_config")
      (tmp_path / "old" / "verdict.json").write_text(json.dumps(data))
    with pytest.raises(config.ConfigError, match=re.escape(culprit)):
      study(("soft_parallel",)).baseline_runs()
  resolved = study(("tf",)).meta()["base_config"]  # a default changed since: named by its key
  old_study(base_config={**resolved, "data": {**resolved["data"], "loss_on": "outputs"}})
  with pytest.raises(config.ConfigError, match=r"its study has data\.loss_on='outputs', this "
                     r"one 'answer'"):
    study(("soft_parallel",)).baseline_runs()
  old_study(arms={"soft": old["arms"]["tf"]})
  with pytest.raises(config.ConfigError, match="has no tf arm"):
    study(("soft_parallel",)).baseline_runs()
  (tmp_path / "old" / "verdict.json").write_text(json.dumps(
      {**old, "arms": {"tf": {"runs": [{**r, "machine": "gpu x 8"} for r in old["arms"]["tf"]
                                       ["runs"]]}}}))
  with pytest.raises(config.ConfigError, match="its tf runs ran on .'gpu x 8'."):
    study(("soft_parallel",)).baseline_runs()
  # Its tf runs' code: another version (or none recorded, before 2026-12-04) only with any_code.
  for code, culprit in (("0123456789ab", "its tf runs were by other code (version "
                                         "0123456789ab), this is"),
                        (None, "its tf runs were before code versions were recorded")):
    (tmp_path / "old" / "verdict.json").write_text(json.dumps(
        {**old, "arms": {"tf": {"runs": [{k: v for k, v in {**r, "code": code}.items()
                                          if v is not None} for r in old["arms"]["tf"]["runs"]]}}}))
    with pytest.raises(config.ConfigError, match=re.escape(culprit)):
      study(("soft_parallel",)).baseline_runs()
    assert len(study(("soft_parallel",), any_code=True, log=lambda *_: None).baseline_runs()) == 3
  with pytest.raises(config.ConfigError, match="no finished study there"):
    study(("soft",), baseline=tmp_path / "nowhere").baseline_runs()


def test_step_seconds_count_only_plain_steps_and_a_redone_step_once(tmp_path):
  """A step that compiled, the step after a checkpoint save and a step that reset experts are
  not a step's cost; after a resume the redone step's later record stands; a mixed run's steps
  keep their own stage."""
  rows = [{"step": 1, "stage": "pretrain", "step_s": 9.0, "compiled_steps": 1},
          {"step": 2, "stage": "pretrain", "step_s": 1.0, "compiled_steps": 0},
          {"step": 3, "stage": "eavi", "step_s": 8.0, "compiled_steps": 1},
          {"step": 4, "stage": "pretrain", "step_s": 5.0, "compiled_steps": 0},
          {"event": "reset", "step": 4, "layer": 0, "experts": []},
          {"step": 4, "stage": "pretrain", "step_s": 2.0, "compiled_steps": 0},  # resumed
          {"step": 5, "stage": "eavi", "step_s": 3.0, "compiled_steps": 0},
          {"step": 6, "stage": "pretrain", "step_s": 4.0, "compiled_steps": 0},
          {"step": 7, "stage": "pretrain", "step_s": 6.0, "compiled_steps": 0}]
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert step_seconds(path) == {"pretrain": [1.0, 2.0, 4.0, 6.0], "eavi": [3.0]}
  # Saves after steps 3 and 6 (steps 4 and 7 pay for them); resets at steps 3 and 6.
  assert step_seconds(path, save_every=3) == {"pretrain": [1.0, 4.0], "eavi": [3.0]}
  assert step_seconds(path, reset_every=3) == {"pretrain": [1.0, 2.0, 6.0], "eavi": [3.0]}


def test_runs_are_scored_without_test_time_training_unless_asked(tmp_path):
  """arc1 turns TTT on for its evaluation; a verdict compares training, so its runs score
  without it, unless the study's overrides ask for it. Its runs compile no stage in the
  background, whatever the overrides say (it would slow the steps the study times)."""
  from onn_jax import config
  from onn_jax.analysis.verdict import Study
  plan = plan_arm(False, False, 10, 0.25, 2.0)
  base = config.load("arc1")
  assert base.ttt.steps > 0
  for overrides, steps in (((), 0), (("ttt.steps=3",), 3)):
    study = Study(out=tmp_path, base=base, overrides=(*overrides, "train.background_compile=true"),
                  config_name="arc1")
    cfg = study.run_config("tf", 0, plan)
    assert cfg.ttt.steps == steps and not cfg.train.background_compile


def test_parallel_rollout_arms_are_calibrated_on_their_own(tmp_path):
  """An arm with eavi.rollout=parallel is charged its own measured EAVI cost: a calibration
  run of its own (the cached one, written before rollouts had their own, stands for the
  config's sequential rollout), its plan spends the budget at that cost, and the manifest
  records both costs. The calibration compiles EAVI's step when EAVI starts, not in the
  background while its teacher-forcing steps are timed."""
  from onn_jax import config
  from onn_jax.analysis.verdict import Study
  # (train.run_steps, slices of the study's runs, does not cut the calibration's runs short:
  # it had no EAVI step to time, a KeyError)
  overrides = (*TINY_OVERRIDES, "train.pretrain_steps=8", "parallel.mode=single",
               "train.run_steps=2")
  study = Study(out=tmp_path, base=config.load("default", list(overrides)), overrides=overrides,
                config_name="default", arms=("tf", "soft", "soft_parallel"),
                calibration_steps=3, log=lambda *_: None)
  assert [study.rollout(arm) for arm in study.arms] == ["sequential", "sequential", "parallel"]
  (tmp_path / "calibration.json").write_text(json.dumps({"ratio": 2.0, "measured": False}))
  calib = study.calibrate()
  assert not (tmp_path / "calibration").exists() and (tmp_path / "calibration_parallel").is_dir()
  saved = config.load(str(tmp_path / "calibration_parallel" / "config.yaml"), saved_run=True)
  assert saved.eavi.rollout == "parallel" and not saved.train.background_compile
  assert calib["ratios"]["sequential"] == 2.0 and calib["ratios"]["parallel"] > 0
  assert study.calibrate() == calib == json.loads((tmp_path / "calibration.json").read_text())
  plans = study.plans(calib)
  for arm, kind in (("soft", "sequential"), ("soft_parallel", "parallel")):
    assert study.arm_ratio(arm, calib) == calib["ratios"][kind]
    assert plans[arm] == plan_arm(False, True, 8, study.share, calib["ratios"][kind])
  study.check_manifest(calib)
  assert json.loads((tmp_path / "study.json").read_text())["ratios"] == calib["ratios"]
  # A run keeps every checkpoint: one saved by a slice's stop (or a signal) off the probes'
  # steps must not rotate a probe's out.
  cfg = study.run_config("soft", 0, plans["soft"])
  assert cfg.checkpoint.keep > plans["soft"].pretrain + plans["soft"].eavi


def test_custom_arms_train_the_budget_over_their_own_step_cost(tmp_path):
  """--arm: a teacher-forcing arm with overrides of the user's. It calibrates its own
  teacher-forcing step (a short run, cached while its overrides stay; an arm that only changes
  the evaluation is charged 1 untimed) and trains ``budget / cost`` steps, its runs take its
  overrides, and the manifest records it; a folder's study with other --arm arms is refused
  before anything runs; with a given --ratio it is charged as teacher forcing. A study
  without EAVI arms times no EAVI step; an EAVI arm that joins its folder later times its
  own, and teacher forcing's step stays the one the costs are relative to."""
  from onn_jax import config
  from onn_jax.analysis.verdict import Study
  overrides = (*TINY_OVERRIDES, "train.pretrain_steps=8", "parallel.mode=single")
  custom = {"wide": ("model.expert_hidden=64",), "outputs": ("data.loss_on=outputs",),
            "ttt": ("ttt.steps=2", "eval.color_perms=1")}
  def make(**kw):
    return Study(out=tmp_path, base=config.load("default", list(overrides)),
                 overrides=overrides, config_name="default",
                 arms=kw.pop("arms", ("tf", "wide", "outputs", "ttt")),
                 custom=kw.pop("custom", custom),
                 calibration_steps=3, log=lambda *_: None, **kw)
  given = make(ratio=2.0).calibrate()
  assert given["costs"] == {"wide": 1.0, "outputs": 1.0, "ttt": 1.0}
  assert make(ratio=2.0).plans(given)["wide"] == Plan(8, 0)
  study = make()
  assert not study.is_eavi("wide") and study.is_eavi("soft") and not study.is_eavi("tf")
  calib = study.calibrate()
  assert (tmp_path / "calibration_arm_wide").is_dir() and not (tmp_path / "calibration_arm_tf"
                                                                ).exists()
  assert calib["ratio"] is None and calib["ratios"] == {} and calib["tf_step_s"] > 0
  assert (tmp_path / "calibration_tf").is_dir() and not (tmp_path / "calibration").exists()
  tf_only = [json.loads(line) for line in
             (tmp_path / "calibration_tf" / "metrics.jsonl").read_text().splitlines()]
  assert {r["stage"] for r in tf_only if "stage" in r} == {"pretrain"}
  assert study.arm_ratio("tf", calib) == study.arm_ratio("wide", calib) == 0.0
  table = markdown(summarise([_record("tf", 0, 0.1, 0.5)], calib, study.meta()))
  assert f"teacher-forcing step {calib['tf_step_s'] * 1e3:.0f} ms (no EAVI arm timed)" in table
  assert set(calib["costs"]) == {"wide", "outputs", "ttt"} and calib["costs"]["ttt"] == 1.0
  assert all(c > 0 for c in calib["costs"].values())
  assert not (tmp_path / "calibration_arm_ttt").exists()
  timed = tmp_path / "calibration_arm_wide" / "metrics.jsonl"
  stamp = timed.stat().st_mtime_ns
  assert study.calibrate() == calib and timed.stat().st_mtime_ns == stamp  # cached
  # Other overrides under the same name are timed again.
  again = make(custom={**custom, "wide": ("model.expert_hidden=48",)}).calibrate()
  assert again["cost_overrides"]["wide"] == ["model.expert_hidden=48"]
  assert timed.stat().st_mtime_ns != stamp
  calib = {**calib, "costs": {"wide": 2.0, "outputs": 1.0, "ttt": 1.0}}  # as if measured so
  plans = study.plans(calib)
  assert (plans["tf"], plans["wide"], plans["outputs"]) == (Plan(8, 0), Plan(4, 0), Plan(8, 0))
  cfg = study.run_config("wide", 1, plans["wide"])
  assert cfg.model.expert_hidden == 64 and cfg.train.pretrain_steps == 4 and cfg.train.seed == 1
  assert study.run_config("tf", 1, plans["tf"]).model.expert_hidden != 64
  study.check_manifest(calib)
  manifest = json.loads((tmp_path / "study.json").read_text())
  assert manifest["custom"] == {k: list(v) for k, v in custom.items()}
  assert manifest["costs"] == calib["costs"]
  other = make(custom={"wide": ("model.expert_hidden=48",)})
  with pytest.raises(config.ConfigError, match="other --arm arms"):
    other.run()
  # Another command is refused before its calibration caches anything in the folder.
  cached = (tmp_path / "calibration.json").read_text()
  stray = Study(out=tmp_path, base=config.load("default", [*overrides, "train.warmup_steps=2"]),
                overrides=(*overrides, "train.warmup_steps=2"), config_name="default",
                arms=("tf", "wide", "outputs", "ttt", "soft"), custom=custom,
                calibration_steps=3, log=lambda *_: None)
  with pytest.raises(config.ConfigError, match="study has overrides="):
    stray.run()
  assert (tmp_path / "calibration.json").read_text() == cached
  assert not (tmp_path / "calibration").exists()
  # An EAVI arm joins the folder's study: its step is timed, the rest is kept.
  joined = make(arms=("tf", "wide", "outputs", "ttt", "soft"))
  grown = joined.calibrate()
  assert grown["ratio"] == grown["ratios"]["sequential"] > 0 and grown["eavi_step_s"] > 0
  assert grown["tf_step_s"] == again["tf_step_s"] and (tmp_path / "calibration").is_dir()
  joined.check_manifest({**grown, "costs": calib["costs"]})
  assert json.loads((tmp_path / "study.json").read_text())["ratio"] == grown["ratio"]
  with pytest.raises(config.ConfigError, match="study has ratio="):
    joined.check_manifest({**grown, "costs": calib["costs"], "ratio": 9.0})
  # Its table shows the EAVI run's own two steps, whose quotient is the ratio.
  table = markdown(summarise([_record("tf", 0, 0.1, 0.5)], grown, joined.meta()))
  assert (f"EAVI step = {grown['ratio']:.2f} teacher-forcing steps "
          f"({grown['eavi_step_s'] * 1e3:.0f} / {grown['eavi_run_tf_step_s'] * 1e3:.0f} ms)"
          ) in table
  # A given --ratio means nothing to a study without EAVI arms.
  given = make(ratio=2.0, custom={}, arms=("tf",)).calibrate()
  assert given["ratio"] is None and given["ratios"] == {}
  assert "no EAVI arm;" in markdown(summarise([_record("tf", 0, 0.1, 0.5)], given,
                                              study.meta()))


def test_a_folder_timed_with_background_compilation_is_refused(tmp_path):
  """A calibration measured before studies turned background compilation off (no "measure" in
  its calibration.json), or a study.json written then, is refused rather than mixed in."""
  from onn_jax import config
  from onn_jax.analysis.verdict import Study
  study = Study(out=tmp_path, base=config.load("default", list(TINY_OVERRIDES)),
                overrides=TINY_OVERRIDES, config_name="default", arms=("tf", "soft"),
                log=lambda *_: None)
  old = {"tf_step_s": 0.93, "eavi_step_s": 0.88, "ratio": 0.95, "measured": True}
  (tmp_path / "calibration.json").write_text(json.dumps(old))
  with pytest.raises(config.ConfigError, match="calibration.json: measured with None"):
    study.calibrate()
  (tmp_path / "calibration.json").write_text(json.dumps({**old, "measure": list(study.MEASURE),
                                                          "ratios": {"sequential": 0.95},
                                                          "code": [output.code_version()]}))
  calib = study.calibrate()
  study.check_manifest(calib)  # a new folder: writes study.json
  manifest = json.loads((tmp_path / "study.json").read_text())
  assert manifest["measure"] == ["train.background_compile=false"]
  study.check_manifest(calib)  # the same study goes on
  # The same overrides in another order are the same study.
  Study(out=tmp_path, base=study.base, overrides=tuple(TINY_OVERRIDES)[::-1], config_name="default",
        arms=("tf", "soft"), log=lambda *_: None).check_manifest(calib)
  # Its teacher-forcing experts' dispatch: another one is refused; none recorded (before
  # 2026-12-04) was auto's dense.
  assert manifest["experts"] == "dense"
  for experts, refused in (("tiled", True), (None, False)):
    (tmp_path / "study.json").write_text(json.dumps(
        {k: v for k, v in {**manifest, "experts": experts}.items() if v is not None}))
    if refused:
      with pytest.raises(config.ConfigError, match="study has experts='tiled', this command "
                         "'dense'"):
        study.check_manifest(calib)
    else:
      study.check_manifest(calib)
  del manifest["measure"]
  (tmp_path / "study.json").write_text(json.dumps(manifest))
  with pytest.raises(config.ConfigError, match="study has measure=None"):
    study.check_manifest(calib)


def test_a_study_goes_on_only_with_the_same_resolved_config_and_given_ratio(tmp_path):
  """study.json keeps the resolved config, not only the config's name: an edited YAML file
  given by the same name is refused in one line naming the first setting that differs (it
  mixed runs of both before); a study planned with --ratio needs it again, before anything is
  calibrated (a calibration ran first, then the refusal)."""
  from onn_jax import config
  from onn_jax.analysis.verdict import Study
  path = tmp_path / "mine.yaml"
  path.write_text("train:\n  learning_rate: 0.003\n")
  make = lambda ratio=2.0: Study(out=tmp_path / "s", base=config.load(path, list(OWN_OVERRIDES)),
                                 overrides=OWN_OVERRIDES, config_name=str(path),
                                 arms=("tf", "soft"), ratio=ratio, log=lambda *_: None)
  study = make()
  study.out.mkdir()
  study.check_manifest(study.calibrate())  # writes study.json
  make().check_manifest(None)  # the same goes on
  path.write_text("train:\n  learning_rate: 0.03\n")
  with pytest.raises(config.ConfigError, match=r"study has train.learning_rate=0.003, this "
                     r"command 0.03; use another --out \(or the same arguments and config"):
    make().check_manifest(None)
  path.write_text("train:\n  learning_rate: 0.003\n")
  with pytest.raises(config.ConfigError, match="planned with --ratio 2.0; give it again"):
    make(ratio=None).check_manifest(None)
  # A --baseline that is not JSON, an --out that is a file: one line each.
  (tmp_path / "bad.json").write_text("nope")
  other = dataclasses.replace(make(), arms=("soft",), baseline=tmp_path / "bad.json")
  with pytest.raises(config.ConfigError, match="bad.json: not a study's verdict.json"):
    other.baseline_runs()
  with pytest.raises(config.ConfigError, match="bad.json: is a file, not a folder"):
    dataclasses.replace(make(), out=tmp_path / "bad.json").run()


def test_a_folder_that_other_code_wrote_is_refused_unless_asked(tmp_path):
  """study.json and calibration.json record the code versions that wrote them
  (output.code_version); another version, or a folder from before they did, is refused in one
  line, and with ``any_code`` recorded beside them; verdict.json lists the runs' versions and
  the table says when they are several."""
  from onn_jax.analysis.verdict import Study
  here = output.code_version()
  assert re.fullmatch(r"[0-9a-f]{12}", here) and output.code_version() == here
  make = lambda any_code=False: Study(
      out=tmp_path, base=config.load("default", list(TINY_OVERRIDES)),
      overrides=TINY_OVERRIDES, config_name="default", arms=("tf", "soft"), log=lambda *_: None,
      any_code=any_code)
  calib = {"tf_step_s": 0.9, "eavi_step_s": 1.8, "ratio": 2.0, "measured": True,
           "measure": list(Study.MEASURE), "ratios": {"sequential": 2.0}}
  for name in ("calibration.json", "study.json"):
    for recorded, refused in ((None, "unrecorded"), (["0123456789ab"], "0123456789ab"),
                              ([here], None)):
      for path in tmp_path.glob("*.json"):
        path.unlink()
      (tmp_path / "calibration.json").write_text(json.dumps({**calib, "code": [here]}))
      make().check_manifest(make().calibrate())  # a study.json of this code
      written = json.loads((tmp_path / name).read_text())
      assert written["code"] == [here]
      if recorded is None:
        del written["code"]
      else:
        written["code"] = recorded
      (tmp_path / name).write_text(json.dumps(written))
      if refused is None:
        make().check_manifest(make().calibrate())
        continue
      said = ("written before code versions were recorded" if refused == "unrecorded" else
              f"written by other code (version {refused})")
      with pytest.raises(config.ConfigError, match=re.escape(f"{name}: {said}, this is {here}:")
                         ) as err:
        make().check_manifest(make().calibrate())
      assert "--any-code" in str(err.value) and "\n" not in str(err.value)
      study = make(any_code=True)
      study.check_manifest(study.calibrate())
      assert json.loads((tmp_path / name).read_text())["code"] == [refused, here]
  # Code that added a setting since the folder was written: its record lacks the key, which
  # reads as a saved run's (the default), so --any-code goes on; a changed value is named.
  written = json.loads((tmp_path / "study.json").read_text())
  defaults = config.to_dict(config.Config())
  sec, key = next((sec, key) for sec, values in written["base_config"].items()
                  for key, value in values.items() if value == defaults[sec][key]
                  and (sec, key) not in config.SAVED_RUN_DEFAULTS and type(value) is int)
  value = written["base_config"][sec].pop(key)
  written["code"] = ["0123456789ab"]
  (tmp_path / "study.json").write_text(json.dumps(written))
  study = make(any_code=True)
  study.check_manifest(study.calibrate())
  written["base_config"][sec][key] = value + 1
  (tmp_path / "study.json").write_text(json.dumps(written))
  with pytest.raises(config.ConfigError, match=rf"study has {sec}.{key}={value + 1}, this "
                     rf"command {value};"):
    make(any_code=True).check_manifest(None)
  # Runs of two versions (a baseline's from before 2026-12-04 would be "unrecorded").
  runs = [{**_record(arm, 0, 0.1, 0.5), "code": code}
          for arm, code in (("tf", here), ("soft", "0123456789ab"))]
  meta = {"config": "x", "overrides": [], "budget_tf_steps": 10, "eavi_share": 0.25,
          "seeds": [0]}
  verdict = summarise(runs, calib, meta)
  assert verdict["code"] == sorted([here, "0123456789ab"])
  assert f"runs of 2 versions of the code ({', '.join(verdict['code'])})" in markdown(verdict)
  one = summarise(runs[:1], calib, meta)
  assert one["code"] == [here] and "versions of the code" not in markdown(one)


def test_the_study_end_to_end(tmp_path, capsys):
  """A tiny study (one seed; teacher forcing against EAVI mixed in from the start and an arm of
  the user's, --arm, charged as teacher forcing under --ratio, with TTT): the table, the plot
  and per-run results, the curve of free-running accuracy, equal planned time, every step's
  time measured; run again, it reuses every finished run; run with another plan in the same
  folder, it refuses in one line."""
  out = tmp_path / "study"
  argv = ["--config", "default", "--out", str(out), "--seeds", "0", "--arms", "tf,soft_mixed",
          "--probes", "2", "--ratio", "2", "--arm", "outputs: data.loss_on=outputs ttt.steps=2",
          *OWN_OVERRIDES, "train.pretrain_steps=6", "parallel.mode=single"]
  assert eavi_verdict.main(argv) == 0
  verdict = json.loads((out / "verdict.json").read_text())
  assert set(verdict["arms"]) == {"tf", "soft_mixed", "outputs"}
  assert verdict["arms"]["outputs"]["runs"][0]["plan"] == {"pretrain": 6, "eavi": 0, "every": 0}
  saved = config.load(str(out / "runs" / "outputs_s0" / "config.yaml"), saved_run=True)
  assert saved.data.loss_on == "outputs" and saved.train.pretrain_steps == 6
  # Its TTT adapted each split once, and both modes scored with that adaptation.
  said = capsys.readouterr().out
  assert said.count("ttt: adapted ") == 2, said
  for split in ("heldout", "eval"):
    infos = [json.loads((out / "runs" / "outputs_s0" / f"eval_{split}_{mode}" / "scores.json")
                        .read_text())["ttt"] for mode in ("greedy", "augscore")]
    assert infos[0] == infos[1] and infos[0]["steps"] == 2
  mixed = verdict["arms"]["soft_mixed"]["runs"][0]
  # k = 1 + r (1 - f) / f = 7, and a mixed run holds at least one EAVI step: 7 steps.
  assert mixed["plan"] == {"pretrain": 7, "eavi": 0, "every": 7}
  assert [p["step"] for p in mixed["curve"]] == [4, 7]
  for arm in verdict["arms"].values():
    run = arm["runs"][0]
    assert set(run["scores"]) == {"heldout_greedy", "heldout_augscore", "eval_greedy",
                                  "eval_augscore"}
    assert run["tasks"]["heldout"] > 0
    assert abs(run["budget_frac"] - 1.0) <= 0.5
    assert run["tasks"]["heldout"] == 2  # eval.max_tasks of TINY_OVERRIDES
    assert run["measured_train_s"] > 0 and run["params"] > 0
  assert set(mixed["step_s"]) == {"pretrain"}  # its one EAVI step compiled: not a cost
  metrics = [json.loads(line) for line in
             (out / "runs" / "soft_mixed_s0" / "metrics.jsonl").read_text().splitlines()]
  steps = [r for r in metrics if "step_s" in r]
  # Every step logged, with its own stage: step 7 (the 7th, k = 7) is EAVI.
  assert [r["stage"] for r in steps] == ["pretrain"] * 6 + ["eavi"]
  assert sum(r["compiled_steps"] for r in steps) == 2
  assert (out / "verdict.md").read_text().startswith("| arm |")
  assert (out / "verdict.png").stat().st_size > 0
  files = [out / "runs" / "tf_s0" / name for name in ("result.json", "metrics.jsonl")]
  stamps = [f.stat().st_mtime_ns for f in files]
  assert eavi_verdict.main(argv) == 0
  assert [f.stat().st_mtime_ns for f in files] == stamps  # nothing retrained
  # A folder that other code wrote: refused in one line, or gone on with --any-code.
  manifest = json.loads((out / "study.json").read_text())
  (out / "study.json").write_text(json.dumps({**manifest, "code": ["0123456789ab"]}))
  capsys.readouterr()
  assert eavi_verdict.main(argv) == 1
  err = capsys.readouterr().err.strip()
  assert "written by other code (version 0123456789ab), this is" in err and "\n" not in err
  assert eavi_verdict.main([*argv, "--any-code"]) == 0
  assert [f.stat().st_mtime_ns for f in files] == stamps
  assert json.loads((out / "study.json").read_text())["code"] == ["0123456789ab",
                                                                  output.code_version()]
  capsys.readouterr()
  at = argv.index("--ratio") + 1
  assert eavi_verdict.main(argv[:at] + ["3"] + argv[at + 1:]) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "study.json" in err and "ratio=2.0" in err
  assert "\n" not in err


@pytest.mark.parametrize("args, culprit", [
    (["--arms", "tf,bogus"], "--arms: unknown ['bogus']"),
    (["--eavi-share", "1.0"], "--eavi-share"),
    (["--seeds", "a,b"], "--seeds: 'a,b' is not a comma-separated list of integers"),
    (["model.d_model=-1"], "model.d_model"),
    (["--arm", "paper"], "--arm 'paper': expected 'NAME: section.key=value ...'"),
    (["--arm", "paper: "], "expected 'NAME: section.key=value ...'"),
    (["--arm", "soft: data.loss_on=outputs"], "the name 'soft' is taken"),
    (["--arm", "a: data.loss_on=outputs", "--arm", "a: data.loss_on=answer"], "'a' is taken"),
    (["--arm", "a: data.loss_on"], "'data.loss_on' is not section.key=value"),
    (["--arm", "a: data.loss_on=everything"], "'everything' is not one of answer, outputs"),
    (["--arm", "a: train.pretrain_steps=5"], "'train.pretrain_steps=5' is set by the study"),
    (["--seeds", "0,1,0"], "--seeds: '0,1,0' must name distinct seeds"),
    (["--seeds", "-1"], "must name distinct seeds >= 0"),
    (["--ratio", "0"], "--ratio: an EAVI step's cost in teacher-forcing steps must be a finite"),
    (["--ratio", "inf"], "must be a finite positive number, got inf"),
    (["--eavi-share", "1e-320"], "--eavi-share: must lie in (0, 1)"),
    (["--max-runs", "-1"], "--max-runs: must be >= 0"),
    # TTT's parameter selection fails before any run, not after the arms before it trained.
    (["--arm", 'x: ttt.steps=1 ttt.params=["*/atn/*"]'], "ttt.params: '*/atn/*' matches no"),
])
def test_bad_study_arguments_fail_in_one_line(tmp_path, capsys, args, culprit):
  assert eavi_verdict.main(["--out", str(tmp_path / "s"), *args]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("config error:") and culprit in err and "\n" not in err
  assert not (tmp_path / "s").exists()


@pytest.mark.skipif(jax.device_count() != 8, reason="needs the suite's 8 host devices")
def test_a_run_that_cannot_start_fails_in_one_line(tmp_path, capsys):
  """A config that loads but cannot train here (a batch that does not split over the 8 host
  devices of the suite) is one line and exit 1, as train.main says it."""
  assert eavi_verdict.main(["--out", str(tmp_path / "s"), "--ratio", "2", *TINY_OVERRIDES,
                            "train.batch_size=3", "parallel.mode=shard_map"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("error: train.batch_size: 3 does not divide evenly")
  # Settings the study makes for every run, given as overrides, are said not to be used.
  assert err[0].startswith("warning: train.eavi_steps=0 train.log_every=2 checkpoint.every=100 "
                           "checkpoint.async_save=false: not used; the study sets them")
