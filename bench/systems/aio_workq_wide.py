"""aio-workq in one process with the settings of two (#22): what one process reaches.

As `aio_workq`, with two settings changed: the producer publishes over two channels
(`Producer(channels=2)`: the broker runs each channel as one process, which bounds one
channel's rate on a quorum queue), and the worker runs twice the bench's concurrency and
prefetch (200 unacknowledged: what `aio_workq.x2`, two processes of 100 each, hold; a quorum
queue's consume rate follows the window, each ack being a Raft command). Its rate over the
ceiling is the share one process reaches when set for throughput; `aio_workq`'s is the
share with the bench's settings, equal for every system.
"""

from __future__ import annotations

from bench.systems._common import main
from bench.systems.aio_workq import AioWorkq


class AioWorkqWide(AioWorkq):
    name = "aio_workq_wide"
    channels = 2
    widen = 2


if __name__ == "__main__":
    main(AioWorkqWide)
