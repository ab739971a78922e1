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
import shutil

log = logging.getLogger("mkdocs.hooks.jdiff")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXECUTED = os.path.join(ROOT, "build", "notebooks")


def on_config(config, **kwargs):
    out = os.path.join(config["docs_dir"], "notebooks")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    require = os.environ.get("JDIFF_DOCS_EXECUTED") == "1"
    for source in sorted(glob.glob(os.path.join(ROOT, "colab", "*.ipynb"))):
        name = os.path.basename(source)
        executed = os.path.join(EXECUTED, name)
        if os.path.exists(executed) and os.path.getmtime(executed) >= os.path.getmtime(source):
            shutil.copy(executed, os.path.join(out, name))
        else:
            if require:
                log.error("notebook %s has no executed copy in %s newer than the source "
                          "(run: python -m pytest -m slow tests/test_colab.py)", name, EXECUTED)
            shutil.copy(source, os.path.join(out, name))
    return config


INCLUDED = {"benchmarks.md": "BENCHMARKS.md", "reliability.md": "RELIABILITY.md"}


def on_page_markdown(markdown, page, **kwargs):
    source = INCLUDED.get(page.file.src_uri)
    if source is None:
        return markdown
    with open(os.path.join(ROOT, source)) as f:
        return f.read().replace("](docs/", "](")
