"""Losses and metrics: shifted next-token cross-entropy, the SDL regulariser, answer accuracy.

Every quantity is returned as a *local* sum together with its count, so that a data-parallel
step can add sums and counts over devices and get exactly the single-device numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from onn_jax.config import ModelConfig


def psum(x, axis_name):
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def token_cross_entropy(logits_BTV, targets_BT):
  """-log p(target) per position: [B, T] float32. ``targets`` are the inputs shifted by one."""
  logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), -1)
  return -jnp.take_along_axis(logp_BTV, targets_BT[..., None], -1)[..., 0]


def answer_stats(logits_BTV, targets_BT, mask_BT, segment_start_BT=None):
  """Local sums: masked CE, masked count, correct tokens and fully-correct examples.

  An example is a row, or with ``segment_start_BT`` (packed rows) each sequence of a row.
  """
  mask_BT = mask_BT.astype(jnp.float32)
  ce_BT = token_cross_entropy(logits_BTV, targets_BT)
  hit_BT = (jnp.argmax(logits_BTV, -1) == targets_BT).astype(jnp.float32)
  if segment_start_BT is None:
    has_answer = jnp.sum(mask_BT, -1) > 0
    exact = jnp.all((hit_BT > 0) | (mask_BT == 0), -1) & has_answer
  else:  # per sequence: a sequence is named by its start, so [B, T] counters suffice
    B, T = mask_BT.shape
    rows_BT = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
    per_seq = lambda x_BT: jnp.zeros((B, T), jnp.float32).at[rows_BT, segment_start_BT].add(
        x_BT)  # noqa: E731
    has_answer = per_seq(mask_BT) > 0
    exact = (per_seq(mask_BT * (1.0 - hit_BT)) == 0) & has_answer
  return {
      "ce_sum": jnp.sum(ce_BT * mask_BT),
      "tokens": jnp.sum(mask_BT),
      "correct": jnp.sum(hit_BT * mask_BT),
      "exact": jnp.sum(exact.astype(jnp.float32)),
      "examples": jnp.sum(has_answer.astype(jnp.float32)),
  }


def sdl(aux, cfg: ModelConfig, axis_name=None, num_devices: int = 1):
  """The sparse-diversity loss (DynMoE), averaged over layers.

  diversity: ``||P^ P^T - I||^2`` (identical on every device, so each contributes 1/n);
  sparsity: ``(f - target)^2`` with ``f`` the global mean straight-through active fraction.
  A gated attention (``aux["attn"]``, dynsmlora) adds its gate's SDL with the same weights,
  reported as ``attn_sdl_*`` with its routing (``attn_experts_per_token``,
  ``attn_fallback_frac``); ``sdl`` is the total.

  Returns ``(local_loss, report)``: ``local_loss`` summed over devices has the gradient of the
  global SDL; the sparsity term is linearised at the global ``f`` (exact gradient:
  ``d(f - t)^2 = 2 (f - t) df``, and ``f`` is a sum of per-device parts).
  """
  local, report = _gate_sdl(aux, cfg, axis_name, num_devices)
  if "attn" in aux:
    attn_local, attn_report = _gate_sdl(aux["attn"], cfg, axis_name, num_devices)
    tokens = jnp.maximum(jnp.sum(psum(aux["attn"]["num_tokens"], axis_name)), 1.0)
    attn_report["experts_per_token"] = jax.lax.stop_gradient(jnp.sum(psum(
        aux["attn"]["experts_per_token"] * aux["attn"]["num_tokens"], axis_name)) / tokens)
    attn_report["fallback_frac"] = jax.lax.stop_gradient(
        jnp.sum(psum(aux["attn"]["fallback_tokens"], axis_name)) / tokens)
    local = local + attn_local
    report["sdl"] = report["sdl"] + attn_report["sdl"]
    report.update({f"attn_{k}": v for k, v in attn_report.items()})
  return local, report


def _gate_sdl(aux, cfg: ModelConfig, axis_name, num_devices: int):
  """:func:`sdl` of one kind of gate (the DynMoE layers, or a gated attention)."""
  active_sum_L = psum(aux["st_active_sum"], axis_name)
  tokens_L = jnp.maximum(psum(aux["num_tokens"], axis_name), 1.0)
  frac_L = active_sum_L / tokens_L
  sparsity_L = (frac_L - cfg.sdl_target_active) ** 2
  frac_stop_L = jax.lax.stop_gradient(frac_L)
  sparsity_local_L = 2 * (frac_stop_L - cfg.sdl_target_active) * aux["st_active_sum"] / \
      jax.lax.stop_gradient(tokens_L)
  diversity = jnp.mean(aux["diversity"])
  local = (cfg.sdl_diversity_weight * diversity / num_devices
           + cfg.sdl_sparsity_weight * jnp.mean(sparsity_local_L))
  report = {"sdl_diversity": diversity,
            "sdl_sparsity": jax.lax.stop_gradient(jnp.mean(sparsity_L))}
  report["sdl"] = (cfg.sdl_diversity_weight * report["sdl_diversity"]
                   + cfg.sdl_sparsity_weight * report["sdl_sparsity"])
  return local, report


def routing_sums(aux):
  """Routing counts of one step, per layer: tokens per expert [L, E] and scalars [L]."""
  return {
      "tokens_per_expert": jax.lax.stop_gradient(aux["tokens_per_expert"]),
      "fallback_tokens": jax.lax.stop_gradient(aux["fallback_tokens"]),
      "routed_tokens": jax.lax.stop_gradient(aux["num_tokens"]),
      "active_sum": jax.lax.stop_gradient(aux["experts_per_token"] * aux["num_tokens"]),
  }
