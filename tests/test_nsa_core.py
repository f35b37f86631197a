"""Tests of the NSA attention core: both implementations against an independent float64 oracle
and against each other (forward and gradients), branch-level equivalences, visibility and
causality, the selection rule, bf16, vmap and input validation."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onn_jax.model import nsa
from onn_jax.model.nsa import (nsa_core, num_compressed_blocks, resolve_impl, select_blocks,
                               selection_scores)

ARG_NAMES = ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates")


@dataclasses.dataclass(frozen=True)
class Geo:
  B: int
  T: int
  S: int
  H: int
  G: int
  D: int
  block_len: int
  block_stride: int
  select_len: int
  num_select: int
  window: int

  @property
  def N(self) -> int:
    return num_compressed_blocks(self.S, self.block_len, self.block_stride)

  def static(self) -> dict:
    return dict(block_len=self.block_len, block_stride=self.block_stride,
                select_len=self.select_len, num_select=self.num_select, window=self.window)


def make_inputs(geo: Geo, seed: int, dtype=jnp.float32) -> dict:
  # numpy randomness: eager jax.random would compile a kernel for every new shape.
  rng = np.random.default_rng(seed)
  kv = (geo.B, geo.S, geo.G, geo.D)
  cmp = (geo.B, geo.N, geo.G, geo.D)
  # Larger queries make the compressed softmax peaky, so block importances differ clearly.
  args = dict(
      q=2.0 * rng.standard_normal((geo.B, geo.T, geo.H, geo.D)),
      k_cmp=rng.standard_normal(cmp), v_cmp=rng.standard_normal(cmp),
      k_slc=rng.standard_normal(kv), v_slc=rng.standard_normal(kv),
      k_win=rng.standard_normal(kv), v_win=rng.standard_normal(kv),
      gates=rng.random((geo.B, geo.T, geo.H, 3)))
  return {k: jnp.asarray(v.astype(np.float32), dtype) for k, v in args.items()}


def random_like(shape, seed: int) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def with_gates(args: dict, g: tuple[float, float, float]) -> dict:
  gates = np.broadcast_to(np.asarray(g, np.float32), args["gates"].shape)
  return dict(args, gates=jnp.asarray(gates, args["gates"].dtype))


def segment_start_of(starts, B: int, T: int) -> jax.Array:
  """Packed rows: int32 [B,T], the start of each position's sequence. ``starts``: where the
  sequences begin, the same in every row, or one such list per row."""
  per_row = starts if starts and isinstance(starts[0], (list, tuple)) else [starts] * B
  seg = np.zeros((B, T), np.int32)
  for b, row in enumerate(per_row):
    for s0 in row:
      seg[b, s0:] = s0
  return jnp.asarray(seg)


def offsets_np(q_offset, B: int) -> np.ndarray:
  return np.broadcast_to(np.asarray(q_offset, np.int64), (B,))


# ---------------------------------------------------------------- independent float64 oracle

def _softmax_attend(q, keys, vals):
  if len(keys) == 0:
    return np.zeros_like(q), np.zeros(0)
  logits = keys @ q / math.sqrt(q.shape[-1])
  w = np.exp(logits - logits.max())
  w /= w.sum()
  return w @ vals, w


def oracle_nsa(args: dict, geo: Geo, q_offset) -> np.ndarray:
  """Per (b, t, h) loops straight from the contract, in float64. ``args["q_cmp"]``, when
  given, are the queries of the compressed branch and of the block choice."""
  a = {k: np.asarray(v, np.float64) for k, v in args.items()}
  q_cmp = a.get("q_cmp", a["q"])
  R = geo.H // geo.G
  off = offsets_np(q_offset, geo.B)
  out = np.zeros((geo.B, geo.T, geo.H, geo.D))
  for b in range(geo.B):
    for t in range(geo.T):
      p = int(off[b]) + t
      visible = [i for i in range(geo.N) if i * geo.block_stride + geo.block_len - 1 <= p]
      for g in range(geo.G):
        heads = range(g * R, (g + 1) * R)
        o_cmp, probs = {}, {}
        for h in heads:
          o_cmp[h], probs[h] = _softmax_attend(q_cmp[b, t, h], a["k_cmp"][b, visible, g],
                                               a["v_cmp"][b, visible, g])
        cur = p // geo.select_len
        importance = {}
        for j in range(cur + 1):
          lo, hi = j * geo.select_len, (j + 1) * geo.select_len
          importance[j] = sum(
              probs[h][n] for h in heads for n, i in enumerate(visible)
              if i * geo.block_stride < hi and lo < i * geo.block_stride + geo.block_len)
        forced = sorted({0, cur} | ({cur - 1} if cur >= 1 else set()))
        rest = sorted((j for j in range(cur + 1) if j not in forced),
                      key=lambda j: (-importance[j], j))
        chosen = forced + rest[:geo.num_select - len(forced)]
        sel_pos = [s for j in chosen for s in range(j * geo.select_len, (j + 1) * geo.select_len)
                   if s <= p]
        win_pos = list(range(max(0, p - geo.window + 1), p + 1))
        for h in heads:
          o_slc, _ = _softmax_attend(a["q"][b, t, h], a["k_slc"][b, sel_pos, g],
                                     a["v_slc"][b, sel_pos, g])
          o_win, _ = _softmax_attend(a["q"][b, t, h], a["k_win"][b, win_pos, g],
                                     a["v_win"][b, win_pos, g])
          gt = a["gates"][b, t, h]
          out[b, t, h] = gt[0] * o_cmp[h] + gt[1] * o_slc + gt[2] * o_win
  return out


def causal_attention(q, k, v, q_offset) -> np.ndarray:
  """Plain full causal GQA softmax attention in float64 (head h uses key group h // (H/G))."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, H, D = q.shape
  S, G = k.shape[1], k.shape[2]
  off = offsets_np(q_offset, B)
  k_h = np.repeat(k, H // G, axis=2)
  v_h = np.repeat(v, H // G, axis=2)
  logits = np.einsum("bthd,bshd->bhts", q, k_h) / math.sqrt(D)
  pos = off[:, None] + np.arange(T)[None, :]
  mask = np.arange(S)[None, None, :] <= pos[:, :, None]
  logits = np.where(mask[:, None], logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", w, v_h)


# ---------------------------------------------------------------- shared jitted functions

@functools.lru_cache(maxsize=None)
def jitted_value_and_grad(geo: Geo, impl: str):
  """(args, q_offset, cotangent) -> (output, grads of <output, cotangent> for every input)."""
  def loss(args, q_offset, cot):
    out = nsa_core(*(args[n] for n in ARG_NAMES), q_offset=q_offset, impl=impl, **geo.static())
    return jnp.sum(out * cot), out

  grad_fn = jax.value_and_grad(loss, has_aux=True)

  def run(args, q_offset, cot):
    (_, out), grads = grad_fn(args, q_offset, cot)
    return out, grads

  return jax.jit(run)


@functools.lru_cache(maxsize=None)
def jitted_forward(geo: Geo, impl: str):
  def run(args, q_offset):
    return nsa_core(*(args[n] for n in ARG_NAMES), q_offset=q_offset, impl=impl, **geo.static())
  return jax.jit(run)


# block_len != block_stride, select_len = 2 * stride, one head per group, sequences that start
# before any compression block completes, S not a multiple of any block size, T = 1 decoding,
# per-example offsets, fewer selection blocks than num_select.
GEOMETRIES = {
    "group1_from_start": (Geo(B=2, T=21, S=21, H=2, G=2, D=8, block_len=8, block_stride=4,
                              select_len=8, num_select=3, window=5), 0),
    "group4_int_offset": (Geo(B=1, T=13, S=45, H=4, G=1, D=8, block_len=6, block_stride=3,
                              select_len=6, num_select=4, window=7), 32),
    "per_example_offset": (Geo(B=2, T=9, S=50, H=8, G=2, D=4, block_len=5, block_stride=5,
                               select_len=10, num_select=3, window=6), np.array([3, 41])),
    # Also: fewer selection blocks (J = 4) than num_select, window > S.
    "decode_t1_few_blocks": (Geo(B=3, T=1, S=31, H=4, G=2, D=8, block_len=4, block_stride=2,
                                 select_len=8, num_select=6, window=40), np.array([0, 17, 30])),
}


def _offset_arg(q_offset):
  # One abstract type per geometry (int32 [B]) so that every test shares the compiled function.
  return jnp.asarray(q_offset, jnp.int32)


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_reference_matches_blockwise_and_oracle(name):
  geo, q_offset = GEOMETRIES[name]
  args = make_inputs(geo, seed=len(name))
  cot = random_like((geo.B, geo.T, geo.H, geo.D), 99)
  out_ref, grads_ref = jitted_value_and_grad(geo, "reference")(args, _offset_arg(q_offset), cot)
  out_blk, grads_blk = jitted_value_and_grad(geo, "blockwise")(args, _offset_arg(q_offset), cot)
  assert out_ref.shape == (geo.B, geo.T, geo.H, geo.D)
  assert out_blk.dtype == jnp.float32
  np.testing.assert_allclose(out_ref, oracle_nsa(args, geo, q_offset), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out_blk, out_ref, rtol=1e-5, atol=1e-6)
  for arg in ARG_NAMES:
    g_ref, g_blk = np.asarray(grads_ref[arg]), np.asarray(grads_blk[arg])
    assert np.all(np.isfinite(g_ref)) and np.all(np.isfinite(g_blk)), arg
    np.testing.assert_allclose(g_blk, g_ref, rtol=1e-5, atol=1e-5, err_msg=arg)
    if arg not in ("k_cmp", "v_cmp") or geo.N:
      assert np.abs(g_ref).max() > 0, f"no gradient reached {arg}"


def _numeric_grad_check(geo: Geo, impl: str, arg: str, q_offset) -> None:
  """Directional derivative of a scalar output against a central difference of the float32
  outputs, summed in float64. Each output carries a few ulps of rounding: the difference of
  two sums of |out| |cot| then errs by up to ~4 * 2^-24 sum|out||cot| / (2 eps), which bounds
  the check (eps = 1e-3: the truncation, eps^2 / 6 of the third derivative, is far below)."""
  args = make_inputs(geo, seed=5)
  cot = random_like((geo.B, geo.T, geo.H, geo.D), 1)
  direction = random_like(args[arg].shape, 2)
  out, grads = jitted_value_and_grad(geo, impl)(args, _offset_arg(q_offset), cot)
  cot, direction = np.asarray(cot, np.float64), np.asarray(direction)
  analytic = float(np.sum(np.asarray(grads[arg], np.float64) * direction))
  f = jitted_forward(geo, impl)
  eps = 1e-3
  base = np.asarray(args[arg])
  plus = f(dict(args, **{arg: jnp.asarray(base + eps * direction)}), _offset_arg(q_offset))
  minus = f(dict(args, **{arg: jnp.asarray(base - eps * direction)}), _offset_arg(q_offset))
  numeric = float(np.sum((np.asarray(plus, np.float64) - np.asarray(minus)) * cot)) / (2 * eps)
  rounding = 4 * 2 ** -24 * float(np.sum(np.abs(np.asarray(out, np.float64)) * np.abs(cot)))
  np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=rounding / (2 * eps))


@pytest.mark.parametrize("arg", ["q", "k_slc", "v_win", "k_cmp", "gates"])
def test_gradient_matches_finite_difference(arg):
  geo, q_offset = GEOMETRIES["group4_int_offset"]
  _numeric_grad_check(geo, "blockwise", arg, q_offset)


# ---------------------------------------------------------------- branch equivalences

# J = 5 selection blocks = num_select, and window > S: both the selected and the window branch
# see every causal key.
FULL_GEO = Geo(B=2, T=19, S=40, H=4, G=2, D=8, block_len=6, block_stride=2, select_len=8,
               num_select=5, window=47)
FULL_OFFSET = np.array([21, 5])


@pytest.mark.parametrize("impl", ["reference", "blockwise"])
def test_selected_branch_covering_every_block_is_causal_attention(impl):
  args = with_gates(make_inputs(FULL_GEO, seed=3), (0.0, 1.0, 0.0))
  out = jitted_forward(FULL_GEO, impl)(args, _offset_arg(FULL_OFFSET))
  want = causal_attention(args["q"], args["k_slc"], args["v_slc"], FULL_OFFSET)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "blockwise"])
def test_window_branch_wider_than_sequence_is_causal_attention(impl):
  args = with_gates(make_inputs(FULL_GEO, seed=4), (0.0, 0.0, 1.0))
  out = jitted_forward(FULL_GEO, impl)(args, _offset_arg(FULL_OFFSET))
  want = causal_attention(args["q"], args["k_win"], args["v_win"], FULL_OFFSET)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "blockwise"])
