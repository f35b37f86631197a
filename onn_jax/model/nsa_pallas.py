"""Pallas kernels for the NSA core (``nsa_core(..., impl="pallas")``).

The selected branch is the part of NSA that XLA cannot run at speed: every (query, GQA group)
attends to its own ``num_select`` key blocks, so the blockwise implementation gathers a
[B,T,G,K,select_len,D] copy of the keys and values and keeps it for the backward pass. The
kernels here read the chosen blocks straight from the [B,S,G,D] keys instead:

* forward (``FWD_IMPL = "keyblock"``, what the default ``"auto"`` takes for training rows):
  key-major, on the backward's items below: one program per item loads its block's keys and
  values once, attends the item's query rows to them and writes per-row partial outputs and
  log-sum-exps, which XLA combines over each token's ``K`` slots; ``FWD_IMPL = "query"``: one
  program per (example, query token, group) holds the group's R query heads as one [R, D]
  tile and walks the ``K`` chosen blocks with an online softmax (slower for training rows,
  measured; ``"auto"`` takes it for a few queries a row, such as one-token decoding).
  Neither stores anything of size T*K*select_len;
* backward: key-major (the item plan comes from the key-major forward when it ran). The
  (token, slot) pairs of each (example, group) are sorted by selection block (in XLA) and cut
  into items of up to ``ITEM_CHUNKS`` chunks of ``KEY_CHUNK`` tokens; one program per item
  loads its block's keys and values once and walks the item's chunks (gathers each chunk's
  query rows, recomputes the probabilities from the log-sum-exp), sums the block's dk/dv
  over the item's rows in registers (one [L, D] partial per item, then summed per block by
  :func:`sum_item_partials`, a segment sum in XLA) and writes each row's dq contribution,
  which XLA sums over the token's ``K`` slots. A block that every token chooses (block 0) is
  spread over many items, so no program of the backward walks a long list. (A query-major
  backward, one program per (example, token, group) adding dk/dv by float32 atomic adds,
  made the selected branch's forward+backward 2.1-2.5x slower on an H200 at 32 x 2048 and
  1 x 32768, docs/bench/nsa_pallas_h200_r6_keyblock_variants.json; removed in session 26.)

The block choice (eq. 9-11) for one sequence a row is a kernel too (``block_choice``, see its
section below): float32 compressed probabilities, their overlap sums and a running top-k per
tile of queries, without storing [B,T,H,N] probabilities. So is the window branch of rows from
position 0 (``window_attention``, the last section): a band of key tiles for each tile of
queries, packed rows masked by their sequences' starts.

Products run on tensor cores: a group's R query heads (4 at the GPU config) are zero-padded
to ``ROW_TILE`` = 16 rows (an element-wise formulation on CUDA cores measured 2.8x slower
forward and 2x slower forward+backward on an H200).

Numerics: products take the inputs' dtype with float32 accumulation (float32 inputs: exact
float32 products, no TF32; the block choice's float32 overlap sums: three bfloat16 parts,
``CHOICE_OVERLAP_PRECISION``); logits, softmax, the running sums and the gradient accumulators
are float32. For 16-bit inputs probabilities and ``ds`` are rounded to the input dtype before
their products, as the reference rounds probabilities before the value product, and the
training kernels' outputs come back in the input dtype (``BRANCH_OUT_DTYPE``), each rounded once.

On GPU the kernels lower through Triton; every tile dimension (R, D, ``select_len``) must then
be a power of two (``pallas_supported`` says whether they are). Elsewhere they run in Pallas
interpret mode, which the CPU tests use.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from onn_jax.model.layers import rms_norm, rotate_half

try:  # the Triton-specific API (atomics, compiler parameters)
  from jax.experimental.pallas import triton as plt
except ImportError:  # pragma: no cover - every supported jax version has it
  plt = None

_F32 = jnp.float32
# Query rows per tile: a group's R heads padded with zero rows to the 16 rows a tensor-core
# product needs (the padded rows are computed and dropped).
ROW_TILE = 16
# Masked logits: finite, so that exp(masked - running max) is exactly 0 and never NaN.
_NEG = -1e30


def _is_pow2(n: int) -> bool:
  return n >= 1 and (n & (n - 1)) == 0


def _pow2_at_least(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def pallas_supported(*, heads_per_group: int, head_dim: int, select_len: int) -> bool:
  """Whether the Triton lowering accepts these tile sizes (each a power of two)."""
  return all(_is_pow2(n) for n in (heads_per_group, head_dim, select_len))


def use_interpret() -> bool:
  """Pallas interpret mode everywhere but on GPU."""
  return jax.default_backend() != "gpu"


# Triton launch width of the query-major selected forward (measured on an H200).
FWD_NUM_WARPS = 4


# Triton's software pipelining of a kernel's loops (num_stages: how many iterations' loads
# feeding a product are in flight at once; 1 = none, every loop waits on its loads), by
# kernel family: the key-major selected forward and, apart, its backward (their chunk loop
# gathers query rows), the block choice (its walk over the compressed keys), the window
# forward and, apart, its two backward kernels (their walk over the band's key tiles) and the
# one-token decoding kernel. Every other kernel runs 1.
# Timed on an H100 (jax 0.11.2, 2026-12-05; docs/bench/nsa_stages*_h100_2026-12-05.json), no
# win: nsa_core forward+backward with every family at 2 / 3 stages 4.11 / 4.15 against 4.18 ms
# at 32 x 2048, 5.00 / 5.28 against 5.08 at 8 x 8192, 5.60 / 5.23 against 5.37 at 1 x 32768
# (train.nsa_kernel_check --variants stages2,stages3); one family at a time from 0.45 ms
# faster (the choice at 3 stages, 32 x 2048: 3.73 against 4.18) to 0.17 slower, but the
# choice's 0.45 ms did not repeat when timed alone (--breakdown, 20 iterations: 0.46 against
# 0.61 at 32 x 2048, 1.53 against 1.13 at 8 x 8192). In that breakdown the forward kernels
# gained at both lengths (the window's 0.50 -> 0.30 and 0.45 -> 0.25-0.33 ms, the selected
# branch's 1.68 -> 1.44 and 1.76 -> 1.31-1.39 ms with its plan) while the forward+backward
# pairs lost at 8 x 8192; hence separate forward and backward settings (session 26, not yet
# timed: train.nsa_kernel_check --variants fwd_s2,fwd_s3). The decoding kernel 15-17 against
# 18 us a call, but the arc1 rollout 204.4 against 204.3 ms.
KEY_FWD_NUM_STAGES = 1
KEY_BWD_NUM_STAGES = 1
CHOICE_NUM_STAGES = 1
WIN_FWD_NUM_STAGES = 1
WIN_BWD_NUM_STAGES = 1
DEC_NUM_STAGES = 1


def _compiler_params(interpret: bool, num_warps: int, stages: str | None = None):
  """Triton's launch parameters; ``stages``: the name of the family's ``*_NUM_STAGES``
  setting (checked on every backend), else 1."""
  num_stages = 1
  if stages is not None:
    num_stages = globals()[stages]
    if isinstance(num_stages, bool) or not (isinstance(num_stages, numbers.Integral)
                                            and num_stages >= 1):
      raise ValueError(f"nsa_pallas.{stages} must be an integer >= 1, got {num_stages!r}")
  if interpret or plt is None:
    return None
  return plt.CompilerParams(num_warps=num_warps, num_stages=int(num_stages))


def _flag(name: str) -> bool:
  """A True/False setting of this module (read when a kernel is traced); anything else is a
  one-line error naming it."""
  value = globals()[name]
  if not isinstance(value, bool):
    raise ValueError(f"nsa_pallas.{name} must be True or False, got {value!r}")
  return value


def _program_coords(num_queries: int, num_groups: int):
  """(b, t, g) of this program in the flat grid of B*T*G programs."""
  pid = pl.program_id(0)
  g = jax.lax.rem(pid, num_groups)
  bt = jax.lax.div(pid, num_groups)
  return jax.lax.div(bt, num_queries), jax.lax.rem(bt, num_queries), g


def _mm(a, b, *, trans_a: bool = False, trans_b: bool = False):
  """2-D matrix product on tensor cores, float32 accumulation; exact float32 products for
  float32 operands (no TF32), so that float32 runs match the reference."""
  precision = jax.lax.Precision.HIGHEST if a.dtype == _F32 else None
  return jax.lax.dot_general(a, b, (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ())),
                             precision=precision, preferred_element_type=_F32)


def _block_logits(q_PD, k_ref, b, g, j, pos, select_len: int, scale: float):
  """Logits of the query tile against selection block ``j`` (``j < 0``: an unused slot).

  Returns the [P, L] float32 logits (``_NEG`` where masked), the [L] key mask, the block's
  keys [L, D] and its first key row.
  """
  start = jnp.maximum(j, 0) * select_len
  k_LD = k_ref[b, pl.ds(start, select_len), g, :]
  logits_PL = _mm(q_PD, k_LD, trans_b=True) * scale
  keypos_L = start + jax.lax.broadcasted_iota(jnp.int32, (select_len,), 0)
  ok_L = (keypos_L <= pos) & (j >= 0)
  return jnp.where(ok_L[None, :], logits_PL, _NEG), ok_L, k_LD, start


def _selected_fwd_kernel(q_ref, k_ref, v_ref, idx_ref, pos_ref, o_ref, lse_ref, *,
                         num_queries: int, num_groups: int, num_slots: int, select_len: int,
                         scale: float):
  b, t, g = _program_coords(num_queries, num_groups)
  q_PD = q_ref[b, t, g]
  pos = pos_ref[b, t]
  P, D = q_PD.shape

  def slot(k, carry):
    m_P, l_P, acc_PD = carry
    j = idx_ref[b, t, g, k]
    logits_PL, ok_L, _, start = _block_logits(q_PD, k_ref, b, g, j, pos, select_len, scale)
    v_LD = v_ref[b, pl.ds(start, select_len), g, :]
    m_new_P = jnp.maximum(m_P, jnp.max(logits_PL, axis=-1))
    alpha_P = jnp.exp(m_P - m_new_P)
    p_PL = jnp.where(ok_L[None, :], jnp.exp(logits_PL - m_new_P[:, None]), 0.0)
    l_P = l_P * alpha_P + jnp.sum(p_PL, axis=-1)
    acc_PD = acc_PD * alpha_P[:, None] + _mm(p_PL.astype(v_LD.dtype), v_LD)
    return m_new_P, l_P, acc_PD

  init = (jnp.full((P,), _NEG, _F32), jnp.zeros((P,), _F32), jnp.zeros((P, D), _F32))
  m_P, l_P, acc_PD = jax.lax.fori_loop(0, num_slots, slot, init)
  # Every query sees at least its own key (its block is always selected), so l > 0.
  o_ref[b, t, g] = (acc_PD / l_P[:, None]).astype(o_ref.dtype)
  lse_ref[b, t, g] = m_P + jnp.log(l_P)


def _pad_keys(x_BSGD: jax.Array, select_len: int) -> jax.Array:
  """Pads the key axis to a whole number of selection blocks (no copy when it already is)."""
  S = x_BSGD.shape[1]
  extra = -S % select_len
  if not extra:
    return x_BSGD
  return jnp.pad(x_BSGD, [(0, 0), (0, extra), (0, 0), (0, 0)])


def _pad_rows(x, rows: int):
  """Zero-pads axis 3 (the query heads of a group) to ``rows``."""
  extra = rows - x.shape[3]
  if not extra:
    return x
  return jnp.pad(x, [(0, 0)] * 3 + [(0, extra)] + [(0, 0)] * (x.ndim - 4))


def _selected_forward(q_BTGRD, k_BSGD, v_BSGD, idx_BTGK, pos_BT, select_len, interpret):
  """Output [B,T,G,P,D] (BRANCH_OUT_DTYPE) and log-sum-exp [B,T,G,P] (float32) over P >= R
  padded rows."""
  B, T, G, R, D = q_BTGRD.shape
  P = max(ROW_TILE, R)
  K = idx_BTGK.shape[-1]
  kernel = functools.partial(_selected_fwd_kernel, num_queries=T, num_groups=G, num_slots=K,
                             select_len=select_len, scale=1.0 / math.sqrt(D))
  return pl.pallas_call(
      kernel, grid=(B * T * G,),
      out_shape=(jax.ShapeDtypeStruct((B, T, G, P, D), branch_out_dtype(q_BTGRD.dtype)),
                 jax.ShapeDtypeStruct((B, T, G, P), _F32)),
      interpret=interpret, compiler_params=_compiler_params(interpret, FWD_NUM_WARPS),
  )(_pad_rows(q_BTGRD, P), _pad_keys(k_BSGD, select_len), _pad_keys(v_BSGD, select_len),
    idx_BTGK, pos_BT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def selected_attention(q_BTGRD: jax.Array, k_BSGD: jax.Array, v_BSGD: jax.Array,
                       idx_BTGK: jax.Array, pos_BT: jax.Array, select_len: int,
                       interpret: bool) -> jax.Array:
  """Selected-branch attention (NSA eq. 12) over the chosen blocks only.

  Args:
    q_BTGRD: queries [B,T,G,R,D] (R query heads per key/value group).
    k_BSGD, v_BSGD: selection keys/values [B,S,G,D].
    idx_BTGK: int32 [B,T,G,K] selection-block indices; ``-1`` marks an unused slot. Distinct
      within a row (a duplicate would count its keys twice).
    pos_BT: int32 [B,T] absolute query positions (>= 0); key ``s`` is seen only when
      ``s <= pos``.
    select_len: keys per selection block (static).
    interpret: run the kernels in Pallas interpret mode (static).
  Returns:
    [B,T,G,R,D] in float32 or q's dtype (BRANCH_OUT_DTYPE). Differentiable in q, k and v
    (indices and positions are constants).
  """
  return _selected_vjp_fwd(q_BTGRD, k_BSGD, v_BSGD, idx_BTGK, pos_BT, select_len,
                           interpret)[0]


def _selected_vjp_fwd(q_BTGRD, k_BSGD, v_BSGD, idx_BTGK, pos_BT, select_len, interpret):
  """Output [B,T,G,R,D] (BRANCH_OUT_DTYPE) and the residuals: inputs, output, log-sum-exp
  and, with the key-major forward, the item plan (which the key-major backward then
  reuses)."""
  R = q_BTGRD.shape[3]
  num_blocks = -(-k_BSGD.shape[1] // select_len)
  plan = None
  if forward_impl(q_BTGRD.shape[1], idx_BTGK.shape[-1], num_blocks) == "keyblock":
    plan = _keyblock_plan(idx_BTGK, pos_BT, num_blocks=num_blocks, heads=R,
                          chunk=_item_tokens())
    out, lse = _selected_forward_keyblock(q_BTGRD, k_BSGD, v_BSGD, plan, select_len,
                                          interpret)
  else:
    out, lse = _selected_forward(q_BTGRD, k_BSGD, v_BSGD, idx_BTGK, pos_BT, select_len,
                                 interpret)
    out, lse = out[:, :, :, :R], lse[:, :, :, :R]
  return out, (q_BTGRD, k_BSGD, v_BSGD, idx_BTGK, pos_BT, out, lse, plan)


def _selected_vjp_bwd(select_len, interpret, res, do_BTGRD):
  for name, value in (("DKDV_REDUCE", DKDV_REDUCE), ("DQ_REDUCE", DQ_REDUCE)):
    if value not in ("atomic", "partials"):
      raise ValueError(f"nsa_pallas.{name} must be 'partials' or 'atomic', got {value!r}")
  return _selected_bwd_keyblock(select_len, interpret, res, do_BTGRD)


# ---------------------------------------------------------------- key-major backward
#
# The (token, slot) pairs of each (example, group) are sorted by their selection block, and
# each block's run of tokens is cut into items of C = ITEM_CHUNKS * KEY_CHUNK tokens (the last
# item of a block partial, items past the end empty). One program per item loads its block's
# keys and values once and walks the item's live chunks, gathering each chunk's query rows
# (KEY_CHUNK tokens x R heads), and computes
#   * the block's dk/dv contribution, summed over the item's rows in registers and written
#     as one [L, D] partial per item (summed per block afterwards by sum_item_partials) or,
#     with DKDV_REDUCE = "atomic", added with one atomic add per item;
#   * each row's dq contribution, written to the item's own rows of a [items*C*R, D]
#     buffer and summed over the K slots of each token afterwards (a gather), or with
#     DQ_REDUCE = "atomic" added to the row's own.
# A block chosen by every token (block 0 always is) is spread over many items, so no program
# walks a long list; the number of items is static: sum_j ceil(n_j / C) <= (T*K + J*(C-1))/C.

# The forward: "keyblock" (the backward's items: each block's keys loaded once for up to
# ITEM_CHUNKS * KEY_CHUNK tokens, partial outputs combined by log-sum-exp in XLA; the plan is
# shared with the backward) or "query" (one program per (example, token, group) walking its K
# blocks). H200, selected branch at 32x2048 (train.nsa_kernel_check --variants fwd_query):
# forward 1.36 ms against 2.10, forward+backward 2.48 against 3.38.
# "auto" (the default) takes the key-major forward when a row's T * K (token, slot) pairs
# could fill one whole chunk of KEY_CHUNK per key block (T * K >= J * KEY_CHUNK; a chunk, not
# an item of ITEM_CHUNKS chunks, as before items had several), the query-major one
# otherwise: one-token decoding (T = 1) would otherwise launch J mostly empty items per
# (example, group) and sort their plan, at every generated token.
FWD_IMPL = "auto"
KEY_CHUNK = 16              # tokens per chunk: a program's query tile (a power of two on GPU)
# Chunks per item: an item holds up to ITEM_CHUNKS * KEY_CHUNK tokens of one block and its
# program walks the live chunks one query tile at a time, keys and values loaded once, dk/dv
# summed in registers over them. More chunks mean fewer items, so fewer dk/dv partials to
# write and sum (the segment sum and the partials' writes are the selected backward's XLA
# glue), at the cost of more padding in the plan for blocks few tokens choose and of fewer,
# longer programs. A power of two on GPU. H100, jax 0.11.2, arc1's geometry, nsa_core
# forward+backward (train.nsa_kernel_check --variants items1,items2,items4,items8,items16):
# 8 against 1 (the former items of one chunk) 3.67 / 4.03 ms at 32 x 2048, 4.79 / 5.44 at
# 8 x 8192, 5.17 / 5.58 at 1 x 32768; 2 and 4 in between; 16 chunks 3.57 / 4.89 / 5.38
# (faster at 2048 only); 8 chunks of 8 tokens 4.03 / 5.37 / 5.42, 16 of 8 3.89 / 5.26 /
# 5.58, 4 of 32 3.69 / 5.19 / 5.36 (docs/bench/nsa_item_chunks*_h100_2026-12-05.json). The
# selected forward alone is a little slower at 8 chunks (1.26 against 1.15 ms at 32 x 2048;
# 4 chunks 1.13), its backward much faster. The arc1 training step (train.bench --only train
# --lens 2048, back to back): 68.8 against 72.3 ms. Every real row's position is >= 0 (the
# plan marks padding rows with -1, and a program walks the chunks up to its last real row).
ITEM_CHUNKS = 8
DKDV_REDUCE = "partials"    # "partials" (kernel writes, summed by sum_item_partials) or "atomic"
# The key-major backward's dq: "partials" (each item row's contribution written to its own
# row of a [items*C*R, D] float32 buffer, then gathered and summed over the K slots of each
# (token, head) in XLA: K partials a row to write and read back) or "atomic" (added by the
# kernel, one float32 atomic add a value, into a [T*G*R (+1), D] buffer: no partials, no
# gather; the sum's order, hence its last bits, then varies from run to run on a GPU).
# H200, jax 0.11.2, 2026-12-05, nsa_core forward+backward (train.nsa_kernel_check --variants
# dq_atomic; docs/bench/nsa_dq_atomic_h200_2026-12-05.json): atomic 4.04 against 3.56 ms at
# 32 x 2048, 4.96 against 4.85 at 8 x 8192, 5.21 against 4.82 at 1 x 32768: "partials"
# (timed with the padding rows' zeros added to one spare row; since session 26 they are
# masked on a GPU, see the kernel: not yet timed).
DQ_REDUCE = "partials"
KEY_NUM_WARPS = 4
# Keys per tile of the key-major backward: a block of select_len keys is walked in tiles of
# KEY_TILE (a static, unrolled loop), so a program holds [KEY_CHUNK * heads, KEY_TILE] float32
# values (logits, probabilities and their gradients) at a time whatever select_len is, but
# (since items of several chunks) every tile's keys, values and [KEY_TILE, D] float32 dk/dv
# sums across its chunk loop: with two tiles (the paper's geometry) untimed. Written against the
# paper geometry's slow backward (32/16/64/16/512), which turned out to be the partials' sum
# (sum_item_partials), not the kernel: with the sorted sum, tiles of 32 and the whole block
# (variant key_tile64) timed the same, 49.6 and 49.2 ms (H200, 32 x 2048). Not yet timed
# after that fix. A power of two, at least 16 on GPU (tensor-core tiles); a select_len that
# is not a multiple of it (at most KEY_TILE on GPU) is one tile.
KEY_TILE = 32


def _item_tokens() -> int:
  """Tokens per item of the key-major kernels' plan (KEY_CHUNK * ITEM_CHUNKS)."""
  if isinstance(ITEM_CHUNKS, bool) or not (isinstance(ITEM_CHUNKS, numbers.Integral)
                                           and _is_pow2(int(ITEM_CHUNKS))):
    raise ValueError(f"nsa_pallas.ITEM_CHUNKS must be a power of two (1, 2, 4, ...), got "
                     f"{ITEM_CHUNKS!r}")
  return KEY_CHUNK * int(ITEM_CHUNKS)


