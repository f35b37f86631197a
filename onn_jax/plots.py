"""Pictures: ARC grids in the ARC colours, contact sheets of predictions, training curves.

matplotlib is imported inside the functions, and figures are drawn by the Agg canvas without
pyplot, so importing ``onn_jax`` stays cheap, no display is needed and a notebook's backend is
never switched.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from onn_jax import output

# The ARC palette, indexed by colour 0..9.
ARC_COLORS = (
    "#000000",  # 0 black
    "#0074D9",  # 1 blue
    "#FF4136",  # 2 red
    "#2ECC40",  # 3 green
    "#FFDC00",  # 4 yellow
    "#AAAAAA",  # 5 grey
    "#F012BE",  # 6 magenta
    "#FF851B",  # 7 orange
    "#7FDBFF",  # 8 sky
    "#870C25",  # 9 maroon
)


def _cmap():
  from matplotlib.colors import ListedColormap
  return ListedColormap(list(ARC_COLORS), name="arc")


def draw_grid(ax: Any, grid: np.ndarray | None, title: str = "") -> None:
  """Draws an [h, w] colour grid on ``ax`` with thin cell borders; None draws a blank panel."""
  ax.set_xticks([])
  ax.set_yticks([])
  if title:
    ax.set_title(title, fontsize=8)
  if grid is None:
    ax.text(0.5, 0.5, "none", ha="center", va="center", fontsize=8, transform=ax.transAxes)
    ax.set_facecolor("#f4f4f4")
    return
  grid_hw = np.asarray(grid)
  if grid_hw.ndim != 2 or grid_hw.size == 0:
    ax.text(0.5, 0.5, "bad grid", ha="center", va="center", fontsize=8, transform=ax.transAxes)
    return
  h, w = grid_hw.shape
  ax.imshow(np.clip(grid_hw, 0, 9), cmap=_cmap(), vmin=-0.5, vmax=9.5, interpolation="nearest")
  # Cell borders make repeated colours countable; skipped on big grids where they'd dominate.
  if max(h, w) <= 30:
    ax.set_xticks(np.arange(-0.5, w, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, h, 1), minor=True)
    ax.grid(which="minor", color="#555555", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
  ax.set_xlabel(f"{h}x{w}", fontsize=6, labelpad=1)


def _short_lines(text: str, width: int = 32) -> str:
  """Each line of a row title at most ``width`` characters, its middle elided: a long task id
  made the layout give up, and every row's title was cut at the figure's edge."""
  half = (width - 1) // 2
  return "\n".join(line if len(line) <= width else f"{line[:half]}…{line[-half:]}"
                   for line in text.split("\n"))


def render_sheet(rows: Sequence[dict], path: str | Path) -> Path:
  """One row of panels per entry: ``{"title": str, "grids": [(label, grid or None), ...]}``."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  num_rows = max(1, len(rows))
  num_cols = max([len(r.get("grids", [])) for r in rows] + [1])
  fig = output.figure((1.8 * num_cols, 2.0 * num_rows))
  axes = fig.subplots(num_rows, num_cols, squeeze=False)
  for r in range(num_rows):
    row = rows[r] if r < len(rows) else {"title": "", "grids": []}
    grids = list(row.get("grids", []))
    for c in range(num_cols):
      ax = axes[r][c]
      if c < len(grids):
        label, grid = grids[c]
        draw_grid(ax, grid, label)
      else:
        ax.axis("off")
    if row.get("title"):
      axes[r][0].set_ylabel(_short_lines(row["title"]), fontsize=7, rotation=0, ha="right",
                            va="center")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  return path


def render_task(task: Any, path: str | Path) -> Path:
  """Every demonstration pair and test pair of a Task, one pair per row."""
  rows = [{"title": f"demo {i}", "grids": [("input", a), ("output", b)]}
          for i, (a, b) in enumerate(task.train)]
  rows += [{"title": f"test {i}", "grids": [("input", a), ("output", b)]}
           for i, (a, b) in enumerate(task.test)]
  rows[0]["title"] = f"{task.id}\n{rows[0]['title']}"
  return render_sheet(rows, path)


