"""train.kernel_count: the launches of a compiled loop body, counted from its HLO text."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import pytest

from onn_jax import decode
from onn_jax.model.transformer import Transformer, init_params
from train import kernel_count

from conftest import tiny_config

# A scheduled module as XLA prints it: a loop whose body launches two fusions (one with a
# tuple shape), a library call and a copy, beside instructions that launch nothing.
HLO = """HloModule jit_f, entry_computation_layout={()->f32[4]{0}}

%fused_computation (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %n = f32[4]{0} negate(%p)
}

%body.1 (arg: (s32[], f32[4])) -> (s32[], f32[4]) {
  %arg = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %x = f32[4]{0} get-tuple-element(%arg), index=1
  %f1 = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused_computation, metadata={op_name="jit(f)/while/body/Transformer/block_3/attn/neg"}
  %f2 = (f32[4]{0}, s32[]) fusion(%f1, %i), kind=kInput, calls=%fused_computation, metadata={op_name="jit(f)/while/body/Transformer/block_0/moe/add"}
  %g = f32[4]{0} get-tuple-element(%f2), index=0
  %c = f32[4]{0} custom-call(%g), custom_call_target="__cublas$gemm"
  %y = f32[4]{0} copy(%c)
  %b = f32[4]{0} bitcast(%y)
  ROOT %t = (s32[], f32[4]{0}) tuple(%i, %b)
}

