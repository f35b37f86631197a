"""DynMoE's decoding experts as one kernel (moe_pallas, in Pallas interpret mode here) against
the XLA layer they replace: outputs, routing cases, gradients, and a model's decoding."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onn_jax import decode
from onn_jax.config import ModelConfig
from onn_jax.data.tokens import PAD, VOCAB_SIZE
from onn_jax.model import moe, moe_pallas, nsa
from onn_jax.model.layers import rms_norm
from onn_jax.model.transformer import Transformer, init_cache, init_params

from conftest import TINY_MODEL

F32_EPS = float(jnp.finfo(jnp.float32).eps)


def _layer(E, C, F, B, threshold, seed=0, dtype=jnp.float32):
  keys = jax.random.split(jax.random.PRNGKey(seed), 5)
  params = moe.init_expert_params(keys[0], E, C, F, 0.0)
  # Thresholds spread around `threshold`: some experts on, some off, some rows with none.
  params["thresholds"] = threshold + 0.1 * jax.random.normal(keys[1], (E,))
  # Biases are zero at initialisation: give them values, so that each counts.
  params["b_in"] = 0.5 * jax.random.normal(keys[3], (E, F))
  params["b_out"] = 0.5 * jax.random.normal(keys[4], (E, C))
  x_BTC = jax.random.normal(keys[2], (B, 1, C)).astype(dtype)
  return x_BTC, params


def _weights(combine, x_BTC, params, fallback_k=1):
  """The gate's combination weights, as a decoding step's layer computes them (XLA)."""
  return moe.route(x_BTC, params["prototypes"], params["thresholds"],
                   jnp.ones(x_BTC.shape[:2], bool), combine=combine, fallback_k=fallback_k,
                   target_active=0.0, st_temperature=moe.ST_TEMPERATURE)[0]


def _kernel(combine, dtype, x_BTC, params, fallback_k=1, routed=False):
  """The kernel given XLA's routing weights, or (``routed``) routing its rows itself."""
  if routed:
    gate = (combine, fallback_k, moe.ST_TEMPERATURE)
    return moe.decode_experts(dtype, True, gate, x_BTC, None, params)
  weights_BTE = _weights(combine, x_BTC, params, fallback_k)
  return moe.decode_experts(dtype, True, None, x_BTC, weights_BTE, params)


def _reference(combine, dtype, x_BTC, params, fallback_k=1):
  return moe.experts_dense(x_BTC, _weights(combine, x_BTC, params, fallback_k), params, dtype)


def _fallback_rows(x_BTC, params):
  s = moe.cosine_similarity(x_BTC, params["prototypes"])
  return int(jnp.sum(jnp.all(s <= params["thresholds"], axis=-1)))


def test_erf_is_within_its_stated_error():
  x = jnp.linspace(-6.0, 6.0, 20001, dtype=jnp.float32)
  err = jnp.max(jnp.abs(moe_pallas._erf(x) - jax.lax.erf(x)))
  # A&S 7.1.26's 1.5e-7 plus float32 rounding of values up to 1 (a few eps).
  assert float(err) <= 1.5e-7 + 4 * F32_EPS


# (experts, d_model, hidden, rows): several hidden tiles a program grid (hidden > DEC_TILE_F),
# rows fewer than a tile's 16 and not a multiple of the row tile.
SHAPES = [(4, 32, 32, 3), (8, 64, 128, 20), (16, 32, 256, 70)]


