"""Data parallelism: the per-device step functions under jit, ``shard_map`` or ``pmap``.

The step functions in :mod:`onn_jax.steps` reduce over a named axis; here they are wrapped so
the global batch is split over a 1-D ``data`` mesh of every device (all hosts). A
:class:`Runner` hides the difference between the modes from the training loop: it places the
state and each batch, runs a step, and hands back host-side state for checkpoints.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from onn_jax.config import Config, ConfigError

AXIS = "data"

try:  # jax >= 0.6 exports shard_map at the top level
  _shard_map = jax.shard_map
except AttributeError:  # pragma: no cover - older jax
  from jax.experimental.shard_map import shard_map as _shard_map


def shard_map(f, mesh, in_specs, out_specs):
  try:
    return _shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  except TypeError:  # pragma: no cover - jax without check_vma
    return _shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def maybe_initialize_distributed(cfg: Config) -> None:
  """``jax.distributed.initialize()`` when the config or the environment asks for it.

  Flags: ``parallel.distributed=true`` with ``parallel.coordinator_address``,
  ``parallel.num_processes`` and ``parallel.process_id`` (or none of them on a cluster that
  jax auto-detects: Slurm, TPU pods, ``JAX_COORDINATOR_ADDRESS`` ...).
  """
  p = cfg.parallel
  if not (p.distributed or os.environ.get("JAX_COORDINATOR_ADDRESS")):
    return
  kwargs = {}
  if p.coordinator_address:
    kwargs["coordinator_address"] = p.coordinator_address
  if p.num_processes:
    kwargs["num_processes"] = p.num_processes
  if p.process_id >= 0:
    kwargs["process_id"] = p.process_id
  jax.distributed.initialize(**kwargs)


def resolve_mode(cfg: Config) -> str:
  mode = cfg.parallel.mode
  if mode == "auto":
    mode = "single" if jax.device_count() == 1 else "shard_map"
  if mode == "single" and jax.process_count() > 1:
    raise ConfigError("parallel.mode: 'single' cannot run on several hosts; use shard_map")
  return mode


def check_batch(cfg: Config, num_devices: int) -> None:
  b = cfg.train.batch_size
  if b % num_devices:
    raise ConfigError(f"train.batch_size: {b} does not divide evenly over {num_devices} "
                      "devices")


class Runner:
  """Compiles and runs per-device step functions in one parallel mode.

  Args:
    steps: name -> per-device ``fn(state, batch, *, axis_name, num_devices) -> (state, out)``
      whose ``out`` is already reduced over the axis (identical on every device).
  """

  def __init__(self, cfg: Config, steps: dict[str, Callable], *, donate: bool = True):
    self.mode = resolve_mode(cfg)
    self.devices = jax.devices() if self.mode != "single" else jax.devices()[:1]
    self.num_devices = len(self.devices)
    check_batch(cfg, self.num_devices)
    self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
    self.mesh = Mesh(np.array(self.devices), (AXIS,))
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(AXIS))
    donate_args = (0,) if donate else ()
    self._steps = {}
    for name, fn in steps.items():
      if self.mode == "single":
        compiled = jax.jit(functools.partial(fn, axis_name=None, num_devices=1),
                           donate_argnums=donate_args)
      elif self.mode == "shard_map":
        per_device = functools.partial(fn, axis_name=AXIS, num_devices=self.num_devices)
        compiled = jax.jit(shard_map(per_device, self.mesh, in_specs=(P(), P(AXIS)),
                                     out_specs=(P(), P())), donate_argnums=donate_args)
      else:
        compiled = jax.pmap(functools.partial(fn, axis_name=AXIS, num_devices=self.num_devices),
                            axis_name=AXIS, devices=self.devices, donate_argnums=donate_args)
      self._steps[name] = compiled

  # -- placement -------------------------------------------------------------------------------
  def put_state(self, state: Any) -> Any:
    """Host (or any) state -> the layout the compiled steps expect."""
    if self.mode == "pmap":
      return jax.device_put_replicated(jax.device_get(state), self.local_devices)
    if self.mode == "single":
      return jax.device_put(state, self.devices[0])
    return jax.device_put(state, self.replicated)

  def get_state(self, state: Any) -> Any:
    """The state as one unreplicated copy (what checkpoints hold, portable across modes)."""
    if self.mode == "pmap":
      return jax.tree.map(lambda x: x[0], state)
    return state

  def put_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """This process's rows of the global batch -> a global batch split over the devices."""
    if self.mode == "single":
      return jax.device_put(local_batch, self.devices[0])
    if self.mode == "pmap":
      n = len(self.local_devices)
      return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), local_batch)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x), local_batch)

  def run(self, name: str, state: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    state, out = self._steps[name](state, batch)
    if self.mode == "pmap":
      out = jax.tree.map(lambda x: x[0], out)
    return state, out

  def apply(self, fn: Callable, state: Any, *args) -> Any:
    """Runs a state transform with replicated arguments (e.g. expert reset)."""
    if self.mode == "pmap":
      args = [jax.device_put_replicated(a, self.local_devices) for a in args]
      return jax.pmap(fn, devices=self.devices)(state, *args)
    return jax.jit(fn)(state, *args)


def host_value(x) -> np.ndarray:
  """A replicated (or fully addressable) array as numpy, on every host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def is_main_process() -> bool:
  return jax.process_index() == 0

