"""DynMoE: a dynamic mixture of experts with cosine-prototype gating and the SDL regulariser.

Guo et al. 2024 (DynMoE), in the form the Tiny-ONN seed decided:

- gate: ``s_te = cos(x_t, P_e)``; expert e is active for token t iff ``s_te - theta_e > 0``.
  The mask is hard in the forward pass and straight-through in the backward pass, with the
  surrogate ``sigmoid((s - theta) / tau)``, so thresholds, prototypes and x all get gradients;
- fallback: a token that activates no expert uses its top-k experts by cosine similarity;
- combination over the used experts: ``mean`` (``m_e / sum m``) or ``softmax`` of ``s - theta``
  restricted to the used set;
- output: ``y_t = sum_e w_te * Expert_e(x_t)``, ``Expert_e(x) = gelu(x W_in_e + b_in_e) W_out_e +
  b_out_e``;
- SDL: diversity ``||P^ P^T - I||_F^2`` (row-normalised prototypes) and sparsity
  ``(mean_t mean_e m_st_te - target)^2`` through the straight-through mask.

This definition is what ``impl="dense"`` computes, every expert on every token (``"reference"``:
the same einsums differentiated by autodiff, :func:`experts_reference`, the baseline that
``python -m train.bench`` times the others against). The sparse
dispatches (:func:`experts`) compute the same forward pass and the same expert-weight gradients
from the used pairs only, but not the straight-through gradient through ``w_te`` of an expert
that token t does not use (its output is not computed), so they train the gate differently.

Every parameter of the module carries a leading expert axis E, so that expert reset can
re-initialise row e of every leaf with rows drawn by :func:`init_expert_params`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from onn_jax.model import moe_pallas, nsa_pallas
from onn_jax.model.layers import RMS_EPS, decode_const, rms_norm

Array = jax.Array

# Leaf names of one DynMoE layer, in the order init_expert_params splits its rng.
EXPERT_LEAVES: tuple[str, ...] = ("prototypes", "thresholds", "w_in", "b_in", "w_out", "b_out")
COMBINE_MODES: tuple[str, ...] = ("mean", "softmax")
IMPLS: tuple[str, ...] = ("reference", "dense", "ragged", "tiled", "batched", "auto")
# What impl="auto" runs in the teacher-forcing step on a GPU (dense in every other call and on
# other backends: auto_dense, vmap_impl). H200, jax 0.11.2, 2026-12-04 (session 13):
# two arc1 runs from scratch, 2000 steps each, one after the other, no background compiles
# (`python -m train.main --config arc1 train.run_steps=2000 train.background_compile=false
# model.moe_impl=dense|tiled`): tiled stepped 13% slower while the routing overflows the
# capacity (steps 100-500: 0.066 s against 0.058; the overflowing layers compute the
# checkpointed dense fallback), as fast over steps 500-1000 (0.058), and 10% faster once it fits
# (median steps of 1000-1500 and 1500-2000: 0.0523 and 0.0527 s against 0.0586 and 0.0584; 1.21M
# real tokens/s against 1.08M over steps 1000-2000: 12% more), at the same
# loss (0.3535 against 0.3532 at step 2000; answer-token accuracy 0.884 against 0.883), in less
# memory (peak 14.1 GiB against 17.8) and compiled as fast (56 s against 65). So tiled, though
# it drops the gate's straight-through gradient from the experts a token does not use (that
# run's loss shows no cost). Under jax.vmap its lax.cond becomes a select that runs both
# branches: the callers that vmap the model over examples (test-time training, per-task
# adapters in evaluation) take :func:`vmap_impl`'s dense instead. And auto is sparse only in
# the teacher-forcing step: every other model call (EAVI, evaluation, probes) runs it dense
# (:func:`auto_dense`). With tiled experts EAVI's first step failed on the H200 (the same day,
# background-compiled: "cuda_graph_end_capture ... capturing stream has unjoined work" in
# cuDNN's graph deserialisation; not pinned down; tiled pre-training then dense EAVI ran), and
# the decoding programs, with the same mix of a cond, cuDNN calls and CUDA graphs, were not
# tried with tiled experts on a GPU. Before: dense (the single-layer timings of 2026-12-01..04
# in docs/benchmarks.md, and an A/B of 1500 steps beside background compiles:
# docs/bench/arc1_ab_moe_*; this one: docs/bench/arc1_ab2000_moe_*).
AUTO_GPU_IMPL: str = "tiled"
# Rows per tile of the sparse dispatch (each expert's pairs are padded to a multiple of it). A
# tile is one matmul of [TILE_ROWS, C] by its expert's [C, F]; the tiled impl copies that
# expert's weights once per tile, so larger tiles copy less and pad more (< E * TILE_ROWS rows).
# H200, jax 0.11.2, 2026-12-04, one arc1 layer fwd+bwd at 32 x 2048 (4.0 of 16 experts a token),
# tiled queued back to back at tiles of 512 / 1024 / 2048 / 4096 rows: 3.26-3.31 / 2.96-3.03 /
# 2.92-2.94 / 2.95-2.97 ms, as much at a trained layer's uneven routing as at even routing
# (dense 3.82-3.90; batched does not depend on it: 2.31-2.37 ms). Gathering each tile's weights
# instead of the one-hot matmul measured the same (2.83-2.95 ms), summing their gradients by
# segment_sum slower (2.95-3.06) (docs/bench/moe_tile*_h200_2026-12-04.json).
#
# Tried, not kept (H100, jax 0.11.2, 2026-12-06, session 30; commit "DynMoE impl pallas, tried",
# docs/bench/moe_pallas_layer_h100_2026-12-06.json): the tiled layout's experts as three Triton
# kernels that keep the [pairs, F] hidden activations on chip (a program per block of 64 slots
# walking the hidden units for the forward and for x's and the gates' gradients, a program per
# expert and 32 hidden units for the weight gradients), at the cost of recomputing h and its
# gradient: nine [pairs, C, F] products where XLA runs six. One arc1 layer fwd+bwd back to back
# at 32 x 2048: 6.78 ms against tiled's 3.28 at even routing, 8.96 against 3.28 at a trained
# layer's (likely the busiest expert's weight-gradient programs, which walk its blocks alone);
# the step 1.7x slower. The kernels ran at ~10% of the card's bf16 rate (188-255 registers a
# thread at 8 warps, so one program an SM; one stage, no pipelining), where XLA's six products
# take ~1.35 ms of tiled's 3.28 (session 29's profile at 8 x 8192, the same 65536 tokens: its
# elementwise passes over [pairs, F] ~0.9 ms, the dispatch and combine gathers ~0.3).
TILE_ROWS: int = 2048
# Pairs a sparse dispatch computes, as a multiple of the SDL target (model.moe_capacity).
CAPACITY: float = 1.25
# The dense experts' backward pass appends a column of ones to x for b_in's gradient, padded
# with zero columns to a multiple of this (matmul-friendly operand sizes).
BIAS_PAD: int = 16
# Added to squared norms before the rsqrt: keeps cos() finite for an all-zero vector.
NORM_EPS: float = 1e-6
AUX_KEYS: tuple[str, ...] = ("diversity", "sparsity", "active_frac", "experts_per_token",
                             "fallback_frac", "tokens_per_expert", "fallback_tokens", "num_tokens",
                             "st_active_sum")


# ----------------------------------------------------------------------------------------------
# Parameter initialisation (shared by the module and by expert reset)
# ----------------------------------------------------------------------------------------------

def _init_prototypes(rng: Array, num_experts: int, d_model: int, expert_hidden: int,
                     init_threshold: float, param_dtype: Any) -> Array:
  """[E, C] isotropic directions; only the direction matters under cosine gating."""
  del expert_hidden, init_threshold
  return jax.random.normal(rng, (num_experts, d_model), jnp.float32).astype(param_dtype)


def _init_thresholds(rng: Array, num_experts: int, d_model: int, expert_hidden: int,
                     init_threshold: float, param_dtype: Any) -> Array:
  """[E] all equal to ``init_threshold``."""
  del rng, d_model, expert_hidden
  return jnp.full((num_experts,), init_threshold, param_dtype)


def _init_w_in(rng: Array, num_experts: int, d_model: int, expert_hidden: int,
               init_threshold: float, param_dtype: Any) -> Array:
  """[E, C, F] LeCun-normal per expert (std 1/sqrt(C))."""
  del init_threshold
  w = jax.random.normal(rng, (num_experts, d_model, expert_hidden), jnp.float32)
  return (w * d_model**-0.5).astype(param_dtype)


def _init_b_in(rng: Array, num_experts: int, d_model: int, expert_hidden: int,
               init_threshold: float, param_dtype: Any) -> Array:
  """[E, F] zeros."""
  del rng, d_model, init_threshold
  return jnp.zeros((num_experts, expert_hidden), param_dtype)


def _init_w_out(rng: Array, num_experts: int, d_model: int, expert_hidden: int,
                init_threshold: float, param_dtype: Any) -> Array:
  """[E, F, C] LeCun-normal per expert (std 1/sqrt(F))."""
  del init_threshold
  w = jax.random.normal(rng, (num_experts, expert_hidden, d_model), jnp.float32)
  return (w * expert_hidden**-0.5).astype(param_dtype)


def _init_b_out(rng: Array, num_experts: int, d_model: int, expert_hidden: int,
                init_threshold: float, param_dtype: Any) -> Array:
  """[E, C] zeros."""
  del rng, expert_hidden, init_threshold
  return jnp.zeros((num_experts, d_model), param_dtype)


LEAF_INITS: dict[str, Callable[..., Array]] = {
    "prototypes": _init_prototypes,
    "thresholds": _init_thresholds,
    "w_in": _init_w_in,
    "b_in": _init_b_in,
    "w_out": _init_w_out,
    "b_out": _init_b_out,
}


def init_expert_params(rng: Array, num_experts: int, d_model: int, expert_hidden: int,
                       init_threshold: float = 0.0, param_dtype: Any = jnp.float32
                       ) -> dict[str, Array]:
  """Fresh parameters of one DynMoE layer, drawn from the module's own initialisers.

  Returns ``{"prototypes": [E, C], "thresholds": [E], "w_in": [E, C, F], "b_in": [E, F],
  "w_out": [E, F, C], "b_out": [E, C]}`` (C = d_model, F = expert_hidden), the same leaf names,
  shapes, dtypes and distributions as ``DynMoE.init``. Expert reset takes row e of every leaf.
  """
  rngs = jax.random.split(rng, len(EXPERT_LEAVES))
  return {name: LEAF_INITS[name](key, num_experts, d_model, expert_hidden, init_threshold,
                                 param_dtype)
          for name, key in zip(EXPERT_LEAVES, rngs)}


# ----------------------------------------------------------------------------------------------
# Pure functions: gate, SDL, expert mixture
# ----------------------------------------------------------------------------------------------

def _normalise(v: Array) -> Array:
  """Rows of v scaled to unit L2 norm (float32), finite for a zero row."""
  v = v.astype(jnp.float32)
  return v * jax.lax.rsqrt(jnp.sum(v * v, axis=-1, keepdims=True) + NORM_EPS)


def cosine_similarity(x_BTC: Array, prototypes_EC: Array) -> Array:
  """``s_BTE = cos(x_t, P_e)`` in float32 at full matmul precision.

  Full precision because the hard gate compares s with a threshold: a TF32/bf16 matmul would
  flip experts whose margin is tiny.
  """
  return jnp.einsum("btc,ec->bte", _normalise(x_BTC), _normalise(prototypes_EC),
                    precision=jax.lax.Precision.HIGHEST)


def diversity_loss(prototypes_EC: Array) -> Array:
  """SDL diversity ``||P^ P^T - I||_F^2`` (sum of squares of every entry), float32 scalar."""
  p_EC = _normalise(prototypes_EC)
  gram_EE = jnp.einsum("ec,fc->ef", p_EC, p_EC, precision=jax.lax.Precision.HIGHEST)
  return jnp.sum(jnp.square(gram_EE - jnp.eye(gram_EE.shape[0], dtype=jnp.float32)))


def fallback_experts(s_BTE: Array, k: int) -> Array:
  """0/1 float32 mask [B, T, E] of each token's ``k`` most similar experts, ties to the lower
  index. For ``k = 1`` (every shipped config) an argmax, the same choice as ``lax.top_k``'s
  (which also puts the lower index first) without its sort, which took 63 us a layer at arc1's
  32 x 2048 on an H200 (0.38 ms of the train step). The two differ only where top_k orders
  -0.0 below +0.0 or ranks a NaN with its sign bit set last; argmax takes them as equal and
  first."""
  E = s_BTE.shape[-1]
  if k == 1:
    return jax.nn.one_hot(jnp.argmax(s_BTE, axis=-1), E, dtype=jnp.float32)
  _, top_BTK = jax.lax.top_k(s_BTE, k)
  return jnp.sum(jax.nn.one_hot(top_BTK, E, dtype=jnp.float32), axis=-2)


def gate_weights(s_BTE: Array, thresholds_E: Array, *, combine: str, fallback_k: int,
                 st_temperature: float) -> tuple[Array, ...]:
  """The gate's decisions from the similarities ``s_BTE`` (float32): (weights_BTE, used_BTE,
  st_BTE, hard_BTE, fallback_BT), as :func:`route` documents them (st: the straight-through
  activation, equal to hard in the forward pass; fallback: tokens that activate none)."""
  margin_BTE = s_BTE - thresholds_E.astype(jnp.float32)
  hard_BTE = (margin_BTE > 0).astype(jnp.float32)
  soft_BTE = jax.nn.sigmoid(margin_BTE / st_temperature)
  # (soft - sg(soft)) is exactly 0 in the forward pass, so st equals hard bit for bit.
  st_BTE = hard_BTE + (soft_BTE - jax.lax.stop_gradient(soft_BTE))

  fallback_BT = jnp.sum(hard_BTE, axis=-1) == 0
  top_BTE = fallback_experts(jax.lax.stop_gradient(s_BTE), fallback_k)
  # A fallback token's experts are chosen by rank, not by threshold: its mask is a constant.
  used_BTE = jnp.where(fallback_BT[..., None], top_BTE, hard_BTE)
  used_st_BTE = jnp.where(fallback_BT[..., None], top_BTE, st_BTE)

  if combine == "mean":
    # Normalising by sum(m_st) (not a constant count) makes d y / d m_e = (y_e - y) / count,
    # the direction that switching expert e on would move the output.
    weights_BTE = used_st_BTE / jnp.sum(used_st_BTE, axis=-1, keepdims=True)
  elif combine == "softmax":
    is_used_BTE = used_BTE > 0
    top_margin_BT1 = jax.lax.stop_gradient(
        jnp.max(jnp.where(is_used_BTE, margin_BTE, -jnp.inf), axis=-1, keepdims=True))
    z_BTE = margin_BTE - top_margin_BT1
    # Unused experts may have a larger margin than every used one (fallback ranks by s, not by
    # s - theta); capping their exponent at 0 keeps exp() finite where only their ST gradient
    # would see it.
    z_BTE = jnp.where(is_used_BTE, z_BTE, jnp.minimum(z_BTE, 0.0))
    e_BTE = used_st_BTE * jnp.exp(z_BTE)
    weights_BTE = e_BTE / jnp.sum(e_BTE, axis=-1, keepdims=True)
  else:
    raise ValueError(f"DynMoE combine={combine!r}: expected one of {COMBINE_MODES}")
  return weights_BTE, used_BTE, st_BTE, hard_BTE, fallback_BT


def route(x_BTC: Array, prototypes_EC: Array, thresholds_E: Array, valid_BT: Array, *,
          combine: str, fallback_k: int, target_active: float, st_temperature: float
          ) -> tuple[Array, Array, dict[str, Array]]:
  """The DynMoE gate, in float32.

  Args:
    x_BTC: token features.  prototypes_EC, thresholds_E: gate parameters.
    valid_BT: bool, False for padding (excluded from every statistic and from the sparsity term).
  Returns:
    weights_BTE: combination weights (float32, sum to 1 over the used experts of each token;
      carry the straight-through gradient).
    used_BTE: hard 0/1 mask of the experts each token actually uses (fallback included).
    aux: the statistics and SDL terms listed in ``AUX_KEYS`` (diversity included).
  """
  s_BTE = cosine_similarity(x_BTC, prototypes_EC)
  weights_BTE, used_BTE, st_BTE, hard_BTE, fallback_BT = gate_weights(
      s_BTE, thresholds_E, combine=combine, fallback_k=fallback_k,
      st_temperature=st_temperature)

  valid_BT = valid_BT.astype(jnp.float32)
  num_tokens = jnp.sum(valid_BT)
  denom = jnp.maximum(num_tokens, 1.0)
  # Kept as a sum with its count so a data-parallel step can form the global fraction.
  st_active_sum = jnp.sum(jnp.mean(st_BTE, axis=-1) * valid_BT)
  st_frac = st_active_sum / denom
  fallback_tokens = jnp.sum(fallback_BT.astype(jnp.float32) * valid_BT)
  aux = {
      "diversity": diversity_loss(prototypes_EC),
      "sparsity": jnp.square(st_frac - target_active),
      "active_frac": jnp.sum(jnp.mean(hard_BTE, axis=-1) * valid_BT) / denom,
      "experts_per_token": jnp.sum(jnp.sum(used_BTE, axis=-1) * valid_BT) / denom,
      "fallback_frac": fallback_tokens / denom,
      "tokens_per_expert": jnp.einsum("bte,bt->e", used_BTE, valid_BT,
                                      precision=jax.lax.Precision.HIGHEST),
      "fallback_tokens": fallback_tokens,
      "num_tokens": num_tokens,
      "st_active_sum": st_active_sum,
  }
  return weights_BTE, used_BTE, aux


# aux entries that add up over tokens, and those that are means over the tokens.
_AUX_SUMS = ("tokens_per_expert", "fallback_tokens", "num_tokens", "st_active_sum")
_AUX_MEANS = ("active_frac", "experts_per_token", "fallback_frac")


def merge_aux(a: dict[str, Array], b: dict[str, Array], target_active: float
              ) -> dict[str, Array]:
  """The :func:`route` statistics (of every layer, stacked or not; a gated attention's under
  ``"attn"``) of one call over the tokens of two calls with the same parameters: the counts
  and sums add, the per-token means are weighted by the calls' token counts, the sparsity
  term is formed again from the sums, and the diversity (of the prototypes) is either's."""
  n_a, n_b = a["num_tokens"], b["num_tokens"]
  denom = jnp.maximum(n_a + n_b, 1.0)
  out = {k: a[k] + b[k] for k in _AUX_SUMS}
  out.update({k: (a[k] * n_a + b[k] * n_b) / denom for k in _AUX_MEANS})
  out["sparsity"] = jnp.square(out["st_active_sum"] / denom - target_active)
  out["diversity"] = a["diversity"]
  if "attn" in a:
    out["attn"] = merge_aux(a["attn"], b["attn"], target_active)
  return out


