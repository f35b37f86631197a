"""Orbax checkpoints: the whole train state plus a small JSON record, keep-last-N, async.

A checkpoint that cannot be read (a truncated or bit-flipped file, a missing item) is
*damaged*: restoring falls back to the newest intact one and says so. One that reads but whose
tree or shapes differ from the model's does *not fit*: that is a CheckpointError, never skipped.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from onn_jax.parallel import host_value


class CheckpointError(RuntimeError):
  """A checkpoint is missing or does not fit the model. The message names the path."""


class _Damaged(Exception):
  """One step's checkpoint cannot be read back as written; the message says why."""


def manager(directory: str | Path, keep: int = 3, async_save: bool = True, *,
            cleanup: bool = False) -> ocp.CheckpointManager:
  """``cleanup``: remove half-written folders of saves cut short by a kill (only for the run
  that owns the folder: a reader must not delete a live run's save in progress)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                         enable_async_checkpointing=async_save, create=True,
                                         cleanup_tmp_directories=cleanup)
  return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def _host_leaves(state: Any) -> list[tuple[str, np.ndarray]]:
  """Every leaf on the host, by path ("params/...") in path order (so a dataclass state and
  the nested dicts a checkpoint reads back agree)."""
  return [("/".join(key), np.ascontiguousarray(host_value(leaf))) for key, leaf in sorted(
      (_leaf_key(p), x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0])]


def _digest(leaves: list[tuple[str, np.ndarray]]) -> str:
  """CRC-32 of every leaf's path and bytes, in path order: a restored state that differs is
  damaged."""
  crc = 0
  for key, value in leaves:
    crc = zlib.crc32(key.encode(), crc)
    crc = zlib.crc32(value.tobytes(), crc)
  return f"{crc:08x}"


def _non_finite(leaves: list[tuple[str, np.ndarray]]) -> str | None:
  """The path of the first floating-point leaf holding a NaN or an infinity, or None."""
  return next((key for key, value in leaves if jax.numpy.issubdtype(value.dtype,
               jax.numpy.inexact) and not np.isfinite(value).all()), None)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, record: dict) -> None:
  """Saves ``state`` and ``record`` (plus the state's digest) at ``step``. A state holding
  non-finite values is not written (CheckpointError naming the leaf): it could never be
  restored, and written it would push an intact checkpoint out of the kept ones."""
  leaves = _host_leaves(state)
  bad = _non_finite(leaves)
  if bad is not None:
    raise CheckpointError(f"the state at step {step} holds non-finite values in {bad}; not "
                          f"checkpointed (the checkpoints in {mngr.directory} are kept)")
  record = {**record, "digest": _digest(leaves)}
  with _said_save_failure(mngr, f"saving step {step}"):  # (or an earlier async save's failure)
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            record=ocp.args.JsonSave(record)), force=True)


def wait_until_saved(mngr: ocp.CheckpointManager) -> None:
  """Waits for the asynchronous saves in flight; a failed one is a CheckpointError in one line."""
  with _said_save_failure(mngr, "a checkpoint save"):
    mngr.wait_until_finished()


@contextlib.contextmanager
def _said_save_failure(mngr: ocp.CheckpointManager, what: str):
  """An operating-system error of a save (a full disk, a folder made read-only mid-run) as one
  line naming the folder, instead of Orbax's traceback."""
  try:
    yield
  except (OSError, ValueError) as err:  # TensorStore's I/O errors are ValueErrors
    why = (err.strerror if isinstance(err, OSError) else None) or _first_line(err)
    raise CheckpointError(f"{mngr.directory}: {what} failed ({why}); the checkpoints written "
                          "before it stand") from None


def _abstract(tree):
  def spec(x):
    x = jax.numpy.asarray(x) if isinstance(x, np.ndarray) else x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
  return jax.tree.map(spec, tree)


def _first_line(err: BaseException, limit: int = 160) -> str:
  text = str(err).strip()
  line = text.splitlines()[0] if text else type(err).__name__
  return line if len(line) <= limit else line[:limit] + "..."


def _leaf_key(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _saved_tree(directory: Path, step: int) -> Any:
  """The step's saved state tree (ArrayMetadata leaves); _Damaged when it cannot be read."""
  try:
    meta = ocp.PyTreeCheckpointHandler().metadata(directory / str(step) / "state")
    return meta.tree if hasattr(meta, "tree") else meta
  except Exception as err:  # noqa: BLE001 -- any failure to read the tree is damage
    raise _Damaged(f"its tree metadata cannot be read: {_first_line(err)}") from err


def _check_fits(saved: Any, target: Any, where: str, what: str) -> None:
  """CheckpointError naming the first leaf of ``target`` the saved tree lacks or shapes
  otherwise (or the first saved leaf the target lacks)."""
  got = {_leaf_key(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(saved)[0]}
  want = {_leaf_key(p): tuple(np.shape(x))
          for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
  for key, shape in want.items():
    if key not in got or got[key] != shape:
      found = "is missing" if key not in got else f"has shape {got[key]}"
      raise CheckpointError(
          f"{where}: the saved state does not fit this run's: {what} {'/'.join(key)} {found}, "
          f"this run expects {shape} (an older layout or another model/EMA setting; "
          "train.init_from takes only its parameters)")
  extra = sorted(set(got) - set(want))
  if extra:
    raise CheckpointError(f"{where}: the saved state does not fit this run's: {what} holds "
                          f"{'/'.join(extra[0])}, which this run has not (another model/EMA "
                          "setting?)")


# A damaged step's restore fails on its first bad read; Orbax's other reads of the step, still
# pending when its event loop closes, then fail one by one, later and from other threads:
# their callbacks on the closed loop, their coroutines and tasks garbage-collected with
# errors never retrieved. Python prints each (~60 lines with the TensorStore spec); a
# truncated array file left ~9,500 lines around the restore's one-line warning (2026-12-07,
# orbax-checkpoint 0.12.8, tensorstore 0.1.86). From a process's first restore on, these
# kinds are dropped; every other unraisable error, log record and warning passes as before.
_ORBAX_SOURCE = f"{Path('orbax') / 'checkpoint'}"
_ORBAX_READS = ("_read_array_index_and_device_put", "async_deserialize")  # its read coroutines


def _codes(tb) -> list:
  """The code objects of a traceback's frames, outermost first."""
  codes = []
  while tb is not None:
    codes.append(tb.tb_frame.f_code)
    tb = tb.tb_next
  return codes


def _abandoned_read(unraisable) -> bool:
  """An unraisable error of an abandoned read: an Orbax read coroutine's, or a callback's on a
  closed event loop (no object; raised by asyncio's loop check)."""
  code = getattr(unraisable.object, "cr_code", None)
  if code is not None:
    return _ORBAX_SOURCE in code.co_filename and code.co_name in _ORBAX_READS
  codes = _codes(unraisable.exc_traceback)
  return (unraisable.object is None and bool(codes) and codes[-1].co_name == "_check_closed"
          and str(unraisable.exc_value) == "Event loop is closed")


def _drop_abandoned_reads(unraisable) -> None:
  """``sys.unraisablehook`` from a process's first restore on (see _ORBAX_SOURCE)."""
  if not _abandoned_read(unraisable):
    _drop_abandoned_reads.previous(unraisable)


def _not_an_abandoned_task(record: logging.LogRecord) -> bool:
  """Filter of asyncio's log: False for a task or future of Orbax's reads garbage-collected
  with its error never retrieved (raised in Orbax's code, or TensorStore's read of the step's
  OCDBT database)."""
  text = record.getMessage()
  if "exception was never retrieved" not in text:
    return True
  codes = _codes(record.exc_info[2]) if record.exc_info else []
  return not ("in OCDBT database" in text
              or any(_ORBAX_SOURCE in c.co_filename for c in codes))


def _quiet_abandoned_reads() -> None:
  if sys.unraisablehook is not _drop_abandoned_reads:
    _drop_abandoned_reads.previous = sys.unraisablehook
    sys.unraisablehook = _drop_abandoned_reads
  logging.getLogger("asyncio").addFilter(_not_an_abandoned_task)  # once: addFilter dedups
  warnings.filterwarnings("ignore", f"coroutine '({'|'.join(_ORBAX_READS)})' was never awaited",
                          RuntimeWarning)


def _restore_step(mngr: ocp.CheckpointManager, step: int, abstract: Any) -> tuple[Any, dict]:
  """Reads one step against ``abstract``; _Damaged when it cannot be read back as written."""
  _quiet_abandoned_reads()
  try:
    out = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()))
    record = dict(out["record"] or {})
  except Exception as err:  # noqa: BLE001 -- the tree fits (checked), so this is damage
    raise _Damaged(f"it cannot be read: {_first_line(err, 100)}") from err
  digest = record.pop("digest", None)
  leaves = _host_leaves(out["state"])
  if digest is not None and _digest(leaves) != digest:
    raise _Damaged("its arrays do not match the digest written with them")
  bad = _non_finite(leaves)
  if bad is not None:
    raise _Damaged(f"it holds non-finite values ({bad})")
  return out["state"], record


class _Vanished(Exception):
  """Internal: a step was removed while being read (a live run keeps only its newest
  ``checkpoint.keep``): list the steps again."""


def _newest_intact(mngr: ocp.CheckpointManager, steps: list[int], read: Callable,
                   log: Callable[[str], None] | None, set_aside: bool) -> tuple[Any, dict]:
  """``read(step)`` on ``steps`` newest first until one is intact; one line on a fallback."""
  directory = Path(mngr.directory)
  damaged: list[tuple[int, str]] = []
  for step in sorted(steps, reverse=True):
    try:
      state, record = read(step)
    except _Damaged as err:
      if not (directory / str(step)).exists():  # not damaged: removed while being read
        raise _Vanished(step) from err
      damaged.append((step, str(err)))
      continue
    if damaged:
      moved = ""
      if set_aside and jax.process_index() == 0:  # a resumed run saves these steps again
        aside = directory.parent / f"{directory.name}.damaged"
        aside.mkdir(exist_ok=True)
        for bad, _ in damaged:
          dest = aside / str(bad)
          copies = 1
          while dest.exists():  # the same step damaged again after a rerun: keep both
            dest, copies = aside / f"{bad}.{copies}", copies + 1
          shutil.move(str(directory / str(bad)), str(dest))
        mngr.reload()
        moved = f", moved to {aside}"
      (log or _warn)(f"checkpoint: {directory} step {damaged[0][0]} is damaged "
                     f"({damaged[0][1]}){_also(damaged)}{moved}; using step {step}")
    return state, record
  if not damaged:
    raise CheckpointError(f"{directory}: no checkpoint to restore")
  raise CheckpointError(f"{directory}: no intact checkpoint (step {damaged[0][0]}: "
                        f"{damaged[0][1]}{_also(damaged)})")


def _also(damaged: list[tuple[int, str]]) -> str:
  rest = [str(step) for step, _ in damaged[1:]]
  return f"; steps {', '.join(rest)} damaged too" if rest else ""


def _warn(line: str) -> None:
  print(f"warning: {line}", file=sys.stderr)


def restore(mngr: ocp.CheckpointManager, target: Any, step: int | None = None, *,
            log: Callable[[str], None] | None = None, set_aside: bool = False
            ) -> tuple[Any, dict]:
  """Restores the newest intact step (or exactly ``step``) into the structure, shapes and
  shardings of ``target``; returns ``(state, record)``.

  A damaged newer step is skipped with one line to ``log`` (default: stderr); with
  ``set_aside`` it is moved to ``<checkpoints>.damaged/`` (a resumed run will write that step
  again). A step that does not fit ``target`` raises CheckpointError.
  """
  steps = list(mngr.all_steps()) if step is None else [step]
  if not steps:
    raise CheckpointError(f"{mngr.directory}: no checkpoint to restore")
  abstract = _abstract(target)

  def read(at: int):
    _check_fits(_saved_tree(Path(mngr.directory), at), target,
                f"{mngr.directory} step {at}", "leaf")
    return _restore_step(mngr, at, abstract)

  try:
    return _newest_intact(mngr, steps, read, log, set_aside)
  except _Vanished as err:  # the resuming run holds the lock: someone else removed it
    raise CheckpointError(f"{mngr.directory}: step {err} was removed while it was read") from None


def read_record(mngr: ocp.CheckpointManager, step: int) -> dict | None:
  """The JSON record saved with ``step`` (its config among it), without its arrays; None when
  it cannot be read (a damaged step: :func:`restore` says so)."""
  _quiet_abandoned_reads()
  try:
    return dict(mngr.restore(step, args=ocp.args.Composite(
        record=ocp.args.JsonRestore()))["record"] or {})
  except Exception:  # noqa: BLE001 -- damage is restore's to report
    return None


def find_checkpoint_dir(path: str | Path) -> Path:
  """Accepts a run folder (holding ``checkpoints/``) or the checkpoints folder itself."""
  path = Path(path)
  if (path / "checkpoints").is_dir():
    path = path / "checkpoints"
  if not path.is_dir():
    raise CheckpointError(f"{path}: checkpoint folder not found")
  return path.absolute()  # Orbax reads metadata from absolute paths only


def _abstract_here(saved: Any) -> Any:
  """The saved tree as abstract arrays on this process's first device, whatever topology
  wrote it (a checkpoint of 8 devices restores on 1 and back)."""
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=here),
                      saved)


