"""The dashboard's own request and response: what its handlers see, whatever serves them.

The aiohttp and ASGI adapters translate to and from these two classes, so the pages, the
security checks and their tests know nothing of either framework.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, quote

__all__ = ("MAX_BODY", "Request", "Response", "parse_cookies", "parse_form", "quote_path")

MAX_BODY = 64 * 1024
"""The largest form body read (bytes); a longer one gets 413."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """One request, its path relative to where the dashboard is mounted.

    Args:
        method: `GET`, `POST`, ...
        path: the path below the mount point, starting with `/`.
        prefix: the mount point (`""` at the root, else `/workq`): every link starts with it.
        query: the query string's fields.
        form: a urlencoded POST body's fields.
        headers: the headers, names in lower case.
        remote: the client's address, for the action log.
        secure: the request came over HTTPS (cookies get `Secure`).
    """

    method: str
    path: str
    prefix: str = ""
    query: Mapping[str, list[str]] = field(default_factory=dict)
    form: Mapping[str, list[str]] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    remote: str = "-"
    secure: bool = False

    def arg(self, name: str, default: str = "") -> str:
        """A query field's first value."""
        values = self.query.get(name)
        return values[0] if values else default

    def field(self, name: str, default: str = "") -> str:
        """A form field's first value."""
        values = self.form.get(name)
        return values[0] if values else default

    def fields(self, name: str) -> list[str]:
        """Every value of a form field (checkboxes)."""
        return list(self.form.get(name, ()))

    @property
    def cookies(self) -> dict[str, str]:
        """The cookies sent."""
        return parse_cookies(self.headers.get("cookie", ""))

    @property
    def htmx(self) -> bool:
        """Asked for by htmx (a fragment will do)."""
        return self.headers.get("hx-request") == "true"

    def link(self, path: str) -> str:
        """`path` (below the mount point) as a link that works wherever it is mounted."""
        return self.prefix + path


@dataclass(slots=True, kw_only=True)
class Response:
    """What a handler returns."""

    status: int = 200
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def redirect(cls, location: str) -> Response:
        """303 See Other to `location` (after a POST)."""
        return cls(status=303, headers=[("Location", location)])

    def all_headers(self) -> list[tuple[str, str]]:
        """The headers to send: content type and the safety headers first."""
        own = {name.lower() for name, _ in self.headers}
        cache = [] if "cache-control" in own else [("Cache-Control", "no-store")]
        return [
            ("Content-Type", self.content_type),
            ("X-Content-Type-Options", "nosniff"),
            ("X-Frame-Options", "DENY"),
            ("Referrer-Policy", "same-origin"),
            *cache,
            (
                "Content-Security-Policy",
                "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                "frame-ancestors 'none'; form-action 'self'",
            ),
            *self.headers,
        ]


def parse_cookies(header: str) -> dict[str, str]:
    """The cookies of a `Cookie` header (a malformed one reads as none)."""
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except Exception:  # a malformed header: no cookies
        return {}
    return {key: morsel.value for key, morsel in jar.items()}


def parse_form(body: bytes) -> dict[str, list[str]]:
    """A urlencoded body's fields (undecodable bytes replaced)."""
    return parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)


def quote_path(text: str) -> str:
    """A path segment, percent-encoded (queue names may hold anything)."""
    return quote(text, safe="")
