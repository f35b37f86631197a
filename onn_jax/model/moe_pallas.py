"""DynMoE's one-token decoding step as one Pallas kernel (Triton on a GPU).

A decoding step of the arc1 model is bound by its kernel launches (issue #16's rollout goal;
``python -m train.kernel_count``), and XLA runs a DynMoE layer at one token a row as about nine:
the input's normalisation, the gate's similarity product, the threshold/fallback/combination
reductions, the hidden product, the gelu, the output product (with a split-K reduction) and
the output bias mix. :func:`decode_experts` computes the same layer, routing included, in one
kernel plus the sum of its partial outputs:

* a program per (tile of rows, expert e, tile of ``DEC_TILE_F`` hidden units) recomputes the
  gate of its rows (normalised cosine similarity to every prototype in float32, summed row
  by row, one prototype at a time: :func:`_route_weights`; threshold, arg-max fallback,
  ``mean`` / ``softmax`` combination: :func:`onn_jax.model.moe.route`'s
  forward pass), takes expert e's weight w_e, and adds ``w_e * gelu(x W_in[e, :, tile] +
  b_in) W_out[e, tile, :]`` (plus ``w_e b_out[e]`` in the first tile) as one float32 partial;
* XLA sums the E * F / DEC_TILE_F partials of each row (one reduction).

The routing is tiny (rows x d_model x E products); recomputing it per program was meant to
cost less than a launch, but as Triton's exact float32 matrix product it cost most of the
kernel (below). Fewer than 16 experts are padded to 16 routing columns that no row uses.

Numerics follow :func:`onn_jax.model.moe.experts_dense`: products in the compute dtype with
float32 accumulation, the hidden product and the bias sum rounded to the compute dtype, gelu in
float32, the gated activations rounded before the output product. Two differences: Triton has
no erf, so gelu uses :func:`_erf` (absolute error below 1.5e-7, float32 rounding), and the
partial outputs are summed in float32 before the one rounding. The similarity's summation
order differs from XLA's, so a token whose margin ``s - theta`` is within float32 rounding of 0
may switch an expert the other way (as a TF32 product would flip far more).

Measured slower than XLA's launches (H200, jax 0.11.2, 2026-12-05, arc1 rollout of 32 rows:
45.7k tokens/s with it against 62.8k without, ~32 us a layer more; docs/benchmarks.md), so
``moe.DECODE_KERNEL`` keeps it off. Why (H100, jax 0.11.2, 2026-12-05, session 22: one arc1
layer, 32 rows, 32 dependent calls a program;
``docs/bench/moe_decode_kernel_variants_h100_2026-12-05.json``): XLA's layer 29.7 us a call,
the kernel 62.7 us with its routing as Triton's exact float32 product, 17.6 us with the
routing left out (a timing stub), 21.8 us given XLA's routing weights. The routing is now
summed elementwise (:func:`_route_weights`), and still slower (H100, 2026-12-06, session 30:
the arc1 rollout of 32 rows x 512 tokens 254.8 ms with the decoding set
``fused_xla_block_moe`` against 204.2 with the default's XLA layers, 0.80x;
``python -m train.bench --only decode --lens 2048 --sets fused_xla_block_moe``,
``docs/bench/decode_moe_kernel_routing_h100_2026-12-06.json``): ~16 us a layer more.

Fallback to the top-1 expert only (``fallback_k = 1``, every shipped config); d_model and
expert_hidden powers of two of at least 16, tiles within :data:`DEC_TILE_BYTES`
(:func:`decode_supported`). Off GPU the kernel runs in Pallas interpret mode (tests). The
kernel routes every row as valid (a decoding step's rows are).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from onn_jax.model.nsa_pallas import _F32, _compiler_params, _is_pow2, _mm, _pow2_at_least

# Hidden units per program: each program reads [d_model, DEC_TILE_F] and [DEC_TILE_F, d_model]
# of its expert's weights (64 KiB at arc1's d_model 256 in bf16), so arc1's 16 experts x 512
# hidden units are 128 programs a tile of rows.
DEC_TILE_F = 64
# Rows per program (the batch padded to a power of two of at least 16, at most this).
DEC_ROWS = 64
# The routing product's minimum width (tensor-core tile): fewer experts are padded to it.
_MIN_TILE = 16
DEC_NUM_WARPS = 4

# Abramowitz & Stegun 7.1.26: erf(x) = 1 - t (a1 + t (a2 + ...)) exp(-x^2), t = 1 / (1 + p x),
# for x >= 0, |error| <= 1.5e-7.
_ERF_P = 0.3275911
_ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def _erf(x):
  """erf in float32 from exp and a rational polynomial (Triton has no erf)."""
  ax = jnp.abs(x)
  t = 1.0 / (1.0 + _ERF_P * ax)
  poly = _ERF_A[4]
  for a in _ERF_A[3::-1]:
    poly = a + t * poly
  y = 1.0 - t * poly * jnp.exp(-ax * ax)
  return jnp.where(x < 0, -y, y)


def gelu(u):
  """Exact-form gelu ``u Phi(u)`` of float32 ``u`` with :func:`_erf`."""
  return 0.5 * u * (1.0 + _erf(u * (1.0 / math.sqrt(2.0))))


# What a program's tiles may take (Triton stages its product operands in shared memory, 227 KiB
# a block on an H100 / H200): the weight tiles, the rows and the prototypes. Larger layers get
# fewer hidden units and rows a program, down to 16 each, then no kernel (d_model 1024 in bf16
# asked for 448 KiB at the full tiles and did not compile).
DEC_TILE_BYTES = 160 * 1024


def _program_bytes(d_model: int, num_experts: int, tile_f: int, rows: int, itemsize: int) -> int:
  width = max(_pow2_at_least(num_experts), _MIN_TILE)
  return (2 * d_model * tile_f + rows * d_model) * itemsize + width * d_model * 4


def _tiles(d_model: int, num_experts: int, expert_hidden: int, itemsize: int
           ) -> tuple[int, int] | None:
  """(hidden units, most rows) a program: the largest within DEC_TILE_BYTES, or None."""
  tile_f, rows = min(expert_hidden, DEC_TILE_F), DEC_ROWS
  while _program_bytes(d_model, num_experts, tile_f, rows, itemsize) > DEC_TILE_BYTES:
    if tile_f == rows == _MIN_TILE:
      return None
    if tile_f >= rows and tile_f > _MIN_TILE:
      tile_f //= 2
    else:
      rows //= 2
  return tile_f, rows


def decode_supported(*, d_model: int, expert_hidden: int, fallback_k: int, num_experts: int,
                     itemsize: int) -> bool:
  """Whether :func:`decode_experts` serves this layer (``itemsize``: the compute dtype's bytes):
  Triton tiles are powers of two, and a program's within :data:`DEC_TILE_BYTES`."""
  return (fallback_k == 1 and _is_pow2(d_model) and _is_pow2(expert_hidden)
          and min(d_model, expert_hidden) >= _MIN_TILE
          and _tiles(d_model, num_experts, expert_hidden, itemsize) is not None)


def _route_weights(x_PC, p_ref, th_E, *, num_experts: int, combine: str, eps: float):
  """Forward pass of ``moe.route``'s combination weights for a tile of rows: [P, W] float32
  (``p_ref``: the [W, C] prototypes, W a power of two; columns from ``num_experts`` on are
  padding, weight 0).

  The cosine similarities are float32 products summed over C row by row, one prototype at a
  time, not Triton's exact float32 matrix product, which cost most of the kernel's time (the
  module docstring)."""
  x32 = x_PC.astype(_F32)
  xn_PC = x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=1, keepdims=True) + eps)
  width = p_ref.shape[0]
  col_PE = jax.lax.broadcasted_iota(jnp.int32, (x_PC.shape[0], width), 1)
  s_PE = jnp.zeros((x_PC.shape[0], width), _F32)
  for e in range(num_experts):
    p_C = p_ref[e, :].astype(_F32)
    pn_C = p_C * jax.lax.rsqrt(jnp.sum(p_C * p_C) + eps)
    s_PE = jnp.where(col_PE == e, jnp.sum(xn_PC * pn_C[None, :], axis=1, keepdims=True), s_PE)
  real_PE = col_PE < num_experts
  margin_PE = s_PE - th_E[None, :]
  hard_PE = (margin_PE > 0) & real_PE
  none_P1 = jnp.sum(hard_PE.astype(_F32), axis=1, keepdims=True) == 0
  # The fallback: the most similar expert, ties to the lower index (moe.fallback_experts).
  best_P1 = jnp.max(jnp.where(real_PE, s_PE, -jnp.inf), axis=1, keepdims=True)
  first_P1 = jnp.min(jnp.where(real_PE & (s_PE == best_P1), col_PE, s_PE.shape[1]), axis=1,
                     keepdims=True)
  used_PE = jnp.where(none_P1, col_PE == first_P1, hard_PE)
  used32_PE = used_PE.astype(_F32)
  if combine == "mean":
    return used32_PE / jnp.sum(used32_PE, axis=1, keepdims=True)
  top_P1 = jnp.max(jnp.where(used_PE, margin_PE, -jnp.inf), axis=1, keepdims=True)
  z_PE = margin_PE - top_P1
  z_PE = jnp.where(used_PE, z_PE, jnp.minimum(z_PE, 0.0))
  e_PE = used32_PE * jnp.exp(z_PE)
  return e_PE / jnp.sum(e_PE, axis=1, keepdims=True)


