"""`python -m aio_workq`: the `aio-workq` command line (needs the `cli` extra)."""

from __future__ import annotations

from aio_workq.cli import main

if __name__ == "__main__":
    main()