def read_metrics(metrics_path: str | Path) -> tuple[list[dict], list[dict]]:
  """(metric records, reset events) from a metrics.jsonl; blank or unparsable lines skipped;
  none when there is no such file (a finished run resumed from its copied checkpoints alone)."""
  records, resets = [], []
  if not Path(metrics_path).is_file():
    return records, resets
  with open(metrics_path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        item = json.loads(line)
      except json.JSONDecodeError:
        continue  # a half-written last line of a live run
      if not isinstance(item, dict):
        continue
      if item.get("event") == "reset":
        resets.append(item)
      elif "step" in item:
        records.append(item)
  return records, resets


def _series(records: list[dict], key: str) -> dict[str, tuple[list[float], list[float]]]:
  """stage -> (steps, values) for the records that hold a finite number under ``key``."""
  out: dict[str, tuple[list[float], list[float]]] = {}
  for rec in records:
    value = rec.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
      steps, values = out.setdefault(str(rec.get("stage", "train")), ([], []))
      steps.append(rec["step"])
      values.append(float(value))
  return out


def _line_plot(records: list[dict], keys: Sequence[str], ylabel: str, path: Path,
               log: bool = False, title: str = "") -> Path:
  fig = output.figure((7, 4))
  ax = fig.subplots()
  drawn = 0
  styles = ("-", "--", ":", "-.")
  stages: list[str] = []
  for k, key in enumerate(keys):
    for stage, (steps, values) in _series(records, key).items():
      if stage not in stages:
        stages.append(stage)
      # One colour per metric, one line style per stage.
      ax.plot(steps, values, label=f"{key} ({stage})", linewidth=1, color=f"C{k}",
              linestyle=styles[stages.index(stage) % len(styles)])
      drawn += 1
  if drawn:
    ax.legend(fontsize=7)
    if log and all(v > 0 for k in keys for _, vs in _series(records, k).values() for v in vs):
      ax.set_yscale("log")
  else:
    ax.text(0.5, 0.5, f"no {', '.join(keys)} recorded", ha="center", va="center",
            transform=ax.transAxes)
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title, fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  return path


def _expert_tensor(records: list[dict]) -> tuple[np.ndarray, np.ndarray] | None:
  """(steps [N], share [N, layers, experts]) from ``tokens_per_expert``; experts a layer lacks
  at some step (DynMoE may grow) are NaN."""
  rows = [(r["step"], r["tokens_per_expert"]) for r in records
          if isinstance(r.get("tokens_per_expert"), list) and r["tokens_per_expert"]]
  if not rows:
    return None
  num_layers = max(len(t) for _, t in rows)
  num_experts = max(len(layer) for _, t in rows for layer in t if isinstance(layer, list))
  share_NLE = np.full((len(rows), num_layers, num_experts), np.nan)
  for n, (_, per_layer) in enumerate(rows):
    for l, counts in enumerate(per_layer):
      if not isinstance(counts, list) or not counts:
        continue
      counts_E = np.asarray(counts, dtype=np.float64)
      total = counts_E.sum()
      # Shares rather than raw counts, so batches of different sizes are comparable.
      share_NLE[n, l, :len(counts_E)] = counts_E / total if total > 0 else 0.0
  steps_N = np.asarray([s for s, _ in rows], dtype=np.float64)
  return steps_N, share_NLE


def _step_edges(steps_N: np.ndarray) -> np.ndarray:
  """Cell edges [N+1] around the logged steps for pcolormesh."""
  if len(steps_N) == 1:
    return np.array([steps_N[0] - 0.5, steps_N[0] + 0.5])
  mids = (steps_N[1:] + steps_N[:-1]) / 2
  return np.concatenate([[steps_N[0] - (mids[0] - steps_N[0])], mids,
                         [steps_N[-1] + (steps_N[-1] - mids[-1])]])


def _experts_plot(records: list[dict], resets: list[dict], path: Path) -> Path:
  data = _expert_tensor(records)
  if data is None:
    fig = output.figure((6, 2))
    ax = fig.subplots()
    ax.text(0.5, 0.5, "no tokens_per_expert recorded", ha="center", va="center",
            transform=ax.transAxes)
    ax.axis("off")
  else:
    steps_N, share_NLE = data
    order = np.argsort(steps_N, kind="stable")
    steps_N, share_NLE = steps_N[order], share_NLE[order]
    num_layers, num_experts = share_NLE.shape[1], share_NLE.shape[2]
    fig = output.figure((8, 1.2 + 0.35 * num_experts * num_layers))
    axes = fig.subplots(num_layers, 1, squeeze=False, sharex=True)
    x_edges = _step_edges(steps_N)
    y_edges = np.arange(num_experts + 1) - 0.5
    for l in range(num_layers):
      ax = axes[l][0]
      mesh = ax.pcolormesh(x_edges, y_edges, np.ma.masked_invalid(share_NLE[:, l, :].T),
                           cmap="viridis", vmin=0.0, shading="flat")
      fig.colorbar(mesh, ax=ax, pad=0.01, label="share")
      ax.set_ylabel(f"layer {l}\nexpert")
      for event in resets:
        if event.get("layer") != l or not isinstance(event.get("step"), (int, float)):
          continue
        experts = event.get("experts") or []
        if isinstance(experts, list) and experts:  # a reset that reset nothing draws nothing
          ax.axvline(event["step"], color="red", linewidth=0.8, alpha=0.7)
          ax.scatter([event["step"]] * len(experts), experts, marker="x", color="red", s=18,
                     zorder=3)
    axes[0][0].set_title("expert activity (red: resets)")
    axes[-1][0].set_xlabel("step")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  return path


LOSS_TERMS = ("ce", "exc_ce", "sdl")
LOSS_TITLE = ("objective: ce + sdl (pretrain); about excursion_weight * exc_ce + tf_weight * ce"
              " + sdl (EAVI)")


def plot_training(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
  """Reads a metrics.jsonl and writes ``loss.png``, ``accuracy.png`` and ``experts.png``.

  ``loss.png`` draws the objective's terms on a linear axis, not their sum: the teacher-forced
  answer CE ``ce`` (both stages), EAVI's excursion CE ``exc_ce`` and the SDL term ``sdl``; the
  EAVI objective adds ``exc_ce`` to ``ce``, so its total would look like a jump.

  Records are JSON objects with ``step`` and optionally ``stage``, ``ce``, ``exc_ce``, ``sdl``,
  ``answer_acc``, ``answer_exact`` and ``tokens_per_expert`` ([layer][expert] counts); lines
  with ``"event": "reset"`` (``step``, ``layer``, ``experts``) mark expert resets. Missing keys
  leave gaps or an explanatory panel, never an error.
  """
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  records, resets = read_metrics(metrics_path)
  return [
      _line_plot(records, LOSS_TERMS, "loss term", out_dir / "loss.png", title=LOSS_TITLE),
      _line_plot(records, ["answer_acc", "answer_exact"], "accuracy", out_dir / "accuracy.png"),
      _experts_plot(records, resets, out_dir / "experts.png"),
  ]
