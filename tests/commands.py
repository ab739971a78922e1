"""Run many refused command lines of one ``launch.*`` module in one Python process.

Tests check that a bad command line (``python -m launch.X ARGS``) exits non-zero, names the
bad flag on stderr and writes nothing. A fresh process per such case costs seconds of CPU
importing JAX, Flax and jdiff, for a refusal that takes milliseconds; so the cases of one
module run in turn in one process (:func:`run_commands`).

A case ``ARGS`` of module ``MODULE`` runs as ``python -m MODULE ARGS`` would, after the
import: ``sys.argv`` is ``[MODULE's file, *ARGS]`` (ml_collections' config flags read their
overrides from it), then the module's own ``if __name__ == "__main__":`` block runs, i.e. its
``app.run(main, flags_parser=...)`` with the parser it uses, which turns a usage error into a
message on stderr and exit code 1. Its exit code is what the interpreter's would be (an
uncaught exception: its traceback on stderr and 1; ``sys.exit("text")``: the text and 1).
The flags are reset (``FLAGS.unparse_flags()``, and the ``--config.*`` override flags that
ml_collections defines at each parse removed) before each case. The modules' flags clash
with each other (launch.sample and launch.finetune both define ``--workdir``), so each module
gets its own process: start them together with :func:`start_commands` and collect them with
:func:`finish_commands` to overlap them with each other or with other work.

Each case also reports how many XLA programs were compiled while it ran (a ``jax.monitoring``
listener on the backend-compile event, which fires for persistent-cache hits too): a refusal
must come before anything is loaded or compiled, and callers assert the count is 0.

For commands that fail before loading a checkpoint or compiling; a command that runs to the
end runs as ``python -m`` on its own.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import types

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def main_block(module: types.ModuleType) -> types.CodeType:
    """The one ``if __name__ == "__main__":`` block of ``module``'s source, compiled with its file
    name: ``exec(main_block(module), vars(module))`` with ``sys.argv = [module.__file__, *ARGS]``
    runs the command as ``python -m MODULE ARGS`` would after its imports."""
    tree = ast.parse(open(module.__file__).read(), module.__file__)
    blocks = [node.body for node in tree.body
              if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'"]
    assert len(blocks) == 1, f"{module.__name__}: expected one `if __name__ == '__main__':` block"
    return compile(ast.Module(blocks[0], type_ignores=[]), module.__file__, "exec")


#: Runs the cases of one module (argv[1]; a JSON list of argument lists in argv[2]) as the module
#: docstring says; prints the JSON list of [exit code, stderr, XLA compiles] as its last line.
_RUN_COMMANDS = r"""
import contextlib, importlib, io, json, sys, traceback
sys.path.append(sys.argv.pop(3))  # tests/, for tests/commands.py's main_block
import commands
from absl import flags
from jax import monitoring

compiles = [0]

def count(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
        compiles[0] += 1

monitoring.register_event_duration_secs_listener(count)
name = sys.argv[1]
module = importlib.import_module(name)
main_block = commands.main_block(module)
results = []
for args in json.loads(sys.argv[2]):
    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:  # ml_collections defines them per parse
        delattr(flags.FLAGS, name)
    sys.argv = [module.__file__, *args]
    err, code, before = io.StringIO(), 0, compiles[0]
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            exec(main_block, vars(module))
        except SystemExit as e:  # as the interpreter turns it into an exit code
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except Exception:  # what the interpreter does with an uncaught exception
            traceback.print_exc()
            code = 1
    results.append([code, err.getvalue(), compiles[0] - before])
print(json.dumps(results))
"""


def start_commands(module: str, argvs: list[list[str]], env: dict | None = None) -> subprocess.Popen:
    """A process that runs ``python -m module *args`` for every ``args`` in ``argvs``, in turn
    (see the module docstring); collect it with :func:`finish_commands`. ``env``: the process's
    environment (None: this one's); it runs in the repository root."""
    return subprocess.Popen([sys.executable, "-c", _RUN_COMMANDS, module, json.dumps(argvs), TESTS], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_commands(proc: subprocess.Popen, timeout: float = 300) -> list[tuple[int, str, int]]:
    """[(exit code, stderr, XLA compiles)] of each case of :func:`start_commands`, in order."""
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    return [tuple(r) for r in json.loads(out.strip().splitlines()[-1])]


def run_commands(module: str, argvs: list[list[str]], env: dict | None = None,
                 timeout: float = 300) -> list[tuple[int, str, int]]:
    """[(exit code, stderr, XLA compiles)] of ``python -m module *args`` for each ``args`` in
    ``argvs``, in order, run in one fresh process (see the module docstring)."""
    return finish_commands(start_commands(module, argvs, env), timeout)