def _decode_kernel(x_ref, p_ref, th_ref, w_in_ref, b_in_ref, w_out_ref, b_out_ref, y_ref, *,
                   num_experts: int, combine: str, eps: float):
  e, j = pl.program_id(1), pl.program_id(2)
  x_PC = x_ref[...]
  dt = x_PC.dtype
  w_PE = _route_weights(x_PC, p_ref, th_ref[...], num_experts=num_experts,
                        combine=combine, eps=eps)
  col_PE = jax.lax.broadcasted_iota(jnp.int32, w_PE.shape, 1)
  # experts_dense rounds the weights to the compute dtype.
  w_P1 = jnp.sum(jnp.where(col_PE == e, w_PE, 0.0), axis=1, keepdims=True).astype(dt).astype(_F32)
  h_PF = _mm(x_PC, w_in_ref[0]).astype(dt)
  u_PF = (h_PF.astype(_F32) + b_in_ref[0].astype(_F32)[None, :]).astype(dt).astype(_F32)
  a_PF = (gelu(u_PF) * w_P1).astype(dt)
  y_PC = _mm(a_PF, w_out_ref[0])
  bias_PC = jnp.where(j == 0, w_P1 * b_out_ref[0].astype(_F32)[None, :], 0.0)
  y_ref[0] = y_PC + bias_PC


