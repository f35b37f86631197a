"""Train state, optimizer, and the per-device step functions (teacher forcing and EAVI).

Each step is a pure function ``state, batch -> state, metrics`` written for one device. Every
reduction over the batch (gradients, metric sums, routing counts) goes through
``axis_name``: ``None`` on one device, the mesh axis under ``shard_map`` / ``pmap``. Losses are
normalised by global token counts, so n devices give the single-device numbers.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from onn_jax import objectives, stages
from onn_jax.config import Config
from onn_jax.data.serialize import longest_answer
from onn_jax.data.tokens import VOCAB_SIZE
from onn_jax.decode import after_first_end, continuation_inputs, generate, parallel_rollout
from onn_jax.model.moe import merge_aux
from onn_jax.model.transformer import (Transformer, branch_valid, init_cache, init_params,
                                       outside_tf)

NO_DECAY_LEAVES = ("scale", "bias", "b_in", "b_out", "prototypes", "thresholds", "block_pos",
                   "embedding")


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken (pretrain and EAVI together)
  params: Any
  opt_state: Any
  ema: Any  # EMA of params, or {} when disabled
  routing: dict  # window_tokens [L, E]: tokens routed since the last expert reset
  rng: jax.Array  # uint32 [2]
  nonfinite: jax.Array  # int32: consecutive skipped (non-finite) steps
  skipped: jax.Array  # int32: skipped steps in total


def warmup_cosine(peak: float, warmup: int, num_steps: int, min_ratio: float
                  ) -> optax.Schedule:
  """Linear warmup to ``peak``, then cosine decay to ``peak * min_ratio`` at ``num_steps``."""
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(num_steps, warmup + 1),
                                            peak * min_ratio)


def learning_rate_schedule(cfg: Config) -> optax.Schedule:
  """The run's schedule: each registered stage's own, restarted where the stage begins."""
  return stages.learning_rate_schedule(cfg)


def decay_mask(params):
  """AdamW weight decay on matrices only: not on norms, biases, prototypes or thresholds."""
  def keep(path, _):
    return path[-1].key not in NO_DECAY_LEAVES
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
  """Clipping + AdamW at unit learning rate. The step scales the update by
  ``learning_rate_schedule(cfg)(state.step)``: the schedule follows the run's step, skipped
  non-finite steps included, so the logged rate, the applied rate and the pretrain -> EAVI
  switch agree (optax's own count advances only on applied updates)."""
  t = cfg.train
  return optax.chain(
      optax.clip_by_global_norm(t.grad_clip),
      optax.adamw(1.0, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decay_mask))


def init_state(cfg: Config, model: Transformer, rng: jax.Array, params=None) -> TrainState:
  init_rng, state_rng = jax.random.split(rng)
  if params is None:
    params = init_params(cfg.model, init_rng)
  m = cfg.model
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      opt_state=make_optimizer(cfg).init(params),
      ema=jax.tree.map(jnp.copy, params) if cfg.train.ema_decay > 0 else {},
      routing={"window_tokens": jnp.zeros((m.num_layers, m.num_experts), jnp.float32)},
      rng=state_rng, nonfinite=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32))


def ema_decay_at(decay: float, n: jax.Array) -> jax.Array:
  """The decay of the n-th EMA update (n = 1, 2, ...): ``decay (1 - decay^(n-1)) / (1 - decay^n)``.

  The EMA is then the bias-corrected average ``sum_k decay^(n-k) p_k / sum_k decay^(n-k)`` of
  the parameters after each step (as Adam corrects its moments): the first update takes the
  parameters whole (decay 0), so the initialisation keeps no weight, and the decay tends to
  ``decay``. With a constant ``decay`` instead, a 1500-step run at 0.999 would evaluate
  weights that are still 22% its random initialisation (0.999^1500)."""
  d = jnp.float32(decay)
  n = jnp.asarray(n, jnp.float32)
  return d * (1 - d ** (n - 1)) / (1 - d ** n)


def _tree_where(pred, a, b):
  return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


