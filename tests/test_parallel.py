"""Data parallelism on 8 forced host CPU devices: shard_map and pmap against one device.

One module fixture runs the same trajectory (teacher-forcing steps, a checkpoint, then EAVI
steps) on the same global batches in every mode, all three modes at once in threads so their
compilations overlap; the tests compare what it recorded.
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
import threading

import jax
import numpy as np
import pytest

from onn_jax import checkpoint, experts, parallel, steps
from onn_jax.config import ConfigError
from onn_jax.data.pipeline import BatchStream, build_training_tasks
from onn_jax.model.transformer import Transformer
from onn_jax.parallel import Runner
from onn_jax.run import make_runner

from conftest import adam_ratio_bound, assert_moments_close, param_bound, tiny_config

MODES = ("single", "shard_map", "pmap")
K_TF, K_EAVI, CKPT_AT = 4, 2, 2  # teacher-forcing steps, EAVI steps, checkpoint after step 2
# Losses, gradient norms and other metrics are float32 reductions over at most B*T = 1024
# tokens; summed in another order (per-device partial sums, another CPU's vector width) they
# differ by about sqrt(n) * eps_f32 = 32 * 1.2e-7 = 4e-6 relative (random-walk rounding), so
# rtol 1e-5; atol 1e-6 for metrics near zero (SDL terms, fallback fractions).
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
  """XLA without most optimisations: the same program in every mode, compiled in half the time.

  Every mode compiles under the same flag, so the comparison between modes still holds.
  """
  try:
    # jax.config.read: attribute access to this flag raises AttributeError at jax 0.10, which
    # silently compiled every mode with full optimisation.
    old = jax.config.read("jax_disable_most_optimizations")
  except (AttributeError, KeyError):  # a jax without the flag: compile normally
    yield
    return
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", old)


def _cfg(mode: str, **sections):
  # One bucket: every batch has the same shape, so each mode compiles each step once.
  # warmup 0 so that every step (the first included) moves the parameters.
  values = dict(data=dict(buckets=[128]),
                train=dict(batch_size=8, pretrain_steps=K_TF, eavi_steps=K_EAVI, warmup_steps=0),
                eavi=dict(feed="soft", warmup_steps=0),
                parallel=dict(mode=mode))
  for section, changes in sections.items():
    values.setdefault(section, {}).update(changes)
  return tiny_config(**values)


def _host_tree(tree):
  return jax.tree.map(parallel.host_value, tree)


def _max_abs_diff(a, b) -> float:
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64)
                                                        - np.asarray(y, np.float64)),
                                                 initial=0.0)), a, b)
  return max(jax.tree.leaves(diffs), default=0.0)


def _assert_trees_close(actual, expected, what: str, bound: float = 0.0):
  """Leaf-wise rtol/atol, widened by ``bound`` (absolute) for parameters after Adam steps."""
  np.testing.assert_equal(jax.tree.structure(actual), jax.tree.structure(expected))
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(actual)[0],
                          jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL + bound,
                               err_msg=what + jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  cfg = _cfg("single")
  tasks, _ = build_training_tasks(cfg.data, log=lambda *_: None)
  stream = BatchStream(tasks, cfg.data, cfg.train.batch_size, cfg.train.seed)
  batches = [stream.batch(s) for s in range(K_TF + K_EAVI)]
  model = Transformer(cfg.model)
  init = jax.device_get(steps.init_state(cfg, model, jax.random.PRNGKey(cfg.train.seed)))
  root = tmp_path_factory.mktemp("ckpt")

  def trajectory(mode: str) -> dict:
    mode_cfg = _cfg(mode)
    runner = make_runner(mode_cfg, model)
    mngr = checkpoint.manager(root / mode, keep=2, async_save=False)
    state = runner.put_state(init)
    metrics, snapshots = [], {}
    for s, batch in enumerate(batches):
      stage = "pretrain" if s < K_TF else "eavi"
      state, out = runner.run(stage, state, runner.put_batch(batch))
      metrics.append(_host_tree(out))
      if s + 1 == CKPT_AT:
        checkpoint.save(mngr, CKPT_AT, runner.get_state(state), {"mode": mode})
        mngr.wait_until_finished()
      if s + 1 in (K_TF, K_TF + K_EAVI):
        snapshots[s + 1] = _host_tree(runner.get_state(state))
    return dict(cfg=mode_cfg, runner=runner, mngr=mngr, metrics=metrics, snapshots=snapshots,
                live=state)

  with concurrent.futures.ThreadPoolExecutor(len(MODES)) as pool:
    runs = dict(zip(MODES, pool.map(trajectory, MODES)))
  yield dict(runs=runs, batches=batches, init=init, model=model)
  for run in runs.values():
    run["mngr"].close()


def _metric_curve(metrics: list[dict], names=None) -> dict[str, np.ndarray]:
  names = names or metrics[0].keys()
  return {k: np.stack([np.asarray(m[k], np.float64) for m in metrics]) for k in names}


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_runner_uses_every_device(world, mode):
  runner = world["runs"][mode]["runner"]
  assert runner.mode == mode and runner.num_devices == jax.device_count() == 8


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_teacher_forcing_matches_one_device(world, mode):
  ref, run = world["runs"]["single"], world["runs"][mode]
  want = _metric_curve(ref["metrics"][:K_TF])
  got = _metric_curve(run["metrics"][:K_TF], want.keys())
  assert np.all(np.diff(want["loss"]) != 0), "the loss curve should move"
  _assert_trees_close(got, want, f"{mode} teacher-forcing metrics ")
  _assert_trees_close(run["snapshots"][K_TF].params, ref["snapshots"][K_TF].params,
                      f"{mode} params after {K_TF} steps ", param_bound(ref["cfg"], K_TF))
  assert_moments_close(run["snapshots"][K_TF].opt_state, ref["snapshots"][K_TF].opt_state,
                        f"{mode} optimizer state ")
  assert int(run["snapshots"][K_TF].step) == K_TF


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_eavi_matches_one_device(world, mode):
  ref, run = world["runs"]["single"], world["runs"][mode]
  end = K_TF + K_EAVI
  want = _metric_curve(ref["metrics"][K_TF:])
  assert {"exc_ce", "free_exact", "free_token_acc"} <= want.keys()
  got = _metric_curve(run["metrics"][K_TF:], want.keys())
  _assert_trees_close(got, want, f"{mode} EAVI metrics ")
  _assert_trees_close(run["snapshots"][end].params, ref["snapshots"][end].params,
                      f"{mode} params after EAVI ", param_bound(ref["cfg"], end))
  # The moments carry the gradients themselves: tight where the parameter bound is loose.
  assert_moments_close(run["snapshots"][end].opt_state, ref["snapshots"][end].opt_state,
                        f"{mode} optimizer state after EAVI ")
  # The EAVI steps moved the parameters away from the teacher-forcing ones.
  assert _max_abs_diff(ref["snapshots"][end].params, ref["snapshots"][K_TF].params) > 1e-5


@pytest.mark.parametrize("continuation", ["branch", "rows"])
def test_parallel_rollout_eavi_step_matches_one_device(world, continuation):
  """eavi.rollout=parallel (argmax feed, passes enough for every row) under shard_map and
  pmap: each device iterates its own row until it settles (a while loop of its own length),
  and the step is the one-device step; the passes reported are the most any device ran. The
  first pass comes from the alignment's teacher forcing (each device's own; as a branch, with
  its prompt's KV cache)."""
  batch, init, model = world["batches"][K_TF], world["init"], world["model"]
  out = {}
  for mode in MODES:
    runner = make_runner(_cfg(mode, eavi=dict(rollout="parallel", passes=64, feed="argmax",
                                              continuation=continuation)), model)
    state, metrics = runner.run("eavi", runner.put_state(init), runner.put_batch(batch))
    out[mode] = (_host_tree(runner.get_state(state)), _host_tree(metrics))
  ref_state, ref = out["single"]
  assert ref["rollout_exact"] == 1.0 and 1 <= ref["rollout_passes"] <= int(
      np.max(batch["answer_len"]))
  for mode in ("shard_map", "pmap"):
    state, got = out[mode]
    _assert_trees_close(got, ref, f"{mode} parallel-rollout EAVI metrics ")
    # One Adam step moves every entry by about lr either way: the params' bound admits any
    # sign, so the gradient is checked through the moments (sums of it, rounding to scale).
    _assert_trees_close(state.params, ref_state.params, f"{mode} params after a "
                        "parallel-rollout EAVI step ", param_bound(_cfg("single"), 1))
    assert_moments_close(state.opt_state, ref_state.opt_state,
                          f"{mode} moments after a parallel-rollout EAVI step ")


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_routing_statistics_match_one_device(world, mode):
  ref, run = world["runs"]["single"], world["runs"][mode]
  for at in (K_TF, K_TF + K_EAVI):
    want = ref["snapshots"][at].routing["window_tokens"]
    assert want.shape == (_cfg("single").model.num_layers, 4) and want.sum() > 0
    np.testing.assert_array_equal(run["snapshots"][at].routing["window_tokens"], want)
  for got_m, want_m in zip(run["metrics"], ref["metrics"]):
    np.testing.assert_array_equal(got_m["tokens_per_expert"], want_m["tokens_per_expert"])


