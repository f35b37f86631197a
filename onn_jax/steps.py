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
from onn_jax.data.tokens import END, VOCAB_SIZE
from onn_jax.decode import generate
from onn_jax.model.transformer import Transformer, init_params

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


def _tree_where(pred, a, b):
  return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def _apply_grads(state: TrainState, grads, rng, cfg: Config, axis_name, report: dict,
                 routing: dict) -> tuple[TrainState, dict]:
  """Reduces gradients, takes an AdamW step unless anything is non-finite, and books metrics."""
  grads = objectives.psum(grads, axis_name)
  grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                          for g in jax.tree.leaves(grads)))
  finite = jnp.isfinite(report["loss"]) & jnp.isfinite(grad_norm)
  lr = learning_rate_schedule(cfg)(state.step)
  updates, new_opt = make_optimizer(cfg).update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, jax.tree.map(lambda u: lr * u, updates))
  # Finite loss and gradients can still give non-finite parameters (an overflowing update).
  finite &= jnp.all(jnp.array([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new_params)]))
  params = _tree_where(finite, new_params, state.params)
  opt_state = _tree_where(finite, new_opt, state.opt_state)
  ema = state.ema
  if cfg.train.ema_decay > 0:
    d = cfg.train.ema_decay
    ema = _tree_where(finite, jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params), ema)
  window = state.routing["window_tokens"] + jnp.where(finite, routing["tokens_per_expert"], 0)
  new_state = state.replace(
      step=state.step + 1, params=params, opt_state=opt_state, ema=ema,
      routing={"window_tokens": window}, rng=rng,
      nonfinite=jnp.where(finite, 0, state.nonfinite + 1),
      skipped=state.skipped + (~finite).astype(jnp.int32))
  metrics = dict(report)
  metrics.update(
      grad_norm=grad_norm, lr=lr,
      skipped=(~finite).astype(jnp.int32),
      experts_per_token=jnp.sum(routing["active_sum"]) / jnp.maximum(
          jnp.sum(routing["routed_tokens"]), 1),
      fallback_frac=jnp.sum(routing["fallback_tokens"]) / jnp.maximum(
          jnp.sum(routing["routed_tokens"]), 1),
      tokens_per_expert=routing["tokens_per_expert"],
      dead_experts=jnp.sum(window == 0).astype(jnp.int32))
  return new_state, metrics


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
    logits_BTV, _, aux = model.apply({"params": params}, batch["inputs"], batch["valid"])
    loss_stats = objectives.answer_stats(logits_BTV, batch["targets"], batch["loss_mask"])
    tokens = jnp.maximum(objectives.psum(loss_stats["tokens"], axis_name), 1.0)
    sdl_local, sdl_report = objectives.sdl(aux, cfg.model, axis_name, num_devices)
    # Reported accuracy and exact match are on the answer alone, even when the loss also
    # covers demo outputs (data.loss_on=outputs).
    answer = objectives.answer_stats(jax.lax.stop_gradient(logits_BTV), batch["targets"],
                                     answer_mask(batch))
    return loss_stats["ce_sum"] / tokens + sdl_local, (loss_stats, answer, sdl_report, aux)

  grads, (loss_stats, stats, sdl_report, aux) = jax.grad(loss_fn, has_aux=True)(state.params)
  sums = lambda tree: jax.tree.map(lambda x: objectives.psum(x, axis_name), tree)
  loss_stats, stats = sums(loss_stats), sums(stats)
  report = _answer_report(stats)
  report["loss_ce"] = loss_stats["ce_sum"] / jnp.maximum(loss_stats["tokens"], 1.0)
  report.update(sdl_report)
  report["loss"] = report["loss_ce"] + report["sdl"]
  report["target_tokens"] = loss_stats["tokens"]
  return _apply_grads(state, grads, state.rng, cfg, axis_name, report,
                      _reduce_routing(aux, axis_name))


def answer_budget(cfg: Config, seq_len: int) -> int:
  """Static excursion length: the longest answer the data can hold (rows of w+1, then END)."""
  g = cfg.data.max_grid
  return min(seq_len, g * (g + 1) + 1)


