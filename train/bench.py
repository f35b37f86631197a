"""Benchmarks of Tiny-ONN on the accelerator: training step, EAVI, decoding, NSA core, DynMoE.

  python -m train.bench [--config configs/arc1.yaml] [--quick] [--out bench.json]
                        [--only train,eavi,decode,nsa,moe,layers] [--lens 512,2048]
                        [--routings target] [--variant part_f32] [section.key=value ...]

Sections (each: compile first, warm up, then time ``iters`` calls with ``jax.block_until_ready``
after each one; the median is reported):

* ``train``: the teacher-forcing step (``steps.train_step``, state donated) at every length of
  ``data.buckets``: tokens/s and model-FLOPs utilisation (:func:`model_flops_per_token`); and
  the same step queued back to back as a training loop runs it (``loop_ms``,
  ``loop_tokens_per_s``, ``loop_mfu``: :func:`time_loop`), which hides the host's dispatch;
  each twice (``routing``): with the fresh parameters' experts and at the SDL target's
  density, where a run routes after its first few hundred steps (:func:`target_routing`);
  ``--routings target`` (or ``init``) times one of them.
* ``eavi``: ``steps.eavi_step`` against ``steps.train_step`` on the same batch (the ratio), with
  each ``eavi.rollout`` (the parallel one at ``eavi.passes`` passes, as an untrained model
  never reaches the fixed point), and the sequential excursion alone (``decode.generate`` for
  ``steps.answer_budget`` tokens, ``rollout_budget``: EAVI's answer budget in the config's
  data at that length, ``BatchStream.answer_budgets``): rollout tokens/s; the parallel
  excursion alone and the alignment pass alone (forward+backward), each
  ``eavi.continuation`` way (branch: the prompt once; rows: whole rows), so that "auto"
  (branch) can be checked on the device.
* ``decode``: the sequential excursion (as ``eavi``'s, the same measurement where both run)
  with each set of decoding kernels (``decode.DECODE_KERNELS``: ``split``, ``fused``,
  ``fused_moe`` beside the default ``fused_xla_block``; on a GPU only, where they are Triton
  kernels: elsewhere the default alone): per set ``ms``, ``tokens_per_s`` and ``speedup`` over
  the default's in the same run; and the default's one-token steps alone, from a prompt cache
  computed before the timed call, as EAVI's alignment gives it (``steps_ms``,
  ``steps_tokens_per_s``; ``prefill_ms``, the difference). Apart from ``eavi``, so that the
  decoding kernels can be timed without EAVI's steps (a minute's compile each).
* ``nsa``: ``nsa_core`` forward+backward for each ``impl`` against full causal attention
  (``jax.nn.dot_product_attention``, cuDNN on GPU) at the model's head configuration, batch 1,
  T = 1k .. 32k; a case that runs out of memory is recorded as ``"oom"``.
* ``layers``: one attention layer of each variant (``model.attention`` = full, nsa, dynsmlora;
  projections included) and the DynMoE layer (``model.moe_impl``, trained density),
  forward+backward (gradients of the input and every parameter) on [batch_size, T] in the
  compute dtype, at every length of ``--lens``; each as a ratio to the ``full`` layer. Each
  case is timed one call at a time (``ms``) and queued back to back (``loop_ms``,
  :func:`time_loop`; ``loop_ratio_to_full``, ``loop_ratio_to_dense``), which leaves out the
  ~0.6 ms a call costs on the host and so compares the kernels alone.
* ``moe``: the DynMoE all-experts einsum (``moe.experts_dense``; ``dense_autodiff``: the same
  differentiated by autodiff, ``moe.experts_reference``, its baseline) against the sparse
  token-to-expert dispatches of ``onn_jax.model.moe`` (``moe.experts_sparse``: pairs laid out
  by expert, then ``jax.lax.ragged_dot`` or a batched matmul per tile), forward and
  forward+backward on a synthetic routing, and the crossover token count from which the sparse
  dispatch is faster; then the DynMoE layer at the trained density (thresholds such that each
  token uses ``sdl_target_active * num_experts`` experts on average, as SDL trains the gate
  to), forward+backward, ``model.moe_impl=dense`` against each sparse impl and ``reference``
  (the all-experts einsum differentiated by autodiff) at each (batch, T) of
  ``Sizes.moe_layer_shapes`` (32 x 2048 and 8 x 8192) with every expert used by the same share
  of the tokens (routing "even"), and at the first of them with the experts' shares of a
  trained layer (routing "trained", :data:`TRAINED_EXPERT_LOADS`: one expert on 85% of the
  tokens), as ratios to dense and to reference (``layers_dynmoe`` in the JSON, with the
  measured experts per token and the pairs against the sparse capacity). Until 2026-12-06 the
  ``layers`` section ran this table first, so timing one attention layer at a new length
  cost its 21 compiled layers too.

Synthetic batches (random colour tokens, every position valid, an answer of ~200 tokens ending
~100 tokens before the end) are used throughout: routing statistics are those of the untrained
model, except in the DynMoE rows of ``layers``. Results are printed as tables, written as JSON
(rewritten after every section, so a run cut short keeps what it measured) and summarised as a
markdown table for the README.

``--profile DIR`` also traces each timed train and EAVI step, the rollout and each layer of the
``layers`` section (``jax.profiler``, after timing them) and adds to their rows a summary of
the device kernels by name and by model scope (:mod:`onn_jax.profiling`); the traces stay under DIR.

``--variant NAME`` runs everything under one of ``train.nsa_kernel_check``'s NSA kernel
settings (``VARIANTS``: e.g. ``part_f32``, the selected branch's partials in float32, the
default until 2026-12-06), so that a setting is timed in the layers and the step as well as in
``nsa_core``: one process for the defaults, one for the setting, compared as ratios to the
baselines each measures (the cuDNN layer, the anchor).

``--quick`` swaps in a toy model and toy sizes so that everything runs on a CPU (1.6 minutes on
a 2-core AMD EPYC, compilation included, 2026-12-05): a smoke check of this program, not a
measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from onn_jax import config, faults, output, profiling, steps
from onn_jax.config import Config, ModelConfig
from onn_jax.data.pipeline import BatchStream, build_training_tasks, collate_packed
from onn_jax.data.serialize import Example
from onn_jax.data.tokens import PAD, VOCAB_SIZE
from onn_jax.decode import (DECODE_KERNELS, decode_kernels, generate, parallel_rollout,
                             prefill)
from onn_jax.model import attention, nsa, nsa_pallas
from onn_jax.model.flops import (  # noqa: F401 (bench.peak_flops etc. stay importable)
    forward_flops_per_token, model_flops_per_token, peak_flops)
from onn_jax.model.layers import dtype_of
from onn_jax.model import moe
from onn_jax.model.moe import (cosine_similarity, experts_dense, experts_reference,
                               experts_sparse, init_expert_params, pair_capacity)
from onn_jax.model.nsa import nsa_core, num_compressed_blocks
from onn_jax.model.transformer import Transformer, moe_layer, outside_tf
from train.nsa_kernel_check import VARIANTS, variant as kernel_setting

SECTIONS = ("train", "eavi", "decode", "nsa", "moe", "layers")
LAYERS = ("full", "nsa", "dynsmlora", "dynmoe")  # "full" first: the others are ratios to it
SPARSE_IMPLS = ("ragged", "tiled", "batched")  # model.moe_impl values that dispatch sparsely
DENSE_VARIANTS = ("dense", "dense_autodiff")  # moe section: experts_dense and its baseline
# layers section, DynMoE at the trained density: the all-experts einsum by autodiff (the
# baseline of issue #17's goal), the same with the hand-written backward pass, the sparse ones.
DYNMOE_IMPLS = ("reference", "dense") + SPARSE_IMPLS
# The share of the tokens that uses each expert in a trained DynMoE layer, sorted: the last layer
# of a `configs/arc1.yaml` run at step 7000 (tokens_per_expert / 65536 tokens a batch in
# docs/bench/arc1_shipped_recipe_scored_metrics_h200_2026-12-02.jsonl). 3.93 experts a token,
# as SDL's target of 4; but one expert on 85% of the tokens and six over the even share (25%),
# while ten are nearly idle. The other layers of steps 6900-7000 were alike (busiest 43-87%). The
# layers section's "trained" routing (:func:`trained_loads`): a sparse dispatch has to fit it.
TRAINED_EXPERT_LOADS: tuple[float, ...] = (0.846, 0.751, 0.631, 0.577, 0.496, 0.429, 0.083,
                                           0.028, 0.027, 0.023, 0.016, 0.014, 0.007, 0.005,
                                           0.001, 0.0)
ROUTINGS = ("even", "trained")  # the DynMoE layer rows' routings (bench_dynmoe_density)
ROUTINGS_STEP = ("init", "target")  # the teacher-forcing step's (bench_train)
NSA_IMPLS = ("reference", "blockwise", "pallas", "auto")
# Off GPU the Pallas kernels run in interpret mode (a loop over programs): measured up to here.
PALLAS_INTERPRET_MAX_T = 2048
# The reference NSA builds [B, T, H, S] float32 logits (several live at once, and again in the
# backward pass): skip it when one of them would exceed this many bytes.
REFERENCE_MAX_BYTES = 8e9

QUICK_OVERRIDES: tuple[str, ...] = (
    "model.d_model=32", "model.num_layers=1", "model.num_heads=4", "model.num_kv_groups=2",
    "model.head_dim=8", "model.block_len=8", "model.block_stride=4", "model.select_len=16",
    "model.num_select=4", "model.window=32", "model.num_experts=4", "model.expert_hidden=32",
    "model.moe_tile=16", "model.moe_capacity=1.5", "model.compute_dtype=float32",
    "data.buckets=[128]", "data.pack_len=0", "data.max_batch_tokens=0", "data.max_grid=5",
    "train.batch_size=2",
)


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What each section measures and how often."""
  warmup: int
  iters: int
  eavi_iters: int
  nsa_lens: tuple[int, ...]
  moe_tokens: tuple[int, ...]
  moe_ks: tuple[int, ...]  # mean active experts per token
  moe_tile: int  # rows per tile of the tiled sparse dispatch
  moe_passes: tuple[str, ...]  # "fwd" and/or "fwd_bwd"
  data_batches: int  # batches of the config's data whose real-token share is measured
  # (batch, T) of the DynMoE layer at the trained density, dense against the sparse impls
  moe_layer_shapes: tuple[tuple[int, int], ...]


