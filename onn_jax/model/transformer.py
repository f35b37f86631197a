"""The Tiny-ONN transformer: pre-norm blocks of NSA attention and DynMoE feed-forward.

``x + NSA(RMSNorm(x))``, ``x + DynMoE(RMSNorm(x))``, final RMSNorm, linear LM head.

Three calling modes share one set of parameters (``mode`` is static):
- ``"train"``: a full causal pass over [B, T] with no cache.
- ``"prefill"``: the same pass from position 0, also writing every key/value (and every
  complete compressed block) into a fixed-capacity cache pytree.
- ``"decode"``: one token per example at per-example absolute position ``pos_B``, read from
  and written to the cache.

The cache is an explicit pytree (no mutable Flax collections): per layer a dict of arrays
``k_cmp_raw, v_cmp_raw, k_slc, v_slc, k_win, v_win`` [B, S, G, D] and ``k_cmp, v_cmp``
[B, N, G, D] (N compressed blocks that fit in capacity S).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from onn_jax.config import ModelConfig
from onn_jax.data.tokens import VOCAB_SIZE
from onn_jax.model import nsa
from onn_jax.model.moe import DynMoE

Cache = list[dict[str, jax.Array]]
KV_NAMES = ("k_cmp_raw", "v_cmp_raw", "k_slc", "v_slc", "k_win", "v_win")


def dtype_of(name: str) -> Any:
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def apply_rope(x_BTnD: jax.Array, pos_BT: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (Su et al. 2021), rotate-half form, computed in float32."""
  half = x_BTnD.shape[-1] // 2
  freq_F = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BTF = pos_BT.astype(jnp.float32)[..., None] * freq_F
  cos_BT1F = jnp.cos(angle_BTF)[:, :, None, :]
  sin_BT1F = jnp.sin(angle_BTF)[:, :, None, :]
  x = x_BTnD.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos_BT1F - x2 * sin_BT1F, x2 * cos_BT1F + x1 * sin_BT1F], -1)
  return out.astype(x_BTnD.dtype)


class RMSNorm(nn.Module):
  eps: float = 1e-6
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
    return (x32 * scale.astype(jnp.float32)).astype(x.dtype)


