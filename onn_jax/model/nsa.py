"""Native Sparse Attention core (Yuan et al. 2025, "Native Sparse Attention", eqs. 5-12).

The pure attention math of NSA, without projections, compression MLP, RoPE or KV cache (the
NSA layer owns those and calls :func:`nsa_core`). For every query token at absolute position
``p`` and query head ``h`` (GQA: head ``h`` belongs to key/value group ``h // (H // G)``):

    o = g_cmp * Attn(q, K_cmp[visible], V_cmp[visible])                       (eq. 5, 7-8)
      + g_slc * Attn(q, K_slc[selected blocks, <= p], V_slc[...])            (eq. 9-12)
      + g_win * Attn(q, K_win[p - window + 1 .. p], V_win[...])

with ``Attn`` the softmax attention with scale ``1/sqrt(D)``, computed in float32.

* **Compressed branch.** Compressed block ``i`` summarises keys ``[i*block_stride,
  i*block_stride + block_len)`` and is visible to ``p`` iff its last key is ``<= p``. A query
  that sees no block yet gets exactly zero from this branch.
* **Selection.** Selection block ``j`` covers keys ``[j*select_len, (j+1)*select_len)``. Its
  importance for ``p`` (eq. 9-10) is the compressed-branch probability mass of the visible
  compression blocks overlapping it, summed over the query heads of the GQA group (eq. 10), so
  the group shares one choice. Candidates are blocks starting at or before ``p``; blocks ``0``,
  ``p // select_len`` and ``p // select_len - 1`` are always taken and count towards
  ``num_select``; the remaining slots go to the most important candidates, ties to the lower
  block index (eq. 11). Fewer candidates than ``num_select`` leave masked slots, never
  duplicates. The selection is a discrete choice: no gradient flows through it.
* **Window branch.** Keys at positions ``[p - window + 1, p]``.

Two implementations of the selected and window branches share the compressed branch and the
selection (O(B*T*H*N) memory, ``N`` compressed blocks, plus O(B*T*G*S/select_len) scores):

* ``impl="reference"``: dense masked attention over all ``S`` keys, one [B,T,H,S] logits tensor
  per branch: memory O(B*T*H*S). Simple and obviously right; the test oracle.
* ``impl="blockwise"``: the selected branch gathers, per query and GQA group, only the
  ``num_select`` chosen blocks: keys/values O(B*T*G*num_select*select_len*D), logits
  O(B*T*H*num_select*select_len). The window branch cuts the queries into chunks of ``window``
  and attends each chunk to the contiguous band of keys it can see, so keys are not copied per
  query: keys/values O(B*(T + window)*G*D), logits O(B*T*H*min(T + window, 2*window)). Never
  O(T*S). The gather's gradient is a one-hot contraction instead of a scatter-add (custom VJP),
  so forward-mode autodiff (jvp) of this implementation is not available.
* ``impl="pallas"``: memory linear in T, but for the masks of packed rows (below, each at
  most ``PALLAS_MASK_ELEMS`` elements). For rows from position 0 (training and prefill,
  packed rows too), the compressed branch is one causal attention over query groups (cuDNN
  on GPU, ``PALLAS_CMP_ATTENTION``; packed rows add a [B,1,N,N] mask) and the block choice
  one fused Pallas pass (``nsa_pallas.block_choice``: float32 probabilities, overlap sums and
  top-k per tile of queries; ``PALLAS_CHOICE``). Queries from an offset, at least
  ``PALLAS_OFFSET_MIN_QUERIES`` of them (a continuation against its prompt: EAVI's branch,
  ``"extend"`` mode), take the same attention over their query groups (a [B,1,groups,N]
  mask), the choice kernel and the window kernel over each row's band of keys. Other shapes
  (one-token decoding, short offsets) run the compressed branch and the choice over chunks of
  queries (``PALLAS_CMP_CHUNK_ELEMS`` bounds a chunk's [B,C,H,N] logits; the backward pass
  recomputes a chunk). Neither [B,T,H,N]
  probabilities nor [B,T,G,J] scores exist at once; the selected branch is the Pallas kernel
  pair of :mod:`onn_jax.model.nsa_pallas` (reads only the chosen blocks; key-major backward,
  its kernel without atomics); for rows from position 0 (``q_offset`` the Python int 0,
  T == S) and long offset queries the window branch is a Pallas kernel too
  (``nsa_pallas.window_attention``: a band
  of key tiles a tile of queries, packed rows masked by their sequence starts, no mask
  tensor; ``PALLAS_WINDOW = "cudnn"`` takes cuDNN's sliding-window attention instead, as
  before 2026-12-03), else the chunked band attention above.
  One-token decoding reads the compressed keys, the chosen blocks and the window band only;
  by default (``PALLAS_DECODE``) it is one kernel a call (``nsa_pallas.decode_attention``:
  all three branches, the choice and the gated sum; its gradient is the unfused path's).
  Off GPU the kernels run in Pallas interpret mode (for tests). Timings against cuDNN and
  blockwise: ``python -m train.nsa_kernel_check`` (results in docs/bench/).
* ``impl="auto"``: ``pallas`` on GPU (when R, D and ``select_len`` are powers of two; it is
  also taken where blockwise runs about as fast, e.g. one very long sequence, because
  blockwise's gathered keys need O(T*num_select*select_len) memory); else
  ``blockwise`` when ``T * S > AUTO_BLOCKWISE_MIN_TS`` (2**19) and each query
  gathers at most a quarter of the keys (``num_select*select_len + window <= S / 4``), else
  ``reference`` (thresholds measured with ``python -m train.bench`` on an H200). One-token
  decoding off GPU uses the reference (its [B,1,H,S] logits are small).

Numerics: logits and softmax in float32; probabilities are rounded to the values' dtype
before the value product (accumulated in float32), a no-op for float32 inputs. Matrix
products use JAX's default precision, which on GPU may be TF32 for float32 inputs: compare
float32 implementations there under ``jax.default_matmul_precision("highest")``.

``q_cmp`` (optional, every impl): separate queries for the compressed branch and the block
scores, e.g. the layer's queries before RoPE (compressed keys carry no rotation).

All implementations agree to float32 rounding (with 16-bit inputs the pallas path rounds each
branch's output to the input dtype before the float32 gated sum:
``nsa_pallas.BRANCH_OUT_DTYPE``); they are jit-able with the geometry static, differentiable
in every array input, and pure ``jax.numpy`` (vmap / shard_map friendly).
"""

from __future__ import annotations

import functools
import math
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

from onn_jax.model import nsa_pallas

IMPLS = ("reference", "blockwise", "pallas", "auto")
# impl="auto" switches to the gathering implementation above this many query-key pairs, when
# each query gathers at most 1/AUTO_BLOCKWISE_MIN_SPARSITY of the keys (see resolve_impl).
AUTO_BLOCKWISE_MIN_TS = 1 << 19
AUTO_BLOCKWISE_MIN_SPARSITY = 4

QOffset = Union[int, jax.Array, np.ndarray]

_F32 = jnp.float32


