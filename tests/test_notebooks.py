"""The teaching notebooks: built from notebooks/build.py, taught with the package, and executed top to bottom.

The execution test runs every notebook in a fresh python3 kernel with ``FORECASTER_NOTEBOOK_FAST=1``
(short training and sweeps) in a temporary working directory; any failing cell fails it. The notebooks
check their own numbers with ``assert`` (hand-computed steps equal the model's, engine equals the full
pass, re-warm is exact when the window holds the whole history), so a wrong result fails here too.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = [
    "01_sequential_data.ipynb",
    "02_rnn.ipynb",
    "03_lstm.ipynb",
    "04_gru.ipynb",
    "05_streaming_state.ipynb",
]
FAST_ENV = "FORECASTER_NOTEBOOK_FAST"


def _build_module():
    spec = importlib.util.spec_from_file_location("notebook_build", NOTEBOOK_DIR / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _code_cells(name: str) -> list[str]:
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def test_every_notebook_is_listed_and_built():
    assert sorted(_build_module().NOTEBOOKS) == NAMES
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_is_what_build_writes(name):
    build = _build_module()
    committed = (NOTEBOOK_DIR / name).read_text(encoding="utf-8")
    assert committed == build.render(build.NOTEBOOKS[name]), (
        f"run: python notebooks/build.py ({name} is stale)"
    )


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_has_no_outputs(name):
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code
    assert all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_teaches_with_the_package(name):
    cells = _code_cells(name)
    source = "\n".join(cells)
    assert FAST_ENV in cells[0]  # the first code cell reads the FAST switch
    assert re.search(r"^from forecaster(\.\w+)* import ", source, re.M)
    # no private copy of the model, the scaling or the training loop
    assert not re.search(r"class \w+\((torch\.)?nn\.Module\)", source)
    assert not re.search(r"torch\.optim|optimizer|zero_grad", source)
    assert not re.search(r"def (transform|normalize|denormalize|fit|train)\w*\(", source)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    monkeypatch.setenv(FAST_ENV, "1")
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    assert any("image/png" in out.get("data", {}) for out in outputs), "no figure was drawn"
    assert "FAST mode" in "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert not list(tmp_path.iterdir()), "the notebook left files in its working directory"
