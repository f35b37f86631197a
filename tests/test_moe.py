"""DynMoE: gate semantics, straight-through gradients, fallback, SDL, padding, init and jit.

The oracle is a float64 numpy re-implementation of the layer written independently of the JAX
code (no shared helpers), plus hand-built inputs whose active experts are known by construction.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onn_jax.model.moe import (AUTO_GPU_IMPL, AUX_KEYS, BIAS_PAD, EXPERT_LEAVES, DynMoE,
                               describe, expert_rows, expert_slots, experts_dense,
                               experts_reference, experts_sparse, fallback_experts,
                               init_expert_params, num_slots, pair_capacity, pair_slots,
                               resolve_impl, slots_overflow, sum_rows)
from onn_jax.model import moe
from onn_jax.config import ModelConfig

EPS = 1e-6  # the layer's normalisation epsilon (added to squared norms)
TAU = 0.1


@functools.lru_cache(maxsize=None)
def _apply(num_experts: int, hidden: int, combine: str, k: int, target: float = 0.25,
           dtype: str = "float32"):
  """One jitted ``(params, x, valid) -> (y, aux)`` per layer configuration, shared by tests."""
  # impl="dense": the definition these tests check (auto may dispatch sparsely on a GPU).
  layer = DynMoE(num_experts=num_experts, expert_hidden=hidden, combine=combine, fallback_k=k,
                 target_active=target, st_temperature=TAU, impl="dense",
                 dtype=jnp.dtype(dtype))
  return jax.jit(lambda params, x, valid: layer.apply({"params": params}, x, valid))


def _params(seed: int, num_experts: int, d_model: int, hidden: int, **override) -> dict:
  """Random layer parameters from numpy (no per-shape compilation of jax.random)."""
  rng = np.random.default_rng(seed)
  e, c, f = num_experts, d_model, hidden
  params = {
      "prototypes": rng.normal(size=(e, c)),
      "thresholds": np.zeros(e),
      "w_in": rng.normal(size=(e, c, f)) / math.sqrt(c),
      "b_in": rng.normal(size=(e, f)) * 0.3,  # non-zero biases: a wrong bias path cannot hide
      "w_out": rng.normal(size=(e, f, c)) / math.sqrt(f),
      "b_out": rng.normal(size=(e, c)) * 0.3,
  }
  params.update(override)
  return {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}


# ------------------------------------------------------------------------------------------------
# float64 numpy oracle
# ------------------------------------------------------------------------------------------------

_erf = np.vectorize(math.erf)


def _np_unit(v: np.ndarray) -> np.ndarray:
  return v / np.sqrt(np.sum(v * v, axis=-1, keepdims=True) + EPS)


def _np_expert_outputs(params: dict, x_BTC: np.ndarray) -> np.ndarray:
  """[B, T, E, C]: every expert applied to every token."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  outs = []
  for e in range(p["w_in"].shape[0]):
    h = x_BTC @ p["w_in"][e] + p["b_in"][e]
    h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
    outs.append(h @ p["w_out"][e] + p["b_out"][e])
  return np.stack(outs, axis=2)


def _np_layer(params: dict, x_BTC, valid_BT, combine: str, k: int, target: float = 0.25):
  """Returns (y_BTC, aux dict, used_BTE, s_BTE) in float64."""
  x_BTC = np.asarray(x_BTC, np.float64)
  valid_BT = np.asarray(valid_BT, bool)
  protos = np.asarray(params["prototypes"], np.float64)
  theta = np.asarray(params["thresholds"], np.float64)
  s_BTE = _np_unit(x_BTC) @ _np_unit(protos).T
  margin = s_BTE - theta
  hard = (margin > 0).astype(np.float64)
  fallback = hard.sum(-1) == 0
  order = np.argsort(-s_BTE, axis=-1, kind="stable")[..., :k]
  top = np.zeros_like(hard)
  np.put_along_axis(top, order, 1.0, axis=-1)
  used = np.where(fallback[..., None], top, hard)
  if combine == "mean":
    w = used / used.sum(-1, keepdims=True)
  else:
    ex = used * np.exp(margin)
    w = ex / ex.sum(-1, keepdims=True)
  y = np.einsum("bte,btec->btc", w, _np_expert_outputs(params, x_BTC))
  v = valid_BT.astype(np.float64)
  n = v.sum()
  ph = _np_unit(protos)
  aux = {
      "diversity": np.sum((ph @ ph.T - np.eye(len(ph))) ** 2),
      "sparsity": ((hard.mean(-1) * v).sum() / n - target) ** 2,
      "active_frac": (hard.mean(-1) * v).sum() / n,
      "experts_per_token": (used.sum(-1) * v).sum() / n,
      "fallback_frac": (fallback * v).sum() / n,
      "tokens_per_expert": (used * v[..., None]).sum((0, 1)),
      "fallback_tokens": (fallback * v).sum(),
      "num_tokens": n,
      "st_active_sum": (hard.mean(-1) * v).sum(),
  }
  return y, aux, used, s_BTE


def _assert_aux_close(aux: dict, ref: dict, atol: float = 1e-5) -> None:
  assert set(aux) == set(AUX_KEYS)
  for key in AUX_KEYS:
    assert aux[key].dtype == jnp.float32, key
    np.testing.assert_allclose(np.asarray(aux[key]), ref[key], rtol=1e-5, atol=atol,
                               err_msg=key)


# ------------------------------------------------------------------------------------------------
# Hand-built gate semantics
# ------------------------------------------------------------------------------------------------

# Prototypes are the first three basis vectors of R^4, so cos(x, P_e) = x_e / |x|.
HAND_PROTOS = np.eye(3, 4)
HAND_THETA = np.array([0.5, 0.2, 0.9])
HAND_X = np.array([
    [1.0, 1.0, 0.0, 0.0],   # s = (.71, .71, 0)      -> {0, 1}
    [0.0, 0.0, 1.0, 0.0],   # s = (0, 0, 1)          -> {2}
    [1.0, 0.0, 0.0, 0.0],   # s = (1, 0, 0)          -> {0}
    [0.0, 1.0, 0.0, 1.0],   # s = (0, .71, 0)        -> {1}
    [1.0, 1.0, 1.0, 0.0],   # s = (.58, .58, .58)    -> {0, 1} (.58 < .9)
    [-1.0, -1.0, 0.2, 1.0], # s = (-.69, -.69, .14)  -> none: falls back to top-1 = {2}
])
HAND_USED = np.array([[1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1]], float)


