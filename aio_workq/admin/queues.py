"""Queue depths, for `aio-workq queues` and the dashboard: from the management HTTP API, else
passive declares.

Queues are grouped by work queue: `X` with its dead-letter queue `X.dlq` and its delay queues
`X.retry.<ms>ms`. The management API gives every queue of the vhost, unacked counts and rates;
without it, only the queues named are looked at (passive declares: ready messages and
consumers), with the delay queues of the default `RetryPolicy` and of `Retry(delay=...)`, and
those of the delays given (`--retry-delays`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import aio_pika
import aio_pika.exceptions
import aiormq.exceptions

from aio_workq import BrokerConnectionError, RetryPolicy, redact_url
from aio_workq._link.delay import PREFIX as DELAY_PREFIX
from aio_workq._link.errors import connect_error
from aio_workq.schedules import GROUP as SCHEDULER_GROUP

from ._errors import AdminError, ManagementAPIError

__all__ = (
    "OWN_KINDS",
    "QueueRow",
    "RawQueue",
    "amqp_raws",
    "connect",
    "management_raws",
    "vhost_of",
    "collect",
    "default_management_url",
    "delete_queues",
    "group_rows",
    "is_internal",
    "queue_group",
)

_CONNECT_TIMEOUT = 10.0
"""Seconds a connection to look at queues waits for the broker's answer."""

_RETRY = re.compile(r"^(?P<base>.+)\.retry\.(?P<ms>\d+)ms$")
_DLQ = re.compile(r"^(?P<base>.+)\.dlq$")
_LADDER = f"{DELAY_PREFIX}."
OWN_KINDS = {
    _LADDER: "delay-ladder",
    f"{SCHEDULER_GROUP}.": "scheduler",
    "amq.": "server-named",
}
"""Queues that are not work queues, by name prefix, each family one row of its kind (with
`all_queues`): the shared delay ladder, the default scheduler group's lease, state and status
queues, and the broker-named exclusive queues of one connection each (every task worker's
cancel listener, the presence watchers, subscribers)."""


@dataclass(slots=True)
class QueueRow:
    """One work queue with its retry and dead-letter queues (`None`: not known).

    `present` is false for a work queue that is gone while its internal queues remain;
    `kind` is `"work"`, `"delay-ladder"` for the shared `workq.delay.*` queues (one row),
    `"scheduler"` for the schedulers' `workq.scheduler.*` queues (one row), `"server-named"`
    for the broker-named `amq.*` queues (one row, as the dashboard hides them), or `"missing"` for
    a queue named (the dashboard's `--queue`) that does not exist.
    """

    queue: str
    ready: int | None = None
    unacked: int | None = None
    consumers: int | None = None
    publish_rate: float | None = None
    deliver_rate: float | None = None
    ack_rate: float | None = None
    retry: int = 0
    dead_letters: int | None = None
    retry_queues: dict[str, int] = field(default_factory=dict)
    present: bool = True
    kind: str = "work"

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class RawQueue:
    """One queue as the broker reports it (`None`: not known by that source)."""

    name: str
    ready: int | None
    unacked: int | None
    consumers: int | None
    publish_rate: float | None = None
    deliver_rate: float | None = None
    ack_rate: float | None = None


def default_management_url(amqp_url: str) -> str:
    """The management API next to the broker: same host and credentials, port 15672."""
    parts = urlsplit(amqp_url)
    scheme, port = ("https", 15671) if parts.scheme == "amqps" else ("http", 15672)
    userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    host = parts.hostname or "localhost"
    host = f"[{host}]" if ":" in host else host
    return urlunsplit((scheme, f"{userinfo}{host}:{port}", "/", "", ""))


def is_internal(name: str) -> bool:
    """True for a dead-letter, retry, delay-ladder, scheduler or server-named queue."""
    return bool(_RETRY.match(name) or _DLQ.match(name) or _own_kind(name))


def _own_kind(name: str) -> str | None:
    return next((kind for prefix, kind in OWN_KINDS.items() if name.startswith(prefix)), None)


