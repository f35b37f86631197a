"""EAVI: nothing flows through the rollout, argmax feed is greedy decoding, one compile."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onn_jax import config, decode, objectives, steps
from onn_jax.data.pipeline import BatchStream, build_training_tasks
from onn_jax.data.tokens import END, PAD, VOCAB_SIZE
from onn_jax.model.transformer import Transformer, init_cache

from conftest import tiny_config


@pytest.fixture(scope="module")
def setup():
  return _setup()


@pytest.fixture(scope="module")
def setup_two_layers():
  """``setup``'s model with two layers: at one layer (session 44) the untrained model's argmax
  rollout reached every row's fixed point within three passes."""
  return _setup(num_layers=2)


def _setup(**model):
  cfg = tiny_config(data={"buckets": [128], "max_grid": 4, "max_train_tasks": 10},
                    eavi={"feed": "soft"}, model=model)
  tasks, _ = build_training_tasks(cfg.data, log=lambda *_: None)
  stream = BatchStream(tasks, cfg.data, 4, 0)
  model = Transformer(cfg.model)
  state = steps.init_state(cfg, model, jax.random.PRNGKey(0))
  return cfg, model, state, jax.tree.map(jnp.asarray, stream.batch(0))


def test_gradient_ignores_the_rollout(setup):
  """d/dparams of the EAVI loss == the alignment gradient with the excursion held constant."""
  cfg, model, state, batch = setup
  rng = jax.random.PRNGKey(3)

  def eavi_loss(params):
    gen = steps.excursion(model, params, batch, cfg, rng)
    return steps.alignment_loss(params, batch, gen.fed_BAV, model=model, cfg=cfg)[0]

  # Jitted: op by op the prefill would compile every small op on its own.
  gen = jax.jit(lambda p: steps.excursion(model, p, batch, cfg, rng))(state.params)
  constant_exc = steps.excursion_inputs(batch, gen.fed_BAV)
  grad_through = jax.jit(jax.grad(eavi_loss))(state.params)
  grad_constant = jax.jit(jax.grad(lambda p: steps.alignment_loss(
      p, batch, gen.fed_BAV, model=model, cfg=cfg)[0]))(state.params)
  for a, b in zip(jax.tree.leaves(grad_through), jax.tree.leaves(grad_constant)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grad_constant))
  # The soft excursion is the model's own distributions: the inputs do differ from teacher
  # forcing at answer positions, and equal it on the prompt.
  onehot = jax.nn.one_hot(batch["inputs"], constant_exc.shape[-1])
  prompt = jnp.arange(batch["inputs"].shape[1])[None] < batch["answer_start"][:, None]
  np.testing.assert_array_equal(np.asarray(constant_exc)[np.asarray(prompt)],
                                np.asarray(onehot)[np.asarray(prompt)])
  assert not np.allclose(np.asarray(constant_exc), np.asarray(onehot))


def test_argmax_excursion_is_greedy_decoding(setup):
  cfg, model, state, batch = setup
  cfg_argmax = steps.Config(**{**cfg.__dict__, "eavi": cfg.eavi.__class__(feed="argmax")})
  gen = jax.jit(lambda p, b: steps.excursion(model, p, b, cfg_argmax, jax.random.PRNGKey(0)))(
      state.params, batch)
  T = batch["inputs"].shape[1]
  # Full forward passes without a cache; causal, so right padding does not matter.
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
  for b in range(2):
    seq = list(np.asarray(batch["inputs"][b, :int(batch["answer_start"][b])]))
    need = int(batch["answer_len"][b])
    assert (np.asarray(gen.tokens_BA[b, need:]) == PAD).all()  # nothing past the answer
    for k in range(min(6, need)):
      padded = np.full((1, T), PAD, np.int32)
      padded[0, :len(seq)] = seq
      logits = forward(state.params, jnp.asarray(padded))[0, len(seq) - 1]
      want = int(jnp.argmax(logits))
      assert int(gen.tokens_BA[b, k]) == want
      if want == END:
        assert (np.asarray(gen.tokens_BA[b, k + 1:]) == PAD).all()
        break
      seq.append(want)