@pytest.mark.parametrize("combine", ["mean", "softmax"])
def test_hand_built_mask_and_mixture(combine):
  # Positive per-token scales: the gate must depend on direction only.
  x_BTC = (HAND_X * np.array([3.0, 0.5, 2.0, 1.0, 7.0, 0.25])[:, None])[None]
  params = _params(0, 3, 4, 5, prototypes=HAND_PROTOS * 2.5, thresholds=HAND_THETA)
  y, aux = _apply(3, 5, combine, 1)(params, jnp.asarray(x_BTC, jnp.float32),
                                    jnp.ones((1, 6), bool))

  s = (HAND_X / np.linalg.norm(HAND_X, axis=-1, keepdims=True))[:, :3]  # cos with e0, e1, e2
  if combine == "mean":
    w = HAND_USED / HAND_USED.sum(-1, keepdims=True)
  else:
    ex = HAND_USED * np.exp(s - HAND_THETA)
    w = ex / ex.sum(-1, keepdims=True)
  outs_TEC = _np_expert_outputs(params, x_BTC)[0]
  expected = np.einsum("te,tec->tc", w, outs_TEC)
  np.testing.assert_allclose(np.asarray(y[0]), expected, rtol=1e-5, atol=1e-5)

  np.testing.assert_array_equal(np.asarray(aux["tokens_per_expert"]), HAND_USED.sum(0))
  assert float(aux["fallback_tokens"]) == 1.0
  np.testing.assert_allclose(float(aux["active_frac"]), 7 / 18, rtol=1e-6)
  np.testing.assert_allclose(float(aux["experts_per_token"]), 8 / 6, rtol=1e-6)


def test_threshold_moves_the_mask():
  """Lowering theta_2 below .58 adds expert 2 to token 4; raising theta_1 above .71 drops it."""
  x = jnp.asarray(HAND_X[None], jnp.float32)
  valid = jnp.ones((1, 6), bool)
  base = _apply(3, 5, "mean", 1)
  _, aux0 = base(_params(0, 3, 4, 5, prototypes=HAND_PROTOS, thresholds=HAND_THETA), x, valid)
  _, aux1 = base(_params(0, 3, 4, 5, prototypes=HAND_PROTOS, thresholds=[0.5, 0.2, 0.55]),
                 x, valid)
  _, aux2 = base(_params(0, 3, 4, 5, prototypes=HAND_PROTOS, thresholds=[0.5, 0.75, 0.9]),
                 x, valid)
  np.testing.assert_array_equal(np.asarray(aux0["tokens_per_expert"]), [3, 3, 2])
  # The comparison is strict: s_0 is exactly 0 for tokens 1 and 3, so theta_0 = 0 keeps them off.
  _, aux3 = base(_params(0, 3, 4, 5, prototypes=HAND_PROTOS, thresholds=[0.0, 0.2, 0.9]),
                 x, valid)
  np.testing.assert_array_equal(np.asarray(aux3["tokens_per_expert"]), [3, 3, 2])
  np.testing.assert_array_equal(np.asarray(aux1["tokens_per_expert"]), [3, 3, 3])
  # Token 3 (s_1 = .71) now has no active expert and falls back to its top-1, expert 1.
  np.testing.assert_array_equal(np.asarray(aux2["tokens_per_expert"]), [3, 1, 2])
  assert float(aux2["fallback_tokens"]) == 2.0


@pytest.mark.parametrize("combine", ["mean", "softmax"])
@pytest.mark.parametrize("k", [1, 2])
def test_random_inputs_match_numpy_oracle(combine, k):
  rng = np.random.default_rng(1)
  # theta = 0.3 with C = 8: each expert is active for ~20% of tokens, ~40% of tokens fall back.
  params = _params(1, 4, 8, 6, thresholds=rng.uniform(0.2, 0.4, size=4))
  x = rng.normal(size=(2, 9, 8))
  valid = np.ones((2, 9), bool)
  valid[1, 6:] = False
  y, aux = _apply(4, 6, combine, k)(params, jnp.asarray(x, jnp.float32), jnp.asarray(valid))
  y_ref, aux_ref, _, _ = _np_layer(params, x, valid, combine, k)
  assert 0 < aux_ref["fallback_tokens"] < aux_ref["num_tokens"]  # both paths exercised
  np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-4, atol=1e-5)
  _assert_aux_close(aux, aux_ref)


# ------------------------------------------------------------------------------------------------
# Straight-through gradients
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("combine", ["mean", "softmax"])
def test_straight_through_gradients_reach_thresholds_and_prototypes(combine):
  rng = np.random.default_rng(2)
  params = _params(2, 4, 8, 6, thresholds=rng.uniform(-0.1, 0.2, size=4))
  x = jnp.asarray(rng.normal(size=(2, 7, 8)), jnp.float32)
  r = jnp.asarray(rng.normal(size=(2, 7, 8)), jnp.float32)
  valid = jnp.ones((2, 7), bool)
  fn = _apply(4, 6, combine, 1)

  def task_loss(p, x):
    y, _ = fn(p, x, valid)
    return jnp.sum(y * r)

  g, gx = jax.grad(task_loss, argnums=(0, 1))(params, x)
  for name in EXPERT_LEAVES:
    assert np.all(np.isfinite(np.asarray(g[name]))), name
  # The hard mask alone has zero derivative: these are non-zero only through the surrogate
  # (and, for softmax, through s - theta in the logits).
  assert np.all(np.abs(np.asarray(g["thresholds"])) > 0)
  assert np.all(np.abs(np.asarray(g["prototypes"])).sum(-1) > 0)
  assert np.all(np.abs(np.asarray(gx)).sum(-1) > 0)


def test_straight_through_mean_gradient_matches_surrogate_formula():
  """Mean combination: dL/dtheta_e = sum_t (g_t . (y_te - y_t)) / n_t * (-sig'(m_te) / tau).

  The sum runs over tokens with an active expert; a fallback token's mask is a constant.
  """
  rng = np.random.default_rng(3)
  params = _params(3, 4, 8, 6, thresholds=rng.uniform(-0.1, 0.1, size=4))
  x = rng.normal(size=(1, 6, 8))
  r = rng.normal(size=(1, 6, 8))
  fn = _apply(4, 6, "mean", 1)
  g = jax.grad(lambda p: jnp.sum(fn(p, jnp.asarray(x, jnp.float32),
                                    jnp.ones((1, 6), bool))[0] * r))(params)
  y_ref, _, used, s = _np_layer(params, x, np.ones((1, 6), bool), "mean", 1)
  hard = s - np.asarray(params["thresholds"]) > 0
  gated = hard.any(-1)  # [B, T]
  assert 3 <= gated.sum() < gated.size  # both kinds of token present
  outs = _np_expert_outputs(params, x)
  sig = 1.0 / (1.0 + np.exp(-(s - np.asarray(params["thresholds"])) / TAU))
  dm = np.einsum("btc,btec->bte", r, outs - y_ref[:, :, None, :]) / used.sum(-1, keepdims=True)
  dm = dm * gated[..., None]
  expected = np.sum(dm * (-sig * (1 - sig) / TAU), axis=(0, 1))
  np.testing.assert_allclose(np.asarray(g["thresholds"]), expected, rtol=1e-4, atol=1e-6)