# Tried, not kept (session 33-34, H100): the update on one ravelled vector (gradients,
# parameters, Adam's moments and the EMA concatenated, the results unravelled into the same
# trees). Alone it costs what the tree update does (2.65 against 2.74 ms back to back; 0.94 with
# the moments and the EMA kept flat in the state, which would change the checkpoints' layout),
# and the arc1 step took 0.5 ms longer with it (docs/benchmarks.md, session 34).
def _guarded_update(state: TrainState, grads, ok, cfg: Config
                    ) -> tuple[TrainState, jax.Array, jax.Array]:
  """AdamW step at the schedule's rate unless ``ok`` (finite loss and gradients) is false or
  the rate is not finite; then the step is skipped and counted. Returns ``(state, lr,
  finite)``; ``state.step`` advances either way. Its operations carry the name scope
  ``optimizer``, so a profile (``train.bench --profile``) books their kernels there.

  The guard reads scalars only (the parameters are not checked leaf by leaf), so that XLA can
  fuse its selects into the update's own passes. From finite gradients at a finite rate an
  AdamW step moves each element by at most ``lr * (G / eps + weight_decay * |p|)``: G is the
  clip, or the gradients' largest entry (below 1.9e19 when their float32 norm is finite), eps
  optax's 1e-8, and the config keeps b1 and b2 below 1 in float32 (a bias correction of 0
  would divide by 0). That is finite for any rate a run trains at. A configuration absurd
  enough to overflow it (``train.learning_rate=1e30``, as the fault tests use) may leave
  non-finite values in the state, which usually make the next steps non-finite too (skipped,
  counted towards ``train.max_nonfinite``); such a state is never checkpointed
  (``checkpoint.save`` refuses it, naming the leaf) nor restored."""
  with jax.named_scope("optimizer"):
    lr = learning_rate_schedule(cfg)(state.step)
    finite = ok & jnp.isfinite(lr)
    updates, new_opt = make_optimizer(cfg).update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, jax.tree.map(lambda u: lr * u, updates))
    params = _tree_where(finite, new_params, state.params)
    ema = state.ema
    if cfg.train.ema_decay > 0:
      d = ema_decay_at(cfg.train.ema_decay, state.step + 1)
      ema = _tree_where(finite, jax.tree.map(lambda e, p: (d * e + (1 - d) * p).astype(e.dtype),
                                             ema, params), ema)
    state = state.replace(
        step=state.step + 1, params=params,
        opt_state=_tree_where(finite, new_opt, state.opt_state),
        ema=ema, nonfinite=jnp.where(finite, 0, state.nonfinite + 1),
        skipped=state.skipped + (~finite).astype(jnp.int32))
  return state, lr, finite


def _routing_metrics(routing: dict, window_LE: jax.Array) -> dict:
  """Experts per token, fallback fraction, tokens per expert, dead experts in the window."""
  routed = jnp.maximum(jnp.sum(routing["routed_tokens"]), 1)
  return {"experts_per_token": jnp.sum(routing["active_sum"]) / routed,
          "fallback_frac": jnp.sum(routing["fallback_tokens"]) / routed,
          "tokens_per_expert": routing["tokens_per_expert"],
          "dead_experts": jnp.sum(window_LE == 0).astype(jnp.int32)}


def _finish_step(state: TrainState, grads, report: dict, aux, *, cfg: Config, axis_name
                 ) -> tuple[TrainState, dict]:
  """The end of every training step: reduce the gradients and routing counts over devices,
  update unless anything is non-finite, count the routing window, book the metrics."""
  grads = objectives.psum(grads, axis_name)
  with jax.named_scope("optimizer"):  # the global norm the guard reads (a profile's scope)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                            for g in jax.tree.leaves(grads)))
  ok = jnp.isfinite(report["loss"]) & jnp.isfinite(grad_norm)
  state, lr, finite = _guarded_update(state, grads, ok, cfg)
  routing = _reduce_routing(aux, axis_name)
  window = state.routing["window_tokens"] + jnp.where(finite, routing["tokens_per_expert"], 0)
  state = state.replace(routing={"window_tokens": window})
  return state, {**report, "grad_norm": grad_norm, "lr": lr,
                 "skipped": (~finite).astype(jnp.int32), "nonfinite": state.nonfinite,
                 **_routing_metrics(routing, window)}


def _reduce_routing(aux, axis_name):
  return jax.tree.map(lambda x: objectives.psum(x, axis_name), objectives.routing_sums(aux))


def _answer_report(stats: dict, prefix: str = "") -> dict:
  tokens = jnp.maximum(stats["tokens"], 1.0)
  return {f"{prefix}ce": stats["ce_sum"] / tokens,
          f"{prefix}answer_acc": stats["correct"] / tokens,
          f"{prefix}answer_exact": stats["exact"] / jnp.maximum(stats["examples"], 1.0)}


