"""train.bench: a ``--quick`` smoke run on CPU, plus the pieces whose correctness the numbers
rest on (FLOP count, sparse MoE dispatch, crossover, device peak lookup). No timing is asserted.
"""

from __future__ import annotations

import contextlib
import io
import json
import gzip
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onn_jax import config, steps
from onn_jax.model.moe import cosine_similarity, experts_dense
from onn_jax.model.transformer import Transformer, init_params
from train import bench
from onn_jax import profiling


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  """Runs ``python -m train.bench --quick`` once: (results JSON, printed text)."""
  folder = tmp_path_factory.mktemp("bench")
  out = folder / "bench.json"
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    rc = bench.main(["--config", "configs/arc1.yaml", "--quick", "--out", str(out),
                     "--profile", str(folder / "profile")])
  assert rc == 0
  return json.loads(out.read_text()), printed.getvalue()


def _numbers(tree, skip=()):
  """Every int/float leaf of a JSON tree with its path, except under keys in ``skip``."""
  if isinstance(tree, dict):
    for key, val in tree.items():
      if key not in skip:
        for path, x in _numbers(val, skip):
          yield f"{key}.{path}" if path else key, x
  elif isinstance(tree, list):
    for i, val in enumerate(tree):
      for path, x in _numbers(val, skip):
        yield f"[{i}].{path}" if path else f"[{i}]", x
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
    yield "", tree


def _assert_finite_positive(tree, skip=()):
  numbers = list(_numbers(tree, skip))
  assert numbers, "no numbers measured"
  for path, x in numbers:
    assert math.isfinite(x) and x > 0, f"{path} = {x}"


def test_quick_writes_every_section(quick):
  results, _ = quick
  assert set(bench.SECTIONS) <= set(results)
  meta = results["meta"]
  assert meta["jax_version"] == jax.__version__ and meta["quick"] is True
  assert meta["device_kind"] and meta["date"]
  assert results["config"]["model"]["num_layers"] == 1  # the quick overrides were applied


def test_quick_train_and_eavi_numbers(quick):
  results, _ = quick
  for row in results["train"]:
    for key in ("step_ms", "tokens_per_s", "experts_per_token", "model_flops_per_token",
                "model_tflops_per_s"):
      assert key in row, f"train row lacks {key}: {row}"
    assert row["mfu"] is None  # no peak FLOP/s is known for a CPU
    assert row["experts_per_token"] <= results["config"]["model"]["num_experts"]
  _assert_finite_positive(results["train"], skip=("profile",))  # its own test below
  # arc1 packs: the longest length is timed on packed rows too, real tokens/s beside tokens/s;
  # every case at both routings, the target one nearer the SDL target's experts a token.
  packed = [r for r in results["train"] if r["packed"]]
  assert [r["routing"] for r in packed] == list(bench.ROUTINGS_STEP)
  assert all(r["seq_len"] == max(r["seq_len"] for r in results["train"]) for r in packed)
  cfg = config.load("configs/arc1.yaml", list(bench.QUICK_OVERRIDES))
  target = cfg.model.sdl_target_active * cfg.model.num_experts
  for init, tgt in zip(results["train"][::2], results["train"][1::2]):
    assert (init["routing"], tgt["routing"]) == bench.ROUTINGS_STEP
    assert (init["seq_len"], init["packed"]) == (tgt["seq_len"], tgt["packed"])
    assert abs(tgt["experts_per_token"] - target) < abs(init["experts_per_token"] - target)
  for row in results["train"]:
    assert 0 < row["real_frac"] <= 1
    assert row["real_tokens_per_s"] == pytest.approx(row["real_frac"] * row["tokens_per_s"])
    # The back-to-back loop's numbers are the same quantities over its own time.
    assert row["loop_tokens_per_s"] == pytest.approx(
        row["batch"] * row["seq_len"] / (row["loop_ms"] / 1e3))
    assert row["loop_real_tokens_per_s"] == pytest.approx(
        row["real_frac"] * row["loop_tokens_per_s"])
    assert row["loop_mfu"] is None
  data = results["train_data"]
  assert data["packed"] > max(b["real_frac"] for b in data["buckets"].values())
  for row in results["eavi"]:
    for key in ("train_step_ms", "eavi_step_ms", "ratio", "rollout_tokens_per_s",
                "sequential_step_ms", "parallel_step_ms", "parallel_passes", "align_branch_ms",
                "align_rows_ms", "passes_branch_ms", "passes_rows_ms"):
      assert key in row, f"eavi row lacks {key}: {row}"
    cfg = config.load("configs/arc1.yaml", list(bench.QUICK_OVERRIDES))
    assert row["continuation"] == steps.continuation(cfg)
    stream = bench.config_stream(cfg)  # EAVI's answer budget of the config's data
    assert row["rollout_budget"] == stream.answer_budgets[stream.buckets.index(row["seq_len"])]
    assert row["ratio"] == pytest.approx(row["eavi_step_ms"] / row["train_step_ms"])
    assert row["eavi_step_ms"] == row["sequential_step_ms"]  # the config's rollout
    assert 1 <= row["parallel_passes"] <= 4  # eavi.passes, the default
  _assert_finite_positive(results["eavi"],
                          skip=("profile_train", "profile_eavi", "profile_rollout"))


