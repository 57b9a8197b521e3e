"""Render the package's reST roles and literal blocks as Markdown on the API pages.

The docstrings in ``lightning_adv/`` are Google style with reST roles, so that ``help()``
and editors read them well: ``:class:`~lightning_adv.FGM```, ``Example::``. mkdocstrings
reads Markdown. This Griffe extension, loaded from ``mkdocs.yml``, rewrites each role into
a cross-reference when its target is an object of the package, and into inline code
otherwise; a cross-reference whose target is on no page fails ``mkdocs build --strict``.
An ``Example::`` paragraph followed by an indented block becomes a Python code block.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterator
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|meth|func|attr|mod|data|obj|exc):`(~?)([\w.]+)(\(\))?`")
LITERAL = re.compile(r"^Example::[ \t]*\n\n((?:(?:[ \t]+\S.*)?\n?)+)", re.MULTILINE)


class RestRoles(griffe.Extension):
    """Rewrite every docstring of the package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for obj in _objects(pkg):
            if obj.docstring is not None:
                obj.docstring.value = _rewrite(obj.docstring.value, obj, pkg)


def _rewrite(text: str, obj: griffe.Object, pkg: griffe.Module) -> str:
    text = ROLE.sub(lambda match: _reference(match, obj, pkg), text)
    return LITERAL.sub(_code_block, text)


def _objects(obj: griffe.Object) -> Iterator[griffe.Object]:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)  # type: ignore[arg-type]


def _exists(pkg: griffe.Module, path: str) -> bool:
    if path == pkg.path:
        return True
    if not path.startswith(pkg.path + "."):
        return False
    try:
        pkg[path[len(pkg.path) + 1 :]]
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return False
    return True


def _scopes(obj: griffe.Object) -> Iterator[str]:
    """Where a bare name is looked up: the object, its class, its module, the package."""
    current: griffe.Object | None = obj
    while current is not None:
        yield current.path
        current = current.parent  # type: ignore[assignment]


def _reference(match: re.Match[str], obj: griffe.Object, pkg: griffe.Module) -> str:
    short, name, call = match.group(1) == "~", match.group(2), match.group(3) or ""
    shown = (name.rsplit(".", 1)[-1] if short else name) + call
    candidates = [name] if name.startswith(pkg.path + ".") else [
        f"{scope}.{name}" for scope in _scopes(obj)
    ]
    for path in candidates:
        if _exists(pkg, path):
            return f"[`{shown}`][{path}]"
    return f"`{shown}`"


def _code_block(match: re.Match[str]) -> str:
    code = textwrap.dedent(match.group(1)).strip("\n")
    return f"**Example**\n\n```python\n{code}\n```\n\n"