def group_rows(
    raws: Iterable[RawQueue], names: Sequence[str] = (), *, all_queues: bool = False
) -> list[QueueRow]:
    """Fold `X.dlq` and `X.retry.*ms` into the row of `X` (a row of its own when `X` is gone);
    aio-workq's own queues (`OWN_KINDS`: the delay ladder's `workq.delay.*`, the schedulers'
    `workq.scheduler.*`) are a row per family with `all_queues`, else left out. Keep only
    `names` when given."""
    raws = list(raws)
    present = {raw.name for raw in raws}
    rows: dict[str, QueueRow] = {}
    own: dict[str, list[RawQueue]] = {}

    def row(name: str) -> QueueRow:
        return rows.setdefault(name, QueueRow(queue=name, present=name in present))

    for raw in sorted(raws, key=lambda r: r.name):
        retry, dlq = _RETRY.match(raw.name), _DLQ.match(raw.name)
        if kind := _own_kind(raw.name):
            own.setdefault(kind, []).append(raw)
        elif retry:
            target = row(retry["base"])
            target.retry_queues[raw.name] = (raw.ready or 0) + (raw.unacked or 0)
            target.retry += target.retry_queues[raw.name]
        elif dlq:
            row(dlq["base"]).dead_letters = (raw.ready or 0) + (raw.unacked or 0)
        else:
            target = row(raw.name)
            target.ready, target.unacked, target.consumers = raw.ready, raw.unacked, raw.consumers
            target.publish_rate, target.deliver_rate = raw.publish_rate, raw.deliver_rate
            target.ack_rate = raw.ack_rate
    if names:
        return [rows[name] for name in names if name in rows]
    result = sorted(rows.values(), key=lambda r: r.queue)
    if all_queues:
        for prefix, kind in OWN_KINDS.items():
            if family := own.get(kind):
                result.append(
                    QueueRow(
                        queue=f"{prefix}* ({len(family)} queues)",
                        ready=sum(raw.ready or 0 for raw in family),
                        unacked=sum(raw.unacked or 0 for raw in family)
                        if all(raw.unacked is not None for raw in family) else None,
                        consumers=sum(raw.consumers or 0 for raw in family),
                        kind=kind,
                    )
                )  # fmt: skip
    return result


async def collect(
    amqp_url: str,
    names: Sequence[str],
    management_url: str | None,
    *,
    explicit: bool,
    all_queues: bool = False,
) -> tuple[list[QueueRow], str]:
    """The rows, and where they came from (the management API or passive declares).

    Raises:
        ManagementAPIError: the management API was asked for explicitly and did not answer.
        AdminError: no management API and no queue names, or a named queue does not exist.
        BrokerConnectionError: the broker cannot be reached.
    """
    mgmt = management_url or default_management_url(amqp_url)
    try:
        raws = await asyncio.to_thread(management_raws, mgmt, vhost_of(amqp_url))
        missing = sorted(set(names) - {raw.name for raw in raws})
        if missing:
            raise AdminError(f"queue {missing[0]!r} does not exist")
        source = "the management API"
        if management_url:  # given: say which, the table's title names the AMQP URL
            source += f" at {redact_url(management_url)}"
        return group_rows(raws, names, all_queues=all_queues), source
    except ManagementAPIError as exc:
        if not explicit and not names:
            # Is the broker itself down? Then that is the error to see, not the API's.
            connection = await connect(amqp_url)
            await connection.close()
        if explicit or not names:
            hint = (
                ""
                if explicit
                else "; name the queues to look at them over AMQP: aio-workq queues QUEUE..., "
                "or give --management-url"
            )
            raise ManagementAPIError(f"{exc}{hint}") from exc
    rows = group_rows(await amqp_raws(amqp_url, names), names, all_queues=all_queues)
    return rows, "passive declares"