@pytest.mark.parametrize("combine", ["mean", "softmax"])
@pytest.mark.parametrize("shape", SHAPES)
# 2.0: every row falls back (to its top two experts with fallback_k=2)
@pytest.mark.parametrize("threshold,fallback_k", [(0.05, 1), (2.0, 1), (2.0, 2)])
@pytest.mark.parametrize("routed", [False, True])
def test_kernel_matches_the_xla_layer_in_float32(combine, shape, threshold, fallback_k, routed):
  """Given XLA's routing weights or routing in the kernel (its similarities within float32
  rounding of XLA's: no margin here is that close to its threshold, no two that close)."""
  E, C, F, B = shape
  x_BTC, params = _layer(E, C, F, B, threshold)
  if threshold > 1:
    assert _fallback_rows(x_BTC, params) == B
  got = _kernel(combine, jnp.float32, x_BTC, params, fallback_k, routed)
  want = _reference(combine, jnp.float32, x_BTC, params, fallback_k)
  assert got.shape == want.shape and got.dtype == want.dtype
  # Float32 sums of E*F terms in another order (relative error ~ sqrt(E*F) eps of the terms'
  # magnitude, which is the output's here) plus the erf approximation (1.5e-7 relative on gelu).
  tol = (4 * np.sqrt(E * F) * F32_EPS + 3e-7) * float(jnp.max(jnp.abs(want)))
  np.testing.assert_allclose(got, want, atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_early_loads_give_the_same_numbers(dtype, monkeypatch):
  """DEC_MOE_EARLY_LOADS moves the routing after the expert's loads and hidden product: the
  same float32 operations, so bit for bit the same output (interpret mode)."""
  x_BTC, params = _layer(8, 64, 128, 20, 0.05, dtype=dtype)
  outs = []
  for early in (False, True):
    monkeypatch.setattr(moe_pallas, "DEC_MOE_EARLY_LOADS", early)
    outs.append(np.asarray(_kernel("softmax", dtype, x_BTC, params, routed=True), np.float32))
  np.testing.assert_array_equal(outs[0], outs[1])
  assert np.max(np.abs(outs[0])) > 0
  monkeypatch.setattr(moe_pallas, "DEC_MOE_EARLY_LOADS", 1)
  with pytest.raises(ValueError, match="moe_pallas.DEC_MOE_EARLY_LOADS must be True or False"):
    _kernel("softmax", dtype, x_BTC, params, routed=True)


@pytest.mark.parametrize("combine", ["mean", "softmax"])
@pytest.mark.parametrize("routed", [False, True])
def test_kernel_is_as_close_to_float32_as_the_xla_layer_in_bfloat16(combine, routed):
  E, C, F, B = 8, 64, 128, 20
  x_BTC, params = _layer(E, C, F, B, 0.05, dtype=jnp.bfloat16)
  exact = _reference(combine, jnp.float32, x_BTC.astype(jnp.float32), params)
  err_xla = jnp.abs(_reference(combine, jnp.bfloat16, x_BTC, params).astype(jnp.float32) - exact)
  err_kernel = jnp.abs(_kernel(combine, jnp.bfloat16, x_BTC, params, routed=routed).astype(
      jnp.float32) - exact)
  # Both round the same intermediates to bfloat16; the kernel sums its partials in float32
  # before one rounding (XLA rounds each of its products), so it is no further from float32.
  assert float(jnp.max(err_kernel)) <= 1.25 * float(jnp.max(err_xla))
  assert float(jnp.mean(err_kernel)) <= 1.25 * float(jnp.mean(err_xla))


@pytest.mark.parametrize("routed", [False, True])
def test_gradient_is_the_xla_layers(routed):
  """The custom VJP is the XLA layer's: through the weights to the straight-through gate, and
  to every expert (routing in the kernel or not)."""
  x_BTC, params = _layer(8, 32, 64, 6, 0.05)
  ct = jax.random.normal(jax.random.PRNGKey(9), x_BTC.shape)
  loss = lambda fn: lambda x, p: jnp.sum(fn("softmax", jnp.float32, x, p) * ct)  # noqa: E731
  kernel = functools.partial(_kernel, routed=routed)
  got = jax.grad(lambda x, p: loss(kernel)(x, p), argnums=(0, 1))(x_BTC, params)
  want = jax.grad(loss(_reference), argnums=(0, 1))(x_BTC, params)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(g, w)
  assert float(jnp.max(jnp.abs(got[1]["thresholds"]))) > 0  # the gate learns


@pytest.mark.parametrize("routed", [False, True])
def test_the_kernel_applies_the_blocks_norm_and_adds_its_residual(routed):
  """With an RMSNorm's gains (moe_pallas.DEC_PRENORM) the kernel computes x + DynMoE(rms_norm(x)):
  float32 within the tolerance above of XLA's, the residual's terms exact; its gradient is
  XLA's, the gains' included."""
  E, C, F, B = 8, 64, 128, 20
  x_BTC, params = _layer(E, C, F, B, 0.05)
  x_BTC = 3.0 * x_BTC  # rows far from unit RMS: the norm is seen
  scale_C = 1.0 + 0.5 * jax.random.normal(jax.random.PRNGKey(11), (C,))

  def kernel(x, p, scale):
    h = rms_norm(x, scale)
    gate = ("softmax", 1, moe.ST_TEMPERATURE) if routed else None
    weights = None if routed else _weights("softmax", h, p)
    return moe.decode_experts(jnp.float32, True, gate, x, weights, p, None, scale)

  def reference(x, p, scale):
    return x + _reference("softmax", jnp.float32, rms_norm(x, scale), p)

  got, want = kernel(x_BTC, params, scale_C), reference(x_BTC, params, scale_C)
  tol = (4 * np.sqrt(E * F) * F32_EPS + 3e-7) * float(jnp.max(jnp.abs(want - x_BTC)))
  np.testing.assert_allclose(got, want, atol=tol + 2 * F32_EPS * float(jnp.max(jnp.abs(want))),
                             rtol=0)
  assert float(jnp.max(jnp.abs(got - kernel(x_BTC, params, 2.0 * scale_C)))) > 100 * tol
  ct = jax.random.normal(jax.random.PRNGKey(12), x_BTC.shape)
  grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * ct), argnums=(0, 1, 2))(
      x_BTC, params, scale_C) for f in (kernel, reference)]
  for g, w in zip(*map(jax.tree.leaves, grads)):  # the same terms, perhaps in another order
    np.testing.assert_allclose(g, w, rtol=0, atol=4 * np.sqrt(E * F) * F32_EPS * float(
        jnp.max(jnp.abs(w))))
  assert float(jnp.max(jnp.abs(grads[0][2]))) > 0


