"""Load a module of `aio_workq/testing` also where the package's dependencies are missing.

The local servers' modules there (`_node`, `_rabbitmq`, `_broker`) are standard library only, so
that `python3 -m scripts.broker` (and `scripts.cluster`, `scripts.postgres`) run without the
venv: when `import aio_workq` fails, the folder is loaded as a bare package of its own, without
`aio_workq/__init__.py`, and its modules import each other as usual.

`nodekit` is `aio_workq/testing/_node.py` loaded so: the node-level helpers (processes, ports,
cookies, state files) that the scripts' servers share with `LocalBroker`.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING

__all__ = ("load_testing_module", "nodekit")

_STANDALONE = "_aio_workq_testing"  # the bare package's name in sys.modules


def load_testing_module(name: str) -> types.ModuleType:
    """`aio_workq.testing.<name>`, or the same file loaded without the package."""
    try:
        return importlib.import_module(f"aio_workq.testing.{name}")
    except ImportError:  # no venv: load the stdlib-only file without the package
        if _STANDALONE not in sys.modules:
            package = types.ModuleType(_STANDALONE)
            package.__path__ = [
                str(Path(__file__).resolve().parent.parent / "aio_workq" / "testing")
            ]
            sys.modules[_STANDALONE] = package
        return importlib.import_module(f"{_STANDALONE}.{name}")


if TYPE_CHECKING:
    from aio_workq.testing import _node as nodekit
else:
    nodekit = load_testing_module("_node")
