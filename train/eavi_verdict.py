"""Does EAVI help? Teacher forcing alone against teacher forcing + EAVI variants at equal
training time, several seeds each (protocol: onn_jax/analysis/verdict.py).

  python -m train.eavi_verdict [--config default] [--out runs/eavi_verdict] [--seeds 0,1,2]
                               [--arms tf,soft,...] [--eavi-share 0.25] [--probes 6]
                               [--ratio R] [--max-runs N] [--baseline STUDY]
                               [--arm "NAME: section.key=value ..."] [--any-code]
                               [section.key=value ...]

The time budget is the config's train.pretrain_steps teacher-forcing steps. Writes
OUT/verdict.md (the table), verdict.json and verdict.png (free-running accuracy along training);
each run keeps its folder under OUT/runs. Run the same command again to go on after a stop;
OUT/study.json refuses a command whose config, overrides, budget, share or ratio differ (a
study without EAVI arms has no ratio; an EAVI arm may join it later), and other code than
wrote the folder (``onn_jax``'s sources and configs, ``output.code_version``) unless
``--any-code``: verdict.json lists the code versions of its runs.
``--arm "NAME: key=value ..."`` adds a teacher-forcing arm of your own (an NSA geometry, the
loss, TTT at evaluation), at equal time too: it calibrates its own step and trains the budget
over its cost. ``--baseline STUDY``: a study without a tf arm compares its arms with the tf
runs of a finished study of the same command, resolved config and machine (a new variant,
teacher forcing not rerun).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from onn_jax import config


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m train.eavi_verdict", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=config.KEYS_HELP)
  parser.add_argument("--config", default="default",
                      help="a shipped config (default, arc1, arc2) or a YAML file")
  parser.add_argument("--out", default="runs/eavi_verdict",
                      help="the study's folder: its runs, study.json and verdict.json; the same "
                      "command again goes on where it stopped")
  parser.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated")
  parser.add_argument("--arms", default="", help="comma-separated, default: tf, soft, argmax, "
                      "sample, soft_exc_only, soft_mixed; also soft_parallel, argmax_parallel "
                      "(eavi.rollout=parallel, each calibrated on its own)")
  parser.add_argument("--eavi-share", type=float, default=0.25,
                      help="share of the time budget an EAVI arm spends on EAVI steps")
  parser.add_argument("--probes", type=int, default=6,
                      help="checkpoints decoded free running along each run")
  parser.add_argument("--ratio", type=float, default=None,
                      help="EAVI step / teacher-forcing step (default: measured first)")
  parser.add_argument("--max-runs", type=int, default=0, help="stop after N new runs (0: all)")
  parser.add_argument("--arm", action="append", default=[], metavar="NAME:OVERRIDES",
                      help="a teacher-forcing arm of your own, e.g. \"paper: model.block_len=32 "
                      "model.block_stride=16\" (overrides separated by spaces); at equal time: "
                      "it calibrates its own step; repeatable; without --arms, the arms are "
                      "tf (unless --baseline) and these")
  parser.add_argument("--baseline", default="",
                      help="a finished study (folder or verdict.json) of the same config, "
                      "overrides, budget and seeds whose tf runs stand in for a tf arm this "
                      "one does not run")
  parser.add_argument("--any-code", action="store_true",
                      help="go on in a folder that another version of the code wrote (its "
                      "study.json or calibration.json), recording both; refused otherwise")
  parser.add_argument("--cache", default="",
                      help="persistent compilation cache folder (default OUT/jax_cache)")
  parser.add_argument("overrides", nargs="*", help="section.key=value, applied to every run")
  args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
  from onn_jax.analysis import verdict
  try:
    try:
      seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
      raise config.ConfigError(f"--seeds: {args.seeds!r} is not a comma-separated list of "
                               "integers") from None
    if len(set(seeds)) < len(seeds) or any(seed < 0 for seed in seeds):
      raise config.ConfigError(f"--seeds: {args.seeds!r} must name distinct seeds >= 0 (a seed "
                               "given twice would count one run as two)")
    custom = verdict.parse_custom_arms(args.arm)
    fixed = [o for o in args.overrides if o.split("=", 1)[0].strip() in verdict.STUDY_KEYS
             and o.split("=", 1)[0].strip() != "train.pretrain_steps"]  # (the budget)
    if fixed:  # (verdict.json's base_config shows them as given)
      print(f"warning: {' '.join(fixed)}: not used; the study sets "
            f"{'it' if len(fixed) == 1 else 'them'} for every run (seeds, logging, "
            "checkpoints, the EAVI plan; --seeds, --probes, --eavi-share)", file=sys.stderr)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in verdict.ARMS]
    if unknown:
      raise config.ConfigError(f"--arms: unknown {unknown}; known: {list(verdict.ARMS)}")
    # With --arm alone: teacher forcing and those arms (only those, against a --baseline).
    default = [] if args.baseline else ["tf"]
    arms = (arms or (default if custom else list(verdict.DEFAULT_ARMS))) + list(custom)
    if not 0.0 < args.eavi_share < 1.0 or not math.isfinite(1 / args.eavi_share):
      raise config.ConfigError(f"--eavi-share: must lie in (0, 1), got {args.eavi_share}")
    if args.probes < 1 or not seeds:
      raise config.ConfigError("--probes and --seeds: at least one each")
    if args.ratio is not None and not (args.ratio > 0 and math.isfinite(args.ratio)):
      raise config.ConfigError(f"--ratio: an EAVI step's cost in teacher-forcing steps must be "
                               f"a finite positive number, got {args.ratio}")
    if args.max_runs < 0:
      raise config.ConfigError(f"--max-runs: must be >= 0 (0: all), got {args.max_runs}")
    base = config.load(args.config, args.overrides)
    from onn_jax import ttt
    ttt.check(base)
    for overrides in custom.values():  # a bad key fails now, not after hours of other runs
      ttt.check(config.load(args.config, [*args.overrides, *overrides]))
  except (ValueError, config.ConfigError) as err:
    return config.fail(err)
  import jax
  out = Path(args.out)
  if args.cache or not jax.config.jax_compilation_cache_dir:  # a user's own cache stands
    jax.config.update("jax_compilation_cache_dir", str(Path(args.cache or out / "jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  study = verdict.Study(out=out, base=base, overrides=tuple(args.overrides),
                        config_name=args.config, seeds=seeds, arms=arms,
                        share=args.eavi_share, probes=args.probes, ratio=args.ratio,
                        baseline=Path(args.baseline) if args.baseline else None,
                        custom=custom, any_code=args.any_code)
  from onn_jax import app, run
  try:
    study.run(args.max_runs)
  except app.USER_ERRORS + (run.TrainingStopped,) as err:
    return app._fail(err)
  except KeyboardInterrupt as err:  # the run in progress has checkpointed when it could
    print(f"interrupted ({getattr(err, 'name', 'SIGINT')}); run the same command again to go "
          "on", file=sys.stderr)
    return getattr(err, "exit_code", 130)
  return 0


if __name__ == "__main__":
  sys.exit(main())
