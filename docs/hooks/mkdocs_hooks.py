"""mkdocs hooks for jdiff's site (mkdocs.yml ``hooks:``).

* The notebooks: ``colab/*.ipynb`` are copied into ``docs/notebooks/`` (git-ignored) before the
  files are collected, so mkdocs-jupyter renders them. Where CI has executed a notebook
  (``tests/test_colab.py`` writes it to ``build/notebooks/``), the executed copy, with its outputs,
  is the one rendered; with ``JDIFF_DOCS_EXECUTED=1`` (CI) a notebook that was not executed is an error.
* The measurement pages are BENCHMARKS.md and RELIABILITY.md from the repository root, read at
  build time (one source of truth); their image links, relative to the root (``docs/x.png``), are
  made relative to the site.
"""

from __future__ import annotations

import glob
import logging
import os

log = logging.getLogger("mkdocs.hooks.jdiff")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXECUTED = os.path.join(ROOT, "build", "notebooks")


def on_config(config, **kwargs):
    out = os.path.join(config["docs_dir"], "notebooks")
    os.makedirs(out, exist_ok=True)
    require = os.environ.get("JDIFF_DOCS_EXECUTED") == "1"
    sources = sorted(glob.glob(os.path.join(ROOT, "colab", "*.ipynb")))
    for stale in set(os.listdir(out)) - {os.path.basename(p) for p in sources}:
        os.remove(os.path.join(out, stale))
    for source in sources:
        name = os.path.basename(source)
        executed = os.path.join(EXECUTED, name)
        if os.path.exists(executed) and os.path.getmtime(executed) >= os.path.getmtime(source):
            source = executed
        elif require:
            log.error("notebook %s has no executed copy in %s newer than the source "
                      "(run: python -m pytest -m slow tests/test_colab.py)", name, EXECUTED)
        _copy_if_changed(source, os.path.join(out, name))
    return config


def _copy_if_changed(source, target):
    """Copy only what changed: ``mkdocs serve`` watches docs/, and a rewrite would rebuild forever."""
    with open(source, "rb") as f:
        data = f.read()
    if os.path.exists(target):
        with open(target, "rb") as f:
            if f.read() == data:
                return
    with open(target, "wb") as f:
        f.write(data)


INCLUDED = {"benchmarks.md": "BENCHMARKS.md", "reliability.md": "RELIABILITY.md"}


def on_page_markdown(markdown, page, **kwargs):
    source = INCLUDED.get(page.file.src_uri)
    if source is None:
        return markdown
    with open(os.path.join(ROOT, source)) as f:
        return f.read().replace("](docs/", "](")
