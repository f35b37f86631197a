"""The notebooks' library: set-up, free-running rollouts, routing statistics, run history."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from onn_jax import analysis, config
from onn_jax.data.pipeline import collate
from onn_jax.data.serialize import parse_sequence, serialize
from onn_jax.data.tasks import Task, filter_max_grid, load_tasks
from onn_jax.data.tokens import BOS, END, IN, NEWLINE, OUT, PAD
from onn_jax.model.transformer import Transformer, init_params

from conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def cfg():
  # 3x3 grids at most: one demo, the test input and the answer fit 64 tokens.
  return tiny_config(data=dict(max_grid=3, buckets=[64]), eval=dict(batch_size=4))


@pytest.fixture(scope="module")
def tasks(cfg):
  return filter_max_grid(load_tasks("arc-agi-1:training"), cfg.data.max_grid)[:5]


@pytest.fixture(scope="module")
def params(cfg):
  return init_params(cfg.model, jax.random.PRNGKey(3))


@pytest.fixture(scope="module")
def table(cfg, tasks, params):
  batch, _ = analysis.task_batch(tasks, cfg)
  return analysis.routing_table(Transformer(cfg.model), params, batch), batch


# ----------------------------------------------------------------------------------------------
# Set-up


def test_load_config_takes_shipped_names_and_paths():
  overrides = ["train.seed=7", "data.max_grid=5"]
  from_name = analysis.load_config("default", overrides)
  assert from_name.train.seed == 7 and from_name.data.max_grid == 5
  assert from_name == config.load(REPO / "configs" / "default.yaml", overrides)
  assert analysis.load_config(str(REPO / "configs" / "default.yaml"), overrides) == from_name
  with pytest.raises(config.ConfigError, match=r"^nope: config file not found .*arc1, arc2"):
    analysis.load_config("nope")


def test_notebook_overrides_follow_the_environment(monkeypatch):
  monkeypatch.delenv(analysis.TINY_ENV, raising=False)
  assert not analysis.is_tiny()
  assert analysis.notebook_overrides("quickstart") == []
  monkeypatch.setenv(analysis.TINY_ENV, "1")
  assert analysis.is_tiny()
  tiny = {name: analysis.load_config("default", analysis.notebook_overrides(name))
          for name in analysis.NOTEBOOKS}
  full = {name: analysis.load_config("default", analysis.notebook_overrides(name, tiny=False))
          for name in analysis.NOTEBOOKS}
  for name in analysis.NOTEBOOKS:
    assert tiny[name].model.d_model < full[name].model.d_model
    assert tiny[name].train.pretrain_steps < full[name].train.pretrain_steps
    assert tiny[name].data.buckets[-1] < full[name].data.buckets[-1]
  # One compilation cache serves all three tiny notebooks: same model, data and TF stage.
  quick = tiny["quickstart"]
  for name in ("eavi", "experts"):
    assert tiny[name].model == quick.model and tiny[name].data == quick.data
  assert config.replace(tiny["eavi"], train={"eavi_steps": 0}).train == quick.train
  assert tiny["eavi"].train.eavi_steps > 0 and full["eavi"].train.eavi_steps > 0
  assert tiny["experts"].train.reset_every > 0
  with pytest.raises(ValueError, match="'nope'"):
    analysis.notebook_overrides("nope")


def test_format_table_aligns_columns_and_marks_missing_values():
  text = analysis.format_table([{"step": 2, "loss": np.float32(0.123456)},
                                {"step": 10, "loss": 3.0, "extra": "x"}], ["step", "loss", "acc"])
  lines = text.splitlines()
  assert lines[0].split() == ["step", "loss", "acc"]
  assert lines[2].split() == ["2", "0.1235", "-"] and lines[3].split() == ["10", "3", "-"]
  assert len({len(line) for line in lines}) == 1


def test_show_prints_paths_outside_ipython(capsys, tmp_path):
  analysis.show(tmp_path / "a.png", tmp_path / "b.png")
  assert capsys.readouterr().out.split() == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]


def test_draw_tasks_writes_one_png_per_task(tasks, tmp_path):
  paths = analysis.draw_tasks(tasks[:2], tmp_path)
  assert [p.name for p in paths] == [f"task_{t.id}.png" for t in tasks[:2]]
  assert all(p.read_bytes().startswith(PNG) for p in paths)


# ----------------------------------------------------------------------------------------------
# Free running


def test_task_batch_serialises_every_known_test_pair(cfg, tasks):
  batch, items = analysis.task_batch(tasks, cfg)
  assert items == [(t.id, i) for t in tasks for i in range(len(t.test))]
  assert batch["inputs"].shape == (len(items), cfg.data.buckets[-1])
  by_id = {t.id: t for t in tasks}
  for b, (task_id, t) in enumerate(items):
    n = int(batch["valid"][b].sum())
    tokens = np.append(batch["inputs"][b, :n], batch["targets"][b, n - 1])
    demos, test_input, test_output = parse_sequence(tokens)
    task = by_id[task_id]
    assert np.array_equal(test_input, task.test[t][0])
    assert np.array_equal(test_output, task.test[t][1])
    assert 1 <= len(demos) <= len(task.train)  # trailing demos dropped to fit
    for (i, o), (ti, to) in zip(demos, task.train):
      assert np.array_equal(i, ti) and np.array_equal(o, to)
    assert batch["answer_len"][b] == test_output.shape[0] * (test_output.shape[1] + 1) + 1
  unanswered = Task(id="x", train=tasks[0].train, test=[(tasks[0].test[0][0], None)])
  with pytest.raises(ValueError, match="no test pair"):
    analysis.task_batch([unanswered], cfg)


def test_score_rollouts_compares_answers_in_place(cfg, tasks):
  batch, _ = analysis.task_batch(tasks, cfg)
  A = int(batch["answer_len"].max()) + 3
  truth_BA = analysis.answer_targets(batch, A)
  for b in range(len(truth_BA)):  # the answer, then padding as generate emits it
    truth_BA[b, batch["answer_len"][b]:] = PAD
  assert np.all(truth_BA[np.arange(len(truth_BA)), batch["answer_len"] - 1] == END)
  perfect = analysis.score_rollouts(batch, truth_BA)
  assert perfect["exact_B"].all()
  assert np.array_equal(perfect["correct_B"], batch["answer_len"])

  tokens_BA = truth_BA.copy()
  tokens_BA[0, 1] = (tokens_BA[0, 1] + 1) % 10  # inside row 0's answer
  tokens_BA[1, batch["answer_len"][1]:] = 3  # after row 1's END: never compared
  scores = analysis.score_rollouts(batch, tokens_BA)
  assert not scores["exact_B"][0] and scores["correct_B"][0] == batch["answer_len"][0] - 1
  assert scores["exact_B"][1:].all()

  no_answer = dict(batch, answer_len=np.zeros_like(batch["answer_len"]))
  assert not analysis.score_rollouts(no_answer, truth_BA)["exact_B"].any()
  with pytest.raises(ValueError, match="generated"):
    analysis.score_rollouts(batch, truth_BA[:, :2])


def test_rollouts_are_consistent_and_independent_of_batching(cfg, tasks, params, tmp_path):
  records = analysis.rollouts(cfg, params, tasks)
  one_row = analysis.rollouts(config.replace(cfg, eval={"batch_size": 1}), params, tasks)
  _, items = analysis.task_batch(tasks, cfg)
  assert [(r["task_id"], r["test_index"]) for r in records] == items
  for r, s in zip(records, one_row):
    assert np.array_equal(r["tokens"], s["tokens"])  # padding rows never leak into results
    task = next(t for t in tasks if t.id == r["task_id"])
    assert np.array_equal(r["target"], task.test[r["test_index"]][1])
    decoded_right = r["prediction"] is not None and np.array_equal(r["prediction"], r["target"])
    assert r["exact"] == decoded_right
    assert 0 <= r["correct"] <= r["answer_len"]
    assert r["text"].split()[-1] == "<end>" or END not in r["tokens"]
  summary = analysis.summarise_rollouts(records)
  assert summary["items"] == len(items)
  assert summary["token_accuracy"] == pytest.approx(
      sum(r["correct"] for r in records) / sum(r["answer_len"] for r in records))
  assert summary["malformed"] == sum(r["prediction"] is None for r in records)
  assert analysis.free_running_exact_match(cfg, params, tasks) == summary["exact_match"]
  soft = analysis.rollouts(cfg, params, tasks[:1], feed="soft")
  assert len(soft) == len(tasks[0].test)
  # A config whose EAVI trains with the parallel rollout (which starts from the ground truth)
  # still decodes free running, one token after another: the same tokens.
  parallel = analysis.rollouts(config.replace(cfg, eavi={"rollout": "parallel", "passes": 1}),
                               params, tasks)
  for r, s in zip(records, parallel):
    assert np.array_equal(r["tokens"], s["tokens"])
  path = analysis.render_rollouts(records, tmp_path / "sheet.png", max_rows=2)
  assert path.read_bytes().startswith(PNG)


def test_answer_text_stops_at_the_first_end():
  assert analysis.answer_text(np.array([3, NEWLINE, END, PAD, 4])) == "3 <nl> <end>"
  assert analysis.answer_text(np.array([3, 3, 3])) == "3 3 3"


# ----------------------------------------------------------------------------------------------
# Routing


def _expected_positions(tokens: np.ndarray) -> tuple[list[int], list[int]]:
  """Walks a sequence token by token (the reference for the vectorised version)."""
  rows, cols = [], []
  in_grid, r, c = False, 0, 0
  for t in tokens:
    if t in (IN, OUT):
      in_grid, r, c = True, 0, 0
      rows.append(-1), cols.append(-1)
    elif t == NEWLINE:
      r, c = r + 1, 0
      rows.append(-1), cols.append(-1)
    elif 0 <= t < 10 and in_grid:
      rows.append(r), cols.append(c)
      c += 1
    else:
      in_grid = t not in (BOS, END, PAD) and in_grid
      rows.append(-1), cols.append(-1)
  return rows, cols


def test_grid_positions_on_a_hand_built_sequence():
  rng = np.random.default_rng(0)
  grids = [rng.integers(0, 10, shape) for shape in ((2, 3), (1, 2), (3, 1), (2, 2), (4, 3))]
  example = serialize([(grids[0], grids[1]), (grids[2], grids[3])], grids[4], grids[0])
  tokens = example.tokens
  row, col = analysis.grid_positions(tokens)
  assert (row.tolist(), col.tolist()) == _expected_positions(tokens)
  # Walk the grids in order: each colour token sits at its own (row, col) and holds that colour.
  cells = np.flatnonzero(row >= 0)
  expected = [(g, r, c) for g in grids[:4] + [grids[4], grids[0]]
              for r in range(g.shape[0]) for c in range(g.shape[1])]
  assert len(cells) == len(expected)
  for pos, (g, r, c) in zip(cells, expected):
    assert (row[pos], col[pos]) == (r, c) and tokens[pos] == g[r, c]
  assert np.all(row[tokens == NEWLINE] == -1) and row[0] == -1 and row[-1] == -1

  # Batched, right-padded: the same per row, padding off-grid.
  other = serialize([(grids[3], grids[2])], grids[1], None).tokens
  batch = collate([example, serialize([(grids[3], grids[2])], grids[1], None)], len(tokens))
  row_BT, col_BT = analysis.grid_positions(batch["inputs"])
  assert row_BT.shape == batch["inputs"].shape
  ref_rows, ref_cols = _expected_positions(batch["inputs"][1])
  assert row_BT[1].tolist() == ref_rows and col_BT[1].tolist() == ref_cols
  assert np.all(row_BT[1, len(other):] == -1)


def test_routing_table_counts_agree_with_the_models_statistics(cfg, params, table):
  table, batch = table
  model = Transformer(cfg.model)
  _, _, aux = model.apply({"params": params}, batch["inputs"], batch["valid"])
  L, E = cfg.model.num_layers, cfg.model.num_experts
  valid = batch["valid"].astype(bool)
  N = int(valid.sum())
  assert table.used_LBTE.shape == (L,) + batch["inputs"].shape + (E,)
  np.testing.assert_allclose(table.tokens_per_expert_LE, np.asarray(aux["tokens_per_expert"]))
  np.testing.assert_allclose(table.experts_per_token(), np.asarray(aux["experts_per_token"]),
                             rtol=1e-5)
  # Every valid token is counted once per layer, under its id and (if a cell) its position.
  assert table.token_count_V.sum() == N and table.token_count_V[PAD] == 0
  assert np.all(table.active_hist_LK.sum(axis=1) == N)
  assert np.all(table.active_hist_LK[:, 0] == 0)  # fallback: every token uses an expert
  np.testing.assert_allclose(table.by_token_LVE.sum(axis=1), table.tokens_per_expert_LE)
  row_BT, col_BT = analysis.grid_positions(batch["inputs"])
  on_grid = valid & (row_BT >= 0)
  assert table.cell_count_RC.sum() == on_grid.sum()
  np.testing.assert_allclose(table.by_cell_LRCE.sum(axis=(1, 2)),
                             table.used_LBTE[:, on_grid].sum(axis=1))
  # One cell checked by hand: the last layer, cell (0, 1).
  at = on_grid & (row_BT == 0) & (col_BT == 1)
  np.testing.assert_allclose(table.by_cell_LRCE[L - 1, 0, 1],
                             table.used_LBTE[L - 1][at].sum(axis=0))
  shares = table.token_share()
  assert np.all(np.isnan(shares[:, PAD])) and np.nanmax(shares) <= 1.0
  assert table.silent_experts() == [np.flatnonzero(c == 0).tolist()
                                    for c in table.tokens_per_expert_LE]
  records = table.token_records(layer=0)
  assert sum(r["count"] for r in records) == N
  assert [r["layer"] for r in table.summary()] == list(range(L))


def test_routing_table_ignores_padding_and_plots(cfg, params, table, tmp_path):
  table, batch = table
  padded = {k: v.copy() for k, v in batch.items()}
  padded["valid"][:, 1:5] = False  # real tokens marked invalid are left out of every count
  small = analysis.routing_table(Transformer(cfg.model), params, padded)
  assert small.token_count_V.sum() == table.token_count_V.sum() - 4 * len(padded["valid"])
  assert np.all(small.active_hist_LK.sum(axis=1) == padded["valid"].sum())
  paths = analysis.plot_routing(table, tmp_path)
  assert [p.name for p in paths] == ["routing_tokens.png", "routing_cells.png"]
  assert all(p.read_bytes().startswith(PNG) for p in paths)


def test_used_experts_names_the_layer_without_sown_masks(cfg, params, monkeypatch):
  monkeypatch.setattr(analysis.routing, "_routed_forward",
                      lambda *a: ({}, np.zeros((cfg.model.num_layers, cfg.model.num_experts))))
  with pytest.raises(KeyError, match="block_0/moe"):
    analysis.used_experts(Transformer(cfg.model), params, np.zeros((1, 8), np.int32),
                          np.ones((1, 8), bool))


# ----------------------------------------------------------------------------------------------
# Run history


def test_expert_history_reads_activity_and_resets(tmp_path):
  path = tmp_path / "metrics.jsonl"
  lines = [
      {"step": 2, "stage": "pretrain", "loss": 1.0, "dead_experts": 1,
       "tokens_per_expert": [[5, 0, 3], [1, 1, 1]]},
      {"event": "reset", "step": 3, "layer": 0, "experts": [1]},
      {"event": "reset", "step": 3, "layer": 1, "experts": []},
      {"step": 4, "stage": "pretrain", "loss": 0.9, "dead_experts": 2,
       "tokens_per_expert": [[0, 2, 3], [0, 4, 0]]},
      {"event": "reset", "step": 4, "layer": 0, "experts": [0]},
      {"event": "reset", "step": 4, "layer": 1, "experts": [0, 2]},
  ]
  path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"step\": 6, \"lo")
  history = analysis.expert_history(path)
  assert history["steps"].tolist() == [2, 4]
  assert history["tokens_per_expert"].shape == (2, 2, 3)
  assert history["silent"].sum(axis=(1, 2)).tolist() == [1, 3]
  assert history["dead_experts"].tolist() == [1.0, 2.0]
  assert history["reset_steps"] == [3, 4]
  assert [(e["step"], e["layer"]) for e in history["resets"]] == [(3, 0), (4, 0), (4, 1)]
  assert history["reset_counts"].tolist() == [[1, 1, 0], [1, 0, 1]]
  assert history["records"] == [
      {"step": 2, "dead_experts": 1, "silent_in_batch": 1, "experts_reset_here": 0},
      {"step": 4, "dead_experts": 2, "silent_in_batch": 3, "experts_reset_here": 3}]
  empty = tmp_path / "empty.jsonl"
  empty.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
  with pytest.raises(ValueError, match="empty.jsonl: no record holds tokens_per_expert"):
    analysis.expert_history(empty)
