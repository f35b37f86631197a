"""Evaluate a trained run: AugScore (or greedy / vote), submission.json and the official score.

  python -m train.evaluate --checkpoint RUN_DIR [--data arc-agi-1:evaluation | --data PATH]
                           [--out DIR] [section.key=value ...]

PATH is a folder of task JSON files or a Kaggle challenges JSON (its solutions JSON is found
beside it when present: NAME_challenges.json's in NAME_solutions.json, challenges.json's in
solutions.json; without solutions the scores are omitted and said to be).
"""

from __future__ import annotations

import argparse
import sys

from onn_jax import config


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=config.KEYS_HELP)
  parser.add_argument("--checkpoint", required=True,
                      help="a run folder (with config.yaml and checkpoints/)")
  parser.add_argument("--data", default=None,
                      help="SOURCE:SPLIT or a path (default: the run's data.eval)")
  parser.add_argument("--out", default=None,
                      help="output folder (default: RUN_DIR/eval for the run's own data.eval, "
                           "RUN_DIR/eval_NAME for other data, e.g. eval_challenges)")
  parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. eval.mode=vote")
  args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
  from onn_jax import app
  return app.evaluate_checkpoint(args.checkpoint, args.data, args.out, args.overrides)


if __name__ == "__main__":
  sys.exit(main())
