"""`examples/simulation.ipynb` runs top to bottom in a Jupyter kernel (nbclient).

The notebook a user opens is executed as it is, with a test-sized configuration set the
way papermill does: a cell after the one tagged ``parameters`` overrides its values.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow
NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "simulation.ipynb"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_the_simulation_notebook_runs_and_plots(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "the notebook needs one cell tagged 'parameters'"
    notebook.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell('sites, rounds = 2, 1\nout = "runs/nb"'))
    # The kernel starts in tmp_path, so the notebook's relative `out` lands there.
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    out = tmp_path / "runs" / "nb"
    result = json.loads((out / "result.json").read_text())
    assert [r["round"] for r in result["rounds"]] == [1]
    assert set(result["rounds"][0]["epsilon"]) == {"site-0", "site-1"}
    printed = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert f"final accuracy {result['final_accuracy']}" in printed
    figure = out / "accuracy-epsilon.png"
    assert figure.read_bytes().startswith(PNG_SIGNATURE)
    shown = [o for o in notebook.cells[-1].outputs if "image/png" in o.get("data", {})]
    assert len(shown) == 1  # and the plot is displayed in the notebook
