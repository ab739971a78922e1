"""The Colab notebooks: their layout (default suite), and each one executed top to bottom by a
Jupyter kernel with small settings (papermill; a slow test, which CI runs).

Every notebook under ``colab/`` has the same head: cell 1 installs jdiff as a Colab user does
(``%pip install``, skipped where jdiff is importable) and cell 2, tagged ``parameters``, holds the
knobs that set the run's cost. CI overrides those knobs with :data:`SMALL` and writes the executed
notebook, outputs and pictures included, to ``build/notebooks/``, from which the documentation site
renders it (``docs/hooks/mkdocs_hooks.py``).
"""

import ast
import glob
import json
import os

import pytest

from conftest import require_modules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colab", "*.ipynb")))
EXECUTED = os.path.join(ROOT, "build", "notebooks")

#: The settings CI runs each notebook with: every notebook's cost knobs, cut so that a notebook
#: takes well under a minute on a 2-core CPU, most of it compiling (10 to 30 training steps: at the
#: suite's -O0 the steps run about 2x slower than at XLA's defaults, and halving them from 20-60 cut
#: the adapt notebook's CPU from 64 s to 48 s). The full defaults are in each
#: notebook's parameters cell. ``unet_levels=1`` gives the 8x8 and 16x16 U-Nets one level (no
#: downsampling): smaller programs to compile, the same cells and pictures. The 28x28 Fashion-MNIST
#: networks (cascade, adapt) keep two: at one level their middle attention spans 784 positions, and
#: the cascade measured no faster with it.
SMALL = {
    "quickstart.ipynb": dict(train_steps=30, sample_steps=10, unet_levels=1),
    "guidance.ipynb": dict(train_steps=30, classifier_steps=20, num_samples=20, sample_steps=8, unet_levels=1),
    "editing.ipynb": dict(base_steps=20, inpaint_steps=10, sample_steps=10, unet_levels=1),
    "cascade.ipynb": dict(base_steps=20, sr_steps=20, sample_steps=8),
    "adapt.ipynb": dict(base_steps=20, controlnet_steps=15, dreambooth_steps=10, controlnet_examples=2000, num_prior=16,
                        sample_steps=8),
    "text_to_image.ipynb": dict(judge_steps=30, text_steps=30, clip_steps=15, autoencoder_steps=20,
                                num_prompts=16, sample_steps=8, unet_levels=1),
}

INSTALL_LINE = "    %pip install -q {JDIFF_SOURCE}"


def _cells(path):
    nb = json.load(open(path))
    assert nb["nbformat"] == 4
    return nb["cells"]


def _source(cell):
    return "".join(cell["source"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_layout(path):
    """Cell 1 installs jdiff with %pip, cell 2 is papermill's parameters cell, CI's small settings
    name only parameters the notebook has, and every code cell is valid IPython."""
    transformer = require_modules("IPython.core.inputtransformer2").TransformerManager()
    name = os.path.basename(path)
    cells = _cells(path)
    install, params = cells[1], cells[2]
    assert "install" in install["metadata"].get("tags", []) and INSTALL_LINE in _source(install).splitlines()
    assert params["metadata"].get("tags") == ["parameters"]
    assigned = {t.id for node in ast.parse(_source(params)).body for t in getattr(node, "targets", [])}
    assert name in SMALL and SMALL[name], f"{name}: tests/test_colab.py has no small settings for it"
    assert set(SMALL[name]) <= assigned, (name, set(SMALL[name]) - assigned)
    for i, cell in enumerate(cells):
        if cell["cell_type"] == "code":
            compile(transformer.transform_cell(_source(cell)), f"{name}[{i}]", "exec")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_top_to_bottom(path):
    """The notebook, executed by a Jupyter kernel with CI's small settings; the executed copy (with
    its outputs) is what the documentation site renders."""
    papermill = require_modules("papermill")
    name = os.path.basename(path)
    os.makedirs(EXECUTED, exist_ok=True)
    out = os.path.join(EXECUTED, name)
    partial = os.path.join(EXECUTED, "partial_" + name)  # the site never shows a half-run notebook
    papermill.execute_notebook(path, partial, parameters=SMALL[name], kernel_name="python3",
                               cwd=os.path.dirname(path), progress_bar=False)
    executed = json.load(open(partial))
    executed["cells"].insert(1, {"cell_type": "markdown", "id": "ci-note", "metadata": {}, "source": [
        "> **Executed by CI** (`tests/test_colab.py`) with the small settings of the injected parameters cell "
        "below, so its pictures and numbers are those of a few dozen training steps; the text quotes runs with "
        "the defaults of the parameters cell, which is what this notebook does in Colab."]})
    with open(partial, "w") as f:
        json.dump(executed, f, indent=1)
    os.replace(partial, out)
    cells = _cells(out)
    assert not any(o.get("output_type") == "error" for c in cells for o in c.get("outputs", []))
    pictures = [o for c in cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert pictures, f"{name} displayed no picture"