def test_eavi_step_compiles_once_and_learns_on_a_fixed_batch(setup):
  cfg, model, state, batch = setup
  step = jax.jit(functools.partial(steps.eavi_step, model=model, cfg=cfg))
  other = jax.tree.map(lambda x: x, batch)
  other["inputs"] = jnp.where(batch["inputs"] < 10, (batch["inputs"] + 1) % 10, batch["inputs"])
  losses = []
  for i in range(6):
    state, metrics = step(state, batch if i % 2 == 0 or i > 1 else other)
    losses.append(float(metrics["exc_ce"]))
    assert np.isfinite(losses[-1]) and 0.0 <= float(metrics["free_exact"]) <= 1.0
  assert step._cache_size() == 1
  assert losses[-1] < losses[2]  # alignment on its own rollouts lowers the excursion CE


def test_excursion_after_an_early_end_is_not_scored(setup):
  """A rollout that stops early is scored up to and including its END decision, no further;
  the objective stays normalised by the answer tokens."""
  cfg, model, state, batch = setup
  B = batch["inputs"].shape[0]
  A = steps.answer_budget(batch, cfg)
  answer_len = np.asarray(batch["answer_len"])
  assert (answer_len >= 3).all()
  tokens_BA = np.ones((B, A), np.int32)  # colour 1 everywhere: never END
  tokens_BA[0, 1] = END  # row 0 stops after its second token
  tokens_BA[0, 2:] = PAD
  mask_BT = np.asarray(steps.excursion_mask(batch, jnp.asarray(tokens_BA)))
  full_BT = np.asarray(steps.answer_mask(batch))
  start = int(batch["answer_start"][0])
  kept = np.flatnonzero(mask_BT[0])
  # Answer tokens 0 and 1 (the END decision) are predicted at answer_start - 1 and answer_start.
  np.testing.assert_array_equal(kept, [start - 1, start])
  np.testing.assert_array_equal(mask_BT[1:], full_BT[1:])

  # The loss uses exactly that mask: its excursion CE equals a hand-computed masked sum.
  fed_BAV = jax.nn.one_hot(jnp.asarray(tokens_BA), VOCAB_SIZE)
  exc_BTV = steps.excursion_inputs(batch, fed_BAV)
  loss, (stats_exc, stats_tf, _, aux) = steps.alignment_loss(
      state.params, batch, fed_BAV, jnp.asarray(mask_BT), model=model, cfg=cfg)
  logits_BTV = model.apply({"params": state.params}, exc_BTV, batch["valid"])[0]
  ce_BT = np.asarray(objectives.token_cross_entropy(logits_BTV, batch["targets"]))
  # float32 sums of a few hundred terms of size ~3: relative rounding well under 1e-5.
  np.testing.assert_allclose(float(stats_exc["ce_sum"]), (ce_BT * mask_BT).sum(), rtol=1e-5)
  assert float(stats_exc["tokens"]) == mask_BT.sum()
  want = (cfg.eavi.excursion_weight * float(stats_exc["ce_sum"]) + cfg.eavi.tf_weight
          * float(stats_tf["ce_sum"])) / float(stats_tf["tokens"])
  sdl_local = float(objectives.sdl(aux, cfg.model)[0])
  np.testing.assert_allclose(float(loss), want + sdl_local, rtol=1e-6)