def test_compressed_branch_zero_before_first_block_and_matches_oracle(impl):
  geo, q_offset = GEOMETRIES["group1_from_start"]  # first block completes at p = 7
  args = with_gates(make_inputs(geo, seed=6), (1.0, 0.0, 0.0))
  out = np.asarray(jitted_forward(geo, impl)(args, _offset_arg(q_offset)))
  first_visible = geo.block_len - 1
  assert np.all(out[:, :first_visible] == 0.0)
  assert np.all(np.abs(out[:, first_visible:]).max(axis=(-1, -2)) > 0)
  np.testing.assert_allclose(out, oracle_nsa(args, geo, q_offset), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["reference", "blockwise"])
def test_invisible_compressed_blocks_do_not_matter(impl):
  geo, q_offset = GEOMETRIES["group1_from_start"]
  args = make_inputs(geo, seed=7)
  cut = 13  # blocks 0, 1 are visible at p = 13 (last keys 7, 11); block 2 ends at 15
  invisible = np.array([i * geo.block_stride + geo.block_len - 1 > cut for i in range(geo.N)])
  noise = 5.0 * invisible[None, :, None, None]
  perturbed = dict(args, k_cmp=args["k_cmp"] + noise, v_cmp=args["v_cmp"] - noise)
  f = jitted_forward(geo, impl)
  out = np.asarray(f(args, _offset_arg(q_offset)))
  out_p = np.asarray(f(perturbed, _offset_arg(q_offset)))
  np.testing.assert_array_equal(out_p[:, :cut + 1], out[:, :cut + 1])
  assert np.abs(out_p[:, cut + 3:] - out[:, cut + 3:]).max() > 1e-3  # later queries see it


