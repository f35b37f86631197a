"""GPU check of ``nsa_core(impl="pallas")``: compile, correctness against the reference, and
forward+backward timings against cuDNN causal GQA attention and the blockwise implementation.

    python -m train.nsa_kernel_check [--out results.json] [--cases 32x2048,8x8192]
        [--skip-check] [--iters 5] [--breakdown] [--variants keyblock,dq_atomic] [--packed]
        [--decode 32x2048] [--decode-calls 32] [--geometry 16/8/32/8/128]

Head sizes of configs/arc1.yaml (8 heads, 2 KV groups, head_dim 32) and its NSA geometry
(block_len 16, stride 8, select_len 32, num_select 8, window 128; ``--geometry`` takes
another, as block_len/stride/select_len/num_select/window), bf16 inputs. Each timing is the
median of ``--iters`` runs of one jitted forward+backward (gradients of all seven key/query
inputs and the gates); memory is XLA's temporary buffer size for that program. ``--variants`` times
the pallas path once per selected-branch backward variant (``VARIANTS``), all in one run;
``--packed`` also times each impl on packed rows (``segment_start``: sequences of 300 to 1400
tokens, as ``data.pack`` lays out arc1's); ``--decode B x S`` times one-token decoding (the
forward for one query a row against S keys; ``--decode-calls K`` runs K of them in one
program; ``--variants dec_split,dec_w4_t16`` times the split path and the decoding kernel's
former settings too; other variants are not timed there). The check covers packed rows too.
The results file is rewritten after every row, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import contextlib
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from onn_jax import decode, faults
from onn_jax.model import moe_pallas, nsa, nsa_pallas
from onn_jax.model.attention import nsa as nsa_layer
from onn_jax.model.nsa import nsa_core, num_compressed_blocks

H, G, D = 8, 2, 32
GEO = dict(block_len=16, block_stride=8, select_len=32, num_select=8, window=128)


def parse_geometry(text: str) -> dict[str, int]:
  """``"BL/BS/SL/NS/W"`` -> the keyword arguments of GEO; ValueError in one line otherwise."""
  parts = text.split("/")
  if len(parts) != len(GEO) or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
    raise ValueError(f"--geometry {text!r}: expected five positive integers "
                     "block_len/block_stride/select_len/num_select/window, e.g. 16/8/32/8/128")
  return dict(zip(GEO, (int(p) for p in parts)))


NAMES = ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates")
# Variants: module settings of nsa_pallas (the kernels), of nsa (the branches' paths) or of
# the NSA layer's module (onn_jax.model.attention.nsa: its projections): SETTING_MODULES.
VARIANTS = {
    "keyblock": dict(DKDV_REDUCE="partials", KEY_CHUNK=16),
    "keyblock_c32": dict(DKDV_REDUCE="partials", KEY_CHUNK=32),
    "keyblock_c8": dict(DKDV_REDUCE="partials", KEY_CHUNK=8),
    "keyblock_atomic": dict(DKDV_REDUCE="atomic", KEY_CHUNK=16),
    # The key-major kernels' launch width (their tiles: KEY_CHUNK * heads rows x select_len
    # keys in the forward, x KEY_TILE keys in the backward).
    "key_w8": dict(KEY_NUM_WARPS=8),
    # The key-major backward walking a whole block at once (as before KEY_TILE) up to 64 keys.
    "key_tile64": dict(KEY_TILE=64),
    "keyblock_c8_w8": dict(DKDV_REDUCE="partials", KEY_CHUNK=8, KEY_NUM_WARPS=8),
    # Items of several KEY_CHUNK-token chunks (nsa_pallas.ITEM_CHUNKS): fewer dk/dv partials
    # to write and sum, longer programs.
    "items1": dict(ITEM_CHUNKS=1),
    "items2": dict(ITEM_CHUNKS=2),
    "items4": dict(ITEM_CHUNKS=4),
    "items8": dict(ITEM_CHUNKS=8),
    "items16": dict(ITEM_CHUNKS=16),
    "items4_w8": dict(ITEM_CHUNKS=4, KEY_NUM_WARPS=8),
    "items8_c8": dict(ITEM_CHUNKS=8, KEY_CHUNK=8),
    "items16_c8": dict(ITEM_CHUNKS=16, KEY_CHUNK=8),
    "items4_c32": dict(ITEM_CHUNKS=4, KEY_CHUNK=32),
    # The selected branch's partials in float32 (the default until 2026-12-06; now the
    # inputs' dtype, bfloat16): all of them, the forward's, the backward's dq, its dk/dv.
    "part_f32": dict(FWD_PARTIAL_DTYPE="float32", DQ_PARTIAL_DTYPE="float32",
                     DKDV_PARTIAL_DTYPE="float32"),
    "fwd_part_f32": dict(FWD_PARTIAL_DTYPE="float32"),
    "dq_part_f32": dict(DQ_PARTIAL_DTYPE="float32"),
    "dkdv_part_f32": dict(DKDV_PARTIAL_DTYPE="float32"),
    # The key-major backward's dq added atomically (no per-slot partials, no gather).
    "dq_atomic": dict(DQ_REDUCE="atomic"),
    # The compressed branch (nsa module): the XLA chunks instead of the default folded
    # attention (one causal cuDNN attention over query groups).
    "cmp_chunked": dict(PALLAS_CMP_ATTENTION="chunked"),
    # The block choice after the folded branch: XLA chunks instead of the fused scores kernel.
    "choice_chunked": dict(PALLAS_CHOICE="chunked"),
    # The fused block-choice kernel's launch and tile settings (nsa_pallas).
    "choice_w8": dict(CHOICE_NUM_WARPS=8),
    "choice_w2": dict(CHOICE_NUM_WARPS=2),
    "choice_q32": dict(CHOICE_TOKENS=32),
    "choice_q128": dict(CHOICE_TOKENS=128, CHOICE_NUM_WARPS=8),
    "choice_tf32": dict(CHOICE_OVERLAP_PRECISION=jax.lax.Precision.HIGH),  # one TF32 pass
    "choice_bf16x3": dict(CHOICE_OVERLAP_PRECISION="bf16x3"),  # three bf16 parts (default)
    "choice_highest": dict(CHOICE_OVERLAP_PRECISION=jax.lax.Precision.HIGHEST),  # exact fp32
    "choice_short_first": dict(CHOICE_LONG_FIRST=False),
    "choice_group_order": dict(CHOICE_ORDER="group"),
    "choice_masked": dict(CHOICE_INTERIOR_MIN_TILES=2**30),  # every tile masked
    "choice_interior": dict(CHOICE_INTERIOR_MIN_TILES=0),  # fully visible tiles unmasked
    # The selected branch's forward: key-major items (the backward's plan) or query-major.
    "fwd_keyblock": dict(FWD_IMPL="keyblock"),
    "fwd_query": dict(FWD_IMPL="query"),
    # Queries not from position 0 (decoding; nsa.PALLAS_OFFSET_CHOICE): the choice by the kernel.
    "offset_choice_kernel": dict(PALLAS_OFFSET_CHOICE="kernel"),
    # The window branch: cuDNN's sliding-window attention instead of the window kernel, and the
    # kernel's tile (queries per program, keys per step) and launch width.
    # (2026-12-03: the default, a KV group's heads in one program over 32-query tiles, against
    # one head a program over 64, 32 or 128, and against 64-query group tiles.)
    "win_cudnn": dict(PALLAS_WINDOW="cudnn"),
    "win_head": dict(WIN_GROUP_HEADS=False, WIN_TILE=64),
    "win_head_t32": dict(WIN_GROUP_HEADS=False, WIN_TILE=32),
    "win_head_t128": dict(WIN_GROUP_HEADS=False, WIN_TILE=128, WIN_DKDV_KEYS=None),
    "win_head_w8": dict(WIN_GROUP_HEADS=False, WIN_TILE=64, WIN_NUM_WARPS=8),
    "win_head_w2": dict(WIN_GROUP_HEADS=False, WIN_TILE=64, WIN_NUM_WARPS=2),
    "win_t64": dict(WIN_TILE=64),
    "win_t64_w8": dict(WIN_TILE=64, WIN_NUM_WARPS=8),
    "win_w8": dict(WIN_NUM_WARPS=8),
    # The window's dk/dv kernel: one query tile's keys a program as [rows, keys] (the default
    # before session 28: mma.sync, spills), and runs of 64 keys as [rows, keys] (the default:
    # 64 keys as [keys, rows], every product on wgmma, no spills).
    "win_dkdv32": dict(WIN_DKDV_KEYS=None, WIN_DKDV_KEYS_FIRST=False),
    "win_dkdv64_rows_first": dict(WIN_DKDV_KEYS=64, WIN_DKDV_KEYS_FIRST=False),
    # One-token decoding (--decode): the split path (each branch its own kernel) instead of
    # the decoding kernel, and the kernel's launch width and tile of the compressed keys' walk
    # (2026-12-05: 8 warps and 64 selection blocks against the 4 and 16 of before).
    "dec_split": dict(PALLAS_DECODE="split"),
    "dec_w4_t16": dict(DEC_NUM_WARPS=4, DEC_SEL_TILE=16),
    "dec_w4": dict(DEC_NUM_WARPS=4),
    "dec_t32": dict(DEC_SEL_TILE=32),
    # Triton's software pipelining of the kernels' loops (nsa_pallas.*_NUM_STAGES; 1 = off):
    # every family at once, one family at a time (a forward and its backward together), then
    # the forward kernels alone (the key-major selected forward and the window's).
    "stages2": dict(KEY_FWD_NUM_STAGES=2, KEY_BWD_NUM_STAGES=2, CHOICE_NUM_STAGES=2,
                    WIN_FWD_NUM_STAGES=2, WIN_BWD_NUM_STAGES=2, DEC_NUM_STAGES=2),
    "stages3": dict(KEY_FWD_NUM_STAGES=3, KEY_BWD_NUM_STAGES=3, CHOICE_NUM_STAGES=3,
                    WIN_FWD_NUM_STAGES=3, WIN_BWD_NUM_STAGES=3, DEC_NUM_STAGES=3),
    "key_s2": dict(KEY_FWD_NUM_STAGES=2, KEY_BWD_NUM_STAGES=2),
    "key_s3": dict(KEY_FWD_NUM_STAGES=3, KEY_BWD_NUM_STAGES=3),
    "choice_s2": dict(CHOICE_NUM_STAGES=2),
    "choice_s3": dict(CHOICE_NUM_STAGES=3),
    "win_s2": dict(WIN_FWD_NUM_STAGES=2, WIN_BWD_NUM_STAGES=2),
    "win_s3": dict(WIN_FWD_NUM_STAGES=3, WIN_BWD_NUM_STAGES=3),
    "fwd_s2": dict(KEY_FWD_NUM_STAGES=2, WIN_FWD_NUM_STAGES=2),
    "fwd_s3": dict(KEY_FWD_NUM_STAGES=3, WIN_FWD_NUM_STAGES=3),
    "key_fwd_s3": dict(KEY_FWD_NUM_STAGES=3),
    "win_fwd_s3": dict(WIN_FWD_NUM_STAGES=3),
    "dec_s2": dict(DEC_NUM_STAGES=2),
    "dec_s3": dict(DEC_NUM_STAGES=3),
    # Session 31: the training kernels' outputs (and cuDNN's compressed branch) in float32, as
    # before (nsa_pallas.BRANCH_OUT_DTYPE); the NSA layer's three input projections as three
    # products (attention.nsa.FUSED_INPUT_PROJECTION; the layer benches only); both.
    "branch_f32": dict(BRANCH_OUT_DTYPE="float32"),
    "proj_three": dict(FUSED_INPUT_PROJECTION=False),
    "before_s31": dict(BRANCH_OUT_DTYPE="float32", FUSED_INPUT_PROJECTION=False),
    # The compressors' first-layer backward in float32 (attention.nsa.COMPRESSOR_COTANGENT).
    "cmp_grad_f32": dict(COMPRESSOR_COTANGENT="float32"),
    # The selected combination without its optimization barrier (SELECTED_COMBINE_BARRIER);
    # every session-31 change undone at once.
    "no_sel_barrier": dict(SELECTED_COMBINE_BARRIER=False),
    "before_s31_all": dict(BRANCH_OUT_DTYPE="float32", FUSED_INPUT_PROJECTION=False,
                           COMPRESSOR_COTANGENT="float32", SELECTED_COMBINE_BARRIER=False),
    # Session 32: the key-major plan's searches as binary-search loops, or each block's first
    # entry by a scatter of the runs' starts (PLAN_SEARCH; session 33's default), or by one
    # comparison of every entry with every block (session 32's default).
    "plan_scan": dict(PLAN_SEARCH="scan"),
    "plan_runs": dict(PLAN_SEARCH="runs"),
    "plan_compare_all": dict(PLAN_SEARCH="compare_all"),
    # Session 36: the DynMoE decoding kernel's hidden units a program (moe_pallas.DEC_TILE_F,
    # 64): 128 halves its programs and the float32 partials XLA sums (2 MiB a layer at arc1).
    "moe_tile128": dict(DEC_TILE_F=128),
    # The compressors' last bias added by XLA, not the write kernel (BLOCK_BIAS_IN_WRITE; a
    # model's decoding step: `train.bench --only decode --variant block_bias_xla`, not --decode,
    # which times nsa_core alone).
    "block_bias_xla": dict(BLOCK_BIAS_IN_WRITE=False),
    # Session 37 (a model's decoding step: `train.bench --only decode --variant ...`): the NSA
    # input products by XLA's launches, not their kernel (nsa_pallas.DECODE_INPUTS); that
    # kernel computing the completed compressed block too (nsa_pallas.INPUTS_BLOCK); the
    # DynMoE experts kernel routing its rows (moe_pallas.DECODE_ROUTE); both of these.
    "inputs_xla": dict(DECODE_INPUTS=False),
    "inputs_block": dict(INPUTS_BLOCK=True),
    "moe_route": dict(DECODE_ROUTE=True),
    "inputs_block_route": dict(INPUTS_BLOCK=True, DECODE_ROUTE=True),
    # Session 39: DECODE_ROUTE is the default since; this one undoes it (XLA's routing). The
    # completed block by a kernel of its own (nsa_pallas.BLOCK_KERNEL).
    "moe_xla_route": dict(DECODE_ROUTE=False),
    "block_kernel": dict(BLOCK_KERNEL=True, BLOCK_ROWS=16, BLOCK_WRITE=False),
    "block_kernel_row": dict(BLOCK_KERNEL=True, BLOCK_ROWS=1, BLOCK_WRITE=False),
    # The completed block's kernel writing the cache too (one launch a layer less; the default
    # since session 42), or the write kernel after it (session 41's default).
    "block_write": dict(BLOCK_KERNEL=True, BLOCK_ROWS=1, BLOCK_WRITE=True),
    "no_block_write": dict(BLOCK_WRITE=False),
    # Session 40: BLOCK_KERNEL with a program a row is the default since; XLA's completed block
    # (session 39's default).
    "xla_block": dict(BLOCK_KERNEL=False),
    # The DynMoE kernel's expert loads and hidden product before its routing.
    "moe_early_loads": dict(DEC_MOE_EARLY_LOADS=True),
    # decode.HOIST_CONSTS off (the decoding constants in the loop again); that and XLA's
    # routing: session 38's default.
    "no_hoist_consts": dict(HOIST_CONSTS=False),
    "s38_default": dict(HOIST_CONSTS=False, DECODE_ROUTE=False, BLOCK_KERNEL=False),
    # Session 38: the NSA decoding kernel's one tile's top-k by ranks (DEC_RANKED_TOP), its
    # overlap matrices from iotas (DEC_OVERLAP_IOTA), its independent loads first
    # (DEC_EARLY_LOADS); all three (the default since session 38: "dec_before" undoes them);
    # all three with session 37's two options.
    "dec_before": dict(DEC_RANKED_TOP=False, DEC_OVERLAP_IOTA=False, DEC_EARLY_LOADS=False),
    "dec_ranked": dict(DEC_RANKED_TOP=True),
    "dec_iota": dict(DEC_OVERLAP_IOTA=True),
    "dec_early": dict(DEC_EARLY_LOADS=True),
    "dec_all": dict(DEC_RANKED_TOP=True, DEC_OVERLAP_IOTA=True, DEC_EARLY_LOADS=True),
    "dec_window_programs": dict(DEC_WINDOW_PROGRAMS=True),
    "dec_all_block_route": dict(DEC_RANKED_TOP=True, DEC_OVERLAP_IOTA=True,
                                DEC_EARLY_LOADS=True, INPUTS_BLOCK=True, DECODE_ROUTE=True),
    # Session 41: the blocks' norms in the decoding kernels (nsa_pallas.INPUTS_NORM, the
    # attention's in the input kernel, the default since; moe_pallas.DEC_PRENORM, the experts'
    # in the DynMoE kernel, which also adds the residual, off): XLA's norms (session 40's
    # default); both in the kernels; the DynMoE kernel's alone.
    "norms_xla": dict(INPUTS_NORM=False, DEC_PRENORM=False),
    "moe_prenorm": dict(DEC_PRENORM=True),
    "moe_prenorm_only": dict(INPUTS_NORM=False, DEC_PRENORM=True),
    # The DynMoE decoding kernel's programs at 8 warps (moe_pallas.DEC_MOE_NUM_WARPS, 4).
    "moe_warps8": dict(DEC_MOE_NUM_WARPS=8),
    # Session 45: more, shorter programs for the DynMoE decoding kernel (128 hidden units a
    # program was 0.93x in session 41): 32 or 16 hidden units a program (twice or four times
    # the programs and the float32 partials XLA sums), 32 at 2 warps, or 16 rows a program
    # (arc1's 32 rows in two tiles, each reading the expert's weights).
    "moe_tile32": dict(DEC_TILE_F=32),
    "moe_tile16": dict(DEC_TILE_F=16),
    "moe_tile32_w2": dict(DEC_TILE_F=32, DEC_MOE_NUM_WARPS=2),
    "moe_rows16": dict(DEC_ROWS=16),
}
# The settings --decode's variants may change: the others touch paths one-token decoding does
# not take where the decoding kernel serves the geometry (FWD_IMPL and PALLAS_OFFSET_CHOICE:
# only the split path's).
DECODE_SETTINGS = {"PALLAS_DECODE", "DEC_NUM_WARPS", "DEC_SEL_TILE", "DEC_NUM_STAGES",
                   "DEC_RANKED_TOP", "DEC_OVERLAP_IOTA", "DEC_EARLY_LOADS",
                   "DEC_WINDOW_PROGRAMS"}


# The modules whose constants a variant may set (the first that has the name; decode: the
# decoding loop's HOIST_CONSTS).
SETTING_MODULES = (nsa, nsa_pallas, nsa_layer, moe_pallas, decode)


def variant(name: str | None):
  """Sets the module settings of ``name`` (of nsa_pallas, nsa or the NSA layer's module) while
  programs are traced."""
  return module_settings(**(VARIANTS[name] if name else {}))


@contextlib.contextmanager
def module_settings(**settings):
  """Sets these module constants of nsa, nsa_pallas or the NSA layer's module (e.g.
  ``KEY_TILE=64``) for the block."""
  owner = {k: next((m for m in SETTING_MODULES if hasattr(m, k)), nsa_pallas) for k in settings}
  old = {k: getattr(owner[k], k) for k in settings}
  for k, v in settings.items():
    setattr(owner[k], k, v)
  try:
    yield
  finally:
    for k, v in old.items():
      setattr(owner[k], k, v)


def inputs(B: int, T: int, dtype, seed: int = 0) -> dict:
  N = num_compressed_blocks(T, GEO["block_len"], GEO["block_stride"])
  shapes = dict(q=(B, T, H, D), k_cmp=(B, N, G, D), v_cmp=(B, N, G, D), k_slc=(B, T, G, D),
                v_slc=(B, T, G, D), k_win=(B, T, G, D), v_win=(B, T, G, D), gates=(B, T, H, 3))
  keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
  out = {n: jax.random.normal(k, s, jnp.float32) for (n, s), k in zip(shapes.items(), keys)}
  out["q"] = 2.0 * out["q"]
  out["gates"] = jax.nn.sigmoid(out["gates"])
  return {n: v.astype(dtype) for n, v in out.items()}


def packed_starts(B: int, T: int, seed: int = 0) -> jax.Array:
  """segment_start [B,T] of rows packed with sequences of 300 to 1400 tokens, each starting at
  a multiple of the pack alignment (the last one cut at the row's end)."""
  align = nsa.pack_alignment(GEO["block_stride"], GEO["select_len"])
  rng = np.random.default_rng(seed)
  seg = np.zeros((B, T), np.int32)
  for b in range(B):
    at = 0
    while at < T:
      seg[b, at:] = at
      at += -(-int(rng.integers(300, 1400)) // align) * align
  return jnp.asarray(seg)


def nsa_fwd_bwd(impl: str, q_offset=0, packed: bool = False):
  def loss(args, seg):
    out = nsa_core(*(args[n] for n in NAMES), q_offset=q_offset, impl=impl, segment_start=seg,
                   **GEO)
    return jnp.sum(out.astype(jnp.float32) * args["cot"].astype(jnp.float32))
  grad = jax.value_and_grad(loss)
  return jax.jit(lambda args: grad({n: v for n, v in args.items() if n != "seg"},
                                   args["seg"] if packed else None))


def full_fwd_bwd():
  def loss(args):
    out = jax.nn.dot_product_attention(args["q"], args["k_slc"], args["v_slc"], is_causal=True,
                                       implementation="cudnn")
    return jnp.sum(out.astype(jnp.float32) * args["cot"].astype(jnp.float32))
  grad = jax.value_and_grad(loss)
  return jax.jit(lambda args: grad({n: v for n, v in args.items() if n != "seg"}))


def rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def check(results: dict, variants=()) -> None:
  """Pallas against the reference: bf16 (cuDNN window path) and float32 (highest precision),
  training shapes and one-token decoding with per-example offsets; for the default settings
  and each of ``variants``."""
  rows = []
  for var in (None,) + tuple(variants):
    with variant(var):
      _check_rows(rows, var)
  results["check"] = rows


def _check_rows(rows: list, var) -> None:
  for dtype, B, T, q_offset, packed in (
      (jnp.bfloat16, 2, 1024, 0, False), (jnp.float32, 2, 1024, 0, False),
      (jnp.bfloat16, 2, 1024, 0, True), (jnp.float32, 2, 1024, 0, True),
      (jnp.float32, 3, 1, np.array([5, 700, 1023]), False)):
    S = 1024
    args = inputs(B, S, dtype, seed=1)
    if T != S:
      args["q"], args["gates"] = args["q"][:, :T], args["gates"][:, :T]
    args["cot"] = jax.random.normal(jax.random.PRNGKey(2), args["q"].shape, jnp.float32)
    args["seg"] = packed_starts(B, S, seed=3)
    off = q_offset if isinstance(q_offset, int) else jnp.asarray(q_offset, jnp.int32)
    row = dict(dtype=jnp.dtype(dtype).name, B=B, T=T, S=S, packed=packed, variant=var)
    try:
      with jax.default_matmul_precision("highest"):
        ref_args = {n: v.astype(jnp.float32) if n != "seg" else v for n, v in args.items()}
        (l_ref, g_ref) = nsa_fwd_bwd("reference", off, packed)(ref_args)
        (l_pal, g_pal) = nsa_fwd_bwd("pallas", off, packed)(args)
      row.update(loss_rel_err=abs(float(l_pal) - float(l_ref)) / abs(float(l_ref)),
                 grad_rel_err={n: rel_err(g_pal[n], g_ref[n]) for n in NAMES})
    except Exception as e:  # noqa: BLE001 - report and go on to the timings
      row["status"] = f"{type(e).__name__}: {str(e)[:2000]}"
    rows.append(row)
    print("check", json.dumps(row), flush=True)


def time_case(fn, args, iters: int) -> dict:
  try:
    t0 = time.perf_counter()
    compiled = fn.lower(args).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp_gib = None if mem is None else mem.temp_size_in_bytes / 2**30
    jax.block_until_ready(compiled(args))
    times = []
    for _ in range(iters):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(args))
      times.append(time.perf_counter() - t0)
    return dict(ms=1e3 * float(np.median(times)), compile_s=compile_s, temp_gib=temp_gib)
  except Exception as e:  # noqa: BLE001 - an OOM or a lowering error is a result here
    return dict(status=f"{type(e).__name__}: {str(e)[:300]}")


def bench(results: dict, cases, iters: int, impls, variants=(), save=lambda: None,
          packed: bool = False) -> None:
  """One row per case: cuDNN full causal GQA, each impl, and ``pallas[variant]`` for every
  backward variant (all timed in this run); ``packed``: each impl on packed rows too
  (``<impl>_packed``)."""
  rows = results.setdefault("bench", [])
  for B, T in cases:
    args = inputs(B, T, jnp.bfloat16)
    args["cot"] = jnp.ones((B, T, H, D), jnp.bfloat16)
    args["seg"] = packed_starts(B, T)
    row = dict(B=B, T=T)
    rows.append(row)
    row["cudnn_full"] = time_case(full_fwd_bwd(), args, iters)
    names = list(impls) + [f"pallas[{v}]" for v in variants]
    names += [f"{i}_packed" for i in impls] if packed else []
    names += [f"pallas_packed[{v}]" for v in variants] if packed and "pallas" in impls else []
    for name in names:
      impl, var = (name[:-1].split("[") + [None])[:2] if "[" in name else (name, None)
      with variant(var):
        row[name] = time_case(nsa_fwd_bwd(impl.removesuffix("_packed"),
                                          packed=impl.endswith("_packed")), args, iters)
      if "ms" in row[name] and "ms" in row["cudnn_full"]:
        row[name]["speed_vs_cudnn"] = row["cudnn_full"]["ms"] / row[name]["ms"]
      if name != "blockwise" and "ms" in row[name] and "ms" in row.get("blockwise", {}) and (
          not name.endswith("_packed")):
        row[name]["speedup_vs_blockwise"] = row["blockwise"]["ms"] / row[name]["ms"]
      save()
    print("bench", json.dumps(row), flush=True)


def decode_offsets(B: int, S: int, calls: int) -> jax.Array:
  """int32 [calls, B]: the query positions of --decode's calls: S - 1 for one call, else
  spread over the cache's second half (a different position for each row and call)."""
  if calls == 1:
    return jnp.full((1, B), S - 1, jnp.int32)
  i_KB = jnp.arange(calls * B, dtype=jnp.int32).reshape(calls, B)
  return S - 1 - (i_KB * 7919) % max(1, S // 2)


def decode_bench(results: dict, cases, iters: int, impls, variants=(), save=lambda: None,
                 calls: int = 1) -> None:
  """One-token decoding: ``nsa_core``'s forward for one query a row (B x S: B rows against S
  keys), ``calls`` of them in one program (decode_offsets; ``ms_per_call``: a single call's
  time is mostly its dispatch), for each impl and ``pallas[variant]`` for the variants of
  DECODE_SETTINGS (the others change only the backward or the from-position-0 paths, which
  decoding does not take)."""
  rows = results.setdefault("decode", [])
  variants = [v for v in variants if DECODE_SETTINGS & set(VARIANTS[v])]
  for B, S in cases:
    args = inputs(B, S, jnp.bfloat16)
    args["q"], args["gates"] = args["q"][:, -1:], args["gates"][:, -1:]
    offsets = decode_offsets(B, S, calls)
    row = dict(B=B, S=S, calls=calls)
    rows.append(row)
    for name in list(impls) + [f"pallas[{v}]" for v in variants]:
      impl, var = (name[:-1].split("[") + [None])[:2] if "[" in name else (name, None)
      with variant(var):
        fn = jax.jit(lambda a, impl=impl: jnp.stack([
            nsa_core(*(a[n] for n in NAMES), q_offset=offsets[i], impl=impl, **GEO)
            for i in range(calls)]))
        row[name] = time_case(fn, args, iters)
      if "ms" in row[name]:
        row[name]["ms_per_call"] = row[name]["ms"] / calls
      save()
    print("decode", json.dumps(row), flush=True)


def breakdown(results: dict, cases, iters: int, sweep: bool = False, variants=(),
              save=lambda: None) -> None:
  """Time of each piece of the pallas path on its own, as ``nsa_core`` runs it for one sequence
  a row: the compressed branch (folded cuDNN attention, forward+backward), the block choice
  (forward only: fused kernel, XLA chunks, the kernel writing scores only), the selected
  kernel (forward, forward+backward, and its backward's sums of dk and dv partials alone) and the
  window branch (``nsa.PALLAS_WINDOW``: the window kernel or cuDNN's sliding window; forward,
  forward+backward); the chunked compressed branch too."""
  from onn_jax.model import nsa, nsa_pallas
  rows = results.setdefault("breakdown", [])
  for B, T in cases:
    args = inputs(B, T, jnp.bfloat16)
    R = H // G
    q5 = args["q"].reshape(B, T, G, R, D)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    fold = {k: GEO[k] for k in ("block_len", "block_stride")}
    sel = dict(seq_len=T, **fold, select_len=GEO["select_len"], num_select=GEO["num_select"])

    def cmp_chunked_loss(q5, k, v):
      out, idx = nsa._compressed_and_selection_chunked(q5, k, v, pos, None, **sel)
      return jnp.sum(out) + 0.0 * jnp.sum(idx)

    def cmp_folded_loss(q5, k, v):
      return jnp.sum(nsa._compressed_folded(q5, k, v, **fold))

    def choice(q5, k, v):
      return nsa._folded_choice(q5, k, pos, None, **sel)

    def choice_chunked(q5, k, v):
      return nsa._selection_chunked(q5, k, pos, None, **sel)

    def choice_scores(q5, k, v):
      return nsa_pallas.block_choice(q5, k, pos, num_sel=T // GEO["select_len"], scores=True,
                                     interpret=nsa_pallas.use_interpret(),
                                     **{n: v for n, v in sel.items() if n != "seq_len"})

    idx = jax.jit(choice)(q5, args["k_cmp"], args["v_cmp"])

    # The block choice is an argument, not a constant: a constant would be folded into the
    # backward's sort at compile time.
    def slc_loss(q5, k, v, idx):
      return jnp.sum(nsa_pallas.selected_attention(q5, k, v, idx, pos, GEO["select_len"],
                                                   nsa_pallas.use_interpret()))

    def win_loss(q5, k, v):
      return jnp.sum(nsa._window_pallas_path(q5, k, v, pos, GEO["window"], True))

    def wrap(f, names):
      return jax.jit(lambda a: f(*(a[n] for n in names)))
    a = dict(q5=q5, idx=idx, **args)
    qkv_cmp, qkv_slc, qkv_win = (("q5", "k_cmp", "v_cmp"), ("q5", "k_slc", "v_slc", "idx"),
                                 ("q5", "k_win", "v_win"))
    row = dict(B=B, T=T)
    rows.append(row)
    row["cmp_folded_fwd_bwd"] = time_case(wrap(jax.grad(cmp_folded_loss, (0, 1, 2)), qkv_cmp),
                                          a, iters)
    row["choice_fwd"] = time_case(wrap(choice, qkv_cmp), a, iters)
    row["choice_chunked_fwd"] = time_case(wrap(choice_chunked, qkv_cmp), a, iters)
    row["choice_kernel_scores_only_fwd"] = time_case(wrap(choice_scores, qkv_cmp), a, iters)
    row["cmp_folded_fwd"] = time_case(wrap(lambda *x: nsa._compressed_folded(*x, **fold),
                                           qkv_cmp), a, iters)
    row["cmp_chunked_fwd_bwd"] = time_case(wrap(jax.grad(cmp_chunked_loss, (0, 1, 2)), qkv_cmp),
                                           a, iters)
    row["slc_fwd"] = time_case(wrap(slc_loss, qkv_slc), a, iters)
    row["slc_fwd_bwd"] = time_case(wrap(jax.grad(slc_loss, (0, 1, 2)), qkv_slc), a, iters)
    # The backward's sums of per-item dk and dv partials (both; files before 2026-12-02 night
    # have `slc_dkdv_sum`, one of the two), at this choice's item plan.
    L = GEO["select_len"]
    J = -(-T // L)
    _, a["posrow"], a["blk"], _ = nsa_pallas._keyblock_plan(idx, pos, num_blocks=J, heads=R,
                                                            chunk=nsa_pallas._item_tokens())
    a["dk_part"] = a["dv_part"] = jnp.zeros(a["blk"].shape + (L, D), jnp.float32)

    def sums(dk, dv, blk, posrow):
      return nsa_pallas.sum_item_partials((dk, dv), blk, posrow, J)
    qkv_sums = ("dk_part", "dv_part", "blk", "posrow")
    row["slc_dkdv_sums"] = time_case(wrap(sums, qkv_sums), a, iters)
    for var in variants:  # the block choice's variants time the choice, others the kernel
      with variant(var):
        if var.startswith("choice"):
          row[f"choice_fwd[{var}]"] = time_case(wrap(choice, qkv_cmp), a, iters)
        elif var.startswith("win"):
          row[f"win_fwd[{var}]"] = time_case(wrap(win_loss, qkv_win), a, iters)
          row[f"win_fwd_bwd[{var}]"] = time_case(wrap(jax.grad(win_loss, (0, 1, 2)), qkv_win),
                                                 a, iters)
        else:
          row[f"slc_fwd[{var}]"] = time_case(wrap(slc_loss, qkv_slc), a, iters)
          row[f"slc_fwd_bwd[{var}]"] = time_case(wrap(jax.grad(slc_loss, (0, 1, 2)), qkv_slc),
                                                 a, iters)
      save()
    # Every selected-branch kernel's launch width (query-major and key-major alike; files
    # before 2026-12-02 evening: the query-major kernels' alone).
    for warps in (1, 2, 8) if sweep else ():
      with module_settings(FWD_NUM_WARPS=warps, KEY_NUM_WARPS=warps):
        row[f"slc_fwd_w{warps}"] = time_case(wrap(slc_loss, qkv_slc), a, iters)
        row[f"slc_fwd_bwd_w{warps}"] = time_case(wrap(jax.grad(slc_loss, (0, 1, 2)),
                                                      qkv_slc), a, iters)
      save()
    row["win_fwd"] = time_case(wrap(win_loss, qkv_win), a, iters)
    row["win_fwd_bwd"] = time_case(wrap(jax.grad(win_loss, (0, 1, 2)), qkv_win), a, iters)
    save()
    print("breakdown", json.dumps(row), flush=True)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m train.nsa_kernel_check", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="nsa_kernel_check.json", help="the JSON of results")
  p.add_argument("--cases", default="32x2048,8x8192,4x16384,1x32768",
                 help="ROWSxTOKENS cases timed forward+backward, comma-separated")
  p.add_argument("--impls", default="pallas,blockwise",
                 help="nsa_core implementations timed beside cuDNN's causal GQA attention")
  p.add_argument("--iters", type=int, default=5, help="timed calls of each case")
  p.add_argument("--skip-check", action="store_true",
                 help="skip the check of the kernels (and variants) against the reference")
  p.add_argument("--breakdown", action="store_true", help="time the pallas path's pieces")
  p.add_argument("--sweep", action="store_true", help="with --breakdown: Triton num_warps")
  p.add_argument("--variants", default="",
                 help=f"pallas backward variants to time as well, from {sorted(VARIANTS)}")
  p.add_argument("--breakdown-cases", default=None, help="cases of --breakdown (default --cases)")
  p.add_argument("--packed", action="store_true", help="time each impl on packed rows too")
  p.add_argument("--decode", default="",
                 help="also time one-token decoding at these B x S cases, e.g. 32x2048")
  p.add_argument("--decode-calls", type=int, default=1,
                 help="--decode: calls in one timed program (e.g. 32, to time kernels, not "
                      "dispatch)")
  p.add_argument("--geometry", default="",
                 help="block_len/block_stride/select_len/num_select/window (default: arc1's)")
  a = p.parse_args(argv)
  if a.geometry:
    try:
      GEO.update(parse_geometry(a.geometry))
    except ValueError as err:
      p.error(str(err))
  results = dict(jax=jax.__version__, device=str(jax.devices()[0].device_kind),
                 date=datetime.date.today().isoformat(), geometry=GEO, H=H, G=G, D=D,
                 defaults={k: str(getattr(nsa_pallas, k)) if k == "CHOICE_OVERLAP_PRECISION"
                           else getattr(nsa_pallas, k) for k in
                           ("FWD_IMPL", "DKDV_REDUCE", "DQ_REDUCE", "KEY_CHUNK",
                            "ITEM_CHUNKS", "KEY_TILE", "KEY_NUM_WARPS",
                            "WIN_TILE", "WIN_NUM_WARPS", "WIN_GROUP_HEADS", "WIN_DKDV_KEYS",
                            "WIN_DKDV_KEYS_FIRST",
                            "DEC_NUM_WARPS", "DEC_SEL_TILE", "KEY_FWD_NUM_STAGES",
                            "KEY_BWD_NUM_STAGES", "CHOICE_NUM_STAGES", "WIN_FWD_NUM_STAGES",
                            "WIN_BWD_NUM_STAGES", "DEC_NUM_STAGES",
                            "CHOICE_OVERLAP_PRECISION", "CHOICE_INTERIOR_MIN_TILES", "PLAN_SEARCH",
                            "SELECTED_COMBINE_BARRIER")},
                 window=nsa.PALLAS_WINDOW, pallas_decode=nsa.PALLAS_DECODE)

  def save():
    with open(a.out, "w") as f:
      json.dump(results, f, indent=1)

  def parse(text: str, flag: str) -> list[tuple[int, int]]:  # "32x2048,8x8192", checked now
    cases = []
    for case in filter(None, (c.strip() for c in text.split(","))):
      sizes = case.split("x")
      if len(sizes) != 2 or not all(n.isdigit() and int(n) > 0 for n in sizes):
        p.error(f"{flag}: {case!r} is not ROWSxTOKENS, e.g. 32x2048")
      cases.append((int(sizes[0]), int(sizes[1])))
    return cases

  cases, decode_cases = parse(a.cases, "--cases"), parse(a.decode, "--decode")
  breakdown_cases = parse(a.breakdown_cases or a.cases, "--breakdown-cases")
  variants = [v for v in a.variants.split(",") if v]
  for v in variants:
    if v not in VARIANTS:
      p.error(f"--variants: unknown {v!r}; known: {sorted(VARIANTS)}")
  impls = [i for i in a.impls.split(",") if i]
  for i in impls:
    if i not in nsa.IMPLS:
      p.error(f"--impls: unknown {i!r}; known: {list(nsa.IMPLS)}")
  if a.iters < 1:
    p.error(f"--iters: at least 1 timed call, got {a.iters}")
  try:  # before minutes of checks and timing
    faults.check_writable_file(a.out, "--out")
  except faults.OutputError as err:
    p.error(str(err))
  if nsa_pallas.use_interpret():  # a GPU check: say so before minutes of interpreted kernels
    print(f"nsa_kernel_check: no GPU ({jax.default_backend()}): the Pallas kernels run in "
          "interpret mode, the checks take minutes and the timings mean nothing",
          file=sys.stderr, flush=True)
  if not a.skip_check:
    check(results, variants)
    save()
  bench(results, cases, a.iters, impls, variants, save, a.packed)
  if a.decode:
    decode_bench(results, decode_cases, a.iters, impls, variants, save, a.decode_calls)
  if a.breakdown:
    breakdown(results, breakdown_cases, a.iters, a.sweep, variants, save)
  save()


if __name__ == "__main__":
  main()