@pytest.mark.parametrize("attention", ["nsa", "full", "dynsmlora"])
def test_branch_alignment_equals_two_rows(setup, attention):
  """The alignment pass with the excursion as a branch of the teacher-forced sequence (prompt
  computed once) gives the two-row pass's CE terms and, without SDL (whose statistics cover the
  tokens computed), its gradients."""
  cfg, _, _, batch = setup
  cfg = config.replace(cfg, model={"attention": attention, "sdl_diversity_weight": 0.0,
                                   "sdl_sparsity_weight": 0.0})
  model = Transformer(cfg.model)
  state = steps.init_state(cfg, model, jax.random.PRNGKey(1))
  gen = steps.excursion(model, state.params, batch, cfg, jax.random.PRNGKey(2))
  mask_BT = steps.excursion_mask(batch, gen.tokens_BA)

  def run(fn):
    return jax.jit(jax.value_and_grad(lambda p: fn(p, batch, gen.fed_BAV, mask_BT, model=model,
                                                   cfg=cfg), has_aux=True))(state.params)

  (loss, (exc, tf, _, _)), grads = run(steps.alignment_loss)
  (loss_ref, (exc_ref, tf_ref, _, _)), grads_ref = run(steps.alignment_loss_rows)
  # float32: the same per-token terms, summed over a few hundred tokens in another order.
  for key in ("ce_sum", "tokens", "correct", "exact", "examples"):
    np.testing.assert_allclose(exc[key], exc_ref[key], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(tf[key], tf_ref[key], rtol=1e-5, err_msg=key)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  # Gradients: entries differ by float32 rounding of sums of ~10^3 terms, relative to the
  # largest entry (entries near 0 keep that absolute error): 1e-4 of it.
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_ref))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4 * scale, rtol=0),
               grads, grads_ref)


@pytest.mark.parametrize("feed, continuation", [
    ("argmax", "branch"), ("sample", "branch"), ("soft", "branch"), ("soft", "rows")])
def test_parallel_rollout_reaches_the_sequential_one(setup_two_layers, feed, continuation):
  """eavi.rollout=parallel: with enough passes the excursion is generate's, token for token
  (same choices, keys and stops; a row that needs no token emits none in both), and fed back
  alike; after i passes the first i tokens are, and so is every row said to be exact; passes
  against the prompt's cache (branch) and over whole rows alike."""
  cfg, model, state, batch = setup_two_layers
  cfg = config.replace(cfg, eavi={"feed": feed, "continuation": continuation})
  batch = {**batch, "answer_len": batch["answer_len"].at[1].set(0)}
  need = int(np.max(batch["answer_len"]))
  par = lambda passes: config.replace(cfg, eavi={"rollout": "parallel", "passes": passes})
  run = lambda c: jax.jit(lambda p: steps.excursion(model, p, batch, c, jax.random.PRNGKey(5)))(
      state.params)
  seq, full = run(cfg), run(par(need + 5))
  assert bool(np.all(full.exact_B)) and 1 <= int(full.passes) <= need
  assert (np.asarray(seq.tokens_BA[1]) == PAD).all()  # the row that needs no token
  np.testing.assert_array_equal(full.tokens_BA, seq.tokens_BA)
  # float32 logits of one model through its cached one-token path and through "extend" or a
  # whole row: the same terms summed in another order, a few ulps of O(10) per op
  # (test_attention's bound).
  np.testing.assert_allclose(full.fed_BAV, seq.fed_BAV, rtol=0, atol=2e-5)
  np.testing.assert_allclose(full.logprobs_BA, seq.logprobs_BA, rtol=0, atol=2e-5)
  for passes in (1, 3):
    few = run(par(passes))
    assert int(few.passes) == passes  # an untrained model's rollout is far from the truth
    np.testing.assert_array_equal(few.tokens_BA[:, :passes], seq.tokens_BA[:, :passes])
    exact = np.asarray(few.exact_B)
    np.testing.assert_array_equal(np.asarray(few.tokens_BA)[exact],
                                  np.asarray(seq.tokens_BA)[exact])
    assert exact[1] and not exact.all()  # the empty row is; not every row is yet