@pytest.mark.parametrize("src,dst", [("shard_map", "single"), ("single", "shard_map"),
                                     ("pmap", "single"), ("single", "pmap")])
def test_resume_across_device_counts(world, src, dst):
  """A checkpoint written on 8 devices continues on 1 as an uninterrupted run (and back)."""
  runs = world["runs"]
  runner = runs[dst]["runner"]
  # Like run.initial_state: restore into a fresh single-device state, then place it.
  target = steps.init_state(runs[dst]["cfg"], world["model"], jax.random.PRNGKey(1))
  restored, record = checkpoint.restore(runs[src]["mngr"], target, step=CKPT_AT)
  assert record == {"mode": src} and int(restored.step) == CKPT_AT
  state = runner.put_state(restored)
  metrics = []
  for s in range(CKPT_AT, K_TF):
    state, out = runner.run("pretrain", state, runner.put_batch(world["batches"][s]))
    metrics.append(_host_tree(out))
  final = _host_tree(runner.get_state(state))
  reference = runs["single"]
  want = _metric_curve(reference["metrics"][CKPT_AT:K_TF])
  _assert_trees_close(_metric_curve(metrics, want.keys()), want, f"{src}->{dst} metrics ")
  _assert_trees_close(final.params, reference["snapshots"][K_TF].params, f"{src}->{dst} params ",
                      param_bound(reference["cfg"], K_TF))
  assert_moments_close(final.opt_state, reference["snapshots"][K_TF].opt_state,
                        f"{src}->{dst} optimizer state ")
  np.testing.assert_array_equal(final.routing["window_tokens"],
                                reference["snapshots"][K_TF].routing["window_tokens"])
  assert int(final.step) == K_TF


