"""The model side of evaluation: batched ``generate_fn`` and ``logprob_fn`` for AugScore.

Each model call is padded to a bucketed length (a power of two) and to a number of rows fixed by
that length: ``batch_size``, or fewer where a row is long and a token budget
(``max_batch_tokens``) is set, so a 16k-token prompt runs a few rows at a time while short
ones fill the batch. A whole evaluation compiles a handful of programs (one per length and
budget) however many tasks and views it covers, all at once before its first call when the
evaluation announces its calls (:meth:`ModelFns.prepare`).

Per-task weights (test-time training) are pooled: with ``adapters`` (every adapted task's
parameter subset stacked on a leading axis) each row carries the index of its task's adapter,
gathered per call, and the model runs vmapped over rows with the base shared
(:class:`RowParams`). Tasks of any mix share a call; the compiled programs are the same shapes
as without adapters.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from onn_jax.data.pipeline import rows_within
from onn_jax.data.tokens import PAD
from onn_jax.decode import generate_jit, sequence_logprob
from onn_jax.model.layers import DECODE_CONSTS
from onn_jax.model.transformer import Transformer, for_vmap, outside_tf
from onn_jax.parallel import AXIS, compile_at_once, compile_in_background, host_value
from onn_jax.ttt import merge

MIN_LENGTH = 64  # prompt, budget and sequence lengths are powers of two from here up


def _round_up(n: int) -> int:
  """The next power of two (at least MIN_LENGTH): a few shapes, a few compiles."""
  return max(MIN_LENGTH, 1 << (max(n, 1) - 1).bit_length())


def _pad_rows(rows: Sequence[np.ndarray], num_rows: int, length: int) -> np.ndarray:
  out = np.full((num_rows, length), PAD, np.int32)
  for i, row in enumerate(rows):
    out[i, :len(row)] = row
  return out


@functools.partial(jax.jit, static_argnames=("model",))
def _logprob_jit(model, params, inputs_BT, targets_BT, mask_BT):
  return sequence_logprob(model, params, inputs_BT, targets_BT, mask_BT)


def _gather_rows(adapters_K, index_B):
  """Row b's adapter: ``adapters_K`` (leading axis K) at ``index_B[b]``, for every leaf."""
  return jax.tree.map(lambda a_K: jnp.take(a_K, index_B, axis=0), adapters_K)


@dataclasses.dataclass(frozen=True)
class RowParams:
  """``model`` with per-row parameters, for the callers of ``model.apply`` (decoding, log-probs).

  ``apply({"params": {"base": tree, "rows": adapter_B}}, inputs, ...)`` runs row b under the
  base with row b's adapter (a parameter subset nested like the base, every leaf with a leading
  row axis) in place of the base's own leaves. The rows are vmapped with the base shared: a
  weight that is not adapted is one matmul over all rows, an adapted one a batched matmul.
  Every cache leaf has its batch axis first (each attention variant's layout does); ``aux``
  gets a leading row axis.
  """
  model: Transformer

  @property
  def cfg(self):
    return self.model.cfg

  def apply(self, variables, inputs, valid_BT=None, *, mode: str = "train", cache=None,
            pos_B=None, mutable=False):
    """``variables`` may hold the decoding constants (``layers.DECODE_CONSTS``) with a leading
    row axis, as ``mutable=[DECODE_CONSTS]`` returns them (each row's from its parameters)."""
    base, adapter_B = variables["params"]["base"], variables["params"]["rows"]
    consts_B = variables.get(DECODE_CONSTS)
    one = lambda tree: jax.tree.map(lambda x: x[None], tree)  # a row as a batch of one

    def row(adapter, consts, inputs, valid, cache, pos):
      row_vars = {"params": merge(base, adapter)}
      if consts is not None:
        row_vars[DECODE_CONSTS] = consts
      out = self.model.apply(row_vars, inputs[None], one(valid), mode=mode, cache=one(cache),
                             pos_B=one(pos), mutable=mutable)
      (logits_1TV, new_cache, aux), mutated = out if mutable else (out, None)
      result = logits_1TV[0], jax.tree.map(lambda x: x[0], new_cache), aux
      return (result, mutated) if mutable else result

    return jax.vmap(row)(adapter_B, consts_B, inputs, valid_BT, cache, pos_B)