def test_eavi_step_with_the_parallel_rollout(setup):
  """The EAVI step with eavi.rollout=parallel (argmax feed): the sequential step's loss terms
  when its rollout reaches the fixed point; it reports the passes that ran. (Its gradient:
  test_alignment_gives_the_rollout_its_first_pass, against the same rollout followed by the
  one-call alignment that the sequential step runs.)"""
  cfg, model, state, batch = setup
  cfg = config.replace(cfg, eavi={"feed": "argmax"})
  need = int(np.max(batch["answer_len"]))
  par = config.replace(cfg, eavi={"rollout": "parallel", "passes": need})
  run = lambda c: jax.jit(functools.partial(steps.eavi_step, model=model, cfg=c))(state, batch)
  (s_seq, m_seq), (s_par, m_par) = run(cfg), run(par)
  assert 1 <= float(m_par["rollout_passes"]) <= need
  assert "rollout_passes" not in m_seq
  # The same excursion tokens (argmax feed: one-hot, exactly equal), so the same float32 loss
  # terms, summed over ~100 answer tokens in another grouping (the parallel step's alignment
  # runs as two calls, the sequential one's as one): a few ulps, well within 1e-5.
  np.testing.assert_array_equal(m_par["free_exact"], m_seq["free_exact"])
  np.testing.assert_array_equal(m_par["free_token_acc"], m_seq["free_token_acc"])
  for key in ("loss", "exc_ce", "ce"):
    np.testing.assert_allclose(m_par[key], m_seq[key], rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("rollout", ["sequential", "parallel"])
def test_the_batchs_answer_budget_sets_the_excursion_and_changes_no_answer_term(setup, rollout):
  """EAVI's static answer budget is the width of the batch's ``answer_tokens`` (the longest
  answer of its bucket), else the longest answer data.max_grid allows: a batch as wide as its
  longest answer gets the same rollout over every answer and the same loss terms (the tokens
  past an answer are neither scored nor seen by an answer token), from a shorter excursion."""
  cfg, model, state, batch = setup
  cfg = config.replace(cfg, eavi={"feed": "argmax", "rollout": rollout, "passes": 2})
  need = int(np.max(batch["answer_len"]))
  wide = {k: v for k, v in batch.items() if k != "answer_tokens"}
  tight = dict(batch, answer_tokens=batch["answer_tokens"][:, :need])
  assert steps.answer_budget(wide, cfg) == 21 and steps.answer_budget(tight, cfg) == need < 21
  rng = jax.random.PRNGKey(5)
  gens = [jax.jit(lambda p, b: steps.excursion(model, p, b, cfg, rng))(state.params, b)
          for b in (wide, tight)]
  assert [g.tokens_BA.shape[1] for g in gens] == [21, need]
  np.testing.assert_array_equal(gens[0].tokens_BA[:, :need], gens[1].tokens_BA)
  run = lambda b: jax.jit(functools.partial(steps.eavi_step, model=model, cfg=cfg))(state, b)
  (_, m_wide), (_, m_tight) = run(wide), run(tight)
  # The same answer tokens' float32 terms; the excursion's logits come from calls over fewer
  # continuation tokens (other shapes, other reduction order): a few ulps of ~100 summed terms.
  for key in ("exc_ce", "ce", "free_exact", "free_token_acc", "exc_scored_frac"):
    np.testing.assert_allclose(m_tight[key], m_wide[key], rtol=1e-5, err_msg=key)


def test_a_budget_shorter_than_an_answer_rolls_out_its_start_and_teacher_forces_the_rest(
    setup_two_layers):
  """eavi.budget_quantile < 1: a batch's answer_tokens may be narrower than some answers. The
  excursion then covers their first A tokens, and only the teacher-forcing term scores the
  rest (the branch and rows alignments alike); such a row never counts as an exact
  free-running answer, even when its first A tokens are right."""
  cfg, model, state, batch = setup_two_layers
  cfg = config.replace(cfg, eavi={"feed": "argmax"})
  lens = np.asarray(batch["answer_len"])
  A = int(np.min(lens))
  assert A < lens.max()  # some rows are cut, some fit
  cut = dict(batch, answer_tokens=batch["answer_tokens"][:, :A])
  truth_BA = steps.answer_targets(cut, A)
  scores = steps.score_rollout(truth_BA, cut)
  np.testing.assert_array_equal(scores["exact_B"], lens <= A)
  np.testing.assert_array_equal(scores["correct_B"], np.minimum(lens, A))
  # The excursion's positions: answer tokens k < min(answer_len, A); with an END at index 1
  # in row 0's rollout, k <= 1 there.
  k_BT = np.asarray(steps.answer_index(cut))
  span_BT = (k_BT >= 0) & (k_BT < np.minimum(lens, A)[:, None])
  np.testing.assert_array_equal(steps.excursion_span(cut, A), span_BT)
  no_end_BA = jnp.where(truth_BA == END, 0, truth_BA)
  np.testing.assert_array_equal(steps.excursion_mask(cut, no_end_BA), span_BT)
  early_BA = no_end_BA.at[0, 1].set(END)
  np.testing.assert_array_equal(steps.excursion_mask(cut, early_BA),
                                span_BT & ((np.arange(len(lens)) != 0)[:, None] | (k_BT <= 1)))
  # The branch alignment and the rows alignment score the same terms on the cut batch.
  gen = jax.jit(lambda p: steps.excursion(model, p, cut, cfg, jax.random.PRNGKey(2)))(
      state.params)
  assert gen.tokens_BA.shape == (lens.shape[0], A)
  mask_BT = steps.excursion_mask(cut, gen.tokens_BA)
  terms = [jax.jit(lambda p, fn=fn: fn(p, cut, gen.fed_BAV, mask_BT, model=model, cfg=cfg))(
      state.params) for fn in (steps.alignment_loss, steps.alignment_loss_rows)]
  (loss, (exc, tf, _, aux)), (loss_rows, (exc_rows, tf_rows, _, aux_rows)) = terms
  assert float(exc["tokens"]) == float(jnp.sum(mask_BT)) < float(tf["tokens"])
  # float32: the same per-token terms, summed in another order (as in the test above).
  for key in ("ce_sum", "tokens", "correct"):
    np.testing.assert_allclose(exc[key], exc_rows[key], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(tf[key], tf_rows[key], rtol=1e-5, err_msg=key)
  # The losses less their SDL, whose sparsity counts the prompt once in a branch and twice as
  # rows (it differs by design: test_continuation_choice): the same CE terms, float32 sums of a
  # few hundred O(1) terms in another order (sqrt(n) * 2^-24 ~ 2e-6 relative).
  ce = float(loss - objectives.sdl(aux, cfg.model)[0])
  ce_rows = float(loss_rows - objectives.sdl(aux_rows, cfg.model)[0])
  np.testing.assert_allclose(ce, ce_rows, rtol=1e-5)
  # Routed tokens: an excursion token counts where the row holds a token at its position, as
  # rows count it (the branch counted its padding past shorter answers too).
  valid = np.asarray(cut["valid"], bool)
  pos = np.asarray(cut["answer_start"])[:, None] + np.arange(A)[None]
  held = np.take_along_axis(valid, np.minimum(pos, valid.shape[1] - 1), axis=1) & (
      pos < valid.shape[1])
  assert held.sum() < pos.size  # (padding in the branch: the case this checks)
  np.testing.assert_array_equal(aux["num_tokens"], valid.sum() + held.sum())
  np.testing.assert_array_equal(aux_rows["num_tokens"], 2 * valid.sum())
  _, metrics = jax.jit(functools.partial(steps.eavi_step, model=model, cfg=cfg))(state, cut)
  assert np.isfinite(float(metrics["loss"]))
  assert float(metrics["free_exact"]) <= np.mean(lens <= A)


@pytest.mark.parametrize("rollout, continuation", [
    ("parallel", "rows"), ("parallel", "branch"), ("sequential", "branch")])
@pytest.mark.parametrize("feed", ["argmax", "soft", "sample"])
def test_alignment_gives_the_rollout_its_first_pass(setup, feed, rollout, continuation,
                                                    monkeypatch):
  """The rollout after the alignment's teacher forcing: its logits are the parallel rollout's
  first pass, so it runs one pass fewer (rows: the teacher-forced rows; branch: the
  teacher-forced sequence in prefill mode, whose KV cache the other passes and the excursion
  then extend: no prefill of their own); the sequential rollout's one-token steps extend that
  cache too, from its logits for answer token 0 (no prefill either). The rollout, the
  gradient, the loss terms and the routing statistics are those of the rollout with its own
  prefill followed by alignment_loss_rows (one call over the 2B rows) or alignment_loss (one
  "branch" call)."""
  cfg, model, state, batch = setup
  cfg = config.replace(cfg, eavi={"feed": feed, "rollout": rollout, "passes": 2,
                                  "continuation": continuation})
  rng = jax.random.PRNGKey(7)
  loss, after = {"rows": (steps.alignment_loss_rows, steps.rows_alignment_after_rollout),
                 "branch": (steps.alignment_loss, steps.branch_alignment_after_rollout)
                 }[continuation]

  @jax.jit
  def reference(params):
    gen = steps.excursion(model, params, batch, cfg, rng)
    grads, out = jax.grad(loss, has_aux=True)(
        params, batch, gen.fed_BAV, steps.excursion_mask(batch, gen.tokens_BA), model=model,
        cfg=cfg)
    return gen, grads, out

  calls = []
  first_pass = steps.parallel_rollout

  def spy(*args, **kwargs):
    calls.append((kwargs["first_logits_BAV"] is not None, kwargs["prompt_cache"] is not None))
    return first_pass(*args, **kwargs)

  # Some row's budget runs past the sequence: its branch tokens there are not valid.
  A = steps.answer_budget(batch, cfg)
  assert np.any(np.asarray(batch["answer_start"]) + A > batch["inputs"].shape[1])
  (gen, grads, out) = reference(state.params)
  monkeypatch.setattr(steps, "parallel_rollout", spy)
  monkeypatch.setattr(decode, "prefill", None)  # must not run: the alignment gives the cache
  gen2, grads2, out2 = jax.jit(functools.partial(after, rng=rng, model=model, cfg=cfg))(
      state.params, batch)
  if rollout == "parallel":
    assert calls == [(True, continuation == "branch")]
    assert int(gen2.passes) == int(gen.passes) == 2  # the given first pass counts
  else:
    assert calls == [] and gen2.passes is None
  np.testing.assert_array_equal(gen2.tokens_BA, gen.tokens_BA)
  # float32 logits of the same rows in a call of B rows and one of 2B (a branch: in prefill and
  # extend mode against one "branch" call), and of the first pass's rows or the prefill's
  # (PAD after the answer): the same terms, a few ulps of O(10) (test_attention's bound).
  np.testing.assert_allclose(gen2.fed_BAV, gen.fed_BAV, rtol=0, atol=2e-5)
  np.testing.assert_allclose(gen2.logprobs_BA, gen.logprobs_BA, rtol=0, atol=2e-5)
  # The same float32 gradient summed in another grouping (two calls against one, two
  # backward passes added): each leaf sums a few thousand terms of one step, so a
  # relative error ~ sqrt(terms) * 1.2e-7 ~ 1e-5 with margin; atol for leaves near 0.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads2,
               grads)
  (exc, tf, sdl, aux), (exc2, tf2, sdl2, aux2) = out, out2
  for got, want in ((exc2, exc), (tf2, tf), (sdl2, sdl), (aux2, aux)):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got,
                 want)


