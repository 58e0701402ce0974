"""What a worker consumes and how, and the parts `Worker.start()` builds from it on a source."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .._hooks import Hooks
from .._link.connection import LinkSource
from .._link.router import Router
from .._link.specs import Exchange, Queue, QueueType
from .._publish.confirms import ConfirmPublisher
from .._publish.message import Sender
from .._wire.window import Window
from .dispatch import Dispatcher
from .execution import HandlerRunner
from .mover import Mover
from .retry import RetryPolicy
from .subscription import Subscription, worker_label

__all__ = ("ConsumePlan",)

_PUBLISH_TIMEOUT = 30.0  # seconds for the confirm of a retry, dead letter or forward


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsumePlan:
    """A worker's consume settings, checked: the queue, its bindings, the flow and retries."""

    queue: Queue
    concurrency: int
    prefetch: int
    retry: RetryPolicy | None
    max_defers: int | None
    exchange: str | Exchange | None
    binding_keys: tuple[str, ...]
    binding_arguments: Mapping[str, Any]
    connect_timeout: float

    def publisher(self, source: LinkSource) -> ConfirmPublisher:
        """The publisher of the retries, dead letters and forwards (not started)."""
        return ConfirmPublisher(
            source,
            window=Window(max(1000, 4 * self.prefetch)),
            timeout=_PUBLISH_TIMEOUT,
            resend=False,  # the upstream delivery is redelivered instead
            what=f"worker {worker_label(self.queue, self.exchange)} publisher",
        )

    def consumer(
        self,
        source: LinkSource,
        publisher: ConfirmPublisher,
        runner: HandlerRunner,
        hooks: Hooks | None,
    ) -> tuple[Dispatcher, Subscription]:
        """The dispatcher and the subscription that feeds it (not started), on `publisher`
        (started)."""
        queue, retry = self.queue, self.retry
        router = Router(source, QueueType(queue.type))
        mover = Mover(publisher, router, queue)
        dispatcher = Dispatcher(
            runner=runner,
            policy=retry,
            queue=queue,
            publisher=publisher,
            mover=mover,
            forwarder=Sender((publisher,), router, _PUBLISH_TIMEOUT, hooks),
            concurrency=self.concurrency,
            prefetch=self.prefetch,
            hooks=hooks,
            max_defers=self.max_defers,
        )
        delays = retry.levels_ms() if retry is not None and not queue.server_named else ()
        mover.declared(delays)
        subscription = Subscription(
            source,
            router,
            queue=queue,
            delays_ms=delays,
            exchange=self.exchange,
            binding_keys=self.binding_keys,
            binding_arguments=self.binding_arguments,
            prefetch=self.prefetch,
            on_delivery=dispatcher.dispatch,
            on_fields=dispatcher.take,
            on_declared=dispatcher.declared,
        )
        return dispatcher, subscription