def experts_reference(x_BTC: Array, weights_BTE: Array, params: dict[str, Array], dtype: Any
                      ) -> Array:
  """``y_t = sum_e w_te (gelu(x_t W_in_e + b_in_e) W_out_e + b_out_e)``, every expert computed,
  differentiated by autodiff: the definition that :func:`experts_dense` computes faster.

  The weights are folded into the hidden activations before the output projection, so the
  contraction runs over (e, f) at once and no [B, T, E, C] tensor is formed. Matmuls in ``dtype``.
  Returns y_BTC in ``dtype``.
  """
  x_BTC = x_BTC.astype(dtype)
  w_BTE = weights_BTE.astype(dtype)
  h_BTEF = jnp.einsum("btc,ecf->btef", x_BTC, params["w_in"].astype(dtype))
  h_BTEF = jax.nn.gelu(h_BTEF + params["b_in"].astype(dtype), approximate=False)
  y_BTC = jnp.einsum("btef,efc->btc", h_BTEF * w_BTE[..., None], params["w_out"].astype(dtype))
  return y_BTC + jnp.einsum("bte,ec->btc", w_BTE, params["b_out"].astype(dtype))


def _gelu_and_slope(u: Array) -> tuple[Array, Array]:
  """Exact (erf) gelu of ``u`` and its derivative ``Phi(u) + u phi(u)``, in float32."""
  u = u.astype(jnp.float32)
  cdf = 0.5 * (1.0 + jax.lax.erf(u * (1.0 / math.sqrt(2.0))))
  return u * cdf, cdf + u * jnp.exp(-0.5 * u * u) * (1.0 / math.sqrt(2.0 * math.pi))