@pytest.mark.parametrize("model_changes", [
    {"attention": "full"}, {"attention": "dynsmlora"},
    {"attention": "nsa", "nsa_impl": "blockwise", "num_select": 5}])
def test_the_sequential_rollout_from_a_teacher_forced_cache(setup, model_changes):
  """generate from the KV cache of a teacher-forced prefill (the prompt, the ground truth and
  what follows, every position valid) and its logits at the prompt's last token emits what it
  emits after its own prefill of the prompt alone: a decoded token overwrites its position
  before it is read, NSA rebuilds a compressed block when a token completes it (here with
  blocks chosen by score: num_select above the blocks every query is given); every attention
  kind. (EAVI's step, NSA's reference path, every feed: test_alignment_gives_the_rollout_its_
  first_pass.) A cache without its capacity, or without the logits, is refused."""
  cfg, _, _, batch = setup
  cfg = config.replace(cfg, model=model_changes)
  model = Transformer(cfg.model)
  params = steps.init_state(cfg, model, jax.random.PRNGKey(4)).params
  B, T = batch["inputs"].shape
  A = steps.answer_budget(batch, cfg)
  how = dict(max_new=A, capacity=T, stop_after_B=batch["answer_len"], feed="soft")

  @functools.partial(jax.jit, static_argnames="given")
  def rollout(params, given):
    if not given:
      return decode.generate(model, params, batch["inputs"], batch["answer_start"], **how)
    logits_BTV, cache, _ = model.apply({"params": params}, batch["inputs"], batch["valid"],
                                       mode="prefill", cache=init_cache(model.cfg, B, T))
    first_BV = logits_BTV[jnp.arange(B), batch["answer_start"] - 1]
    return decode.generate(model, params, batch["inputs"], batch["answer_start"],
                           prompt_cache=cache, first_logits_BV=first_BV, **how)

  own, given = rollout(params, False), rollout(params, True)
  np.testing.assert_array_equal(given.tokens_BA, own.tokens_BA)
  assert np.sum(np.asarray(own.tokens_BA) != PAD, axis=1).max() > 5  # not an empty rollout
  # float32 logits through the same one-token path from caches whose prompt positions hold the
  # same values (a prefill of other valid tokens after them): a few ulps of O(10).
  np.testing.assert_allclose(given.fed_BAV, own.fed_BAV, rtol=0, atol=2e-5)
  np.testing.assert_allclose(given.logprobs_BA, own.logprobs_BA, rtol=0, atol=2e-5)
  cache = init_cache(model.cfg, B, T)
  with pytest.raises(ValueError, match="give its capacity"):
    decode.generate(model, params, batch["inputs"], batch["answer_start"], max_new=A,
                    prompt_cache=cache, first_logits_BV=jnp.zeros((B, VOCAB_SIZE)))
  with pytest.raises(ValueError, match="go together"):
    decode.generate(model, params, batch["inputs"], batch["answer_start"], max_new=A,
                    capacity=T, prompt_cache=cache)