def _live_chunks(pos_ref, b, g, m, rows: int, chunks: int):
  """The number of chunks of item ``m`` that hold a real row: its real rows come first (see
  :func:`_keyblock_plan`), ``rows`` a chunk, ``chunks`` an item."""
  pos_Y = pos_ref[b, g, pl.ds(m * rows * chunks, rows * chunks)]
  live = jnp.sum((pos_Y >= 0).astype(jnp.int32))
  return jax.lax.div(live + rows - 1, rows)


def forward_impl(num_queries: int, num_slots: int, num_blocks: int) -> str:
  """The selected branch's forward for T queries of K slots over J key blocks (``FWD_IMPL``)."""
  if FWD_IMPL == "auto":
    return "keyblock" if num_queries * num_slots >= num_blocks * KEY_CHUNK else "query"
  if FWD_IMPL not in ("keyblock", "query"):
    raise ValueError(f"nsa_pallas.FWD_IMPL must be 'auto', 'keyblock' or 'query', got "
                     f"{FWD_IMPL!r}")
  return FWD_IMPL


# How the key-major plan finds each block's entries among the sorted ones and each item's
# block: "runs" (each block's first entry by one scatter of the runs' starts and a masked
# minimum over the blocks, :func:`_sorted_run_starts`, O(T*K + J^2); each item's block by
# "compare_all", M x (J+1) comparisons of a small array), jnp.searchsorted's "compare_all"
# (one fused comparison of every entry with every boundary, J+1 of them, then a sum: it reads
# the entries J+1 times, ~2 GB at 1 x 32768) or "scan" (before session 32: a binary search
# as a while loop of ceil(log2(T*K + 1)) iterations, each a few small kernels and copies, its
# condition read by the host). H100, jax 0.11.2, the arc1 NSA layer fwd+bwd back to back, twice
# in one process (docs/benchmarks.md, session 33), runs / compare_all / scan: 3.17 / 3.24 /
# 3.26 and 3.19 / 3.19 / 3.33 ms at 32 x 2048; 4.13 / 4.17 / 4.30 and 4.09 / 4.16 / 4.31 at
# 8 x 8192; 3.98 / 4.15 / 4.03 and 3.93 / 4.18 / 4.09 at 1 x 32768 (session 32: compare_all
# against scan, the step 43.6 against 45.9 ms at 32 x 2048).
PLAN_SEARCH = "runs"
PLAN_SEARCHES = ("runs", "compare_all", "scan")


def _sorted_run_starts(a_E: jax.Array, num_values: int) -> jax.Array:
  """``searchsorted(a_E, arange(num_values), side="left")`` for ``a_E`` sorted, of ints in
  [0, num_values): where each value's run starts (where the next present value's does for an
  absent one, E past the last), from each run's first entry scattered to its value (O(E)),
  then the least start at or above each value (a V x V masked minimum: one fusion, where a
  running minimum lowers to a scan of several)."""
  E = a_E.shape[0]
  first_E = jnp.concatenate([jnp.ones((1,), bool), a_E[1:] != a_E[:-1]])
  start_V = jnp.full((num_values,), E, jnp.int32).at[jnp.where(first_E, a_E, num_values)].set(
      jnp.arange(E, dtype=jnp.int32), mode="drop")
  v_V = jnp.arange(num_values)
  return jnp.min(jnp.where(v_V[None, :] >= v_V[:, None], start_V[None, :], E), axis=1)


def _keyblock_plan(idx_BTGK: jax.Array, pos_BT: jax.Array, *, num_blocks: int, heads: int,
                   chunk: int):
  """The items of the key-major backward, built from the block choice.

  Returns
    qrow_BGX: int32 [B,G,M*C*R], the flat row ``(t*G + g)*R + r`` of q (as [B,T*G*R,D]) each
      item row reads (0 for padding rows);
    posrow_BGX: int32 [B,G,M*C*R], the row's query position, ``-1`` for padding rows (every
      key is then masked);
    blk_BGM: int32 [B,G,M], each item's selection block;
    padpos_BGTK: int32 [B,G,T,K], the item slot ``m*C + c`` that holds (token, slot), ``-1``
      for unused slots.
  """
  B, T, G, K = idx_BTGK.shape
  J, R, C = num_blocks, heads, chunk
  E = T * K
  M = (E + J * (C - 1)) // C
  blk_BGE = jnp.where(idx_BTGK >= 0, idx_BTGK, J).transpose(0, 2, 1, 3).reshape(B, G, E)
  ent_BGE = jnp.broadcast_to(jnp.arange(E, dtype=jnp.int32), (B, G, E))
  # Stable: the tokens of one block stay in increasing order. (Session 31 tried one packed
  # int32 key a entry, block * T*K + entry, sorted alone: the layer at 32 x 2048 was no
  # faster, 3.56 / 3.50 ms against 3.48 / 3.44 on an H100; removed.)
  blk_s, ent_s = jax.lax.sort((blk_BGE, ent_BGE), dimension=2, is_stable=True, num_keys=1)
  per_bg = lambda f: jax.vmap(jax.vmap(f))  # noqa: E731
  if PLAN_SEARCH not in PLAN_SEARCHES:
    raise ValueError(f"nsa_pallas.PLAN_SEARCH must be one of {PLAN_SEARCHES}, got "
                     f"{PLAN_SEARCH!r}")
  search = functools.partial(jnp.searchsorted,
                             method="compare_all" if PLAN_SEARCH == "runs" else PLAN_SEARCH)
  if PLAN_SEARCH == "runs":
    seg_BGJ1 = per_bg(lambda a: _sorted_run_starts(a, J + 1))(blk_s)
  else:
    seg_BGJ1 = per_bg(lambda a: search(a, jnp.arange(J + 1, dtype=jnp.int32),
                                       side="left"))(blk_s).astype(jnp.int32)
  count_BGJ = seg_BGJ1[..., 1:] - seg_BGJ1[..., :-1]
  nch_BGJ = (count_BGJ + C - 1) // C
  cst_BGJ1 = jnp.concatenate([jnp.zeros((B, G, 1), jnp.int32),
                              jnp.cumsum(nch_BGJ, axis=-1, dtype=jnp.int32)], axis=-1)
  m_M = jnp.arange(M, dtype=jnp.int32)
  blk_BGM = per_bg(lambda a: search(a, m_M, side="right"))(cst_BGJ1) - 1
  blk_BGM = jnp.clip(blk_BGM, 0, J - 1).astype(jnp.int32)
  c_BGM = m_M - jnp.take_along_axis(cst_BGJ1, blk_BGM, axis=-1)
  start_BGM = jnp.take_along_axis(seg_BGJ1, blk_BGM, axis=-1) + c_BGM * C
  n_BGM = jnp.clip(jnp.take_along_axis(count_BGJ, blk_BGM, axis=-1) - c_BGM * C, 0, C)
  c_C = jnp.arange(C, dtype=jnp.int32)
  valid_BGMC = c_C < n_BGM[..., None]
  sidx_BGMC = jnp.clip(start_BGM[..., None] + c_C, 0, E - 1).reshape(B, G, M * C)
  tok_BGMC = (jnp.take_along_axis(ent_s, sidx_BGMC, axis=-1) // K).reshape(B, G, M, C)
  g_G = jnp.arange(G, dtype=jnp.int32)[None, :, None, None]
  r_R = jnp.arange(R, dtype=jnp.int32)
  qrow = jnp.where(valid_BGMC[..., None], (tok_BGMC[..., None] * G + g_G[..., None]) * R + r_R,
                   0)
  pos_BGMC = jax.vmap(lambda p, t: p[t])(pos_BT, tok_BGMC)
  posrow = jnp.where(valid_BGMC, pos_BGMC, -1)
  posrow = jnp.broadcast_to(posrow[..., None], (B, G, M, C, R))
  # Item slot of every sorted entry: its block's first item slot plus its rank in the block.
  i_E = jnp.arange(E, dtype=jnp.int32)
  padpos_s = (jnp.take_along_axis(cst_BGJ1, blk_s, axis=-1) * C + i_E
              - jnp.take_along_axis(seg_BGJ1, blk_s, axis=-1))
  padpos_s = jnp.where(blk_s < J, padpos_s, -1)
  padpos_BGE = per_bg(lambda pp, e: jnp.zeros((E,), jnp.int32).at[e].set(
      pp, unique_indices=True))(padpos_s, ent_s)
  return (qrow.reshape(B, G, M * C * R), posrow.reshape(B, G, M * C * R), blk_BGM,
          padpos_BGE.reshape(B, G, T, K))


def _selected_bwd_key_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qrow_ref,
                             posrow_ref, blk_ref, *refs, num_groups: int, num_items: int,
                             rows: int, chunks: int, select_len: int, key_tile: int,
                             scale: float, atomic: bool, atomic_dq: bool, interpret: bool):
  """One item: its live chunks of ``rows`` query rows walked in turn against the item's
  block, the block's dk/dv summed over them in registers and written once; dq per chunk
  (written to the chunk's rows, or with ``atomic_dq`` added to each row's own)."""
  dq_ref, dk_ref, dv_ref = refs[-3:]  # after the inputs aliased to the atomic outputs
  pid = pl.program_id(0)
  m = jax.lax.rem(pid, num_items)
  bg = jax.lax.div(pid, num_items)
  b, g = jax.lax.div(bg, num_groups), jax.lax.rem(bg, num_groups)
  j = blk_ref[b, g, m]
  start = j * select_len
  num_tiles = select_len // key_tile
  # The block's keys in tiles of key_tile: a static loop, one tile's [rows, key_tile] values
  # live at a time (their dk/dv accumulators stay).
  keys = [(k_ref[b, pl.ds(start + i * key_tile, key_tile), g, :],
           v_ref[b, pl.ds(start + i * key_tile, key_tile), g, :],
           start + i * key_tile + jax.lax.broadcasted_iota(jnp.int32, (key_tile,), 0))
          for i in range(num_tiles)]

  def chunk(c, acc):
    """Chunk c's rows: dq written, the chunk's dk/dv (per key tile) added to ``acc``."""
    row0 = (m * chunks + c) * rows
    qrow_X = qrow_ref[b, g, pl.ds(row0, rows)]
    pos_X = posrow_ref[b, g, pl.ds(row0, rows)]
    q_XD = q_ref[b, qrow_X, :]
    do_XD = do_ref[b, qrow_X, :]
    lse_X = lse_ref[b, qrow_X]
    delta_X = delta_ref[b, qrow_X]
    dq_XD = jnp.zeros(q_XD.shape, _F32)
    out = []
    for (k_LD, v_LD, keypos_L), (dk_LD, dv_LD) in zip(keys, acc):
      ok_XL = keypos_L[None, :] <= pos_X[:, None]  # padding rows (pos -1) see nothing
      logits_XL = _mm(q_XD, k_LD, trans_b=True) * scale
      p_XL = jnp.where(ok_XL, jnp.exp(jnp.where(ok_XL, logits_XL - lse_X[:, None], 0.0)), 0.0)
      dp_XL = _mm(do_XD, v_LD, trans_b=True)
      ds_XL = (p_XL * (dp_XL - delta_X[:, None])).astype(q_XD.dtype)
      out.append((dk_LD + _mm(ds_XL, q_XD, trans_a=True) * scale,
                  dv_LD + _mm(p_XL.astype(do_XD.dtype), do_XD, trans_a=True)))
      dq_XD = dq_XD + _mm(ds_XL, k_LD)
    if atomic_dq:
      # Padding rows (all zero) add nothing: on a GPU they are masked; interpret mode has no
      # masked atomics, and its atomic add is a gather then a set, which keeps one of two
      # writes to a row of one call (a real row and row 0's padding), so there they add
      # their zeros to the spare last row. (Before session 26 the GPU did that too: every
      # padding row of an example on one row, a hot spot in the timings below.)
      dummy = dq_ref.shape[1] - 1
      real_X = pos_X >= 0
      row_XD = jnp.broadcast_to(jnp.where(real_X, qrow_X, dummy)[:, None], dq_XD.shape)
      col_XD = jax.lax.broadcasted_iota(jnp.int32, dq_XD.shape, 1)
      mask = None if interpret else jnp.broadcast_to(real_X[:, None], dq_XD.shape)
      plt.atomic_add(dq_ref, (jnp.full(dq_XD.shape, b, jnp.int32), row_XD, col_XD),
                     dq_XD * scale, mask=mask)
    else:
      dq_ref[b, g, pl.ds(row0, rows), :] = (dq_XD * scale).astype(dq_ref.dtype)
    return tuple(out)

  zeros = tuple((jnp.zeros((key_tile, k.shape[-1]), _F32),) * 2 for k, _, _ in keys)
  if chunks == 1:
    acc = chunk(0, zeros)
  else:  # the live chunks only (an item's last chunks may be empty)
    acc = jax.lax.fori_loop(0, _live_chunks(posrow_ref, b, g, m, rows, chunks), chunk, zeros)
  for i, (dk_LD, dv_LD) in enumerate(acc):
    if atomic:
      blk_rows = (b, pl.ds(start + i * key_tile, key_tile), g, slice(None))
      plt.atomic_add(dk_ref, blk_rows, dk_LD)
      plt.atomic_add(dv_ref, blk_rows, dv_LD)
    else:
      tile = slice(None) if key_tile == select_len else pl.ds(i * key_tile, key_tile)
      dk_ref[b, g, m, tile, :] = dk_LD.astype(dk_ref.dtype)
      dv_ref[b, g, m, tile, :] = dv_LD.astype(dv_ref.dtype)


def _selected_bwd_keyblock(select_len, interpret, res, do_BTGRD):
  q_BTGRD, k_BSGD, v_BSGD, idx_BTGK, pos_BT, out, lse, plan = res
  B, T, G, R, D = q_BTGRD.shape
  S = k_BSGD.shape[1]
  C, U, L = KEY_CHUNK, ITEM_CHUNKS, select_len
  k_pad, v_pad = _pad_keys(k_BSGD, L), _pad_keys(v_BSGD, L)
  Sp = k_pad.shape[1]
  J = Sp // L
  if plan is None:  # the query-major forward made none
    plan = _keyblock_plan(idx_BTGK, pos_BT, num_blocks=J, heads=R, chunk=_item_tokens())
  qrow, posrow, blk_BGM, padpos_BGTK = plan
  M = blk_BGM.shape[-1]
  X = C * R
  assert qrow.shape[-1] == M * U * X, "the plan was made with other item settings"
  delta_BTGR = jnp.sum(do_BTGRD.astype(_F32) * out, axis=-1)
  atomic, atomic_dq = DKDV_REDUCE == "atomic", DQ_REDUCE == "atomic"  # checked by the caller
  kernel = functools.partial(_selected_bwd_key_kernel, num_groups=G, num_items=M, rows=X,
                             chunks=U, select_len=L,
                             key_tile=KEY_TILE if L % KEY_TILE == 0 else L,
                             scale=1.0 / math.sqrt(D), atomic=atomic, atomic_dq=atomic_dq,
                             interpret=interpret)
  args = [q_BTGRD.reshape(B, T * G * R, D), k_pad, v_pad,
          do_BTGRD.astype(q_BTGRD.dtype).reshape(B, T * G * R, D), lse.reshape(B, -1),
          delta_BTGR.reshape(B, -1), qrow, posrow, blk_BGM]
  # Outputs (dq, dk, dv); an atomic one starts from zeros, an input aliased to it.
  dq = (jax.ShapeDtypeStruct((B, T * G * R + 1, D), _F32) if atomic_dq else
        jax.ShapeDtypeStruct((B, G, M * U * X, D),
                             _partial_dtype("DQ_PARTIAL_DTYPE", q_BTGRD.dtype)))
  dkdv = [jax.ShapeDtypeStruct(x.shape, _F32) if atomic else
          jax.ShapeDtypeStruct((B, G, M, L, D), _partial_dtype("DKDV_PARTIAL_DTYPE", x.dtype))
          for x in (k_pad, v_pad)]
  out_shape = [dq] + dkdv
  aliases = {}
  for out, use in enumerate((atomic_dq, atomic, atomic)):
    if use:
      aliases[len(args)] = out
      args.append(jnp.zeros(out_shape[out].shape, _F32))
  dq_out, dk, dv = pl.pallas_call(
      kernel, grid=(B * G * M,), out_shape=tuple(out_shape), input_output_aliases=aliases,
      interpret=interpret,
      compiler_params=_compiler_params(interpret, KEY_NUM_WARPS, "KEY_BWD_NUM_STAGES"),
  )(*args)
  if not atomic:
    dk, dv = sum_item_partials((dk, dv), blk_BGM, posrow, J)
  if atomic_dq:
    dq_BTGRD = dq_out[:, :-1].reshape(B, T, G, R, D)
  else:  # the K slot contributions of every (token, group), gathered from the item rows
    gathered = _gather_slots(dq_out.reshape(B, G, M * U * C, R, D), padpos_BGTK, 0.0)
    dq_BTGRD = jnp.sum(gathered.astype(_F32), axis=3).transpose(0, 2, 1, 3, 4)
  return (dq_BTGRD.astype(q_BTGRD.dtype), dk[:, :S].astype(k_BSGD.dtype),
          dv[:, :S].astype(v_BSGD.dtype), None, None)


def sum_item_partials(parts: tuple, blk_BGM: jax.Array, posrow_BGX: jax.Array,
                      num_blocks: int) -> tuple:
  """The key-major backward's per-item dk and dv partials (each [B,G,M,L,D]) summed per
  selection block in float32 -> each [B, J*L, G, D], from the item plan's blocks
  (non-decreasing along M, as the plan sorts them) and row positions (``posrow_BGX``, see
  :func:`_keyblock_plan`); a dead item (no real row: empty, past the end) adds nothing.

  A segment sum, not declared sorted although the live items are. H200, 32 x 2048, one sum of
  [B*G*M, L, D] at the paper's geometry (32/16/64/16/512, about 50 items of 16 tokens a
  block): 23 ms declared sorted (19.6 ms with the dead items dropped too), 1.1 ms not, 0.8 ms
  not and the dead items (a quarter of the static item count, all on the last block) sent to
  one extra segment that is dropped, as here; at arc1's (16 a block) 0.22 ms sorted against
  0.26 ms, within run-to-run noise. Why the sorted scatter is slow there is not pinned down
  (docs/bench/nsa_segment_sum_h200_2026-12-02.json). A dead item's partial is zero anyway.
  A Pallas kernel walking each block's run of items (one program per (block, example,
  group)) measured slower at every setting tried (H200, 32 x 2048, both sums: 0.79-1.01 ms
  against 0.48-0.49; docs/bench/nsa_dkdv_sum_*_h200_2026-12-0[23].json) and was removed in
  session 26."""
  B, G, M, L, D = parts[0].shape
  J = num_blocks
  live_BGM = jnp.any(posrow_BGX.reshape(B, G, M, -1) >= 0, axis=-1)
  seg = (jnp.arange(B * G, dtype=jnp.int32)[:, None] * J + blk_BGM.reshape(B * G, M))
  seg = jnp.where(live_BGM.reshape(B * G, M), seg, B * G * J).reshape(-1)
  sums = tuple(jax.ops.segment_sum(p.reshape(B * G * M, L, D).astype(_F32), seg,
                                   num_segments=B * G * J + 1)[:-1] for p in parts)
  return tuple(x.reshape(B, G, J * L, D).transpose(0, 2, 1, 3) for x in sums)


