"""The import layering of jdiff, checked on the source (ast, nothing is imported):

- no import cycles among jdiff/ and launch/ modules;
- the math (schedules, diffusion, losses, samplers, guidance, testing, conditioning, metrics,
  and sde / editing / edm when they exist) never imports training, networks, data, evaluation,
  inference, workdirs or the command line;
- networks (jdiff.models) never import diffusion code (schedules, diffusion, losses, samplers,
  guidance, sde, editing, edm);
- nothing under jdiff/ imports launch;
- inference, workdir loading and evaluation never import the training loop.

Every import statement counts, including those inside functions (a lazy import is still a
dependency: the old cycle evaluation.workdir -> train.restore -> train.loop -> evaluation.workdir
was made of them). Rules are transitive: a math module importing a module that imports
jdiff.train breaks them too. ``from pkg import name`` depends on ``pkg.name`` when that is a
module, else on ``pkg``; the implicit import of a module's parent packages is not an edge (every
module of jdiff would otherwise depend on jdiff/__init__.py).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("jdiff", "launch")

MATH = ("schedules", "diffusion", "losses", "samplers", "guidance", "testing", "conditioning", "metrics", "sde", "editing",
        "edm")
NOT_FROM_MATH = ("jdiff.train", "jdiff.models", "jdiff.data", "jdiff.evaluation", "jdiff.inference", "jdiff.workdir",
                 "launch")
DIFFUSION_CODE = ("jdiff.schedules", "jdiff.diffusion", "jdiff.losses", "jdiff.samplers", "jdiff.guidance", "jdiff.sde",
                  "jdiff.editing", "jdiff.edm")
APART_FROM_TRAINING = ("jdiff.inference", "jdiff.workdir", "jdiff.evaluation")


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def collect_modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
    return {module_name(p, root): p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))}


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([target] if target else []))


def imports_of(module: str, path: pathlib.Path, modules: dict) -> set[str]:
    """The internal modules ``module`` imports anywhere in its source."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()

    def add(name: str) -> None:
        # The longest prefix that is one of our modules (import a.b.c of a package a.b -> a.b).
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            candidate = ".".join(parts[:i])
            if candidate in modules:
                out.add(candidate)
                return

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = _resolve_relative(module, path.name == "__init__.py", node.level, node.module)
            for alias in node.names:
                full = f"{base}.{alias.name}" if base else alias.name
                if full in modules:
                    out.add(full)
                else:
                    add(base)
    out.discard(module)
    return out


def import_graph(root: pathlib.Path) -> dict[str, set[str]]:
    modules = collect_modules(root)
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module ``start`` imports directly or indirectly, with the module that imports it."""
    seen: dict[str, str] = {}
    todo = [start]
    while todo:
        v = todo.pop()
        for w in graph.get(v, ()):
            if w not in seen and w != start:
                seen[w] = v
                todo.append(w)
    return seen


def _chain(graph, start, target) -> str:
    parents = reachable(graph, start)
    path = [target]
    while path[-1] != start:
        path.append(parents[path[-1]])
    return " -> ".join(reversed(path))


def violations(graph: dict[str, set[str]], sources, forbidden) -> list[str]:
    """``source -> ... -> target`` chains from any module in or under ``sources`` to any in or under ``forbidden``."""
    def within(m, prefixes):
        return any(m == p or m.startswith(p + ".") for p in prefixes)

    out = []
    for m in sorted(graph):
        if within(m, sources):
            for target in sorted(reachable(graph, m)):
                if within(target, forbidden):
                    out.append(_chain(graph, m, target))
    return out


@pytest.fixture(scope="module")
def graph():
    g = import_graph(ROOT)
    assert "jdiff.samplers" in g and "jdiff.train.loop" in g and "launch.train" in g, sorted(g)
    return g


def test_no_import_cycles(graph):
    assert find_cycles(graph) == []


def test_math_never_imports_training_models_data_or_evaluation(graph):
    assert violations(graph, [f"jdiff.{m}" for m in MATH], NOT_FROM_MATH) == []


def test_models_never_import_diffusion_code(graph):
    assert violations(graph, ["jdiff.models"], DIFFUSION_CODE) == []


def test_nothing_in_jdiff_imports_launch(graph):
    assert violations(graph, ["jdiff"], ["launch"]) == []


def test_inference_workdir_and_evaluation_never_import_the_training_loop(graph):
    assert violations(graph, APART_FROM_TRAINING, ["jdiff.train.loop"]) == []
    assert violations(graph, ["jdiff.inference"], ["jdiff.train"]) == []


def _write(root: pathlib.Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_the_checks_catch_a_lazy_cycle_and_a_layering_break(tmp_path):
    """The same checks on a small tree that breaks every rule (so the tests above can fail)."""
    _write(tmp_path, {
        "jdiff/__init__.py": "from jdiff import samplers\n",
        "jdiff/samplers.py": "def f():\n    from .train import loop\n",
        "jdiff/train/__init__.py": "",
        "jdiff/train/loop.py": "from jdiff.evaluation import workdir\n",
        "jdiff/evaluation/__init__.py": "",
        "jdiff/evaluation/workdir.py": "def g():\n    import jdiff.train.loop as loop\n",
        "jdiff/models/__init__.py": "from jdiff.models.unet import UNet\n",
        "jdiff/models/unet.py": "from jdiff import diffusion\nimport launch.train\n",
        "jdiff/diffusion.py": "",
        "jdiff/inference.py": "from jdiff.train import loop\n",
        "launch/__init__.py": "",
        "launch/train.py": "import numpy\nfrom jdiff.train.loop import main\n",
    })
    g = import_graph(tmp_path)
    assert g["jdiff.samplers"] == {"jdiff.train.loop"}  # relative, inside a function
    assert g["launch.train"] == {"jdiff.train.loop"}  # external imports ignored
    assert find_cycles(g) == [["jdiff.evaluation.workdir", "jdiff.train.loop"]]
    assert "jdiff.samplers -> jdiff.train.loop" in violations(g, ["jdiff.samplers"], NOT_FROM_MATH)
    assert "jdiff.models.unet -> jdiff.diffusion" in violations(g, ["jdiff.models"], DIFFUSION_CODE)
    assert "jdiff.models.unet -> launch.train" in violations(g, ["jdiff"], ["launch"])
    assert violations(g, APART_FROM_TRAINING, ["jdiff.train.loop"])
