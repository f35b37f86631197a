"""Faults a run survives: preemption signals, a second run on the same workdir, unwritable
output folders.

- :class:`SignalGuard`: SIGINT, SIGTERM and SIGHUP (what Slurm and Kubernetes send on
  preemption) raise :class:`Interrupted` in the training loop, which checkpoints the current
  step; a signal during a checkpoint save waits for the save to finish.
- :class:`WorkdirLock`: one run per workdir; a lock left by a dead process on this host is
  taken over, any other is one line naming its host and pid.
- :func:`check_writable_dir`: an output folder that cannot be written is one line, before any
  work is done.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                if hasattr(signal, name))


class OutputError(RuntimeError):
  """An output folder cannot be used (not writable, a file, locked). The message names it."""


class Interrupted(KeyboardInterrupt):
  """A stop signal (SIGINT, SIGTERM, SIGHUP) arrived; ``exit_code`` is 128 + its number."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum
    self.name = signal.Signals(signum).name
    self.exit_code = 128 + signum


class SignalGuard:
  """Turns stop signals into :class:`Interrupted` while active (main thread only; elsewhere it
  does nothing). Inside :meth:`saving` a signal is held back until the save is done, and says
  so in one line; the first one is raised when the save ends unless ``hold`` is set."""

  def __init__(self, log: Callable[[str], None] = print):
    self.log = log
    self._saving: str | bool = False  # what holds signals back: "save", "step" or nothing
    self._pending: int | None = None
    self._previous: dict[int, object] = {}

  def __enter__(self) -> "SignalGuard":
    if threading.current_thread() is threading.main_thread():
      for signum in SIGNALS:
        if signal.getsignal(signum) is signal.SIG_IGN:  # nohup's SIGHUP, a script's `&` job's
          continue  # SIGINT: ignored by whoever started the run, and it stays so
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _handle(self, signum: int, frame) -> None:
    if not self._saving:
      raise Interrupted(signum)
    self._pending = self._pending or signum
    if self._saving == "save":
      self.log(f"{signal.Signals(signum).name} during the checkpoint save: the save finishes "
               "first")

  @contextlib.contextmanager
  def _held(self, what: str, hold: bool) -> Iterator[None]:
    outer, self._saving = self._saving, what
    if not outer:
      self._pending = None
    try:
      yield
    finally:
      self._saving = outer  # a save inside a step: the step holds signals again after it
    pending, self._pending = self._pending, None
    if pending is not None and not hold:
      raise Interrupted(pending)

  def saving(self, hold: bool = False):
    """Signals are held back inside; afterwards the first one is raised (``hold``: dropped,
    for the save that an interruption already asked for)."""
    return self._held("save", hold)

  def step(self):
    """A training step and what belongs to it (the expert reset after it, its records, its
    scheduled save): a signal waits (silently) until all of it is done, then stops the run,
    so the interrupt checkpoints a whole state that a resume continues exactly (a step
    donates the old state: cut in the middle there would be nothing to save; cut before the
    reset of its step, the resumed run would never reset)."""
    return self._held("step", False)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  return True


_HELD: list[dict] = []  # what the locks this process holds wrote (each with its own token)


class WorkdirLock:
  """``<workdir>/run.lock`` holding this run's host, pid and start time, for the run's span.

  A lock of a process that no longer runs on this host is stale and taken over (said in one
  line); any other lock raises OutputError naming its host and pid.
  """

  NAME = "run.lock"

  def __init__(self, workdir: str | Path, log: Callable[[str], None] = print):
    self.path = Path(workdir) / self.NAME
    self.log = log
    self.owner = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "token": secrets.token_hex(8)}  # tells this lock from any other
    self.held = False

  def _create(self) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(json.dumps(self.owner) + "\n")
    return True

  def _holder(self) -> dict | None:
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}

  def acquire(self) -> "WorkdirLock":
    for _ in range(3):  # a stale lock removed by us (or a racing run) is retried
      if self._create():
        self.held = True
        _HELD.append(self.owner)
        return self
      holder = self._holder()
      if holder is None:
        continue
      same_host = holder.get("host") == self.owner["host"]
      pid = holder.get("pid")
      # A lock naming this process that no lock object of it holds was written by an earlier
      # process with its pid (a container restarted under the same host name).
      earlier = pid == os.getpid() and holder not in _HELD
      if same_host and isinstance(pid, int) and (earlier or not _alive(pid)):
        why = ("an earlier process with this one's pid" if pid == os.getpid() else
               "which no longer runs")
        self.log(f"workdir: removing the stale lock {self.path} of pid {pid}, {why}")
        with contextlib.suppress(FileNotFoundError):
          self.path.unlink()
        continue
      who = (f"pid {pid} on host {holder.get('host')} since {holder.get('started')}"
             if holder else "an unreadable lock")
      raise OutputError(f"{self.path.parent}: in use by another run ({who}); wait for it, "
                        f"use another --workdir, or delete {self.path} if that run is gone")
    raise OutputError(f"{self.path}: cannot take the lock (other runs keep taking it)")

  def release(self) -> None:
    if self.held:
      _HELD.remove(self.owner)
      if self._holder() == self.owner:
        with contextlib.suppress(FileNotFoundError):
          self.path.unlink()
    self.held = False

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def check_writable_file(path: str | Path, what: str) -> Path:
  """A results file that will be written later (a benchmark's ``--out``): not a folder, and in
  a folder that files can be written in (created if needed); OutputError naming ``what`` and
  the path otherwise, before any work."""
  path = Path(path)
  if path.is_dir():
    raise OutputError(f"{what} {path}: is a folder, not a file")
  check_writable_dir(path.parent, what)
  return path


def check_writable_dir(path: str | Path, what: str) -> Path:
  """Creates ``path`` if needed and checks that files can be written in it; OutputError
  naming ``what`` (e.g. ``--workdir``) and the path otherwise."""
  path = Path(path)
  if path.exists() and not path.is_dir():
    raise OutputError(f"{what} {path}: is a file, not a folder")
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write-test.{os.getpid()}"
    probe.write_text("")
    probe.unlink()
  except OSError as err:
    raise OutputError(f"{what} {path}: not writable ({err.strerror or err})") from None
  return path
