"""Free running: every answer decoded from its prompt, scored and drawn (the EAVI notebook)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from onn_jax import config, plots, steps
from onn_jax.analysis.setup import task_batch
from onn_jax.config import Config
from onn_jax.data.serialize import decode_grid
from onn_jax.data.tasks import Task
from onn_jax.data.tokens import END, token_name
from onn_jax.model.transformer import Transformer, outside_tf

@functools.partial(jax.jit, static_argnames=("model", "cfg"))
def _excursion_jit(model: Transformer, params, batch: dict, cfg: Config, rng):
  return steps.excursion(model, params, batch, cfg, rng)


def answer_targets(batch: dict[str, np.ndarray], num_tokens: int) -> np.ndarray:
  """[B, A] ground-truth answer tokens (:func:`onn_jax.steps.answer_targets`, on the host)."""
  return np.array(steps.answer_targets(
      {k: np.asarray(batch[k]) for k in ("targets", "answer_start")}, num_tokens))


def score_rollouts(batch: dict[str, np.ndarray], tokens_BA: np.ndarray
                   ) -> dict[str, np.ndarray]:
  """Compares generated answers with the ground truth, position by position.

  Returns ``exact_B`` (bool: every answer token, END included, matches), ``correct_B``
  (matching answer tokens) and ``answer_len_B``; rows with no answer are never exact.
  The definition of EAVI's ``free_exact`` metric (:func:`onn_jax.steps.score_rollout`).
  """
  tokens_BA = np.asarray(tokens_BA)
  answer_len_B = np.asarray(batch["answer_len"])
  if np.any(answer_len_B > tokens_BA.shape[1]):
    raise ValueError(f"answers of up to {int(answer_len_B.max())} tokens, but only "
                     f"{tokens_BA.shape[1]} generated")
  scores = steps.score_rollout(tokens_BA, {k: np.asarray(batch[k]) for k in
                                           ("targets", "answer_start", "answer_len")})
  return {"exact_B": np.asarray(scores["exact_B"]), "correct_B": np.asarray(scores["correct_B"]),
          "answer_len_B": answer_len_B}


def answer_text(tokens_A: np.ndarray) -> str:
  """Generated tokens up to and including the first END, by name (``3 3 <nl> 3 3 <nl> <end>``);
  shows what a malformed answer holds."""
  tokens = [int(t) for t in np.asarray(tokens_A)]
  if END in tokens:
    tokens = tokens[:tokens.index(END) + 1]
  return " ".join(token_name(t) for t in tokens)


def _take_rows(batch: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
  return {key: value[rows] for key, value in batch.items()}


def rollouts(cfg: Config, params, tasks: Sequence[Task], *, feed: str = "argmax",
             seed: int = 0) -> list[dict]:
  """Decodes the answer of every test pair of ``tasks`` from its prompt, free running.

  ``feed`` is what is fed back (``argmax``: greedy decoding; ``soft`` or ``sample``: EAVI's
  excursion, as in :func:`onn_jax.steps.excursion`, always decoded one token after another:
  ``eavi.rollout`` is ignored, as the parallel rollout starts from the ground truth). Batches
  of ``eval.batch_size`` rows (the last padded with repeats), one compiled program for all;
  ``sample`` draws from ``seed`` folded with the batch's first row.

  Returns one record per test pair: ``task_id``, ``test_index``, ``test_input``, ``target``
  and ``prediction`` (an [h, w] grid, or None when the output is malformed), ``tokens`` (the
  emitted tokens) and ``text`` (:func:`answer_text`), ``exact`` (bool), ``correct`` and
  ``answer_len`` (answer tokens matched / in all, END included).
  """
  batch, items = task_batch(tasks, cfg)
  by_id = {task.id: task for task in tasks}
  # Free running is the sequential rollout, whatever EAVI trains with: the parallel one starts
  # from the ground truth (eavi.rollout=parallel).
  run_cfg = config.replace(cfg, eavi={"feed": feed, "rollout": "sequential"})
  model = outside_tf(Transformer(cfg.model))
  rows = cfg.eval.batch_size
  rng = jax.random.PRNGKey(seed)
  records = []
  for start in range(0, len(items), rows):
    index = np.arange(start, start + rows)
    index = np.where(index < len(items), index, start)  # pad with the chunk's first row
    chunk = _take_rows(batch, index)
    gen = _excursion_jit(model, params, {"inputs": jnp.asarray(chunk["inputs"]),
                                         "answer_start": jnp.asarray(chunk["answer_start"]),
                                         "answer_len": jnp.asarray(chunk["answer_len"])},
                         run_cfg, jax.random.fold_in(rng, start))
    tokens_BA = np.asarray(gen.tokens_BA)
    scores = score_rollouts(chunk, tokens_BA)
    for b in range(min(rows, len(items) - start)):
      task_id, test_index = items[start + b]
      test_input, target = by_id[task_id].test[test_index]
      records.append({
          "task_id": task_id, "test_index": test_index, "test_input": np.asarray(test_input),
          "target": np.asarray(target), "prediction": decode_grid(tokens_BA[b]),
          "tokens": tokens_BA[b], "text": answer_text(tokens_BA[b]),
          "exact": bool(scores["exact_B"][b]), "correct": int(scores["correct_B"][b]),
          "answer_len": int(chunk["answer_len"][b])})
  return records


def free_running_exact_match(cfg: Config, params, tasks: Sequence[Task]) -> float:
  """Fraction of the test pairs of ``tasks`` whose greedy free-running answer is exactly the
  target (see :func:`rollouts`)."""
  return float(summarise_rollouts(rollouts(cfg, params, tasks, feed="argmax"))["exact_match"])


def summarise_rollouts(records: Sequence[dict]) -> dict[str, float | int]:
  """``items``, ``exact_match`` (fraction exactly right), ``token_accuracy`` (answer tokens,
  END included, matched in place, over all of them) and ``malformed`` (answers that do not
  decode to a grid) of :func:`rollouts` records."""
  total = sum(r["answer_len"] for r in records)
  return {"items": len(records),
          "exact_match": float(np.mean([r["exact"] for r in records])) if records else 0.0,
          "token_accuracy": sum(r["correct"] for r in records) / max(total, 1),
          "malformed": sum(r["prediction"] is None for r in records)}


def render_rollouts(records: Sequence[dict], path: str | Path, label: str = "free running",
                    max_rows: int = 8) -> Path:
  """A sheet with one row per record: test input, target, and the decoded answer."""
  rows = [{"title": f"{r['task_id']} [{r['test_index']}]\n"
                    f"{'exact' if r['exact'] else 'miss'} {r['correct']}/{r['answer_len']}",
           "grids": [("test input", r["test_input"]), ("target", r["target"]),
                     (label, r["prediction"])]}
          for r in list(records)[:max_rows]]
  return plots.render_sheet(rows, path)
