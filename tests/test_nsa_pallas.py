"""Tests of ``nsa_core(impl="pallas")`` and its kernels against the dense reference.

On CPU the Pallas kernels run in interpret mode (slow), so the shapes are tiny; the geometries
are those of test_nsa_core (T not a multiple of the block sizes, per-example offsets, one-token
decoding, fewer selection blocks than ``num_select``). Also the ``q_cmp`` argument (the
compressed branch's own queries) in every implementation, the GPU dispatch rule, both
selected-branch backward kernels (key-major and atomic, small items spread over many
programs) and the key-major backward's item plan.

Tolerances (float32): every output and gradient entry is a sum of at most ~100 products of
O(1..10) terms (S <= 50 keys, D <= 8), computed in a different order than the reference; with
float32 rounding 6e-8 per operation that bounds differences by ~1e-5 absolute, and the
relative term covers the larger gradient entries.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onn_jax.model import nsa, nsa_pallas
from onn_jax.model.layers import rope_cos_sin
from onn_jax.model.nsa import nsa_core

import test_nsa_core

from test_nsa_core import (ARG_NAMES, GEOMETRIES, Geo, assert_bf16_close, make_inputs,
                           offsets_np, oracle_nsa, random_like, segment_start_of)

# float32 throughout. The kernels sum in another order than the reference (online softmax over
# blocks; dk/dv summed over every (query, head) that chose a key: up to T*R ~ 100 terms of
# O(1) products here), so each result carries up to ~100 roundings of eps_f32 = 1.2e-7 of its
# terms' size: rtol 1e-5 for O(1) values, atol 2e-5 for entries that are sums cancelling to ~0.
RTOL, ATOL = 1e-5, 2e-5

# The library's decoding setting, read before the fixture below changes it.
DEFAULT_DECODE = nsa.PALLAS_DECODE


@pytest.fixture(autouse=True)
def _split_decoding(monkeypatch):
  """One-token geometries here run the split path (the branches' own kernels), which every
  geometry the fused kernels do not take still runs; the fused kernels' tests set their
  setting themselves (and tests/test_model.py decodes a model with each)."""
  monkeypatch.setattr(nsa, "PALLAS_DECODE", "split")


@functools.lru_cache(maxsize=None)
def value_and_grad_fn(geo: Geo, impl: str, with_q_cmp: bool = False):
  """(args, q_offset, cot) -> (output, grads of <output, cot> for every input incl. q_cmp)."""
  names = ARG_NAMES + (("q_cmp",) if with_q_cmp else ())

  def loss(args, q_offset, cot):
    out = nsa_core(*(args[n] for n in ARG_NAMES), q_offset=q_offset, impl=impl,
                   q_cmp=args.get("q_cmp"), **geo.static())
    return jnp.sum(out * cot), out

  def run(args, q_offset, cot):
    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(
        {n: args[n] for n in names}, q_offset, cot)
    return out, grads

  return jax.jit(run)


@functools.lru_cache(maxsize=None)
def forward_fn(geo: Geo, impl: str):
  def run(args, q_offset):
    return nsa_core(*(args[n] for n in ARG_NAMES), q_offset=q_offset, impl=impl,
                    **geo.static())
  return jax.jit(run)


def _offset(q_offset):
  return jnp.asarray(q_offset, jnp.int32)


def _assert_close_all(got, want, names, rtol=RTOL, atol=ATOL):
  out_got, grads_got = got
  out_want, grads_want = want
  np.testing.assert_allclose(out_got, out_want, rtol=rtol, atol=atol)
  for name in names:
    g_got, g_want = np.asarray(grads_got[name]), np.asarray(grads_want[name])
    assert np.all(np.isfinite(g_got)), name
    np.testing.assert_allclose(g_got, g_want, rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_pallas_matches_reference_outputs_and_gradients(name):
  geo, q_offset = GEOMETRIES[name]
  args = make_inputs(geo, seed=len(name))
  cot = random_like((geo.B, geo.T, geo.H, geo.D), 99)
  want = value_and_grad_fn(geo, "reference")(args, _offset(q_offset), cot)
  got = value_and_grad_fn(geo, "pallas")(args, _offset(q_offset), cot)
  assert got[0].dtype == jnp.float32 and got[0].shape == (geo.B, geo.T, geo.H, geo.D)
  _assert_close_all(got, want, ARG_NAMES)
  np.testing.assert_allclose(got[0], oracle_nsa(args, geo, q_offset), rtol=RTOL, atol=ATOL)


def test_pallas_compressed_chunks(monkeypatch):
  """Several query chunks (the last one partial) give the same result as one chunk."""
  geo, q_offset = GEOMETRIES["per_example_offset"]  # T = 9, N = 10, H = 8
  # 4 queries per chunk: 9 = 4 + 4 + 1.
  monkeypatch.setattr(nsa, "PALLAS_CMP_CHUNK_ELEMS", geo.B * geo.H * geo.N * 4)
  args = make_inputs(geo, seed=21)
  cot = random_like((geo.B, geo.T, geo.H, geo.D), 5)

  # Not the cached value_and_grad_fn: the patched module constant is read when tracing.
  def run(impl):
    return value_and_grad_fn.__wrapped__(geo, impl)(args, _offset(q_offset), cot)

  _assert_close_all(run("pallas"), run("reference"), ARG_NAMES)


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_offset_queries_with_the_choice_kernel_match_reference(name, monkeypatch):
  """PALLAS_OFFSET_CHOICE="kernel": queries not known to start at position 0 (every geometry
  here: the offset is an array) take the choice kernel beside the chunked compressed output;
  outputs and gradients as the reference's. A bad setting is refused in one line."""
  geo, q_offset = GEOMETRIES[name]
  assert nsa_pallas.block_choice_supported(block_len=geo.block_len,
                                           block_stride=geo.block_stride,
                                           select_len=geo.select_len)
  monkeypatch.setattr(nsa, "PALLAS_OFFSET_CHOICE", "kernel")
  # Chunks of 4 queries: the output alone is reassembled from several (T > 4), or T = 1.
  monkeypatch.setattr(nsa, "PALLAS_CMP_CHUNK_ELEMS", geo.B * geo.H * geo.N * 4)
  traced, kernel = [], nsa_pallas.block_choice
  monkeypatch.setattr(nsa_pallas, "block_choice",
                      lambda *a, **kw: traced.append(1) or kernel(*a, **kw))
  args = make_inputs(geo, seed=len(name) + 1)
  cot = random_like((geo.B, geo.T, geo.H, geo.D), 98)
  # Not the cached value_and_grad_fn: the patched module constant is read when tracing.
  def run(impl):
    return value_and_grad_fn.__wrapped__(geo, impl)(args, _offset(q_offset), cot)

  _assert_close_all(run("pallas"), run("reference"), ARG_NAMES)
  assert traced, "the choice kernel was not taken"
  monkeypatch.setattr(nsa, "PALLAS_OFFSET_CHOICE", "kernal")
  with pytest.raises(ValueError, match="PALLAS_OFFSET_CHOICE must be 'fused' or 'kernel'"):
    forward_fn.__wrapped__(geo, "pallas")(args, _offset(q_offset))


@pytest.mark.parametrize("name", list(GEOMETRIES) + ["window_over_rows"])
def test_long_offset_queries_take_the_folded_and_window_paths(name, monkeypatch):
  """Queries not from position 0, at least PALLAS_OFFSET_MIN_QUERIES of them (lowered to 2
  here; an answer continued against its prompt): the compressed branch is one attention over
  the queries' groups and the window branch the window kernel over each row's band of keys
  (spied on); outputs and gradients as the reference's, also where a row's first queries see
  no compressed block or sit before the window's length (offsets 0 and 3), and with the window
  longer than the rows. One-token decoding keeps the chunks."""
  if name == "window_over_rows":
    geo, q_offset = test_nsa_core.FULL_GEO, np.array([0, 3])
  else:
    geo, q_offset = GEOMETRIES[name]
  monkeypatch.setattr(nsa, "PALLAS_OFFSET_MIN_QUERIES", 2)
  taken = set()
  for fn in ("_compressed_folded_offset", "_window_band_kernel"):
    real = getattr(nsa, fn)
    monkeypatch.setattr(nsa, fn, lambda *a, real=real, fn=fn, **kw: taken.add(fn) or real(*a, **kw))
  args = make_inputs(geo, seed=len(name) + 5)
  cot = random_like((geo.B, geo.T, geo.H, geo.D), 97)
  # Not the cached value_and_grad_fn: the patched module constants are read when tracing.
  def run(impl):
    return value_and_grad_fn.__wrapped__(geo, impl)(args, _offset(q_offset), cot)

  _assert_close_all(run("pallas"), run("reference"), ARG_NAMES)
  # The offset is an array here, so even offset 0 counts as not from position 0.
  want = {"_compressed_folded_offset", "_window_band_kernel"} if geo.T >= 2 else set()
  assert taken == want


def test_offset_queries_past_the_fold_padding_at_the_default_threshold(monkeypatch):
  """At the default PALLAS_OFFSET_MIN_QUERIES: 90 queries from offsets 0 and 27 (blocks of 6
  every 4 positions: 24 query groups and 29 blocks, each past one FOLDED_PAD, lowered to 16)
  take the folded and window paths and match the reference; 13 queries keep the chunks."""
  geo = test_nsa_core.Geo(B=2, T=90, S=120, H=2, G=1, D=4, block_len=6, block_stride=4,
                          select_len=8, num_select=3, window=9)
  assert geo.T >= nsa.PALLAS_OFFSET_MIN_QUERIES > test_nsa_core.GEOMETRIES[
      "group4_int_offset"][0].T
  monkeypatch.setattr(nsa, "FOLDED_PAD", 16)
  taken = []
  for fn in ("_compressed_folded_offset", "_window_band_kernel"):
    real = getattr(nsa, fn)
    monkeypatch.setattr(nsa, fn,
                        lambda *a, real=real, fn=fn, **kw: taken.append(fn) or real(*a, **kw))
  args = make_inputs(geo, seed=31)
  cot = random_like((geo.B, geo.T, geo.H, geo.D), 96)
  offset = _offset(np.array([0, 27]))
  got = value_and_grad_fn.__wrapped__(geo, "pallas")(args, offset, cot)
  # A key's gradient sums over up to T * R = 180 (query, head) terms, twice the ~100 that
  # RTOL/ATOL are derived for (module docstring): twice the tolerances.
  _assert_close_all(got, value_and_grad_fn.__wrapped__(geo, "reference")(args, offset, cot),
                    ARG_NAMES, rtol=2 * RTOL, atol=2 * ATOL)
  assert sorted(set(taken)) == ["_compressed_folded_offset", "_window_band_kernel"]
  taken.clear()
  geo, q_offset = test_nsa_core.GEOMETRIES["group4_int_offset"]
  forward_fn.__wrapped__(geo, "pallas")(make_inputs(geo, seed=1), _offset(q_offset))
  assert not taken


@pytest.mark.parametrize("name", ["group1_from_start", "per_example_offset"])
def test_pallas_causality(name):
  geo, q_offset = GEOMETRIES[name]
  args = make_inputs(geo, seed=8)
  off = offsets_np(q_offset, geo.B)
  cut_t = geo.T // 2
  cut_B = off + cut_t
  future = (np.arange(geo.S)[None, :] > cut_B[:, None])[:, :, None, None]
  perturbed = {k: (v + 3.0 * future if k in ("k_slc", "v_slc", "k_win", "v_win") else v)
               for k, v in args.items()}
  f = forward_fn(geo, "pallas")
  out = np.asarray(f(args, _offset(q_offset)))
  out_p = np.asarray(f(perturbed, _offset(q_offset)))
  np.testing.assert_array_equal(out_p[:, :cut_t + 1], out[:, :cut_t + 1])
  assert np.abs(out_p[:, cut_t + 1:] - out[:, cut_t + 1:]).max() > 1e-3


def test_pallas_bf16_close_to_fp32_reference():
  """bf16 inputs: keys and queries are exact in both runs, so the difference is the kernels'
  bf16 output rounding plus the probabilities' bf16 rounding before the value product
  (test_nsa_core.assert_bf16_close)."""
  geo, q_offset = GEOMETRIES["per_example_offset"]
  args16 = make_inputs(geo, seed=9, dtype=jnp.bfloat16)
  args32 = {k: v.astype(jnp.float32) for k, v in args16.items()}
  out16 = forward_fn(geo, "pallas")(args16, _offset(q_offset))
  out32 = forward_fn(geo, "reference")(args32, _offset(q_offset))
  assert out16.dtype == jnp.bfloat16
  assert_bf16_close(out16, out32, args32)


# ---------------------------------------------------------------- the selected-branch kernel

# (forward, dk/dv reduction[+dq], tokens per chunk[, keys per backward tile[, chunks per
# item]]): both forwards with both reductions, chunks of 2 tokens (many items per block,
# partial and empty items); blocks walked in tiles of 2 keys (both reductions); items of
# several chunks (a program walks its live ones, dk/dv summed over them) with both forwards
# and both reductions; dq added atomically with each. The first three run in the direct
# kernel test only.
BWD_VARIANTS = [("query", "partials", 16), ("keyblock", "partials", 16),
                ("query", "atomic", 2, 2),
                ("keyblock", "partials", 2), ("query", "atomic", 2),
                ("keyblock", "partials", 2, 2),
                ("keyblock", "partials", 1, None, 2),
                ("keyblock", "atomic", 1, 2, 4),
                ("query", "partials", 2, 2, 2),
                ("keyblock", "partials", 2, None, 2),
                ("keyblock", "partials+dq", 2),
                ("keyblock", "atomic+dq", 1, 2, 4),
                ("query", "partials+dq", 2, 2, 2)]


def _set_bwd(monkeypatch, variant):
  """(forward, dk/dv reduce (``+dq``: dq added atomically, nsa_pallas.DQ_REDUCE), chunk
  tokens[, key tile (None: the default)[, chunks per item]]). Items of several chunks: a
  program walks its live chunks (a block chosen by one token leaves the rest of its item
  empty; one chosen by three fills two chunks of 2)."""
  fwd, reduce, chunk, *rest = variant
  reduce, _, dq = reduce.partition("+")
  monkeypatch.setattr(nsa_pallas, "DQ_REDUCE", "atomic" if dq else "partials")
  tile = [t for t in rest[:1] if t is not None]
  monkeypatch.setattr(nsa_pallas, "ITEM_CHUNKS", rest[1] if len(rest) > 1 else 1)
  monkeypatch.setattr(nsa_pallas, "FWD_IMPL", fwd)
  monkeypatch.setattr(nsa_pallas, "DKDV_REDUCE", reduce)
  monkeypatch.setattr(nsa_pallas, "KEY_CHUNK", chunk)
  if tile:
    monkeypatch.setattr(nsa_pallas, "KEY_TILE", tile[0])


@pytest.mark.parametrize("variant", BWD_VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_selected_kernel_unused_slots_and_partial_last_block(variant, monkeypatch):
  """Direct kernel test: S = 10 is not a multiple of select_len = 4 (last block partial),
  slot -1 unused, keys after the query's position masked; against dense masked attention,
  for every forward and backward variant."""
  _set_bwd(monkeypatch, variant)
  B, T, S, G, R, D, L = 1, 3, 10, 2, 2, 4, 4
  rng = np.random.default_rng(0)
  q = rng.standard_normal((B, T, G, R, D)).astype(np.float32)
  k = rng.standard_normal((B, S, G, D)).astype(np.float32)
  v = rng.standard_normal((B, S, G, D)).astype(np.float32)
  pos = np.array([[2, 6, 9]], np.int32)
  idx = np.array([[[[0, -1, 1], [0, 1, -1]],
                   [[1, 0, -1], [1, -1, -1]],
                   [[2, 0, 1], [2, 1, -1]]]], np.int32)
  cot = rng.standard_normal((B, T, G, R, D)).astype(np.float32)

  def dense(q, k, v):
    blocks = jnp.arange(S) // L
    chosen = jnp.any((idx[..., None] == blocks) & (idx[..., None] >= 0), axis=-2)
    mask = chosen & (jnp.arange(S) <= pos[:, :, None, None])
    logits = jnp.einsum("btgrd,bsgd->btgrs", q, k) / math.sqrt(D)
    probs = jax.nn.softmax(jnp.where(mask[:, :, :, None], logits, -jnp.inf), axis=-1)
    return jnp.einsum("btgrs,bsgd->btgrd", probs, v)

  def kernel(q, k, v):
    return nsa_pallas.selected_attention(q, k, v, jnp.asarray(idx), jnp.asarray(pos), L, True)

  want = dense(q, k, v)
  want_grads = jax.grad(lambda *a: jnp.sum(dense(*a) * cot), (0, 1, 2))(q, k, v)
  got = kernel(q, k, v)
  got_grads = jax.grad(lambda *a: jnp.sum(kernel(*a) * cot), (0, 1, 2))(q, k, v)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  for g_got, g_want in zip(got_grads, want_grads):
    np.testing.assert_allclose(g_got, g_want, rtol=RTOL, atol=ATOL)


CHOICE_GEOS = {
    # One tile of selection blocks, R = 2, block_len not a multiple of the stride.
    "one_tile": Geo(B=2, T=37, S=37, H=4, G=2, D=8, block_len=6, block_stride=4, select_len=8,
                    num_select=4, window=9),
    # J = 75 selection blocks: 5 tiles walked (blocks reaching into the next tile), 5 tiles of
    # 64 queries (the last one partial), tiles past a query tile's last candidate skipped;
    # num_select = 5 (not a power of two).
    "many_tiles": Geo(B=1, T=300, S=300, H=2, G=1, D=4, block_len=4, block_stride=2,
                      select_len=4, num_select=5, window=9),
    # Compression blocks shorter than their stride (gaps), more slots than blocks (J = 3).
    "gaps_few_blocks": Geo(B=2, T=20, S=20, H=4, G=2, D=4, block_len=2, block_stride=4,
                           select_len=8, num_select=6, window=9),
}


# Packed rows for the many_tiles geometry (tiles of 64 positions), other starts in each row:
# sequences starting inside a tile, one spanning three tiles, query tiles holding two or three
# sequence starts; the third row's second sequence (20..289) starts inside tile 0 and is seen
# whole by later query tiles: tile 0 is masked for them (keys before 20), tile 1 is not (the
# kernel's unmasked interior tiles, CHOICE_INTERIOR_MIN_TILES).
CHOICE_PACKED_STARTS = [[0, 36, 48, 172, 264], [0, 100, 204], [0, 20, 290]]

# Fewer queries than keys, at other positions in each row (a second stream, or the answer
# against a cache's prompt): (queries, per-example q_offset) for a geometry.
CHOICE_OFFSETS = {"one_tile": (9, [28, 5]), "many_tiles": (70, [230, 61])}


def _choice_case(geo: Geo, starts=None, offsets=None):
  R = geo.H // geo.G
  args = make_inputs(geo, seed=3)
  q = args["q"].reshape(geo.B, geo.T, geo.G, R, geo.D)
  pos = jnp.broadcast_to(jnp.arange(geo.T, dtype=jnp.int32), (geo.B, geo.T))
  if offsets is not None:
    pos = pos + jnp.asarray(offsets, jnp.int32)[:, None]
  lo = None if starts is None else segment_start_of(starts, geo.B, geo.T)
  bsl = dict(block_len=geo.block_len, block_stride=geo.block_stride)
  _, p = nsa._compressed_branch(q, args["k_cmp"], args["v_cmp"], pos, lo_BT=lo, **bsl)
  want = nsa.selection_scores(p.reshape(geo.B, geo.T, geo.H, geo.N), num_groups=geo.G,
                              seq_len=geo.S, select_len=geo.select_len, **bsl)
  kw = dict(num_sel=want.shape[-1], num_select=geo.num_select, select_len=geo.select_len,
            interpret=True, **bsl)
  assert nsa_pallas.block_choice_supported(select_len=geo.select_len, **bsl)
  return q, args["k_cmp"], pos, lo, want, kw


@pytest.mark.parametrize("name", list(CHOICE_GEOS) + ["many_tiles_packed"]
                         + [f"{g}_offsets" for g in CHOICE_OFFSETS])
def test_block_choice_kernel_matches_selection(name):
  """The fused block-choice kernel against ``selection_scores`` and ``select_blocks`` of the
  reference's compressed probabilities (packed rows: with ``segment_start``; offsets: fewer
  queries than keys, at per-example positions, which the kernel takes as they are). Each score is a
  sum of at most R * W (<= 10) probabilities in [0, 1], computed with another summation order
  (online log-sum-exp over tiles): a few float32 roundings (1.2e-7) of terms <= 1, so atol
  1e-5 (the overlap products' three bfloat16 parts keep each term within one rounding: the
  next test). The choices are compared by the reference scores of the chosen blocks, slot by
  slot (a near-tie may swap two blocks of equal score); forced blocks and unused slots
  exactly."""
  packed, offset = name.endswith("_packed"), name.endswith("_offsets")
  base = name.removesuffix("_packed").removesuffix("_offsets")
  geo, offsets = CHOICE_GEOS[base], None
  if packed:
    geo = dataclasses.replace(geo, B=len(CHOICE_PACKED_STARTS))
  if offset:
    T, offsets = CHOICE_OFFSETS[base]
    geo = dataclasses.replace(geo, B=len(offsets), T=T)
  q, k, pos, lo, want, kw = _choice_case(geo, CHOICE_PACKED_STARTS if packed else None, offsets)
  got = nsa_pallas.block_choice(q, k, pos, lo, scores=True, **kw)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)

  idx_got = np.asarray(nsa_pallas.block_choice(q, k, pos, lo, **kw))
  idx_want = np.asarray(nsa._top_blocks(want, pos, lo, num_select=geo.num_select,
                                        select_len=geo.select_len))
  assert idx_got.shape == idx_want.shape == (geo.B, geo.T, geo.G, geo.num_select)
  np.testing.assert_array_equal(idx_got < 0, idx_want < 0)
  cur = np.asarray(pos)[:, :, None, None] // geo.select_len
  first = 0 if lo is None else np.asarray(lo)[:, :, None, None] // geo.select_len
  if packed:  # every slot stays within the query's own sequence
    assert np.all((idx_got < 0) | ((idx_got >= first) & (idx_got <= cur)))
  forced = lambda idx: (idx == first) | (idx == cur) | (idx == cur - 1)  # noqa: E731
  np.testing.assert_array_equal(forced(idx_got), forced(idx_want))
  np.testing.assert_array_equal(np.where(forced(idx_want), idx_got, 0),
                                np.where(forced(idx_want), idx_want, 0))
  score_of = lambda idx: np.where(idx >= 0, np.take_along_axis(  # noqa: E731
      np.asarray(want), np.maximum(idx, 0), axis=-1), 0.0)
  np.testing.assert_allclose(score_of(idx_got), score_of(idx_want), rtol=0, atol=1e-5)


def test_overlap_products_in_three_bfloat16_parts_keep_each_term_to_float32():
  """The default CHOICE_OVERLAP_PRECISION against an identity matrix: every output is one
  probability rebuilt from its parts. hi = bf16(p) errs by <= 2^-9 |p|, mid by 2^-9 of that,
  lo by 2^-9 of that again (2^-27 |p|); hi + mid is exact in float32 and adding lo rounds once
  (2^-24 |p|): within 2^-23 |p| in all. Two parts would leave up to 2^-18 |p|."""
  assert nsa_pallas.CHOICE_OVERLAP_PRECISION == "bf16x3"
  p = jax.random.uniform(jax.random.PRNGKey(0), (64, 64), jnp.float32, 1e-6, 1.0)
  got = np.asarray(nsa_pallas._overlap_dot(p, jnp.eye(64, dtype=jnp.float32)))
  p = np.asarray(p)
  assert np.all(np.abs(got - p) <= 2.0 ** -23 * p)


@pytest.mark.parametrize("name", ["one_tile", "many_tiles_packed"])
def test_block_choice_in_exact_float32_products_matches_selection(name, monkeypatch):
  """CHOICE_OVERLAP_PRECISION HIGHEST (exact float32 products) meets the same bound as the
  default "bf16x3", whose three bfloat16 parts of each probability sum to within float32
  rounding of it (8 + 8 + 8 bits) against exact 0/1 matrices: the test above."""
  monkeypatch.setattr(nsa_pallas, "CHOICE_OVERLAP_PRECISION", jax.lax.Precision.HIGHEST)
  test_block_choice_kernel_matches_selection(name)


@pytest.mark.parametrize("order,long_first", [("group", True), ("tile", False)])
def test_block_choice_program_order_changes_nothing(order, long_first, monkeypatch):
  """Each program computes its own (example, group, query tile): any launch order gives the
  same choices, bit for bit (B = 3 examples x 2 groups x 5 query tiles)."""
  geo = CHOICE_GEOS["many_tiles"]
  geo = dataclasses.replace(geo, B=len(CHOICE_PACKED_STARTS), H=4, G=2)
  q, k, pos, lo, _, kw = _choice_case(geo, CHOICE_PACKED_STARTS)
  want = np.asarray(nsa_pallas.block_choice(q, k, pos, lo, **kw))
  monkeypatch.setattr(nsa_pallas, "CHOICE_ORDER", order)
  monkeypatch.setattr(nsa_pallas, "CHOICE_LONG_FIRST", long_first)
  np.testing.assert_array_equal(nsa_pallas.block_choice(q, k, pos, lo, **kw), want)


@pytest.mark.parametrize("block_len", [4, 1])
def test_block_choice_unmasked_interior_is_the_masked_walk(block_len, monkeypatch):
  """CHOICE_INTERIOR_MIN_TILES 0 (every row walks the tiles a program sees in full without
  masks; rows this short mask every tile by default) gives the masked walk's scores and choices
  bit for bit: a mask that keeps every key changes no operand. Packed rows (the third row's
  sequence starting inside tile 0 and seen whole later) and blocks longer than their stride or
  shorter (1 < 2: there a query tile holding two sequence starts has interior tiles, so an
  interior range taken from the smallest start instead of the largest fails)."""
  geo = dataclasses.replace(CHOICE_GEOS["many_tiles"], B=len(CHOICE_PACKED_STARTS), H=4, G=2,
                            block_len=block_len)
  q, k, pos, lo, _, kw = _choice_case(geo, CHOICE_PACKED_STARTS)
  want = [np.asarray(nsa_pallas.block_choice(q, k, pos, lo, scores=s, **kw)) for s in (0, 1)]
  monkeypatch.setattr(nsa_pallas, "CHOICE_INTERIOR_MIN_TILES", 0)
  for s in (0, 1):
    np.testing.assert_array_equal(nsa_pallas.block_choice(q, k, pos, lo, scores=s, **kw),
                                  want[s])


@pytest.mark.parametrize("name", ["many_tiles_packed", "many_tiles_offsets"])
def test_block_choice_unmasked_interior_matches_selection(name, monkeypatch):
  """The unmasked interior walk against the reference, as the default walk is above."""
  monkeypatch.setattr(nsa_pallas, "CHOICE_INTERIOR_MIN_TILES", 0)
  test_block_choice_kernel_matches_selection(name)


@pytest.mark.parametrize("bad", [-1, 2.0, None])
def test_block_choice_rejects_a_bad_interior_setting(bad, monkeypatch):
  q, k, pos, lo, _, kw = _choice_case(CHOICE_GEOS["one_tile"])
  monkeypatch.setattr(nsa_pallas, "CHOICE_INTERIOR_MIN_TILES", bad)
  with pytest.raises(ValueError, match="CHOICE_INTERIOR_MIN_TILES must be an int >= 0"):
    nsa_pallas.block_choice(q, k, pos, lo, **kw)


def test_block_choice_ties_go_to_the_lower_block():
  """Equal scores (identical compressed keys, a geometry where equal reference scores are
  equal bit for bit in the kernel too: at most 3 equal terms per score): the candidates are
  taken in block order, as lax.top_k takes them, across tiles and across the kept list."""
  geo = CHOICE_GEOS["many_tiles"]
  q, k, pos, _, _, kw = _choice_case(geo)
  k = jnp.broadcast_to(k[:, :1], k.shape)
  got = np.asarray(nsa_pallas.block_choice(q, k, pos, **kw))
  _, p = nsa._compressed_branch(q, k, k, pos, block_len=geo.block_len,
                                block_stride=geo.block_stride)
  want = nsa._choose_blocks(p, pos, None, seq_len=geo.S, num_select=geo.num_select,
                            block_len=geo.block_len, block_stride=geo.block_stride,
                            select_len=geo.select_len)
  # Every visible block has the same probability, so the blocks past the first overlap the
  # same number of equal terms and their scores are equal bit for bit in both computations.
  np.testing.assert_array_equal(got, np.asarray(want))


def test_block_choice_supported_geometries():
  assert nsa_pallas.block_choice_supported(block_len=16, block_stride=8, select_len=32)
  # select_len not a multiple of the stride: the tiles of the walk would not repeat.
  assert not nsa_pallas.block_choice_supported(block_len=5, block_stride=5, select_len=8)
  # A compression block reaching past the next tile of selection blocks.
  reach = nsa_pallas.CHOICE_SEL_TILE * 4
  assert nsa_pallas.block_choice_supported(block_len=2 + reach, block_stride=2, select_len=4)
  assert not nsa_pallas.block_choice_supported(block_len=3 + reach, block_stride=2,
                                               select_len=4)


@pytest.mark.parametrize("search", nsa_pallas.PLAN_SEARCHES)
def test_keyblock_plan_covers_every_pair_once(search, monkeypatch):
  """The key-major backward's items: every used (token, slot) sits in exactly one item slot,
  of an item of its own block, whose rows read that token's query heads at its position;
  padding rows are masked (position -1), after an item's real rows; the item count bound
  holds. With each ``PLAN_SEARCH`` (the same integers: compared at the end)."""
  monkeypatch.setattr(nsa_pallas, "PLAN_SEARCH", search)
  rng = np.random.default_rng(3)
  B, T, G, K, J, R, C = 2, 7, 2, 3, 5, 2, 2
  idx = np.full((B, T, G, K), -1, np.int32)
  for b in range(B):
    for t in range(T):
      for g in range(G):
        n = rng.integers(1, K + 1)
        idx[b, t, g, :n] = rng.choice(J, n, replace=False)
  idx[:, :, :, 0] = 0  # block 0 chosen by every token: spread over several items
  pos = (np.array([[3], [20]]) + np.arange(T)).astype(np.int32)
  qrow, posrow, blk, padpos = (np.asarray(a) for a in nsa_pallas._keyblock_plan(
      jnp.asarray(idx), jnp.asarray(pos), num_blocks=J, heads=R, chunk=C))
  M = blk.shape[-1]
  assert M == (T * K + J * (C - 1)) // C
  qrow, posrow = qrow.reshape(B, G, M, C, R), posrow.reshape(B, G, M, C, R)
  for b in range(B):
    for g in range(G):
      seen = set()
      for t in range(T):
        for k in range(K):
          pp = padpos[b, g, t, k]
          if idx[b, t, g, k] < 0:
            assert pp == -1
            continue
          assert pp not in seen
          seen.add(pp)
          m, c = divmod(int(pp), C)
          assert blk[b, g, m] == idx[b, t, g, k]
          np.testing.assert_array_equal(qrow[b, g, m, c], (t * G + g) * R + np.arange(R))
          assert np.all(posrow[b, g, m, c] == pos[b, t])
      used = {divmod(int(pp), C) for pp in seen}
      for m in range(M):
        for c in range(C):
          if (m, c) not in used:
            assert np.all(posrow[b, g, m, c] == -1)
        # An item's real rows come first (sum_item_partials tells a dead item by its rows).
        real = posrow[b, g, m, :, 0] >= 0
        assert not np.any(real[1:] & ~real[:-1])
  monkeypatch.setattr(nsa_pallas, "PLAN_SEARCH", "scan")
  other = nsa_pallas._keyblock_plan(jnp.asarray(idx), jnp.asarray(pos), num_blocks=J, heads=R,
                                    chunk=C)
  for got, want in zip((qrow.reshape(B, G, -1), posrow.reshape(B, G, -1), blk, padpos), other):
    np.testing.assert_array_equal(got, np.asarray(want))


def test_sorted_run_starts_is_searchsorted(monkeypatch):
  """``_sorted_run_starts`` (PLAN_SEARCH="runs") is numpy's left searchsorted of every value,
  for absent values first, inside and last, one entry, one value throughout; an unknown
  PLAN_SEARCH is refused in one line."""
  rng = np.random.default_rng(4)
  cases = [np.array([2]), np.full(6, 0), np.full(6, 4), np.array([0, 0, 3, 3, 3, 4]),
           np.array([0, 7, 7]),
           np.sort(rng.integers(1, 7, 40))]
  for a in cases:
    got = nsa_pallas._sorted_run_starts(jnp.asarray(a, jnp.int32), 8)
    np.testing.assert_array_equal(np.asarray(got), np.searchsorted(a, np.arange(8), "left"))
  monkeypatch.setattr(nsa_pallas, "PLAN_SEARCH", "binary")
  with pytest.raises(ValueError) as err:
    nsa_pallas._keyblock_plan(jnp.zeros((1, 2, 1, 1), jnp.int32), jnp.zeros((1, 2), jnp.int32),
                              num_blocks=2, heads=1, chunk=2)
  assert str(err.value).splitlines()[0] == (
      "nsa_pallas.PLAN_SEARCH must be one of ('runs', 'compare_all', 'scan'), got 'binary'")


def test_item_partials_sum_per_block_and_drop_dead_items():
  """The key-major backward's dk/dv reduce (a segment sum): each live item's [L, D] partial
  lands on its own (example, group, block) keys; a dead item adds nothing, even with nonzero
  values (in the kernel they are zeros; here they would show if they landed anywhere),
  inside a block's run or after the last live item; an item is live when any of its rows has
  a position. Every size differs from the others, so a misplaced stride shows; the two
  partials differ, so a swap shows. Exact: sums of at most M integers of size <= 8 in float32."""
  rng = np.random.default_rng(5)
  B, G, M, L, D, J = 2, 3, 9, 6, 4, 5
  parts = [rng.integers(-8, 9, (B, G, M, L, D)).astype(np.float32) for _ in range(2)]
  blk = np.sort(rng.integers(0, J, (B, G, M)), axis=-1).astype(np.int32)
  live = rng.random((B, G, M)) < 0.7
  live[0, 0] = False  # a row of no live item: its keys get zeros
  live[1, 2, -3:] = False  # dead items after the last live one (as the plan has them)
  # The plan's row positions (2 rows an item): a live item's first row real, a dead one's none.
  posrow = np.where(live[..., None], np.array([7, -1]), -1).reshape(B, G, M * 2)
  got = nsa_pallas.sum_item_partials(tuple(map(jnp.asarray, parts)), jnp.asarray(blk),
                                     jnp.asarray(posrow, jnp.int32), J)
  for part, sums in zip(parts, got):
    want = np.zeros((B, J * L, G, D), np.float32)
    for b in range(B):
      for g in range(G):
        for m in range(M):
          if live[b, g, m]:
            want[b, blk[b, g, m] * L:(blk[b, g, m] + 1) * L, g] += part[b, g, m]
    np.testing.assert_array_equal(np.asarray(sums), want)
  # bfloat16 partials (DKDV_PARTIAL_DTYPE="input"; these integers are exact in it) are summed
  # in float32.
  half = nsa_pallas.sum_item_partials(tuple(jnp.asarray(p, jnp.bfloat16) for p in parts),
                                      jnp.asarray(blk), jnp.asarray(posrow, jnp.int32), J)
  for sums, want in zip(half, got):
    assert sums.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(sums), np.asarray(want))


