"""Command-line runs as processes of their own, without paying for their imports each time.

The tests run the ``launch`` commands as a user does (``python -m launch.sample ...``) about 40
times, and the kill tests (tests/test_reliability.py) start a process, SIGKILL it at a random
moment and start the next: 20 checkpoint writers, and 9 runs of ``python -m launch.train``. A
fresh Python spends ~1.8 s of CPU importing JAX, Flax, orbax and jdiff before it does anything,
often as long as the run itself. So these processes are children of one fork server per test
process (``multiprocessing``'s ``forkserver``), which imported those modules once and nothing
else: no JAX backend, no threads, and no ``launch`` command (their absl flags clash with each
other). Each child is a process of its own, forked from that clean state: it imports its command,
initialises its own JAX backend and orbax threads, and a SIGKILL kills it alone, as it would a
fresh ``python``.

:func:`start_command` runs a module as ``python -m MODULE ARGS`` would after its imports:
``sys.argv = [module file, *ARGS]``, then the module's ``if __name__ == "__main__":`` block (its
``app.run(main, ...)``), in the given working directory, then the interpreter's exit handlers
(``atexit``), with stdout and stderr written to files. :func:`popen_module` and
:func:`run_module` wrap it the way ``subprocess.Popen`` and ``subprocess.run`` do, for the tests
that check a command's outputs. :func:`start_function` runs a function of a preloaded module. The
server inherits this process's environment and ``sys.path`` (the repository first, as
``python -m`` run from it has) when it starts; a test that needs another environment starts a
``subprocess`` instead.
"""

from __future__ import annotations

import atexit
import importlib
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Imported by the fork server before it forks anything (tests/workers is on sys.path below): what
#: every ``launch`` command imports, and none of the commands (each defines its own absl flags).
PRELOAD = ["save_forever", "launch.common", "jdiff", "jdiff.train.loop", "jdiff.workdir", "jdiff.inference"]


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


def _run_main_block(module_name: str, args: list[str], stdout: str, stderr: str, cwd: str) -> None:
    from commands import main_block

    _redirect(stdout, stderr)
    os.chdir(cwd)
    try:
        module = importlib.import_module(module_name)
        sys.argv = [module.__file__, *args]
        exec(main_block(module), vars(module))  # noqa: S102
    finally:  # what the interpreter runs at exit, which a multiprocessing child skips (os._exit)
        atexit._run_exitfuncs()


def _run_function(module_name: str, function: str, args: tuple, stdout: str, stderr: str) -> None:
    _redirect(stdout, stderr)
    os.chdir(ROOT)
    getattr(importlib.import_module(module_name), function)(*args)


def start_command(module: str, args: Sequence[str], stdout: str, stderr: str, cwd: str = ROOT) -> multiprocessing.Process:
    """``python -m module *args`` run in ``cwd``, as a forked child (see the module docstring); its
    stdout and stderr go to the files ``stdout`` and ``stderr``. ``.exitcode`` after ``.join()`` is
    the command's exit code (minus the signal number if a signal ended it)."""
    _touch(stdout, stderr)
    proc = _context().Process(target=_run_main_block, args=(module, list(args), stdout, stderr, os.fspath(cwd)))
    proc.start()
    return proc


class Popen:
    """A command started by :func:`popen_module`, waited for as a ``subprocess.Popen`` is."""

    def __init__(self, module: str, args: Sequence[str], cwd: str):
        self.args = ["python", "-m", module, *args]
        self._dir = tempfile.mkdtemp(prefix="jdiff-forked-")
        self._out, self._err = os.path.join(self._dir, "stdout"), os.path.join(self._dir, "stderr")
        self._proc = start_command(module, args, self._out, self._err, cwd)
        self.returncode: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            self._proc.kill()
            self._proc.join()
            raise subprocess.TimeoutExpired(self.args, timeout)
        self.returncode = self._proc.exitcode
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Waits, then returns (stdout, stderr) as text."""
        try:
            self.wait(timeout)
            with open(self._out) as out, open(self._err) as err:
                return out.read(), err.read()
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)


def popen_module(module: str, *args: str, cwd: str = ROOT) -> Popen:
    """``subprocess.Popen([python, "-m", module, *args], cwd=cwd, stdout=PIPE, stderr=PIPE,
    text=True)``, as a child of the fork server."""
    return Popen(module, [os.fspath(a) for a in args], cwd)


def run_module(module: str, *args: str, cwd: str = ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
    """``subprocess.run([python, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
    timeout=timeout)``, as a child of the fork server."""
    proc = popen_module(module, *args, cwd=cwd)
    out, err = proc.communicate(timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def start_function(module: str, function: str, args: tuple, stdout: str, stderr: str) -> multiprocessing.Process:
    """``module.function(*args)`` in a forked child run in the repository root, its stdout and
    stderr in files."""
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
