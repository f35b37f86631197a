"""Whole-model invariants: causality, KV-cache decoding vs the full forward, soft inputs."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onn_jax.config import ModelConfig
from onn_jax import decode
from onn_jax.data.serialize import decode_grid
from onn_jax.data.tokens import END, NEWLINE, PAD, VOCAB_SIZE
from onn_jax.decode import generate_jit
from onn_jax.model.transformer import Transformer, count_params, init_cache, init_params

from conftest import TINY_MODEL

# Geometries where compressed blocks complete mid-decode, with GQA 1 and 2 groups.
GEOMETRIES = [
    dict(block_len=8, block_stride=4, select_len=8, num_select=3, window=12, num_kv_groups=2),
    dict(block_len=4, block_stride=4, select_len=8, num_select=4, window=5, num_kv_groups=1),
    # Compressed keys rotated at their block's last position (rebuilt mid-decode), and the
    # pre-2026-11-30 rotated-query-only model that old runs reload as.
    dict(block_len=8, block_stride=4, select_len=8, num_select=3, window=12, num_kv_groups=2,
         cmp_rope="both"),
    dict(block_len=4, block_stride=4, select_len=8, num_select=4, window=5, num_kv_groups=1,
         cmp_rope="query"),
]


@functools.lru_cache(maxsize=None)
def _setup(geometry_index, seed=0):
  cfg = ModelConfig(**{**TINY_MODEL, **GEOMETRIES[geometry_index]})
  model = Transformer(cfg)
  params = init_params(cfg, jax.random.PRNGKey(seed))
  return cfg, model, params


@functools.lru_cache(maxsize=None)
def _forward(model):
  return jax.jit(lambda params, inputs: model.apply({"params": params}, inputs)[0])


@functools.lru_cache(maxsize=None)
def _prefill(model):
  return jax.jit(lambda params, inputs, cache: model.apply(
      {"params": params}, inputs, mode="prefill", cache=cache)[:2])


@functools.lru_cache(maxsize=None)
def _decode(model):
  return jax.jit(lambda params, inputs, cache, pos: model.apply(
      {"params": params}, inputs, mode="decode", cache=cache, pos_B=pos)[:2])


@pytest.mark.parametrize("geometry", range(len(GEOMETRIES)))
def test_causal(geometry):
  _, model, params = _setup(geometry)
  T, t = 37, 20
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, T), 0, VOCAB_SIZE)
  changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 3) % VOCAB_SIZE)
  logits_a = _forward(model)(params, tokens)
  logits_b = _forward(model)(params, changed)
  np.testing.assert_array_equal(logits_a[:, :t + 1], logits_b[:, :t + 1])
  assert not np.allclose(logits_a[:, t + 1:], logits_b[:, t + 1:])


@pytest.mark.parametrize("geometry", range(len(GEOMETRIES)))
def test_prefill_then_decode_matches_full_forward(geometry):
  """Each example decodes from its own prompt length, token by token, against the cache."""
  cfg, model, params = _setup(geometry)
  T = 41
  tokens = jax.random.randint(jax.random.PRNGKey(2), (3, T), 0, VOCAB_SIZE)
  full = _forward(model)(params, tokens)
  prompt_len = np.array([5, 13, 22])
  P = int(prompt_len.max())
  masked = jnp.where(jnp.arange(P)[None] < prompt_len[:, None], tokens[:, :P], PAD)
  cache = init_cache(cfg, 3, T)
  pre, cache = _prefill(model)(params, masked, cache)
  for b in range(3):
    np.testing.assert_allclose(pre[b, :prompt_len[b]], full[b, :prompt_len[b]], atol=2e-5)
  pos = jnp.asarray(prompt_len)
  for _ in range(T - P):
    step_tokens = tokens[jnp.arange(3), pos][:, None]
    logits, cache = _decode(model)(params, step_tokens, cache, pos)
    np.testing.assert_allclose(logits[:, 0], full[jnp.arange(3), pos], atol=2e-5, rtol=1e-5)
    pos = pos + 1


def _with_biases(params, seed):
  """``params`` with every bias (zero at initialisation) drawn at random, so that each counts."""
  leaves, tree = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree_util.tree_unflatten(tree, [
      0.1 * jax.random.normal(k, leaf.shape, leaf.dtype) if "bias" in jax.tree_util.keystr(path)
      else leaf for k, (path, leaf) in zip(keys, leaves)])


def _bf16_decoding_setup(*, params_seed: int, tokens_seed: int, T: int, P: int):
  """Geometry 0 in bfloat16 with NSA's Pallas path, random biases, two rows of T tokens and
  the cache of their first P: (model, params, tokens_BT, cache)."""
  cfg, _, params = _setup(0)
  params = _with_biases(params, params_seed)
  cfg = dataclasses.replace(cfg, nsa_impl="pallas", compute_dtype="bfloat16")
  model = Transformer(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(tokens_seed), (2, T), 0, VOCAB_SIZE)
  _, cache = _prefill(model)(params, tokens[:, :P], init_cache(cfg, 2, T))
  return model, params, tokens, cache


def _decode_steps(model, params, tokens_BT, cache, start: int):
  """Decoding steps from position ``start`` to the end of ``tokens_BT`` (traced anew, with the
  module settings of the moment): (every step's logits, the last cache). With geometry 0's
  blocks (length 8, stride 4) blocks complete at 7, 11, 15, ..."""
  step = jax.jit(lambda p, x, c, pos: model.apply({"params": p}, x, mode="decode", cache=c,
                                                  pos_B=pos)[:2])
  B, T = tokens_BT.shape
  pos, out = jnp.full((B,), start), []
  for _ in range(T - start):
    logits, cache = step(params, tokens_BT[jnp.arange(B), pos][:, None], cache, pos)
    out.append(logits)
    pos = pos + 1
  return out, cache


def test_block_bias_in_the_write_kernel_is_xlas_add_bit_for_bit(monkeypatch):
  """The compressors' last bias added by NSA's cache-write kernel (BLOCK_BIAS_IN_WRITE, the
  default) gives the bfloat16 cache and logits of XLA's add, bit for bit, over decoding steps
  that complete compressed blocks (interpret mode here). The block itself from XLA both times
  (not from the input-products kernel nor its own, which sum their products in another
  order)."""
  from onn_jax.model import nsa, nsa_pallas
  from onn_jax.model.attention import nsa as nsa_layer
  monkeypatch.setattr(nsa_pallas, "DECODE_INPUTS", False)
  monkeypatch.setattr(nsa_pallas, "BLOCK_KERNEL", False)
  P = 6
  model, params, tokens, cache0 = _bf16_decoding_setup(params_seed=0, tokens_seed=3, T=18, P=P)
  monkeypatch.setattr(nsa, "PALLAS_DECODE", "fused_xla_block")
  biases = []
  monkeypatch.setattr(nsa_pallas, "write_cache", functools.partial(
      lambda kernel, *a: biases.append(a[7] is not None) or kernel(*a), nsa_pallas.write_cache))

  def decode_all(in_kernel):
    monkeypatch.setattr(nsa_layer, "BLOCK_BIAS_IN_WRITE", in_kernel)
    return _decode_steps(model, params, tokens, cache0, P)

  got, got_cache = decode_all(True)
  assert biases and all(biases)
  biases.clear()
  want, want_cache = decode_all(False)
  assert biases and not any(biases)
  for g, w in zip(got + jax.tree.leaves(got_cache), want + jax.tree.leaves(want_cache)):
    assert g.dtype == w.dtype
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
  assert float(jnp.max(jnp.abs(got_cache[0]["k_cmp"][:, 1].astype(jnp.float32)))) > 0


@pytest.mark.parametrize("block", ["xla", "inputs_block", "block_kernel", "block_write"])
def test_bfloat16_decoding_with_the_input_products_kernel_is_xlas_within_rounding(
    block, monkeypatch):
  """A bfloat16 decoding step with the NSA input-products kernel (and its completed block, or
  the block by a kernel of its own, then the write kernel or, "block_write", writing the cache
  itself) writes the first layer's cache as XLA's projections and
  block do, within bfloat16 rounding. The two sum each product's float32 terms in another
  order, so a value rounded once may differ in its last bit (1 ulp, 2^-8 of it); the rotated
  keys round once more and the block three times
  (its first product, gelu, its second product): 4 ulps of the array's scale bound them all.
  (Only the first layer: later layers see the DynMoE's routing, whose hard thresholds a last
  bit may flip; the float32 decoding tests compare the logits.)"""
  from onn_jax.model import nsa, nsa_pallas
  P = 11  # the token at P completes block 1 (length 8, stride 4)
  model, params, tokens, cache0 = _bf16_decoding_setup(params_seed=1, tokens_seed=4, T=12, P=P)
  monkeypatch.setattr(nsa, "PALLAS_DECODE", "fused_xla_block")
  caches = []
  for kernel in (True, False):
    monkeypatch.setattr(nsa_pallas, "DECODE_INPUTS", kernel)
    monkeypatch.setattr(nsa_pallas, "INPUTS_BLOCK", kernel and block == "inputs_block")
    monkeypatch.setattr(nsa_pallas, "BLOCK_KERNEL", kernel and block.startswith("block"))
    monkeypatch.setattr(nsa_pallas, "BLOCK_WRITE", block == "block_write")
    caches.append(_decode_steps(model, params, tokens[:, :P + 1], cache0, P)[1][0])
  slot = (P - 7) // 4
  for name in caches[0]:
    g, w = (np.asarray(c[name], np.float32) for c in caches)
    np.testing.assert_allclose(g, w, rtol=0, atol=4 * 2.0 ** -8 * float(np.max(np.abs(w))),
                               err_msg=name)
    changed = w[:, slot] if name in ("k_cmp", "v_cmp") else w[:, P]
    assert float(np.max(np.abs(changed))) > 0, name  # the step wrote it


@pytest.mark.parametrize("geometry,setting", [
    (0, "fused_xla_block"), (3, "fused_xla_block"), (0, "fused"), (2, "fused"), (3, "fused"),
    (0, "split"), (0, "fused_xla_block/no_core_kernel"), (2, "fused_xla_block/no_inputs_kernel"),
    (0, "fused_xla_block/inputs_block"), (2, "fused_xla_block/inputs_block"),
    (3, "fused_xla_block/inputs_block"), (0, "fused_xla_block/inputs_block_too_large"),
    (0, "fused_xla_block/block_kernel"), (2, "fused_xla_block/block_kernel"),
    (3, "fused_xla_block/block_kernel"), (1, "fused_xla_block/no_inputs_kernel+block_kernel"),
    (0, "fused_xla_block/block_kernel_too_large"), (0, "fused_xla_block/row_block_kernel"),
    (0, "fused_xla_block/no_inputs_norm"), (0, "fused_xla_block/block_write"),
    (2, "fused_xla_block/block_write")])
def test_fused_nsa_decoding_matches_full_forward(geometry, setting, monkeypatch):
  """The same with NSA's Pallas path and its one-kernel decoding step (the core and the cache
  writes with the completed compressed block; interpret mode here), compressed blocks
  completing mid-decode (rotated in the cache with cmp_rope="both", computed in XLA then);
  "split": no one-kernel step (the branches' kernels and XLA's scatters); "no_core_kernel":
  key tiles too large for the core's kernel (the split core) beside the write kernel; the
  input products by their kernel (nsa_pallas.decode_inputs) but with "no_inputs_kernel", and
  with "inputs_block" the completed compressed block too (nsa_pallas.INPUTS_BLOCK), not where
  the raw cache has more elements than the kernel's int32 gather indexes
  (INPUTS_BLOCK_MAX_ELEMENTS, lowered here: "inputs_block_too_large", XLA's block); with
  "block_kernel" the block by a kernel of its own (nsa_pallas.BLOCK_KERNEL; XLA's for rotated
  blocks), after the input products' kernel or XLA's, not past that bound either; a program a
  row ("row_block_kernel", nsa_pallas.BLOCK_ROWS = 1), or that kernel writing the cache too
  ("block_write", nsa_pallas.BLOCK_WRITE: no write kernel; XLA's block and the write kernel
  for rotated blocks). The input products' kernel applies the block's attention norm itself
  but with "no_inputs_norm" (nsa_pallas.INPUTS_NORM)."""
  from onn_jax.model import nsa, nsa_pallas
  cfg, model, params = _setup(geometry)
  params = _with_biases(params, geometry)
  calls = []
  setting, _, variant = setting.partition("/")
  if variant == "no_core_kernel":
    monkeypatch.setattr(nsa_pallas, "DEC_TILE_BYTES", 1)
  monkeypatch.setattr(nsa_pallas, "DECODE_INPUTS", not variant.startswith("no_inputs_kernel"))
  monkeypatch.setattr(nsa_pallas, "INPUTS_BLOCK", variant.startswith("inputs_block"))
  monkeypatch.setattr(nsa_pallas, "BLOCK_KERNEL", variant.endswith(
      ("block_kernel", "block_kernel_too_large", "block_write")))
  monkeypatch.setattr(nsa_pallas, "BLOCK_WRITE", variant == "block_write")
  monkeypatch.setattr(nsa_pallas, "BLOCK_ROWS", 1 if variant == "row_block_kernel" else 16)
  monkeypatch.setattr(nsa_pallas, "INPUTS_NORM", variant != "no_inputs_norm")
  if variant.endswith("too_large"):
    monkeypatch.setattr(nsa_pallas, "INPUTS_BLOCK_MAX_ELEMENTS", 0)
  monkeypatch.setattr(nsa, "PALLAS_DECODE", setting)
  for name in ("decode_attention", "write_cache", "write_cache_compress", "decode_inputs",
               "decode_block", "decode_block_write"):
    monkeypatch.setattr(nsa_pallas, name, functools.partial(
        lambda kernel, name, *a, **k: calls.append(name + (
            "+block" * (a[7] is not None) + "+norm" * (a[8] is not None)
            if name == "decode_inputs" else "")) or kernel(*a, **k),
        getattr(nsa_pallas, name), name))
  fused = Transformer(dataclasses.replace(cfg, nsa_impl="pallas"))
  decode_step = jax.jit(lambda params, inputs, cache, pos: fused.apply(
      {"params": params}, inputs, mode="decode", cache=cache, pos_B=pos)[:2])
  T = 33
  tokens = jax.random.randint(jax.random.PRNGKey(5), (2, T), 0, VOCAB_SIZE)
  full = _forward(model)(params, tokens)
  prompt_len = np.array([3, 17])
  P = int(prompt_len.max())
  masked = jnp.where(jnp.arange(P)[None] < prompt_len[:, None], tokens[:, :P], PAD)
  _, cache = _prefill(model)(params, masked, init_cache(cfg, 2, T))
  pos = jnp.asarray(prompt_len)
  for _ in range(T - P):
    logits, cache = decode_step(params, tokens[jnp.arange(2), pos][:, None], cache, pos)
    np.testing.assert_allclose(logits[:, 0], full[jnp.arange(2), pos], atol=2e-5, rtol=1e-5)
    pos = pos + 1
  # Rotated compressed keys (geometry 2) are computed in XLA and written by the kernel.
  in_xla = cfg.cmp_rope == "both" or setting == "fused_xla_block"
  writer = "write_cache" if in_xla else "write_cache_compress"
  want = set() if setting == "split" else {"decode_attention", writer, "decode_inputs"}
  if variant == "no_core_kernel":
    want = {writer, "decode_inputs"}
  if variant.startswith("no_inputs_kernel"):
    want -= {"decode_inputs"}
  if variant == "inputs_block" and cfg.cmp_rope != "both":  # rotated blocks: XLA's
    want = want - {"decode_inputs"} | {"decode_inputs+block"}
  if variant != "no_inputs_norm":
    want = {n + "+norm" if n.startswith("decode_inputs") else n for n in want}
  if variant.endswith("block_kernel") and cfg.cmp_rope != "both":
    want |= {"decode_block"}
  if variant == "block_write" and cfg.cmp_rope != "both":
    want = want - {"write_cache"} | {"decode_block_write"}
  assert set(calls) == want, "a decoding kernel did not run, or ran on the split setting"


def test_fused_nsa_decoding_with_a_cache_shorter_than_a_block(monkeypatch):
  """A cache with no compressed slot (capacity < block_len) decodes on the fused setting as
  on the split one (the cache writes keep their scatters there)."""
  from onn_jax.model import nsa
  cfg, model, params = _setup(0)
  monkeypatch.setattr(nsa, "PALLAS_DECODE", "fused")
  fused = Transformer(dataclasses.replace(cfg, nsa_impl="pallas"))
  T = cfg.block_len - 2
  tokens = jax.random.randint(jax.random.PRNGKey(6), (2, T), 0, VOCAB_SIZE)
  full = _forward(model)(params, tokens)
  cache, pos = init_cache(cfg, 2, T), jnp.zeros((2,), jnp.int32)
  step = jax.jit(lambda params, inputs, cache, pos: fused.apply(
      {"params": params}, inputs, mode="decode", cache=cache, pos_B=pos)[:2])
  for t in range(T):
    logits, cache = step(params, tokens[:, t:t + 1], cache, pos)
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=2e-5, rtol=1e-5)
    pos = pos + 1


def test_a_model_initialises_in_decoding_mode_as_in_training():
  """init in mode="decode" (a cache, one token) makes the parameters train mode makes."""
  cfg, model, params = _setup(0)
  cache = init_cache(cfg, 2, 16)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 1), jnp.int32), mode="decode",
                         cache=cache, pos_B=jnp.array([3, 9]))
  assert (jax.tree.map(lambda x: (x.shape, x.dtype), variables["params"])
          == jax.tree.map(lambda x: (x.shape, x.dtype), params))


def test_soft_inputs_equal_token_inputs_for_one_hot():
  _, model, params = _setup(0)
  tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 19), 0, VOCAB_SIZE)
  by_id = _forward(model)(params, tokens)
  by_dist = _forward(model)(params, jax.nn.one_hot(tokens, VOCAB_SIZE))
  np.testing.assert_allclose(by_id, by_dist, atol=1e-5)


def test_greedy_generation_matches_argmax_of_full_forward_and_pads_after_end():
  cfg, model, params = _setup(0)
  prompt = jax.random.randint(jax.random.PRNGKey(4), (2, 10), 0, VOCAB_SIZE)
  lens = jnp.array([7, 10])
  gen = generate_jit(model, params, prompt, lens, max_new=9, capacity=24)
  for b in range(2):
    seq = list(np.asarray(prompt[b, :lens[b]]))
    for k in range(9):
      if seq[-1] == END and k > 0:
        assert int(gen.tokens_BA[b, k]) == PAD
        continue
      padded = np.full((1, 24), PAD, np.int32)  # causal: right padding changes nothing
      padded[0, :len(seq)] = seq
      logits = _forward(model)(params, jnp.asarray(padded))[0, len(seq) - 1]
      assert int(gen.tokens_BA[b, k]) == int(jnp.argmax(logits))
      np.testing.assert_allclose(gen.logprobs_BA[b, k],
                                 jax.nn.log_softmax(logits)[int(gen.tokens_BA[b, k])],
                                 atol=1e-5)
      seq.append(int(gen.tokens_BA[b, k]))


def test_end_forces_padding():
  """Bias the head towards END: the first token is END, everything after is PAD."""
  cfg, model, params = _setup(0)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x.at[:, END].add(100.0) if "lm_head" in jax.tree_util.keystr(p) else x,
      params)
  prompt = jnp.zeros((2, 6), jnp.int32)
  gen = generate_jit(model, params, prompt, jnp.array([6, 4]), max_new=5, feed="soft")
  assert (np.asarray(gen.tokens_BA[:, 0]) == END).all()
  assert (np.asarray(gen.tokens_BA[:, 1:]) == PAD).all()
  assert np.asarray(gen.ended_B).all()
  np.testing.assert_array_equal(np.asarray(gen.logprobs_BA[:, 1:]), 0.0)


def test_step_copies_by_backend(monkeypatch):
  """Unset, the step is compiled as 8 copies on a GPU (faster steps) and 1 elsewhere (faster
  compiles); a set value wins everywhere."""
  monkeypatch.setattr(decode, "STEP_COPIES", None)
  assert [decode.step_copies(backend) for backend in ("gpu", "cpu", "tpu")] == [8, 1, 1]
  monkeypatch.setattr(decode, "STEP_COPIES", 3)
  assert decode.step_copies("gpu") == decode.step_copies("cpu") == 3


@pytest.mark.parametrize("feed,grid", [("sample", False), ("argmax", True), ("soft", False)])
def test_generation_does_not_depend_on_steps_per_check(monkeypatch, feed, grid):
  """generate's loop checks for its end every decode.STEPS_PER_CHECK steps, compiled as
  decode.STEP_COPIES copies; what it emits is the same for any values (budgets that are and
  are not multiples of them; rows with their own stop, one that needs no token, and one that
  needs the whole budget up to the cache's last slot)."""
  cfg, model, params = _setup(1)
  prompt = jax.random.randint(jax.random.PRNGKey(7), (4, 12), 0, VOCAB_SIZE)
  lens, stop = jnp.array([12, 5, 9, 7]), jnp.array([3, 0, 11, 6])
  got = {}
  for per, copies in ((1, 1), (3, 1), (8, 3)):
    monkeypatch.setattr(decode, "STEPS_PER_CHECK", per)
    monkeypatch.setattr(decode, "STEP_COPIES", copies)
    run = jax.jit(functools.partial(decode.generate, model, max_new=11, capacity=22, feed=feed,
                                    grid=grid, temperature=0.7))
    got[per, copies] = run(params, prompt, lens, rng=jax.random.PRNGKey(8), stop_after_B=stop)
  for key, gen in got.items():
    for name in ("tokens_BA", "logprobs_BA", "fed_BAV", "ended_B"):
      np.testing.assert_array_equal(np.asarray(getattr(gen, name)),
                                    np.asarray(getattr(got[1, 1], name)), err_msg=f"{key} {name}")
  tokens = np.asarray(got[1, 1].tokens_BA)
  assert (tokens[1] == PAD).all() and (tokens[0, 3:] == PAD).all()
  assert (tokens[2] != PAD).sum() > 3  # the long row kept decoding after the others stopped


def test_precast_converts_exactly_the_leaves_read_only_converted():
  """decode.precast converts a leaf where every read of it, through element moves (slice,
  stack, concatenation, gather) and nested calls, converts it to one narrower dtype; not a leaf
  that a read computes with, one converted to two dtypes, one returned, one read in a loop's
  body, one read wider."""
  bf16 = jnp.bfloat16

  def fn(p, x_N):
    inner = jax.jit(lambda w: w.T.astype(bf16) @ x_N.astype(bf16))(p["nested"])
    stacked = jnp.stack([p["stack_a"], p["stack_b"]])[:, 1:].astype(bf16)
    picked = jnp.take(p["gathered"], jnp.array([2, 0]), axis=0).astype(bf16)
    mixed = p["mixed"].astype(bf16).sum() + p["mixed"].sum()
    twice = p["twice"].astype(bf16).sum() + p["twice"].astype(jnp.float16).sum()
    # A loop's body is a read (its carries come back in each iteration): not followed.
    looped = jax.lax.scan(lambda c, _: (c + p["looped"].astype(bf16).sum(), None),
                          jnp.zeros((), bf16), None, length=2)[0]
    total = (inner.sum() + stacked.sum() + picked.sum() + twice + mixed + looped
             + p["scale"] * x_N.sum() + p["bf16"].astype(bf16).sum())
    return total, p["returned"].astype(bf16), p["returned"]

  ones = lambda *shape: jnp.ones(shape, jnp.float32)  # noqa: E731
  params = {"nested": ones(4, 4), "stack_a": ones(3), "stack_b": ones(3), "gathered": ones(3, 2),
            "mixed": ones(2), "twice": ones(2), "scale": ones(), "returned": ones(2),
            "looped": ones(2), "bf16": jnp.ones((2,), bf16)}
  cast = decode.precast(fn, params, ones(4))
  assert {k for k, v in cast.items() if v.dtype == bf16} == {
      "nested", "stack_a", "stack_b", "gathered", "bf16"}
  assert all(cast[k] is params[k]
             for k in ("mixed", "twice", "scale", "returned", "looped", "bf16"))
  got, want = fn(cast, ones(4)), fn(params, ones(4))
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("geometry,feed", [(0, "soft"), (2, "sample")])
def test_generation_with_casts_hoisted_out_of_the_loop_is_bit_identical(monkeypatch, geometry,
                                                                        feed):
  """A bfloat16 model with float32 parameters: generate converts the weights its decoding step
  reads only as bfloat16 once, before its loop (decode.HOIST_CASTS), and emits exactly what it
  emits converting them at every step."""
  cfg = ModelConfig(**{**TINY_MODEL, **GEOMETRIES[geometry], "compute_dtype": "bfloat16"})
  model, params = Transformer(cfg), _setup(geometry)[2]
  prompt = jax.random.randint(jax.random.PRNGKey(9), (3, 12), 0, VOCAB_SIZE)
  lens = jnp.array([12, 7, 10])
  got, calls, precast = {}, [], decode.precast
  monkeypatch.setattr(decode, "precast", lambda *a: calls.append(precast(*a)) or calls[-1])
  for hoist in (False, True):
    monkeypatch.setattr(decode, "HOIST_CASTS", hoist)
    run = jax.jit(functools.partial(decode.generate, model, max_new=9, capacity=22, feed=feed))
    got[hoist] = run(params, prompt, lens, rng=jax.random.PRNGKey(1))
    assert len(calls) == hoist  # generate hoisted the casts (once, while tracing) or did not
  for name in ("tokens_BA", "logprobs_BA", "fed_BAV", "ended_B"):
    np.testing.assert_array_equal(np.asarray(getattr(got[True], name)),
                                  np.asarray(getattr(got[False], name)), err_msg=name)
  assert (np.asarray(got[True].tokens_BA) != PAD).any()
  # Not vacuous: the experts' and the projections' weights are the ones generate converted.
  dtypes = {jax.tree_util.keystr(path): leaf.dtype
            for path, leaf in jax.tree_util.tree_leaves_with_path(calls[0]["block_0"])}
  assert dtypes["['moe']['w_in']"] == dtypes["['attn']['kv_proj']['kernel']"] == jnp.bfloat16
  assert dtypes["['attn_norm']['scale']"] == dtypes["['moe']['prototypes']"] == jnp.float32


@pytest.mark.parametrize("kernels", ["xla", "fused_xla_block_moe", "block_kernel"])
def test_generation_with_constants_hoisted_out_of_the_loop_is_bit_identical(monkeypatch,
                                                                           kernels):
  """generate computes what its step computes from the parameters alone (the compressors'
  weights stacked, the block biases, the experts' unit prototypes) once, before its loop
  (decode.HOIST_CONSTS), and emits exactly what it emits computing them at every step: with
  XLA's decoding, with the one-kernel step and the DynMoE kernel routing its rows, and with
  the completed block's kernel (nsa_pallas.BLOCK_KERNEL) too."""
  from onn_jax.model import moe, nsa, nsa_pallas
  cfg, _, params = _setup(0)
  monkeypatch.setattr(nsa_pallas, "BLOCK_KERNEL", kernels == "block_kernel")
  if kernels != "xla":
    kernels = "fused_xla_block_moe"
    cfg = dataclasses.replace(cfg, nsa_impl="pallas")
    monkeypatch.setattr(nsa, "PALLAS_DECODE", decode.DECODE_KERNELS[kernels][0])
    monkeypatch.setattr(moe, "DECODE_KERNEL", "pallas")
  model = Transformer(cfg)
  prompt = jax.random.randint(jax.random.PRNGKey(9), (3, 12), 0, VOCAB_SIZE)
  lens = jnp.array([12, 7, 10])
  got, consts, constants = {}, [], decode.decode_constants
  monkeypatch.setattr(decode, "decode_constants",
                      lambda *a: consts.append(constants(*a)) or consts[-1])
  for hoist in (False, True):
    monkeypatch.setattr(decode, "HOIST_CONSTS", hoist)
    run = jax.jit(functools.partial(decode.generate, model, max_new=9, capacity=22))
    got[hoist] = run(params, prompt, lens)
  for name in ("tokens_BA", "logprobs_BA", "fed_BAV", "ended_B"):
    np.testing.assert_array_equal(np.asarray(getattr(got[True], name)),
                                  np.asarray(getattr(got[False], name)), err_msg=name)
  assert (np.asarray(got[True].tokens_BA) != PAD).any()
  # Not vacuous: the step took these from the loop's constants.
  names = {jax.tree_util.keystr(path[:3]) for path, _ in
           jax.tree_util.tree_leaves_with_path(consts[0])}
  want = {"['block_0']['attn']['compressor_variables']"}
  if kernels != "xla":
    want |= {"['block_0']['attn']['block_biases']", "['block_0']['moe']['unit_prototypes']"}
  if nsa_pallas.BLOCK_KERNEL:
    want = want - {"['block_0']['attn']['compressor_variables']"} | {
        "['block_0']['attn']['compressor_weights']"}
  assert want <= names, names


def test_jitted_generation_does_not_retrace():
  cfg, model, params = _setup(0)
  prompt = jnp.zeros((2, 8), jnp.int32)
  before = generate_jit._cache_size()
  generate_jit(model, params, prompt, jnp.array([8, 3]), max_new=4)
  generate_jit(model, params, prompt + 1, jnp.array([5, 6]), max_new=4)
  assert generate_jit._cache_size() == before + 1


def test_bf16_compute_runs_close_to_fp32():
  cfg32, model32, params = _setup(0)
  model16 = Transformer(ModelConfig(**{**TINY_MODEL, **GEOMETRIES[0],
                                       "compute_dtype": "bfloat16"}))
  tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 24), 0, VOCAB_SIZE)
  apply = lambda model: jax.jit(lambda p, t: model.apply({"params": p}, t))(params, tokens)
  (a, _, aux32), (b, _, aux16) = apply(model32), apply(model16)
  assert b.dtype == jnp.float32 and np.isfinite(np.asarray(b)).all()
  # The same experts chosen (a flip would change a token's output wholesale), then about four
  # bfloat16 roundings a layer (inputs, attention output, expert hidden, expert output) and
  # the head's, each 2^-8 relative, adding like a random walk over the layers: ~3 * 2^-8;
  # bounded at 4 * 2^-8 of the logits' norm.
  np.testing.assert_array_equal(aux16["tokens_per_expert"], aux32["tokens_per_expert"])
  assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a)) < 4 * 2 ** -8
  assert count_params(params) > 0


