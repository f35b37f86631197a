"""Does EAVI help? Teacher forcing alone against teacher forcing + EAVI at equal training time.

The study behind ``python -m train.eavi_verdict`` (protocol in DESIGN.md terms):

1. **Calibration.** A short run of the config (teacher forcing, then EAVI, every step logged)
   on this machine gives the mean seconds of a teacher-forcing step ``t_tf`` and of an EAVI
   step ``t_eavi``, over the steps that did not compile (the first step of each stage and
   bucket compiles; no stage compiles in the background while another is timed:
   ``Study.MEASURE``); ``r = t_eavi / t_tf``. Arms whose EAVI decodes its excursion another way
   (``eavi.rollout``: the ``*_parallel`` arms) get their own calibration run and ``r``. A
   study without EAVI arms times teacher forcing alone (no ``r``).
2. **Arms at equal time.** The budget is ``N`` teacher-forcing steps (``train.pretrain_steps``
   of the config). The ``tf`` arm trains N teacher-forcing steps. A second-stage EAVI arm
   spends the share ``f`` of the time on EAVI: ``(1 - f) N`` teacher-forcing steps, then
   ``f N / r`` EAVI steps. The mixed arm (``train.eavi_every = k``, EAVI from the start, at the
   pre-training learning rate) takes ``k = round(1 + r (1 - f) / f)`` and ``P = N k / (k - 1 + r)``
   steps, so that EAVI again has about the share f. Each run logs every step, so the table
   also shows the time each arm really took (its own mean step times, compilation left out).
3. **Scores.** Every run trains on its training tasks with their test pairs held out
   (``data.hold_out_train_tests``), then its final weights (never their EMA) are scored on
   those held-out test outputs and on ``data.eval`` (each the first ``eval.max_tasks`` by id;
   0: all), greedy and AugScore (official score, pass@2). Along training, checkpoints are
   decoded greedily on the held-out test pairs: the free-running answer-token accuracy and exact
   match against the fraction of the time budget spent.

Runs are resumable: a finished run's ``result.json`` is reused, an unfinished one resumes from
its checkpoints, so the study can be run in slices (``--max-runs``). ``study.json`` records the
plan's inputs; a command that differs in them is refused rather than mixed in.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import statistics
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from onn_jax import config, output, plots
from onn_jax.config import Config
from onn_jax.model import moe

# Arm name -> (config overrides, whether EAVI is mixed into pre-training from the start).
ARMS: dict[str, tuple[tuple[str, ...], bool]] = {
    "tf": ((), False),
    "soft": (("eavi.feed=soft",), False),
    "argmax": (("eavi.feed=argmax",), False),
    "sample": (("eavi.feed=sample",), False),
    "soft_exc_only": (("eavi.feed=soft", "eavi.tf_weight=0.0"), False),
    "soft_mixed": (("eavi.feed=soft",), True),
    "soft_parallel": (("eavi.feed=soft", "eavi.rollout=parallel"), False),
    "argmax_parallel": (("eavi.feed=argmax", "eavi.rollout=parallel"), False),
}
# The arms a study runs unless told (--arms): the parallel-rollout arms are asked for by name.
DEFAULT_ARMS = ("tf", "soft", "argmax", "sample", "soft_exc_only", "soft_mixed")
SPLITS = ("heldout", "eval")  # the training tasks' held-out test outputs; data.eval
MODES = ("greedy", "augscore")


# Settings every run of a study takes from the study itself (Study.run_config, MEASURE): an arm
# of the user's may not set them.
STUDY_KEYS = ("train.pretrain_steps", "train.eavi_steps", "train.eavi_every", "train.seed",
              "train.log_every", "train.background_compile", "checkpoint.every",
              "checkpoint.keep", "checkpoint.async_save", "eval.weights",
              "data.hold_out_train_tests")
# Sections that only change how a run is evaluated: an arm that sets nothing else trains as
# teacher forcing does, so its step is charged at 1 without a calibration run.
EVAL_SECTIONS = ("ttt", "eval")


def parse_custom_arms(specs: Sequence[str]) -> dict[str, tuple[str, ...]]:
  """``["NAME: key=value key=value", ...]`` (``--arm``) -> {NAME: overrides}; ConfigError in
  one line for a spec without a name or overrides, a name of a built-in arm or a repeated
  one, or a setting the study makes itself (:data:`STUDY_KEYS`)."""
  arms: dict[str, tuple[str, ...]] = {}
  for spec in specs:
    name, _, rest = spec.partition(":")
    name, overrides = name.strip(), tuple(rest.split())
    if not name or not name.replace("_", "").isalnum() or not overrides:
      raise config.ConfigError(f"--arm {spec!r}: expected 'NAME: section.key=value ...'")
    if name in ARMS or name in arms:
      raise config.ConfigError(f"--arm {spec!r}: the name {name!r} is taken")
    bad = [o for o in overrides if "=" not in o]
    if bad:
      raise config.ConfigError(f"--arm {spec!r}: {bad[0]!r} is not section.key=value")
    fixed = [o for o in overrides if o.split("=", 1)[0].strip() in STUDY_KEYS]
    if fixed:
      raise config.ConfigError(f"--arm {spec!r}: {fixed[0]!r} is set by the study for every "
                               "arm (the budget, seeds, logging and checkpoints)")
    arms[name] = overrides
  return arms


@dataclasses.dataclass(frozen=True)
class Plan:
  """Step counts of one arm: teacher-forcing steps, EAVI steps and EAVI's interleave."""
  pretrain: int
  eavi: int
  every: int = 0

  def overrides(self) -> tuple[str, ...]:
    return (f"train.pretrain_steps={self.pretrain}", f"train.eavi_steps={self.eavi}",
            f"train.eavi_every={self.every}")

  def counts(self, upto: int | None = None) -> tuple[int, int]:
    """(teacher-forcing, EAVI) steps among the run's first ``upto`` steps (default all)."""
    total = self.pretrain + self.eavi
    upto = total if upto is None else min(upto, total)
    head = min(upto, self.pretrain)
    mixed = head // self.every if self.every else 0  # steps k-1, 2k-1, ... of pre-training
    return head - mixed, mixed + max(0, upto - self.pretrain)


