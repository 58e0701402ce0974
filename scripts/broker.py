"""The local RabbitMQ node for tests, demos and benchmarks: `aio_workq/testing/_broker.py`.

It ships inside the package (users' tests get it through `aio_workq.testing`); this module
keeps the repository's entry points working, also without the venv (`python3 -m scripts.broker`
in the Makefile): the broker module is standard library only, so it is loaded from its file
when the package's dependencies are not installed.

CLI::

    python -m scripts.broker start --dir .broker/dev [--port N] [--management]
    python -m scripts.broker status --dir .broker/dev
    python -m scripts.broker stop --dir .broker/dev
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aio_workq.testing._broker import (
        BrokerError,
        LocalBroker,
        amqp_answers,
        ensure_installed,
        free_port,
        main,
    )
else:
    try:
        from aio_workq.testing._broker import (
            BrokerError,
            LocalBroker,
            amqp_answers,
            ensure_installed,
            free_port,
            main,
        )
    except ImportError:  # no venv: load the stdlib-only file without the package
        import importlib.util
        from pathlib import Path

        _path = Path(__file__).resolve().parent.parent / "aio_workq" / "testing" / "_broker.py"
        _spec = importlib.util.spec_from_file_location("aio_workq_testing_broker", _path)
        assert _spec is not None and _spec.loader is not None
        _module = importlib.util.module_from_spec(_spec)
        sys.modules[_spec.name] = _module  # dataclasses look their module up
        _spec.loader.exec_module(_module)
        BrokerError = _module.BrokerError
        LocalBroker = _module.LocalBroker
        amqp_answers = _module.amqp_answers
        ensure_installed = _module.ensure_installed
        free_port = _module.free_port
        main = _module.main

__all__ = ("BrokerError", "LocalBroker", "amqp_answers", "ensure_installed", "free_port", "main")

if __name__ == "__main__":
    sys.exit(main())