@pytest.mark.parametrize("impl", ["reference", "blockwise"])
@pytest.mark.parametrize("name", ["group1_from_start", "per_example_offset"])
def test_causality_of_selected_and_window_keys(impl, name):
  geo, q_offset = GEOMETRIES[name]
  args = make_inputs(geo, seed=8)
  off = offsets_np(q_offset, geo.B)
  cut_t = geo.T // 2
  cut_B = off + cut_t  # absolute position of the last query that must not change
  future = (np.arange(geo.S)[None, :] > cut_B[:, None])[:, :, None, None]
  perturbed = {k: (v + 3.0 * future if k in ("k_slc", "v_slc", "k_win", "v_win") else v)
               for k, v in args.items()}
  f = jitted_forward(geo, impl)
  out = np.asarray(f(args, _offset_arg(q_offset)))
  out_p = np.asarray(f(perturbed, _offset_arg(q_offset)))
  np.testing.assert_array_equal(out_p[:, :cut_t + 1], out[:, :cut_t + 1])
  assert np.abs(out_p[:, cut_t + 1:] - out[:, cut_t + 1:]).max() > 1e-3


# ---------------------------------------------------------------- selection rule

def test_selection_scores_match_bruteforce():
  B, T, H, G, N, S = 2, 3, 4, 2, 9, 37
  block_len, block_stride, select_len = 6, 4, 8
  p_cmp = np.random.default_rng(0).random((B, T, H, N)).astype(np.float32)
  got = np.asarray(selection_scores(jnp.asarray(p_cmp), num_groups=G, seq_len=S,
                                    block_len=block_len, block_stride=block_stride,
                                    select_len=select_len))
  J = -(-S // select_len)
  want = np.zeros((B, T, G, J))
  for j in range(J):
    for i in range(N):
      cmp_keys = set(range(i * block_stride, i * block_stride + block_len))
      if cmp_keys & set(range(j * select_len, (j + 1) * select_len)):
        for h in range(H):
          want[:, :, h // (H // G), j] += p_cmp[:, :, h, i]
  np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("num_select", [3, 4, 7])
def test_select_blocks_forced_topk_and_no_duplicates(num_select):
  rng = np.random.default_rng(num_select)
  B, T, G, J, select_len = 2, 30, 3, 6, 4
  # Few distinct score values, so ties are frequent and tie-breaking is exercised.
  scores = rng.integers(0, 3, (B, T, G, J)).astype(np.float32)
  pos = rng.integers(0, J * select_len, (B, T)).astype(np.int32)
  idx, valid = select_blocks(jnp.asarray(scores), jnp.asarray(pos), num_select=num_select,
                             select_len=select_len)
  idx, valid = np.asarray(idx), np.asarray(valid)
  assert idx.shape == valid.shape == (B, T, G, num_select)
  for b in range(B):
    for t in range(T):
      cur = pos[b, t] // select_len
      forced = sorted({0, cur} | ({cur - 1} if cur >= 1 else set()))
      for g in range(G):
        rest = sorted((j for j in range(cur + 1) if j not in forced),
                      key=lambda j: (-scores[b, t, g, j], j))
        want = forced + rest[:num_select - len(forced)]
        n_valid = int(valid[b, t, g].sum())
        assert valid[b, t, g, :n_valid].all(), "valid slots must come first"
        assert list(idx[b, t, g, :n_valid]) == want
        assert n_valid == min(num_select, cur + 1)


def test_select_blocks_ties_go_to_lower_index():
  scores = jnp.zeros((1, 1, 1, 8))
  idx, valid = select_blocks(scores, jnp.array([[7 * 4 + 1]]), num_select=5, select_len=4)
  assert list(np.asarray(idx[0, 0, 0])) == [0, 6, 7, 1, 2]
  assert np.asarray(valid).all()


# ---------------------------------------------------------------- dtypes, transforms, dispatch

def assert_bf16_close(out16, out32, args):
  """bf16 inputs (exact in float32 too): the output's own bf16 rounding (2^-8 of it) plus the
  probabilities' bf16 rounding before the value products (2^-8 relative each, averaged over
  the keys: 2^-8 of the values' scale), so 2^-8 (max|out| + max|v|)."""
  values = max(float(jnp.abs(args[name]).max()) for name in ("v_cmp", "v_slc", "v_win"))
  np.testing.assert_allclose(np.asarray(out16, np.float32), np.asarray(out32), rtol=0,
                             atol=2 ** -8 * (float(jnp.abs(out32).max()) + values))


@pytest.mark.parametrize("impl", ["reference", "blockwise"])
def test_bf16_inputs_close_to_fp32(impl):
  geo, q_offset = GEOMETRIES["per_example_offset"]
  args16 = make_inputs(geo, seed=9, dtype=jnp.bfloat16)
  args32 = {k: v.astype(jnp.float32) for k, v in args16.items()}
  out16 = jitted_forward(geo, impl)(args16, _offset_arg(q_offset))
  out32 = jitted_forward(geo, impl)(args32, _offset_arg(q_offset))
  assert out16.dtype == jnp.bfloat16
  assert_bf16_close(out16, out32, args32)


def test_vmap_of_gradient_over_extra_axis():
  geo, q_offset = GEOMETRIES["group4_int_offset"]
  offset = _offset_arg(q_offset)
  a1, a2 = make_inputs(geo, seed=10), make_inputs(geo, seed=11)
  cot = random_like((geo.B, geo.T, geo.H, geo.D), 3)
  stacked = jax.tree.map(lambda x, y: jnp.stack([x, y]), a1, a2)
  per_example = jitted_value_and_grad(geo, "blockwise")
  out, grads = jax.jit(jax.vmap(lambda args: per_example(args, offset, cot)))(stacked)
  for i, args in enumerate((a1, a2)):
    want_out, want_grads = per_example(args, offset, cot)
    np.testing.assert_allclose(out[i], want_out, rtol=1e-5, atol=1e-6)
    for arg in ARG_NAMES:
      np.testing.assert_allclose(grads[arg][i], want_grads[arg], rtol=1e-5, atol=1e-5)


def _jaxpr_text(geo: Geo, impl: str) -> str:
  """The traced program for abstract inputs of ``geo`` (tracing only: no compile, no data)."""
  shapes = jax.eval_shape(lambda: make_inputs(geo, seed=0))
  return str(jax.make_jaxpr(
      lambda args: nsa_core(*(args[n] for n in ARG_NAMES), impl=impl, **geo.static()))(shapes))


def test_auto_dispatch():
  def auto(T, S, keys):
    return resolve_impl("auto", num_queries=T, seq_len=S, keys_per_query=keys)
  assert auto(1, 8192, 64) == "reference"  # decoding
  assert auto(2048, 2048, 64) == "blockwise"
  assert auto(1024, 1024, 64) == "blockwise"
  assert auto(512, 512, 64) == "reference"  # small enough for dense logits
  assert auto(2048, 2048, 1536) == "reference"  # each query gathers most keys anyway
  assert resolve_impl("blockwise", num_queries=1, seq_len=4, keys_per_query=99) == "blockwise"
  small = GEOMETRIES["group4_int_offset"][0]
  large = dataclasses.replace(small, T=800, S=800)  # 4 * (4*6 + 7) <= 800
  for geo, want in ((small, "reference"), (large, "blockwise")):
    other = "blockwise" if want == "reference" else "reference"
    auto = _jaxpr_text(geo, "auto")
    assert auto == _jaxpr_text(geo, want) and auto != _jaxpr_text(geo, other)


def test_sequence_shorter_than_one_compression_block():
  geo = Geo(B=1, T=5, S=5, H=2, G=1, D=4, block_len=8, block_stride=4, select_len=4,
            num_select=3, window=2)
  assert geo.N == 0
  args = make_inputs(geo, seed=13)
  out_ref = jitted_forward(geo, "reference")(args, _offset_arg(0))
  out_blk = jitted_forward(geo, "blockwise")(args, _offset_arg(0))
  np.testing.assert_allclose(out_blk, out_ref, atol=1e-6)
  np.testing.assert_allclose(out_ref, oracle_nsa(args, geo, 0), rtol=1e-5, atol=1e-6)


def test_num_compressed_blocks():
  for S in range(0, 30):
    for block_len, stride in [(8, 4), (5, 5), (6, 2), (3, 1)]:
      want = sum(1 for i in range(S) if i * stride + block_len <= S)
      assert num_compressed_blocks(S, block_len, stride) == want


@pytest.mark.parametrize("change, match", [
    (dict(num_select=2), "num_select"),
    (dict(impl="dense"), "impl"),
    (dict(q_offset=40), "q_offset"),
    (dict(q_offset=np.array([1, 2, 3])), "q_offset"),
    (dict(block_len=0), "block_len"),
    (dict(k_cmp=jnp.zeros((1, 3, 2, 8))), "k_cmp"),
    (dict(q=jnp.zeros((1, 13, 3, 8))), "multiple"),
    (dict(gates=jnp.zeros((1, 13, 4, 2))), "gates"),
    (dict(v_win=jnp.zeros((1, 44, 1, 8))), "v_win"),
])
def test_bad_inputs_raise(change, match):
  geo, _ = GEOMETRIES["group4_int_offset"]
  args = make_inputs(geo, seed=0)
  kwargs = dict(geo.static(), q_offset=0, impl="reference")
  for key, val in change.items():
    (args if key in ARG_NAMES else kwargs)[key] = val
  if "q" in change:  # 3 heads against 1 group is fine; make G = 2 so 3 is not a multiple
    for k in ("k_slc", "v_slc", "k_win", "v_win"):
      args[k] = jnp.zeros((1, geo.S, 2, 8))
    for k in ("k_cmp", "v_cmp"):
      args[k] = jnp.zeros((1, geo.N, 2, 8))
    args["gates"] = jnp.zeros((1, 13, 3, 3))
  with pytest.raises((ValueError, TypeError), match=match):
    nsa_core(*(args[n] for n in ARG_NAMES), **kwargs)


def test_module_exports():
  for name in ("nsa_core", "num_compressed_blocks", "selection_scores", "select_blocks",
               "query_positions", "AUTO_BLOCKWISE_MIN_TS"):
    assert hasattr(nsa, name)
