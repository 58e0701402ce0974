"""Where the broker URL comes from, and how it is shown without its password."""

from __future__ import annotations

import os
from collections.abc import Mapping
from urllib.parse import quote, urlsplit, urlunsplit

from ._exceptions import ConfigurationError

__all__ = ("DEFAULT_URL", "redact_url", "resolve_url")

DEFAULT_URL = "amqp://guest:guest@localhost/"


def resolve_url(url: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The broker URL: `url`, else `AMQP_URL`, else lapinmq's `RABBITMQ_*` variables, else local.

    `RABBITMQ_HOST`, `RABBITMQ_PORT` (5672), `RABBITMQ_USERNAME`, `RABBITMQ_PASSWORD` and
    `RABBITMQ_VHOST` (`/`) are used when `RABBITMQ_HOST` is set.

    Raises:
        ConfigurationError: the URL is not an `amqp://` or `amqps://` URL with a host.
    """
    env = os.environ if environ is None else environ
    if url is None:
        url = env.get("AMQP_URL") or _url_from_parts(env) or DEFAULT_URL
    _validate(url)
    return url


def _url_from_parts(env: Mapping[str, str]) -> str | None:
    host = env.get("RABBITMQ_HOST")
    if not host:
        return None
    port = env.get("RABBITMQ_PORT", "5672")
    if not port.isdigit():
        raise ConfigurationError(f"RABBITMQ_PORT must be a port number, got {port!r}")
    user = quote(env.get("RABBITMQ_USERNAME", "guest"), safe="")
    password = quote(env.get("RABBITMQ_PASSWORD", "guest"), safe="")
    vhost = quote(env.get("RABBITMQ_VHOST", "/"), safe="")
    return f"amqp://{user}:{password}@{host}:{port}/{vhost}"


def _validate(url: str) -> None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(
            f"invalid broker URL {redact_url(url)!r}: {exc}; expected amqp://user:pass@host:5672/vhost"
        ) from None
    if parts.scheme not in ("amqp", "amqps"):
        raise ConfigurationError(
            f"invalid broker URL {redact_url(url)!r}: scheme must be amqp:// or amqps://"
        )
    if not parts.hostname:
        raise ConfigurationError(f"invalid broker URL {redact_url(url)!r}: it names no host")
    if port == 0:
        raise ConfigurationError(f"invalid broker URL {redact_url(url)!r}: port 0")


def redact_url(url: str) -> str:
    """`url` with its password replaced by `***`, safe for logs, reprs and error messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
    except ValueError:
        return "<unparseable URL>"