def train_step(state: TrainState, batch: dict, *, model: Transformer, cfg: Config,
               axis_name: str | None = None, num_devices: int = 1):
  """One teacher-forcing step: shifted next-token CE on the loss mask + SDL."""

  def loss_fn(params):
    logits_BTV, _, aux = model.apply({"params": params}, batch["inputs"], batch["valid"],
                                     segment_start_BT=batch.get("segment_start"))
    loss_stats = objectives.answer_stats(logits_BTV, batch["targets"], batch["loss_mask"])
    tokens = jnp.maximum(objectives.psum(loss_stats["tokens"], axis_name), 1.0)
    sdl_local, sdl_report = objectives.sdl(aux, cfg.model, axis_name, num_devices)
    # Reported accuracy and exact match are on the answer alone, even when the loss also
    # covers demo outputs (data.loss_on=outputs).
    answer = objectives.answer_stats(jax.lax.stop_gradient(logits_BTV), batch["targets"],
                                     answer_mask(batch), batch.get("segment_start"))
    return loss_stats["ce_sum"] / tokens + sdl_local, (loss_stats, answer, sdl_report, aux)

  grads, (loss_stats, stats, sdl_report, aux) = jax.grad(loss_fn, has_aux=True)(state.params)
  sums = lambda tree: jax.tree.map(lambda x: objectives.psum(x, axis_name), tree)
  loss_stats, stats = sums(loss_stats), sums(stats)
  report = _answer_report(stats)
  report["loss_ce"] = loss_stats["ce_sum"] / jnp.maximum(loss_stats["tokens"], 1.0)
  report.update(sdl_report)
  report["loss"] = report["loss_ce"] + report["sdl"]
  report["target_tokens"] = loss_stats["tokens"]
  return _finish_step(state, grads, report, aux, cfg=cfg, axis_name=axis_name)


def answer_budget(batch: dict, cfg: Config) -> int:
  """Static excursion length A: the width of the batch's ``answer_tokens`` (the longest answer
  of its bucket, or ``eavi.budget_quantile``'s quantile of its answers:
  :attr:`onn_jax.data.pipeline.BatchStream.answer_budgets`), else the longest answer
  ``data.max_grid`` allows (rows of w+1, then END), at most the sequence."""
  if "answer_tokens" in batch:
    return batch["answer_tokens"].shape[1]
  return min(batch["inputs"].shape[1], longest_answer(cfg.data.max_grid))


def answer_index(batch: dict) -> jax.Array:
  """[B, T] int32: ``k`` such that position t predicts answer token k (``t = answer_start - 1
  + k``); answer token k itself is input t + 1. The one definition of the answer's span: answer
  tokens are ``0 <= k < answer_len``, the last being END."""
  t_BT = jnp.arange(batch["inputs"].shape[1], dtype=jnp.int32)[None]
  return t_BT - jnp.asarray(batch["answer_start"], jnp.int32)[:, None] + 1


def answer_mask(batch: dict) -> jax.Array:
  """[B, T] float: target positions that predict an answer token (incl. END). A packed batch
  (several answers per row) carries it as ``batch["answer_mask"]``."""
  if "answer_mask" in batch:
    return batch["answer_mask"]
  k_BT = answer_index(batch)
  return ((k_BT >= 0) & (k_BT < batch["answer_len"][:, None])).astype(jnp.float32)


def answer_positions(batch: dict, num_tokens: int) -> jax.Array:
  """[B, A] int32, A = ``num_tokens``: the position that predicts answer token k
  (``answer_start - 1 + k``), clipped to the sequence."""
  t_BA = jnp.asarray(batch["answer_start"], jnp.int32)[:, None] - 1 + jnp.arange(num_tokens)[None]
  return jnp.clip(t_BA, 0, batch["targets"].shape[1] - 1)


def answer_targets(batch: dict, num_tokens: int) -> jax.Array:
  """[B, A] ground-truth answer tokens, A = ``num_tokens``: position k < ``answer_len`` holds
  answer token k (the last END); later ones are whatever follows and never compared."""
  return jnp.take_along_axis(batch["targets"], answer_positions(batch, num_tokens), axis=1)


def excursion_inputs(batch: dict, fed_BAV: jax.Array) -> jax.Array:
  """[B, T, V] inputs for the alignment pass: the prompt as one-hot tokens, then the excursion
  (what the rollout fed back) from ``answer_start`` on; ground truth beyond the budget."""
  return continuation_inputs(batch["inputs"], batch["answer_start"], fed_BAV)