def _gather_slots(x_BGY, padpos_BGTK, fill):
  """Per-item-row values [B,G,M*C,...] (C: the plan's tokens an item) -> [B,G,T,K,...] at
  each (token, slot)'s item row, ``fill`` for unused slots."""
  got = jax.vmap(jax.vmap(lambda d, i: d[i]))(x_BGY, jnp.maximum(padpos_BGTK, 0))
  used = (padpos_BGTK >= 0).reshape(padpos_BGTK.shape + (1,) * (x_BGY.ndim - 3))
  return jnp.where(used, got, fill)


def _selected_fwd_key_kernel(q_ref, k_ref, v_ref, qrow_ref, posrow_ref, blk_ref, o_ref,
                             lse_ref, *, num_groups: int, num_items: int, rows: int,
                             chunks: int, select_len: int, scale: float):
  """One item: each live chunk's rows attend to the item's one block, normalised within the
  block; the rows' log-sum-exp over it (``_NEG`` for padding rows, which see no key)."""
  pid = pl.program_id(0)
  m = jax.lax.rem(pid, num_items)
  bg = jax.lax.div(pid, num_items)
  b, g = jax.lax.div(bg, num_groups), jax.lax.rem(bg, num_groups)
  start = blk_ref[b, g, m] * select_len
  k_LD = k_ref[b, pl.ds(start, select_len), g, :]
  v_LD = v_ref[b, pl.ds(start, select_len), g, :]
  keypos_L = start + jax.lax.broadcasted_iota(jnp.int32, (select_len,), 0)

  def chunk(c, carry):
    row0 = (m * chunks + c) * rows
    qrow_X = qrow_ref[b, g, pl.ds(row0, rows)]
    pos_X = posrow_ref[b, g, pl.ds(row0, rows)]
    q_XD = q_ref[b, qrow_X, :]
    ok_XL = keypos_L[None, :] <= pos_X[:, None]
    logits_XL = jnp.where(ok_XL, _mm(q_XD, k_LD, trans_b=True) * scale, _NEG)
    m_X = jnp.max(logits_XL, axis=1)
    p_XL = jnp.where(ok_XL, jnp.exp(logits_XL - m_X[:, None]), 0.0)
    l_X = jnp.sum(p_XL, axis=1)
    seen_X = l_X > 0
    acc_XD = _mm(p_XL.astype(v_LD.dtype), v_LD)
    o_ref[b, g, pl.ds(row0, rows), :] = (acc_XD / jnp.where(seen_X, l_X, 1.0)[:, None]
                                         ).astype(o_ref.dtype)
    lse_ref[b, g, pl.ds(row0, rows)] = jnp.where(
        seen_X, m_X + jnp.log(jnp.where(seen_X, l_X, 1.0)), _NEG)
    return carry

  if chunks == 1:
    chunk(0, 0)
  else:  # the live chunks only
    jax.lax.fori_loop(0, _live_chunks(posrow_ref, b, g, m, rows, chunks), chunk, 0)


# The selected branch's partials, each float32 ("float32") or the inputs' dtype ("input":
# bfloat16 in training, half the bytes its kernel writes and XLA reads back): the key-major
# forward's per-block partial outputs (combined by their log-sum-exps in float32), and the
# key-major backward's dq (one [R, D] set per (token, slot), gathered and summed over the K
# slots) and dk/dv (one [L, D] per item, summed per block by sum_item_partials). Each partial
# is rounded once before its float32 sum, so a result moves by at most 2^-8 of the sum of its
# partials' magnitudes (the forward's output by 2^-8 of the largest value); with bfloat16
# inputs the kernels' products already round p and ds to bfloat16.
# In float32 the XLA glue was a large part of the layer (H100, arc1 layer at 8 x 8192,
# train.bench --only layers --profile: the forward's combination 213 us, the dq gather and sum
# 218 us, the dk/dv segment sums 71 us, of 4.89 ms of kernels; the same at 32 x 2048).
# All three in bfloat16 against float32 (H100, jax 0.11.2, 2026-12-06, one process each,
# docs/bench/*_h100_2026-12-06*.json): nsa_core forward+backward 4.55 -> 4.14 ms at 8 x 8192
# (cuDNN full attention 4.96), 3.46 -> 3.25 at 32 x 2048 (dq alone 4.32 / 3.51, the forward
# alone 4.46 / 3.44); the layer back to back 4.90 -> 4.57 ms at 8 x 8192 (the cuDNN GQA layer
# 4.76 / 4.69: 1.03x -> 0.97x), 3.87 -> 3.59 at 32 x 2048 (2.20x -> 2.07x); the arc1 training
# step at the SDL target's routing 49.5 -> 47.8 ms back to back (packed rows 49.1 -> 45.6), one
# step at a time 56.1 -> 52.5. (The forward's alone had timed at noise level at the step:
# docs/bench/train_fwd_partials_h100_2026-12-05.json.)
FWD_PARTIAL_DTYPE = "input"
DQ_PARTIAL_DTYPE = "input"
DKDV_PARTIAL_DTYPE = "input"
# What the training kernels return, float32 ("float32", before session 31) or the inputs'
# dtype ("input"): the selected and window branches' outputs [B,T,G,R,D] (the selected one
# after its float32 combination, each rounded once) and the window's dq, dk, dv (accumulated
# in float32 in the kernel, rounded once when written; the selected backward's already came
# back in the inputs' dtype). In bfloat16 training each output is then written and read back
# (the gates' sum, the gates' and the backward's delta reductions) in half the bytes, and
# nsa's compressed branch keeps cuDNN's output dtype too (nsa._compressed_folded); the gated
# sum of the three stays float32. Rounding a branch's output moves it by at most 2^-8 of its
# largest value, as the layer's own bfloat16 output rounding does; its cotangent then comes
# back in bfloat16 too, so the backward's delta = sum(do * out) reads both rounded (its dp
# already read the rounded do). H100, jax 0.11.2, session 31, the arc1 NSA layer back to back
# with the session's three-product projections (train.nsa_kernel_check variants proj_three
# against before_s31, one process): 3.50 / 3.60 against 3.55 / 3.54 ms at 32 x 2048, 4.56 /
# 4.54 against 4.61 / 4.60 at 8 x 8192 (with attention.nsa.FUSED_INPUT_PROJECTION, both:
# docs/benchmarks.md session 31).
BRANCH_OUT_DTYPE = "input"
# An optimization barrier after the selected forward's combination (session 31): without it
# XLA wrote the combination in float32 and put the rounding to BRANCH_OUT_DTYPE in each
# consumer (sm_90 HLO). False restores the former (train.nsa_kernel_check variant
# no_sel_barrier).
SELECTED_COMBINE_BARRIER = True


def _partial_dtype(setting: str, input_dtype):
  """The dtype the module setting ``setting`` (one of the *_PARTIAL_DTYPE, or
  BRANCH_OUT_DTYPE) names for inputs of ``input_dtype``."""
  how = globals()[setting]
  if how not in ("float32", "input"):
    raise ValueError(f"nsa_pallas.{setting} must be 'float32' or 'input', got {how!r}")
  return _F32 if how == "float32" else input_dtype


def branch_out_dtype(input_dtype):
  """The dtype of the training kernels' outputs for inputs of ``input_dtype``
  (BRANCH_OUT_DTYPE)."""
  return _partial_dtype("BRANCH_OUT_DTYPE", input_dtype)


def _selected_forward_keyblock(q_BTGRD, k_BSGD, v_BSGD, plan, select_len, interpret):
  """Key-major forward over the items of ``plan`` (:func:`_keyblock_plan`): each item's
  per-block partial output and log-sum-exp, then per (token, head) the K partials combined
  by their log-sum-exps (in XLA, float32). Output [B,T,G,R,D] (BRANCH_OUT_DTYPE) and
  log-sum-exp [B,T,G,R] float32."""
  qrow, posrow, blk_BGM, padpos_BGTK = plan
  B, T, G, R, D = q_BTGRD.shape
  C, U, L = KEY_CHUNK, ITEM_CHUNKS, select_len
  M = blk_BGM.shape[-1]
  X = C * R
  assert qrow.shape[-1] == M * U * X, "the plan was made with other item settings"
  kernel = functools.partial(_selected_fwd_key_kernel, num_groups=G, num_items=M, rows=X,
                             chunks=U, select_len=L, scale=1.0 / math.sqrt(D))
  o_BGXD, lse_BGX = pl.pallas_call(
      kernel, grid=(B * G * M,),
      out_shape=(jax.ShapeDtypeStruct((B, G, M * U * X, D),
                                      _partial_dtype("FWD_PARTIAL_DTYPE", q_BTGRD.dtype)),
                 jax.ShapeDtypeStruct((B, G, M * U * X), _F32)),
      interpret=interpret,
      compiler_params=_compiler_params(interpret, KEY_NUM_WARPS, "KEY_FWD_NUM_STAGES"),
  )(q_BTGRD.reshape(B, T * G * R, D), _pad_keys(k_BSGD, L), _pad_keys(v_BSGD, L), qrow,
    posrow, blk_BGM)
  o_BGTKRD = _gather_slots(o_BGXD.reshape(B, G, M * U * C, R, D), padpos_BGTK, 0.0)
  lse_BGTKR = _gather_slots(lse_BGX.reshape(B, G, M * U * C, R), padpos_BGTK, _NEG)
  # Every (token, head) sees at least its own key (its block is always chosen).
  lse_BGTR = jax.nn.logsumexp(lse_BGTKR, axis=3)
  w_BGTKR = jnp.exp(lse_BGTKR - lse_BGTR[:, :, :, None])
  out_BGTRD = jnp.sum(w_BGTKR[..., None] * o_BGTKRD.astype(_F32), axis=3)
  out_BTGRD = out_BGTRD.astype(branch_out_dtype(q_BTGRD.dtype)).transpose(0, 2, 1, 3, 4)
  if SELECTED_COMBINE_BARRIER:  # XLA writes the combination in its output dtype
    out_BTGRD = jax.lax.optimization_barrier(out_BTGRD)
  return out_BTGRD, lse_BGTR.transpose(0, 2, 1, 3)


selected_attention.defvjp(_selected_vjp_fwd, _selected_vjp_bwd)


# ---------------------------------------------------------------- block choice
#
# The selection blocks' importances (eq. 9-10) and the choice (eq. 11) for rows from position 0
# (in packed rows each query's sequence start bounds what it sees), from the compressed keys
# alone: p_i = softmax_i(q.k_i / sqrt(D)) over the visible
# compression blocks, summed over the GQA group's R heads, then over the compression blocks
# overlapping each selection block; then the forced blocks and the top candidates. One program
# per (example, group, tile of CHOICE_TOKENS queries) walks the compression blocks in tiles of
# CHOICE_SEL_TILE selection blocks' worth, up to the tile's last candidate, twice: once for
# each head's float32 log-sum-exp (online), once for the probabilities. No [B,T,H,N]
# probabilities are stored; the program keeps a running top-k and writes only the chosen
# blocks (or, for tests, the [B,T,G,J] scores). In long rows the tiles that every query of the
# program sees in full skip the masks (CHOICE_INTERIOR_MIN_TILES).
#
# The overlap sum is two small products per tile, each term exact (CHOICE_OVERLAP_PRECISION:
# three bfloat16 parts of the probabilities, or float32 products), summed in float32:
# compression blocks starting in this tile's key range against a static [Nt, Js] 0/1 matrix,
# and those starting in the previous tile (a block that starts near a tile's end reaches into
# the next one) against a second: that product is computed in the previous tile and carried
# to this one, [Q, Js]. Both matrices are the same for every tile, which needs
# ``select_len`` to be a multiple of ``block_stride`` (``block_choice_supported``).
#
# The running top-k: each tile's keys (forced blocks _FORCED, candidates their score, others
# _NEG) are merged with the k kept so far by k rounds of "take the larger head of the two
# lists"; equal keys go to the lower block index (the kept list, from earlier tiles, first),
# as ``lax.top_k`` orders them. The scores are summed in another order than
# ``nsa.selection_scores`` (a tile's first block adds the previous tile's spill last), so two
# scores equal there may differ in the last bit here and a near-tie may swap: the chosen
# blocks then have equal reference scores.

CHOICE_TOKENS = 64     # queries per program (the rows of its products)
CHOICE_SEL_TILE = 16   # selection blocks per tile of the walk
CHOICE_NUM_WARPS = 4
# The overlap sums' products (probabilities against 0/1 matrices). "bf16x3" (the default,
# _overlap_dot): three bfloat16 parts of the probabilities on tensor cores, each product exact,
# the sums within float32 rounding of the exact ones (the same class of difference as the
# kernel's other summation order, above). HIGHEST: exact float32 products (on CUDA cores on a
# GPU). HIGH or DEFAULT lower to one TF32 pass, which rounds the probabilities to about 1e-3
# and changed choices on an H200 (float32 check: loss error 5e-4 against 1e-6). H100, jax
# 0.11.2, 2026-12-05, nsa_core forward+backward (train.nsa_kernel_check --variants
# choice_bf16x3, against HIGHEST in the same call): 4.46 against 5.02 ms and 4.39 against
# 4.86 at 1 x 32768 (2.05x cuDNN's speed against 1.82x), 4.60 against 4.66 at 8 x 8192, 3.45
# / 3.58 and 3.63 / 3.63 at 32 x 2048 (docs/bench/nsa_choice_*_h100_2026-12-05.json; session
# 23 at 32 x 2048: 4.19 against 4.02, the kernel alone 0.546 against 0.629 ms).
CHOICE_OVERLAP_PRECISION = "bf16x3"
# Programs of the last query tiles (the longest walks) first within each (example, group):
# the choice at 1 x 32768 on an H200 2.61 -> 2.25 ms (train.nsa_kernel_check --variants
# choice_short_first); no change at 32 x 2048, where the (example, group) order dominates.
CHOICE_LONG_FIRST = True
# Program order: "tile" ((example, group) pairs innermost: with CHOICE_LONG_FIRST every pair's
# longest query tile before any shorter one) or "group" (query tiles innermost: each pair's
# tiles together). H200, the choice alone (train.nsa_kernel_check --breakdown --variants
# choice_group_order, 2026-12-01): 0.60 against 0.64 ms at 32 x 2048, 1.27 against 1.46 ms at
# 8 x 8192.
CHOICE_ORDER = "tile"
# From this many tiles of selection blocks in the keys (ceil(J / CHOICE_SEL_TILE), J the
# selection blocks of the key length) on, the tiles every query of a program sees in full are
# walked without the visibility masks (three loops: masked, unmasked, masked; the same values,
# tested bit for bit in interpret mode, within float32 rounding on a GPU should the compiler
# fuse the unmasked products differently; the kernel compiles in about 6 s instead of 2); fewer
# mask every tile. H200, jax 0.11.2, 2026-12-05, the choice alone in three processes of two
# calls (train.nsa_kernel_check --breakdown, variants choice_interior / choice_masked): 4
# tiles (32 x 2048) 0.575 / 0.546 / 0.595 ms unmasked against 0.467 / 0.469 / 0.422 masked;
# 16 (8 x 8192) 1.09 / 0.94 against 0.93 / 1.27; 64 (1 x 32768) 1.55 / 1.63 / 1.92 against
# 1.76 / 1.83 / 1.74, and nsa_core there 4.41 / 4.40 / 4.44 against 4.51 / 4.63 / 4.63
# (docs/bench/nsa_choice_interior*_h200_2026-12-05.json).
CHOICE_INTERIOR_MIN_TILES = 32
_FORCED = 1e30         # key of a forced block (scores are sums of probabilities: <= R)
_USED = -3e38          # key of an entry already taken in the merge


def _overlap_dot(p_QN, m_NJ):
  """``p_QN @ m_NJ`` (float32 probabilities against a 0/1 matrix) at
  CHOICE_OVERLAP_PRECISION; "bf16x3": the probabilities split into three bfloat16 parts
  (hi + mid + lo, within float32 rounding of p) on tensor cores, each product exact (the
  matrix is 0/1), the sums in float32."""
  if CHOICE_OVERLAP_PRECISION != "bf16x3":
    return jax.lax.dot(p_QN, m_NJ, precision=CHOICE_OVERLAP_PRECISION,
                       preferred_element_type=_F32)
  m_NJ = m_NJ.astype(jnp.bfloat16)
  hi, mid, lo = bf16_parts(p_QN)
  return (jax.lax.dot(hi, m_NJ, preferred_element_type=_F32)
          + jax.lax.dot(mid, m_NJ, preferred_element_type=_F32)
          + jax.lax.dot(lo, m_NJ, preferred_element_type=_F32))


def bf16_parts(x):
  """float32 ``x`` as three bfloat16 parts (hi, mid, lo) whose float32 sum is within float32
  rounding of x."""
  bf = jnp.bfloat16
  hi = x.astype(bf)
  rest = x - hi.astype(_F32)
  mid = rest.astype(bf)
  return hi, mid, (rest - mid.astype(_F32)).astype(bf)


def block_choice_supported(*, block_len: int, block_stride: int, select_len: int) -> bool:
  """Whether :func:`block_choice` serves this geometry (on GPU the tiles must also be powers
  of two: ``select_len // block_stride`` is)."""
  if select_len % block_stride:
    return False
  per = select_len // block_stride
  if jax.default_backend() == "gpu" and not _is_pow2(per):
    return False
  return block_len - block_stride <= CHOICE_SEL_TILE * select_len


def _overlap_tiles(block_len: int, block_stride: int, select_len: int,
                   Js: int | None = None) -> jax.Array:
  """float32 [2, Nt, Js]: ``[0]`` whether compression block ``i`` of a tile (of ``Js``
  selection blocks, default CHOICE_SEL_TILE) overlaps selection block ``j`` of the same tile,
  ``[1]`` of the next tile (Nt = Js * select_len / stride)."""
  Js = Js or CHOICE_SEL_TILE
  return jnp.stack([_overlap(block_len, block_stride, select_len, Js, shift)
                    for shift in (0, 1)])


def _overlap(block_len: int, block_stride: int, select_len: int, Js: int, shift: int):
  """float32 [Nt, Js]: whether compression block ``i`` of a tile overlaps selection block
  ``j`` of the tile ``shift`` (0 or 1) tiles later (iotas only: also inside a kernel)."""
  Nt = Js * select_len // block_stride
  start_i = jax.lax.broadcasted_iota(jnp.int32, (Nt, Js), 0) * block_stride
  start_j = (jax.lax.broadcasted_iota(jnp.int32, (Nt, Js), 1) + shift * Js) * select_len
  return ((start_i < start_j + select_len) & (start_j < start_i + block_len)).astype(_F32)


