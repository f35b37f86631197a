"""Attention variants behind one interface, chosen by ``model.attention``.

Each variant is one module in this package with

* a Flax module ``cls(cfg, name=...)`` called as
  ``attn(x_BTC, valid_BT=None, *, mode="train"|"prefill"|"branch"|"decode"|"extend",
  cache=None, pos_B=None, segment_start_BT=None, branch_len=0)`` and returning
  ``(out_BTC, new_cache, aux)``:

  - ``"train"``: a causal pass over [B, T] from position 0; ``new_cache`` is None. With
    ``segment_start_BT`` (int [B,T]: the first position of each token's sequence) a row holds
    several packed sequences: each one attends only to itself, with positions from 0, exactly
    as if alone (sequences start at multiples of :func:`pack_alignment`);
  - ``"prefill"``: the same pass, also writing positions ``0..T-1`` of ``cache``;
  - ``"branch"`` (``branch_len`` = A > 0): the last A of the T tokens continue the first
    T - A differently from position ``pos_B`` on: they see the first tokens before ``pos_B``
    and each other causally (EAVI's alignment pass; no cache);
  - ``"decode"``: one token per example (T = 1) at absolute position ``pos_B`` [B], read from
    and written to ``cache``;
  - ``"extend"``: T tokens per example at positions ``pos_B + 0 .. T-1``, seeing the cache's
    positions before ``pos_B`` and each other causally; ``cache`` is read, not written, and
    ``new_cache`` is None (EAVI's parallel rollout);
  - ``aux``: a dict of float32 statistics (empty, or a gate's :data:`moe.AUX_KEYS`, which the
    model stacks over layers under ``aux["attn"]`` and :func:`onn_jax.objectives.sdl` adds to
    the loss);

* ``init_layer_cache(cfg, batch, capacity)``: one layer's empty cache, a dict of arrays whose
  layout only the variant knows;

* ``takes_norm``: whether ``"decode"`` is called with the block's input un-normalised and
  ``norm=`` the block's RMSNorm module (``transformer.RMSNorm``), which the variant applies
  itself (its decoding kernel may fold it in: a launch a layer less); otherwise ``x_BTC`` is
  always normalised already.

To add a variant: write the module, add it to :data:`VARIANTS` and to the choices of
``model.attention`` in :func:`onn_jax.config.validate`, and give it a FLOP count in
:mod:`onn_jax.model.flops`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from onn_jax.model import nsa as nsa_core
from onn_jax.model import nsa_pallas
from onn_jax.model.attention import dynsmlora, full, nsa


@dataclasses.dataclass(frozen=True)
class Variant:
  module: Any  # a flax.linen.Module class taking (cfg, name=...)
  init_layer_cache: Callable[..., dict]
  takes_norm: bool = False


VARIANTS: dict[str, Variant] = {
    "nsa": Variant(nsa.NSAttention, nsa.init_layer_cache, takes_norm=True),
    "full": Variant(full.FullAttention, full.init_layer_cache),
    "dynsmlora": Variant(dynsmlora.DynSMLoRAttention, dynsmlora.init_layer_cache),
}


def get(name: str) -> Variant:
  if name not in VARIANTS:
    raise ValueError(f"model.attention: {name!r} is not one of {', '.join(VARIANTS)}")
  return VARIANTS[name]


def pack_alignment(cfg) -> int:
  """Sequences packed into one row start at multiples of this: NSA's selection and
  compression blocks must not straddle two sequences; dense attention needs no alignment."""
  if cfg.attention == "nsa":
    return nsa_core.pack_alignment(cfg.block_stride, cfg.select_len)
  return 1


def describe(cfg) -> str:
  """The attention a run computes, for its start line, e.g. ``nsa (core: pallas)``."""
  if cfg.attention != "nsa":
    return cfg.attention
  impl = cfg.nsa_impl
  if impl == "auto":
    tiles_ok = nsa_pallas.pallas_supported(heads_per_group=cfg.num_heads // cfg.num_kv_groups,
                                           head_dim=cfg.head_dim, select_len=cfg.select_len)
    impl = f"auto: {nsa_core.auto_impl_summary(pallas_tiles_ok=tiles_ok)}"
  return f"nsa (core: {impl}; cmp_rope {cfg.cmp_rope})"
