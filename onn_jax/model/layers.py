"""Small pieces shared by the model's modules: dtype names, rotary position embedding and the
values a decoding step computes from the parameters alone."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


# The variable collection of the values a decoding step computes from the parameters alone (the
# compressors' weights stacked, the experts' unit prototypes, ...): decode.generate computes
# them once, before its loop (decode.HOIST_CONSTS), and gives them to every step; a step given
# none computes them itself.
DECODE_CONSTS = "decode_consts"


def decode_const(module, name: str, fn) -> Any:
  """``fn()``, a value of ``module``'s parameters alone that its decoding step reads: from the
  DECODE_CONSTS collection where given, else computed (and put there where that collection is
  mutable: decode.decode_constants)."""
  if module.has_variable(DECODE_CONSTS, name):
    return module.get_variable(DECODE_CONSTS, name)
  value = fn()
  if module.is_mutable_collection(DECODE_CONSTS) and not module.is_initializing():
    module.put_variable(DECODE_CONSTS, name, value)
  return value


# The epsilon of the model's RMS norms (transformer.RMSNorm; the decoding kernels that apply one).
RMS_EPS = 1e-6


def rms_norm(x: jax.Array, scale: jax.Array, eps: float = RMS_EPS) -> jax.Array:
  """RMSNorm of ``x`` over its last axis with gains ``scale``, in float32, rounded once to x's
  dtype (the model's norms, and the decoding kernels that apply one to their input)."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1) + eps)[..., None]
  return (x32 * scale.astype(jnp.float32)).astype(x.dtype)


def dtype_of(name: str) -> Any:
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def rope_cos_sin(pos: jax.Array, half: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """The rotary angles' cosines and sines at integer positions ``pos`` (any shape): float32
  [..., half] each, frequency i ``theta ** (-i / half)``."""
  freq_F = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = pos.astype(jnp.float32)[..., None] * freq_F
  return jnp.cos(angle), jnp.sin(angle)


def rotate_half(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """``x`` [..., D] rotated by angles whose cosines and sines [..., D/2] broadcast against its
  halves (rotate-half form), in float32, rounded once to x's dtype."""
  half = x.shape[-1] // 2
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def apply_rope(x_BTnD: jax.Array, pos_BT: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (Su et al. 2021), rotate-half form, computed in float32."""
  cos_BTF, sin_BTF = rope_cos_sin(pos_BT, x_BTnD.shape[-1] // 2, theta)
  return rotate_half(x_BTnD, cos_BTF[:, :, None, :], sin_BTF[:, :, None, :])
