"""GPU check: nsa_pallas.decode_output (the NSA layer's output product, the residual add and
the DynMoE's RMSNorm in one kernel) against XLA's (decode_output_reference), at arc1's sizes
(bf16, 32 rows, 8 heads x 32 = 256 inputs, d_model 256): the sum within one bfloat16 rounding of
the product's (the product's float32 accumulation in another order may round the other way),
the norm within an ulp of each.

`PYTHONPATH=$PWD python docs/bench/decode_output_check_dev.py` on a GPU machine."""
import jax
import jax.numpy as jnp
import numpy as np

from onn_jax.model import nsa_pallas

B, K, C = 32, 256, 256
dt = jnp.bfloat16
k = jax.random.split(jax.random.PRNGKey(0), 4)
o_BK = jax.random.normal(k[0], (B, K)).astype(dt)
w_KC = 0.06 * jax.random.normal(k[1], (K, C))
x_BC = (3.0 * jax.random.normal(k[2], (B, C))).astype(dt)
scale_C = 1.0 + 0.3 * jax.random.normal(k[3], (C,))
got = jax.jit(lambda *a: nsa_pallas.decode_output(*a, 1e-6, False))(o_BK, w_KC, x_BC, scale_C)
want = jax.jit(lambda *a: nsa_pallas.decode_output_reference(*a, norm_eps=1e-6))(
    o_BK, w_KC, x_BC, scale_C)
ulp = 2.0 ** -8
f32 = [np.asarray(a, np.float32) for a in (*got, *want)]
y = np.abs(np.asarray(jnp.dot(o_BK.astype(jnp.float32), w_KC.astype(dt).astype(jnp.float32))))
h_err = np.abs(f32[0] - f32[2])
h_ok = bool(np.all(h_err <= ulp * (y + np.abs(f32[2]))))
n_err = np.abs(f32[1] - f32[3])
# A sum an ulp apart, or the row's mean square reduced in another order: an ulp of bfloat16
# (at most 2**-7 of a value) apart, each way.
n_ok = bool(np.all(n_err <= 2 * 2.0 ** -7 * np.abs(f32[3])))
print("DECODE_OUTPUT_CHECK", "passed" if h_ok and n_ok else "FAILED",
      f"sum: {int((h_err > 0).sum())} of {h_err.size} differ, largest {h_err.max():.3g}; "
      f"norm: {int((n_err > 0).sum())} differ, largest {n_err.max():.3g}")