def test_sparsity_gradient_matches_surrogate_formula():
  """d sparsity / d theta_e = 2 (f - target) * mean_t(-sig'(m_te) / tau) / E over valid t."""
  rng = np.random.default_rng(4)
  params = _params(4, 4, 8, 6, thresholds=rng.uniform(-0.2, 0.2, size=4))
  x = rng.normal(size=(2, 5, 8))
  valid = np.ones((2, 5), bool)
  valid[0, 3:] = False
  fn = _apply(4, 6, "mean", 1)
  g = jax.grad(lambda p: fn(p, jnp.asarray(x, jnp.float32), jnp.asarray(valid))[1]["sparsity"]
               )(params)
  _, aux, _, s = _np_layer(params, x, valid, "mean", 1)
  sig = 1.0 / (1.0 + np.exp(-(s - np.asarray(params["thresholds"])) / TAU))
  frac = aux["active_frac"]
  dsig = (-sig * (1 - sig) / TAU)[valid]  # [n, E]
  expected = 2 * (frac - 0.25) * dsig.mean(0) / 4
  assert abs(frac - 0.25) > 0.05
  np.testing.assert_allclose(np.asarray(g["thresholds"]), expected, rtol=1e-4, atol=1e-7)
  # Only prototypes and thresholds feed the sparsity term.
  for name in ("w_in", "b_in", "w_out", "b_out"):
    assert not np.any(np.asarray(g[name])), name


# ------------------------------------------------------------------------------------------------
# Fallback
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("combine", ["mean", "softmax"])
@pytest.mark.parametrize("k", [1, 2])
def test_fallback_when_every_threshold_exceeds_every_similarity(combine, k):
  rng = np.random.default_rng(5)
  theta = np.array([1.5, 1.2, 1.7, 1.1, 1.3])
  params = _params(5, 5, 6, 4, thresholds=theta)
  x = rng.normal(size=(2, 6, 6))
  valid = np.ones((2, 6), bool)
  valid[1, 4:] = False
  y, aux = _apply(5, 4, combine, k)(params, jnp.asarray(x, jnp.float32), jnp.asarray(valid))

  s = _np_unit(x) @ _np_unit(np.asarray(params["prototypes"], np.float64)).T
  top = np.argsort(-s, axis=-1)[..., :k]
  used = np.zeros_like(s)
  np.put_along_axis(used, top, 1.0, axis=-1)
  if combine == "mean":
    w = used / k
  else:
    ex = used * np.exp(s - theta)
    w = ex / ex.sum(-1, keepdims=True)
  expected = np.einsum("bte,btec->btc", w, _np_expert_outputs(params, x))
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4, atol=1e-5)

  n = valid.sum()
  assert float(aux["num_tokens"]) == n
  assert float(aux["fallback_tokens"]) == n
  assert float(aux["fallback_frac"]) == 1.0
  assert float(aux["active_frac"]) == 0.0
  np.testing.assert_allclose(float(aux["experts_per_token"]), k, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(aux["tokens_per_expert"]), used[valid].sum(0))


# ------------------------------------------------------------------------------------------------
# SDL and padding
# ------------------------------------------------------------------------------------------------

def test_sdl_terms_match_numpy():
  rng = np.random.default_rng(6)
  protos = rng.normal(size=(6, 8))
  protos[1] = protos[0] * 3.0 + 1e-3  # a near-duplicate pair makes diversity large
  params = _params(6, 6, 8, 4, prototypes=protos, thresholds=rng.uniform(-0.3, 0.3, size=6))
  x = rng.normal(size=(3, 5, 8))
  valid = rng.uniform(size=(3, 5)) < 0.7
  target = 0.4
  _, aux = _apply(6, 4, "softmax", 2, target)(params, jnp.asarray(x, jnp.float32),
                                              jnp.asarray(valid))
  ph = protos / np.linalg.norm(protos, axis=-1, keepdims=True)
  diversity = np.sum((ph @ ph.T - np.eye(6)) ** 2)
  theta = np.asarray(params["thresholds"])
  xh = x / np.linalg.norm(x, axis=-1, keepdims=True)
  active = (xh @ ph.T - theta > 0)[valid]  # [n, E]
  sparsity = (active.mean() - target) ** 2
  np.testing.assert_allclose(float(aux["diversity"]), diversity, rtol=1e-5)
  np.testing.assert_allclose(float(aux["sparsity"]), sparsity, rtol=1e-5, atol=1e-7)
  assert diversity > 1.0


def test_padding_tokens_are_excluded():
  rng = np.random.default_rng(7)
  params = _params(7, 4, 8, 6, thresholds=rng.uniform(0.1, 0.3, size=4))
  x = rng.normal(size=(2, 8, 8))
  valid = np.ones((2, 8), bool)
  valid[0, 5:] = False
  valid[1, 2:] = False
  fn = _apply(4, 6, "softmax", 2)
  y, aux = fn(params, jnp.asarray(x, jnp.float32), jnp.asarray(valid))
  assert np.all(np.isfinite(np.asarray(y)))

  # Same statistics as running the valid tokens alone (one row, no padding).
  x_valid = x[valid][None]
  y_v, aux_v = fn(params, jnp.asarray(x_valid, jnp.float32), jnp.ones(x_valid.shape[:2], bool))
  for key in AUX_KEYS:
    np.testing.assert_allclose(np.asarray(aux[key]), np.asarray(aux_v[key]), rtol=1e-6,
                               err_msg=key)
  np.testing.assert_allclose(np.asarray(y)[valid], np.asarray(y_v[0]), rtol=1e-5, atol=1e-6)

  # Whatever the padding holds changes neither the statistics nor the valid outputs ...
  x2 = x.copy()
  x2[~valid] = rng.normal(size=(int((~valid).sum()), 8)) * 50.0
  y2, aux2 = fn(params, jnp.asarray(x2, jnp.float32), jnp.asarray(valid))
  for key in AUX_KEYS:
    np.testing.assert_array_equal(np.asarray(aux[key]), np.asarray(aux2[key]), err_msg=key)
  np.testing.assert_array_equal(np.asarray(y)[valid], np.asarray(y2)[valid])
  # ... and the sparsity term sends no gradient into padding tokens.
  gx = jax.grad(lambda x: fn(params, x, jnp.asarray(valid))[1]["sparsity"])(
      jnp.asarray(x, jnp.float32))
  assert not np.any(np.asarray(gx)[~valid])
  assert np.any(np.asarray(gx)[valid])


def test_all_padding_gives_finite_zero_statistics():
  params = _params(8, 4, 8, 6)
  _, aux = _apply(4, 6, "mean", 1)(params, jnp.ones((1, 3, 8)), jnp.zeros((1, 3), bool))
  for key in AUX_KEYS:
    assert np.all(np.isfinite(np.asarray(aux[key]))), key
  assert float(aux["num_tokens"]) == 0.0
  assert not np.any(np.asarray(aux["tokens_per_expert"]))


# ------------------------------------------------------------------------------------------------
# Init, dtypes, jit, errors
# ------------------------------------------------------------------------------------------------

