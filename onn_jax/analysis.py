"""What the Colab notebooks compute, as tested library functions.

The notebooks in ``colab/`` stay thin: every line that does more than call a function lives
here. Four groups:

- set-up: :func:`notebook_overrides` (tiny sizes under ``ONN_JAX_NOTEBOOK_TINY=1``, the
  few-minute CPU sizes otherwise) and :func:`load_config` (a config shipped with the package,
  by name, or a YAML path);
- free running: :func:`task_batch` serialises tasks the way training does,
  :func:`rollouts` decodes every answer from its prompt (greedy, or EAVI's excursion feed),
  :func:`summarise_rollouts` / :func:`free_running_exact_match` score them and
  :func:`render_rollouts` draws them next to the targets;
- routing: :func:`grid_positions` maps each token to its (row, col) inside its grid,
  :func:`routing_table` counts, from the experts that each DynMoE layer sows as
  ``intermediates/used_experts``, which experts fire on which token ids and grid cells,
  :func:`plot_routing` draws that;
- runs: :func:`expert_history` reads expert activity and reset events from a metrics.jsonl,
  :func:`format_table` prints records, :func:`show` displays PNG files inline.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from onn_jax import config, plots, steps
from onn_jax.config import Config
from onn_jax.data.pipeline import collate
from onn_jax.data.serialize import decode_grid, fit
from onn_jax.data.tasks import Task
from onn_jax.data.tokens import END, IN, NEWLINE, NUM_COLORS, OUT, VOCAB_SIZE, token_name
from onn_jax.model.transformer import Transformer

TINY_ENV = "ONN_JAX_NOTEBOOK_TINY"
NOTEBOOKS = ("quickstart", "eavi", "experts")

# Seconds-sized runs for the test that executes every notebook. The three notebooks share the
# model, data and teacher-forcing schedule, so one persistent compilation cache serves them all.
TINY_OVERRIDES: tuple[str, ...] = (
    "model.d_model=32", "model.num_heads=4", "model.num_kv_groups=2", "model.head_dim=8",
    "model.block_len=8", "model.block_stride=4", "model.select_len=8", "model.num_select=3",
    "model.window=16", "model.num_experts=4", "model.expert_hidden=32",
    "data.max_grid=4", "data.buckets=[128]",
    "train.batch_size=4", "train.pretrain_steps=4", "train.eavi_steps=0", "train.warmup_steps=1",
    "train.log_every=2",
    "checkpoint.every=100", "checkpoint.async_save=false",
    "eval.max_tasks=2", "eval.batch_size=8", "eval.sheet_tasks=2",
)
# Per notebook: (few-minute CPU sizes on top of configs/default.yaml, additions to the tiny
# sizes). The quick start is the default run itself.
NOTEBOOK_SIZES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "quickstart": ((), ()),
    # The notebook runs the two stages separately: eavi_steps is the length of the second.
    "eavi": (("train.pretrain_steps=200", "train.eavi_steps=20", "eavi.warmup_steps=2"),
             ("train.eavi_steps=2", "eavi.warmup_steps=1")),
    "experts": (("train.pretrain_steps=200", "train.eavi_steps=0", "train.reset_every=50"),
                ("train.reset_every=2",)),
}


# ----------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------

def is_tiny() -> bool:
  """Whether ``ONN_JAX_NOTEBOOK_TINY`` asks for tiny sizes (``1``, ``true`` or ``yes``)."""
  return os.environ.get(TINY_ENV, "").strip().lower() in ("1", "true", "yes")


def notebook_overrides(notebook: str, tiny: bool | None = None) -> list[str]:
  """Dotted ``section.key=value`` overrides for one notebook, applied on configs/default.yaml.

  ``tiny`` (default: :func:`is_tiny`) gives a run of a few seconds (the notebook test);
  otherwise the CPU sizes of a few minutes.
  """
  if notebook not in NOTEBOOK_SIZES:
    raise ValueError(f"notebook {notebook!r}: expected one of {', '.join(NOTEBOOKS)}")
  full, tiny_extra = NOTEBOOK_SIZES[notebook]
  if is_tiny() if tiny is None else tiny:
    return list(TINY_OVERRIDES + tiny_extra)
  return list(full)


def load_config(name: str | Path = "default", overrides: Sequence[str] = ()) -> Config:
  """A validated config: a shipped config's name (``default``, ``arc1``, ``arc2``; they are
  installed with the package) or a YAML path, with ``overrides``."""
  return config.load(name, overrides)


def show(*paths: str | Path) -> None:
  """Displays PNG files inline in a notebook; outside IPython prints their paths."""
  try:
    from IPython import get_ipython
    from IPython.display import Image, display
  except ImportError:
    get_ipython = None
  if get_ipython is None or get_ipython() is None:
    for path in paths:
      print(path)
    return
  for path in paths:
    display(Image(filename=str(path)))


def draw_tasks(tasks: Iterable[Task], out_dir: str | Path) -> list[Path]:
  """One PNG per task (every demonstration and test pair) in ``out_dir``; returns the paths."""
  out_dir = Path(out_dir)
  return [plots.render_task(task, out_dir / f"task_{task.id}.png") for task in tasks]


def _cell(value: Any) -> str:
  if value is None:
    return "-"
  if isinstance(value, (float, np.floating)):
    return f"{float(value):.4g}"
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return _cell(value.item())
  return str(value)


def format_table(records: Sequence[dict], keys: Sequence[str]) -> str:
  """A plain-text table of ``records`` (one row each) over ``keys``; missing values print as
  ``-``, floats with 4 significant digits."""
  rows = [[str(k) for k in keys]] + [[_cell(r.get(k)) for k in keys] for r in records]
  widths = [max(len(row[c]) for row in rows) for c in range(len(keys))]
  lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Free running
# ----------------------------------------------------------------------------------------------

def task_batch(tasks: Sequence[Task], cfg: Config) -> tuple[dict[str, np.ndarray],
                                                              list[tuple[str, int]]]:
  """Every (task, test input) with a known output, serialised as in training but with no
  augmentation (identity view, demos in order; trailing demos dropped until the sequence fits
  the longest bucket ``T = data.buckets[-1]``), collated into one batch of width T.

  Returns (batch as from :func:`onn_jax.data.pipeline.collate`, [(task id, test index)] per
  row). Items that do not fit even with one demo are left out.
  """
  length = cfg.data.buckets[-1]
  examples, items = [], []
  for task in tasks:
    for t, (test_input, target) in enumerate(task.test):
      if target is None:
        continue
      example = fit(task.train, test_input, target, length + 1, task_id=task.id, test_index=t)
      if example is not None:
        examples.append(example)
        items.append((task.id, t))
  if not examples:
    raise ValueError(f"no test pair with a known output fits data.buckets[-1]={length} "
                     f"({len(tasks)} tasks)")
  return collate(examples, length), items


@functools.partial(jax.jit, static_argnames=("model", "cfg"))
def _excursion_jit(model: Transformer, params, batch: dict, cfg: Config, rng):
  return steps.excursion(model, params, batch, cfg, rng)


def answer_targets(batch: dict[str, np.ndarray], num_tokens: int) -> np.ndarray:
  """[B, A] ground-truth answer tokens (targets from ``answer_start - 1`` on; A = num_tokens).

  Position k < ``answer_len`` holds answer token k (the last being END); later ones are
  whatever follows and are never compared."""
  targets_BT = np.asarray(batch["targets"])
  k_BA = np.asarray(batch["answer_start"])[:, None] - 1 + np.arange(num_tokens)[None]
  return np.take_along_axis(targets_BT, np.clip(k_BA, 0, targets_BT.shape[1] - 1), axis=1)


def score_rollouts(batch: dict[str, np.ndarray], tokens_BA: np.ndarray
                   ) -> dict[str, np.ndarray]:
  """Compares generated answers with the ground truth, position by position.

  Returns ``exact_B`` (bool: every answer token, END included, matches), ``correct_B``
  (matching answer tokens) and ``answer_len_B``; rows with no answer are never exact.
  The definition of EAVI's ``free_exact`` metric (:func:`onn_jax.steps.score_rollout`).
  """
  tokens_BA = np.asarray(tokens_BA)
  answer_len_B = np.asarray(batch["answer_len"])
  if np.any(answer_len_B > tokens_BA.shape[1]):
    raise ValueError(f"answers of up to {int(answer_len_B.max())} tokens, but only "
                     f"{tokens_BA.shape[1]} generated")
  scores = steps.score_rollout(tokens_BA, {k: np.asarray(batch[k]) for k in
                                           ("targets", "answer_start", "answer_len")})
  return {"exact_B": np.asarray(scores["exact_B"]), "correct_B": np.asarray(scores["correct_B"]),
          "answer_len_B": answer_len_B}


def answer_text(tokens_A: np.ndarray) -> str:
  """Generated tokens up to and including the first END, by name (``3 3 <nl> 3 3 <nl> <end>``);
  shows what a malformed answer holds."""
  tokens = [int(t) for t in np.asarray(tokens_A)]
  if END in tokens:
    tokens = tokens[:tokens.index(END) + 1]
  return " ".join(token_name(t) for t in tokens)


def _take_rows(batch: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
  return {key: value[rows] for key, value in batch.items()}


def rollouts(cfg: Config, params, tasks: Sequence[Task], *, feed: str = "argmax",
             seed: int = 0) -> list[dict]:
  """Decodes the answer of every test pair of ``tasks`` from its prompt, free running.

  ``feed`` is what is fed back (``argmax``: greedy decoding; ``soft`` or ``sample``: EAVI's
  excursion, as in :func:`onn_jax.steps.excursion`). Batches of ``eval.batch_size`` rows (the
  last padded with repeats), one compiled program for all; ``sample`` draws from ``seed``
  folded with the batch's first row.

  Returns one record per test pair: ``task_id``, ``test_index``, ``test_input``, ``target``
  and ``prediction`` (an [h, w] grid, or None when the output is malformed), ``tokens`` (the
  emitted tokens) and ``text`` (:func:`answer_text`), ``exact`` (bool), ``correct`` and
  ``answer_len`` (answer tokens matched / in all, END included).
  """
  batch, items = task_batch(tasks, cfg)
  by_id = {task.id: task for task in tasks}
  run_cfg = config.replace(cfg, eavi={"feed": feed})
  model = Transformer(cfg.model)
  rows = cfg.eval.batch_size
  rng = jax.random.PRNGKey(seed)
  records = []
  for start in range(0, len(items), rows):
    index = np.arange(start, start + rows)
    index = np.where(index < len(items), index, start)  # pad with the chunk's first row
    chunk = _take_rows(batch, index)
    gen = _excursion_jit(model, params, {"inputs": jnp.asarray(chunk["inputs"]),
                                         "answer_start": jnp.asarray(chunk["answer_start"]),
                                         "answer_len": jnp.asarray(chunk["answer_len"])},
                         run_cfg, jax.random.fold_in(rng, start))
    tokens_BA = np.asarray(gen.tokens_BA)
    scores = score_rollouts(chunk, tokens_BA)
    for b in range(min(rows, len(items) - start)):
      task_id, test_index = items[start + b]
      test_input, target = by_id[task_id].test[test_index]
      records.append({
          "task_id": task_id, "test_index": test_index, "test_input": np.asarray(test_input),
          "target": np.asarray(target), "prediction": decode_grid(tokens_BA[b]),
          "tokens": tokens_BA[b], "text": answer_text(tokens_BA[b]),
          "exact": bool(scores["exact_B"][b]), "correct": int(scores["correct_B"][b]),
          "answer_len": int(chunk["answer_len"][b])})
  return records


def free_running_exact_match(cfg: Config, params, tasks: Sequence[Task]) -> float:
  """Fraction of the test pairs of ``tasks`` whose greedy free-running answer is exactly the
  target (see :func:`rollouts`)."""
  return float(summarise_rollouts(rollouts(cfg, params, tasks, feed="argmax"))["exact_match"])


def summarise_rollouts(records: Sequence[dict]) -> dict[str, float | int]:
  """``items``, ``exact_match`` (fraction exactly right), ``token_accuracy`` (answer tokens,
  END included, matched in place, over all of them) and ``malformed`` (answers that do not
  decode to a grid) of :func:`rollouts` records."""
  total = sum(r["answer_len"] for r in records)
  return {"items": len(records),
          "exact_match": float(np.mean([r["exact"] for r in records])) if records else 0.0,
          "token_accuracy": sum(r["correct"] for r in records) / max(total, 1),
          "malformed": sum(r["prediction"] is None for r in records)}


def render_rollouts(records: Sequence[dict], path: str | Path, label: str = "free running",
                    max_rows: int = 8) -> Path:
  """A sheet with one row per record: test input, target, and the decoded answer."""
  rows = [{"title": f"{r['task_id']} [{r['test_index']}]\n"
                    f"{'exact' if r['exact'] else 'miss'} {r['correct']}/{r['answer_len']}",
           "grids": [("test input", r["test_input"]), ("target", r["target"]),
                     (label, r["prediction"])]}
          for r in list(records)[:max_rows]]
  return plots.render_sheet(rows, path)


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
  inter, tokens_per_expert_LE = _routed_forward(model, params, jnp.asarray(inputs_BT),
                                                jnp.asarray(valid_BT))
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


def _figure(figsize: tuple[float, float]):
  # Agg canvas without pyplot, as in onn_jax.plots: no global backend switch in a notebook.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=figsize)
  FigureCanvasAgg(fig)
  return fig


def plot_routing(table: RoutingTable, out_dir: str | Path) -> list[Path]:
  """Writes ``routing_tokens.png`` (per layer: share of each token id routed to each expert,
  and the histogram of active experts per token) and ``routing_cells.png`` (per layer and
  expert: share of the colour tokens at each grid cell that use it). Returns the paths."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  L, E = table.num_layers, table.num_experts
  present_V = np.flatnonzero(table.token_count_V > 0)
  share_LVE = table.token_share()

  fig = _figure((3.0 + 0.45 * len(present_V) + 3.0, 1.0 + 0.4 * E * L))
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
  fig = _figure((side * E + 1.0, side * L + 0.6))
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
