"""The Colab notebooks are valid and run top to bottom (the full run is a slow test)."""

import glob
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colab", "*.ipynb")))


def _code(path):
    nb = json.load(open(path))
    assert nb["nbformat"] == 4
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_cells_compile(path):
    for i, src in enumerate(_code(path)):
        compile(src, f"{os.path.basename(path)}[{i}]", "exec")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_top_to_bottom(path):
    namespace: dict = {}
    for i, src in enumerate(_code(path)):
        exec(compile(src, f"{os.path.basename(path)}[{i}]", "exec"), namespace)  # noqa: S102