EXPECTED_SHAPES = {"prototypes": (5, 12), "thresholds": (5,), "w_in": (5, 12, 7),
                   "b_in": (5, 7), "w_out": (5, 7, 12), "b_out": (5, 12)}


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_init_expert_params_shapes_match_module_params(param_dtype):
  layer = DynMoE(num_experts=5, expert_hidden=7, param_dtype=param_dtype)
  module_params = jax.eval_shape(layer.init, jax.random.key(0), jnp.ones((1, 3, 12)))["params"]
  fresh = jax.eval_shape(lambda k: init_expert_params(k, 5, 12, 7, 0.0, param_dtype),
                         jax.random.key(1))
  assert set(module_params) == set(fresh) == set(EXPERT_LEAVES)
  for name in EXPERT_LEAVES:
    assert module_params[name].shape == fresh[name].shape == EXPECTED_SHAPES[name], name
    assert module_params[name].dtype == fresh[name].dtype == param_dtype, name


def test_init_expert_params_values():
  layer = DynMoE(num_experts=5, expert_hidden=7, init_threshold=0.125)
  module_params = jax.jit(layer.init)(jax.random.key(0), jnp.ones((1, 3, 12)))["params"]
  fresh = jax.jit(init_expert_params, static_argnums=(1, 2, 3, 4))(
      jax.random.key(1), 5, 12, 7, 0.125)
  np.testing.assert_array_equal(np.asarray(module_params["thresholds"]), 0.125)
  np.testing.assert_array_equal(np.asarray(fresh["thresholds"]), 0.125)
  # Fresh rows differ per expert (a reset must not clone one expert into every slot).
  assert np.unique(np.asarray(fresh["prototypes"], np.float32), axis=0).shape[0] == 5
  # The module accepts parameters drawn by init_expert_params.
  y, _ = jax.jit(layer.apply)({"params": fresh}, jnp.ones((1, 3, 12)))
  assert y.shape == (1, 3, 12)


def test_bfloat16_compute_routes_identically():
  rng = np.random.default_rng(9)
  params = _params(9, 4, 8, 6, thresholds=rng.uniform(0.1, 0.3, size=4))
  x = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
  valid = jnp.ones((2, 5), bool)
  y32, aux32 = _apply(4, 6, "softmax", 1)(params, x, valid)
  y16, aux16 = _apply(4, 6, "softmax", 1, 0.25, "bfloat16")(params, x, valid)
  assert y16.dtype == jnp.bfloat16
  for key in AUX_KEYS:
    assert aux16[key].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(aux16[key]), np.asarray(aux32[key]), err_msg=key)
  # With the routing identical, four bfloat16 roundings (the input, the first product, the
  # activation, the second product), each 2^-8 of the output's scale.
  np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y32), rtol=0,
                             atol=4 * 2 ** -8 * float(jnp.abs(y32).max()))


def test_jit_does_not_retrace_for_same_shapes():
  layer = DynMoE(num_experts=3, expert_hidden=4, combine="softmax", fallback_k=2)
  traces = []

  @jax.jit
  def fwd(params, x, valid):
    traces.append(None)
    return layer.apply({"params": params}, x, valid)

  rng = np.random.default_rng(10)
  params = _params(10, 3, 6, 4)
  for seed in range(3):
    x = jnp.asarray(rng.normal(size=(2, 4, 6)), jnp.float32)
    valid = jnp.asarray(rng.uniform(size=(2, 4)) < 0.5 + 0.2 * seed)
    params = dict(params, thresholds=jnp.full((3,), 0.1 * seed))
    jax.block_until_ready(fwd(params, x, valid))
  assert len(traces) == 1


@pytest.mark.parametrize("field,value,culprit", [
    ("combine", "max", "combine"),
    ("fallback_k", 0, "fallback_k"),
    ("fallback_k", 4, "fallback_k"),
    ("impl", "sparse", "impl"),
    ("st_temperature", 0.0, "st_temperature"),
    ("capacity", 0.0, "capacity"),
    ("capacity", math.nan, "capacity"),
    ("tile", 0, "tile"),
])
def test_bad_configuration_names_the_field(field, value, culprit):
  layer = DynMoE(num_experts=3, expert_hidden=4, **{field: value})
  with pytest.raises(ValueError, match=culprit):
    layer.init(jax.random.key(0), jnp.ones((1, 2, 4)))


def test_bad_valid_mask_shape_is_rejected():
  layer = DynMoE(num_experts=3, expert_hidden=4)
  with pytest.raises(ValueError, match="valid_BT"):
    layer.init(jax.random.key(0), jnp.ones((1, 2, 4)), jnp.ones((1, 3), bool))


# ------------------------------------------------------------------------------------------------
# Sparse dispatch (impl="ragged" / "tiled"): exact against dense, capacity and fallback
# ------------------------------------------------------------------------------------------------

SPARSE_IMPLS = ("ragged", "tiled", "batched")


def _order_tol(dtype, terms: int, scale: float) -> float:
  """The rounding a sum of ``terms`` numbers of magnitude <= ``scale`` can show when taken in
  another order (the recursive-summation bound ``terms * eps * scale``)."""
  return terms * float(jnp.finfo(dtype).eps) * scale


def _assert_order_close(got, want, dtype, terms: int, err_msg: str = "") -> None:
  want = np.asarray(want, np.float64)
  atol = _order_tol(dtype, terms, float(np.max(np.abs(want))) or 1.0)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=atol,
                             err_msg=err_msg)


def _mixture_inputs(C: int = 8):
  """Inputs of the expert mixture: x [2, 9, C], gate weights [2, 9, 5] with zeros (unused
  experts) and one-hot rows, parameters with non-zero biases, a cotangent of the output."""
  keys = jax.random.split(jax.random.key(7), 7)
  x_BTC = jax.random.normal(keys[0], (2, 9, C))
  w_BTE = jax.nn.softmax(2.0 * jax.random.normal(keys[1], (2, 9, 5)))
  w_BTE = jnp.where(w_BTE > 0.15, w_BTE, 0.0).at[1, 3].set(jax.nn.one_hot(2, 5))
  params = {"w_in": jax.random.normal(keys[2], (5, C, 12)) / math.sqrt(C),
            "b_in": jax.random.normal(keys[3], (5, 12)),
            "w_out": jax.random.normal(keys[4], (5, 12, C)) / math.sqrt(12),
            "b_out": jax.random.normal(keys[5], (5, C))}
  return x_BTC, w_BTE, params, jax.random.normal(keys[6], (2, 9, C))


def _mixture_vjp(fn, dtype, x_BTC, w_BTE, params, r_BTC):
  y_BTC, vjp = jax.vjp(lambda x, w, p: fn(x, w, p, dtype), x_BTC, w_BTE, params)
  return y_BTC, vjp(r_BTC.astype(y_BTC.dtype))