async def queue_group(
    amqp_url: str,
    name: str,
    management_url: str | None,
    *,
    explicit: bool,
    retry_delays_ms: Sequence[int] = (),
) -> tuple[list[tuple[str, int]], tuple[int, ...] | None]:
    """`name` with its dead-letter and retry queues that exist, and the messages in each;
    and the retry delays (ms) looked for, or None when every queue was listed.

    From the management API (every `name.retry.*ms`), else passive declares (the delay
    queues of the default `RetryPolicy`, of `Retry(delay=...)` and of `retry_delays_ms`).

    Raises:
        AdminError: `name` is an internal queue, or neither it nor its internal queues exist.
        ManagementAPIError: the management API was asked for explicitly and did not answer.
        BrokerConnectionError: the broker cannot be reached.
    """
    base = (m := _RETRY.match(name) or _DLQ.match(name)) and m["base"]
    mgmt = management_url or default_management_url(amqp_url)
    looked_for: tuple[int, ...] | None = None
    try:
        raws = await asyncio.to_thread(management_raws, mgmt, vhost_of(amqp_url))
    except ManagementAPIError:
        if explicit:
            raise
        looked_for = _delays_ms(retry_delays_ms)
        names = [name, *([base] if base else [])]
        raws = await amqp_raws(amqp_url, names, require=False, delays_ms=looked_for)
    if name.startswith(_LADDER) or (base and base in {raw.name for raw in raws}):
        raise AdminError(
            f"{name!r} is a dead-letter, retry or delay queue; name its work queue instead"
        )
    group = [
        (raw.name, (raw.ready or 0) + (raw.unacked or 0))
        for raw in raws
        if raw.name == name
        or raw.name == f"{name}.dlq"
        or ((m := _RETRY.match(raw.name)) is not None and m["base"] == name)
    ]
    if not group:
        raise AdminError(f"queue {name!r} does not exist, nor its .dlq or .retry queues")
    return sorted(group, key=lambda item: (item[0] != name, _delay_of(item[0]))), looked_for


def _delays_ms(extra: Iterable[int] = ()) -> tuple[int, ...]:
    """The retry delays (ms) looked for by name: those of the default `RetryPolicy` and of
    `Retry(delay=...)`, and `extra` (another policy's)."""
    return tuple(sorted({*RetryPolicy().queues_ms(), *extra}))


def _delay_of(name: str) -> int:
    """A retry queue's delay (ms), to list them in order; -1 for the others."""
    match = _RETRY.match(name)
    return int(match["ms"]) if match else -1


async def delete_queues(amqp_url: str, names: Sequence[str]) -> list[tuple[str, int]]:
    """Delete these queues (messages and all); each with the messages it held.

    Raises:
        BrokerConnectionError: the broker cannot be reached.
    """
    connection = await connect(amqp_url)
    deleted: list[tuple[str, int]] = []
    async with connection:
        channel = await connection.channel()
        for name in names:
            try:
                ok = await channel.queue_delete(name)
            except aio_pika.exceptions.ChannelClosed:  # gone meanwhile
                channel = await connection.channel()
                continue
            deleted.append((name, int(getattr(ok, "message_count", 0) or 0)))
    return deleted


async def connect(
    amqp_url: str, *, timeout: float = _CONNECT_TIMEOUT
) -> aio_pika.abc.AbstractConnection:
    """A plain aio-pika connection for looking at queues (`timeout`: seconds for the attempt).

    Raises:
        BrokerConnectionError: the broker cannot be reached (the URL shown without password);
            `AuthenticationError`, `AccessRefusedError` or `TLSError` when it refused, with
            what to fix (the translation every connection of aio-workq uses).
    """
    try:
        return await aio_pika.connect(amqp_url, timeout=timeout)
    except TimeoutError:  # as aio-workq's own connections say it
        raise BrokerConnectionError(
            f"cannot connect to {redact_url(amqp_url)}: no answer within {timeout:g} s; "
            "check the host and port, and that RabbitMQ is running (make broker-start starts a "
            "local one)"
        ) from None
    except (OSError, aiormq.exceptions.AMQPError) as exc:
        raise connect_error(exc, amqp_url) from None


