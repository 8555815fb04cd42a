"""Every notebook in notebooks/ runs top to bottom in quick mode and shows at least one
figure.

The kernel is the current interpreter (ipykernel of this venv), MARGINFLOW_QUICK=1 makes
each notebook pick its small sizes; a cell that raises fails the test with its traceback.
MPLBACKEND=Agg is the kernel's default backend, as on a headless machine: the notebooks
select the inline backend themselves (`%matplotlib inline`), so their figures still come
back as image/png outputs, which is what the docs site renders.

The notebooks share one kernel, whose namespace is emptied (`%reset -f`), figures closed
and matplotlib's settings restored before each: a notebook that used a name it does not
define itself still fails. What carries over is what a process keeps: imported modules
and JAX's compiled programs. A fresh kernel per notebook spent 3-4 s on imports alone
and compiled again what the previous notebook had compiled; the notebooks took 145 s of
a cold suite run with one kernel each.
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


# Run before each notebook but the kernel's first: what a fresh kernel would not have.
_RESET = ("%reset -f\n"
          "import matplotlib as _mpl, matplotlib.pyplot as _plt\n"
          "_plt.close('all'); _mpl.rcdefaults()\n"
          "del _mpl, _plt")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """One kernel for the notebooks (module docstring), started with the quick mode's
    environment, in notebooks/ (their working directory)."""
    jupyter_client = pytest.importorskip("jupyter_client")
    # A kernel spec pointing at this interpreter, whatever kernels the machine has.
    home = tmp_path_factory.mktemp("jupyter")
    spec_dir = home / "kernels" / "marginflow-test"
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "marginflow test", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    env = dict(os.environ, MARGINFLOW_QUICK="1", MPLBACKEND="Agg", JUPYTER_PATH=str(home))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(home))  # the kernel spec manager reads it here
        km = jupyter_client.KernelManager(kernel_name="marginflow-test")
        km.start_kernel(env=env, cwd=str(NOTEBOOKS[0].parent))
    state = {"km": km, "used": False}
    yield state
    km.shutdown_kernel(now=True)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, kernel):
    if path.stem.startswith("04"):
        pytest.importorskip("mlxtend")
    nb = nbformat.read(path, as_version=4)
    # Stored without outputs (small diffs, no stale numbers in the repository).
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
    if not kernel["km"].is_alive():  # a previous notebook killed it: start afresh
        kernel["km"].restart_kernel(now=True)
        kernel["used"] = False
    if kernel["used"]:
        nb.cells.insert(0, nbformat.v4.new_code_cell(_RESET))
    kernel["used"] = True
    client = nbclient.NotebookClient(
        nb, timeout=300, km=kernel["km"], resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    assert _image_outputs(nb) >= 1, f"{path.name} ran but displayed no figure (no image/png output)"