def decode_partials(x_BC, prototypes_EC, thresholds_E, w_in_ECF, b_in_EF, w_out_EFC, b_out_EC,
                    *, combine: str, eps: float, interpret: bool) -> jax.Array:
  """The kernel's float32 partial outputs [E * F / tile_f, B, C] (:func:`_tiles`; their sum
  over axis 0 is the layer's output). Weights in the compute dtype (x's); gate parameters in float32."""
  B, C = x_BC.shape
  E, _, F = w_in_ECF.shape
  tile_f, most_rows = _tiles(C, E, F, x_BC.dtype.itemsize)
  rows = min(_pow2_at_least(max(B, _MIN_TILE)), most_rows)
  padded_b = -(-B // rows) * rows
  width = max(_pow2_at_least(E), _MIN_TILE)
  x_PC = jnp.pad(x_BC, ((0, padded_b - B), (0, 0)))
  p_WC = jnp.pad(prototypes_EC.astype(_F32), ((0, width - E), (0, 0)))
  th_W = jnp.pad(thresholds_E.astype(_F32), (0, width - E))
  num_f = F // tile_f
  kernel = functools.partial(_decode_kernel, num_experts=E, combine=combine, eps=eps)
  parts = pl.pallas_call(
      kernel,
      grid=(padded_b // rows, E, num_f),
      in_specs=[
          pl.BlockSpec((rows, C), lambda i, e, j: (i, 0)),
          pl.BlockSpec((width, C), lambda i, e, j: (0, 0)),
          pl.BlockSpec((width,), lambda i, e, j: (0,)),
          pl.BlockSpec((1, C, tile_f), lambda i, e, j: (e, 0, j)),
          pl.BlockSpec((1, tile_f), lambda i, e, j: (e, j)),
          pl.BlockSpec((1, tile_f, C), lambda i, e, j: (e, j, 0)),
          pl.BlockSpec((1, C), lambda i, e, j: (e, 0)),
      ],
      out_specs=pl.BlockSpec((1, rows, C), lambda i, e, j: (e * num_f + j, i, 0)),
      out_shape=jax.ShapeDtypeStruct((E * num_f, padded_b, C), _F32),
      interpret=interpret, compiler_params=_compiler_params(interpret, DEC_NUM_WARPS),
  )(x_PC, p_WC, th_W, w_in_ECF, b_in_EF, w_out_EFC, b_out_EC)
  return parts[:, :B]
