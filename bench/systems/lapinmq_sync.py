"""lapinmq's synchronous Publisher (pika `BlockingConnection`, confirms on).

`SyncPublisher.send_message` hands the publish to its publishing thread, which runs the calls in
order; each `basic_publish` blocks until its confirm. So after n sends, one more callback queued
on the same connection runs once all n are confirmed: that is when the clock stops. Everything
else is as in `lapinmq`; only the publish workload differs, so the others are not repeated.
"""

from __future__ import annotations

import threading

from bench.systems._common import main, payload
from bench.systems.lapinmq import Lapinmq

SAME_AS_LAPINMQ = "same threaded Consumer as lapinmq (only the publisher differs)"


class LapinmqSync(Lapinmq):
    name = "lapinmq_sync"
    publisher_kind = "sync"
    not_applicable = dict.fromkeys(("consume", "chain", "latency", "rss"), SAME_AS_LAPINMQ)

    def publish_sync(self, n: int) -> None:
        assert self._publisher is not None
        send, queue, body = self._publisher.send_message_to_queue, self.settings.queue, payload()
        for _ in range(n):
            send(queue, body)
        all_confirmed = threading.Event()
        self._publisher.publisher.connection.add_callback_threadsafe(all_confirmed.set)
        all_confirmed.wait()


if __name__ == "__main__":
    main(LapinmqSync)