def plan_arm(mixed: bool, eavi: bool, budget: int, share: float, ratio: float) -> Plan:
  """Step counts that spend ``budget`` teacher-forcing steps' worth of time, ``share`` of it on
  EAVI steps that cost ``ratio`` teacher-forcing steps each (see the module docstring)."""
  if not eavi:
    return Plan(budget, 0)
  interval = ratio * (1 - share) / share  # teacher-forcing steps between two EAVI steps
  if not math.isfinite(interval):
    raise config.ConfigError(f"an EAVI step costing {ratio} teacher-forcing steps at an EAVI "
                             f"share of {share} plans no run (--ratio, --eavi-share)")
  if mixed:
    every = max(2, round(1 + interval))
    return Plan(max(every, round(budget * (every / (every - 1 + ratio)))), 0, every)
  return Plan(round(budget * (1 - share)), max(1, round(budget * share / ratio)))


def step_seconds(metrics_path: Path, *, save_every: int = 0, reset_every: int = 0
                 ) -> dict[str, list[float]]:
  """Stage -> seconds of each of its steps that only stepped, from a run logged every step
  (``train.log_every=1``, as the study's runs are): a step that compiled, the step after a
  checkpoint save (every ``save_every``; the save falls into its interval) and a step that
  reset experts (every ``reset_every``) are left out. A step logged twice (a resumed run redoes
  the steps after its checkpoint) counts once, as its later record."""
  records, _ = plots.read_metrics(metrics_path)
  latest = {rec["step"]: rec for rec in records if "step_s" in rec}
  by_stage: dict[str, list[float]] = {}
  for step, rec in latest.items():
    saved = save_every and step > 1 and (step - 1) % save_every == 0
    reset = reset_every and step % reset_every == 0
    if not (rec.get("compiled_steps") or saved or reset):
      by_stage.setdefault(str(rec.get("stage")), []).append(float(rec["step_s"]))
  return by_stage


def mean_step_s(metrics_path: Path, cfg: Config) -> dict[str, float]:
  """Stage -> mean seconds of a step of the run of ``cfg`` (the mean, not the median: steps of
  every bucket, each as often as the run drew it, are what a run pays)."""
  seconds = step_seconds(metrics_path, save_every=cfg.checkpoint.every,
                         reset_every=cfg.train.reset_every)
  return {stage: statistics.fmean(v) for stage, v in seconds.items() if v}


