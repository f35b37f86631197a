"""An XLA:CPU miscompilation met in session 36 (jax 0.10.0 and 0.10.2, CPU): a rotary embedding
written into one slice of a stacked array with ``.at[0].set`` gives, under ``jax.jit``, values
that neither eager JAX nor NumPy give (the rotated half of some rows is off by up to ~1.9).
``attention.nsa.NSAttention._completed_blocks`` stacks the slices instead. Probably the open
openxla/xla#49176 (an in-place dynamic-update-slice fusion on CPU that reads its own output
when the update is computed from a slice of the operand). Run:
``JAX_PLATFORMS=cpu python docs/bench/xla_cpu_rope_update_miscompile.py``."""
import jax
import jax.numpy as jnp
import numpy as np


def rope(x, pos):  # [B, T, n, D], [B, T]: rotate-half, as onn_jax.model.layers.apply_rope
  half = x.shape[-1] // 2
  freq = 10000.0 ** (-jnp.arange(half, dtype=jnp.float32) / half)
  ang = pos.astype(jnp.float32)[..., None] * freq
  c, s = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 1, 2, 4))
pos = jnp.array([7, 19, 11])
f = lambda x, p: x[:, :, 0].at[0].set(rope(x[0], p[:, None])[:, 0])  # noqa: E731
g = lambda x, p: jnp.stack([rope(x[0], p[:, None])[:, 0], x[:, :, 0][1]])  # noqa: E731
eager, jitted, stacked = f(x, pos), jax.jit(f)(x, pos), jax.jit(g)(x, pos)
print(jax.__version__, jax.default_backend())
print("max |jit(.at.set) - eager| =", float(np.abs(eager - jitted).max()))
print("max |jit(stack) - eager|   =", float(np.abs(eager - stacked).max()))
