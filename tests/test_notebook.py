"""The Colab notebook's code cells run headlessly on CPU (smoke config)."""

import os

import nbformat
import numpy as np
import pytest
from conftest import ROOT


def test_notebook_cells_run(smoke_pipeline, monkeypatch):
  """Every code cell, on the shared smoke pipeline workdir.

  The fixture ran the notebook's own `jobs.run_job(config, WORKDIR)` with
  the notebook's config (conftest.notebook_config), so the first cell
  finds every stage finished and the rest of the notebook runs on it.
  """
  nb = nbformat.read(os.path.join(ROOT, "experiments",
                                  "colab_quickstart.ipynb"), as_version=4)
  pytest.importorskip("IPython")
  with smoke_pipeline.locked() as workdir:
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("DIVDISTILL_NOTEBOOK_VARIANT", "smoke")
    monkeypatch.setenv("DIVDISTILL_NOTEBOOK_WORKDIR", workdir)
    namespace = {}
    for cell in nb.cells:
      if cell.cell_type != "code":
        continue
      # Shell lines (installs) are for Colab; the test environment has them.
      source = "\n".join(line for line in cell.source.splitlines()
                         if not line.lstrip().startswith(("!", "%")))
      exec(compile(source, "notebook", "exec"), namespace)  # noqa: S102
  assert [r["label"] for r in namespace["results"]["rows"]][:2] == [
      "DE-1", "DE-2"]
  assert namespace["probs"].shape == (2, 64, 10)
  # The checkpoint the notebook loaded reproduces the test predictions the
  # training run saved through its own (padded, sharded) predict path.
  saved = np.load(os.path.join(workdir, "students", "confods",
                               "predictions.npz"))
  np.testing.assert_allclose(namespace["probs"], saved["test_probs"],
                             rtol=1e-4, atol=1e-6)
  assert os.path.exists(os.path.join(workdir, "results.md"))