@pytest.mark.parametrize("mode", MODES)
def test_steps_compiled_in_the_background_are_traced_there_and_run_as_jitted(world, mode):
  """``precompile(background=True)`` lowers the steps on the compile thread, from shapes: this
  thread traces nothing (an H200 run's first step waited a minute for five EAVI buckets'
  tracing), and the programs give the jitted step's results bit for bit."""
  run = world["runs"][mode]
  runner = run["runner"]
  batch = world["batches"][0]
  traced: list[tuple[str, str]] = []

  def record(event, duration, **meta):
    if event == "/jax/core/compile/jaxpr_trace_duration":
      traced.append((threading.current_thread().name, meta.get("fun_name", "?")))

  state = runner.put_state(world["init"])
  jax.monitoring.register_event_duration_secs_listener(record)
  try:
    runner.precompile("pretrain", state, [batch], background=True)
    _, out = runner.run("pretrain", state, runner.put_batch(batch))
  finally:
    jax.monitoring.unregister_event_duration_listener(record)
  assert traced and all(thread != threading.current_thread().name for thread, _ in traced), \
      traced
  for key, want in run["metrics"][0].items():
    np.testing.assert_array_equal(_host_tree(out)[key], want, err_msg=f"{mode} {key}")


@pytest.fixture(scope="module")
def reset_transform(world):
  model_cfg = world["runs"]["single"]["cfg"].model

  def transform(state, rng, window_LE):
    params, opt_state, ema, dead = experts.reset_dead_experts(
        state.params, state.opt_state, window_LE, rng, model_cfg, ema=state.ema)
    return state.replace(params=params, opt_state=opt_state, ema=ema), dead
  return transform