def excursion_span(batch: dict, num_tokens: int) -> jax.Array:
  """[B, T] float: the answer positions an excursion of ``num_tokens`` (the budget A) predicts,
  answer tokens ``k < A``. An answer longer than the budget (``eavi.budget_quantile``) is
  scored past it by the teacher-forcing term alone."""
  return answer_mask(batch) * (answer_index(batch) < num_tokens).astype(jnp.float32)


def excursion_mask(batch: dict, tokens_BA: jax.Array) -> jax.Array:
  """[B, T] float: the answer positions whose context the rollout really produced.

  Answer token k is predicted at position ``answer_start - 1 + k`` from the excursion's tokens
  0..k-1. A rollout that emitted END at index e never generates past it: predictions k <= e
  (the last one being the END decision itself) are scored, later ones would be trained on a
  context (END, then PAD) that never occurs when the model generates, so they are not; nor
  are those past the rollout's A tokens (:func:`excursion_span`).
  """
  produced_BA = ~after_first_end(tokens_BA)  # no END strictly before k
  A = tokens_BA.shape[1]
  produced_BT = jnp.take_along_axis(produced_BA, jnp.clip(answer_index(batch), 0, A - 1), axis=1)
  return excursion_span(batch, A) * produced_BT.astype(jnp.float32)


def score_rollout(tokens_BA, batch: dict) -> dict:
  """Generated answers against the ground truth, position by position (free-running).

  Returns ``exact_B`` (every answer token, END included, matches; rows with no answer never
  do, nor rows whose answer is longer than the A tokens generated: eavi.budget_quantile) and
  ``correct_B`` (matching answer tokens among the A).
  """
  A = tokens_BA.shape[1]
  in_answer_BA = jnp.arange(A)[None] < batch["answer_len"][:, None]
  hit_BA = tokens_BA == answer_targets(batch, A)
  whole_B = (batch["answer_len"] > 0) & (batch["answer_len"] <= A)
  return {"exact_B": jnp.all(hit_BA | ~in_answer_BA, -1) & whole_B,
          "correct_B": jnp.sum(hit_BA & in_answer_BA, -1)}


def excursion(model: Transformer, params, batch: dict, cfg: Config, rng, row_offset=0,
              first_logits_BAV=None, prompt_cache=None):
  """Stage 1 of EAVI: the free-running rollout from each prompt, with no gradient.

  Each row generates as many tokens as its ground-truth answer has, at most the budget A (the
  alignment pass compares no more), and the loop stops calling the model once every row has,
  so the cost is that of the batch's longest answer (rounded up to ``decode.STEPS_PER_CHECK``
  steps). Tokens that would fall past the sequence (position >= T) are generated against a
  clamped cache position and never enter the alignment pass.
  With ``eavi.rollout=parallel`` the same rollout is iterated from the ground truth, every
  token at once, up to ``eavi.passes`` times (:func:`onn_jax.decode.parallel_rollout`), each
  pass against the prompt's cache or over whole rows (:func:`continuation`); its
  first pass from ``first_logits_BAV`` when given (the teacher-forced logits of each answer
  token, :func:`rows_alignment_after_rollout`), and its passes against ``prompt_cache`` when
  given (the teacher-forced sequence's, :func:`branch_alignment_after_rollout`). The
  sequential rollout takes, with ``prompt_cache``, the logits of answer token 0
  (``first_logits_BAV[:, 0]``) in place of its own prefill, and decodes into that cache.
  """
  T = batch["inputs"].shape[1]
  e, A = cfg.eavi, answer_budget(batch, cfg)
  how = dict(capacity=T, feed=e.feed, temperature=e.temperature, rng=rng, row_offset=row_offset,
             stop_after_B=jnp.minimum(batch["answer_len"], A))
  params = jax.lax.stop_gradient(params)
  if e.rollout == "parallel":  # every token at once, from the ground truth on
    return jax.lax.stop_gradient(parallel_rollout(
        model, params, batch["inputs"], batch["answer_start"], answer_targets(batch, A),
        passes=e.passes, shared_prompt=continuation(cfg) == "branch",
        first_logits_BAV=first_logits_BAV, prompt_cache=prompt_cache, **how))
  # (first logits without the cache, a rows alignment's: its own prefill computes them again)
  first_BV = (first_logits_BAV[:, 0] if prompt_cache is not None and first_logits_BAV is not None
              else None)
  return jax.lax.stop_gradient(generate(model, params, batch["inputs"], batch["answer_start"],
                                        max_new=A, prompt_cache=prompt_cache,
                                        first_logits_BV=first_BV, **how))


