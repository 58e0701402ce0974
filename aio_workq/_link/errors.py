"""Translating aiormq's errors into aio-workq's error tree, with the password hidden.

`connect_error` says why a connection attempt failed (refused credentials, a missing vhost, a TLS
handshake, or what the socket said), guessing where TLS hides its reason; `translate_errors` maps
what aiormq raises on an open connection (declarations, channels) to `TopologyError` and
`BrokerConnectionError`.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import unquote, urlsplit

import aiormq
import aiormq.connection

from .._exceptions import (
    AccessRefusedError,
    AuthenticationError,
    BrokerConnectionError,
    TLSError,
    TopologyError,
)
from .._wire.seams import refusing_close_text
from .settings import redact_url

__all__ = ("closing_reason", "connect_error", "reason", "translate_errors")


def closing_reason(closing: asyncio.Future[Any]) -> str:
    """Why an aiormq connection whose `closing` future is done closed, in a few words."""
    if closing.cancelled():
        return "closed"
    exc = closing.exception()
    return reason(exc) if exc is not None else "closed by the broker"


_REPLY_TEXT = re.compile(r"reply_text='([^']*)'")


def connect_error(exc: BaseException, url: str) -> BrokerConnectionError:
    """The typed error for a failed connection attempt to `url` (password hidden)."""
    target = redact_url(url)
    if isinstance(exc, aiormq.exceptions.AuthenticationError | aiormq.ProbableAuthenticationError):
        return AuthenticationError(
            f"connecting to {target}: the broker refused the user name or password "
            f"({reason(exc)}); check the credentials in the URL or "
            "RABBITMQ_USERNAME/RABBITMQ_PASSWORD"
        )
    text = str(exc)
    if isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in text:
        match = _REPLY_TEXT.search(text)
        why = match.group(1) if match else _refusal(exc, url)
        return AccessRefusedError(
            f"connecting to {target}: the broker refused the virtual host ({why}); create "
            "it (rabbitmqctl add_vhost) and grant the user access (rabbitmqctl set_permissions), "
            "or fix the vhost in the URL"
        )
    causes = list(_chain(exc))
    for cause in causes:
        if isinstance(cause, ssl.SSLError):
            detail = cause.reason or str(cause)
            verify = getattr(cause, "verify_message", None)
            if verify:
                detail = f"{detail}: {verify}"
            return TLSError(
                f"connecting to {target}: the TLS handshake failed ({detail}); "
                "check the CA in ssl_context, the host name in the URL against the server "
                "certificate, and the client certificate if the broker asks for one"
            )
    if url.lower().startswith("amqps:") and any(
        isinstance(c, ConnectionResetError) for c in causes
    ):
        # TLS 1.3: a broker that refuses the client's certificate (or its absence) may reset
        # the connection before its alert is read; say where to look.
        return BrokerConnectionError(
            f"cannot connect to {target}: {reason(exc)}; the broker closed the TLS "
            "connection: if it asks for a client certificate, load one into ssl_context "
            "(load_cert_chain)"
        )
    return BrokerConnectionError(f"cannot connect to {target}: {reason(exc)}")


def _refusal(exc: BaseException, url: str) -> str:
    """The broker's reply text of the Connection.Close that refused the vhost.

    aiormq's error shows only the frame's repr; the frame is read from the traceback
    (`_wire.seams.refusing_close_text`, reliance 8). Without it, the reason is told from the URL.
    """
    text = refusing_close_text(exc)
    if text is not None:
        return text
    vhost = unquote(urlsplit(url).path[1:]) or "/"
    return f"vhost {vhost!r} does not exist, or the user may not use it"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and its causes and contexts, each once (chains can loop)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        yield cause
        cause = cause.__cause__ or cause.__context__


@contextmanager
def translate_errors(doing: str) -> Iterator[None]:
    """Map aiormq errors raised while `doing` to aio-workq's error tree."""
    try:
        yield
    except aiormq.exceptions.ChannelAccessRefused as exc:
        raise TopologyError(f"{doing}: access refused: {reason(exc)}") from exc
    except (
        aiormq.exceptions.ChannelPreconditionFailed,
        aiormq.exceptions.ChannelNotFoundEntity,
    ) as exc:
        raise TopologyError(f"{doing}: {reason(exc)}") from exc
    except (
        aiormq.exceptions.AMQPError,
        aiormq.exceptions.ChannelInvalidStateError,
        ConnectionError,
        OSError,
    ) as exc:
        raise BrokerConnectionError(f"{doing}: {reason(exc)}") from exc


_CLOSE_CODES: dict[type[BaseException], int] = {
    cls: code for code, cls in aiormq.connection.EXCEPTION_MAPPING.items()
}
"""aiormq raises a broker's Connection.Close with a mapped reply code (541 INTERNAL_ERROR, 504
CHANNEL_ERROR, ...) as `ConnectionInternalError(reply_text)` etc., without the code (reliance 12
in `_wire/seams.py`); the others as `ConnectionClosed(code, text)`."""


def reason(exc: BaseException) -> str:
    """A short, password-free description of an aiormq/OS error."""
    cause = exc.__cause__
    if isinstance(cause, OSError) and cause.strerror:  # aiormq re-raises OSError's args
        return cause.strerror
    if isinstance(exc, aiormq.exceptions.AMQPError) and exc.args:
        first = exc.args[0]
        if isinstance(first, int) and len(exc.args) > 1:  # a Close: (reply code, reply text)
            return f"{first} {exc.args[1]}"
        text = str(getattr(first, "reply_text", None) or first)
        code = _CLOSE_CODES.get(type(exc))  # a Close aiormq raises as a class of its own
        return f"{code} {text}" if code is not None else text
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