class BlockCompressor(nn.Module):
  """phi of NSA eq. (7): a compressed key (value) from one block of ``block_len`` keys.

  Each key gets a learned intra-block position embedding, the block is flattened and an MLP
  maps it to one vector. Shared across GQA groups.
  """
  block_len: int
  head_dim: int
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, blocks_BNLGD: jax.Array) -> jax.Array:
    B, N, L, G, D = blocks_BNLGD.shape
    pos_LD = self.param("block_pos", nn.initializers.normal(0.02), (L, D), self.param_dtype)
    x = blocks_BNLGD + pos_LD[None, None, :, None, :].astype(blocks_BNLGD.dtype)
    x_BNGF = x.transpose(0, 1, 3, 2, 4).reshape(B, N, G, L * D)
    h = nn.Dense(2 * D, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(x_BNGF)
    return nn.Dense(D, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="fc2")(nn.gelu(h))


def compress(compressor: BlockCompressor, raw_BSGD: jax.Array, num_blocks: int,
             block_len: int, block_stride: int) -> jax.Array:
  """[B, S, G, D] raw keys -> [B, N, G, D]: block i summarises [i*stride, i*stride + len)."""
  B, S, G, D = raw_BSGD.shape
  if num_blocks == 0:
    return jnp.zeros((B, 0, G, D), raw_BSGD.dtype)
  idx_NL = (jnp.arange(num_blocks)[:, None] * block_stride + jnp.arange(block_len)[None, :])
  return compressor(raw_BSGD[:, idx_NL])


class NSAttention(nn.Module):
  """Native Sparse Attention layer (Yuan et al. 2025): projections, RoPE, compression, gates.

  The attention arithmetic itself is :func:`onn_jax.model.nsa.nsa_core`.
  """
  cfg: ModelConfig

  def setup(self):
    c = self.cfg
    dt, pdt = dtype_of(c.compute_dtype), dtype_of(c.param_dtype)
    H, G, D = c.num_heads, c.num_kv_groups, c.head_dim
    self.q_proj = nn.Dense(H * D, use_bias=False, dtype=dt, param_dtype=pdt)
    # The three branches have their own keys and values (NSA sec. 3.3): one fused projection.
    self.kv_proj = nn.Dense(6 * G * D, use_bias=False, dtype=dt, param_dtype=pdt)
    self.k_compressor = BlockCompressor(c.block_len, D, dt, pdt)
    self.v_compressor = BlockCompressor(c.block_len, D, dt, pdt)
    if c.gate_hidden:
      self.gate_hidden = nn.Dense(c.gate_hidden, dtype=dt, param_dtype=pdt)
    self.gate_proj = nn.Dense(H * 3, dtype=dt, param_dtype=pdt)
    self.out_proj = nn.Dense(c.d_model, use_bias=False, dtype=dt, param_dtype=pdt)

  def _project(self, x_BTC, pos_BT):
    c = self.cfg
    B, T, _ = x_BTC.shape
    H, G, D = c.num_heads, c.num_kv_groups, c.head_dim
    q_BTHD = apply_rope(self.q_proj(x_BTC).reshape(B, T, H, D), pos_BT, c.rope_theta)
    kv = self.kv_proj(x_BTC).reshape(B, T, 6, G, D)
    new = dict(zip(KV_NAMES, [kv[:, :, i] for i in range(6)]))
    # Selected and window keys carry RoPE; compressed keys get position from the compressor.
    new["k_slc"] = apply_rope(new["k_slc"], pos_BT, c.rope_theta)
    new["k_win"] = apply_rope(new["k_win"], pos_BT, c.rope_theta)
    h = x_BTC
    if c.gate_hidden:
      h = nn.gelu(self.gate_hidden(h))
    gates_BTH3 = jax.nn.sigmoid(self.gate_proj(h).astype(jnp.float32)).reshape(B, T, H, 3)
    return q_BTHD, new, gates_BTH3.astype(q_BTHD.dtype)

  def _core(self, q_BTHD, kv, k_cmp, v_cmp, gates, q_offset):
    c = self.cfg
    return nsa.nsa_core(
        q_BTHD, k_cmp, v_cmp, kv["k_slc"], kv["v_slc"], kv["k_win"], kv["v_win"], gates,
        block_len=c.block_len, block_stride=c.block_stride, select_len=c.select_len,
        num_select=c.num_select, window=c.window, q_offset=q_offset, impl=c.nsa_impl)

  def __call__(self, x_BTC, *, mode: str = "train", cache: dict | None = None,
               pos_B: jax.Array | None = None):
    c = self.cfg
    B, T, _ = x_BTC.shape
    if mode in ("train", "prefill"):
      pos_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
      q, kv, gates = self._project(x_BTC, pos_BT)
      n = nsa.num_compressed_blocks(T, c.block_len, c.block_stride)
      k_cmp = compress(self.k_compressor, kv["k_cmp_raw"], n, c.block_len, c.block_stride)
      v_cmp = compress(self.v_compressor, kv["v_cmp_raw"], n, c.block_len, c.block_stride)
      o_BTHD = self._core(q, kv, k_cmp, v_cmp, gates, 0)
      new_cache = None
      if mode == "prefill":
        new_cache = {name: jax.lax.dynamic_update_slice_in_dim(
            cache[name], kv[name].astype(cache[name].dtype), 0, axis=1) for name in KV_NAMES}
        for name, val in (("k_cmp", k_cmp), ("v_cmp", v_cmp)):
          new_cache[name] = jax.lax.dynamic_update_slice_in_dim(
              cache[name], val.astype(cache[name].dtype), 0, axis=1)
    elif mode == "decode":
      if T != 1:
        raise ValueError(f"decode takes one token per example, got {T}")
      q, kv, gates = self._project(x_BTC, pos_B[:, None])
      rows_B = jnp.arange(B)
      new_cache = {name: cache[name].at[rows_B, pos_B].set(kv[name][:, 0].astype(
          cache[name].dtype)) for name in KV_NAMES}
      # Compressed block i completes at position i*stride + len - 1: recompute it from the
      # raw cache only then, so no partial block is ever visible (NSA eq. 7).
      start_B = pos_B - c.block_len + 1
      block_B = jnp.maximum(start_B, 0) // c.block_stride
      num_slots = cache["k_cmp"].shape[1]
      complete_B = (start_B >= 0) & (start_B % c.block_stride == 0) & (block_B < num_slots)
      idx_BL = jnp.clip(block_B[:, None] * c.block_stride + jnp.arange(c.block_len), 0,
                        cache["k_slc"].shape[1] - 1)
      for name, raw_name, compressor in (("k_cmp", "k_cmp_raw", self.k_compressor),
                                         ("v_cmp", "v_cmp_raw", self.v_compressor)):
        raw_BLGD = jnp.take_along_axis(new_cache[raw_name], idx_BL[:, :, None, None], axis=1)
        block_BGD = compressor(raw_BLGD[:, None])[:, 0].astype(cache[name].dtype)
        slot_B = jnp.minimum(block_B, num_slots - 1)
        old_BGD = cache[name][rows_B, slot_B]
        new_cache[name] = cache[name].at[rows_B, slot_B].set(
            jnp.where(complete_B[:, None, None], block_BGD, old_BGD))
      kv_all = {name: new_cache[name].astype(q.dtype) for name in KV_NAMES}
      o_BTHD = self._core(q, kv_all, new_cache["k_cmp"].astype(q.dtype),
                          new_cache["v_cmp"].astype(q.dtype), gates, pos_B)
    else:
      raise ValueError(f"unknown mode {mode!r}")
    return self.out_proj(o_BTHD.reshape(B, T, -1)), new_cache


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTC, valid_BT, *, mode="train", cache=None, pos_B=None):
    c = self.cfg
    dt, pdt = dtype_of(c.compute_dtype), dtype_of(c.param_dtype)
    attn_out, new_cache = NSAttention(c, name="attn")(
        RMSNorm(param_dtype=pdt, name="attn_norm")(x_BTC), mode=mode, cache=cache, pos_B=pos_B)
    x_BTC = x_BTC + attn_out
    moe_out, aux = DynMoE(
        num_experts=c.num_experts, expert_hidden=c.expert_hidden, combine=c.moe_combine,
        fallback_k=c.fallback_k, init_threshold=c.init_threshold,
        target_active=c.sdl_target_active, dtype=dt, param_dtype=pdt, name="moe")(
            RMSNorm(param_dtype=pdt, name="moe_norm")(x_BTC), valid_BT)
    return x_BTC + moe_out, new_cache, aux