# The expert mixture's einsum subscripts by layout: x, the gate weights w, the hidden
# activations h (one row per (token, expert)) and the output y. "dense": every expert on every
# token (x_BTC shared by the experts, y summed over them); "grouped": each expert (or tile) on
# its own rows (x_ERC, gate w_ER), y_ERC per row, summed over a token's rows by the caller.
_MIXTURE_LAYOUTS: dict[str, tuple[str, str, str, str]] = {
    "dense": ("btc", "bte", "btef", "btc"),
    "grouped": ("erc", "er", "erf", "erc"),
}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _experts_mixture(layout: str, x: Array, w: Array, w_in_ECF: Array, b_in_EF: Array,
                     w_out_EFC: Array, b_out_EC: Array) -> Array:
  """``y = sum_e w_e (gelu(x W_in_e + b_in_e) W_out_e + b_out_e)`` in ``layout``
  (:data:`_MIXTURE_LAYOUTS`), with a hand-written backward pass (see :func:`experts_dense`).

  ``b_in_EF=None``: x carries :func:`with_ones`' column and w_in its bias row
  (:func:`with_bias_row`), so b_in's gradient is w_in's row; else the backward pass appends the
  column itself."""
  return _experts_mixture_fwd(layout, x, w, w_in_ECF, b_in_EF, w_out_EFC, b_out_EC)[0]


def _preactivation(h: Array, b_EF: Array | None, hidden: str) -> Array:
  """``h + b`` with b_EF broadcast against activations with subscripts ``hidden`` (e and f last,
  or e first); h itself for None (the bias is in the weights already)."""
  if b_EF is None:
    return h
  return h + (b_EF if hidden.endswith("ef") else b_EF[:, None])


def with_ones(x: Array) -> Array:
  """x [..., C] with a column of ones appended and zero columns up to a multiple of BIAS_PAD:
  a matmul of it by :func:`with_bias_row`'s weights adds the bias, and its weight-gradient
  matmul gives the bias's gradient as one more row."""
  C = x.shape[-1]
  return jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), x.dtype),
                          jnp.zeros(x.shape[:-1] + (-(C + 1) % BIAS_PAD,), x.dtype)], axis=-1)