@dataclasses.dataclass
class Study:
  """One verdict study: its folder, base config, budget and arms."""
  out: Path
  base: Config
  overrides: tuple[str, ...]  # applied to the config for every run (recorded)
  config_name: str
  seeds: Sequence[int] = (0, 1, 2)
  arms: Sequence[str] = DEFAULT_ARMS
  share: float = 0.25
  probes: int = 6
  ratio: float | None = None  # EAVI step / teacher-forcing step; measured when None
  log: Callable[[str], None] = print
  calibration_steps: int = 40  # of each stage
  # A finished study (its folder or verdict.json) whose ``tf`` runs stand in for a ``tf`` arm
  # this study does not run (``--baseline``): a new arm is then compared without rerunning
  # teacher forcing.
  baseline: Path | None = None
  # Arms of the user's (``--arm NAME:OVERRIDES``): teacher forcing with these overrides (an NSA
  # geometry, the loss, TTT at evaluation...), at equal time: each calibrates its own
  # teacher-forcing step and trains ``budget / cost`` steps.
  custom: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  # Go on in a folder that other code (output.code_version) wrote, recording both versions;
  # without it such a folder is refused (its runs would mix with this code's).
  any_code: bool = False

  # Every run of a study, its calibration's too, compiles each stage's steps when the stage
  # starts: compiling a later stage on a worker thread (train.background_compile) slows the
  # steps it overlaps, so the calibration would charge teacher forcing for EAVI's compilation
  # (on an H200 its teacher-forcing steps measured 154 ms instead of 70) and hand the EAVI
  # arms more than their share of the time.
  MEASURE = ("train.background_compile=false",)

  @property
  def budget(self) -> int:
    return self.base.train.pretrain_steps

  def checkpoint_every(self, plan: Plan) -> int:
    return max(1, math.ceil((plan.pretrain + plan.eavi) / self.probes))

  def spec(self, arm: str) -> tuple[tuple[str, ...], bool]:
    """(config overrides, EAVI mixed into pre-training) of ``arm``, built in or custom."""
    return ARMS[arm] if arm in ARMS else (tuple(self.custom[arm]), False)

  def is_eavi(self, arm: str) -> bool:
    return arm != "tf" and arm not in self.custom

  def run_config(self, arm: str, seed: int, plan: Plan) -> Config:
    arm_overrides, _ = self.spec(arm)
    # Every step is logged (its time, its stage, whether it compiled); the final weights are
    # scored, never their EMA (which lags the most recent steps: EAVI's, in a second stage).
    # Scoring compares training, so it runs without test-time training unless asked for.
    overrides = ["ttt.steps=0", *self.overrides, *arm_overrides, *plan.overrides()]
    return config.load(self.config_name, overrides + [*self.MEASURE,
        f"train.seed={seed}", "data.hold_out_train_tests=true", "train.log_every=1",
        "eval.weights=params", f"checkpoint.every={self.checkpoint_every(plan)}",
        # every checkpoint stays: a stop (train.run_steps slices, a signal) saves one off the
        # probes' steps, which must not rotate a probe's out
        f"checkpoint.keep={plan.pretrain + plan.eavi + 1}", "checkpoint.async_save=false"])

  # -- calibration ------------------------------------------------------------------------
  def rollout(self, arm: str) -> str:
    """The ``eavi.rollout`` of ``arm``'s runs."""
    return config.load(self.config_name, [*self.overrides, *self.spec(arm)[0]]).eavi.rollout

  def calibrate(self) -> dict[str, Any]:
    """t_tf and t_eavi on this machine: the mean of the steps of a short run (teacher forcing,
    then EAVI) that did not compile, one run for each ``eavi.rollout`` the EAVI arms take
    (``ratios``; ``ratio``: the first one's), and a short teacher-forcing run of each custom
    arm (``costs``: its step over the config's); cached in calibration.json. A given ``ratio``
    is used as it is, for every EAVI arm, and custom arms are charged as teacher forcing. A
    study without EAVI arms times teacher forcing alone (``ratio`` None until an EAVI arm
    joins the folder's study)."""
    kinds = sorted({self.rollout(arm) for arm in self.arms if self.is_eavi(arm)})
    custom = [arm for arm in self.arms if arm in self.custom]
    if self.ratio is not None:  # (a study without EAVI arms has no use for it)
      return {"ratio": self.ratio if kinds else None, "measured": False,
              "ratios": {k: self.ratio for k in kinds}, "costs": {arm: 1.0 for arm in custom}}
    path = self.out / "calibration.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    if result.get("measured") and result.get("measure") != list(self.MEASURE):
      raise config.ConfigError(
          f"{path}: measured with {result.get('measure')!r}, this study times its steps with "
          f"{list(self.MEASURE)!r} (before 2026-12-02 the calibration timed teacher forcing "
          "while EAVI compiled in the background); use another --out")
    if result and "ratios" not in result:  # cached before the rollouts had their own
      result["ratios"] = {self.base.eavi.rollout: result["ratio"]}
    if result.get("measured"):
      code = self.code_seen(path, result)
      if code != result.get("code"):
        result["code"] = code
        path.write_text(json.dumps(result, indent=1))
    n = self.calibration_steps
    if not result and not kinds:  # teacher forcing's step is all this study needs
      self.log(f"calibration: {n} teacher-forcing steps")
      mean = self._timed_run("calibration_tf", [], eavi=False)
      result = {"tf_step_s": mean["pretrain"], "eavi_step_s": None, "ratio": None,
                "measured": True, "ratios": {}, "measure": list(self.MEASURE),
                "code": [output.code_version()]}
      path.write_text(json.dumps(result, indent=1))
    for kind in kinds:
      if kind in result.get("ratios", {}):
        continue
      # The config's own rollout calibrates in calibration/ (as before the rollouts had theirs).
      self.log(f"calibration: {n} teacher-forcing then {n} EAVI steps (eavi.rollout={kind})")
      mean = self._timed_run("calibration" if kind == self.base.eavi.rollout
                             else f"calibration_{kind}", [f"eavi.rollout={kind}"], eavi=True)
      if not result:
        result = {"tf_step_s": mean["pretrain"], "ratios": {}, "measured": True,
                  "measure": list(self.MEASURE), "code": [output.code_version()]}
      if result.get("ratio") is None:  # the first EAVI kind timed (teacher forcing's step
        # stays the one timed first: the custom arms' costs are relative to it; the EAVI
        # run's own is kept beside its EAVI step)
        result.update(eavi_step_s=mean["eavi"], eavi_run_tf_step_s=mean["pretrain"],
                      ratio=mean["eavi"] / mean["pretrain"])
      result["ratios"][kind] = mean["eavi"] / mean["pretrain"]
      path.write_text(json.dumps(result, indent=1))
    for arm in custom:
      timed = result.setdefault("cost_overrides", {}).get(arm)
      if arm in result.setdefault("costs", {}) and timed == list(self.custom[arm]):
        continue
      result["cost_overrides"][arm] = list(self.custom[arm])
      if all(o.split(".", 1)[0] in EVAL_SECTIONS for o in self.custom[arm]):
        result["costs"][arm] = 1.0  # trains as teacher forcing does
        path.write_text(json.dumps(result, indent=1))
        continue
      self.log(f"calibration: {self.calibration_steps} teacher-forcing steps of arm {arm}")
      # An earlier try, or other overrides under this name: timed anew, from scratch.
      shutil.rmtree(self.out / f"calibration_arm_{arm}", ignore_errors=True)
      mean = self._timed_run(f"calibration_arm_{arm}", self.custom[arm], eavi=False)
      result["costs"][arm] = mean["pretrain"] / result["tf_step_s"]
      path.write_text(json.dumps(result, indent=1))
    return result

  def _timed_run(self, folder: str, overrides: Sequence[str], eavi: bool) -> dict[str, float]:
    """A calibration run in OUT/``folder``: ``calibration_steps`` teacher-forcing steps (then
    as many EAVI steps with ``eavi``) of the config with ``overrides``, every step logged, no
    save, reset or background compilation on the way; the mean seconds of its plain steps by
    stage."""
    from onn_jax import run
    n = self.calibration_steps
    cfg = config.load(self.config_name, [*self.overrides, *overrides] + [
        f"train.pretrain_steps={n}", f"train.eavi_steps={n if eavi else 0}",
        "train.eavi_every=0", "train.log_every=1", "checkpoint.every=100000",
        "train.reset_every=0", "train.run_steps=0", *self.MEASURE])  # timed whole
    run.train(cfg, self.out / folder, log=self.log)
    return mean_step_s(self.out / folder / "metrics.jsonl", cfg)

  def arm_ratio(self, arm: str, calib: dict) -> float:
    """What one of ``arm``'s EAVI steps costs, in teacher-forcing steps (0: an arm without
    EAVI steps)."""
    return calib["ratios"].get(self.rollout(arm), calib["ratio"]) if self.is_eavi(arm) else 0.0

  def plans(self, calib: dict) -> dict[str, Plan]:
    """Each arm's steps: EAVI arms by :func:`plan_arm`, a custom arm the budget over its cost."""
    return {arm: (Plan(max(1, round(self.budget / calib["costs"][arm])), 0) if arm in self.custom
                  else plan_arm(self.spec(arm)[1], self.is_eavi(arm), self.budget, self.share,
                                self.arm_ratio(arm, calib)))
            for arm in self.arms}

  def check_manifest(self, calib: dict | None) -> None:
    """study.json records what every run of this folder was planned with; a command that
    differs (config, overrides, budget, share, EAVI's cost, how steps are timed, the
    teacher-forcing experts' dispatch) would mix incomparable runs, and so would other code
    (:meth:`code_seen`: refused unless ``any_code``). ``calib`` None: only what
    the command itself says is checked (before the calibration, which caches what it times in
    the folder), nothing written."""
    manifest = {"config": self.config_name, "overrides": list(self.overrides),
                "budget_tf_steps": self.budget, "eavi_share": self.share,
                "probes": self.probes, "measure": list(self.MEASURE),
                "experts": moe.resolve_impl(self.base.model.moe_impl),
                # the config file's contents, not only its name (an edited YAML), as resolved
                "base_config": output.jsonable(config.to_dict(self.base))}
    custom = {arm: list(ov) for arm, ov in self.custom.items()}
    if custom:
      manifest["custom"] = custom
    if calib is not None:
      manifest["ratio"] = calib["ratio"]
      if any(kind != "sequential" for kind in calib["ratios"]):  # (older studies had none)
        manifest["ratios"] = calib["ratios"]
      if self.custom:
        manifest["costs"] = calib["costs"]
    path = self.out / "study.json"
    # (a calibration that went on with --any-code brings both versions)
    manifest["code"] = list((calib or {}).get("code") or [output.code_version()])
    if path.is_file():
      before = json.loads(path.read_text())
      seen = self.code_seen(path, before, say=calib is not None)
      manifest["code"] = seen + [c for c in manifest["code"] if c not in seen]
      before.setdefault("experts", _unrecorded_experts(self.base.model.moe_impl))
      before["base_config"] = _as_read_now(before.get("base_config", manifest["base_config"]))
      if (self.ratio is None and before.get("ratio") is not None
          and not (self.out / "calibration.json").is_file()):  # given, not measured
        raise config.ConfigError(f"{path}: this folder's study was planned with --ratio "
                                 f"{before['ratio']}; give it again to go on")
      if before.get("custom", {}) != custom:
        raise config.ConfigError(f"{path}: this folder's study has other --arm arms than "
                                 f"{custom!r}; use another --out (or the same arguments) to go "
                                 "on")
      # A study without EAVI arms timed no EAVI step: one that joins it brings its cost.
      grown = ("ratio", "ratios") if before.get("ratio") is None else ()
      differ = [k for k in manifest
                if before.get(k) != manifest[k] and k not in grown and k != "code"
                and not (k == "overrides" and _override_map(before.get(k) or [])
                         == _override_map(manifest[k]))]
      if differ:
        k, theirs, ours = differ[0], before.get(differ[0]), manifest[differ[0]]
        if k == "base_config":
          k, theirs, ours = _first_setting_differs(theirs, ours)
        raise config.ConfigError(
            f"{path}: this folder's study has {k}={theirs!r}, this command {ours!r}; use "
            "another --out (or the same arguments and config file) to go on")
    if calib is not None:
      path.write_text(json.dumps(manifest, indent=1))

  def code_seen(self, path: Path, recorded: dict, say: bool = True,
                what: str = "written") -> list[str]:
    """The versions of the code (:func:`output.code_version`) that wrote ``recorded`` (the
    contents of ``path``: a study.json, a calibration.json, or a --baseline's tf runs; what
    ``what`` says of them), this one's added: refused in one line when it is not among them,
    unless ``any_code`` (then ``say`` logs that it goes on). "unrecorded": before 2026-12-04."""
    seen, here = list(recorded.get("code", ["unrecorded"])), output.code_version()
    if here not in seen:
      other = ("before code versions were recorded" if seen == ["unrecorded"] else
               f"by other code (version {', '.join(seen)})")
      if not self.any_code:
        raise config.ConfigError(
            f"{path}: {what} {other}, this is {here}: their runs and step times would mix "
            "with this code's; use another --out, or --any-code to go on and record both")
      if say:
        self.log(f"{path}: {what} {other}; going on with {here} (--any-code), both recorded")
      seen.append(here)
    return seen

  # -- one run ------------------------------------------------------------------------------
  def held_out_tasks(self, cfg: Config) -> list:
    """The run's own training tasks (leakage guard, max_grid, max_train_tasks applied) with
    their test pairs, which training never saw; the first eval.max_tasks by id (0: all)."""
    from onn_jax.data.pipeline import build_training_tasks
    data = dataclasses.replace(cfg.data, hold_out_train_tests=False, eval_demos=False)
    tasks = [t for t in build_training_tasks(data, log=lambda _: None)[0] if t.test]
    return tasks[:cfg.eval.max_tasks] if cfg.eval.max_tasks else tasks

  def run_one(self, arm: str, seed: int, plan: Plan, calib: dict) -> dict | None:
    """Trains, probes and scores one run (``None``: stopped before its last step)."""
    from onn_jax import app, checkpoint, run, ttt
    from onn_jax import analysis  # rollouts, summarise_rollouts
    from onn_jax.model.transformer import count_params, init_params
    from onn_jax.parallel import platform_line
    import jax
    workdir = self.out / "runs" / f"{arm}_s{seed}"
    done = workdir / "result.json"
    if done.is_file():
      return json.loads(done.read_text())
    cfg = self.run_config(arm, seed, plan)
    result = run.train(cfg, workdir, log=self.log)
    if not result.finished:
      self.log(f"{arm} seed {seed} stopped at step {result.step} of {result.total}; run the "
               "same command again to go on")
      return None
    splits = {"heldout": self.held_out_tasks(cfg),
              "eval": app.load_eval_tasks(cfg.data.eval, cfg, cfg.eval.max_tasks)
              if cfg.data.eval else []}
    # Free running along training: the planned checkpoints, greedy, on the held-out test pairs.
    target = init_params(cfg.model, jax.random.PRNGKey(0))
    total = plan.pretrain + plan.eavi
    every = self.checkpoint_every(plan)
    mngr = checkpoint.manager(workdir / "checkpoints", async_save=False)
    probe_steps = sorted(s for s in mngr.all_steps() if s % every == 0 or s == total)
    mngr.close()
    ratio = self.arm_ratio(arm, calib)
    tf_cost = calib.get("costs", {}).get(arm, 1.0)  # a custom arm's step, in the config's
    cost = lambda n: plan.counts(n)[0] * tf_cost + plan.counts(n)[1] * ratio  # noqa: E731
    curve = []
    for step in probe_steps:
      params, _ = checkpoint.load_params(workdir, target, prefer_ema=False, step=step,
                                         log=self.log)
      summary = analysis.summarise_rollouts(analysis.rollouts(cfg, params, splits["heldout"]))
      curve.append({"step": step, "budget_frac": cost(step) / self.budget,
                    "token_accuracy": summary["token_accuracy"],
                    "exact_match": summary["exact_match"]})
    weights = jax.device_get(result.state.params)
    scores: dict[str, Any] = {}
    for split, tasks in splits.items():
      if not tasks:
        continue
      # TTT (an arm that asks for it) adapts a split's tasks once, for both modes.
      adapted = (ttt.adapt(cfg, weights, tasks, mesh=app.eval_mesh(cfg), log=self.log)
                 if cfg.ttt.steps > 0 else None)
      for mode in MODES:
        summary = app.evaluate_params(config.replace(cfg, eval={"mode": mode}), weights, tasks,
                                      workdir / f"eval_{split}_{mode}", adapted=adapted,
                                      log=self.log)
        scores[f"{split}_{mode}"] = {k: summary[k] for k in ("score", "pass@1", "pass@2",
                                                             "num_test_inputs", "solved")}
    # Seconds: planned from the calibration; measured from this run's own steps (each stage's
    # mean over its plain steps, times its step count: compiles, checkpoint saves, expert
    # resets and resumes are left out, as in the calibration; a stage with no plain step is
    # charged at the planned ratio).
    n_tf, n_eavi = plan.counts()
    own = mean_step_s(workdir / "metrics.jsonl", cfg)
    t_tf = calib.get("tf_step_s") or own.get("pretrain", math.nan)
    own_tf = own.get("pretrain", t_tf)
    planned = (n_tf * tf_cost + n_eavi * ratio) * t_tf
    measured = n_tf * own_tf + n_eavi * own.get("eavi", own_tf * ratio)
    record = {"arm": arm, "seed": seed, "plan": dataclasses.asdict(plan),
              "step_s": own, "train_s": planned, "measured_train_s": measured,
              "budget_frac": cost(None) / self.budget, "scores": scores, "curve": curve,
              "tasks": {"train": result.info.get("train_tasks"),
                        **{split: len(tasks) for split, tasks in splits.items()}},
              "params": count_params(weights),
              "machine": platform_line(cfg)[0], "code": output.code_version()}
    done.write_text(json.dumps(output.jsonable(record), indent=1))
    return record

  def meta(self) -> dict[str, Any]:
    """What verdict.json records of the study: its command's inputs, the resolved base config
    (every key, the config file's and the code's defaults included) and the expert dispatch
    its teacher-forcing steps run on this machine (``model.moe_impl`` resolved)."""
    return {"config": self.config_name, "overrides": list(self.overrides),
            "budget_tf_steps": self.budget, "eavi_share": self.share, "seeds": list(self.seeds),
            "base_config": output.jsonable(config.to_dict(self.base)),
            "experts": moe.resolve_impl(self.base.model.moe_impl)}

  def baseline_runs(self) -> list[dict]:
    """The ``tf`` runs of the study ``baseline``, when this study runs no ``tf`` arm of its own
    (else none, and a log line says so); refused in one line when that study's command
    (config, overrides, budget, seeds), its resolved base config (a default changed since), its
    teacher-forcing experts' dispatch or its machine differ from this one's, or it has no
    ``tf`` arm."""
    if self.baseline is None:
      return []
    if "tf" in self.arms:
      self.log(f"--baseline {self.baseline}: not used, this study runs its own tf arm")
      return []
    path = Path(self.baseline)
    path = path / "verdict.json" if path.is_dir() else path
    if not path.is_file():
      raise config.ConfigError(f"--baseline {self.baseline}: no finished study there "
                               "(its verdict.json)")
    try:
      other, mine = json.loads(path.read_text()), self.meta()
    except (ValueError, UnicodeDecodeError) as err:
      raise config.ConfigError(f"--baseline {path}: not a study's verdict.json ({err})") from None
    if not isinstance(other, dict):
      raise config.ConfigError(f"--baseline {path}: not a study's verdict.json")
    if "base_config" not in other:
      raise config.ConfigError(f"--baseline {path}: it does not record its resolved config "
                               "(studies before 2026-12-02 did not), so a changed default "
                               "cannot be ruled out; run its tf arm again")
    other.setdefault("experts", _unrecorded_experts(
        other["base_config"].get("model", {}).get("moe_impl", "auto")))
    other["base_config"] = _as_read_now(other["base_config"])
    for key in ("config", "overrides", "budget_tf_steps", "seeds", "base_config", "experts"):
      if key == "overrides" and _override_map(other.get(key) or []) == _override_map(mine[key]):
        continue  # the same overrides in another order
      if other.get(key) != mine[key]:
        theirs, ours = other.get(key), mine[key]
        if key == "base_config":
          key, theirs, ours = _first_setting_differs(theirs, ours)
        raise config.ConfigError(f"--baseline {path}: its study has {key}={theirs!r}, this one "
                                 f"{ours!r}")
    if "tf" not in other.get("arms", {}):
      raise config.ConfigError(f"--baseline {path}: its study has no tf arm")
    runs = list(other["arms"]["tf"]["runs"])
    from onn_jax.parallel import platform_line
    here = platform_line(self.base)[0]
    if any(r.get("machine") != here for r in runs):
      raise config.ConfigError(f"--baseline {path}: its tf runs ran on "
                               f"{sorted({str(r.get('machine')) for r in runs})}, this study "
                               f"on {here!r}")
    self.code_seen(path, {"code": sorted({str(r.get("code", "unrecorded")) for r in runs})},
                   what="its tf runs were")
    return runs

  # -- the whole study ------------------------------------------------------------------------
  def run(self, max_runs: int = 0) -> dict | None:
    """Runs what is not done yet (at most ``max_runs`` runs, 0: all); writes verdict.json,
    verdict.md and verdict.png once every run is done and returns the verdict (else None)."""
    if self.out.exists() and not self.out.is_dir():
      raise config.ConfigError(f"--out {self.out}: is a file, not a folder")
    self.out.mkdir(parents=True, exist_ok=True)
    baseline = self.baseline_runs()
    self.check_manifest(None)  # before the calibration caches anything of this command's
    calib = self.calibrate()
    plans = self.plans(calib)  # (before study.json is written: a ratio no run can take fails)
    self.check_manifest(calib)
    self.log(("EAVI step = " + ", ".join(f"{r:.2f} ({kind})" for kind, r in
                                        calib["ratios"].items()) + " teacher-forcing steps"
              if calib["ratios"] else "no EAVI arm") + "; plans: " + ", ".join(
        f"{arm} {p.pretrain}+{p.eavi}" + (f" (EAVI every {p.every})" if p.every else "")
        for arm, p in plans.items()))
    records, started = [], 0
    for seed in self.seeds:
      for arm in self.arms:
        done = (self.out / "runs" / f"{arm}_s{seed}" / "result.json").is_file()
        if not done and max_runs and started >= max_runs:
          self.log(f"stopping after {started} runs (--max-runs); run again to go on")
          return None
        started += not done
        self.log(f"run {arm} seed {seed}")
        record = self.run_one(arm, seed, plans[arm], calib)
        if record is None:
          return None
        records.append(record)
    # The code versions this folder went on with (--any-code), beside each run's own.
    meta = {**self.meta(), "code": json.loads((self.out / "study.json").read_text())["code"]}
    if baseline:
      # Charged like this study's own arms: at its calibration's teacher-forcing step.
      t_tf = calib.get("tf_step_s")
      baseline = [{**r, "train_s": r["plan"]["pretrain"] * t_tf} if t_tf else r
                  for r in baseline]
      meta["baseline"] = str(self.baseline)
    verdict = summarise(baseline + records, calib, meta)
    (self.out / "verdict.json").write_text(json.dumps(output.jsonable(verdict), indent=1))
    (self.out / "verdict.md").write_text(markdown(verdict))
    plot_curves(verdict, self.out / "verdict.png")
    self.log(f"verdict: {verdict['sentence']} ({self.out / 'verdict.md'})")
    return verdict


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
  values = [float(v) for v in values]
  return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def _override_map(overrides: list[str]) -> dict[str, str]:
  """``section.key=value`` overrides as what they set: the same ones in another order are the
  same study (of a key given twice, the last one counts, as in config.load)."""
  return dict((key.strip(), value) for key, _, value in (o.partition("=") for o in overrides))


