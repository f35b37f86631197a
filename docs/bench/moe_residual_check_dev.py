"""GPU check: the DynMoE decoding kernel adding the residual (moe_pallas.DEC_RESIDUAL) against
the same kernel without it, at arc1's sizes (bf16, 32 rows, d_model 256, 16 experts x 512
hidden units, routing in the kernel): every partial but the first bit-identical, the first one
the other's plus the residual within a few float32 roundings (below).

`PYTHONPATH=$PWD python docs/bench/moe_residual_check_dev.py` on a GPU machine."""
import jax
import jax.numpy as jnp
import numpy as np

from onn_jax.model import moe, moe_pallas

B, C, E, F = 32, 256, 16, 512
dt = jnp.bfloat16
keys = iter(jax.random.split(jax.random.PRNGKey(0), 8))


def normal(shape, scale=1.0):
  return scale * jax.random.normal(next(keys), shape)


x_BC, r_BC = normal((B, C)).astype(dt), normal((B, C), 3.0).astype(dt)
w_in, w_out = normal((E, C, F), 0.06).astype(dt), normal((E, F, C), 0.04).astype(dt)
b_in, b_out = normal((E, F), 0.1).astype(dt), normal((E, C), 0.1).astype(dt)
unit_EC = moe._normalise(normal((E, C)))
gate = (unit_EC, jnp.full((E,), 0.02), dict(eps=moe.NORM_EPS, combine="mean", fallback_k=1))
run = jax.jit(lambda r: moe_pallas.decode_partials(x_BC, None, w_in, b_in, w_out, b_out,
                                                   interpret=False, gate=gate, residual_BC=r))
without = np.asarray(run(None))
with_r = np.asarray(run(r_BC))
rest_equal = np.array_equal(with_r[1:], without[1:])
first = without[0] + np.asarray(r_BC, np.float32)
# Each side sums y, the bias term and r with two or three float32 roundings (the kernel's
# bias and residual perhaps in one fused multiply-add), each within half an ulp of a value no
# larger than |y + b| + |r| plus the largest partial (y and b may cancel); and Triton may fold
# the added terms into the product's accumulator, whose sum over the tile's hidden units then
# rounds at the larger magnitude at every step: on the H100 (session 43) the error reached 4.3
# float32 eps of this bound (3 failed), so 8 bound it.
bound = (np.abs(without[0]) + np.abs(np.asarray(r_BC, np.float32))
         + float(np.max(np.abs(without[0]))))
err = float(np.max(np.abs(with_r[0] - first) / bound))
ok = rest_equal and err <= 8 * np.finfo(np.float32).eps
print("MOE_RESIDUAL_CHECK", "passed" if ok else "FAILED", f"partials {with_r.shape}, the rest "
      f"bit-identical: {rest_equal}, first partial's largest error {err:.2e} of the bound")
