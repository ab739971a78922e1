"""A griffe extension for jdiff's API reference (loaded by mkdocstrings, see mkdocs.yml).

jdiff's docstrings are reStructuredText-flavoured: cross-references are Sphinx roles
(``:func:`sample```, ``:class:`~jdiff.schedules.Schedule```). Once the whole package is loaded this
extension

* opens reST bullet lists with the blank line Markdown needs;
* rewrites every role into an mkdocs-autorefs link (``[sample][jdiff.samplers.sample]``), resolving
  a bare name the way Sphinx does (the docstring's class, then its module, then the package), so a
  reference that names nothing becomes an unresolved autorefs link, which fails ``mkdocs build --strict``;
* warns (and so fails the strict build) for every public name of ``jdiff`` with no docstring: the
  names in each module's ``__all__`` (every name without a leading underscore where a module has no ``__all__``)
  and the public methods and properties of public classes.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import griffe

#: Written to the ``mkdocs`` logger, whose warnings ``mkdocs build --strict`` turns into a failure.
log = logging.getLogger("mkdocs.plugins.jdiff_api")

ROLE = re.compile(r":(?:py:)?(class|func|data|mod|meth|attr|obj|exc):`(~?)([A-Za-z_][\w.]*)(\(\))?`")


def _public_names(module: griffe.Module) -> list[str]:
    if module.exports is not None:
        return [str(name) for name in module.exports]
    return [name for name in module.members if not name.startswith("_")]


#: What each role may name (Sphinx's rule): a ``:func:`` never resolves to a dataclass field.
KINDS = {"class": {"class"}, "exc": {"class"}, "func": {"function", "class"}, "meth": {"function"},
         "mod": {"module"}, "data": {"attribute"}, "attr": {"attribute", "function"}}


def _resolve(obj: griffe.Object, name: str, role: str = "obj") -> str | None:
    """The canonical path ``name`` refers to from ``obj``'s docstring, or None."""
    scopes = []
    node: Any = obj
    while node is not None:  # the object itself (a class's methods), its parents, outwards
        scopes.append(node.path)
        node = node.parent
    candidates = [name] + [f"{scope}.{name}" for scope in scopes]
    root = obj.package
    for candidate in candidates:
        head, _, rest = candidate.partition(".")
        if head != root.name:
            continue
        try:
            target = root[rest] if rest else root
        except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            continue
        try:
            final = target.final_target if target.is_alias else target
        except (griffe.AliasResolutionError, griffe.CyclicAliasError):
            return candidate
        if role in KINDS and final.kind.value not in KINDS[role]:
            continue
        return final.path
    return None


class JdiffApi(griffe.Extension):
    """Roles to autorefs links, and a warning for every undocumented public name."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for module in _modules(pkg):
            if pkg.name == "launch" and module.docstring is not None:
                module.docstring.value = _fence_commands(module.docstring.value)
            for obj in [module, *_members(module)]:
                if obj.docstring is not None:
                    text = ROLE.sub(lambda m, o=obj: _link(o, m), obj.docstring.value)
                    obj.docstring.value = _open_lists(text)
            if pkg.name == "jdiff":  # launch/ is rendered for its module docstrings (the CLI) only
                self._check_documented(module)

    def _check_documented(self, module: griffe.Module) -> None:
        for name in _public_names(module):
            member = module.members.get(name)
            if member is None or member.is_alias or member.is_module:
                continue  # re-exports are documented where they are defined; submodules on their own
            if not member.docstring:
                log.warning("jdiff API: %s has no docstring", member.path)
            if member.is_class:
                for sub in member.members.values():
                    if sub.is_alias or sub.name.startswith("_") or not (sub.is_function or "property" in sub.labels):
                        continue
                    if not sub.docstring:
                        log.warning("jdiff API: %s has no docstring", sub.path)


LIST_ITEM = re.compile(r"^\s{0,3}[*-] ")


def _open_lists(text: str) -> str:
    """reST starts a bullet list right under a paragraph line; Markdown needs a blank line first."""
    lines = text.splitlines()
    out: list[str] = []
    for i, line in enumerate(lines):
        if LIST_ITEM.match(line) and i and lines[i - 1].strip() and not LIST_ITEM.match(lines[i - 1]) \
                and not lines[i - 1].startswith((" ", "\t")):
            out.append("")
        out.append(line)
    return "\n".join(out)


def _fence_commands(text: str) -> str:
    """A command's docstring shows its usage as bare ``python -m launch...`` lines (continued by
    indented lines or a trailing backslash): each run of them becomes a ``bash`` code block."""
    out: list[str] = []
    block: list[str] = []
    for line in text.splitlines():
        continues = block and (block[-1].rstrip().endswith("\\") or line.startswith((" ", "\t")) and line.strip())
        if line.startswith("python ") or continues:
            block.append(line)
            continue
        if block:
            out += ["```bash", *block, "```"]
            block = []
        out.append(line)
    if block:
        out += ["```bash", *block, "```"]
    return "\n".join(out)


def _modules(module: griffe.Module):
    yield module
    for sub in module.modules.values():
        if not sub.is_alias:
            yield from _modules(sub)


def _members(obj: griffe.Object):
    for member in obj.members.values():
        if member.is_alias or member.is_module:
            continue
        yield member
        if member.is_class:
            yield from _members(member)


def _link(obj: griffe.Object, match: re.Match) -> str:
    role, tilde, name, call = match.groups()
    target = _resolve(obj, name, role)
    shown = (name.rsplit(".", 1)[-1] if tilde else name) + (call or "")
    if target is None:
        target = name  # unresolved: autorefs reports it, and the strict build fails
    return f"[`{shown}`][{target}]"