class ModelFns:
  """Callables for :func:`onn_jax.evaluation.augscore.evaluate` backed by one model.

  ``batch_size`` rows per call at most; with ``max_batch_tokens`` > 0 a call at length L (the
  KV capacity, prompt plus answer budget, in generation; the sequence length in scoring) holds
  ``max(1, max_batch_tokens // L)`` rows when that is fewer. With a ``mesh``, every call's rows
  (tasks x views) are split over the mesh's ``data`` axis (all devices of all hosts) and the
  compiled programs run data-parallel; row counts are rounded to a multiple of the device
  count (up for ``batch_size``, down, but at least one per device, under the token budget).

  ``adapters``: per-task parameter subsets stacked on a leading axis (see
  :func:`onn_jax.ttt.stack`); then :meth:`generate` and :meth:`logprob` take ``groups``, the
  adapter index of every prompt or sequence, and each row runs under ``params`` merged with its
  adapter. ``shapes`` counts the calls per compiled shape. ``log`` hears one line per
  batch of programs compiled (by :meth:`prepare` or in the background).
  """

  def __init__(self, model: Transformer, params: Any, *, batch_size: int,
               max_batch_tokens: int = 0, temperature: float = 1.0, seed: int = 0,
               mesh: Mesh | None = None, adapters: Any = None, grid: bool = False,
               log: Callable[[str], None] | None = None):
    # auto's experts: dense outside teacher forcing; the rows vmapped: no sparse dispatch.
    self.model, self.mesh, self.log = outside_tf(model), mesh, log
    self.temperature, self.grid = temperature, grid
    self.rng = jax.random.PRNGKey(seed)
    self.calls = 0
    self.shapes: collections.Counter = collections.Counter()
    self.num_devices = 1 if mesh is None else mesh.devices.size
    self.batch_size = -(-batch_size // self.num_devices) * self.num_devices
    self.max_batch_tokens = max_batch_tokens
    self.params = self._put_shared(params)
    self.adapters_K = None if adapters is None else self._put_shared(adapters)
    self.row_model = RowParams(for_vmap(self.model))
    self._gather = jax.jit(_gather_rows, out_shardings=None if mesh is None else
                           NamedSharding(mesh, P(AXIS)))
    self._ready: dict[tuple, Any] = {}  # programs compiled ahead (prepare), by call shape
    self._background: list[tuple[list[tuple], Any]] = []  # (call shapes, future): compiling

  def _put_shared(self, tree):
    """A tree (identical on every process) -> device arrays, replicated over a mesh."""
    if self.mesh is None:
      return jax.device_put(tree)
    return jax.device_put(tree, NamedSharding(self.mesh, P()))

  def _put(self, rows: np.ndarray) -> jax.Array:
    """A host array (identical on every process) -> a device array split by rows."""
    if self.mesh is None:
      return jnp.asarray(rows)
    sharding = NamedSharding(self.mesh, P(AXIS))
    return jax.make_array_from_callback(rows.shape, sharding, lambda index: rows[index])

  def rows(self, length: int) -> int:
    """Rows of a call whose rows hold ``length`` tokens each (see the class doc)."""
    return rows_within(length, self.batch_size, self.max_batch_tokens, self.num_devices)

  def _calls(self, lengths: Sequence[int], tokens: Callable[[int], int]
             ) -> list[tuple[list[int], int, int]]:
    """(indices, padded length, rows) per call: longest first, each call as many rows as its
    padded length allows (``tokens(padded length)``: the tokens a row holds)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    calls, start = [], 0
    while start < len(order):
      length = _round_up(lengths[order[start]])
      rows = self.rows(tokens(length))
      calls.append((order[start:start + rows], length, rows))
      start += rows
    return calls

  def _model_params(self, indices: list[int], rows: int, groups: Sequence[int] | None):
    """(model, params) of one call: the plain model, or per-row adapters gathered by group."""
    if self.adapters_K is None:
      return self.model, self.params
    if groups is None:
      raise ValueError("this ModelFns holds per-task adapters: pass groups (one per row)")
    index_B = np.zeros(rows, np.int32)  # padding rows take adapter 0
    index_B[:len(indices)] = [groups[i] for i in indices]
    adapter_B = self._gather(self.adapters_K, self._put(index_B))
    return self.row_model, {"base": self.params, "rows": adapter_B}

  def _generate_args(self, model, params, prompt_BP, lens_B, budget: int, feed: str):
    """generate_jit's (arguments, static keywords) for one call; ``rng`` is set per call."""
    return ((model, params, prompt_BP, lens_B),
            dict(max_new=budget, capacity=prompt_BP.shape[1] + budget, feed=feed,
                 temperature=self.temperature, grid=self.grid))

  def prepare(self, kind: str, calls: list[tuple[list[int], int]], num_samples: int) -> None:
    """Compiles, all at once (:func:`onn_jax.parallel.compile_at_once`), every program that
    the :meth:`generate` (``kind`` "generate") or :meth:`logprob` ("logprob") calls announced
    here will run: ``calls`` is ``[(lengths, max_new)]``, one entry per call, as
    :func:`onn_jax.evaluation.augscore.evaluate` makes them. One after another, at each shape's
    first call, they took minutes of an arc1 evaluation on a GPU. Programs that
    :meth:`prepare_in_background` started are not compiled again: the first call that runs
    one waits for them."""
    self._collect()
    start = time.time()
    wanted = self._wanted(kind, calls, num_samples)
    lowered = [self._lower(key) for key in wanted]
    for key, program in zip(wanted, compile_at_once(lowered)):
      self._ready[key] = program
    if wanted and self.log is not None:
      self.log(f"evaluation: compiled {len(wanted)} {kind} programs at once in "
               f"{time.time() - start:.1f} s")

  def prepare_in_background(self, kind: str, calls: list[tuple[list[int], int]],
                            num_samples: int) -> None:
    """:meth:`prepare` on a worker thread (:func:`onn_jax.parallel.compile_in_background`),
    e.g. while TTT runs; the first :meth:`generate` or :meth:`logprob` call that runs one of
    its programs waits for it. ``augscore.generation_calls`` gives the calls an evaluation's
    generation makes, ``augscore.scoring_calls`` a cover of its scoring's."""
    self._collect()
    wanted = self._wanted(kind, calls, num_samples)
    if wanted:
      self._background.append((wanted, compile_in_background(
          f"evaluation {kind} programs", lambda: [self._lower(key) for key in wanted])))

  def _collect(self, needed: tuple | None = None) -> None:
    """Puts the programs compiled in the background to use: those done, and the batch holding
    the program ``needed`` (a call shape), waited for if need be."""
    for entry in list(self._background):
      keys, future = entry
      if needed in keys or future.done():
        tick = time.time()
        self._background.remove(entry)
        try:
          programs, seconds = future.result()
        except Exception as err:  # each compiles at its first call instead
          if self.log is not None:
            self.log(f"evaluation: the background compilation of {len(keys)} {keys[0][0]} "
                     f"programs failed ({type(err).__name__}: {err}); they compile when first "
                     "called")
          continue
        self._ready.update(zip(keys, programs))
        if self.log is not None:
          self.log(f"evaluation: compiled {len(keys)} {keys[0][0]} programs in the background "
                   f"in {seconds:.1f} s (waited {time.time() - tick:.1f} s)")

  def _wanted(self, kind: str, calls: list[tuple[list[int], int]], num_samples: int
              ) -> list[tuple]:
    """The call shapes (program keys) of ``calls`` that have no program yet."""
    wanted: list[tuple] = []
    pending = {key for keys, _ in self._background for key in keys}
    for lengths, max_new in calls:
      if kind == "generate":
        budget = _round_up(max_new)
        shapes = self._calls(lengths, lambda P, budget=budget: P + budget)
        feeds = ["argmax"] + ["sample"] * (num_samples > 0)
        keys = [("generate", rows, P, budget, feed) for _, P, rows in shapes for feed in feeds]
      elif kind == "logprob":
        keys = [("logprob", rows, L) for _, L, rows in self._calls(lengths, lambda L: L)]
      else:
        raise ValueError(f"ModelFns.prepare: kind {kind!r} is not 'generate' or 'logprob'")
      for key in keys:  # each shape once, though many calls (and one call's parts) share it
        if key not in self._ready and key not in pending and key not in wanted:
          wanted.append(key)
    return wanted

  def use_adapters(self, adapters: Any) -> None:
    """Replaces the per-task adapters (see the class doc; None: the plain model). Programs stay
    valid as long as adapters are used or not as before: a call's programs depend on the
    adapters' leaf shapes, not on how many tasks they hold. Otherwise they are dropped."""
    if (adapters is None) != (self.adapters_K is None):
      self._background.clear()  # compiled for the other model: their results are dropped
      self._ready.clear()
    self.adapters_K = None if adapters is None else self._put_shared(adapters)

  def _lower(self, key: tuple):
    """The lowered program of a call shape (see :meth:`prepare`), from shapes alone: nothing
    runs, so it may lower on a worker thread while the devices (of every host) do other
    work. Rows are split over the mesh as :meth:`_put` and the adapter gather split them."""
    rows, adapters = key[1], self.adapters_K
    sharding = None if self.mesh is None else NamedSharding(self.mesh, P(AXIS))

    def spec(shape, dtype):
      return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    model, params = self.model, self.params
    if adapters is not None:  # one adapter a row, as _model_params gathers them
      model, params = self.row_model, {"base": self.params, "rows": jax.tree.map(
          lambda x: spec((rows, *x.shape[1:]), x.dtype), adapters)}
    if key[0] == "generate":
      _, _, prompt_len, budget, feed = key
      args, static = self._generate_args(model, params, spec((rows, prompt_len), jnp.int32),
                                         spec((rows,), jnp.int32), budget, feed)
      return generate_jit.lower(*args, **static, rng=self.rng)
    tokens = spec((rows, key[2]), jnp.int32)
    return _logprob_jit.lower(model, params, tokens, tokens, spec((rows, key[2]), jnp.float32))

  def generate(self, prompts: list[np.ndarray], max_new: int, num_samples: int,
               groups: Sequence[int] | None = None) -> list[list[np.ndarray]]:
    """Per prompt: the greedy generation, then ``num_samples`` sampled ones (answer tokens)."""
    results: list[list[np.ndarray]] = [[] for _ in prompts]
    budget = _round_up(max_new)
    for indices, P, rows in self._calls([len(p) for p in prompts], lambda P: P + budget):
      prompt_BP = self._put(_pad_rows([prompts[i] for i in indices], rows, P))
      lens = np.full(rows, 1, np.int32)
      lens[:len(indices)] = [len(prompts[i]) for i in indices]
      model, params = self._model_params(indices, rows, groups)
      for sample in range(1 + num_samples):
        self.calls += 1
        self.shapes["generate", rows, P, budget] += 1
        feed = "argmax" if sample == 0 else "sample"
        args, static = self._generate_args(model, params, prompt_BP, self._put(lens), budget,
                                           feed)
        rng = jax.random.fold_in(self.rng, self.calls)
        key = ("generate", rows, P, budget, feed)
        self._collect(key)
        program = self._ready.get(key)
        out = (program(*args[1:], rng=rng) if program is not None
               else generate_jit(*args, **static, rng=rng))
        tokens_BA = host_value(out.tokens_BA)[:, :max_new]
        for r, i in enumerate(indices):
          results[i].append(tokens_BA[r])
    return results

  def logprob(self, sequences: list[np.ndarray], answer_starts: list[int],
              groups: Sequence[int] | None = None) -> np.ndarray:
    """Teacher-forced log-probability of each sequence's answer tokens: [N] float64."""
    totals = np.zeros(len(sequences), np.float64)
    for indices, L, rows in self._calls([len(s) for s in sequences], lambda L: L):
      tokens = _pad_rows([sequences[i] for i in indices], rows, L + 1)
      mask = np.zeros((rows, L), np.float32)
      for r, i in enumerate(indices):
        mask[r, answer_starts[i] - 1:len(sequences[i]) - 1] = 1.0  # target t+1: answer
      model, params = self._model_params(indices, rows, groups)
      self.shapes["logprob", rows, L] += 1
      args = (params, self._put(tokens[:, :-1]), self._put(tokens[:, 1:]), self._put(mask))
      self._collect(("logprob", rows, L))
      program = self._ready.get(("logprob", rows, L))
      lp = program(*args) if program is not None else _logprob_jit(model, *args)
      totals[indices] = host_value(lp).astype(np.float64)[:len(indices)]
    return totals
