"""DynMoE routing: which experts fire on which tokens and grid cells, and expert activity
over a run (the experts notebook)."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from onn_jax import output, plots
from onn_jax.data.tokens import IN, NEWLINE, NUM_COLORS, OUT, VOCAB_SIZE, token_name
from onn_jax.model.transformer import Transformer, outside_tf



# ----------------------------------------------------------------------------------------------
# Routing
# ----------------------------------------------------------------------------------------------

def grid_positions(tokens_BT: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(row_BT, col_BT): the cell of each colour token inside its grid, -1 for every other token.

  A grid starts after an IN or OUT marker; its rows end with NEWLINE (see
  :mod:`onn_jax.data.serialize`). Works on any [..., T] integer array (vectorised over rows).
  """
  tokens = np.asarray(tokens_BT)
  squeeze = tokens.ndim == 1
  tokens = np.atleast_2d(tokens)
  T = tokens.shape[-1]
  pos_T = np.arange(T)
  is_marker = (tokens == IN) | (tokens == OUT)
  is_newline = tokens == NEWLINE
  is_cell = (tokens >= 0) & (tokens < NUM_COLORS)
  # Index of the most recent marker / NEWLINE at or before each position (-1: none yet).
  last_marker = np.maximum.accumulate(np.where(is_marker, pos_T, -1), axis=-1)
  last_break = np.maximum.accumulate(np.where(is_marker | is_newline, pos_T, -1), axis=-1)
  newlines = np.cumsum(is_newline, axis=-1)
  newlines_at_marker = np.take_along_axis(newlines, np.maximum(last_marker, 0), axis=-1)
  row = newlines - np.where(last_marker >= 0, newlines_at_marker, 0)
  col = pos_T - last_break - 1
  inside = is_cell & (last_marker >= 0)
  row, col = np.where(inside, row, -1), np.where(inside, col, -1)
  return (row[0], col[0]) if squeeze else (row, col)


@functools.partial(jax.jit, static_argnames=("model",))
def _routed_forward(model: Transformer, params, inputs_BT, valid_BT):
  (_, _, aux), state = model.apply({"params": params}, inputs_BT, valid_BT,
                                   mutable=["intermediates"])
  return state.get("intermediates", {}), aux["tokens_per_expert"]


def used_experts(model: Transformer, params, inputs_BT, valid_BT) -> tuple[np.ndarray,
                                                                             np.ndarray]:
  """The hard expert mask of every layer, read from what each DynMoE layer sows.

  Returns (used_LBTE float32 0/1, tokens_per_expert_LE: the model's own aux counts of the same
  forward pass).
  """
  inter, tokens_per_expert_LE = _routed_forward(outside_tf(model), params,
                                                jnp.asarray(inputs_BT), jnp.asarray(valid_BT))
  used = []
  for layer in range(model.cfg.num_layers):
    try:
      used.append(inter[f"block_{layer}"]["moe"]["used_experts"][0])
    except (KeyError, IndexError, TypeError):
      raise KeyError(f"block_{layer}/moe: no sown intermediates 'used_experts' (DynMoE must "
                     "call self.sow('intermediates', 'used_experts', used_BTE))") from None
  return np.asarray(jnp.stack(used)), np.asarray(tokens_per_expert_LE)


