"""Typed configuration: dataclasses loaded from YAML with dotted ``key=value`` overrides.

Every value is type-checked and every cross-field constraint is validated before any work
starts; a bad value raises :class:`ConfigError` whose one-line message names the key.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml


class ConfigError(ValueError):
  """A configuration value is unknown, mistyped or impossible. The message names the key."""


def fail(err: BaseException) -> int:
  """A config that does not load (the command line's ``--config``, overrides or arguments):
  one line ``config error: ...`` on stderr and exit code 2, as argparse's usage errors, in
  ``train.main``, ``train.evaluate`` and ``train.eavi_verdict``. Errors found after it loaded
  (data, checkpoints, a run that cannot start here) are ``error: ...`` and exit code 1
  (``onn_jax.app``). The benchmark tools name themselves instead (``bench: ...``), exit code
  2 as well."""
  print(f"config error: {err}", file=sys.stderr)
  return 2


@dataclass(frozen=True)
class ModelConfig:
  d_model: int = 64
  attention: str = "nsa"  # nsa | full (causal GQA baseline) | dynsmlora (GQA + LoRA deltas)
  num_layers: int = 2
  num_heads: int = 4  # query heads H
  num_kv_groups: int = 1  # G: key/value heads; H must be a multiple of G
  head_dim: int = 16
  # NSA geometry (Yuan et al. 2025): compression blocks of block_len every block_stride tokens,
  # selection blocks of select_len tokens, num_select of them per query, and a window.
  block_len: int = 8
  block_stride: int = 4
  select_len: int = 8
  num_select: int = 4
  window: int = 32
  nsa_impl: str = "auto"  # reference | blockwise | pallas | auto
  # RoPE in the compressed branch: "none" scores the compressed keys (positioned by the
  # compressor) with the unrotated query; "both" rotates each compressed key at its block's
  # last position and scores it with the rotated query; "query" is the pre-2026-11-30 model
  # (rotated query, unrotated keys: selection depends on the absolute position).
  cmp_rope: str = "none"
  gate_hidden: int = 0  # 0: the gate is one linear layer; >0: a two-layer MLP
  # DynSMLoRA (attention=dynsmlora): a bank of low-rank q/k/v deltas chosen by a DynMoE gate.
  lora_experts: int = 8
  lora_rank: int = 8
  # DynMoE (Guo et al. 2024) with cosine-prototype gating.
  num_experts: int = 8
  expert_hidden: int = 64
  moe_combine: str = "mean"  # mean | softmax (over the active experts)
  # Expert dispatch: dense (every expert on every token, the definition; reference: the same
  # differentiated by autodiff, slower, the benchmark's baseline) | ragged | tiled |
  # batched (only the pairs in use; the gate's straight-through gradient from inactive experts
  # is not computed: DynMoE.impl) | auto (moe.AUTO_GPU_IMPL, tiled, in the teacher-forcing
  # step on GPU; dense in EAVI, TTT, evaluation and on other backends: moe.auto_dense).
  moe_impl: str = "auto"
  # Pairs a sparse dispatch computes per layer call, as a multiple of the SDL target
  # (sdl_target_active * tokens * num_experts); a call whose routing uses more falls back to
  # the dense result (batched: each expert gets an even share of these pairs, and a call in
  # which one expert has more falls back). Larger: fewer fallbacks, more padded work.
  moe_capacity: float = 1.25
  moe_tile: int = 2048  # rows per tile of the sparse dispatch (each expert's pairs padded to
  # it; moe.TILE_ROWS says why this many)
  fallback_k: int = 1  # experts used by a token that activates none
  init_threshold: float = 0.0
  sdl_diversity_weight: float = 0.01
  sdl_sparsity_weight: float = 0.1
  sdl_target_active: float = 0.25  # target fraction of experts active per token
  rope_theta: float = 10000.0
  remat: bool = False  # recompute each block in the backward pass (less memory, ~1/3 slower)
  compute_dtype: str = "float32"  # float32 | bfloat16
  param_dtype: str = "float32"


def data_sources(spec: str) -> list[str]:
  """The sources a data spec names: ``"a+b"`` -> ``["a", "b"]``; an existing path is one source
  even when its name holds a "+". An empty entry (``"a++b"``) stays empty for the caller to
  refuse."""
  if os.path.exists(spec.strip()):
    return [spec.strip()]
  return [s.strip() for s in spec.split("+")]


@dataclass(frozen=True)
class DataConfig:
  # A source is "arc-agi-1:training", "arc-agi-2:evaluation", a folder of task JSON files or a
  # Kaggle challenges JSON. Several sources are joined with "+" (a path holding "+" is one).
  train: str = "arc-agi-1:training"
  eval: str = "arc-agi-1:evaluation"  # "" for none
  eval_demos: bool = False  # add leave-one-out sequences of the eval tasks' demonstrations
  # Train on the training tasks' demonstrations only, so their test outputs stay held out (for
  # `train.evaluate --data <the training split>`: exact match on unseen test outputs).
  hold_out_train_tests: bool = False
  leakage_guard: bool = True
  skip_bad: bool = False  # skip (and count) malformed tasks instead of failing
  max_grid: int = 30  # keep only tasks whose grids all fit max_grid x max_grid
  max_train_tasks: int = 0  # 0: all
  buckets: tuple[int, ...] = (2048,)  # sequence lengths; the longest is the maximum
  # Teacher forcing on packed rows: several sequences per row of data.pack_len tokens, each
  # seeing only itself (positions restart), so little of a batch is padding. EAVI never packs.
  pack: bool = False
  # Drawn sequences a packed batch may pass over (per row) because they fit no row's room
  # before it closes. 0: none, every sequence is as likely to be trained as unpacked (arc1:
  # 92.7% real tokens); 1: 95.4% real (96.6% with pack_fill), longer sequences drawn more
  # often to make up for being passed over more (each length trains 0.98-1.03x the mean).
  pack_misses: float = 0.0
  # Packed rows are this long (one of data.buckets; 0: the longest; ignored without pack).
  # Sequences that need a longer bucket train in it, at a packing stage's steps drawn for that
  # bucket: one a row, unpacked, or with pack_fill the rest of each row filled with shorter
  # sequences as packed rows are (arc1's data: 94% and 98% of the 4096 and 8192 rows' tokens
  # real instead of 68%; README "Long sequences in training").
  pack_len: int = 0
  pack_fill: bool = False
  # Tokens per training batch (rows x bucket length): a batch at a long bucket holds
  # max(1, max_batch_tokens // length) rows instead of train.batch_size (they must divide over
  # the devices), so long buckets fit beside short ones. 0: train.batch_size rows always.
  max_batch_tokens: int = 0
  loss_on: str = "answer"  # answer | outputs (every demo output too)
  d8: bool = True
  color_perm: str = "1-9"  # none | 1-9 (0 fixed) | all
  shuffle_demos: bool = True

  @property
  def packed_len(self) -> int:
    """The length of a packed row: pack_len when packing (0: the longest bucket), else the
    longest bucket."""
    return (self.pack_len if self.pack else 0) or max(self.buckets)


@dataclass(frozen=True)
class TrainConfig:
  seed: int = 0
  batch_size: int = 8
  pretrain_steps: int = 100
  eavi_steps: int = 0
  # 0: EAVI only as the second stage, of train.eavi_steps steps. k >= 2: every k-th step of
  # teacher forcing (run steps k-1, 2k-1, ... of train.pretrain_steps) is an EAVI step instead,
  # at the pre-training learning rate; train.eavi_steps may still add the second stage after.
  eavi_every: int = 0
  learning_rate: float = 1e-3
  warmup_steps: int = 10
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.05
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float = 1.0
  ema_decay: float = 0.0  # 0: no EMA; bias-corrected (steps.ema_decay_at)
  reset_every: int = 0  # 0: no expert reset
  init_from: str = ""  # a checkpoint folder (or run folder) to take parameters from
  run_steps: int = 0  # stop this invocation after this many steps (0: run to the end)
  log_every: int = 10
  max_nonfinite: int = 5  # consecutive non-finite steps that stop the run
  # JAX's persistent compilation cache: train.main and train.evaluate keep compiled programs
  # here, so a resumed slice (train.run_steps), an evaluation of a trained run or a second run
  # of the same shapes skips their compilation. "": off (so is "~" alone, YAML's null). A
  # cache set already (the JAX_COMPILATION_CACHE_DIR variable or jax.config) stands.
  jax_cache_dir: str = "~/.cache/onn_jax/jax"
  # Steps of the stages after an invocation's first (EAVI after pre-training), and TTT's when
  # train.main evaluates after it, compile on a worker thread while the first stage trains;
  # the evaluation's generation programs while TTT adapts, its scoring programs while it
  # generates. false: each when it is first needed.
  background_compile: bool = True


@dataclass(frozen=True)
class EaviConfig:
  feed: str = "soft"  # soft | argmax | sample
  temperature: float = 1.0
  excursion_weight: float = 1.0
  tf_weight: float = 1.0
  learning_rate: float = 3e-4
  warmup_steps: int = 10
  # Rows of an EAVI batch drawn from one answer-length group: edges in answer tokens, e.g.
  # [64, 128, 256, 512] (groups <= 64, 65-128, ..., > 512) inside each bucket; every sequence
  # stays as likely as without. A sequential rollout lasts as long as its batch's longest answer
  # (the parallel one and the alignment run the bucket's static budget either way): on arc1's
  # data these edges cut that from 424 to 296 tokens a batch on average. Rows of a batch then
  # have similar answers, so the token-averaged loss weighs short answers more. []: off.
  answer_groups: tuple[int, ...] = ()
  # EAVI's static answer budget in each bucket (the rollout's and the alignment's answer
  # tokens; BatchStream.answer_budgets): this quantile of the bucket's answer lengths (each
  # training item counted once), rounded up to 64 tokens; 1.0: the longest answer. A longer
  # answer is rolled out for the budget's tokens, and only the teacher-forcing term scores the
  # rest of it. The parallel rollout and the alignment cost grows with the budget:
  # on arc1's data 0.99 sets 192 / 320 / 512 answer tokens at 512 / 1024 / 2048 against the
  # longest's 256 / 704 / 640, cutting 3 of the 1008 answers at 1024 (README, "EAVI's answer
  # budget from a quantile").
  budget_quantile: float = 1.0
  # How the excursion is decoded: "sequential" (one token after another, a KV-cached loop as
  # long as the batch's longest answer) or "parallel" (every answer token at once, repeated:
  # the first pass feeds the ground truth, each next one what the last emitted; the sequential
  # rollout, up to rounding, for the first `passes` tokens and for every row whose last pass
  # changed nothing; decode.parallel_rollout).
  rollout: str = "sequential"
  passes: int = 4  # at most, with rollout=parallel
  # How EAVI computes a prompt's continuations: "branch" (the prompt once, teacher forced in
  # prefill mode: the parallel rollout's passes extend its KV cache, the sequential one
  # decodes into it, and the excursion runs as a branch against its keys;
  # steps.branch_alignment_after_rollout, the reference steps.alignment_loss) or "rows" (each
  # continuation a full row, the prompt recomputed: steps.alignment_loss_rows; the sequential
  # rollout then prefills its own prompt): the same tokens and CE terms and, SDL aside
  # (its statistics cover the tokens computed), gradients. "auto": branch on every backend
  # (H200, arc1 32 x 2048, 931 answer tokens: the EAVI step with the parallel rollout 131.7 ms
  # as a branch, 177.8 as rows; CPU, default config, the alignment: 530 ms as a branch, 893 as
  # rows).
  # steps.continuation.
  continuation: str = "auto"


@dataclass(frozen=True)
class EvalConfig:
  mode: str = "augscore"  # greedy | vote | augscore
  max_tasks: int = 0  # 0: all (first N by sorted id otherwise)
  color_perms: int = 0  # extra colour-permuted copies of each D8 view
  samples: int = 0  # extra sampled candidates per view
  temperature: float = 1.0
  batch_size: int = 16  # rows (prompts or scored sequences) per model call, at most
  # Tokens per model call, rows x padded length (the KV capacity in generation): a call at a
  # long length holds max(1, max_batch_tokens // length) rows (a multiple of the device count)
  # instead of batch_size. 0: always batch_size rows.
  max_batch_tokens: int = 0
  # Longest prompt plus answer evaluated, in tokens; 0: the longest of data.buckets. A longer
  # prompt loses demonstrations, largest first (``shortened`` in scores.json).
  max_len: int = 0
  sheet_tasks: int = 8  # tasks drawn in sheet.png, in id order (0: no sheet)
  weights: str = "ema"  # ema (when the run kept one) | params
  # Generations follow the grid grammar (decode.grid_allowed): rows of one width closed by
  # NEWLINE, END after a whole row, at most 30 x 30; a token that would break it is never
  # emitted, so no generation is malformed unless the budget cuts it off. A greedy answer that
  # was already a grid is unchanged. false: unconstrained (as before 2026-12-01).
  grid: bool = True


@dataclass(frozen=True)
class TttConfig:
  """Test-time training before evaluation (onn_jax/ttt.py): per-task copies of the parameters
  matched by ``params`` fine-tuned on the task's leave-one-out demonstrations."""
  steps: int = 0  # optimizer steps per task; 0: off
  learning_rate: float = 1e-3
  warmup_steps: int = 0
  weight_decay: float = 0.0
  batch_size: int = 4  # leave-one-out sequences per task per step
  params: tuple[str, ...] = ("*/attn/*", "*norm/scale")  # fnmatch patterns on "a/b/c" paths
  # Tasks adapted at once (vmapped, split over the devices) at data.pack_len (0 or packing
  # off: the longest bucket); a shorter bucket takes proportionally more, a longer one fewer
  # (at least one). 0: every task of a bucket at once.
  chunk: int = 8


@dataclass(frozen=True)
class CheckpointConfig:
  every: int = 50
  keep: int = 3
  async_save: bool = True


@dataclass(frozen=True)
class ParallelConfig:
  mode: str = "auto"  # auto | single | shard_map | pmap
  distributed: bool = False  # call jax.distributed.initialize()
  coordinator_address: str = ""
  num_processes: int = 0
  process_id: int = -1


@dataclass(frozen=True)
class LogConfig:
  # Live metrics for TensorBoard in <workdir>/tensorboard, beside metrics.jsonl (which is always
  # written). Needs tensorboardX: pip install tensorboardX (in a clone: pip install -e
  # ".[tensorboard]").
  tensorboard: bool = False


@dataclass(frozen=True)
class Config:
  model: ModelConfig = field(default_factory=ModelConfig)
  data: DataConfig = field(default_factory=DataConfig)
  train: TrainConfig = field(default_factory=TrainConfig)
  eavi: EaviConfig = field(default_factory=EaviConfig)
  eval: EvalConfig = field(default_factory=EvalConfig)
  ttt: TttConfig = field(default_factory=TttConfig)
  checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
  parallel: ParallelConfig = field(default_factory=ParallelConfig)
  log: LogConfig = field(default_factory=LogConfig)


def _check_type(key: str, value: Any, annotation: Any) -> Any:
  """Returns ``value`` coerced to ``annotation`` or raises ConfigError naming ``key``."""
  origin = typing.get_origin(annotation)
  if origin is tuple:
    (item_type, _) = typing.get_args(annotation)
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{key}: expected a list of {item_type.__name__}, got {value!r}")
    return tuple(_check_type(f"{key}[{i}]", v, item_type) for i, v in enumerate(value))
  if annotation is bool:
    if not isinstance(value, bool):
      raise ConfigError(f"{key}: expected true/false, got {value!r}")
    return value
  if annotation is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"{key}: expected an integer, got {value!r}")
    return value
  if annotation is float:
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
      try:
        value = float(value)
      except ValueError:
        pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{key}: expected a number, got {value!r}")
    if not math.isfinite(value):
      raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return float(value)
  if annotation is str:
    if value is None:
      return ""
    if not isinstance(value, str):
      hint = " (YAML reads yes/no/on/off as true/false: quote it)" if isinstance(value, bool) \
          else ""
      raise ConfigError(f"{key}: expected a string, got {value!r}{hint}")
    return value
  raise TypeError(f"unsupported annotation {annotation} for {key}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
  if values is None:  # ``train:`` with every key commented out: the defaults
    values = {}
  if not isinstance(values, dict):
    raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  for key in values:
    if key not in names:
      raise ConfigError(f"{prefix}{key}: unknown key (known: {', '.join(sorted(names))})")
  kwargs = {}
  for f in dataclasses.fields(cls):
    if f.name not in values:
      continue
    hint = hints[f.name]
    if dataclasses.is_dataclass(hint):
      kwargs[f.name] = _build(hint, values[f.name], f"{prefix}{f.name}.")
    else:
      kwargs[f.name] = _check_type(f"{prefix}{f.name}", values[f.name], hint)
  return cls(**kwargs)


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
  _require(value in choices, f"{key}: {value!r} is not one of {', '.join(choices)}")


def validate(cfg: Config) -> Config:
  """Checks every constraint that crosses fields. Returns ``cfg`` unchanged or raises."""
  m, d, t, e, ev, c, p = (cfg.model, cfg.data, cfg.train, cfg.eavi, cfg.eval,
                          cfg.checkpoint, cfg.parallel)
  for key in ("d_model", "num_layers", "num_heads", "num_kv_groups", "head_dim", "block_len",
              "block_stride", "select_len", "num_select", "window", "num_experts",
              "expert_hidden", "fallback_k"):
    _require(getattr(m, key) > 0, f"model.{key}: must be positive, got {getattr(m, key)}")
  _require(m.num_heads % m.num_kv_groups == 0,
           f"model.num_heads: {m.num_heads} is not a multiple of model.num_kv_groups="
           f"{m.num_kv_groups}")
  _require(m.head_dim % 2 == 0, f"model.head_dim: must be even for RoPE, got {m.head_dim}")
  _require(m.block_stride <= m.block_len,
           f"model.block_stride: {m.block_stride} exceeds model.block_len={m.block_len}")
  _require(m.select_len % m.block_stride == 0,
           f"model.select_len: {m.select_len} is not a multiple of model.block_stride="
           f"{m.block_stride}")
  _require(m.num_select >= 3, f"model.num_select: must be at least 3 (first, current and "
           f"previous block are always selected), got {m.num_select}")
  _require(m.fallback_k <= m.num_experts,
           f"model.fallback_k: {m.fallback_k} exceeds model.num_experts={m.num_experts}")
  _require(m.gate_hidden >= 0, f"model.gate_hidden: must be >= 0, got {m.gate_hidden}")
  _require(0.0 < m.sdl_target_active <= 1.0,
           f"model.sdl_target_active: must be in (0, 1], got {m.sdl_target_active}")
  _require(m.sdl_diversity_weight >= 0 and m.sdl_sparsity_weight >= 0,
           "model.sdl_*_weight: must be >= 0")
  _require(m.rope_theta > 0, f"model.rope_theta: must be positive, got {m.rope_theta}")
  _one_of("model.cmp_rope", m.cmp_rope, ("none", "both", "query"))
  _one_of("model.nsa_impl", m.nsa_impl, ("auto", "reference", "blockwise", "pallas"))
  _one_of("model.moe_combine", m.moe_combine, ("mean", "softmax"))
  _one_of("model.moe_impl", m.moe_impl, ("auto", "reference", "dense", "ragged", "tiled",
                                        "batched"))
  _require(m.moe_capacity > 0, f"model.moe_capacity: must be positive, got {m.moe_capacity}")
  _require(m.moe_tile > 0, f"model.moe_tile: must be positive, got {m.moe_tile}")
  _one_of("model.attention", m.attention, ("nsa", "full", "dynsmlora"))
  if m.attention == "dynsmlora":
    for key in ("lora_experts", "lora_rank"):
      _require(getattr(m, key) > 0, f"model.{key}: must be positive, got {getattr(m, key)}")
    _require(m.fallback_k <= m.lora_experts, f"model.lora_experts: {m.lora_experts} is below "
             f"model.fallback_k={m.fallback_k} (the attention gate's fallback)")
  _one_of("model.compute_dtype", m.compute_dtype, ("float32", "bfloat16"))
  _one_of("model.param_dtype", m.param_dtype, ("float32", "bfloat16"))

  _require(bool(d.train), "data.train: must name at least one source")
  for key in ("train", "eval"):
    spec = getattr(d, key)
    _require(not spec or all(data_sources(spec)),
             f"data.{key}: {spec!r} has an empty source between '+' signs")
  _require(len(d.buckets) > 0, "data.buckets: must list at least one length")
  _require(all(b > 0 for b in d.buckets), f"data.buckets: lengths must be positive, got "
           f"{list(d.buckets)}")
  _require(list(d.buckets) == sorted(set(d.buckets)),
           f"data.buckets: must be strictly increasing, got {list(d.buckets)}")
  for b in d.buckets:
    _require(b % m.select_len == 0, f"data.buckets: {b} is not a multiple of "
             f"model.select_len={m.select_len}")
  _require(1 <= d.max_grid <= 30, f"data.max_grid: must be in 1..30, got {d.max_grid}")
  _require(d.max_train_tasks >= 0, f"data.max_train_tasks: must be >= 0, got "
           f"{d.max_train_tasks}")
  _require(math.isfinite(d.pack_misses) and d.pack_misses >= 0,
           f"data.pack_misses: must be a finite number >= 0, got {d.pack_misses}")
  _require(not d.pack or d.pack_len == 0 or d.pack_len in d.buckets,
           f"data.pack_len: must be 0 or one of data.buckets {list(d.buckets)} when data.pack is "
           f"on, got {d.pack_len}")
  _require(d.max_batch_tokens >= 0, f"data.max_batch_tokens: must be >= 0, got "
           f"{d.max_batch_tokens}")
  _one_of("data.loss_on", d.loss_on, ("answer", "outputs"))
  _one_of("data.color_perm", d.color_perm, ("none", "1-9", "all"))
  _require(not d.eval_demos or bool(d.eval), "data.eval_demos: needs data.eval to be set")

  for key in ("pretrain_steps", "eavi_steps", "warmup_steps", "reset_every", "run_steps",
              "seed"):
    _require(getattr(t, key) >= 0, f"train.{key}: must be >= 0, got {getattr(t, key)}")
  _require(t.eavi_every >= 0, f"train.eavi_every: must be >= 0, got {t.eavi_every}")
  _require(t.eavi_every != 1, "train.eavi_every: 1 would make every step EAVI, with no teacher "
           "forcing at all; for EAVI alone use train.pretrain_steps=0 and train.eavi_steps")
  _require(t.batch_size > 0, f"train.batch_size: must be positive, got {t.batch_size}")
  _require(t.learning_rate > 0, f"train.learning_rate: must be positive, got {t.learning_rate}")
  _require(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio: must be in [0, 1], got "
           f"{t.min_lr_ratio}")
  # In float32 (as the EMA update computes it) too: 1 - 3e-8 rounds to 1, a division by 0.
  _require(0 <= t.ema_decay < 1 and np.float32(t.ema_decay) < 1,
           f"train.ema_decay: must be in [0, 1) in float32, got {t.ema_decay}")
  _require(t.grad_clip > 0, f"train.grad_clip: must be positive, got {t.grad_clip}")
  _require(t.weight_decay >= 0, f"train.weight_decay: must be >= 0, got {t.weight_decay}")
  for key in ("b1", "b2"):  # in float32 too: Adam's bias correction 1 - b^t must not be 0
    b = getattr(t, key)
    _require(0 <= b < 1 and np.float32(b) < 1, f"train.{key}: must be in [0, 1) in float32, "
             f"got {b}")
  _require(t.max_nonfinite > 0, f"train.max_nonfinite: must be positive, got "
           f"{t.max_nonfinite}")
  _require(t.log_every > 0, f"train.log_every: must be positive, got {t.log_every}")

  _one_of("eavi.feed", e.feed, ("soft", "argmax", "sample"))
  _one_of("eavi.rollout", e.rollout, ("sequential", "parallel"))
  _require(e.passes >= 1, f"eavi.passes: must be >= 1, got {e.passes}")
  _one_of("eavi.continuation", e.continuation, ("auto", "branch", "rows"))
  _require(e.temperature > 0, f"eavi.temperature: must be positive, got {e.temperature}")
  _require(e.excursion_weight >= 0 and e.tf_weight >= 0, "eavi.*_weight: must be >= 0")
  _require(e.learning_rate > 0, f"eavi.learning_rate: must be positive, got {e.learning_rate}")
  _require(e.warmup_steps >= 0, f"eavi.warmup_steps: must be >= 0, got {e.warmup_steps}")
  _require(0 < e.budget_quantile <= 1,
           f"eavi.budget_quantile: must be in (0, 1], got {e.budget_quantile}")
  _require(all(g > 0 for g in e.answer_groups)
           and list(e.answer_groups) == sorted(set(e.answer_groups)),
           f"eavi.answer_groups: must be positive and strictly increasing, got "
           f"{list(e.answer_groups)}")

  _one_of("eval.mode", ev.mode, ("greedy", "vote", "augscore"))
  _one_of("eval.weights", ev.weights, ("ema", "params"))
  for key in ("max_tasks", "color_perms", "samples", "sheet_tasks", "max_batch_tokens",
              "max_len"):
    _require(getattr(ev, key) >= 0, f"eval.{key}: must be >= 0, got {getattr(ev, key)}")
  _require(ev.batch_size > 0, f"eval.batch_size: must be positive, got {ev.batch_size}")
  _require(ev.temperature > 0, f"eval.temperature: must be positive, got {ev.temperature}")

  tt = cfg.ttt
  for key in ("steps", "warmup_steps", "chunk"):
    _require(getattr(tt, key) >= 0, f"ttt.{key}: must be >= 0, got {getattr(tt, key)}")
  _require(tt.learning_rate > 0, f"ttt.learning_rate: must be positive, got {tt.learning_rate}")
  _require(tt.weight_decay >= 0, f"ttt.weight_decay: must be >= 0, got {tt.weight_decay}")
  _require(tt.batch_size > 0, f"ttt.batch_size: must be positive, got {tt.batch_size}")
  _require(len(tt.params) > 0 and all(tt.params),
           f"ttt.params: must list at least one non-empty pattern, got {list(tt.params)}")

  _require(c.every > 0, f"checkpoint.every: must be positive, got {c.every}")
  _require(c.keep > 0, f"checkpoint.keep: must be positive, got {c.keep}")
  _one_of("parallel.mode", p.mode, ("auto", "single", "shard_map", "pmap"))
  return cfg


def from_dict(values: dict[str, Any]) -> Config:
  return validate(_build(Config, values or {}, ""))


def to_dict(cfg: Config) -> dict[str, Any]:
  def convert(x):
    if isinstance(x, tuple):
      return [convert(v) for v in x]
    if isinstance(x, dict):
      return {k: convert(v) for k, v in x.items()}
    return x
  return convert(dataclasses.asdict(cfg))


def parse_override(text: str) -> tuple[list[str], Any]:
  """``"train.seed=3"`` -> (["train", "seed"], 3). The value is read as YAML."""
  if "=" not in text:
    raise ConfigError(f"{text}: an override must look like section.key=value")
  key, raw = text.split("=", 1)
  path = key.strip().split(".")
  if len(path) != 2 or not all(path):
    raise ConfigError(f"{key}: an override key must be section.key (e.g. train.seed)")
  hint = _field_types().get(tuple(path))
  try:
    value = yaml.safe_load(raw) if raw.strip() else ""
  except yaml.YAMLError as err:
    if hint is str:  # (text YAML cannot read at all: "@x", "%x", "*x")
      return path, raw.strip()
    raise ConfigError(f"{key}: cannot read value {raw!r} ({err.__class__.__name__}); the shell "
                      "removes unquoted quotes: quote the whole override, e.g. "
                      "'ttt.params=[\"*\"]'") from None
  # The key's type decides where YAML 1.1 would guess: a string key takes the text as typed
  # (``data.color_perm=no`` is "no", not false; ``train.init_from=2024-12-01`` a folder, not a
  # date; ``data.eval=#x`` "#x", not a comment that left it empty), unless quoted, a list or
  # null; an integer key reads digits in base 10 (``train.seed=010`` is 10, not octal 8); a
  # number is never read in base 60 (``1:30`` is not 90).
  text = raw.strip()
  if hint is str and text and text not in _NULLS and text[0] not in "'\"[{":
    value = text
  elif hint is int and re.fullmatch(r"[+-]?\d+", text):
    value = int(text, 10)
  elif hint in (int, float) and ":" in text:
    raise ConfigError(f"{key.strip()}: expected a number, got {text!r}")
  return path, value


_NULLS = ("~", "null", "Null", "NULL")  # YAML's null: a string key's "none" ("")


@functools.lru_cache(maxsize=None)
def _field_types() -> dict[tuple[str, str], Any]:
  """(section, key) -> the key's annotation, for every key of :class:`Config`."""
  out = {}
  for section in dataclasses.fields(Config):
    hints = typing.get_type_hints(typing.get_type_hints(Config)[section.name])
    out.update({(section.name, key): hint for key, hint in hints.items()})
  return out


SHIPPED_DIR = Path(__file__).resolve().parent / "configs"  # installed with the package


def shipped_names() -> list[str]:
  """Names of the configs that ship with the package (``default``, ``arc1``, ...)."""
  return sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml"))


def resolve(spec: str | Path) -> Path:
  """A config file from a path, or from the name of a shipped config (``default``, ``arc1``).

  ``configs/NAME.yaml`` outside a clone (after ``pip install``) is the shipped ``NAME``:
  ``configs/`` of the repository is a link to the package's folder, so the two are one file.
  """
  path = Path(spec)
  if path.is_file():
    return path
  name = path.stem if path.suffix in (".yaml", ".yml") else str(spec)
  shipped = SHIPPED_DIR / f"{name}.yaml"
  # Only the clone's own relative configs/NAME.yaml: a missing file in a folder of one's own
  # that happens to be named configs/ is an error, not silently the shipped file.
  if (str(spec) == name or path.parent == Path("configs")) and shipped.is_file():
    return shipped
  raise ConfigError(f"{spec}: config file not found (shipped configs: "
                    f"{', '.join(shipped_names())}; or give a path to a YAML file)")


# Keys added after runs were saved, with the value that reproduces those runs' model: a run's
# saved config.yaml (``load(..., saved_run=True)``) without the key is read with this value,
# not today's default.
SAVED_RUN_DEFAULTS = {("model", "cmp_rope"): "query", ("model", "moe_impl"): "dense"}


def _saved_run_defaults(values: dict[str, Any]) -> dict[str, Any]:
  for (section, key), value in SAVED_RUN_DEFAULTS.items():
    if isinstance(values.get(section), dict):
      values[section].setdefault(key, value)
  return values


def from_saved_run(values: dict[str, Any]) -> Config:
  """A run's config as saved (e.g. in a checkpoint's record), read as :func:`load` reads its
  config.yaml with ``saved_run``."""
  return from_dict(_saved_run_defaults({k: dict(v) if isinstance(v, dict) else v
                                        for k, v in values.items()}))


class _UniqueKeyLoader(yaml.SafeLoader):
  """``yaml.safe_load``'s reading, except that a key given twice in one mapping is an error: a
  ``train:`` block appended to a copy of a shipped config replaced its whole section, silently
  (the last one wins in YAML)."""

  def construct_mapping(self, node, deep=False):
    if isinstance(node, yaml.MappingNode):
      seen = set()
      for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *anchor``, expanded below
          continue
        key = self.construct_object(key_node, deep=deep)
        if isinstance(key, typing.Hashable) and key in seen:
          raise yaml.constructor.ConstructorError(
              None, None, f"key {key!r} given twice in one mapping", key_node.start_mark)
        if isinstance(key, typing.Hashable):
          seen.add(key)
    return super().construct_mapping(node, deep=deep)


def load(path: str | Path | None = None, overrides: typing.Sequence[str] = (), *,
         saved_run: bool = False) -> Config:
  """Reads a YAML config (a path or a shipped name; or the defaults), applies
  ``section.key=value`` overrides, validates. ``saved_run``: the file is a run's config.yaml
  (see SAVED_RUN_DEFAULTS)."""
  values: dict[str, Any] = {}
  if path is not None:
    path = resolve(path)
    if not path.is_file():
      raise ConfigError(f"{path}: config file not found")
    try:
      values = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except (OSError, UnicodeDecodeError) as err:
      why = err.strerror if isinstance(err, OSError) else f"not UTF-8 text: {err.reason}"
      raise ConfigError(f"{path}: cannot be read ({why})") from None
    except yaml.YAMLError as err:
      mark = getattr(err, "problem_mark", None)
      where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
      raise ConfigError(f"{path}: not valid YAML{where} ({str(err).splitlines()[0]})") from None
    if not isinstance(values, dict):
      raise ConfigError(f"{path}: the top level must be a mapping of sections")
    if saved_run:
      _saved_run_defaults(values)
  for text in overrides:
    (section, key), value = parse_override(text)
    if section not in {f.name for f in dataclasses.fields(Config)}:
      raise ConfigError(f"{section}.{key}: unknown section {section!r}")
    if values.get(section) is None:  # (``train:`` with every key commented out)
      values[section] = {}
    section_values = values[section]
    if not isinstance(section_values, dict):
      raise ConfigError(f"{section}: expected a mapping")
    section_values[key] = value
  return from_dict(values)


KEYS_HELP = ("Config keys (section.key=value): every key, its default and what it means are in "
             "onn_jax/config.py (the *Config dataclasses); python -m train.main --config NAME "
             "--print-config [section.key=value ...] shows the resolved values.")


def dump(cfg: Config) -> str:
  """The config as YAML, sections and keys in declaration order."""
  return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save(cfg: Config, path: str | Path) -> None:
  """Writes the YAML atomically: other processes reading ``path`` see the old or the new file."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
  os.replace(tmp, path)


def replace(cfg: Config, **sections: dict[str, Any]) -> Config:
  """``replace(cfg, train={"seed": 3})``: a validated copy with some fields changed."""
  values = to_dict(cfg)
  for section, changes in sections.items():
    values[section].update(changes)
  return from_dict(values)

