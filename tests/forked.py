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

:func:`popen_module` runs a module as ``python -m MODULE ARGS`` would after its imports:
``sys.argv = [module file, *ARGS]``, then the module's ``if __name__ == "__main__":`` block (its
``app.run(main, ...)``), in the given working directory, then the interpreter's exit handlers
(``atexit``). It returns a :class:`Popen`, which is waited for, signalled and read as a
``subprocess.Popen`` is (stdout and stderr go to files); :func:`run_module` is ``subprocess.run``.
:func:`popen_function` runs a function of a module (a worker, or code that sets ``XLA_FLAGS``
before its backend starts) the same way. The
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
import weakref
from collections.abc import Iterator

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


def _redirect(stdout: str, stderr: str) -> None:
    for fd, path in ((1, stdout), (2, stderr)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)


def _run_main_block(module_name: str, args: list[str], cwd: str, stdout: str, stderr: str) -> None:
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


class Popen:
    """A forked child, waited for and signalled as a ``subprocess.Popen`` is. Its stdout and
    stderr go to files (``stdout_path``, ``stderr_path``: empty until it writes, so they can be
    read while it runs), removed with this object."""

    def __init__(self, target, args: tuple, describe: list[str]):
        self.args = describe
        directory = tempfile.mkdtemp(prefix="jdiff-forked-")
        weakref.finalize(self, shutil.rmtree, directory, True)
        self.stdout_path, self.stderr_path = os.path.join(directory, "stdout"), os.path.join(directory, "stderr")
        for path in (self.stdout_path, self.stderr_path):
            open(path, "w").close()
        self._proc = _context().Process(target=target, args=(*args, self.stdout_path, self.stderr_path))
        self._proc.start()
        self.pid = self._proc.pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """The exit code (minus the signal number if a signal ended it), or None while it runs."""
        self.returncode = self._proc.exitcode
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Waits; past ``timeout`` seconds it kills the child and raises ``subprocess.TimeoutExpired``."""
        self._proc.join(timeout)
        if self.poll() is None:
            self.kill()
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        self._proc.kill()
        self._proc.join()
        self.poll()

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Waits, then returns (stdout, stderr) as text."""
        self.wait(timeout)
        with open(self.stdout_path) as out, open(self.stderr_path) as err:
            return out.read(), err.read()


def popen_module(module: str, *args: str, cwd: str = ROOT) -> Popen:
    """``subprocess.Popen([python, "-m", module, *args], cwd=cwd, stdout=PIPE, stderr=PIPE,
    text=True)``, as a child of the fork server (see the module docstring)."""
    args = [os.fspath(a) for a in args]
    return Popen(_run_main_block, (module, args, os.fspath(cwd)), ["python", "-m", module, *args])


def run_module(module: str, *args: str, cwd: str = ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
    """``subprocess.run([python, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
    timeout=timeout)``, as a child of the fork server."""
    proc = popen_module(module, *args, cwd=cwd)
    out, err = proc.communicate(timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def popen_function(module: str, function: str, *args) -> Popen:
    """``module.function(*args)`` as a child of the fork server, run in the repository root."""
    return Popen(_run_function, (module, function, args), [f"{module}.{function}"])


def follow(proc: Popen, timeout: float = 300) -> Iterator[str]:
    """The complete lines ``proc`` writes to its stdout, as they appear, until it has exited and
    every line is read (or ``timeout`` seconds pass)."""
    deadline = time.time() + timeout
    pos, pending = 0, ""
    while time.time() < deadline:
        alive = proc.poll() is None
        with open(proc.stdout_path) as f:
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
    raise TimeoutError(f"{proc.args}: the process did not finish within {timeout} s")