class Transformer(nn.Module):
  """Tiny-ONN. ``inputs`` are token ids [B, T] or distributions over the vocabulary [B, T, V]
  (embedded as the expected embedding, for EAVI's soft feed).

  Returns ``(logits_BTV float32, new_cache or None, aux)`` where ``aux`` stacks each layer's
  DynMoE outputs along a leading layer axis.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, inputs, valid_BT=None, *, mode: str = "train", cache: Cache | None = None,
               pos_B: jax.Array | None = None):
    c = self.cfg
    dt, pdt = dtype_of(c.compute_dtype), dtype_of(c.param_dtype)
    table_VC = self.param("embedding", nn.initializers.normal(1.0), (VOCAB_SIZE, c.d_model),
                          pdt)
    if inputs.ndim == 2:
      x_BTC = jnp.take(table_VC, inputs, axis=0).astype(dt)
    else:
      # HIGHEST: a one-hot row must give exactly the token's embedding (no TF32 rounding).
      x_BTC = jnp.einsum("btv,vc->btc", inputs.astype(jnp.float32),
                         table_VC.astype(jnp.float32),
                         precision=jax.lax.Precision.HIGHEST).astype(dt)
    B, T = x_BTC.shape[:2]
    if valid_BT is None:
      valid_BT = jnp.ones((B, T), bool)
    new_caches, auxes = [], []
    # Rematerialise each block in the backward pass when asked: activation memory of one
    # block instead of all of them (the dense NSA reference keeps O(T^2) per layer).
    block_cls = nn.remat(Block) if (c.remat and mode == "train") else Block
    for i in range(c.num_layers):
      if mode == "train":
        x_BTC, layer_cache, aux = block_cls(c, name=f"block_{i}")(x_BTC, valid_BT)
      else:
        x_BTC, layer_cache, aux = block_cls(c, name=f"block_{i}")(
            x_BTC, valid_BT, mode=mode, cache=cache[i], pos_B=pos_B)
      new_caches.append(layer_cache)
      auxes.append(aux)
    x_BTC = RMSNorm(param_dtype=pdt, name="final_norm")(x_BTC)
    logits_BTV = nn.Dense(VOCAB_SIZE, use_bias=False, dtype=jnp.float32, param_dtype=pdt,
                          name="lm_head")(x_BTC.astype(jnp.float32))
    aux = jax.tree.map(lambda *xs: jnp.stack(xs), *auxes)
    return logits_BTV, (new_caches if mode != "train" else None), aux


def init_cache(cfg: ModelConfig, batch: int, capacity: int) -> Cache:
  """An empty KV cache for ``capacity`` positions (compute dtype)."""
  dt = dtype_of(cfg.compute_dtype)
  G, D = cfg.num_kv_groups, cfg.head_dim
  n = nsa.num_compressed_blocks(capacity, cfg.block_len, cfg.block_stride)
  layer = {name: jnp.zeros((batch, capacity, G, D), dt) for name in KV_NAMES}
  layer.update(k_cmp=jnp.zeros((batch, n, G, D), dt), v_cmp=jnp.zeros((batch, n, G, D), dt))
  return [dict(layer) for _ in range(cfg.num_layers)]


def init_params(cfg: ModelConfig, rng: jax.Array) -> Any:
  # Long enough for one complete compressed block, so the compressor's parameters exist.
  seq_len = cfg.block_len + cfg.select_len
  model = Transformer(cfg)
  # Jitted: one compiled program instead of hundreds of eager ones.
  return jax.jit(model.init)(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
