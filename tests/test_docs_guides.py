"""The guides' Python snippets (docs/guides/*.md) run as written.

Every ```python block of a guide runs, in order, in one fresh namespace per guide (the pattern of
tests/test_readme.py); the blocks assert what the guide claims. Blocks fenced ```py are shown but
not run (commands that need files or hardware the tests do not have).

Each guide runs in a process of its own (a child of tests/forked.py's fork server, which has JAX
and jdiff imported but no backend started: ``run_guide_in_child``), so that
* scale_out.md gets its 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set
  before JAX starts its backend, and this process's JAX has one CPU device;
* what a guide changes in its process (the samplers extending.md registers, the TFDS mock of
  tfds.md) cannot reach another guide or test;
* the guides whose time goes into compiling U-Nets (FAST_COMPILE) compile with LLVM's -O0
  (--xla_backend_optimization_level=0) and the suite's other compile flags (conftest.FAST_COMPILE_FLAGS),
  as the rest of the suite does: about a fifth of the compile time. It changes float32
  rounding a little (up to ~1e-4 after a sampling loop on the mixture), so the guides whose
  assertions are about rounding (extending.md compares samplers to 1e-4, pretrained.md the
  converted network to 1e-4) run with XLA's defaults, as readers do.
  quickstart.md and tfds.md train the same network: the second loads its programs from the
  persistent compilation cache conftest.py sets up for the run (the subprocesses inherit it).

pretrained.md needs PyTorch and diffusers (the converter's oracle): without them it skips, and in CI,
which installs them, it fails (conftest.require_modules). A failure shows the guide's output, its
traceback pointing at the line of the Markdown file.
"""

from __future__ import annotations

import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUIDES = os.path.join(ROOT, "docs", "guides")
#: Guides that must have runnable snippets (cli.md has none: its usage comes from the commands).
WITH_SNIPPETS = ("quickstart.md", "extending.md", "scale_out.md", "tfds.md", "pretrained.md")
#: XLA CPU devices of each guide's process (default 1).
DEVICES = {"scale_out.md": 8}
#: Guides compiled with --xla_backend_optimization_level=0 (see the module docstring).
FAST_COMPILE = ("quickstart.md", "tfds.md", "scale_out.md")
#: Modules a guide needs beyond jdiff's dependencies.
REQUIRES = {"pretrained.md": ("torch", "diffusers")}
TIMEOUT = 900

BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(path: str) -> list[tuple[int, str]]:
    """``(line of the block's first code line, code)`` of every ```python block of ``path``."""
    text = open(path, encoding="utf-8").read()
    return [(text.count("\n", 0, m.start(1)), m.group(1)) for m in BLOCK.finditer(text)]


def run_guide(path: str) -> dict:
    """Execute the guide's blocks in order in one namespace; each block compiled with its own line
    numbers, so a traceback points into the Markdown file."""
    namespace: dict = {"__name__": "__guide__"}
    rel = os.path.relpath(path, ROOT)
    for line, code in python_blocks(path):
        exec(compile("\n" * line + code, rel, "exec"), namespace)  # noqa: S102
    return namespace


def _guides() -> list[str]:
    return sorted(name for name in os.listdir(GUIDES) if name.endswith(".md"))


def _runnable() -> list[str]:
    return [name for name in _guides() if python_blocks(os.path.join(GUIDES, name))]


def _xla_flags(guide: str) -> str:
    from conftest import xla_compile_flags, xla_defaults_env

    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", xla_defaults_env()["XLA_FLAGS"]).split()
    flags.append(f"--xla_force_host_platform_device_count={DEVICES.get(guide, 1)}")
    if guide in FAST_COMPILE:
        flags += xla_compile_flags()
    return " ".join(flags)


def run_guide_in_child(path: str, xla_flags: str, cwd: str) -> None:
    """:func:`run_guide` in a child of tests/forked.py's fork server, whose JAX has imported but
    not started a backend: XLA reads ``XLA_FLAGS`` when the backend starts, so the guide's flags
    (its device count among them) set here are the ones it runs with."""
    os.environ["XLA_FLAGS"] = xla_flags
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_platforms", "cpu")
    os.chdir(cwd)
    run_guide(path)


def test_the_guides_exist():
    assert set(WITH_SNIPPETS) <= set(_guides())
    for name in WITH_SNIPPETS:
        assert python_blocks(os.path.join(GUIDES, name)), f"{name} has no ```python block"


@pytest.mark.parametrize("guide", _runnable())
def test_guide_snippets_run(guide, tmp_path):
    if guide in REQUIRES:
        from conftest import require_modules

        require_modules(*REQUIRES[guide])
    import forked

    # cwd: whatever a snippet writes by a relative path stays out of the checkout
    proc = forked.popen_function("test_docs_guides", "run_guide_in_child", os.path.join(GUIDES, guide),
                                 _xla_flags(guide), str(tmp_path))
    out, err = proc.communicate(TIMEOUT)
    assert proc.returncode == 0, f"docs/guides/{guide} failed (exit {proc.returncode}):\n{(out + err)[-12000:]}"


if __name__ == "__main__":  # one guide: python tests/test_docs_guides.py docs/guides/GUIDE.md
    run_guide(sys.argv[1])
