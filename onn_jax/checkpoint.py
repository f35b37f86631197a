"""Orbax checkpoints: the whole train state plus a small JSON record, keep-last-N, async."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint is missing or does not fit the model. The message names the path."""


def manager(directory: str | Path, keep: int = 3, async_save: bool = True
            ) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                         enable_async_checkpointing=async_save, create=True)
  return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, record: dict) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          record=ocp.args.JsonSave(record)), force=True)


def _abstract(tree):
  def spec(x):
    x = jax.numpy.asarray(x) if isinstance(x, np.ndarray) else x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
  return jax.tree.map(spec, tree)


def restore(mngr: ocp.CheckpointManager, target: Any, step: int | None = None
            ) -> tuple[Any, dict]:
  """Restores the latest (or given) step into the structure, shapes and shardings of
  ``target``; returns ``(state, record)``."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"{mngr.directory}: no checkpoint to restore")
  try:
    out = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(target)), record=ocp.args.JsonRestore()))
  except ValueError as err:  # Orbax: the saved tree has other leaves or shapes
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    raise CheckpointError(
        f"{mngr.directory} step {step}: the saved state does not fit this run's state (an "
        f"older layout or another model/EMA setting; train.init_from takes only its "
        f"parameters): {first}") from err
  return out["state"], dict(out["record"] or {})


def find_checkpoint_dir(path: str | Path) -> Path:
  """Accepts a run folder (holding ``checkpoints/``) or the checkpoints folder itself."""
  path = Path(path)
  if (path / "checkpoints").is_dir():
    path = path / "checkpoints"
  if not path.is_dir():
    raise CheckpointError(f"{path}: checkpoint folder not found")
  return path


def load_params(path: str | Path, target_params: Any, *, prefer_ema: bool = True
                ) -> tuple[Any, dict]:
  """Parameters (only) of another run's latest checkpoint, checked against ``target_params``.

  With ``prefer_ema`` the parameter EMA is taken when the run kept one (what the run's own
  evaluation used); ``record["weights"]`` says which. Raises CheckpointError naming the path
  on any mismatch.
  """
  directory = find_checkpoint_dir(path)
  mngr = manager(directory, async_save=False)
  try:
    step = mngr.latest_step()
    if step is None:
      raise CheckpointError(f"{directory}: holds no checkpoint")
    out = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), record=ocp.args.JsonRestore()))
  finally:
    mngr.close()
  saved = out["state"]
  record = dict(out["record"] or {})
  ema = saved.get("ema") if isinstance(saved, dict) else None
  use_ema = prefer_ema and bool(ema) and bool(jax.tree.leaves(ema))
  params = ema if use_ema else saved["params"]
  record["weights"] = "ema" if use_ema else "params"
  want = jax.tree_util.tree_structure(target_params)
  got = jax.tree_util.tree_structure(params)
  if want != got:
    raise CheckpointError(f"{directory}: parameters do not match this model's structure "
                          "(different model config?)")
  for (path_, a), b in zip(jax.tree_util.tree_flatten_with_path(target_params)[0],
                           jax.tree.leaves(params)):
    if a.shape != b.shape:
      raise CheckpointError(f"{directory}: parameter {jax.tree_util.keystr(path_)} has shape "
                            f"{b.shape}, the model expects {a.shape}")
  params = jax.tree.map(lambda a, b: jax.numpy.asarray(b, a.dtype), target_params, params)
  return params, record
