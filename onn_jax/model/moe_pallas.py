"""DynMoE's one-token decoding step: its experts as one Pallas kernel (Triton on a GPU).

A decoding step of the arc1 model is bound by its kernel launches (issue #16's rollout goal;
``python -m train.kernel_count``), and XLA runs a DynMoE layer at one token a row as about ten:
the input's normalisation, the gate's similarity product, the routing's reductions, the
weights' normalisation, the hidden product, the gelu, the output product (with a split-K
reduction) and the output bias mix. :func:`decode_partials` computes the layer in one kernel
plus the sum of its partial outputs:

* a program per (tile of rows, expert e, tile of ``DEC_TILE_F`` hidden units) routes its rows
  (:func:`_gate_weights`: the gate's weights from the unit-norm prototypes, which XLA
  normalises, and the thresholds; ``DECODE_ROUTE``) or takes their weights from XLA's
  :func:`onn_jax.model.moe.route`, then adds ``w_e * gelu(x W_in[e, :, tile] + b_in)
  W_out[e, tile, :]`` (plus ``w_e b_out[e]`` in the first tile) as one float32 partial;
* XLA sums the E * F / DEC_TILE_F partials of each row (one reduction).

Given the block's RMSNorm gains (``prenorm_C``; DEC_PRENORM), the kernel computes the
block's whole residual sublayer ``x + DynMoE(rms_norm(x))``: every program normalises its rows
(``layers.rms_norm``, as XLA does) and the first program of a tile of rows adds them to its
partial, so that XLA's one sum is the block's output, rounded once (XLA's norm and its add of
the residual were a launch each, a layer).

Numerics follow :func:`onn_jax.model.moe.experts_dense`: products in the compute dtype with
float32 accumulation, the weights, the hidden product and the bias sum rounded to the compute
dtype, gelu in float32, the gated activations rounded before the output product. Differences:
Triton has no erf, so gelu uses :func:`_erf` (absolute error below 1.5e-7, float32 rounding);
the partial outputs are summed in float32 before the one rounding; the kernel's similarities
(three bfloat16 parts of each operand on tensor cores) are within float32 rounding of XLA's
exact float32 product, so only a margin within that rounding of its threshold (or two
similarities that close, for the fallback) can route differently.

The routing's history: in the kernel as Triton's exact float32 product until session 36,
slower than XLA's launches (H100, jax 0.11.2, session 22, one arc1 layer of 32 rows, 32
dependent calls a program, ``docs/bench/moe_decode_kernel_variants_h100_2026-12-05.json``:
XLA's layer 29.7 us a call, the kernel 62.7 us routing in exact float32 on CUDA cores, 21.8 us
given XLA's weights; summed elementwise, the arc1 rollout 0.80x, session 30); XLA's in session
36; in the kernel again with ``DECODE_ROUTE`` since session 37, on tensor cores, on by default
since session 39 (docs/benchmarks.md, sessions 37-39).

d_model and expert_hidden powers of two of at least 16, tiles within :data:`DEC_TILE_BYTES`
(:func:`decode_supported`); any ``fallback_k``; routing in the kernel needs E a power of two
of at least 16 on a GPU (:func:`route_supported`). Off GPU the kernel runs in Pallas
interpret mode (tests).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from onn_jax.model.layers import rms_norm
from onn_jax.model.nsa_pallas import (_F32, _MIN_TILE, _compiler_params, _is_pow2, _mm,
                                      _pow2_at_least, bf16_parts)

# Hidden units per program: each program reads [d_model, DEC_TILE_F] and [DEC_TILE_F, d_model]
# of its expert's weights (64 KiB at arc1's d_model 256 in bf16), so arc1's 16 experts x 512
# hidden units are 128 programs a tile of rows. H100, session 41, the arc1 rollout (routing in
# the kernel, 32 rows x 512 tokens): 128 hidden units a program 176.1 ms a rollout against
# 163.7 (variant moe_tile128); session 45, one process: 32 units 165.2 / 164.1 ms against 157.4
# / 157.2, 16 units 204.5 (variants moe_tile32, moe_tile16).
DEC_TILE_F = 64
# Rows per program (the batch padded to a power of two of at least 16, at most this).
DEC_ROWS = 64
# Warps of a program; 8: 165.2 ms a rollout against 163.7 (H100, session 41, moe_warps8).
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


def _gate_weights(x_PC, p_EC, thr_E, *, eps: float, combine: str, fallback_k: int):
  """The DynMoE gate's float32 combination weights [P, E] of rows ``x_PC`` given unit-norm
  prototypes ``p_EC`` (float32) and thresholds: ``moe.gate_weights``' forward values (its
  straight-through terms are 0 there)."""
  x_PC = x_PC.astype(_F32)
  x_PC = x_PC * jax.lax.rsqrt(jnp.sum(x_PC * x_PC, axis=1) + eps)[:, None]
  # The similarities within float32 rounding of the exact ones: three bfloat16 parts of each
  # operand on tensor cores, the six products above float32's last bits (Triton's exact
  # float32 product runs on CUDA cores: tens of microseconds, see the module docstring).
  x3, p3 = bf16_parts(x_PC), bf16_parts(p_EC)
  s_PE = sum(_mm(x3[i], p3[j], trans_b=True) for i in range(3) for j in range(3) if i + j <= 2)
  E = s_PE.shape[1]
  margin_PE = s_PE - thr_E.astype(_F32)[None, :]
  hard_PE = margin_PE > 0
  fallback_P = jnp.sum(hard_PE.astype(_F32), axis=1) == 0
  # The fallback's k most similar experts, ties to the lower index (moe.fallback_experts).
  e_PE = jax.lax.broadcasted_iota(jnp.int32, s_PE.shape, 1)
  top_PE, rest_PE = jnp.zeros(s_PE.shape, jnp.bool_), s_PE
  for _ in range(fallback_k):
    best_P = jnp.max(rest_PE, axis=1)
    first_P = jnp.min(jnp.where(rest_PE == best_P[:, None], e_PE, E), axis=1)
    pick_PE = e_PE == first_P[:, None]
    top_PE, rest_PE = top_PE | pick_PE, jnp.where(pick_PE, -jnp.inf, rest_PE)
  used_PE = jnp.where(fallback_P[:, None], top_PE, hard_PE)
  e_w_PE = used_PE.astype(_F32)
  if combine == "softmax":  # over the used experts' margins (moe.gate_weights)
    top_P = jnp.max(jnp.where(used_PE, margin_PE, -jnp.inf), axis=1)
    z_PE = margin_PE - top_P[:, None]
    e_w_PE = e_w_PE * jnp.exp(jnp.where(used_PE, z_PE, jnp.minimum(z_PE, 0.0)))
  return e_w_PE / jnp.sum(e_w_PE, axis=1)[:, None]


# Whether the kernel computes the block's whole residual sublayer, x + DynMoE(RMSNorm(x)) (the
# layer called with ``norm``: the module docstring), rather than XLA normalising the layer's
# input and adding its output to the residual: with the attention's norm in the NSA input
# kernel (nsa_pallas.INPUTS_NORM), those are two launches of their own a layer (deviceless
# sm_90 count of the arc1 rollout step, session 41: 65.9 launches a step with neither, 63.9
# with the input kernel's alone, 64.9 with this one alone, 58.9 with both). Fewer launches,
# no faster: H100, session 41 (`train.bench --config configs/arc1.yaml --only decode --lens
# 2048 --profile`), this kernel took 15.8 us a layer with the norm against 13.2-13.4 without
# (its programs' serial chain: two row reductions before the routing's similarities), about
# what XLA's norm (2.1) and add (1.0) take; the rollout 166.2-166.5 ms with both norms in the
# kernels, 165.0 with the input kernel's alone (docs/benchmarks.md, session 41). Off.
DEC_PRENORM = False
# Tried, not kept (session 43, commits 51e8642 and 8d9d71a; docs/benchmarks.md): the kernel
# adding the residual alone (XLA applying the norm), the first program's partial taking the
# block's input (or its input and the attention's output, added there). XLA's add after the sum
# went, but the attention's residual add, which XLA fuses with this norm, became a launch of its
# own (or the output product ran twice): 57.875 launches a step against 56.875 (deviceless
# sm_90); H100, the arc1 rollout 158.5 and 158.1 ms against 158.9 and 159.5 (within the spread).


# Whether a routing program reads its expert's weights and computes the hidden product before
# it routes (neither depends on the routing; the same operations, in another order): the
# weights' loads and the first product then overlap the routing's arithmetic. Slower on the
# H100 (session 40, arc1 rollout, variant moe_early_loads): 185.2 ms a step against 175.3.
DEC_MOE_EARLY_LOADS = False


def _decode_kernel(x_ref, *refs, gate: dict | None, early: bool = False,
                   prenorm: bool = False):
  """``gate`` None: the rows' weights of expert e are an input; else the kernel's own routing
  (:func:`_gate_weights` of ``gate``'s settings, from the prototypes and thresholds), after the
  expert's loads and hidden product where ``early`` (DEC_MOE_EARLY_LOADS). ``prenorm``: the
  rows are the block's input, normalised here with the gains (an input after the biases), and
  the first program of each tile of rows adds them to its partial (the residual)."""
  e, j = pl.program_id(1), pl.program_id(2)
  x_PC = x_ref[...]
  dt = x_PC.dtype
  residual_PC = None
  if prenorm:
    *refs, scale_ref, y_ref = refs
    refs = (*refs, y_ref)
    residual_PC, x_PC = x_PC, rms_norm(x_PC, scale_ref[...])
  if gate is None:
    w_ref, w_in_ref, b_in_ref, w_out_ref, b_out_ref, y_ref = refs
  else:
    p_ref, thr_ref, w_in_ref, b_in_ref, w_out_ref, b_out_ref, y_ref = refs

  def hidden():
    h_PF = _mm(x_PC, w_in_ref[0]).astype(dt)
    return (h_PF.astype(_F32) + b_in_ref[0].astype(_F32)[None, :]).astype(dt).astype(_F32)

  if early:
    w_out_FC, b_out_C = w_out_ref[0], b_out_ref[0]
    u_PF = hidden()
  if gate is None:
    w_P1 = w_ref[...]
  else:
    w_PE = _gate_weights(x_PC, p_ref[...], thr_ref[...], **gate)
    e_PE = jax.lax.broadcasted_iota(jnp.int32, w_PE.shape, 1)
    w_P1 = jnp.sum(jnp.where(e_PE == e, w_PE, 0.0), axis=1)[:, None]
  if not early:
    u_PF = hidden()
    w_out_FC, b_out_C = w_out_ref[0], b_out_ref[0]
  # Expert e's weight of each row, rounded to the compute dtype as experts_dense rounds it.
  w_P1 = w_P1.astype(dt).astype(_F32)
  a_PF = (gelu(u_PF) * w_P1).astype(dt)
  y_PC = _mm(a_PF, w_out_FC)
  bias_PC = jnp.where(j == 0, w_P1 * b_out_C.astype(_F32)[None, :], 0.0)
  if prenorm:
    bias_PC = bias_PC + jnp.where((e == 0) & (j == 0), residual_PC.astype(_F32), 0.0)
  y_ref[0] = y_PC + bias_PC


def decode_partials(x_BC, weights_BE, w_in_ECF, b_in_EF, w_out_EFC, b_out_EC, *,
                    interpret: bool, gate: tuple | None = None,
                    prenorm_C: jax.Array | None = None) -> jax.Array:
  """The kernel's float32 partial outputs [E * F / tile_f, B, C] (:func:`_tiles`; their sum
  over axis 0 is the layer's output; with an RMSNorm's gains ``prenorm_C``, of the layer applied
  to ``rms_norm(x_BC)`` plus ``x_BC``: see the module docstring) for rows ``x_BC`` and their
  combination weights
  ``weights_BE`` (the gate's float32 ones: zero for an expert a row does not use), or, with
  ``weights_BE`` None, those of ``gate`` = (unit-norm prototypes [E, C] float32, thresholds
  [E], dict(eps=, combine=, fallback_k=)) computed in the kernel (needs
  :func:`route_supported`). Everything else in the compute dtype (x's)."""
  B, C = x_BC.shape
  E, _, F = w_in_ECF.shape
  tile_f, most_rows = _tiles(C, F, x_BC.dtype.itemsize)
  rows = min(_pow2_at_least(max(B, _MIN_TILE)), most_rows)
  padded_b = -(-B // rows) * rows
  x_PC = jnp.pad(x_BC, ((0, padded_b - B), (0, 0)))
  num_f = F // tile_f
  if not isinstance(DEC_MOE_EARLY_LOADS, bool):
    raise ValueError(f"moe_pallas.DEC_MOE_EARLY_LOADS must be True or False, got "
                     f"{DEC_MOE_EARLY_LOADS!r}")
  if weights_BE is None:
    p_unit_EC, thresholds_E, settings = gate
    gate_in = [p_unit_EC.astype(_F32), thresholds_E]
    gate_specs = [pl.BlockSpec((E, C), lambda i, e, j: (0, 0)),
                  pl.BlockSpec((E,), lambda i, e, j: (0,))]
  else:
    settings = None
    gate_in = [jnp.pad(weights_BE.astype(_F32), ((0, padded_b - B), (0, 0)))]
    gate_specs = [pl.BlockSpec((rows, 1), lambda i, e, j: (i, e))]
  norm_in = [] if prenorm_C is None else [prenorm_C]
  norm_specs = [] if prenorm_C is None else [pl.BlockSpec((C,), lambda i, e, j: (0,))]
  parts = pl.pallas_call(
      functools.partial(_decode_kernel, gate=settings,
                        early=DEC_MOE_EARLY_LOADS and settings is not None,
                        prenorm=prenorm_C is not None),
      grid=(padded_b // rows, E, num_f),
      in_specs=[
          pl.BlockSpec((rows, C), lambda i, e, j: (i, 0)),
          *gate_specs,
          pl.BlockSpec((1, C, tile_f), lambda i, e, j: (e, 0, j)),
          pl.BlockSpec((1, tile_f), lambda i, e, j: (e, j)),
          pl.BlockSpec((1, tile_f, C), lambda i, e, j: (e, j, 0)),
          pl.BlockSpec((1, C), lambda i, e, j: (e, 0)),
          *norm_specs,
      ],
      out_specs=pl.BlockSpec((1, rows, C), lambda i, e, j: (e * num_f + j, i, 0)),
      out_shape=jax.ShapeDtypeStruct((E * num_f, padded_b, C), _F32),
      interpret=interpret, compiler_params=_compiler_params(interpret, DEC_MOE_NUM_WARPS),
  )(x_PC, *gate_in, w_in_ECF, b_in_EF, w_out_EFC, b_out_EC, *norm_in)
  return parts[:, :B]


# Whether a decoding step's experts kernel routes its rows itself (where route_supported) rather
# than taking XLA's routing weights (about five launches a layer on a GPU: the input's
# normalisation, the similarity product, the fallback's reduction, the mask's select, the
# weights' division; deviceless sm_90 count of the arc1 rollout step, session 37). H200, jax
# 0.11.2, session 37: the routing as a kernel of its own (the same arithmetic, one program)
# made the arc1 rollout 176.2 ms against 178.2 with XLA's (1.01x), 7.1 us a call, about XLA's
# five launches' time; in each program of the experts kernel (no launch of its own, every
# program routing its 32 rows): H100, session 38, with the block option above on too, the
# experts kernel 13.6 us a layer against 8.0, XLA's routing 7.0 (~1.4 us a layer less, one
# call's profile). H100, session 39, timed on its own (`train.bench --config configs/arc1.yaml
# --only decode --lens 2048`, one call, one process each): the rollout 173.0 ms against 176.4
# and 179.1 with XLA's routing (1.02-1.04x), so on by default since (variant moe_xla_route:
# XLA's routing).
DECODE_ROUTE = True


def route_supported(*, num_experts: int, d_model: int, expert_hidden: int, itemsize: int,
                    interpret: bool) -> bool:
  """Whether :func:`decode_partials` routes in the kernel: with DECODE_ROUTE, on a GPU where E
  by C are Triton tiles (powers of two, E >= 16 for a tensor-core product) and a program's
  tiles with the prototypes' (float32 and its three bfloat16 parts) stay within
  DEC_TILE_BYTES, in interpret mode always."""
  if not isinstance(DECODE_ROUTE, bool):
    raise ValueError(f"moe_pallas.DECODE_ROUTE must be True or False, got {DECODE_ROUTE!r}")
  if not DECODE_ROUTE:
    return False
  if interpret:
    return True
  tiles = _tiles(d_model, expert_hidden, itemsize)
  return (_is_pow2(num_experts) and num_experts >= 16 and _is_pow2(d_model) and d_model >= 16
          and tiles is not None
          and _program_bytes(d_model, *tiles, itemsize) + num_experts * d_model * (4 + 3 * 2)
          <= DEC_TILE_BYTES)