def _merge_top(val_QK, idx_QK, key_QJ, blk_QJ, num_select: int):
  """The ``num_select`` largest of two key lists (kept [Q,K], new tile [Q,Js]), ties to the
  kept list and then to the lower block index; the result's unfilled slots keep _NEG."""
  big = jnp.int32(2**30)
  slot_QK = jax.lax.broadcasted_iota(jnp.int32, val_QK.shape, 1)
  new_v = jnp.full(val_QK.shape, _NEG, _F32)
  new_i = jnp.full(idx_QK.shape, -1, jnp.int32)
  for i in range(num_select):
    ma_Q = jnp.max(val_QK, axis=1)
    mb_Q = jnp.max(key_QJ, axis=1)
    ia_Q = jnp.min(jnp.where(val_QK == ma_Q[:, None], idx_QK, big), axis=1)
    ib_Q = jnp.min(jnp.where(key_QJ == mb_Q[:, None], blk_QJ, big), axis=1)
    kept_Q = ma_Q >= mb_Q
    v_Q = jnp.where(kept_Q, ma_Q, mb_Q)
    b_Q = jnp.where(kept_Q, ia_Q, ib_Q)
    new_v = jnp.where(slot_QK == i, v_Q[:, None], new_v)
    new_i = jnp.where(slot_QK == i, b_Q[:, None], new_i)
    val_QK = jnp.where(kept_Q[:, None] & (idx_QK == ia_Q[:, None]), _USED, val_QK)
    key_QJ = jnp.where(~kept_Q[:, None] & (blk_QJ == ib_Q[:, None]), _USED, key_QJ)
  return new_v, new_i


def _ranked_top(key_J, blk_J, slots: int, num_select: int):
  """:func:`_top_of_tile` of one row ([Js] keys) by ranks, not picks: each key's rank (how
  many keys come before it: larger, or equal at a lower block) in one reduction, then slot k
  takes the key of rank k (two more); the same blocks in the same slots. Returns the slots'
  values and blocks [1, slots] (values _NEG past num_select or past the tile's keys)."""
  before_IJ = ((key_J[:, None] > key_J[None, :])
               | ((key_J[:, None] == key_J[None, :]) & (blk_J[:, None] < blk_J[None, :])))
  rank_J = jnp.sum(before_IJ.astype(jnp.int32), axis=0)
  slot_K = jax.lax.broadcasted_iota(jnp.int32, (slots, key_J.shape[0]), 0)
  hit_KJ = rank_J[None, :] == slot_K
  val_K = jnp.max(jnp.where(hit_KJ, key_J[None, :], _NEG), axis=1)
  idx_K = jnp.max(jnp.where(hit_KJ, blk_J[None, :], -1), axis=1)
  slot_1K = jax.lax.broadcasted_iota(jnp.int32, (1, slots), 1)
  return jnp.where(slot_1K < num_select, val_K[None, :], _NEG), idx_K[None, :]


def _top_of_tile(key_QJ, blk_QJ, val_QK, idx_QK, num_select: int):
  """:func:`_merge_top` of an empty kept list (every value _NEG): the ``num_select`` largest
  keys of the tile, ties to the lower block index; where fewer than ``num_select`` exceed _NEG
  the remaining slots' values are _NEG (as the merge's, whose blocks there differ but are
  dropped with their values)."""
  big = jnp.int32(2**30)
  slot_QK = jax.lax.broadcasted_iota(jnp.int32, val_QK.shape, 1)
  for i in range(num_select):
    m_Q = jnp.max(key_QJ, axis=1)
    b_Q = jnp.min(jnp.where(key_QJ == m_Q[:, None], blk_QJ, big), axis=1)
    val_QK = jnp.where(slot_QK == i, jnp.maximum(m_Q, _NEG)[:, None], val_QK)
    idx_QK = jnp.where(slot_QK == i, b_Q[:, None], idx_QK)
    key_QJ = jnp.where(blk_QJ == b_Q[:, None], _USED, key_QJ)
  return val_QK, idx_QK


def _block_choice_kernel(q_ref, k_ref, pos_ref, lo_ref, ovl_ref, o_ref, *, num_groups: int,
                         num_token_tiles: int, num_tiles: int, heads: int, block_len: int,
                         block_stride: int, select_len: int, num_select: int, scale: float,
                         topk: bool, interior: bool):
  Q, Js = CHOICE_TOKENS, CHOICE_SEL_TILE
  Nt = Js * select_len // block_stride
  pid = pl.program_id(0)
  if CHOICE_ORDER == "tile":
    num_bg = pl.num_programs(0) // num_token_tiles
    tt, bg = jax.lax.div(pid, num_bg), jax.lax.rem(pid, num_bg)
  else:
    tt, bg = jax.lax.rem(pid, num_token_tiles), jax.lax.div(pid, num_token_tiles)
  if CHOICE_LONG_FIRST:  # the last query tiles walk the most blocks: launch them first
    tt = num_token_tiles - 1 - tt
  b, g = jax.lax.div(bg, num_groups), jax.lax.rem(bg, num_groups)
  t0 = tt * Q
  pos_Q = pos_ref[b, pl.ds(t0, Q)]
  lo_Q = lo_ref[b, pl.ds(t0, Q)]
  q_rQD = [q_ref[b, pl.ds(t0, Q), g, r, :] for r in range(heads)]
  same_NJ, next_NJ = ovl_ref[0], ovl_ref[1]
  # Tiles from the one holding the tile's first candidate block (its sequence's first block,
  # lo // select_len) up to the one holding its last (pos // select_len). The blocks of the
  # tile before the first reach into it only from before every lo: invisible, so the walk's
  # spill starts at zero.
  n = jnp.minimum(jax.lax.div(jnp.maximum(jnp.max(pos_Q), 0), select_len * Js) + 1, num_tiles)
  n0 = jnp.minimum(jax.lax.div(jnp.min(lo_Q), select_len * Js), n)
  # Tiles [a, z) are visible to every query of the program (their keys start at or after the
  # largest lo and their last block ends by the smallest position; padding rows, pos -1, leave
  # none): walked without masks where ``interior`` (CHOICE_INTERIOR_MIN_TILES). The walk is
  # [n0, a) masked, [a, z) not, [z, n) masked: the same tiles in the same order.
  span = select_len * Js
  a, z = n0, n0
  if interior:
    a = jnp.clip(jax.lax.div(jnp.max(lo_Q) + span - 1, span), n0, n)
    z = jnp.clip(jax.lax.div(jnp.maximum(jnp.min(pos_Q) - block_len + 1 + block_stride, 0),
                             span), a, n)

  def tile_keys(jt, masked: bool):
    """Tile ``jt``'s keys [Nt, D] and visibility [Q, Nt] (None: every key visible)."""
    i0 = jt * Nt
    k_ND = k_ref[b, pl.ds(i0, Nt), g, :]
    if not masked:
      return k_ND, None
    first_key_N = (i0 + jax.lax.broadcasted_iota(jnp.int32, (Nt,), 0)) * block_stride
    vis_QN = ((first_key_N[None, :] + (block_len - 1) <= pos_Q[:, None])
              & (first_key_N[None, :] >= lo_Q[:, None]))
    return k_ND, vis_QN

  def head_logits(r, k_ND, vis_QN):
    # One head at a time: R [Q, Nt] float32 tiles alive at once would spill registers.
    logits_QN = _mm(q_rQD[r], k_ND, trans_b=True) * scale
    return logits_QN if vis_QN is None else jnp.where(vis_QN, logits_QN, _NEG)

  def visible(vis_QN, x_QN):
    return x_QN if vis_QN is None else jnp.where(vis_QN, x_QN, 0.0)

  def walk(body, init):
    """``body(jt, carry, masked)`` over tiles n0..n-1 in order, masked outside [a, z)."""
    carry = jax.lax.fori_loop(n0, a, functools.partial(body, masked=True), init)
    carry = jax.lax.fori_loop(a, z, functools.partial(body, masked=False), carry)
    return jax.lax.fori_loop(z, n, functools.partial(body, masked=True), carry)

  def lse_tile(jt, carry, masked):
    k_ND, vis_QN = tile_keys(jt, masked)
    out = []
    for r in range(heads):
      logits_QN = head_logits(r, k_ND, vis_QN)
      m_Q, l_Q = carry[2 * r], carry[2 * r + 1]
      m_new = jnp.maximum(m_Q, jnp.max(logits_QN, axis=1))
      p_QN = visible(vis_QN, jnp.exp(logits_QN - m_new[:, None]))
      out += [m_new, l_Q * jnp.exp(m_Q - m_new) + jnp.sum(p_QN, axis=1)]
    return tuple(out)

  init = tuple(jnp.full((Q,), _NEG, _F32) if i % 2 == 0 else jnp.zeros((Q,), _F32)
               for i in range(2 * heads))
  ml = walk(lse_tile, init)
  # Rows that see no block keep l = 0; their logits are all masked, so any lse does.
  lse_rQ = [ml[2 * r] + jnp.log(jnp.maximum(ml[2 * r + 1], 1e-30)) for r in range(heads)]
  cur_Q = jax.lax.div(jnp.maximum(pos_Q, 0), select_len)
  first_Q = jax.lax.div(lo_Q, select_len)

  def score_tile(jt, carry, masked):
    # carry[0]: the previous tile's blocks' overlap with this tile's selection blocks (the
    # spill, [Q, Js]: kept instead of the previous tile's [Q, Nt] probabilities).
    k_ND, vis_QN = tile_keys(jt, masked)
    p_QN = jnp.zeros((Q, Nt), _F32)
    for r in range(heads):
      p_QN += visible(vis_QN, jnp.exp(head_logits(r, k_ND, vis_QN) - lse_rQ[r][:, None]))
    s_QJ = _overlap_dot(p_QN, same_NJ) + carry[0]
    spill_QJ = _overlap_dot(p_QN, next_NJ)
    if not topk:
      o_ref[b, pl.ds(t0, Q), g, pl.ds(jt * Js, Js)] = s_QJ
      return (spill_QJ,)
    blk_QJ = jt * Js + jax.lax.broadcasted_iota(jnp.int32, (Q, Js), 1)
    cand = (blk_QJ <= cur_Q[:, None]) & (blk_QJ >= first_Q[:, None]) & (pos_Q[:, None] >= 0)
    forced = cand & ((blk_QJ == first_Q[:, None]) | (blk_QJ == cur_Q[:, None])
                     | (blk_QJ == cur_Q[:, None] - 1))
    key_QJ = jnp.where(forced, _FORCED, jnp.where(cand, s_QJ, _NEG))
    val_QK, idx_QK = _merge_top(carry[1], carry[2], key_QJ, blk_QJ, num_select)
    return spill_QJ, val_QK, idx_QK

  Kp = o_ref.shape[-1]
  init = (jnp.zeros((Q, Js), _F32),)
  if topk:
    init += (jnp.full((Q, Kp), _NEG, _F32), jnp.full((Q, Kp), -1, jnp.int32))
  out = walk(score_tile, init)
  if topk:
    val_QK, idx_QK = out[1], out[2]
    o_ref[b, pl.ds(t0, Q), g, :] = jnp.where(val_QK > 0.5 * _NEG, idx_QK, -1)
    return

  def zero(jt, carry):
    o_ref[b, pl.ds(t0, Q), g, pl.ds(jt * Js, Js)] = jnp.zeros((Q, Js), _F32)
    return carry

  jax.lax.fori_loop(0, n0, zero, 0)
  jax.lax.fori_loop(n, num_tiles, zero, 0)


