"""Settings every entry point shares: where the broker URLs come from, how they are shown
without their passwords, and the check of a number of seconds (`Producer`, `Worker`,
`Connection`, the web integrations and `SyncProducer` take timeouts alike).

A setting may name several brokers (the nodes of a cluster): a sequence of URLs, or one string of
URLs separated by commas. Each URL carries its own credentials and vhost.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from urllib.parse import quote, urlsplit

from .._exceptions import ConfigurationError

__all__ = (
    "DEFAULT_URL",
    "URLs",
    "check_connection_name",
    "check_flag",
    "check_name",
    "check_seconds",
    "check_wait",
    "redact_url",
    "resolve_url",
    "resolve_urls",
)

DEFAULT_URL = "amqp://guest:guest@localhost/"

URLs = str | Sequence[str]
"""One broker URL, several separated by commas, or a sequence of them."""

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)")


def resolve_urls(url: URLs | None = None, environ: Mapping[str, str] | None = None) -> list[str]:
    """The broker URLs: `url`, else `AMQP_URL`, else lapinmq's `RABBITMQ_*` variables, else local.

    `url` and `AMQP_URL` may list several URLs separated by commas; `RABBITMQ_HOST` may list
    several hosts (`host1,host2:5673`), which share `RABBITMQ_PORT` (5672), `RABBITMQ_USERNAME`,
    `RABBITMQ_PASSWORD` and `RABBITMQ_VHOST` (`/`).

    Raises:
        ConfigurationError: a URL is not an `amqp://` or `amqps://` URL with a host, or its
            password holds characters that must be percent-encoded. The message never shows the
            password.
    """
    env = os.environ if environ is None else environ
    if url is None:
        url = env.get("AMQP_URL") or _urls_from_parts(env) or DEFAULT_URL
    parts = _split(url) if isinstance(url, str) else [u.strip() for u in url]
    if not parts or not all(parts):
        raise ConfigurationError(
            "no broker URL: pass url='amqp://user:pass@host:5672/vhost' or a list of them"
        )
    for part in parts:
        _validate(part)
    return parts


def resolve_url(url: URLs | None = None, environ: Mapping[str, str] | None = None) -> str:
    """`resolve_urls` as one string, URLs separated by commas (a single URL unchanged)."""
    return ",".join(resolve_urls(url, environ))


def _split(text: str) -> list[str]:
    """Split `a,b` into URLs; a comma inside a URL's query (`?x=1,2`) is not a separator."""
    pieces = [piece.strip() for piece in text.split(",")]
    urls: list[str] = []
    for piece in pieces:
        if urls and not _SCHEME.match(piece):
            urls[-1] += "," + piece  # a comma inside the previous URL
        else:
            urls.append(piece)
    return urls


def _urls_from_parts(env: Mapping[str, str]) -> str | None:
    hosts = env.get("RABBITMQ_HOST")
    if not hosts:
        return None
    port = env.get("RABBITMQ_PORT", "5672")
    if not port.isdigit():
        raise ConfigurationError(f"RABBITMQ_PORT must be a port number, got {port!r}")
    user = quote(env.get("RABBITMQ_USERNAME", "guest"), safe="")
    password = quote(env.get("RABBITMQ_PASSWORD", "guest"), safe="")
    vhost = quote(env.get("RABBITMQ_VHOST", "/"), safe="")
    urls = []
    for host in hosts.split(","):
        host = host.strip()
        address = host if ":" in host else f"{host}:{port}"
        urls.append(f"amqp://{user}:{password}@{address}/{vhost}")
    return ",".join(urls)


def _userinfo_end(url: str) -> tuple[int, int]:
    """`(start, end)` of the userinfo of `url` (end at its last `@`); `(0, 0)` when none."""
    match = _SCHEME.match(url)
    start = match.end() if match else 0
    end = url.rfind("@", start)
    return (start, end) if end > 0 else (0, 0)


