"""DynMoE's one-token decoding step: its experts as one Pallas kernel (Triton on a GPU).

A decoding step of the arc1 model is bound by its kernel launches (issue #16's rollout goal;
``python -m train.kernel_count``), and XLA runs a DynMoE layer at one token a row as about ten:
the input's normalisation, the gate's similarity product, the routing's reductions, the
weights' normalisation, the hidden product, the gelu, the output product (with a split-K
reduction) and the output bias mix. :func:`decode_partials` computes the experts, given the
gate's combination weights (XLA's :func:`onn_jax.model.moe.route`, the same numbers as the
layer's), in one kernel plus the sum of its partial outputs:

* a program per (tile of rows, expert e, tile of ``DEC_TILE_F`` hidden units) takes expert e's
  weight w_e of its rows and adds ``w_e * gelu(x W_in[e, :, tile] + b_in) W_out[e, tile, :]``
  (plus ``w_e b_out[e]`` in the first tile) as one float32 partial;
* XLA sums the E * F / DEC_TILE_F partials of each row (one reduction).

Numerics follow :func:`onn_jax.model.moe.experts_dense`: products in the compute dtype with
float32 accumulation, the weights, the hidden product and the bias sum rounded to the compute
dtype, gelu in float32, the gated activations rounded before the output product. Two
differences: Triton has no erf, so gelu uses :func:`_erf` (absolute error below 1.5e-7, float32
rounding), and the partial outputs are summed in float32 before the one rounding.

The routing was in the kernel until session 36 (each program recomputed its rows' gate), and
that made it slower than XLA's launches: H100, jax 0.11.2, session 22, one arc1 layer of 32
rows, 32 dependent calls a program (``docs/bench/moe_decode_kernel_variants_h100_2026-12-05.json``):
XLA's layer 29.7 us a call, the kernel 62.7 us with its routing as Triton's exact float32
product, **21.8 us given XLA's routing weights**; with the routing summed elementwise the arc1
rollout was still 0.80x the default's (session 30). So the routing is XLA's now.

d_model and expert_hidden powers of two of at least 16, tiles within :data:`DEC_TILE_BYTES`
(:func:`decode_supported`); any ``fallback_k`` (the routing is XLA's). Off GPU the kernel runs
in Pallas interpret mode (tests).
"""

from __future__ import annotations

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
# The smallest tile of a product (a tensor-core tile's rows): fewer rows are padded to it.
_MIN_TILE = 16
DEC_MOE_NUM_WARPS = 4

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
# a block on an H100 / H200): the weight tiles and the rows. Larger layers get
# fewer hidden units and rows a program, down to 16 each, then no kernel (d_model 1024 in bf16
# asked for 448 KiB at the full tiles and did not compile).
DEC_TILE_BYTES = 160 * 1024


def _program_bytes(d_model: int, tile_f: int, rows: int, itemsize: int) -> int:
  return (2 * d_model * tile_f + rows * d_model) * itemsize


def _tiles(d_model: int, expert_hidden: int, itemsize: int) -> tuple[int, int] | None:
  """(hidden units, most rows) a program: the largest within DEC_TILE_BYTES, or None."""
  tile_f, rows = min(expert_hidden, DEC_TILE_F), DEC_ROWS
  while _program_bytes(d_model, tile_f, rows, itemsize) > DEC_TILE_BYTES:
    if tile_f == rows == _MIN_TILE:
      return None
    if tile_f >= rows and tile_f > _MIN_TILE:
      tile_f //= 2
    else:
      rows //= 2
  return tile_f, rows


def decode_supported(*, d_model: int, expert_hidden: int, itemsize: int) -> bool:
  """Whether :func:`decode_partials` serves this layer (``itemsize``: the compute dtype's
  bytes): Triton tiles are powers of two, and a program's within :data:`DEC_TILE_BYTES`."""
  return (_is_pow2(d_model) and _is_pow2(expert_hidden)
          and min(d_model, expert_hidden) >= _MIN_TILE
          and _tiles(d_model, expert_hidden, itemsize) is not None)


def _decode_kernel(x_ref, w_ref, w_in_ref, b_in_ref, w_out_ref, b_out_ref, y_ref):
  j = pl.program_id(2)
  x_PC = x_ref[...]
  dt = x_PC.dtype
  # Expert e's weight of each row, rounded to the compute dtype as experts_dense rounds it.
  w_P1 = w_ref[0].astype(dt).astype(_F32)[:, None]
  h_PF = _mm(x_PC, w_in_ref[0]).astype(dt)
  u_PF = (h_PF.astype(_F32) + b_in_ref[0].astype(_F32)[None, :]).astype(dt).astype(_F32)
  a_PF = (gelu(u_PF) * w_P1).astype(dt)
  y_PC = _mm(a_PF, w_out_ref[0])
  bias_PC = jnp.where(j == 0, w_P1 * b_out_ref[0].astype(_F32)[None, :], 0.0)
  y_ref[0] = y_PC + bias_PC


def decode_partials(x_BC, weights_BE, w_in_ECF, b_in_EF, w_out_EFC, b_out_EC, *,
                    interpret: bool) -> jax.Array:
  """The kernel's float32 partial outputs [E * F / tile_f, B, C] (:func:`_tiles`; their sum
  over axis 0 is the layer's output) for rows ``x_BC`` and their combination weights
  ``weights_BE`` (the gate's float32 ones: zero for an expert a row does not use). Everything
  else in the compute dtype (x's)."""
  B, C = x_BC.shape
  E, _, F = w_in_ECF.shape
  tile_f, most_rows = _tiles(C, F, x_BC.dtype.itemsize)
  rows = min(_pow2_at_least(max(B, _MIN_TILE)), most_rows)
  padded_b = -(-B // rows) * rows
  x_PC = jnp.pad(x_BC, ((0, padded_b - B), (0, 0)))
  w_EP = jnp.pad(weights_BE.astype(_F32), ((0, padded_b - B), (0, 0))).T
  num_f = F // tile_f
  parts = pl.pallas_call(
      _decode_kernel,
      grid=(padded_b // rows, E, num_f),
      in_specs=[
          pl.BlockSpec((rows, C), lambda i, e, j: (i, 0)),
          pl.BlockSpec((1, rows), lambda i, e, j: (e, i)),
          pl.BlockSpec((1, C, tile_f), lambda i, e, j: (e, 0, j)),
          pl.BlockSpec((1, tile_f), lambda i, e, j: (e, j)),
          pl.BlockSpec((1, tile_f, C), lambda i, e, j: (e, j, 0)),
          pl.BlockSpec((1, C), lambda i, e, j: (e, 0)),
      ],
      out_specs=pl.BlockSpec((1, rows, C), lambda i, e, j: (e * num_f + j, i, 0)),
      out_shape=jax.ShapeDtypeStruct((E * num_f, padded_b, C), _F32),
      interpret=interpret, compiler_params=_compiler_params(interpret, DEC_MOE_NUM_WARPS),
  )(x_PC, w_EP, w_in_ECF, b_in_EF, w_out_EFC, b_out_EC)
  return parts[:, :B]
