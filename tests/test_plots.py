"""Pictures: training curves from a synthetic metrics.jsonl, grids in ARC colours."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from onn_jax import output, plots
from onn_jax.data.tasks import Task

PNG = b"\x89PNG\r\n\x1a\n"


def _png_pixels(path) -> np.ndarray:
  from matplotlib.image import imread
  return imread(path)


def test_palette_is_the_arc_palette():
  from matplotlib.colors import to_rgb
  assert len(plots.ARC_COLORS) == 10
  assert to_rgb(plots.ARC_COLORS[0]) == (0.0, 0.0, 0.0)
  assert plots.ARC_COLORS[1].upper() == "#0074D9" and plots.ARC_COLORS[9].upper() == "#870C25"


def test_importing_is_cheap():
  # matplotlib (and pyplot's global backend) come in only when something is drawn.
  code = ("import sys, onn_jax.plots, onn_jax.evaluation; "
          "print(any(m.startswith('matplotlib') for m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=Path(__file__).resolve().parents[1])
  assert out.stdout.strip() == "False"


def _write_metrics(path, with_experts: bool = True) -> None:
  rng = np.random.default_rng(0)
  lines = []
  for step in range(0, 60, 5):
    stage = "pretrain" if step < 40 else "eavi"
    rec = {"step": step, "stage": stage, "loss": 3.0 / (1 + step), "ce": 2.5 / (1 + step),
           "answer_acc": step / 60, "answer_exact": (step / 60) ** 2}
    if step == 25:
      del rec["answer_exact"], rec["ce"]  # missing keys are tolerated
    if with_experts:
      # Layer 1 grows from 3 to 4 experts halfway (DynMoE adds experts).
      num_e1 = 3 if step < 30 else 4
      rec["tokens_per_expert"] = [rng.integers(0, 50, 4).tolist(),
                                  rng.integers(0, 50, num_e1).tolist()]
    lines.append(json.dumps(rec))
    if step == 20:
      lines.append(json.dumps({"event": "reset", "step": 20, "layer": 1, "experts": [0, 2]}))
  lines.append('{"step": 61, "loss": ')  # a half-written last line of a live run
  path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("with_experts", [True, False])
def test_plot_training_writes_pngs(tmp_path, with_experts):
  metrics = tmp_path / "metrics.jsonl"
  _write_metrics(metrics, with_experts)
  paths = plots.plot_training(metrics, tmp_path / "plots")
  assert [p.name for p in paths] == ["loss.png", "accuracy.png", "experts.png"]
  for p in paths:
    assert p.read_bytes()[:8] == PNG


def test_read_metrics_splits_records_and_resets(tmp_path):
  metrics = tmp_path / "metrics.jsonl"
  _write_metrics(metrics)
  records, resets = plots.read_metrics(metrics)
  assert [r["step"] for r in records] == list(range(0, 60, 5))
  assert resets == [{"event": "reset", "step": 20, "layer": 1, "experts": [0, 2]}]
  steps_N, share_NLE = plots._expert_tensor(records)
  assert share_NLE.shape == (12, 2, 4)
  # Shares of each layer sum to one; the expert layer 1 lacked early on is NaN there.
  np.testing.assert_allclose(np.nansum(share_NLE, -1), 1.0)
  assert np.isnan(share_NLE[:6, 1, 3]).all() and not np.isnan(share_NLE[6:, 1, 3]).any()


def test_render_sheet_uses_arc_colours(tmp_path):
  grid = np.array([[1, 1, 1], [1, 1, 1]])
  path = plots.render_sheet([{"title": "only blue", "grids": [("g", grid)]},
                             {"title": "nothing", "grids": [("none", None)]}],
                            tmp_path / "sheet.png")
  pixels = _png_pixels(path)[..., :3]
  blue = np.array([0x00, 0x74, 0xD9]) / 255
  assert np.isclose(pixels, blue, atol=2 / 255).all(-1).sum() > 50
  # No other palette colour (e.g. red) appears: the colour map is indexed, not interpolated.
  red = np.array([0xFF, 0x41, 0x36]) / 255
  assert not np.isclose(pixels, red, atol=2 / 255).all(-1).any()


def test_render_task(tmp_path):
  a = np.arange(6).reshape(2, 3)
  task = Task("t0", [(a, a.T), (a, a)], [(a, None)])
  path = plots.render_task(task, tmp_path / "task.png")
  assert path.read_bytes()[:8] == PNG


def test_plots_draw_what_a_reader_needs(tmp_path, monkeypatch):
  """loss.png: linear axis, the EAVI terms (not their sum); experts.png: a red line only where
  an expert was reset; sheet: "no candidate" is a labelled empty cell, not a grid."""
  figures = []
  make = output.figure
  monkeypatch.setattr(output, "figure", lambda size: figures.append(make(size)) or figures[-1])
  lines = [{"step": s, "stage": "pretrain" if s <= 20 else "eavi", "loss": 3.0, "ce": 2.0,
            "sdl": 0.01, "tokens_per_expert": [[5, 0], [1, 1]]} for s in (10, 20, 30)]
  lines[2].update(loss=4.01, exc_ce=2.0)  # EAVI: exc_ce + ce + sdl
  lines.insert(1, {"event": "reset", "step": 20, "layer": 0, "experts": []})
  lines.insert(2, {"event": "reset", "step": 20, "layer": 1, "experts": [1]})
  metrics = tmp_path / "metrics.jsonl"
  metrics.write_text("".join(json.dumps(r) + "\n" for r in lines))
  plots.plot_training(metrics, tmp_path / "plots")
  loss_ax = figures[0].axes[0]
  assert loss_ax.get_yscale() == "linear"
  labels = [line.get_label() for line in loss_ax.lines]
  assert "exc_ce (eavi)" in labels and not any(l.startswith("loss") for l in labels)
  layer_axes = [ax for ax in figures[2].axes if ax.get_ylabel().startswith("layer")]
  assert [len(ax.lines) for ax in layer_axes] == [0, 1]  # layer 0's reset reset nothing

  figures.clear()
  plots.render_sheet([{"title": "t", "grids": [("no candidate", None), ("grid", [[1]])]}],
                     tmp_path / "sheet.png")
  empty, drawn = figures[0].axes
  assert not empty.images and [t.get_text() for t in empty.texts] == ["none"]
  assert len(drawn.images) == 1


@pytest.mark.parametrize("leave", [False, True])
def test_a_progress_bar_in_a_log_file_ends_its_line(capsys, leave):
  """Written to a file (stderr is not a terminal under capsys), a bar's last state ends with a
  newline when it closes, also a bar asked not to stay (``leave=False``, as evaluation's): the
  summary line after it shared the bar's line in a log before."""
  bar = output.progress(3, "generate", leave=leave)
  for _ in range(3):
    bar.update(1)
  bar.close()
  err = capsys.readouterr().err
  assert err.endswith("\n"), repr(err)
  assert "3/3" in err.rsplit("\r", 1)[-1], repr(err)


def test_missing_metrics_and_long_titles_are_drawn(tmp_path):
  """A run resumed at its last step from copied checkpoints alone has no metrics.jsonl: no
  records, no traceback (its evaluation never ran); a long task id keeps every row's title
  inside the sheet (the layout gave up and cut them all)."""
  assert plots.read_metrics(tmp_path / "nowhere.jsonl") == ([], [])
  plots.plot_training(tmp_path / "nowhere.jsonl", tmp_path / "plots")
  long_id = "x" * 200 + "_2072aba6"
  assert plots._short_lines(f"{long_id} [0] (missed)\nshort") == (
      "xxxxxxxxxxxxxxx…a6 [0] (missed)\nshort")
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # "Tight layout not applied" fails the test
    grids = [("g", np.ones((2, 2), int))] * 4  # a task's row: demonstrations, test, attempts
    plots.render_sheet([{"title": f"{long_id} [0] (missed)", "grids": grids},
                        {"title": "00576224 [0]", "grids": grids}], tmp_path / "sheet.png")
