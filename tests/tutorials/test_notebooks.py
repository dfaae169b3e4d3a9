"""Every tutorial notebook runs top to bottom on the bundled model, offline, within a time limit.

The notebooks run on the ``python3`` kernel of the interpreter running the tests (a kernelspec
written to a temporary JUPYTER_PATH, which Jupyter searches first), from ``tutorials/``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed: pip install -e "
                                                  "'.[test]' to run the tutorials")
nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed: pip install -e "
                                                  "'.[test]' to run the tutorials")
pytest.importorskip("ipykernel", reason="ipykernel is not installed: pip install -e '.[test]'")

TUTORIALS = Path(__file__).resolve().parents[2] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
CELL_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def kernel_path(tmp_path_factory) -> Path:
    """A JUPYTER_PATH whose ``python3`` kernel is this interpreter (the project's venv)."""
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (mmlens tests)", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return root


def test_the_tutorials_are_all_there():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, kernel_path: Path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_path))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # The tiny model runs fastest on one thread, all the more on a CPU shared with other jobs.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
        f"{path.name} is committed with outputs: clear them before committing")
    client = nbclient.NotebookClient(
        notebook, kernel_name="python3", timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(TUTORIALS)}},
    )
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    print(f"{path.name}: {seconds:.1f} s")
