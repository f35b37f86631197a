"""Full causal GQA attention with RoPE: the dense baseline every NSA result is compared with.

Standard multi-head attention with grouped key/value heads (Ainslie et al. 2023) and rotary
positions on queries and keys, computed by ``jax.nn.dot_product_attention``: cuDNN's fused
kernel on a GPU with bf16/fp16 inputs, XLA's otherwise. Cache (one layer): ``k`` (rotated)
and ``v`` [B, S, G, D]; a decoded token at ``pos_B`` attends to cache positions ``<= pos_B``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from onn_jax.config import ModelConfig
from onn_jax.model.layers import apply_rope, dtype_of

CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def attention_implementation(dtype) -> str | None:
  """``"cudnn"`` on a GPU for bf16/fp16 inputs, else None (XLA)."""
  on_gpu = jax.default_backend() == "gpu"
  return "cudnn" if on_gpu and jnp.dtype(dtype) in [jnp.dtype(d) for d in CUDNN_DTYPES] else None


def causal_attention(q_BTHD: jax.Array, k_BTGD: jax.Array, v_BTGD: jax.Array,
                     segment_start_BT: jax.Array | None = None) -> jax.Array:
  """Causal softmax attention over a sequence from position 0 (GQA: H a multiple of G).

  Packed rows (``segment_start_BT`` [B,T], the first position of each query's sequence): a
  query also sees no key before its sequence, through a [B,1,T,T] mask, in XLA's attention
  (quadratic memory; cuDNN would take the mask as a bias and also compute its gradient).
  """
  if segment_start_BT is None:
    return jax.nn.dot_product_attention(q_BTHD, k_BTGD, v_BTGD, is_causal=True,
                                        implementation=attention_implementation(q_BTHD.dtype))
  return jax.nn.dot_product_attention(q_BTHD, k_BTGD, v_BTGD, mask=segment_mask(segment_start_BT),
                                      is_causal=True)


def segment_mask(segment_start_BT: jax.Array) -> jax.Array:
  """Packed rows: bool [B,1,T,T], whether query t may see key s by sequence (``s`` at or after
  the start of ``t``'s sequence); causality is the attention's own."""
  T = segment_start_BT.shape[1]
  return jnp.arange(T)[None, None, None, :] >= segment_start_BT[:, None, :, None]


def branch_positions(total: int, branch_len: int, start_B: jax.Array) -> jax.Array:
  """Positions [B, total] of a ``"branch"`` row: ``0 .. M-1`` for the M = total - branch_len
  main tokens, then ``start_B + i`` for branch token i."""
  B = start_B.shape[0]
  M = total - branch_len
  main_BM = jnp.broadcast_to(jnp.arange(M, dtype=jnp.int32), (B, M))
  branch_BA = start_B.astype(jnp.int32)[:, None] + jnp.arange(branch_len, dtype=jnp.int32)
  return jnp.concatenate([main_BM, branch_BA], axis=1)


def branch_attention(q_BTHD: jax.Array, k_BTGD: jax.Array, v_BTGD: jax.Array,
                     branch_len: int, start_B: jax.Array) -> jax.Array:
  """Attention of a ``"branch"`` row: the first M = T - branch_len tokens are a causal sequence
  from position 0; branch token i sits at position ``start_B + i`` and sees the main tokens
  before ``start_B`` and branch tokens ``0..i`` (an alternative continuation of the main
  sequence's prefix, without recomputing it). The branch part is XLA attention with a
  [B,1,A,M+A] mask (A queries: small)."""
  T = q_BTHD.shape[1]
  M, A = T - branch_len, branch_len
  o_main = causal_attention(q_BTHD[:, :M], k_BTGD[:, :M], v_BTGD[:, :M])
  sees_main_BAM = jnp.broadcast_to(jnp.arange(M)[None, None, :] < start_B[:, None, None],
                                   (start_B.shape[0], A, M))
  sees_branch_AA = jnp.arange(A)[None, :] <= jnp.arange(A)[:, None]
  mask = jnp.concatenate([sees_main_BAM, jnp.broadcast_to(sees_branch_AA, sees_main_BAM.shape[:2]
                                                          + (A,))], axis=-1)[:, None]
  o_branch = jax.nn.dot_product_attention(q_BTHD[:, M:], k_BTGD, v_BTGD, mask=mask)
  return jnp.concatenate([o_main, o_branch.astype(o_main.dtype)], axis=1)


def decode_attention(q_B1HD: jax.Array, k_BSGD: jax.Array, v_BSGD: jax.Array,
                     pos_B: jax.Array) -> jax.Array:
  """One query per example at ``pos_B`` over cache positions ``0 .. pos_B`` (XLA)."""
  return jax.nn.dot_product_attention(q_B1HD, k_BSGD, v_BSGD,
                                      key_value_seq_lengths=(pos_B + 1).astype(jnp.int32))


def extend_keys(cache_BSGD: jax.Array, new_BAGD: jax.Array, start_B: jax.Array) -> jax.Array:
  """``"extend"`` mode's keys (or values): the cache's, positions ``start_B ..`` replaced by
  the A new ones, [B, S + A, G, D] (padded by A, so that new tokens past the cache's end keep
  their positions). Positions past ``start_B + A - 1`` are the cache's and no query sees them."""
  A = new_BAGD.shape[1]
  padded = jnp.pad(cache_BSGD.astype(new_BAGD.dtype), [(0, 0), (0, A), (0, 0), (0, 0)])
  return jax.vmap(lambda base, new, at: jax.lax.dynamic_update_slice_in_dim(base, new, at, 0))(
      padded, new_BAGD, start_B)


def extend_attention(q_BAHD: jax.Array, k_BSGD: jax.Array, v_BSGD: jax.Array,
                     start_B: jax.Array) -> jax.Array:
  """Query i at position ``start_B + i`` over the keys at positions ``<= start_B + i``
  (:func:`extend_keys`' layout), with a [B,1,A,S] mask (XLA; A queries)."""
  A, S = q_BAHD.shape[1], k_BSGD.shape[1]
  pos_BA1 = start_B[:, None, None] + jnp.arange(A)[None, :, None]
  sees_BAS = jnp.arange(S)[None, None, :] <= pos_BA1
  return jax.nn.dot_product_attention(q_BAHD, k_BSGD, v_BSGD, mask=sees_BAS[:, None])


def init_layer_cache(cfg: ModelConfig, batch: int, capacity: int) -> dict[str, jax.Array]:
  """One layer's empty cache: ``k``, ``v`` [batch, capacity, G, D] in the compute dtype."""
  shape = (batch, capacity, cfg.num_kv_groups, cfg.head_dim)
  dt = dtype_of(cfg.compute_dtype)
  return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)}


class FullAttention(nn.Module):
  """Causal GQA attention; see the module docstring.

  ``__call__(x_BTC, valid_BT=None, *, mode, cache, pos_B) -> (out_BTC, new_cache, aux)``
  (the attention interface of :mod:`onn_jax.model.attention`; ``aux`` is empty here).
  Subclasses change the projections by overriding :meth:`_qkv`.
  """
  cfg: ModelConfig

  def setup(self):
    c = self.cfg
    dt, pdt = dtype_of(c.compute_dtype), dtype_of(c.param_dtype)
    G, D = c.num_kv_groups, c.head_dim
    self.q_proj = nn.Dense(c.num_heads * D, use_bias=False, dtype=dt, param_dtype=pdt)
    self.kv_proj = nn.Dense(2 * G * D, use_bias=False, dtype=dt, param_dtype=pdt)
    self.out_proj = nn.Dense(c.d_model, use_bias=False, dtype=dt, param_dtype=pdt)

  def _qkv(self, x_BTC, pos_BT, valid_BT):
    """Rotated q [B,T,H,D], rotated k and v [B,T,G,D], and aux (empty)."""
    c = self.cfg
    B, T, _ = x_BTC.shape
    q_BTHD = self.q_proj(x_BTC).reshape(B, T, c.num_heads, c.head_dim)
    kv_BT2GD = self.kv_proj(x_BTC).reshape(B, T, 2, c.num_kv_groups, c.head_dim)
    return self._rotate(q_BTHD, kv_BT2GD[:, :, 0], kv_BT2GD[:, :, 1], pos_BT) + ({},)

  def _rotate(self, q_BTHD, k_BTGD, v_BTGD, pos_BT):
    theta = self.cfg.rope_theta
    return apply_rope(q_BTHD, pos_BT, theta), apply_rope(k_BTGD, pos_BT, theta), v_BTGD

  def __call__(self, x_BTC, valid_BT=None, *, mode: str = "train", cache: dict | None = None,
               pos_B: jax.Array | None = None, segment_start_BT: jax.Array | None = None,
               branch_len: int = 0):
    B, T, _ = x_BTC.shape
    if valid_BT is None:
      valid_BT = jnp.ones((B, T), bool)
    new_cache = None
    if segment_start_BT is not None and mode != "train":
      raise ValueError(f"attention: packed rows (segment_start) are for training, not "
                       f"mode={mode!r}")
    if mode in ("train", "prefill"):
      pos_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
      if segment_start_BT is not None:  # packed rows: positions restart at every sequence
        pos_BT = pos_BT - segment_start_BT
      q_BTHD, k_BTGD, v_BTGD, aux = self._qkv(x_BTC, pos_BT, valid_BT)
      o_BTHD = causal_attention(q_BTHD, k_BTGD, v_BTGD, segment_start_BT)
      if mode == "prefill":
        new_cache = {name: jax.lax.dynamic_update_slice_in_dim(
            cache[name], val.astype(cache[name].dtype), 0, axis=1)
            for name, val in (("k", k_BTGD), ("v", v_BTGD))}
    elif mode == "branch":
      q_BTHD, k_BTGD, v_BTGD, aux = self._qkv(x_BTC, branch_positions(T, branch_len, pos_B),
                                              valid_BT)
      o_BTHD = branch_attention(q_BTHD, k_BTGD, v_BTGD, branch_len, pos_B)
    elif mode == "extend":
      q_BTHD, k_BTGD, v_BTGD, aux = self._qkv(x_BTC, branch_positions(T, T, pos_B), valid_BT)
      o_BTHD = extend_attention(q_BTHD, extend_keys(cache["k"], k_BTGD, pos_B),
                                extend_keys(cache["v"], v_BTGD, pos_B), pos_B)
      o_BTHD = o_BTHD.astype(q_BTHD.dtype)
    elif mode == "decode":
      if T != 1:
        raise ValueError(f"decode takes one token per example, got {T}")
      q_BTHD, k_BTGD, v_BTGD, aux = self._qkv(x_BTC, pos_B[:, None], valid_BT)
      rows_B = jnp.arange(B)
      new_cache = {name: cache[name].at[rows_B, pos_B].set(val[:, 0].astype(cache[name].dtype))
                   for name, val in (("k", k_BTGD), ("v", v_BTGD))}
      o_BTHD = decode_attention(q_BTHD, new_cache["k"].astype(q_BTHD.dtype),
                                new_cache["v"].astype(q_BTHD.dtype), pos_B)
    else:
      raise ValueError(f"unknown mode {mode!r}")
    return self.out_proj(o_BTHD.reshape(B, T, -1)), new_cache, aux
