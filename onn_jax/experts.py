"""Expert homeostasis: periodic reset of dead DynMoE experts.

A pure transform of (params, optimizer state, routing statistics, rng). An expert that
received no token during the last window gets fresh weights, prototype and threshold, and
zero Adam moments; every other leaf is returned bit-identical.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from onn_jax.config import ModelConfig
from onn_jax.model.moe import EXPERT_LEAVES, init_expert_params

_LAYER = re.compile(r"block_(\d+)$")


def _moe_leaf(path) -> tuple[int, str] | None:
  """(layer, leaf name) when ``path`` ends in ``block_i / moe / <expert leaf>``, else None."""
  keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
  for i in range(len(keys) - 2):
    match = _LAYER.match(str(keys[i]))
    if match and keys[i + 1] == "moe" and keys[i + 2] in EXPERT_LEAVES and i + 3 == len(keys):
      return int(match.group(1)), keys[i + 2]
  return None


def _rows_where(dead_E: jax.Array, new, old):
  mask = dead_E.reshape((-1,) + (1,) * (old.ndim - 1))
  return jnp.where(mask, new.astype(old.dtype), old)


def reset_dead_experts(params, opt_state, window_tokens_LE: jax.Array, rng: jax.Array,
                       cfg: ModelConfig, ema=None):
  """Re-initialises the experts with zero routed tokens in the window.

  Args:
    params: model parameters (``block_i/moe/{prototypes, thresholds, w_in, ...}``, leading
      expert axis).
    opt_state: optimizer state; every leaf that mirrors a DynMoE leaf (Adam's first and second
      moments) gets zero rows for the reset experts. Counters and other leaves are untouched.
    window_tokens_LE: tokens routed to each expert of each layer since the last reset.
    ema: optional parameter EMA; reset rows take the fresh values.

  Returns ``(params, opt_state, ema, dead_LE)``.
  """
  dead_LE = window_tokens_LE == 0
  layer_rngs = jax.random.split(rng, cfg.num_layers)
  fresh = [init_expert_params(layer_rngs[i], cfg.num_experts, cfg.d_model, cfg.expert_hidden,
                              cfg.init_threshold) for i in range(cfg.num_layers)]

  def reset_param(path, leaf):
    where = _moe_leaf(path)
    if where is None:
      return leaf
    layer, name = where
    return _rows_where(dead_LE[layer], fresh[layer][name], leaf)

  def zero_moment(path, leaf):
    where = _moe_leaf(path)
    if where is None or leaf.ndim == 0:
      return leaf
    return _rows_where(dead_LE[where[0]], jnp.zeros_like(leaf), leaf)

  params = jax.tree_util.tree_map_with_path(reset_param, params)
  opt_state = jax.tree_util.tree_map_with_path(zero_moment, opt_state)
  if ema is not None and jax.tree.leaves(ema):
    ema = jax.tree_util.tree_map_with_path(reset_param, ema)
  return params, opt_state, ema, dead_LE