@dataclasses.dataclass
class RoutingTable:
  """Routing statistics of one batch (counts over valid tokens only).

  used_LBTE: 0/1 expert mask per layer and token.  tokens_BT, valid_BT, row_BT, col_BT: the
  inputs and their grid cells (-1 off-grid).  tokens_per_expert_LE: tokens routed to each
  expert.  active_hist_LK: tokens that used k = 0..E experts.  by_token_LVE / token_count_V:
  tokens of id v routed to e / tokens of id v.  by_cell_LRCE / cell_count_RC: the same by grid
  cell (row, col) of colour tokens.
  """
  used_LBTE: np.ndarray
  tokens_BT: np.ndarray
  valid_BT: np.ndarray
  row_BT: np.ndarray
  col_BT: np.ndarray
  tokens_per_expert_LE: np.ndarray
  active_hist_LK: np.ndarray
  by_token_LVE: np.ndarray
  token_count_V: np.ndarray
  by_cell_LRCE: np.ndarray
  cell_count_RC: np.ndarray

  @property
  def num_layers(self) -> int:
    return self.used_LBTE.shape[0]

  @property
  def num_experts(self) -> int:
    return self.used_LBTE.shape[-1]

  def experts_per_token(self) -> np.ndarray:
    """[L] mean number of experts a valid token uses."""
    k_K = np.arange(self.active_hist_LK.shape[1])
    return (self.active_hist_LK @ k_K) / max(int(self.valid_BT.sum()), 1)

  def token_share(self) -> np.ndarray:
    """[L, V, E] fraction of the tokens of id v that use expert e (NaN for absent ids)."""
    with np.errstate(invalid="ignore", divide="ignore"):
      return self.by_token_LVE / self.token_count_V[None, :, None]

  def cell_share(self) -> np.ndarray:
    """[L, R, C, E] fraction of the colour tokens at cell (r, c) that use expert e (NaN where
    the batch has none)."""
    with np.errstate(invalid="ignore", divide="ignore"):
      return self.by_cell_LRCE / self.cell_count_RC[None, :, :, None]

  def silent_experts(self) -> list[list[int]]:
    """Per layer, the experts no token of this batch used."""
    return [np.flatnonzero(row == 0).tolist() for row in self.tokens_per_expert_LE]

  def token_records(self, layer: int) -> list[dict]:
    """One record per token id present: ``token`` (its name), ``count`` and ``e<k>``, the
    share of its uses routed to expert k in ``layer``."""
    share_VE = self.token_share()[layer]
    return [{"token": token_name(int(v)), "count": int(self.token_count_V[v]),
             **{f"e{e}": float(share_VE[v, e]) for e in range(self.num_experts)}}
            for v in np.flatnonzero(self.token_count_V > 0)]

  def summary(self) -> list[dict]:
    """One record per layer: experts per token, tokens using one / several experts, the
    busiest expert and the silent ones."""
    per_token = self.experts_per_token()
    return [{"layer": l, "experts_per_token": float(per_token[l]),
             "tokens_with_1": int(self.active_hist_LK[l, 1]),
             "tokens_with_2+": int(self.active_hist_LK[l, 2:].sum()),
             "busiest_expert": int(np.argmax(self.tokens_per_expert_LE[l])),
             "silent_experts": self.silent_experts()[l]} for l in range(self.num_layers)]


def routing_table(model: Transformer, params, batch: dict[str, np.ndarray]) -> RoutingTable:
  """Routing statistics of ``model`` on ``batch`` (``inputs`` and ``valid``, [B, T]).

  Counts use the sown ``used_experts`` masks; ``tokens_per_expert_LE`` equals the model's
  ``tokens_per_expert`` aux (checked here, so a drift between the two fails loudly).
  """
  tokens_BT = np.asarray(batch["inputs"])
  valid_BT = np.asarray(batch["valid"]).astype(bool)
  used_LBTE, aux_LE = used_experts(model, params, tokens_BT, valid_BT)
  used_LBTE = used_LBTE > 0
  L, _, _, E = used_LBTE.shape
  row_BT, col_BT = grid_positions(tokens_BT)
  used_LNE = used_LBTE[:, valid_BT]  # N valid tokens
  tok_N, row_N, col_N = tokens_BT[valid_BT], row_BT[valid_BT], col_BT[valid_BT]
  counts_LE = used_LNE.sum(axis=1).astype(np.float64)
  if not np.allclose(counts_LE, aux_LE):
    raise RuntimeError(f"sown expert masks count {counts_LE.tolist()} tokens per expert, "
                         f"the model's aux {np.asarray(aux_LE).tolist()}")
  active_LN = used_LNE.sum(axis=-1)
  active_hist_LK = np.stack([np.bincount(a, minlength=E + 1) for a in active_LN])
  by_token_LVE = np.zeros((L, VOCAB_SIZE, E))
  np.add.at(by_token_LVE, (slice(None), tok_N), used_LNE.astype(np.float64))
  token_count_V = np.bincount(tok_N, minlength=VOCAB_SIZE).astype(np.float64)
  cell_N = row_N >= 0
  R = int(row_N.max()) + 1 if cell_N.any() else 1
  C = int(col_N.max()) + 1 if cell_N.any() else 1
  by_cell_LRCE = np.zeros((L, R, C, E))
  np.add.at(by_cell_LRCE, (slice(None), row_N[cell_N], col_N[cell_N]),
            used_LNE[:, cell_N].astype(np.float64))
  cell_count_RC = np.zeros((R, C))
  np.add.at(cell_count_RC, (row_N[cell_N], col_N[cell_N]), 1.0)
  return RoutingTable(used_LBTE=used_LBTE, tokens_BT=tokens_BT, valid_BT=valid_BT,
                      row_BT=row_BT, col_BT=col_BT, tokens_per_expert_LE=counts_LE,
                      active_hist_LK=active_hist_LK, by_token_LVE=by_token_LVE,
                      token_count_V=token_count_V, by_cell_LRCE=by_cell_LRCE,
                      cell_count_RC=cell_count_RC)