def test_remat_gives_the_same_loss_and_gradients():
  cfg, model, params = _setup(0)
  remat = Transformer(ModelConfig(**{**TINY_MODEL, **GEOMETRIES[0], "remat": True}))
  tokens = jax.random.randint(jax.random.PRNGKey(6), (2, 24), 0, VOCAB_SIZE)

  def loss(m, p):
    return jnp.mean(jax.nn.logsumexp(m.apply({"params": p}, tokens)[0], -1))

  (a, ga), (b, gb) = [jax.jit(jax.value_and_grad(functools.partial(loss, m)))(params)
                      for m in (model, remat)]
  np.testing.assert_allclose(a, b, rtol=1e-6)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_sampling_depends_on_global_rows_not_on_the_split():
  """Rows 0-3 and 4-7 sampled as two batches (row offsets 0 and 4) equal one batch of 8."""
  cfg, model, params = _setup(0)
  prompt = jax.random.randint(jax.random.PRNGKey(7), (8, 6), 0, 10)
  lens = jnp.full((8,), 6)
  kw = dict(max_new=5, feed="sample", temperature=2.0, rng=jax.random.PRNGKey(3))
  whole = generate_jit(model, params, prompt, lens, **kw).tokens_BA
  halves = [generate_jit(model, params, prompt[i:i + 4], lens[i:i + 4], row_offset=i,
                         **kw).tokens_BA for i in (0, 4)]
  np.testing.assert_array_equal(np.asarray(whole), np.concatenate(halves))