def test_quick_decode_numbers(quick):
  """The decode section: the default set's rollout, the same measurement as the eavi section's
  (timed once a run), its tokens/s over the rows' tokens; on a CPU no other set."""
  results, _ = quick
  eavi = {r["seq_len"]: r for r in results["eavi"]}
  assert [r["seq_len"] for r in results["decode"]] == list(eavi)
  for row in results["decode"]:
    sets = row["sets"]
    assert list(sets) == ["default"] + bench.other_decode_kernels()
    assert sets["default"]["speedup"] == 1.0
    assert sets["default"]["ms"] == eavi[row["seq_len"]]["rollout_ms"]
    assert row["rollout_budget"] == eavi[row["seq_len"]]["rollout_budget"]
    for case in sets.values():
      assert case["tokens_per_s"] == pytest.approx(
          row["batch"] * row["rollout_budget"] / (case["ms"] / 1e3))
    # --profile (the quick fixture's): the default's trace summary, as the eavi row's.
    assert sets["default"]["profile"] == eavi[row["seq_len"]]["profile_rollout"]
    # The steps alone, from a prompt cache computed before the timed call: the prefill's time
    # is the difference (any sign on a CPU's noise; its tokens/s over the same tokens).
    assert row["prefill_ms"] == pytest.approx(sets["default"]["ms"] - row["steps_ms"])
    assert row["steps_tokens_per_s"] == pytest.approx(
        row["batch"] * row["rollout_budget"] / (row["steps_ms"] / 1e3))
  _assert_finite_positive(results["decode"], skip=("profile", "prefill_ms"))


def test_other_decoding_kernel_sets_are_timed_on_a_gpu_only(monkeypatch):
  """On a GPU every decode.DECODE_KERNELS set but the one set now; elsewhere none (the sets
  differ in Triton kernels only)."""
  from onn_jax.decode import DECODE_KERNELS
  from onn_jax.model import moe, nsa
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  others = bench.other_decode_kernels()
  assert len(others) == len(DECODE_KERNELS) - 1
  assert DECODE_KERNELS[next(n for n in DECODE_KERNELS if n not in others)] == (
      nsa.PALLAS_DECODE, moe.decode_kernel_setting())
  assert moe.decode_kernel_setting() == "pallas"  # the default, "auto", on a GPU
  assert bench.other_decode_kernels(["split", "fused"]) == ["split", "fused"]
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert bench.other_decode_kernels() == []
  assert bench.other_decode_kernels(["split"]) == []


def test_decode_rows_keep_the_sets_that_fit(monkeypatch):
  """A set that runs out of memory is recorded as such; the others keep their timings and
  speedups, and the table shows both."""
  class Runner:
    cfg = config.load("configs/arc1.yaml", list(bench.QUICK_OVERRIDES))
    profiles: dict = {}

    def default_rollout(self, T):
      return bench.Timing(1.0, 20.0, 19.0, 3), 30

    def time_rollout(self, T, name=None, steps_only=False):
      if steps_only:
        return bench.Timing(1.0, 16.0, 15.0, 3), 30
      if name == "fused":
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
      return bench.Timing(1.0, 10.0, 9.0, 3), 30
  monkeypatch.setattr(bench, "other_decode_kernels", lambda only=None: ["split", "fused"])
  [row] = bench.bench_decode(Runner(), [128])
  B = Runner.cfg.train.batch_size
  assert row["rollout_budget"] == 30
  assert row["sets"]["fused"] == {"status": "oom"}
  assert row["sets"]["split"]["speedup"] == 2.0 and row["sets"]["default"]["speedup"] == 1.0
  assert row["sets"]["split"]["tokens_per_s"] == pytest.approx(B * 30 / 0.01)
  assert row["steps_ms"] == 16.0 and row["prefill_ms"] == 4.0
  assert row["steps_tokens_per_s"] == pytest.approx(B * 30 / 0.016)
  text = bench.section_tables({"decode": [row]})["decode"]
  assert "oom" in text and "20.0 (" in text and "2.00x" in text and "16.0 (" in text


def test_quick_nsa_numbers(quick):
  results, _ = quick
  assert [r["seq_len"] for r in results["nsa"]] == list(bench.QUICK_SIZES.nsa_lens)
  for row in results["nsa"]:
    for impl in bench.NSA_IMPLS + ("full_attention",):
      assert "ms" in row[impl], f"T={row['seq_len']} {impl}: {row[impl]}"
  _assert_finite_positive(results["nsa"])


def test_quick_moe_numbers(quick):
  results, _ = quick
  moe = results["moe"]
  assert {r["variant"] for r in moe["rows"]} == {*bench.DENSE_VARIANTS, *bench.SPARSE_IMPLS}
  for name, err in moe["check_max_abs_err"].items():
    assert isinstance(err, float) and err < 1e-4, f"{name}: {err}"
  for row in moe["rows"]:
    assert row["fwd_bwd_ms"] is not None, row
  _assert_finite_positive(moe["rows"])
  assert set(moe["crossover"]) == set(bench.SPARSE_IMPLS)


