"""The README's Python snippets run as written."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_snippets_run():
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    namespace: dict = {}
    exec(compile("\n".join(blocks), "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["x"].shape == (8000, 2)
    # The editing snippet's known pixels end exactly at the known image.
    edited, known = namespace["edited"], namespace["known"]
    assert (edited[:, :, :4] == known[:, :, :4]).all()
    assert (namespace["inpainted"][:, 0] == 1.5).all() and namespace["sde"].shape == (256, 2)


def test_readme_test_command_is_what_ci_runs():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    quickstart = re.search(r"pip install -e \"\.\[test\]\" && (python -m pytest[^\n`]*)", readme)
    assert quickstart, "the README's quickstart has no test command"
    assert quickstart.group(1) in ci.splitlines(), (quickstart.group(1), ci)
