"""The notebooks of notebooks/: each runs end to end at its small size (``FASTDIFF_NOTEBOOK_SMALL=1``) with
nbclient, failing on any cell error, and the committed copies keep their executed outputs and figures.

nbclient comes with the ``notebooks`` extra; in CI (``CI`` set) a missing extra fails instead of skipping.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = ("fid_vs_steps", "parallel_sampling", "attention_caching", "training_speed")
CELL_TIMEOUT_S = 300


def _read(name: str) -> dict:
    return json.loads((NOTEBOOK_DIR / f"{name}.ipynb").read_text())


def _source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _notebook_tools():
    try:
        import nbclient
        import nbformat
    except ImportError as err:
        message = f'nbclient/nbformat missing ({err}): pip install -e ".[notebooks]"'
        if os.environ.get("CI"):
            pytest.fail("CI must install the notebooks extra: " + message)
        pytest.skip(message)
    return nbclient, nbformat


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_parameters_outputs_and_figures(name: str) -> None:
    nb = _read(name)
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    first = code[0]
    assert "parameters" in first.get("metadata", {}).get("tags", []), "first code cell must be tagged 'parameters'"
    assert "FASTDIFF_NOTEBOOK_SMALL" in _source(first)
    if name != "training_speed":  # the sampling notebooks take any diffusers pipeline
        assert "MODEL = None" in _source(first)
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"], "committed notebook holds an error output"
    assert all(c.get("execution_count") for c in code), "committed notebook must be fully executed"
    assert any("image/png" in o.get("data", {}) for o in outputs), "committed notebook shows no plot"
    for cell in code:  # every figure a cell saves is committed beside the notebook
        for line in _source(cell).splitlines():
            if 'FIGURES / "' in line:
                figure = line.split('FIGURES / "')[1].split('"')[0]
                assert (NOTEBOOK_DIR / "figures" / figure).is_file(), f"notebooks/figures/{figure} missing"


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes_at_small_size(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbclient, nbformat = _notebook_tools()
    figures = tmp_path / "figures"
    monkeypatch.setenv("FASTDIFF_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("FASTDIFF_NOTEBOOK_FIGURES", str(figures))  # the committed figures stay as they are
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()  # raises CellExecutionError naming the cell on any error
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the executed notebook shows no plot"
    assert sorted(p.name for p in figures.glob("*.png")), "the notebook saved no figure"