def test_quick_layers_numbers(quick):
  results, _ = quick
  for row in results["layers"]:
    assert row["full"]["ratio_to_full"] == 1.0
    for name in bench.LAYERS:
      assert row[name]["ms"] > 0, f"{name} at T={row['seq_len']}: {row[name]}"
      assert row[name]["ratio_to_full"] == pytest.approx(row[name]["ms"] / row["full"]["ms"])
      assert row[name]["loop_ms"] > 0, f"{name} at T={row['seq_len']}: {row[name]}"
      assert row[name]["loop_ratio_to_full"] == pytest.approx(
          row[name]["loop_ms"] / row["full"]["loop_ms"])


def test_quick_dynmoe_at_the_trained_density(quick):
  results, _ = quick
  m = results["config"]["model"]
  rows = results["layers_dynmoe"]
  shapes = list(bench.QUICK_SIZES.moe_layer_shapes)
  assert [(r["batch"], r["seq_len"], r["routing"]) for r in rows] == (
      [(*shape, "even") for shape in shapes] + [(*shapes[0], "trained")])
  loads = bench.trained_loads(m["num_experts"], m["sdl_target_active"])
  for row in rows:
    target = m["sdl_target_active"] * m["num_experts"]
    tokens = row["batch"] * row["seq_len"]
    # Thresholds put target experts on each token on average (each expert's share to a token
    # of the quantile); a fallback token adds its own.
    slack = m["num_experts"] / tokens
    assert target - slack <= row["experts_per_token"] <= (
        target + row["fallback_frac"] * m["fallback_k"] + slack)
    assert row["pairs"] == pytest.approx(row["experts_per_token"] * row["batch"]
                                         * row["seq_len"], abs=0.5)
    assert row["overflow"] is False  # the ragged and tiled rows timed the sparse path
    assert row["batched_overflow"] == (row["max_expert_tokens"] > row["expert_rows"])
    busiest = max(loads) if row["routing"] == "trained" else m["sdl_target_active"]
    # The busiest expert: its share, plus the fallback's tokens it may take.
    assert busiest - 1 / tokens <= row["max_expert_share"] <= (
        busiest + row["fallback_frac"] + 1 / tokens)
    assert row["dense"]["ratio_to_dense"] == 1.0
    assert row["reference"]["loop_ratio_to_reference"] == 1.0
    for impl in bench.SPARSE_IMPLS + ("reference",):
      assert row[impl]["loop_ratio_to_reference"] == pytest.approx(
          row[impl]["loop_ms"] / row["reference"]["loop_ms"])
      assert row[impl]["ms"] > 0, f"{impl}: {row[impl]}"
      assert row[impl]["ratio_to_dense"] == pytest.approx(row[impl]["ms"] / row["dense"]["ms"])
      assert row[impl]["loop_ratio_to_dense"] == pytest.approx(
          row[impl]["loop_ms"] / row["dense"]["loop_ms"])
    assert row["auto"] == "dense"  # on the CPU
  even, trained = rows[0], rows[-1]
  assert even["batched_overflow"] is False  # the even share fits the batched rows
  assert trained["batched_overflow"] is True  # a trained layer's busiest expert does not


def test_quick_prints_tables(quick):
  _, printed = quick
  for title in ("Teacher-forcing step", "EAVI step", "Sequential rollout with each set",
                "NSA core", "DynMoE experts"):
    assert f"**{title}" in printed
  assert "DynMoE layer forward+backward at the trained density, ratio to dense (" in printed
  assert ("| batch | T | routing | experts/token | busiest expert | pairs / capacity "
          "| reference ms (x dense) | dense ms (x dense) |") in printed
  assert "| T | batch | packed | routing | step ms |" in printed
  assert "| T | batch | tokens a row | default ms (tok/s, x default) |" in printed


def test_the_dynmoe_density_table_runs_with_moe_not_with_layers(tmp_path, monkeypatch):
  """``--only layers`` times the layers alone (so one attention layer at a new length costs no
  DynMoE table); ``--only moe`` runs the dispatches and then the DynMoE layer at the trained
  density, both in its JSON and its printed table."""
  calls = []

  def stub(name, value):
    def f(*args, **kwargs):
      calls.append(name)
      return value
    monkeypatch.setattr(bench, name, f)
  stub("bench_layers", [])
  stub("bench_moe", {"rows": [], "crossover": {}})
  row = {"batch": 1, "seq_len": 8, "routing": "even", "experts_per_token": 4.0,
         "max_expert_share": 0.25, "batched_overflow": False, "pairs": 32,
         "capacity_pairs": 40, "overflow": False, "auto": "dense",
         **{impl: {"ms": 1.0} for impl in bench.DYNMOE_IMPLS}}
  stub("bench_dynmoe_density", [row])
  for only, want in (("layers", ["bench_layers"]),
                     ("moe", ["bench_moe", "bench_dynmoe_density"])):
    calls.clear()
    out = tmp_path / f"{only}.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
      assert bench.main(["--quick", "--only", only, "--out", str(out)]) == 0
    assert calls == want
    assert ("layers_dynmoe" in json.loads(out.read_text())) == (only == "moe")
    assert ("at the trained density" in printed.getvalue()) == (only == "moe")


