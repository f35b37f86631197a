"""Evaluation: AugScore / vote / greedy candidates, the Kaggle submission, the official score.

The model plugs in through ``generate_fn`` and ``logprob_fn`` (see :mod:`.augscore`).
"""

from __future__ import annotations

from onn_jax.evaluation.augscore import (MAX_ANSWER_TOKENS, MODES, evaluate, make_views,
                                         parse_generation, ranked_by_task, summarise,
                                         write_outputs)
from onn_jax.evaluation.scoring import (grid_problem, grids_equal, has_solutions,
                                        score_submission, validate_submission)
from onn_jax.evaluation.submission import build_submission, grid_to_list, write_submission

__all__ = [
    "MAX_ANSWER_TOKENS", "MODES", "build_submission", "evaluate", "grid_problem", "grid_to_list",
    "grids_equal", "has_solutions", "make_views", "parse_generation", "ranked_by_task",
    "score_submission", "summarise", "validate_submission", "write_outputs", "write_submission",
]
