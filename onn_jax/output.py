"""What the library writes for people and files: figures, progress bars, strict JSON."""

from __future__ import annotations

import functools
import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np


def figure(figsize: tuple[float, float]):
  """A stand-alone Figure drawn by the Agg canvas: no pyplot, so no global backend switch
  (a notebook's inline backend is left alone) and nothing to close."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=figsize)
  FigureCanvasAgg(fig)
  return fig


def progress(total: int, desc: str, *, enabled: bool = True, **kwargs):
  """A tqdm bar (console or notebook); a silent one (every call a no-op) when not
  ``enabled``, e.g. on processes other than 0. Written to a log file (stderr not a terminal),
  a bar is redrawn at most every 30 s (unless refreshed by its caller) and ends its line
  when it closes, so that the next line (an evaluation's summary) starts a line of its own."""
  import sys
  from tqdm.auto import tqdm
  notebook = any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__)
  if not notebook and not getattr(sys.stderr, "isatty", lambda: False)():
    every = max(kwargs.get("mininterval", 0.1), 30.0)
    kwargs = {**kwargs, "leave": True, "mininterval": every,
              "maxinterval": max(kwargs.get("maxinterval", 10.0), every)}
  return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, **kwargs)


def say(line: str) -> None:
  """``print`` for a line that may come while a progress bar is open (a background
  compilation ending mid-evaluation): the bar is cleared, the line printed on its own, the
  bar drawn again (it started mid-line after the bar's text before)."""
  from tqdm.auto import tqdm
  tqdm.write(line)


def jsonable(x: Any) -> Any:
  """``x`` with arrays as lists, numpy scalars as Python numbers and non-finite floats as None
  (strict JSON has no spelling for NaN or infinity: a diverged loss is written as null)."""
  if isinstance(x, dict):
    return {k: jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if hasattr(x, "__array__") and not isinstance(x, (str, bytes)):
    x = np.asarray(x)
    return jsonable(x.tolist()) if x.ndim else jsonable(x.item())
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (np.integer, int)):
    return int(x)
  if isinstance(x, (np.floating, float)):
    return float(x) if math.isfinite(float(x)) else None
  return x


@functools.lru_cache(maxsize=1)
def code_version() -> str:
  """A fingerprint of this library: the first 12 hex digits of the SHA-256 of its package's
  source and config files (``onn_jax/**/*.py`` and ``*.yaml``; each relative path and its
  bytes, in path order), read once a process. Files one version writes (an EAVI study's runs
  and calibration) can then tell another version's."""
  root = Path(__file__).resolve().parent
  digest = hashlib.sha256()
  for path in sorted([*root.rglob("*.py"), *root.rglob("*.yaml")]):
    digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
  return digest.hexdigest()[:12]