FULL_SIZES = Sizes(warmup=2, iters=10, eavi_iters=3,
                   nsa_lens=(1024, 2048, 4096, 8192, 16384, 32768),
                   moe_tokens=(1024, 4096, 16384, 65536), moe_ks=(1, 2, 4), moe_tile=128,
                   moe_passes=("fwd", "fwd_bwd"), data_batches=20,
                   moe_layer_shapes=((32, 2048), (8, 8192)))
QUICK_SIZES = Sizes(warmup=1, iters=2, eavi_iters=1, nsa_lens=(256, 512),
                    moe_tokens=(64, 256), moe_ks=(1, 2), moe_tile=16, moe_passes=("fwd_bwd",),
                    data_batches=2, moe_layer_shapes=((2, 128),))


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Timing:
  compile_s: float
  median_ms: float
  min_ms: float
  iters: int
  # Back to back, as a training loop runs (:func:`time_loop`); "oom" when only that ran out of
  # memory (the calls it queues can hold more at once than one call).
  loop_ms: float | str | None = None


def compile_fn(fn: Callable, args: Sequence[Any], donate: tuple[int, ...] = ()):
  """``jax.jit(fn)`` compiled for ``args``: (executable, seconds spent lowering + compiling)."""
  start = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
  return compiled, time.perf_counter() - start


def time_compiled(compiled, args: Sequence[Any], *, warmup: int, iters: int,
                  carry: bool = False) -> tuple[float, float, Any]:
  """Median and min milliseconds of ``compiled(*args)`` over ``iters`` calls after ``warmup``.

  With ``carry`` the first output replaces the first argument after every call (a train step
  that donates its state). Returns (median_ms, min_ms, last output).
  """
  args = tuple(args)
  times_s, out = [], None
  for i in range(warmup + iters):
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    if i >= warmup:
      times_s.append(time.perf_counter() - start)
    if carry:
      args = (out[0],) + args[1:]
  return 1e3 * statistics.median(times_s), 1e3 * min(times_s), out


def time_loop(compiled, args: Sequence[Any], *, iters: int, repeats: int = 3,
              carry: bool = True, fresh: Callable[[], Any] | None = None) -> float:
  """Milliseconds per call of a train step run as a training loop runs it: calls queued back to
  back, each on the state the last returned (``carry``: carried, as a donated state must be;
  without it every call takes ``args`` as they are, e.g. a layer's forward+backward), one
  ``jax.block_until_ready`` after the last. The host queues the next call while the device runs
  this one, so the time a call spends on the host (dispatching an executable of thousands of
  kernels over a state of hundreds of arrays: 11-20 ms at arc1 on an H200 host; ~0.6 ms for one
  layer) is hidden, as in ``train.main``'s loop, where :func:`time_compiled`'s one-at-a-time
  calls pay it every time.

  Each of ``repeats`` rounds queues ``iters`` calls, then ``2 * iters``: their difference over
  ``iters`` is the time a call adds to a loop, without the costs a loop pays once (the first
  call's dispatch, which no device work overlaps, and the final wait; they added ~0.6 ms /
  ``iters`` to a layer's time). The median of the rounds. A round whose difference is not
  positive (a call too short for the clock's noise) counts the longer loop's mean instead.
  ``fresh``: each loop starts from ``fresh()`` as its first argument (made before the clock
  starts), so no loop carries the state further than ``2 * iters`` steps: a train step moves
  the experts' thresholds, hence their routing and the step's cost."""
  args = tuple(args)

  def loop_s(n: int) -> float:
    nonlocal args
    if fresh is not None:
      args = (jax.block_until_ready(fresh()),) + args[1:]
    start, out = time.perf_counter(), None
    for _ in range(n):
      out = compiled(*args)
      if carry:
        args = (out[0],) + args[1:]
    jax.block_until_ready(out)
    return time.perf_counter() - start

  per_call_s = []
  for _ in range(repeats):
    short, long = loop_s(iters), loop_s(2 * iters)
    per_call_s.append((long - short) / iters if long > short else long / (2 * iters))
  return 1e3 * statistics.median(per_call_s)


def time_loop_or_oom(compiled, args: Sequence[Any], *, iters: int, carry: bool = True,
                     fresh: Callable[[], Any] | None = None) -> float | str:
  """:func:`time_loop`, or ``"oom"`` when only the calls queued back to back ran out of memory
  (they can hold more at once than one call)."""
  try:
    return time_loop(compiled, args, iters=iters, carry=carry, fresh=fresh)
  except Exception as err:  # noqa: BLE001 - anything but an OOM is raised again
    if not is_oom(err):
      raise
    return "oom"


def benchmark(fn: Callable, args: Sequence[Any], *, warmup: int, iters: int,
              donate: tuple[int, ...] = (), carry: bool = False, loop: bool = False
              ) -> tuple[Timing, Any]:
  """Compiles, warms up and times ``fn(*args)`` (``loop``: also back to back, the Timing's
  ``loop_ms``, :func:`time_loop`). Returns (Timing, last output of the one-at-a-time calls)."""
  compiled, compile_s = compile_fn(fn, args, donate)
  median_ms, min_ms, out = time_compiled(compiled, args, warmup=warmup, iters=iters, carry=carry)
  loop_ms = None
  if loop:
    loop_args = (out[0],) + tuple(args[1:]) if carry else args
    loop_ms = time_loop_or_oom(compiled, loop_args, iters=iters, carry=carry)
  return Timing(compile_s, median_ms, min_ms, iters, loop_ms), out


def measure(fn: Callable, args: Sequence[Any], sizes: Sizes, loop: bool = False
            ) -> dict[str, Any]:
  """``benchmark`` that turns a failure into a result: ``{"ms", "min_ms", "compile_s"}`` (with
  ``loop``, also ``loop_ms``: the same call queued back to back, :func:`time_loop` without
  carry; or ``loop_status: "oom"`` where only that ran out of memory), or ``{"status": "oom"}``,
  or ``{"status": "error", "error": ...}`` (printed to stderr) for anything else XLA or the code
  raised, so one unsupported case does not end the run."""
  try:
    timing, _ = benchmark(fn, args, warmup=sizes.warmup, iters=sizes.iters, loop=loop)
  except Exception as err:  # noqa: BLE001 - recorded in the results
    if is_oom(err):
      return {"status": "oom"}
    print(f"bench: error: {_short(err)}", file=sys.stderr)
    return {"status": "error", "error": _short(err)}
  result = {"ms": timing.median_ms, "min_ms": timing.min_ms, "compile_s": timing.compile_s}
  if timing.loop_ms == "oom":
    result["loop_status"] = "oom"
  elif loop:
    result["loop_ms"] = timing.loop_ms
  return result


def add_ratios(row: dict[str, Any], names: Sequence[str], base: str, suffix: str) -> None:
  """``ratio_to_<suffix>`` (and ``loop_ratio_to_<suffix>`` where both have ``loop_ms``) of each
  of ``names``' cases in ``row`` against ``row[base]``."""
  for key in ("ms", "loop_ms"):
    base_ms = row[base].get(key)
    for name in names:
      if base_ms and row[name].get(key):
        row[name][f"{key[:-2]}ratio_to_{suffix}"] = row[name][key] / base_ms


def is_oom(err: BaseException) -> bool:
  """True for an accelerator (or host) out-of-memory error raised by XLA."""
  text = str(err)
  return ("RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text
          or isinstance(err, MemoryError))


def _short(err: BaseException) -> str:
  lines = str(err).strip().splitlines() or [type(err).__name__]
  return f"{type(err).__name__}: {lines[0][:200]}"


# ----------------------------------------------------------------------------------------------
# Synthetic data
# ----------------------------------------------------------------------------------------------

