"""The package's layers, read from its imports: lower layers never import higher ones, and no
module imports another that imports it back (type-only and function-level imports included).

The layers, bottom to top (docs/architecture.md draws them):

    shared      _exceptions, _headers, _hooks, _logs, _version
    _wire       frames on the socket: demux, writer, lanes, tracker, window, acker, seams
    _link       connections, channels, declarations, the delay ladder
    _publish    producer, messages, confirms, RPC client
    _consume    worker, subscription, dispatch, execution, failures, jobs, dead letters
    surface     aio_workq itself, the integrations, metrics, tracing, cli, outbox, testing
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import aio_workq

PACKAGE = Path(aio_workq.__file__).parent
SHARED = ("_exceptions", "_headers", "_hooks", "_logs", "_version")
LAYERS = ("shared", "_wire", "_link", "_publish", "_consume", "surface")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "surface"
    head = parts[1]
    if head in SHARED:
        return "shared"
    return head if head in LAYERS else "surface"


def imports(module: str, path: Path, known: set[str]) -> Iterator[tuple[str, int]]:
    """Every module of the package that `module` imports, at any depth of its code."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "aio_workq":
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "aio_workq":
                continue
            for alias in node.names:  # `from . import x` names a module
                sub = f"{target}.{alias.name}"
                if sub in known:
                    yield sub, node.lineno
                    break
            else:
                yield target, node.lineno


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    edges: dict[str, set[str]] = {}
    for module, path in found.items():
        edges[module] = {t for t, _ in imports(module, path, known) if t in known and t != module}
    return edges


def test_lower_layers_never_import_higher_ones() -> None:
    found = modules()
    known = set(found)
    upward = []
    for module, path in found.items():
        for target, line in imports(module, path, known):
            if target in known and LAYERS.index(layer(target)) > LAYERS.index(layer(module)):
                rel = path.relative_to(PACKAGE.parent)
                upward.append(f"{rel}:{line}: {layer(module)} imports {target} ({layer(target)})")
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_no_module_imports_itself_back() -> None:
    edges = graph()
    # Tarjan's strongly connected components; a component of more than one module is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    # A package's __init__ importing its own modules is not a circle unless they import it back.
    assert not circles, "modules in a circle of imports:\n" + "\n".join(map(str, circles))


def test_every_layer_package_is_listed() -> None:
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    private = {name for name in packages if name.startswith("_")}
    assert private <= set(LAYERS), f"a private package outside the layer table: {private}"
