"""Packed rows (data.pack): several sequences per row, each computed as if alone in its row."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_config
from onn_jax import steps
from onn_jax.data.pipeline import (BatchStream, build_training_tasks, collate, collate_packed,
                                   packed_need)
from onn_jax.model import attention, nsa
from onn_jax.model.transformer import Transformer, init_params
from test_nsa_core import Geo, make_inputs, segment_start_of

# Float32 throughout. A packed sequence and the same sequence alone differ only in how many
# exactly-zero (masked) terms their sums hold and in the order XLA adds them, so outputs agree
# to a few float32 ulps of values of order 1-10 (the logits): 1e-5 covers a reduction of a few
# hundred terms (~sqrt(n) * 2**-24 relative) with margin.
ATOL = 1e-5


def _segments(lengths, align):
  """Starts of sequences laid out at multiples of ``align``, and the row length."""
  starts, at = [], 0
  for n in lengths:
    starts.append(at)
    at += packed_need(n + 1, align)
  return starts, at


GEO = Geo(B=1, T=0, S=0, H=4, G=2, D=8, block_len=8, block_stride=4, select_len=16,
          num_select=4, window=20)


def _compress_mean(x_BSGD, S, geo):
  """A stand-in compressor (block means): packing must not change which keys a block sees."""
  n = nsa.num_compressed_blocks(S, geo.block_len, geo.block_stride)
  idx = np.arange(n)[:, None] * geo.block_stride + np.arange(geo.block_len)
  return x_BSGD[:, idx].mean(axis=2)


@pytest.mark.parametrize("impl", ["reference", "blockwise", "pallas"])
def test_nsa_core_packed_row_is_each_sequence_alone(impl):
  lengths = [37, 80, 50]  # not multiples of any block size
  align = nsa.pack_alignment(GEO.block_stride, GEO.select_len)
  starts, T = _segments(lengths, align)
  geo = dataclasses.replace(GEO, T=T, S=T)
  args = make_inputs(geo, seed=0)
  raw_k, raw_v = args["k_slc"] * 0.5, args["v_win"] * 0.5
  static = geo.static()

  # Jitted: op by op, every small op would compile on its own (and outside the persistent
  # compilation cache), for each of the four shapes.
  @functools.partial(jax.jit, static_argnums=3)
  def core(a, k_raw, v_raw, S, segment_start=None):
    return nsa.nsa_core(a["q"], _compress_mean(k_raw, S, geo), _compress_mean(v_raw, S, geo),
                        a["k_slc"], a["v_slc"], a["k_win"], a["v_win"], a["gates"],
                        impl=impl, segment_start=segment_start, **static)

  packed = core(args, raw_k, raw_v, T, segment_start_of(starts, 1, T))
  for s0, n in zip(starts, lengths):
    part = {k: v[:, s0:s0 + n] for k, v in args.items() if k not in ("k_cmp", "v_cmp")}
    alone = core(part, raw_k[:, s0:s0 + n], raw_v[:, s0:s0 + n], n)
    np.testing.assert_allclose(packed[:, s0:s0 + n], alone, atol=ATOL, rtol=0)


def test_nsa_core_packed_row_sees_nothing_of_earlier_sequences():
  lengths = [40, 60]
  align = nsa.pack_alignment(GEO.block_stride, GEO.select_len)
  starts, T = _segments(lengths, align)
  geo = dataclasses.replace(GEO, T=T, S=T)
  args = make_inputs(geo, seed=1)
  seg = segment_start_of(starts, 1, T)
  out = nsa.nsa_core(**args, **geo.static(), impl="blockwise", segment_start=seg)
  changed = {k: (v.at[:, :starts[1]].set(7.0) if k not in ("k_cmp", "v_cmp") else v)
             for k, v in args.items()}
  # Compressed blocks starting in the first sequence change too.
  first_block = starts[1] // geo.block_stride
  for k in ("k_cmp", "v_cmp"):
    changed[k] = args[k].at[:, :first_block].set(-3.0)
  out2 = nsa.nsa_core(**changed, **geo.static(), impl="blockwise", segment_start=seg)
  np.testing.assert_array_equal(out[:, starts[1]:], out2[:, starts[1]:])


@pytest.mark.parametrize("variant,cmp_rope", [("nsa", "none"), ("nsa", "both"),
                                              ("nsa", "query"), ("full", "none"),
                                              ("dynsmlora", "none")])
def test_model_packed_row_gives_each_sequence_its_own_logits(variant, cmp_rope):
  cfg = dataclasses.replace(tiny_config().model, attention=variant, cmp_rope=cmp_rope,
                            nsa_impl="reference", select_len=16)
  params = init_params(cfg, jax.random.PRNGKey(0))
  lengths = [29, 70, 41]
  starts, T = _segments(lengths, attention.pack_alignment(cfg))
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 12, size=(1, T)), jnp.int32)
  apply = jax.jit(Transformer(cfg).apply)  # one program per shape, not one per op
  packed, _, _ = apply({"params": params}, tokens,
                       segment_start_BT=segment_start_of(starts, 1, T))
  for s0, n in zip(starts, lengths):
    alone, _, _ = apply({"params": params}, tokens[:, s0:s0 + n])
    np.testing.assert_allclose(packed[:, s0:s0 + n], alone, atol=ATOL, rtol=0)


def test_packed_segment_start_outside_training_is_an_error():
  cfg = tiny_config().model
  params = init_params(cfg, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="packed rows"):
    Transformer(cfg).apply({"params": params}, jnp.zeros((1, 16), jnp.int32), mode="prefill",
                           cache=[{}] * cfg.num_layers,
                           segment_start_BT=jnp.zeros((1, 16), jnp.int32))


# -- data ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def packing():
  cfg = tiny_config(data=dict(pack=True))
  tasks, _ = build_training_tasks(cfg.data, log=lambda *_: None)
  align = attention.pack_alignment(cfg.model)
  return cfg, BatchStream(tasks, cfg.data, cfg.train.batch_size, 0, pack_align=align), align


def test_packed_batch_lays_out_whole_sequences_at_aligned_starts(packing):
  cfg, stream, align = packing
  rows = stream.pack_rows(5)
  batch = stream.packed_batch(5)
  T = cfg.data.buckets[-1]
  assert batch["inputs"].shape == (cfg.train.batch_size, T)
  for b, examples in enumerate(rows):
    assert len(examples) >= 1
    at = 0
    for ex in examples:
      n = len(ex.tokens) - 1
      assert at % align == 0
      np.testing.assert_array_equal(batch["inputs"][b, at:at + n], ex.tokens[:-1])
      np.testing.assert_array_equal(batch["targets"][b, at:at + n], ex.tokens[1:])
      assert np.all(batch["segment_start"][b, at:at + n] == at)
      one = collate([ex], n)  # the same sequence alone: same loss and answer masks
      np.testing.assert_array_equal(batch["loss_mask"][b, at:at + n], one["loss_mask"][0])
      np.testing.assert_array_equal(batch["answer_mask"][b, at:at + n],
                                    np.asarray(steps.answer_mask(one))[0])
      at += packed_need(len(ex.tokens), align)
    assert batch["valid"][b].sum() == sum(len(ex.tokens) - 1 for ex in examples)


def test_packed_batches_are_deterministic_and_split_over_processes(packing):
  cfg, stream, align = packing
  tasks = stream.items and [t for t, _ in stream.items]
  whole = stream.packed_batch(3)
  again = BatchStream(build_training_tasks(cfg.data, log=lambda *_: None)[0], cfg.data,
                      cfg.train.batch_size, 0, pack_align=align).packed_batch(3)
  for key in whole:
    np.testing.assert_array_equal(whole[key], again[key])
  assert tasks
  half = cfg.train.batch_size // 2
  parts = [BatchStream(build_training_tasks(cfg.data, log=lambda *_: None)[0], cfg.data,
                       cfg.train.batch_size, 0, pack_align=align, process_index=i,
                       process_count=2).packed_batch(3) for i in range(2)]
  for key in whole:
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
  assert parts[0]["inputs"].shape[0] == half


def test_packing_fills_rows(packing):
  cfg, stream, _ = packing
  real = np.mean([stream.packed_batch(s)["valid"].mean() for s in range(4)])
  unpacked = np.mean([stream.batch(s)["valid"].mean() for s in range(4)])
  # Deterministic data: sequences of ~140 tokens in rows of 256 (one a row when unpacked: 68%
  # real) pack to 89% real.
  assert real > unpacked + 0.15


@pytest.mark.parametrize("misses", [0.0, 1.0])
def test_packing_trains_what_it_draws_unless_told_to_pass_over(packing, monkeypatch, misses):
  """data.pack_misses=0: every drawn sequence trains but the one that closes the batch, so
  sequences train as often as they are drawn (uniformly), whatever their length."""
  cfg, stream, align = packing
  stream = BatchStream(build_training_tasks(cfg.data, log=lambda *_: None)[0],
                       dataclasses.replace(cfg.data, pack_misses=misses), cfg.train.batch_size,
                       0, pack_align=align)
  drawn = []
  real_example = BatchStream._example

  def record(self, *args):
    example = real_example(self, *args)
    drawn.append(example)
    return example

  monkeypatch.setattr(BatchStream, "_example", record)
  for step in range(3):
    drawn.clear()
    trained = [ex for row in stream.pack_rows(step) for ex in row]
    passed_over = len(drawn) - len(trained)
    assert passed_over <= int(misses * cfg.train.batch_size) + 1
    if misses == 0:
      kept = {id(ex) for ex in trained}
      assert all(id(ex) in kept for ex in drawn[:-1])


def test_passing_over_keeps_long_and_short_sequences_trained_equally_often(packing):
  """data.pack_misses > 0 passes over candidates that fit no row, more often long ones; the
  stream draws long items more often to make up for it. Over 500 packed batches (~6500
  sequences, ~3200 on each side of the median length) the long/short ratio of training counts
  has a sampling spread of ~2.5%; drawn uniformly it is ~0.83 (as the second half checks), so
  0.92-1.08 (3 spreads) tells the two apart."""
  cfg, _, align = packing
  stream = BatchStream(build_training_tasks(cfg.data, log=lambda *_: None)[0],
                       dataclasses.replace(cfg.data, pack_misses=1.0), cfg.train.batch_size,
                       0, pack_align=align)
  index = {(task.id, i): k for k, (task, i) in enumerate(stream.items)}
  tokens = np.asarray(stream.item_tokens)[stream.pack_items]
  long = tokens > np.median(tokens)

  def long_over_short() -> float:
    trained = np.zeros(len(stream.items))
    for step in range(500):
      for row in stream.pack_rows(step):
        for ex in row:
          trained[index[ex.task_id, ex.test_index]] += 1
    counts = trained[stream.pack_items]
    return counts[long].mean() / counts[~long].mean()

  assert 0.92 < long_over_short() < 1.08
  stream._fill_cdf = None  # uniform draws
  assert long_over_short() < 0.92


def test_passing_over_with_filled_long_rows_of_one_row_each():
  """data.pack_fill with data.pack_misses: the draw weights come from simulated batches of
  every step kind, here long rows (256, one a batch) whose own sequence can leave no room at
  all; the stream still builds, and its batches hold whole sequences."""
  cfg = tiny_config(data=dict(pack=True, pack_len=128, pack_fill=True, pack_misses=1.0,
                              max_batch_tokens=256))
  align = attention.pack_alignment(cfg.model)
  stream = BatchStream(build_training_tasks(cfg.data, log=lambda *_: None)[0], cfg.data,
                       cfg.train.batch_size, 0, pack_align=align)
  assert stream.rows == [2, 1] and len(stream.kind_probs) == 2 and stream._fill_cdf is not None
  for step in range(6):
    kind = stream._packed_kind(step)
    length = stream.buckets[kind]
    for row in stream.pack_rows(step, kind):
      assert sum(packed_need(len(ex.tokens), align) for ex in row) <= length


def test_collate_packed_rejects_an_overfull_row(packing):
  _, stream, align = packing
  ex = stream.pack_rows(0)[0][0]
  with pytest.raises(ValueError, match="do not fit row 0"):
    collate_packed([[ex, ex]], len(ex.tokens) - 1, align)


def test_packed_step_equals_the_unpacked_step_on_the_same_sequences(packing):
  """The teacher-forcing step on packed rows is the step on the same sequences one per row:
  loss, metrics (exact match per sequence) and gradients."""
  cfg, stream, align = packing
  rows = [row for row in stream.pack_rows(1) if len(row) > 1][:2]
  assert len(rows) == 2
  T = cfg.data.buckets[-1]
  unpacked = collate([ex for row in rows for ex in row], T)
  packed = collate_packed(rows, T, align)
  model = Transformer(cfg.model)
  state = steps.init_state(cfg, model, jax.random.PRNGKey(0))

  # The state passed in, as run.train does: closed over (a constant of the program), XLA:CPU at
  # jax 0.10.2 gave the one-layer model's unpacked step a wrong gradient norm in some processes
  # (docs/bench/xla_cpu_closed_over_state_grad_norm.py).
  def step(state, batch):
    new, metrics = steps.train_step(state, batch, model=model, cfg=cfg)
    # After one step Adam's first moment is (1 - b1) * the clipped gradient.
    return optax.tree_utils.tree_get(new.opt_state, "mu"), metrics

  mu_un, m_un = jax.jit(step)(state, unpacked)
  mu_pk, m_pk = jax.jit(step)(state, packed)
  for key in ("loss", "loss_ce", "ce", "answer_acc", "answer_exact", "sdl", "target_tokens",
              "experts_per_token", "grad_norm"):
    np.testing.assert_allclose(m_pk[key], m_un[key], rtol=1e-5, atol=1e-6, err_msg=key)
  # Gradients: float32 sums of the same ~10^3 per-token terms in another order, so entries
  # differ by ~sqrt(10^3) * 2**-24 ~ 2e-6 of the terms' size, bounded by the largest gradient
  # entry (an entry that cancels to ~0, e.g. a softmax-invariant bias, keeps that absolute
  # error): 1e-4 of it. A sequence seeing another one would change entries by O(1) of it.
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(mu_un))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4 * scale, rtol=0),
               mu_pk, mu_un)