def _as_read_now(recorded: dict) -> dict:
  """An earlier study's resolved config (study.json's or a baseline's ``base_config``) as
  this code reads it: settings added since then filled in as a saved run's are (their
  defaults, or :data:`config.SAVED_RUN_DEFAULTS`), so that a study continued with
  ``--any-code`` across such an addition is not refused for it; as recorded when this code
  cannot read it (a setting removed since: it then differs)."""
  try:
    return output.jsonable(config.to_dict(config.from_saved_run(recorded)))
  except (config.ConfigError, TypeError, ValueError, AttributeError):
    return recorded


def _first_setting_differs(theirs: dict, ours: dict) -> tuple[str, object, object]:
  """The first ``section.key`` whose value differs between two resolved configs, with both
  values (None where one lacks it)."""
  def value(cfg: dict, sec: str, key: str):
    part = cfg.get(sec)
    return part.get(key) if isinstance(part, dict) else None
  keys = [(sec, key) for sec in {**theirs, **ours}
          for key in {**(theirs.get(sec) or {}), **(ours.get(sec) or {})}]
  return next(((f"{sec}.{key}", value(theirs, sec, key), value(ours, sec, key))
               for sec, key in keys if value(theirs, sec, key) != value(ours, sec, key)),
              ("base_config", "other keys", "these"))


