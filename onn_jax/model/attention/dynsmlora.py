"""DynSMLoRA: a static GQA base attention plus per-token, gated low-rank q/k/v deltas.

From the seed ("future research"): full-rank dynamic sparse multi-head attention is expressive
but supports long contexts poorly in limited memory; DynSMLoRA pairs a static, general base
attention layer (e.g. GQA) with light low-rank (LoRA) delta matrices that a gating network
selects and mixes per token.

Our design choices (the seed gives none of the details):

* The base is :class:`~onn_jax.model.attention.full.FullAttention` (causal GQA + RoPE, same
  parameter names ``q_proj``, ``kv_proj``, ``out_proj``).
* A bank of E = ``model.lora_experts`` deltas of rank r = ``model.lora_rank``. Delta e maps the
  token to all of q, k and v at once: ``x A_e B_e`` with ``A_e`` [C, r] shared by q/k/v and
  ``B_e`` [r, (H + 2G) D]; ``A`` LeCun-normal, ``B`` zero (LoRA's init: the layer starts as
  its base). No alpha/r scale: B is learned from zero.
* The gate is DynMoE's (:func:`onn_jax.model.moe.route`, reused as is): cosine against E
  prototypes, learnable thresholds, hard mask with a straight-through surrogate, top-k
  fallback, ``mean``/``softmax`` combination, with DynMoE's settings ``model.moe_combine``,
  ``model.fallback_k``, ``model.sdl_target_active``. Its SDL terms and routing statistics
  leave the layer as ``aux`` and enter the loss as ``aux["attn"]`` (see
  :func:`onn_jax.objectives.sdl`), with the same SDL weights as DynMoE's.
* ``q_t += sum_e w_te x_t A_e B_e^q`` (and k, v alike) before RoPE. Every delta is computed
  (a [B,T,E,r] contraction: cheap next to the attention for small E*r), weighted by the gate.
* Cache: the base layer's ``k``/``v`` holding each token's delta-added (and rotated) keys and
  values, so decoding needs nothing more than the base attention.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from onn_jax.model import moe
from onn_jax.model.attention.full import FullAttention, init_layer_cache  # noqa: F401
from onn_jax.model.layers import dtype_of



def _init_lora_a(rng, num_experts: int, d_model: int, rank: int, param_dtype):
  """[E, C, r] LeCun-normal (std 1/sqrt(C))."""
  w = jax.random.normal(rng, (num_experts, d_model, rank), jnp.float32)
  return (w * d_model**-0.5).astype(param_dtype)


class DynSMLoRAttention(FullAttention):
  """Causal GQA attention with gated low-rank q/k/v deltas; see the module docstring.

  ``aux`` holds :data:`onn_jax.model.moe.AUX_KEYS` of the delta gate.
  """

  def setup(self):
    super().setup()
    c = self.cfg
    pdt = dtype_of(c.param_dtype)
    E, r = c.lora_experts, c.lora_rank
    width = (c.num_heads + 2 * c.num_kv_groups) * c.head_dim
    self.prototypes = self.param("prototypes", moe.LEAF_INITS["prototypes"], E, c.d_model,
                                 r, c.init_threshold, pdt)
    self.thresholds = self.param("thresholds", moe.LEAF_INITS["thresholds"], E, c.d_model,
                                 r, c.init_threshold, pdt)
    self.lora_a = self.param("lora_a", _init_lora_a, E, c.d_model, r, pdt)
    self.lora_b = self.param("lora_b", nn.initializers.zeros, (E, r, width), pdt)

  def _qkv(self, x_BTC, pos_BT, valid_BT):
    c = self.cfg
    B, T, _ = x_BTC.shape
    H, G, D = c.num_heads, c.num_kv_groups, c.head_dim
    dt = dtype_of(c.compute_dtype)
    weights_BTE, _, aux = moe.route(
        x_BTC, self.prototypes, self.thresholds, valid_BT, combine=c.moe_combine,
        fallback_k=c.fallback_k, target_active=c.sdl_target_active,
        st_temperature=moe.ST_TEMPERATURE)
    z_BTER = jnp.einsum("btc,ecr->bter", x_BTC.astype(dt), self.lora_a.astype(dt))
    z_BTER = z_BTER * weights_BTE.astype(dt)[..., None]
    delta_BTF = jnp.einsum("bter,erf->btf", z_BTER, self.lora_b.astype(dt))
    q_BTHD = self.q_proj(x_BTC) + delta_BTF[..., :H * D]
    kv_BTF = self.kv_proj(x_BTC) + delta_BTF[..., H * D:]
    kv_BT2GD = kv_BTF.reshape(B, T, 2, G, D)
    q_BTHD, k_BTGD, v_BTGD = self._rotate(q_BTHD.reshape(B, T, H, D), kv_BT2GD[:, :, 0],
                                          kv_BT2GD[:, :, 1], pos_BT)
    return q_BTHD, k_BTGD, v_BTGD, aux
