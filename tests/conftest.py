"""Shared fixtures: tiny configs, so every test compiles in seconds on a 2-core CPU."""

from __future__ import annotations

import importlib.metadata
import math
import os
import re
import subprocess
import sys

# A persistent compilation cache shared by this process and the subprocesses some tests start:
# identical step functions compile once per suite instead of once per Runner or process. Every
# program is kept: with the fast-compile flags below most compile in under half a second. A run
# with the cache filled took 9.0 minutes, against 11.6 keeping only those over 0.5 s.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.environ.get("TMPDIR", "/tmp"), "onn-jax-test-jit-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# XLA without most optimisations: a cold run of the suite on a 2-core CPU is ~80% compilation,
# and every comparison in it runs both sides under the same flag. Inherited by the programs
# some tests start. JAX_DISABLE_MOST_OPTIMIZATIONS=0 compiles as users do.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# XLA:CPU compiles about 2x faster with these (2-core AMD EPYC, jax 0.10.2, an empty cache:
# test_train.py::test_ema_is_the_bias_corrected_average_of_the_steps 43 s -> 21 s), and a cold
# run of the suite is mostly compilation. The legacy loop emitters and the fast-compile preset
# change the generated code, not what it computes; one LLVM module per program (rather than 32
# compiled in parallel) suits two xdist workers on two cores. Each flag is used only where this
# jax's XLA lists it (an unknown flag in XLA_FLAGS aborts the process).
FAST_CPU_COMPILE_FLAGS = ("--xla_cpu_use_fusion_emitters=false",
                          "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_COMPILE",
                          "--xla_cpu_parallel_codegen_split_count=1")
# Not the fast-compile preset from jax 0.12 on: there (Python 3.12.1, jax 0.12.0.1, 2026-12-03
# and -04) a pytest process that had compiled a few hundred programs under it failed to
# serialise one for the persistent cache ("Failed to materialize symbols" in XLA:CPU's JIT
# library) and died unwinding that error (README Package map): every cold run with the preset
# died so (three whole suites; four runs of one worker's files in one process, one of them
# without the split count), and the same files without the preset passed. jax 0.10 and 0.11
# keep it (CI's suites; 0.11.2 on an Intel Xeon with 8 workers passed too).
PRESET_FLAG_UNTIL = (0, 12)


def release(version: str) -> tuple[int, ...]:
  """``"0.12.0.1"`` -> ``(0, 12, 0, 1)`` (the numeric fields of a version string)."""
  return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:4])


def fast_compile_flags(known: set[str], jax_version: str) -> list[str]:
  """The flags of FAST_CPU_COMPILE_FLAGS this XLA knows (``known``) and this jax keeps."""
  keep = [f for f in FAST_CPU_COMPILE_FLAGS if f.split("=")[0] in known]
  if release(jax_version) >= PRESET_FLAG_UNTIL:
    keep = [f for f in keep if not f.startswith("--xla_cpu_opt_preset=")]
  return keep


def known_xla_flags() -> set[str]:
  """The flag names this process's XLA accepts (``XLA_FLAGS=--help`` in a child process)."""
  listed = subprocess.run([sys.executable, "-c", "import jax; jax.devices('cpu')"],
                          env={**os.environ, "XLA_FLAGS": "--help"}, capture_output=True,
                          text=True, timeout=120)
  return set(re.findall(r"^\s*(--xla_\w+)=", listed.stdout + listed.stderr, re.MULTILINE))


DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def with_flags(given: str, ours: list[str]) -> str:
  """``given`` (XLA_FLAGS as found, e.g. a user's own) with each of ``ours`` whose name it does
  not set: the user's flags first and kept as they are."""
  names = {f.split("=")[0] for f in given.split()}
  return " ".join([*given.split(), *(f for f in ours if f.split("=")[0] not in names)])


def suite_xla_flags(given: str) -> str:
  """XLA_FLAGS for this suite: ``given``'s flags, plus eight host devices for the
  data-parallel tests and, unless JAX_DISABLE_MOST_OPTIMIZATIONS=0 (compile as users do), the
  fast-compile flags this XLA knows, where ``given`` does not set them; ``given`` as it is when
  it sets the device count (the process that started this one did, e.g. for the xdist
  workers, or the user did). Until 2026-12-04 a user's own XLA_FLAGS replaced all of them:
  one host device, and 11 data-parallel tests failed."""
  if DEVICE_COUNT_FLAG in {f.split("=")[0] for f in given.split()}:
    return given
  ours = [f"{DEVICE_COUNT_FLAG}=8"]
  if os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] != "0":
    ours += fast_compile_flags(known_xla_flags(), importlib.metadata.version("jax"))
  return with_flags(given, ours)


# Must be set before jax initialises; the xdist workers and the programs some tests start
# inherit it from the process that set it first.
os.environ["XLA_FLAGS"] = suite_xla_flags(os.environ.get("XLA_FLAGS", ""))