def _unrecorded_experts(impl: str) -> str:
  """The teacher-forcing experts' dispatch of a study that did not record it (before
  2026-12-04, session 13): ``model.moe_impl=auto`` was dense on every machine then."""
  return "dense" if impl == "auto" else impl


def summarise(records: Sequence[dict], calib: dict, meta: dict) -> dict:
  """Per arm: mean and standard deviation over seeds of every score, of the training time
  (planned and measured) and of the final free-running accuracy; the curves; the scale; and
  one sentence comparing each EAVI arm with ``tf``."""
  arms: dict[str, dict] = {}
  for rec in records:
    arms.setdefault(rec["arm"], {"runs": []})["runs"].append(rec)
  for arm, entry in arms.items():
    runs = entry["runs"]
    entry["train_s"] = _mean_sd([r["train_s"] for r in runs])
    entry["measured_train_s"] = _mean_sd([r["measured_train_s"] for r in runs])
    entry["budget_frac"] = _mean_sd([r["budget_frac"] for r in runs])
    entry["scores"] = {key: _mean_sd([r["scores"][key]["score"] for r in runs])
                       for key in runs[0]["scores"]}
    entry["free_token_acc"] = _mean_sd([final_point(r)["token_accuracy"] for r in runs
                                        if final_point(r)] or [math.nan])
  # The scale of this study's own runs: a --baseline's come first, from another study.
  first = next((r for r in records if r["arm"] in ARMS and r["arm"] != "tf"),
               next((r for r in records if r["arm"] == "tf"), records[0])) if records else {}
  scale = {"params": first.get("params"), "tasks": first.get("tasks", {}),
           "machine": first.get("machine")}
  verdict = {**meta, "scale": scale, "calibration": calib, "arms": arms,
             # the code versions of the runs (output.code_version; a baseline's too) and of
             # the study's folder (meta's "code", study.json's)
             "code": sorted({str(r.get("code", "unrecorded")) for r in records}
                            | set(meta.get("code", ())))}
  verdict["sentence"] = sentence(arms, describe_scale(verdict))
  return verdict


