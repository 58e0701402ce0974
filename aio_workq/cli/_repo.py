"""The parts of a clone that the `broker` and `demo` commands use (not in the wheel)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import aio_workq

from ._errors import CliError

__all__ = ("load_demo", "load_broker_script")

_NEEDS_CLONE = (
    "needs a clone of the aio-workq repository ({path} is missing): git clone it and "
    "`pip install -e '.[cli]'` there, or run RabbitMQ yourself (compose.yaml) and set AMQP_URL"
)


def _repo_root() -> Path:
    return Path(aio_workq.__file__).resolve().parents[1]


def load_broker_script() -> ModuleType:
    """`scripts.broker` of the clone this package was installed from.

    Raises:
        CliError: not installed from a clone.
    """
    root = _repo_root()
    if not (root / "scripts" / "broker.py").is_file():
        raise CliError("aio-workq broker " + _NEEDS_CLONE.format(path="scripts/broker.py"))
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import scripts.broker

    return scripts.broker


def load_demo() -> ModuleType:
    """`examples/demo.py` of the clone, as a module (its `main()` runs the demo).

    Raises:
        CliError: not installed from a clone.
    """
    path = _repo_root() / "examples" / "demo.py"
    if not path.is_file():
        raise CliError("aio-workq demo " + _NEEDS_CLONE.format(path="examples/demo.py"))
    load_broker_script()  # the demo starts a node with it when AMQP_URL is not set
    spec = importlib.util.spec_from_file_location("aio_workq_demo", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
