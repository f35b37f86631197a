"""Data parallelism: the per-device step functions under jit, ``shard_map`` or ``pmap``.

The step functions in :mod:`onn_jax.steps` reduce over a named axis; here they are wrapped so
the global batch (``train.batch_size`` rows, fewer at a long bucket under
``data.max_batch_tokens``) is split evenly over a 1-D ``data`` mesh of every
device of every host. A :class:`Runner` hides the difference between the modes from the
training loop: it places the state and each batch, runs a step, and hands back one
unreplicated copy of the state for checkpoints (portable across device counts and modes).

Layouts (``Runner.put_state`` / ``Runner.put_batch`` produce them):

==========  ========================================  =========================================
mode        state                                     batch (global B rows, n devices)
==========  ========================================  =========================================
single      arrays on device 0                        [B, ...] on device 0
shard_map   global arrays replicated over ``data``    global [B, ...] split by rows, P("data")
pmap        [n_local, ...] stacked copies, one per    [n_local, B / n, ...] host-local arrays
            local device                              (pmap's own layout)
==========  ========================================  =========================================
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import sys
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from onn_jax.config import Config, ConfigError
from onn_jax.data.pipeline import rows_within

AXIS = "data"
MODES = ("auto", "single", "shard_map", "pmap")


def shard_map(f: Callable, mesh: Mesh, in_specs, out_specs) -> Callable:
  """``jax.shard_map`` without the varying-manual-axes check (our steps psum explicitly)."""
  return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


# The parallel.* keys that make maybe_initialize_distributed join a multi-host job.
DISTRIBUTED_KEYS: tuple[str, ...] = ("distributed", "coordinator_address", "num_processes",
                                     "process_id")


def maybe_initialize_distributed(cfg: Config) -> bool:
  """Calls ``jax.distributed.initialize()`` when the config or the environment asks for it.

  Must run before anything touches a JAX device (``train.main`` calls it first). Returns
  whether this call initialised the distributed runtime; without any of the flags below (and
  without ``JAX_COORDINATOR_ADDRESS`` in the environment) it does nothing and returns False.

  Flags (config keys, given as ``section.key=value`` overrides):

  - ``parallel.distributed=true``: join a multi-host job. On clusters that JAX recognises
    (Slurm, Open MPI, Cloud TPU pods, Kubernetes) nothing else is needed; elsewhere give the
    next three (or set ``JAX_COORDINATOR_ADDRESS`` and the other two flags).
  - ``parallel.coordinator_address=HOST:PORT``: process 0's address and a free port, the same
    on every host (setting it implies ``parallel.distributed=true``).
  - ``parallel.num_processes=N``: the number of processes (usually one per host).
  - ``parallel.process_id=I``: this process's rank, 0..N-1; process 0 writes every file
    (config, metrics, plots, evaluation), all processes write checkpoints together (Orbax).

  Every process runs the same command and loads only its own rows of each global batch
  (``BatchStream(..., process_index=jax.process_index(), process_count=jax.process_count())``):
  ``train.batch_size`` is the global batch and must divide evenly over all devices of all hosts.
  ``parallel.mode=auto`` then runs ``shard_map`` over every device of every host.

  Two hosts with 8 GPUs each (host A at 10.0.0.1 is process 0; the workdir must be on storage
  both hosts share, for the checkpoints)::

    # on host A
    python -m train.main --config configs/arc1.yaml --workdir /shared/runs/arc1 \\
        parallel.coordinator_address=10.0.0.1:12345 parallel.num_processes=2 \\
        parallel.process_id=0
    # on host B: the same command with parallel.process_id=1

  Under Slurm (``srun --nodes=2 --ntasks-per-node=1 ...``) the flags reduce to
  ``parallel.distributed=true``.

  Raises:
    ConfigError: naming ``parallel.distributed`` when the runtime cannot be initialised (bad
      or missing coordinator, num_processes or process_id; JAX already initialised).
  """
  p = cfg.parallel
  if not (p.distributed or p.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")):
    if p.num_processes or p.process_id >= 0:  # (they ran one host, without a word)
      raise ConfigError("parallel.num_processes and parallel.process_id: they need "
                        "parallel.distributed=true or parallel.coordinator_address; without "
                        "them this runs on one host")
    return False
  if jax.distributed.is_initialized():
    return False
  kwargs: dict[str, Any] = {}
  if p.coordinator_address:
    kwargs["coordinator_address"] = p.coordinator_address
  if p.num_processes:
    kwargs["num_processes"] = p.num_processes
  if p.process_id >= 0:
    kwargs["process_id"] = p.process_id
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, TypeError, RuntimeError) as err:
    detail = str(err).splitlines()[0] if str(err) else type(err).__name__
    raise ConfigError(f"parallel.distributed: jax.distributed.initialize({kwargs}) failed: "
                      f"{detail}") from err
  return True


def resolve_mode(cfg: Config) -> str:
  """``parallel.mode`` with ``auto`` resolved: one device -> ``single``, else ``shard_map``."""
  mode = cfg.parallel.mode
  if mode not in MODES:
    raise ConfigError(f"parallel.mode: {mode!r} is not one of {', '.join(MODES)}")
  if mode == "auto":
    mode = "single" if jax.device_count() == 1 else "shard_map"
  if mode == "single" and jax.process_count() > 1:
    raise ConfigError("parallel.mode: 'single' cannot run on several hosts; use shard_map")
  if mode == "pmap" and not hasattr(jax, "pmap"):  # pragma: no cover - a jax without pmap
    raise ConfigError("parallel.mode: this jax has no pmap; use shard_map")
  return mode


def check_batch(cfg: Config, num_devices: int) -> None:
  """The global batch, and a long bucket's fewer rows under ``data.max_batch_tokens``, must
  split evenly over the devices (and so over the hosts)."""
  b = cfg.train.batch_size
  if b % num_devices:
    raise ConfigError(f"train.batch_size: {b} does not divide evenly over {num_devices} "
                      f"devices; use a multiple of {num_devices}")
  for length in cfg.data.buckets:
    rows = rows_within(length, b, cfg.data.max_batch_tokens)
    if rows % num_devices:
      raise ConfigError(f"data.max_batch_tokens: {cfg.data.max_batch_tokens} gives bucket "
                        f"{length} {rows} rows, which do not divide evenly over {num_devices} "
                        f"devices; e.g. {_even_batch_tokens(cfg, num_devices)} splits every "
                        "bucket")


def _even_batch_tokens(cfg: Config, num_devices: int) -> int:
  """The least ``data.max_batch_tokens`` above the given one whose rows split evenly over the
  devices at every bucket (a budget of whole device-multiples of each bucket's rows)."""
  b, given = cfg.train.batch_size, cfg.data.max_batch_tokens
  candidates = sorted({k * num_devices * length for length in cfg.data.buckets
                       for k in range(1, b // num_devices + 1)})
  return next(m for m in candidates if m > given and all(
      rows_within(length, b, m) % num_devices == 0 for length in cfg.data.buckets))


def _host(x) -> np.ndarray:
  """One leaf as numpy: fully replicated arrays are read from a local copy (any host)."""
  if isinstance(x, jax.Array) and x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  return np.asarray(jax.device_get(x))


class Runner:
  """Compiles and runs per-device step functions in one parallel mode.

  Args:
    cfg: ``parallel.mode`` picks the mode; ``train.batch_size`` is checked against the device
      count (ConfigError naming ``train.batch_size`` when it does not divide).
    steps: name -> per-device ``fn(state, batch, *, axis_name, num_devices) -> (state, out)``
      whose ``out`` is already reduced over ``axis_name`` (identical on every device).
    donate: donate the input state's buffers to each step (the caller must not reuse them).
  """

  def __init__(self, cfg: Config, steps: dict[str, Callable], *, donate: bool = True):
    self.mode = resolve_mode(cfg)
    self.devices = jax.devices() if self.mode != "single" else jax.local_devices()[:1]
    self.num_devices = len(self.devices)
    check_batch(cfg, self.num_devices)
    self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
    self.mesh = Mesh(np.array(self.devices), (AXIS,))
    self.local_mesh = Mesh(np.array(self.local_devices), (AXIS,))
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(AXIS))
    # pmap takes host-local arrays with one leading entry per local device.
    self.stacked = NamedSharding(self.local_mesh, P(AXIS))
    self._donate = (0,) if donate else ()
    self._steps = {name: self._compile(fn) for name, fn in steps.items()}
    self._ready: dict[tuple, Callable] = {}  # (name, batch signature) -> compiled ahead
    # name -> (future of (programs, seconds), batch signatures): compiling in the background
    self._pending: dict[str, tuple[concurrent.futures.Future, list[tuple]]] = {}
    self._applied: dict[Any, Callable] = {}
    self._unstack_fn: Callable | None = None

  def _compile(self, fn: Callable) -> Callable:
    if self.mode == "single":
      return jax.jit(functools.partial(fn, axis_name=None, num_devices=1),
                     donate_argnums=self._donate)
    per_device = functools.partial(fn, axis_name=AXIS, num_devices=self.num_devices)
    if self.mode == "shard_map":
      return jax.jit(shard_map(per_device, self.mesh, in_specs=(P(), P(AXIS)),
                               out_specs=(P(), P())), donate_argnums=self._donate)
    return jax.pmap(per_device, axis_name=AXIS, devices=self.devices,
                    donate_argnums=self._donate)

  # -- placement -------------------------------------------------------------------------------
  def put_state(self, state: Any) -> Any:
    """Any state (host numpy, one device, replicated, a checkpoint's) -> the mode's layout.

    Always fresh buffers, so a donating step never consumes the caller's arrays.
    """
    def place(x):
      host = _host(x)
      if self.mode == "single":
        return jax.device_put(np.array(host), SingleDeviceSharding(self.devices[0]))
      if self.mode == "shard_map":
        return jax.make_array_from_callback(host.shape, self.replicated, lambda idx: host[idx])
      shape = (len(self.local_devices),) + host.shape
      return jax.make_array_from_callback(shape, self.stacked, lambda idx: host[None])
    return jax.tree.map(place, state)

  def get_state(self, state: Any) -> Any:
    """The state as one unreplicated copy: what checkpoints hold, portable across modes.

    single: as is; shard_map: the replicated global arrays as is (Orbax writes one copy);
    pmap: the stacked copies become replicated global arrays over the mesh (each device keeps
    its own copy: no transfer), like shard_map's.
    """
    return self._unstack(state) if self.mode == "pmap" else state

  def _unstack(self, tree: Any) -> Any:
    """pmap layout [n_local, ...] -> global arrays replicated over the mesh, in one dispatch."""
    if jax.process_count() > 1:  # pmap hands out host-local arrays; view them as global
      tree = multihost_utils.host_local_array_to_global_array(tree, self.mesh, P(AXIS))
    if self._unstack_fn is None:
      # Every device's block holds the same (reduced) values, so keeping the local block is
      # the replicated result; check_vma is off, so shard_map takes our word for it.
      self._unstack_fn = jax.jit(shard_map(
          lambda t: jax.tree.map(lambda x: x[0], t), self.mesh, in_specs=(P(AXIS),),
          out_specs=P()))
    return self._unstack_fn(tree)

  def put_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """This process's rows of the global batch -> a global batch split over the devices.

    ``local_batch`` arrays have this process's share of the batch's rows (what
    ``BatchStream(process_index, process_count)`` returns); device k of this host gets the
    k-th contiguous slice of them, so the global row order is the single-device order.
    """
    n_local = len(self.local_devices)

    def check(x):
      if x.shape[0] % n_local:
        raise ConfigError(f"train.batch_size: this process holds {x.shape[0]} rows, which do not "
                          f"divide over its {n_local} devices")
      return x

    local_batch = jax.tree.map(check, local_batch)
    if self.mode == "single":
      return jax.device_put(local_batch, self.devices[0])
    if self.mode == "pmap":
      return jax.tree.map(lambda x: jax.device_put(
          np.reshape(x, (n_local, x.shape[0] // n_local) + x.shape[1:]), self.stacked),
                          local_batch)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(x)),
        local_batch)

  def host(self, x: Any) -> np.ndarray:
    """A replicated value (a state field, a transform's output) as one host array: pmap's
    leading local-device axis stays inside the runner."""
    x = host_value(x)
    return x[0] if self.mode == "pmap" else x

  # -- execution -------------------------------------------------------------------------------
  def precompile(self, name: str, state: Any, local_batches: list[dict[str, np.ndarray]], *,
                 background: bool = False) -> None:
    """Compiles step ``name`` for the shape of each batch (this process's rows, as
    :meth:`put_batch` takes them), all at once (:func:`compile_at_once`); :meth:`run` then uses
    these programs for batches of those shapes. ``state`` is only read for its shapes.

    ``background``: the steps are lowered and compiled on a worker thread, from the shapes
    (and shardings) of ``state`` and the placed batches, while this thread goes on (e.g.
    training an earlier stage); the first :meth:`run` of ``name``, or :meth:`wait_compiled`,
    waits for them, and an error in their tracing or compilation is raised there, not here.
    (Lowered here, five EAVI buckets most likely held an H200 run's first step back a
    minute.)"""
    placed = [self.put_batch(b) for b in local_batches]
    signatures = [_signature(b) for b in placed]
    step = self._steps[name]
    if background:
      state, placed = _shapes(state), _shapes(placed)
      self._pending[name] = (compile_in_background(
          f"{name} steps", lambda: [step.lower(state, b) for b in placed]), signatures)
    else:
      self._install(name, signatures, compile_at_once([step.lower(state, b) for b in placed]))

  def _install(self, name: str, signatures: list[tuple], programs: list) -> None:
    for signature, program in zip(signatures, programs):
      self._ready[name, signature] = program

  def wait_compiled(self, name: str) -> tuple[float, float] | None:
    """Waits for the background compilation of step ``name`` (:meth:`precompile`) and puts
    its programs to use: (seconds it took, seconds waited here), or None when none was
    pending. A compilation that failed raises its error here."""
    pending = self._pending.pop(name, None)
    if pending is None:
      return None
    future, signatures = pending
    tick = time.perf_counter()
    programs, seconds = future.result()
    self._install(name, signatures, programs)
    return seconds, time.perf_counter() - tick

  def run(self, name: str, state: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """One step: ``(state, batch) -> (state, out)``; ``out`` holds one (reduced) copy."""
    if name in self._pending:
      self.wait_compiled(name)
    step = self._ready.get((name, _signature(batch)), self._steps[name])
    state, out = step(state, batch)
    if self.mode == "pmap":
      out = self._unstack(out)
    return state, out

  def apply(self, fn: Callable, state: Any, *args) -> Any:
    """Runs a deterministic state transform ``fn(state, *args)`` (e.g. expert reset) on every
    device with the same (replicated) ``args``.

    Returns ``fn``'s output in the mode's layout: under pmap every output leaf has a leading
    local-device axis (take ``[0]`` of non-state outputs). Pass the same ``fn`` object each
    time to reuse its compilation (:meth:`precompile_apply` compiles it ahead).
    """
    return self._applied_fn(fn, len(args))(state, *self._replicated_args(args))

  def precompile_apply(self, fn: Callable, state: Any, *args) -> None:
    """Compiles :meth:`apply` of ``fn`` for these arguments' shapes now, so that its first
    call compiles nothing (a compilation there would wait behind a background one, and stall
    training): an ahead-of-time compilation fills the caches that the call looks in."""
    self._applied_fn(fn, len(args)).lower(state, *self._replicated_args(args)).compile()

  def _applied_fn(self, fn: Callable, num_args: int) -> Callable:
    """``fn`` jitted (pmapped) for the mode, once per ``fn`` object; ``num_args`` after the
    state, replicated."""
    compiled = self._applied.get(fn)
    if compiled is None:
      if self.mode == "pmap":
        compiled = jax.pmap(fn, axis_name=AXIS, devices=self.devices,
                            in_axes=(0,) + (None,) * num_args)
      elif self.mode == "shard_map":
        compiled = jax.jit(fn, out_shardings=self.replicated)
      else:
        compiled = jax.jit(fn)
      self._applied[fn] = compiled
    return compiled

  def _replicated_args(self, args: tuple) -> tuple:
    """``apply``'s host-identical arguments, as global replicated arrays under shard_map."""
    if self.mode != "shard_map":
      return args
    return tuple(jax.tree.map(
        lambda a: jax.make_array_from_callback(np.shape(a), self.replicated,
                                               lambda idx, h=_host(a): h[idx]), a)
                 for a in args)


def _shapes(tree: Any) -> Any:
  """Each array of ``tree`` as a ShapeDtypeStruct with its sharding: what lowering a program
  for it needs, without touching the array (e.g. on another thread while it is donated)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      tree)


def _signature(batch: dict[str, Any]) -> tuple:
  """What a compiled step depends on in a placed batch: its keys, shapes and dtypes."""
  return tuple((key, tuple(x.shape), str(x.dtype)) for key, x in sorted(batch.items()))


def compile_at_once(lowered: list, *, nice: int = 0) -> list:
  """``[program.compile() for program in lowered]``, the compilations in threads at once (at
  most one per CPU core, which bounds the host memory they take): XLA compiles outside the
  GIL, so N programs take about as long as the slowest, not the sum (tracing happens when
  they are lowered, under the JAX settings of the thread that lowers them). ``nice``: the
  compiling threads run that much nicer (see :func:`_nicer`)."""
  if len(lowered) < 2 and not nice:
    return [program.compile() for program in lowered]
  with concurrent.futures.ThreadPoolExecutor(max(1, min(len(lowered), os.cpu_count() or 1)),
                                             initializer=_nicer, initargs=(nice,)) as pool:
    return list(pool.map(lambda program: program.compile(), lowered))


# How much nicer the threads that compile in the background run than the rest of the process
# (Linux, where niceness is per thread; threads started from them inherit it, but a pool
# that XLA's client made at start-up does not, so XLA's own parallel compilation may still run
# at the process's niceness: unmeasured). A background compilation's threads, as many as
# there are cores, then take the cores that training's loop and batch building leave idle
# instead of an equal share of all of them.
BACKGROUND_NICE = 10


def _nicer(nice: int) -> None:
  """Makes the calling thread ``nice`` nicer (at most 19); nothing off Linux or if refused."""
  if not nice or not sys.platform.startswith("linux"):
    return
  tid = threading.get_native_id()
  try:
    os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
  except OSError:
    pass


# The interpreter's switch interval while a background compilation lowers (traces) its
# programs: a thread that gave up the GIL (a device call, a wait, numpy) waits up to this long
# to take it back from the tracing thread, instead of Python's default 5 ms. Measured on a
# 2-core CPU: an arc1 packed batch took 9.8 ms to build alone, 244 ms beside a tracing thread
# at 5 ms, 35 ms at 0.2 ms.
BACKGROUND_SWITCH_INTERVAL_S = 0.0002


@contextlib.contextmanager
def _yielding_gil():
  previous = sys.getswitchinterval()
  sys.setswitchinterval(min(previous, BACKGROUND_SWITCH_INTERVAL_S))
  try:
    yield
  finally:
    sys.setswitchinterval(previous)


_compiler: concurrent.futures.ThreadPoolExecutor | None = None
_background: list[tuple[str, concurrent.futures.Future]] = []


def compile_in_background(name: str, lower: Callable[[], list]) -> concurrent.futures.Future:
  """``compile_at_once(lower())`` on a worker thread, while the caller goes on (e.g. training):
  a future of (programs, seconds taken). ``lower`` runs on that thread too, so JAX settings
  made with a context manager in the caller's thread do not reach its tracing (the callers
  set none), and it must run nothing on the devices (it may overlap the caller's collectives
  on other hosts): lower from shapes. One worker for the process, so background compilations
  run one after another, each with :func:`compile_at_once`'s threads. ``name`` (e.g. "eavi
  steps") is what :func:`compiling_in_background` reports while it runs."""
  global _compiler
  if _compiler is None:
    _compiler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile")

  def work():
    tick = time.perf_counter()
    with _yielding_gil():
      lowered = lower()
    programs = compile_at_once(lowered, nice=BACKGROUND_NICE)  # XLA compiles outside the GIL
    return programs, time.perf_counter() - tick

  _background[:] = [(n, f) for n, f in _background if not f.done()]
  future = _compiler.submit(work)
  _background.append((name, future))
  return future


def compiling_in_background() -> list[str]:
  """What :func:`compile_in_background` is still compiling or has queued."""
  return [name for name, future in _background if not future.done()]


def cancel_background() -> list[str]:
  """Cancels the queued background compilations (a run that stops will not need them); the
  one running cannot be stopped (XLA), and the process exits only after it: its name, if
  any."""
  for _, future in _background:
    future.cancel()
  return compiling_in_background()


def host_value(x) -> np.ndarray:
  """A replicated (or fully addressable) array as numpy, on every host."""
  if isinstance(x, jax.Array) and x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def is_main_process() -> bool:
  return jax.process_index() == 0


def platform_line(cfg: Config) -> tuple[str, str | None]:
  """(where the run computes, e.g. "gpu (NVIDIA H200) x 2", a warning or None).

  The warning is for a config that computes in bfloat16 with no accelerator: jax found no GPU
  or TPU (CPU jax installed, or no driver), and the run goes on on the CPU, slowly."""
  device = jax.devices()[0]
  line = f"{device.platform} ({device.device_kind}) x {jax.device_count()}"
  warning = None
  if device.platform == "cpu" and cfg.model.compute_dtype == "bfloat16":
    warning = ("warning: model.compute_dtype=bfloat16 (a GPU config) but jax found no GPU or "
               "TPU: running on the CPU (see the README's GPU section for CUDA jax)")
  return line, warning


def peak_memory() -> dict[str, float]:
  """``{"peak_memory_gib": ...}``: the most memory this process's first device has held so
  far (the allocator's own count, GPU/TPU), or ``{}`` where the backend keeps none (CPU)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" not in stats:
    return {}
  return {"peak_memory_gib": stats["peak_bytes_in_use"] / 2**30}
