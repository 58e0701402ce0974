"""Layering, offline: the shared modules and the publish layer import nothing of the consume
layer, not even for type checking (#20 design smells)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import aio_workq

PACKAGE = Path(aio_workq.__file__).parent


def _imported(path: Path) -> set[str]:
    """Every module `path` imports, as absolute names (relative imports resolved)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            names.add(name)
            names.update(f"{name}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("_hooks.py", "aio_workq._consume"),
        ("_logs.py", "aio_workq._consume"),
        ("_exceptions.py", "aio_workq._"),
        ("_publish/rpc.py", "aio_workq._consume"),
    ],
)
def test_a_lower_layer_does_not_import_a_higher_one(module: str, forbidden: str) -> None:
    target = PACKAGE / module
    files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
    bad = {
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path in files
        for name in _imported(path)
        if name.startswith(forbidden) and name != "aio_workq._exceptions"
    }
    assert not bad, sorted(bad)