def test_a_given_first_pass_runs_only_when_a_row_needs_a_token(setup):
  """A batch whose rows need no token: no pass runs, given first logits or not, and every
  token is PAD."""
  cfg, model, state, batch = setup
  none_B = jnp.zeros_like(batch["answer_len"])
  A = steps.answer_budget(batch, cfg)
  guess_BA = steps.answer_targets(batch, A)
  for first in (None, jnp.zeros((none_B.shape[0], A, VOCAB_SIZE))):
    gen = jax.jit(lambda p, first: steps.parallel_rollout(
        model, p, batch["inputs"], batch["answer_start"], guess_BA, passes=3,
        stop_after_B=none_B, first_logits_BAV=first))(state.params, first)
    assert int(gen.passes) == 0 and bool(np.all(gen.exact_B))
    assert (np.asarray(gen.tokens_BA) == PAD).all()


def test_continuation_choice(setup, monkeypatch):
  """eavi.continuation: "auto" takes the branch on every backend; the EAVI step runs the parts
  as asked (the parallel rollout's passes and the alignment, spied on: the alignment's teacher
  forcing first, the rollout's first pass, either way; the sequential rollout after it as a
  branch, on its own before the rows) and its loss terms are the same
  either way (gradients: test_branch_alignment_equals_two_rows and the after-rollout tests;
  tokens: test_parallel_rollout_reaches_the_sequential_one)."""
  cfg, model, state, batch = setup
  pick = lambda name: steps.continuation(config.replace(cfg, eavi={"continuation": name}))
  assert pick("auto") == pick("branch") == "branch" and pick("rows") == "rows"
  with pytest.raises(config.ConfigError, match="eavi.continuation"):
    config.replace(cfg, eavi={"continuation": "twice"})

  seen = []
  def spy(name, fn):
    def call(*args, **kwargs):
      seen.append((name, kwargs.get("shared_prompt")))
      return fn(*args, **kwargs)
    return call

  monkeypatch.setattr(steps, "parallel_rollout", spy("passes", steps.parallel_rollout))
  monkeypatch.setattr(steps, "branch_alignment_after_rollout",
                      spy("branch", steps.branch_alignment_after_rollout))
  monkeypatch.setattr(steps, "rows_alignment_after_rollout",
                      spy("rows", steps.rows_alignment_after_rollout))
  # Argmax feed: both ways emit the same tokens, so the loss terms compare.
  cfg = config.replace(cfg, eavi={"feed": "argmax", "rollout": "parallel", "passes": 2})

  def run(name):
    seen.clear()
    metrics = jax.jit(functools.partial(
        steps.eavi_step, model=model, cfg=config.replace(cfg, eavi={"continuation": name})))(
            state, batch)[1]
    return metrics, list(seen)

  (rows, seen_rows), (branch, seen_branch) = run("rows"), run("branch")
  # The teacher forcing first: the first pass (and, as a branch, the prompt's cache).
  assert seen_rows == [("rows", None), ("passes", False)]
  assert seen_branch == [("branch", None), ("passes", True)]
  # float32 sums of a few hundred per-token terms in another order.
  for key in ("exc_ce", "ce", "answer_acc", "exc_scored_frac", "free_token_acc"):
    np.testing.assert_allclose(rows[key], branch[key], rtol=1e-5, err_msg=key)
  # SDL's statistics cover the tokens computed: the prompt twice as rows, once as a branch.
  assert float(rows["sdl"]) != float(branch["sdl"])
  # The sequential rollout: after the teacher forcing as a branch (from its cache), on its own
  # (with its own prefill) before the alignment's rows.
  cfg = config.replace(cfg, eavi={"rollout": "sequential"})
  assert run("branch")[1] == [("branch", None)] and run("rows")[1] == []