def excursion_inputs(batch: dict, fed_BAV: jax.Array) -> jax.Array:
  """[B, T, V] inputs for the alignment pass: the prompt as one-hot tokens, then the excursion
  (what the rollout fed back) from ``answer_start`` on; ground truth beyond the budget."""
  inputs_BT = batch["inputs"]
  A = fed_BAV.shape[1]
  k_BT = jnp.arange(inputs_BT.shape[1])[None] - batch["answer_start"][:, None]
  in_excursion_BT = (k_BT >= 0) & (k_BT < A)
  fed_BTV = jnp.take_along_axis(fed_BAV, jnp.clip(k_BT, 0, A - 1)[..., None], axis=1)
  onehot_BTV = jax.nn.one_hot(inputs_BT, VOCAB_SIZE, dtype=jnp.float32)
  return jnp.where(in_excursion_BT[..., None], fed_BTV, onehot_BTV)


def answer_mask(batch: dict) -> jax.Array:
  """[B, T] float: target positions that predict an answer token (incl. END)."""
  t_BT = jnp.arange(batch["inputs"].shape[1])[None]
  start_B1 = batch["answer_start"][:, None]
  return ((t_BT >= start_B1 - 1) & (t_BT < start_B1 + batch["answer_len"][:, None] - 1)
          ).astype(jnp.float32)


def excursion_mask(batch: dict, tokens_BA: jax.Array) -> jax.Array:
  """[B, T] float: the answer positions whose context the rollout really produced.

  Answer token k is predicted at position ``answer_start - 1 + k`` from the excursion's tokens
  0..k-1. A rollout that emitted END at index e never generates past it: predictions k <= e
  (the last one being the END decision itself) are scored, later ones would be trained on a
  context (END, then PAD) that never occurs when the model generates, so they are not.
  """
  end_BA = (tokens_BA == END).astype(jnp.int32)
  produced_BA = (jnp.cumsum(end_BA, axis=1) - end_BA) == 0  # no END strictly before k
  A = tokens_BA.shape[1]
  k_BT = jnp.arange(batch["inputs"].shape[1])[None] - batch["answer_start"][:, None] + 1
  produced_BT = jnp.take_along_axis(produced_BA, jnp.clip(k_BT, 0, A - 1), axis=1)
  # Beyond the rollout's budget the alignment pass feeds the ground truth (excursion_inputs):
  # those positions stay scored like teacher forcing.
  return answer_mask(batch) * (produced_BT | (k_BT >= A)).astype(jnp.float32)


def score_rollout(tokens_BA, batch: dict) -> dict:
  """Generated answers against the ground truth, position by position (free-running).

  Answer token k is ``targets[answer_start - 1 + k]`` for k < ``answer_len`` (the last is END).
  Returns ``exact_B`` (every answer token matches; rows with no answer never do) and
  ``correct_B`` (matching answer tokens).
  """
  A = tokens_BA.shape[1]
  k_BA = jnp.arange(A)[None]
  targets_BT = batch["targets"]
  gt_BA = jnp.take_along_axis(
      targets_BT, jnp.clip(batch["answer_start"][:, None] - 1 + k_BA, 0,
                           targets_BT.shape[1] - 1), axis=1)
  in_answer_BA = k_BA < batch["answer_len"][:, None]
  hit_BA = tokens_BA == gt_BA
  return {"exact_B": jnp.all(hit_BA | ~in_answer_BA, -1) & (batch["answer_len"] > 0),
          "correct_B": jnp.sum(hit_BA & in_answer_BA, -1)}