def plot_routing(table: RoutingTable, out_dir: str | Path) -> list[Path]:
  """Writes ``routing_tokens.png`` (per layer: share of each token id routed to each expert,
  and the histogram of active experts per token) and ``routing_cells.png`` (per layer and
  expert: share of the colour tokens at each grid cell that use it). Returns the paths."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  L, E = table.num_layers, table.num_experts
  present_V = np.flatnonzero(table.token_count_V > 0)
  share_LVE = table.token_share()

  fig = output.figure((3.0 + 0.45 * len(present_V) + 3.0, 1.0 + 0.4 * E * L))
  axes = fig.subplots(L, 2, squeeze=False, gridspec_kw={"width_ratios": [3, 1]})
  for l in range(L):
    ax = axes[l][0]
    mesh = ax.imshow(share_LVE[l][present_V].T, vmin=0.0, vmax=1.0, cmap="viridis",
                     aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(present_V)))
    ax.set_xticklabels([token_name(int(v)) for v in present_V], fontsize=7, rotation=90)
    ax.set_yticks(range(E))
    ax.set_ylabel(f"layer {l}\nexpert")
    fig.colorbar(mesh, ax=ax, pad=0.01, label="share of the token's uses")
    hist = axes[l][1]
    hist.bar(range(E + 1), table.active_hist_LK[l], color="C0")
    hist.set_xlabel("experts used", fontsize=8)
    hist.set_ylabel("tokens", fontsize=8)
    hist.set_title(f"{table.experts_per_token()[l]:.2f} per token", fontsize=8)
  axes[0][0].set_title("which experts fire on which token (colours 0-9, markers)")
  fig.tight_layout()
  tokens_png = out_dir / "routing_tokens.png"
  fig.savefig(tokens_png, dpi=90)

  share_LRCE = table.cell_share()
  R, C = table.cell_count_RC.shape
  side = 0.35 * max(R, C) + 0.6
  fig = output.figure((side * E + 1.0, side * L + 0.6))
  axes = fig.subplots(L, E, squeeze=False)
  for l in range(L):
    for e in range(E):
      ax = axes[l][e]
      ax.imshow(np.ma.masked_invalid(share_LRCE[l, :, :, e]), vmin=0.0, vmax=1.0,
                cmap="viridis", interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if l == 0:
        ax.set_title(f"expert {e}", fontsize=8)
      if e == 0:
        ax.set_ylabel(f"layer {l}", fontsize=8)
  fig.suptitle("share of grid cells (row, col) routed to each expert", fontsize=9)
  fig.tight_layout()
  cells_png = out_dir / "routing_cells.png"
  fig.savefig(cells_png, dpi=90)
  return [tokens_png, cells_png]


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------

def expert_history(metrics_path: str | Path) -> dict[str, Any]:
  """Expert activity over a run, from its metrics.jsonl.

  Returns ``steps`` [N] (logged steps with ``tokens_per_expert``), ``tokens_per_expert``
  [N, L, E] (that step's batch counts), ``silent`` [N, L, E] (bool: no token in that step's
  batch), ``dead_experts`` [N] (the logged count of experts idle since the last reset; NaN if
  absent), ``resets`` (the ``"event": "reset"`` records that reset at least one expert, in
  order), ``reset_steps`` (every step at which the reset ran, whatever it found),
  ``reset_counts`` [L, E] (times each expert was reset) and ``records`` (per logged step: ``step``,
  ``dead_experts``, ``silent_in_batch``, ``experts_reset_here``: for :func:`format_table`).
  """
  records, resets = plots.read_metrics(metrics_path)
  rows = [r for r in records if isinstance(r.get("tokens_per_expert"), list)]
  if not rows:
    raise ValueError(f"{metrics_path}: no record holds tokens_per_expert")
  counts_NLE = np.asarray([r["tokens_per_expert"] for r in rows], np.float64)
  if counts_NLE.ndim != 3:
    raise ValueError(f"{metrics_path}: tokens_per_expert is not [layer][expert] in every record")
  dead_N = np.asarray([float(r["dead_experts"]) if isinstance(r.get("dead_experts"),
                                                              (int, float)) else np.nan
                       for r in rows])
  reset_counts_LE = np.zeros(counts_NLE.shape[1:], np.int64)
  for event in resets:
    layer = event.get("layer")
    for e in event.get("experts") or []:
      if isinstance(layer, int) and 0 <= layer < reset_counts_LE.shape[0] \
          and 0 <= e < reset_counts_LE.shape[1]:
        reset_counts_LE[layer, e] += 1
  steps_N = np.asarray([r["step"] for r in rows])
  silent_NLE = counts_NLE == 0
  table = [{"step": int(s), "dead_experts": None if np.isnan(d) else int(d),
            "silent_in_batch": int(silent.sum()),
            "experts_reset_here": sum(len(e.get("experts") or []) for e in resets
                                      if e.get("step") == s)}
           for s, d, silent in zip(steps_N, dead_N, silent_NLE)]
  return {"steps": steps_N, "tokens_per_expert": counts_NLE, "silent": silent_NLE,
          "dead_experts": dead_N, "resets": [e for e in resets if e.get("experts")],
          "reset_steps": sorted({e["step"] for e in resets if "step" in e}),
          "reset_counts": reset_counts_LE,
          "records": table}