def _selected_case(seed: int):
  """A small selected-branch case in bfloat16: q [B,T,G,R,D], k and v [B,T,G,D], each token's
  own block, the one before it and (from block 3 on) block 0 chosen, some slots unused."""
  B, T, G, R, D, L = 2, 24, 2, 2, 8, 4
  rng = np.random.default_rng(seed)
  q, k, v, do = (jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
                 for s in ((B, T, G, R, D), (B, T, G, D), (B, T, G, D), (B, T, G, R, D)))
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  own = np.arange(T) // L
  idx = np.stack([own, np.maximum(own - 1, -1), np.where(own >= 3, 0, -1)], axis=-1)
  idx = np.broadcast_to(idx[None, :, None, :], (B, T, G, 3)).astype(np.int32)
  return q, k, v, do, idx, pos, L


def test_keyblock_forward_bf16_partials_within_one_rounding(monkeypatch):
  """``FWD_PARTIAL_DTYPE="input"`` (the default): the key-major forward's per-block partial
  outputs stored in bfloat16 and combined in float32. Each partial is a convex combination of
  values, rounded once (relative error <= 2^-8), and the combination's weights sum to 1, so
  the output moves by at most 2^-8 * max|v| from the float32 partials' (plus float32 slack)."""
  monkeypatch.setattr(nsa_pallas, "FWD_IMPL", "keyblock")
  monkeypatch.setattr(nsa_pallas, "KEY_CHUNK", 2)
  monkeypatch.setattr(nsa_pallas, "ITEM_CHUNKS", 2)
  monkeypatch.setattr(nsa_pallas, "BRANCH_OUT_DTYPE", "float32")  # the partials alone
  q, k, v, _, idx, pos, L = _selected_case(seed=9)
  idx = jnp.asarray(idx)
  outs = {}
  for how in ("float32", "input"):
    monkeypatch.setattr(nsa_pallas, "FWD_PARTIAL_DTYPE", how)
    outs[how] = np.asarray(nsa_pallas.selected_attention(q, k, v, idx, pos, L, True))
  bound = 2.0 ** -8 * float(jnp.max(jnp.abs(v.astype(jnp.float32)))) + 1e-6
  assert np.max(np.abs(outs["input"] - outs["float32"])) <= bound
  assert not np.array_equal(outs["input"], outs["float32"])  # the setting took effect
  monkeypatch.setattr(nsa_pallas, "FWD_PARTIAL_DTYPE", "half")
  with pytest.raises(ValueError) as err:
    nsa_pallas.selected_attention(q, k, v, idx, pos, L, True)
  # JAX appends its traceback-filtering note on later lines.
  assert str(err.value).splitlines()[0] == ("nsa_pallas.FWD_PARTIAL_DTYPE must be 'float32' "
                                            "or 'input', got 'half'")


