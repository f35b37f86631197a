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

Every parameter of the module carries a leading expert axis E, so that expert reset can
re-initialise row e of every leaf with rows drawn by :func:`init_expert_params`.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

# Leaf names of one DynMoE layer, in the order init_expert_params splits its rng.
EXPERT_LEAVES: tuple[str, ...] = ("prototypes", "thresholds", "w_in", "b_in", "w_out", "b_out")
COMBINE_MODES: tuple[str, ...] = ("mean", "softmax")
IMPLS: tuple[str, ...] = ("dense", "ragged", "tiled")
TILE_ROWS: int = 128  # rows per tile of the tiled sparse dispatch
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
  num_experts = prototypes_EC.shape[0]
  s_BTE = cosine_similarity(x_BTC, prototypes_EC)
  margin_BTE = s_BTE - thresholds_E.astype(jnp.float32)
  hard_BTE = (margin_BTE > 0).astype(jnp.float32)
  soft_BTE = jax.nn.sigmoid(margin_BTE / st_temperature)
  # (soft - sg(soft)) is exactly 0 in the forward pass, so st equals hard bit for bit.
  st_BTE = hard_BTE + (soft_BTE - jax.lax.stop_gradient(soft_BTE))

  fallback_BT = jnp.sum(hard_BTE, axis=-1) == 0
  _, top_BTK = jax.lax.top_k(jax.lax.stop_gradient(s_BTE), fallback_k)
  top_BTE = jnp.sum(jax.nn.one_hot(top_BTK, num_experts, dtype=jnp.float32), axis=-2)
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


