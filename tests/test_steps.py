"""The teacher-forcing step against hand-written references: what it reports (cross-entropy on
the loss mask, accuracy and exact match on the answer) and the update it applies (clipping,
Adam's bias-corrected moments, weight decay on matrices only, the schedule's rate), in float64
numpy from the same logits and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from onn_jax import objectives, steps
from onn_jax.data.pipeline import BatchStream, build_training_tasks
from onn_jax.model.transformer import Transformer

from conftest import assert_moments_close, tiny_config


def _setup():
  # loss_on=outputs: the loss covers every demonstration output, accuracy the answer alone.
  # A clip below the gradient's norm, weight decay, and a warmup so that the rate changes.
  cfg = tiny_config(data={"buckets": [128], "max_grid": 4, "max_train_tasks": 10,
                          "loss_on": "outputs"},
                    train={"batch_size": 4, "weight_decay": 0.1, "grad_clip": 0.05,
                           "warmup_steps": 3, "learning_rate": 1e-3})
  tasks, _ = build_training_tasks(cfg.data, log=lambda *_: None)
  batch = jax.device_get(BatchStream(tasks, cfg.data, cfg.train.batch_size, 0).batch(0))
  model = Transformer(cfg.model)
  return cfg, model, batch, steps.init_state(cfg, model, jax.random.PRNGKey(0))


def _objective(params, batch, model, cfg):
  """The differentiated objective: the loss mask's mean cross-entropy plus SDL's local term."""
  logits_BTV, _, aux = model.apply({"params": params}, batch["inputs"], batch["valid"])
  stats = objectives.answer_stats(logits_BTV, batch["targets"], batch["loss_mask"])
  return stats["ce_sum"] / stats["tokens"] + objectives.sdl(aux, cfg.model)[0]


def test_reported_loss_accuracy_and_exact_match_against_numpy():
  cfg, model, batch, state = _setup()
  _, metrics = jax.jit(lambda s, b: steps.train_step(s, b, model=model, cfg=cfg))(state, batch)
  logits = np.asarray(model.apply({"params": state.params}, batch["inputs"], batch["valid"])[0],
                      np.float64)
  log_p = logits - logits.max(-1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
  targets = np.asarray(batch["targets"])
  ce = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
  loss_mask = np.asarray(batch["loss_mask"], np.float64)
  t = np.arange(targets.shape[1])[None]
  k = t - np.asarray(batch["answer_start"])[:, None] + 1  # answer token k at position t
  answer = (k >= 0) & (k < np.asarray(batch["answer_len"])[:, None])
  assert loss_mask.sum() > answer.sum() and (loss_mask[answer] == 1).all()  # outputs too
  correct = logits.argmax(-1) == targets
  # float32 sums of ~10^3 terms against float64: sqrt(n) * 2^-24 ~ 2e-6 relative.
  np.testing.assert_allclose(metrics["loss_ce"], (ce * loss_mask).sum() / loss_mask.sum(),
                             rtol=1e-5)
  np.testing.assert_allclose(metrics["answer_acc"], correct[answer].mean(), rtol=1e-6)
  exact = [correct[b][answer[b]].all() for b in range(len(targets))]
  assert float(metrics["answer_exact"]) == np.mean(exact)
  np.testing.assert_allclose(metrics["loss"], metrics["loss_ce"] + metrics["sdl"], rtol=1e-6)


def test_the_update_is_clipped_adamw_at_the_schedules_rate():
  """Three steps (of a warmup from 0) against the update written out: g clipped to grad_clip by
  the global norm; Adam's moments m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2; then
  p -= lr(t) (m^ / (sqrt(v^) + eps) + wd p [matrices only]) with m^, v^ bias-corrected.

  The moments are checked against the gradient of the same objective (another program: its
  float32 rounding differs, so relative to each leaf's scale), and the parameters against the
  step's own moments (so that an entry whose gradient is at the rounding level, which Adam
  normalises to about +-1 either way, cannot hide or fake a difference): float32 rounding of
  the new parameter and a few ulps of the update, where a wrong decay, bias correction, eps or
  rate moves entries by 1e-5 of the rate or more."""
  from optax import tree_utils
  cfg, model, batch, state = _setup()
  t = cfg.train
  names = {keep: {jax.tree_util.keystr(path[-1:]) for path, k in
                  jax.tree_util.tree_flatten_with_path(steps.decay_mask(state.params))[0]
                  if k == keep} for keep in (True, False)}
  assert names[True] == {"['kernel']", "['w_in']", "['w_out']"}
  assert names[False] == {f"['{name}']" for name in ("bias", "block_pos", "scale", "b_in",
                                                     "b_out", "prototypes", "thresholds",
                                                     "embedding")}
  mask = jax.tree.leaves(steps.decay_mask(state.params))
  step = jax.jit(lambda s, b: steps.train_step(s, b, model=model, cfg=cfg))
  grad = jax.jit(jax.grad(lambda p: _objective(p, batch, model, cfg)))
  lr = steps.learning_rate_schedule(cfg)
  moments = lambda s: [[np.asarray(x, np.float64) for x in jax.tree.leaves(
      tree_utils.tree_get(s.opt_state, key))] for key in ("mu", "nu")]
  for n in range(3):
    g = [np.asarray(x, np.float64) for x in jax.tree.leaves(grad(state.params))]
    p = [np.asarray(x, np.float64) for x in jax.tree.leaves(state.params)]
    m_before, v_before = moments(state)
    norm = np.sqrt(sum((x ** 2).sum() for x in g))
    assert norm > t.grad_clip  # the clip acts
    g = [x * t.grad_clip / norm for x in g]
    state, metrics = step(state, batch)
    rate = float(lr(n))
    assert float(metrics["lr"]) == rate and (0 < rate < t.learning_rate or n == 0)  # warmup
    np.testing.assert_allclose(metrics["grad_norm"], norm, rtol=1e-5)
    m, v = moments(state)
    # A leaf whose gradient is rounding noise (the compressed keys' bias, which the softmax
    # ignores) differs between the two programs relative to the whole gradient's scale.
    for got, want, name in ((m, [t.b1 * a + (1 - t.b1) * x for a, x in zip(m_before, g)], "mu "),
                            (v, [t.b2 * a + (1 - t.b2) * x ** 2 for a, x in zip(v_before, g)],
                             "nu ")):
      assert_moments_close(got, want, name, atol=1e-5 * max(np.abs(x).max() for x in want))
    want = [w - rate * (a / (1 - t.b1 ** (n + 1)) / (np.sqrt(b / (1 - t.b2 ** (n + 1))) + 1e-8)
                        + t.weight_decay * w * d) for w, a, b, d in zip(p, m, v, mask)]
    for (path, got), w in zip(jax.tree_util.tree_flatten_with_path(state.params)[0], want):
      np.testing.assert_allclose(np.asarray(got, np.float64), w, rtol=0,
                                 atol=2 ** -23 * np.abs(w).max() + 1e-5 * rate,
                                 err_msg=jax.tree_util.keystr(path))
  assert int(state.step) == 3 and jnp.isfinite(metrics["loss"])
