"""KV-cached autoregressive decoding: prefill, then a ``jax.lax.while_loop`` of one-token steps.

Prompts are right-padded in one [B, P] buffer with per-example lengths; each example decodes
at its own absolute position, so a batch may mix prompts of different lengths.
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from onn_jax.data.tokens import END, NEWLINE, NUM_COLORS, PAD, VOCAB_SIZE
from onn_jax.model import moe, nsa
from onn_jax.model.layers import DECODE_CONSTS
from onn_jax.model.transformer import Cache, Transformer, init_cache

GRID_SIDE = 30  # ARC grids are at most 30 x 30
# One-token steps per iteration of generate's loop, which checks after each iteration whether
# every row has finished (on a GPU each check waits for the device, as did the branch that used
# to skip the model for finished rows at every step). H200, jax 0.11.2, arc1 model (random
# weights), batch 32, 2048-slot cache, the steps compiled as STEPS_PER_CHECK copies
# (STEP_COPIES = 8; docs/bench/decode_steps_per_check_h200_2026-12-03.json): 129
# tokens after a 1918-token prompt 132.7 ms before (a branch and a check every step), 134.6
# with a check every step, 124.9 every 4, 123.0 every 8 (0.752 -> 0.667 ms a token); 200
# tokens of a 931-token budget after 1000: 195.6, 189.3, 167.2, 162.8 ms. Once every row has
# finished, up to STEPS_PER_CHECK more steps run (at most max_new in all).
STEPS_PER_CHECK = 8
# Copies of the step compiled into the inner loop of STEPS_PER_CHECK steps: None is 8 on a GPU
# and 1 elsewhere (step_copies). H200, same setting, same process
# (docs/bench/decode_step_copies_h200_2026-12-03.json): 8 copies 107.4 ms against 122.7 for one
# (129 tokens; 200 of 931: 147.2 against 168.7), 1.14x, but the first call compiles 2.1-2.5x
# longer (35 s against 14-17); on the CPU 8 copies compile 3x longer (the test model, 40
# tokens: 3.1 s for one copy, 5.2 for 4, 9.5 for 8); their speed there was not timed.
STEP_COPIES: int | None = None


def step_copies(backend: str | None = None) -> int:
  """:data:`STEP_COPIES`, or where it is None 8 on a GPU (``backend``, default
  ``jax.default_backend()``) and 1 elsewhere."""
  if STEP_COPIES is not None:
    return STEP_COPIES
  return 8 if (backend or jax.default_backend()) == "gpu" else 1


# The kernels of a one-token decoding step, by name: (nsa.PALLAS_DECODE, moe.DECODE_KERNEL).
# "fused_xla_block_moe" is what runs by default on a GPU (NSA's input products, its core and
# its cache writes one kernel each, the completed compressed block outside the core: in the
# cache writes' kernel with nsa_pallas.BLOCK_KERNEL and BLOCK_WRITE; each DynMoE layer's
# experts one kernel routing its rows, and XLA's sum of its partials; elsewhere XLA's DynMoE,
# "fused_xla_block"); settings of their own: nsa_pallas.DECODE_INPUTS and
# moe_pallas.DECODE_ROUTE (on), nsa_pallas.INPUTS_BLOCK (off: slower); "split": each NSA
# branch its own kernel; "fused": the block computed in the write kernel too; "fused_moe":
# "fused" and the DynMoE kernel. H100, `python -m train.bench --only decode --lens 2048 --sets
# ...` (session 36, 32 rows x 512 tokens): "fused_xla_block_moe" 1.05-1.06x "fused_xla_block";
# H200 (session 22, the DynMoE kernel routing in itself then): "fused" 0.98x
# "fused_xla_block", "split" 0.61x.
DECODE_KERNELS: dict[str, tuple[str, str]] = {
    "split": ("split", "xla"), "fused_xla_block": ("fused_xla_block", "xla"),
    "fused": ("fused", "xla"), "fused_moe": ("fused", "pallas"),
    "fused_xla_block_moe": ("fused_xla_block", "pallas")}


@contextlib.contextmanager
def decode_kernels(name: str):
  """While tracing inside: the decoding step's kernels :data:`DECODE_KERNELS` ``[name]``. The
  settings are read when a function is traced: a function jitted and compiled before keeps the
  kernels it was traced with."""
  if name not in DECODE_KERNELS:
    raise ValueError(f"decode kernels {name!r}: expected one of {', '.join(DECODE_KERNELS)}")
  saved = nsa.PALLAS_DECODE, moe.DECODE_KERNEL
  nsa.PALLAS_DECODE, moe.DECODE_KERNEL = DECODE_KERNELS[name]
  try:
    yield
  finally:
    nsa.PALLAS_DECODE, moe.DECODE_KERNEL = saved


# Whether generate's loop reads the parameters that its step only ever reads converted (the
# experts' and projections' float32 weights, read as bfloat16) converted once before the loop
# (:func:`precast`): the same step without those conversions. XLA left them in the loop body on
# a GPU (once per iteration of STEP_COPIES steps; train.kernel_count), not on the CPU.
HOIST_CASTS = True
# Whether generate computes what its step computes from the parameters alone (the compressors'
# weights stacked, the experts' unit prototypes: layers.DECODE_CONSTS) once, before its loop
# (:func:`decode_constants`), rather than once per iteration of STEP_COPIES steps, where XLA's
# GPU compiler left them. Deviceless sm_90 count of the arc1 rollout (`python -m
# train.kernel_count --config arc1 --decode fused_xla_block_moe`): 87.625 -> 86.125 launches a
# step (XLA's completed block still computes its compressors' constant terms in the step),
# 70.375 -> 65.875 with nsa_pallas.BLOCK_KERNEL. Timed in session 40 (H100, arc1 rollout,
# BLOCK_KERNEL off): 175.3 ms a step (mean of 3) against 173.7 without (variant
# no_hoist_consts), the same within the runs' spread (173.8-176.3); kept for the launches. An
# earlier hoisting of every parameter-only value by partial evaluation of the step's jaxpr
# (an internal JAX API) timed even on the H100 when the step took twice as long
# (docs/benchmarks.md, session 21).
HOIST_CONSTS = True

# Operations that only move or pick elements: converting their operand first gives exactly
# their result converted.
_MOVES = frozenset({"reshape", "transpose", "squeeze", "expand_dims", "broadcast_in_dim",
                    "slice", "dynamic_slice", "concatenate", "stack", "gather", "rev", "copy"})
# Calls whose jaxpr (under one of _CALL_JAXPRS) takes the call's operands and gives its results,
# run once (a loop's or a kernel's jaxpr does not: scan, while, cond and pallas_call are reads).
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "remat2", "checkpoint",
                    "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})
_CALL_JAXPRS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def _cast_targets(jaxpr, var, returned=None) -> frozenset | None:
  """The dtypes ``var`` is converted to wherever it is read, through element moves and nested
  calls; None where a read computes with it. ``returned(i)``: the same for ``jaxpr``'s output
  i in the jaxpr that called it (None at the top, where an output is a read)."""
  targets: frozenset = frozenset()
  for i, out in enumerate(jaxpr.outvars):
    if out is var:
      found = returned(i) if returned else None
      if found is None:
        return None
      targets |= found
  for eqn in jaxpr.eqns:
    for i, v in enumerate(eqn.invars):
      if v is not var:
        continue
      name = eqn.primitive.name
      if name == "convert_element_type":
        found = frozenset({np.dtype(eqn.params["new_dtype"])})
      elif name in _MOVES and (i == 0 or name in ("concatenate", "stack")):
        found = _cast_targets(jaxpr, eqn.outvars[0], returned)
      else:
        sub = next((eqn.params[k] for k in _CALL_JAXPRS if k in eqn.params), None)
        sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's jaxpr
        if (name not in _CALLS or sub is None or len(sub.invars) != len(eqn.invars)
            or len(sub.outvars) != len(eqn.outvars)):
          return None
        found = _cast_targets(sub, sub.invars[i], lambda j, eqn=eqn: _cast_targets(
            jaxpr, eqn.outvars[j], returned))
      if found is None:
        return None
      targets |= found
  return targets


def precast(fn, params, *args):
  """``params`` with each leaf that ``fn(params, *args)`` reads only converted to one narrower
  dtype converted to it, so that ``fn`` computes exactly what it did without converting them:
  a loop that calls ``fn`` converts them once, before it. Found from ``fn``'s jaxpr (traced
  again here, from shapes): every read of such a leaf, through reshapes, slices, gathers,
  concatenations and nested calls, is a conversion to that dtype. ``fn``'s Python code must
  not depend on the leaves' dtypes (``w.dtype``), which the jaxpr does not show (the model's
  modules read their configured dtypes; tests/test_model.py checks generate bit for bit)."""
  leaves, treedef = jax.tree.flatten(params)
  spec = lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))  # noqa: E731
  closed = jax.make_jaxpr(lambda p, *a: fn(jax.tree.unflatten(treedef, p), *a))(
      [spec(x) for x in leaves], *jax.tree.map(spec, args))
  out = []
  for leaf, var in zip(leaves, closed.jaxpr.invars):
    targets = _cast_targets(closed.jaxpr, var)
    dtype = next(iter(targets)) if targets is not None and len(targets) == 1 else None
    narrower = dtype is not None and dtype.itemsize < jnp.result_type(leaf).itemsize
    out.append(leaf.astype(dtype) if narrower else leaf)
  return jax.tree.unflatten(treedef, out)


def decode_constants(model, params, fed_BV, cache: Cache, pos_B) -> dict:
  """The values a decoding step of ``model`` (a Transformer, or a wrapper with its ``apply``:
  ``evaluation.model_fns.RowParams``, whose rows' constants get a leading row axis) computes
  from ``params`` alone (``layers.DECODE_CONSTS``), for :func:`generate`'s steps to take as
  given: a step traced with that collection mutable, its other results unused (so never
  computed under jit)."""
  _, mutated = model.apply({"params": params}, fed_BV[:, None], mode="decode", cache=cache,
                           pos_B=pos_B, mutable=[DECODE_CONSTS])
  return dict(mutated).get(DECODE_CONSTS, {})


class Generation(NamedTuple):
  tokens_BA: jax.Array  # int32: emitted tokens; PAD after END
  logprobs_BA: jax.Array  # float32: log p of each emitted token (0 after END)
  fed_BAV: jax.Array  # float32: what was fed back at each step (one-hot or distribution)
  ended_B: jax.Array  # bool: END was emitted within the budget (and the row's stop)
  # parallel_rollout only: the passes it ran (int32 scalar), and the rows whose tokens are what
  # generate would emit, up to rounding (bool [B]: a fixed point, or no more tokens than
  # passes; never a row whose tokens reach past the cache's capacity).
  passes: jax.Array | None = None
  exact_B: jax.Array | None = None


class GridState(NamedTuple):
  """Where each row's answer stands in the grid grammar: the width fixed by its first grid row
  (0 before that row closes), the cells of the current row, the closed rows."""
  width_B: jax.Array
  col_B: jax.Array
  rows_B: jax.Array


def grid_start(batch: int) -> GridState:
  zeros_B = jnp.zeros((batch,), jnp.int32)
  return GridState(zeros_B, zeros_B, zeros_B)


def grid_allowed(state: GridState) -> jax.Array:
  """bool [B, V]: the tokens that keep each answer a grid, ``(colour^w NEWLINE)^h END`` with
  1 <= w, h <= GRID_SIDE: a colour while the row has room (the first row up to GRID_SIDE, the
  others up to its width), NEWLINE after a row's last cell (any cell of the first row), END
  after a whole row. Every state allows at least one token."""
  width_B, col_B, rows_B = state
  limit_B = jnp.where(width_B > 0, width_B, GRID_SIDE)
  colour_B = (col_B < limit_B) & (rows_B < GRID_SIDE)
  newline_B = (col_B >= 1) & ((width_B == 0) | (col_B == width_B))
  end_B = (col_B == 0) & (rows_B >= 1)
  token_V = jnp.arange(VOCAB_SIZE)
  return (((token_V < NUM_COLORS)[None] & colour_B[:, None])
          | ((token_V == NEWLINE)[None] & newline_B[:, None])
          | ((token_V == END)[None] & end_B[:, None]))


def grid_advance(state: GridState, token_B: jax.Array) -> GridState:
  """The state after each row emits ``token_B`` (a token the state allowed)."""
  width_B, col_B, rows_B = state
  colour_B, newline_B = token_B < NUM_COLORS, token_B == NEWLINE
  width_B = jnp.where(newline_B & (width_B == 0), col_B, width_B)
  col_B = jnp.where(colour_B, col_B + 1, jnp.where(newline_B, 0, col_B))
  return GridState(width_B, col_B, rows_B + newline_B.astype(jnp.int32))


def _choose(logits_BV, feed: str, temperature: float, rng, rows_B):
  """The emitted token and what is fed back at the next position.

  Each row samples with its own key, ``fold_in(rng, row)`` for its global row index, so a
  batch split over devices samples exactly what one device would.
  """
  if feed == "sample":
    keys_B = jax.vmap(lambda row: jax.random.fold_in(rng, row))(rows_B)
    token_B = jax.vmap(jax.random.categorical)(
        keys_B, logits_BV / temperature).astype(jnp.int32)
  else:
    token_B = jnp.argmax(logits_BV, -1).astype(jnp.int32)
  if feed == "soft":
    fed_BV = jax.nn.softmax(logits_BV / temperature, -1)
  else:
    fed_BV = jax.nn.one_hot(token_B, VOCAB_SIZE, dtype=jnp.float32)
  return token_B, fed_BV


def generate(model: Transformer, params, prompt_BP: jax.Array, prompt_len_B: jax.Array, *,
             max_new: int, capacity: int | None = None, feed: str = "argmax",
             temperature: float = 1.0, rng: jax.Array | None = None,
             row_offset: jax.Array | int = 0,
             stop_after_B: jax.Array | None = None, grid: bool = False,
             prompt_cache: Cache | None = None,
             first_logits_BV: jax.Array | None = None) -> Generation:
  """Generates ``max_new`` answer tokens after each prompt.

  Args:
    prompt_BP: int32 token buffer; example b's prompt is ``prompt_BP[b, :prompt_len_B[b]]``
      (ending with the OUT marker). What lies beyond is ignored.
    max_new: static number of tokens to emit per example.
    capacity: KV-cache length; defaults to ``P + max_new``. Every example must satisfy
      ``prompt_len + max_new - 1 <= capacity``.
    feed: ``argmax`` (greedy), ``sample`` (temperature sampling) or ``soft`` (the predicted
      distribution is fed back as its expected embedding; argmax is reported as the token).
      Reported log-probabilities are those of the untempered distribution.
    row_offset: global index of this batch's first row (data parallel), for sampling keys.
    stop_after_B: int32 [B], optional: tokens each row needs; a row emits PAD after that many
      (EAVI needs only the answer's length). Default: ``max_new``.
    grid: constrain every row to the grid grammar (:func:`grid_allowed`): tokens that would
      break it get probability 0, and the reported log-probabilities are those of the
      constrained distribution. An answer is then a grid unless the budget cuts it off.
    prompt_cache, first_logits_BV: the prompt's KV cache (``capacity`` slots, given
      explicitly) and the logits at its last token, when the caller has computed them, e.g. a
      teacher-forced pass in ``"prefill"`` mode over the prompt and the ground truth (EAVI's
      alignment): no prefill runs then. Only positions before each row's ``prompt_len`` are
      read: a decoded token overwrites its position before it is attended to, and a compressed
      block is rebuilt when a token completes it, before any query sees it. The rollout is
      then the one from its own prefill, up to rounding where the experts' dispatch depends on
      the tokens after the prompt (a sparse ``model.moe_impl``'s overflow decision counts every
      valid token of the call; EAVI runs its experts dense).
  """
  if (prompt_cache is None) != (first_logits_BV is None):
    raise ValueError("generate: prompt_cache and first_logits_BV go together")
  if prompt_cache is not None and capacity is None:
    raise ValueError("generate: with a prompt_cache, give its capacity (its slots)")
  B, P = prompt_BP.shape
  capacity = capacity or P + max_new
  if rng is None:
    rng = jax.random.PRNGKey(0)
  if prompt_cache is None:
    cache, logits_BV = prefill(model, params, prompt_BP, prompt_len_B, capacity)
  else:
    cache, logits_BV = prompt_cache, first_logits_BV.astype(jnp.float32)
  global_rows_B = row_offset + jnp.arange(B)

  def emit(logits_BV, done_B, grid_state, rng):
    if grid:
      logits_BV = jnp.where(grid_allowed(grid_state), logits_BV, -jnp.inf)
    token_B, fed_BV = _choose(logits_BV, feed, temperature, rng, global_rows_B)
    logp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BV, -1), token_B[:, None], -1)[:, 0]
    if grid:
      grid_state = grid_advance(grid_state, token_B)
    token_B = jnp.where(done_B, PAD, token_B)
    fed_BV = jnp.where(done_B[:, None], jax.nn.one_hot(PAD, VOCAB_SIZE), fed_BV)
    logp_B = jnp.where(done_B, 0.0, logp_B)
    return token_B, fed_BV, logp_B, done_B | (token_B == END), grid_state

  # A row is finished once it has emitted END or the tokens it needs (``stop_after_B``); a
  # finished row emits PAD. Once every row is finished the loop stops, so a rollout costs what
  # the batch's longest answer needs (rounded up to STEPS_PER_CHECK), not the static budget.
  need_B = jnp.full((B,), max_new, jnp.int32) if stop_after_B is None else stop_after_B
  rngs = jax.random.split(rng, max_new)

  def decode_step(params, consts, fed_BV, cache, pos_B):
    variables = {"params": params, **({DECODE_CONSTS: consts} if consts else {})}
    return model.apply(variables, fed_BV[:, None], mode="decode", cache=cache,
                       pos_B=jnp.minimum(pos_B, capacity - 1))

  pos_B = prompt_len_B.astype(jnp.int32)
  consts = {}
  if HOIST_CONSTS:
    consts = decode_constants(model, params, jnp.zeros((B, VOCAB_SIZE), jnp.float32), cache,
                              jnp.minimum(pos_B, capacity - 1))
  # (A model that computes in its parameters' dtype converts none of them.)
  if HOIST_CASTS and model.cfg.compute_dtype != model.cfg.param_dtype:
    params = precast(decode_step, params, consts,
                     jax.ShapeDtypeStruct((B, VOCAB_SIZE), jnp.float32), cache, pos_B)

  def step(carry):
    cache, logits_BV, pos_B, done_B, grid_state, k, out = carry
    token_B, fed_BV, logp_B, done_B, grid_state = emit(logits_BV, done_B, grid_state,
                                                         rngs[jnp.minimum(k, max_new - 1)])
    done_B = done_B | (k + 1 >= need_B)
    logits_B1V, cache, _ = decode_step(params, consts, fed_BV, cache, pos_B)
    # k < padded always (the buffers' rows): an update in place, no bounds check (a scatter's).
    out = tuple(jax.lax.dynamic_update_index_in_dim(buf, val, k, 0)
                for buf, val in zip(out, (token_B, logp_B, fed_BV)))
    return cache, logits_B1V[:, 0], pos_B + 1, done_B, grid_state, k + 1, out

  # Each step emits one token and feeds it to the model (the last step's model call is not
  # needed, but skipping it would take a branch). The loop checks for its end every
  # STEPS_PER_CHECK steps (each check waits for the device); the steps past max_new, or after
  # every row finished, emit PAD into buffer rows (step-major: _AB) that are dropped or
  # already PAD.
  per = max(1, min(STEPS_PER_CHECK, max_new))
  padded = -(-max_new // per) * per
  out = (jnp.full((padded, B), PAD, jnp.int32), jnp.zeros((padded, B), jnp.float32),
         jnp.broadcast_to(jax.nn.one_hot(PAD, VOCAB_SIZE, dtype=jnp.float32),
                          (padded, B, VOCAB_SIZE)))

  def steps_body(carry):
    # A loop of known trip count, which XLA's GPU runtime runs without waiting for the device.
    return jax.lax.scan(lambda c, _: (step(c), None), carry, None, length=per,
                        unroll=max(1, min(step_copies(), per)))[0]

  def unfinished(carry):
    k, done_B = carry[5], carry[3]
    return (k < max_new) & ~jnp.all(done_B)

  carry = (cache, logits_BV, pos_B, need_B <= 0, grid_start(B),
           jnp.int32(0), out)
  tokens_AB, logps_AB, feds_ABV = jax.lax.while_loop(unfinished, steps_body, carry)[-1]
  tokens_BA, logprobs_BA = tokens_AB[:max_new].T, logps_AB[:max_new].T
  fed_BAV = feds_ABV[:max_new].transpose(1, 0, 2)
  done_B = jnp.any(tokens_BA == END, axis=1)
  return Generation(tokens_BA, logprobs_BA, fed_BAV, done_B)


def after_first_end(tokens_BA: jax.Array) -> jax.Array:
  """bool [B, A]: whether an END comes strictly before each position (a rollout that emitted
  END at index e emits nothing after it: :func:`generate` pads positions > e)."""
  end_BA = (tokens_BA == END).astype(jnp.int32)
  return jnp.cumsum(end_BA, axis=1) - end_BA > 0


def prefill(model: Transformer, params, prompt_BP, prompt_len_B, capacity: int):
  """The cache after each row's prompt (what lies past it in ``prompt_BP`` is fed as PAD), and
  the logits at its last token: (cache, logits_BV)."""
  B, P = prompt_BP.shape
  valid_BP = jnp.arange(P)[None] < prompt_len_B[:, None]
  cache = init_cache(model.cfg, B, capacity)
  logits_BPV, cache, _ = model.apply({"params": params}, jnp.where(valid_BP, prompt_BP, PAD),
                                     valid_BP, mode="prefill", cache=cache)
  return cache, logits_BPV[jnp.arange(B), prompt_len_B - 1]


def continuation_inputs(inputs_BT: jax.Array, start_B: jax.Array, fed_BAV: jax.Array
                        ) -> jax.Array:
  """[B, T, V]: each row's tokens (``inputs_BT``, one-hot) with ``fed_BAV`` (a continuation:
  tokens or distributions) in place of those at ``start_B ..``; ``inputs_BT`` again past it."""
  A = fed_BAV.shape[1]
  k_BT = jnp.arange(inputs_BT.shape[1], dtype=jnp.int32)[None] - jnp.asarray(
      start_B, jnp.int32)[:, None]  # input t holds continuation token k_BT
  in_continuation_BT = (k_BT >= 0) & (k_BT < A)
  fed_BTV = jnp.take_along_axis(fed_BAV, jnp.clip(k_BT, 0, A - 1)[..., None], axis=1)
  onehot_BTV = jax.nn.one_hot(inputs_BT, VOCAB_SIZE, dtype=jnp.float32)
  return jnp.where(in_continuation_BT[..., None], fed_BTV, onehot_BTV)


def parallel_rollout(model: Transformer, params, prompt_BP: jax.Array, prompt_len_B: jax.Array,
                     guess_BA: jax.Array, *, passes: int, capacity: int | None = None,
                     feed: str = "argmax", temperature: float = 1.0,
                     rng: jax.Array | None = None, row_offset: jax.Array | int = 0,
                     stop_after_B: jax.Array | None = None,
                     shared_prompt: bool = True,
                     first_logits_BAV: jax.Array | None = None,
                     prompt_cache: Cache | None = None) -> Generation:
  """:func:`generate`'s rollout (no grid grammar) by fixed-point iteration over all its tokens
  at once, instead of one token after another.

  A pass feeds what the last pass emitted (first ``guess_BA``, int32 [B, A], e.g. the ground
  truth) after the prompt, all A tokens at once, and emits at every position what ``generate``
  would emit there after that context (the same choice, sampling key and stop rules). After
  pass i the first i tokens are ``generate``'s; a pass that changes nothing has reached its
  fixed point, which is ``generate``'s rollout. The loop stops once every row is there (or
  needs no more than the passes run) or after ``passes`` passes. A row that is not there keeps,
  from token ``passes`` on, what the model emits after the previous pass's context: its own
  predictions, not its free-running rollout. ``exact_B`` says which rows are exact; "exact" up
  to rounding: a pass and the one-token decode add the same terms in other orders (float32 on
  the CPU: the same tokens, distributions within 1e-6; bfloat16 rounds coarser, so a near tie
  may go the other way).

  A pass runs, with ``shared_prompt``, the A tokens against the prompt's KV cache (``"extend"``
  mode, after one prefill): a forward of A tokens a row. Without, it runs each row whole as in
  training, the prompt and the A - 1 tokens fed (``capacity`` positions, the prompt recomputed
  every pass, on the attention's training path, which on GPU is NSA's fastest): a forward of
  ``capacity`` tokens a row. Either way a pass covers the whole static budget, past each row's
  answer too, where ``generate`` runs one-token steps up to the batch's longest answer; NSA
  rebuilds every compressed block of the row in every pass. Tokens past the capacity are
  computed at their own positions with ``shared_prompt``, from the last position's logits
  without (``generate`` clamps them; such a row is never exact).

  ``first_logits_BAV``: the first pass's logits (for token k after the prompt and ``guess_BA``'s
  first k tokens), when the caller has computed them, e.g. a teacher-forced forward pass over
  the ground truth (EAVI's alignment): that pass is then not run again, and counts in
  ``passes``. ``prompt_cache`` (with ``shared_prompt`` and ``first_logits_BAV``): the prompt's
  KV cache from that pass (run in ``"prefill"`` mode; only positions before each row's
  ``prompt_len`` are read), so that no prefill runs here.
  """
  B, A = guess_BA.shape
  capacity = capacity or prompt_BP.shape[1] + A
  if rng is None:
    rng = jax.random.PRNGKey(0)
  global_rows_B = row_offset + jnp.arange(B)
  keys = jax.random.split(rng, A)  # generate's key for token k
  need_B = jnp.full((B,), A, jnp.int32) if stop_after_B is None else stop_after_B
  k_BA = jnp.arange(A)[None]
  if prompt_cache is not None and (not shared_prompt or first_logits_BAV is None):
    raise ValueError("parallel_rollout: prompt_cache needs shared_prompt and first_logits_BAV")
  if prompt_cache is not None:  # token 0's logits follow the prompt alone, in every pass
    cache, first_BV = prompt_cache, first_logits_BAV[:, 0]
  elif shared_prompt:
    cache, first_BV = prefill(model, params, prompt_BP, prompt_len_B, capacity)
  else:
    P = prompt_BP.shape[1]
    row_BC = (jnp.pad(prompt_BP, ((0, 0), (0, capacity - P)), constant_values=PAD)
              if capacity > P else prompt_BP[:, :capacity])
    # Token k is predicted at position prompt_len - 1 + k of the row; what lies past the last
    # token fed is padding (kept out of the experts' dispatch and statistics).
    at_BA = jnp.clip(prompt_len_B[:, None] - 1 + k_BA, 0, capacity - 1)
    valid_BC = jnp.arange(capacity)[None] < (prompt_len_B + A - 1)[:, None]

  def logits_after(fed_BAV):
    """[B, A, V]: the logits for token k after the prompt and ``fed_BAV[:, :k]``."""
    if not shared_prompt:
      logits_BCV = model.apply({"params": params}, continuation_inputs(
          row_BC, prompt_len_B, fed_BAV[:, :A - 1]), valid_BC)[0]
      return jnp.take_along_axis(logits_BCV, at_BA[..., None], axis=1)
    later_BAV = model.apply({"params": params}, fed_BAV[:, :A - 1], mode="extend", cache=cache,
                            pos_B=prompt_len_B)[0] if A > 1 else jnp.zeros((B, 0, VOCAB_SIZE))
    return jnp.concatenate([first_BV[:, None], later_BAV], axis=1)

  def emit(logits_BAV):
    """Every token from its logits (after a pass's context): (tokens, log-probabilities, fed
    back)."""
    token_BA, out_BAV = jax.vmap(lambda logits_BV, key: _choose(
        logits_BV, feed, temperature, key, global_rows_B), in_axes=(1, 0), out_axes=1)(
            logits_BAV, keys)
    logp_BA = jnp.take_along_axis(jax.nn.log_softmax(logits_BAV, -1), token_BA[..., None],
                                  -1)[..., 0]
    # generate's stop: PAD after the first END (before the row's need) and from the need on.
    live_BA = k_BA < need_B[:, None]
    done_BA = after_first_end(jnp.where(live_BA, token_BA, PAD)) | ~live_BA
    out_BAV = jnp.where(done_BA[..., None], jax.nn.one_hot(PAD, VOCAB_SIZE), out_BAV)
    return (jnp.where(done_BA, PAD, token_BA), jnp.where(done_BA, 0.0, logp_BA), out_BAV)

  def step(i, fed_BAV, logits_BAV):
    token_BA, logp_BA, out_BAV = emit(logits_BAV)
    moved_B = jnp.any(out_BAV != fed_BAV, axis=(1, 2))
    return i + 1, out_BAV, token_BA, logp_BA, moved_B

  def body(carry):
    i, fed_BAV, _, _, _ = carry
    return step(i, fed_BAV, logits_after(fed_BAV))

  guess_BAV = jax.nn.one_hot(jnp.where(k_BA < need_B[:, None], guess_BA, PAD), VOCAB_SIZE,
                             dtype=jnp.float32)
  if first_logits_BAV is None:
    start = (jnp.int32(0), guess_BAV, jnp.full((B, A), PAD, jnp.int32), jnp.zeros((B, A)),
             jnp.ones((B,), bool))
  else:  # the first pass, from the caller's logits (run, as a pass is, if a row needs a token)
    ran, *rest = step(jnp.int32(0), guess_BAV, first_logits_BAV.astype(jnp.float32))
    start = (jnp.where(jnp.any(need_B > 0), ran, 0), *rest)
  # A row is exact once its last pass changed nothing, or after as many passes as it needs.
  unsettled = lambda ran, moved_B: moved_B & (need_B > ran)
  ran, fed_BAV, tokens_BA, logprobs_BA, moved_B = jax.lax.while_loop(
      lambda carry: (carry[0] < passes) & jnp.any(unsettled(carry[0], carry[4])), body, start)
  fits_B = prompt_len_B + need_B - 1 <= capacity
  return Generation(tokens_BA, logprobs_BA, fed_BAV, jnp.any(tokens_BA == END, axis=1),
                    passes=ran, exact_B=~unsettled(ran, moved_B) & fits_B)


@functools.partial(jax.jit, static_argnames=("model", "max_new", "capacity", "feed",
                                             "temperature", "grid"))
def generate_jit(model, params, prompt_BP, prompt_len_B, *, max_new, capacity=None,
                 feed="argmax", temperature=1.0, rng=None, row_offset=0,
                 grid=False) -> Generation:
  return generate(model, params, prompt_BP, prompt_len_B, max_new=max_new, capacity=capacity,
                  feed=feed, temperature=temperature, rng=rng, row_offset=row_offset,
                  grid=grid)


def sequence_logprob(model: Transformer, params, inputs_BT, targets_BT, mask_BT):
  """Sum of log p(target) over masked positions, per example: [B] float32 (teacher forced)."""
  logits_BTV, _, _ = model.apply({"params": params}, inputs_BT, inputs_BT != PAD)
  logp_BTV = jax.nn.log_softmax(logits_BTV, -1)
  logp_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], -1)[..., 0]
  return jnp.sum(logp_BT * mask_BT, -1)
