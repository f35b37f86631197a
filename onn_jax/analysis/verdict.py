"""Does EAVI help? Teacher forcing alone against teacher forcing + EAVI at equal training time.

The study behind ``python -m train.eavi_verdict`` (protocol in DESIGN.md terms):

1. **Calibration.** A short run of the config (teacher forcing, then EAVI) on this machine
   gives the median seconds of a teacher-forcing step ``t_tf`` and of an EAVI step
   ``t_eavi`` (first logged interval of each stage left out: it compiles); ``r = t_eavi / t_tf``.
2. **Arms at equal time.** The budget is ``N`` teacher-forcing steps (``train.pretrain_steps``
   of the config). The ``tf`` arm trains N teacher-forcing steps. A second-stage EAVI arm
   spends the share ``f`` of the time on EAVI: ``(1 - f) N`` teacher-forcing steps, then
   ``f N / r`` EAVI steps. The mixed arm (``train.eavi_every = k``, EAVI from the start, at the
   pre-training learning rate) takes ``k = round(1 + r (1 - f) / f)`` and ``P = N k / (k - 1 + r)``
   steps, so that EAVI again has about the share f. Each run's own step times are recorded, so
   the table shows the time each arm really took.
3. **Scores.** Every run trains on ``data.train`` with its test outputs held out
   (``data.hold_out_train_tests``), then is scored on those held-out test outputs and on
   ``data.eval``, greedy and AugScore (official score, pass@2). Along training, checkpoints are
   decoded greedily on the held-out test pairs: the free-running answer-token accuracy and exact
   match against the fraction of the time budget spent.

Runs are resumable: a finished run's ``result.json`` is reused, an unfinished one resumes from
its checkpoints, so the study can be run in slices (``--max-runs``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from onn_jax import config, output, plots
from onn_jax.config import Config

# Arm name -> (config overrides, whether EAVI is mixed into pre-training from the start).
ARMS: dict[str, tuple[tuple[str, ...], bool]] = {
    "tf": ((), False),
    "soft": (("eavi.feed=soft",), False),
    "argmax": (("eavi.feed=argmax",), False),
    "sample": (("eavi.feed=sample",), False),
    "soft_exc_only": (("eavi.feed=soft", "eavi.tf_weight=0.0"), False),
    "soft_mixed": (("eavi.feed=soft",), True),
}
SPLITS = ("heldout", "eval")  # the training tasks' held-out test outputs; data.eval
MODES = ("greedy", "augscore")


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
  if mixed:
    every = max(2, round(1 + ratio * (1 - share) / share))
    return Plan(max(every, round(budget * every / (every - 1 + ratio))), 0, every)
  return Plan(round(budget * (1 - share)), max(1, round(budget * share / ratio)))


def stage_seconds(metrics_path: Path) -> dict[str, list[float]]:
  """Stage -> seconds per step of its logged intervals, each stage's first interval (which
  compiles the step) left out when there are others."""
  records, _ = plots.read_metrics(metrics_path)
  by_stage: dict[str, list[float]] = {}
  for rec in records:
    if "step_s" in rec:
      by_stage.setdefault(str(rec.get("stage")), []).append(float(rec["step_s"]))
  return {stage: values[1:] or values for stage, values in by_stage.items()}


def median_step_s(metrics_path: Path) -> dict[str, float]:
  return {stage: statistics.median(v) for stage, v in stage_seconds(metrics_path).items()}


@dataclasses.dataclass
class Study:
  """One verdict study: its folder, base config, budget and arms."""
  out: Path
  base: Config
  overrides: tuple[str, ...]  # applied to the config for every run (recorded)
  config_name: str
  seeds: Sequence[int] = (0, 1, 2)
  arms: Sequence[str] = tuple(ARMS)
  share: float = 0.25
  probes: int = 6
  ratio: float | None = None  # EAVI step / teacher-forcing step; measured when None
  log: Callable[[str], None] = print

  @property
  def budget(self) -> int:
    return self.base.train.pretrain_steps

  def run_config(self, arm: str, seed: int, plan: Plan) -> Config:
    arm_overrides, _ = ARMS[arm]
    total = plan.pretrain + plan.eavi
    return config.load(self.config_name, list(self.overrides) + list(arm_overrides) + list(
        plan.overrides()) + [
            f"train.seed={seed}", "data.hold_out_train_tests=true",
            f"checkpoint.every={max(1, math.ceil(total / self.probes))}",
            f"checkpoint.keep={self.probes + 2}", "checkpoint.async_save=false"])

  # -- calibration ------------------------------------------------------------------------
  def calibrate(self) -> dict[str, float]:
    """Measures t_tf and t_eavi on this machine (a short run; cached in calibration.json)."""
    path = self.out / "calibration.json"
    if path.is_file():
      return json.loads(path.read_text())
    if self.ratio is not None:
      result = {"ratio": self.ratio, "measured": False}
    else:
      from onn_jax import run
      workdir = self.out / "calibration"
      cfg = config.load(self.config_name, list(self.overrides) + [
          "train.pretrain_steps=30", "train.eavi_steps=15", "train.eavi_every=0",
          "train.log_every=5", "checkpoint.every=100000", "train.reset_every=0"])
      self.log("calibration: 30 teacher-forcing then 15 EAVI steps")
      run.train(cfg, workdir, log=self.log)
      med = median_step_s(workdir / "metrics.jsonl")
      result = {"tf_step_s": med["pretrain"], "eavi_step_s": med["eavi"],
                "ratio": med["eavi"] / med["pretrain"], "measured": True}
    path.write_text(json.dumps(result, indent=1))
    return result

  def plans(self, ratio: float) -> dict[str, Plan]:
    return {arm: plan_arm(ARMS[arm][1], arm != "tf", self.budget, self.share, ratio)
            for arm in self.arms}

  # -- one run ------------------------------------------------------------------------------
  def run_one(self, arm: str, seed: int, plan: Plan, calib: dict) -> dict:
    from onn_jax import app, checkpoint, run
    from onn_jax import analysis  # rollouts, summarise_rollouts
    from onn_jax.model.transformer import init_params
    import jax
    workdir = self.out / "runs" / f"{arm}_s{seed}"
    done = workdir / "result.json"
    if done.is_file():
      return json.loads(done.read_text())
    cfg = self.run_config(arm, seed, plan)
    started = time.perf_counter()
    result = run.train(cfg, workdir, log=self.log)
    train_wall = time.perf_counter() - started
    heldout = app.load_eval_tasks(cfg.data.train, cfg, 0)
    splits = {"heldout": heldout,
              "eval": app.load_eval_tasks(cfg.data.eval, cfg, 0) if cfg.data.eval else []}
    # Free running along training: every checkpoint, greedy, on the held-out test pairs.
    target = init_params(cfg.model, jax.random.PRNGKey(0))
    use_ema = cfg.eval.weights == "ema"
    curve = []
    total = plan.pretrain + plan.eavi
    # Seconds per step: the calibration's (one machine state for every arm) or, when the ratio
    # was given, this run's own medians (a mixed run's intervals mix both kinds of step).
    med = median_step_s(workdir / "metrics.jsonl")
    t_tf = calib.get("tf_step_s") or med.get("pretrain", math.nan)
    t_eavi = calib.get("eavi_step_s") or t_tf * calib["ratio"]
    cost = lambda n: plan.counts(n)[0] + plan.counts(n)[1] * calib["ratio"]  # noqa: E731
    for step in sorted(checkpoint.manager(workdir / "checkpoints", async_save=False).all_steps()):
      params, _ = checkpoint.load_params(workdir, target, prefer_ema=use_ema, step=step,
                                         log=self.log)
      summary = analysis.summarise_rollouts(analysis.rollouts(cfg, params, heldout))
      curve.append({"step": step, "budget_frac": cost(step) / self.budget,
                    "token_accuracy": summary["token_accuracy"],
                    "exact_match": summary["exact_match"]})
    weights = result.state.ema if use_ema and jax.tree.leaves(result.state.ema) else \
        result.state.params
    weights = jax.device_get(weights)
    scores: dict[str, Any] = {}
    for split, tasks in splits.items():
      for mode in MODES:
        if not tasks:
          continue
        summary = app.evaluate_params(config.replace(cfg, eval={"mode": mode}), weights, tasks,
                                      workdir / f"eval_{split}_{mode}", log=self.log)
        scores[f"{split}_{mode}"] = {k: summary[k] for k in ("score", "pass@1", "pass@2",
                                                             "num_test_inputs", "solved")}
    n_tf, n_eavi = plan.counts()
    record = {"arm": arm, "seed": seed, "plan": dataclasses.asdict(plan),
              "tf_step_s": t_tf, "eavi_step_s": t_eavi if n_eavi else None,
              "train_s": n_tf * t_tf + n_eavi * t_eavi, "train_wall_s": train_wall,
              "budget_frac": cost(None) / self.budget, "scores": scores, "curve": curve,
              "tasks": {split: len(tasks) for split, tasks in splits.items()}}
    done.write_text(json.dumps(output.jsonable(record), indent=1))
    return record

  # -- the whole study ------------------------------------------------------------------------
  def run(self, max_runs: int = 0) -> dict | None:
    """Runs what is not done yet (at most ``max_runs`` runs, 0: all); writes verdict.json,
    verdict.md and verdict.png once every run is done and returns the verdict (else None)."""
    self.out.mkdir(parents=True, exist_ok=True)
    calib = self.calibrate()
    plans = self.plans(calib["ratio"])
    self.log(f"EAVI step = {calib['ratio']:.2f} teacher-forcing steps; plans: " + ", ".join(
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
        records.append(self.run_one(arm, seed, plans[arm], calib))
    verdict = summarise(records, calib, {"config": self.config_name,
                                         "overrides": list(self.overrides),
                                         "budget_tf_steps": self.budget, "eavi_share": self.share,
                                         "seeds": list(self.seeds)})
    (self.out / "verdict.json").write_text(json.dumps(output.jsonable(verdict), indent=1))
    (self.out / "verdict.md").write_text(markdown(verdict))
    plot_curves(verdict, self.out / "verdict.png")
    self.log(f"verdict: {verdict['sentence']} ({self.out / 'verdict.md'})")
    return verdict


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
  values = [float(v) for v in values]
  return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(records: Sequence[dict], calib: dict, meta: dict) -> dict:
  """Per arm: mean and standard deviation over seeds of every score, of the training time and
  of the final free-running accuracy; the curves; and one sentence comparing with ``tf``."""
  arms: dict[str, dict] = {}
  for rec in records:
    arms.setdefault(rec["arm"], {"runs": []})["runs"].append(rec)
  for arm, entry in arms.items():
    runs = entry["runs"]
    entry["train_s"] = _mean_sd([r["train_s"] for r in runs])
    entry["train_wall_s"] = _mean_sd([r["train_wall_s"] for r in runs])
    entry["budget_frac"] = _mean_sd([r["budget_frac"] for r in runs])
    entry["scores"] = {key: _mean_sd([r["scores"][key]["score"] for r in runs])
                       for key in runs[0]["scores"]}
    entry["free_token_acc"] = _mean_sd([r["curve"][-1]["token_accuracy"] for r in runs
                                        if r["curve"]] or [math.nan])
  verdict = {**meta, "calibration": calib, "arms": arms}
  verdict["sentence"] = sentence(arms)
  return verdict


def _compare(entry: dict, base: dict, key: Callable[[dict], tuple[float, float]]) -> str:
  (m, sd), (b, b_sd) = key(entry), key(base)
  spread = math.hypot(sd, b_sd)
  word = "better" if m - b > spread else "worse" if b - m > spread else "no different"
  return f"{m:.1%} vs {b:.1%}, {word} (seed spread {spread:.1%})"


def sentence(arms: dict[str, dict]) -> str:
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
  return ". ".join(lines) + "." if lines else "no EAVI arm"


def markdown(verdict: dict) -> str:
  """The table of the README: one row per arm, mean +- standard deviation over the seeds."""
  keys = [f"{s}_{m}" for s in SPLITS for m in MODES]
  head = (["arm", "steps (TF+EAVI)", "train s (calibrated)", "wall s", "time / budget"] + keys
          + ["free token acc"])
  rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  pct = lambda ms: f"{ms[0]:.1%} ± {ms[1]:.1%}"  # noqa: E731
  for arm, entry in verdict["arms"].items():
    p = entry["runs"][0]["plan"]
    steps = f"{p['pretrain']}+{p['eavi']}" + (f" (every {p['every']})" if p["every"] else "")
    cells = [arm, steps, f"{entry['train_s'][0]:.1f}", "{:.0f} ± {:.0f}".format(
        *entry["train_wall_s"]), f"{entry['budget_frac'][0]:.2f}"]
    cells += [pct(entry["scores"][k]) if k in entry["scores"] else "-" for k in keys]
    cells.append(pct(entry["free_token_acc"]))
    rows.append("| " + " | ".join(cells) + " |")
  c = verdict["calibration"]
  return "\n".join(rows) + (
      f"\n\nEAVI step = {c['ratio']:.2f} teacher-forcing steps"
      + (f" ({c['eavi_step_s'] * 1e3:.0f} / {c['tf_step_s'] * 1e3:.0f} ms)"
         if c.get("measured") else " (given)")
      + f"; budget {verdict['budget_tf_steps']} teacher-forcing steps, EAVI share "
      f"{verdict['eavi_share']:.0%}; seeds {verdict['seeds']}; scores are official scores "
      "(pass@2).\n\n" + verdict["sentence"] + "\n")


def plot_curves(verdict: dict, path: Path) -> Path:
  """Free-running answer-token accuracy on the held-out test pairs against the share of the
  time budget spent: each arm's mean over seeds, with its seeds' range shaded."""
  fig = output.figure((7, 4))
  ax = fig.subplots()
  for k, (arm, entry) in enumerate(verdict["arms"].items()):
    curves = [r["curve"] for r in entry["runs"] if r["curve"]]
    if not curves:
      continue
    n = min(len(c) for c in curves)
    x = np.mean([[p["budget_frac"] for p in c[:n]] for c in curves], 0)
    y = np.array([[p["token_accuracy"] for p in c[:n]] for c in curves])
    ax.plot(x, y.mean(0), label=arm, color=f"C{k}", linewidth=1.2)
    ax.fill_between(x, y.min(0), y.max(0), color=f"C{k}", alpha=0.15)
  ax.set_xlabel("share of the time budget spent")
  ax.set_ylabel("free-running answer-token accuracy\n(held-out test outputs, greedy)")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  return path
