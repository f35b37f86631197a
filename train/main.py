"""Train Tiny-ONN on ARC, then evaluate.

  python -m train.main [--config default|arc1|arc2|PATH] [--workdir DIR] [section.key=value ...]

A workdir that already holds checkpoints is resumed from the latest one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from onn_jax import config


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m train.main", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=config.KEYS_HELP)
  parser.add_argument("--config", default="default",
                      help="a shipped config (default, arc1, arc2) or a YAML file")
  parser.add_argument("--print-config", action="store_true",
                      help="print the resolved config (YAML, overrides applied) and exit")
  parser.add_argument("--workdir", default=None,
                      help="run folder (default: runs/<config name>)")
  parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.seed=3")
  return parser.parse_intermixed_args(argv)  # overrides before or after the options


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    cfg = config.load(args.config, args.overrides)
  except config.ConfigError as err:
    return config.fail(err)
  if args.print_config:
    print(config.dump(cfg), end="")
    return 0
  workdir = Path(args.workdir or Path("runs") / Path(args.config).stem)
  # Heavy imports after the config is known to be good: a typo fails in a fraction of a second.
  from onn_jax import app
  return app.train_and_evaluate(cfg, workdir)


if __name__ == "__main__":
  sys.exit(main())