def alignment_loss(params, batch: dict, fed_BAV, exc_mask_BT=None, *, model: Transformer,
                   cfg: Config, axis_name=None, num_devices: int = 1):
  """Stage 2 of EAVI: one pass over each prompt + ground truth, with the excursion as a branch.

  The model runs the teacher-forced sequence and, sharing its prompt (computed once), the
  excursion fed from ``answer_start`` on (``Transformer`` mode ``"branch"``): the same logits
  as two rows [prompt + excursion ; prompt + ground truth] (:func:`alignment_loss_rows`)
  for about the cost of one plus the answer. Answer token 0 is predicted from the prompt alone
  (the same logits in both); token k >= 1 of the excursion term from its branch position k - 1.
  The excursion term is scored on ``exc_mask_BT`` (:func:`excursion_mask`: what the rollout
  produced; default every answer position of the excursion, :func:`excursion_span`), the
  teacher-forced one on every answer position;
  both are normalised by the answer tokens, so an early END does not reweight the terms. The
  SDL statistics cover the tokens computed (the prompt once).
  """
  T = batch["inputs"].shape[1]
  logits_BXV, _, aux = model.apply({"params": params}, batch["inputs"], batch["valid"],
                                   mode="branch", pos_B=jnp.asarray(batch["answer_start"],
                                                                    jnp.int32),
                                   branch_BAV=fed_BAV)
  return _branch_objective(logits_BXV[:, T:], logits_BXV[:, :T], aux, batch, exc_mask_BT, cfg,
                           axis_name, num_devices)


def _branch_objective(branch_BAV, tf_logits_BTV, aux, batch: dict, exc_mask_BT, cfg: Config,
                      axis_name, num_devices: int):
  """:func:`_alignment_objective` of the excursion's logits as a branch (``branch_BAV``: the
  logits of each fed token; answer token 0 from the teacher-forced logits before the answer)
  and of the teacher-forced sequence's (:func:`alignment_loss`)."""
  T, A = tf_logits_BTV.shape[1], branch_BAV.shape[1]
  mask_BT = answer_mask(batch)
  exc_mask_BT = excursion_span(batch, A) if exc_mask_BT is None else exc_mask_BT
  start_B = jnp.asarray(batch["answer_start"], jnp.int32)
  first_B1V = jnp.take_along_axis(tf_logits_BTV, jnp.maximum(start_B - 1, 0)[:, None, None],
                                  axis=1)
  exc_logits_BAV = jnp.concatenate([first_B1V, branch_BAV[:, :A - 1]], axis=1)
  # Answer token k sits at target position answer_start - 1 + k of the sequence.
  t_BA = start_B[:, None] - 1 + jnp.arange(A)[None]
  exc_mask_BA = jnp.where(t_BA < T, jnp.take_along_axis(exc_mask_BT, jnp.clip(t_BA, 0, T - 1),
                                                        axis=1), 0.0)
  stats_exc = objectives.answer_stats(exc_logits_BAV, answer_targets(batch, A), exc_mask_BA)
  stats_tf = objectives.answer_stats(tf_logits_BTV, batch["targets"], mask_BT)
  return _alignment_objective(stats_exc, stats_tf, aux, cfg, axis_name, num_devices)


def alignment_loss_rows(params, batch: dict, fed_BAV, exc_mask_BT=None, *,
                        model: Transformer, cfg: Config, axis_name=None, num_devices: int = 1):
  """:func:`alignment_loss` as two full rows [prompt + excursion ; prompt + ground truth] (the
  prompt computed twice): the reference the branch pass is tested against, and
  ``eavi.continuation=rows`` (:func:`continuation`)."""
  B = batch["inputs"].shape[0]
  exc_mask_BT = (excursion_span(batch, fed_BAV.shape[1]) if exc_mask_BT is None
                 else exc_mask_BT)
  inputs = jnp.concatenate([excursion_inputs(batch, fed_BAV),
                            jax.nn.one_hot(batch["inputs"], VOCAB_SIZE)], 0)
  valid = jnp.concatenate([batch["valid"], batch["valid"]], 0)
  logits_2BTV, _, aux = model.apply({"params": params}, inputs, valid)
  return _rows_objective(logits_2BTV[:B], logits_2BTV[B:], aux, batch, exc_mask_BT, cfg,
                         axis_name, num_devices)