@pytest.mark.parametrize("C", [8, 2 * BIAS_PAD - 1])  # x's ones column padded, unpadded
def test_dense_backward_pass_equals_autodiff_of_the_definition(C):
  """experts_dense's hand-written backward pass against autodiff of experts_reference: the
  output and the gradients of x, the gate weights and all four expert leaves (b_in's from the
  weight-gradient matmul's ones column), in float32."""
  args = _mixture_inputs(C)
  with jax.default_matmul_precision("float32"):
    y, (g_x, g_w, g_p) = jax.jit(functools.partial(_mixture_vjp, experts_dense,
                                                   jnp.float32))(*args)
    want, (w_x, w_w, w_p) = jax.jit(functools.partial(_mixture_vjp, experts_reference,
                                                      jnp.float32))(*args)
  N, F, E = 18, 12, 5
  _assert_order_close(y, want, jnp.float32, C + E * F)
  _assert_order_close(g_x, w_x, jnp.float32, 2 * C + E * F)
  _assert_order_close(g_w, w_w, jnp.float32, 2 * C + F)
  for name in ("w_in", "b_in", "w_out", "b_out"):
    _assert_order_close(g_p[name], w_p[name], jnp.float32, N + C + F, err_msg=name)
  assert float(jnp.max(jnp.abs(g_w[1, 3]))) > 0  # unused experts' weights get gradients too


def test_dense_backward_pass_under_vmap_and_remat():
  """Batched over a leading axis (test-time training vmaps the model) and rematerialised, the
  custom backward pass gives each example's own gradients."""
  x_BTC, w_BTE, params, r_BTC = _mixture_inputs()
  scale_X = jnp.array([1.0, -0.5, 2.0])

  def grads(fn, s):
    loss = lambda p, x: jnp.sum(fn(s * x, w_BTE, p, jnp.float32) * r_BTC)
    return jax.grad(jax.checkpoint(loss), argnums=(0, 1))(params, x_BTC)

  with jax.default_matmul_precision("float32"):
    got = jax.jit(jax.vmap(functools.partial(grads, experts_dense)))(scale_X)
    want = [jax.jit(functools.partial(grads, experts_reference))(s) for s in scale_X]
  for i in range(3):
    for g, w in zip(jax.tree.leaves(jax.tree.map(lambda a: a[i], got)),
                    jax.tree.leaves(want[i])):
      _assert_order_close(g, w, jnp.float32, 18 + 2 * 8 + 5 * 12)


def test_dense_bfloat16_is_as_close_to_float32_as_autodiff():
  """In bfloat16 the hand-written pass keeps gelu, its slope and the gate's gradient in float32
  and rounds once: no further from the float32 gradients than autodiff's bfloat16 pass."""
  args = _mixture_inputs()
  with jax.default_matmul_precision("float32"):
    _, exact = _mixture_vjp(experts_reference, jnp.float32, *args)
  _, fused16 = _mixture_vjp(experts_dense, jnp.bfloat16, *args)
  _, auto16 = _mixture_vjp(experts_reference, jnp.bfloat16, *args)
  for f16, a16, ex in zip(jax.tree.leaves(fused16), jax.tree.leaves(auto16),
                          jax.tree.leaves(exact)):
    ex = np.asarray(ex, np.float64)
    one_rounding = float(jnp.finfo(jnp.bfloat16).eps) * np.max(np.abs(ex))
    fused_err = np.max(np.abs(np.asarray(f16, np.float64) - ex))
    auto_err = np.max(np.abs(np.asarray(a16, np.float64) - ex))
    assert fused_err <= auto_err + one_rounding, (fused_err, auto_err)


@pytest.mark.parametrize("impl", SPARSE_IMPLS)
def test_sparse_experts_backward_pass_equals_autodiff_of_the_definition(impl):
  """experts_sparse (pairs within capacity) against autodiff of experts_reference: the output
  and the gradients of x, every expert leaf and the gate weights of the pairs in use; a pair not
  in use gets no gate gradient (its expert's output is not computed)."""
  x_BTC, w_BTE, params, r_BTC = _mixture_inputs()
  N, C, E, F = 18, 8, 5, 12
  used_NE = w_BTE.reshape(N, E) > 0
  sparse = lambda x, w, p, dtype: experts_sparse(x.reshape(N, C), w.reshape(N, E), used_NE, p,
                                                 dtype, N * E, 4, impl).reshape(x.shape)
  with jax.default_matmul_precision("float32"):
    y, (g_x, g_w, g_p) = jax.jit(functools.partial(_mixture_vjp, sparse, jnp.float32))(
        x_BTC, w_BTE, params, r_BTC)
    want, (w_x, w_w, w_p) = jax.jit(functools.partial(_mixture_vjp, experts_reference,
                                                      jnp.float32))(x_BTC, w_BTE, params, r_BTC)
  _assert_order_close(y, want, jnp.float32, C + E * F)
  _assert_order_close(g_x, w_x, jnp.float32, 2 * C + E * F)
  used = np.asarray(used_NE).reshape(w_BTE.shape)
  _assert_order_close(np.where(used, g_w, 0.0), np.where(used, w_w, 0.0), jnp.float32, 2 * C + F)
  assert not np.any(np.asarray(g_w)[~used]) and np.any(np.asarray(w_w)[~used])
  for name in ("w_in", "b_in", "w_out", "b_out"):
    _assert_order_close(g_p[name], w_p[name], jnp.float32, N + C + F, err_msg=name)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sum_rows_adds_each_tokens_slot_rows(dtype):
  """sum_rows against float64 sums of each token's slot rows, over the first `width` columns:
  empty slots (S) add nothing, and a token may use no slot or every one."""
  N, S, D, E = 37, 23, 24, 6
  rng = np.random.default_rng(0)
  slot = np.where(rng.random((N, E)) < 0.4, rng.integers(0, S, (N, E)), S)
  slot[0] = S
  slot[1] = np.arange(E)
  src_SD = jnp.asarray(rng.normal(size=(S, D)), dtype)
  rows = np.concatenate([np.asarray(src_SD, np.float64), np.zeros((1, D))])
  for width in (None, 16):
    want = rows[slot].sum(axis=1)[:, :width]
    got = jax.jit(sum_rows, static_argnums=2)(src_SD, jnp.asarray(slot, jnp.int32), width)
    assert got.shape == want.shape and got.dtype == dtype
    # float32 accumulation over E terms, then one rounding to dtype.
    atol = _order_tol(jnp.float32, E, np.abs(rows).max()) + float(jnp.finfo(dtype).eps) * (
        np.abs(want).max())
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=atol,
                               err_msg=f"width={width}")
    assert not np.any(np.asarray(got)[0])


def test_pair_slots_lays_pairs_out_by_expert_in_whole_tiles():
  used_NE = jnp.array([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]], jnp.float32)
  slot_NE, pair_S, group_E, num_slots = pair_slots(used_NE, capacity=6, tile=4)
  assert num_slots == (2 + 3) * 4  # ceil(6 / 4) tiles + one per expert
  assert group_E.tolist() == [4, 4, 4]  # 2 pairs each, padded to a tile
  S = num_slots
  assert slot_NE.tolist() == [[0, S, 8], [S, S, S], [1, 4, 9], [S, 5, S]]
  want_S = np.full(S, 4 * 3)
  for (t, e), slot in np.ndenumerate(np.asarray(slot_NE)):
    if slot < S:
      want_S[slot] = t * 3 + e
  assert pair_S.tolist() == want_S.tolist()
  # Fewer slots than pairs: the highest experts' pairs are dropped, never overwritten.
  slot_NE, pair_S, group_E, num_slots = pair_slots(used_NE, capacity=1, tile=1)
  assert num_slots == 4 and group_E.tolist() == [2, 2, 0]
  assert slot_NE.tolist() == [[0, 4, 4], [4, 4, 4], [1, 2, 4], [4, 3, 4]]
  assert pair_S.tolist() == [0, 6, 7, 10]