def num_compressed_blocks(seq_len: int, block_len: int, block_stride: int) -> int:
  """Number of compression blocks that fit entirely in ``seq_len`` keys.

  Block ``i`` covers ``[i*block_stride, i*block_stride + block_len)``, so this is
  ``max(0, (seq_len - block_len) // block_stride + 1)``.
  """
  return max(0, (seq_len - block_len) // block_stride + 1)


def num_selection_blocks(seq_len: int, select_len: int) -> int:
  """Number of selection blocks ``ceil(seq_len / select_len)`` (the last may be partial)."""
  return -(-seq_len // select_len)


def pack_alignment(block_stride: int, select_len: int) -> int:
  """The position every sequence of a packed row starts at a multiple of (see ``nsa_core``'s
  ``segment_start``): ``lcm(block_stride, select_len)``."""
  return math.lcm(block_stride, select_len)


def resolve_impl(impl: str, *, num_queries: int, seq_len: int, keys_per_query: int,
                 backend: str | None = None, pallas_tiles_ok: bool = True) -> str:
  """Maps ``impl`` ("reference" | "blockwise" | "pallas" | "auto") to a concrete name.

  On GPU (``backend``, default ``jax.default_backend()``) "auto" takes "pallas" whenever the
  kernels accept the tile sizes (``pallas_tiles_ok``, see
  :func:`onn_jax.model.nsa_pallas.pallas_supported`). Elsewhere, or with tile sizes the
  Triton lowering rejects, "auto" takes "blockwise" when ``num_queries * seq_len >
  AUTO_BLOCKWISE_MIN_TS`` and the keys each query gathers, ``keys_per_query =
  num_select*select_len + window``, are at most ``seq_len / AUTO_BLOCKWISE_MIN_SPARSITY``;
  otherwise "reference".
  """
  if impl not in IMPLS:
    raise ValueError(f"nsa_core: impl={impl!r} is not one of {IMPLS}")
  if impl == "auto":
    if pallas_tiles_ok and (backend or jax.default_backend()) == "gpu":
      return "pallas"
    big = num_queries * seq_len > AUTO_BLOCKWISE_MIN_TS
    sparse = keys_per_query * AUTO_BLOCKWISE_MIN_SPARSITY <= seq_len
    return "blockwise" if big and sparse else "reference"
  return impl


def auto_impl_summary(backend: str | None = None, *, pallas_tiles_ok: bool = True) -> str:
  """What ``impl="auto"`` runs on ``backend`` (default: the current one), for a run's log.

  "pallas" on GPU when the tile sizes suit it (``nsa_pallas.pallas_supported``), else
  "blockwise or reference (by size)".
  """
  if (backend or jax.default_backend()) == "gpu" and pallas_tiles_ok:
    return "pallas"
  return "blockwise or reference (by size)"


def query_positions(q_offset: QOffset, batch: int, num_queries: int) -> jax.Array:
  """Absolute positions ``pos[b, t] = q_offset[b] + t`` as int32 [B, T].

  ``q_offset`` is a Python int, a scalar int array, or an int array of shape [B].
  """
  off = jnp.asarray(q_offset)
  if not jnp.issubdtype(off.dtype, jnp.integer):
    raise TypeError(f"nsa_core: q_offset must be an integer, got dtype {off.dtype}")
  if off.ndim == 0:
    off = jnp.broadcast_to(off, (batch,))
  elif off.shape != (batch,):
    raise ValueError(
        f"nsa_core: q_offset must be a scalar or have shape [B]=({batch},), got {off.shape}")
  return off.astype(jnp.int32)[:, None] + jnp.arange(num_queries, dtype=jnp.int32)[None, :]


def compression_selection_overlap(num_cmp: int, num_sel: int, block_len: int,
                                  block_stride: int, select_len: int) -> np.ndarray:
  """Static [N, J] float32 0/1 matrix: compression block i intersects selection block j."""
  start_N = np.arange(num_cmp) * block_stride
  start_J = np.arange(num_sel) * select_len
  overlap_NJ = ((start_N[:, None] < start_J[None, :] + select_len)
                & (start_J[None, :] < start_N[:, None] + block_len))
  return overlap_NJ.astype(np.float32)


def _masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax over the last axis restricted to ``mask``; all-masked rows give all zeros.

  Masked entries never reach ``exp`` with a finite value, so neither the forward pass nor the
  gradient can produce NaN.
  """
  logits = jnp.where(mask, logits, -jnp.inf)
  max_ = jnp.max(logits, axis=-1, keepdims=True)
  # The shift only stabilises exp; softmax is invariant to it, so no gradient is needed.
  max_ = jax.lax.stop_gradient(jnp.where(jnp.isfinite(max_), max_, 0.0))
  exp_ = jnp.where(mask, jnp.exp(logits - max_), 0.0)
  denom = jnp.sum(exp_, axis=-1, keepdims=True)
  return exp_ / jnp.where(denom > 0, denom, 1.0)


def _attend_values(spec: str, probs: jax.Array, values: jax.Array) -> jax.Array:
  """``einsum(spec, probs, values)`` accumulated in float32.

  The probabilities are rounded to the values' dtype (a no-op in float32) so that bf16 values
  are never copied to float32: with gathered keys that copy would dominate memory.
  """
  return jnp.einsum(spec, probs.astype(values.dtype), values, preferred_element_type=_F32)


def _compressed_branch(q_BTGRD: jax.Array, k_cmp_BNGD: jax.Array, v_cmp_BNGD: jax.Array,
                       pos_BT: jax.Array, block_len: int, block_stride: int,
                       lo_BT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Attention over visible compressed blocks (eq. 5, 7-8).

  ``lo_BT`` (packed rows): the first key position each query may see; a block starting
  before it belongs to an earlier sequence and is masked.
  Returns the branch output [B,T,G,R,D] and its probabilities [B,T,G,R,N] (float32, zero on
  blocks not yet visible).
  """
  num_cmp = k_cmp_BNGD.shape[1]
  if num_cmp == 0:  # the sequence is shorter than one compression block
    B, T, G, R, D = q_BTGRD.shape
    return jnp.zeros((B, T, G, R, D), _F32), jnp.zeros((B, T, G, R, 0), _F32)
  scale = 1.0 / math.sqrt(q_BTGRD.shape[-1])
  first_N = jnp.arange(num_cmp, dtype=jnp.int32) * block_stride
  visible_BTN = first_N[None, None, :] + (block_len - 1) <= pos_BT[:, :, None]
  if lo_BT is not None:
    visible_BTN &= first_N[None, None, :] >= lo_BT[:, :, None]
  logits_BTGRN = jnp.einsum("btgrd,bngd->btgrn", q_BTGRD, k_cmp_BNGD,
                            preferred_element_type=_F32) * scale
  probs_BTGRN = _masked_softmax(logits_BTGRN, visible_BTN[:, :, None, None, :])
  out_BTGRD = _attend_values("btgrn,bngd->btgrd", probs_BTGRN, v_cmp_BNGD)
  return out_BTGRD, probs_BTGRN


def selection_scores(p_cmp: jax.Array, *, num_groups: int, seq_len: int, block_len: int,
                     block_stride: int, select_len: int) -> jax.Array:
  """Selection-block importance (eq. 9-10), shared by the query heads of a GQA group.

  Args:
    p_cmp: compressed-branch attention probabilities [B,T,H,N] (zero on invisible blocks).
    num_groups: G; head h belongs to group ``h // (H // G)``.
    seq_len: S, the number of key positions.
  Returns:
    float32 [B,T,G,J], ``J = ceil(S / select_len)``: score of block j is the sum over the
    group's heads and over the compression blocks overlapping block j of ``p_cmp``.
  """
  B, T, H, N = p_cmp.shape
  p_BTGN = p_cmp.astype(_F32).reshape(B, T, num_groups, H // num_groups, N).sum(axis=3)
  # A selection block overlaps a short run of W consecutive compression blocks, so the
  # importance is a sum over a static [J, W] table of block indices (index N: a zero column)
  # rather than a dense [N, J] product (O(T*N*J), which dominated at long sequences).
  idx_JW = _overlap_table(N, num_selection_blocks(seq_len, select_len), block_len,
                          block_stride, select_len)
  p_BTGN1 = jnp.pad(p_BTGN, [(0, 0)] * 3 + [(0, 1)])
  return jnp.sum(jnp.take(p_BTGN1, jnp.asarray(idx_JW), axis=-1), axis=-1)


@functools.lru_cache(maxsize=64)
def _overlap_table(num_cmp: int, num_sel: int, block_len: int, block_stride: int,
                   select_len: int) -> np.ndarray:
  """Static int32 [J, W]: the compression blocks overlapping each selection block (see
  :func:`compression_selection_overlap`), padded with ``num_cmp`` (a zero column)."""
  overlap_NJ = compression_selection_overlap(num_cmp, num_sel, block_len, block_stride,
                                             select_len).astype(bool)
  width = max(1, int(overlap_NJ.sum(axis=0).max(initial=0)))
  table = np.full((num_sel, width), num_cmp, np.int32)
  for j in range(num_sel):
    rows = np.flatnonzero(overlap_NJ[:, j])
    table[j, :len(rows)] = rows
  return table


def select_blocks(scores: jax.Array, pos: jax.Array, *, num_select: int, select_len: int,
                  lo: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Chooses ``num_select`` selection blocks per query and group (eq. 11).

  Args:
    scores: block importance [B,T,G,J] (treated as a constant: no gradient).
    pos: absolute query positions [B,T] int.
    lo: packed rows: the first position of each query's sequence [B,T] (a multiple of
      ``select_len``); its block plays block 0's part and earlier blocks are not candidates.
  Returns:
    ``(idx, valid)``, both [B,T,G,num_select]: int32 block indices, distinct within a row, and
    a bool mask of the slots in use. Forced blocks (0, ``p//select_len``, ``p//select_len - 1``)
    come first, then candidates by decreasing score, ties to the lower index. Unused slots
    (fewer candidates than ``num_select``) have ``valid = False``.
  """
  num_sel = scores.shape[-1]
  j_J = jnp.arange(num_sel, dtype=jnp.int32)
  cur_BT1 = (pos // select_len)[:, :, None]
  first_BT1 = 0 if lo is None else (lo // select_len)[:, :, None]
  candidate_BTJ = (j_J <= cur_BT1) & (j_J >= first_BT1)
  forced_BTJ = ((j_J == first_BT1) | (j_J == cur_BT1) | (j_J == cur_BT1 - 1)) & candidate_BTJ
  scores_BTGJ = jax.lax.stop_gradient(scores).astype(_F32)
  key_BTGJ = jnp.where(forced_BTJ[:, :, None, :], jnp.inf,
                       jnp.where(candidate_BTJ[:, :, None, :], scores_BTGJ, -jnp.inf))
  k = min(num_select, num_sel)
  # lax.top_k puts the lower index first among equal values: deterministic tie-breaking.
  _, idx_BTGK = jax.lax.top_k(key_BTGJ, k)
  idx_BTGK = idx_BTGK.astype(jnp.int32)
  valid_BTGK = idx_BTGK <= cur_BT1[..., None]
  if lo is not None:
    valid_BTGK &= idx_BTGK >= first_BT1[..., None]
  if k < num_select:
    pad = [(0, 0)] * 3 + [(0, num_select - k)]
    idx_BTGK = jnp.pad(idx_BTGK, pad)
    valid_BTGK = jnp.pad(valid_BTGK, pad, constant_values=False)
  return idx_BTGK, valid_BTGK


def _dense_attention(q_BTGRD: jax.Array, k_BSGD: jax.Array, v_BSGD: jax.Array,
                     mask_BTGS: jax.Array) -> jax.Array:
  """Masked softmax attention over all S keys: [B,T,G,R,D] float32."""
  scale = 1.0 / math.sqrt(q_BTGRD.shape[-1])
  logits_BTGRS = jnp.einsum("btgrd,bsgd->btgrs", q_BTGRD, k_BSGD,
                            preferred_element_type=_F32) * scale
  probs_BTGRS = _masked_softmax(logits_BTGRS, mask_BTGS[:, :, :, None, :])
  return _attend_values("btgrs,bsgd->btgrd", probs_BTGRS, v_BSGD)


def _reference_branches(q_BTGRD, k_slc, v_slc, k_win, v_win, idx_BTGK, valid_BTGK, pos_BT,
                        select_len: int, window: int, lo_BT=None) -> tuple[jax.Array, jax.Array]:
  """Selected and window branches as dense masked attention: O(B*T*H*S) memory."""
  S = k_slc.shape[1]
  num_sel = num_selection_blocks(S, select_len)
  s_S = jnp.arange(S, dtype=jnp.int32)
  chosen_BTGJ = jnp.any(
      (idx_BTGK[..., None] == jnp.arange(num_sel, dtype=jnp.int32)) & valid_BTGK[..., None],
      axis=-2)
  causal_BTS = s_S[None, None, :] <= pos_BT[:, :, None]
  if lo_BT is not None:
    causal_BTS &= s_S[None, None, :] >= lo_BT[:, :, None]
  sel_BTGS = jnp.take(chosen_BTGJ, s_S // select_len, axis=-1) & causal_BTS[:, :, None, :]
  win_BTS = causal_BTS & (s_S[None, None, :] > pos_BT[:, :, None] - window)
  out_slc = _dense_attention(q_BTGRD, k_slc, v_slc, sel_BTGS)
  out_win = _dense_attention(q_BTGRD, k_win, v_win, win_BTS[:, :, None, :])
  return out_slc, out_win


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gather_blocks(num_blocks: int, x_BJLGD: jax.Array, idx_BTGK: jax.Array) -> jax.Array:
  """``x[b, idx[b,t,g,k], :, g, :]`` as [B,T,G,K,L,D] (``num_blocks`` = J, for the VJP)."""
  B, G = x_BJLGD.shape[0], x_BJLGD.shape[3]
  # Advanced indices on axes 0, 1, 3 broadcast to [B,T,G,K] and go first: [B,T,G,K,L,D].
  return x_BJLGD[jnp.arange(B)[:, None, None, None], idx_BTGK, :,
                 jnp.arange(G)[None, None, :, None], :]


def _gather_blocks_fwd(num_blocks, x_BJLGD, idx_BTGK):
  return _gather_blocks(num_blocks, x_BJLGD, idx_BTGK), idx_BTGK


def _gather_blocks_bwd(num_blocks, idx_BTGK, ct_BTGKLD):
  # The autodiff transpose of the gather is a scatter-add in which every key block receives
  # contributions from many queries; on GPU (bf16 atomics above all) that ran 10-50x slower
  # than this one-hot contraction, which is exact: each output sums the same cotangents.
  onehot_BTGKJ = (idx_BTGK[..., None]
                  == jnp.arange(num_blocks, dtype=idx_BTGK.dtype)).astype(ct_BTGKLD.dtype)
  dx_BJLGD = jnp.einsum("btgkj,btgkld->bjlgd", onehot_BTGKJ, ct_BTGKLD,
                        precision=jax.lax.Precision.HIGHEST, preferred_element_type=_F32)
  return dx_BJLGD.astype(ct_BTGKLD.dtype), None


_gather_blocks.defvjp(_gather_blocks_fwd, _gather_blocks_bwd)


def _selected_blockwise(q_BTGRD, k_slc, v_slc, idx_BTGK, valid_BTGK, pos_BT,
                        select_len: int) -> jax.Array:
  """Selected branch over the K gathered blocks of each (query, group): [B,T,G,R,D]."""
  B, S, G, D = k_slc.shape
  R = q_BTGRD.shape[3]
  K = idx_BTGK.shape[-1]
  num_sel = num_selection_blocks(S, select_len)
  pad = [(0, 0), (0, num_sel * select_len - S), (0, 0), (0, 0)]
  blk_shape = (B, num_sel, select_len, G, D)
  k_sel = _gather_blocks(num_sel, jnp.pad(k_slc, pad).reshape(blk_shape), idx_BTGK)
  v_sel = _gather_blocks(num_sel, jnp.pad(v_slc, pad).reshape(blk_shape), idx_BTGK)
  keypos_BTGKL = idx_BTGK[..., None] * select_len + jnp.arange(select_len, dtype=jnp.int32)
  mask_BTGKL = (valid_BTGK[..., None] & (keypos_BTGKL <= pos_BT[:, :, None, None, None])
                & (keypos_BTGKL < S))
  logits = jnp.einsum("btgrd,btgkld->btgrkl", q_BTGRD, k_sel,
                      preferred_element_type=_F32) / math.sqrt(D)
  probs = _masked_softmax(logits.reshape(B, -1, G, R, K * select_len),
                          mask_BTGKL.reshape(B, -1, G, 1, K * select_len))
  return _attend_values("btgrkl,btgkld->btgrd", probs.reshape(logits.shape), v_sel)


def _window_blockwise(q_BTGRD, k_win, v_win, pos_BT, window: int, lo_BT=None) -> jax.Array:
  """Sliding-window branch over a band of keys, chunked along the queries: [B,T,G,R,D].

  ``lo_BT`` (packed rows): keys before each query's sequence start are masked too.

  Example b's queries need keys ``[q_offset_b - w + 1, q_offset_b + T - 1]``: one contiguous
  band of ``T + w - 1`` rows (a left pad stands for negative positions). For ``T <= w`` all
  queries attend to the whole band. Otherwise queries are cut into chunks of ``C = w`` and
  chunk c attends to band rows ``[c*C, c*C + 2C)``, which hold every key its queries can see.
  Keys are not duplicated per query (unlike a [B,T,w,G,D] gather) and the logits are
  [B,T,H,min(T + w - 1, 2w)].
  """
  B, T, G, R, D = q_BTGRD.shape
  S = k_win.shape[1]
  w = min(window, S)  # p < S, so a longer window sees nothing more
  X = T + w - 1
  off_B = pos_BT[:, 0]
  take_band = jax.vmap(lambda x, o: jax.lax.dynamic_slice_in_dim(x, o, X, axis=0))
  left = [(0, 0), (w - 1, 0), (0, 0), (0, 0)]
  # Band row x holds absolute position off_b + x - (w - 1).
  k_band = take_band(jnp.pad(k_win, left), off_B)
  v_band = take_band(jnp.pad(v_win, left), off_B)
  if T <= w:
    C, n, KX = T, 1, X
    k_c, v_c, q_c = k_band[:, None], v_band[:, None], q_BTGRD[:, None]
  else:
    C, KX = w, 2 * w
    n = -(-T // C)
    rows = [(0, 0), (0, (n + 1) * C - X), (0, 0), (0, 0)]
    k_c = jnp.pad(k_band, rows).reshape(B, n + 1, C, G, D)
    v_c = jnp.pad(v_band, rows).reshape(B, n + 1, C, G, D)
    k_c = jnp.concatenate([k_c[:, :-1], k_c[:, 1:]], axis=2)  # [B,n,2C,G,D]
    v_c = jnp.concatenate([v_c[:, :-1], v_c[:, 1:]], axis=2)
    q_c = jnp.pad(q_BTGRD, [(0, 0), (0, n * C - T)] + [(0, 0)] * 3).reshape(B, n, C, G, R, D)
  # Query i of chunk c sits on band row c*C + i + w - 1 and key x on row c*C + x, so
  # p - keypos = i + w - 1 - x.
  dist_CX = jnp.arange(C)[:, None] + (w - 1) - jnp.arange(KX)[None, :]
  keypos_BnX = (off_B[:, None, None] + jnp.arange(n)[None, :, None] * C
                + jnp.arange(KX)[None, None, :] - (w - 1))
  mask_BnCX = (((dist_CX >= 0) & (dist_CX < w))[None, None]
               & (keypos_BnX >= 0)[:, :, None, :])
  if lo_BT is not None:
    lo_BnC = jnp.pad(lo_BT, [(0, 0), (0, n * C - T)]).reshape(B, n, C)
    mask_BnCX &= keypos_BnX[:, :, None, :] >= lo_BnC[..., None]
  logits = jnp.einsum("bcigrd,bcxgd->bcigrx", q_c, k_c,
                      preferred_element_type=_F32) / math.sqrt(D)
  probs = _masked_softmax(logits, mask_BnCX[:, :, :, None, None, :])
  out = _attend_values("bcigrx,bcxgd->bcigrd", probs, v_c)
  return out.reshape(B, n * C, G, R, D)[:, :T]


def _blockwise_branches(q_BTGRD, k_slc, v_slc, k_win, v_win, idx_BTGK, valid_BTGK, pos_BT,
                        select_len: int, window: int, lo_BT=None) -> tuple[jax.Array, jax.Array]:
  """Selected and window branches from gathered keys only: no [T, S] tensor is built.
  (Chosen blocks never start before ``lo_BT``: the selected branch needs no extra mask.)"""
  out_slc = _selected_blockwise(q_BTGRD, k_slc, v_slc, idx_BTGK, valid_BTGK, pos_BT,
                                select_len)
  out_win = _window_blockwise(q_BTGRD, k_win, v_win, pos_BT, window, lo_BT)
  return out_slc, out_win


# impl="pallas": the compressed branch and the block choice run over chunks of queries, each
# chunk's [B,C,H,N] logits bounded by this many elements (float32: 256 MiB).
PALLAS_CMP_CHUNK_ELEMS = 1 << 26


def _compressed_and_selection_chunked(q_BTGRD, k_cmp, v_cmp, pos_BT, lo_BT, *, seq_len: int,
                                      block_len: int, block_stride: int, select_len: int,
                                      num_select: int, choose: bool = True
                                      ) -> tuple[jax.Array, jax.Array | None]:
  """Compressed branch and block choice over chunks of queries: memory linear in T.

  Returns the compressed-branch output [B,T,G,R,D] float32 and the chosen selection blocks
  int32 [B,T,G,num_select] (``-1`` for unused slots; None with ``choose=False``). Each chunk
  of C queries builds its [B,C,H,N] probabilities, turns them into block importances and a
  top-n choice, and keeps only the output and the indices; the backward pass recomputes a
  chunk's probabilities (``jax.checkpoint``). No [B,T,H,N] or [B,T,G,J] tensor exists at once.
  """
  B, T, G, R, D = q_BTGRD.shape
  N = k_cmp.shape[1]
  C = _chunk_len(B, T, G, R, N)

  @jax.checkpoint
  def chunk(q_c, pos_c, lo_c):
    out_c, p_c = _compressed_branch(q_c, k_cmp, v_cmp, pos_c, block_len, block_stride, lo_c)
    if not choose:
      return out_c, None
    idx_c = _choose_blocks(jax.lax.stop_gradient(p_c), pos_c, lo_c, seq_len=seq_len,
                           block_len=block_len, block_stride=block_stride,
                           select_len=select_len, num_select=num_select)
    return out_c, idx_c

  return _over_query_chunks(chunk, (q_BTGRD, pos_BT, lo_BT), C)


def _chunk_len(B: int, T: int, G: int, R: int, N: int) -> int:
  """Queries per chunk so that a chunk's [B,C,G,R,N] logits hold PALLAS_CMP_CHUNK_ELEMS."""
  return max(1, min(T, PALLAS_CMP_CHUNK_ELEMS // max(1, B * G * R * max(N, 1))))


def _over_query_chunks(fn, arrays, C: int):
  """``fn`` over chunks of C queries of per-query arrays [B,T,...] (None passes through), with
  ``jax.lax.map``; its per-query outputs [B,C,...] reassembled to [B,T,...]. The last chunk is
  padded by repeating the last query, whose copies are dropped."""
  T = arrays[0].shape[1]
  n = -(-T // C)
  if n == 1:
    return fn(*arrays)

  def split(x):
    x = jnp.pad(x, [(0, 0), (0, n * C - T)] + [(0, 0)] * (x.ndim - 2), mode="edge")
    return jnp.moveaxis(x.reshape((x.shape[0], n, C) + x.shape[2:]), 1, 0)

  def join(y):
    y = jnp.moveaxis(y, 0, 1)
    return y.reshape((y.shape[0], n * C) + y.shape[3:])[:, :T]

  out = jax.lax.map(lambda xs: fn(*xs), tuple(None if x is None else split(x) for x in arrays))
  return jax.tree.map(join, out)


def _choose_blocks(p_BTGRN, pos_BT, lo_BT, *, seq_len: int, block_len: int, block_stride: int,
                   select_len: int, num_select: int) -> jax.Array:
  """The selection blocks [B,T,G,K] int32 (``-1`` for unused slots) from the compressed
  probabilities [B,T,G,R,N] (eq. 9-11)."""
  B, T, G, R, N = p_BTGRN.shape
  scores = selection_scores(p_BTGRN.reshape(B, T, G * R, N), num_groups=G, seq_len=seq_len,
                            block_len=block_len, block_stride=block_stride,
                            select_len=select_len)
  return _top_blocks(scores, pos_BT, lo_BT, num_select=num_select, select_len=select_len)


def _top_blocks(scores_BTGJ, pos_BT, lo_BT, *, num_select: int, select_len: int) -> jax.Array:
  """:func:`select_blocks` with the unused slots marked ``-1``: [B,T,G,K] int32."""
  idx, valid = select_blocks(scores_BTGJ, pos_BT, num_select=num_select,
                             select_len=select_len, lo=lo_BT)
  return jnp.where(valid, idx, -1)


# impl="pallas": how the compressed branch's output is computed for rows from position 0,
# packed or not ("folded": one causal attention over the query groups, cuDNN on GPU, see
# _compressed_folded; "chunked": the XLA chunks above, which every other shape takes but long
# offset queries, PALLAS_OFFSET_MIN_QUERIES). nsa_core
# fwd+bwd on an H200 (train.nsa_kernel_check, 2026-11-30): folded 6.2 / 9.1 / 10.1 ms against
# chunked 8.9 / 23.6 / 34.7 ms at 32x2048 / 8x8192 / 1x32768.
PALLAS_CMP_ATTENTION = "folded"
FOLDED_PAD = 64  # the folded attention's length (query groups = blocks) is a multiple of this
# impl="pallas", folded compressed branch: how the block choice is made ("kernel":
# nsa_pallas.block_choice, one fused pass that stores only the chosen blocks, where
# block_choice_supported; "chunked": XLA over chunks of queries, _selection_chunked).
# H200, forward: measured in train.nsa_kernel_check --breakdown (docs/benchmarks.md).
PALLAS_CHOICE = "kernel"
# impl="pallas", every other shape (queries not from position 0, fewer than
# PALLAS_OFFSET_MIN_QUERIES: one-token decoding; packed rows past PALLAS_MASK_ELEMS): "fused",
# the choice inside the compressed branch's XLA chunks; "kernel", the chunks compute the
# output alone and the choice is nsa_pallas.block_choice (which takes any query positions),
# where block_choice_supported. H200, one-token decoding at 32 x 2048: "kernel" 1.5x slower
# (train.nsa_kernel_check --decode 32x2048 --variants offset_choice_kernel), so "fused".
PALLAS_OFFSET_CHOICE = "fused"
# impl="pallas", queries not from position 0 (one sequence a row): from this many queries on
# (an answer continued against its prompt: EAVI's alignment branch and its rollout's passes),
# the compressed branch is one attention over the queries' groups (_compressed_folded_offset),
# the choice nsa_pallas.block_choice and the window branch the window kernel over each row's
# band of keys (_window_band_kernel), instead of the XLA chunks above. H200, arc1 at 32 x 2048
# with 931 continuation tokens: EAVI's alignment as a branch 91.3 ms fwd+bwd against 114.5,
# the rollout's 4 passes against the cache 73.0 against 112.8
# (docs/bench/eavi_offset_path_ab_h200_2026-12-04.json). The threshold itself is not tuned.
PALLAS_OFFSET_MIN_QUERIES = 64


def _fold_queries(x_BTGRD: jax.Array, num_cmp: int, block_len: int, block_stride: int
                  ) -> jax.Array:
  """[B,T,G,R,D] queries at positions 0..T-1 -> [B,N,G*s*R,D] (s = block_stride).

  Query p sees compressed blocks ``0..g`` with ``g = (p - block_len + 1) // s``: the s queries
  of group g share one causal row over the N blocks. Queries before ``block_len - 1`` (which
  see nothing) are dropped; the last group is zero-padded. Heads are ordered (kv group, query
  of the group, head in the group), so GQA maps each folded head to its own kv group.
  """
  B, T, G, R, D = x_BTGRD.shape
  s, first = block_stride, block_len - 1
  x = x_BTGRD[:, first:]
  x = jnp.pad(x, [(0, 0), (0, num_cmp * s - x.shape[1])] + [(0, 0)] * 3)
  x = x.reshape(B, num_cmp, s, G, R, D).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(B, num_cmp, G * s * R, D)


def _unfold(x_BNF: jax.Array, T: int, G: int, R: int, block_len: int, block_stride: int,
            fill: float) -> jax.Array:
  """Inverse of :func:`_fold_queries` for per-head arrays [B,N,G*s*R,...] -> [B,T,G,R,...];
  the positions before ``block_len - 1`` get ``fill``."""
  B, N = x_BNF.shape[:2]
  s, first = block_stride, block_len - 1
  tail = x_BNF.shape[3:]
  x = x_BNF.reshape((B, N, G, s, R) + tail).swapaxes(2, 3).reshape((B, N * s, G, R) + tail)
  x = x[:, :T - first]
  head = jnp.full((B, first, G, R) + tail, fill, x.dtype)
  return jnp.concatenate([head, x], axis=1)


def _pad_blocks(k_cmp, v_cmp):
  """Compressed keys and values padded with zero blocks to a multiple of FOLDED_PAD: cuDNN
  takes no odd lengths when training, and a multiple of its 64-row tiles costs nothing extra."""
  N = -(-k_cmp.shape[1] // FOLDED_PAD) * FOLDED_PAD
  return tuple(jnp.pad(x, [(0, 0), (0, N - x.shape[1]), (0, 0), (0, 0)]) for x in (k_cmp, v_cmp))


def _compressed_folded(q_BTGRD, k_cmp, v_cmp, *, block_len: int, block_stride: int,
                       lo_BT: jax.Array | None = None) -> jax.Array:
  """The compressed branch's output [B,T,G,R,D] (float32, or the inputs' dtype per
  ``nsa_pallas.BRANCH_OUT_DTYPE``; queries at 0..T-1 of T keys) as one
  square causal attention over query groups (:func:`_fold_queries`): cuDNN's fused kernel on
  GPU for 16-bit inputs.

  Packed rows (``lo_BT``, sequences starting at multiples of ``block_stride``): query group g
  sees only the blocks of the sequence holding block g's first key, through a [B,1,N,N] mask
  (cuDNN takes it as a bias). Every query of the group that sees anything belongs to that
  sequence; the others (the first ``block_len - 1`` of the next sequence) get zero."""
  from onn_jax.model.attention.full import attention_implementation
  B, T, G, R, D = q_BTGRD.shape
  # Padded blocks come last, so causally only the padded query groups (dropped) see them.
  k_cmp, v_cmp = _pad_blocks(k_cmp, v_cmp)
  N = k_cmp.shape[1]
  q_BNFD = _fold_queries(q_BTGRD, N, block_len, block_stride)
  mask = None
  if lo_BT is not None:
    first_N = jnp.arange(N, dtype=jnp.int32) * block_stride
    # Block g's own start is in its sequence, so no row is masked entirely.
    row_lo_BN = jnp.take(lo_BT, jnp.minimum(first_N, T - 1), axis=1)
    mask = (first_N[None, None, :] >= row_lo_BN[:, :, None])[:, None]
  out_BNFD = jax.nn.dot_product_attention(q_BNFD, k_cmp, v_cmp, mask=mask, is_causal=True,
                                          implementation=attention_implementation(q_BNFD.dtype))
  out_BTGRD = _unfold(out_BNFD.astype(nsa_pallas.branch_out_dtype(out_BNFD.dtype)), T, G, R,
                      block_len, block_stride, 0.0)
  if lo_BT is None:
    return out_BTGRD
  sees_BT = jnp.arange(T, dtype=jnp.int32)[None, :] - lo_BT >= block_len - 1
  return jnp.where(sees_BT[:, :, None, None, None], out_BTGRD, 0.0)


def _compressed_folded_offset(q_BTGRD, k_cmp, v_cmp, off_B, *, block_len: int,
                              block_stride: int) -> jax.Array:
  """:func:`_compressed_folded` for queries at positions ``off_B[b] + t`` (one sequence a row).

  Query p belongs to group ``g = (p - block_len + 1) // s`` (it sees blocks ``0..g``); a row's
  T queries touch at most ``ceil((T + s - 1) / s)`` consecutive groups from ``g0_b``, folded as
  in :func:`_fold_queries` after shifting each row by ``(off_b - block_len + 1) mod s``. Local
  group j sees blocks ``<= g0_b + j`` through a [B,1,groups,N] mask (cuDNN takes it as a
  bias). Queries before ``block_len - 1`` see no block and get zero. [B,T,G,R,D] as
  :func:`_compressed_folded`'s."""
  from onn_jax.model.attention.full import attention_implementation
  B, T, G, R, D = q_BTGRD.shape
  s, first = block_stride, block_len - 1
  rel_B = off_B.astype(jnp.int32) - first
  g0_B = rel_B // s  # floor: negative for queries before the first block
  # Each row's queries placed at local positions first + shift_B .., so that local position p
  # folds into local group (p - first) // s = global group - g0_B.
  at_B = first + rel_B - g0_B * s
  groups = -(-(T + s - 1) // s)  # the most a row's T queries touch
  NG = -(-groups // FOLDED_PAD) * FOLDED_PAD
  L = first + NG * s
  k_cmp, v_cmp = _pad_blocks(k_cmp, v_cmp)
  zeros = jnp.zeros((L, G, R, D), q_BTGRD.dtype)
  q = jax.vmap(lambda x, at: jax.lax.dynamic_update_slice_in_dim(zeros, x, at, 0))(q_BTGRD, at_B)
  q_BNFD = _fold_queries(q, NG, block_len, block_stride)
  # Groups before the first block see block 0 here (no row masked entirely) and are zeroed.
  last_BN = jnp.maximum(g0_B[:, None] + jnp.arange(NG, dtype=jnp.int32)[None], 0)
  N = k_cmp.shape[1]
  mask = (jnp.arange(N, dtype=jnp.int32)[None, None, :] <= last_BN[:, :, None])[:, None]
  out_BNFD = jax.nn.dot_product_attention(q_BNFD, k_cmp, v_cmp, mask=mask,
                                          implementation=attention_implementation(q_BNFD.dtype))
  out = _unfold(out_BNFD.astype(nsa_pallas.branch_out_dtype(out_BNFD.dtype)), L, G, R,
                block_len, block_stride, 0.0)
  out_BTGRD = jax.vmap(lambda x, at: jax.lax.dynamic_slice_in_dim(x, at, T, 0))(out, at_B)
  sees_BT = query_positions(off_B, B, T) >= first
  return jnp.where(sees_BT[:, :, None, None, None], out_BTGRD, 0.0)


def _selection_chunked(q_BTGRD, k_cmp, pos_BT, lo_BT, *, seq_len: int, block_len: int,
                       block_stride: int, select_len: int, num_select: int) -> jax.Array:
  """The block choice from the compressed probabilities, recomputed in float32 over chunks of
  queries (forward only: the choice carries no gradient). Chosen blocks [B,T,G,K] int32,
  ``-1`` for unused slots; ``lo_BT``: packed rows (as in :func:`_compressed_branch`).

  Not from the folded attention's log-sum-exp: cuDNN returns it in the inputs' dtype, and a
  bf16 log-sum-exp (error up to 0.03 at arc1 sizes) weighs the heads of a group unequally and
  changed 1% of the choices on an H200."""
  B, T, G, R, D = q_BTGRD.shape
  N = k_cmp.shape[1]
  scale = 1.0 / math.sqrt(D)
  first_N = jnp.arange(N, dtype=jnp.int32) * block_stride

  def chunk(q_c, pos_c, lo_c):
    logits = jnp.einsum("btgrd,bngd->btgrn", q_c, k_cmp, preferred_element_type=_F32) * scale
    visible = first_N[None, None, :] + (block_len - 1) <= pos_c[:, :, None]
    if lo_c is not None:
      visible &= first_N[None, None, :] >= lo_c[:, :, None]
    p_c = _masked_softmax(logits, visible[:, :, None, None])
    return _choose_blocks(p_c, pos_c, lo_c, seq_len=seq_len, block_len=block_len,
                          block_stride=block_stride, select_len=select_len,
                          num_select=num_select)

  q_BTGRD, k_cmp = jax.lax.stop_gradient((q_BTGRD, k_cmp))
  return _over_query_chunks(chunk, (q_BTGRD, pos_BT, lo_BT), _chunk_len(B, T, G, R, N))


def _folded_choice(q_BTGRD, k_cmp, pos_BT, lo_BT, *, seq_len: int, block_len: int,
                   block_stride: int, select_len: int, num_select: int) -> jax.Array:
  """The block choice [B,T,G,K] (``-1``: unused slot) beside the folded compressed branch
  (from position 0, or from an offset: PALLAS_OFFSET_MIN_QUERIES), or beside the chunked one
  with PALLAS_OFFSET_CHOICE "kernel" (``lo_BT``: packed rows): the
  fused Pallas kernel where it serves the geometry (PALLAS_CHOICE), else the XLA chunks."""
  geo = dict(block_len=block_len, block_stride=block_stride, select_len=select_len)
  if PALLAS_CHOICE not in ("kernel", "chunked"):
    raise ValueError(f"nsa.PALLAS_CHOICE must be 'kernel' or 'chunked', got {PALLAS_CHOICE!r}")
  if PALLAS_CHOICE == "chunked" or not nsa_pallas.block_choice_supported(**geo):
    return _selection_chunked(q_BTGRD, k_cmp, pos_BT, lo_BT, seq_len=seq_len,
                              num_select=num_select, **geo)
  return nsa_pallas.block_choice(
      *jax.lax.stop_gradient((q_BTGRD, k_cmp)), pos_BT, lo_BT,
      num_sel=num_selection_blocks(seq_len, select_len), num_select=num_select,
      interpret=nsa_pallas.use_interpret(), **geo)


# impl="pallas", packed rows: the folded compressed branch takes a [B,1,N,N] mask, and on GPU
# the window branch is cuDNN's sliding-window attention with a [B,1,T,T] mask (cuDNN takes
# masks as a bias), each while its mask holds at most this many elements; else the XLA chunks
# and the chunked band attention. H200, 32 x 2048 fwd+bwd: window 1.42 ms against 2.11 ms for
# the band attention (one sequence a row, no mask: 1.06 ms), compressed branch and choice
# 1.02 + 0.65 ms against 2.55 ms for the chunks; docs/bench/nsa_packed_masks_probe_*.
PALLAS_MASK_ELEMS = 1 << 28


# impl="pallas": the window branch of queries at positions 0..T-1 over T keys (and of long
# offset queries, PALLAS_OFFSET_MIN_QUERIES: the kernel over each row's band). "kernel":
# nsa_pallas.window_attention (any dtype, packed rows without a mask; interpret mode off GPU);
# "cudnn": cuDNN's sliding-window attention on GPU (16-bit dtypes), the chunked band attention
# elsewhere.
PALLAS_WINDOW = "kernel"


def _window_pallas_path(q_BTGRD, k_win, v_win, pos_BT, window: int,
                        offset_is_zero: bool, lo_BT=None) -> jax.Array:
  """Window branch for impl="pallas": for queries at positions 0..T-1 over T keys, the
  window kernel (``PALLAS_WINDOW = "kernel"``) or cuDNN's sliding-window attention on GPU (16-bit
  dtype; packed rows while the mask is small enough, PALLAS_MASK_ELEMS); for at least
  PALLAS_OFFSET_MIN_QUERIES queries from an offset (one sequence a row), the window kernel over
  each row's band (:func:`_window_band_kernel`); else the chunked band attention of the
  blockwise implementation (which reads only each chunk's band of keys)."""
  B, T, G, R, D = q_BTGRD.shape
  S = k_win.shape[1]
  if PALLAS_WINDOW not in ("kernel", "cudnn"):
    raise ValueError(f"nsa.PALLAS_WINDOW must be 'kernel' or 'cudnn', got {PALLAS_WINDOW!r}")
  if PALLAS_WINDOW == "kernel" and offset_is_zero and T == S:
    return nsa_pallas.window_attention(q_BTGRD, k_win, v_win, lo_BT, window,
                                       nsa_pallas.use_interpret())
  if PALLAS_WINDOW == "kernel" and lo_BT is None and T >= PALLAS_OFFSET_MIN_QUERIES:
    return _window_band_kernel(q_BTGRD, k_win, v_win, pos_BT[:, 0], window)
  cudnn_ok = (jax.default_backend() == "gpu" and offset_is_zero and T == S
              and (lo_BT is None or B * T * S <= PALLAS_MASK_ELEMS)
              and q_BTGRD.dtype in (jnp.bfloat16, jnp.float16)
              and k_win.dtype == q_BTGRD.dtype and v_win.dtype == q_BTGRD.dtype)
  if not cudnn_ok:
    return _window_blockwise(q_BTGRD, k_win, v_win, pos_BT, window, lo_BT)
  return _window_band_attention(q_BTGRD, k_win, v_win, window, lo_BT, "cudnn")


def _window_band_kernel(q_BTGRD, k_win, v_win, off_B, window: int) -> jax.Array:
  """The window branch of queries at ``off_B[b] + t`` (one sequence a row) through the window
  kernel: each row's band of keys ``[off_b - w + 1, off_b + T)`` (w = window) with ``w - 1``
  zero queries in front, so that band query x sees band keys ``x - w + 1 .. x``. Band keys at
  negative positions are masked as the start of a packed sequence; a front query sees only
  its own key (finite, dropped): w - 1 queries more a row (14% more at arc1's window of 128
  and 931 answer tokens). [B,T,G,R,D] as ``nsa_pallas.window_attention``'s."""
  B, T, G, R, D = q_BTGRD.shape
  W = window - 1
  X = T + W
  band = jax.vmap(lambda x, o: jax.lax.dynamic_slice_in_dim(x, o, X, axis=0))
  left = [(0, 0), (W, 0), (0, 0), (0, 0)]
  off_B = off_B.astype(jnp.int32)
  k_band, v_band = band(jnp.pad(k_win, left), off_B), band(jnp.pad(v_win, left), off_B)
  q_band = jnp.pad(q_BTGRD, [(0, 0), (W, 0), (0, 0), (0, 0), (0, 0)])
  x_X = jnp.arange(X, dtype=jnp.int32)[None]
  lo_BX = jnp.where(x_X < W, x_X, jnp.maximum(W - off_B, 0)[:, None])
  out = nsa_pallas.window_attention(q_band, k_band, v_band, lo_BX, window,
                                    nsa_pallas.use_interpret())
  return out[:, W:]


def _window_band_attention(q_BTGRD, k_win, v_win, window: int, lo_BT, implementation
                           ) -> jax.Array:
  """The window branch of queries at 0..T-1 over T keys as one sliding-window attention
  (``jax.nn.dot_product_attention``; ``lo_BT``: packed rows, through a [B,1,T,T] mask):
  [B,T,G,R,D] (``nsa_pallas.BRANCH_OUT_DTYPE``)."""
  from onn_jax.model.attention.full import segment_mask
  B, T, G, R, D = q_BTGRD.shape
  mask = None if lo_BT is None else segment_mask(lo_BT)
  out_BTHD = jax.nn.dot_product_attention(
      q_BTGRD.reshape(B, T, G * R, D), k_win, v_win, mask=mask, is_causal=True,
      local_window_size=(min(window, T) - 1, 0), implementation=implementation)
  return out_BTHD.reshape(B, T, G, R, D).astype(nsa_pallas.branch_out_dtype(out_BTHD.dtype))


def _pallas_branches(q_BTGRD, q_cmp_BTGRD, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, pos_BT,
                     lo_BT, q_offset, *, block_len: int, block_stride: int, select_len: int,
                     num_select: int, window: int):
  """impl="pallas": the three branches' outputs (compressed, selected, window), each
  [B,T,G,R,D], float32 or (the kernels' and cuDNN's, ``nsa_pallas.BRANCH_OUT_DTYPE``) the
  inputs' dtype (see the module docstring for which path each shape takes)."""
  B, T, G, R, D = q_BTGRD.shape
  S = k_slc.shape[1]
  N = k_cmp.shape[1]
  from_start = (T == S and N > 0 and isinstance(q_offset, (int, np.integer)) and q_offset == 0
                and (lo_BT is None or B * N * N <= PALLAS_MASK_ELEMS))
  long_offset = (not from_start and lo_BT is None and N > 0
                 and T >= PALLAS_OFFSET_MIN_QUERIES)
  if PALLAS_CMP_ATTENTION == "folded" and (from_start or long_offset):
    if from_start:
      out_cmp = _compressed_folded(q_cmp_BTGRD, k_cmp, v_cmp, block_len=block_len,
                                   block_stride=block_stride, lo_BT=lo_BT)
    else:
      out_cmp = _compressed_folded_offset(q_cmp_BTGRD, k_cmp, v_cmp, pos_BT[:, 0],
                                          block_len=block_len, block_stride=block_stride)
    idx_BTGK = _folded_choice(q_cmp_BTGRD, k_cmp, pos_BT, lo_BT, seq_len=S,
                              block_len=block_len, block_stride=block_stride,
                              select_len=select_len, num_select=num_select)
  else:
    if PALLAS_OFFSET_CHOICE not in ("fused", "kernel"):
      raise ValueError(f"nsa.PALLAS_OFFSET_CHOICE must be 'fused' or 'kernel', got "
                       f"{PALLAS_OFFSET_CHOICE!r}")
    sel = dict(seq_len=S, block_len=block_len, block_stride=block_stride,
               select_len=select_len, num_select=num_select)
    apart = PALLAS_OFFSET_CHOICE == "kernel" and N > 0 and nsa_pallas.block_choice_supported(
        block_len=block_len, block_stride=block_stride, select_len=select_len)
    out_cmp, idx_BTGK = _compressed_and_selection_chunked(
        q_cmp_BTGRD, k_cmp, v_cmp, pos_BT, lo_BT, choose=not apart, **sel)
    if apart:
      idx_BTGK = _folded_choice(q_cmp_BTGRD, k_cmp, pos_BT, lo_BT, **sel)
  out_slc = nsa_pallas.selected_attention(q_BTGRD, k_slc, v_slc, idx_BTGK, pos_BT,
                                          select_len, nsa_pallas.use_interpret())
  offset_is_zero = isinstance(q_offset, (int, np.integer)) and q_offset == 0
  out_win = _window_pallas_path(q_BTGRD, k_win, v_win, pos_BT, window, offset_is_zero, lo_BT)
  return out_cmp, out_slc, out_win


def _gated(gates_BTH3, out_cmp, out_slc, out_win) -> jax.Array:
  """The branches' gated sum (eq. 5) in float32 (whatever the branches' dtypes): [B,T,G,R,D]
  float32."""
  B, T, G, R, D = out_cmp.shape
  gates_BTGR3 = gates_BTH3.astype(_F32).reshape(B, T, G, R, 3)
  return (gates_BTGR3[..., 0:1] * out_cmp + gates_BTGR3[..., 1:2] * out_slc
          + gates_BTGR3[..., 2:3] * out_win)


# impl="pallas", one query a row (one-token decoding against a KV cache, one sequence a row):
# "fused_xla_block" (the default): the whole core in one kernel a layer
# (nsa_pallas.decode_attention) and the NSA layer's cache writes in another, with the
# compressed block the token completes computed outside the core: by default in a kernel that
# also writes the cache (nsa_pallas.decode_block_write: BLOCK_KERNEL and BLOCK_WRITE, since
# sessions 40 and 42), else by that kernel, the input-products kernel (INPUTS_BLOCK) or XLA,
# then written by nsa_pallas.write_cache;
# "fused": the same with that block computed in the write kernel too
# (nsa_pallas.write_cache_compress); "split": the compressed branch and block choice in XLA,
# the selected kernel, the window band in XLA (_pallas_branches), about 17 launches a layer,
# also what any geometry the fused kernels do not take runs (fused_decoding,
# _fused_decode_applies). A decoding step of the arc1 model is bound by its many small
# kernels (docs/benchmarks.md, issue #16). H200, jax 0.11.2, 2026-12-05, the arc1 EAVI rollout
# (32 rows, 2048-slot cache): split 48.9k tokens/s, fused_xla_block 73.4k (1.50x), fused 62.8k
# (one run); fused_xla_block with the core kernel's later settings (nsa_pallas.DEC_SEL_TILE)
# 81.5k. H100, 2026-12-05 (session 21): fused_xla_block 84.3k, fused 76.7k.
PALLAS_DECODE = "fused_xla_block"
PALLAS_DECODE_CHOICES = ("split", "fused", "fused_xla_block")


def _decode_fused_setting() -> bool:
  """Whether ``PALLAS_DECODE`` is a fused one (a one-line error for an unknown setting)."""
  if PALLAS_DECODE not in PALLAS_DECODE_CHOICES:
    raise ValueError(f"nsa.PALLAS_DECODE must be one of {PALLAS_DECODE_CHOICES}, got "
                     f"{PALLAS_DECODE!r}")
  return PALLAS_DECODE != "split"


def block_in_write_kernel() -> bool:
  """Whether a fused decoding step computes the completed compressed block in the cache-write
  kernel (``PALLAS_DECODE = "fused"``) rather than in XLA."""
  return PALLAS_DECODE == "fused"


def fused_decoding(impl: str, *, heads_per_group: int, head_dim: int, select_len: int,
                   num_groups: int) -> bool:
  """Whether the NSA layer's decoding step writes its cache in one kernel
  (``nsa_pallas.decode_block_write`` or ``nsa_pallas.write_cache``): with ``PALLAS_DECODE``
  not "split" where ``impl`` resolves to "pallas" for one query and the [G, D] rows it stores
  are Triton tiles (powers of two)."""
  tiles_ok = nsa_pallas.pallas_supported(heads_per_group=heads_per_group, head_dim=head_dim,
                                         select_len=select_len)
  return (_decode_fused_setting() and nsa_pallas._is_pow2(num_groups)
          and resolve_impl(impl, num_queries=1, seq_len=1, keys_per_query=1,
                           pallas_tiles_ok=tiles_ok) == "pallas")


def _fused_decode_applies(q_BTGRD, k_cmp, k_slc, lo_BT, *, block_len: int, block_stride: int,
                          select_len: int, num_select: int, window: int) -> bool:
  _, T, _, R, D = q_BTGRD.shape
  return (_decode_fused_setting() and T == 1 and lo_BT is None and k_cmp.shape[1] > 0
          and nsa_pallas.decode_supported(
              heads_per_group=R, head_dim=D, block_len=block_len, block_stride=block_stride,
              select_len=select_len, num_select=num_select, window=window,
              seq_len=k_slc.shape[1],
              itemsize=max(k_slc.dtype.itemsize, q_BTGRD.dtype.itemsize)))


def _split_decode(q_BTGRD, q_cmp_BTGRD, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates,
                  pos_BT, geometry):
  """What the fused kernel computes, by :func:`_pallas_branches`: [B,1,G,R,D] float32."""
  branches = _pallas_branches(q_BTGRD, q_cmp_BTGRD, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win,
                              pos_BT, None, pos_BT[:, 0], **dict(geometry))
  return _gated(gates, *branches)


@functools.partial(jax.custom_vjp, nondiff_argnums=(10,))
def _fused_decode(q_BTGRD, q_cmp_BTGRD, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, pos_BT,
                  geometry):
  """One query a row through ``nsa_pallas.decode_attention``: [B,1,G,R,D] in q's dtype. Its
  gradient is that of :func:`_split_decode` (decoding is not differentiated in training; a
  user's gradient through it is still right)."""
  B, _, G, R, D = q_BTGRD.shape
  geo = dict(geometry)
  out_BGRD = nsa_pallas.decode_attention(
      q_BTGRD[:, 0], q_cmp_BTGRD[:, 0], k_cmp, v_cmp, k_slc, v_slc, k_win, v_win,
      gates.reshape(B, G, R, 3), pos_BT[:, 0],
      num_sel=num_selection_blocks(k_slc.shape[1], geo["select_len"]),
      interpret=nsa_pallas.use_interpret(), **geo)
  return out_BGRD[:, None]


def _fused_decode_fwd(*args):
  return _fused_decode(*args), args[:10]


def _fused_decode_bwd(geometry, res, ct):
  _, vjp = jax.vjp(lambda *a: _split_decode(*a, res[9], geometry), *res[:9])
  return vjp(ct.astype(_F32)) + (None,)


_fused_decode.defvjp(_fused_decode_fwd, _fused_decode_bwd)


def _check_inputs(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, q_offset, block_len,
                  block_stride, select_len, num_select, window) -> None:
  if q.ndim != 4:
    raise ValueError(f"nsa_core: q must be [B,T,H,D], got shape {q.shape}")
  B, T, H, D = q.shape
  if k_slc.ndim != 4 or k_slc.shape[0] != B or k_slc.shape[3] != D:
    raise ValueError(f"nsa_core: k_slc must be [B={B},S,G,D={D}], got shape {k_slc.shape}")
  S, G = k_slc.shape[1], k_slc.shape[2]
  for name, arr in (("v_slc", v_slc), ("k_win", k_win), ("v_win", v_win)):
    if arr.shape != k_slc.shape:
      raise ValueError(f"nsa_core: {name} must have k_slc's shape {k_slc.shape}, got {arr.shape}")
  if k_cmp.ndim != 4 or k_cmp.shape[0] != B or k_cmp.shape[2:] != (G, D):
    raise ValueError(f"nsa_core: k_cmp must be [B={B},N,G={G},D={D}], got shape {k_cmp.shape}")
  if v_cmp.shape != k_cmp.shape:
    raise ValueError(f"nsa_core: v_cmp must have k_cmp's shape {k_cmp.shape}, got {v_cmp.shape}")
  if gates.shape != (B, T, H, 3):
    raise ValueError(f"nsa_core: gates must be [B,T,H,3]={(B, T, H, 3)}, got {gates.shape}")
  if H % G != 0:
    raise ValueError(f"nsa_core: query heads H={H} must be a multiple of key/value groups G={G}")
  for name, val in (("block_len", block_len), ("block_stride", block_stride),
                    ("select_len", select_len), ("window", window)):
    if not isinstance(val, (int, np.integer)) or val < 1:
      raise ValueError(f"nsa_core: {name} must be a positive int, got {val!r}")
  if not isinstance(num_select, (int, np.integer)) or num_select < 3:
    raise ValueError(
        f"nsa_core: num_select must be an int >= 3 (three blocks are forced), got {num_select!r}")
  if isinstance(q_offset, (int, np.integer)) and not 0 <= q_offset <= S - T:
    raise ValueError(
        f"nsa_core: q_offset={q_offset} with T={T} queries needs 0 <= q_offset <= S - T = {S - T}")


def nsa_core(q: jax.Array, k_cmp: jax.Array, v_cmp: jax.Array, k_slc: jax.Array,
             v_slc: jax.Array, k_win: jax.Array, v_win: jax.Array, gates: jax.Array, *,
             block_len: int, block_stride: int, select_len: int, num_select: int, window: int,
             q_offset: QOffset = 0, impl: str = "reference",
             q_cmp: jax.Array | None = None,
             segment_start: jax.Array | None = None) -> jax.Array:
  """NSA attention: gated sum of compressed, selected and sliding-window attention (eq. 5).

  Args:
    q: queries [B,T,H,D]; query t of example b sits at position ``q_offset[b] + t``.
    k_cmp, v_cmp: compressed keys/values [B,N,G,D]; block i summarises key positions
      ``[i*block_stride, i*block_stride + block_len)``.
    k_slc, v_slc: selection-branch keys/values [B,S,G,D], ``S >= q_offset + T``.
    k_win, v_win: window-branch keys/values [B,S,G,D].
    gates: branch gates in [0, 1], [B,T,H,3] ordered (compressed, selected, window).
    block_len, block_stride, select_len, num_select, window: static NSA geometry.
    q_offset: Python int, scalar int array or int array [B] (traced values are fine).
    impl: "reference", "blockwise", "pallas" or "auto" (see the module docstring).
    q_cmp: queries [B,T,H,D] for the compressed branch and the block-importance scores only
      (the selected and window branches use ``q``). The NSA layer passes its queries before
      RoPE here, since compressed keys carry no rotation; default ``q``.
    segment_start: packed rows (several sequences one after the other): int [B,T], the
      position of the first token of each query's sequence. A query then sees nothing before
      it: no key of the window or selected branches, no compressed block starting earlier,
      and its sequence's first selection block takes block 0's forced place. Every sequence
      must start at a multiple of ``select_len`` and of ``block_stride``
      (:func:`pack_alignment`), so that blocks never straddle two sequences; each sequence
      is then attended exactly as if it were alone in its row. Default: one sequence a row.
  Returns:
    [B,T,H,D] in ``q.dtype`` (logits, softmax and the gated sum are float32).
  """
  _check_inputs(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, q_offset, block_len,
                block_stride, select_len, num_select, window)
  if q_cmp is None:
    q_cmp = q
  elif q_cmp.shape != q.shape:
    raise ValueError(f"nsa_core: q_cmp must have q's shape {q.shape}, got {q_cmp.shape}")
  B, T, H, D = q.shape
  S, G = k_slc.shape[1], k_slc.shape[2]
  R = H // G
  impl = resolve_impl(impl, num_queries=T, seq_len=S,
                      keys_per_query=num_select * select_len + window,
                      pallas_tiles_ok=nsa_pallas.pallas_supported(
                          heads_per_group=R, head_dim=D, select_len=select_len))
  pos_BT = query_positions(q_offset, B, T)
  lo_BT = None
  if segment_start is not None:
    if segment_start.shape != (B, T):
      raise ValueError(f"nsa_core: segment_start must be [B,T]={(B, T)}, got "
                       f"{segment_start.shape}")
    lo_BT = jnp.asarray(segment_start, jnp.int32)
  q_BTGRD = q.reshape(B, T, G, R, D)
  q_cmp_BTGRD = q_cmp.reshape(B, T, G, R, D)

  geometry = dict(block_len=block_len, block_stride=block_stride, select_len=select_len,
                  num_select=num_select, window=window)
  if impl == "pallas" and _fused_decode_applies(q_BTGRD, k_cmp, k_slc, lo_BT, **geometry):
    out_BTGRD = _fused_decode(q_BTGRD, q_cmp_BTGRD, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win,
                              gates, pos_BT, tuple(geometry.items()))
    return out_BTGRD.reshape(B, T, H, D).astype(q.dtype)
  if impl == "pallas":
    out_cmp, out_slc, out_win = _pallas_branches(
        q_BTGRD, q_cmp_BTGRD, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, pos_BT, lo_BT,
        q_offset, **geometry)
  else:
    out_cmp, p_cmp_BTGRN = _compressed_branch(q_cmp_BTGRD, k_cmp, v_cmp, pos_BT, block_len,
                                              block_stride, lo_BT)
    scores_BTGJ = selection_scores(p_cmp_BTGRN.reshape(B, T, H, -1), num_groups=G,
                                   seq_len=S, block_len=block_len, block_stride=block_stride,
                                   select_len=select_len)
    idx_BTGK, valid_BTGK = select_blocks(scores_BTGJ, pos_BT, num_select=num_select,
                                         select_len=select_len, lo=lo_BT)
    branches = _reference_branches if impl == "reference" else _blockwise_branches
    out_slc, out_win = branches(q_BTGRD, k_slc, v_slc, k_win, v_win, idx_BTGK, valid_BTGK,
                                pos_BT, select_len, window, lo_BT)

  return _gated(gates, out_cmp, out_slc, out_win).reshape(B, T, H, D).astype(q.dtype)