def experts_dense(x_BTC: Array, weights_BTE: Array, params: dict[str, Array], dtype: Any
                  ) -> Array:
  """``y_t = sum_e w_te (gelu(x_t W_in_e + b_in_e) W_out_e + b_out_e)``, every expert computed.

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


# ----------------------------------------------------------------------------------------------
# Sparse token-to-expert dispatch (impl="ragged" / "tiled")
# ----------------------------------------------------------------------------------------------

def sort_pairs_by_expert(used_TE: jax.Array, capacity: int
                         ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The (token, expert) pairs of a routing mask, sorted by expert then token.

  Args:
    used_TE: bool/0-1 [T, E], the experts each token uses.
    capacity: static number of pair slots P. Pairs beyond it (highest experts first) are
      dropped; empty slots come last.
  Returns:
    token_P, expert_P int32 [P] (empty slots: token 0, expert E-1), valid_P bool [P], and
    group_sizes_E int32 [E], the pairs of each expert kept (summing to ``valid_P.sum()``).
  """
  T, E = used_TE.shape
  sentinel = E * T
  key_TE = jnp.where(used_TE > 0, jnp.arange(E)[None, :] * T + jnp.arange(T)[:, None], sentinel)
  key_P = jnp.sort(key_TE.reshape(-1))[:min(capacity, T * E)]
  if capacity > T * E:
    key_P = jnp.pad(key_P, (0, capacity - T * E), constant_values=sentinel)
  valid_P = key_P < sentinel
  expert_P = jnp.where(valid_P, key_P // T, E - 1).astype(jnp.int32)
  token_P = jnp.where(valid_P, key_P % T, 0).astype(jnp.int32)
  group_sizes_E = jnp.zeros(E, jnp.int32).at[expert_P].add(valid_P.astype(jnp.int32))
  return token_P, expert_P, valid_P, group_sizes_E


def moe_sparse_ragged(x_TC: jax.Array, weights_TE: jax.Array, used_TE: jax.Array,
                      params: dict[str, jax.Array], dtype: Any, capacity: int,
                      precision: Any = None) -> jax.Array:
  """``sum_e w_te Expert_e(x_t)`` over the used experts only, with ``jax.lax.ragged_dot``.

  Pairs sorted by expert form contiguous groups, so each expert's rows are one block of a
  grouped matmul. Same result as :func:`experts_dense` when no pair exceeds ``capacity``.
  Returns y_TC in ``dtype``.
  """
  T, C = x_TC.shape
  token_P, expert_P, valid_P, sizes_E = sort_pairs_by_expert(used_TE, capacity)
  w_P1 = jnp.where(valid_P, weights_TE[token_P, expert_P], 0.0).astype(dtype)[:, None]
  x_PC = x_TC.astype(dtype)[token_P]
  h_PF = jax.lax.ragged_dot(x_PC, params["w_in"].astype(dtype), sizes_E, precision=precision)
  h_PF = jax.nn.gelu(h_PF + params["b_in"].astype(dtype)[expert_P], approximate=False)
  y_PC = jax.lax.ragged_dot(h_PF * w_P1, params["w_out"].astype(dtype), sizes_E,
                            precision=precision)
  y_PC = y_PC + w_P1 * params["b_out"].astype(dtype)[expert_P]
  # Accumulate a token's experts in float32, as the dense einsum does inside its contraction.
  y_TC = jnp.zeros((T, C), jnp.float32).at[token_P].add(y_PC.astype(jnp.float32))
  return y_TC.astype(dtype)


def moe_sparse_tiled(x_TC: jax.Array, weights_TE: jax.Array, used_TE: jax.Array,
                     params: dict[str, jax.Array], dtype: Any, capacity: int, tile: int,
                     precision: Any = None) -> jax.Array:
  """The same mixture as :func:`moe_sparse_ragged` by gather, batched matmul and scatter.

  Each expert's pairs are padded to a multiple of ``tile`` rows, so every tile of rows belongs
  to one expert: tile n gathers its expert's weights and runs one [tile, C] x [C, F] matmul.
  ``ceil(P / tile) + E`` tiles always suffice. Returns y_TC in ``dtype``.
  """
  T, C = x_TC.shape
  token_P, expert_P, valid_P, sizes_E = sort_pairs_by_expert(used_TE, capacity)
  E = sizes_E.shape[0]
  num_tiles = -(-capacity // tile) + E
  slots = num_tiles * tile
  padded_E = (sizes_E + tile - 1) // tile * tile
  padded_end_E = jnp.cumsum(padded_E)
  rank_P = jnp.arange(capacity) - (jnp.cumsum(sizes_E) - sizes_E)[expert_P]
  slot_P = jnp.where(valid_P, (padded_end_E - padded_E)[expert_P] + rank_P, slots)
  token_S = jnp.zeros(slots, jnp.int32).at[slot_P].set(token_P, mode="drop")
  w_P = jnp.where(valid_P, weights_TE[token_P, expert_P], 0.0).astype(dtype)
  w_NL1 = jnp.zeros(slots, dtype).at[slot_P].set(w_P, mode="drop").reshape(num_tiles, tile, 1)
  expert_N = jnp.minimum(
      jnp.searchsorted(padded_end_E, jnp.arange(num_tiles) * tile, side="right"), E - 1)
  x_NLC = x_TC.astype(dtype)[token_S].reshape(num_tiles, tile, C)
  w_in_NCF = params["w_in"].astype(dtype)[expert_N]
  h_NLF = jnp.einsum("nlc,ncf->nlf", x_NLC, w_in_NCF, precision=precision)
  h_NLF = jax.nn.gelu(h_NLF + params["b_in"].astype(dtype)[expert_N][:, None], approximate=False)
  y_NLC = jnp.einsum("nlf,nfc->nlc", h_NLF * w_NL1, params["w_out"].astype(dtype)[expert_N],
                     precision=precision)
  y_NLC = y_NLC + w_NL1 * params["b_out"].astype(dtype)[expert_N][:, None]
  y_TC = jnp.zeros((T, C), jnp.float32).at[token_S].add(
      y_NLC.reshape(slots, C).astype(jnp.float32))
  return y_TC.astype(dtype)


def experts(x_BTC: Array, weights_BTE: Array, used_BTE: Array, params: dict[str, Array],
            dtype: Any, impl: str = "dense", tile: int = TILE_ROWS) -> Array:
  """The expert mixture by ``impl``: :func:`experts_dense`, or a sparse dispatch over the
  ``used_BTE`` pairs with capacity ``B*T*E`` (exact). Returns y_BTC in ``dtype``."""
  if impl == "dense":
    return experts_dense(x_BTC, weights_BTE, params, dtype)
  B, T, C = x_BTC.shape
  E = weights_BTE.shape[-1]
  args = (x_BTC.reshape(B * T, C), weights_BTE.reshape(B * T, E), used_BTE.reshape(B * T, E),
          params, dtype, B * T * E)
  if impl == "ragged":
    y_NC = moe_sparse_ragged(*args)
  elif impl == "tiled":
    y_NC = moe_sparse_tiled(*args, tile=tile)
  else:
    raise ValueError(f"DynMoE impl={impl!r}: expected one of {IMPLS}")
  return y_NC.reshape(B, T, C)


# ----------------------------------------------------------------------------------------------
# Module
# ----------------------------------------------------------------------------------------------

# tau of the straight-through surrogate sigmoid((s - theta) / tau), shared by every gate.
ST_TEMPERATURE = 0.1


class DynMoE(nn.Module):
  """DynMoE feed-forward layer (Guo et al. 2024) with SDL; see the module docstring.

  ``__call__(x_BTC, valid_BT=None) -> (y_BTC, aux)``: y in the compute dtype, aux as documented in
  :func:`route` (float32 scalars; ``tokens_per_expert`` is float32 [E]).
  """
  num_experts: int
  expert_hidden: int
  combine: str = "mean"  # mean | softmax
  fallback_k: int = 1
  init_threshold: float = 0.0
  target_active: float = 0.25  # target fraction of experts active per token
  st_temperature: float = ST_TEMPERATURE
  # dense: one all-experts einsum. ragged / tiled: only the (token, expert) pairs in use, sorted
  # by expert (jax.lax.ragged_dot, or gather + per-tile matmul + scatter). A token may activate
  # any number of experts, so the static pair capacity is T * E: nothing is ever dropped.
  # Same forward and same expert-weight gradients as dense. NOT the same training: the
  # straight-through gradient that an expert *inactive* for a token sends through its weight
  # w_te (0 in the forward pass) into the gate, and so into x, prototypes and thresholds, is
  # not computed, as that expert is not run. The gate then learns to switch an expert on only
  # through the SDL sparsity term.
  impl: str = "dense"
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

  @nn.compact
  def __call__(self, x_BTC: Array, valid_BT: Array | None = None
               ) -> tuple[Array, dict[str, Array]]:
    self._check()
    if x_BTC.ndim != 3:
      raise ValueError(f"DynMoE x: expected [B, T, C], got shape {x_BTC.shape}")
    if valid_BT is None:
      valid_BT = jnp.ones(x_BTC.shape[:2], bool)
    elif valid_BT.shape != x_BTC.shape[:2]:
      raise ValueError(f"DynMoE valid_BT: shape {valid_BT.shape} != x's [B, T] "
                       f"{x_BTC.shape[:2]}")
    d_model = x_BTC.shape[-1]
    params = {name: self.param(name, LEAF_INITS[name], self.num_experts, d_model,
                               self.expert_hidden, self.init_threshold, self.param_dtype)
              for name in EXPERT_LEAVES}
    weights_BTE, used_BTE, aux = route(
        x_BTC, params["prototypes"], params["thresholds"], valid_BT, combine=self.combine,
        fallback_k=self.fallback_k, target_active=self.target_active,
        st_temperature=self.st_temperature)
    self.sow("intermediates", "used_experts", used_BTE)
    y_BTC = experts(x_BTC, weights_BTE, used_BTE, params, self.dtype, self.impl, self.tile)
    return y_BTC, aux