def test_slots_overflow_is_exactly_when_the_layout_drops_a_pair():
  """slots_overflow (what experts() checks before the sparse path) against what pair_slots
  does: over random routings of 12 tokens to 3 experts in tiles of 4 at capacities 1-36, it is
  true exactly where some pair gets no slot; never with ``capacity`` pairs or fewer; and it
  lets more pairs than ``capacity`` through where their groups fit whole tiles."""
  rng = np.random.default_rng(0)
  fitted_over_capacity = 0
  for _ in range(200):
    used_NE = rng.random((12, 3)) < rng.uniform(0.05, 0.95)
    capacity = int(rng.integers(1, 37))
    slot_NE, _, _, S = pair_slots(jnp.asarray(used_NE), capacity, tile=4)
    dropped = bool(np.any(np.asarray(slot_NE)[used_NE] == S))
    over = bool(slots_overflow(jnp.asarray(used_NE.sum(axis=0)), capacity, 4))
    assert over == dropped, (used_NE.sum(axis=0), capacity)
    if used_NE.sum() <= capacity:
      assert not over
    fitted_over_capacity += (not over) and used_NE.sum() > capacity
  assert fitted_over_capacity > 0
  # 9 pairs against a capacity of 4 in 12 slots: 8 + 1 fit (2 + 1 tiles), 6 + 5 do not (4).
  assert not slots_overflow(jnp.array([8, 1]), 4, 4)
  assert slots_overflow(jnp.array([6, 5]), 4, 4)


def test_expert_slots_give_every_expert_its_own_rows():
  used_NE = jnp.array([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]], jnp.float32)
  assert expert_rows(6, 3, 2, 4) == 2 and expert_rows(7, 3, 2, 4) == 4  # share 2, then 3 -> 4
  assert expert_rows(100, 3, 2, 4) == 4  # never more rows than tokens
  slot_NE, pair_S, S = expert_slots(used_NE, rows=2)
  assert S == 6
  assert slot_NE.tolist() == [[0, 6, 4], [6, 6, 6], [1, 2, 5], [6, 3, 6]]
  assert pair_S.tolist() == [0, 6, 7, 10, 2, 8]
  # One row each: an expert's later tokens are dropped, never written over another's slot.
  slot_NE, pair_S, S = expert_slots(used_NE, rows=1)
  assert slot_NE.tolist() == [[0, 3, 2], [3, 3, 3], [3, 1, 3], [3, 3, 3]]
  assert pair_S.tolist() == [0, 7, 2]


def test_pair_capacity_rounds_up_to_a_tile_and_stops_at_every_pair():
  assert pair_capacity(1000, 16, 0.25, 1.25, 128) == 5120  # 5000 -> 40 tiles
  assert pair_capacity(10, 4, 0.25, 1.25, 4) == 16  # 12.5 -> 13 -> 16
  assert pair_capacity(10, 4, 0.5, 3.0, 4) == 40  # 60 > every pair
  assert pair_capacity(10, 4, 1.0, 1.0, 16) == 40


def test_the_tuned_dispatch_defaults_are_the_config_defaults_and_stay_sparse_at_arc1_sizes():
  """moe.TILE_ROWS and moe.CAPACITY carry the measurements that chose them; the config and the
  bare module must use the same numbers. At them, a layer call of arc1's 32 x 2048 tokens (16
  experts, SDL target 4) lays out fewer rows than dense computes (5.5 of 16 a token for tiled,
  5 for batched), so the sparse impls are not replaced by dense outright (moe.experts)."""
  m = ModelConfig()
  assert (m.moe_tile, m.moe_capacity) == (moe.TILE_ROWS, moe.CAPACITY)
  assert (DynMoE.tile, DynMoE.capacity) == (moe.TILE_ROWS, moe.CAPACITY)
  N, E = 32 * 2048, 16
  capacity = pair_capacity(N, E, 0.25, moe.CAPACITY, moe.TILE_ROWS)
  assert capacity == 5 * N
  assert num_slots(capacity, moe.TILE_ROWS, E) == 5 * N + E * moe.TILE_ROWS < N * E
  assert E * expert_rows(capacity, E, moe.TILE_ROWS, N) == 5 * N


def test_auto_resolves_by_backend_and_the_start_line_names_it():
  assert resolve_impl("auto", "gpu") == AUTO_GPU_IMPL
  assert resolve_impl("auto", "cpu") == resolve_impl("auto", "tpu") == "dense"
  assert resolve_impl("tiled", "cpu") == "tiled"
  assert describe("auto", 1.25, "cpu") == "auto: dense"
  assert describe("dense", 1.25, "gpu") == "dense"
  assert describe("tiled", 1.5, "cpu") == \
      "tiled, capacity 1.5x the SDL target (dense under vmap)"
  if AUTO_GPU_IMPL != "dense":
    assert describe("auto", 1.25, "gpu") == \
        f"auto: {AUTO_GPU_IMPL}, capacity 1.25x the SDL target (teacher forcing only)"
  assert moe.auto_dense("auto") == "dense" and moe.auto_dense("tiled") == "tiled"
  with pytest.raises(ValueError, match="impl"):
    resolve_impl("sparse")
  # A model vmapped over examples runs no sparse dispatch (its cond would run both branches).
  assert [moe.vmap_impl(i) for i in ("ragged", "tiled", "batched", "dense", "reference")] == \
      ["dense", "dense", "dense", "dense", "reference"]
  assert moe.vmap_impl("auto", "cpu") == "auto"
  assert moe.vmap_impl("auto", "gpu") == ("auto" if AUTO_GPU_IMPL == "dense" else "dense")


SPARSE_KW = dict(num_experts=5, expert_hidden=12, fallback_k=2, target_active=0.25)


def _layer_setup(theta: float = 0.3):
  """x [2, 9, 8] with two padding tokens, parameters with non-zero biases, a fixed cotangent r
  of the output."""
  x_BTC = jax.random.normal(jax.random.key(0), (2, 9, 8))
  valid_BT = jnp.ones((2, 9), bool).at[1, 7:].set(False)
  params = DynMoE(impl="dense", **SPARSE_KW).init(jax.random.key(1), x_BTC, valid_BT)["params"]
  params = dict(params, b_in=0.1 + params["b_in"], b_out=0.2 + params["b_out"],
                thresholds=jnp.full((5,), theta))
  # Zero at padding, as every loss is: nothing reads a padding token's output.
  r_BTC = jnp.cos(jnp.arange(x_BTC.size).reshape(x_BTC.shape)) * valid_BT[..., None]
  return x_BTC, valid_BT, params, r_BTC