def test_auto_experts_are_sparse_in_teacher_forcing_only(setup, monkeypatch):
  """With ``model.moe_impl=auto`` resolving to a sparse dispatch (as on a GPU), teacher
  forcing dispatches sparsely, and EAVI's step and the evaluation's model calls run the
  experts dense (transformer.outside_tf); an explicit sparse impl is kept outside teacher
  forcing too."""
  from onn_jax.evaluation.model_fns import ModelFns
  from onn_jax.model import moe
  cfg, _, state, batch = setup
  sparse_calls = []
  real_sparse, real_resolve = moe.experts_sparse, moe.resolve_impl
  monkeypatch.setattr(moe, "resolve_impl", lambda impl, backend=None: (
      "tiled" if impl == "auto" else real_resolve(impl, backend)))
  monkeypatch.setattr(moe, "experts_sparse", lambda *a, **k: (
      sparse_calls.append(1), real_sparse(*a, **k))[1])

  def model_cfg(impl):
    c = config.replace(cfg, model={"moe_impl": impl, "moe_tile": 8})
    return Transformer(c.model), c

  def traced(step, impl):
    model, c = model_cfg(impl)
    sparse_calls.clear()
    jax.jit(functools.partial(step, model=model, cfg=c)).lower(state, batch)
    return bool(sparse_calls)

  def scored(impl):
    sparse_calls.clear()
    fns = ModelFns(model_cfg(impl)[0], state.params, batch_size=4)
    fns.logprob([np.asarray(row) for row in batch["inputs"]], [5] * len(batch["inputs"]))
    return bool(sparse_calls)

  assert traced(steps.train_step, "auto")
  assert not traced(steps.eavi_step, "auto") and not scored("auto")
  assert traced(steps.eavi_step, "tiled") and scored("tiled")
  assert not traced(steps.eavi_step, "dense")
