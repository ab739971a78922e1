"""The documentation site's sources are complete (CI also builds the site: ``mkdocs build --strict``).

Checked here in seconds, so that a missing page or docstring fails before CI's build does: every
module of jdiff is rendered on an API page, every page in the navigation exists, and the griffe
extension the build uses finds a docstring on every public name and a target for every
cross-reference role.
"""

import glob
import logging
import os
import re
import sys

from conftest import require_modules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")


def _rendered_modules():
    found = set()
    for page in glob.glob(os.path.join(DOCS, "**", "*.md"), recursive=True):
        found.update(re.findall(r"^::: ([\w.]+)", open(page).read(), re.M))
    return found


def test_every_module_has_an_api_page():
    """Each jdiff module is on a page, except packages whose ``__init__`` only re-exports."""
    modules = set()
    for path in glob.glob(os.path.join(ROOT, "jdiff", "**", "*.py"), recursive=True):
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        if name.endswith(".__init__"):
            continue
        modules.add(name)
    missing = modules - _rendered_modules()
    assert not missing, f"modules with no API page (add them to a page under docs/api/): {sorted(missing)}"


def test_every_launch_command_is_on_the_cli_page():
    commands = {f"launch.{os.path.basename(p)[:-3]}" for p in glob.glob(os.path.join(ROOT, "launch", "*.py"))}
    commands -= {"launch.__init__", "launch.common"}
    assert commands <= _rendered_modules(), sorted(commands - _rendered_modules())


def test_navigation_points_at_existing_pages():
    yaml = require_modules("yaml")
    config = yaml.safe_load(open(os.path.join(ROOT, "mkdocs.yml")).read().replace("!!python", "#"))
    pages = []

    def walk(node):
        if isinstance(node, str):
            pages.append(node)
        elif isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)

    walk(config["nav"])
    notebooks = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "colab", "*.ipynb"))}
    for page in pages:
        if page.startswith("notebooks/"):  # copied from colab/ at build time
            assert os.path.basename(page) in notebooks, page
        else:
            assert os.path.exists(os.path.join(DOCS, page)), page
    assert {f"notebooks/{n}" for n in notebooks} <= set(pages), "a notebook under colab/ is not in the nav"


def test_public_names_documented_and_roles_resolve(caplog):
    """What makes the strict build fail, found by the same griffe extension the build loads."""
    griffe = require_modules("griffe")
    sys.path.insert(0, os.path.join(DOCS, "hooks"))
    try:
        import griffe_jdiff
    finally:
        sys.path.pop(0)
    with caplog.at_level(logging.WARNING, logger=griffe_jdiff.log.name):
        package = griffe.load("jdiff", search_paths=[ROOT], extensions=griffe.load_extensions(griffe_jdiff.JdiffApi))
    undocumented = [r.getMessage() for r in caplog.records]
    assert not undocumented, "\n".join(undocumented)
    unresolved = []
    for module in griffe_jdiff._modules(package):
        for obj in [module, *griffe_jdiff._members(module)]:
            if obj.docstring is not None:
                unresolved += [f"{obj.path}: {target}" for target in re.findall(r"\[`[^`]*`\]\[([^\]]+)\]", obj.docstring.value)
                               if griffe_jdiff._resolve(obj, target) is None]
    assert not unresolved, unresolved