def test_decode_supported_and_the_tiles_of_larger_layers():
  arc1 = dict(d_model=256, expert_hidden=512, itemsize=2)
  assert moe_pallas.decode_supported(**arc1)
  assert moe_pallas._tiles(256, 512, 2) == (moe_pallas.DEC_TILE_F, moe_pallas.DEC_ROWS)
  assert not moe_pallas.decode_supported(**{**arc1, "d_model": 48})
  assert not moe_pallas.decode_supported(**{**arc1, "expert_hidden": 8})
  # Larger layers take smaller tiles within DEC_TILE_BYTES, down to 16 x 16, then none.
  for d_model, itemsize in ((512, 4), (1024, 2)):
    tile_f, rows = moe_pallas._tiles(d_model, 1024, itemsize)
    assert min(tile_f, rows) >= 16
    assert (moe_pallas._program_bytes(d_model, tile_f, rows, itemsize)
            <= moe_pallas.DEC_TILE_BYTES)
  assert not moe_pallas.decode_supported(**{**arc1, "d_model": 2048})


def test_which_decoding_steps_run_the_kernel(monkeypatch):
  sizes = dict(d_model=32, expert_hidden=32, dtype=jnp.float32)
  # The default, "auto": the kernel on a GPU where it was timed (2-byte dtypes, up to
  # DECODE_AUTO_ROWS rows), XLA elsewhere; "pallas" wherever the kernel serves the layer.
  assert moe.DECODE_KERNEL == "auto"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert moe.decode_kernel_setting() == "pallas"
  half = {**sizes, "dtype": jnp.bfloat16}
  assert moe.decode_kernel_applies(**half, rows=moe.DECODE_AUTO_ROWS)
  assert not moe.decode_kernel_applies(**half, rows=moe.DECODE_AUTO_ROWS + 1)
  assert not moe.decode_kernel_applies(**sizes)  # float32
  monkeypatch.setattr(moe, "DECODE_KERNEL", "pallas")
  assert moe.decode_kernel_applies(**sizes, rows=1000)
  monkeypatch.undo()
  for setting, expected in (("pallas", True), ("xla", False),
                            ("auto", jax.default_backend() == "gpu")):
    monkeypatch.setattr(moe, "DECODE_KERNEL", setting)
    assert moe.decode_kernel_applies(**sizes) == expected
  monkeypatch.setattr(moe, "DECODE_KERNEL", "pallas")
  assert not moe.decode_kernel_applies(**{**sizes, "d_model": 48})
  monkeypatch.setattr(moe, "DECODE_KERNEL", True)
  with pytest.raises(ValueError, match="moe.DECODE_KERNEL must be one of"):
    moe.decode_kernel_applies(**sizes)


