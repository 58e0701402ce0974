"""The `aio-workq` command line: workers, publishing, queues, dead letters, a local broker.

It needs the `cli` extra (`pip install 'aio-workq[cli]'`: Click and Rich); the library itself
never imports this package.
"""

from __future__ import annotations

import sys

__all__ = ("main",)

INSTALL_HINT = (
    "aio-workq: the command line needs the cli extra (Click and Rich): pip install 'aio-workq[cli]'"
)


def main(argv: list[str] | None = None) -> None:
    """Run the `aio-workq` command; without the `cli` extra, say how to install it (exit 1)."""
    try:
        import click  # noqa: F401
        import rich  # noqa: F401
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)  # noqa: T201
        raise SystemExit(1) from None
    from ._app import run

    run(argv)
