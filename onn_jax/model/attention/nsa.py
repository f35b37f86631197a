"""NSA attention layer (Yuan et al. 2025): projections, RoPE, block compression, gates, cache.

The attention arithmetic itself is :func:`onn_jax.model.nsa.nsa_core` (the "NSA core", one
pure function for training, prefill and decode); this layer owns what surrounds it.

Paper: three branches with their own keys/values (sec. 3.3), compressed keys/values from a
learned MLP over blocks of ``block_len`` keys every ``block_stride`` tokens with intra-block
position information (eq. 7), sigmoid branch gates from the token's features (eq. 5).
Our choices: one fused k/v projection for the three branches; the compressor (one per k and
v) is shared across GQA groups; selected and window keys carry RoPE, compressed keys do not
(their position comes from the compressor).

Cache (one layer): ``k_cmp_raw, v_cmp_raw, k_slc, v_slc, k_win, v_win`` [B, S, G, D] and
``k_cmp, v_cmp`` [B, N, G, D] (the N compressed blocks that fit in capacity S).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from onn_jax.config import ModelConfig
from onn_jax.model import nsa, nsa_pallas
from onn_jax.model.attention.full import branch_positions, extend_keys
from onn_jax.model.layers import apply_rope, decode_const, dtype_of, rope_cos_sin

KV_NAMES = ("k_cmp_raw", "v_cmp_raw", "k_slc", "v_slc", "k_win", "v_win")
CMP_NAMES = (("k_cmp", "k_cmp_raw"), ("v_cmp", "v_cmp_raw"))

# Where the gate reads the layer's input (model.gate_hidden = 0), the three input projections
# (q_proj, kv_proj, gate_proj: their parameters unchanged) run as one product against their
# kernels side by side. In the backward its cotangent [B*T, (H + 6G) * D + 3H] is then
# assembled once, by one concatenation (the product split, not sliced), and read by both
# products (the kernels' and x's gradients); with three products XLA assembled the six
# key/value cotangents for kv_proj's kernel gradient and then all of them again in one
# concatenated operand for x's gradient (H100, arc1 layer at 32 x 2048: 77 + 75 us of 3.59 ms
# of kernels, docs/benchmarks.md session 30; now one fusion of 143 us, which also holds the
# RoPE and compressor backward passes, of 3.36 ms). With BRANCH_OUT_DTYPE (nsa_pallas), the
# layer back to back (H100, jax 0.11.2, session 31, one process, alternated twice): 3.40 /
# 3.41 ms against 3.55 / 3.51 before both at 32 x 2048, 4.38 / 4.39 against 4.54 / 4.57 at
# 8 x 8192. False: three products (train.nsa_kernel_check variant proj_three).
FUSED_INPUT_PROJECTION = True


# The compressors' first layer (a [B, N, G, L*D] x [L*D, 2D] product with a float32 result,
# summed with its position and bias terms in float32 and rounded once to the compute dtype):
# its backward takes the cotangent in the compute dtype ("compute") or in float32 ("float32",
# before session 31). The cotangent reaches it through that one rounding's transpose, so its
# values are the compute dtype's either way and "compute" computes the same exact products
# (float32 accumulation kept), as bfloat16 products where "float32" ran float32 ones: on an
# H100 the 32 x 2048 layer's compressor backward ran ~100 us of float32 products (two cuBLAS
# TF32 products and four Triton ones, docs/benchmarks.md session 31). H100, session 32, the
# layer back to back: 3.33 / 3.31 ms against 3.36 / 3.35 at 32 x 2048 (within the spread;
# train.nsa_kernel_check variant cmp_grad_f32 restores the former).
COMPRESSOR_COTANGENT = "compute"

# One-token decoding with NSA's write kernel and the completed compressed block computed in XLA
# (nsa.PALLAS_DECODE "fused_xla_block", the default): the compressors' last bias is added in the
# write kernel (True) or by XLA (False, before session 36), which fused it into a launch a layer
# of its own (with the unstacking and restacking of the two blocks; deviceless sm_90, arc1
# rollout step of 32 rows: 160.5 -> 155.25 launches). The same numbers either way (the bias
# added in float32 and rounded once). train.nsa_kernel_check variant block_bias_xla: False.
BLOCK_BIAS_IN_WRITE = True


@jax.custom_vjp
def _product_grad_in_dtype(x: jax.Array, w: jax.Array) -> jax.Array:
  """``x @ w`` (operands in one dtype) with a float32 result; its backward rounds the
  cotangent to the operands' dtype before its two products (float32 accumulation)."""
  return jnp.einsum("...f,fo->...o", x, w, preferred_element_type=jnp.float32)


def _product_grad_in_dtype_fwd(x, w):
  return _product_grad_in_dtype(x, w), (x, w)


