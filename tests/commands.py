"""Run many refused command lines of one ``launch.*`` module in one Python process.

Tests check that a bad command line (``python -m launch.X ARGS``) exits non-zero, names the
bad flag on stderr and writes nothing. A fresh process per such case costs seconds of CPU
importing JAX, Flax and jdiff, for a refusal that takes milliseconds; so the cases of one
module run in turn in one process (:func:`run_commands`), a child of tests/forked.py's fork
server, which has those imported.

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
end runs in a process of its own (tests/forked.py's :func:`forked.run_module`).
"""

from __future__ import annotations

import ast
import importlib
import json
import os
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


def run_cases(module_name: str, argvs: list[list[str]]) -> None:
    """Runs the cases of one module, in turn, in this process (as the module docstring says), and
    prints the JSON list of [exit code, stderr, XLA compiles] of each as its last line. Called in a
    child of tests/forked.py's fork server by :func:`start_commands`."""
    import contextlib
    import io
    import traceback

    from absl import flags
    from jax import monitoring

    compiles = [0]

    def count(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles[0] += 1

    monitoring.register_event_duration_secs_listener(count)
    module = importlib.import_module(module_name)
    block = main_block(module)
    results = []
    for args in argvs:
        flags.FLAGS.unparse_flags()
        for name in [n for n in flags.FLAGS if n.startswith("config.")]:  # ml_collections defines them per parse
            delattr(flags.FLAGS, name)
        sys.argv = [module.__file__, *args]
        err, code, before = io.StringIO(), 0, compiles[0]
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                exec(block, vars(module))  # noqa: S102
            except SystemExit as e:  # as the interpreter turns it into an exit code
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
            except Exception:  # what the interpreter does with an uncaught exception
                traceback.print_exc()
                code = 1
        results.append([code, err.getvalue(), compiles[0] - before])
    print(json.dumps(results))


def start_commands(module: str, argvs: list[list[str]]):
    """A process that runs ``python -m module *args`` for every ``args`` in ``argvs``, in turn
    (see the module docstring), in the repository root; collect it with :func:`finish_commands`.
    It is a child of tests/forked.py's fork server (a ``forked.Popen``): it imports the command,
    not JAX."""
    import forked

    return forked.popen_function("commands", "run_cases", module, argvs)


def finish_commands(proc, timeout: float = 300) -> list[tuple[int, str, int]]:
    """[(exit code, stderr, XLA compiles)] of each case of :func:`start_commands`, in order."""
    out, err = proc.communicate(timeout)
    assert proc.returncode == 0, err[-3000:]
    return [tuple(r) for r in json.loads(out.strip().splitlines()[-1])]


def run_commands(module: str, argvs: list[list[str]], timeout: float = 300) -> list[tuple[int, str, int]]:
    """[(exit code, stderr, XLA compiles)] of ``python -m module *args`` for each ``args`` in
    ``argvs``, in order, run in one process (see the module docstring)."""
    return finish_commands(start_commands(module, argvs), timeout)