%cond.1 (arg.1: (s32[], f32[4])) -> pred[] {
  %arg.1 = (s32[], f32[4]{0}) parameter(0)
  %j = s32[] get-tuple-element(%arg.1), index=0
  %k = s32[] constant(8)
  ROOT %lt = pred[] compare(%j, %k), direction=LT
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  %z = s32[] constant(0)
  %t0 = (s32[], f32[4]{0}) tuple(%z, %a)
  %w = (s32[], f32[4]{0}) while(%t0), condition=%cond.1, body=%body.1
  ROOT %r = f32[4]{0} get-tuple-element(%w), index=1
}
"""


def test_the_body_launches_per_step_by_kind_and_scope():
  got = kernel_count.step_launches(HLO, steps_per_body=2)
  assert got["launches_per_step"] == 2.0  # 4 launches, 2 steps a body
  assert got["copied_bytes_per_step"] == 8.0  # one f32[4] copy a body
  assert got["by_kind"] == {"fusion:kLoop": 0.5, "fusion:kInput": 0.5,
                            "custom-call:__cublas$gemm": 0.5, "copy": 0.5}
  assert got["by_scope"]["Transformer/block_N/attn/neg"] == 0.5
  assert got["by_scope"]["Transformer/block_N/moe/add"] == 0.5


def test_a_program_without_a_loop_is_one_line():
  with pytest.raises(ValueError, match="no while loop"):
    kernel_count.step_launches(HLO.split("%body.1")[0], steps_per_body=1)


def test_a_compiled_decoding_loop_parses():
  """The CPU's own compile of generate: its loop body is found and counted, the attention
  and expert layers among its scopes."""
  cfg = tiny_config().model
  model = Transformer(cfg)
  params = init_params(cfg, jax.random.PRNGKey(0))
  prompt = jnp.ones((2, 6), jnp.int32)
  text = jax.jit(lambda p, x: decode.generate(model, p, x, jnp.array([6, 4]), max_new=8,
                                               capacity=16)).lower(params, prompt).compile(
                                                   ).as_text()
  got = kernel_count.step_launches(text, steps_per_body=decode.step_copies())
  assert got["launches_per_step"] > 0
  assert sum(got["by_kind"].values()) == pytest.approx(got["launches_per_step"])
  assert any(s.startswith("Transformer/block_N/attn") for s in got["by_scope"])


CUDA_PLUGIN = (importlib.util.find_spec("jax_plugins") is not None
               and importlib.util.find_spec("jax_plugins.xla_cuda13") is not None)


@pytest.mark.skipif(CUDA_PLUGIN or jax.default_backend() == "gpu",
                    reason="a GPU or the CUDA plugin is here")
def test_without_a_gpu_or_the_cuda_plugin_it_says_what_to_install():
  with pytest.raises(SystemExit, match="pip install jax-cuda13-plugin jax-cuda13-pjrt=="):
    kernel_count.gpu_device()


@pytest.mark.skipif(not CUDA_PLUGIN, reason="needs the CUDA plugin (no GPU needed)")
def test_the_fused_decoding_step_launches_fewer_kernels():
  """Deviceless sm_90 compile of the tiny model: the one-kernel NSA step launches fewer, and
  fewer again with each DynMoE layer one kernel."""
  cfg = tiny_config()
  device, _ = kernel_count.gpu_device()
  rows = {path: kernel_count.count_decode(cfg, batch=4, capacity=64, decode_path=path,
                                          device=device) for path in ("split", "fused", "fused_moe")}
  assert (rows["fused_moe"]["launches_per_step"] < rows["fused"]["launches_per_step"]
          < rows["split"]["launches_per_step"])
  # A kernel for the core and one for the cache writes a layer (fused_moe: and the experts'),
  # and no cache copied.
  triton = "custom-call:__gpu$xla.gpu.triton"
  assert rows["fused"]["by_kind"][triton] == 2 * cfg.model.num_layers
  assert rows["fused_moe"]["by_kind"][triton] == 3 * cfg.model.num_layers
  itemsize = jnp.dtype(cfg.model.compute_dtype).itemsize
  smallest_cache_array = 4 * 64 * cfg.model.num_kv_groups * cfg.model.head_dim * itemsize
  for row in rows.values():
    assert row["copied_bytes_per_step"] < smallest_cache_array


@pytest.mark.skipif(not CUDA_PLUGIN, reason="needs the CUDA plugin (no GPU needed)")
@pytest.mark.parametrize("setting", ["HOIST_CASTS", "HOIST_CONSTS"])
def test_values_hoisted_out_of_the_decoding_loop_leave_its_body(monkeypatch, setting):
  """Deviceless sm_90 compile of the tiny model in bfloat16 (float32 parameters): with
  decode.HOIST_CASTS the loop body no longer converts the weights; with decode.HOIST_CONSTS
  (the one-kernel step) it no longer stacks the compressors' weights nor normalises the
  prototypes (fewer launches a step either way)."""
  consts = setting == "HOIST_CONSTS"
  cfg = tiny_config(model=dict(compute_dtype="bfloat16", **(dict(nsa_impl="pallas") if consts
                                                             else {})))
  device, _ = kernel_count.gpu_device()
  rows = {}
  for hoist in (False, True):
    monkeypatch.setattr(decode, setting, hoist)
    rows[hoist] = kernel_count.count_decode(
        cfg, batch=4, capacity=64, device=device,
        decode_path="fused_xla_block_moe" if consts else "fused_xla_block")
  assert rows[True]["launches_per_step"] < rows[False]["launches_per_step"]
  if not consts:
    assert "Transformer/block_N/moe/convert_element_type" in rows[False]["by_scope"]
    assert "Transformer/block_N/moe/convert_element_type" not in rows[True]["by_scope"]


@pytest.mark.skipif(not CUDA_PLUGIN, reason="needs the CUDA plugin (no GPU needed)")
@pytest.mark.parametrize("head_dim", [32, 128])
def test_the_decoding_kernel_compiles_for_sm90_with_its_widest_tile(head_dim):
  """nsa_pallas.decode_attention at arc1's geometry (a 2048-key cache: one 64-block tile of
  the walk) compiles for sm_90 within its shared memory at D = 32 and at D = 128 (bf16); the
  NSA paper's geometry past DEC_TILE_BYTES does not (XLA's compile reports it)."""
  from onn_jax.model import nsa_pallas
  from onn_jax.model.nsa import num_compressed_blocks
  device, _ = kernel_count.gpu_device()
  sharding = jax.sharding.SingleDeviceSharding(device)

  def compile_at(D, block_len=16, block_stride=8, select_len=32, num_select=8, window=128):
    B, G, R, S = 32, 2, 4, 2048
    N = num_compressed_blocks(S, block_len, block_stride)
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sharding)  # noqa: E731
    args = (spec(B, G, R, D), spec(B, G, R, D), spec(B, N, G, D), spec(B, N, G, D),
            *(spec(B, S, G, D) for _ in range(4)), spec(B, G, R, 3),
            jax.ShapeDtypeStruct((B,), jnp.int32, sharding=sharding))
    fn = lambda *a: nsa_pallas.decode_attention(  # noqa: E731
        *a, num_sel=-(-S // select_len), block_len=block_len, block_stride=block_stride,
        select_len=select_len, num_select=num_select, window=window, interpret=False)
    with kernel_count.gpu_paths():
      jax.jit(fn).lower(*args).compile()

  assert nsa_pallas.decode_sel_tile(block_len=16, block_stride=8, select_len=32,
                                    head_dim=head_dim, itemsize=2, num_sel=64) == 64
  compile_at(head_dim)
  if head_dim == 128:
    paper = dict(block_len=32, block_stride=16, select_len=64, num_select=16, window=512)
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(nsa_pallas, "DEC_TILE_BYTES", 1 << 30)
      with pytest.raises(Exception, match="[Ss]hared memory"):
        compile_at(head_dim, **paper)


def test_array_bytes_of_an_instruction():
  assert kernel_count.array_bytes("%c = bf16[32,2048,2,32]{3,2,1,0} copy(%x)") == 8388608
  assert kernel_count.array_bytes("%c = s32[] copy(%x)") == 4
  assert kernel_count.array_bytes("%c = pred[3]{0} copy(%x)") == 3


# A PTX module as XLA dumps it: two Pallas kernels and an XLA fusion; predicated statements,
# several statements on one line (Triton's inline assembly), labels and directives.
PTX = """
.visible .entry _window_dq_kernel(
\t.param .u64 _window_dq_kernel_param_0
)
{
\t.reg .pred \t%p<3>;
\tmov.u32 %r1, 0x0; @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
\twgmma.fence.sync.aligned;
\twgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%f1}, %rd2, %rd3, 1, 1, 1, 0, 1;
\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r5}, {%r6}, {%f2};
\t@!%p2 st.global.b32 [ %rd4 + 0 ], { %r7 };
\tbar.sync \t0;
\tbarrier.sync.aligned 1;
$L__BB0_2:
\tred.global.add.f32 [%rd5], %f3;
\tldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r8, %r9, %r10, %r11}, [%r12];
\tret;
}
.visible .entry loop_add_fusion(
)
{
\tld.global.f32 %f1, [%rd1];
}
.visible .entry _block_choice_kernel(
)
{
\tatom.global.add.f32 %f1, [%rd1], %f2; st.shared.f32 [%r1], %f1; ld.shared.f32 %f3, [%r1];
\t@%p3 cp.async.cg.shared.global [ %r2 + 0 ], [ %rd2 + 0 ], 0x10, %r3;
}
"""


def test_ptx_instructions_of_each_pallas_kernel():
  got = kernel_count.ptx_instructions(PTX)
  assert set(got) == {"_window_dq_kernel", "_block_choice_kernel"}  # not XLA's fusion
  zero = dict.fromkeys(kernel_count.PTX_KINDS, 0)
  assert got["_window_dq_kernel"] == {**zero, "wgmma": 1, "mma.sync": 1, "ldmatrix": 1,
                                      "bar.sync": 2, "ld.global": 1, "st.global": 1,
                                      "atomic": 1}
  assert got["_block_choice_kernel"] == {**zero, "atomic": 1, "st.shared": 1, "ld.shared": 1,
                                         "cp.async": 1}


PTXAS = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_window_dkdv_kernel' for 'sm_90a'
ptxas info    : Function properties for _window_dkdv_kernel
    104 bytes stack frame, 84 bytes spill stores, 80 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 104 bytes cumulative stack size
ptxas info    : Compiling entry function 'loop_add_fusion' for 'sm_90a'
ptxas info    : Function properties for loop_add_fusion
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers
ptxas info    : Function properties for _window_fwd_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 125 registers, used 1 barriers
ptxas info    : Compiling entry function 'input_reduce_fusion' for 'sm_90a'
ptxas info    : Used 30 registers
"""