def test_bad_section_is_rejected(capsys):
  assert bench.main(["--only", "train,nope"]) == 2
  assert "'nope'" in capsys.readouterr().err
  # Overrides on both sides of an option; an --out that cannot be written fails before any
  # section runs (after the first one's minutes, with a traceback, before).
  assert bench.main(["train.seed=1", "--only", "nsa", "train.nosuch=1"]) == 2
  assert "train.nosuch" in capsys.readouterr().err
  assert bench.main(["--only", "nsa", "--out", "."]) == 2
  assert capsys.readouterr().err.strip() == "bench: --out .: is a folder, not a file"


def test_nsa_kernel_check_rejects_bad_arguments_before_any_work(capsys):
  from train import nsa_kernel_check
  for args, culprit in ((["--impls", "pallas,nope"], "--impls: unknown 'nope'"),
                        (["--iters", "0"], "--iters: at least 1 timed call"),
                        (["--out", "."], "--out .: is a folder, not a file")):
    with pytest.raises(SystemExit) as exit_info:
      nsa_kernel_check.main(args)
    assert exit_info.value.code == 2 and culprit in capsys.readouterr().err


def test_a_kernel_setting_holds_for_the_whole_run_and_is_recorded(tmp_path, monkeypatch):
  """``--variant NAME``: nsa_kernel_check's setting holds while every section runs (here the
  nsa section, replaced by a probe that reads the settings), the library's defaults again
  after; the JSON's meta and the printed command name it. An unknown name exits 2 in one
  line naming it and the known ones."""
  from onn_jax.model import nsa_pallas
  from train import nsa_kernel_check as check
  names = sorted(check.VARIANTS["part_f32"])
  before = {n: getattr(nsa_pallas, n) for n in names}
  assert set(before.values()) == {"input"}  # else the probe below would prove nothing
  seen = {}

  def probe(model_cfg, sizes):
    seen.update({n: getattr(nsa_pallas, n) for n in names})
    return []
  monkeypatch.setattr(bench, "bench_nsa", probe)
  out = tmp_path / "bench.json"
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    assert bench.main(["--quick", "--only", "nsa", "--variant", "part_f32",
                       "--out", str(out)]) == 0
  assert seen == {n: "float32" for n in names}
  assert {n: getattr(nsa_pallas, n) for n in names} == before
  assert json.loads(out.read_text())["meta"]["variant"] == "part_f32"
  assert "--only nsa --variant part_f32" in printed.getvalue()
  assert "NSA kernel setting part_f32" in printed.getvalue().splitlines()[0]