def final_point(record: dict) -> dict | None:
  """The curve's point at the run's last step (None when it was not probed)."""
  total = record["plan"]["pretrain"] + record["plan"]["eavi"]
  return next((p for p in record["curve"] if p["step"] == total), None)


def describe_scale(verdict: dict) -> str:
  """"config default (198,000 parameters; 46 training tasks; budget 350 teacher-forcing
  steps; cpu x 1)": what the sentence's answer holds for."""
  scale, tasks = verdict.get("scale", {}), verdict.get("scale", {}).get("tasks", {})
  parts = [f"{scale['params']:,} parameters" if scale.get("params") else None,
           f"{tasks['train']} training tasks" if tasks.get("train") else None,
           f"budget {verdict['budget_tf_steps']} teacher-forcing steps",
           scale.get("machine")]
  return f"config {verdict['config']} (" + "; ".join(p for p in parts if p) + ")"


def _compare(entry: dict, base: dict, key: Callable[[dict], tuple[float, float]]) -> str:
  (m, sd), (b, b_sd) = key(entry), key(base)
  spread = math.hypot(sd, b_sd)
  word = "better" if m - b > spread else "worse" if b - m > spread else "no different"
  return f"{m:.1%} vs {b:.1%}, {word} (seed spread {spread:.1%})"