def test_ptxas_report_of_each_pallas_kernel():
  assert kernel_count.ptxas_report(PTXAS) == {
      "_window_dkdv_kernel": {"registers": 255, "spill_store_bytes": 84, "spill_load_bytes": 80},
      "_window_fwd_kernel": {"registers": 125, "spill_store_bytes": 0, "spill_load_bytes": 0}}


@pytest.mark.parametrize("args, culprit", [
    (["--config", "nosuch"], "nosuch"), (["--config", "arc1", "train.nosuch=1"], "train.nosuch"),
    (["--config", "arc1", "--ptx", "32"], "--ptx '32': expected rows x tokens"),
    (["--decode", "nosuch"], "--decode: unknown decoding kernels ['nosuch']"),
    (["--batch", "0"], "--batch and --capacity: at least 1 each"),
    (["--out", "."], "--out .: is a folder, not a file"),
    # Overrides stand before and after the options, as in train.main.
    (["train.seed=1", "--config", "arc1", "train.nosuch=1"], "train.nosuch")])
def test_a_bad_config_or_shape_is_one_line_and_exit_code_2(args, culprit, capsys):
  with pytest.raises(SystemExit) as exit_info:
    kernel_count.main(args)
  err = capsys.readouterr().err.strip().splitlines()
  assert exit_info.value.code == 2 and len(err) == 1
  assert err[0].startswith("kernel_count: ") and culprit in err[0]


@pytest.mark.skipif(not CUDA_PLUGIN, reason="needs the CUDA plugin (no GPU needed)")
def test_every_nsa_training_kernel_multiplies_on_tensor_cores():
  """Deviceless sm_90 compile at arc1's geometry: the six Pallas kernels of a training step's
  NSA core are in the PTX, each with tensor-core products (wgmma or mma.sync)."""
  from onn_jax import config
  device, _ = kernel_count.gpu_device()
  got = kernel_count.nsa_kernel_ptx(config.load("arc1"), batch=2, seq_len=512, device=device)
  assert set(got) == {"_selected_fwd_key_kernel", "_selected_bwd_key_kernel",
                      "_window_fwd_kernel", "_window_dq_kernel", "_window_dkdv_kernel",
                      "_block_choice_kernel"}
  for name, counts in got.items():
    assert counts["wgmma"] + counts["mma.sync"] > 0, name
    if kernel_count.shutil.which("ptxas"):  # the CUDA toolkit's assembler: registers too
      assert 0 < counts["registers"] <= 255, name
