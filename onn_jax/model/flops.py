"""Analytic FLOP count of Tiny-ONN per token, by part and by attention variant, and the peak
FLOP/s of known accelerators: the model-FLOPs utilisation that ``train.bench`` reports.

A matmul of an [n, k] by a [k, m] matrix counts 2*n*k*m. The embedding lookup, norms, RoPE,
softmax and other elementwise work are not counted.
"""

from __future__ import annotations

from onn_jax.config import ModelConfig
from onn_jax.data.tokens import VOCAB_SIZE
from onn_jax.model.nsa import num_compressed_blocks, num_selection_blocks

# Dense bf16 tensor-core peak (FLOP/s, without sparsity), matched as a substring of
# ``device.device_kind``; the first match wins, so more specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
)


def _nsa_layer(m: ModelConfig, T: int) -> dict[str, float]:
  """NSA: q (C*H*D), the fused k/v of the three branches (C*6*G*D), the gate (C*3H, or
  C*h + h*3H with a hidden layer) and the output (H*D*C); the compression MLPs for keys and
  values over ``N = num_compressed_blocks(T)`` blocks per group; per query head QK and PV at
  2*D each per key over the keys the branches compute (all N compressed blocks,
  ``num_select * select_len`` selected, ``min(window, T)`` window keys) plus the selection
  scores (2*G*N*J, ``J`` selection blocks)."""
  C, H, G, D = m.d_model, m.num_heads, m.num_kv_groups, m.head_dim
  N = num_compressed_blocks(T, m.block_len, m.block_stride)
  J = num_selection_blocks(T, m.select_len)
  gate = 2 * C * 3 * H if not m.gate_hidden else 2 * (C * m.gate_hidden + m.gate_hidden * 3 * H)
  mlp_per_block = 2 * (m.block_len * D * 2 * D) + 2 * (2 * D * D)
  keys = N + m.num_select * m.select_len + min(m.window, T)
  return {"projections": 2 * C * H * D + 2 * C * 6 * G * D + gate + 2 * H * D * C,
          "compression": 2 * G * N * mlp_per_block / T,
          "attention": H * 4 * D * keys + 2 * G * N * J}


def _full_layer(m: ModelConfig, T: int) -> dict[str, float]:
  """Causal GQA: q, k/v (C*2*G*D) and output projections; QK and PV over the causal keys,
  ``(T + 1) / 2`` per query on average (what a causal kernel computes; XLA's masked dense
  attention computes all T)."""
  C, H, G, D = m.d_model, m.num_heads, m.num_kv_groups, m.head_dim
  return {"projections": 2 * C * H * D + 2 * C * 2 * G * D + 2 * H * D * C,
          "attention": H * 4 * D * (T + 1) / 2}


def _dynsmlora_layer(m: ModelConfig, T: int) -> dict[str, float]:
  """The causal GQA base, plus the delta gate (2*C*E cosine) and every one of the E deltas
  (all are computed: 2*C*r down and 2*r*(H + 2G)*D up per delta)."""
  E, r = m.lora_experts, m.lora_rank
  width = (m.num_heads + 2 * m.num_kv_groups) * m.head_dim
  parts = _full_layer(m, T)
  parts["attn_lora"] = 2 * m.d_model * E + E * (2 * m.d_model * r + 2 * r * width)
  return parts


ATTENTION_FLOPS = {"nsa": _nsa_layer, "full": _full_layer, "dynsmlora": _dynsmlora_layer}


def forward_flops_per_token(m: ModelConfig, seq_len: int, active_experts: float
                            ) -> dict[str, float]:
  """Forward matmul FLOPs per token of Tiny-ONN at sequence length T, by part.

  Per layer: the attention of ``m.attention`` (``projections``, ``attention`` and, by variant,
  ``compression`` or ``attn_lora``; see the ``_*_layer`` functions), ``moe_gate`` (the cosine
  against E prototypes, 2*C*E) and ``experts`` (``active_experts`` expert MLPs, 2 * 2*C*F
  each). Then ``lm_head`` (2*C*V) once. Returns the parts and their ``total`` (float FLOPs per
  token).
  """
  L = m.num_layers
  parts = {k: L * v for k, v in ATTENTION_FLOPS[m.attention](m, seq_len).items()}
  parts["moe_gate"] = L * 2 * m.d_model * m.num_experts
  parts["experts"] = L * active_experts * 4 * m.d_model * m.expert_hidden
  parts["lm_head"] = 2 * m.d_model * VOCAB_SIZE
  parts = {k: float(v) for k, v in parts.items()}
  parts["total"] = sum(parts.values())
  return parts


def model_flops_per_token(m: ModelConfig, seq_len: int, active_experts: float, *,
                          training: bool = True) -> float:
  """FLOPs per token of a step: the forward count, times 3 for forward + backward."""
  forward = forward_flops_per_token(m, seq_len, active_experts)["total"]
  return 3.0 * forward if training else forward


def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of a device kind string, or None when unknown."""
  for name, peak in PEAK_BF16_FLOPS:
    if name.lower() in device_kind.lower():
      return peak
  return None
