"""Who may act: the tokens, the signed session cookie, and the CSRF token of each form.

Read-only is the default. With actions allowed, an action needs a token, sent as
`Authorization: Bearer TOKEN` or given once in the login form, which sets a session cookie
(`HttpOnly`, `SameSite=Strict`, signed with a key derived from the token, so revoking the token
ends its sessions). A form posted with the cookie must carry the CSRF token the page put in it
(an HMAC of the session), which another site cannot read.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from aio_workq import ConfigurationError

from ._http import Request

__all__ = ("COOKIE", "ENV_TOKEN", "Caller", "Security")

COOKIE = "workq_session"
ENV_TOKEN = "AIO_WORKQ_DASHBOARD_TOKEN"
_SESSION_SECONDS = 12 * 3600
_MIN_TOKEN = 16


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request: `token_id` (a hash prefix of the token; never the token) when it
    carried a valid one, whether it came with the session cookie (then forms need CSRF), and
    whether it sent a bearer token that is none of the dashboard's (`wrong_token`)."""

    token_id: str | None
    remote: str
    by_cookie: bool = False
    wrong_token: bool = False

    def __str__(self) -> str:
        who = f"token {self.token_id}" if self.token_id else "anonymous"
        return f"{who} from {self.remote}"


def _token_id(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True, kw_only=True)
class Security:
    """Whether actions are allowed, and the tokens that may take them.

    Args:
        allow_actions: replay, purge and cancel are offered (read-only otherwise).
        tokens: the secrets that authorise an action (at least 16 characters each).

    Raises:
        ConfigurationError: actions allowed without a token, or a token too short.
    """

    allow_actions: bool = False
    tokens: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if self.allow_actions and not self.tokens:
            raise ConfigurationError(
                "actions need a token: give --token-file PATH or set "
                f"{ENV_TOKEN} (a random string of 16 characters or more)"
            )
        for token in self.tokens:
            if len(token) < _MIN_TOKEN:
                raise ConfigurationError(
                    f"a dashboard token must be at least {_MIN_TOKEN} characters long "
                    f"(one has {len(token)}); e.g. python -c 'import secrets; "
                    "print(secrets.token_urlsafe(32))'"
                )

    @classmethod
    def load(
        cls, *, allow_actions: bool, token_file: str | os.PathLike[str] | None = None
    ) -> Security:
        """From a token file (one token a line, `#` comments) or, without one,
        `AIO_WORKQ_DASHBOARD_TOKEN`.

        Raises:
            ConfigurationError: the file can't be read or holds no token; see the class too.
        """
        tokens: list[str] = []
        if token_file is not None:
            try:
                text = Path(token_file).read_text()
            except OSError as exc:
                raise ConfigurationError(
                    f"cannot read the token file {str(token_file)!r}: {exc.strerror}"
                ) from None
            tokens = [
                line.strip()
                for line in text.splitlines()
                if line.strip() and not line.lstrip().startswith("#")
            ]
            if not tokens:
                raise ConfigurationError(f"the token file {str(token_file)!r} holds no token")
        elif env := os.environ.get(ENV_TOKEN, "").strip():
            tokens = [env]
        return cls(allow_actions=allow_actions, tokens=tuple(tokens))

    # -- tokens and sessions -------------------------------------------------------------------

    def _key(self, token: str) -> bytes:
        return hashlib.sha256(b"aio-workq dashboard session\0" + token.encode()).digest()

    def _by_id(self, token_id: str) -> str | None:
        for token in self.tokens:
            if hmac.compare_digest(_token_id(token), token_id):
                return token
        return None

    def check_token(self, given: str) -> str | None:
        """The id of the token `given` is, or None."""
        found = None
        for token in self.tokens:  # every one compared: no early exit to time
            if hmac.compare_digest(token.encode(), given.encode()):
                found = _token_id(token)
        return found

    def session_cookie(self, token_id: str, *, now: float | None = None) -> str:
        """A session value for this token: `id.expires.signature`."""
        token = self._by_id(token_id)
        assert token is not None
        expires = int((time.time() if now is None else now) + _SESSION_SECONDS)
        payload = f"{token_id}.{expires}"
        signature = hmac.new(self._key(token), payload.encode(), hashlib.sha256).hexdigest()
        return f"{payload}.{signature}"

    def check_session(self, value: str, *, now: float | None = None) -> str | None:
        """The token id of a valid, unexpired session value, or None."""
        parts = value.split(".")
        if len(parts) != 3 or not parts[1].isdigit():
            return None
        token_id, expires, signature = parts
        token = self._by_id(token_id)
        if token is None:
            return None
        payload = f"{token_id}.{expires}".encode()
        expected = hmac.new(self._key(token), payload, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, signature):
            return None
        if int(expires) < (time.time() if now is None else now):
            return None
        return token_id

    def csrf_token(self, session: str) -> str:
        """The CSRF token of the forms shown to this session."""
        token_id = session.split(".", 1)[0]
        token = self._by_id(token_id)
        key = self._key(token) if token is not None else b""
        return hmac.new(key, b"csrf\0" + session.encode(), hashlib.sha256).hexdigest()[:32]

    def caller(self, request: Request) -> Caller:
        """Who sent `request`: a bearer token first, then the session cookie."""
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            token_id = self.check_token(auth[7:].strip())
            return Caller(token_id, request.remote, wrong_token=token_id is None)
        session = request.cookies.get(COOKIE, "")
        if session:
            token_id = self.check_session(session)
            if token_id is not None:
                return Caller(token_id, request.remote, by_cookie=True)
        return Caller(None, request.remote)

    def csrf_ok(self, request: Request) -> bool:
        """The form carries the CSRF token of the session it came with."""
        session = request.cookies.get(COOKIE, "")
        given = request.field("csrf")
        return bool(session and given) and hmac.compare_digest(self.csrf_token(session), given)
