"""Where a compiled call's device time goes: a ``jax.profiler`` trace, summarised.

A library module of the tools (``train.bench``, ``train.kernel_count``), not a command.
``python -m train.bench --profile DIR`` traces a few calls of each step it times (after timing
them) and adds to each row of its JSON a ``profile`` entry: the device's kernel time and kernel
count per call, against the call's wall time, and the kernels grouped by name and by model scope
(the HLO op's name stack from the compiled program's metadata, ``block_N`` folded, jit/jvp
wrappers and control-flow levels dropped, ``bwd/`` for the backward pass; library and Pallas
kernels (cuBLAS's, cuDNN's, custom calls) have none while XLA's command buffers run them:
``?``). The raw trace stays under DIR for Perfetto (ui.perfetto.dev) or TensorBoard.

On a CPU the trace has no device kernels: the entry then says so (``kernels_per_call`` 0).
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax

# Event arguments that name an HLO op's model scope, by preference.
SCOPE_KEYS = ("tf_op", "long_name")
_WRAPPER = re.compile(r"(jit|pjit|jvp|transpose|vmap|remat|checkpoint|custom_jvp_call|"
                      r"custom_vjp_call)\(([^()]*)\)/?")
# Name-stack levels of control flow (``while/body/``, ``cond/branch_1_fun/``, ...), dropped.
_CONTROL = re.compile(r"while|body|cond|branch_\d+_fun|checkpoint|rematted_computation|"
                      r"remat|scan|checkpoint_name|closed_call")


def _run(fn: Callable, args: tuple, calls: int, carry: bool) -> tuple:
  for _ in range(calls):
    out = jax.block_until_ready(fn(*args))
    if carry:
      args = (out[0],) + args[1:]
  return args


def trace(fn: Callable, args: Sequence[Any], logdir: str | Path, *, calls: int = 3,
          carry: bool = False) -> tuple[Path | None, float]:
  """Runs ``fn(*args)`` ``calls`` times untraced (timed), then ``calls`` times under the
  profiler (``carry``: the first output replaces the first argument, as for a donated train
  state). Returns (the Perfetto trace file, or None if none was written; wall ms per call)."""
  args = _run(fn, tuple(args), 1, carry)  # compiled and warm
  start = time.perf_counter()
  args = _run(fn, args, calls, carry)
  wall_ms = (time.perf_counter() - start) / calls * 1e3
  logdir = Path(logdir)
  before = set(logdir.glob("**/perfetto_trace.json.gz"))
  with jax.profiler.trace(str(logdir), create_perfetto_trace=True):
    _run(fn, args, calls, carry)
  files = sorted(set(logdir.glob("**/perfetto_trace.json.gz")) - before,
                 key=lambda p: p.stat().st_mtime)  # this trace's, not an earlier run's
  return (files[-1] if files else None), wall_ms


def _is_device(process_name: str) -> bool:
  return process_name.startswith("/device:") and "CPU" not in process_name


_HLO_OP = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = [^\n]*?metadata=\{[^}]*?op_name="([^"]+)"', re.M)


def _kernel_key(name: str) -> str:
  """An HLO instruction's name as its GPU kernel is named (``loop_fusion.17`` ->
  ``loop_fusion_17``)."""
  return name.replace(".", "_").replace("-", "_")


def op_names(hlo_text: str) -> dict[str, str]:
  """Instruction -> ``op_name`` metadata (the jax name stack) of a compiled program's HLO text
  (``compiled.as_text()``), keyed as kernels are named. On a GPU the trace's own scope field
  holds only the module's name, so this is where scopes come from."""
  return {_kernel_key(m.group(1)): m.group(2) for m in _HLO_OP.finditer(hlo_text)}


