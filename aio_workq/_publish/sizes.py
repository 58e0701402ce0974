"""The largest body a publish may carry: RabbitMQ's `max_message_size`, and the one error a
body over it gets, whether the publisher refused it before sending or the broker refused it.

RabbitMQ refuses a larger message by closing its channel with 406 PRECONDITION_FAILED
("message size N is larger than configured max size M"). The publisher refuses bodies over the
default (128 MiB) before sending them; a broker set lower is learned from its first refusal
(`refused_limit`), and the publisher refuses bodies over that before sending them from then on.
"""

from __future__ import annotations

import re

from .._exceptions import MessageTooLargeError

__all__ = ("MAX_MESSAGE_SIZE", "body_too_large", "refused_limit")

MAX_MESSAGE_SIZE = 128 * 2**20
"""RabbitMQ's default `max_message_size`: a larger body would close the channel (and fail or
resend every other message on it), so it is refused before it is sent."""

_REFUSED = re.compile(r"larger than configured max size (\d+)")


def refused_limit(reason: BaseException | None) -> int | None:
    """The broker's `max_message_size` when `reason` (a channel's close) is its refusal of a
    message for its size; None for any other reason."""
    if reason is None:
        return None
    found = _REFUSED.search(str(reason))
    return int(found.group(1)) if found else None


def body_too_large(message_id: str, size: int, limit: int) -> MessageTooLargeError:
    """The error of a body of `size` bytes over `limit` (the broker's, or the default)."""
    if limit == MAX_MESSAGE_SIZE:
        over = f"RabbitMQ refuses more than {limit:,} (max_message_size, 128 MiB by default)"
    else:
        over = f"over the broker's max_message_size of {limit:,} bytes"
    return MessageTooLargeError(
        f"message {message_id} has a body of {size:,} bytes: {over}; nothing of it reached "
        "a queue. Store large payloads elsewhere (object storage, a table, a file) and send "
        "a reference, or raise the broker's max_message_size",
        message_id=message_id,
        size=size,
        limit=limit,
    )
