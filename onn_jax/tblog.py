"""Optional live metrics for TensorBoard (``log.tensorboard=true``), beside metrics.jsonl.

Written with tensorboardX (``pip install tensorboardX``; in a clone ``pip install -e
".[tensorboard]"``): no TensorFlow needed. Every numeric scalar of a logged step becomes
``train/<key>`` at that step; lists (tokens per expert) and events stay in metrics.jsonl only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from onn_jax import output
from onn_jax.config import Config, ConfigError


class _Off:
  def write(self, record: dict[str, Any]) -> None:
    pass

  def close(self) -> None:
    pass


class TensorBoardWriter:
  """Scalars of metric records to a TensorBoard event file in ``log_dir``."""

  def __init__(self, log_dir: Path, summary_writer_cls, after: int = 0):
    # A resumed run redoes the steps after its checkpoint: TensorBoard drops what an earlier
    # process logged from there (as metrics.jsonl is cut there), instead of showing them twice.
    kwargs = {"purge_step": after + 1} if after else {}
    self._writer = summary_writer_cls(str(log_dir), **kwargs)

  def write(self, record: dict[str, Any]) -> None:
    # The training loop's metrics are 0-d arrays (host copies of device values): as numbers.
    record = output.jsonable(record)
    step = record.get("step")
    if "event" in record or not isinstance(step, int):
      return
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
          and math.isfinite(value):
        self._writer.add_scalar(f"train/{key}", float(value), step)
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def check_available(cfg: Config) -> None:
  """Raises ConfigError (one line) when ``log.tensorboard`` is on without tensorboardX."""
  if not cfg.log.tensorboard:
    return
  try:
    import tensorboardX  # noqa: F401
  except ImportError:
    raise ConfigError('log.tensorboard=true needs tensorboardX: pip install tensorboardX (in '
                      'a clone: pip install -e ".[tensorboard]"), or set log.tensorboard=false'
                      ) from None


def open_writer(cfg: Config, workdir: Path, enabled: bool, after: int = 0):
  """A writer to ``workdir/tensorboard`` when ``log.tensorboard`` is on (and ``enabled``: the
  main process), else one that does nothing; ``after``: the step a resumed run goes on from
  (what was logged past it is purged)."""
  if not (cfg.log.tensorboard and enabled):
    return _Off()
  check_available(cfg)
  from tensorboardX import SummaryWriter
  return TensorBoardWriter(Path(workdir) / "tensorboard", SummaryWriter, after)