def test_apply_expert_reset_is_the_same_in_every_mode(world, reset_transform):
  """... and, compiled ahead (``precompile_apply``), its call compiles nothing."""
  window_LE = np.array([[0, 3, 5, 0], [2, 0, 1, 1]], np.float32)
  rng = jax.random.PRNGKey(7)
  results = {}
  compiled: list[str] = []

  def count(event, duration, **meta):
    if event == "/jax/core/compile/backend_compile_duration":
      compiled.append(meta.get("fun_name", "?"))

  for mode in MODES:
    runner = world["runs"][mode]["runner"]
    state = runner.put_state(world["runs"][mode]["snapshots"][K_TF + K_EAVI])
    runner.precompile_apply(reset_transform, state, rng, window_LE)
    jax.monitoring.register_event_duration_secs_listener(count)
    try:
      new_state, dead = runner.apply(reset_transform, state, rng, window_LE)
    finally:
      jax.monitoring.unregister_event_duration_listener(count)
    assert compiled == [], (mode, compiled)
    dead = np.asarray(parallel.host_value(dead[0] if mode == "pmap" else dead))
    results[mode] = (_host_tree(runner.get_state(new_state)), dead)
  np.testing.assert_array_equal(results["single"][1], window_LE == 0)
  before = world["runs"]["single"]["snapshots"][K_TF + K_EAVI]
  assert _max_abs_diff(results["single"][0].params, before.params) > 0  # experts were reset
  for mode in ("shard_map", "pmap"):
    np.testing.assert_array_equal(results[mode][1], results["single"][1])
    bound = param_bound(world["runs"]["single"]["cfg"], K_TF + K_EAVI)
    _assert_trees_close(results[mode][0].params, results["single"][0].params,
                        f"{mode} reset params ", bound)
    assert_moments_close(results[mode][0].opt_state, results["single"][0].opt_state,
                          f"{mode} reset optimizer state ")


@pytest.mark.parametrize("mode", MODES)
def test_put_batch_keeps_the_global_row_order(world, mode):
  runner = world["runs"][mode]["runner"]
  batch = world["batches"][0]
  placed = runner.put_batch(batch)
  for key, rows in batch.items():
    got = parallel.host_value(placed[key])
    if mode == "pmap":
      assert got.shape[:2] == (8, 1)
      got = got.reshape(rows.shape)
    np.testing.assert_array_equal(got, rows, err_msg=key)
  if mode == "shard_map":
    assert placed["inputs"].sharding.spec == jax.sharding.PartitionSpec(parallel.AXIS)


@pytest.mark.parametrize("mode", MODES)
def test_put_state_does_not_hand_out_the_callers_buffers(world, mode):
  """The steps donate their input state; placing a state twice must give independent copies."""
  runner = world["runs"][mode]["runner"]
  live = world["runs"][mode]["live"]
  again = runner.put_state(runner.get_state(live))
  a = jax.tree.leaves(live)[0]
  b = jax.tree.leaves(again)[0]
  assert a.sharding == b.sharding
  assert (a.addressable_shards[0].data.unsafe_buffer_pointer()
          != b.addressable_shards[0].data.unsafe_buffer_pointer())


@pytest.mark.parametrize("mode", ["shard_map", "pmap", "auto"])
def test_indivisible_batch_is_rejected_in_one_line(mode):
  with pytest.raises(ConfigError) as info:
    Runner(_cfg(mode, train=dict(batch_size=12)), {})
  message = str(info.value)
  assert message.startswith("train.batch_size: 12") and "8 devices" in message
  assert "\n" not in message


def test_long_bucket_rows_that_do_not_divide_over_the_devices_are_one_line():
  """data.max_batch_tokens=1024 gives bucket 256 4 rows: not a split over 8 devices. The rows
  never round to the device count, so that batches do not depend on the layout."""
  cfg = _cfg("shard_map", train=dict(batch_size=8),
             data=dict(buckets=[128, 256], max_batch_tokens=1024))
  with pytest.raises(ConfigError) as info:
    Runner(cfg, {})
  message = str(info.value)
  assert message.startswith("data.max_batch_tokens: 1024 gives bucket 256 4 rows")
  assert "8 devices" in message and "\n" not in message
  # The value it suggests splits every bucket (the least above: 8 rows of 256, 8 of 128).
  assert message.endswith("e.g. 2048 splits every bucket")
  Runner(_cfg("shard_map", train=dict(batch_size=8),
              data=dict(buckets=[128, 256], max_batch_tokens=2048)), {})
  Runner(_cfg("single", train=dict(batch_size=8),
              data=dict(buckets=[128, 256], max_batch_tokens=1024)), {})  # one device: fine


def test_single_mode_accepts_any_batch_and_auto_picks_shard_map():
  assert Runner(_cfg("single", train=dict(batch_size=12)), {}).num_devices == 1
  assert parallel.resolve_mode(_cfg("auto")) == "shard_map"


