"""Session 38 dev: where the NSA decoding kernel's ~12.8 us go (on a GPU:
`OUT=dir python docs/bench/decode_kernel_ablation_dev.py`). The kernel alone (nsa_core's one-token
forward, arc1 geometry, 32 rows x 2048 keys, 32 calls a program, as the session-20
sweep timed it), with parts of its body cut out by editing its source (timing only: the cut
kernels compute wrong numbers). Writes $OUT/dec_ablate.json."""
import inspect, json, os, textwrap
from pathlib import Path
from onn_jax.model import nsa_pallas
from train import nsa_kernel_check as kc

SRC = textwrap.dedent(inspect.getsource(nsa_pallas._decode_kernel))
CUTS = {
    "full": [],
    "no_topk": [("if num_tiles == 1 and ranked_top:",
                 "if True:\n      val_1K = jnp.ones_like(val_1K); "
                 "idx_1K = jax.lax.broadcasted_iota(jnp.int32, idx_1K.shape, 1)\n"
                 "    elif False:")],
    "no_window": [("out_win_PD = _attend_masked(q_PD, *(early_W or window_kv()), ok_W, scale)",
                   "out_win_PD = jnp.zeros_like(out_cmp_PD)")],
    "no_selected": [("out_slc_PD = _attend_masked(",
                     "out_slc_PD = out_cmp_PD * 1e-30 + jnp.max(idx_1K).astype(_F32) * 1e-30"
                     " + _nothing(")],
    "cmp_only": [("out_slc_PD = _attend_masked(", "out_slc_PD = out_cmp_PD * 1e-30 + _nothing("),
                 ("out_win_PD = _attend_masked(q_PD, *(early_W or window_kv()), ok_W, scale)",
                  "out_win_PD = jnp.zeros_like(out_cmp_PD)")],
    "empty": [("  gate = [", "  out_cmp_PD = out_slc_PD = out_win_PD = "
               "jnp.zeros(q_PD.shape, _F32)\n  gate = [")],
    "window_only": [("  gate = [", "  out_cmp_PD = jnp.zeros_like(out_win_PD); "
                     "out_slc_PD = out_cmp_PD\n  gate = [")],
}
out = {"device": __import__("jax").devices()[0].device_kind, "rows": {}}
orig = nsa_pallas._decode_kernel
for flags in ({}, {"DEC_RANKED_TOP": True, "DEC_OVERLAP_IOTA": True, "DEC_EARLY_LOADS": True}):
  for name, cuts in CUTS.items():
    src = SRC
    for a, b in cuts:
      assert a in src, (name, a)
      src = src.replace(a, b, 1)
    ns = dict(vars(nsa_pallas), _nothing=lambda *a: 0.0)
    exec(compile(src, f"<{name}>", "exec"), ns)
    nsa_pallas._decode_kernel = ns["_decode_kernel"]
    key = name + ("+all" if flags else "")
    try:
      with kc.module_settings(**flags):
        res = {}
        kc.decode_bench(res, [(32, 2048)], 20, ["pallas"], calls=32)
      out["rows"][key] = res["decode"][0]["pallas"]
    except Exception as e:  # noqa: BLE001
      out["rows"][key] = {"error": str(e).splitlines()[0][:300]}
    finally:
      nsa_pallas._decode_kernel = orig
    print(key, out["rows"][key], flush=True)
    Path(os.environ["OUT"], "dec_ablate.json").write_text(json.dumps(out, indent=1))