def _rows_objective(exc_logits_BTV, tf_logits_BTV, aux, batch: dict, exc_mask_BT, cfg: Config,
                    axis_name, num_devices: int):
  """:func:`_alignment_objective` of the excursion rows (scored on ``exc_mask_BT``) and the
  teacher-forced rows (on every answer position)."""
  stats_exc = objectives.answer_stats(exc_logits_BTV, batch["targets"], exc_mask_BT)
  stats_tf = objectives.answer_stats(tf_logits_BTV, batch["targets"], answer_mask(batch))
  return _alignment_objective(stats_exc, stats_tf, aux, cfg, axis_name, num_devices)


def rows_alignment_after_rollout(params, batch: dict, rng, row_offset=0, *,
                                 model: Transformer, cfg: Config, axis_name=None,
                                 num_devices: int = 1):
  """The parallel rollout and :func:`alignment_loss_rows` with the teacher-forced rows run
  first: their logits at the answer positions are the rollout's first pass (the ground truth
  fed after the prompt), so the rollout runs one pass fewer. The two halves of the alignment
  are then two model calls (their routing statistics merged, :func:`moe.merge_aux`), each
  differentiated by its own ``jax.vjp``: the gradient is :func:`alignment_loss_rows`'. With a
  sparse expert dispatch (``model.moe_impl`` ragged, tiled, batched) each call of B rows
  decides on its own whether it overflows the capacity and computes the dense fallback (which
  carries the gate's straight-through gradient that the sparse path leaves out), where
  ``alignment_loss_rows`` decides once for the 2B rows: the gradients then differ when the two
  decisions do.

  Returns ``(generation, grads, (stats_exc, stats_tf, sdl_report, aux))``.
  """
  A = answer_budget(batch, cfg)

  def rows(p, inputs_BTV):
    logits_BTV, _, aux = model.apply({"params": p}, inputs_BTV, batch["valid"])
    return logits_BTV, aux

  tf_out, tf_vjp = jax.vjp(lambda p: rows(p, jax.nn.one_hot(batch["inputs"], VOCAB_SIZE)),
                           params)
  first_BAV = jnp.take_along_axis(tf_out[0], answer_positions(batch, A)[..., None], axis=1)
  gen = excursion(model, params, batch, cfg, rng, row_offset, first_logits_BAV=first_BAV)
  exc_out, exc_vjp = jax.vjp(lambda p: rows(p, excursion_inputs(batch, gen.fed_BAV)), params)
  exc_mask_BT = excursion_mask(batch, gen.tokens_BA)

  (d_exc, d_tf), out = _two_calls_objective(_rows_objective, exc_out, tf_out, batch, exc_mask_BT,
                                            cfg, axis_name, num_devices)
  grads = jax.tree.map(jnp.add, exc_vjp(d_exc)[0], tf_vjp(d_tf)[0])
  return gen, grads, out


def _two_calls_objective(score, exc_out, tf_out, batch: dict, exc_mask_BT, cfg: Config,
                         axis_name, num_devices: int):
  """``score`` (:func:`_rows_objective`, :func:`_branch_objective`) of the excursion's and the
  teacher forcing's model calls, each ``(logits, aux)``, their routing statistics merged:
  ``((d_exc, d_tf), (stats_exc, stats_tf, sdl_report, aux))``, the cotangents of both."""
  def objective(exc, tf):
    return score(exc[0], tf[0], merge_aux(exc[1], tf[1], cfg.model.sdl_target_active), batch,
                 exc_mask_BT, cfg, axis_name, num_devices)

  _, objective_vjp, out = jax.vjp(objective, exc_out, tf_out, has_aux=True)
  return objective_vjp(jnp.ones((), jnp.float32)), out