def block_choice(q_BTGRD: jax.Array, k_cmp_BNGD: jax.Array, pos_BT: jax.Array,
                 lo_BT: jax.Array | None = None, *, num_sel: int, block_len: int,
                 block_stride: int, select_len: int, num_select: int, interpret: bool,
                 scores: bool = False) -> jax.Array:
  """The selection blocks [B,T,G,num_select] int32 of queries at positions ``pos_BT``, ``-1``
  for unused slots, as ``nsa.select_blocks`` chooses them from ``nsa.selection_scores`` of the
  compressed branch's probabilities; forced blocks first, then candidates by decreasing score.

  Args:
    q_BTGRD: the compressed branch's queries [B,T,G,R,D].
    k_cmp_BNGD: compressed keys [B,N,G,D].
    pos_BT: int32 query positions.
    lo_BT: packed rows: int [B,T], the start of each query's sequence (a multiple of
      ``select_len`` and ``block_stride``); blocks before it are neither visible nor
      candidates, and its block is forced in block 0's place. Default: one sequence a row.
    num_sel: J, the number of selection blocks.
    scores: return the importances [B,T,G,J] float32 instead (zero past each query's
      candidates; for tests).
  Needs :func:`block_choice_supported`. Forward only (the choice carries no gradient).
  """
  if not isinstance(CHOICE_INTERIOR_MIN_TILES, int) or CHOICE_INTERIOR_MIN_TILES < 0:
    raise ValueError("nsa_pallas.CHOICE_INTERIOR_MIN_TILES must be an int >= 0, got "
                     f"{CHOICE_INTERIOR_MIN_TILES!r}")
  B, T, G, R, D = q_BTGRD.shape
  Q, Js = CHOICE_TOKENS, CHOICE_SEL_TILE
  Nt = Js * select_len // block_stride
  nq = -(-T // Q)
  nj = -(-num_sel // Js)
  Tp = nq * Q
  Kp = _pow2_at_least(num_select)  # a power of two for the Triton tiles
  q = jnp.pad(q_BTGRD, [(0, 0), (0, Tp - T)] + [(0, 0)] * 3)
  pos = jnp.pad(pos_BT.astype(jnp.int32), [(0, 0), (0, Tp - T)], constant_values=-1)
  lo = (jnp.zeros((B, Tp), jnp.int32) if lo_BT is None
        else jnp.pad(lo_BT.astype(jnp.int32), [(0, 0), (0, Tp - T)], mode="edge"))
  N = k_cmp_BNGD.shape[1]
  k = jnp.pad(k_cmp_BNGD, [(0, 0), (0, max(0, nj * Nt - N)), (0, 0), (0, 0)])[:, :nj * Nt]
  kernel = functools.partial(
      _block_choice_kernel, num_groups=G, num_token_tiles=nq, num_tiles=nj, heads=R,
      block_len=block_len, block_stride=block_stride, select_len=select_len,
      num_select=num_select, scale=1.0 / math.sqrt(D), topk=not scores,
      interior=nj >= CHOICE_INTERIOR_MIN_TILES)
  out_shape = (jax.ShapeDtypeStruct((B, Tp, G, nj * Js), _F32) if scores
               else jax.ShapeDtypeStruct((B, Tp, G, Kp), jnp.int32))
  out = pl.pallas_call(
      kernel, grid=(B * G * nq,), out_shape=out_shape,
      interpret=interpret, compiler_params=_compiler_params(interpret, CHOICE_NUM_WARPS,
                                                          "CHOICE_NUM_STAGES"),
  )(q, k, pos, lo, _overlap_tiles(block_len, block_stride, select_len))
  return out[:, :T, :, :num_sel] if scores else out[:, :T, :, :num_select]


# ------------------------------------------------------------------------------------------
# Window branch: sliding-window attention of queries at positions 0..T-1 over T keys.
#
# cuDNN's sliding-window attention (jax.nn.dot_product_attention with local_window_size) took
# 0.95 ms fwd+bwd at arc1's 32 x 2048 (window 128) and, for packed rows, needs the segments as
# a [B,1,T,T] mask (over PALLAS_MASK_ELEMS: the chunked band attention). Here one program per
# (example, tile of WIN_TILE queries, P query heads of a KV group) walks the few key tiles of
# its band with an online softmax, the P heads' rows stacked into one [WIN_TILE * P, D] tile;
# packed rows mask the keys before each query's sequence start (``lo``) instead of reading a
# mask. The backward pass is two kernels without atomics: dq (the same walk), and dk/dv per
# (example, group, run of WIN_DKDV_KEYS keys: one key tile by default), walking the query
# tiles that see it, P heads at a time.

WIN_TILE = 32          # queries per program, and keys per step of the walk
WIN_NUM_WARPS = 4
WIN_GROUP_HEADS = True  # P: all R heads of a KV group in one program (True), or one (False)
# The window's dk/dv kernel: keys per program (None: WIN_TILE; else a power-of-two multiple of
# it, the keys and values padded to whole runs) and whether its tiles are held as [keys,
# rows] (True) rather than [rows, keys]. Its dk and dv products have as many rows as the
# program has keys, and Hopper's wgmma takes 64 or more. train.kernel_count --ptx 32x2048
# (deviceless sm_90, session 26; docs/bench/nsa_kernel_ptx_sm90_2026-12-05.json): at 32 keys
# both run on mma.sync (64 instructions, 8 wgmma, 36 barriers) and the kernel spills (255
# registers, 84 bytes); at 64 keys every product is on wgmma (24), 225 registers, no spills;
# [keys, rows] at 64 keys also drops every ldmatrix/stmatrix (255 registers, no spills, 12
# barriers); [keys, rows] spills at 32 keys (452 bytes, all mma.sync) and at 128 (1520).
# Measured (session 28, H100, train.nsa_kernel_check --variants win_dkdv64,
# win_dkdv64_keys_first; docs/bench/nsa_core_s28_h100_2026-12-06.json): the window branch's
# fwd+bwd 0.80 -> 0.63 ms at 32 x 2048 and 0.80 -> 0.65 at 8 x 8192 with 64 keys as [keys,
# rows] (0.70 / 0.72 as [rows, keys]); nsa_core 3.39 -> 3.27 ms and 4.41 -> 4.26 ms; the arc1
# layer (train.bench --only layers) 4.10 -> 3.95 ms (loop) at 32 x 2048, 5.14 -> 4.99 at 8 x
# 8192. Hence the default: 64 keys as [keys, rows]. A WIN_TILE over 64 needs WIN_DKDV_KEYS
# = None (or its multiple).
WIN_DKDV_KEYS = 64
WIN_DKDV_KEYS_FIRST = True


def _dkdv_keys(tile: int) -> int:
  """WIN_DKDV_KEYS, checked: keys per program of the window's dk/dv kernel."""
  keys = tile if WIN_DKDV_KEYS is None else WIN_DKDV_KEYS
  ok = (not isinstance(keys, bool) and isinstance(keys, numbers.Integral) and keys >= tile
        and keys % tile == 0 and _is_pow2(keys // tile))
  if not ok:
    raise ValueError(f"nsa_pallas.WIN_DKDV_KEYS must be None or a power-of-two multiple of "
                     f"WIN_TILE ({tile}), got {WIN_DKDV_KEYS!r}")
  return int(keys)


def _win_steps(window: int, tile: int, num_tiles: int) -> int:
  """Tiles of the other side a tile meets: keys of a query tile, or queries of a key tile (a
  run of several key tiles: see _window_dkdv_kernel)."""
  return min(1 + -(-(window - 1) // tile), num_tiles)


def _win_rows(x_ref, b, t0, hg, tile: int):
  """Rows of ``tile`` positions from ``t0`` of head group ``hg`` of [B,Tp,H/P,P,...] as one
  [tile * P, ...] tile (row = position * P + head)."""
  x = x_ref[b, pl.ds(t0, tile), hg]
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _win_query_rows(lo_ref, b, t0, tile: int, P: int):
  """Positions [X] and sequence starts [X] of the X = tile * P query rows from ``t0``."""
  lo_Q = lo_ref[b, pl.ds(t0, tile)]
  t_X = t0 + jax.lax.div(jax.lax.broadcasted_iota(jnp.int32, (tile * P,), 0), P)
  return t_X, jnp.broadcast_to(lo_Q[:, None], (tile, P)).reshape(tile * P)


def _win_mask(t_X, s_K, lo_X, window: int, keys_first: bool = False):
  """[X, K] ([K, X] with ``keys_first``): key s is in query t's window and not before its
  sequence's start."""
  if keys_first:
    t, s, lo = t_X[None, :], s_K[:, None], lo_X[None, :]
  else:
    t, s, lo = t_X[:, None], s_K[None, :], lo_X[:, None]
  return (s <= t) & (s > t - window) & (s >= lo)


def _win_key_tile(k_ref, v_ref, b, g, first, last, j, tile: int):
  """Keys, values [tile, D] and positions [tile] of the j-th key tile from ``first``, and
  whether it is one (past ``last`` it re-reads ``first`` and must be masked)."""
  live = first + j <= last
  s0 = jnp.where(live, first + j, first) * tile
  s_K = s0 + jax.lax.broadcasted_iota(jnp.int32, (tile,), 0)
  return k_ref[b, pl.ds(s0, tile), g, :], v_ref[b, pl.ds(s0, tile), g, :], s_K, live


def _win_query_coords(num_tiles: int, head_groups: int, per_group: int, tile: int,
                      window: int):
  """(b, head group, KV group, t0, first key tile, last key tile) of a query-tile program;
  the head groups of a tile are neighbouring programs (its key tiles stay in L2)."""
  pid = pl.program_id(0)
  hg = jax.lax.rem(pid, head_groups)
  bi = jax.lax.div(pid, head_groups)
  b, i = jax.lax.div(bi, num_tiles), jax.lax.rem(bi, num_tiles)
  t0 = i * tile
  first = jax.lax.div(jnp.maximum(t0 - window + 1, 0), tile)
  return b, hg, jax.lax.div(hg, per_group), t0, first, i


def _window_fwd_kernel(q_ref, k_ref, v_ref, lo_ref, o_ref, lse_ref, *, num_tiles: int,
                       head_groups: int, per_group: int, P: int, tile: int, window: int,
                       steps: int, scale: float):
  b, hg, g, t0, first, last = _win_query_coords(num_tiles, head_groups, per_group, tile,
                                                window)
  q_XD = _win_rows(q_ref, b, t0, hg, tile)
  t_X, lo_X = _win_query_rows(lo_ref, b, t0, tile, P)
  X, D = q_XD.shape

  def step(j, carry):
    m_X, l_X, acc_XD = carry
    k_KD, v_KD, s_K, live = _win_key_tile(k_ref, v_ref, b, g, first, last, j, tile)
    ok_XK = _win_mask(t_X, s_K, lo_X, window) & live
    logits_XK = jnp.where(ok_XK, _mm(q_XD, k_KD, trans_b=True) * scale, _NEG)
    m_new_X = jnp.maximum(m_X, jnp.max(logits_XK, axis=-1))
    alpha_X = jnp.exp(m_X - m_new_X)
    p_XK = jnp.where(ok_XK, jnp.exp(logits_XK - m_new_X[:, None]), 0.0)
    l_X = l_X * alpha_X + jnp.sum(p_XK, axis=-1)
    acc_XD = acc_XD * alpha_X[:, None] + _mm(p_XK.astype(v_KD.dtype), v_KD)
    return m_new_X, l_X, acc_XD

  init = (jnp.full((X,), _NEG, _F32), jnp.zeros((X,), _F32), jnp.zeros((X, D), _F32))
  m_X, l_X, acc_XD = jax.lax.fori_loop(0, steps, step, init)
  # Every query sees its own key (lo <= t), so l > 0.
  o_ref[b, pl.ds(t0, tile), hg] = (acc_XD / l_X[:, None]).reshape(tile, P, D).astype(
      o_ref.dtype)
  lse_ref[b, pl.ds(t0, tile), hg] = (m_X + jnp.log(l_X)).reshape(tile, P)


def _window_dq_kernel(q_ref, k_ref, v_ref, lo_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
                      num_tiles: int, head_groups: int, per_group: int, P: int, tile: int,
                      window: int, steps: int, scale: float):
  b, hg, g, t0, first, last = _win_query_coords(num_tiles, head_groups, per_group, tile,
                                                window)
  q_XD = _win_rows(q_ref, b, t0, hg, tile)
  do_XD = _win_rows(do_ref, b, t0, hg, tile)
  lse_X = _win_rows(lse_ref, b, t0, hg, tile)
  delta_X = _win_rows(delta_ref, b, t0, hg, tile)
  t_X, lo_X = _win_query_rows(lo_ref, b, t0, tile, P)

  def step(j, dq_XD):
    k_KD, v_KD, s_K, live = _win_key_tile(k_ref, v_ref, b, g, first, last, j, tile)
    ok_XK = _win_mask(t_X, s_K, lo_X, window) & live
    logits_XK = _mm(q_XD, k_KD, trans_b=True) * scale
    p_XK = jnp.where(ok_XK, jnp.exp(logits_XK - lse_X[:, None]), 0.0)
    dp_XK = _mm(do_XD, v_KD, trans_b=True)
    ds_XK = (p_XK * (dp_XK - delta_X[:, None])).astype(q_XD.dtype)
    return dq_XD + _mm(ds_XK, k_KD)

  dq_XD = jax.lax.fori_loop(0, steps, step, jnp.zeros(q_XD.shape, _F32))
  dq_ref[b, pl.ds(t0, tile), hg] = (dq_XD * scale).reshape(tile, P, -1).astype(dq_ref.dtype)


def _window_dkdv_kernel(q_ref, k_ref, v_ref, lo_ref, do_ref, lse_ref, delta_ref, dk_ref,
                        dv_ref, *, num_tiles: int, groups: int, per_group: int, P: int,
                        tile: int, window: int, steps: int, seq_len: int, scale: float,
                        keys: int, keys_first: bool):
  """One (example, KV group, run of ``keys`` keys): its dk/dv over the query tiles that see
  it, P heads at a time. ``keys_first``: the logits and their gradients held as [keys, rows]
  instead of [rows, keys], so that both dk/dv products are plain ones."""
  num_runs = -(-num_tiles * tile // keys)
  pid = pl.program_id(0)
  kt = jax.lax.rem(pid, num_runs)
  bg = jax.lax.div(pid, num_runs)
  b, g = jax.lax.div(bg, groups), jax.lax.rem(bg, groups)
  s0 = kt * keys
  k_KD = k_ref[b, pl.ds(s0, keys), g, :]
  v_KD = v_ref[b, pl.ds(s0, keys), g, :]
  s_K = s0 + jax.lax.broadcasted_iota(jnp.int32, (keys,), 0)
  first = jax.lax.div(s0, tile)
  last = jnp.minimum(jax.lax.div(s0 + keys + window - 2, tile), num_tiles - 1)

  def step(jr, carry):  # query tile first + j, head group r of this KV group
    dk_KD, dv_KD = carry
    j, r = jax.lax.div(jr, per_group), jax.lax.rem(jr, per_group)
    live = first + j <= last
    t0 = jnp.where(live, first + j, first) * tile
    hg = g * per_group + r
    q_XD = _win_rows(q_ref, b, t0, hg, tile)
    do_XD = _win_rows(do_ref, b, t0, hg, tile)
    lse_X = _win_rows(lse_ref, b, t0, hg, tile)
    delta_X = _win_rows(delta_ref, b, t0, hg, tile)
    t_X, lo_X = _win_query_rows(lo_ref, b, t0, tile, P)
    if keys_first:
      ok_KX = _win_mask(t_X, s_K, lo_X, window, keys_first=True) & (t_X < seq_len)[None, :]
      logits_KX = _mm(k_KD, q_XD, trans_b=True) * scale
      p_KX = jnp.where(ok_KX & live, jnp.exp(logits_KX - lse_X[None, :]), 0.0)
      dv_KD = dv_KD + _mm(p_KX.astype(do_XD.dtype), do_XD)
      dp_KX = _mm(v_KD, do_XD, trans_b=True)
      ds_KX = (p_KX * (dp_KX - delta_X[None, :])).astype(q_XD.dtype)
      return dk_KD + _mm(ds_KX, q_XD), dv_KD
    ok_XK = _win_mask(t_X, s_K, lo_X, window) & (t_X < seq_len)[:, None] & live
    logits_XK = _mm(q_XD, k_KD, trans_b=True) * scale
    p_XK = jnp.where(ok_XK, jnp.exp(logits_XK - lse_X[:, None]), 0.0)
    dv_KD = dv_KD + _mm(p_XK.astype(do_XD.dtype), do_XD, trans_a=True)
    dp_XK = _mm(do_XD, v_KD, trans_b=True)
    ds_XK = (p_XK * (dp_XK - delta_X[:, None])).astype(q_XD.dtype)
    return dk_KD + _mm(ds_XK, q_XD, trans_a=True), dv_KD

  zeros = jnp.zeros(k_KD.shape, _F32)
  dk_KD, dv_KD = jax.lax.fori_loop(0, steps * per_group, step, (zeros, zeros))
  dk_ref[b, pl.ds(s0, keys), g, :] = (dk_KD * scale).astype(dk_ref.dtype)
  dv_ref[b, pl.ds(s0, keys), g, :] = dv_KD.astype(dv_ref.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def window_attention(q_BTGRD: jax.Array, k_BTGD: jax.Array, v_BTGD: jax.Array,
                     lo_BT: jax.Array | None, window: int, interpret: bool) -> jax.Array:
  """The window branch (NSA's sliding window) of queries at positions 0..T-1 over T keys.

  Args:
    q_BTGRD: queries [B,T,G,R,D]; k_BTGD, v_BTGD: window keys/values [B,T,G,D].
    lo_BT: packed rows: int [B,T], the position of each query's sequence start (keys before
      it are masked); None: one sequence a row.
    window: keys per query, its own included (static).
    interpret: Pallas interpret mode (static).
  Returns:
    [B,T,G,R,D] in float32 or q's dtype (BRANCH_OUT_DTYPE); differentiable in q, k and v.
    Products take the inputs' dtype with float32 accumulation; probabilities (and ``ds``) are
    rounded to it before their products, as the reference rounds probabilities before the
    value product.
  """
  return _window_vjp_fwd(q_BTGRD, k_BTGD, v_BTGD, lo_BT, window, interpret)[0]


def _window_setup(q_BTGRD, k_BTGD, v_BTGD, lo_BT, window: int):
  """Static kernel arguments, and the operands with T padded to whole tiles: q as
  [B,Tp,H/P,P,D], keys and values [B,Tp,G,D], ``lo`` [B,Tp] int32 (a padded query starts its
  own sequence at T: it sees padded keys only)."""
  B, T, G, R, D = q_BTGRD.shape
  tile = WIN_TILE
  P = R if WIN_GROUP_HEADS else 1
  num_tiles = -(-T // tile)
  Tp = num_tiles * tile
  static = dict(num_tiles=num_tiles, per_group=R // P, P=P, tile=tile, window=window,
                steps=_win_steps(window, tile, num_tiles), scale=1.0 / math.sqrt(D))
  pad = lambda x: jnp.pad(x, [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
  lo = jnp.zeros((B, T), jnp.int32) if lo_BT is None else lo_BT.astype(jnp.int32)
  lo = jnp.pad(lo, [(0, 0), (0, Tp - T)], constant_values=T)
  return static, (pad(q_BTGRD.reshape(B, T, G * R // P, P, D)), pad(k_BTGD), pad(v_BTGD), lo)


def _window_vjp_fwd(q_BTGRD, k_BTGD, v_BTGD, lo_BT, window, interpret):
  B, T, G, R, D = q_BTGRD.shape
  static, operands = _window_setup(q_BTGRD, k_BTGD, v_BTGD, lo_BT, window)
  q = operands[0]
  HG = q.shape[2]
  out, lse = pl.pallas_call(
      functools.partial(_window_fwd_kernel, head_groups=HG, **static),
      grid=(B * static["num_tiles"] * HG,),
      out_shape=(jax.ShapeDtypeStruct(q.shape, branch_out_dtype(q.dtype)),
                 jax.ShapeDtypeStruct(q.shape[:-1], _F32)),
      interpret=interpret,
      compiler_params=_compiler_params(interpret, WIN_NUM_WARPS, "WIN_FWD_NUM_STAGES"),
  )(*operands)
  return (out[:, :T].reshape(B, T, G, R, D),
          (q_BTGRD, k_BTGD, v_BTGD, lo_BT, out, lse))


def _window_vjp_bwd(window, interpret, res, do_BTGRD):
  q_BTGRD, k_BTGD, v_BTGD, lo_BT, out, lse = res
  B, T, G, R, D = q_BTGRD.shape
  static, operands = _window_setup(q_BTGRD, k_BTGD, v_BTGD, lo_BT, window)
  q = operands[0]
  do = jnp.pad(do_BTGRD.astype(_F32).reshape(q.shape[:1] + (T,) + q.shape[2:]),
               [(0, 0), (0, q.shape[1] - T), (0, 0), (0, 0), (0, 0)])
  delta = jnp.sum(do * out, axis=-1)
  args = (*operands, do.astype(q.dtype), lse, delta)
  params = _compiler_params(interpret, WIN_NUM_WARPS, "WIN_BWD_NUM_STAGES")
  dq = pl.pallas_call(
      functools.partial(_window_dq_kernel, head_groups=q.shape[2], **static),
      grid=(B * static["num_tiles"] * q.shape[2],),
      out_shape=jax.ShapeDtypeStruct(q.shape, branch_out_dtype(q.dtype)),
      interpret=interpret, compiler_params=params,
  )(*args)
  # dk/dv: runs of `keys` keys a program, the keys and values padded to whole runs.
  keys = _dkdv_keys(static["tile"])
  num_runs = -(-q.shape[1] // keys)
  extra = num_runs * keys - q.shape[1]
  kv = tuple(jnp.pad(x, [(0, 0), (0, extra), (0, 0), (0, 0)]) if extra else x
             for x in operands[1:3])
  grad = jax.ShapeDtypeStruct(kv[0].shape, branch_out_dtype(kv[0].dtype))
  # The query tiles a run meets: a tile's, from a window keys - tile longer.
  tile = static["tile"]
  dkdv_static = dict(static, steps=_win_steps(window + keys - tile, tile, static["num_tiles"]))
  dk, dv = pl.pallas_call(
      functools.partial(_window_dkdv_kernel, groups=G, seq_len=T, keys=keys,
                        keys_first=_flag("WIN_DKDV_KEYS_FIRST"), **dkdv_static),
      grid=(B * G * num_runs,), out_shape=(grad, grad),
      interpret=interpret, compiler_params=params,
  )(q, *kv, *args[3:])
  return (dq[:, :T].reshape(B, T, G, R, D).astype(q_BTGRD.dtype),
          dk[:, :T].astype(k_BTGD.dtype), dv[:, :T].astype(v_BTGD.dtype), None)


window_attention.defvjp(_window_vjp_fwd, _window_vjp_bwd)


# ------------------------------------------------------------------------------------------
# One-token decoding: the whole NSA core of a query against its KV cache in one kernel.
#
# A decoding step (T = 1) otherwise runs the compressed branch and the block choice as XLA
# fusions, the selected branch as its own kernel and the window branch as a gather and a few
# more fusions: about 17 launches a layer of a few microseconds each, while a step of 32 rows
# moves only kilobytes (issue #16: the rollout is bound by its many small kernels, 1.2-4.5 us
# each even inside XLA's CUDA graphs, docs/benchmarks.md). Here one program per
# (example, KV group) does all of it for the group's R heads, as rows of one tile (R padded to
# ROW_TILE with copies of the last head, computed and dropped):
#   1. the log-sum-exp of the compressed logits, walking the compressed keys in tiles of
#      DEC_SEL_TILE selection blocks' worth;
#   2. the same walk again: normalised probabilities, the compressed branch's output, each
#      tile's selection scores (summed over the real heads and the overlapping blocks) and the
#      running top-k (_merge_top; forced blocks first, ties to the lower block; a walk of one
#      tile takes that tile's top by ranks, _ranked_top);
#   3. the chosen blocks' keys gathered by row (num_select * select_len of them, one load) and
#      the window band (the next power of two of min(window, S) positions ending at the
#      query, masked to the window): one softmax each;
#   4. the gated sum (DEC_WINDOW_PROGRAMS: the window branch in programs of its own, the two
#      gated parts summed by XLA).
# Every index is clamped into its array and the rows it brings in masked, so nothing is padded
# in XLA. Key tiles are bounded (DEC_TILE_BYTES, decode_supported). Forward only: nsa_core's
# custom VJP differentiates the unfused path instead.

# Warps a program, and the most selection blocks (a power of two) a tile of the walk over the
# compressed keys covers (its compressed keys: tile * select_len / block_stride rows;
# decode_sel_tile halves it until its keys fit DEC_TILE_BYTES and its overlap matrices
# DEC_OVERLAP_BYTES, and to the cache's blocks). H200, jax 0.11.2, arc1 sizes (32 rows,
# G = 2, R = 4, D = 32, 2048 keys, positions 1024-2047; the kernel alone, 32 calls a program;
# docs/bench/decode_kernel_sweep_h200_2026-12-05.json): 4 warps and 16 blocks (the block
# choice's tile, before) 20.8 us a call; 8 and 64 (one tile up to 2048 keys) 16.9 us, the
# fastest of warps 1-8 x tiles 16-64; the arc1 rollout 387.9 ms -> 365.5 ms. At arc1's block
# geometry with D = 64 and 128 (bf16) the 64-block tile compiles for sm_90 (deviceless, as
# tests/test_kernel_count.py checks); not timed there. Since 2026-12-05 (session 20, no GPU) a
# walk of one tile (arc1's) computes its logits once for both passes: the same numbers
# (interpret mode, bit for bit), one product and one load of the compressed keys fewer; not
# yet timed.
DEC_NUM_WARPS = 8
DEC_SEL_TILE = 64
# The overlap matrices' bytes (two [Nt, Js] float32 arrays): arc1's 128 KiB at tile 64 compile.
DEC_OVERLAP_BYTES = 128 * 1024
# The largest key tile (the chosen blocks' num_select * select_len rows, or the window band)
# the kernel loads at once, in bytes: its keys and values sit in shared memory together (an
# sm_90 block has 227 KiB). arc1: 16 KiB. The NSA paper's geometry at D = 128 (16 blocks of
# 64 keys, 256 KiB a tile) asked for 288 KiB and did not compile; larger geometries take the
# split path.
DEC_TILE_BYTES = 64 * 1024
# Session 38: the one tile's top-k by ranks (_ranked_top: three reductions, not two a pick);
# the overlap matrices computed from iotas, not read (64 KiB a program at arc1); the loads that
# wait on nothing issued first. Each gives the same numbers, bit for bit
# (tests/test_nsa_pallas.py). H100, arc1 rollout (32 rows x 512 tokens, `train.bench --only
# decode`): all three 184.3 ms against 187.4 and 186.7 in the same call, the kernel 12.6 us a
# layer against 13.2 in the profiles; alone (docs/bench/decode_kernel_ablation_dev.py, 32
# calls a program) 15.5 against 16.3 us (docs/bench/*_s38_*).
DEC_RANKED_TOP = True
DEC_OVERLAP_IOTA = True
DEC_EARLY_LOADS = True
# The window branch in programs of its own (a second column of the grid: 128 programs at arc1,
# not 64), beside the compressed walk and the selection instead of after them (~2.7 us of the
# kernel's ~15.5 alone on the H100, session 38's ablation); each writes its gated part in
# float32 and XLA adds the two and rounds (the same sum as one program's, rounded once): one
# launch a layer more (deviceless sm_90, arc1: 112.75 -> 118.75 a step; XLA does not fuse the
# sum into the output product). H100, session 42, the arc1 rollout (variant
# dec_window_programs): 162.6 ms a step (mean of 2) against 162.5, no gain, so off.
DEC_WINDOW_PROGRAMS = False


def decode_sel_tile(*, block_len: int, block_stride: int, select_len: int, head_dim: int,
                    itemsize: int, num_sel: int | None = None) -> int:
  """Selection blocks a tile of :func:`decode_attention`'s walk covers: DEC_SEL_TILE, halved
  while its compressed keys exceed DEC_TILE_BYTES or its overlap matrices DEC_OVERLAP_BYTES
  or it passes the ``num_sel`` selection blocks of the cache (where given), down to the block
  choice's CHOICE_SEL_TILE (the walk's tile before 2026-12-05, taken whatever its bytes); 0
  where a compression block reaches past the next tile."""
  if not _is_pow2(DEC_SEL_TILE):
    raise ValueError(f"nsa_pallas.DEC_SEL_TILE must be a power of two, got {DEC_SEL_TILE}")
  Js = DEC_SEL_TILE
  while num_sel and Js > CHOICE_SEL_TILE and Js // 2 >= num_sel:
    Js //= 2
  while Js > CHOICE_SEL_TILE:
    Nt = Js * select_len // block_stride
    if Nt * head_dim * itemsize <= DEC_TILE_BYTES and 2 * Nt * Js * 4 <= DEC_OVERLAP_BYTES:
      break
    Js //= 2
  Js = max(Js, min(CHOICE_SEL_TILE, DEC_SEL_TILE))
  return Js if block_len - block_stride <= Js * select_len else 0


def decode_supported(*, heads_per_group: int, head_dim: int, block_len: int, block_stride: int,
                     select_len: int, num_select: int, window: int, seq_len: int,
                     itemsize: int) -> bool:
  """Whether :func:`decode_attention` serves this geometry: the Triton tiles of the selected
  and choice kernels, key tiles of at most DEC_TILE_BYTES (keys of ``itemsize`` bytes) and a
  tile of the walk (decode_sel_tile)."""
  rows = max(_pow2_at_least(num_select) * select_len, _pow2_at_least(min(window, seq_len)))
  return (pallas_supported(heads_per_group=heads_per_group, head_dim=head_dim,
                           select_len=select_len)
          and block_choice_supported(block_len=block_len, block_stride=block_stride,
                                     select_len=select_len)
          and rows * head_dim * itemsize <= DEC_TILE_BYTES
          and decode_sel_tile(block_len=block_len, block_stride=block_stride,
                              select_len=select_len, head_dim=head_dim, itemsize=itemsize) > 0)


def _attend_masked(q_PD, k_XD, v_XD, ok_X, scale: float):
  """Softmax attention of the rows of ``q_PD`` over the keys where ``ok_X``: [P, D] float32
  (probabilities normalised, then rounded to the values' dtype, as the reference does)."""
  logits_PX = jnp.where(ok_X[None, :], _mm(q_PD, k_XD, trans_b=True) * scale, _NEG)
  m_P = jnp.max(logits_PX, axis=1)
  p_PX = jnp.where(ok_X[None, :], jnp.exp(logits_PX - m_P[:, None]), 0.0)
  l_P = jnp.sum(p_PX, axis=1)
  p_PX = p_PX / jnp.maximum(l_P, 1e-30)[:, None]
  return _mm(p_PX.astype(v_XD.dtype), v_XD)


def _decode_kernel(q_ref, qc_ref, kc_ref, vc_ref, ks_ref, vs_ref, kw_ref, vw_ref, gate_ref,
                   pos_ref, ovl_ref, o_ref, *, num_groups: int, heads: int, rows: int,
                   num_cmp: int, seq_len: int, num_tiles: int, block_len: int,
                   block_stride: int, select_len: int, num_select: int, slots: int,
                   window: int, band: int, scale: float, sel_tile: int, ranked_top: bool,
                   overlap_iota: bool, early_loads: bool, window_programs: bool):
  Js = sel_tile
  Nt = Js * select_len // block_stride
  pid = pl.program_id(0)
  b, g = jax.lax.div(pid, num_groups), jax.lax.rem(pid, num_groups)
  row_P = jax.lax.broadcasted_iota(jnp.int32, (rows,), 0)
  real_P = row_P < heads
  row_P = jnp.minimum(row_P, heads - 1)
  pos = pos_ref[b]
  q_PD = q_ref[b, g, row_P, :]
  qc_PD = qc_ref[b, g, row_P, :]
  n = jnp.minimum(jax.lax.div(pos, select_len * Js) + 1, num_tiles)

  keypos_W = pos - (band - 1) + jax.lax.broadcasted_iota(jnp.int32, (band,), 0)
  ok_W = (keypos_W >= 0) & (keypos_W > pos - window)
  key_W = jnp.clip(keypos_W, 0, seq_len - 1)

  def window_kv():
    return kw_ref[b, key_W, g, :], vw_ref[b, key_W, g, :]

  # DEC_EARLY_LOADS: the loads that wait on nothing (the window band's keys and values, the
  # one tile's compressed values) issued first, under the compressed walk's chain.
  early_W = window_kv() if early_loads and not window_programs else None

  def compressed_selected():
    """The compressed branch's output and the selected branch's (which the compressed
    probabilities choose): [P, D] float32 each."""
    def tile(jt, values: bool = False):
      """Tile ``jt``'s compressed-block rows (clamped), visibility and logits [P, Nt], and its
      compressed values where ``values`` (loaded before the logits' product), else None."""
      i_N = jt * Nt + jax.lax.broadcasted_iota(jnp.int32, (Nt,), 0)
      vis_N = (i_N * block_stride + (block_len - 1) <= pos) & (i_N < num_cmp)
      i_N = jnp.minimum(i_N, num_cmp - 1)
      k_ND = kc_ref[b, i_N, g, :]
      v_ND = vc_ref[b, i_N, g, :] if values else None
      logits_PN = jnp.where(vis_N[None, :], _mm(qc_PD, k_ND, trans_b=True) * scale, _NEG)
      return i_N, vis_N, logits_PN, v_ND

    def lse_tile(jt, carry, tiled=None):
      m_P, l_P = carry
      _, vis_N, logits_PN, _ = tile(jt) if tiled is None else tiled
      m_new = jnp.maximum(m_P, jnp.max(logits_PN, axis=1))
      p_PN = jnp.where(vis_N[None, :], jnp.exp(logits_PN - m_new[:, None]), 0.0)
      return m_new, l_P * jnp.exp(m_P - m_new) + jnp.sum(p_PN, axis=1)

    start = (jnp.full((rows,), _NEG, _F32), jnp.zeros((rows,), _F32))
    if num_tiles == 1:
      # One tile holds every compressed key (arc1's 2048-slot cache at 64 blocks a tile): both
      # passes read its logits, computed once (the loops' one iteration, without the loops).
      first = tile(0, values=early_loads)
      m_P, l_P = lse_tile(0, start, first)
    else:
      m_P, l_P = jax.lax.fori_loop(0, n, lse_tile, start)
    lse_P = m_P + jnp.log(jnp.maximum(l_P, 1e-30))  # no visible block: l = 0, p = 0 below
    cur = jax.lax.div(pos, select_len)
    # One tile: no previous tile spills into it (its spill term is 0), so the second overlap
    # matrix is not read (64 KiB a program at arc1's tile of 256 blocks x 64 in float32).
    # DEC_OVERLAP_IOTA: neither is read, both computed from iotas.
    def overlap(shift):
      return (_overlap(block_len, block_stride, select_len, Js, shift) if overlap_iota
              else ovl_ref[shift])

    same_NJ, next_NJ = overlap(0), (overlap(1) if num_tiles > 1 else None)

    def score_tile(jt, carry, tiled=None):
      prev_N, acc_PD, val_1K, idx_1K = carry
      i_N, vis_N, logits_PN, v_ND = tile(jt) if tiled is None else tiled
      p_PN = jnp.where(vis_N[None, :], jnp.exp(logits_PN - lse_P[:, None]), 0.0)
      v_ND = vc_ref[b, i_N, g, :] if v_ND is None else v_ND
      acc_PD = acc_PD + _mm(p_PN.astype(v_ND.dtype), v_ND)
      p_N = jnp.sum(jnp.where(real_P[:, None], p_PN, 0.0), axis=0)
      if next_NJ is None:
        s_J = jnp.sum(p_N[:, None] * same_NJ, axis=0)
      else:
        s_J = jnp.sum(p_N[:, None] * same_NJ + prev_N[:, None] * next_NJ, axis=0)
      blk_J = jt * Js + jax.lax.broadcasted_iota(jnp.int32, (Js,), 0)
      cand_J = blk_J <= cur
      forced_J = cand_J & ((blk_J == 0) | (blk_J == cur) | (blk_J == cur - 1))
      key_J = jnp.where(forced_J, _FORCED, jnp.where(cand_J, s_J, _NEG))
      if num_tiles == 1 and ranked_top:  # nothing kept yet: the tile's top by ranks
        val_1K, idx_1K = _ranked_top(key_J, blk_J, val_1K.shape[1], num_select)
      elif num_tiles == 1:  # nothing kept yet: the tile's own top (half the reductions)
        val_1K, idx_1K = _top_of_tile(key_J[None, :], blk_J[None, :], val_1K, idx_1K,
                                      num_select)
      else:
        val_1K, idx_1K = _merge_top(val_1K, idx_1K, key_J[None, :], blk_J[None, :], num_select)
      return p_N, acc_PD, val_1K, idx_1K

    init = (jnp.zeros((Nt,), _F32), jnp.zeros(q_PD.shape, _F32),
            jnp.full((1, slots), _NEG, _F32), jnp.full((1, slots), -1, jnp.int32))
    if num_tiles == 1:
      _, out_cmp_PD, val_1K, idx_1K = score_tile(0, init, first)
    else:
      _, out_cmp_PD, val_1K, idx_1K = jax.lax.fori_loop(0, n, score_tile, init)
    idx_1K = jnp.where(val_1K > 0.5 * _NEG, idx_1K, -1)

    # The chosen blocks' keys, slot k's select_len rows at x = k * select_len + l.
    X = slots * select_len
    x_X = jax.lax.broadcasted_iota(jnp.int32, (X,), 0)
    slot_X, off_X = jax.lax.div(x_X, select_len), jax.lax.rem(x_X, select_len)
    slot_1K = jax.lax.broadcasted_iota(jnp.int32, (1, slots), 1)
    # Each row's slot's block (slots past num_select hold -1): one reduction over the slots.
    blk_X = jnp.sum(jnp.where(slot_X[:, None] == slot_1K, idx_1K, 0), axis=1)
    keypos_X = blk_X * select_len + off_X
    ok_X = (blk_X >= 0) & (keypos_X <= pos) & (keypos_X < seq_len)
    key_X = jnp.clip(keypos_X, 0, seq_len - 1)
    out_slc_PD = _attend_masked(q_PD, ks_ref[b, key_X, g, :], vs_ref[b, key_X, g, :], ok_X,
                                scale)
    return out_cmp_PD, out_slc_PD

  def window_out():
    return _attend_masked(q_PD, *(early_W or window_kv()), ok_W, scale)

  gate = [gate_ref[b, g, row_P, c].astype(_F32)[:, None] for c in range(3)]
  # The padded rows (copies of head R - 1) store the same values to its row.
  if not window_programs:
    out_cmp_PD, out_slc_PD = compressed_selected()
    out_PD = gate[0] * out_cmp_PD + gate[1] * out_slc_PD + gate[2] * window_out()
    o_ref[b, g, row_P, :] = out_PD.astype(o_ref.dtype)
    return
  # DEC_WINDOW_PROGRAMS: programs (., 0) the compressed and selected branches, (., 1) the
  # window's, each its gated part in float32 (summed and rounded by decode_attention).
  part = pl.program_id(1)

  @pl.when(part == 0)
  def _():
    out_cmp_PD, out_slc_PD = compressed_selected()
    o_ref[0, b, g, row_P, :] = gate[0] * out_cmp_PD + gate[1] * out_slc_PD

  @pl.when(part == 1)
  def _():
    o_ref[1, b, g, row_P, :] = gate[2] * window_out()


def decode_attention(q_BGRD: jax.Array, q_cmp_BGRD: jax.Array, k_cmp_BNGD: jax.Array,
                     v_cmp_BNGD: jax.Array, k_slc: jax.Array, v_slc: jax.Array,
                     k_win: jax.Array, v_win: jax.Array, gates_BGR3: jax.Array,
                     pos_B: jax.Array, *, num_sel: int, block_len: int, block_stride: int,
                     select_len: int, num_select: int, window: int, interpret: bool
                     ) -> jax.Array:
  """NSA (``nsa.nsa_core``'s gated sum of its three branches) of one query a row at
  position ``pos_B[b]``, in one kernel.

  Args:
    q_BGRD: the query's heads [B,G,R,D] (selected and window branches); q_cmp_BGRD: the
      compressed branch's and the block scores' queries.
    k_cmp_BNGD, v_cmp_BNGD: compressed keys/values (N > 0); k_slc, v_slc, k_win, v_win:
      [B,S,G,D], with every position up to ``pos_B`` written.
    gates_BGR3: the branch gates (compressed, selected, window).
    pos_B: int32 positions, ``0 <= pos < S``.
    num_sel: J, the number of selection blocks of S keys.
  Needs :func:`decode_supported`. Returns [B,G,R,D] in q's dtype (the gated sum in float32,
  rounded once, as nsa_core rounds it); forward only.
  """
  B, G, R, D = q_BGRD.shape
  S, N = k_slc.shape[1], k_cmp_BNGD.shape[1]
  split = _flag("DEC_WINDOW_PROGRAMS")
  Js = decode_sel_tile(block_len=block_len, block_stride=block_stride, select_len=select_len,
                       head_dim=D, itemsize=max(k_slc.dtype.itemsize, q_BGRD.dtype.itemsize),
                       num_sel=num_sel)
  overlap_iota = _flag("DEC_OVERLAP_IOTA")
  # The overlap matrices (read unless DEC_OVERLAP_IOTA: then a placeholder, which XLA would
  # otherwise build every step, 128 KiB at arc1).
  overlap = (jnp.zeros((1,), _F32) if overlap_iota
             else _overlap_tiles(block_len, block_stride, select_len, Js))
  kernel = functools.partial(
      _decode_kernel, num_groups=G, heads=R, rows=max(ROW_TILE, R), num_cmp=N, seq_len=S,
      num_tiles=-(-num_sel // Js), block_len=block_len,
      block_stride=block_stride, select_len=select_len, num_select=num_select,
      slots=_pow2_at_least(num_select), window=window, band=_pow2_at_least(min(window, S)),
      scale=1.0 / math.sqrt(D), sel_tile=Js, ranked_top=_flag("DEC_RANKED_TOP"),
      overlap_iota=overlap_iota, early_loads=_flag("DEC_EARLY_LOADS"),
      window_programs=split)
  out = pl.pallas_call(
      kernel, grid=(B * G, 2 if split else 1), interpret=interpret,
      out_shape=jax.ShapeDtypeStruct(((2,) if split else ()) + (B, G, R, D),
                                     _F32 if split else q_BGRD.dtype),
      compiler_params=_compiler_params(interpret, DEC_NUM_WARPS, "DEC_NUM_STAGES"),
  )(q_BGRD, q_cmp_BGRD, k_cmp_BNGD, v_cmp_BNGD, k_slc, v_slc, k_win, v_win, gates_BGR3,
    pos_B.astype(jnp.int32), overlap)
  return (out[0] + out[1]).astype(q_BGRD.dtype) if split else out


def _add_bias(block, bias):
  """A compressed block in the cache's dtype plus the compressor's last bias, added in float32
  and rounded once (as XLA adds it in the blocks' dtype)."""
  return (block.astype(_F32) + bias.astype(_F32)).astype(block.dtype)


def _cache_write_kernel(pos_ref, slot_ref, token_ref, block_ref, *refs, num_token: int,
                        num_block: int, seq_len: int, has_bias: bool):
  bias_ref, refs = (refs[0], refs[1:]) if has_bias else (None, refs)
  outs = refs[num_token + num_block:]  # aliased to the inputs before them
  b = pl.program_id(0)
  pos, slot = pos_ref[b], slot_ref[b]

  @pl.when((pos >= 0) & (pos < seq_len))  # no bounds check on a GPU: a row past S writes nothing
  def _():
    for i in range(num_token):
      outs[i][b, pos] = token_ref[i, b]

  @pl.when(slot >= 0)
  def _():
    for i in range(num_block):
      block_GD = block_ref[i, b]
      outs[num_token + i][b, slot] = _add_bias(block_GD, bias_ref[i]) if has_bias else block_GD


def write_cache_reference(token_arrays: tuple, token_NBGD: jax.Array, pos_B: jax.Array,
                          block_arrays: tuple, block_MBGD: jax.Array, slot_B: jax.Array,
                          block_bias_MD: jax.Array | None = None) -> tuple:
  """:func:`write_cache` as XLA scatters (its gradient, and the tests' reference)."""
  rows_B = jnp.arange(pos_B.shape[0])
  S = token_arrays[0].shape[1]
  pos_B = jnp.where((pos_B >= 0) & (pos_B < S), pos_B, S)
  out = [a.at[rows_B, pos_B].set(token_NBGD[i], mode="drop")
         for i, a in enumerate(token_arrays)]
  if block_bias_MD is not None:
    block_MBGD = block_MBGD + block_bias_MD[:, None, None, :].astype(block_MBGD.dtype)
  N = block_arrays[0].shape[1]
  return tuple(out + [a.at[rows_B, jnp.where(slot_B >= 0, slot_B, N)].set(
      block_MBGD[i], mode="drop") for i, a in enumerate(block_arrays)])


def write_cache(token_arrays: tuple, token_NBGD: jax.Array, pos_B: jax.Array,
                block_arrays: tuple, block_MBGD: jax.Array, slot_B: jax.Array,
                interpret: bool, block_bias_MD: jax.Array | None = None) -> tuple:
  """A decoding step's cache writes in one kernel, in place: ``token_arrays[i][b, pos_B[b]] =
  token_NBGD[i, b]`` for each of the N [B,S,G,D] arrays (a row with ``pos_B`` outside
  ``[0, S)`` writes nothing), and ``block_arrays[j][b, slot_B[b]] = block_MBGD[j, b]`` (plus
  ``block_bias_MD[j]`` where given: the compressor's last bias, which XLA would otherwise add
  in a launch of its own) for each of the M [B,N,G,D] arrays where ``0 <= slot_B[b] < N`` (-1:
  the row completes no block). Returns the N + M updated arrays (the inputs' buffers: XLA
  writes them in place where it can, as it does a scatter's). One program a row.
  Differentiable in reverse mode (the scatters' gradient), not forward mode."""
  return _write_cache(tuple(token_arrays), token_NBGD, pos_B, tuple(block_arrays), block_MBGD,
                      slot_B, block_bias_MD, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _write_cache(token_arrays, token_NBGD, pos_B, block_arrays, block_MBGD, slot_B,
                 block_bias_MD, interpret):
  arrays = token_arrays + block_arrays
  n, m = len(token_arrays), len(block_arrays)
  has_bias = block_bias_MD is not None
  kernel = functools.partial(_cache_write_kernel, num_token=n, num_block=m,
                             seq_len=token_arrays[0].shape[1], has_bias=has_bias)
  slot_B = jnp.where(slot_B < block_arrays[0].shape[1], slot_B, -1)
  inputs = [pos_B.astype(jnp.int32), slot_B.astype(jnp.int32), token_NBGD, block_MBGD]
  inputs += [block_bias_MD] if has_bias else []
  return pl.pallas_call(
      kernel, grid=(pos_B.shape[0],),
      out_shape=tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays),
      input_output_aliases={len(inputs) + i: i for i in range(n + m)},
      interpret=interpret, compiler_params=_compiler_params(interpret, 1),
  )(*inputs, *arrays)


def _write_cache_fwd(token_arrays, token_NBGD, pos_B, block_arrays, block_MBGD, slot_B,
                     block_bias_MD, interpret):
  out = _write_cache(token_arrays, token_NBGD, pos_B, block_arrays, block_MBGD, slot_B,
                     block_bias_MD, interpret)
  return out, (token_arrays, token_NBGD, pos_B, block_arrays, block_MBGD, slot_B, block_bias_MD)


def _write_cache_bwd(interpret, res, ct):
  del interpret
  token_arrays, token_NBGD, pos_B, block_arrays, block_MBGD, slot_B, block_bias_MD = res
  _, vjp = jax.vjp(lambda t, tn, b, bm, bb: write_cache_reference(t, tn, pos_B, b, bm, slot_B, bb),
                   token_arrays, token_NBGD, block_arrays, block_MBGD, block_bias_MD)
  d_t, d_tn, d_b, d_bm, d_bb = vjp(tuple(ct))
  return d_t, d_tn, None, d_b, d_bm, None, d_bb


_write_cache.defvjp(_write_cache_fwd, _write_cache_bwd)


# ----------------------------------------------------------------------------------------------
# The cache writes with the completed compressed block computed in the same kernel
# ----------------------------------------------------------------------------------------------
#
# ``write_cache`` takes the token's completed block from XLA, which computes it every step for
# every row (the block's raw keys gathered, the compressor's two products, its gelu: about five
# launches a layer). ``write_cache_compress`` computes it in the write kernel instead, only in
# the programs whose row completes a block (one step in ``block_stride``), from the cache's
# ``block_len - 1`` raw keys before the token and the token itself.
# Measured slower than the XLA block (arc1 rollout of 32 rows; docs/benchmarks.md): H200, session
# 19: 62.8k tokens/s against 73.4k, ~12 us a layer more; H100, session 21, with the products
# summed once over D (not once a key): 76.7k against 84.3k (70.3k before that change, in the
# same run). nsa.PALLAS_DECODE = "fused" takes it, "fused_xla_block" does not.


# Warps of a write_cache_compress program (its [D, 2D] products; not timed).
COMPRESS_NUM_WARPS = 2


def compress_reference(raw_2BLGD: jax.Array, weights: tuple) -> jax.Array:
  """The compressor (``BlockCompressor``) of keys and values ([2, B, L, G, D] raw blocks) by
  :meth:`BlockCompressor.kernel_weights`' arrays stacked on a leading k/v axis: [2, B, G, D]
  in the compute dtype (the weights')."""
  w1_2LDO, const_2O, w2_2OD, b2_2D = weights
  dt = w1_2LDO.dtype
  h_2BGO = jnp.einsum("kblgd,kldo->kbgo", raw_2BLGD.astype(dt), w1_2LDO,
                      preferred_element_type=_F32) + const_2O[:, None, None, :]
  a_2BGO = jax.nn.gelu(h_2BGO.astype(dt))
  return jnp.einsum("kbgo,kod->kbgd", a_2BGO, w2_2OD) + b2_2D[:, None, None, :]


def _completion(pos_B, *, block_len: int, block_stride: int, num_cmp: int, seq_len: int):
  """(start of the block each row's token completes, its slot; -1 for none)."""
  start_B = pos_B - (block_len - 1)
  block_B = jnp.maximum(start_B, 0) // block_stride
  done_B = ((start_B >= 0) & (start_B % block_stride == 0) & (block_B < num_cmp)
            & (pos_B < seq_len))
  return start_B, jnp.where(done_B, block_B, -1)


def write_cache_compress_reference(token_arrays: tuple, token_NBGD: jax.Array, pos_B: jax.Array,
                                   block_arrays: tuple, weights: tuple, *, block_len: int,
                                   block_stride: int) -> tuple:
  """:func:`write_cache_compress` in XLA (its gradient, and the tests' reference). The raw
  keys/values are ``token_arrays[0]`` and ``[1]``."""
  S, N = token_arrays[0].shape[1], block_arrays[0].shape[1]
  start_B, slot_B = _completion(pos_B, block_len=block_len, block_stride=block_stride,
                                num_cmp=N, seq_len=S)
  idx_BL = jnp.clip(jnp.maximum(start_B, 0)[:, None] + jnp.arange(block_len), 0, S - 1)
  last_L = jnp.arange(block_len) == block_len - 1
  raw_2BLGD = jnp.stack([
      jnp.where(last_L[None, :, None, None], token_NBGD[i][:, None].astype(a.dtype),
                jnp.take_along_axis(a, idx_BL[:, :, None, None], axis=1))
      for i, a in enumerate(token_arrays[:2])])
  blocks_2BGD = compress_reference(raw_2BLGD, weights)
  return write_cache_reference(token_arrays, token_NBGD, pos_B, block_arrays,
                               blocks_2BGD.astype(block_arrays[0].dtype), slot_B)


def _cache_compress_kernel(pos_ref, token_ref, w1_ref, const_ref, w2_ref, b2_ref, *refs,
                           num_token: int, seq_len: int, num_cmp: int, num_groups: int,
                           block_len: int, block_stride: int):
  ins, outs = refs[:num_token + 2], refs[num_token + 2:]  # outs aliased to ins
  b, j = pl.program_id(0), pl.program_id(1)
  pos = pos_ref[b]

  # The row's first program writes its token: no bounds check on a GPU, so a row past S
  # writes nothing.
  @pl.when((j == 0) & (pos >= 0) & (pos < seq_len))
  def _():
    for i in range(num_token):
      outs[i][b, pos] = token_ref[i, b]

  start, slot = _completion(pos, block_len=block_len, block_stride=block_stride,
                            num_cmp=num_cmp, seq_len=seq_len)
  dt = w1_ref.dtype

  # Program j computes group j % G of the keys' (j < G) or the values' block.
  for m in range(2):  # their raw arrays are token arrays 0 and 1
    @pl.when((slot >= 0) & (j // num_groups == m))
    def _(m=m):
      g = j % num_groups
      # The block's keys before the token from the cache (as read before the token's row is
      # written: no other row is), the token's from its own input. Unrolled: the loads are
      # independent and can all be in flight at once. The products are summed over the
      # block's keys elementwise and over D once, at the end (one cross-thread reduction, not
      # one a key).
      acc_DO = jnp.zeros(w1_ref.shape[2:], _F32)
      for l in range(block_len):
        x_D = token_ref[m, b, g] if l == block_len - 1 else ins[m][b, start + l, g]
        acc_DO = acc_DO + x_D.astype(dt).astype(_F32)[:, None] * w1_ref[m, l].astype(_F32)
      h_O = const_ref[m].astype(_F32) + jnp.sum(acc_DO, axis=0)
      a_O = jax.nn.gelu(h_O.astype(dt).astype(_F32)).astype(dt).astype(_F32)
      y_D = jnp.sum(a_O[:, None] * w2_ref[m].astype(_F32), axis=0).astype(dt)
      out = outs[num_token + m]
      out[b, slot, g] = (y_D.astype(_F32) + b2_ref[m].astype(_F32)).astype(dt).astype(out.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def write_cache_compress(token_arrays: tuple, token_NBGD: jax.Array, pos_B: jax.Array,
                         block_arrays: tuple, weights: tuple, block_len: int, block_stride: int,
                         interpret: bool) -> tuple:
  """:func:`write_cache` with the compressed block computed in the kernel: the N token arrays
  ([B,S,G,D], the first two the raw keys and values the compressor reads) get each row's
  token at ``pos_B`` (outside ``[0, S)``: nothing), and the two block arrays (k_cmp, v_cmp
  [B,N,G,D]) the block that token completes (block i completes at ``i*stride + len - 1``;
  slots past N: nothing), compressed by ``weights`` (:func:`compress_reference`'s). A
  program per (row, keys or values, group); reverse-mode gradient =
  :func:`write_cache_compress_reference`'s."""
  arrays = tuple(token_arrays) + tuple(block_arrays)
  n = len(token_arrays)
  B, S, G, _ = token_arrays[0].shape
  kernel = functools.partial(_cache_compress_kernel, num_token=n, seq_len=S,
                             num_cmp=block_arrays[0].shape[1], num_groups=G,
                             block_len=block_len, block_stride=block_stride)
  return pl.pallas_call(
      kernel, grid=(B, 2 * G),
      out_shape=tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays),
      input_output_aliases={6 + i: i for i in range(n + 2)},
      interpret=interpret, compiler_params=_compiler_params(interpret, COMPRESS_NUM_WARPS),
  )(pos_B.astype(jnp.int32), token_NBGD, *weights, *arrays)


def _write_cache_compress_fwd(token_arrays, token_NBGD, pos_B, block_arrays, weights, block_len,
                              block_stride, interpret):
  out = write_cache_compress(token_arrays, token_NBGD, pos_B, block_arrays, weights, block_len,
                             block_stride, interpret)
  return out, (token_arrays, token_NBGD, pos_B, block_arrays, weights)


def _write_cache_compress_bwd(block_len, block_stride, interpret, res, ct):
  del interpret
  token_arrays, token_NBGD, pos_B, block_arrays, weights = res
  _, vjp = jax.vjp(lambda t, tn, b, w: write_cache_compress_reference(
      t, tn, pos_B, b, w, block_len=block_len, block_stride=block_stride),
      token_arrays, token_NBGD, block_arrays, weights)
  d_t, d_tn, d_b, d_w = vjp(tuple(ct))
  return d_t, d_tn, None, d_b, d_w


write_cache_compress.defvjp(_write_cache_compress_fwd, _write_cache_compress_bwd)


# ----------------------------------------------------------------------------------------------
# A decoding step's input products
# ----------------------------------------------------------------------------------------------
#
# The NSA layer's one product of the token with its three input kernels (queries, the six
# key/value arrays, the gates) ended in five XLA launches a layer on a GPU: the product (its
# K split in parts), then a launch each to sum the parts into the rotated query, the unrotated
# query, the stacked keys/values and the gates (the product's consumers each sum them again;
# deviceless sm_90 count of the arc1 rollout step, session 36). The compressed block the token
# completes took four more (its raw keys gathered, the compressor's two products, the gelu).
# ``decode_inputs`` is one kernel for all of it: a program a (tile of rows, head-sized column
# block); the programs of the raw compressed keys' and values' blocks go on to compress the
# block each row's token would complete (the write kernel keeps only those completed).

# Whether the NSA layer's decoding step computes its input products by decode_inputs (where
# decode_inputs_supported; with the fused decoding kernels only) rather than XLA's launches.
# H200, jax 0.11.2, session 37, the arc1 rollout of 32 rows x 512 tokens (`python -m
# train.bench --config configs/arc1.yaml --only decode --lens 2048`, one call, one process
# each): 178.2 ms against 183.7 with XLA's launches (1.03x); its kernel 4.96 us a call
# (profile), XLA's five launches about 9.
DECODE_INPUTS = True
# Whether decode_inputs also computes the completed compressed block (four XLA launches a layer,
# 6.8 us in that profile, 7.1 on the H100 in session 38). Session 37's kernel walked the block's
# block_len raw keys (2 x 16 small products, each after its gathered load): on the H100 the
# input kernel took 37.7 us a layer with it against 4.8 without (rollout 268.2 ms against
# 187.4 with the DynMoE kernel's routing too). Since session 38 the block's features are one
# gathered load and one product (_compress_rows): slower still on the H100 in session 39
# (variant inputs_block: 200.9 ms a rollout step against 176.4; its kernel 16.5 us a layer).
INPUTS_BLOCK = False
# The block's gather indexes a raw array flattened, in int32: larger caches take XLA's block.
INPUTS_BLOCK_MAX_ELEMENTS = 2**31 - 1
# Whether decode_inputs applies the block's attention RMSNorm to its rows itself (each program
# its tile of rows; the model passes the norm's gains) rather than taking them normalised from
# an XLA launch before it (one a layer, ~1.3 us each in session 37's H200 profile). The arc1
# rollout step's deviceless sm_90 count 63.9 launches against 65.9; H100, session 41, its
# kernel 5.4 us a layer against 4.8, XLA's norm ~2.1 (profiles of `train.bench --config
# configs/arc1.yaml --only decode --lens 2048 --profile`; docs/benchmarks.md, session 41).
# With moe_pallas.DEC_PRENORM too (off), 58.9 launches.
INPUTS_NORM = True
# Warps of a decode_inputs program (a [rows, C] x [C, D/2] pair of products).
INPUTS_NUM_WARPS = 4
# Rows of a decode_inputs program at most (more rows: more row tiles).
INPUTS_ROWS = 64


# The smallest tile of a product (a tensor-core tile's rows): fewer rows are padded to it.
_MIN_TILE = 16


# What a decode_inputs program's tiles may take: its rows' features and a column block's weights
# ([INPUTS_ROWS, C] and [C, D], compute dtype), as moe_pallas.DEC_TILE_BYTES bounds its kernel.
INPUTS_TILE_BYTES = 160 * 1024


def decode_inputs_supported(*, d_model: int, head_dim: int, itemsize: int,
                            interpret: bool) -> bool:
  """Whether :func:`decode_inputs` takes these sizes: on a GPU Triton tiles of C by D/2
  (powers of two, D/2 >= 16 for a tensor-core product) within INPUTS_TILE_BYTES (``itemsize``:
  the compute dtype's bytes); in interpret mode any even D."""
  if interpret:
    return head_dim % 2 == 0
  return (_is_pow2(d_model) and d_model >= 16 and _is_pow2(head_dim) and head_dim >= 32
          and (INPUTS_ROWS + head_dim) * d_model * itemsize <= INPUTS_TILE_BYTES)


def block_rows(pos_B: jax.Array, *, block_len: int, block_stride: int, seq_len: int
               ) -> jax.Array:
  """The cache positions [B, L] of the compressed block each row's token at ``pos_B`` would
  complete (the last block starting at or before ``pos - block_len + 1``, clipped to the
  cache): the block is complete where its last position is ``pos``."""
  start_B = jnp.maximum(pos_B - block_len + 1, 0) // block_stride * block_stride
  return jnp.clip(start_B[:, None] + jnp.arange(block_len), 0, seq_len - 1)


def decode_inputs_reference(x_BC, w_q, w_kv, w_gate, b_gate, cos_BF, sin_BF, block=None,
                            norm_scale_C=None, *, rotate: tuple[int, ...], block_geometry=None,
                            norm_eps: float | None = None):
  """What :func:`decode_inputs` computes, in XLA (its gradient, and the tests' reference)."""
  if (norm_scale_C is None) != (norm_eps is None):
    raise ValueError("decode_inputs_reference: norm_scale_C and norm_eps go together")
  if norm_scale_C is not None:
    x_BC = rms_norm(x_BC, norm_scale_C, norm_eps)
  B = x_BC.shape[0]
  D = 2 * cos_BF.shape[1]
  dt = x_BC.dtype

  def product(w):  # as nn.Dense: operands and result in the compute dtype
    return jax.lax.dot_general(x_BC, w.astype(dt), (((1,), (0,)), ((), ())))

  def rope(y_BnD):
    return rotate_half(y_BnD, cos_BF[:, None, :], sin_BF[:, None, :])

  q_raw = product(w_q).reshape(B, -1, D)
  kv = product(w_kv).reshape(B, 6, -1, D).transpose(1, 0, 2, 3)
  kv = jnp.stack([rope(kv[n]) if n in rotate else kv[n] for n in range(6)])
  gates = product(w_gate) + b_gate.astype(dt)
  gates = jax.nn.sigmoid(gates.astype(_F32)).astype(dt).reshape(B, -1, 3)
  out = (rope(q_raw), q_raw, kv, gates)
  if block is None:
    return out
  raw, pos_B, weights = block
  return out + (decode_block_reference(raw, kv, pos_B, weights, token_rows=(0, 1),
                                       block_geometry=block_geometry),)


def decode_block_reference(raw, tokens_NBGD, pos_B, weights, *, token_rows, block_geometry):
  """What :func:`decode_block` computes, in XLA (its gradient, and the tests' reference)."""
  idx_BL = block_rows(pos_B, seq_len=raw[0].shape[1], **dict(block_geometry))
  # The token is the block's last row where it sits there (where the block is complete; the
  # other rows' blocks are not written).
  here_BL11 = ((idx_BL == pos_B[:, None]) & (jnp.arange(idx_BL.shape[1]) == idx_BL.shape[1] - 1)
               )[:, :, None, None]
  raw_2BLGD = jnp.stack([
      jnp.where(here_BL11, tokens_NBGD[n][:, None].astype(a.dtype),
                jnp.take_along_axis(a, idx_BL[:, :, None, None], axis=1))
      for n, a in zip(token_rows, raw)])
  w1, const, w2 = weights
  # The compressor without its last bias (the write kernel adds it).
  blocks = compress_reference(raw_2BLGD, (w1, const, w2, jnp.zeros(w2.shape[::2], w2.dtype)))
  return blocks.astype(tokens_NBGD.dtype)


def _inputs_kernel(x_ref, wq_ref, wkv_ref, wgt_ref, bg_ref, cos_ref, sin_ref, *refs,
                   batch: int, rows: int, heads: int, groups: int, head_dim: int,
                   rotate: tuple[int, ...], gate_cols: int, block: dict | None,
                   norm_eps: float | None):
  if norm_eps is not None:
    scale_ref, *refs = refs
  if block is None:
    q_ref, qraw_ref, kv_ref, g_ref = refs
  else:
    (kraw_ref, vraw_ref, pos_ref, w1_ref, c1_ref, w2_ref,
     q_ref, qraw_ref, kv_ref, g_ref, blk_ref) = refs
  i, s = pl.program_id(0), pl.program_id(1)
  half = head_dim // 2
  row_P = jnp.minimum(i * rows + jax.lax.broadcasted_iota(jnp.int32, (rows,), 0), batch - 1)
  x_PC = x_ref[row_P, :]
  if norm_eps is not None:  # INPUTS_NORM: the block's RMSNorm, as XLA computes it
    x_PC = rms_norm(x_PC, scale_ref[...], norm_eps)
  dt = x_PC.dtype

  def pair(w_ref, col0):
    """The two halves of a head-sized column block's product, rounded to the compute dtype
    as nn.Dense rounds its result, in float32."""
    return tuple(_mm(x_PC, w_ref[:, pl.ds(col0 + h * half, half)]).astype(dt).astype(_F32)
                 for h in range(2))

  def rotated(y1, y2):
    c, sn = cos_ref[row_P, :], sin_ref[row_P, :]
    return y1 * c - y2 * sn, y2 * c + y1 * sn

  def store(ref, idx, y1, y2):
    ref[idx(pl.ds(0, half))] = y1.astype(ref.dtype)
    ref[idx(pl.ds(half, half))] = y2.astype(ref.dtype)

  @pl.when(s < heads)
  def _():
    y1, y2 = pair(wq_ref, s * head_dim)
    store(qraw_ref, lambda d: (row_P, s, d), y1, y2)
    store(q_ref, lambda d: (row_P, s, d), *rotated(y1, y2))

  j = s - heads
  n, g = jax.lax.div(j, groups), jax.lax.rem(j, groups)

  @pl.when((s >= heads) & (s < heads + 6 * groups))
  def _():
    y1, y2 = pair(wkv_ref, j * head_dim)
    r1, r2 = rotated(y1, y2)
    rot = functools.reduce(jnp.logical_or, [n == k for k in rotate], jnp.bool_(False))
    store(kv_ref, lambda d: (n, row_P, g, d), jnp.where(rot, r1, y1), jnp.where(rot, r2, y2))
    if block is not None:
      for m, raw_ref in enumerate((kraw_ref, vraw_ref)):  # kv arrays 0 and 1: the raw ones
        @pl.when(n == m)
        def _(m=m, raw_ref=raw_ref):
          _compress_rows(raw_ref, pos_ref, w1_ref, c1_ref, w2_ref, blk_ref, row_P, m, g,
                         (y1, y2), half=half, dt=dt, **block)

  @pl.when(s == heads + 6 * groups)
  def _():
    # Gate c of every head: the kernel's columns h*3 + c (heads past H repeat head H - 1 and
    # store its values again).
    h_H = jnp.minimum(jax.lax.broadcasted_iota(jnp.int32, (gate_cols,), 0), heads - 1)
    for c in range(3):
      col_H = h_H * 3 + c
      y = _mm(x_PC, wgt_ref[col_H, :], trans_b=True).astype(dt).astype(_F32)
      y = (y + bg_ref[col_H].astype(_F32)[None, :]).astype(dt).astype(_F32)
      g_ref[row_P[:, None] * (heads * 3) + col_H[None, :]] = jax.nn.sigmoid(y).astype(
          g_ref.dtype)


def _compress_rows(raw_ref, pos_ref, w1_ref, c1_ref, w2_ref, blk_ref, row_P, m, g, token,
                   *, half: int, dt, block_len: int, block_stride: int, seq_len: int):
  """The block of raw array ``m`` (keys 0, values 1), group ``g``, that each row's token
  (``token``: its two halves, float32 of compute-dtype values) completes, compressed without
  the last bias (:func:`block_rows`; the block's rows from the cache but its last, which is the
  token's where the token sits there). ``raw_ref``: the raw array flattened; ``w1_ref``
  [2, L*D, 2D]. The block's L*D features as one gathered load and one product, the token's
  as two more."""
  D, groups = 2 * half, blk_ref.shape[2]
  pos_P = pos_ref[row_P]
  start_P = jnp.maximum(pos_P - block_len + 1, 0) // block_stride * block_stride
  x_X = jax.lax.broadcasted_iota(jnp.int32, (block_len * D,), 0)
  l_X, d_X = jax.lax.div(x_X, D), jax.lax.rem(x_X, D)
  idx_PX = jnp.clip(start_P[:, None] + l_X[None, :], 0, seq_len - 1)
  last_P = jnp.clip(start_P + block_len - 1, 0, seq_len - 1) == pos_P
  token_PX = last_P[:, None] & (l_X == block_len - 1)[None, :]
  flat_PX = ((row_P[:, None] * seq_len + idx_PX) * groups + g) * D + d_X[None, :]
  x_PX = jnp.where(token_PX, 0.0, raw_ref[flat_PX]).astype(dt)
  acc = _mm(x_PX, w1_ref[m])
  for h in range(2):
    tok_PH = token[h].astype(raw_ref.dtype).astype(dt)  # as the cache will hold it
    w_HO = w1_ref[m, pl.ds((block_len - 1) * D + h * half, half), :]
    acc = acc + jnp.where(last_P[:, None], _mm(tok_PH, w_HO), 0.0)
  h_PO = (acc + c1_ref[m].astype(_F32)[None, :]).astype(dt).astype(_F32)
  a_PO = jax.nn.gelu(h_PO).astype(dt)
  blk_ref[m, row_P, g, :] = _mm(a_PO, w2_ref[m]).astype(blk_ref.dtype)


# The completed compressed block as a kernel of its own (decode_block), not XLA's four launches
# nor decode_inputs' programs (INPUTS_BLOCK): a program a (row, raw keys or values, group), or a
# (tile of BLOCK_ROWS rows, ...) with the gathered load and products of _compress_rows. Where
# the write kernel adds the last bias (nsa.PALLAS_DECODE "fused_xla_block"), with INPUTS_BLOCK
# off, where decode_block_supported and the raw cache fits INPUTS_BLOCK_MAX_ELEMENTS. The arc1
# rollout on an H100 (session 40, `train.bench --only decode --lens 2048`): 175.3 ms a 512-token
# step (mean of 3) with XLA's block (variant xla_block), 170.2 (mean of 2) a program a row,
# 171.9 with 16-row tiles (variant block_kernel).
BLOCK_KERNEL = True
# Rows a decode_block program: 1, a program a row, loads its block as one [L, D] tile (4 * L*D /
# 16 products' worth of padding: the product's rows padded to a tensor-core tile); more, a
# tile of rows gathers their blocks' features in one load (its [rows, L*D] indexes). With
# BLOCK_WRITE (the default) the kernel that also writes the cache takes a program a row whatever
# this is.
BLOCK_ROWS = 1
BLOCK_NUM_WARPS = 4


def decode_block_supported(*, block_len: int, head_dim: int, interpret: bool) -> bool:
  """Whether :func:`decode_block` takes these sizes: on a GPU Triton tiles (block_len and D
  powers of two, D/2 >= 16 for the token's tensor-core products); in interpret mode any even
  D."""
  if interpret:
    return head_dim % 2 == 0
  return _is_pow2(block_len) and _is_pow2(head_dim) and head_dim >= 32


def _block_kernel(kraw_ref, vraw_ref, tok_ref, pos_ref, w1_ref, c1_ref, w2_ref, blk_ref, *,
                  batch: int, rows: int, token_rows: tuple[int, int], geometry: dict):
  i, n, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  half = blk_ref.shape[3] // 2
  row_P = jnp.minimum(i * rows + jax.lax.broadcasted_iota(jnp.int32, (rows,), 0), batch - 1)
  for m, raw_ref in enumerate((kraw_ref, vraw_ref)):
    @pl.when(n == m)
    def _(m=m, raw_ref=raw_ref):
      if rows == 1:
        blk_ref[m, i, g, :] = _compress_row(raw_ref, tok_ref, token_rows[m], pos_ref, w1_ref,
                                            c1_ref, w2_ref, i, m, g, **geometry)
        return
      token = tuple(tok_ref[token_rows[m], row_P, g, pl.ds(h * half, half)].astype(_F32)
                    for h in range(2))
      _compress_rows(raw_ref, pos_ref, w1_ref, c1_ref, w2_ref, blk_ref, row_P, m, g, token,
                     half=half, dt=tok_ref.dtype, **geometry)


def _compress_row(raw_ref, tok_ref, n, pos_ref, w1_ref, c1_ref, w2_ref, b, m, g, *,
                  block_len: int, block_stride: int, seq_len: int):
  """:func:`_compress_rows` for one row ``b`` (BLOCK_ROWS = 1): its block's [L, D] keys as one
  load from ``raw_ref`` [B, S, G, D], the token (``tok_ref[n]`` [B, G, D]) in its last row,
  the products' one row padded to a tensor-core tile. Returns the block [D] in the tokens'
  dtype."""
  D = raw_ref.shape[3]
  dt = tok_ref.dtype
  pos = pos_ref[b]
  start = jnp.maximum(pos - block_len + 1, 0) // block_stride * block_stride
  l_L = jax.lax.broadcasted_iota(jnp.int32, (block_len,), 0)
  idx_L = jnp.clip(start + l_L, 0, seq_len - 1)
  token_L = (idx_L == pos) & (l_L == block_len - 1)
  x_LD = jnp.where(token_L[:, None], tok_ref[n, b, g, :].astype(raw_ref.dtype)[None, :],
                   raw_ref[b, idx_L, g, :])
  pad = jax.lax.broadcasted_iota(jnp.int32, (_MIN_TILE, 1), 0) == 0
  x_RX = jnp.broadcast_to(x_LD.reshape(1, block_len * D), (_MIN_TILE, block_len * D))
  h_RO = (_mm(x_RX.astype(dt), w1_ref[m]) + c1_ref[m].astype(_F32)[None, :]).astype(dt)
  y_RD = _mm(jax.nn.gelu(h_RO.astype(_F32)).astype(dt), w2_ref[m])
  return jnp.sum(jnp.where(pad, y_RD, 0.0), axis=0).astype(dt)


def _decode_block(raw, tokens_NBGD, pos_B, weights, token_rows, block_geometry, interpret):
  B, S, G, D = raw[0].shape
  dt = tokens_NBGD.dtype
  w1, const, w2 = weights
  if not (isinstance(BLOCK_ROWS, int) and BLOCK_ROWS >= 1):
    raise ValueError(f"nsa_pallas.BLOCK_ROWS must be an integer >= 1, got {BLOCK_ROWS!r}")
  rows = 1 if BLOCK_ROWS == 1 else min(max(_pow2_at_least(B), 16), _pow2_at_least(BLOCK_ROWS))
  kernel = functools.partial(_block_kernel, batch=B, rows=rows, token_rows=tuple(token_rows),
                             geometry=dict(block_geometry, seq_len=S))
  return pl.pallas_call(
      kernel, grid=(-(-B // rows), 2, G), out_shape=jax.ShapeDtypeStruct((2, B, G, D), dt),
      interpret=interpret, compiler_params=_compiler_params(interpret, BLOCK_NUM_WARPS),
  )(*(a if rows == 1 else a.reshape(-1) for a in raw), tokens_NBGD, pos_B.astype(jnp.int32),
    w1.astype(dt).reshape(2, -1, w1.shape[-1]), const.astype(_F32), w2.astype(dt))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def decode_block(raw: tuple, tokens_NBGD: jax.Array, pos_B: jax.Array, weights: tuple,
                 token_rows: tuple[int, int], block_geometry: tuple, interpret: bool
                 ) -> jax.Array:
  """The compressed block each row's token at ``pos_B`` would complete (:func:`block_rows`),
  without the compressors' last bias, in one kernel.

  Args:
    raw: the cache's raw compressed keys and values [B, S, G, D], without the token.
    tokens_NBGD: the step's key/value arrays' tokens (compute dtype); ``token_rows`` names the
      raw keys' and values' of them. The token is the block's last row wherever a block is
      complete (blocks of the other rows are never written).
    weights: the compressors' (w1 [2,L,D,2D], const [2,2D], w2 [2,2D,D]) of
      :meth:`BlockCompressor.kernel_weights` stacked k, v.
    block_geometry: ``(("block_len", L), ("block_stride", s))``.
  Returns [2, B, G, D] in the tokens' dtype: products of compute-dtype operands in float32,
  the first layer's sum and the gelu each rounded once (:func:`decode_block_reference`, whose
  gradient this takes). Needs :func:`decode_block_supported` and a raw array within
  INPUTS_BLOCK_MAX_ELEMENTS (its int32 gather indexes)."""
  return _decode_block(raw, tokens_NBGD, pos_B, weights, token_rows, block_geometry, interpret)


def _reference_gradient(kernel, reference, num_diff: int, static: tuple[str, ...]) -> None:
  """Gives the custom_vjp ``kernel`` (its first ``num_diff`` arguments differentiable, then the
  ``static`` ones, named as ``reference`` takes them, then ``interpret``) the gradient of
  ``reference``."""
  def fwd(*args):
    return kernel(*args), args[:num_diff]

  def bwd(*args):
    *statics, _, res, ct = args
    _, vjp = jax.vjp(functools.partial(reference, **dict(zip(static, statics))), *res)
    return vjp(ct)

  kernel.defvjp(fwd, bwd)


_reference_gradient(decode_block, decode_block_reference, 4, ("token_rows", "block_geometry"))


# decode_block's kernel writing the cache as well (write_cache's stores, the compressors' last
# bias added to the block): one launch a layer instead of two. Each program (b, m, g) of
# decode_block's grid, a program a row (whatever BLOCK_ROWS), stores its block at the row's
# slot and the token's (b, g) rows of the raw array it compresses (where a row has a slot, the
# row at the token's position it loads is the block's last, which the token replaces, so the
# store there cannot change the block; decode_block_write) and of two of the other four.
# H100, session 42, the arc1 rollout (`train.bench --only decode --lens 2048`, variant
# block_write, two device calls): 159.9 and 158.6 ms a step (means of 2) against 166.1 and
# 165.1 (means of 3 and 2) with the two kernels, 1.04x; deviceless sm_90
# (train.kernel_count): 56.875 launches a step against 62.875, no cache array copied. The same
# stores, bit for bit (tests; on the H100 too).
BLOCK_WRITE = True


def _block_write_kernel(pos_ref, slot_ref, tok_ref, w1_ref, c1_ref, w2_ref, bias_ref, *refs,
                        token_rows: tuple[int, int], geometry: dict):
  num = len(refs) // 2
  arrays, outs = refs[:num], refs[num:]  # the N + 2 cache arrays, and their aliases
  b, m, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  pos, slot = pos_ref[b], slot_ref[b]
  others = [i for i in range(num - 2) if i not in token_rows]
  for mm in range(2):
    @pl.when(m == mm)
    def _(mm=mm):
      block_D = _compress_row(arrays[token_rows[mm]], tok_ref, token_rows[mm], pos_ref, w1_ref,
                              c1_ref, w2_ref, b, mm, g, **geometry)

      @pl.when((pos >= 0) & (pos < geometry["seq_len"]))
      def _():
        for i in (token_rows[mm], *others[mm::2]):
          outs[i][b, pos, g, :] = tok_ref[i, b, g, :].astype(outs[i].dtype)

      @pl.when(slot >= 0)
      def _():
        out = outs[num - 2 + mm]  # as write_cache stores it, from the cache's dtype
        out[b, slot, g, :] = _add_bias(block_D.astype(out.dtype), bias_ref[mm])


def decode_block_write_reference(token_arrays, tokens_NBGD, pos_B, block_arrays, slot_B,
                                 weights, block_bias_MD, *, token_rows, block_geometry):
  """What :func:`decode_block_write` computes, in XLA (its gradient, and the tests'
  reference): :func:`decode_block_reference`'s blocks written by
  :func:`write_cache_reference`."""
  blocks_2BGD = decode_block_reference(tuple(token_arrays[n] for n in token_rows), tokens_NBGD,
                                       pos_B, weights, token_rows=token_rows,
                                       block_geometry=block_geometry)
  return write_cache_reference(token_arrays, tokens_NBGD.astype(token_arrays[0].dtype), pos_B,
                               block_arrays, blocks_2BGD.astype(block_arrays[0].dtype), slot_B,
                               block_bias_MD)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def decode_block_write(token_arrays: tuple, tokens_NBGD: jax.Array, pos_B: jax.Array,
                       block_arrays: tuple, slot_B: jax.Array, weights: tuple,
                       block_bias_MD: jax.Array, token_rows: tuple[int, int],
                       block_geometry: tuple, interpret: bool) -> tuple:
  """:func:`decode_block` and :func:`write_cache` (with the compressors' last biases
  ``block_bias_MD`` [2, D]) in one kernel: each row's token (``tokens_NBGD``, compute dtype)
  written into the N [B,S,G,D] ``token_arrays`` at ``pos_B`` and the block it completes into
  the two [B,N,G,D] ``block_arrays`` at ``slot_B`` (-1 or N and past: none), computed from the
  raw arrays ``token_rows`` names (two different ones). A row's slot must be -1 (or past N)
  unless its token completes its block, as the layer's ``_block_slots`` gives it: the row at
  the token's position is then read only as the block's last row, which the token replaces, so
  that a program's store of the token there cannot change its block. Returns the N + 2
  updated arrays (written in place where XLA can), the same numbers as the two kernels
  (:func:`decode_block_write_reference`'s gradient). Needs :func:`decode_block_supported` and
  a raw array within INPUTS_BLOCK_MAX_ELEMENTS."""
  if len(set(token_rows)) != 2:
    raise ValueError(f"decode_block_write: token_rows must name two different arrays, got "
                     f"{token_rows}")
  arrays = tuple(token_arrays) + tuple(block_arrays)
  B, S = token_arrays[0].shape[:2]
  G = token_arrays[0].shape[2]
  dt = tokens_NBGD.dtype
  w1, const, w2 = weights
  kernel = functools.partial(_block_write_kernel, token_rows=tuple(token_rows),
                             geometry=dict(block_geometry, seq_len=S))
  slot_B = jnp.where(slot_B < block_arrays[0].shape[1], slot_B, -1)
  inputs = [pos_B.astype(jnp.int32), slot_B.astype(jnp.int32), tokens_NBGD,
            w1.astype(dt).reshape(2, -1, w1.shape[-1]), const.astype(_F32), w2.astype(dt),
            block_bias_MD]
  return pl.pallas_call(
      kernel, grid=(B, 2, G),
      out_shape=tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays),
      input_output_aliases={len(inputs) + i: i for i in range(len(arrays))},
      interpret=interpret, compiler_params=_compiler_params(interpret, BLOCK_NUM_WARPS),
  )(*inputs, *arrays)


_reference_gradient(decode_block_write, decode_block_write_reference, 7,
                    ("token_rows", "block_geometry"))


def _decode_inputs(x_BC, w_q, w_kv, w_gate, b_gate, cos_BF, sin_BF, block, norm_scale_C,
                   rotate, block_geometry, norm_eps, interpret):
  B, C = x_BC.shape
  D = 2 * cos_BF.shape[1]
  H, G = w_q.shape[1] // D, w_kv.shape[1] // (6 * D)
  dt = x_BC.dtype
  if block is not None and {0, 1} & set(rotate):
    raise ValueError(f"decode_inputs: the compressor reads the raw arrays 0 and 1 unrotated, "
                     f"got rotate={rotate}")
  rows = min(max(_pow2_at_least(B), 16), INPUTS_ROWS)
  out_shape = [jax.ShapeDtypeStruct((B, H, D), dt), jax.ShapeDtypeStruct((B, H, D), dt),
               jax.ShapeDtypeStruct((6, B, G, D), dt), jax.ShapeDtypeStruct((B * H * 3,), dt)]
  if (norm_scale_C is None) != (norm_eps is None):
    raise ValueError("decode_inputs: norm_scale_C and norm_eps go together")
  extra = [] if norm_scale_C is None else [norm_scale_C]
  settings = None
  if block is not None:
    raw, pos_B, (w1, const, w2) = block
    extra += [*(a.reshape(-1) for a in raw), pos_B.astype(jnp.int32),
             w1.astype(dt).reshape(2, -1, w1.shape[-1]), const.astype(_F32), w2.astype(dt)]
    settings = dict(block_geometry, seq_len=raw[0].shape[1])
    out_shape.append(jax.ShapeDtypeStruct((2, B, G, D), dt))
  kernel = functools.partial(_inputs_kernel, batch=B, rows=rows, heads=H, groups=G,
                             head_dim=D, rotate=tuple(rotate),
                             gate_cols=max(16, _pow2_at_least(H)), block=settings,
                             norm_eps=norm_eps)
  outs = pl.pallas_call(
      kernel, grid=(-(-B // rows), H + 6 * G + 1), out_shape=tuple(out_shape),
      interpret=interpret, compiler_params=_compiler_params(interpret, INPUTS_NUM_WARPS),
  )(x_BC, w_q.astype(dt), w_kv.astype(dt), w_gate.astype(dt).T, b_gate, cos_BF, sin_BF, *extra)
  return (*outs[:3], outs[3].reshape(B, H, 3), *outs[4:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10, 11, 12))
def decode_inputs(x_BC: jax.Array, w_q: jax.Array, w_kv: jax.Array, w_gate: jax.Array,
                  b_gate: jax.Array, cos_BF: jax.Array, sin_BF: jax.Array, block: tuple | None,
                  norm_scale_C: jax.Array | None, rotate: tuple[int, ...],
                  block_geometry: tuple | None, norm_eps: float | None, interpret: bool):
  """The NSA layer's input products for one token a row, in one kernel.

  Args:
    x_BC: the rows' features, in the compute dtype: normalised, or to be normalised here
      (``norm_scale_C``).
    w_q [C, H*D], w_kv [C, 6*G*D], w_gate [C, 3H], b_gate [3H]: the three input kernels and
      the gate's bias (converted to x's dtype).
    cos_BF, sin_BF: float32 [B, D/2], each row's rotary angles' cosines and sines
      (``layers.rope_cos_sin``).
    block: None, or (the cache's raw compressed keys and values [B,S,G,D] (kv arrays 0 and
      1), ``pos_B``, the compressors' (w1 [2,L,D,2D], const [2,2D], w2 [2,2D,D]) of
      :meth:`BlockCompressor.kernel_weights` stacked k, v): also the block each row's token
      completes (:func:`block_rows`), compressed without the last bias.
    rotate: the key/value arrays (indices of the six) that carry RoPE.
    norm_scale_C, norm_eps: None, or an RMSNorm's gains [C] (float32) and epsilon, applied
      to ``x_BC`` first (``layers.rms_norm``; INPUTS_NORM).
    block_geometry: with ``block``, ``(("block_len", L), ("block_stride", s))``.
  Returns (q_BHD rotated, q_raw_BHD, kv_6BGD, gates_BH3[, blocks_2BGD]), all in x's dtype: the
  products rounded as nn.Dense rounds them, RoPE, the gates' sigmoid and the compressor's gelu
  in float32, each rounded once (:func:`decode_inputs_reference`, whose gradient this
  takes). Needs :func:`decode_inputs_supported`."""
  return _decode_inputs(x_BC, w_q, w_kv, w_gate, b_gate, cos_BF, sin_BF, block, norm_scale_C,
                        rotate, block_geometry, norm_eps, interpret)


_reference_gradient(decode_inputs, decode_inputs_reference, 9,
                    ("rotate", "block_geometry", "norm_eps"))



# Tried, not kept (session 43, commit 4f4e237 "decode_output: ..."; docs/benchmarks.md): the NSA
# layer's decoding step ending in one kernel, its output product, the block's residual add and
# the DynMoE's RMSNorm of the sum (XLA: the product's gemm fusion, 1.9 us a layer on the H100
# in session 42's profile, and the add with the norm, 2.1 us). Fewer launches, slower: H100, the
# arc1 rollout (`train.bench --config configs/arc1.yaml --only decode --lens 2048`) 164.5 and
# 163.8 ms against 161.5 and 158.9 with XLA's launches (the kernel 5.8 us a layer: two programs
# of 16 rows, each reading the whole [256, 256] weight at once); walking the weight in steps of
# 64 rows 160.5 and 160.8 against 156.3 and 156.0 (0.97x); at 8 warps 161.3. The norm needs
# whole rows, so a program reads the whole weight, where XLA's product spreads it over many.
