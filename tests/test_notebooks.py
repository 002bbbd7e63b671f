"""The lessons in notebooks/ run headless on the shipped toy model, each well inside two minutes."""
import glob
import os
import time

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "notebooks", "*.ipynb")))
TIMES: dict[str, float] = {}


def test_there_are_lessons():
    assert len(NOTEBOOKS) >= 4


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_runs(path):
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    took = time.perf_counter() - start
    print(f"{os.path.basename(path)}: {took:.1f} s")
    assert took < 120, f"{os.path.basename(path)} took {took:.0f} s; a lesson must run in under two minutes on a CPU"
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert not errors