def branch_alignment_after_rollout(params, batch: dict, rng, row_offset=0, *,
                                   model: Transformer, cfg: Config, axis_name=None,
                                   num_devices: int = 1):
  """The rollout and :func:`alignment_loss` with the teacher-forced sequence run first, in
  ``"prefill"`` mode: its logits at the answer positions are the parallel rollout's first pass
  (the sequential one's first token), and its KV cache holds the prompt for the rollout (no
  prefill of its own: the parallel one's other passes, the sequential one's one-token steps)
  and for the excursion, which then runs as an ``"extend"`` of it (what ``"branch"`` mode computes,
  split in two calls whose routing statistics are merged, :func:`moe.merge_aux`). Each call is
  differentiated by its own ``jax.vjp``; the excursion's cotangent of the cache joins the
  teacher-forced call's backward pass, so the gradient is :func:`alignment_loss`'. With a
  sparse expert dispatch each call decides its dense fallback on its own (as in
  :func:`rows_alignment_after_rollout`).

  Returns ``(generation, grads, (stats_exc, stats_tf, sdl_report, aux))``.
  """
  B, T = batch["inputs"].shape
  A = answer_budget(batch, cfg)
  start_B = jnp.asarray(batch["answer_start"], jnp.int32)

  def teacher_forced(p):
    logits_BTV, cache, aux = model.apply({"params": p}, batch["inputs"], batch["valid"],
                                         mode="prefill", cache=init_cache(model.cfg, B, T))
    return (logits_BTV, aux), cache

  (tf_out, cache), tf_vjp = jax.vjp(teacher_forced, params)
  first_BAV = jnp.take_along_axis(tf_out[0], answer_positions(batch, A)[..., None], axis=1)
  gen = excursion(model, params, batch, cfg, rng, row_offset, first_logits_BAV=first_BAV,
                  prompt_cache=jax.lax.stop_gradient(cache))

  def branch(p, prompt_cache):
    valid_BA = branch_valid(batch["valid"], start_B, A)  # as in "branch" mode
    logits_BAV, _, aux = model.apply({"params": p}, gen.fed_BAV, valid_BA, mode="extend",
                                     cache=prompt_cache, pos_B=start_B)
    return logits_BAV, aux

  exc_out, exc_vjp = jax.vjp(branch, params, cache)
  exc_mask_BT = excursion_mask(batch, gen.tokens_BA)

  (d_exc, d_tf), out = _two_calls_objective(_branch_objective, exc_out, tf_out, batch,
                                            exc_mask_BT, cfg, axis_name, num_devices)
  d_params, d_cache = exc_vjp(d_exc)
  grads = jax.tree.map(jnp.add, d_params, tf_vjp((d_tf, d_cache))[0])
  return gen, grads, out


def continuation(cfg: Config) -> str:
  """How EAVI computes a prompt's continuations (the parallel rollout's passes and the alignment
  pass): ``eavi.continuation``, "auto" being "branch" on every backend. H200, arc1 at 32 x 2048
  (docs/bench/eavi_offset_path_ab_h200_2026-12-04.json, eavi_branch_after_rollout_*): with
  NSA's fast path for a continuation's queries (``nsa.PALLAS_OFFSET_MIN_QUERIES``) the
  alignment's fwd+bwd takes 91.3 ms as a branch against 106.0 as rows, the rollout's 4 passes
  73.0 against 82.4, and the EAVI step with the parallel rollout 131.7 against 177.8. (Before
  that path, rows were faster on GPU: 125.8 against 144.0 ms, 2026-12-02.)"""
  return "branch" if cfg.eavi.continuation == "auto" else cfg.eavi.continuation


def _alignment_objective(stats_exc, stats_tf, aux, cfg: Config, axis_name, num_devices: int):
  """``(excursion_weight * exc CE + tf_weight * TF CE) / answer tokens + SDL``, with the stats."""
  tokens = jnp.maximum(objectives.psum(stats_tf["tokens"], axis_name), 1.0)
  sdl_local, sdl_report = objectives.sdl(aux, cfg.model, axis_name, num_devices)
  e = cfg.eavi
  loss = (e.excursion_weight * stats_exc["ce_sum"] + e.tf_weight * stats_tf["ce_sum"]) / tokens
  return loss + sdl_local, (stats_exc, stats_tf, sdl_report, aux)


