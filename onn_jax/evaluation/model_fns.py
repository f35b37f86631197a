"""The model side of evaluation: batched ``generate_fn`` and ``logprob_fn`` for AugScore.

Batches are padded to a fixed number of rows and to bucketed lengths, so a whole evaluation
compiles a handful of programs however many tasks and views it covers.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from onn_jax.data.tokens import PAD
from onn_jax.decode import generate_jit, sequence_logprob
from onn_jax.model.transformer import Transformer
from onn_jax.parallel import AXIS, host_value

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


class ModelFns:
  """Callables for :func:`onn_jax.evaluation.augscore.evaluate` backed by one model.

  With a ``mesh``, every batch of prompts (tasks x views) is split by rows over the mesh's
  ``data`` axis (all devices of all hosts) and the compiled programs run data-parallel; the
  batch size is rounded up to a multiple of the device count.
  """

  def __init__(self, model: Transformer, params: Any, *, batch_size: int,
               temperature: float = 1.0, seed: int = 0, mesh: Mesh | None = None):
    self.model, self.mesh = model, mesh
    self.temperature = temperature
    self.rng = jax.random.PRNGKey(seed)
    self.calls = 0
    if mesh is None:
      self.batch_size, self.params = batch_size, params
    else:
      n = mesh.devices.size
      self.batch_size = -(-batch_size // n) * n
      self.params = jax.device_put(params, NamedSharding(mesh, P()))

  def _put(self, rows: np.ndarray) -> jax.Array:
    """A host array (identical on every process) -> a device array split by rows."""
    if self.mesh is None:
      return jnp.asarray(rows)
    sharding = NamedSharding(self.mesh, P(AXIS))
    return jax.make_array_from_callback(rows.shape, sharding, lambda index: rows[index])

  def generate(self, prompts: list[np.ndarray], max_new: int, num_samples: int
               ) -> list[list[np.ndarray]]:
    """Per prompt: the greedy generation, then ``num_samples`` sampled ones (answer tokens)."""
    results: list[list[np.ndarray]] = [[] for _ in prompts]
    for start in range(0, len(prompts), self.batch_size):
      chunk = prompts[start:start + self.batch_size]
      P = _round_up(max(len(p) for p in chunk))
      budget = _round_up(max_new)
      prompt_BP = self._put(_pad_rows(chunk, self.batch_size, P))
      lens = np.full(self.batch_size, 1, np.int32)
      lens[:len(chunk)] = [len(p) for p in chunk]
      for sample in range(1 + num_samples):
        self.calls += 1
        out = generate_jit(
            self.model, self.params, prompt_BP, self._put(lens), max_new=budget,
            capacity=P + budget, feed="argmax" if sample == 0 else "sample",
            temperature=self.temperature, rng=jax.random.fold_in(self.rng, self.calls))
        tokens_BA = host_value(out.tokens_BA)[:, :max_new]
        for i in range(len(chunk)):
          results[start + i].append(tokens_BA[i])
    return results

  def logprob(self, sequences: list[np.ndarray], answer_starts: list[int]) -> np.ndarray:
    """Teacher-forced log-probability of each sequence's answer tokens: [N] float64."""
    totals = []
    for start in range(0, len(sequences), self.batch_size):
      chunk = sequences[start:start + self.batch_size]
      L = _round_up(max(len(s) for s in chunk))
      tokens = _pad_rows(chunk, self.batch_size, L + 1)
      mask = np.zeros((self.batch_size, L), np.float32)
      for i, (seq, a) in enumerate(zip(chunk, answer_starts[start:start + len(chunk)])):
        mask[i, a - 1:len(seq) - 1] = 1.0  # target t+1 is answer token when t >= a - 1
      lp = _logprob_jit(self.model, self.params, self._put(tokens[:, :-1]),
                        self._put(tokens[:, 1:]), self._put(mask))
      totals.append(host_value(lp).astype(np.float64)[:len(chunk)])
    return np.concatenate(totals)