def _selected_visible(idx, T: int, L: int):
  """[B,T,G,S] bool: key s lies in a block row t chose and s <= t."""
  keys = np.arange(T)
  sel = np.zeros(idx.shape[:3] + (T,), bool)
  for slot in range(idx.shape[-1]):
    j = idx[..., slot]
    sel |= (j[..., None] >= 0) & (keys // L == j[..., None])
  return sel & (keys[None, None, None, :] <= np.arange(T)[None, :, None, None])


def _dense_terms(q, k, v, do, visible):
  """Float64 from the dense softmax of queries [B,T,G,R,D] over the keys [B,S,G,D] that
  ``visible`` [B,T,G,S] allows: per entry of dq, dk and dv, the sum of the magnitudes of the
  terms that make it (dq[t,r] sums scale*ds[t,r,s]*k[s] over keys s, dk[s]
  scale*ds[t,r,s]*q[t,r] and dv[s] p[t,r,s]*do[t,r] over rows (t, r)), and the
  probabilities p [B,T,G,R,S]."""
  q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
  scale = 1.0 / math.sqrt(q.shape[-1])
  logits = np.einsum("btgrd,bsgd->btgrs", q, k) * scale
  logits = np.where(visible[:, :, :, None], logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  dp = np.einsum("btgrd,bsgd->btgrs", do, v)
  ds = p * (dp - np.sum(p * dp, -1, keepdims=True))
  dq = scale * np.einsum("btgrs,bsgd->btgrd", np.abs(ds), np.abs(k))
  dk = scale * np.einsum("btgrs,btgrd->bsgd", np.abs(ds), np.abs(q))
  dv = np.einsum("btgrs,btgrd->bsgd", p, np.abs(do))
  return dq, dk, dv, p


def _partial_sums_bound(q, k, v, do, idx, L):
  """:func:`_dense_terms`' term magnitudes (dq, dk, dv) of the selected branch (each row's
  selected causal keys); each of the kernel's partials is a sum of some of these terms."""
  return _dense_terms(q, k, v, do, _selected_visible(idx, q.shape[1], L))[:3]


@pytest.mark.parametrize("setting", ["DQ_PARTIAL_DTYPE", "DKDV_PARTIAL_DTYPE"])
def test_keyblock_backward_bf16_partials_within_one_rounding_each(setting, monkeypatch):
  """``DQ_PARTIAL_DTYPE`` / ``DKDV_PARTIAL_DTYPE = "input"`` (the default) against
  ``"float32"``: the key-major backward's dq (per token and slot) or dk/dv (per item)
  partials stored in bfloat16, summed in float32. Each partial is rounded once (relative
  error <= 2^-8), so a gradient entry moves from the float32 partials' by at most 2^-8 times
  the sum of its partials' magnitudes, itself at most the sum of its terms' magnitudes
  (:func:`_partial_sums_bound`, from the exact softmax: to first order, with 2^-7 of slack
  for the kernel's ds, rounded to bfloat16 and computed from bfloat16 inputs), plus the
  float32 sums' rounding. Only the gradients the setting names move; float32 inputs, for
  which "input" is float32, move none."""
  monkeypatch.setattr(nsa_pallas, "KEY_CHUNK", 2)
  monkeypatch.setattr(nsa_pallas, "ITEM_CHUNKS", 2)
  monkeypatch.setattr(nsa_pallas, "BRANCH_OUT_DTYPE", "float32")  # float32 cotangents
  q, k, v, do, idx, pos, L = _selected_case(seed=11)

  def grads():
    _, pull = jax.vjp(lambda q, k, v: nsa_pallas.selected_attention(
        q, k, v, jnp.asarray(idx), pos, L, True), q, k, v)
    return [np.asarray(g, np.float64) for g in pull(do.astype(jnp.float32))]

  monkeypatch.setattr(nsa_pallas, "DQ_PARTIAL_DTYPE", "float32")
  monkeypatch.setattr(nsa_pallas, "DKDV_PARTIAL_DTYPE", "float32")
  want = grads()
  monkeypatch.setattr(nsa_pallas, setting, "input")
  got = grads()
  moved = {"DQ_PARTIAL_DTYPE": (0,), "DKDV_PARTIAL_DTYPE": (1, 2)}[setting]
  # The gradients come back in bfloat16 (the inputs' dtype): their own rounding (2^-8 of the
  # value) is applied to both, so it may flip one bfloat16 ulp where the partials moved it.
  for i, (g, w, terms) in enumerate(zip(got, want, _partial_sums_bound(q, k, v, do, idx, L))):
    if i not in moved:
      np.testing.assert_array_equal(g, w)
      continue
    bound = 2.0 ** -8 * (1 + 2.0 ** -7) * terms + 1e-6 * terms + 2.0 ** -7 * np.abs(w)
    assert np.all(np.abs(g - w) <= bound), (setting, i, np.max(np.abs(g - w) - bound))
    assert not np.array_equal(g, w)  # the setting took effect
  q, k, v, do = (x.astype(jnp.float32) for x in (q, k, v, do))
  got = grads()
  monkeypatch.setattr(nsa_pallas, setting, "float32")
  for g, w in zip(got, grads()):
    np.testing.assert_array_equal(g, w)
  monkeypatch.setattr(nsa_pallas, setting, "half")
  with pytest.raises(ValueError) as err:
    grads()
  assert str(err.value).splitlines()[0] == (f"nsa_pallas.{setting} must be 'float32' or "
                                            "'input', got 'half'")


@pytest.mark.parametrize("branch", ["selected_keyblock", "selected_query", "window"])
def test_branch_outputs_in_the_inputs_dtype(branch, monkeypatch):
  """``BRANCH_OUT_DTYPE="input"`` (the default) against ``"float32"``, bfloat16 inputs: the
  output is the float32 setting's rounded once to bfloat16, bit for bit (the same float32
  values, cast where they are written), and dv is unchanged (it does not read the output and
  came back in bfloat16 either way). dq and dk move only through the backward's
  delta = sum(do * out), out now rounded (the same do here): each ds term by p * |d delta|
  (:func:`_dense_terms`' exact p), plus up to one bfloat16 ulp (2^-7 of the term) where two
  nearby values are each rounded: the kernel's ds, and for the selected branch its bfloat16
  dq / dk partials; plus an ulp of the result (2^-7 of its value), with 2^-7 of slack for the
  kernel's float32 p. Float32 inputs: nothing moves."""
  monkeypatch.setattr(nsa_pallas, "KEY_CHUNK", 2)
  monkeypatch.setattr(nsa_pallas, "ITEM_CHUNKS", 2)
  q, k, v, do, idx, pos, L = _selected_case(seed=13)
  T = q.shape[1]
  if branch == "window":
    window = 7
    monkeypatch.setattr(nsa_pallas, "WIN_TILE", 16)  # two query tiles, the last partial
    t = np.arange(T)
    band = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - window)
    visible = np.broadcast_to(band[None, :, None, :], idx.shape[:3] + (T,))
    fn = lambda q, k, v: nsa_pallas.window_attention(q, k, v, None, window, True)  # noqa: E731
  else:
    monkeypatch.setattr(nsa_pallas, "FWD_IMPL", branch.split("_")[1])
    visible = _selected_visible(idx, T, L)
    fn = lambda q, k, v: nsa_pallas.selected_attention(  # noqa: E731
        q, k, v, jnp.asarray(idx), pos, L, True)

  def run(how, *args):
    monkeypatch.setattr(nsa_pallas, "BRANCH_OUT_DTYPE", how)
    out, pull = jax.vjp(fn, *args)
    return np.asarray(out.astype(jnp.float32)), out.dtype, [
        np.asarray(g, np.float64) for g in pull(do.astype(out.dtype))]

  out_f, dtype_f, grads_f = run("float32", q, k, v)
  out_i, dtype_i, grads_i = run("input", q, k, v)
  assert (dtype_f, dtype_i) == (jnp.float32, jnp.bfloat16)
  np.testing.assert_array_equal(out_i, np.asarray(jnp.asarray(out_f).astype(jnp.bfloat16),
                                                  np.float32))
  np.testing.assert_array_equal(grads_i[2], grads_f[2])
  terms_dq, terms_dk, _, p = _dense_terms(q, k, v, do, visible)
  d_delta = np.abs(np.sum(np.asarray(do, np.float64) * (out_i.astype(np.float64) - out_f),
                          axis=-1))  # [B,T,G,R]
  scale = 1.0 / math.sqrt(q.shape[-1])
  qa, ka = (np.abs(np.asarray(x, np.float64)) for x in (q, k))
  via_dq = scale * d_delta[..., None] * np.einsum("btgrs,bsgd->btgrd", p, ka)
  via_dk = scale * np.einsum("btgrs,btgr,btgrd->bsgd", p, d_delta, qa)
  roundings = 1 if branch == "window" else 2  # ds; the selected branch's partials too
  for g, w, via, terms in ((grads_i[0], grads_f[0], via_dq, terms_dq),
                           (grads_i[1], grads_f[1], via_dk, terms_dk)):
    bound = ((1 + 2.0 ** -7) * (via + roundings * 2.0 ** -7 * terms) + 2.0 ** -7 * np.abs(w)
             + 1e-6)
    assert np.all(np.abs(g - w) <= bound), np.max(np.abs(g - w) - bound)
  q, k, v, do = (x.astype(jnp.float32) for x in (q, k, v, do))
  got, want = run("input", q, k, v), run("float32", q, k, v)
  np.testing.assert_array_equal(got[0], want[0])
  for g, w in zip(got[2], want[2]):
    np.testing.assert_array_equal(g, w)
  monkeypatch.setattr(nsa_pallas, "BRANCH_OUT_DTYPE", "half")
  with pytest.raises(ValueError) as err:
    fn(q, k, v)
  assert str(err.value).splitlines()[0] == ("nsa_pallas.BRANCH_OUT_DTYPE must be 'float32' or "
                                            "'input', got 'half'")


@pytest.mark.parametrize("how", ["input", "float32"])
def test_pallas_branches_dtype_follows_the_setting(how, monkeypatch):
  """bfloat16 inputs through the pallas path's branches (``nsa._pallas_branches``): from
  position 0 (the folded compressed branch, the selected and window kernels) and from offsets
  (PALLAS_OFFSET_MIN_QUERIES lowered: the folded branch over the queries' groups, the window
  kernel over each row's band), and the window as one sliding-window attention over packed
  rows (the "cudnn" path; XLA's attention here) come back in bfloat16 with
  BRANCH_OUT_DTYPE="input" and in float32 with "float32"."""
  monkeypatch.setattr(nsa_pallas, "BRANCH_OUT_DTYPE", how)
  monkeypatch.setattr(nsa, "PALLAS_OFFSET_MIN_QUERIES", 2)
  want = jnp.bfloat16 if how == "input" else jnp.float32
  for name, q_offset in (("group1_from_start", 0), ("group4_int_offset", np.array([0, 20]))):
    geo = GEOMETRIES[name][0]
    a = make_inputs(dataclasses.replace(geo, B=2), seed=4, dtype=jnp.bfloat16)
    R = geo.H // geo.G
    q = a["q"].reshape(2, geo.T, geo.G, R, geo.D)
    pos = nsa.query_positions(q_offset, 2, geo.T)
    off = q_offset if isinstance(q_offset, int) else jnp.asarray(q_offset, jnp.int32)
    branches = nsa._pallas_branches(q, q, *(a[n] for n in ARG_NAMES[1:7]), pos, None, off,
                                    **geo.static())
    assert [x.dtype for x in branches] == [want] * 3, name
  geo = PACKED_GEO
  a = make_inputs(geo, seed=5, dtype=jnp.bfloat16)
  lo = segment_start_of(PACKED_STARTS, geo.B, geo.T)
  out = nsa._window_band_attention(a["q"].reshape(geo.B, geo.T, geo.G, geo.H // geo.G, geo.D),
                                   a["k_win"], a["v_win"], geo.window, lo, None)
  assert out.dtype == want


@pytest.mark.parametrize("bad", [0, 3, True, 2.0])
def test_a_bad_item_chunks_setting_is_one_line(bad, monkeypatch):
  monkeypatch.setattr(nsa_pallas, "ITEM_CHUNKS", bad)
  with pytest.raises(ValueError, match=r"^nsa_pallas.ITEM_CHUNKS must be a power of two "
                                       rf"\(1, 2, 4, \.\.\.\), got {bad!r}$"):
    nsa_pallas._item_tokens()


def _training_core():
  """nsa_core(impl="pallas") on the rows of a training step (GEOMETRIES["group1_from_start"]:
  a static offset of 0) as a function of q, and that q."""
  geo, q_offset = GEOMETRIES["group1_from_start"]
  args = make_inputs(geo, seed=3)

  def core(q):
    rest = (args[n] for n in ARG_NAMES[1:])
    return nsa_core(q, *rest, q_offset=q_offset, impl="pallas", **geo.static())
  return core, args[ARG_NAMES[0]]


@pytest.mark.parametrize("setting", ["KEY_FWD_NUM_STAGES", "KEY_BWD_NUM_STAGES",
                                     "CHOICE_NUM_STAGES", "WIN_FWD_NUM_STAGES",
                                     "WIN_BWD_NUM_STAGES", "DEC_NUM_STAGES"])
def test_each_kernel_family_reads_its_stages_setting(setting, monkeypatch):
  """A family's Triton pipelining setting (nsa_pallas.*_NUM_STAGES) reaches its launches in
  nsa_core (training from position 0: the key-major forward and backward, the block choice,
  the window forward and backward; one-token decoding: the decoding kernel): a bad value is
  a one-line error naming it. A backward's setting is read by the backward only: the forward
  runs with it bad."""
  if setting == "DEC_NUM_STAGES":
    geo, q_offset = DECODE_GEOS["few_blocks"]
    run = functools.partial(_fused_fn(geo, monkeypatch, grads=False),
                            make_inputs(geo, seed=3), _offset(q_offset), None)
  else:
    core, q = _training_core()
    run = functools.partial(core, q)
    if "_BWD_" in setting:
      monkeypatch.setattr(nsa_pallas, setting, 0)
      run()  # the forward alone
      run = functools.partial(jax.grad(lambda q: jnp.sum(core(q))), q)
  monkeypatch.setattr(nsa_pallas, setting, 0)
  with pytest.raises(ValueError) as err:
    run()
  assert str(err.value).splitlines()[0] == f"nsa_pallas.{setting} must be an integer >= 1, got 0"


def test_forward_and_backward_kernels_pass_their_stages_setting(monkeypatch):
  """Every launch of a family names its setting: the key-major forward and its backward, the
  block choice, the window forward and its backward (one setting for both backward
  kernels)."""
  names, real = [], nsa_pallas._compiler_params

  def spy(interpret, num_warps, stages=None):
    names.append(stages)
    return real(interpret, num_warps, stages)

  monkeypatch.setattr(nsa_pallas, "_compiler_params", spy)
  core, q = _training_core()
  jax.grad(lambda q: jnp.sum(core(q)))(q)
  counts = {n: names.count(n) for n in set(names) - {None}}
  assert counts == {"KEY_FWD_NUM_STAGES": 1, "KEY_BWD_NUM_STAGES": 1, "CHOICE_NUM_STAGES": 1,
                    "WIN_FWD_NUM_STAGES": 1, "WIN_BWD_NUM_STAGES": 1}


@pytest.mark.skipif(nsa_pallas.plt is None, reason="no Pallas Triton module")
def test_a_stages_setting_is_tritons_num_stages(monkeypatch):
  monkeypatch.setattr(nsa_pallas, "WIN_FWD_NUM_STAGES", 3)
  params = nsa_pallas._compiler_params(False, 8, "WIN_FWD_NUM_STAGES")
  assert (params.num_warps, params.num_stages) == (8, 3)
  assert nsa_pallas._compiler_params(False, 4).num_stages == 1  # the other kernels
  assert nsa_pallas._compiler_params(True, 4, "WIN_FWD_NUM_STAGES") is None  # interpret mode
  for bad in (True, 2.0, -1):
    monkeypatch.setattr(nsa_pallas, "WIN_FWD_NUM_STAGES", bad)
    with pytest.raises(ValueError, match=rf"^nsa_pallas.WIN_FWD_NUM_STAGES must be an integer "
                                         rf">= 1, got {bad!r}$"):
      nsa_pallas._compiler_params(True, 4, "WIN_FWD_NUM_STAGES")


def test_a_bad_dq_reduce_setting_is_one_line(monkeypatch):
  geo, q_offset = GEOMETRIES["group1_from_start"]
  monkeypatch.setattr(nsa_pallas, "DQ_REDUCE", "sum")
  cot = random_like((geo.B, geo.T, geo.H, geo.D), 4)
  with pytest.raises(ValueError) as err:
    value_and_grad_fn.__wrapped__(geo, "pallas")(make_inputs(geo, seed=3), _offset(q_offset),
                                                 cot)
  assert str(err.value).splitlines()[0] == ("nsa_pallas.DQ_REDUCE must be 'partials' or "
                                            "'atomic', got 'sum'")


@pytest.mark.parametrize("variant", BWD_VARIANTS[3:], ids=lambda v: "-".join(map(str, v)))
@pytest.mark.parametrize("name", ["per_example_offset", "decode_t1_few_blocks"])
def test_pallas_backward_variants_match_reference(name, variant, monkeypatch):
  """Small chunks (1-2 tokens) in nsa_core: many items per block, partial and empty items,
  items of several chunks (full, partly filled and dead chunks); the key-major forward with
  both backwards; blocks walked in tiles of 2 keys."""
  _set_bwd(monkeypatch, variant)
  geo, q_offset = GEOMETRIES[name]
  args = make_inputs(geo, seed=41)
  cot = random_like((geo.B, geo.T, geo.H, geo.D), 42)

  # Not the cached value_and_grad_fn: the patched module constant is read when tracing.
  def run(impl):
    return value_and_grad_fn.__wrapped__(geo, impl)(args, _offset(q_offset), cot)

  _assert_close_all(run("pallas"), run("reference"), ARG_NAMES)


# ---------------------------------------------------------------- q_cmp

@pytest.mark.parametrize("impl", ["reference", "blockwise", "pallas"])
def test_q_cmp_drives_compressed_branch_and_selection(impl):
  geo, q_offset = GEOMETRIES["per_example_offset"]
  args = make_inputs(geo, seed=31)
  args["q_cmp"] = jnp.asarray(2.0 * np.random.default_rng(32).standard_normal(
      args["q"].shape).astype(np.float32))
  cot = random_like((geo.B, geo.T, geo.H, geo.D), 33)
  out, grads = value_and_grad_fn(geo, impl, True)(args, _offset(q_offset), cot)
  np.testing.assert_allclose(out, oracle_nsa(args, geo, q_offset), rtol=RTOL,
                             atol=ATOL)
  assert np.abs(np.asarray(grads["q_cmp"])).max() > 0
  if impl != "reference":
    want = value_and_grad_fn(geo, "reference", True)(args, _offset(q_offset), cot)
    _assert_close_all((out, grads), want, ARG_NAMES + ("q_cmp",))


def test_q_cmp_default_is_q_and_shape_checked():
  geo, q_offset = GEOMETRIES["group4_int_offset"]
  args = make_inputs(geo, seed=3)
  kwargs = dict(geo.static(), q_offset=q_offset, impl="reference")
  base = nsa_core(*(args[n] for n in ARG_NAMES), **kwargs)
  same = nsa_core(*(args[n] for n in ARG_NAMES), q_cmp=args["q"], **kwargs)
  np.testing.assert_array_equal(base, same)
  with pytest.raises(ValueError, match="q_cmp"):
    nsa_core(*(args[n] for n in ARG_NAMES), q_cmp=args["q"][:, :2], **kwargs)


# ---------------------------------------------------------------- dispatch

def test_auto_takes_pallas_on_gpu_only():
  def auto(backend, tiles_ok=True, T=2048):
    return nsa.resolve_impl("auto", num_queries=T, seq_len=T, keys_per_query=64,
                            backend=backend, pallas_tiles_ok=tiles_ok)
  assert auto("gpu") == "pallas"
  assert auto("gpu", T=1) == "pallas"  # one-token decoding reads only the chosen blocks
  assert auto("gpu", tiles_ok=False) == "blockwise"
  assert auto("cpu") == "blockwise" and auto("tpu") == "blockwise"
  assert auto("cpu", T=64) == "reference"
  assert nsa.auto_impl_summary("gpu") == "pallas"
  assert "blockwise" in nsa.auto_impl_summary("gpu", pallas_tiles_ok=False)  # as resolve_impl
  assert "blockwise" in nsa.auto_impl_summary("cpu")
  assert nsa.resolve_impl("pallas", num_queries=1, seq_len=4, keys_per_query=9) == "pallas"
  assert nsa_pallas.pallas_supported(heads_per_group=4, head_dim=32, select_len=32)
  assert not nsa_pallas.pallas_supported(heads_per_group=3, head_dim=32, select_len=32)


def test_forward_auto_keyblock_for_training_rows_query_for_decoding(monkeypatch):
  """``FWD_IMPL="auto"``: key-major once a row's pairs fill its blocks' items (arc1 training:
  T = 2048, K = 8, J = 64 blocks), query-major for one-token decoding against that cache."""
  monkeypatch.setattr(nsa_pallas, "KEY_CHUNK", 16)
  assert nsa_pallas.FWD_IMPL == "auto"
  assert nsa_pallas.forward_impl(2048, 8, 64) == "keyblock"
  assert nsa_pallas.forward_impl(128, 8, 64) == "keyblock"  # 1024 pairs, 64 chunks of 16
  assert nsa_pallas.forward_impl(127, 8, 64) == "query"
  assert nsa_pallas.forward_impl(1, 8, 64) == "query"
  for fixed in ("keyblock", "query"):
    monkeypatch.setattr(nsa_pallas, "FWD_IMPL", fixed)
    assert nsa_pallas.forward_impl(1, 8, 64) == nsa_pallas.forward_impl(2048, 8, 64) == fixed
  monkeypatch.setattr(nsa_pallas, "FWD_IMPL", "keys")
  with pytest.raises(ValueError, match="FWD_IMPL"):
    nsa_pallas.forward_impl(1, 8, 64)


@pytest.mark.parametrize("geo", [
    GEOMETRIES["group1_from_start"][0],
    # block_len not a multiple of the stride; T - block_len + 1 not a multiple of it either.
    Geo(B=2, T=37, S=37, H=4, G=2, D=8, block_len=6, block_stride=4, select_len=8,
        num_select=4, window=9),
], ids=["stride_divides", "ragged_groups"])
@pytest.mark.parametrize("chunk_queries", [None, 5])
@pytest.mark.parametrize("cmp_attention", ["folded", "folded_xla_choice", "chunked"])
def test_compressed_branch_matches_reference(geo, chunk_queries, cmp_attention, monkeypatch):
  """Every way of the pallas path's compressed branch for one sequence a row from position 0:
  "folded" (one causal attention over query groups) with the block choice of the fused kernel
  or of the XLA chunks, and "chunked": outputs and gradients of the reference."""
  monkeypatch.setattr(nsa, "PALLAS_CMP_ATTENTION", cmp_attention.split("_")[0])
  monkeypatch.setattr(nsa, "PALLAS_CHOICE", "chunked" if "xla" in cmp_attention else "kernel")
  if chunk_queries:
    monkeypatch.setattr(nsa, "PALLAS_CMP_CHUNK_ELEMS", geo.B * geo.H * geo.N * chunk_queries)
  args = make_inputs(geo, seed=7)
  cot = random_like((geo.B, geo.T, geo.H, geo.D), 8)

  def run(impl):
    def loss(a):
      out = nsa_core(*(a[n] for n in ARG_NAMES), q_offset=0, impl=impl, **geo.static())
      return jnp.sum(out * cot), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(args)
    return out, grads

  _assert_close_all(run("pallas"), run("reference"), ARG_NAMES)


# Packed rows: sequences at multiples of lcm(block_stride, select_len) = 8, other starts in
# each row; among them one of 7 selection blocks (a real choice beside the 3 forced ones), a
# last one of two tokens (shorter than a compression block), and query groups of the folded
# branch that hold the end of one sequence and the start of the next.
PACKED_GEO = Geo(B=2, T=82, S=82, H=4, G=2, D=8, block_len=6, block_stride=4, select_len=8,
                 num_select=4, window=9)
PACKED_STARTS = [[0, 16, 24, 80], [0, 8, 48, 64]]


@pytest.mark.parametrize("cmp_attention", ["folded", "folded_xla_choice", "chunked",
                                           "folded_over_mask_limit"])
def test_pallas_packed_rows_match_reference(cmp_attention, monkeypatch):
  """Packed rows (``segment_start``) on the pallas path: the folded compressed branch with its
  block mask and the block choice (fused kernel or XLA chunks) given each query's sequence
  start, or the chunked branch (also taken when the mask would exceed PALLAS_MASK_ELEMS):
  outputs and gradients of the reference."""
  monkeypatch.setattr(nsa, "PALLAS_CMP_ATTENTION", cmp_attention.split("_")[0])
  monkeypatch.setattr(nsa, "PALLAS_CHOICE", "chunked" if "xla" in cmp_attention else "kernel")
  if cmp_attention.endswith("limit"):
    monkeypatch.setattr(nsa, "PALLAS_MASK_ELEMS", 0)
    monkeypatch.setattr(nsa, "_compressed_folded", None)  # must not be called
  geo = PACKED_GEO
  assert nsa.pack_alignment(geo.block_stride, geo.select_len) == 8
  args = make_inputs(geo, seed=12)
  cot = random_like((geo.B, geo.T, geo.H, geo.D), 13)
  seg = segment_start_of(PACKED_STARTS, geo.B, geo.T)

  def run(impl):
    def loss(a):
      out = nsa_core(*(a[n] for n in ARG_NAMES), impl=impl, segment_start=seg, **geo.static())
      return jnp.sum(out * cot), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(args)
    return out, grads

  _assert_close_all(run("pallas"), run("reference"), ARG_NAMES)


def test_window_band_attention_packed_matches_band_chunks():
  """The window branch as one sliding-window attention with a [B,1,T,T] mask (cuDNN's on GPU
  for packed rows; XLA's here) against the chunked band attention: outputs and gradients."""
  for lo in (segment_start_of(PACKED_STARTS, PACKED_GEO.B, PACKED_GEO.T), None):
    assert_window_matches_band_chunks(
        lambda q, k, v: nsa._window_band_attention(q, k, v, PACKED_GEO.window, lo, None),  # noqa
        PACKED_GEO.window, lo, seed=14)


def assert_window_matches_band_chunks(window_fn, window: int, lo, seed: int) -> None:
  """``window_fn(q5, k, v)`` against the chunked band attention on PACKED_GEO's inputs:
  outputs and the gradients of q, k and v."""
  geo = PACKED_GEO
  R = geo.H // geo.G
  args = make_inputs(geo, seed=seed)
  q5 = args["q"].reshape(geo.B, geo.T, geo.G, R, geo.D)
  pos = jnp.broadcast_to(jnp.arange(geo.T, dtype=jnp.int32), (geo.B, geo.T))
  cot = random_like((geo.B, geo.T, geo.G, R, geo.D), seed + 1)

  def loss(f):
    return jax.jit(jax.value_and_grad(lambda *x: jnp.sum(f(*x) * cot), (0, 1, 2)))

  chunks = lambda q, k, v: nsa._window_blockwise(q, k, v, pos, window, lo)  # noqa: E731
  got = loss(window_fn)(q5, args["k_win"], args["v_win"])
  want = loss(chunks)(q5, args["k_win"], args["v_win"])
  np.testing.assert_allclose(got[0], want[0], rtol=RTOL)
  for g_got, g_want in zip(got[1], want[1]):
    np.testing.assert_allclose(g_got, g_want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("group_heads", [False, True])
@pytest.mark.parametrize("tile,window,packed", [(16, 9, True), (16, 9, False), (8, 20, True),
                                                (64, 9, True), (16, 100, False)])
def test_window_kernel_matches_band_chunks(tile, window, packed, group_heads, monkeypatch):
  """nsa_pallas.window_attention (interpret mode) against the chunked band attention: outputs
  and the gradients of q, k and v, packed rows or not, T = 82 not a multiple of the tile, key
  tiles that cross a sequence start, a window longer than the tile and one longer than T; one
  query head a program, or a KV group's heads stacked in one tile."""
  _window_matches_band_chunks(tile, window, packed, group_heads, monkeypatch)


@pytest.mark.parametrize("tile,window,packed,group_heads,runs,keys_first", [
    (16, 9, True, True, 1, False), (16, 9, True, True, 4, False), (8, 20, True, False, 2, True),
    (16, 100, False, True, 2, False), (16, 9, False, False, 1, True)])
def test_window_dkdv_settings_match_band_chunks(tile, window, packed, group_heads, runs,
                                               keys_first, monkeypatch):
  """The window's dk/dv kernel over one query tile's keys or runs of several (WIN_DKDV_KEYS;
  T = 82: the keys padded to whole runs, 96 -> 128 at runs of 64, 88 -> 96 at runs of 16 over
  11 tiles), its tiles held as [keys, rows] or [rows, keys] (WIN_DKDV_KEYS_FIRST), against the
  chunked band attention. (The default, 64 keys as [keys, rows], is the test above's.)"""
  monkeypatch.setattr(nsa_pallas, "WIN_DKDV_KEYS", runs * tile)
  monkeypatch.setattr(nsa_pallas, "WIN_DKDV_KEYS_FIRST", keys_first)
  _window_matches_band_chunks(tile, window, packed, group_heads, monkeypatch)


@pytest.mark.parametrize("setting,bad,message", [
    ("WIN_DKDV_KEYS", 48, "None or a power-of-two multiple of WIN_TILE (32), got 48"),
    ("WIN_DKDV_KEYS", 16, "None or a power-of-two multiple of WIN_TILE (32), got 16"),
    ("WIN_DKDV_KEYS", True, "None or a power-of-two multiple of WIN_TILE (32), got True"),
    ("WIN_DKDV_KEYS_FIRST", 1, "True or False, got 1")])
def test_a_bad_window_dkdv_setting_is_one_line(setting, bad, message, monkeypatch):
  """Read by the window kernel's backward in nsa_core's training path."""
  core, q = _training_core()
  monkeypatch.setattr(nsa_pallas, setting, bad)
  with pytest.raises(ValueError) as err:
    jax.grad(lambda q: jnp.sum(core(q)))(q)
  assert str(err.value).splitlines()[0] == f"nsa_pallas.{setting} must be {message}"


def _window_matches_band_chunks(tile, window, packed, group_heads, monkeypatch):
  monkeypatch.setattr(nsa_pallas, "WIN_TILE", tile)
  monkeypatch.setattr(nsa_pallas, "WIN_GROUP_HEADS", group_heads)
  lo = segment_start_of(PACKED_STARTS, PACKED_GEO.B, PACKED_GEO.T) if packed else None
  assert_window_matches_band_chunks(
      lambda q, k, v: nsa_pallas.window_attention(q, k, v, lo, window, True),  # noqa: E731
      window, lo, seed=16)


# ------------------------------------------------------- one-token decoding in one kernel

# One query a row against a cache (nsa.PALLAS_DECODE = "fused": nsa_pallas.decode_attention).
DECODE_GEOS = {
    # One tile of selection blocks, J = 4 < num_select = 6 (unused slots), window > S, R = 2
    # heads padded to the 16-row tile, a row at position 0 (no compressed block visible).
    "few_blocks": GEOMETRIES["decode_t1_few_blocks"],
    # J = 75 selection blocks walked in 2 tiles of 64 (5 of 16 with DEC_SEL_TILE = 16;
    # compression blocks reaching into the next tile), num_select = 5 (not a power of two),
    # positions at the start, inside and at the end of tiles.
    "many_tiles": (Geo(B=4, T=1, S=300, H=2, G=1, D=4, block_len=4, block_stride=2,
                       select_len=4, num_select=5, window=9), np.array([0, 63, 150, 299])),
    # R = 16 heads a group (the whole tile, no padding), block_len not a multiple of the
    # stride, S not a multiple of select_len (a partial last block), the window band of 32
    # keys masked to 20.
    "wide_group": (Geo(B=2, T=1, S=100, H=32, G=2, D=4, block_len=6, block_stride=4,
                       select_len=8, num_select=4, window=20), np.array([37, 99])),
}


def _fused_fn(geo: Geo, monkeypatch, grads: bool = True):
  """nsa_core(impl="pallas") with the decoding kernel; fails unless the kernel ran."""
  calls = []
  kernel = nsa_pallas.decode_attention
  monkeypatch.setattr(nsa, "PALLAS_DECODE", "fused")
  monkeypatch.setattr(nsa_pallas, "decode_attention",
                      lambda *a, **k: calls.append(1) or kernel(*a, **k))

  def loss(args, q_offset, cot):
    out = nsa_core(*(args[n] for n in ARG_NAMES), q_offset=q_offset, impl="pallas",
                   **geo.static())
    return jnp.sum(out.astype(jnp.float32) * cot), out

  def run(args, q_offset, cot):
    if not grads:
      return loss(args, q_offset, cot)[1]
    (_, out), g = jax.value_and_grad(loss, has_aux=True)(args, q_offset, cot)
    return out, g

  def checked(*args):
    result = jax.jit(run)(*args)
    assert calls, "the decoding kernel did not run"
    return result

  return checked


@pytest.mark.parametrize("name,sel_tile", [(name, None) for name in DECODE_GEOS]
                         + [("many_tiles", 16), ("many_tiles", 128)])
def test_fused_decoding_matches_reference(name, sel_tile, monkeypatch):
  """Outputs against the reference and the float64 oracle; gradients (which the unfused
  path computes, nsa._split_decode) against the reference's. float32 sums of at most ~100
  terms in another order: RTOL / ATOL as above. ``sel_tile``: the walk's tile
  (DEC_SEL_TILE) where not the default (``few_blocks`` and ``wide_group`` take one tile, which
  the kernel walks in one pass; ``many_tiles`` two, five of 16 or one of 128)."""
  if sel_tile:
    _walk_tile(monkeypatch, sel_tile)
  geo, q_offset = DECODE_GEOS[name]
  R = geo.H // geo.G
  assert nsa_pallas.decode_supported(heads_per_group=R, head_dim=geo.D, seq_len=geo.S,
                                     itemsize=4, **geo.static())
  args = make_inputs(geo, seed=len(name))
  cot = random_like((geo.B, geo.T, geo.H, geo.D), 98)
  want = value_and_grad_fn(geo, "reference")(args, _offset(q_offset), cot)
  got = _fused_fn(geo, monkeypatch)(args, _offset(q_offset), cot)
  assert got[0].dtype == jnp.float32 and got[0].shape == (geo.B, 1, geo.H, geo.D)
  _assert_close_all(got, want, ARG_NAMES)
  np.testing.assert_allclose(got[0], oracle_nsa(args, geo, q_offset), rtol=RTOL, atol=ATOL)


def _walk_tile(monkeypatch, sel_tile: int):
  """The decoding kernel's walk in tiles of ``sel_tile`` selection blocks (128: ``many_tiles``'s
  75 blocks in one tile, its overlap matrices let past their byte bound)."""
  monkeypatch.setattr(nsa_pallas, "DEC_SEL_TILE", sel_tile)
  if sel_tile == 128:
    monkeypatch.setattr(nsa_pallas, "DEC_OVERLAP_BYTES", 512 * 1024)


@pytest.mark.parametrize("sel_tile", [16, 64, 128])
def test_fused_decoding_breaks_ties_as_the_reference(sel_tile, monkeypatch):
  """Identical compressed keys: every visible block equally probable, so candidate blocks
  overlapping the same number of them tie bit for bit; the kernel must take the lower block,
  as lax.top_k does, or it attends other keys (``many_tiles``: ties across five tiles of 16,
  two of 64, or in the one tile of 128, which the kernel walks in one pass)."""
  _walk_tile(monkeypatch, sel_tile)
  geo, q_offset = DECODE_GEOS["many_tiles"]
  args = make_inputs(geo, seed=4)
  args = dict(args, k_cmp=jnp.broadcast_to(args["k_cmp"][:, :1], args["k_cmp"].shape))
  cot = jnp.zeros((geo.B, geo.T, geo.H, geo.D))
  want = forward_fn(geo, "reference")(args, _offset(q_offset))
  got = _fused_fn(geo, monkeypatch, grads=False)(args, _offset(q_offset), cot)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("sel_tile", [64, 128])
def test_fused_decoding_reads_nothing_past_the_query(sel_tile, monkeypatch):
  """Keys and values after each row's position, and compressed blocks not complete there,
  change nothing, bit for bit (the cache past a row's position holds stale entries), in a walk
  of two tiles or of one."""
  _walk_tile(monkeypatch, sel_tile)
  geo, q_offset = DECODE_GEOS["many_tiles"]
  args = make_inputs(geo, seed=6)
  cot = jnp.zeros((geo.B, geo.T, geo.H, geo.D))
  later = (np.arange(geo.S)[None, :] > q_offset[:, None])[:, :, None, None]
  unseen = (np.arange(geo.N)[None, :] * geo.block_stride + geo.block_len - 1
            > q_offset[:, None])[:, :, None, None]
  perturbed = {k: v + 3.0 * (unseen if k in ("k_cmp", "v_cmp") else later)
               if k not in ("q", "gates") else v for k, v in args.items()}
  f = _fused_fn(geo, monkeypatch, grads=False)
  np.testing.assert_array_equal(f(perturbed, _offset(q_offset), cot),
                                f(args, _offset(q_offset), cot))


@pytest.mark.parametrize("name,sel_tile,ties,dtype", [
    ("few_blocks", None, False, jnp.float32), ("wide_group", None, False, jnp.float32),
    ("wide_group", None, False, jnp.bfloat16), ("many_tiles", 64, False, jnp.float32),
    ("many_tiles", 128, False, jnp.float32), ("many_tiles", 128, True, jnp.float32)])
def test_fused_decoding_options_give_the_same_numbers(name, sel_tile, ties, dtype,
                                                      monkeypatch):
  """The decoding kernel's session-38 options (DEC_RANKED_TOP: a one-tile top-k by ranks;
  DEC_OVERLAP_IOTA; DEC_EARLY_LOADS, on by default; DEC_WINDOW_PROGRAMS, whose two float32
  parts are the one program's sum of three split after its second term), each and all
  together, change which instructions run, never a number (against all four off): the same
  blocks in the same slots, the same float32 operations in the same order, so the output is
  the same bit for bit (``ties``: identical compressed keys, so tied candidates must be ranked
  by block as the picks take them)."""
  if sel_tile:
    _walk_tile(monkeypatch, sel_tile)
  geo, q_offset = DECODE_GEOS[name]
  args = make_inputs(geo, seed=11, dtype=dtype)
  if ties:
    args = dict(args, k_cmp=jnp.broadcast_to(args["k_cmp"][:, :1], args["k_cmp"].shape))
  cot = jnp.zeros((geo.B, geo.T, geo.H, geo.D))
  options = ("DEC_RANKED_TOP", "DEC_OVERLAP_IOTA", "DEC_EARLY_LOADS", "DEC_WINDOW_PROGRAMS")

  def run(**on):
    with monkeypatch.context() as m:
      for option in options:
        m.setattr(nsa_pallas, option, option in on)
      return np.asarray(_fused_fn(geo, m, grads=False)(args, _offset(q_offset), cot))

  want = run()
  assert want.dtype == dtype
  for on in [(option,) for option in options] + [options]:
    np.testing.assert_array_equal(run(**dict.fromkeys(on)), want, err_msg=str(on))


def test_fused_decoding_bf16_close_to_fp32_reference(monkeypatch):
  """bf16 inputs, as the GPU runs them: the bound of test_pallas_bf16_close_to_fp32_reference
  (bf16 output rounding and probabilities rounded before the value products)."""
  geo, q_offset = DECODE_GEOS["wide_group"]
  args16 = make_inputs(geo, seed=9, dtype=jnp.bfloat16)
  args32 = {k: v.astype(jnp.float32) for k, v in args16.items()}
  cot = jnp.zeros((geo.B, geo.T, geo.H, geo.D))
  out16 = _fused_fn(geo, monkeypatch, grads=False)(args16, _offset(q_offset), cot)
  assert out16.dtype == jnp.bfloat16
  out32 = forward_fn(geo, "reference")(args32, _offset(q_offset))
  assert_bf16_close(out16, out32, args32)


def test_a_bad_decoding_setting_is_one_line(monkeypatch):
  geo, q_offset = DECODE_GEOS["few_blocks"]
  monkeypatch.setattr(nsa, "PALLAS_DECODE", "fast")
  with pytest.raises(ValueError, match="nsa.PALLAS_DECODE must be one of"):
    forward_fn(dataclasses.replace(geo, B=1), "pallas")(
        make_inputs(dataclasses.replace(geo, B=1), seed=1), _offset(q_offset[:1]))


def test_fused_decoding_bounds_its_key_tiles(monkeypatch):
  """Key tiles over DEC_TILE_BYTES (shared memory on the GPU) take the split path: the NSA
  paper's geometry at D = 128 in bf16 (16 blocks of 64 keys: 256 KiB a tile) did not compile
  for sm_90; arc1's (16 KiB) does."""
  arc1 = dict(heads_per_group=4, head_dim=32, block_len=16, block_stride=8, select_len=32,
              num_select=8, window=128, seq_len=2048, itemsize=2)
  assert nsa_pallas.decode_supported(**arc1)
  assert not nsa_pallas.decode_supported(**dict(arc1, head_dim=128, block_len=32,
                                                block_stride=16, select_len=64, num_select=16,
                                                window=512))
  assert not nsa_pallas.decode_supported(**dict(arc1, head_dim=64, window=2048))
  # The walk's tile: arc1's 64 selection blocks (256 compressed keys, 16 KiB); halved while
  # its keys pass DEC_TILE_BYTES (D = 128 in float32: 128 KiB at 64, 64 KiB at 32), no lower
  # than the block choice's 16; none where a compression block reaches past the next tile.
  tile = dict(block_len=16, block_stride=8, select_len=32)
  assert nsa_pallas.decode_sel_tile(**tile, head_dim=32, itemsize=2) == 64
  assert nsa_pallas.decode_sel_tile(**tile, head_dim=128, itemsize=4) == 32
  assert nsa_pallas.decode_sel_tile(**tile, head_dim=4096, itemsize=4) == 16
  assert nsa_pallas.decode_sel_tile(**dict(tile, block_len=1100), head_dim=32, itemsize=2) == 64
  assert nsa_pallas.decode_sel_tile(**dict(tile, block_len=1100), head_dim=128, itemsize=4) == 0
  # No wider than the cache's selection blocks (one tile), no narrower than 16.
  for num_sel, want in ((64, 64), (40, 64), (32, 32), (20, 32), (16, 16), (3, 16)):
    assert nsa_pallas.decode_sel_tile(**tile, head_dim=32, itemsize=2, num_sel=num_sel) == want
  with monkeypatch.context() as m:
    m.setattr(nsa_pallas, "DEC_SEL_TILE", 48)
    with pytest.raises(ValueError, match="DEC_SEL_TILE must be a power of two"):
      nsa_pallas.decode_sel_tile(**tile, head_dim=32, itemsize=2)
  geo, q_offset = DECODE_GEOS["few_blocks"]
  monkeypatch.setattr(nsa_pallas, "DEC_TILE_BYTES", 1)
  monkeypatch.setattr(nsa, "PALLAS_DECODE", "fused")
  calls = []
  monkeypatch.setattr(nsa_pallas, "decode_attention", lambda *a, **k: calls.append(1))
  args = make_inputs(geo, seed=2)
  got = jax.jit(lambda a, o: nsa_core(*(a[n] for n in ARG_NAMES), q_offset=o, impl="pallas",
                                      **geo.static()))(args, _offset(q_offset))
  assert not calls
  np.testing.assert_allclose(got, forward_fn(geo, "reference")(args, _offset(q_offset)),
                             rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("with_bias", [False, True])
def test_cache_writes_in_one_kernel_are_the_scatters(with_bias):
  """nsa_pallas.write_cache against XLA scatters (write_cache_reference), bit for bit: each
  row's token at its position in every array (a position past S: nothing), its block (plus its
  bias, where given) at its slot where it has one (-1 or N: none), nothing else touched
  (interpret mode here; in place on the GPU); its gradient is the scatters'."""
  rng = np.random.default_rng(0)
  B, S, N, G, D = 4, 12, 5, 2, 4
  tokens = tuple(jnp.asarray(rng.standard_normal((B, S, G, D)), jnp.bfloat16) for _ in range(3))
  blocks = tuple(jnp.asarray(rng.standard_normal((B, N, G, D)), jnp.bfloat16) for _ in range(2))
  new_t = jnp.asarray(rng.standard_normal((3, B, G, D)), jnp.bfloat16)
  new_b = jnp.asarray(rng.standard_normal((2, B, G, D)), jnp.bfloat16)
  pos, slot = jnp.array([0, 7, 11, S]), jnp.array([-1, 2, 4, N])
  bias = jnp.asarray(rng.standard_normal((2, D)), jnp.bfloat16) if with_bias else None
  got = jax.jit(lambda *a: nsa_pallas.write_cache(*a, True, bias))(tokens, new_t, pos, blocks,
                                                                  new_b, slot)
  want = nsa_pallas.write_cache_reference(tokens, new_t, pos, blocks, new_b, slot, bias)
  assert len(got) == 5
  for g, w, a in zip(got, want, tokens + blocks):
    assert g.dtype == w.dtype
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
  np.testing.assert_array_equal(np.asarray(got[0][3]), np.asarray(tokens[0][3]))  # pos == S
  np.testing.assert_array_equal(np.asarray(got[3][3]), np.asarray(blocks[0][3]))  # slot == N
  np.testing.assert_array_equal(np.asarray(got[0][1, 7], np.float32),
                                np.asarray(new_t[0, 1], np.float32))
  if with_bias:  # row 1's block at slot 2, its bias added in bfloat16
    np.testing.assert_array_equal(np.asarray(got[4][1, 2], np.float32),
                                  np.asarray(new_b[1, 1] + bias[1], np.float32))

  def loss(fn, *a):
    return sum(jnp.sum(x.astype(jnp.float32) * (i + 1)) for i, x in enumerate(fn(*a)))
  args = (tokens, new_t, pos, blocks, new_b, slot)
  grads = jax.grad(lambda t, tn, b, bm, bb: loss(
      lambda *a: nsa_pallas.write_cache(*a, True, bb), t, tn, pos, b, bm, slot),
      argnums=(0, 1, 2, 3, 4))(*(args[i] for i in (0, 1, 3, 4)), bias)
  ref = jax.grad(lambda t, tn, b, bm, bb: loss(nsa_pallas.write_cache_reference, t, tn, pos, b,
                                               bm, slot, bb), argnums=(0, 1, 2, 3, 4))(
      *(args[i] for i in (0, 1, 3, 4)), bias)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(r, np.float32))


@pytest.mark.parametrize("dtype,L", [(jnp.float32, 8), (jnp.bfloat16, 8), (jnp.float32, 7)])
def test_cache_writes_with_the_block_compressed_in_the_kernel(dtype, L):
  """nsa_pallas.write_cache_compress against XLA (write_cache_compress_reference): the tokens
  bit for bit; the block a token completes (block_len 8, stride 4: positions 7, 11, 15, ...;
  block_len 7: 6, 10, 14, ...) compressed at its slot, none for a token that completes none,
  one whose slot is past N, or one past S; its gradient is the reference's."""
  rng = np.random.default_rng(1)
  stride, B, S, N, G, D, O = 4, 6, 24, 3, 2, 4, 8
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)  # noqa: E731
  tokens = tuple(normal(B, S, G, D) for _ in range(3))
  blocks = tuple(normal(B, N, G, D) for _ in range(2))
  new_t = normal(3, B, G, D)
  weights = (normal(2, L, D, O) / np.sqrt(L * D), jnp.asarray(rng.standard_normal((2, O)),
                                                               jnp.float32),
             normal(2, O, D) / np.sqrt(O), normal(2, D))
  # Slots 0, none, 3 >= N, 1, none, none.
  pos = jnp.array([7 - 8 + L, 13, 19 - 8 + L, 11 - 8 + L, 3, S])
  run = jax.jit(lambda t, tn, b, w: nsa_pallas.write_cache_compress(t, tn, pos, b, w, L, stride,
                                                                    True))
  got = run(tokens, new_t, blocks, weights)
  want = nsa_pallas.write_cache_compress_reference(tokens, new_t, pos, blocks, weights,
                                                   block_len=L, block_stride=stride)
  f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
  for g, w in zip(got[:3], want[:3]):
    np.testing.assert_array_equal(f32(g), f32(w))
  # Float32: sums of L*D (then O) products in another order. bfloat16: the same roundings of
  # the first product, gelu and the second product, each of which may land one ulp apart.
  tol = 1e-5 if dtype == jnp.float32 else 4 * 2.0 ** -8 * float(jnp.max(jnp.abs(f32(want[3]))))
  for g, w, before in zip(got[3:], want[3:], blocks):
    np.testing.assert_allclose(f32(g), f32(w), atol=tol, rtol=0)
    written = np.zeros((B, N), bool)
    written[0, 0] = written[3, 1] = True
    np.testing.assert_array_equal(f32(g)[~written], f32(before)[~written])  # nothing else
    assert not np.allclose(f32(g)[written], f32(before)[written])

  def loss(fn, *a):
    return sum(jnp.sum(x.astype(jnp.float32) * (i + 1)) for i, x in enumerate(fn(*a)))
  reference = functools.partial(nsa_pallas.write_cache_compress_reference, block_len=L,
                                block_stride=stride)
  grads = jax.grad(lambda t, tn, b, w: loss(
      lambda *a: nsa_pallas.write_cache_compress(*a, L, stride, True), t, tn, pos, b, w),
      argnums=(0, 1, 2, 3))(tokens, new_t, blocks, weights)
  ref = jax.grad(lambda t, tn, b, w: loss(reference, t, tn, pos, b, w), argnums=(0, 1, 2, 3))(
      tokens, new_t, blocks, weights)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(f32(g), f32(r))
  assert float(jnp.max(jnp.abs(f32(grads[3][0])))) > 0  # the compressor's weights learn


def test_which_decoding_steps_write_the_cache_in_one_kernel(monkeypatch):
  tiles = dict(heads_per_group=2, head_dim=8, select_len=8)
  assert DEFAULT_DECODE == "fused_xla_block"  # the fastest on an H200 (docs/benchmarks.md)
  assert not nsa.fused_decoding("pallas", num_groups=2, **tiles)  # "split" (the fixture)
  monkeypatch.setattr(nsa, "PALLAS_DECODE", DEFAULT_DECODE)
  assert nsa.fused_decoding("pallas", num_groups=2, **tiles)
  assert not nsa.fused_decoding("pallas", num_groups=3, **tiles)  # [3, D] rows: no Triton tile
  assert not nsa.fused_decoding("blockwise", num_groups=2, **tiles)
  assert nsa.fused_decoding("auto", num_groups=2, **tiles) == (jax.default_backend() == "gpu")


def _input_products_args(dtype, B, with_block, seed=0):
  """decode_inputs' arguments: C=16, H=4, G=2, D=8; with_block a 40-slot cache, blocks of 8
  every 4, positions before the first block completes, completing one, and in between."""
  C, H, G, D, S = 16, 4, 2, 8, 40
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), 12))

  def normal(shape, scale=1.0):
    return (scale * jax.random.normal(next(keys), shape)).astype(dtype)
  pos_B = jnp.asarray(np.random.default_rng(seed).integers(0, S, B), jnp.int32)
  pos_B = pos_B.at[:3].set(jnp.array([3, 7, 11]))  # 3: no block yet; 7 and 11 complete one
  cos_BF, sin_BF = rope_cos_sin(pos_B, D // 2, 10000.0)
  args = (normal((B, C)), normal((C, H * D), 0.3), normal((C, 6 * G * D), 0.3),
          normal((C, 3 * H), 0.3), normal((3 * H,), 0.3), cos_BF, sin_BF)
  if not with_block:
    return args, None, None
  L, s = 8, 4
  raw = (normal((B, S, G, D)), normal((B, S, G, D)))
  weights = (normal((2, L, D, 2 * D), 0.2), normal((2, 2 * D), 0.2).astype(jnp.float32),
             normal((2, 2 * D, D), 0.2))
  return args, (raw, pos_B, weights), (("block_len", L), ("block_stride", s))


@pytest.mark.parametrize("dtype,rows,with_block,normed", [
    (jnp.float32, 16, True, False), (jnp.bfloat16, 16, True, True),
    (jnp.float32, 64, False, True)])
def test_decode_input_products_in_one_kernel(dtype, rows, with_block, normed, monkeypatch):
  """nsa_pallas.decode_inputs against its XLA reference: rotated and unrotated queries, the six
  key/value rows (k_slc and k_win rotated), the gates' sigmoid and the block each row's token
  would complete (the cache's rows, the token's in its place), for 37 rows in tiles of 16 (the
  last part-filled) or one tile, of the rows as given or RMS-normalised in the kernel. Float32:
  sums of at most L*D = 64 products in another order (1e-5); bfloat16: each output rounded
  once more or less at a different last bit (the block after two roundings): 2 ulps."""
  monkeypatch.setattr(nsa_pallas, "INPUTS_ROWS", rows)
  args, block, geometry = _input_products_args(dtype, 37, with_block)
  rotate = (2, 4)
  scale, eps = (1.0 + jax.random.normal(jax.random.PRNGKey(9), (16,)), 1e-6) if normed else (
      None, None)
  got = jax.jit(lambda a, b, n: nsa_pallas.decode_inputs(*a, b, n, rotate, geometry, eps, True))(
      args, block, scale)
  want = nsa_pallas.decode_inputs_reference(*args, block, scale, rotate=rotate,
                                            block_geometry=geometry, norm_eps=eps)
  assert len(got) == len(want) == (5 if with_block else 4)
  tol = 1e-5 if dtype == jnp.float32 else 2.0 ** -7
  for g, w in zip(got, want):
    assert g.shape == w.shape and g.dtype == w.dtype == dtype
    w32 = np.asarray(w, np.float32)
    np.testing.assert_allclose(np.asarray(g, np.float32), w32, rtol=tol,
                               atol=tol * float(np.max(np.abs(w32))))
  if with_block:  # the rows that complete a block read the token in its place
    assert not np.allclose(np.asarray(got[4][:, 1], np.float32), 0)
  if normed:  # the norm is applied: rows scaled by 4 give the same products (not 4 times)
    scaled = nsa_pallas.decode_inputs(args[0] * 4, *args[1:], block, scale, rotate, geometry,
                                      eps, True)
    g32 = np.asarray(got[2], np.float32)
    np.testing.assert_allclose(np.asarray(scaled[2], np.float32), g32, rtol=tol,
                               atol=tol * float(np.max(np.abs(g32))))


@pytest.mark.parametrize("dtype,token_rows,rows", [
    (jnp.float32, (0, 1), 16), (jnp.bfloat16, (3, 1), 16), (jnp.float32, (0, 1), 1),
    (jnp.bfloat16, (3, 1), 1)])
def test_decode_block_in_a_kernel_of_its_own(dtype, token_rows, rows, monkeypatch):
  """nsa_pallas.decode_block against its XLA reference: the block each of 37 rows' token would
  complete (tiles of 16 rows, the last part-filled; or a program a row, its block one tile),
  the token (taken from the step's arrays ``token_rows``) as its last row where it completes
  one. Tolerances as the input kernel's block above; its gradient is the reference's."""
  monkeypatch.setattr(nsa_pallas, "BLOCK_ROWS", rows)
  args, (raw, pos_B, weights), geometry = _input_products_args(dtype, 37, True)
  tokens_NBGD = jax.random.normal(jax.random.PRNGKey(7), (6,) + raw[0][:, 0].shape).astype(dtype)
  got = jax.jit(lambda r, t, w: nsa_pallas.decode_block(r, t, pos_B, w, token_rows, geometry,
                                                        True))(raw, tokens_NBGD, weights)
  reference = functools.partial(nsa_pallas.decode_block_reference, token_rows=token_rows,
                                block_geometry=geometry)
  want = reference(raw, tokens_NBGD, pos_B, weights)
  assert got.shape == want.shape == (2,) + raw[0][:, 0].shape
  assert got.dtype == want.dtype == dtype
  tol = 1e-5 if dtype == jnp.float32 else 2.0 ** -7
  w32 = np.asarray(want, np.float32)
  np.testing.assert_allclose(np.asarray(got, np.float32), w32, rtol=tol,
                             atol=tol * float(np.max(np.abs(w32))))
  # Rows 1 and 2 (positions 7 and 11) complete a block: without their token it changes.
  other = reference(raw, tokens_NBGD.at[token_rows[0], 1:3].add(1.0), pos_B, weights)
  assert not np.allclose(np.asarray(other[0, 1:3], np.float32), w32[0, 1:3])
  if dtype == jnp.float32:
    ct = jax.random.normal(jax.random.PRNGKey(8), want.shape)
    kernel = lambda r, t, w: nsa_pallas.decode_block(  # noqa: E731
        r, t, pos_B, w, token_rows, geometry, True)
    grads = [jax.grad(lambda r, t, w, f=f: jnp.sum(f(r, t, w) * ct), argnums=(0, 1, 2))(
        raw, tokens_NBGD, weights) for f in (kernel, lambda r, t, w: reference(r, t, pos_B, w))]
    for g, w in zip(*map(jax.tree.leaves, grads)):
      np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("dtype,token_rows", [(jnp.float32, (0, 1)), (jnp.bfloat16, (3, 1))])
def test_decode_block_writing_the_cache_is_the_block_kernel_then_the_write_kernel(
    dtype, token_rows, monkeypatch):
  """nsa_pallas.decode_block_write (one kernel) stores what decode_block (a program a row) then
  write_cache store, bit for bit: each row's six token rows at its position (none past the
  cache) and, in the rows whose token completes a block within the slots, the block with the
  compressors' last bias at its slot (the layer's slots: -1 elsewhere, and N for blocks past
  the slots), every other entry of the eight arrays untouched; its gradient is its reference's
  (the wiring of its arguments: the backward pass is the reference's own)."""
  monkeypatch.setattr(nsa_pallas, "BLOCK_ROWS", 1)
  B, N = 37, 5
  _, (raw, pos_B, weights), geometry = _input_products_args(dtype, B, True)
  S, G, D = raw[0].shape[1:]
  L, stride = dict(geometry)["block_len"], dict(geometry)["block_stride"]
  keys = iter(jax.random.split(jax.random.PRNGKey(11), 4))
  token_arrays = tuple(jax.random.normal(next(keys), (6, B, S, G, D)).astype(dtype))
  token_arrays = tuple(raw[token_rows.index(i)] if i in token_rows else a
                       for i, a in enumerate(token_arrays))
  block_arrays = tuple(jax.random.normal(next(keys), (2, B, N, G, D)).astype(dtype))
  tokens_NBGD = jax.random.normal(next(keys), (6, B, G, D)).astype(dtype)
  bias_MD = jax.random.normal(next(keys), (2, D)).astype(dtype)
  # Row 3 past the cache (writes nothing), row 4's block 7 past the N slots, row 5's block 3.
  pos_B = pos_B.at[3:6].set(jnp.array([S, 35, 19]))
  start_B = pos_B - L + 1
  complete_B = (start_B >= 0) & (start_B % stride == 0) & (pos_B < S)
  slot_B = jnp.where(complete_B, start_B // stride, -1)
  stored = np.asarray(complete_B & (slot_B < N))
  assert stored[[1, 2, 5]].all() and not stored[[0, 3, 4]].any() and int(slot_B[4]) >= N

  def two_kernels(t, tok, b, w, bias):
    blocks = nsa_pallas.decode_block(tuple(t[n] for n in token_rows), tok, pos_B, w, token_rows,
                                     geometry, True)
    return nsa_pallas.write_cache(t, tok.astype(t[0].dtype), pos_B, b,
                                  blocks.astype(b[0].dtype), slot_B, True, bias)

  def one_kernel(t, tok, b, w, bias):
    return nsa_pallas.decode_block_write(t, tok, pos_B, b, slot_B, w, bias, token_rows,
                                         geometry, True)

  args = (token_arrays, tokens_NBGD, block_arrays, weights, bias_MD)
  got, want = (jax.jit(f)(*args) for f in (one_kernel, two_kernels))
  assert len(got) == len(want) == 8
  for g, w in zip(got, want):
    assert g.dtype == w.dtype == dtype
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
  for i in (6, 7):
    changed = np.any(np.asarray(got[i], np.float32) != np.asarray(block_arrays[i - 6],
                                                                  np.float32), axis=(2, 3))
    np.testing.assert_array_equal(changed.any(axis=1), stored)
  if dtype == jnp.float32:
    reference = functools.partial(nsa_pallas.decode_block_write_reference,
                                  token_rows=token_rows, block_geometry=geometry)
    cts = tuple(jax.random.normal(jax.random.PRNGKey(i), a.shape) for i, a in enumerate(want))

    def loss(f):
      return lambda *a: sum(jnp.sum(o * c) for o, c in zip(f(*a), cts))
    grads = [jax.grad(loss(f), argnums=(0, 1, 2, 3, 4))(*args)
             for f in (one_kernel, lambda t, tok, b, w, bias: reference(
                 t, tok, pos_B, b, slot_B, w, bias))]
    for g, w in zip(*map(jax.tree.leaves, grads)):
      np.testing.assert_array_equal(g, w)
  with pytest.raises(ValueError, match="token_rows must name two different arrays"):
    nsa_pallas.decode_block_write(token_arrays, tokens_NBGD, pos_B, block_arrays, slot_B,
                                  weights, bias_MD, (1, 1), geometry, True)


def test_decode_input_products_gradient_is_the_references():
  args, block, geometry = _input_products_args(jnp.float32, 5, True)
  cts = jax.random.normal(jax.random.PRNGKey(3), (5, 4, 8))
  scale = 1.0 + jax.random.normal(jax.random.PRNGKey(4), (16,))

  def loss(fn, a, raw, w, n):
    outs = fn(*a, (raw, block[1], w), n)
    return sum(jnp.sum(o * jnp.resize(cts, o.shape) * (i + 1)) for i, o in enumerate(outs))

  kernel = lambda *a: nsa_pallas.decode_inputs(*a, (2, 4), geometry, 1e-6, True)  # noqa: E731
  reference = functools.partial(nsa_pallas.decode_inputs_reference, rotate=(2, 4),
                                block_geometry=geometry, norm_eps=1e-6)
  grads = [jax.grad(functools.partial(loss, f), argnums=(0, 1, 2, 3))(
      args, block[0], block[2], scale) for f in (kernel, reference)]
  for g, w in zip(*map(jax.tree.leaves, grads)):
    np.testing.assert_array_equal(g, w)
  assert float(jnp.max(jnp.abs(grads[0][1][0]))) > 0  # the cache's raw keys get a gradient
  assert float(jnp.max(jnp.abs(grads[0][3]))) > 0  # and the norm's gains


def test_which_decoding_steps_take_the_input_products_kernel():
  """On a GPU the Triton tiles (C and D powers of two, D/2 >= 16, within INPUTS_TILE_BYTES);
  interpret mode any even D; DECODE_INPUTS is the default; the block's raw arrays unrotated."""
  assert nsa_pallas.DECODE_INPUTS is True
  gpu = functools.partial(nsa_pallas.decode_inputs_supported, interpret=False, itemsize=2)
  assert gpu(d_model=256, head_dim=32) and gpu(d_model=512, head_dim=64)
  assert not gpu(d_model=256, head_dim=16) and not gpu(d_model=96, head_dim=32)
  assert not gpu(d_model=2048, head_dim=64)  # a program's tiles past INPUTS_TILE_BYTES
  assert nsa_pallas.decode_inputs_supported(d_model=96, head_dim=6, itemsize=4, interpret=True)
  args, block, geometry = _input_products_args(jnp.float32, 3, True)
  with pytest.raises(ValueError, match="compressor reads the raw arrays 0 and 1 unrotated"):
    nsa_pallas.decode_inputs(*args, block, None, (0, 2), geometry, None, True)
  with pytest.raises(ValueError, match="norm_scale_C and norm_eps go together"):
    nsa_pallas.decode_inputs(*args, block, None, (2, 4), geometry, 1e-6, True)
