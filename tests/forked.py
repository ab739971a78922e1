"""Processes to kill, started without paying for their imports each time.

The kill tests (tests/test_reliability.py) start a process, SIGKILL it at a random moment and
start the next: 20 checkpoint writers, and 9 runs of ``python -m launch.train``. A fresh Python
spends ~1.5 s of CPU importing JAX, Flax, orbax and jdiff before it does anything, about as long
as a trial itself. So the processes are children of one fork server (``multiprocessing``'s
``forkserver``), which imported those modules once and nothing else: no JAX backend, no threads.
Each child is a process of its own, forked from that clean state: it initialises its own JAX
backend and orbax threads, and a SIGKILL kills it alone, as it would a fresh ``python``.

:func:`start_command` runs a module as ``python -m MODULE ARGS`` would after its imports:
``sys.argv = [module file, *ARGS]``, then the module's ``if __name__ == "__main__":`` block (its
``app.run(main, ...)``), with stdout and stderr written to files. :func:`start_function` runs a
function of a preloaded module. The server inherits this process's environment when it starts.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Imported by the fork server before it forks anything (tests/workers is on sys.path below).
PRELOAD = ["save_forever", "launch.train"]


def _context():
    for path in (ROOT, os.path.join(ROOT, "tests", "workers")):
        if path not in sys.path:
            sys.path.insert(0, path)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # used when the server starts (the first child of this process)
    return ctx


def _touch(*paths: str) -> None:
    for path in paths:  # empty, so that they can be read before the child writes
        open(path, "w").close()


def _redirect(stdout: str, stderr: str) -> None:
    for fd, path in ((1, stdout), (2, stderr)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)


def _run_main_block(module_name: str, args: list[str], stdout: str, stderr: str) -> None:
    from commands import main_block

    _redirect(stdout, stderr)
    module = importlib.import_module(module_name)
    sys.argv = [module.__file__, *args]
    exec(main_block(module), vars(module))  # noqa: S102


def _run_function(module_name: str, function: str, args: tuple, stdout: str, stderr: str) -> None:
    _redirect(stdout, stderr)
    getattr(importlib.import_module(module_name), function)(*args)


def start_command(module: str, args: list[str], stdout: str, stderr: str) -> multiprocessing.Process:
    """``python -m module *args`` as a forked child (see the module docstring); its stdout and
    stderr go to the files ``stdout`` and ``stderr``. ``.exitcode`` after ``.join()`` is the
    command's exit code (minus the signal number if a signal ended it)."""
    _touch(stdout, stderr)
    proc = _context().Process(target=_run_main_block, args=(module, list(args), stdout, stderr))
    proc.start()
    return proc


def start_function(module: str, function: str, args: tuple, stdout: str, stderr: str) -> multiprocessing.Process:
    """``module.function(*args)`` in a forked child, its stdout and stderr in files."""
    _touch(stdout, stderr)
    proc = _context().Process(target=_run_function, args=(module, function, tuple(args), stdout, stderr))
    proc.start()
    return proc


def follow(path: str, proc: multiprocessing.Process, timeout: float = 300) -> Iterator[str]:
    """The complete lines written to ``path``, as they appear, until ``proc`` has exited and
    every line is read (or ``timeout`` seconds pass)."""
    deadline = time.time() + timeout
    pos, pending = 0, ""
    while time.time() < deadline:
        alive = proc.is_alive()
        with open(path) as f:
            f.seek(pos)
            chunk = f.read()
            pos = f.tell()
        pending += chunk
        *lines, pending = pending.split("\n")
        yield from lines
        if not alive and not chunk:
            return
        if not chunk:
            time.sleep(0.002)
    raise TimeoutError(f"{path}: the process did not finish within {timeout} s")