def answer_span(seq_len: int) -> tuple[int, int]:
  """(answer_start, answer_len) of a synthetic example: ~200 answer tokens, ~100 after them."""
  answer_len = min(200, seq_len // 4)
  return seq_len - answer_len - min(100, seq_len // 8), answer_len


def synthetic_batch(batch: int, seq_len: int, seed: int = 0) -> dict[str, jax.Array]:
  """A training batch with the keys of ``pipeline.collate``: every position valid.

  inputs/targets int32 [B, T] (random colours; targets are inputs shifted by one), loss_mask
  float32 [B, T] (the answer's targets), valid bool [B, T],
  answer_start/answer_len int32 [B].
  """
  rng = np.random.default_rng(seed)
  tokens_BT1 = rng.integers(0, 10, size=(batch, seq_len + 1), dtype=np.int32)
  start, length = answer_span(seq_len)
  out = {k: jnp.asarray(v) for k, v in {
      "inputs": tokens_BT1[:, :-1], "targets": tokens_BT1[:, 1:],
      "valid": np.ones((batch, seq_len), bool),
      "answer_start": np.full(batch, start, np.int32),
      "answer_len": np.full(batch, length, np.int32)}.items()}
  out["loss_mask"] = steps.answer_mask(out)
  return out


# Sequence lengths of a synthetic packed row, as fractions of the row (the arc1 data packs ~2.6
# sequences of ~900 tokens into each 2048-token row).
PACKED_FRACTIONS = (0.34, 0.32, 0.29)


def synthetic_packed_batch(batch: int, seq_len: int, align: int, seed: int = 0
                           ) -> dict[str, jax.Array]:
  """A packed training batch (``pipeline.collate_packed``'s keys): each row holds sequences of
  ``PACKED_FRACTIONS`` of its length, each with :func:`answer_span`'s answer."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(batch):
    row = []
    for frac in PACKED_FRACTIONS:
      n = max(align, int(frac * seq_len) // align * align)
      tokens = rng.integers(0, 10, size=n + 1, dtype=np.int32)
      start, length = answer_span(n)
      mask = np.zeros(n + 1, bool)
      mask[start:start + length] = True
      row.append(Example(tokens, mask, start, length))
    rows.append(row)
  return {k: jnp.asarray(v) for k, v in collate_packed(rows, seq_len, align).items()}


def config_stream(cfg: Config) -> BatchStream:
  """The training batches of the config's own data."""
  tasks, _ = build_training_tasks(cfg.data, log=lambda *_: None)
  return BatchStream(tasks, cfg.data, cfg.train.batch_size, cfg.train.seed,
                     pack_align=attention.pack_alignment(cfg.model),
                     answer_quantile=cfg.eavi.budget_quantile)


def data_real_fraction(cfg: Config, num_batches: int) -> dict[str, Any]:
  """The share of real (not padding) tokens in the config's own training batches.

  ``buckets``: for each bucket length, the mean share over ``num_batches`` batches drawn in it
  (one sequence per row) and the bucket's probability; ``packed``: the mean share of
  ``num_batches`` batches of a packing stage (``data.pack``): rows of ``data.pack_len``, and the
  unpacked rows of a longer bucket at the steps drawn for one.
  """
  stream = config_stream(cfg)
  shares: dict[int, list[float]] = {length: [] for length in stream.buckets}
  step = 0
  while min(len(v) for v in shares.values()) < num_batches and step < 100 * num_batches:
    batch = stream.batch(step)
    shares[batch["inputs"].shape[1]].append(float(batch["valid"].mean()))
    step += 1
  packed = [float(stream.packed_batch(s)["valid"].mean()) for s in range(num_batches)]
  return {"buckets": {length: {"real_frac": float(np.mean(v)) if v else None,
                               "prob": float(p)}
                      for (length, v), p in zip(shares.items(), stream.bucket_probs)},
          "packed": float(np.mean(packed))}


# ----------------------------------------------------------------------------------------------
# Section: train and eavi
# ----------------------------------------------------------------------------------------------

def trace_summary(name: str, compiled, args: Sequence[Any], folder: Path,
                  carry: bool = False) -> dict[str, Any]:
  """``--profile``'s trace of ``compiled(*args)`` into ``folder/name`` and its summary
  (onn_jax/profiling.py), printed; a failed trace is a status, never the end of the timings."""
  try:
    summary = profiling.profile(compiled, args, folder / name, carry=carry)
  except Exception as err:  # noqa: BLE001 - a failed trace must not lose the timings
    summary = {"status": "oom" if is_oom(err) else "error", "error": _short(err)}
    print(f"-- profile {name}: {summary}", file=sys.stderr, flush=True)
    return summary
  print(f"-- profile {name}: {profiling.table(summary)}", flush=True)
  return summary


class StepRunner:
  """Compiles each (step kind, seq_len) once and times it on fresh states, reusing executables
  across the train and eavi sections."""

  def __init__(self, cfg: Config, sizes: Sizes, profile_dir: Path | None = None,
               answer_budgets: dict[int, int] | None = None):
    self.cfg, self.sizes = cfg, sizes
    # {T: A}: the unpacked batches at length T carry answer_tokens A wide, EAVI's answer budget
    # in the config's data at that bucket (BatchStream.answer_budgets); other lengths none
    # (steps.answer_budget: the longest answer data.max_grid allows).
    self.answer_budgets = answer_budgets or {}
    # --profile: each timed step is then traced too (onn_jax/profiling.py), its summary kept here
    # by name (e.g. "train_T2048_packed") for the section's rows.
    self.profile_dir = profile_dir
    self.profiles: dict[str, dict] = {}
    self.model = Transformer(cfg.model)
    self.eavi_model = outside_tf(self.model)  # EAVI's parts, as eavi_step runs them
    self.donate = () if jax.default_backend() == "cpu" else (0,)  # CPU cannot reuse buffers
    self._compiled: dict[tuple[str, int, bool], tuple[Any, float]] = {}
    # {T: (Timing, budget)}: the default kernels' rollout, which the eavi and decode sections
    # share (default_rollout).
    self._default_rollouts: dict[int, tuple[Timing, int]] = {}
    # Jitted: an eager init dispatches thousands of small ops. Each call returns new buffers,
    # as a donated state needs.
    self._init = jax.jit(functools.partial(steps.init_state, cfg, self.model))

  def fresh_state(self):
    return self._init(jax.random.PRNGKey(0))

  def batch(self, seq_len: int, packed: bool = False) -> dict[str, jax.Array]:
    if packed:
      return synthetic_packed_batch(self.cfg.train.batch_size, seq_len,
                                    attention.pack_alignment(self.cfg.model))
    batch = synthetic_batch(self.cfg.train.batch_size, seq_len)
    if seq_len in self.answer_budgets:  # as pipeline.collate writes it: PAD after the answer
      A = self.answer_budgets[seq_len]
      in_answer_BA = jnp.arange(A)[None] < batch["answer_len"][:, None]
      batch["answer_tokens"] = jnp.where(in_answer_BA, steps.answer_targets(batch, A), PAD)
    return batch

  def time_step(self, kind: str, seq_len: int, iters: int, packed: bool = False,
                rollout: str | None = None, loop: bool = False, routing: str = "init"
                ) -> tuple[Timing, dict]:
    """Times ``train_step`` or ``eavi_step`` at [batch_size, seq_len] (``packed``: on packed
    rows; ``rollout``: EAVI's ``eavi.rollout``, default the config's; ``loop``: also back to
    back, :func:`time_loop`; ``routing``: "init", the fresh parameters' experts, or "target",
    thresholds at the SDL target's density on this batch, :func:`target_routing`; the same
    program either way): (Timing, last metrics)."""
    step = {"train": steps.train_step, "eavi": steps.eavi_step}[kind]
    rollout = rollout or self.cfg.eavi.rollout
    cfg = config.replace(self.cfg, eavi={"rollout": rollout})
    fn = functools.partial(step, model=self.model, cfg=cfg)
    batch = self.batch(seq_len, packed)
    fresh = self.fresh_state
    if routing == "target":
      params = target_routing(self.model, self.fresh_state().params, batch)
      # A copy each time: a donated state's buffers are gone after its step.
      fresh = lambda: self.fresh_state().replace(  # noqa: E731
          params=jax.tree.map(jnp.copy, params))
    elif routing != "init":
      raise ValueError(f"time_step: routing={routing!r}: expected 'init' or 'target'")
    state = fresh()
    key = (kind, seq_len, packed, rollout)
    if key not in self._compiled:
      self._compiled[key] = compile_fn(fn, (state, batch), self.donate)
    compiled, compile_s = self._compiled[key]
    median_ms, min_ms, (state, metrics) = time_compiled(
        compiled, (state, batch), warmup=self.sizes.warmup, iters=iters, carry=True)
    loop_ms = (time_loop_or_oom(compiled, (state, batch), iters=iters, fresh=fresh) if loop
               else None)
    name = f"{kind}_T{seq_len}" + ("_packed" if packed else "") + (
        f"_{rollout}" if kind == "eavi" else "") + ("_target" if routing == "target" else "")
    self.profile(name, compiled, (fresh(), batch), carry=True)
    return Timing(compile_s, median_ms, min_ms, iters, loop_ms), metrics

  def profile(self, name: str, compiled, args: Sequence[Any], carry: bool = False) -> None:
    """With ``--profile``: traces ``compiled(*args)`` (onn_jax/profiling.py) into
    ``profile_dir/name`` and keeps the summary in ``self.profiles[name]``, once per name."""
    if self.profile_dir is None or name in self.profiles:
      return
    self.profiles[name] = trace_summary(name, compiled, args, self.profile_dir, carry)

  def time_rollout(self, seq_len: int, decode: str | None = None, steps_only: bool = False
                   ) -> tuple[Timing, int]:
    """Times the EAVI excursion alone: (Timing, tokens generated per example). ``decode``:
    the decoding step's kernels (``decode.DECODE_KERNELS``; default: as set). ``steps_only``:
    its one-token steps from a prompt cache computed before the timed call, as EAVI's
    alignment gives it (``branch_alignment_after_rollout``), rather than with the prompt's own
    prefill."""
    cfg, batch = self.cfg, self.batch(seq_len)
    budget = steps.answer_budget(batch, cfg)
    fn = functools.partial(generate, self.eavi_model, max_new=budget, capacity=seq_len,
                           feed=cfg.eavi.feed, temperature=cfg.eavi.temperature)
    params, rng = self.fresh_state().params, jax.random.PRNGKey(1)
    with decode_kernels(decode) if decode else contextlib.nullcontext():
      if steps_only:
        cache, first_BV = jax.jit(functools.partial(prefill, self.eavi_model, capacity=seq_len))(
            params, batch["inputs"], batch["answer_start"])
        args = (params, batch["inputs"], batch["answer_start"], cache, first_BV, rng)
        compiled, compile_s = compile_fn(
            lambda p, x, n, c, f, r: fn(p, x, n, rng=r, prompt_cache=c, first_logits_BV=f), args)
      else:
        args = (params, batch["inputs"], batch["answer_start"], rng)
        compiled, compile_s = compile_fn(lambda p, x, n, r: fn(p, x, n, rng=r), args)
    median_ms, min_ms, _ = time_compiled(compiled, args, warmup=self.sizes.warmup,
                                         iters=self.sizes.eavi_iters)
    self.profile(f"rollout_T{seq_len}" + (f"_{decode}" if decode else "")
                 + ("_steps" if steps_only else ""), compiled, args)
    return Timing(compile_s, median_ms, min_ms, self.sizes.eavi_iters), budget

  def default_rollout(self, seq_len: int) -> tuple[Timing, int]:
    """:meth:`time_rollout` with the kernels as set, timed once a run for the eavi and decode
    sections (nothing in a bench run changes the settings between them)."""
    if seq_len not in self._default_rollouts:
      self._default_rollouts[seq_len] = self.time_rollout(seq_len)
    return self._default_rollouts[seq_len]

  def time_parallel_rollout(self, seq_len: int, continuation: str) -> Timing:
    """Times the EAVI excursion alone with ``eavi.rollout=parallel`` (all ``eavi.passes``
    passes, from an untrained model) and its passes run the ``continuation`` way."""
    cfg, batch = self.cfg, self.batch(seq_len)
    fn = functools.partial(
        parallel_rollout, self.eavi_model, passes=cfg.eavi.passes, capacity=seq_len,
        feed=cfg.eavi.feed, temperature=cfg.eavi.temperature,
        shared_prompt=continuation == "branch")
    guess_BA = steps.answer_targets(batch, steps.answer_budget(batch, cfg))
    timing, _ = benchmark(lambda p, x, n, g, need: fn(p, x, n, g, stop_after_B=need).tokens_BA,
                          (self.fresh_state().params, batch["inputs"], batch["answer_start"],
                           guess_BA, batch["answer_len"]),
                          warmup=self.sizes.warmup, iters=self.sizes.eavi_iters)
    return timing

  def time_alignment(self, seq_len: int, loss_fn) -> Timing:
    """Times the EAVI alignment pass alone (``loss_fn``: ``steps.alignment_loss`` or
    ``steps.alignment_loss_rows``), forward and backward, with the ground truth as the
    excursion (the cost does not depend on what is fed)."""
    cfg, batch = self.cfg, self.batch(seq_len)
    fed_BAV = jax.nn.one_hot(steps.answer_targets(batch, steps.answer_budget(batch, cfg)),
                             VOCAB_SIZE, dtype=jnp.float32)
    grad = jax.grad(lambda p, b, fed: loss_fn(p, b, fed, model=self.eavi_model, cfg=cfg)[0])
    timing, _ = benchmark(grad, (self.fresh_state().params, batch, fed_BAV),
                          warmup=self.sizes.warmup, iters=self.sizes.eavi_iters)
    return timing


def bench_train(runner: StepRunner, lens: Sequence[int], peak: float | None,
                data: dict[str, Any] | None, routings: Sequence[str] = ROUTINGS_STEP
                ) -> list[dict]:
  """Teacher-forcing step at each length: tokens/s, model FLOPs and MFU; with ``data``
  (:func:`data_real_fraction`) also real tokens/s, the share of the config's batches at that
  length that is not padding times tokens/s. With ``data.pack`` the longest length is timed on
  packed rows too (``packed: true``). Each case twice (``routing``): with the fresh
  parameters' experts ("init": about half of them a token) and at the SDL target's density
  ("target", :func:`target_routing`), where a run's routing is after its first few hundred
  steps; a sparse expert dispatch computes its dense fallback at the first, the sparse path
  at the second (``routings``: those of them to time)."""
  m, B = runner.cfg.model, runner.cfg.train.batch_size
  cases = [(T, False) for T in lens]
  if runner.cfg.data.pack:
    cases.append((max(lens), True))
  rows = []
  for (T, packed), routing in itertools.product(cases, routings):
    row: dict[str, Any] = {"seq_len": T, "batch": B, "packed": packed, "routing": routing}
    try:
      timing, metrics = runner.time_step("train", T, runner.sizes.iters, packed, loop=True,
                                         routing=routing)
      profile = runner.profiles.get(f"train_T{T}" + ("_packed" if packed else "")
                                    + ("_target" if routing == "target" else ""))
    except Exception as err:  # noqa: BLE001 - an OOM is a result; anything else is re-raised
      if not is_oom(err):
        raise
      rows.append({**row, "status": "oom"})
      continue
    experts = float(metrics["experts_per_token"])
    tokens_per_s = B * T / (timing.median_ms / 1e3)
    flops = model_flops_per_token(m, T, experts)
    executed = model_flops_per_token(m, T, float(m.num_experts))  # the dense path's real work
    real = None
    if data is not None:
      real = data["packed"] if packed else data["buckets"].get(T, {}).get("real_frac")
    row.update(step_ms=timing.median_ms, min_ms=timing.min_ms, compile_s=timing.compile_s,
               tokens_per_s=tokens_per_s, real_frac=real,
               real_tokens_per_s=None if real is None else real * tokens_per_s,
               experts_per_token=experts,
               model_flops_per_token=flops, executed_flops_per_token=executed,
               model_tflops_per_s=flops * tokens_per_s / 1e12,
               mfu=None if peak is None else flops * tokens_per_s / peak,
               executed_flops_util=None if peak is None else executed * tokens_per_s / peak,
               loss=float(metrics["loss"]))
    # The same step queued back to back, as train.main's loop runs it (time_loop).
    if timing.loop_ms == "oom":
      row["loop_status"] = "oom"
    else:
      loop_tokens_per_s = B * T / (timing.loop_ms / 1e3)
      row.update(loop_ms=timing.loop_ms, loop_tokens_per_s=loop_tokens_per_s,
                 loop_real_tokens_per_s=None if real is None else real * loop_tokens_per_s,
                 loop_mfu=None if peak is None else flops * loop_tokens_per_s / peak)
    if profile is not None:
      row["profile"] = profile
    rows.append(row)
  return rows


def bucket_mix(rows: list[dict], data: dict[str, Any]) -> dict[str, Any] | None:
  """Real tokens/s of a run that draws buckets as the config's data does, one sequence per
  row: expected real tokens over expected step time (None unless every bucket was timed), at
  the target routing (:func:`bench_train`)."""
  timed = {r["seq_len"]: r for r in rows
           if not r["packed"] and r.get("routing") == "target" and "step_ms" in r}
  buckets = data["buckets"]
  if any(length not in timed or b["real_frac"] is None for length, b in buckets.items()):
    return None
  real = sum(b["prob"] * b["real_frac"] * timed[length]["batch"] * length
             for length, b in buckets.items())
  seconds = sum(b["prob"] * timed[length]["step_ms"] / 1e3 for length, b in buckets.items())
  tokens = sum(b["prob"] * timed[length]["batch"] * length for length, b in buckets.items())
  return {"real_tokens_per_s": real / seconds, "tokens_per_s": tokens / seconds,
          "real_frac": real / tokens}


def bench_eavi(runner: StepRunner, lens: Sequence[int]) -> list[dict]:
  """EAVI step against a teacher-forcing step on the same batch, with each ``eavi.rollout``
  (``eavi_step_ms``, ``ratio``: the config's); the sequential rollout alone: tokens/s; the
  parallel rollout alone and the alignment pass alone (forward and backward), each
  ``eavi.continuation`` way. An untrained model's parallel rollout never reaches its fixed
  point: it runs all ``eavi.passes`` passes, the most it costs."""
  B = runner.cfg.train.batch_size
  rows = []
  for T in lens:
    row: dict[str, Any] = {"seq_len": T, "batch": B}
    try:
      tf, _ = runner.time_step("train", T, runner.sizes.iters)
      eavi = {kind: runner.time_step("eavi", T, runner.sizes.eavi_iters, rollout=kind)
              for kind in ("sequential", "parallel")}
      rollout, budget = runner.default_rollout(T)
      align = {name: runner.time_alignment(T, fn) for name, fn in (
          ("branch", steps.alignment_loss), ("rows", steps.alignment_loss_rows))}
      passes = {name: runner.time_parallel_rollout(T, name) for name in ("branch", "rows")}
    except Exception as err:  # noqa: BLE001
      if not is_oom(err):
        raise
      rows.append({**row, "status": "oom"})
      continue
    mine = eavi[runner.cfg.eavi.rollout][0]
    row.update(train_step_ms=tf.median_ms, eavi_step_ms=mine.median_ms,
               eavi_compile_s=mine.compile_s, ratio=mine.median_ms / tf.median_ms,
               sequential_step_ms=eavi["sequential"][0].median_ms,
               sequential_ratio=eavi["sequential"][0].median_ms / tf.median_ms,
               parallel_step_ms=eavi["parallel"][0].median_ms,
               parallel_ratio=eavi["parallel"][0].median_ms / tf.median_ms,
               parallel_passes=float(eavi["parallel"][1]["rollout_passes"]),
               rollout_budget=budget, rollout_ms=rollout.median_ms,
               rollout_tokens_per_s=B * budget / (rollout.median_ms / 1e3),
               rollout_share=rollout.median_ms / eavi["sequential"][0].median_ms,
               continuation=steps.continuation(runner.cfg),
               align_branch_ms=align["branch"].median_ms, align_rows_ms=align["rows"].median_ms,
               passes_branch_ms=passes["branch"].median_ms,
               passes_rows_ms=passes["rows"].median_ms)
    row.update({f"profile_{name}": runner.profiles[f"{name}_T{T}" + suffix]
                for name, suffix in (("train", ""), ("eavi", f"_{runner.cfg.eavi.rollout}"),
                                     ("rollout", ""))
                if f"{name}_T{T}" + suffix in runner.profiles})
    rows.append(row)
  return rows


# ----------------------------------------------------------------------------------------------
# Section: decode
# ----------------------------------------------------------------------------------------------

def other_decode_kernels(only: Sequence[str] | None = None) -> list[str]:
  """The sets of ``decode.DECODE_KERNELS`` other than the one set now (the default's), where
  they differ from it: on a GPU (their kernels are Triton's; elsewhere none, as every set
  runs the same XLA there). ``only`` (``--sets``): those of these names."""
  if jax.default_backend() != "gpu":
    return []
  return [name for name, kernels in DECODE_KERNELS.items()
          if kernels != (nsa.PALLAS_DECODE, moe.decode_kernel_setting())
          and (only is None or name in only)]


def bench_decode(runner: StepRunner, lens: Sequence[int],
                 sets: Sequence[str] | None = None) -> list[dict]:
  """The sequential EAVI excursion (``decode.generate``, ``rollout_budget`` tokens a row: the
  eavi section's, EAVI's answer budget in the config's data) with the default decoding kernels
  and each other set (:func:`other_decode_kernels`, of ``sets`` where given): ``sets`` {name:
  ms, tokens/s, compile s, speedup over the default's; ``status: oom`` for a set that ran out
  of memory}; and the default's one-token steps alone, from a prompt cache given as EAVI's
  alignment gives it (``steps_ms``, ``steps_tokens_per_s``; ``prefill_ms``: the difference)."""
  B = runner.cfg.train.batch_size
  rows = []
  for T in lens:
    row: dict[str, Any] = {"seq_len": T, "batch": B, "sets": {}}
    for name in ["default"] + other_decode_kernels(sets):
      try:
        timing, budget = (runner.default_rollout(T) if name == "default"
                          else runner.time_rollout(T, name))
      except Exception as err:  # noqa: BLE001
        if not is_oom(err):
          raise
        row["sets"][name] = {"status": "oom"}
        continue
      row["rollout_budget"] = budget
      case = {"ms": timing.median_ms, "tokens_per_s": B * budget / (timing.median_ms / 1e3),
              "compile_s": timing.compile_s}
      key = f"rollout_T{T}" + ("" if name == "default" else f"_{name}")
      if key in runner.profiles:  # --profile
        case["profile"] = runner.profiles[key]
      row["sets"][name] = case
      if name == "default":  # the same kernels' one-token steps alone, as EAVI runs them
        steps_timing, _ = runner.time_rollout(T, steps_only=True)
        row["steps_ms"] = steps_timing.median_ms
        row["steps_tokens_per_s"] = B * budget / (steps_timing.median_ms / 1e3)
        row["prefill_ms"] = timing.median_ms - steps_timing.median_ms
    base = row["sets"]["default"].get("ms")
    for case in row["sets"].values():
      if base and "ms" in case:
        case["speedup"] = base / case["ms"]
    rows.append(row)
  return rows


# ----------------------------------------------------------------------------------------------
# Section: nsa
# ----------------------------------------------------------------------------------------------

def nsa_inputs(m: ModelConfig, seq_len: int, dtype: Any, seed: int = 0) -> dict[str, jax.Array]:
  """Random ``nsa_core`` inputs at batch 1: q [1,T,H,D], k/v_cmp [1,N,G,D], k/v_slc and
  k/v_win [1,T,G,D] in ``dtype``; gates [1,T,H,3] in (0, 1)."""
  T, H, G, D = seq_len, m.num_heads, m.num_kv_groups, m.head_dim
  N = num_compressed_blocks(T, m.block_len, m.block_stride)
  keys = jax.random.split(jax.random.PRNGKey(seed), 8)
  normal = lambda k, shape: jax.random.normal(k, shape, jnp.float32).astype(dtype)
  shapes = {"q": (1, T, H, D), "k_cmp": (1, N, G, D), "v_cmp": (1, N, G, D),
            "k_slc": (1, T, G, D), "v_slc": (1, T, G, D), "k_win": (1, T, G, D),
            "v_win": (1, T, G, D)}
  arrays = {name: normal(k, shape) for (name, shape), k in zip(shapes.items(), keys)}
  arrays["gates"] = jax.nn.sigmoid(normal(keys[7], (1, T, H, 3)))
  return arrays


NSA_GRAD_ARGS = ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win")


def nsa_fwd_bwd(m: ModelConfig, impl: str) -> Callable:
  """``(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates) -> (sum(out), grads of the 7)``."""

  def loss(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates):
    out = nsa_core(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates,
                   block_len=m.block_len, block_stride=m.block_stride, select_len=m.select_len,
                   num_select=m.num_select, window=m.window, impl=impl)
    return jnp.sum(out.astype(jnp.float32))

  return jax.value_and_grad(loss, argnums=tuple(range(len(NSA_GRAD_ARGS))))


def full_attention_fwd_bwd(implementation: str | None) -> Callable:
  """``(q [1,T,H,D], k, v [1,T,G,D]) -> (sum(out), grads)`` of causal softmax attention."""
  def loss(q, k, v):
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    return jnp.sum(out.astype(jnp.float32))
  return jax.value_and_grad(loss, argnums=(0, 1, 2))


def _auto_impl(m: ModelConfig, seq_len: int) -> str:
  """What ``impl="auto"`` runs for a training pass of ``seq_len`` tokens."""
  return nsa.resolve_impl("auto", num_queries=seq_len, seq_len=seq_len,
                          keys_per_query=m.num_select * m.select_len + m.window,
                          pallas_tiles_ok=nsa_pallas.pallas_supported(
                              heads_per_group=m.num_heads // m.num_kv_groups,
                              head_dim=m.head_dim, select_len=m.select_len))


def bench_nsa(m: ModelConfig, sizes: Sizes) -> list[dict]:
  """``nsa_core`` forward+backward per impl against full causal attention, per length."""
  on_gpu = jax.default_backend() == "gpu"
  dtype = jnp.bfloat16 if on_gpu else jnp.dtype(m.compute_dtype)
  baseline = "cudnn" if on_gpu else "xla"
  oom_since: dict[str, int] = {}  # a case that ran out of memory is not retried at larger T
  rows = []
  for T in sizes.nsa_lens:
    arrays = nsa_inputs(m, T, dtype)
    nsa_args = [arrays[n] for n in NSA_GRAD_ARGS] + [arrays["gates"]]
    row: dict[str, Any] = {"seq_len": T, "dtype": jnp.dtype(dtype).name, "baseline": baseline}
    for impl in NSA_IMPLS + ("full_attention",):
      if impl in oom_since:
        row[impl] = {"status": f"oom at T={oom_since[impl]}"}
        continue
      resolved = _auto_impl(m, T)
      if impl == "auto" and resolved in row:
        # auto resolves to an implementation measured just above: same program, same time.
        row[impl] = {**row[resolved], "same_as": resolved}
        continue
      if impl == "pallas" and not on_gpu and T > PALLAS_INTERPRET_MAX_T:
        row[impl] = {"status": "skipped: Pallas interpret mode off GPU"}
        continue
      if impl == "reference" and m.num_heads * T * T * 4 > REFERENCE_MAX_BYTES:
        row[impl] = {"status": "skipped: [T,S] logits over "
                               f"{REFERENCE_MAX_BYTES / 1e9:g} GB"}
        continue
      if impl == "full_attention":
        qkv = (arrays["q"], arrays["k_slc"], arrays["v_slc"])
        row[impl] = measure(full_attention_fwd_bwd(None if baseline == "xla" else baseline),
                            qkv, sizes)
      else:
        row[impl] = measure(nsa_fwd_bwd(m, impl), nsa_args, sizes)
      if row[impl].get("status") == "oom":
        oom_since[impl] = T
    base_ms = row["full_attention"].get("ms")
    for impl in NSA_IMPLS:
      if base_ms and "ms" in row[impl]:
        row[impl]["speedup_vs_full"] = base_ms / row[impl]["ms"]
    rows.append(row)
  return rows


# ----------------------------------------------------------------------------------------------
# Section: moe (the dense einsum against the sparse dispatches of onn_jax.model.moe)
# ----------------------------------------------------------------------------------------------

def synthetic_routing(num_tokens: int, num_experts: int, k_mean: int, seed: int = 0
                      ) -> tuple[jax.Array, jax.Array, int]:
  """A DynMoE-like routing with a variable expert count per token.

  Token t uses ``n_t`` experts, ``n_t`` uniform in 1 .. 2k-1 (mean k, capped at E), chosen at
  random; weights are ``1 / n_t`` on them (the ``mean`` combination). Returns used_TE float32
  {0, 1} [T, E], weights_TE float32 [T, E] and k_max = max possible ``n_t``.
  """
  k_max = min(2 * k_mean - 1, num_experts)
  rng = np.random.default_rng(seed)
  count_T = rng.integers(1, k_max + 1, size=num_tokens)
  rank_TE = np.argsort(np.argsort(rng.random((num_tokens, num_experts)), axis=1), axis=1)
  used_TE = (rank_TE < count_T[:, None]).astype(np.float32)
  weights_TE = used_TE / used_TE.sum(axis=1, keepdims=True)
  return jnp.asarray(used_TE), jnp.asarray(weights_TE), k_max


def moe_variants(m: ModelConfig, dtype: Any, capacity: int, tile: int, precision: Any = None
                 ) -> dict[str, Callable]:
  """``name -> f(x_TC, weights_TE, used_TE, params) -> y_TC`` for dense (``experts_dense``),
  its autodiff baseline (``dense_autodiff``: ``experts_reference``) and each sparse impl."""

  def dense(fn: Callable) -> Callable:
    def f(x_TC, weights_TE, used_TE, params):
      del used_TE
      return fn(x_TC[None], weights_TE[None], params, dtype)[0]
    return f

  return {"dense": dense(experts_dense), "dense_autodiff": dense(experts_reference), **{
      impl: functools.partial(experts_sparse, dtype=dtype, capacity=capacity, tile=tile,
                              impl=impl, precision=precision)
      for impl in SPARSE_IMPLS}}


def _fwd_bwd(f: Callable) -> Callable:
  """Forward + gradient w.r.t. x and every expert parameter of ``f``."""
  def loss(x_TC, weights_TE, used_TE, params):
    return jnp.sum(f(x_TC, weights_TE, used_TE, params).astype(jnp.float32))
  return jax.value_and_grad(loss, argnums=(0, 3))


def moe_inputs(m: ModelConfig, num_tokens: int, seed: int = 0
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """x_TC float32 [T, C] and one DynMoE layer's parameters (float32, random biases)."""
  k_x, k_p, k_b = jax.random.split(jax.random.PRNGKey(seed), 3)
  params = init_expert_params(k_p, m.num_experts, m.d_model, m.expert_hidden)
  k_bin, k_bout = jax.random.split(k_b)
  params["b_in"] = 0.1 * jax.random.normal(k_bin, params["b_in"].shape)
  params["b_out"] = 0.1 * jax.random.normal(k_bout, params["b_out"].shape)
  return jax.random.normal(k_x, (num_tokens, m.d_model)), params


def check_moe_variants(m: ModelConfig, num_tokens: int, k_mean: int, tile: int
                       ) -> dict[str, float | str]:
  """Asserts every other variant (sparse, or dense by autodiff) equals ``experts_dense``
  (float32, full precision).

  Returns each variant's max absolute error, or the error message of a variant that
  does not run here. Raises AssertionError when a variant's output differs.
  """
  x_TC, params = moe_inputs(m, num_tokens)
  used_TE, weights_TE, k_max = synthetic_routing(num_tokens, m.num_experts, k_mean)
  highest = jax.lax.Precision.HIGHEST
  variants = moe_variants(m, jnp.float32, num_tokens * k_max, tile, precision=highest)
  args = (x_TC, weights_TE, used_TE, params)
  with jax.default_matmul_precision("float32"):
    dense_TC = np.asarray(jax.jit(variants.pop("dense"))(*args))
    errors: dict[str, float | str] = {}
    for name, f in variants.items():
      try:
        y_TC = np.asarray(jax.jit(f)(*args))
      except Exception as err:  # noqa: BLE001 - e.g. ragged_dot not lowered on this backend
        errors[name] = f"error: {_short(err)}"
        continue
      np.testing.assert_allclose(y_TC, dense_TC, rtol=1e-4, atol=1e-4,
                                 err_msg=f"moe variant {name!r} differs from dense")
      errors[name] = float(np.max(np.abs(y_TC - dense_TC)))
  return errors


def crossover(tokens: Sequence[int], dense_ms: Sequence[float | None],
              sparse_ms: Sequence[float | None]) -> int | None:
  """Smallest token count from which the sparse time beats dense at every larger count.

  ``tokens`` increasing; a None time (not measured, e.g. out of memory) counts as not faster.
  Returns None when sparse is not faster at the largest count.
  """
  result = None
  for n, d, s in zip(reversed(tokens), reversed(dense_ms), reversed(sparse_ms)):
    if d is None or s is None or s >= d:
      break
    result = n
  return result


def bench_moe(m: ModelConfig, sizes: Sizes) -> dict[str, Any]:
  """Dense all-experts einsum against sparse dispatch, per token count and mean k."""
  dtype = jnp.dtype(m.compute_dtype)
  ks = tuple(k for k in sizes.moe_ks if 2 * k - 1 <= m.num_experts)
  errors = check_moe_variants(m, sizes.moe_tokens[0], ks[-1], sizes.moe_tile)
  rows: list[dict[str, Any]] = []
  for num_tokens in sizes.moe_tokens:
    x_TC, params = moe_inputs(m, num_tokens)
    dense_ms: dict[str, dict[str, float | None]] = {}  # by variant: k changes nothing
    for k in ks:
      used_TE, weights_TE, k_max = synthetic_routing(num_tokens, m.num_experts, k)
      args = (x_TC, weights_TE, used_TE, params)
      variants = moe_variants(m, dtype, num_tokens * k_max, sizes.moe_tile)
      for name, f in variants.items():
        row = {"tokens": num_tokens, "k": k, "k_actual": float(jnp.mean(jnp.sum(used_TE, 1))),
               "k_max": k_max, "variant": name}
        if name in dense_ms:  # all experts computed: k changes nothing
          row.update(dense_ms[name])
        else:
          for pass_ in sizes.moe_passes:
            fn = f if pass_ == "fwd" else _fwd_bwd(f)
            case = measure(fn, args, sizes)
            row[f"{pass_}_ms"] = case.get("ms")
            if "status" in case:
              row[f"{pass_}_status"] = case.get("error", case["status"])
          if name in DENSE_VARIANTS:
            dense_ms[name] = {key: val for key, val in row.items()
                              if key.startswith(sizes.moe_passes)}
        rows.append(row)
  return {"d_model": m.d_model, "num_experts": m.num_experts, "expert_hidden": m.expert_hidden,
          "dtype": dtype.name, "tile": sizes.moe_tile, "check_max_abs_err": errors,
          "rows": rows, "crossover": moe_crossovers(rows)}


def moe_crossovers(rows: list[dict]) -> dict[str, dict[str, dict[str, int | None]]]:
  """``{variant: {pass: {str(k): crossover token count or None}}}`` for the sparse variants."""
  def times(variant, k, key):
    by_tokens = {r["tokens"]: r.get(key) for r in rows if r["variant"] == variant and r["k"] == k}
    return [by_tokens[n] for n in tokens]

  tokens = sorted({r["tokens"] for r in rows})
  ks = sorted({r["k"] for r in rows})
  result: dict[str, dict[str, dict[str, int | None]]] = {}
  for variant in sorted({r["variant"] for r in rows} - set(DENSE_VARIANTS)):
    result[variant] = {
        key: {str(k): crossover(tokens, times("dense", k, key), times(variant, k, key))
              for k in ks}
        for key in ("fwd_ms", "fwd_bwd_ms") if any(key in r for r in rows)}
  return result


# ----------------------------------------------------------------------------------------------
# Section: layers (attention variants and DynMoE, one layer each)
# ----------------------------------------------------------------------------------------------

def density_thresholds(x_BTC: jax.Array, prototypes_EC: jax.Array, active: Any) -> jax.Array:
  """Thresholds [E] under which expert e is active for an ``active`` fraction of the tokens of
  ``x_BTC`` (a number for every expert, or one per expert, [E]): the (1 - active_e) quantile
  of its cosine similarities. With ``model.sdl_target_active`` for all, each token uses
  ``target * E`` experts on average (plus the fallback's for a token with none), the density
  that SDL trains the gate to."""
  E = prototypes_EC.shape[0]
  s_NE = cosine_similarity(x_BTC, prototypes_EC).reshape(-1, E)
  q_E = 1.0 - jnp.broadcast_to(jnp.asarray(active, s_NE.dtype), (E,))
  return jax.vmap(jnp.quantile, in_axes=(1, 0))(s_NE, q_E)


def target_routing(model: Transformer, params: Any, batch: dict[str, jax.Array]) -> Any:
  """``params`` with every DynMoE layer's thresholds set (:func:`density_thresholds`) so that
  on ``batch``'s real tokens each expert is active for ``model.sdl_target_active`` of them:
  the density SDL trains the gate to, which a run reaches within its first few hundred steps
  (fresh parameters route about half the experts, more than a sparse dispatch's capacity, so
  every layer then takes its dense fallback). Layer by layer from the first: a layer's
  thresholds change the next one's inputs."""
  def is_moe_input(module, method):
    return module.name == "moe_norm" and method == "__call__"

  @jax.jit
  def moe_inputs(p):
    _, state = model.apply({"params": p}, batch["inputs"], batch["valid"],
                           segment_start_BT=batch.get("segment_start"),
                           capture_intermediates=is_moe_input, mutable=["intermediates"])
    return state["intermediates"]

  valid_N = np.asarray(batch["valid"]).reshape(-1)
  for i in range(model.cfg.num_layers):
    x_BTC = moe_inputs(params)[f"block_{i}"]["moe_norm"]["__call__"][0]
    x_1NC = x_BTC.reshape(-1, x_BTC.shape[-1])[valid_N][None]
    block = params[f"block_{i}"]
    theta_E = density_thresholds(x_1NC, block["moe"]["prototypes"],
                                 model.cfg.sdl_target_active)
    moe = dict(block["moe"], thresholds=theta_E.astype(block["moe"]["thresholds"].dtype))
    params = dict(params, **{f"block_{i}": dict(block, moe=moe)})
  return params


def trained_loads(num_experts: int, target_active: float) -> np.ndarray:
  """:data:`TRAINED_EXPERT_LOADS` for ``num_experts`` experts (the sorted curve sampled at the
  experts' midpoints) scaled to ``target_active * num_experts`` experts a token, each share at
  most 1."""
  src = np.asarray(TRAINED_EXPERT_LOADS, np.float64)
  at = (np.arange(num_experts) + 0.5) / num_experts
  loads = np.interp(at, (np.arange(len(src)) + 0.5) / len(src), src)
  return np.minimum(loads * (target_active * num_experts / loads.sum()), 1.0)


def layer_fwd_bwd(m: ModelConfig, name: str, batch: int, seq_len: int,
                  routing: str = "even") -> tuple[Callable, tuple[Any, jax.Array]]:
  """``(fn, (params, x_BTC))``: ``fn`` runs one ``name`` layer (an attention variant or
  ``"dynmoe"``) forward and returns ``sum(out)`` and its gradients w.r.t. params and x. The
  value keeps the whole forward pass live, as the next layer does in a model: with the
  gradients alone XLA drops the layer's last forward operation (its output projection, the
  experts' combine), whose result the gradient of a sum does not read.

  The DynMoE layer (``model.moe_impl``) routes at the trained density: its thresholds come from
  :func:`density_thresholds` on x and ``model.sdl_target_active`` for every expert (``routing``
  "even") or the experts' shares of :func:`trained_loads` ("trained").
  """
  if routing not in ROUTINGS:
    raise ValueError(f"layer_fwd_bwd: routing={routing!r}: expected one of {ROUTINGS}")
  dt = dtype_of(m.compute_dtype)
  if name == "dynmoe":
    layer = moe_layer(m)
  else:
    layer = attention.get(name).module(dataclasses.replace(m, attention=name))
  x_BTC = jax.random.normal(jax.random.PRNGKey(0), (batch, seq_len, m.d_model)).astype(dt)
  # Parameters from a short sequence that holds one complete NSA compressed block.
  init_len = min(seq_len, m.block_len + m.select_len)
  params = jax.jit(layer.init)(jax.random.PRNGKey(1), x_BTC[:, :init_len])["params"]
  if name == "dynmoe":
    active = (m.sdl_target_active if routing == "even"
              else trained_loads(m.num_experts, m.sdl_target_active))
    theta_E = jax.jit(density_thresholds)(x_BTC, params["prototypes"], active)
    params = dict(params, thresholds=theta_E.astype(params["thresholds"].dtype))

  def loss(p, x):
    return jnp.sum(layer.apply({"params": p}, x)[0].astype(jnp.float32))

  return jax.value_and_grad(loss, argnums=(0, 1)), (params, x_BTC)


def bench_layers(m: ModelConfig, batch: int, lens: Sequence[int], sizes: Sizes,
                 profile_dir: Path | None = None) -> list[dict]:
  """Each of :data:`LAYERS` forward+backward per length, and its ratio to ``full``; with
  ``profile_dir`` (``--profile``) each one's kernels too (``profile``, as the steps')."""
  rows = []
  for T in lens:
    row: dict[str, Any] = {"seq_len": T, "batch": batch, "dtype": m.compute_dtype}
    for name in LAYERS:
      fn, args = layer_fwd_bwd(m, name, batch, T)
      row[name] = measure(fn, args, sizes, loop=True)
      if profile_dir is not None and "ms" in row[name]:
        compiled = jax.jit(fn).lower(*args).compile()
        row[name]["profile"] = trace_summary(f"layer_{name}_T{T}", compiled, args, profile_dir)
    add_ratios(row, LAYERS, "full", "full")
    rows.append(row)
  return rows


def bench_dynmoe_density(m: ModelConfig, shapes: Sequence[tuple[int, int]], sizes: Sizes
                         ) -> list[dict]:
  """The DynMoE layer at the trained density (:func:`layer_fwd_bwd`), forward+backward, each
  impl of :data:`DYNMOE_IMPLS` (the all-experts einsum by autodiff, dense, the sparse ones), per
  (batch, T) of ``shapes`` with even routing, then at the first shape with a trained layer's
  (``routing``: "even", "trained"): each time, one at a time and back to back, and its ratios
  to dense and to reference.

  A row also reports the routing measured on the benchmark input (``experts_per_token``,
  ``fallback_frac``, ``max_expert_share``: the busiest expert's share of the tokens), the pairs
  in use against the sparse capacity and ``overflow`` (more than fit its layout,
  ``moe.slots_overflow``: the ragged and tiled rows then timed the dense fallback), the
  busiest expert's tokens against the batched dispatch's rows per expert
  (``batched_overflow``: the batched row then timed the dense fallback), and what ``auto``
  runs.
  """
  rows = []
  cases = [(batch, T, "even") for batch, T in shapes] + [(*shapes[0], "trained")]
  for batch, T, routing in cases:
    row: dict[str, Any] = {"batch": batch, "seq_len": T, "routing": routing,
                           "dtype": m.compute_dtype, "num_experts": m.num_experts,
                           "target_active": m.sdl_target_active,
                           "capacity_factor": m.moe_capacity, "tile": m.moe_tile,
                           "auto": moe.resolve_impl("auto")}
    for impl in DYNMOE_IMPLS:
      m_impl = dataclasses.replace(m, moe_impl=impl)
      fn, args = layer_fwd_bwd(m_impl, "dynmoe", batch, T, routing)
      if impl == "dense":
        params, x_BTC = args
        _, aux = jax.jit(moe_layer(m_impl).apply)({"params": params}, x_BTC)
        num_tokens = batch * T
        row.update(experts_per_token=float(aux["experts_per_token"]),
                   fallback_frac=float(aux["fallback_frac"]),
                   pairs=int(round(float(aux["experts_per_token"]) * num_tokens)),
                   capacity_pairs=pair_capacity(num_tokens, m.num_experts,
                                                m.sdl_target_active, m.moe_capacity,
                                                m.moe_tile))
        row["overflow"] = bool(moe.slots_overflow(
            np.asarray(aux["tokens_per_expert"]).round().astype(np.int32),
            row["capacity_pairs"], m.moe_tile))
        # batched: every expert has expert_rows rows; one expert over them is its overflow.
        row["expert_rows"] = moe.expert_rows(row["capacity_pairs"], m.num_experts, m.moe_tile,
                                             num_tokens)
        row["max_expert_tokens"] = int(np.max(aux["tokens_per_expert"]))
        row["max_expert_share"] = row["max_expert_tokens"] / num_tokens
        row["batched_overflow"] = row["max_expert_tokens"] > row["expert_rows"]
      row[impl] = measure(fn, args, sizes, loop=True)
    add_ratios(row, DYNMOE_IMPLS, "dense", "dense")
    add_ratios(row, DYNMOE_IMPLS, "reference", "reference")
    rows.append(row)
  return rows


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------

def _fmt(value: Any, digits: int = 3) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    if value == 0 or 1e-3 <= abs(value) < 1e6:
      return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:,.{max(digits - 2, 1)}f}"
    return f"{value:.{digits}g}"
  return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = False) -> str:
  cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
  if markdown:
    lines = ["| " + " | ".join(r) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("---" for _ in headers) + "|")
    return "\n".join(lines)
  widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
  lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def _percent(fraction: float | None) -> str | None:
  return None if fraction is None else f"{100 * fraction:.1f}%"


def _nsa_cell(case: dict) -> Any:
  return case.get("ms", case.get("status"))


def _decode_cell(case: dict) -> str:
  if "ms" not in case:
    return case.get("status", "-")
  speedup = f", {case['speedup']:.2f}x" if "speedup" in case else ""
  return f"{case['ms']:.1f} ({case['tokens_per_s'] / 1e3:.1f}k{speedup})"


def _steps_cell(row: dict) -> str | None:
  if "steps_ms" not in row:
    return None
  return f"{row['steps_ms']:.1f} ({row['steps_tokens_per_s'] / 1e3:.1f}k)"


def _layer_cell(case: dict, suffix: str = "full") -> Any:
  """``ms (ratio)``, then ``; loop ms (ratio)`` where the case was timed back to back too."""
  if "ms" not in case:
    return case.get("status")
  parts = []
  for key in ("ms", "loop_ms"):
    if case.get(key) is not None:
      ratio = case.get(f"{key[:-2]}ratio_to_{suffix}")
      parts.append(("loop " if key == "loop_ms" else "") + f"{case[key]:.3g}"
                   + ("" if ratio is None else f" ({ratio:.2f}x)"))
  if case.get("loop_status"):
    parts.append(f"loop {case['loop_status']}")
  return "; ".join(parts)


def section_tables(results: dict[str, Any], markdown: bool = False) -> dict[str, str]:
  """One table per measured section (plain text, or markdown for the README)."""
  out = {}
  if "train" in results:
    rows = [[r["seq_len"], r["batch"], "yes" if r.get("packed") else "no", r.get("routing"),
             r.get("step_ms", r.get("status")), r.get("tokens_per_s"), _percent(r.get("real_frac")),
             r.get("real_tokens_per_s"), r.get("experts_per_token"), r.get("model_tflops_per_s"),
             _percent(r.get("mfu")), r.get("loop_ms"), r.get("loop_tokens_per_s"),
             r.get("loop_real_tokens_per_s"), _percent(r.get("loop_mfu"))]
            for r in results["train"]]
    mix = (results.get("train_data") or {}).get("bucket_mix")
    if mix:
      rows.append(["buckets mixed", rows[0][1], "no", "target", None, mix["tokens_per_s"],
                   _percent(mix["real_frac"]), mix["real_tokens_per_s"], None, None, None,
                   None, None, None, None])
    out["train"] = table(
        ["T", "batch", "packed", "routing", "step ms", "tokens/s", "real", "real tokens/s",
         "experts/token", "TFLOP/s", "MFU", "loop ms", "loop tokens/s", "loop real tokens/s",
         "loop MFU"], rows, markdown)
  if "eavi" in results:
    out["eavi"] = table(
        ["T", "batch", "TF step ms", "EAVI step ms (sequential)", "ratio",
         "EAVI step ms (parallel)", "ratio", "passes", "rollout tokens", "rollout tok/s",
         "continuation",
         "align branch ms", "align rows ms", "passes branch ms", "passes rows ms"],
        [[r["seq_len"], r["batch"], r.get("train_step_ms", r.get("status")),
          r.get("sequential_step_ms"), r.get("sequential_ratio"),
          r.get("parallel_step_ms"), r.get("parallel_ratio"), r.get("parallel_passes"),
          r.get("rollout_budget"), r.get("rollout_tokens_per_s"), r.get("continuation"),
          r.get("align_branch_ms"), r.get("align_rows_ms"), r.get("passes_branch_ms"),
          r.get("passes_rows_ms")] for r in results["eavi"]],
        markdown)
  if "decode" in results:
    names = list(dict.fromkeys(n for r in results["decode"] for n in r["sets"]))
    out["decode"] = table(
        ["T", "batch", "tokens a row"] + [f"{n} ms (tok/s, x default)" for n in names]
        + ["default's steps alone ms (tok/s)", "its prefill ms"],
        [[r["seq_len"], r["batch"], r.get("rollout_budget")]
         + [_decode_cell(r["sets"][n]) if n in r["sets"] else None for n in names]
         + [_steps_cell(r), r.get("prefill_ms")]
         for r in results["decode"]], markdown)
  if "nsa" in results:
    base = results["nsa"][0]["baseline"] if results["nsa"] else "full"
    out["nsa"] = table(
        ["T", "reference ms", "blockwise ms", "pallas ms", "auto ms", f"full ({base}) ms",
         "blockwise speedup"],
        [[r["seq_len"]] + [_nsa_cell(r[i]) for i in NSA_IMPLS + ("full_attention",)]
         + [r["blockwise"].get("speedup_vs_full")] for r in results["nsa"]], markdown)
  if "layers" in results:
    out["layers"] = table(
        ["T", "batch"] + [f"{n} ms (x full)" for n in LAYERS],
        [[r["seq_len"], r["batch"]] + [_layer_cell(r[n]) for n in LAYERS]
         for r in results["layers"]], markdown)
  if "moe" in results:
    moe = results["moe"]
    variants = sorted({r["variant"] for r in moe["rows"]})
    keys = sorted({(r["tokens"], r["k"]) for r in moe["rows"]})
    by = {(r["tokens"], r["k"], r["variant"]): r for r in moe["rows"]}
    out["moe"] = table(
        ["tokens", "k"] + [f"{v} fwd+bwd ms" for v in variants],
        [[n, k] + [by[(n, k, v)].get("fwd_bwd_ms") for v in variants] for n, k in keys],
        markdown)
    cross = [f"{v} k={k}: {moe['crossover'][v]['fwd_bwd_ms'][k] or 'never'}"
             for v in moe["crossover"] for k in moe["crossover"][v]["fwd_bwd_ms"]]
    out["moe"] += ("\n\n" if markdown else "\n") + "crossover (fwd+bwd, tokens): " + \
        "; ".join(cross)
  if results.get("layers_dynmoe"):
    impls = DYNMOE_IMPLS
    text = table(
        ["batch", "T", "routing", "experts/token", "busiest expert", "pairs / capacity"]
        + [f"{i} ms (x dense)" for i in impls] + ["auto"],
        [[r["batch"], r["seq_len"], r["routing"], r["experts_per_token"],
          f"{r['max_expert_share']:.0%}" + (" (batched overflow)" if r["batched_overflow"]
                                             else ""),
          f"{r['pairs']} / {r['capacity_pairs']}" + (" (overflow)" if r["overflow"] else "")]
         + [_layer_cell(r[i], "dense") for i in impls] + [r["auto"]]
         for r in results["layers_dynmoe"]], markdown)
    caption = ("DynMoE layer forward+backward at the trained density, ratio to dense "
               "(reference: the all-experts einsum by autodiff; loop_ratio_to_reference in the "
               "JSON; routing even: every expert on the same share of the tokens, trained: "
               "a trained layer's shares; an overflow row timed the dense fallback):")
    sep = "\n\n" if markdown else "\n"
    out["moe"] = sep.join(t for t in (out.get("moe"), caption, text) if t)
  return out


def markdown_summary(results: dict[str, Any]) -> str:
  meta = results["meta"]
  command = " ".join(["python -m train.bench", "--config", meta["config_path"]]
                     + (["--quick"] if meta["quick"] else [])
                     + (["--only", meta["only"]] if meta.get("only") != ",".join(SECTIONS) else [])
                     + (["--lens", meta["lens"]] if meta.get("lens") else [])
                     + (["--variant", meta["variant"]] if meta.get("variant") else [])
                     + meta["overrides"])
  head = (f"Measured with `{command}` on "
          f"{meta['device_kind']} ({meta['platform']}), jax {meta['jax_version']}, "
          f"{meta['date']}.")
  titles = {"train": "Teacher-forcing step", "eavi": "EAVI step",
            "decode": "Sequential rollout with each set of decoding kernels",
            "nsa": "NSA core forward+backward (batch 1)", "moe": "DynMoE experts (one layer)",
            "layers": "One layer forward+backward, ratio to full causal GQA"}
  parts = [head]
  for name, text in section_tables(results, markdown=True).items():
    parts.append(f"**{titles[name]}**\n\n{text}")
  return "\n\n".join(parts)


def write_json(results: dict[str, Any], path: Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(output.jsonable(results), indent=2, allow_nan=False) + "\n")
  tmp.replace(path)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def light_compilation(enabled: bool):
  """With ``enabled``, XLA's light optimisation pipeline: compiles about twice as fast. Only for
  ``--quick``, whose timings mean nothing; the previous setting is restored on exit."""
  name = "jax_disable_most_optimizations"
  previous = jax.config.read(name)
  if enabled:
    jax.config.update(name, True)
  try:
    yield
  finally:
    if enabled:
      jax.config.update(name, previous)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/arc1.yaml", help="YAML config file")
  parser.add_argument("--quick", action="store_true",
                      help="toy model and sizes (a CPU smoke check of a few minutes)")
  parser.add_argument("--out", default="bench.json", help="JSON results file")
  parser.add_argument("--only", default=",".join(SECTIONS),
                      help=f"comma-separated sections to run, of {','.join(SECTIONS)}")
  parser.add_argument("--lens", default="",
                      help="comma-separated sequence lengths for train/eavi/layers (default: "
                           "data.buckets)")
  parser.add_argument("--sets", default="",
                      help="decode: the decoding-kernel sets to time beside the default, "
                           f"comma-separated, of {','.join(DECODE_KERNELS)} (default: every "
                           "other set; on a GPU only; the default set is always timed)")
  parser.add_argument("--routings", default="",
                      help="train: the experts' routings to time the step at, comma-separated, "
                           f"of {','.join(ROUTINGS_STEP)} (default: both; target alone halves "
                           "the section's time)")
  parser.add_argument("--profile", default="",
                      help="also trace each timed train/EAVI step, the rollout and each layer "
                           "of the layers section into this folder and summarise its kernels "
                           "by name and model scope in the JSON (onn_jax/profiling.py)")
  parser.add_argument("--variant", default="",
                      help="time everything under one NSA kernel setting of train.nsa_kernel_"
                           "check's --variants (e.g. part_f32: the selected branch's partials "
                           "in float32), applied for the whole run; the defaults when empty")
  parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.batch_size=16")
  return parser.parse_intermixed_args(argv)


def _parse_variant(name: str) -> str | None:
  """``--variant``: None (the library's settings) when empty, else a name of
  ``nsa_kernel_check.VARIANTS``."""
  if name and name not in VARIANTS:
    raise ValueError(f"--variant: unknown NSA kernel setting {name!r} (known: "
                     f"{', '.join(sorted(VARIANTS))})")
  return name or None


def _parse_names(text: str, flag: str, what: str, known: Sequence[str]) -> list[str]:
  """The comma-separated names of ``text``, each of ``known`` (a one-line error naming
  ``flag`` and the ``what`` otherwise)."""
  names = [s.strip() for s in text.split(",") if s.strip()]
  for name in names:
    if name not in known:
      raise ValueError(f"{flag}: unknown {what} {name!r} (known: {', '.join(known)})")
  return names


def _parse_sections(text: str) -> list[str]:
  names = _parse_names(text, "--only", "section", SECTIONS)
  if not names:
    raise ValueError("--only: name at least one section")
  return names


def _parse_sets(text: str) -> list[str] | None:
  """``--sets``: None (every set) when empty, else the names, each of decode.DECODE_KERNELS."""
  return _parse_names(text, "--sets", "decoding-kernel set", tuple(DECODE_KERNELS)) or None


def _parse_routings(text: str) -> tuple[str, ...]:
  """``--routings``: the train section's routings (:data:`ROUTINGS_STEP`, all when empty), in
  that order."""
  names = _parse_names(text, "--routings", "routing", ROUTINGS_STEP)
  return tuple(r for r in ROUTINGS_STEP if r in names) if names else ROUTINGS_STEP


def _parse_lens(text: str, default: Sequence[int]) -> tuple[int, ...]:
  if not text.strip():
    return tuple(default)
  try:
    lens = tuple(int(s) for s in text.split(",") if s.strip())
  except ValueError:
    raise ValueError(f"--lens: {text!r} is not a comma-separated list of integers") from None
  if not lens or min(lens) < 1:
    raise ValueError(f"--lens: {text!r} must list positive lengths")
  return lens


def device_meta(args: argparse.Namespace, cfg: Config) -> dict[str, Any]:
  device = jax.devices()[0]
  try:
    import jaxlib
    jaxlib_version = jaxlib.__version__
  except (ImportError, AttributeError):
    jaxlib_version = None
  return {"device": str(device), "device_kind": device.device_kind,
          "platform": device.platform, "num_devices": jax.device_count(),
          "jax_version": jax.__version__, "jaxlib_version": jaxlib_version,
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "config_path": args.config, "overrides": list(args.overrides), "quick": args.quick,
          "only": args.only, "lens": args.lens, "variant": args.variant,
          "peak_bf16_flops": peak_flops(device.device_kind)}


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    overrides = (list(QUICK_OVERRIDES) if args.quick else []) + list(args.overrides)
    cfg = config.load(args.config, overrides)
    sections = _parse_sections(args.only)
    lens = _parse_lens(args.lens, cfg.data.buckets)
    decode_sets = _parse_sets(args.sets)
    routings = _parse_routings(args.routings)
    variant = _parse_variant(args.variant)
    faults.check_writable_file(args.out, "--out")  # before minutes of timing
  except (config.ConfigError, ValueError, faults.OutputError) as err:
    print(f"bench: {err}", file=sys.stderr)
    return 2
  sizes = QUICK_SIZES if args.quick else FULL_SIZES
  out = Path(args.out)
  meta = device_meta(args, cfg)
  results: dict[str, Any] = {"meta": meta, "config": config.to_dict(cfg)}
  print(f"bench: {meta['device_kind']} ({meta['platform']}), jax {meta['jax_version']}, "
        f"sections {','.join(sections)}, lengths {list(lens)}"
        + (f", NSA kernel setting {variant}" if variant else ""), flush=True)
  with light_compilation(args.quick), kernel_setting(variant):
    budgets = {}
    if {"eavi", "decode"} & set(sections):  # EAVI's answer budgets of the config's data
      stream = config_stream(cfg)
      budgets = dict(zip(stream.buckets, stream.answer_budgets))
    runner = StepRunner(cfg, sizes, Path(args.profile) if args.profile else None, budgets)
    for name in SECTIONS:  # a fixed order, so train's compiled steps are reused by eavi
      if name not in sections:
        continue
      start = time.perf_counter()
      if name == "train":
        data = data_real_fraction(cfg, sizes.data_batches)
        results["train"] = bench_train(runner, lens, meta["peak_bf16_flops"], data, routings)
        results["train_data"] = {**data, "bucket_mix": bucket_mix(results["train"], data)}
      elif name == "eavi":
        results["eavi"] = bench_eavi(runner, lens)
      elif name == "decode":
        results["decode"] = bench_decode(runner, lens, decode_sets)
      elif name == "nsa":
        results["nsa"] = bench_nsa(cfg.model, sizes)
      elif name == "layers":
        results["layers"] = bench_layers(cfg.model, cfg.train.batch_size, lens, sizes,
                                         runner.profile_dir)
      else:
        results["moe"] = bench_moe(cfg.model, sizes)
        write_json(results, out)
        results["layers_dynmoe"] = bench_dynmoe_density(cfg.model, sizes.moe_layer_shapes,
                                                        sizes)
      write_json(results, out)
      print(f"\n== {name} ({time.perf_counter() - start:.1f} s)\n"
            f"{section_tables(results)[name]}", flush=True)
  print(f"\nwrote {out}\n\n{markdown_summary(results)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