def test_an_unknown_kernel_setting_is_rejected(capsys):
  assert bench.main(["--only", "nsa", "--variant", "fast"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("bench: --variant: unknown NSA kernel setting "
                                             "'fast' (known: ") and "part_f32" in err[0]


def test_train_rows_at_the_routings_asked_for(capsys):
  """``--routings``: the train section times the step at those routings only, in
  ROUTINGS_STEP's order; an unknown one is a one-line error."""
  class Runner:
    cfg = config.load("configs/arc1.yaml", list(bench.QUICK_OVERRIDES))
    profiles: dict = {}
    sizes = bench.QUICK_SIZES
    calls: list = []

    def time_step(self, kind, T, iters, packed=False, loop=False, routing="init"):
      self.calls.append((T, packed, routing))
      return bench.Timing(1.0, 10.0, 9.0, 3, 8.0), {"experts_per_token": 1.0, "loss": 2.0}
  runner = Runner()
  rows = bench.bench_train(runner, [128], None, None, bench._parse_routings(" target "))
  assert runner.calls == [(128, False, "target"), (128, True, "target")]  # arc1 packs
  assert [r["routing"] for r in rows] == ["target", "target"] and rows[0]["loop_ms"] == 8.0
  assert bench._parse_routings("") == bench.ROUTINGS_STEP
  assert bench._parse_routings("target,init") == bench.ROUTINGS_STEP
  assert bench.main(["--only", "train", "--routings", "trained"]) == 2
  err = capsys.readouterr().err
  assert err.strip() == "bench: --routings: unknown routing 'trained' (known: init, target)"


def test_bad_decoding_set_is_rejected(capsys):
  assert bench.main(["--only", "decode", "--sets", "split,fast"]) == 2
  err = capsys.readouterr().err
  assert "--sets: unknown decoding-kernel set 'fast'" in err and len(err.splitlines()) == 1
  assert bench._parse_sets(" split, fused ") == ["split", "fused"]
  assert bench._parse_sets("") is None


# ----------------------------------------------------------------------------------------------
# FLOP count
# ----------------------------------------------------------------------------------------------

FLOPS_MODEL = dict(d_model=64, num_layers=2, num_heads=4, num_kv_groups=2, head_dim=32,
                   block_len=8, block_stride=4, select_len=16, num_select=4, window=64,
                   num_experts=4, expert_hidden=128)


def test_flops_match_xla_cost_analysis():
  """At T = num_select*select_len = window the reference NSA computes exactly the keys the
  count assumes, and the dense MoE computes every expert: XLA's count of the forward pass
  must then agree, up to the elementwise work the analytic count leaves out."""
  m = config.from_dict({"model": FLOPS_MODEL}).model
  T = 64
  model = Transformer(m)
  params = jax.eval_shape(lambda: init_params(m, jax.random.PRNGKey(0)))
  fwd = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
  # The unoptimised HLO's count: no compilation needed, and fusion does not change FLOPs.
  cost = fwd.lower(params, jax.ShapeDtypeStruct((1, T), jnp.int32)).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if not cost or "flops" not in cost:
    pytest.skip("this XLA gives no flop count")
  analytic = T * bench.model_flops_per_token(m, T, m.num_experts, training=False)
  assert 1.0 <= cost["flops"] / analytic < 1.3


def test_flops_parts():
  m = config.from_dict({"model": FLOPS_MODEL}).model
  T = 256
  one = bench.forward_flops_per_token(m, T, 1.0)
  three = bench.forward_flops_per_token(m, T, 3.0)
  assert three["experts"] - one["experts"] == 2 * m.num_layers * 4 * m.d_model * m.expert_hidden
  assert one["total"] == pytest.approx(sum(v for k, v in one.items() if k != "total"))
  assert bench.model_flops_per_token(m, T, 2.0) == pytest.approx(
      3 * bench.model_flops_per_token(m, T, 2.0, training=False))
  # Beyond the window and the selected blocks, only the compressed branch grows with T.
  n = lambda t: (t - m.block_len) // m.block_stride + 1
  j = lambda t: -(-t // m.select_len)
  longer = bench.forward_flops_per_token(m, 2 * T, 1.0)
  per_layer = (m.num_heads * 4 * m.head_dim * (n(2 * T) - n(T))
               + 2 * m.num_kv_groups * (n(2 * T) * j(2 * T) - n(T) * j(T)))
  assert longer["attention"] - one["attention"] == pytest.approx(m.num_layers * per_layer)


def test_peak_flops_lookup():
  assert bench.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert bench.peak_flops("NVIDIA H100 PCIe") == 756e12
  assert bench.peak_flops("NVIDIA H200") == 989e12
  assert bench.peak_flops("cpu") is None


def test_oom_detection():
  assert bench.is_oom(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate"))
  assert not bench.is_oom(RuntimeError("INVALID_ARGUMENT: shapes differ"))


def test_synthetic_batch_masks_the_answer():
  batch = bench.synthetic_batch(3, 512)
  assert batch["inputs"].shape == (3, 512) and batch["answer_start"].shape == (3,)
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  start, length = int(batch["answer_start"][0]), int(batch["answer_len"][0])
  # Targets start - 1 .. start + length - 2 are the answer's tokens (inputs start.. shifted).
  np.testing.assert_array_equal(np.flatnonzero(batch["loss_mask"][0]),
                                np.arange(start - 1, start + length - 1))
  assert length > 0


# ----------------------------------------------------------------------------------------------
# Sparse MoE dispatch
# ----------------------------------------------------------------------------------------------

def test_density_thresholds_give_the_target_experts_per_token():
  """The layers section's DynMoE routes as a trained one: each expert active for the target
  fraction of tokens, so target * E experts per token (plus the fallback's)."""
  E, target = 16, 0.25
  x_BTC = jax.random.normal(jax.random.PRNGKey(0), (4, 256, 32))
  protos_EC = jax.random.normal(jax.random.PRNGKey(1), (E, 32))
  theta_E = bench.density_thresholds(x_BTC, protos_EC, target)
  active_NE = np.asarray(cosine_similarity(x_BTC, protos_EC) > theta_E).reshape(-1, E)
  np.testing.assert_allclose(active_NE.mean(0), target, atol=1 / active_NE.shape[0])
  assert active_NE.sum(1).mean() == pytest.approx(target * E, abs=E / active_NE.shape[0])


@pytest.mark.parametrize("packed", [False, True])
def test_target_routing_gives_every_layer_the_target_density(packed):
  """The train section's "target" routing: on the timed batch every DynMoE layer (each
  calibrated on the inputs the layers before it, already calibrated, give it) has each expert
  active for the target fraction of the real tokens, within the quantile's step (1 / N); the
  fresh parameters' layers are far from it."""
  cfg = config.load("configs/default.yaml")
  model = Transformer(cfg.model)
  params = steps.init_state(cfg, model, jax.random.PRNGKey(0)).params
  # A trained norm's scale turns its output (the experts' input) away from its input.
  for i in range(cfg.model.num_layers):
    scale = params[f"block_{i}"]["moe_norm"]["scale"]
    params[f"block_{i}"]["moe_norm"]["scale"] = jax.random.uniform(
        jax.random.PRNGKey(i), scale.shape, scale.dtype, 0.2, 3.0)
  batch = (bench.synthetic_packed_batch(4, 64, 16) if packed else bench.synthetic_batch(4, 64))
  num_real = int(np.sum(batch["valid"]))

  def active_frac(params):  # [L]: the mean over experts and real tokens of "above threshold"
    return np.asarray(model.apply({"params": params}, batch["inputs"], batch["valid"],
                                  segment_start_BT=batch.get("segment_start"))[2]["active_frac"])

  assert cfg.model.num_layers >= 2
  target = cfg.model.sdl_target_active
  np.testing.assert_allclose(active_frac(bench.target_routing(model, params, batch)),
                             target, atol=1 / num_real + 1e-6)
  assert np.all(np.abs(active_frac(params) - target) > 0.1)


def test_density_thresholds_give_each_expert_its_share():
  """The "trained" routing: each expert active for its own share of the tokens."""
  E = 16
  loads_E = bench.trained_loads(E, 0.25)
  np.testing.assert_allclose(loads_E, np.asarray(bench.TRAINED_EXPERT_LOADS) * 4 / 3.934,
                             rtol=1e-12)  # 16 experts: the measured shares, scaled to 4
  x_BTC = jax.random.normal(jax.random.PRNGKey(0), (4, 256, 32))
  protos_EC = jax.random.normal(jax.random.PRNGKey(1), (E, 32))
  theta_E = bench.density_thresholds(x_BTC, protos_EC, loads_E)
  active_NE = np.asarray(cosine_similarity(x_BTC, protos_EC) > theta_E).reshape(-1, E)
  np.testing.assert_allclose(active_NE.mean(0), loads_E, atol=1 / active_NE.shape[0])
  assert active_NE[:, -1].sum() == 0  # a share of 0: no token
  # Fewer experts: the sorted curve sampled, scaled to the target, each share at most 1.
  loads_4 = bench.trained_loads(4, 0.25)
  assert loads_4.sum() == pytest.approx(1.0) and list(loads_4) == sorted(loads_4, reverse=True)
  assert bench.trained_loads(2, 0.9).max() == 1.0


@pytest.mark.parametrize("variant", bench.SPARSE_IMPLS)
def test_sparse_dispatch_equals_dense(variant):
  """Every token counts, including one with no expert and one with all of them."""
  m = config.from_dict({"model": dict(d_model=16, num_experts=5, expert_hidden=24)}).model
  T = 40
  x_TC, params = bench.moe_inputs(m, T, seed=3)
  used_TE, _, _ = bench.synthetic_routing(T, m.num_experts, 2, seed=4)
  used_TE = used_TE.at[0].set(0.0).at[1].set(1.0)
  weights_TE = used_TE * jax.random.uniform(jax.random.PRNGKey(5), used_TE.shape)
  f = bench.moe_variants(m, jnp.float32, T * m.num_experts, tile=8,
                         precision=jax.lax.Precision.HIGHEST)[variant]
  with jax.default_matmul_precision("float32"):
    y_TC = jax.jit(f)(x_TC, weights_TE, used_TE, params)
    want_TC = experts_dense(x_TC[None], weights_TE[None], params, jnp.float32)[0]
  np.testing.assert_allclose(y_TC, want_TC, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(y_TC[0]).max()) == 0.0


def test_crossover():
  tokens = [1, 2, 4, 8]
  dense = [1.0, 1.0, 1.0, 1.0]
  assert bench.crossover(tokens, dense, [2.0, 0.5, 0.5, 0.5]) == 2
  assert bench.crossover(tokens, dense, [0.5, 2.0, 0.5, 0.5]) == 4  # faster for good from 4
  assert bench.crossover(tokens, dense, [0.5, 0.5, 0.5, 2.0]) is None
  assert bench.crossover(tokens, dense, [0.5, 0.5, 0.5, None]) is None  # e.g. out of memory


def test_nsa_kernel_check_variants_name_settings_that_exist():
  """Every ``--variants`` entry sets constants that nsa, nsa_pallas, the NSA layer's module,
  moe_pallas or decode has (a setting removed from the library would otherwise only fail on
  the GPU, mid-run)."""
  from train import nsa_kernel_check as check
  assert {m.__name__ for m in check.SETTING_MODULES} == {
      "onn_jax.model.nsa", "onn_jax.model.nsa_pallas", "onn_jax.model.attention.nsa",
      "onn_jax.model.moe_pallas", "onn_jax.decode"}
  for name, settings in check.VARIANTS.items():
    for key in settings:
      assert any(hasattr(m, key) for m in check.SETTING_MODULES), f"variant {name}: no {key}"


def test_nsa_kernel_check_takes_a_geometry_or_fails_in_one_line(capsys):
  """``--geometry`` sets the NSA geometry the GPU check times (the paper's against arc1's);
  a malformed one exits 2 naming it, before anything runs."""
  from train import nsa_kernel_check as check
  assert check.parse_geometry("32/16/64/16/512") == dict(
      block_len=32, block_stride=16, select_len=64, num_select=16, window=512)
  for bad in ("32/16/64", "32/16/64/16/x", "32/0/64/16/512", ""):
    with pytest.raises(ValueError, match="--geometry"):
      check.parse_geometry(bad)
  before = dict(check.GEO)
  with pytest.raises(SystemExit) as exit_info:
    check.main(["--geometry", "32/16", "--skip-check", "--cases", ""])
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert exit_info.value.code == 2 and "--geometry '32/16'" in err and check.GEO == before
  # A malformed case fails the same way, before the check's minutes, not after them.
  for flag in ("--cases", "--decode", "--breakdown-cases"):
    with pytest.raises(SystemExit) as exit_info:
      check.main([flag, "32by2048"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and err.endswith(f"{flag}: '32by2048' is not ROWSxTOKENS, "
                                                      "e.g. 32x2048")


def test_quick_profiles_each_step(quick):
  """--profile: every train row, the EAVI rows and every layer row carry a trace summary, and
  the traces exist (on a CPU they hold no device kernels, which the summary says)."""
  results, _ = quick
  summaries = [row["profile"] for row in results["train"]]
  summaries += [results["eavi"][0][f"profile_{name}"] for name in ("train", "eavi", "rollout")]
  summaries += [row[name]["profile"] for row in results["layers"] for name in bench.LAYERS]
  for summary in summaries:
    assert summary["wall_ms"] > 0 and summary["calls"] == 3
    assert Path(summary["trace"]).is_file()
    if jax.default_backend() == "cpu":
      assert summary["kernels_per_call"] == 0 and "no device kernels" in summary["note"]


def test_profile_summary_groups_device_kernels(tmp_path):
  """summarize: device kernels only (not host events), per call, by name and by model scope
  with layer indices folded, jit/jvp wrappers dropped and the backward marked."""
  def meta(pid, name):
    return {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}

  def kernel(pid, name, dur, op):
    return {"ph": "X", "pid": pid, "tid": 1, "ts": 0.0, "dur": dur, "name": name,
            "args": {"tf_op": op}}
  events = [meta(1, "/host:CPU"), meta(2, "/device:GPU:0 (stream)"),
            kernel(1, "host_thing", 1000.0, "jit(f)/block_0/attn"),
            kernel(2, "gemm", 10.0, "jit(train_step)/jvp(Transformer)/block_0/attn/q_proj"),
            kernel(2, "gemm", 30.0, "jit(train_step)/transpose(jvp(Transformer))/block_5/attn/"
                                    "q_proj"),
            kernel(2, "fusion_7", 20.0, "jit(train_step)/while/body/block_1/moe/gelu")]
  path = tmp_path / "perfetto_trace.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)
  got = profiling.summarize(path, calls=2)
  assert got["kernel_us_per_call"] == 30.0 and got["kernels_per_call"] == 1.5
  assert [(k["name"], k["us"], k["count"]) for k in got["by_name"]] == [("gemm", 20.0, 1.0),
                                                                        ("fusion_7", 10.0, 0.5)]
  assert got["by_name"][0]["scope"] == "block_N/attn/q_proj"  # the first event's
  assert {s["scope"]: s["us"] for s in got["by_scope"]} == {
      "bwd/block_N/attn/q_proj": 15.0, "block_N/moe/gelu": 10.0, "block_N/attn/q_proj": 5.0}
  assert profiling.summarize(None, calls=1)["note"] == "no trace written"


def test_profile_scopes_come_from_the_compiled_hlo():
  """On a GPU a kernel event's own scope field names only the module: the scope is looked up
  in the compiled program's op_name metadata by the kernel's name (fusion ``a.7`` runs as
  kernel ``a_7``), and an unknown kernel gets ``?``."""
  def f(x):
    with jax.named_scope("block_3"), jax.named_scope("mlp"):
      return jnp.tanh(x @ x) * 2.0
  compiled = jax.jit(f).lower(jnp.ones((8, 8))).compile()
  ops = profiling.op_names(compiled.as_text())
  assert ops and all("." not in name for name in ops)
  gpu_args = {"tf_op": "XlaModule:", "hlo_op": "command_buffer_1"}
  scopes = {profiling.scope_of(gpu_args, name, ops) for name in ops}
  assert any(s.startswith("block_N/mlp/") for s in scopes), scopes
  assert profiling.scope_of(gpu_args, "nvjet_gemm_kernel", ops) == "?"


def test_time_loop_queues_calls_on_the_carried_state():
  seen = []

  def step(state, batch):
    seen.append(int(state))
    return state + batch, {"loss": state}

  # Each round queues iters calls, then 2 * iters: 9 calls a round here.
  ms = bench.time_loop(step, (jnp.int32(0), jnp.int32(2)), iters=3, repeats=2)
  assert seen == list(range(0, 36, 2))  # each call on the state the last one returned
  assert math.isfinite(ms) and ms > 0
  seen.clear()
  ms = bench.time_loop(step, (jnp.int32(1), jnp.int32(2)), iters=3, repeats=2, carry=False)
  assert seen == [1] * 18  # a stateless call (a layer's fwd+bwd) takes the same args each time
  assert math.isfinite(ms) and ms > 0
  seen.clear()  # fresh: every loop (3 calls, then 6) starts from a new state, then carries it
  ms = bench.time_loop(step, (jnp.int32(5), jnp.int32(2)), iters=3, repeats=2,
                       fresh=lambda: jnp.int32(10))
  assert seen == [10, 12, 14, 10, 12, 14, 16, 18, 20] * 2


class FakeClock:
  """time.perf_counter for time_loop: a call costs ``call_s``; each wait at the end of a loop
  costs the next of ``waits_s`` (what a loop pays once, whatever its length)."""

  def __init__(self, call_s: float, waits_s):
    self.now, self.call_s, self.waits_s = 0.0, call_s, list(waits_s)

  def perf_counter(self) -> float:
    return self.now

  def call(self, *args):
    self.now += self.call_s
    return args

  def wait(self, out):
    self.now += self.waits_s.pop(0)
    return out


def test_time_loop_cancels_what_a_loop_pays_once(monkeypatch):
  # 2 s a call and 20 s at each loop's end: one loop of 4 calls alone would read 7 s a call.
  clock = FakeClock(2.0, [20.0] * 6)
  monkeypatch.setattr(bench.time, "perf_counter", clock.perf_counter)
  monkeypatch.setattr(bench.jax, "block_until_ready", clock.wait)
  assert bench.time_loop(clock.call, (1,), iters=4, repeats=3, carry=False) == 2000.0
  # A round whose longer loop was not the slower (the clock's noise) counts its mean.
  clock = FakeClock(0.0, [5.0, 4.0])
  monkeypatch.setattr(bench.time, "perf_counter", clock.perf_counter)
  monkeypatch.setattr(bench.jax, "block_until_ready", clock.wait)
  assert bench.time_loop(clock.call, (1,), iters=4, repeats=1, carry=False) == 4.0 / 8 * 1e3


def test_an_oom_queued_back_to_back_keeps_the_one_at_a_time_timing(monkeypatch):
  def out_of_memory(*args, **kwargs):
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9 GiB")

  monkeypatch.setattr(bench, "time_loop", out_of_memory)
  result = bench.measure(lambda x: x * 2, (jnp.ones(4),), bench.QUICK_SIZES, loop=True)
  assert result["ms"] > 0 and result["loop_status"] == "oom" and "loop_ms" not in result
  row = {"full": {"ms": 2.0, "loop_ms": 1.0}, "nsa": result}
  bench.add_ratios(row, ("full", "nsa"), "full", "full")
  assert bench._layer_cell(row["nsa"]).endswith("x); loop oom")


def test_layer_cells_show_both_timings_and_ratios():
  row = {"full": {"ms": 2.0, "loop_ms": 1.0}, "nsa": {"ms": 4.0, "loop_ms": 3.0},
         "dynmoe": {"status": "oom"}}
  bench.add_ratios(row, ("full", "nsa", "dynmoe"), "full", "full")
  assert row["nsa"]["ratio_to_full"] == 2.0 and row["nsa"]["loop_ratio_to_full"] == 3.0
  assert "ratio_to_full" not in row["dynmoe"]
  assert bench._layer_cell(row["nsa"]) == "4 (2.00x); loop 3 (3.00x)"
  assert bench._layer_cell(row["dynmoe"]) == "oom"
  assert bench._layer_cell({"ms": 5.0}) == "5"


def test_nsa_kernel_check_times_decoding_variants(tmp_path, capsys):
  """``--decode`` with ``--decode-calls`` and the decoding variants (interpret mode here): a
  row per case, each variant timed per call; variants decoding does not take are left out.
  Without a GPU the check says first, in one line, that its kernels are interpreted."""
  from train import nsa_kernel_check as check
  out = tmp_path / "check.json"
  check.main(["--skip-check", "--cases", "", "--impls", "pallas", "--decode", "2x64",
              "--decode-calls", "2", "--iters", "1", "--out", str(out),
              "--variants", "dec_split,dec_w4_t16,win_w8"])
  said = [line for line in capsys.readouterr().err.splitlines() if "nsa_kernel_check" in line]
  assert said == ["nsa_kernel_check: no GPU (cpu): the Pallas kernels run in interpret mode, "
                  "the checks take minutes and the timings mean nothing"]
  row = json.loads(out.read_text())["decode"][0]
  assert (row["B"], row["S"], row["calls"]) == (2, 64, 2)
  names = {k for k in row if k.startswith("pallas")}
  assert names == {"pallas", "pallas[dec_split]", "pallas[dec_w4_t16]"}
  for name in names:
    assert row[name]["ms_per_call"] == pytest.approx(row[name]["ms"] / 2)
  offsets = np.asarray(check.decode_offsets(2, 64, 3))
  assert offsets.shape == (3, 2) and offsets.min() >= 32 and offsets.max() <= 63
  assert len(set(offsets.ravel().tolist())) == 6  # a position for each row and call
