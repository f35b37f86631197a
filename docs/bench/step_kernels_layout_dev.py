"""Session 33 dev (needs commit 5f14626: steps.UPDATE_LAYOUT was removed in session 34, the
flat update being slower in the step): the arc1 teacher-forcing step compiled for sm_90
without a GPU (jax with
jax-cuda13-plugin, no device: train.kernel_count.gpu_device), under steps.UPDATE_LAYOUT=ARG
(tree or flat); prints the entry computation's kernels (fusions, library calls, copies), those
outside the model (the optimizer update, the norms, the guard) by op name, and the copies.
Usage: JAX_PLATFORMS=cpu python docs/bench/step_kernels_layout_dev.py tree|flat
(docs/bench/step_kernels_update_layout_sm90_2026-12-06.json holds session 33's counts)."""
import sys, re, functools, jax
from onn_jax import config, steps
from onn_jax.model import nsa
from train import kernel_count as kc, bench
if not hasattr(steps, "UPDATE_LAYOUT"):
  sys.exit("steps.UPDATE_LAYOUT was removed in session 34: run this at commit 5f14626")
steps.UPDATE_LAYOUT = sys.argv[1]
dev, how = kc.gpu_device()
cfg = config.load("configs/arc1.yaml")
nsa.PALLAS_CMP_ATTENTION = "chunked"
jax.config.update("jax_enable_compilation_cache", False)
with kc.gpu_paths():
  r = bench.StepRunner(cfg, bench.FULL_SIZES)
  fn = functools.partial(steps.train_step, model=r.model, cfg=cfg)
  state = jax.eval_shape(r.fresh_state)
  batch = jax.eval_shape(lambda: r.batch(2048))
  sh = jax.sharding.SingleDeviceSharding(dev)
  state, batch = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), (state, batch))
  text = jax.jit(fn, donate_argnums=0).lower(state, batch).compile().as_text()
i = text.index('ENTRY'); entry = text[i:text.index('\n}\n', i)]
top = tot = 0
for l in entry.splitlines():
  m = re.match(r'\s*(?:ROOT )?%(\S+) = (\(.*?\)|\S+) (fusion|custom-call|copy)\(', l)
  if not m: continue
  tot += 1
  md = re.search(r'op_name="([^"]*)"', l)
  nm = md.group(1) if md else ''
  if 'block_' not in nm and 'jvp(' not in nm and 'transpose(' not in nm: top += 1
print(sys.argv[1], "kernels in the entry", tot, "outside the model", top)
from collections import Counter
c = Counter()
for l in entry.splitlines():
  m = re.match(r'\s*(?:ROOT )?%(\S+) = (\(.*?\)|\S+) (fusion|custom-call|copy)\(', l)
  if not m: continue
  md = re.search(r'op_name="([^"]*)"', l)
  nm = md.group(1) if md else ''
  if 'block_' not in nm and 'jvp(' not in nm and 'transpose(' not in nm:
    c[(m.group(3), nm[-60:])] += 1
for k, v in c.most_common(15): print(v, k)
DT = {"bf16": 2, "f32": 4, "s32": 4, "u32": 4, "pred": 1}
tot_b = 0; n = 0
for l in entry.splitlines():
  m = re.match(r'\s*(?:ROOT )?%(\S+) = (\w+)\[([\d,]*)\]\S* copy\((%\S+)\)', l)
  if not m: continue
  k = 1
  for d in m.group(3).split(','):
    if d: k *= int(d)
  b = k * DT.get(m.group(2), 4); tot_b += b; n += 1
  if b > 2e6: print("   copy", m.group(2), m.group(3), f"{b/1e6:.1f}MB", m.group(4))
print("copies", n, f"{tot_b/1e6:.1f} MB")