def scope_of(event_args: dict[str, Any], name: str = "",
             ops: dict[str, str] | None = None) -> str:
  """The model scope of a kernel event: its op's name stack (from ``ops``, :func:`op_names`,
  by the event's HLO op or kernel name; else from the event's own fields) with wrappers
  dropped and layer indices folded (``block_3/attn/q_proj`` -> ``block_N/attn/q_proj``), at
  most 5 levels, led by ``bwd/`` in the backward pass (a ``transpose(...)`` wrapper)."""
  ops = ops or {}
  text = ops.get(_kernel_key(str(event_args.get("hlo_op", "")))) or ops.get(_kernel_key(name))
  if text is None:
    text = next((str(event_args[k]) for k in SCOPE_KEYS
                 if k in event_args and not str(event_args[k]).startswith("XlaModule")), "")
  backward = "transpose(" in text
  while True:  # nested wrappers: innermost first
    shorter = _WRAPPER.sub("", text)
    if shorter == text:
      break
    text = shorter
  parts = [p for p in re.sub(r"block_\d+", "block_N", text).split("/")
           if p and not _CONTROL.fullmatch(p)][:5]
  return "/".join((["bwd"] if backward else []) + parts) or "?"


def summarize(trace_file: Path | None, calls: int, *, top: int = 40,
              ops: dict[str, str] | None = None) -> dict[str, Any]:
  """Device kernel events of a Perfetto trace (processes named ``/device:...``), per call:
  total kernel microseconds, kernel count, and the ``top`` kernel names (microseconds, count,
  scope of the first) and scopes (microseconds) by time; scopes from ``ops``
  (:func:`op_names`) where given."""
  empty = {"kernel_us_per_call": 0.0, "kernels_per_call": 0.0, "by_name": [], "by_scope": []}
  if trace_file is None:
    return {**empty, "note": "no trace written"}
  with gzip.open(trace_file) as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  device_pids = {e["pid"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"
                 and _is_device(str(e.get("args", {}).get("name", "")))}
  us, count = collections.Counter(), collections.Counter()
  by_scope: collections.Counter = collections.Counter()
  first_scope: dict[str, str] = {}
  for e in events:
    if e.get("ph") != "X" or e.get("pid") not in device_pids:
      continue
    name, dur = str(e.get("name", "")), float(e.get("dur", 0.0))
    scope = scope_of(e.get("args", {}), name, ops)
    us[name] += dur
    count[name] += 1
    by_scope[scope] += dur
    first_scope.setdefault(name, scope)
  if not us:
    return {**empty, "note": "no device kernels in the trace (a CPU run?)"}
  return {"kernel_us_per_call": sum(us.values()) / calls,
          "kernels_per_call": sum(count.values()) / calls,
          "by_name": [{"name": n, "us": t / calls, "count": count[n] / calls,
                       "scope": first_scope[n]} for n, t in us.most_common(top)],
          "by_scope": [{"scope": s, "us": t / calls} for s, t in by_scope.most_common(top)]}


def profile(fn: Callable, args: Sequence[Any], logdir: str | Path, *, calls: int = 3,
            carry: bool = False, top: int = 40) -> dict[str, Any]:
  """:func:`trace` then :func:`summarize`, with the wall time per call and the trace's path.
  A compiled ``fn`` (``jax.jit(...).lower(...).compile()``) lends its HLO's scopes."""
  trace_file, wall_ms = trace(fn, args, logdir, calls=calls, carry=carry)
  ops = op_names(fn.as_text()) if hasattr(fn, "as_text") else None
  return {"wall_ms": wall_ms, "calls": calls, **summarize(trace_file, calls, top=top, ops=ops),
          "trace": None if trace_file is None else str(trace_file)}


def table(summary: dict[str, Any], rows: int = 15) -> str:
  """The top kernels and scopes of a :func:`profile` result, as text."""
  lines = [f"wall {summary['wall_ms']:.2f} ms a call; device kernels "
           f"{summary['kernel_us_per_call'] / 1e3:.2f} ms in {summary['kernels_per_call']:.0f}"]
  lines += [f"  {k['us']:9.1f} us {k['count']:6.1f}x  {k['name'][:60]}  [{k['scope'][:60]}]"
            for k in summary["by_name"][:rows]]
  lines += ["  by scope:"] + [f"  {s['us']:9.1f} us  {s['scope'][:110]}"
                              for s in summary["by_scope"][:rows]]
  return "\n".join(lines)