def with_bias_row(w_ECF: Array, b_EF: Array) -> Array:
  """w_ECF with b_EF as row C and zero rows up to :func:`with_ones`' width."""
  E, C, F = w_ECF.shape
  return jnp.concatenate([w_ECF, b_EF[:, None].astype(w_ECF.dtype),
                          jnp.zeros((E, -(C + 1) % BIAS_PAD, F), w_ECF.dtype)], axis=1)


def _experts_mixture_fwd(layout, x, w, w_in_ECF, b_in_EF, w_out_EFC, b_out_EC):
  X, W, H, Y = _MIXTURE_LAYOUTS[layout]
  h = jnp.einsum(f"{X},ecf->{H}", x, w_in_ECF)
  gelu, _ = _gelu_and_slope(_preactivation(h, b_in_EF, H))
  a = (gelu * w[..., None].astype(jnp.float32)).astype(x.dtype)
  y = jnp.einsum(f"{H},efc->{Y}", a, w_out_EFC) + jnp.einsum(f"{W},ec->{Y}", w, b_out_EC)
  return y, (x, w, h, a, w_in_ECF, b_in_EF, w_out_EFC, b_out_EC)


def _experts_mixture_bwd(layout, res, dy):
  x, w, h, a, w_in_ECF, b_in_EF, w_out_EFC, b_out_EC = res
  X, W, H, Y = _MIXTURE_LAYOUTS[layout]
  dtype, f32 = x.dtype, jnp.float32
  C = x.shape[-1]
  da = jnp.einsum(f"{Y},efc->{H}", dy, w_out_EFC)
  # One pass over the hidden activations: gelu and its slope from the saved pre-activation,
  # the gate's gradient (a sum over f) and the pre-activation's gradient.
  gelu, slope = _gelu_and_slope(_preactivation(h, b_in_EF, H))
  da32 = da.astype(f32)
  dw = jnp.sum(da32 * gelu, axis=-1) + jnp.einsum(f"{Y},ec->{W}", dy, b_out_EC,
                                                  preferred_element_type=f32)
  dh = (da32 * slope * w[..., None].astype(f32)).astype(dtype)
  # b_in's gradient (the sum of dh over rows) comes out of the input projection's weight
  # gradient as the row of a column of ones appended to x (:func:`with_ones`): the matmul reads
  # dh anyway, where a separate reduction read it again (1 GiB a layer at arc1's 32 x 2048).
  # The sparse dispatch gathers x with its column already (appending it to the gathered rows
  # took 0.4 ms at arc1's 32 x 2048 on an H200).
  if b_in_EF is None:
    dw_in_ECF = jnp.einsum(f"{X},{H}->ecf", x, dh, preferred_element_type=f32)
    db_in_EF = None
  else:
    dw_in1_EKF = jnp.einsum(f"{X[:-1]}k,{H}->ekf", with_ones(x), dh, preferred_element_type=f32)
    dw_in_ECF, db_in_EF = dw_in1_EKF[:, :C], dw_in1_EKF[:, C].astype(b_in_EF.dtype)
  return (jnp.einsum(f"{H},ecf->{X}", dh, w_in_ECF),
          dw.astype(w.dtype),
          dw_in_ECF.astype(w_in_ECF.dtype),
          db_in_EF,
          jnp.einsum(f"{H},{Y}->efc", a, dy, preferred_element_type=f32).astype(w_out_EFC.dtype),
          jnp.einsum(f"{W},{Y}->ec", w, dy, preferred_element_type=f32).astype(b_out_EC.dtype))


_experts_mixture.defvjp(_experts_mixture_fwd, _experts_mixture_bwd)


def experts_dense(x_BTC: Array, weights_BTE: Array, params: dict[str, Array], dtype: Any
                  ) -> Array:
  """:func:`experts_reference` (same arguments, same result) with a hand-written backward pass.

  Autodiff of the reference keeps gelu's output and the gated activations as residuals and
  walks the [B, T, E, F] hidden activations three times in the backward pass. Here the forward
  pass writes only what the output projection reads (``gelu(h + b_in) * w``, kept with the
  pre-activation h, which the input projection writes anyway) and the backward pass forms the
  gate's gradient and the pre-activation's gradient in one pass over the activations, with
  gelu and its slope recomputed from h in float32.
  """
  return _experts_mixture("dense", x_BTC.astype(dtype), weights_BTE.astype(dtype),
                          *(params[name].astype(dtype) for name in ("w_in", "b_in", "w_out",
                                                                   "b_out")))


# ----------------------------------------------------------------------------------------------
# Sparse token-to-expert dispatch (impl="ragged" / "tiled" / "batched")
# ----------------------------------------------------------------------------------------------
#
# Layout: the (token, expert) pairs in use are laid out expert by expert ("slots"), each
# expert's group padded to a multiple of ``tile`` rows, so that every tile of rows belongs to
# one expert. A pair's slot is the start of its expert's group plus the number of tokens before
# it that use the same expert (a cumulative sum over tokens: no sort). Tokens reach the slots by
# a gather and come back by a gather + sum over their <= E slots (a [N, E] table of slot
# indices), and the gradients of both are again gathers: no scatter-add of [S, C] rows (only
# the tiles' weight and bias gradients are added into their experts' rows).