def xla_flags_with_devices(count: int) -> str:
  """This suite's XLA_FLAGS with ``count`` host devices instead of eight, for a program a test
  starts (the other flags kept)."""
  rest = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if not f.startswith(DEVICE_COUNT_FLAG + "=")]
  return " ".join([f"{DEVICE_COUNT_FLAG}={count}", *rest])


import jax  # noqa: E402
import pytest  # noqa: E402

from onn_jax import config, steps  # noqa: E402

# CPU unless asked otherwise (ONN_JAX_TEST_PLATFORMS=cuda runs the numeric tests on a GPU).
jax.config.update("jax_platforms", os.environ.get("ONN_JAX_TEST_PLATFORMS", "cpu"))

TINY_MODEL = dict(d_model=32, num_layers=2, num_heads=4, num_kv_groups=2, head_dim=8,
                  block_len=8, block_stride=4, select_len=8, num_select=3, window=12,
                  num_experts=4, expert_hidden=32)


# The layers of tiny_config's model. One layer compiles in about half the time of two, and a
# cold run of the suite is mostly compilation (session 44: 10.3 minutes against 12.0 on 2 cores).
# What depends on more than one layer asks for two: TINY_MODEL keeps them (the decoding-against-
# forward tests, whose caches are per layer), and so do test_attention's variants, the expert
# reset tests and two EAVI tests whose premise an untrained model's two layers give.
TINY_CONFIG_LAYERS = 1


def tiny_config(**sections) -> config.Config:
  values = {
      "model": dict(TINY_MODEL, num_layers=TINY_CONFIG_LAYERS),
      "data": dict(train="arc-agi-1:training", eval="arc-agi-1:evaluation", max_grid=5,
                   buckets=[128, 256], max_train_tasks=40),
      "train": dict(batch_size=8, pretrain_steps=4, eavi_steps=0, warmup_steps=1, log_every=2),
      "checkpoint": dict(every=2, async_save=False),
      "eval": dict(max_tasks=2, batch_size=8, mode="greedy"),
      # The suite forces 8 host devices; tests of data parallelism ask for it explicitly.
      "parallel": dict(mode="single"),
  }
  for section, changes in sections.items():
    values.setdefault(section, {}).update(changes)
  return config.from_dict(values)


@pytest.fixture(scope="session")
def tiny_cfg() -> config.Config:
  return tiny_config()


def adam_ratio_bound(t: int, b1: float, b2: float) -> float:
  """Largest |m_hat / sqrt(v_hat)| Adam can produce at step ``t`` (1-based), for any gradients.

  By Cauchy-Schwarz, (sum_i a_i |g_i|)^2 <= sum_i a_i^2 / c_i * sum_i c_i g_i^2 with
  a_i = (1-b1) b1^(t-i), c_i = (1-b2) b2^(t-i); with the bias corrections this is
  sqrt((1-b2^t) / (1-b1^t)^2 * (1-b1)^2 / (1-b2) * sum_{k<t} (b1^2/b2)^k). It is 1 at t=1.
  """
  r = b1 * b1 / b2
  geometric = sum(r ** k for k in range(t))
  return math.sqrt((1 - b2 ** t) / (1 - b1 ** t) ** 2 * (1 - b1) ** 2 / (1 - b2) * geometric)


def param_bound(cfg, num_steps: int) -> float:
  """How far one parameter can drift between two modes after ``num_steps`` AdamW steps.

  Adam divides the first moment by the root of the second: where a gradient entry is at the
  rounding level (a bias the softmax ignores, an expert that saw almost no tokens), the two
  modes' rounding differences decide the sign of the update, so that entry may move by
  lr_s * adam_ratio_bound(s) in opposite directions in the two runs at every step s (weight
  decay only shrinks a difference). Entries with real gradients agree far more tightly; the
  loss curves compared at RTOL catch any real divergence of the parameters (a wrong update of
  many entries changes the next loss by about lr * sum|g|, far above rounding).
  """
  lr = steps.learning_rate_schedule(cfg)
  t = cfg.train
  return sum(2 * float(lr(s)) * adam_ratio_bound(s + 1, t.b1, t.b2) for s in range(num_steps))


def assert_moments_close(actual, expected, what: str, rtol: float = 1e-5, atol: float = 1e-6):
  """Optimizer moments (or any gradient sums) of two runs that reduce in another order: their
  rounding is relative to each leaf's scale (its largest entry), not to each entry, so a
  near-zero entry gets the leaf's atol. (After one Adam step the parameters cannot show a
  wrong gradient: every entry moves by about lr either way; the moments can.)"""
  import numpy as np
  np.testing.assert_equal(jax.tree.structure(actual), jax.tree.structure(expected))
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(actual)[0],
                          jax.tree.leaves(expected)):
    y = np.asarray(y)
    scale = float(np.max(np.abs(y), initial=0.0)) if y.dtype.kind == "f" else 0.0
    np.testing.assert_allclose(np.asarray(x), y, rtol=rtol, atol=atol + rtol * scale,
                               err_msg=what + jax.tree_util.keystr(path))
