"""What a run tells its user: the platform line, the bf16-on-CPU warning, TensorBoard scalars."""

from __future__ import annotations

import sys
import types

import jax
import numpy as np
import pytest

from onn_jax import config, parallel, tblog

from conftest import tiny_config


def test_platform_line_names_the_device_and_warns_for_bf16_on_cpu():
  line, warning = parallel.platform_line(tiny_config())
  device = jax.devices()[0]
  assert line.startswith(f"{device.platform} ({device.device_kind}) x ") and warning is None
  _, warning = parallel.platform_line(tiny_config(model=dict(compute_dtype="bfloat16")))
  assert (warning is not None) == (device.platform == "cpu")
  if warning:
    assert "\n" not in warning and "bfloat16" in warning


def test_tensorboard_is_off_by_default_and_one_line_without_tensorboardx(monkeypatch, tmp_path):
  cfg = tiny_config()
  assert cfg.log.tensorboard is False
  tblog.open_writer(cfg, tmp_path, True).write({"step": 1, "loss": 1.0})  # does nothing
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import raises ImportError
  on = config.replace(cfg, log={"tensorboard": True})
  with pytest.raises(config.ConfigError, match=r"^log\.tensorboard=true needs tensorboardX"):
    tblog.check_available(on)


def test_tensorboard_writer_gets_the_numeric_scalars(monkeypatch, tmp_path):
  written = []

  class FakeWriter:
    def __init__(self, log_dir):
      written.append(("dir", log_dir))

    def add_scalar(self, tag, value, step):
      written.append((tag, value, step))

    def flush(self):
      pass

    def close(self):
      written.append(("closed",))

  monkeypatch.setitem(sys.modules, "tensorboardX", types.SimpleNamespace(SummaryWriter=FakeWriter))
  writer = tblog.open_writer(tiny_config(log=dict(tensorboard=True)), tmp_path, True)
  # As the training loop hands them over: device values copied to the host as 0-d arrays.
  writer.write({"step": 3, "stage": "eavi", "loss": np.asarray(1.5, np.float32),
                "skipped": np.asarray(0, np.int32), "lr": np.asarray(np.nan, np.float32),
                "tokens_per_expert": np.asarray([[1, 2]]), "ok": True})
  writer.write({"event": "reset", "step": 4, "layer": 0, "experts": [1]})
  writer.close()
  assert written == [("dir", str(tmp_path / "tensorboard")), ("train/loss", 1.5, 3),
                     ("train/skipped", 0.0, 3), ("closed",)]


def test_a_resumed_run_purges_what_tensorboard_got_past_its_checkpoint(monkeypatch, tmp_path):
  """Resumed at step N, the run redoes steps N+1...: TensorBoard drops what the earlier
  process logged from N+1 on (each step was shown twice), as metrics.jsonl is cut at N."""
  made = []
  monkeypatch.setitem(sys.modules, "tensorboardX", types.SimpleNamespace(
      SummaryWriter=lambda log_dir, **kwargs: made.append(kwargs)))
  on = tiny_config(log=dict(tensorboard=True))
  tblog.open_writer(on, tmp_path, True)
  tblog.open_writer(on, tmp_path, True, after=24)
  assert made == [{}, {"purge_step": 25}]
