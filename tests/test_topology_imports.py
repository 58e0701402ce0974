"""The `_link` layer's imports (issue #20): no cycle among its modules, nothing from above.

Every import counts, type-only and function-local ones included: a lazy import inside a
function or under `TYPE_CHECKING` hides a cycle, it doesn't remove it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import aio_workq

PACKAGE = Path(aio_workq.__file__).parent
LINK = "aio_workq._link"
# What `_link` may build on: itself, the layer below and the shared modules.
ALLOWED = (LINK, "aio_workq._wire", "aio_workq._exceptions", "aio_workq._hooks", "aio_workq._logs")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every aio_workq module `path` imports, wherever the import statement is."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.startswith("aio_workq"):
                found.add(target)
                found.update(
                    f"{target}.{alias.name}"
                    for alias in node.names
                    if (PACKAGE.parent / f"{target}.{alias.name}".replace(".", "/"))
                    .with_suffix(".py")
                    .exists()
                )
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("aio_workq"))
    found.discard(name)
    return found


def _link_graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted((PACKAGE / "_link").glob("*.py"))}


def test_link_modules_import_nothing_from_a_higher_layer() -> None:
    upward = {
        module: sorted(t for t in targets if not t.startswith(ALLOWED))
        for module, targets in _link_graph().items()
    }
    assert {m: t for m, t in upward.items() if t} == {}


def test_link_modules_import_no_cycle() -> None:
    graph = {
        m: {t for t in targets if t.startswith(LINK + ".")} for m, targets in _link_graph().items()
    }
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join((*path, module)))
        if module in done:
            return
        for target in sorted(graph.get(module, ())):
            visit(target, (*path, module))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())
    assert "aio_workq._link.delay" in graph and "aio_workq._link.router" in graph