def vhost_of(amqp_url: str) -> str:
    path = urlsplit(amqp_url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def management_raws(mgmt_url: str, vhost: str) -> list[RawQueue]:
    parts = urlsplit(mgmt_url)
    user, password = unquote(parts.username or "guest"), unquote(parts.password or "guest")
    host = parts.hostname or "localhost"
    host = f"[{host}]" if ":" in host else host
    netloc = f"{host}:{parts.port}" if parts.port else host
    base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    columns = ",".join(
        ("name", "messages_ready", "messages_unacknowledged", "consumers",
         "message_stats.publish_details.rate", "message_stats.deliver_get_details.rate",
         "message_stats.ack_details.rate")
    )  # fmt: skip
    url = f"{base}/api/queues/{quote(vhost, safe='')}?columns={columns}"
    request = urllib.request.Request(url)
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    shown = redact_url(mgmt_url)
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            payload = json.load(response)
    except urllib.error.HTTPError as exc:
        raise ManagementAPIError(
            f"the management API at {shown} answered {exc.code} {exc.reason}"
        ) from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ManagementAPIError(
            f"the management API at {shown} is not reachable ({reason})"
        ) from None
    if not isinstance(payload, list):
        raise ManagementAPIError(f"the management API at {shown} sent no queue list")
    return [_raw_from_api(item) for item in payload if isinstance(item, dict)]


def _raw_from_api(item: dict[str, Any]) -> RawQueue:
    stats = item.get("message_stats") or {}

    def rate(key: str) -> float:
        detail = stats.get(key) or {}
        return float(detail.get("rate", 0.0))

    return RawQueue(
        name=str(item.get("name", "")),
        ready=int(item.get("messages_ready") or 0),
        unacked=int(item.get("messages_unacknowledged") or 0),
        consumers=int(item.get("consumers") or 0),
        publish_rate=rate("publish_details"),
        deliver_rate=rate("deliver_get_details"),
        ack_rate=rate("ack_details"),
    )


async def amqp_raws(
    amqp_url: str,
    names: Sequence[str],
    *,
    require: bool = True,
    connection: aio_pika.abc.AbstractConnection | None = None,
    delays_ms: Sequence[int] | None = None,
) -> list[RawQueue]:
    """Each of `names` with its `.dlq` and its retry queues (those of `delays_ms`, by default
    of the default `RetryPolicy` and of `Retry(delay=...)`), by passive declares: ready messages
    and consumers of those that exist (unacked: not known).

    Args:
        amqp_url: the broker, connected to for this call unless `connection` is given.
        names: the work queues.
        require: a work queue that does not exist is an error (else left out).
        connection: an open connection to use (left open).
        delays_ms: the retry delays to look for.

    Raises:
        AdminError: `require`, and a work queue does not exist.
        BrokerConnectionError: the broker cannot be reached.
    """
    delays = _delays_ms() if delays_ms is None else delays_ms
    wanted = [
        name
        for base in names
        for name in (base, f"{base}.dlq", *(f"{base}.retry.{ms}ms" for ms in delays))
    ]
    if connection is not None:
        return await _declare_each(connection, wanted, names, require=require)
    async with await connect(amqp_url) as own:
        return await _declare_each(own, wanted, names, require=require)


async def _declare_each(
    connection: aio_pika.abc.AbstractConnection,
    wanted: Sequence[str],
    names: Sequence[str],
    *,
    require: bool,
) -> list[RawQueue]:
    raws: list[RawQueue] = []
    channel = await connection.channel()
    try:
        for name in wanted:
            try:
                queue = await channel.declare_queue(name, passive=True)
            except aio_pika.exceptions.ChannelClosed:  # 404: no such queue
                if require and name in names:
                    raise AdminError(f"queue {name!r} does not exist") from None
                channel = await connection.channel()
                continue
            ok = queue.declaration_result
            ready, consumers = int(ok.message_count or 0), int(ok.consumer_count or 0)
            raws.append(RawQueue(name, ready, None, consumers))
    finally:
        if not channel.is_closed:
            await channel.close()
    return raws
