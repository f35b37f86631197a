"""Kernels a one-token decoding step launches on an NVIDIA GPU, counted on any machine.

A decoding step of a model this small is bound by its kernels' count, not by FLOPs or bytes
(docs/benchmarks.md; issue #16's rollout goal): XLA runs the loop body as CUDA graphs, and on an
H200 each of its kernels still takes 1.2-4.5 us, however small, so the number of kernels a step
launches is a measure of its own (a custom kernel's own duration is not). This compiles
``decode.generate``'s loop of one-token steps (the config's model as evaluation and EAVI run
it: dense experts, ``decode.step_copies`` steps a loop iteration, from a given KV cache) for a
GPU and counts what the loop body launches per step: XLA's fusions, library and Pallas
(Triton) custom calls, copies; by kind and by model scope.

On a machine without a GPU it compiles ahead of time for an sm_90 (H100 / H200 class) target
through the CUDA plugin's deviceless compilation: ``pip install jax-cuda13-plugin
jax-cuda13-pjrt`` at your jax's version (no driver, no GPU; on a GPU machine the local device
is used). The library picks its GPU paths while tracing (it asks ``jax.default_backend()``,
which reads "gpu" meanwhile, and Pallas kernels lower through Triton). The prefill is not
compiled: its cuDNN attention needs cuDNN at compile time.

    python -m train.kernel_count --config arc1 --decode split,fused,fused_moe --out kernels.json

Counts are per step of the compiled program; whether a launch is cheap is not known here
(time it on the device: ``python -m train.bench --only decode``).

``--ptx B x T`` reports, instead, what the NSA training kernels (the selected branch's forward
and backward, the window's, the block choice; the config's geometry, B rows of T tokens)
compile to: per Pallas kernel, static counts of its PTX instructions by kind (Hopper's
``wgmma`` against the older ``mma.sync`` tensor-core products, ``ldmatrix``/``stmatrix`` and
shared-memory traffic, barriers, global loads, stores and atomics), from XLA's PTX dump, and,
where the CUDA toolkit's ``ptxas`` is installed, its registers a thread and spilled bytes. On a
machine without a GPU this is what can be learned of a kernel change's code: wgmma, for
instance, needs at least 64 rows in a product's output, so a product of a 32-key tile runs
on mma.sync (docs/benchmarks.md, session 26).

    python -m train.kernel_count --config arc1 --ptx 32x2048 --out ptx.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

# The CUDA plugin checks its cuDNN and driver at start-up, which a deviceless compilation
# needs neither of (the only cuDNN use, the prefill's attention, is not compiled here).
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from onn_jax import config, decode, faults, output, profiling
from onn_jax.data.tokens import VOCAB_SIZE
from onn_jax.model import nsa, nsa_pallas
from onn_jax.model.transformer import Transformer, init_cache, init_params, outside_tf

# An sm_90 device (H100 SXM class; the H200 differs in memory size and bandwidth), for the
# deviceless compilation: XLA's GpuTargetConfigProto in text form.
SM90_TARGET = """
gpu_device_info {
  cuda_compute_capability { major: 9 minor: 0 }
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 150000000000
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 patch: 0 }
device_description_str: "sm_90 (deviceless)"
"""

# Top-level HLO instructions that launch nothing.
NO_LAUNCH = frozenset({"parameter", "get-tuple-element", "tuple", "constant", "bitcast",
                       "while", "conditional", "call", "after-all", "opt-barrier",
                       "partition-id", "replica-id", "copy-done", "add-dependency"})
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$")
_OPCODE = re.compile(r"^\s*([a-z][\w\-]*)\(")
_BODY = re.compile(r"body=%?([\w.\-]+)")

# PTX instruction kinds counted by ptx_instructions: name -> the opcodes' common prefix.
PTX_KINDS = {"wgmma": "wgmma.mma_async", "mma.sync": "mma.sync", "ldmatrix": "ldmatrix",
             "stmatrix": "stmatrix", "ld.shared": "ld.shared", "st.shared": "st.shared",
             "bar.sync": ("bar.sync", "barrier.sync"), "ld.global": "ld.global",
             "cp.async": "cp.async", "st.global": "st.global", "atomic": ("atom.", "red.")}
_PTX_ENTRY = re.compile(r"\.entry\s+([\w$]+)")
_PTX_OPCODE = re.compile(r"\s*(?:@!?%\w+\s+)?([a-z][\w.:]*)")  # of one statement


def gpu_device() -> tuple[Any, str]:
  """(device, how): the local GPU if there is one, else an sm_90 target without one."""
  try:
    return jax.devices("gpu")[0], "local GPU"
  except RuntimeError:
    pass
  from jax.experimental import topologies
  try:
    topology = topologies.get_topology_desc("kernel_count", "cuda", target_config=SM90_TARGET,
                                            topology="1x1x1")
  except Exception as err:  # noqa: BLE001 - one line naming what is missing
    raise SystemExit(f"kernel_count: no GPU and no deviceless CUDA compiler ({err}); "
                     f"pip install jax-cuda13-plugin jax-cuda13-pjrt=={jax.__version__}")
  return topology.devices[0], "deviceless sm_90"


@contextlib.contextmanager
def gpu_paths():
  """While tracing: the library's backend checks read "gpu" and Pallas kernels lower for
  Triton (not interpret mode)."""
  saved = jax.default_backend, nsa_pallas.use_interpret
  jax.default_backend = lambda: "gpu"
  nsa_pallas.use_interpret = lambda: False
  try:
    yield
  finally:
    jax.default_backend, nsa_pallas.use_interpret = saved


def instructions(hlo_text: str) -> dict[str, list[tuple[str, str, str]]]:
  """Computation name -> its instructions as (name, opcode, line)."""
  comps: dict[str, list[tuple[str, str, str]]] = {}
  current = None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line) if not line.startswith(" ") else None
    if header:
      current = comps.setdefault(header.group(1), [])
      continue
    match = _INSTRUCTION.match(line) if current is not None else None
    if not match:
      continue
    rest = match.group(2)
    if rest.startswith("("):  # a tuple shape: skip to its closing parenthesis
      depth = 0
      for i, ch in enumerate(rest):
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
          rest = rest[i + 1:]
          break
    else:
      rest = rest.split(" ", 1)[1] if " " in rest else ""
    opcode = _OPCODE.match(rest)
    if opcode:
      current.append((match.group(1), opcode.group(1), line))
  return comps


def launch_kind(opcode: str, line: str) -> str | None:
  """What an instruction launches (``fusion:kLoop``, ``custom-call:<target>``, ...), or None."""
  if opcode in NO_LAUNCH:
    return None
  if opcode == "fusion":
    kind = re.search(r"kind=(\w+)", line)
    return "fusion:" + (kind.group(1) if kind else "?")
  if opcode == "custom-call":
    target = re.search(r'custom_call_target="([^"]+)"', line)
    return "custom-call:" + (target.group(1) if target else "?")
  return opcode


_ARRAY = re.compile(r"\b(pred|[subf]\d+|bf16)\[([\d,]*)\]")
_BITS = {"pred": 8, "bf16": 16}


def array_bytes(line: str) -> int:
  """Bytes of the first array shape of an HLO instruction line (``bf16[32,2048]{1,0}``)."""
  match = _ARRAY.search(line.split(" = ", 1)[1] if " = " in line else line)
  if not match:
    return 0
  dtype, dims = match.groups()
  bits = _BITS.get(dtype) or int(dtype[1:])
  count = 1
  for d in filter(None, dims.split(",")):
    count *= int(d)
  return count * bits // 8


def step_launches(hlo_text: str, steps_per_body: int) -> dict[str, Any]:
  """The launches of the busiest while-loop body, per step (body / ``steps_per_body``), and
  the bytes its copies move per step (a KV cache copied every step would show here)."""
  comps = instructions(hlo_text)
  bodies = {b for insts in comps.values() for _, op, line in insts if op == "while"
            for b in _BODY.findall(line)}
  ops = profiling.op_names(hlo_text)
  best: tuple[int, collections.Counter, collections.Counter, int] | None = None
  for name in bodies & comps.keys():
    kinds, scopes, copied = collections.Counter(), collections.Counter(), 0
    for inst, op, line in comps[name]:
      kind = launch_kind(op, line)
      if kind:
        kinds[kind] += 1
        scopes[profiling.scope_of({}, inst, ops)] += 1
      if op == "copy":
        copied += array_bytes(line)
    if best is None or sum(kinds.values()) > best[0]:
      best = (sum(kinds.values()), kinds, scopes, copied)
  if best is None:
    raise ValueError("kernel_count: the compiled program has no while loop")
  total, kinds, scopes, copied = best
  per = lambda c: {k: n / steps_per_body for k, n in c.most_common()}  # noqa: E731
  return {"launches_per_step": total / steps_per_body, "copied_bytes_per_step":
          copied / steps_per_body, "by_kind": per(kinds), "by_scope": per(scopes)}


def ptx_instructions(ptx_text: str) -> dict[str, dict[str, int]]:
  """Static counts of :data:`PTX_KINDS` instructions in each Pallas kernel of a PTX module
  (entries whose names end in ``_kernel``, as nsa_pallas names its kernel functions; XLA's
  own fusions are left out). Instructions are counted as written, not as executed: one in a
  loop counts once."""
  entries = list(_PTX_ENTRY.finditer(ptx_text))
  out: dict[str, dict[str, int]] = {}
  for i, entry in enumerate(entries):
    name = entry.group(1)
    if not name.endswith("_kernel"):
      continue
    end = entries[i + 1].start() if i + 1 < len(entries) else len(ptx_text)
    # Statements end at ";" (inline assembly puts several on a line) or at a line's end.
    ops = [m.group(1) for st in re.split(r"[;\n]", ptx_text[entry.end():end])
           if (m := _PTX_OPCODE.match(st))]
    out[name] = {kind: sum(op.startswith(prefix) for op in ops)
                 for kind, prefix in PTX_KINDS.items()}
  return out


def nsa_kernel_ptx(cfg: config.Config, *, batch: int, seq_len: int,
                   device) -> dict[str, dict[str, int]]:
  """:func:`ptx_instructions` of the NSA kernels a teacher-forcing step of ``batch`` rows of
  ``seq_len`` tokens runs (the config's head sizes, geometry and compute dtype), compiled for
  ``device``: the selected branch's forward and backward (block indices as a training step's
  shapes give them, so the key-major forward when they would take it), the window branch's,
  the block choice. The compressed branch is cuDNN's, not compiled here."""
  m = cfg.model
  B, T, G, D = batch, seq_len, m.num_kv_groups, m.head_dim
  R = m.num_heads // G
  dtype = jnp.dtype(m.compute_dtype)
  sharding = jax.sharding.SingleDeviceSharding(device)
  spec = lambda *shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)  # noqa: E731
  q, k = spec(B, T, G, R, D), spec(B, T, G, D)
  pos, idx = spec(B, T, dt=jnp.int32), spec(B, T, G, m.num_select, dt=jnp.int32)
  k_cmp = spec(B, nsa.num_compressed_blocks(T, m.block_len, m.block_stride), G, D)
  grad = lambda f: jax.grad(lambda *a: jnp.sum(f(*a)), (0, 1, 2))  # noqa: E731
  programs = [
      (grad(lambda q, k, v, i, p: nsa_pallas.selected_attention(q, k, v, i, p, m.select_len,
                                                                 False)), (q, k, k, idx, pos)),
      (grad(lambda q, k, v: nsa_pallas.window_attention(q, k, v, None, m.window, False)),
       (q, k, k)),
      (lambda q, c, p: nsa_pallas.block_choice(
          q, c, p, num_sel=-(-T // m.select_len), block_len=m.block_len,
          block_stride=m.block_stride, select_len=m.select_len, num_select=m.num_select,
          interpret=False), (q, k_cmp, pos))]
  kernels: dict[str, dict[str, int]] = {}
  # A program loaded from a persistent compilation cache is not compiled, so nothing is dumped
  # (the dump folder is not part of the cache key): the cache is off meanwhile.
  cache = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    with tempfile.TemporaryDirectory() as dump, gpu_paths():
      for fn, args in programs:
        jax.jit(fn).lower(*args).compile(compiler_options={"xla_dump_to": dump})
      for path in sorted(Path(dump).glob("*.ptx")):
        usage = ptxas_usage(path)
        for name, counts in ptx_instructions(path.read_text()).items():
          used = usage.get(name, {})
          kernels.setdefault(name, {**{k: used[k] for k in PTXAS_KEYS if k in used}, **counts})
  finally:
    jax.config.update("jax_enable_compilation_cache", cache)
  if not kernels:
    raise SystemExit("kernel_count: --ptx: XLA dumped no Pallas kernel's PTX")
  return kernels


PTXAS_KEYS = ("registers", "spill_store_bytes", "spill_load_bytes")
_PTXAS_FUNCTION = re.compile(r"(?:Function properties for |Compiling entry function ')([\w$]+)")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")


def ptxas_report(text: str) -> dict[str, dict[str, int]]:
  """Registers and spill bytes of each ``*_kernel`` function in ``ptxas -v``'s report."""
  out: dict[str, dict[str, int]] = {}
  current = None
  for line in text.splitlines():
    if match := _PTXAS_FUNCTION.search(line):
      current = match.group(1) if match.group(1).endswith("_kernel") else None
    elif current and (match := _PTXAS_SPILLS.search(line)):
      out.setdefault(current, {}).update(spill_store_bytes=int(match.group(1)),
                                         spill_load_bytes=int(match.group(2)))
    elif current and (match := _PTXAS_REGISTERS.search(line)):
      out.setdefault(current, {})["registers"] = int(match.group(1))
  return out


def ptxas_usage(ptx_path: Path) -> dict[str, dict[str, int]]:
  """:func:`ptxas_report` of a PTX file assembled for its own target by the CUDA toolkit's
  ``ptxas`` (on the PATH or in /usr/local/cuda/bin); empty without one. Registers a thread
  (255 at most: past them values spill to local memory) bound how many programs an SM runs
  at once; spills are memory traffic in the kernel's loops."""
  toolkit = Path("/usr/local/cuda/bin/ptxas")
  ptxas = shutil.which("ptxas") or (str(toolkit) if toolkit.exists() else None)
  target = re.search(r"^\.target\s+(\w+)", ptx_path.read_text(), re.MULTILINE)
  if ptxas is None or target is None:
    return {}
  done = subprocess.run([ptxas, f"-arch={target.group(1)}", "-v", str(ptx_path), "-o",
                         os.devnull], capture_output=True, text=True, check=False)
  if done.returncode:
    error = (done.stderr.strip().splitlines() or ["no message"])[-1]
    print(f"kernel_count: {ptxas} failed on {ptx_path.name} (registers not reported): {error}",
          file=sys.stderr)
    return {}
  return ptxas_report(done.stdout + done.stderr)


def count_decode(cfg: config.Config, *, batch: int, capacity: int, decode_path: str,
                 device) -> dict[str, Any]:
  """Compiles ``decode.generate``'s step loop for ``device`` and counts its launches."""
  model = outside_tf(Transformer(cfg.model))
  params = jax.eval_shape(lambda: init_params(cfg.model, jax.random.PRNGKey(0)))
  cache = jax.eval_shape(lambda: init_cache(cfg.model, batch, capacity))
  sharding = jax.sharding.SingleDeviceSharding(device)
  on_device = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)  # noqa: E731
  prompt_len = capacity // 2
  args = jax.tree.map(on_device, (
      params, jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32),
      jax.ShapeDtypeStruct((batch,), jnp.int32), cache,
      jax.ShapeDtypeStruct((batch, VOCAB_SIZE), jnp.float32)))
  max_new = 2 * decode.STEPS_PER_CHECK

  def rollout(params, prompt, prompt_len_B, cache, logits):
    return decode.generate(model, params, prompt, prompt_len_B, max_new=max_new,
                           capacity=capacity, prompt_cache=cache, first_logits_BV=logits)

  with decode.decode_kernels(decode_path), gpu_paths():
    copies = decode.step_copies()
    text = jax.jit(rollout).lower(*args).compile().as_text()
  return {"decode": decode_path, "batch": batch, "capacity": capacity, "step_copies": copies,
          **step_launches(text, copies)}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m train.kernel_count", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="arc1", help="shipped config name or YAML path")
  parser.add_argument("--batch", type=int, default=32, help="decoding rows")
  parser.add_argument("--capacity", type=int, default=2048, help="KV-cache slots")
  parser.add_argument("--decode", default=None,
                      help="decoding kernels to count (decode.DECODE_KERNELS), comma-separated "
                           "(default: all of them, none with --ptx)")
  parser.add_argument("--ptx", default="", metavar="BxT[,BxT]",
                      help="the NSA training kernels' PTX instructions at these shapes")
  parser.add_argument("--out", default="", help="JSON results file")
  parser.add_argument("overrides", nargs="*", help="section.key=value")
  return parser.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_args(sys.argv[1:] if argv is None else argv)

  def usage_error(message: str):  # one line and exit code 2, as train.bench's
    print(f"kernel_count: {message}", file=sys.stderr)
    raise SystemExit(2)

  try:
    cfg = config.load(args.config, args.overrides)
  except config.ConfigError as err:
    usage_error(str(err))
  shapes = []
  for case in filter(None, args.ptx.split(",")):
    match = re.fullmatch(r"(\d+)x(\d+)", case.strip())
    if not match or not all(int(n) > 0 for n in match.groups()):
      usage_error(f"--ptx {case!r}: expected rows x tokens, e.g. 32x2048")
    shapes.append(tuple(int(n) for n in match.groups()))
  if args.decode is None:
    args.decode = "" if shapes else ",".join(decode.DECODE_KERNELS)
  unknown = [p for p in args.decode.split(",") if p and p not in decode.DECODE_KERNELS]
  if unknown:
    usage_error(f"--decode: unknown decoding kernels {unknown} (known: "
                f"{', '.join(decode.DECODE_KERNELS)})")
  if args.batch < 1 or args.capacity < 1:
    usage_error(f"--batch and --capacity: at least 1 each, got {args.batch} and "
                f"{args.capacity}")
  if args.out:
    try:
      faults.check_writable_file(args.out, "--out")
    except faults.OutputError as err:
      usage_error(str(err))
  device, how = gpu_device()
  ptx = []
  for batch, seq_len in shapes:
    kernels = nsa_kernel_ptx(cfg, batch=batch, seq_len=seq_len, device=device)
    ptx.append({"batch": batch, "seq_len": seq_len, "kernels": kernels})
    print(f"PTX of the NSA kernels at {batch} x {seq_len} ({how}), instructions as written:")
    for name, counts in kernels.items():
      print(f"  {name}: " + ", ".join(f"{k} {n}" for k, n in counts.items() if n), flush=True)
  rows = []
  for path in [p for p in args.decode.split(",") if p]:
    row = count_decode(cfg, batch=args.batch, capacity=args.capacity, decode_path=path,
                       device=device)
    rows.append(row)
    top = ", ".join(f"{s} {n:g}" for s, n in list(row["by_scope"].items())[:6])
    print(f"decode={path}: {row['launches_per_step']:g} launches a step "
          f"({args.batch} rows, {args.capacity}-slot cache, {how}), copies "
          f"{row['copied_bytes_per_step']:g} bytes a step; {top}", flush=True)
  result = {"target": how, "config": args.config, "overrides": args.overrides,
            "jax": jax.__version__, "rows": rows, "ptx": ptx}
  if args.out:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(output.jsonable(result), indent=2) + "\n")


if __name__ == "__main__":
  main()