def _validate(url: str) -> None:
    shown = redact_url(url)
    start, end = _userinfo_end(url)
    if end and any(ch in url[start:end] for ch in "/?#"):
        raise ConfigurationError(
            f"invalid broker URL {shown!r}: the user name or password holds '/', '?' or '#'; "
            "percent-encode them, e.g. urllib.parse.quote(password, safe='')"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        # urlsplit's own message may quote part of the password: it is not repeated here.
        raise ConfigurationError(
            f"invalid broker URL {shown!r}: its host or port does not parse (percent-encode "
            "special characters in the user name and password); expected "
            "amqp://user:pass@host:5672/vhost"
        ) from None
    if parts.scheme not in ("amqp", "amqps"):
        raise ConfigurationError(
            f"invalid broker URL {shown!r}: scheme must be amqp:// or amqps://"
        )
    if not parts.hostname:
        raise ConfigurationError(f"invalid broker URL {shown!r}: it names no host")
    if port == 0:
        raise ConfigurationError(f"invalid broker URL {shown!r}: port 0")


def redact_url(url: str) -> str:
    """`url` with each password replaced by `***`, safe for logs, reprs and error messages.

    Works on lists separated by commas, and on URLs whose password holds unencoded special
    characters (everything between the user name and the last `@` is hidden).
    """
    if "," in url:
        return ",".join(_redact_one(part) for part in _split(url))
    return _redact_one(url)


def _redact_one(url: str) -> str:
    start, end = _userinfo_end(url)
    if not end:
        return url
    userinfo = url[start:end]
    user, colon, _ = userinfo.partition(":")
    if not colon:
        return url
    return f"{url[:start]}{user}:***{url[end:]}"


def check_name(what: str, value: object) -> None:
    """`value`, a str setting (a name) or None.

    Raises:
        ConfigurationError: anything else (an int, bytes); the message names `what`.
    """
    if value is not None and not isinstance(value, str):
        raise ConfigurationError(
            f"{what} must be a str (or None), got {type(value).__name__} {value!r}"
        )


MAX_CONNECTION_NAME = 1000
"""Bytes of a connection name (UTF-8): the handshake frame that carries it is at most 4 KiB."""


def check_connection_name(value: object) -> None:
    """`value`, a connection's `name=` (or None): a str the broker can take.

    Raises:
        ConfigurationError: not a str, not valid text (a lone surrogate), or over
            `MAX_CONNECTION_NAME` bytes as UTF-8: every connect would fail.
    """
    check_name("name", value)
    if value is None:
        return
    assert isinstance(value, str)
    try:
        size = len(value.encode())
    except UnicodeEncodeError as exc:
        raise ConfigurationError(
            f"name {value[:40]!r} is not valid text ({exc.reason}): AMQP sends it as UTF-8"
        ) from None
    if size > MAX_CONNECTION_NAME:
        raise ConfigurationError(
            f"name is {size:,} bytes long as UTF-8: a connection name takes at most "
            f"{MAX_CONNECTION_NAME:,} ({value[:40]!r}...); use a shorter name"
        )


def check_flag(what: str, value: object) -> bool:
    """`value`, a bool setting (taken as its truth value, `persistent="no"` was True).

    Raises:
        ConfigurationError: anything but True or False (0, 1, "no", None); the message names
            `what`.
    """
    if value is not True and value is not False:
        raise ConfigurationError(f"{what} must be True or False, got {value!r}: pass a bool")
    return value


def check_wait(what: str, value: object) -> float:
    """`value`, the seconds a stop or a close may wait: a number, not NaN (a bool is not one);
    below 0 counts as 0, and `inf` waits as long as it takes.

    Checked before the stop or close changes anything: a refused call leaves it as it was.

    Raises:
        ConfigurationError: anything else; the message names `what`.
    """
    return check_seconds(what, value, clamp=True, forever=True)


def check_seconds(
    what: str,
    value: object,
    *,
    zero: bool = False,
    forever: bool = False,
    clamp: bool = False,
    or_none: bool = False,
    error: type[ConfigurationError] = ConfigurationError,
) -> float:
    """`value`, a number of seconds: more than 0 (or 0 too, with `zero`), and finite (or
    infinite too, with `forever`). With `clamp` (a wait), any number is taken and one below 0
    counts as 0; `or_none` says in the message that None is allowed too (the caller takes
    None before). The one check of a number of seconds: `check_wait` and a job's wait bound
    use it too.

    Raises:
        ConfigurationError: not a number (a bool is not one), out of range, or NaN; the
            message names `what`. `error` is the subclass raised (e.g. the outbox's).
    """
    zero = zero or clamp
    if isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value):
        number = max(float(value), 0.0) if clamp else float(value)
        if (number >= 0 if zero else number > 0) and (forever or not math.isinf(number)):
            return number
    kind = "a number" if forever else "a finite number"
    bound = ">= 0" if zero else "> 0"
    if or_none:
        bound += " (or None for no bound)"
    raise error(f"{what} must be {kind} of seconds {bound}, got {value!r}")