def _product_grad_in_dtype_bwd(res, g):
  x, w = res
  g = g.astype(x.dtype)
  dx = jnp.einsum("...o,fo->...f", g, w, preferred_element_type=jnp.float32)
  dw = jnp.einsum("...f,...o->fo", x, g, preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_product_grad_in_dtype.defvjp(_product_grad_in_dtype_fwd, _product_grad_in_dtype_bwd)


class _Linear(nn.Module):
  """The parameters of an ``nn.Dense`` with ``in_features`` inputs (the same ``kernel`` and
  ``bias`` names, shapes and initialisers), applied by row blocks of the kernel
  (:meth:`partial`)."""
  in_features: int
  features: int
  dtype: Any
  param_dtype: Any

  def setup(self):
    self.kernel = self.param("kernel", nn.initializers.lecun_normal(),
                             (self.in_features, self.features), self.param_dtype)
    self.bias = self.param("bias", nn.initializers.zeros_init(), (self.features,),
                           self.param_dtype)

  def partial(self, x: jax.Array, row0: int, activations: bool = False) -> jax.Array:
    """``x @ kernel[row0 : row0 + x.shape[-1]]``: operands in ``dtype``, float32 result;
    ``activations``: x is a row's keys (not a parameter), whose product's backward follows
    COMPRESSOR_COTANGENT."""
    if not (0 <= row0 and row0 + x.shape[-1] <= self.in_features):
      raise ValueError(f"_Linear.partial: rows {row0}..{row0 + x.shape[-1]} of a kernel "
                       f"with {self.in_features}")
    if COMPRESSOR_COTANGENT not in ("compute", "float32"):
      raise ValueError(f"attention.nsa.COMPRESSOR_COTANGENT must be 'compute' or 'float32', "
                       f"got {COMPRESSOR_COTANGENT!r}")
    w = self.kernel[row0:row0 + x.shape[-1]].astype(self.dtype)
    if activations and COMPRESSOR_COTANGENT == "compute":
      return _product_grad_in_dtype(x.astype(self.dtype), w)
    return jnp.einsum("...f,fo->...o", x.astype(self.dtype), w,
                      preferred_element_type=jnp.float32)


class BlockCompressor(nn.Module):
  """phi of NSA eq. (7): a compressed key (value) from one block of ``block_len`` keys.

  Each key gets a learned intra-block position embedding, the block is flattened and an MLP
  maps it to one vector. Shared across GQA groups. ``__call__`` compresses given blocks
  [B,N,L,G,D] (decoding: one block at a time); :meth:`from_row` every block of a row.
  Both add the position embedding after the first product (its share is one constant vector,
  by linearity) and sum in float32, so they agree to float32 rounding before the one cast.
  """
  block_len: int
  head_dim: int
  dtype: Any
  param_dtype: Any

  def setup(self):
    L, D = self.block_len, self.head_dim
    self.block_pos = self.param("block_pos", nn.initializers.normal(0.02), (L, D),
                                self.param_dtype)
    self.fc1 = _Linear(L * D, 2 * D, self.dtype, self.param_dtype)
    self.fc2 = nn.Dense(D, dtype=self.dtype, param_dtype=self.param_dtype)

  def _finish(self, h_f32: jax.Array, bias: bool = True) -> jax.Array:
    """The first layer's product of the keys (float32) -> the compressed vectors (without the
    second layer's bias unless ``bias``: a caller that adds it itself, in the vectors' dtype)."""
    pos_O = self.fc1.partial(self.block_pos.reshape(-1), 0)
    h = h_f32 + (pos_O + self.fc1.bias.astype(jnp.float32))
    a = nn.gelu(h.astype(self.dtype))
    if bias:
      return self.fc2(a)
    # nn.Dense's product (its dtype's operands and result), without the bias.
    kernel = self.fc2.variables["params"]["kernel"].astype(self.dtype)
    return jax.lax.dot_general(a, kernel, (((a.ndim - 1,), (0,)), ((), ())))

  def kernel_weights(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The compressor as arrays for ``nsa_pallas.write_cache_compress``: the first layer's
    kernel by key [L, D, 2D] (compute dtype), its constant term (position embedding's share
    plus bias, float32 [2D]), the second layer's kernel [2D, D] and bias [D] (compute dtype)."""
    L, D = self.block_len, self.head_dim
    const_O = self.fc1.partial(self.block_pos.reshape(-1), 0) + self.fc1.bias.astype(jnp.float32)
    return (self.fc1.kernel.astype(self.dtype).reshape(L, D, 2 * D), const_O,
            self.fc2.variables["params"]["kernel"].astype(self.dtype),
            self.fc2.variables["params"]["bias"].astype(self.dtype))

  def __call__(self, blocks_BNLGD: jax.Array, bias: bool = True) -> jax.Array:
    B, N, L, G, D = blocks_BNLGD.shape
    x_BNGF = blocks_BNLGD.transpose(0, 1, 3, 2, 4).reshape(B, N, G, L * D)
    return self._finish(self.fc1.partial(x_BNGF, 0, activations=True), bias)

  def from_row(self, raw_BSGD: jax.Array, num_blocks: int, block_stride: int) -> jax.Array:
    """[B, S, G, D] raw keys -> [B, N, G, D]: block i summarises [i*stride, i*stride + len).

    When ``block_len`` is m strides, block i is the stride-chunks i..i+m-1, so the first layer
    is m products of the row's chunks with row blocks of its kernel, added with a shift of k
    chunks: no [B,N,L,G,D] copy of the keys and no scatter in the backward pass. Other
    geometries gather the blocks."""
    B, S, G, D = raw_BSGD.shape
    L, s, N = self.block_len, block_stride, num_blocks
    if N == 0:
      return jnp.zeros((B, 0, G, D), raw_BSGD.dtype)
    if L % s:
      idx_NL = jnp.arange(N)[:, None] * s + jnp.arange(L)[None, :]
      return self(raw_BSGD[:, idx_NL])
    m = L // s
    C = N + m - 1  # chunks of s keys that hold the N blocks
    x = raw_BSGD[:, :C * s].reshape(B, C, s, G, D).transpose(0, 1, 3, 2, 4)
    x_BCGF = x.reshape(B, C, G, s * D)
    return self._finish(sum(self.fc1.partial(x_BCGF[:, k:k + N], k * s * D, activations=True)
                            for k in range(m)))


def init_layer_cache(cfg: ModelConfig, batch: int, capacity: int) -> dict[str, jax.Array]:
  """One layer's empty NSA cache for ``capacity`` positions (compute dtype)."""
  dt = dtype_of(cfg.compute_dtype)
  G, D = cfg.num_kv_groups, cfg.head_dim
  n = nsa.num_compressed_blocks(capacity, cfg.block_len, cfg.block_stride)
  layer = {name: jnp.zeros((batch, capacity, G, D), dt) for name in KV_NAMES}
  layer.update(k_cmp=jnp.zeros((batch, n, G, D), dt), v_cmp=jnp.zeros((batch, n, G, D), dt))
  return layer


class NSAttention(nn.Module):
  """Native Sparse Attention layer; see the module docstring.

  ``__call__(x_BTC, valid_BT=None, *, mode, cache, pos_B, norm) -> (out_BTC, new_cache, aux)``
  (the attention interface of :mod:`onn_jax.model.attention`; ``aux`` is empty; ``norm``, the
  block's RMSNorm of an un-normalised ``x_BTC`` where decoding, applied by the input-products
  kernel where ``nsa_pallas.INPUTS_NORM``).
  """
  cfg: ModelConfig

  def setup(self):
    c = self.cfg
    dt, pdt = dtype_of(c.compute_dtype), dtype_of(c.param_dtype)
    H, G, D = c.num_heads, c.num_kv_groups, c.head_dim
    self.q_proj = nn.Dense(H * D, use_bias=False, dtype=dt, param_dtype=pdt)
    # The three branches have their own keys and values (NSA sec. 3.3): one fused projection.
    self.kv_proj = nn.Dense(6 * G * D, use_bias=False, dtype=dt, param_dtype=pdt)
    self.k_compressor = BlockCompressor(c.block_len, D, dt, pdt)
    self.v_compressor = BlockCompressor(c.block_len, D, dt, pdt)
    if c.gate_hidden:
      self.gate_hidden = nn.Dense(c.gate_hidden, dtype=dt, param_dtype=pdt)
    self.gate_proj = nn.Dense(H * 3, dtype=dt, param_dtype=pdt)
    self.out_proj = nn.Dense(c.d_model, use_bias=False, dtype=dt, param_dtype=pdt)

  def _project(self, x_BTC, pos_BT):
    """Queries (rotated, and the compressed branch's per ``model.cmp_rope``) [B,T,H,D], the
    six per-branch key/value arrays [B,T,G,D], gates."""
    c = self.cfg
    B, T, _ = x_BTC.shape
    H, G, D = c.num_heads, c.num_kv_groups, c.head_dim
    q_raw, kv, gate_logits = self._input_products(x_BTC)
    q_raw_BTHD = q_raw.reshape(B, T, H, D)
    q_BTHD = apply_rope(q_raw_BTHD, pos_BT, c.rope_theta)
    # "none": compressed keys carry position only through the compressor, so the compressed
    # branch (and with it block selection) scores them with the unrotated query: scores do
    # not depend on the query's absolute position. "both": the keys are rotated at their
    # block's last position (see _rotate_cmp), the query as usual: relative positions.
    # "query": rotated query against unrotated keys (before 2026-11-30; position-dependent).
    q_cmp_BTHD = q_raw_BTHD if c.cmp_rope == "none" else q_BTHD
    # Split, not indexed: the backward then concatenates the six cotangents (an index's
    # transpose is a zero pad, and the six pads' sum cost more than a concatenation).
    kv_parts = jnp.split(kv.reshape(B, T, 6, G, D), 6, axis=2)
    new = dict(zip(KV_NAMES, [x.reshape(B, T, G, D) for x in kv_parts]))
    # Selected and window keys carry RoPE; compressed keys get position from the compressor.
    new["k_slc"] = apply_rope(new["k_slc"], pos_BT, c.rope_theta)
    new["k_win"] = apply_rope(new["k_win"], pos_BT, c.rope_theta)
    gates_BTH3 = jax.nn.sigmoid(gate_logits.astype(jnp.float32)).reshape(B, T, H, 3)
    return (q_BTHD, q_cmp_BTHD), new, gates_BTH3.astype(q_BTHD.dtype)

  def _input_products(self, x_BTC):
    """``q_proj(x)``, ``kv_proj(x)`` and the gate's logits, in the compute dtype: one product
    where the gate reads x (FUSED_INPUT_PROJECTION), the same values as the three modules'
    up to the products' float32 summation order."""
    c = self.cfg
    if c.gate_hidden or not FUSED_INPUT_PROJECTION or self.is_initializing():
      h = nn.gelu(self.gate_hidden(x_BTC)) if c.gate_hidden else x_BTC
      return self.q_proj(x_BTC), self.kv_proj(x_BTC), self.gate_proj(h)
    dt = self.q_proj.dtype
    # The modules are built in setup with nn.Dense's default precision and dot_general; one
    # given others would need them here too (or the three products).
    mods = (self.q_proj, self.kv_proj, self.gate_proj)
    kernels = [m.variables["params"]["kernel"].astype(dt) for m in mods]
    # As nn.Dense: operands in the compute dtype, the product's result in it too.
    y = jax.lax.dot_general(x_BTC.astype(dt), jnp.concatenate(kernels, axis=1),
                            (((x_BTC.ndim - 1,), (0,)), ((), ())))
    # Split (its backward one concatenation, as above).
    q_raw, kv, gate = jnp.split(y, np.cumsum([k.shape[1] for k in kernels])[:-1], axis=-1)
    return q_raw, kv, gate + self.gate_proj.variables["params"]["bias"].astype(dt)

  def _core(self, qs, kv, k_cmp, v_cmp, gates, q_offset, segment_start_BT=None):
    c = self.cfg
    q_BTHD, q_cmp_BTHD = qs
    return nsa.nsa_core(
        q_BTHD, k_cmp, v_cmp, kv["k_slc"], kv["v_slc"], kv["k_win"], kv["v_win"], gates,
        block_len=c.block_len, block_stride=c.block_stride, select_len=c.select_len,
        num_select=c.num_select, window=c.window, q_offset=q_offset, impl=c.nsa_impl,
        q_cmp=q_cmp_BTHD, segment_start=segment_start_BT)

  def _rotate_cmp(self, k_cmp_BNGD, block_BN, shift_BN=0):
    """``cmp_rope="both"``: compressed key of block i rotated at its last position (minus
    ``shift_BN``, the start of its sequence in a packed row)."""
    c = self.cfg
    if c.cmp_rope != "both":
      return k_cmp_BNGD
    return apply_rope(k_cmp_BNGD, block_BN * c.block_stride + c.block_len - 1 - shift_BN,
                      c.rope_theta)

  def _compress_all(self, kv, seq_len: int, segment_start_BT=None):
    """Every complete compressed block of a row from position 0: (k_cmp, v_cmp)."""
    c = self.cfg
    n = nsa.num_compressed_blocks(seq_len, c.block_len, c.block_stride)
    k_cmp = self.k_compressor.from_row(kv["k_cmp_raw"], n, c.block_stride)
    block_BN = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), k_cmp.shape[:2])
    # Packed rows: a block's position is counted from the start of the sequence it begins in.
    shift_BN = 0 if segment_start_BT is None else segment_start_BT[:, ::c.block_stride][:, :n]
    return (self._rotate_cmp(k_cmp, block_BN, shift_BN),
            self.v_compressor.from_row(kv["v_cmp_raw"], n, c.block_stride))

  def _full_sequence(self, x_BTC, segment_start_BT=None):
    """The train/prefill pass from position 0: (o_BTHD, key/values, k_cmp, v_cmp). Packed
    rows (``segment_start_BT``): positions restart at every sequence, which sees only itself."""
    B, T, _ = x_BTC.shape
    pos_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_start_BT is not None:
      pos_BT = pos_BT - segment_start_BT
    q, kv, gates = self._project(x_BTC, pos_BT)
    k_cmp, v_cmp = self._compress_all(kv, T, segment_start_BT)
    o_BTHD = self._core(q, kv, k_cmp, v_cmp, gates, 0, segment_start_BT)
    return o_BTHD, kv, k_cmp, v_cmp

  @staticmethod
  def _write_prefix(cache, arrays):
    """``cache[name][:, :len]`` replaced by ``arrays[name]`` for every name in ``arrays``."""
    return {name: jax.lax.dynamic_update_slice_in_dim(
        cache[name], val.astype(cache[name].dtype), 0, axis=1) for name, val in arrays.items()}

  def _completed_blocks(self, cache, token_BGD, pos_B, written: bool = False,
                        bias: bool = True):
    """The compressed block each row's token at ``pos_B`` completes: (blocks_2BGD: k_cmp's and
    v_cmp's stacked; slot_B: each row's slot, the number of slots for a row that completes
    none).

    Block i completes at position ``i*stride + len - 1``: it is computed from the raw keys
    only then, so no partial block is ever visible (NSA eq. 7). Its raw keys are the cache's
    with this token's (``token_BGD``, by name) at ``pos_B``: put in place unless
    ``written`` (the cache holds it already). Without ``bias`` the compressors' last bias is
    left to the caller (``nsa_pallas.write_cache`` adds it; not with ``cmp_rope="both"``,
    whose rotation comes after it).
    """
    c = self.cfg
    if not bias and c.cmp_rope == "both":
      raise ValueError("_completed_blocks: rotated blocks (cmp_rope='both') need their bias")
    block_B, slot_B = self._block_slots(cache, pos_B)
    idx_BL = nsa_pallas.block_rows(pos_B, block_len=c.block_len, block_stride=c.block_stride,
                                   seq_len=cache["k_slc"].shape[1])
    here_BL11 = (idx_BL == pos_B[:, None])[:, :, None, None]

    def raw_block(name):
      old_BLGD = jnp.take_along_axis(cache[name], idx_BL[:, :, None, None], axis=1)
      if written:
        return old_BLGD
      return jnp.where(here_BL11, token_BGD[name][:, None].astype(old_BLGD.dtype), old_BLGD)

    raw_2BLGD = jnp.stack([raw_block(raw) for _, raw in CMP_NAMES])
    compressors = (self.k_compressor, self.v_compressor)
    if self.is_initializing():  # the compressors' parameters do not exist yet
      blocks_2B1GD = jnp.stack([f(x[:, None], bias) for f, x in zip(compressors, raw_2BLGD)])
    else:
      # Both compressors in one batched pass (their parameters stacked): a decoding step's
      # kernels are its cost (issue #16), and the two would each launch their own.
      stacked = decode_const(self, "compressor_variables", lambda: jax.tree.map(
          lambda k, v: jnp.stack([k, v]), *(f.variables for f in compressors)))
      unbound = BlockCompressor(c.block_len, c.head_dim, self.k_compressor.dtype,
                                self.k_compressor.param_dtype, parent=None)
      blocks_2B1GD = jax.vmap(lambda v, x: unbound.apply(v, x[:, None], bias))(stacked,
                                                                              raw_2BLGD)
    blocks_2BGD = blocks_2B1GD[:, :, 0]
    if c.cmp_rope == "both":  # k_cmp's blocks (CMP_NAMES[0]) rotated
      # A stack, not blocks_2BGD.at[0].set(...): XLA:CPU of jax 0.10.0 and 0.10.2 computed
      # that one wrong under jit (docs/bench/xla_cpu_rope_update_miscompile.py).
      k_B1GD = self._rotate_cmp(blocks_2B1GD[0], block_B[:, None])
      blocks_2BGD = jnp.stack([k_B1GD[:, 0], blocks_2BGD[1]])
    return blocks_2BGD, slot_B

  def _block_slots(self, cache, pos_B):
    """(block_B: the block each row's token at ``pos_B`` would complete; slot_B: its slot where
    it does complete it, else the number of slots)."""
    c = self.cfg
    start_B = pos_B - c.block_len + 1
    block_B = jnp.maximum(start_B, 0) // c.block_stride
    num_slots = cache["k_cmp"].shape[1]
    complete_B = (start_B >= 0) & (start_B % c.block_stride == 0) & (block_B < num_slots)
    return block_B, jnp.where(complete_B, block_B, num_slots)

  def _bias_in_write(self, cache) -> bool:
    """Whether the write kernel adds the compressors' last bias (BLOCK_BIAS_IN_WRITE): XLA
    would add it in a launch of its own. Not with rotated blocks (their rotation comes after
    it), nor into a cache of another dtype (the sum is rounded once, to the compute dtype)."""
    return (BLOCK_BIAS_IN_WRITE and self.cfg.cmp_rope != "both"
            and cache[CMP_NAMES[0][0]].dtype == self.k_compressor.dtype
            and not self.is_initializing())

  def _block_biases(self):
    """The compressors' last biases [2, D] (k_cmp's, v_cmp's), in the compute dtype (a decoding
    constant)."""
    return decode_const(self, "block_biases", lambda: jnp.stack(
        [f.fc2.variables["params"]["bias"].astype(self.k_compressor.dtype)
         for f in (self.k_compressor, self.v_compressor)]))

  def _write_token(self, cache, tokens_6BGD, pos_B, blocks_2BGD=None):
    """The cache with each row's token at ``pos_B`` (``tokens_6BGD``: its six key/value
    arrays' rows, in KV_NAMES' order) and the compressed block it completes (``blocks_2BGD``:
    computed by ``nsa_pallas.decode_inputs``, without the last bias; else here).

    XLA scatters: the token's six, then its block's two, computed from the written cache (a
    block read from the cache before an in-place scatter into it would make XLA copy the
    whole array first). With NSA's one-kernel decoding (``nsa.fused_decoding``): one kernel
    for all eight arrays. By default (``nsa.PALLAS_DECODE = "fused_xla_block"``,
    ``nsa_pallas.BLOCK_KERNEL`` and ``BLOCK_WRITE``) the block's kernel computes the block from
    the unwritten cache with the token in place and writes all eight
    (``nsa_pallas.decode_block_write``); else that kernel's block, the input kernel's or XLA's
    (with ``cmp_rope="both"`` XLA's) goes to ``nsa_pallas.write_cache`` (which adds its last
    bias where ``BLOCK_BIAS_IN_WRITE``, except with ``cmp_rope="both"``); with ``"fused"`` the
    write kernel computes the block too (``nsa_pallas.write_cache_compress``)."""
    c = self.cfg
    num_slots = cache["k_cmp"].shape[1]
    names = tuple(name for name, _ in CMP_NAMES)
    token_BGD = dict(zip(KV_NAMES, tokens_6BGD))
    if num_slots and self._fused_decoding():
      tokens_NBGD = tokens_6BGD.astype(cache[KV_NAMES[0]].dtype)  # one dtype: init_layer_cache
      if nsa.block_in_write_kernel() and c.cmp_rope != "both" and not self.is_initializing():
        # The completed block computed in the write kernel (rotated blocks: in XLA, below).
        weights = self._compressor_weights()
        arrays = nsa_pallas.write_cache_compress(
            tuple(cache[n] for n in KV_NAMES), tokens_NBGD, pos_B, tuple(cache[n] for n in names),
            weights, c.block_len, c.block_stride, nsa_pallas.use_interpret())
        return dict(zip(KV_NAMES + names, arrays))
      bias_in_kernel = self._bias_in_write(cache)
      token_rows = tuple(KV_NAMES.index(raw) for _, raw in CMP_NAMES)
      if (blocks_2BGD is None and bias_in_kernel and self._block_kernel_apply(cache)
          and nsa_pallas._flag("BLOCK_WRITE")):  # the block's kernel writes the cache too
        arrays = nsa_pallas.decode_block_write(
            tuple(cache[n] for n in KV_NAMES), tokens_6BGD, pos_B, tuple(cache[n] for n in names),
            self._block_slots(cache, pos_B)[1], self._compressor_weights()[:3],
            self._block_biases(), token_rows, self._block_geometry(), nsa_pallas.use_interpret())
        return dict(zip(KV_NAMES + names, arrays))
      if blocks_2BGD is None and bias_in_kernel and self._block_kernel_apply(cache):
        blocks_2BGD = nsa_pallas.decode_block(
            tuple(cache[raw] for _, raw in CMP_NAMES), tokens_6BGD, pos_B,
            self._compressor_weights()[:3], token_rows, self._block_geometry(),
            nsa_pallas.use_interpret())
      if blocks_2BGD is None:
        blocks_2BGD, slot_B = self._completed_blocks(cache, token_BGD, pos_B,
                                                     bias=not bias_in_kernel)
      elif not bias_in_kernel:
        raise ValueError("_write_token: blocks without their bias need the write kernel's")
      else:
        slot_B = self._block_slots(cache, pos_B)[1]
      arrays = nsa_pallas.write_cache(
          tuple(cache[n] for n in KV_NAMES), tokens_NBGD, pos_B, tuple(cache[n] for n in names),
          blocks_2BGD.astype(cache[names[0]].dtype), slot_B, nsa_pallas.use_interpret(),
          self._block_biases() if bias_in_kernel else None)
      return dict(zip(KV_NAMES + names, arrays))
    rows_B = jnp.arange(pos_B.shape[0])
    new_cache = dict(cache, **{name: cache[name].at[rows_B, pos_B].set(token_BGD[name].astype(
        cache[name].dtype)) for name in KV_NAMES})
    blocks_2BGD, slot_B = self._completed_blocks(new_cache, token_BGD, pos_B, written=True)
    # A row that completes no block writes to slot num_slots, which the scatter drops.
    for i, name in enumerate(names):
      new_cache[name] = cache[name].at[rows_B, slot_B].set(
          blocks_2BGD[i].astype(cache[name].dtype), mode="drop")
    return new_cache

  def _compressor_weights(self):
    """The two compressors' :meth:`BlockCompressor.kernel_weights`, stacked k, v (a decoding
    constant: ``layers.decode_const``)."""
    return decode_const(self, "compressor_weights", lambda: jax.tree.map(
        lambda k, v: jnp.stack([k, v]), self.k_compressor.kernel_weights(),
        self.v_compressor.kernel_weights()))

  def _block_geometry(self) -> tuple:
    return (("block_len", self.cfg.block_len), ("block_stride", self.cfg.block_stride))

  def _block_kernel_apply(self, cache) -> bool:
    """Whether a decoding step's completed block is ``nsa_pallas.decode_block``'s kernel
    (BLOCK_KERNEL; writing the cache itself with BLOCK_WRITE: ``decode_block_write``; the
    caller checks that the write kernel adds its last bias)."""
    c = self.cfg
    return (nsa_pallas._flag("BLOCK_KERNEL") and cache["k_cmp"].shape[1] > 0
            and cache[CMP_NAMES[0][1]].size <= nsa_pallas.INPUTS_BLOCK_MAX_ELEMENTS
            and nsa_pallas.decode_block_supported(block_len=c.block_len, head_dim=c.head_dim,
                                                  interpret=nsa_pallas.use_interpret()))

  def _fused_decoding(self) -> bool:
    """Whether a decoding step writes the cache in one kernel (``nsa.fused_decoding``)."""
    c = self.cfg
    return nsa.fused_decoding(
        c.nsa_impl, heads_per_group=c.num_heads // c.num_kv_groups, head_dim=c.head_dim,
        select_len=c.select_len, num_groups=c.num_kv_groups)

  def _decode_inputs_apply(self) -> bool:
    """Whether a decoding step takes its input products from one kernel
    (``nsa_pallas.decode_inputs``, ``nsa_pallas.DECODE_INPUTS``): with the fused decoding
    kernels and a one-layer gate."""
    c = self.cfg
    return (nsa_pallas._flag("DECODE_INPUTS") and not c.gate_hidden
            and not self.is_initializing() and self._fused_decoding()
            and nsa_pallas.decode_inputs_supported(
                d_model=c.d_model, head_dim=c.head_dim,
                itemsize=jnp.dtype(self.q_proj.dtype).itemsize,
                interpret=nsa_pallas.use_interpret()))

  def _decode_inputs(self, x_BTC, cache, pos_B, norm=None):
    """:meth:`_project`'s values for one token a row by ``nsa_pallas.decode_inputs`` (of
    ``norm(x_BTC)`` where ``norm``, an RMSNorm module, is given: applied in the kernel):
    ((q_BTHD, q_cmp_BTHD), tokens_6BGD, gates_BTH3, blocks_2BGD or None), the block each row's
    token would complete computed there too (without its last bias) with
    ``nsa_pallas.INPUTS_BLOCK`` where the write kernel adds that bias and takes the block from
    outside (nsa.PALLAS_DECODE "fused_xla_block")."""
    c = self.cfg
    dt = self.q_proj.dtype
    kernels = [m.variables["params"]["kernel"].astype(dt)
               for m in (self.q_proj, self.kv_proj, self.gate_proj)]
    cos_BF, sin_BF = rope_cos_sin(pos_B, c.head_dim // 2, c.rope_theta)
    block, geometry = None, None
    if (nsa_pallas._flag("INPUTS_BLOCK") and cache["k_cmp"].shape[1]
        and not nsa.block_in_write_kernel() and self._bias_in_write(cache)
        and cache[CMP_NAMES[0][1]].size <= nsa_pallas.INPUTS_BLOCK_MAX_ELEMENTS):
      block = (tuple(cache[raw] for _, raw in CMP_NAMES), pos_B, self._compressor_weights()[:3])
      geometry = self._block_geometry()
    scale = None if norm is None else norm.variables["params"]["scale"]
    q_BHD, q_raw_BHD, tokens_6BGD, gates_BH3, *blocks = nsa_pallas.decode_inputs(
        x_BTC[:, 0].astype(dt), *kernels, self.gate_proj.variables["params"]["bias"].astype(dt),
        cos_BF, sin_BF, block, scale, tuple(KV_NAMES.index(n) for n in ("k_slc", "k_win")),
        geometry, None if norm is None else norm.eps, nsa_pallas.use_interpret())
    q_cmp_BHD = q_raw_BHD if c.cmp_rope == "none" else q_BHD
    return ((q_BHD[:, None], q_cmp_BHD[:, None]), tokens_6BGD, gates_BH3[:, None],
            blocks[0] if blocks else None)

  def _decode(self, x_BTC, cache, pos_B, norm=None):
    """One token per example at ``pos_B`` (``norm``: RMSNorm to apply to ``x_BTC`` first, or
    None): (o_BTHD, new_cache)."""
    B, T, _ = x_BTC.shape
    if T != 1:
      raise ValueError(f"decode takes one token per example, got {T}")
    blocks_2BGD = None
    if self._decode_inputs_apply():
      if norm is not None and not nsa_pallas._flag("INPUTS_NORM"):
        x_BTC, norm = norm(x_BTC), None
      q, tokens_6BGD, gates, blocks_2BGD = self._decode_inputs(x_BTC, cache, pos_B, norm)
    else:
      if norm is not None:
        x_BTC = norm(x_BTC)
      q, kv, gates = self._project(x_BTC, pos_B[:, None])
      tokens_6BGD = jnp.stack([kv[name][:, 0] for name in KV_NAMES])
    new_cache = self._write_token(cache, tokens_6BGD, pos_B, blocks_2BGD)
    dt = q[0].dtype
    kv_all = {name: new_cache[name].astype(dt) for name in KV_NAMES}
    o_BTHD = self._core(q, kv_all, new_cache["k_cmp"].astype(dt),
                        new_cache["v_cmp"].astype(dt), gates, pos_B)
    return o_BTHD, new_cache

  def _branch(self, x_BTC, branch_len: int, start_B):
    """``"branch"`` mode (see :func:`onn_jax.model.attention.full.branch_attention`): the main
    tokens as in training; the branch against keys/values whose positions before ``start_B``
    are the main sequence's and from ``start_B`` on its own (compressed blocks rebuilt from
    those, so a block straddling ``start_B`` mixes both, as in a row holding the branch)."""
    B, T, _ = x_BTC.shape
    M, A = T - branch_len, branch_len
    (q_BTHD, q_cmp_BTHD), kv, gates = self._project(
        x_BTC, branch_positions(T, branch_len, start_B))
    main = {name: val[:, :M] for name, val in kv.items()}
    k_cmp, v_cmp = self._compress_all(main, M)
    o_main = self._core((q_BTHD[:, :M], q_cmp_BTHD[:, :M]), main, k_cmp, v_cmp,
                        gates[:, :M], 0)
    merged = {name: extend_keys(val[:, :M], val[:, M:], start_B) for name, val in kv.items()}
    k_cmp, v_cmp = self._compress_all(merged, M + A)
    o_branch = self._core((q_BTHD[:, M:], q_cmp_BTHD[:, M:]), merged, k_cmp, v_cmp,
                          gates[:, M:], start_B.astype(jnp.int32))
    return jnp.concatenate([o_main, o_branch], axis=1)

  def _extend(self, x_BTC, cache, start_B):
    """``"extend"`` mode: the T tokens at ``start_B ..`` against the cache's keys/values before
    ``start_B`` (compressed blocks rebuilt from the merged raw keys/values, as in
    :meth:`_branch`); the cache is only read."""
    T = x_BTC.shape[1]
    q, kv, gates = self._project(x_BTC, branch_positions(T, T, start_B))
    merged = {name: extend_keys(cache[name], kv[name], start_B) for name in KV_NAMES}
    k_cmp, v_cmp = self._compress_all(merged, merged[KV_NAMES[0]].shape[1])
    return self._core(q, merged, k_cmp, v_cmp, gates, start_B.astype(jnp.int32))

  def __call__(self, x_BTC, valid_BT=None, *, mode: str = "train", cache: dict | None = None,
               pos_B: jax.Array | None = None, segment_start_BT: jax.Array | None = None,
               branch_len: int = 0, norm=None):
    del valid_BT  # attention is causal; padding sits after every real token of its sequence
    if norm is not None and mode != "decode":
      raise ValueError(f"NSA attention: norm= is for decoding, not mode={mode!r}")
    B, T, _ = x_BTC.shape
    new_cache = None
    if segment_start_BT is not None and mode != "train":
      raise ValueError(f"NSA attention: packed rows (segment_start) are for training, not "
                       f"mode={mode!r}")
    if mode in ("train", "prefill"):
      o_BTHD, kv, k_cmp, v_cmp = self._full_sequence(x_BTC, segment_start_BT)
      if mode == "prefill":
        new_cache = self._write_prefix(cache, {**{n: kv[n] for n in KV_NAMES},
                                               "k_cmp": k_cmp, "v_cmp": v_cmp})
    elif mode == "branch":
      o_BTHD = self._branch(x_BTC, branch_len, pos_B)
    elif mode == "extend":
      o_BTHD = self._extend(x_BTC, cache, pos_B)
    elif mode == "decode":
      o_BTHD, new_cache = self._decode(x_BTC, cache, pos_B, norm)
    else:
      raise ValueError(f"unknown mode {mode!r}")
    return self.out_proj(o_BTHD.reshape(B, T, -1)), new_cache, {}