def test_decode_kernels_names_and_restores_the_settings():
  before = nsa.PALLAS_DECODE, moe.DECODE_KERNEL
  with decode.decode_kernels("fused_moe"):
    assert (nsa.PALLAS_DECODE, moe.DECODE_KERNEL) == ("fused", "pallas")
  assert (nsa.PALLAS_DECODE, moe.DECODE_KERNEL) == before
  with pytest.raises(ValueError, match="decode kernels 'fast': expected one of split, fused"):
    with decode.decode_kernels("fast"):
      pass


@pytest.mark.parametrize("kernels", ["split", "fused_moe", "fused_xla_block_moe",
                                     "fused_xla_block_moe/xla_routing",
                                     "fused_xla_block_moe/no_prenorm"])
def test_model_decoding_with_the_moe_kernel_matches_full_forward(kernels, monkeypatch):
  """KV-cached decoding with each DynMoE layer as one kernel (and, fused_moe and
  fused_xla_block_moe, NSA's one-kernel step) gives the full forward's logits; the kernel runs
  in every decoding step, never in the prefill; routing its rows or ("xla_routing") given
  XLA's routing weights; applying the block's norm and adding its residual itself but with
  "no_prenorm" (moe_pallas.DEC_PRENORM)."""
  kernels, _, routing = kernels.partition("/")
  monkeypatch.setattr(moe_pallas, "DECODE_ROUTE", routing != "xla_routing")
  monkeypatch.setattr(moe_pallas, "DEC_PRENORM", routing != "no_prenorm")
  cfg = ModelConfig(**TINY_MODEL)
  params = init_params(cfg, jax.random.PRNGKey(0))
  model = Transformer(cfg)
  calls = []
  monkeypatch.setattr(moe_pallas, "decode_partials", functools.partial(
      lambda kernel, *a, **k: calls.append((a[1] is None, k["prenorm_C"] is not None))
      or kernel(*a, **k), moe_pallas.decode_partials))
  monkeypatch.setattr(moe, "DECODE_KERNEL", "pallas")
  monkeypatch.setattr(nsa, "PALLAS_DECODE", decode.DECODE_KERNELS[kernels][0])
  if kernels != "split":
    model = Transformer(dataclasses.replace(cfg, nsa_impl="pallas"))
  T = 21
  tokens = jax.random.randint(jax.random.PRNGKey(5), (3, T), 0, VOCAB_SIZE)
  full = jax.jit(lambda p, x: Transformer(cfg).apply({"params": p}, x)[0])(params, tokens)
  prompt_len = np.array([2, 9, 5])
  P = int(prompt_len.max())
  masked = jnp.where(jnp.arange(P)[None] < prompt_len[:, None], tokens[:, :P], PAD)
  _, cache = jax.jit(lambda p, x, c: model.apply({"params": p}, x, mode="prefill", cache=c)[:2])(
      params, masked, init_cache(cfg, 3, T))
  assert not calls, "the prefill ran the decoding kernel"
  step = jax.jit(lambda p, x, c, pos: model.apply({"params": p}, x, mode="decode", cache=c,
                                                  pos_B=pos)[:2])
  pos = jnp.asarray(prompt_len)
  for _ in range(T - P):
    logits, cache = step(params, tokens[jnp.arange(3), pos][:, None], cache, pos)
    np.testing.assert_allclose(logits[:, 0], full[jnp.arange(3), pos], atol=2e-5, rtol=1e-5)
    pos = pos + 1
  assert calls, "the decoding kernel did not run"
  assert set(calls) == {(routing != "xla_routing", routing != "no_prenorm")}, (
      "the kernel's routing or norm was not the one set")


