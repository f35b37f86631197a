"""The Colab notebooks: committed clean, and executed top to bottom by a Jupyter kernel.

Each notebook runs at tiny sizes (``ONN_JAX_NOTEBOOK_TINY=1``) in a fresh working directory
with the ``python3`` kernel, which must be this interpreter importing this checkout; any cell
error fails the test.
"""

from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from onn_jax.analysis import NOTEBOOKS, TINY_ENV  # noqa: E402

from conftest import xla_flags_with_devices  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COLAB = REPO / "colab"
# onn-jax is not published: a fresh runtime installs it from an uploaded archive or a clone.
INSTALL_NOTE = "upload the repository as `onn-jax.zip`"
# What each notebook leaves behind in its working directory when every cell did its job.
ARTIFACTS = {
    "quickstart": ["runs/quickstart/tasks", "runs/quickstart/eval/scores.json",
                   "runs/quickstart/eval/sheet.png", "runs/quickstart/plots/loss.png"],
    "eavi": ["runs/eavi/pretrain/metrics.jsonl", "runs/eavi/eavi/metrics.jsonl",
             "runs/eavi/eavi/greedy.png", "runs/eavi/eavi/excursions.png"],
    "experts": ["runs/experts/routing/routing_tokens.png",
                "runs/experts/routing/routing_cells.png", "runs/experts/plots/experts.png"],
}
PROBE = ("import json, sys, onn_jax\n"
         "print(json.dumps({'prefix': sys.prefix, 'executable': sys.executable, "
         "'onn_jax': onn_jax.__file__}))")


def _read(name: str):
  return nbformat.read(COLAB / f"{name}.ipynb", as_version=4)


def _code_cells(nb) -> list:
  return [c for c in nb.cells if c.cell_type == "code"]


def test_colab_holds_exactly_the_listed_notebooks():
  assert sorted(p.stem for p in COLAB.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_clean_with_badge_and_install_cell(name):
  nb = _read(name)
  nbformat.validate(nb)
  assert nb.metadata.kernelspec.name == "python3"
  first = nb.cells[0]
  assert first.cell_type == "markdown" and INSTALL_NOTE in first.source
  for cell in _code_cells(nb):
    assert cell.outputs == [] and cell.execution_count is None, \
        f"{name}.ipynb: commit the notebook without outputs"
    ast.parse(cell.source)  # plain Python (no ! or % magics): nbclient and linters read it
  install = _code_cells(nb)[0].source
  tree = ast.parse(install)
  # try: import onn_jax / except ImportError: <pip install>, so it is a no-op where installed.
  assert isinstance(tree.body[0], ast.Try), install
  assert [a.name for a in tree.body[0].body[0].names] == ["onn_jax"]
  assert tree.body[0].handlers[0].type.id == "ImportError"


@pytest.mark.parametrize("machine, jax_build", [
    ({}, "jax"), ({"nvidia-smi": "/usr/bin/nvidia-smi"}, "jax[cuda12]"),
    ({"COLAB_TPU_ADDR": "grpc://10.0.0.2:8470"}, "jax[tpu]"),
    ({"/dev/accel*": ["/dev/accel0"]}, "jax[tpu]")])
def test_install_cell_installs_the_package_where_it_is_missing(machine, jax_build, monkeypatch,
                                                               tmp_path):
  """The branch a fresh Colab runtime takes (never taken by the executed notebooks): it installs
  the uploaded onn-jax.zip in the working folder, and stops with one line without it."""
  import glob
  import shutil
  import subprocess
  calls = []
  monkeypatch.setitem(sys.modules, "onn_jax", None)  # `import onn_jax` raises ImportError
  monkeypatch.setattr(subprocess, "check_call", lambda cmd: calls.append(cmd))
  monkeypatch.setattr(shutil, "which", lambda name: machine.get(name))
  monkeypatch.setattr(glob, "glob", lambda pattern: machine.get(pattern, []))
  monkeypatch.delenv("COLAB_TPU_ADDR", raising=False)
  for key, value in machine.items():
    if key.isupper() and "/" not in key:
      monkeypatch.setenv(key, value)
  monkeypatch.chdir(tmp_path)
  cells = [compile(_code_cells(_read(name))[0].source, f"{name}.ipynb", "exec")
           for name in NOTEBOOKS]
  if not os.path.exists("/content/onn-jax") and not os.path.exists("/content/onn-jax.zip"):
    for cell in cells:
      with pytest.raises(SystemExit, match="upload the repository as onn-jax.zip"):
        exec(cell, {})
    assert calls == []
  (tmp_path / "onn-jax.zip").write_bytes(b"")
  for cell in cells:
    exec(cell, {})
  want = [sys.executable, "-m", "pip", "install", "-q", f"{jax_build}<0.13", "onn-jax.zip"]
  assert calls == [want] * len(NOTEBOOKS)


@pytest.fixture
def kernel_env(monkeypatch):
  """The kernel's environment: tiny sizes, one CPU device (the suite forces eight through
  XLA_FLAGS; its fast-compile flags are kept), this checkout first on the path, and this
  interpreter's kernelspec first."""
  monkeypatch.setenv(TINY_ENV, "1")
  monkeypatch.setenv("XLA_FLAGS", xla_flags_with_devices(1))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  # The three notebooks build the same tiny model: cache even its many small eager
  # initialisation programs (conftest.py points JAX_COMPILATION_CACHE_DIR at the suite's cache).
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(
      [os.path.join(sys.prefix, "share", "jupyter")]
      + [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p]))


def _stdout(cell) -> str:
  return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream"
                 and o.name == "stdout")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes_top_to_bottom(name, tmp_path, kernel_env):
  nb = _read(name)
  probe = nbformat.v4.new_code_cell(PROBE)
  nb.cells.insert(0, probe)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError, naming the cell, on any error

  seen = json.loads(_stdout(nb.cells[0]).strip().splitlines()[-1])
  assert os.path.realpath(seen["prefix"]) == os.path.realpath(sys.prefix), \
      f"the python3 kernel runs {seen['executable']}, not this interpreter {sys.executable}"
  assert Path(seen["onn_jax"]).resolve().is_relative_to(REPO), seen["onn_jax"]
  for cell in nb.cells:
    assert not [o for o in cell.get("outputs", []) if o.output_type == "error"]
  for artifact in ARTIFACTS[name]:
    assert (tmp_path / artifact).exists(), f"{name}.ipynb did not write {artifact}"
  # The tiny sizes took effect in every run the notebook made (no wall-clock bound: seconds
  # each here, while a slow machine must not fail a correct notebook).
  from onn_jax import config
  from onn_jax.analysis import notebook_overrides
  want = config.load("default", notebook_overrides(name, tiny=True))
  saved = sorted((tmp_path / "runs").rglob("config.yaml"))
  assert saved, f"{name}.ipynb saved no run config"
  for path in saved:
    got = config.load(path, saved_run=True)
    assert (got.model, got.data.buckets) == (want.model, want.data.buckets), path
