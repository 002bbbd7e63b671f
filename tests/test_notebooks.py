"""The lessons in notebooks/ run headless on the shipped toy model, and are what build_notebooks.py writes.

How long each took is printed (pytest -s shows it) and never asserted: a busy machine is not a defect."""
import glob
import os
import sys
import time

import nbformat
import pytest
from nbclient import NotebookClient

HERE = os.path.join(os.path.dirname(__file__), "..", "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(HERE, "*.ipynb")))


def test_there_are_lessons():
    assert len(NOTEBOOKS) >= 4


def test_committed_notebooks_are_what_the_builder_writes():
    """An edit to build_notebooks.py must be followed by a rebuild, or CI would run stale lessons."""
    sys.path.insert(0, HERE)
    try:
        import build_notebooks
    finally:
        sys.path.remove(HERE)
    assert sorted(build_notebooks.LESSONS) == [os.path.basename(p)[:-6] for p in NOTEBOOKS]
    for name, cells in build_notebooks.LESSONS.items():
        committed = nbformat.read(os.path.join(HERE, f"{name}.ipynb"), as_version=4)
        built = build_notebooks.notebook(cells)
        assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in built.cells], name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_runs(path):
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    print(f"{os.path.basename(path)}: {time.perf_counter() - start:.1f} s")
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert not errors
