"""The Tiny-ONN transformer: pre-norm blocks of attention and DynMoE feed-forward.

``x + Attn(RMSNorm(x))``, ``x + DynMoE(RMSNorm(x))``, final RMSNorm, linear LM head. The
attention is the variant named by ``model.attention`` (NSA by default; see
:mod:`onn_jax.model.attention` for the interface every variant implements).

The calling modes share one set of parameters (``mode`` is static):
- ``"train"``: a full causal pass over [B, T] with no cache.
- ``"prefill"``: the same pass from position 0, also writing every layer's cache.
- ``"decode"``: one token per example at per-example absolute position ``pos_B``, read from
  and written to the cache.
- ``"extend"``: T tokens per example at positions ``pos_B .. pos_B + T - 1`` against the
  cache's positions before ``pos_B`` (a prefill's), which is read, not written: every token at
  once, as decoding them one by one would give (EAVI's parallel rollout).

The cache is an explicit pytree (no mutable Flax collections): a list with one dict of arrays
per layer, in the layout of the attention variant (:func:`init_cache`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from onn_jax.config import ModelConfig
from onn_jax.data.tokens import VOCAB_SIZE
from onn_jax.model import attention
from onn_jax.model.layers import apply_rope, dtype_of  # noqa: F401 (public here too)
from onn_jax.model.layers import RMS_EPS, rms_norm
from onn_jax.model import moe
from onn_jax.model.moe import DynMoE

Cache = list[dict[str, jax.Array]]


class RMSNorm(nn.Module):
  eps: float = RMS_EPS
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    return rms_norm(x, scale, self.eps)


def branch_valid(valid_BT: jax.Array, pos_B: jax.Array, length: int) -> jax.Array:
  """[B, length]: whether a branch token (a continuation of each row from ``pos_B``) is real:
  where the row holds a valid token at its position, as the same continuation written into
  the row would be (a branch past the row's answer, its padding, counted nowhere: the DynMoE
  statistics, SDL and the expert-reset window took it for routed tokens before)."""
  T = valid_BT.shape[1]
  pos_BA = pos_B[:, None] + jnp.arange(length)[None, :]
  held_BA = jnp.take_along_axis(valid_BT, jnp.clip(pos_BA, 0, T - 1), axis=1)
  return (pos_BA < T) & held_BA.astype(bool)


def moe_layer(c: ModelConfig, **kwargs) -> DynMoE:
  """The DynMoE feed-forward layer that ``c`` describes (``kwargs``: e.g. ``name``)."""
  return DynMoE(
      num_experts=c.num_experts, expert_hidden=c.expert_hidden, combine=c.moe_combine,
      fallback_k=c.fallback_k, init_threshold=c.init_threshold, impl=c.moe_impl,
      capacity=c.moe_capacity, tile=c.moe_tile, target_active=c.sdl_target_active,
      dtype=dtype_of(c.compute_dtype),
      param_dtype=dtype_of(c.param_dtype), **kwargs)


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTC, valid_BT, segment_start_BT=None, *, mode="train", cache=None,
               pos_B=None, branch_len=0):
    c = self.cfg
    pdt = dtype_of(c.param_dtype)
    variant = attention.get(c.attention)
    attn_norm = RMSNorm(param_dtype=pdt, name="attn_norm")
    # A variant that takes the norm gets the block's input as it is where it decodes (its
    # input kernel may normalise it: a launch a layer less).
    kwargs = {"norm": attn_norm} if variant.takes_norm and mode == "decode" else {}
    attn_out, new_cache, attn_aux = variant.module(c, name="attn")(
        x_BTC if kwargs else attn_norm(x_BTC), valid_BT, mode=mode, cache=cache, pos_B=pos_B,
        segment_start_BT=segment_start_BT, branch_len=branch_len, **kwargs)
    x_BTC = x_BTC + attn_out
    # x + DynMoE(norm(x)) (with moe_pallas.DEC_PRENORM, off by default, a decoding step's
    # experts kernel applies the norm and adds x).
    x_BTC, aux = moe_layer(c, name="moe")(x_BTC, valid_BT, decoding=mode == "decode",
                                          norm=RMSNorm(param_dtype=pdt, name="moe_norm"))
    if attn_aux:  # a gated attention (dynsmlora): its gate statistics and SDL terms
      aux = {**aux, "attn": attn_aux}
    return x_BTC, new_cache, aux


class Transformer(nn.Module):
  """Tiny-ONN. ``inputs`` are token ids [B, T] or distributions over the vocabulary [B, T, V]
  (embedded as the expected embedding, for EAVI's soft feed).

  ``segment_start_BT`` (train mode): packed rows, several sequences one after another, each
  starting at a multiple of :func:`onn_jax.model.attention.pack_alignment`; int [B,T], the first position of each
  token's sequence. Every sequence is then computed as if it were alone in its row.

  ``"branch"`` (EAVI's alignment pass): ``inputs`` [B, T] is a training sequence and
  ``branch_BAV`` [B, A, V] an alternative continuation of it fed from position ``pos_B`` [B]
  on: branch token i sees the sequence's tokens before ``pos_B`` and branch tokens ``0..i``.
  The shared prefix is computed once. Logits are [B, T + A, V]: the sequence's, then the
  branch's (token i's logits predict the branch's token i + 1).

  Returns ``(logits_BTV float32, new_cache or None, aux)`` where ``aux`` stacks each layer's
  DynMoE outputs along a leading layer axis (and a gated attention's under ``aux["attn"]``).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, inputs, valid_BT=None, *, mode: str = "train", cache: Cache | None = None,
               pos_B: jax.Array | None = None, segment_start_BT: jax.Array | None = None,
               branch_BAV: jax.Array | None = None):
    c = self.cfg
    dt, pdt = dtype_of(c.compute_dtype), dtype_of(c.param_dtype)
    table_VC = self.param("embedding", nn.initializers.normal(1.0), (VOCAB_SIZE, c.d_model),
                          pdt)

    def embed(tokens):
      if tokens.ndim == 2:
        return jnp.take(table_VC, tokens, axis=0).astype(dt)
      # HIGHEST: a one-hot row must give exactly the token's embedding (no TF32 rounding).
      return jnp.einsum("btv,vc->btc", tokens.astype(jnp.float32), table_VC.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST).astype(dt)

    x_BTC = embed(inputs)
    B, T = x_BTC.shape[:2]
    if valid_BT is None:
      valid_BT = jnp.ones((B, T), bool)
    branch_len = 0
    if mode == "branch":
      # The branch's tokens follow the main ones in every layer's row (the attention keeps
      # them apart).
      branch_len = branch_BAV.shape[1]
      x_BTC = jnp.concatenate([x_BTC, embed(branch_BAV)], axis=1)
      valid_BT = jnp.concatenate([valid_BT, branch_valid(valid_BT, pos_B, branch_len)], axis=1)
      T = T + branch_len
    new_caches, auxes = [], []
    # Rematerialise each block in the backward pass when asked: activation memory of one
    # block instead of all of them (the dense NSA reference keeps O(T^2) per layer).
    block_cls = nn.remat(Block) if (c.remat and mode == "train") else Block
    for i in range(c.num_layers):
      if mode == "train":
        x_BTC, layer_cache, aux = block_cls(c, name=f"block_{i}")(x_BTC, valid_BT,
                                                                  segment_start_BT)
      elif mode == "branch":
        x_BTC, layer_cache, aux = Block(c, name=f"block_{i}")(
            x_BTC, valid_BT, mode=mode, pos_B=pos_B, branch_len=branch_len)
      else:
        x_BTC, layer_cache, aux = block_cls(c, name=f"block_{i}")(
            x_BTC, valid_BT, segment_start_BT, mode=mode, cache=cache[i], pos_B=pos_B)
      new_caches.append(layer_cache)
      auxes.append(aux)
    x_BTC = RMSNorm(param_dtype=pdt, name="final_norm")(x_BTC)
    logits_BTV = nn.Dense(VOCAB_SIZE, use_bias=False, dtype=jnp.float32, param_dtype=pdt,
                          name="lm_head")(x_BTC.astype(jnp.float32))
    aux = jax.tree.map(lambda *xs: jnp.stack(xs), *auxes)
    return logits_BTV, (new_caches if mode in ("prefill", "decode") else None), aux


def with_moe_impl(model: Transformer, impl: str) -> Transformer:
  """``model`` (same parameters) with the expert dispatch ``impl`` (``model.moe_impl``)."""
  return model if impl == model.cfg.moe_impl else Transformer(
      dataclasses.replace(model.cfg, moe_impl=impl))


def outside_tf(model: Transformer) -> Transformer:
  """``model`` as every call but the teacher-forcing step runs it (EAVI, evaluation, probes):
  ``model.moe_impl=auto`` dense there (:func:`onn_jax.model.moe.auto_dense`)."""
  return with_moe_impl(model, moe.auto_dense(model.cfg.moe_impl))


def for_vmap(model: Transformer) -> Transformer:
  """``model`` as a caller that ``jax.vmap``s it over examples should run it: with the expert
  dispatch of :func:`onn_jax.model.moe.vmap_impl` (dense for a sparse one, whose exact fallback
  would run beside it under vmap)."""
  return with_moe_impl(model, moe.vmap_impl(model.cfg.moe_impl))


def init_cache(cfg: ModelConfig, batch: int, capacity: int) -> Cache:
  """An empty KV cache for ``capacity`` positions (compute dtype), in the layout of
  ``cfg.attention``: one dict per layer."""
  layer = attention.get(cfg.attention).init_layer_cache(cfg, batch, capacity)
  return [dict(layer) for _ in range(cfg.num_layers)]


def init_params(cfg: ModelConfig, rng: jax.Array) -> Any:
  # Long enough for one complete compressed block, so the compressor's parameters exist.
  seq_len = cfg.block_len + cfg.select_len
  model = Transformer(cfg)
  # Jitted: one compiled program instead of hundreds of eager ones.
  return jax.jit(model.init)(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
