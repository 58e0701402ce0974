"""`python -m aio_workq.testing.broker start|status|stop --dir DIR`: a local RabbitMQ node."""

from __future__ import annotations

import sys

from ._broker import main

if __name__ == "__main__":
    sys.exit(main())