def load_params(path: str | Path, target_params: Any, *, prefer_ema: bool = True,
                log: Callable[[str], None] | None = None, step: int | None = None
                ) -> tuple[Any, dict]:
  """Parameters (only) of another run's newest intact checkpoint (or of ``step``, which must be
  there and intact), checked against ``target_params``, on any device count.

  With ``prefer_ema`` the parameter EMA is taken when the run kept one (what the run's own
  evaluation used); ``record["weights"]`` says which. Raises CheckpointError naming the path
  on any mismatch; a damaged newer step is skipped with one line to ``log`` (default: stderr).
  """
  directory = find_checkpoint_dir(path)

  def read(step: int):
    saved = _saved_tree(directory, step)
    ema = saved.get("ema") if isinstance(saved, dict) else None
    use_ema = prefer_ema and bool(ema) and bool(jax.tree.leaves(ema))
    if not isinstance(saved, dict) or "params" not in saved:
      raise CheckpointError(f"{directory} step {step}: holds no parameters")
    _check_fits(ema if use_ema else saved["params"], target_params,
                f"{directory} step {step}", "parameter")
    state, record = _restore_step(mngr, step, _abstract_here(saved))
    record["weights"] = "ema" if use_ema else "params"
    return state["ema"] if use_ema else state["params"], record

  # A run still training there may remove a step while it is listed or read (it keeps only
  # its newest checkpoint.keep): the steps are listed again, a few times.
  for _ in range(5):
    try:
      mngr = manager(directory, async_save=False)
    except FileNotFoundError:
      continue
    try:
      steps = list(mngr.all_steps())
      if not steps:
        raise CheckpointError(f"{directory}: holds no checkpoint")
      if step is not None and step not in steps:
        raise CheckpointError(f"{directory}: no checkpoint of step {step} (has {sorted(steps)})")
      params, record = _newest_intact(mngr, steps if step is None else [step], read, log,
                                      set_aside=False)
      break
    except _Vanished:
      if step is not None:
        raise CheckpointError(f"{directory}: step {step} was removed while it was read "
                              "(by the run writing there?)") from None
    finally:
      mngr.close()
  else:
    raise CheckpointError(f"{directory}: its checkpoints were removed while they were read, "
                          "five times (a run still writing there keeps only its newest "
                          "checkpoint.keep): copy one, or evaluate after the run")
  params = jax.tree.map(lambda a, b: jax.numpy.asarray(b, a.dtype), target_params, params)
  return params, record