def pair_capacity(num_tokens: int, num_experts: int, target_active: float, factor: float,
                  tile: int) -> int:
  """The static number of (token, expert) pairs a sparse dispatch computes for ``num_tokens``:
  ``factor * target_active * num_tokens * num_experts`` rounded up to a multiple of ``tile``,
  at most every pair (``num_tokens * num_experts``)."""
  pairs = math.ceil(factor * target_active * num_tokens * num_experts)
  return min(-(-pairs // tile) * tile, num_tokens * num_experts)


def num_slots(capacity: int, tile: int, num_experts: int) -> int:
  """Rows of the slot layout for ``capacity`` pairs: ``(ceil(capacity / tile) + E) * tile``,
  enough whatever their spread over the experts (each group wastes fewer than ``tile``)."""
  return (-(-capacity // tile) + num_experts) * tile


def slots_overflow(count_E: Array, capacity: int, tile: int) -> Array:
  """Whether pairs counted per expert (``count_E``, int [E]) overflow :func:`pair_slots`' layout
  for ``capacity``: each expert's group rounded up to whole tiles needs more than
  :func:`num_slots` rows in all. Never for ``capacity`` pairs or fewer (the layout leaves a tile
  of slack per expert); up to ``num_slots - E * (tile - 1)`` pairs always fit, and more where
  the groups end near a tile's end.

  The check before 2026-12-06 was ``pairs > capacity``. Counted offline on the per-layer
  ``tokens_per_expert`` of the logged steps of three H200 runs (65536 tokens a batch, the
  default capacity and tile): the arc1 recipe of 2026-12-02 had 73 of 114 layer-batches over
  the old check before step 1000 and 22 of 750 after, 60 and 6 over this one; the arc2 run of
  that day 78 / 114 and 40 / 846 against 71 and 17
  (docs/bench/arc{1_shipped_recipe_scored,2_pack_misses_8000_no_eavi_ttt64}_metrics_h200_
  2026-12-02.jsonl). Each is a layer that now runs sparse instead of the dense fallback; at
  ~1-3 ms a fallback, seconds of a run, not minutes."""
  need = jnp.sum((jnp.asarray(count_E, jnp.int32) + tile - 1) // tile) * tile
  return need > num_slots(capacity, tile, count_E.shape[-1])


def pair_slots(used_NE: Array, capacity: int, tile: int) -> tuple[Array, Array, Array, int]:
  """Where each (token, expert) pair of a routing mask goes in the tiled slot layout.

  Args:
    used_NE: bool/0-1 [N, E], the experts each token uses.
    capacity: pairs that must fit. The layout has ``S = num_slots(capacity, tile, E)`` slots.
      Pairs beyond S (the highest experts' last ones) are dropped: only where
      :func:`slots_overflow`, which :func:`experts` checks first.
  Returns:
    slot_NE int32 [N, E]: the slot of pair (t, e), S where t does not use e (or it was dropped);
    pair_S int32 [S]: ``t * E + e`` of the pair in each slot, ``N * E`` for an empty slot;
    group_E int32 [E]: the slots of each expert's group (a multiple of ``tile``; they sum to at
      most S);
    S, the number of slots (static).
  """
  N, E = used_NE.shape
  S = num_slots(capacity, tile, E)
  used_NE = used_NE > 0
  count_NE = used_NE.astype(jnp.int32)
  rank_NE = jnp.cumsum(count_NE, axis=0) - count_NE  # tokens before t that use e
  group_E = (jnp.sum(count_NE, axis=0) + tile - 1) // tile * tile
  end_E = jnp.minimum(jnp.cumsum(group_E), S)
  group_E = end_E - jnp.concatenate([jnp.zeros(1, jnp.int32), end_E[:-1]])
  slot_NE = jnp.where(used_NE, (end_E - group_E)[None, :] + rank_NE, S)
  slot_NE = jnp.minimum(slot_NE, S)
  return slot_NE, _pairs_by_slot(slot_NE, S), group_E, S


def expert_rows(capacity: int, num_experts: int, tile: int, num_tokens: int) -> int:
  """Rows per expert of the batched dispatch: an even share of ``capacity`` pairs, rounded up
  to a multiple of ``tile``, at most ``num_tokens`` (an expert cannot have more)."""
  return min(-(-capacity // (num_experts * tile)) * tile, num_tokens)


def expert_slots(used_NE: Array, rows: int) -> tuple[Array, Array, int]:
  """The batched dispatch's layout: ``rows`` slots per expert, expert-major, so the experts'
  matmuls are one batched matmul over [E, rows] with each expert's own weights.

  Pair (t, e) goes to slot ``e * rows + (tokens before t that use e)``. Returns slot_NE (S where
  t does not use e, or the pair is past its expert's rows: dropped), pair_S (``t * E + e`` of
  each slot, ``N * E`` when empty) and S = E * rows, as :func:`pair_slots` does.
  """
  N, E = used_NE.shape
  S = E * rows
  used_NE = used_NE > 0
  count_NE = used_NE.astype(jnp.int32)
  rank_NE = jnp.cumsum(count_NE, axis=0) - count_NE
  kept_NE = used_NE & (rank_NE < rows)
  slot_NE = jnp.where(kept_NE, jnp.arange(E, dtype=jnp.int32)[None, :] * rows + rank_NE, S)
  return slot_NE, _pairs_by_slot(slot_NE, S), S


def _pairs_by_slot(slot_NE: Array, num_slots: int) -> Array:
  """pair_S: ``t * E + e`` of the pair in each slot (``N * E`` when empty; slot S is none)."""
  N, E = slot_NE.shape
  return jnp.full(num_slots, N * E, jnp.int32).at[slot_NE.reshape(-1)].set(
      jnp.arange(N * E, dtype=jnp.int32), mode="drop")


def _take_rows(src_MD: Array, index_K: Array) -> Array:
  """Rows ``src[index]``; an index of M (one past the end) gives a zero row."""
  return jnp.take(src_MD, index_K, axis=0, mode="fill", fill_value=0)


def sum_rows(src_SD: Array, slot_NE: Array, width: int | None = None) -> Array:
  """``out_t = sum_e src[slot_te, :width]`` [N, width] (width: default all of D), accumulated in
  float32 and rounded once to src's dtype; slot S (one past the last row) adds nothing. One
  gather per expert, summed elementwise: XLA fuses them into one pass that forms no [N, E, D]
  tensor.

  Tried, not kept (H200, jax 0.11.2, 2026-12-03, docs/bench/moe_sum_rows_h200_2026-12-03.json):
  a Pallas (Triton) kernel of 16 tokens a program, each adding its slots' rows expert by
  expert. Alone at arc1's 32 x 2048 tokens (4 of 16 experts) it took 0.154 ms against these
  fused gathers' 0.279, but the batched DynMoE layer fwd+bwd took the same time with it as
  without (3.08 ms both, three alternated runs each, at 32 x 2048 and at 8 x 8192).
  """
  if width is not None and width != src_SD.shape[1]:
    src_SD = src_SD[:, :width]
  out_ND = None
  for e in range(slot_NE.shape[1]):
    term_ND = _take_rows(src_SD, slot_NE[:, e]).astype(jnp.float32)
    out_ND = term_ND if out_ND is None else out_ND + term_ND
  return out_ND.astype(src_SD.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def dispatch(x_NC: Array, slot_NE: Array, pair_S: Array, ones: bool = False) -> Array:
  """x_SC: each slot's token row (zero for an empty slot), with :func:`with_ones`' columns
  appended when ``ones``. Its gradient is the sum over each token's slots of x's own columns, a
  gather (autodiff would scatter-add [S, C] rows)."""
  return _take_rows(with_ones(x_NC) if ones else x_NC, pair_S // slot_NE.shape[1])


def _dispatch_fwd(x_NC, slot_NE, pair_S, ones):
  return dispatch(x_NC, slot_NE, pair_S, ones), (slot_NE, x_NC.shape[1])


def _dispatch_bwd(ones, res, g_SK):
  del ones
  slot_NE, width = res
  return sum_rows(g_SK, slot_NE, width), None, None


dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@jax.custom_vjp
def slot_gates(weights_NE: Array, slot_NE: Array, pair_S: Array) -> Array:
  """w_S: the gate weight of each slot's pair (0 for an empty slot). Every pair has at most one
  slot, so the gradient is a gather too: ``dw_te = g[slot_te]`` (0 for a pair with none)."""
  return _take_rows(weights_NE.reshape(-1), pair_S)


def _slot_gates_fwd(weights_NE, slot_NE, pair_S):
  return slot_gates(weights_NE, slot_NE, pair_S), slot_NE


def _slot_gates_bwd(slot_NE, g_S):
  return _take_rows(g_S, slot_NE), None, None


slot_gates.defvjp(_slot_gates_fwd, _slot_gates_bwd)


@jax.custom_vjp
def combine(z_SC: Array, slot_NE: Array, pair_S: Array) -> Array:
  """``y_t = sum_e z[slot_te]`` over each token's slots [N, C], accumulated in float32 and
  rounded once to z's dtype (the slots' rows carry their gate weights already). Its gradient
  ``dz_s = g[token_s]`` is a gather."""
  del pair_S
  return sum_rows(z_SC, slot_NE)


def _combine_fwd(z_SC, slot_NE, pair_S):
  return combine(z_SC, slot_NE, pair_S), (slot_NE, pair_S)


def _combine_bwd(res, g_NC):
  slot_NE, pair_S = res
  return _take_rows(g_NC, pair_S // slot_NE.shape[1]), None, None


combine.defvjp(_combine_fwd, _combine_bwd)


def experts_sparse(x_NC: Array, weights_NE: Array, used_NE: Array, params: dict[str, Array],
                   dtype: Any, capacity: int, tile: int, impl: str = "tiled",
                   precision: Any = None) -> Array:
  """``y_t = sum_e w_te Expert_e(x_t)`` over the pairs of ``used_NE`` only.

  ``"ragged"`` and ``"tiled"`` lay the pairs out by :func:`pair_slots` and run a grouped matmul
  over the expert groups: ``jax.lax.ragged_dot``, or one batched matmul over tiles of ``tile``
  rows, each with a copy of its expert's weights. ``"batched"`` gives every expert the same
  :func:`expert_rows` rows (:func:`expert_slots`) and runs one batched matmul over the experts
  with their weights as they are. Tiled and batched run the experts with the dense mixture's
  hand-written backward pass (:func:`experts_dense`), each slot's gate weight folded into its
  activations; ``precision`` applies to ragged's matmuls. Empty slots hold zero rows with gate
  0. Same result as :func:`experts_dense` when the pairs fit (ragged, tiled: at most
  ``capacity`` in all; batched: at most ``expert_rows`` for every expert), otherwise pairs are
  dropped: see :func:`experts` for the exact fallback. Returns y_NC in ``dtype``.
  """
  N, C = x_NC.shape
  E = used_NE.shape[1]
  if impl == "batched":
    rows = expert_rows(capacity, E, tile, N)
    slot_NE, pair_S, S = expert_slots(used_NE, rows)
    x1_ERK = dispatch(x_NC.astype(dtype), slot_NE, pair_S, True).reshape(E, rows, -1)
    w_ER = slot_gates(weights_NE.astype(dtype), slot_NE, pair_S).reshape(E, rows)
    w_in1_EKF = with_bias_row(params["w_in"], params["b_in"]).astype(dtype)
    z_ERC = _experts_mixture("grouped", x1_ERK, w_ER, w_in1_EKF, None,
                             params["w_out"].astype(dtype), params["b_out"].astype(dtype))
    return combine(z_ERC.reshape(S, C), slot_NE, pair_S)
  if impl not in ("ragged", "tiled"):
    raise ValueError(f"experts_sparse: impl={impl!r} is not 'ragged', 'tiled' or 'batched'")
  slot_NE, pair_S, group_E, S = pair_slots(used_NE, capacity, tile)
  num_tiles = S // tile
  w_S = slot_gates(weights_NE.astype(dtype), slot_NE, pair_S)
  # Each tile's expert weights by a one-hot matmul rather than a gather: its gradient (the sum
  # of an expert's tiles) is then a plain matmul too, not a scatter-add of [tiles, C, F] rows
  # (the gather form's program did not finish compiling on an H200). HIGHEST precision makes the
  # product an exact copy, in the parameters' dtype (float32) before the cast, so the gradient
  # sums an expert's tiles in float32.
  end_E = jnp.cumsum(group_E)
  # Tiles past the last group (no rows) take the last expert. "compare_all": one fused
  # comparison of every tile with the E group ends; the default binary search is a while loop
  # (the NSA plan's two such loops cost 2.3 ms of an H100 step, docs/benchmarks.md session 32).
  expert_L = jnp.minimum(jnp.searchsorted(end_E, jnp.arange(num_tiles) * tile, side="right",
                                          method="compare_all"), E - 1)
  onehot_LE = (expert_L[:, None] == jnp.arange(E)[None, :]).astype(jnp.float32)

  def per_tile(w: Array) -> Array:
    return jnp.einsum("le,e...->l...", onehot_LE, w.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST).astype(dtype)

  if impl == "ragged":
    x_SC = dispatch(x_NC.astype(dtype), slot_NE, pair_S)
    h_LRF = jax.lax.ragged_dot(x_SC, params["w_in"].astype(dtype), group_E,
                               precision=precision).reshape(num_tiles, tile, -1)
    h_SF = jax.nn.gelu(h_LRF + per_tile(params["b_in"])[:, None],
                       approximate=False).reshape(S, -1)
    z_LRC = jax.lax.ragged_dot(h_SF, params["w_out"].astype(dtype), group_E,
                               precision=precision).reshape(num_tiles, tile, C)
    z_SC = w_S[:, None] * (z_LRC + per_tile(params["b_out"])[:, None]).reshape(S, C)
    return combine(z_SC, slot_NE, pair_S)

  x1_SK = dispatch(x_NC.astype(dtype), slot_NE, pair_S, True)
  z_LRC = _experts_mixture("grouped", x1_SK.reshape(num_tiles, tile, -1),
                           w_S.reshape(num_tiles, tile),
                           per_tile(with_bias_row(params["w_in"], params["b_in"])), None,
                           per_tile(params["w_out"]), per_tile(params["b_out"]))
  return combine(z_LRC.reshape(S, C), slot_NE, pair_S)


def resolve_impl(impl: str, backend: str | None = None) -> str:
  """``impl`` with ``"auto"`` mapped to :data:`AUTO_GPU_IMPL` on GPU (``backend``, default
  ``jax.default_backend()``) and to ``"dense"`` elsewhere."""
  if impl not in IMPLS:
    raise ValueError(f"DynMoE impl={impl!r}: expected one of {IMPLS}")
  if impl == "auto":
    return AUTO_GPU_IMPL if (backend or jax.default_backend()) == "gpu" else "dense"
  return impl


def vmap_impl(impl: str, backend: str | None = None) -> str:
  """The dispatch to run instead of ``impl`` when the model is ``jax.vmap``-ed over examples:
  a sparse one's ``lax.cond`` (its exact dense fallback) becomes a select there and computes
  both branches, so ``"dense"`` for the sparse impls; ``impl`` itself otherwise."""
  resolved = resolve_impl(impl, backend)
  return impl if resolved in ("dense", "reference") else "dense"


def auto_dense(impl: str) -> str:
  """The dispatch of every model call but the teacher-forcing step (EAVI, evaluation, probes)
  for ``impl``: ``auto`` runs dense there (see :data:`AUTO_GPU_IMPL`), any other impl itself."""
  return "dense" if impl == "auto" else impl


def describe(impl: str, capacity: float, backend: str | None = None) -> str:
  """The expert dispatch a run computes, for its start line, e.g. ``auto: tiled, capacity
  1.25x the SDL target (teacher forcing only)``."""
  resolved = resolve_impl(impl, backend)
  text = resolved if impl == resolved else f"{impl}: {resolved}"
  if resolved in ("dense", "reference"):
    return text
  where = "teacher forcing only" if auto_dense(impl) != impl else "dense under vmap"
  return f"{text}, capacity {capacity:g}x the SDL target ({where})"


def experts(x_BTC: Array, weights_BTE: Array, used_BTE: Array, params: dict[str, Array],
            dtype: Any, impl: str = "dense", tile: int = TILE_ROWS, *,
            capacity: int | None = None, valid_BT: Array | None = None,
            precision: Any = None) -> Array:
  """The expert mixture by ``impl`` (``auto``: :func:`resolve_impl`). Returns y_BTC in
  ``dtype``.

  ``dense``: :func:`experts_dense`, every expert on every token (``reference``: the same by
  autodiff of the definition, :func:`experts_reference`). ``ragged`` / ``tiled``:
  :func:`experts_sparse` over the ``used_BTE`` pairs of the valid tokens (``valid_BT``; a padding
  token then uses no expert and its output is 0, which no real token reads: attention is causal
  and padding follows every real token), in a layout of ``num_slots(capacity)`` rows
  (``capacity`` default: all ``B*T*E`` pairs). When a call's pairs do not fit that layout
  (:func:`slots_overflow`: never with ``capacity`` pairs or fewer; ``batched``: an expert has
  more tokens than its :func:`expert_rows`), the layer computes the dense result instead
  (``jax.lax.cond`` on the pair counts), so nothing is ever dropped. Under ``jax.vmap``
  the cond becomes a select and both branches run: still exact, but slower than dense alone
  (callers that vmap the model take :func:`vmap_impl`).
  When the sparse layout would hold as many rows as dense computes (``B*T*E`` or more: few
  tokens, e.g. a decoding step, or a capacity of every pair), dense is computed outright.
  """
  impl = resolve_impl(impl)
  if impl in ("dense", "reference"):
    return (experts_dense if impl == "dense" else experts_reference)(x_BTC, weights_BTE, params,
                                                                     dtype)
  B, T, C = x_BTC.shape
  E = weights_BTE.shape[-1]
  N = B * T
  used_NE = used_BTE.reshape(N, E) > 0
  if valid_BT is not None:
    used_NE = used_NE & valid_BT.reshape(N, 1)
  capacity = N * E if capacity is None else min(capacity, N * E)
  if impl == "batched":
    rows = expert_rows(capacity, E, tile, N)
    computed, overflow = E * rows, jnp.max(jnp.sum(used_NE, axis=0, dtype=jnp.int32)) > rows
  else:
    computed = num_slots(capacity, tile, E)
    overflow = slots_overflow(jnp.sum(used_NE, axis=0, dtype=jnp.int32), capacity, tile)
  if computed >= N * E:
    return experts_dense(x_BTC, weights_BTE, params, dtype)

  def sparse(x_BTC, weights_BTE, used_NE, params):
    return experts_sparse(x_BTC.reshape(N, C), weights_BTE.reshape(N, E), used_NE, params,
                          dtype, capacity, tile, impl, precision).reshape(B, T, C)

  # Rematerialised: differentiating a cond saves the residuals of both branches, zeros for the
  # one not taken, so a sparse call would write dense's [N, E, F] activations (five of them,
  # 5 GiB at arc1's 32 x 2048: the layer took 7.4 ms instead of 3.4 on an H200). Under
  # jax.checkpoint the fallback saves only its inputs and recomputes the rest when it runs.
  @jax.checkpoint
  def dense(x_BTC, weights_BTE, used_NE, params):
    del used_NE
    return experts_dense(x_BTC, weights_BTE, params, dtype)

  return jax.lax.cond(overflow, dense, sparse, x_BTC, weights_BTE, used_NE, params)


# ----------------------------------------------------------------------------------------------
# One-token decoding in one kernel
# ----------------------------------------------------------------------------------------------

# How a decoding step's DynMoE experts run: "pallas", one kernel a layer, routing its rows itself
# (moe_pallas.DECODE_ROUTE, where moe_pallas.route_supported) or given XLA's routing
# (:func:`decode_experts`, where :func:`moe_pallas.decode_supported`; off GPU in Pallas
# interpret mode, for tests); "xla", XLA's launches; "auto" (the default), pallas on a GPU where
# it was timed (a 2-byte compute dtype, at most DECODE_AUTO_ROWS rows: its float32 partials
# grow with the rows) and xla elsewhere. H100, jax 0.11.2, session 36, the arc1 rollout of 32
# rows x 512 tokens (`python -m train.bench --config configs/arc1.yaml --only decode --lens
# 2048 --sets fused_xla_block_moe`, two calls): 189.3 / 190.5 ms with the kernel against 200.0
# / 200.9 with XLA's launches (1.06x / 1.05x); at 128 hidden units a program
# (moe_pallas.DEC_TILE_F) 1.03x / 1.06x. Before it took XLA's routing, the kernel was slower
# than XLA (0.80x, session 30).
DECODE_KERNEL: str = "auto"
DECODE_KERNEL_CHOICES: tuple[str, ...] = ("auto", "pallas", "xla")
DECODE_AUTO_ROWS = 64


def decode_kernel_setting() -> str:
  """:data:`DECODE_KERNEL` as it applies here: "pallas" or "xla" ("auto" resolved by the
  backend; :func:`decode_kernel_applies` also by the layer's dtype and rows)."""
  if DECODE_KERNEL not in DECODE_KERNEL_CHOICES:
    raise ValueError(f"moe.DECODE_KERNEL must be one of {DECODE_KERNEL_CHOICES}, got "
                     f"{DECODE_KERNEL!r}")
  if DECODE_KERNEL == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "xla"
  return DECODE_KERNEL


def decode_kernel_applies(d_model: int, expert_hidden: int, dtype: Any, rows: int = 1) -> bool:
  """Whether :func:`decode_experts` computes a decoding step's experts of these sizes
  (``rows``: the step's tokens)."""
  itemsize = jnp.dtype(dtype).itemsize
  if DECODE_KERNEL == "auto" and (itemsize != 2 or rows > DECODE_AUTO_ROWS):
    return False
  return decode_kernel_setting() == "pallas" and moe_pallas.decode_supported(
      d_model=d_model, expert_hidden=expert_hidden, itemsize=itemsize)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def decode_experts(dtype: Any, interpret: bool, gate: tuple | None, x_BTC: Array,
                   weights_BTE: Array | None, params: dict[str, Array],
                   unit_EC: Array | None = None, prenorm_C: Array | None = None) -> Array:
  """:func:`experts_dense` (``dtype`` output) for a few tokens, by
  :mod:`onn_jax.model.moe_pallas`'s kernel, given the combination weights ``weights_BTE``, or
  with ``gate`` = (combine, fallback_k, st_temperature) and ``weights_BTE`` None routing each
  token in the kernel (:func:`route`'s weights from ``params``' prototypes and thresholds;
  ``unit_EC``: the prototypes normalised, where the caller has them, else normalised here).
  With an RMSNorm's gains ``prenorm_C``: ``x_BTC +`` that of ``rms_norm(x_BTC)``, computed in
  the kernel (rounded once). Its gradient is that of :func:`experts_dense` (of :func:`route`'s
  weights with ``gate``), through the norm and the residual where given."""
  B, T, C = x_BTC.shape
  cast = {name: params[name].astype(dtype) for name in ("w_in", "b_in", "w_out", "b_out")}
  routing = None
  if gate is not None and x_BTC.dtype != jnp.dtype(dtype):
    # The kernel routes its rows as it reads them (in dtype): route would not round them.
    raise ValueError(f"decode_experts: routing in the kernel takes x in {jnp.dtype(dtype)}, "
                     f"got {x_BTC.dtype}")
  if gate is not None:
    combine, fallback_k, _ = gate
    if unit_EC is None:
      unit_EC = _normalise(params["prototypes"])
    routing = (unit_EC, params["thresholds"],
               dict(eps=NORM_EPS, combine=combine, fallback_k=fallback_k))
  parts = moe_pallas.decode_partials(
      x_BTC.reshape(B * T, C).astype(dtype),
      None if weights_BTE is None else weights_BTE.reshape(B * T, -1),
      cast["w_in"], cast["b_in"], cast["w_out"], cast["b_out"], interpret=interpret,
      gate=routing, prenorm_C=prenorm_C)
  return jnp.sum(parts, axis=0).astype(dtype).reshape(B, T, C)


def _decode_experts_reference(dtype, gate, x_BTC, weights_BTE, params, prenorm_C=None):
  if prenorm_C is not None:
    return x_BTC + _decode_experts_reference(dtype, gate, rms_norm(x_BTC, prenorm_C),
                                             weights_BTE, params)
  if gate is not None:
    combine, fallback_k, st_temperature = gate
    s_BTE = jnp.einsum("btc,ec->bte", _normalise(x_BTC), _normalise(params["prototypes"]),
                       precision=jax.lax.Precision.HIGHEST)
    weights_BTE = gate_weights(s_BTE, params["thresholds"], combine=combine,
                               fallback_k=fallback_k, st_temperature=st_temperature)[0]
  return experts_dense(x_BTC, weights_BTE, params, dtype)


def _decode_experts_fwd(dtype, interpret, gate, x_BTC, weights_BTE, params, unit_EC=None,
                        prenorm_C=None):
  return (decode_experts(dtype, interpret, gate, x_BTC, weights_BTE, params, unit_EC,
                         prenorm_C), ((x_BTC, weights_BTE, params, prenorm_C), unit_EC))


def _decode_experts_bwd(dtype, interpret, gate, res, dy_BTC):
  """The reference's gradient; none through ``unit_EC`` (the reference normalises the
  prototypes itself: their gradient goes to ``params``)."""
  del interpret
  res, unit_EC = res
  _, pullback = jax.vjp(functools.partial(_decode_experts_reference, dtype, gate), *res)
  *grads, d_prenorm = pullback(dy_BTC)
  return (*grads, jax.tree.map(jnp.zeros_like, unit_EC), d_prenorm)


decode_experts.defvjp(_decode_experts_fwd, _decode_experts_bwd)


# ----------------------------------------------------------------------------------------------
# Module
# ----------------------------------------------------------------------------------------------

# tau of the straight-through surrogate sigmoid((s - theta) / tau), shared by every gate.
ST_TEMPERATURE = 0.1


class DynMoE(nn.Module):
  """DynMoE feed-forward layer (Guo et al. 2024) with SDL; see the module docstring.

  ``__call__(x_BTC, valid_BT=None, *, decoding=False, norm=None) -> (y_BTC, aux)``: y in the
  compute dtype, aux as documented in :func:`route` (float32 scalars; ``tokens_per_expert`` is
  float32 [E]). With ``norm`` (the block's RMSNorm module) the call is the block's residual
  sublayer: ``y = x + DynMoE(norm(x))``.
  """
  num_experts: int
  expert_hidden: int
  combine: str = "mean"  # mean | softmax
  fallback_k: int = 1
  init_threshold: float = 0.0
  target_active: float = 0.25  # target fraction of experts active per token
  st_temperature: float = ST_TEMPERATURE
  # dense: one all-experts einsum, the definition. ragged / tiled: only the (token, expert)
  # pairs in use by real tokens, laid out by expert, through a grouped matmul (jax.lax.ragged_dot,
  # or a batched matmul per tile of `tile` rows); auto: resolve_impl. A sparse dispatch computes
  # a static number of pairs, `capacity` times the SDL target (pair_capacity); a call whose
  # pairs do not fit computes the dense result instead, so nothing is dropped (`experts`).
  # Same forward and same expert-weight gradients as dense. NOT the same training: the
  # straight-through gradient that an expert *inactive* for a token sends through its weight
  # w_te (0 in the forward pass) into the gate, and so into x, prototypes and thresholds, is
  # not computed, as that expert is not run (a call that falls back to dense computes it). The
  # gate then learns to switch an expert on only through the SDL sparsity term.
  impl: str = "auto"
  capacity: float = CAPACITY
  tile: int = TILE_ROWS
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _check(self) -> None:
    if self.num_experts < 1:
      raise ValueError(f"DynMoE num_experts={self.num_experts}: must be >= 1")
    if self.expert_hidden < 1:
      raise ValueError(f"DynMoE expert_hidden={self.expert_hidden}: must be >= 1")
    if self.combine not in COMBINE_MODES:
      raise ValueError(f"DynMoE combine={self.combine!r}: expected one of {COMBINE_MODES}")
    if not 1 <= self.fallback_k <= self.num_experts:
      raise ValueError(f"DynMoE fallback_k={self.fallback_k}: must be in "
                       f"[1, num_experts={self.num_experts}]")
    if not self.st_temperature > 0:
      raise ValueError(f"DynMoE st_temperature={self.st_temperature}: must be > 0")
    if self.impl not in IMPLS:
      raise ValueError(f"DynMoE impl={self.impl!r}: expected one of {IMPLS}")
    if not (math.isfinite(self.capacity) and self.capacity > 0):
      raise ValueError(f"DynMoE capacity={self.capacity}: must be a finite number > 0")
    if self.tile < 1:
      raise ValueError(f"DynMoE tile={self.tile}: must be >= 1")

  @nn.compact
  def __call__(self, x_BTC: Array, valid_BT: Array | None = None, *, decoding: bool = False,
               norm: nn.Module | None = None) -> tuple[Array, dict[str, Array]]:
    """``decoding``: a one-token decoding step (its experts may run as one kernel,
    :data:`DECODE_KERNEL`, which with ``moe_pallas.DEC_PRENORM``, off by default, also applies
    ``norm`` where its epsilon is ``layers.RMS_EPS`` and adds the residual)."""
    self._check()
    if x_BTC.ndim != 3:
      raise ValueError(f"DynMoE x: expected [B, T, C], got shape {x_BTC.shape}")
    if valid_BT is None:
      valid_BT = jnp.ones(x_BTC.shape[:2], bool)
    elif valid_BT.shape != x_BTC.shape[:2]:
      raise ValueError(f"DynMoE valid_BT: shape {valid_BT.shape} != x's [B, T] "
                       f"{x_BTC.shape[:2]}")
    residual_BTC = x_BTC
    if norm is not None:  # the routing's input (and the experts' but in the prenorm kernel)
      x_BTC = norm(x_BTC)
    d_model = x_BTC.shape[-1]
    params = {name: self.param(name, LEAF_INITS[name], self.num_experts, d_model,
                               self.expert_hidden, self.init_threshold, self.param_dtype)
              for name in EXPERT_LEAVES}
    weights_BTE, used_BTE, aux = route(
        x_BTC, params["prototypes"], params["thresholds"], valid_BT, combine=self.combine,
        fallback_k=self.fallback_k, target_active=self.target_active,
        st_temperature=self.st_temperature)
    self.sow("intermediates", "used_experts", used_BTE)
    B, T = x_BTC.shape[:2]
    if decoding and decode_kernel_applies(d_model, self.expert_hidden, self.dtype, B * T):
      interpret = nsa_pallas.use_interpret()
      gate, unit_EC = None, None
      if x_BTC.dtype == jnp.dtype(self.dtype) and moe_pallas.route_supported(
          num_experts=self.num_experts, d_model=d_model, expert_hidden=self.expert_hidden,
          itemsize=jnp.dtype(self.dtype).itemsize, interpret=interpret):
        # The kernel routes (the same weights; XLA's route above then only feeds aux and the
        # sown mask, which a decoding loop does not read).
        gate, weights_BTE = (self.combine, self.fallback_k, self.st_temperature), None
        unit_EC = decode_const(self, "unit_prototypes",
                               lambda: _normalise(params["prototypes"]))
      prenorm = moe_pallas.DEC_PRENORM
      if not isinstance(prenorm, bool):
        raise ValueError(f"moe_pallas.DEC_PRENORM must be True or False, got {prenorm!r}")
      if (norm is not None and prenorm and norm.eps == RMS_EPS
          and residual_BTC.dtype == jnp.dtype(self.dtype)):
        return decode_experts(self.dtype, interpret, gate, residual_BTC, weights_BTE, params,
                              unit_EC, norm.variables["params"]["scale"]), aux
      y_BTC = decode_experts(self.dtype, interpret, gate, x_BTC, weights_BTE, params, unit_EC)
      return (y_BTC if norm is None else residual_BTC + y_BTC), aux
    capacity = pair_capacity(B * T, self.num_experts, self.target_active, self.capacity,
                             self.tile)
    y_BTC = experts(x_BTC, weights_BTE, used_BTE, params, self.dtype, self.impl, self.tile,
                    capacity=capacity, valid_BT=valid_BT)
    return (y_BTC if norm is None else residual_BTC + y_BTC), aux
