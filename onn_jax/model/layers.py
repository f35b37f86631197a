"""Small pieces shared by the model's modules: dtype names and rotary position embedding."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def dtype_of(name: str) -> Any:
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def apply_rope(x_BTnD: jax.Array, pos_BT: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (Su et al. 2021), rotate-half form, computed in float32."""
  half = x_BTnD.shape[-1] // 2
  freq_F = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BTF = pos_BT.astype(jnp.float32)[..., None] * freq_F
  cos_BT1F = jnp.cos(angle_BTF)[:, :, None, :]
  sin_BT1F = jnp.sin(angle_BTF)[:, :, None, :]
  x = x_BTnD.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos_BT1F - x2 * sin_BT1F, x2 * cos_BT1F + x1 * sin_BT1F], -1)
  return out.astype(x_BTnD.dtype)