def sentence(arms: dict[str, dict], scale: str = "") -> str:
  """Plain words per EAVI arm against teacher forcing: the official score on the held-out test
  outputs (AugScore) and the final free-running answer-token accuracy, "better" or "worse"
  only when the difference of the means exceeds the seeds' combined standard deviation."""
  key = "heldout_augscore"
  if "tf" not in arms or key not in arms["tf"]["scores"]:
    return "no teacher-forcing baseline to compare with"
  lines = [f"{arm}: held-out AugScore "
           + _compare(entry, arms["tf"], lambda e: e["scores"][key])
           + "; free-running token accuracy "
           + _compare(entry, arms["tf"], lambda e: e["free_token_acc"])
           for arm, entry in arms.items() if arm != "tf"]
  if not lines:
    return "no EAVI arm"
  head = f"At {scale}, against teacher forcing at equal time: " if scale else ""
  return head + ". ".join(lines) + "."


def markdown(verdict: dict) -> str:
  """The table of the README: one row per arm, mean +- standard deviation over the seeds."""
  keys = [f"{s}_{m}" for s in SPLITS for m in MODES]
  head = (["arm", "steps (TF+EAVI)", "planned s", "measured s"] + keys + ["free token acc"])
  rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  pct = lambda ms: f"{ms[0]:.1%} ± {ms[1]:.1%}"  # noqa: E731
  for arm, entry in verdict["arms"].items():
    p = entry["runs"][0]["plan"]
    steps = f"{p['pretrain']}+{p['eavi']}" + (f" (every {p['every']})" if p["every"] else "")
    cells = [arm, steps, f"{entry['train_s'][0]:.1f}",
             "{:.1f} ± {:.1f}".format(*entry["measured_train_s"])]
    cells += [pct(entry["scores"][k]) if k in entry["scores"] else "-" for k in keys]
    cells.append(pct(entry["free_token_acc"]))
    rows.append("| " + " | ".join(cells) + " |")
  c, tasks = verdict["calibration"], verdict.get("scale", {}).get("tasks", {})
  return "\n".join(rows) + (
      f"\n\n{describe_scale(verdict)}. "
      + (f"EAVI step = {c['ratio']:.2f} teacher-forcing steps"
         + (f" ({c['eavi_step_s'] * 1e3:.0f} / "
            f"{c.get('eavi_run_tf_step_s', c['tf_step_s']) * 1e3:.0f} ms)"
            if c.get("measured") else " (given)")
         if c.get("ratio") is not None else
         f"teacher-forcing step {c['tf_step_s'] * 1e3:.0f} ms (no EAVI arm timed)"
         if c.get("measured") else "no EAVI arm")
      + "".join(f", {r:.2f} with eavi.rollout={kind}" for kind, r in c.get("ratios", {}).items()
                if len(c["ratios"]) > 1)
      + "".join(f"; a step of {arm} = {r:.2f} teacher-forcing steps"
                + ("" if c.get("measured") else " (assumed)")
                for arm, r in c.get("costs", {}).items())
      + f"; EAVI share {verdict['eavi_share']:.0%}; seeds {verdict['seeds']}; scored on "
      f"{tasks.get('heldout', '?')} training tasks' held-out test outputs and "
      f"{tasks.get('eval', '?')} evaluation tasks; scores are official scores (pass@2); "
      "measured s: each run's own step times, compilation left out"
      + (f"; tf: the runs of the study {verdict['baseline']}" if verdict.get("baseline") else "")
      + (f"; runs of {len(verdict['code'])} versions of the code ({', '.join(verdict['code'])})"
         if len(verdict.get("code", ())) > 1 else "")
      + ".\n\n"
      + verdict["sentence"] + "\n")


def plot_curves(verdict: dict, path: Path) -> Path:
  """Free-running answer-token accuracy on the held-out test pairs against the share of the
  time budget spent: each arm's mean over seeds at the steps every seed probed, with its
  seeds' range shaded."""
  fig = output.figure((7, 4))
  ax = fig.subplots()
  for k, (arm, entry) in enumerate(verdict["arms"].items()):
    curves = [{p["step"]: p for p in r["curve"]} for r in entry["runs"] if r["curve"]]
    if not curves:
      continue
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    x = [curves[0][s]["budget_frac"] for s in steps]
    y = np.array([[c[s]["token_accuracy"] for s in steps] for c in curves])
    ax.plot(x, y.mean(0), label=arm, color=f"C{k}", linewidth=1.2, marker=".")
    ax.fill_between(x, y.min(0), y.max(0), color=f"C{k}", alpha=0.15)
  ax.set_xlabel("share of the time budget spent")
  ax.set_ylabel("free-running answer-token accuracy\n(held-out test outputs, greedy)")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  return path