def _grad_fn(layer, traces: list | None = None):
  """jit(grad) of ``sum(y * r)`` w.r.t. (params, x), with (y, aux) as auxiliary outputs; one
  entry appended to ``traces`` per trace."""
  def loss(p, x, valid, r):
    if traces is not None:
      traces.append(None)
    y_BTC, aux = layer.apply({"params": p}, x, valid)
    return jnp.sum(y_BTC * r), (y_BTC, aux)
  return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))


def _pairs(aux, valid_BT) -> int:
  return int(round(float(aux["experts_per_token"]) * int(valid_BT.sum())))


def _overflows(impl: str, aux, valid_BT, factor: float) -> bool:
  """Whether the routing of ``aux`` exceeds what ``impl`` computes at capacity ``factor`` (the
  [2, 9] setup: 18 tokens, 5 experts, tile 4): the experts' groups in whole tiles against the
  slots, or one expert's tokens against its rows."""
  del valid_BT  # tokens_per_expert counts valid tokens only
  capacity = pair_capacity(18, 5, 0.25, factor, 4)
  count_E = np.asarray(aux["tokens_per_expert"]).round().astype(np.int32)
  if impl == "batched":
    return int(np.max(count_E)) > expert_rows(capacity, 5, 4, 18)
  return bool(slots_overflow(jnp.asarray(count_E), capacity, 4))


def test_reference_impl_is_the_dense_layer_by_autodiff():
  """impl="reference" (the benchmark's baseline) computes the dense layer, every gradient
  included (the gate's straight-through ones too), by autodiff of the definition."""
  x_BTC, valid_BT, params, r_BTC = _layer_setup()
  with jax.default_matmul_precision("float32"):
    (g_p, g_x), (y, _) = _grad_fn(DynMoE(impl="reference", **SPARSE_KW))(
        params, x_BTC, valid_BT, r_BTC)
    (w_p, w_x), (want, _) = _grad_fn(DynMoE(impl="dense", **SPARSE_KW))(
        params, x_BTC, valid_BT, r_BTC)
  N, C, F, E = 18, 8, 12, 5
  _assert_order_close(y, want, jnp.float32, C + F + E)
  _assert_order_close(g_x, w_x, jnp.float32, N + C + F + E)
  for name in EXPERT_LEAVES:
    _assert_order_close(g_p[name], w_p[name], jnp.float32, N + C + F + E, err_msg=name)
  assert describe("reference", 1.25, "gpu") == "reference"


@pytest.mark.parametrize("impl", SPARSE_IMPLS)
@pytest.mark.parametrize("capacity", [0.25, 0.5, 1.25, 2.0])
def test_sparse_impl_equals_dense(impl, capacity):
  """Same output (at real tokens) and same expert-weight gradients as the dense einsum, whether
  the routing fits the capacity's layout (sparse) or not (the dense fallback).

  Within capacity, the straight-through gradient that flows from experts a token does not use
  (through their weight w_te, 0 in the forward pass) into the gate, and from there into x,
  prototypes and thresholds, is not computed: those gradients differ, and must. A padding token
  uses no expert (output 0) in the sparse dispatch.
  """
  x_BTC, valid_BT, params, r_BTC = _layer_setup()
  sparse = DynMoE(impl=impl, tile=4, capacity=capacity, **SPARSE_KW)
  dense = DynMoE(impl="dense", **SPARSE_KW)
  with jax.default_matmul_precision("float32"):
    (g_p, g_x), (y, aux) = _grad_fn(sparse)(params, x_BTC, valid_BT, r_BTC)
    (w_p, w_x), (want, _) = _grad_fn(dense)(params, x_BTC, valid_BT, r_BTC)
  N, C, F, E = 18, 8, 12, 5
  overflow = _overflows(impl, aux, valid_BT, capacity)
  # 24 pairs (1.5 experts per real token), 7 / 5 / 3 / 6 / 3 per expert: 32 slots in whole
  # tiles of 4. Ragged and tiled: capacities of 8, 12, 32 and 48 pairs, layouts of 28, 32, 52
  # and 68 slots (so at 0.5 the 24 pairs over its 12 still take the sparse path); batched: 4,
  # 4, 8 and 12 rows per expert.
  assert overflow == (capacity == 0.25 or (impl == "batched" and capacity == 0.5))
  assert _pairs(aux, valid_BT) == 24
  valid = np.asarray(valid_BT)
  _assert_order_close(np.asarray(y)[valid], np.asarray(want)[valid], jnp.float32, C + F + E)
  for name in ("w_in", "b_in", "w_out", "b_out"):
    _assert_order_close(g_p[name], w_p[name], jnp.float32, N + C + F + E, err_msg=name)
  if overflow:  # the dense result, gate gradients included
    _assert_order_close(y, want, jnp.float32, C + F + E)
    _assert_order_close(g_x, w_x, jnp.float32, N + C + F + E)
  else:
    assert not np.any(np.asarray(y)[~valid])
    assert float(jnp.max(jnp.abs(g_x - w_x))) > 1e-3  # the unused experts' ST path


@pytest.mark.parametrize("impl", SPARSE_IMPLS)
def test_one_compiled_layer_overflows_in_one_call_and_fits_in_another(impl):
  """The pair count is data: the same compiled step takes the sparse path or the dense fallback
  by the routing of each call, and both equal dense."""
  x_BTC, valid_BT, _, r_BTC = _layer_setup()
  traces = []
  sparse_fn = _grad_fn(DynMoE(impl=impl, tile=4, capacity=1.25, **SPARSE_KW), traces)
  dense_fn = _grad_fn(DynMoE(impl="dense", **SPARSE_KW))
  seen = set()
  for theta in (0.3, -0.3):  # 24 pairs, then 59, against 32
    _, _, params, _ = _layer_setup(theta)
    with jax.default_matmul_precision("float32"):
      (g_p, _), (y, aux) = sparse_fn(params, x_BTC, valid_BT, r_BTC)
      (w_p, _), (want, _) = dense_fn(params, x_BTC, valid_BT, r_BTC)
    seen.add(_overflows(impl, aux, valid_BT, 1.25))
    valid = np.asarray(valid_BT)
    _assert_order_close(np.asarray(y)[valid], np.asarray(want)[valid], jnp.float32, 8 + 12 + 5)
    for name in ("w_in", "w_out"):
      _assert_order_close(g_p[name], w_p[name], jnp.float32, 18 + 8 + 12 + 5, err_msg=name)
  assert seen == {False, True}
  assert len(traces) == 1


@pytest.mark.parametrize("impl", SPARSE_IMPLS)
def test_few_tokens_compute_dense_outright(impl):
  """When the slot layout would hold as many rows as dense computes (a decoding step: one token
  per example), the layer is dense, gate gradients included."""
  x_BTC, _, params, _ = _layer_setup()
  x_BTC, valid_BT = x_BTC[:, :1], jnp.ones((2, 1), bool)
  r_BTC = jnp.cos(jnp.arange(x_BTC.size).reshape(x_BTC.shape))
  assert num_slots(pair_capacity(2, 5, 0.25, 1.25, 4), 4, 5) >= 2 * 5
  assert 5 * expert_rows(pair_capacity(2, 5, 0.25, 1.25, 4), 5, 4, 2) >= 2 * 5
  (g_p, g_x), (y, _) = _grad_fn(DynMoE(impl=impl, tile=4, **SPARSE_KW))(
      params, x_BTC, valid_BT, r_BTC)
  (w_p, w_x), (want, _) = _grad_fn(DynMoE(impl="dense", **SPARSE_KW))(
      params, x_BTC, valid_BT, r_BTC)
  np.testing.assert_array_equal(y, want)
  np.testing.assert_array_equal(g_x, w_x)
  for name in EXPERT_LEAVES:
    np.testing.assert_array_equal(g_p[name], w_p[name], err_msg=name)


