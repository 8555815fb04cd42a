"""Every notebook in notebooks/ runs top to bottom from a fresh kernel in quick mode and
shows at least one figure.

The kernel is the current interpreter (ipykernel of this venv), MARGINFLOW_QUICK=1 makes
each notebook pick its small sizes; a cell that raises fails the test with its traceback.
MPLBACKEND=Agg is the kernel's default backend, as on a headless machine: the notebooks
select the inline backend themselves (`%matplotlib inline`), so their figures still come
back as image/png outputs, which is what the docs site renders.
"""

import json
import os
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_all_notebooks_exist():
    names = [p.stem for p in NOTEBOOKS]
    assert names == ["01_flows_on_toy", "02_flow_vs_discrete", "03_checking_the_lemmas",
                     "04_mnist_margins", "05_eps_crossover", "06_your_own_model",
                     "07_momentum", "08_minibatch_noise"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_a_worked_example(path):
    """Stored without outputs, several markdown cells, and no forced non-interactive
    backend (which would keep every figure out of the rendered notebook)."""
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
    assert sum(c.cell_type == "markdown" for c in nb.cells) >= 4
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "matplotlib.use(" not in code
    assert "%matplotlib inline" in code


def _image_outputs(nb) -> int:
    return sum(
        "image/png" in out.get("data", {})
        for cell in nb.cells if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch, tmp_path):
    if path.stem.startswith("04"):
        pytest.importorskip("mlxtend")
    nb = nbformat.read(path, as_version=4)
    # Stored without outputs (small diffs, no stale numbers in the repository).
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
    monkeypatch.setenv("MARGINFLOW_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # A kernel spec pointing at this interpreter, whatever kernels the machine has.
    spec_dir = tmp_path / "kernels" / "marginflow-test"
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "marginflow test", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="marginflow-test",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute(env=dict(os.environ))
    assert _image_outputs(nb) >= 1, f"{path.name} ran but displayed no figure (no image/png output)"