def test_distributed_is_a_no_op_without_flags(monkeypatch):
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)

  def forbidden(**kwargs):
    raise AssertionError(f"jax.distributed.initialize called with {kwargs}")

  monkeypatch.setattr(jax.distributed, "initialize", forbidden)
  assert parallel.maybe_initialize_distributed(_cfg("auto")) is False
  assert jax.process_count() == 1 and parallel.is_main_process()
  # A host's count or id without the flag that joins hosts: one line, not a lone host.
  for key, value in (("num_processes", 2), ("process_id", 1)):
    with pytest.raises(ConfigError, match=r"^parallel.num_processes and parallel.process_id: "
                       "they need parallel.distributed=true"):
      parallel.maybe_initialize_distributed(_cfg("auto", parallel={key: value}))


def test_distributed_flags_reach_jax(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  cfg = _cfg("auto", parallel=dict(coordinator_address="10.0.0.1:12345", num_processes=2,
                                   process_id=1))
  assert parallel.maybe_initialize_distributed(cfg) is True
  assert calls == [dict(coordinator_address="10.0.0.1:12345", num_processes=2, process_id=1)]

  def refuse(**kwargs):
    raise ValueError("Number of processes must be defined.")

  monkeypatch.setattr(jax.distributed, "initialize", refuse)
  with pytest.raises(ConfigError, match=r"^parallel\.distributed: .*Number of processes"):
    parallel.maybe_initialize_distributed(_cfg("auto", parallel=dict(distributed=True)))


def test_adam_ratio_bound_holds_for_adversarial_gradients():
  """The bound behind param_bound: optax's Adam direction never exceeds it, and is tight at 1."""
  import optax
  b1, b2 = 0.9, 0.95
  assert adam_ratio_bound(1, b1, b2) == pytest.approx(1.0)
  rng = np.random.default_rng(0)
  opt = optax.scale_by_adam(b1=b1, b2=b2, eps=0.0)
  grads_NS = rng.standard_normal((4096, 6)) * np.exp(rng.uniform(-8, 0, (4096, 6)))
  state = opt.init(np.zeros(4096, np.float64))
  for t in range(1, 7):
    update_N, state = opt.update(grads_NS[:, t - 1], state)
    assert np.max(np.abs(update_N)) <= adam_ratio_bound(t, b1, b2) * (1 + 1e-5)


def test_background_lowering_hands_the_gil_back_quickly_and_restores_the_interval():
  """While a background compilation traces (lowers), the interpreter switches threads every
  BACKGROUND_SWITCH_INTERVAL_S, so training and batch building are not starved; after it, and
  after a lowering that fails, the interval is what it was."""
  before = sys.getswitchinterval()
  inside: list[float] = []
  seen = parallel.compile_in_background("probe", lambda: inside.append(sys.getswitchinterval())
                                        or [])
  assert seen.result(30)[0] == []
  # The interpreter keeps the interval in whole microseconds.
  assert inside == [pytest.approx(min(before, parallel.BACKGROUND_SWITCH_INTERVAL_S), abs=1e-6)]

  def failing():
    raise RuntimeError("lowering failed")

  with pytest.raises(RuntimeError, match="lowering failed"):
    parallel.compile_in_background("failing", failing).result(30)
  assert sys.getswitchinterval() == pytest.approx(before, abs=1e-6)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_background_compilations_run_nicer_than_training():
  """The threads that compile in the background run BACKGROUND_NICE nicer than the caller (at
  most 19); the caller's own niceness does not change."""
  def niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

  before = niceness()

  class Lowered:
    def compile(self):
      return niceness()

  programs, _ = parallel.compile_in_background("nice", lambda: [Lowered(), Lowered()]).result(30)
  assert programs == [min(19, before + parallel.BACKGROUND_NICE)] * 2
  assert niceness() == before
  assert parallel.compile_at_once([Lowered()]) == [before]  # in the foreground: as it was


def test_a_stopping_run_cancels_the_queued_background_compilations_not_the_running_one():
  started, release = threading.Event(), threading.Event()

  def running():
    started.set()
    release.wait(30)
    return []

  first = parallel.compile_in_background("first", running)
  second = parallel.compile_in_background("second", lambda: [])
  assert started.wait(30)
  assert parallel.compiling_in_background() == ["first", "second"]
  assert parallel.cancel_background() == ["first"]
  assert second.cancelled() and not first.cancelled()
  release.set()
  assert first.result(30)[0] == [] and parallel.compiling_in_background() == []