@pytest.mark.parametrize("impl", SPARSE_IMPLS)
def test_sparse_impl_under_vmap_equals_dense(impl):
  """Under vmap the capacity cond is a select (both branches run): still the dense result,
  example by example, whichever of them overflow."""
  x_BTC, valid_BT, params, _ = _layer_setup()
  theta_XE = jnp.array([[0.3] * 5, [-0.3] * 5, [0.1] * 5])  # 24, 59 and 39 pairs of 32

  def apply(layer):
    def one(theta_E):
      return layer.apply({"params": dict(params, thresholds=theta_E)}, x_BTC, valid_BT)[0]
    return jax.jit(jax.vmap(one))(theta_XE)

  with jax.default_matmul_precision("float32"):
    y = apply(DynMoE(impl=impl, tile=4, capacity=1.25, **SPARSE_KW))
    want = apply(DynMoE(impl="dense", **SPARSE_KW))
  valid = np.broadcast_to(np.asarray(valid_BT), y.shape[:3])
  _assert_order_close(np.asarray(y)[valid], np.asarray(want)[valid], jnp.float32, 8 + 12 + 5)


@pytest.mark.parametrize("impl", SPARSE_IMPLS)
def test_sparse_impl_bfloat16_is_as_close_to_float32_as_dense(impl):
  """In bfloat16 the two round differently; the sparse result is no further from the float32
  definition than dense bfloat16 is (plus one rounding of the output)."""
  x_BTC, valid_BT, params, _ = _layer_setup()
  run = lambda layer: jax.jit(layer.apply)({"params": params}, x_BTC, valid_BT)[0]
  with jax.default_matmul_precision("float32"):
    exact = np.asarray(run(DynMoE(impl="dense", **SPARSE_KW)), np.float64)
  dense16 = np.asarray(run(DynMoE(impl="dense", dtype=jnp.bfloat16, **SPARSE_KW)), np.float64)
  sparse16 = run(DynMoE(impl=impl, tile=4, dtype=jnp.bfloat16, **SPARSE_KW))
  assert sparse16.dtype == jnp.bfloat16
  valid = np.asarray(valid_BT)
  dense_err = np.max(np.abs(dense16 - exact)[valid])
  sparse_err = np.max(np.abs(np.asarray(sparse16, np.float64) - exact)[valid])
  one_rounding = float(jnp.finfo(jnp.bfloat16).eps) * np.max(np.abs(exact))
  assert sparse_err <= 2 * dense_err + one_rounding


def test_tiny_model_trains_with_the_sparse_dispatch():
  """A few optimizer steps of a tiny Tiny-ONN with moe_impl=tiled reduce the loss, through the
  sparse path (every step's routing fits the capacity), from the same first loss as dense."""
  from conftest import tiny_config
  from onn_jax import steps
  from onn_jax.model.transformer import Transformer

  B, T = 2, 32
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 10, size=(B, T + 1)).astype(np.int32)
  batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
           "valid": jnp.ones((B, T), bool), "loss_mask": jnp.ones((B, T), jnp.float32),
           "answer_start": jnp.full((B,), T - 8, jnp.int32),
           "answer_len": jnp.full((B,), 8, jnp.int32)}
  losses = {}
  for impl in ("dense", "tiled"):
    cfg = tiny_config(
        model=dict(num_layers=1, moe_impl=impl, moe_capacity=2.0, moe_tile=4,
                   init_threshold=0.2),
        data=dict(buckets=[T]), train=dict(learning_rate=3e-3, warmup_steps=0, batch_size=B))
    model = Transformer(cfg.model)
    state = steps.init_state(cfg, model, jax.random.PRNGKey(0))
    step = jax.jit(lambda s, b: steps.train_step(s, b, model=model, cfg=cfg))
    capacity = pair_capacity(B * T, cfg.model.num_experts, cfg.model.sdl_target_active,
                             cfg.model.moe_capacity, cfg.model.moe_tile)
    losses[impl] = []
    for _ in range(8):
      state, metrics = step(state, batch)
      losses[impl].append(float(metrics["loss"]))
      if impl == "tiled":
        assert float(metrics["experts_per_token"]) * B * T <= capacity
  np.testing.assert_allclose(losses["tiled"][0], losses["dense"][0], rtol=1e-5)
  assert losses["tiled"][-1] < 0.9 * losses["tiled"][0]


def _cond_outputs(jaxpr) -> list:
  """The output avals of every cond in ``jaxpr`` and the jaxprs nested in its equations."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "cond":
      found += [v.aval for v in eqn.outvars]
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          found += _cond_outputs(inner)
  return found


@pytest.mark.parametrize("impl", SPARSE_IMPLS)
def test_sparse_gradient_saves_no_dense_activations(impl):
  """Differentiating the capacity cond saves the residuals of both branches (zeros for the one
  not taken). The dense fallback is rematerialised, so none of its [B, T, E, F] activations is
  a residual: on an H200 the sparse layer wrote five of them (5 GiB) on every call and ran at
  7.4 ms instead of 3.4."""
  x_BTC, valid_BT, params, r_BTC = _layer_setup()
  layer = DynMoE(impl=impl, tile=4, capacity=1.25, **SPARSE_KW)
  loss = lambda p, x: jnp.sum(layer.apply({"params": p}, x, valid_BT)[0] * r_BTC)
  outs = _cond_outputs(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params, x_BTC).jaxpr)
  assert outs, "the sparse layer differentiates through its capacity cond"
  per_expert_activations = x_BTC.shape[:2] + (SPARSE_KW["num_experts"],)
  assert not [a.shape for a in outs if a.ndim == 4 and a.shape[:3] == per_expert_activations]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_fallback_experts_match_top_k_ties_to_the_lower_index(k):
  """k = 1 takes an argmax instead of lax.top_k's sort: the same experts, ties included."""
  s = jnp.asarray([[[0.5, 0.9, 0.9, 0.1], [0.2, 0.2, 0.2, 0.2], [-1.0, 0.3, -0.5, 0.3]]],
                  jnp.float32)
  _, top = jax.lax.top_k(s, k)
  want = np.sum(np.eye(4, dtype=np.float32)[np.asarray(top)], axis=-2)
  got = np.asarray(fallback_experts(s, k))
  np.testing.assert_array_equal(got, want)
  if k == 1:
    np.testing.assert_array_equal(got.argmax(-1), [[1, 0, 1]])  # the lower of tied indices
