"""aio-workq: asyncio work queues on RabbitMQ that lose nothing."""

from __future__ import annotations

from ._consume.execution import Handler as Handler
from ._consume.job import Job as Job
from ._consume.job import JobData as JobData
from ._consume.presence import PresenceWatcher as PresenceWatcher
from ._consume.presence import WorkerBeat as WorkerBeat
from ._consume.presence import WorkerPresence as WorkerPresence
from ._consume.retry import RetryPolicy as RetryPolicy
from ._consume.runner import run_workers as run_workers
from ._consume.worker import Worker as Worker
from ._consume.worker import WorkerState as WorkerState
from ._exceptions import AccessRefusedError as AccessRefusedError
from ._exceptions import AuthenticationError as AuthenticationError
from ._exceptions import BrokerConnectionError as BrokerConnectionError
from ._exceptions import BrokerUnavailableError as BrokerUnavailableError
from ._exceptions import ConfigurationError as ConfigurationError
from ._exceptions import ConnectionLostError as ConnectionLostError
from ._exceptions import Defer as Defer
from ._exceptions import IntegrationError as IntegrationError
from ._exceptions import MessageTooLargeError as MessageTooLargeError
from ._exceptions import PayloadError as PayloadError
from ._exceptions import PublishError as PublishError
from ._exceptions import PublishNackedError as PublishNackedError
from ._exceptions import PublishTimeoutError as PublishTimeoutError
from ._exceptions import Reject as Reject
from ._exceptions import Retry as Retry
from ._exceptions import RPCError as RPCError
from ._exceptions import RPCTimeoutError as RPCTimeoutError
from ._exceptions import SerializationError as SerializationError
from ._exceptions import TLSError as TLSError
from ._exceptions import TopologyError as TopologyError
from ._exceptions import UnroutableError as UnroutableError
from ._exceptions import WorkqError as WorkqError
from ._hooks import HandleInfo as HandleInfo
from ._hooks import Hook as Hook
from ._hooks import JobView as JobView
from ._hooks import Outcome as Outcome
from ._hooks import PublishInfo as PublishInfo
from ._link.connection import Backoff as Backoff
from ._link.connection import Connection as Connection
from ._link.connection import connect as connect
from ._link.settings import redact_url as redact_url
from ._link.settings import resolve_url as resolve_url
from ._link.settings import resolve_urls as resolve_urls
from ._link.specs import Exchange as Exchange
from ._link.specs import ExchangeType as ExchangeType
from ._link.specs import Queue as Queue
from ._link.specs import QueueType as QueueType
from ._logs import MessageFields as MessageFields
from ._publish.dead_letters import DeadLetter as DeadLetter
from ._publish.dead_letters import DeadLetters as DeadLetters
from ._publish.message import PublishOptions as PublishOptions
from ._publish.producer import Producer as Producer
from ._version import __version__ as __version__

__all__ = [
    "__version__",
    "AccessRefusedError",
    "AuthenticationError",
    "Backoff",
    "BrokerConnectionError",
    "BrokerUnavailableError",
    "ConfigurationError",
    "connect",
    "Connection",
    "ConnectionLostError",
    "DeadLetter",
    "DeadLetters",
    "Defer",
    "Exchange",
    "ExchangeType",
    "HandleInfo",
    "Handler",
    "Hook",
    "IntegrationError",
    "Job",
    "JobData",
    "JobView",
    "MessageFields",
    "MessageTooLargeError",
    "Outcome",
    "PayloadError",
    "PresenceWatcher",
    "Producer",
    "PublishError",
    "PublishInfo",
    "PublishNackedError",
    "PublishOptions",
    "PublishTimeoutError",
    "Queue",
    "QueueType",
    "redact_url",
    "Reject",
    "resolve_url",
    "resolve_urls",
    "Retry",
    "RetryPolicy",
    "RPCError",
    "RPCTimeoutError",
    "run_workers",
    "SerializationError",
    "TLSError",
    "TopologyError",
    "UnroutableError",
    "Worker",
    "WorkerBeat",
    "WorkerPresence",
    "WorkerState",
    "WorkqError",
]
