"""Attention variants (model.attention): the interface, cache equivalence, causality, the
DynSMLoRA gate's losses, data parallelism and EAVI for the ``full`` and ``dynsmlora``
variants (``nsa`` is covered by test_model, test_parallel and test_eavi)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onn_jax import config, parallel, steps
from onn_jax.model import attention, flops
from onn_jax.model.transformer import Transformer, init_cache, init_params
from onn_jax.run import make_runner
from train.bench import synthetic_batch

from conftest import assert_moments_close, param_bound, tiny_config

VARIANTS = ("full", "dynsmlora")
# float32 logits of O(10) through 2 layers; the cached and full passes sum the same terms in
# another order (softmax over <= 48 keys, matmuls over <= 64): a few ulps of O(10) per op.
CACHE_ATOL = 2e-5


def _model(variant: str, **model):
  # Two layers: each variant's cache is per layer (the decoding-against-forward tests here).
  cfg = tiny_config(model=dict(attention=variant, **{"num_layers": 2, **model}))
  return cfg, Transformer(cfg.model)


def _params(cfg, seed=0):
  """Parameters with a non-zero LoRA bank, so that the deltas take part."""
  params = init_params(cfg.model, jax.random.PRNGKey(seed))

  def randomise(path, x):
    if jax.tree_util.keystr(path).endswith("['lora_b']"):
      return 0.3 * jax.random.normal(jax.random.PRNGKey(seed + 7), x.shape, x.dtype)
    return x
  return jax.tree_util.tree_map_with_path(randomise, params)


def test_registry_matches_the_config_choices():
  for name in attention.VARIANTS:
    assert tiny_config(model=dict(attention=name)).model.attention == name
  with pytest.raises(config.ConfigError, match=r"^model\.attention: 'dense' is not one of"):
    tiny_config(model=dict(attention="dense"))
  with pytest.raises(ValueError, match="model.attention"):
    attention.get("dense")


@pytest.mark.parametrize("key,value,named", [
    ("lora_rank", 0, "model.lora_rank"),
    ("lora_experts", 0, "model.lora_experts"),
    ("moe_impl", "sparse", "model.moe_impl"),
])
def test_bad_keys_are_one_line_naming_the_key(key, value, named):
  with pytest.raises(config.ConfigError) as err:
    tiny_config(model=dict(attention="dynsmlora", **{key: value}))
  assert str(err.value).startswith(named) and "\n" not in str(err.value)
  with pytest.raises(config.ConfigError, match=r"^model\.lora_experts"):
    tiny_config(model=dict(attention="dynsmlora", lora_experts=1, fallback_k=2))


@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_then_decode_matches_full_forward(variant):
  cfg, model = _model(variant)
  params = _params(cfg)
  tok_BT = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 0, 10)
  want_BTV, _, _ = model.apply({"params": params}, tok_BT)
  cache = init_cache(cfg.model, 2, 32)
  got, cache, _ = model.apply({"params": params}, tok_BT[:, :16], mode="prefill", cache=cache)
  pieces = [got]
  for t in range(16, 24):
    logits_B1V, cache, _ = model.apply({"params": params}, tok_BT[:, t:t + 1], mode="decode",
                                       cache=cache, pos_B=jnp.full((2,), t, jnp.int32))
    pieces.append(logits_B1V)
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), want_BTV, rtol=0, atol=CACHE_ATOL)


@pytest.mark.parametrize("variant", tuple(attention.VARIANTS))
def test_prefill_then_extend_matches_full_forward(variant):
  """``"extend"``: A tokens at once after each row's prompt (rows of different lengths, NSA
  blocks straddling the start) give the full forward's logits at their positions, also past
  the cache's capacity (row 1: positions 16-23 against a cache of 20). The cache is only
  read: positions past row 0's prompt hold the prefill's padding, which no query may see."""
  cfg, model = _model(variant)
  params = _params(cfg)
  tok_BT = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 0, 10)
  want_BTV, _, _ = model.apply({"params": params}, tok_BT)
  start_B = jnp.array([9, 16], jnp.int32)
  cache = init_cache(cfg.model, 2, 20)
  prompt_BP = tok_BT[:, :16].at[0, 9:].set((tok_BT[0, 9:16] + 3) % 10)  # row 0's padding
  _, cache, _ = model.apply({"params": params}, prompt_BP, mode="prefill", cache=cache)
  new_BA = jnp.stack([tok_BT[0, 9:17], tok_BT[1, 16:24]])
  got_BAV, new_cache, _ = jax.jit(lambda c: model.apply(
      {"params": params}, new_BA, mode="extend", cache=c, pos_B=start_B))(cache)
  assert new_cache is None
  np.testing.assert_allclose(got_BAV[0], want_BTV[0, 9:17], rtol=0, atol=CACHE_ATOL)
  np.testing.assert_allclose(got_BAV[1], want_BTV[1, 16:24], rtol=0, atol=CACHE_ATOL)


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal(variant):
  cfg, model = _model(variant)
  params = _params(cfg)
  tok_BT = jax.random.randint(jax.random.PRNGKey(2), (2, 24), 0, 10)
  other_BT = tok_BT.at[:, 15:].set((tok_BT[:, 15:] + 3) % 10)
  a, _, _ = model.apply({"params": params}, tok_BT)
  b, _, _ = model.apply({"params": params}, other_BT)
  # Masked keys get probability exactly 0: earlier positions see the same numbers.
  np.testing.assert_array_equal(a[:, :15], b[:, :15])
  assert float(jnp.max(jnp.abs(a[:, 15:] - b[:, 15:]))) > 1e-3


def test_dynsmlora_starts_as_its_base_and_its_deltas_change_it():
  """lora_b starts at zero: the layer is the full GQA layer with the same base weights."""
  cfg_l, model_l = _model("dynsmlora")
  cfg_f, model_f = _model("full")
  params_l = init_params(cfg_l.model, jax.random.PRNGKey(0))
  attn_f = set(init_params(cfg_f.model, jax.random.PRNGKey(0))["block_0"]["attn"])
  assert set(params_l["block_0"]["attn"]) - attn_f == {"lora_a", "lora_b", "prototypes",
                                                      "thresholds"}
  params_f = jax.tree.map(lambda x: x, params_l)
  for i in range(cfg_l.model.num_layers):
    params_f[f"block_{i}"]["attn"] = {k: params_l[f"block_{i}"]["attn"][k] for k in attn_f}
  tok_BT = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 0, 10)
  base, _, _ = model_f.apply({"params": params_f}, tok_BT)
  lora, _, aux = model_l.apply({"params": params_l}, tok_BT)
  np.testing.assert_array_equal(lora, base)
  moved, _, _ = model_l.apply({"params": _params(cfg_l)}, tok_BT)
  assert float(jnp.max(jnp.abs(moved - base))) > 1e-2
  assert aux["attn"]["tokens_per_expert"].shape == (cfg_l.model.num_layers,
                                                    cfg_l.model.lora_experts)


def test_dynsmlora_gate_sdl_enters_the_loss_and_trains_the_gate():
  cfg, model = _model("dynsmlora")
  params = _params(cfg)
  batch = synthetic_batch(2, 64)
  state = steps.init_state(cfg, model, jax.random.PRNGKey(0), params=params)
  _, metrics = jax.jit(functools.partial(steps.train_step, model=model, cfg=cfg))(state, batch)
  for key in ("attn_sdl", "attn_sdl_diversity", "attn_sdl_sparsity", "attn_experts_per_token",
              "attn_fallback_frac"):
    assert np.isfinite(float(metrics[key])), key
  assert float(metrics["sdl"]) == pytest.approx(
      float(metrics["attn_sdl"]) + cfg.model.sdl_diversity_weight * float(
          metrics["sdl_diversity"]) + cfg.model.sdl_sparsity_weight * float(
          metrics["sdl_sparsity"]), rel=1e-6)
  assert float(metrics["loss"]) == pytest.approx(
      float(metrics["loss_ce"]) + float(metrics["sdl"]), rel=1e-6)

  def loss(p):
    _, _, aux = model.apply({"params": p}, batch["inputs"], batch["valid"])
    from onn_jax import objectives
    return objectives.sdl(aux, cfg.model)[0]
  grads = jax.jit(jax.grad(loss))(params)["block_0"]["attn"]  # one program, not one per op
  assert float(jnp.abs(grads["prototypes"]).max()) > 0
  assert float(jnp.abs(grads["thresholds"]).max()) > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_train_step_sharded_equals_single_device(variant):
  """shard_map over 8 devices against one device, same global batch of 8."""
  batch = jax.device_get(synthetic_batch(8, 64))
  results = {}
  for mode in ("single", "shard_map"):
    cfg = tiny_config(model=dict(attention=variant), parallel=dict(mode=mode),
                      train=dict(warmup_steps=0))
    model = Transformer(cfg.model)
    runner = make_runner(cfg, model)
    state = runner.put_state(jax.device_get(steps.init_state(cfg, model, jax.random.PRNGKey(0),
                                                             params=_params(cfg))))
    state, metrics = runner.run("pretrain", state, runner.put_batch(batch))
    final = runner.get_state(state)
    results[mode] = jax.tree.map(parallel.host_value, (final.params, final.opt_state, metrics))
  (p1, o1, m1), (p8, o8, m8) = results["single"], results["shard_map"]
  # Sums over 8 shards instead of one: float32 reassociation, ~1e-7 relative per add.
  for key in ("loss", "grad_norm", "sdl"):
    np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, err_msg=key)
  # After the Adam step, an entry whose gradient is at the rounding level may move either way
  # (param_bound; one did, by 3.9e-6, on a fresh machine): at step 1 every entry moves by
  # about lr, so this bound admits any sign. The gradient itself is checked through Adam's
  # moments, (1 - b1) g and (1 - b2) g^2: the same reassociation.
  bound = param_bound(cfg, 1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 + bound),
               p8, p1)
  assert_moments_close(o8, o1, "moments ")


@pytest.mark.parametrize("variant", VARIANTS)
def test_eavi_step_runs_and_is_finite(variant):
  cfg, model = _model(variant)
  cfg = config.replace(cfg, eavi={"feed": "soft"}, data={"max_grid": 3})
  batch = synthetic_batch(2, 64)
  state = steps.init_state(cfg, model, jax.random.PRNGKey(0), params=_params(cfg))
  state, metrics = jax.jit(functools.partial(steps.eavi_step, model=model, cfg=cfg))(state,
                                                                                      batch)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["skipped"]) == 0
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state.params))


def test_flops_by_variant():
  m = tiny_config(model=dict(attention="full")).model
  T = 256
  one, two = (flops.forward_flops_per_token(m, t, 1.0) for t in (T, 2 * T))
  # Causal keys per query grow by T/2 on average when T doubles.
  assert two["attention"] - one["attention"] == pytest.approx(
      m.num_layers * m.num_heads * 4 * m.head_dim * T / 2)
  assert "compression" not in one
  lora = flops.forward_flops_per_token(tiny_config(model=dict(attention="dynsmlora")).model,
                                       T, 1.0)
  E, r, C = m.lora_experts, m.lora_rank, m.d_model
  width = (m.num_heads + 2 * m.num_kv_groups) * m.head_dim
  assert lora["total"] - one["total"] == pytest.approx(
      m.num_layers * (2 * C * E + E * (2 * C * r + 2 * r * width)))


@pytest.mark.parametrize("block_len,stride", [(16, 8), (8, 8), (6, 4), (2, 4)],
                         ids=["two_strides", "one_stride", "gathered", "gaps"])
def test_block_compressor_from_row_matches_gathered_blocks(block_len, stride):
  """Every compressed block of a row (``from_row``: shifted products of stride-chunks, or the
  gather where the block is not whole strides) against the blocks gathered one by one
  (``__call__``, as decoding compresses a completed block), with gradients. Float32 at
  highest precision: each output sums at most L*D = 128 products of O(1) terms in another
  order, so differences stay within ~100 float32 roundings (1.2e-7) of O(1) values: atol
  1e-5."""
  from onn_jax.model.attention.nsa import BlockCompressor
  D, G, S = 8, 2, 45
  N = (S - block_len) // stride + 1
  raw = jnp.asarray(np.random.default_rng(0).standard_normal((2, S, G, D)), jnp.float32)
  idx = np.arange(N)[:, None] * stride + np.arange(block_len)
  comp = BlockCompressor(block_len, D, jnp.float32, jnp.float32)
  params = comp.init(jax.random.PRNGKey(1), raw[:, idx])

  def total(p, x, row):
    out = (comp.apply(p, x, N, stride, method=BlockCompressor.from_row) if row
           else comp.apply(p, x[:, idx]))
    return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape))), out

  with jax.default_matmul_precision("highest"):
    (_, got), g_got = jax.value_and_grad(total, (0, 1), has_aux=True)(params, raw, True)
    (_, want), g_want = jax.value_and_grad(total, (0, 1), has_aux=True)(params, raw, False)
  assert got.shape == (2, N, G, D)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_block_compressor_from_row_matches_gathered_blocks_in_bf16():
  """bf16: both ways sum the first layer in float32 and round once, so they differ only where
  float32's other summation order crosses a bf16 rounding boundary of a hidden unit: at most
  one bf16 step (2^-8 relative) of a few of the 2*D hidden values, carried through gelu and
  the second layer. Bound: 2^-6 of the largest output."""
  from onn_jax.model.attention.nsa import BlockCompressor
  L, s, D, G, S = 16, 8, 32, 2, 200
  N = (S - L) // s + 1
  raw = jnp.asarray(np.random.default_rng(1).standard_normal((3, S, G, D)), jnp.bfloat16)
  idx = np.arange(N)[:, None] * s + np.arange(L)
  comp = BlockCompressor(L, D, jnp.bfloat16, jnp.float32)
  params = comp.init(jax.random.PRNGKey(2), raw[:, idx])
  got = comp.apply(params, raw, N, s, method=BlockCompressor.from_row)
  want = comp.apply(params, raw[:, idx])
  assert got.dtype == want.dtype == jnp.bfloat16
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert np.abs(got - want).max() <= 2.0 ** -6 * np.abs(want).max()


def test_nsa_fused_input_projection_matches_three_products(monkeypatch):
  """``FUSED_INPUT_PROJECTION`` (the gate reading x): q_proj, kv_proj and gate_proj as one
  product against their kernels side by side, against the three modules: the layer's output
  and every gradient (parameters and x). Float32 at highest precision: the same products,
  each entry of a projection a sum of d_model terms in perhaps another order, then the layer
  (softmaxes, the compressor, out_proj) on O(1) values: within ~100 float32 roundings, atol
  and rtol 1e-5. The fused run has one product of width (H + 6G) * D + 3H, the other none."""
  from onn_jax.model.attention import nsa as nsa_layer
  cfg = tiny_config(model=dict(attention="nsa", compute_dtype="float32")).model
  layer = nsa_layer.NSAttention(cfg)
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 40, cfg.d_model)), jnp.float32)
  params = layer.init(jax.random.PRNGKey(4), x)
  cot = jnp.cos(jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape))
  width = (cfg.num_heads + 6 * cfg.num_kv_groups) * cfg.head_dim + 3 * cfg.num_heads

  def run(fused):
    monkeypatch.setattr(nsa_layer, "FUSED_INPUT_PROJECTION", fused)

    def loss(p, x):  # a new function each run: make_jaxpr caches its traces by function
      return jnp.sum(layer.apply(p, x)[0] * cot)
    widths = [e.outvars[0].aval.shape[-1] for e in jax.make_jaxpr(loss)(params, x).eqns
              if e.primitive.name == "dot_general"]
    with jax.default_matmul_precision("highest"):
      return widths.count(width), jax.value_and_grad(loss, (0, 1))(params, x)

  (n_fused, got), (n_three, want) = run(True), run(False)
  assert (n_fused, n_three) == (1, 0)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_compressor_cotangent_in_the_compute_dtype_computes_the_same_products(monkeypatch):
  """``COMPRESSOR_COTANGENT="compute"`` (the default) against ``"float32"``: the compressors'
  first-layer products of a row's keys take their cotangent in bfloat16. It reaches them
  through the one rounding of the first layer's float32 sum, so its values are bfloat16's
  either way: the same exact products, summed in float32 in another order. The parameters'
  gradients (float32, sums of up to B*N*G = 162 products a weight): within 2^-24 * 162 of the
  sum of the products' magnitudes, bounded here by 1e-5 of the largest gradient's; the keys'
  (bfloat16, rounded from float32 sums): within one bfloat16 ulp (2^-7). Only the float32
  setting's backward has float32 operands in the keys' products (four: the two shifted
  products of stride-chunks, each giving x's and the kernel rows' gradients)."""
  from onn_jax.model.attention import nsa as nsa_layer
  L, s, D, G, S = 16, 8, 32, 2, 200
  N = (S - L) // s + 1
  raw = jnp.asarray(np.random.default_rng(5).standard_normal((3, S, G, D)), jnp.bfloat16)
  comp = nsa_layer.BlockCompressor(L, D, jnp.bfloat16, jnp.float32)
  params = comp.init(jax.random.PRNGKey(6), raw[:, :L][:, None])
  cot = jnp.cos(jnp.arange(3 * N * G * D, dtype=jnp.float32).reshape(3, N, G, D))

  def run(how):
    monkeypatch.setattr(nsa_layer, "COMPRESSOR_COTANGENT", how)

    def loss(p, x):  # a new function each run: make_jaxpr caches its traces by function
      out = comp.apply(p, x, N, s, method=nsa_layer.BlockCompressor.from_row)
      return jnp.sum(out.astype(jnp.float32) * cot)
    eqns = jax.make_jaxpr(jax.grad(loss, (0, 1)))(params, raw).eqns
    # The keys' products' backward: x's gradient [B, N, G, s*D] and the kernel rows'
    # [2D, s*D] (the position embedding's product, over all L*D rows, left out).
    f32_products = sum(e.primitive.name == "dot_general" and e.outvars[0].aval.shape[-1] == s * D
                       and any(v.aval.dtype == jnp.float32 for v in e.invars) for e in eqns)
    return f32_products, jax.grad(loss, (0, 1))(params, raw)

  (n_compute, got), (n_f32, want) = run("compute"), run("float32")
  assert (n_compute, n_f32) == (0, 4)
  g_params, w_params = jax.tree.leaves(got[0]), jax.tree.leaves(want[0])
  for a, b in zip(g_params, w_params):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(b))) + 1e-30)
  g_x, w_x = np.asarray(got[1], np.float32), np.asarray(want[1], np.float32)
  assert np.all(np.abs(g_x - w_x) <= 2.0 ** -7 * np.abs(w_x))
  monkeypatch.setattr(nsa_layer, "COMPRESSOR_COTANGENT", "bf16")
  with pytest.raises(ValueError) as err:
    comp.apply(params, raw, N, s, method=nsa_layer.BlockCompressor.from_row)
  assert str(err.value).splitlines()[0] == (
      "attention.nsa.COMPRESSOR_COTANGENT must be 'compute' or 'float32', got 'bf16'")
