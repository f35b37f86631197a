"""GPU check (session 42): nsa_pallas.decode_block_write against decode_block then write_cache,
bit for bit, at arc1's sizes (32 rows, a 2048-slot cache, G=2, D=32, blocks of 16 every 8).
Run from the repository root on a GPU: `PYTHONPATH=. python docs/bench/block_write_check_dev.py`
(raw: block_write_check_s42_call4_h100_2026-12-07.txt)."""

import jax
import jax.numpy as jnp
import numpy as np

from onn_jax.model import nsa_pallas

B, S, G, D, N, L, STRIDE = 32, 2048, 2, 32, 255, 16, 8
DT = jnp.bfloat16
TOKEN_ROWS = (0, 1)
GEOMETRY = (("block_len", L), ("block_stride", STRIDE))


def main():
  keys = iter(jax.random.split(jax.random.PRNGKey(0), 16))

  def normal(shape, scale=1.0):
    return (scale * jax.random.normal(next(keys), shape)).astype(DT)

  token_arrays = tuple(normal((B, S, G, D)) for _ in range(6))
  block_arrays = tuple(normal((B, N, G, D)) for _ in range(2))
  tokens = normal((6, B, G, D))
  weights = (normal((2, L, D, 2 * D), 0.1), normal((2, 2 * D), 0.1).astype(jnp.float32),
             normal((2, 2 * D, D), 0.1))
  bias = normal((2, D))
  pos = jnp.asarray(np.random.default_rng(0).integers(0, S, B), jnp.int32)
  pos = pos.at[:4].set(jnp.array([15, 23, 1000, 2047]))
  start = pos - L + 1
  block = jnp.maximum(start, 0) // STRIDE
  slot = jnp.where((start >= 0) & (start % STRIDE == 0) & (block < N), block, N)

  def two_kernels(t, tok, b):
    blocks = nsa_pallas.decode_block(tuple(t[n] for n in TOKEN_ROWS), tok, pos, weights,
                                     TOKEN_ROWS, GEOMETRY, False)
    return nsa_pallas.write_cache(t, tok, pos, b, blocks.astype(b[0].dtype), slot, False, bias)

  def one_kernel(t, tok, b):
    return nsa_pallas.decode_block_write(t, tok, pos, b, slot, weights, bias, TOKEN_ROWS,
                                         GEOMETRY, False)

  want = jax.jit(two_kernels)(token_arrays, tokens, block_arrays)
  got = jax.jit(one_kernel)(token_arrays, tokens, block_arrays)
  bad = [i for i, (g, w) in enumerate(zip(got, want))
         if not np.array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))]
  print("BLOCK_WRITE_CHECK", "bit-identical" if not bad else f"arrays differ: {bad}",
        "rows completing a block:", int((slot < N).sum()))


if __name__ == "__main__":
  main()
