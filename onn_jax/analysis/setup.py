"""Notebook set-up: sizes per notebook, configs, tables, inline pictures, task batches."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from onn_jax import config, plots
from onn_jax.config import Config
from onn_jax.data.pipeline import collate
from onn_jax.data.serialize import fit
from onn_jax.data.tasks import Task

TINY_ENV = "ONN_JAX_NOTEBOOK_TINY"
NOTEBOOKS = ("quickstart", "eavi", "experts")

# Seconds-sized runs for the test that executes every notebook. The three notebooks share the
# model, data and teacher-forcing schedule, so one persistent compilation cache serves them all.
TINY_OVERRIDES: tuple[str, ...] = (
    "model.d_model=32", "model.num_heads=4", "model.num_kv_groups=2", "model.head_dim=8",
    "model.block_len=8", "model.block_stride=4", "model.select_len=8", "model.num_select=3",
    "model.window=16", "model.num_experts=4", "model.expert_hidden=32",
    "data.max_grid=4", "data.buckets=[128]",
    "train.batch_size=4", "train.pretrain_steps=4", "train.eavi_steps=0", "train.warmup_steps=1",
    "train.log_every=2",
    "checkpoint.every=100", "checkpoint.async_save=false",
    "eval.max_tasks=2", "eval.batch_size=8", "eval.sheet_tasks=2",
)
# Per notebook: (few-minute CPU sizes on top of configs/default.yaml, additions to the tiny
# sizes). The quick start is the default run itself.
NOTEBOOK_SIZES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "quickstart": ((), ()),
    # The notebook runs the two stages separately: eavi_steps is the length of the second.
    "eavi": (("train.pretrain_steps=200", "train.eavi_steps=20", "eavi.warmup_steps=2"),
             ("train.eavi_steps=2", "eavi.warmup_steps=1")),
    "experts": (("train.pretrain_steps=200", "train.eavi_steps=0", "train.reset_every=50"),
                ("train.reset_every=2",)),
}


# ----------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------

def is_tiny() -> bool:
  """Whether ``ONN_JAX_NOTEBOOK_TINY`` asks for tiny sizes (``1``, ``true`` or ``yes``)."""
  return os.environ.get(TINY_ENV, "").strip().lower() in ("1", "true", "yes")


def notebook_overrides(notebook: str, tiny: bool | None = None) -> list[str]:
  """Dotted ``section.key=value`` overrides for one notebook, applied on configs/default.yaml.

  ``tiny`` (default: :func:`is_tiny`) gives a run of a few seconds (the notebook test);
  otherwise the CPU sizes of a few minutes.
  """
  if notebook not in NOTEBOOK_SIZES:
    raise ValueError(f"notebook {notebook!r}: expected one of {', '.join(NOTEBOOKS)}")
  full, tiny_extra = NOTEBOOK_SIZES[notebook]
  if is_tiny() if tiny is None else tiny:
    return list(TINY_OVERRIDES + tiny_extra)
  return list(full)


def load_config(name: str | Path = "default", overrides: Sequence[str] = ()) -> Config:
  """A validated config: a shipped config's name (``default``, ``arc1``, ``arc2``; they are
  installed with the package) or a YAML path, with ``overrides``."""
  return config.load(name, overrides)


def show(*paths: str | Path) -> None:
  """Displays PNG files inline in a notebook; outside IPython prints their paths."""
  try:
    from IPython import get_ipython
    from IPython.display import Image, display
  except ImportError:
    get_ipython = None
  if get_ipython is None or get_ipython() is None:
    for path in paths:
      print(path)
    return
  for path in paths:
    display(Image(filename=str(path)))


def draw_tasks(tasks: Iterable[Task], out_dir: str | Path) -> list[Path]:
  """One PNG per task (every demonstration and test pair) in ``out_dir``; returns the paths."""
  out_dir = Path(out_dir)
  return [plots.render_task(task, out_dir / f"task_{task.id}.png") for task in tasks]


def _cell(value: Any) -> str:
  if value is None:
    return "-"
  if isinstance(value, (float, np.floating)):
    return f"{float(value):.4g}"
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return _cell(value.item())
  return str(value)


def format_table(records: Sequence[dict], keys: Sequence[str]) -> str:
  """A plain-text table of ``records`` (one row each) over ``keys``; missing values print as
  ``-``, floats with 4 significant digits."""
  rows = [[str(k) for k in keys]] + [[_cell(r.get(k)) for k in keys] for r in records]
  widths = [max(len(row[c]) for row in rows) for c in range(len(keys))]
  lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Free running
# ----------------------------------------------------------------------------------------------

def task_batch(tasks: Sequence[Task], cfg: Config) -> tuple[dict[str, np.ndarray],
                                                              list[tuple[str, int]]]:
  """Every (task, test input) with a known output, serialised as in training but with no
  augmentation (identity view, demos in order; trailing demos dropped until the sequence fits
  the longest bucket ``T = data.buckets[-1]``), collated into one batch of width T.

  Returns (batch as from :func:`onn_jax.data.pipeline.collate`, [(task id, test index)] per
  row). Items that do not fit even with one demo are left out.
  """
  length = cfg.data.buckets[-1]
  examples, items = [], []
  for task in tasks:
    for t, (test_input, target) in enumerate(task.test):
      if target is None:
        continue
      example = fit(task.train, test_input, target, length + 1, task_id=task.id, test_index=t)
      if example is not None:
        examples.append(example)
        items.append((task.id, t))
  if not examples:
    raise ValueError(f"no test pair with a known output fits data.buckets[-1]={length} "
                     f"({len(tasks)} tasks)")
  return collate(examples, length), items