def eavi_step(state: TrainState, batch: dict, *, model: Transformer, cfg: Config,
              axis_name: str | None = None, num_devices: int = 1):
  """One EAVI step: the excursion under stop_gradient and the alignment pass, the alignment's
  teacher forcing first unless the sequential rollout meets ``eavi.continuation=rows``
  (``model.moe_impl=auto`` runs its experts dense here: :func:`transformer.outside_tf`)."""
  model = outside_tf(model)
  rng, gen_rng = jax.random.split(state.rng)
  rows = batch["inputs"].shape[0]
  # Sampling keys follow global rows: n devices draw what one device would.
  row_offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * rows
  as_rows = continuation(cfg) == "rows"
  if as_rows and cfg.eavi.rollout == "sequential":  # a rollout with its own prefill, then rows
    gen = excursion(model, state.params, batch, cfg, gen_rng, row_offset)
    grads, (stats_exc, stats_tf, sdl_report, aux) = jax.grad(alignment_loss_rows, has_aux=True)(
        state.params, batch, gen.fed_BAV, excursion_mask(batch, gen.tokens_BA), model=model,
        cfg=cfg, axis_name=axis_name, num_devices=num_devices)
  else:  # the alignment's teacher forcing first: the parallel rollout's first pass, and as a
    # branch the prompt's KV cache for either rollout
    after = rows_alignment_after_rollout if as_rows else branch_alignment_after_rollout
    gen, grads, (stats_exc, stats_tf, sdl_report, aux) = after(
        state.params, batch, gen_rng, row_offset, model=model, cfg=cfg, axis_name=axis_name,
        num_devices=num_devices)
  sums = lambda s: jax.tree.map(lambda x: objectives.psum(x, axis_name), s)
  stats_exc, stats_tf = sums(stats_exc), sums(stats_tf)
  report = _answer_report(stats_tf)
  report.update(_answer_report(stats_exc, "exc_"))
  report.update(sdl_report)
  # The objective itself: both CE sums over the answer tokens (exc_ce is per produced token).
  report["loss"] = (cfg.eavi.excursion_weight * stats_exc["ce_sum"]
                    + cfg.eavi.tf_weight * stats_tf["ce_sum"]) / jnp.maximum(
                        stats_tf["tokens"], 1.0) + report["sdl"]
  report["exc_scored_frac"] = stats_exc["tokens"] / jnp.maximum(stats_tf["tokens"], 1.0)
  report["target_tokens"] = stats_tf["tokens"]
  # Free-running quality of the rollout itself: its argmax tokens against the ground truth.
  rollout = score_rollout(gen.tokens_BA, batch)
  free = sums({"exact": jnp.sum(rollout["exact_B"]).astype(jnp.float32),
               "examples": jnp.sum(batch["answer_len"] > 0).astype(jnp.float32),
               "correct": jnp.sum(rollout["correct_B"]).astype(jnp.float32),
               "tokens": jnp.sum(jnp.minimum(batch["answer_len"], gen.tokens_BA.shape[1])
                                 ).astype(jnp.float32)})
  report["free_exact"] = free["exact"] / jnp.maximum(free["examples"], 1.0)
  report["free_token_acc"] = free["correct"] / jnp.maximum(free["tokens"], 1.0)
  if gen.passes is not None:  # eavi.rollout=parallel: how far from generate's rollout
    exact = sums({"rows": jnp.sum(gen.exact_B & (batch["answer_len"] > 0)).astype(jnp.float32)})
    report["rollout_exact"] = exact["rows"] / jnp.maximum(free["examples"], 1.0)
    passes = gen.passes if axis_name is None else jax.lax.pmax(gen.passes, axis_name)
    report["rollout_passes"] = passes.astype(jnp.float32)  # the most any device ran
  return _finish_step(state.replace(rng=rng), grads, report, aux, cfg=cfg,
                      axis_name=axis_name)


# The two training stages of the seed, in the order a run takes them (onn_jax/stages.py); EAVI
# also takes every train.eavi_every-th step of teacher forcing.
stages.register(stages.Stage(
    name="pretrain", step=train_step, num_steps=lambda cfg: cfg.train.pretrain_steps,
    packs=True,
    schedule=lambda cfg: warmup_cosine(cfg.train.learning_rate, cfg.train.warmup_steps,
                                       cfg.train.pretrain_steps, cfg.train.min_lr_ratio)))
stages.register(stages.Stage(
    name="eavi", step=eavi_step, num_steps=lambda cfg: cfg.train.eavi_steps,
    interleave=lambda cfg: cfg.train.eavi_every,
    answer_groups=lambda cfg: tuple(cfg.eavi.answer_groups),
    schedule=lambda cfg: warmup_cosine(cfg.eavi.learning_rate, cfg.eavi.warmup_steps,
                                       cfg.train.eavi_steps, cfg.train.min_lr_ratio)))
