"""Every notebook in tutorials/ runs top to bottom at its small size, shows figures, and is stored without outputs.

Each notebook reads ``PYRO_AVF_TUTORIAL_SIZE`` (``small`` here) and its last cell asserts the tutorial's own
claims, so a notebook whose numbers stop supporting its text fails here. Notebooks added to ``tutorials/``
are picked up automatically.

The kernel is this interpreter (``sys.executable -m ipykernel_launcher``) through a kernel spec written to a
temporary folder, so the notebooks run in the same environment as the tests (a CI venv, say) whatever kernel
specs the user has installed elsewhere.
"""

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
KERNEL_NAME = "pyro-avf-tests"
CELL_TIMEOUT = 300  # seconds per cell

# Strings the executed notebook's outputs must contain (each notebook's last cell prints "checks passed" after
# asserting its claims) and the least number of figures it shows. Notebooks not listed here get the generic
# checks only.
EXPECTED = {
    "01_intro_lgssm.ipynb": {"text": ["checks passed", "iteration 0: F =", "diagonal optimum"], "figures": 5},
    "04_static_vae.ipynb": {"text": ["checks passed", "amortization gap", "data folder:"], "figures": 5},
    "05_flows_video.ipynb": {"text": ["checks passed", "1-AF", "2-AF"], "figures": 4},
    "06_structured_and_smc.ipynb": {"text": ["checks passed", "diagonal floor", "bootstrap proposal"], "figures": 2},
}


def output_text(output) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    if output.get("output_type") == "error":
        return "\n".join(output.get("traceback", []))
    return str(output.get("data", {}).get("text/plain", "")) + str(output.get("data", {}).get("text/html", ""))


def code_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "code"]


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    """A kernel spec that starts ipykernel with the interpreter running the tests."""
    root = tmp_path_factory.mktemp("kernels")
    spec = root / KERNEL_NAME
    spec.mkdir()
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "pyro-avf tests", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    return root


def test_there_are_tutorials():
    assert len(NOTEBOOKS) >= 3, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(code_cells(nb)) if cell.outputs or cell.execution_count is not None]
    assert not dirty, (
        f"{path.name}: code cells {dirty} have outputs or execution counts; clear them before committing "
        f"(jupyter nbconvert --clear-output --inplace {path.relative_to(TUTORIALS.parent)})"
    )
    first = code_cells(nb)[0].source
    assert "PYRO_AVF_TUTORIAL_SIZE" in first, f"{path.name}: the first code cell must read PYRO_AVF_TUTORIAL_SIZE"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_at_small_size(path, kernel_dir):
    nb = nbformat.read(path, as_version=4)
    specs = KernelSpecManager(kernel_dirs=[str(kernel_dir)])
    km = AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)
    client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT, resources={"metadata": {"path": str(TUTORIALS)}})
    env = {**os.environ, "PYRO_AVF_TUTORIAL_SIZE": "small"}
    env.pop("MPLBACKEND", None)  # the kernel picks its inline backend
    client.execute(cleanup_kc=True, env=env)  # raises CellExecutionError, with the traceback, if a cell fails

    outputs = [output for cell in code_cells(nb) for output in cell.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    figures = sum("image/png" in o.get("data", {}) for o in outputs)
    assert figures >= 1, f"{path.name} shows no figure (image/png output)"
    expected = EXPECTED.get(path.name, {})
    assert figures >= expected.get("figures", 1), f"{path.name} shows {figures} figures"
    text = "\n".join(output_text(o) for o in outputs)
    missing = [s for s in expected.get("text", []) if s not in text]
    assert not missing, f"{path.name}: outputs lack {missing}"