# -- the grid grammar (eval.grid) ------------------------------------------------------------

def _allowed_after(tokens):
  state = decode.grid_start(1)
  for token in tokens:
    assert bool(decode.grid_allowed(state)[0, token]), (tokens, token)
    state = decode.grid_advance(state, jnp.array([token]))
  return {int(v) for v in np.flatnonzero(np.asarray(decode.grid_allowed(state)[0]))}


def test_grid_grammar_allows_exactly_what_keeps_the_answer_a_grid():
  colours = set(range(10))
  assert _allowed_after([]) == colours  # no empty row, no empty grid
  assert _allowed_after([1]) == colours | {NEWLINE}  # the first row sets the width
  assert _allowed_after([1, 2, NEWLINE]) == colours | {END}
  assert _allowed_after([1, 2, NEWLINE, 3]) == colours  # the width is 2
  assert _allowed_after([1, 2, NEWLINE, 3, 4]) == {NEWLINE}
  assert _allowed_after([1, 2, NEWLINE, 3, 4, NEWLINE]) == colours | {END}
  assert _allowed_after([5] * 30) == {NEWLINE}  # at most 30 wide
  assert _allowed_after([5, NEWLINE] * 30) == {END}  # at most 30 high


@pytest.mark.parametrize("feed", ["argmax", "sample"])
def test_grid_generation_is_always_a_grid_and_greedy_only_changes_where_it_must(feed):
  """With the grammar every answer decodes to a grid (the budget holds the largest, 30 x 30).
  Greedy: the constrained answer is the unconstrained one up to the first token the grammar
  forbids."""
  _, model, params = _setup(0)
  B, budget = 6, 30 * 31 + 1
  prompt = jax.random.randint(jax.random.PRNGKey(8), (B, 12), 0, VOCAB_SIZE)
  lens = jnp.array([12, 9, 5, 12, 7, 3])
  kw = dict(max_new=budget, feed=feed, rng=jax.random.PRNGKey(2))
  free = np.asarray(generate_jit(model, params, prompt, lens, **kw).tokens_BA)
  grid = np.asarray(generate_jit(model, params, prompt, lens, grid=True, **kw).tokens_BA)
  assert all(decode_grid(row) is not None for row in grid)
  assert any(decode_grid(row) is None for row in free)  # the grammar had work to do
  if feed == "argmax":
    for f, g in zip(free, grid):
      state = decode.grid_start(1)
      for token_f, token_g in zip(f, g):
        if not bool(decode.grid_allowed(state)[0, token_f]):
          break
        assert token_g == token_f
        if token_f == END:
          break
        state = decode.grid_advance(state, jnp.array([token_f]))


