"""The errors of `aio_workq.outbox`, under `aio_workq.WorkqError`.

```
WorkqError
├── ConfigurationError(WorkqError, ValueError)
│   └── OutboxConfigurationError        a bad argument: schema name, batch size, delay, ...
└── OutboxError                         the outbox could not do its work
    ├── UnsupportedConnectionError(OutboxError, TypeError)
    │                                   publish() got a connection type it does not know
    └── OutboxSchemaError               the tables are missing: run the migration
```
"""

from __future__ import annotations

from .._exceptions import ConfigurationError, WorkqError

__all__ = (
    "OutboxConfigurationError",
    "OutboxError",
    "OutboxSchemaError",
    "UnsupportedConnectionError",
)


class OutboxError(WorkqError):
    """Base class of the errors `aio_workq.outbox` raises for its own reasons."""


class OutboxConfigurationError(ConfigurationError):
    """An outbox, relay or idempotent-consumer argument is invalid; the message names it."""


class UnsupportedConnectionError(OutboxError, TypeError):
    """`publish()` was given an object that is not a supported database connection or session."""


class OutboxSchemaError(OutboxError):
    """The outbox tables do not exist in the schema: run `aio_workq.outbox.migrate()` first."""