def excursion(model: Transformer, params, batch: dict, cfg: Config, rng, row_offset=0):
  """Stage 1 of EAVI: the free-running rollout from each prompt, with no gradient.

  Each row generates as many tokens as its ground-truth answer has (the alignment pass
  compares no more) and the loop stops calling the model once every row has, so the cost is
  that of the batch's longest answer. Tokens that would fall past the sequence (position >= T)
  are generated against a clamped cache position and never enter the alignment pass.
  """
  T = batch["inputs"].shape[1]
  return jax.lax.stop_gradient(generate(
      model, jax.lax.stop_gradient(params), batch["inputs"], batch["answer_start"],
      max_new=answer_budget(cfg, T), capacity=T, feed=cfg.eavi.feed,
      temperature=cfg.eavi.temperature, rng=rng, row_offset=row_offset,
      stop_after_B=batch["answer_len"]))


def alignment_loss(params, batch: dict, exc_BTV, exc_mask_BT=None, *, model: Transformer,
                   cfg: Config, axis_name=None, num_devices: int = 1):
  """Stage 2 of EAVI: one parallel pass over [prompt + excursion ; prompt + ground truth].

  The excursion half is scored on ``exc_mask_BT`` (:func:`excursion_mask`: what the rollout
  produced; default every answer position), the teacher-forced half on every answer position;
  both are normalised by the answer tokens, so an early END does not reweight the terms.
  """
  B = batch["inputs"].shape[0]
  mask_BT = answer_mask(batch)
  exc_mask_BT = mask_BT if exc_mask_BT is None else exc_mask_BT
  inputs = jnp.concatenate([exc_BTV, jax.nn.one_hot(batch["inputs"], VOCAB_SIZE)], 0)
  valid = jnp.concatenate([batch["valid"], batch["valid"]], 0)
  logits_2BTV, _, aux = model.apply({"params": params}, inputs, valid)
  stats_exc = objectives.answer_stats(logits_2BTV[:B], batch["targets"], exc_mask_BT)
  stats_tf = objectives.answer_stats(logits_2BTV[B:], batch["targets"], mask_BT)
  tokens = jnp.maximum(objectives.psum(stats_tf["tokens"], axis_name), 1.0)
  sdl_local, sdl_report = objectives.sdl(aux, cfg.model, axis_name, num_devices)
  e = cfg.eavi
  loss = (e.excursion_weight * stats_exc["ce_sum"] + e.tf_weight * stats_tf["ce_sum"]) / tokens
  return loss + sdl_local, (stats_exc, stats_tf, sdl_report, aux)


def eavi_step(state: TrainState, batch: dict, *, model: Transformer, cfg: Config,
              axis_name: str | None = None, num_devices: int = 1):
  """One EAVI step (DESIGN.md, Training): excursion under stop_gradient, then alignment."""
  rng, gen_rng = jax.random.split(state.rng)
  rows = batch["inputs"].shape[0]
  # Sampling keys follow global rows: n devices draw what one device would.
  row_offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * rows
  gen = excursion(model, state.params, batch, cfg, gen_rng, row_offset)
  exc_BTV = excursion_inputs(batch, gen.fed_BAV)
  grads, (stats_exc, stats_tf, sdl_report, aux) = jax.grad(alignment_loss, has_aux=True)(
      state.params, batch, exc_BTV, excursion_mask(batch, gen.tokens_BA), model=model,
      cfg=cfg, axis_name=axis_name, num_devices=num_devices)
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
  return _apply_grads(state, grads, rng, cfg, axis_name, report,
                      _reduce_routing(aux, axis_name))


# The two training stages of the seed, in the order a run takes them (onn_jax/stages.py).
stages.register(stages.Stage(
    name="pretrain", step=train_step, num_steps=lambda cfg: cfg.train.pretrain_steps,
    schedule=lambda cfg: warmup_cosine(cfg.train.learning_rate, cfg.train.warmup_steps,
                                       cfg.train.pretrain_steps, cfg.train.min_lr_ratio)))
stages.register(stages.Stage(
    name="eavi", step=eavi_step, num_steps=lambda cfg: cfg.train.eavi_steps,
    schedule=lambda cfg: warmup_cosine(cfg.eavi.learning_rate, cfg.eavi.warmup_steps,
                                       cfg.train.eavi_steps, cfg.train.min_lr_ratio)))