def test_where_the_kernel_routes_its_rows(monkeypatch):
  """With DECODE_ROUTE (the default) the kernel routes on a GPU where the similarities are
  Triton tiles (E a power of two of at least 16, d_model a power of two), in interpret mode
  always."""
  assert moe_pallas.DECODE_ROUTE is True
  gpu = functools.partial(moe_pallas.route_supported, interpret=False, expert_hidden=512,
                          itemsize=2)
  assert gpu(num_experts=16, d_model=256)  # arc1
  assert not gpu(num_experts=8, d_model=256) and not gpu(num_experts=24, d_model=256)
  assert not gpu(num_experts=16, d_model=48)
  # The prototypes' tiles past DEC_TILE_BYTES beside the experts' (which still fit).
  assert moe_pallas.decode_supported(d_model=1024, expert_hidden=512, itemsize=2)
  assert not gpu(num_experts=64, d_model=1024)
  interp = dict(expert_hidden=32, itemsize=4, interpret=True)
  assert moe_pallas.route_supported(num_experts=3, d_model=48, **interp)
  monkeypatch.setattr(moe_pallas, "DECODE_ROUTE", False)
  assert not moe_pallas.route_supported(num_experts=16, d_model=256, **interp)
  monkeypatch.setattr(moe_pallas, "DECODE_ROUTE", "yes")
  with pytest.raises(ValueError, match="moe_pallas.DECODE_ROUTE must be True or False"):
    moe_pallas.route_supported(num_experts=16, d_model=256, **interp)
  x_BTC, params = _layer(4, 32, 32, 3, 0.05)
  with pytest.raises(ValueError, match="routing in the kernel takes x in bfloat16"):
    moe.decode_experts(jnp.bfloat16, True, ("mean", 1, 0.1), x_BTC, None, params)


@pytest.mark.parametrize("x_dtype", [jnp.bfloat16, jnp.float32])
def test_the_layer_routes_in_the_kernel_only_rows_in_its_dtype(x_dtype, monkeypatch):
  """A bfloat16 DynMoE layer decoding rows given in float32 takes XLA's routing weights (the
  kernel routes only rows in its own dtype, which it need not round) and gives the layer's
  output; rows in bfloat16 are routed in the kernel."""
  calls = []
  monkeypatch.setattr(moe_pallas, "decode_partials", functools.partial(
      lambda kernel, *a, **k: calls.append(a[1] is None) or kernel(*a, **k),
      moe_pallas.decode_partials))
  monkeypatch.setattr(moe, "DECODE_KERNEL", "pallas")
  layer = moe.DynMoE(num_experts=3, expert_hidden=32, dtype=jnp.bfloat16)
  x_BTC = jax.random.normal(jax.random.PRNGKey(2), (4, 1, 32)).astype(x_dtype)
  variables = layer.init(jax.random.PRNGKey(0), x_BTC)
  y_BTC = layer.apply(variables, x_BTC, decoding=True)[0]
  assert calls == [x_dtype == jnp.bfloat16]
  expected = layer.apply(variables, x_BTC)[0]
  # bfloat16 products and one rounding each; the partials summed in another order: a few
  # units in bfloat16's last place of the largest output.
  scale = float(jnp.max(jnp.abs(expected.astype(jnp.float32))))
  np.testing.assert_allclose(np.asarray(y_BTC, np.float32), np.asarray(expected, np.float32),
                             atol=4 * 2.0**-8 * scale)