def test_rope_is_a_rotation_by_position_against_complex_numbers():
  """apply_rope (rotate-half form) as complex numbers: feature i and i + D/2 are one complex
  number rotated by pos * theta^(-i / (D/2)); a rotation keeps norms, its inverse is the
  rotation by -pos, and a query-key product depends only on the positions' difference.
  Positions below 200 keep float32's angle error (pos * 2^-24) under 2e-5 rad."""
  from onn_jax.model.layers import apply_rope
  rng = np.random.default_rng(0)
  B, T, n, D, theta = 2, 5, 3, 16, 10000.0
  x = rng.standard_normal((B, T, n, D)).astype(np.float32)
  y = rng.standard_normal((B, T, n, D)).astype(np.float32)
  pos = rng.integers(0, 100, (B, T))
  got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), theta), np.float64)
  half = D // 2
  z = x[..., :half].astype(np.float64) + 1j * x[..., half:]
  angle = pos[:, :, None, None] * theta ** (-np.arange(half) / half)
  want = z * np.exp(1j * angle)
  tol = 2e-5 * np.abs(x).max() * 2  # angle error, plus float32 products
  np.testing.assert_allclose(got[..., :half], want.real, atol=tol)
  np.testing.assert_allclose(got[..., half:], want.imag, atol=tol)
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1),
                             rtol=1e-5)
  back = np.asarray(apply_rope(jnp.asarray(got, jnp.float32), jnp.asarray(-pos), theta))
  np.testing.assert_allclose(back, x, atol=tol)
  # <rope(x, p + s), rope(y, q + s)> = <rope(x, p), rope(y, q)>, per head.
  def dots(shift):
    a = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos + shift), theta), np.float64)
    b = np.asarray(apply_rope(jnp.asarray(y), jnp.asarray(pos[:, ::-1] + shift), theta),
                   np.float64)
    return (a * b).sum(-1)
  scale = np.abs(x).max() * np.abs(y).max() * D
  np.testing.assert_allclose(dots(97), dots(0), atol=4e-5 * scale)
